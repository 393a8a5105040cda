//! Endpoints in writes: what only the server knows is checked for each address a created or
//! updated Endpoints object newly lists — not in the Service cluster IP range, not a Node's
//! address, and inside a Node's `spec.podCIDR` — so hand-written Endpoints of a selector-less
//! Service cannot point it at a ClusterIP, a node or the host. Validation (pure, in the api
//! crate) has already refused the addresses that are never an endpoint (127.0.0.0/24, `::1`,
//! unspecified, link-local, multicast); the agents check again before they connect.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;
use wasmctl_api::core::{EndpointAddress, Endpoints, Node};
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_api::validation::{
    cidrs_overlap, in_cidr, parse_ipv4_cidr, Errors, HOST_LOOPBACK, LOOPBACK_RANGE,
};

use super::{ListOptions, Objects};
use crate::error::ApiError;

/// What the Nodes say about the addresses of the cluster.
#[derive(Debug, Default)]
pub(crate) struct NodeNets {
    /// `(node, pod CIDR)` of every Node that publishes one (a CIDR that takes in the host's
    /// own loopback services is ignored: no agent runs pods there).
    pub pod_cidrs: Vec<(String, (Ipv4Addr, u8))>,
    /// `(node, address)` of every Node's `status.addresses`.
    pub addresses: Vec<(String, IpAddr)>,
}

impl NodeNets {
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> NodeNets {
        let mut out = NodeNets::default();
        for n in nodes {
            let name = &n.metadata.name;
            let cidrs = n.spec.pod_cidr.iter().chain(&n.spec.pod_cidrs);
            for c in cidrs.filter_map(|c| parse_ipv4_cidr(c)) {
                if !cidrs_overlap(c, HOST_LOOPBACK) && !out.pod_cidrs.contains(&(name.clone(), c)) {
                    out.pod_cidrs.push((name.clone(), c));
                }
            }
            for a in n.status.iter().flat_map(|s| &s.addresses) {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    out.addresses.push((name.clone(), ip.to_canonical()));
                }
            }
        }
        out
    }
}

/// The addresses of `ep` that `old` (the stored version, for an update) does not list, with
/// their field paths: what an update keeps is not checked again, so Endpoints stay writable
/// after their node is gone.
pub(super) fn new_addresses<'a>(
    ep: &'a Endpoints,
    old: Option<&Endpoints>,
) -> Vec<(String, &'a EndpointAddress)> {
    let kept: HashSet<&str> = old
        .iter()
        .flat_map(|o| &o.subsets)
        .flat_map(|s| s.addresses.iter().chain(&s.not_ready_addresses))
        .map(|a| a.ip.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, ss) in ep.subsets.iter().enumerate() {
        for (list, f) in [
            (&ss.addresses, "addresses"),
            (&ss.not_ready_addresses, "notReadyAddresses"),
        ] {
            for (j, a) in list.iter().enumerate() {
                if !kept.contains(a.ip.as_str()) {
                    out.push((format!("subsets[{i}].{f}[{j}].ip"), a));
                }
            }
        }
    }
    out
}

/// Checks `addresses` (from [`new_addresses`]) against `service_range` (why an IPv4 address is
/// in `--service-cluster-ip-range`, or `None`) and the Nodes.
pub(super) fn check_addresses(
    addresses: &[(String, &EndpointAddress)],
    service_range: impl Fn(Ipv4Addr) -> Option<String>,
    nodes: &NodeNets,
    errs: &mut Errors,
) {
    for (field, a) in addresses {
        // Validation has parsed it.
        let Ok(ip) = a.ip.parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
            continue;
        };
        if let Some(why) = refusal(ip, a.node_name.as_deref(), &service_range, nodes) {
            errs.invalid(field.as_str(), format!("Invalid value: {:?}: {why}", a.ip));
        }
    }
}

/// Why `ip` (of an address naming `node`) is not a pod IP, or `None`. (Also the endpoints
/// controller's test of a pod's `status.podIP`, so that it never writes what this refuses.)
pub(crate) fn refusal(
    ip: IpAddr,
    node: Option<&str>,
    service_range: impl Fn(Ipv4Addr) -> Option<String>,
    nodes: &NodeNets,
) -> Option<String> {
    if let IpAddr::V4(v4) = ip {
        if let Some(why) = service_range(v4) {
            return Some(why);
        }
    }
    if let Some((n, _)) = nodes.addresses.iter().find(|(_, a)| *a == ip) {
        return Some(format!("may not be the address of node {n:?}"));
    }
    // No Node publishes a pod CIDR: no agent runs pods, and one that joins checks again.
    if nodes.pod_cidrs.is_empty() {
        return None;
    }
    let not_a_pod = || match ip {
        IpAddr::V4(v4) if v4.is_loopback() => {
            format!("{LOOPBACK_RANGE} outside the nodes' pod CIDRs (spec.podCIDR)")
        }
        _ => "must be a pod IP: inside some node's pod CIDR (spec.podCIDR)".to_string(),
    };
    let IpAddr::V4(v4) = ip else {
        return Some(not_a_pod());
    };
    let named: Vec<(Ipv4Addr, u8)> = node
        .map(|n| {
            nodes
                .pod_cidrs
                .iter()
                .filter(|(name, _)| name == n)
                .map(|(_, c)| *c)
                .collect()
        })
        .unwrap_or_default();
    if !named.is_empty() {
        // The node it names publishes its CIDR: the address must be one of its pods'.
        if named.iter().any(|c| in_cidr(*c, v4)) {
            return None;
        }
        let shown: Vec<String> = named.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        return Some(format!(
            "is not inside the pod CIDR of node {:?} ({})",
            node.unwrap_or_default(),
            shown.join(", ")
        ));
    }
    if nodes.pod_cidrs.iter().any(|(_, c)| in_cidr(*c, v4)) {
        None
    } else {
        Some(not_a_pod())
    }
}

impl Objects {
    /// Checks the addresses the Endpoints `obj` (defaulted and validated; `old` is the stored
    /// version for an update) newly lists against the service range and the Nodes.
    pub(super) async fn check_endpoints(
        &self,
        info: &ResourceInfo,
        name: &str,
        old: Option<&Value>,
        obj: &Value,
    ) -> Result<(), ApiError> {
        let corrupt = |e: serde_json::Error| ApiError::Internal(format!("decoding Endpoints: {e}"));
        let ep: Endpoints = serde_json::from_value(obj.clone()).map_err(corrupt)?;
        // A stored object that no longer decodes is treated as new: everything is checked.
        let old: Option<Endpoints> = old.and_then(|v| serde_json::from_value(v.clone()).ok());
        let fresh = new_addresses(&ep, old.as_ref());
        if fresh.is_empty() {
            return Ok(());
        }
        let range = self.services.ranges.cluster_ip;
        let service_range = |ip: Ipv4Addr| {
            range
                .contains(ip)
                .then(|| format!("may not be in the service IP range ({range})"))
        };
        let nodes = registry::resolve("nodes").expect("nodes are served");
        let listed = self.list(nodes, None, &ListOptions::default()).await?;
        let nodes: Vec<Node> = listed
            .items
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let mut errs = Errors::default();
        check_addresses(
            &fresh,
            service_range,
            &NodeNets::from_nodes(&nodes),
            &mut errs,
        );
        errs.into_result()
            .map_err(|inv| ApiError::invalid(info, name, inv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ip: &str) -> Node {
        let mut n = json!({"metadata": {"name": name},
                           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
        if let Some(c) = cidr {
            n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
        }
        serde_json::from_value(n).unwrap()
    }

    fn ep(addresses: Value) -> Endpoints {
        serde_json::from_value(
            json!({"metadata": {"name": "e"}, "subsets": [{"addresses": addresses, "ports": [{"port": 80}]}]}),
        )
        .unwrap()
    }

    fn check(ep: &Endpoints, old: Option<&Endpoints>, nodes: &[Node]) -> Vec<String> {
        let range: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 96, 0, 0), 16);
        let service_range = |ip: Ipv4Addr| {
            in_cidr(range, ip).then(|| "may not be in the service IP range (127.96.0.0/16)".into())
        };
        let mut errs = Errors::default();
        let fresh = new_addresses(ep, old);
        check_addresses(
            &fresh,
            service_range,
            &NodeNets::from_nodes(nodes),
            &mut errs,
        );
        match errs.into_result() {
            Ok(()) => vec![],
            Err(inv) => inv.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// Issue 11, item 6: only the IP syntax was checked, so an Endpoints object could send a
    /// Service's traffic to a ClusterIP, a node's agent or any loopback address of the host.
    #[test]
    fn endpoints_must_be_pods() {
        let nodes = [
            node("a", Some("127.21.0.0/16"), "127.250.0.1"),
            node("b", Some("127.22.0.0/16"), "127.250.0.2"),
            // A CIDR over the host's loopback services is nobody's pods.
            node("rogue", Some("127.0.0.0/8"), "10.1.1.1"),
        ];
        let e = ep(json!([
            {"ip": "127.21.0.5", "nodeName": "a"},
            {"ip": "127.22.0.9"},
            {"ip": "127.96.0.10"},
            {"ip": "127.250.0.2"},
            {"ip": "127.5.0.1"},
            {"ip": "127.22.0.7", "nodeName": "a"},
            {"ip": "10.0.0.5"},
            {"ip": "2001:db8::1"},
            {"ip": "127.21.0.6", "nodeName": "gone"},
        ]));
        assert_eq!(
            check(&e, None, &nodes),
            [
                r#"subsets[0].addresses[2].ip: Invalid value: "127.96.0.10": may not be in the service IP range (127.96.0.0/16)"#,
                r#"subsets[0].addresses[3].ip: Invalid value: "127.250.0.2": may not be the address of node "b""#,
                r#"subsets[0].addresses[4].ip: Invalid value: "127.5.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128) outside the nodes' pod CIDRs (spec.podCIDR)"#,
                r#"subsets[0].addresses[5].ip: Invalid value: "127.22.0.7": is not inside the pod CIDR of node "a" (127.21.0.0/16)"#,
                r#"subsets[0].addresses[6].ip: Invalid value: "10.0.0.5": must be a pod IP: inside some node's pod CIDR (spec.podCIDR)"#,
                r#"subsets[0].addresses[7].ip: Invalid value: "2001:db8::1": must be a pod IP: inside some node's pod CIDR (spec.podCIDR)"#,
            ]
        );
        // What an update keeps is not checked again (its node may be gone by now).
        let old = ep(json!([{"ip": "127.23.0.4", "nodeName": "c"}]));
        let next = ep(json!([{"ip": "127.23.0.4", "nodeName": "c"}, {"ip": "127.21.0.8"}]));
        assert!(check(&next, Some(&old), &nodes).is_empty());
        let next = ep(json!([{"ip": "127.23.0.4"}, {"ip": "127.23.0.5"}]));
        assert_eq!(check(&next, Some(&old), &nodes).len(), 1);
        // No Node publishes a pod CIDR: the service range and node addresses still hold.
        let bare = [node("n", None, "127.250.0.9")];
        let e = ep(json!([{"ip": "127.1.0.2"}, {"ip": "127.96.1.1"}, {"ip": "127.250.0.9"}]));
        assert_eq!(check(&e, None, &bare).len(), 2);
    }
}
