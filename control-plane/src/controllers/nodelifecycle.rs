//! The node lifecycle controller: Kubernetes' node-lifecycle controller (node health from
//! Lease renewals, `Unknown` conditions, the `not-ready`/`unreachable` taints, pods marked
//! not Ready) and its taint-eviction controller (pods deleted once they no longer tolerate a
//! node's `NoExecute` taints) in one reconcile per node.
//!
//! [`plan_node`] decides a node's health, conditions and taints; [`plan_pods`] decides which
//! of its pods to mark not Ready and which to evict when; both are pure functions of the
//! objects and the time. [`NodeLifecycleController`] feeds them from the cache and writes.
//!
//! Health: the newest of the node Lease's `renewTime` (`acquireTime`), the `Ready` condition's
//! `lastHeartbeatTime` and the moment this controller first saw the node (a restarted control
//! plane does not condemn nodes whose renewals happened while it was down) is the node's
//! last heartbeat; older than the grace period (`--node-monitor-grace-period`, 40 s) → every
//! condition becomes `Unknown`. `Ready=Unknown` → `node.kubernetes.io/unreachable` taints,
//! `Ready=False` (the agent says so) → `node.kubernetes.io/not-ready` taints, `Ready=True` →
//! neither. The `NoExecute` taint carries `timeAdded`; a pod that tolerates every `NoExecute`
//! taint of its node is evicted at `timeAdded + min(tolerationSeconds)` (never if none of the
//! tolerations it used has `tolerationSeconds`), a pod that does not is evicted at once.
//! Eviction is an ordinary graceful delete: the pod keeps its `deletionTimestamp` until its
//! agent returns and finishes it, and its ReplicaSet replaces it meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use serde_json::Value;
use wasmctl_api::coordination::Lease;
use wasmctl_api::core::{Node, NodeCondition, Pod, PodCondition, Taint};
use wasmctl_api::meta::{DeleteOptions, Preconditions, Time};
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::validation::{TAINT_NOT_READY, TAINT_UNREACHABLE};

use super::{pods, Cache, Ctx, Reconciler, WorkQueue};
use crate::error::ApiError;
use crate::scheduler::tolerates;

/// The namespace of the nodes' heartbeat Leases (one per node, named after it).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// At most this many pods are evicted per reconcile of a node; the rest on the next one.
pub const MAX_EVICTIONS: usize = 500;
/// Pod writes in flight at once.
const CONCURRENCY: usize = 16;
/// The conditions an agent reports, all set `Unknown` when it stops reporting.
const CONDITION_TYPES: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];
const NO_EXECUTE: &str = "NoExecute";
const NO_SCHEDULE: &str = "NoSchedule";

pub fn nodes() -> &'static ResourceInfo {
    super::info("v1", "Node")
}
pub fn leases() -> &'static ResourceInfo {
    super::info("coordination.k8s.io/v1", "Lease")
}

/// A node's health as its `Ready` condition says after this controller's update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// `Ready=False`, reported by the agent.
    NotReady,
    /// `Ready=Unknown`: the agent stopped renewing its Lease.
    Unknown,
    /// No `Ready` condition yet, within the grace period: left alone.
    Starting,
}

/// What one reconcile changes on a node.
#[derive(Debug, PartialEq)]
pub struct NodePlan {
    pub health: Health,
    /// The new `status.conditions` (`None`: unchanged).
    pub conditions: Option<Vec<NodeCondition>>,
    /// The new `spec.taints` (`None`: unchanged).
    pub taints: Option<Vec<Taint>>,
    /// When the last heartbeat will be older than the grace period (look again then);
    /// `None` when it already is.
    pub stale_in: Option<Duration>,
}

/// A `Time` (second precision) of an instant.
fn time(t: DateTime<Utc>) -> Time {
    Time(DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t))
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The node's last sign of life: the newest of its Lease renewal, its `Ready` heartbeat and
/// `observed_since` (when this controller started watching it).
pub fn last_heartbeat(
    node: &Node,
    lease: Option<&Lease>,
    observed_since: DateTime<Utc>,
) -> DateTime<Utc> {
    let renewed = lease.and_then(|l| l.spec.renew_time.or(l.spec.acquire_time));
    let posted = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time);
    [renewed.map(|t| t.0), posted.map(|t| t.0)]
        .into_iter()
        .flatten()
        .fold(observed_since, DateTime::max)
}

/// The decision for one node (Kubernetes' `tryUpdateNodeHealth` plus the NoSchedule and
/// NoExecute tainting passes).
pub fn plan_node(
    node: &Node,
    lease: Option<&Lease>,
    observed_since: DateTime<Utc>,
    grace: Duration,
    now: DateTime<Utc>,
) -> NodePlan {
    let deadline = last_heartbeat(node, lease, observed_since) + chrono_duration(grace);
    let stale = deadline < now;
    let mut conditions = node
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    if stale {
        for type_ in CONDITION_TYPES {
            match conditions.iter_mut().find(|c| c.type_ == type_) {
                Some(c) if c.status == "Unknown" => {}
                Some(c) => {
                    c.status = "Unknown".into();
                    c.reason = Some("NodeStatusUnknown".into());
                    c.message = Some("Kubelet stopped posting node status.".into());
                    c.last_transition_time = Some(time(now));
                    changed = true;
                }
                None => {
                    conditions.push(NodeCondition {
                        type_: type_.into(),
                        status: "Unknown".into(),
                        last_heartbeat_time: node.metadata.creation_timestamp,
                        last_transition_time: Some(time(now)),
                        reason: Some("NodeStatusNeverUpdated".into()),
                        message: Some("Kubelet never posted node status.".into()),
                    });
                    changed = true;
                }
            }
        }
    }
    let health = health_of(&conditions);
    NodePlan {
        health,
        conditions: changed.then_some(conditions),
        taints: plan_taints(&node.spec.taints, health, now),
        stale_in: (!stale)
            .then(|| (deadline - now).to_std().unwrap_or_default() + Duration::from_millis(10)),
    }
}

/// The health a node's conditions say.
pub fn health_of(conditions: &[NodeCondition]) -> Health {
    match conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
    {
        Some("True") => Health::Ready,
        Some("False") => Health::NotReady,
        Some(_) => Health::Unknown,
        None => Health::Starting,
    }
}

/// The taints this controller owns.
fn is_managed(t: &Taint) -> bool {
    (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
        && (t.effect == NO_EXECUTE || t.effect == NO_SCHEDULE)
}

/// The node's taints for `health` (`None`: unchanged): existing taints are kept as they are
/// (with their `timeAdded`), missing ones added, the other managed ones removed.
pub fn plan_taints(existing: &[Taint], health: Health, now: DateTime<Utc>) -> Option<Vec<Taint>> {
    let key = match health {
        Health::Starting => return None,
        Health::Ready => None,
        Health::NotReady => Some(TAINT_NOT_READY),
        Health::Unknown => Some(TAINT_UNREACHABLE),
    };
    let wanted = |t: &Taint| Some(t.key.as_str()) == key;
    let mut out: Vec<Taint> = existing
        .iter()
        .filter(|t| !is_managed(t) || wanted(t))
        .cloned()
        .collect();
    if let Some(key) = key {
        for effect in [NO_EXECUTE, NO_SCHEDULE] {
            if !out.iter().any(|t| t.key == key && t.effect == effect) {
                out.push(Taint {
                    key: key.into(),
                    value: None,
                    effect: effect.into(),
                    time_added: (effect == NO_EXECUTE).then(|| time(now)),
                });
            }
        }
    }
    (out != existing).then_some(out)
}

/// When a pod on a node with `taints` must go (Kubernetes' taint-eviction controller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// A `NoExecute` taint is not tolerated.
    Now,
    /// Every `NoExecute` taint is tolerated, the shortest for `tolerationSeconds`.
    At(DateTime<Utc>),
    /// No `NoExecute` taint, or every one tolerated without `tolerationSeconds`.
    Never,
}

/// Kubernetes' `GetMatchingTolerations` + `getMinTolerationTime`: each `NoExecute` taint is
/// matched with the pod's first toleration of it; the pod is evicted at once if one is not
/// tolerated, else after the smallest `tolerationSeconds` of the matched tolerations (those
/// without it tolerate forever), counted from when the pod came under the taints: the
/// earliest `timeAdded` (a taint without one counts from `untimed_since`), or the pod's
/// creation if it came later.
pub fn eviction(pod: &Pod, taints: &[Taint], untimed_since: DateTime<Utc>) -> Eviction {
    let no_execute: Vec<&Taint> = taints.iter().filter(|t| t.effect == NO_EXECUTE).collect();
    let mut min_seconds: Option<i64> = None;
    for taint in &no_execute {
        let Some(tol) = pod.spec.tolerations.iter().find(|t| tolerates(t, taint)) else {
            return Eviction::Now;
        };
        if let Some(s) = tol.toleration_seconds {
            let s = s.max(0);
            min_seconds = Some(min_seconds.map_or(s, |m| m.min(s)));
        }
    }
    let Some(seconds) = min_seconds else {
        return Eviction::Never;
    };
    let tainted_since = no_execute
        .iter()
        .map(|t| t.time_added.map_or(untimed_since, |t| t.0))
        .min()
        .unwrap_or(untimed_since);
    let since = pod
        .metadata
        .creation_timestamp
        .map_or(tainted_since, |c| c.0.max(tainted_since));
    Eviction::At(since + chrono::Duration::seconds(seconds))
}

/// A pod's `Ready` condition set `False` (Kubernetes' `MarkPodsNotReady`); `None` if it has
/// no `Ready` condition or it is already `False`.
pub fn not_ready_conditions(
    conditions: &[PodCondition],
    now: DateTime<Utc>,
) -> Option<Vec<PodCondition>> {
    let i = conditions
        .iter()
        .position(|c| c.type_ == "Ready" && c.status != "False")?;
    let mut out = conditions.to_vec();
    out[i].status = "False".into();
    out[i].last_transition_time = Some(time(now));
    Some(out)
}

/// A pod as the writes name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodKey {
    fn of(p: &Pod) -> PodKey {
        PodKey {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone(),
            uid: p.metadata.uid.clone().unwrap_or_default(),
        }
    }
}

/// What one reconcile does to a node's pods.
#[derive(Debug, Default, PartialEq)]
pub struct PodsPlan {
    /// Pods whose `Ready` condition becomes `False`.
    pub not_ready: Vec<PodKey>,
    /// Pods to delete now, those due first (at most [`MAX_EVICTIONS`]).
    pub evict: Vec<PodKey>,
    /// Look again then: the next eviction is due, or more are due than one pass deletes.
    pub requeue_after: Option<Duration>,
}

/// The decision for the pods bound to a node whose health and taints (as stored) are given.
pub fn plan_pods(
    health: Health,
    taints: &[Taint],
    pods: &[Pod],
    untimed_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> PodsPlan {
    let mut out = PodsPlan::default();
    if matches!(health, Health::NotReady | Health::Unknown) {
        out.not_ready = pods
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| not_ready_conditions(&s.conditions, now).is_some())
            })
            .map(PodKey::of)
            .collect();
    }
    let mut due: Vec<(DateTime<Utc>, PodKey)> = Vec::new();
    let mut later: Option<DateTime<Utc>> = None;
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        match eviction(p, taints, untimed_since) {
            Eviction::Never => {}
            Eviction::Now => due.push((DateTime::<Utc>::MIN_UTC, PodKey::of(p))),
            Eviction::At(at) if at <= now => due.push((at, PodKey::of(p))),
            Eviction::At(at) => later = Some(later.map_or(at, |l| l.min(at))),
        }
    }
    due.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    if due.len() > MAX_EVICTIONS {
        out.requeue_after = Some(Duration::from_millis(100));
    } else if let Some(at) = later {
        out.requeue_after =
            Some((at - now).to_std().unwrap_or_default() + Duration::from_millis(10));
    }
    out.evict = due
        .into_iter()
        .take(MAX_EVICTIONS)
        .map(|(_, k)| k)
        .collect();
    out
}

/// Whether a node needs its pods looked at: a `NoExecute` taint or a `Ready` condition that
/// is not `True`.
fn needs_attention(node: &Value) -> bool {
    let tainted = node["spec"]["taints"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["effect"] == NO_EXECUTE));
    let unready = node["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .is_some_and(|c| c["status"] != "True");
    tainted || unready
}

/// Enqueues the node a change concerns: a Node, its Lease in `kube-node-lease`, or a pod
/// bound to a node that is tainted `NoExecute` or not Ready.
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let node_prefix = nodes().key_prefix(None);
    let lease_prefix = leases().key_prefix(Some(NODE_LEASE_NAMESPACE));
    let pod_prefix = pods().key_prefix(None);
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if ch.key.starts_with(&node_prefix) {
            q.add(ch.key);
        } else if let Some(name) = ch.key.strip_prefix(&lease_prefix) {
            q.add(&nodes().key("", name));
        } else if ch.key.starts_with(&pod_prefix) {
            let Some(node) = ch.new.and_then(|p| p["spec"]["nodeName"].as_str()) else {
                return;
            };
            let key = nodes().key("", node);
            if cache.get(&key).is_some_and(|n| needs_attention(&n)) {
                q.add(&key);
            }
        }
    });
}

pub struct NodeLifecycleController {
    ctx: Ctx,
    grace: Duration,
    /// When this controller first saw each node (the startup grace).
    first_seen: Mutex<HashMap<String, DateTime<Utc>>>,
    /// The Raft term in which `first_seen` was filled: a new term means this server has
    /// just taken over as leader, and, as kube-controller-manager after a restart, it gives
    /// every node a fresh grace period instead of trusting heartbeats it never watched
    /// arrive (else a failover after a quiet spell would evict every node's pods).
    leading_term: Mutex<Option<u64>>,
}

impl NodeLifecycleController {
    pub fn new(ctx: Ctx, grace: Duration) -> Self {
        NodeLifecycleController {
            ctx,
            grace,
            first_seen: Mutex::new(HashMap::new()),
            leading_term: Mutex::new(None),
        }
    }

    /// Forgets `first_seen` when leadership was taken in a new term.
    fn on_term(&self, term: u64) {
        let mut leading = self.leading_term.lock().expect("leading_term lock");
        if *leading != Some(term) {
            if leading.is_some() {
                tracing::info!(
                    term,
                    "leading in a new term: every node gets a fresh grace period"
                );
            }
            *leading = Some(term);
            self.first_seen.lock().expect("first_seen lock").clear();
        }
    }

    fn observed_since(&self, name: &str, now: DateTime<Utc>) -> DateTime<Utc> {
        *self
            .first_seen
            .lock()
            .expect("first_seen lock")
            .entry(name.to_string())
            .or_insert(now)
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T, ApiError> {
    serde_json::from_value(v.clone())
        .map_err(|e| ApiError::Internal(format!("decoding {what}: {e}")))
}

impl Reconciler for NodeLifecycleController {
    const NAME: &'static str = "nodelifecycle";

    fn resync_prefix(&self) -> Option<String> {
        Some(nodes().key_prefix(None))
    }

    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let Some(name) = key.strip_prefix(&nodes().key_prefix(None)) else {
            return Ok(None);
        };
        let Some(obj) = self.ctx.cache.get(key) else {
            self.first_seen
                .lock()
                .expect("first_seen lock")
                .remove(name);
            return Ok(None);
        };
        self.on_term(self.ctx.objects.store().status().term);
        let now = Utc::now();
        let since = self.observed_since(name, now);
        let mut node: Node = decode(&obj, key)?;
        let lease: Option<Lease> = self
            .ctx
            .cache
            .get(&leases().key(NODE_LEASE_NAMESPACE, name))
            .and_then(|v| serde_json::from_value(Value::clone(&v)).ok());
        let mut plan = plan_node(&node, lease.as_ref(), since, self.grace, now);
        if plan.conditions.is_some() || plan.taints.is_some() {
            let before = health_of(node.status.as_ref().map_or(&[], |s| &s.conditions));
            // Re-planned on the stored node, so a status the agent just posted wins.
            let res = self
                .ctx
                .update(nodes(), None, name, |cur| {
                    let cur_node: Node = decode(cur, name)?;
                    let p = plan_node(&cur_node, lease.as_ref(), since, self.grace, now);
                    let mut next = cur.clone();
                    if let Some(c) = p.conditions {
                        next["status"]["conditions"] =
                            serde_json::to_value(c).expect("conditions serialise");
                    }
                    if let Some(t) = p.taints {
                        next["spec"]["taints"] = serde_json::to_value(t).expect("taints serialise");
                    }
                    Ok(next)
                })
                .await;
            let written = match res {
                Ok(v) => v,
                Err(ApiError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            node = decode(&written, key)?;
            plan = plan_node(&node, lease.as_ref(), since, self.grace, now);
            match plan.health {
                Health::Unknown => {
                    tracing::warn!(node = %name, "node stopped renewing its lease: Ready=Unknown, tainted unreachable")
                }
                Health::NotReady => {
                    tracing::warn!(node = %name, "node is not ready: tainted not-ready")
                }
                Health::Ready => {
                    tracing::info!(node = %name, was = ?before, "node is ready again: taints removed")
                }
                Health::Starting => {}
            }
        }
        let tainted = node.spec.taints.iter().any(|t| t.effect == NO_EXECUTE);
        if plan.health == Health::Ready && !tainted {
            return Ok(plan.stale_in);
        }
        let pods: Vec<Pod> = self
            .ctx
            .cache
            .list(&pods().key_prefix(None))
            .iter()
            .filter(|v| v["spec"]["nodeName"].as_str() == Some(name))
            .filter_map(|v| serde_json::from_value(Value::clone(v)).ok())
            .collect();
        let pp = plan_pods(plan.health, &node.spec.taints, &pods, since, now);
        self.apply_pods(name, &pp, now).await?;
        Ok(match (plan.stale_in, pp.requeue_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }
}

impl NodeLifecycleController {
    async fn apply_pods(
        &self,
        node: &str,
        p: &PodsPlan,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let ctx = &self.ctx;
        let marked: Vec<Result<(), ApiError>> = stream::iter(p.not_ready.clone())
            .map(|k| async move {
                let res = ctx
                    .update(pods(), Some(&k.namespace), &k.name, |cur| {
                        let pod: Pod = decode(cur, &k.name)?;
                        let mut next = cur.clone();
                        let conditions = pod.status.map(|s| s.conditions).unwrap_or_default();
                        if pod.metadata.uid.as_deref() == Some(k.uid.as_str()) {
                            if let Some(c) = not_ready_conditions(&conditions, now) {
                                next["status"]["conditions"] =
                                    serde_json::to_value(c).expect("conditions serialise");
                            }
                        }
                        Ok(next)
                    })
                    .await;
                match res {
                    Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let evicted: Vec<Result<(), ApiError>> = stream::iter(p.evict.clone())
            .map(|k| async move {
                tracing::info!(pod = %format!("{}/{}", k.namespace, k.name), node = %node,
                    "evicting pod: it does not tolerate the node's NoExecute taints (any longer)");
                let opts = DeleteOptions {
                    preconditions: Some(Preconditions {
                        uid: Some(k.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match ctx.delete(pods(), Some(&k.namespace), &k.name, &opts).await {
                    // A conflict: the uid changed, this pod is gone.
                    Ok(()) | Err(ApiError::Conflict { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        marked
            .into_iter()
            .chain(evicted)
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmctl_api::core::{PodStatus, Toleration};
    use wasmctl_api::meta::MicroTime;

    const GRACE: Duration = Duration::from_secs(40);

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn cond(type_: &str, status: &str, heartbeat: i64) -> NodeCondition {
        NodeCondition {
            type_: type_.into(),
            status: status.into(),
            last_heartbeat_time: Some(Time(t(heartbeat))),
            last_transition_time: Some(Time(t(0))),
            reason: Some("KubeletReady".into()),
            message: Some("ok".into()),
        }
    }

    /// A node whose agent reported `ready` at `heartbeat`, with all four conditions.
    fn node(ready: &str, heartbeat: i64) -> Node {
        let mut n = Node::default();
        n.metadata.name = "n1".into();
        n.metadata.creation_timestamp = Some(Time(t(0)));
        n.status = Some(wasmctl_api::core::NodeStatus {
            conditions: vec![
                cond("MemoryPressure", "False", heartbeat),
                cond("DiskPressure", "False", heartbeat),
                cond("PIDPressure", "False", heartbeat),
                cond("Ready", ready, heartbeat),
            ],
            ..Default::default()
        });
        n
    }

    fn lease(renewed: i64) -> Lease {
        let mut l = Lease::default();
        l.spec.acquire_time = Some(MicroTime(t(0)));
        l.spec.renew_time = Some(MicroTime(t(renewed)));
        l
    }

    fn taint(key: &str, effect: &str, added: Option<i64>) -> Taint {
        Taint {
            key: key.into(),
            value: None,
            effect: effect.into(),
            time_added: added.map(|s| Time(t(s))),
        }
    }

    fn keys(ts: &[Taint]) -> Vec<String> {
        ts.iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect()
    }

    fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            value: None,
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
        }
    }

    fn pod(name: &str, tolerations: Vec<Toleration>, created: i64) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.namespace = Some("default".into());
        p.metadata.uid = Some(format!("{name}-uid"));
        p.metadata.creation_timestamp = Some(Time(t(created)));
        p.spec.node_name = Some("n1".into());
        p.spec.tolerations = tolerations;
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(Time(t(1))),
                ..Default::default()
            }],
            ..Default::default()
        });
        p
    }

    #[test]
    fn a_fresh_lease_keeps_the_node_as_it_is() {
        let n = node("True", 0);
        let p = plan_node(&n, Some(&lease(95)), t(0), GRACE, t(100));
        assert_eq!(p.health, Health::Ready);
        assert_eq!(p.conditions, None);
        assert_eq!(p.taints, None);
        // Stale when the lease is 40 s old: at t(135).
        let wait = p.stale_in.unwrap();
        assert!(
            wait >= Duration::from_secs(35) && wait < Duration::from_secs(36),
            "{wait:?}"
        );
    }

    #[test]
    fn a_stale_lease_makes_every_condition_unknown_and_taints_unreachable() {
        let n = node("True", 10);
        let p = plan_node(&n, Some(&lease(50)), t(0), GRACE, t(100));
        assert_eq!(p.health, Health::Unknown);
        assert_eq!(p.stale_in, None);
        let conds = p.conditions.unwrap();
        assert_eq!(conds.len(), 4);
        for c in &conds {
            assert_eq!(c.status, "Unknown", "{}", c.type_);
            assert_eq!(c.reason.as_deref(), Some("NodeStatusUnknown"));
            assert_eq!(
                c.message.as_deref(),
                Some("Kubelet stopped posting node status.")
            );
            assert_eq!(c.last_transition_time, Some(Time(t(100))));
            // The heartbeat is the agent's; it is not touched.
            assert_eq!(c.last_heartbeat_time, Some(Time(t(10))));
        }
        let taints = p.taints.unwrap();
        assert_eq!(
            keys(&taints),
            [
                "node.kubernetes.io/unreachable:NoExecute",
                "node.kubernetes.io/unreachable:NoSchedule"
            ]
        );
        assert_eq!(taints[0].time_added, Some(Time(t(100))));
        assert_eq!(taints[1].time_added, None);
    }

    #[test]
    fn an_unknown_node_is_planned_once() {
        let mut n = node("True", 10);
        let first = plan_node(&n, Some(&lease(50)), t(0), GRACE, t(100));
        n.status.as_mut().unwrap().conditions = first.conditions.unwrap();
        n.spec.taints = first.taints.unwrap();
        let again = plan_node(&n, Some(&lease(50)), t(0), GRACE, t(200));
        assert_eq!(again.health, Health::Unknown);
        assert_eq!(again.conditions, None);
        assert_eq!(again.taints, None, "taints keep their timeAdded");
    }

    #[test]
    fn without_a_lease_the_ready_heartbeat_counts() {
        let n = node("True", 70);
        assert_eq!(
            plan_node(&n, None, t(0), GRACE, t(100)).health,
            Health::Ready
        );
        assert_eq!(
            plan_node(&n, None, t(0), GRACE, t(111)).health,
            Health::Unknown
        );
    }

    #[test]
    fn startup_grace_counts_from_when_the_controller_first_saw_the_node() {
        // The lease is an hour old, but this controller only started watching at t(3590).
        let n = node("True", 0);
        let p = plan_node(&n, Some(&lease(0)), t(3590), GRACE, t(3600));
        assert_eq!(p.health, Health::Ready);
        assert_eq!(p.conditions, None);
        let p = plan_node(&n, Some(&lease(0)), t(3590), GRACE, t(3631));
        assert_eq!(p.health, Health::Unknown);
    }

    #[test]
    fn a_node_that_never_posted_status_gets_unknown_conditions_after_the_grace() {
        let mut n = Node::default();
        n.metadata.name = "n1".into();
        n.metadata.creation_timestamp = Some(Time(t(0)));
        let p = plan_node(&n, None, t(0), GRACE, t(10));
        assert_eq!(p.health, Health::Starting);
        assert_eq!(p.taints, None);
        let p = plan_node(&n, None, t(0), GRACE, t(50));
        let conds = p.conditions.unwrap();
        assert_eq!(conds.len(), 4);
        assert!(conds
            .iter()
            .all(|c| c.reason.as_deref() == Some("NodeStatusNeverUpdated")
                && c.last_heartbeat_time == Some(Time(t(0)))));
        assert_eq!(p.health, Health::Unknown);
    }

    #[test]
    fn ready_false_from_the_agent_taints_not_ready() {
        let n = node("False", 95);
        let p = plan_node(&n, Some(&lease(95)), t(0), GRACE, t(100));
        assert_eq!(p.health, Health::NotReady);
        assert_eq!(p.conditions, None);
        assert_eq!(
            keys(&p.taints.unwrap()),
            [
                "node.kubernetes.io/not-ready:NoExecute",
                "node.kubernetes.io/not-ready:NoSchedule"
            ]
        );
    }

    #[test]
    fn not_ready_becoming_unreachable_swaps_the_taints() {
        let mut n = node("False", 10);
        n.spec.taints = vec![
            taint("dedicated", "NoSchedule", None),
            taint(TAINT_NOT_READY, NO_EXECUTE, Some(20)),
            taint(TAINT_NOT_READY, NO_SCHEDULE, None),
        ];
        let p = plan_node(&n, Some(&lease(10)), t(0), GRACE, t(100));
        assert_eq!(p.health, Health::Unknown);
        assert_eq!(
            keys(&p.taints.unwrap()),
            [
                "dedicated:NoSchedule",
                "node.kubernetes.io/unreachable:NoExecute",
                "node.kubernetes.io/unreachable:NoSchedule"
            ]
        );
    }

    #[test]
    fn healthy_again_removes_only_the_managed_taints() {
        let mut n = node("True", 100);
        n.spec.taints = vec![
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(20)),
            taint("dedicated", "NoExecute", Some(5)),
            taint(TAINT_UNREACHABLE, NO_SCHEDULE, None),
        ];
        let p = plan_node(&n, Some(&lease(100)), t(0), GRACE, t(101));
        assert_eq!(p.health, Health::Ready);
        assert_eq!(keys(&p.taints.unwrap()), ["dedicated:NoExecute"]);
    }

    #[test]
    fn a_fresh_lease_with_ready_unknown_stays_tainted_until_the_agent_reports() {
        // The agent renews again, but the Ready condition is still the controller's Unknown.
        let mut n = node("Unknown", 10);
        n.spec.taints = vec![
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(60)),
            taint(TAINT_UNREACHABLE, NO_SCHEDULE, None),
        ];
        let p = plan_node(&n, Some(&lease(99)), t(0), GRACE, t(100));
        assert_eq!(p.health, Health::Unknown);
        assert_eq!(p.taints, None);
        assert_eq!(p.conditions, None);
        assert!(p.stale_in.is_some());
    }

    #[test]
    fn eviction_times_follow_the_tolerations() {
        let unreachable = [
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(100)),
            taint(TAINT_UNREACHABLE, NO_SCHEDULE, None),
        ];
        // No toleration of the taint: at once.
        assert_eq!(
            eviction(&pod("none", vec![], 0), &unreachable, t(0)),
            Eviction::Now
        );
        // A toleration of another key does not help.
        let other = pod("other", vec![toleration(TAINT_NOT_READY, Some(300))], 0);
        assert_eq!(eviction(&other, &unreachable, t(0)), Eviction::Now);
        // tolerationSeconds after timeAdded.
        let timed = pod("timed", vec![toleration(TAINT_UNREACHABLE, Some(300))], 0);
        assert_eq!(eviction(&timed, &unreachable, t(0)), Eviction::At(t(400)));
        // Without tolerationSeconds: forever.
        let forever = pod("forever", vec![toleration(TAINT_UNREACHABLE, None)], 0);
        assert_eq!(eviction(&forever, &unreachable, t(0)), Eviction::Never);
        // Negative seconds count as zero.
        let negative = pod("neg", vec![toleration(TAINT_UNREACHABLE, Some(-5))], 0);
        assert_eq!(
            eviction(&negative, &unreachable, t(0)),
            Eviction::At(t(100))
        );
        // No NoExecute taints: never.
        assert_eq!(
            eviction(&pod("none", vec![], 0), &unreachable[1..], t(0)),
            Eviction::Never
        );
        // A pod created after the taint counts from its creation.
        let late = pod("late", vec![toleration(TAINT_UNREACHABLE, Some(300))], 150);
        assert_eq!(eviction(&late, &unreachable, t(0)), Eviction::At(t(450)));
        // A taint without timeAdded counts from when the controller saw the node.
        let untimed = [taint("dedicated", NO_EXECUTE, None)];
        let tolerant = pod("t", vec![toleration("dedicated", Some(10))], 0);
        assert_eq!(eviction(&tolerant, &untimed, t(50)), Eviction::At(t(60)));
    }

    #[test]
    fn eviction_uses_the_shortest_of_the_matched_tolerations() {
        let taints = [
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(100)),
            taint("dedicated", NO_EXECUTE, Some(200)),
        ];
        let both = pod(
            "both",
            vec![
                toleration(TAINT_UNREACHABLE, Some(300)),
                toleration("dedicated", Some(30)),
            ],
            0,
        );
        // From the earliest taint: 100 + 30.
        assert_eq!(eviction(&both, &taints, t(0)), Eviction::At(t(130)));
        // One tolerated forever, the other for 60 s: 60 s wins.
        let mixed = pod(
            "mixed",
            vec![
                toleration(TAINT_UNREACHABLE, None),
                toleration("dedicated", Some(60)),
            ],
            0,
        );
        assert_eq!(eviction(&mixed, &taints, t(0)), Eviction::At(t(160)));
        // Only one of the two tolerated: at once.
        let one = pod("one", vec![toleration(TAINT_UNREACHABLE, None)], 0);
        assert_eq!(eviction(&one, &taints, t(0)), Eviction::Now);
        // The first matching toleration is the one used (Kubernetes' GetMatchingTolerations).
        let first = pod(
            "first",
            vec![
                toleration(TAINT_UNREACHABLE, None),
                toleration(TAINT_UNREACHABLE, Some(5)),
                toleration("dedicated", None),
            ],
            0,
        );
        assert_eq!(eviction(&first, &taints, t(0)), Eviction::Never);
    }

    #[test]
    fn pods_of_an_unreachable_node_are_marked_not_ready_and_evicted_in_time() {
        let taints = [
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(100)),
            taint(TAINT_UNREACHABLE, NO_SCHEDULE, None),
        ];
        let mut gone = pod("gone", vec![], 0);
        gone.metadata.deletion_timestamp = Some(Time(t(101)));
        let mut already = pod("already", vec![toleration(TAINT_UNREACHABLE, None)], 0);
        already.status.as_mut().unwrap().conditions[0].status = "False".into();
        let pods = vec![
            pod("untolerated", vec![], 0),
            pod("short", vec![toleration(TAINT_UNREACHABLE, Some(2))], 0),
            pod("long", vec![toleration(TAINT_UNREACHABLE, Some(300))], 0),
            pod("forever", vec![toleration(TAINT_UNREACHABLE, None)], 0),
            gone,
            already,
        ];
        let p = plan_pods(Health::Unknown, &taints, &pods, t(0), t(101));
        let names = |ks: &[PodKey]| ks.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&p.not_ready),
            ["untolerated", "short", "long", "forever", "gone"]
        );
        assert_eq!(names(&p.evict), ["untolerated"]);
        // "short" is due at t(102): look again in about a second.
        let wait = p.requeue_after.unwrap();
        assert!(
            wait >= Duration::from_secs(1) && wait < Duration::from_secs(2),
            "{wait:?}"
        );

        let p = plan_pods(Health::Unknown, &taints, &pods, t(0), t(102));
        assert_eq!(names(&p.evict), ["untolerated", "short"]);
        assert_eq!(p.evict[1].uid, "short-uid");
        let wait = p.requeue_after.unwrap();
        assert!(wait >= Duration::from_secs(298), "{wait:?}");
    }

    #[test]
    fn a_ready_node_with_a_user_noexecute_taint_evicts_but_marks_nothing() {
        let taints = [taint("dedicated", NO_EXECUTE, Some(0))];
        let pods = vec![pod("a", vec![], 0)];
        let p = plan_pods(Health::Ready, &taints, &pods, t(0), t(1));
        assert!(p.not_ready.is_empty());
        assert_eq!(p.evict.len(), 1);
    }

    #[test]
    fn evictions_per_pass_are_bounded() {
        let taints = [taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(0))];
        let pods: Vec<Pod> = (0..MAX_EVICTIONS + 3)
            .map(|i| pod(&format!("p{i:04}"), vec![], 0))
            .collect();
        let p = plan_pods(Health::Unknown, &taints, &pods, t(0), t(1));
        assert_eq!(p.evict.len(), MAX_EVICTIONS);
        assert_eq!(p.requeue_after, Some(Duration::from_millis(100)));
    }

    #[test]
    fn not_ready_conditions_only_touch_ready() {
        let now = t(50);
        let conds = vec![
            PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                ..Default::default()
            },
            PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: None,
                ..Default::default()
            },
        ];
        let out = not_ready_conditions(&conds, now).unwrap();
        assert_eq!(out[0], conds[0]);
        assert_eq!(out[1].status, "False");
        assert_eq!(out[1].last_transition_time, Some(Time(now)));
        assert_eq!(not_ready_conditions(&out, now), None);
        assert_eq!(not_ready_conditions(&conds[..1], now), None);
    }
}
