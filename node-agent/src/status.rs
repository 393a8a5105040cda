//! Pure pod-status computation: phase and conditions from the containers' states, the way the
//! kubelet derives them (`getPhase`, `generateAPIPodStatus`). No I/O, unit-tested.

use std::time::Duration;

use wasmctl_api::core::{
    ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus,
};
use wasmctl_api::Time;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn parse(s: Option<&str>) -> RestartPolicy {
        match s {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }
    /// Whether a container that exited with `code` is started again.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// Kubernetes' container restart back-off: nothing before the first restart, then `base`
/// doubling up to `max` (10 s → 5 min by default).
pub fn restart_delay(restarts_in_window: u32, base: Duration, max: Duration) -> Duration {
    if restarts_in_window == 0 {
        return Duration::ZERO;
    }
    let shift = (restarts_in_window - 1).min(20);
    base.saturating_mul(1u32 << shift).min(max)
}

pub fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

/// The pod phase (`getPhase`): waiting containers that never ran keep it Pending; a container
/// that runs or is about to restart makes it Running; when every container has terminated for
/// good it is Succeeded or Failed.
pub fn phase(containers: &[ContainerStatus], policy: RestartPolicy) -> &'static str {
    if containers.is_empty() {
        return "Pending";
    }
    let (mut running, mut waiting_new, mut succeeded, mut failed, mut restarting) = (0, 0, 0, 0, 0);
    for c in containers {
        let st = c.state.clone().unwrap_or_default();
        if st.running.is_some() {
            running += 1;
        } else if let Some(t) = &st.terminated {
            if t.exit_code == 0 {
                succeeded += 1;
            } else {
                failed += 1;
            }
        } else if c
            .last_state
            .as_ref()
            .is_some_and(|l| l.terminated.is_some())
        {
            restarting += 1;
        } else {
            waiting_new += 1;
        }
    }
    if waiting_new > 0 {
        return "Pending";
    }
    if running > 0 || restarting > 0 {
        return "Running";
    }
    // Every container has terminated.
    match policy {
        RestartPolicy::Always => "Running",
        RestartPolicy::OnFailure if failed > 0 => "Running",
        _ if failed > 0 => "Failed",
        _ if succeeded == containers.len() => "Succeeded",
        _ => "Running",
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    prev: &[PodCondition],
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let last = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time)
        .unwrap_or(*now);
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        last_probe_time: None,
        last_transition_time: Some(last),
        reason: if ok { None } else { reason.map(str::to_string) },
        message: None,
    }
}

/// Everything the pod worker knows, turned into the pod's status.
pub struct StatusInput<'a> {
    pub containers: Vec<ContainerStatus>,
    pub policy: RestartPolicy,
    pub pod_ip: Option<String>,
    pub host_ip: &'a str,
    pub start_time: Time,
    pub prev: &'a PodStatus,
    pub now: Time,
}

pub fn pod_status(i: StatusInput<'_>) -> PodStatus {
    let phase = phase(&i.containers, i.policy);
    let finished = matches!(phase, "Succeeded" | "Failed");
    let all_ready = !i.containers.is_empty() && i.containers.iter().all(|c| c.ready);
    let not_ready_reason = if finished {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let prev = &i.prev.conditions;
    let conditions = vec![
        condition("PodScheduled", true, None, prev, &i.now),
        condition("Initialized", true, None, prev, &i.now),
        condition(
            "ContainersReady",
            all_ready && !finished,
            Some(not_ready_reason),
            prev,
            &i.now,
        ),
        condition(
            "Ready",
            all_ready && !finished,
            Some(not_ready_reason),
            prev,
            &i.now,
        ),
    ];
    PodStatus {
        phase: Some(phase.into()),
        conditions,
        message: None,
        reason: None,
        host_ip: Some(i.host_ip.to_string()),
        pod_ip: i.pod_ip.clone(),
        pod_ips: i
            .pod_ip
            .iter()
            .map(|ip| wasmctl_api::core::PodIp { ip: ip.clone() })
            .collect(),
        start_time: Some(i.start_time),
        container_statuses: i.containers,
        qos_class: i.prev.qos_class.clone(),
        nominated_node_name: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmctl_api::core::{ContainerStateRunning, ContainerStateTerminated};

    fn cs(state: ContainerState, last: Option<ContainerState>, ready: bool) -> ContainerStatus {
        ContainerStatus {
            name: "c".into(),
            ready,
            state: Some(state),
            last_state: last,
            ..Default::default()
        }
    }
    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning { started_at: None }),
            ..Default::default()
        }
    }
    fn exited(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn phases() {
        use RestartPolicy::*;
        let creating = cs(waiting("ContainerCreating", None), None, false);
        let backoff = cs(waiting("CrashLoopBackOff", None), Some(exited(1)), false);
        assert_eq!(phase(std::slice::from_ref(&creating), Always), "Pending");
        assert_eq!(
            phase(&[cs(running(), None, true), creating], Always),
            "Pending"
        );
        assert_eq!(phase(&[cs(running(), None, true)], Always), "Running");
        assert_eq!(phase(&[backoff], Always), "Running");
        assert_eq!(phase(&[cs(exited(0), None, false)], Never), "Succeeded");
        assert_eq!(phase(&[cs(exited(2), None, false)], Never), "Failed");
        assert_eq!(phase(&[cs(exited(0), None, false)], OnFailure), "Succeeded");
        assert_eq!(
            phase(
                &[cs(exited(0), None, false), cs(running(), None, true)],
                Never
            ),
            "Running"
        );
        assert_eq!(phase(&[], Always), "Pending");
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let b = Duration::from_secs(10);
        let m = Duration::from_secs(300);
        let d: Vec<u64> = (0..8).map(|n| restart_delay(n, b, m).as_secs()).collect();
        assert_eq!(d, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(restart_delay(1000, b, m), m);
    }

    #[test]
    fn conditions_keep_transition_times() {
        let t0 = Time::now();
        let prev = PodStatus::default();
        let s1 = pod_status(StatusInput {
            containers: vec![cs(running(), None, true)],
            policy: RestartPolicy::Always,
            pod_ip: Some("127.1.0.2".into()),
            host_ip: "127.0.0.1",
            start_time: t0,
            prev: &prev,
            now: t0,
        });
        assert_eq!(s1.phase.as_deref(), Some("Running"));
        assert!(s1.conditions.iter().all(|c| c.status == "True"));
        let later = Time(t0.0 + chrono::Duration::seconds(5));
        let s2 = pod_status(StatusInput {
            containers: vec![cs(running(), None, false)],
            policy: RestartPolicy::Always,
            pod_ip: Some("127.1.0.2".into()),
            host_ip: "127.0.0.1",
            start_time: t0,
            prev: &s1,
            now: later,
        });
        let ready = s2.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.last_transition_time.as_ref(), Some(&later));
        let sched = s2
            .conditions
            .iter()
            .find(|c| c.type_ == "PodScheduled")
            .unwrap();
        assert_eq!(sched.last_transition_time.as_ref(), Some(&t0));
        assert_eq!(s2.pod_ips.len(), 1);
    }
}
