//! Services on the control plane with real processes: cluster IPs and node ports allocated
//! from the server's ranges with kube-apiserver's conflict errors, and the endpoints
//! controller following real wasmtime pods as they become ready, scale, and are replaced.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::support::*;

const SVCS: &str = "/api/v1/namespaces/default/services";
const EPS: &str = "/api/v1/namespaces/default/endpoints";
const PODS: &str = "/api/v1/namespaces/default/pods";

fn service(name: &str, type_: &str, extra_spec: &str, port_extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  type: {type_}
  selector:
    app: {name}
{extra_spec}  ports:
  - name: http
    port: 80
    targetPort: http
{port_extra}"#
    )
}

fn apply(s: &ServerProc, yaml: &str) -> std::process::Output {
    s.wasmctl_stdin(&["apply", "-f", "-"], Some(yaml))
}

fn apply_ok(s: &ServerProc, yaml: &str) -> String {
    let out = apply(s, yaml);
    assert!(out.status.success(), "apply failed: {}", stderr(&out));
    stdout(&out)
}

/// Applying `yaml` fails, and stderr says `expected`.
fn apply_err(s: &ServerProc, yaml: &str, expected: &str) {
    let out = apply(s, yaml);
    assert!(!out.status.success(), "apply succeeded: {}", stdout(&out));
    assert!(
        stderr(&out).contains(expected),
        "stderr does not say {expected:?}: {}",
        stderr(&out)
    );
}

async fn get(s: &ServerProc, path: &str) -> (u16, Value) {
    s.call(Method::GET, path, None).await
}

fn cluster_ip(svc: &Value) -> Ipv4Addr {
    svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_else(|| panic!("no clusterIP: {svc}"))
        .parse()
        .unwrap()
}

fn in_range(ip: Ipv4Addr, net: [u8; 2], prefix_octets: usize) -> bool {
    ip.octets()[..prefix_octets] == [127, net[0], net[1]][..prefix_octets]
}

#[tokio::test(flavor = "multi_thread")]
async fn node_ports_and_cluster_ips_are_allocated_without_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;

    let first = service("first", "NodePort", "", "    nodePort: 30080\n");
    assert_eq!(apply_ok(&s, &first), "service/first created\n");
    let (_, a) = get(&s, &format!("{SVCS}/first")).await;
    assert_eq!(a["spec"]["ports"][0]["nodePort"], 30080);
    let a_ip = cluster_ip(&a);
    assert!(in_range(a_ip, [96, 0], 2), "{a_ip} is not in 127.96.0.0/16");
    assert_eq!(
        a["spec"]["clusterIPs"],
        serde_json::json!([a_ip.to_string()])
    );

    // The same node port again: kube-apiserver's 422.
    apply_err(
        &s,
        &service("second", "NodePort", "", "    nodePort: 30080\n"),
        "Service \"second\" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated",
    );
    // Requested cluster IPs must be free and in the range; node ports in theirs.
    apply_err(
        &s,
        &service("third", "ClusterIP", &format!("  clusterIP: {a_ip}\n"), ""),
        &format!("spec.clusterIPs[0]: Invalid value: \"{a_ip}\": provided IP is already allocated"),
    );
    apply_err(
        &s,
        &service("third", "ClusterIP", "  clusterIP: 10.0.0.1\n", ""),
        "spec.clusterIPs[0]: Invalid value: \"10.0.0.1\": provided IP is not in the valid range. The range of valid IPs is 127.96.0.0/16",
    );
    apply_err(
        &s,
        &service("third", "NodePort", "", "    nodePort: 8080\n"),
        "spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767",
    );
    apply_err(
        &s,
        &service("third", "LoadBalancer", "", ""),
        r#"spec.type: Unsupported value: "LoadBalancer": supported values: "ClusterIP", "NodePort""#,
    );
    apply_err(
        &s,
        &service("third", "ClusterIP", "", "    protocol: UDP\n"),
        r#"spec.ports[0].protocol: Unsupported value: "UDP": supported values: "TCP""#,
    );
    let (code, _) = get(&s, &format!("{SVCS}/third")).await;
    assert_eq!(code, 404, "nothing was created by the refused applies");

    // Allocated ones: a cluster IP of its own, a node port in the range.
    apply_ok(&s, &service("plain", "ClusterIP", "", ""));
    apply_ok(&s, &service("auto", "NodePort", "", ""));
    let (_, plain) = get(&s, &format!("{SVCS}/plain")).await;
    let (_, auto) = get(&s, &format!("{SVCS}/auto")).await;
    let ips: BTreeSet<Ipv4Addr> = [&a, &plain, &auto].into_iter().map(cluster_ip).collect();
    assert_eq!(ips.len(), 3, "distinct cluster IPs: {ips:?}");
    assert!(ips.iter().all(|ip| in_range(*ip, [96, 0], 2)), "{ips:?}");
    assert!(plain["spec"]["ports"][0].get("nodePort").is_none());
    let np = auto["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&np) && np != 30080, "{np}");
    // A headless Service gets no IP.
    apply_ok(
        &s,
        &service("headless", "ClusterIP", "  clusterIP: None\n", ""),
    );
    let (_, h) = get(&s, &format!("{SVCS}/headless")).await;
    assert_eq!(h["spec"]["clusterIP"], "None");

    // Re-applying the manifest (which omits the allocated values) keeps them.
    assert_eq!(apply_ok(&s, &first), "service/first unchanged\n");
    assert_eq!(
        apply_ok(&s, &service("auto", "NodePort", "", "")),
        "service/auto unchanged\n"
    );
    let (_, again) = get(&s, &format!("{SVCS}/auto")).await;
    assert_eq!(again["spec"]["clusterIP"], auto["spec"]["clusterIP"]);
    assert_eq!(again["spec"]["ports"][0]["nodePort"], np);
    // ... and a cluster IP cannot be changed.
    let other = if a_ip == Ipv4Addr::new(127, 96, 7, 7) {
        "127.96.7.8"
    } else {
        "127.96.7.7"
    };
    apply_err(
        &s,
        &service(
            "first",
            "NodePort",
            &format!("  clusterIP: {other}\n"),
            "    nodePort: 30080\n",
        ),
        &format!("spec.clusterIPs[0]: Invalid value: \"{other}\": field is immutable"),
    );

    // kubectl's columns.
    let out = s.wasmctl(&["get", "svc"]);
    let table = stdout(&out);
    let line = table
        .lines()
        .find(|l| l.starts_with("first "))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    let a_ip_s = a_ip.to_string();
    assert_eq!(
        cols[..5],
        [
            "first",
            "NodePort",
            a_ip_s.as_str(),
            "<none>",
            "80:30080/TCP"
        ],
        "{table}"
    );
    assert!(
        table.lines().next().unwrap().contains("CLUSTER-IP"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("headless ") && l.contains(" None ")),
        "{table}"
    );

    // Deleting a Service frees its node port.
    let out = s.wasmctl(&["delete", "service", "first"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        apply_ok(
            &s,
            &service("second", "NodePort", "", "    nodePort: 30080\n")
        ),
        "service/second created\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn service_ranges_come_from_the_server_flags() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(
        dir.path(),
        &[
            "--service-cluster-ip-range",
            "127.97.5.0/29",
            "--service-node-port-range",
            "31000-31001",
        ],
    )
    .await;
    for name in ["one", "two"] {
        apply_ok(&s, &service(name, "NodePort", "", ""));
    }
    let mut ports = BTreeSet::new();
    for name in ["one", "two"] {
        let (_, svc) = get(&s, &format!("{SVCS}/{name}")).await;
        assert!(in_range(cluster_ip(&svc), [97, 5], 3), "{svc}");
        ports.insert(svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap());
    }
    assert_eq!(ports, BTreeSet::from([31000, 31001]));
    apply_err(
        &s,
        &service("three", "NodePort", "", ""),
        "failed to allocate a nodePort: range is full",
    );
    apply_err(
        &s,
        &service("three", "NodePort", "", "    nodePort: 30080\n"),
        "provided port is not in the valid range. The range of valid ports is 31000-31001",
    );
    apply_err(
        &s,
        &service("three", "ClusterIP", "  clusterIP: 127.96.0.10\n", ""),
        "The range of valid IPs is 127.97.5.0/29",
    );
    let out = std::process::Command::new(bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("unused"))
        .args(["--service-node-port-range", "32767-30000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--service-node-port-range"),
        "{}",
        stderr(&out)
    );
}

fn deployment(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: hello
        image: hello:v1
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: http
          periodSeconds: 1
"#
    )
}

fn is_ready(p: &Value) -> bool {
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// (pod name, pod IP) of the ready, non-terminating pods of app=web.
async fn ready_pods(s: &ServerProc) -> BTreeSet<(String, String)> {
    let (_, list) = get(s, &format!("{PODS}?labelSelector=app%3Dweb")).await;
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && is_ready(p))
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["status"]["podIP"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (targetRef name, ip) of the ready addresses of Endpoints `web`, if every subset has
/// exactly the port http/8080/TCP; `None` while they do not exist.
async fn endpoint_addresses(s: &ServerProc) -> Option<BTreeSet<(String, String)>> {
    let (code, ep) = get(s, &format!("{EPS}/web")).await;
    if code != 200 {
        return None;
    }
    let mut out = BTreeSet::new();
    for ss in ep["subsets"].as_array().into_iter().flatten() {
        assert_eq!(
            ss["ports"],
            serde_json::json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            "{ep}"
        );
        for a in ss["addresses"].as_array().into_iter().flatten() {
            assert_eq!(a["targetRef"]["kind"], "Pod", "{ep}");
            assert_eq!(a["targetRef"]["namespace"], "default", "{ep}");
            assert!(a["targetRef"]["uid"].is_string(), "{ep}");
            assert!(a["nodeName"].as_str() == Some("node-1"), "{ep}");
            out.insert((
                a["targetRef"]["name"].as_str().unwrap().to_string(),
                a["ip"].as_str().unwrap().to_string(),
            ));
        }
    }
    Some(out)
}

/// Waits until Endpoints `web` lists exactly the `n` ready pods as ready addresses.
async fn wait_endpoints_match_pods(s: &ServerProc, n: usize) -> BTreeSet<(String, String)> {
    wait_for(
        Duration::from_secs(90),
        &format!("Endpoints web to list the {n} ready pods"),
        || async {
            let pods = ready_pods(s).await;
            let eps = endpoint_addresses(s).await?;
            (pods.len() == n && eps == pods).then_some(eps)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_follow_ready_pods() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(&dir.path().join("server"), &[]).await;
    let _agent = AgentProc::start(
        &s,
        "node-1",
        &dir.path().join("node-1"),
        &["--lease-renew", "1s"],
    )
    .await;
    let out = s.wasmctl(&["push", wasi_app("hello").to_str().unwrap(), "hello:v1"]);
    assert!(out.status.success(), "push: {}", stderr(&out));

    apply_ok(&s, &deployment(2));
    apply_ok(&s, &service("web", "ClusterIP", "", ""));
    let eps = wait_endpoints_match_pods(&s, 2).await;
    let out = s.wasmctl(&["get", "endpoints", "web"]);
    let (_, ip) = eps.iter().next().unwrap();
    assert!(
        stdout(&out).contains(&format!("{ip}:8080")),
        "{}",
        stdout(&out)
    );

    // Scale up: the third pod joins once ready.
    let out = s.wasmctl(&["scale", "deployment/web", "--replicas", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let eps = wait_endpoints_match_pods(&s, 3).await;

    // A deleted pod leaves at once (terminating pods are not endpoints); its replacement
    // joins when ready.
    let (victim, _) = eps.iter().next().unwrap().clone();
    let out = s.wasmctl(&["delete", "pod", &victim]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        Duration::from_secs(30),
        "the deleted pod to leave the Endpoints",
        || async {
            let eps = endpoint_addresses(&s).await?;
            (!eps.iter().any(|(name, _)| *name == victim)).then_some(())
        },
    )
    .await;
    let after = wait_endpoints_match_pods(&s, 3).await;
    assert!(after.iter().all(|(name, _)| *name != victim), "{after:?}");
    let names = |set: &BTreeSet<(String, String)>| -> BTreeSet<String> {
        set.iter().map(|(n, _)| n.clone()).collect()
    };
    assert_eq!(
        names(&after).difference(&names(&eps)).count(),
        1,
        "one replacement: {eps:?} -> {after:?}"
    );

    // The Service goes, its Endpoints go.
    let out = s.wasmctl(&["delete", "service", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        Duration::from_secs(30),
        "Endpoints web to be deleted",
        || async { (get(&s, &format!("{EPS}/web")).await.0 == 404).then_some(()) },
    )
    .await;
}
