//! The Raft log and vote, in the `logs` and `raft` column families.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError,
    Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use crate::db::{self, DbUser, CF_LOGS, CF_RAFT, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE};
use crate::types::TypeConfig;

type StResult<T> = Result<T, StorageError<u64>>;

/// Raft log storage on RocksDB.
///
/// Every mutation (append, vote, truncate, purge) is one `WriteBatch`, written on a blocking
/// thread and awaited before the method returns, which keeps all log I/O serialized as openraft
/// requires. Appends, votes, truncations and purges are fsynced when `fsync` is set.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<DB>,
    fsync: bool,
    _user: DbUser,
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>, fsync: bool, user: DbUser) -> Self {
        LogStore {
            db,
            fsync,
            _user: user,
        }
    }

    fn last_purged(&self) -> io::Result<Option<LogId<u64>>> {
        let v: Option<Option<LogId<u64>>> = db::get(&self.db, CF_RAFT, KEY_LAST_PURGED)?;
        Ok(v.flatten())
    }

    fn last_entry_log_id(&self) -> io::Result<Option<LogId<u64>>> {
        let cf = db::cf(&self.db, CF_LOGS);
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(io::Error::other)?;
                let entry: Entry<TypeConfig> = db::decode(&value)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    async fn write(&self, batch: WriteBatch, sync: bool) -> io::Result<()> {
        db::write_blocking(&self.db, batch, sync).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = db::cf(&self.db, CF_LOGS);
        let from = db::u64_key(start);
        let mut entries = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = db::decode_u64_key(&key).map_err(|e| StorageIOError::read_logs(&e))?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                db::decode(&value).map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged_log_id = self
            .last_purged()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        // Purging deletes every entry up to `last_purged`, so a remaining entry is newer.
        let last_log_id = self
            .last_entry_log_id()
            .map_err(|e| StorageIOError::read_logs(&e))?
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StResult<()> {
        let mut batch = WriteBatch::default();
        let bytes = db::encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        batch.put_cf(db::cf(&self.db, CF_RAFT), KEY_VOTE, bytes);
        self.write(batch, self.fsync)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<u64>>> {
        db::get(&self.db, CF_RAFT, KEY_VOTE).map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StResult<()> {
        let mut batch = WriteBatch::default();
        let bytes = db::encode(&committed).map_err(|e| StorageIOError::write(&e))?;
        batch.put_cf(db::cf(&self.db, CF_RAFT), KEY_COMMITTED, bytes);
        // Not synced: a lost `committed` only means openraft re-applies less on restart, and
        // the leader commits the rest again.
        self.write(batch, false)
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId<u64>>> {
        let v: Option<Option<LogId<u64>>> =
            db::get(&self.db, CF_RAFT, KEY_COMMITTED).map_err(|e| StorageIOError::read(&e))?;
        Ok(v.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        {
            let cf = db::cf(&self.db, CF_LOGS);
            for entry in entries {
                let bytes = db::encode(&entry)
                    .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
                batch.put_cf(cf, db::u64_key(entry.log_id.index), bytes);
            }
        }
        match self.write(batch, self.fsync).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(AnyError::new(&e));
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StResult<()> {
        tracing::debug!(%log_id, "truncating raft log");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            db::cf(&self.db, CF_LOGS),
            db::u64_key(log_id.index),
            db::u64_key(u64::MAX),
        );
        self.write(batch, self.fsync)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StResult<()> {
        tracing::debug!(%log_id, "purging raft log");
        let mut batch = WriteBatch::default();
        let bytes = db::encode(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        // The purge pointer and the deletion go in one batch, so no hole can appear.
        batch.put_cf(db::cf(&self.db, CF_RAFT), KEY_LAST_PURGED, bytes);
        batch.delete_range_cf(
            db::cf(&self.db, CF_LOGS),
            db::u64_key(0),
            db::u64_key(log_id.index + 1),
        );
        self.write(batch, self.fsync)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
