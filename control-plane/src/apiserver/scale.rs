//! The `scale` subresource of Deployments and ReplicaSets (`autoscaling/v1` `Scale`), as
//! `kubectl scale` and autoscalers use it: GET reads `spec.replicas` and the status, PUT and
//! PATCH set `spec.replicas` (honouring `metadata.resourceVersion` when given).

use serde_json::{json, Value};
use wasmctl_api::registry::ResourceInfo;
use wasmctl_api::selector::Selector;

use crate::error::ApiError;
use crate::objects::{merge_patch, Objects};

/// Whether `info` serves `/scale`.
pub fn has_scale(info: &ResourceInfo) -> bool {
    info.group == "apps" && matches!(info.kind, "Deployment" | "ReplicaSet")
}

/// The `Scale` view of a Deployment or ReplicaSet.
pub fn to_scale(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = serde_json::from_value(obj["spec"]["selector"].clone())
        .ok()
        .and_then(|ls| Selector::from_label_selector(&ls).ok())
        .map(|s| s.to_string())
        .unwrap_or_default();
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

/// Sets `spec.replicas` from a `Scale` (or from a merge patch of the current `Scale`).
pub async fn update(
    objects: &Objects,
    info: &ResourceInfo,
    ns: Option<&str>,
    name: &str,
    body: &Value,
    is_patch: bool,
) -> Result<Value, ApiError> {
    let expected = match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() => Some(rv.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!("metadata.resourceVersion: invalid value {rv:?}"))
        })?),
        _ => None,
    };
    let updated = objects
        .guaranteed_update(info, ns, name, expected, |cur| {
            let mut scale = to_scale(cur);
            if is_patch {
                merge_patch(&mut scale, body);
            } else {
                scale = body.clone();
            }
            let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
            if replicas < 0 || replicas > i64::from(i32::MAX) {
                return Err(ApiError::BadRequest(format!(
                    "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                )));
            }
            let mut next = cur.clone();
            next["spec"]["replicas"] = json!(replicas);
            Ok(next)
        })
        .await?;
    Ok(to_scale(&updated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_view_of_a_deployment() {
        let d = json!({"metadata": {"name": "web", "namespace": "default", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"replicas": 2}});
        let s = to_scale(&d);
        assert_eq!(s["kind"], "Scale");
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["replicas"], 2);
        assert_eq!(s["status"]["selector"], "app=web");
        assert_eq!(s["metadata"]["resourceVersion"], "7");
    }
}
