//! `wasmctl apply -f`: create or update, with a three-way merge of labels and annotations
//! through kubectl's last-applied-configuration annotation, so `kubectl apply` and
//! `wasmctl apply` interoperate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::{json, Map, Value};
use wasmctl_api::keys::LAST_APPLIED;
use wasmctl_client::{Client, ClientError};

use super::manifest::{self, Manifest};

#[derive(Args)]
pub struct ApplyArgs {
    /// Files, directories, or - for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace for objects that do not name one.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// Check every object locally with the same defaulting and validation the server runs, so
/// an invalid document is reported before anything is written.
pub fn prevalidate(items: &[Manifest]) -> Result<(), String> {
    let mut problems = Vec::new();
    for m in items {
        if let Err(inv) = wasmctl_api::normalize(m.info, m.object.clone()) {
            problems.push(format!(
                "error: {}: document {}: {} {:?} is invalid: {inv}",
                m.source,
                m.document,
                m.info.group_kind(),
                m.name()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

fn namespace_for(
    m: &Manifest,
    flag: Option<&str>,
    client: &Client,
) -> Result<Option<String>, String> {
    if !m.info.namespaced {
        return Ok(None);
    }
    match (m.namespace(), flag) {
        (Some(a), Some(b)) if a != b => Err(format!(
            "error: {}: document {}: the namespace from the provided object {a:?} does not match the namespace {b:?}. You must pass '--namespace={a}' to perform this operation.",
            m.source, m.document
        )),
        (Some(a), _) => Ok(Some(a.to_string())),
        (None, Some(b)) => Ok(Some(b.to_string())),
        (None, None) => Ok(Some(client.namespace.clone())),
    }
}

/// The last-applied annotation value: the manifest as given, compact JSON.
fn last_applied(manifest: &Value) -> String {
    let mut m = manifest.clone();
    if let Some(ann) = m["metadata"]
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        ann.remove(LAST_APPLIED);
        if ann.is_empty() {
            m["metadata"]
                .as_object_mut()
                .map(|o| o.remove("annotations"));
        }
    }
    serde_json::to_string(&m).expect("JSON values serialise")
}

/// Merge a string map: keep what others set, drop what we set last time and no longer
/// want, set what we want now.
fn merge_map(current: &Value, previous: &Value, desired: &Value) -> Value {
    let mut out: Map<String, Value> = current.as_object().cloned().unwrap_or_default();
    if let Some(prev) = previous.as_object() {
        for k in prev.keys() {
            out.remove(k);
        }
    }
    if let Some(want) = desired.as_object() {
        for (k, v) in want {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// The object to PUT: the stored object with the manifest's fields replacing its own.
pub fn desired_update(current: &Value, manifest: &Value) -> Value {
    let previous: Value = current["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let mut next = current.clone();
    if let (Some(n), Some(m)) = (next.as_object_mut(), manifest.as_object()) {
        for (k, v) in m {
            if k != "metadata" && k != "status" {
                n.insert(k.clone(), v.clone());
            }
        }
        // Top-level fields we applied before and no longer do are removed.
        if let Some(prev) = previous.as_object() {
            for k in prev.keys() {
                if k != "metadata" && k != "status" && !m.contains_key(k) {
                    n.remove(k);
                }
            }
        }
    }
    let labels = merge_map(
        &current["metadata"]["labels"],
        &previous["metadata"]["labels"],
        &manifest["metadata"]["labels"],
    );
    let mut annotations = merge_map(
        &current["metadata"]["annotations"],
        &previous["metadata"]["annotations"],
        &manifest["metadata"]["annotations"],
    );
    annotations[LAST_APPLIED] = json!(last_applied(manifest));
    next["metadata"]["labels"] = labels;
    next["metadata"]["annotations"] = annotations;
    next
}

pub async fn run(kubeconfig: Option<&Path>, args: ApplyArgs) -> Result<ExitCode> {
    let items = match manifest::load(&args.files) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(e) = prevalidate(&items) {
        eprintln!("{e}");
        return Ok(ExitCode::FAILURE);
    }
    let client = super::client(kubeconfig)?;
    let mut failed = false;
    for m in &items {
        let ns = match namespace_for(m, args.namespace.as_deref(), &client) {
            Ok(ns) => ns,
            Err(e) => {
                eprintln!("{e}");
                failed = true;
                continue;
            }
        };
        match apply_one(&client, m, ns.as_deref()).await {
            Ok(outcome) => println!("{}/{} {outcome}", m.info.qualified_singular(), m.name()),
            Err(e @ ClientError::Unreachable { .. }) => return Err(e.into()),
            Err(e) => {
                eprintln!("{}", super::render_client_error(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Create or update one object; returns `created`, `configured` or `unchanged`.
pub async fn apply_one(
    client: &Client,
    m: &Manifest,
    ns: Option<&str>,
) -> Result<&'static str, ClientError> {
    let mut manifest = m.object.clone();
    if let Some(ns) = ns {
        manifest["metadata"]["namespace"] = json!(ns);
    }
    let path = m.info.item_path(ns, m.name());
    for _ in 0..5 {
        match client.get(&path).await {
            Err(e) if e.is_not_found() => {
                let mut obj = manifest.clone();
                obj["metadata"]["annotations"][LAST_APPLIED] = json!(last_applied(&manifest));
                match client.post(&m.info.collection_path(ns), &obj).await {
                    Ok(_) => return Ok("created"),
                    Err(e) if e.code() == Some(409) => continue, // raced with another creator
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
            Ok(current) => {
                let next = desired_update(&current, &manifest);
                let before = current["metadata"]["resourceVersion"].clone();
                match client.put(&path, &next).await {
                    Ok(updated) => {
                        return Ok(if updated["metadata"]["resourceVersion"] == before {
                            "unchanged"
                        } else {
                            "configured"
                        })
                    }
                    Err(e) if e.reason() == Some("Conflict") => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(ClientError::Decode(format!(
        "{} {:?} kept changing while applying; try again",
        m.info.qualified_singular(),
        m.name()
    )))
}
