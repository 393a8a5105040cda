//! The generic object registry: create, read, update, patch and delete Kubernetes-shaped
//! objects on top of the revisioned store, with the semantics of kube-apiserver's generic
//! registry (defaulting and validation on the way in, server-managed metadata, generation,
//! optimistic concurrency on `resourceVersion`, graceful deletion with finalizers).
//!
//! This layer knows JSON and the API types but not HTTP; the API server and in-process
//! controllers both call it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmctl_api::core::Service;
use wasmctl_api::meta::{DeleteOptions, ObjectMeta, Time};
use wasmctl_api::registry::{self, ResourceInfo, RESOURCES};
use wasmctl_api::{normalize, FieldSelector, Selector};
use wasmctl_store::{KeyValue, Op, OpResult, Precondition, Store};

use crate::allocator::{self, AllocError, Allocated, ServiceAllocator, ServiceRanges};
use crate::error::ApiError;

/// Objects larger than this are rejected, like etcd's default request limit.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
/// How many times a server-side read-modify-write retries on a lost race.
const MAX_RETRIES: usize = 16;
/// Namespaces that always exist and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];
/// System namespaces that may not be deleted (as in Kubernetes, kube-node-lease may).
const UNDELETABLE_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

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

#[derive(Clone)]
pub struct Objects {
    store: Store,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Cluster IPs and node ports of Services (see [`allocator`]).
    services: Arc<ServiceAllocator>,
}

/// One write of [`Objects::write_batch`].
pub enum BatchWrite {
    /// Replace the object `name` that was read at `mod_revision` by `object` (encoded with
    /// [`encode_object`]) if it is still at that revision: compare-and-set. `object` is
    /// written as is: the caller derived it from the object it read, keeping the server-managed
    /// metadata and bumping `metadata.generation` if it changed the spec of a kind that has one,
    /// as [`Objects::guaranteed_update`] does. Nothing is defaulted or validated: this is for
    /// in-process writers of typed objects that set fields needing neither (a binding's
    /// `spec.nodeName`, a status condition), where a JSON round trip per object would
    /// dominate the cost.
    Update {
        info: &'static ResourceInfo,
        namespace: Option<String>,
        name: String,
        mod_revision: u64,
        object: Vec<u8>,
    },
    /// Create `object` (its namespace and name in `metadata`) if nothing has its name: server-
    /// managed metadata, defaulting and validation as [`Objects::create`], except that the
    /// namespace is not checked (the caller writes into a namespace it has just read from).
    Create {
        info: &'static ResourceInfo,
        object: Value,
    },
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

/// Server-managed metadata of an object being created.
fn set_new_object_meta(info: &ResourceInfo, meta: &mut ObjectMeta) {
    meta.uid = Some(uuid::Uuid::new_v4().to_string());
    meta.creation_timestamp = Some(Time::now());
    meta.resource_version = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generation = info.generation.then_some(1);
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    /// The last key returned.
    start: String,
    rv: u64,
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

    /// Create the system namespaces if missing and resume any interrupted namespace deletion.
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
                let name = item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                self.spawn_namespace_cleanup(name);
            }
        }
        Ok(())
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

    /// List objects (linearizable), filtered by selectors, paginated by `limit`/`continue`.
    pub async fn list(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListPage, ApiError> {
        let prefix = info.key_prefix(ns);
        let mut start_after = match &opts.continue_token {
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
                Some(t.start)
            }
            None => None,
        };
        // Exact-name field selectors read one key instead of scanning.
        if let (Some(name), false) = (opts.fields.exact_name(), info.namespaced && ns.is_none()) {
            // `get` is linearizable; the revision read after it covers the item.
            let kv = self.store.get(&Self::key(info, ns, name)).await?;
            let resource_version = self.store.revision();
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
        let mut items = Vec::new();
        let mut revision = None;
        let chunk = if opts.limit > 0 {
            opts.limit.clamp(64, 4096)
        } else {
            4096
        };
        loop {
            let page = self
                .store
                .range(&prefix, start_after.as_deref(), chunk)
                .await?;
            revision.get_or_insert(page.revision);
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
                    // Is there anything after the last returned key?
                    let last = start_after.clone().unwrap_or_default();
                    !self
                        .store
                        .range(&prefix, Some(&last), 1)
                        .await?
                        .items
                        .is_empty()
                } else {
                    false
                };
                let rev = revision.unwrap_or_else(|| self.store.revision());
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

    /// Check `apiVersion`/`kind`/namespace of a request body against the URL and fill them in.
    fn prepare_body(
        info: &ResourceInfo,
        ns: Option<&str>,
        mut body: Value,
    ) -> Result<Value, ApiError> {
        let Some(obj) = body.as_object_mut() else {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        };
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != info.kind => {
                return Err(ApiError::BadRequest(format!(
                    "the kind of the object ({k}) does not match the resource {} ({})",
                    info.group_resource(),
                    info.kind
                )))
            }
            _ => {}
        }
        match obj.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v != info.api_version() => {
                return Err(ApiError::BadRequest(format!(
                    "the apiVersion of the object ({v}) does not match the resource {} ({})",
                    info.group_resource(),
                    info.api_version()
                )))
            }
            _ => {}
        }
        obj.insert("kind".into(), json!(info.kind));
        obj.insert("apiVersion".into(), json!(info.api_version()));
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::BadRequest("metadata must be an object".into()))?;
        if info.namespaced {
            let want = ns.unwrap_or("");
            match meta.get("namespace").and_then(Value::as_str) {
                Some(got) if !got.is_empty() && got != want => {
                    return Err(ApiError::BadRequest(format!(
                        "the namespace of the provided object ({got}) does not match the namespace sent on the request ({want})"
                    )))
                }
                _ => {}
            }
            meta.insert("namespace".into(), json!(want));
        } else {
            meta.remove("namespace");
        }
        // `creationTimestamp: null` and friends are common in client output.
        meta.retain(|_, v| !v.is_null());
        Ok(body)
    }

    fn normalize(info: &ResourceInfo, name: &str, v: Value) -> Result<Value, ApiError> {
        normalize(info, v).map_err(|inv| ApiError::invalid(info, name, inv))
    }

    async fn ensure_namespace_usable(&self, ns: &str) -> Result<(), ApiError> {
        let nsinfo = registry::resolve("namespaces").expect("served");
        match self.store.get(&nsinfo.key("", ns)).await? {
            None => Err(ApiError::not_found(nsinfo, ns)),
            Some(kv) => {
                let v = decode_kv(&kv)?;
                if v["metadata"].get("deletionTimestamp").is_some() {
                    Err(ApiError::Forbidden(format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    )))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Create an object. `ns` is the namespace from the URL.
    pub async fn create(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        let mut body = Self::prepare_body(info, ns.as_deref(), body)?;
        let mut meta = meta_of(&body)?;
        if meta.name.is_empty() {
            if let Some(g) = meta.generate_name.clone().filter(|g| !g.is_empty()) {
                meta.name = format!("{g}{}", random_suffix());
            }
        }
        set_new_object_meta(info, &mut meta);
        set_meta(&mut body, &meta);
        // Status is owned by controllers: a create starts from the default status, except for
        // Nodes, which agents register together with their status.
        if info.status_subresource && info.kind != "Node" {
            if let Some(o) = body.as_object_mut() {
                o.remove("status");
            }
        }
        let mut obj = Self::normalize(info, &meta.name, body)?;
        if let Some(ns) = &ns {
            self.ensure_namespace_usable(ns).await?;
        }
        // Held until the write is committed, so no other Service takes the same addresses.
        let _allocating = match info.kind {
            "Service" => Some(self.services.lock.lock().await),
            _ => None,
        };
        if info.kind == "Service" {
            obj = self
                .allocate_service(info, ns.as_deref(), &meta.name, None, obj)
                .await?;
        }
        let key = Self::key(info, ns.as_deref(), &meta.name);
        let bytes = encode_for_store(&obj)?;
        let res = self
            .store
            .write(vec![Op::Put {
                key,
                value: bytes,
                precondition: Precondition::MustNotExist,
            }])
            .await?;
        match res.into_iter().next() {
            Some(OpResult::Ok { revision, .. }) => {
                let mut obj = obj;
                set_rv(&mut obj, revision);
                Ok(obj)
            }
            Some(OpResult::AlreadyExists) => Err(ApiError::already_exists(info, &meta.name)),
            other => Err(ApiError::Internal(format!(
                "unexpected store result {other:?}"
            ))),
        }
    }

    /// Replace an object (PUT), honouring `metadata.resourceVersion` when given.
    pub async fn update(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        body: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        let body = Self::prepare_body(info, ns.as_deref(), body)?;
        let body_meta = meta_of(&body)?;
        if !body_meta.name.is_empty() && body_meta.name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                body_meta.name
            )));
        }
        let expected = match body_meta.resource_version.as_deref() {
            None | Some("") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("metadata.resourceVersion: invalid value {rv:?}"))
            })?),
        };
        self.guaranteed_update(info, ns.as_deref(), name, expected, |current| {
            Ok(merge_for_update(info, current, body.clone(), sub))
        })
        .await
    }

    /// Apply a JSON merge patch (RFC 7386); strategic merge patches are treated the same way.
    pub async fn patch(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        patch: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        if !patch.is_object() {
            return Err(ApiError::BadRequest(
                "a merge patch must be a JSON object".into(),
            ));
        }
        let expected = match patch["metadata"]["resourceVersion"].as_str() {
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("metadata.resourceVersion: invalid value {rv:?}"))
            })?),
            None => None,
        };
        self.guaranteed_update(info, ns.as_deref(), name, expected, |current| {
            let mut patched = current.clone();
            merge_patch(&mut patched, &patch);
            let patched = Self::prepare_body(info, ns.as_deref(), patched)?;
            Ok(merge_for_update(info, current, patched, sub))
        })
        .await
    }

    /// Apply a JSON patch (RFC 6902).
    pub async fn json_patch(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        patch: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        let ops = patch.as_array().cloned().ok_or_else(|| {
            ApiError::BadRequest("a JSON patch must be an array of operations".into())
        })?;
        self.guaranteed_update(info, ns.as_deref(), name, None, |current| {
            let mut patched = current.clone();
            crate::patch::json_patch(&mut patched, &ops).map_err(ApiError::BadRequest)?;
            let patched = Self::prepare_body(info, ns.as_deref(), patched)?;
            Ok(merge_for_update(info, current, patched, sub))
        })
        .await
    }

    /// Read-modify-write with compare-and-swap on the mod revision, retried on lost races
    /// unless the client pinned a `resourceVersion`.
    pub async fn guaranteed_update<F>(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        expected: Option<u64>,
        mut mutate: F,
    ) -> Result<Value, ApiError>
    where
        F: FnMut(&Value) -> Result<Value, ApiError>,
    {
        let key = Self::key(info, ns, name);
        let _allocating = match info.kind {
            "Service" => Some(self.services.lock.lock().await),
            _ => None,
        };
        for _ in 0..MAX_RETRIES {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::not_found(info, name))?;
            if let Some(want) = expected {
                if want != kv.mod_revision {
                    return Err(ApiError::modified(info, name));
                }
            }
            let current = decode_kv(&kv)?;
            let mut next = mutate(&current)?;
            // Server-managed metadata always comes from the stored object.
            let cur_meta = meta_of(&current)?;
            let mut meta = meta_of(&next)?;
            meta.name = cur_meta.name.clone();
            meta.namespace = cur_meta.namespace.clone();
            meta.uid = cur_meta.uid.clone();
            meta.creation_timestamp = cur_meta.creation_timestamp;
            meta.generation = cur_meta.generation;
            meta.resource_version = None;
            // deletionTimestamp can be set only by delete, never cleared or moved.
            meta.deletion_timestamp = cur_meta.deletion_timestamp;
            meta.deletion_grace_period_seconds = cur_meta.deletion_grace_period_seconds;
            if cur_meta.deletion_timestamp.is_some() {
                // Once deleting, finalizers may only be removed.
                meta.finalizers.retain(|f| cur_meta.finalizers.contains(f));
            }
            set_meta(&mut next, &meta);
            if info.kind == "Service" {
                next = carry_over_service(&current, next);
            }
            let mut next = Self::normalize(info, name, next)?;
            if info.kind == "Service" {
                next = self
                    .allocate_service(info, ns, name, Some(&current), next)
                    .await?;
            }
            if info.generation && next.get("spec") != current.get("spec") {
                let g = cur_meta.generation.unwrap_or(0) + 1;
                next["metadata"]["generation"] = json!(g);
            }
            if strip_rv(&next) == strip_rv(&current) {
                // No change: nothing is written and the resourceVersion stays.
                return Ok(current);
            }
            // Kubernetes: an object goes once it is deleting, has no finalizers left and no
            // grace period running (a pod's agent ends that with a delete of grace 0).
            let finished_deleting = meta.deletion_timestamp.is_some()
                && meta.finalizers.is_empty()
                && meta.deletion_grace_period_seconds.unwrap_or(0) == 0;
            let op = if finished_deleting {
                Op::Delete {
                    key: key.clone(),
                    precondition: Precondition::ModRevision(kv.mod_revision),
                }
            } else {
                Op::Put {
                    key: key.clone(),
                    value: encode_for_store(&next)?,
                    precondition: Precondition::ModRevision(kv.mod_revision),
                }
            };
            match self.store.write(vec![op]).await?.into_iter().next() {
                Some(OpResult::Ok { revision, .. }) => {
                    set_rv(&mut next, revision);
                    return Ok(next);
                }
                Some(OpResult::Conflict { .. }) if expected.is_none() => continue,
                Some(OpResult::Conflict { .. }) => return Err(ApiError::modified(info, name)),
                Some(OpResult::NotFound) => return Err(ApiError::not_found(info, name)),
                other => {
                    return Err(ApiError::Internal(format!(
                        "unexpected store result {other:?}"
                    )))
                }
            }
        }
        Err(ApiError::conflict(
            info,
            name,
            "too many concurrent writers; please try again",
        ))
    }

    /// Carries out `writes` in ONE Raft entry (one log append and fsync): each write is
    /// independent, with its own precondition. The outer error is the store's (nothing was
    /// written); otherwise one result per write, in order: the revision it was written at, or
    /// why not (`Conflict` when an updated object changed, `NotFound`, `AlreadyExists`, or an
    /// encoding/validation error for a write that was not sent).
    pub async fn write_batch(
        &self,
        writes: Vec<BatchWrite>,
    ) -> Result<Vec<Result<u64, ApiError>>, ApiError> {
        let mut results: Vec<Result<u64, ApiError>> = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        // (index in `results`, kind, name) of each op sent.
        let mut sent = Vec::with_capacity(writes.len());
        for w in writes {
            let (info, name, op) = match w {
                BatchWrite::Update {
                    info,
                    namespace,
                    name,
                    mod_revision,
                    object,
                } => {
                    let op = Op::Put {
                        key: Self::key(info, namespace.as_deref(), &name),
                        value: object,
                        precondition: Precondition::ModRevision(mod_revision),
                    };
                    (info, name, Ok(op))
                }
                BatchWrite::Create { info, object } => {
                    let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
                    (info, name.clone(), self.batch_create(info, &name, object))
                }
            };
            match op {
                Ok(op) => {
                    sent.push((results.len(), info, name));
                    ops.push(op);
                    results.push(Ok(0));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let written = self.store.write(ops).await?;
        for ((i, info, name), r) in sent.into_iter().zip(written) {
            results[i] = match r {
                OpResult::Ok { revision, .. } => Ok(revision),
                OpResult::Conflict { .. } => Err(ApiError::modified(info, &name)),
                OpResult::NotFound => Err(ApiError::not_found(info, &name)),
                OpResult::AlreadyExists => Err(ApiError::already_exists(info, &name)),
            };
        }
        Ok(results)
    }

    fn batch_create(&self, info: &ResourceInfo, name: &str, object: Value) -> Result<Op, ApiError> {
        if info.kind == "Service" {
            return Err(ApiError::Internal(
                "Services allocate addresses: create them with Objects::create".into(),
            ));
        }
        let ns = self.check_namespace_param(info, object["metadata"]["namespace"].as_str())?;
        let mut body = Self::prepare_body(info, ns.as_deref(), object)?;
        let mut meta = meta_of(&body)?;
        set_new_object_meta(info, &mut meta);
        set_meta(&mut body, &meta);
        let obj = Self::normalize(info, name, body)?;
        Ok(Op::Put {
            key: Self::key(info, ns.as_deref(), name),
            value: encode_for_store(&obj)?,
            precondition: Precondition::MustNotExist,
        })
    }

    /// Gives the Service `obj` (defaulted and validated; `old` is the stored version for an
    /// update) its cluster IP and node ports, checked against every other stored Service.
    /// The caller holds `self.services.lock` until its write is committed.
    async fn allocate_service(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        old: Option<&Value>,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let corrupt = |e: serde_json::Error| ApiError::Internal(format!("decoding a Service: {e}"));
        let all = self.list(info, None, &ListOptions::default()).await?;
        let others: Vec<Service> = all
            .items
            .into_iter()
            .filter(|v| v["metadata"]["namespace"].as_str() != ns || v["metadata"]["name"] != name)
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let taken = Allocated::from_services(&others);
        let mut svc: Service = serde_json::from_value(obj).map_err(corrupt)?;
        let old: Option<Service> = old
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(corrupt)?;
        allocator::allocate(
            &mut svc,
            old.as_ref(),
            &taken,
            &self.services.ranges,
            &mut rand::thread_rng(),
        )
        .map_err(|e| match e {
            AllocError::Invalid(inv) => ApiError::invalid(info, name, inv),
            AllocError::Full(m) => ApiError::Internal(m),
        })?;
        serde_json::to_value(&svc).map_err(corrupt)
    }

    /// Delete an object: graceful (deletionTimestamp) when finalizers or a running pod need
    /// time, immediate otherwise. Returns the object as it was last seen.
    pub async fn delete(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace_param(info, ns)?;
        if let Some(p) = &opts.propagation_policy {
            if !["Background", "Foreground", "Orphan"].contains(&p.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "propagationPolicy: Unsupported value: {p:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
                )));
            }
        }
        if info.kind == "Namespace" && UNDELETABLE_NAMESPACES.contains(&name) {
            return Err(ApiError::Forbidden(format!(
                "namespaces {name:?} is forbidden: this namespace may not be deleted"
            )));
        }
        let key = Self::key(info, ns.as_deref(), name);
        for _ in 0..MAX_RETRIES {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::not_found(info, name))?;
            let current = decode_kv(&kv)?;
            let mut meta = meta_of(&current)?;
            if let Some(pre) = &opts.preconditions {
                if let Some(uid) = &pre.uid {
                    if meta.uid.as_ref() != Some(uid) {
                        return Err(ApiError::conflict(
                            info,
                            name,
                            format!(
                                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                                meta.uid.clone().unwrap_or_default()
                            ),
                        ));
                    }
                }
                if let Some(rv) = &pre.resource_version {
                    if rv != &kv.mod_revision.to_string() {
                        return Err(ApiError::conflict(
                            info,
                            name,
                            format!(
                                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                                kv.mod_revision
                            ),
                        ));
                    }
                }
            }
            let grace = self.grace_period(info, &current, opts);
            if meta.deletion_timestamp.is_none() {
                // Foreground and Orphan propagation keep the object (with a finalizer the
                // garbage collector removes) until its dependents are gone or released.
                if let Some(f) = propagation_finalizer(opts) {
                    if !meta.finalizers.iter().any(|x| x == f) {
                        meta.finalizers.push(f.to_string());
                    }
                }
            }
            let graceful = !meta.finalizers.is_empty() || grace > 0 || info.kind == "Namespace";
            if graceful {
                if meta.deletion_timestamp.is_some() {
                    // Already terminating; a shorter grace period (e.g. 0 from the agent)
                    // finishes a pod without finalizers, or ends its grace period so that
                    // it goes with its last finalizer.
                    if grace == 0 && info.kind != "Namespace" {
                        if meta.finalizers.is_empty() {
                            return self
                                .delete_now(info, name, &key, kv.mod_revision, current)
                                .await;
                        }
                        if meta.deletion_grace_period_seconds.unwrap_or(0) != 0 {
                            meta.deletion_grace_period_seconds = Some(0);
                            let mut next = current.clone();
                            set_meta(&mut next, &meta);
                            match self.put_if(&key, &next, kv.mod_revision).await? {
                                Some(rev) => {
                                    set_rv(&mut next, rev);
                                    return Ok(next);
                                }
                                None => continue,
                            }
                        }
                    }
                    return Ok(current);
                }
                meta.deletion_timestamp =
                    Some(Time(Utc::now() + chrono::Duration::seconds(grace.max(0))));
                meta.deletion_grace_period_seconds = Some(grace);
                let mut next = current.clone();
                set_meta(&mut next, &meta);
                if info.kind == "Namespace" {
                    next["status"]["phase"] = json!("Terminating");
                }
                let res = self
                    .store
                    .write(vec![Op::Put {
                        key: key.clone(),
                        value: encode_for_store(&next)?,
                        precondition: Precondition::ModRevision(kv.mod_revision),
                    }])
                    .await?;
                match res.into_iter().next() {
                    Some(OpResult::Ok { revision, .. }) => {
                        set_rv(&mut next, revision);
                        if info.kind == "Namespace" {
                            self.spawn_namespace_cleanup(name.to_string());
                        }
                        return Ok(next);
                    }
                    Some(OpResult::Conflict { .. }) => continue,
                    Some(OpResult::NotFound) => return Err(ApiError::not_found(info, name)),
                    other => {
                        return Err(ApiError::Internal(format!(
                            "unexpected store result {other:?}"
                        )))
                    }
                }
            }
            match self
                .delete_now(info, name, &key, kv.mod_revision, current)
                .await
            {
                Err(ApiError::Conflict { .. }) => continue,
                other => return other,
            }
        }
        Err(ApiError::conflict(
            info,
            name,
            "too many concurrent writers; please try again",
        ))
    }

    /// Compare-and-swap put of `obj` at `key`; `None` if the key changed meanwhile.
    async fn put_if(
        &self,
        key: &str,
        obj: &Value,
        mod_revision: u64,
    ) -> Result<Option<u64>, ApiError> {
        let res = self
            .store
            .write(vec![Op::Put {
                key: key.to_string(),
                value: encode_for_store(obj)?,
                precondition: Precondition::ModRevision(mod_revision),
            }])
            .await?;
        match res.into_iter().next() {
            Some(OpResult::Ok { revision, .. }) => Ok(Some(revision)),
            Some(OpResult::Conflict { .. }) => Ok(None),
            Some(OpResult::NotFound) => Err(ApiError::Internal(format!("{key} vanished"))),
            other => Err(ApiError::Internal(format!(
                "unexpected store result {other:?}"
            ))),
        }
    }

    /// The grace period a delete uses: pods bound to a node get time to stop.
    fn grace_period(&self, info: &ResourceInfo, obj: &Value, opts: &DeleteOptions) -> i64 {
        if info.kind != "Pod" {
            return 0;
        }
        let bound = obj["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            obj["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        if !bound || finished {
            return 0;
        }
        opts.grace_period_seconds
            .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0)
    }

    async fn delete_now(
        &self,
        info: &ResourceInfo,
        name: &str,
        key: &str,
        mod_revision: u64,
        current: Value,
    ) -> Result<Value, ApiError> {
        let res = self
            .store
            .write(vec![Op::Delete {
                key: key.to_string(),
                precondition: Precondition::ModRevision(mod_revision),
            }])
            .await?;
        match res.into_iter().next() {
            Some(OpResult::Ok { .. }) => Ok(current),
            Some(OpResult::Conflict { .. }) => Err(ApiError::modified(info, name)),
            Some(OpResult::NotFound) => Err(ApiError::not_found(info, name)),
            other => Err(ApiError::Internal(format!(
                "unexpected store result {other:?}"
            ))),
        }
    }

    /// The namespace lifecycle controller: delete everything in a terminating namespace, then
    /// the namespace itself. Restart-safe: `bootstrap` resumes it.
    fn spawn_namespace_cleanup(&self, ns: String) {
        let this = self.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let done = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = this.cleanup_namespace_once(&ns) => r,
                };
                match done {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(namespace = %ns, error = %e, "namespace cleanup"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// One pass; `Ok(true)` when the namespace is gone.
    async fn cleanup_namespace_once(&self, ns: &str) -> Result<bool, ApiError> {
        let mut remaining = 0usize;
        let opts = DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for info in RESOURCES.iter().filter(|r| r.namespaced) {
            let page = self.list(info, Some(ns), &ListOptions::default()).await?;
            for item in page.items {
                let name = item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                match self.delete(info, Some(ns), &name, &opts).await {
                    Ok(_) | Err(ApiError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                remaining += 1;
            }
        }
        if remaining > 0 {
            // Some objects may be waiting on finalizers; look again.
            let mut left = 0;
            for info in RESOURCES.iter().filter(|r| r.namespaced) {
                left += self
                    .list(info, Some(ns), &ListOptions::default())
                    .await?
                    .items
                    .len();
            }
            if left > 0 {
                return Ok(false);
            }
        }
        let nsinfo = registry::resolve("namespaces").expect("served");
        let key = nsinfo.key("", ns);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(true);
        };
        self.store
            .write(vec![Op::Delete {
                key,
                precondition: Precondition::ModRevision(kv.mod_revision),
            }])
            .await?;
        Ok(true)
    }
}

/// The finalizer a delete's propagation policy puts on the object (`orphanDependents` is the
/// deprecated spelling of Orphan); Background (the default) needs none.
fn propagation_finalizer(opts: &DeleteOptions) -> Option<&'static str> {
    let policy = opts
        .propagation_policy
        .as_deref()
        .or(match opts.orphan_dependents {
            Some(true) => Some("Orphan"),
            _ => None,
        });
    match policy {
        Some("Foreground") => Some("foregroundDeletion"),
        Some("Orphan") => Some("orphan"),
        _ => None,
    }
}

/// An update of a Service keeps the allocated values it omits ([`allocator::carry_over`]);
/// one that does not decode is left for validation to report.
fn carry_over_service(current: &Value, next: Value) -> Value {
    let old = serde_json::from_value::<Service>(current.clone());
    let new = serde_json::from_value::<Service>(next.clone());
    match (old, new) {
        (Ok(old), Ok(mut new)) => {
            allocator::carry_over(&old, &mut new);
            serde_json::to_value(&new).unwrap_or(next)
        }
        _ => next,
    }
}

/// Combine the stored object with an update of the main resource or of `status`.
fn merge_for_update(info: &ResourceInfo, current: &Value, next: Value, sub: Subresource) -> Value {
    match sub {
        Subresource::Main => {
            let mut next = next;
            if info.status_subresource {
                match current.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(o) = next.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            next
        }
        Subresource::Status => {
            let mut out = current.clone();
            match next.get("status") {
                Some(s) => out["status"] = s.clone(),
                None => {
                    if let Some(o) = out.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            out
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge_patch(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }
}
