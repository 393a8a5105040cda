//! wasi:http inside a pod: outgoing requests to `localhost:PORT` go to the sibling component
//! that declares `containerPort: PORT`, in-process (a fresh instance of its `ProxyPre`, no
//! socket); to a port no HTTP sibling serves (a command component with its own listener),
//! they connect to the pod IP. Anything else is egress, denied unless the pod allows it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Weak;

use http::uri::{Authority, Scheme};
use http_body_util::BodyExt;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::pod::PodSandbox;

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
}

impl PodHttpHooks {
    pub fn new(pod: Weak<PodSandbox>, pod_ip: Ipv4Addr) -> Self {
        PodHttpHooks { pod, pod_ip }
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
        Box::new(async move {
            let Some(pod) = pod.upgrade() else {
                return Err(ErrorCode::ConnectionRefused.into());
            };
            let uri = request.uri().clone();
            let host = uri.host().unwrap_or("").to_string();
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
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
