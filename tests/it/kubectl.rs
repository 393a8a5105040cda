//! Stock kubectl against the API server, with the kubeconfig the server wrote.

use std::process::Command;

use crate::support::{stderr, stdout, ServerProc};

fn kubectl(s: &ServerProc, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .args(args)
        .env("HOME", s.data_dir.join("kubectl-home"))
        .output()
        .expect("kubectl must be installed (apt-get install kubectl, or see README)")
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_lists_gets_and_deletes_what_wasmctl_created() {
    let dir = tempfile::tempdir().unwrap();
    let s = ServerProc::start(dir.path(), &[]).await;
    let file = dir.path().join("app.yaml");
    std::fs::write(
        &file,
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: hello
        image: hello:v1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
    nodePort: 30080
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
",
    )
    .unwrap();
    let o = s.wasmctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = kubectl(&s, &["get", "nodes,pods,deployments,services", "-A"]);
    assert!(o.status.success(), "kubectl get failed: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("node/node-1"), "{out}");
    assert!(out.contains("deployment.apps/web"), "{out}");
    assert!(out.contains("service/web"), "{out}");
    assert!(out.contains("80:30080/TCP"), "{out}");

    let o = kubectl(&s, &["get", "deploy", "web", "-o", "yaml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("name: web"), "{}", stdout(&o));
    assert!(stdout(&o).contains("image: hello:v1"));

    let o = kubectl(&s, &["delete", "deploy", "web"]);
    assert!(o.status.success(), "kubectl delete failed: {}", stderr(&o));
    assert!(
        stdout(&o).contains("deployment.apps \"web\" deleted"),
        "{}",
        stdout(&o)
    );
    let o = s.wasmctl(&["get", "deploy", "web"]);
    assert!(!o.status.success(), "the deployment is gone");
}
