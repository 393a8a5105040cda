//! The node agent and the wasm pod runtime: a real server, a real agent process, real
//! wasmtime running the components from `wasi-apps/`, real sockets on 127.0.0.0/8.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

/// Fields drop in order: the agent stops before the server.
pub(crate) struct Cluster {
    pub(crate) agent: AgentProc,
    pub(crate) server: ServerProc,
    _dir: tempfile::TempDir,
}

const NODE: &str = "node-1";

impl Cluster {
    pub(crate) async fn start(agent_extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProc::start(&dir.path().join("server"), &[]).await;
        let mut extra = vec!["--backoff-base", "1s", "--lease-renew", "1s"];
        extra.extend_from_slice(agent_extra);
        let agent = AgentProc::start(&server, NODE, &dir.path().join("agent"), &extra).await;
        Cluster {
            server,
            agent,
            _dir: dir,
        }
    }

    pub(crate) fn push_file(
        &self,
        file: &std::path::Path,
        reference: &str,
    ) -> std::process::Output {
        self.server
            .wasmctl(&["push", file.to_str().unwrap(), reference])
    }

    pub(crate) fn push(&self, app: &str, reference: &str) -> String {
        let out = self.push_file(&wasi_app(app), reference);
        assert!(out.status.success(), "push failed: {}", stderr(&out));
        let s = stdout(&out);
        s.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .expect("digest printed")
            .to_string()
    }

    pub(crate) async fn create_pod(&self, pod: Value) {
        let (code, body) = self
            .server
            .call(Method::POST, "/api/v1/namespaces/default/pods", Some(&pod))
            .await;
        assert_eq!(code, 201, "{body}");
    }

    pub(crate) async fn pod(&self, name: &str) -> Value {
        let (code, body) = self
            .server
            .call(
                Method::GET,
                &format!("/api/v1/namespaces/default/pods/{name}"),
                None,
            )
            .await;
        if code == 200 {
            body
        } else {
            Value::Null
        }
    }

    /// Waits until `pred` holds for the pod, returning it.
    pub(crate) async fn wait_pod(
        &self,
        name: &str,
        what: &str,
        secs: u64,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(
            Duration::from_secs(secs),
            &format!("pod {name}: {what}"),
            || async {
                let p = self.pod(name).await;
                pred(&p).then_some(p)
            },
        )
        .await
    }

    pub(crate) async fn wait_ready(&self, name: &str) -> Value {
        self.wait_pod(name, "Ready", 60, is_ready).await
    }
}

pub(crate) fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

pub(crate) fn pod_ip(p: &Value) -> String {
    p["status"]["podIP"].as_str().expect("podIP").to_string()
}

fn container_status<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["status"]["containerStatuses"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

fn pod(name: &str, containers: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default", "labels": { "app": name } },
        "spec": { "nodeName": NODE, "containers": containers },
    })
}

fn hello_container(image: &str) -> Value {
    json!({
        "name": "hello", "image": image,
        "ports": [{ "name": "http", "containerPort": 8080 }],
        "readinessProbe": { "httpGet": { "path": "/", "port": "http" }, "periodSeconds": 1 },
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn node_registers_with_capacity_and_lease() {
    let c = Cluster::start(&[]).await;
    let (code, node) = c
        .server
        .call(Method::GET, "/api/v1/nodes/node-1", None)
        .await;
    assert_eq!(code, 200, "{node}");
    assert_eq!(
        node["metadata"]["labels"]["kubernetes.io/hostname"],
        "node-1"
    );
    assert_eq!(node["metadata"]["labels"]["kubernetes.io/os"], "linux");
    assert!(node["metadata"]["labels"]["kubernetes.io/arch"].is_string());
    assert_eq!(node["status"]["capacity"]["pods"], "110");
    assert!(node["status"]["capacity"]["cpu"].is_string());
    assert!(node["status"]["allocatable"]["memory"].is_string());
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True");
    assert_eq!(node["status"]["addresses"][0]["address"], "127.0.0.1");
    // The lease is renewed (every 1 s here).
    let path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1";
    let (_, first) = c.server.call(Method::GET, path, None).await;
    let t0 = first["spec"]["renewTime"].as_str().unwrap().to_string();
    wait_for(
        Duration::from_secs(10),
        "the lease to be renewed",
        || async {
            let (_, l) = c.server.call(Method::GET, path, None).await;
            (l["spec"]["renewTime"].as_str() != Some(&t0)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_components_share_localhost_over_http_and_tcp() {
    let c = Cluster::start(&[]).await;
    c.push("frontend", "frontend:v1");
    c.push("greeter", "greeter:v1");
    c.push("echo", "echo:v1");
    let duo = |name: &str| {
        pod(
            name,
            json!([
                { "name": "frontend", "image": "frontend:v1", "ports": [{ "containerPort": 8080 }],
                  "readinessProbe": { "httpGet": { "path": "/", "port": 8080 }, "periodSeconds": 1 } },
                { "name": "greeter", "image": "greeter:v1", "ports": [{ "containerPort": 8081 }] },
                { "name": "echo", "image": "echo:v1", "ports": [{ "containerPort": 9000 }],
                  "env": [{ "name": "PORT", "value": "9000" }],
                  "readinessProbe": { "tcpSocket": { "port": 9000 }, "periodSeconds": 1 } },
            ]),
        )
    };
    // Two pods whose components bind the same ports: each pod has its own loopback.
    c.create_pod(duo("duo-a")).await;
    c.create_pod(duo("duo-b")).await;
    for name in ["duo-a", "duo-b"] {
        let p = c.wait_ready(name).await;
        let ip = pod_ip(&p);
        assert!(ip.starts_with(&format!("127.{}.", c.agent.octet)), "{ip}");
        let (code, body) = http_get(&format!("http://{ip}:8080/http"))
            .await
            .expect("frontend answers");
        assert_eq!(
            (code, body.trim()),
            (200, "frontend got: greetings from greeter"),
            "{name}"
        );
        let (code, body) = http_get(&format!("http://{ip}:8080/tcp"))
            .await
            .expect("frontend answers");
        assert_eq!(
            (code, body.trim()),
            (200, "frontend got: echo: ping"),
            "{name}"
        );
        // The greeter port is reachable from the node too (podIP:containerPort).
        let (code, body) = http_get(&format!("http://{ip}:8081/")).await.unwrap();
        assert_eq!((code, body.trim()), (200, "greetings from greeter"));
    }
    let a = pod_ip(&c.pod("duo-a").await);
    let b = pod_ip(&c.pod("duo-b").await);
    assert_ne!(a, b);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_oomkills_and_cpu_hog_cannot_starve_a_neighbour() {
    let c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    c.push("mem-hog", "mem-hog:v1");
    c.push("cpu-hog", "cpu-hog:v1");
    c.create_pod(pod("neighbour", json!([hello_container("hello:v1")])))
        .await;
    let ip = pod_ip(&c.wait_ready("neighbour").await);

    let mut hog = pod(
        "mem-hog",
        json!([{ "name": "mem-hog", "image": "mem-hog:v1",
                 "resources": { "limits": { "memory": "32Mi" } } }]),
    );
    hog["spec"]["restartPolicy"] = json!("Never");
    c.create_pod(hog).await;
    let p = c
        .wait_pod("mem-hog", "OOMKilled", 60, |p| {
            container_status(p, "mem-hog")["state"]["terminated"]["reason"] == "OOMKilled"
        })
        .await;
    assert_eq!(p["status"]["phase"], "Failed");
    assert_eq!(
        container_status(&p, "mem-hog")["state"]["terminated"]["exitCode"],
        137
    );
    let logs = c.server.wasmctl(&["logs", "mem-hog"]);
    assert!(stdout(&logs).contains("allocated"), "{}", stdout(&logs));
    assert_eq!(
        http_get(&format!("http://{ip}:8080/")).await.unwrap().0,
        200
    );

    // Two CPU hogs (one per core), one limited to 200m, one unlimited: the neighbour still
    // answers every request promptly because guests yield every epoch tick.
    c.create_pod(pod(
        "cpu-hog",
        json!([{ "name": "cpu-hog", "image": "cpu-hog:v1", "resources": { "limits": { "cpu": "200m" } } }]),
    ))
    .await;
    c.create_pod(pod(
        "cpu-hog-2",
        json!([{ "name": "cpu-hog", "image": "cpu-hog:v1" }]),
    ))
    .await;
    for name in ["cpu-hog", "cpu-hog-2"] {
        c.wait_pod(name, "Running", 60, |p| p["status"]["phase"] == "Running")
            .await;
    }
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = std::time::Instant::now();
        let (code, body) = http_get(&format!("http://{ip}:8080/"))
            .await
            .expect("neighbour answers");
        assert_eq!(code, 200, "{body}");
        worst = worst.max(t.elapsed());
    }
    // A correctness bound (no starvation), not a performance figure: BENCHMARKS.md has those.
    assert!(
        worst < Duration::from_secs(2),
        "worst neighbour latency {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crasher_goes_into_crashloopbackoff_with_growing_delays() {
    let c = Cluster::start(&[]).await;
    c.push("crasher", "crasher:v1");
    c.create_pod(pod(
        "crasher",
        json!([{ "name": "crasher", "image": "crasher:v1" }]),
    ))
    .await;
    // Back-off base is 1 s here: restarts after 0 s, 1 s, 2 s, 4 s...
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let seen = &seen;
    let cr = &c;
    wait_for(
        Duration::from_secs(60),
        "back-offs of 1s, 2s and 4s",
        || async move {
            let p = cr.pod("crasher").await;
            let cs = container_status(&p, "crasher");
            if cs["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
                let msg = cs["state"]["waiting"]["message"]
                    .as_str()
                    .unwrap_or_default();
                if let Some(s) = msg
                    .strip_prefix("back-off ")
                    .and_then(|m| m.split('s').next())
                {
                    seen.lock().unwrap().insert(s.parse::<u64>().unwrap());
                }
                assert_eq!(cs["lastState"]["terminated"]["exitCode"], 1);
                assert_eq!(cs["lastState"]["terminated"]["reason"], "Error");
            }
            let seen = seen.lock().unwrap();
            ([1, 2, 4].iter().all(|d| seen.contains(d))).then_some(())
        },
    )
    .await;
    let p = c.pod("crasher").await;
    assert!(
        container_status(&p, "crasher")["restartCount"]
            .as_i64()
            .unwrap()
            >= 3
    );
    assert_eq!(p["status"]["phase"], "Running");
    let out = c.server.wasmctl(&["get", "pods"]);
    assert!(
        stdout(&out).contains("CrashLoopBackOff") || stdout(&out).contains("Error"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_liveness_probe_restarts_the_component() {
    let c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    let mut h = hello_container("hello:v1");
    h["livenessProbe"] = json!({ "httpGet": { "path": "/status/500", "port": 8080 }, "periodSeconds": 1, "failureThreshold": 2 });
    c.create_pod(pod("unhealthy", json!([h]))).await;
    let p = c
        .wait_pod("unhealthy", "a liveness restart", 60, |p| {
            container_status(p, "hello")["restartCount"]
                .as_i64()
                .unwrap_or(0)
                >= 1
        })
        .await;
    let last = &container_status(&p, "hello")["lastState"]["terminated"];
    assert!(
        last["message"]
            .as_str()
            .unwrap_or_default()
            .contains("liveness probe"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_captured_and_stream() {
    let c = Cluster::start(&[]).await;
    c.push("worker", "worker:v1");
    c.create_pod(pod(
        "worker",
        json!([{ "name": "worker", "image": "worker:v1", "env": [{ "name": "INTERVAL_MS", "value": "50" }] }]),
    ))
    .await;
    wait_for(Duration::from_secs(60), "ten ticks in the log", || async {
        let out = c.server.wasmctl(&["logs", "worker"]);
        (stdout(&out)
            .lines()
            .filter(|l| l.starts_with("tick"))
            .count()
            >= 10)
            .then_some(())
    })
    .await;
    let out = c
        .server
        .wasmctl(&["logs", "worker", "--tail", "2", "--timestamps"]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("20") && lines[0].contains("Z "),
        "{}",
        lines[0]
    );
    // stderr is captured too.
    let all = stdout(&c.server.wasmctl(&["logs", "worker", "-c", "worker"]));
    assert!(all.contains("worker stderr"), "{all}");

    // -f streams new lines as they are written.
    let mut follow = std::process::Command::new(bin())
        .arg("--kubeconfig")
        .arg(&c.server.kubeconfig)
        .args(["logs", "worker", "-f", "--tail", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut follow);
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(
            rx.recv_timeout(Duration::from_secs(20))
                .expect("a followed line"),
        );
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(got.iter().any(|l| l.starts_with("tick")), "{got:?}");

    // kubectl logs through the same API path.
    let kubectl = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&c.server.kubeconfig)
        .args(["logs", "worker", "--tail", "3"])
        .output()
        .expect("kubectl runs");
    assert!(kubectl.status.success(), "{}", stderr(&kubectl));
    assert_eq!(stdout(&kubectl).lines().count(), 3, "{}", stdout(&kubectl));
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_pull_by_digest_and_bad_modules_fail_cleanly() {
    let c = Cluster::start(&[]).await;
    let digest = c.push("hello", "hello:v1");
    // By digest.
    c.create_pod(pod(
        "by-digest",
        json!([hello_container(&format!("hello@{digest}"))]),
    ))
    .await;
    let p = c.wait_ready("by-digest").await;
    assert_eq!(container_status(&p, "hello")["imageID"], digest.as_str());
    assert_eq!(
        http_get(&format!("http://{}:8080/", pod_ip(&p)))
            .await
            .unwrap()
            .0,
        200
    );
    // A missing module: ErrImagePull, then ImagePullBackOff.
    c.create_pod(pod("missing", json!([hello_container("nope:v9")])))
        .await;
    c.wait_pod("missing", "ImagePullBackOff", 30, |p| {
        container_status(p, "hello")["state"]["waiting"]["reason"] == "ImagePullBackOff"
    })
    .await;
    // A corrupt module (valid magic, garbage after) and a core module: clear reasons.
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.wasm");
    std::fs::write(&corrupt, b"\0asm\x0d\x00\x01\x00\xff\xff\xff\xff garbage").unwrap();
    let out = c.push_file(&corrupt, "corrupt:v1");
    assert!(out.status.success(), "{}", stderr(&out));
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\x00\x00\x00").unwrap();
    let out = c.push_file(&core, "core:v1");
    assert!(out.status.success(), "{}", stderr(&out));
    let notwasm = dir.path().join("x.wasm");
    std::fs::write(&notwasm, b"#!/bin/sh\necho hi\n").unwrap();
    let out = c.push_file(&notwasm, "x:v1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a WebAssembly binary"),
        "{}",
        stderr(&out)
    );

    c.create_pod(pod("corrupt", json!([hello_container("corrupt:v1")])))
        .await;
    c.create_pod(pod("core", json!([hello_container("core:v1")])))
        .await;
    let p = c
        .wait_pod("corrupt", "CreateContainerError", 30, |p| {
            container_status(p, "hello")["state"]["waiting"]["reason"] == "CreateContainerError"
        })
        .await;
    let msg = container_status(&p, "hello")["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("invalid WebAssembly component"), "{msg}");
    let p = c
        .wait_pod("core", "CreateContainerError", 30, |p| {
            container_status(p, "hello")["state"]["waiting"]["reason"] == "CreateContainerError"
        })
        .await;
    let msg = container_status(&p, "hello")["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("core WebAssembly module"), "{msg}");
    // The node stays healthy and keeps serving.
    assert_eq!(
        http_get(&format!(
            "http://{}:8080/",
            pod_ip(&c.pod("by-digest").await)
        ))
        .await
        .unwrap()
        .0,
        200
    );
    c.create_pod(pod("after", json!([hello_container("hello:v1")])))
        .await;
    c.wait_ready("after").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_registry_pull_from_a_local_docker_registry() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: wasmctl-test\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let _registry = KillOnDrop(
        std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is installed (scripts/setup-deps.sh installs it)"),
    );
    wait_for(
        Duration::from_secs(30),
        "docker-registry to listen",
        || async {
            http_get(&format!("http://127.0.0.1:{port}/v2/"))
                .await
                .filter(|r| r.0 == 200)
        },
    )
    .await;
    let host = format!("127.0.0.1:{port}");
    let c = Cluster::start(&["--insecure-registry", &host]).await;
    let image = format!("{host}/apps/hello:v1");
    let file = wasi_app("hello");
    let out = c
        .server
        .wasmctl(&["push", "--insecure", file.to_str().unwrap(), &image]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.create_pod(pod("from-registry", json!([hello_container(&image)])))
        .await;
    let p = c.wait_ready("from-registry").await;
    let (code, body) = http_get(&format!("http://{}:8080/", pod_ip(&p)))
        .await
        .unwrap();
    assert_eq!((code, body.trim()), (200, "hello from from-registry"));
    let id = container_status(&p, "hello")["imageID"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("sha256:"), "{id}");
    // A tag that does not exist: ErrImagePull / ImagePullBackOff with the registry's error.
    c.create_pod(pod(
        "no-tag",
        json!([hello_container(&format!("{host}/apps/hello:v404"))]),
    ))
    .await;
    c.wait_pod("no-tag", "ImagePullBackOff", 30, |p| {
        let r = &container_status(p, "hello")["state"]["waiting"]["reason"];
        r == "ImagePullBackOff" || r == "ErrImagePull"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restart_readopts_its_pods() {
    let mut c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    for i in 0..3 {
        c.create_pod(pod(
            &format!("hello-{i}"),
            json!([hello_container("hello:v1")]),
        ))
        .await;
    }
    let mut ips = Vec::new();
    for i in 0..3 {
        ips.push(pod_ip(&c.wait_ready(&format!("hello-{i}")).await));
    }
    c.agent.restart().await;
    for (i, ip) in ips.iter().enumerate() {
        let name = format!("hello-{i}");
        wait_for(
            Duration::from_secs(60),
            &format!("{name} to answer again"),
            || async {
                http_get(&format!("http://{ip}:8080/"))
                    .await
                    .filter(|r| r.0 == 200)
            },
        )
        .await;
        let p = c.wait_ready(&name).await;
        assert_eq!(&pod_ip(&p), ip, "same pod IP after the restart");
    }
    let (_, list) = c
        .server
        .call(Method::GET, "/api/v1/namespaces/default/pods", None)
        .await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        3,
        "no duplicates, none lost"
    );
    // Deletion goes through the agent: the pod disappears once it has stopped.
    let out = c.server.wasmctl(&["delete", "pod", "hello-0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(Duration::from_secs(30), "hello-0 to be gone", || async {
        c.pod("hello-0").await.is_null().then_some(())
    })
    .await;
    assert!(
        http_get(&format!("http://{}:8080/", ips[0]))
            .await
            .is_none(),
        "its port is closed"
    );
}

/// `wasmctl up`: one process with the control plane and an agent; SIGINT stops it cleanly and
/// starting it again on the same data directory resumes every pod.
#[tokio::test(flavor = "multi_thread")]
async fn up_runs_an_all_in_one_cluster_and_resumes_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let octet = next_node_octet();
    let port = free_port();
    let start = || {
        let mut child = std::process::Command::new(bin())
            .args(["up", "--name", "node-1", "--kubelet-port", "0", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--pod-cidr")
            .arg(format!("127.{octet}.0.0/16"))
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let rx = stdout_lines(&mut child);
        let mut lines = Vec::new();
        while !lines
            .iter()
            .any(|l: &String| l.starts_with("node node-1 ready"))
        {
            lines.push(
                rx.recv_timeout(Duration::from_secs(120))
                    .expect("wasmctl up announces itself"),
            );
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("API server listening on https://127.0.0.1:")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("kubeconfig.yaml")),
            "{lines:?}"
        );
        child
    };
    let kubeconfig = dir.path().join("kubeconfig.yaml");
    let cli = |args: &[&str]| {
        std::process::Command::new(bin())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap()
    };
    let mut up = start();
    let hello = wasi_app("hello");
    let out = cli(&["push", hello.to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/demo-pod.yaml");
    let out = cli(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ip = wait_for(
        Duration::from_secs(60),
        "the demo pod to answer",
        || async {
            let out = cli(&["get", "pod", "hello", "-o", "json"]);
            let p: Value = serde_json::from_slice(&out.stdout).ok()?;
            let ip = p["status"]["podIP"].as_str()?.to_string();
            let (code, body) = http_get(&format!("http://{ip}:8080/")).await?;
            (code == 200 && body.trim() == "hello from hello").then_some(ip)
        },
    )
    .await;
    // Ctrl-C: a clean exit.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        http_get(&format!("http://{ip}:8080/")).await.is_none(),
        "the pod stopped with the process"
    );
    // Again: all state is back and the pod runs on the same IP.
    let _up = KillOnDrop(start());
    wait_for(
        Duration::from_secs(60),
        "the demo pod to answer again",
        || async {
            http_get(&format!("http://{ip}:8080/"))
                .await
                .filter(|r| r.0 == 200)
        },
    )
    .await;
}

/// Deletion drains: the in-flight request of a deleted pod completes, new connections are
/// refused, and the pod is removed once it has stopped (well before its grace period ends).
#[tokio::test(flavor = "multi_thread")]
async fn deletion_lets_in_flight_requests_finish_within_the_grace_period() {
    let c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    let mut p = pod("draining", json!([hello_container("hello:v1")]));
    p["spec"]["terminationGracePeriodSeconds"] = json!(20);
    c.create_pod(p).await;
    let ip = pod_ip(&c.wait_ready("draining").await);
    let slow = tokio::spawn({
        let url = format!("http://{ip}:8080/sleep/1500");
        async move { http_get(&url).await }
    });
    // Delete once the component has started on the request (it logs "sleeping").
    wait_for(
        Duration::from_secs(10),
        "the slow request to be in flight",
        || async {
            let out = c.server.wasmctl(&["logs", "draining"]);
            stdout(&out).contains("sleeping 1500 ms").then_some(())
        },
    )
    .await;
    let started = std::time::Instant::now();
    let out = c.server.wasmctl(&["delete", "pod", "draining"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(code, 200, "{body}");
    wait_for(Duration::from_secs(15), "the pod to be removed", || async {
        c.pod("draining").await.is_null().then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "removed once drained, not after the full grace period"
    );
    assert!(
        http_get(&format!("http://{ip}:8080/")).await.is_none(),
        "no new connections"
    );
}

/// A pod serves at most `--max-requests-per-pod` requests at once; the excess waits up to
/// 1 s for a slot and then gets 503, while the admitted ones complete.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_per_pod_are_bounded() {
    let c = Cluster::start(&["--max-requests-per-pod", "2"]).await;
    c.push("hello", "hello:v1");
    c.create_pod(pod("busy", json!([hello_container("hello:v1")])))
        .await;
    let ip = pod_ip(&c.wait_ready("busy").await);
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(http_get_owned(format!("http://{ip}:8080/sleep/4000"))))
        .collect();
    wait_for(
        Duration::from_secs(10),
        "both slow requests to be in the component",
        || async {
            let out = c.server.wasmctl(&["logs", "busy"]);
            (stdout(&out).matches("sleeping 4000 ms").count() == 2).then_some(())
        },
    )
    .await;
    let (code, body) = http_get(&format!("http://{ip}:8080/")).await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("concurrent request limit"), "{body}");
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().0, 200);
    }
    assert_eq!(
        http_get(&format!("http://{ip}:8080/")).await.unwrap().0,
        200
    );
}

async fn http_get_owned(url: String) -> Option<(u16, String)> {
    http_get(&url).await
}

/// The scheduler places pods created without `spec.nodeName`; a pod that fits nowhere gets
/// `PodScheduled=False` with kube-scheduler's reason.
#[tokio::test(flavor = "multi_thread")]
async fn scheduler_places_unbound_pods_and_explains_unschedulable_ones() {
    let c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    let mut p = pod("placed", json!([hello_container("hello:v1")]));
    p["spec"].as_object_mut().unwrap().remove("nodeName");
    c.create_pod(p).await;
    let placed = c.wait_ready("placed").await;
    assert_eq!(placed["spec"]["nodeName"], NODE);
    let mut big = pod(
        "too-big",
        json!([{ "name": "hello", "image": "hello:v1",
                 "resources": { "requests": { "memory": "64Ti" } } }]),
    );
    big["spec"].as_object_mut().unwrap().remove("nodeName");
    c.create_pod(big).await;
    let p = c
        .wait_pod("too-big", "PodScheduled=False", 30, |p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            })
        })
        .await;
    let cond = &p["status"]["conditions"][0];
    assert_eq!(cond["reason"], "Unschedulable");
    assert_eq!(
        cond["message"],
        "0/1 nodes are available: 1 Insufficient memory."
    );
    assert!(p["spec"]["nodeName"].as_str().unwrap_or("").is_empty());
    // And kube-scheduler's event, once, shown by `describe`.
    let path = "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dtoo-big";
    let events = wait_for(
        Duration::from_secs(10),
        "a FailedScheduling event",
        || async {
            let (_, list) = c.server.call(Method::GET, path, None).await;
            list["items"].as_array().filter(|i| !i.is_empty()).cloned()
        },
    )
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "FailedScheduling");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["source"]["component"], "default-scheduler");
    let out = c.server.wasmctl(&["describe", "pod", "too-big"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("Warning  FailedScheduling")
            && text.contains("default-scheduler  0/1 nodes are available: 1 Insufficient memory."),
        "{text}"
    );
}
