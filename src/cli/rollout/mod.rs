//! `wasmctl rollout status|history|undo|pause|resume|restart`: kubectl's client-side rollout
//! verbs for deployments. The decisions (status messages, history, the rollback target and
//! template, the pause/restart patches) are pure functions, unit-tested here; the verbs
//! around them only read, write and print.

mod history;
mod status;
mod undo;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use wasmctl_api::apps::{Deployment, ReplicaSet};
use wasmctl_api::registry;
use wasmctl_api::{keys, ObjectMeta};
use wasmctl_client::Client;

use super::ObjectRef;

pub use history::HistoryArgs;
pub use status::StatusArgs;
pub use undo::UndoArgs;

/// Set by `rollout restart` on the pod template; changing it rolls out new pods.
const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Watch a deployment's rollout until it completes, printing its progress.
    #[command(after_help = status::EXIT_CODES)]
    Status(StatusArgs),
    /// List a deployment's revisions (its ReplicaSets), or show one revision's pod template.
    History(HistoryArgs),
    /// Roll a deployment back to its previous revision (or --to-revision N).
    Undo(UndoArgs),
    /// Pause a deployment: template changes are not rolled out until it is resumed.
    Pause(TargetArgs),
    /// Resume a paused deployment.
    Resume(TargetArgs),
    /// Restart a deployment's pods with a rolling update (sets a restartedAt annotation).
    Restart(TargetArgs),
}

/// The deployment a rollout verb acts on.
#[derive(Args)]
pub struct TargetArgs {
    /// `deployment/NAME` (or `deploy/NAME`, `deployments/NAME`), or `deployment NAME`.
    #[arg(required = true, num_args = 1..=2, value_name = "TYPE/NAME")]
    pub resource: Vec<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

pub async fn run(kubeconfig: Option<&Path>, args: RolloutArgs) -> Result<ExitCode> {
    match args.command {
        RolloutCommand::Status(a) => status::run(kubeconfig, a).await,
        RolloutCommand::History(a) => history::run(kubeconfig, a).await,
        RolloutCommand::Undo(a) => undo::run(kubeconfig, a).await,
        RolloutCommand::Pause(a) => set_paused(kubeconfig, a, true).await,
        RolloutCommand::Resume(a) => set_paused(kubeconfig, a, false).await,
        RolloutCommand::Restart(a) => restart(kubeconfig, a).await,
    }
}

/// A deployment named on the command line, with the client and namespace to reach it.
struct Target {
    client: Client,
    ns: String,
    obj: ObjectRef,
}

impl Target {
    /// `verb` names what kubectl lacks for other kinds: "no rollbacker has been implemented".
    fn open(kubeconfig: Option<&Path>, args: &TargetArgs, verb: &str) -> Result<Target> {
        let obj = ObjectRef::parse(&args.resource)?;
        if obj.info.kind != "Deployment" {
            bail!(
                "no {verb} has been implemented for {:?} (only deployments)",
                obj.info.group_kind()
            );
        }
        let client = super::client(kubeconfig)?;
        let ns = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.namespace.clone());
        Ok(Target { client, ns, obj })
    }

    fn path(&self) -> String {
        self.obj.path(&self.ns)
    }

    async fn get(&self) -> Result<Deployment> {
        decode(self.client.get(&self.path()).await?)
    }

    /// The ReplicaSets in the namespace whose controller is `d`: its revisions.
    async fn replica_sets(&self, d: &Deployment) -> Result<Vec<ReplicaSet>> {
        let info = registry::resolve("replicaset").expect("replicasets are a served kind");
        let mut list = self
            .client
            .get(&info.collection_path(Some(&self.ns)))
            .await?;
        let items: Vec<ReplicaSet> = decode(list["items"].take())?;
        Ok(controlled_by(items, d))
    }
}

fn decode<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("decoding the API server's answer")
}

fn controlled_by(items: Vec<ReplicaSet>, d: &Deployment) -> Vec<ReplicaSet> {
    let Some(uid) = d.metadata.uid.as_deref() else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter(|rs| rs.metadata.controller().is_some_and(|o| o.uid == uid))
        .collect()
}

/// kubectl's `deploymentutil.Revision`: the `deployment.kubernetes.io/revision` annotation,
/// 0 when there is none.
fn revision(meta: &ObjectMeta) -> Result<i64> {
    match meta.annotations.get(keys::REVISION) {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            anyhow!(
                "{:?}: invalid {} annotation {v:?}",
                meta.name,
                keys::REVISION
            )
        }),
    }
}

fn is_paused(d: &Deployment) -> bool {
    d.spec.paused == Some(true)
}

/// The merge patch that pauses (or resumes) `d`; an error if it already is.
fn pause_patch(d: &Deployment, pause: bool) -> Result<Value> {
    match (is_paused(d), pause) {
        (true, true) => bail!("deployments.apps {:?} is already paused", d.metadata.name),
        (false, false) => bail!("deployments.apps {:?} is not paused", d.metadata.name),
        // Resuming removes the field, as kubectl's patch does.
        _ => Ok(json!({"spec": {"paused": if pause { json!(true) } else { Value::Null }}})),
    }
}

/// The merge patch that restarts `d`'s pods at `now` (RFC 3339); refused while paused.
fn restart_patch(d: &Deployment, now: &str) -> Result<Value> {
    if is_paused(d) {
        bail!(
            "deployments.apps {:?} can't restart paused deployment (run rollout resume first)",
            d.metadata.name
        );
    }
    Ok(json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}))
}

async fn set_paused(kubeconfig: Option<&Path>, args: TargetArgs, pause: bool) -> Result<ExitCode> {
    let verb = if pause { "pauser" } else { "resumer" };
    let t = Target::open(kubeconfig, &args, verb)?;
    let patch = pause_patch(&t.get().await?, pause)?;
    t.client.merge_patch(&t.path(), &patch).await?;
    let done = if pause { "paused" } else { "resumed" };
    println!("{} {done}", t.obj.display());
    Ok(ExitCode::SUCCESS)
}

async fn restart(kubeconfig: Option<&Path>, args: TargetArgs) -> Result<ExitCode> {
    let t = Target::open(kubeconfig, &args, "restarter")?;
    let now = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = restart_patch(&t.get().await?, &now)?;
    t.client.merge_patch(&t.path(), &patch).await?;
    println!("{} restarted", t.obj.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A deployment as the API server returns it, with `extra` merged over the defaults.
    pub(super) fn deployment(extra: Value) -> Deployment {
        let mut v = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "uid": "d-1", "generation": 1},
            "spec": {"replicas": 3, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:v2"}]}
            }}
        });
        merge(&mut v, extra);
        serde_json::from_value(v).expect("a valid deployment")
    }

    /// A ReplicaSet of revision `rev` controlled by `deployment()`, running `image`.
    pub(super) fn replica_set(rev: &str, image: &str, extra: Value) -> ReplicaSet {
        let mut v = json!({
            "metadata": {
                "name": format!("web-{rev}"), "namespace": "default",
                "annotations": {keys::REVISION: rev},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": "web", "uid": "d-1", "controller": true}]
            },
            "spec": {"template": {
                "metadata": {"labels": {"app": "web", "pod-template-hash": format!("h{rev}")}},
                "spec": {"containers": [{"name": "web", "image": image}]}
            }}
        });
        merge(&mut v, extra);
        serde_json::from_value(v).expect("a valid replica set")
    }

    /// JSON merge patch semantics, enough for test fixtures.
    fn merge(base: &mut Value, patch: Value) {
        match (base, patch) {
            (Value::Object(b), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        b.remove(&k);
                    } else {
                        merge(b.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
            (b, p) => *b = p,
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: RolloutCommand,
    }

    fn parse(args: &[&str]) -> Result<RolloutCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("rollout").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn parses_the_kubectl_forms() {
        let Ok(RolloutCommand::Status(s)) = parse(&["status", "deploy/web", "-n", "shop"]) else {
            panic!("status parses");
        };
        assert_eq!(s.target.resource, ["deploy/web"]);
        assert!(s.watch);
        let Ok(RolloutCommand::Status(s)) = parse(&[
            "status",
            "deployment",
            "web",
            "--watch=false",
            "--timeout",
            "5s",
        ]) else {
            panic!("status with flags parses");
        };
        assert_eq!(s.target.resource, ["deployment", "web"]);
        assert!(!s.watch);
        assert_eq!(s.timeout, std::time::Duration::from_secs(5));
        assert!(parse(&["status", "a", "b", "c"]).is_err());
        assert!(matches!(
            parse(&["undo", "deployment/web", "--to-revision", "2"]),
            Ok(RolloutCommand::Undo(u)) if u.to_revision == 2
        ));
        assert!(matches!(
            parse(&["history", "deployments/web", "--revision=3"]),
            Ok(RolloutCommand::History(h)) if h.revision == 3
        ));
        assert!(matches!(
            parse(&["pause", "deploy/web"]),
            Ok(RolloutCommand::Pause(_))
        ));
    }

    #[test]
    fn keeps_only_the_replica_sets_it_controls() {
        let d = deployment(json!({}));
        let mine = replica_set("1", "web:v1", json!({}));
        let other = replica_set(
            "2",
            "web:v2",
            json!({"metadata": {"ownerReferences":
            [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "old",
              "controller": true}]}}),
        );
        let not_controller = replica_set(
            "3",
            "web:v3",
            json!({"metadata": {"ownerReferences":
            [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1"}]}}),
        );
        let kept = controlled_by(vec![mine.clone(), other, not_controller], &d);
        assert_eq!(kept, vec![mine]);
    }

    #[test]
    fn pause_and_resume_refuse_a_no_op() {
        let running = deployment(json!({}));
        let paused = deployment(json!({"spec": {"paused": true}}));
        assert_eq!(
            pause_patch(&running, true).unwrap(),
            json!({"spec": {"paused": true}})
        );
        assert_eq!(
            pause_patch(&paused, false).unwrap(),
            json!({"spec": {"paused": null}})
        );
        assert_eq!(
            pause_patch(&paused, true).unwrap_err().to_string(),
            r#"deployments.apps "web" is already paused"#
        );
        assert_eq!(
            pause_patch(&running, false).unwrap_err().to_string(),
            r#"deployments.apps "web" is not paused"#
        );
    }

    #[test]
    fn restart_sets_the_annotation_unless_paused() {
        let now = "2026-01-02T03:04:05Z";
        assert_eq!(
            restart_patch(&deployment(json!({})), now).unwrap(),
            json!({"spec": {"template": {"metadata": {"annotations":
                {"kubectl.kubernetes.io/restartedAt": now}}}}})
        );
        let paused = deployment(json!({"spec": {"paused": true}}));
        assert_eq!(
            restart_patch(&paused, now).unwrap_err().to_string(),
            r#"deployments.apps "web" can't restart paused deployment (run rollout resume first)"#
        );
    }

    #[test]
    fn revision_is_zero_without_the_annotation() {
        let rs = replica_set("7", "web:v7", json!({}));
        assert_eq!(revision(&rs.metadata).unwrap(), 7);
        assert_eq!(revision(&deployment(json!({})).metadata).unwrap(), 0);
        let bad = replica_set("x", "web", json!({}));
        assert!(revision(&bad.metadata).is_err());
    }
}
