//! Pod workers (the kubelet's `podWorkers`): one task per pod bound to this node. A worker
//! builds the pod's sandbox, runs one runner per container, writes the pod's status when it
//! changes, and on deletion drains and stops the pod, then removes it from the API.
//!
//! A worker allocates the pod IP and builds the sandbox; one runner per container pulls the
//! module (tag resolved by the API server, blob fetched by digest and verified, or an OCI
//! artifact; [`crate::images`]), loads it (memory map of the compile cache, or a compile), and
//! runs it: commands in their own Store; HTTP components by binding their ports and
//! registering routes. Runners report state changes and the worker PATCHes
//! `pods/{name}/status` (phase, conditions, containerStatuses, podIP) when it changed. Exits
//! restart per `restartPolicy` with Kubernetes' back-off (0, base, 2×base … 5 min; reset after
//! 10 min running) shown as `CrashLoopBackOff`; liveness failures restart the component;
//! readiness drives `Ready`. Deletion: the API sets `deletionTimestamp`; the worker stops
//! accepting connections, lets in-flight requests finish within the grace period (commands are
//! stopped at once — WASI 0.2 has no signals), kills the rest, then deletes the pod with grace
//! 0 and a uid precondition. An emptyDir over its bound evicts the pod: stopped at once,
//! volumes removed, `Failed`/`Evicted`, never restarted ([`crate::volumes`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
    Pod, PodStatus, Probe,
};
use wasmctl_api::meta::IntOrString;
use wasmctl_api::Time;

use crate::runtime::logs::ContainerLog;
use crate::runtime::pod::{ContainerConfig, Egress, Exit, HttpRoute, Mount, PodSandbox};
use crate::runtime::reach::{PodNet, Transport};
use crate::runtime::{limits::PodBudget, ComponentKind, LoadedComponent};
use crate::status::{self, restart_delay, waiting, RestartPolicy, StatusInput};
use crate::AgentCtx;

/// Annotation listing what a pod may reach outside itself: `*` or `host,host,...`.
pub const EGRESS_ANNOTATION: &str = "wasmctl.dev/egress";

/// The identity of a running pod.
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodRef {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    fn path(&self) -> String {
        format!("/api/v1/namespaces/{}/pods/{}", self.namespace, self.name)
    }
    fn dir_name(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.name, self.uid)
    }
}

/// How long a new pod may go without a status write while its containers are being created.
const FIRST_REPORT: Duration = Duration::from_millis(250);

/// What the worker learns from the API: the latest object, or `None` once it is gone.
pub type PodUpdates = watch::Receiver<Option<Pod>>;

/// State a container runner shares with its pod worker.
struct Shared {
    status: Mutex<ContainerStatus>,
    changed: Arc<Notify>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ContainerStatus)) {
        f(&mut self.status.lock().expect("status lock"));
        self.changed.notify_one();
    }
    fn snapshot(&self) -> ContainerStatus {
        self.status.lock().expect("status lock").clone()
    }
}

/// Runs one pod until it is deleted (or the agent stops, `shutdown`).
pub async fn run_pod(ctx: Arc<AgentCtx>, mut updates: PodUpdates, shutdown: CancellationToken) {
    let Some(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let pref = PodRef {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    let prev_status = pod.status.clone().unwrap_or_default();
    let finished = matches!(prev_status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if finished {
        // Nothing runs for a finished pod; only its deletion is ours to complete.
        wait_for_deletion(&ctx, &pref, &mut updates, &shutdown).await;
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        finalize_delete(&ctx, &pref).await;
        return;
    }
    let allocated = ctx
        .ips
        .lock()
        .expect("ip lock")
        .allocate(&pref.uid, prev_status.pod_ip.as_deref());
    let ip = match allocated {
        Some(ip) => ip,
        None => {
            reject(
                &ctx,
                &pref,
                "OutOfPodIPs",
                "the node's pod CIDR is exhausted",
            )
            .await;
            wait_for_deletion(&ctx, &pref, &mut updates, &shutdown).await;
            return;
        }
    };
    tracing::info!(pod = %pref.key(), ip = %ip, "starting pod");
    let worker = PodWorker::start(ctx.clone(), &pref, &pod, ip, prev_status);
    let outcome = worker.run(&mut updates, &shutdown).await;
    ctx.ips.lock().expect("ip lock").release(&pref.uid);
    match outcome {
        Outcome::Deleted => finalize_delete(&ctx, &pref).await,
        // Failed for good (not restarted); only its deletion is left to complete.
        Outcome::Evicted(_) => wait_for_deletion(&ctx, &pref, &mut updates, &shutdown).await,
        Outcome::Gone => {}
    }
}

enum Outcome {
    /// The API asked for deletion and the pod has stopped.
    Deleted,
    /// The object vanished from the API (force delete) or the agent is stopping.
    Gone,
    /// An emptyDir went over its bound (volumes.rs): the message of the eviction.
    Evicted(String),
}

struct PodWorker {
    ctx: Arc<AgentCtx>,
    pref: PodRef,
    sandbox: Arc<PodSandbox>,
    containers: Vec<Arc<Shared>>,
    runners: tokio::task::JoinSet<()>,
    stop: CancellationToken,
    changed: Arc<Notify>,
    policy: RestartPolicy,
    ip: Ipv4Addr,
    start_time: Time,
    last_status: PodStatus,
    last_written: Option<serde_json::Value>,
    dir: PathBuf,
    logs: Vec<Arc<ContainerLog>>,
    /// The pod's emptyDirs, measured by the node's volume monitor.
    volumes: crate::volumes::Watch,
}

impl PodWorker {
    fn start(
        ctx: Arc<AgentCtx>,
        pref: &PodRef,
        pod: &Pod,
        ip: Ipv4Addr,
        prev: PodStatus,
    ) -> PodWorker {
        let spec = &pod.spec;
        let policy = RestartPolicy::parse(spec.restart_policy.as_deref());
        let memory = Some(pod_memory_limit(
            &spec.containers,
            ctx.cfg.sandbox.default_memory_limit,
        ));
        let cpu =
            sum_limits(&spec.containers, "cpu", |q| q.cpu_millis().ok()).map(|m| m.max(1) as u64);
        let budget = PodBudget::new(memory, cpu);
        let egress = pod
            .metadata
            .annotations
            .get(EGRESS_ANNOTATION)
            .map(|s| Egress::parse(s))
            .unwrap_or_default();
        let sandbox = PodSandbox::new(
            pref.key(),
            ip,
            budget,
            ctx.runtime.clone(),
            ctx.cfg.sandbox,
            egress,
        );
        let dir = ctx.pods_dir.join(pref.dir_name());
        let _ = std::fs::create_dir_all(&dir);
        let hostname = spec.hostname.clone().unwrap_or_else(|| pref.name.clone());
        let changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let mut runners = tokio::task::JoinSet::new();
        let mut containers = Vec::new();
        let mut logs = Vec::new();
        let volumes_dir = crate::volumes::volumes_dir(&dir);
        let volumes: HashMap<String, PathBuf> = spec
            .volumes
            .iter()
            .filter(|v| v.empty_dir.is_some())
            .map(|v| (v.name.clone(), volumes_dir.join(&v.name)))
            .collect();
        for p in volumes.values() {
            let _ = std::fs::create_dir_all(p);
        }
        let volume_watch = ctx.volumes.watch(
            &pref.uid,
            crate::volumes::empty_dirs(spec, &dir, ctx.volumes.limits()),
        );
        for c in &spec.containers {
            let prev_cs = prev.container_statuses.iter().find(|s| s.name == c.name);
            let restart_count = prev_cs.map_or(0, |s| s.restart_count)
                + i32::from(
                    prev_cs
                        .is_some_and(|s| s.state.as_ref().is_some_and(|st| st.running.is_some())),
                );
            let shared = Arc::new(Shared {
                status: Mutex::new(ContainerStatus {
                    name: c.name.clone(),
                    ready: false,
                    restart_count,
                    image: c.image.clone(),
                    image_id: None,
                    container_id: None,
                    started: Some(false),
                    state: Some(waiting("ContainerCreating", None)),
                    last_state: prev_cs.and_then(|s| s.last_state.clone()),
                }),
                changed: changed.clone(),
            });
            let log = ctx
                .logs
                .open(pref, &c.name, dir.join(format!("{}.log", c.name)));
            logs.push(log.clone());
            let mut env: Vec<(String, String)> = vec![("HOSTNAME".into(), hostname.clone())];
            env.extend(
                c.env
                    .iter()
                    .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())),
            );
            let mut args = vec![c.name.clone()];
            args.extend(c.command.iter().skip(1).cloned());
            args.extend(c.args.iter().cloned());
            let mounts = c
                .volume_mounts
                .iter()
                .filter_map(|m| {
                    volumes.get(&m.name).map(|host| Mount {
                        host: host.clone(),
                        guest: m.mount_path.clone(),
                        read_only: m.read_only.unwrap_or(false),
                    })
                })
                .collect();
            let config = Arc::new(ContainerConfig {
                name: c.name.clone(),
                env,
                args,
                mounts,
                log,
            });
            let runner = Runner {
                ctx: ctx.clone(),
                pod_key: pref.key(),
                sandbox: sandbox.clone(),
                spec: c.clone(),
                config,
                shared: shared.clone(),
                policy,
                stop: stop.clone(),
            };
            runners.spawn(runner.run());
            containers.push(shared);
        }
        let start_time = prev.start_time.unwrap_or_else(Time::now);
        PodWorker {
            ctx,
            pref: PodRef {
                namespace: pref.namespace.clone(),
                name: pref.name.clone(),
                uid: pref.uid.clone(),
            },
            sandbox,
            containers,
            runners,
            stop,
            changed,
            policy,
            ip,
            start_time,
            last_status: prev,
            last_written: None,
            dir,
            logs,
            volumes: volume_watch,
        }
    }

    async fn run(mut self, updates: &mut PodUpdates, shutdown: &CancellationToken) -> Outcome {
        // The first status is written when a container changes state (usually Running, a
        // few ms in), or after FIRST_REPORT if pulls take longer: one write per start.
        let first_report = tokio::time::sleep(FIRST_REPORT);
        tokio::pin!(first_report);
        let mut reported = false;
        let period = Duration::from_secs(30);
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Outcome::Gone,
                _ = &mut first_report, if !reported => {
                    reported = true;
                    self.write_status().await;
                }
                changed = updates.changed() => {
                    let current = if changed.is_ok() { updates.borrow_and_update().clone() } else { None };
                    match current {
                        None => break Outcome::Gone,
                        Some(p) if p.metadata.deletion_timestamp.is_some() => {
                            let grace = p.metadata.deletion_grace_period_seconds
                                .or(p.spec.termination_grace_period_seconds)
                                .unwrap_or(30)
                                .max(0) as u64;
                            self.terminate(Duration::from_secs(grace)).await;
                            break Outcome::Deleted;
                        }
                        Some(_) => {}
                    }
                }
                message = self.volumes.evicted() => break Outcome::Evicted(message),
                _ = self.changed.notified() => self.write_status().await,
                _ = resync.tick() => { self.last_written = None; self.write_status().await }
                Some(_) = self.runners.join_next(), if !self.runners.is_empty() => self.write_status().await,
            }
        };
        if matches!(outcome, Outcome::Gone | Outcome::Evicted(_)) {
            self.terminate(Duration::ZERO).await;
        }
        if let Outcome::Evicted(message) = &outcome {
            self.report_eviction(message).await;
        }
        for log in &self.logs {
            log.close();
        }
        self.ctx.logs.remove(&self.pref);
        if matches!(outcome, Outcome::Deleted) {
            let _ = tokio::fs::remove_dir_all(&self.dir).await;
        }
        outcome
    }

    /// The rest of the kubelet's `evictPod` once the pod has stopped: its volumes are removed
    /// and its status says `Failed`/`Evicted` and why (retried; it is never restarted).
    async fn report_eviction(&mut self, message: &str) {
        let _ = tokio::fs::remove_dir_all(crate::volumes::volumes_dir(&self.dir)).await;
        let body = json!({ "status": crate::volumes::evicted_status(self.status_now(), message) });
        let path = format!("{}/status", self.pref.path());
        for attempt in 0..10u32 {
            match self.ctx.api.merge_patch(&path, &body).await {
                Ok(_) => return,
                Err(e) if e.is_not_found() => return,
                Err(e) => {
                    tracing::warn!(pod = %self.pref.key(), error = %e, attempt, "writing the eviction failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
                }
            }
        }
    }

    /// Stops the pod: HTTP components stop taking new connections and in-flight requests
    /// get `grace` to finish; command components are stopped at once (WASI 0.2 has no
    /// signals to deliver a SIGTERM with); whatever still runs after `grace` is killed.
    async fn terminate(&mut self, grace: Duration) {
        tracing::info!(pod = %self.pref.key(), ?grace, "stopping pod");
        self.stop.cancel();
        self.sandbox.tasks.close();
        let drained = tokio::time::timeout(grace, async {
            while self.runners.join_next().await.is_some() {}
            self.sandbox.tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::info!(pod = %self.pref.key(), "grace period over; killing what still runs");
        }
        self.sandbox.budget.kill();
        self.sandbox.kill.cancel();
        self.runners.abort_all();
        while self.runners.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sandbox.tasks.wait()).await;
    }

    /// The pod's status as its containers stand now.
    fn status_now(&self) -> PodStatus {
        status::pod_status(StatusInput {
            containers: self.containers.iter().map(|c| c.snapshot()).collect(),
            policy: self.policy,
            pod_ip: Some(self.ip.to_string()),
            host_ip: &self.ctx.cfg.node_ip.to_string(),
            start_time: self.start_time,
            prev: &self.last_status,
            now: Time::now(),
        })
    }

    async fn write_status(&mut self) {
        let st = self.status_now();
        let body = json!({ "status": st });
        if self.last_written.as_ref() == Some(&body) {
            return;
        }
        let path = format!("{}/status", self.pref.path());
        match self.ctx.api.merge_patch(&path, &body).await {
            Ok(_) => {
                self.last_status = st;
                self.last_written = Some(body);
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(pod = %self.pref.key(), error = %e, "writing pod status failed; retrying");
                self.changed.notify_one();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The pod's memory budget: every container's `resources.limits.memory`, or the node's
/// default for one without (a LimitRange-style default, applied by the node: every pod has a
/// budget, so the host memory its guests drive is bounded too).
fn pod_memory_limit(containers: &[Container], default: usize) -> usize {
    containers
        .iter()
        .map(|c| {
            c.resources
                .limits
                .get("memory")
                .and_then(|q| q.bytes().ok())
                .map_or(default, |b| b.max(0) as usize)
        })
        .fold(0usize, usize::saturating_add)
}

fn sum_limits(
    containers: &[Container],
    resource: &str,
    parse: impl Fn(&wasmctl_api::Quantity) -> Option<i64>,
) -> Option<i64> {
    let each: Vec<Option<i64>> = containers
        .iter()
        .map(|c| c.resources.limits.get(resource).and_then(&parse))
        .collect();
    // A pod-level limit exists only if every container has one (as with cgroups).
    if each.iter().all(Option::is_some) && !each.is_empty() {
        Some(each.into_iter().flatten().sum())
    } else {
        None
    }
}

/// Waits (doing nothing) until a finished pod is deleted, then completes the deletion.
async fn wait_for_deletion(
    ctx: &AgentCtx,
    pref: &PodRef,
    updates: &mut PodUpdates,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = updates.changed() => {
                if r.is_err() { return; }
                let deleting = match &*updates.borrow_and_update() {
                    None => return,
                    Some(p) => p.metadata.deletion_timestamp.is_some(),
                };
                if deleting {
                    finalize_delete(ctx, pref).await;
                    return;
                }
            }
        }
    }
}

/// Removes the stopped pod from the API (grace period 0, only this incarnation: uid
/// precondition).
async fn finalize_delete(ctx: &AgentCtx, pref: &PodRef) {
    let opts = json!({
        "kind": "DeleteOptions", "apiVersion": "v1",
        "gracePeriodSeconds": 0,
        "preconditions": { "uid": pref.uid },
    });
    for attempt in 0..5u32 {
        match ctx.api.delete(&pref.path(), Some(&opts)).await {
            Ok(_) => return,
            Err(e) if e.is_not_found() || e.code() == Some(409) => return,
            Err(e) => {
                tracing::warn!(pod = %pref.key(), error = %e, attempt, "completing pod deletion failed");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
}

/// Marks a pod this node cannot run as Failed (the kubelet's admission rejection).
pub async fn reject(ctx: &AgentCtx, pref: &PodRef, reason: &str, message: &str) {
    let body = json!({ "status": { "phase": "Failed", "reason": reason, "message": message } });
    if let Err(e) = ctx
        .api
        .merge_patch(&format!("{}/status", pref.path()), &body)
        .await
    {
        tracing::warn!(pod = %pref.key(), error = %e, "could not reject the pod");
    }
}

/// One container's lifecycle: pull, load, run, probe, restart with back-off.
struct Runner {
    ctx: Arc<AgentCtx>,
    pod_key: String,
    sandbox: Arc<PodSandbox>,
    spec: Container,
    config: Arc<ContainerConfig>,
    shared: Arc<Shared>,
    policy: RestartPolicy,
    stop: CancellationToken,
}

impl Runner {
    async fn run(self) {
        let cfg = &self.ctx.cfg;
        let mut window_restarts: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let component = match self.prepare().await {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err((reason, message)) => {
                    failures += 1;
                    self.shared
                        .update(|s| s.state = Some(waiting(&reason, Some(message.clone()))));
                    let delay = restart_delay(failures, cfg.backoff_base, cfg.backoff_max);
                    let backoff_reason = if reason == "ErrImagePull" {
                        "ImagePullBackOff"
                    } else {
                        reason.as_str()
                    };
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(delay.min(Duration::from_secs(1))) => {}
                    }
                    self.shared.update(|s| {
                        s.state = Some(waiting(
                            backoff_reason,
                            Some(format!("Back-off {}s: {message}", delay.as_secs())),
                        ))
                    });
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(delay.saturating_sub(Duration::from_secs(1))) => {}
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let started_at = Time::now();
            self.shared.update(|s| {
                s.state = Some(ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started_at),
                    }),
                    ..Default::default()
                });
                s.started = Some(true);
                s.ready = self.spec.readiness_probe.is_none();
                s.image_id = Some(component.digest.clone());
                s.container_id = Some(format!("wasmtime://{}/{}", self.pod_key, self.spec.name));
            });
            let exit = self.run_once(&component).await;
            let finished_at = Time::now();
            let terminated = ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: exit.code,
                    signal: None,
                    reason: Some(exit.reason.clone()),
                    message: exit.message.clone(),
                    started_at: Some(started_at),
                    finished_at: Some(finished_at),
                }),
                ..Default::default()
            };
            tracing::info!(pod = %self.pod_key, container = %self.spec.name, code = exit.code, reason = %exit.reason, "container exited");
            if self.stop.is_cancelled() {
                self.shared.update(|s| {
                    s.ready = false;
                    s.state = Some(terminated);
                });
                return;
            }
            if !self.policy.restarts(exit.code) {
                self.shared.update(|s| {
                    s.ready = false;
                    s.started = Some(false);
                    s.state = Some(terminated);
                });
                return;
            }
            if started.elapsed() >= cfg.backoff_reset {
                window_restarts = 0;
            }
            window_restarts += 1;
            let delay = restart_delay(window_restarts - 1, cfg.backoff_base, cfg.backoff_max);
            self.shared.update(|s| {
                s.ready = false;
                s.started = Some(false);
                s.last_state = Some(terminated.clone());
                s.state = Some(if delay.is_zero() {
                    terminated
                } else {
                    waiting(
                        "CrashLoopBackOff",
                        Some(format!(
                            "back-off {}s restarting failed container={} pod={}",
                            delay.as_secs(),
                            self.spec.name,
                            self.pod_key
                        )),
                    )
                });
            });
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            self.shared.update(|s| s.restart_count += 1);
        }
    }

    /// Pull and load; errors are (waiting reason, message).
    async fn prepare(&self) -> Result<Arc<LoadedComponent>, (String, String)> {
        let pulled = self
            .ctx
            .images
            .pull(&self.spec.image)
            .await
            .map_err(|e| (e.reason().to_string(), e.to_string()))?;
        self.ctx
            .runtime
            .load(&pulled.digest, &pulled.path)
            .await
            .map_err(|e| {
                (
                    "CreateContainerError".to_string(),
                    format!("{}: {e}", pulled.digest),
                )
            })
    }

    /// One run of the component, until it exits, is killed by a failed liveness probe, or
    /// the pod stops.
    async fn run_once(&self, component: &Arc<LoadedComponent>) -> Exit {
        let run_stop = self.stop.child_token();
        let probes = CancellationToken::new();
        let _probes_guard = probes.clone().drop_guard();
        let (live_tx, mut live_rx) = mpsc::channel::<String>(1);
        if let Some(p) = self.spec.liveness_probe.clone() {
            let target = ProbeTarget::new(
                self.sandbox.ip,
                &self.spec,
                self.ctx.probes.clone(),
                self.sandbox.net.clone(),
            );
            let probes = probes.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = probes.cancelled() => {}
                    msg = liveness_loop(p, target) => { let _ = live_tx.send(msg).await; }
                }
            });
        }
        if let Some(p) = self.spec.readiness_probe.clone() {
            let target = ProbeTarget::new(
                self.sandbox.ip,
                &self.spec,
                self.ctx.probes.clone(),
                self.sandbox.net.clone(),
            );
            let shared = self.shared.clone();
            let probes = probes.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = probes.cancelled() => {}
                    _ = readiness_loop(p, target, shared) => {}
                }
            });
        }
        let liveness_failed = async {
            match live_rx.recv().await {
                Some(m) => m,
                None => std::future::pending().await,
            }
        };
        match component.kind {
            ComponentKind::Command => {
                tokio::select! {
                    exit = self.sandbox.run_command(&self.config, component, run_stop.clone()) => exit,
                    msg = liveness_failed => {
                        run_stop.cancel();
                        unhealthy(msg)
                    }
                }
            }
            ComponentKind::Http => {
                let (oom_tx, mut oom_rx) = mpsc::channel(1);
                let route = Arc::new(HttpRoute {
                    config: self.config.clone(),
                    component: component.clone(),
                    oom: oom_tx,
                });
                let mut serving = Vec::new();
                let mut bind_error = None;
                for p in &self.spec.ports {
                    if p.protocol.as_deref().is_some_and(|x| x != "TCP") {
                        continue;
                    }
                    let port = p.container_port as u16;
                    match tokio::net::TcpListener::bind((self.sandbox.ip, port)).await {
                        Ok(l) => {
                            self.sandbox.add_route(port, route.clone());
                            let h = self.sandbox.tasks.spawn(self.sandbox.clone().serve_port(
                                port,
                                l,
                                run_stop.clone(),
                            ));
                            serving.push((port, h));
                        }
                        Err(e) => {
                            bind_error =
                                Some(format!("listening on {}:{port}: {e}", self.sandbox.ip));
                            break;
                        }
                    }
                }
                let exit = if let Some(msg) = bind_error {
                    Exit {
                        code: 1,
                        reason: "Error".into(),
                        message: Some(msg),
                    }
                } else {
                    tokio::select! {
                        Some(exit) = oom_rx.recv() => exit,
                        msg = liveness_failed => unhealthy(msg),
                        _ = run_stop.cancelled() => Exit { code: 0, reason: "Completed".into(), message: Some("stopped".into()) },
                    }
                };
                run_stop.cancel();
                for (port, h) in serving {
                    // A pod being stopped keeps its routes: requests already on its
                    // connections (draining) and from Services that have not yet seen the
                    // Endpoints change are still answered during the grace period. A
                    // restarting container's routes go, so nothing reaches a dead instance.
                    if !self.stop.is_cancelled() {
                        self.sandbox.remove_route(port);
                    }
                    let _ = h.await;
                }
                exit
            }
        }
    }
}

fn unhealthy(msg: String) -> Exit {
    Exit {
        code: 137,
        reason: "Error".into(),
        message: Some(format!(
            "Container failed liveness probe, will be restarted: {msg}"
        )),
    }
}

/// Where a container's probes connect: the pod IP and its (named) ports.
#[derive(Clone)]
struct ProbeTarget {
    ip: Ipv4Addr,
    ports: HashMap<String, u16>,
    /// The agent's probe client (no proxies, no idle connections kept to pods).
    http: reqwest::Client,
    /// The pod's ports: a probe connects only to a port the pod listens on (anything else at
    /// the pod IP is a host service bound to 0.0.0.0). `None` in unit tests without a sandbox.
    net: Option<Arc<PodNet>>,
}

impl ProbeTarget {
    fn new(ip: Ipv4Addr, c: &Container, http: reqwest::Client, net: Arc<PodNet>) -> ProbeTarget {
        ProbeTarget {
            ip,
            http,
            net: Some(net),
            ports: c
                .ports
                .iter()
                .filter_map(|p| p.name.clone().map(|n| (n, p.container_port as u16)))
                .collect(),
        }
    }
    fn port(&self, p: &IntOrString) -> Result<u16, String> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
            IntOrString::String(s) => self
                .ports
                .get(s)
                .copied()
                .ok_or_else(|| format!("no container port named {s:?}")),
        }
    }
}

struct ProbeTiming {
    initial: Duration,
    period: Duration,
    timeout: Duration,
    success: u32,
    failure: u32,
}

fn timing(p: &Probe) -> ProbeTiming {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    ProbeTiming {
        initial: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

/// The `host` of a probe that names something other than the pod: the API server refuses
/// it, and the agent never connects there (probes come from the host, and their result is in
/// the status: a host of the pod's choosing would make the agent a port scanner).
fn foreign_probe_host(p: &Probe, pod_ip: Ipv4Addr) -> Option<&str> {
    let hosts = [
        p.http_get.as_ref().and_then(|g| g.host.as_deref()),
        p.tcp_socket.as_ref().and_then(|t| t.host.as_deref()),
    ];
    hosts
        .into_iter()
        .flatten()
        .find(|h| !h.is_empty() && h.parse::<IpAddr>().ok() != Some(IpAddr::V4(pod_ip)))
}

/// How HTTP probes follow redirects (kube's prober): only to the same host (the pod IP), at
/// most 10; a redirect elsewhere is not followed and its 3xx answer counts as success, so a
/// pod cannot point the agent's probe at another address.
pub fn probe_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        // Same host, scheme and port: a redirect to another port of the pod IP could reach a
        // host service bound to 0.0.0.0.
        let origin = |u: &url::Url| {
            (
                u.scheme().to_string(),
                u.host_str().map(str::to_string),
                u.port_or_known_default(),
            )
        };
        let first = attempt.previous().first().map(origin);
        if attempt.previous().len() > 10 {
            attempt.error("probe: too many redirects")
        } else if first.is_some() && Some(origin(attempt.url())) == first {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Says once per probe loop that a foreign `host` is ignored.
fn warn_foreign_host(p: &Probe, target: &ProbeTarget) {
    if let Some(h) = foreign_probe_host(p, target.ip) {
        tracing::warn!(host = %h, pod_ip = %target.ip, "ignoring the probe's host: probes always target the pod's own IP");
    }
}

/// One probe attempt: Ok on success, Err(message) on failure. It always connects to the pod
/// IP, whatever `host` says ([`foreign_probe_host`]).
async fn probe_once(p: &Probe, target: &ProbeTarget, timeout: Duration) -> Result<(), String> {
    let ip = target.ip;
    let listens = |port: u16| {
        if target
            .net
            .as_ref()
            .is_some_and(|n| !n.listens(Transport::Tcp, port))
        {
            return Err(format!(
                "dial tcp {ip}:{port}: connect: connection refused (nothing of the pod listens there)"
            ));
        }
        Ok(())
    };
    let attempt = async {
        if let Some(g) = &p.http_get {
            let port = target.port(&g.port)?;
            listens(port)?;
            let path = g.path.clone().unwrap_or_else(|| "/".into());
            let url = format!("http://{ip}:{port}{path}");
            let resp = target
                .http
                .get(&url)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(t) = &p.tcp_socket {
            let port = target.port(&t.port)?;
            listens(port)?;
            tokio::net::TcpStream::connect((ip, port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))
        } else {
            Err("the probe has no handler this node supports (httpGet or tcpSocket)".into())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

/// Returns (with the last failure) once `failureThreshold` consecutive probes failed.
async fn liveness_loop(p: Probe, target: ProbeTarget) -> String {
    warn_foreign_host(&p, &target);
    let t = timing(&p);
    tokio::time::sleep(t.initial).await;
    let mut failures = 0;
    loop {
        match probe_once(&p, &target, t.timeout).await {
            Ok(()) => failures = 0,
            Err(msg) => {
                failures += 1;
                if failures >= t.failure {
                    return msg;
                }
            }
        }
        tokio::time::sleep(t.period).await;
    }
}

async fn readiness_loop(p: Probe, target: ProbeTarget, shared: Arc<Shared>) {
    warn_foreign_host(&p, &target);
    let t = timing(&p);
    tokio::time::sleep(t.initial).await;
    let (mut ok, mut bad) = (0u32, 0u32);
    loop {
        let res = probe_once(&p, &target, t.timeout).await;
        let ready_now = shared.status.lock().expect("status lock").ready;
        match res {
            Ok(()) => {
                ok += 1;
                bad = 0;
                if !ready_now && ok >= t.success {
                    shared.update(|s| s.ready = true);
                }
            }
            Err(_) => {
                bad += 1;
                ok = 0;
                if ready_now && bad >= t.failure {
                    shared.update(|s| s.ready = false);
                }
            }
        }
        // Until the first success, probe quickly so a new pod becomes Ready promptly.
        let wait = if !ready_now && ok == 0 {
            t.period.min(Duration::from_millis(250))
        } else {
            t.period
        };
        tokio::time::sleep(wait).await;
    }
}

/// Hands out pod IPs from the node's pod CIDR (in 127.0.0.0/8: every pod its own loopback).
pub struct IpAllocator {
    base: u32,
    size: u32,
    next: u32,
    by_uid: HashMap<String, Ipv4Addr>,
    used: std::collections::HashSet<Ipv4Addr>,
}

impl IpAllocator {
    pub fn new(base: Ipv4Addr, prefix: u8) -> IpAllocator {
        let size = 1u32 << (32 - prefix.clamp(8, 30) as u32);
        IpAllocator {
            base: u32::from(base) & !(size - 1),
            size,
            next: 2,
            by_uid: HashMap::new(),
            used: Default::default(),
        }
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size - 1
    }

    /// The pod's IP: the one it had (agent restart) if still free, else the next free one.
    pub fn allocate(&mut self, uid: &str, previous: Option<&str>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.by_uid.get(uid) {
            return Some(*ip);
        }
        if let Some(ip) = previous.and_then(|p| p.parse::<Ipv4Addr>().ok()) {
            if self.contains(ip) && !self.used.contains(&ip) {
                self.used.insert(ip);
                self.by_uid.insert(uid.to_string(), ip);
                return Some(ip);
            }
        }
        for _ in 0..self.size {
            let cand = Ipv4Addr::from(self.base + self.next);
            self.next = if self.next + 2 >= self.size {
                2
            } else {
                self.next + 1
            };
            if !self.used.contains(&cand) {
                self.used.insert(cand);
                self.by_uid.insert(uid.to_string(), cand);
                return Some(cand);
            }
        }
        None
    }

    pub fn release(&mut self, uid: &str) {
        if let Some(ip) = self.by_uid.remove(uid) {
            self.used.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_allocation_reuses_and_skips_used() {
        let mut a = IpAllocator::new("127.1.0.0".parse().unwrap(), 30);
        // A /30 has .1 and .2 usable; .1 is the gateway-ish first address we skip: only .2.
        let first = a.allocate("a", None).unwrap();
        assert_eq!(first, "127.1.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.allocate("a", None), Some(first));
        assert_eq!(a.allocate("b", None), None);
        a.release("a");
        assert_eq!(a.allocate("b", None), Some(first));

        let mut a = IpAllocator::new("127.1.0.0".parse().unwrap(), 16);
        assert_eq!(
            a.allocate("x", Some("127.1.3.4")).unwrap().to_string(),
            "127.1.3.4"
        );
        // Outside the CIDR: a fresh address instead.
        assert_ne!(
            a.allocate("y", Some("127.9.0.1")).unwrap().to_string(),
            "127.9.0.1"
        );
        assert_ne!(
            a.allocate("z", Some("127.1.3.4")).unwrap().to_string(),
            "127.1.3.4"
        );
    }

    /// A tiny HTTP server on `ip` answering every request with `response`; counts requests.
    async fn http_server(ip: &str, response: String) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        (port, hits)
    }

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).unwrap()
    }

    /// Issue 11, item 7: `host` made the agent connect from the host to any address and put
    /// the answer in the pod's status. The API server refuses it now; the agent ignores it
    /// for objects stored before (or written past the server), and does not follow a pod's
    /// redirect to another address either.
    #[tokio::test]
    async fn probes_only_reach_the_pod() {
        // A "host service" on 127.0.0.1; the pod's IP is 127.0.0.2, where nothing listens.
        let (port, host_hits) = http_server(
            "127.0.0.1",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into(),
        )
        .await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(probe_redirects())
            .build()
            .unwrap();
        let pod = ProbeTarget {
            ip: "127.0.0.2".parse().unwrap(),
            ports: HashMap::new(),
            http: http.clone(),
            net: None,
        };
        let t = Duration::from_secs(2);
        let tcp = probe(json!({"tcpSocket": {"host": "127.0.0.1", "port": port}}));
        assert_eq!(foreign_probe_host(&tcp, pod.ip), Some("127.0.0.1"));
        let err = probe_once(&tcp, &pod, t).await.unwrap_err();
        assert!(err.contains(&format!("127.0.0.2:{port}")), "{err}");
        let get = probe(json!({"httpGet": {"host": "127.0.0.1", "port": port, "path": "/"}}));
        assert!(probe_once(&get, &pod, t).await.is_err());
        assert_eq!(host_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        // The pod's own IP as host is the pod.
        let own = probe(json!({"tcpSocket": {"host": "127.0.0.2", "port": 1}}));
        assert_eq!(foreign_probe_host(&own, pod.ip), None);

        // A pod (here on 127.0.0.3) that redirects its probe to the host service: not followed,
        // and the 302 counts as success, as in Kubernetes.
        let location = format!("http://127.0.0.1:{port}/");
        let (pod_port, _) = http_server(
            "127.0.0.3",
            format!("HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"),
        )
        .await;
        let pod = ProbeTarget {
            ip: "127.0.0.3".parse().unwrap(),
            ports: HashMap::new(),
            http,
            net: None,
        };
        let get = probe(json!({"httpGet": {"port": pod_port, "path": "/healthz"}}));
        probe_once(&get, &pod, t).await.unwrap();
        assert_eq!(host_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
