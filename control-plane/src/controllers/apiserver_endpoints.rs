//! The `kubernetes` Service and its Endpoints in `default`: where clients find the API
//! servers, kept up to date as kube-apiserver's lease endpoint reconciler does.
//!
//! - **Leases**: in an HA cluster (more than one Raft member) every server writes the record
//!   `/wasmctl/apiserver-leases/<node id>` (its advertise address and renew time, JSON) every
//!   [`RENEW`]; a record not renewed for [`TTL`] has expired. These are store keys, not
//!   objects (kube's `/masterleases/<ip>` etcd keys): nothing in the API shows them. A single
//!   server writes none — its own address is the whole answer.
//! - **Reconciling** (the Raft leader only): the addresses are the leader's own and those of
//!   the unexpired leases of current Raft members (expired ones, and those of members that
//!   left, are deleted with a compare-and-swap on their revision). The Service `kubernetes`
//!   (no selector, `ClusterIP`, port `https` 443 → the servers' port, the first IP of the
//!   service range when it is free) is created through [`Objects::create`] like any Service,
//!   so the allocator gives it its address. The Endpoints list one subset per distinct port
//!   (servers may listen on different ports), addresses sorted.
//! - **Why the Endpoints bypass the registry's checks**: Endpoints written by clients may not
//!   name loopback (127.0.0.0/24), a node's address or anything outside the pod CIDRs, so
//!   that a selector-less Service cannot tunnel to the host. The API servers are exactly such
//!   addresses (127.0.0.1 in a single-host cluster; the nodes' host). So the server writes
//!   `default/kubernetes` itself, straight to the store (an internal write path, like kube's
//!   reconciler writing to storage): the object is built typed and encoded in the canonical
//!   form `normalize` gives (a unit test checks that), with a CAS on its revision. Clients
//!   keep the checks: a client's write of these Endpoints is validated as any other (and this
//!   reconciler puts the servers back within [`RENEW`]). The endpoints controller leaves them
//!   alone (it skips Services without a selector), and the agents' proxies check endpoint
//!   addresses again before they connect (they refuse these: pods cannot reach the API
//!   through the Service yet).
//! - **Clocks**: leases expire by the leader's wall clock against the writer's renew time,
//!   so the servers' clocks must agree within `TTL - RENEW` (10 s), as kube's do.
//! - **Shutdown**: an HA server deletes its lease (and, as leader, drops its own address)
//!   within [`SHUTDOWN_BUDGET`], so clients stop being sent to it at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service};
use wasmctl_api::meta::{IntOrString, Time};
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_store::{Op, OpResult, Precondition, Store};

use crate::error::ApiError;
use crate::objects::{encode_object, Objects};

/// Where the leases are kept (one key per Raft node id).
pub const LEASE_PREFIX: &str = "/wasmctl/apiserver-leases/";
/// How often a server renews its lease (and the leader reconciles).
pub const RENEW: Duration = Duration::from_secs(5);
/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(15);
/// What a shutting-down server may spend on withdrawing its address.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(2);
/// At most this many addresses are published (clients use at most 7 anyway).
const MAX_ADDRESSES: usize = 64;

pub const NAMESPACE: &str = "default";
pub const NAME: &str = "kubernetes";
/// The Service's port (kube's) and its name, which the Endpoints' ports share.
pub const SERVICE_PORT: i32 = 443;
pub const PORT_NAME: &str = "https";

/// One server's lease record, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// `ip:port` of its API server.
    pub address: String,
    /// When it was last renewed (ms since the Unix epoch, the writer's clock).
    pub renew_time_unix_ms: u64,
    pub lease_duration_seconds: u64,
}

impl LeaseRecord {
    pub fn live(&self, now_unix_ms: u64) -> bool {
        self.renew_time_unix_ms
            .saturating_add(self.lease_duration_seconds.saturating_mul(1000))
            > now_unix_ms
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn services() -> &'static ResourceInfo {
    registry::by_kind("v1", "Service").expect("Services are served")
}

fn endpoints() -> &'static ResourceInfo {
    registry::by_kind("v1", "Endpoints").expect("Endpoints are served")
}

/// The address this server publishes: `advertise` (`ip:port`), an unspecified IP (a single
/// server on `--listen 0.0.0.0:P`) read as 127.0.0.1 like the kubeconfig's URL.
pub fn published_address(advertise: &str) -> Option<SocketAddr> {
    let mut a: SocketAddr = advertise.parse().ok()?;
    if a.ip().is_unspecified() {
        a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    (a.port() != 0).then_some(a)
}

/// The addresses to publish: `own` (the leader, alive by definition, unless it is leaving)
/// and those of the unexpired leases of current `members`; and the lease keys to delete
/// (expired, a member no more, or undecodable), with the revisions they were read at.
pub fn plan_addresses(
    own: Option<SocketAddr>,
    leases: &[(String, u64, Option<LeaseRecord>)],
    members: &HashSet<u64>,
    now_unix_ms: u64,
) -> (BTreeSet<SocketAddr>, Vec<(String, u64)>) {
    let mut addrs: BTreeSet<SocketAddr> = own.into_iter().collect();
    let mut stale = Vec::new();
    for (key, rev, rec) in leases {
        let id = key
            .strip_prefix(LEASE_PREFIX)
            .and_then(|id| id.parse::<u64>().ok());
        let addr = rec
            .as_ref()
            .and_then(|r| r.address.parse::<SocketAddr>().ok());
        match (id, rec, addr) {
            (Some(id), Some(r), Some(a)) if members.contains(&id) && r.live(now_unix_ms) => {
                if addrs.len() < MAX_ADDRESSES {
                    addrs.insert(a);
                }
            }
            _ => stale.push((key.clone(), *rev)),
        }
    }
    (addrs, stale)
}

/// The Endpoints subsets for `addrs`: one per distinct port, addresses sorted.
pub fn subsets(addrs: &BTreeSet<SocketAddr>) -> Vec<EndpointSubset> {
    let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for a in addrs {
        by_port.entry(a.port()).or_default().push(a.ip());
    }
    by_port
        .into_iter()
        .map(|(port, mut ips)| {
            ips.sort();
            ips.dedup();
            EndpointSubset {
                addresses: ips
                    .into_iter()
                    .map(|ip| EndpointAddress {
                        ip: ip.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                not_ready_addresses: Vec::new(),
                ports: vec![EndpointPort {
                    name: Some(PORT_NAME.into()),
                    port: i32::from(port),
                    protocol: Some("TCP".into()),
                }],
            }
        })
        .collect()
}

/// The Service's `targetPort`: the port most servers listen on (the smallest of a tie);
/// clients and proxies match the Endpoints by the port's name, so servers on other ports are
/// reached too.
pub fn target_port(addrs: &BTreeSet<SocketAddr>) -> Option<u16> {
    let mut count: BTreeMap<u16, usize> = BTreeMap::new();
    for a in addrs {
        *count.entry(a.port()).or_default() += 1;
    }
    // max_by_key keeps the last maximum: iterate from the largest port down.
    count
        .into_iter()
        .rev()
        .max_by_key(|(_, n)| *n)
        .map(|(p, _)| p)
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("component".to_string(), "apiserver".to_string()),
        ("provider".to_string(), "kubernetes".to_string()),
    ])
}

fn endpoints_labels() -> BTreeMap<String, String> {
    let mut l = labels();
    l.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    l
}

fn desired_ports(target: u16) -> Value {
    json!([{"name": PORT_NAME, "protocol": "TCP", "port": SERVICE_PORT,
            "targetPort": i32::from(target)}])
}

fn ports_match(svc: &Service, target: u16) -> bool {
    match svc.spec.ports.as_slice() {
        [p] => {
            p.name.as_deref() == Some(PORT_NAME)
                && p.port == SERVICE_PORT
                && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                && p.target_port == Some(IntOrString::Int(i32::from(target)))
        }
        _ => false,
    }
}

/// The Endpoints object as stored: `current` (the stored one, if it decodes) with `subsets`
/// and the labels; a new one otherwise. Canonical (what `normalize` would give, were the
/// addresses allowed), without `resourceVersion`.
pub fn endpoints_object(current: Option<&Endpoints>, subsets: Vec<EndpointSubset>) -> Endpoints {
    let mut ep = match current {
        Some(c) => c.clone(),
        None => {
            let mut e = Endpoints::default();
            e.metadata.name = NAME.into();
            e.metadata.namespace = Some(NAMESPACE.into());
            e.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
            e.metadata.creation_timestamp = Some(Time::now());
            e
        }
    };
    ep.api_version = "v1".into();
    ep.kind = "Endpoints".into();
    ep.metadata.resource_version = None;
    for (k, v) in endpoints_labels() {
        ep.metadata.labels.insert(k, v);
    }
    ep.subsets = subsets;
    ep
}

/// Keeps this server's lease and, on the leader, the `kubernetes` Service and Endpoints, until
/// `shutdown`. `advertise` is this server's `ip:port` (`StoreConfig::advertise_addr`).
pub async fn run(objects: Objects, advertise: String, shutdown: CancellationToken) {
    let own = published_address(&advertise);
    if own.is_none() {
        tracing::warn!(%advertise, "not publishing this API server in Endpoints default/kubernetes: its address is not ip:port");
    }
    let store = objects.store().clone();
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ha = false;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        ha = store.members().len() > 1;
        let mut result = Ok(());
        if ha {
            if let Some(own) = own {
                result = renew(&store, own).await;
            }
        }
        if result.is_ok() && store.is_leader() {
            result = reconcile(&objects, own).await;
        }
        // Logged once per distinct error (a member without quorum fails every tick).
        match result {
            Ok(()) => last_error = None,
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::info!(error = %msg, "publishing the API servers in Endpoints default/kubernetes failed; retrying");
                    last_error = Some(msg);
                }
            }
        }
    }
    if ha {
        let withdraw = async {
            let key = format!("{LEASE_PREFIX}{}", store.node_id());
            let _ = store
                .write(vec![Op::Delete {
                    key,
                    precondition: Precondition::None,
                }])
                .await;
            if store.is_leader() {
                let _ = reconcile(&objects, None).await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_BUDGET, withdraw).await;
    }
}

async fn renew(store: &Store, own: SocketAddr) -> Result<(), ApiError> {
    let rec = LeaseRecord {
        address: own.to_string(),
        renew_time_unix_ms: unix_ms(),
        lease_duration_seconds: TTL.as_secs(),
    };
    let value = serde_json::to_vec(&rec).map_err(|e| ApiError::Internal(e.to_string()))?;
    store
        .write(vec![Op::Put {
            key: format!("{LEASE_PREFIX}{}", store.node_id()),
            value,
            precondition: Precondition::None,
        }])
        .await?;
    Ok(())
}

/// One pass of the leader: the addresses from the leases, then the Service, then the
/// Endpoints (in that order: the endpoints controller deletes Endpoints left without their
/// Service).
async fn reconcile(objects: &Objects, own: Option<SocketAddr>) -> Result<(), ApiError> {
    let store = objects.store();
    let members: HashSet<u64> = store.members().iter().map(|m| m.id).collect();
    let range = store.range(LEASE_PREFIX, None, 0).await?;
    let leases: Vec<(String, u64, Option<LeaseRecord>)> = range
        .items
        .iter()
        .filter(|kv| own.is_some() || kv.key != format!("{LEASE_PREFIX}{}", store.node_id()))
        .map(|kv| {
            (
                kv.key.clone(),
                kv.mod_revision,
                serde_json::from_slice(&kv.value).ok(),
            )
        })
        .collect();
    let (addrs, stale) = plan_addresses(own, &leases, &members, unix_ms());
    if !stale.is_empty() {
        let ops = stale
            .into_iter()
            .map(|(key, rev)| Op::Delete {
                key,
                precondition: Precondition::ModRevision(rev),
            })
            .collect();
        // A lost race is a lease renewed meanwhile: it stays.
        store.write(ops).await?;
    }
    if let Some(port) = target_port(&addrs) {
        ensure_service(objects, port).await?;
    }
    ensure_endpoints(store, &addrs).await
}

async fn ensure_service(objects: &Objects, target: u16) -> Result<(), ApiError> {
    let info = services();
    match objects.get(info, Some(NAMESPACE), NAME).await {
        Ok(v) => {
            let svc: Service = serde_json::from_value(v).map_err(|e| {
                ApiError::Internal(format!("decoding Service default/kubernetes: {e}"))
            })?;
            if ports_match(&svc, target) {
                return Ok(());
            }
            let ports = desired_ports(target);
            objects
                .guaranteed_update(info, Some(NAMESPACE), NAME, None, |cur| {
                    let mut next = cur.clone();
                    next["spec"]["ports"] = ports.clone();
                    Ok(next)
                })
                .await?;
            Ok(())
        }
        Err(ApiError::NotFound { .. }) => {
            let mut body = json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels()},
                "spec": {"type": "ClusterIP", "sessionAffinity": "None",
                         "ports": desired_ports(target)},
            });
            // kube gives it the first address of the range; taken (a cluster that had
            // Services before this existed), the allocator picks one.
            if let Some(first) = first_ip(objects) {
                body["spec"]["clusterIP"] = json!(first.to_string());
                match objects.create(info, Some(NAMESPACE), body.clone()).await {
                    Ok(_) | Err(ApiError::AlreadyExists { .. }) => return Ok(()),
                    Err(ApiError::Invalid { .. }) => {
                        if let Some(spec) = body["spec"].as_object_mut() {
                            spec.remove("clusterIP");
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            match objects.create(info, Some(NAMESPACE), body).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The first usable address of `--service-cluster-ip-range`.
fn first_ip(objects: &Objects) -> Option<Ipv4Addr> {
    let range = objects.service_ranges().cluster_ip.to_string();
    let (network, _) = wasmctl_api::validation::parse_ipv4_cidr(&range)?;
    Some(Ipv4Addr::from(u32::from(network).checked_add(1)?))
}

async fn ensure_endpoints(store: &Store, addrs: &BTreeSet<SocketAddr>) -> Result<(), ApiError> {
    let key = endpoints().key(NAMESPACE, NAME);
    let want = subsets(addrs);
    let current = store.get(&key).await?;
    let (next, precondition) = match &current {
        None => (endpoints_object(None, want), Precondition::MustNotExist),
        Some(kv) => {
            let cur: Option<Endpoints> = serde_json::from_slice(&kv.value).ok();
            let next = endpoints_object(cur.as_ref(), want);
            if cur.as_ref() == Some(&next) {
                return Ok(());
            }
            (next, Precondition::ModRevision(kv.mod_revision))
        }
    };
    let value = encode_object(&next)?;
    match store
        .write(vec![Op::Put {
            key,
            value,
            precondition,
        }])
        .await?
        .into_iter()
        .next()
    {
        Some(OpResult::Ok { .. }) => Ok(()),
        // Someone else wrote meanwhile: the next pass looks again.
        Some(OpResult::AlreadyExists | OpResult::Conflict { .. } | OpResult::NotFound) => Ok(()),
        other => Err(ApiError::Internal(format!(
            "unexpected store result {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn lease(key: u64, address: &str, renewed: u64) -> (String, u64, Option<LeaseRecord>) {
        (
            format!("{LEASE_PREFIX}{key}"),
            100 + key,
            Some(LeaseRecord {
                address: address.into(),
                renew_time_unix_ms: renewed,
                lease_duration_seconds: 15,
            }),
        )
    }

    #[test]
    fn live_leases_of_members_are_published_and_the_rest_deleted() {
        let now = 1_000_000;
        let leases = vec![
            lease(1, "127.0.5.1:6443", now - 1_000),
            lease(2, "127.0.5.2:6443", now - 14_999),
            // Expired.
            lease(3, "127.0.5.3:6443", now - 15_000),
            // Not a member (removed).
            lease(4, "127.0.5.4:6443", now),
            (format!("{LEASE_PREFIX}junk"), 7, None),
            (format!("{LEASE_PREFIX}5"), 8, None),
        ];
        let members = HashSet::from([1, 2, 3, 5]);
        let (addrs, stale) = plan_addresses(Some(addr("127.0.5.9:7000")), &leases, &members, now);
        assert_eq!(
            addrs.into_iter().collect::<Vec<_>>(),
            [
                addr("127.0.5.1:6443"),
                addr("127.0.5.2:6443"),
                addr("127.0.5.9:7000")
            ]
        );
        let stale: Vec<&str> = stale.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            stale,
            [
                "/wasmctl/apiserver-leases/3",
                "/wasmctl/apiserver-leases/4",
                "/wasmctl/apiserver-leases/junk",
                "/wasmctl/apiserver-leases/5"
            ]
        );
    }

    #[test]
    fn one_subset_per_port_and_the_common_port_is_the_target() {
        let addrs: BTreeSet<SocketAddr> = [
            "127.0.0.3:6443",
            "127.0.0.1:6443",
            "127.0.0.2:7443",
            "10.0.0.1:6443",
        ]
        .into_iter()
        .map(addr)
        .collect();
        let s = serde_json::to_value(subsets(&addrs)).unwrap();
        assert_eq!(
            s,
            json!([
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "127.0.0.1"}, {"ip": "127.0.0.3"}],
                 "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
                {"addresses": [{"ip": "127.0.0.2"}],
                 "ports": [{"name": "https", "port": 7443, "protocol": "TCP"}]},
            ])
        );
        assert_eq!(target_port(&addrs), Some(6443));
        let tie: BTreeSet<SocketAddr> = ["127.0.0.1:7443", "127.0.0.2:6443"]
            .into_iter()
            .map(addr)
            .collect();
        assert_eq!(target_port(&tie), Some(6443));
        assert_eq!(target_port(&BTreeSet::new()), None);
    }

    #[test]
    fn an_unspecified_listen_address_is_published_as_localhost() {
        assert_eq!(
            published_address("0.0.0.0:6443"),
            Some(addr("127.0.0.1:6443"))
        );
        assert_eq!(
            published_address("127.0.0.2:7000"),
            Some(addr("127.0.0.2:7000"))
        );
        assert_eq!(published_address("127.0.0.2:0"), None);
        assert_eq!(published_address("server-1:6443"), None);
    }

    /// What is written bypasses validation (its addresses are loopback), but is exactly what
    /// `normalize` makes of it: with an address validation accepts, it normalises to itself.
    #[test]
    fn the_endpoints_written_are_canonical() {
        let addrs: BTreeSet<SocketAddr> = ["10.0.0.1:6443", "10.0.0.2:7443"]
            .into_iter()
            .map(addr)
            .collect();
        let ep = endpoints_object(None, subsets(&addrs));
        let v = serde_json::to_value(&ep).unwrap();
        let normalized = wasmctl_api::normalize(endpoints(), v.clone()).unwrap();
        assert_eq!(normalized, v);
        assert_eq!(v["metadata"]["labels"]["provider"], "kubernetes");
        assert!(v["metadata"].get("resourceVersion").is_none());
        // An update keeps the identity and what others added, and converges.
        let mut stored = ep.clone();
        stored.metadata.labels.insert("extra".into(), "x".into());
        let one: BTreeSet<SocketAddr> = [addr("10.0.0.1:6443")].into_iter().collect();
        let next = endpoints_object(Some(&stored), subsets(&one));
        assert_eq!(next.metadata.uid, ep.metadata.uid);
        assert_eq!(next.metadata.labels["extra"], "x");
        assert_eq!(next.subsets.len(), 1);
        assert_eq!(endpoints_object(Some(&next), subsets(&one)), next);
        // The loopback addresses of a real cluster are what client validation refuses.
        let lo: BTreeSet<SocketAddr> = [addr("127.0.0.1:6443")].into_iter().collect();
        let v = serde_json::to_value(endpoints_object(None, subsets(&lo))).unwrap();
        assert!(wasmctl_api::normalize(endpoints(), v).is_err());
    }

    #[test]
    fn the_service_ports_are_kubes() {
        let svc = |target: Value| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "kubernetes"},
                "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                    "targetPort": target}]}}))
            .unwrap()
        };
        assert!(ports_match(&svc(json!(6443)), 6443));
        assert!(!ports_match(&svc(json!(6443)), 7443));
        assert!(!ports_match(&svc(json!("https")), 6443));
        let v = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": NAME},
                       "spec": {"ports": desired_ports(6443)}});
        let normalized = wasmctl_api::normalize(services(), v).unwrap();
        let s: Service = serde_json::from_value(normalized).unwrap();
        assert!(ports_match(&s, 6443));
    }
}
