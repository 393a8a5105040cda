//! Group commit: concurrent [`Store::write`](crate::Store::write) calls share Raft entries.
//!
//! openraft 0.9 appends and flushes one log entry per `client_write`, so N concurrent writers
//! cost N fsyncs in a row. Here every write is queued; one task takes what has queued up
//! (at most [`MAX_BATCH_OPS`] ops and [`MAX_BATCH_BYTES`] of values) into ONE entry and keeps
//! up to [`MAX_IN_FLIGHT`] entries in flight, so that while one is being committed the next
//! batch fills. Each caller's ops keep their order and get their own results: the ops of an
//! entry are applied one after another, each with its own precondition (a `Txn` op is
//! all-or-nothing by itself), exactly as if the callers had written one after another.
//! A failed entry fails every caller in it with the same error.

use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::types::{Op, OpResult, WriteRequest};
use crate::{cluster, Inner, Store, StoreError};

/// Most ops in one entry.
pub const MAX_BATCH_OPS: usize = 4096;
/// Most value bytes in one entry (a single larger write still goes alone).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Entries being committed at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Writes waiting to be batched; callers wait for room beyond that.
const QUEUE: usize = 8192;

type Reply = oneshot::Sender<Result<Vec<OpResult>, StoreError>>;

pub(crate) struct Pending {
    ops: Vec<Op>,
    reply: Reply,
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, value, .. } => key.len() + value.len(),
        Op::Delete { key, .. } => key.len(),
        Op::Txn { compares, ops } => {
            compares.iter().map(|(k, _)| k.len()).sum::<usize>()
                + ops.iter().map(op_bytes).sum::<usize>()
        }
    }
}

/// The sending side, kept in the store.
pub(crate) type Batcher = mpsc::Sender<Pending>;

/// Starts the batching task for `inner` and returns its queue.
pub(crate) fn start(inner: Weak<Inner>) -> Batcher {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(inner, rx));
    tx
}

/// Queues `ops` and waits for their results.
pub(crate) async fn submit(queue: &Batcher, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
    let (reply, rx) = oneshot::channel();
    queue
        .send(Pending { ops, reply })
        .await
        .map_err(|_| StoreError::Unavailable("the store is shut down".to_owned()))?;
    rx.await
        .map_err(|_| StoreError::Unavailable("the store is shut down".to_owned()))?
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        // Wait for a free slot first: meanwhile writes queue up and form the next batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut n_ops = batch[0].ops.len();
        let mut bytes: usize = batch[0].ops.iter().map(op_bytes).sum();
        while n_ops < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            let Ok(next) = rx.try_recv() else { break };
            let next_bytes: usize = next.ops.iter().map(op_bytes).sum();
            if n_ops + next.ops.len() > MAX_BATCH_OPS || bytes + next_bytes > MAX_BATCH_BYTES {
                carry = Some(next);
                break;
            }
            n_ops += next.ops.len();
            bytes += next_bytes;
            batch.push(next);
        }
        let Some(strong) = inner.upgrade() else {
            fail(
                batch,
                StoreError::Unavailable("the store is shut down".to_owned()),
            );
            return;
        };
        let store = Store { inner: strong };
        tokio::spawn(async move {
            let _permit = permit;
            commit(&store, batch).await;
        });
    }
}

fn fail(batch: Vec<Pending>, e: StoreError) {
    for p in batch {
        let _ = p.reply.send(Err(e.clone()));
    }
}

async fn commit(store: &Store, batch: Vec<Pending>) {
    let mut ops = Vec::with_capacity(batch.iter().map(|p| p.ops.len()).sum());
    let mut replies = Vec::with_capacity(batch.len());
    for p in batch {
        replies.push((p.ops.len(), p.reply));
        ops.extend(p.ops);
    }
    let n = ops.len();
    match cluster::write(store, WriteRequest { ops }).await {
        Ok(results) if results.len() == n => {
            let mut results = results.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(results.by_ref().take(count).collect()));
            }
        }
        Ok(results) => {
            let e = StoreError::Storage(format!(
                "the state machine returned {} results for {n} ops",
                results.len()
            ));
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
