//! Watches and lists against a real server process (issue 11, item 21): bookmarks carry the
//! store's progress, so a watch of a quiet kind stays inside the history; a list or watch from a
//! resourceVersion the store has not reached is 504 "Too large resource version" (after waiting
//! for it) instead of an older answer or skipped events; lists served at once are bounded, the
//! ones over the bound get 429 with kube-apiserver's wording and `Retry-After`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{wait_for, ServerProc};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/quiet/leases";
const EVENTS: &str = "/api/v1/namespaces/default/events";

async fn server(extra: &[&str]) -> (tempfile::TempDir, ServerProc) {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), extra).await;
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "quiet"}});
    let (code, body) = s.call(Method::POST, "/api/v1/namespaces", Some(&ns)).await;
    assert_eq!(code, 201, "{body}");
    (dir, s)
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("no resourceVersion in {object}"))
        .parse()
        .unwrap()
}

async fn create_lease(s: &ServerProc, name: &str) -> u64 {
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name}, "spec": {}});
    let (code, body) = s.call(Method::POST, LEASES, Some(&lease)).await;
    assert_eq!(code, 201, "{body}");
    rv(&body)
}

/// An Event in `default` with `filler` bytes of annotation; its resourceVersion.
async fn create_event(s: &ServerProc, name: &str, filler: usize) -> u64 {
    let ev = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "annotations": {"filler": "x".repeat(filler)}},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "default"},
        "reason": "Busy", "message": "writes elsewhere"});
    let (code, body) = s.call(Method::POST, EVENTS, Some(&ev)).await;
    assert_eq!(code, 201, "{body}");
    rv(&body)
}

async fn list_rv(s: &ServerProc, path: &str) -> u64 {
    let (code, list) = s.call(Method::GET, path, None).await;
    assert_eq!(code, 200, "{list}");
    rv(&list)
}

/// A watch request (`query` after `?watch=1&`), as sent.
fn watch_request(s: &ServerProc, path: &str, query: &str) -> reqwest::RequestBuilder {
    s.http
        .get(format!("{}{path}?watch=1&{query}", s.url))
        .bearer_auth(&s.token)
}

/// Reads watch events (one JSON object a line) from `stream` until `done` holds for one, for
/// at most `within`; that event.
async fn next_event<B: AsRef<[u8]>>(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<B>> + Unpin),
    buf: &mut Vec<u8>,
    within: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let ev: Value = serde_json::from_slice(&line).expect("a watch event per line");
            if done(&ev) {
                return ev;
            }
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => buf.extend_from_slice(chunk.expect("watch stream").as_ref()),
            Ok(None) => panic!("the watch ended early"),
            Err(_) => panic!("no such watch event within {within:?}"),
        }
    }
}

/// A bookmark of a watch on a quiet resource carried the revision of the watch's own last
/// event, not the store's: with writes going elsewhere, that revision falls out of the history
/// and the watch cannot resume (410, a re-list). It must carry the store's progress.
#[tokio::test(flavor = "multi_thread")]
async fn bookmarks_of_a_quiet_watch_follow_the_store_and_keep_it_resumable() {
    let history = 20;
    let (_dir, s) = server(&[
        "--bookmark-interval",
        "300ms",
        "--watch-history",
        &history.to_string(),
    ])
    .await;
    let start = list_rv(&s, LEASES).await;
    let resp = watch_request(
        &s,
        LEASES,
        &format!("resourceVersion={start}&allowWatchBookmarks=true&timeoutSeconds=60"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();

    // Three times the history's worth of writes to another resource.
    let mut last = 0;
    for i in 0..3 * history {
        last = create_event(&s, &format!("busy-{i}"), 0).await;
    }
    let bookmark = next_event(&mut stream, &mut buf, Duration::from_secs(15), |ev| {
        ev["type"] == "BOOKMARK" && rv(&ev["object"]) >= last
    })
    .await;
    let at = rv(&bookmark["object"]);
    assert_eq!(bookmark["object"]["kind"], "Lease", "{bookmark}");

    // The start revision has left the history meanwhile; the bookmark's has not.
    let (code, gone) = s
        .call(
            Method::GET,
            &format!("{LEASES}?watch=1&resourceVersion={start}&timeoutSeconds=5"),
            None,
        )
        .await;
    assert_eq!(
        (code, gone["reason"].as_str()),
        (410, Some("Expired")),
        "{gone}"
    );
    let resumed = watch_request(
        &s,
        LEASES,
        &format!("resourceVersion={at}&timeoutSeconds=30"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resumed.status(), 200, "a watch from the bookmark resumes");
    let mut resumed = resumed.bytes_stream();
    let mut rbuf = Vec::new();
    create_lease(&s, "after-the-bookmark").await;
    let ev = next_event(&mut resumed, &mut rbuf, Duration::from_secs(10), |ev| {
        ev["type"] != "BOOKMARK"
    })
    .await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("after-the-bookmark")),
        "{ev}"
    );
}

/// kube-apiserver's Status for a resourceVersion ahead of the store
/// (`storage.NewTooLargeResourceVersionError`).
fn assert_too_large(code: u16, retry_after: Option<&str>, st: &Value, requested: u64) {
    assert_eq!(code, 504, "{st}");
    assert_eq!(retry_after, Some("1"));
    let current = st["message"]
        .as_str()
        .and_then(|m| {
            m.strip_prefix(&format!(
                "Timeout: Too large resource version: {requested}, current: "
            ))
        })
        .unwrap_or_else(|| panic!("kube's message: {st}"))
        .parse::<u64>()
        .expect("the current revision");
    assert!(current < requested);
    assert_eq!(
        (
            st["kind"].as_str(),
            st["status"].as_str(),
            st["reason"].as_str()
        ),
        (Some("Status"), Some("Failure"), Some("Timeout")),
        "{st}"
    );
    assert_eq!(
        st["details"],
        json!({"causes": [{"reason": "ResourceVersionTooLarge",
            "message": "Too large resource version"}], "retryAfterSeconds": 1}),
        "{st}"
    );
}

/// A list from a resourceVersion the store has not reached was answered as of an older one, and
/// a watch from it silently skipped every event up to it. Both wait (kube's 3 s) for the store,
/// then answer 504 "Too large resource version"; one the store reaches meanwhile is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_version_ahead_of_the_store_is_too_large() {
    let (_dir, s) = server(&[]).await;
    let ahead = list_rv(&s, LEASES).await + 1000;
    for query in [
        format!("resourceVersion={ahead}"),
        // (A watch that is wrongly served ends after 5 s rather than hang the test.)
        format!("watch=1&resourceVersion={ahead}&timeoutSeconds=5"),
        format!(
            "watch=1&resourceVersion={ahead}&sendInitialEvents=true&allowWatchBookmarks=true\
             &timeoutSeconds=5"
        ),
    ] {
        let started = Instant::now();
        let resp = s
            .http
            .get(format!("{}{LEASES}?{query}", s.url))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        let code = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let st: Value = resp.json().await.expect("a Status");
        assert_too_large(code, retry.as_deref(), &st, ahead);
        assert!(
            elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(15),
            "{query}: answered after {elapsed:?}, not after waiting ~3 s for the store"
        );
    }

    // A revision the store reaches while the watch waits: served from there.
    let next = list_rv(&s, LEASES).await + 1;
    let pending = tokio::spawn(
        watch_request(
            &s,
            LEASES,
            &format!("resourceVersion={next}&timeoutSeconds=30"),
        )
        .send(),
    );
    create_lease(&s, "reaches-it").await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    create_lease(&s, "then-this").await;
    let ev = next_event(&mut stream, &mut buf, Duration::from_secs(10), |ev| {
        ev["object"]["metadata"]["name"] == "then-this"
    })
    .await;
    assert_eq!(ev["type"], "ADDED");
}

/// Lists had no bound: every one decoded and encoded the whole collection at once, however many
/// ran. With `--max-lists 1`, a list whose answer is still being written (to a client that
/// does not read it) holds the slot; another list waits, then gets 429 with kube-apiserver's
/// wording and `Retry-After`, and is served once the slot is free.
#[tokio::test(flavor = "multi_thread")]
async fn lists_over_the_bound_wait_then_get_429() {
    let (_dir, s) = server(&["--max-lists", "1"]).await;
    // ~30 MB of answer: more than the sockets between us and the server buffer.
    for i in 0..150 {
        create_event(&s, &format!("big-{i}"), 200_000).await;
    }
    let slow = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                wasmctl_client::Kubeconfig::load(Some(&s.kubeconfig))
                    .unwrap()
                    .ca_pem
                    .as_ref()
                    .unwrap(),
            )
            .unwrap(),
        )
        .http1_only()
        .build()
        .unwrap();
    let unread = slow
        .get(format!("{}{EVENTS}", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .expect("the big list starts");
    assert_eq!(unread.status(), 200);

    let started = Instant::now();
    let resp = s
        .http
        .get(format!("{}{LEASES}", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        resp.status(),
        429,
        "a second list while the only slot is held"
    );
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let st: Value = resp.json().await.expect("a Status");
    assert_eq!(
        (
            st["reason"].as_str(),
            st["message"].as_str(),
            st["code"].as_u64()
        ),
        (
            Some("TooManyRequests"),
            Some("Too many requests, please try again later."),
            Some(429)
        ),
        "{st}"
    );
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(10),
        "refused after {elapsed:?}: it should wait a bounded while for the slot first"
    );
    // A watch's initial state is a list too.
    let (code, _) = s
        .call(
            Method::GET,
            &format!("{LEASES}?watch=1&timeoutSeconds=1"),
            None,
        )
        .await;
    assert_eq!(code, 429);

    // The reader goes away: its slot is free again.
    drop(unread);
    drop(slow);
    wait_for(
        Duration::from_secs(20),
        "a list to be served again",
        || async {
            let (code, _) = s.call(Method::GET, LEASES, None).await;
            (code == 200).then_some(())
        },
    )
    .await;
}
