//! Terminating namespaces with real processes: a Namespace stays (with `spec.finalizers:
//! [kubernetes]`, phase Terminating and the deleter's conditions) until its content is gone,
//! whatever updates it gets meanwhile; a namespace re-created under the same name keeps its
//! content; the pods of a deleted namespace are deleted gracefully (their in-flight requests
//! finish); the last step survives concurrent writers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::agent::{is_ready, pod_ip, Cluster};
use crate::support::*;

const NAMESPACES: &str = "/api/v1/namespaces";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
/// A finalizer no controller removes: it holds an object until the test releases it.
const HOLD: &str = "example.com/hold";
/// The cleanup's longest pause between two passes (`CLEANUP_MAX_BACKOFF` in
/// control-plane/src/objects/delete.rs): a cleanup that is alive acts within it.
const CLEANUP_MAX_BACKOFF: Duration = Duration::from_secs(5);

fn pods(ns: &str) -> String {
    format!("{NAMESPACES}/{ns}/pods")
}

async fn create_namespace(s: &ServerProc, name: &str) -> Value {
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    let (code, ns) = s.call(Method::POST, NAMESPACES, Some(&body)).await;
    assert_eq!(code, 201, "{ns}");
    ns
}

async fn namespace(s: &ServerProc, name: &str) -> Option<Value> {
    let (code, ns) = s
        .call(Method::GET, &format!("{NAMESPACES}/{name}"), None)
        .await;
    match code {
        200 => Some(ns),
        404 => None,
        _ => panic!("GET namespace {name}: {code} {ns}"),
    }
}

/// A pod no scheduler binds (so it has no grace period), held by [`HOLD`] when `held`.
async fn create_pod(s: &ServerProc, ns: &str, name: &str, held: bool) -> Value {
    let mut meta = json!({"name": name});
    if held {
        meta["finalizers"] = json!([HOLD]);
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
        "schedulerName": "by-hand", "containers": [{"name": "c", "image": "hello:v1"}]}});
    let (code, p) = s.call(Method::POST, &pods(ns), Some(&pod)).await;
    assert_eq!(code, 201, "{p}");
    p
}

async fn release(s: &ServerProc, ns: &str, pod: &str) {
    let patch = json!({"metadata": {"finalizers": null}});
    let (code, p) = s
        .raw(
            Method::PATCH,
            &format!("{}/{pod}", pods(ns)),
            Some(&patch),
            MERGE,
            Some(&s.token),
        )
        .await;
    assert_eq!(code, 200, "{p}");
}

async fn delete_namespace(s: &ServerProc, name: &str) -> Value {
    let (code, ns) = s
        .call(Method::DELETE, &format!("{NAMESPACES}/{name}"), None)
        .await;
    assert_eq!(code, 200, "{ns}");
    assert!(ns["metadata"]["deletionTimestamp"].is_string(), "{ns}");
    assert_eq!(ns["status"]["phase"], "Terminating", "{ns}");
    ns
}

async fn wait_gone(s: &ServerProc, name: &str, within: Duration) {
    wait_for(within, &format!("namespace {name} to be gone"), || async {
        namespace(s, name).await.is_none().then_some(())
    })
    .await;
}

/// A namespace being deleted is still there, terminating, with the lifecycle finalizer.
#[track_caller]
fn assert_terminating(ns: &Option<Value>, uid: &Value, after: &str) {
    let Some(ns) = ns else {
        panic!("the namespace was removed by {after} while its content remains");
    };
    assert_eq!(&ns["metadata"]["uid"], uid, "{ns}");
    assert!(ns["metadata"]["deletionTimestamp"].is_string(), "{ns}");
    assert_eq!(ns["status"]["phase"], "Terminating", "after {after}: {ns}");
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]), "{ns}");
}

fn condition<'a>(ns: &'a Value, type_: &str) -> &'a Value {
    ns["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_never_remove_a_terminating_namespace_while_content_remains() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let created = create_namespace(&s, "busy").await;
    assert_eq!(created["status"]["phase"], "Active");
    let uid = created["metadata"]["uid"].clone();
    create_pod(&s, "busy", "held", true).await;
    delete_namespace(&s, "busy").await;
    let path = format!("{NAMESPACES}/busy");

    // kubectl label / annotate (merge patch), a JSON patch, a PUT that also tries to drop the
    // lifecycle finalizer, and a second delete: the namespace stays.
    let label = json!({"metadata": {"labels": {"team": "a"}}});
    let (code, body) = s
        .raw(Method::PATCH, &path, Some(&label), MERGE, Some(&s.token))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_terminating(&namespace(&s, "busy").await, &uid, "a merge patch");
    let annotate = json!([{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]);
    let (code, body) = s
        .raw(
            Method::PATCH,
            &path,
            Some(&annotate),
            JSON_PATCH,
            Some(&s.token),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_terminating(&namespace(&s, "busy").await, &uid, "a JSON patch");
    let mut put = namespace(&s, "busy").await.expect("still there");
    put["metadata"]["labels"]["team"] = json!("b");
    put["spec"] = json!({});
    let (code, body) = s.call(Method::PUT, &path, Some(&put)).await;
    assert_eq!(code, 200, "{body}");
    let now = namespace(&s, "busy").await;
    assert_terminating(&now, &uid, "a PUT");
    assert_eq!(now.as_ref().unwrap()["metadata"]["labels"]["team"], "b");
    let (code, body) = s.call(Method::DELETE, &path, None).await;
    assert_eq!(code, 200, "{body}");
    assert_terminating(&namespace(&s, "busy").await, &uid, "a second delete");

    // Its status keeps phase Terminating (kube's wording for the attempt to change it).
    let mut active = namespace(&s, "busy").await.expect("still there");
    active["status"]["phase"] = json!("Active");
    let (code, body) = s
        .call(Method::PUT, &format!("{path}/status"), Some(&active))
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        body["message"],
        "Namespace \"busy\" is invalid: status.Phase: Invalid value: \"Active\": may only be 'Terminating' if `deletionTimestamp` is not empty",
        "{body}"
    );

    // No new content (kube's NamespaceLifecycle admission).
    let late = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late"},
        "spec": {"containers": [{"name": "c", "image": "hello:v1"}]}});
    let (code, body) = s.call(Method::POST, &pods("busy"), Some(&late)).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden", "{body}");
    assert_eq!(
        body["message"],
        "pods \"late\" is forbidden: unable to create new content in namespace busy because it is being terminated",
        "{body}"
    );

    // The deleter says what it waits for, in kube's words.
    let ns = wait_for(
        Duration::from_secs(30),
        "the namespace's deletion conditions",
        || async {
            let ns = namespace(&s, "busy").await?;
            (condition(&ns, "NamespaceContentRemaining")["status"] == "True").then_some(ns)
        },
    )
    .await;
    let remaining = condition(&ns, "NamespaceContentRemaining");
    assert_eq!(remaining["reason"], "SomeResourcesRemain", "{ns}");
    assert_eq!(
        remaining["message"], "Some resources are remaining: pods. has 1 resource instances",
        "{ns}"
    );
    let finalizers = condition(&ns, "NamespaceFinalizersRemaining");
    assert_eq!(finalizers["status"], "True", "{ns}");
    assert_eq!(finalizers["reason"], "SomeFinalizersRemain", "{ns}");
    assert_eq!(
        finalizers["message"],
        format!("Some content in the namespace has finalizers remaining: {HOLD} in 1 resource instances"),
        "{ns}"
    );
    let content = condition(&ns, "NamespaceDeletionContentFailure");
    assert_eq!(content["status"], "False", "{ns}");
    assert_eq!(content["reason"], "ContentDeleted", "{ns}");
    assert_terminating(&Some(ns.clone()), &uid, "the conditions");

    // Once its content is gone, so is the namespace.
    release(&s, "busy", "held").await;
    wait_gone(&s, "busy", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_recreated_under_the_same_name_keeps_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let first = create_namespace(&s, "again").await;
    create_pod(&s, "again", "old", true).await;
    delete_namespace(&s, "again").await;
    // An update while it terminates (as the garbage collector's or `kubectl label`).
    let label = json!({"metadata": {"labels": {"touched": "yes"}}});
    let (code, body) = s
        .raw(
            Method::PATCH,
            &format!("{NAMESPACES}/again"),
            Some(&label),
            MERGE,
            Some(&s.token),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    release(&s, "again", "old").await;
    wait_gone(&s, "again", Duration::from_secs(30)).await;

    // The same name again, at once, with new content.
    let second = create_namespace(&s, "again").await;
    assert_ne!(second["metadata"]["uid"], first["metadata"]["uid"]);
    let fresh = create_pod(&s, "again", "fresh", false).await;
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "fresh"}, "spec": {"holderIdentity": "me"}});
    let leases = "/apis/coordination.k8s.io/v1/namespaces/again/leases";
    let (code, body) = s.call(Method::POST, leases, Some(&lease)).await;
    assert_eq!(code, 201, "{body}");

    // A cleanup of the first namespace that were still running would act within its longest
    // pause between passes: the new namespace and its content outlive twice that.
    let until = Instant::now() + 2 * CLEANUP_MAX_BACKOFF;
    while Instant::now() < until {
        let ns = namespace(&s, "again")
            .await
            .expect("the re-created namespace is still there");
        assert_eq!(ns["metadata"]["uid"], second["metadata"]["uid"], "{ns}");
        assert!(ns["metadata"]["deletionTimestamp"].is_null(), "{ns}");
        assert!(ns["status"].get("conditions").is_none(), "{ns}");
        let (code, p) = s
            .call(Method::GET, &format!("{}/fresh", pods("again")), None)
            .await;
        assert_eq!(code, 200, "the new namespace's pod was deleted: {p}");
        assert_eq!(p["metadata"]["uid"], fresh["metadata"]["uid"], "{p}");
        assert!(p["metadata"]["deletionTimestamp"].is_null(), "{p}");
        let (code, l) = s.call(Method::GET, &format!("{leases}/fresh"), None).await;
        assert_eq!(code, 200, "the new namespace's lease was deleted: {l}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pods of a deleted namespace get their own grace period: the node agent drains them
/// (an in-flight request completes), then they go, then the namespace.
#[tokio::test(flavor = "multi_thread")]
async fn pods_of_a_deleted_namespace_are_deleted_gracefully() {
    let c = Cluster::start(&[]).await;
    c.push("hello", "hello:v1");
    let s = &c.server;
    create_namespace(s, "drain").await;
    let grace = 20;
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": {
        "nodeName": c.agent.name, "terminationGracePeriodSeconds": grace,
        "containers": [{"name": "hello", "image": "hello:v1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]}});
    let (code, body) = s.call(Method::POST, &pods("drain"), Some(&pod)).await;
    assert_eq!(code, 201, "{body}");
    let ready = wait_for(Duration::from_secs(60), "pod web to be Ready", || async {
        let (code, p) = s
            .call(Method::GET, &format!("{}/web", pods("drain")), None)
            .await;
        (code == 200 && is_ready(&p)).then_some(p)
    })
    .await;
    let ip = pod_ip(&ready);

    // Follow the pod from here on.
    let (code, list) = s.call(Method::GET, &pods("drain"), None).await;
    assert_eq!(code, 200, "{list}");
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let mut events = s
        .client()
        .watch(
            &format!("{}?watch=1&resourceVersion={rv}", pods("drain")),
            None,
        )
        .await
        .expect("watch opens");

    let slow = tokio::spawn({
        let url = format!("http://{ip}:8080/sleep/1500");
        async move { http_get(&url).await }
    });
    wait_for(
        Duration::from_secs(10),
        "the slow request to be in flight",
        || async {
            let out = s.wasmctl(&["logs", "web", "-n", "drain"]);
            stdout(&out).contains("sleeping 1500 ms").then_some(())
        },
    )
    .await;
    delete_namespace(s, "drain").await;
    let (code, body) = slow
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(code, 200, "{body}");

    let mut terminating = None;
    let deleted = tokio::time::timeout(Duration::from_secs(2 * grace), async {
        while let Some(Ok(ev)) = events.next().await {
            let obj = &ev["object"];
            if ev["type"] == "DELETED" {
                return Some(obj.clone());
            }
            if terminating.is_none() && obj["metadata"]["deletionTimestamp"].is_string() {
                terminating = Some(obj.clone());
            }
        }
        None
    })
    .await
    .expect("the pod is removed within its grace period")
    .expect("the watch reports its removal");
    let terminating = terminating.unwrap_or_else(|| {
        panic!("the pod was removed without a grace period; last seen as {deleted}")
    });
    assert_eq!(
        terminating["metadata"]["deletionGracePeriodSeconds"], grace,
        "{terminating}"
    );
    wait_gone(s, "drain", Duration::from_secs(30)).await;
}

/// Writers racing the lifecycle controller's last write (the finalizer's removal) make it
/// conflict; it tries again, and the namespace goes. (One namespace's last write loses the
/// race more often than not; several namespaces at once make a cleanup that gave up on a
/// conflict show.)
#[tokio::test(flavor = "multi_thread")]
async fn the_last_step_of_a_namespace_deletion_survives_concurrent_writers() {
    const NAMESPACES_AT_ONCE: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(ServerProc::start(dir.path(), &[]).await);
    let races: Vec<_> = (0..NAMESPACES_AT_ONCE)
        .map(|i| tokio::spawn(race_the_last_step(s.clone(), format!("hot-{i}"))))
        .collect();
    for r in races {
        r.await.expect("the race");
    }
}

async fn race_the_last_step(s: Arc<ServerProc>, ns: String) {
    let created = create_namespace(&s, &ns).await;
    let uid = created["metadata"]["uid"].clone();
    create_pod(&s, &ns, "held", true).await;
    delete_namespace(&s, &ns).await;

    // Writers label the namespace as fast as they can until it is gone, or until a while
    // after the content is released (then the namespace must go without them).
    const WRITERS: usize = 4;
    let released = Arc::new(AtomicBool::new(false));
    let after_release = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let path = format!("{NAMESPACES}/{ns}");
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (s, path, released, after_release, total, stop_at) = (
                s.clone(),
                path.clone(),
                released.clone(),
                after_release.clone(),
                total.clone(),
                stop_at.clone(),
            );
            tokio::spawn(async move {
                for n in 0u64.. {
                    if stop_at.lock().unwrap().is_some_and(|t| Instant::now() > t) {
                        return;
                    }
                    let patch = json!({"metadata": {"labels": {format!("w{w}"): n.to_string()}}});
                    let (code, body) = s
                        .raw(Method::PATCH, &path, Some(&patch), MERGE, Some(&s.token))
                        .await;
                    match code {
                        200 => {
                            total.fetch_add(1, Ordering::Relaxed);
                            if released.load(Ordering::Relaxed) {
                                after_release.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Lost too many races with the others: as any client, try again.
                        409 => {}
                        404 => return,
                        _ => panic!("label the terminating namespace: {code} {body}"),
                    }
                }
            })
        })
        .collect();
    wait_for(
        Duration::from_secs(30),
        "the writers to be busy",
        || async { (total.load(Ordering::Relaxed) >= 10 * WRITERS).then_some(()) },
    )
    .await;
    assert_terminating(&namespace(&s, &ns).await, &uid, "concurrent labels");

    release(&s, &ns, "held").await;
    released.store(true, Ordering::Relaxed);
    *stop_at.lock().unwrap() = Some(Instant::now() + 3 * CLEANUP_MAX_BACKOFF);
    wait_gone(&s, &ns, 6 * CLEANUP_MAX_BACKOFF).await;
    for w in writers {
        w.await.expect("writer");
    }
    assert!(
        after_release.load(Ordering::Relaxed) > 0,
        "the writers raced the end of the deletion of {ns}"
    );
}
