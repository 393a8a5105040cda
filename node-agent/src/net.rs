//! Where the pod runtime and the Service proxy meet: two small traits and the one response
//! helper both use. This module sits below both; neither imports the other.
//!
//! - [`LocalEndpoints`] / [`LocalEndpoint`]: "is this pod IP a sandbox of this node, and can
//!   it answer HTTP on that port in-process?" — implemented by the runtime's `PodDirectory` and
//!   `PodSandbox`, used by the proxy's router to serve local endpoints without a socket.
//! - [`ServiceRouter`]: "is this address a Service, and route this request of a pod to it" —
//!   implemented by the proxy's `Router`, used by the runtime's wasi:http and wasi:sockets
//!   hooks for a pod's outgoing traffic.
//!
//! The agent (`lib.rs`) builds both sides and wires them together. A test
//! (`layering_has_no_runtime_proxy_cycle`) reads the `use crate::…` paths of `runtime/` and
//! `proxy/` and fails if either names the other.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime_wasi_http::WasiBody;

/// A boxed, sendable future (the traits below are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sandbox of this node, as the Service proxy sees it.
pub trait LocalEndpoint: Send + Sync {
    /// Being stopped: Services must not send it new requests (in-flight ones finish).
    fn is_terminating(&self) -> bool;
    /// Whether an HTTP component of the pod serves `port` (then [`Self::serve_http`] answers
    /// in-process).
    fn serves_http(&self, port: u16) -> bool;
    /// Whether something of the pod accepts TCP connections on `port` (an HTTP component's
    /// port or a command's listener). Anything else at the pod IP is the host's (Linux hands a
    /// connection to any 127/8 address to a listener on `0.0.0.0`): never connect there.
    fn listens(&self, port: u16) -> bool;
    /// Serves one request with the component on `port`, in-process.
    fn serve_http(
        self: Arc<Self>,
        port: u16,
        req: http::Request<WasiBody>,
    ) -> BoxFuture<'static, http::Response<WasiBody>>;
}

/// The node's pod IP → sandbox map.
pub trait LocalEndpoints: Send + Sync {
    fn endpoint(&self, ip: Ipv4Addr) -> Option<Arc<dyn LocalEndpoint>>;
}

/// A node without local sandboxes (tests, benchmarks): every endpoint is remote.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLocalEndpoints;

impl LocalEndpoints for NoLocalEndpoints {
    fn endpoint(&self, _ip: Ipv4Addr) -> Option<Arc<dyn LocalEndpoint>> {
        None
    }
}

/// What became of a pod's outgoing HTTP request offered to the Service router.
pub enum Routed {
    /// Its host is no Service: handed back for the pod-local or egress path.
    NotService(http::Request<WasiBody>),
    /// A Service endpoint answered.
    Response(http::Response<WasiBody>),
    /// A Service, but nothing could take it (no such port, no ready endpoint): the guest sees
    /// a refused connection, as with a Kubernetes Service without endpoints.
    Refused,
    /// The chosen endpoint failed mid-exchange: the guest sees a reset connection.
    Reset,
}

/// Service routing for a pod's outgoing traffic.
pub trait ServiceRouter: Send + Sync {
    /// Whether a TCP connect to `addr` is a connect to a Service (the node's proxy listens
    /// there).
    fn is_service_addr(&self, addr: SocketAddr) -> bool;
    /// A Service name as seen from a pod of `namespace` → its ClusterIP (`ip-name-lookup`).
    fn resolve(&self, namespace: &str, name: &str) -> Option<Ipv4Addr>;
    /// Routes an outgoing request of the pod `client` in `namespace` for `host[:port]` (a
    /// Service name as the runtime allows it to be one, or an IP literal) to a Service, or
    /// hands it back.
    fn route_http<'a>(
        &'a self,
        namespace: &'a str,
        host: &'a str,
        port: Option<u16>,
        client: Ipv4Addr,
        req: http::Request<WasiBody>,
    ) -> BoxFuture<'a, Routed>;
}

/// A plain-text response (errors the agent itself answers).
pub fn plain(status: u16, body: String) -> http::Response<WasiBody> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed_unsync();
    http::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(body)
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The `crate::<module>` paths each `.rs` file under `dir` names (in `use` lines and in
    /// inline paths), keyed by file.
    fn crate_refs(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    let mut refs = BTreeSet::new();
                    for line in text.lines() {
                        let code = line.split("//").next().unwrap_or("");
                        let mut rest = code;
                        while let Some(i) = rest.find("crate::") {
                            rest = &rest[i + "crate::".len()..];
                            let module: String = rest
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            refs.insert(module);
                        }
                        // `use crate::{a, b}` groups.
                        if let Some(i) = code.find("crate::{") {
                            for m in code[i + "crate::{".len()..].split([',', '}']) {
                                let m = m.trim().split("::").next().unwrap_or("").trim();
                                if !m.is_empty() {
                                    refs.insert(m.to_string());
                                }
                            }
                        }
                    }
                    out.insert(p.display().to_string(), refs);
                }
            }
        }
        out
    }

    /// ARCHITECTURE.md's layering invariant: the runtime (pod sandbox) and the Service proxy
    /// meet only at `net`; neither names the other.
    #[test]
    fn layering_has_no_runtime_proxy_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let runtime = crate_refs(&src.join("runtime"));
        let proxy = crate_refs(&src.join("proxy"));
        assert!(runtime.len() >= 5 && proxy.len() >= 3, "source files found");
        for (file, refs) in &runtime {
            assert!(
                !refs.contains("proxy") && !refs.contains("services"),
                "{file} reaches into the proxy layer: {refs:?}"
            );
        }
        for (file, refs) in &proxy {
            assert!(
                !refs.contains("runtime") && !refs.contains("pods"),
                "{file} reaches into the pod runtime: {refs:?}"
            );
        }
        // The checker itself sees a violation.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x.rs"),
            "use crate::{net, proxy::Router};\nfn f() { crate::services::x(); }\n",
        )
        .unwrap();
        let refs = crate_refs(dir.path());
        let refs = refs.values().next().unwrap();
        assert!(refs.contains("proxy") && refs.contains("services") && refs.contains("net"));
    }
}
