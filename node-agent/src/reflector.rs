//! The agent's list+watch of one collection (client-go's reflector, small): list, watch from
//! the list's resourceVersion, resume the watch from the last resourceVersion seen (events and
//! bookmarks) when its stream breaks or ends, and re-list after a 410 `Expired` or any other
//! error (with back-off). Changes go to a channel, so the consumer owns its state.
//!
//! A broken stream is also how an API server's death shows: the [`Client`] then sends the
//! resumed watch to the next server (its failover), which serves it from the same store, so an
//! agent whose server dies keeps its state and misses no event.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wasmctl_client::{Client, ClientError};

use crate::back_off;

/// A watch that lasted this long was healthy: its end is resumed from at once.
const HEALTHY_WATCH: Duration = Duration::from_secs(1);

/// One change of the collection.
pub enum Event {
    /// A complete list: replaces everything seen before.
    Reset(Vec<Value>),
    /// Added or modified.
    Upsert(Value),
    /// Deleted (the object as last seen).
    Delete(Value),
}

/// Lists and watches `path` (a collection path, with its own query if any) until `shutdown`
/// or until the receiver of `tx` is gone. `wrap` turns each event into the consumer's message
/// (`None` drops it).
pub async fn reflect<T>(
    api: Client,
    path: String,
    tx: mpsc::Sender<T>,
    wrap: impl Fn(Event) -> Option<T>,
    shutdown: CancellationToken,
) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut backoff = Duration::from_millis(200);
    'outer: while !shutdown.is_cancelled() {
        let mut list = match api.get(&path).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%path, error = %e, "listing failed; retrying");
                if !back_off(&mut backoff, &shutdown).await {
                    break;
                }
                continue;
            }
        };
        let mut rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string();
        let items = match list["items"].take() {
            Value::Array(items) => items,
            _ => Vec::new(),
        };
        if let Some(msg) = wrap(Event::Reset(items)) {
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        // Watch from `rv`, and again from the last resourceVersion seen whenever the stream
        // ends (a server that died or closed it): only an error of the API re-lists.
        loop {
            let watch = format!("{path}{sep}watch=1&resourceVersion={rv}&allowWatchBookmarks=true");
            let mut stream = match api.watch(&watch, None).await {
                Ok(s) => s,
                // Too old to resume from: a fresh list, at once (client-go's reflector).
                Err(e) if e.code() == Some(410) => continue 'outer,
                Err(e) => {
                    let unreachable = matches!(e, ClientError::Unreachable { .. });
                    tracing::warn!(%path, error = %e, server = %api.server(),
                        "watch failed; {}", if unreachable { "retrying" } else { "relisting" });
                    if !back_off(&mut backoff, &shutdown).await {
                        break 'outer;
                    }
                    if unreachable {
                        continue;
                    }
                    continue 'outer;
                }
            };
            let opened = Instant::now();
            let mut got_any = false;
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    ev = stream.next() => ev,
                };
                let mut ev = match ev {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => {
                        tracing::info!(%path, error = %e, %rv, "watch broke; resuming");
                        break;
                    }
                    None => break,
                };
                got_any = true;
                if let Some(r) = ev["object"]["metadata"]["resourceVersion"].as_str() {
                    if matches!(
                        ev["type"].as_str(),
                        Some("ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK")
                    ) {
                        rv = r.to_string();
                    }
                }
                let event = match ev["type"].as_str() {
                    Some("ADDED" | "MODIFIED") => Event::Upsert(ev["object"].take()),
                    Some("DELETED") => Event::Delete(ev["object"].take()),
                    Some("BOOKMARK") => continue,
                    // ERROR (410 Expired after a lagging watch) or anything unknown: re-list.
                    _ => continue 'outer,
                };
                if let Some(msg) = wrap(event) {
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
            // A stream that ended at once, before any event, waits before the next, so that a
            // server closing every watch is not asked in a loop.
            if got_any || opened.elapsed() >= HEALTHY_WATCH {
                backoff = Duration::from_millis(200);
            } else if !back_off(&mut backoff, &shutdown).await {
                break 'outer;
            }
        }
    }
}
