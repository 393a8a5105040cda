//! The revisioned key-value state machine (`objects`, `history`, `sm_meta` column families) and
//! its snapshots.
//!
//! Apply is deterministic: everything it writes comes from the log entries. One `apply` call is
//! one atomic RocksDB `WriteBatch` (objects + history + metadata), written without fsync since
//! the Raft log is synced; after the write the events are published to live watchers.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::db::{
    self, DbUser, CF_HISTORY, CF_OBJECTS, CF_SM_META, KEY_COMPACTED, KEY_LAST_APPLIED,
    KEY_LAST_MEMBERSHIP, KEY_REVISION, OBJECTS_END,
};
use crate::types::{
    Broadcast, EventKind, HistoryRecord, Op, OpResult, Precondition, StoredValue, TypeConfig,
    WatchEvent, WriteResponse,
};

type StResult<T> = Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, BasicNode>;

/// History is compacted in steps of up to this many revisions, so that a busy store does not
/// add a range tombstone on every apply.
const COMPACTION_STEP: u64 = 100;

/// State shared between the state machine (owned by openraft) and the [`Store`](crate::Store)
/// handle that serves reads and watches.
pub(crate) struct SmShared {
    pub db: Arc<DB>,
    /// Latest applied revision.
    pub revision: AtomicU64,
    /// Highest revision whose history record is gone (0: nothing compacted).
    pub compacted: AtomicU64,
    /// Live event channel; `None` once the store is shut down.
    events: Mutex<Option<broadcast::Sender<Broadcast>>>,
    snapshot_dir: PathBuf,
    /// Serializes snapshot file writes; holds the last log id of the saved snapshot.
    snapshot_file: Mutex<Option<LogId<u64>>>,
}

impl SmShared {
    /// A receiver of live events, or `None` once the store is shut down.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Broadcast>> {
        lock(&self.events).as_ref().map(|tx| tx.subscribe())
    }

    /// Whether the store is shut down (no new live receivers).
    pub fn is_closed(&self) -> bool {
        lock(&self.events).is_none()
    }

    /// Drops the store's sender: once the state machine is gone too, watchers see the end.
    pub fn close_events(&self) {
        lock(&self.events).take();
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join("current")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves no broken invariant behind.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Settings of the state machine.
#[derive(Clone, Debug)]
pub(crate) struct SmConfig {
    pub snapshot_dir: PathBuf,
    pub history_size: u64,
    pub watch_channel_capacity: usize,
}

/// The state machine given to openraft.
pub(crate) struct StateMachineStore {
    shared: Arc<SmShared>,
    events: broadcast::Sender<Broadcast>,
    history_size: u64,
    last_applied: Option<LogId<u64>>,
    last_membership: Membership,
    revision: u64,
    compacted: u64,
    user: DbUser,
}

/// The persisted metadata of the state machine.
struct SmMeta {
    last_applied: Option<LogId<u64>>,
    last_membership: Membership,
    revision: u64,
    compacted: u64,
}

fn read_meta<F>(get: F) -> io::Result<SmMeta>
where
    F: Fn(&[u8]) -> io::Result<Option<Vec<u8>>>,
{
    fn field<T: serde::de::DeserializeOwned>(raw: Option<Vec<u8>>) -> io::Result<Option<T>> {
        raw.map(|b| db::decode(&b)).transpose()
    }
    Ok(SmMeta {
        last_applied: field::<Option<LogId<u64>>>(get(KEY_LAST_APPLIED)?)?.flatten(),
        last_membership: field(get(KEY_LAST_MEMBERSHIP)?)?.unwrap_or_default(),
        revision: field(get(KEY_REVISION)?)?.unwrap_or(0),
        compacted: field(get(KEY_COMPACTED)?)?.unwrap_or(0),
    })
}

fn put_meta(batch: &mut WriteBatch, db: &DB, meta: &SmMeta) -> io::Result<()> {
    let cf = db::cf(db, CF_SM_META);
    batch.put_cf(cf, KEY_LAST_APPLIED, db::encode(&meta.last_applied)?);
    batch.put_cf(cf, KEY_LAST_MEMBERSHIP, db::encode(&meta.last_membership)?);
    batch.put_cf(cf, KEY_REVISION, db::encode(&meta.revision)?);
    batch.put_cf(cf, KEY_COMPACTED, db::encode(&meta.compacted)?);
    Ok(())
}

/// The snapshot data sent to followers: every object (raw RocksDB key and value) and the
/// revision they are at.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    revision: u64,
    objects: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The snapshot file `{snapshot_dir}/current`.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

impl StateMachineStore {
    /// Loads the state machine from the database and the snapshot directory.
    pub(crate) fn open(
        db: Arc<DB>,
        cfg: SmConfig,
        user: DbUser,
    ) -> io::Result<(StateMachineStore, Arc<SmShared>)> {
        fs::create_dir_all(&cfg.snapshot_dir)?;
        let meta = read_meta(|key| {
            db.get_cf(db::cf(&db, CF_SM_META), key)
                .map_err(io::Error::other)
        })?;
        let snapshot_path = cfg.snapshot_dir.join("current");
        let snapshot_log_id = read_snapshot_file(&snapshot_path)?.and_then(|f| f.meta.last_log_id);
        let (events, _) = broadcast::channel(cfg.watch_channel_capacity);
        let shared = Arc::new(SmShared {
            db,
            revision: AtomicU64::new(meta.revision),
            compacted: AtomicU64::new(meta.compacted),
            events: Mutex::new(Some(events.clone())),
            snapshot_dir: cfg.snapshot_dir,
            snapshot_file: Mutex::new(snapshot_log_id),
        });
        let sm = StateMachineStore {
            shared: shared.clone(),
            events,
            history_size: cfg.history_size,
            last_applied: meta.last_applied,
            last_membership: meta.last_membership,
            revision: meta.revision,
            compacted: meta.compacted,
            user,
        };
        Ok((sm, shared))
    }
}

/// The changes of one `apply` call, built before anything is written.
struct ApplyBatch<'a> {
    db: &'a DB,
    batch: WriteBatch,
    /// Values written earlier in this batch (`None`: deleted), read before RocksDB.
    overlay: HashMap<String, Option<StoredValue>>,
    revision: u64,
    events: Vec<WatchEvent>,
}

impl ApplyBatch<'_> {
    fn current(&self, key: &str) -> io::Result<Option<StoredValue>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        match self
            .db
            .get_pinned_cf(db::cf(self.db, CF_OBJECTS), key.as_bytes())
            .map_err(io::Error::other)?
        {
            Some(bytes) => db::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Applies one op of a request: a `Put` or `Delete` if its precondition holds, a `Txn` if
    /// all of it can be.
    fn apply_op(&mut self, op: Op) -> io::Result<OpResult> {
        match op {
            Op::Put {
                key,
                value,
                precondition,
            } => self.apply_write(key, Some(value), precondition),
            Op::Delete { key, precondition } => self.apply_write(key, None, precondition),
            Op::Txn { compares, ops } => self.apply_txn(compares, ops),
        }
    }

    /// An [`Op::Txn`]: every condition is checked first (the compares against the current
    /// state, then each op's precondition against the state the Txn's earlier ops would leave),
    /// and only if all hold are the ops applied, so that a failed Txn writes nothing. Each op
    /// is then applied as a lone one is: its own revision, history record and event.
    fn apply_txn(
        &mut self,
        compares: Vec<(String, Precondition)>,
        ops: Vec<Op>,
    ) -> io::Result<OpResult> {
        let mut writes = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put {
                    key,
                    value,
                    precondition,
                } => writes.push((key, Some(value), precondition)),
                Op::Delete { key, precondition } => writes.push((key, None, precondition)),
                Op::Txn { .. } => {
                    return Ok(OpResult::Invalid {
                        reason: "a Txn may not contain a Txn".to_owned(),
                    })
                }
            }
        }
        let failed = |failed: usize, key: &str, reason: OpResult| OpResult::TxnFailed {
            failed,
            key: key.to_owned(),
            reason: Box::new(reason),
        };
        for (i, (key, precondition)) in compares.iter().enumerate() {
            if let Some(reason) = check(*precondition, self.current(key)?.as_ref(), false) {
                return Ok(failed(i, key, reason));
            }
        }
        // A dry run: what each key written by the Txn would hold (preconditions look only at
        // existence and `mod_revision`).
        let mut planned: HashMap<&str, Option<StoredValue>> = HashMap::new();
        for (i, (key, value, precondition)) in writes.iter().enumerate() {
            let revision = self.revision + 1 + i as u64;
            let current = match planned.get(key.as_str()) {
                Some(v) => v.clone(),
                None => self.current(key)?,
            };
            if let Some(reason) = check(*precondition, current.as_ref(), value.is_none()) {
                return Ok(failed(compares.len() + i, key, reason));
            }
            let next = value.as_ref().map(|_| StoredValue {
                value: Bytes::new(),
                create_revision: current.as_ref().map_or(revision, |c| c.create_revision),
                mod_revision: revision,
            });
            planned.insert(key, next);
        }
        let mut results = Vec::with_capacity(writes.len());
        for (key, value, precondition) in writes {
            match self.apply_write(key, value, precondition)? {
                ok @ OpResult::Ok { .. } => results.push(ok),
                // Impossible (the dry run checked the same conditions in the same order); an
                // error stops the state machine rather than leave half a Txn applied.
                other => {
                    return Err(io::Error::other(format!(
                        "a Txn op failed after its dry run succeeded: {other:?}"
                    )))
                }
            }
        }
        Ok(OpResult::Txn { results })
    }

    /// A put (`value`) or delete (`None`) of `key`, if `precondition` holds.
    fn apply_write(
        &mut self,
        key: String,
        value: Option<Vec<u8>>,
        precondition: Precondition,
    ) -> io::Result<OpResult> {
        let current = self.current(&key)?;
        if let Some(rejected) = check(precondition, current.as_ref(), value.is_none()) {
            return Ok(rejected);
        }
        let revision = self.revision + 1;
        let (kind, value) = match value {
            Some(value) => {
                let stored = StoredValue {
                    value: Bytes::from(value),
                    create_revision: current.as_ref().map_or(revision, |c| c.create_revision),
                    mod_revision: revision,
                };
                self.batch.put_cf(
                    db::cf(self.db, CF_OBJECTS),
                    key.as_bytes(),
                    db::encode(&stored)?,
                );
                (EventKind::Put, Some(stored))
            }
            None => {
                self.batch
                    .delete_cf(db::cf(self.db, CF_OBJECTS), key.as_bytes());
                (EventKind::Delete, None)
            }
        };
        let record = HistoryRecord {
            key,
            kind,
            value,
            prev: current,
        };
        self.batch.put_cf(
            db::cf(self.db, CF_HISTORY),
            db::u64_key(revision),
            db::encode(&record)?,
        );
        let event = record.to_event(revision);
        self.overlay.insert(record.key, record.value);
        self.revision = revision;
        let prev = event.prev.clone();
        self.events.push(event);
        Ok(OpResult::Ok { revision, prev })
    }
}

/// The new compacted revision once the store reaches `revision`, if history must be trimmed:
/// it keeps at most `history_size` records, trimmed in steps of up to [`COMPACTION_STEP`].
fn compaction_target(compacted: u64, history_size: u64, revision: u64) -> Option<u64> {
    if revision - compacted <= history_size {
        return None;
    }
    let step = COMPACTION_STEP.min(history_size / 10);
    Some(revision - (history_size - step))
}

/// Checks a precondition against the current value; `Some(result)` rejects the op.
fn check(
    precondition: Precondition,
    current: Option<&StoredValue>,
    is_delete: bool,
) -> Option<OpResult> {
    match (precondition, current) {
        (_, None) if is_delete => Some(OpResult::NotFound),
        (Precondition::MustExist | Precondition::ModRevision(_), None) => Some(OpResult::NotFound),
        (Precondition::MustNotExist, Some(_)) => Some(OpResult::AlreadyExists),
        (Precondition::ModRevision(want), Some(cur)) if cur.mod_revision != want => {
            Some(OpResult::Conflict {
                current_mod_revision: cur.mod_revision,
            })
        }
        _ => None,
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StResult<(Option<LogId<u64>>, Membership)> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StResult<Vec<WriteResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.shared.db.clone();
        let mut ab = ApplyBatch {
            db: &db,
            batch: WriteBatch::default(),
            overlay: HashMap::new(),
            revision: self.revision,
            events: Vec::new(),
        };
        let mut last_applied = self.last_applied;
        let mut last_membership = self.last_membership.clone();
        let mut responses = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            last_applied = Some(log_id);
            let response = match entry.payload {
                EntryPayload::Blank => WriteResponse::default(),
                EntryPayload::Normal(request) => {
                    let mut results = Vec::with_capacity(request.ops.len());
                    for op in request.ops {
                        results.push(
                            ab.apply_op(op)
                                .map_err(|e| StorageIOError::apply(log_id, &e))?,
                        );
                    }
                    WriteResponse { results }
                }
                EntryPayload::Membership(membership) => {
                    last_membership = StoredMembership::new(Some(log_id), membership);
                    WriteResponse::default()
                }
            };
            responses.push(response);
        }

        let revision = ab.revision;
        let compacted = match compaction_target(self.compacted, self.history_size, revision) {
            Some(target) => {
                ab.batch.delete_range_cf(
                    db::cf(&db, CF_HISTORY),
                    db::u64_key(self.compacted + 1),
                    db::u64_key(target + 1),
                );
                target
            }
            None => self.compacted,
        };
        let meta = SmMeta {
            last_applied,
            last_membership,
            revision,
            compacted,
        };
        put_meta(&mut ab.batch, &db, &meta).map_err(|e| StorageIOError::write_state_machine(&e))?;
        let ApplyBatch { batch, events, .. } = ab;
        db.write(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;

        self.last_applied = meta.last_applied;
        self.last_membership = meta.last_membership;
        self.revision = revision;
        self.compacted = compacted;
        self.shared.compacted.store(compacted, Ordering::Release);
        self.shared.revision.store(revision, Ordering::Release);
        // Published only now that the batch is in RocksDB: a watcher that subscribes and then
        // reads history cannot miss an event.
        for event in events {
            // An error only means that nobody is watching.
            let _ = self.events.send(Broadcast::Event(Arc::new(event)));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            _user: self.user.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StResult<()> {
        tracing::info!(snapshot = %meta, "installing snapshot");
        let data = snapshot.into_inner();
        let payload: SnapshotPayload = db::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let db = self.shared.db.clone();
        let new_meta = SmMeta {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            revision: payload.revision,
            // The history before the snapshot is not part of it.
            compacted: payload.revision,
        };
        let mut batch = WriteBatch::default();
        {
            let objects = db::cf(&db, CF_OBJECTS);
            batch.delete_range_cf(objects, b"".as_slice(), OBJECTS_END);
            batch.delete_range_cf(
                db::cf(&db, CF_HISTORY),
                db::u64_key(0),
                db::u64_key(u64::MAX),
            );
            for (key, value) in &payload.objects {
                batch.put_cf(objects, key, value);
            }
        }
        put_meta(&mut batch, &db, &new_meta)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        db::write_blocking(&db, batch, true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        let shared = self.shared.clone();
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        tokio::task::spawn_blocking(move || save_snapshot_file(&shared, &file))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        self.last_applied = new_meta.last_applied;
        self.last_membership = new_meta.last_membership;
        self.revision = new_meta.revision;
        self.compacted = new_meta.compacted;
        self.shared
            .compacted
            .store(new_meta.compacted, Ordering::Release);
        self.shared
            .revision
            .store(new_meta.revision, Ordering::Release);
        let _ = self.events.send(Broadcast::Reset {
            revision: new_meta.revision,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot<TypeConfig>>> {
        let path = self.shared.snapshot_path();
        let file = tokio::task::spawn_blocking(move || read_snapshot_file(&path))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}

/// Builds snapshots from a consistent RocksDB snapshot of `objects` and `sm_meta`.
pub(crate) struct SnapshotBuilder {
    shared: Arc<SmShared>,
    _user: DbUser,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StResult<Snapshot<TypeConfig>> {
        let shared = self.shared.clone();
        let snapshot = tokio::task::spawn_blocking(move || build_snapshot(&shared))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(snapshot)
    }
}

fn build_snapshot(shared: &SmShared) -> io::Result<Snapshot<TypeConfig>> {
    let db = &shared.db;
    let snap = db.snapshot();
    let meta = read_meta(|key| {
        snap.get_cf(db::cf(db, CF_SM_META), key)
            .map_err(io::Error::other)
    })?;
    // Make everything in this view durable before openraft purges the logs it covers: the state
    // machine's own writes are not synced.
    db.flush_wal(true).map_err(io::Error::other)?;
    let mut objects = Vec::new();
    for item in snap.iterator_cf(db::cf(db, CF_OBJECTS), IteratorMode::Start) {
        let (key, value) = item.map_err(io::Error::other)?;
        objects.push((key.into_vec(), value.into_vec()));
    }
    drop(snap);
    let data = db::encode(&SnapshotPayload {
        revision: meta.revision,
        objects,
    })?;

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let snapshot_id = match &meta.last_applied {
        Some(log_id) => format!("{log_id}-r{}-{nanos}", meta.revision),
        None => format!("empty-{nanos}"),
    };
    let snapshot_meta = SnapshotMeta {
        last_log_id: meta.last_applied,
        last_membership: meta.last_membership,
        snapshot_id,
    };
    let file = SnapshotFile {
        meta: snapshot_meta,
        data,
    };
    save_snapshot_file(shared, &file)?;
    tracing::info!(snapshot = %file.meta, bytes = file.data.len(), "built snapshot");
    Ok(Snapshot {
        meta: file.meta,
        snapshot: Box::new(Cursor::new(file.data)),
    })
}

/// Atomically replaces the snapshot file (tmp file, fsync, rename, fsync of the directory),
/// unless a newer snapshot is already saved.
fn save_snapshot_file(shared: &SmShared, file: &SnapshotFile) -> io::Result<()> {
    let mut saved = lock(&shared.snapshot_file);
    if saved.is_some() && *saved > file.meta.last_log_id {
        tracing::info!(snapshot = %file.meta, "not saving snapshot: a newer one is saved");
        return Ok(());
    }
    let path = shared.snapshot_path();
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&db::encode(file)?)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(&shared.snapshot_dir)?.sync_all()?;
    *saved = file.meta.last_log_id;
    Ok(())
}

fn read_snapshot_file(path: &Path) -> io::Result<Option<SnapshotFile>> {
    match fs::read(path) {
        Ok(bytes) => db::decode(&bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// One chunk of history read for a watch.
pub(crate) struct HistoryChunk {
    /// The events of the chunk whose key has the watched prefix.
    pub events: Vec<WatchEvent>,
    /// The highest revision read (`after` if none).
    pub last_revision: u64,
    /// Fewer than `limit` records followed `after`: the history was read to its end.
    pub exhausted: bool,
}

/// Reads up to `limit` history records after revision `after`, from one consistent RocksDB
/// snapshot; fails with `Compacted` if records after `after` are gone.
pub(crate) fn read_history(
    db: &DB,
    after: u64,
    limit: usize,
    prefix: &str,
) -> Result<HistoryChunk, crate::StoreError> {
    use crate::StoreError;
    let snap = db.snapshot();
    let compacted: u64 = match snap
        .get_cf(db::cf(db, CF_SM_META), KEY_COMPACTED)
        .map_err(|e| StoreError::storage("reading compacted revision", e))?
    {
        Some(bytes) => {
            db::decode(&bytes).map_err(|e| StoreError::storage("decoding compacted revision", e))?
        }
        None => 0,
    };
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted,
        });
    }
    let from = db::u64_key(after.saturating_add(1));
    let mut chunk = HistoryChunk {
        events: Vec::new(),
        last_revision: after,
        exhausted: true,
    };
    let records = snap.iterator_cf(
        db::cf(db, CF_HISTORY),
        IteratorMode::From(&from, rocksdb::Direction::Forward),
    );
    for (read, item) in records.enumerate() {
        if read == limit {
            chunk.exhausted = false;
            break;
        }
        let (key, value) = item.map_err(|e| StoreError::storage("reading history", e))?;
        let revision =
            db::decode_u64_key(&key).map_err(|e| StoreError::storage("reading history", e))?;
        let record: HistoryRecord =
            db::decode(&value).map_err(|e| StoreError::storage("decoding history record", e))?;
        chunk.last_revision = revision;
        if record.key.starts_with(prefix) {
            chunk.events.push(record.to_event(revision));
        }
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(mod_revision: u64) -> StoredValue {
        StoredValue {
            value: Bytes::from_static(b"v"),
            create_revision: 1,
            mod_revision,
        }
    }

    #[test]
    fn preconditions() {
        use Precondition as P;
        let v = value(5);
        let conflict = Some(OpResult::Conflict {
            current_mod_revision: 5,
        });
        for is_delete in [false, true] {
            assert_eq!(
                check(P::MustNotExist, Some(&v), is_delete),
                Some(OpResult::AlreadyExists)
            );
            assert_eq!(
                check(P::MustExist, None, is_delete),
                Some(OpResult::NotFound)
            );
            assert_eq!(
                check(P::ModRevision(5), None, is_delete),
                Some(OpResult::NotFound)
            );
            assert_eq!(check(P::ModRevision(4), Some(&v), is_delete), conflict);
            assert_eq!(check(P::ModRevision(5), Some(&v), is_delete), None);
            assert_eq!(check(P::MustExist, Some(&v), is_delete), None);
            assert_eq!(check(P::None, Some(&v), is_delete), None);
        }
        assert_eq!(check(P::None, None, false), None);
        assert_eq!(check(P::MustNotExist, None, false), None);
        assert_eq!(check(P::None, None, true), Some(OpResult::NotFound));
        assert_eq!(check(P::MustNotExist, None, true), Some(OpResult::NotFound));
    }

    #[test]
    fn history_compaction_keeps_at_most_history_size() {
        // Small histories are trimmed on every revision past the limit.
        assert_eq!(compaction_target(0, 5, 5), Option::None);
        assert_eq!(compaction_target(0, 5, 6), Some(1));
        assert_eq!(compaction_target(1, 5, 9), Some(4));
        // Large ones in steps of 100.
        assert_eq!(compaction_target(0, 10_000, 10_000), Option::None);
        assert_eq!(compaction_target(0, 10_000, 10_001), Some(101));
        assert_eq!(compaction_target(101, 10_000, 10_101), Option::None);
        assert_eq!(compaction_target(101, 10_000, 10_102), Some(202));
        // No history at all.
        assert_eq!(compaction_target(0, 0, 1), Some(1));
        let mut compacted = 0;
        for revision in 1..50_000 {
            if let Some(c) = compaction_target(compacted, 10_000, revision) {
                assert!(c > compacted);
                compacted = c;
            }
            assert!(revision - compacted <= 10_000);
        }
    }
}
