//! `wasmctl rollout undo`: kubectl's client-side `DeploymentRollbacker`: copy the pod
//! template (and annotations) of an earlier revision's ReplicaSet back into the deployment;
//! the deployment controller then rolls it out as a new revision.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use wasmctl_api::apps::{Deployment, PodTemplateSpec, ReplicaSet};
use wasmctl_api::keys;

use super::{decode, is_paused, revision, Target, TargetArgs};
use crate::cli::{update_with_retry, Update};

/// Deployment annotations a rollback keeps from the deployment instead of taking them from
/// the ReplicaSet (kubectl's `annotationsToSkip`).
const ANNOTATIONS_TO_SKIP: &[&str] = &[
    keys::LAST_APPLIED,
    keys::REVISION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
];

#[derive(Args)]
pub struct UndoArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The revision to roll back to (0: the previous one).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub to_revision: i64,
}

pub async fn run(kubeconfig: Option<&Path>, args: UndoArgs) -> Result<ExitCode> {
    let t = Target::open(kubeconfig, &args.target, "rollbacker")?;
    let current = t.client.get(&t.path()).await?;
    let d: Deployment = decode(current.clone())?;
    let replica_sets = t.replica_sets(&d).await?;
    let target = select(&replica_sets, args.to_revision, &d.metadata.name)?;
    let to = revision(&target.metadata)?;
    let outcome = update_with_retry(&t.client, &t.path(), current, |mut obj| {
        let d: Deployment = decode(obj.clone())?;
        if is_paused(&d) {
            bail!(
                "you cannot rollback a paused deployment; resume it first with \
                 'kubectl rollout resume' and try again"
            );
        }
        let Some(r) = rollback(&d, target) else {
            let skipped =
                format!("skipped rollback (current template already matches revision {to})");
            return Ok(Update::Unchanged(skipped));
        };
        obj["spec"]["template"] = serde_json::to_value(&r.template)?;
        obj["metadata"]["annotations"] = serde_json::to_value(&r.annotations)?;
        Ok(Update::Put(obj, "rolled back".to_string()))
    })
    .await?;
    println!("{} {outcome}", t.obj.display());
    Ok(ExitCode::SUCCESS)
}

/// kubectl's `deploymentRevision`: the ReplicaSet of revision `to` or, for 0, the previous
/// revision (the second highest; the highest is the current one).
pub fn select<'a>(rss: &'a [ReplicaSet], to: i64, name: &str) -> Result<&'a ReplicaSet> {
    let not_found = || anyhow!("unable to find specified revision {to} in history");
    if to < 0 {
        return Err(not_found());
    }
    let mut by_revision: Vec<(i64, &ReplicaSet)> = rss
        .iter()
        .filter_map(|rs| Some((revision(&rs.metadata).ok()?, rs)))
        .collect();
    if to > 0 {
        return by_revision
            .into_iter()
            .find(|(rev, _)| *rev == to)
            .map(|(_, rs)| rs)
            .ok_or_else(not_found);
    }
    by_revision.sort_by_key(|(rev, _)| std::cmp::Reverse(*rev));
    match by_revision.get(1) {
        Some((_, rs)) => Ok(rs),
        None => bail!("no rollout history found for deployment {name:?}"),
    }
}

/// What a rollback writes into the deployment.
#[derive(Debug, PartialEq)]
pub struct Rollback {
    pub template: PodTemplateSpec,
    pub annotations: BTreeMap<String, String>,
}

/// The rollback of `d` to `target`'s revision, or `None` when its template already matches
/// (ignoring the `pod-template-hash` label).
pub fn rollback(d: &Deployment, target: &ReplicaSet) -> Option<Rollback> {
    let mut template = target.spec.template.clone();
    template.metadata.labels.remove(keys::POD_TEMPLATE_HASH);
    let mut current = d.spec.template.clone();
    current.metadata.labels.remove(keys::POD_TEMPLATE_HASH);
    if template == current {
        return None;
    }
    let skipped = |k: &str| ANNOTATIONS_TO_SKIP.contains(&k);
    let kept = d.metadata.annotations.iter().filter(|(k, _)| skipped(k));
    let restored = target
        .metadata
        .annotations
        .iter()
        .filter(|(k, _)| !skipped(k));
    let annotations = kept
        .chain(restored)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(Rollback {
        template,
        annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{deployment, replica_set};
    use super::*;
    use serde_json::json;

    fn revisions() -> Vec<ReplicaSet> {
        vec![
            replica_set("2", "web:v2", json!({})),
            replica_set("3", "web:v3", json!({})),
            replica_set("1", "web:v1", json!({})),
        ]
    }

    fn rev_of(rs: &ReplicaSet) -> i64 {
        revision(&rs.metadata).unwrap()
    }

    #[test]
    fn picks_the_previous_revision_by_default() {
        let rss = revisions();
        assert_eq!(rev_of(select(&rss, 0, "web").unwrap()), 2);
        assert_eq!(rev_of(select(&rss, 1, "web").unwrap()), 1);
        assert_eq!(
            select(&rss, 7, "web").unwrap_err().to_string(),
            "unable to find specified revision 7 in history"
        );
        assert_eq!(
            select(&rss, -1, "web").unwrap_err().to_string(),
            "unable to find specified revision -1 in history"
        );
        assert_eq!(
            select(&rss[1..2], 0, "web").unwrap_err().to_string(),
            "no rollout history found for deployment \"web\""
        );
    }

    #[test]
    fn rolls_back_the_template_without_the_hash_label() {
        let d = deployment(json!({"metadata": {"annotations": {
            "deployment.kubernetes.io/revision": "3",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "kubernetes.io/change-cause": "v3",
            "team": "blue"
        }}}));
        let target = replica_set(
            "1",
            "web:v1",
            json!({"metadata": {"annotations": {
                "deployment.kubernetes.io/desired-replicas": "3",
                "deployment.kubernetes.io/max-replicas": "4",
                "kubernetes.io/change-cause": "v1"
            }}}),
        );
        let r = rollback(&d, &target).expect("templates differ");
        assert_eq!(
            serde_json::to_value(&r.template).unwrap(),
            json!({
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "web:v1"}]}
            })
        );
        let annotations: Vec<(&str, &str)> = r
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            annotations,
            [
                ("deployment.kubernetes.io/revision", "3"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
                ("kubernetes.io/change-cause", "v1"),
            ]
        );
    }

    #[test]
    fn skips_when_the_template_already_matches() {
        let d = deployment(json!({}));
        let same = replica_set("2", "web:v2", json!({}));
        assert_eq!(rollback(&d, &same), None);
    }
}
