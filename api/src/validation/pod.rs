//! Pod spec defaulting and validation (containers, ports, env, resources, probes, volumes,
//! tolerations), shared by Pods and by the pod templates of workloads, and the Pod kind itself.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::{Container, Pod, PodSpec, PodStatus, Probe, Toleration};
use crate::meta::ObjectMeta;

use super::cluster::TAINT_EFFECTS;
use super::meta::{
    is_dns1123_label, is_dns1123_subdomain, non_negative, one_of, port_number, validate_labels,
    validate_port_ref,
};
use super::{Errors, Kind};

const RESTART_POLICIES: &[&str] = &["Always", "OnFailure", "Never"];
/// Why a probe may not name a `host`.
const PROBE_HOST_FORBIDDEN: &str = "probes always target the pod's own IP; host is not supported";

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
    // The agent probes from the host: a host of the pod's choosing would make it connect
    // anywhere and report the answer in the status. The pod IP is not known yet, so no host
    // is accepted (empty is Kubernetes' "the pod IP").
    for (host, handler) in [
        (
            p.http_get.as_ref().and_then(|h| h.host.as_deref()),
            "httpGet",
        ),
        (
            p.tcp_socket.as_ref().and_then(|t| t.host.as_deref()),
            "tcpSocket",
        ),
    ] {
        if host.is_some_and(|h| !h.is_empty()) {
            errs.forbidden(format!("{path}.{handler}.host"), PROBE_HOST_FORBIDDEN);
        }
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

#[cfg(test)]
mod tests {
    use super::super::normalize;
    use super::super::tests::deploy;
    use crate::registry::resolve;
    use serde_json::{json, Value};

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

    /// Issue 11, item 7: a probe's `host` made the agent connect from the host to any
    /// address and report the answer in the pod's status.
    #[test]
    fn probes_may_not_name_a_host() {
        let pod = |probes: Value| {
            let mut c = json!({"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]});
            c.as_object_mut()
                .unwrap()
                .extend(probes.as_object().unwrap().clone());
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                             "spec": {"containers": [c]}});
            normalize(resolve("pod").unwrap(), pod)
        };
        let fields = |probes: Value| -> Vec<String> {
            match pod(probes) {
                Ok(_) => vec![],
                Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
            }
        };
        assert_eq!(
            fields(json!({"livenessProbe": {"httpGet": {"host": "169.254.169.254", "port": 80}}})),
            ["spec.containers[0].livenessProbe.httpGet.host: Forbidden: probes always target the pod's own IP; host is not supported"]
        );
        assert_eq!(
            fields(json!({"readinessProbe": {"tcpSocket": {"host": "127.0.0.1", "port": 22}},
                          "livenessProbe": {"httpGet": {"host": "localhost", "port": "http"}}})),
            [
                "spec.containers[0].readinessProbe.tcpSocket.host: Forbidden: probes always target the pod's own IP; host is not supported",
                "spec.containers[0].livenessProbe.httpGet.host: Forbidden: probes always target the pod's own IP; host is not supported",
            ]
        );
        // Empty is Kubernetes' "the pod IP"; no host at all is the common case.
        pod(
            json!({"livenessProbe": {"httpGet": {"host": "", "port": 8080}},
                   "readinessProbe": {"tcpSocket": {"port": "http"}}}),
        )
        .unwrap();
        // Pod templates are pod specs too.
        let mut d = deploy(1);
        d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] =
            json!({"tcpSocket": {"host": "10.0.0.1", "port": 5432}});
        let err = normalize(resolve("deploy").unwrap(), d).unwrap_err();
        assert_eq!(
            err.errors[0].field,
            "spec.template.spec.containers[0].readinessProbe.tcpSocket.host"
        );
    }
}
