//! Failover benchmark (issue 12): a 3-member wasmctl HA control plane and, as the anchor in the
//! same run, a 3-member etcd 3.4 cluster, each as real processes on loopback (fsync on), under
//! a steady write load through every member. Then, ROUNDS times: find the leader, SIGKILL it,
//! measure the time from the kill to the first successful write through another member (and
//! until both others have accepted one), restart it with the same command and wait until all
//! three are healthy voters again; then the same ROUNDS times with SIGSTOP (SIGCONT once both
//! others have accepted a write). Prints one line per round and p50 / max per system and fault.
//!
//! cargo run --example failover -- DIR   (DIR: an empty scratch directory for data and logs)
//!
//! Environment (defaults in brackets):
//!   WASMCTL_BIN                  the wasmctl binary [$CARGO_TARGET_DIR/debug/wasmctl]
//!   ETCD_BIN                     the etcd binary [etcd]
//!   BENCH_FAILOVERS              rounds per system and fault [20]
//!   BENCH_FAILOVER_SYSTEMS       which clusters, in order [etcd wasmctl]
//!   BENCH_FAILOVER_FAULTS        which faults, in order [kill stop]
//!   BENCH_RAFT_HEARTBEAT         wasmctl --raft-heartbeat [100ms]
//!   BENCH_RAFT_ELECTION_TIMEOUT  wasmctl --raft-election-timeout [300ms-600ms]
//!   BENCH_ETCD_HEARTBEAT_MS      etcd --heartbeat-interval [100]
//!   BENCH_ETCD_ELECTION_MS       etcd --election-timeout [1000]
//!   BENCH_FAILOVER_INTERVAL_MS   one write per member every this many ms [10]
//!
//! The load is open-loop: every INTERVAL each live member is sent one new write (a Lease
//! create with the admin token from member 1's pki/, or an etcd put), whatever the earlier
//! ones are doing (at most 500 in flight per member), each over its own HTTP/1.1 connection
//! from a pool. So a write that hangs (a follower still forwarding to the dead leader) never
//! delays the next one, and the first write accepted after the kill is found within
//! INTERVAL / 2 on average. Only writes *sent* after the kill count.
//!
//! Every child process is killed when this program ends, however it ends short of SIGKILL
//! (kill_on_drop; SIGINT / SIGTERM end it cleanly).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const MEMBERS: usize = 3;
/// Writes in flight per member at most (each holds one connection).
const MAX_IN_FLIGHT: usize = 500;
/// One write's deadline, client side.
const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// How long a cluster may take to form, elect, accept a write or become healthy again.
const DEADLINE: Duration = Duration::from_secs(120);
/// "Healthy": every member answers and is at most this many log entries behind the leader.
const MAX_LAG: u64 = 100;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Wasmctl,
    Etcd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Wasmctl => "wasmctl",
            Kind::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::Stop => "SIGSTOP",
        }
    }
}

/// A TCP port free right now on every one of `ips`, not in `taken`.
fn free_port(ips: &[&str], taken: &[u16]) -> Result<u16> {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind((ips[0], 0))?;
        let port = l.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    bail!("no free port on {ips:?}")
}

/// One member process: its command (the same on every restart) and log.
struct Proc {
    cmd: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.cmd[0]))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Result<Pid> {
        let id = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .ok_or_else(|| anyhow!("not running"))?;
        Ok(Pid::from_raw(i32::try_from(id)?))
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid()?, sig).with_context(|| format!("sending {sig} to {}", self.cmd[0]))
    }

    /// SIGKILL (also ends a stopped process) and reap.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// What the load and the health checks need of a cluster: how to reach each member.
struct Endpoints {
    kind: Kind,
    /// Base URLs: https://127.0.12.i:PORT (wasmctl), http://127.0.0.1:PORT (etcd).
    urls: Vec<String>,
    /// Writes: HTTP/1.1 only, one connection per request in flight.
    http: reqwest::Client,
    /// Health checks: short deadline.
    status_http: reqwest::Client,
    /// wasmctl's admin token.
    token: Option<String>,
    /// etcd: each member's id, as its status names it.
    etcd_ids: Vec<String>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A JSON number, or a number in a string (etcd's JSON gateway renders uint64 so).
fn num(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Endpoints {
    /// One write through member `i`; the error: what kind of failure it was, and its detail
    /// (the answer's body, or the error).
    async fn write(&self, i: usize, seq: u64) -> Result<(), (String, String)> {
        let url = &self.urls[i];
        let req = match self.kind {
            Kind::Wasmctl => self
                .http
                .post(format!(
                    "{url}/apis/coordination.k8s.io/v1/namespaces/default/leases"
                ))
                .bearer_auth(self.token.as_deref().unwrap_or_default())
                .json(
                    &json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": format!("failover-{seq}")},
                    "spec": {"holderIdentity": "failover-bench"}}),
                ),
            Kind::Etcd => self.http.post(format!("{url}/v3/kv/put")).json(&json!({
                "key": b64(&format!("/failover/{seq}")), "value": b64("failover-bench")})),
        };
        let kind = |e: reqwest::Error| {
            let k = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "reset"
            };
            (k.to_owned(), format!("{e:#}"))
        };
        let r = req.timeout(WRITE_DEADLINE).send().await.map_err(kind)?;
        let status = r.status();
        let body = r.bytes().await.map_err(kind)?;
        if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body);
            Err((
                format!("HTTP {}", status.as_u16()),
                text.chars().take(300).collect(),
            ))
        }
    }

    /// wasmctl: `GET /internal/cluster/v1/members` as member `i` answers it.
    async fn wasmctl_members(&self, i: usize) -> Option<Value> {
        let r = self
            .status_http
            .get(format!("{}/internal/cluster/v1/members", self.urls[i]))
            .bearer_auth(self.token.as_deref().unwrap_or_default())
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// etcd: `/v3/maintenance/status` of member `i`.
    async fn etcd_status(&self, i: usize) -> Option<Value> {
        let r = self
            .status_http
            .post(format!("{}/v3/maintenance/status", self.urls[i]))
            .body("{}")
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    fn index_of_addr(&self, addr: &str) -> Option<usize> {
        self.urls
            .iter()
            .position(|u| u.rsplit("//").next() == Some(addr))
    }

    /// The member `i` names as the leader (an index into `urls`), and whether it is itself.
    async fn named_leader(&self, i: usize) -> Option<(usize, bool)> {
        match self.kind {
            Kind::Wasmctl => {
                let m = self.wasmctl_members(i).await?;
                let id = m["leader"].as_u64()?;
                let members = m["members"].as_array()?;
                let addr =
                    members.iter().find(|x| x["id"].as_u64() == Some(id))?["address"].as_str()?;
                let j = self.index_of_addr(addr)?;
                Some((j, j == i))
            }
            Kind::Etcd => {
                let s = self.etcd_status(i).await?;
                let lead = s["leader"].as_str()?;
                let j = self.etcd_ids.iter().position(|id| id == lead)?;
                Some((j, s["header"]["member_id"].as_str() == Some(lead)))
            }
        }
    }

    /// The member that leads, as the first member in `alive` that names one says, confirmed
    /// by the one named.
    async fn leader(&self, alive: &[usize]) -> Option<usize> {
        for &i in alive {
            let Some((j, itself)) = self.named_leader(i).await else {
                continue;
            };
            if !alive.contains(&j) {
                continue;
            }
            if itself || self.named_leader(j).await == Some((j, true)) {
                return Some(j);
            }
        }
        None
    }

    /// All members answer, agree on one leader, are voters (wasmctl) and within MAX_LAG of
    /// the leader's log; returns the leader.
    async fn healthy(&self) -> Option<usize> {
        let all: Vec<usize> = (0..self.urls.len()).collect();
        let l = self.leader(&all).await?;
        match self.kind {
            Kind::Wasmctl => {
                let m = self.wasmctl_members(l).await?;
                let ms = m["members"].as_array()?;
                let ok = ms.len() == MEMBERS
                    && ms.iter().all(|x| {
                        matches!(x["role"].as_str(), Some("leader" | "follower"))
                            && x["error"].is_null()
                            && x["lag"].as_u64().is_some_and(|lag| lag <= MAX_LAG)
                    });
                ok.then_some(l)
            }
            Kind::Etcd => {
                let mut statuses = Vec::new();
                for i in &all {
                    statuses.push(self.etcd_status(*i).await?);
                }
                let lead = statuses[l]["leader"].as_str()?.to_owned();
                let last = num(&statuses[l]["raftIndex"])?;
                let ok = statuses.iter().all(|s| {
                    s["leader"].as_str() == Some(lead.as_str())
                        && num(&s["raftAppliedIndex"])
                            .or_else(|| num(&s["raftIndex"]))
                            .is_some_and(|a| last.saturating_sub(a) <= MAX_LAG)
                });
                ok.then_some(l)
            }
        }
    }

    async fn wait_healthy(&self) -> Result<usize> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.healthy().await {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} cluster is not healthy within {DEADLINE:?}",
                    self.kind.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The round being measured: since when, which member is down, and each other member's
/// first write accepted that was sent after `since`.
struct Round {
    since: Instant,
    victim: usize,
    first: [Option<Instant>; MEMBERS],
    /// Failed writes sent after `since`, by member and kind of failure.
    errors: std::collections::BTreeMap<(usize, String), u64>,
    /// The first of them: member, when (since `since`), detail.
    first_error: Option<(usize, Duration, String)>,
}

/// The number of the next write, over all loads of this process: every Lease name is new.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The steady open-loop write load over all members.
struct Load {
    ep: Arc<Endpoints>,
    enabled: [AtomicBool; MEMBERS],
    in_flight: [AtomicUsize; MEMBERS],
    ok: [AtomicU64; MEMBERS],
    failed: AtomicU64,
    round: Mutex<Option<Round>>,
    changed: tokio::sync::Notify,
}

impl Load {
    fn start(
        ep: Arc<Endpoints>,
        interval: Duration,
    ) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Load {
            ep,
            enabled: std::array::from_fn(|_| AtomicBool::new(true)),
            in_flight: std::array::from_fn(|_| AtomicUsize::new(0)),
            ok: std::array::from_fn(|_| AtomicU64::new(0)),
            failed: AtomicU64::new(0),
            round: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
        });
        let tickers = (0..MEMBERS)
            .map(|i| {
                let load = load.clone();
                tokio::spawn(async move {
                    // Staggered, so that some member is sent a write every INTERVAL / 3.
                    let first =
                        tokio::time::Instant::now() + interval * (i as u32) / MEMBERS as u32;
                    let mut tick = tokio::time::interval_at(first, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    loop {
                        tick.tick().await;
                        if !load.enabled[i].load(Ordering::Acquire)
                            || load.in_flight[i].load(Ordering::Acquire) >= MAX_IN_FLIGHT
                        {
                            continue;
                        }
                        load.in_flight[i].fetch_add(1, Ordering::AcqRel);
                        let load = load.clone();
                        tokio::spawn(async move {
                            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                            let sent = Instant::now();
                            let result = load.ep.write(i, seq).await;
                            let done = Instant::now();
                            load.in_flight[i].fetch_sub(1, Ordering::AcqRel);
                            let mut round = load.round.lock().unwrap();
                            let round = round.as_mut().filter(|r| sent >= r.since);
                            match result {
                                Err((kind, detail)) => {
                                    load.failed.fetch_add(1, Ordering::Relaxed);
                                    if let Some(r) = round {
                                        *r.errors.entry((i, kind)).or_default() += 1;
                                        r.first_error.get_or_insert((i, done - r.since, detail));
                                    }
                                }
                                Ok(()) => {
                                    load.ok[i].fetch_add(1, Ordering::Relaxed);
                                    if let Some(r) = round {
                                        if i != r.victim && r.first[i].is_none() {
                                            r.first[i] = Some(done);
                                            load.changed.notify_one();
                                        }
                                    }
                                }
                            }
                        });
                    }
                })
            })
            .collect();
        (load, tickers)
    }

    fn oks(&self) -> [u64; MEMBERS] {
        std::array::from_fn(|i| self.ok[i].load(Ordering::Relaxed))
    }

    /// Waits until every member accepted `n` more writes than in `base`.
    async fn wait_flowing(&self, base: [u64; MEMBERS], n: u64) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        while (0..MEMBERS).any(|i| self.ok[i].load(Ordering::Relaxed) < base[i] + n) {
            if Instant::now() >= deadline {
                bail!(
                    "writes do not flow through every member: {:?} since {base:?}",
                    self.oks()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until `pred` holds for the current round's first writes (or the deadline).
    async fn wait_round(&self, pred: impl Fn(&Round) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.changed.notified();
            if self.round.lock().unwrap().as_ref().is_some_and(&pred) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

struct Settings {
    wasmctl_bin: String,
    etcd_bin: String,
    rounds: usize,
    raft_heartbeat: String,
    raft_election: String,
    etcd_heartbeat_ms: String,
    etcd_election_ms: String,
    interval: Duration,
}

/// A running cluster: its processes and endpoints.
struct Cluster {
    procs: Vec<Proc>,
    ep: Arc<Endpoints>,
}

fn write_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .connect_timeout(Duration::from_secs(2))
}

async fn until<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn form_wasmctl(s: &Settings, dir: &Path) -> Result<Cluster> {
    let ips: Vec<String> = (1..=MEMBERS).map(|i| format!("127.0.12.{i}")).collect();
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let port = free_port(&ip_refs, &[])?;
    let addrs: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    let data = |i: usize| dir.join(format!("w{}", i + 1));
    let cmd = |i: usize, extra: &[&str]| -> Vec<String> {
        let mut c: Vec<String> = vec![
            s.wasmctl_bin.clone(),
            "server".into(),
            "--data-dir".into(),
            data(i).display().to_string(),
            "--listen".into(),
            addrs[i].clone(),
            "--raft-heartbeat".into(),
            s.raft_heartbeat.clone(),
            "--raft-election-timeout".into(),
            s.raft_election.clone(),
        ];
        c.extend(extra.iter().map(|x| x.to_string()));
        c
    };
    let mut procs = vec![Proc {
        cmd: cmd(0, &["--cluster-init"]),
        log: dir.join("w1.log"),
        child: None,
    }];
    procs[0].start()?;
    let pki = data(0).join("pki");
    until(
        "wasmctl member 1 writing its join token and credentials",
        || async {
            (data(0).join("token").exists()
                && pki.join("admin.token").exists()
                && pki.join("ca.crt").exists()
                && data(0).join("kubeconfig.yaml").exists())
            .then_some(())
        },
    )
    .await?;
    let token = std::fs::read_to_string(data(0).join("token"))?
        .trim()
        .to_owned();
    let admin = std::fs::read_to_string(pki.join("admin.token"))?
        .trim()
        .to_owned();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.join("ca.crt"))?)?;
    let tls = |b: reqwest::ClientBuilder| {
        b.use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
    };
    let ep = Endpoints {
        kind: Kind::Wasmctl,
        urls: addrs.iter().map(|a| format!("https://{a}")).collect(),
        http: tls(write_client()).build()?,
        status_http: tls(reqwest::Client::builder())
            .timeout(Duration::from_secs(3))
            .build()?,
        token: Some(admin),
        etcd_ids: Vec::new(),
    };
    until("wasmctl member 1 answering", || ep.wasmctl_members(0)).await?;
    let join = format!("https://{}", addrs[0]);
    for i in 1..MEMBERS {
        let mut p = Proc {
            cmd: cmd(i, &["--join", &join, "--token", &token]),
            log: dir.join(format!("w{}.log", i + 1)),
            child: None,
        };
        p.start()?;
        procs.push(p);
    }
    let ep = Arc::new(ep);
    ep.wait_healthy().await?;
    Ok(Cluster { procs, ep })
}

async fn form_etcd(s: &Settings, dir: &Path) -> Result<Cluster> {
    let mut ports = Vec::new();
    for _ in 0..2 * MEMBERS {
        ports.push(free_port(&["127.0.0.1"], &ports)?);
    }
    let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
    let client = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i]);
    let initial: Vec<String> = (0..MEMBERS)
        .map(|i| format!("e{}={}", i + 1, peer(i)))
        .collect();
    let mut procs = Vec::new();
    for i in 0..MEMBERS {
        let mut p = Proc {
            cmd: [
                s.etcd_bin.as_str(),
                "--name",
                &format!("e{}", i + 1),
                "--data-dir",
                &dir.join(format!("e{}", i + 1)).display().to_string(),
                "--listen-client-urls",
                &client(i),
                "--advertise-client-urls",
                &client(i),
                "--listen-peer-urls",
                &peer(i),
                "--initial-advertise-peer-urls",
                &peer(i),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &format!("failover-{}", std::process::id()),
                "--heartbeat-interval",
                &s.etcd_heartbeat_ms,
                "--election-timeout",
                &s.etcd_election_ms,
                "--log-level",
                "error",
            ]
            .map(str::to_owned)
            .to_vec(),
            log: dir.join(format!("e{}.log", i + 1)),
            child: None,
        };
        p.start()?;
        procs.push(p);
    }
    let mut ep = Endpoints {
        kind: Kind::Etcd,
        urls: (0..MEMBERS).map(client).collect(),
        http: write_client().build()?,
        status_http: reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?,
        token: None,
        etcd_ids: Vec::new(),
    };
    for i in 0..MEMBERS {
        let id = until(&format!("etcd member e{} answering", i + 1), || async {
            let st = ep.etcd_status(i).await?;
            st["header"]["member_id"].as_str().map(str::to_owned)
        })
        .await?;
        ep.etcd_ids.push(id);
    }
    let ep = Arc::new(ep);
    ep.wait_healthy().await?;
    Ok(Cluster { procs, ep })
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let k = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

#[derive(Default)]
struct Summary {
    first_ms: Vec<f64>,
    all_ms: Vec<f64>,
    recover_s: Vec<f64>,
}

async fn rounds(s: &Settings, c: &mut Cluster, fault: Fault) -> Result<Summary> {
    let name = c.ep.kind.name();
    let (load, tickers) = Load::start(c.ep.clone(), s.interval);
    let result = async {
        let mut sum = Summary::default();
        for r in 1..=s.rounds {
            let leader = c.ep.wait_healthy().await?;
            load.wait_flowing(load.oks(), 5).await?;
            let survivors: Vec<usize> = (0..MEMBERS).filter(|i| *i != leader).collect();
            load.enabled[leader].store(false, Ordering::Release);
            let since = Instant::now();
            *load.round.lock().unwrap() = Some(Round {
                since,
                victim: leader,
                first: [None; MEMBERS],
                errors: Default::default(),
                first_error: None,
            });
            c.procs[leader].signal(match fault {
                Fault::Kill => Signal::SIGKILL,
                Fault::Stop => Signal::SIGSTOP,
            })?;
            let got_first = load
                .wait_round(|r| survivors.iter().any(|i| r.first[*i].is_some()))
                .await;
            let got_all = got_first
                && load
                    .wait_round(|r| survivors.iter().all(|i| r.first[*i].is_some()))
                    .await;
            let round = load
                .round
                .lock()
                .unwrap()
                .as_ref()
                .map(|r| r.first)
                .expect("the round");
            let ms = |t: Option<Instant>| t.map(|t| t.duration_since(since).as_secs_f64() * 1e3);
            let firsts: Vec<f64> = survivors.iter().filter_map(|i| ms(round[*i])).collect();
            if !got_all {
                bail!(
                    "{name} {}: round {r}: the other members did not both accept a write within \
                     {DEADLINE:?} (first writes after the fault: {firsts:?} ms)",
                    fault.name()
                );
            }
            let first = firsts.iter().copied().fold(f64::INFINITY, f64::min);
            let all = firsts.iter().copied().fold(0.0, f64::max);
            // The failures of writes sent after the fault, once the members were back.
            let errors = |r: &Round| {
                let e: Vec<String> = r
                    .errors
                    .iter()
                    .map(|((i, kind), n)| format!("{n} x {kind} via {}", c.ep.urls[*i]))
                    .collect();
                if e.is_empty() {
                    "none".to_owned()
                } else {
                    e.join(", ")
                }
            };
            let back = Instant::now();
            match fault {
                Fault::Kill => {
                    c.procs[leader].kill().await;
                    c.procs[leader].start()?;
                }
                Fault::Stop => c.procs[leader].signal(Signal::SIGCONT)?,
            }
            load.enabled[leader].store(true, Ordering::Release);
            c.ep.wait_healthy().await?;
            let recover = back.elapsed().as_secs_f64();
            let done = load.round.lock().unwrap().take().expect("the round");
            let failed = errors(&done);
            println!(
                "{name} {} round {r}/{}: leader {} down; first write through another member \
                 after {first:.1} ms, through both after {all:.1} ms; 3 healthy voters again \
                 {recover:.2} s after the {}; failed writes sent after the fault: {failed}",
                fault.name(),
                s.rounds,
                c.ep.urls[leader],
                match fault {
                    Fault::Kill => "restart",
                    Fault::Stop => "SIGCONT",
                }
            );
            if let Some((i, at, detail)) = done.first_error {
                println!(
                    "  the first failure: via {} after {:.1} ms: {}",
                    c.ep.urls[i],
                    at.as_secs_f64() * 1e3,
                    detail.trim()
                );
            }
            sum.first_ms.push(first);
            sum.all_ms.push(all);
            sum.recover_s.push(recover);
        }
        Ok(sum)
    }
    .await;
    for t in tickers {
        t.abort();
    }
    let mut sum = result?;
    for v in [&mut sum.first_ms, &mut sum.all_ms, &mut sum.recover_s] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{name} {}: rounds={} first_write_p50_ms={:.1} first_write_max_ms={:.1} \
         both_members_p50_ms={:.1} both_members_max_ms={:.1} recovered_p50_s={:.2} \
         writes_ok={} writes_failed={}",
        fault.name(),
        sum.first_ms.len(),
        pct(&sum.first_ms, 0.5),
        pct(&sum.first_ms, 1.0),
        pct(&sum.all_ms, 0.5),
        pct(&sum.all_ms, 1.0),
        pct(&sum.recover_s, 0.5),
        load.oks().iter().sum::<u64>(),
        load.failed.load(Ordering::Relaxed),
    );
    Ok(sum)
}

async fn run(s: Settings, dir: PathBuf) -> Result<()> {
    let systems = env_or("BENCH_FAILOVER_SYSTEMS", "etcd wasmctl");
    let faults = env_or("BENCH_FAILOVER_FAULTS", "kill stop");
    let faults: Vec<Fault> = faults
        .split_whitespace()
        .map(|f| match f {
            "kill" => Ok(Fault::Kill),
            "stop" => Ok(Fault::Stop),
            other => Err(anyhow!("BENCH_FAILOVER_FAULTS: unknown fault {other:?}")),
        })
        .collect::<Result<_>>()?;
    println!(
        "wasmctl: --raft-heartbeat {} --raft-election-timeout {}; etcd: --heartbeat-interval {} \
         --election-timeout {}; one write per member every {:?}",
        s.raft_heartbeat, s.raft_election, s.etcd_heartbeat_ms, s.etcd_election_ms, s.interval
    );
    let mut results: Vec<(Kind, Fault, Summary)> = Vec::new();
    for sys in systems.split_whitespace() {
        let kind = match sys {
            "wasmctl" => Kind::Wasmctl,
            "etcd" => Kind::Etcd,
            other => bail!("BENCH_FAILOVER_SYSTEMS: unknown system {other:?}"),
        };
        let sub = dir.join(kind.name());
        std::fs::create_dir_all(&sub)?;
        let mut c = match kind {
            Kind::Wasmctl => form_wasmctl(&s, &sub).await,
            Kind::Etcd => form_etcd(&s, &sub).await,
        }
        .with_context(|| format!("forming the {sys} cluster (logs in {})", sub.display()))?;
        for &fault in &faults {
            let sum = rounds(&s, &mut c, fault)
                .await
                .with_context(|| format!("logs in {}", sub.display()))?;
            results.push((kind, fault, sum));
        }
        for p in &mut c.procs {
            p.kill().await;
        }
    }
    for &fault in &faults {
        let get = |k: Kind| results.iter().find(|(kk, f, _)| *kk == k && *f == fault);
        if let (Some((_, _, w)), Some((_, _, e))) = (get(Kind::Wasmctl), get(Kind::Etcd)) {
            println!(
                "  ratio wasmctl/etcd {}: first write p50 {:.2}x, max {:.2}x; both members p50 \
                 {:.2}x, max {:.2}x",
                fault.name(),
                pct(&w.first_ms, 0.5) / pct(&e.first_ms, 0.5),
                pct(&w.first_ms, 1.0) / pct(&e.first_ms, 1.0),
                pct(&w.all_ms, 0.5) / pct(&e.all_ms, 0.5),
                pct(&w.all_ms, 1.0) / pct(&e.all_ms, 1.0),
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("usage: failover DIR (see the example's docs for the settings)"))?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    let s = Settings {
        wasmctl_bin: env_or("WASMCTL_BIN", &format!("{target}/debug/wasmctl")),
        etcd_bin: env_or("ETCD_BIN", "etcd"),
        rounds: env_or("BENCH_FAILOVERS", "20")
            .parse()
            .context("BENCH_FAILOVERS")?,
        raft_heartbeat: env_or("BENCH_RAFT_HEARTBEAT", "100ms"),
        raft_election: env_or("BENCH_RAFT_ELECTION_TIMEOUT", "300ms-600ms"),
        etcd_heartbeat_ms: env_or("BENCH_ETCD_HEARTBEAT_MS", "100"),
        etcd_election_ms: env_or("BENCH_ETCD_ELECTION_MS", "1000"),
        interval: Duration::from_millis(
            env_or("BENCH_FAILOVER_INTERVAL_MS", "10")
                .parse()
                .context("BENCH_FAILOVER_INTERVAL_MS")?,
        ),
    };
    anyhow::ensure!(s.rounds > 0, "BENCH_FAILOVERS must be at least 1");
    std::fs::create_dir_all(&dir)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Dropping `run` (on a signal) drops the clusters: every child is killed (kill_on_drop).
    let signal = tokio::select! {
        r = run(s, dir) => return r.map(|()| ExitCode::SUCCESS),
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    eprintln!("failover: stopped by {signal}; the clusters are killed");
    Ok(ExitCode::from(130))
}
