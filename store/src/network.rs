//! openraft's network, on top of the embedder's [`RaftTransport`].
//!
//! Requests and responses are bincode of openraft's own types; a response carries the peer's
//! `Result`, so a remote Raft error comes back as `RemoteError`. A transport failure that
//! certainly did not deliver becomes `Unreachable` (openraft then backs off before retrying);
//! a deadline becomes `Timeout`, anything else `Network`.
//!
//! Snapshots go in chunks (`install_snapshot`, openraft's default `full_snapshot`), each bounded
//! by `install_snapshot_timeout`.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::transport::{RaftTransport, Rpc, TransportError};
use crate::types::TypeConfig;

/// The most bytes of log entries one AppendEntries carries (unless a single entry is larger).
pub(crate) const APPEND_BUDGET: usize = 4 << 20;

/// How many of `entries`, from the first, fit in `budget` bytes (at least one).
fn within_budget<T: Serialize>(entries: &[T], budget: usize) -> usize {
    let mut used = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let n =
            usize::try_from(bincode::serialized_size(e).unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
        if i > 0 && used.saturating_add(n) > budget {
            return i;
        }
        used = used.saturating_add(n);
    }
    entries.len()
}

/// Creates a [`NetworkClient`] per remote node: a cheap handle on the shared transport, which
/// pools the connections.
#[derive(Clone)]
pub(crate) struct Network {
    pub transport: Arc<dyn RaftTransport>,
    pub self_id: u64,
}

/// The client for one remote node.
pub(crate) struct NetworkClient {
    transport: Arc<dyn RaftTransport>,
    target: u64,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> NetworkClient {
        debug_assert_ne!(target, self.self_id, "openraft never sends to itself");
        NetworkClient {
            transport: self.transport.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("raft {rpc:?} to node {target} at {addr}: {error}")]
struct CallError {
    rpc: Rpc,
    target: u64,
    addr: String,
    error: String,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl NetworkClient {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        action: RPCTypes,
        req: &Req,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let fail = |error: String| CallError {
            rpc,
            target: self.target,
            addr: self.addr.clone(),
            error,
        };
        let body = bincode::serialize(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&fail(e.to_string()))))?;
        let answer = self
            .transport
            .call(self.target, &self.addr, rpc, body, ttl)
            .await
            .map_err(|e| match e {
                TransportError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&fail(m))),
                TransportError::Timeout(_) => RPCError::Timeout(Timeout {
                    action,
                    id: 0,
                    target: self.target,
                    timeout: ttl,
                }),
                TransportError::Failed(m) => RPCError::Network(NetworkError::new(&fail(m))),
            })?;
        let result: Result<Resp, RaftError<u64, E>> = bincode::deserialize(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&fail(format!("bad answer: {e}")))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    /// Sends at most [`APPEND_BUDGET`] bytes of entries (at least one): openraft bounds each
    /// AppendEntries by the heartbeat interval, so a long backlog of large entries must go
    /// in parts. A part that is accepted is reported as `PartialSuccess` up to its last entry,
    /// and openraft sends the rest next.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        let keep = within_budget(&rpc.entries, APPEND_BUDGET);
        let cut = keep < rpc.entries.len();
        if cut {
            rpc.entries.truncate(keep);
        }
        let last_sent = rpc.entries.last().map(|e| e.log_id);
        let resp = self
            .call(
                Rpc::AppendEntries,
                RPCTypes::AppendEntries,
                &rpc,
                option.hard_ttl(),
            )
            .await?;
        Ok(match resp {
            AppendEntriesResponse::Success if cut => {
                AppendEntriesResponse::PartialSuccess(last_sent)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(
            Rpc::InstallSnapshot,
            RPCTypes::InstallSnapshot,
            &rpc,
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        self.call(Rpc::Vote, RPCTypes::Vote, &rpc, option.hard_ttl())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::within_budget;

    #[test]
    fn append_entries_are_cut_at_the_byte_budget_but_never_empty() {
        let entries: Vec<Vec<u8>> = (0..10).map(|_| vec![0u8; 100]).collect();
        // Each serialises to 108 bytes (length prefix + payload).
        assert_eq!(within_budget(&entries, 10_000), 10);
        assert_eq!(within_budget(&entries, 216), 2);
        assert_eq!(within_budget(&entries, 300), 2);
        // A single entry larger than the budget still goes alone.
        assert_eq!(within_budget(&entries, 10), 1);
        assert_eq!(within_budget::<Vec<u8>>(&[], 10), 0);
    }
}
