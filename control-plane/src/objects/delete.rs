//! Deletion in the registry: preconditions, graceful deletion (`deletionTimestamp`, pods'
//! grace periods), finalizers (including the propagation policy's), immediate removal, and
//! namespace termination (the namespace lifecycle controller that empties a terminating
//! namespace and then removes it).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use wasmctl_api::meta::{DeleteOptions, Preconditions, Time};
use wasmctl_api::registry::{self, ResourceInfo, RESOURCES};
use wasmctl_store::{Op, OpResult, Precondition};

use super::{
    decode_kv, encode_for_store, meta_of, set_meta, set_rv, ListOptions, Objects, MAX_RETRIES,
};
use crate::error::ApiError;

/// System namespaces that may not be deleted (as in Kubernetes, kube-node-lease may).
const UNDELETABLE_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

impl Objects {
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
                    if info.kind == "Namespace" {
                        // kube's namespace REST Delete: once finalized (no `spec.finalizers`
                        // left) and without finalizers, a delete removes it.
                        if meta.finalizers.is_empty() && !has_spec_finalizers(&current) {
                            match self
                                .delete_now(info, name, &key, kv.mod_revision, current)
                                .await
                            {
                                Err(ApiError::Conflict { .. }) => continue,
                                other => return other,
                            }
                        }
                        return Ok(current);
                    }
                    // Already terminating; a shorter grace period (e.g. 0 from the agent)
                    // finishes a pod without finalizers, or ends its grace period so that
                    // it goes with its last finalizer.
                    if grace == 0 {
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
                    // Namespaces created before `create` set it lack the finalizer that keeps
                    // them until their content is gone.
                    add_namespace_finalizer(&mut next);
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
                            let uid = meta.uid.clone().unwrap_or_default();
                            self.spawn_namespace_cleanup(name.to_string(), uid);
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
    pub(super) async fn put_if(
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
        let op = Op::Delete {
            key: key.to_string(),
            precondition: Precondition::ModRevision(mod_revision),
        };
        let res = if info.kind == "Service" {
            // Its allocation records go in the same transaction.
            let records = self.service_release_ops(&current).await?;
            match self.write_service(op, records).await? {
                Ok(result) => Some(result),
                // A record changed since it was read: the caller reads again.
                Err(_) => return Err(ApiError::modified(info, name)),
            }
        } else {
            self.store.write(vec![op]).await?.into_iter().next()
        };
        match res {
            Some(OpResult::Ok { .. }) => Ok(current),
            Some(OpResult::Conflict { .. }) => Err(ApiError::modified(info, name)),
            Some(OpResult::NotFound) => Err(ApiError::not_found(info, name)),
            other => Err(ApiError::Internal(format!(
                "unexpected store result {other:?}"
            ))),
        }
    }

    /// The namespace lifecycle controller (kube's namespace deleter) for the namespace `ns`
    /// whose uid is `uid`: delete everything in it, with the objects' own grace periods, until
    /// nothing is left, then remove its `kubernetes` finalizer, which removes the namespace
    /// unless it has finalizers of its own. It stops when the namespace is gone or replaced (a
    /// namespace of that name with another uid); any other failure is logged and retried with
    /// back-off. Restart-safe: `bootstrap` resumes it.
    pub(super) fn spawn_namespace_cleanup(&self, ns: String, uid: String) {
        let this = self.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let pass = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    r = this.cleanup_namespace_once(&ns, &uid) => r,
                };
                match pass {
                    Ok(Cleanup::Done) => return,
                    Ok(Cleanup::ContentRemains) => {}
                    Err(e) => tracing::warn!(
                        namespace = %ns,
                        error = %e,
                        retry_in = ?backoff,
                        "namespace cleanup failed; retrying"
                    ),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(CLEANUP_MAX_BACKOFF);
            }
        });
    }

    /// One pass of the namespace lifecycle controller (see [`Self::spawn_namespace_cleanup`]).
    async fn cleanup_namespace_once(&self, ns: &str, uid: &str) -> Result<Cleanup, ApiError> {
        let nsinfo = registry::resolve("namespaces").expect("served");
        let Some(kv) = self.store.get(&nsinfo.key("", ns)).await? else {
            return Ok(Cleanup::Done);
        };
        let current = decode_kv(&kv)?;
        if !is_terminating(&current, uid) {
            return Ok(Cleanup::Done);
        }
        // Delete what is not yet being deleted, each object by name and uid (an object
        // replaced meanwhile is left for the next pass), with its own grace period.
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        for info in RESOURCES.iter().filter(|r| r.namespaced) {
            let page = self.list(info, Some(ns), &ListOptions::default()).await?;
            for item in page.items {
                if item["metadata"].get("deletionTimestamp").is_some() {
                    continue;
                }
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                let opts = DeleteOptions {
                    preconditions: Some(Preconditions {
                        uid: item["metadata"]["uid"].as_str().map(str::to_string),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match self.delete(info, Some(ns), name, &opts).await {
                    Ok(_) | Err(ApiError::NotFound { .. } | ApiError::Conflict { .. }) => {}
                    Err(e) => {
                        failed.insert(info.group_resource(), e.to_string());
                    }
                }
            }
        }
        // What is left, and which finalizers hold it.
        let mut remaining = Vec::new();
        let mut finalizers: BTreeMap<String, usize> = BTreeMap::new();
        for info in RESOURCES.iter().filter(|r| r.namespaced) {
            let items = self
                .list(info, Some(ns), &ListOptions::default())
                .await?
                .items;
            if items.is_empty() {
                continue;
            }
            remaining.push(format!(
                "{}.{} has {} resource instances",
                info.plural,
                info.group,
                items.len()
            ));
            for item in &items {
                for f in item["metadata"]["finalizers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if let Some(f) = f.as_str() {
                        *finalizers.entry(f.to_string()).or_default() += 1;
                    }
                }
            }
        }
        let conditions = deletion_conditions(&failed, &remaining, &finalizers);
        self.set_namespace_conditions(ns, uid, &conditions).await?;
        if !remaining.is_empty() {
            return Ok(Cleanup::ContentRemains);
        }
        self.finalize_namespace(ns, uid).await
    }

    /// Record the deleter's conditions in the namespace's status (kube's `updateConditions`:
    /// a condition's `lastTransitionTime` moves only when its status changes).
    async fn set_namespace_conditions(
        &self,
        ns: &str,
        uid: &str,
        conditions: &[Condition],
    ) -> Result<(), ApiError> {
        let nsinfo = registry::resolve("namespaces").expect("served");
        let now = serde_json::to_value(Time::now()).expect("a time serialises");
        self.guaranteed_update(nsinfo, None, ns, None, |cur| {
            if !is_terminating(cur, uid) {
                return Err(ApiError::conflict(
                    nsinfo,
                    ns,
                    "the namespace is no longer the one being deleted",
                ));
            }
            let mut next = cur.clone();
            let list = &mut next["status"]["conditions"];
            if !list.is_array() {
                *list = json!([]);
            }
            let list = list.as_array_mut().expect("just made an array");
            for c in conditions {
                let new = json!({"type": c.type_, "status": c.status, "reason": c.reason,
                    "message": c.message, "lastTransitionTime": now});
                match list.iter_mut().find(|o| o["type"] == c.type_) {
                    None => list.push(new),
                    Some(old) => {
                        if old["status"] != c.status {
                            *old = new;
                        } else {
                            old["reason"] = json!(c.reason);
                            old["message"] = json!(c.message);
                        }
                    }
                }
            }
            Ok(next)
        })
        .await
        .map(|_| ())
    }

    /// kube's `finalizeNamespace` through `/finalize`: remove the `kubernetes` finalizer; a
    /// namespace left with no finalizers of either kind is removed in the same write. A lost
    /// race is retried.
    async fn finalize_namespace(&self, ns: &str, uid: &str) -> Result<Cleanup, ApiError> {
        let nsinfo = registry::resolve("namespaces").expect("served");
        let key = nsinfo.key("", ns);
        for _ in 0..MAX_RETRIES {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(Cleanup::Done);
            };
            let current = decode_kv(&kv)?;
            if !is_terminating(&current, uid) {
                return Ok(Cleanup::Done);
            }
            let mut next = current.clone();
            if let Some(a) = next["spec"]["finalizers"].as_array_mut() {
                a.retain(|f| f != NAMESPACE_FINALIZER);
            }
            let precondition = Precondition::ModRevision(kv.mod_revision);
            let op = if meta_of(&current)?.finalizers.is_empty() && !has_spec_finalizers(&next) {
                Op::Delete {
                    key: key.clone(),
                    precondition,
                }
            } else if next != current {
                let next = wasmctl_api::normalize(nsinfo, next)
                    .map_err(|inv| ApiError::invalid(nsinfo, ns, inv))?;
                Op::Put {
                    key: key.clone(),
                    value: encode_for_store(&next)?,
                    precondition,
                }
            } else {
                // Finalized; its own finalizers keep it until their owners remove them.
                return Ok(Cleanup::Done);
            };
            match self.store.write(vec![op]).await?.into_iter().next() {
                Some(OpResult::Ok { .. } | OpResult::NotFound) => return Ok(Cleanup::Done),
                Some(OpResult::Conflict { .. }) => continue,
                other => {
                    return Err(ApiError::Internal(format!(
                        "unexpected store result {other:?}"
                    )))
                }
            }
        }
        Err(ApiError::conflict(
            nsinfo,
            ns,
            "too many concurrent writers; please try again",
        ))
    }
}

/// The longest wait between two passes of a namespace's cleanup.
const CLEANUP_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a pass of the namespace lifecycle controller ended.
enum Cleanup {
    /// The namespace is gone, replaced, or finalized.
    Done,
    /// Objects are still being deleted (grace periods, finalizers): look again later.
    ContentRemains,
}

/// The lifecycle controller's finalizer in a Namespace's `spec.finalizers` (kube's
/// `FinalizerKubernetes`).
pub(super) const NAMESPACE_FINALIZER: &str = "kubernetes";

/// Add [`NAMESPACE_FINALIZER`] to a Namespace's `spec.finalizers`.
pub(super) fn add_namespace_finalizer(ns: &mut Value) {
    let f = &mut ns["spec"]["finalizers"];
    match f.as_array_mut() {
        Some(a) if a.iter().any(|x| x == NAMESPACE_FINALIZER) => {}
        Some(a) => a.push(json!(NAMESPACE_FINALIZER)),
        None => *f = json!([NAMESPACE_FINALIZER]),
    }
}

/// Whether a Namespace still has `spec.finalizers` (it is not finalized).
pub(super) fn has_spec_finalizers(ns: &Value) -> bool {
    ns["spec"]["finalizers"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
}

/// The namespace `uid` is still there and terminating.
fn is_terminating(ns: &Value, uid: &str) -> bool {
    ns["metadata"]["uid"] == uid && ns["metadata"].get("deletionTimestamp").is_some()
}

/// A condition of a terminating Namespace.
#[derive(Debug, PartialEq, Eq)]
struct Condition {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

/// The namespace deleter's conditions (kube's `namespaceConditionUpdater`, without the
/// discovery failures that cannot happen here): `failed` maps a resource to why deleting its
/// objects failed, `remaining` is "RESOURCE.GROUP has N resource instances" per resource with
/// objects left, `finalizers` counts the objects left per finalizer.
fn deletion_conditions(
    failed: &BTreeMap<String, String>,
    remaining: &[String],
    finalizers: &BTreeMap<String, usize>,
) -> Vec<Condition> {
    let ok = |type_, reason, message: &str| Condition {
        type_,
        status: "False",
        reason,
        message: message.to_string(),
    };
    let mut out = vec![
        ok(
            "NamespaceDeletionDiscoveryFailure",
            "ResourcesDiscovered",
            "All resources successfully discovered",
        ),
        ok(
            "NamespaceDeletionGroupVersionParsingFailure",
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed",
        ),
    ];
    out.push(if failed.is_empty() {
        ok(
            "NamespaceDeletionContentFailure",
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization",
        )
    } else {
        let mut msgs: Vec<String> = failed.iter().map(|(r, e)| format!("{r}: {e}")).collect();
        msgs.sort();
        Condition {
            type_: "NamespaceDeletionContentFailure",
            status: "True",
            reason: "ContentDeletionFailed",
            message: format!(
                "Failed to delete all resource types, {} remaining: {}",
                msgs.len(),
                msgs.join(", ")
            ),
        }
    });
    out.push(if remaining.is_empty() {
        ok(
            "NamespaceContentRemaining",
            "ContentRemoved",
            "All content successfully removed",
        )
    } else {
        let mut r = remaining.to_vec();
        r.sort();
        Condition {
            type_: "NamespaceContentRemaining",
            status: "True",
            reason: "SomeResourcesRemain",
            message: format!("Some resources are remaining: {}", r.join(", ")),
        }
    });
    out.push(if finalizers.is_empty() {
        ok(
            "NamespaceFinalizersRemaining",
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished",
        )
    } else {
        let mut f: Vec<String> = finalizers
            .iter()
            .map(|(f, n)| format!("{f} in {n} resource instances"))
            .collect();
        f.sort();
        Condition {
            type_: "NamespaceFinalizersRemaining",
            status: "True",
            reason: "SomeFinalizersRemain",
            message: format!(
                "Some content in the namespace has finalizers remaining: {}",
                f.join(", ")
            ),
        }
    });
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;
    use wasmctl_store::{Store, StoreConfig};

    /// A registry whose background cleanups stop at once: the tests run the passes.
    async fn open(dir: &std::path::Path) -> Objects {
        let mut cfg = StoreConfig::new(dir);
        cfg.fsync = false;
        let store = Store::open(cfg).await.expect("store opens");
        let shutdown = CancellationToken::new();
        let objects = Objects::new(store, shutdown.clone());
        objects.bootstrap().await.expect("bootstrap");
        shutdown.cancel();
        objects
    }

    fn info(plural: &str) -> &'static ResourceInfo {
        registry::resolve(plural).expect("served")
    }

    #[tokio::test]
    async fn a_pass_for_a_replaced_namespace_touches_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let objects = open(dir.path()).await;
        let ns = json!({"metadata": {"name": "x"}});
        let ns = objects.create(info("namespaces"), None, ns).await.unwrap();
        let uid = ns["metadata"]["uid"].as_str().unwrap().to_string();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "hello:v1"}]}});
        objects.create(info("pods"), Some("x"), pod).await.unwrap();
        let opts = DeleteOptions::default();
        objects
            .delete(info("namespaces"), None, "x", &opts)
            .await
            .unwrap();

        // Another namespace of that name (uid) is not this cleanup's business.
        let pass = objects.cleanup_namespace_once("x", "an-older-uid").await;
        assert!(matches!(pass, Ok(Cleanup::Done)));
        objects
            .get(info("pods"), Some("x"), "p")
            .await
            .expect("kept");
        let ns = objects.get(info("namespaces"), None, "x").await.unwrap();
        assert!(ns["status"].get("conditions").is_none(), "{ns}");

        // Its own: the pod (unbound, no grace period) goes, then the namespace.
        let pass = objects.cleanup_namespace_once("x", &uid).await;
        assert!(matches!(pass, Ok(Cleanup::Done)));
        let gone = objects.get(info("pods"), Some("x"), "p").await;
        assert!(matches!(gone, Err(ApiError::NotFound { .. })));
        let gone = objects.get(info("namespaces"), None, "x").await;
        assert!(matches!(gone, Err(ApiError::NotFound { .. })), "{gone:?}");
    }

    #[test]
    fn conditions_use_kubes_wording() {
        let none = deletion_conditions(&BTreeMap::new(), &[], &BTreeMap::new());
        let types: Vec<_> = none.iter().map(|c| (c.type_, c.status)).collect();
        assert_eq!(
            types,
            [
                ("NamespaceDeletionDiscoveryFailure", "False"),
                ("NamespaceDeletionGroupVersionParsingFailure", "False"),
                ("NamespaceDeletionContentFailure", "False"),
                ("NamespaceContentRemaining", "False"),
                ("NamespaceFinalizersRemaining", "False"),
            ]
        );
        let failed = BTreeMap::from([("pods".to_string(), "boom".to_string())]);
        let remaining = [
            "pods. has 2 resource instances".to_string(),
            "deployments.apps has 1 resource instances".to_string(),
        ];
        let finalizers = BTreeMap::from([("b.io/x".to_string(), 1), ("a.io/y".to_string(), 2)]);
        let some = deletion_conditions(&failed, &remaining, &finalizers);
        assert_eq!(
            some[2].message,
            "Failed to delete all resource types, 1 remaining: pods: boom"
        );
        assert_eq!(
            (some[2].status, some[2].reason),
            ("True", "ContentDeletionFailed")
        );
        assert_eq!(
            some[3].message,
            "Some resources are remaining: deployments.apps has 1 resource instances, pods. has 2 resource instances"
        );
        assert_eq!(some[3].reason, "SomeResourcesRemain");
        assert_eq!(
            some[4].message,
            "Some content in the namespace has finalizers remaining: a.io/y in 2 resource instances, b.io/x in 1 resource instances"
        );
        assert_eq!(some[4].reason, "SomeFinalizersRemain");
    }
}
