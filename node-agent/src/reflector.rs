//! The agent's list+watch of one collection (client-go's reflector, small): list, watch from
//! the list's resourceVersion, and re-list after a 410 `Expired`, a broken stream or an error
//! (with back-off). Changes go to a channel, so the consumer owns its state.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wasmctl_client::Client;

use crate::back_off;

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
        let rv = list["metadata"]["resourceVersion"]
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
        let watch = format!("{path}{sep}watch=1&resourceVersion={rv}&allowWatchBookmarks=true");
        let mut stream = match api.watch(&watch, None).await {
            Ok(s) => {
                backoff = Duration::from_millis(200);
                s
            }
            Err(e) => {
                tracing::warn!(%path, error = %e, "watch failed; relisting");
                if !back_off(&mut backoff, &shutdown).await {
                    break;
                }
                continue;
            }
        };
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                ev = stream.next() => ev,
            };
            let Some(Ok(mut ev)) = ev else {
                continue 'outer;
            };
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
    }
}
