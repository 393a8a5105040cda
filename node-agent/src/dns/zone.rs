//! The zone: an immutable snapshot of the cluster domain's records, rebuilt from each
//! Service-table snapshot, so a query is one hash lookup (never a scan of the Services) and
//! answers follow a Service change as soon as the table publishes it (nothing is cached
//! beyond the current zone; answers carry a 5 s TTL, CoreDNS's default).
//!
//! Records (Kubernetes' DNS specification, the subset wasmctl needs):
//! `A NAME.NS.svc.DOMAIN.` → the ClusterIP (a Service without one — headless — answers with
//! its ready endpoint IPs, each once); `SRV _PORT._PROTO.NAME.NS.svc.DOMAIN.` (named ports
//! only) → `0 100 PORT NAME.NS.svc.DOMAIN.` with the A records in the additional section;
//! the apex answers `SOA` (serial: the snapshot's generation). The empty non-terminals
//! between the names and the apex exist. Other types of a known name are NODATA (NOERROR, no
//! answer, SOA in the authority section); unknown names in the domain NXDOMAIN
//! (authoritative, SOA), or SERVFAIL until the Service table has listed once; names outside
//! the domain, and classes other than IN and ANY, REFUSED.
//!
//! Each known name's answers are also encoded once when the zone is built (A, SRV, NODATA;
//! with and without EDNS), kept in its [`Node`]: see [`Prepared`].

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::Context as _;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

use super::wire::Prepared;
use crate::services::ServiceSnapshot;

/// TTL of every answer and of negative answers (the SOA minimum): CoreDNS's default.
pub const TTL: u32 = 5;

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
    pub(super) max_udp: u16,
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
                        slots[slot] = Prepared::encode(self, name, qtype, edns);
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

    /// The answer to (`name`, `qtype`) encoded when the zone was built, if there is one.
    pub(super) fn prepared(
        &self,
        name: &LowerName,
        qtype: RecordType,
        edns: bool,
    ) -> Option<&Prepared> {
        let node = self.names.get(name)?;
        let slot = prepared_slot(node, qtype, edns)?;
        node.prepared[slot].as_ref()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::respond;
    use crate::dns::test_support::{ask, rdata, zone};
    use hickory_proto::op::{Message, Query};
    use hickory_server::net::xfer::Protocol;

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
}
