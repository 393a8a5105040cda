//! One DNS message in, one answer out ([`respond`]). The wire format is hickory's: requests
//! are decoded by `hickory-server` ([`Request::from_bytes`]), answers built with its
//! [`MessageResponseBuilder`] and encoded by `hickory-proto`'s [`BinEncoder`], which also
//! truncates a UDP answer to the client's EDNS buffer (capped at
//! [`DnsConfig::max_udp_payload`](super::DnsConfig::max_udp_payload), 1232 bytes by
//! default; 512 bytes without EDNS) and sets the TC bit, so the client retries on TCP.
//!
//! A message shorter than a header, or a response, is not answered (no reflection); one
//! undecodable past its header is FORMERR, as is one without exactly one question; another
//! opcode than QUERY is NOTIMP, an EDNS version above 0 BADVERS; the rest is the zone's
//! [`Lookup`](super::Lookup). No answer offers recursion.
//!
//! Prepared answers ([`Prepared`]): when the zone is built, each known name's answers (A,
//! SRV, NODATA; with and without EDNS) are encoded once; a query for it then costs a fresh
//! header (hickory's [`Header`]), a copy of its own question bytes and a copy of the
//! prepared tail — byte for byte the per-query encoding (a test compares them), and what
//! puts the server past 100k queries/s on 2 cores (BENCHMARKS.md). Anything else (the apex,
//! NXDOMAIN, SERVFAIL, REFUSED, ANY, other classes, errors, answers that must be truncated)
//! is encoded per query.

use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::MessageResponseBuilder;

use super::zone::{Lookup, Zone};

/// One answer to a known name, encoded by hickory when the zone is built: the header counts
/// and everything after the question section. A query for that name is answered with a
/// header of its own (the request's id and flags), the request's question bytes (as long as
/// the name the answer was prepared for: the same name, whatever its case) and these bytes —
/// byte for byte what encoding the records per query produces (a test pins that), without
/// encoding anything per query. Names are never compressed against the question (hickory
/// registers the question as one blob with its type and class), so the tail does not depend
/// on how the question was written.
#[derive(Debug)]
pub(super) struct Prepared {
    counts: HeaderCounts,
    /// Length of the question section the tail was encoded after.
    question_len: usize,
    tail: Box<[u8]>,
}

impl Prepared {
    /// The answer to a canonical query (`name`, `qtype`, IN, no flags) as `respond` encodes
    /// it, split after the question.
    pub(super) fn encode(
        zone: &Zone,
        name: &LowerName,
        qtype: RecordType,
        edns: bool,
    ) -> Option<Prepared> {
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
            zone,
            &raw,
            src,
            Protocol::Tcp,
            zone.max_udp,
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
}

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
    let prepared = zone.prepared(q.name(), q.query_type(), request.edns.is_some())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::domain_name;
    use crate::dns::test_support::{ask, ask_with, port, service, zone};
    use crate::services::ServiceSnapshot;
    use hickory_proto::op::{Message, Query};

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
}
