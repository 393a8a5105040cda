//! Hardening of the API server against quiet clients (issue 11, items 14 and 18), over raw
//! sockets against a real server process: connections that never finish the handshake,
//! never send (or never finish) a request header, stay idle after a response, or never read
//! what they asked for must end within the server's bounds and free their permits; a watch
//! whose client stopped reading must still end at its deadline and free its watch slot.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use crate::support::{wait_for, ServerProc};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn addr(s: &ServerProc) -> String {
    s.url.trim_start_matches("https://").to_string()
}

/// A TLS client config trusting the server's CA, speaking HTTP/1.1.
fn tls_config(s: &ServerProc) -> Arc<rustls::ClientConfig> {
    let kc = wasmctl_client::Kubeconfig::load(Some(&s.kubeconfig)).expect("kubeconfig");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(kc.ca_pem.as_ref().expect("CA in kubeconfig")) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn client_builder(s: &ServerProc) -> reqwest::ClientBuilder {
    let kc = wasmctl_client::Kubeconfig::load(Some(&s.kubeconfig)).expect("kubeconfig");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(kc.ca_pem.as_ref().unwrap()).unwrap())
}

/// A reqwest client with no pooled connection yet (so its request needs a new one).
fn fresh_client(s: &ServerProc) -> reqwest::Client {
    client_builder(s).build().unwrap()
}

/// A TCP connection to the API port with a TLS client session on it, not yet handshaken.
fn tls_open(addr: &str, cfg: &Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).expect("connect to the API port");
    let host = addr.rsplit_once(':').expect("host:port").0.to_string();
    let name = ServerName::try_from(host).expect("server name");
    let conn = rustls::ClientConnection::new(cfg.clone(), name).expect("TLS session");
    rustls::StreamOwned::new(conn, tcp)
}

/// Drive the handshake until it completes (true) or `within` passes (false: the server has
/// not accepted the connection, every connection permit being taken).
fn handshake(tls: &mut Tls, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while tls.conn.is_handshaking() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        tls.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match tls.conn.complete_io(&mut tls.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("TLS handshake failed: {e}"),
        }
    }
    true
}

fn send(tls: &mut Tls, data: &[u8]) {
    tls.write_all(data).expect("write");
    tls.flush().expect("flush");
}

/// Read until `marker` has arrived; what was read.
fn read_until(tls: &mut Tls, marker: &[u8], within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(marker.len()).any(|w| w == marker) {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| {
                panic!(
                    "{:?} did not arrive within {within:?}; got {:?}",
                    String::from_utf8_lossy(marker),
                    String::from_utf8_lossy(&got)
                )
            });
        tls.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match tls.read(&mut buf) {
            Ok(0) => panic!("closed before {:?}", String::from_utf8_lossy(marker)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
    got
}

/// Read (and discard) until the server closes the connection, for at most `within`: true
/// if it did.
fn closed_within(stream: &mut impl Read, sock: &TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            // Reset, or TCP EOF without close_notify: closed all the same.
            Err(_) => return true,
        }
    }
}

fn tls_closed_within(tls: &mut Tls, within: Duration) -> bool {
    let sock = tls.sock.try_clone().unwrap();
    closed_within(tls, &sock, within)
}

/// Open TLS connections that send nothing until the server stops completing handshakes
/// (every connection permit is taken). Returns them with when each was handshaken, and the
/// connection left waiting in the accept queue (its ClientHello sent).
fn fill_connections(addr: &str, cfg: &Arc<rustls::ClientConfig>) -> (Vec<(Tls, Instant)>, Tls) {
    let mut open = Vec::new();
    for _ in 0..64 {
        let mut tls = tls_open(addr, cfg);
        if !handshake(&mut tls, Duration::from_secs(1)) {
            return (open, tls);
        }
        open.push((tls, Instant::now()));
    }
    panic!("the server kept accepting connections beyond --max-connections");
}

/// `n` Events of about 200 KB each (a big annotation) in `default`; the resourceVersion of
/// the last.
async fn create_big_events(s: &ServerProc, n: usize) -> String {
    let filler = "x".repeat(200_000);
    let mut rv = String::new();
    for i in 0..n {
        let ev = json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("big-{i}"), "annotations": {"filler": filler}},
            "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
            "reason": "Filler", "message": "fills socket buffers"});
        let (code, created) = s
            .call(Method::POST, "/api/v1/namespaces/default/events", Some(&ev))
            .await;
        assert_eq!(code, 201, "create event {i}: {}", created["message"]);
        rv = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
    }
    rv
}

/// Item 14: a TCP connection that never starts TLS, TLS connections that never send a
/// request header or stop half-way through one, all up to `--max-connections`: each is
/// closed by the server within its bound, and a client waiting behind them gets served.
#[tokio::test(flavor = "multi_thread")]
async fn quiet_connections_time_out_and_free_their_permits() {
    let dir = tempfile::tempdir().unwrap();
    let header_timeout = Duration::from_secs(2);
    let s = ServerProc::start(
        dir.path(),
        &["--max-connections", "6", "--request-header-timeout", "2s"],
    )
    .await;
    let addr = addr(&s);
    let cfg = tls_config(&s);
    let a = addr.clone();
    let (mut raw, raw_opened, mut quiet, mut probe) = tokio::task::spawn_blocking(move || {
        let raw = TcpStream::connect(&a).expect("connect");
        let raw_opened = Instant::now();
        let (mut quiet, probe) = fill_connections(&a, &cfg);
        assert!(
            quiet.len() >= 3,
            "only {} connections accepted",
            quiet.len()
        );
        // One of them starts a request header and never finishes it.
        send(&mut quiet[0].0, b"GET /readyz HTTP/1.1\r\nHost: x\r\n");
        (raw, raw_opened, quiet, probe)
    })
    .await
    .unwrap();

    // Every permit is taken: the probe waits in the accept queue until the header timeout
    // frees some, then completes its handshake and is served. (Within less than the TLS
    // handshake timeout, which frees the raw connection's permit 10 s after it opened.)
    let served = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let accepted = handshake(&mut probe, header_timeout + Duration::from_secs(3));
        assert!(
            accepted,
            "a new connection was not accepted within {:?} while idle connections held \
             every permit",
            start.elapsed()
        );
        send(&mut probe, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        let resp = read_until(&mut probe, b"ok", Duration::from_secs(5));
        assert!(resp.starts_with(b"HTTP/1.1 200"), "{resp:?}");
        probe
    })
    .await
    .unwrap();
    let resp = fresh_client(&s)
        .get(format!("{}/readyz", s.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("a new client is served");
    assert_eq!(resp.status(), 200);

    tokio::task::spawn_blocking(move || {
        for (i, (tls, opened)) in quiet.iter_mut().enumerate() {
            let left = (*opened + header_timeout + Duration::from_secs(5))
                .saturating_duration_since(Instant::now());
            assert!(
                tls_closed_within(tls, left),
                "quiet connection {i} still open {:?} after its handshake",
                opened.elapsed()
            );
            assert!(
                opened.elapsed() >= header_timeout - Duration::from_millis(500),
                "connection {i} closed after {:?}, before the header timeout",
                opened.elapsed()
            );
        }
        // The TLS handshake has its own bound (10 s).
        let left = (raw_opened + Duration::from_secs(15)).saturating_duration_since(Instant::now());
        let sock = raw.try_clone().unwrap();
        assert!(
            closed_within(&mut raw, &sock, left),
            "a connection that never started TLS was still open after {:?}",
            raw_opened.elapsed()
        );
        assert!(raw_opened.elapsed() >= Duration::from_secs(9));
        drop(served);
    })
    .await
    .unwrap();
}

/// Item 14: a kept-alive HTTP/1 connection is closed after the idle timeout, and after the
/// (shorter) header timeout once it starts a request header it never finishes; watches over
/// HTTP/1 and HTTP/2 that stay quiet for longer than the idle timeout keep working.
#[tokio::test(flavor = "multi_thread")]
async fn idle_keepalive_connections_close_but_quiet_watches_stay() {
    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_secs(4);
    let s = ServerProc::start(
        dir.path(),
        &[
            "--idle-connection-timeout",
            "4s",
            "--request-header-timeout",
            "1s",
        ],
    )
    .await;
    let coll = "/api/v1/namespaces/default/events";
    let (code, list) = s.call(Method::GET, coll, None).await;
    assert_eq!(code, 200);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // Two watches, one per protocol, idle from the start.
    let mut watches = Vec::new();
    for http1 in [true, false] {
        let http = if http1 {
            client_builder(&s).http1_only().build().unwrap()
        } else {
            client_builder(&s).build().unwrap()
        };
        let resp = http
            .get(format!(
                "{}{coll}?watch=1&resourceVersion={rv}&timeoutSeconds=60",
                s.url
            ))
            .bearer_auth(&s.token)
            .send()
            .await
            .expect("watch opens");
        assert_eq!(resp.status(), 200);
        let version = resp.version();
        assert_eq!(
            version == reqwest::Version::HTTP_11,
            http1,
            "watch over {version:?}"
        );
        watches.push((version, resp.bytes_stream(), http));
    }

    let addr = addr(&s);
    let cfg = tls_config(&s);
    tokio::task::spawn_blocking(move || {
        // Idle after a response: closed after the idle timeout, not before.
        let mut tls = tls_open(&addr, &cfg);
        assert!(handshake(&mut tls, Duration::from_secs(5)));
        send(&mut tls, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        read_until(&mut tls, b"ok", Duration::from_secs(5));
        let since = Instant::now();
        assert!(
            tls_closed_within(&mut tls, idle + Duration::from_secs(5)),
            "an idle kept-alive connection was still open after {:?}",
            since.elapsed()
        );
        assert!(
            since.elapsed() >= idle - Duration::from_millis(500),
            "closed after {:?}, before the idle timeout",
            since.elapsed()
        );

        // A second request header begun and never finished: closed after the header
        // timeout (1 s), well before the idle timeout.
        let mut tls = tls_open(&addr, &cfg);
        assert!(handshake(&mut tls, Duration::from_secs(5)));
        send(&mut tls, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        read_until(&mut tls, b"ok", Duration::from_secs(5));
        send(&mut tls, b"GET /readyz HTTP/1.1\r\nHost");
        let since = Instant::now();
        assert!(
            tls_closed_within(&mut tls, idle - Duration::from_millis(500)),
            "a half-sent header on a kept-alive connection was still open after {:?}",
            since.elapsed()
        );
    })
    .await
    .unwrap();

    // Both watches have been quiet for well over the idle timeout by now; they still deliver.
    let ev = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "after-idle"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": "Late", "message": "after the idle timeout"});
    let (code, _) = s.call(Method::POST, coll, Some(&ev)).await;
    assert_eq!(code, 201);
    for (version, stream, _http) in &mut watches {
        let mut got = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.expect("watch stream"));
                if got.windows(b"after-idle".len()).any(|w| w == b"after-idle") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "the {version:?} watch did not deliver the event after being idle: {}",
            String::from_utf8_lossy(&got)
        );
    }
}

/// Item 14: a client that asks for a large list and never reads the answer loses its
/// connection (and permit) after the write-stall timeout, though a request is in flight.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_dropped_after_the_write_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(
        dir.path(),
        &[
            "--max-connections",
            "4",
            "--write-stall-timeout",
            "2s",
            // Only the stall may free a permit in this test.
            "--request-header-timeout",
            "120s",
        ],
    )
    .await;
    create_big_events(&s, 150).await;
    let addr = addr(&s);
    let cfg = tls_config(&s);
    let token = s.token.clone();
    tokio::task::spawn_blocking(move || {
        let mut stuck = tls_open(&addr, &cfg);
        assert!(handshake(&mut stuck, Duration::from_secs(5)));
        send(
            &mut stuck,
            format!(
                "GET /api/v1/namespaces/default/events HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        );
        // ~30 MB of answer, and we read none of it. The other permits are taken by quiet
        // connections the header timeout (120 s) does not end in this test.
        let (_quiet, mut probe) = fill_connections(&addr, &cfg);
        let start = Instant::now();
        assert!(
            handshake(&mut probe, Duration::from_secs(15)),
            "no permit was freed within {:?}: the connection that never reads still holds one",
            start.elapsed()
        );
        // The server dropped the stalled connection: what was buffered ends early.
        assert!(
            tls_closed_within(&mut stuck, Duration::from_secs(10)),
            "the stalled connection is still open"
        );
    })
    .await
    .unwrap();
}

/// Item 18: a watch whose client stopped reading (its queue and the socket full) still
/// ends at its `timeoutSeconds` and frees its watch slot.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_whose_client_stopped_reading_frees_its_slot_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    // The write-stall timeout (60 s by default) is far beyond this test's bounds: only the
    // watch's own deadline can free the slot.
    let s = ServerProc::start(dir.path(), &["--max-watches", "1"]).await;
    let rv = create_big_events(&s, 150).await;
    let coll = "/api/v1/namespaces/default/events";
    let addr = addr(&s);
    let cfg = tls_config(&s);
    let token = s.token.clone();
    // The initial state, ~30 MB of ADDED events, to a client that reads only the status.
    let stuck = tokio::task::spawn_blocking(move || {
        let mut tls = tls_open(&addr, &cfg);
        assert!(handshake(&mut tls, Duration::from_secs(5)));
        send(
            &mut tls,
            format!(
                "GET {coll}?watch=1&timeoutSeconds=3 HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        );
        let head = read_until(&mut tls, b"\r\n", Duration::from_secs(10));
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
        tls
    })
    .await
    .unwrap();
    let opened = Instant::now();

    let http = fresh_client(&s);
    let watch = |timeout: u64| {
        let http = http.clone();
        let url = format!(
            "{}{coll}?watch=1&resourceVersion={rv}&timeoutSeconds={timeout}",
            s.url
        );
        let token = s.token.clone();
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("watch request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(watch(1).await, 429, "the stuck watch holds the only slot");
    let code = wait_for(
        Duration::from_secs(15),
        "the stalled watch to end at its 3 s deadline and free its slot",
        || {
            let w = watch(1);
            async move {
                match w.await {
                    429 => None,
                    code => Some(code),
                }
            }
        },
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        opened.elapsed() >= Duration::from_millis(2500),
        "freed after {:?}, before the watch's deadline",
        opened.elapsed()
    );
    drop(stuck);
}

/// Review leftover of item 14: a client that trickles its request body holds its connection
/// no longer than the body timeout, then gets kube's 504 `Timeout` Status.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_never_arrives_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--request-body-timeout", "1s"]).await;
    let addr = addr(&s);
    let cfg = tls_config(&s);
    let token = s.token.clone();
    tokio::task::spawn_blocking(move || {
        let mut slow = tls_open(&addr, &cfg);
        assert!(handshake(&mut slow, Duration::from_secs(5)));
        send(
            &mut slow,
            format!(
                "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
                 content-length: 200\r\n\r\n{{\"kind\":"
            )
            .as_bytes(),
        );
        // The rest of the body never comes. The server answers, then closes (the body was
        // not read to its end).
        let mut answer = Vec::new();
        slow.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = slow.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 504"), "{text}");
        assert!(text.contains(r#""reason":"Timeout""#), "{text}");
        assert!(
            text.contains("Timeout: the request body did not arrive within 1s"),
            "{text}"
        );
    })
    .await
    .unwrap();
}
