//! Lists of the registry: [`Objects::list`] with label and field selectors, exact-name reads
//! instead of scans, and pagination by `limit` with opaque continue tokens. Every chunk and page
//! of one list is read as of one store revision (the list's `resourceVersion`), and decoded on
//! a blocking thread, never on an async worker.
//!
//! A list (or watch) from a `resourceVersion` the store has not reached waits for it up to
//! [`FRESH_WAIT`], then fails as kube-apiserver does: 504 `Timeout`, "Too large resource
//! version" ([`Objects::wait_for_revision`]). The API server admits at most `--max-lists` lists
//! at once through a [`ListGate`]: a list holds its items and its encoded answer in memory
//! until the answer is written, so the number of such copies is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::{FieldSelector, Selector};
use wasmctl_store::{KeyValue, StoreError};

use super::{decode_kv, Objects};
use crate::error::ApiError;

/// A page of a list.
pub struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
}

/// Options of a list.
#[derive(Default)]
pub struct ListOptions {
    pub labels: Selector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
    /// The list's `resourceVersion` (kube's default `NotOlderThan` match): the answer is at
    /// least this recent; 0 (unset or "0") takes the latest state without waiting.
    pub min_revision: u64,
}

/// kube-apiserver's `blockTimeout`: how long a list or watch from a `resourceVersion` ahead of
/// the store waits for the store to reach it before 504 "Too large resource version".
pub const FRESH_WAIT: Duration = Duration::from_secs(3);

/// How long a list waits for one of the `--max-lists` slots before it is refused with 429.
pub const LIST_QUEUE_WAIT: Duration = Duration::from_secs(2);

/// kube-apiserver's answer when it has no room for a request (`filters/maxinflight.go`).
pub const TOO_MANY_REQUESTS: &str = "Too many requests, please try again later.";

/// The bound on lists served at once (`--max-lists`).
#[derive(Clone)]
pub struct ListGate {
    slots: Arc<Semaphore>,
}

impl ListGate {
    pub fn new(max_lists: usize) -> Self {
        ListGate {
            slots: Arc::new(Semaphore::new(max_lists.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }

    /// A slot for one list, held until its answer has been written (the permit is dropped with
    /// the response body). Waits up to [`LIST_QUEUE_WAIT`] for one, then 429 `TooManyRequests`
    /// (with `Retry-After`), as kube-apiserver's max-in-flight filter answers.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        match tokio::time::timeout(LIST_QUEUE_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::TooManyRequests(TOO_MANY_REQUESTS.into())),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    /// The last key returned.
    start: String,
    /// The revision of the first page: every page is read as of it.
    rv: u64,
}

/// kube-apiserver's message when a continue token's revision has been compacted away
/// (`staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go`, `continueExpired`).
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a \
    consistent list result. You can start a new list without the continue parameter.";
/// kube-apiserver's message when a list's revision is compacted while it is read (`expired`).
const LIST_EXPIRED: &str = "The resourceVersion for the provided list is too old.";

impl Objects {
    /// Waits until the store has applied `revision` (at most [`FRESH_WAIT`]); otherwise
    /// kube-apiserver's 504 `Timeout` "Too large resource version: R, current: C" (cause
    /// `ResourceVersionTooLarge`, retry after 1 s). A request from a revision the store has not
    /// reached would otherwise be answered as of an older one (a list), or skip every event up
    /// to it (a watch).
    pub async fn wait_for_revision(&self, revision: u64) -> Result<(), ApiError> {
        self.store.barrier().await?;
        let current = self.store.revision();
        if current >= revision {
            return Ok(());
        }
        // Any write moves the revision: follow every key until one reaches it.
        let mut events = self.store.watch("", current)?;
        let _ = tokio::time::timeout(FRESH_WAIT, async {
            while let Some(Ok(ev)) = events.next().await {
                if ev.revision >= revision {
                    return;
                }
            }
        })
        .await;
        let current = self.store.revision();
        if current >= revision {
            return Ok(());
        }
        Err(ApiError::TooLargeResourceVersion {
            requested: revision,
            current,
        })
    }

    /// List objects (linearizable), filtered by selectors, paginated by `limit`/`continue`.
    ///
    /// One list is one snapshot: every chunk read from the store, and every later page of a
    /// paginated list, is read as of the revision of the first page (the continue token carries
    /// it), and `resource_version` is that revision. A continue token whose revision is no
    /// longer in the store's history is `410 Gone` (`Expired`), as in Kubernetes.
    pub async fn list(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListPage, ApiError> {
        let prefix = info.key_prefix(ns);
        let token = match &opts.continue_token {
            Some(tok) => {
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(tok)
                    .map_err(|_| ApiError::BadRequest("invalid continue token".into()))?;
                let t: ContinueToken = serde_json::from_slice(&raw)
                    .map_err(|_| ApiError::BadRequest("invalid continue token".into()))?;
                if !t.start.starts_with(&prefix) {
                    return Err(ApiError::BadRequest(
                        "continue token does not belong to this list".into(),
                    ));
                }
                Some(t)
            }
            None => None,
        };
        if opts.min_revision > 0 {
            if token.is_some() {
                // kube-apiserver's etcd3 store refuses the same.
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            self.wait_for_revision(opts.min_revision).await?;
        }
        // Exact-name field selectors read one key instead of scanning.
        if let (Some(name), false) = (opts.fields.exact_name(), info.namespaced && ns.is_none()) {
            // The value and the revision come from one snapshot: a watch from this revision
            // sees the next write to the object.
            let (kv, resource_version) = self
                .store
                .get_with_revision(&Self::key(info, ns, name))
                .await?;
            let mut items = Vec::new();
            if let Some(kv) = kv {
                let v = decode_kv(&kv)?;
                if self.matches(&v, opts) {
                    items.push(v);
                }
            }
            return Ok(ListPage {
                items,
                resource_version,
                continue_token: None,
            });
        }
        let continuing = token.is_some();
        let (mut start_after, mut at) = match token {
            Some(t) => (Some(t.start), Some(t.rv)),
            None => (None, None),
        };
        let read_error = |e: StoreError| match e {
            StoreError::Compacted { .. } if continuing => ApiError::Gone(CONTINUE_EXPIRED.into()),
            StoreError::Compacted { .. } => ApiError::Gone(LIST_EXPIRED.into()),
            StoreError::FutureRevision { .. } if continuing => ApiError::BadRequest(
                "invalid continue token: its resource version is newer than the store's".into(),
            ),
            other => other.into(),
        };
        // The store's range in chunks, all as of revision `at` (the continue token's, else the
        // revision of the first chunk).
        let mut items = Vec::new();
        let chunk = if opts.limit > 0 {
            opts.limit.clamp(64, 4096)
        } else {
            4096
        };
        let filter = Arc::new((opts.labels.clone(), opts.fields.clone()));
        loop {
            let page = match at {
                Some(rev) => {
                    self.store
                        .range_at(&prefix, start_after.as_deref(), chunk, rev)
                        .await
                }
                None => {
                    self.store
                        .range(&prefix, start_after.as_deref(), chunk)
                        .await
                }
            }
            .map_err(read_error)?;
            let rev = *at.get_or_insert(page.revision);
            let n = page.items.len();
            // Decoding is CPU work proportional to the chunk: off the async workers.
            let want = (opts.limit > 0).then(|| opts.limit - items.len());
            let filter = filter.clone();
            let (decoded, last) =
                tokio::task::spawn_blocking(move || decode_chunk(page.items, &filter, want))
                    .await
                    .map_err(|e| ApiError::Internal(format!("decoding a list: {e}")))??;
            if last.is_some() {
                start_after = last;
            }
            items.extend(decoded);
            let filled = opts.limit > 0 && items.len() == opts.limit;
            if filled || !page.more || n == 0 {
                let more = if filled {
                    // Is there anything after the last returned key (at the same revision)?
                    let last = start_after.clone().unwrap_or_default();
                    !self
                        .store
                        .range_at(&prefix, Some(&last), 1, rev)
                        .await
                        .map_err(read_error)?
                        .items
                        .is_empty()
                } else {
                    false
                };
                let continue_token = more.then(|| {
                    let t = ContinueToken {
                        start: start_after.clone().unwrap_or_default(),
                        rv: rev,
                    };
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(serde_json::to_vec(&t).expect("token serialises"))
                });
                return Ok(ListPage {
                    items,
                    resource_version: rev,
                    continue_token,
                });
            }
        }
    }

    pub fn matches(&self, v: &Value, opts: &ListOptions) -> bool {
        matches(v, &opts.labels, &opts.fields)
    }
}

fn matches(v: &Value, labels: &Selector, fields: &FieldSelector) -> bool {
    let set: BTreeMap<String, String> = v["metadata"]
        .get("labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    labels.matches(&set) && fields.matches(v)
}

/// The objects of one chunk that match the selectors, at most `want` of them, and the key of
/// the last one looked at (where the next chunk starts).
fn decode_chunk(
    kvs: Vec<KeyValue>,
    (labels, fields): &(Selector, FieldSelector),
    want: Option<usize>,
) -> Result<(Vec<Value>, Option<String>), ApiError> {
    let mut out = Vec::new();
    let mut last = None;
    for kv in kvs {
        if want.is_some_and(|w| out.len() >= w) {
            break;
        }
        let v = decode_kv(&kv)?;
        last = Some(kv.key);
        if matches(&v, labels, fields) {
            out.push(v);
        }
    }
    Ok((out, last))
}
