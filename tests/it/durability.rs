//! Crash safety: SIGKILL the real server during a stream of writes; every acknowledged
//! write is there after a restart.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::support::{wait_for, ServerProc};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_writes_loses_no_acknowledged_object() {
    let dir = tempfile::tempdir().unwrap();
    // Small snapshot interval so the crash also exercises snapshots and log purging.
    let mut s = ServerProc::start(dir.path(), &["--snapshot-logs", "200"]).await;
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let coll = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let mut writers = Vec::new();
    for w in 0..8 {
        let http = s.http.clone();
        let url = s.url.clone();
        let token = s.token.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..100_000 {
                let name = format!("w{w}-{i}");
                let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name}, "spec": {"holderIdentity": "x".repeat(900)}});
                let r = http
                    .post(format!("{url}{coll}"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().as_u16() == 201 => {
                        acked.lock().unwrap().insert(name);
                    }
                    // The server died mid-request: this write was never acknowledged.
                    _ => return,
                }
            }
        }));
    }
    // Let a good number of writes land, then crash the server while they are in flight.
    wait_for(Duration::from_secs(120), "500 acknowledged writes", || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 500).then_some(()) }
    })
    .await;
    s.kill();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    s.restart().await;
    let (code, list) = s.call(Method::GET, coll, None).await;
    assert_eq!(code, 200);
    let present: BTreeSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = acked.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged objects lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // Revisions keep increasing after the restart.
    let before: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "after"}, "spec": {}});
    let (code, obj) = s.call(Method::POST, coll, Some(&body)).await;
    assert_eq!(code, 201);
    let after: u64 = obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after > before);
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_restart_brings_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(dir.path(), &[]).await;
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "hello:v1"}]}}}});
    let (code, created) = s
        .call(
            Method::POST,
            "/apis/apps/v1/namespaces/default/deployments",
            Some(&d),
        )
        .await;
    assert_eq!(code, 201);
    // A Lease has no controller: its resourceVersion must come back exactly.
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "keep"}, "spec": {"holderIdentity": "x"}});
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let (code, lease) = s.call(Method::POST, lease_path, Some(&lease)).await;
    assert_eq!(code, 201, "{lease}");
    let status = s.terminate();
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    s.restart().await;
    let (code, got) = s
        .call(
            Method::GET,
            "/apis/apps/v1/namespaces/default/deployments/web",
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(
        got["metadata"]["generation"],
        created["metadata"]["generation"]
    );
    assert_eq!(got["spec"], created["spec"]);
    let (code, got) = s
        .call(Method::GET, &format!("{lease_path}/keep"), None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(got["metadata"]["uid"], lease["metadata"]["uid"]);
    assert_eq!(
        got["metadata"]["resourceVersion"],
        lease["metadata"]["resourceVersion"]
    );
}
