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

/// One write operation. The ops of one [`Store::write`](crate::Store::write) are applied in
/// order, each independently, except that a [`Op::Txn`] is applied all or nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        /// Encoded as one byte string (bincode: the same bytes as a sequence of `u8`, so
        /// logs written before read the same, but one copy instead of a call per byte).
        #[serde(with = "byte_string")]
        value: Vec<u8>,
        precondition: Precondition,
    },
    Delete {
        key: String,
        precondition: Precondition,
    },
    /// An atomic transaction (etcd's `Txn` without its else branch): if every compare holds
    /// (each a key and a condition on its current value) and then every op's own precondition
    /// holds when it comes to apply (in order, after the earlier ops of the Txn), all of `ops`
    /// are applied, each at its own revision with its own watch event, and the result is
    /// [`OpResult::Txn`]; otherwise nothing is applied and the result is
    /// [`OpResult::TxnFailed`]. `ops` may not contain a Txn ([`OpResult::Invalid`]).
    Txn {
        compares: Vec<(String, Precondition)>,
        ops: Vec<Op>,
    },
}

impl Op {
    /// The key a `Put` or `Delete` writes (`None` for a `Txn`).
    pub fn key(&self) -> Option<&str> {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => Some(key),
            Op::Txn { .. } => None,
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
    /// A [`Op::Txn`] was applied: one `Ok` per op, in order.
    Txn { results: Vec<OpResult> },
    /// A [`Op::Txn`] was not applied (nothing of it was): `failed` is the index of the first
    /// condition that did not hold, counting the compares first and then the ops (an op at
    /// `failed - compares.len()`); `key` is its key, and `reason` why (`NotFound`,
    /// `AlreadyExists` or `Conflict`).
    TxnFailed {
        failed: usize,
        key: String,
        reason: Box<OpResult>,
    },
    /// The op is malformed and was not applied (a Txn inside a Txn).
    Invalid { reason: String },
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
        f.debug_list()
            .entries(self.ops.iter().map(OpSummary))
            .finish()
    }
}

/// The Debug summary of one op: kind, key, value size and precondition, never the value.
struct OpSummary<'a>(&'a Op);

impl fmt::Debug for OpSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Op::Put {
                key,
                value,
                precondition,
            } => write!(f, "put {key:?} ({} bytes, {precondition:?})", value.len()),
            Op::Delete { key, precondition } => write!(f, "delete {key:?} ({precondition:?})"),
            Op::Txn { compares, ops } => {
                let compares: Vec<_> = compares.iter().map(CompareSummary).collect();
                let ops: Vec<_> = ops.iter().map(OpSummary).collect();
                f.debug_struct("txn")
                    .field("if", &compares)
                    .field("then", &ops)
                    .finish()
            }
        }
    }
}

struct CompareSummary<'a>(&'a (String, Precondition));

impl fmt::Debug for CompareSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (key, precondition) = self.0;
        write!(f, "{key:?} {precondition:?}")
    }
}

/// Result of applying one Raft log entry (one result per op of the request); empty for blank
/// and membership entries.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_request_debug_is_a_summary() {
        let req = WriteRequest {
            ops: vec![
                Op::Put {
                    key: "a".into(),
                    value: b"secret".to_vec(),
                    precondition: Precondition::None,
                },
                Op::Txn {
                    compares: vec![("b".into(), Precondition::ModRevision(3))],
                    ops: vec![
                        Op::Put {
                            key: "c".into(),
                            value: b"secret".to_vec(),
                            precondition: Precondition::MustNotExist,
                        },
                        Op::Delete {
                            key: "d".into(),
                            precondition: Precondition::MustExist,
                        },
                    ],
                },
            ],
        };
        assert_eq!(
            format!("{req:?}"),
            r#"[put "a" (6 bytes, None), txn { if: ["b" ModRevision(3)], then: [put "c" (6 bytes, MustNotExist), delete "d" (MustExist)] }]"#
        );
    }
}

/// serde of a `Vec<u8>` as a byte string rather than a sequence (what `serde_bytes` does).
mod byte_string {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Bounded by what the input holds: bincode checks the length against it.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }

    #[cfg(test)]
    mod tests {
        use serde::{Deserialize, Serialize};

        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Old {
            value: Vec<u8>,
        }

        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct New {
            #[serde(with = "super")]
            value: Vec<u8>,
        }

        #[test]
        fn a_byte_string_encodes_like_the_old_sequence_in_bincode() {
            let value: Vec<u8> = (0..=255).collect();
            let old = bincode::serialize(&Old {
                value: value.clone(),
            })
            .unwrap();
            let new = bincode::serialize(&New {
                value: value.clone(),
            })
            .unwrap();
            assert_eq!(old, new);
            let back: New = bincode::deserialize(&old).unwrap();
            assert_eq!(back.value, value);
        }
    }
}
