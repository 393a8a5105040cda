//! A Jepsen-style register test of the HA control plane: three real `wasmctl server`
//! processes, each in its own network namespace (its own "host"), clients doing reads,
//! writes and compare-and-sets on a few keys through the API of random members, and a
//! nemesis that kills (-9), pauses (SIGSTOP) and restarts the leader and random members and
//! partitions the leader into a minority. The whole history is then checked for
//! linearizability (`lincheck.rs`): no acknowledged write lost, no stale read, no CAS applied
//! twice. A second test plants a bug (followers reading without the read index, behind a
//! test-only flag) and shows that the checker catches it.
//!
//! Network: per server a namespace with two veths, one on a peer bridge (198.18.S.0/24:
//! Raft between servers) and one on a client bridge (198.19.S.0/24: the test's clients, in
//! the root namespace). A partition takes a server's peer link down; its client link stays
//! up, so clients keep talking to the minority side and must see errors, never acks.
//! Everything is removed on drop. Needs root (CI runs as root); fails loudly without it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::lincheck::{check, History, Op, Outcome};
use crate::support::{bin, stdout_lines, wait_for};

const PORT: u16 = 6443;
const KEYS: [&str; 3] = ["reg-a", "reg-b", "reg-c"];
const CLIENTS: usize = 8;
/// Per request: above the server's own write deadline (10 s), so that the server's
/// "outcome unknown" (504) is what a client usually sees, not its own timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Three "hosts" (network namespaces) on two bridges; removed on drop.
struct Hosts {
    tag: String,
    subnet: u8,
    n: usize,
}

impl Hosts {
    fn new(n: usize) -> Hosts {
        assert!(
            {
                use std::os::unix::fs::MetadataExt;
                // /proc/self belongs to the effective user.
                std::fs::metadata("/proc/self")
                    .map(|m| m.uid())
                    .unwrap_or(1)
                    == 0
            },
            "the HA fault tests need root for network namespaces (CI runs as root)"
        );
        let id = std::process::id() % 10_000;
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("wj{id}{seq}");
        let subnet = 10 + ((id as usize * 7 + seq) % 200) as u8;
        let h = Hosts { tag, subnet, n };
        h.cleanup();
        let (bp, bc) = (h.bridge('p'), h.bridge('c'));
        sh(&["ip", "link", "add", &bp, "type", "bridge"]);
        sh(&["ip", "link", "set", &bp, "up"]);
        sh(&["ip", "link", "add", &bc, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("198.19.{}.254/24", h.subnet),
            "dev",
            &bc,
        ]);
        sh(&["ip", "link", "set", &bc, "up"]);
        for i in 1..=n {
            let ns = h.ns(i);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            for (kind, net, bridge) in [('p', 18, &bp), ('c', 19, &bc)] {
                let outer = h.veth(i, kind);
                let inner = format!("{kind}{i}");
                sh(&[
                    "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ]);
                sh(&["ip", "link", "set", &inner, "netns", &ns]);
                sh(&["ip", "link", "set", &outer, "master", bridge]);
                sh(&["ip", "link", "set", &outer, "up"]);
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("198.{net}.{}.{i}/24", h.subnet),
                    "dev",
                    &inner,
                ]);
                sh(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
            }
        }
        h
    }

    fn bridge(&self, kind: char) -> String {
        format!("{}{kind}", self.tag)
    }

    fn veth(&self, i: usize, kind: char) -> String {
        format!("{}{kind}{i}", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    fn peer_addr(&self, i: usize) -> String {
        format!("198.18.{}.{i}:{PORT}", self.subnet)
    }

    fn client_url(&self, i: usize) -> String {
        format!("https://198.19.{}.{i}:{PORT}", self.subnet)
    }

    /// Cuts server `i` off from the other servers (its clients still reach it).
    fn partition(&self, i: usize) {
        sh(&["ip", "link", "set", &self.veth(i, 'p'), "down"]);
    }

    fn heal(&self, i: usize) {
        sh(&["ip", "link", "set", &self.veth(i, 'p'), "up"]);
    }

    fn cleanup(&self) {
        for i in 1..=self.n {
            sh_quiet(&["ip", "netns", "del", &self.ns(i)]);
            for kind in ['p', 'c'] {
                sh_quiet(&["ip", "link", "del", &self.veth(i, kind)]);
            }
        }
        sh_quiet(&["ip", "link", "del", &self.bridge('p')]);
        sh_quiet(&["ip", "link", "del", &self.bridge('c')]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A `wasmctl server` in host `i`'s namespace.
struct Server {
    i: usize,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

impl Server {
    fn spawn(&mut self, hosts: &Hosts) {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.ns(self.i),
                bin(),
                "server",
                "--data-dir",
            ])
            .arg(&self.dir)
            .args(["--listen", &format!("0.0.0.0:{PORT}")])
            .args(["--advertise-address", &hosts.peer_addr(self.i)])
            .args(["--tls-san", &format!("198.19.{}.{}", hosts.subnet, self.i)])
            .args(&self.args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wasmctl server in its namespace");
        let lines = stdout_lines(&mut child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.starts_with("API server listening on ") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("server {} did not start within 60 s", self.i);
                }
            }
        }
        self.child = Some(child);
        self.paused = false;
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pause(&mut self) {
        if let Some(p) = self.pid() {
            kill(p, Signal::SIGSTOP).expect("SIGSTOP");
            self.paused = true;
        }
    }

    fn resume(&mut self) {
        if let Some(p) = self.pid() {
            kill(p, Signal::SIGCONT).expect("SIGCONT");
            self.paused = false;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.paused {
            self.resume();
        }
        self.kill9();
    }
}

struct Cluster {
    hosts: Hosts,
    servers: Vec<Server>,
    http: reqwest::Client,
    token: String,
    _dir: TempDir,
}

impl Cluster {
    async fn start(extra: &[&str]) -> Cluster {
        let hosts = Hosts::new(3);
        let dir = TempDir::new().unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut first = Server {
            i: 1,
            dir: dir.path().join("s1"),
            args: [vec!["--cluster-init".to_owned()], extra.clone()].concat(),
            child: None,
            paused: false,
        };
        first.spawn(&hosts);
        let token = std::fs::read_to_string(dir.path().join("s1/token"))
            .unwrap()
            .trim()
            .to_owned();
        let ca = std::fs::read(dir.path().join("s1/pki/ca.crt")).unwrap();
        let admin = std::fs::read_to_string(dir.path().join("s1/pki/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap();
        let mut servers = vec![first];
        for i in 2..=3 {
            let mut s = Server {
                i,
                dir: dir.path().join(format!("s{i}")),
                args: [
                    vec![
                        "--join".to_owned(),
                        format!("https://{}", hosts.peer_addr(1)),
                        "--token".to_owned(),
                        token.clone(),
                    ],
                    extra.clone(),
                ]
                .concat(),
                child: None,
                paused: false,
            };
            s.spawn(&hosts);
            servers.push(s);
        }
        let c = Cluster {
            hosts,
            servers,
            http,
            token: admin,
            _dir: dir,
        };
        c.wait_healthy(Duration::from_secs(60)).await;
        c
    }

    async fn members(&self, i: usize) -> Option<Value> {
        let r = self
            .http
            .get(format!(
                "{}/internal/cluster/v1/members",
                self.hosts.client_url(i)
            ))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// The server (1-based) that leads, as a live, unpaused server sees it.
    async fn leader(&self) -> Option<usize> {
        for s in self
            .servers
            .iter()
            .filter(|s| s.child.is_some() && !s.paused)
        {
            let Some(m) = self.members(s.i).await else {
                continue;
            };
            let addr = m["members"]
                .as_array()?
                .iter()
                .find(|m| m["role"] == "leader")?["address"]
                .as_str()?
                .to_owned();
            return (1..=3).find(|i| self.hosts.peer_addr(*i) == addr);
        }
        None
    }

    /// Waits until all three are voters that answer, with one leader.
    async fn wait_healthy(&self, within: Duration) {
        wait_for(within, "three voters that answer, one leader", || async {
            let m = self.members(1).await?;
            let ms = m["members"].as_array()?;
            let ok = ms.len() == 3
                && ms.iter().filter(|m| m["role"] == "leader").count() == 1
                && ms
                    .iter()
                    .all(|m| m["error"].is_null() && m["role"] != "learner");
            ok.then_some(())
        })
        .await;
    }

    fn lease_path(key: &str) -> String {
        format!("/apis/coordination.k8s.io/v1/namespaces/default/leases/{key}")
    }
}

fn lease(key: &str, holder: &str, rv: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": key, "namespace": "default"},
        "spec": {"holderIdentity": holder}
    });
    if let Some(rv) = rv {
        v["metadata"]["resourceVersion"] = json!(rv);
    }
    v
}

/// One client's loop: random ops on random keys through random members until `stop`.
async fn client(
    id: usize,
    http: reqwest::Client,
    urls: Vec<String>,
    token: String,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (key, url, kind) = {
            let mut rng = rand::thread_rng();
            (
                KEYS[rng.gen_range(0..KEYS.len())],
                urls[rng.gen_range(0..urls.len())].clone(),
                rng.gen_range(0..10),
            )
        };
        let path = format!("{url}{}", Cluster::lease_path(key));
        n += 1;
        let value = format!("c{id}-{n}");
        if kind < 4 {
            read(id, key, &http, &path, &token, &history).await;
        } else if kind < 7 {
            // An unconditional write.
            let op = history.lock().unwrap().invoke(id, key, Op::write(&value));
            let r = http
                .put(&path)
                .bearer_auth(&token)
                .json(&lease(key, &value, None))
                .send()
                .await;
            let outcome = match r {
                Ok(r) if r.status().is_success() => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    Outcome::Ok
                }
                Err(e) if e.is_connect() => Outcome::NotApplied,
                _ => Outcome::Unknown,
            };
            history.lock().unwrap().complete(op, outcome);
        } else {
            // Compare-and-set: read, then PUT with the resourceVersion read.
            let Some((seen, rv)) = read(id, key, &http, &path, &token, &history).await else {
                continue;
            };
            let op = history
                .lock()
                .unwrap()
                .invoke(id, key, Op::cas(seen.as_deref(), &value));
            let r = http
                .put(&path)
                .bearer_auth(&token)
                .json(&lease(key, &value, Some(&rv)))
                .send()
                .await;
            let outcome = match r {
                Ok(r) if r.status().is_success() => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    Outcome::Ok
                }
                Ok(r) if r.status() == StatusCode::CONFLICT => Outcome::Rejected,
                Err(e) if e.is_connect() => Outcome::NotApplied,
                _ => Outcome::Unknown,
            };
            history.lock().unwrap().complete(op, outcome);
        }
    }
}

/// A recorded read; returns the value and the resourceVersion it was read at.
async fn read(
    id: usize,
    key: &str,
    http: &reqwest::Client,
    path: &str,
    token: &str,
    history: &Mutex<History>,
) -> Option<(Option<String>, String)> {
    let op = history.lock().unwrap().invoke(id, key, Op::Read);
    let r = http.get(path).bearer_auth(token).send().await;
    let result = match r {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => {
                let holder = v["spec"]["holderIdentity"].as_str().map(str::to_owned);
                let rv = v["metadata"]["resourceVersion"].as_str()?.to_owned();
                Some((holder, rv))
            }
            Err(_) => None,
        },
        _ => None,
    };
    // A failed read constrains nothing.
    let outcome = match &result {
        Some((holder, _)) => Outcome::Read(holder.clone()),
        None => Outcome::NotApplied,
    };
    history.lock().unwrap().complete(op, outcome);
    result
}

async fn run_clients(
    c: &Cluster,
    history: &Arc<Mutex<History>>,
    urls: Vec<String>,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                c.http.clone(),
                urls.clone(),
                c.token.clone(),
                history.clone(),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    (stop, acked, tasks)
}

/// Creates the registers, recording the creates.
async fn create_keys(c: &Cluster, history: &Mutex<History>) {
    for key in KEYS {
        let op = history.lock().unwrap().invoke(99, key, Op::create("init"));
        let r = c
            .http
            .post(format!(
                "{}/apis/coordination.k8s.io/v1/namespaces/default/leases",
                c.hosts.client_url(1)
            ))
            .bearer_auth(&c.token)
            .json(&lease(key, "init", None))
            .send()
            .await
            .expect("create a register");
        assert!(r.status().is_success(), "create {key}: {}", r.status());
        history.lock().unwrap().complete(op, Outcome::Ok);
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillLeader,
    PauseLeader,
    PartitionLeader,
    KillRandom,
    PauseRandom,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_register_stays_linearizable_through_kills_pauses_and_partitions() {
    let mut c = Cluster::start(&[]).await;
    let history = Arc::new(Mutex::new(History::new()));
    create_keys(&c, &history).await;
    let urls: Vec<String> = (1..=3).map(|i| c.hosts.client_url(i)).collect();
    let (stop, acked, tasks) = run_clients(&c, &history, urls).await;

    let plan = [
        Fault::KillLeader,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::KillRandom,
        Fault::PauseRandom,
    ];
    let faults = 20;
    let mut log = Vec::new();
    for k in 0..faults {
        let fault = plan[k % plan.len()];
        let target = match fault {
            Fault::KillLeader | Fault::PauseLeader | Fault::PartitionLeader => {
                wait_for(Duration::from_secs(30), "a leader", || c.leader()).await
            }
            _ => rand::thread_rng().gen_range(1..=3),
        };
        let hold = Duration::from_millis(rand::thread_rng().gen_range(1000..2500));
        let s = &mut c.servers[target - 1];
        match fault {
            Fault::KillLeader | Fault::KillRandom => {
                s.kill9();
                tokio::time::sleep(hold).await;
                s.spawn(&c.hosts);
            }
            Fault::PauseLeader | Fault::PauseRandom => {
                s.pause();
                tokio::time::sleep(hold).await;
                c.servers[target - 1].resume();
            }
            Fault::PartitionLeader => {
                c.hosts.partition(target);
                tokio::time::sleep(hold).await;
                c.hosts.heal(target);
            }
        }
        log.push(format!("{fault:?}({target})"));
        // Let the cluster recover before the next fault (so that every fault hits a
        // working cluster), while the clients keep going.
        c.wait_healthy(Duration::from_secs(60)).await;
    }
    // A quiet end, then final reads of every key through every member.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for i in 1..=3 {
        for key in KEYS {
            let path = format!("{}{}", c.hosts.client_url(i), Cluster::lease_path(key));
            read(100 + i, key, &c.http, &path, &c.token, &history).await;
        }
    }
    let history = history.lock().unwrap().clone();
    let summary = check(&history);
    let (n, ok_writes) = (history.len(), acked.load(Ordering::Relaxed));
    eprintln!(
        "jepsen: {n} ops, {ok_writes} acknowledged writes, faults: {}",
        log.join(" ")
    );
    let summary = summary.unwrap_or_else(|v| panic!("not linearizable: {v}"));
    eprintln!("jepsen: {summary:?}");
    assert!(
        ok_writes >= 100,
        "too few acknowledged writes to mean much: {ok_writes}"
    );
}

/// The planted bug: with followers reading their local state (no read index), a follower
/// cut off from the leader serves stale values, and the checker says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checker_catches_stale_follower_reads() {
    let c = Cluster::start(&["--unsafe-local-reads-for-testing"]).await;
    let history = Arc::new(Mutex::new(History::new()));
    create_keys(&c, &history).await;
    let leader = wait_for(Duration::from_secs(30), "a leader", || c.leader()).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    // The follower no longer hears from the others; its clients still reach it.
    c.hosts.partition(follower);
    let urls = vec![c.hosts.client_url(leader), c.hosts.client_url(follower)];
    let (stop, _acked, tasks) = run_clients(&c, &history, urls).await;
    let caught = wait_for(
        Duration::from_secs(60),
        "a stale read in the history",
        || {
            let history = history.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let h = history.lock().unwrap().clone();
                match check(&h) {
                    Err(v) if !v.is_undecided() => Some(v),
                    _ => None,
                }
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    c.hosts.heal(follower);
    eprintln!("planted bug caught: {caught}");
}
