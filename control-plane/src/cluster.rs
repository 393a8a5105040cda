//! Several `wasmctl server`s as one control plane: who this server is in its cluster, the join
//! token, the joiner's side of `--join`, and the Raft transport between servers.
//!
//! - `DIR/store/member.json` records the cluster id, this server's Raft id and the address it
//!   advertises. It is written before the store first opens, so a restart needs no flags.
//! - `DIR/token` (`--cluster-init`) is `K10<sha256 of ca.crt>::<join secret>`, as k3s writes
//!   its server token: a joiner checks the CA it is shown against the hash *before* it sends
//!   the secret, so a man in the middle learns nothing.
//! - Servers authenticate each other's Raft RPCs with the cluster's peer secret (a bearer
//!   token only servers hold; the join secret and the admin token do not grant it) over TLS
//!   verified by the cluster CA, and each request names the cluster and the node it is meant
//!   for: a server that is someone else (an address reused after `rm -rf`) answers 409, which
//!   the sender treats as unreachable.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmctl_store::{BoxFuture, RaftTransport, Rpc, TransportError};

use crate::pki;

/// Path prefix of the Raft RPCs on the API port.
pub const RAFT_PREFIX: &str = "/internal/raft/v1/";
/// Path of the join request on the API port.
pub const JOIN_PATH: &str = "/internal/cluster/v1/join";
/// Path of the member list (admin) on the API port.
pub const MEMBERS_PATH: &str = "/internal/cluster/v1/members";
/// The header naming the cluster a peer request is meant for.
pub const CLUSTER_HEADER: &str = "x-wasmctl-cluster";
/// The header naming the node a peer request is meant for.
pub const NODE_HEADER: &str = "x-wasmctl-node";
/// The largest Raft RPC body accepted (a snapshot chunk is 3 MiB; an AppendEntries carries
/// at most `max_payload_entries` entries of at most a few MiB each).
pub const MAX_RAFT_BODY: usize = 256 << 20;

/// `DIR/store/member.json`: this server's place in its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberFile {
    pub cluster_id: String,
    pub node_id: u64,
    /// `host:port` the other servers reach this one at.
    pub advertise: String,
}

impl MemberFile {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("store").join("member.json")
    }

    pub fn load(data_dir: &Path) -> Result<Option<MemberFile>> {
        let path = Self::path(data_dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let path = Self::path(data_dir);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        pki::write_private(&path, &serde_json::to_string_pretty(self)?)
    }
}

/// A new random id (hex).
pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The sha256 (hex) of a PEM file's bytes, as the token pins it.
pub fn ca_hash(ca_pem: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_pem))
}

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: String,
    pub secret: String,
}

impl JoinToken {
    pub fn format(ca_pem: &[u8], secret: &str) -> String {
        format!("K10{}::{secret}", ca_hash(ca_pem))
    }

    pub fn parse(token: &str) -> Result<JoinToken> {
        let token = token.trim();
        let bad = || {
            anyhow::anyhow!(
                "invalid token: expected K10<sha256 of the cluster CA, 64 hex digits>::<secret> \
                 (the contents of the first server's DIR/token)"
            )
        };
        let rest = token.strip_prefix("K10").ok_or_else(bad)?;
        let (hash, secret) = rest.split_once("::").ok_or_else(bad)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
            return Err(bad());
        }
        Ok(JoinToken {
            ca_hash: hash.to_ascii_lowercase(),
            secret: secret.to_owned(),
        })
    }
}

/// What a joining server sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    pub advertise: String,
}

/// What a joining server receives: its identity and the cluster's shared secrets.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub cluster_id: String,
    pub node_id: u64,
    pub ca_crt: String,
    pub ca_key: String,
    pub admin_token: String,
    pub join_secret: String,
    pub peer_secret: String,
}

/// The joiner's side of `--join URL --token TOKEN`: checks the server's CA against the token
/// before sending anything secret, then asks to be added. Nothing is written here.
pub async fn request_join(url: &str, token: &JoinToken, advertise: &str) -> Result<JoinResponse> {
    let base = url.trim_end_matches('/');
    // 1. The CA, over a connection that is not verified yet: the token's hash verifies it.
    let insecure = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let ca = insecure
        .get(format!("{base}/cacerts"))
        .send()
        .await
        .with_context(|| format!("fetching the cluster CA from {base}/cacerts"))?
        .error_for_status()
        .with_context(|| format!("fetching the cluster CA from {base}/cacerts"))?
        .bytes()
        .await?;
    let presented = ca_hash(&ca);
    if presented != token.ca_hash {
        bail!(
            "CA hash mismatch: the token expects a cluster CA with sha256 {}, the server at {base} \
             presented {presented}; refusing to join (wrong token, or not the server you meant)",
            token.ca_hash
        );
    }
    // 2. Verified by that CA from now on: send the secret.
    let client = pki::client_with_ca(&ca)?;
    let resp = client
        .post(format!("{base}{JOIN_PATH}"))
        .bearer_auth(&token.secret)
        .json(&JoinRequest {
            advertise: advertise.to_owned(),
        })
        .send()
        .await
        .with_context(|| format!("asking {base} to join"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(body);
        bail!("{base} refused to add this server ({status}): {message}");
    }
    resp.json().await.context("reading the join answer")
}

/// Raft RPCs to the other servers over HTTPS (pooled HTTP/2 connections, one client).
pub struct HttpsTransport {
    client: reqwest::Client,
    cluster_id: String,
    peer_secret: String,
}

impl HttpsTransport {
    pub fn new(ca_pem: &[u8], cluster_id: &str, peer_secret: &str) -> Result<HttpsTransport> {
        Ok(HttpsTransport {
            client: pki::client_with_ca(ca_pem)?,
            cluster_id: cluster_id.to_owned(),
            peer_secret: peer_secret.to_owned(),
        })
    }
}

impl RaftTransport for HttpsTransport {
    fn call(
        &self,
        target: u64,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, TransportError>> {
        let request = self
            .client
            .post(format!("https://{addr}{RAFT_PREFIX}{}", rpc.name()))
            .bearer_auth(&self.peer_secret)
            .header(CLUSTER_HEADER, &self.cluster_id)
            .header(NODE_HEADER, target.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(timeout)
            .body(body);
        let addr = addr.to_owned();
        Box::pin(async move {
            let resp = request
                .send()
                .await
                .map_err(|e| classify(&addr, e, timeout))?;
            let status = resp.status();
            if status == StatusCode::CONFLICT || status == StatusCode::UNAUTHORIZED {
                // Refused before anything was done: not the node (or cluster) we meant, or it
                // does not take our secret.
                let text = resp.text().await.unwrap_or_default();
                return Err(TransportError::Unreachable(format!(
                    "{addr} answered {status}: {}",
                    text.trim()
                )));
            }
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                return Err(TransportError::Failed(format!(
                    "{addr} answered {status}: {}",
                    text.trim()
                )));
            }
            resp.bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| classify(&addr, e, timeout))
        })
    }
}

fn classify(addr: &str, e: reqwest::Error, timeout: Duration) -> TransportError {
    if e.is_timeout() {
        TransportError::Timeout(timeout)
    } else if e.is_connect() {
        TransportError::Unreachable(format!("{addr}: {e:#}"))
    } else {
        TransportError::Failed(format!("{addr}: {e:#}"))
    }
}

/// The shared secrets of an HA cluster, under `DIR/pki`.
pub struct Secrets {
    pub join: String,
    pub peer: String,
}

impl Secrets {
    /// Loads the secrets, creating them if missing (a `--cluster-init` server's first start).
    pub fn ensure(data_dir: &Path) -> Result<Secrets> {
        let pki_dir = data_dir.join("pki");
        fs::create_dir_all(&pki_dir)?;
        let get = |name: &str| -> Result<String> {
            let path = pki_dir.join(name);
            if path.exists() {
                Ok(fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned())
            } else {
                let s = random_hex(32);
                pki::write_private(&path, &s)?;
                Ok(s)
            }
        };
        Ok(Secrets {
            join: get("join.secret")?,
            peer: get("peer.secret")?,
        })
    }

    /// Writes secrets received when joining.
    pub fn install(data_dir: &Path, join: &str, peer: &str) -> Result<()> {
        let pki_dir = data_dir.join("pki");
        fs::create_dir_all(&pki_dir)?;
        pki::write_private(&pki_dir.join("join.secret"), join)?;
        pki::write_private(&pki_dir.join("peer.secret"), peer)
    }
}

/// Whether `candidate` (a bearer token from a request) equals `secret`, in constant time.
pub fn secret_matches(candidate: &str, secret: &str) -> bool {
    let (a, b) = (candidate.as_bytes(), secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The cluster state a server needs to serve peers (in `ApiState`).
pub struct PeerAuth {
    pub cluster_id: String,
    pub node_id: u64,
    pub peer_secret: String,
    /// `None` on a server that was not started with `--cluster-init` and did not join: it
    /// refuses every join.
    pub join_secret: Option<String>,
}

/// The store key that hands out Raft ids to joiners.
pub const NEXT_NODE_ID_KEY: &str = "/wasmctl/cluster/next-node-id";

/// The shared pieces of a running HA server, for the join handler.
pub struct ClusterState {
    pub auth: PeerAuth,
    pub data_dir: PathBuf,
}

pub type SharedCluster = Arc<ClusterState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = JoinToken::format(b"pem", "s3cret");
        assert!(t.starts_with("K10"));
        let parsed = JoinToken::parse(&t).unwrap();
        assert_eq!(parsed.ca_hash, ca_hash(b"pem"));
        assert_eq!(parsed.secret, "s3cret");
        for bad in [
            "",
            "K10::x",
            "abc",
            &format!("K10{}::", "a".repeat(64)),
            &format!("K10{}::x", "g".repeat(64)),
            &format!("K10{}x", "a".repeat(64)),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid token"), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secret_matches("abc", "abc"));
        assert!(!secret_matches("abd", "abc"));
        assert!(!secret_matches("ab", "abc"));
        assert!(!secret_matches("", "abc"));
    }
}
