//! The pod garbage collector: Kubernetes' PodGC (`pkg/controller/podgc`). It force-deletes
//! (grace 0, uid precondition) pods nothing else will ever finish: pods bound to a Node that
//! no longer exists (after a quarantine and a fresh read of the Node; they are first marked
//! `Failed` with `DisruptionTarget=True`, reason `DeletionByPodGC`), terminated pods beyond
//! `--terminated-pod-gc-threshold` (oldest first), and terminating pods never bound to a node.
//! [`plan`] decides from the cache and the time; [`PodGc`] re-checks the nodes and writes.
//!
//! One work item ([`KEY`]), reconciled every [`GC_PERIOD`] (kube's `gcCheckPeriod`) and
//! whenever a change may concern it: a Node deleted, a pod bound to a node the cache does not
//! have, a pod terminated, an unbound pod being deleted. A node's quarantine counts from the
//! first pass that found it missing, in this process (a restarted or new leader starts over,
//! as kube's in-memory queue does). Kube's out-of-service-taint pass (`gcTerminating`) is not
//! implemented: nothing sets that taint here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use wasmctl_api::meta::{DeleteOptions, Preconditions};

use super::nodelifecycle::{nodes, PodKey};
use super::{ignore_gone, pods, Cache, Ctx, Reconciler, WorkQueue};
use crate::error::ApiError;

/// The one key this controller reconciles.
pub const KEY: &str = "podgc";
/// Passes run at least this often (kube's `gcCheckPeriod`).
pub const GC_PERIOD: Duration = Duration::from_secs(20);
/// How long a node must stay missing before its pods are deleted (kube's `quarantineTime`).
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(40);
/// Terminated pods kept (kube-controller-manager's `--terminated-pod-gc-threshold`).
pub const DEFAULT_TERMINATED_THRESHOLD: usize = 12_500;
/// At most this many pods are deleted per pass; the rest in the next one, soon after.
pub const MAX_DELETIONS: usize = 500;
/// Pod writes in flight at once.
const CONCURRENCY: usize = 16;

/// The condition an orphaned pod gets before it is deleted (kube's, word for word).
pub const DISRUPTION_TARGET: &str = "DisruptionTarget";
pub const DELETION_BY_POD_GC: &str = "DeletionByPodGC";
pub const NODE_GONE_MESSAGE: &str = "PodGC: node no longer exists";

/// What [`plan`] needs to know of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSummary {
    pub key: PodKey,
    /// `spec.nodeName`, if bound.
    pub node: Option<String>,
    /// `status.phase` is `Succeeded` or `Failed`.
    pub terminated: bool,
    /// `Failed` with reason `Evicted` (kube's `PodIsEvicted`): collected first.
    pub evicted: bool,
    pub created: Option<DateTime<Utc>>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodSummary {
    /// From a stored pod; `None` without a name.
    pub fn of(v: &Value) -> Option<PodSummary> {
        let meta = &v["metadata"];
        let phase = v["status"]["phase"].as_str();
        Some(PodSummary {
            key: PodKey {
                namespace: meta["namespace"].as_str().unwrap_or_default().to_string(),
                name: meta["name"].as_str()?.to_string(),
                uid: meta["uid"].as_str().unwrap_or_default().to_string(),
            },
            node: v["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(str::to_string),
            terminated: matches!(phase, Some("Succeeded" | "Failed")),
            evicted: phase == Some("Failed") && v["status"]["reason"] == "Evicted",
            created: meta["creationTimestamp"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
            deleting: meta["deletionTimestamp"].is_string(),
        })
    }
}

/// The settings of a pass.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub quarantine: Duration,
    /// Terminated pods kept; 0 keeps them all.
    pub terminated_threshold: usize,
}

/// What one pass does.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Terminated pods beyond the threshold, evicted ones first, then oldest first.
    pub terminated: Vec<PodKey>,
    /// Per node missing for the whole quarantine, its pods: deleted once a fresh read of the
    /// store confirms the node is gone.
    pub orphaned: BTreeMap<String, Vec<PodKey>>,
    /// Terminating pods bound to no node (no agent will ever finish them).
    pub unscheduled_terminating: Vec<PodKey>,
    /// Since when each node that pods are bound to has been missing (the next pass's input).
    pub missing_since: HashMap<String, DateTime<Utc>>,
    /// Look again then: a quarantine ends, or more was due than one pass deletes.
    pub requeue_after: Option<Duration>,
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The decision for one pass (kube's `gcTerminated`, `gcOrphaned` and
/// `gcUnscheduledTerminating`, in that order), from the pods and node names the cache holds
/// and the quarantine book of the last pass. At most [`MAX_DELETIONS`] pods in all, each once.
pub fn plan(
    pods: &[PodSummary],
    nodes: &HashSet<String>,
    missing_since: &HashMap<String, DateTime<Utc>>,
    settings: Settings,
    now: DateTime<Utc>,
) -> Plan {
    let mut out = Plan::default();
    let mut budget = MAX_DELETIONS;
    let mut cut = false;
    let mut chosen: HashSet<&str> = HashSet::new();

    if settings.terminated_threshold > 0 {
        let mut terminated: Vec<&PodSummary> = pods.iter().filter(|p| p.terminated).collect();
        let excess = terminated
            .len()
            .saturating_sub(settings.terminated_threshold);
        if excess > 0 {
            // Kube's byEvictionAndCreationTimestamp (a pod without a creation time first).
            terminated.sort_by(|a, b| {
                b.evicted
                    .cmp(&a.evicted)
                    .then_with(|| a.created.cmp(&b.created))
                    .then_with(|| a.key.name.cmp(&b.key.name))
            });
            cut |= excess > budget;
            for p in terminated.into_iter().take(excess.min(budget)) {
                chosen.insert(&p.key.uid);
                out.terminated.push(p.key.clone());
            }
            budget -= out.terminated.len();
        }
    }

    let quarantine = chrono_duration(settings.quarantine);
    let mut next_end: Option<DateTime<Utc>> = None;
    for p in pods {
        let Some(node) = p.node.as_deref().filter(|n| !nodes.contains(*n)) else {
            continue;
        };
        let since = *out
            .missing_since
            .entry(node.to_string())
            .or_insert_with(|| missing_since.get(node).copied().unwrap_or(now));
        let end = since + quarantine;
        if end > now {
            next_end = Some(next_end.map_or(end, |e| e.min(end)));
            continue;
        }
        if chosen.contains(p.key.uid.as_str()) {
            continue;
        }
        if budget == 0 {
            cut = true;
            continue;
        }
        budget -= 1;
        chosen.insert(&p.key.uid);
        out.orphaned
            .entry(node.to_string())
            .or_default()
            .push(p.key.clone());
    }

    for p in pods.iter().filter(|p| p.deleting && p.node.is_none()) {
        if chosen.contains(p.key.uid.as_str()) {
            continue;
        }
        if budget == 0 {
            cut = true;
            break;
        }
        budget -= 1;
        chosen.insert(&p.key.uid);
        out.unscheduled_terminating.push(p.key.clone());
    }

    out.requeue_after = if cut {
        Some(Duration::from_millis(100))
    } else {
        next_end.map(|e| (e - now).to_std().unwrap_or_default() + Duration::from_millis(10))
    };
    out
}

/// The status of a pod PodGC deletes that has not terminated: `Failed`, with `condition` (if
/// any) added or replacing one of its type (kube's `markFailedAndDeletePodWithCondition`);
/// `None` if the pod has terminated already.
pub fn failed_status(pod: &Value, condition: Option<&Value>) -> Option<Value> {
    if matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let mut status = match &pod["status"] {
        Value::Object(_) => pod["status"].clone(),
        _ => json!({}),
    };
    status["phase"] = json!("Failed");
    if let Some(c) = condition {
        let mut conditions = status["conditions"].as_array().cloned().unwrap_or_default();
        match conditions.iter_mut().find(|x| x["type"] == c["type"]) {
            Some(x) => *x = c.clone(),
            None => conditions.push(c.clone()),
        }
        status["conditions"] = Value::Array(conditions);
    }
    Some(status)
}

/// `DisruptionTarget=True` (`DeletionByPodGC`) as of `now`.
pub fn node_gone_condition(now: DateTime<Utc>) -> Value {
    json!({
        "type": DISRUPTION_TARGET,
        "status": "True",
        "reason": DELETION_BY_POD_GC,
        "message": NODE_GONE_MESSAGE,
        "lastTransitionTime": wasmctl_api::Time(
            DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now)
        ),
    })
}

fn terminated(v: &Value) -> bool {
    matches!(v["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

/// Enqueues [`KEY`] on the changes a pass acts on: a Node deleted, a pod bound to a node the
/// cache does not have, a pod that terminated, an unbound pod being deleted.
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let node_prefix = nodes().key_prefix(None);
    let pod_prefix = pods().key_prefix(None);
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if ch.key.starts_with(&node_prefix) {
            if ch.new.is_none() {
                q.add(KEY);
            }
            return;
        }
        if !ch.key.starts_with(&pod_prefix) {
            return;
        }
        let Some(new) = ch.new else { return };
        let node = new["spec"]["nodeName"].as_str().filter(|n| !n.is_empty());
        let orphan = node.is_some_and(|n| cache.get(&nodes().key("", n)).is_none());
        let unbound_deleting = node.is_none() && new["metadata"]["deletionTimestamp"].is_string();
        let just_terminated = terminated(new) && !ch.old.is_some_and(|o| terminated(o));
        if orphan || unbound_deleting || just_terminated {
            q.add(KEY);
        }
    });
}

pub struct PodGc {
    ctx: Ctx,
    settings: Settings,
    /// Since when each missing node has been missing (the quarantine).
    missing_since: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl PodGc {
    pub fn new(ctx: Ctx, settings: Settings) -> Self {
        PodGc {
            ctx,
            settings,
            missing_since: Mutex::new(HashMap::new()),
        }
    }
}

impl Reconciler for PodGc {
    const NAME: &'static str = "podgc";

    fn resync_prefix(&self) -> Option<String> {
        None
    }

    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        if key != KEY {
            return Ok(None);
        }
        let now = Utc::now();
        let summaries: Vec<PodSummary> = self
            .ctx
            .cache
            .list(&pods().key_prefix(None))
            .iter()
            .filter_map(|v| PodSummary::of(v))
            .collect();
        let node_prefix = nodes().key_prefix(None);
        let node_names: HashSet<String> = self
            .ctx
            .cache
            .keys(&node_prefix)
            .into_iter()
            .filter_map(|k| k.strip_prefix(&node_prefix).map(str::to_string))
            .collect();
        let p = {
            let mut book = self.missing_since.lock().expect("missing_since lock");
            let p = plan(&summaries, &node_names, &book, self.settings, now);
            book.clone_from(&p.missing_since);
            p
        };
        let mut errors = Vec::new();

        for k in &p.terminated {
            tracing::info!(pod = %format!("{}/{}", k.namespace, k.name),
                threshold = self.settings.terminated_threshold,
                "PodGC: deleting a terminated pod beyond the threshold");
        }
        errors.extend(self.delete_all(&p.terminated, None).await);

        // The cache may lag: a node is gone only if a linearizable read says so.
        let mut orphaned = Vec::new();
        for (node, keys) in &p.orphaned {
            match self.ctx.objects.get(nodes(), None, node).await {
                Err(ApiError::NotFound { .. }) => {
                    for k in keys {
                        tracing::info!(pod = %format!("{}/{}", k.namespace, k.name), %node,
                            "PodGC: deleting a pod bound to a node that no longer exists");
                    }
                    orphaned.extend(keys.iter().cloned());
                }
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        let condition = node_gone_condition(now);
        errors.extend(self.delete_all(&orphaned, Some(&condition)).await);

        for k in &p.unscheduled_terminating {
            tracing::info!(pod = %format!("{}/{}", k.namespace, k.name),
                "PodGC: deleting a terminating pod bound to no node");
        }
        errors.extend(self.delete_all(&p.unscheduled_terminating, None).await);

        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        Ok(Some(
            p.requeue_after.map_or(GC_PERIOD, |d| d.min(GC_PERIOD)),
        ))
    }
}

impl PodGc {
    /// Marks each pod `Failed` (with `condition`) unless it terminated, best effort, then
    /// force-deletes it; returns the errors of the deletions.
    async fn delete_all(&self, keys: &[PodKey], condition: Option<&Value>) -> Vec<ApiError> {
        let results: Vec<Result<(), ApiError>> = stream::iter(keys.iter().cloned())
            .map(|k| async move {
                self.mark_failed(&k, condition).await;
                let opts = DeleteOptions {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(k.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match self
                    .ctx
                    .delete(pods(), Some(&k.namespace), &k.name, &opts)
                    .await
                {
                    // A conflict: the uid changed, this pod is gone.
                    Ok(()) | Err(ApiError::Conflict { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().filter_map(Result::err).collect()
    }

    /// Best effort: a failure is logged, the deletion goes ahead.
    async fn mark_failed(&self, k: &PodKey, condition: Option<&Value>) {
        let res = self
            .ctx
            .update(pods(), Some(&k.namespace), &k.name, |cur| {
                if cur["metadata"]["uid"].as_str() != Some(k.uid.as_str()) {
                    return Err(ApiError::BadRequest("replaced".into()));
                }
                let mut next = cur.clone();
                if let Some(status) = failed_status(cur, condition) {
                    next["status"] = status;
                }
                Ok(next)
            })
            .await;
        if let Err(e) = ignore_gone(res) {
            tracing::info!(pod = %format!("{}/{}", k.namespace, k.name), error = %e,
                "PodGC: could not mark the pod Failed before deleting it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    const SETTINGS: Settings = Settings {
        quarantine: Duration::from_secs(40),
        terminated_threshold: 2,
    };

    fn pod(name: &str, node: Option<&str>, phase: &str, created: i64) -> PodSummary {
        let mut v = json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("{name}-uid"),
                          "creationTimestamp": wasmctl_api::Time(t(created)) },
            "spec": {},
            "status": { "phase": phase },
        });
        if let Some(n) = node {
            v["spec"]["nodeName"] = json!(n);
        }
        PodSummary::of(&v).unwrap()
    }

    fn names(ks: &[PodKey]) -> Vec<&str> {
        ks.iter().map(|k| k.name.as_str()).collect()
    }

    fn node_set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn summaries_are_read_from_the_stored_pod() {
        let v = json!({
            "metadata": { "name": "p", "namespace": "ns", "uid": "u",
                          "creationTimestamp": "2026-01-02T03:04:05Z",
                          "deletionTimestamp": "2026-01-02T03:05:05Z" },
            "spec": { "nodeName": "" },
            "status": { "phase": "Failed", "reason": "Evicted" },
        });
        let s = PodSummary::of(&v).unwrap();
        assert_eq!(s.key.namespace, "ns");
        assert_eq!(s.key.uid, "u");
        assert_eq!(s.node, None, "an empty nodeName is unbound");
        assert!(s.terminated && s.evicted && s.deleting);
        assert_eq!(
            s.created,
            Some(
                DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
                    .unwrap()
                    .into()
            )
        );
        let running = pod("r", Some("n1"), "Running", 0);
        assert!(!running.terminated && !running.evicted && !running.deleting);
        assert!(PodSummary::of(&json!({"metadata": {}})).is_none());
    }

    #[test]
    fn terminated_pods_beyond_the_threshold_go_evicted_first_then_oldest_first() {
        let mut evicted = pod("evicted", Some("n1"), "Failed", 50);
        evicted.evicted = true;
        let pods = vec![
            pod("new-ok", Some("n1"), "Succeeded", 30),
            pod("old-failed", Some("n1"), "Failed", 10),
            pod("running", Some("n1"), "Running", 0),
            pod("mid-b", Some("n1"), "Succeeded", 20),
            pod("mid-a", Some("n1"), "Succeeded", 20),
            evicted,
        ];
        let nodes = node_set(&["n1"]);
        // Five terminated, two kept.
        let p = plan(&pods, &nodes, &HashMap::new(), SETTINGS, t(100));
        assert_eq!(names(&p.terminated), ["evicted", "old-failed", "mid-a"]);
        assert!(p.orphaned.is_empty() && p.unscheduled_terminating.is_empty());
        assert_eq!(p.requeue_after, None);
        // At the threshold: nothing.
        let s = Settings {
            terminated_threshold: 5,
            ..SETTINGS
        };
        assert!(plan(&pods, &nodes, &HashMap::new(), s, t(100))
            .terminated
            .is_empty());
        // 0 disables the pass.
        let s = Settings {
            terminated_threshold: 0,
            ..SETTINGS
        };
        assert!(plan(&pods, &nodes, &HashMap::new(), s, t(100))
            .terminated
            .is_empty());
    }

    #[test]
    fn pods_of_a_missing_node_wait_for_the_quarantine() {
        let pods = vec![
            pod("on-gone", Some("gone"), "Running", 0),
            pod("done-on-gone", Some("gone"), "Succeeded", 0),
            pod("on-live", Some("live"), "Running", 0),
            pod("pending", None, "Pending", 0),
        ];
        let nodes = node_set(&["live"]);
        // First seen missing now: quarantined for 40 s.
        let first = plan(&pods, &nodes, &HashMap::new(), SETTINGS, t(100));
        assert!(first.orphaned.is_empty());
        assert_eq!(
            first.missing_since,
            HashMap::from([("gone".into(), t(100))])
        );
        let wait = first.requeue_after.unwrap();
        assert!(
            wait >= Duration::from_secs(40) && wait < Duration::from_secs(41),
            "{wait:?}"
        );
        // Still within it: nothing; the book keeps the first time.
        let p = plan(&pods, &nodes, &first.missing_since, SETTINGS, t(139));
        assert!(p.orphaned.is_empty());
        assert_eq!(p.missing_since, first.missing_since);
        // After it: every pod bound to the node, terminated or not.
        let p = plan(&pods, &nodes, &first.missing_since, SETTINGS, t(140));
        assert_eq!(p.orphaned.len(), 1);
        assert_eq!(names(&p.orphaned["gone"]), ["on-gone", "done-on-gone"]);
        assert_eq!(p.orphaned["gone"][0].uid, "on-gone-uid");
        assert_eq!(p.requeue_after, None);
    }

    #[test]
    fn a_node_that_comes_back_or_loses_its_pods_leaves_the_quarantine() {
        let book = HashMap::from([("n1".to_string(), t(0)), ("n2".to_string(), t(0))]);
        // n1 is back; no pod is bound to n2 any more.
        let pods = vec![pod("a", Some("n1"), "Running", 0)];
        let p = plan(&pods, &node_set(&["n1"]), &book, SETTINGS, t(100));
        assert!(p.missing_since.is_empty());
        assert!(p.orphaned.is_empty());
        // n1 goes again later: a new quarantine.
        let p = plan(&pods, &node_set(&[]), &p.missing_since, SETTINGS, t(200));
        assert_eq!(p.missing_since["n1"], t(200));
        assert!(p.orphaned.is_empty());
    }

    #[test]
    fn terminating_pods_bound_to_no_node_go_at_once() {
        let mut unbound = pod("unbound", None, "Pending", 0);
        unbound.deleting = true;
        let mut bound = pod("bound", Some("n1"), "Running", 0);
        bound.deleting = true;
        let p = plan(
            &[unbound, bound, pod("waiting", None, "Pending", 0)],
            &node_set(&["n1"]),
            &HashMap::new(),
            SETTINGS,
            t(0),
        );
        assert_eq!(names(&p.unscheduled_terminating), ["unbound"]);
        assert!(p.terminated.is_empty() && p.orphaned.is_empty());
    }

    #[test]
    fn a_pod_is_planned_once_and_a_pass_is_bounded() {
        // A terminated, terminating, unbound pod beyond the threshold: deleted as terminated.
        let mut both = pod("both", None, "Failed", 0);
        both.deleting = true;
        let s = Settings {
            terminated_threshold: 1,
            ..SETTINGS
        };
        let p = plan(
            &[both, pod("kept", None, "Failed", 5)],
            &node_set(&[]),
            &HashMap::new(),
            s,
            t(0),
        );
        assert_eq!(names(&p.terminated), ["both"]);
        assert!(p.unscheduled_terminating.is_empty());

        // More due than a pass deletes: the oldest first, the rest soon.
        let pods: Vec<PodSummary> = (0..MAX_DELETIONS + 10)
            .map(|i| pod(&format!("p{i:04}"), Some("gone"), "Succeeded", i as i64))
            .collect();
        let book = HashMap::from([("gone".to_string(), t(0))]);
        let p = plan(&pods, &node_set(&[]), &book, s, t(100));
        assert_eq!(p.terminated.len(), MAX_DELETIONS);
        assert_eq!(p.terminated[0].name, "p0000");
        assert!(p.orphaned.is_empty(), "no budget left");
        assert_eq!(p.requeue_after, Some(Duration::from_millis(100)));
        // Without the threshold pass, the orphans are bounded the same way.
        let s = Settings {
            terminated_threshold: 0,
            ..SETTINGS
        };
        let p = plan(&pods, &node_set(&[]), &book, s, t(100));
        assert_eq!(p.orphaned["gone"].len(), MAX_DELETIONS);
        assert_eq!(p.requeue_after, Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_deleted_pod_is_marked_failed_with_the_disruption_condition() {
        let pod = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "DisruptionTarget", "status": "False"}]}});
        let c = node_gone_condition(t(0));
        let s = failed_status(&pod, Some(&c)).unwrap();
        assert_eq!(s["phase"], "Failed");
        assert_eq!(s["conditions"][0]["type"], "Ready");
        assert_eq!(s["conditions"].as_array().unwrap().len(), 2);
        let d = &s["conditions"][1];
        assert_eq!(d["type"], "DisruptionTarget");
        assert_eq!(d["status"], "True");
        assert_eq!(d["reason"], "DeletionByPodGC");
        assert_eq!(d["message"], "PodGC: node no longer exists");
        assert!(d["lastTransitionTime"].is_string(), "{d}");
        // Without a status, and without a condition.
        let s = failed_status(&json!({}), None).unwrap();
        assert_eq!(s, json!({"phase": "Failed"}));
        // A terminated pod keeps its status.
        assert_eq!(
            failed_status(&json!({"status": {"phase": "Succeeded"}}), Some(&c)),
            None
        );
    }
}
