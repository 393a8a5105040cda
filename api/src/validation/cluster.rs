//! The cluster-scoped and bookkeeping kinds: Namespace, Node (taints, capacity, conditions),
//! Event and Lease.

use crate::coordination::Lease;
use crate::core::{Event, Namespace, NamespaceStatus, Node};
use crate::meta::ObjectMeta;

use super::meta::{is_dns1123_label, is_qualified_name, one_of};
use super::{Errors, Kind};

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
        // Only the namespace controller's own finalizer: nothing here serves
        // `namespaces/{name}/finalize`, so another one could never be removed and would keep
        // the namespace (and its name) terminating for good.
        if let Some(spec) = &self.spec {
            for (i, f) in spec.finalizers.iter().enumerate() {
                if f != "kubernetes" {
                    errs.not_supported(format!("spec.finalizers[{i}]"), f, &["kubernetes"]);
                }
            }
        }
        if let Some(s) = &self.status {
            one_of(
                s.phase.as_deref(),
                "status.phase",
                &["Active", "Terminating"],
                errs,
            );
            // kube's ValidateNamespaceStatusUpdate: the phase follows deletionTimestamp.
            let deleting = self.metadata.deletion_timestamp.is_some();
            match s.phase.as_deref() {
                Some("Active") if deleting => errs.invalid(
                    "status.Phase",
                    "Invalid value: \"Active\": may only be 'Terminating' if `deletionTimestamp` is not empty",
                ),
                Some("Terminating") if !deleting => errs.invalid(
                    "status.Phase",
                    "Invalid value: \"Terminating\": may only be 'Active' if `deletionTimestamp` is empty",
                ),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------- Node

pub(super) const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

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

// ---------------------------------------------------------------- Event, Lease

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
    use crate::registry::resolve;
    use crate::validation::normalize;
    use serde_json::json;

    #[test]
    fn a_namespace_takes_only_the_kubernetes_finalizer() {
        let ns = |f: serde_json::Value| {
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"},
                "spec": {"finalizers": f}})
        };
        assert!(normalize(resolve("namespaces").unwrap(), ns(json!(["kubernetes"]))).is_ok());
        let err = normalize(
            resolve("namespaces").unwrap(),
            ns(json!(["kubernetes", "x"])),
        )
        .unwrap_err();
        assert_eq!(err.errors[0].field, "spec.finalizers[1]");
        assert!(
            err.to_string()
                .contains(r#"Unsupported value: "x": supported values: "kubernetes""#),
            "{err}"
        );
    }
}
