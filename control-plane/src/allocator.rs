//! Service address allocation, as kube-apiserver's Service registry does it: a cluster IP
//! from `--service-cluster-ip-range` for every Service that is not headless, and a node port
//! from `--service-node-port-range` for every port of a `NodePort` Service, either allocated
//! (at random, then the next free one) or requested (checked to be in the range and free).
//! Updates keep what was allocated when they omit it; a cluster IP never changes.
//!
//! What is allocated is recorded in the store, one record per address
//! (`/wasmctl/alloc/clusterip/<ip>`, `/wasmctl/alloc/nodeport/<port>`, naming the Service
//! that holds it), written in the same store transaction as the Service: a create puts its
//! records (each only if absent) with the Service, an update puts the new ones and deletes the
//! released ones with its compare-and-swap of the Service, a delete removes them with the
//! Service. Two API servers that pick the same address concurrently therefore cannot both
//! commit: the loser's transaction fails as a whole and it allocates again. The decisions
//! below see as taken both the records and what the stored Services hold (Services stored
//! before the records existed; `Objects::bootstrap` also writes their records). The records
//! are the registry's business (`objects/service.rs`).
//!
//! The functions here are pure; [`Objects`](crate::objects::Objects) calls them.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use rand::Rng;
use wasmctl_api::core::Service;
use wasmctl_api::validation::{Errors, Invalid, CLUSTER_IP_NONE};

/// An IPv4 network, `127.96.0.0/16` (host bits are cleared when parsed, as Go's ParseCIDR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// Prefixes a Service range may have: at most 2^20 addresses (Kubernetes' limit for
    /// IPv4), at least two usable ones.
    pub const PREFIXES: std::ops::RangeInclusive<u8> = 12..=30;

    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if !Self::PREFIXES.contains(&prefix) {
            return Err(format!(
                "{addr}/{prefix}: the prefix length must be between /{} and /{}",
                Self::PREFIXES.start(),
                Self::PREFIXES.end()
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }

    /// How many addresses can be handed out: all but the network and broadcast addresses.
    fn usable(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// The `i`th usable address (`i < usable()`).
    fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1 + i)
    }

    /// In the range, and neither its network nor its broadcast address.
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip)
            && (u32::from(ip) - u32::from(self.network)).wrapping_sub(1) < self.usable()
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not a CIDR (expected ADDRESS/PREFIX, e.g. 127.96.0.0/16)")
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?}: {prefix:?} is not a prefix length"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: the prefix length must be at most 32"));
        }
        Ipv4Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// An inclusive range of ports, `30000-32767`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: i32) -> bool {
        (i32::from(self.first)..=i32::from(self.last)).contains(&port)
    }

    fn len(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range (expected FIRST-LAST, e.g. 30000-32767)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(format!(
                "{s:?}: the range must be 1 <= FIRST <= LAST <= 65535"
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The server's Service ranges (`--service-cluster-ip-range`, `--service-node-port-range`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges {
    pub cluster_ip: Ipv4Cidr,
    pub node_ports: PortRange,
}

impl Default for ServiceRanges {
    /// `127.96.0.0/16` (inside 127.0.0.0/8, so that every node of a single host can bind the
    /// cluster IPs) and Kubernetes' `30000-32767`.
    fn default() -> Self {
        ServiceRanges {
            cluster_ip: "127.96.0.0/16".parse().expect("valid default"),
            node_ports: PortRange {
                first: 30000,
                last: 32767,
            },
        }
    }
}

/// The allocator of one API server: its ranges. Nothing here serialises Service writes: the
/// allocation records in the store do (see the module documentation).
#[derive(Debug, Default)]
pub struct ServiceAllocator {
    pub ranges: ServiceRanges,
}

impl ServiceAllocator {
    pub fn new(ranges: ServiceRanges) -> Self {
        ServiceAllocator { ranges }
    }
}

/// The addresses held by Services (other than the one being written) or recorded as
/// allocated.
#[derive(Debug, Default)]
pub struct Allocated {
    pub ips: HashSet<Ipv4Addr>,
    pub node_ports: HashSet<i32>,
}

impl Allocated {
    pub fn from_services<'a>(services: impl IntoIterator<Item = &'a Service>) -> Self {
        let mut out = Allocated::default();
        for s in services {
            for ip in s.spec.cluster_ips.iter().chain(&s.spec.cluster_ip) {
                if let Ok(ip) = ip.parse() {
                    out.ips.insert(ip);
                }
            }
            out.node_ports
                .extend(s.spec.ports.iter().filter_map(|p| p.node_port));
        }
        out
    }
}

/// Why a Service cannot get its addresses.
#[derive(Debug, PartialEq, Eq)]
pub enum AllocError {
    /// A requested address is out of range, taken, or a changed cluster IP (422).
    Invalid(Invalid),
    /// Nothing is left in a range (Kubernetes answers 500 `failed to allocate ...: range is
    /// full`).
    Full(String),
}

fn needs_cluster_ip(s: &Service) -> bool {
    // ExternalName is the one type without; it is not supported here.
    s.spec.type_.as_deref() != Some("ExternalName")
}

fn needs_node_ports(s: &Service) -> bool {
    matches!(s.spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
}

fn unset(ip: &Option<String>) -> bool {
    ip.as_deref().is_none_or(str::is_empty)
}

/// Before an update is defaulted and validated: what the stored Service `old` had and the
/// update `new` omits is kept (Kubernetes' `patchAllocatedValues`: the cluster IP when
/// neither `clusterIP` nor `clusterIPs` is given, a port's node port by port name unless
/// another port of the update uses it), and node ports the update carries unchanged from a
/// `NodePort` Service it turns into `ClusterIP` are dropped (`dropTypeDependentFields`).
pub fn carry_over(old: &Service, new: &mut Service) {
    let (old_ports, new_ports) = (needs_node_ports(old), needs_node_ports(new));
    let both_ips = needs_cluster_ip(old) && needs_cluster_ip(new);
    let (o, n) = (&old.spec, &mut new.spec);
    if old_ports && !new_ports {
        let same = o.ports.len() == n.ports.len()
            && o.ports
                .iter()
                .zip(&n.ports)
                .all(|(a, b)| a.node_port == b.node_port);
        if same {
            for p in &mut n.ports {
                p.node_port = None;
            }
        }
    }
    if both_ips && unset(&n.cluster_ip) && n.cluster_ips.is_empty() {
        n.cluster_ip = o.cluster_ip.clone();
        n.cluster_ips = o.cluster_ips.clone();
    }
    if old_ports && new_ports {
        let used: HashSet<i32> = n
            .ports
            .iter()
            .filter_map(|p| p.node_port)
            .filter(|np| *np != 0)
            .collect();
        for p in n.ports.iter_mut().filter(|p| p.node_port.unwrap_or(0) == 0) {
            let previous = o
                .ports
                .iter()
                .find(|q| q.name == p.name)
                .and_then(|q| q.node_port)
                .filter(|np| !used.contains(np));
            if previous.is_some() {
                p.node_port = previous;
            }
        }
    }
}

/// Fills in the cluster IP and node ports of `svc` (defaulted and validated; `old` is the
/// stored version for an update) and checks the requested ones against the ranges and what
/// the other Services hold. A cluster IP, once set, may not change; node ports may be changed
/// explicitly, to free ones. Values an update keeps are not checked again, so a Service stays
/// writable after the server restarts with other ranges.
pub fn allocate(
    svc: &mut Service,
    old: Option<&Service>,
    taken: &Allocated,
    ranges: &ServiceRanges,
    rng: &mut impl Rng,
) -> Result<(), AllocError> {
    let mut errs = Errors::default();
    let s = &mut svc.spec;
    let kept_ip = old
        .filter(|o| needs_cluster_ip(o))
        .and_then(|o| o.spec.cluster_ip.clone())
        .filter(|ip| !ip.is_empty());
    match (&kept_ip, s.cluster_ip.as_deref()) {
        (Some(old_ip), new) if new != Some(old_ip.as_str()) => {
            errs.invalid(
                "spec.clusterIPs[0]",
                format!(
                    "Invalid value: {:?}: field is immutable",
                    new.unwrap_or_default()
                ),
            );
        }
        (Some(_), _) | (None, Some(CLUSTER_IP_NONE)) => {}
        (None, None | Some("")) => {
            let range = ranges.cluster_ip;
            let start = rng.gen_range(0..range.usable());
            let free = (0..range.usable())
                .map(|i| range.nth((start + i) % range.usable()))
                .find(|ip| !taken.ips.contains(ip));
            match free {
                Some(ip) => s.cluster_ip = Some(ip.to_string()),
                None => {
                    return Err(AllocError::Full(format!(
                        "failed to allocate a serviceIP: range is full (--service-cluster-ip-range {range})"
                    )))
                }
            }
        }
        (None, Some(requested)) => match requested.parse::<Ipv4Addr>() {
            Ok(ip) if !ranges.cluster_ip.is_usable(ip) => errs.invalid(
                "spec.clusterIPs[0]",
                format!(
                    "Invalid value: {requested:?}: provided IP is not in the valid range. The range of valid IPs is {}",
                    ranges.cluster_ip
                ),
            ),
            Ok(ip) if taken.ips.contains(&ip) => errs.invalid(
                "spec.clusterIPs[0]",
                format!("Invalid value: {requested:?}: provided IP is already allocated"),
            ),
            Ok(_) => {}
            Err(_) => errs.invalid(
                "spec.clusterIPs[0]",
                format!("Invalid value: {requested:?}: must be a valid IPv4 address"),
            ),
        },
    }
    s.cluster_ips = s.cluster_ip.iter().cloned().collect();

    if needs_node_ports(svc) {
        let kept: HashSet<i32> = old
            .filter(|o| needs_node_ports(o))
            .into_iter()
            .flat_map(|o| o.spec.ports.iter().filter_map(|p| p.node_port))
            .collect();
        let ports = &mut svc.spec.ports;
        let mut mine: HashSet<i32> = HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let Some(np) = p.node_port.filter(|np| *np != 0) else {
                continue;
            };
            mine.insert(np);
            if kept.contains(&np) {
                continue;
            }
            let field = format!("spec.ports[{i}].nodePort");
            if !ranges.node_ports.contains(np) {
                errs.invalid(
                    field,
                    format!(
                        "Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {}",
                        ranges.node_ports
                    ),
                );
            } else if taken.node_ports.contains(&np) {
                errs.invalid(
                    field,
                    format!("Invalid value: {np}: provided port is already allocated"),
                );
            }
        }
        let range = ranges.node_ports;
        for p in ports.iter_mut().filter(|p| p.node_port.unwrap_or(0) == 0) {
            let start = rng.gen_range(0..range.len());
            let free = (0..range.len())
                .map(|i| i32::from(range.first) + ((start + i) % range.len()) as i32)
                .find(|np| !taken.node_ports.contains(np) && !mine.contains(np));
            match free {
                Some(np) => {
                    mine.insert(np);
                    p.node_port = Some(np);
                }
                None => {
                    return Err(AllocError::Full(format!(
                        "failed to allocate a nodePort: range is full (--service-node-port-range {range})"
                    )))
                }
            }
        }
    }
    errs.into_result().map_err(AllocError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::json;
    use wasmctl_api::registry::resolve;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    /// A Service as the server has it after defaulting and validation.
    fn svc(spec: serde_json::Value) -> Service {
        let v = wasmctl_api::normalize(
            resolve("svc").unwrap(),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": spec}),
        )
        .unwrap();
        serde_json::from_value(v).unwrap()
    }

    fn node_port(port: i32) -> Service {
        svc(json!({"type": "NodePort", "selector": {"app": "web"},
                   "ports": [{"port": 80, "nodePort": port}]}))
    }

    fn messages(e: AllocError) -> Vec<String> {
        match e {
            AllocError::Invalid(inv) => inv.errors.iter().map(|e| e.to_string()).collect(),
            AllocError::Full(m) => vec![m],
        }
    }

    #[test]
    fn parses_ranges() {
        let c: Ipv4Cidr = "127.96.3.7/16".parse().unwrap();
        assert_eq!(c.to_string(), "127.96.0.0/16");
        assert!(c.contains("127.96.255.255".parse().unwrap()));
        assert!(!c.contains("127.97.0.1".parse().unwrap()));
        assert!(!c.is_usable("127.96.0.0".parse().unwrap()));
        assert!(!c.is_usable("127.96.255.255".parse().unwrap()));
        assert!(c.is_usable("127.96.0.1".parse().unwrap()));
        assert!(c.is_usable("127.96.255.254".parse().unwrap()));
        assert!("127.96.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("127.96.0.0/8".parse::<Ipv4Cidr>().is_err(), "too large");
        assert!("127.96.0.0/31".parse::<Ipv4Cidr>().is_err(), "too small");
        assert!("::1/120".parse::<Ipv4Cidr>().is_err());
        assert_eq!(
            "30000-32767".parse::<PortRange>().unwrap(),
            ServiceRanges::default().node_ports
        );
        assert_eq!(
            "8000-8000".parse::<PortRange>().unwrap().to_string(),
            "8000-8000"
        );
        for bad in ["30000", "3-2", "0-10", "1-70000", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_a_cluster_ip_and_node_ports_in_range() {
        let ranges = ServiceRanges::default();
        let mut s = svc(json!({"type": "NodePort", "ports": [
            {"name": "http", "port": 80}, {"name": "admin", "port": 81}]}));
        allocate(&mut s, None, &Allocated::default(), &ranges, &mut rng()).unwrap();
        let ip: Ipv4Addr = s.spec.cluster_ip.as_deref().unwrap().parse().unwrap();
        assert!(ranges.cluster_ip.is_usable(ip), "{ip}");
        assert_eq!(s.spec.cluster_ips, vec![ip.to_string()]);
        let nps: Vec<i32> = s.spec.ports.iter().map(|p| p.node_port.unwrap()).collect();
        assert!(
            nps.iter().all(|np| ranges.node_ports.contains(*np)),
            "{nps:?}"
        );
        assert_ne!(nps[0], nps[1]);
        // ClusterIP Services get no node port; headless ones no IP.
        let mut c = svc(json!({"ports": [{"port": 80}]}));
        allocate(&mut c, None, &Allocated::default(), &ranges, &mut rng()).unwrap();
        assert!(c.spec.ports[0].node_port.is_none());
        let mut h = svc(json!({"clusterIP": "None", "selector": {"app": "db"}}));
        allocate(&mut h, None, &Allocated::default(), &ranges, &mut rng()).unwrap();
        assert_eq!(h.spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(h.spec.cluster_ips, vec!["None"]);
    }

    #[test]
    fn skips_what_others_hold_until_the_range_is_full() {
        let ranges = ServiceRanges {
            cluster_ip: "10.0.0.0/30".parse().unwrap(), // .1 and .2
            node_ports: "30000-30001".parse().unwrap(),
        };
        let mut taken = Allocated::default();
        for _ in 0..2 {
            // The same random start each time: the second one takes the next free values.
            let mut s = node_port(0);
            allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap();
            let mine = Allocated::from_services([&s]);
            taken.ips.extend(mine.ips);
            taken.node_ports.extend(mine.node_ports);
        }
        assert_eq!(
            taken.ips,
            HashSet::from(["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()])
        );
        assert_eq!(taken.node_ports, HashSet::from([30000, 30001]));
        let mut s = svc(json!({"ports": [{"port": 80}]}));
        assert_eq!(
            messages(allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap_err()),
            ["failed to allocate a serviceIP: range is full (--service-cluster-ip-range 10.0.0.0/30)"]
        );
        let ports_only = Allocated {
            node_ports: taken.node_ports.clone(),
            ..Default::default()
        };
        assert_eq!(
            messages(allocate(&mut node_port(0), None, &ports_only, &ranges, &mut rng()).unwrap_err()),
            ["failed to allocate a nodePort: range is full (--service-node-port-range 30000-30001)"]
        );
    }

    #[test]
    fn requested_values_must_be_in_range_and_free() {
        let ranges = ServiceRanges::default();
        let taken = Allocated {
            ips: HashSet::from(["127.96.0.10".parse().unwrap()]),
            node_ports: HashSet::from([30080]),
        };
        let mut s = node_port(30080);
        assert_eq!(
            messages(allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap_err()),
            ["spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"]
        );
        let mut s = node_port(8080);
        assert_eq!(
            messages(allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap_err()),
            ["spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767"]
        );
        let mut s = node_port(30081);
        allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap();
        assert_eq!(s.spec.ports[0].node_port, Some(30081));

        let mut s = svc(json!({"clusterIP": "127.96.0.10", "ports": [{"port": 80}]}));
        assert_eq!(
            messages(allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap_err()),
            [
                r#"spec.clusterIPs[0]: Invalid value: "127.96.0.10": provided IP is already allocated"#
            ]
        );
        for ip in ["10.0.0.1", "127.96.0.0", "127.96.255.255"] {
            let mut s = svc(json!({"clusterIP": ip, "ports": [{"port": 80}]}));
            assert_eq!(
                messages(allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap_err()),
                [format!("spec.clusterIPs[0]: Invalid value: {ip:?}: provided IP is not in the valid range. The range of valid IPs is 127.96.0.0/16")]
            );
        }
        let mut s = svc(json!({"clusterIP": "127.96.0.11", "ports": [{"port": 80}]}));
        allocate(&mut s, None, &taken, &ranges, &mut rng()).unwrap();
        assert_eq!(s.spec.cluster_ips, vec!["127.96.0.11"]);
    }

    /// An update as the registry does it: carry over, default and validate, allocate.
    fn update(old: &Service, mut new: Service, taken: &Allocated) -> Result<Service, AllocError> {
        carry_over(old, &mut new);
        let mut new = svc(serde_json::to_value(&new.spec).unwrap());
        allocate(
            &mut new,
            Some(old),
            taken,
            &ServiceRanges::default(),
            &mut rng(),
        )?;
        Ok(new)
    }

    #[test]
    fn updates_keep_allocated_values_and_cluster_ips_are_immutable() {
        let none = Allocated::default();
        let mut old = svc(json!({"type": "NodePort", "ports": [
            {"name": "http", "port": 80}, {"name": "admin", "port": 81}]}));
        allocate(&mut old, None, &none, &ServiceRanges::default(), &mut rng()).unwrap();
        // What `apply` sends: the manifest's spec, without the allocated values.
        let manifest = svc(json!({"type": "NodePort", "ports": [
            {"name": "http", "port": 80}, {"name": "admin", "port": 81}]}));
        let same = update(&old, manifest.clone(), &none).unwrap();
        assert_eq!(same, old);
        // Changing the cluster IP is refused; changing a node port to a free one is not.
        let mut moved = old.clone();
        moved.spec.cluster_ip = Some("127.96.9.9".into());
        moved.spec.cluster_ips = vec![];
        assert_eq!(
            messages(update(&old, moved, &none).unwrap_err()),
            [r#"spec.clusterIPs[0]: Invalid value: "127.96.9.9": field is immutable"#]
        );
        let mut to_headless = manifest.clone();
        to_headless.spec.type_ = Some("ClusterIP".into());
        to_headless.spec.cluster_ip = Some("None".into());
        assert!(update(&old, to_headless, &none).is_err());
        let mut repinned = old.clone();
        repinned.spec.ports[0].node_port = Some(31999);
        let taken = Allocated {
            node_ports: HashSet::from([31999]),
            ..Default::default()
        };
        assert_eq!(
            messages(update(&old, repinned.clone(), &taken).unwrap_err()),
            ["spec.ports[0].nodePort: Invalid value: 31999: provided port is already allocated"]
        );
        let repinned = update(&old, repinned, &none).unwrap();
        assert_eq!(repinned.spec.ports[0].node_port, Some(31999));
        assert_eq!(
            repinned.spec.ports[1].node_port,
            old.spec.ports[1].node_port
        );
        // A new port gets a new node port; a kept one is not re-checked against the range
        // (the server may have been restarted with another one).
        let mut more = manifest.clone();
        more.spec.ports.push(wasmctl_api::core::ServicePort {
            name: Some("metrics".into()),
            port: 82,
            ..Default::default()
        });
        let more = update(&old, more, &none).unwrap();
        assert_eq!(more.spec.ports[1].node_port, old.spec.ports[1].node_port);
        assert!(more.spec.ports[2].node_port.is_some());
        let mut outside = old.clone();
        outside.spec.ports[0].node_port = Some(80);
        assert!(update(&outside, outside.clone(), &none).is_ok());
    }

    #[test]
    fn type_changes_drop_or_allocate_node_ports() {
        let none = Allocated::default();
        let mut old = node_port(30080);
        allocate(&mut old, None, &none, &ServiceRanges::default(), &mut rng()).unwrap();
        // NodePort -> ClusterIP with the stored object (node ports unchanged): dropped.
        let mut cip = old.clone();
        cip.spec.type_ = Some("ClusterIP".into());
        let cip = update(&old, cip, &none).unwrap();
        assert!(cip.spec.ports[0].node_port.is_none());
        assert_eq!(cip.spec.cluster_ip, old.spec.cluster_ip);
        // ClusterIP -> NodePort: a node port is allocated, the cluster IP kept.
        let mut np = cip.clone();
        np.spec.type_ = Some("NodePort".into());
        np.spec.cluster_ip = None;
        np.spec.cluster_ips.clear();
        let np = update(&cip, np, &none).unwrap();
        assert!(np.spec.ports[0].node_port.is_some());
        assert_eq!(np.spec.cluster_ip, old.spec.cluster_ip);
    }
}
