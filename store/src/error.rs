//! The store's error type, and conversions from openraft's and RocksDB's errors.

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{BasicNode, StorageError as RaftStorageError};

/// Errors returned by [`Store`](crate::Store) and [`WatchStream`](crate::WatchStream).
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The history needed to serve a watch from `requested`, or a read as of it, is gone.
    #[error(
        "revision {requested} is compacted (history is only kept after revision {compacted}): \
         list again and watch from the listed revision"
    )]
    Compacted { requested: u64, compacted: u64 },

    /// A read as of a revision that the store has not reached.
    #[error("revision {requested} is newer than the store's revision {current}")]
    FutureRevision { requested: u64, current: u64 },

    /// A live watcher fell further behind than the watch channel holds and was dropped.
    #[error("watch fell behind the event stream and was dropped: list again and watch from the listed revision")]
    WatchLagged,

    /// This node is not the Raft leader; the message names the leader if it is known.
    #[error("this node is not the store leader: {0}")]
    NotLeader(String),

    /// A write was sent but not acknowledged by a majority in time: it may or may not take
    /// effect (the client must read to find out).
    #[error("store write outcome unknown: {0}")]
    Timeout(String),

    /// A request the leader refused before doing anything (a bad membership change).
    #[error("{0}")]
    Invalid(String),

    /// The store cannot serve requests now (shut down, no quorum, timed out starting).
    #[error("store unavailable: {0}")]
    Unavailable(String),

    /// RocksDB, the snapshot file or (de)serialization failed.
    #[error("store storage error: {0}")]
    Storage(String),

    /// A [`StoreConfig`](crate::StoreConfig) field is invalid.
    #[error("invalid store config: {0}")]
    InvalidConfig(String),
}

impl StoreError {
    pub(crate) fn storage(context: &str, e: impl std::fmt::Display) -> Self {
        StoreError::Storage(format!("{context}: {e}"))
    }
}

fn forward_to_leader(f: &ForwardToLeader<u64, BasicNode>) -> StoreError {
    let msg = match (&f.leader_id, &f.leader_node) {
        (Some(id), Some(node)) => format!("the leader is node {id} at {}", node.addr),
        (Some(id), None) => format!("the leader is node {id}"),
        _ => "no leader is known".to_owned(),
    };
    StoreError::NotLeader(msg)
}

impl From<RaftError<u64, ClientWriteError<u64, BasicNode>>> for StoreError {
    fn from(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward_to_leader(&f),
            RaftError::APIError(e) => StoreError::Unavailable(e.to_string()),
            RaftError::Fatal(f) => StoreError::Unavailable(format!("raft stopped: {f}")),
        }
    }
}

impl From<RaftError<u64, CheckIsLeaderError<u64, BasicNode>>> for StoreError {
    fn from(e: RaftError<u64, CheckIsLeaderError<u64, BasicNode>>) -> Self {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => forward_to_leader(&f),
            RaftError::APIError(e) => StoreError::Unavailable(e.to_string()),
            RaftError::Fatal(f) => StoreError::Unavailable(format!("raft stopped: {f}")),
        }
    }
}

impl From<RaftError<u64, InitializeError<u64, BasicNode>>> for StoreError {
    fn from(e: RaftError<u64, InitializeError<u64, BasicNode>>) -> Self {
        StoreError::Unavailable(format!("initializing the raft cluster failed: {e}"))
    }
}

impl From<RaftStorageError<u64>> for StoreError {
    fn from(e: RaftStorageError<u64>) -> Self {
        StoreError::Storage(e.to_string())
    }
}
