//! `wasmctl logs POD [-c NAME] [-f] [--tail N] [--timestamps]`, through the API server's
//! `pods/{name}/log` (as kubectl does).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct LogsArgs {
    /// The pod (optionally `pod/NAME`).
    pub pod: String,
    /// The container (required when the pod has more than one).
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Keep streaming new lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines (-1: all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub tail: i64,
    /// Prefix each line with its RFC 3339 timestamp.
    #[arg(long)]
    pub timestamps: bool,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

pub async fn run(kubeconfig: Option<&Path>, a: LogsArgs) -> Result<ExitCode> {
    let c = super::client(kubeconfig)?;
    let ns = a.namespace.clone().unwrap_or_else(|| c.namespace.clone());
    let name = a
        .pod
        .strip_prefix("pod/")
        .or_else(|| a.pod.strip_prefix("pods/"))
        .unwrap_or(&a.pod);
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(ct) = &a.container {
        q.append_pair("container", ct);
    }
    if a.follow {
        q.append_pair("follow", "true");
    }
    if a.tail >= 0 {
        q.append_pair("tailLines", &a.tail.to_string());
    }
    if a.timestamps {
        q.append_pair("timestamps", "true");
    }
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}/log?{}", q.finish());
    let mut resp = c.get_stream(&path, Some("text/plain")).await?;
    let mut out = std::io::stdout();
    while let Some(chunk) = resp.chunk().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}
