//! Host memory and pool slots a guest drives (issue 11, item 9): header maps a guest builds are
//! charged to its pod's memory budget (and the agent's RSS stays bounded), a container without
//! a memory limit gets the node's default, and one busy pod cannot take every instance slot.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent::{pod_ip, Cluster};
use crate::support::*;

const MI: u64 = 1 << 20;

fn hostile(name: &str, memory: Option<&str>) -> Value {
    let mut c = json!({ "name": "hostile", "image": "hostile:v1",
                        "ports": [{ "containerPort": 8080 }] });
    if let Some(m) = memory {
        c["resources"] = json!({ "limits": { "memory": m } });
    }
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name },
        "spec": { "nodeName": "node-1", "containers": [c] },
    })
}

fn status<'a>(p: &'a Value, container: &str) -> &'a Value {
    p["status"]["containerStatuses"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == container))
        .unwrap_or(&Value::Null)
}

/// The agent process's resident set (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

async fn get(url: String) -> (u16, String) {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    match c.get(&url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_maps_a_guest_builds_are_charged_to_its_pod() {
    let c = Cluster::start(&[]).await;
    c.push("hostile", "hostile:v1");
    let limit = 32 * MI;
    c.create_pod(hostile("fields", Some("32Mi"))).await;
    let ip = pod_ip(&c.wait_ready("fields").await);
    // A guest that stays inside its budget builds and holds its maps.
    let (code, body) = get(format!("http://{ip}:8080/fields?n=50&size=1000")).await;
    assert_eq!(
        (code, body.trim()),
        (200, "ok: held 50 fields; first error:")
    );

    // Eight requests at once, each holding 4000 maps of 15 KB (under any field size limit):
    // 480 MB of the agent's heap if nothing charges them, and the pod's limit is 32 MiB.
    let pid = c.agent.child.id();
    let before = rss(pid);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        calls.spawn(get(format!(
            "http://{ip}:8080/fields?n=4000&size=15000&hold_ms=3000"
        )));
    }
    let mut peak = before;
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while answers.len() < 8 {
        assert!(Instant::now() < deadline, "the requests did not finish");
        peak = peak.max(rss(pid));
        tokio::select! {
            Some(r) = calls.join_next() => answers.push(r.unwrap()),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let grown = peak.saturating_sub(before);
    eprintln!(
        "agent RSS {} MiB before, peak {} MiB while the maps were held",
        before / MI,
        peak / MI
    );
    let held: Vec<_> = answers
        .iter()
        .filter(|(code, body)| *code == 200 && body.contains("held 4000"))
        .collect();
    assert!(
        held.is_empty(),
        "a pod limited to 32Mi held 4000 header maps of 15 KB: {held:?}"
    );
    // wasmtime's accounting of a map is within about 2x of the allocator's bytes: twice the
    // limit, plus room for the eight instances and the agent's own noise.
    assert!(
        grown < 2 * limit + 32 * MI,
        "the agent's RSS grew by {} MiB (limit {} MiB); answers {answers:?}",
        grown / MI,
        limit / MI
    );
    assert!(
        answers.iter().any(|(code, _)| *code == 500),
        "no request was refused: {answers:?}"
    );
    // The refusal is the container's OOM kill, as for linear memory.
    let p = c
        .wait_pod("fields", "OOMKilled and restarted", 60, |p| {
            let s = status(p, "hostile");
            [&s["lastState"], &s["state"]]
                .iter()
                .any(|st| st["terminated"]["reason"] == "OOMKilled")
        })
        .await;
    let s = status(&p, "hostile");
    let t = if s["lastState"]["terminated"].is_object() {
        &s["lastState"]["terminated"]
    } else {
        &s["state"]["terminated"]
    };
    assert_eq!(t["exitCode"], 137, "{s}");
    assert!(
        t["message"]
            .as_str()
            .is_some_and(|m| m.contains("memory limit exceeded")),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_without_a_memory_limit_gets_the_nodes_default() {
    let c = Cluster::start(&["--default-memory-limit", "48Mi"]).await;
    c.push("mem-hog", "mem-hog:v1");
    c.create_pod(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "unlimited" },
        "spec": { "nodeName": "node-1", "restartPolicy": "Never",
                  "containers": [{ "name": "mem-hog", "image": "mem-hog:v1" }] },
    }))
    .await;
    let p = c
        .wait_pod("unlimited", "OOMKilled", 120, |p| {
            status(p, "mem-hog")["state"]["terminated"]["reason"] == "OOMKilled"
        })
        .await;
    assert_eq!(p["status"]["phase"], "Failed");
    let logs = stdout(&c.server.wasmctl(&["logs", "unlimited"]));
    let most: u64 = logs
        .lines()
        .filter_map(|l| l.split("allocated ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or_else(|| panic!("mem-hog logged no allocation: {logs}"));
    assert!(
        (8..48).contains(&most),
        "mem-hog without a limit allocated {most} MiB on a node whose default limit is 48Mi"
    );
    // A nonsense default is refused at startup.
    let out = std::process::Command::new(bin())
        .args(["agent", "--default-memory-limit", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid memory quantity"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_pod_cannot_take_every_instance_slot() {
    // 16 pool slots: one pod holds at most 4 of them (a quarter) at once.
    let c = Cluster::start(&["--instance-slots", "16"]).await;
    c.push("hostile", "hostile:v1");
    c.push("hello", "hello:v1");
    c.create_pod(hostile("busy", None)).await;
    c.create_pod(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "neighbour" },
        "spec": { "nodeName": "node-1", "containers": [{ "name": "hello", "image": "hello:v1",
                  "ports": [{ "containerPort": 8080 }] }] },
    }))
    .await;
    let busy = pod_ip(&c.wait_ready("busy").await);
    let neighbour = pod_ip(&c.wait_ready("neighbour").await);

    // 20 requests that each keep their instance for 6 s: more than the whole pool.
    let started = Instant::now();
    let mut holds = tokio::task::JoinSet::new();
    for _ in 0..20 {
        holds.spawn(get(format!("http://{busy}:8080/hold?ms=6000")));
    }
    // While they hold, the neighbour still answers, every time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let (code, body) = get(format!("http://{neighbour}:8080/")).await;
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "the check outlasted the holds"
        );
        assert_eq!(code, 200, "the neighbour, while its node is busy: {body}");
    }
    let mut answers = Vec::new();
    while let Some(r) = holds.join_next().await {
        answers.push(r.unwrap());
    }
    let served = answers.iter().filter(|(code, _)| *code == 200).count();
    let refused = answers
        .iter()
        .filter(|(code, body)| *code == 503 && body.contains("instance limit"))
        .count();
    assert_eq!((served, refused), (4, 16), "{answers:?}");
}
