//! Services through the node agents' proxies, with real processes: one server, two agents on
//! their own node IPs (127.250.0.x), a 4-replica `hello` Deployment behind a NodePort Service.
//! Either node's NodePort answers, requests spread over every replica on both nodes, and
//! killing one agent moves the traffic to the survivor without failed requests.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::support::*;

const APP: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 4
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      terminationGracePeriodSeconds: 5
      tolerations:
      - key: node.kubernetes.io/unreachable
        operator: Exists
        effect: NoExecute
        tolerationSeconds: 2
      - key: node.kubernetes.io/not-ready
        operator: Exists
        effect: NoExecute
        tolerationSeconds: 2
      containers:
      - name: hello
        image: hello:v1
        ports:
        - name: web
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: web
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: web
    nodePort: 30080
"#;

const ENDPOINTS: &str = "/api/v1/namespaces/default/endpoints/web";

/// `(pod IP, node)` of the Endpoints' ready addresses.
async fn ready_addresses(server: &ServerProc) -> Vec<(String, String)> {
    let (code, ep) = server.call(Method::GET, ENDPOINTS, None).await;
    if code != 200 {
        return Vec::new();
    }
    ep["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
        .map(|a| {
            (
                a["ip"].as_str().unwrap_or_default().to_string(),
                a["nodeName"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `n` GETs over one keep-alive client; the pods that answered (hello says
/// `hello from POD`), with counts. Panics on any failed request.
async fn spread(http: &reqwest::Client, url: &str, n: usize) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for i in 0..n {
        let resp = http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} to {url}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "request {i} to {url}: {body}");
        let pod = body
            .trim()
            .strip_prefix("hello from ")
            .unwrap_or_else(|| panic!("unexpected body {body:?}"))
            .to_string();
        *by_pod.entry(pod).or_default() += 1;
    }
    by_pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_spreads_over_both_nodes_and_survives_a_lost_node() {
    let dir = tempfile::tempdir().unwrap();
    // Its own ClusterIP range: agents of parallel tests bind ClusterIPs with SO_REUSEPORT.
    let (server, mut agents) = service_cluster(
        dir.path(),
        &["node-a", "node-b"],
        &["--node-monitor-grace-period", "3s"],
        &["--lease-renew", "1s", "--backoff-base", "1s"],
    )
    .await;
    let out = server.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let out = server.wasmctl_stdin(&["apply", "-f", "-"], Some(APP));
    assert!(out.status.success(), "apply: {}", stderr(&out));

    let t = Duration::from_secs(120);
    wait_for(t, "4 ready endpoints on both nodes", || async {
        let addrs = ready_addresses(&server).await;
        let nodes: std::collections::BTreeSet<_> = addrs.iter().map(|a| a.1.clone()).collect();
        (addrs.len() == 4 && nodes.len() == 2).then_some(())
    })
    .await;
    let (code, svc) = server
        .call(Method::GET, "/api/v1/namespaces/default/services/web", None)
        .await;
    assert_eq!(code, 200);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap_or_default();
    assert!(cluster_ip.starts_with("127.97."), "{svc}");

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let urls: Vec<String> = agents
        .iter()
        .map(|a| format!("http://{}:30080/", a.node_ip()))
        .collect();
    for url in &urls {
        wait_for(t, &format!("{url} to answer"), || async {
            match http.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        })
        .await;
    }
    // Either node's NodePort reaches every replica, on both nodes (per request, over one
    // keep-alive connection).
    for url in &urls {
        let by_pod = spread(&http, url, 80).await;
        assert_eq!(by_pod.len(), 4, "{url}: {by_pod:?}");
    }
    // The ClusterIP answers too (any agent of this host may take the connection).
    let by_pod = spread(&http, &format!("http://{cluster_ip}/"), 40).await;
    assert_eq!(by_pod.len(), 4, "ClusterIP: {by_pod:?}");

    // Lose node-a: node-b's NodePort keeps answering every request, first by retrying the
    // endpoints that refuse connections, then because the Endpoints no longer list them.
    let _ = agents[0].child.kill();
    let _ = agents[0].child.wait();
    spread(&http, &urls[1], 40).await;
    wait_for(t, "the Endpoints to list node-b's pods only", || async {
        let addrs = ready_addresses(&server).await;
        (!addrs.is_empty() && addrs.iter().all(|a| a.1 == "node-b")).then_some(())
    })
    .await;
    let by_pod = spread(&http, &urls[1], 40).await;
    let (code, pods) = server
        .call(Method::GET, "/api/v1/namespaces/default/pods", None)
        .await;
    assert_eq!(code, 200);
    let node_of: BTreeMap<String, String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p: &Value| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for pod in by_pod.keys() {
        assert_eq!(
            node_of.get(pod).map(String::as_str),
            Some("node-b"),
            "{by_pod:?}"
        );
    }
}

const CALLERS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: hello
        image: hello:v1
        ports:
        - name: web
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: web
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: web
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 1
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      containers:
      - name: echo
        image: echo:v1
        ports:
        - containerPort: 9000
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector:
    app: echo
  ports:
  - name: echo
    port: 9000
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: front
spec:
  replicas: 1
  selector:
    matchLabels:
      app: front
  template:
    metadata:
      labels:
        app: front
    spec:
      containers:
      - name: frontend
        image: frontend:v1
        env:
        - name: GREETER_URL
          value: http://web/
        - name: ECHO_ADDR
          value: echo.default.svc.cluster.local:9000
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: front
spec:
  type: NodePort
  selector:
    app: front
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: 30081
"#;

/// A component calls Services by name: wasi:http to `http://web/` (balanced by its agent,
/// in-process for the replica on its own node) and a TCP connect to
/// `echo.default.svc.cluster.local:9000` (resolved to the ClusterIP, through the proxy),
/// with no egress annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_call_services_by_name_over_http_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agents) = service_cluster(
        dir.path(),
        &["node-a", "node-b"],
        &[],
        &["--backoff-base", "1s"],
    )
    .await;
    for app in ["hello", "echo", "frontend"] {
        let out = server.wasmctl(&[
            "push",
            wasi_app(app).to_str().unwrap(),
            &format!("{app}:v1"),
        ]);
        assert!(out.status.success(), "push {app}: {}", stderr(&out));
    }
    let out = server.wasmctl_stdin(&["apply", "-f", "-"], Some(CALLERS));
    assert!(out.status.success(), "apply: {}", stderr(&out));

    let t = Duration::from_secs(120);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://{}:30081", agents[0].node_ip());
    // Through the NodePort to the frontend, which calls `web` by name.
    let pods = std::sync::Mutex::new(std::collections::BTreeSet::new());
    wait_for(
        t,
        "the frontend to reach both web replicas by name",
        || async {
            let r = http.get(format!("{base}/http")).send().await.ok()?;
            let body = r.text().await.ok()?;
            let pod = body.trim().strip_prefix("frontend got: hello from ")?;
            let mut pods = pods.lock().unwrap();
            pods.insert(pod.to_string());
            (pods.len() == 2).then_some(())
        },
    )
    .await;
    let body = wait_for(t, "the frontend to reach echo over TCP by name", || async {
        let r = http.get(format!("{base}/tcp")).send().await.ok()?;
        let ok = r.status().is_success();
        let body = r.text().await.ok()?;
        ok.then_some(body)
    })
    .await;
    assert_eq!(body.trim(), "frontend got: echo: ping");
}

fn web(replicas: u32, greeting: &str) -> String {
    APP.split("---").next().unwrap().replace(
        "replicas: 4",
        &format!("replicas: {replicas}"),
    ).replace(
        "        image: hello:v1\n",
        &format!("        image: hello:v1\n        env:\n        - name: GREETING\n          value: {greeting}\n"),
    )
}

/// Load through both NodePorts while the Deployment rolls, scales down and loses a pod:
/// not one request fails (Kubernetes' zero-downtime promise with readiness gates and
/// graceful termination; here the proxy also retries what never reached a pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_scale_down_and_pod_deletion_under_load_fail_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (server, agents) = service_cluster(
        dir.path(),
        &["node-a", "node-b"],
        &[],
        &["--backoff-base", "1s"],
    )
    .await;
    let out = server.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push: {}", stderr(&out));
    let apply = |yaml: &str| {
        let out = server.wasmctl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply: {}", stderr(&out));
    };
    apply(APP);
    let t = Duration::from_secs(120);
    wait_for(t, "4 ready endpoints", || async {
        (ready_addresses(&server).await.len() == 4).then_some(())
    })
    .await;
    let urls: Vec<String> = agents
        .iter()
        .map(|a| format!("http://{}:30080/", a.node_ip()))
        .collect();

    // 4 clients per node, keep-alive, back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for url in urls.iter().cycle().take(8) {
        let (url, stop, ok, failures) = (url.clone(), stop.clone(), ok.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let code = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{url}: {code} {body}"));
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{url}: {e}")),
                }
            }
        }));
    }
    let served = |n: usize| {
        let ok = ok.clone();
        async move {
            let start = ok.load(Ordering::Relaxed);
            wait_for(Duration::from_secs(30), "requests to flow", || async {
                (ok.load(Ordering::Relaxed) >= start + n).then_some(())
            })
            .await;
        }
    };
    served(50).await;

    // A rolling update (new template: GREETING changes).
    apply(&web(4, "hi"));
    let out = server.wasmctl(&["rollout", "status", "deployment/web", "--timeout", "120s"]);
    assert!(
        out.status.success(),
        "rollout: {}{}",
        stdout(&out),
        stderr(&out)
    );
    served(50).await;
    // Scale down.
    apply(&web(2, "hi"));
    wait_for(t, "2 ready endpoints", || async {
        (ready_addresses(&server).await.len() == 2).then_some(())
    })
    .await;
    served(50).await;
    // Delete a pod (its ReplicaSet replaces it).
    let victim = ready_addresses(&server).await;
    let (code, pods) = server
        .call(Method::GET, "/api/v1/namespaces/default/pods", None)
        .await;
    assert_eq!(code, 200);
    let name = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["status"]["podIP"] == victim[0].0.as_str())
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .expect("the endpoint's pod");
    let out = server.wasmctl(&["delete", "pod", &name]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    wait_for(t, "the replacement pod to be an endpoint", || async {
        let now = ready_addresses(&server).await;
        (now.len() == 2 && !now.iter().any(|a| a.0 == victim[0].0)).then_some(())
    })
    .await;
    served(50).await;

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    let total = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(10)]
    );
}
