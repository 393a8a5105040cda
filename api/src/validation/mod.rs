//! Decode, default and validate an object once, on its way into the cluster.
//!
//! [`normalize`] turns untrusted JSON into the canonical stored form of its kind, or explains
//! every problem with a field path (`spec.replicas: must be >= 0, got -2`).
//!
//! Here: the error types, [`decode`] and the per-kind dispatch. The checks live in `meta`,
//! `pod`, `workloads`, `service` and `cluster`; their public items are re-exported here.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::apps::{Deployment, ReplicaSet};
use crate::coordination::Lease;
use crate::core::{Endpoints, Event, Namespace, Node, Pod, Service};
use crate::meta::ObjectMeta;
use crate::registry::ResourceInfo;

mod cluster;
mod meta;
mod pod;
mod service;
mod workloads;

pub use self::meta::{is_dns1123_label, is_dns1123_subdomain, validate_object_meta};
pub use self::pod::{
    default_pod_spec, validate_pod_spec, DEFAULT_TOLERATION_SECONDS, TAINT_NOT_READY,
    TAINT_UNREACHABLE,
};
pub use self::service::{
    cidrs_overlap, in_cidr, parse_ipv4_cidr, special_ip_reason, CLUSTER_IP_NONE,
    DEFAULT_CLIENT_IP_TIMEOUT_SECONDS, HOST_LOOPBACK, LOOPBACK_RANGE,
    MAX_CLIENT_IP_TIMEOUT_SECONDS, SERVICE_TYPES,
};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `spec.template.spec.containers[0].image`
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueDuplicate`,
    /// `FieldValueUnknown`.
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why an object was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        match parts.len() {
            1 => f.write_str(&parts[0]),
            _ => write!(f, "[{}]", parts.join(", ")),
        }
    }
}

impl std::error::Error for Invalid {}

/// Accumulates field errors under a path.
#[derive(Default)]
pub struct Errors {
    errors: Vec<FieldError>,
}

impl Errors {
    pub fn required(&mut self, field: impl Into<String>, what: &str) {
        self.push(
            field,
            "FieldValueRequired",
            format!("Required value: {what}"),
        );
    }
    pub fn invalid(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(field, "FieldValueInvalid", message.into());
    }
    pub fn not_supported(&mut self, field: impl Into<String>, got: &str, supported: &[&str]) {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        self.push(
            field,
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {got:?}: supported values: {}",
                list.join(", ")
            ),
        );
    }
    pub fn forbidden(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.push(
            field,
            "FieldValueForbidden",
            format!("Forbidden: {}", message.into()),
        );
    }
    pub fn duplicate(&mut self, field: impl Into<String>, value: &str) {
        self.push(
            field,
            "FieldValueDuplicate",
            format!("Duplicate value: {value:?}"),
        );
    }
    fn push(&mut self, field: impl Into<String>, reason: &'static str, message: String) {
        self.errors.push(FieldError {
            field: field.into(),
            reason,
            message,
        });
    }
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
    pub fn into_result(self) -> Result<(), Invalid> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                errors: self.errors,
            })
        }
    }
}

/// A kind that can be defaulted and validated.
pub trait Kind: Serialize + DeserializeOwned {
    fn set_defaults(&mut self) {}
    fn validate(&self, errs: &mut Errors);
    fn metadata(&self) -> &ObjectMeta;
}

/// Decode `value` strictly as the kind of `info` (unknown fields rejected with their path),
/// apply defaults, validate, and return the canonical JSON.
pub fn normalize(info: &ResourceInfo, value: Value) -> Result<Value, Invalid> {
    match info.kind {
        "Namespace" => normalize_as::<Namespace>(info, value),
        "Node" => normalize_as::<Node>(info, value),
        "Pod" => normalize_as::<Pod>(info, value),
        "Service" => normalize_as::<Service>(info, value),
        "Endpoints" => normalize_as::<Endpoints>(info, value),
        "Event" => normalize_as::<Event>(info, value),
        "Deployment" => normalize_as::<Deployment>(info, value),
        "ReplicaSet" => normalize_as::<ReplicaSet>(info, value),
        "Lease" => normalize_as::<Lease>(info, value),
        other => Err(Invalid {
            errors: vec![FieldError {
                field: "kind".into(),
                reason: "FieldValueNotSupported",
                message: format!("no validation for kind {other:?}"),
            }],
        }),
    }
}

/// Strictly decode JSON as `T`, reporting the path of the first problem.
pub fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let (field, reason, message) = if let Some(rest) = inner.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            let field = if path == "." || path.is_empty() {
                name.to_string()
            } else {
                // serde_path_to_error already includes the unknown field in the path.
                path.clone()
            };
            (
                field,
                "FieldValueUnknown",
                format!("unknown field {name:?}"),
            )
        } else {
            let field = if path == "." { String::new() } else { path };
            (field, "FieldValueInvalid", inner)
        };
        Invalid {
            errors: vec![FieldError {
                field,
                reason,
                message,
            }],
        }
    })
}

fn normalize_as<T: Kind>(_info: &ResourceInfo, value: Value) -> Result<Value, Invalid> {
    let mut obj: T = decode(value)?;
    obj.set_defaults();
    let mut errs = Errors::default();
    validate_object_meta(obj.metadata(), &mut errs);
    obj.validate(&mut errs);
    errs.into_result()?;
    Ok(serde_json::to_value(&obj).expect("a decoded object re-encodes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::resolve;
    use serde_json::json;

    /// A valid Deployment; the workload tests use it too.
    pub(super) fn deploy(replicas: i64) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "hello", "image": "hello:v1"}]}
                }
            }
        })
    }

    #[test]
    fn unknown_field_has_path() {
        let mut d = deploy(1);
        d["spec"]["template"]["spec"]["containers"][0]["imagee"] = json!("x");
        let err = normalize(resolve("deploy").unwrap(), d).unwrap_err();
        assert_eq!(
            err.errors[0].field,
            "spec.template.spec.containers[0].imagee"
        );
        assert_eq!(err.errors[0].reason, "FieldValueUnknown");
    }
}
