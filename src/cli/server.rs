//! `wasmctl server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tokio_util::sync::CancellationToken;
use wasmctl_control_plane::{
    ClusterMode, Ipv4Cidr, PortRange, Server, ServerConfig, ServiceRanges,
};

#[derive(Args)]
pub struct ServerArgs {
    /// Where the store, certificates and kubeconfig live.
    #[arg(long, default_value_os_t = wasmctl_client::default_data_dir())]
    pub data_dir: PathBuf,
    /// Address of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:6443", value_parser = crate::parse_addr)]
    pub listen: SocketAddr,
    /// Store events kept for watches to resume from; older revisions answer 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    pub watch_history: u64,
    /// Interval between watch bookmarks (for watches that ask for them).
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    pub bookmark_interval: Duration,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Concurrent watches; more get 429.
    #[arg(long, default_value_t = 2048)]
    pub max_watches: usize,
    /// Lists served at once (each holds its items and its answer in memory until the answer
    /// is written); more wait up to 2 s for a slot, then get 429.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_lists: u64,
    /// (Boxed: keeps the `wasmctl` subcommand enum within clippy's `large_enum_variant`
    /// bound, `up` flattening all of these.)
    #[command(flatten)]
    pub api_timeouts: Box<ApiTimeoutArgs>,
    /// Extra DNS names or IPs for the serving certificate.
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<String>,
    /// Raft log entries between snapshots.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_logs: u64,
    /// How long a node may go without renewing its Lease before it is marked
    /// Ready=Unknown and tainted node.kubernetes.io/unreachable (its pods are then evicted
    /// after their toleration of that taint, 300 s by default).
    #[arg(long, default_value = "40s", value_parser = super::parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// Terminated pods (Succeeded or Failed) kept before the pod garbage collector deletes
    /// the oldest; 0 keeps them all.
    #[arg(long, default_value_t = 12_500)]
    pub terminated_pod_gc_threshold: usize,
    /// How long a node must stay missing before the pod garbage collector deletes the pods
    /// still bound to it (Kubernetes' fixed 40 s quarantine; shortened by tests).
    #[arg(long, hide = true, default_value = "40s", value_parser = super::parse_duration)]
    pub pod_gc_quarantine: Duration,
    /// The range Services' cluster IPs are allocated from (IPv4, /12 to /30). The default is
    /// inside 127.0.0.0/8, so that every node on one host can bind them.
    #[arg(long, default_value = "127.96.0.0/16")]
    pub service_cluster_ip_range: Ipv4Cidr,
    /// The range NodePort Services' ports are allocated from (and requested ports must be in).
    #[arg(long, default_value = "30000-32767")]
    pub service_node_port_range: PortRange,
    /// (Boxed for the same reason as the timeouts.)
    #[command(flatten)]
    pub ha: Box<HaArgs>,
}

/// Running several servers as one HA control plane.
#[derive(Args)]
pub struct HaArgs {
    /// Start the first server of an HA cluster: it writes the join token to DATA_DIR/token
    /// and accepts `--join` from other servers. Ignored once the data dir is a member.
    #[arg(long, conflicts_with = "join")]
    pub cluster_init: bool,
    /// Join the HA cluster of the server at this URL (https://HOST:PORT) as a new member;
    /// needs --token. Ignored once the data dir is a member.
    #[arg(long, value_name = "URL", requires = "token")]
    pub join: Option<String>,
    /// The join token (the first server's DATA_DIR/token: K10<CA sha256>::<secret>).
    #[arg(long, env = "WASMCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The address the other servers reach this one at (default: --listen; required when
    /// --listen is 0.0.0.0).
    #[arg(long, value_parser = crate::parse_addr)]
    pub advertise_address: Option<SocketAddr>,
    /// The Raft leader's heartbeat interval; it also bounds each replication RPC.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    pub raft_heartbeat: Duration,
    /// The range a server's Raft election timeout is drawn from (MIN-MAX, e.g. 300ms-600ms;
    /// for a LAN 1s-3s). A failover takes about MAX plus a draw from the range.
    #[arg(long, default_value = "300ms-600ms", value_parser = parse_range)]
    pub raft_election_timeout: (Duration, Duration),
    /// A planted bug for the linearizability test: followers answer reads from local state
    /// without the leader's read index, so reads can be stale. Never use it otherwise.
    #[arg(long, hide = true)]
    pub unsafe_local_reads_for_testing: bool,
}

fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 300ms-600ms"))?;
    let (a, b) = (super::parse_duration(a)?, super::parse_duration(b)?);
    if a.is_zero() || b <= a {
        return Err(format!("{s:?}: MIN must be above 0 and below MAX"));
    }
    Ok((a, b))
}

/// Hidden tunables of the API connections' deadlines, for tests (the defaults, and why, are
/// in `wasmctl_control_plane::apiserver::ConnTimeouts::default()`).
#[derive(Args)]
pub struct ApiTimeoutArgs {
    /// How long a new API connection may go without a complete request header after its
    /// TLS handshake (and a header begun on a kept-alive one may take). Default 10s.
    #[arg(long, hide = true, value_parser = super::parse_duration)]
    pub request_header_timeout: Option<Duration>,
    /// How long an API connection may stay open with no request in flight. Default 90s.
    #[arg(long, hide = true, value_parser = super::parse_duration)]
    pub idle_connection_timeout: Option<Duration>,
    /// How long a write to an API client may make no progress before its connection is
    /// dropped. Default 60s.
    #[arg(long, hide = true, value_parser = super::parse_duration)]
    pub write_stall_timeout: Option<Duration>,
    /// How long a request body may take to arrive in full. Default 60s.
    #[arg(long, hide = true, value_parser = super::parse_duration)]
    pub request_body_timeout: Option<Duration>,
}

impl ServerArgs {
    pub fn config(&self) -> ServerConfig {
        let mut cfg = ServerConfig::new(&self.data_dir, self.listen);
        cfg.watch_history = self.watch_history;
        cfg.bookmark_interval = self.bookmark_interval;
        cfg.max_connections = self.max_connections;
        cfg.max_watches = self.max_watches;
        cfg.max_lists = usize::try_from(self.max_lists).unwrap_or(usize::MAX);
        if let Some(t) = self.api_timeouts.request_header_timeout {
            cfg.api_timeouts.request_header = t;
        }
        if let Some(t) = self.api_timeouts.idle_connection_timeout {
            cfg.api_timeouts.idle = t;
        }
        if let Some(t) = self.api_timeouts.write_stall_timeout {
            cfg.api_timeouts.write_stall = t;
        }
        if let Some(t) = self.api_timeouts.request_body_timeout {
            cfg.api_timeouts.request_body = t;
        }
        cfg.tls_sans = self.tls_sans.clone();
        cfg.snapshot_logs = self.snapshot_logs;
        cfg.controllers.node_monitor_grace_period = self.node_monitor_grace_period;
        cfg.controllers.terminated_pod_gc_threshold = self.terminated_pod_gc_threshold;
        cfg.controllers.pod_gc_quarantine = self.pod_gc_quarantine;
        let ha = &self.ha;
        cfg.cluster = match (&ha.join, &ha.token) {
            (Some(url), Some(token)) => ClusterMode::Join {
                url: url.clone(),
                token: token.clone(),
            },
            _ if ha.cluster_init => ClusterMode::Init,
            _ => ClusterMode::Single,
        };
        cfg.advertise = ha.advertise_address;
        cfg.unsafe_local_reads = ha.unsafe_local_reads_for_testing;
        cfg.raft_heartbeat_ms = ha.raft_heartbeat.as_millis().max(1) as u64;
        cfg.raft_election_ms = (
            ha.raft_election_timeout.0.as_millis().max(1) as u64,
            ha.raft_election_timeout.1.as_millis().max(2) as u64,
        );
        cfg.service_ranges = ServiceRanges {
            cluster_ip: self.service_cluster_ip_range,
            node_ports: self.service_node_port_range,
        };
        cfg
    }
}

/// Cancel `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = token.cancelled() => return,
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

pub async fn run(args: ServerArgs) -> Result<ExitCode> {
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let server = Server::start(args.config(), shutdown.clone()).await?;
    println!("API server listening on {}", server.url);
    println!("kubeconfig: {}", server.kubeconfig_path.display());
    println!(
        "try: wasmctl --kubeconfig {} get nodes,pods -A",
        server.kubeconfig_path.display()
    );
    server.wait().await?;
    Ok(ExitCode::SUCCESS)
}
