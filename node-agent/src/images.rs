//! Module pulls. An image is either a module in the cluster's own registry (`hello:v1`,
//! `hello@sha256:…`, pushed with `wasmctl push`) or an OCI registry reference for a Wasm
//! artifact (`127.0.0.1:5000/apps/hello:v1`). Modules are stored content-addressed under
//! `DATA/modules/sha256/<hex>` and verified against their digest before use.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmctl_client::Client;

use crate::oci::{is_registry_reference, OciPuller};

/// Why a pull failed (shown as `ErrImagePull`/`ImagePullBackOff` messages).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {0:?}: {1}")]
    InvalidName(String, String),
    #[error("{0}")]
    Failed(String),
}

impl PullError {
    /// The waiting reason Kubernetes uses for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::InvalidName(..) => "InvalidImageName",
            PullError::Failed(_) => "ErrImagePull",
        }
    }
}

/// A verified module on disk.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// `sha256:<hex>`.
    pub digest: String,
    pub path: PathBuf,
}

pub struct ImageStore {
    dir: PathBuf,
    api: Client,
    oci: OciPuller,
    max_bytes: u64,
    /// Digests whose local copy was verified during this run.
    checked: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// `sha256:<64 hex>`.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Splits a cluster-registry reference into (name, tag-or-digest): `hello` → (hello, latest).
pub fn split_reference(image: &str) -> Result<(String, Reference), PullError> {
    let bad = |why: &str| PullError::InvalidName(image.to_string(), why.to_string());
    let (name, rf) = if let Some((n, d)) = image.split_once('@') {
        if !valid_digest(d) {
            return Err(bad(
                "a digest must be sha256: followed by 64 lowercase hex digits",
            ));
        }
        (n, Reference::Digest(d.to_string()))
    } else if let Some((n, t)) = image.rsplit_once(':') {
        (n, Reference::Tag(t.to_string()))
    } else {
        (image, Reference::Tag("latest".into()))
    };
    let name_ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
    if !name_ok {
        return Err(bad(
            "names use lowercase letters, digits, '.', '_', '-' and '/'",
        ));
    }
    if let Reference::Tag(t) = &rf {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(bad(
                "tags use letters, digits, '.', '_' and '-' (at most 128)",
            ));
        }
    }
    Ok((name.to_string(), rf))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

impl ImageStore {
    pub fn new(dir: PathBuf, api: Client, oci: OciPuller, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        Ok(ImageStore {
            dir,
            api,
            oci,
            max_bytes,
            checked: Default::default(),
        })
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Resolves and fetches `image`, reusing a verified local copy when the digest is known.
    pub async fn pull(&self, image: &str) -> Result<Pulled, PullError> {
        if is_registry_reference(image) {
            return self.pull_oci(image).await;
        }
        let (name, rf) = split_reference(image)?;
        let digest = match rf {
            Reference::Digest(d) => d,
            Reference::Tag(tag) => {
                let path = format!(
                    "/wasm/v1/resolve?ref={}",
                    urlencode(&format!("{name}:{tag}"))
                );
                let v = self
                    .api
                    .get(&path)
                    .await
                    .map_err(|e| PullError::Failed(format!("resolving {name}:{tag}: {e}")))?;
                let d = v["digest"].as_str().unwrap_or_default().to_string();
                if !valid_digest(&d) {
                    return Err(PullError::Failed(format!(
                        "resolving {name}:{tag}: the registry answered an invalid digest {d:?}"
                    )));
                }
                d
            }
        };
        let path = self.blob_path(&digest);
        if self.verified(&path, &digest).await {
            return Ok(Pulled { digest, path });
        }
        let bytes = self
            .api
            .get_bytes(&format!("/wasm/v1/blobs/{digest}"), self.max_bytes)
            .await
            .map_err(|e| PullError::Failed(format!("fetching {digest}: {e}")))?;
        self.store(&digest, &bytes).await?;
        Ok(Pulled { digest, path })
    }

    async fn pull_oci(&self, image: &str) -> Result<Pulled, PullError> {
        let (bytes, digest) = self
            .oci
            .pull_wasm(image, self.max_bytes)
            .await
            .map_err(|e| PullError::Failed(e.to_string()))?;
        self.store(&digest, &bytes).await?;
        Ok(Pulled {
            path: self.blob_path(&digest),
            digest,
        })
    }

    /// Verifies `bytes` against `digest` and stores them (temp file + rename).
    async fn store(&self, digest: &str, bytes: &[u8]) -> Result<(), PullError> {
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(PullError::Failed(format!(
                "digest mismatch: expected {digest}, the content hashes to {actual}"
            )));
        }
        let path = self.blob_path(digest);
        let tmp = path.with_extension(format!("tmp{}", rand_suffix()));
        let res = async {
            tokio::fs::write(&tmp, bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        res.map_err(|e| PullError::Failed(format!("storing {digest}: {e}")))?;
        self.checked
            .lock()
            .expect("checked lock")
            .insert(digest.to_string());
        Ok(())
    }

    /// A local copy exists and still hashes to its name (a damaged file is removed). A
    /// digest is hashed once per agent run, not on every container start.
    async fn verified(&self, path: &Path, digest: &str) -> bool {
        if self.checked.lock().expect("checked lock").contains(digest) && path.exists() {
            return true;
        }
        let Ok(bytes) = tokio::fs::read(path).await else {
            return false;
        };
        let d = digest.to_string();
        let ok = tokio::task::spawn_blocking(move || sha256_digest(&bytes) == d)
            .await
            .unwrap_or(false);
        if ok {
            self.checked
                .lock()
                .expect("checked lock")
                .insert(digest.to_string());
        } else {
            tracing::warn!(path = %path.display(), "removing a damaged module from the local store");
            let _ = tokio::fs::remove_file(path).await;
        }
        ok
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    (std::process::id() as u64) << 32 | N.fetch_add(1, Ordering::Relaxed)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(
            split_reference("hello:v1").unwrap(),
            ("hello".into(), Reference::Tag("v1".into()))
        );
        assert_eq!(
            split_reference("apps/hello").unwrap(),
            ("apps/hello".into(), Reference::Tag("latest".into()))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_reference(&format!("hello@{d}")).unwrap(),
            ("hello".into(), Reference::Digest(d))
        );
        assert!(split_reference("Hello:v1").is_err());
        assert!(split_reference("hello@sha256:xyz").is_err());
        assert!(split_reference("hello:").is_err());
        assert_eq!(
            split_reference("X:y").unwrap_err().reason(),
            "InvalidImageName"
        );
        assert!(valid_digest(&sha256_digest(b"abc")));
    }
}
