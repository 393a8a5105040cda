//! The wasmctl cluster store: an etcd-like, revisioned key-value store replicated with openraft
//! and kept in RocksDB.
//!
//! - Every write goes through Raft ([`Store::write`]); reads are linearizable ([`Store::get`],
//!   [`Store::range`]), each from one RocksDB snapshot; [`Store::range_at`] reads as of a past
//!   revision that the history still covers, so that chunks and pages make one snapshot.
//! - One cluster-wide revision counter: each applied put or delete, also inside an `Op::Txn`, bumps it by one, and every value
//!   records the revisions that created and last modified it, for compare-and-swap.
//! - The last `history_size` events are kept, so that a [`WatchStream`] can resume from a
//!   revision and then follow the live events without gap or duplicate.
//!
//! - Several servers form one store: the embedder carries the RPCs ([`RaftTransport`]) and
//!   hands what it receives to [`Store::handle_rpc`]. Any member answers: a write on a follower
//!   is forwarded to the leader, a read on a follower waits for the leader's read index
//!   (`cluster.rs`). A store opened with `bootstrap` initializes a pristine directory as a
//!   one-voter cluster; a joining one never initializes and waits to be added.

mod batch;
mod cluster;
mod db;
mod error;
mod log_store;
mod network;
mod read;
mod state_machine;
mod transport;
mod types;
mod watch;

#[cfg(test)]
mod suite_tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, Mutex};

pub use crate::cluster::{Member, MemberRole};
pub use crate::error::StoreError;
pub use crate::transport::{BoxFuture, NoTransport, RaftTransport, Refused, Rpc, TransportError};
pub use crate::types::{EventKind, KeyValue, Op, OpResult, Precondition, RangeResult, WatchEvent};
pub use crate::watch::WatchStream;

use crate::db::{DbUser, CF_OBJECTS};
use crate::log_store::LogStore;
use crate::network::Network;
use crate::state_machine::{SmConfig, SmShared, StateMachineStore};
use crate::types::{StoredValue, TypeConfig};

/// How long a write may wait for a majority before its outcome is reported unknown.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a linearizable read may wait for the leader's confirmation.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Store::open`] waits for this node to lead and catch up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Store::shutdown`] waits for openraft's storage tasks to stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of `watch_channel_capacity` (the channel allocates its capacity up front).
const MAX_WATCH_CHANNEL_CAPACITY: usize = 1 << 20;
/// Raft logs kept after a snapshot (at most `snapshot_logs`), for followers that lag a little.
const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;
/// The deadline of one snapshot chunk sent to a follower.
const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 10_000;

/// Configuration of a [`Store`].
#[derive(Clone)]
pub struct StoreConfig {
    /// The directory holding the RocksDB database (`db/`) and the snapshot (`snapshot/`).
    pub data_dir: PathBuf,
    /// This node's Raft id (default 1).
    pub node_id: u64,
    /// The address other Raft nodes would reach this one at (default `127.0.0.1:6443`).
    pub advertise_addr: String,
    /// How many events the history keeps for watches (default 10 000).
    pub history_size: u64,
    /// How many live events a watcher may fall behind before it is dropped (default 8192).
    pub watch_channel_capacity: usize,
    /// Raft log entries between two snapshots (default 10 000).
    pub snapshot_logs: u64,
    /// Fsync Raft log writes (default true). Only turn off for tests and benchmarks.
    pub fsync: bool,
    /// Initialize a pristine directory as a one-voter cluster of this node (default true).
    /// A server joining an existing cluster sets false: it waits to be added by the leader.
    pub bootstrap: bool,
    /// How RPCs reach the other members (default: [`NoTransport`], a store without peers).
    pub transport: Arc<dyn RaftTransport>,
    /// The leader's heartbeat interval, ms; it also bounds each AppendEntries RPC (default 100).
    pub heartbeat_ms: u64,
    /// The range a follower's election timeout is drawn from, ms (default 300–600). openraft
    /// 0.9 draws it once per node, so the range should stay wide.
    pub election_timeout_ms: (u64, u64),
    /// A planted bug, for the linearizability test only: a follower serves reads from its
    /// local state without the leader's read index (stale reads). Never set it otherwise.
    pub unsafe_local_reads: bool,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("data_dir", &self.data_dir)
            .field("node_id", &self.node_id)
            .field("advertise_addr", &self.advertise_addr)
            .field("history_size", &self.history_size)
            .field("snapshot_logs", &self.snapshot_logs)
            .field("fsync", &self.fsync)
            .field("bootstrap", &self.bootstrap)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("election_timeout_ms", &self.election_timeout_ms)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// The default configuration with data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            node_id: 1,
            advertise_addr: "127.0.0.1:6443".to_owned(),
            history_size: 10_000,
            watch_channel_capacity: 8192,
            snapshot_logs: 10_000,
            fsync: true,
            bootstrap: true,
            transport: Arc::new(NoTransport),
            heartbeat_ms: 100,
            election_timeout_ms: (300, 600),
            unsafe_local_reads: false,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        if !(1..=MAX_WATCH_CHANNEL_CAPACITY).contains(&self.watch_channel_capacity) {
            return Err(StoreError::InvalidConfig(format!(
                "watch_channel_capacity: must be between 1 and {MAX_WATCH_CHANNEL_CAPACITY} (got {})",
                self.watch_channel_capacity
            )));
        }
        if self.snapshot_logs == 0 {
            return Err(StoreError::InvalidConfig(
                "snapshot_logs: must be at least 1 (got 0)".to_owned(),
            ));
        }
        Ok(())
    }

    fn raft_config(&self) -> Result<Config, StoreError> {
        Config {
            cluster_name: "wasmctl".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms.0,
            election_timeout_max: self.election_timeout_ms.1,
            // Each snapshot chunk (3 MiB by default) must arrive within this; a follower far
            // behind gets the whole state this way.
            install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT_MS,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT.min(self.snapshot_logs),
            ..Config::default()
        }
        .validate()
        .map_err(|e| StoreError::InvalidConfig(format!("raft: {e}")))
    }
}

/// Raft state of this node, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreStatus {
    pub node_id: u64,
    pub is_leader: bool,
    pub current_leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    /// Last log index included in the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last log index purged from the Raft log.
    pub purged_index: Option<u64>,
    pub revision: u64,
    pub compacted_revision: u64,
}

/// A handle to the store; clones share one store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    raft: Raft<TypeConfig>,
    transport: Arc<dyn RaftTransport>,
    /// Set once this node saw itself removed from the membership (its Raft is stopped).
    removed: std::sync::atomic::AtomicBool,
    /// Group commit: the queue of writes waiting to share a Raft entry.
    batcher: batch::Batcher,
    /// [`StoreConfig::unsafe_local_reads`].
    unsafe_local_reads: bool,
    sm: Arc<SmShared>,
    /// Yields `None` once openraft has dropped every component that uses the database.
    db_users: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Store {
    /// Opens (or creates) the store in `cfg.data_dir`, starts Raft, initializes a pristine
    /// single-voter cluster, and returns once this node is the leader and has applied every
    /// committed entry. Fails with `Unavailable` if that takes more than 30 s.
    ///
    /// Call [`Store::shutdown`] before dropping the last handle; the directory can be opened
    /// again once it has returned and every handle and watch stream is dropped.
    pub async fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        cfg.validate()?;
        let raft_config = Arc::new(cfg.raft_config()?);
        let db_path = cfg.data_dir.join("db");
        std::fs::create_dir_all(&db_path)
            .map_err(|e| StoreError::storage(&format!("creating {}", db_path.display()), e))?;
        let db = {
            let path = db_path.clone();
            tokio::task::spawn_blocking(move || db::open(&path))
                .await
                .map_err(|e| StoreError::storage("opening RocksDB", e))?
                .map_err(|e| {
                    StoreError::storage(&format!("opening RocksDB at {}", db_path.display()), e)
                })?
        };
        let db = Arc::new(db);

        let (user, db_users) = DbUser::new();
        let log_store = LogStore::new(db.clone(), cfg.fsync, user.clone());
        let (sm, shared) = StateMachineStore::open(
            db,
            SmConfig {
                snapshot_dir: cfg.data_dir.join("snapshot"),
                history_size: cfg.history_size,
                watch_channel_capacity: cfg.watch_channel_capacity,
            },
            user,
        )
        .map_err(|e| StoreError::storage("loading the state machine", e))?;

        let network = Network {
            transport: cfg.transport.clone(),
            self_id: cfg.node_id,
        };
        let raft = Raft::new(cfg.node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|e| StoreError::Unavailable(format!("starting raft: {e}")))?;
        let store = Store {
            inner: Arc::new_cyclic(|weak| Inner {
                batcher: batch::start(weak.clone()),
                unsafe_local_reads: cfg.unsafe_local_reads,
                node_id: cfg.node_id,
                raft,
                transport: cfg.transport.clone(),
                removed: Default::default(),
                sm: shared,
                db_users: Mutex::new(Some(db_users)),
            }),
        };
        if let Err(e) = store.start(&cfg).await {
            if let Err(shutdown_err) = store.shutdown().await {
                tracing::warn!(error = %shutdown_err, "shutting down after a failed open");
            }
            return Err(e);
        }
        cluster::spawn_promoter(&store);
        tracing::info!(
            node_id = cfg.node_id,
            data_dir = %cfg.data_dir.display(),
            revision = store.revision(),
            "store open"
        );
        Ok(store)
    }

    /// Initializes a pristine node (with `bootstrap`); then, if this node is the only voter,
    /// waits to lead and to have applied everything. A member of a larger cluster returns at
    /// once: it serves Raft from now on, and leads or follows once a quorum is up.
    async fn start(&self, cfg: &StoreConfig) -> Result<(), StoreError> {
        let raft = &self.inner.raft;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StoreError::Unavailable(format!("raft stopped: {e}")))?;
        if !initialized && !cfg.bootstrap {
            tracing::info!(
                node_id = cfg.node_id,
                "pristine store; waiting to be added to the cluster"
            );
            return Ok(());
        }
        let sole_voter = {
            let m = raft.metrics().borrow().membership_config.clone();
            let voters: Vec<u64> = m.membership().voter_ids().collect();
            voters.is_empty() || voters == [cfg.node_id]
        };
        if initialized && !sole_voter {
            return Ok(());
        }
        if !initialized {
            let members = BTreeMap::from([(cfg.node_id, BasicNode::new(&cfg.advertise_addr))]);
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node_id = cfg.node_id, "initialized a new cluster"),
                // Already initialized (a restart): nothing to do.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ready = async {
            raft.wait(None)
                .state(ServerState::Leader, "store open")
                .await
                .map_err(|e| StoreError::Unavailable(format!("waiting to become leader: {e}")))?;
            raft.ensure_linearizable().await?;
            Ok::<(), StoreError>(())
        };
        match tokio::time::timeout(OPEN_TIMEOUT, ready).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "node {} did not become the raft leader with an up-to-date state machine within {}s \
                 (data dir {}); is another voter required?",
                cfg.node_id,
                OPEN_TIMEOUT.as_secs(),
                cfg.data_dir.display()
            ))),
        }
    }

    /// Applies `ops` in order, in ONE Raft entry (shared with concurrent writers: group
    /// commit, `batch.rs`). Each op is applied independently (use `Op::Txn` for all or
    /// nothing): the results come in the same order as the ops.
    ///
    /// On a follower the write is forwarded to the leader, and this returns once this node has
    /// applied it too (so a read here sees it). Fails with `Timeout` (the outcome is unknown:
    /// the write may still commit) when no majority acknowledged it within
    /// [`WRITE_TIMEOUT`], and with `Unavailable` when it was certainly not written.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        // `batch::commit` checks that the entry's results match its ops.
        batch::submit(&self.inner.batcher, ops).await
    }

    /// A linearizable read barrier: once it returns, local reads see every write that
    /// completed before it was called. On a follower it asks the leader for its read index and
    /// waits to have applied that far; without a leader that answers within [`READ_TIMEOUT`]
    /// it fails with `Unavailable` (never a stale read).
    pub async fn barrier(&self) -> Result<(), StoreError> {
        cluster::barrier(self).await
    }

    /// The value of `key` (linearizable).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.barrier().await?;
        let db = &self.inner.sm.db;
        let value: Option<StoredValue> = db::get(db, CF_OBJECTS, key.as_bytes())
            .map_err(|e| StoreError::storage(&format!("reading key {key:?}"), e))?;
        Ok(value.map(|v| v.to_key_value(key)))
    }

    /// The value of `key` and the store revision it was read at, from one snapshot
    /// (linearizable): no write to `key` lies after the value and at or before the revision, so
    /// a watch from that revision sees the next change of `key`.
    pub async fn get_with_revision(
        &self,
        key: &str,
    ) -> Result<(Option<KeyValue>, u64), StoreError> {
        self.barrier().await?;
        read::read_key(&self.inner.sm.db, key)
    }

    /// Keys starting with `prefix`, in key order, strictly after `start_after` if given, at most
    /// `limit` of them (0: no limit), read from one consistent snapshot (linearizable);
    /// `revision` is the store revision of that snapshot.
    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangeResult, StoreError> {
        self.read_range(prefix, start_after, limit, None).await
    }

    /// Like [`Store::range`], but as of the past `revision` (linearizable): the keys and values
    /// that the store held right after applying `revision`. Reading a long range in chunks, each
    /// from the revision of the first, gives one consistent view.
    ///
    /// Served from the current state and the history newer than `revision` (so it costs a scan
    /// of that history). Fails with `Compacted` if `revision` is below
    /// [`Store::compacted_revision`], with `FutureRevision` if the store has not reached it.
    pub async fn range_at(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: u64,
    ) -> Result<RangeResult, StoreError> {
        self.read_range(prefix, start_after, limit, Some(revision))
            .await
    }

    async fn read_range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Option<u64>,
    ) -> Result<RangeResult, StoreError> {
        self.barrier().await?;
        let db = self.inner.sm.db.clone();
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            read::read_range(&db, &prefix, start_after.as_deref(), limit, at)
        })
        .await
        .map_err(|e| StoreError::storage("reading a range", e))?
    }

    /// The latest applied revision (no I/O).
    pub fn revision(&self) -> u64 {
        self.inner.sm.revision.load(Ordering::Acquire)
    }

    /// The highest revision whose event is no longer in the history (0: nothing compacted).
    pub fn compacted_revision(&self) -> u64 {
        self.inner.sm.compacted.load(Ordering::Acquire)
    }

    /// The events with revision > `after_revision` whose key starts with `prefix`: first those
    /// still in the history, then the live ones, without gap or duplicate. Fails with
    /// `Compacted` if `after_revision` is below [`Store::compacted_revision`].
    ///
    /// To list-then-watch, call [`Store::range`] and watch from its `revision`.
    pub fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        let compacted = self.compacted_revision();
        if after_revision < compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                compacted,
            });
        }
        if self.inner.sm.is_closed() {
            return Err(StoreError::Unavailable("the store is shut down".to_owned()));
        }
        Ok(WatchStream::new(
            self.inner.sm.clone(),
            prefix.to_owned(),
            after_revision,
        ))
    }

    /// Stops Raft, ends the watch streams and flushes RocksDB. Idempotent. Afterwards every
    /// operation fails with `Unavailable`.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| StoreError::Unavailable(format!("stopping raft: {e}")))?;
        self.inner.sm.close_events();
        if let Some(mut users) = self.inner.db_users.lock().await.take() {
            // `recv` yields `None` once every token is dropped; nothing is ever sent.
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, users.recv())
                .await
                .is_err()
            {
                return Err(StoreError::Unavailable(format!(
                    "raft storage tasks did not stop within {}s",
                    SHUTDOWN_TIMEOUT.as_secs()
                )));
            }
        }
        let db = self.inner.sm.db.clone();
        tokio::task::spawn_blocking(move || {
            db.flush_wal(true)?;
            db.flush()
        })
        .await
        .map_err(|e| StoreError::storage("flushing RocksDB", e))?
        .map_err(|e| StoreError::storage("flushing RocksDB", e))?;
        tracing::info!(node_id = self.inner.node_id, "store shut down");
        Ok(())
    }

    /// Whether this node saw itself removed from the cluster (its Raft is then stopped, and
    /// every request fails with `Unavailable`).
    pub fn removed(&self) -> bool {
        self.inner.removed.load(Ordering::Acquire)
    }

    /// Whether this node is the Raft leader (no I/O).
    pub fn is_leader(&self) -> bool {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.node_id)
    }

    /// This node's Raft state (no I/O).
    pub fn status(&self) -> StoreStatus {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        self.status_from(&m)
    }

    /// Waits until `condition` holds for the status, for at most `timeout`.
    pub async fn wait_for_status(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&StoreStatus) -> bool,
    ) -> Result<StoreStatus, StoreError> {
        let mut metrics = self.inner.raft.metrics();
        let wait = async {
            loop {
                let status = self.status_from(&metrics.borrow_and_update());
                if condition(&status) {
                    return Ok(status);
                }
                if metrics.changed().await.is_err() {
                    return Err(StoreError::Unavailable("raft stopped".to_owned()));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            StoreError::Unavailable(format!("store status condition not met within {timeout:?}"))
        })?
    }

    fn status_from(&self, m: &openraft::RaftMetrics<u64, BasicNode>) -> StoreStatus {
        StoreStatus {
            node_id: self.inner.node_id,
            is_leader: m.state == ServerState::Leader
                && m.current_leader == Some(self.inner.node_id),
            current_leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            revision: self.revision(),
            compacted_revision: self.compacted_revision(),
        }
    }
}
