//! `wasmctl delete KIND NAME...` and `wasmctl delete -f FILE`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use wasmctl_api::registry::ResourceInfo;
use wasmctl_client::{Client, ClientError};

use super::manifest;

#[derive(Args)]
pub struct DeleteArgs {
    /// Kind (`pod`, `deploy`, ...) or `KIND/NAME`; omit with -f.
    pub kind: Option<String>,
    pub names: Vec<String>,
    /// Delete the objects in these files, directories, or stdin (-).
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<PathBuf>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// How dependents go (kubectl's --cascade): background (deleted after the object),
    /// foreground (deleted before it) or orphan (kept, without the owner reference).
    #[arg(long = "cascade", default_value = "background", value_parser = parse_cascade)]
    pub cascade_policy: String,
    /// Seconds a pod gets to stop (default: its terminationGracePeriodSeconds).
    #[arg(long)]
    pub grace_period: Option<i64>,
    /// Treat a missing object as success.
    #[arg(long)]
    pub ignore_not_found: bool,
}

/// kubectl's `--cascade` values, as the API's `propagationPolicy`.
fn parse_cascade(s: &str) -> Result<String, String> {
    match s.to_ascii_lowercase().as_str() {
        "background" | "true" => Ok("Background".into()),
        "foreground" => Ok("Foreground".into()),
        "orphan" | "false" => Ok("Orphan".into()),
        _ => Err(format!(
            "invalid --cascade {s:?}: must be \"background\", \"foreground\", or \"orphan\""
        )),
    }
}

async fn delete_one(
    client: &Client,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
    args: &DeleteArgs,
) -> Result<bool> {
    let mut opts = json!({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": args.cascade_policy});
    if let Some(g) = args.grace_period {
        opts["gracePeriodSeconds"] = json!(g);
    }
    match client.delete(&info.item_path(ns, name), Some(&opts)).await {
        Ok(_) => {
            println!("{} {name:?} deleted", info.qualified_singular());
            Ok(true)
        }
        Err(e) if e.is_not_found() && args.ignore_not_found => Ok(true),
        Err(e @ ClientError::Unreachable { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("{}", super::render_client_error(&e));
            Ok(false)
        }
    }
}

pub async fn run(kubeconfig: Option<&Path>, mut args: DeleteArgs) -> Result<ExitCode> {
    let mut ok = true;
    if !args.files.is_empty() {
        if args.kind.is_some() {
            bail!("use either KIND NAME or -f FILE, not both");
        }
        let items = match manifest::load(&args.files) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        };
        let client = super::client(kubeconfig)?;
        for m in &items {
            let ns = m.info.namespaced.then(|| {
                m.namespace()
                    .map(String::from)
                    .or_else(|| args.namespace.clone())
                    .unwrap_or_else(|| client.namespace.clone())
            });
            ok &= delete_one(&client, m.info, ns.as_deref(), m.name(), &args).await?;
        }
    } else {
        let Some(kind) = args.kind.clone() else {
            bail!("specify KIND NAME... or -f FILE");
        };
        let kind = match kind.split_once('/') {
            Some((k, n)) => {
                args.names.insert(0, n.to_string());
                k.to_string()
            }
            None => kind,
        };
        if args.names.is_empty() {
            bail!("resource(s) were provided, but no name was specified");
        }
        let info = super::get::resolve_kind(&kind)?;
        let client = super::client(kubeconfig)?;
        let ns = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.namespace.clone());
        for name in args.names.clone() {
            ok &= delete_one(&client, info, Some(&ns), &name, &args).await?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
