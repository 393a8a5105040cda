//! `wasmctl push FILE.wasm NAME:TAG`: into the cluster's module registry, or, when the
//! reference names a registry host (`127.0.0.1:5000/apps/hello:v1`), to that OCI registry as
//! a Wasm artifact.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use wasmctl_node_agent::oci::{is_registry_reference, OciPuller};

#[derive(Args)]
pub struct PushArgs {
    /// The WebAssembly component to upload.
    pub file: PathBuf,
    /// `NAME:TAG` in the cluster, or `HOST[:PORT]/NAME:TAG` for an OCI registry.
    pub reference: String,
    /// Push to an OCI registry over plain HTTP (a local registry).
    #[arg(long)]
    pub insecure: bool,
}

pub async fn run(kubeconfig: Option<&Path>, a: PushArgs) -> Result<ExitCode> {
    let bytes = tokio::fs::read(&a.file)
        .await
        .with_context(|| format!("reading {}", a.file.display()))?;
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        bail!(
            "{}: not a WebAssembly binary (it does not start with \\0asm)",
            a.file.display()
        );
    }
    if is_registry_reference(&a.reference) {
        let host = a
            .reference
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let insecure = if a.insecure { vec![host] } else { Vec::new() };
        let url = OciPuller::new(insecure)
            .push_wasm(&a.reference, bytes)
            .await?;
        println!("pushed {} ({url})", a.reference);
        return Ok(ExitCode::SUCCESS);
    }
    let c = super::client(kubeconfig)?;
    let q: String = url::form_urlencoded::byte_serialize(a.reference.as_bytes()).collect();
    let v = c
        .post_bytes(&format!("/wasm/v1/push?ref={q}"), bytes, "application/wasm")
        .await?;
    println!(
        "pushed {} {} ({} bytes)",
        v["ref"].as_str().unwrap_or(&a.reference),
        v["digest"].as_str().unwrap_or("?"),
        v["size"]
    );
    Ok(ExitCode::SUCCESS)
}
