//! Service (types, ports, node ports, cluster IPs, session affinity) and the Endpoints the
//! endpoints controller writes for it, with the rules for what an endpoint address may be that
//! the API server's write path and the agents share.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use crate::core::{Endpoints, Service};
use crate::meta::{IntOrString, ObjectMeta};

use super::meta::{is_dns1123_label, one_of, port_number, validate_labels, validate_port_ref};
use super::{Errors, Kind};

/// The Service types this cluster implements (no cloud load balancers, no DNS aliases).
pub const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort"];
/// `spec.clusterIP` of a headless Service.
pub const CLUSTER_IP_NONE: &str = "None";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours) and maximum.
pub const DEFAULT_CLIENT_IP_TIMEOUT_SECONDS: i32 = 10800;
pub const MAX_CLIENT_IP_TIMEOUT_SECONDS: i32 = 86400;

impl Kind for Service {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        let s = &mut self.spec;
        s.type_.get_or_insert_with(|| "ClusterIP".into());
        s.session_affinity.get_or_insert_with(|| "None".into());
        if s.session_affinity.as_deref() == Some("ClientIP") {
            let cfg = s
                .session_affinity_config
                .get_or_insert_with(Default::default);
            cfg.client_ip
                .get_or_insert_with(Default::default)
                .timeout_seconds
                .get_or_insert(DEFAULT_CLIENT_IP_TIMEOUT_SECONDS);
        }
        for p in &mut s.ports {
            p.protocol.get_or_insert_with(|| "TCP".into());
            if p.target_port.is_none() {
                p.target_port = Some(IntOrString::Int(p.port));
            }
            // 0 means "not set" (allocate one) as in Kubernetes.
            if p.node_port == Some(0) {
                p.node_port = None;
            }
        }
        // `clusterIP` and `clusterIPs[0]` are one value; either may be given.
        if s.cluster_ip.as_deref() == Some("") {
            s.cluster_ip = None;
        }
        match (&s.cluster_ip, s.cluster_ips.first()) {
            (Some(ip), None) => s.cluster_ips = vec![ip.clone()],
            (None, Some(ip)) => s.cluster_ip = Some(ip.clone()),
            _ => {}
        }
    }
    fn validate(&self, errs: &mut Errors) {
        if !self.metadata.name.is_empty() {
            if let Err(e) = is_dns1123_label(&self.metadata.name) {
                errs.invalid("metadata.name", e);
            }
        }
        let s = &self.spec;
        let t = s.type_.as_deref().unwrap_or("ClusterIP");
        one_of(Some(t), "spec.type", SERVICE_TYPES, errs);
        validate_labels(&s.selector, "spec.selector", errs);
        one_of(
            s.session_affinity.as_deref(),
            "spec.sessionAffinity",
            &["None", "ClientIP"],
            errs,
        );
        if let Some(cfg) = &s.session_affinity_config {
            if s.session_affinity.as_deref() != Some("ClientIP") {
                errs.invalid(
                    "spec.sessionAffinityConfig",
                    "must not be set when session affinity is None",
                );
            }
            if let Some(t) = cfg.client_ip.as_ref().and_then(|c| c.timeout_seconds) {
                if !(1..=MAX_CLIENT_IP_TIMEOUT_SECONDS).contains(&t) {
                    errs.invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "Invalid value: {t}: must be greater than 0 and less than {MAX_CLIENT_IP_TIMEOUT_SECONDS}"
                        ),
                    );
                }
            }
        }
        let headless = s.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
        if s.ports.is_empty() && !headless {
            errs.required("spec.ports", "at least one port");
        }
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut node_ports = BTreeSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            let pp = format!("spec.ports[{i}]");
            port_number(p.port, &format!("{pp}.port"), errs);
            one_of(
                p.protocol.as_deref(),
                &format!("{pp}.protocol"),
                &["TCP"],
                errs,
            );
            if !ports.insert(p.port) {
                errs.duplicate(format!("{pp}.port"), &p.port.to_string());
            }
            match &p.name {
                Some(n) => {
                    if let Err(e) = is_dns1123_label(n) {
                        errs.invalid(format!("{pp}.name"), e);
                    }
                    if !names.insert(n.clone()) {
                        errs.duplicate(format!("{pp}.name"), n);
                    }
                }
                None if s.ports.len() > 1 => errs.required(
                    format!("{pp}.name"),
                    "a name is required when a service has several ports",
                ),
                None => {}
            }
            if let Some(tp) = &p.target_port {
                validate_port_ref(tp, &format!("{pp}.targetPort"), errs);
            }
            // The range is the server's (`--service-node-port-range`): it checks it when it
            // allocates.
            if let Some(np) = p.node_port.filter(|n| *n != 0) {
                if t != "NodePort" {
                    errs.forbidden(
                        format!("{pp}.nodePort"),
                        format!("may not be used when `type` is '{t}'"),
                    );
                } else if !(1..=65535).contains(&np) {
                    errs.invalid(
                        format!("{pp}.nodePort"),
                        format!("Invalid value: {np}: must be between 1 and 65535, inclusive"),
                    );
                } else if !node_ports.insert(np) {
                    errs.duplicate(format!("{pp}.nodePort"), &np.to_string());
                }
            }
        }
        if s.cluster_ips.len() > 1 {
            errs.invalid(
                "spec.clusterIPs",
                format!(
                    "Invalid value: {:?}: this cluster is single-stack IPv4: at most one cluster IP",
                    s.cluster_ips
                ),
            );
        }
        if let Some(first) = s.cluster_ips.first() {
            if s.cluster_ip.as_ref() != Some(first) {
                errs.invalid(
                    "spec.clusterIPs",
                    format!(
                        "Invalid value: {:?}: first value must match `clusterIP`",
                        s.cluster_ips
                    ),
                );
            } else if first == CLUSTER_IP_NONE {
                if t == "NodePort" {
                    errs.invalid(
                        "spec.clusterIPs[0]",
                        "Invalid value: \"None\": may not be set to 'None' for NodePort services",
                    );
                }
            } else if first.parse::<std::net::Ipv4Addr>().is_err() {
                errs.invalid(
                    "spec.clusterIPs[0]",
                    format!(
                        "Invalid value: {first:?}: must be a valid IPv4 address, (e.g. 10.9.8.7)"
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------- Endpoints

/// Kubernetes' words for an endpoint in the loopback range.
pub const LOOPBACK_RANGE: &str = "may not be in the loopback range (127.0.0.0/8, ::1/128)";
/// The host's own loopback services (`127.0.0.1`): never a pod CIDR, never an endpoint.
pub const HOST_LOOPBACK: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 0, 0, 0), 24);

/// Why `ip` can never be an endpoint (Kubernetes' `ValidateNonSpecialIP`, with kube's
/// words), or `None`. Pod IPs are loopback addresses here (each node's pod CIDR is inside
/// 127.0.0.0/8), so only the host's own part of loopback, 127.0.0.0/24 and `::1`, is refused
/// outright; that the rest is inside some node's pod CIDR is for the API server (which knows
/// the Nodes) and the agents to check. Multicast and broadcast addresses, which Kubernetes
/// lets through, are refused as well. IPv4-mapped IPv6 addresses are judged as the IPv4
/// address they map (`::ffff:127.0.0.1` is 127.0.0.1).
pub fn special_ip_reason(ip: IpAddr) -> Option<String> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        return Some(format!("may not be unspecified ({ip})"));
    }
    let reason = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if in_cidr(HOST_LOOPBACK, v4) {
                LOOPBACK_RANGE
            } else if v4.is_link_local() {
                "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
            } else if o[0] == 224 && o[1] == 0 && o[2] == 0 {
                "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
            } else if v4.is_multicast() {
                "may not be a multicast address (224.0.0.0/4, ff00::/8)"
            } else if v4.is_broadcast() {
                "may not be the broadcast address (255.255.255.255)"
            } else {
                return None;
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                LOOPBACK_RANGE
            } else if seg[0] & 0xffc0 == 0xfe80 {
                "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
            } else if seg[0] & 0xff0f == 0xff02 {
                "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"
            } else if v6.is_multicast() {
                "may not be a multicast address (224.0.0.0/4, ff00::/8)"
            } else {
                return None;
            }
        }
    };
    Some(reason.to_string())
}

/// An IPv4 CIDR as a Node publishes it in `spec.podCIDR`/`spec.podCIDRs` (`127.21.0.0/16`),
/// host bits cleared; `None` if it is not one.
pub fn parse_ipv4_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Some((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

/// Whether `ip` is inside `cidr`.
pub fn in_cidr(cidr: (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(cidr.1)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(cidr.0) & mask
}

/// Whether two CIDRs share an address.
pub fn cidrs_overlap(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    in_cidr(a, b.0) || in_cidr(b, a.0)
}

impl Kind for Endpoints {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn validate(&self, errs: &mut Errors) {
        for (i, ss) in self.subsets.iter().enumerate() {
            for (list, f) in [
                (&ss.addresses, "addresses"),
                (&ss.not_ready_addresses, "notReadyAddresses"),
            ] {
                for (j, a) in list.iter().enumerate() {
                    let field = format!("subsets[{i}].{f}[{j}].ip");
                    match a.ip.parse::<IpAddr>() {
                        Err(_) => errs
                            .invalid(field, format!("must be a valid IP address, got {:?}", a.ip)),
                        Ok(ip) => {
                            if let Some(why) = special_ip_reason(ip) {
                                errs.invalid(field, format!("Invalid value: {:?}: {why}", a.ip));
                            }
                        }
                    }
                }
            }
            for (j, p) in ss.ports.iter().enumerate() {
                port_number(p.port, &format!("subsets[{i}].ports[{j}].port"), errs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{normalize, Invalid};
    use crate::registry::resolve;
    use serde_json::{json, Value};

    fn svc(spec: Value) -> Result<Value, Invalid> {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                         "spec": spec});
        normalize(resolve("svc").unwrap(), svc)
    }

    fn fields(err: &Invalid) -> Vec<String> {
        err.errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn service_defaults() {
        let v = svc(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "nodePort": 0}],
                           "clusterIP": "127.96.0.9", "sessionAffinity": "ClientIP"}),
        )
        .unwrap();
        assert_eq!(v["spec"]["type"], "ClusterIP");
        assert_eq!(v["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 80);
        assert!(v["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(v["spec"]["clusterIPs"], json!(["127.96.0.9"]));
        assert_eq!(
            v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        assert_eq!(svc(v["spec"].clone()).unwrap(), v, "normalises to itself");
        // clusterIPs alone fills clusterIP.
        let v = svc(json!({"ports": [{"port": 80}], "clusterIPs": ["127.96.0.9"]})).unwrap();
        assert_eq!(v["spec"]["clusterIP"], "127.96.0.9");
    }

    #[test]
    fn service_rejections_name_the_field() {
        let err = svc(json!({"type": "LoadBalancer", "ports": [{"port": 80}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            [
                r#"spec.type: Unsupported value: "LoadBalancer": supported values: "ClusterIP", "NodePort""#
            ]
        );
        let err = svc(json!({"ports": [{"port": 53, "protocol": "UDP"}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            [r#"spec.ports[0].protocol: Unsupported value: "UDP": supported values: "TCP""#]
        );
        let err = svc(json!({"ports": [{"port": 0}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.ports[0].port");
        let err = svc(json!({"ports": [{"port": 80, "nodePort": 30080}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            ["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
        );
        let err = svc(json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80, "nodePort": 30080},
            {"name": "b", "port": 81, "nodePort": 30080}]}))
        .unwrap_err();
        assert_eq!(
            fields(&err),
            [r#"spec.ports[1].nodePort: Duplicate value: "30080""#]
        );
        let err = svc(json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}))
            .unwrap_err();
        assert_eq!(
            fields(&err),
            [
                r#"spec.clusterIPs[0]: Invalid value: "None": may not be set to 'None' for NodePort services"#
            ]
        );
        let err = svc(json!({"clusterIP": "10.0.0.300", "ports": [{"port": 80}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.clusterIPs[0]");
        let err = svc(json!({"ports": [{"port": 80, "targetPort": "no_such_NAME"}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.ports[0].targetPort");
        let err = svc(json!({"sessionAffinity": "ClientIP",
                             "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                             "ports": [{"port": 80}]}))
        .unwrap_err();
        assert_eq!(
            err.errors[0].field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
        // Headless Services need no ports; the node port range is the server's to check.
        svc(json!({"clusterIP": "None", "selector": {"app": "db"}})).unwrap();
        svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]})).unwrap();
    }

    fn endpoints(ips: &[&str]) -> Result<Value, Invalid> {
        let addresses: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let ep = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "e"},
                        "subsets": [{"addresses": addresses,
                                     "notReadyAddresses": [{"ip": "169.254.169.254"}],
                                     "ports": [{"port": 10250}]}]});
        normalize(resolve("endpoints").unwrap(), ep)
    }

    /// Issue 11, item 6: hand-written Endpoints of a selector-less Service were a tunnel to
    /// the host's loopback services and the metadata address (only the IP syntax was checked).
    #[test]
    fn endpoints_may_not_be_special_addresses() {
        let err = endpoints(&[
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "224.0.0.251",
            "239.1.2.3",
            "255.255.255.255",
            "::ffff:127.0.0.1",
            "::",
            "ff02::fb",
        ])
        .unwrap_err();
        assert_eq!(
            fields(&err),
            [
                r#"subsets[0].addresses[0].ip: Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#,
                r#"subsets[0].addresses[1].ip: Invalid value: "0.0.0.0": may not be unspecified (0.0.0.0)"#,
                r#"subsets[0].addresses[2].ip: Invalid value: "::1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#,
                r#"subsets[0].addresses[3].ip: Invalid value: "fe80::1": may not be in the link-local range (169.254.0.0/16, fe80::/10)"#,
                r#"subsets[0].addresses[4].ip: Invalid value: "224.0.0.251": may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"#,
                r#"subsets[0].addresses[5].ip: Invalid value: "239.1.2.3": may not be a multicast address (224.0.0.0/4, ff00::/8)"#,
                r#"subsets[0].addresses[6].ip: Invalid value: "255.255.255.255": may not be the broadcast address (255.255.255.255)"#,
                r#"subsets[0].addresses[7].ip: Invalid value: "::ffff:127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)"#,
                r#"subsets[0].addresses[8].ip: Invalid value: "::": may not be unspecified (::)"#,
                r#"subsets[0].addresses[9].ip: Invalid value: "ff02::fb": may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"#,
                r#"subsets[0].notReadyAddresses[0].ip: Invalid value: "169.254.169.254": may not be in the link-local range (169.254.0.0/16, fe80::/10)"#,
            ]
        );
        // Pod IPs are loopback addresses outside 127.0.0.0/24: whether one is inside a node's
        // pod CIDR is the API server's to check (it knows the Nodes).
        let ok = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "e"},
                        "subsets": [{"addresses": [{"ip": "127.21.0.5"}, {"ip": "127.0.1.1"}],
                                     "ports": [{"port": 8080}]}]});
        normalize(resolve("endpoints").unwrap(), ok).unwrap();
        let err = endpoints(&["127.0.0.300"]).unwrap_err();
        assert_eq!(err.errors[0].field, "subsets[0].addresses[0].ip");
    }

    #[test]
    fn cidrs() {
        use super::{cidrs_overlap, in_cidr, parse_ipv4_cidr, HOST_LOOPBACK};
        use std::net::Ipv4Addr;
        let c = parse_ipv4_cidr("127.21.3.4/16").unwrap();
        assert_eq!(c, (Ipv4Addr::new(127, 21, 0, 0), 16));
        assert!(in_cidr(c, Ipv4Addr::new(127, 21, 255, 1)));
        assert!(!in_cidr(c, Ipv4Addr::new(127, 22, 0, 1)));
        assert!(in_cidr(
            parse_ipv4_cidr("0.0.0.0/0").unwrap(),
            Ipv4Addr::new(1, 2, 3, 4)
        ));
        assert!(cidrs_overlap(
            parse_ipv4_cidr("127.0.0.0/8").unwrap(),
            HOST_LOOPBACK
        ));
        assert!(!cidrs_overlap(c, HOST_LOOPBACK));
        for bad in [
            "127.21.0.0",
            "127.21.0.0/33",
            "::1/128",
            "x/8",
            "127.21.0.0/-1",
        ] {
            assert_eq!(parse_ipv4_cidr(bad), None, "{bad}");
        }
    }
}
