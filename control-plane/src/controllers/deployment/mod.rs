//! The Deployment controller, with Kubernetes' semantics: one ReplicaSet per pod template
//! (named by the template's hash), `RollingUpdate` within maxSurge/maxUnavailable or
//! `Recreate`, proportional scaling during a rollout, `paused`, revisions and
//! `revisionHistoryLimit`, the Available/Progressing conditions and progress deadlines.
//!
//! [`plan()`] takes one step of a rollout (like the Kubernetes controller, each sync does the
//! first thing that needs doing and returns) as a pure function of the Deployment and its
//! ReplicaSets; [`DeploymentController`] adopts/releases ReplicaSets (with the ReplicaSet
//! controller's rule for pods: a matching set without a controller is adopted, its other owner
//! references kept) and applies the step.
//!
//! This file owns the reconciler (what to watch, claiming ReplicaSets, carrying out a
//! plan's actions, writing the status); the pure step lives in `plan.rs`, re-exported here.

mod plan;

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use wasmctl_api::apps::{Deployment, ReplicaSet};
use wasmctl_api::meta::{DeleteOptions, ObjectMeta};
use wasmctl_api::selector::Selector;

pub use plan::{
    equal_ignore_hash, fenceposts, new_replica_set, plan, revision, template_hash, Action, Plan,
    DESIRED_REPLICAS, HASH_LABEL, MAX_REPLICAS, REVISION, REVISION_HISTORY,
};

use super::cache::{split_key, Cache};
use super::replicaset::{adoptable, with_controller_ref};
use super::{controller_key, deployments, pods, replicasets, Ctx, Reconciler, WorkQueue};
use crate::error::ApiError;

/// The adoption write of a ReplicaSet, with the ReplicaSet controller's rule for pods
/// ([`adoptable`]): `cur` (the stored set) with `d` added as its controller (`controller: true`,
/// `blockOwnerDeletion: true`) next to the owner references it already has; refused ("no
/// longer an orphan") if it gained a controller, is being deleted or no longer matches, or `d`
/// is being deleted.
pub fn adopt_replica_set(d: &Deployment, cur: &Value) -> Result<Value, ApiError> {
    let refused = || ApiError::BadRequest("no longer an orphan".into());
    let meta: ObjectMeta =
        serde_json::from_value(cur["metadata"].clone()).map_err(|_| refused())?;
    let selector = d
        .spec
        .selector
        .as_ref()
        .and_then(|s| Selector::from_label_selector(s).ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(refused)?;
    if d.metadata.deletion_timestamp.is_some() || !adoptable(&meta, &selector) {
        return Err(refused());
    }
    let owner = serde_json::to_value(&new_replica_set(d, "", 0, 0, 0).metadata.owner_references[0])
        .expect("owner references serialise");
    Ok(with_controller_ref(cur, owner))
}

/// The release write: `cur` without its reference to the Deployment `uid`; other owners stay.
fn release_replica_set(uid: &str, cur: &Value) -> Value {
    let mut next = cur.clone();
    if let Some(refs) = next["metadata"]["ownerReferences"].as_array_mut() {
        refs.retain(|o| o["uid"] != uid);
        if refs.is_empty() {
            if let Some(m) = next["metadata"].as_object_mut() {
                m.remove("ownerReferences");
            }
        }
    }
    next
}

/// Enqueues the Deployment a change concerns: the Deployment itself, a ReplicaSet's owner
/// (or, for an orphan ReplicaSet, every Deployment of its namespace), and a pod's
/// ReplicaSet's owner (Recreate waits for pods to be gone).
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let d_prefix = deployments().key_prefix(None);
    let rs_prefix = replicasets().key_prefix(None);
    let pod_prefix = pods().key_prefix(None);
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if ch.key.starts_with(&d_prefix) {
            q.add(ch.key);
            return;
        }
        let is_rs = ch.key.starts_with(&rs_prefix);
        let is_pod = ch.key.starts_with(&pod_prefix);
        if !is_rs && !is_pod {
            return;
        }
        for obj in [ch.old, ch.new].into_iter().flatten() {
            if is_rs {
                match controller_key(obj, deployments()) {
                    Some(k) => q.add(&k),
                    None => {
                        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
                            for k in cache.keys(&deployments().key_prefix(Some(ns))) {
                                q.add(&k);
                            }
                        }
                    }
                }
            } else if ch.new.is_none() {
                // Only a pod's disappearance matters here (Recreate); the ReplicaSet's status
                // reports everything else.
                let rs = controller_key(obj, replicasets()).and_then(|k| cache.get(&k));
                if let Some(k) = rs.and_then(|rs| controller_key(&rs, deployments())) {
                    q.add(&k);
                }
            }
        }
    });
}

pub struct DeploymentController {
    ctx: Ctx,
}

impl DeploymentController {
    pub fn new(ctx: Ctx) -> Self {
        DeploymentController { ctx }
    }
}

impl Reconciler for DeploymentController {
    const NAME: &'static str = "deployment";

    fn resync_prefix(&self) -> Option<String> {
        Some(deployments().key_prefix(None))
    }

    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let Some((ns, name)) = split_key(key) else {
            return Ok(None);
        };
        let Some(obj) = self.ctx.cache.get(key) else {
            return Ok(None);
        };
        let d: Deployment = serde_json::from_value(Value::clone(&obj))
            .map_err(|e| ApiError::Internal(format!("decoding {key}: {e}")))?;
        if d.metadata.deletion_timestamp.is_some() {
            return Ok(None); // the garbage collector is removing it
        }
        let owned = self.claim_replica_sets(&d, ns).await?;
        let old_pods_running = self.old_pods_running(&d, &owned);
        let p = plan(&d, &owned, old_pods_running, Utc::now());
        let mut status = p.status.clone();
        for a in &p.actions {
            if self.apply(&d, ns, a).await? {
                status.collision_count = Some(status.collision_count.unwrap_or(0) + 1);
                break;
            }
        }
        let status = serde_json::to_value(&status).expect("status serialises");
        let current =
            serde_json::to_value(d.status.clone().unwrap_or_default()).expect("status serialises");
        if status != current {
            match self
                .ctx
                .patch_status(deployments(), Some(ns), name, status)
                .await
            {
                Ok(_) | Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(p.requeue_after)
    }
}

impl DeploymentController {
    /// The ReplicaSets `d` controls, after adopting matching orphans and releasing owned
    /// ones that no longer match its selector.
    async fn claim_replica_sets(
        &self,
        d: &Deployment,
        ns: &str,
    ) -> Result<Vec<ReplicaSet>, ApiError> {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let selector = d
            .spec
            .selector
            .as_ref()
            .and_then(|s| Selector::from_label_selector(s).ok());
        let mut owned = Vec::new();
        for v in self.ctx.cache.list(&replicasets().key_prefix(Some(ns))) {
            let Ok(rs) = serde_json::from_value::<ReplicaSet>(Value::clone(&v)) else {
                continue;
            };
            let selector = selector.as_ref().filter(|s| !s.is_empty());
            let matches = selector.is_some_and(|s| s.matches(&rs.metadata.labels));
            let ctl = rs.metadata.controller().map(|o| o.uid.clone());
            let name = &rs.metadata.name;
            if ctl.as_deref() == Some(uid.as_str()) {
                if matches {
                    owned.push(rs);
                } else {
                    let res = self
                        .ctx
                        .update(replicasets(), Some(ns), name, |cur| {
                            Ok(release_replica_set(&uid, cur))
                        })
                        .await;
                    super::ignore_gone(res)?;
                }
            } else if selector.is_some_and(|s| adoptable(&rs.metadata, s)) {
                let res = self
                    .ctx
                    .update(replicasets(), Some(ns), name, |cur| {
                        adopt_replica_set(d, cur)
                    })
                    .await;
                if let Ok(rs) = res.and_then(|v| {
                    serde_json::from_value(v).map_err(|e| ApiError::Internal(e.to_string()))
                }) {
                    owned.push(rs);
                }
            }
        }
        Ok(owned)
    }

    /// Whether any pod of an old ReplicaSet still exists and has not finished.
    fn old_pods_running(&self, d: &Deployment, owned: &[ReplicaSet]) -> bool {
        owned
            .iter()
            .filter(|rs| !equal_ignore_hash(&rs.spec.template, &d.spec.template))
            .filter_map(|rs| rs.metadata.uid.as_deref())
            .flat_map(|uid| self.ctx.cache.dependents(uid))
            .filter_map(|(_, v)| {
                serde_json::from_value::<wasmctl_api::core::Pod>(Value::clone(&v)).ok()
            })
            .any(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
    }

    /// Applies one action; `Ok(true)` when a ReplicaSet could not be created because a
    /// different one has its name (a hash collision).
    async fn apply(&self, d: &Deployment, ns: &str, a: &Action) -> Result<bool, ApiError> {
        let ctx = &self.ctx;
        match a {
            Action::CreateReplicaSet(rs) => {
                let body = serde_json::to_value(rs).expect("replica sets serialise");
                let mut body = body;
                body["apiVersion"] = json!("apps/v1");
                body["kind"] = json!("ReplicaSet");
                match ctx.create(replicasets(), ns, body).await {
                    Ok(_) => {}
                    Err(ApiError::AlreadyExists { .. }) => {
                        // Ours (created by an earlier reconcile) is fine; anything else under
                        // that name is a hash collision: count it, the next hash differs.
                        let existing = ctx
                            .objects
                            .get(replicasets(), Some(ns), &rs.metadata.name)
                            .await?;
                        let theirs: ReplicaSet = serde_json::from_value(existing).map_err(|e| {
                            ApiError::Internal(format!("decoding a ReplicaSet: {e}"))
                        })?;
                        let ours = theirs.metadata.controller().map(|o| o.uid.as_str())
                            == d.metadata.uid.as_deref()
                            && equal_ignore_hash(&theirs.spec.template, &d.spec.template);
                        if !ours {
                            return Ok(true);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Action::ScaleReplicaSet {
                name,
                replicas,
                annotations,
            } => {
                ctx.update(replicasets(), Some(ns), name, |cur| {
                    let mut next = cur.clone();
                    next["spec"]["replicas"] = json!(replicas);
                    // Only the keys the controller sets: others' annotations stay.
                    for (k, v) in annotations {
                        next["metadata"]["annotations"][k] = json!(v);
                    }
                    Ok(next)
                })
                .await?;
            }
            Action::DeleteReplicaSet(name) => {
                ctx.delete(replicasets(), Some(ns), name, &DeleteOptions::default())
                    .await?;
            }
            Action::AnnotateDeployment(ann) => {
                ctx.update(deployments(), Some(ns), &d.metadata.name, |cur| {
                    let mut next = cur.clone();
                    for (k, v) in ann {
                        next["metadata"]["annotations"][k] = json!(v);
                    }
                    Ok(next)
                })
                .await?;
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "default",
            "uid": "d-uid"}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "hello:v1"}]}}}}))
        .unwrap()
    }

    /// A matching ReplicaSet with `refs` as its owner references (`null`: none).
    fn replica_set(refs: Value) -> Value {
        let mut rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
            "name": "web-1", "namespace": "default", "uid": "rs-uid",
            "labels": {"app": "web"}}, "spec": {}});
        if !refs.is_null() {
            rs["metadata"]["ownerReferences"] = refs;
        }
        rs
    }

    /// Leftover of issue 11: a matching ReplicaSet with only non-controller owner references
    /// was never adopted ("no longer an orphan" for any reference), unlike pods in the
    /// ReplicaSet controller. It is adoptable; its other references stay, ours is added.
    #[test]
    fn a_replica_set_with_only_non_controller_owners_is_adopted_keeping_them() {
        let d = deployment();
        let other = json!({"apiVersion": "v1", "kind": "Namespace", "name": "default",
            "uid": "ns-uid"});
        let adopted = adopt_replica_set(&d, &replica_set(json!([other]))).expect("adoptable");
        let refs = adopted["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert_eq!(refs[0], other);
        assert_eq!(
            (&refs[1]["uid"], &refs[1]["kind"], &refs[1]["controller"]),
            (&json!("d-uid"), &json!("Deployment"), &json!(true))
        );
        // A weak reference to this Deployment becomes the controller reference.
        let weak = json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
            "uid": "d-uid"});
        let adopted = adopt_replica_set(&d, &replica_set(json!([weak]))).expect("adoptable");
        assert_eq!(
            adopted["metadata"]["ownerReferences"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            adopted["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        // A set with no references at all, as before.
        assert!(adopt_replica_set(&d, &replica_set(Value::Null)).is_ok());

        // Refused: another controller, being deleted, not matching, a deleting Deployment.
        let mut ctl = other.clone();
        ctl["controller"] = json!(true);
        assert!(adopt_replica_set(&d, &replica_set(json!([ctl]))).is_err());
        let mut deleting = replica_set(Value::Null);
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert!(adopt_replica_set(&d, &deleting).is_err());
        let mut foreign = replica_set(Value::Null);
        foreign["metadata"]["labels"] = json!({"app": "db"});
        assert!(adopt_replica_set(&d, &foreign).is_err());
        let mut gone = deployment();
        gone.metadata.deletion_timestamp = Some(wasmctl_api::Time(chrono::Utc::now()));
        assert!(adopt_replica_set(&gone, &replica_set(Value::Null)).is_err());

        // Releasing drops only this Deployment's reference.
        let mut ours = refs[1].clone();
        ours["blockOwnerDeletion"] = json!(true);
        let released = release_replica_set("d-uid", &replica_set(json!([other, ours])));
        assert_eq!(released["metadata"]["ownerReferences"], json!([other]));
    }
}
