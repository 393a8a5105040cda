//! Deletion in the registry: preconditions, graceful deletion (`deletionTimestamp`, pods'
//! grace periods), finalizers (including the propagation policy's), immediate removal, and
//! namespace termination (the namespace lifecycle controller that empties a terminating
//! namespace and then removes it).

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use wasmctl_api::meta::{DeleteOptions, Time};
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
    pub(super) fn spawn_namespace_cleanup(&self, ns: String) {
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
