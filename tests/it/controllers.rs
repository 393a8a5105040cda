//! The scheduler and the controllers with real processes: one server, two agents, real
//! wasmtime pods. Deployments scale, roll, roll back, survive a lost node and a killed server,
//! and leave nothing behind when deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

use crate::support::*;

const PODS: &str = "/api/v1/namespaces/default/pods";
const RSS: &str = "/apis/apps/v1/namespaces/default/replicasets";

/// Fields drop in order: agents stop before the server.
struct Cluster {
    agents: Vec<AgentProc>,
    server: ServerProc,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(agents: &[&str], server_extra: &[&str], agent_extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProc::start(&dir.path().join("server"), server_extra).await;
        let mut c = Cluster {
            agents: Vec::new(),
            server,
            dir,
        };
        for name in agents {
            c.add_agent(name, agent_extra).await;
        }
        let out = c
            .server
            .wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
        assert!(out.status.success(), "push: {}", stderr(&out));
        let out = c
            .server
            .wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v2"]);
        assert!(out.status.success(), "push: {}", stderr(&out));
        c
    }

    async fn add_agent(&mut self, name: &str, extra: &[&str]) {
        let mut args = vec!["--lease-renew", "1s", "--backoff-base", "1s"];
        args.extend_from_slice(extra);
        let agent = AgentProc::start(&self.server, name, &self.dir.path().join(name), &args).await;
        self.agents.push(agent);
    }

    fn wasmctl(&self, args: &[&str]) -> std::process::Output {
        self.server.wasmctl(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.wasmctl(args);
        assert!(
            out.status.success(),
            "wasmctl {args:?} failed: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn apply(&self, yaml: &str) {
        let out = self.server.wasmctl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "apply: {}", stderr(&out));
    }

    async fn list(&self, path: &str) -> Vec<Value> {
        let (code, body) = self.server.call(Method::GET, path, None).await;
        assert_eq!(code, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Value {
        let (code, body) = self.server.call(Method::GET, path, None).await;
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Waits for `n` ready pods of `app` with `image` (and no others of the app, terminating
    /// ones aside); returns them.
    async fn wait_ready(&self, app: &str, image: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let what = format!("{n} ready {app} pods running {image}");
        wait_for(timeout, &what, || async {
            let pods: Vec<Value> = self
                .list(&format!("{PODS}?labelSelector=app%3D{app}"))
                .await
                .into_iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            let all_ready = pods.len() == n
                && pods
                    .iter()
                    .all(|p| is_ready(p) && p["spec"]["containers"][0]["image"] == image);
            all_ready.then_some(pods)
        })
        .await
    }

    fn rollout_status(&self, name: &str) {
        let deployment = format!("deployment/{name}");
        let out = self.wasmctl(&["rollout", "status", &deployment, "--timeout", "120s"]);
        if !out.status.success() {
            self.dump_and_panic(&format!("rollout status {name}"), &out);
        }
    }

    /// Panics with the command's output and what the controllers left behind.
    fn dump_and_panic(&self, what: &str, out: &std::process::Output) -> ! {
        let state = self.wasmctl(&["get", "deploy,rs,pods", "-o", "yaml"]);
        panic!("{what}: {}{}\n{}", stdout(out), stderr(out), stdout(&state));
    }
}

fn is_ready(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn nodes_of(pods: &[Value]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_string))
        .collect()
}

fn deployment(name: &str, image: &str, replicas: u32, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
{extra_spec}  template:
    metadata:
      labels:
        app: {name}
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
        image: {image}
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: http
          periodSeconds: 1
"#
    )
}

/// Follows the app's pods from a list + watch and records the fewest ready ones seen.
struct ReadyWatch {
    min: Arc<Mutex<usize>>,
    events: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    async fn start(c: &Cluster, app: &str) -> ReadyWatch {
        let list_path = format!("{PODS}?labelSelector=app%3D{app}");
        let (code, list) = c.server.call(Method::GET, &list_path, None).await;
        assert_eq!(code, 200);
        let mut ready: BTreeMap<String, bool> = BTreeMap::new();
        for p in list["items"].as_array().unwrap() {
            ready.insert(p["metadata"]["name"].as_str().unwrap().into(), is_ready(p));
        }
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let count = |m: &BTreeMap<String, bool>| m.values().filter(|r| **r).count();
        let min = Arc::new(Mutex::new(count(&ready)));
        let client = c.server.client();
        let path = format!("{list_path}&watch=1&resourceVersion={rv}");
        let mut stream = client.watch(&path, None).await.expect("watch opens");
        let m = min.clone();
        let events = Arc::new(Mutex::new(0));
        let seen = events.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                let obj = &ev["object"];
                let Some(name) = obj["metadata"]["name"].as_str() else {
                    continue;
                };
                match ev["type"].as_str() {
                    Some("DELETED") => {
                        ready.remove(name);
                    }
                    Some("ADDED" | "MODIFIED") => {
                        ready.insert(name.into(), is_ready(obj));
                    }
                    _ => continue,
                }
                *seen.lock().unwrap() += 1;
                let mut lowest = m.lock().unwrap();
                *lowest = (*lowest).min(count(&ready));
            }
        });
        ReadyWatch { min, events, task }
    }

    /// The fewest ready pods seen, and how many pod events were seen.
    fn stop(self) -> (usize, usize) {
        self.task.abort();
        let events = *self.events.lock().unwrap();
        (*self.min.lock().unwrap(), events)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_scales_rolls_without_dropping_below_min_available_rolls_back_and_cleans_up() {
    let c = Cluster::start(&["node-a", "node-b"], &[], &[]).await;
    let t = Duration::from_secs(90);
    c.apply(&deployment("web", "hello:v1", 1, ""));
    c.rollout_status("web");
    c.wait_ready("web", "hello:v1", 1, t).await;

    // Scale 1 → 10 → 3, through the CLI; the ten replicas spread over both nodes.
    c.ok(&["scale", "deployment/web", "--replicas", "10"]);
    let pods = c.wait_ready("web", "hello:v1", 10, t).await;
    assert_eq!(nodes_of(&pods).len(), 2, "replicas spread over both nodes");
    c.ok(&["scale", "deployment/web", "--replicas", "3"]);
    c.wait_ready("web", "hello:v1", 3, t).await;
    wait_for(t, "scaled-down pods to be gone", || async {
        (c.list(&format!("{PODS}?labelSelector=app%3Dweb"))
            .await
            .len()
            == 3)
            .then_some(())
    })
    .await;

    // Rolling update v1 → v2 at 4 replicas (maxSurge 1, maxUnavailable 1): never fewer than
    // 3 ready pods, as seen by a watch throughout.
    c.ok(&["scale", "deployment/web", "--replicas", "4"]);
    c.wait_ready("web", "hello:v1", 4, t).await;
    let watch = ReadyWatch::start(&c, "web").await;
    c.apply(&deployment("web", "hello:v2", 4, ""));
    c.rollout_status("web");
    let pods = c.wait_ready("web", "hello:v2", 4, t).await;
    let (lowest, events) = watch.stop();
    // 4 pods created, each becoming ready, 4 deleted: the watch saw the whole rollout.
    assert!(events >= 12, "the watch saw only {events} pod events");
    assert!(
        lowest >= 3,
        "ready pods dropped to {lowest} during the rollout"
    );
    assert!(pods
        .iter()
        .all(|p| p["metadata"]["labels"]["pod-template-hash"].is_string()));
    let d = c
        .get("/apis/apps/v1/namespaces/default/deployments/web")
        .await;
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    assert_eq!(d["status"]["updatedReplicas"], 4);
    assert_eq!(d["status"]["availableReplicas"], 4);
    let history = c.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("\n1 ") && history.contains("\n2 "),
        "{history}"
    );

    // Roll back to revision 1: the v1 ReplicaSet comes back as revision 3.
    let out = c.ok(&["rollout", "undo", "deployment/web", "--to-revision", "1"]);
    assert!(out.contains("rolled back"), "{out}");
    c.rollout_status("web");
    c.wait_ready("web", "hello:v1", 4, t).await;
    let rss = c.list(RSS).await;
    assert_eq!(rss.len(), 2, "one ReplicaSet per template");
    let v1 = rss
        .iter()
        .find(|rs| rs["spec"]["template"]["spec"]["containers"][0]["image"] == "hello:v1")
        .unwrap();
    assert_eq!(
        v1["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(v1["spec"]["replicas"], 4);

    // Deleting the Deployment removes its ReplicaSets and pods.
    c.ok(&["delete", "deployment", "web"]);
    wait_for(t, "the ReplicaSets and pods to be gone", || async {
        let left = c.list(RSS).await.len() + c.list(PODS).await.len();
        (left == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_reports_why_and_schedules_when_a_node_joins() {
    let mut c = Cluster::start(&["node-a"], &[], &["--max-pods", "1"]).await;
    let t = Duration::from_secs(90);
    c.apply(&deployment("web", "hello:v1", 2, ""));
    let pending = wait_for(t, "a pod to be reported unschedulable", || async {
        c.list(PODS).await.into_iter().find(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|cond| {
                    cond["type"] == "PodScheduled"
                        && cond["status"] == "False"
                        && cond["reason"] == "Unschedulable"
                })
        })
    })
    .await;
    let cond = pending["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .unwrap()
        .clone();
    assert_eq!(
        cond["message"], "0/1 nodes are available: 1 Too many pods.",
        "{cond}"
    );
    let name = pending["metadata"]["name"].as_str().unwrap().to_string();
    // kube-scheduler's Event comes with it.
    wait_for(t, "a FailedScheduling event", || async {
        c.list("/api/v1/namespaces/default/events")
            .await
            .into_iter()
            .find(|e| e["reason"] == "FailedScheduling" && e["involvedObject"]["name"] == name)
    })
    .await;

    c.add_agent("node-b", &["--max-pods", "1"]).await;
    let pods = c.wait_ready("web", "hello:v1", 2, t).await;
    assert_eq!(
        nodes_of(&pods),
        BTreeSet::from(["node-a".to_string(), "node-b".to_string()])
    );
    let placed = pods.iter().find(|p| p["metadata"]["name"] == name.as_str());
    assert_eq!(placed.unwrap()["spec"]["nodeName"], "node-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_lost_node_are_replaced_on_the_survivors_and_stopped_when_it_returns() {
    let mut c = Cluster::start(
        &["node-a", "node-b"],
        &["--node-monitor-grace-period", "3s"],
        &[],
    )
    .await;
    let t = Duration::from_secs(90);
    c.apply(&deployment("web", "hello:v1", 4, ""));
    let pods = c.wait_ready("web", "hello:v1", 4, t).await;
    assert_eq!(nodes_of(&pods).len(), 2);
    let on_a: Vec<String> = pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "node-a")
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();

    // Lose node-a: after the grace period (3 s) and the pods' toleration (2 s) its pods are
    // evicted and replaced on node-b.
    let _ = c.agents[0].child.kill();
    let _ = c.agents[0].child.wait();
    wait_for(t, "4 ready pods, all on node-b", || async {
        let ready: Vec<Value> = c.list(PODS).await.into_iter().filter(is_ready).collect();
        let on_b = ready.iter().all(|p| p["spec"]["nodeName"] == "node-b");
        (ready.len() == 4 && on_b).then_some(())
    })
    .await;
    let node = c.get("/api/v1/nodes/node-a").await;
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "Unknown");
    // The evicted pods wait, terminating, for their node.
    for p in &on_a {
        let pod = c.get(&format!("{PODS}/{p}")).await;
        assert!(pod["metadata"]["deletionTimestamp"].is_string(), "{pod}");
    }

    // node-a returns: it stops the replaced pods, which then disappear.
    c.agents[0].restart().await;
    wait_for(t, "the replaced pods to be stopped and removed", || async {
        let left = c
            .list(PODS)
            .await
            .iter()
            .filter(|p| p["spec"]["nodeName"] == "node-a")
            .count();
        (left == 0).then_some(())
    })
    .await;
    assert_eq!(c.wait_ready("web", "hello:v1", 4, t).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_interrupted_by_a_server_crash_completes_after_restart() {
    let mut c = Cluster::start(&["node-a"], &[], &[]).await;
    let t = Duration::from_secs(120);
    // minReadySeconds slows the rollout down so that the crash lands in its middle.
    let slow = "  minReadySeconds: 1\n";
    c.apply(&deployment("web", "hello:v1", 10, slow));
    c.rollout_status("web");
    c.apply(&deployment("web", "hello:v2", 10, slow));
    wait_for(t, "the rollout to be under way", || async {
        let d = c
            .get("/apis/apps/v1/namespaces/default/deployments/web")
            .await;
        let updated = d["status"]["updatedReplicas"].as_i64().unwrap_or(0);
        (1..10).contains(&updated).then_some(())
    })
    .await;
    c.server.restart().await; // SIGKILL, then start on the same data dir and port
    c.rollout_status("web");
    c.wait_ready("web", "hello:v2", 10, t).await;
    wait_for(t, "exactly 10 pods, no extra or missing", || async {
        (c.list(PODS).await.len() == 10).then_some(())
    })
    .await;
    let rss = c.list(RSS).await;
    assert_eq!(rss.len(), 2);
    let replicas: BTreeSet<i64> = rss
        .iter()
        .map(|rs| rs["spec"]["replicas"].as_i64().unwrap())
        .collect();
    assert_eq!(replicas, BTreeSet::from([0, 10]));
}

/// The revision of each DELETED event of the watched collections, by `kind/name`.
async fn deletions(c: &Cluster, paths: &[&str], from: &str, until: usize) -> BTreeMap<String, u64> {
    let client = c.server.client();
    let mut out = BTreeMap::new();
    let mut streams = Vec::new();
    for p in paths {
        let path = format!("{p}?watch=1&resourceVersion={from}");
        streams.push(client.watch(&path, None).await.expect("watch opens"));
    }
    let mut merged = futures_util::stream::select_all(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < until {
        let ev = tokio::time::timeout_at(deadline, merged.next())
            .await
            .unwrap_or_else(|_| panic!("only {} deletions seen: {out:?}", out.len()))
            .expect("watch open")
            .expect("watch event");
        if ev["type"] == "DELETED" {
            let o = &ev["object"];
            let key = format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            );
            let rv = o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            out.insert(key, rv);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_propagation_orphan_foreground_and_background() {
    let c = Cluster::start(&["node-a"], &[], &[]).await;
    let t = Duration::from_secs(90);
    const DEPLOY: &str = "/apis/apps/v1/namespaces/default/deployments";
    c.apply(&deployment("web", "hello:v1", 2, ""));
    c.rollout_status("web");
    let pods = c.wait_ready("web", "hello:v1", 2, t).await;
    let names: BTreeSet<String> = pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();

    // Orphan: the Deployment goes, its ReplicaSet and pods stay, without the reference.
    c.ok(&["delete", "deployment", "web", "--cascade=orphan"]);
    wait_for(t, "the orphaning to finish", || async {
        let gone = c
            .server
            .call(Method::GET, &format!("{DEPLOY}/web"), None)
            .await
            .0
            == 404;
        let rss = c.list(RSS).await;
        let orphaned = rss.len() == 1 && rss[0]["metadata"]["ownerReferences"].is_null();
        (gone && orphaned).then_some(())
    })
    .await;
    let still: BTreeSet<String> = c
        .wait_ready("web", "hello:v1", 2, t)
        .await
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(still, names, "orphaned pods keep running");

    // The same Deployment again adopts the ReplicaSet: no new pods.
    c.apply(&deployment("web", "hello:v1", 2, ""));
    c.rollout_status("web");
    wait_for(t, "the ReplicaSet to be adopted", || async {
        let rss = c.list(RSS).await;
        (rss.len() == 1 && rss[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment")
            .then_some(())
    })
    .await;
    let again: BTreeSet<String> = c
        .list(PODS)
        .await
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(again, names);

    // Foreground: the pods go first, then the ReplicaSet, then the Deployment (the order of
    // the DELETED events' revisions).
    let rv = c.get(PODS).await["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok(&["delete", "deployment", "web", "--cascade=foreground"]);
    let d = deletions(&c, &[DEPLOY, RSS, PODS], &rv, 4).await;
    let deploy_rv = d["Deployment/web"];
    let rs_rv = d
        .iter()
        .find(|(k, _)| k.starts_with("ReplicaSet/"))
        .unwrap()
        .1;
    let pod_rvs: Vec<u64> = d
        .iter()
        .filter(|(k, _)| k.starts_with("Pod/"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(pod_rvs.len(), 2, "{d:?}");
    assert!(
        pod_rvs.iter().all(|p| p < rs_rv) && *rs_rv < deploy_rv,
        "{d:?}"
    );

    // Background: the Deployment goes at once, its dependents after it.
    c.apply(&deployment("web", "hello:v1", 2, ""));
    c.rollout_status("web");
    c.wait_ready("web", "hello:v1", 2, t).await;
    let rv = c.get(PODS).await["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    c.ok(&["delete", "deployment", "web"]);
    let d = deletions(&c, &[DEPLOY, RSS, PODS], &rv, 4).await;
    let deploy_rv = d["Deployment/web"];
    assert!(d.values().all(|rv| *rv >= deploy_rv), "{d:?}");
}

fn kubectl(c: &Cluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&c.server.kubeconfig)
        .args(args)
        .env("HOME", c.dir.path().join("kubectl-home"))
        .output()
        .expect("kubectl must be installed (see README)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_kubectl_scales_waits_for_and_undoes_rollouts() {
    let c = Cluster::start(&["node-a"], &[], &[]).await;
    let t = Duration::from_secs(90);
    c.apply(&deployment("web", "hello:v1", 1, ""));
    let ok = |args: &[&str]| {
        let out = kubectl(&c, args);
        if !out.status.success() {
            c.dump_and_panic(&format!("kubectl {args:?}"), &out);
        }
        stdout(&out)
    };
    // kubectl scale goes through the scale subresource.
    let out = ok(&["scale", "deployment/web", "--replicas=3"]);
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    let out = ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    c.wait_ready("web", "hello:v1", 3, t).await;
    let scale = c
        .get("/apis/apps/v1/namespaces/default/deployments/web/scale")
        .await;
    assert_eq!(
        (scale["kind"].as_str(), scale["spec"]["replicas"].as_i64()),
        (Some("Scale"), Some(3))
    );
    assert_eq!(scale["status"]["selector"], "app=web");

    c.apply(&deployment("web", "hello:v2", 3, ""));
    ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let out = ok(&["rollout", "undo", "deployment/web"]);
    assert!(out.contains("rolled back"), "{out}");
    ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    c.wait_ready("web", "hello:v1", 3, t).await;
}
