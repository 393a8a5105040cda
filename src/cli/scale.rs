//! `wasmctl scale deployment/NAME --replicas N [--current-replicas M]` (also ReplicaSets),
//! as kubectl does it: a merge patch of `spec.replicas`, or with a precondition a
//! read-check-write with the read resourceVersion.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use super::{update_with_retry, ObjectRef, Update};

#[derive(Args)]
pub struct ScaleArgs {
    /// `deployment/NAME`, `replicaset/NAME` (`deploy`, `rs`), or `deployment NAME`.
    #[arg(required = true, num_args = 1..=2, value_name = "TYPE/NAME")]
    pub resource: Vec<String>,
    /// The new number of replicas.
    #[arg(long, allow_negative_numbers = true)]
    pub replicas: i32,
    /// Only scale if the object has exactly this many replicas now.
    #[arg(long, allow_negative_numbers = true)]
    pub current_replicas: Option<i32>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

pub async fn run(kubeconfig: Option<&Path>, args: ScaleArgs) -> Result<ExitCode> {
    if args.replicas < 0 {
        bail!(
            "The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0"
        );
    }
    let obj = ObjectRef::parse(&args.resource)?;
    if !matches!(obj.info.kind, "Deployment" | "ReplicaSet") {
        bail!(
            "cannot scale {:?}: only deployments and replicasets can be scaled",
            obj.info.group_kind()
        );
    }
    let client = super::client(kubeconfig)?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.namespace.clone());
    let path = obj.path(&ns);
    match args.current_replicas {
        None => {
            let patch = json!({"spec": {"replicas": args.replicas}});
            client.merge_patch(&path, &patch).await?;
        }
        Some(expected) => {
            let current = client.get(&path).await?;
            update_with_retry(&client, &path, current, |obj| {
                scaled(obj, expected, args.replicas).map(|obj| Update::Put(obj, ()))
            })
            .await?;
        }
    }
    println!("{} scaled", obj.display());
    Ok(ExitCode::SUCCESS)
}

/// `obj` with `spec.replicas` set to `replicas`, if it is `expected` now (unset is 1).
fn scaled(mut obj: Value, expected: i32, replicas: i32) -> Result<Value> {
    let actual = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    if actual != i64::from(expected) {
        bail!("Expected replicas to be {expected}, was {actual}");
    }
    obj["spec"]["replicas"] = json!(replicas);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_only_from_the_expected_count() {
        let obj = json!({"metadata": {"name": "web", "resourceVersion": "7"},
                         "spec": {"replicas": 3}});
        let out = scaled(obj.clone(), 3, 5).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        assert_eq!(out["metadata"]["resourceVersion"], "7");
        assert_eq!(
            scaled(obj, 2, 5).unwrap_err().to_string(),
            "Expected replicas to be 2, was 3"
        );
    }

    #[test]
    fn names_the_object_kubectl_style() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let d = ObjectRef::parse(&args(&["deploy/web"])).unwrap();
        assert_eq!(d.display(), "deployment.apps/web");
        assert_eq!(
            d.path("shop"),
            "/apis/apps/v1/namespaces/shop/deployments/web"
        );
        let rs = ObjectRef::parse(&args(&["rs", "web-1"])).unwrap();
        assert_eq!(rs.display(), "replicaset.apps/web-1");
        assert!(ObjectRef::parse(&args(&["deployment"])).is_err());
        assert!(ObjectRef::parse(&args(&["deployment/web", "x"])).is_err());
        assert!(ObjectRef::parse(&args(&["widget/web"])).is_err());
    }
}
