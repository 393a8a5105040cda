//! Clients of the API servers: the `kubernetes` Service and Endpoints in `default` list them
//! (kept by the servers' leases), and `wasmctl` and the agents fail over to another server
//! when the one of their kubeconfig dies.

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::ha::Cluster;
use crate::support::{stderr, stdout, wait_for, AgentProc, ServerProc};

const ENDPOINTS: &str = "/api/v1/namespaces/default/endpoints/kubernetes";
const SERVICE: &str = "/api/v1/namespaces/default/services/kubernetes";

fn kubectl(s: &ServerProc, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(args)
        .env("HOME", s.data_dir.join("kubectl-home"))
        .output()
        .expect("kubectl must be installed (apt-get install kubectl, or see README)")
}

/// `ip:port` of every address of the Endpoints, with the port of its subset.
fn addresses(ep: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ss in ep["subsets"].as_array().into_iter().flatten() {
        let port = &ss["ports"][0]["port"];
        assert_eq!(ss["ports"][0]["name"], "https", "{ep}");
        for a in ss["addresses"].as_array().into_iter().flatten() {
            out.insert(format!("{}:{port}", a["ip"].as_str().unwrap()));
        }
    }
    out
}

fn address(s: &ServerProc) -> String {
    s.url.trim_start_matches("https://").to_string()
}

/// The servers the client of `s`'s kubeconfig has cached beside it.
fn cached_servers(s: &ServerProc) -> String {
    let dir = s.kubeconfig.parent().unwrap().join("cache");
    let mut out = String::new();
    for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
    }
    out
}

async fn get(s: &ServerProc, path: &str) -> Option<Value> {
    let (code, body) = s.call(Method::GET, path, None).await;
    (code == 200).then_some(body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_server_is_the_kubernetes_service() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let me = address(&s);
    let port: i64 = me.rsplit(':').next().unwrap().parse().unwrap();
    let ep = wait_for(
        Duration::from_secs(20),
        "Endpoints default/kubernetes listing the server",
        || async {
            get(&s, ENDPOINTS)
                .await
                .filter(|ep| addresses(ep) == BTreeSet::from([me.clone()]))
        },
    )
    .await;
    assert_eq!(ep["metadata"]["labels"]["provider"], "kubernetes", "{ep}");
    let svc = get(&s, SERVICE)
        .await
        .expect("the Service exists with its Endpoints");
    let spec = &svc["spec"];
    assert_eq!(spec["type"], "ClusterIP", "{svc}");
    // kube's: the first address of the range.
    assert_eq!(spec["clusterIP"], "127.96.0.1", "{svc}");
    assert!(spec.get("selector").is_none(), "{svc}");
    assert_eq!(
        spec["ports"],
        json!([{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]),
        "{svc}"
    );
    // The server wrote a loopback address no client may write (its own write path); a
    // client's write of these Endpoints is validated like any other.
    let (code, body) = s.call(Method::PUT, ENDPOINTS, Some(&ep)).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("may not be in the loopback range"),
        "{body}"
    );
    // The CLI learns the servers and keeps them beside the kubeconfig.
    let o = s.wasmctl(&["get", "ns"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        cached_servers(&s).contains(&s.url),
        "{}",
        cached_servers(&s)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_and_agents_fail_over_when_their_server_dies() {
    let mut c = Cluster::form(3).await;
    let all: BTreeSet<String> = c.servers.iter().map(address).collect();
    let first = &c.servers[0];
    wait_for(
        Duration::from_secs(30),
        "kubectl to show the three servers in Endpoints default/kubernetes",
        || async {
            let o = kubectl(
                first,
                &[
                    "get",
                    "endpoints",
                    "kubernetes",
                    "-n",
                    "default",
                    "-o",
                    "json",
                ],
            );
            let ep: Value = serde_json::from_slice(&o.stdout).ok()?;
            (addresses(&ep) == all).then_some(())
        },
    )
    .await;
    // wasmctl learns them (and keeps them for its next run).
    let o = first.wasmctl(&["get", "ns"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cached = cached_servers(first);
    for s in &c.servers {
        assert!(cached.contains(&s.url), "{cached}");
    }
    // An agent of server 1's kubeconfig.
    let agent = AgentProc::start(
        first,
        "ha-node",
        &c.dir.path().join("agent"),
        &["--lease-renew", "500ms"],
    )
    .await;
    let other = &c.servers[1];
    let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/ha-node";
    wait_for(Duration::from_secs(20), "the agent's Lease", || {
        get(other, lease)
    })
    .await;

    c.servers[0].kill();
    let (first, other) = (&c.servers[0], &c.servers[1]);

    // The next wasmctl run still works with server 1's kubeconfig.
    let o = wait_for(
        Duration::from_secs(20),
        "wasmctl get ns with the dead server's kubeconfig",
        || async {
            let o = first.wasmctl(&["get", "ns"]);
            o.status.success().then_some(o)
        },
    )
    .await;
    assert!(stdout(&o).contains("kube-system"), "{}", stdout(&o));

    // The agent's heartbeats go on through another server...
    let t0 = wait_for(
        Duration::from_secs(20),
        "the Lease after the kill",
        || async {
            let l = get(other, lease).await?;
            l["spec"]["renewTime"].as_str().map(str::to_owned)
        },
    )
    .await;
    wait_for(
        Duration::from_secs(20),
        "the Lease to be renewed",
        || async {
            let l = get(other, lease).await?;
            (l["spec"]["renewTime"].as_str()? != t0).then_some(())
        },
    )
    .await;
    // ...and its pod watch too: a pod bound to it now gets its status from it.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"nodeName": agent.name, "containers": [{"name": "c", "image": "missing:v1"}]}});
    wait_for(Duration::from_secs(20), "the pod created", || async {
        let (code, _) = other
            .call(Method::POST, "/api/v1/namespaces/default/pods", Some(&pod))
            .await;
        (code == 201 || code == 409).then_some(())
    })
    .await;
    let p = wait_for(
        Duration::from_secs(30),
        "the agent to report the pod",
        || async {
            let p = get(other, "/api/v1/namespaces/default/pods/p").await?;
            p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                .as_str()?
                .contains("Image")
                .then_some(p)
        },
    )
    .await;
    assert_eq!(p["spec"]["nodeName"], "ha-node", "{p}");

    // Server 1's lease expires: the Endpoints no longer list it.
    let rest: BTreeSet<String> = c.servers[1..].iter().map(address).collect();
    wait_for(
        Duration::from_secs(30),
        "the Endpoints to drop the dead server",
        || async {
            get(other, ENDPOINTS)
                .await
                .filter(|ep| addresses(ep) == rest)
        },
    )
    .await;
    drop(agent);
}
