//! The workload kinds, Deployment and ReplicaSet: their defaults, the selector that must match
//! the pod template's labels, the template itself (via the pod spec checks) and the rollout
//! strategy.

use crate::apps::{
    Deployment, DeploymentStrategy, PodTemplateSpec, ReplicaSet, RollingUpdateDeployment,
};
use crate::meta::{IntOrString, LabelSelector, ObjectMeta};
use crate::selector::Selector;

use super::meta::{non_negative, one_of, validate_labels, validate_meta_at};
use super::pod::{default_pod_spec, validate_pod_spec};
use super::{Errors, Kind};

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

#[cfg(test)]
mod tests {
    use super::super::normalize;
    use super::super::tests::deploy;
    use crate::registry::resolve;
    use serde_json::json;

    #[test]
    fn negative_replicas_names_the_field() {
        let err = normalize(resolve("deploy").unwrap(), deploy(-2)).unwrap_err();
        assert_eq!(err.to_string(), "spec.replicas: must be >= 0, got -2");
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
}
