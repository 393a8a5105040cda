//! The endpoints controller: for every Service with a selector, an `Endpoints` object of the
//! same name listing the pods the selector matches, as Kubernetes' endpoints controller does.
//!
//! [`plan`] is the whole decision (which pods, ready or not, on which ports) as a pure
//! function of the Service, its namespace's pods and the [`AddressRules`] the API server checks
//! Endpoints addresses against (a pod whose `status.podIP` they refuse — forged outside its
//! node's pod CIDR, say — is left out, rather than failing every write of the Service's
//! Endpoints); [`EndpointsController`] writes the result
//! when it differs from what is stored, and deletes the Endpoints once the Service is gone.
//! Endpoints have no ownerReferences (Kubernetes sets none); a Service without a selector
//! leaves its Endpoints to the user.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use wasmctl_api::core::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Node, ObjectReference, Pod, Service,
    ServicePort,
};
use wasmctl_api::meta::{DeleteOptions, IntOrString};
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::selector::Selector;
use wasmctl_api::validation::{special_ip_reason, CLUSTER_IP_NONE};

use super::cache::{split_key, Cache};
use super::replicaset::{namespace_pods, ready_since};
use super::{pods, Ctx, Reconciler, WorkQueue};
use crate::allocator::Ipv4Cidr;
use crate::error::ApiError;
use crate::objects::{endpoint_refusal, NodeNets};

/// At most this many addresses in one Endpoints object (Kubernetes' `maxCapacity`); beyond,
/// ready addresses are kept first and the object is annotated [`OVER_CAPACITY`].
pub const MAX_ADDRESSES: usize = 1000;
/// Set to `truncated` on Endpoints that hold [`MAX_ADDRESSES`] of more.
pub const OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";
/// Kubernetes' label on the Endpoints of a headless Service.
pub const HEADLESS: &str = "service.kubernetes.io/headless";

pub fn services() -> &'static ResourceInfo {
    super::info("v1", "Service")
}
pub fn endpoints() -> &'static ResourceInfo {
    super::info("v1", "Endpoints")
}

/// The Endpoints a Service should have.
#[derive(Debug, Default, PartialEq)]
pub struct EpPlan {
    /// One subset per distinct set of ports; addresses sorted by IP, then pod uid.
    pub subsets: Vec<EndpointSubset>,
    /// The Service's labels, plus [`HEADLESS`] for a headless one.
    pub labels: BTreeMap<String, String>,
    /// More than [`MAX_ADDRESSES`] pods matched; some were left out.
    pub truncated: bool,
}

/// Whether a pod belongs in Endpoints at all (Kubernetes' `ShouldPodBeInEndpoints` without
/// terminating pods): it has an IP, is not being deleted, and has not finished. An IP that
/// Endpoints may never hold (unspecified, the host's 127.0.0.0/24, link-local, …: a forged
/// `status.podIP`) leaves the pod out, rather than failing the whole Endpoints write.
pub fn should_be_in_endpoints(p: &Pod) -> bool {
    let st = p.status.as_ref();
    let has_ip = st
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| special_ip_reason(ip).is_none());
    let finished = matches!(
        st.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    has_ip && !finished && p.metadata.deletion_timestamp.is_none()
}

/// What the API server checks a new Endpoints address against (`objects/endpoints.rs`): the
/// Service cluster IP range and the Nodes' addresses and pod CIDRs, here as the cache shows
/// them. The default refuses nothing beyond [`should_be_in_endpoints`].
#[derive(Debug, Default)]
pub struct AddressRules {
    cluster_ip: Option<Ipv4Cidr>,
    nodes: NodeNets,
}

impl AddressRules {
    pub fn new<'a>(cluster_ip: Ipv4Cidr, nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        AddressRules {
            cluster_ip: Some(cluster_ip),
            nodes: NodeNets::from_nodes(nodes),
        }
    }

    /// Why the API server would refuse `p`'s pod IP in an Endpoints address, or `None`.
    pub fn refusal(&self, p: &Pod) -> Option<String> {
        let ip = p.status.as_ref()?.pod_ip.as_deref()?;
        let ip = ip.parse::<IpAddr>().ok()?.to_canonical();
        let range = self.cluster_ip;
        let service_range = |v4| {
            range
                .filter(|r| r.contains(v4))
                .map(|r| format!("may not be in the service IP range ({r})"))
        };
        let node = p.spec.node_name.as_deref().filter(|n| !n.is_empty());
        endpoint_refusal(ip, node, service_range, &self.nodes)
    }
}

/// The pod's port for a Service port (Kubernetes' `FindPort`): a number as is; a name
/// through the pod's container ports of the same protocol, `None` if it has no such port.
pub fn find_port(p: &Pod, sp: &ServicePort) -> Option<i32> {
    match sp.target_port.as_ref() {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let protocol = sp.protocol.as_deref().unwrap_or("TCP");
            p.spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .map(|cp| cp.container_port)
        }
    }
}

/// A port of a subset, ordered for grouping: (name, port, protocol).
type PortKey = (Option<String>, i32, String);

/// The Endpoints of `svc` given every pod of its namespace; `None` when the Service has no
/// selector (its Endpoints, if any, are the user's). Pods whose IP `rules` refuse are left out.
pub fn plan(svc: &Service, pods: &[Pod], rules: &AddressRules) -> Option<EpPlan> {
    if svc.spec.selector.is_empty() {
        return None;
    }
    let selector = Selector::from_set(&svc.spec.selector);
    let headless = svc.spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
    // (ip, uid) → (ready, address, ports), so every list comes out sorted.
    let mut addresses: BTreeMap<(String, String), (bool, EndpointAddress, BTreeSet<PortKey>)> =
        BTreeMap::new();
    for p in pods {
        if !selector.matches(&p.metadata.labels) || !should_be_in_endpoints(p) {
            continue;
        }
        if let Some(why) = rules.refusal(p) {
            tracing::debug!(pod = %p.metadata.name, service = %svc.metadata.name, %why,
                "pod left out of Endpoints: its IP cannot be an endpoint");
            continue;
        }
        let mut ports = BTreeSet::new();
        for sp in &svc.spec.ports {
            if let Some(port) = find_port(p, sp) {
                ports.insert((
                    sp.name.clone(),
                    port,
                    sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ));
            }
        }
        // Without ports only a headless Service lists addresses (for DNS).
        if ports.is_empty() && !(svc.spec.ports.is_empty() && headless) {
            continue;
        }
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default();
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let hostname =
            p.spec.hostname.clone().filter(|h| {
                !h.is_empty() && p.spec.subdomain.as_deref() == Some(&svc.metadata.name)
            });
        let address = EndpointAddress {
            ip: ip.clone(),
            hostname,
            node_name: p.spec.node_name.clone().filter(|n| !n.is_empty()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                namespace: p.metadata.namespace.clone(),
                name: Some(p.metadata.name.clone()),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
        };
        addresses.insert((ip, uid), (ready_since(p).is_some(), address, ports));
    }

    let total = addresses.len();
    let truncated = total > MAX_ADDRESSES;
    if truncated {
        // Keep every ready address that fits, then not-ready ones.
        let mut budget = MAX_ADDRESSES;
        let keep: BTreeSet<(String, String)> = [true, false]
            .iter()
            .flat_map(|want| {
                addresses
                    .iter()
                    .filter(move |(_, (ready, _, _))| ready == want)
                    .map(|(k, _)| k.clone())
            })
            .take_while(|_| {
                let more = budget > 0;
                budget = budget.saturating_sub(1);
                more
            })
            .collect();
        addresses.retain(|k, _| keep.contains(k));
    }

    let mut groups: BTreeMap<BTreeSet<PortKey>, EndpointSubset> = BTreeMap::new();
    for (_, (ready, address, ports)) in addresses {
        let subset = groups.entry(ports).or_default();
        if ready {
            subset.addresses.push(address);
        } else {
            subset.not_ready_addresses.push(address);
        }
    }
    let subsets = groups
        .into_iter()
        .map(|(ports, mut subset)| {
            subset.ports = ports
                .into_iter()
                .map(|(name, port, protocol)| EndpointPort {
                    name,
                    port,
                    protocol: Some(protocol),
                })
                .collect();
            subset
        })
        .collect();
    let mut labels = svc.metadata.labels.clone();
    if headless {
        labels.insert(HEADLESS.into(), String::new());
    } else {
        labels.remove(HEADLESS);
    }
    Some(EpPlan {
        subsets,
        labels,
        truncated,
    })
}

/// Whether the stored Endpoints already are what `plan` says.
pub fn up_to_date(current: &Endpoints, plan: &EpPlan) -> bool {
    current.subsets == plan.subsets
        && current.metadata.labels == plan.labels
        && current.metadata.annotations.contains_key(OVER_CAPACITY) == plan.truncated
}

/// Enqueues the Services a change concerns: a changed Service; for a pod, every Service of
/// its namespace whose selector matches its old or new labels; for Endpoints, their Service
/// if it exists (a user edit or deletion is undone), or if the Endpoints are left over from
/// before this server started (their Service was deleted meanwhile: they go).
pub fn watch(cache: &Cache, queue: &WorkQueue) {
    let svc_prefix = services().key_prefix(None);
    let pod_prefix = pods().key_prefix(None);
    let ep_prefix = endpoints().key_prefix(None);
    let started = Utc::now();
    let q = queue.clone();
    cache.on_change(move |cache, ch| {
        if ch.key.starts_with(&svc_prefix) {
            q.add(ch.key);
        } else if ch.key.starts_with(&pod_prefix) {
            let Some((ns, _)) = split_key(ch.key) else {
                return;
            };
            let label_sets: Vec<BTreeMap<String, String>> = [ch.old, ch.new]
                .into_iter()
                .flatten()
                .map(|o| string_map(&o["metadata"]["labels"]))
                .collect();
            for svc in cache.list(&services().key_prefix(Some(ns))) {
                let set = string_map(&svc["spec"]["selector"]);
                if set.is_empty() {
                    continue;
                }
                let selector = Selector::from_set(&set);
                if label_sets.iter().any(|l| selector.matches(l)) {
                    if let Some(name) = svc["metadata"]["name"].as_str() {
                        q.add(&services().key(ns, name));
                    }
                }
            }
        } else if ch.key.starts_with(&ep_prefix) {
            let Some((ns, name)) = split_key(ch.key) else {
                return;
            };
            let svc_key = services().key(ns, name);
            let leftover = ch.new.is_some_and(|e| {
                e["metadata"]["creationTimestamp"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    // Timestamps have whole seconds.
                    .is_some_and(|t| t + chrono::Duration::seconds(1) <= started)
            });
            if leftover || cache.get(&svc_key).is_some() {
                q.add(&svc_key);
            }
        }
    });
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub struct EndpointsController {
    ctx: Ctx,
}

impl EndpointsController {
    pub fn new(ctx: Ctx) -> Self {
        EndpointsController { ctx }
    }
}

impl Reconciler for EndpointsController {
    const NAME: &'static str = "endpoints";

    fn resync_prefix(&self) -> Option<String> {
        Some(services().key_prefix(None))
    }

    /// `key` is the Service's store key.
    async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let Some((ns, name)) = split_key(key) else {
            return Ok(None);
        };
        let cache = &self.ctx.cache;
        let ep_key = endpoints().key(ns, name);
        let Some(obj) = cache.get(key) else {
            if cache.get(&ep_key).is_some() {
                self.ctx
                    .delete(endpoints(), Some(ns), name, &DeleteOptions::default())
                    .await?;
            }
            return Ok(None);
        };
        let svc: Service = serde_json::from_value(Value::clone(&obj))
            .map_err(|e| ApiError::Internal(format!("decoding {key}: {e}")))?;
        let nodes: Vec<Node> = cache
            .list(&super::info("v1", "Node").key_prefix(None))
            .iter()
            .filter_map(|v| serde_json::from_value(Value::clone(v)).ok())
            .collect();
        let rules = AddressRules::new(self.ctx.objects.service_ranges().cluster_ip, &nodes);
        let Some(p) = plan(&svc, &namespace_pods(cache, ns), &rules) else {
            return Ok(None);
        };
        let subsets = serde_json::to_value(&p.subsets).expect("subsets serialise");
        let labels = serde_json::to_value(&p.labels).expect("labels serialise");
        let Some(current) = cache.get(&ep_key) else {
            let mut annotations = json!({});
            if p.truncated {
                annotations[OVER_CAPACITY] = json!("truncated");
            }
            let body = json!({
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns, "labels": labels,
                             "annotations": annotations},
                "subsets": subsets,
            });
            return match self.ctx.create(endpoints(), ns, body).await {
                // The namespace is terminating: the Service goes with it.
                Ok(_) | Err(ApiError::Forbidden(_)) => Ok(None),
                // AlreadyExists (the cache is behind) is retried once it has caught up.
                Err(e) => Err(e),
            };
        };
        let current: Endpoints = serde_json::from_value(Value::clone(&current))
            .map_err(|e| ApiError::Internal(format!("decoding {ep_key}: {e}")))?;
        if up_to_date(&current, &p) {
            return Ok(None);
        }
        let res = self
            .ctx
            .update(endpoints(), Some(ns), name, |cur| {
                let mut next = cur.clone();
                next["subsets"] = subsets.clone();
                next["metadata"]["labels"] = labels.clone();
                let annotations = &mut next["metadata"]["annotations"];
                if !annotations.is_object() {
                    *annotations = json!({});
                }
                let map = annotations.as_object_mut().expect("just made an object");
                if p.truncated {
                    map.insert(OVER_CAPACITY.into(), json!("truncated"));
                } else {
                    map.remove(OVER_CAPACITY);
                }
                Ok(next)
            })
            .await;
        match res {
            // Deleted meanwhile: the Endpoints' change queues this Service again.
            Ok(_) | Err(ApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmctl_api::core::{Container, ContainerPort, PodCondition, PodStatus};
    use wasmctl_api::meta::Time;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn service(ports: &[(&str, i32, IntOrString)]) -> Service {
        let mut s = Service::default();
        s.metadata.name = "web".into();
        s.metadata.namespace = Some("default".into());
        s.metadata.labels = labels(&[("tier", "front")]);
        s.spec.selector = labels(&[("app", "web")]);
        s.spec.cluster_ip = Some("127.96.0.10".into());
        s.spec.ports = ports
            .iter()
            .map(|(name, port, target)| ServicePort {
                name: Some(name.to_string()),
                protocol: Some("TCP".into()),
                port: *port,
                target_port: Some(target.clone()),
                node_port: None,
            })
            .collect();
        s
    }

    /// A pod of app=web on node-1 with `ip`, ready or not, declaring `ports` (name, port).
    fn pod(name: &str, ip: &str, ready: bool, ports: &[(&str, i32)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.namespace = Some("default".into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.labels = labels(&[("app", "web")]);
        p.spec.node_name = Some("node-1".into());
        p.spec.containers = vec![Container {
            name: "hello".into(),
            image: "hello:v1".into(),
            ports: ports
                .iter()
                .map(|(n, port)| ContainerPort {
                    name: Some(n.to_string()),
                    container_port: *port,
                    protocol: Some("TCP".into()),
                })
                .collect(),
            ..Default::default()
        }];
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            conditions: vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        p
    }

    fn ips(list: &[EndpointAddress]) -> Vec<&str> {
        list.iter().map(|a| a.ip.as_str()).collect()
    }

    #[test]
    fn ready_not_ready_and_terminating_pods() {
        let svc = service(&[("http", 80, IntOrString::String("http".into()))]);
        let mut terminating = pod("c", "127.20.0.3", true, &[("http", 8080)]);
        terminating.metadata.deletion_timestamp = Some(Time::now());
        let mut finished = pod("d", "127.20.0.4", false, &[("http", 8080)]);
        finished.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut no_ip = pod("e", "", false, &[("http", 8080)]);
        no_ip.status.as_mut().unwrap().pod_ip = None;
        let mut other_app = pod("f", "127.20.0.6", true, &[("http", 8080)]);
        other_app.metadata.labels = labels(&[("app", "db")]);
        let pods = vec![
            pod("b", "127.20.0.2", false, &[("http", 8080)]),
            pod("a", "127.20.0.1", true, &[("http", 8080)]),
            terminating,
            finished,
            no_ip,
            other_app,
        ];
        let p = plan(&svc, &pods, &AddressRules::default()).unwrap();
        assert_eq!(p.subsets.len(), 1);
        let ss = &p.subsets[0];
        assert_eq!(ips(&ss.addresses), ["127.20.0.1"]);
        assert_eq!(ips(&ss.not_ready_addresses), ["127.20.0.2"]);
        assert_eq!(
            ss.ports,
            [EndpointPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Some("TCP".into())
            }]
        );
        let a = &ss.addresses[0];
        assert_eq!(a.node_name.as_deref(), Some("node-1"));
        let r = a.target_ref.as_ref().unwrap();
        assert_eq!(
            (
                r.kind.as_deref(),
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.uid.as_deref()
            ),
            (Some("Pod"), Some("default"), Some("a"), Some("uid-a"))
        );
        assert_eq!(p.labels, labels(&[("tier", "front")]));
        assert!(!p.truncated);
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_group_by_port_set() {
        let svc = service(&[
            ("http", 80, IntOrString::String("http".into())),
            ("metrics", 9090, IntOrString::Int(9100)),
        ]);
        let pods = vec![
            pod("a", "127.20.0.1", true, &[("http", 8080)]),
            // Another container port for the same name: its own subset.
            pod("b", "127.20.0.2", true, &[("http", 8081)]),
            // Lacks the name: listed for the numeric port only.
            pod("c", "127.20.0.3", true, &[("web", 8080)]),
            pod("d", "127.20.0.4", false, &[("http", 8080)]),
        ];
        let p = plan(&svc, &pods, &AddressRules::default()).unwrap();
        type Summary<'a> = (Vec<(Option<&'a str>, i32)>, Vec<&'a str>, Vec<&'a str>);
        let summary: Vec<Summary> = p
            .subsets
            .iter()
            .map(|s| {
                (
                    s.ports
                        .iter()
                        .map(|p| (p.name.as_deref(), p.port))
                        .collect(),
                    ips(&s.addresses),
                    ips(&s.not_ready_addresses),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    vec![(Some("http"), 8080), (Some("metrics"), 9100)],
                    vec!["127.20.0.1"],
                    vec!["127.20.0.4"]
                ),
                (
                    vec![(Some("http"), 8081), (Some("metrics"), 9100)],
                    vec!["127.20.0.2"],
                    vec![]
                ),
                (vec![(Some("metrics"), 9100)], vec!["127.20.0.3"], vec![]),
            ]
        );
    }

    #[test]
    fn without_a_selector_the_endpoints_are_the_users() {
        let mut svc = service(&[("http", 80, IntOrString::Int(8080))]);
        svc.spec.selector.clear();
        assert_eq!(
            plan(
                &svc,
                &[pod("a", "127.20.0.1", true, &[])],
                &AddressRules::default()
            ),
            None
        );
    }

    #[test]
    fn no_matching_pods_give_no_subsets_and_headless_is_labelled() {
        let mut svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let p = plan(&svc, &[], &AddressRules::default()).unwrap();
        assert!(p.subsets.is_empty());
        svc.spec.cluster_ip = Some("None".into());
        svc.spec.ports.clear();
        let p = plan(
            &svc,
            &[pod("a", "127.20.0.1", true, &[])],
            &AddressRules::default(),
        )
        .unwrap();
        assert_eq!(p.labels.get(HEADLESS).map(String::as_str), Some(""));
        assert_eq!(ips(&p.subsets[0].addresses), ["127.20.0.1"]);
        assert!(p.subsets[0].ports.is_empty());
    }

    #[test]
    fn hostname_only_for_the_pods_subdomain() {
        let svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let mut a = pod("a", "127.20.0.1", true, &[]);
        a.spec.hostname = Some("a-host".into());
        a.spec.subdomain = Some("web".into());
        let mut b = pod("b", "127.20.0.2", true, &[]);
        b.spec.hostname = Some("b-host".into());
        let p = plan(&svc, &[a, b], &AddressRules::default()).unwrap();
        let hosts: Vec<Option<&str>> = p.subsets[0]
            .addresses
            .iter()
            .map(|a| a.hostname.as_deref())
            .collect();
        assert_eq!(hosts, [Some("a-host"), None]);
    }

    #[test]
    fn over_capacity_keeps_ready_addresses_first() {
        let svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let pods: Vec<Pod> = (0..MAX_ADDRESSES + 10)
            .map(|i| {
                let ip = format!("127.20.{}.{}", i / 250, i % 250 + 1);
                pod(&format!("p{i}"), &ip, i >= 20, &[])
            })
            .collect();
        let p = plan(&svc, &pods, &AddressRules::default()).unwrap();
        assert!(p.truncated);
        let ss = &p.subsets[0];
        assert_eq!(
            ss.addresses.len() + ss.not_ready_addresses.len(),
            MAX_ADDRESSES
        );
        assert_eq!(ss.addresses.len(), MAX_ADDRESSES - 10);
        assert_eq!(ss.not_ready_addresses.len(), 10);
    }

    #[test]
    fn a_pod_with_an_ip_endpoints_may_not_hold_is_left_out() {
        let svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let pods = [
            pod("good", "127.20.0.1", true, &[]),
            pod("host", "127.0.0.1", true, &[]),
            pod("metadata", "169.254.169.254", true, &[]),
            pod("junk", "not-an-ip", true, &[]),
        ];
        let p = plan(&svc, &pods, &AddressRules::default()).unwrap();
        let ips: Vec<&str> = p
            .subsets
            .iter()
            .flat_map(|s| s.addresses.iter().map(|a| a.ip.as_str()))
            .collect();
        assert_eq!(ips, ["127.20.0.1"]);
    }

    /// Leftover of issue 11: a pod whose `status.podIP` is forged outside its node's pod CIDR
    /// (or is a node's address, or in the service range) made every write of its Service's
    /// Endpoints fail with 422; it is left out, as the server would refuse it.
    #[test]
    fn pods_whose_ip_the_server_refuses_in_endpoints_are_left_out() {
        let svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-1"},
            "spec": {"podCIDR": "127.20.0.0/16"},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.250.0.1"}]}}))
        .unwrap();
        let rules = AddressRules::new("127.96.0.0/16".parse().unwrap(), [&node]);
        let pods = [
            pod("good", "127.20.0.1", true, &[]),
            pod("forged", "127.21.0.5", true, &[]),
            pod("node-address", "127.250.0.1", true, &[]),
            pod("cluster-ip", "127.96.0.7", false, &[]),
        ];
        let p = plan(&svc, &pods, &rules).unwrap();
        let ips: Vec<&str> = p
            .subsets
            .iter()
            .flat_map(|s| s.addresses.iter().chain(&s.not_ready_addresses))
            .map(|a| a.ip.as_str())
            .collect();
        assert_eq!(ips, ["127.20.0.1"]);
        // Exactly the server's refusals: what the write check would say of each.
        let why: Vec<Option<String>> = pods.iter().map(|p| rules.refusal(p)).collect();
        assert_eq!(
            why,
            [
                None,
                Some(r#"is not inside the pod CIDR of node "node-1" (127.20.0.0/16)"#.into()),
                Some(r#"may not be the address of node "node-1""#.into()),
                Some("may not be in the service IP range (127.96.0.0/16)".into()),
            ]
        );
    }

    #[test]
    fn up_to_date_compares_subsets_labels_and_the_capacity_annotation() {
        let svc = service(&[("http", 80, IntOrString::Int(8080))]);
        let p = plan(
            &svc,
            &[pod("a", "127.20.0.1", true, &[])],
            &AddressRules::default(),
        )
        .unwrap();
        let mut ep = Endpoints {
            subsets: p.subsets.clone(),
            ..Default::default()
        };
        ep.metadata.labels = p.labels.clone();
        assert!(up_to_date(&ep, &p));
        ep.metadata.labels.clear();
        assert!(!up_to_date(&ep, &p));
        ep.metadata.labels = p.labels.clone();
        ep.subsets[0].addresses[0].ip = "127.20.0.9".into();
        assert!(!up_to_date(&ep, &p));
    }
}
