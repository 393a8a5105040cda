//! Writes of the registry: create (with `generateName`), update (PUT), merge and JSON patches,
//! the guaranteed (compare-and-swap, retried) read-modify-write they share, batched writes in
//! one Raft entry, and the pure pieces they use: request-body checks, server-managed metadata,
//! combining a main-resource or `status` update with the stored object, RFC 7386 merge patch.

use std::collections::BTreeSet;

use rand::Rng;
use serde_json::{json, Value};
use wasmctl_api::meta::{ObjectMeta, Time};
use wasmctl_api::normalize;
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_store::{Op, OpResult, Precondition};

use super::delete::{add_namespace_finalizer, has_spec_finalizers};
use super::service::carry_over_service;
use super::{
    decode_kv, encode_for_store, meta_of, set_meta, set_rv, strip_rv, Objects, MAX_RETRIES,
};
use crate::error::ApiError;

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

/// One write of [`Objects::write_batch`].
pub enum BatchWrite {
    /// Replace the object `name` that was read at `mod_revision` by `object` (encoded with
    /// [`encode_object`](super::encode_object)) if it is still at that revision:
    /// compare-and-set. `object` is written as is: the caller derived it from the object it
    /// read, keeping the server-managed metadata and bumping `metadata.generation` if it
    /// changed the spec of a kind that has one, as [`Objects::guaranteed_update`] does.
    /// Nothing is defaulted or validated: this is for in-process writers of typed objects that
    /// set fields needing neither (a binding's `spec.nodeName`, a status condition), where a
    /// JSON round trip per object would dominate the cost.
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

impl Objects {
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

    /// kube's NamespaceLifecycle admission: no new content in a missing or terminating
    /// namespace.
    async fn ensure_namespace_usable(
        &self,
        info: &ResourceInfo,
        name: &str,
        ns: &str,
    ) -> Result<(), ApiError> {
        let nsinfo = registry::resolve("namespaces").expect("served");
        match self.store.get(&nsinfo.key("", ns)).await? {
            None => Err(ApiError::not_found(nsinfo, ns)),
            Some(kv) => {
                let v = decode_kv(&kv)?;
                if v["metadata"].get("deletionTimestamp").is_some() {
                    Err(ApiError::Forbidden(format!(
                        "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        info.group_resource()
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
        if info.kind == "Namespace" {
            // kube's namespace strategy: the lifecycle controller's finalizer, on create only.
            add_namespace_finalizer(&mut body);
        }
        // Status is owned by controllers: a create starts from the default status, except for
        // Nodes, which agents register together with their status.
        if info.status_subresource && info.kind != "Node" {
            if let Some(o) = body.as_object_mut() {
                o.remove("status");
            }
        }
        let obj = Self::normalize(info, &meta.name, body)?;
        if let Some(ns) = &ns {
            self.ensure_namespace_usable(info, &meta.name, ns).await?;
        }
        let key = Self::key(info, ns.as_deref(), &meta.name);
        if info.kind == "Service" {
            // Its addresses are allocated and recorded in the same store transaction.
            return self
                .create_service(info, ns.as_deref(), &meta.name, &key, obj)
                .await;
        }
        if info.kind == "Endpoints" {
            self.check_endpoints(info, &meta.name, None, &obj).await?;
        }
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
        // Allocation records another writer took under a previous attempt.
        let mut raced = BTreeSet::new();
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
            // A Service's allocation record ops, committed with its write.
            let mut records = Vec::new();
            if info.kind == "Service" {
                let alloc = self
                    .allocate_service(info, ns, name, Some(&current), next, &raced)
                    .await?;
                next = alloc.service;
                records = alloc.records;
            }
            if info.kind == "Endpoints" {
                self.check_endpoints(info, name, Some(&current), &next)
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
            // A Namespace also waits for its `spec.finalizers` (the lifecycle controller removes
            // `kubernetes` once the content is gone): kube's ShouldDeleteNamespaceDuringUpdate.
            let finished_deleting = meta.deletion_timestamp.is_some()
                && meta.finalizers.is_empty()
                && meta.deletion_grace_period_seconds.unwrap_or(0) == 0
                && (info.kind != "Namespace" || !has_spec_finalizers(&next));
            let op = if finished_deleting {
                if info.kind == "Service" {
                    records = self.service_release_ops(&current).await?;
                }
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
            let result = if info.kind == "Service" {
                match self.write_service(op, records).await? {
                    Ok(result) => Some(result),
                    Err(race) => {
                        // Another writer took (or released) an address meanwhile: again.
                        raced.insert(race.key);
                        continue;
                    }
                }
            } else {
                self.store.write(vec![op]).await?.into_iter().next()
            };
            match result {
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
                BatchWrite::Update { info, name, .. } if info.kind == "Service" => {
                    let refused = ApiError::Internal(
                        "Services keep allocation records: update them with Objects::update".into(),
                    );
                    (info, name, Err(refused))
                }
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
                other => Err(ApiError::Internal(format!(
                    "unexpected store result {other:?}"
                ))),
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
        if info.kind == "Endpoints" {
            return Err(ApiError::Internal(
                "Endpoints are checked against the Nodes: create them with Objects::create".into(),
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
}

/// Combine the stored object with an update of the main resource or of `status`.
fn merge_for_update(info: &ResourceInfo, current: &Value, next: Value, sub: Subresource) -> Value {
    match sub {
        Subresource::Main => {
            let mut next = next;
            if info.kind == "Namespace" {
                // Only the lifecycle controller changes them (kube's `/finalize`).
                match current["spec"].get("finalizers") {
                    Some(f) => next["spec"]["finalizers"] = f.clone(),
                    None => {
                        if let Some(spec) = next.get_mut("spec").and_then(Value::as_object_mut) {
                            spec.remove("finalizers");
                        }
                    }
                }
            }
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
