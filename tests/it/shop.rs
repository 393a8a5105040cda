//! The shop (`manifests/shop.yaml`: frontend, catalog, cart and auth, each a Deployment and a
//! Service, calling each other by service name) on one server and two agents with their own
//! node IPs: the frontend answers through the NodePort of either node, a checkout crosses
//! three services, and requests spread over both frontend replicas.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_answers_on_either_nodes_nodeport_and_services_call_each_other_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agents) = service_cluster(
        dir.path(),
        &["node-a", "node-b"],
        &[],
        &["--lease-renew", "1s"],
    )
    .await;
    for (app, tag) in [
        ("shop_frontend", "shop-frontend:v1"),
        ("catalog", "catalog:v1"),
        ("cart", "cart:v1"),
        ("auth", "auth:v1"),
    ] {
        let out = server.wasmctl(&["push", wasi_app(app).to_str().unwrap(), tag]);
        assert!(out.status.success(), "push {tag}: {}", stderr(&out));
    }
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/shop.yaml");
    let out = server.wasmctl(&["apply", "-f", manifest]);
    assert!(out.status.success(), "apply: {}", stderr(&out));

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let t = Duration::from_secs(120);
    for a in &agents {
        let url = format!(
            "http://{}:30081/api/checkout?token=alice-token&items=p1:2",
            a.node_ip()
        );
        // Ready once every service on the path has ready endpoints.
        let body: serde_json::Value = wait_for(t, &format!("a checkout through {url}"), || async {
            let r = http.get(&url).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json().await.ok()
        })
        .await;
        assert_eq!(body["user"], "alice", "{body}");
        assert!(body["total"].as_i64().unwrap() > 0, "{body}");

        let page = http
            .get(format!("http://{}:30081/", a.node_ip()))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status().as_u16(), 200);
        let html = page.text().await.unwrap();
        assert!(
            html.contains("<html") || html.contains("<!DOCTYPE"),
            "{html}"
        );

        let denied = http
            .get(format!(
                "http://{}:30081/api/checkout?token=nope&items=p1:1",
                a.node_ip()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(denied.status().as_u16(), 401);
    }

    // Requests to one NodePort reach both frontend replicas (x-served-by is the pod name).
    let url = format!("http://{}:30081/healthz", agents[0].node_ip());
    let mut served_by = BTreeSet::new();
    for _ in 0..40 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        if let Some(v) = r.headers().get("x-served-by") {
            served_by.insert(v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(served_by.len(), 2, "{served_by:?}");
}
