//! Forwarding to a Service's endpoints, shared by the proxy's listeners and by pods' outgoing
//! traffic: pick an endpoint ([`Balancer`]), then serve the request in-process when the
//! endpoint is a sandbox of this node (no socket), or send it to `podIP:port` over a pooled
//! connection otherwise (on one host every pod IP is on loopback; the other node's agent
//! serves it in-process there).

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use wasmtime_wasi_http::WasiBody;

use super::balance::{Attempt, BalanceError, Balancer, Lease};
use super::pool::{Pool, SendError, CONNECT_TIMEOUT};
use crate::runtime::sockets::ServiceLookup;
use crate::runtime::PodDirectory;
use crate::services::{Backend, PortInfo, ServiceEntry, ServiceTable};

/// Why a request or connection to a Service got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("service {service}: {source}")]
    Balance {
        service: String,
        #[source]
        source: BalanceError,
    },
    /// The request reached an endpoint, which failed to answer.
    #[error("service {service}: endpoint {endpoint}: {detail}")]
    Upstream {
        service: String,
        endpoint: SocketAddrV4,
        detail: String,
    },
}

/// The node's service router.
pub struct Router {
    table: Arc<ServiceTable>,
    pods: Arc<PodDirectory>,
    balancer: Balancer,
    pool: Pool,
}

impl Router {
    pub fn new(table: Arc<ServiceTable>, pods: Arc<PodDirectory>) -> Arc<Router> {
        Arc::new(Router {
            table,
            pods,
            balancer: Balancer::new(),
            pool: Pool::default(),
        })
    }

    pub fn table(&self) -> &Arc<ServiceTable> {
        &self.table
    }

    /// Whether `addr`'s IP is some Service's ClusterIP (pods may connect there).
    pub fn is_cluster_ip(&self, addr: SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(ip) => self.table.snapshot().is_cluster_ip(ip),
            IpAddr::V6(_) => false,
        }
    }

    /// Service name → ClusterIP, as seen from a pod of `namespace`.
    pub fn name_lookup(self: &Arc<Self>, namespace: &str) -> ServiceLookup {
        let table = self.table.clone();
        let ns = namespace.to_string();
        Arc::new(move |name: &str| {
            table
                .snapshot()
                .resolve_host(name, &ns)
                .and_then(|s| s.cluster_ip)
        })
    }

    /// A local endpoint whose pod is being stopped: no new requests while others serve.
    fn draining(&self, b: &Backend) -> bool {
        self.pods.get(b.ip).is_some_and(|p| p.is_terminating())
    }

    /// Forwards one HTTP request to an endpoint of `port`. The response body streams through
    /// (nothing is buffered), and the endpoint counts the request as in flight until the body
    /// is finished or dropped.
    pub async fn forward_http(
        &self,
        svc: &ServiceEntry,
        port: &PortInfo,
        client: Option<IpAddr>,
        req: Request<WasiBody>,
    ) -> Result<Response<WasiBody>, ForwardError> {
        let req = to_origin_form(req);
        let draining = |b: &Backend| self.draining(b);
        let res = self
            .balancer
            .balance(svc, port, client, &draining, req, |lease, req| {
                self.attempt_http(lease, req)
            })
            .await;
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err((endpoint, detail))) => Err(ForwardError::Upstream {
                service: svc.key.to_string(),
                endpoint,
                detail,
            }),
            Err(source) => Err(ForwardError::Balance {
                service: svc.key.to_string(),
                source,
            }),
        }
    }

    async fn attempt_http(
        &self,
        lease: Lease,
        req: Request<WasiBody>,
    ) -> Attempt<Request<WasiBody>, Result<Response<WasiBody>, (SocketAddrV4, String)>> {
        let addr = lease.backend.addr();
        if let Some(pod) = self.pods.get(lease.backend.ip) {
            if pod.serves_http(addr.port()) {
                // In-process: straight into the component, no socket.
                let resp = pod.handle_http(addr.port(), req).await;
                return Attempt::Done(Ok(hold(resp, lease)));
            }
        }
        match self.pool.send(addr, req).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                Attempt::Done(Ok(hold(
                    resp.map(|b| b.map_err(wasmtime_wasi_http::Error::from).boxed_unsync()),
                    lease,
                )))
            }
            Err(SendError::NotSent(req, why)) => Attempt::NotSent(*req, why),
            Err(SendError::Failed(why)) => Attempt::Done(Err((addr, why))),
        }
    }

    /// Opens a TCP connection to an endpoint of `port` (TCP mode): the lease counts the
    /// connection as open until dropped.
    pub async fn connect_tcp(
        &self,
        svc: &ServiceEntry,
        port: &PortInfo,
        client: Option<IpAddr>,
    ) -> Result<(TcpStream, Lease), ForwardError> {
        let draining = |b: &Backend| self.draining(b);
        self.balancer
            .balance(svc, port, client, &draining, (), |lease, ()| async move {
                let addr = lease.backend.addr();
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => Attempt::Done((s, lease)),
                    Ok(Err(e)) => Attempt::NotSent((), format!("connect {addr}: {e}")),
                    Err(_) => Attempt::NotSent((), format!("connect {addr}: timed out")),
                }
            })
            .await
            .map_err(|source| ForwardError::Balance {
                service: svc.key.to_string(),
                source,
            })
    }

    /// Drops pooled connections to endpoints no Service lists any more.
    pub fn prune(&self) {
        let snap = self.table.snapshot();
        let mut live = std::collections::HashSet::new();
        for s in snap.services() {
            for p in &s.ports {
                live.extend(p.endpoints.iter().map(Backend::addr));
            }
        }
        self.pool.retain(&|a| live.contains(a));
    }

    pub async fn shutdown(&self) {
        self.pool.shutdown().await;
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the message.
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "proxy-authorization",
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// An HTTP/1.1 request with an origin-form URI, a `Host` header (from the URI's authority
/// when the client sent none, as HTTP/2 clients and wasi:http guests do), and no hop-by-hop
/// headers.
fn to_origin_form(mut req: Request<WasiBody>) -> Request<WasiBody> {
    strip_hop_by_hop(req.headers_mut());
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if req.uri().authority().is_some() || req.uri().scheme().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        if let Ok(u) = pq.parse::<Uri>() {
            *req.uri_mut() = u;
        }
    }
    *req.version_mut() = Version::HTTP_11;
    req
}

/// Keeps `lease` (the endpoint's in-flight count) until the response body ends or is dropped.
fn hold(resp: Response<WasiBody>, lease: Lease) -> Response<WasiBody> {
    resp.map(|body| {
        LeasedBody {
            body,
            lease: Some(lease),
        }
        .boxed_unsync()
    })
}

struct LeasedBody {
    body: WasiBody,
    lease: Option<Lease>,
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let res = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(res, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.lease = None;
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> WasiBody {
        http_body_util::Empty::new()
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed_unsync()
    }

    #[test]
    fn origin_form_keeps_the_host() {
        let mut req = Request::new(empty());
        *req.uri_mut() = "http://web.shop.svc.cluster.local:8080/a/b?c=d"
            .parse()
            .unwrap();
        *req.version_mut() = Version::HTTP_2;
        let r = to_origin_form(req);
        assert_eq!(r.uri().to_string(), "/a/b?c=d");
        assert_eq!(r.headers()[header::HOST], "web.shop.svc.cluster.local:8080");
        assert_eq!(r.version(), Version::HTTP_11);

        let mut req = Request::new(empty());
        *req.uri_mut() = "/x".parse().unwrap();
        let h = req.headers_mut();
        h.insert(header::HOST, "127.0.0.1:30080".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-trace".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-trace", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let r = to_origin_form(req);
        assert_eq!(r.uri().to_string(), "/x");
        assert_eq!(r.headers()[header::HOST], "127.0.0.1:30080");
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-kept"]);
    }
}
