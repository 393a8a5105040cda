//! The controller manager: level-triggered controllers over one shared [`Cache`].
//!
//! Each controller is a pure planning function (unit-tested without I/O) plus a thin
//! [`Reconciler`] that reads the cache, writes through [`Objects`] and reports when to look
//! again. [`run`] drives it from a deduplicated [`WorkQueue`] fed by cache changes and a
//! periodic resync; nothing is remembered between reconciles except what is in the store, so
//! a restarted server picks up exactly where the old one stopped (the first list enqueues
//! every object). Controllers act only while this server is the Raft leader.

pub mod cache;
pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod nodelifecycle;
pub mod podgc;
pub mod queue;
pub mod replicaset;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wasmctl_api::registry::{self, ResourceInfo};

pub use cache::{Cache, Change};
pub use queue::WorkQueue;

use crate::error::ApiError;
use crate::objects::Objects;

/// How long a reconcile waits for the cache to show its own writes.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Settings of the controller manager (`wasmctl server` flags).
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Every object of a controller's kind is reconciled at least this often.
    pub resync: Duration,
    /// A node whose Lease is not renewed for this long becomes `Ready=Unknown` and is tainted
    /// unreachable (`--node-monitor-grace-period`).
    pub node_monitor_grace_period: Duration,
    /// How long a node must stay missing before PodGC deletes the pods bound to it (kube's
    /// 40 s quarantine; `--pod-gc-quarantine`).
    pub pod_gc_quarantine: Duration,
    /// Terminated pods PodGC keeps; 0 keeps them all (`--terminated-pod-gc-threshold`).
    pub terminated_pod_gc_threshold: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            resync: Duration::from_secs(30),
            node_monitor_grace_period: Duration::from_secs(40),
            pod_gc_quarantine: podgc::DEFAULT_QUARANTINE,
            terminated_pod_gc_threshold: podgc::DEFAULT_TERMINATED_THRESHOLD,
        }
    }
}

/// What a controller needs: the store's objects, the cache, and the revision of its last
/// write (so the next reconcile sees it).
#[derive(Clone)]
pub struct Ctx {
    pub objects: Objects,
    pub cache: Cache,
    written: Arc<AtomicU64>,
}

impl Ctx {
    pub fn new(objects: Objects, cache: Cache) -> Self {
        Ctx {
            objects,
            cache,
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records the revision of a written object (from its `resourceVersion`).
    pub fn wrote(&self, obj: &Value) {
        if let Some(rv) = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
        {
            self.written.fetch_max(rv, Ordering::AcqRel);
        }
    }

    /// Waits until the cache reflects every write this controller made.
    pub async fn catch_up(&self) {
        let rev = self.written.load(Ordering::Acquire);
        if rev > self.cache.revision() && !self.cache.wait_for(rev, CATCH_UP).await {
            tracing::warn!(
                revision = rev,
                "controller cache did not catch up with a write"
            );
        }
    }

    pub async fn create(
        &self,
        info: &ResourceInfo,
        ns: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let v = self.objects.create(info, Some(ns), body).await?;
        self.wrote(&v);
        Ok(v)
    }

    pub async fn update(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        mutate: impl FnMut(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let v = self
            .objects
            .guaranteed_update(info, ns, name, None, mutate)
            .await?;
        self.wrote(&v);
        Ok(v)
    }

    pub async fn patch_status(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let v = self
            .objects
            .patch(
                info,
                ns,
                name,
                serde_json::json!({ "status": status }),
                crate::objects::Subresource::Status,
            )
            .await?;
        self.wrote(&v);
        Ok(v)
    }

    /// Deletes; "not found" counts as done.
    pub async fn delete(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        opts: &wasmctl_api::meta::DeleteOptions,
    ) -> Result<(), ApiError> {
        match self.objects.delete(info, ns, name, opts).await {
            Ok(_) => {
                // A deletion's revision is not in the returned object; the store's current
                // revision is at least it.
                let rev = self.objects.store().revision();
                self.written.fetch_max(rev, Ordering::AcqRel);
                Ok(())
            }
            Err(ApiError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The outcome of a conditional write that may be moot: the object is gone (`NotFound`), or
/// the mutation declined because the object changed meanwhile (the closures return
/// `BadRequest` for that, e.g. "no longer an orphan"); either way there is nothing to do.
pub(crate) fn ignore_gone(r: Result<Value, ApiError>) -> Result<(), ApiError> {
    match r {
        Ok(_) | Err(ApiError::NotFound { .. }) | Err(ApiError::BadRequest(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// One controller: reconciles one object key (a store key of its primary kind).
pub trait Reconciler: Send + Sync + 'static {
    const NAME: &'static str;
    /// The keys (a store prefix: the controller's kind) reconciled on every resync; `None`
    /// for controllers driven by changes alone.
    fn resync_prefix(&self) -> Option<String>;
    /// Brings the world one step closer to `key`'s desired state; `Ok(Some(d))` asks to be
    /// called again after `d` even if nothing changes (time-based conditions).
    fn reconcile(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Duration>, ApiError>> + Send;
}

/// Runs `r` until shutdown: waits for the cache's first list, then takes keys from `queue`.
pub async fn run<R: Reconciler>(
    r: R,
    ctx: Ctx,
    queue: WorkQueue,
    cfg: ControllerConfig,
    shutdown: CancellationToken,
) {
    if !ctx.cache.wait_synced(&shutdown).await {
        return;
    }
    let prefix = r.resync_prefix();
    let mut resync = tokio::time::interval(cfg.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let key = tokio::select! {
            _ = resync.tick() => {
                for key in prefix.iter().flat_map(|p| ctx.cache.keys(p)) {
                    queue.add(&key);
                }
                continue;
            }
            key = queue.next(&shutdown) => match key {
                Some(k) => k,
                None => return,
            },
        };
        if !ctx.objects.store().is_leader() {
            queue.add_after(&key, Duration::from_secs(1));
            continue;
        }
        match r.reconcile(&key).await {
            Ok(again) => {
                queue.forget(&key);
                if let Some(d) = again {
                    queue.add_after(&key, d);
                }
            }
            Err(e) => {
                let delay = queue.retry(&key);
                tracing::info!(controller = R::NAME, %key, error = %e, retry_in = ?delay, "reconcile failed");
            }
        }
        ctx.catch_up().await;
    }
}

fn info(api_version: &str, kind: &str) -> &'static ResourceInfo {
    registry::by_kind(api_version, kind).expect("kind is registered")
}

pub fn pods() -> &'static ResourceInfo {
    info("v1", "Pod")
}
pub fn replicasets() -> &'static ResourceInfo {
    info("apps/v1", "ReplicaSet")
}
pub fn deployments() -> &'static ResourceInfo {
    info("apps/v1", "Deployment")
}

/// The key of the object a change's controller ownerReference names, if it is of `owner`.
pub fn controller_key(obj: &Value, owner: &ResourceInfo) -> Option<String> {
    let ns = obj["metadata"]["namespace"].as_str()?;
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == Value::Bool(true))
        .filter(|o| o["kind"] == owner.kind)
        .and_then(|o| o["name"].as_str())
        .map(|name| owner.key(ns, name))
}

/// Starts the cache and every controller; the returned set finishes after `shutdown`.
pub fn start(objects: Objects, cfg: ControllerConfig, shutdown: CancellationToken) -> JoinSet<()> {
    let cache = Cache::new(objects.store().clone());
    let mut tasks = JoinSet::new();

    let rs_queue = WorkQueue::new();
    replicaset::watch(&cache, &rs_queue);
    let d_queue = WorkQueue::new();
    deployment::watch(&cache, &d_queue);
    let gc_queue = WorkQueue::new();
    gc::watch(&cache, &gc_queue);

    let ctx = Ctx::new(objects.clone(), cache.clone());
    tasks.spawn(run(
        replicaset::ReplicaSetController::new(ctx.clone()),
        ctx,
        rs_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    let ctx = Ctx::new(objects.clone(), cache.clone());
    tasks.spawn(run(
        deployment::DeploymentController::new(ctx.clone()),
        ctx,
        d_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    let nl_queue = WorkQueue::new();
    nodelifecycle::watch(&cache, &nl_queue);
    let ctx = Ctx::new(objects.clone(), cache.clone());
    tasks.spawn(run(
        nodelifecycle::NodeLifecycleController::new(ctx.clone(), cfg.node_monitor_grace_period),
        ctx,
        nl_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    let ep_queue = WorkQueue::new();
    endpoints::watch(&cache, &ep_queue);
    let ctx = Ctx::new(objects.clone(), cache.clone());
    tasks.spawn(run(
        endpoints::EndpointsController::new(ctx.clone()),
        ctx,
        ep_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    let ctx = Ctx::new(objects.clone(), cache.clone());
    tasks.spawn(run(
        gc::GarbageCollector::new(ctx.clone()),
        ctx,
        gc_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    let pgc_queue = WorkQueue::new();
    podgc::watch(&cache, &pgc_queue);
    // Its one key is queued from the start, then every GC_PERIOD (and on the changes above).
    pgc_queue.add(podgc::KEY);
    let ctx = Ctx::new(objects.clone(), cache.clone());
    let settings = podgc::Settings {
        quarantine: cfg.pod_gc_quarantine,
        terminated_threshold: cfg.terminated_pod_gc_threshold,
    };
    tasks.spawn(run(
        podgc::PodGc::new(ctx.clone(), settings),
        ctx,
        pgc_queue,
        cfg.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(cache.run(shutdown));
    tasks
}
