//! The client verbs and the server entry point of the `wasmctl` binary.

pub mod agent;
pub mod apply;
pub mod cluster;
pub mod delete;
pub mod describe;
pub mod get;
pub mod logs;
pub mod manifest;
pub mod push;
pub mod rollout;
pub mod scale;
pub mod server;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use wasmctl_api::registry::ResourceInfo;
use wasmctl_client::{Client, ClientError};

pub fn init_tracing(server_side: bool) {
    let default = if server_side {
        "info,openraft=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Errors as kubectl prints them: `Error from server (NotFound): pods "x" not found`.
pub fn render_error(e: &anyhow::Error) -> String {
    if let Some(ce) = e.downcast_ref::<ClientError>() {
        return render_client_error(ce);
    }
    format!("error: {e:#}")
}

pub fn render_client_error(e: &ClientError) -> String {
    match e {
        ClientError::Status(st) => format!("Error from server ({}): {}", st.reason, st.message),
        other => format!("error: {other}"),
    }
}

pub fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    Ok(Client::from_kubeconfig(kubeconfig)?)
}

/// One object named as kubectl takes it: `deployment/web`, `deploy/web`, or `deployment web`.
#[derive(Debug)]
pub struct ObjectRef {
    pub info: &'static ResourceInfo,
    pub name: String,
}

impl ObjectRef {
    /// Parse the one or two positional arguments of a verb on a single object.
    pub fn parse(args: &[String]) -> Result<ObjectRef> {
        let (kind, name) = match args {
            [one] => one
                .split_once('/')
                .ok_or_else(|| anyhow!("you must specify a name: {one}/NAME or {one} NAME"))?,
            [kind, _] if kind.contains('/') => bail!(
                "there is no need to specify a resource type as a separate argument when \
                 passing arguments in resource/name form"
            ),
            [kind, name] => (kind.as_str(), name.as_str()),
            _ => bail!("expected one object: TYPE/NAME or TYPE NAME"),
        };
        if name.is_empty() || name.contains('/') {
            bail!("invalid object name {name:?}: expected TYPE/NAME or TYPE NAME");
        }
        Ok(ObjectRef {
            info: get::resolve_kind(kind)?,
            name: name.to_string(),
        })
    }

    /// `deployment.apps/web`: how kubectl names the object in its messages.
    pub fn display(&self) -> String {
        format!("{}/{}", self.info.qualified_singular(), self.name)
    }

    pub fn path(&self, namespace: &str) -> String {
        self.info.item_path(Some(namespace), &self.name)
    }
}

/// What an edit decides about the object read by [`update_with_retry`].
pub enum Update<T> {
    /// PUT this object (carrying the resourceVersion it was read with), then return `T`.
    Put(Value, T),
    /// Write nothing and return `T`.
    Unchanged(T),
}

/// How many times [`update_with_retry`] writes before it gives up on 409 Conflicts.
const CONFLICT_ATTEMPTS: u32 = 5;

/// Read-modify-write with optimistic concurrency: `edit` the object at `path` (first
/// `current`, as already read) and PUT it with the resourceVersion it was read with; on a
/// 409 Conflict read it again and retry.
pub async fn update_with_retry<T>(
    client: &Client,
    path: &str,
    current: Value,
    mut edit: impl FnMut(Value) -> Result<Update<T>>,
) -> Result<T> {
    let mut current = current;
    let mut attempt = 1;
    loop {
        let (obj, out) = match edit(current)? {
            Update::Unchanged(out) => return Ok(out),
            Update::Put(obj, out) => (obj, out),
        };
        match client.put(path, &obj).await {
            Ok(_) => return Ok(out),
            Err(e) if e.code() == Some(409) && attempt < CONFLICT_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
        current = client.get(path).await?;
    }
}

/// `5s`, `250ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 500ms, 5s, 2m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?} (expected e.g. 500ms, 5s, 2m, 1h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn version(kubeconfig: Option<&Path>) -> anyhow::Result<ExitCode> {
    println!("Client Version: v{}", env!("CARGO_PKG_VERSION"));
    let c = client(kubeconfig)?;
    let v = c.get("/version").await?;
    println!(
        "Server Version: {}",
        v["gitVersion"].as_str().unwrap_or("unknown")
    );
    Ok(ExitCode::SUCCESS)
}
