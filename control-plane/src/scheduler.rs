//! The scheduler's pure core: given a snapshot of the cluster ([`ClusterView`]) and a pending
//! pod ([`PodRequest`]), pick a node ([`schedule`]) with kube-scheduler's semantics.
//!
//! No I/O, no async: the thin runtime that watches pods and nodes, binds through the `binding`
//! subresource and writes `PodScheduled=False` lives elsewhere and only feeds this module.
//!
//! **Filters** (a node must pass all of them), in kube-scheduler's plugin order:
//! 1. `NodeUnschedulable`: `spec.unschedulable` unless the pod tolerates
//!    `node.kubernetes.io/unschedulable:NoSchedule`;
//! 2. node readiness (`Ready=True`; kube-scheduler gets this from the `not-ready` taint, we
//!    check the condition directly);
//! 3. `TaintToleration`: every `NoSchedule`/`NoExecute` taint must be tolerated;
//! 4. `NodeAffinity`: every `nodeSelector` label must match;
//! 5. `NodeResourcesFit`: pod count, then CPU and memory requests against allocatable minus
//!    what the node's pods request (a resource the pod does not request always fits).
//!
//! **Scores** (higher wins, ties go to the smallest node name so decisions are
//! deterministic): `NodeResourcesFit`'s least-allocated score (0–100, the mean of the free
//! fraction of CPU and memory after placing the pod, counting pods that request nothing as
//! 100m / 200Mi like kube-scheduler) plus twice a spreading score (0–100: fewer pods of the
//! pod's controller on the node scores higher, normalised by the maximum over feasible nodes,
//! as `SelectorSpread` did; the weight 2 is `PodTopologySpread`'s default weight).
//!
//! **Unschedulable message** exactly as kube-scheduler's `FitError`: each failing node
//! contributes the reasons of its first failing filter (all insufficient resources for
//! `NodeResourcesFit`), reasons are counted, each `"<count> <reason>"` string is sorted as a
//! string and joined with `", "`:
//! `0/3 nodes are available: 1 node(s) had untolerated taint {key: value}, 2 Insufficient memory.`
//!
//! Cost: [`schedule`] is O(nodes) per pod, like kube-scheduler scoring every node: one pass
//! over the nodes (filters and least-allocated score, no lookup or allocation per node), then
//! one over the feasible ones with the spreading score read from a table per owner count. A
//! few scratch vectors per call (feasible nodes; the owner's counts spread out densely once;
//! the score per count); the message is built only when nothing fits.

use std::collections::{BTreeMap, HashMap};

use wasmctl_api::core::{Node, Pod, Taint, Toleration};
use wasmctl_api::Quantity;

/// Kube-scheduler's CPU request for scoring a container that requests no CPU (millicores).
pub const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
/// Kube-scheduler's memory request for scoring a container that requests no memory (bytes).
pub const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;
/// The highest score one scoring function gives a node.
pub const MAX_NODE_SCORE: i64 = 100;
/// How much spreading weighs against least-allocated (1).
pub const SPREAD_WEIGHT: i64 = 2;

/// The taint kube-scheduler's `NodeUnschedulable` plugin lets a pod tolerate to land on a
/// cordoned node.
pub const TAINT_NODE_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// CPU, memory and pod count, as the scheduler accounts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub pods: i64,
}

impl Resources {
    fn add(&mut self, cpu_millis: i64, memory_bytes: i64, pods: i64) {
        self.cpu_millis = self.cpu_millis.saturating_add(cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(memory_bytes);
        self.pods = self.pods.saturating_add(pods);
    }
}

/// One node as the scheduler sees it: what it offers and what its pods already take.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
    /// `status.allocatable` (`cpu`, `memory`, `pods`); a missing or unparsable entry is 0.
    pub allocatable: Resources,
    /// The sum of the requests of the pods bound to the node; `pods` is their number.
    pub requested: Resources,
    /// Like `requested`, with kube-scheduler's defaults for containers that request nothing;
    /// used only for scoring.
    pub non_zero_requested: Resources,
}

impl NodeInfo {
    /// The scheduler's view of a Node object, with nothing requested yet.
    pub fn from_node(node: &Node) -> NodeInfo {
        let status = node.status.as_ref();
        let ready = status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        let allocatable = status.map(|s| &s.allocatable);
        let get = |key: &str, parse: fn(&Quantity) -> Result<i64, String>| {
            allocatable
                .and_then(|a| a.get(key))
                .and_then(|q| parse(q).ok())
                .unwrap_or(0)
        };
        NodeInfo {
            name: node.metadata.name.clone(),
            labels: node.metadata.labels.clone(),
            ready,
            unschedulable: node.spec.unschedulable.unwrap_or(false),
            taints: node.spec.taints.clone(),
            allocatable: Resources {
                cpu_millis: get("cpu", Quantity::cpu_millis),
                memory_bytes: get("memory", Quantity::bytes),
                pods: get("pods", |q| Ok(q.parse()?.millis.div_euclid(1000) as i64)),
            },
            requested: Resources::default(),
            non_zero_requested: Resources::default(),
        }
    }
}

/// What a pod asks of a node, extracted once from the Pod object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodRequest {
    /// The sum of the containers' CPU requests (a container's limit when it sets no request).
    pub cpu_millis: i64,
    /// The sum of the containers' memory requests (likewise defaulted to limits).
    pub memory_bytes: i64,
    /// As `cpu_millis`, with 100m for a container that sets neither (scoring only).
    pub non_zero_cpu_millis: i64,
    /// As `memory_bytes`, with 200Mi for a container that sets neither (scoring only).
    pub non_zero_memory_bytes: i64,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// The uid of the pod's controller (its ReplicaSet), whose replicas are spread.
    pub owner_uid: Option<String>,
}

impl PodRequest {
    /// The request of a Pod. Quantities were validated on the way in; one that does not parse
    /// counts as 0.
    pub fn from_pod(pod: &Pod) -> PodRequest {
        let mut req = PodRequest {
            node_selector: pod.spec.node_selector.clone(),
            tolerations: pod.spec.tolerations.clone(),
            owner_uid: pod.metadata.controller().map(|o| o.uid.clone()),
            ..PodRequest::default()
        };
        for c in &pod.spec.containers {
            let res = &c.resources;
            // As kube-apiserver's defaulting: a resource with a limit and no request requests
            // its limit.
            let effective = |key: &str| res.requests.get(key).or_else(|| res.limits.get(key));
            let cpu = effective("cpu").map(|q| q.cpu_millis().unwrap_or(0));
            let memory = effective("memory").map(|q| q.bytes().unwrap_or(0));
            req.cpu_millis = req.cpu_millis.saturating_add(cpu.unwrap_or(0));
            req.memory_bytes = req.memory_bytes.saturating_add(memory.unwrap_or(0));
            req.non_zero_cpu_millis = req
                .non_zero_cpu_millis
                .saturating_add(cpu.unwrap_or(DEFAULT_MILLI_CPU_REQUEST));
            req.non_zero_memory_bytes = req
                .non_zero_memory_bytes
                .saturating_add(memory.unwrap_or(DEFAULT_MEMORY_REQUEST));
        }
        req
    }
}

/// A snapshot of the cluster for scheduling: nodes (sorted by name) with what is bound to
/// them, and how many pods of each controller every node runs. Decisions are accounted with
/// [`ClusterView::assume`], so many pods can be scheduled in one pass before any binding is
/// written.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Owner uid → (node index → pods of that owner on the node). Sparse, so memory grows
    /// with pods, not owners × nodes.
    owners: HashMap<String, HashMap<usize, u32>>,
}

impl ClusterView {
    /// The view of these nodes with these pods accounted: pods bound to one of the nodes
    /// (`spec.nodeName`) that have not terminated (`Succeeded`/`Failed`) count, including pods
    /// being deleted, whose resources are held until they are gone.
    pub fn new(nodes: &[Node], pods: &[Pod]) -> ClusterView {
        let mut view = ClusterView::from_infos(nodes.iter().map(NodeInfo::from_node));
        for pod in pods {
            view.add_bound_pod(pod);
        }
        view
    }

    /// A view of already built nodes; a name given twice keeps the last.
    pub fn from_infos(infos: impl IntoIterator<Item = NodeInfo>) -> ClusterView {
        let mut by_name: BTreeMap<String, NodeInfo> = BTreeMap::new();
        for info in infos {
            by_name.insert(info.name.clone(), info);
        }
        let nodes: Vec<NodeInfo> = by_name.into_values().collect();
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        ClusterView {
            nodes,
            index,
            owners: HashMap::new(),
        }
    }

    /// The nodes, sorted by name.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&i| &self.nodes[i])
    }

    /// How many pods of the controller `owner_uid` run on `node`.
    pub fn owner_count(&self, node: &str, owner_uid: &str) -> u32 {
        let (Some(i), Some(counts)) = (self.index.get(node), self.owners.get(owner_uid)) else {
            return 0;
        };
        counts.get(i).copied().unwrap_or(0)
    }

    /// Accounts a pod that is already bound; false (and nothing accounted) when it is not
    /// bound, bound to a node outside the view, or terminated.
    pub fn add_bound_pod(&mut self, pod: &Pod) -> bool {
        let terminated = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        match pod.spec.node_name.as_deref() {
            Some(node) if !terminated => self.assume(node, &PodRequest::from_pod(pod)),
            _ => false,
        }
    }

    /// Accounts `pod` on `node` (a decision not yet written, or a pod seen bound); false when
    /// the node is not in the view.
    pub fn assume(&mut self, node: &str, pod: &PodRequest) -> bool {
        self.account(node, pod, 1)
    }

    /// Undoes [`ClusterView::assume`] (a binding that failed, a pod that went away); false
    /// when the node is not in the view.
    pub fn forget(&mut self, node: &str, pod: &PodRequest) -> bool {
        self.account(node, pod, -1)
    }

    fn account(&mut self, node: &str, pod: &PodRequest, sign: i64) -> bool {
        let Some(&i) = self.index.get(node) else {
            return false;
        };
        let info = &mut self.nodes[i];
        info.requested
            .add(sign * pod.cpu_millis, sign * pod.memory_bytes, sign);
        info.non_zero_requested.add(
            sign * pod.non_zero_cpu_millis,
            sign * pod.non_zero_memory_bytes,
            sign,
        );
        if let Some(owner) = &pod.owner_uid {
            if sign > 0 {
                *self
                    .owners
                    .entry(owner.clone())
                    .or_default()
                    .entry(i)
                    .or_insert(0) += 1;
            } else if let Some(counts) = self.owners.get_mut(owner) {
                if let Some(c) = counts.get_mut(&i) {
                    *c = c.saturating_sub(1);
                    if *c == 0 {
                        counts.remove(&i);
                    }
                }
                if counts.is_empty() {
                    self.owners.remove(owner);
                }
            }
        }
        true
    }
}

/// The outcome of scheduling one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Bind the pod to this node.
    Bind(String),
    /// No node fits; `message` is kube-scheduler's `0/N nodes are available: ...` text for the
    /// `PodScheduled=False` condition and the `FailedScheduling` event.
    Unschedulable { message: String },
}

/// Picks the node for `pod`: the feasible node with the highest score, ties to the smallest
/// name; or why none fits.
pub fn schedule(view: &ClusterView, pod: &PodRequest) -> Decision {
    // Feasible nodes with their least-allocated score: one pass, no lookups.
    let mut feasible: Vec<(usize, i64)> = Vec::with_capacity(view.nodes.len());
    for (i, node) in view.nodes.iter().enumerate() {
        if check(node, pod).is_ok() {
            feasible.push((i, least_allocated(node, pod)));
        }
    }
    // The owner's pods per node, spread once from the sparse map into a dense scratch vector
    // (a hash lookup per node would cost more than the filters).
    let mut counts = Vec::new();
    if let Some(owned) = pod.owner_uid.as_ref().and_then(|o| view.owners.get(o)) {
        counts.resize(view.nodes.len(), 0u32);
        for (&i, &c) in owned {
            counts[i] = c;
        }
    }
    let count = |i: usize| counts.get(i).copied().unwrap_or(0);
    let max_count = feasible.iter().map(|&(i, _)| count(i)).max().unwrap_or(0);
    // The spreading score by the owner's pod count on a node, computed once per count.
    let spread: Vec<i64> = (0..=max_count)
        .map(|c| match max_count {
            0 => MAX_NODE_SCORE,
            max => MAX_NODE_SCORE * i64::from(max - c) / i64::from(max),
        })
        .collect();
    let mut best: Option<(usize, i64)> = None;
    for &(i, least) in &feasible {
        let score = least + SPREAD_WEIGHT * spread[count(i) as usize];
        // Nodes are sorted by name: a strict comparison keeps the smallest name on ties.
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    match best {
        Some((i, _)) => Decision::Bind(view.nodes[i].name.clone()),
        None => Decision::Unschedulable {
            message: unschedulable_message(view, pod),
        },
    }
}

/// Why a node cannot take the pod: its first failing filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Misfit {
    Unschedulable,
    NotReady,
    /// The index of the first untolerated taint in the node's taints.
    Taint(usize),
    Selector,
    Resources {
        pods: bool,
        cpu: bool,
        memory: bool,
    },
}

fn check(node: &NodeInfo, pod: &PodRequest) -> Result<(), Misfit> {
    if node.unschedulable && !tolerates_unschedulable(&pod.tolerations) {
        return Err(Misfit::Unschedulable);
    }
    if !node.ready {
        return Err(Misfit::NotReady);
    }
    if let Some(t) = node.taints.iter().position(|taint| {
        (taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            && !pod.tolerations.iter().any(|tol| tolerates(tol, taint))
    }) {
        return Err(Misfit::Taint(t));
    }
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return Err(Misfit::Selector);
    }
    let free = |alloc: i64, used: i64| alloc.saturating_sub(used);
    let pods = node.requested.pods.saturating_add(1) > node.allocatable.pods;
    let cpu = pod.cpu_millis > 0
        && pod.cpu_millis > free(node.allocatable.cpu_millis, node.requested.cpu_millis);
    let memory = pod.memory_bytes > 0
        && pod.memory_bytes > free(node.allocatable.memory_bytes, node.requested.memory_bytes);
    if pods || cpu || memory {
        return Err(Misfit::Resources { pods, cpu, memory });
    }
    Ok(())
}

/// Kubernetes' `Toleration.ToleratesTaint` (also used by the taint-based eviction of the
/// node lifecycle controller).
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    let effect = tol.effect.as_deref().unwrap_or("");
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = tol.key.as_deref().unwrap_or("");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match tol.operator.as_deref().unwrap_or("") {
        "" | "Equal" => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        "Exists" => true,
        _ => false,
    }
}

fn tolerates_unschedulable(tolerations: &[Toleration]) -> bool {
    let taint = Taint {
        key: TAINT_NODE_UNSCHEDULABLE.to_string(),
        effect: "NoSchedule".to_string(),
        ..Taint::default()
    };
    tolerations.iter().any(|t| tolerates(t, &taint))
}

/// `NodeResourcesFit`'s least-allocated score: the mean over CPU and memory of
/// `(allocatable - requested) * 100 / allocatable`, with the pod placed.
fn least_allocated(node: &NodeInfo, pod: &PodRequest) -> i64 {
    fn score(allocatable: i64, requested: i64) -> i64 {
        if allocatable <= 0 || requested > allocatable {
            return 0;
        }
        let free = allocatable - requested;
        match free.checked_mul(MAX_NODE_SCORE) {
            Some(f) => f / allocatable,
            // Beyond ~92 PB of memory: exact in 128 bits.
            None => {
                (i128::from(free) * i128::from(MAX_NODE_SCORE) / i128::from(allocatable)) as i64
            }
        }
    }
    let used = &node.non_zero_requested;
    let cpu = score(
        node.allocatable.cpu_millis,
        used.cpu_millis.saturating_add(pod.non_zero_cpu_millis),
    );
    let memory = score(
        node.allocatable.memory_bytes,
        used.memory_bytes.saturating_add(pod.non_zero_memory_bytes),
    );
    (cpu + memory) / 2
}

/// Kube-scheduler's `FitError` message for a pod that fits on no node of `view`.
pub fn unschedulable_message(view: &ClusterView, pod: &PodRequest) -> String {
    if view.nodes.is_empty() {
        return "0/0 nodes are available: no nodes available to schedule pods.".to_string();
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = |reason: String| *reasons.entry(reason).or_insert(0) += 1;
    for node in &view.nodes {
        match check(node, pod) {
            Ok(()) => {}
            Err(Misfit::Unschedulable) => count("node(s) were unschedulable".into()),
            Err(Misfit::NotReady) => count("node(s) were not ready".into()),
            Err(Misfit::Taint(t)) => {
                let taint = &node.taints[t];
                count(format!(
                    "node(s) had untolerated taint {{{}: {}}}",
                    taint.key,
                    taint.value.as_deref().unwrap_or("")
                ));
            }
            Err(Misfit::Selector) => {
                count("node(s) didn't match Pod's node affinity/selector".into())
            }
            Err(Misfit::Resources { pods, cpu, memory }) => {
                if pods {
                    count("Too many pods".into());
                }
                if cpu {
                    count("Insufficient cpu".into());
                }
                if memory {
                    count("Insufficient memory".into());
                }
            }
        }
    }
    // As kube-scheduler: the "<count> <reason>" strings themselves are sorted.
    let mut histogram: Vec<String> = reasons
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    histogram.sort();
    format!(
        "0/{} nodes are available: {}.",
        view.nodes.len(),
        histogram.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmctl_api::core::{
        Container, NodeCondition, NodeSpec, NodeStatus, PodSpec, PodStatus, ResourceRequirements,
    };
    use wasmctl_api::meta::{ObjectMeta, OwnerReference};

    const GI: i64 = 1 << 30;
    const MI: i64 = 1 << 20;

    fn node(name: &str, cpu: &str, memory: &str, pods: u32) -> Node {
        Node {
            metadata: ObjectMeta {
                name: name.into(),
                ..ObjectMeta::default()
            },
            spec: NodeSpec::default(),
            status: Some(NodeStatus {
                allocatable: [
                    ("cpu".to_string(), Quantity::from(cpu)),
                    ("memory".to_string(), Quantity::from(memory)),
                    ("pods".to_string(), Quantity(pods.to_string())),
                ]
                .into(),
                conditions: vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..NodeCondition::default()
                }],
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn toleration(key: &str, op: &str, value: Option<&str>, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(op),
            value: value.map(Into::into),
            effect: opt(effect),
            toleration_seconds: None,
        }
    }

    fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), Quantity::from(*v)))
                .collect()
        };
        ResourceRequirements {
            requests: map(requests),
            limits: map(limits),
        }
    }

    fn pod_with(containers: Vec<ResourceRequirements>, owner: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: "p".into(),
                owner_references: owner
                    .map(|uid| OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "ReplicaSet".into(),
                        name: format!("rs-{uid}"),
                        uid: uid.into(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    })
                    .into_iter()
                    .collect(),
                ..ObjectMeta::default()
            },
            spec: PodSpec {
                containers: containers
                    .into_iter()
                    .map(|resources| Container {
                        name: "c".into(),
                        image: "hello:v1".into(),
                        resources,
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            },
            ..Pod::default()
        }
    }

    fn request(cpu: &str, memory: &str) -> PodRequest {
        PodRequest::from_pod(&pod_with(
            vec![resources(&[("cpu", cpu), ("memory", memory)], &[])],
            None,
        ))
    }

    fn bound(mut pod: Pod, node: &str) -> Pod {
        pod.spec.node_name = Some(node.into());
        pod
    }

    fn bind(d: Decision) -> String {
        match d {
            Decision::Bind(n) => n,
            other => panic!("expected a binding, got {other:?}"),
        }
    }

    fn message(d: Decision) -> String {
        match d {
            Decision::Unschedulable { message } => message,
            other => panic!("expected unschedulable, got {other:?}"),
        }
    }

    #[test]
    fn requests_sum_over_containers_and_default_to_limits() {
        let pod = pod_with(
            vec![
                // Only limits: requests are the limits.
                resources(&[], &[("cpu", "500m"), ("memory", "256Mi")]),
                // Both: the requests win.
                resources(
                    &[("cpu", "100m"), ("memory", "64Mi")],
                    &[("cpu", "1"), ("memory", "1Gi")],
                ),
                // A cpu request and only a memory limit: defaulting is per resource.
                resources(&[("cpu", "250m")], &[("memory", "32Mi")]),
                // Nothing: 0, but kube-scheduler's defaults for scoring.
                resources(&[], &[]),
            ],
            Some("rs-uid"),
        );
        let req = PodRequest::from_pod(&pod);
        assert_eq!(req.cpu_millis, 850);
        assert_eq!(req.memory_bytes, (256 + 64 + 32) * MI);
        assert_eq!(req.non_zero_cpu_millis, 850 + DEFAULT_MILLI_CPU_REQUEST);
        assert_eq!(
            req.non_zero_memory_bytes,
            (256 + 64 + 32) * MI + DEFAULT_MEMORY_REQUEST
        );
        assert_eq!(req.owner_uid.as_deref(), Some("rs-uid"));
    }

    #[test]
    fn limits_only_pod_is_refused_by_a_node_its_limits_do_not_fit() {
        let view = ClusterView::new(&[node("a", "1", "1Gi", 110)], &[]);
        let pod = PodRequest::from_pod(&pod_with(vec![resources(&[], &[("memory", "2Gi")])], None));
        assert_eq!(
            message(schedule(&view, &pod)),
            "0/1 nodes are available: 1 Insufficient memory."
        );
    }

    #[test]
    fn fits_until_allocatable_is_used_up() {
        let nodes = [node("a", "2", "4Gi", 110)];
        let pods = [bound(
            pod_with(
                vec![resources(&[("cpu", "1500m"), ("memory", "1Gi")], &[])],
                None,
            ),
            "a",
        )];
        let view = ClusterView::new(&nodes, &pods);
        assert_eq!(view.node("a").map(|n| n.requested.pods), Some(1));
        assert_eq!(bind(schedule(&view, &request("500m", "3Gi"))), "a");
        assert_eq!(
            message(schedule(&view, &request("501m", "1Gi"))),
            "0/1 nodes are available: 1 Insufficient cpu."
        );
        // All insufficient resources of the node are reported, as NodeResourcesFit does.
        assert_eq!(
            message(schedule(&view, &request("1", "4Gi"))),
            "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory."
        );
    }

    #[test]
    fn pod_count_limits_even_pods_that_request_nothing() {
        let nodes = [node("a", "1", "1Gi", 1)];
        let mut view = ClusterView::new(&nodes, &[]);
        let empty = PodRequest::from_pod(&pod_with(vec![resources(&[], &[])], None));
        assert_eq!(bind(schedule(&view, &empty)), "a");
        assert!(view.assume("a", &empty));
        assert_eq!(
            message(schedule(&view, &empty)),
            "0/1 nodes are available: 1 Too many pods."
        );
        assert!(view.forget("a", &empty));
        assert_eq!(bind(schedule(&view, &empty)), "a");
    }

    #[test]
    fn terminated_pods_and_pods_of_unknown_nodes_are_not_accounted() {
        let nodes = [node("a", "1", "1Gi", 110)];
        let heavy = || pod_with(vec![resources(&[("cpu", "1")], &[])], None);
        let mut done = bound(heavy(), "a");
        done.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..PodStatus::default()
        });
        let pods = [done, bound(heavy(), "gone"), heavy()];
        let view = ClusterView::new(&nodes, &pods);
        assert_eq!(
            view.node("a").map(|n| n.requested),
            Some(Resources::default())
        );
        assert_eq!(bind(schedule(&view, &request("1", "0"))), "a");
    }

    #[test]
    fn node_selector_must_match_labels() {
        let mut a = node("a", "1", "1Gi", 110);
        a.metadata.labels = [("disk".to_string(), "ssd".to_string())].into();
        let b = node("b", "1", "1Gi", 110);
        let view = ClusterView::new(&[a, b], &[]);
        let mut pod = request("100m", "1Mi");
        pod.node_selector = [("disk".to_string(), "ssd".to_string())].into();
        assert_eq!(bind(schedule(&view, &pod)), "a");
        pod.node_selector = [("disk".to_string(), "hdd".to_string())].into();
        assert_eq!(
            message(schedule(&view, &pod)),
            "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
        );
    }

    #[test]
    fn taints_must_be_tolerated() {
        let mut n = node("a", "1", "1Gi", 110);
        n.spec.taints = vec![taint("dedicated", Some("gpu"), "NoSchedule")];
        let view = ClusterView::new(&[n], &[]);
        let with = |tols: Vec<Toleration>| PodRequest {
            tolerations: tols,
            ..request("100m", "1Mi")
        };
        let refused = "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}.";
        assert_eq!(message(schedule(&view, &with(vec![]))), refused);
        // Equal (explicit or as the default operator) needs the same value.
        for op in ["Equal", ""] {
            let tol = toleration("dedicated", op, Some("gpu"), "NoSchedule");
            assert_eq!(bind(schedule(&view, &with(vec![tol]))), "a");
            let tol = toleration("dedicated", op, Some("cpu"), "NoSchedule");
            assert_eq!(message(schedule(&view, &with(vec![tol]))), refused);
        }
        // Exists ignores the value; an empty effect matches every effect.
        let tol = toleration("dedicated", "Exists", None, "");
        assert_eq!(bind(schedule(&view, &with(vec![tol]))), "a");
        // An empty key with Exists tolerates everything.
        let tol = toleration("", "Exists", None, "");
        assert_eq!(bind(schedule(&view, &with(vec![tol]))), "a");
        // Another effect or key does not tolerate.
        let tol = toleration("dedicated", "Exists", None, "NoExecute");
        assert_eq!(message(schedule(&view, &with(vec![tol]))), refused);
        let tol = toleration("other", "Exists", None, "");
        assert_eq!(message(schedule(&view, &with(vec![tol]))), refused);
    }

    #[test]
    fn no_execute_filters_and_prefer_no_schedule_does_not() {
        let mut a = node("a", "1", "1Gi", 110);
        a.spec.taints = vec![taint("node.kubernetes.io/unreachable", None, "NoExecute")];
        let mut b = node("b", "1", "1Gi", 110);
        b.spec.taints = vec![taint("soft", Some("x"), "PreferNoSchedule")];
        let view = ClusterView::new(&[a.clone(), b], &[]);
        let pod = request("100m", "1Mi");
        assert_eq!(bind(schedule(&view, &pod)), "b");

        let view = ClusterView::new(&[a], &[]);
        assert_eq!(
            message(schedule(&view, &pod)),
            "0/1 nodes are available: 1 node(s) had untolerated taint \
             {node.kubernetes.io/unreachable: }."
        );
        let mut tolerant = pod.clone();
        tolerant.tolerations = vec![Toleration {
            toleration_seconds: Some(300),
            ..toleration(
                "node.kubernetes.io/unreachable",
                "Exists",
                None,
                "NoExecute",
            )
        }];
        assert_eq!(bind(schedule(&view, &tolerant)), "a");
    }

    #[test]
    fn not_ready_and_unschedulable_nodes_are_skipped() {
        let mut cordoned = node("a", "4", "8Gi", 110);
        cordoned.spec.unschedulable = Some(true);
        let mut not_ready = node("b", "4", "8Gi", 110);
        if let Some(s) = not_ready.status.as_mut() {
            s.conditions[0].status = "Unknown".into();
        }
        let mut no_status = node("c", "4", "8Gi", 110);
        no_status.status = None;
        let small = node("d", "1", "1Gi", 110);
        let view = ClusterView::new(&[cordoned, not_ready, no_status, small], &[]);
        // Only the small, ready, schedulable node is feasible.
        assert_eq!(bind(schedule(&view, &request("100m", "1Mi"))), "d");
        assert_eq!(
            message(schedule(&view, &request("2", "1Mi"))),
            "0/4 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable, \
             2 node(s) were not ready."
        );
        // A pod tolerating the unschedulable taint may go to a cordoned node.
        let mut tolerant = request("2", "1Mi");
        tolerant.tolerations = vec![toleration(TAINT_NODE_UNSCHEDULABLE, "Exists", None, "")];
        assert_eq!(bind(schedule(&view, &tolerant)), "a");
    }

    #[test]
    fn message_counts_sorts_and_formats_like_kube_scheduler() {
        let mut tainted = node("c", "4", "8Gi", 110);
        tainted.spec.taints = vec![
            taint("soft", None, "PreferNoSchedule"),
            taint("key", Some("value"), "NoSchedule"),
        ];
        let nodes = [
            node("a", "4", "1Gi", 110),
            node("b", "4", "1Gi", 110),
            tainted,
        ];
        let view = ClusterView::new(&nodes, &[]);
        // kube-scheduler sorts the "<count> <reason>" strings, so "1 node(s)..." comes first.
        assert_eq!(
            message(schedule(&view, &request("1", "2Gi"))),
            "0/3 nodes are available: 1 node(s) had untolerated taint {key: value}, \
             2 Insufficient memory."
        );
        // The first failing filter is the node's reason: a cordoned node that is also out of
        // memory is only "unschedulable"; taints come before the selector.
        let mut cordoned = node("a", "4", "1Gi", 110);
        cordoned.spec.unschedulable = Some(true);
        let mut tainted = node("b", "4", "8Gi", 110);
        tainted.spec.taints = vec![taint("key", None, "NoExecute")];
        let view = ClusterView::new(&[cordoned, tainted], &[]);
        let mut pod = request("1", "2Gi");
        pod.node_selector = [("zone".to_string(), "x".to_string())].into();
        assert_eq!(
            message(schedule(&view, &pod)),
            "0/2 nodes are available: 1 node(s) had untolerated taint {key: }, \
             1 node(s) were unschedulable."
        );
    }

    #[test]
    fn no_nodes() {
        assert_eq!(
            message(schedule(&ClusterView::default(), &request("1", "1Gi"))),
            "0/0 nodes are available: no nodes available to schedule pods."
        );
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node_and_ties_go_to_the_smallest_name() {
        let nodes = [node("b", "4", "8Gi", 110), node("a", "4", "8Gi", 110)];
        let pods = [bound(
            pod_with(
                vec![resources(&[("cpu", "2"), ("memory", "4Gi")], &[])],
                None,
            ),
            "a",
        )];
        assert_eq!(
            bind(schedule(
                &ClusterView::new(&nodes, &pods),
                &request("1", "1Gi")
            )),
            "b"
        );
        assert_eq!(
            bind(schedule(
                &ClusterView::new(&nodes, &[]),
                &request("1", "1Gi")
            )),
            "a"
        );
        // A bigger node has more left after placing the pod.
        let nodes = [node("a", "2", "2Gi", 110), node("z", "8", "16Gi", 110)];
        assert_eq!(
            bind(schedule(
                &ClusterView::new(&nodes, &[]),
                &request("1", "1Gi")
            )),
            "z"
        );
    }

    #[test]
    fn pods_that_request_nothing_still_spread_by_default_requests() {
        let nodes = [node("a", "1", "1Gi", 110), node("b", "1", "1Gi", 110)];
        let mut view = ClusterView::new(&nodes, &[]);
        let empty = PodRequest::from_pod(&pod_with(vec![resources(&[], &[])], None));
        let first = bind(schedule(&view, &empty));
        view.assume(&first, &empty);
        let second = bind(schedule(&view, &empty));
        assert_ne!(first, second);
    }

    #[test]
    fn replicas_of_one_owner_spread_across_equal_nodes() {
        let nodes = [
            node("a", "8", "16Gi", 110),
            node("b", "8", "16Gi", 110),
            node("c", "8", "16Gi", 110),
        ];
        // Node a already runs unrelated pods, but much less than it could.
        let other = pod_with(
            vec![resources(&[("cpu", "1"), ("memory", "1Gi")], &[])],
            None,
        );
        let mut view = ClusterView::new(&nodes, &[bound(other, "a")]);
        let replica = PodRequest::from_pod(&pod_with(
            vec![resources(&[("cpu", "100m"), ("memory", "64Mi")], &[])],
            Some("rs-1"),
        ));
        let mut placed = Vec::new();
        for _ in 0..6 {
            let n = bind(schedule(&view, &replica));
            assert!(view.assume(&n, &replica));
            placed.push(n);
        }
        for n in ["a", "b", "c"] {
            assert_eq!(view.owner_count(n, "rs-1"), 2, "placements: {placed:?}");
        }
        // Spreading outweighs a small resource difference: with one replica on b and c each,
        // the next goes to a even though a is fuller.
        let mut view = ClusterView::new(&nodes, &[]);
        let other = PodRequest::from_pod(&pod_with(
            vec![resources(&[("cpu", "2"), ("memory", "4Gi")], &[])],
            None,
        ));
        view.assume("a", &other);
        view.assume("b", &replica);
        view.assume("c", &replica);
        assert_eq!(bind(schedule(&view, &replica)), "a");
        view.forget("c", &replica);
        assert_eq!(view.owner_count("c", "rs-1"), 0);
    }

    /// The benchmark's shape: 10,000 pods of 10 owners over 1,000 nodes, scheduled in one pass
    /// with `assume`. Checks correctness, not time.
    #[test]
    fn ten_thousand_pods_over_a_thousand_nodes() {
        let nodes: Vec<Node> = (0..1000)
            .map(|i| node(&format!("node-{i:04}"), "4", "8Gi", 10))
            .collect();
        let mut view = ClusterView::new(&nodes, &[]);
        let owners: Vec<PodRequest> = (0..10)
            .map(|o| {
                PodRequest::from_pod(&pod_with(
                    vec![resources(&[("cpu", "250m"), ("memory", "512Mi")], &[])],
                    Some(&format!("rs-{o}")),
                ))
            })
            .collect();
        for i in 0..10_000 {
            let pod = &owners[i % owners.len()];
            let n = bind(schedule(&view, pod));
            assert!(view.assume(&n, pod));
        }
        // No overcommit: every node is exactly full (10 pods, 2.5 cpu, 5Gi).
        for n in view.nodes() {
            assert_eq!(n.requested.pods, 10, "{}", n.name);
            assert!(n.requested.cpu_millis <= n.allocatable.cpu_millis);
            assert!(n.requested.memory_bytes <= n.allocatable.memory_bytes);
            assert_eq!(n.allocatable.memory_bytes, 8 * GI);
        }
        // Spread: every owner has its 1,000 replicas one per node.
        for o in 0..10 {
            let uid = format!("rs-{o}");
            for n in view.nodes() {
                assert_eq!(view.owner_count(&n.name, &uid), 1, "{uid} on {}", n.name);
            }
        }
        assert_eq!(
            message(schedule(&view, &owners[0])),
            "0/1000 nodes are available: 1000 Too many pods."
        );
    }
}
