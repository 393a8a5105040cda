//! The RocksDB instance shared by the Raft log and the state machine: column families, key
//! layout and encoding helpers.
//!
//! | column family | key                     | value                                   |
//! |---------------|-------------------------|-----------------------------------------|
//! | `logs`        | log index, big-endian   | bincode `Entry<TypeConfig>`             |
//! | `raft`        | `vote`, `last_purged`, `committed` | bincode `Vote` / `Option<LogId>` |
//! | `objects`     | key bytes (UTF-8)       | bincode [`StoredValue`]                 |
//! | `history`     | revision, big-endian    | bincode [`HistoryRecord`]               |
//! | `sm_meta`     | `last_applied`, `last_membership`, `revision`, `compacted` | bincode |
//!
//! [`StoredValue`]: crate::types::StoredValue
//! [`HistoryRecord`]: crate::types::HistoryRecord

use std::io;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) const CF_LOGS: &str = "logs";
pub(crate) const CF_RAFT: &str = "raft";
pub(crate) const CF_OBJECTS: &str = "objects";
pub(crate) const CF_HISTORY: &str = "history";
pub(crate) const CF_SM_META: &str = "sm_meta";

const ALL_CFS: [&str; 5] = [CF_LOGS, CF_RAFT, CF_OBJECTS, CF_HISTORY, CF_SM_META];

pub(crate) const KEY_VOTE: &[u8] = b"vote";
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";
pub(crate) const KEY_COMMITTED: &[u8] = b"committed";

pub(crate) const KEY_LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const KEY_LAST_MEMBERSHIP: &[u8] = b"last_membership";
pub(crate) const KEY_REVISION: &[u8] = b"revision";
pub(crate) const KEY_COMPACTED: &[u8] = b"compacted";

/// Upper bound (exclusive) of every UTF-8 key: the byte 0xFF never occurs in UTF-8.
pub(crate) const OBJECTS_END: &[u8] = b"\xff";

/// Opens (creating if needed) the RocksDB instance with all column families.
pub(crate) fn open(path: &Path) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // Every acknowledged write was fsynced, so only a torn last record (a write cut off by a
    // crash, never acknowledged) may be dropped; damage anywhere else is an error at open,
    // not a silent replay up to the damage (RocksDB's default, point-in-time recovery).
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    opts.set_paranoid_checks(true);
    let cfs = ALL_CFS
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    DB::open_cf_descriptors(&opts, path, cfs)
}

/// The handle of a column family created by [`open`].
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    // Every column family in ALL_CFS is created by `open`, so the lookup cannot fail.
    db.cf_handle(name)
        .unwrap_or_else(|| panic!("column family {name} is created when the database is opened"))
}

/// Big-endian encoding, so that RocksDB's byte order is numeric order.
pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(crate) fn decode_u64_key(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| io::Error::other(format!("invalid u64 key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(value).map_err(io::Error::other)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    bincode::deserialize(bytes).map_err(io::Error::other)
}

/// Reads and decodes one value, `None` if the key is absent.
pub(crate) fn get<T: DeserializeOwned>(
    db: &DB,
    cf_name: &str,
    key: &[u8],
) -> io::Result<Option<T>> {
    match db
        .get_pinned_cf(cf(db, cf_name), key)
        .map_err(io::Error::other)?
    {
        Some(bytes) => decode(&bytes).map(Some),
        None => Ok(None),
    }
}

/// Writes a batch on a blocking thread (so that an fsync never stalls the async runtime) and
/// waits for it.
pub(crate) async fn write_blocking(db: &Arc<DB>, batch: WriteBatch, sync: bool) -> io::Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        db.write_opt(batch, &opts).map_err(io::Error::other)
    })
    .await
    .map_err(io::Error::other)?
}

/// A token held by every component that openraft owns and that uses the database (log store,
/// log readers, state machine, snapshot builders). [`Store::shutdown`](crate::Store::shutdown)
/// waits until all tokens are dropped, so that the directory can be reopened right after.
#[derive(Clone)]
pub(crate) struct DbUser {
    _token: tokio::sync::mpsc::Sender<()>,
}

impl DbUser {
    /// A token, and the receiver that yields `None` once every clone of it is dropped.
    pub(crate) fn new() -> (DbUser, tokio::sync::mpsc::Receiver<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (DbUser { _token: tx }, rx)
    }
}
