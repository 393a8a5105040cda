//! Node lifecycle: a real server with a short `--node-monitor-grace-period`, two real agents,
//! one of them SIGKILLed and restarted.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

async fn get(server: &ServerProc, path: &str) -> Value {
    let (code, body) = server.call(Method::GET, path, None).await;
    if code == 200 {
        body
    } else {
        Value::Null
    }
}

async fn node(server: &ServerProc, name: &str) -> Value {
    get(server, &format!("/api/v1/nodes/{name}")).await
}

async fn pod(server: &ServerProc, name: &str) -> Value {
    get(server, &format!("/api/v1/namespaces/default/pods/{name}")).await
}

fn condition<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

fn has_taint(node: &Value, key: &str, effect: &str) -> bool {
    node["spec"]["taints"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["key"] == key && t["effect"] == effect))
}

fn no_node_taints(node: &Value) -> bool {
    node["spec"]["taints"].as_array().is_none_or(|ts| {
        ts.iter().all(|t| {
            !t["key"]
                .as_str()
                .unwrap_or("")
                .starts_with("node.kubernetes.io/")
        })
    })
}

fn pinned_pod(name: &str, node: &str, toleration: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "hello", "image": "hello:v1",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "readinessProbe": { "httpGet": { "path": "/", "port": "http" }, "periodSeconds": 1 },
            }],
            "tolerations": [toleration],
        },
    })
}

async fn wait_until(
    server: &ServerProc,
    secs: u64,
    what: &str,
    path: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(Duration::from_secs(secs), what, || async {
        let v = get(server, path).await;
        pred(&v).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_node_is_tainted_its_pods_evicted_and_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("server"),
        &["--node-monitor-grace-period", "3s"],
    )
    .await;
    let agent_args = ["--lease-renew", "1s"];
    let mut a = AgentProc::start(&server, "node-a", &dir.path().join("a"), &agent_args).await;
    let _b = AgentProc::start(&server, "node-b", &dir.path().join("b"), &agent_args).await;
    let out = server.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));

    // Tolerates unreachable for 2 s; tolerates it forever.
    let short = json!({ "key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": 2 });
    let forever = json!({ "key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute" });
    for body in [
        pinned_pod("short", "node-a", short),
        pinned_pod("forever", "node-a", forever),
    ] {
        let (code, body) = server
            .call(Method::POST, "/api/v1/namespaces/default/pods", Some(&body))
            .await;
        assert_eq!(code, 201, "{body}");
    }
    for name in ["short", "forever"] {
        wait_until(
            &server,
            60,
            &format!("pod {name} Running and Ready"),
            &format!("/api/v1/namespaces/default/pods/{name}"),
            |p| p["status"]["phase"] == "Running" && condition(p, "Ready")["status"] == "True",
        )
        .await;
    }

    // The agent of node-a dies.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let n = wait_until(
        &server,
        30,
        "node-a Ready=Unknown and tainted unreachable",
        "/api/v1/nodes/node-a",
        |n| {
            condition(n, "Ready")["status"] == "Unknown"
                && has_taint(n, UNREACHABLE, "NoExecute")
                && has_taint(n, UNREACHABLE, "NoSchedule")
        },
    )
    .await;
    let ready = condition(&n, "Ready");
    assert_eq!(ready["reason"], "NodeStatusUnknown", "{n}");
    assert_eq!(ready["message"], "Kubelet stopped posting node status.");
    for type_ in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert_eq!(condition(&n, type_)["status"], "Unknown", "{type_}: {n}");
    }
    let taint = n["spec"]["taints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["effect"] == "NoExecute")
        .unwrap();
    assert!(taint["timeAdded"].is_string(), "{taint}");

    for name in ["short", "forever"] {
        wait_until(
            &server,
            20,
            &format!("pod {name} Ready=False"),
            &format!("/api/v1/namespaces/default/pods/{name}"),
            |p| condition(p, "Ready")["status"] == "False",
        )
        .await;
    }
    // Evicted 2 s after the taint: graceful, so it stays (Terminating) while its agent is away.
    wait_until(
        &server,
        20,
        "pod short to be evicted (deletionTimestamp)",
        "/api/v1/namespaces/default/pods/short",
        |p| p["metadata"]["deletionTimestamp"].is_string(),
    )
    .await;
    let f = pod(&server, "forever").await;
    assert!(f["metadata"]["deletionTimestamp"].is_null(), "{f}");
    let b = node(&server, "node-b").await;
    assert_eq!(condition(&b, "Ready")["status"], "True", "{b}");
    assert!(no_node_taints(&b), "{b}");

    // The agent comes back: Ready again, taints gone, the evicted pod finished by the agent.
    a.restart().await;
    wait_until(
        &server,
        30,
        "node-a Ready=True without taints",
        "/api/v1/nodes/node-a",
        |n| condition(n, "Ready")["status"] == "True" && no_node_taints(n),
    )
    .await;
    wait_for(Duration::from_secs(30), "pod short to be gone", || async {
        let (code, _) = server
            .call(Method::GET, "/api/v1/namespaces/default/pods/short", None)
            .await;
        (code == 404).then_some(())
    })
    .await;
    wait_until(
        &server,
        60,
        "pod forever Ready again",
        "/api/v1/namespaces/default/pods/forever",
        |p| condition(p, "Ready")["status"] == "True",
    )
    .await;
    let f = pod(&server, "forever").await;
    assert!(f["metadata"]["deletionTimestamp"].is_null(), "{f}");
}
