//! wasi:http inside a pod: outgoing requests to `localhost:PORT` go to the sibling component
//! that declares `containerPort: PORT`, in-process (a fresh instance of its `ProxyPre`, no
//! socket); to a port no HTTP sibling serves (a command component with its own listener),
//! they connect to the pod IP. `http://SERVICE[:PORT]` (`NAME`, `NAME.NS`, `NAME.NS.svc`,
//! `NAME.NS.svc.cluster.local`, or the ClusterIP itself) goes through the node's service
//! router: balanced like the proxy, in-process when the chosen endpoint runs on this node.
//! Service traffic is in-cluster and allowed whatever `wasmctl.dev/egress` says. Anything
//! else is egress, denied unless the pod allows it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Weak};

use http::uri::{Authority, Scheme};
use http_body_util::BodyExt;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::pod::PodSandbox;
use crate::proxy::balance::BalanceError;
use crate::proxy::{ForwardError, Router};
use crate::services::{PortInfo, ServiceEntry, ServiceSnapshot};

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

pub struct PodHttpHooks {
    pod: Weak<PodSandbox>,
    pod_ip: Ipv4Addr,
    namespace: String,
    router: Option<Arc<Router>>,
}

impl PodHttpHooks {
    pub fn new(
        pod: Weak<PodSandbox>,
        pod_ip: Ipv4Addr,
        namespace: String,
        router: Option<Arc<Router>>,
    ) -> Self {
        PodHttpHooks {
            pod,
            pod_ip,
            namespace,
            router,
        }
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
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
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

/// `localhost`, `127.0.0.1` or the pod's own IP.
pub fn is_pod_local(host: &str, pod_ip: Ipv4Addr) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip == Ipv4Addr::LOCALHOST || ip == pod_ip,
        Ok(IpAddr::V6(ip)) => ip.is_loopback(),
        Err(_) => false,
    }
}

impl WasiHttpHooks for PodHttpHooks {
    fn default_scheme(&mut self) -> Option<Scheme> {
        // Cluster-internal traffic is plain HTTP (as with Kubernetes pod-to-pod traffic).
        Some(Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let pod = self.pod.clone();
        let pod_ip = self.pod_ip;
        let router = self.router.clone();
        let namespace = self.namespace.clone();
        Box::new(async move {
            let Some(pod) = pod.upgrade() else {
                return Err(ErrorCode::ConnectionRefused.into());
            };
            let uri = request.uri().clone();
            let host = uri.host().unwrap_or("").to_string();
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            // A Service (by name or ClusterIP): balanced by the node's router.
            if let Some(router) = router.filter(|_| !https && !is_pod_local(&host, pod_ip)) {
                let snap = router.table().snapshot();
                match service_target(&snap, &host, uri.port_u16(), &namespace) {
                    ServiceTarget::Port(svc, sport) => {
                        let resp = router
                            .forward_http(svc, sport, Some(IpAddr::V4(pod_ip)), request)
                            .await
                            .map_err(|e| {
                                tracing::debug!(pod = %pod.key, error = %e, "service request failed");
                                wasmtime_wasi_http::Error::from(forward_error_code(&e))
                            })?;
                        let done: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
                            Box::new(async { Ok(()) });
                        return Ok((resp, done));
                    }
                    ServiceTarget::None => {}
                    ServiceTarget::NoSuchPort => {
                        tracing::debug!(pod = %pod.key, host = %host, "no such service port");
                        return Err(ErrorCode::ConnectionRefused.into());
                    }
                }
            }
            if is_pod_local(&host, pod_ip) {
                if !https && pod.serves_http(port) {
                    let resp = pod.handle_http(port, request).await;
                    let done: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
                        Box::new(async { Ok(()) });
                    return Ok((resp, done));
                }
                // A listener of a command component of this pod: a real socket on the pod IP.
                let mut parts = uri.into_parts();
                parts.authority = Some(
                    Authority::try_from(format!("{pod_ip}:{port}").as_str())
                        .map_err(|_| ErrorCode::HttpRequestUriInvalid)?,
                );
                *request.uri_mut() =
                    http::Uri::from_parts(parts).map_err(|_| ErrorCode::HttpRequestUriInvalid)?;
            } else if !pod.egress_allows(&host) {
                tracing::debug!(pod = %pod.key, host = %host, "outgoing HTTP denied");
                return Err(ErrorCode::HttpRequestDenied.into());
            }
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> = Box::new(io);
            Ok((res.map(BodyExt::boxed_unsync), io))
        })
    }
}

/// What a guest sees when a Service cannot answer: refused when nothing could be reached
/// (no ready endpoint — a Kubernetes Service without endpoints rejects connections), reset
/// when the endpoint failed mid-exchange.
fn forward_error_code(e: &ForwardError) -> ErrorCode {
    match e {
        ForwardError::Balance {
            source: BalanceError::NoEndpoints | BalanceError::Unreachable { .. },
            ..
        } => ErrorCode::ConnectionRefused,
        ForwardError::Upstream { .. } => ErrorCode::ConnectionTerminated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    cluster_ip: Some(Ipv4Addr::new(127, 96, 0, 5)),
                    ports: vec![port("grpc", 9000), port("http", 80)],
                    session_affinity: SessionAffinity::None,
                    not_ready: vec![],
                },
                ServiceEntry {
                    key: ServiceKey::new("other", "db"),
                    type_: ServiceType::ClusterIP,
                    cluster_ip: Some(Ipv4Addr::new(127, 96, 0, 6)),
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

    #[test]
    fn local_hosts() {
        let ip = Ipv4Addr::new(127, 1, 0, 9);
        assert!(is_pod_local("localhost", ip));
        assert!(is_pod_local("LOCALHOST", ip));
        assert!(is_pod_local("127.0.0.1", ip));
        assert!(is_pod_local("127.1.0.9", ip));
        assert!(is_pod_local("[::1]", ip));
        assert!(!is_pod_local("127.1.0.8", ip));
        assert!(!is_pod_local("example.com", ip));
    }
}
