//! `wasmctl server`: the store, the API server and their background work, as one unit with
//! one shutdown path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmctl_store::{Store, StoreConfig};

use crate::apiserver::{self, ApiConfig, ApiState, ConnTimeouts};
use crate::cluster::{self, MemberFile};
use crate::modules::ModuleRegistry;
use crate::objects::Objects;
use crate::pki;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Store events retained for watches to resume from.
    pub watch_history: u64,
    pub bookmark_interval: Duration,
    pub max_connections: usize,
    pub max_watches: usize,
    /// Lists served at once (`--max-lists`).
    pub max_lists: usize,
    /// The API connections' deadlines (TLS handshake, request header, idle, write stall).
    pub api_timeouts: ConnTimeouts,
    /// Extra names for the serving certificate.
    pub tls_sans: Vec<String>,
    pub fsync: bool,
    /// Raft log entries between snapshots.
    pub snapshot_logs: u64,
    pub controllers: crate::controllers::ControllerConfig,
    /// Where Services get their cluster IPs and node ports (`--service-cluster-ip-range`,
    /// `--service-node-port-range`).
    pub service_ranges: crate::allocator::ServiceRanges,
    /// How this server takes part in an HA cluster.
    pub cluster: ClusterMode,
    /// The address other servers reach this one at (default: the listen address).
    pub advertise: Option<SocketAddr>,
    /// Raft heartbeat interval (ms) and election timeout range (ms).
    pub raft_heartbeat_ms: u64,
    pub raft_election_ms: (u64, u64),
    /// The planted stale-read bug of the linearizability test (`StoreConfig::unsafe_local_reads`).
    pub unsafe_local_reads: bool,
}

/// `wasmctl server` alone, `--cluster-init`, or `--join URL --token TOKEN`. A server that
/// has been part of a cluster (its `store/member.json` exists) restarts as that member
/// whatever it is given.
#[derive(Clone, Debug, Default)]
pub enum ClusterMode {
    /// One voter, no peers, no join token (as before HA existed).
    #[default]
    Single,
    /// The first server of an HA cluster: writes `DIR/token` and accepts joins.
    Init,
    /// Join the cluster of the server at `url`.
    Join { url: String, token: String },
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(60),
            max_connections: 1024,
            max_watches: 2048,
            max_lists: 32,
            api_timeouts: ConnTimeouts::default(),
            tls_sans: Vec::new(),
            fsync: true,
            snapshot_logs: 10_000,
            controllers: Default::default(),
            service_ranges: Default::default(),
            cluster: ClusterMode::Single,
            advertise: None,
            raft_heartbeat_ms: 100,
            raft_election_ms: (300, 600),
            unsafe_local_reads: false,
        }
    }
}

/// A running control plane.
pub struct Server {
    pub kubeconfig_path: PathBuf,
    pub url: String,
    pub objects: Objects,
    serve: JoinHandle<Result<()>>,
    scheduler: JoinHandle<()>,
    controllers: tokio::task::JoinSet<()>,
    store: Store,
}

impl Server {
    /// Open the store, create credentials and system namespaces, and start serving.
    pub async fn start(cfg: ServerConfig, shutdown: CancellationToken) -> Result<Server> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listening on {}", cfg.listen))?;
        let listen = listener.local_addr()?;
        let advertise = cfg.advertise.unwrap_or(listen);
        let member = membership(&cfg, advertise).await?;
        let mut sans = cfg.tls_sans.clone();
        if let Some(m) = &member {
            if let Ok(addr) = m.advertise.parse::<SocketAddr>() {
                sans.push(addr.ip().to_string());
            }
        }
        let creds = pki::ensure(&cfg.data_dir, listen, &sans)?;

        let mut scfg = StoreConfig::new(cfg.data_dir.join("store"));
        scfg.advertise_addr = listen.to_string();
        scfg.history_size = cfg.watch_history;
        scfg.fsync = cfg.fsync;
        scfg.snapshot_logs = cfg.snapshot_logs;
        scfg.heartbeat_ms = cfg.raft_heartbeat_ms;
        scfg.election_timeout_ms = cfg.raft_election_ms;
        scfg.unsafe_local_reads = cfg.unsafe_local_reads;
        if cfg.unsafe_local_reads {
            tracing::error!("--unsafe-local-reads-for-testing: followers serve STALE reads");
        }
        let mut peer_auth = None;
        if let Some(m) = &member {
            let secrets = cluster::Secrets::ensure(&cfg.data_dir)?;
            let token_path = cfg.data_dir.join("token");
            let token = cluster::JoinToken::format(creds.ca_pem.as_bytes(), &secrets.join);
            if std::fs::read_to_string(&token_path).ok().as_deref() != Some(token.as_str()) {
                pki::write_private(&token_path, &token)?;
            }
            scfg.node_id = m.node_id;
            scfg.advertise_addr = m.advertise.clone();
            // Only the first server initializes; a joiner waits to be added.
            scfg.bootstrap = m.node_id == 1;
            scfg.transport = Arc::new(cluster::HttpsTransport::new(
                creds.ca_pem.as_bytes(),
                &m.cluster_id,
                &secrets.peer,
            )?);
            peer_auth = Some(cluster::PeerAuth {
                cluster_id: m.cluster_id.clone(),
                node_id: m.node_id,
                peer_secret: secrets.peer,
                join_secret: Some(secrets.join),
            });
        }
        let store = Store::open(scfg)
            .await
            .context("opening the cluster store")?;

        let objects = Objects::new(store.clone(), shutdown.clone())
            .with_service_ranges(cfg.service_ranges.clone());
        // A restarted member may briefly believe it still leads (its vote is restored): only
        // a sole voter bootstraps before serving.
        let voters: Vec<u64> = store
            .members()
            .iter()
            .filter(|m| m.role == wasmctl_store::MemberRole::Voter)
            .map(|m| m.id)
            .collect();
        let sole_voter = voters == [store.node_id()];
        if member.is_none() || sole_voter {
            objects
                .bootstrap()
                .await
                .map_err(|e| anyhow::anyhow!("bootstrapping system namespaces: {e}"))?;
        } else {
            // A member of a cluster without a quorum yet: the namespaces are most likely
            // there already; make sure once there is a leader.
            tokio::spawn(bootstrap_when_possible(objects.clone(), shutdown.clone()));
        }
        let cluster_state = peer_auth.map(|auth| {
            Arc::new(cluster::ClusterState {
                auth,
                data_dir: cfg.data_dir.clone(),
            })
        });

        let mut api = ApiConfig::new(listen);
        api.bookmark_interval = cfg.bookmark_interval;
        api.max_connections = cfg.max_connections;
        api.max_watches = cfg.max_watches;
        api.max_lists = cfg.max_lists;
        api.timeouts = cfg.api_timeouts;
        let modules = Arc::new(
            ModuleRegistry::open(cfg.data_dir.join("modules"), store.clone()).with_context(
                || format!("opening the module registry in {}", cfg.data_dir.display()),
            )?,
        );
        modules.spawn_import(shutdown.clone());
        let agents = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the agent proxy client")?;
        let state = Arc::new(ApiState {
            objects: objects.clone(),
            modules,
            agents,
            token: creds.token.clone(),
            watches: Arc::new(Semaphore::new(api.max_watches.min(Semaphore::MAX_PERMITS))),
            lists: crate::objects::ListGate::new(api.max_lists),
            config: api,
            shutdown: shutdown.clone(),
            server_address: pki::server_url(listen),
            ca_pem: creds.ca_pem.clone(),
            cluster: cluster_state,
        });
        let url = format!("https://{}", pki::server_url(listen));
        let serve = tokio::spawn(apiserver::serve(listener, creds.tls.clone(), state));
        let scheduler = tokio::spawn(crate::scheduling::run(objects.clone(), shutdown.clone()));
        let mut controllers =
            crate::controllers::start(objects.clone(), cfg.controllers.clone(), shutdown.clone());
        // The `kubernetes` Service and Endpoints, with this server's `scfg.advertise_addr`.
        let advertise_addr = member
            .as_ref()
            .map_or(listen.to_string(), |m| m.advertise.clone());
        controllers.spawn(crate::controllers::apiserver_endpoints::run(
            objects.clone(),
            advertise_addr,
            shutdown.clone(),
        ));
        Ok(Server {
            scheduler,
            controllers,
            kubeconfig_path: creds.kubeconfig_path,
            url,
            objects,
            serve,
            store,
        })
    }

    /// Wait for the API server to stop (after shutdown), then close the store cleanly.
    pub async fn wait(self) -> Result<()> {
        let served = self.serve.await.context("API server task")?;
        self.scheduler.await.context("scheduler task")?;
        let mut controllers = self.controllers;
        while let Some(r) = controllers.join_next().await {
            r.context("controller task")?;
        }
        self.objects.close().await;
        self.store
            .shutdown()
            .await
            .map_err(|e| anyhow::anyhow!("closing the store: {e}"))?;
        served
    }
}

/// Retries the system namespaces' bootstrap until it succeeds (a cluster member may start
/// before its cluster has a quorum).
async fn bootstrap_when_possible(objects: Objects, shutdown: CancellationToken) {
    loop {
        match objects.bootstrap().await {
            Ok(()) => return,
            Err(e) => {
                tracing::info!(error = %e, "system namespaces not bootstrapped yet; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// This server's membership: the one recorded in its data dir, a new cluster
/// (`--cluster-init`), or one obtained by joining (`--join`). `None`: a single server.
async fn membership(cfg: &ServerConfig, advertise: SocketAddr) -> Result<Option<MemberFile>> {
    let dir = &cfg.data_dir;
    let existing = MemberFile::load(dir)?;
    let store_dir = dir.join("store").join("db");
    if let Some(m) = existing {
        if let ClusterMode::Join { token, .. } = &cfg.cluster {
            // A restart ignores --join, but not a token of another cluster.
            let t = cluster::JoinToken::parse(token)?;
            let ca = std::fs::read(dir.join("pki").join("ca.crt"))
                .with_context(|| format!("reading {}/pki/ca.crt", dir.display()))?;
            if cluster::ca_hash(&ca) != t.ca_hash {
                anyhow::bail!(
                    "{} belongs to cluster {} (CA sha256 {}), but the token is for a cluster \
                     whose CA has sha256 {}: refusing to start (use an empty --data-dir to join \
                     that cluster)",
                    dir.display(),
                    m.cluster_id,
                    cluster::ca_hash(&ca),
                    t.ca_hash
                );
            }
        }
        return Ok(Some(m));
    }
    if (advertise.ip().is_unspecified() || advertise.port() == 0)
        && !matches!(cfg.cluster, ClusterMode::Single)
    {
        anyhow::bail!(
            "--advertise-address IP:PORT is required when --listen is {advertise} (the other \
             servers must know where to reach this one)"
        );
    }
    match &cfg.cluster {
        ClusterMode::Single => Ok(None),
        ClusterMode::Init => {
            let m = MemberFile {
                cluster_id: cluster::random_hex(8),
                node_id: 1,
                advertise: advertise.to_string(),
            };
            if store_dir.exists() {
                tracing::info!("--cluster-init on an existing single server: it becomes node 1");
            }
            m.save(dir)?;
            tracing::info!(cluster_id = %m.cluster_id, "initialized a new HA cluster");
            Ok(Some(m))
        }
        ClusterMode::Join { url, token } => {
            if store_dir.exists() {
                anyhow::bail!(
                    "{} already holds a cluster store of its own: a joining server needs an \
                     empty --data-dir",
                    dir.display()
                );
            }
            let t = cluster::JoinToken::parse(token)?;
            let joined = cluster::request_join(url, &t, &advertise.to_string()).await?;
            pki::install_joined(dir, &joined.ca_crt, &joined.ca_key, &joined.admin_token)?;
            cluster::Secrets::install(dir, &joined.join_secret, &joined.peer_secret)?;
            let m = MemberFile {
                cluster_id: joined.cluster_id,
                node_id: joined.node_id,
                advertise: advertise.to_string(),
            };
            m.save(dir)?;
            tracing::info!(node_id = m.node_id, cluster_id = %m.cluster_id, "joined the cluster as a learner");
            Ok(Some(m))
        }
    }
}
