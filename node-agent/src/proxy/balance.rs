//! Endpoint choice: power-of-two-choices over the ready endpoints of a Service port, weighted
//! by what each endpoint has in flight on this node (HTTP requests, or open TCP connections),
//! `sessionAffinity: ClientIP`, and the retry of an attempt that never reached its endpoint.
//!
//! The in-flight counts are node-wide per endpoint address (a pod behind two Services is one
//! pod), held by [`Lease`]s: a request or connection holds its lease until it is finished, so
//! an endpoint that answers slowly collects fewer new requests.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::services::{Backend, PortInfo, ServiceEntry, ServiceKey, SessionAffinity};

/// Attempts per request or connection: the first endpoint and up to two others, each only
/// after the previous attempt failed before anything reached its endpoint.
pub const MAX_ATTEMPTS: usize = 3;

/// Client IPs remembered per Service port with `sessionAffinity: ClientIP`.
pub const MAX_AFFINITY_ENTRIES: usize = 16_384;

/// Service ports with an affinity table; beyond this, tables whose clients all expired go.
const MAX_AFFINITY_PORTS: usize = 1024;

/// Forgotten in-flight counters are swept when the map grows beyond this.
const MAX_IDLE_COUNTERS: usize = 4096;

/// One endpoint chosen for one request or connection; counts as in flight until dropped.
#[derive(Debug)]
pub struct Lease {
    pub backend: Backend,
    inflight: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of one attempt on one endpoint.
pub enum Attempt<R, T> {
    /// Answered (successfully or not): no retry.
    Done(T),
    /// Nothing reached the endpoint (connect refused or failed, the pod is gone): the request
    /// comes back and may go to another endpoint.
    NotSent(R, String),
}

/// Why no endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("no ready endpoints")]
    NoEndpoints,
    #[error("no endpoint could be reached ({attempts} tried; last: {last})")]
    Unreachable { attempts: usize, last: String },
}

struct Pin {
    backend: SocketAddrV4,
    last_used: Instant,
}

/// The node's balancer: in-flight counts per endpoint, affinity tables per Service port.
#[derive(Default)]
pub struct Balancer {
    inflight: RwLock<HashMap<SocketAddrV4, Arc<AtomicUsize>>>,
    affinity: Mutex<HashMap<(ServiceKey, String), HashMap<IpAddr, Pin>>>,
    rng: AtomicU64,
}

impl Balancer {
    pub fn new() -> Balancer {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Balancer {
            rng: AtomicU64::new(seed),
            ..Default::default()
        }
    }

    /// What `addr` has in flight from this node.
    pub fn load(&self, addr: SocketAddrV4) -> usize {
        self.inflight
            .read()
            .expect("inflight lock")
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counter(&self, addr: SocketAddrV4) -> Arc<AtomicUsize> {
        if let Some(c) = self.inflight.read().expect("inflight lock").get(&addr) {
            return c.clone();
        }
        let mut map = self.inflight.write().expect("inflight lock");
        if map.len() >= MAX_IDLE_COUNTERS {
            // Only counters nobody holds a lease on: their endpoints are idle or gone.
            map.retain(|_, c| Arc::strong_count(c) > 1);
        }
        map.entry(addr).or_default().clone()
    }

    /// splitmix64 over a shared counter: cheap, lock-free, good enough to pick two indices.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Chooses an endpoint of `port` for a client, skipping `tried` and, while any other is
    /// left, endpoints `draining` says are being stopped. `None` when nothing is left.
    pub fn pick(
        &self,
        svc: &ServiceEntry,
        port: &PortInfo,
        client: Option<IpAddr>,
        tried: &[SocketAddrV4],
        draining: &(dyn Fn(&Backend) -> bool + Sync),
        now: Instant,
    ) -> Option<Lease> {
        let open: Vec<&Backend> = port
            .endpoints
            .iter()
            .filter(|b| !tried.contains(&b.addr()))
            .collect();
        let serving: Vec<&Backend> = open.iter().copied().filter(|b| !draining(b)).collect();
        // Kubernetes' terminating-endpoint fallback: draining pods only when nothing else is.
        let candidates = if serving.is_empty() { open } else { serving };
        if candidates.is_empty() {
            return None;
        }
        let affinity = match (svc.session_affinity, client) {
            (SessionAffinity::ClientIP { timeout }, Some(ip)) => Some((timeout, ip)),
            _ => None,
        };
        if let Some((timeout, ip)) = affinity {
            let key = (svc.key.clone(), port.name.clone());
            let mut tables = self.affinity.lock().expect("affinity lock");
            if let Some(pin) = tables.get_mut(&key).and_then(|t| t.get_mut(&ip)) {
                if now.saturating_duration_since(pin.last_used) < timeout {
                    if let Some(b) = candidates.iter().find(|b| b.addr() == pin.backend) {
                        pin.last_used = now;
                        return Some(self.lease(b));
                    }
                }
            }
            let chosen = candidates[self.p2c_index(&candidates)];
            if tables.len() >= MAX_AFFINITY_PORTS && !tables.contains_key(&key) {
                tables.retain(|_, t| {
                    t.retain(|_, p| now.saturating_duration_since(p.last_used) < timeout);
                    !t.is_empty()
                });
            }
            let table = tables.entry(key).or_default();
            if table.len() >= MAX_AFFINITY_ENTRIES && !table.contains_key(&ip) {
                table.retain(|_, p| now.saturating_duration_since(p.last_used) < timeout);
                if table.len() >= MAX_AFFINITY_ENTRIES {
                    // Still full of live clients: forget the least recently seen one.
                    if let Some(oldest) = table
                        .iter()
                        .min_by_key(|(_, p)| p.last_used)
                        .map(|(k, _)| *k)
                    {
                        table.remove(&oldest);
                    }
                }
            }
            table.insert(
                ip,
                Pin {
                    backend: chosen.addr(),
                    last_used: now,
                },
            );
            return Some(self.lease(chosen));
        }
        Some(self.lease(candidates[self.p2c_index(&candidates)]))
    }

    fn lease(&self, b: &Backend) -> Lease {
        let inflight = self.counter(b.addr());
        inflight.fetch_add(1, Ordering::Relaxed);
        Lease {
            backend: b.clone(),
            inflight,
        }
    }

    fn p2c_index(&self, candidates: &[&Backend]) -> usize {
        if candidates.len() == 1 {
            return 0;
        }
        let loads: Vec<usize> = {
            let map = self.inflight.read().expect("inflight lock");
            candidates
                .iter()
                .map(|b| map.get(&b.addr()).map_or(0, |c| c.load(Ordering::Relaxed)))
                .collect()
        };
        p2c(&loads, self.random())
    }

    /// Runs `attempt` on endpoints chosen by [`Balancer::pick`] until one is `Done`, trying
    /// another endpoint after each `NotSent`, at most [`MAX_ATTEMPTS`] times.
    pub async fn balance<R, T, F, Fut>(
        &self,
        svc: &ServiceEntry,
        port: &PortInfo,
        client: Option<IpAddr>,
        draining: &(dyn Fn(&Backend) -> bool + Sync),
        mut req: R,
        mut attempt: F,
    ) -> Result<T, BalanceError>
    where
        F: FnMut(Lease, R) -> Fut,
        Fut: Future<Output = Attempt<R, T>>,
    {
        let mut tried: Vec<SocketAddrV4> = Vec::new();
        let mut last = String::new();
        while tried.len() < MAX_ATTEMPTS {
            let Some(lease) = self.pick(svc, port, client, &tried, draining, Instant::now()) else {
                break;
            };
            let addr = lease.backend.addr();
            tried.push(addr);
            match attempt(lease, req).await {
                Attempt::Done(t) => return Ok(t),
                Attempt::NotSent(r, why) => {
                    tracing::debug!(service = %svc.key, endpoint = %addr, error = %why, "endpoint not reached; trying another");
                    self.unpin(svc, port, client, addr);
                    req = r;
                    last = why;
                }
            }
        }
        if tried.is_empty() {
            Err(BalanceError::NoEndpoints)
        } else {
            Err(BalanceError::Unreachable {
                attempts: tried.len(),
                last,
            })
        }
    }

    /// Forgets a client's pin to an endpoint that could not be reached.
    fn unpin(
        &self,
        svc: &ServiceEntry,
        port: &PortInfo,
        client: Option<IpAddr>,
        addr: SocketAddrV4,
    ) {
        let (SessionAffinity::ClientIP { .. }, Some(ip)) = (svc.session_affinity, client) else {
            return;
        };
        let mut tables = self.affinity.lock().expect("affinity lock");
        if let Some(t) = tables.get_mut(&(svc.key.clone(), port.name.clone())) {
            if t.get(&ip).is_some_and(|p| p.backend == addr) {
                t.remove(&ip);
            }
        }
    }

    /// Client IPs pinned for one Service port (tests, diagnostics).
    pub fn affinity_len(&self, svc: &ServiceKey, port: &str) -> usize {
        self.affinity
            .lock()
            .expect("affinity lock")
            .get(&(svc.clone(), port.to_string()))
            .map_or(0, HashMap::len)
    }
}

/// Power of two choices: two distinct indices drawn from `r`, the less loaded wins (the first
/// on a tie).
pub fn p2c(loads: &[usize], r: u64) -> usize {
    let n = loads.len();
    match n {
        0 | 1 => 0,
        _ => {
            let a = (r % n as u64) as usize;
            let b = ((r >> 32) % (n as u64 - 1)) as usize;
            let b = if b >= a { b + 1 } else { b };
            if loads[b] < loads[a] {
                b
            } else {
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::ServiceType;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn backend(last: u8) -> Backend {
        Backend {
            ip: Ipv4Addr::new(127, 1, 0, last),
            port: 8080,
            node_name: Some("a".into()),
            pod: Some(format!("web-{last}")),
        }
    }

    fn service(n: u8, affinity: SessionAffinity) -> ServiceEntry {
        ServiceEntry {
            key: ServiceKey::new("default", "web"),
            type_: ServiceType::ClusterIP,
            cluster_ip: Some(Ipv4Addr::new(127, 96, 0, 1)),
            ports: vec![PortInfo {
                name: "http".into(),
                port: 80,
                target_port: "8080".into(),
                node_port: None,
                protocol: "TCP".into(),
                app_protocol: None,
                endpoints: (1..=n).map(backend).collect::<Vec<_>>().into(),
            }],
            session_affinity: affinity,
            not_ready: vec![],
        }
    }

    fn none(_: &Backend) -> bool {
        false
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        // Whatever two indices are drawn, the less loaded of them wins.
        for r in 0..1000u64 {
            let r = r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let i = p2c(&[5, 0], r);
            assert_eq!(i, 1);
            let i = p2c(&[3, 1, 2], r);
            assert_ne!(i, 0, "the most loaded of three never wins a pair");
        }
        assert_eq!(p2c(&[7], 42), 0);
    }

    #[test]
    fn pick_avoids_loaded_endpoints() {
        let b = Balancer::new();
        let svc = service(2, SessionAffinity::None);
        let port = &svc.ports[0];
        let now = Instant::now();
        // Hold three requests on endpoint 1: the next picks all go to endpoint 2.
        let held: Vec<Lease> = (0..3).map(|_| b.lease(&port.endpoints[0])).collect();
        for _ in 0..20 {
            let l = b.pick(&svc, port, None, &[], &none, now).unwrap();
            assert_eq!(l.backend, port.endpoints[1]);
        }
        assert_eq!(b.load(port.endpoints[0].addr()), 3);
        drop(held);
        assert_eq!(b.load(port.endpoints[0].addr()), 0);
        // Unloaded, with leases held while picking, the picks spread evenly.
        let mut leases = Vec::new();
        for _ in 0..10 {
            leases.push(b.pick(&svc, port, None, &[], &none, now).unwrap());
        }
        assert_eq!(b.load(port.endpoints[0].addr()), 5);
        assert_eq!(b.load(port.endpoints[1].addr()), 5);
    }

    #[test]
    fn draining_endpoints_get_nothing_new_unless_alone() {
        let b = Balancer::new();
        let svc = service(3, SessionAffinity::None);
        let port = &svc.ports[0];
        let drain_1 = |x: &Backend| x.ip.octets()[3] == 1;
        for _ in 0..50 {
            let l = b
                .pick(&svc, port, None, &[], &drain_1, Instant::now())
                .unwrap();
            assert_ne!(l.backend.ip.octets()[3], 1);
        }
        let all = |_: &Backend| true;
        assert!(b
            .pick(&svc, port, None, &[], &all, Instant::now())
            .is_some());
        let tried: Vec<_> = port.endpoints.iter().map(Backend::addr).collect();
        assert!(b
            .pick(&svc, port, None, &tried, &none, Instant::now())
            .is_none());
    }

    #[test]
    fn client_ip_affinity_pins_and_expires() {
        let b = Balancer::new();
        let timeout = Duration::from_secs(10800);
        let svc = service(4, SessionAffinity::ClientIP { timeout });
        let port = &svc.ports[0];
        let t0 = Instant::now();
        let c1: IpAddr = "127.0.0.1".parse().unwrap();
        let first = b
            .pick(&svc, port, Some(c1), &[], &none, t0)
            .unwrap()
            .backend
            .clone();
        // Load on the pinned endpoint does not move the client.
        let _held: Vec<Lease> = (0..10).map(|_| b.lease(&first)).collect();
        for i in 0..20 {
            let t = t0 + Duration::from_secs(i * 60);
            assert_eq!(
                b.pick(&svc, port, Some(c1), &[], &none, t).unwrap().backend,
                first
            );
        }
        assert_eq!(b.affinity_len(&svc.key, "http"), 1);
        // After the timeout without traffic, the client is balanced again (and away from the
        // loaded endpoint).
        let late = t0 + Duration::from_secs(20 * 60) + timeout;
        let again = b
            .pick(&svc, port, Some(c1), &[], &none, late)
            .unwrap()
            .backend
            .clone();
        assert_ne!(again, first);
        // A pinned endpoint that is no longer a candidate is replaced.
        let tried = [again.addr()];
        let moved = b
            .pick(&svc, port, Some(c1), &tried, &none, late)
            .unwrap()
            .backend
            .clone();
        assert_ne!(moved, again);
        // Without affinity nothing is remembered.
        let plain = service(4, SessionAffinity::None);
        b.pick(&plain, &plain.ports[0], Some(c1), &[], &none, t0);
        assert_eq!(b.affinity_len(&plain.key, "other"), 0);
    }

    #[test]
    fn affinity_table_is_bounded() {
        let b = Balancer::new();
        let svc = service(
            2,
            SessionAffinity::ClientIP {
                timeout: Duration::from_secs(10800),
            },
        );
        let port = &svc.ports[0];
        let now = Instant::now();
        for i in 0..(MAX_AFFINITY_ENTRIES as u32 + 100) {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            b.pick(&svc, port, Some(ip), &[], &none, now);
        }
        assert_eq!(b.affinity_len(&svc.key, "http"), MAX_AFFINITY_ENTRIES);
    }

    #[tokio::test]
    async fn retries_once_on_another_endpoint_when_nothing_was_sent() {
        let b = Balancer::new();
        let svc = service(2, SessionAffinity::None);
        let port = &svc.ports[0];
        let mut seen = Vec::new();
        let res = b
            .balance(&svc, port, None, &none, "request", |lease, req| {
                seen.push(lease.backend.clone());
                let first = seen.len() == 1;
                async move {
                    if first {
                        Attempt::NotSent(req, "connection refused".into())
                    } else {
                        Attempt::Done((req, lease.backend.clone()))
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(seen.len(), 2);
        assert_ne!(seen[0], seen[1], "the retry goes to the other endpoint");
        assert_eq!(res.0, "request", "the same request is retried");
        assert_eq!(res.1, seen[1]);
        // Leases were released.
        assert_eq!(b.load(seen[0].addr()) + b.load(seen[1].addr()), 0);

        // Every endpoint refusing: Unreachable after trying each once.
        let err = b
            .balance(&svc, port, None, &none, (), |_, r| async move {
                Attempt::<(), ()>::NotSent(r, "refused".into())
            })
            .await
            .unwrap_err();
        assert_eq!(
            err,
            BalanceError::Unreachable {
                attempts: 2,
                last: "refused".into()
            }
        );
        // No endpoints at all.
        let empty = service(0, SessionAffinity::None);
        let err = b
            .balance(
                &empty,
                &empty.ports[0],
                None,
                &none,
                (),
                |_, r| async move { Attempt::<(), ()>::Done(r) },
            )
            .await
            .unwrap_err();
        assert_eq!(err, BalanceError::NoEndpoints);
    }
}
