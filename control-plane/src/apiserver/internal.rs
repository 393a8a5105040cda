//! The servers' own paths on the API port: `/cacerts` (public, as k3s serves it), the Raft
//! RPCs (`/internal/raft/v1/*`, peer secret), the join request (`/internal/cluster/v1/join`,
//! join secret) and the member list and removal (`/internal/cluster/v1/members`, admin).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use wasmctl_store::{MemberRole, Op, OpResult, Precondition, Rpc};

use super::{collect_body, full, json_response, ApiState, Body};
use crate::cluster::{
    secret_matches, JoinRequest, JoinResponse, CLUSTER_HEADER, JOIN_PATH, MAX_RAFT_BODY,
    MEMBERS_PATH, NEXT_NODE_ID_KEY, NODE_HEADER, RAFT_PREFIX,
};
use crate::error::ApiError;

/// How long a member's status may take to arrive for `cluster members`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// A join request body is small.
const MAX_JOIN_BODY: usize = 16 << 10;

/// Whether `path` is one of the servers' own paths (served before bearer authentication).
pub fn is_internal(path: &str) -> bool {
    path == "/cacerts" || path.starts_with("/internal/")
}

pub async fn route(
    state: Arc<ApiState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    if path == "/cacerts" {
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-pem-file")
            .body(full(state.ca_pem.clone()))
            .expect("valid response"));
    }
    let Some(cluster) = state.cluster.clone() else {
        return Err(ApiError::NotFoundMessage(
            "this server is not part of an HA cluster (start the first one with --cluster-init)"
                .to_owned(),
        ));
    };
    if let Some(rpc) = path.strip_prefix(RAFT_PREFIX) {
        let rpc = Rpc::from_name(rpc).ok_or(ApiError::UnknownPath)?;
        return raft_rpc(&state, &cluster, rpc, req).await;
    }
    if path == JOIN_PATH {
        if req.method() != Method::POST {
            return Err(ApiError::MethodNotAllowed);
        }
        return join(&state, &cluster, req).await;
    }
    // The member list is the admin's.
    if !super::authorized(&state, &req) {
        return Err(ApiError::Unauthorized);
    }
    if path == MEMBERS_PATH && req.method() == Method::GET {
        return members(state.objects.store()).await;
    }
    if let Some(id) = path
        .strip_prefix(MEMBERS_PATH)
        .and_then(|p| p.strip_prefix('/'))
    {
        if req.method() != Method::DELETE {
            return Err(ApiError::MethodNotAllowed);
        }
        let id: u64 = id
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a member id")))?;
        state.objects.store().remove_member(id).await?;
        return Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Success",
                    "message": format!("member {id} removed")}),
        ));
    }
    Err(ApiError::UnknownPath)
}

async fn raft_rpc(
    state: &ApiState,
    cluster: &crate::cluster::ClusterState,
    rpc: Rpc,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let auth = &cluster.auth;
    if !super::bearer_token(&req).is_some_and(|t| secret_matches(t, &auth.peer_secret)) {
        return Err(ApiError::Unauthorized);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (cluster_id, node) = (header(CLUSTER_HEADER), header(NODE_HEADER));
    if cluster_id != auth.cluster_id || node != auth.node_id.to_string() {
        return Err(ApiError::ConflictMessage(format!(
            "this is node {} of cluster {}, not node {node} of cluster {cluster_id}",
            auth.node_id, auth.cluster_id
        )));
    }
    if req.method() != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let body = collect_body(
        req.into_body(),
        MAX_RAFT_BODY,
        state.config.timeouts.request_body,
        "the raft request",
    )
    .await?;
    let answer = state.objects.store().handle_rpc(rpc, &body).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(full(Bytes::from(answer)))
        .expect("valid response"))
}

async fn join(
    state: &ApiState,
    cluster: &crate::cluster::ClusterState,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let Some(join_secret) = cluster.auth.join_secret.as_deref() else {
        return Err(ApiError::Forbidden(
            "this server does not accept joins".to_owned(),
        ));
    };
    if !super::bearer_token(&req).is_some_and(|t| secret_matches(t, join_secret)) {
        return Err(ApiError::UnauthorizedMessage(
            "the join token's secret is not this cluster's".to_owned(),
        ));
    }
    let body = collect_body(
        req.into_body(),
        MAX_JOIN_BODY,
        state.config.timeouts.request_body,
        "the join request",
    )
    .await?;
    let join: JoinRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the join request is not valid: {e}")))?;
    let advertise = join.advertise.trim();
    if advertise.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::BadRequest(format!(
            "advertise: Invalid value: {advertise:?}: must be IP:PORT"
        )));
    }
    let store = state.objects.store();
    if let Some(m) = store.members().into_iter().find(|m| m.addr == advertise) {
        return Err(ApiError::ConflictMessage(format!(
            "{advertise} is already the address of member {} ({:?}); remove it first with \
             `wasmctl cluster remove {}`",
            m.id, m.role, m.id
        )));
    }
    let node_id = allocate_node_id(store).await?;
    store.add_learner(node_id, advertise).await?;
    tracing::info!(node_id, %advertise, "a server joined as a learner");
    let pki = cluster.data_dir.join("pki");
    let read = |name: &str| {
        std::fs::read_to_string(pki.join(name))
            .map(|s| s.trim().to_owned())
            .map_err(|e| ApiError::Internal(format!("reading pki/{name}: {e}")))
    };
    let resp = JoinResponse {
        cluster_id: cluster.auth.cluster_id.clone(),
        node_id,
        ca_crt: state.ca_pem.clone(),
        ca_key: std::fs::read_to_string(pki.join("ca.key"))
            .map_err(|e| ApiError::Internal(format!("reading pki/ca.key: {e}")))?,
        admin_token: state.token.clone(),
        join_secret: read("join.secret")?,
        peer_secret: cluster.auth.peer_secret.clone(),
    };
    let v = serde_json::to_value(&resp).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &v))
}

/// The next Raft id, by compare-and-swap on one key (ids are never reused).
async fn allocate_node_id(store: &wasmctl_store::Store) -> Result<u64, ApiError> {
    for _ in 0..16 {
        let (current, _) = store.get_with_revision(NEXT_NODE_ID_KEY).await?;
        let (next, precondition) = match &current {
            None => {
                // The first id after every member's (the first server is 1).
                let max = store.members().iter().map(|m| m.id).max().unwrap_or(1);
                (max + 1, Precondition::MustNotExist)
            }
            Some(kv) => {
                let n = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| ApiError::Internal(format!("{NEXT_NODE_ID_KEY} is corrupt")))?;
                (n, Precondition::ModRevision(kv.mod_revision))
            }
        };
        let op = Op::Put {
            key: NEXT_NODE_ID_KEY.to_owned(),
            value: (next + 1).to_string().into_bytes(),
            precondition,
        };
        match store.write(vec![op]).await?.pop() {
            Some(OpResult::Ok { .. }) => return Ok(next),
            Some(OpResult::AlreadyExists | OpResult::Conflict { .. }) => continue,
            other => {
                return Err(ApiError::Internal(format!(
                    "allocating a node id: unexpected {other:?}"
                )))
            }
        }
    }
    Err(ApiError::Unavailable(
        "allocating a node id: too many concurrent joins; try again".to_owned(),
    ))
}

async fn members(store: &wasmctl_store::Store) -> Result<Response<Body>, ApiError> {
    let members = store.members();
    let lag = store.replication_lag();
    let statuses = futures_util::future::join_all(
        members
            .iter()
            .map(|m| store.member_status(m.id, STATUS_TIMEOUT)),
    )
    .await;
    let leader = store.status().current_leader;
    let items: Vec<Value> = members
        .iter()
        .zip(statuses)
        .map(|(m, status)| {
            let role = match m.role {
                MemberRole::Learner => "learner",
                MemberRole::Voter if leader == Some(m.id) => "leader",
                MemberRole::Voter => "follower",
            };
            let (term, applied, error) = match status {
                Ok(s) => (json!(s.term), json!(s.last_applied_index), Value::Null),
                Err(e) => (Value::Null, Value::Null, json!(e.to_string())),
            };
            let lag = lag
                .as_ref()
                .and_then(|l| l.get(&m.id).copied().flatten())
                .map(|n| json!(n))
                .unwrap_or(if leader == Some(m.id) {
                    json!(0)
                } else {
                    Value::Null
                });
            json!({"id": m.id, "address": m.addr, "role": role, "term": term,
                   "lastApplied": applied, "lag": lag, "error": error})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"leader": leader, "members": items}),
    ))
}
