//! emptyDir volumes are bounded and cleaned up (issue 11, item 10): the `hostile` guest of
//! `wasi-apps/` writes into its mounted emptyDir on a real agent; the agent measures the
//! volume's host directory, evicts the pod the way the kubelet does, and removes the
//! directories of pods it no longer runs.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::agent::{is_ready, pod_ip, Cluster};
use crate::support::*;

fn pod(name: &str, size_limit: Option<&str>) -> Value {
    let mut empty_dir = json!({});
    if let Some(l) = size_limit {
        empty_dir["sizeLimit"] = json!(l);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name },
        "spec": {
            "nodeName": "node-1",
            "volumes": [{ "name": "data", "emptyDir": empty_dir }],
            "containers": [{
                "name": "hostile", "image": "hostile:v1",
                "ports": [{ "containerPort": 8080 }],
                "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            }],
        },
    })
}

/// The pod's directory on the agent's host (`pods/{ns}_{name}_{uid}`).
fn pod_dir(c: &Cluster, p: &Value) -> PathBuf {
    let uid = p["metadata"]["uid"].as_str().expect("uid");
    let name = p["metadata"]["name"].as_str().expect("name");
    c.agent
        .data_dir
        .join("pods")
        .join(format!("default_{name}_{uid}"))
}

fn volume_dir(c: &Cluster, p: &Value) -> PathBuf {
    pod_dir(c, p).join("volumes").join("data")
}

/// One request to the hostile guest, retried until its port answers (it binds its port just
/// after it is reported running).
async fn attempt(ip: &str, what: &str) -> (u16, String) {
    let url = format!("http://{ip}:8080/{what}");
    wait_for(Duration::from_secs(30), &url, || http_get(&url)).await
}

fn evicted_with(p: &Value, message: &str) -> bool {
    p["status"]["phase"] == "Failed"
        && p["status"]["reason"] == "Evicted"
        && p["status"]["message"] == message
}

async fn force_delete(c: &Cluster, name: &str) {
    let (code, body) = c
        .server
        .call(
            Method::DELETE,
            &format!("/api/v1/namespaces/default/pods/{name}"),
            Some(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(c.pod(name).await.is_null(), "{name} is gone from the API");
}

/// `sizeLimit` (and the node's default for a volume without one, and the inode bound) is
/// enforced: the pod is evicted with the kubelet's reason and message, its volume is removed,
/// it is not restarted; a pod within its limit keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptydir_over_its_limit_evicts_the_pod_and_removes_the_volume() {
    let c = Cluster::start(&[
        "--emptydir-default-limit",
        "2Mi",
        "--emptydir-inode-limit",
        "500",
    ])
    .await;
    c.push("hostile", "hostile:v1");
    c.create_pod(pod("within", Some("1Mi"))).await;
    c.create_pod(pod("over", Some("1Mi"))).await;
    c.create_pod(pod("unbounded", None)).await;
    c.create_pod(pod("many", Some("100Mi"))).await;
    let within = c.wait_ready("within").await;
    let over = c.wait_ready("over").await;
    let unbounded = c.wait_ready("unbounded").await;
    let many = c.wait_ready("many").await;

    // Within its limit first: every pass that sees the others' writes has seen this one.
    let (code, body) = attempt(&pod_ip(&within), "fill?path=/data/x&bytes=786432").await;
    assert_eq!(code, 200, "{body}");
    let file = volume_dir(&c, &within).join("x");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        786432,
        "written to the emptyDir"
    );

    // 4 MiB into 1Mi, 4 MiB into the node's 2Mi default, 2000 files past 500 inodes. The
    // writes themselves may be cut short by the eviction: only its outcome is checked.
    let _ = http_get(&format!(
        "http://{}:8080/fill?path=/data/x&bytes=4194304",
        pod_ip(&over)
    ))
    .await;
    let _ = http_get(&format!(
        "http://{}:8080/fill?path=/data/x&bytes=4194304",
        pod_ip(&unbounded)
    ))
    .await;
    let _ = http_get(&format!(
        "http://{}:8080/files?dir=/data/d&n=2000",
        pod_ip(&many)
    ))
    .await;

    let msg = "Usage of EmptyDir volume \"data\" exceeds the limit \"1Mi\". ";
    let evicted = c
        .wait_pod("over", "evicted", 30, |p| evicted_with(p, msg))
        .await;
    c.wait_pod("unbounded", "evicted at the node default", 30, |p| {
        evicted_with(
            p,
            "Usage of EmptyDir volume \"data\" exceeds the limit \"2Mi\". ",
        )
    })
    .await;
    c.wait_pod("many", "evicted for its inodes", 30, |p| {
        evicted_with(
            p,
            "Usage of EmptyDir volume \"data\" exceeds the limit \"500 inodes\". ",
        )
    })
    .await;
    for p in [&over, &unbounded, &many] {
        assert!(
            !volume_dir(&c, p).exists(),
            "the evicted pod's volume is removed"
        );
    }
    assert!(!is_ready(&evicted), "{evicted}");
    let st = &evicted["status"]["containerStatuses"][0];
    assert!(st["state"]["running"].is_null(), "stopped: {st}");
    assert!(
        http_get(&format!("http://{}:8080/", pod_ip(&over)))
            .await
            .is_none(),
        "its port is closed"
    );

    // The pod within its limit was measured (it wrote before the others) and keeps running.
    let p = c.pod("within").await;
    assert_eq!(p["status"]["phase"], "Running", "{p}");
    assert!(is_ready(&p), "{p}");
    assert!(file.exists());
    let (code, body) = attempt(&pod_ip(&within), "files?dir=/data/d&n=3").await;
    assert_eq!(code, 200, "{body}");

    // Not restarted: once the agent has seen it again (a restart re-lists), it stays Failed.
    let mut c = c;
    c.agent.restart().await;
    // Pods are started in list order (by name): once `within` answers, `over` was seen.
    let (code, body) = attempt(&pod_ip(&within), "files?dir=/data/d&n=1").await;
    assert_eq!(code, 200, "{body}");
    let p = c.pod("over").await;
    assert!(evicted_with(&p, msg), "{p}");
    assert!(
        http_get(&format!("http://{}:8080/", pod_ip(&over)))
            .await
            .is_none(),
        "not started again"
    );
    // Deleting the evicted pod removes the rest of its directory (its logs).
    let out = c.server.wasmctl(&["delete", "pod", "over"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = pod_dir(&c, &over);
    wait_for(
        Duration::from_secs(30),
        "the deleted pod's directory to go",
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
    assert!(file.exists(), "the running pod's volume is kept");
}

/// A pod deleted with grace 0 — out from under the running agent, or while it was down — has
/// its directory removed; a live pod's survives the agent's restart and clean-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_deleted_pods_leave_no_directories() {
    let mut c = Cluster::start(&[]).await;
    c.push("hostile", "hostile:v1");
    let mut pods = Vec::new();
    for name in ["live", "gone-running", "gone-stopped"] {
        c.create_pod(pod(name, Some("10Mi"))).await;
    }
    for name in ["live", "gone-running", "gone-stopped"] {
        let p = c.wait_ready(name).await;
        let (code, body) = attempt(&pod_ip(&p), "fill?path=/data/x&bytes=65536").await;
        assert_eq!(code, 200, "{body}");
        assert!(volume_dir(&c, &p).join("x").exists());
        pods.push(p);
    }
    let [live, gone_running, gone_stopped] = &pods[..] else {
        unreachable!()
    };

    // Deleted out from under the running agent.
    force_delete(&c, "gone-running").await;
    let dir = pod_dir(&c, gone_running);
    wait_for(
        Duration::from_secs(30),
        "the force-deleted pod's directory to go",
        || async { (!dir.exists()).then_some(()) },
    )
    .await;

    // Deleted while the agent was down.
    let _ = c.agent.child.kill();
    let _ = c.agent.child.wait();
    force_delete(&c, "gone-stopped").await;
    assert!(pod_dir(&c, gone_stopped).exists());
    c.agent.restart().await;
    let dir = pod_dir(&c, gone_stopped);
    wait_for(
        Duration::from_secs(30),
        "the directory of the pod deleted while the agent was down to go",
        || async { (!dir.exists()).then_some(()) },
    )
    .await;
    // The same clean-up pass kept the live pod's volume, and the pod runs again with it.
    assert!(volume_dir(&c, live).join("x").exists());
    let p = c.wait_ready("live").await;
    assert_eq!(p["metadata"]["uid"], live["metadata"]["uid"]);
    assert!(volume_dir(&c, live).join("x").exists());
}
