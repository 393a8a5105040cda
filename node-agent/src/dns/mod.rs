//! Cluster DNS: every agent answers `NAME.NS.svc.cluster.local` from its own Service table,
//! over UDP and TCP on one port (`--dns-listen`; by default the node IP on port 53, else
//! 1053, else a free port), for the cluster domain (`--cluster-domain`). It is authoritative
//! for that domain only: names outside it are REFUSED — the agent never recurses (nor
//! forwards).
//!
//! The wire format is hickory's; what is ours is the data and the sockets:
//!
//! - `zone.rs`: the [`Zone`], an immutable map `name → records` rebuilt from each
//!   [`ServiceSnapshot`](crate::services::ServiceSnapshot) the Service table publishes, and
//!   [`Zone::lookup`]: which records and which response code answer a question.
//! - `wire.rs`: one DNS message in, one answer out ([`respond`]): decoding and encoding by
//!   hickory, and the answers encoded once when the zone is built.
//! - `server.rs`: the sockets ([`DnsServer`]): UDP and TCP tasks answering from the current
//!   zone, which reaches them through a `watch` channel, and their bounds.
//!
//! This file: the configuration ([`DnsConfig`]) and the module's public names.

mod server;
mod wire;
mod zone;

pub use server::DnsServer;
pub use wire::respond;
pub use zone::{domain_name, Lookup, Zone, TTL};

use std::net::SocketAddr;
use std::time::Duration;

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

/// What the tests of the submodules share: a Service snapshot's parts, a zone built from
/// them, and a query answered by [`respond`] and decoded by hickory.
#[cfg(test)]
mod test_support {
    use super::*;
    use crate::services::SessionAffinity;
    use crate::services::{
        Backend, PortInfo, ServiceEntry, ServiceKey, ServiceSnapshot, ServiceType,
    };
    use hickory_proto::op::{Edns, Message, MessageType, Query};
    use hickory_proto::rr::{Name, Record, RecordType};
    use hickory_server::net::xfer::Protocol;

    pub(super) fn port(name: &str, port: u16, endpoints: &[&str]) -> PortInfo {
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

    pub(super) fn service(
        ns: &str,
        name: &str,
        ip: Option<&str>,
        ports: Vec<PortInfo>,
    ) -> ServiceEntry {
        ServiceEntry {
            key: ServiceKey::new(ns, name),
            type_: ServiceType::ClusterIP,
            cluster_ip: ip.map(|ip| ip.parse().unwrap()),
            ports,
            session_affinity: SessionAffinity::None,
            not_ready: vec![],
        }
    }

    pub(super) fn zone(synced: bool) -> Zone {
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
    pub(super) fn ask_with(
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

    pub(super) fn ask(z: &Zone, name: &str, qtype: RecordType) -> Message {
        ask_with(z, name, qtype, Protocol::Udp, None)
    }

    pub(super) fn rdata(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
            .collect()
    }
}
