//! The generic object registry: create, read, update, patch and delete Kubernetes-shaped
//! objects on top of the revisioned store, with the semantics of kube-apiserver's generic
//! registry (defaulting and validation on the way in, server-managed metadata, generation,
//! optimistic concurrency on `resourceVersion`, graceful deletion with finalizers).
//!
//! This layer knows JSON and the API types but not HTTP; the API server and in-process
//! controllers both call it.
//!
//! This file owns the [`Objects`] handle, its construction and bootstrap, the shared helpers
//! of stored JSON (decoding, encoding, metadata) and reads of one object; lists are in
//! `list.rs`, writes in `write.rs` (Service addresses in `service.rs`, the addresses of
//! Endpoints in `endpoints.rs`), deletion and namespace termination in `delete.rs`.

mod delete;
mod endpoints;
mod list;
mod service;
mod write;

use std::sync::Arc;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmctl_api::meta::ObjectMeta;
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_store::{KeyValue, Store};

pub(crate) use endpoints::{refusal as endpoint_refusal, NodeNets};
pub use list::{ListGate, ListOptions, ListPage};
pub use write::{merge_patch, BatchWrite, Subresource};

use crate::allocator::{ServiceAllocator, ServiceRanges};
use crate::error::ApiError;

/// Objects larger than this are rejected, like etcd's default request limit.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
/// How many times a server-side read-modify-write retries on a lost race.
const MAX_RETRIES: usize = 16;
/// Namespaces that always exist and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Clone)]
pub struct Objects {
    store: Store,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Cluster IPs and node ports of Services (see [`allocator`](crate::allocator)).
    services: Arc<ServiceAllocator>,
}

/// The object stored under a key, decoded, with its revisions.
pub struct Current {
    pub object: Value,
    pub mod_revision: u64,
}

pub(crate) fn decode_kv(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("corrupt object at {}: {e}", kv.key)))?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

fn set_rv(v: &mut Value, rev: u64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rev.to_string()));
    }
}

fn meta_of(v: &Value) -> Result<ObjectMeta, ApiError> {
    serde_json::from_value(v.get("metadata").cloned().unwrap_or(json!({})))
        .map_err(|e| ApiError::BadRequest(format!("metadata: {e}")))
}

fn set_meta(v: &mut Value, meta: &ObjectMeta) {
    v["metadata"] = serde_json::to_value(meta).expect("metadata serialises");
}

/// The JSON that is stored: the canonical object without `resourceVersion` (it is the key's
/// mod revision, filled in on every read).
fn encode_for_store(v: &Value) -> Result<Vec<u8>, ApiError> {
    encode_object(&strip_rv(v))
}

/// An object as stored (its `metadata.resourceVersion` must be unset), within
/// [`MAX_OBJECT_BYTES`]: for [`BatchWrite::Update`] of typed objects.
pub fn encode_object<T: serde::Serialize>(obj: &T) -> Result<Vec<u8>, ApiError> {
    let bytes = serde_json::to_vec(obj).map_err(|e| ApiError::Internal(e.to_string()))?;
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(ApiError::TooLarge(format!(
            "object is {} bytes, the limit is {MAX_OBJECT_BYTES}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn strip_rv(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    v
}

impl Objects {
    pub fn new(store: Store, shutdown: CancellationToken) -> Self {
        Objects {
            store,
            tasks: TaskTracker::new(),
            shutdown,
            services: Arc::new(ServiceAllocator::default()),
        }
    }

    /// The ranges Services get their cluster IPs and node ports from (default:
    /// [`ServiceRanges::default`]).
    pub fn with_service_ranges(mut self, ranges: ServiceRanges) -> Self {
        self.services = Arc::new(ServiceAllocator::new(ranges));
        self
    }

    pub fn service_ranges(&self) -> &ServiceRanges {
        &self.services.ranges
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Wait for background work (namespace cleanup) after shutdown was requested.
    pub async fn close(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Create the system namespaces if missing, resume any interrupted namespace deletion, and
    /// write the allocation records of Services stored without them.
    pub async fn bootstrap(&self) -> Result<(), ApiError> {
        let ns = registry::resolve("namespaces").expect("namespaces are served");
        for name in SYSTEM_NAMESPACES {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match self.create(ns, None, obj).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let page = self.list(ns, None, &ListOptions::default()).await?;
        for item in page.items {
            if item["metadata"].get("deletionTimestamp").is_some() {
                let meta = &item["metadata"];
                let name = meta["name"].as_str().unwrap_or_default().to_string();
                let uid = meta["uid"].as_str().unwrap_or_default().to_string();
                if !delete::has_spec_finalizers(&item) {
                    // Terminating since before namespaces carried the `kubernetes`
                    // finalizer: add it first, or the cleanup's first status write (or any
                    // update) would remove the namespace while its content remains.
                    let mut next = item.clone();
                    delete::add_namespace_finalizer(&mut next);
                    let rev = meta["resourceVersion"]
                        .as_str()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0);
                    self.put_if(&ns.key("", &name), &next, rev).await?;
                }
                self.spawn_namespace_cleanup(name, uid);
            }
        }
        self.backfill_service_records().await
    }

    fn check_namespace_param(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        if info.namespaced {
            match ns {
                Some(n) if !n.is_empty() => Ok(Some(n.to_string())),
                _ => Err(ApiError::BadRequest(format!(
                    "{} are namespaced: a namespace is required",
                    info.group_resource()
                ))),
            }
        } else {
            Ok(None)
        }
    }

    fn key(info: &ResourceInfo, ns: Option<&str>, name: &str) -> String {
        info.key(ns.unwrap_or(""), name)
    }

    /// Read one object (linearizable).
    pub async fn get(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        Ok(self.get_current(info, ns, name).await?.object)
    }

    pub async fn get_current(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Current, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        let kv = self
            .store
            .get(&Self::key(info, ns.as_deref(), name))
            .await?
            .ok_or_else(|| ApiError::not_found(info, name))?;
        Ok(Current {
            object: decode_kv(&kv)?,
            mod_revision: kv.mod_revision,
        })
    }
}
