//! Scheduler throughput benchmark (issue 4): a real store (RocksDB + openraft, fsync on, in a
//! temp dir) with NODES fake Ready nodes (cpu 4, memory 8Gi, pods 110) and PODS pending pods
//! (cpu 100m, memory 64Mi each, ten ReplicaSet owners), then scheduling passes until every pod
//! is bound. Each pass is end to end: list pods and nodes from the store, decide, write the
//! bindings through Raft. Creating the objects is not timed.
//!
//! MODE=batched (default) runs `scheduling::pass`: bindings written up to
//! `scheduling::BATCH` per Raft entry. MODE=bind-each is the loop as it was before batching,
//! for comparison: list through `Objects::list`, then per pod the pure `schedule` and one
//! `scheduling::bind` (the `pods/{name}/binding` path: a read and one Raft entry per pod).
//!
//! Afterwards every pod is read back from the store: each must have a `spec.nodeName` of a
//! known node and no node may hold more pods, CPU or memory than it allocates; the benchmark
//! exits non-zero otherwise.
//!
//! cargo run --example schedbench      (env: NODES=1000 PODS=10000 MODE=batched|bind-each,
//!                                      CREATE_CONCURRENCY=64)
//!
//! Prints one line per pass and a summary on stderr/stdout, and one JSON line
//! (`"bench": "scheduler"`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{Node, Pod};
use wasmctl_api::registry;
use wasmctl_control_plane::objects::ListOptions;
use wasmctl_control_plane::scheduler::{schedule, ClusterView, Decision, NodeInfo, PodRequest};
use wasmctl_control_plane::{scheduling, Objects};
use wasmctl_store::{Store, StoreConfig};

/// Passes without any progress before the benchmark gives up.
const MAX_IDLE_PASSES: usize = 3;

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?}: not a number")),
        Err(_) => Ok(default),
    }
}

fn node(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": format!("node-{i:05}"),
                      "labels": { "kubernetes.io/hostname": format!("node-{i:05}") } },
        "status": {
            "capacity": { "cpu": "4", "memory": "8Gi", "pods": "110" },
            "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" },
            "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady" }],
        },
    })
}

fn pod(i: usize) -> Value {
    let owner = i % 10;
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i:06}"),
            "labels": { "app": format!("app-{owner}") },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{owner}"),
                "uid": format!("00000000-0000-0000-0000-{owner:012}"),
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": { "containers": [{
            "name": "hello", "image": "hello:v1",
            "resources": { "requests": { "cpu": "100m", "memory": "64Mi" } },
        }]},
    })
}

async fn create_all(
    objects: &Objects,
    plural: &str,
    ns: Option<&str>,
    objs: Vec<Value>,
    concurrency: usize,
) -> Result<()> {
    let info = registry::resolve(plural).expect("served");
    stream::iter(objs)
        .map(|o| async move { objects.create(info, ns, o).await })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(|e| anyhow::anyhow!("creating {plural}: {e}"))
}

async fn list(objects: &Objects, plural: &str) -> Result<Vec<Value>> {
    let info = registry::resolve(plural).expect("served");
    let page = objects
        .list(info, None, &ListOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("listing {plural}: {e}"))?;
    Ok(page.items)
}

/// Every pod bound to a known node, no node over its allocatable pods, CPU or memory.
async fn verify(objects: &Objects, want_pods: usize) -> Result<()> {
    let nodes: Vec<Node> = decode(list(objects, "nodes").await?)?;
    let mut used: HashMap<String, (NodeInfo, i64, i64, i64)> = nodes
        .iter()
        .map(|n| (n.metadata.name.clone(), (NodeInfo::from_node(n), 0, 0, 0)))
        .collect();
    let pods = list(objects, "pods").await?;
    ensure!(
        pods.len() == want_pods,
        "{} pods stored, want {want_pods}",
        pods.len()
    );
    for v in pods {
        let p: Pod = serde_json::from_value(v)?;
        let name = &p.metadata.name;
        let Some(bound) = p.spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            bail!("pod {name} has no spec.nodeName");
        };
        let Some((_, pods, cpu, mem)) = used.get_mut(bound) else {
            bail!("pod {name} is bound to unknown node {bound:?}");
        };
        let req = PodRequest::from_pod(&p);
        *pods += 1;
        *cpu += req.cpu_millis;
        *mem += req.memory_bytes;
    }
    for (name, (info, pods, cpu, mem)) in &used {
        let a = &info.allocatable;
        ensure!(
            *pods <= a.pods && *cpu <= a.cpu_millis && *mem <= a.memory_bytes,
            "node {name} is overcommitted: {pods} pods / {cpu}m cpu / {mem} bytes \
             for allocatable {} / {}m / {}",
            a.pods,
            a.cpu_millis,
            a.memory_bytes
        );
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(items: Vec<Value>) -> Result<Vec<T>> {
    items
        .into_iter()
        .map(|o| serde_json::from_value(o).map_err(Into::into))
        .collect()
}

/// The scheduling loop before batching: one binding (one Raft entry) per pod.
async fn bind_each_pass(objects: &Objects) -> Result<scheduling::PassStats> {
    let mut stats = scheduling::PassStats::default();
    let t = Instant::now();
    let pods: Vec<Pod> = decode(list(objects, "pods").await?)?;
    let nodes: Vec<Node> = decode(list(objects, "nodes").await?)?;
    let mut view = ClusterView::new(&nodes, &pods);
    let mut pending: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.spec.node_name.as_deref().unwrap_or("").is_empty())
        .collect();
    pending.sort_by(|a, b| {
        (a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
    });
    stats.pending = pending.len();
    stats.list = t.elapsed();
    for pod in pending {
        let t = Instant::now();
        let req = PodRequest::from_pod(pod);
        let decision = schedule(&view, &req);
        stats.decide += t.elapsed();
        let Decision::Bind(node) = decision else {
            stats.unschedulable += 1;
            continue;
        };
        let t = Instant::now();
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let bound = scheduling::bind(objects, ns, &pod.metadata.name, &node).await;
        stats.write += t.elapsed();
        stats.entries += 1;
        match bound {
            Ok(_) => {
                view.assume(&node, &req);
                stats.bound += 1;
            }
            Err(_) => stats.conflicts += 1,
        }
    }
    Ok(stats)
}

#[tokio::main]
async fn main() -> Result<()> {
    let n_nodes = env_usize("NODES", 1000)?;
    let n_pods = env_usize("PODS", 10_000)?;
    let concurrency = env_usize("CREATE_CONCURRENCY", 64)?.max(1);
    let mode = std::env::var("MODE").unwrap_or_else(|_| "batched".into());
    ensure!(
        mode == "batched" || mode == "bind-each",
        "MODE={mode:?}: expected batched or bind-each"
    );
    let dir = tempfile::tempdir()?;
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    cfg.fsync = true;
    let store = Store::open(cfg).await.context("opening the store")?;
    let shutdown = CancellationToken::new();
    let objects = Objects::new(store.clone(), shutdown.clone());
    objects
        .bootstrap()
        .await
        .map_err(|e| anyhow::anyhow!("bootstrap: {e}"))?;

    let t = Instant::now();
    let nodes = (0..n_nodes).map(node).collect();
    create_all(&objects, "nodes", None, nodes, concurrency).await?;
    let pods = (0..n_pods).map(pod).collect();
    create_all(&objects, "pods", Some("default"), pods, concurrency).await?;
    eprintln!(
        "created {n_nodes} nodes and {n_pods} pending pods in {:.1} s (not timed)",
        t.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let cpu_start = cpu_time();
    let mut total = scheduling::PassStats::default();
    let mut passes = 0;
    let mut idle = 0;
    while total.bound < n_pods {
        let t = Instant::now();
        let s = if mode == "batched" {
            scheduling::pass(&objects)
                .await
                .map_err(|e| anyhow::anyhow!("pass {}: {e}", passes + 1))?
        } else {
            bind_each_pass(&objects).await?
        };
        passes += 1;
        eprintln!(
            "pass {passes}: {} pending, {} bound, {} unschedulable, {} conflicts, {} Raft entries \
             in {:.3} s (list {:.3} s, decide {:.3} s, write {:.3} s)",
            s.pending,
            s.bound,
            s.unschedulable,
            s.conflicts,
            s.entries,
            t.elapsed().as_secs_f64(),
            s.list.as_secs_f64(),
            s.decide.as_secs_f64(),
            s.write.as_secs_f64()
        );
        total.bound += s.bound;
        total.unschedulable += s.unschedulable;
        total.conflicts += s.conflicts;
        total.entries += s.entries;
        total.list += s.list;
        total.decide += s.decide;
        total.write += s.write;
        idle = if s.bound == 0 { idle + 1 } else { 0 };
        ensure!(
            idle < MAX_IDLE_PASSES,
            "no progress in {MAX_IDLE_PASSES} passes: {}/{n_pods} bound",
            total.bound
        );
    }
    let wall = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_start);
    verify(&objects, n_pods).await?;
    let bound = total.bound;
    let rate = bound as f64 / wall.as_secs_f64();
    println!(
        "{mode}: {bound} pods bound on {n_nodes} nodes in {:.3} s ({:.2} s of CPU): \
         {rate:.0} pods/s, {passes} passes, {} Raft entries; list {:.3} s, decide {:.3} s, \
         write {:.3} s; verified: every pod bound, no node over allocatable",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        total.entries,
        total.list.as_secs_f64(),
        total.decide.as_secs_f64(),
        total.write.as_secs_f64()
    );
    println!(
        "{}",
        json!({
            "bench": "scheduler", "mode": mode, "nodes": n_nodes, "pods": n_pods, "bound": bound,
            "wall_s": round3(wall), "cpu_s": round3(cpu), "pods_per_s": rate.round(), "passes": passes,
            "raft_entries": total.entries, "conflicts": total.conflicts,
            "list_s": round3(total.list), "decide_s": round3(total.decide),
            "write_s": round3(total.write),
        })
    );
    shutdown.cancel();
    objects.close().await;
    store
        .shutdown()
        .await
        .map_err(|e| anyhow::anyhow!("closing the store: {e}"))?;
    Ok(())
}

/// CPU time (user + system) of this process so far, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

fn round3(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
