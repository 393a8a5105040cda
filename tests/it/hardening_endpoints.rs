//! Endpoints and probes may only lead to pods (issue 11, items 6 and 7), against a real
//! server and agent: hand-written Endpoints of a selector-less Service that point at the
//! host's loopback services, the metadata address, a ClusterIP, a node or loopback outside
//! the pod CIDRs are refused with 422 and kube's words; an agent never sends Service traffic to
//! such an address even when it got stored; a probe with a `host` is refused with 422.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

const SVCS: &str = "/api/v1/namespaces/default/services";
const EPS: &str = "/api/v1/namespaces/default/endpoints";
const PODS: &str = "/api/v1/namespaces/default/pods";

/// A "host service" on `ip`: answers every connection with an HTTP 200 `host secret` and
/// counts the connections it got.
fn host_service(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).expect("bind the host service");
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\nhost secret",
            );
        }
    });
    (port, hits)
}

/// A selector-less Service `name` with one port `http` (port 80).
fn service(name: &str, type_: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"type": type_, "ports": [{"name": "http", "port": 80}]}})
}

/// Endpoints `name` listing `addresses` on port `port` (named `http`).
fn endpoints(name: &str, addresses: Value, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name},
           "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": port}]}]})
}

/// The 422's message, after checking it is kube's `Invalid` Status.
fn invalid(code: u16, body: &Value) -> String {
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["reason"], "Invalid", "{body}");
    body["message"].as_str().unwrap_or_default().to_string()
}

async fn create(s: &ServerProc, path: &str, obj: &Value) -> (u16, Value) {
    s.call(Method::POST, path, Some(obj)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_endpoints_must_be_pods() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agents) = service_cluster(dir.path(), &["node-e"], &[], &[]).await;
    let agent = &agents[0];
    // The agent publishes its pod CIDR, as kubelet does.
    let (code, node) = server.call(Method::GET, "/api/v1/nodes/node-e", None).await;
    assert_eq!(code, 200);
    let cidr = format!("127.{}.0.0/16", agent.octet);
    assert_eq!(node["spec"]["podCIDR"], cidr.as_str(), "{node}");

    let (port, hits) = host_service("127.0.0.1");
    let (code, svc) = create(&server, SVCS, &service("tunnel", "ClusterIP")).await;
    assert_eq!(code, 201, "{svc}");
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let range = format!(
        "{}.0/24",
        cluster_ip.rsplit_once('.').expect("an IPv4 ClusterIP").0
    );

    let refused = |ip: &str, why: &str| {
        (
            endpoints("tunnel", json!([{"ip": ip}]), port),
            format!(
                "Endpoints \"tunnel\" is invalid: subsets[0].addresses[0].ip: Invalid value: \"{ip}\": {why}"
            ),
        )
    };
    let node_ip = agent_node_ip(&node);
    for (obj, want) in [
        // The host's own services (kubelet's 10250, a database, sshd...).
        refused(
            "127.0.0.1",
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        ),
        // The cloud metadata address.
        refused(
            "169.254.169.254",
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ),
        // A ClusterIP (its own, here) in the server's service range.
        refused(
            &cluster_ip,
            &format!("may not be in the service IP range ({range})"),
        ),
        // The node itself.
        refused(
            &node_ip,
            "may not be the address of node \"node-e\"",
        ),
        // Loopback that is no node's pod CIDR.
        refused(
            "127.3.0.1",
            "may not be in the loopback range (127.0.0.0/8, ::1/128) outside the nodes' pod CIDRs (spec.podCIDR)",
        ),
        refused("0.0.0.0", "may not be unspecified (0.0.0.0)"),
    ] {
        let (code, body) = create(&server, EPS, &obj).await;
        assert_eq!(invalid(code, &body), want);
        // The field is named in the causes, as kube-apiserver does.
        assert_eq!(
            body["details"]["causes"][0]["field"], "subsets[0].addresses[0].ip",
            "{body}"
        );
    }
    // A kube client sees the same words.
    let out = server.wasmctl_stdin(
        &["apply", "-f", "-"],
        Some(
            &serde_json::to_string(&endpoints("tunnel", json!([{"ip": "127.0.0.1"}]), port))
                .unwrap(),
        ),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("subsets[0].addresses[0].ip: Invalid value: \"127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"),
        "{}",
        stderr(&out)
    );

    // An address inside the node's pod CIDR is a pod's; a later update may not add a bad one.
    let pod_ip = format!("127.{}.0.77", agent.octet);
    let ok = endpoints(
        "tunnel",
        json!([{"ip": pod_ip, "nodeName": "node-e"}]),
        8080,
    );
    let (code, body) = create(&server, EPS, &ok).await;
    assert_eq!(code, 201, "{body}");
    let mut next = body.clone();
    next["subsets"][0]["addresses"]
        .as_array_mut()
        .unwrap()
        .push(json!({"ip": "127.0.0.1"}));
    let (code, body) = server
        .call(Method::PUT, &format!("{EPS}/tunnel"), Some(&next))
        .await;
    assert_eq!(
        invalid(code, &body),
        "Endpoints \"tunnel\" is invalid: subsets[0].addresses[1].ip: Invalid value: \"127.0.0.1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
    );
    let patch = json!({"subsets": [{"addresses": [{"ip": pod_ip, "nodeName": "node-e"}],
                                    "notReadyAddresses": [{"ip": "169.254.169.254"}],
                                    "ports": [{"name": "http", "port": 8080}]}]});
    let (code, body) = server
        .raw(
            Method::PATCH,
            &format!("{EPS}/tunnel"),
            Some(&patch),
            "application/merge-patch+json",
            Some(&server.token),
        )
        .await;
    assert!(invalid(code, &body).contains("subsets[0].notReadyAddresses[0].ip: Invalid value: \"169.254.169.254\": may not be in the link-local range"), "{body}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

fn agent_node_ip(node: &Value) -> String {
    node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .expect("an InternalIP")
        .to_string()
}

/// Endpoints stored before any node published its pod CIDR (the server cannot tell a pod
/// then) still never get traffic: the agent only sends to addresses inside a node's pod CIDR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_never_send_to_an_endpoint_that_is_not_a_pod() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = service_cluster(dir.path(), &[], &[], &[]).await;
    // A host service on a loopback address that is no pod CIDR's (agents' CIDRs are
    // 127.20-249.0.0/16).
    let (port, hits) = host_service("127.3.0.1");
    let (code, svc) = create(&server, SVCS, &service("tunnel", "NodePort")).await;
    assert_eq!(code, 201, "{svc}");
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let (code, body) = create(
        &server,
        EPS,
        &endpoints("tunnel", json!([{"ip": "127.3.0.1"}]), port),
    )
    .await;
    assert_eq!(code, 201, "no node publishes a pod CIDR yet: {body}");

    let ip = format!("127.250.0.{}", next_node_octet());
    let agent = AgentProc::start(
        &server,
        "node-t",
        &dir.path().join("node-t"),
        &["--node-ip", &ip],
    )
    .await;
    let out = server.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"nodeName": "node-t", "containers": [{"name": "hello", "image": "hello:v1",
            "ports": [{"name": "web", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "web"}, "periodSeconds": 1}}]}});
    let (code, body) = create(&server, PODS, &pod).await;
    assert_eq!(code, 201, "{body}");
    let pod_ip = wait_for(Duration::from_secs(120), "pod web Ready", || async {
        let (_, p) = server.call(Method::GET, &format!("{PODS}/web"), None).await;
        let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        ready
            .then(|| p["status"]["podIP"].as_str().map(str::to_string))
            .flatten()
    })
    .await;
    assert!(
        pod_ip.starts_with(&format!("127.{}.", agent.octet)),
        "{pod_ip}"
    );

    // The pod joins the Endpoints; the stored host address stays (what an update keeps is
    // not checked again). The update may not add another one.
    let (_, mut ep) = server
        .call(Method::GET, &format!("{EPS}/tunnel"), None)
        .await;
    ep["subsets"] = json!([
        {"addresses": [{"ip": "127.3.0.1"}], "ports": [{"name": "http", "port": port}]},
        {"addresses": [{"ip": pod_ip, "nodeName": "node-t"}], "ports": [{"name": "http", "port": 8080}]},
    ]);
    let (code, body) = server
        .call(Method::PUT, &format!("{EPS}/tunnel"), Some(&ep))
        .await;
    assert_eq!(code, 200, "{body}");

    // Every request through the NodePort reaches the pod; none the host service.
    let url = format!("http://{ip}:{node_port}/");
    wait_for(
        Duration::from_secs(60),
        "the NodePort to reach the pod",
        || async {
            http_get(&url)
                .await
                .filter(|(code, body)| *code == 200 && body.starts_with("hello from"))
        },
    )
    .await;
    for i in 0..30 {
        let (code, body) = http_get(&url)
            .await
            .unwrap_or_else(|| panic!("request {i} to {url} failed"));
        assert_eq!(code, 200, "request {i}: {body}");
        assert!(body.starts_with("hello from web"), "request {i}: {body:?}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the agent sent Service traffic to the host service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_may_not_name_a_host() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), &[]).await;
    let pod = |probes: Value| {
        let mut c = json!({"name": "hello", "image": "hello:v1",
                           "ports": [{"name": "web", "containerPort": 8080}]});
        c.as_object_mut()
            .unwrap()
            .extend(probes.as_object().unwrap().clone());
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "scanner"},
               "spec": {"containers": [c]}})
    };
    let forbidden = "Forbidden: probes always target the pod's own IP; host is not supported";
    let (code, body) = create(
        &server,
        PODS,
        &pod(json!({"livenessProbe": {"httpGet": {"host": "127.0.0.1", "port": 10250, "path": "/pods"}}})),
    )
    .await;
    assert_eq!(
        invalid(code, &body),
        format!("Pod \"scanner\" is invalid: spec.containers[0].livenessProbe.httpGet.host: {forbidden}")
    );
    assert_eq!(
        body["details"]["causes"][0]["reason"],
        "FieldValueForbidden"
    );
    let (code, body) = create(
        &server,
        PODS,
        &pod(json!({"readinessProbe": {"tcpSocket": {"host": "169.254.169.254", "port": 80}}})),
    )
    .await;
    assert_eq!(
        invalid(code, &body),
        format!("Pod \"scanner\" is invalid: spec.containers[0].readinessProbe.tcpSocket.host: {forbidden}")
    );
    // In a Deployment's pod template too.
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "scan"},
        "spec": {"selector": {"matchLabels": {"app": "scan"}},
                 "template": {"metadata": {"labels": {"app": "scan"}},
                              "spec": pod(json!({"readinessProbe": {"tcpSocket": {"host": "10.0.0.1", "port": 22}}}))["spec"]}}});
    let (code, body) = create(
        &server,
        "/apis/apps/v1/namespaces/default/deployments",
        &deploy,
    )
    .await;
    assert!(
        invalid(code, &body)
            .contains("spec.template.spec.containers[0].readinessProbe.tcpSocket.host: Forbidden"),
        "{body}"
    );
    // Without a host (or with an empty one, Kubernetes' "the pod IP") it is fine.
    let (code, body) = create(
        &server,
        PODS,
        &pod(
            json!({"livenessProbe": {"httpGet": {"host": "", "port": "web"}},
                    "readinessProbe": {"tcpSocket": {"port": 8080}}}),
        ),
    )
    .await;
    assert_eq!(code, 201, "{body}");
}
