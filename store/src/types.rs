//! Data types of the store: the public key-value types, the Raft request/response carried in
//! log entries, and the records persisted in RocksDB.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Openraft type configuration of the wasmctl store.
    pub(crate) TypeConfig:
        D = WriteRequest,
        R = WriteResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A key with its value and the revisions at which it was created and last modified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: u64,
    /// Revision of the last write to this key.
    pub mod_revision: u64,
}

/// One write operation. Ops are applied in order, each independently.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        precondition: Precondition,
    },
    Delete {
        key: String,
        precondition: Precondition,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// Condition checked against the current value of the key before an op is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// No condition.
    None,
    /// The key must not exist (create).
    MustNotExist,
    /// The key must exist.
    MustExist,
    /// The key must exist with exactly this `mod_revision` (compare-and-swap).
    ModRevision(u64),
}

/// Outcome of one [`Op`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// The op was applied at `revision`; `prev` is the value it replaced or deleted.
    Ok {
        revision: u64,
        prev: Option<KeyValue>,
    },
    /// The key does not exist (delete, `MustExist` or `ModRevision`).
    NotFound,
    /// The key exists (`MustNotExist`).
    AlreadyExists,
    /// The key's `mod_revision` differs from the one required.
    Conflict { current_mod_revision: u64 },
}

/// The result of [`Store::range`](crate::Store::range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResult {
    pub items: Vec<KeyValue>,
    /// More keys with the prefix follow the last returned item.
    pub more: bool,
    /// The store revision of the snapshot the items were read from.
    pub revision: u64,
}

/// One change of one key, as delivered by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub revision: u64,
    pub kind: EventKind,
    pub key: String,
    /// The new value (for `Put`).
    pub value: Option<KeyValue>,
    /// The value before the change, if the key existed.
    pub prev: Option<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// Application data of a Raft log entry: a batch of ops applied in order.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct WriteRequest {
    pub ops: Vec<Op>,
}

impl fmt::Debug for WriteRequest {
    /// A summary (kinds, keys and value sizes) so that logs never carry object payloads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for op in &self.ops {
            match op {
                Op::Put {
                    key,
                    value,
                    precondition,
                } => list.entry(&format_args!(
                    "put {key:?} ({} bytes, {precondition:?})",
                    value.len()
                )),
                Op::Delete { key, precondition } => {
                    list.entry(&format_args!("delete {key:?} ({precondition:?})"))
                }
            };
        }
        list.finish()
    }
}

/// Result of applying one Raft log entry; empty for blank and membership entries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct WriteResponse {
    pub results: Vec<OpResult>,
}

/// A value as stored in the `objects` column family (the key is the RocksDB key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredValue {
    pub value: Bytes,
    pub create_revision: u64,
    pub mod_revision: u64,
}

impl StoredValue {
    pub fn to_key_value(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

/// One event as stored in the `history` column family under its revision.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HistoryRecord {
    pub key: String,
    pub kind: EventKind,
    pub value: Option<StoredValue>,
    pub prev: Option<StoredValue>,
}

impl HistoryRecord {
    pub fn to_event(&self, revision: u64) -> WatchEvent {
        WatchEvent {
            revision,
            kind: self.kind,
            key: self.key.clone(),
            value: self.value.as_ref().map(|v| v.to_key_value(&self.key)),
            prev: self.prev.as_ref().map(|v| v.to_key_value(&self.key)),
        }
    }
}

/// What the state machine publishes to live watchers.
#[derive(Clone, Debug)]
pub(crate) enum Broadcast {
    /// One applied event, published after it is durable in RocksDB.
    Event(Arc<WatchEvent>),
    /// The state was replaced by an installed snapshot at `revision`: events up to it are lost.
    Reset { revision: u64 },
}
