//! Watches: a replay of the history followed by the live events, without gap or duplicate.
//!
//! The stream first reads the history in chunks of [`HISTORY_CHUNK`] records, without holding a
//! live receiver (so a long replay cannot overflow the channel). Once a chunk reaches the end of
//! the history it subscribes to the live channel and reads the history once more from where it
//! stopped: any event written before the subscription is in that read, any event written after it
//! is published to the receiver (events are published after they are written). Live events at or
//! below the last revision already delivered are skipped.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::state_machine::{read_history, HistoryChunk, SmShared};
use crate::types::{Broadcast, WatchEvent};
use crate::StoreError;

/// History records read per chunk while replaying.
pub(crate) const HISTORY_CHUNK: usize = 1024;

enum Phase {
    /// Reading history; not subscribed yet.
    Replay,
    /// Subscribed; reading the history that may have been written before the subscription.
    CatchUp(broadcast::Receiver<Broadcast>),
    /// Delivering live events.
    Live(broadcast::Receiver<Broadcast>),
    /// Ended (error delivered, or the store shut down).
    Done,
}

/// The events of one watch, from [`Store::watch`](crate::Store::watch).
pub struct WatchStream {
    shared: Arc<SmShared>,
    prefix: String,
    /// The highest revision already looked at (delivered, or skipped for its key).
    last_seen: u64,
    phase: Phase,
    ready: VecDeque<WatchEvent>,
}

impl WatchStream {
    pub(crate) fn new(shared: Arc<SmShared>, prefix: String, after_revision: u64) -> Self {
        WatchStream {
            shared,
            prefix,
            last_seen: after_revision,
            phase: Phase::Replay,
            ready: VecDeque::new(),
        }
    }

    /// The revision of the last event looked at: a new watch from here continues this one.
    pub fn last_revision(&self) -> u64 {
        self.last_seen
    }

    /// The revision this stream has delivered everything up to: every event of its prefix at
    /// or below it has been returned by [`WatchStream::next`], including the store's writes to
    /// other keys that it skipped. A bookmark at this revision lets a quiet watch resume from
    /// a revision still inside the history. (Below [`WatchStream::last_revision`] while events
    /// read from the history are still queued.)
    pub fn progress_revision(&self) -> u64 {
        match self.ready.front() {
            Some(next) => next.revision - 1,
            None => self.last_seen,
        }
    }

    /// The next event, in revision order. `None` once the store has shut down (or after an
    /// error has been returned). Errors: [`StoreError::Compacted`] if the history needed was
    /// compacted, [`StoreError::WatchLagged`] if the live channel overflowed; the stream ends
    /// after either.
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Replay | Phase::CatchUp(_) => {
                    let chunk = match self.read_chunk().await {
                        Ok(chunk) => chunk,
                        Err(e) => return Some(Err(self.end(e))),
                    };
                    let exhausted = chunk.exhausted;
                    self.last_seen = chunk.last_revision;
                    self.ready.extend(chunk.events);
                    if exhausted {
                        self.phase = match std::mem::replace(&mut self.phase, Phase::Done) {
                            Phase::Replay => match self.shared.subscribe() {
                                Some(rx) => Phase::CatchUp(rx),
                                None => Phase::Done,
                            },
                            Phase::CatchUp(rx) => Phase::Live(rx),
                            other => other,
                        };
                    }
                }
                Phase::Live(rx) => match rx.recv().await {
                    Ok(Broadcast::Event(event)) => {
                        if event.revision <= self.last_seen {
                            continue;
                        }
                        self.last_seen = event.revision;
                        if event.key.starts_with(&self.prefix) {
                            return Some(Ok(WatchEvent::clone(&event)));
                        }
                    }
                    Ok(Broadcast::Reset { revision }) => {
                        if revision > self.last_seen {
                            let requested = self.last_seen;
                            return Some(Err(self.end(StoreError::Compacted {
                                requested,
                                compacted: revision,
                            })));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(prefix = %self.prefix, missed, "watch lagged and was dropped");
                        return Some(Err(self.end(StoreError::WatchLagged)));
                    }
                    Err(RecvError::Closed) => self.phase = Phase::Done,
                },
            }
        }
    }

    /// Ends the stream after delivering `error`.
    fn end(&mut self, error: StoreError) -> StoreError {
        self.phase = Phase::Done;
        self.ready.clear();
        error
    }

    async fn read_chunk(&self) -> Result<HistoryChunk, StoreError> {
        let db = self.shared.db.clone();
        let after = self.last_seen;
        let prefix = self.prefix.clone();
        tokio::task::spawn_blocking(move || read_history(&db, after, HISTORY_CHUNK, &prefix))
            .await
            .map_err(|e| StoreError::storage("reading history", e))?
    }
}
