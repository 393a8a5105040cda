//! The API server over real HTTPS against a real server process and RocksDB.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{wait_for, ServerProc};

fn samples() -> Vec<(&'static str, Option<&'static str>, Value)> {
    let ns = Some("default");
    vec![
        (
            "/api/v1/namespaces",
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}),
        ),
        (
            "/api/v1/nodes",
            None,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
            "status": {"capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"}}}),
        ),
        (
            "/api/v1/namespaces/default/pods",
            ns,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hello"},
            "spec": {"containers": [{"name": "hello", "image": "hello:v1", "ports": [{"containerPort": 8080}],
                "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}}]}}),
        ),
        (
            "/api/v1/namespaces/default/services",
            ns,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        ),
        (
            "/api/v1/namespaces/default/endpoints",
            ns,
            // Not "web": the endpoints controller owns the Endpoints of Service "web" (and
            // deletes them with it), as Kubernetes' does.
            json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "external"},
            "subsets": [{"addresses": [{"ip": "127.1.0.2"}], "ports": [{"port": 8080}]}]}),
        ),
        (
            "/api/v1/namespaces/default/events",
            ns,
            json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "hello.1"},
            "involvedObject": {"kind": "Pod", "name": "hello", "namespace": "default"}, "reason": "Scheduled", "message": "assigned"}),
        ),
        (
            "/apis/apps/v1/namespaces/default/deployments",
            ns,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "hello", "image": "hello:v1"}]}}}}),
        ),
        (
            "/apis/apps/v1/namespaces/default/replicasets",
            ns,
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-abc"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "rs"}},
                "template": {"metadata": {"labels": {"app": "rs"}}, "spec": {"containers": [{"name": "hello", "image": "hello:v1"}]}}}}),
        ),
        (
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            Some("kube-node-lease"),
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "node-1"}, "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 40}}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_for_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    for (collection, _ns, obj) in samples() {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let item = format!("{collection}/{name}");
        // create
        let (code, created) = s.call(Method::POST, collection, Some(&obj)).await;
        assert_eq!(code, 201, "create {item}: {created}");
        assert!(created["metadata"]["uid"].is_string());
        assert!(created["metadata"]["creationTimestamp"].is_string());
        let rv1: u64 = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // create again: AlreadyExists
        let (code, st) = s.call(Method::POST, collection, Some(&obj)).await;
        assert_eq!(
            (code, st["reason"].as_str()),
            (409, Some("AlreadyExists")),
            "{st}"
        );
        // get
        let (code, got) = s.call(Method::GET, &item, None).await;
        assert_eq!(code, 200);
        assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
        // list
        let (code, list) = s.call(Method::GET, collection, None).await;
        assert_eq!(code, 200);
        assert!(
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["metadata"]["name"] == name.as_str()),
            "{list}"
        );
        assert!(
            list["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= rv1
        );
        // update with the current resourceVersion (a controller may write in between, as
        // the Deployment and ReplicaSet controllers do: then read again and retry)
        let mut upd = got.clone();
        let mut updated = Value::Null;
        for _ in 0..20 {
            let (_, cur) = s.call(Method::GET, &item, None).await;
            upd = cur;
            upd["metadata"]["labels"]["updated"] = json!("yes");
            let (code, body) = s.call(Method::PUT, &item, Some(&upd)).await;
            updated = body;
            if code != 409 {
                assert_eq!(code, 200, "update {item}: {updated}");
                break;
            }
        }
        let rv2: u64 = updated["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv2 > rv1);
        assert_eq!(updated["metadata"]["labels"]["updated"], "yes");
        // the same update again, with the stale resourceVersion: 409 Conflict
        let (code, st) = s.call(Method::PUT, &item, Some(&upd)).await;
        assert_eq!(
            (code, st["reason"].as_str()),
            (409, Some("Conflict")),
            "{st}"
        );
        // merge patch
        let patch = json!({"metadata": {"labels": {"patched": "true", "updated": null}}});
        let (code, patched) = s
            .raw(
                Method::PATCH,
                &item,
                Some(&patch),
                "application/merge-patch+json",
                Some(&s.token),
            )
            .await;
        assert_eq!(code, 200, "patch {item}: {patched}");
        assert_eq!(patched["metadata"]["labels"]["patched"], "true");
        assert!(patched["metadata"]["labels"].get("updated").is_none());
        // delete, then 404
        let (code, _) = s.call(Method::DELETE, &item, None).await;
        assert_eq!(code, 200, "delete {item}");
        if collection.ends_with("/namespaces") {
            // Namespaces terminate first, then disappear.
            wait_for(Duration::from_secs(10), "namespace removal", || async {
                (s.call(Method::GET, &item, None).await.0 == 404).then_some(())
            })
            .await;
        }
        let (code, st) = s.call(Method::GET, &item, None).await;
        assert_eq!(
            (code, st["reason"].as_str()),
            (404, Some("NotFound")),
            "{item}: {st}"
        );
        assert_eq!(st["kind"], "Status");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_validation_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    // 401 without a token and with a wrong one.
    let (code, st) = s
        .raw(Method::GET, "/api/v1/namespaces", None, "", None)
        .await;
    assert_eq!((code, st["reason"].as_str()), (401, Some("Unauthorized")));
    let (code, _) = s
        .raw(Method::GET, "/api/v1/namespaces", None, "", Some("nope"))
        .await;
    assert_eq!(code, 401);
    // 422 names the field path and the reason.
    let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": -2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
    let (code, st) = s
        .call(
            Method::POST,
            "/apis/apps/v1/namespaces/default/deployments",
            Some(&bad),
        )
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(st["reason"], "Invalid");
    assert_eq!(st["details"]["causes"][0]["field"], "spec.replicas");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("spec.replicas: must be >= 0, got -2"),
        "{st}"
    );
    // Unknown fields are rejected with their path.
    let unknown = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x", "imagee": "y"}]}});
    let (code, st) = s
        .call(
            Method::POST,
            "/api/v1/namespaces/default/pods",
            Some(&unknown),
        )
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["details"]["causes"][0]["field"],
        "spec.containers[0].imagee"
    );
    // Malformed JSON: 400 with a position.
    let resp = s
        .http
        .post(format!("{}/api/v1/namespaces/default/pods", s.url))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body("{\"apiVersion\": \"v1\",\n \"kind\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let st: Value = resp.json().await.unwrap();
    assert!(st["message"].as_str().unwrap().contains("line 2"), "{st}");
    // Unknown resource: 404; wrong namespace: 404 NotFound for the namespace.
    let (code, _) = s.call(Method::GET, "/api/v1/widgets", None).await;
    assert_eq!(code, 404);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x"}]}});
    let (code, st) = s
        .call(Method::POST, "/api/v1/namespaces/nope/pods", Some(&pod))
        .await;
    assert_eq!(code, 404, "{st}");
    // The system namespaces exist and cannot be deleted.
    let (code, _) = s
        .call(Method::DELETE, "/api/v1/namespaces/default", None)
        .await;
    assert_eq!(code, 403);
    // Discovery.
    let (code, v) = s.call(Method::GET, "/apis/apps/v1", None).await;
    assert_eq!(code, 200);
    assert!(v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "deployments"));
    let (code, v) = s.raw(Method::GET, "/version", None, "", None).await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn selectors_pagination_status_and_finalizers() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    for i in 0..7 {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "labels": {"app": if i % 2 == 0 { "even" } else { "odd" }}},
            "spec": {"nodeName": if i < 3 { "node-a" } else { "" }, "containers": [{"name": "c", "image": "x"}]}});
        let (code, b) = s
            .call(Method::POST, "/api/v1/namespaces/default/pods", Some(&pod))
            .await;
        assert_eq!(code, 201, "{b}");
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = s
        .call(
            Method::GET,
            "/api/v1/namespaces/default/pods?labelSelector=app%3Deven",
            None,
        )
        .await;
    assert_eq!(names(&v), ["p0", "p2", "p4", "p6"]);
    let (_, v) = s
        .call(
            Method::GET,
            "/api/v1/namespaces/default/pods?labelSelector=app+in+(odd),app!%3Deven",
            None,
        )
        .await;
    assert_eq!(names(&v), ["p1", "p3", "p5"]);
    let (_, v) = s
        .call(
            Method::GET,
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a",
            None,
        )
        .await;
    assert_eq!(names(&v), ["p0", "p1", "p2"]);
    let (_, v) = s
        .call(
            Method::GET,
            "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dp4",
            None,
        )
        .await;
    assert_eq!(names(&v), ["p4"]);
    // limit/continue walks everything exactly once.
    let mut seen = Vec::new();
    let mut cont = String::new();
    loop {
        let path = format!("/api/v1/namespaces/default/pods?limit=3&continue={cont}");
        let (code, v) = s.call(Method::GET, &path, None).await;
        assert_eq!(code, 200, "{v}");
        seen.extend(names(&v));
        match v["metadata"]["continue"].as_str() {
            Some(c) => cont = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

    // The status subresource: PUT on the main resource ignores status; /status changes only it.
    let (_, pod) = s
        .call(Method::GET, "/api/v1/namespaces/default/pods/p3", None)
        .await;
    let mut main = pod.clone();
    main["status"]["phase"] = json!("Running");
    let (code, after) = s
        .call(
            Method::PUT,
            "/api/v1/namespaces/default/pods/p3",
            Some(&main),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(after["status"]["phase"], "Pending");
    let mut st = after.clone();
    st["status"]["phase"] = json!("Running");
    st["metadata"]["labels"]["ignored"] = json!("yes");
    let (code, after) = s
        .call(
            Method::PUT,
            "/api/v1/namespaces/default/pods/p3/status",
            Some(&st),
        )
        .await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["status"]["phase"], "Running");
    assert!(after["metadata"]["labels"].get("ignored").is_none());

    // Generation moves with spec changes only.
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "g"},
        "spec": {"selector": {"matchLabels": {"app": "g"}}, "template": {"metadata": {"labels": {"app": "g"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}}}});
    let (_, d) = s
        .call(
            Method::POST,
            "/apis/apps/v1/namespaces/default/deployments",
            Some(&d),
        )
        .await;
    assert_eq!(d["metadata"]["generation"], 1);
    assert_eq!(d["spec"]["replicas"], 1, "defaulted");
    let patch = json!({"spec": {"replicas": 3}});
    let (_, d2) = s
        .raw(
            Method::PATCH,
            "/apis/apps/v1/namespaces/default/deployments/g",
            Some(&patch),
            "application/merge-patch+json",
            Some(&s.token),
        )
        .await;
    assert_eq!(d2["metadata"]["generation"], 2);
    // A no-op update writes nothing (read again and retry if the controller wrote status).
    let path = "/apis/apps/v1/namespaces/default/deployments/g";
    wait_for(Duration::from_secs(10), "a no-op PUT", || async {
        let (_, cur) = s.call(Method::GET, path, None).await;
        let (code, d3) = s.call(Method::PUT, path, Some(&cur)).await;
        if code == 409 {
            return None;
        }
        assert_eq!(code, 200, "{d3}");
        assert_eq!(
            d3["metadata"]["resourceVersion"],
            cur["metadata"]["resourceVersion"]
        );
        Some(())
    })
    .await;

    // Graceful deletion with a finalizer: deletionTimestamp first, removal when it is cleared.
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "held", "finalizers": ["example.com/hold"]}, "spec": {}});
    let (code, _) = s
        .call(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            Some(&lease),
        )
        .await;
    assert_eq!(code, 201);
    let item = "/apis/coordination.k8s.io/v1/namespaces/default/leases/held";
    let (code, v) = s.call(Method::DELETE, item, None).await;
    assert_eq!(code, 200);
    assert!(v["metadata"]["deletionTimestamp"].is_string(), "{v}");
    let (code, _) = s.call(Method::GET, item, None).await;
    assert_eq!(code, 200, "still there while the finalizer holds it");
    let patch = json!({"metadata": {"finalizers": null}});
    let (code, v) = s
        .raw(
            Method::PATCH,
            item,
            Some(&patch),
            "application/merge-patch+json",
            Some(&s.token),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = s.call(Method::GET, item, None).await;
    assert_eq!(code, 404);

    // A namespace takes its contents with it.
    let (code, _) = s
        .call(
            Method::POST,
            "/api/v1/namespaces",
            Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tmp"}})),
        )
        .await;
    assert_eq!(code, 201);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
    let (code, _) = s
        .call(Method::POST, "/api/v1/namespaces/tmp/pods", Some(&pod))
        .await;
    assert_eq!(code, 201);
    let (code, v) = s.call(Method::DELETE, "/api/v1/namespaces/tmp", None).await;
    assert_eq!(code, 200);
    assert_eq!(v["status"]["phase"], "Terminating");
    wait_for(
        Duration::from_secs(10),
        "namespace tmp to be gone",
        || async {
            (s.call(Method::GET, "/api/v1/namespaces/tmp", None).await.0 == 404).then_some(())
        },
    )
    .await;
    let (code, _) = s
        .call(Method::GET, "/api/v1/namespaces/tmp/pods/x", None)
        .await;
    assert_eq!(code, 404);
}

async fn collect_events(s: &ServerProc, path: &str, n: usize) -> Vec<Value> {
    let client = s.client();
    let mut stream = client.watch(path, None).await.expect("watch opens");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(ev))) => out.push(ev),
            Ok(other) => panic!("watch ended early after {} events: {other:?}", out.len()),
            Err(_) => panic!("timed out with {} of {n} events: {out:?}", out.len()),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_replays_exactly_the_later_events_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--bookmark-interval", "200ms"]).await;
    let coll = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let mk = |n: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": n, "labels": {"w": "yes"}}, "spec": {}});
    let (_, a) = s.call(Method::POST, coll, Some(&mk("before"))).await;
    let start = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // Later changes: ADDED b, MODIFIED b, DELETED before, ADDED c.
    let (_, b) = s.call(Method::POST, coll, Some(&mk("b"))).await;
    let mut b2 = b.clone();
    b2["spec"]["holderIdentity"] = json!("me");
    s.call(Method::PUT, &format!("{coll}/b"), Some(&b2)).await;
    s.call(Method::DELETE, &format!("{coll}/before"), None)
        .await;
    s.call(Method::POST, coll, Some(&mk("c"))).await;
    let events = collect_events(&s, &format!("{coll}?watch=1&resourceVersion={start}"), 4).await;
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ADDED", "b"),
            ("MODIFIED", "b"),
            ("DELETED", "before"),
            ("ADDED", "c")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let revs: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");

    // Live events follow the replay; bookmarks arrive when asked for.
    let client = s.client();
    let path = format!(
        "{coll}?watch=1&resourceVersion={}&allowWatchBookmarks=true&labelSelector=w%3Dyes",
        revs[3]
    );
    let mut stream = client.watch(&path, None).await.unwrap();
    s.call(Method::POST, coll, Some(&mk("live"))).await;
    let mut saw_live = false;
    let mut saw_bookmark = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(saw_live && saw_bookmark) {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap();
        match ev["type"].as_str().unwrap() {
            "ADDED" => {
                assert_eq!(ev["object"]["metadata"]["name"], "live");
                saw_live = true;
            }
            "BOOKMARK" => {
                assert!(ev["object"]["metadata"]["resourceVersion"].is_string());
                saw_bookmark = true;
            }
            other => panic!("unexpected {other}: {ev}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_a_compacted_revision_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &["--watch-history", "5"]).await;
    let coll = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    for i in 0..30 {
        let l = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": format!("l{i}")}, "spec": {}});
        let (code, _) = s.call(Method::POST, coll, Some(&l)).await;
        assert_eq!(code, 201);
    }
    let (code, st) = s
        .call(
            Method::GET,
            &format!("{coll}?watch=1&resourceVersion=1"),
            None,
        )
        .await;
    assert_eq!(code, 410, "{st}");
    assert_eq!(st["reason"], "Expired");
    assert_eq!(st["kind"], "Status");
    // A recent revision still works.
    let (_, list) = s.call(Method::GET, coll, None).await;
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let resp = s
        .http
        .get(format!(
            "{}{coll}?watch=1&resourceVersion={rv}&timeoutSeconds=1",
            s.url
        ))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// `pods/{name}/binding`: binds an unbound pod once; a second binding is a 409 Conflict.
#[tokio::test(flavor = "multi_thread")]
async fn binding_subresource_binds_only_unbound_pods() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "hello:v1"}]}});
    let (code, body) = s
        .call(Method::POST, "/api/v1/namespaces/default/pods", Some(&pod))
        .await;
    assert_eq!(code, 201, "{body}");
    let path = "/api/v1/namespaces/default/pods/p/binding";
    let bind = |node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    };
    let (code, body) = s
        .call(Method::POST, path, Some(&json!({"kind": "Binding"})))
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("target.name"),
        "{body}"
    );
    // A pod binds only to a Node that exists.
    let (code, body) = s.call(Method::POST, path, Some(&bind("node-a"))).await;
    assert_eq!(code, 404, "{body}");
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}});
    let (code, body) = s.call(Method::POST, "/api/v1/nodes", Some(&node)).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = s.call(Method::POST, path, Some(&bind("node-a"))).await;
    assert_eq!(code, 201, "{body}");
    let (_, p) = s
        .call(Method::GET, "/api/v1/namespaces/default/pods/p", None)
        .await;
    assert_eq!(p["spec"]["nodeName"], "node-a");
    let (code, body) = s.call(Method::POST, path, Some(&bind("node-b"))).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already assigned to node \"node-a\""),
        "{body}"
    );
    let (code, _) = s
        .call(
            Method::POST,
            "/api/v1/namespaces/default/pods/nope/binding",
            Some(&json!({"kind": "Binding", "metadata": {"name": "nope"},
                "target": {"kind": "Node", "name": "node-a"}})),
        )
        .await;
    assert_eq!(code, 404);
    let (code, _) = s.call(Method::GET, path, None).await;
    assert_eq!(code, 405);
}
