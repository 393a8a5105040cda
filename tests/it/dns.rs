//! Cluster DNS (issue 5): the stock `dig` against a real agent's DNS server while Services
//! come and go through the real API server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

/// `dig @ADDR -p PORT ARGS...` (one try, 2 s), its stdout.
async fn dig(dns: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .arg("-p")
        .arg(dns.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .await
        .expect("run dig (Debian: bind9-dnsutils; scripts/setup-deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ClusterIP the server gave a Service, or (before ClusterIP allocation exists) the
/// Service re-created with the requested `fallback` address.
async fn create_service(server: &ServerProc, name: &str, fallback: &str) -> String {
    let path = "/api/v1/namespaces/default/services";
    let svc = |ip: Option<&str>| {
        let mut spec = json!({
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        });
        if let Some(ip) = ip {
            spec["clusterIP"] = json!(ip);
        }
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
    };
    let (code, body) = server.call(Method::POST, path, Some(&svc(None))).await;
    assert_eq!(code, 201, "{body}");
    if let Some(ip) = cluster_ip(&body) {
        return ip;
    }
    let (code, body) = server
        .call(Method::DELETE, &format!("{path}/{name}"), None)
        .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = server
        .call(Method::POST, path, Some(&svc(Some(fallback))))
        .await;
    assert_eq!(code, 201, "{body}");
    cluster_ip(&body).expect("the requested clusterIP")
}

fn cluster_ip(svc: &Value) -> Option<String> {
    svc["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(str::to_string)
}

/// Polls `dig` until `check` accepts its output (10 s at most), and says how long it took.
async fn until_dig(dns: SocketAddr, args: &[&str], what: &str, check: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(10) {
        last = dig(dns, args).await;
        if check(&last) {
            eprintln!("{what}: after {:?}", t0.elapsed());
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 10 s; last dig output:\n{last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dig_resolves_services_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("server"), &[]).await;
    let agent = AgentProc::start(&server, "node-dns", &dir.path().join("agent"), &[]).await;
    let dns = agent.dns;
    assert_eq!(dns.ip().to_string(), "127.0.0.1");
    assert_ne!(dns.port(), 0, "the chosen port is announced");

    let web_ip = create_service(&server, "web", "127.96.0.10").await;
    let web = "web.default.svc.cluster.local";
    until_dig(dns, &[web, "+short"], "web resolves", |out| {
        out.trim() == web_ip
    })
    .await;

    // SRV of the named port, with the A record in the additional section.
    let srv = "_http._tcp.web.default.svc.cluster.local";
    assert_eq!(
        dig(dns, &[srv, "SRV", "+short"]).await.trim(),
        "0 100 80 web.default.svc.cluster.local."
    );
    let full = dig(dns, &[srv, "SRV"]).await;
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(full.contains(" aa "), "authoritative: {full}");
    assert!(full.contains(";; ADDITIONAL SECTION:"), "{full}");
    assert!(
        full.lines()
            .any(|l| l.starts_with("web.default.svc.cluster.local.") && l.ends_with(&web_ip)),
        "{full}"
    );

    // The same over TCP.
    assert_eq!(dig(dns, &[web, "+short", "+tcp"]).await.trim(), web_ip);
    assert_eq!(
        dig(dns, &[srv, "SRV", "+short", "+tcp"]).await.trim(),
        "0 100 80 web.default.svc.cluster.local."
    );

    // Unknown names in the cluster domain: NXDOMAIN with the SOA; AAAA of a known name:
    // NODATA; names outside: REFUSED (no recursion).
    let out = dig(dns, &["missing.default.svc.cluster.local"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("IN\tSOA\tns.dns.cluster.local."), "{out}");
    let out = dig(dns, &[web, "AAAA"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("ANSWER: 0,"), "{out}");
    let out = dig(dns, &["example.com"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");

    // A second Service resolves as soon as it exists; deleted, it is NXDOMAIN again.
    let api_ip = create_service(&server, "api", "127.96.0.11").await;
    let api = "api.default.svc.cluster.local";
    until_dig(dns, &[api, "+short"], "a new Service resolves", |out| {
        out.trim() == api_ip
    })
    .await;
    let (code, body) = server
        .call(
            Method::DELETE,
            "/api/v1/namespaces/default/services/api",
            None,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    until_dig(dns, &[api], "a deleted Service is NXDOMAIN", |out| {
        out.contains("status: NXDOMAIN")
    })
    .await;
    // The other one is untouched.
    assert_eq!(dig(dns, &[web, "+short"]).await.trim(), web_ip);
}
