//! Services in writes: the cluster IP and node ports a created or updated Service gets,
//! checked against every other stored Service, and the allocated values an update keeps.
//! The allocation itself is [`allocator`]'s (pure); this is the registry's side of it.

use serde_json::Value;
use wasmctl_api::core::Service;
use wasmctl_api::registry::ResourceInfo;

use super::{ListOptions, Objects};
use crate::allocator::{self, AllocError, Allocated};
use crate::error::ApiError;

impl Objects {
    /// Gives the Service `obj` (defaulted and validated; `old` is the stored version for an
    /// update) its cluster IP and node ports, checked against every other stored Service.
    /// The caller holds `self.services.lock` until its write is committed.
    pub(super) async fn allocate_service(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        old: Option<&Value>,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let corrupt = |e: serde_json::Error| ApiError::Internal(format!("decoding a Service: {e}"));
        let all = self.list(info, None, &ListOptions::default()).await?;
        let others: Vec<Service> = all
            .items
            .into_iter()
            .filter(|v| v["metadata"]["namespace"].as_str() != ns || v["metadata"]["name"] != name)
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let taken = Allocated::from_services(&others);
        let mut svc: Service = serde_json::from_value(obj).map_err(corrupt)?;
        let old: Option<Service> = old
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(corrupt)?;
        allocator::allocate(
            &mut svc,
            old.as_ref(),
            &taken,
            &self.services.ranges,
            &mut rand::thread_rng(),
        )
        .map_err(|e| match e {
            AllocError::Invalid(inv) => ApiError::invalid(info, name, inv),
            AllocError::Full(m) => ApiError::Internal(m),
        })?;
        serde_json::to_value(&svc).map_err(corrupt)
    }
}

/// An update of a Service keeps the allocated values it omits ([`allocator::carry_over`]);
/// one that does not decode is left for validation to report.
pub(super) fn carry_over_service(current: &Value, next: Value) -> Value {
    let old = serde_json::from_value::<Service>(current.clone());
    let new = serde_json::from_value::<Service>(next.clone());
    match (old, new) {
        (Ok(old), Ok(mut new)) => {
            allocator::carry_over(&old, &mut new);
            serde_json::to_value(&new).unwrap_or(next)
        }
        _ => next,
    }
}
