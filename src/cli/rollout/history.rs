//! `wasmctl rollout history`: kubectl's `DeploymentHistoryViewer`: the revisions of a
//! deployment (its ReplicaSets) with their change causes, or one revision's pod template in
//! kubectl's describe layout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use wasmctl_api::apps::{PodTemplateSpec, ReplicaSet};
use wasmctl_api::core::{Container, Probe, Toleration, Volume};

use super::{revision, Target, TargetArgs};

/// The annotation `kubectl --record` (and users) set to say why a revision was made.
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Show the pod template of this revision instead of the list.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub revision: i64,
}

pub async fn run(kubeconfig: Option<&Path>, args: HistoryArgs) -> Result<ExitCode> {
    if args.revision < 0 {
        bail!("revision must be a positive integer: {}", args.revision);
    }
    let t = Target::open(kubeconfig, &args.target, "history viewer")?;
    let d = t.get().await?;
    let text = view(&history(&t.replica_sets(&d).await?), args.revision)?;
    if args.revision > 0 {
        println!("{} with revision #{}", t.obj.display(), args.revision);
    } else {
        println!("{}", t.obj.display());
    }
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Each revision's pod template, with the ReplicaSet's change cause among its annotations
/// (a ReplicaSet without a revision annotation is revision 0, as in kubectl).
pub fn history(replica_sets: &[ReplicaSet]) -> BTreeMap<i64, PodTemplateSpec> {
    let mut out = BTreeMap::new();
    for rs in replica_sets {
        let Ok(rev) = revision(&rs.metadata) else {
            tracing::warn!(replicaset = %rs.metadata.name, "skipping: unparsable revision");
            continue;
        };
        let mut template = rs.spec.template.clone();
        if let Some(cause) = rs.metadata.annotations.get(CHANGE_CAUSE) {
            template
                .metadata
                .annotations
                .insert(CHANGE_CAUSE.into(), cause.clone());
        }
        out.insert(rev, template);
    }
    out
}

/// kubectl's `ViewHistory`: the table, or the template of revision `rev` (> 0).
pub fn view(history: &BTreeMap<i64, PodTemplateSpec>, rev: i64) -> Result<String> {
    if history.is_empty() {
        return Ok("No rollout history found.".into());
    }
    if rev > 0 {
        let Some(template) = history.get(&rev) else {
            bail!("unable to find the specified revision");
        };
        return Ok(describe_pod_template(template));
    }
    let rows: Vec<[String; 2]> = history
        .iter()
        .map(|(rev, t)| {
            let cause = t.metadata.annotations.get(CHANGE_CAUSE);
            let cause = cause.filter(|c| !c.is_empty()).map_or("<none>", |c| c);
            [rev.to_string(), cause.to_string()]
        })
        .collect();
    Ok(tabbed(&["REVISION", "CHANGE-CAUSE"], &rows))
}

/// Two columns as Go's tabwriter aligns them for kubectl (padding 2); every line ends in
/// a newline.
fn tabbed(header: &[&str; 2], rows: &[[String; 2]]) -> String {
    let width = rows
        .iter()
        .map(|r| r[0].chars().count())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::new();
    let lines = std::iter::once([header[0].to_string(), header[1].to_string()]);
    for [a, b] in lines.chain(rows.iter().cloned()) {
        let _ = writeln!(out, "{a:<width$}{b}");
    }
    out
}

// ------------------------------------------------------------------ describe-style template

/// kubectl's `DescribePodTemplate` (as `rollout history --revision` prints it: tab
/// separated, not aligned). Ends in a newline.
pub fn describe_pod_template(t: &PodTemplateSpec) -> String {
    let mut w = String::new();
    w.push_str("Pod Template:\n");
    multiline(&mut w, "  Labels", &t.metadata.labels);
    if !t.metadata.annotations.is_empty() {
        annotations(&mut w, "  Annotations", &t.metadata.annotations);
    }
    containers(&mut w, &t.spec.containers);
    volumes(&mut w, &t.spec.volumes);
    multiline(&mut w, "  Node-Selectors", &t.spec.node_selector);
    tolerations(&mut w, "  Tolerations", &t.spec.tolerations);
    w
}

/// `title:\tk=v` with further entries on their own `\t`-indented lines, or `<none>`.
fn multiline(w: &mut String, title: &str, map: &BTreeMap<String, String>) {
    let _ = write!(w, "{title}:\t");
    if map.is_empty() {
        w.push_str("<none>\n");
    }
    for (i, (k, v)) in map.iter().enumerate() {
        let indent = if i == 0 { "" } else { "\t" };
        let _ = writeln!(w, "{indent}{k}={v}");
    }
}

/// kubectl's limit before an annotation's value goes on lines of its own.
const MAX_ANNOTATION_LEN: usize = 140;

fn annotations(w: &mut String, title: &str, map: &BTreeMap<String, String>) {
    let _ = write!(w, "{title}:\t");
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            w.push('\t');
        }
        let v = v.strip_suffix('\n').unwrap_or(v);
        if v.len() + k.len() + 2 > MAX_ANNOTATION_LEN || v.contains('\n') {
            let _ = writeln!(w, "{k}:");
            for line in v.split('\n') {
                let _ = writeln!(w, "\t  {}", shorten(line, MAX_ANNOTATION_LEN - 2));
            }
        } else {
            let _ = writeln!(w, "{k}: {v}");
        }
    }
}

fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

fn containers(w: &mut String, containers: &[Container]) {
    let none = if containers.is_empty() { " <none>" } else { "" };
    let _ = writeln!(w, "  Containers:{none}");
    for c in containers {
        container(w, c);
    }
}

fn container(w: &mut String, c: &Container) {
    let _ = writeln!(w, "   {}:", c.name);
    let _ = writeln!(w, "    Image:\t{}", c.image);
    let ports: Vec<String> = c
        .ports
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.container_port,
                p.protocol.as_deref().unwrap_or("TCP")
            )
        })
        .collect();
    // No host ports here: kubectl prints the zero of an unset hostPort.
    let host_ports: Vec<String> = c
        .ports
        .iter()
        .map(|p| format!("0/{}", p.protocol.as_deref().unwrap_or("TCP")))
        .collect();
    let (label, host_label) = if ports.len() > 1 {
        ("Ports", "Host Ports")
    } else {
        ("Port", "Host Port")
    };
    let _ = writeln!(w, "    {label}:\t{}", or_none(&ports.join(", ")));
    let _ = writeln!(w, "    {host_label}:\t{}", or_none(&host_ports.join(", ")));
    lines(w, "Command", &c.command);
    lines(w, "Args", &c.args);
    quantities(w, "Limits", &c.resources.limits);
    quantities(w, "Requests", &c.resources.requests);
    if let Some(p) = &c.liveness_probe {
        let _ = writeln!(w, "    Liveness:\t{}", describe_probe(p));
    }
    if let Some(p) = &c.readiness_probe {
        let _ = writeln!(w, "    Readiness:\t{}", describe_probe(p));
    }
    env(w, c);
    mounts(w, c);
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "<none>"
    } else {
        s
    }
}

fn lines(w: &mut String, title: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(w, "    {title}:");
    for line in items.iter().flat_map(|i| i.split('\n')) {
        let _ = writeln!(w, "      {line}");
    }
}

fn quantities<Q: std::fmt::Display>(w: &mut String, title: &str, map: &BTreeMap<String, Q>) {
    if map.is_empty() {
        return;
    }
    let _ = writeln!(w, "    {title}:");
    for (name, q) in map {
        let _ = writeln!(w, "      {name}:\t{q}");
    }
}

/// kubectl's `DescribeProbe`, with the API defaults for unset fields.
fn describe_probe(p: &Probe) -> String {
    let attrs = format!(
        "delay={}s timeout={}s period={}s #success={} #failure={}",
        p.initial_delay_seconds.unwrap_or(0),
        p.timeout_seconds.unwrap_or(1),
        p.period_seconds.unwrap_or(10),
        p.success_threshold.unwrap_or(1),
        p.failure_threshold.unwrap_or(3),
    );
    if let Some(h) = &p.http_get {
        let scheme = h.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
        let host = h.host.as_deref().unwrap_or("");
        let path = h.path.as_deref().unwrap_or("");
        return format!("http-get {scheme}://{host}:{}{path} {attrs}", h.port);
    }
    if let Some(s) = &p.tcp_socket {
        let host = s.host.as_deref().unwrap_or("");
        return format!("tcp-socket {host}:{} {attrs}", s.port);
    }
    format!("unknown {attrs}")
}

fn env(w: &mut String, c: &Container) {
    let none = if c.env.is_empty() { "\t<none>" } else { "" };
    let _ = writeln!(w, "    Environment:{none}");
    for e in &c.env {
        let value = e.value.as_deref().unwrap_or("");
        for (i, line) in value.split('\n').enumerate() {
            if i == 0 {
                let _ = writeln!(w, "      {}:\t{line}", e.name);
            } else {
                let _ = writeln!(w, "      \t{line}");
            }
        }
    }
}

fn mounts(w: &mut String, c: &Container) {
    let none = if c.volume_mounts.is_empty() {
        "\t<none>"
    } else {
        ""
    };
    let _ = writeln!(w, "    Mounts:{none}");
    let mut sorted: Vec<_> = c.volume_mounts.iter().collect();
    sorted.sort_by(|a, b| a.mount_path.cmp(&b.mount_path));
    for m in sorted {
        let mode = if m.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        let _ = writeln!(w, "      {} from {} ({mode})", m.mount_path, m.name);
    }
}

fn volumes(w: &mut String, volumes: &[Volume]) {
    if volumes.is_empty() {
        w.push_str("  Volumes:\t<none>\n");
        return;
    }
    w.push_str("  Volumes:\n");
    for v in volumes {
        let _ = writeln!(w, "   {}:", v.name);
        if let Some(e) = &v.empty_dir {
            let size = e
                .size_limit
                .as_ref()
                .map_or("<unset>".to_string(), |q| q.to_string());
            let _ = writeln!(
                w,
                "    Type:\tEmptyDir (a temporary directory that shares a pod's lifetime)"
            );
            let _ = writeln!(w, "    Medium:\t{}", e.medium.as_deref().unwrap_or(""));
            let _ = writeln!(w, "    SizeLimit:\t{size}");
        }
    }
}

fn tolerations(w: &mut String, title: &str, tolerations: &[Toleration]) {
    let _ = write!(w, "{title}:\t");
    if tolerations.is_empty() {
        w.push_str("<none>\n");
    }
    let mut sorted: Vec<_> = tolerations.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    for (i, t) in sorted.into_iter().enumerate() {
        if i > 0 {
            w.push('\t');
        }
        let key = t.key.as_deref().unwrap_or("");
        let value = t.value.as_deref().unwrap_or("");
        let effect = t.effect.as_deref().unwrap_or("");
        w.push_str(key);
        if !value.is_empty() {
            let _ = write!(w, "={value}");
        }
        if !effect.is_empty() {
            let _ = write!(w, ":{effect}");
        }
        if t.operator.as_deref() == Some("Exists") && value.is_empty() {
            let sep = if key.is_empty() && effect.is_empty() {
                ""
            } else {
                " "
            };
            let _ = write!(w, "{sep}op=Exists");
        }
        if let Some(s) = t.toleration_seconds {
            let _ = write!(w, " for {s}s");
        }
        w.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::replica_set;
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_revisions_in_order_with_change_causes() {
        let rss = [
            replica_set("10", "web:v10", json!({})),
            replica_set(
                "2",
                "web:v2",
                json!({"metadata": {"annotations": {CHANGE_CAUSE: "kubectl apply --filename=web.yaml"}}}),
            ),
            replica_set("1", "web:v1", json!({})),
        ];
        assert_eq!(
            view(&history(&rss), 0).unwrap(),
            "REVISION  CHANGE-CAUSE\n\
             1         <none>\n\
             2         kubectl apply --filename=web.yaml\n\
             10        <none>\n"
        );
    }

    #[test]
    fn an_empty_history_says_so() {
        assert_eq!(view(&history(&[]), 0).unwrap(), "No rollout history found.");
        let rss = [replica_set("1", "web:v1", json!({}))];
        assert_eq!(
            view(&history(&rss), 4).unwrap_err().to_string(),
            "unable to find the specified revision"
        );
    }

    #[test]
    fn a_missing_revision_annotation_is_revision_zero() {
        let rs = replica_set(
            "1",
            "web:v1",
            json!({"metadata": {"annotations": {
            "deployment.kubernetes.io/revision": null}}}),
        );
        let bad = replica_set("x", "web:v2", json!({}));
        assert_eq!(history(&[rs, bad]).keys().copied().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn describes_a_revision_like_kubectl() {
        let rs = replica_set(
            "2",
            "web:v2",
            json!({
                "metadata": {"annotations": {CHANGE_CAUSE: "rollout"}},
                "spec": {"template": {"spec": {"containers": [{
                    "name": "web", "image": "web:v2",
                    "ports": [{"containerPort": 8080}],
                    "args": ["--greeting", "hi"],
                    "env": [{"name": "MODE", "value": "fast"}],
                    "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}
                }]}}}
            }),
        );
        let text = view(&history(&[rs]), 2).unwrap();
        assert_eq!(
            text,
            "Pod Template:\n\
             \x20 Labels:\tapp=web\n\
             \tpod-template-hash=h2\n\
             \x20 Annotations:\tkubernetes.io/change-cause: rollout\n\
             \x20 Containers:\n\
             \x20  web:\n\
             \x20   Image:\tweb:v2\n\
             \x20   Port:\t8080/TCP\n\
             \x20   Host Port:\t0/TCP\n\
             \x20   Args:\n\
             \x20     --greeting\n\
             \x20     hi\n\
             \x20   Limits:\n\
             \x20     cpu:\t500m\n\
             \x20     memory:\t64Mi\n\
             \x20   Readiness:\thttp-get http://:8080/healthz delay=0s timeout=1s period=10s #success=1 #failure=3\n\
             \x20   Environment:\n\
             \x20     MODE:\tfast\n\
             \x20   Mounts:\t<none>\n\
             \x20 Volumes:\t<none>\n\
             \x20 Node-Selectors:\t<none>\n\
             \x20 Tolerations:\t<none>\n"
        );
    }
}
