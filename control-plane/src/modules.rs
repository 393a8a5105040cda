//! The cluster's module registry (`wasmctl push`): WebAssembly modules stored content-addressed
//! by sha256 in the replicated store, and `NAME:TAG` → digest records. Agents resolve a tag,
//! fetch the blob by digest and verify it.
//!
//! # In the store
//!
//! - `/wasmctl/blobs/<hex>/<n>` — chunk `n` (six digits, from `000000`) of the blob, at most
//!   [`CHUNK_BYTES`] each;
//! - `/wasmctl/blobs/<hex>` — the manifest (`{"size", "chunkSize", "chunks"}`), written with or
//!   after the last chunk: a blob exists once its manifest does;
//! - `/wasmctl/tags/<name>:<tag>` — the digest (`sha256:<hex>`), written with or after the
//!   manifest.
//!
//! A push is acknowledged once all of these are committed (each [`Store::write`] returns after
//! a majority of the voters has it), so a pushed module survives the loss of any minority of
//! servers and every server serves it. Chunks go [`CHUNKS_PER_WRITE`] per write (one Raft
//! entry of at most `CHUNKS_PER_WRITE × CHUNK_BYTES`); the manifest and the tag ride in the
//! last one. Chunks are content-addressed, so nothing needs a transaction: a push that fails
//! half-way leaves chunks without a manifest (invisible, overwritten by the next push of the
//! same module). Blobs are never deleted: there is no garbage collection of blobs that no tag
//! names any more.
//!
//! # On the server's disk (`DIR/modules`)
//!
//! - `blobs/sha256/<hex>` — a cache of blobs, each verified against its digest when filled
//!   (from an upload or from the store) and again on its first use after each start; a pull of
//!   a cached blob does not read the store (blobs are immutable), so repeated pulls cost one
//!   local file read. The cache holds every blob this server received or served (no eviction:
//!   it is bounded by what the store holds).
//! - `tmp/` — uploads and cache fills in progress (emptied on start).
//! - `tags/` — the tags of a server from before blobs were replicated. [`ModuleRegistry::
//!   spawn_import`] copies them and the blobs of the cache into the store once (what the store
//!   already has wins), then writes `imported` so that later starts skip it.
//!
//! # Bounds
//!
//! A module is at most [`MAX_MODULE_BYTES`]. An upload is spooled to `tmp/` while it is hashed
//! (the digest names the keys), so a push holds at most one write's chunks in memory
//! (`2 × CHUNKS_PER_WRITE × CHUNK_BYTES` while it compares chunks a re-push finds already
//! stored); a cache fill holds [`CHUNKS_PER_READ`] chunks; a pull streams the cached file.
//! Concurrent pulls of one uncached blob wait for a single fill.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use wasmctl_store::{Op, OpResult, Precondition, Store, StoreError};

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;
/// The size of a blob's chunks in the store (a manifest records its own, so this may change).
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Chunks per [`Store::write`]. Each write is one Raft entry (or part of one: the store batches
/// concurrent writes up to 4 MiB), and a follower must receive, decode and append an
/// AppendEntries within one heartbeat interval (100 ms) or the leader retries it; measured on
/// this store, entries of 1 MiB and more already miss that under load, so one chunk per write.
pub const CHUNKS_PER_WRITE: usize = 1;
/// Chunk writes of this server's registry in flight at once (all pushes and imports share
/// them), so that the store's batching cannot merge many pushes' chunks into one huge entry.
const WRITES_IN_FLIGHT: usize = 1;
/// Chunks per [`Store::range`] while filling the cache (the memory of one fill).
pub const CHUNKS_PER_READ: usize = 4;
/// The largest chunk size a manifest may name (bounds the memory of a read).
const MAX_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// The size of the frames a pull is streamed in.
pub const PULL_FRAME_BYTES: usize = 64 * 1024;
/// Between two attempts of the import of a pre-replication registry.
const IMPORT_RETRY: Duration = Duration::from_secs(2);

const BLOBS_PREFIX: &str = "/wasmctl/blobs/";
const TAGS_PREFIX: &str = "/wasmctl/tags/";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("invalid reference {0:?}: {1}")]
    InvalidRef(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("module {0} not found")]
    NotFound(String),
    /// The upload is larger than [`MAX_MODULE_BYTES`].
    #[error("the module exceeds {MAX_MODULE_BYTES} bytes")]
    TooLarge,
    /// What the store holds for a blob is not the blob (missing or damaged chunks).
    #[error("module {digest} is damaged in the cluster store: {why}; push it again")]
    Corrupt { digest: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("module storage: {0}")]
    Io(#[from] std::io::Error),
}

/// The registry; clones share one cache.
#[derive(Clone)]
pub struct ModuleRegistry {
    store: Store,
    dir: PathBuf,
    /// Cache fills in progress, by hex digest (one at a time per blob).
    fills: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Cached blobs verified since this server started (hex digests).
    verified: Arc<Mutex<HashSet<String>>>,
    /// Permits for chunk writes ([`WRITES_IN_FLIGHT`]).
    writes: Arc<tokio::sync::Semaphore>,
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

impl std::fmt::Display for TagRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

pub fn parse_digest(d: &str) -> Result<String, ModuleError> {
    match d.strip_prefix("sha256:") {
        Some(h) if is_hex_digest(h) => Ok(h.to_string()),
        _ => Err(ModuleError::Invalid(format!(
            "invalid digest {d:?}: expected sha256: and 64 lowercase hex digits"
        ))),
    }
}

fn is_hex_digest(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn manifest_key(hex: &str) -> String {
    format!("{BLOBS_PREFIX}{hex}")
}

fn chunks_prefix(hex: &str) -> String {
    format!("{BLOBS_PREFIX}{hex}/")
}

fn chunk_key(hex: &str, n: u64) -> String {
    format!("{BLOBS_PREFIX}{hex}/{n:06}")
}

fn tag_key(r: &TagRef) -> String {
    format!("{TAGS_PREFIX}{}:{}", r.name, r.tag)
}

/// The value of `/wasmctl/blobs/<hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    size: u64,
    chunk_size: u64,
    chunks: u64,
}

impl Manifest {
    fn for_size(size: u64) -> Manifest {
        let chunk_size = CHUNK_BYTES as u64;
        Manifest {
            size,
            chunk_size,
            chunks: size.div_ceil(chunk_size),
        }
    }

    /// The length of chunk `n`.
    fn chunk_len(&self, n: u64) -> u64 {
        if n + 1 < self.chunks {
            self.chunk_size
        } else {
            self.size - self.chunk_size * n
        }
    }

    fn decode(digest: &str, bytes: &[u8]) -> Result<Manifest, ModuleError> {
        let corrupt = |why: String| ModuleError::Corrupt {
            digest: digest.to_string(),
            why,
        };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("unreadable manifest: {e}")))?;
        if m.chunk_size == 0 || m.chunk_size > MAX_CHUNK_BYTES {
            return Err(corrupt(format!(
                "chunk size {} in the manifest",
                m.chunk_size
            )));
        }
        if m.size == 0 || m.chunks != m.size.div_ceil(m.chunk_size) || m.chunks > 999_999 {
            return Err(corrupt(format!(
                "the manifest names {} chunks of {} bytes for {} bytes",
                m.chunks, m.chunk_size, m.size
            )));
        }
        Ok(m)
    }
}

/// An upload in progress: spooled to `tmp/` and hashed as it arrives.
pub struct Upload {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    len: usize,
    /// The first bytes, for the `\0asm` check.
    head: Vec<u8>,
}

impl Upload {
    /// Appends `data`; fails once the upload exceeds [`MAX_MODULE_BYTES`], or as soon as its
    /// first bytes show that it is not WebAssembly.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ModuleError> {
        if self.len + data.len() > MAX_MODULE_BYTES {
            return Err(ModuleError::TooLarge);
        }
        if self.head.len() < 4 {
            let take = (4 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            if !b"\0asm".starts_with(&self.head) {
                return Err(not_wasm());
            }
        }
        self.hasher.update(data);
        self.file.write_all(data).await?;
        self.len += data.len();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Gone already once a push moved it into the cache.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn not_wasm() -> ModuleError {
    ModuleError::Invalid(
        "the upload is not a WebAssembly binary (it must start with \\0asm)".into(),
    )
}

/// A blob ready to be served: the open cache file and its size.
pub struct Blob {
    pub file: tokio::fs::File,
    pub size: u64,
}

/// What [`ModuleRegistry::import_legacy`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub blobs_imported: usize,
    pub blobs_present: usize,
    pub tags_imported: usize,
    pub tags_present: usize,
    /// Files not imported, with why.
    pub skipped: Vec<String>,
}

/// Whether every op of a write was applied.
fn check_applied(results: &[OpResult], what: &str) -> Result<(), ModuleError> {
    match results.iter().find(|r| !matches!(r, OpResult::Ok { .. })) {
        None => Ok(()),
        Some(r) => Err(ModuleError::Io(std::io::Error::other(format!(
            "writing {what}: the store answered {r:?}"
        )))),
    }
}

async fn sync_dir(dir: &Path) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await;
}

/// Hashes the file at `path` (off the async workers); returns its hex digest and length.
async fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok((hex::encode(hasher.finalize()), len))
    })
    .await
    .map_err(std::io::Error::other)?
}

impl ModuleRegistry {
    /// The registry on `store`, caching in `dir` (`DATA/modules`).
    pub fn open(dir: PathBuf, store: Store) -> std::io::Result<ModuleRegistry> {
        std::fs::create_dir_all(dir.join("blobs").join("sha256"))?;
        let tmp = dir.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(ModuleRegistry {
            store,
            dir,
            fills: Default::default(),
            verified: Default::default(),
            writes: Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT)),
        })
    }

    /// The cache file of blob `hex`.
    pub fn cache_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(hex)
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Starts an upload (see [`ModuleRegistry::push`]).
    pub async fn upload(&self) -> Result<Upload, ModuleError> {
        let path = self.tmp_path();
        let file = tokio::fs::File::create(&path).await?;
        Ok(Upload {
            path,
            file,
            hasher: Sha256::new(),
            len: 0,
            head: Vec::with_capacity(4),
        })
    }

    /// Stores the upload (which must be WebAssembly) in the cluster store and points `r` at
    /// it; returns the digest and size once a majority has all of it.
    pub async fn push(&self, r: &TagRef, upload: Upload) -> Result<(String, u64), ModuleError> {
        let mut upload = upload;
        if upload.len < 8 || upload.head != b"\0asm" {
            return Err(not_wasm());
        }
        upload.file.flush().await?;
        upload.file.sync_all().await?;
        let hex = hex::encode(std::mem::take(&mut upload.hasher).finalize());
        let digest = format!("sha256:{hex}");
        let size = upload.len as u64;
        let tag = Op::Put {
            key: tag_key(r),
            value: digest.clone().into_bytes(),
            precondition: Precondition::None,
        };
        self.store_blob(&hex, &upload.path, size, Some(tag)).await?;
        // The upload is the blob: keep it as the cache's copy.
        let cached = self.cache_path(&hex);
        tokio::fs::rename(&upload.path, &cached).await?;
        sync_dir(cached.parent().expect("cache files have a directory")).await;
        self.verified.lock().unwrap().insert(hex);
        Ok((digest, size))
    }

    /// Writes blob `hex` (`size` bytes, in the file at `path`) to the store: its chunks, its
    /// manifest, then `last` (a tag), the manifest and `last` in the write of the last chunks.
    /// A blob whose manifest is there already gets only its missing or differing chunks.
    async fn store_blob(
        &self,
        hex: &str,
        path: &Path,
        size: u64,
        last: Option<Op>,
    ) -> Result<(), ModuleError> {
        let digest = format!("sha256:{hex}");
        let manifest = Manifest::for_size(size);
        let present = match self.store.get(&manifest_key(hex)).await? {
            Some(kv) => Some(Manifest::decode(&digest, &kv.value)),
            None => None,
        };
        // A stored blob of another chunking stays as it is; a damaged manifest is rewritten.
        if let Some(Ok(m)) = present {
            if m.size != size {
                return Err(ModuleError::Corrupt {
                    digest,
                    why: format!("the store says {} bytes, the upload has {size}", m.size),
                });
            }
            if m.chunk_size != manifest.chunk_size {
                return self.finish_write(Vec::new(), last, &digest).await;
            }
        }
        let compare = matches!(present, Some(Ok(_)));
        let mut file = tokio::fs::File::open(path).await?;
        let mut n = 0;
        while n < manifest.chunks {
            let end = (n + CHUNKS_PER_WRITE as u64).min(manifest.chunks);
            let stored: HashMap<String, bytes::Bytes> = if compare {
                let start_after = n.checked_sub(1).map(|p| chunk_key(hex, p));
                self.store
                    .range(
                        &chunks_prefix(hex),
                        start_after.as_deref(),
                        (end - n) as usize,
                    )
                    .await?
                    .items
                    .into_iter()
                    .map(|kv| (kv.key, kv.value))
                    .collect()
            } else {
                HashMap::new()
            };
            let mut ops = Vec::new();
            for i in n..end {
                let mut chunk = vec![0u8; manifest.chunk_len(i) as usize];
                file.read_exact(&mut chunk).await?;
                let key = chunk_key(hex, i);
                if stored.get(&key).is_some_and(|v| v[..] == chunk[..]) {
                    continue;
                }
                ops.push(Op::Put {
                    key,
                    value: chunk,
                    precondition: Precondition::None,
                });
            }
            n = end;
            if n < manifest.chunks && !ops.is_empty() {
                self.write(ops, &format!("the chunks of {digest}")).await?;
            } else if n == manifest.chunks {
                if !compare {
                    ops.push(Op::Put {
                        key: manifest_key(hex),
                        value: serde_json::to_vec(&manifest).expect("a manifest serialises"),
                        precondition: Precondition::None,
                    });
                }
                return self.finish_write(ops, last, &digest).await;
            }
        }
        unreachable!("a blob has at least one chunk")
    }

    async fn finish_write(
        &self,
        mut ops: Vec<Op>,
        last: Option<Op>,
        digest: &str,
    ) -> Result<(), ModuleError> {
        ops.extend(last);
        self.write(ops, digest).await
    }

    /// One write of chunks (and manifest, tag), with one of the [`WRITES_IN_FLIGHT`] permits.
    async fn write(&self, ops: Vec<Op>, what: &str) -> Result<(), ModuleError> {
        let _permit = self.writes.acquire().await.expect("never closed");
        let results = self.store.write(ops).await?;
        check_applied(&results, what)
    }

    /// The digest `r` points at, and the blob's size.
    pub async fn resolve(&self, r: &TagRef) -> Result<(String, u64), ModuleError> {
        let kv = self
            .store
            .get(&tag_key(r))
            .await?
            .ok_or_else(|| ModuleError::NotFound(r.to_string()))?;
        let digest = String::from_utf8_lossy(&kv.value).trim().to_string();
        let hex = parse_digest(&digest).map_err(|_| ModuleError::Corrupt {
            digest: r.to_string(),
            why: format!("the tag holds {digest:?}, not a digest"),
        })?;
        let m = self.manifest(&hex).await?;
        Ok((digest, m.size))
    }

    async fn manifest(&self, hex: &str) -> Result<Manifest, ModuleError> {
        let digest = format!("sha256:{hex}");
        match self.store.get(&manifest_key(hex)).await? {
            Some(kv) => Manifest::decode(&digest, &kv.value),
            None => Err(ModuleError::NotFound(digest)),
        }
    }

    /// Blob `hex`, from the cache, filled from the store first if needed.
    pub async fn open_blob(&self, hex: &str) -> Result<Blob, ModuleError> {
        if let Some(blob) = self.cached(hex).await? {
            return Ok(blob);
        }
        let lock = self
            .fills
            .lock()
            .unwrap()
            .entry(hex.to_string())
            .or_default()
            .clone();
        let filled = async {
            let _fill = lock.lock().await;
            if let Some(blob) = self.cached(hex).await? {
                return Ok(blob);
            }
            self.fill(hex).await?;
            self.cached(hex).await?.ok_or_else(|| {
                ModuleError::Io(std::io::Error::other(format!(
                    "the cache file of sha256:{hex} vanished"
                )))
            })
        }
        .await;
        let mut fills = self.fills.lock().unwrap();
        drop(lock);
        if fills.get(hex).is_some_and(|l| Arc::strong_count(l) == 1) {
            fills.remove(hex);
        }
        filled
    }

    /// The cached blob `hex`, verified once per run; a damaged copy is removed.
    async fn cached(&self, hex: &str) -> Result<Option<Blob>, ModuleError> {
        let path = self.cache_path(hex);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !self.verified.lock().unwrap().contains(hex) {
            let (actual, _) = hash_file(&path).await?;
            if actual != hex {
                tracing::warn!(
                    path = %path.display(),
                    hashes_to = %actual,
                    "damaged module cache file removed"
                );
                tokio::fs::remove_file(&path).await?;
                return Ok(None);
            }
            self.verified.lock().unwrap().insert(hex.to_string());
        }
        let size = file.metadata().await?.len();
        Ok(Some(Blob { file, size }))
    }

    /// Copies blob `hex` from the store into the cache, verifying every chunk's size and the
    /// whole blob's digest before it becomes visible.
    async fn fill(&self, hex: &str) -> Result<(), ModuleError> {
        let digest = format!("sha256:{hex}");
        let m = self.manifest(hex).await?;
        let corrupt = |why: String| ModuleError::Corrupt {
            digest: digest.clone(),
            why,
        };
        let tmp = self.tmp_path();
        let result = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            let mut hasher = Sha256::new();
            let prefix = chunks_prefix(hex);
            let mut n = 0;
            while n < m.chunks {
                let want = (m.chunks - n).min(CHUNKS_PER_READ as u64);
                let start_after = n.checked_sub(1).map(|p| chunk_key(hex, p));
                let got = self
                    .store
                    .range(&prefix, start_after.as_deref(), want as usize)
                    .await?;
                let mut items = got.items.into_iter();
                for i in n..n + want {
                    let kv = items
                        .next()
                        .filter(|kv| kv.key == chunk_key(hex, i))
                        .ok_or_else(|| corrupt(format!("chunk {i} of {} is missing", m.chunks)))?;
                    if kv.value.len() as u64 != m.chunk_len(i) {
                        return Err(corrupt(format!(
                            "chunk {i} has {} bytes instead of {}",
                            kv.value.len(),
                            m.chunk_len(i)
                        )));
                    }
                    hasher.update(&kv.value);
                    out.write_all(&kv.value).await?;
                }
                n += want;
            }
            let actual = hex::encode(hasher.finalize());
            if actual != hex {
                return Err(corrupt(format!("its chunks hash to sha256:{actual}")));
            }
            out.flush().await?;
            out.sync_all().await?;
            drop(out);
            let cached = self.cache_path(hex);
            tokio::fs::rename(&tmp, &cached).await?;
            sync_dir(cached.parent().expect("cache files have a directory")).await;
            self.verified.lock().unwrap().insert(hex.to_string());
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Copies what a server from before blobs were replicated kept on its disk (`tags/` and the
    /// blobs of `blobs/sha256/`) into the store, in the background, until done or `shutdown`.
    /// Returns whether it started (not once an earlier import finished).
    pub fn spawn_import(&self, shutdown: CancellationToken) -> bool {
        if self.dir.join("imported").exists() {
            return false;
        }
        let reg = self.clone();
        tokio::spawn(async move {
            loop {
                let attempt = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = reg.import_legacy() => r,
                };
                match attempt {
                    Ok(s) => {
                        if s != ImportSummary::default() {
                            tracing::info!(
                                blobs_imported = s.blobs_imported,
                                blobs_present = s.blobs_present,
                                tags_imported = s.tags_imported,
                                tags_present = s.tags_present,
                                skipped = s.skipped.len(),
                                "local module registry imported into the cluster store"
                            );
                        }
                        return;
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the local module registry is not imported into the cluster store yet; retrying"
                    ),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(IMPORT_RETRY) => {}
                }
            }
        });
        true
    }

    /// One pass of the import (see [`ModuleRegistry::spawn_import`]); idempotent. Fails (to be
    /// tried again) when the store does; files that cannot be imported are skipped with a
    /// warning and listed.
    pub async fn import_legacy(&self) -> Result<ImportSummary, ModuleError> {
        let mut s = ImportSummary::default();
        let blobs_dir = self.dir.join("blobs").join("sha256");
        let mut entries = tokio::fs::read_dir(&blobs_dir).await?;
        let mut blobs = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_hex_digest(&name) && e.file_type().await?.is_file() {
                blobs.push(name);
            }
        }
        blobs.sort();
        for hex in blobs {
            if self.store.get(&manifest_key(&hex)).await?.is_some() {
                s.blobs_present += 1;
                continue;
            }
            let path = self.cache_path(&hex);
            let (actual, size) = hash_file(&path).await?;
            let why = if actual != hex {
                Some(format!("its content hashes to sha256:{actual}"))
            } else if size == 0 || size > MAX_MODULE_BYTES as u64 {
                Some(format!("{size} bytes"))
            } else {
                None
            };
            if let Some(why) = why {
                tracing::warn!(path = %path.display(), %why, "damaged module blob not imported; removed");
                tokio::fs::remove_file(&path).await?;
                s.skipped.push(format!("{}: {why}", path.display()));
                continue;
            }
            self.store_blob(&hex, &path, size, None).await?;
            self.verified.lock().unwrap().insert(hex);
            s.blobs_imported += 1;
        }

        let tags_dir = self.dir.join("tags");
        let mut tags = Vec::new();
        let mut dirs = vec![tags_dir.clone()];
        while let Some(d) = dirs.pop() {
            let mut entries = match tokio::fs::read_dir(&d).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(e) = entries.next_entry().await? {
                let path = e.path();
                if e.file_type().await?.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "tag") {
                    tags.push(path);
                }
            }
        }
        tags.sort();
        for path in tags {
            let rel = path
                .strip_prefix(&tags_dir)
                .expect("under the tags directory");
            let name = rel
                .parent()
                .map(|p| p.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/"))
                .unwrap_or_default();
            let tag = path.file_stem().unwrap_or_default().to_string_lossy();
            let parsed = TagRef::parse(&format!("{name}:{tag}")).and_then(|r| {
                let digest = std::fs::read_to_string(&path)?.trim().to_string();
                parse_digest(&digest)?;
                Ok((r, digest))
            });
            let (r, digest) = match parsed {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "module tag not imported");
                    s.skipped.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let hex = parse_digest(&digest)?;
            if self.store.get(&manifest_key(&hex)).await?.is_none() {
                let why = format!("its blob {digest} is neither here nor in the store");
                tracing::warn!(path = %path.display(), %why, "module tag not imported");
                s.skipped.push(format!("{}: {why}", path.display()));
                continue;
            }
            let results = self
                .store
                .write(vec![Op::Put {
                    key: tag_key(&r),
                    value: digest.into_bytes(),
                    precondition: Precondition::MustNotExist,
                }])
                .await?;
            match results.first() {
                Some(OpResult::Ok { .. }) => s.tags_imported += 1,
                Some(OpResult::AlreadyExists) => s.tags_present += 1,
                other => {
                    return Err(ModuleError::Io(std::io::Error::other(format!(
                        "importing tag {r}: the store answered {other:?}"
                    ))))
                }
            }
        }
        let summary = format!(
            "{} blobs and {} tags imported into the cluster store; {} blobs and {} tags were \
             there already\n{}",
            s.blobs_imported,
            s.tags_imported,
            s.blobs_present,
            s.tags_present,
            s.skipped
                .iter()
                .map(|l| format!("skipped {l}\n"))
                .collect::<String>()
        );
        tokio::fs::write(self.dir.join("imported"), summary).await?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A WebAssembly-looking blob of `len` bytes whose content depends on `seed`.
    fn wasm(len: usize, seed: u8) -> Vec<u8> {
        let mut v = b"\0asm\x01\x00\x00\x00".to_vec();
        let mut x = seed as u32 + 1;
        while v.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            v.push((x >> 16) as u8);
        }
        v
    }

    async fn push(
        reg: &ModuleRegistry,
        r: &str,
        bytes: &[u8],
    ) -> Result<(String, u64), ModuleError> {
        let mut up = reg.upload().await?;
        // In uneven pieces, as a body arrives.
        for piece in bytes.chunks(100_003) {
            up.write(piece).await?;
        }
        reg.push(&TagRef::parse(r).unwrap(), up).await
    }

    async fn pull(reg: &ModuleRegistry, digest: &str) -> Result<Vec<u8>, ModuleError> {
        let mut blob = reg.open_blob(&parse_digest(digest)?).await?;
        let mut out = Vec::new();
        blob.file.read_to_end(&mut out).await?;
        assert_eq!(out.len() as u64, blob.size);
        Ok(out)
    }

    async fn chunk_keys(store: &Store, digest: &str) -> Vec<String> {
        let hex = parse_digest(digest).unwrap();
        let r = store.range(&chunks_prefix(&hex), None, 0).await.unwrap();
        r.items.into_iter().map(|kv| kv.key).collect()
    }

    #[test]
    fn refs_and_digests() {
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
        let m = Manifest::for_size(3 * CHUNK_BYTES as u64 + 1);
        assert_eq!(
            (m.chunks, m.chunk_len(2), m.chunk_len(3)),
            (4, CHUNK_BYTES as u64, 1)
        );
        assert_eq!(Manifest::for_size(CHUNK_BYTES as u64).chunks, 1);
    }

    /// 3 MiB pushed through one server's registry reads back equal through another's (its own
    /// cache, the same store), in chunks of 512 KiB; a tag can be moved.
    #[tokio::test]
    async fn push_pull_through_the_store_and_retag() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _objects) = crate::controllers::tests::open(&dir.path().join("store")).await;
        let a = ModuleRegistry::open(dir.path().join("a"), store.clone()).unwrap();
        let b = ModuleRegistry::open(dir.path().join("b"), store.clone()).unwrap();

        let v1 = wasm(3 * 1024 * 1024, 1);
        let (d1, size) = push(&a, "apps/big:v1", &v1).await.unwrap();
        assert_eq!(d1, format!("sha256:{}", hex::encode(Sha256::digest(&v1))));
        assert_eq!(size, v1.len() as u64);
        assert_eq!(chunk_keys(&store, &d1).await.len(), 6);
        assert!(chunk_keys(&store, &d1).await[5].ends_with("/000005"));
        let tag = TagRef::parse("apps/big:v1").unwrap();
        assert_eq!(b.resolve(&tag).await.unwrap(), (d1.clone(), size));
        assert!(!b.cache_path(&parse_digest(&d1).unwrap()).exists());
        assert_eq!(pull(&b, &d1).await.unwrap(), v1);
        assert!(b.cache_path(&parse_digest(&d1).unwrap()).exists());
        // The pushing server kept the upload as its cached copy.
        assert_eq!(pull(&a, &d1).await.unwrap(), v1);

        // A module that is not a multiple of the chunk size, pushed to the same tag.
        let v2 = wasm(CHUNK_BYTES + 17, 2);
        let (d2, _) = push(&b, "apps/big:v1", &v2).await.unwrap();
        assert_ne!(d1, d2);
        assert_eq!(
            a.resolve(&tag).await.unwrap(),
            (d2.clone(), v2.len() as u64)
        );
        assert_eq!(pull(&a, &d2).await.unwrap(), v2);
        // The old blob stays (no garbage collection) and by digest still pulls.
        assert_eq!(pull(&b, &d1).await.unwrap(), v1);
        // The same module again, under another tag: nothing but the tag is written.
        let before = store.revision();
        let (again, _) = push(&a, "apps/big:v2", &v1).await.unwrap();
        assert_eq!(again, d1);
        assert_eq!(store.revision(), before + 1, "one write: the tag");

        // Tiny modules are one chunk.
        let tiny = b"\0asm\x0d\x00\x01\x00payload".to_vec();
        let (d3, _) = push(&a, "apps/hello:v1", &tiny).await.unwrap();
        assert_eq!(chunk_keys(&store, &d3).await.len(), 1);
        assert_eq!(pull(&b, &d3).await.unwrap(), tiny);

        for missing in ["apps/big:v3", "apps/nope:v1"] {
            let r = b.resolve(&TagRef::parse(missing).unwrap()).await;
            assert!(matches!(r, Err(ModuleError::NotFound(_))), "{r:?}");
        }
        let r = b.open_blob(&"0".repeat(64)).await;
        assert!(matches!(r, Err(ModuleError::NotFound(_))), "{:?}", r.err());
        store.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn rejects_what_is_not_a_module() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _objects) = crate::controllers::tests::open(&dir.path().join("store")).await;
        let reg = ModuleRegistry::open(dir.path().join("m"), store.clone()).unwrap();
        // Refused at the first bytes, before the rest is spooled.
        let mut up = reg.upload().await.unwrap();
        assert!(matches!(
            up.write(b"GIF89a..").await,
            Err(ModuleError::Invalid(_))
        ));
        drop(up);
        let mut up = reg.upload().await.unwrap();
        up.write(b"\0a").await.unwrap();
        assert!(matches!(
            up.write(b"xm").await,
            Err(ModuleError::Invalid(_))
        ));
        drop(up);
        // Too short.
        let r = push(&reg, "x:v1", b"\0asm").await;
        assert!(matches!(r, Err(ModuleError::Invalid(_))), "{r:?}");
        // Too large: refused before it is written.
        let mut up = reg.upload().await.unwrap();
        up.write(b"\0asm").await.unwrap();
        let big = vec![0u8; MAX_MODULE_BYTES - 3];
        assert!(matches!(up.write(&big).await, Err(ModuleError::TooLarge)));
        assert_eq!(up.len(), 4);
        drop(up);
        // Nothing is left behind in tmp/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("m/tmp")).unwrap().count(),
            0
        );
        assert_eq!(
            store
                .range(BLOBS_PREFIX, None, 0)
                .await
                .unwrap()
                .items
                .len(),
            0
        );
        store.shutdown().await.unwrap();
    }

    /// A damaged or missing chunk is an error naming the blob, never a wrong blob; pushing the
    /// module again repairs it.
    #[tokio::test]
    async fn damaged_chunks_are_errors_and_a_push_repairs_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _objects) = crate::controllers::tests::open(&dir.path().join("store")).await;
        let a = ModuleRegistry::open(dir.path().join("a"), store.clone()).unwrap();
        let v = wasm(3 * CHUNK_BYTES + 5, 7);
        let (d, _) = push(&a, "m:v1", &v).await.unwrap();
        let hex = parse_digest(&d).unwrap();
        let put = |key: String, value: Vec<u8>| Op::Put {
            key,
            value,
            precondition: Precondition::None,
        };
        // Each case on a server with an empty cache.
        let mut n = 0;
        let mut fresh = || {
            n += 1;
            ModuleRegistry::open(dir.path().join(format!("fresh{n}")), store.clone()).unwrap()
        };

        // Same length, other bytes.
        store
            .write(vec![put(chunk_key(&hex, 1), vec![b'x'; CHUNK_BYTES])])
            .await
            .unwrap();
        let r = fresh().open_blob(&hex).await;
        let e = r.err().expect("a damaged blob is an error").to_string();
        assert!(
            e.contains(&d) && e.contains("chunks hash to sha256:"),
            "{e}"
        );
        // The cache did not keep it.
        let reg = fresh();
        let _ = reg.open_blob(&hex).await;
        assert!(!reg.cache_path(&hex).exists());
        assert_eq!(std::fs::read_dir(reg.dir.join("tmp")).unwrap().count(), 0);

        // Short.
        store
            .write(vec![put(chunk_key(&hex, 1), vec![b'x'; 10])])
            .await
            .unwrap();
        let e = fresh().open_blob(&hex).await.err().unwrap().to_string();
        assert!(e.contains("chunk 1 has 10 bytes instead of 524288"), "{e}");

        // Missing.
        store
            .write(vec![Op::Delete {
                key: chunk_key(&hex, 2),
                precondition: Precondition::None,
            }])
            .await
            .unwrap();
        let e = fresh().open_blob(&hex).await.err().unwrap().to_string();
        assert!(e.contains("chunk 1 has 10 bytes"), "{e}");
        store
            .write(vec![put(
                chunk_key(&hex, 1),
                v[CHUNK_BYTES..2 * CHUNK_BYTES].to_vec(),
            )])
            .await
            .unwrap();
        let e = fresh().open_blob(&hex).await.err().unwrap().to_string();
        assert!(e.contains("chunk 2 of 4 is missing"), "{e}");
        assert!(matches!(
            fresh().open_blob(&hex).await,
            Err(ModuleError::Corrupt { .. })
        ));

        // A damaged manifest.
        store
            .write(vec![put(manifest_key(&hex), b"{\"size\":1}".to_vec())])
            .await
            .unwrap();
        let e = fresh().open_blob(&hex).await.err().unwrap().to_string();
        assert!(e.contains("unreadable manifest"), "{e}");
        let e = a
            .resolve(&TagRef::parse("m:v1").unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, ModuleError::Corrupt { .. }), "{e}");

        // Pushing it again (from a server that has it cached) rewrites what differs.
        let (again, _) = push(&a, "m:v1", &v).await.unwrap();
        assert_eq!(again, d);
        assert_eq!(pull(&fresh(), &d).await.unwrap(), v);
        store
            .write(vec![put(chunk_key(&hex, 0), vec![0; CHUNK_BYTES])])
            .await
            .unwrap();
        push(&a, "m:v2", &v).await.unwrap();
        assert_eq!(pull(&fresh(), &d).await.unwrap(), v);
        store.shutdown().await.unwrap();
    }

    /// A damaged cache file is noticed on its first use after a start and filled again.
    #[tokio::test]
    async fn damaged_cache_files_are_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _objects) = crate::controllers::tests::open(&dir.path().join("store")).await;
        let a = ModuleRegistry::open(dir.path().join("a"), store.clone()).unwrap();
        let v = wasm(CHUNK_BYTES * 2, 3);
        let (d, _) = push(&a, "m:v1", &v).await.unwrap();
        let hex = parse_digest(&d).unwrap();
        let path = a.cache_path(&hex);
        let mut bad = v.clone();
        bad[100] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        // The same run trusts what it verified; a restarted one checks.
        let restarted = ModuleRegistry::open(dir.path().join("a"), store.clone()).unwrap();
        assert_eq!(pull(&restarted, &d).await.unwrap(), v);
        assert_eq!(std::fs::read(&path).unwrap(), v);
        store.shutdown().await.unwrap();
    }

    /// What a server kept on its disk before blobs were replicated goes into the store once;
    /// what the store has already wins.
    #[tokio::test]
    async fn imports_a_pre_replication_registry() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _objects) = crate::controllers::tests::open(&dir.path().join("store")).await;
        let old = dir.path().join("old");
        let blob = |bytes: &[u8]| {
            let hex = hex::encode(Sha256::digest(bytes));
            let p = old.join("blobs/sha256").join(&hex);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
            format!("sha256:{hex}")
        };
        let tag = |name: &str, tag: &str, digest: &str| {
            let p = old.join("tags").join(name).join(format!("{tag}.tag"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, digest).unwrap();
        };
        let v1 = wasm(CHUNK_BYTES * 2 + 1, 1);
        let v2 = wasm(100, 2);
        let d1 = blob(&v1);
        let d2 = blob(&v2);
        tag("apps/web", "v1", &d1);
        tag("apps/web", "v2.1", &d2);
        tag("db", "latest", &d2);
        tag("gone", "v1", &format!("sha256:{}", "a".repeat(64)));
        tag("Bad", "v1", &d1);
        // A blob whose content is not its name.
        std::fs::write(old.join("blobs/sha256").join("b".repeat(64)), b"\0asmjunk").unwrap();
        // Left-overs of the old atomic writes.
        std::fs::write(old.join("tags/db/latest.tmp0123"), "x").unwrap();
        // Pushed to the cluster since: the store's tag wins.
        let other = ModuleRegistry::open(dir.path().join("other"), store.clone()).unwrap();
        let v3 = wasm(300, 3);
        let (d3, _) = push(&other, "db:latest", &v3).await.unwrap();

        let reg = ModuleRegistry::open(old.clone(), store.clone()).unwrap();
        let s = reg.import_legacy().await.unwrap();
        assert_eq!(
            (
                s.blobs_imported,
                s.blobs_present,
                s.tags_imported,
                s.tags_present
            ),
            (2, 0, 2, 1),
            "{s:?}"
        );
        assert_eq!(s.skipped.len(), 3, "{s:?}");
        assert!(!old.join("blobs/sha256").join("b".repeat(64)).exists());
        let r = |s: &str| TagRef::parse(s).unwrap();
        assert_eq!(other.resolve(&r("apps/web:v1")).await.unwrap().0, d1);
        assert_eq!(other.resolve(&r("apps/web:v2.1")).await.unwrap().0, d2);
        assert_eq!(other.resolve(&r("db:latest")).await.unwrap().0, d3);
        assert_eq!(pull(&other, &d1).await.unwrap(), v1);
        assert!(old.join("imported").exists());

        // Again: nothing new.
        let s = reg.import_legacy().await.unwrap();
        assert_eq!(
            (
                s.blobs_imported,
                s.blobs_present,
                s.tags_imported,
                s.tags_present
            ),
            (0, 2, 0, 3),
            "{s:?}"
        );
        // The marker stops the background import.
        assert!(!reg.spawn_import(CancellationToken::new()));
        store.shutdown().await.unwrap();
    }

    // -----------------------------------------------------------------------------------------
    // Three stores in one process: a module survives the loss of the server it was pushed to.

    #[derive(Default)]
    struct Net {
        nodes: Mutex<HashMap<String, Store>>,
    }

    struct NodeTransport(std::sync::Weak<Net>);

    impl wasmctl_store::RaftTransport for NodeTransport {
        fn call(
            &self,
            target: u64,
            addr: &str,
            rpc: wasmctl_store::Rpc,
            body: Vec<u8>,
            timeout: Duration,
        ) -> wasmctl_store::BoxFuture<Result<Vec<u8>, wasmctl_store::TransportError>> {
            use wasmctl_store::TransportError;
            let store = self
                .0
                .upgrade()
                .and_then(|net| net.nodes.lock().unwrap().get(addr).cloned())
                .filter(|s| s.node_id() == target);
            let addr = addr.to_owned();
            Box::pin(async move {
                let store =
                    store.ok_or_else(|| TransportError::Unreachable(format!("{addr} is down")))?;
                match tokio::time::timeout(timeout, store.handle_rpc(rpc, &body)).await {
                    Err(_) => Err(TransportError::Timeout(timeout)),
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(e)) => Err(TransportError::Failed(e.to_string())),
                }
            })
        }
    }

    async fn open_member(net: &Arc<Net>, dir: &Path, id: u64) -> Store {
        let mut cfg = wasmctl_store::StoreConfig::new(dir.join(format!("store{id}")));
        cfg.node_id = id;
        cfg.advertise_addr = format!("node-{id}:6443");
        cfg.fsync = false;
        cfg.bootstrap = id == 1;
        cfg.transport = Arc::new(NodeTransport(Arc::downgrade(net)));
        cfg.heartbeat_ms = 50;
        cfg.election_timeout_ms = (250, 500);
        let addr = cfg.advertise_addr.clone();
        // A joiner's open returns at once; it waits to be added.
        let store = Store::open(cfg).await.unwrap();
        net.nodes
            .lock()
            .unwrap()
            .insert(addr.clone(), store.clone());
        if id != 1 {
            let leader = net.nodes.lock().unwrap()["node-1:6443"].clone();
            leader.add_learner(id, &addr).await.unwrap();
        }
        store
    }

    /// Waits until `store` knows a leader other than `not` and has applied its whole log.
    async fn settled(store: &Store, not: Option<u64>) {
        store
            .wait_for_status(Duration::from_secs(20), |st| {
                st.current_leader.is_some_and(|l| Some(l) != not)
                    && st.last_applied_index == st.last_log_index
            })
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_module_survives_the_loss_of_the_server_it_was_pushed_to() {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Net::default());
        let mut stores = Vec::new();
        for id in 1..=3 {
            stores.push(open_member(&net, dir.path(), id).await);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while stores[0]
            .members()
            .iter()
            .filter(|m| m.role == wasmctl_store::MemberRole::Voter)
            .count()
            < 3
        {
            assert!(Instant::now() < deadline, "{:?}", stores[0].members());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let regs: Vec<ModuleRegistry> = (0..3)
            .map(|i| ModuleRegistry::open(dir.path().join(format!("m{i}")), stores[i].clone()))
            .collect::<Result<_, _>>()
            .unwrap();

        // Pushed to a follower (its writes go to the leader), pulled from the other follower.
        let v1 = wasm(3 * 1024 * 1024 + 11, 5);
        let started = Instant::now();
        let (d1, _) = push(&regs[1], "apps/web:v1", &v1).await.unwrap();
        eprintln!("3 MiB pushed through a follower in {:?}", started.elapsed());
        let r = TagRef::parse("apps/web:v1").unwrap();
        assert_eq!(regs[2].resolve(&r).await.unwrap().0, d1);
        assert_eq!(pull(&regs[2], &d1).await.unwrap(), v1);

        // Pushed to the leader, which then goes away with its disk.
        let v2 = wasm(2 * 1024 * 1024, 6);
        let (d2, _) = push(&regs[0], "apps/web:v2", &v2).await.unwrap();
        let leader = stores[0].clone();
        net.nodes.lock().unwrap().remove("node-1:6443");
        leader.shutdown().await.unwrap();
        drop((leader, regs));
        std::fs::remove_dir_all(dir.path().join("store1")).unwrap();
        std::fs::remove_dir_all(dir.path().join("m0")).unwrap();
        settled(&stores[1], Some(1)).await;
        settled(&stores[2], Some(1)).await;
        let survivors: Vec<ModuleRegistry> = (1..3)
            .map(|i| ModuleRegistry::open(dir.path().join(format!("new{i}")), stores[i].clone()))
            .collect::<Result<_, _>>()
            .unwrap();
        for reg in &survivors {
            let r2 = TagRef::parse("apps/web:v2").unwrap();
            assert_eq!(
                reg.resolve(&r2).await.unwrap(),
                (d2.clone(), v2.len() as u64)
            );
            assert_eq!(pull(reg, &d2).await.unwrap(), v2);
            assert_eq!(pull(reg, &d1).await.unwrap(), v1);
        }
        // And a push still works with two of three.
        let v3 = wasm(CHUNK_BYTES * 3, 9);
        let (d3, _) = push(&survivors[0], "apps/web:v3", &v3).await.unwrap();
        assert_eq!(pull(&survivors[1], &d3).await.unwrap(), v3);
        for s in &stores[1..] {
            s.shutdown().await.unwrap();
        }
    }
}
