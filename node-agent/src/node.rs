//! The node's registration and heartbeats: the Node object (capacity, allocatable, labels,
//! addresses, conditions, the agent endpoint) and the Lease in `kube-node-lease` that is
//! renewed every `lease_renew`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wasmctl_api::keys;
use wasmctl_api::meta::MicroTime;
use wasmctl_api::{Quantity, Time};

use crate::AgentCtx;

/// `kubernetes.io/arch` spelling of the host architecture.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn total_memory_bytes() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The Node's status as this agent reports it.
pub fn node_status(ctx: &AgentCtx, kubelet_port: u16) -> Value {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let capacity = json!({
        "cpu": Quantity::from_millis_cpu(cores * 1000).0,
        "memory": Quantity::from_bytes(total_memory_bytes()).0,
        "pods": ctx.cfg.max_pods.to_string(),
    });
    let now = Time::now();
    // The conditions became what they are when this agent started.
    let since = ctx.started;
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        })
    };
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "wasmctl agent is posting ready status"),
        ],
        "addresses": [
            { "type": "InternalIP", "address": ctx.cfg.node_ip.to_string() },
            { "type": "Hostname", "address": ctx.cfg.name },
        ],
        "daemonEndpoints": { "kubeletEndpoint": { "Port": kubelet_port } },
        "nodeInfo": {
            "architecture": go_arch(),
            "operatingSystem": std::env::consts::OS,
            "kernelVersion": read_trim("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "kubeletVersion": format!("v1.32.0-wasmctl.{}", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "wasmtime://48.0.2",
            "machineID": read_trim("/etc/machine-id"),
            "systemUUID": "",
            "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
        },
    })
}

/// Creates the Node (or takes over an existing one of the same name) and writes its status.
pub async fn register(ctx: &AgentCtx, kubelet_port: u16) -> anyhow::Result<()> {
    let name = &ctx.cfg.name;
    let (cidr_ip, cidr_len) = ctx.cfg.pod_cidr;
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                keys::HOSTNAME: name,
                keys::ARCH: go_arch(),
                keys::OS: std::env::consts::OS,
            },
        },
        "spec": {
            "podCIDR": format!("{cidr_ip}/{cidr_len}"),
            "podCIDRs": [format!("{cidr_ip}/{cidr_len}")],
        },
    });
    let path = format!("/api/v1/nodes/{name}");
    let mut attempt = 0u32;
    loop {
        let res = match ctx.api.post("/api/v1/nodes", &node).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(409) => ctx
                .api
                .merge_patch(
                    &path,
                    &json!({ "metadata": node["metadata"], "spec": node["spec"] }),
                )
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => break,
            Err(e)
                if attempt < 20 && matches!(e, wasmctl_client::ClientError::Unreachable { .. }) =>
            {
                attempt += 1;
                tracing::warn!(error = %e, "API server unreachable; retrying registration");
                tokio::time::sleep(Duration::from_millis(250 * attempt as u64)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    ctx.api
        .merge_patch(
            &format!("{path}/status"),
            &json!({ "status": node_status(ctx, kubelet_port) }),
        )
        .await?;
    renew_lease(ctx).await?;
    Ok(())
}

async fn renew_lease(ctx: &AgentCtx) -> Result<(), wasmctl_client::ClientError> {
    let name = &ctx.cfg.name;
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}");
    let now = MicroTime::now();
    let spec = json!({
        "holderIdentity": name,
        "leaseDurationSeconds": ctx.cfg.lease_duration.as_secs(),
        "renewTime": now,
    });
    match ctx.api.merge_patch(&path, &json!({ "spec": spec })).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": name, "namespace": "kube-node-lease" },
                "spec": { "holderIdentity": name, "leaseDurationSeconds": ctx.cfg.lease_duration.as_secs(),
                          "acquireTime": now, "renewTime": now },
            });
            ctx.api
                .post(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                    &lease,
                )
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Whether the Node as stored says `Ready=True`. After an outage the node lifecycle
/// controller has set it `Unknown`; a healthy agent then reports at once rather than at the
/// next `status_report`. An error counts as ready (the status loop retries anyway).
async fn stored_ready(ctx: &AgentCtx) -> bool {
    match ctx
        .api
        .get(&format!("/api/v1/nodes/{}", ctx.cfg.name))
        .await
    {
        Ok(node) => node["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .is_some_and(|c| c["status"] == "True"),
        Err(_) => true,
    }
}

/// Renews the Lease every `lease_renew` and re-posts the node status every `status_report`,
/// and right after a renewal if the stored Node is not `Ready=True`.
pub async fn heartbeat(ctx: Arc<AgentCtx>, kubelet_port: u16, shutdown: CancellationToken) {
    let mut lease = tokio::time::interval(ctx.cfg.lease_renew);
    let mut status = tokio::time::interval(ctx.cfg.status_report);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let path = format!("/api/v1/nodes/{}/status", ctx.cfg.name);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lease.tick() => {
                if let Err(e) = renew_lease(&ctx).await {
                    tracing::warn!(error = %e, "renewing the node lease failed");
                } else if !stored_ready(&ctx).await {
                    tracing::info!("the node is not Ready=True in the API; reporting its status");
                    status.reset_immediately();
                }
            }
            _ = status.tick() => {
                let body = json!({ "status": node_status(&ctx, kubelet_port) });
                if let Err(e) = ctx.api.merge_patch(&path, &body).await {
                    tracing::warn!(error = %e, "posting node status failed");
                }
            }
        }
    }
}
