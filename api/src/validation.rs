//! Decode, default and validate an object once, on its way into the cluster.
//!
//! [`normalize`] turns untrusted JSON into the canonical stored form of its kind, or explains
//! every problem with a field path (`spec.replicas: must be >= 0, got -2`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::apps::{
    Deployment, DeploymentStrategy, PodTemplateSpec, ReplicaSet, RollingUpdateDeployment,
};
use crate::coordination::Lease;
use crate::core::{
    Container, Endpoints, Event, Namespace, NamespaceStatus, Node, Pod, PodSpec, PodStatus, Probe,
    Service, Toleration,
};
use crate::meta::{IntOrString, LabelSelector, ObjectMeta};
use crate::registry::ResourceInfo;
use crate::selector::Selector;

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

// ---------------------------------------------------------------- name and label syntax

/// DNS-1123 subdomain: lowercase alphanumerics, '-' and '.', at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("must be 1 to 253 characters, got {}", s.len()));
    }
    for label in s.split('.') {
        is_dns1123_label_chars(label).map_err(|_| {
            format!(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
                 '-' or '.', and must start and end with an alphanumeric character (got {s:?})"
            )
        })?;
    }
    Ok(())
}

/// DNS-1123 label: lowercase alphanumerics and '-', at most 63 characters.
pub fn is_dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!(
            "must be 1 to 63 characters, got {} ({s:?})",
            s.len()
        ));
    }
    is_dns1123_label_chars(s).map_err(|_| {
        format!(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character (got {s:?})"
        )
    })
}

fn is_dns1123_label_chars(s: &str) -> Result<(), ()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let b = s.as_bytes();
    if s.is_empty()
        || !s.chars().all(ok_char)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
    {
        return Err(());
    }
    Ok(())
}

fn is_qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        is_dns1123_subdomain(p).map_err(|e| format!("prefix part {e}"))?;
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
             and end with an alphanumeric character, at most 63 characters (got {s:?})"
        ));
    }
    Ok(())
}

fn is_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    is_qualified_name(v).map_err(|_| {
        format!(
            "a valid label value must be 63 characters or less and must be empty or begin and \
             end with an alphanumeric character, with '-', '_' or '.' between (got {v:?})"
        )
    })
}

fn validate_labels(labels: &BTreeMap<String, String>, path: &str, errs: &mut Errors) {
    for (k, v) in labels {
        if let Err(e) = is_qualified_name(k) {
            errs.invalid(format!("{path}[{k}]"), format!("invalid label key: {e}"));
        }
        if let Err(e) = is_label_value(v) {
            errs.invalid(format!("{path}[{k}]"), e);
        }
    }
}

/// Validate the metadata every object has (the name may be empty when `generateName` is set;
/// the server fills it before validating again).
pub fn validate_object_meta(meta: &ObjectMeta, errs: &mut Errors) {
    validate_meta_at(meta, "metadata", errs, true);
}

fn validate_meta_at(meta: &ObjectMeta, path: &str, errs: &mut Errors, need_name: bool) {
    if meta.name.is_empty() {
        if need_name && meta.generate_name.as_deref().unwrap_or("").is_empty() {
            errs.required(format!("{path}.name"), "name or generateName is required");
        }
    } else if let Err(e) = is_dns1123_subdomain(&meta.name) {
        errs.invalid(format!("{path}.name"), e);
    }
    validate_labels(&meta.labels, &format!("{path}.labels"), errs);
    let total: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if total > 256 * 1024 {
        errs.invalid(
            format!("{path}.annotations"),
            format!("must have at most 262144 bytes, got {total}"),
        );
    }
    for k in meta.annotations.keys() {
        if let Err(e) = is_qualified_name(k) {
            errs.invalid(
                format!("{path}.annotations[{k}]"),
                format!("invalid annotation key: {e}"),
            );
        }
    }
    if let Some(g) = meta.generation {
        if g < 0 {
            errs.invalid(
                format!("{path}.generation"),
                format!("must be >= 0, got {g}"),
            );
        }
    }
}

fn non_negative(v: Option<i64>, field: &str, errs: &mut Errors) {
    if let Some(v) = v {
        if v < 0 {
            errs.invalid(field, format!("must be >= 0, got {v}"));
        }
    }
}

fn port_number(p: i32, field: &str, errs: &mut Errors) {
    if !(1..=65535).contains(&p) {
        errs.invalid(
            field,
            format!("must be between 1 and 65535, inclusive, got {p}"),
        );
    }
}

fn one_of(v: Option<&str>, field: &str, allowed: &[&str], errs: &mut Errors) {
    if let Some(v) = v {
        if !allowed.contains(&v) {
            errs.not_supported(field, v, allowed);
        }
    }
}

// ---------------------------------------------------------------- Namespace

impl Kind for Namespace {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        let status = self.status.get_or_insert_with(NamespaceStatus::default);
        if status.phase.is_none() {
            status.phase = Some("Active".into());
        }
    }
    fn validate(&self, errs: &mut Errors) {
        if !self.metadata.name.is_empty() {
            if let Err(e) = is_dns1123_label(&self.metadata.name) {
                errs.invalid("metadata.name", e);
            }
        }
        if let Some(s) = &self.status {
            one_of(
                s.phase.as_deref(),
                "status.phase",
                &["Active", "Terminating"],
                errs,
            );
        }
    }
}

// ---------------------------------------------------------------- Node

const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

impl Kind for Node {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn validate(&self, errs: &mut Errors) {
        for (i, t) in self.spec.taints.iter().enumerate() {
            let p = format!("spec.taints[{i}]");
            if let Err(e) = is_qualified_name(&t.key) {
                errs.invalid(format!("{p}.key"), e);
            }
            if !TAINT_EFFECTS.contains(&t.effect.as_str()) {
                errs.not_supported(format!("{p}.effect"), &t.effect, TAINT_EFFECTS);
            }
        }
        if let Some(st) = &self.status {
            for (field, map) in [("capacity", &st.capacity), ("allocatable", &st.allocatable)] {
                for (k, q) in map {
                    if let Err(e) = q.parse() {
                        errs.invalid(format!("status.{field}[{k}]"), e);
                    }
                }
            }
            for (i, c) in st.conditions.iter().enumerate() {
                one_of(
                    Some(c.status.as_str()),
                    &format!("status.conditions[{i}].status"),
                    &["True", "False", "Unknown"],
                    errs,
                );
            }
        }
    }
}

// ---------------------------------------------------------------- Pod

const RESTART_POLICIES: &[&str] = &["Always", "OnFailure", "Never"];

/// Tolerations every pod gets unless it says otherwise (Kubernetes' DefaultTolerationSeconds).
pub const DEFAULT_TOLERATION_SECONDS: i64 = 300;
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";

pub fn default_pod_spec(spec: &mut PodSpec) {
    if spec.restart_policy.is_none() {
        spec.restart_policy = Some("Always".into());
    }
    if spec.termination_grace_period_seconds.is_none() {
        spec.termination_grace_period_seconds = Some(30);
    }
    if spec.scheduler_name.is_none() {
        spec.scheduler_name = Some("default-scheduler".into());
    }
    for c in &mut spec.containers {
        default_container(c);
    }
    for taint in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
        let has = spec.tolerations.iter().any(|t| {
            t.key.as_deref() == Some(taint)
                || (t.key.is_none() && t.operator.as_deref() == Some("Exists"))
        });
        if !has {
            spec.tolerations.push(Toleration {
                key: Some(taint.into()),
                operator: Some("Exists".into()),
                value: None,
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(DEFAULT_TOLERATION_SECONDS),
            });
        }
    }
    for t in &mut spec.tolerations {
        if t.operator.is_none() {
            t.operator = Some("Equal".into());
        }
    }
}

fn default_container(c: &mut Container) {
    for p in &mut c.ports {
        if p.protocol.is_none() {
            p.protocol = Some("TCP".into());
        }
    }
    if c.image_pull_policy.is_none() {
        c.image_pull_policy = Some("IfNotPresent".into());
    }
    for probe in [&mut c.readiness_probe, &mut c.liveness_probe]
        .into_iter()
        .flatten()
    {
        default_probe(probe);
    }
}

fn default_probe(p: &mut Probe) {
    p.initial_delay_seconds.get_or_insert(0);
    p.period_seconds.get_or_insert(10);
    p.timeout_seconds.get_or_insert(1);
    p.success_threshold.get_or_insert(1);
    p.failure_threshold.get_or_insert(3);
    if let Some(h) = &mut p.http_get {
        h.path.get_or_insert_with(|| "/".into());
        h.scheme.get_or_insert_with(|| "HTTP".into());
    }
}

pub fn validate_pod_spec(spec: &PodSpec, path: &str, errs: &mut Errors) {
    if spec.containers.is_empty() {
        errs.required(
            format!("{path}.containers"),
            "at least one container (Wasm component) is required",
        );
    }
    let volume_names: BTreeSet<&str> = spec.volumes.iter().map(|v| v.name.as_str()).collect();
    let mut seen_vol = BTreeSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let p = format!("{path}.volumes[{i}]");
        if let Err(e) = is_dns1123_label(&v.name) {
            errs.invalid(format!("{p}.name"), e);
        }
        if !seen_vol.insert(v.name.as_str()) {
            errs.duplicate(format!("{p}.name"), &v.name);
        }
        match &v.empty_dir {
            None => errs.required(
                format!("{p}.emptyDir"),
                "only emptyDir volumes are supported",
            ),
            Some(ed) => {
                if let Some(q) = &ed.size_limit {
                    if let Err(e) = q.bytes() {
                        errs.invalid(format!("{p}.emptyDir.sizeLimit"), e);
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let p = format!("{path}.containers[{i}]");
        if c.name.is_empty() {
            errs.required(format!("{p}.name"), "container name");
        } else if let Err(e) = is_dns1123_label(&c.name) {
            errs.invalid(format!("{p}.name"), e);
        } else if !names.insert(c.name.as_str()) {
            errs.duplicate(format!("{p}.name"), &c.name);
        }
        if c.image.trim().is_empty() {
            errs.required(format!("{p}.image"), "a Wasm module reference");
        }
        let mut port_names = BTreeSet::new();
        for (j, port) in c.ports.iter().enumerate() {
            let pp = format!("{p}.ports[{j}]");
            port_number(port.container_port, &format!("{pp}.containerPort"), errs);
            if !host_ports.insert(port.container_port) {
                errs.duplicate(
                    format!("{pp}.containerPort"),
                    &format!(
                        "{} (ports are shared by the whole pod)",
                        port.container_port
                    ),
                );
            }
            one_of(
                port.protocol.as_deref(),
                &format!("{pp}.protocol"),
                &["TCP"],
                errs,
            );
            if let Some(n) = &port.name {
                if n.is_empty() || n.len() > 15 || is_dns1123_label(n).is_err() {
                    errs.invalid(
                        format!("{pp}.name"),
                        format!("must be an IANA_SVC_NAME (at most 15 characters, lowercase alphanumerics and '-'), got {n:?}"),
                    );
                } else if !port_names.insert(n.as_str()) {
                    errs.duplicate(format!("{pp}.name"), n);
                }
            }
        }
        let mut env_seen = BTreeSet::new();
        for (j, e) in c.env.iter().enumerate() {
            if e.name.is_empty() {
                errs.required(format!("{p}.env[{j}].name"), "environment variable name");
            }
            if !env_seen.insert(e.name.as_str()) {
                errs.duplicate(format!("{p}.env[{j}].name"), &e.name);
            }
        }
        validate_resources(c, &p, errs);
        for (probe, field) in [
            (&c.readiness_probe, "readinessProbe"),
            (&c.liveness_probe, "livenessProbe"),
        ] {
            if let Some(pr) = probe {
                validate_probe(pr, &format!("{p}.{field}"), errs);
            }
        }
        for (j, m) in c.volume_mounts.iter().enumerate() {
            if !volume_names.contains(m.name.as_str()) {
                errs.invalid(
                    format!("{p}.volumeMounts[{j}].name"),
                    format!("volume {:?} not found in {path}.volumes", m.name),
                );
            }
            if !m.mount_path.starts_with('/') {
                errs.invalid(
                    format!("{p}.volumeMounts[{j}].mountPath"),
                    format!("must be an absolute path, got {:?}", m.mount_path),
                );
            }
        }
        one_of(
            c.image_pull_policy.as_deref(),
            &format!("{p}.imagePullPolicy"),
            &["Always", "IfNotPresent", "Never"],
            errs,
        );
    }
    one_of(
        spec.restart_policy.as_deref(),
        &format!("{path}.restartPolicy"),
        RESTART_POLICIES,
        errs,
    );
    non_negative(
        spec.termination_grace_period_seconds,
        &format!("{path}.terminationGracePeriodSeconds"),
        errs,
    );
    if let Some(n) = &spec.node_name {
        if !n.is_empty() {
            if let Err(e) = is_dns1123_subdomain(n) {
                errs.invalid(format!("{path}.nodeName"), e);
            }
        }
    }
    validate_labels(&spec.node_selector, &format!("{path}.nodeSelector"), errs);
    for (i, t) in spec.tolerations.iter().enumerate() {
        let p = format!("{path}.tolerations[{i}]");
        one_of(
            t.operator.as_deref(),
            &format!("{p}.operator"),
            &["Exists", "Equal"],
            errs,
        );
        one_of(
            t.effect.as_deref(),
            &format!("{p}.effect"),
            TAINT_EFFECTS,
            errs,
        );
        if t.operator.as_deref() == Some("Exists")
            && t.value.as_deref().is_some_and(|v| !v.is_empty())
        {
            errs.invalid(
                format!("{p}.value"),
                "must be empty when `operator` is 'Exists'",
            );
        }
        if t.key.is_none() && t.operator.as_deref() != Some("Exists") {
            errs.invalid(
                format!("{p}.operator"),
                "must be 'Exists' when `key` is empty",
            );
        }
        if t.toleration_seconds.is_some() && t.effect.as_deref() != Some("NoExecute") {
            errs.invalid(
                format!("{p}.tolerationSeconds"),
                "may only be set when `effect` is 'NoExecute'",
            );
        }
    }
}

fn validate_resources(c: &Container, p: &str, errs: &mut Errors) {
    let mut parsed: BTreeMap<(&str, &str), i128> = BTreeMap::new();
    for (kind, map) in [
        ("requests", &c.resources.requests),
        ("limits", &c.resources.limits),
    ] {
        for (name, q) in map {
            let field = format!("{p}.resources.{kind}.{name}");
            if !["cpu", "memory", "ephemeral-storage"].contains(&name.as_str()) {
                errs.not_supported(&field, name, &["cpu", "memory", "ephemeral-storage"]);
                continue;
            }
            match q.parse() {
                Ok(v) if v.millis < 0 => errs.invalid(&field, format!("must be >= 0, got {q}")),
                Ok(v) => {
                    parsed.insert((kind, name.as_str()), v.millis);
                }
                Err(e) => errs.invalid(&field, e),
            }
        }
    }
    for name in ["cpu", "memory"] {
        if let (Some(req), Some(lim)) = (
            parsed.get(&("requests", name)),
            parsed.get(&("limits", name)),
        ) {
            if req > lim {
                errs.invalid(
                    format!("{p}.resources.requests.{name}"),
                    format!(
                        "must be less than or equal to {name} limit of {}, got {}",
                        c.resources.limits[name], c.resources.requests[name]
                    ),
                );
            }
        }
    }
}

fn validate_probe(p: &Probe, path: &str, errs: &mut Errors) {
    let handlers = usize::from(p.http_get.is_some()) + usize::from(p.tcp_socket.is_some());
    if handlers != 1 {
        errs.required(
            path,
            "exactly one of httpGet or tcpSocket must be specified",
        );
    }
    if let Some(h) = &p.http_get {
        validate_port_ref(&h.port, &format!("{path}.httpGet.port"), errs);
        one_of(
            h.scheme.as_deref(),
            &format!("{path}.httpGet.scheme"),
            &["HTTP"],
            errs,
        );
        if let Some(pth) = &h.path {
            if !pth.starts_with('/') {
                errs.invalid(
                    format!("{path}.httpGet.path"),
                    format!("must start with '/', got {pth:?}"),
                );
            }
        }
    }
    if let Some(t) = &p.tcp_socket {
        validate_port_ref(&t.port, &format!("{path}.tcpSocket.port"), errs);
    }
    for (v, f, min) in [
        (p.initial_delay_seconds, "initialDelaySeconds", 0),
        (p.period_seconds, "periodSeconds", 1),
        (p.timeout_seconds, "timeoutSeconds", 1),
        (p.success_threshold, "successThreshold", 1),
        (p.failure_threshold, "failureThreshold", 1),
    ] {
        if let Some(v) = v {
            if v < min {
                errs.invalid(format!("{path}.{f}"), format!("must be >= {min}, got {v}"));
            }
        }
    }
}

fn validate_port_ref(p: &IntOrString, field: &str, errs: &mut Errors) {
    match p {
        IntOrString::Int(n) => port_number(*n, field, errs),
        IntOrString::String(s) => {
            if s.is_empty() || s.len() > 15 || is_dns1123_label(s).is_err() {
                errs.invalid(
                    field,
                    format!("must be a port number or an IANA_SVC_NAME, got {s:?}"),
                );
            }
        }
    }
}

impl Kind for Pod {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        default_pod_spec(&mut self.spec);
        let st = self.status.get_or_insert_with(PodStatus::default);
        if st.phase.is_none() {
            st.phase = Some("Pending".into());
        }
    }
    fn validate(&self, errs: &mut Errors) {
        validate_pod_spec(&self.spec, "spec", errs);
        if let Some(st) = &self.status {
            one_of(
                st.phase.as_deref(),
                "status.phase",
                &["Pending", "Running", "Succeeded", "Failed", "Unknown"],
                errs,
            );
        }
    }
}

// ---------------------------------------------------------------- Deployment / ReplicaSet

fn validate_selector_and_template(
    selector: Option<&LabelSelector>,
    template: &PodTemplateSpec,
    errs: &mut Errors,
) {
    match selector {
        None => errs.required("spec.selector", "a label selector"),
        Some(sel) => match Selector::from_label_selector(sel) {
            Err(e) => errs.invalid("spec.selector", e),
            Ok(s) if s.is_empty() => {
                errs.invalid("spec.selector", "empty selector is invalid for a workload")
            }
            Ok(s) => {
                validate_labels(&sel.match_labels, "spec.selector.matchLabels", errs);
                if !s.matches(&template.metadata.labels) {
                    errs.invalid(
                        "spec.template.metadata.labels",
                        format!(
                            "`selector` does not match template `labels` (selector {s}, labels {:?})",
                            template.metadata.labels
                        ),
                    );
                }
            }
        },
    }
    validate_meta_at(&template.metadata, "spec.template.metadata", errs, false);
    validate_pod_spec(&template.spec, "spec.template.spec", errs);
    if let Some(rp) = &template.spec.restart_policy {
        if rp != "Always" {
            errs.not_supported("spec.template.spec.restartPolicy", rp, &["Always"]);
        }
    }
}

fn replicas_ok(r: Option<i32>, errs: &mut Errors) {
    if let Some(r) = r {
        if r < 0 {
            errs.invalid("spec.replicas", format!("must be >= 0, got {r}"));
        }
    }
}

impl Kind for Deployment {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        let s = &mut self.spec;
        s.replicas.get_or_insert(1);
        s.revision_history_limit.get_or_insert(10);
        s.progress_deadline_seconds.get_or_insert(600);
        s.min_ready_seconds.get_or_insert(0);
        let strategy = s.strategy.get_or_insert_with(DeploymentStrategy::default);
        let t = strategy.type_.get_or_insert_with(|| "RollingUpdate".into());
        if t == "RollingUpdate" {
            let ru = strategy
                .rolling_update
                .get_or_insert_with(RollingUpdateDeployment::default);
            ru.max_surge
                .get_or_insert_with(|| IntOrString::String("25%".into()));
            ru.max_unavailable
                .get_or_insert_with(|| IntOrString::String("25%".into()));
        }
        default_pod_spec(&mut s.template.spec);
    }
    fn validate(&self, errs: &mut Errors) {
        let s = &self.spec;
        replicas_ok(s.replicas, errs);
        validate_selector_and_template(s.selector.as_ref(), &s.template, errs);
        non_negative(
            s.min_ready_seconds.map(i64::from),
            "spec.minReadySeconds",
            errs,
        );
        non_negative(
            s.revision_history_limit.map(i64::from),
            "spec.revisionHistoryLimit",
            errs,
        );
        if let Some(pd) = s.progress_deadline_seconds {
            if pd <= s.min_ready_seconds.unwrap_or(0) {
                errs.invalid(
                    "spec.progressDeadlineSeconds",
                    format!("must be greater than minReadySeconds, got {pd}"),
                );
            }
        }
        if let Some(st) = &s.strategy {
            let t = st.type_.as_deref().unwrap_or("RollingUpdate");
            one_of(
                Some(t),
                "spec.strategy.type",
                &["RollingUpdate", "Recreate"],
                errs,
            );
            if t == "Recreate" && st.rolling_update.is_some() {
                errs.invalid(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy `type` is 'Recreate'",
                );
            }
            if let Some(ru) = &st.rolling_update {
                let mut vals = Vec::new();
                for (v, f) in [
                    (&ru.max_surge, "maxSurge"),
                    (&ru.max_unavailable, "maxUnavailable"),
                ] {
                    let field = format!("spec.strategy.rollingUpdate.{f}");
                    match v {
                        None => vals.push(0),
                        Some(v) => match v.scaled_value(100, true) {
                            Err(e) => errs.invalid(&field, e),
                            Ok(n) if n < 0 => {
                                errs.invalid(&field, format!("must be >= 0, got {v}"))
                            }
                            Ok(n) => {
                                if f == "maxUnavailable"
                                    && matches!(v, IntOrString::String(_))
                                    && n > 100
                                {
                                    errs.invalid(
                                        &field,
                                        format!("must not be greater than 100%, got {v}"),
                                    );
                                }
                                vals.push(n)
                            }
                        },
                    }
                }
                if vals.len() == 2 && vals[0] == 0 && vals[1] == 0 {
                    errs.invalid(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        "may not be 0 when `maxSurge` is 0",
                    );
                }
            }
        }
    }
}

impl Kind for ReplicaSet {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        self.spec.replicas.get_or_insert(1);
        self.spec.min_ready_seconds.get_or_insert(0);
        default_pod_spec(&mut self.spec.template.spec);
    }
    fn validate(&self, errs: &mut Errors) {
        replicas_ok(self.spec.replicas, errs);
        validate_selector_and_template(self.spec.selector.as_ref(), &self.spec.template, errs);
        non_negative(
            self.spec.min_ready_seconds.map(i64::from),
            "spec.minReadySeconds",
            errs,
        );
    }
}

// ---------------------------------------------------------------- Service

/// The Service types this cluster implements (no cloud load balancers, no DNS aliases).
pub const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort"];
/// `spec.clusterIP` of a headless Service.
pub const CLUSTER_IP_NONE: &str = "None";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours) and maximum.
pub const DEFAULT_CLIENT_IP_TIMEOUT_SECONDS: i32 = 10800;
pub const MAX_CLIENT_IP_TIMEOUT_SECONDS: i32 = 86400;

impl Kind for Service {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        let s = &mut self.spec;
        s.type_.get_or_insert_with(|| "ClusterIP".into());
        s.session_affinity.get_or_insert_with(|| "None".into());
        if s.session_affinity.as_deref() == Some("ClientIP") {
            let cfg = s
                .session_affinity_config
                .get_or_insert_with(Default::default);
            cfg.client_ip
                .get_or_insert_with(Default::default)
                .timeout_seconds
                .get_or_insert(DEFAULT_CLIENT_IP_TIMEOUT_SECONDS);
        }
        for p in &mut s.ports {
            p.protocol.get_or_insert_with(|| "TCP".into());
            if p.target_port.is_none() {
                p.target_port = Some(IntOrString::Int(p.port));
            }
            // 0 means "not set" (allocate one) as in Kubernetes.
            if p.node_port == Some(0) {
                p.node_port = None;
            }
        }
        // `clusterIP` and `clusterIPs[0]` are one value; either may be given.
        if s.cluster_ip.as_deref() == Some("") {
            s.cluster_ip = None;
        }
        match (&s.cluster_ip, s.cluster_ips.first()) {
            (Some(ip), None) => s.cluster_ips = vec![ip.clone()],
            (None, Some(ip)) => s.cluster_ip = Some(ip.clone()),
            _ => {}
        }
    }
    fn validate(&self, errs: &mut Errors) {
        if !self.metadata.name.is_empty() {
            if let Err(e) = is_dns1123_label(&self.metadata.name) {
                errs.invalid("metadata.name", e);
            }
        }
        let s = &self.spec;
        let t = s.type_.as_deref().unwrap_or("ClusterIP");
        one_of(Some(t), "spec.type", SERVICE_TYPES, errs);
        validate_labels(&s.selector, "spec.selector", errs);
        one_of(
            s.session_affinity.as_deref(),
            "spec.sessionAffinity",
            &["None", "ClientIP"],
            errs,
        );
        if let Some(cfg) = &s.session_affinity_config {
            if s.session_affinity.as_deref() != Some("ClientIP") {
                errs.invalid(
                    "spec.sessionAffinityConfig",
                    "must not be set when session affinity is None",
                );
            }
            if let Some(t) = cfg.client_ip.as_ref().and_then(|c| c.timeout_seconds) {
                if !(1..=MAX_CLIENT_IP_TIMEOUT_SECONDS).contains(&t) {
                    errs.invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!(
                            "Invalid value: {t}: must be greater than 0 and less than {MAX_CLIENT_IP_TIMEOUT_SECONDS}"
                        ),
                    );
                }
            }
        }
        let headless = s.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
        if s.ports.is_empty() && !headless {
            errs.required("spec.ports", "at least one port");
        }
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut node_ports = BTreeSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            let pp = format!("spec.ports[{i}]");
            port_number(p.port, &format!("{pp}.port"), errs);
            one_of(
                p.protocol.as_deref(),
                &format!("{pp}.protocol"),
                &["TCP"],
                errs,
            );
            if !ports.insert(p.port) {
                errs.duplicate(format!("{pp}.port"), &p.port.to_string());
            }
            match &p.name {
                Some(n) => {
                    if let Err(e) = is_dns1123_label(n) {
                        errs.invalid(format!("{pp}.name"), e);
                    }
                    if !names.insert(n.clone()) {
                        errs.duplicate(format!("{pp}.name"), n);
                    }
                }
                None if s.ports.len() > 1 => errs.required(
                    format!("{pp}.name"),
                    "a name is required when a service has several ports",
                ),
                None => {}
            }
            if let Some(tp) = &p.target_port {
                validate_port_ref(tp, &format!("{pp}.targetPort"), errs);
            }
            // The range is the server's (`--service-node-port-range`): it checks it when it
            // allocates.
            if let Some(np) = p.node_port.filter(|n| *n != 0) {
                if t != "NodePort" {
                    errs.forbidden(
                        format!("{pp}.nodePort"),
                        format!("may not be used when `type` is '{t}'"),
                    );
                } else if !(1..=65535).contains(&np) {
                    errs.invalid(
                        format!("{pp}.nodePort"),
                        format!("Invalid value: {np}: must be between 1 and 65535, inclusive"),
                    );
                } else if !node_ports.insert(np) {
                    errs.duplicate(format!("{pp}.nodePort"), &np.to_string());
                }
            }
        }
        if s.cluster_ips.len() > 1 {
            errs.invalid(
                "spec.clusterIPs",
                format!(
                    "Invalid value: {:?}: this cluster is single-stack IPv4: at most one cluster IP",
                    s.cluster_ips
                ),
            );
        }
        if let Some(first) = s.cluster_ips.first() {
            if s.cluster_ip.as_ref() != Some(first) {
                errs.invalid(
                    "spec.clusterIPs",
                    format!(
                        "Invalid value: {:?}: first value must match `clusterIP`",
                        s.cluster_ips
                    ),
                );
            } else if first == CLUSTER_IP_NONE {
                if t == "NodePort" {
                    errs.invalid(
                        "spec.clusterIPs[0]",
                        "Invalid value: \"None\": may not be set to 'None' for NodePort services",
                    );
                }
            } else if first.parse::<std::net::Ipv4Addr>().is_err() {
                errs.invalid(
                    "spec.clusterIPs[0]",
                    format!(
                        "Invalid value: {first:?}: must be a valid IPv4 address, (e.g. 10.9.8.7)"
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------- Endpoints, Event, Lease

impl Kind for Endpoints {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn validate(&self, errs: &mut Errors) {
        for (i, ss) in self.subsets.iter().enumerate() {
            for (list, f) in [
                (&ss.addresses, "addresses"),
                (&ss.not_ready_addresses, "notReadyAddresses"),
            ] {
                for (j, a) in list.iter().enumerate() {
                    if a.ip.parse::<std::net::IpAddr>().is_err() {
                        errs.invalid(
                            format!("subsets[{i}].{f}[{j}].ip"),
                            format!("must be a valid IP address, got {:?}", a.ip),
                        );
                    }
                }
            }
            for (j, p) in ss.ports.iter().enumerate() {
                port_number(p.port, &format!("subsets[{i}].ports[{j}].port"), errs);
            }
        }
    }
}

impl Kind for Event {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn set_defaults(&mut self) {
        self.type_.get_or_insert_with(|| "Normal".into());
        self.count.get_or_insert(1);
    }
    fn validate(&self, errs: &mut Errors) {
        if self
            .involved_object
            .name
            .as_deref()
            .unwrap_or("")
            .is_empty()
        {
            errs.required("involvedObject.name", "the object this event is about");
        }
        one_of(self.type_.as_deref(), "type", &["Normal", "Warning"], errs);
    }
}

impl Kind for Lease {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn validate(&self, errs: &mut Errors) {
        if let Some(d) = self.spec.lease_duration_seconds {
            if d <= 0 {
                errs.invalid("spec.leaseDurationSeconds", format!("must be > 0, got {d}"));
            }
        }
        if let Some(t) = self.spec.lease_transitions {
            if t < 0 {
                errs.invalid("spec.leaseTransitions", format!("must be >= 0, got {t}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::resolve;
    use serde_json::json;

    fn deploy(replicas: i64) -> Value {
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
    fn negative_replicas_names_the_field() {
        let err = normalize(resolve("deploy").unwrap(), deploy(-2)).unwrap_err();
        assert_eq!(err.to_string(), "spec.replicas: must be >= 0, got -2");
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

    #[test]
    fn defaults_are_applied() {
        let v = normalize(resolve("deploy").unwrap(), deploy(3)).unwrap();
        assert_eq!(
            v["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
            json!("25%")
        );
        assert_eq!(v["spec"]["revisionHistoryLimit"], json!(10));
        assert_eq!(
            v["spec"]["template"]["spec"]["restartPolicy"],
            json!("Always")
        );
        // Normalising is idempotent: the stored form normalises to itself.
        let again = normalize(resolve("deploy").unwrap(), v.clone()).unwrap();
        assert_eq!(v, again);
    }

    #[test]
    fn selector_must_match_template() {
        let mut d = deploy(1);
        d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        let err = normalize(resolve("deploy").unwrap(), d).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn pod_quantities_and_probes() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{
                "name": "c", "image": "x",
                "resources": {"limits": {"memory": "12XB"}},
                "livenessProbe": {"periodSeconds": 5}
            }]}
        });
        let err = normalize(resolve("pod").unwrap(), pod).unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.containers[0].resources.limits.memory"),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"spec.containers[0].livenessProbe"),
            "{fields:?}"
        );
    }

    #[test]
    fn bad_names() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Bad_Name"},
                         "spec": {"containers": [{"name": "c", "image": "x"}]}});
        let err = normalize(resolve("pod").unwrap(), pod).unwrap_err();
        assert_eq!(err.errors[0].field, "metadata.name");
    }

    fn svc(spec: Value) -> Result<Value, Invalid> {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                         "spec": spec});
        normalize(resolve("svc").unwrap(), svc)
    }

    fn fields(err: &Invalid) -> Vec<String> {
        err.errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn service_defaults() {
        let v = svc(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "nodePort": 0}],
                           "clusterIP": "127.96.0.9", "sessionAffinity": "ClientIP"}),
        )
        .unwrap();
        assert_eq!(v["spec"]["type"], "ClusterIP");
        assert_eq!(v["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 80);
        assert!(v["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(v["spec"]["clusterIPs"], json!(["127.96.0.9"]));
        assert_eq!(
            v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            10800
        );
        assert_eq!(svc(v["spec"].clone()).unwrap(), v, "normalises to itself");
        // clusterIPs alone fills clusterIP.
        let v = svc(json!({"ports": [{"port": 80}], "clusterIPs": ["127.96.0.9"]})).unwrap();
        assert_eq!(v["spec"]["clusterIP"], "127.96.0.9");
    }

    #[test]
    fn service_rejections_name_the_field() {
        let err = svc(json!({"type": "LoadBalancer", "ports": [{"port": 80}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            [
                r#"spec.type: Unsupported value: "LoadBalancer": supported values: "ClusterIP", "NodePort""#
            ]
        );
        let err = svc(json!({"ports": [{"port": 53, "protocol": "UDP"}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            [r#"spec.ports[0].protocol: Unsupported value: "UDP": supported values: "TCP""#]
        );
        let err = svc(json!({"ports": [{"port": 0}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.ports[0].port");
        let err = svc(json!({"ports": [{"port": 80, "nodePort": 30080}]})).unwrap_err();
        assert_eq!(
            fields(&err),
            ["spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]
        );
        let err = svc(json!({"type": "NodePort", "ports": [
            {"name": "a", "port": 80, "nodePort": 30080},
            {"name": "b", "port": 81, "nodePort": 30080}]}))
        .unwrap_err();
        assert_eq!(
            fields(&err),
            [r#"spec.ports[1].nodePort: Duplicate value: "30080""#]
        );
        let err = svc(json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}))
            .unwrap_err();
        assert_eq!(
            fields(&err),
            [
                r#"spec.clusterIPs[0]: Invalid value: "None": may not be set to 'None' for NodePort services"#
            ]
        );
        let err = svc(json!({"clusterIP": "10.0.0.300", "ports": [{"port": 80}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.clusterIPs[0]");
        let err = svc(json!({"ports": [{"port": 80, "targetPort": "no_such_NAME"}]})).unwrap_err();
        assert_eq!(err.errors[0].field, "spec.ports[0].targetPort");
        let err = svc(json!({"sessionAffinity": "ClientIP",
                             "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                             "ports": [{"port": 80}]}))
        .unwrap_err();
        assert_eq!(
            err.errors[0].field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
        // Headless Services need no ports; the node port range is the server's to check.
        svc(json!({"clusterIP": "None", "selector": {"app": "db"}})).unwrap();
        svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]})).unwrap();
    }
}
