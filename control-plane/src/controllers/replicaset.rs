//! The ReplicaSet controller: keeps `spec.replicas` active pods that match the selector,
//! owned through a controller ownerReference.
//!
//! [`plan`] is the whole decision (adopt, release, create, delete which, status) as a pure
//! function of the ReplicaSet and its namespace's pods; [`ReplicaSetController`] applies it,
//! deleting each pod with the uid the plan saw as a precondition (never a pod re-created
//! under its name since).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use wasmctl_api::apps::{ReplicaSet, ReplicaSetStatus};
use wasmctl_api::core::Pod;
use wasmctl_api::meta::{DeleteOptions, ObjectMeta, OwnerReference};
use wasmctl_api::selector::Selector;

use super::cache::{split_key, Cache};
use super::{controller_key, ignore_gone, pods, replicasets, Ctx, Reconciler, WorkQueue};
use crate::error::ApiError;

/// At most this many pods are created or deleted per reconcile (Kubernetes' burstReplicas).
pub const BURST: usize = 500;
/// Creates and deletes in flight at once (each is one Raft write).
const CONCURRENCY: usize = 16;

/// What one reconcile of a ReplicaSet does.
#[derive(Debug, Default, PartialEq)]
pub struct RsPlan {
    /// Orphans that match the selector: take ownership.
    pub adopt: Vec<String>,
    /// Owned pods that no longer match: drop the ownerReference.
    pub release: Vec<String>,
    /// New pods to create from the template.
    pub create: usize,
    /// Pods to delete, most expendable first.
    pub delete: Vec<PodRef>,
    pub status: ReplicaSetStatus,
    /// Look again then (a ready pod becomes available after minReadySeconds).
    pub requeue_after: Option<Duration>,
}

/// A pod as the plan saw it: deleted only while it is still that pod (the uid), never one
/// re-created under its name since.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

/// Neither finished nor being deleted.
pub fn is_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Since when the pod's Ready condition has been True.
pub fn ready_since(p: &Pod) -> Option<DateTime<Utc>> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        c.last_transition_time
            .map(|t| t.0)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    )
}

/// Ready for at least `min_ready` (Kubernetes' "available").
pub fn is_available(p: &Pod, min_ready: i32, now: DateTime<Utc>) -> bool {
    ready_since(p).is_some_and(|t| {
        min_ready <= 0 || t + chrono::Duration::seconds(i64::from(min_ready)) <= now
    })
}

fn is_owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.controller().is_some_and(|o| o.uid == uid)
}

/// The set's selector; `None` (select nothing) if it is missing, invalid or empty.
fn selector(rs: &ReplicaSet) -> Option<Selector> {
    rs.spec
        .selector
        .as_ref()
        .and_then(|s| Selector::from_label_selector(s).ok())
        .filter(|s| !s.is_empty())
}

/// Whether a pod may be adopted by a set with `selector` (Kubernetes' ControllerRefManager):
/// it matches, is not being deleted and has no controller ownerReference. Other, non-controller
/// owner references do not prevent adoption (they are kept, see [`adopt`]). The one rule both
/// [`plan`] (which counts the pod as a replica) and the adoption write ([`adopt`]) apply, so
/// a pod is never counted, or deleted on scale-down, unless the write takes it.
pub(crate) fn adoptable(meta: &ObjectMeta, selector: &Selector) -> bool {
    selector.matches(&meta.labels)
        && meta.controller().is_none()
        && meta.deletion_timestamp.is_none()
}

/// The adoption write: `cur` (the stored pod) with `rs` added as its controller
/// (`controller: true`, `blockOwnerDeletion: true`) next to the owner references it already
/// has; refused if the pod is no longer [`adoptable`] (it gained a controller, is being
/// deleted, or no longer matches).
pub fn adopt(rs: &ReplicaSet, cur: &Value) -> Result<Value, ApiError> {
    let refused = || ApiError::BadRequest("no longer an orphan".into());
    let meta: ObjectMeta =
        serde_json::from_value(cur["metadata"].clone()).map_err(|_| refused())?;
    let selector = selector(rs).ok_or_else(refused)?;
    if rs.metadata.deletion_timestamp.is_some() || !adoptable(&meta, &selector) {
        return Err(refused());
    }
    let owner = new_pod(rs)["metadata"]["ownerReferences"][0].clone();
    Ok(with_controller_ref(cur, owner))
}

/// `cur` with `owner` (a controller reference) among its owner references: the other owners
/// stay, and a non-controller reference to the same owner becomes the controller reference.
pub(super) fn with_controller_ref(cur: &Value, owner: Value) -> Value {
    let mut refs: Vec<Value> = cur["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    refs.retain(|o| o["uid"] != owner["uid"]);
    refs.push(owner);
    let mut next = cur.clone();
    next["metadata"]["ownerReferences"] = Value::Array(refs);
    next
}

/// The decision for `rs`, given every pod of its namespace.
pub fn plan(rs: &ReplicaSet, pods: &[Pod], now: DateTime<Utc>) -> RsPlan {
    let mut out = RsPlan::default();
    let uid = rs.metadata.uid.as_deref().unwrap_or_default();
    let Some(selector) = selector(rs) else {
        return out;
    };
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let mut mine: Vec<&Pod> = Vec::new();
    for p in pods {
        let matches = selector.matches(&p.metadata.labels);
        if is_owned_by(&p.metadata, uid) {
            if matches {
                mine.push(p);
            } else {
                out.release.push(p.metadata.name.clone());
            }
        } else if !deleting && adoptable(&p.metadata, &selector) {
            out.adopt.push(p.metadata.name.clone());
            mine.push(p);
        }
    }
    let active: Vec<&Pod> = mine.iter().copied().filter(|p| is_active(p)).collect();
    let want = rs.spec.replicas.unwrap_or(1).max(0) as usize;
    if !deleting {
        if active.len() < want {
            out.create = (want - active.len()).min(BURST);
        } else if active.len() > want {
            let n = (active.len() - want).min(BURST);
            out.delete = deletion_order(&active, now)
                .into_iter()
                .take(n)
                .map(|p| PodRef {
                    name: p.metadata.name.clone(),
                    uid: p.metadata.uid.clone().unwrap_or_default(),
                })
                .collect();
        }
    }
    // The status describes the set after this reconcile: the pods it deletes no longer count
    // (a Deployment reading a stale, higher availability could scale down too far).
    let active: Vec<&Pod> = active
        .into_iter()
        .filter(|p| !out.delete.iter().any(|d| d.name == p.metadata.name))
        .collect();
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    let template_labels = &rs.spec.template.metadata.labels;
    let mut status = ReplicaSetStatus {
        replicas: active.len() as i32,
        observed_generation: rs.metadata.generation,
        conditions: rs
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    let (mut labeled, mut ready, mut available) = (0, 0, 0);
    for p in &active {
        if template_labels
            .iter()
            .all(|(k, v)| p.metadata.labels.get(k) == Some(v))
        {
            labeled += 1;
        }
        if let Some(since) = ready_since(p) {
            ready += 1;
            if is_available(p, min_ready, now) {
                available += 1;
            } else {
                let at = since + chrono::Duration::seconds(i64::from(min_ready));
                let wait = (at - now).to_std().unwrap_or_default() + Duration::from_millis(10);
                out.requeue_after = Some(out.requeue_after.map_or(wait, |w| w.min(wait)));
            }
        }
    }
    status.fully_labeled_replicas = Some(labeled);
    status.ready_replicas = Some(ready);
    status.available_replicas = Some(available);
    out.status = status;
    out
}

/// Active pods, most expendable first (Kubernetes' ActivePodsWithRanks): unscheduled, then
/// pending, then not ready, then on the node with most of this set's pods, then ready for
/// the shortest time, then most restarts, then newest.
pub fn deletion_order<'a>(active: &[&'a Pod], now: DateTime<Utc>) -> Vec<&'a Pod> {
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for p in active {
        if let Some(n) = p.spec.node_name.as_deref().filter(|n| !n.is_empty()) {
            *per_node.entry(n).or_default() += 1;
        }
    }
    let key = |p: &&'a Pod| {
        let node = p.spec.node_name.as_deref().filter(|n| !n.is_empty());
        let phase = match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Pending") | None => 0,
            Some("Running") => 2,
            _ => 1,
        };
        let ready = ready_since(p);
        let restarts: i32 = p
            .status
            .as_ref()
            .map(|s| s.container_statuses.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        (
            node.is_some(),
            phase,
            ready.is_some(),
            std::cmp::Reverse(node.map_or(0, |n| per_node[n])),
            // Ready longer sorts later (harder to replace).
            std::cmp::Reverse(ready.unwrap_or(now)),
            std::cmp::Reverse(restarts),
            std::cmp::Reverse(p.metadata.creation_timestamp),
            p.metadata.name.clone(),
        )
    };
    let mut v: Vec<&'a Pod> = active.to_vec();
    v.sort_by_cached_key(key);
    v
}

/// The pod a ReplicaSet creates from its template.
pub fn new_pod(rs: &ReplicaSet) -> Value {
    let t = &rs.spec.template;
    let owner = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.metadata.name.clone(),
        uid: rs.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{}-", rs.metadata.name),
            "namespace": rs.metadata.namespace,
            "labels": t.metadata.labels,
            "annotations": t.metadata.annotations,
            "ownerReferences": [owner],
        },
        "spec": t.spec,
    })
}

/// Enqueues the ReplicaSets a change concerns: the changed ReplicaSet itself, a pod's owner,
/// and for an orphan pod (no controller reference; it may have others) every ReplicaSet of
/// its namespace (one of them may adopt it).
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let rs_prefix = replicasets().key_prefix(None);
    let pod_prefix = pods().key_prefix(None);
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if ch.key.starts_with(&rs_prefix) {
            q.add(ch.key);
        } else if ch.key.starts_with(&pod_prefix) {
            for obj in [ch.old, ch.new].into_iter().flatten() {
                match controller_key(obj, replicasets()) {
                    Some(k) => q.add(&k),
                    None if !has_controller_ref(obj) => {
                        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
                            for k in cache.keys(&replicasets().key_prefix(Some(ns))) {
                                q.add(&k);
                            }
                        }
                    }
                    None => {}
                }
            }
        }
    });
}

/// Whether a stored object lists an ownerReference with `controller: true` (of any kind).
fn has_controller_ref(obj: &Value) -> bool {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|o| o["controller"] == Value::Bool(true)))
}

pub struct ReplicaSetController {
    ctx: Ctx,
}

impl ReplicaSetController {
    pub fn new(ctx: Ctx) -> Self {
        ReplicaSetController { ctx }
    }
}

/// The pods of a namespace, decoded.
pub fn namespace_pods(cache: &Cache, ns: &str) -> Vec<Pod> {
    cache
        .list(&pods().key_prefix(Some(ns)))
        .iter()
        .filter_map(|v| serde_json::from_value(Value::clone(v)).ok())
        .collect()
}

impl Reconciler for ReplicaSetController {
    const NAME: &'static str = "replicaset";

    fn resync_prefix(&self) -> Option<String> {
        Some(replicasets().key_prefix(None))
    }

    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let Some((ns, _)) = split_key(key) else {
            return Ok(None);
        };
        let Some(obj) = self.ctx.cache.get(key) else {
            return Ok(None); // deleted: the garbage collector handles its pods
        };
        let rs: ReplicaSet = serde_json::from_value(Value::clone(&obj))
            .map_err(|e| ApiError::Internal(format!("decoding {key}: {e}")))?;
        let pods = namespace_pods(&self.ctx.cache, ns);
        let p = plan(&rs, &pods, Utc::now());
        self.apply(&rs, ns, &p).await?;
        Ok(p.requeue_after)
    }
}

impl ReplicaSetController {
    async fn apply(&self, rs: &ReplicaSet, ns: &str, p: &RsPlan) -> Result<(), ApiError> {
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        let ctx = &self.ctx;
        // Pods whose adoption was refused or that are gone: the plan counted them, but this set
        // does not own them, so they are never deleted (their change requeues this set).
        let mut not_adopted: Vec<&str> = Vec::new();
        for name in &p.adopt {
            let res = ctx
                .update(pods(), Some(ns), name, |cur| adopt(rs, cur))
                .await;
            if matches!(
                res,
                Err(ApiError::NotFound { .. }) | Err(ApiError::BadRequest(_))
            ) {
                not_adopted.push(name);
            }
            ignore_gone(res)?;
        }
        for name in &p.release {
            let res = ctx
                .update(pods(), Some(ns), name, |cur| {
                    let mut next = cur.clone();
                    if let Some(refs) = next["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|o| o["uid"] != uid.as_str());
                        if refs.is_empty() {
                            if let Some(m) = next["metadata"].as_object_mut() {
                                m.remove("ownerReferences");
                            }
                        }
                    }
                    Ok(next)
                })
                .await;
            ignore_gone(res)?;
        }
        let mut failure: Option<ApiError> = None;
        if p.create > 0 {
            let body = new_pod(rs);
            let results: Vec<_> = stream::iter(0..p.create)
                .map(|_| ctx.create(pods(), ns, body.clone()))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            let failed: Vec<ApiError> = results.into_iter().filter_map(Result::err).collect();
            if let Some(e) = failed.into_iter().next() {
                failure = Some(e);
            }
        }
        if !p.delete.is_empty() {
            let delete: Vec<PodRef> = p
                .delete
                .iter()
                .filter(|d| !not_adopted.contains(&d.name.as_str()))
                .cloned()
                .collect();
            // With the uid the plan saw: a pod re-created under a deleted one's name (which
            // this set may not even own) is never deleted in its place.
            let results: Vec<_> = stream::iter(delete)
                .map(|d| async move {
                    let opts = DeleteOptions::default();
                    ctx.delete_uid(pods(), Some(ns), &d.name, &d.uid, opts)
                        .await
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                failure.get_or_insert(e);
            }
        }
        let mut status = p.status.clone();
        set_failure_condition(&mut status, failure.as_ref());
        let current = rs.status.clone().unwrap_or_default();
        if status != current {
            ignore_gone(
                ctx.patch_status(
                    replicasets(),
                    Some(ns),
                    &rs.metadata.name,
                    serde_json::to_value(&status).expect("status serialises"),
                )
                .await,
            )?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// `ReplicaFailure=True` while pods cannot be created or deleted (quota, invalid template).
fn set_failure_condition(status: &mut ReplicaSetStatus, failure: Option<&ApiError>) {
    let existing = status
        .conditions
        .iter()
        .position(|c| c.type_ == "ReplicaFailure");
    match (failure, existing) {
        (None, Some(i)) => {
            status.conditions.remove(i);
        }
        (Some(e), _) => {
            let message = e.to_string();
            if existing.is_some_and(|i| status.conditions[i].message.as_deref() == Some(&message)) {
                return;
            }
            if let Some(i) = existing {
                status.conditions.remove(i);
            }
            status
                .conditions
                .push(wasmctl_api::apps::DeploymentCondition {
                    type_: "ReplicaFailure".into(),
                    status: "True".into(),
                    last_transition_time: Some(wasmctl_api::Time::now()),
                    last_update_time: None,
                    reason: Some("FailedCreate".into()),
                    message: Some(message),
                });
        }
        (None, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use wasmctl_api::core::{PodCondition, PodStatus};
    use wasmctl_api::meta::{LabelSelector, Time};

    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(refs: &[PodRef]) -> Vec<&str> {
        refs.iter().map(|r| r.name.as_str()).collect()
    }

    /// Issue 11, item 21: scale-down deleted pods by name, so a pod re-created under the name
    /// of one the (stale) cache still showed was deleted in its place, though this set never
    /// owned it.
    #[tokio::test]
    async fn scale_down_never_deletes_a_pod_recreated_under_the_same_name() {
        use crate::controllers::tests::{open, stale_cache};
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        let ns = Some("default");
        let template = json!({"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "hello:v1"}]}});
        let set = objects
            .create(
                replicasets(),
                ns,
                json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": "web"}, "spec": {"replicas": 1,
                "selector": {"matchLabels": {"app": "web"}}, "template": template}}),
            )
            .await
            .unwrap();
        let owned = |name: &str, node: Option<&str>| {
            let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name,
                "labels": {"app": "web"}, "ownerReferences": [{"apiVersion": "apps/v1",
                "kind": "ReplicaSet", "name": "web", "uid": set["metadata"]["uid"],
                "controller": true, "blockOwnerDeletion": true}]},
                "spec": template["spec"].clone()});
            if let Some(n) = node {
                p["spec"]["nodeName"] = json!(n);
            }
            p
        };
        objects
            .create(pods(), ns, owned("a", Some("n1")))
            .await
            .unwrap();
        // Unscheduled: the first to go on scale-down.
        objects.create(pods(), ns, owned("b", None)).await.unwrap();
        let cache = stale_cache(&store).await;
        // Since the cache's view: `b` was deleted and someone else's pod took its name.
        let now = DeleteOptions {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        objects.delete(pods(), ns, "b", &now).await.unwrap();
        let theirs = objects
            .create(
                pods(),
                ns,
                json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "b", "labels": {"app": "other"}},
                "spec": template["spec"].clone()}),
            )
            .await
            .unwrap();

        let rsc = ReplicaSetController::new(Ctx::new(objects.clone(), cache));
        rsc.reconcile(&replicasets().key("default", "web"))
            .await
            .unwrap();
        let b = objects.get(pods(), ns, "b").await;
        assert_eq!(
            b.map(|v| v["metadata"]["uid"].clone()).ok(),
            Some(theirs["metadata"]["uid"].clone()),
            "scale-down deleted a pod the set never owned"
        );
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn rs(replicas: i32) -> ReplicaSet {
        let mut rs = ReplicaSet::default();
        rs.metadata.name = "web-abc".into();
        rs.metadata.namespace = Some("default".into());
        rs.metadata.uid = Some("rs-uid".into());
        rs.metadata.generation = Some(3);
        rs.spec.replicas = Some(replicas);
        rs.spec.selector = Some(LabelSelector {
            match_labels: labels(&[("app", "web")]),
            ..Default::default()
        });
        rs.spec.template.metadata.labels = labels(&[("app", "web")]);
        rs
    }

    fn pod(name: &str, owner: Option<&str>, node: Option<&str>, ready_at: Option<i64>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.namespace = Some("default".into());
        p.metadata.labels = labels(&[("app", "web")]);
        p.metadata.creation_timestamp = Some(Time(t(0)));
        if let Some(uid) = owner {
            p.metadata.owner_references.push(OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "web-abc".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            });
        }
        p.spec.node_name = node.map(str::to_string);
        let mut st = PodStatus {
            phase: Some(if node.is_some() { "Running" } else { "Pending" }.into()),
            ..Default::default()
        };
        if let Some(at) = ready_at {
            st.conditions.push(PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(Time(t(at))),
                ..Default::default()
            });
        }
        p.status = Some(st);
        p
    }

    #[test]
    fn creates_the_missing_pods() {
        let pods = vec![pod("a", Some("rs-uid"), Some("n1"), Some(0))];
        let p = plan(&rs(3), &pods, t(100));
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty());
        assert_eq!(p.status.replicas, 1);
        assert_eq!(p.status.ready_replicas, Some(1));
        assert_eq!(p.status.available_replicas, Some(1));
        assert_eq!(p.status.observed_generation, Some(3));
    }

    #[test]
    fn replaces_failed_and_deleting_pods() {
        let mut failed = pod("a", Some("rs-uid"), Some("n1"), None);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut going = pod("b", Some("rs-uid"), Some("n1"), Some(0));
        going.metadata.deletion_timestamp = Some(Time(t(50)));
        let p = plan(&rs(2), &[failed, going], t(100));
        assert_eq!(p.create, 2);
        assert_eq!(p.status.replicas, 0);
    }

    #[test]
    fn scale_down_deletes_unscheduled_then_not_ready_then_newest() {
        let mut newer = pod("ready-new", Some("rs-uid"), Some("n1"), Some(90));
        newer.metadata.creation_timestamp = Some(Time(t(80)));
        let pods = vec![
            pod("ready-old", Some("rs-uid"), Some("n1"), Some(10)),
            newer,
            pod("not-ready", Some("rs-uid"), Some("n2"), None),
            pod("unscheduled", Some("rs-uid"), None, None),
        ];
        let p = plan(&rs(1), &pods, t(100));
        assert_eq!(names(&p.delete), ["unscheduled", "not-ready", "ready-new"]);
        assert_eq!(p.create, 0);
        // The status already leaves out what this reconcile deletes.
        assert_eq!(p.status.replicas, 1);
        assert_eq!(p.status.available_replicas, Some(1));
    }

    #[test]
    fn scale_down_prefers_the_crowded_node() {
        let pods = vec![
            pod("alone", Some("rs-uid"), Some("n1"), Some(10)),
            pod("crowd-1", Some("rs-uid"), Some("n2"), Some(10)),
            pod("crowd-2", Some("rs-uid"), Some("n2"), Some(10)),
        ];
        let p = plan(&rs(2), &pods, t(100));
        assert_eq!(p.delete.len(), 1);
        assert!(p.delete[0].name.starts_with("crowd"));
    }

    #[test]
    fn adopts_matching_orphans_and_releases_non_matching() {
        let orphan = pod("orphan", None, Some("n1"), Some(0));
        let mut other = pod("other", None, Some("n1"), Some(0));
        other.metadata.labels = labels(&[("app", "db")]);
        let mut relabeled = pod("relabeled", Some("rs-uid"), Some("n1"), Some(0));
        relabeled.metadata.labels = labels(&[("app", "debug")]);
        let foreign = pod("foreign", Some("other-uid"), Some("n1"), Some(0));
        let p = plan(&rs(1), &[orphan, other, relabeled, foreign], t(100));
        assert_eq!(p.adopt, vec!["orphan"]);
        assert_eq!(p.release, vec!["relabeled"]);
        assert_eq!(p.create, 0);
        assert_eq!(p.status.replicas, 1);
    }

    /// Item 19 (issue 11): a matching pod with only non-controller owner references is
    /// counted by `plan` and must be taken by the adoption write (kube keeps the other
    /// references and adds a controller one); a pod with another controller is never
    /// adopted, counted or deleted.
    #[test]
    fn plan_and_adoption_write_agree_on_pods_with_non_controller_owners() {
        let non_controller = |uid: &str, controller: Option<bool>| OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "cfg".into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: None,
        };
        let mut shared = pod("shared", None, Some("n1"), Some(0));
        shared
            .metadata
            .owner_references
            .push(non_controller("cm-uid", None));
        let mut weak = pod("weak", None, Some("n1"), Some(0));
        weak.metadata
            .owner_references
            .push(non_controller("cm-uid", Some(false)));
        // Listed by this very set, but not as its controller.
        let mut ours_weakly = pod("ours-weakly", None, Some("n1"), Some(0));
        let mut r = non_controller("rs-uid", Some(false));
        r.kind = "ReplicaSet".into();
        ours_weakly.metadata.owner_references.push(r);
        let orphan = pod("orphan", None, Some("n1"), Some(0));
        let mut foreign = pod("foreign", Some("other-uid"), Some("n1"), Some(0));
        foreign
            .metadata
            .owner_references
            .insert(0, non_controller("cm-uid", None));
        let mut going = pod("going", None, Some("n1"), Some(0));
        going.metadata.deletion_timestamp = Some(Time(t(50)));
        let mut other_app = pod("other-app", None, Some("n1"), Some(0));
        other_app.metadata.labels = labels(&[("app", "db")]);
        let all = vec![shared, weak, ours_weakly, orphan, foreign, going, other_app];

        let set = rs(4);
        let p = plan(&set, &all, t(100));
        assert_eq!(p.adopt, vec!["shared", "weak", "ours-weakly", "orphan"]);
        assert_eq!(p.status.replicas, 4);
        // The write takes exactly the pods the plan counts.
        for pod in &all {
            let cur = serde_json::to_value(pod).unwrap();
            let planned = p.adopt.contains(&pod.metadata.name);
            let written = adopt(&set, &cur);
            assert_eq!(
                written.is_ok(),
                planned,
                "{}: plan adopts {planned}, write {written:?}",
                pod.metadata.name
            );
            let Ok(next) = written else { continue };
            let refs: Vec<OwnerReference> =
                serde_json::from_value(next["metadata"]["ownerReferences"].clone()).unwrap();
            let others: Vec<&OwnerReference> = pod
                .metadata
                .owner_references
                .iter()
                .filter(|o| o.uid != "rs-uid")
                .collect();
            assert_eq!(refs.len(), others.len() + 1, "{}", pod.metadata.name);
            for o in others {
                assert!(refs.contains(o), "{}: kept {o:?}", pod.metadata.name);
            }
            let ours: Vec<&OwnerReference> = refs.iter().filter(|o| o.uid == "rs-uid").collect();
            assert_eq!(ours.len(), 1);
            assert_eq!(ours[0].kind, "ReplicaSet");
            assert_eq!(ours[0].name, "web-abc");
            assert_eq!(ours[0].controller, Some(true));
            assert_eq!(ours[0].block_owner_deletion, Some(true));
            // Once adopted the pod is this set's own.
            let adopted: Pod = serde_json::from_value(next).unwrap();
            assert!(plan(&set, &[adopted], t(100)).adopt.is_empty());
        }
        // A deleting set adopts nothing, in the plan or the write.
        let mut deleting = rs(4);
        deleting.metadata.deletion_timestamp = Some(Time(t(1)));
        assert!(adopt(&deleting, &serde_json::to_value(&all[3]).unwrap()).is_err());

        // Scale-down only ever deletes pods the set controls or adopts, never `foreign`.
        let p = plan(&rs(0), &all, t(100));
        let mut deleted = names(&p.delete);
        deleted.sort();
        assert_eq!(deleted, vec!["orphan", "ours-weakly", "shared", "weak"]);
    }

    #[test]
    fn min_ready_seconds_delays_availability() {
        let mut r = rs(2);
        r.spec.min_ready_seconds = Some(30);
        let pods = vec![
            pod("a", Some("rs-uid"), Some("n1"), Some(0)),
            pod("b", Some("rs-uid"), Some("n1"), Some(90)),
        ];
        let p = plan(&r, &pods, t(100));
        assert_eq!(p.status.ready_replicas, Some(2));
        assert_eq!(p.status.available_replicas, Some(1));
        let wait = p.requeue_after.unwrap();
        assert!(wait >= Duration::from_secs(20) && wait <= Duration::from_secs(21));
    }

    #[test]
    fn a_deleting_set_neither_creates_nor_adopts() {
        let mut r = rs(3);
        r.metadata.deletion_timestamp = Some(Time(t(1)));
        let p = plan(&r, &[pod("orphan", None, Some("n1"), Some(0))], t(100));
        assert_eq!(p.create, 0);
        assert!(p.adopt.is_empty());
    }

    #[test]
    fn new_pods_carry_template_and_controller_reference() {
        let v = new_pod(&rs(1));
        assert_eq!(v["metadata"]["generateName"], "web-abc-");
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
        assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
    }
}
