//! Store benchmark load generator: create ~1 KB objects with N concurrent clients against the
//! wasmctl API server (HTTPS, JSON, full API path) or etcd's v3 JSON gateway (HTTP), then
//! linearizable reads, and print throughput and latency percentiles.
//!
//! cargo run --example loadgen -- wasmctl KUBECONFIG CLIENTS REQUESTS
//! cargo run --example loadgen -- etcd http://127.0.0.1:2379 CLIENTS REQUESTS

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;

#[derive(Clone)]
enum Target {
    Wasmctl(wasmctl_client::Client),
    Etcd(reqwest::Client, String),
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Target {
    async fn write(&self, run: &str, i: usize) -> bool {
        let name = format!("{run}-{i}");
        let payload = "x".repeat(900);
        match self {
            Target::Wasmctl(c) => {
                let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name}, "spec": {"holderIdentity": payload}});
                c.post(
                    "/apis/coordination.k8s.io/v1/namespaces/default/leases",
                    &body,
                )
                .await
                .is_ok()
            }
            Target::Etcd(c, url) => {
                let body = json!({"key": b64(&format!("/bench/{name}")), "value": b64(&format!("{{\"name\":\"{name}\",\"v\":\"{payload}\"}}"))});
                matches!(c.post(format!("{url}/v3/kv/put")).json(&body).send().await, Ok(r) if r.status().is_success())
            }
        }
    }
    async fn read(&self, run: &str, i: usize) -> bool {
        let name = format!("{run}-{i}");
        match self {
            Target::Wasmctl(c) => c
                .get(&format!(
                    "/apis/coordination.k8s.io/v1/namespaces/default/leases/{name}"
                ))
                .await
                .is_ok(),
            Target::Etcd(c, url) => {
                let body = json!({"key": b64(&format!("/bench/{name}"))});
                matches!(c.post(format!("{url}/v3/kv/range")).json(&body).send().await, Ok(r) if r.status().is_success())
            }
        }
    }
}

async fn phase(
    t: &Target,
    run: &str,
    clients: usize,
    requests: usize,
    write: bool,
) -> (f64, u64, u64, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (t, run, next) = (t.clone(), run.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let t0 = Instant::now();
                let ok = if write {
                    t.write(&run, i).await
                } else {
                    t.read(&run, i).await
                };
                if !ok {
                    errors += 1;
                }
                hist.record(t0.elapsed().as_micros() as u64).unwrap();
            }
            (hist, errors)
        }));
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.unwrap();
        hist.add(h).unwrap();
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    (
        requests as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        errors,
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: loadgen wasmctl|etcd KUBECONFIG|URL CLIENTS REQUESTS");
        std::process::exit(2);
    }
    let clients: usize = args[3].parse().expect("CLIENTS");
    let requests: usize = args[4].parse().expect("REQUESTS");
    let target = match args[1].as_str() {
        "wasmctl" => Target::Wasmctl(
            wasmctl_client::Client::from_kubeconfig(Some(std::path::Path::new(&args[2])))
                .expect("kubeconfig"),
        ),
        "etcd" => Target::Etcd(
            reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            args[2].clone(),
        ),
        other => panic!("unknown target {other}"),
    };
    let run = format!("r{}-c{clients}", std::process::id());
    let (w, wp50, wp99, we) = phase(&target, &run, clients, requests, true).await;
    let (r, rp50, rp99, re) = phase(&target, &run, clients, requests, false).await;
    println!(
        "{} clients={clients} writes/s={w:.0} write_p50_us={wp50} write_p99_us={wp99} write_errors={we} reads/s={r:.0} read_p50_us={rp50} read_p99_us={rp99} read_errors={re}",
        args[1]
    );
}
