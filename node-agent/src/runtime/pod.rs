//! One pod = one sandbox: a pod IP (its loopback identity), one memory budget and CPU quota
//! for all of its Stores, a table of which HTTP component serves which `containerPort`, and
//! the bounds on concurrent requests, connections and live Stores.
//!
//! A live Store is one slot of the node's pooling allocator (`--instance-slots`) while its
//! instance lives: a pod holds at most [`SandboxLimits::max_instances`] of them at once (the
//! agent's default is a quarter of the slots), so one busy pod cannot take the pool from its
//! neighbours; an HTTP request that finds none free within 1 s gets 503, like one over the
//! concurrent request limit. Each Store's guest-driven host memory (header maps and handles)
//! is charged to the pod's memory budget ([`super::fields`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime::error::Context as _;
use wasmtime::Store;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use super::fields::{HeaderCharge, FIELD_SIZE_LIMIT};
use super::http::PodHttpHooks;
use super::limits::{is_oom, PodBudget, StoreLimiter};
use super::logs::{ContainerLog, Stream};
pub use super::reach::Egress;
use super::reach::{PodNet, StoreSockets, Transport};
use super::sockets::ServiceLookup;
use super::state::GuestState;
use super::{LoadedComponent, Runtime};
use crate::net::plain;
use crate::net::{BoxFuture, LocalEndpoint, ServiceRouter};

/// Resource handles one Store may hold (each open socket is one, plus its streams). What they
/// hold on the host is charged to the pod's budget ([`super::fields`]).
pub const MAX_HANDLES_PER_STORE: usize = 4096;

/// The memory limit of a container that sets none (`--default-memory-limit`): Kubernetes
/// leaves such a container unbounded unless a LimitRange defaults it; here every pod has a
/// budget, because the node's memory is shared by its pods' guests and the agent itself. A
/// fixed figure rather than a share of the node's memory, so the same pod behaves the same on
/// every node; 256 MiB holds every example guest under load many times over (a request's
/// instance is ~1–2 MiB).
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;

/// The default of `--max-instances-per-pod`: a quarter of the pool's slots (the runtime
/// reserves at least 16), so one pod alone can never take the pool.
pub fn default_max_instances(instance_slots: u32) -> usize {
    (instance_slots.max(16) as usize / 4).max(1)
}

/// What a container is started with (from the pod spec).
pub struct ContainerConfig {
    pub name: String,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub mounts: Vec<Mount>,
    pub log: Arc<ContainerLog>,
}

pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// How a component run ended, in Kubernetes terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// `Completed`, `Error`, `OOMKilled`.
    pub reason: String,
    pub message: Option<String>,
}

impl Exit {
    pub fn completed() -> Exit {
        Exit {
            code: 0,
            reason: "Completed".into(),
            message: None,
        }
    }
    pub fn oom(message: String) -> Exit {
        Exit {
            code: 137,
            reason: "OOMKilled".into(),
            message: Some(message),
        }
    }
    /// Classifies the result of a guest call.
    pub fn from_call(res: wasmtime::Result<Result<(), ()>>) -> Exit {
        match res {
            Ok(Ok(())) => Exit::completed(),
            Ok(Err(())) => Exit {
                code: 1,
                reason: "Error".into(),
                message: None,
            },
            Err(e) => Exit::from_trap(&e),
        }
    }
    pub fn from_trap(e: &wasmtime::Error) -> Exit {
        if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return if exit.0 == 0 {
                Exit::completed()
            } else {
                Exit {
                    code: exit.0,
                    reason: "Error".into(),
                    message: None,
                }
            };
        }
        if is_oom(e) {
            return Exit::oom(format!("{e:#}"));
        }
        // A trap is the component's crash (Rust panics abort with `unreachable`): reported
        // like a native abort.
        Exit {
            code: 134,
            reason: "Error".into(),
            message: Some(format!("wasm trap: {}", first_lines(&format!("{e:?}"), 12))),
        }
    }
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join("\n")
}

/// An HTTP component serving one or more ports of the pod.
pub struct HttpRoute {
    pub config: Arc<ContainerConfig>,
    pub component: Arc<LoadedComponent>,
    /// Tells the container's runner that a request trapped on the memory limit.
    pub oom: mpsc::Sender<Exit>,
}

/// Bounds of one pod's sandbox.
#[derive(Debug, Clone, Copy)]
pub struct SandboxLimits {
    pub max_concurrent_requests: usize,
    pub max_connections: usize,
    pub request_timeout: Duration,
    pub max_instance_memory: usize,
    /// Sockets one pod may hold open at once, all of its Stores together.
    pub max_sockets: usize,
    /// Live Stores (pool slots) one pod may hold at once, all of its containers and requests
    /// together (`--max-instances-per-pod`).
    pub max_instances: usize,
    /// The memory limit of a container without `resources.limits.memory`
    /// (`--default-memory-limit`), so that every pod has a budget.
    pub default_memory_limit: usize,
}

pub struct PodSandbox {
    /// `namespace/name`.
    pub key: String,
    pub ip: Ipv4Addr,
    pub budget: Arc<PodBudget>,
    runtime: Arc<Runtime>,
    limits: SandboxLimits,
    routes: RwLock<HashMap<u16, Arc<HttpRoute>>>,
    requests: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// Live Stores ([`SandboxLimits::max_instances`]).
    instances: Arc<Semaphore>,
    /// Its address, egress policy, listening ports and socket budget.
    pub net: Arc<PodNet>,
    /// The node's service router (absent in a runtime without one), for outgoing traffic.
    router: Option<Arc<dyn ServiceRouter>>,
    /// Service names → ClusterIP as seen from this pod's namespace (`ip-name-lookup`).
    service_lookup: Option<ServiceLookup>,
    /// Cancelled when the pod is killed: in-flight guests stop at their next yield.
    pub kill: CancellationToken,
    /// In-flight requests and listeners, so termination can drain them.
    pub tasks: TaskTracker,
    /// This pod's id in the node's CPU gate ([`super::cpu`]).
    cpu_pod: u64,
}

impl PodSandbox {
    pub fn new(
        key: String,
        ip: Ipv4Addr,
        budget: Arc<PodBudget>,
        runtime: Arc<Runtime>,
        limits: SandboxLimits,
        egress: Egress,
    ) -> Arc<PodSandbox> {
        let router = runtime.router().cloned();
        let namespace = key.split_once('/').map(|(ns, _)| ns).unwrap_or("");
        let service_lookup = router.as_ref().map(|r| {
            let (r, ns) = (r.clone(), namespace.to_string());
            Arc::new(move |name: &str| r.resolve(&ns, name)) as ServiceLookup
        });
        let net = PodNet::on_node(
            ip,
            egress,
            runtime.node_ips(),
            limits.max_sockets,
            runtime.node_sockets().clone(),
        );
        let cpu_pod = runtime.cpu_gate().pod_id();
        let sandbox = Arc::new(PodSandbox {
            router,
            service_lookup,
            net,
            key,
            ip,
            budget,
            runtime,
            requests: Arc::new(Semaphore::new(
                limits
                    .max_concurrent_requests
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
            connections: Arc::new(Semaphore::new(
                limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            instances: Arc::new(Semaphore::new(
                limits.max_instances.clamp(1, Semaphore::MAX_PERMITS),
            )),
            limits,
            routes: RwLock::new(HashMap::new()),
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cpu_pod,
        });
        sandbox.runtime.pods.insert(&sandbox);
        sandbox
    }

    /// The pod's namespace (service names without a namespace resolve in it).
    pub fn namespace(&self) -> &str {
        self.key.split_once('/').map(|(ns, _)| ns).unwrap_or("")
    }

    /// The pod is being stopped (termination closes its task tracker first): Services must
    /// not send it new requests, in-flight ones finish.
    pub fn is_terminating(&self) -> bool {
        self.tasks.is_closed() || self.kill.is_cancelled()
    }

    pub fn serves_http(&self, port: u16) -> bool {
        self.routes.read().expect("routes lock").contains_key(&port)
    }

    pub fn add_route(&self, port: u16, route: Arc<HttpRoute>) {
        if self
            .routes
            .write()
            .expect("routes lock")
            .insert(port, route)
            .is_none()
        {
            self.net.add_http_port(port);
        }
    }

    pub fn remove_route(&self, port: u16) {
        if self
            .routes
            .write()
            .expect("routes lock")
            .remove(&port)
            .is_some()
        {
            self.net.remove_http_port(port);
        }
    }

    /// One of the pod's live Store slots, waiting at most `wait` (`None`: the pod is at its
    /// instance limit).
    pub async fn instance_slot(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        match tokio::time::timeout(wait, self.instances.clone().acquire_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        }
    }

    /// A Store for one run of a container's component, charged to this pod; it holds
    /// `instance` (one of [`Self::instance_slot`]) until dropped.
    pub fn new_store(
        self: &Arc<Self>,
        cfg: &ContainerConfig,
        instance: OwnedSemaphorePermit,
    ) -> wasmtime::Result<Store<GuestState>> {
        let mut b = WasiCtxBuilder::new();
        b.envs(&cfg.env)
            .args(&cfg.args)
            .stdout(cfg.log.sink(Stream::Stdout))
            .stderr(cfg.log.sink(Stream::Stderr))
            .allow_tcp(true)
            .allow_udp(true)
            .allow_ip_name_lookup(true);
        let net = self.net.clone();
        let router = self.router.clone();
        b.socket_addr_check(move |addr, usage| {
            let ok = socket_allowed(&net, router.as_deref(), addr, usage);
            Box::pin(async move { ok })
        });
        for m in &cfg.mounts {
            let perms = if m.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&m.host, &m.guest, perms)
                .with_context(|| format!("mounting {} at {}", m.host.display(), m.guest))?;
        }
        let mut table = wasmtime::component::ResourceTable::new();
        // Bounds the handles (sockets, streams, HTTP fields...) one Store can hold open.
        table.set_max_capacity(MAX_HANDLES_PER_STORE);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(FIELD_SIZE_LIMIT);
        let state = GuestState {
            wasi: b.build(),
            http,
            table,
            limiter: StoreLimiter::new(self.budget.clone(), self.limits.max_instance_memory),
            hooks: PodHttpHooks::new(
                Arc::downgrade(self),
                self.ip,
                self.namespace().to_string(),
                self.router.clone(),
            ),
            pod_ip: self.ip,
            services: self.service_lookup.clone(),
            net: self.net.clone(),
            sockets: Arc::new(StoreSockets::default()),
            headers: HeaderCharge::new(self.budget.clone()),
            instance,
        };
        let mut store = Store::new(self.runtime.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        let budget = self.budget.clone();
        let gate = self.runtime.cpu_gate();
        let mut runner = gate.runner(self.cpu_pod, budget.cpu_runners(gate.slots()));
        store.epoch_deadline_callback(move |_| runner.on_tick(&budget));
        Ok(store)
    }

    /// Runs a `wasi:cli/command` component to its end (or until the pod is killed).
    pub async fn run_command(
        self: &Arc<Self>,
        cfg: &ContainerConfig,
        component: &LoadedComponent,
        stop: CancellationToken,
    ) -> Exit {
        let instance = tokio::select! {
            p = self.instances.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Exit { code: 137, reason: "Killed".into(), message: Some("the pod was killed".into()) },
            },
            _ = stop.cancelled() => return Exit { code: 137, reason: "Killed".into(), message: Some("stopped by the agent".into()) },
            _ = self.kill.cancelled() => return Exit { code: 137, reason: "Killed".into(), message: Some("the pod was killed".into()) },
        };
        let mut store = match self.new_store(cfg, instance) {
            Ok(s) => s,
            Err(e) => {
                return Exit {
                    code: 128,
                    reason: "StartError".into(),
                    message: Some(format!("{e:#}")),
                }
            }
        };
        let run = async {
            let pre = wasmtime_wasi::p2::bindings::CommandPre::new(component.pre.clone())?;
            let cmd = pre.instantiate_async(&mut store).await?;
            cmd.wasi_cli_run().call_run(&mut store).await
        };
        tokio::select! {
            res = run => Exit::from_call(res),
            _ = stop.cancelled() => Exit { code: 137, reason: "Killed".into(), message: Some("stopped by the agent".into()) },
            _ = self.kill.cancelled() => Exit { code: 137, reason: "Killed".into(), message: Some("the pod was killed".into()) },
        }
    }

    /// Serves one HTTP request with the component on `port`: a fresh instance in a fresh Store.
    pub async fn handle_http<B>(
        self: &Arc<Self>,
        port: u16,
        req: hyper::Request<B>,
    ) -> hyper::Response<HyperOutgoingBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let route = self.routes.read().expect("routes lock").get(&port).cloned();
        let Some(route) = route else {
            return plain(
                503,
                format!("no HTTP component serves port {port} of this pod\n"),
            );
        };
        let permit = match tokio::time::timeout(
            Duration::from_secs(1),
            self.requests.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => return plain(503, "the pod is at its concurrent request limit\n".into()),
        };
        let Some(proxy) = route.component.proxy.clone() else {
            return plain(500, "not an HTTP component\n".into());
        };
        let Some(instance) = self.instance_slot(Duration::from_secs(1)).await else {
            return plain(503, "the pod is at its instance limit\n".into());
        };
        let mut store = match self.new_store(&route.config, instance) {
            Ok(s) => s,
            Err(e) => return plain(500, format!("{e:#}\n")),
        };
        let (tx, rx) = oneshot::channel();
        let prepared = (|| {
            let mut view = store.data_mut().http();
            let req = view.new_incoming_request(Scheme::Http, req)?;
            let out = view.new_response_outparam(tx)?;
            Ok::<_, wasmtime::Error>((req, out))
        })();
        let (wreq, out) = match prepared {
            Ok(v) => v,
            Err(e) => return plain(400, format!("{e:#}\n")),
        };
        let kill = self.kill.clone();
        let timeout = self.limits.request_timeout;
        let task = self.tasks.spawn(async move {
            let _permit = permit;
            let call = async {
                let p = proxy.instantiate_async(&mut store).await?;
                p.wasi_http_incoming_handler()
                    .call_handle(&mut store, wreq, out)
                    .await
            };
            tokio::select! {
                r = tokio::time::timeout(timeout, call) => match r {
                    Ok(r) => r,
                    Err(_) => Err(wasmtime::Error::msg(format!("request exceeded {timeout:?}"))),
                },
                _ = kill.cancelled() => Err(wasmtime::Error::msg("the pod was killed")),
            }
        });
        match rx.await {
            Ok(Ok(resp)) => resp,
            Ok(Err(code)) => plain(500, format!("component failed the request: {code:?}\n")),
            Err(_) => {
                // The component returned (or trapped) without answering.
                let err = match task.await {
                    Ok(Ok(())) => "the component did not set a response".to_string(),
                    Ok(Err(e)) => {
                        if is_oom(&e) {
                            let _ = route.oom.try_send(Exit::oom(format!("{e:#}")));
                        }
                        format!("{:?}", e)
                    }
                    Err(e) => format!("request task failed: {e}"),
                };
                // The detail (a wasm backtrace names the guest's functions and offsets) goes
                // to the container's log and the agent's, never to the caller.
                let detail = first_lines(&err, 8);
                for line in format!("request to port {port} failed: {detail}").lines() {
                    route.config.log.push(Stream::Stderr, line.as_bytes());
                }
                tracing::debug!(pod = %self.key, port, error = %detail, "HTTP component failed a request");
                plain(500, "the component failed to answer the request\n".into())
            }
        }
    }

    /// Accepts HTTP/1.1 and HTTP/2 connections on `listener` (the pod IP and a containerPort)
    /// and serves them in-process until `stop`.
    pub async fn serve_port(
        self: Arc<Self>,
        port: u16,
        listener: TcpListener,
        stop: CancellationToken,
    ) {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = self.connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (sock, _peer) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(pod = %self.key, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = sock.set_nodelay(true);
            let pod = self.clone();
            let stop = stop.clone();
            self.tasks.spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let pod = pod.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(pod.handle_http(port, req).await)
                        }
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(sock), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                    }
                }
            });
        }
    }
}

impl Drop for PodSandbox {
    fn drop(&mut self) {
        self.runtime.pods.remove(self.ip, self as *const PodSandbox);
    }
}

/// The socket policy ([`super::reach`]): bind and listen only on the pod IP (what the guest
/// calls `127.0.0.1`/`0.0.0.0` was rewritten before this check; an unspecified bind address is
/// the implicit bind of a connect or a send, which picks an ephemeral port), connect or send to
/// the pod IP only on a port the pod serves, to a Service's `clusterIP:port`, or to what the
/// pod's egress allows.
fn socket_allowed(
    net: &PodNet,
    router: Option<&dyn ServiceRouter>,
    addr: SocketAddr,
    usage: SocketAddrUse,
) -> bool {
    let ip = addr.ip();
    let pod_ip = IpAddr::V4(net.pod_ip);
    match usage {
        SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => ip == pod_ip || ip.is_unspecified(),
        SocketAddrUse::TcpListen => ip == pod_ip,
        // Loopback connects arrive from 127.0.0.1 (the kernel's choice of source address).
        SocketAddrUse::TcpAccept => true,
        SocketAddrUse::TcpConnect => {
            net.is_own_port(Transport::Tcp, addr)
                || router.is_some_and(|r| r.is_service_addr(addr))
                || (ip != pod_ip && net.egress_allows_ip(ip))
        }
        SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
            net.is_own_port(Transport::Udp, addr) || (ip != pod_ip && net.egress_allows_ip(ip))
        }
    }
}

impl LocalEndpoint for PodSandbox {
    fn is_terminating(&self) -> bool {
        PodSandbox::is_terminating(self)
    }

    fn serves_http(&self, port: u16) -> bool {
        PodSandbox::serves_http(self, port)
    }

    fn listens(&self, port: u16) -> bool {
        self.net.listens(Transport::Tcp, port)
    }

    fn serve_http(
        self: Arc<Self>,
        port: u16,
        req: hyper::Request<wasmtime_wasi_http::WasiBody>,
    ) -> BoxFuture<'static, hyper::Response<HyperOutgoingBody>> {
        Box::pin(async move { self.handle_http(port, req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_policy() {
        let ip = Ipv4Addr::new(127, 1, 0, 3);
        let own: SocketAddr = "127.1.0.3:9000".parse().unwrap();
        let other_pod: SocketAddr = "127.1.0.4:9000".parse().unwrap();
        let host_service: SocketAddr = "127.1.0.3:22".parse().unwrap();
        let outside: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let net = |egress: Egress| PodNet::new(ip, egress, Arc::from(vec![]), 16);
        let none = net(Egress::None);
        let ok = |n: &PodNet, a, u| socket_allowed(n, None, a, u);
        assert!(ok(&none, own, SocketAddrUse::TcpBind));
        assert!(
            ok(&none, any, SocketAddrUse::TcpBind),
            "the implicit bind of a connect"
        );
        assert!(
            !ok(&none, any, SocketAddrUse::TcpListen),
            "no wildcard listeners"
        );
        assert!(!ok(&none, other_pod, SocketAddrUse::TcpBind));
        // The pod IP is reachable only on ports the pod listens on: a host service on
        // 0.0.0.0:22 would otherwise answer at POD_IP:22.
        assert!(!ok(&none, own, SocketAddrUse::TcpConnect));
        assert!(!ok(&none, host_service, SocketAddrUse::TcpConnect));
        let mut claim = none.claim_socket().unwrap();
        claim.set_port(Transport::Tcp, 9000);
        assert!(ok(&none, own, SocketAddrUse::TcpConnect));
        assert!(!ok(&none, own, SocketAddrUse::UdpSend));
        drop(claim);
        assert!(!ok(&none, own, SocketAddrUse::TcpConnect));
        assert!(!ok(&none, other_pod, SocketAddrUse::TcpConnect));
        assert!(!ok(&none, outside, SocketAddrUse::TcpConnect));
        let all = net(Egress::All);
        assert!(ok(&all, outside, SocketAddrUse::TcpConnect));
        assert!(
            !ok(&all, other_pod, SocketAddrUse::TcpConnect),
            "egress * is not loopback"
        );
        assert!(!ok(&all, host_service, SocketAddrUse::TcpConnect));
        assert!(!ok(
            &all,
            "[::ffff:127.0.0.1]:22".parse().unwrap(),
            SocketAddrUse::TcpConnect
        ));
        assert!(!ok(
            &all,
            "169.254.169.254:80".parse().unwrap(),
            SocketAddrUse::TcpConnect
        ));
        let listed = net(Egress::parse("10.0.0.1, example.com"));
        assert!(ok(&listed, outside, SocketAddrUse::TcpConnect));
        assert!(Egress::parse("10.0.0.1, Example.com").allows_host("example.COM"));
        assert!(matches!(Egress::parse(" "), Egress::None));
    }

    #[test]
    fn exits() {
        assert_eq!(Exit::from_call(Ok(Ok(()))).reason, "Completed");
        assert_eq!(Exit::from_call(Ok(Err(()))).code, 1);
        let e = wasmtime::Error::new(wasmtime_wasi::I32Exit(3));
        assert_eq!(Exit::from_trap(&e).code, 3);
        let e = wasmtime::Error::new(super::super::limits::MemoryLimitExceeded {
            limit: 1,
            used: 1,
            wanted: 1,
        });
        assert_eq!(Exit::from_trap(&e).reason, "OOMKilled");
    }
}
