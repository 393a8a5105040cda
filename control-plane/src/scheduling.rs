//! The scheduler's thin runtime around the pure [`crate::scheduler::schedule`]: wakes on pod
//! and node changes in the store (and every few seconds), lists nodes and pods, places the
//! pending pods one after another on one [`ClusterView`] (accounting each placement), binds
//! them with the same compare-and-set as `pods/{name}/binding`, and marks pods that fit
//! nowhere `PodScheduled=False` with kube-scheduler's message. With one Raft voter this server
//! is always the leader; a multi-voter control plane must run it only on the leader.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{Node, Pod};
use wasmctl_api::registry::{self, ResourceInfo};

use crate::error::ApiError;
use crate::objects::{ListOptions, Objects, Subresource};
use crate::scheduler::{schedule, ClusterView, Decision, PodRequest};

/// Passes run at least this often (retries of unschedulable pods, missed wake-ups).
const RESYNC: Duration = Duration::from_secs(5);

fn kinds() -> (&'static ResourceInfo, &'static ResourceInfo) {
    (
        registry::by_kind("v1", "Pod").expect("pods are registered"),
        registry::by_kind("v1", "Node").expect("nodes are registered"),
    )
}

/// Sets `spec.nodeName` if the pod is still unbound (409 Conflict otherwise).
pub async fn bind(objects: &Objects, ns: &str, name: &str, node: &str) -> Result<Value, ApiError> {
    let (pods, _) = kinds();
    objects
        .guaranteed_update(pods, Some(ns), name, None, |current| {
            if current["metadata"]["deletionTimestamp"].is_string() {
                return Err(ApiError::conflict(pods, name, "the pod is being deleted"));
            }
            if let Some(bound) = current["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
            {
                return Err(ApiError::conflict(
                    pods,
                    name,
                    format!("pod {name} is already assigned to node \"{bound}\""),
                ));
            }
            let mut next = current.clone();
            next["spec"]["nodeName"] = json!(node);
            Ok(next)
        })
        .await
}

fn is_pending(p: &Pod) -> bool {
    p.spec.node_name.as_deref().unwrap_or("").is_empty()
        && p.metadata.deletion_timestamp.is_none()
        && matches!(
            p.spec.scheduler_name.as_deref(),
            None | Some("") | Some("default-scheduler")
        )
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

async fn list_all(objects: &Objects, info: &ResourceInfo) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    let mut opts = ListOptions::default();
    loop {
        let page = objects.list(info, None, &opts).await?;
        out.extend(page.items);
        match page.continue_token {
            Some(t) => opts.continue_token = Some(t),
            None => return Ok(out),
        }
    }
}

/// One scheduling pass; returns how many pods were bound.
pub async fn pass(objects: &Objects) -> Result<usize, ApiError> {
    let (pods_info, nodes_info) = kinds();
    let pods: Vec<Pod> = list_all(objects, pods_info)
        .await?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let mut pending: Vec<&Pod> = pods.iter().filter(|p| is_pending(p)).collect();
    if pending.is_empty() {
        return Ok(0);
    }
    let nodes: Vec<Node> = list_all(objects, nodes_info)
        .await?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let mut view = ClusterView::new(&nodes, &pods);
    pending.sort_by(|a, b| {
        (a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
    });
    let mut bound = 0;
    for pod in pending {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = &pod.metadata.name;
        let req = PodRequest::from_pod(pod);
        match schedule(&view, &req) {
            Decision::Bind(node) => match bind(objects, ns, name, &node).await {
                Ok(_) => {
                    view.assume(&node, &req);
                    bound += 1;
                    tracing::debug!(pod = %format!("{ns}/{name}"), %node, "scheduled");
                }
                Err(e) => {
                    tracing::debug!(pod = %format!("{ns}/{name}"), error = %e, "binding failed")
                }
            },
            Decision::Unschedulable { message } => {
                mark_unschedulable(objects, pod, &message).await;
            }
        }
    }
    Ok(bound)
}

async fn mark_unschedulable(objects: &Objects, pod: &Pod, message: &str) {
    let (pods_info, _) = kinds();
    let already = pod.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.message.as_deref() == Some(message)
        })
    });
    if already {
        return;
    }
    let patch = json!({ "status": {
        "phase": "Pending",
        "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastTransitionTime": wasmctl_api::Time::now(),
        }],
    }});
    let ns = pod.metadata.namespace.as_deref();
    if let Err(e) = objects
        .patch(
            pods_info,
            ns,
            &pod.metadata.name,
            patch,
            Subresource::Status,
        )
        .await
    {
        tracing::debug!(pod = %pod.metadata.name, error = %e, "recording Unschedulable failed");
    }
}

/// Runs passes until `shutdown`: after pod or node changes in the store, and every [`RESYNC`].
pub async fn run(objects: Objects, shutdown: CancellationToken) {
    let (pods_info, nodes_info) = kinds();
    let pod_prefix = pods_info.key_prefix(None);
    let node_prefix = nodes_info.key_prefix(None);
    loop {
        let from = objects.store().revision();
        if let Err(e) = pass(&objects).await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
        // Wait for a change that can make a pending pod schedulable (or a new pending pod).
        let mut pods = objects.store().watch(&pod_prefix, from).ok();
        let mut nodes = objects.store().watch(&node_prefix, from).ok();
        let deadline = tokio::time::sleep(RESYNC);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut deadline => break,
                ev = async { match pods.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    match ev {
                        Some(Ok(ev)) => {
                            // A new or updated unbound pod, or a deleted pod (frees room).
                            let unbound = ev.value.as_ref().is_none_or(|kv| {
                                serde_json::from_slice::<Value>(&kv.value).ok()
                                    .is_some_and(|p| p["spec"]["nodeName"].as_str().unwrap_or("").is_empty())
                            });
                            if unbound { break; }
                        }
                        _ => { pods = None; break; }
                    }
                }
                ev = async { match nodes.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    if !matches!(ev, Some(Ok(_))) { nodes = None; }
                    break;
                }
            }
        }
    }
}
