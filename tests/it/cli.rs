//! The real `wasmctl` binary as a client: apply/get/describe/delete, and its errors.

use std::time::Duration;

use reqwest::Method;

use crate::support::{stderr, stdout, wait_for, ServerProc};

const APP: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: hello
        image: hello:v1
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
";

#[tokio::test(flavor = "multi_thread")]
async fn apply_get_describe_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, APP).unwrap();
    let f = file.to_str().unwrap();

    let o = s.wasmctl(&["apply", "-f", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "namespace/shop created\ndeployment.apps/web created\nservice/web created\n"
    );
    let o = s.wasmctl(&["apply", "-f", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "namespace/shop unchanged\ndeployment.apps/web unchanged\nservice/web unchanged\n"
    );
    std::fs::write(&file, APP.replace("replicas: 2", "replicas: 3")).unwrap();
    let o = s.wasmctl(&["apply", "-f", f]);
    assert_eq!(
        stdout(&o),
        "namespace/shop unchanged\ndeployment.apps/web configured\nservice/web unchanged\n"
    );
    // From stdin too.
    let o = s.wasmctl_stdin(
        &["apply", "-f", "-"],
        Some(&APP.replace("replicas: 2", "replicas: 3")),
    );
    assert!(
        stdout(&o).contains("deployment.apps/web unchanged"),
        "{}",
        stdout(&o)
    );

    let o = s.wasmctl(&["get", "deploy", "-n", "shop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    // No node joined: the controller's pods stay pending, none is ready or available.
    assert_eq!((row[0], row[1], row[3]), ("web", "0/3", "0"), "{out}");

    let o = s.wasmctl(&["get", "deployments.apps", "web", "-n", "shop", "-o", "yaml"]);
    assert!(stdout(&o).contains("name: web"), "{}", stdout(&o));
    assert!(stdout(&o).contains("replicas: 3"));
    let o = s.wasmctl(&["get", "svc", "-A", "-o", "wide"]);
    let out = stdout(&o);
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(out.contains("app=web"), "{out}");
    let o = s.wasmctl(&["get", "namespaces", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "List");

    let o = s.wasmctl(&["describe", "deployment", "web", "-n", "shop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Name:         web"), "{out}");
    assert!(out.contains("Replicas:  3"), "{out}");

    let o = s.wasmctl(&["delete", "deployment", "web", "-n", "shop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "deployment.apps \"web\" deleted\n");
    let o = s.wasmctl(&["get", "deploy", "web", "-n", "shop"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim(),
        "Error from server (NotFound): deployments.apps \"web\" not found"
    );
    let o = s.wasmctl(&["delete", "-f", f]);
    assert!(
        stdout(&o).contains("namespace \"shop\" deleted"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_reported_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let rev_before = |v: &serde_json::Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The server's own startup writes (the `kubernetes` Service and Endpoints) are done
    // before the baseline is taken.
    wait_for(
        Duration::from_secs(30),
        "the kubernetes Endpoints",
        || async {
            let (code, _) = s
                .call(
                    Method::GET,
                    "/api/v1/namespaces/default/endpoints/kubernetes",
                    None,
                )
                .await;
            (code == 200).then_some(())
        },
    )
    .await;
    let (_, ns_before) = s.call(Method::GET, "/api/v1/namespaces", None).await;

    // Malformed YAML in the third document: file, document, line and column; nothing written.
    let file = dir.path().join("bad.yaml");
    let broken =
        format!("{APP}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bad: value\n");
    std::fs::write(&file, &broken).unwrap();
    let o = s.wasmctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("bad.yaml: document 4"), "{err}");
    let bad_line = APP.lines().count() + 5;
    assert!(err.contains(&format!("line {bad_line}, column")), "{err}");
    assert_eq!(stdout(&o), "");

    // Invalid field value: the path and the reason; nothing written.
    std::fs::write(&file, APP.replace("replicas: 2", "replicas: -2")).unwrap();
    let o = s.wasmctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("spec.replicas: must be >= 0, got -2"),
        "{}",
        stderr(&o)
    );

    // Unknown field and unknown kind.
    std::fs::write(&file, APP.replace("replicas: 2", "replicaz: 2")).unwrap();
    let o = s.wasmctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("spec.replicaz: unknown field \"replicaz\""),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Widget\nmetadata:\n  name: w\n",
    )
    .unwrap();
    let o = s.wasmctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown kind \"Widget\""),
        "{}",
        stderr(&o)
    );

    let (_, ns_after) = s.call(Method::GET, "/api/v1/namespaces", None).await;
    assert_eq!(
        rev_before(&ns_before),
        rev_before(&ns_after),
        "nothing was written"
    );
    let (code, _) = s.call(Method::GET, "/api/v1/namespaces/shop", None).await;
    assert_eq!(code, 404);

    // A conflict is reported as such.
    std::fs::write(&file, APP).unwrap();
    assert!(s
        .wasmctl(&["apply", "-f", file.to_str().unwrap()])
        .status
        .success());

    // Unknown kind on the command line, server unreachable.
    let o = s.wasmctl(&["get", "widgets"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("doesn't have a resource type \"widgets\""),
        "{}",
        stderr(&o)
    );
    let kc = std::fs::read_to_string(&s.kubeconfig).unwrap();
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let dead = dir.path().join("dead.yaml");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(&dead, kc.replace(&format!(":{port}"), ":1")).unwrap();
    let o = std::process::Command::new(crate::support::bin())
        .args(["--kubeconfig", dead.to_str().unwrap(), "get", "pods"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot reach the API server at https://127.0.0.1:1"),
        "{}",
        stderr(&o)
    );
}
