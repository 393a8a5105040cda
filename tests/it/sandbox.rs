//! A hostile guest against its node (issue 11, items 1, 2, 4, 5, 8, 11): the `hostile`
//! component of `wasi-apps/` tries what a tenant with only a pod spec could, on a real agent,
//! next to a real "host service" listening on `0.0.0.0` as sshd or a database would.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, ToSocketAddrs};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::agent::{pod_ip, Cluster};
use crate::support::*;

const SECRET: &str = "HOST-SECRET";

/// A host service on `0.0.0.0:PORT` answering every connection with an HTTP response whose
/// body is [`SECRET`]. Linux delivers a connection to any 127/8 address to it.
fn host_service() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{SECRET}",
                    SECRET.len()
                )
                .as_bytes(),
            );
        }
    });
    port
}

fn hostile_pod(name: &str, egress: Option<&str>) -> Value {
    let mut meta = json!({ "name": name });
    if let Some(e) = egress {
        meta["annotations"] = json!({ "wasmctl.dev/egress": e });
    }
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": { "nodeName": "node-1", "containers": [{
            "name": "hostile", "image": "hostile:v1",
            "ports": [{ "containerPort": 8080 }],
        }]},
    })
}

/// One attempt of the hostile guest: its status and body.
async fn attempt(ip: &str, what: &str) -> (u16, String) {
    http_get(&format!("http://{ip}:8080/{what}"))
        .await
        .unwrap_or_else(|| panic!("the hostile pod did not answer {what}"))
}

/// Records `what` in `leaks` unless the sandbox refused it (every attempt is tried, and the
/// test reports all that got through at once).
async fn refused(leaks: &mut Vec<String>, ip: &str, what: &str) {
    let (code, body) = attempt(ip, what).await;
    if code != 502 || body.contains(SECRET) {
        leaks.push(format!("{what}: {code} {}", body.trim()));
    }
}

/// The machine's own host name, if the host's resolver answers it with a loopback address
/// (Debian's /etc/hosts does): a name a pod must not get resolved, nor reach.
fn loopback_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()?
        .trim()
        .to_string();
    let loopback = (name.as_str(), 0)
        .to_socket_addrs()
        .ok()?
        .any(|a| a.ip().is_loopback());
    (loopback && !name.is_empty()).then_some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_guest_reaches_nothing_of_its_node() {
    let c = Cluster::start(&[]).await;
    c.push("hostile", "hostile:v1");
    c.push("hello", "hello:v1");
    let port = host_service();

    // A Service (its ClusterIP listens on port 80 only) and a namespace `com` with a Service
    // `github`, as a tenant could create them.
    let (code, body) = c
        .server
        .call(
            Method::POST,
            "/api/v1/namespaces/default/services",
            Some(
                &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let cluster_ip = body["spec"]["clusterIP"].as_str().unwrap().to_string();
    let (code, body) = c
        .server
        .call(
            Method::POST,
            "/api/v1/namespaces",
            Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "com"}})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    for (path, obj) in [
        (
            "/api/v1/namespaces/com/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "github"},
                "spec": {"selector": {"app": "capture"}, "ports": [{"port": 80, "targetPort": 8080, "name": "http"}]}}),
        ),
        (
            "/api/v1/namespaces/com/pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "capture", "labels": {"app": "capture"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "hello", "image": "hello:v1",
                    "env": [{"name": "GREETING", "value": "captured"}],
                    "ports": [{"containerPort": 8080}]}]}}),
        ),
    ] {
        let (code, body) = c.server.call(Method::POST, path, Some(&obj)).await;
        assert_eq!(code, 201, "{body}");
    }

    c.create_pod(hostile_pod("hostile", None)).await;
    c.create_pod(hostile_pod("hostile-all", Some("*"))).await;
    c.create_pod(hostile_pod("hostile-gh", Some("github.com")))
        .await;
    let none = pod_ip(&c.wait_ready("hostile").await);
    let all = pod_ip(&c.wait_ready("hostile-all").await);
    let gh = pod_ip(&c.wait_ready("hostile-gh").await);
    let mut leaks = Vec::new();

    // Item 1: the host's wildcard listeners are not the pod's "localhost", and a ClusterIP is
    // reachable on its Service's ports only.
    for ip in [&none, &all] {
        refused(&mut leaks, ip, &format!("connect?addr=127.0.0.1:{port}")).await;
        refused(&mut leaks, ip, &format!("connect?addr=localhost:{port}")).await;
        refused(
            &mut leaks,
            ip,
            &format!("http?url=http://localhost:{port}/"),
        )
        .await;
        refused(
            &mut leaks,
            ip,
            &format!("http?url=http://127.0.0.1:{port}/"),
        )
        .await;
        refused(&mut leaks, ip, &format!("connect?addr={cluster_ip}:{port}")).await;
    }

    // Item 8: egress "*" is not the node: no numeric spelling of loopback, no other 127/8
    // address, no IPv4-mapped form, no name that resolves to it.
    for url in [
        format!("http://2130706433:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://127.0.0.2:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://{cluster_ip}:{port}/"),
    ] {
        refused(&mut leaks, &all, &format!("http?url={url}")).await;
    }
    refused(&mut leaks, &all, &format!("connect?addr=127.0.0.2:{port}")).await;
    // Userinfo in the authority is refused outright.
    refused(
        &mut leaks,
        &all,
        &format!("http?url=http://user@example.com:{port}/"),
    )
    .await;

    // Item 4: without egress, names other than Services and localhost are never handed to
    // the host's resolver (no exfiltration through DNS queries).
    if let Some(name) = loopback_hostname() {
        refused(&mut leaks, &none, &format!("resolve?name={name}")).await;
        refused(&mut leaks, &all, &format!("http?url=http://{name}:{port}/")).await;
        refused(&mut leaks, &all, &format!("connect?addr={name}:{port}")).await;
    }
    let (code, body) = attempt(&none, "resolve?name=web").await;
    assert_eq!(
        (code, body.trim()),
        (200, format!("ok: {cluster_ip}").as_str())
    );

    // Item 5: a Service never shadows a host the pod's egress reaches.
    wait_for(Duration::from_secs(60), "capture pod ready", || async {
        let (code, body) = c
            .server
            .call(Method::GET, "/api/v1/namespaces/com/pods/capture", None)
            .await;
        (code == 200 && crate::agent::is_ready(&body)).then_some(())
    })
    .await;
    let (code, body) = wait_for(
        Duration::from_secs(30),
        "github.com as a Service from a pod without egress",
        || async {
            let r = attempt(&none, "http?url=http://github.com/").await;
            r.1.contains("captured").then_some(r)
        },
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for ip in [&gh, &all] {
        let (code, body) = attempt(ip, "http?url=http://github.com/").await;
        if body.contains("captured") {
            leaks.push(format!(
                "github.com captured by Service com/github: {code} {body}"
            ));
        }
    }
    // With egress, a Service in another namespace is named with `.svc`.
    let (code, body) = attempt(&all, "http?url=http://github.com.svc/").await;
    assert!(body.contains("captured"), "{code} {body}");

    // Item 2: one pod holds at most its socket budget (1024 by default), and gets it back.
    for _ in 0..2 {
        let (code, body) = attempt(&none, "sockets?n=1500").await;
        if code != 200 || !body.contains("held 1024 sockets") {
            leaks.push(format!("socket budget: {code} {}", body.trim()));
        }
    }
    // The node is unharmed: its other pods still answer.
    let (code, body) = attempt(&all, "spin?ms=1").await;
    assert_eq!(code, 200, "{body}");

    // Item 11: a trap answers a plain 500; the backtrace goes to the container's log.
    let (code, body) = attempt(&none, "trap").await;
    assert_eq!(code, 500);
    for leak in ["wasm", "backtrace", "unreachable", "hostile"] {
        if body.contains(leak) {
            leaks.push(format!("the trap's 500 body leaks {leak:?}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "the sandbox let these through: {leaks:#?}"
    );
    wait_for(
        Duration::from_secs(10),
        "the trap in the container's log",
        || async {
            let out = c.server.wasmctl(&["logs", "hostile"]);
            stdout(&out).contains("unreachable").then_some(())
        },
    )
    .await;
}

/// Runs `wasmctl agent` with `args` and returns its exit status and stderr, or panics if it
/// is still running after 30 s.
fn agent_exit(
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
    args: &[&str],
) -> (bool, String) {
    let mut child = std::process::Command::new(bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "agent",
            "--name",
            "refused",
            "--kubelet-port",
            "0",
            "--data-dir",
        ])
        .arg(dir)
        .args(["--dns-listen", "127.0.0.1:0"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (status.success(), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wasmctl agent {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Item 13: the agent endpoint never runs without a token, a client that never finishes its
/// request head is cut off, and a pod CIDR that would hand out the host's addresses is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_endpoint_is_closed_to_strangers() {
    let c = Cluster::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();

    let kubeconfig = std::fs::read_to_string(&c.server.kubeconfig).unwrap();
    let tokenless: String = kubeconfig
        .lines()
        .filter(|l| !l.trim_start().starts_with("token:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        tokenless, kubeconfig,
        "the kubeconfig carries a token to remove"
    );
    let path = dir.path().join("tokenless.yaml");
    std::fs::write(&path, tokenless).unwrap();
    let (ok, err) = agent_exit(&path, &dir.path().join("a"), &["--node-ip", "127.0.0.1"]);
    assert!(!ok && err.contains("no bearer token"), "{err}");

    for (cidr, why) in [
        ("127.0.0.0/16", "127.0.0.0/24"),
        ("127.96.0.0/20", "service range"),
        ("127.251.0.0/16", "node IP"),
    ] {
        let (ok, err) = agent_exit(
            &c.server.kubeconfig,
            &dir.path().join("b"),
            &["--node-ip", "127.251.0.9", "--pod-cidr", cidr],
        );
        assert!(!ok && err.contains(why), "--pod-cidr {cidr}: {err}");
    }

    // A client that opens a connection and never finishes its request head.
    let (code, node) = c
        .server
        .call(Method::GET, "/api/v1/nodes/node-1", None)
        .await;
    assert_eq!(code, 200);
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(b"GET /containerLogs/default/x/y HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(25), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the agent endpoint kept a connection with half a request head open for 25 s"
    );
}

/// Review leftover of item 2: the pods of a node together hold at most the node's socket
/// budget (`--max-guest-sockets`), so many pods at their own budget of 1024 cannot take the
/// agent's file descriptors; a socket given back is available to the others again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_of_a_node_share_its_socket_budget() {
    let c = Cluster::start(&["--max-guest-sockets", "1500"]).await;
    c.push("hostile", "hostile:v1");
    c.create_pod(hostile_pod("hoard-a", None)).await;
    c.create_pod(hostile_pod("hoard-b", None)).await;
    let a = pod_ip(&c.wait_ready("hoard-a").await);
    let b = pod_ip(&c.wait_ready("hoard-b").await);
    // hoard-a holds 1000 sockets for a while (and says so in its log once it has them all);
    // meanwhile hoard-b gets only what is left of the node's 1500.
    let holding = {
        let a = a.clone();
        tokio::spawn(async move { attempt(&a, "sockets?n=1000&hold_ms=6000").await })
    };
    wait_for(
        std::time::Duration::from_secs(30),
        "hoard-a to hold its sockets",
        || async {
            let out = c.server.wasmctl(&["logs", "hoard-a"]);
            stdout(&out).contains("holding 1000 sockets").then_some(())
        },
    )
    .await;
    let (code, got) = attempt(&b, "sockets?n=1000").await;
    assert_eq!(code, 200, "{got}");
    assert!(got.contains("held 500 sockets"), "{got}");
    assert!(got.contains("No file descriptors"), "{got}");
    let (code, body) = holding.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("held 1000 sockets"), "{body}");
    // Given back: hoard-b gets its 1000 again.
    let (_, body) = attempt(&b, "sockets?n=1000").await;
    assert!(body.contains("held 1000 sockets"), "{body}");
}
