//! Raft networking.
//!
//! The store runs as a single voter: multi-voter clusters are not supported yet, so there is no
//! transport. Every RPC to another node fails with `Unreachable` and the message
//! [`MULTI_VOTER_UNSUPPORTED`]. A real transport replaces [`Network`] without touching the
//! storage, which assumes nothing about the number of voters.

use openraft::error::{
    Fatal, InstallSnapshotError, RPCError, RaftError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetwork, RaftNetworkFactory, Snapshot, Vote};

use crate::types::TypeConfig;

/// Why every RPC to another node fails.
pub const MULTI_VOTER_UNSUPPORTED: &str = "multi-voter clusters are not supported yet";

#[derive(Debug, thiserror::Error)]
#[error("cannot reach raft node {target} at {addr}: {MULTI_VOTER_UNSUPPORTED}")]
struct NoTransport {
    target: u64,
    addr: String,
}

/// Creates a [`NetworkClient`] per remote node; none of them can send anything.
#[derive(Clone, Debug, Default)]
pub(crate) struct Network;

/// The client for one remote node: every RPC returns [`RPCError::Unreachable`].
#[derive(Debug)]
pub(crate) struct NetworkClient {
    target: u64,
    addr: String,
}

impl NetworkClient {
    fn unreachable(&self) -> Unreachable {
        Unreachable::new(&NoTransport {
            target: self.target,
            addr: self.addr.clone(),
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> NetworkClient {
        tracing::warn!(target, addr = %node.addr, "{MULTI_VOTER_UNSUPPORTED}: raft messages to this node will fail");
        NetworkClient {
            target,
            addr: node.addr.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote<u64>,
        _snapshot: Snapshot<TypeConfig>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}
