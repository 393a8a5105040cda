//! The sockets: [`DnsServer`] binds UDP and TCP on one port (`--dns-listen`, or the node IP
//! on 53, else 1053, else an ephemeral port) and serves them from the current [`Zone`],
//! which a task rebuilds from each Service-table snapshot and hands to the socket tasks
//! through a `watch` channel (per query an atomic check; the zone is fetched again only when
//! a new one was published).
//!
//! Bounds: UDP sockets, one receive task each (by default one per CPU, at most 8), in an
//! `SO_REUSEPORT` group so the kernel spreads clients over them, bound only after an
//! exclusive probe bind of the address succeeded (so the group never joins another agent's);
//! concurrent TCP connections (256 by default; beyond them a connection is closed at once);
//! a TCP idle timeout (10 s); the UDP answer size (see `wire.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hickory_proto::rr::Name;
use hickory_server::net::xfer::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{domain_name, respond, DnsConfig, Zone};
use crate::services::{ServiceSnapshot, ServiceTable};

/// The bound sockets of the DNS server; [`DnsServer::run`] serves them.
pub struct DnsServer {
    /// One socket per receive task (an `SO_REUSEPORT` group: the kernel spreads clients
    /// over them, so the tasks never contend for one queue).
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    addr: SocketAddr,
    origin: Name,
    cfg: DnsConfig,
}

impl DnsServer {
    /// Binds UDP and TCP on the same port: `cfg.listen`, or by default `node_ip:53`, else
    /// `node_ip:1053`, else an ephemeral port on the node IP.
    pub async fn bind(cfg: &DnsConfig, node_ip: Ipv4Addr) -> anyhow::Result<DnsServer> {
        let origin = domain_name(&cfg.cluster_domain)?;
        let (udp, tcp) = match cfg.listen {
            Some(addr) => bind_pair(addr, cfg.udp_workers)
                .with_context(|| format!("binding the cluster DNS on {addr} (udp+tcp)"))?,
            None => {
                let mut last = None;
                let mut bound = None;
                for port in [53, 1053, 0] {
                    let addr = SocketAddr::from((node_ip, port));
                    match bind_pair(addr, cfg.udp_workers) {
                        Ok(p) => {
                            bound = Some(p);
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "cluster DNS cannot bind; trying the next port");
                            last = Some(e);
                        }
                    }
                }
                match bound {
                    Some(p) => p,
                    None => {
                        return Err(last.expect("one error per failed port")).with_context(|| {
                            format!("binding the cluster DNS on {node_ip} (ports 53, 1053, any)")
                        })
                    }
                }
            }
        };
        let addr = tcp.local_addr()?;
        Ok(DnsServer {
            udp,
            tcp,
            addr,
            origin,
            cfg: cfg.clone(),
        })
    }

    /// Where it listens (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`, answering from the current snapshot of `services`.
    pub async fn run(self, services: Arc<ServiceTable>, shutdown: CancellationToken) {
        let max_udp = self.cfg.max_udp_payload;
        let (zone_tx, zone_rx) = watch::channel(Arc::new(Zone::build(
            &self.origin,
            &services.snapshot(),
            max_udp,
        )));
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow(
            services.subscribe(),
            self.origin.clone(),
            max_udp,
            zone_tx,
            shutdown.clone(),
        ));
        for socket in self.udp {
            tasks.spawn(serve_udp(
                socket,
                zone_rx.clone(),
                self.cfg.max_udp_payload,
                shutdown.clone(),
            ));
        }
        tasks.spawn(serve_tcp(self.tcp, zone_rx, self.cfg, shutdown));
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a cluster DNS task failed");
            }
        }
    }
}

/// Binds `udp_sockets` UDP sockets and a TCP listener on the same address (for port 0: the
/// same ephemeral port, retried a few times should TCP find it taken).
fn bind_pair(
    addr: SocketAddr,
    udp_sockets: usize,
) -> std::io::Result<(Vec<UdpSocket>, TcpListener)> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        // An exclusive bind first: it fails if anyone holds the address, also a group of
        // SO_REUSEPORT sockets of another process (e.g. another agent's DNS), which our
        // group would otherwise silently join. It also resolves port 0.
        let probe = std::net::UdpSocket::bind(addr)?;
        let udp_addr = probe.local_addr()?;
        let tcp = match bind_tcp(udp_addr) {
            Ok(tcp) => tcp,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        drop(probe);
        let udp = (0..udp_sockets.max(1))
            .map(|_| bind_udp(udp_addr))
            .collect::<std::io::Result<Vec<_>>>()?;
        return Ok((udp, tcp));
    }
    Err(last.expect("at least one attempt"))
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    // Room for bursts (best effort: the kernel caps it at net.core.rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Rebuilds the zone whenever the Service table publishes a snapshot.
async fn follow(
    mut services: watch::Receiver<Arc<ServiceSnapshot>>,
    origin: Name,
    max_udp: u16,
    zone: watch::Sender<Arc<Zone>>,
    shutdown: CancellationToken,
) {
    loop {
        let snapshot = services.borrow_and_update().clone();
        zone.send_replace(Arc::new(Zone::build(&origin, &snapshot, max_udp)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = services.changed() => if r.is_err() { return },
        }
    }
}

/// The current zone, refreshed only when a new one was published (an atomic load per query).
struct ZoneReader {
    rx: watch::Receiver<Arc<Zone>>,
    zone: Arc<Zone>,
}

impl ZoneReader {
    fn new(mut rx: watch::Receiver<Arc<Zone>>) -> ZoneReader {
        let zone = rx.borrow_and_update().clone();
        ZoneReader { rx, zone }
    }
    fn current(&mut self) -> &Zone {
        if self.rx.has_changed().unwrap_or(false) {
            self.zone = self.rx.borrow_and_update().clone();
        }
        &self.zone
    }
}

async fn serve_udp(
    socket: UdpSocket,
    zone: watch::Receiver<Arc<Zone>>,
    max_udp: u16,
    shutdown: CancellationToken,
) {
    let serve = async {
        let mut zone = ZoneReader::new(zone);
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(1232);
        loop {
            let (n, src) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors of earlier sends surface here; nothing to do about them.
                    tracing::debug!(error = %e, "cluster DNS: UDP receive error");
                    continue;
                }
            };
            if src.port() == 0 {
                continue;
            }
            if respond(
                zone.current(),
                &buf[..n],
                src,
                Protocol::Udp,
                max_udp,
                &mut out,
            )
            .is_some()
            {
                if let Err(e) = socket.send_to(&out, src).await {
                    tracing::debug!(%src, error = %e, "cluster DNS: UDP send failed");
                }
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = serve => {}
    }
}

async fn serve_tcp(
    listener: TcpListener,
    zone: watch::Receiver<Arc<Zone>>,
    cfg: DnsConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_tcp_connections));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, src) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off a little instead of spinning.
                    tracing::warn!(error = %e, "cluster DNS: accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%src, max = cfg.max_tcp_connections, "cluster DNS: too many TCP connections; closing");
            drop(stream);
            continue;
        };
        let zone = zone.clone();
        let shutdown = shutdown.clone();
        let (idle, max_udp) = (cfg.tcp_idle_timeout, cfg.max_udp_payload);
        conns.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = serve_tcp_conn(stream, src, zone, idle, max_udp) => {
                    if let Err(e) = r {
                        tracing::debug!(%src, error = %e, "cluster DNS: TCP connection ended");
                    }
                }
            }
            drop(permit);
        });
    }
    conns.shutdown().await;
}

/// Length-prefixed messages (RFC 1035 4.2.2), answered in order, until the client closes
/// or stays idle for `idle`.
async fn serve_tcp_conn(
    mut stream: TcpStream,
    src: SocketAddr,
    zone: watch::Receiver<Arc<Zone>>,
    idle: Duration,
    max_udp: u16,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut zone = ZoneReader::new(zone);
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut frame = Vec::with_capacity(514);
    loop {
        let read = async {
            let len = stream.read_u16().await?;
            buf.resize(usize::from(len), 0);
            stream.read_exact(&mut buf).await
        };
        match tokio::time::timeout(idle, read).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        if respond(zone.current(), &buf, src, Protocol::Tcp, max_udp, &mut out).is_none() {
            continue;
        }
        let len = u16::try_from(out.len()).unwrap_or(u16::MAX);
        frame.clear();
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&out[..usize::from(len)]);
        stream.write_all(&frame).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::test_support::{port, service};
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::RecordType;

    #[tokio::test]
    async fn serves_udp_and_tcp() {
        let table = ServiceTable::new();
        table.publish(ServiceSnapshot::from_entries(vec![], true, 1));
        let cfg = DnsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            max_tcp_connections: 1,
            tcp_idle_timeout: Duration::from_millis(300),
            ..DnsConfig::default()
        };
        let server = DnsServer::bind(&cfg, Ipv4Addr::LOCALHOST).await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(table.clone(), shutdown.clone()));

        let query = |name: &str| {
            let mut q = Message::query();
            q.metadata.id = 7;
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            q.to_vec().unwrap()
        };
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        async fn udp_ask(udp: &UdpSocket, addr: SocketAddr, q: Vec<u8>) -> Message {
            let mut buf = vec![0u8; 2048];
            udp.send_to(&q, addr).await.unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        }
        let web = "web.default.svc.cluster.local.";
        let m = udp_ask(&udp, addr, query(web)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // A new snapshot is answered at once.
        table.publish(zone_snapshot());
        let mut answered = false;
        for _ in 0..200 {
            let m = udp_ask(&udp, addr, query(web)).await;
            if m.answers.len() == 1 {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(answered, "the new Service is answered");

        // TCP, two queries on one connection.
        let mut c = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            let q = query("_http._tcp.web.default.svc.cluster.local.");
            c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            c.write_all(&q).await.unwrap();
            let len = c.read_u16().await.unwrap();
            let mut b = vec![0u8; len as usize];
            c.read_exact(&mut b).await.unwrap();
            let m = Message::from_vec(&b).unwrap();
            assert_eq!(m.metadata.id, 7);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        }
        // A second connection beyond max_tcp_connections (1) is closed at once.
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        let mut one = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c2.read(&mut one))
            .await
            .expect("closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // The idle connection is closed after the idle timeout.
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut one))
            .await
            .expect("closed after the idle timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .unwrap();
    }

    fn zone_snapshot() -> ServiceSnapshot {
        ServiceSnapshot::from_entries(
            vec![service(
                "default",
                "web",
                Some("127.96.0.10"),
                vec![port("http", 80, &[])],
            )],
            true,
            2,
        )
    }
}
