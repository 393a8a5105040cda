//! API errors, each of which becomes a Kubernetes `Status` with the matching HTTP code.

use wasmctl_api::meta::{Status, StatusCause, StatusDetails};
use wasmctl_api::{Invalid, ResourceInfo};
use wasmctl_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{resource} {name:?} not found")]
    NotFound {
        resource: String,
        kind: String,
        group: String,
        name: String,
    },
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        resource: String,
        kind: String,
        group: String,
        name: String,
    },
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {message}")]
    Conflict {
        resource: String,
        kind: String,
        group: String,
        name: String,
        message: String,
    },
    #[error("{group_kind} {name:?} is invalid: {invalid}")]
    Invalid {
        group_kind: String,
        kind: String,
        group: String,
        name: String,
        invalid: Invalid,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    /// 401 with a reason (the servers' own paths, not the Kubernetes API).
    #[error("Unauthorized: {0}")]
    UnauthorizedMessage(String),
    /// 409 that is about no object (a join from an address in use, a peer that is not the
    /// node meant).
    #[error("{0}")]
    ConflictMessage(String),
    /// 404 that is about no object.
    #[error("{0}")]
    NotFoundMessage(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Unavailable(String),
    /// A request for a resourceVersion the store had not reached after waiting for it
    /// (kube-apiserver's `NewTooLargeResourceVersionError`: 504 `Timeout`).
    #[error("Timeout: Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion { requested: u64, current: u64 },
    /// A request that did not complete in time (kube-apiserver's `NewTimeoutError`: 504).
    #[error("Timeout: {0}")]
    Timeout(String),
    #[error("the server could not find the requested resource")]
    UnknownPath,
    #[error("Internal error occurred: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn not_found(info: &ResourceInfo, name: &str) -> Self {
        ApiError::NotFound {
            resource: info.group_resource(),
            kind: info.plural.into(),
            group: info.group.into(),
            name: name.into(),
        }
    }
    pub fn already_exists(info: &ResourceInfo, name: &str) -> Self {
        ApiError::AlreadyExists {
            resource: info.group_resource(),
            kind: info.plural.into(),
            group: info.group.into(),
            name: name.into(),
        }
    }
    pub fn conflict(info: &ResourceInfo, name: &str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            resource: info.group_resource(),
            kind: info.plural.into(),
            group: info.group.into(),
            name: name.into(),
            message: message.into(),
        }
    }
    pub fn modified(info: &ResourceInfo, name: &str) -> Self {
        Self::conflict(
            info,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    pub fn invalid(info: &ResourceInfo, name: &str, invalid: Invalid) -> Self {
        ApiError::Invalid {
            group_kind: info.group_kind(),
            kind: info.kind.into(),
            group: info.group.into(),
            name: name.into(),
            invalid,
        }
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::UnknownPath | ApiError::NotFoundMessage(_) => 404,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::ConflictMessage(_) => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized | ApiError::UnauthorizedMessage(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::MethodNotAllowed => 405,
            ApiError::Gone(_) => 410,
            ApiError::TooLarge(_) => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::TooManyRequests(_) => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
            ApiError::TooLargeResourceVersion { .. } | ApiError::Timeout(_) => 504,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::UnknownPath | ApiError::NotFoundMessage(_) => {
                "NotFound"
            }
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::ConflictMessage(_) => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized | ApiError::UnauthorizedMessage(_) => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Gone(_) => "Expired",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::TooManyRequests(_) => "TooManyRequests",
            ApiError::Internal(_) => "InternalError",
            ApiError::Unavailable(_) => "ServiceUnavailable",
            ApiError::TooLargeResourceVersion { .. } | ApiError::Timeout(_) => "Timeout",
        }
    }

    pub fn to_status(&self) -> Status {
        let mut st = Status::failure(self.code(), self.reason(), self.to_string());
        match self {
            ApiError::NotFound {
                kind, group, name, ..
            }
            | ApiError::AlreadyExists {
                kind, group, name, ..
            }
            | ApiError::Conflict {
                kind, group, name, ..
            } => {
                st.details = Some(StatusDetails {
                    name: name.clone(),
                    group: group.clone(),
                    kind: kind.clone(),
                    ..Default::default()
                });
            }
            ApiError::Invalid {
                kind,
                group,
                name,
                invalid,
                ..
            } => {
                st.details = Some(StatusDetails {
                    name: name.clone(),
                    group: group.clone(),
                    kind: kind.clone(),
                    causes: invalid
                        .errors
                        .iter()
                        .map(|e| StatusCause {
                            reason: e.reason.into(),
                            message: e.message.clone(),
                            field: e.field.clone(),
                        })
                        .collect(),
                    ..Default::default()
                });
            }
            ApiError::TooManyRequests(_) | ApiError::Unavailable(_) => {
                st.details = Some(StatusDetails {
                    retry_after_seconds: Some(1),
                    ..Default::default()
                });
            }
            ApiError::TooLargeResourceVersion { .. } => {
                st.details = Some(StatusDetails {
                    causes: vec![StatusCause {
                        reason: "ResourceVersionTooLarge".into(),
                        message: "Too large resource version".into(),
                        field: String::new(),
                    }],
                    retry_after_seconds: Some(1),
                    ..Default::default()
                });
            }
            _ => {}
        }
        st
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted {
                requested,
                compacted,
            } => ApiError::Gone(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            StoreError::WatchLagged => {
                ApiError::Gone("watch fell behind the event stream; restart the watch".into())
            }
            StoreError::NotLeader(m) | StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("the cluster store is unavailable: {m}"))
            }
            // kube-apiserver answers an etcd write that timed out with 504 Timeout too.
            StoreError::Timeout(m) => ApiError::Timeout(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            other => ApiError::Internal(format!("store: {other}")),
        }
    }
}
