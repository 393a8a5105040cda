//! Several servers as one store: requests from peers, writes and reads on any member, and the
//! membership (learners added by the leader, promoted to voters once caught up, removed).
//!
//! openraft 0.9 answers a write or a read-index request only on the leader and leaves the rest
//! to the application. Here:
//! - a **write** on a follower is forwarded to the leader ([`Rpc::Write`]); it is sent again only
//!   when it certainly did not arrive (`Unreachable`, or the receiver says it is not the
//!   leader). Anything else after sending is an unknown outcome (`StoreError::Timeout`);
//! - a **read** on a follower asks the leader for its read index ([`Rpc::ReadIndex`]: the
//!   leader confirms its leadership with a quorum first) and waits until this node has applied
//!   that far. Without a leader answering within [`READ_TIMEOUT`] it fails; it never reads
//!   local state that might be stale;
//! - a **learner** is promoted to voter by the leader once its log is within
//!   [`PROMOTE_WITHIN`] entries of the leader's, while there are fewer than [`MAX_VOTERS`]
//!   voters; one membership change at a time (openraft runs each as joint consensus).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use crate::transport::{MembershipRequest, Refused, Rpc, TransportError};
use crate::types::{OpResult, TypeConfig, WriteRequest};
use crate::{Inner, Store, StoreError, StoreStatus, READ_TIMEOUT, WRITE_TIMEOUT};

/// At most this many voters; later members stay learners (as k3s and etcd advise).
pub const MAX_VOTERS: usize = 5;
/// A learner is promoted once its matched log index is this close to the leader's last one.
pub const PROMOTE_WITHIN: u64 = 100;
/// Pause before sending again after "not the leader" or "unreachable".
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How often the leader looks for learners to promote.
const PROMOTE_PERIOD: Duration = Duration::from_millis(250);
/// How long a membership change may take (a joint change commits twice).
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(15);

/// One member of the cluster as the membership configuration records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// The address it registered (`host:port` of its API server).
    pub addr: String,
    pub role: MemberRole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    Voter,
    Learner,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serialize(value).map_err(|e| StoreError::storage("encoding an rpc answer", e))
}

fn decode<'a, T: Deserialize<'a>>(rpc: Rpc, body: &'a [u8]) -> Result<T, StoreError> {
    bincode::deserialize(body)
        .map_err(|e| StoreError::Invalid(format!("bad {} request: {e}", rpc.name())))
}

fn timeout_msg(what: &str, limit: Duration) -> String {
    format!(
        "{what}: no majority of the cluster acknowledged it within {}s; it may still take effect",
        limit.as_secs()
    )
}

impl Store {
    /// This node's Raft id.
    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Handles an RPC another member sent (the embedder has authenticated the peer) and
    /// returns the answer to send back. `Err` only for a body that cannot be decoded or a
    /// failure to encode the answer; Raft's own errors are part of the answer.
    pub async fn handle_rpc(&self, rpc: Rpc, body: &[u8]) -> Result<Vec<u8>, StoreError> {
        let raft = &self.inner.raft;
        match rpc {
            Rpc::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> = decode(rpc, body)?;
                encode(&raft.append_entries(req).await)
            }
            Rpc::Vote => {
                let req: VoteRequest<u64> = decode(rpc, body)?;
                encode(&raft.vote(req).await)
            }
            Rpc::InstallSnapshot => {
                let req: InstallSnapshotRequest<TypeConfig> = decode(rpc, body)?;
                encode(&raft.install_snapshot(req).await)
            }
            Rpc::ReadIndex => encode(&self.leader_read_index().await),
            Rpc::Write => {
                let req: WriteRequest = decode(rpc, body)?;
                encode(&self.leader_write(req).await)
            }
            Rpc::Membership => match decode(rpc, body)? {
                MembershipRequest::Removed { id, log_index } => {
                    // Ignore a notice older than the membership this node holds (it was
                    // removed and has since been added again).
                    let held = self
                        .inner
                        .raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .log_id()
                        .map(|l| l.index);
                    if id == self.inner.node_id && held.is_none_or(|h| h < log_index) {
                        stop_removed(&self.inner).await;
                    }
                    encode(&Ok::<(), Refused>(()))
                }
                req => encode(&self.leader_membership(req).await),
            },
            Rpc::Status => encode(&self.status()),
        }
    }

    /// The members of the cluster (voters first, then learners, each by id).
    pub fn members(&self) -> Vec<Member> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        members_of(&m)
    }

    /// How far each member's log is behind the leader's last log index, as the leader knows
    /// it (`None` on a follower, and for a member it has not heard from).
    pub fn replication_lag(&self) -> Option<HashMap<u64, Option<u64>>> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let last = m.last_log_index.unwrap_or(0);
        m.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, matched)| {
                    (
                        *id,
                        matched.map(|l| last.saturating_sub(l.index)).or(
                            // A member that matched nothing yet is behind by everything.
                            Some(last),
                        ),
                    )
                })
                .collect()
        })
    }

    /// The Raft state of member `id` (this node's own, or asked over the transport).
    pub async fn member_status(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<StoreStatus, StoreError> {
        if id == self.inner.node_id {
            return Ok(self.status());
        }
        let addr = self
            .members()
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.addr)
            .ok_or_else(|| StoreError::Invalid(format!("node {id} is not a member")))?;
        let answer = self
            .inner
            .transport
            .call(id, &addr, Rpc::Status, Vec::new(), timeout)
            .await
            .map_err(|e| StoreError::Unavailable(format!("node {id} at {addr}: {e}")))?;
        decode(Rpc::Status, &answer)
    }

    /// Adds node `id` at `addr` as a learner (on the leader, or forwarded to it). Returns once
    /// the change is committed; the learner then catches up (log or snapshot) in the
    /// background and is promoted to voter when it is close enough. Adding a member that
    /// already exists with the same address is a no-op.
    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<(), StoreError> {
        self.membership(MembershipRequest::AddLearner {
            id,
            addr: addr.to_owned(),
        })
        .await
    }

    /// Removes member `id` (a voter through a joint change, or a learner). Refused for the
    /// last voter, and when the voters left would not include a majority that answered
    /// recently (the change could never commit).
    pub async fn remove_member(&self, id: u64) -> Result<(), StoreError> {
        self.membership(MembershipRequest::Remove { id }).await
    }

    async fn membership(&self, req: MembershipRequest) -> Result<(), StoreError> {
        let deadline = Instant::now() + MEMBERSHIP_TIMEOUT;
        loop {
            let (leader, addr) = wait_for_leader(&self.inner, deadline).await?;
            let answer = if leader == self.inner.node_id {
                self.leader_membership(req.clone()).await
            } else {
                let body = encode(&req)?;
                let remaining = deadline.saturating_duration_since(Instant::now());
                match self
                    .inner
                    .transport
                    .call(leader, &addr, Rpc::Membership, body, remaining)
                    .await
                {
                    Ok(bytes) => decode::<Result<(), Refused>>(Rpc::Membership, &bytes)?,
                    Err(TransportError::Unreachable(_)) => {
                        pause(deadline).await;
                        continue;
                    }
                    Err(e) => Err(Refused::Unknown(e.to_string())),
                }
            };
            match answer {
                Ok(()) => return Ok(()),
                Err(Refused::NotLeader { .. }) => pause(deadline).await,
                // A promotion (or another change) is being committed: wait for it.
                Err(Refused::Busy(m)) if Instant::now() + RETRY_PAUSE >= deadline => {
                    return Err(StoreError::Unavailable(m))
                }
                Err(Refused::Busy(_)) => pause(deadline).await,
                Err(Refused::Invalid(m)) => return Err(StoreError::Invalid(m)),
                Err(Refused::Unknown(m)) => return Err(StoreError::Timeout(m)),
            }
        }
    }

    /// On the leader: the read index a follower's read must wait for.
    async fn leader_read_index(&self) -> Result<u64, Refused> {
        let raft = &self.inner.raft;
        match tokio::time::timeout(READ_TIMEOUT, raft.get_read_log_id()).await {
            Ok(Ok((read, _applied))) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(not_leader(f.leader_id, f.leader_node))
            }
            Ok(Err(e)) => Err(Refused::Unknown(e.to_string())),
            Err(_) => Err(Refused::Unknown(format!(
                "the leader could not confirm its leadership with a quorum within {}s",
                READ_TIMEOUT.as_secs()
            ))),
        }
    }

    /// On the leader: a forwarded write. Answers the log index it was committed at, so the
    /// sender can wait to have applied it.
    async fn leader_write(&self, req: WriteRequest) -> Result<(u64, Vec<OpResult>), Refused> {
        if !self.is_leader() {
            let m = self.inner.raft.metrics().borrow().clone();
            return Err(not_leader_of(&m));
        }
        // Once submitted, every failure is an unknown outcome: openraft also answers
        // ForwardToLeader for an entry it appended and then lost to a conflict, which another
        // member holding it may still commit (possible with 5 voters).
        match tokio::time::timeout(WRITE_TIMEOUT, self.inner.raft.client_write(req)).await {
            Ok(Ok(r)) => Ok((r.log_id.index, r.data.results)),
            Ok(Err(e)) => Err(Refused::Unknown(format!("the leader lost the write: {e}"))),
            Err(_) => Err(Refused::Unknown(timeout_msg("the write", WRITE_TIMEOUT))),
        }
    }

    /// On the leader: a membership change, checked first.
    async fn leader_membership(&self, req: MembershipRequest) -> Result<(), Refused> {
        let raft = &self.inner.raft;
        let m = raft.metrics().borrow().clone();
        if !(m.state == ServerState::Leader && m.current_leader == Some(self.inner.node_id)) {
            return Err(not_leader_of(&m));
        }
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let req_kind = match &req {
            MembershipRequest::Remove { id } => RemoveKind::Remove(*id),
            _ => RemoveKind::Other,
        };
        let change = match req {
            MembershipRequest::Removed { .. } => {
                return Err(Refused::Invalid("not a request for the leader".to_owned()))
            }
            MembershipRequest::AddLearner { id, addr } => {
                if let Some(node) = membership.get_node(&id) {
                    if node.addr == addr {
                        return Ok(());
                    }
                    return Err(Refused::Invalid(format!(
                        "node {id} is already a member at {}",
                        node.addr
                    )));
                }
                if let Some((other, _)) = membership.nodes().find(|(_, n)| n.addr == addr) {
                    return Err(Refused::Invalid(format!(
                        "{addr} is already the address of member {other}: remove it first \
                         (wasmctl cluster remove {other})"
                    )));
                }
                Change::Learner(id, BasicNode::new(addr))
            }
            MembershipRequest::Remove { id } => {
                if membership.get_node(&id).is_none() {
                    return Err(Refused::Invalid(format!("node {id} is not a member")));
                }
                if !voters.contains(&id) {
                    Change::Members(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                } else {
                    let left: Vec<u64> = voters.iter().copied().filter(|v| *v != id).collect();
                    if left.is_empty() {
                        return Err(Refused::Invalid(format!(
                            "node {id} is the last voter: removing it would leave no cluster"
                        )));
                    }
                    // A joint change needs a majority of the new voters as well as of the old:
                    // ask each of them now (recent heartbeats are not enough: a peer that died
                    // a second ago still looks healthy, and the change would hang until it
                    // is back).
                    // The joint config needs a majority of the old voters and of the new.
                    let mut probes = tokio::task::JoinSet::new();
                    for v in &voters {
                        let (v, me) = (*v, self.inner.node_id);
                        let addr = membership.get_node(&v).map(|n| n.addr.clone());
                        let transport = self.inner.transport.clone();
                        probes.spawn(async move {
                            let up = v == me
                                || match addr {
                                    Some(addr) => transport
                                        .call(v, &addr, Rpc::Status, Vec::new(), PROBE_TIMEOUT)
                                        .await
                                        .is_ok(),
                                    None => false,
                                };
                            (v, up)
                        });
                    }
                    let mut up = BTreeSet::new();
                    while let Some(r) = probes.join_next().await {
                        if let Ok((v, true)) = r {
                            up.insert(v);
                        }
                    }
                    let alive_left = left.iter().filter(|v| up.contains(v)).count();
                    let alive_old = up.len();
                    let (need_left, need_old) = (left.len() / 2 + 1, voters.len() / 2 + 1);
                    if alive_left < need_left || alive_old < need_old {
                        return Err(Refused::Invalid(format!(
                            "removing node {id} would lose quorum: of the {} voters left {alive_left} \
                             answered (a majority needs {need_left}), of the {} voters now \
                             {alive_old} answered (a majority needs {need_old})",
                            left.len(),
                            voters.len(),
                        )));
                    }
                    Change::Members(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                }
            }
        };
        let removed = match (&change, &req_kind) {
            (Change::Members(_), RemoveKind::Remove(id)) => {
                membership.get_node(id).map(|n| (*id, n.addr.clone()))
            }
            _ => None,
        };
        let result = match change {
            Change::Learner(id, node) => {
                tokio::time::timeout(MEMBERSHIP_TIMEOUT, raft.add_learner(id, node, false)).await
            }
            Change::Members(c) => {
                tokio::time::timeout(MEMBERSHIP_TIMEOUT, raft.change_membership(c, false)).await
            }
        };
        match result {
            Ok(Ok(r)) => {
                if let Some((id, addr)) = removed {
                    let weak = Arc::downgrade(&self.inner);
                    tokio::spawn(tell_removed(weak, id, addr, r.log_id.index));
                }
                Ok(())
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(not_leader(f.leader_id, f.leader_node))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => match e {
                // Nothing was proposed: say why.
                ChangeMembershipError::InProgress(_) => Err(Refused::Busy(
                    "another membership change is in progress; try again".to_owned(),
                )),
                e => Err(Refused::Invalid(e.to_string())),
            },
            Ok(Err(e)) => Err(Refused::Unknown(e.to_string())),
            Err(_) => Err(Refused::Unknown(timeout_msg(
                "the membership change",
                MEMBERSHIP_TIMEOUT,
            ))),
        }
    }
}

enum RemoveKind {
    Remove(u64),
    Other,
}

/// How long a voter may take to answer the liveness probe before a removal.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long the leader keeps trying to tell a removed member.
const TELL_REMOVED_FOR: Duration = Duration::from_secs(60);

/// Tells member `id` that it was removed (by the membership entry at `log_index`),
/// retrying while it is unreachable and it has not been added again.
async fn tell_removed(inner: Weak<Inner>, id: u64, addr: String, log_index: u64) {
    let Ok(body) = encode(&MembershipRequest::Removed { id, log_index }) else {
        return;
    };
    let deadline = Instant::now() + TELL_REMOVED_FOR;
    while Instant::now() < deadline {
        let Some(inner) = inner.upgrade() else { return };
        let m = inner.raft.metrics().borrow().clone();
        if m.membership_config.membership().get_node(&id).is_some() {
            return;
        }
        let transport = inner.transport.clone();
        drop(inner);
        let call = transport.call(
            id,
            &addr,
            Rpc::Membership,
            body.clone(),
            Duration::from_secs(2),
        );
        if call.await.is_ok() {
            tracing::info!(node_id = id, "told the removed member");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!(node_id = id, %addr, "could not tell the removed member; it will campaign in vain until stopped");
}

/// This node was removed: stop Raft (it must not campaign) and fail every request.
async fn stop_removed(inner: &Inner) {
    if inner
        .removed
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    tracing::warn!(
        node_id = inner.node_id,
        "this server was removed from the cluster; stopping its raft"
    );
    if let Err(e) = inner.raft.shutdown().await {
        tracing::warn!(error = %e, "stopping raft after removal");
    }
}

enum Change {
    Learner(u64, BasicNode),
    Members(ChangeMembers<u64, BasicNode>),
}

fn not_leader(id: Option<u64>, node: Option<BasicNode>) -> Refused {
    Refused::NotLeader {
        leader: id.zip(node.map(|n| n.addr)),
    }
}

fn not_leader_of(m: &RaftMetrics<u64, BasicNode>) -> Refused {
    let leader = m.current_leader.and_then(|id| {
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| (id, n.addr.clone()))
    });
    Refused::NotLeader { leader }
}

fn members_of(m: &RaftMetrics<u64, BasicNode>) -> Vec<Member> {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let mut out: Vec<Member> = membership
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            addr: node.addr.clone(),
            role: if voters.contains(id) {
                MemberRole::Voter
            } else {
                MemberRole::Learner
            },
        })
        .collect();
    out.sort_by_key(|m| (m.role == MemberRole::Learner, m.id));
    out
}

async fn pause(deadline: Instant) {
    let until = (Instant::now() + RETRY_PAUSE).min(deadline);
    tokio::time::sleep_until(until.into()).await;
}

/// The leader (id and address) once one is known, waiting at most until `deadline`.
async fn wait_for_leader(inner: &Inner, deadline: Instant) -> Result<(u64, String), StoreError> {
    let mut metrics = inner.raft.metrics();
    let wait = async {
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Err(e) = &m.running_state {
                    return Err(StoreError::Unavailable(format!("raft stopped: {e}")));
                }
                if let Some(id) = m.current_leader {
                    if let Some(node) = m.membership_config.membership().get_node(&id) {
                        return Ok((id, node.addr.clone()));
                    }
                }
            }
            if metrics.changed().await.is_err() {
                return Err(StoreError::Unavailable("raft stopped".to_owned()));
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), wait).await {
        Ok(r) => r,
        Err(_) => {
            let voters = inner
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .count();
            Err(StoreError::Unavailable(format!(
                "no leader: a majority of the cluster's {voters} voters is not reachable from \
                 node {}",
                inner.node_id
            )))
        }
    }
}

/// Resolves once this node no longer sees `leader` as the leader (an election began, or
/// another leader is known).
async fn leader_changed(inner: &Inner, leader: u64) {
    let mut metrics = inner.raft.metrics();
    loop {
        if metrics.borrow_and_update().current_leader != Some(leader) {
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until this node has applied log index `index`.
async fn wait_applied(inner: &Inner, index: u64, deadline: Instant) -> Result<(), StoreError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    inner
        .raft
        .wait(Some(remaining))
        .applied_index_at_least(Some(index), "read index")
        .await
        .map(|_| ())
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "node {} did not apply log index {index} in time: {e}",
                inner.node_id
            ))
        })
}

/// [`Store::write`]: on the leader, or forwarded to it.
pub(crate) async fn write(store: &Store, req: WriteRequest) -> Result<Vec<OpResult>, StoreError> {
    let inner = &store.inner;
    let deadline = Instant::now() + WRITE_TIMEOUT;
    loop {
        let (leader, addr) = wait_for_leader(inner, deadline).await?;
        if leader == inner.node_id {
            let write = inner.raft.client_write(req);
            match tokio::time::timeout_at(deadline.into(), write).await {
                Ok(Ok(r)) => return Ok(r.data.results),
                // Submitted: even ForwardToLeader may come for an entry that was appended
                // and can still commit elsewhere (see `leader_write`), so never send again.
                Ok(Err(e)) => {
                    return Err(StoreError::Timeout(format!(
                        "the write was submitted but not committed here: {e}"
                    )))
                }
                Err(_) => return Err(StoreError::Timeout(timeout_msg("the write", WRITE_TIMEOUT))),
            }
        }
        let body = encode(&req)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::select! {
            a = inner.transport.call(leader, &addr, Rpc::Write, body, remaining) => a,
            // A paused or cut-off leader would hold the write to its deadline: once another
            // leader is known, give up on it (the write may still commit: unknown outcome).
            () = leader_changed(inner, leader) => {
                return Err(StoreError::Timeout(format!(
                    "the leader (node {leader}) changed while the write was forwarded to it; \
                     its outcome is unknown"
                )))
            }
        };
        let answer = match answer {
            Ok(bytes) => bytes,
            Err(TransportError::Unreachable(_)) => {
                pause(deadline).await;
                continue;
            }
            Err(e) => {
                return Err(StoreError::Timeout(format!(
                    "forwarding the write to the leader (node {leader} at {addr}): {e}"
                )))
            }
        };
        match decode::<Result<(u64, Vec<OpResult>), Refused>>(Rpc::Write, &answer) {
            Ok(Ok((index, results))) => {
                // Committed. Wait to have applied it, so that a watch or read here follows; a
                // read goes through the read index anyway, so a slow apply is not an error.
                if let Err(e) = wait_applied(inner, index, deadline).await {
                    tracing::debug!(error = %e, "a forwarded write is not applied here yet");
                }
                return Ok(results);
            }
            Ok(Err(Refused::NotLeader { .. })) => pause(deadline).await,
            Ok(Err(Refused::Invalid(m) | Refused::Busy(m))) => return Err(StoreError::Invalid(m)),
            Ok(Err(Refused::Unknown(m))) => return Err(StoreError::Timeout(m)),
            Err(e) => return Err(StoreError::Timeout(format!("the leader's answer: {e}"))),
        }
    }
}

/// [`Store::barrier`]: `ensure_linearizable` on the leader, the leader's read index elsewhere.
pub(crate) async fn barrier(store: &Store) -> Result<(), StoreError> {
    let inner = &store.inner;
    if inner.unsafe_local_reads && !store.is_leader() {
        return Ok(());
    }
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let (leader, addr) = wait_for_leader(inner, deadline).await?;
        if leader == inner.node_id {
            let confirm = inner.raft.ensure_linearizable();
            match tokio::time::timeout_at(deadline.into(), confirm).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                    pause(deadline).await
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "node {} could not confirm its leadership with a majority within {}s",
                        inner.node_id,
                        READ_TIMEOUT.as_secs()
                    )))
                }
            }
            continue;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let call = inner
            .transport
            .call(leader, &addr, Rpc::ReadIndex, Vec::new(), remaining);
        let answer = tokio::select! {
            a = call => a,
            // Ask the new leader instead (a read index request changes nothing).
            () = leader_changed(inner, leader) => continue,
        };
        let answer = match answer {
            Ok(bytes) => bytes,
            Err(TransportError::Unreachable(_)) => {
                pause(deadline).await;
                continue;
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "asking the leader (node {leader} at {addr}) for a read index: {e}"
                )))
            }
        };
        match decode::<Result<u64, Refused>>(Rpc::ReadIndex, &answer)? {
            Ok(index) => return wait_applied(inner, index, deadline).await,
            Err(Refused::NotLeader { .. }) => pause(deadline).await,
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "the leader (node {leader}) gave no read index: {e}"
                )))
            }
        }
    }
}

/// Starts the leader's promotion of caught-up learners and every node's check that it is
/// still a member (a removed node is not told; it stops its Raft instead of campaigning).
pub(crate) fn spawn_promoter(store: &Store) {
    let weak: Weak<Inner> = Arc::downgrade(&store.inner);
    tokio::spawn(async move {
        let mut was_member = false;
        loop {
            tokio::time::sleep(PROMOTE_PERIOD).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.sm.is_closed() {
                return;
            }
            let m = inner.raft.metrics().borrow().clone();
            if m.running_state.is_err() {
                return;
            }
            let membership = m.membership_config.membership();
            let member = membership.get_node(&inner.node_id).is_some();
            // Only once the config that dropped this node is applied (a leader removing itself
            // must first commit it; openraft then steps it down).
            let config_applied = match (m.last_applied, m.membership_config.log_id()) {
                (Some(applied), Some(config)) => applied.index >= config.index,
                _ => false,
            };
            if was_member && !member && config_applied {
                tracing::warn!(
                    node_id = inner.node_id,
                    "this server was removed from the cluster; stopping its raft"
                );
                inner
                    .removed
                    .store(true, std::sync::atomic::Ordering::Release);
                if let Err(e) = inner.raft.shutdown().await {
                    tracing::warn!(error = %e, "stopping raft after removal");
                }
                return;
            }
            was_member |= member;
            if !(m.state == ServerState::Leader && m.current_leader == Some(inner.node_id)) {
                continue;
            }
            if membership.get_joint_config().len() > 1 {
                continue;
            }
            let voters = membership.voter_ids().count();
            if voters >= MAX_VOTERS {
                continue;
            }
            let last = m.last_log_index.unwrap_or(0);
            let ready = membership.learner_ids().find(|id| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).copied().flatten())
                    .is_some_and(|matched| matched.index + PROMOTE_WITHIN >= last)
            });
            let Some(id) = ready else { continue };
            tracing::info!(node_id = id, "promoting a caught-up learner to voter");
            let change = inner
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
            match tokio::time::timeout(MEMBERSHIP_TIMEOUT, change).await {
                Ok(Ok(_)) => tracing::info!(node_id = id, "learner promoted to voter"),
                Ok(Err(e)) => tracing::warn!(node_id = id, error = %e, "promoting a learner"),
                Err(_) => tracing::warn!(node_id = id, "promoting a learner timed out"),
            }
        }
    });
}
