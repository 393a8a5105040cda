//! `wasmctl agent` and `wasmctl up`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use wasmctl_client::Kubeconfig;
use wasmctl_control_plane::Server;
use wasmctl_node_agent::{Agent, AgentConfig};

use super::server::{cancel_on_signals, ServerArgs};

/// Agent settings shared by `agent` and `up`.
#[derive(Args, Clone)]
pub struct AgentOpts {
    /// The address this node reports (InternalIP); its agent endpoint listens here.
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: Ipv4Addr,
    /// Pods this node runs at most (the Node's `pods` capacity).
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// The node's pod CIDR, inside 127.0.0.0/8 (default 127.<last octet of the node IP>.0.0/16).
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Port of the agent endpoint (logs) on the node IP; 0 picks a free one.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Interval between node lease renewals.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub lease_renew: Duration,
    /// First restart back-off (doubles per crash up to --backoff-max).
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub backoff_base: Duration,
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub backoff_max: Duration,
    /// Concurrent wasm instances the pooling allocator reserves slots for.
    #[arg(long, default_value_t = 1000)]
    pub instance_slots: u32,
    /// CPU-bound guests (ones that ran a whole 5 ms tick without returning) that run at once
    /// on this node; the rest wait, parked, for a slot. Default: one less than the cores, at
    /// least 1, so a core stays free for short requests, the proxy, DNS and heartbeats.
    #[arg(long)]
    pub guest_cpu_slots: Option<usize>,
    /// Sockets all pods of this node may hold open at once (each pod also has its own budget
    /// of 1024). Default: half of the open-file limit left after one listener per pod and
    /// 1024 for the agent itself.
    #[arg(long)]
    pub max_guest_sockets: Option<usize>,
    /// Concurrent requests one pod serves; more wait up to 1 s, then get 503.
    #[arg(long, default_value_t = 256)]
    pub max_requests_per_pod: usize,
    /// Live wasm instances (pool slots) one pod holds at once, its containers and requests
    /// together; a request that finds none free within 1 s gets 503. Default: a quarter of
    /// --instance-slots, so one busy pod cannot take the pool from its neighbours.
    #[arg(long)]
    pub max_instances_per_pod: Option<usize>,
    /// Memory limit of a container without resources.limits.memory (like a LimitRange
    /// default), so every pod has a memory budget; a Kubernetes quantity.
    #[arg(long, default_value = "256Mi", value_parser = parse_memory)]
    pub default_memory_limit: usize,
    /// OCI registries reached over plain HTTP (HOST:PORT), e.g. a local registry.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Concurrent client connections per Service proxy listener (each ClusterIP:port and
    /// NodePort); more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 4096)]
    pub proxy_max_connections: usize,
    /// Where the cluster DNS listens, UDP and TCP (IP:PORT; port 0 picks a free one).
    /// Default: the node IP on port 53 if it can be bound, else 1053, else a free port.
    #[arg(long)]
    pub dns_listen: Option<SocketAddr>,
    /// The domain the cluster DNS answers for (NAME.NS.svc.DOMAIN); names outside it are
    /// REFUSED (no recursion).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The size bound of an emptyDir volume without a `sizeLimit` (a quantity: 512Mi, 2Gi).
    #[arg(long, default_value = "1Gi")]
    pub emptydir_default_limit: String,
    /// Files, directories and links one emptyDir volume may hold.
    #[arg(long, default_value_t = 65536)]
    pub emptydir_inode_limit: u64,
    /// How often the node measures every emptyDir against its bounds.
    #[arg(long, default_value = "250ms", value_parser = super::parse_duration)]
    pub emptydir_check_period: Duration,
}

impl AgentOpts {
    fn config(&self, name: String, data_dir: PathBuf) -> Result<AgentConfig> {
        let mut cfg = AgentConfig::new(name, self.node_ip, data_dir);
        cfg.max_pods = self.max_pods;
        if let Some(c) = &self.pod_cidr {
            cfg.pod_cidr = parse_cidr(c)?;
        }
        cfg.kubelet_port = self.kubelet_port;
        cfg.lease_renew = self.lease_renew;
        cfg.backoff_base = self.backoff_base;
        cfg.backoff_max = self.backoff_max;
        cfg.instance_slots = self.instance_slots;
        if self.max_guest_sockets == Some(0) {
            bail!("--max-guest-sockets must be at least 1");
        }
        cfg.max_guest_sockets = self.max_guest_sockets;
        if let Some(n) = self.guest_cpu_slots {
            if n == 0 {
                bail!("--guest-cpu-slots must be at least 1");
            }
            cfg.guest_cpu_slots = n;
        }
        cfg.sandbox.max_concurrent_requests = self.max_requests_per_pod;
        cfg.sandbox.max_instances = match self.max_instances_per_pod {
            Some(0) => bail!("--max-instances-per-pod must be at least 1"),
            Some(n) => n,
            None => wasmctl_node_agent::runtime::pod::default_max_instances(self.instance_slots),
        };
        cfg.sandbox.default_memory_limit = self.default_memory_limit;
        cfg.insecure_registries = self.insecure_registries.clone();
        cfg.proxy_max_connections = self.proxy_max_connections;
        cfg.dns.listen = self.dns_listen;
        cfg.dns.cluster_domain = self.cluster_domain.clone();
        let q = wasmctl_api::Quantity::from(self.emptydir_default_limit.as_str());
        match q.bytes() {
            Ok(b) if b > 0 => cfg.volumes.default_size_limit = q,
            Ok(_) => bail!("--emptydir-default-limit must be positive"),
            Err(e) => bail!("invalid --emptydir-default-limit: {e}"),
        }
        if self.emptydir_inode_limit == 0 {
            bail!("--emptydir-inode-limit must be at least 1");
        }
        cfg.volumes.max_inodes = self.emptydir_inode_limit;
        if self.emptydir_check_period < Duration::from_millis(10) {
            bail!("--emptydir-check-period must be at least 10ms");
        }
        cfg.volumes.period = self.emptydir_check_period;
        Ok(cfg)
    }
}

/// A memory quantity (`256Mi`, `1G`, `134217728`) in bytes, at least 1 MiB.
fn parse_memory(s: &str) -> Result<usize, String> {
    let bytes = wasmctl_api::Quantity(s.to_string())
        .bytes()
        .map_err(|e| format!("invalid memory quantity {s:?}: {e}"))?;
    if bytes < 1 << 20 {
        return Err(format!("{s:?} is less than 1Mi"));
    }
    usize::try_from(bytes).map_err(|_| format!("{s:?} is too large"))
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .with_context(|| format!("invalid --pod-cidr {s:?}: expected A.B.C.D/N"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("invalid --pod-cidr {s:?}"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("invalid --pod-cidr {s:?}"))?;
    if ip.octets()[0] != 127 || !(8..=30).contains(&len) {
        bail!("invalid --pod-cidr {s:?}: pods get loopback addresses, so the CIDR must be inside 127.0.0.0/8 with a prefix of 8 to 30");
    }
    Ok((ip, len))
}

#[derive(Args)]
pub struct AgentArgs {
    /// The node's name.
    #[arg(long)]
    pub name: Option<String>,
    /// Where modules, compiled components, pod logs and volumes live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub opts: AgentOpts,
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_ascii_lowercase())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node-1".into())
}

pub async fn run_agent(kubeconfig: Option<&Path>, args: AgentArgs) -> Result<ExitCode> {
    let kc = Kubeconfig::load(kubeconfig)?;
    let name = args.name.unwrap_or_else(default_name);
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| wasmctl_client::default_data_dir().join("agent").join(&name));
    let cfg = args.opts.config(name, data_dir)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let agent = Agent::start(cfg.clone(), &kc).await?;
    println!(
        "node agent {} running: node IP {}, agent endpoint {}, data in {}",
        cfg.name,
        cfg.node_ip,
        agent.kubelet_addr,
        cfg.data_dir.display()
    );
    println!("{}", dns_line(&agent));
    agent.run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// The start line that says where the cluster DNS listens (tests and scripts read it).
fn dns_line(agent: &Agent) -> String {
    format!("cluster DNS listening on {} (udp+tcp)", agent.dns_addr)
}

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The node's name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub opts: AgentOpts,
}

/// The embedded single-node cluster: the control plane and one agent in this process.
pub async fn run_up(args: UpArgs) -> Result<ExitCode> {
    // Ctrl-C stops the agent first (its pods stop while the API is still up), then the server.
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let server_shutdown = CancellationToken::new();
    let server_cfg = args.server.config();
    let data_dir = server_cfg.data_dir.clone();
    let server = Server::start(server_cfg, server_shutdown.clone()).await?;
    let kc = Kubeconfig::load(Some(&server.kubeconfig_path))?;
    let name = args.name.unwrap_or_else(default_name);
    let cfg = args.opts.config(name, data_dir.join("agent"))?;
    let agent = Agent::start(cfg.clone(), &kc).await?;
    println!("API server listening on {}", server.url);
    println!("kubeconfig: {}", server.kubeconfig_path.display());
    println!(
        "node {} ready on {} (agent endpoint {}); pod logs in {}",
        cfg.name,
        cfg.node_ip,
        agent.kubelet_addr,
        cfg.data_dir.join("pods").display()
    );
    println!("{}", dns_line(&agent));
    println!(
        "try: wasmctl --kubeconfig {} get nodes,pods -A",
        server.kubeconfig_path.display()
    );
    let agent_result = agent.run(shutdown).await;
    server_shutdown.cancel();
    server.wait().await?;
    agent_result?;
    Ok(ExitCode::SUCCESS)
}
