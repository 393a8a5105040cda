//! The wasmtime side of the agent: one [`Engine`] per agent, one [`Linker`] for every guest,
//! an on-disk cache of compiled components, and the per-pod sandbox (see [`pod`]).
//!
//! - **One `Engine` per agent**: pooling allocator (slots for `--instance-slots` concurrent
//!   instances), copy-on-write memory images, epoch interruption with a 5 ms tick thread. One
//!   `Linker` for every guest: WASI p2 + wasi:http, with `wasi:sockets/{tcp,udp,ip-name-lookup}`
//!   shadowed by [`sockets`].
//! - **One compiled, pre-instantiated component per module digest** ([`LoadedComponent`]: an
//!   `InstancePre`, plus a `ProxyPre` for HTTP); every replica of the same module shares it.
//!   Compiles go through an on-disk cache keyed by digest + the engine's compatibility hash
//!   (`DATA/compiled/`), so a second replica or an agent restart never recompiles. The kind is
//!   read from the exports: `wasi:http/incoming-handler` → served per request; `wasi:cli/run`
//!   → a long-running or run-to-completion command.
//! - **A pod is one sandbox** ([`pod::PodSandbox`]), not one Store: a Store holds what a guest
//!   allocated until it is dropped, and calls need `&mut Store`, so each HTTP request gets a
//!   fresh Store + instance (~tens of µs from the pool) and each command one Store for its run.
//!   What makes them one pod is shared: the **pod IP** (every pod its own address in 127/8 —
//!   the guest's `127.0.0.1`/`0.0.0.0` binds and connects are rewritten to it, and addresses
//!   are mapped back on the way out, so pods never collide on ports; [`sockets`]), the
//!   **memory budget** (a `ResourceLimiter` per Store charging one atomic pod counter; growth
//!   past `limits.memory` traps with `OOMKilled`; [`limits`]), the **CPU quota** (the epoch
//!   callback charges a tick to the pod and, past `limits.cpu` × 100 ms per 100 ms period,
//!   parks the pod's guests until the period ends; every guest yields its thread every tick,
//!   and a guest that runs a whole tick must hold one of the node's `--guest-cpu-slots`, at
//!   most `ceil(limits.cpu)` per pod, so spinning pods cannot crowd out short requests;
//!   [`cpu`]), the **routing table** (`containerPort` → HTTP
//!   component: an outgoing `http://localhost:PORT` request is answered by the sibling's
//!   `ProxyPre` in-process, no socket; [`http`]), and the **bounds** (concurrent requests,
//!   connections, request timeout, handles per Store, live Stores = pool slots per pod). The
//!   host memory a guest drives through wasi:http header maps and handles is charged to the
//!   same memory budget ([`fields`]); a container without a memory limit gets the node's
//!   default (`--default-memory-limit`), so every pod has one.
//! - **Services from inside a pod** go through the node's [`crate::net::ServiceRouter`]
//!   (installed by the agent; the proxy implements it): wasi:http requests to a Service name
//!   or ClusterIP are balanced like proxied requests, `ip-name-lookup` resolves Service names
//!   to the ClusterIP, and TCP connects to ClusterIPs are allowed. Service traffic is
//!   in-cluster: allowed whatever `wasmctl.dev/egress` says. Nothing else outside the pod is
//!   reachable unless that annotation lists hosts or `*`. No host files are visible except
//!   `emptyDir` volumes (preopened per mount).
//! - Guests run on the process's tokio workers (async wasmtime); the runtime polls I/O every 2
//!   task polls (`event_interval(2)` in `src/main.rs`) so that workers busy with 5 ms guest
//!   slices still accept and answer connections promptly (BENCHMARKS.md, isolation).
//! - stdout/stderr go line by line, timestamped, into a bounded ring per container and a
//!   rotated file ([`logs`]).
//!
//! This module never imports the Service proxy: it meets it only at [`crate::net`].

pub mod cpu;
pub mod egress;
pub mod fields;
pub mod http;
pub mod limits;
pub mod logs;
pub mod pod;
pub mod reach;
pub mod sockets;
pub mod state;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::error::Context as _;
use wasmtime::Result;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::net::{LocalEndpoint, LocalEndpoints, ServiceRouter};
use pod::PodSandbox;
use state::GuestState;

/// How often the epoch advances: the CPU accounting quantum and the longest a spinning guest
/// runs before it yields its thread to other tasks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Settings of the agent's one engine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached (`<dir>/<digest>-<engine hash>.cwasm`).
    pub cache_dir: PathBuf,
    /// Concurrent instances (live Stores) the pooling allocator reserves slots for.
    pub instance_slots: u32,
    /// Largest linear memory one instance may have, whatever the pod's limit says.
    pub max_instance_memory: usize,
    /// The node's own addresses: never egress for a pod ([`reach::never_egress`]).
    pub node_ips: Vec<std::net::IpAddr>,
    /// CPU-bound guests that may run at once on the node ([`cpu`]; `--guest-cpu-slots`).
    pub guest_cpu_slots: usize,
    /// Sockets all guests of the node may hold at once (`--max-guest-sockets`).
    pub max_guest_sockets: usize,
}

/// What a component is, told from its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// Exports `wasi:http/incoming-handler`: served per request, in-process.
    Http,
    /// Exports `wasi:cli/run`: a long-running worker or a run-to-completion job.
    Command,
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComponentKind::Http => "wasi:http/proxy",
            ComponentKind::Command => "wasi:cli/command",
        })
    }
}

/// A compiled, linked, pre-instantiated component, shared by every container that runs the
/// same module digest.
pub struct LoadedComponent {
    pub digest: String,
    pub kind: ComponentKind,
    pub pre: InstancePre<GuestState>,
    /// Present for [`ComponentKind::Http`].
    pub proxy: Option<ProxyPre<GuestState>>,
}

/// Why a module could not become a runnable component: shown as the container's waiting
/// reason, never fatal to the agent.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly component (a core module? build for wasm32-wasip2): {0}")]
    NotAComponent(String),
    #[error("invalid WebAssembly component: {0}")]
    Invalid(String),
    #[error(
        "the component exports neither wasi:http/incoming-handler nor wasi:cli/run (exports: {0})"
    )]
    UnknownWorld(String),
    #[error("the component imports something this node does not provide: {0}")]
    Link(String),
    #[error("compile cache: {0}")]
    Cache(String),
}

/// The agent's wasmtime runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    cache_dir: PathBuf,
    engine_hash: String,
    loaded: Mutex<HashMap<String, Weak<LoadedComponent>>>,
    /// Serialises compiles: two replicas of a new module compile it once.
    compile_lock: tokio::sync::Mutex<()>,
    ticker_stop: Arc<AtomicBool>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Every live sandbox of this node by pod IP (the proxy's in-process path).
    pub pods: Arc<PodDirectory>,
    node_ips: Arc<[std::net::IpAddr]>,
    /// Service routing for outgoing traffic of pods (set once when the agent starts).
    router: OnceLock<Arc<dyn ServiceRouter>>,
    /// Who may run CPU-bound guest code right now ([`cpu`]).
    cpu_gate: Arc<cpu::CpuGate>,
    /// The sockets of all pods together ([`reach::NodeSockets`]).
    node_sockets: Arc<reach::NodeSockets>,
}

/// The node's pod IP → sandbox map: how the proxy and in-pod service routing find an endpoint
/// that runs on this node, to serve it in-process (the proxy sees it as
/// [`LocalEndpoints`]). Sandboxes register themselves when built
/// ([`PodSandbox::new`]) and leave when dropped.
#[derive(Default)]
pub struct PodDirectory {
    pods: RwLock<HashMap<Ipv4Addr, Weak<PodSandbox>>>,
}

impl PodDirectory {
    /// The live sandbox with pod IP `ip`.
    pub fn get(&self, ip: Ipv4Addr) -> Option<Arc<PodSandbox>> {
        self.pods
            .read()
            .expect("pods lock")
            .get(&ip)
            .and_then(Weak::upgrade)
    }

    pub(crate) fn insert(&self, sandbox: &Arc<PodSandbox>) {
        self.pods
            .write()
            .expect("pods lock")
            .insert(sandbox.ip, Arc::downgrade(sandbox));
    }

    /// Removes `ip` if it still maps to the sandbox at `ptr` (a pod IP may already have been
    /// handed to a newer pod).
    pub(crate) fn remove(&self, ip: Ipv4Addr, ptr: *const PodSandbox) {
        let mut pods = self.pods.write().expect("pods lock");
        if pods.get(&ip).is_some_and(|w| w.as_ptr() == ptr) {
            pods.remove(&ip);
        }
    }
}

impl LocalEndpoints for PodDirectory {
    fn endpoint(&self, ip: Ipv4Addr) -> Option<Arc<dyn LocalEndpoint>> {
        self.get(ip).map(|p| p as Arc<dyn LocalEndpoint>)
    }
}

impl Runtime {
    pub fn new(cfg: &RuntimeConfig) -> Result<Arc<Runtime>> {
        let mut pool = PoolingAllocationConfig::new();
        let slots = cfg.instance_slots.max(16);
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(8))
            .total_stacks(slots)
            .max_core_instances_per_component(32)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size(cfg.max_instance_memory)
            .max_unused_warm_slots(slots.min(256));
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .memory_init_cow(true)
            .wasm_component_model(true);
        let engine = Engine::new(&config).context("creating the wasmtime engine")?;

        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .context("linking WASI p2 into the engine")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .context("linking wasi:http into the engine")?;
        sockets::add_to_linker(&mut linker).context("linking pod-loopback wasi:sockets")?;
        fields::add_to_linker(&mut linker).context("linking charged wasi:http fields")?;

        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        cfg.max_instance_memory.hash(&mut h);
        let engine_hash = format!("{:016x}", h.finish());
        std::fs::create_dir_all(&cfg.cache_dir)
            .with_context(|| format!("creating {}", cfg.cache_dir.display()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let cpu_gate = cpu::CpuGate::new(cfg.guest_cpu_slots);
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let gate = cpu_gate.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                        gate.reap();
                    }
                })
                .context("starting the epoch ticker")?
        };
        Ok(Arc::new(Runtime {
            engine,
            linker,
            cache_dir: cfg.cache_dir.clone(),
            engine_hash,
            loaded: Mutex::new(HashMap::new()),
            compile_lock: tokio::sync::Mutex::new(()),
            ticker_stop,
            ticker: Mutex::new(Some(ticker)),
            pods: Arc::new(PodDirectory::default()),
            node_ips: Arc::from(cfg.node_ips.clone()),
            router: OnceLock::new(),
            cpu_gate,
            node_sockets: reach::NodeSockets::new(cfg.max_guest_sockets),
        }))
    }

    /// Installs the node's service router (once; later calls are ignored).
    pub fn set_router(&self, router: Arc<dyn ServiceRouter>) {
        let _ = self.router.set(router);
    }

    /// The node's service router, once the agent has installed it.
    pub fn router(&self) -> Option<&Arc<dyn ServiceRouter>> {
        self.router.get()
    }

    /// The node-wide socket budget every pod's sockets also count against.
    pub fn node_sockets(&self) -> &Arc<reach::NodeSockets> {
        &self.node_sockets
    }

    /// The node's CPU gate: every Store's epoch callback goes through it.
    pub fn cpu_gate(&self) -> &Arc<cpu::CpuGate> {
        &self.cpu_gate
    }

    /// The node's own addresses (never egress).
    pub fn node_ips(&self) -> Arc<[std::net::IpAddr]> {
        self.node_ips.clone()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops the epoch ticker (guests still running stop advancing their CPU accounting).
    pub fn shutdown(&self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.lock().expect("ticker lock").take() {
            let _ = t.join();
        }
    }

    /// Returns the loaded component for `digest`, compiling (or reading the compile cache)
    /// only if no live container uses it already. `module` is the verified module file.
    pub async fn load(
        self: &Arc<Self>,
        digest: &str,
        module: &Path,
    ) -> Result<Arc<LoadedComponent>, LoadError> {
        if let Some(c) = self.cached(digest) {
            return Ok(c);
        }
        let _guard = self.compile_lock.lock().await;
        if let Some(c) = self.cached(digest) {
            return Ok(c);
        }
        let this = self.clone();
        let digest_owned = digest.to_string();
        let module = module.to_path_buf();
        let loaded =
            tokio::task::spawn_blocking(move || this.load_blocking(&digest_owned, &module))
                .await
                .map_err(|e| LoadError::Invalid(format!("compiler task failed: {e}")))??;
        let loaded = Arc::new(loaded);
        self.loaded
            .lock()
            .expect("loaded lock")
            .insert(digest.to_string(), Arc::downgrade(&loaded));
        Ok(loaded)
    }

    fn cached(&self, digest: &str) -> Option<Arc<LoadedComponent>> {
        let mut map = self.loaded.lock().expect("loaded lock");
        map.retain(|_, w| w.strong_count() > 0);
        map.get(digest).and_then(Weak::upgrade)
    }

    fn cache_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.cache_dir
            .join(format!("{hex}-{}.cwasm", self.engine_hash))
    }

    fn load_blocking(&self, digest: &str, module: &Path) -> Result<LoadedComponent, LoadError> {
        let cached = self.cache_path(digest);
        let component = match self.read_cache(&cached) {
            Some(c) => c,
            None => {
                let bytes = std::fs::read(module)
                    .map_err(|e| LoadError::Cache(format!("reading {}: {e}", module.display())))?;
                if !is_component(&bytes) {
                    return Err(LoadError::NotAComponent(describe_header(&bytes)));
                }
                let component = Component::new(&self.engine, &bytes)
                    .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                self.write_cache(&cached, &component);
                component
            }
        };
        let kind = kind_of(&self.engine, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let proxy = match kind {
            ComponentKind::Http => {
                Some(ProxyPre::new(pre.clone()).map_err(|e| LoadError::Link(format!("{e:#}")))?)
            }
            ComponentKind::Command => None,
        };
        Ok(LoadedComponent {
            digest: digest.to_string(),
            kind,
            pre,
            proxy,
        })
    }

    /// Reads a compiled component this agent wrote itself. A stale or damaged file is removed
    /// and recompiled.
    fn read_cache(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the cache directory is private to this agent (created under its data dir),
        // files are written whole by `write_cache` (temp file + rename) from
        // `Component::serialize` of this engine configuration, and the file name carries the
        // engine's compatibility hash; wasmtime additionally checks the header and version.
        #[allow(unsafe_code)]
        let res = unsafe { Component::deserialize_file(&self.engine, path) };
        match res {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable compile cache entry");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    fn write_cache(&self, path: &Path, component: &Component) {
        let res = match component.serialize() {
            Ok(bytes) => {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path))
            }
            Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
        };
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "could not write the compile cache");
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `\0asm` followed by the component-model layer/version (`0d 00 01 00`).
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

fn describe_header(bytes: &[u8]) -> String {
    if bytes.len() >= 8 && bytes[..4] == *b"\0asm" {
        if bytes[4..8] == [1, 0, 0, 0] {
            "this is a core WebAssembly module, not a component".into()
        } else {
            format!("unknown WebAssembly version/layer {:02x?}", &bytes[4..8])
        }
    } else {
        let n = bytes.len().min(8);
        format!(
            "the file does not start with the WebAssembly magic (first bytes {:02x?}, {} bytes in all)",
            &bytes[..n],
            bytes.len()
        )
    }
}

/// Tells the world from the exports: `wasi:http/incoming-handler@0.2.*` or `wasi:cli/run@0.2.*`.
fn kind_of(engine: &Engine, component: &Component) -> Result<ComponentKind, LoadError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    let mut http = false;
    let mut run = false;
    for (name, item) in ty.exports(engine) {
        if matches!(item.ty, ComponentItem::ComponentInstance(_)) {
            http |= name.starts_with("wasi:http/incoming-handler@0.2");
            run |= name.starts_with("wasi:cli/run@0.2");
        }
        names.push(name.to_string());
    }
    if http {
        Ok(ComponentKind::Http)
    } else if run {
        Ok(ComponentKind::Command)
    } else {
        Err(LoadError::UnknownWorld(names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert!(is_component(b"\0asm\x0d\x00\x01\x00rest"));
        assert!(!is_component(b"\0asm\x01\x00\x00\x00"));
        assert!(describe_header(b"\0asm\x01\x00\x00\x00").contains("core WebAssembly module"));
        assert!(describe_header(b"GIF89a").contains("magic"));
    }
}
