//! WATCH: a chunked stream of `{"type": ..., "object": ...}` lines, replayed from the store's
//! retained history and then live, filtered by label and field selectors with Kubernetes'
//! transition semantics (an object that stops matching is reported DELETED).
//!
//! Bounded: the number of watches is capped by a semaphore; each watch has a small frame
//! queue, and a client that does not read falls behind the store's broadcast buffer and is
//! ended with a 410 `Expired` error event. A watch ends at its deadline and at shutdown even
//! while its client is not reading (its queue full), releasing its slot and its place in the
//! broadcast ring.
//!
//! A bookmark carries the store revision the watch has seen everything up to — writes to other
//! kinds included — as kube-apiserver's do, so a watch of a quiet kind resumes from a revision
//! still in the history instead of falling out of it and re-listing. A watch from a
//! `resourceVersion` the store has not reached waits up to 3 s for it, then gets 504 "Too large
//! resource version" (rather than silently skipping every event up to it).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::table::{self, IncludeObject};
use wasmctl_store::{EventKind, WatchEvent};

use super::{list_options, ApiState, Body, Query};
use crate::error::ApiError;
use crate::objects::{decode_kv, ListOptions, Objects};

/// Frames buffered per watch between the producer task and the connection.
const WATCH_QUEUE: usize = 64;

struct Encoder {
    info: &'static ResourceInfo,
    table: bool,
    sent_columns: bool,
}

impl Encoder {
    fn event(&mut self, type_: &str, obj: &Value) -> Bytes {
        let object = if self.table && type_ != "BOOKMARK" && type_ != "ERROR" {
            let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let mut t = table::table(
                self.info,
                std::slice::from_ref(obj),
                rv,
                None,
                IncludeObject::Metadata,
                chrono::Utc::now(),
            );
            if self.sent_columns {
                t["columnDefinitions"] = json!([]);
            }
            self.sent_columns = true;
            t
        } else {
            obj.clone()
        };
        let mut line =
            serde_json::to_vec(&json!({"type": type_, "object": object})).expect("serialises");
        line.push(b'\n');
        Bytes::from(line)
    }

    fn bookmark(&self, rev: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.info.kind, "apiVersion": self.info.api_version(), "metadata": meta});
        let mut line =
            serde_json::to_vec(&json!({"type": "BOOKMARK", "object": obj})).expect("serialises");
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// Queue one frame for the client. False when the watch is over: the client went away, or
/// the deadline passed or the server began shutting down — also while the queue is full
/// because the client stopped reading, so a stalled client cannot hold its watch slot (and
/// the store's broadcast ring) past its deadline.
async fn send(
    tx: &mpsc::Sender<Bytes>,
    frame: Bytes,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        r = tx.send(frame) => r.is_ok(),
        _ = tokio::time::sleep_until(deadline) => false,
        _ = shutdown.cancelled() => false,
    }
}

/// Translate one store event into at most one watch event for this watcher.
fn translate(
    objects: &Objects,
    opts: &ListOptions,
    ev: &WatchEvent,
) -> Option<(&'static str, Value)> {
    let prev = ev.prev.as_ref().and_then(|kv| decode_kv(kv).ok());
    let prev_match = prev.as_ref().is_some_and(|p| objects.matches(p, opts));
    match ev.kind {
        EventKind::Put => {
            let new = decode_kv(ev.value.as_ref()?).ok()?;
            let new_match = objects.matches(&new, opts);
            match (prev.is_some() && prev_match, new_match) {
                (true, true) => Some(("MODIFIED", new)),
                (false, true) => Some(("ADDED", new)),
                (true, false) => {
                    // Stopped matching: report it gone, at this revision.
                    Some(("DELETED", new))
                }
                (false, false) => None,
            }
        }
        EventKind::Delete => {
            let mut p = prev?;
            if !prev_match {
                return None;
            }
            p["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
            Some(("DELETED", p))
        }
    }
}

pub async fn watch(
    state: Arc<ApiState>,
    info: &'static ResourceInfo,
    ns: Option<&str>,
    q: &Query,
    as_table: bool,
) -> Result<Response<Body>, ApiError> {
    let permit = state
        .watches
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyRequests("too many open watches; retry later".into()))?;
    // A watch filters by the selectors only; paging parameters do not apply.
    let mut list_opts = list_options(q)?;
    list_opts.limit = 0;
    list_opts.continue_token = None;
    // A watch's resourceVersion is where it starts, checked below.
    list_opts.min_revision = 0;
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.get("sendInitialEvents").map(|v| v == "true");
    let timeout = match q.int("timeoutSeconds")? {
        Some(s) if s > 0 => Duration::from_secs(s as u64).min(state.config.max_watch_duration),
        _ => state.config.max_watch_duration,
    };
    let rv = q.get("resourceVersion").filter(|v| !v.is_empty());
    let objects = state.objects.clone();

    // Unset or "0": start with the current state as ADDED events (as kube-apiserver does),
    // as does sendInitialEvents=true.
    let initial_state = matches!(rv, None | Some("0")) || send_initial == Some(true);
    let requested = rv
        .map(|rv| {
            rv.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("resourceVersion: invalid value {rv:?}")))
        })
        .transpose()?
        .unwrap_or(0);
    if requested > 0 {
        objects.wait_for_revision(requested).await?;
    }
    // The initial state holds a list slot until it has been sent.
    let (initial, start_rev, list_permit) = if initial_state {
        let permit = state.lists.enter().await?;
        let page = objects.list(info, ns, &list_opts).await?;
        (page.items, page.resource_version, Some(permit))
    } else {
        (Vec::new(), requested, None)
    };
    let mut events = objects.store().watch(&info.key_prefix(ns), start_rev)?;

    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_QUEUE);
    let shutdown = state.shutdown.clone();
    let bookmark_every = state.config.bookmark_interval;
    let mut enc = Encoder {
        info,
        table: as_table,
        sent_columns: false,
    };
    // The producer ends when the client goes away (send fails), the deadline passes, the
    // server shuts down (also while it waits for room in the queue), or the watch falls
    // behind.
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = Instant::now() + timeout;
        for obj in &initial {
            if !send(&tx, enc.event("ADDED", obj), deadline, &shutdown).await {
                return;
            }
        }
        drop(initial);
        drop(list_permit);
        if send_initial == Some(true)
            && !send(&tx, enc.bookmark(start_rev, true), deadline, &shutdown).await
        {
            return;
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    // Everything up to here was sent: the store's progress, not this kind's.
                    let rev = events.progress_revision();
                    if !send(&tx, enc.bookmark(rev, false), deadline, &shutdown).await {
                        return;
                    }
                }
                ev = events.next() => match ev {
                    None => return,
                    Some(Err(e)) => {
                        let err = ApiError::from(e);
                        let st = serde_json::to_value(err.to_status()).expect("status serialises");
                        send(&tx, enc.event("ERROR", &st), deadline, &shutdown).await;
                        return;
                    }
                    Some(Ok(ev)) => {
                        if let Some((t, obj)) = translate(&objects, &list_opts, &ev) {
                            if !send(&tx, enc.event(t, &obj), deadline, &shutdown).await {
                                return;
                            }
                        }
                    }
                },
            }
        }
    });

    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(StreamBody::new(stream).boxed())
        .expect("valid response"))
}
