//! The wasmctl node agent (kubelet): registers its Node, renews its Lease, watches the pods
//! bound to it and runs them in wasmtime (see [`runtime`]), writes their status, serves their
//! logs, and pulls their modules.
//!
//! **Architecture Invariant:** only this crate links wasmtime; it talks to the control plane
//! through the API only (`wasmctl-client`), never through the store.

pub mod dns;
pub mod images;
pub mod net;
pub mod node;
pub mod oci;
pub mod pods;
pub mod proxy;
pub mod reflector;
pub mod runtime;
pub mod server;
pub mod services;
pub mod status;
pub mod volumes;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::Pod;
use wasmctl_client::Client;

use pods::{IpAllocator, PodRef};
use runtime::logs::{ContainerLog, LogLimits};
use runtime::pod::SandboxLimits;
use runtime::{Runtime, RuntimeConfig};

/// Everything `wasmctl agent` is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub data_dir: PathBuf,
    pub max_pods: u32,
    /// The node's pod CIDR (default `127.<last octet of the node IP>.0.0/16`).
    pub pod_cidr: (Ipv4Addr, u8),
    /// Port of the agent's own endpoint (logs); 0 picks one.
    pub kubelet_port: u16,
    pub lease_duration: Duration,
    pub lease_renew: Duration,
    pub status_report: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub backoff_reset: Duration,
    pub instance_slots: u32,
    /// CPU-bound guests that run at once on the node (`--guest-cpu-slots`; runtime/cpu.rs).
    pub guest_cpu_slots: usize,
    /// Sockets all pods of the node may hold at once (`--max-guest-sockets`); `None`: half of
    /// the file descriptors left after one listener per pod and 1,024 for the agent.
    pub max_guest_sockets: Option<usize>,
    pub max_module_bytes: u64,
    /// Registries reached over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    pub log_limits: LogLimits,
    pub sandbox: SandboxLimits,
    /// Concurrent client connections per Service proxy listener (`--proxy-max-connections`).
    pub proxy_max_connections: usize,
    /// The cluster DNS server (`--dns-listen`, `--cluster-domain`).
    pub dns: dns::DnsConfig,
    /// emptyDir bounds (`--emptydir-*`; volumes.rs).
    pub volumes: volumes::VolumeLimits,
}

impl AgentConfig {
    /// Defaults for everything but the name, node IP and data directory.
    pub fn new(name: String, node_ip: Ipv4Addr, data_dir: PathBuf) -> AgentConfig {
        let o = node_ip.octets();
        let cidr_octet = if o[0] == 127 && o[3] != 0 { o[3] } else { 1 };
        AgentConfig {
            name,
            node_ip,
            data_dir,
            max_pods: 110,
            pod_cidr: (Ipv4Addr::new(127, cidr_octet, 0, 0), 16),
            kubelet_port: 10250,
            lease_duration: Duration::from_secs(40),
            lease_renew: Duration::from_secs(10),
            status_report: Duration::from_secs(60),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            instance_slots: 1000,
            guest_cpu_slots: runtime::cpu::CpuGate::default_slots(),
            max_guest_sockets: None,
            max_module_bytes: 64 * 1024 * 1024,
            insecure_registries: Vec::new(),
            log_limits: LogLimits::default(),
            sandbox: SandboxLimits {
                max_concurrent_requests: 256,
                max_connections: 1024,
                request_timeout: Duration::from_secs(60),
                max_instance_memory: 1 << 30,
                max_sockets: runtime::reach::DEFAULT_MAX_SOCKETS_PER_POD,
                max_instances: runtime::pod::default_max_instances(1000),
                default_memory_limit: runtime::pod::DEFAULT_MEMORY_LIMIT,
            },
            proxy_max_connections: 4096,
            dns: dns::DnsConfig::default(),
            volumes: volumes::VolumeLimits::default(),
        }
    }
}

/// The logs of the containers of the pods this agent runs, by `(namespace, pod, container)`.
#[derive(Default)]
pub struct LogRegistry {
    logs: Mutex<HashMap<(String, String, String), Arc<ContainerLog>>>,
    limits: Mutex<LogLimits>,
}

impl LogRegistry {
    fn open(&self, pod: &PodRef, container: &str, file: PathBuf) -> Arc<ContainerLog> {
        let limits = *self.limits.lock().expect("limits lock");
        let log = ContainerLog::new(Some(file), limits);
        self.logs.lock().expect("logs lock").insert(
            (
                pod.namespace.clone(),
                pod.name.clone(),
                container.to_string(),
            ),
            log.clone(),
        );
        log
    }
    fn remove(&self, pod: &PodRef) {
        self.logs
            .lock()
            .expect("logs lock")
            .retain(|k, _| !(k.0 == pod.namespace && k.1 == pod.name));
    }
    pub fn get(&self, ns: &str, pod: &str, container: &str) -> Option<Arc<ContainerLog>> {
        self.logs
            .lock()
            .expect("logs lock")
            .get(&(ns.to_string(), pod.to_string(), container.to_string()))
            .cloned()
    }
    /// The containers of a pod that have logs here (for "a container name must be given").
    pub fn containers(&self, ns: &str, pod: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .logs
            .lock()
            .expect("logs lock")
            .keys()
            .filter(|k| k.0 == ns && k.1 == pod)
            .map(|k| k.2.clone())
            .collect();
        v.sort();
        v
    }
}

/// Shared by the agent's tasks.
pub struct AgentCtx {
    pub cfg: AgentConfig,
    pub api: Client,
    pub runtime: Arc<Runtime>,
    pub images: images::ImageStore,
    pub logs: LogRegistry,
    pub ips: Mutex<IpAllocator>,
    pub pods_dir: PathBuf,
    /// The agent's bearer token: the API server presents it when it proxies log requests.
    pub token: String,
    /// When this agent process started (the node conditions' transition time).
    pub started: wasmctl_api::Time,
    /// HTTP client of the probes.
    pub probes: reqwest::Client,
    /// Every Service and its ready endpoints (list+watch), read by the proxy, in-pod
    /// service routing and DNS.
    pub services: Arc<services::ServiceTable>,
    /// Forwards to Services' endpoints: the proxy's listeners and pods' outgoing traffic.
    pub router: Arc<proxy::Router>,
    /// Measures pods' emptyDirs against their bounds (volumes.rs).
    pub volumes: Arc<volumes::VolumeMonitor>,
}

/// A started agent.
pub struct Agent {
    pub ctx: Arc<AgentCtx>,
    /// Where the agent's endpoint (logs) listens.
    pub kubelet_addr: std::net::SocketAddr,
    listener: tokio::net::TcpListener,
    /// Where the cluster DNS listens (UDP and TCP).
    pub dns_addr: std::net::SocketAddr,
    dns: dns::DnsServer,
}

impl Agent {
    /// Starts the runtime and the agent endpoint and registers the node; [`Agent::run`]
    /// then runs the pods.
    pub async fn start(
        cfg: AgentConfig,
        kubeconfig: &wasmctl_client::Kubeconfig,
    ) -> anyhow::Result<Agent> {
        check_pod_cidr(cfg.pod_cidr, cfg.node_ip)?;
        if kubeconfig.token.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "the kubeconfig has no bearer token: the agent endpoint (pod logs) authenticates the API server with it and never runs open"
            );
        }
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let fds = raise_fd_limit(cfg.max_pods);
        let api = Client::new(kubeconfig).context("building the API client")?;
        let runtime = Runtime::new(&RuntimeConfig {
            cache_dir: cfg.data_dir.join("compiled"),
            instance_slots: cfg.instance_slots,
            max_instance_memory: cfg.sandbox.max_instance_memory,
            node_ips: host_addresses(cfg.node_ip),
            guest_cpu_slots: cfg.guest_cpu_slots,
            max_guest_sockets: cfg.max_guest_sockets.unwrap_or_else(|| {
                (fds.saturating_sub(u64::from(cfg.max_pods) + 1024) / 2).max(256) as usize
            }),
        })
        .map_err(|e| anyhow::anyhow!("starting the wasm runtime: {e:#}"))?;
        let images = images::ImageStore::new(
            cfg.data_dir.join("modules"),
            api.clone(),
            oci::OciPuller::new(cfg.insecure_registries.clone()),
            cfg.max_module_bytes,
        )
        .context("creating the module store")?;
        let pods_dir = cfg.data_dir.join("pods");
        std::fs::create_dir_all(&pods_dir)?;
        let listener = tokio::net::TcpListener::bind((cfg.node_ip, cfg.kubelet_port))
            .await
            .with_context(|| {
                format!(
                    "binding the agent endpoint {}:{}",
                    cfg.node_ip, cfg.kubelet_port
                )
            })?;
        let kubelet_addr = listener.local_addr()?;
        let dns = dns::DnsServer::bind(&cfg.dns, cfg.node_ip).await?;
        let logs = LogRegistry::default();
        *logs.limits.lock().expect("limits lock") = cfg.log_limits;
        let services = services::ServiceTable::new();
        let router = proxy::Router::new(services.clone(), runtime.pods.clone());
        runtime.set_router(router.clone());
        let cfg_volumes = cfg.volumes.clone();
        let ctx = Arc::new(AgentCtx {
            ips: Mutex::new(IpAllocator::new(cfg.pod_cidr.0, cfg.pod_cidr.1)),
            cfg,
            api,
            runtime,
            images,
            logs,
            pods_dir,
            token: kubeconfig.token.clone().unwrap_or_default(),
            started: wasmctl_api::Time::now(),
            probes: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .redirect(pods::probe_redirects())
                .build()
                .context("building the probe client")?,
            services: services.clone(),
            router: router.clone(),
            volumes: volumes::VolumeMonitor::new(cfg_volumes),
        });
        node::register(&ctx, kubelet_addr.port())
            .await
            .context("registering the node")?;
        tracing::info!(node = %ctx.cfg.name, ip = %ctx.cfg.node_ip, "node registered");
        Ok(Agent {
            ctx,
            kubelet_addr,
            listener,
            dns_addr: dns.local_addr(),
            dns,
        })
    }

    /// Registers the node and runs until `shutdown`: the agent endpoint, the node heartbeat
    /// and the pod sync loop; on shutdown every pod is stopped and every task joined.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(server::serve(ctx.clone(), self.listener, shutdown.clone()));
        tasks.spawn(self.dns.run(ctx.services.clone(), shutdown.clone()));
        tasks.spawn(node::heartbeat(
            ctx.clone(),
            self.kubelet_addr.port(),
            shutdown.clone(),
        ));
        tasks.spawn(sync_pods(ctx.clone(), shutdown.clone()));
        tasks.spawn(ctx.volumes.clone().run(shutdown.clone()));
        tasks.spawn(proxy::run(
            ctx.router.clone(),
            proxy::ProxyConfig {
                node_ip: ctx.cfg.node_ip,
                max_connections: ctx.cfg.proxy_max_connections,
            },
            shutdown.clone(),
        ));
        tasks.spawn(ctx.services.clone().run(ctx.api.clone(), shutdown.clone()));
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "an agent task failed");
                shutdown.cancel();
            }
        }
        ctx.runtime.shutdown();
        Ok(())
    }
}

/// Every pod holds sockets (one listener per HTTP port, connections) and log files: raise
/// the soft descriptor limit to the hard one, and say so if `--max-pods` may not fit.
/// Raises the open-file limit to the hard limit and returns the limit in force.
fn raise_fd_limit(max_pods: u32) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // One listener per idle HTTP pod, plus room for connections, logs and the API client.
    let wanted = u64::from(max_pods) + 1024;
    if limit < wanted {
        tracing::warn!(
            limit,
            max_pods,
            "the open-file limit may be too low for --max-pods; raise `ulimit -n`"
        );
    }
    limit
}

struct WorkerEntry {
    tx: watch::Sender<Option<Pod>>,
    /// Counts against `--max-pods` (pods that finished do not).
    active: bool,
}

/// Lists and watches the pods bound to this node and feeds one worker per pod.
async fn sync_pods(ctx: Arc<AgentCtx>, shutdown: CancellationToken) {
    let selector = format!("spec.nodeName={}", ctx.cfg.name);
    let sel: String = url::form_urlencoded::byte_serialize(selector.as_bytes()).collect();
    let mut workers: HashMap<String, WorkerEntry> = HashMap::new();
    let mut tasks: tokio::task::JoinSet<String> = tokio::task::JoinSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(reflector::reflect(
        ctx.api.clone(),
        format!("/api/v1/pods?fieldSelector={sel}"),
        tx,
        Some,
        shutdown.clone(),
    ));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(uid) = done { workers.remove(&uid); }
                // A worker stopped by the shutdown keeps its pod's directory for the next start.
                if !shutdown.is_cancelled() {
                    remove_orphan_dirs(&ctx, &workers);
                }
            }
            ev = rx.recv() => match ev {
                None => break,
                Some(reflector::Event::Reset(items)) => {
                    let mut seen = std::collections::HashSet::new();
                    for item in items {
                        if let Ok(pod) = serde_json::from_value::<Pod>(item) {
                            seen.insert(pod.metadata.uid.clone().unwrap_or_default());
                            dispatch(&ctx, &mut workers, &mut tasks, pod, &shutdown).await;
                        }
                    }
                    for (uid, w) in workers.iter() {
                        if !seen.contains(uid) {
                            let _ = w.tx.send(None);
                        }
                    }
                    remove_orphan_dirs(&ctx, &workers);
                }
                Some(reflector::Event::Upsert(obj)) => {
                    if let Ok(pod) = serde_json::from_value::<Pod>(obj) {
                        dispatch(&ctx, &mut workers, &mut tasks, pod, &shutdown).await;
                    }
                }
                Some(reflector::Event::Delete(obj)) => {
                    let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
                    if let Some(w) = workers.get(uid) { let _ = w.tx.send(None); }
                }
            },
        }
    }
    // Shutdown: workers see the cancelled token, stop their pods and return.
    while tasks.join_next().await.is_some() {}
}

/// Removes the directories of pods this agent runs no worker for (volumes.rs): called from
/// the sync loop itself, so no worker is started while it decides.
fn remove_orphan_dirs(ctx: &AgentCtx, workers: &HashMap<String, WorkerEntry>) {
    let live: std::collections::HashSet<String> = workers.keys().cloned().collect();
    volumes::remove_orphans(&ctx.pods_dir, &live);
}

/// Sleeps `backoff` (doubling it up to 5 s for next time); false if shutdown came first.
pub(crate) async fn back_off(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (wait * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

async fn dispatch(
    ctx: &Arc<AgentCtx>,
    workers: &mut HashMap<String, WorkerEntry>,
    tasks: &mut tokio::task::JoinSet<String>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if let Some(w) = workers.get_mut(&uid) {
        w.active = !finished;
        let _ = w.tx.send(Some(pod));
        return;
    }
    let active = workers.values().filter(|w| w.active).count();
    if !finished && pod.metadata.deletion_timestamp.is_none() && active >= ctx.cfg.max_pods as usize
    {
        let pref = PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone(),
            uid: uid.clone(),
        };
        pods::reject(
            ctx,
            &pref,
            "OutOfpods",
            &format!(
                "Node didn't have enough resource: pods (max {})",
                ctx.cfg.max_pods
            ),
        )
        .await;
        return;
    }
    let (tx, rx) = watch::channel(Some(pod));
    workers.insert(
        uid.clone(),
        WorkerEntry {
            tx,
            active: !finished,
        },
    );
    let ctx = ctx.clone();
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        pods::run_pod(ctx, rx, shutdown).await;
        uid
    });
}

/// Every address of this host (the node IP and each interface's): never egress for a pod.
fn host_addresses(node_ip: Ipv4Addr) -> Vec<std::net::IpAddr> {
    let mut ips = vec![std::net::IpAddr::V4(node_ip)];
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    ips.push(std::net::IpAddr::V4(v4.ip()));
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    ips.push(std::net::IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing the host's addresses failed; only the node IP is kept from pods")
        }
    }
    ips.sort();
    ips.dedup();
    ips
}

/// The default `--service-cluster-ip-range` of `wasmctl server` (inside 127/8 like pod IPs).
const DEFAULT_SERVICE_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(127, 96, 0, 0), 16);

fn in_net(net: (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(net.1)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net.0) & mask
}

/// A pod CIDR must not hand out addresses that are someone else's: the host's own loopback
/// services (127.0.0.0/24: 127.0.0.1), the node IP, or ClusterIPs (the default service range).
fn check_pod_cidr(cidr: (Ipv4Addr, u8), node_ip: Ipv4Addr) -> anyhow::Result<()> {
    let overlaps = |other: (Ipv4Addr, u8)| in_net(cidr, other.0) || in_net(other, cidr.0);
    let shown = format!("{}/{}", cidr.0, cidr.1);
    if overlaps((Ipv4Addr::new(127, 0, 0, 0), 24)) {
        anyhow::bail!("--pod-cidr {shown} overlaps 127.0.0.0/24, where the host's own loopback services listen");
    }
    if in_net(cidr, node_ip) {
        anyhow::bail!("--pod-cidr {shown} contains the node IP {node_ip}");
    }
    if overlaps(DEFAULT_SERVICE_RANGE) {
        anyhow::bail!("--pod-cidr {shown} overlaps the default service range 127.96.0.0/16");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_that_take_others_addresses_are_refused() {
        let node = Ipv4Addr::new(127, 250, 0, 3);
        let ok = |s: [u8; 4], len: u8| check_pod_cidr((Ipv4Addr::from(s), len), node);
        assert!(ok([127, 1, 0, 0], 16).is_ok());
        assert!(ok([127, 0, 0, 0], 16).is_err(), "127.0.0.1 is the host's");
        assert!(ok([127, 0, 0, 128], 25).is_err());
        assert!(ok([127, 0, 0, 0], 8).is_err());
        assert!(ok([127, 250, 0, 0], 24).is_err(), "the node IP");
        assert!(ok([127, 96, 4, 0], 24).is_err(), "the service range");
        assert!(
            ok([127, 64, 0, 0], 10).is_err(),
            "contains the service range"
        );
    }
}
