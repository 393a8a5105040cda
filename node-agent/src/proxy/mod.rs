//! The node's Service proxy (kube-proxy's job, in the agent process, no iptables): for every
//! Service port it listens on `clusterIP:port`, and for NodePort Services also on
//! `nodeIP:nodePort`, and forwards to the ready endpoints of the [`ServiceTable`].
//!
//! - **Listeners follow the table**: each change of the table's snapshot adds the listeners
//!   of new ports and stops those of removed ports (their connections drain), leaving every
//!   other listener alone. ClusterIP sockets are bound with `SO_REUSEPORT`, because every agent
//!   on the host binds the same ClusterIP:port (each knows every endpoint, so whichever agent
//!   the kernel hands a connection to serves it). A bind that fails is retried every 5 s.
//! - **Mode per port** ([`PortMode::of`]): HTTP when the port's `appProtocol` is `http`, or its
//!   name is `http` or starts with `http-` (Istio's naming convention); raw TCP otherwise.
//!   HTTP is balanced per request with keep-alive to the client (hyper, HTTP/1.1 and h2c);
//!   TCP per connection (`copy_bidirectional`). Upgrades (WebSocket) need TCP mode.
//! - **Balancing** ([`balance`]): power of two choices on in-flight requests (HTTP) or open
//!   connections (TCP) per endpoint, `sessionAffinity: ClientIP` (bounded table, expiry per
//!   `timeoutSeconds`, default 10800 s), and a retry on another endpoint of a request that
//!   never reached its endpoint (connect refused or failed). No ready endpoint → 503.
//! - **In-process**: an endpoint that is a sandbox of this node is served by calling the
//!   component directly ([`router`]); others over pooled HTTP/1.1 connections to
//!   `podIP:port`. Pods' own outgoing `http://SERVICE` requests use the same router.
//! - **Draining**: endpoints removed from Endpoints get no new requests (each request reads the
//!   current snapshot; in-flight ones hold their own connection and finish), and a local pod
//!   that is terminating gets none while another endpoint is ready.
//! - **Bounds**: connections per listener (`--proxy-max-connections`, a semaphore), pooled
//!   connections per endpoint, the affinity tables; bodies stream through unbuffered.
//! - **Known gaps**: a request *with a body* that meets the keep-alive race with a pod being
//!   stopped on another node fails with 502 (only bodiless GET/HEAD/OPTIONS are replayed);
//!   `Upgrade` is not forwarded in HTTP mode; `https://SERVICE` from a pod is egress, not
//!   routed; a ClusterIP port below 1024 needs `CAP_NET_BIND_SERVICE` (the bind is retried).

pub mod balance;
pub mod pool;
pub mod router;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use router::{ForwardError, Router};

use crate::net::plain;
use crate::services::{PortInfo, ServiceEntry, ServiceSnapshot, ServiceType};
use balance::BalanceError;

/// How long connections of a stopped listener (or of a stopping agent) may take to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Bind retries for listeners that could not be bound (port taken).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// How a Service port is proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    /// Per request, keep-alive to the client.
    Http,
    /// Per connection.
    Tcp,
}

impl PortMode {
    /// HTTP when `appProtocol` is `http` (case-insensitive), or the port's name is `http` or
    /// starts with `http-`; TCP otherwise.
    pub fn of(port: &PortInfo) -> PortMode {
        let app_http = port
            .app_protocol
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case("http"));
        let name = port.name.to_ascii_lowercase();
        if app_http || name == "http" || name.starts_with("http-") {
            PortMode::Http
        } else {
            PortMode::Tcp
        }
    }
}

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where NodePorts listen.
    pub node_ip: Ipv4Addr,
    /// Concurrent client connections per listener.
    pub max_connections: usize,
}

/// How a listener finds its Service port in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frontend {
    ClusterIp(SocketAddrV4),
    NodePort(u16),
}

impl Frontend {
    fn resolve<'a>(
        &self,
        snap: &'a ServiceSnapshot,
    ) -> Option<(&'a Arc<ServiceEntry>, &'a PortInfo)> {
        match *self {
            Frontend::ClusterIp(addr) => snap.by_cluster_ip(addr),
            Frontend::NodePort(p) => snap.by_node_port(p),
        }
    }
}

/// The listeners a snapshot asks for: address → (frontend, mode). Pure.
pub fn desired_listeners(
    snap: &ServiceSnapshot,
    node_ip: Ipv4Addr,
) -> HashMap<SocketAddrV4, (Frontend, PortMode)> {
    let mut want = HashMap::new();
    for svc in snap.services() {
        if svc.type_ == ServiceType::ExternalName {
            continue;
        }
        for port in svc.ports.iter().filter(|p| p.protocol == "TCP") {
            let mode = PortMode::of(port);
            if let Some(ip) = svc.cluster_ip {
                let addr = SocketAddrV4::new(ip, port.port);
                want.insert(addr, (Frontend::ClusterIp(addr), mode));
            }
            let node_port_type =
                matches!(svc.type_, ServiceType::NodePort | ServiceType::LoadBalancer);
            if let (true, Some(np)) = (node_port_type, port.node_port) {
                want.insert(
                    SocketAddrV4::new(node_ip, np),
                    (Frontend::NodePort(np), mode),
                );
            }
        }
    }
    want
}

struct Listening {
    frontend: Frontend,
    mode: PortMode,
    stop: CancellationToken,
}

/// Runs the proxy until `shutdown`: listeners follow the service table; on shutdown every
/// listener stops and open connections get [`DRAIN_TIMEOUT`] to finish.
pub async fn run(router: Arc<Router>, cfg: ProxyConfig, shutdown: CancellationToken) {
    let mut rx = router.table().subscribe();
    let tracker = TaskTracker::new();
    let mut listening: HashMap<SocketAddrV4, Listening> = HashMap::new();
    let mut warned: HashMap<SocketAddrV4, String> = HashMap::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        let want = desired_listeners(&snap, cfg.node_ip);
        listening.retain(|addr, l| {
            let keep = want.get(addr) == Some(&(l.frontend, l.mode));
            if !keep {
                tracing::info!(listen = %addr, "service port gone; proxy listener stops");
                l.stop.cancel();
            }
            keep
        });
        warned.retain(|addr, _| want.contains_key(addr));
        let mut retry = false;
        for (addr, (frontend, mode)) in want {
            if listening.contains_key(&addr) {
                continue;
            }
            match bind_reuseport(addr) {
                Ok(listener) => {
                    tracing::info!(listen = %addr, ?mode, "proxy listening");
                    warned.remove(&addr);
                    let stop = shutdown.child_token();
                    tracker.spawn(serve(
                        router.clone(),
                        listener,
                        frontend,
                        mode,
                        Arc::new(Semaphore::new(cfg.max_connections.max(1))),
                        stop.clone(),
                        shutdown.clone(),
                        tracker.clone(),
                    ));
                    listening.insert(
                        addr,
                        Listening {
                            frontend,
                            mode,
                            stop,
                        },
                    );
                }
                Err(e) => {
                    retry = true;
                    let msg = e.to_string();
                    if warned.get(&addr) != Some(&msg) {
                        tracing::warn!(listen = %addr, error = %msg, "proxy cannot listen; retrying every 5 s");
                        warned.insert(addr, msg);
                    }
                }
            }
        }
        router.prune();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = rx.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(BIND_RETRY), if retry => {}
        }
    }
    for l in listening.values() {
        l.stop.cancel();
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await;
    router.shutdown().await;
}

/// A listening socket on `addr` that other agents of this host may bind too.
pub fn bind_reuseport(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(SocketAddr::V4(addr))?;
    s.listen(1024)
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    router: Arc<Router>,
    listener: TcpListener,
    frontend: Frontend,
    mode: PortMode,
    conns: Arc<Semaphore>,
    stop: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::debug!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match mode {
                PortMode::Http => serve_http_conn(router, sock, peer, frontend, stop).await,
                PortMode::Tcp => serve_tcp_conn(router, sock, peer, frontend, shutdown).await,
            }
        });
    }
}

async fn serve_http_conn(
    router: Arc<Router>,
    sock: TcpStream,
    peer: SocketAddr,
    frontend: Frontend,
    stop: CancellationToken,
) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(handle_request(&router, frontend, peer, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let conn = builder.serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

/// One request through the proxy: the Service port as of this moment, then the router.
pub async fn handle_request(
    router: &Router,
    frontend: Frontend,
    peer: SocketAddr,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<wasmtime_wasi_http::WasiBody> {
    let snap = router.table().snapshot();
    let Some((svc, port)) = frontend.resolve(&snap) else {
        return plain(503, "the service behind this address is gone\n".into());
    };
    let req = req.map(|b| b.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
    match router.forward_http(svc, port, Some(peer.ip()), req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    }
}

/// 503 when no endpoint is ready or none could be reached, 502 when one failed to answer.
pub fn error_response(e: &ForwardError) -> hyper::Response<wasmtime_wasi_http::WasiBody> {
    match e {
        ForwardError::Balance {
            service,
            source: BalanceError::NoEndpoints,
        } => plain(
            503,
            format!("no endpoints available for service \"{service}\"\n"),
        ),
        ForwardError::Balance { .. } => plain(503, format!("{e}\n")),
        ForwardError::Upstream { .. } => plain(502, format!("{e}\n")),
    }
}

async fn serve_tcp_conn(
    router: Arc<Router>,
    mut sock: TcpStream,
    peer: SocketAddr,
    frontend: Frontend,
    shutdown: CancellationToken,
) {
    let snap = router.table().snapshot();
    let Some((svc, port)) = frontend.resolve(&snap) else {
        return;
    };
    let (mut upstream, lease) = match router.connect_tcp(svc, port, Some(peer.ip())).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "proxy connection refused");
            return;
        }
    };
    drop(snap);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut sock, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(client = %peer, endpoint = %lease.backend.addr(), error = %e, "proxied connection ended");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Backend, ServiceKey, SessionAffinity};

    fn port(name: &str, app: Option<&str>, port: u16, node_port: Option<u16>) -> PortInfo {
        PortInfo {
            name: name.into(),
            port,
            target_port: port.to_string(),
            node_port,
            protocol: "TCP".into(),
            app_protocol: app.map(str::to_string),
            endpoints: Vec::<Backend>::new().into(),
        }
    }

    #[test]
    fn mode_choice() {
        assert_eq!(PortMode::of(&port("http", None, 80, None)), PortMode::Http);
        assert_eq!(PortMode::of(&port("HTTP", None, 80, None)), PortMode::Http);
        assert_eq!(
            PortMode::of(&port("http-api", None, 80, None)),
            PortMode::Http
        );
        assert_eq!(
            PortMode::of(&port("web", Some("http"), 80, None)),
            PortMode::Http
        );
        assert_eq!(
            PortMode::of(&port("", Some("HTTP"), 80, None)),
            PortMode::Http
        );
        assert_eq!(PortMode::of(&port("", None, 80, None)), PortMode::Tcp);
        assert_eq!(PortMode::of(&port("https", None, 443, None)), PortMode::Tcp);
        assert_eq!(PortMode::of(&port("httpx", None, 80, None)), PortMode::Tcp);
        assert_eq!(
            PortMode::of(&port("grpc", Some("kubernetes.io/h2c"), 80, None)),
            PortMode::Tcp
        );
        assert_eq!(
            PortMode::of(&port("redis", None, 6379, None)),
            PortMode::Tcp
        );
    }

    #[test]
    fn listeners_of_a_snapshot() {
        let entry = |name: &str, type_, ip: Option<[u8; 4]>, ports| ServiceEntry {
            key: ServiceKey::new("default", name),
            type_,
            cluster_ip: ip.map(Ipv4Addr::from),
            ports,
            session_affinity: SessionAffinity::None,
            not_ready: vec![],
        };
        let mut udp = port("dns", None, 53, None);
        udp.protocol = "UDP".into();
        let snap = ServiceSnapshot::from_entries(
            vec![
                entry(
                    "web",
                    ServiceType::NodePort,
                    Some([127, 96, 0, 10]),
                    vec![
                        port("http", None, 80, Some(30080)),
                        port("redis", None, 6379, None),
                    ],
                ),
                entry(
                    "db",
                    ServiceType::ClusterIP,
                    Some([127, 96, 0, 11]),
                    vec![port("", None, 5432, None), udp],
                ),
                // Headless: nothing to listen on.
                entry(
                    "headless",
                    ServiceType::ClusterIP,
                    None,
                    vec![port("", None, 80, None)],
                ),
                // A ClusterIP Service keeps no NodePort listener even if one is written.
                entry(
                    "odd",
                    ServiceType::ClusterIP,
                    Some([127, 96, 0, 12]),
                    vec![port("", None, 81, Some(30081))],
                ),
            ],
            true,
            1,
        );
        let node_ip = Ipv4Addr::new(127, 250, 0, 1);
        let want = desired_listeners(&snap, node_ip);
        let a = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        assert_eq!(want.len(), 5, "{want:?}");
        assert_eq!(
            want[&a("127.96.0.10:80")],
            (Frontend::ClusterIp(a("127.96.0.10:80")), PortMode::Http)
        );
        assert_eq!(
            want[&a("127.250.0.1:30080")],
            (Frontend::NodePort(30080), PortMode::Http)
        );
        assert_eq!(want[&a("127.96.0.10:6379")].1, PortMode::Tcp);
        assert_eq!(want[&a("127.96.0.11:5432")].1, PortMode::Tcp);
        assert!(want.contains_key(&a("127.96.0.12:81")));
        assert!(!want.contains_key(&a("127.250.0.1:30081")));
    }

    /// A plain HTTP/1.1 server answering `from NAME PATH`.
    async fn backend(name: &'static str) -> (SocketAddrV4, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(addr) = l.local_addr().unwrap() else {
            unreachable!()
        };
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) =
                    tokio::select! { _ = s.cancelled() => return, a = l.accept() => a.unwrap() };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = format!("from {name} {}", req.uri().path());
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from(body),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        (addr, stop)
    }

    fn free_port(ip: &str) -> u16 {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn proxies_http_and_tcp_and_follows_the_table() {
        use crate::services::ServiceTable;
        let (live, _stop) = backend("live").await;
        let dead = SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port("127.0.0.1"));
        let cluster_ip = Ipv4Addr::new(127, 95, 255, 254);
        let (http_port, tcp_port) = (free_port("127.95.255.254"), free_port("127.95.255.254"));
        let node_port = free_port("127.0.0.1");
        let eps: Arc<[Backend]> = [dead, live]
            .iter()
            .map(|a| Backend {
                ip: *a.ip(),
                port: a.port(),
                node_name: Some("elsewhere".into()),
                pod: None,
            })
            .collect::<Vec<_>>()
            .into();
        let snapshot = |eps: &Arc<[Backend]>| {
            let mut http = port("http", None, http_port, Some(node_port));
            http.endpoints = eps.clone();
            let mut tcp = port("raw", None, tcp_port, None);
            tcp.endpoints = eps.clone();
            ServiceSnapshot::from_entries(
                vec![ServiceEntry {
                    key: ServiceKey::new("default", "web"),
                    type_: ServiceType::NodePort,
                    cluster_ip: Some(cluster_ip),
                    ports: vec![http, tcp],
                    session_affinity: SessionAffinity::None,
                    not_ready: vec![],
                }],
                true,
                1,
            )
        };
        let table = ServiceTable::new();
        table.publish(snapshot(&eps));
        let router = Router::new(table.clone(), Arc::new(crate::net::NoLocalEndpoints));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            router.clone(),
            ProxyConfig {
                node_ip: Ipv4Addr::LOCALHOST,
                max_connections: 64,
            },
            shutdown.clone(),
        ));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let get = |url: String| {
            let client = client.clone();
            async move {
                match client.get(&url).send().await {
                    Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
                    Err(_) => None,
                }
            }
        };
        let url = format!("http://{cluster_ip}:{http_port}/a");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while get(url.clone()).await.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the proxy never listened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Half the picks go to the dead endpoint first: every request is retried onto the live one.
        for _ in 0..20 {
            assert_eq!(get(url.clone()).await, Some((200, "from live /a".into())));
        }
        assert_eq!(
            get(format!("http://127.0.0.1:{node_port}/np")).await,
            Some((200, "from live /np".into()))
        );
        // TCP mode: bytes through to the live endpoint.
        for _ in 0..5 {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = TcpStream::connect((cluster_ip, tcp_port)).await.unwrap();
            c.write_all(b"GET /tcp HTTP/1.0\r\n\r\n").await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert!(
                out.starts_with("HTTP/1.0 200") && out.ends_with("from live /tcp"),
                "{out}"
            );
        }
        // No ready endpoints: 503.
        table.publish(snapshot(&Vec::new().into()));
        let (code, body) = get(url.clone()).await.unwrap();
        assert_eq!(code, 503);
        assert!(
            body.contains("no endpoints available for service \"default/web\""),
            "{body}"
        );
        // The Service goes away: its listeners close.
        table.publish(ServiceSnapshot::from_entries(vec![], true, 2));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((cluster_ip, http_port)).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the listener stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
    }
}
