//! The boundary between the store and the wire: what one server sends another.
//!
//! The store knows the RPCs and their encoding (bincode of openraft's own request and response
//! types, and of the store's forwarded requests); it does not know HTTP, TLS or how peers prove
//! who they are. The embedder implements [`RaftTransport`] (the control plane does it over its
//! HTTPS port, see `control-plane/src/apiserver/peers.rs`) and passes every request it receives
//! to [`Store::handle_rpc`](crate::Store::handle_rpc).
//!
//! A call's error says whether the request can have reached the peer: only
//! [`TransportError::Unreachable`] means it certainly did not, so only then may a write be sent
//! again (to the same or another leader). Everything else is an unknown outcome.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A boxed, sendable future (the transport is used as a trait object).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The RPCs one store sends another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// openraft AppendEntries (also the heartbeat).
    AppendEntries,
    /// openraft RequestVote.
    Vote,
    /// One chunk of a snapshot (openraft InstallSnapshot).
    InstallSnapshot,
    /// Asks the leader for the log index a linearizable read must wait for (a follower read).
    ReadIndex,
    /// A write forwarded to the leader.
    Write,
    /// A membership change forwarded to the leader (add a learner, remove a member).
    Membership,
    /// This node's Raft state (for `wasmctl cluster members`).
    Status,
}

impl Rpc {
    pub const ALL: [Rpc; 7] = [
        Rpc::AppendEntries,
        Rpc::Vote,
        Rpc::InstallSnapshot,
        Rpc::ReadIndex,
        Rpc::Write,
        Rpc::Membership,
        Rpc::Status,
    ];

    /// The name used on the wire (a URL path segment).
    pub fn name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append",
            Rpc::Vote => "vote",
            Rpc::InstallSnapshot => "snapshot",
            Rpc::ReadIndex => "read-index",
            Rpc::Write => "write",
            Rpc::Membership => "membership",
            Rpc::Status => "status",
        }
    }

    pub fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Why a call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TransportError {
    /// The request was certainly not delivered (connection refused, TLS handshake failed, the
    /// peer at that address is not the node meant). Safe to send again.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the deadline: the request may or may not have been acted on.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request may have been delivered and failed (connection lost in flight, an error
    /// status): the outcome is unknown.
    #[error("{0}")]
    Failed(String),
}

/// Sends one RPC to another server and returns its answer.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends `body` as `rpc` to node `target` at `addr` (the address it registered in the
    /// membership) and returns the response body, within `timeout`.
    fn call(
        &self,
        target: u64,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, TransportError>>;
}

/// The transport of a store that has no peers: every call is unreachable.
#[derive(Debug, Default)]
pub struct NoTransport;

impl RaftTransport for NoTransport {
    fn call(
        &self,
        target: u64,
        addr: &str,
        _rpc: Rpc,
        _body: Vec<u8>,
        _timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, TransportError>> {
        let msg = format!("no raft transport is configured to reach node {target} at {addr}");
        Box::pin(async move { Err(TransportError::Unreachable(msg)) })
    }
}

/// Why the leader refused a forwarded request.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum Refused {
    /// The receiver is not the leader: nothing was done, the request may be sent to `leader`.
    #[error("node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    /// The request was refused before anything was written (a bad membership change, ...).
    #[error("{0}")]
    Invalid(String),
    /// Another membership change is in progress: nothing was done; try again shortly.
    #[error("{0}")]
    Busy(String),
    /// The request was taken but did not complete: it may or may not take effect.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// A membership change forwarded to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum MembershipRequest {
    AddLearner {
        id: u64,
        addr: String,
    },
    Remove {
        id: u64,
    },
    /// From the leader to a member it just removed (which would otherwise never learn it:
    /// the leader stops replicating to it, and without PreVote it would campaign forever).
    Removed {
        id: u64,
        log_index: u64,
    },
}
