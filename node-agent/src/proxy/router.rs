//! Forwarding to a Service's endpoints, shared by the proxy's listeners and by pods' outgoing
//! traffic (the [`Router`] is the runtime's [`ServiceRouter`]): pick an endpoint
//! ([`Balancer`]), then serve the request in-process when the endpoint is a sandbox of this
//! node ([`LocalEndpoints`], no socket), or send it to `podIP:port` over a pooled connection
//! otherwise (on one host every pod IP is on loopback; the other node's agent serves it
//! in-process there).

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
use crate::net::{BoxFuture, LocalEndpoints, Routed, ServiceRouter};
use crate::services::{Backend, PortInfo, ServiceEntry, ServiceSnapshot, ServiceTable};

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
    pods: Arc<dyn LocalEndpoints>,
    balancer: Balancer,
    pool: Pool,
}

impl Router {
    pub fn new(table: Arc<ServiceTable>, pods: Arc<dyn LocalEndpoints>) -> Arc<Router> {
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

    /// A local endpoint whose pod is being stopped: no new requests while others serve.
    fn draining(&self, b: &Backend) -> bool {
        self.pods.endpoint(b.ip).is_some_and(|p| p.is_terminating())
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
        if let Some(pod) = self.pods.endpoint(lease.backend.ip) {
            if pod.serves_http(addr.port()) {
                // In-process: straight into the component, no socket.
                let resp = pod.serve_http(addr.port(), req).await;
                return Attempt::Done(Ok(hold(resp, lease)));
            }
            if !pod.listens(addr.port()) {
                return Attempt::NotSent(req, format!("{addr}: nothing of the pod listens there"));
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
                if self
                    .pods
                    .endpoint(lease.backend.ip)
                    .is_some_and(|p| !p.listens(addr.port()))
                {
                    return Attempt::NotSent(
                        (),
                        format!("{addr}: nothing of the pod listens there"),
                    );
                }
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

impl ServiceRouter for Router {
    /// A Service's `clusterIP:port` — only the ports the Service declares.
    fn is_service_addr(&self, addr: SocketAddr) -> bool {
        match addr {
            SocketAddr::V4(v4) => self.table.snapshot().by_cluster_ip(v4).is_some(),
            SocketAddr::V6(_) => false,
        }
    }

    fn resolve(&self, namespace: &str, name: &str) -> Option<std::net::Ipv4Addr> {
        self.table
            .snapshot()
            .resolve_host(name, namespace)
            .and_then(|s| s.cluster_ip)
    }

    fn route_http<'a>(
        &'a self,
        namespace: &'a str,
        host: &'a str,
        port: Option<u16>,
        client: std::net::Ipv4Addr,
        req: Request<WasiBody>,
    ) -> BoxFuture<'a, Routed> {
        Box::pin(async move {
            let snap = self.table.snapshot();
            match service_target(&snap, host, port, namespace) {
                ServiceTarget::None => Routed::NotService(req),
                ServiceTarget::NoSuchPort => {
                    tracing::debug!(client = %client, host = %host, "no such service port");
                    Routed::Refused
                }
                ServiceTarget::Port(svc, port) => {
                    match self
                        .forward_http(svc, port, Some(IpAddr::V4(client)), req)
                        .await
                    {
                        Ok(resp) => Routed::Response(resp),
                        Err(e) => {
                            tracing::debug!(client = %client, error = %e, "service request failed");
                            match e {
                                // Nothing could be reached (no ready endpoint — a Kubernetes
                                // Service without endpoints rejects connections).
                                ForwardError::Balance { .. } => Routed::Refused,
                                // The endpoint failed mid-exchange.
                                ForwardError::Upstream { .. } => Routed::Reset,
                            }
                        }
                    }
                }
            }
        })
    }
}

/// What the host of an outgoing request is, Service-wise.
#[derive(Debug)]
pub enum ServiceTarget<'a> {
    /// A Service port.
    Port(&'a Arc<ServiceEntry>, &'a PortInfo),
    /// A Service without that port: the request is refused, as a connection to a closed
    /// port would be.
    NoSuchPort,
    /// Not a Service.
    None,
}

/// The Service port an outgoing `http://HOST[:PORT]` request of a pod in `namespace` is
/// for: a Service name or a ClusterIP; without a port, the Service's port 80 or else its
/// first port.
pub fn service_target<'a>(
    snap: &'a ServiceSnapshot,
    host: &str,
    port: Option<u16>,
    namespace: &str,
) -> ServiceTarget<'a> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return match snap.by_cluster_ip(SocketAddrV4::new(ip, port.unwrap_or(80))) {
            Some((s, p)) => ServiceTarget::Port(s, p),
            None => ServiceTarget::None,
        };
    }
    let Some(svc) = snap.resolve_host(host, namespace) else {
        return ServiceTarget::None;
    };
    let p = match port {
        Some(p) => svc.port_number(p),
        None => svc.default_port(),
    };
    match p {
        Some(p) => ServiceTarget::Port(svc, p),
        None => ServiceTarget::NoSuchPort,
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

    #[test]
    fn service_targets() {
        use crate::services::{
            Backend, PortInfo, ServiceEntry, ServiceKey, ServiceType, SessionAffinity,
        };
        let port = |name: &str, port: u16| PortInfo {
            name: name.into(),
            port,
            target_port: port.to_string(),
            node_port: None,
            protocol: "TCP".into(),
            app_protocol: None,
            endpoints: Vec::<Backend>::new().into(),
        };
        let snap = ServiceSnapshot::from_entries(
            vec![
                ServiceEntry {
                    key: ServiceKey::new("shop", "cart"),
                    type_: ServiceType::ClusterIP,
                    cluster_ip: Some(std::net::Ipv4Addr::new(127, 96, 0, 5)),
                    ports: vec![port("grpc", 9000), port("http", 80)],
                    session_affinity: SessionAffinity::None,
                    not_ready: vec![],
                },
                ServiceEntry {
                    key: ServiceKey::new("other", "db"),
                    type_: ServiceType::ClusterIP,
                    cluster_ip: Some(std::net::Ipv4Addr::new(127, 96, 0, 6)),
                    ports: vec![port("", 5432)],
                    session_affinity: SessionAffinity::None,
                    not_ready: vec![],
                },
            ],
            true,
            1,
        );
        let t = |host: &str, p: Option<u16>| match service_target(&snap, host, p, "shop") {
            ServiceTarget::Port(s, p) => Ok(Some((s.key.to_string(), p.port))),
            ServiceTarget::NoSuchPort => Err(()),
            ServiceTarget::None => Ok(None),
        };
        let hit = |k: &str, p: u16| Ok(Some((k.to_string(), p)));
        assert_eq!(t("cart", None), hit("shop/cart", 80));
        assert_eq!(t("cart", Some(9000)), hit("shop/cart", 9000));
        assert_eq!(t("cart.shop", None), hit("shop/cart", 80));
        assert_eq!(
            t("cart.shop.svc.cluster.local", Some(80)),
            hit("shop/cart", 80)
        );
        assert_eq!(
            t("cart", Some(81)),
            Err(()),
            "a port the service lacks is refused"
        );
        assert_eq!(t("db", None), Ok(None), "db is in another namespace");
        assert_eq!(t("db.other", None), hit("other/db", 5432), "the first port");
        assert_eq!(t("127.96.0.5", Some(9000)), hit("shop/cart", 9000));
        assert_eq!(t("127.96.0.5", None), hit("shop/cart", 80));
        assert_eq!(t("127.96.0.6", Some(1)), Ok(None));
        assert_eq!(t("example.com", None), Ok(None));
    }
}
