//! Cluster DNS: every agent answers `NAME.NS.svc.cluster.local` from its own Service table.
//!
//! The wire format is hickory's: requests are decoded by `hickory-server`
//! ([`Request::from_bytes`]), responses are built with its [`MessageResponseBuilder`] and
//! encoded by `hickory-proto`'s [`BinEncoder`] (which also truncates a UDP answer to the
//! client's EDNS buffer and sets the TC bit). What is ours is the data and the sockets:
//!
//! - A [`Zone`] is an immutable map `name → records`, rebuilt from each
//!   [`ServiceSnapshot`](crate::services::ServiceSnapshot) the Service table publishes, and
//!   handed to the socket tasks through a `watch` channel: a query is one hash lookup, never
//!   a scan of the Services, and an answer follows a Service change as soon as the table
//!   publishes it (no server-side caching; answers carry a 5 s TTL, CoreDNS's default).
//! - Each known name's answers are also encoded once, when the zone is built ([`Prepared`]):
//!   a query for it costs a header, a copy of its question and a copy of the prepared
//!   bytes — the same bytes as encoding per query, which a test checks.
//! - Records (Kubernetes' DNS specification, the subset wasmctl needs):
//!   `A NAME.NS.svc.DOMAIN.` → the ClusterIP (a Service without one — headless — answers
//!   with its ready endpoint IPs); `SRV _PORT._PROTO.NAME.NS.svc.DOMAIN.` →
//!   `0 100 PORT NAME.NS.svc.DOMAIN.` with the A records in the additional section; the
//!   apex answers `SOA`. Other types of a known name are NODATA (NOERROR, no answer, SOA in
//!   the authority section), unknown names in the domain NXDOMAIN (authoritative, SOA),
//!   names outside the domain REFUSED: this server does not recurse.
//! - Sockets: one UDP socket and receive task per CPU (an `SO_REUSEPORT` group, so the
//!   kernel spreads clients over them) and one TCP listener, on the same port.
//! - Bounds: concurrent TCP connections (beyond them a connection is closed at once), a
//!   TCP idle timeout, and the UDP answer size (the client's EDNS size, capped by
//!   [`DnsConfig::max_udp_payload`]; 512 bytes without EDNS).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::services::{ServiceSnapshot, ServiceTable};

/// TTL of every answer and of negative answers (the SOA minimum): CoreDNS's default.
pub const TTL: u32 = 5;

/// What `--dns-listen`, `--cluster-domain` and the bounds configure.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to listen (UDP and TCP, same port). `None`: the node IP on port 53 if it can be
    /// bound, else 1053, else an ephemeral port. Port 0 picks an ephemeral port.
    pub listen: Option<SocketAddr>,
    /// The cluster domain (`cluster.local`).
    pub cluster_domain: String,
    /// TCP connections served at once; more are closed as soon as they are accepted.
    pub max_tcp_connections: usize,
    /// A TCP connection that sends no complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The largest UDP answer, whatever the client's EDNS buffer says (DNS Flag Day 2020's
    /// 1232 bytes); longer answers are truncated with the TC bit so the client retries on TCP.
    pub max_udp_payload: u16,
    /// UDP sockets, one receive task each (default: one per CPU).
    pub udp_workers: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: None,
            cluster_domain: crate::services::CLUSTER_DOMAIN.to_string(),
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            max_udp_payload: 1232,
            udp_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(8),
        }
    }
}

// ---------------------------------------------------------------- records

/// The records of one name.
#[derive(Debug, Default)]
struct Node {
    a: Vec<Record>,
    srv: Vec<Record>,
    /// Sent with the SRV answers (the A records of their targets).
    additionals: Vec<Record>,
    /// The answers to this name, encoded once: see [`Prepared`].
    prepared: [Option<Prepared>; PREPARED_SLOTS],
}

/// One answer to a known name, encoded by hickory when the zone is built: the header counts
/// and everything after the question section. A query for that name is answered with a
/// header of its own (the request's id and flags), the request's question bytes (as long as
/// the name the answer was prepared for: the same name, whatever its case) and these bytes —
/// byte for byte what encoding the records per query produces (a test pins that), without
/// encoding anything per query. Names are never compressed against the question (hickory
/// registers the question as one blob with its type and class), so the tail does not depend
/// on how the question was written.
#[derive(Debug)]
struct Prepared {
    counts: HeaderCounts,
    /// Length of the question section the tail was encoded after.
    question_len: usize,
    tail: Box<[u8]>,
}

/// `[A, SRV, NODATA]` × `[without, with EDNS]`.
const PREPARED_SLOTS: usize = 6;

/// The prepared slot of a question type for `node`, `None` for types answered per query (ANY).
fn prepared_slot(node: &Node, qtype: RecordType, edns: bool) -> Option<usize> {
    let kind = match qtype {
        RecordType::ANY => return None,
        RecordType::A if !node.a.is_empty() => 0,
        RecordType::SRV if !node.srv.is_empty() => 1,
        _ => 2,
    };
    Some(kind * 2 + usize::from(edns))
}

/// An immutable snapshot of the cluster domain: every name with its records, plus the empty
/// non-terminals between them and the apex (which exist, so they are NODATA, not NXDOMAIN).
#[derive(Debug)]
pub struct Zone {
    origin: LowerName,
    soa: Record,
    names: HashMap<LowerName, Node>,
    /// The UDP cap the prepared answers advertise in their EDNS record.
    max_udp: u16,
    /// The Service table has listed Services and Endpoints at least once: before that an
    /// unknown name may just not be known yet, so it is SERVFAIL rather than NXDOMAIN.
    synced: bool,
}

/// The outcome of a lookup: the response code and the records of each section.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'z> {
    pub code: ResponseCode,
    pub authoritative: bool,
    pub answers: &'z [Record],
    pub additionals: &'z [Record],
    /// The zone's SOA, in the authority section (negative answers).
    pub soa: Option<&'z Record>,
}

impl Zone {
    /// The records of `snapshot` under `domain` (e.g. `cluster.local`), with answers prepared
    /// for a server whose UDP answers are capped at `max_udp` bytes.
    pub fn build(domain: &Name, snapshot: &ServiceSnapshot, max_udp: u16) -> Zone {
        let origin = domain.clone();
        let soa = Record::from_rdata(
            origin.clone(),
            TTL,
            RData::SOA(SOA::new(
                name_in("ns.dns", &origin).unwrap_or_else(|| origin.clone()),
                name_in("hostmaster", &origin).unwrap_or_else(|| origin.clone()),
                // The serial changes with every published table (wraps after 2^32 changes).
                snapshot.generation as u32,
                7200,
                1800,
                86400,
                TTL,
            )),
        );
        let mut names: HashMap<LowerName, Node> = HashMap::new();
        for svc in snapshot.services() {
            let Some(svc_name) = name_in(
                &format!("{}.{}.svc", svc.key.name, svc.key.namespace),
                &origin,
            ) else {
                tracing::debug!(service = %svc.key, "not a valid DNS name; no records");
                continue;
            };
            let ips: Vec<Ipv4Addr> = match svc.cluster_ip {
                Some(ip) => vec![ip],
                // Headless (or not yet allocated): the ready endpoints, each once.
                None => {
                    let mut ips = Vec::new();
                    for b in svc.ports.iter().flat_map(|p| p.endpoints.iter()) {
                        if !ips.contains(&b.ip) {
                            ips.push(b.ip);
                        }
                    }
                    ips
                }
            };
            let a: Vec<Record> = ips
                .iter()
                .map(|ip| Record::from_rdata(svc_name.clone(), TTL, RData::A(A(*ip))))
                .collect();
            for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                let label = format!("_{}._{}", port.name, port.protocol.to_ascii_lowercase());
                let Some(srv_name) = name_in(&label, &svc_name) else {
                    continue;
                };
                let node = names.entry(LowerName::new(&srv_name)).or_default();
                node.srv.push(Record::from_rdata(
                    srv_name.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 100, port.port, svc_name.clone())),
                ));
                node.additionals = a.clone();
                add_ancestors(&mut names, &srv_name, &origin);
            }
            names.entry(LowerName::new(&svc_name)).or_default().a = a;
            add_ancestors(&mut names, &svc_name, &origin);
        }
        let mut zone = Zone {
            origin: LowerName::new(&origin),
            soa,
            names,
            max_udp,
            synced: snapshot.synced,
        };
        zone.prepare();
        zone
    }

    /// Encodes the answers of every name (A, SRV, NODATA; with and without EDNS) once.
    fn prepare(&mut self) {
        let mut prepared = Vec::with_capacity(self.names.len());
        for (name, node) in &self.names {
            let mut slots: [Option<Prepared>; PREPARED_SLOTS] = Default::default();
            for qtype in [RecordType::A, RecordType::SRV, RecordType::AAAA] {
                for edns in [false, true] {
                    let Some(slot) = prepared_slot(node, qtype, edns) else {
                        continue;
                    };
                    if slots[slot].is_none() {
                        slots[slot] = self.encode_prepared(name, qtype, edns);
                    }
                }
            }
            prepared.push((name.clone(), slots));
        }
        for (name, slots) in prepared {
            if let Some(node) = self.names.get_mut(&name) {
                node.prepared = slots;
            }
        }
    }

    /// The answer to a canonical query (`name`, `qtype`, IN, no flags) as `respond` encodes
    /// it, split after the question.
    fn encode_prepared(&self, name: &LowerName, qtype: RecordType, edns: bool) -> Option<Prepared> {
        let mut q = hickory_proto::op::Message::query();
        q.add_query(hickory_proto::op::Query::query(
            Name::from(name.clone()),
            qtype,
        ));
        if edns {
            q.edns = Some(Edns::new());
        }
        let raw = q.to_vec().ok()?;
        let mut out = Vec::new();
        let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 53));
        respond_with(
            self,
            &raw,
            src,
            Protocol::Tcp,
            self.max_udp,
            &mut out,
            false,
        )?;
        let request = Request::from_bytes(raw, src, Protocol::Tcp).ok()?;
        let header = Header::read(&mut BinDecoder::new(&out)).ok()?;
        let question_len = request.queries.as_bytes().len();
        Some(Prepared {
            counts: header.counts,
            question_len,
            tail: out.get(12 + question_len..)?.into(),
        })
    }

    /// The answer to one question.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType, qclass: DNSClass) -> Lookup<'_> {
        let refused = Lookup {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: &[],
            additionals: &[],
            soa: None,
        };
        if !self.origin.zone_of(name) {
            return refused;
        }
        if qclass != DNSClass::IN && qclass != DNSClass::ANY {
            return refused;
        }
        let mut l = Lookup {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: &[],
            additionals: &[],
            soa: None,
        };
        if *name == self.origin {
            match qtype {
                RecordType::SOA | RecordType::ANY => l.answers = std::slice::from_ref(&self.soa),
                _ => l.soa = Some(&self.soa),
            }
            return l;
        }
        let Some(node) = self.names.get(name) else {
            if !self.synced {
                l.code = ResponseCode::ServFail;
                l.authoritative = false;
                return l;
            }
            l.code = ResponseCode::NXDomain;
            l.soa = Some(&self.soa);
            return l;
        };
        match qtype {
            RecordType::A => l.answers = &node.a,
            RecordType::SRV => {
                l.answers = &node.srv;
                l.additionals = &node.additionals;
            }
            RecordType::ANY if !node.a.is_empty() => l.answers = &node.a,
            RecordType::ANY => {
                l.answers = &node.srv;
                l.additionals = &node.additionals;
            }
            _ => {}
        }
        if l.answers.is_empty() {
            // NODATA: the name exists, the type does not (RFC 2308: SOA for negative caching).
            l.additionals = &[];
            l.soa = Some(&self.soa);
        }
        l
    }
}

/// `prefix.domain`, or `None` if that is not a valid name.
fn name_in(prefix: &str, domain: &Name) -> Option<Name> {
    Name::from_ascii(prefix).ok()?.append_domain(domain).ok()
}

/// The names between `name` and `origin` exist (as empty non-terminals).
fn add_ancestors(names: &mut HashMap<LowerName, Node>, name: &Name, origin: &Name) {
    let mut n = name.base_name();
    while n.num_labels() > origin.num_labels() {
        names.entry(LowerName::new(&n)).or_default();
        n = n.base_name();
    }
}

/// The cluster domain as an absolute name (`cluster.local` → `cluster.local.`).
pub fn domain_name(domain: &str) -> anyhow::Result<Name> {
    let mut name = Name::from_ascii(domain.trim_end_matches('.'))
        .with_context(|| format!("invalid cluster domain {domain:?}"))?;
    name.set_fqdn(true);
    if name.is_root() {
        anyhow::bail!("invalid cluster domain {domain:?}: must not be the root");
    }
    Ok(name)
}

// ---------------------------------------------------------------- messages

/// Answers one DNS message from `zone` into `out`. Returns the response code, or `None`
/// when nothing must be sent (a response instead of a query, or fewer bytes than a header).
/// `max_udp` is the configured cap of a UDP answer.
pub fn respond(
    zone: &Zone,
    raw: &[u8],
    src: SocketAddr,
    protocol: Protocol,
    max_udp: u16,
    out: &mut Vec<u8>,
) -> Option<ResponseCode> {
    respond_with(zone, raw, src, protocol, max_udp, out, true)
}

/// [`respond`], optionally without the prepared answers (to prepare them, and in tests).
fn respond_with(
    zone: &Zone,
    raw: &[u8],
    src: SocketAddr,
    protocol: Protocol,
    max_udp: u16,
    out: &mut Vec<u8>,
    use_prepared: bool,
) -> Option<ResponseCode> {
    out.clear();
    let request = match Request::from_bytes(raw.to_vec(), src, protocol) {
        Ok(r) => r,
        Err(_) => {
            // Undecodable past the header: FORMERR with no question (nothing if no header).
            let header = Header::read(&mut BinDecoder::new(raw)).ok()?;
            if header.metadata.message_type == MessageType::Response {
                return None;
            }
            return encode_error(&header.metadata, ResponseCode::FormErr, out);
        }
    };
    if request.metadata.message_type == MessageType::Response {
        // Never answer a response (reflection).
        return None;
    }
    let mut edns = None;
    if let Some(req_edns) = &request.edns {
        let mut e = Edns::new();
        e.set_max_payload(max_udp.max(512));
        e.set_version(0);
        if req_edns.version() > 0 {
            e.set_rcode_high(ResponseCode::BADVERS.high());
            edns = Some(e);
            return encode(
                &request,
                ResponseCode::BADVERS,
                None,
                edns.as_ref(),
                protocol,
                max_udp,
                out,
            );
        }
        edns = Some(e);
    }
    if use_prepared && zone.max_udp == max_udp {
        if let Some(code) = answer_prepared(zone, &request, protocol, max_udp, out) {
            return Some(code);
        }
    }
    let (code, lookup) = if request.metadata.op_code != OpCode::Query {
        (ResponseCode::NotImp, None)
    } else if request.queries.len() != 1 {
        (ResponseCode::FormErr, None)
    } else {
        let q = &request.queries.queries()[0];
        let l = zone.lookup(q.name(), q.query_type(), q.query_class());
        (l.code, Some(l))
    };
    encode(
        &request,
        code,
        lookup.as_ref(),
        edns.as_ref(),
        protocol,
        max_udp,
        out,
    )
}

/// The prepared answer to `request`, if there is one and it fits.
fn answer_prepared(
    zone: &Zone,
    request: &Request,
    protocol: Protocol,
    max_udp: u16,
    out: &mut Vec<u8>,
) -> Option<ResponseCode> {
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        return None;
    }
    let q = &request.queries.queries()[0];
    if q.query_class() != DNSClass::IN {
        return None;
    }
    let node = zone.names.get(q.name())?;
    let slot = prepared_slot(node, q.query_type(), request.edns.is_some())?;
    let prepared = node.prepared[slot].as_ref()?;
    let question = request.queries.as_bytes();
    if question.len() != prepared.question_len {
        return None;
    }
    let len = 12 + question.len() + prepared.tail.len();
    let limit = match protocol {
        Protocol::Udp => usize::from(request.max_payload().min(max_udp.max(512))),
        _ => usize::from(u16::MAX),
    };
    if len > limit {
        // Truncation is hickory's job.
        return None;
    }
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::NoError;
    metadata.recursion_available = false;
    metadata.authoritative = true;
    let header = Header {
        metadata,
        counts: prepared.counts,
    };
    header.emit(&mut BinEncoder::new(out)).ok()?;
    out.extend_from_slice(question);
    out.extend_from_slice(&prepared.tail);
    Some(ResponseCode::NoError)
}

fn encode(
    request: &Request,
    code: ResponseCode,
    lookup: Option<&Lookup<'_>>,
    edns: Option<&Edns>,
    protocol: Protocol,
    max_udp: u16,
    out: &mut Vec<u8>,
) -> Option<ResponseCode> {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    metadata.recursion_available = false;
    metadata.authoritative = lookup.is_some_and(|l| l.authoritative);
    let empty: &[Record] = &[];
    let (answers, additionals, soa) = match lookup {
        Some(l) => (l.answers, l.additionals, l.soa),
        None => (empty, empty, None),
    };
    let response = MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        answers,
        empty,
        soa,
        additionals,
    );
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(match protocol {
        Protocol::Udp => request.max_payload().min(max_udp.max(512)),
        _ => u16::MAX,
    });
    match response.destructive_emit(&mut encoder) {
        Ok(_) => Some(code),
        Err(e) => {
            tracing::warn!(error = %e, "encoding a DNS answer failed; answering SERVFAIL");
            out.clear();
            encode_error(&request.metadata, ResponseCode::ServFail, out)
        }
    }
}

/// A bare header with `code` (no question).
fn encode_error(request: &Metadata, code: ResponseCode, out: &mut Vec<u8>) -> Option<ResponseCode> {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = code;
    metadata.recursion_available = false;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    header.emit(&mut BinEncoder::new(out)).ok()?;
    Some(code)
}

// ---------------------------------------------------------------- sockets

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
    use crate::services::SessionAffinity;
    use crate::services::{Backend, PortInfo, ServiceEntry, ServiceKey, ServiceType};
    use hickory_proto::op::{Message, Query};

    fn port(name: &str, port: u16, endpoints: &[&str]) -> PortInfo {
        PortInfo {
            name: name.into(),
            port,
            target_port: port.to_string(),
            node_port: None,
            protocol: "TCP".into(),
            app_protocol: None,
            endpoints: endpoints
                .iter()
                .map(|ip| Backend {
                    ip: ip.parse().unwrap(),
                    port: 8080,
                    node_name: None,
                    pod: None,
                })
                .collect::<Vec<_>>()
                .into(),
        }
    }

    fn service(ns: &str, name: &str, ip: Option<&str>, ports: Vec<PortInfo>) -> ServiceEntry {
        ServiceEntry {
            key: ServiceKey::new(ns, name),
            type_: ServiceType::ClusterIP,
            cluster_ip: ip.map(|ip| ip.parse().unwrap()),
            ports,
            session_affinity: SessionAffinity::None,
            not_ready: vec![],
        }
    }

    fn zone(synced: bool) -> Zone {
        let snap = ServiceSnapshot::from_entries(
            vec![
                service(
                    "default",
                    "web",
                    Some("127.96.0.10"),
                    vec![port("http", 80, &["127.1.0.2"]), port("metrics", 9090, &[])],
                ),
                service(
                    "shop",
                    "db",
                    None,
                    vec![port("", 5432, &["127.1.0.7", "127.2.0.3", "127.1.0.7"])],
                ),
            ],
            synced,
            7,
        );
        Zone::build(&domain_name("cluster.local").unwrap(), &snap, 1232)
    }

    /// A query as a client sends it, answered by `respond`, decoded by hickory.
    fn ask_with(
        z: &Zone,
        name: &str,
        qtype: RecordType,
        protocol: Protocol,
        edns: Option<u16>,
    ) -> Message {
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            q.edns = Some(e);
        }
        let raw = q.to_vec().unwrap();
        let mut out = Vec::new();
        respond(
            z,
            &raw,
            "127.0.0.1:5353".parse().unwrap(),
            protocol,
            1232,
            &mut out,
        )
        .expect("an answer");
        let m = Message::from_vec(&out).expect("a decodable answer");
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.recursion_desired, "RD is copied");
        assert!(!m.metadata.recursion_available, "no recursion");
        m
    }

    fn ask(z: &Zone, name: &str, qtype: RecordType) -> Message {
        ask_with(z, name, qtype, Protocol::Udp, None)
    }

    fn rdata(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
            .collect()
    }

    #[test]
    fn a_record_is_the_cluster_ip() {
        let z = zone(true);
        let m = ask(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(
            rdata(&m.answers),
            ["web.default.svc.cluster.local. 5 127.96.0.10"]
        );
        // Case-insensitive, and the question is echoed as asked.
        let m = ask(&z, "WEB.Default.SVC.cluster.local.", RecordType::A);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(
            m.queries[0].name().to_string(),
            "WEB.Default.SVC.cluster.local."
        );
    }

    #[test]
    fn headless_service_answers_its_ready_endpoints() {
        let z = zone(true);
        let m = ask(&z, "db.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(
            rdata(&m.answers),
            [
                "db.shop.svc.cluster.local. 5 127.1.0.7",
                "db.shop.svc.cluster.local. 5 127.2.0.3"
            ]
        );
    }

    #[test]
    fn srv_record_of_a_named_port_with_its_a_record() {
        let z = zone(true);
        let m = ask(
            &z,
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            rdata(&m.answers),
            ["_http._tcp.web.default.svc.cluster.local. 5 0 100 80 web.default.svc.cluster.local."]
        );
        assert_eq!(
            rdata(&m.additionals),
            ["web.default.svc.cluster.local. 5 127.96.0.10"]
        );
        let m = ask(
            &z,
            "_metrics._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(m.answers.len(), 1);
        // An unnamed port has no SRV record.
        let m = ask(&z, "_._tcp.db.shop.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn unknown_names_are_nxdomain_with_the_soa() {
        let z = zone(true);
        for name in [
            "missing.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "_grpc._tcp.web.default.svc.cluster.local.",
            "a.b.web.default.svc.cluster.local.",
            "pod.cluster.local.",
        ] {
            let m = ask(&z, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(m.metadata.authoritative, "{name}");
            assert!(m.answers.is_empty());
            assert_eq!(m.authorities.len(), 1, "{name}");
            let RData::SOA(soa) = &m.authorities[0].data else {
                panic!("{name}: an SOA in the authority section")
            };
            assert_eq!(soa.serial, 7);
            assert_eq!(soa.minimum, TTL);
            assert_eq!(m.authorities[0].name.to_string(), "cluster.local.");
        }
    }

    #[test]
    fn nodata_for_other_types_and_empty_non_terminals() {
        let z = zone(true);
        for (name, qtype) in [
            ("web.default.svc.cluster.local.", RecordType::AAAA),
            ("web.default.svc.cluster.local.", RecordType::TXT),
            ("web.default.svc.cluster.local.", RecordType::SRV),
            ("_http._tcp.web.default.svc.cluster.local.", RecordType::A),
            ("default.svc.cluster.local.", RecordType::A),
            ("svc.cluster.local.", RecordType::A),
            ("cluster.local.", RecordType::A),
        ] {
            let m = ask(&z, name, qtype);
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NoError,
                "{name} {qtype}"
            );
            assert!(m.metadata.authoritative);
            assert!(m.answers.is_empty(), "{name} {qtype}");
            assert!(m.additionals.is_empty(), "{name} {qtype}");
            assert_eq!(m.authorities.len(), 1, "{name} {qtype}: the SOA");
        }
        let m = ask(&z, "cluster.local.", RecordType::SOA);
        assert_eq!(m.answers.len(), 1);
        assert!(matches!(m.answers[0].data, RData::SOA(_)));
    }

    #[test]
    fn names_outside_the_domain_are_refused() {
        let z = zone(true);
        for name in [
            "example.com.",
            "web.default.svc.cluster.localx.",
            "local.",
            ".",
        ] {
            let m = ask(&z, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(!m.metadata.authoritative);
            assert!(m.answers.is_empty() && m.authorities.is_empty());
        }
        // Another class inside the domain too (e.g. CHAOS).
        let mut q = Message::query();
        let mut query = Query::query(
            Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        );
        query.set_query_class(DNSClass::CH);
        q.add_query(query);
        let mut out = Vec::new();
        let code = respond(
            &z,
            &q.to_vec().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            Protocol::Udp,
            1232,
            &mut out,
        );
        assert_eq!(code, Some(ResponseCode::Refused));
    }

    #[test]
    fn not_synced_yet_is_servfail_not_nxdomain() {
        let z = zone(false);
        let m = ask(&z, "missing.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        // Names already known are answered.
        let m = ask(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.answers.len(), 1);
    }

    #[test]
    fn malformed_and_unsupported_messages() {
        let z = zone(true);
        let src: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut out = Vec::new();
        // Shorter than a header: silence.
        assert_eq!(
            respond(&z, &[1, 2, 3], src, Protocol::Udp, 1232, &mut out),
            None
        );
        // A header announcing a question that is not there: FORMERR.
        let mut raw = vec![0u8; 12];
        raw[0] = 0x12;
        raw[5] = 1;
        assert_eq!(
            respond(&z, &raw, src, Protocol::Udp, 1232, &mut out),
            Some(ResponseCode::FormErr)
        );
        assert_eq!(Message::from_vec(&out).unwrap().metadata.id, 0x1200);
        // A response is never answered.
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        assert_eq!(
            respond(&z, &m.to_vec().unwrap(), src, Protocol::Udp, 1232, &mut out),
            None
        );
        // NOTIFY and friends: NOTIMP.
        let mut m = Message::query();
        m.metadata.op_code = OpCode::Notify;
        m.add_query(Query::query(
            Name::from_ascii("cluster.local.").unwrap(),
            RecordType::SOA,
        ));
        assert_eq!(
            respond(&z, &m.to_vec().unwrap(), src, Protocol::Udp, 1232, &mut out),
            Some(ResponseCode::NotImp)
        );
    }

    #[test]
    fn large_udp_answers_are_truncated_with_tc() {
        let ips: Vec<String> = (0..200)
            .map(|i| format!("127.3.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let snap = ServiceSnapshot::from_entries(
            vec![service(
                "default",
                "big",
                None,
                vec![port("http", 80, &ips)],
            )],
            true,
            1,
        );
        let z = Zone::build(&domain_name("cluster.local").unwrap(), &snap, 1232);
        let name = "big.default.svc.cluster.local.";
        // Without EDNS: 512 bytes.
        let m = ask(&z, name, RecordType::A);
        assert!(m.metadata.truncation, "TC set");
        assert!(m.answers.len() < 200);
        // EDNS 4096 asked, capped at 1232.
        let m = ask_with(&z, name, RecordType::A, Protocol::Udp, Some(4096));
        assert!(m.metadata.truncation);
        assert!(m.to_vec().unwrap().len() <= 1232);
        // TCP: everything.
        let m = ask_with(&z, name, RecordType::A, Protocol::Tcp, None);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
    }

    #[test]
    fn zone_follows_the_snapshot() {
        let origin = domain_name("cluster.local").unwrap();
        let empty = Zone::build(
            &origin,
            &ServiceSnapshot::from_entries(vec![], true, 1),
            1232,
        );
        let m = ask(&empty, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let z = zone(true);
        let m = ask(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.answers.len(), 1);
    }

    /// The prepared answers are byte for byte what encoding per query gives, for any case,
    /// type, flags, EDNS and transport; and they are used.
    #[test]
    fn prepared_answers_equal_encoded_answers() {
        let z = zone(true);
        let src: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut used = 0;
        for name in [
            "web.default.svc.cluster.local.",
            "WeB.DEFAULT.svc.Cluster.Local.",
            "_http._tcp.web.default.svc.cluster.local.",
            "_HTTP._TCP.web.default.svc.cluster.local.",
            "db.shop.svc.cluster.local.",
            "default.svc.cluster.local.",
            "missing.default.svc.cluster.local.",
            "cluster.local.",
            "example.com.",
        ] {
            for qtype in [
                RecordType::A,
                RecordType::SRV,
                RecordType::AAAA,
                RecordType::TXT,
                RecordType::ANY,
                RecordType::SOA,
            ] {
                for edns in [None, Some(512), Some(1232), Some(4096)] {
                    for (rd, cd) in [(false, false), (true, false), (true, true)] {
                        let mut q = Message::query();
                        q.metadata.id = 0xbeef;
                        q.metadata.recursion_desired = rd;
                        q.metadata.checking_disabled = cd;
                        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
                        if let Some(size) = edns {
                            let mut e = Edns::new();
                            e.set_max_payload(size);
                            q.edns = Some(e);
                        }
                        let raw = q.to_vec().unwrap();
                        for protocol in [Protocol::Udp, Protocol::Tcp] {
                            let (mut fast, mut slow) = (Vec::new(), Vec::new());
                            let a = respond_with(&z, &raw, src, protocol, 1232, &mut fast, true);
                            let b = respond_with(&z, &raw, src, protocol, 1232, &mut slow, false);
                            assert_eq!(a, b, "{name} {qtype} {edns:?} {protocol}");
                            assert_eq!(fast, slow, "{name} {qtype} {edns:?} {protocol}");
                            let request = Request::from_bytes(raw.clone(), src, protocol).unwrap();
                            let mut out = Vec::new();
                            if answer_prepared(&z, &request, protocol, 1232, &mut out).is_some() {
                                used += 1;
                            }
                        }
                    }
                }
            }
        }
        // Known names, all but ANY: 4 names × 5 types + 1 non-terminal × 5 types (NODATA),
        // × 4 EDNS × 3 flags × 2 transports, + the headless name.
        assert!(
            used >= 6 * 5 * 4 * 3 * 2,
            "prepared answers used {used} times"
        );
    }

    #[test]
    fn cluster_domain() {
        assert_eq!(
            domain_name("cluster.local").unwrap().to_string(),
            "cluster.local."
        );
        assert_eq!(
            domain_name("Corp.Example.").unwrap().to_string(),
            "Corp.Example."
        );
        assert!(domain_name(".").is_err());
        assert!(domain_name("a..b").is_err());
    }

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
