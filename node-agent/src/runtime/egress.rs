//! A pod's outgoing HTTP to the outside world (egress, `wasmctl.dev/egress`): the agent
//! resolves the host itself, checks every address it got ([`super::reach`]: never the node,
//! loopback, link-local, …), and connects to a checked address — so neither a numeric trick
//! (`2130706433`, `127.1`, `0x7f.1`, `[::ffff:127.0.0.1]`), nor a name that resolves to the
//! node, nor a name that re-resolves between check and connect (DNS rebinding) reaches
//! anything the pod's egress does not allow. Then TLS (rustls, the webpki roots, the host's
//! name), HTTP/1.1 (hyper), as wasmtime-wasi-http's `default_send_request` does.
//!
//! Bounds: one name lookup slot of the pod's ([`super::reach::MAX_LOOKUPS_PER_POD`]), lookup,
//! connect, first-byte and between-bytes timeouts (the guest's `request-options`, else
//! wasmtime's defaults), and the connection task lives in the pod's task tracker.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use super::reach::{never_egress, PodNet};

/// How long a name lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect timeout when the guest sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to the response head when the guest sets none.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest pause inside the response body when the guest sets none (wasmtime-wasi-http's).
const BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(600);

/// The connection-I/O future wasi:http awaits after a response (ours run as pod tasks).
pub(super) type IoFuture = Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>;

/// An [`IoFuture`] with nothing left to do.
pub(super) fn no_io() -> IoFuture {
    Box::new(async { Ok(()) })
}

/// The addresses `host:port` may be reached at by this pod, or why not.
pub async fn checked_addrs(net: &PodNet, host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        // An IP literal: the egress list must allow that address.
        if !net.egress_allows_ip(ip) {
            return Err(Error::DestinationIpProhibited);
        }
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // A name the egress allows (the caller checked): every address it resolves to must be
    // ordinary egress, else none is used.
    // The slot is held by the blocking lookup itself, so a lookup that outlives its timeout
    // still counts against the pod until the resolver returns.
    let slot = net.lookup_permit().ok_or(Error::DnsTimeout)?;
    let name = bare.to_string();
    let lookup = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port)).map(|a| a.collect())
    });
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(Ok(a))) => a,
        Ok(_) => return Err(Error::DestinationNotFound),
        Err(_) => return Err(Error::DnsTimeout),
    };
    if addrs.is_empty() {
        return Err(Error::DestinationNotFound);
    }
    if addrs.iter().any(|a| never_egress(a.ip(), &net.node_ips)) {
        return Err(Error::DestinationIpProhibited);
    }
    Ok(addrs)
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Sends `request` (absolute URI: scheme, authority, path) to one of `addrs`.
pub async fn send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    addrs: Vec<SocketAddr>,
    tasks: &TaskTracker,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let uri = request.uri().clone();
    let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?.to_string();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(CONNECT_TIMEOUT);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(FIRST_BYTE_TIMEOUT);
    let between_bytes_timeout = options
        .and_then(|o| o.between_bytes_timeout)
        .unwrap_or(BETWEEN_BYTES_TIMEOUT);

    let mut last = Error::ConnectionRefused;
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = Error::Connect(e),
            Err(_) => last = Error::ConnectionTimeout,
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if https {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = match bare.parse::<IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(bare.to_string())
                .map_err(Error::InvalidDnsNameError)?,
        };
        let connect = tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp);
        let tls = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // The connection's I/O runs as a task of the pod (drained or dropped with it).
    tasks.spawn(async move {
        let _ = conn.await;
    });
    // Origin form on the wire (the authority travels in `Host`).
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *request.uri_mut() = pq.parse().map_err(|_| Error::HttpRequestUriInvalid)?;
    if !request.headers().contains_key(http::header::HOST) {
        if let Some(a) = uri.authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                request.headers_mut().insert(http::header::HOST, v);
            }
        }
    }
    let resp = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
        .await
        .map_err(|_| Error::ConnectionReadTimeout)??;
    Ok((
        resp.map(|b| {
            BetweenBytes::new(b.map_err(Error::from), between_bytes_timeout).boxed_unsync()
        }),
        no_io(),
    ))
}

/// A response body that fails with `connection-read-timeout` when the peer pauses longer
/// than `timeout` between two frames (a server trickling a byte a minute keeps nothing of
/// the pod's alive for longer than that).
struct BetweenBytes<B> {
    inner: B,
    timeout: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The guest is waiting for the peer (the clock runs only then: time the guest spends
    /// not reading — throttled, busy — is not the peer's pause).
    waiting: bool,
}

impl<B> BetweenBytes<B> {
    fn new(inner: B, timeout: Duration) -> Self {
        BetweenBytes {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            waiting: false,
        }
    }
}

impl<B> hyper::body::Body for BetweenBytes<B>
where
    B: hyper::body::Body<Error = Error> + Unpin,
{
    type Data = B::Data;
    type Error = Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if !self.waiting {
                    self.waiting = true;
                    let next = tokio::time::Instant::now() + self.timeout;
                    self.deadline.as_mut().reset(next);
                }
                match self.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::StreamBody;

    /// A body that sends one frame and then stalls fails once the pause exceeds the
    /// between-bytes timeout; one that keeps sending within it does not.
    #[tokio::test]
    async fn a_stalled_response_body_times_out_between_bytes() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Error>>(4);
        let stream = tokio_stream_from(rx);
        let mut body = BetweenBytes::new(StreamBody::new(stream), Duration::from_millis(100));
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"a"));
        // The guest reads late (150 ms, past the timeout), then waits 50 ms for the peer:
        // only the 50 ms count.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = late
                .send(Ok(hyper::body::Frame::data(Bytes::from_static(b"b"))))
                .await;
        });
        assert!(
            body.frame().await.unwrap().is_ok(),
            "read late, not timed out"
        );
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"b"))))
                .await
                .unwrap();
            assert!(
                body.frame().await.unwrap().is_ok(),
                "a frame within the timeout"
            );
        }
        // Now the peer stalls (the sender stays open).
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the timeout fired")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::ConnectionReadTimeout), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(90));
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
