//! Reads from one RocksDB snapshot: a key together with the revision it was read at, and key
//! ranges at the current revision or at a past one that the history still covers.
//!
//! A range at a past revision `R` is the current objects with the history newer than `R`
//! undone: the first history record of a key after `R` holds (as `prev`) the key's value at `R`,
//! so those keys take that value (or are absent), and every other key is unchanged since `R`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use rocksdb::{Direction, IteratorMode, Snapshot, DB};
use serde::Deserialize;

use crate::db::{self, CF_HISTORY, CF_OBJECTS, CF_SM_META, KEY_COMPACTED, KEY_REVISION};
use crate::types::{HistoryRecord, KeyValue, RangeResult, StoredValue};
use crate::StoreError;

/// The leading field of an encoded [`HistoryRecord`]: decoding only it skips the values of
/// records that the read does not need (bincode reads fields in order and, with its default
/// options, ignores the trailing bytes).
#[derive(Deserialize)]
struct HistoryKey {
    key: String,
}

/// A `u64` of `sm_meta` as of `snap` (0 if absent).
fn meta_u64(db: &DB, snap: &Snapshot<'_>, key: &[u8], what: &str) -> Result<u64, StoreError> {
    match snap
        .get_cf(db::cf(db, CF_SM_META), key)
        .map_err(|e| StoreError::storage(&format!("reading the {what}"), e))?
    {
        Some(bytes) => {
            db::decode(&bytes).map_err(|e| StoreError::storage(&format!("decoding the {what}"), e))
        }
        None => Ok(0),
    }
}

/// The value of `key` and the store revision, both from one RocksDB snapshot: nothing was
/// written to `key` after the value and up to the revision.
pub(crate) fn read_key(db: &DB, key: &str) -> Result<(Option<KeyValue>, u64), StoreError> {
    let snap = db.snapshot();
    let revision = meta_u64(db, &snap, KEY_REVISION, "revision")?;
    let value = match snap
        .get_pinned_cf(db::cf(db, CF_OBJECTS), key.as_bytes())
        .map_err(|e| StoreError::storage(&format!("reading key {key:?}"), e))?
    {
        Some(bytes) => Some(
            db::decode::<StoredValue>(&bytes)
                .map_err(|e| StoreError::storage(&format!("decoding key {key:?}"), e))?
                .to_key_value(key),
        ),
        None => None,
    };
    Ok((value, revision))
}

/// Keys starting with `prefix`, strictly after `start_after`, at most `limit` (0: no limit),
/// from one RocksDB snapshot, as of revision `at` (`None`: the snapshot's own revision).
///
/// Fails with `Compacted` if `at` is below the compacted revision (the history needed to undo
/// the later writes is gone), and with `FutureRevision` if the store has not reached `at`.
pub(crate) fn read_range(
    db: &DB,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
    at: Option<u64>,
) -> Result<RangeResult, StoreError> {
    let snap = db.snapshot();
    let current = meta_u64(db, &snap, KEY_REVISION, "revision")?;
    let revision = at.unwrap_or(current);
    if revision > current {
        return Err(StoreError::FutureRevision {
            requested: revision,
            current,
        });
    }
    let after = |key: &str| key.starts_with(prefix) && start_after.is_none_or(|a| key > a);
    // The values at `revision` of the keys written since (`None`: absent at `revision`).
    let mut undo: BTreeMap<String, Option<StoredValue>> = BTreeMap::new();
    if revision < current {
        let compacted = meta_u64(db, &snap, KEY_COMPACTED, "compacted revision")?;
        if revision < compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        let from = db::u64_key(revision + 1);
        let records = snap.iterator_cf(
            db::cf(db, CF_HISTORY),
            IteratorMode::From(&from, Direction::Forward),
        );
        for item in records {
            let (_, bytes) = item.map_err(|e| StoreError::storage("reading history", e))?;
            let HistoryKey { key } = db::decode(&bytes)
                .map_err(|e| StoreError::storage("decoding history record", e))?;
            if !after(&key) || undo.contains_key(&key) {
                continue;
            }
            let record: HistoryRecord = db::decode(&bytes)
                .map_err(|e| StoreError::storage("decoding history record", e))?;
            undo.insert(key, record.prev);
        }
    }

    let mut out = RangeResult {
        items: Vec::new(),
        more: false,
        revision,
    };
    // Adds one item; `Break` once `limit` items are in and one more exists.
    let mut emit = |key: &str, value: &StoredValue| {
        if limit != 0 && out.items.len() == limit {
            out.more = true;
            return ControlFlow::Break(());
        }
        out.items.push(value.to_key_value(key));
        ControlFlow::Continue(())
    };
    // Start at the prefix, or just after `start_after` if that is further.
    let from: &str = match start_after {
        Some(a) if a >= prefix => a,
        _ => prefix,
    };
    let objects = snap.iterator_cf(
        db::cf(db, CF_OBJECTS),
        IteratorMode::From(from.as_bytes(), Direction::Forward),
    );
    // A merge, in key order, of the current objects and the undone keys (which replace them).
    let mut undone = undo.into_iter().peekable();
    'merge: {
        for item in objects {
            let (key, bytes) = item.map_err(|e| StoreError::storage("reading a range", e))?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let key =
                std::str::from_utf8(&key).map_err(|e| StoreError::storage("decoding a key", e))?;
            if !after(key) {
                continue;
            }
            // Keys that existed at `revision` and are deleted now.
            while let Some((k, v)) = undone.next_if(|(k, _)| k.as_str() < key) {
                if let Some(v) = v {
                    if emit(&k, &v).is_break() {
                        break 'merge;
                    }
                }
            }
            let value = match undone.next_if(|(k, _)| k == key) {
                Some((_, at_revision)) => at_revision,
                None => Some(
                    db::decode(&bytes)
                        .map_err(|e| StoreError::storage(&format!("decoding key {key:?}"), e))?,
                ),
            };
            if let Some(v) = value {
                if emit(key, &v).is_break() {
                    break 'merge;
                }
            }
        }
        for (k, v) in undone {
            if let Some(v) = v {
                if emit(&k, &v).is_break() {
                    break 'merge;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::types::EventKind;

    #[test]
    fn the_key_of_a_history_record_decodes_alone() {
        let value = StoredValue {
            value: Bytes::from_static(b"a large value"),
            create_revision: 3,
            mod_revision: 7,
        };
        let record = HistoryRecord {
            key: "registry/pods/default/p".to_owned(),
            kind: EventKind::Put,
            value: Some(value.clone()),
            prev: Some(value),
        };
        let bytes = db::encode(&record).unwrap();
        let HistoryKey { key } = db::decode(&bytes).unwrap();
        assert_eq!(key, record.key);
    }
}
