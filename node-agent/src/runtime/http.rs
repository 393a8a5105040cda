//! wasi:http inside a pod: outgoing requests to `localhost:PORT` go to the sibling component
//! that declares `containerPort: PORT`, in-process (a fresh instance of its `ProxyPre`, no
//! socket); to a port no HTTP sibling serves (a command component with its own listener),
//! they connect to the pod IP — only on a port the pod listens on. `http://SERVICE[:PORT]` (`NAME`, `NAME.NS`, `NAME.NS.svc`,
//! `NAME.NS.svc.cluster.local`, or the ClusterIP itself) is offered to the node's
//! [`ServiceRouter`] (implemented by the proxy): balanced like the proxy, in-process when the
//! chosen endpoint runs on this node.
//! Service traffic is in-cluster and allowed whatever `wasmctl.dev/egress` says; a name that
//! egress reaches outside is never taken for a Service ([`may_be_service`]). Anything else is
//! egress, denied unless the pod allows it, and sent by [`egress`] to a checked address.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};

use http::uri::Scheme;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::egress;
use super::pod::PodSandbox;
use super::reach::{may_be_service, Transport};
use crate::net::{Routed, ServiceRouter};

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
    router: Option<Arc<dyn ServiceRouter>>,
}

impl PodHttpHooks {
    pub fn new(
        pod: Weak<PodSandbox>,
        pod_ip: Ipv4Addr,
        namespace: String,
        router: Option<Arc<dyn ServiceRouter>>,
    ) -> Self {
        PodHttpHooks {
            pod,
            pod_ip,
            namespace,
            router,
        }
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
            // Userinfo in the authority, and targets that are not origin-form, are refused.
            let userinfo = uri.authority().is_some_and(|a| a.as_str().contains('@'));
            let origin_form = uri
                .path_and_query()
                .is_none_or(|pq| pq.as_str().starts_with('/'));
            if userinfo || !origin_form {
                return Err(ErrorCode::HttpRequestUriInvalid.into());
            }
            let host = uri.host().unwrap_or("").to_string();
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let local = is_pod_local(&host, pod_ip);
            // A Service (by name or ClusterIP): balanced by the node's router.
            if let Some(router) = router.filter(|_| !https && !local) {
                if let Some(name) = may_be_service(&host, &pod.net.egress) {
                    match router
                        .route_http(&namespace, name, uri.port_u16(), pod_ip, request)
                        .await
                    {
                        Routed::NotService(r) => request = r,
                        Routed::Response(resp) => {
                            return Ok((resp, egress::no_io()));
                        }
                        Routed::Refused => return Err(ErrorCode::ConnectionRefused.into()),
                        Routed::Reset => return Err(ErrorCode::ConnectionTerminated.into()),
                    }
                }
            }
            if local {
                if !https && pod.serves_http(port) {
                    let resp = pod.handle_http(port, request).await;
                    return Ok((resp, egress::no_io()));
                }
                // A listener of a command component of this pod: a real socket on the pod IP,
                // and only a port the pod listens on (anything else on the pod IP is the host's).
                if !pod.net.listens(Transport::Tcp, port) {
                    tracing::debug!(pod = %pod.key, port, "nothing of the pod listens there");
                    return Err(ErrorCode::ConnectionRefused.into());
                }
                let addr = SocketAddr::from((pod_ip, port));
                return egress::send(request, options, vec![addr], &pod.tasks).await;
            }
            if !pod.net.egress.allows_host(&host) {
                tracing::debug!(pod = %pod.key, host = %host, "outgoing HTTP denied");
                return Err(ErrorCode::HttpRequestDenied.into());
            }
            let addrs = match egress::checked_addrs(&pod.net, &host, port).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(pod = %pod.key, host = %host, error = ?e, "outgoing HTTP refused");
                    return Err(e);
                }
            };
            egress::send(request, options, addrs, &pod.tasks).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
