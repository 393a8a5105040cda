//! The scheduler's thin runtime around the pure [`crate::scheduler::schedule`]. It runs on the
//! Raft leader only (passes are skipped while this node is not the leader; with one voter it
//! always is), wakes on pod and node changes in the store (and every few seconds), and in each
//! pass reads all nodes and pods straight from the store, every page of both as of one store
//! revision (so a pass never sees a pod bound to a node its node list predates, or a pod
//! twice), places the pending pods one after
//! another on one [`ClusterView`] (accounting each placement) and writes the outcome in batches
//! of up to [`BATCH`] writes per Raft entry:
//! - a binding is a compare-and-set of the pod at the revision that was listed (the pod is
//!   still unbound and not being deleted), so it is safe against a concurrent
//!   `pods/{name}/binding`, update or delete; a lost race is retried in the next pass, which
//!   the pod's change triggers anyway;
//! - a binding names only a Node of the pass's own listing, read from the store just before
//!   the decisions. A Node deleted after that read can still receive the pods of the batch in
//!   flight: the store's writes take preconditions on their own key only (no guard on another
//!   key), so that small race is accepted, as in Kubernetes, and PodGC
//!   ([`crate::controllers::podgc`]) deletes such pods after its quarantine;
//! - a pod that fits nowhere gets `PodScheduled=False` (`Unschedulable`, kube-scheduler's
//!   message) and, once that is written, a `FailedScheduling` Warning Event; both only when the
//!   message changed, so an unschedulable pod costs one write and one event per distinct
//!   reason, not one per pass.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{Node, Pod, PodCondition, PodStatus};
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_api::Time;
use wasmctl_store::{KeyValue, StoreError};

use crate::error::ApiError;
use crate::objects::{encode_object, BatchWrite, Objects};
use crate::scheduler::{schedule, ClusterView, Decision, NodeInfo, PodRequest};

/// Passes run at least this often (retries of unschedulable pods, missed wake-ups, and how
/// soon a new leader starts scheduling).
const RESYNC: Duration = Duration::from_secs(5);

/// Writes per Raft entry. One entry is one log append and fsync, so bindings in batches of
/// 1,000 cost ~1/1,000 of an fsync each; larger entries gain little more, while a pod is ~1 KB
/// stored, so an entry is already ~1 MB to append, apply and fan out to watchers (whose live
/// backlog is bounded, 8,192 events by default) before the next one is sent.
pub const BATCH: usize = 1000;

/// Decisions between two yields to the runtime (~1–2 ms of CPU with 1,000 nodes).
const YIELD_EVERY: usize = 64;

/// Keys read per store range call while listing (a consistent snapshot per page).
const LIST_PAGE: usize = 10_000;

/// The scheduler's name, as pods request it (`spec.schedulerName`) and events report it.
const SCHEDULER_NAME: &str = "default-scheduler";

fn kinds() -> (&'static ResourceInfo, &'static ResourceInfo) {
    (
        registry::by_kind("v1", "Pod").expect("pods are registered"),
        registry::by_kind("v1", "Node").expect("nodes are registered"),
    )
}

/// Sets `spec.nodeName` if the pod is still unbound (409 Conflict otherwise) and the Node
/// exists (404 `nodes "x" not found` otherwise: a pod bound to a missing node would never
/// run). The Node is read (linearizably) before the pod is written; one deleted in between
/// leaves an orphan for PodGC, as a binding of the scheduler's batches can.
pub async fn bind(objects: &Objects, ns: &str, name: &str, node: &str) -> Result<Value, ApiError> {
    let (pods, nodes) = kinds();
    let node_exists = match objects.get(nodes, None, node).await {
        Ok(_) => true,
        Err(ApiError::NotFound { .. }) => false,
        Err(e) => return Err(e),
    };
    objects
        .guaranteed_update(pods, Some(ns), name, None, |current| {
            if current["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::conflict(pods, name, "the pod is being deleted"));
            }
            if let Some(bound) = current["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict(
                    pods,
                    name,
                    format!("pod {name} is already assigned to node \"{bound}\""),
                ));
            }
            // After the pod's own checks, so that a bound pod still answers 409.
            if !node_exists {
                return Err(ApiError::not_found(nodes, node));
            }
            let mut next = current.clone();
            next["spec"]["nodeName"] = json!(node);
            Ok(next)
        })
        .await
}

fn is_pending(p: &Pod) -> bool {
    p.spec.node_name.as_deref().unwrap_or("").is_empty()
        && p.metadata.deletion_timestamp.is_none()
        && matches!(
            p.spec.scheduler_name.as_deref(),
            None | Some("") | Some(SCHEDULER_NAME)
        )
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Every object of a kind, straight from the store, in pages of `page` keys, all as of the
/// revision `at` (`None`: the first page's, which is then stored in `at` for the next lists
/// of the same pass).
async fn list_raw(
    objects: &Objects,
    info: &ResourceInfo,
    at: &mut Option<u64>,
    page: usize,
) -> Result<Vec<KeyValue>, ApiError> {
    let prefix = info.key_prefix(None);
    let mut out = Vec::new();
    loop {
        let after = out.last().map(|kv: &KeyValue| kv.key.clone());
        let store = objects.store();
        let page = match *at {
            Some(rev) => store.range_at(&prefix, after.as_deref(), page, rev).await?,
            None => store.range(&prefix, after.as_deref(), page).await?,
        };
        at.get_or_insert(page.revision);
        let more = page.more && !page.items.is_empty();
        out.extend(page.items);
        if !more {
            return Ok(out);
        }
    }
}

/// Decodes the stored objects as `T` with their mod revisions, skipping (and logging) any
/// that do not decode.
fn decode_all<T: DeserializeOwned>(kvs: Vec<KeyValue>) -> Vec<(T, u64)> {
    kvs.into_iter()
        .filter_map(|kv| match serde_json::from_slice(&kv.value) {
            Ok(v) => Some((v, kv.mod_revision)),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "scheduler: undecodable object skipped");
                None
            }
        })
        .collect()
}

/// What one pass did, and where its time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Pending pods seen by the pass.
    pub pending: usize,
    /// Pods bound.
    pub bound: usize,
    /// Pods that fit nowhere.
    pub unschedulable: usize,
    /// Writes refused by the store because the object had changed since it was listed (the
    /// pod is considered again in the next pass).
    pub conflicts: usize,
    /// Raft entries written.
    pub entries: usize,
    /// Reading and decoding pods and nodes, building the view.
    pub list: Duration,
    /// The pure scheduling decisions and encoding the writes.
    pub decide: Duration,
    /// Waiting for batched writes (Raft append + fsync, apply), beyond the part that overlaps
    /// the next batch's decisions.
    pub write: Duration,
}

/// What to do once a write of the batch has an outcome.
enum Then {
    /// A binding: undo the assumption if it was not written.
    Bound { node: String, req: PodRequest },
    /// `PodScheduled=False`: once written, the event to record.
    MarkedUnschedulable { event: Value },
    /// A `FailedScheduling` event.
    Event,
}

/// Writes of one pass waiting to be sent, at most [`BATCH`] per Raft entry.
#[derive(Default)]
struct Batch {
    writes: Vec<BatchWrite>,
    then: Vec<Then>,
}

/// A batch sent as one Raft entry, whose outcome is not accounted yet.
struct InFlight {
    write: JoinHandle<Result<Vec<Result<u64, ApiError>>, ApiError>>,
    then: Vec<Then>,
}

impl Batch {
    fn push(&mut self, write: BatchWrite, then: Then) {
        self.writes.push(write);
        self.then.push(then);
    }

    fn len(&self) -> usize {
        self.writes.len()
    }

    /// Sends the first [`BATCH`] writes as one Raft entry, on a task of its own so that the
    /// next batch is decided (CPU) while this one is appended, fsynced and applied. Awaited by
    /// [`InFlight::settle`]; if the pass is dropped first, the write still completes and the
    /// next pass lists its outcome.
    fn send(&mut self, objects: &Objects) -> InFlight {
        // Events queued by the last settle may have made the batch longer than an entry.
        let n = self.writes.len().min(BATCH);
        let writes: Vec<BatchWrite> = self.writes.drain(..n).collect();
        let objects = objects.clone();
        InFlight {
            write: tokio::spawn(async move { objects.write_batch(writes).await }),
            then: self.then.drain(..n).collect(),
        }
    }
}

impl InFlight {
    /// Waits for the write and accounts its outcome: failed bindings are forgotten by the
    /// view, and events of pods marked unschedulable are queued in `next`.
    async fn settle(
        self,
        next: &mut Batch,
        view: &mut ClusterView,
        stats: &mut PassStats,
    ) -> Result<(), ApiError> {
        let t = Instant::now();
        let results = match self.write.await {
            Ok(r) => r,
            Err(e) => Err(ApiError::Internal(format!("scheduler write task: {e}"))),
        };
        stats.write += t.elapsed();
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                // Nothing was written: undo the assumptions; the next pass starts over.
                for t in self.then {
                    if let Then::Bound { node, req } = t {
                        view.forget(&node, &req);
                    }
                }
                return Err(e);
            }
        };
        stats.entries += 1;
        let events = registry::by_kind("v1", "Event").expect("events are registered");
        for (result, then) in results.into_iter().zip(self.then) {
            if let Err(e) = &result {
                if matches!(e, ApiError::Conflict { .. } | ApiError::NotFound { .. }) {
                    stats.conflicts += 1;
                }
                tracing::debug!(error = %e, "scheduler: write not applied");
            }
            match (result, then) {
                (Ok(_), Then::Bound { .. }) => stats.bound += 1,
                (Err(_), Then::Bound { node, req }) => {
                    view.forget(&node, &req);
                }
                (Ok(_), Then::MarkedUnschedulable { event }) => next.push(
                    BatchWrite::Create {
                        info: events,
                        object: event,
                    },
                    Then::Event,
                ),
                (Err(_), Then::MarkedUnschedulable { .. }) | (_, Then::Event) => {}
            }
        }
        Ok(())
    }
}

/// One scheduling pass over every pending pod: see the module documentation.
pub async fn pass(objects: &Objects) -> Result<PassStats, ApiError> {
    let (pods_info, nodes_info) = kinds();
    let mut stats = PassStats::default();
    let t = Instant::now();
    // One revision for the whole pass.
    let mut at = None;
    let pods: Vec<(Pod, u64)> = decode_all(list_raw(objects, pods_info, &mut at, LIST_PAGE).await?);
    if !pods.iter().any(|(p, _)| is_pending(p)) {
        stats.list = t.elapsed();
        return Ok(stats);
    }
    let nodes: Vec<(Node, u64)> =
        decode_all(list_raw(objects, nodes_info, &mut at, LIST_PAGE).await?);
    let mut view = ClusterView::from_infos(nodes.iter().map(|(n, _)| NodeInfo::from_node(n)));
    let mut pending = Vec::new();
    for (pod, rev) in pods {
        if is_pending(&pod) {
            pending.push((pod, rev));
        } else {
            view.add_bound_pod(&pod);
        }
    }
    stats.pending = pending.len();
    pending.sort_by(|(a, _), (b, _)| {
        (a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
    });
    stats.list = t.elapsed();

    // Decide into `batch`; every BATCH writes, wait for the entry in flight (if any) and send
    // the batch: one entry is written while the next is decided. A binding that fails is
    // forgotten only when its entry settles, so decisions made meanwhile may find a node
    // fuller than it is; they are still valid, at worst less balanced.
    let mut batch = Batch::default();
    let mut in_flight: Option<InFlight> = None;
    let mut t = Instant::now();
    for (decided, (mut pod, rev)) in pending.into_iter().enumerate() {
        let req = PodRequest::from_pod(&pod);
        match schedule(&view, &req) {
            Decision::Bind(node) => {
                // As `bind`: only spec.nodeName changes, so the generation moves by one.
                pod.spec.node_name = Some(node.clone());
                if pods_info.generation {
                    pod.metadata.generation = Some(pod.metadata.generation.unwrap_or(0) + 1);
                }
                if let Some(write) = update(pods_info, &pod, rev) {
                    tracing::debug!(pod = %pod.metadata.name, %node, "scheduled");
                    view.assume(&node, &req);
                    batch.push(write, Then::Bound { node, req });
                }
            }
            Decision::Unschedulable { message } => {
                stats.unschedulable += 1;
                if mark_unschedulable(&mut pod, &message) {
                    let event = failed_scheduling_event(&pod, &message);
                    if let Some(write) = update(pods_info, &pod, rev) {
                        batch.push(write, Then::MarkedUnschedulable { event });
                    }
                }
            }
        }
        if batch.len() >= BATCH {
            stats.decide += t.elapsed();
            if let Some(f) = in_flight.take() {
                f.settle(&mut batch, &mut view, &mut stats).await?;
            }
            in_flight = Some(batch.send(objects));
            t = Instant::now();
        }
        if (decided + 1) % YIELD_EVERY == 0 {
            // Deciding is CPU work: let the write task and Raft run on this worker too.
            tokio::task::yield_now().await;
        }
    }
    stats.decide += t.elapsed();
    // The last decisions, then the events of the pods marked unschedulable last.
    loop {
        if let Some(f) = in_flight.take() {
            f.settle(&mut batch, &mut view, &mut stats).await?;
        }
        if batch.len() == 0 {
            return Ok(stats);
        }
        in_flight = Some(batch.send(objects));
    }
}

/// The compare-and-set of `pod`, changed from the object listed at `rev`; `None` (logged)
/// if it cannot be encoded, e.g. it grew past the size limit.
fn update(info: &'static ResourceInfo, pod: &Pod, rev: u64) -> Option<BatchWrite> {
    // As stored: the resourceVersion is the key's revision, never part of the value.
    debug_assert!(pod.metadata.resource_version.is_none());
    match encode_object(pod) {
        Ok(object) => Some(BatchWrite::Update {
            info,
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            mod_revision: rev,
            object,
        }),
        Err(e) => {
            tracing::warn!(pod = %pod.metadata.name, error = %e, "scheduler: pod not written");
            None
        }
    }
}

/// Sets `PodScheduled=False` with `message` (and phase Pending) unless the pod already has
/// it; false when nothing changed.
fn mark_unschedulable(pod: &mut Pod, message: &str) -> bool {
    let status = pod.status.get_or_insert_with(PodStatus::default);
    let scheduled = status
        .conditions
        .iter()
        .position(|c| c.type_ == "PodScheduled");
    let previous = scheduled.map(|i| &status.conditions[i]);
    if previous.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message)) {
        return false;
    }
    // As kube's UpdatePodCondition: the transition time moves only when the status does.
    let since = previous
        .filter(|c| c.status == "False")
        .and_then(|c| c.last_transition_time);
    let condition = PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some(message.to_owned()),
        last_transition_time: Some(since.unwrap_or_else(Time::now)),
        last_probe_time: None,
    };
    match scheduled {
        Some(i) => status.conditions[i] = condition,
        None => status.conditions.push(condition),
    }
    status.phase = Some("Pending".into());
    true
}

/// kube-scheduler's `FailedScheduling` event about `pod`.
fn failed_scheduling_event(pod: &Pod, message: &str) -> Value {
    let now = Time::now();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    // Like client-go's recorder: the object's name and the time in hex nanoseconds.
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": { "name": format!("{}.{nanos:x}", pod.metadata.name), "namespace": ns },
        "involvedObject": {
            "kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        },
        "reason": "FailedScheduling", "type": "Warning", "message": message,
        "action": "Scheduling",
        "source": { "component": SCHEDULER_NAME },
        "reportingComponent": SCHEDULER_NAME,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    })
}

/// Runs passes until `shutdown`, while this node is the Raft leader: after changes of unbound
/// or deleted pods, after node changes while some pod is left unplaced, and every [`RESYNC`].
pub async fn run(objects: Objects, shutdown: CancellationToken) {
    let (pods_info, nodes_info) = kinds();
    let pod_prefix = pods_info.key_prefix(None);
    let node_prefix = nodes_info.key_prefix(None);
    // Whether the last pass left pods unplaced, which a node change may help. Without them,
    // node heartbeats do not cost a pass (a listing of every pod) each.
    let mut unplaced = true;
    loop {
        let from = objects.store().revision();
        if !objects.store().is_leader() {
            tracing::debug!("not the Raft leader: no scheduling pass");
        } else {
            match pass(&objects).await {
                Ok(stats) => {
                    unplaced = stats.bound < stats.pending;
                    if stats.pending > 0 {
                        tracing::debug!(?stats, "scheduling pass");
                    }
                }
                Err(e) => {
                    unplaced = true;
                    tracing::warn!(error = %e, "scheduling pass failed");
                }
            }
        }
        // Wait for a change that can make a pending pod schedulable (or a new pending pod).
        let pods = objects.store().watch(&pod_prefix, from);
        let nodes = unplaced.then(|| objects.store().watch(&node_prefix, from));
        if [
            pods.as_ref().err(),
            nodes.as_ref().and_then(|n| n.as_ref().err()),
        ]
        .iter()
        .any(|e| matches!(e, Some(StoreError::Compacted { .. })))
        {
            // More changed during the pass than the history keeps: look again at once.
            if shutdown.is_cancelled() {
                return;
            }
            continue;
        }
        let mut pods = pods.ok();
        let mut nodes = nodes.and_then(Result::ok);
        let deadline = tokio::time::sleep(RESYNC);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut deadline => break,
                ev = async { match pods.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    match ev {
                        Some(Ok(ev)) => {
                            // A new or updated unbound pod, or a deleted pod (frees room).
                            let unbound = ev.value.as_ref().is_none_or(|kv| {
                                serde_json::from_slice::<Value>(&kv.value).ok()
                                    .is_some_and(|p| p["spec"]["nodeName"].as_str().unwrap_or("").is_empty())
                            });
                            if unbound { break; }
                        }
                        _ => { pods = None; break; }
                    }
                }
                ev = async { match nodes.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    if !matches!(ev, Some(Ok(_))) { nodes = None; }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::controllers::tests::open;

    use crate::objects::ListOptions;

    async fn create(objects: &Objects, plural: &str, ns: Option<&str>, obj: Value) {
        let info = registry::resolve(plural).expect("served");
        objects.create(info, ns, obj).await.expect("created");
    }

    async fn list(objects: &Objects, plural: &str) -> Vec<Value> {
        let info = registry::resolve(plural).expect("served");
        let page = objects.list(info, None, &ListOptions::default()).await;
        page.expect("listed").items
    }

    /// Leftover of issue 11: a pass read pods and then nodes (and each page of them) at the
    /// store's latest revision each time, so one pass could see a node created after its pods
    /// were read. Every page of a pass is read as of the first one's revision.
    #[tokio::test]
    async fn a_pass_reads_pods_and_nodes_as_of_one_revision() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_store, objects) = open(dir.path()).await;
        let node = |n: &str| json!({"metadata": {"name": n}});
        create(&objects, "nodes", None, node("node-a")).await;
        for i in 0..3 {
            let pod = json!({"metadata": {"name": format!("p{i}")}, "spec": {"containers": [
                {"name": "c", "image": "hello:v1"}]}});
            create(&objects, "pods", Some("default"), pod).await;
        }
        let (pods_info, nodes_info) = kinds();
        let mut at = None;
        let pods = list_raw(&objects, pods_info, &mut at, 2).await.unwrap();
        let rev = at.expect("the first page fixes the revision");
        assert_eq!(pods.len(), 3);
        // Written after the pods were read: not part of this pass.
        create(&objects, "nodes", None, node("node-b")).await;
        let nodes = list_raw(&objects, nodes_info, &mut at, 1).await.unwrap();
        let names: Vec<&str> = nodes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            names,
            [nodes_info.key("", "node-a")],
            "one pass, one revision"
        );
        assert!(pods.iter().chain(&nodes).all(|kv| kv.mod_revision <= rev));
    }

    #[tokio::test]
    async fn a_pass_binds_in_batches_and_records_failed_scheduling_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        for n in ["node-a", "node-b"] {
            let node = json!({"metadata": {"name": n}, "status": {
                "allocatable": {"cpu": "1", "memory": "1Gi", "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}]}});
            create(&objects, "nodes", None, node).await;
        }
        // Seven pods for six places: the last one by name fits nowhere.
        for i in 0..7 {
            let pod = json!({"metadata": {"name": format!("p{i}")}, "spec": {"containers": [
                {"name": "c", "image": "hello:v1"}]}});
            create(&objects, "pods", Some("default"), pod).await;
        }

        let s = pass(&objects).await.expect("pass");
        assert_eq!(
            (s.pending, s.bound, s.unschedulable, s.conflicts),
            (7, 6, 1, 0)
        );
        // One entry for the decisions, one for the event of the pod marked unschedulable.
        assert_eq!(s.entries, 2);
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for p in list(&objects, "pods").await {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            if name == "p6" {
                assert!(p["spec"].get("nodeName").is_none(), "{p}");
                let c = &p["status"]["conditions"][0];
                assert_eq!(c["type"], "PodScheduled");
                assert_eq!(c["status"], "False");
                assert_eq!(c["reason"], "Unschedulable");
                assert_eq!(c["message"], "0/2 nodes are available: 2 Too many pods.");
                assert_eq!(p["status"]["phase"], "Pending");
                continue;
            }
            // Bound like `pods/{name}/binding`: a spec change, so the generation moved.
            let node = p["spec"]["nodeName"].as_str().expect("bound").to_owned();
            assert_eq!(p["metadata"]["generation"], 2, "{p}");
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [3, 3]);
        let events = list(&objects, "events").await;
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert!(e["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("p6.")));
        assert_eq!(e["metadata"]["namespace"], "default");
        assert_eq!(e["involvedObject"]["kind"], "Pod");
        assert_eq!(e["involvedObject"]["name"], "p6");
        assert_eq!(e["involvedObject"]["apiVersion"], "v1");
        assert!(e["involvedObject"]["uid"].is_string());
        assert_eq!(e["reason"], "FailedScheduling");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["message"], "0/2 nodes are available: 2 Too many pods.");
        assert_eq!(e["source"]["component"], "default-scheduler");
        assert_eq!(e["reportingComponent"], "default-scheduler");
        assert_eq!(e["count"], 1);
        assert!(e["firstTimestamp"].is_string() && e["lastTimestamp"].is_string());

        // Same reason again: nothing is written, no second event.
        let s = pass(&objects).await.expect("pass");
        assert_eq!(
            (s.pending, s.bound, s.unschedulable, s.entries),
            (1, 0, 1, 0)
        );
        assert_eq!(list(&objects, "events").await.len(), 1);

        // A write at a stale revision is refused and reported per write.
        let pods_info = registry::resolve("pods").expect("served");
        let p6 = objects.get_current(pods_info, Some("default"), "p6").await;
        let p6 = p6.expect("p6");
        let mut pod: Pod = serde_json::from_value(p6.object).expect("a pod");
        pod.metadata.resource_version = None;
        let stale = update(pods_info, &pod, p6.mod_revision - 1).expect("encodes");
        let fresh = update(pods_info, &pod, p6.mod_revision).expect("encodes");
        let results = objects
            .write_batch(vec![stale, fresh])
            .await
            .expect("written");
        assert!(
            matches!(results[0], Err(ApiError::Conflict { .. })),
            "{results:?}"
        );
        assert!(results[1].is_ok(), "{results:?}");

        store.shutdown().await.expect("store closes");
    }

    #[tokio::test]
    async fn bind_refuses_a_node_that_does_not_exist() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        create(
            &objects,
            "nodes",
            None,
            json!({"metadata": {"name": "node-a"}}),
        )
        .await;
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "hello:v1"}]}});
        create(&objects, "pods", Some("default"), pod).await;

        let err = bind(&objects, "default", "p", "gone").await.unwrap_err();
        assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
        assert_eq!(err.to_string(), "nodes \"gone\" not found");
        assert_eq!(err.code(), 404);
        let p = &list(&objects, "pods").await[0];
        assert!(p["spec"].get("nodeName").is_none(), "{p}");

        let bound = bind(&objects, "default", "p", "node-a")
            .await
            .expect("bound");
        assert_eq!(bound["spec"]["nodeName"], "node-a");
        // A bound pod is a conflict first, whatever the node.
        let err = bind(&objects, "default", "p", "gone").await.unwrap_err();
        assert!(matches!(err, ApiError::Conflict { .. }), "{err:?}");
        // A missing pod is the pod's 404.
        let err = bind(&objects, "default", "nope", "node-a").await;
        assert_eq!(err.unwrap_err().to_string(), "pods \"nope\" not found");

        store.shutdown().await.expect("store closes");
    }

    #[test]
    fn the_transition_time_stays_while_the_pod_stays_unschedulable() {
        let mut pod = Pod::default();
        assert!(mark_unschedulable(
            &mut pod,
            "0/1 nodes are available: 1 Too many pods."
        ));
        let first = pod.status.clone().expect("status").conditions;
        assert!(!mark_unschedulable(
            &mut pod,
            "0/1 nodes are available: 1 Too many pods."
        ));
        let since = first[0].last_transition_time;
        assert!(mark_unschedulable(
            &mut pod,
            "0/2 nodes are available: 2 Too many pods."
        ));
        let conditions = pod.status.expect("status").conditions;
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, since);
        assert_eq!(
            conditions[0].message.as_deref(),
            Some("0/2 nodes are available: 2 Too many pods.")
        );
    }
}
