//! Server-side printing: the `meta.k8s.io/v1` `Table` that `kubectl get` and `wasmctl get`
//! both render, with the same columns kubectl shows for the built-in kinds.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::registry::ResourceInfo;
use crate::selector::field_value;

/// (name, type, priority): priority 1 columns appear only with `-o wide`.
type Column = (&'static str, &'static str, u8);

pub fn columns(info: &ResourceInfo) -> Vec<Column> {
    match info.kind {
        "Namespace" => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        "Node" => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        "Pod" => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        "Service" => vec![
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        "Endpoints" => vec![
            ("Name", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        "Event" => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        "Deployment" => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "ReplicaSet" => vec![
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "Lease" => vec![
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
        _ => vec![("Name", "string", 0), ("Age", "string", 0)],
    }
}

/// kubectl's `HumanDuration`: 45s, 3m20s, 14m, 5h12m, 36h, 3d4h, 120d, 2y30d.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        let s = secs % 60;
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        let mm = m % 60;
        if mm == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{mm}m")
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        let hh = h % 24;
        if hh == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{hh}h")
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        let y = d / 365;
        let dd = d % 365;
        if y < 8 && dd != 0 {
            format!("{y}y{dd}d")
        } else {
            format!("{y}y")
        }
    }
}

fn age(obj: &Value, now: DateTime<Utc>) -> String {
    let ts = field_value(obj, "metadata.creationTimestamp");
    match DateTime::parse_from_rfc3339(&ts) {
        Ok(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

fn int(obj: &Value, path: &str) -> i64 {
    field_value(obj, path).parse().unwrap_or(0)
}

fn arr<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter())
        .into_iter()
        .flatten()
}

fn selector_string(v: Option<&Value>) -> String {
    let Some(map) = v.and_then(Value::as_object) else {
        return "<none>".into();
    };
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
    or_none(parts.join(","))
}

fn pod_status(pod: &Value) -> String {
    let st = &pod["status"];
    let mut reason = s(&st["phase"]);
    if let Some(r) = st.get("reason").and_then(Value::as_str) {
        reason = r.to_string();
    }
    for cs in arr(st, "containerStatuses") {
        if let Some(r) = cs["state"]["waiting"]["reason"].as_str() {
            reason = r.to_string();
        } else if let Some(t) = cs["state"].get("terminated") {
            if let Some(r) = t["reason"].as_str() {
                reason = r.to_string();
            } else {
                reason = format!("ExitCode:{}", t["exitCode"]);
            }
        }
    }
    if pod["metadata"].get("deletionTimestamp").is_some() {
        reason = "Terminating".into();
    }
    if reason.is_empty() {
        "Pending".into()
    } else {
        reason
    }
}

fn workload_containers(obj: &Value) -> (String, String) {
    let cs: Vec<&Value> = arr(&obj["spec"]["template"]["spec"], "containers").collect();
    let names: Vec<String> = cs.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<String> = cs.iter().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

fn label_selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
        .unwrap_or_default();
    for e in arr(sel, "matchExpressions") {
        let vals: Vec<String> = arr(e, "values").map(s).collect();
        parts.push(match s(&e["operator"]).as_str() {
            "In" => format!("{} in ({})", s(&e["key"]), vals.join(",")),
            "NotIn" => format!("{} notin ({})", s(&e["key"]), vals.join(",")),
            "Exists" => s(&e["key"]),
            _ => format!("!{}", s(&e["key"])),
        });
    }
    or_none(parts.join(","))
}

/// The cells of one row.
pub fn row(info: &ResourceInfo, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = json!(s(&obj["metadata"]["name"]));
    let age = json!(age(obj, now));
    match info.kind {
        "Namespace" => vec![name, json!(s(&obj["status"]["phase"])), age],
        "Node" => {
            let st = &obj["status"];
            let ready = arr(st, "conditions")
                .find(|c| c["type"] == "Ready")
                .map(|c| match c["status"].as_str() {
                    Some("True") => "Ready",
                    Some("False") => "NotReady",
                    _ => "Unknown",
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if obj["spec"]["unschedulable"] == json!(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = obj["metadata"]["labels"]
                .as_object()
                .map(|m| {
                    m.keys()
                        .filter_map(|k| {
                            k.strip_prefix("node-role.kubernetes.io/").map(String::from)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ip = arr(st, "addresses")
                .find(|a| a["type"] == "InternalIP")
                .map(|a| s(&a["address"]))
                .unwrap_or_default();
            let info_ = &st["nodeInfo"];
            vec![
                name,
                json!(status),
                json!(or_none(roles.join(","))),
                age,
                json!(s(&info_["kubeletVersion"])),
                json!(or_none(ip)),
                json!(or_none(s(&info_["osImage"]))),
                json!(or_none(s(&info_["kernelVersion"]))),
                json!(or_none(s(&info_["containerRuntimeVersion"]))),
            ]
        }
        "Pod" => {
            let total = arr(&obj["spec"], "containers").count();
            let statuses: Vec<&Value> = arr(&obj["status"], "containerStatuses").collect();
            let ready = statuses
                .iter()
                .filter(|c| c["ready"] == json!(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(obj)),
                json!(restarts.to_string()),
                age,
                json!(or_none(s(&obj["status"]["podIP"]))),
                json!(or_none(s(&obj["spec"]["nodeName"]))),
            ]
        }
        "Service" => {
            let spec = &obj["spec"];
            let ports: Vec<String> = arr(spec, "ports")
                .map(|p| {
                    let proto = p["protocol"].as_str().unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{}:{np}/{proto}", p["port"]),
                        None => format!("{}/{proto}", p["port"]),
                    }
                })
                .collect();
            vec![
                name,
                json!(s(&spec["type"])),
                json!(or_none(s(&spec["clusterIP"]))),
                json!("<none>"),
                json!(or_none(ports.join(","))),
                age,
                json!(selector_string(spec.get("selector"))),
            ]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for ss in arr(obj, "subsets") {
                for a in arr(ss, "addresses") {
                    for p in arr(ss, "ports") {
                        eps.push(format!("{}:{}", s(&a["ip"]), p["port"]));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                or_none(eps.join(","))
            };
            vec![name, json!(shown), age]
        }
        "Event" => {
            let last = ["lastTimestamp", "eventTime", "firstTimestamp"]
                .iter()
                .map(|f| s(&obj[*f]))
                .find(|v| !v.is_empty())
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| human_duration((now - t.with_timezone(&Utc)).num_seconds()))
                .unwrap_or_else(|| "<unknown>".into());
            let io = &obj["involvedObject"];
            vec![
                json!(last),
                json!(s(&obj["type"])),
                json!(s(&obj["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&io["kind"]).to_ascii_lowercase(),
                    s(&io["name"])
                )),
                json!(s(&obj["message"])),
            ]
        }
        "Deployment" => {
            let (c, i) = workload_containers(obj);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    int(obj, "status.readyReplicas"),
                    int(obj, "spec.replicas")
                )),
                json!(int(obj, "status.updatedReplicas")),
                json!(int(obj, "status.availableReplicas")),
                age,
                json!(c),
                json!(i),
                json!(label_selector_string(&obj["spec"]["selector"])),
            ]
        }
        "ReplicaSet" => {
            let (c, i) = workload_containers(obj);
            vec![
                name,
                json!(int(obj, "spec.replicas")),
                json!(int(obj, "status.replicas")),
                json!(int(obj, "status.readyReplicas")),
                age,
                json!(c),
                json!(i),
                json!(label_selector_string(&obj["spec"]["selector"])),
            ]
        }
        "Lease" => vec![name, json!(or_none(s(&obj["spec"]["holderIdentity"]))), age],
        _ => vec![name, age],
    }
}

/// What each row carries besides its cells (`?includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// Build a `Table` for `items`.
pub fn table(
    info: &ResourceInfo,
    items: &[Value],
    resource_version: &str,
    continue_token: Option<&str>,
    include: IncludeObject,
    now: DateTime<Utc>,
) -> Value {
    let defs: Vec<Value> = columns(info)
        .into_iter()
        .map(|(name, ty, priority)| {
            json!({
                "name": name, "type": ty,
                "format": if name == "Name" { "name" } else { "" },
                "description": "", "priority": priority
            })
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let object = match include {
                IncludeObject::None => Value::Null,
                IncludeObject::Metadata => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }),
                IncludeObject::Object => obj.clone(),
            };
            json!({"cells": row(info, obj, now), "object": object})
        })
        .collect();
    let mut meta = json!({"resourceVersion": resource_version});
    if let Some(c) = continue_token {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(14 * 60), "14m");
        assert_eq!(human_duration(5 * 3600 + 12 * 60), "5h12m");
        assert_eq!(human_duration(36 * 3600), "36h");
        assert_eq!(human_duration(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(human_duration(120 * 86400), "120d");
    }

    #[test]
    fn pod_row() {
        let pod = json!({
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "127.1.0.2", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
            ]}
        });
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let cells = row(crate::registry::resolve("pod").unwrap(), &pod, now);
        assert_eq!(
            cells,
            vec![
                json!("p"),
                json!("1/2"),
                json!("CrashLoopBackOff"),
                json!("3"),
                json!("30s"),
                json!("127.1.0.2"),
                json!("n1")
            ]
        );
    }
}
