//! PodGC and bind-time node checks with real processes: a Deployment's pod on a node whose
//! agent dies and whose Node is deleted is marked `DisruptionTarget`, force-deleted after the
//! (shortened) quarantine, dropped from its Service's Endpoints and replaced on the surviving
//! node; `pods/{name}/binding` to a Node that does not exist is refused.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const PODS: &str = "/api/v1/namespaces/default/pods";

fn condition<'a>(obj: &'a Value, type_: &str) -> &'a Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

fn is_ready(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null() && condition(p, "Ready")["status"] == "True"
}

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: orphan
spec:
  replicas: 1
  selector:
    matchLabels:
      app: orphan
  template:
    metadata:
      labels:
        app: orphan
    spec:
      containers:
      - name: hello
        image: hello:v1
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: http
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: orphan
spec:
  selector:
    app: orphan
  ports:
  - name: http
    port: 80
    targetPort: http
"#;

async fn ready_pods(s: &ServerProc) -> Vec<Value> {
    let (code, list) = s
        .call(
            Method::GET,
            &format!("{PODS}?labelSelector=app%3Dorphan"),
            None,
        )
        .await;
    assert_eq!(code, 200, "{list}");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_ready(p))
        .cloned()
        .collect()
}

/// The pod names the Service's Endpoints list as ready addresses.
async fn endpoint_pods(s: &ServerProc) -> Vec<String> {
    let (code, ep) = s
        .call(
            Method::GET,
            "/api/v1/namespaces/default/endpoints/orphan",
            None,
        )
        .await;
    if code != 200 {
        return Vec::new();
    }
    ep["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|ss| ss["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["targetRef"]["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_a_deleted_node_are_collected_and_replaced_on_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut agents) = service_cluster(
        dir.path(),
        &["node-a", "node-b"],
        &["--pod-gc-quarantine", "2s"],
        &["--lease-renew", "1s", "--backoff-base", "1s"],
    )
    .await;
    let out = server.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let out = server.wasmctl_stdin(&["apply", "-f", "-"], Some(DEPLOYMENT));
    assert!(out.status.success(), "apply: {}", stderr(&out));

    let t = Duration::from_secs(90);
    let first = wait_for(t, "one ready orphan pod in the Endpoints", || async {
        let pods = ready_pods(&server).await;
        let name = pods.first()?["metadata"]["name"].as_str()?.to_string();
        (pods.len() == 1 && endpoint_pods(&server).await == [name.clone()]).then(|| pods[0].clone())
    })
    .await;
    let name = first["metadata"]["name"].as_str().unwrap().to_string();
    let uid = first["metadata"]["uid"].as_str().unwrap().to_string();
    let lost = first["spec"]["nodeName"].as_str().unwrap().to_string();
    let survivor = if lost == "node-a" { "node-b" } else { "node-a" };

    // Follow the pod from here on, to see what PodGC writes before it deletes it.
    let (code, list) = server
        .call(
            Method::GET,
            &format!("{PODS}?fieldSelector=metadata.name%3D{name}"),
            None,
        )
        .await;
    assert_eq!(code, 200, "{list}");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("{PODS}?fieldSelector=metadata.name%3D{name}&watch=1&resourceVersion={rv}");
    let mut events = server
        .client()
        .watch(&path, None)
        .await
        .expect("watch opens");

    // Its agent dies and its Node is deleted (`kubectl delete node`).
    let i = agents.iter().position(|a| a.name == lost).unwrap();
    let mut dead = agents.remove(i);
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    let (code, body) = server
        .call(Method::DELETE, &format!("/api/v1/nodes/{lost}"), None)
        .await;
    assert_eq!(code, 200, "{body}");

    // After the quarantine (2 s), PodGC marks it Failed with DisruptionTarget and
    // force-deletes it.
    let mut last = Value::Null;
    let deleted = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(Ok(ev)) = events.next().await {
            if ev["type"] == "DELETED" {
                return Some(ev["object"].clone());
            }
            last = ev["object"].clone();
        }
        None
    })
    .await;
    let deleted = match deleted {
        Ok(Some(obj)) => obj,
        other => {
            let (_, now) = server
                .call(Method::GET, &format!("{PODS}/{name}"), None)
                .await;
            panic!("pod {name} on deleted node {lost} was not deleted ({other:?}); it is: {now}")
        }
    };
    let marked = if deleted["status"]["phase"] == "Failed" {
        &deleted
    } else {
        &last
    };
    assert_eq!(deleted["metadata"]["uid"], uid.as_str());
    assert_eq!(marked["status"]["phase"], "Failed", "{marked}");
    let c = condition(marked, "DisruptionTarget");
    assert_eq!(c["status"], "True", "{marked}");
    assert_eq!(c["reason"], "DeletionByPodGC", "{marked}");
    assert_eq!(c["message"], "PodGC: node no longer exists", "{marked}");
    let (code, _) = server
        .call(Method::GET, &format!("{PODS}/{name}"), None)
        .await;
    assert_eq!(code, 404);

    // Its ReplicaSet replaces it on the survivor, and the Service sends traffic there only.
    wait_for(
        t,
        "a ready replacement on the surviving node, alone in the Endpoints",
        || async {
            let pods = ready_pods(&server).await;
            let p = pods.first()?;
            let replaced = pods.len() == 1
                && p["metadata"]["uid"] != uid.as_str()
                && p["spec"]["nodeName"] == survivor;
            let rname = p["metadata"]["name"].as_str()?.to_string();
            (replaced && endpoint_pods(&server).await == [rname]).then_some(())
        },
    )
    .await;
    let (_, all) = server
        .call(
            Method::GET,
            &format!("{PODS}?labelSelector=app%3Dorphan"),
            None,
        )
        .await;
    let on_lost = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["nodeName"] == lost.as_str())
        .count();
    assert_eq!(on_lost, 0, "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn binding_to_a_node_that_does_not_exist_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}});
    let (code, body) = s.call(Method::POST, "/api/v1/nodes", Some(&node)).await;
    assert_eq!(code, 201, "{body}");
    // Not for the default scheduler: only the bindings below place it.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"schedulerName": "by-hand", "containers": [{"name": "c", "image": "hello:v1"}]}});
    let (code, body) = s.call(Method::POST, PODS, Some(&pod)).await;
    assert_eq!(code, 201, "{body}");
    let bind = |node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    };
    let path = format!("{PODS}/p/binding");

    let (code, body) = s.call(Method::POST, &path, Some(&bind("ghost"))).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["reason"], "NotFound", "{body}");
    assert_eq!(body["message"], "nodes \"ghost\" not found", "{body}");
    let (_, p) = s.call(Method::GET, &format!("{PODS}/p"), None).await;
    assert!(
        p["spec"]["nodeName"].as_str().unwrap_or("").is_empty(),
        "{p}"
    );

    let (code, body) = s.call(Method::POST, &path, Some(&bind("node-a"))).await;
    assert_eq!(code, 201, "{body}");
    let (_, p) = s.call(Method::GET, &format!("{PODS}/p"), None).await;
    assert_eq!(p["spec"]["nodeName"], "node-a", "{p}");

    // A Node deleted is gone for bindings too.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"},
        "spec": {"schedulerName": "by-hand", "containers": [{"name": "c", "image": "hello:v1"}]}});
    let (code, body) = s.call(Method::POST, PODS, Some(&pod)).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = s.call(Method::DELETE, "/api/v1/nodes/node-a", None).await;
    assert_eq!(code, 200, "{body}");
    let mut q = bind("node-a");
    q["metadata"]["name"] = json!("q");
    let (code, body) = s
        .call(Method::POST, &format!("{PODS}/q/binding"), Some(&q))
        .await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["message"], "nodes \"node-a\" not found", "{body}");
}
