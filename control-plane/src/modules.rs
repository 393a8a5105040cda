//! The cluster's module registry (`wasmctl push`): Wasm modules stored content-addressed by
//! sha256 under `DATA/modules/blobs/sha256/<hex>`, and `NAME:TAG` → digest records under
//! `DATA/modules/tags/`. Agents resolve a tag, fetch the blob by digest and verify it.
//!
//! The blobs live in the server's data directory, not in the Raft log (modules are megabytes;
//! Raft entries are kept small). With a single voter that is the same durability; a
//! multi-voter cluster would need blob replication (see ARCHITECTURE.md).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("invalid reference {0:?}: {1}")]
    InvalidRef(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("module {0} not found")]
    NotFound(String),
    #[error("module storage: {0}")]
    Io(#[from] std::io::Error),
}

pub struct ModuleRegistry {
    dir: PathBuf,
}

/// A parsed `NAME:TAG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRef {
    pub name: String,
    pub tag: String,
}

impl TagRef {
    pub fn parse(s: &str) -> Result<TagRef, ModuleError> {
        let bad = |why: &str| ModuleError::InvalidRef(s.to_string(), why.to_string());
        let (name, tag) = s.rsplit_once(':').unwrap_or((s, "latest"));
        let name_ok = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('/')
            && !name.ends_with('/')
            && !name.contains("//")
            && name.split('/').all(|seg| seg != "." && seg != "..")
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
        if !name_ok {
            return Err(bad(
                "names use lowercase letters, digits, '.', '_', '-' and '/' (no empty, '.' or '..' segments)",
            ));
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with('.')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(bad("tags use letters, digits, '.', '_' and '-' (1 to 128)"));
        }
        Ok(TagRef {
            name: name.into(),
            tag: tag.into(),
        })
    }
}

pub fn parse_digest(d: &str) -> Result<String, ModuleError> {
    match d.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h.to_string())
        }
        _ => Err(ModuleError::Invalid(format!(
            "invalid digest {d:?}: expected sha256: and 64 lowercase hex digits"
        ))),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("tmp{}", uuid::Uuid::new_v4().simple()));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl ModuleRegistry {
    pub fn open(dir: PathBuf) -> std::io::Result<ModuleRegistry> {
        std::fs::create_dir_all(dir.join("blobs").join("sha256"))?;
        std::fs::create_dir_all(dir.join("tags"))?;
        Ok(ModuleRegistry { dir })
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(hex)
    }

    fn tag_path(&self, r: &TagRef) -> PathBuf {
        self.dir
            .join("tags")
            .join(&r.name)
            .join(format!("{}.tag", r.tag))
    }

    /// Stores `bytes` (which must be WebAssembly) and points `r` at it. Returns the digest.
    pub fn push(&self, r: &TagRef, bytes: &[u8]) -> Result<String, ModuleError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(ModuleError::Invalid(
                "the upload is not a WebAssembly binary (it must start with \\0asm)".into(),
            ));
        }
        let hex = hex::encode(Sha256::digest(bytes));
        let blob = self.blob_path(&hex);
        if !blob.exists() {
            write_atomic(&blob, bytes)?;
        }
        let digest = format!("sha256:{hex}");
        write_atomic(&self.tag_path(r), digest.as_bytes())?;
        Ok(digest)
    }

    pub fn resolve(&self, r: &TagRef) -> Result<(String, u64), ModuleError> {
        let digest = match std::fs::read_to_string(self.tag_path(r)) {
            Ok(d) => d.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModuleError::NotFound(format!("{}:{}", r.name, r.tag)))
            }
            Err(e) => return Err(e.into()),
        };
        let hex = parse_digest(&digest)?;
        let size = std::fs::metadata(self.blob_path(&hex))
            .map_err(|_| ModuleError::NotFound(digest.clone()))?
            .len();
        Ok((digest, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_resolve_and_reject() {
        let dir = tempfile::tempdir().unwrap();
        let reg = ModuleRegistry::open(dir.path().to_path_buf()).unwrap();
        let r = TagRef::parse("apps/hello:v1").unwrap();
        let wasm = b"\0asm\x0d\x00\x01\x00payload".to_vec();
        let d = reg.push(&r, &wasm).unwrap();
        assert_eq!(reg.resolve(&r).unwrap(), (d.clone(), wasm.len() as u64));
        let hex = parse_digest(&d).unwrap();
        assert_eq!(std::fs::read(reg.blob_path(&hex)).unwrap(), wasm);
        assert!(matches!(
            reg.push(&r, b"GIF89a.."),
            Err(ModuleError::Invalid(_))
        ));
        assert!(matches!(
            reg.resolve(&TagRef::parse("apps/hello:v2").unwrap()),
            Err(ModuleError::NotFound(_))
        ));
        assert_eq!(TagRef::parse("hello").unwrap().tag, "latest");
        for bad in [
            "../x:v1",
            "a//b:v1",
            "A:v1",
            "a:",
            "a:.x",
            "/a:v1",
            "a/../b:v1",
        ] {
            assert!(TagRef::parse(bad).is_err(), "{bad}");
        }
        assert!(parse_digest("sha256:xyz").is_err());
    }
}
