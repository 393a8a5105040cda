//! The controller manager: level-triggered controllers over one shared [`Cache`].
//!
//! Each controller is a pure planning function (unit-tested without I/O) plus a thin
//! [`Reconciler`] that reads the cache, writes through [`Objects`] and reports when to look
//! again. [`run`] drives it from a deduplicated [`WorkQueue`] fed by cache changes and a
//! periodic resync; nothing is remembered between reconciles except what is in the store, so
//! a restarted server picks up exactly where the old one stopped (the first list enqueues
//! every object). Controllers act only while this server is the Raft leader.
//!
//! A reconcile starts only once the cache shows the controller's own last write
//! ([`Ctx::catch_up`]); if it does not within [`CATCH_UP`], the key is put back with the
//! queue's back-off instead of being reconciled on the stale view.

pub mod apiserver_endpoints;
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
    /// How long [`Ctx::catch_up`] waits ([`CATCH_UP`]; shorter in tests).
    catch_up: Duration,
}

impl Ctx {
    pub fn new(objects: Objects, cache: Cache) -> Self {
        Ctx {
            objects,
            cache,
            written: Arc::new(AtomicU64::new(0)),
            catch_up: CATCH_UP,
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

    /// Waits (at most [`CATCH_UP`]) until the cache reflects every write this controller
    /// made; false if it still does not.
    pub async fn catch_up(&self) -> bool {
        let rev = self.written.load(Ordering::Acquire);
        rev <= self.cache.revision() || self.cache.wait_for(rev, self.catch_up).await
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

    /// Deletes `name` only while it is still the object with `uid` (`preconditions.uid`, as
    /// Kubernetes' controllers delete), so that an object re-created under the same name since
    /// the cache saw the old one is never deleted by mistake. Gone or replaced counts as done.
    pub async fn delete_uid(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        uid: &str,
        opts: wasmctl_api::meta::DeleteOptions,
    ) -> Result<(), ApiError> {
        let mut opts = opts;
        opts.preconditions = Some(wasmctl_api::meta::Preconditions {
            uid: Some(uid.to_string()),
            resource_version: opts.preconditions.and_then(|p| p.resource_version),
        });
        match self.delete(info, ns, name, &opts).await {
            Err(conflict @ ApiError::Conflict { .. }) => {
                match self.objects.get(info, ns, name).await {
                    Ok(v) if v["metadata"]["uid"] == uid => Err(conflict),
                    Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            other => other,
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
        // Never decide on a view that misses this controller's own writes: it would act on
        // them again (create a second pod, delete one more).
        if !ctx.catch_up().await {
            let delay = queue.retry(&key);
            tracing::warn!(controller = R::NAME, %key, revision = ctx.written.load(Ordering::Acquire),
                cache = ctx.cache.revision(), retry_in = ?delay,
                "the cache has not caught up with this controller's writes; requeued");
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;
    use wasmctl_store::{Store, StoreConfig};

    use super::*;

    /// A store with the system namespaces, and its objects.
    pub(crate) async fn open(dir: &std::path::Path) -> (Store, Objects) {
        let mut cfg = StoreConfig::new(dir);
        cfg.fsync = false;
        let store = Store::open(cfg).await.expect("store opens");
        let objects = Objects::new(store.clone(), CancellationToken::new());
        objects.bootstrap().await.expect("bootstrap");
        (store, objects)
    }

    /// A cache that followed the store up to now and then stopped (its view stays as it was).
    pub(crate) async fn stale_cache(store: &Store) -> Cache {
        let cache = Cache::new(store.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(cache.clone().run(stop.clone()));
        assert!(cache.wait_synced(&CancellationToken::new()).await);
        stop.cancel();
        task.await.expect("cache task");
        cache
    }

    pub(crate) async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct Counting(Arc<AtomicUsize>);

    impl Reconciler for Counting {
        const NAME: &'static str = "counting";
        fn resync_prefix(&self) -> Option<String> {
            None
        }
        async fn reconcile(&self, _key: &str) -> Result<Option<Duration>, ApiError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
    }

    /// Issue 11, item 21: after the catch-up timeout a controller went on to reconcile on a
    /// cache that missed its own write; it must put the key back (with back-off) instead, and
    /// reconcile it once the cache has caught up.
    #[tokio::test]
    async fn a_cache_behind_the_controllers_writes_requeues_instead_of_reconciling() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        let cache = stale_cache(&store).await;
        let mut ctx = Ctx::new(objects.clone(), cache.clone());
        ctx.catch_up = Duration::from_millis(100);
        // A write the stopped cache never sees.
        let ns = registry::resolve("namespaces").expect("served");
        let written = objects
            .create(ns, None, json!({"metadata": {"name": "unseen"}}))
            .await
            .expect("created");
        ctx.wrote(&written);

        let calls = Arc::new(AtomicUsize::new(0));
        let queue = WorkQueue::new();
        queue.add("k");
        let stop = CancellationToken::new();
        let runner = tokio::spawn(run(
            Counting(calls.clone()),
            ctx,
            queue.clone(),
            ControllerConfig::default(),
            stop.clone(),
        ));
        until("the key is requeued twice", || queue.failures("k") >= 2).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "reconciled on a stale cache"
        );
        assert_eq!(queue.len(), 1, "the key waits for its retry");

        // The cache catches up: the key is reconciled.
        let resume = CancellationToken::new();
        let follow = tokio::spawn(cache.clone().run(resume.clone()));
        until("the key is reconciled", || {
            calls.load(Ordering::SeqCst) == 1
        })
        .await;
        stop.cancel();
        resume.cancel();
        runner.await.expect("controller");
        follow.await.expect("cache");
    }
}
