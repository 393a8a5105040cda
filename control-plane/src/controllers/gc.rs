//! The garbage collector: ownerReferences with Kubernetes' deletion propagation.
//!
//! - Background (the default): the owner is deleted at once; every object whose owners are
//!   all gone is then deleted here, and a dangling reference next to a live owner is dropped.
//! - Foreground: the API server keeps the owner (deletionTimestamp + the `foregroundDeletion`
//!   finalizer); its dependents are deleted (in foreground too, so the cascade goes all the
//!   way down) and once no dependent with `blockOwnerDeletion` is left the finalizer is
//!   removed, which deletes the owner.
//! - Orphan: the owner carries the `orphan` finalizer; its dependents lose their reference to
//!   it, then the finalizer goes.
//!
//! Work is keyed by store key (any kind). An owner's presence is confirmed with a
//! linearizable read of the store, never from the cache alone, and a dependent is deleted with
//! its cached uid as a precondition (`preconditions.uid`), so an object re-created under the
//! same name meanwhile is never deleted in its place.

use std::time::Duration;

use serde_json::{json, Value};
use wasmctl_api::meta::DeleteOptions;
use wasmctl_api::registry::{self, ResourceInfo, RESOURCES};

use super::cache::Cache;
use super::{ignore_gone, Ctx, Reconciler, WorkQueue};
use crate::error::ApiError;

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// The resource a store key belongs to, with the object's namespace and name.
pub fn parse_key(key: &str) -> Option<(&'static ResourceInfo, Option<&str>, &str)> {
    let (prefix, rest) = key.split_once('/')?;
    let info = RESOURCES.iter().find(|r| r.group_resource() == prefix)?;
    if info.namespaced {
        let (ns, name) = rest.split_once('/')?;
        Some((info, Some(ns), name))
    } else {
        Some((info, None, rest))
    }
}

fn has_finalizer(obj: &Value, f: &str) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == f))
}

fn deleting(obj: &Value) -> bool {
    obj["metadata"]["deletionTimestamp"].is_string()
}

fn owner_refs(obj: &Value) -> Vec<Value> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Enqueues what a change may concern: a new or re-owned dependent (are its owners there?),
/// an owner being deleted with a finalizer, the dependents of a deleted object, and the
/// owners of a deleted dependent (a foreground deletion may be waiting for it).
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if let Some(new) = ch.new {
            let refs_changed = ch.old.map(|o| &o["metadata"]["ownerReferences"])
                != Some(&new["metadata"]["ownerReferences"]);
            if refs_changed && !new["metadata"]["ownerReferences"].is_null() {
                q.add(ch.key);
            }
            if deleting(new) && (has_finalizer(new, FOREGROUND) || has_finalizer(new, ORPHAN)) {
                q.add(ch.key);
            }
        }
        let Some(obj) = ch.object() else { return };
        let gone = ch.new.is_none();
        let dependent_deleting = ch.new.is_some_and(|n| deleting(n));
        if gone {
            if let Some(uid) = obj["metadata"]["uid"].as_str() {
                for (k, _) in cache.dependents(uid) {
                    q.add(&k);
                }
            }
        }
        if gone || dependent_deleting {
            for owner in owner_refs(obj) {
                if let Some(o) = owner["uid"].as_str().and_then(|u| cache.get_by_uid(u)) {
                    if deleting(&o) {
                        if let Some(k) = key_of(&o) {
                            q.add(&k);
                        }
                    }
                }
            }
        }
    });
}

/// The store key of a cached object.
fn key_of(obj: &Value) -> Option<String> {
    let info = registry::by_kind(obj["apiVersion"].as_str()?, obj["kind"].as_str()?)?;
    Some(info.key(
        obj["metadata"]["namespace"].as_str().unwrap_or_default(),
        obj["metadata"]["name"].as_str()?,
    ))
}

pub struct GarbageCollector {
    ctx: Ctx,
}

impl GarbageCollector {
    pub fn new(ctx: Ctx) -> Self {
        GarbageCollector { ctx }
    }
}

impl Reconciler for GarbageCollector {
    const NAME: &'static str = "garbage-collector";

    fn resync_prefix(&self) -> Option<String> {
        None
    }

    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let Some((info, ns, name)) = parse_key(key) else {
            return Ok(None);
        };
        let Some(obj) = self.ctx.cache.get(key) else {
            return Ok(None);
        };
        if deleting(&obj) && has_finalizer(&obj, ORPHAN) {
            self.orphan_dependents(info, ns, name, &obj).await?;
            return Ok(None);
        }
        if deleting(&obj) && has_finalizer(&obj, FOREGROUND) {
            return self.delete_dependents(info, ns, name, &obj).await;
        }
        self.check_owners(info, ns, name, &obj).await
    }
}

impl GarbageCollector {
    /// Whether the owner a reference names exists (the same uid), read from the store.
    async fn owner_exists(&self, ns: Option<&str>, owner: &Value) -> Result<bool, ApiError> {
        let (Some(api_version), Some(kind), Some(name)) = (
            owner["apiVersion"].as_str(),
            owner["kind"].as_str(),
            owner["name"].as_str(),
        ) else {
            return Ok(false);
        };
        let Some(info) = registry::by_kind(api_version, kind) else {
            return Ok(false);
        };
        let ns = if info.namespaced { ns } else { None };
        match self.ctx.objects.get(info, ns, name).await {
            Ok(v) => Ok(v["metadata"]["uid"] == owner["uid"]),
            Err(ApiError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A dependent: delete it when every owner is gone, drop references to absent owners
    /// when some remain.
    async fn check_owners(
        &self,
        info: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<Option<Duration>, ApiError> {
        let refs = owner_refs(obj);
        if refs.is_empty() || deleting(obj) {
            return Ok(None);
        }
        let mut absent = Vec::new();
        for r in &refs {
            if !self.owner_exists(ns, r).await? {
                absent.push(r["uid"].clone());
            }
        }
        if absent.is_empty() {
            return Ok(None);
        }
        if absent.len() == refs.len() {
            tracing::info!(kind = info.kind, name, "deleting: all owners are gone");
            let opts = DeleteOptions {
                propagation_policy: Some("Background".into()),
                ..Default::default()
            };
            // Only the object whose owners were checked, not one re-created under its name.
            let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
            self.ctx.delete_uid(info, ns, name, uid, opts).await?;
        } else {
            let uid = obj["metadata"]["uid"].clone();
            let res = self
                .ctx
                .update(info, ns, name, |cur| {
                    if cur["metadata"]["uid"] != uid {
                        return Err(ApiError::BadRequest("replaced".into()));
                    }
                    let mut next = cur.clone();
                    if let Some(a) = next["metadata"]["ownerReferences"].as_array_mut() {
                        a.retain(|r| !absent.contains(&r["uid"]));
                    }
                    Ok(next)
                })
                .await;
            ignore_gone(res)?;
        }
        Ok(None)
    }

    /// Foreground: delete the dependents (in foreground), wait for the blocking ones to be
    /// gone, then let the owner go.
    async fn delete_dependents(
        &self,
        info: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<Option<Duration>, ApiError> {
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        let mut blocking = 0;
        for (key, dep) in self.ctx.cache.dependents(uid) {
            let Some((dinfo, dns, dname)) = parse_key(&key) else {
                continue;
            };
            let blocks = owner_refs(&dep)
                .iter()
                .any(|r| r["uid"] == uid && r["blockOwnerDeletion"] == true);
            if blocks {
                blocking += 1;
            }
            if !deleting(&dep) {
                let opts = DeleteOptions {
                    propagation_policy: Some("Foreground".into()),
                    ..Default::default()
                };
                let duid = dep["metadata"]["uid"].as_str().unwrap_or_default();
                self.ctx.delete_uid(dinfo, dns, dname, duid, opts).await?;
            }
        }
        if blocking > 0 {
            // Each dependent's deletion enqueues this owner again; the resync-free queue
            // still looks again in a while in case an event was missed.
            return Ok(Some(Duration::from_secs(30)));
        }
        self.remove_finalizer(info, ns, name, FOREGROUND).await?;
        Ok(None)
    }

    /// Orphan: drop every dependent's reference to the owner, then the finalizer.
    async fn orphan_dependents(
        &self,
        info: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        obj: &Value,
    ) -> Result<(), ApiError> {
        let uid = obj["metadata"]["uid"].clone();
        for (key, _) in self.ctx.cache.dependents(uid.as_str().unwrap_or_default()) {
            let Some((dinfo, dns, dname)) = parse_key(&key) else {
                continue;
            };
            let res = self
                .ctx
                .update(dinfo, dns, dname, |cur| {
                    let mut next = cur.clone();
                    if let Some(a) = next["metadata"]["ownerReferences"].as_array_mut() {
                        a.retain(|r| r["uid"] != uid);
                        if a.is_empty() {
                            next["metadata"]
                                .as_object_mut()
                                .map(|m| m.remove("ownerReferences"));
                        }
                    }
                    Ok(next)
                })
                .await;
            ignore_gone(res)?;
        }
        self.remove_finalizer(info, ns, name, ORPHAN).await
    }

    async fn remove_finalizer(
        &self,
        info: &'static ResourceInfo,
        ns: Option<&str>,
        name: &str,
        finalizer: &str,
    ) -> Result<(), ApiError> {
        let res = self
            .ctx
            .update(info, ns, name, |cur| {
                let mut next = cur.clone();
                if let Some(a) = next["metadata"]["finalizers"].as_array_mut() {
                    a.retain(|f| f != finalizer);
                }
                if next["metadata"]["finalizers"] == json!([]) {
                    next["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("finalizers"));
                }
                Ok(next)
            })
            .await;
        ignore_gone(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_resource() {
        let (info, ns, name) = parse_key("replicasets.apps/default/web-1").unwrap();
        assert_eq!(
            (info.kind, ns, name),
            ("ReplicaSet", Some("default"), "web-1")
        );
        let (info, ns, name) = parse_key("pods/demo/hello-x").unwrap();
        assert_eq!((info.kind, ns, name), ("Pod", Some("demo"), "hello-x"));
        let (info, ns, name) = parse_key("nodes/node-1").unwrap();
        assert_eq!((info.kind, ns, name), ("Node", None, "node-1"));
        assert!(parse_key("nonsense").is_none());
    }

    /// Issue 11, item 21: the collector deleted a dependent by name, so an object re-created
    /// under that name after the cache saw the orphan was deleted in its place.
    #[tokio::test]
    async fn an_object_recreated_under_an_orphans_name_is_not_collected() {
        use crate::controllers::tests::{open, stale_cache};
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        let leases = registry::resolve("leases").expect("served");
        let lease = |name: &str, owner: Option<&Value>| {
            let mut v = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name}, "spec": {}});
            if let Some(o) = owner {
                v["metadata"]["ownerReferences"] = json!([{"apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease", "name": o["metadata"]["name"], "uid": o["metadata"]["uid"]}]);
            }
            v
        };
        let ns = Some("default");
        let owner = objects
            .create(leases, ns, lease("owner", None))
            .await
            .unwrap();
        objects
            .create(leases, ns, lease("dep", Some(&owner)))
            .await
            .unwrap();
        // The cache saw the dependent; then its owner went, and it was replaced.
        let cache = stale_cache(&store).await;
        let opts = DeleteOptions::default();
        objects.delete(leases, ns, "owner", &opts).await.unwrap();
        objects.delete(leases, ns, "dep", &opts).await.unwrap();
        let fresh = objects
            .create(leases, ns, lease("dep", None))
            .await
            .unwrap();

        let gc = GarbageCollector::new(Ctx::new(objects.clone(), cache));
        gc.reconcile(&leases.key("default", "dep")).await.unwrap();
        let now = objects.get(leases, ns, "dep").await;
        assert_eq!(
            now.map(|v| v["metadata"]["uid"].clone()).ok(),
            Some(fresh["metadata"]["uid"].clone()),
            "the re-created object was collected"
        );
    }

    #[test]
    fn finalizers_and_deletion_are_read_from_json() {
        let v = json!({"metadata": {"finalizers": ["orphan"], "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert!(has_finalizer(&v, ORPHAN) && !has_finalizer(&v, FOREGROUND) && deleting(&v));
    }
}
