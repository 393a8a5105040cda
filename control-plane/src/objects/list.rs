//! Lists of the registry: [`Objects::list`] with label and field selectors, exact-name reads
//! instead of scans, and pagination by `limit` with opaque continue tokens. Every chunk and page
//! of one list is read as of one store revision (the list's `resourceVersion`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::Value;
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::{FieldSelector, Selector};
use wasmctl_store::StoreError;

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
            for kv in &page.items {
                start_after = Some(kv.key.clone());
                let v = decode_kv(kv)?;
                if self.matches(&v, opts) {
                    items.push(v);
                    if opts.limit > 0 && items.len() == opts.limit {
                        break;
                    }
                }
            }
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
        let labels: BTreeMap<String, String> = v["metadata"]
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        opts.labels.matches(&labels) && opts.fields.matches(v)
    }
}
