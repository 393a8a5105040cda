//! What a pod may reach, and what it may hold: the one place the sandbox's network policy is
//! decided, for wasi:sockets (the `socket_addr_check` and the socket shadows in [`super::sockets`])
//! and wasi:http ([`super::http`]) alike.
//!
//! - **Its own ports only**: a connect to the pod IP (what the guest calls `127.0.0.1`) is
//!   allowed only to a port this pod listens on — a guest's TCP listener or an HTTP component's
//!   `containerPort` — and a UDP send only to a port it bound. Linux hands a connection to any
//!   127/8 address to a listener on `0.0.0.0`, so without this check every host service bound
//!   to the wildcard (sshd, a database, the API server) would answer every pod.
//! - **Services**: a connect to a Service's `clusterIP:port` (only the ports it declares) goes
//!   to the node's proxy; the [`crate::net::ServiceRouter`] decides.
//! - **Egress** (`wasmctl.dev/egress`: `*` or a host list) allows the rest, except what is
//!   never egress ([`never_egress`]): loopback (other pods, the node's own services), the
//!   unspecified and link-local ranges (cloud metadata at 169.254.169.254), multicast and
//!   broadcast, the node's own addresses, and IPv4-mapped/-compatible IPv6 forms of all of
//!   them. Names are resolved by the agent and the checked address is the one connected to
//!   (no DNS rebinding).
//! - **Bounds** ([`PodNet::claim_socket`]): sockets one pod holds at once, from their creation,
//!   across all of its Stores (one pod cannot exhaust the host's ephemeral ports or the agent's
//!   descriptors; many pods together still could — there is no node-wide cap yet), and
//!   concurrent name lookups ([`PodNet::lookup_permit`]; each holds a blocking-pool thread).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Sockets one pod may hold open at once (TCP and UDP, all of its Stores together).
pub const DEFAULT_MAX_SOCKETS_PER_POD: usize = 1024;

/// Concurrent host name lookups per pod (each occupies a blocking-pool thread).
pub const MAX_LOOKUPS_PER_POD: usize = 8;

/// Where a pod may send traffic beyond itself and the cluster's Services
/// (`wasmctl.dev/egress`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Egress {
    /// Nothing outside the pod (the default).
    #[default]
    None,
    /// Anything that is not [`never_egress`].
    All,
    /// These hosts (names or IPs), any port.
    Hosts(Vec<String>),
}

impl Egress {
    /// `"*"` = all, otherwise a comma-separated host list.
    pub fn parse(s: &str) -> Egress {
        let s = s.trim();
        if s == "*" {
            return Egress::All;
        }
        let hosts: Vec<String> = s
            .split(',')
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            Egress::None
        } else {
            Egress::Hosts(hosts)
        }
    }

    /// Whether the pod may reach the host *name* `host` (its addresses are checked too).
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        match self {
            Egress::None => false,
            Egress::All => true,
            Egress::Hosts(h) => h.iter().any(|x| x.eq_ignore_ascii_case(host)),
        }
    }

    /// Whether the pod may reach the address `ip` (an IP literal the guest connects to).
    fn allows_ip(&self, ip: IpAddr) -> bool {
        match self {
            Egress::None => false,
            Egress::All => true,
            Egress::Hosts(h) => h
                .iter()
                .filter_map(|x| x.parse::<IpAddr>().ok())
                .any(|x| canonical(x) == canonical(ip)),
        }
    }
}

/// `ip` with IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) IPv6 addresses
/// turned into the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Addresses no egress setting reaches: the node itself and what only the node should talk to.
pub fn never_egress(ip: IpAddr, node_ips: &[IpAddr]) -> bool {
    let ip = canonical(ip);
    if node_ips.iter().any(|n| canonical(*n) == ip) {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.octets()[0] == 0
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

/// The name under which `host` may be looked up as a Service from a pod with `egress`, or
/// `None` when it must not be taken for one. Kubernetes' search path (`NS.svc.DOMAIN`,
/// `svc.DOMAIN`, `DOMAIN` with `ndots:5`) makes `github.com` mean Service `github` in a
/// namespace `com` whenever both exist — whoever creates them captures every pod's
/// `https://github.com`. Here:
/// - `NAME`, `NAME.NS.svc` and `NAME.NS.svc.cluster.local` are always Service names;
/// - `NAME.NS` is one only when the pod's egress does not reach that host outside
///   (no egress, or a host list without it): a Service never shadows a host the pod may
///   reach — with `wasmctl.dev/egress: "*"`, write `NAME.NS.svc`;
/// - a trailing dot makes a name absolute: only `NAME.NS.svc.cluster.local.` is a Service then;
/// - IP literals pass through (a ClusterIP is matched by address).
pub fn may_be_service<'h>(host: &'h str, egress: &Egress) -> Option<&'h str> {
    if let Some(abs) = host.strip_suffix('.') {
        return (abs.split('.').count() == 5
            && abs.to_ascii_lowercase().ends_with(".svc.cluster.local"))
        .then_some(abs);
    }
    if host.parse::<IpAddr>().is_ok() {
        return Some(host);
    }
    let labels = host.split('.').count();
    if labels == 2 && egress.allows_host(host) {
        return None;
    }
    Some(host)
}

/// Transport of a port claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

#[derive(Default)]
struct NetState {
    /// Ports guests of this pod listen on (TCP) or are bound to (UDP), with a count of the
    /// sockets holding each.
    ports: HashMap<(Transport, u16), usize>,
    /// `containerPort`s of HTTP components (served by the agent on the pod IP).
    http_ports: HashMap<u16, usize>,
    sockets: usize,
}

/// One pod's network identity and policy, shared by all of its Stores.
pub struct PodNet {
    pub pod_ip: Ipv4Addr,
    pub egress: Egress,
    /// The node's own addresses (never egress).
    pub node_ips: Arc<[IpAddr]>,
    max_sockets: usize,
    /// The budget of all pods of the node together.
    node: Arc<NodeSockets>,
    state: Mutex<NetState>,
    lookups: Arc<tokio::sync::Semaphore>,
}

/// Sockets all guests of one node may hold open at once (`--max-guest-sockets`): each is a
/// file descriptor of the agent, and 1,024 per pod times enough pods would otherwise take the
/// descriptors (and ephemeral ports) the agent needs for its own listeners, heartbeats and
/// proxy connections.
#[derive(Debug)]
pub struct NodeSockets {
    max: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl NodeSockets {
    pub fn new(max: usize) -> Arc<NodeSockets> {
        Arc::new(NodeSockets {
            max: max.max(1),
            used: Default::default(),
        })
    }

    fn try_claim(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.used
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .is_ok()
    }

    fn release(&self) {
        self.used.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sockets guests of this node hold now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PodNet {
    /// A pod's network on a node without a node-wide socket budget (tests, tools).
    pub fn new(
        pod_ip: Ipv4Addr,
        egress: Egress,
        node_ips: Arc<[IpAddr]>,
        max_sockets: usize,
    ) -> Arc<PodNet> {
        Self::on_node(
            pod_ip,
            egress,
            node_ips,
            max_sockets,
            NodeSockets::new(usize::MAX),
        )
    }

    /// A pod's network whose sockets also count against the node's budget.
    pub fn on_node(
        pod_ip: Ipv4Addr,
        egress: Egress,
        node_ips: Arc<[IpAddr]>,
        max_sockets: usize,
        node: Arc<NodeSockets>,
    ) -> Arc<PodNet> {
        Arc::new(PodNet {
            pod_ip,
            egress,
            node_ips,
            max_sockets: max_sockets.max(1),
            node,
            state: Mutex::default(),
            lookups: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS_PER_POD)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("pod net lock")
    }

    /// Whether an address outside the pod and the Services is egress the pod may use.
    pub fn egress_allows_ip(&self, ip: IpAddr) -> bool {
        !never_egress(ip, &self.node_ips) && self.egress.allows_ip(ip)
    }

    /// Whether something of this pod accepts connections on `port` of the pod IP.
    pub fn listens(&self, transport: Transport, port: u16) -> bool {
        let st = self.state();
        st.ports.contains_key(&(transport, port))
            || (transport == Transport::Tcp && st.http_ports.contains_key(&port))
    }

    /// Whether a connect (TCP) or send (UDP) from this pod to `addr` stays inside the pod and
    /// reaches a port of it.
    pub fn is_own_port(&self, transport: Transport, addr: SocketAddr) -> bool {
        addr.ip() == IpAddr::V4(self.pod_ip) && self.listens(transport, addr.port())
    }

    pub fn add_http_port(&self, port: u16) {
        *self.state().http_ports.entry(port).or_default() += 1;
    }

    pub fn remove_http_port(&self, port: u16) {
        let mut st = self.state();
        if let Some(n) = st.http_ports.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                st.http_ports.remove(&port);
            }
        }
    }

    /// Takes one socket of the pod's budget, or `None` when the pod holds its maximum.
    pub fn claim_socket(self: &Arc<Self>) -> Option<SocketClaim> {
        let mut st = self.state();
        if st.sockets >= self.max_sockets || !self.node.try_claim() {
            return None;
        }
        st.sockets += 1;
        Some(SocketClaim {
            net: self.clone(),
            port: None,
        })
    }

    /// Sockets the pod holds now.
    pub fn sockets(&self) -> usize {
        self.state().sockets
    }

    /// A slot for one host name lookup, if the pod has one free.
    pub fn lookup_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.lookups.clone().try_acquire_owned().ok()
    }
}

/// One socket of a pod's budget (and the port it listens on, once it does); released on drop.
pub struct SocketClaim {
    net: Arc<PodNet>,
    port: Option<(Transport, u16)>,
}

impl SocketClaim {
    /// Records that this socket now listens on (TCP) or is bound to (UDP) `port` of the pod IP.
    pub fn set_port(&mut self, transport: Transport, port: u16) {
        if self.port.is_some() {
            return;
        }
        *self.net.state().ports.entry((transport, port)).or_default() += 1;
        self.port = Some((transport, port));
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        let mut st = self.net.state();
        st.sockets -= 1;
        self.net.node.release();
        if let Some(key) = self.port {
            if let Some(n) = st.ports.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    st.ports.remove(&key);
                }
            }
        }
    }
}

/// The socket claims of one Store, by resource handle; dropping the Store releases them all.
#[derive(Default)]
pub struct StoreSockets {
    claims: Mutex<HashMap<u32, SocketClaim>>,
    lookups: Mutex<HashMap<u32, tokio::sync::OwnedSemaphorePermit>>,
}

impl StoreSockets {
    pub fn insert(&self, rep: u32, claim: SocketClaim) {
        self.claims.lock().expect("claims lock").insert(rep, claim);
    }

    pub fn set_port(&self, rep: u32, transport: Transport, port: u16) {
        if let Some(c) = self.claims.lock().expect("claims lock").get_mut(&rep) {
            c.set_port(transport, port);
        }
    }

    pub fn release(&self, rep: u32) {
        self.claims.lock().expect("claims lock").remove(&rep);
    }

    pub fn hold_lookup(&self, rep: u32, permit: tokio::sync::OwnedSemaphorePermit) {
        self.lookups
            .lock()
            .expect("lookups lock")
            .insert(rep, permit);
    }

    /// The lookup `rep` stands for is over (its stream answered) or was dropped. A lookup that
    /// was still `pending` keeps its slot for [`RESOLVER_MAX`]: the host's `getaddrinfo` runs
    /// on a blocking-pool thread that nothing can cancel, so a guest that drops streams and
    /// asks again must not get more threads than its slots.
    pub fn release_lookup(&self, rep: u32, pending: bool) {
        let permit = self.lookups.lock().expect("lookups lock").remove(&rep);
        if pending {
            linger(permit.into_iter().collect());
        }
    }
}

/// The longest the host's resolver works on one name: glibc's defaults (5 s timeout, 2
/// attempts) for each of up to 3 nameservers and up to 6 search domains.
pub const RESOLVER_MAX: std::time::Duration = std::time::Duration::from_secs(180);

/// Holds lookup slots whose `getaddrinfo` may still run until it must have ended.
fn linger(permits: Vec<tokio::sync::OwnedSemaphorePermit>) {
    if permits.is_empty() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            tokio::time::sleep(RESOLVER_MAX).await;
            drop(permits);
        });
    }
}

impl Drop for StoreSockets {
    /// The Store is gone with lookups it never saw the end of: they may still be running.
    fn drop(&mut self) {
        let lookups = std::mem::take(self.lookups.get_mut().expect("lookups lock"));
        linger(lookups.into_values().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_budget_bounds_all_pods_together() {
        let node = NodeSockets::new(5);
        let a = PodNet::on_node(
            Ipv4Addr::new(127, 1, 0, 7),
            Egress::None,
            Arc::from(vec![]),
            4,
            node.clone(),
        );
        let b = PodNet::on_node(
            Ipv4Addr::new(127, 1, 0, 8),
            Egress::None,
            Arc::from(vec![]),
            4,
            node.clone(),
        );
        let held_a: Vec<_> = std::iter::from_fn(|| a.claim_socket()).collect();
        let held_b: Vec<_> = std::iter::from_fn(|| b.claim_socket()).collect();
        assert_eq!((held_a.len(), held_b.len(), node.used()), (4, 1, 5));
        drop(held_a);
        assert_eq!(node.used(), 1);
        assert!(b.claim_socket().is_some());
    }

    /// A lookup dropped before it answered keeps its slot (its `getaddrinfo` thread still
    /// runs), also when its whole Store goes; one that answered frees it at once.
    #[tokio::test]
    async fn unanswered_lookups_keep_their_slot_after_the_guest_drops_them() {
        let net = PodNet::new(
            Ipv4Addr::new(127, 1, 0, 7),
            Egress::All,
            Arc::from(vec![]),
            8,
        );
        let store = StoreSockets::default();
        let all = MAX_LOOKUPS_PER_POD;
        store.hold_lookup(1, net.lookup_permit().unwrap());
        store.release_lookup(1, false);
        assert_eq!(net.lookups.available_permits(), all, "answered: freed");
        store.hold_lookup(2, net.lookup_permit().unwrap());
        store.release_lookup(2, true);
        assert_eq!(
            net.lookups.available_permits(),
            all - 1,
            "dropped pending: held"
        );
        store.hold_lookup(3, net.lookup_permit().unwrap());
        drop(store);
        assert_eq!(net.lookups.available_permits(), all - 2, "Store gone: held");
        // However often a guest drops and asks again, it gets no more than its slots.
        let again = StoreSockets::default();
        let mut got = 0;
        while let Some(p) = net.lookup_permit() {
            again.hold_lookup(10 + got, p);
            again.release_lookup(10 + got, true);
            got += 1;
            assert!(got <= all as u32);
        }
        assert_eq!(got as usize, all - 2);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_node_is_never_egress() {
        let node: Arc<[IpAddr]> = Arc::from(vec![ip("192.0.2.10")]);
        for s in [
            "127.0.0.1",
            "127.1.0.9",
            "127.96.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.10",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:192.0.2.10",
            "fd00:ec2::254",
        ] {
            assert!(never_egress(ip(s), &node), "{s} must never be egress");
        }
        for s in [
            "93.184.216.34",
            "2001:db8::1",
            "10.0.0.1",
            "::ffff:93.184.216.34",
        ] {
            assert!(!never_egress(ip(s), &node), "{s} is ordinary egress");
        }
    }

    #[test]
    fn egress_star_does_not_reach_the_node() {
        let net = PodNet::new(
            Ipv4Addr::new(127, 1, 0, 5),
            Egress::All,
            Arc::from(vec![]),
            4,
        );
        assert!(net.egress_allows_ip(ip("93.184.216.34")));
        assert!(!net.egress_allows_ip(ip("127.0.0.1")));
        assert!(!net.egress_allows_ip(ip("::ffff:127.0.0.1")));
        let listed = PodNet::new(
            Ipv4Addr::new(127, 1, 0, 5),
            Egress::parse("10.0.0.1, example.com, 127.0.0.1"),
            Arc::from(vec![]),
            4,
        );
        assert!(listed.egress_allows_ip(ip("10.0.0.1")));
        assert!(listed.egress_allows_ip(ip("::ffff:10.0.0.1")));
        assert!(
            !listed.egress_allows_ip(ip("127.0.0.1")),
            "listing the node does not open it"
        );
        assert!(listed.egress.allows_host("EXAMPLE.com."));
    }

    #[test]
    fn service_names_never_shadow_reachable_hosts() {
        let none = Egress::None;
        let all = Egress::All;
        let listed = Egress::parse("github.com");
        assert_eq!(may_be_service("cart", &none), Some("cart"));
        assert_eq!(may_be_service("cart.shop", &none), Some("cart.shop"));
        assert_eq!(may_be_service("github.com", &none), Some("github.com"));
        assert_eq!(may_be_service("github.com", &listed), None);
        assert_eq!(may_be_service("cart.shop", &listed), Some("cart.shop"));
        assert_eq!(may_be_service("github.com", &all), None);
        assert_eq!(may_be_service("cart.shop.svc", &all), Some("cart.shop.svc"));
        assert_eq!(
            may_be_service("cart.shop.svc.cluster.local", &all),
            Some("cart.shop.svc.cluster.local")
        );
        assert_eq!(
            may_be_service("cart.", &none),
            None,
            "absolute single label"
        );
        assert_eq!(may_be_service("github.com.", &none), None);
        assert_eq!(
            may_be_service("cart.shop.svc.cluster.local.", &all),
            Some("cart.shop.svc.cluster.local")
        );
        assert_eq!(may_be_service("127.96.0.5", &all), Some("127.96.0.5"));
    }

    #[test]
    fn own_ports_only_while_something_listens() {
        let pod = Ipv4Addr::new(127, 1, 0, 5);
        let net = PodNet::new(pod, Egress::None, Arc::from(vec![]), 4);
        let at = |p: u16| SocketAddr::from((pod, p));
        assert!(!net.is_own_port(Transport::Tcp, at(9000)));
        let mut c = net.claim_socket().unwrap();
        c.set_port(Transport::Tcp, 9000);
        assert!(net.is_own_port(Transport::Tcp, at(9000)));
        assert!(!net.is_own_port(Transport::Udp, at(9000)));
        assert!(!net.is_own_port(Transport::Tcp, SocketAddr::from(([127, 0, 0, 1], 9000))));
        drop(c);
        assert!(!net.is_own_port(Transport::Tcp, at(9000)));
        net.add_http_port(8080);
        assert!(net.is_own_port(Transport::Tcp, at(8080)));
        net.remove_http_port(8080);
        assert!(!net.is_own_port(Transport::Tcp, at(8080)));
    }

    #[test]
    fn the_socket_budget_is_per_pod_and_released_on_drop() {
        let net = PodNet::new(
            Ipv4Addr::new(127, 1, 0, 5),
            Egress::None,
            Arc::from(vec![]),
            3,
        );
        let store_a = StoreSockets::default();
        let store_b = StoreSockets::default();
        store_a.insert(1, net.claim_socket().unwrap());
        store_a.insert(2, net.claim_socket().unwrap());
        store_b.insert(1, net.claim_socket().unwrap());
        assert!(
            net.claim_socket().is_none(),
            "the fourth socket is over budget"
        );
        store_a.release(1);
        assert_eq!(net.sockets(), 2);
        let c = net.claim_socket().unwrap();
        drop(store_a);
        drop(store_b);
        drop(c);
        assert_eq!(net.sockets(), 0, "a dropped Store releases its sockets");
    }
}
