//! `wasmctl`: one binary for the control plane (`server`), the node agent (`agent`), the
//! all-in-one cluster (`up`), and the kubectl-like client verbs.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wasmctl",
    version,
    about = "A Kubernetes-style orchestrator whose pods are WebAssembly components"
)]
struct Cli {
    /// Kubeconfig for client verbs (else $KUBECONFIG, else ~/.wasmctl/kubeconfig.yaml).
    #[arg(long, global = true, env = "WASMCTL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: Raft-backed store and the HTTPS API server.
    Server(cli::server::ServerArgs),
    /// The HA control plane's servers: list them, or remove one.
    Cluster(cli::cluster::ClusterArgs),
    /// Run a node agent: register this node and run the pods bound to it.
    Agent(cli::agent::AgentArgs),
    /// Run an all-in-one single-node cluster (control plane + agent) in this process.
    Up(cli::agent::UpArgs),
    /// Upload a WebAssembly component to the cluster (or to an OCI registry).
    Push(cli::push::PushArgs),
    /// Print the logs of a pod's container.
    Logs(cli::logs::LogsArgs),
    /// Create or update objects from YAML files (multi-document), a directory, or stdin (-).
    Apply(cli::apply::ApplyArgs),
    /// Show objects as a table, YAML or JSON; -w keeps watching.
    Get(cli::get::GetArgs),
    /// Show one object in detail, with its events.
    Describe(cli::describe::DescribeArgs),
    /// Delete objects by kind and name, or those in files.
    Delete(cli::delete::DeleteArgs),
    /// Manage a deployment's rollout: status, history, undo, pause, resume, restart.
    Rollout(cli::rollout::RolloutArgs),
    /// Set the number of replicas of a deployment or ReplicaSet.
    Scale(cli::scale::ScaleArgs),
    /// Print the client and server versions.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server_side = matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Up(_)
    );
    cli::init_tracing(server_side);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Guests run on these workers and yield every epoch tick (5 ms); poll I/O and timers
        // after every 2 tasks instead of every 61, so a node full of spinning guests still
        // accepts and answers connections promptly.
        .event_interval(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kubeconfig = cli.kubeconfig.clone();
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(a) => cli::server::run(a).await,
            Command::Agent(a) => cli::agent::run_agent(kubeconfig.as_deref(), a).await,
            Command::Up(a) => cli::agent::run_up(a).await,
            Command::Push(a) => cli::push::run(kubeconfig.as_deref(), a).await,
            Command::Logs(a) => cli::logs::run(kubeconfig.as_deref(), a).await,
            Command::Apply(a) => cli::apply::run(kubeconfig.as_deref(), a).await,
            Command::Get(a) => cli::get::run(kubeconfig.as_deref(), a).await,
            Command::Describe(a) => cli::describe::run(kubeconfig.as_deref(), a).await,
            Command::Delete(a) => cli::delete::run(kubeconfig.as_deref(), a).await,
            Command::Rollout(a) => cli::rollout::run(kubeconfig.as_deref(), a).await,
            Command::Scale(a) => cli::scale::run(kubeconfig.as_deref(), a).await,
            Command::Cluster(a) => cli::cluster::run(kubeconfig.as_deref(), a).await,
            Command::Version => cli::version(kubeconfig.as_deref()).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", cli::render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// Parse `127.0.0.1:6443`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| {
        format!("invalid address {s:?}: {e} (expected HOST:PORT, e.g. 127.0.0.1:6443)")
    })
}
