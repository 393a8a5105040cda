//! The agent's view of the cluster's Services and Endpoints (kube-proxy's service and
//! endpoints "change trackers"): one list+watch of all `Service`s and one of all `Endpoints`
//! in all namespaces, folded into immutable [`ServiceSnapshot`]s published through a
//! `tokio::sync::watch` channel.
//!
//! Readers (the proxy, in-pod service routing, the DNS server) call
//! [`ServiceTable::snapshot`] for the current state or [`ServiceTable::subscribe`] to await
//! changes; a snapshot never changes once published, so a reader sees one consistent view
//! for as long as it holds the `Arc`.
//!
//! Objects are read leniently from JSON (unknown fields ignored), so a newer API server
//! that adds fields (e.g. `appProtocol`) never stops the table.
//!
//! A list+watch of the Nodes (their pod CIDRs and addresses) decides which endpoint addresses
//! are pods: an address that is not inside the pod CIDR of the node it names (or of any
//! node), or that is a node's address, a ClusterIP or a special address, is never a
//! [`Backend`] (the API server refuses such Endpoints too; this holds for any it stored
//! before, or that another writer got past it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use wasmctl_api::validation::{
    cidrs_overlap, in_cidr, parse_ipv4_cidr, special_ip_reason, HOST_LOOPBACK,
};
use wasmctl_client::Client;

use crate::reflector::{reflect, Event};

/// The cluster domain of service names (`NAME.NS.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// `(namespace, name)` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// `spec.sessionAffinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAffinity {
    None,
    /// Requests (HTTP) or connections (TCP) from one client IP go to the same endpoint while
    /// it stays ready, until `timeout` passes without traffic.
    ClientIP {
        timeout: Duration,
    },
}

/// One ready backend of a Service port: a pod IP and the resolved target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The node the pod runs on (`nodeName`): decides in-process vs over the network.
    pub node_name: Option<String>,
    /// The pod (`targetRef.name`), for logs.
    pub pod: Option<String>,
}

impl Backend {
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, self.port)
    }
}

/// One entry of `spec.ports`, with the ready endpoints the Endpoints object lists for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// `name` (empty when the Service has a single unnamed port).
    pub name: String,
    pub port: u16,
    /// `targetPort` as written (a number or a container port name); the Endpoints carry the
    /// resolved number per pod, which is what [`PortInfo::endpoints`] holds.
    pub target_port: String,
    pub node_port: Option<u16>,
    /// `TCP`, `UDP` or `SCTP` (only TCP is proxied).
    pub protocol: String,
    pub app_protocol: Option<String>,
    /// The ready endpoints for this port (`subsets[].addresses` × the subset's port of this
    /// name), in Endpoints order.
    pub endpoints: Arc<[Backend]>,
}

/// One Service as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub key: ServiceKey,
    pub type_: ServiceType,
    /// `None` for a headless Service (`clusterIP: None`) or one not yet allocated.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<PortInfo>,
    pub session_affinity: SessionAffinity,
    /// The Endpoints object's `notReadyAddresses` IPs (for diagnostics).
    pub not_ready: Vec<Ipv4Addr>,
}

impl ServiceEntry {
    /// The port named `name` (`""` for the single unnamed port).
    pub fn port_named(&self, name: &str) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.name == name)
    }
    /// The port whose `port` is `port`.
    pub fn port_number(&self, port: u16) -> Option<&PortInfo> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == "TCP")
    }
    /// The port a request without an explicit port goes to: port 80 if the Service has it,
    /// else its first TCP port.
    pub fn default_port(&self) -> Option<&PortInfo> {
        self.port_number(80)
            .or_else(|| self.ports.iter().find(|p| p.protocol == "TCP"))
    }
}

/// An immutable view of every Service and its ready endpoints.
#[derive(Debug, Default)]
pub struct ServiceSnapshot {
    services: BTreeMap<ServiceKey, Arc<ServiceEntry>>,
    by_cluster_ip: HashMap<SocketAddrV4, (Arc<ServiceEntry>, usize)>,
    by_node_port: HashMap<u16, (Arc<ServiceEntry>, usize)>,
    cluster_ips: HashSet<Ipv4Addr>,
    /// Every list (Services, Endpoints, Nodes) has completed at least once: before that,
    /// "not found" means "not known yet" (a DNS server should answer SERVFAIL rather than
    /// NXDOMAIN).
    pub synced: bool,
    /// Bumped on every published change.
    pub generation: u64,
}

impl ServiceSnapshot {
    /// Every Service, ordered by namespace then name.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }
    /// A Service by namespace and name.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceEntry>> {
        // BTreeMap lookups need an owned key; Services are few enough per lookup.
        self.services.get(&ServiceKey::new(namespace, name))
    }
    /// The Service port listening on `clusterIP:port`.
    pub fn by_cluster_ip(&self, addr: SocketAddrV4) -> Option<(&Arc<ServiceEntry>, &PortInfo)> {
        self.by_cluster_ip
            .get(&addr)
            .map(|(s, i)| (s, &s.ports[*i]))
    }
    /// Whether `ip` is the ClusterIP of some Service (any port).
    pub fn is_cluster_ip(&self, ip: Ipv4Addr) -> bool {
        self.cluster_ips.contains(&ip)
    }
    /// The Service port that owns `nodePort`.
    pub fn by_node_port(&self, node_port: u16) -> Option<(&Arc<ServiceEntry>, &PortInfo)> {
        self.by_node_port
            .get(&node_port)
            .map(|(s, i)| (s, &s.ports[*i]))
    }
    /// Resolves an in-cluster host name as a pod in `pod_namespace` would:
    /// `NAME`, `NAME.NS`, `NAME.NS.svc`, `NAME.NS.svc.cluster.local` (a trailing dot is
    /// allowed, case is ignored).
    pub fn resolve_host(&self, host: &str, pod_namespace: &str) -> Option<&Arc<ServiceEntry>> {
        let (name, ns) = parse_service_host(host, pod_namespace)?;
        self.get(&ns, &name)
    }

    /// Builds a snapshot from plain entries (the watch loop and tests).
    pub fn from_entries(entries: Vec<ServiceEntry>, synced: bool, generation: u64) -> Self {
        let mut snap = ServiceSnapshot {
            synced,
            generation,
            ..Default::default()
        };
        for e in entries {
            let e = Arc::new(e);
            if let Some(ip) = e.cluster_ip {
                snap.cluster_ips.insert(ip);
            }
            for (i, p) in e.ports.iter().enumerate() {
                if p.protocol != "TCP" {
                    continue;
                }
                if let Some(ip) = e.cluster_ip {
                    snap.by_cluster_ip
                        .insert(SocketAddrV4::new(ip, p.port), (e.clone(), i));
                }
                if let Some(np) = p.node_port {
                    snap.by_node_port.insert(np, (e.clone(), i));
                }
            }
            snap.services.insert(e.key.clone(), e);
        }
        snap
    }
}

/// Splits an in-cluster host name into `(service, namespace)`; `None` for names that cannot
/// be a Service (IP literals, other domains, `localhost`).
pub fn parse_service_host(host: &str, pod_namespace: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return None;
    }
    let domain: Vec<&str> = CLUSTER_DOMAIN.split('.').collect();
    let (name, ns) = match labels.as_slice() {
        [name] => (*name, pod_namespace),
        [name, ns] => (*name, *ns),
        [name, ns, "svc"] => (*name, *ns),
        [name, ns, "svc", rest @ ..] if rest == domain.as_slice() => (*name, *ns),
        _ => return None,
    };
    Some((name.to_string(), ns.to_string()))
}

/// The agent's Service table: fed by [`ServiceTable::run`], read through snapshots.
pub struct ServiceTable {
    tx: watch::Sender<Arc<ServiceSnapshot>>,
}

impl Default for ServiceTable {
    fn default() -> Self {
        ServiceTable {
            tx: watch::Sender::new(Arc::new(ServiceSnapshot::default())),
        }
    }
}

impl ServiceTable {
    pub fn new() -> Arc<ServiceTable> {
        Arc::new(ServiceTable::default())
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<ServiceSnapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every published snapshot (`changed().await`, then `borrow()`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ServiceSnapshot>> {
        self.tx.subscribe()
    }

    /// Replaces the table (tests; the watch loop publishes through the same path).
    pub fn publish(&self, snapshot: ServiceSnapshot) {
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// Lists and watches Services and Endpoints until `shutdown`, publishing a new snapshot
    /// after each burst of changes.
    pub async fn run(self: Arc<Self>, api: Client, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<Change>(1024);
        let mut tasks = tokio::task::JoinSet::new();
        for kind in [Kind::Services, Kind::Endpoints, Kind::Nodes] {
            let wrap = move |e| match e {
                Event::Reset(items) => Some(Change::Reset(kind, items)),
                Event::Upsert(obj) => Some(Change::Upsert(kind, obj)),
                Event::Delete(obj) => match kind {
                    Kind::Nodes => node_name(&obj).map(|n| ServiceKey::new("", &n)),
                    _ => key_of(&obj),
                }
                .map(|k| Change::Delete(kind, k)),
            };
            let path = kind.path().to_string();
            tasks.spawn(reflect(
                api.clone(),
                path,
                tx.clone(),
                wrap,
                shutdown.clone(),
            ));
        }
        drop(tx);
        let mut state = State::default();
        while let Some(change) = rx.recv().await {
            state.apply(change);
            // Fold a burst into one snapshot.
            while let Ok(change) = rx.try_recv() {
                state.apply(change);
            }
            if state.dirty {
                state.dirty = false;
                state.generation += 1;
                self.publish(state.build());
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services,
    Endpoints,
    Nodes,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Services => "/api/v1/services",
            Kind::Endpoints => "/api/v1/endpoints",
            Kind::Nodes => "/api/v1/nodes",
        }
    }
}

enum Change {
    /// A complete list: replaces everything of that kind.
    Reset(Kind, Vec<Value>),
    Upsert(Kind, Value),
    /// A deleted object (a Node's key has an empty namespace).
    Delete(Kind, ServiceKey),
}

fn key_of(obj: &Value) -> Option<ServiceKey> {
    let m = &obj["metadata"];
    Some(ServiceKey::new(
        m["namespace"].as_str()?,
        m["name"].as_str()?,
    ))
}

fn node_name(obj: &Value) -> Option<String> {
    obj["metadata"]["name"].as_str().map(str::to_string)
}

/// What the agent keeps of a Node: where its pods' IPs are and its own addresses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct NodeNet {
    /// `spec.podCIDR` and `spec.podCIDRs` (IPv4), without any that takes in the host's own
    /// loopback services (127.0.0.0/24): no agent runs pods there.
    pod_cidrs: Vec<(Ipv4Addr, u8)>,
    /// `status.addresses`.
    addresses: Vec<IpAddr>,
}

fn decode_node(v: &Value) -> Option<(String, NodeNet)> {
    let name = node_name(v)?;
    let spec = &v["spec"];
    let mut net = NodeNet::default();
    let cidrs = spec["podCIDR"].as_str().into_iter().chain(
        spec["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str),
    );
    for c in cidrs.filter_map(parse_ipv4_cidr) {
        if !cidrs_overlap(c, HOST_LOOPBACK) && !net.pod_cidrs.contains(&c) {
            net.pod_cidrs.push(c);
        }
    }
    for a in v["status"]["addresses"].as_array().into_iter().flatten() {
        if let Some(ip) = a["address"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) {
            net.addresses.push(ip.to_canonical());
        }
    }
    Some((name, net))
}

/// Which endpoint addresses are pods, from the Nodes and the ClusterIPs.
struct PodAddresses<'a> {
    nodes: &'a HashMap<String, NodeNet>,
    /// Every node's addresses, with the node's name.
    node_addresses: HashMap<IpAddr, &'a str>,
    cluster_ips: HashSet<Ipv4Addr>,
}

impl PodAddresses<'_> {
    /// Why the address `ip` (naming `node`) is not a pod's, or `None`.
    fn refusal(&self, ip: Ipv4Addr, node: Option<&str>) -> Option<String> {
        if let Some(why) = special_ip_reason(IpAddr::V4(ip)) {
            return Some(why);
        }
        if self.cluster_ips.contains(&ip) {
            return Some("is a ClusterIP".into());
        }
        if let Some(n) = self.node_addresses.get(&IpAddr::V4(ip)) {
            return Some(format!("is the address of node {n:?}"));
        }
        let named = node
            .and_then(|n| self.nodes.get(n))
            .filter(|net| !net.pod_cidrs.is_empty());
        match named {
            // The node it names publishes its CIDR: the address must be one of its pods'.
            Some(net) if net.pod_cidrs.iter().any(|c| in_cidr(*c, ip)) => None,
            Some(_) => Some(format!(
                "is not inside the pod CIDR of node {:?}",
                node.unwrap_or_default()
            )),
            None if self
                .nodes
                .values()
                .any(|net| net.pod_cidrs.iter().any(|c| in_cidr(*c, ip))) =>
            {
                None
            }
            None => Some("is not inside any node's pod CIDR".into()),
        }
    }
}

#[derive(Default)]
struct State {
    services: HashMap<ServiceKey, WireService>,
    endpoints: HashMap<ServiceKey, WireEndpoints>,
    /// By node name.
    nodes: HashMap<String, NodeNet>,
    synced: [bool; 3],
    dirty: bool,
    generation: u64,
    /// The endpoint addresses the last build left out, so each is logged once.
    refused: HashSet<(ServiceKey, Ipv4Addr)>,
}

impl State {
    fn apply(&mut self, change: Change) {
        // A Node's status changes every heartbeat: only a change of its addresses or pod
        // CIDRs makes a new snapshot.
        if !matches!(
            change,
            Change::Upsert(Kind::Nodes, _) | Change::Delete(Kind::Nodes, _)
        ) {
            self.dirty = true;
        }
        match change {
            Change::Reset(kind, items) => {
                let idx = kind as usize;
                self.synced[idx] = true;
                match kind {
                    Kind::Services => {
                        self.services = items.into_iter().filter_map(decode).collect();
                    }
                    Kind::Endpoints => {
                        self.endpoints = items.into_iter().filter_map(decode).collect();
                    }
                    Kind::Nodes => {
                        self.nodes = items.iter().filter_map(decode_node).collect();
                    }
                }
            }
            Change::Upsert(Kind::Nodes, v) => {
                if let Some((name, net)) = decode_node(&v) {
                    if self.nodes.get(&name) != Some(&net) {
                        self.nodes.insert(name, net);
                        self.dirty = true;
                    }
                }
            }
            Change::Delete(Kind::Nodes, k) => {
                if self.nodes.remove(&k.name).is_some() {
                    self.dirty = true;
                }
            }
            Change::Upsert(Kind::Services, v) => {
                if let Some((k, s)) = decode(v) {
                    self.services.insert(k, s);
                }
            }
            Change::Upsert(Kind::Endpoints, v) => {
                if let Some((k, e)) = decode(v) {
                    self.endpoints.insert(k, e);
                }
            }
            Change::Delete(Kind::Services, k) => {
                self.services.remove(&k);
            }
            Change::Delete(Kind::Endpoints, k) => {
                self.endpoints.remove(&k);
            }
        }
    }

    fn build(&mut self) -> ServiceSnapshot {
        let pods = PodAddresses {
            nodes: &self.nodes,
            node_addresses: self
                .nodes
                .iter()
                .flat_map(|(n, net)| net.addresses.iter().map(move |a| (*a, n.as_str())))
                .collect(),
            cluster_ips: self
                .services
                .values()
                .filter_map(|s| s.spec.cluster_ip.as_deref()?.parse().ok())
                .collect(),
        };
        let mut refused = HashMap::new();
        let entries = self
            .services
            .iter()
            .map(|(k, s)| build_entry(k, s, self.endpoints.get(k), &pods, &mut refused))
            .collect();
        let synced = self.synced.iter().all(|s| *s);
        // Until the Nodes are listed every address is refused: that is not news.
        if synced {
            for ((svc, ip), why) in &refused {
                if !self.refused.contains(&(svc.clone(), *ip)) {
                    tracing::warn!(service = %svc, endpoint = %ip, reason = %why, "not sending to an endpoint that is not a pod");
                }
            }
            self.refused = refused.into_keys().collect();
        }
        ServiceSnapshot::from_entries(entries, synced, self.generation)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(v: Value) -> Option<(ServiceKey, T)> {
    let k = key_of(&v)?;
    match serde_json::from_value(v) {
        Ok(t) => Some((k, t)),
        Err(e) => {
            tracing::warn!(object = %k, error = %e, "ignoring an undecodable object");
            None
        }
    }
}

// Lenient wire shapes: only the fields the agent uses, unknown fields ignored.

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireService {
    #[serde(default)]
    spec: WireServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServiceSpec {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<WireServicePort>,
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    session_affinity_config: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireServicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
    port: i64,
    #[serde(default)]
    target_port: Option<Value>,
    #[serde(default)]
    node_port: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoints {
    #[serde(default)]
    subsets: Vec<WireSubset>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSubset {
    #[serde(default)]
    addresses: Vec<WireAddress>,
    #[serde(default)]
    not_ready_addresses: Vec<WireAddress>,
    #[serde(default)]
    ports: Vec<WireEndpointPort>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAddress {
    ip: String,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    target_ref: Option<WireTargetRef>,
}

#[derive(Debug, Default, Deserialize)]
struct WireTargetRef {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpointPort {
    #[serde(default)]
    name: Option<String>,
    port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

fn port_u16(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The entry of Service `key`; the endpoint addresses `pods` refuses are left out and put in
/// `refused` with the reason.
fn build_entry(
    key: &ServiceKey,
    s: &WireService,
    eps: Option<&WireEndpoints>,
    pods: &PodAddresses<'_>,
    refused: &mut HashMap<(ServiceKey, Ipv4Addr), String>,
) -> ServiceEntry {
    let spec = &s.spec;
    let type_ = match spec.type_.as_deref() {
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        _ => ServiceType::ClusterIP,
    };
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let secs = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c["clientIP"]["timeoutSeconds"].as_u64())
                .filter(|s| *s > 0);
            SessionAffinity::ClientIP {
                timeout: secs
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
            }
        }
        _ => SessionAffinity::None,
    };
    let ports = spec
        .ports
        .iter()
        .filter_map(|p| {
            let port = port_u16(p.port)?;
            let name = p.name.clone().unwrap_or_default();
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let mut endpoints = Vec::new();
            for subset in eps.map(|e| e.subsets.as_slice()).unwrap_or_default() {
                let Some(ep) = subset.ports.iter().find(|ep| {
                    ep.name.as_deref().unwrap_or("") == name
                        && ep.protocol.as_deref().unwrap_or("TCP") == protocol
                }) else {
                    continue;
                };
                let Some(target) = port_u16(ep.port) else {
                    continue;
                };
                for a in &subset.addresses {
                    let Ok(ip) = a.ip.parse::<Ipv4Addr>() else {
                        continue;
                    };
                    if let Some(why) = pods.refusal(ip, a.node_name.as_deref()) {
                        refused.insert((key.clone(), ip), why);
                        continue;
                    }
                    endpoints.push(Backend {
                        ip,
                        port: target,
                        node_name: a.node_name.clone(),
                        pod: a.target_ref.as_ref().and_then(|t| t.name.clone()),
                    });
                }
            }
            Some(PortInfo {
                name,
                port,
                target_port: match &p.target_port {
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::String(s)) => s.clone(),
                    _ => port.to_string(),
                },
                node_port: p.node_port.and_then(port_u16),
                protocol,
                app_protocol: p.app_protocol.clone(),
                endpoints: endpoints.into(),
            })
        })
        .collect();
    let not_ready = eps
        .map(|e| {
            e.subsets
                .iter()
                .flat_map(|s| s.not_ready_addresses.iter())
                .filter_map(|a| a.ip.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ServiceEntry {
        key: key.clone(),
        type_,
        cluster_ip,
        ports,
        session_affinity,
        not_ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Value {
        json!({
            "metadata": {"namespace": "default", "name": "web", "uid": "u1"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "127.96.0.10",
                "selector": {"app": "web"},
                "sessionAffinity": "ClientIP",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080, "protocol": "TCP"},
                    {"name": "metrics", "port": 9090, "targetPort": 9090, "appProtocol": "http", "protocol": "TCP"}
                ]
            }
        })
    }

    fn endpoints() -> Value {
        json!({
            "metadata": {"namespace": "default", "name": "web"},
            "subsets": [
                {
                    "addresses": [
                        {"ip": "127.1.0.2", "nodeName": "a", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}},
                        {"ip": "127.2.0.2", "nodeName": "b", "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "default"}}
                    ],
                    "notReadyAddresses": [{"ip": "127.1.0.3", "nodeName": "a"}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "metrics", "port": 9090, "protocol": "TCP"}]
                },
                {
                    "addresses": [{"ip": "127.2.0.5", "nodeName": "b"}],
                    "ports": [{"name": "http", "port": 8081, "protocol": "TCP"}]
                }
            ]
        })
    }

    /// Nodes `a` (pods in 127.1.0.0/16) and `b` (127.2.0.0/16), as agents register them.
    fn nodes() -> Vec<Value> {
        let node = |name: &str, cidr: &str, ip: &str| {
            json!({"metadata": {"name": name},
                   "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                   "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                            {"type": "Hostname", "address": name}]}})
        };
        vec![
            node("a", "127.1.0.0/16", "127.250.0.1"),
            node("b", "127.2.0.0/16", "127.250.0.2"),
        ]
    }

    fn table(services: Vec<Value>, eps: Vec<Value>) -> ServiceSnapshot {
        let mut st = State::default();
        st.apply(Change::Reset(Kind::Services, services));
        st.apply(Change::Reset(Kind::Endpoints, eps));
        st.apply(Change::Reset(Kind::Nodes, nodes()));
        st.build()
    }

    #[test]
    fn lookups() {
        let snap = table(vec![service()], vec![endpoints()]);
        assert!(snap.synced);
        let web = snap.get("default", "web").expect("by name");
        assert_eq!(web.type_, ServiceType::NodePort);
        assert_eq!(web.cluster_ip, Some(Ipv4Addr::new(127, 96, 0, 10)));
        assert_eq!(
            web.session_affinity,
            SessionAffinity::ClientIP {
                timeout: DEFAULT_AFFINITY_TIMEOUT
            }
        );
        assert_eq!(web.not_ready, vec![Ipv4Addr::new(127, 1, 0, 3)]);
        let http = web.port_named("http").unwrap();
        assert_eq!(http.target_port, "web");
        let eps: Vec<_> = http
            .endpoints
            .iter()
            .map(|b| b.addr().to_string())
            .collect();
        assert_eq!(eps, ["127.1.0.2:8080", "127.2.0.2:8080", "127.2.0.5:8081"]);
        assert_eq!(http.endpoints[0].pod.as_deref(), Some("web-1"));
        assert_eq!(http.endpoints[1].node_name.as_deref(), Some("b"));
        let metrics = web.port_named("metrics").unwrap();
        assert_eq!(metrics.endpoints.len(), 2);
        assert_eq!(metrics.app_protocol.as_deref(), Some("http"));

        let (s, p) = snap
            .by_cluster_ip("127.96.0.10:9090".parse().unwrap())
            .unwrap();
        assert_eq!((s.key.name.as_str(), p.name.as_str()), ("web", "metrics"));
        assert!(snap
            .by_cluster_ip("127.96.0.10:81".parse().unwrap())
            .is_none());
        let (s, p) = snap.by_node_port(30080).unwrap();
        assert_eq!((s.key.name.as_str(), p.port), ("web", 80));
        assert!(snap.by_node_port(30081).is_none());
        assert_eq!(web.default_port().unwrap().port, 80);
        assert!(snap.is_cluster_ip(Ipv4Addr::new(127, 96, 0, 10)));
    }

    #[test]
    fn watch_changes() {
        let mut st = State::default();
        st.apply(Change::Reset(Kind::Services, vec![service()]));
        assert!(!st.build().synced, "endpoints not listed yet");
        // A Service without Endpoints yet has ports and no endpoints.
        st.apply(Change::Reset(Kind::Endpoints, vec![]));
        assert!(!st.build().synced, "nodes not listed yet");
        st.apply(Change::Reset(Kind::Nodes, nodes()));
        let snap = st.build();
        assert!(snap.synced);
        assert!(snap.get("default", "web").unwrap().ports[0]
            .endpoints
            .is_empty());
        st.apply(Change::Upsert(Kind::Endpoints, endpoints()));
        assert_eq!(
            st.build().get("default", "web").unwrap().ports[0]
                .endpoints
                .len(),
            3
        );
        st.apply(Change::Delete(
            Kind::Services,
            ServiceKey::new("default", "web"),
        ));
        let snap = st.build();
        assert!(snap.get("default", "web").is_none());
        assert!(snap.by_node_port(30080).is_none());
    }

    #[test]
    fn headless_and_defaults() {
        let svc = json!({
            "metadata": {"namespace": "ns", "name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        });
        let snap = table(vec![svc], vec![]);
        let db = snap.get("ns", "db").unwrap();
        assert_eq!(db.type_, ServiceType::ClusterIP);
        assert_eq!(db.cluster_ip, None);
        assert_eq!(db.session_affinity, SessionAffinity::None);
        assert_eq!(db.ports[0].name, "");
        assert_eq!(db.ports[0].protocol, "TCP");
        assert_eq!(db.ports[0].target_port, "5432");
        assert_eq!(db.default_port().unwrap().port, 5432);
    }

    #[test]
    fn host_names() {
        let p = |h: &str| parse_service_host(h, "shop");
        let s = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(p("cart"), s("cart", "shop"));
        assert_eq!(p("cart.other"), s("cart", "other"));
        assert_eq!(p("cart.other.svc"), s("cart", "other"));
        assert_eq!(p("Cart.Other.svc.cluster.local."), s("cart", "other"));
        assert_eq!(p("cart.other.svc.example.com"), None);
        assert_eq!(p("example.com.au"), None);
        assert_eq!(p("localhost"), None);
        assert_eq!(p("127.0.0.1"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("a..b"), None);
        let snap = table(vec![service()], vec![]);
        assert!(snap.resolve_host("web", "default").is_some());
        assert!(snap.resolve_host("web.default.svc", "shop").is_some());
        assert!(snap.resolve_host("web", "shop").is_none());
    }

    /// Issue 11, item 6: the agent built a Backend of every IPv4 address an Endpoints object
    /// listed, so a selector-less Service with hand-written Endpoints was a way out of the
    /// pod's egress rules to the host (127.0.0.1:10250), a node, the metadata address or a
    /// ClusterIP. Only pod addresses are Backends now.
    #[test]
    fn endpoints_that_are_not_pods_are_dropped() {
        let svc = json!({
            "metadata": {"namespace": "default", "name": "tunnel"},
            "spec": {"clusterIP": "127.96.0.20", "ports": [{"port": 80}]}
        });
        let eps = json!({
            "metadata": {"namespace": "default", "name": "tunnel"},
            "subsets": [{
                "addresses": [
                    {"ip": "127.1.0.9", "nodeName": "a"},
                    {"ip": "127.2.0.9"},
                    {"ip": "127.0.0.1"},
                    {"ip": "169.254.169.254"},
                    {"ip": "127.96.0.10"},
                    {"ip": "127.250.0.2"},
                    {"ip": "127.2.0.10", "nodeName": "a"},
                    {"ip": "127.7.0.1"},
                    {"ip": "10.0.0.5"},
                    {"ip": "127.1.0.11", "nodeName": "unknown"}
                ],
                "ports": [{"port": 10250}]
            }]
        });
        let mut st = State::default();
        st.apply(Change::Reset(Kind::Services, vec![service(), svc]));
        st.apply(Change::Reset(Kind::Endpoints, vec![eps]));
        st.apply(Change::Reset(Kind::Nodes, nodes()));
        let snap = st.build();
        let port = &snap.get("default", "tunnel").unwrap().ports[0];
        let kept: Vec<String> = port
            .endpoints
            .iter()
            .map(|b| b.addr().to_string())
            .collect();
        assert_eq!(
            kept,
            ["127.1.0.9:10250", "127.2.0.9:10250", "127.1.0.11:10250"]
        );
        let mut refused: Vec<String> = st.refused.iter().map(|(_, ip)| ip.to_string()).collect();
        refused.sort();
        assert_eq!(
            refused,
            [
                "10.0.0.5",
                "127.0.0.1",
                "127.2.0.10",
                "127.250.0.2",
                "127.7.0.1",
                "127.96.0.10",
                "169.254.169.254"
            ]
        );
        // A node that goes takes its pods' addresses with it; one that comes back restores
        // them. Heartbeats (same CIDR and addresses) publish nothing new.
        st.dirty = false;
        st.apply(Change::Upsert(Kind::Nodes, nodes()[1].clone()));
        assert!(!st.dirty, "an unchanged node is not a change");
        st.apply(Change::Delete(Kind::Nodes, ServiceKey::new("", "b")));
        assert!(st.dirty);
        let port = st.build().get("default", "tunnel").unwrap().ports[0].clone();
        assert_eq!(port.endpoints.len(), 2);
        st.apply(Change::Upsert(Kind::Nodes, nodes()[1].clone()));
        let port = st.build().get("default", "tunnel").unwrap().ports[0].clone();
        assert_eq!(port.endpoints.len(), 3);
        // A Node whose "pod CIDR" takes in the host's loopback services vouches for nothing.
        let rogue = json!({"metadata": {"name": "rogue"}, "spec": {"podCIDR": "127.0.0.0/8"}});
        st.apply(Change::Upsert(Kind::Nodes, rogue));
        let port = st.build().get("default", "tunnel").unwrap().ports[0].clone();
        assert_eq!(port.endpoints.len(), 3);
    }
}
