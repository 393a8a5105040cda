//! The client verbs and the server entry point of the `wasmctl` binary.

pub mod agent;
pub mod apply;
pub mod delete;
pub mod describe;
pub mod get;
pub mod logs;
pub mod manifest;
pub mod push;
pub mod server;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

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
