//! An HA control plane of real `wasmctl server` processes on 127.0.x.y: forming it with
//! `--cluster-init` / `--join`, any member answering, losing and restarting members, joins
//! that must be refused, removal and rejoin, and watches across a leader change.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::support::{bin, free_port, stderr, stdout, wait_for, ServerProc};

const FORM: Duration = Duration::from_secs(60);

/// A distinct 127.0.X.0/24 per cluster in this test process, so that clusters of tests
/// running at once never share an address.
fn next_subnet() -> u8 {
    static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    // 127.0.200.x .. 127.0.249.x: nothing else in the tests uses these.
    200 + N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50
}

pub struct Cluster {
    pub servers: Vec<ServerProc>,
    pub token: String,
    pub subnet: u8,
    /// One port for every member: each has its own IP.
    pub port: u16,
    pub dir: TempDir,
}

impl Cluster {
    pub fn listen(&self, n: usize) -> String {
        format!("127.0.{}.{}:{}", self.subnet, n, self.port)
    }

    pub fn data_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("s{n}"))
    }

    /// Starts server `n` (1-based) joining through server 1.
    pub async fn join(&mut self, n: usize) -> ServerProc {
        let url = self.servers[0].url.clone();
        let token = self.token.clone();
        ServerProc::start_on(
            &self.data_dir(n),
            &self.listen(n),
            &["--join", &url, "--token", &token],
        )
        .await
    }

    /// Forms a cluster of `n` servers and waits until all are voters.
    pub async fn form(n: usize) -> Cluster {
        let dir = TempDir::new().unwrap();
        let subnet = next_subnet();
        let port = free_port();
        let first = ServerProc::start_on(
            &dir.path().join("s1"),
            &format!("127.0.{subnet}.1:{port}"),
            &["--cluster-init"],
        )
        .await;
        let token = std::fs::read_to_string(dir.path().join("s1/token")).unwrap();
        let mut c = Cluster {
            servers: vec![first],
            token: token.trim().to_owned(),
            subnet,
            port,
            dir,
        };
        for i in 2..=n {
            let s = c.join(i).await;
            c.servers.push(s);
        }
        c.wait_voters(n).await;
        c
    }

    /// The member list as server `i` (0-based index) reports it.
    pub async fn members(&self, i: usize) -> Value {
        let (code, body) = self.servers[i]
            .call(Method::GET, "/internal/cluster/v1/members", None)
            .await;
        assert_eq!(code, 200, "{body}");
        body
    }

    pub async fn wait_voters(&self, n: usize) {
        let s = &self.servers[0];
        wait_for(FORM, &format!("{n} voters with one leader"), || async {
            let (code, body) = s
                .call(Method::GET, "/internal/cluster/v1/members", None)
                .await;
            let members = body["members"].as_array()?.clone();
            let voters = members
                .iter()
                .filter(|m| m["role"] == "leader" || m["role"] == "follower")
                .count();
            (code == 200 && voters == n && members.iter().any(|m| m["role"] == "leader"))
                .then_some(())
        })
        .await;
    }

    /// The index (into `servers`) of the leader, as the first live server in `alive` sees it.
    pub async fn leader(&self, alive: &[usize]) -> usize {
        let ask = &self.servers[alive[0]];
        let addr = wait_for(FORM, "a leader among the live servers", || async {
            let (code, body) = ask
                .call(Method::GET, "/internal/cluster/v1/members", None)
                .await;
            if code != 200 {
                return None;
            }
            let addr = body["members"]
                .as_array()?
                .iter()
                .find(|m| m["role"] == "leader")
                .and_then(|m| m["address"].as_str().map(str::to_owned))?;
            // Until the survivors elect one, they may still name the dead leader.
            alive
                .iter()
                .copied()
                .find(|i| self.servers[*i].url.ends_with(&addr))
        })
        .await;
        addr
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

async fn create_ns(s: &ServerProc, name: &str) -> Value {
    let (code, body) = s
        .call(Method::POST, "/api/v1/namespaces", Some(&namespace(name)))
        .await;
    assert_eq!(code, 201, "creating namespace {name} on {}: {body}", s.url);
    body
}

async fn has_ns(s: &ServerProc, name: &str) -> bool {
    let (code, _) = s
        .call(Method::GET, &format!("/api/v1/namespaces/{name}"), None)
        .await;
    code == 200
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_servers_form_one_store_and_any_member_answers() {
    let mut c = Cluster::form(3).await;
    let t = &c.token;
    let (hash, secret) = t.strip_prefix("K10").unwrap().split_once("::").unwrap();
    assert_eq!(hash.len(), 64, "{t}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
    assert!(!secret.is_empty());

    // One kubeconfig per member, each naming its own server, all with the one CA: kubectl
    // works against every member.
    for s in &c.servers {
        let out = kubectl(&s.kubeconfig, &["get", "namespaces", "-o", "name"]);
        assert!(out.status.success(), "{}: {}", s.url, stderr(&out));
        assert!(
            stdout(&out).contains("namespace/default"),
            "{}",
            stdout(&out)
        );
    }

    // A write through a follower, read on another member.
    let leader = c.leader(&[0, 1, 2]).await;
    let f1 = (leader + 1) % 3;
    let f2 = (leader + 2) % 3;
    create_ns(&c.servers[f1], "via-follower").await;
    assert!(has_ns(&c.servers[f2], "via-follower").await);
    assert!(has_ns(&c.servers[leader], "via-follower").await);

    // The leader dies: the others elect one and keep accepting writes.
    c.servers[leader].kill();
    let alive = [f1, f2];
    let new_leader = c.leader(&alive).await;
    assert_ne!(new_leader, leader);
    wait_for(FORM, "a write after the leader died", || async {
        let (code, _) = c.servers[f2]
            .call(
                Method::POST,
                "/api/v1/namespaces",
                Some(&namespace("after-kill")),
            )
            .await;
        (code == 201 || code == 409).then_some(())
    })
    .await;
    assert!(has_ns(&c.servers[f1], "after-kill").await);

    // The dead member restarts with nothing but its own flags and catches up.
    c.servers[leader].restart().await;
    let back = &c.servers[leader];
    wait_for(
        FORM,
        "the restarted member to see the write it missed",
        || async { has_ns(back, "after-kill").await.then_some(()) },
    )
    .await;
    c.wait_voters(3).await;
}

/// A server that is already a member ignores `--join` on restart; a wrong CA hash, a wrong
/// secret and a data dir of another cluster are refused with the reason, and nothing is
/// written; an unauthenticated Raft RPC is 401.
#[tokio::test(flavor = "multi_thread")]
async fn bad_joins_are_refused_and_change_nothing() {
    let c = Cluster::form(1).await;
    let s1 = &c.servers[0];
    let run_join = |dir: &Path, listen: &str, token: &str| {
        Command::new(bin())
            .args(["server", "--data-dir"])
            .arg(dir)
            .args(["--listen", listen, "--join", &s1.url, "--token", token])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run wasmctl server")
    };
    let (_, secret) = c.token.split_once("::").unwrap();

    // A CA that is not the token's: refused before the secret is sent.
    let wrong_hash = format!("K10{}::{secret}", "0".repeat(64));
    let dir = c.dir.path().join("wrong-hash");
    let out = run_join(&dir, &c.listen(2), &wrong_hash);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("CA hash mismatch"), "{err}");
    assert!(!dir.join("store/member.json").exists());

    // The right CA but not the cluster's secret.
    let (hash_part, _) = c.token.split_once("::").unwrap();
    let wrong_secret = format!("{hash_part}::not-the-secret");
    let dir = c.dir.path().join("wrong-secret");
    let out = run_join(&dir, &c.listen(3), &wrong_secret);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("401") && err.contains("secret"), "{err}");
    assert!(!dir.join("store/member.json").exists());

    // Not a token at all.
    let out = run_join(&c.dir.path().join("garbage"), &c.listen(4), "hello");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid token"), "{}", stderr(&out));

    // A data dir of another cluster refuses to start with this cluster's token.
    let mut other = Cluster::form(1).await;
    let other_listen = other.listen(1);
    other.servers[0].kill();
    let out = run_join(&other.dir.path().join("s1"), &other_listen, &c.token);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("belongs to cluster"), "{err}");

    // Nothing was added.
    let members = c.members(0).await;
    assert_eq!(members["members"].as_array().unwrap().len(), 1, "{members}");

    // Raft RPCs need the peer secret: none, or the admin token, is 401 and changes nothing.
    for token in [None, Some(s1.token.as_str())] {
        let (code, _) = s1
            .raw(
                Method::POST,
                "/internal/raft/v1/vote",
                None,
                "application/octet-stream",
                token,
            )
            .await;
        assert_eq!(code, 401);
    }
    let out = s1.wasmctl(&["get", "ns"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `wasmctl cluster remove` refuses what would lose quorum, removes a dead member, and a
/// member wiped with `rm -rf` rejoins as a new member and catches up.
#[tokio::test(flavor = "multi_thread")]
async fn members_are_removed_and_a_wiped_member_rejoins() {
    let mut c = Cluster::form(3).await;
    create_ns(&c.servers[0], "before-removal").await;
    let out = c.servers[0].wasmctl(&["cluster", "members"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    // Server 3 dies. Removing server 2 would leave {1, 3}, of which only 1 answers: refused.
    c.servers[2].kill();
    let out = c.servers[0].wasmctl(&["cluster", "remove", "2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("would lose quorum"),
        "{}",
        stderr(&out)
    );

    // Removing the dead one is fine (2 of 2 voters left answer).
    let id3 = {
        let m = c.members(0).await;
        m["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| c.servers[2].url.ends_with(m["address"].as_str().unwrap()))
            .map(|m| m["id"].to_string())
            .unwrap()
    };
    let out = c.servers[0].wasmctl(&["cluster", "remove", &id3]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_voters(2).await;
    create_ns(&c.servers[1], "after-removal").await;

    // Wiped, it joins again as a new member and catches up.
    std::fs::remove_dir_all(c.data_dir(3)).unwrap();
    let s3 = c.join(3).await;
    c.servers[2] = s3;
    c.wait_voters(3).await;
    for name in ["before-removal", "after-removal"] {
        assert!(has_ns(&c.servers[2], name).await, "{name}");
    }
    let m = c.members(0).await;
    assert!(
        !m["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"].as_u64() == id3.parse().ok()),
        "the removed id is gone: {m}"
    );
}

/// Watches namespaces on `s` from `rv` and appends `(name, resourceVersion)` of each event
/// to `seen` until it holds `until` events.
async fn watch_into(s: &ServerProc, rv: &str, until: usize, seen: &mut Vec<(String, u64)>) {
    use futures_util::StreamExt;
    let client = s.client();
    let path = format!("/api/v1/namespaces?watch=true&resourceVersion={rv}");
    let mut stream = Box::pin(client.watch(&path, None).await.unwrap());
    while seen.len() < until {
        let ev = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("an event within 20 s")
            .expect("the stream goes on")
            .expect("an event");
        let meta = &ev["object"]["metadata"];
        let name = meta["name"].as_str().unwrap().to_owned();
        let rv: u64 = meta["resourceVersion"].as_str().unwrap().parse().unwrap();
        seen.push((name, rv));
    }
}

/// A watcher that loses its server reconnects to another member from its last
/// resourceVersion and sees every later event once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_resumes_on_another_member_without_gap_or_duplicate() {
    let mut c = Cluster::form(3).await;
    let leader = c.leader(&[0, 1, 2]).await;
    let watcher_on = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let (_, list) = c.servers[watcher_on]
        .call(Method::GET, "/api/v1/namespaces", None)
        .await;
    let from = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut expected = Vec::new();
    for i in 0..5 {
        let name = format!("w-{i}");
        create_ns(&c.servers[other], &name).await;
        expected.push(name);
    }
    // Read the first events from the follower.
    watch_into(&c.servers[watcher_on], &from, 5, &mut seen).await;
    let last_rv = seen.last().unwrap().1.to_string();
    // The leader dies; more writes land on the new leader.
    c.servers[leader].kill();
    for i in 5..10 {
        let name = format!("w-{i}");
        wait_for(FORM, "a write after the leader died", || async {
            let (code, _) = c.servers[other]
                .call(Method::POST, "/api/v1/namespaces", Some(&namespace(&name)))
                .await;
            (code == 201 || code == 409).then_some(())
        })
        .await;
        expected.push(name);
    }
    // Resume from the last resourceVersion on the other member.
    watch_into(&c.servers[other], &last_rv, 10, &mut seen).await;
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, expected, "every event once, in order");
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "{seen:?}");
}

const WEB: &str = r#"apiVersion: apps/v1
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
      terminationGracePeriodSeconds: 2
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
"#;

/// The Deployment's rollout is complete at `replicas` (kubectl rollout status' test).
fn rolled_out(d: &Value, replicas: i64) -> bool {
    let st = &d["status"];
    d["metadata"]["generation"] == st["observedGeneration"]
        && st["updatedReplicas"].as_i64() == Some(replicas)
        && st["replicas"].as_i64() == Some(replicas)
        && st["availableReplicas"].as_i64() == Some(replicas)
}

/// Agents keep running pods and a NodePort keeps answering while the server of their
/// kubeconfig is dead, the control plane keeps taking writes (which the agent, failed over,
/// acts on), and a rolling restart of all three servers under a write load loses no
/// acknowledged write while a rollout started before it completes after it.
#[tokio::test(flavor = "multi_thread")]
async fn agents_and_node_ports_survive_server_loss_and_a_rolling_restart() {
    use crate::support::{wasi_app, AgentProc};
    let mut c = Cluster::form(3).await;
    for tag in ["hello:v1", "hello:v2"] {
        let out = c.servers[0].wasmctl(&["push", wasi_app("hello").to_str().unwrap(), tag]);
        assert!(out.status.success(), "push {tag}: {}", stderr(&out));
    }
    // The agent learns the other servers from the `kubernetes` Endpoints: start it once
    // they list all three.
    wait_for(
        FORM,
        "the kubernetes Endpoints to list 3 servers",
        || async {
            let (_, ep) = c.servers[0]
                .call(
                    Method::GET,
                    "/api/v1/namespaces/default/endpoints/kubernetes",
                    None,
                )
                .await;
            let n: usize = ep["subsets"]
                .as_array()?
                .iter()
                .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
                .sum();
            (n == 3).then_some(())
        },
    )
    .await;
    let node_ip = format!("127.250.0.{}", crate::support::next_node_octet());
    let agent_dir = c.dir.path().join("agent");
    let _agent = AgentProc::start(
        &c.servers[0],
        "ha-node",
        &agent_dir,
        &["--node-ip", &node_ip],
    )
    .await;
    let out = c.servers[1].wasmctl_stdin(&["apply", "-f", "-"], Some(WEB));
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, svc) = c.servers[1]
        .call(Method::GET, "/api/v1/namespaces/default/services/web", None)
        .await;
    let port = svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    let url = format!("http://{node_ip}:{port}/");
    wait_for(
        Duration::from_secs(90),
        "the NodePort to answer",
        || async { matches!(crate::support::http_get(&url).await, Some((200, _))).then_some(()) },
    )
    .await;

    // The agent's own server dies: the NodePort keeps answering, writes go on elsewhere.
    c.servers[0].kill();
    for _ in 0..20 {
        let r = crate::support::http_get(&url).await;
        assert!(
            matches!(r, Some((200, _))),
            "the NodePort failed with server 1 down: {r:?}"
        );
    }
    let (code, body) = wait_for(FORM, "a scale-up through server 2", || async {
        let (code, body) = c.servers[1]
            .raw(
                Method::PATCH,
                "/apis/apps/v1/namespaces/default/deployments/web",
                Some(&json!({"spec": {"replicas": 3}})),
                "application/merge-patch+json",
                Some(&c.servers[1].token),
            )
            .await;
        (code != 503 && code != 504).then_some((code, body))
    })
    .await;
    assert_eq!(code, 200, "{body}");
    wait_for(
        Duration::from_secs(90),
        "3 replicas rolled out with server 1 down",
        || async {
            let (_, d) = c.servers[2]
                .call(
                    Method::GET,
                    "/apis/apps/v1/namespaces/default/deployments/web",
                    None,
                )
                .await;
            rolled_out(&d, 3).then_some(())
        },
    )
    .await;
    c.servers[0].restart().await;
    c.wait_voters(3).await;

    // A rollout to v2 starts; then every server restarts in turn under a write load.
    let out = c.servers[2].wasmctl_stdin(
        &["apply", "-f", "-"],
        Some(
            &WEB.replace("hello:v1", "hello:v2")
                .replace("replicas: 2", "replicas: 3"),
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let http = c.servers[i].http.clone();
            let urls: Vec<String> = c.servers.iter().map(|s| s.url.clone()).collect();
            let token = c.servers[i].token.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let name = format!("load-{i}-{n}");
                    let url = &urls[n % urls.len()];
                    let r = http
                        .post(format!("{url}/api/v1/namespaces"))
                        .bearer_auth(&token)
                        .json(&namespace(&name))
                        .timeout(Duration::from_secs(15))
                        .send()
                        .await;
                    if matches!(&r, Ok(r) if r.status().as_u16() == 201) {
                        acked.push(name);
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                acked
            })
        })
        .collect();
    for i in 0..3 {
        c.servers[i].restart().await;
        c.wait_voters(3).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(
        acked.len() >= 5,
        "too few writes acknowledged: {}",
        acked.len()
    );
    let (_, list) = c.servers[0]
        .call(Method::GET, "/api/v1/namespaces", None)
        .await;
    let present: std::collections::HashSet<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|n| !present.contains(n.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    wait_for(
        Duration::from_secs(120),
        "the v2 rollout to complete",
        || async {
            let (_, d) = c.servers[1]
                .call(
                    Method::GET,
                    "/apis/apps/v1/namespaces/default/deployments/web",
                    None,
                )
                .await;
            (rolled_out(&d, 3)
                && d["spec"]["template"]["spec"]["containers"][0]["image"] == "hello:v2")
                .then_some(())
        },
    )
    .await;
}

/// A server whose RocksDB is damaged refuses to start, naming the path and the error
/// (rather than starting empty or crashing later).
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_store_refuses_to_start_naming_the_path() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 2] = [
        ("a garbled CURRENT file", |db| {
            std::fs::write(db.join("CURRENT"), b"MANIFEST-999999\n").unwrap()
        }),
        ("garbage in the middle of the write-ahead log", |db| {
            let wal = std::fs::read_dir(db)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "log"))
                .expect("a write-ahead log");
            let mut bytes = std::fs::read(&wal).unwrap();
            assert!(
                bytes.len() > 4096,
                "the log holds the writes: {}",
                bytes.len()
            );
            let mid = bytes.len() / 2;
            bytes[mid..mid + 64].fill(0xA5);
            std::fs::write(&wal, bytes).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let dir = TempDir::new().unwrap();
        let data = dir.path().join("s");
        let mut s = ServerProc::start(&data, &[]).await;
        create_ns(&s, "before-damage").await;
        assert!(s.terminate().success());
        let db = data.join("store/db");
        damage(&db);
        let child = Command::new(bin())
            .args(["server", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run wasmctl server");
        let mut child = crate::support::KillOnDrop(child);
        let status = wait_for(
            Duration::from_secs(60),
            "the damaged server to exit",
            || {
                let st = child.0.try_wait().expect("wait");
                async move { st }
            },
        )
        .await;
        assert!(!status.success(), "{what}: the server started");
        let mut err = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            err.contains(&format!("opening RocksDB at {}", db.display())),
            "{what}: {err}"
        );
    }
}
