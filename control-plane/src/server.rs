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
        let creds = pki::ensure(&cfg.data_dir, listen, &cfg.tls_sans)?;

        let mut scfg = StoreConfig::new(cfg.data_dir.join("store"));
        scfg.advertise_addr = listen.to_string();
        scfg.history_size = cfg.watch_history;
        scfg.fsync = cfg.fsync;
        scfg.snapshot_logs = cfg.snapshot_logs;
        let store = Store::open(scfg)
            .await
            .context("opening the cluster store")?;

        let objects = Objects::new(store.clone(), shutdown.clone())
            .with_service_ranges(cfg.service_ranges.clone());
        objects
            .bootstrap()
            .await
            .map_err(|e| anyhow::anyhow!("bootstrapping system namespaces: {e}"))?;

        let mut api = ApiConfig::new(listen);
        api.bookmark_interval = cfg.bookmark_interval;
        api.max_connections = cfg.max_connections;
        api.max_watches = cfg.max_watches;
        api.max_lists = cfg.max_lists;
        api.timeouts = cfg.api_timeouts;
        let modules = Arc::new(
            ModuleRegistry::open(cfg.data_dir.join("modules")).with_context(|| {
                format!("opening the module registry in {}", cfg.data_dir.display())
            })?,
        );
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
        });
        let url = format!("https://{}", pki::server_url(listen));
        let serve = tokio::spawn(apiserver::serve(listener, creds.tls.clone(), state));
        let scheduler = tokio::spawn(crate::scheduling::run(objects.clone(), shutdown.clone()));
        let controllers =
            crate::controllers::start(objects.clone(), cfg.controllers.clone(), shutdown.clone());
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
