//! `wasmctl cluster members` and `wasmctl cluster remove MEMBER`: the HA control plane's
//! Raft members, as any server sees them (the leader's view of replication lag).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// List the servers of the control plane: id, address, role, term, last applied index
    /// and lag behind the leader's log.
    Members,
    /// Take a server out of the control plane (a voter leaves through a joint membership
    /// change). Refused for the last voter, or when the rest would have no quorum.
    Remove {
        /// The member's id (from `wasmctl cluster members`) or its address.
        member: String,
    },
}

const MEMBERS: &str = "/internal/cluster/v1/members";

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "?".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn run(kubeconfig: Option<&Path>, args: ClusterArgs) -> Result<ExitCode> {
    let client = super::client(kubeconfig)?;
    let list = client.get(MEMBERS).await?;
    let members = list["members"].as_array().cloned().unwrap_or_default();
    match args.command {
        ClusterCommand::Members => {
            let rows: Vec<[String; 6]> = members
                .iter()
                .map(|m| {
                    [
                        cell(&m["id"]),
                        cell(&m["address"]),
                        cell(&m["role"]),
                        cell(&m["term"]),
                        cell(&m["lastApplied"]),
                        cell(&m["lag"]),
                    ]
                })
                .collect();
            let header = ["ID", "ADDRESS", "ROLE", "TERM", "APPLIED", "LAG"].map(str::to_owned);
            let mut widths = header.clone().map(|h| h.len());
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.len());
                }
            }
            for r in std::iter::once(&header).chain(&rows) {
                let line: Vec<String> = r
                    .iter()
                    .zip(widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", line.join("   ").trim_end());
            }
            for m in &members {
                if let Some(e) = m["error"].as_str() {
                    eprintln!("member {}: {e}", cell(&m["id"]));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Remove { member } => {
            let id = members
                .iter()
                .find(|m| cell(&m["id"]) == member || cell(&m["address"]) == member)
                .map(|m| cell(&m["id"]))
                .ok_or_else(|| anyhow::anyhow!("{member:?} is not a member of this cluster"))?;
            client.delete(&format!("{MEMBERS}/{id}"), None).await?;
            println!("member {id} removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}
