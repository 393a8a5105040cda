//! Pod runtime benchmark: create N `hello` pods with bounded concurrency against a running
//! `wasmctl up`, and measure per pod, from the moment its POST is sent:
//! - the POST's own latency (the create's Raft write);
//! - create -> phase Running and create -> Ready condition True, from a watch opened before
//!   the first create;
//! - create -> first HTTP 200 from `http://PODIP:8080/` (the pod IP comes from the watch; the
//!   pod is polled every 1 ms, a fresh connection per attempt);
//!
//! then the `wasmctl up` process's VmRSS before any pod and with all N pods idle, and a GET of
//! every pod. Prints one JSON line per measurement (percentiles are exact sample values,
//! nearest rank), plus a `target` line (one pod's IP, for wrk) and up to 20 `not_ready` lines.
//!
//! cargo run --example podbench -- KUBECONFIG PODS CONCURRENCY WASMCTL_PID [IMAGE]
//! (PODBENCH_DUMP=FILE also writes a CSV of per-pod instants; PODBENCH_TIMEOUT_S bounds the
//! wait for all pods, default 60 s + 1 s per 20 pods)

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

const NS_PODS: &str = "/api/v1/namespaces/default/pods";
const POLL_EVERY: Duration = Duration::from_millis(1);

/// What is known about one pod; every instant is set once.
struct Track {
    created: OnceLock<Instant>,
    /// The POST's answer arrived.
    posted: OnceLock<Instant>,
    running: OnceLock<Instant>,
    ready: OnceLock<Instant>,
    first_200: OnceLock<Instant>,
    ip: watch::Sender<Option<String>>,
}

impl Track {
    fn new() -> Track {
        Track {
            created: OnceLock::new(),
            posted: OnceLock::new(),
            running: OnceLock::new(),
            ready: OnceLock::new(),
            first_200: OnceLock::new(),
            ip: watch::channel(None).0,
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// p50 / p99 / max in milliseconds (microsecond resolution), nearest rank; null when empty.
fn summary(mut v: Vec<Duration>) -> Value {
    if v.is_empty() {
        return json!({"n": 0, "p50": null, "p99": null, "max": null});
    }
    v.sort();
    let at = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_micros() as f64 / 1000.0
    };
    json!({"n": v.len(), "p50": at(0.50), "p99": at(0.99), "max": at(1.0)})
}

/// Applies one watch event to the tracks; returns the event's resourceVersion.
fn apply_event(ev: &Value, tracks: &HashMap<String, Arc<Track>>) -> Option<String> {
    let now = Instant::now();
    let obj = &ev["object"];
    let rv = obj["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string);
    if ev["type"] == "ERROR" {
        return None;
    }
    let Some(t) = obj["metadata"]["name"].as_str().and_then(|n| tracks.get(n)) else {
        return rv;
    };
    let st = &obj["status"];
    if let Some(ip) = st["podIP"].as_str().filter(|s| !s.is_empty()) {
        if t.ip.borrow().is_none() {
            t.ip.send_replace(Some(ip.to_string()));
        }
    }
    if st["phase"] == "Running" {
        let _ = t.running.set(now);
    }
    let ready = st["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    if ready {
        let _ = t.ready.set(now);
    }
    rv
}

async fn get_ok(http: &reqwest::Client, ip: &str) -> bool {
    match http.get(format!("http://{ip}:8080/")).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::OK => r.bytes().await.is_ok(),
        _ => false,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: podbench KUBECONFIG PODS CONCURRENCY WASMCTL_PID [IMAGE]");
        std::process::exit(2);
    }
    let client = wasmctl_client::Client::from_kubeconfig(Some(std::path::Path::new(&args[1])))
        .expect("kubeconfig");
    let n: usize = args[2].parse().expect("PODS");
    let conc: usize = args[3].parse().expect("CONCURRENCY");
    let pid: u32 = args[4].parse().expect("WASMCTL_PID");
    let image = args.get(5).cloned().unwrap_or_else(|| "hello:v1".into());
    let deadline_after = Duration::from_secs(
        std::env::var("PODBENCH_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60 + n as u64 / 20),
    );
    // Plain HTTP to the pod IPs: no proxy, no keep-alive (idle connections would count as pod
    // memory), a bounded wait per attempt.
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let run = format!("pb{}", std::process::id());
    let names: Vec<String> = (0..n).map(|i| format!("{run}-{i}")).collect();
    let tracks: Arc<HashMap<String, Arc<Track>>> = Arc::new(
        names
            .iter()
            .map(|name| (name.clone(), Arc::new(Track::new())))
            .collect(),
    );

    // Warm-up: one pod of the same image first, so the module is pulled and compiled before
    // the measured pods (Kubernetes' pod-startup SLO likewise excludes image pulls). It stays
    // Running, so the fixed cost of the loaded component is in `rss_before`.
    let warm = format!("{run}-warmup");
    let warm_body = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": warm, "labels": {"app": "podbench-warmup", "run": run}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "hello", "image": image,
            "ports": [{"containerPort": 8080}]}]}});
    client
        .post(NS_PODS, &warm_body)
        .await
        .expect("creating the warm-up pod");
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = client
            .get(&format!("{NS_PODS}/{warm}"))
            .await
            .expect("reading the warm-up pod");
        if let Some(ip) = p["status"]["podIP"].as_str() {
            if get_ok(&http, ip).await {
                break;
            }
        }
        assert!(
            Instant::now() < warm_deadline,
            "the warm-up pod never answered: {}",
            p["status"]
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let rss_before = vm_rss_kib(pid);

    // The watch, opened before the first create, from the list's resourceVersion; reopened
    // from the last seen resourceVersion if the server ends it.
    let list = client.get(NS_PODS).await.expect("listing pods");
    let mut rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .to_string();
    let stream = client
        .watch(&format!("{NS_PODS}?watch=1&resourceVersion={rv}"), None)
        .await
        .expect("opening the watch")
        .boxed();
    let reconnects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (client, tracks, reconnects) = (client.clone(), tracks.clone(), reconnects.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            loop {
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(ev) => {
                            if ev["type"] == "ERROR" {
                                eprintln!("watch ERROR event: {ev}");
                                break;
                            }
                            if let Some(r) = apply_event(&ev, &tracks) {
                                rv = r;
                            }
                        }
                        Err(e) => {
                            eprintln!("watch: {e}");
                            break;
                        }
                    }
                }
                reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match client
                    .watch(&format!("{NS_PODS}?watch=1&resourceVersion={rv}"), None)
                    .await
                {
                    Ok(s) => stream = s.boxed(),
                    Err(e) => {
                        eprintln!("reopening the watch: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        stream = futures_util::stream::empty().boxed();
                    }
                }
            }
        })
    };

    // Creates, at most `conc` in flight; each create starts its pod's HTTP poller.
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + deadline_after;
    let sem = Arc::new(Semaphore::new(conc));
    let mut creates = tokio::task::JoinSet::new();
    let mut pollers = tokio::task::JoinSet::new();
    let mut create_errors = Vec::new();
    for name in &names {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let t = tracks[name].clone();
        let (client, name2) = (client.clone(), name.clone());
        let body = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "podbench", "run": run}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "hello", "image": image,
                "ports": [{"containerPort": 8080}]}]}});
        creates.spawn(async move {
            let _ = t.created.set(Instant::now());
            let r = client.post(NS_PODS, &body).await;
            let _ = t.posted.set(Instant::now());
            drop(permit);
            r.err().map(|e| format!("{name2}: {e}"))
        });
        let (t, http) = (tracks[name].clone(), http.clone());
        pollers.spawn(async move {
            let mut ip_rx = t.ip.subscribe();
            let ip = tokio::select! {
                r = ip_rx.wait_for(Option::is_some) => match r { Ok(ip) => (*ip).clone().unwrap(), Err(_) => return },
                _ = tokio::time::sleep_until(deadline) => return,
            };
            while tokio::time::Instant::now() < deadline {
                if get_ok(&http, &ip).await {
                    let _ = t.first_200.set(Instant::now());
                    return;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        });
    }
    while let Some(r) = creates.join_next().await {
        if let Some(e) = r.unwrap() {
            create_errors.push(e);
        }
    }
    let create_wall = start.elapsed();
    while pollers.join_next().await.is_some() {}
    // Pollers end on their first 200; wait for the watch to report Ready for all as well.
    while tokio::time::Instant::now() < deadline
        && !tracks.values().all(|t| t.ready.get().is_some())
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_wall = start.elapsed();

    let lat = |f: fn(&Track) -> Option<Instant>| -> Vec<Duration> {
        tracks
            .values()
            .filter_map(|t| Some(f(t)? - *t.created.get()?))
            .collect()
    };
    let posted = lat(|t| t.posted.get().copied());
    let running = lat(|t| t.running.get().copied());
    let ready = lat(|t| t.ready.get().copied());
    let first_200 = lat(|t| t.first_200.get().copied());
    println!(
        "{}",
        json!({"bench": "pod_start", "pods": n, "concurrency": conc,
            "create_errors": create_errors.len(),
            "create_wall_s": create_wall.as_secs_f64(), "all_ready_wall_s": all_wall.as_secs_f64(),
            "create_post_ms": summary(posted), "create_to_running_ms": summary(running), "create_to_ready_ms": summary(ready),
            "create_to_first_200_ms": summary(first_200),
            "watch_reconnects": reconnects.load(std::sync::atomic::Ordering::Relaxed),
            "poll_interval_ms": POLL_EVERY.as_millis() as u64})
    );
    // PODBENCH_DUMP=FILE: one CSV row per pod (ms after the first create; empty if never).
    if let Ok(path) = std::env::var("PODBENCH_DUMP") {
        let ms = |i: Option<&Instant>| {
            i.map(|i| format!("{:.3}", (*i - start).as_micros() as f64 / 1000.0))
                .unwrap_or_default()
        };
        let mut csv = String::from("pod,created_ms,posted_ms,running_ms,ready_ms,first_200_ms\n");
        for name in &names {
            let t = &tracks[name];
            csv += &format!(
                "{name},{},{},{},{},{}\n",
                ms(t.created.get()),
                ms(t.posted.get()),
                ms(t.running.get()),
                ms(t.ready.get()),
                ms(t.first_200.get())
            );
        }
        std::fs::write(&path, csv).expect("PODBENCH_DUMP");
    }
    for e in create_errors.iter().take(5) {
        eprintln!("create error: {e}");
    }

    // Pods that never became Ready: their status as the API has it now.
    let mut not_ready: Vec<&String> = names
        .iter()
        .filter(|name| tracks[*name].ready.get().is_none())
        .collect();
    not_ready.truncate(20);
    for name in not_ready {
        let st = match client.get(&format!("{NS_PODS}/{name}")).await {
            Ok(p) => p["status"].clone(),
            Err(e) => json!({"error": e.to_string()}),
        };
        let waiting: Vec<Value> = st["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["state"].clone())
            .collect();
        let conds: Vec<Value> = st["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["status"] != "True")
            .map(|c| json!({"type": c["type"], "reason": c["reason"], "message": c["message"]}))
            .collect();
        println!(
            "{}",
            json!({"bench": "not_ready", "pod": name, "phase": st["phase"], "reason": st["reason"],
                "message": st["message"], "containers": waiting, "conditions": conds})
        );
    }

    // Density: every pod idle (no open connections), then RSS; then one GET of each pod.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = vm_rss_kib(pid);
    let ips: Vec<Option<String>> = names
        .iter()
        .map(|nm| tracks[nm].ip.borrow().clone())
        .collect();
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let check_start = Instant::now();
    futures_util::stream::iter(ips.iter().flatten().cloned())
        .for_each_concurrent(64, |ip| {
            let (http, ok) = (http.clone(), ok.clone());
            async move {
                if get_ok(&http, &ip).await {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    let check_wall = check_start.elapsed();
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    let rss_after_check = vm_rss_kib(pid);
    println!(
        "{}",
        json!({"bench": "density", "pods": n, "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_per_pod_kib": (rss_after as f64 - rss_before as f64) / n as f64,
            "http_ok": ok, "http_failed": n - ok, "check_wall_s": check_wall.as_secs_f64(),
            "rss_after_check_kib": rss_after_check})
    );
    if let Some((name, ip)) = names
        .iter()
        .zip(&ips)
        .find_map(|(nm, ip)| Some((nm, ip.clone()?)))
    {
        println!("{}", json!({"bench": "target", "pod": name, "ip": ip}));
    }
    watcher.abort();
}
