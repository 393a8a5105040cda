//! The pure rollout plan of the Deployment controller: [`plan`] takes one step of a rollout
//! as a function of the Deployment, its ReplicaSets and the time, with no I/O. It owns the
//! annotation and label names, the template hash, maxSurge/maxUnavailable, the rolling,
//! Recreate and proportional-scaling steps, history cleanup, the Available/Progressing
//! conditions and the shape of a new ReplicaSet.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use wasmctl_api::apps::{
    Deployment, DeploymentCondition, DeploymentStatus, PodTemplateSpec, ReplicaSet,
};
use wasmctl_api::meta::{OwnerReference, Time};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const HASH_LABEL: &str = "pod-template-hash";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// One change the controller makes besides the Deployment's status.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    CreateReplicaSet(Box<ReplicaSet>),
    /// Set `spec.replicas` and these annotations of an existing ReplicaSet.
    ScaleReplicaSet {
        name: String,
        replicas: i32,
        annotations: BTreeMap<String, String>,
    },
    /// An old ReplicaSet beyond `revisionHistoryLimit`.
    DeleteReplicaSet(String),
    /// Set these annotations on the Deployment (its revision).
    AnnotateDeployment(BTreeMap<String, String>),
}

#[derive(Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: DeploymentStatus,
    pub requeue_after: Option<Duration>,
}

/// Kubernetes' ComputeHash: FNV-1a (32 bit) of the template and the collision count, as
/// the decimal number spelled in the "safe" alphabet (no vowels, no look-alikes).
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut t = template.clone();
    t.metadata.labels.remove(HASH_LABEL);
    let bytes = serde_json::to_vec(&t).expect("templates serialise");
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    bytes.iter().for_each(|&b| feed(b));
    if let Some(c) = collision_count {
        c.to_le_bytes().iter().for_each(|&b| feed(b));
    }
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| SAFE[usize::from(b) % SAFE.len()] as char)
        .collect()
}

/// Templates equal apart from the `pod-template-hash` label.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    let strip = |t: &PodTemplateSpec| {
        let mut t = t.clone();
        t.metadata.labels.remove(HASH_LABEL);
        t
    };
    strip(a) == strip(b)
}

pub fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status.as_ref().map_or((0, 0, 0), |s| {
        (
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        )
    })
}

/// (maxSurge, maxUnavailable) resolved against `replicas`; never both 0.
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    let replicas = d.spec.replicas.unwrap_or(1);
    let Some(ru) = d.spec.strategy.as_ref().and_then(|s| {
        (s.type_.as_deref() != Some("Recreate")).then_some(s.rolling_update.as_ref())?
    }) else {
        return (0, 0);
    };
    let resolve = |v: &Option<wasmctl_api::meta::IntOrString>, up: bool| {
        v.as_ref()
            .and_then(|v| v.scaled_value(replicas, up).ok())
            .unwrap_or_else(|| {
                let q = i64::from(replicas) * 25;
                (if up { (q + 99) / 100 } else { q / 100 }) as i32
            })
    };
    let surge = resolve(&ru.max_surge, true);
    let mut unavailable = resolve(&ru.max_unavailable, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(replicas.max(0)))
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate")
}

/// A working copy of the ReplicaSets whose planned replica counts change as the step goes.
struct Sets {
    all: Vec<ReplicaSet>,
    /// Index of the new ReplicaSet in `all`.
    new: Option<usize>,
    /// Planned `spec.replicas`, by index.
    replicas: Vec<i32>,
}

impl Sets {
    fn olds(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.all.len()).filter(move |&i| Some(i) != self.new)
    }
    fn total_spec(&self) -> i32 {
        self.replicas.iter().sum()
    }
    fn olds_spec(&self) -> i32 {
        self.olds().map(|i| self.replicas[i]).sum()
    }
}

/// The next step for `d`, given the ReplicaSets it controls and whether pods of its old
/// ReplicaSets still exist (Recreate waits for them to be gone).
pub fn plan(
    d: &Deployment,
    owned: &[ReplicaSet],
    old_pods_running: bool,
    now: DateTime<Utc>,
) -> Plan {
    let replicas = d.spec.replicas.unwrap_or(1).max(0);
    let (surge, unavailable) = fenceposts(d);
    let paused = d.spec.paused == Some(true);
    let mut all: Vec<ReplicaSet> = owned.to_vec();
    all.sort_by(|a, b| {
        (a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(b.metadata.creation_timestamp, &b.metadata.name))
    });
    let new = all
        .iter()
        .position(|rs| equal_ignore_hash(&rs.spec.template, &d.spec.template));
    let replicas_now: Vec<i32> = all.iter().map(spec_replicas).collect();
    let mut sets = Sets {
        all,
        new,
        replicas: replicas_now,
    };
    let max_old_revision = sets
        .olds()
        .map(|i| revision(&sets.all[i]))
        .max()
        .unwrap_or(0);
    let mut actions = Vec::new();
    let mut conditions = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut collision_count = d.status.as_ref().and_then(|s| s.collision_count);

    // Paused / resumed bookkeeping on the Progressing condition.
    let has_deadline = d.spec.progress_deadline_seconds.is_some();
    let progressing_reason = condition(&conditions, "Progressing").and_then(|c| c.reason.clone());
    if has_deadline {
        if paused && progressing_reason.as_deref() != Some("DeploymentPaused") {
            set_condition(
                &mut conditions,
                cond(
                    "Progressing",
                    "Unknown",
                    "DeploymentPaused",
                    "Deployment is paused",
                ),
                now,
            );
        } else if !paused && progressing_reason.as_deref() == Some("DeploymentPaused") {
            set_condition(
                &mut conditions,
                cond(
                    "Progressing",
                    "Unknown",
                    "DeploymentResumed",
                    "Deployment is resumed",
                ),
                now,
            );
        }
    }

    let active_mismatch = (0..sets.all.len()).any(|i| {
        sets.replicas[i] > 0
            && sets.all[i].metadata.annotations.get(DESIRED_REPLICAS) != Some(&replicas.to_string())
    });
    let scaling_event = active_mismatch && !sets.all.is_empty();
    let recreate_waiting =
        is_recreate(d) && (sets.olds_spec() > 0 || old_pods_running) && sets.new.is_none();

    // The new ReplicaSet: keep its annotations current, or create it when a rollout needs it.
    let mut created: Option<String> = None;
    match sets.new {
        Some(i) => {
            let rs = &sets.all[i];
            let mut ann = rs_annotations(d, rs);
            if revision(rs) <= max_old_revision {
                ann.insert(REVISION.into(), (max_old_revision + 1).to_string());
            }
            let name = rs.metadata.name.clone();
            if ann != rs.metadata.annotations {
                actions.push(Action::ScaleReplicaSet {
                    name: name.clone(),
                    replicas: sets.replicas[i],
                    annotations: ann.clone(),
                });
                sets.all[i].metadata.annotations = ann;
            }
            if has_deadline && condition(&conditions, "Progressing").is_none() {
                let msg = format!("Found new replica set {name:?}");
                set_condition(
                    &mut conditions,
                    cond("Progressing", "True", "FoundNewReplicaSet", &msg),
                    now,
                );
            }
        }
        None if !paused && !recreate_waiting => {
            let hash = template_hash(&d.spec.template, collision_count);
            let name = format!("{}-{hash}", d.metadata.name);
            if sets.all.iter().any(|rs| rs.metadata.name == name) {
                // Same name, different template: a hash collision. Count it and retry with
                // a different hash (the status write triggers the next reconcile).
                collision_count = Some(collision_count.unwrap_or(0) + 1);
            } else {
                let start = if is_recreate(d) {
                    replicas
                } else {
                    (replicas + surge - sets.total_spec()).clamp(0, replicas)
                };
                let rs = new_replica_set(d, &hash, start, max_old_revision + 1, surge);
                if has_deadline {
                    let msg = format!("Created new replica set {name:?}");
                    set_condition(
                        &mut conditions,
                        cond("Progressing", "True", "NewReplicaSetCreated", &msg),
                        now,
                    );
                }
                sets.all.push(rs.clone());
                sets.replicas.push(start);
                sets.new = Some(sets.all.len() - 1);
                created = Some(name);
                actions.push(Action::CreateReplicaSet(Box::new(rs)));
            }
        }
        None => {}
    }
    if let Some(i) = sets.new {
        let want = sets.all[i].metadata.annotations.get(REVISION).cloned();
        if want.is_some() && d.metadata.annotations.get(REVISION) != want.as_ref() {
            let mut ann = BTreeMap::new();
            ann.insert(REVISION.to_string(), want.unwrap_or_default());
            actions.push(Action::AnnotateDeployment(ann));
        }
    }

    let mut rolled = false;
    if created.is_none() {
        if paused || scaling_event {
            scale(d, &mut sets, replicas, surge);
        } else if is_recreate(d) {
            rolled = rollout_recreate(&mut sets, replicas, old_pods_running);
        } else {
            rolled = rollout_rolling(&mut sets, replicas, surge, unavailable);
        }
        let want_desired = replicas.to_string();
        let want_max = (replicas + surge).to_string();
        for i in 0..sets.all.len() {
            let rs = &sets.all[i];
            // A resize stamps the new size on every active set, even one whose share rounded
            // to zero: otherwise its stale desired-replicas would keep this a "scaling event"
            // forever and the rollout would never resume (Kubernetes does the same).
            let stale = (paused || scaling_event)
                && sets.replicas[i] > 0
                && (rs.metadata.annotations.get(DESIRED_REPLICAS) != Some(&want_desired)
                    || rs.metadata.annotations.get(MAX_REPLICAS) != Some(&want_max));
            if sets.replicas[i] != spec_replicas(rs) || stale {
                let mut ann = rs.metadata.annotations.clone();
                ann.insert(DESIRED_REPLICAS.into(), replicas.to_string());
                ann.insert(MAX_REPLICAS.into(), (replicas + surge).to_string());
                // Replace an earlier annotation-only update of the same set.
                actions.retain(
                    |a| !matches!(a, Action::ScaleReplicaSet { name, .. } if *name == rs.metadata.name),
                );
                actions.push(Action::ScaleReplicaSet {
                    name: rs.metadata.name.clone(),
                    replicas: sets.replicas[i],
                    annotations: ann,
                });
            }
        }
    }

    let complete = is_complete(&sets, replicas);
    if (complete || paused) && created.is_none() && !rolled {
        actions.extend(cleanup(d, &sets));
    }

    // Status from the ReplicaSets as planned.
    let (mut total, mut ready, mut available) = (0, 0, 0);
    for rs in &sets.all {
        let (r, rd, a) = status_of(rs);
        total += r;
        ready += rd;
        available += a;
    }
    let updated = sets.new.map_or(0, |i| status_of(&sets.all[i]).0);
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(total),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((sets.total_spec() - available).max(0)),
        conditions: Vec::new(),
        collision_count,
    };
    let min_available = replicas - unavailable;
    if available >= min_available {
        set_condition(
            &mut conditions,
            cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            ),
            now,
        );
    } else {
        set_condition(
            &mut conditions,
            cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            ),
            now,
        );
    }
    let mut requeue_after = None;
    if has_deadline && !paused && !scaling_event && created.is_none() {
        let new_name = sets
            .new
            .map(|i| sets.all[i].metadata.name.clone())
            .unwrap_or_default();
        let old = d.status.clone().unwrap_or_default();
        let deadline =
            chrono::Duration::seconds(i64::from(d.spec.progress_deadline_seconds.unwrap_or(600)));
        let current = condition(&conditions, "Progressing").cloned();
        if complete {
            let msg = format!("ReplicaSet {new_name:?} has successfully progressed.");
            set_condition(
                &mut conditions,
                cond("Progressing", "True", "NewReplicaSetAvailable", &msg),
                now,
            );
        } else if progressed(&old, &status) {
            let msg = format!("ReplicaSet {new_name:?} is progressing.");
            let mut c = cond("Progressing", "True", "ReplicaSetUpdated", &msg);
            c.last_update_time = Some(Time(now));
            c.last_transition_time = match &current {
                Some(cur) if cur.status == "True" => cur.last_transition_time,
                _ => Some(Time(now)),
            };
            conditions.retain(|c| c.type_ != "Progressing");
            conditions.push(c);
            requeue_after = Some(deadline.to_std().unwrap_or_default());
        } else if let Some(cur) =
            current.filter(|c| c.reason.as_deref() != Some("DeploymentResumed"))
        {
            let since = cur.last_update_time.map(|t| t.0).unwrap_or(now);
            let timed_out =
                cur.reason.as_deref() == Some("ProgressDeadlineExceeded") || since + deadline < now;
            if timed_out {
                let msg = format!("ReplicaSet {new_name:?} has timed out progressing.");
                set_condition(
                    &mut conditions,
                    cond("Progressing", "False", "ProgressDeadlineExceeded", &msg),
                    now,
                );
            } else {
                let left = (since + deadline - now).to_std().unwrap_or_default();
                requeue_after = Some(left + Duration::from_secs(1));
            }
        }
    }
    status.conditions = conditions;
    Plan {
        actions,
        status,
        requeue_after,
    }
}

/// Kubernetes' DeploymentProgressing: more updated, ready or available replicas, or fewer
/// old ones, than the last recorded status.
fn progressed(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let n = |v: Option<i32>| v.unwrap_or(0);
    let old_olds = n(old.replicas) - n(old.updated_replicas);
    let new_olds = n(new.replicas) - n(new.updated_replicas);
    n(new.updated_replicas) > n(old.updated_replicas)
        || new_olds < old_olds
        || n(new.ready_replicas) > n(old.ready_replicas)
        || n(new.available_replicas) > n(old.available_replicas)
}

fn is_complete(sets: &Sets, replicas: i32) -> bool {
    let Some(i) = sets.new else {
        return false;
    };
    let (r, _, a) = status_of(&sets.all[i]);
    let olds_left: i32 = sets.olds().map(|j| status_of(&sets.all[j]).0).sum();
    sets.replicas[i] == replicas && r == replicas && a == replicas && olds_left == 0
}

/// One step of a rolling update: grow the new ReplicaSet within maxSurge, else shrink the
/// old ones within maxUnavailable (unhealthy pods first). Returns whether it scaled.
fn rollout_rolling(sets: &mut Sets, replicas: i32, surge: i32, max_unavailable: i32) -> bool {
    let Some(new) = sets.new else {
        return false;
    };
    // Scale the new set up (or down to the target).
    let cur = sets.replicas[new];
    if cur > replicas {
        sets.replicas[new] = replicas;
        return true;
    }
    if cur < replicas {
        let room = replicas + surge - sets.total_spec();
        if room > 0 {
            sets.replicas[new] = cur + room.min(replicas - cur);
            return true;
        }
    }
    // Scale the old sets down.
    if sets.olds_spec() == 0 {
        return false;
    }
    let min_available = replicas - max_unavailable;
    let new_unavailable = (sets.replicas[new] - status_of(&sets.all[new]).2).max(0);
    let max_scaled_down = sets.total_spec() - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return false;
    }
    let mut olds: Vec<usize> = sets.olds().collect();
    olds.sort_by_key(|&i| {
        (
            sets.all[i].metadata.creation_timestamp,
            sets.all[i].metadata.name.clone(),
        )
    });
    let mut scaled = false;
    // Unhealthy old replicas go first: removing them does not lower availability.
    let mut cleaned = 0;
    for &i in &olds {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = sets.replicas[i] - status_of(&sets.all[i]).2;
        if sets.replicas[i] == 0 || unhealthy <= 0 {
            continue;
        }
        let n = (max_scaled_down - cleaned).min(unhealthy);
        sets.replicas[i] -= n;
        cleaned += n;
        scaled = true;
    }
    // Then healthy ones, as far as the available count allows.
    // A set's status may still count pods its controller is about to delete (it lags the
    // spec): never count more available replicas than a set is meant to keep.
    let available: i32 = (0..sets.all.len())
        .map(|i| status_of(&sets.all[i]).2.min(sets.replicas[i]))
        .sum();
    if available > min_available {
        let budget = available - min_available;
        let mut done = 0;
        for &i in &olds {
            if done >= budget {
                break;
            }
            if sets.replicas[i] == 0 {
                continue;
            }
            let n = sets.replicas[i].min(budget - done);
            sets.replicas[i] -= n;
            done += n;
            scaled = true;
        }
    }
    scaled
}

/// One step of Recreate: old sets to 0, wait for their pods to be gone, then the new set up.
fn rollout_recreate(sets: &mut Sets, replicas: i32, old_pods_running: bool) -> bool {
    let mut scaled = false;
    for i in sets.olds().collect::<Vec<_>>() {
        if sets.replicas[i] > 0 {
            sets.replicas[i] = 0;
            scaled = true;
        }
    }
    if scaled || old_pods_running {
        return scaled;
    }
    if let Some(new) = sets.new {
        if sets.replicas[new] != replicas {
            sets.replicas[new] = replicas;
            return true;
        }
    }
    false
}

/// A change of `replicas` (or a paused Deployment): resize without rolling. With one active
/// set, it takes the new size; during a rollout the change is spread proportionally.
fn scale(d: &Deployment, sets: &mut Sets, replicas: i32, surge: i32) {
    let active: Vec<usize> = (0..sets.all.len())
        .filter(|&i| sets.replicas[i] > 0)
        .collect();
    let target = match active.as_slice() {
        [one] => Some(*one),
        [] => sets.new.or_else(|| {
            (0..sets.all.len()).max_by_key(|&i| {
                (
                    revision(&sets.all[i]),
                    sets.all[i].metadata.creation_timestamp,
                )
            })
        }),
        _ => None,
    };
    if let Some(i) = target {
        sets.replicas[i] = replicas;
        return;
    }
    if let Some(new) = sets.new {
        let saturated = sets.replicas[new] == replicas && status_of(&sets.all[new]).2 == replicas;
        if saturated {
            for i in sets.olds().collect::<Vec<_>>() {
                sets.replicas[i] = 0;
            }
            return;
        }
    }
    if is_recreate(d) {
        return;
    }
    // Proportional scaling: each active set gets its share of the change, the remainder
    // goes to the largest.
    let allowed = if replicas > 0 { replicas + surge } else { 0 };
    let to_add = allowed - active.iter().map(|&i| sets.replicas[i]).sum::<i32>();
    if to_add == 0 {
        return;
    }
    let mut order = active.clone();
    order.sort_by(|&a, &b| {
        let ka = (sets.replicas[a], sets.all[a].metadata.creation_timestamp);
        let kb = (sets.replicas[b], sets.all[b].metadata.creation_timestamp);
        if to_add > 0 {
            kb.cmp(&ka) // larger (then newer) first
        } else {
            kb.0.cmp(&ka.0).then(ka.1.cmp(&kb.1)) // larger (then older) first
        }
    });
    let mut added = 0;
    let mut next = sets.replicas.clone();
    for &i in &order {
        let rs = &sets.all[i];
        let annotated = rs
            .metadata
            .annotations
            .get(MAX_REPLICAS)
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|v| *v > 0)
            .unwrap_or_else(|| status_of(rs).0.max(1));
        let share = if replicas == 0 {
            -sets.replicas[i]
        } else {
            let f =
                f64::from(sets.replicas[i]) * f64::from(replicas + surge) / f64::from(annotated);
            f.round() as i32 - sets.replicas[i]
        };
        let share = if to_add > 0 {
            share.min(to_add - added).max(0)
        } else {
            share.max(to_add - added).min(0)
        };
        next[i] += share;
        added += share;
    }
    if let Some(&first) = order.first() {
        next[first] = (next[first] + to_add - added).max(0);
    }
    sets.replicas = next;
}

/// Old ReplicaSets beyond `revisionHistoryLimit` (only empty ones), oldest revision first.
fn cleanup(d: &Deployment, sets: &Sets) -> Vec<Action> {
    let limit = d.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let mut olds: Vec<&ReplicaSet> = sets
        .olds()
        .map(|i| &sets.all[i])
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .collect();
    if olds.len() <= limit {
        return Vec::new();
    }
    olds.sort_by_key(|rs| (revision(rs), rs.metadata.creation_timestamp));
    let excess = olds.len() - limit;
    olds.into_iter()
        .take(excess)
        .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
        .map(|rs| Action::DeleteReplicaSet(rs.metadata.name.clone()))
        .collect()
}

/// The annotations a ReplicaSet of `d` carries besides the replica counts: its own, plus the
/// Deployment's (its change-cause). Desired/max replicas change only when it is scaled.
fn rs_annotations(d: &Deployment, rs: &ReplicaSet) -> BTreeMap<String, String> {
    let mut ann = rs.metadata.annotations.clone();
    for (k, v) in &d.metadata.annotations {
        if ![
            LAST_APPLIED,
            REVISION,
            REVISION_HISTORY,
            DESIRED_REPLICAS,
            MAX_REPLICAS,
        ]
        .contains(&k.as_str())
        {
            ann.insert(k.clone(), v.clone());
        }
    }
    ann
}

/// The ReplicaSet for `d`'s current template.
pub fn new_replica_set(
    d: &Deployment,
    hash: &str,
    start: i32,
    revision: i64,
    surge: i32,
) -> ReplicaSet {
    let mut rs = ReplicaSet::default();
    rs.metadata.name = format!("{}-{hash}", d.metadata.name);
    rs.metadata.namespace = d.metadata.namespace.clone();
    let mut template = d.spec.template.clone();
    template
        .metadata
        .labels
        .insert(HASH_LABEL.into(), hash.into());
    rs.metadata.labels = template.metadata.labels.clone();
    let mut selector = d.spec.selector.clone().unwrap_or_default();
    selector.match_labels.insert(HASH_LABEL.into(), hash.into());
    rs.spec.selector = Some(selector);
    rs.spec.template = template;
    rs.spec.replicas = Some(start);
    rs.spec.min_ready_seconds = d.spec.min_ready_seconds;
    rs.metadata.owner_references.push(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.metadata.name.clone(),
        uid: d.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    });
    let replicas = d.spec.replicas.unwrap_or(1);
    let mut ann = rs_annotations(d, &rs);
    ann.insert(DESIRED_REPLICAS.into(), replicas.to_string());
    ann.insert(MAX_REPLICAS.into(), (replicas + surge).to_string());
    ann.insert(REVISION.into(), revision.to_string());
    rs.metadata.annotations = ann;
    rs
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: None,
        last_transition_time: None,
    }
}

fn condition<'a>(conds: &'a [DeploymentCondition], type_: &str) -> Option<&'a DeploymentCondition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Kubernetes' SetDeploymentCondition: no change for the same status and reason; the
/// transition time survives a reason change with the same status.
fn set_condition(
    conds: &mut Vec<DeploymentCondition>,
    mut c: DeploymentCondition,
    now: DateTime<Utc>,
) {
    if let Some(cur) = condition(conds, &c.type_) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        c.last_transition_time = if cur.status == c.status {
            cur.last_transition_time
        } else {
            Some(Time(now))
        };
    } else {
        c.last_transition_time = Some(Time(now));
    }
    c.last_update_time = Some(Time(now));
    conds.retain(|x| x.type_ != c.type_);
    conds.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmctl_api::apps::{DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment};
    use wasmctl_api::meta::{IntOrString, LabelSelector};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn deployment(replicas: i32, image: &str) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.name = "web".into();
        d.metadata.namespace = Some("default".into());
        d.metadata.uid = Some("d-uid".into());
        d.metadata.generation = Some(2);
        d.spec.replicas = Some(replicas);
        d.spec.selector = Some(LabelSelector {
            match_labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        });
        d.spec.template.metadata.labels = [("app".to_string(), "web".to_string())].into();
        d.spec.template.spec.containers = vec![wasmctl_api::core::Container {
            name: "web".into(),
            image: image.into(),
            ..Default::default()
        }];
        d.spec.progress_deadline_seconds = Some(600);
        d.spec.revision_history_limit = Some(10);
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::String("25%".into())),
                max_unavailable: Some(IntOrString::String("25%".into())),
            }),
        });
        d
    }

    /// A ReplicaSet of `d`'s template with `image`, `spec` replicas of which `available`
    /// are available, created at `created`.
    fn rs_for(
        d: &Deployment,
        image: &str,
        rev: i64,
        spec: i32,
        available: i32,
        created: i64,
    ) -> ReplicaSet {
        let mut dd = d.clone();
        dd.spec.template.spec.containers[0].image = image.into();
        let hash = template_hash(&dd.spec.template, None);
        let (surge, _) = fenceposts(d);
        let mut rs = new_replica_set(&dd, &hash, spec, rev, surge);
        rs.metadata.uid = Some(format!("rs-{image}"));
        rs.metadata.creation_timestamp = Some(Time(t(created)));
        rs.status = Some(ReplicaSetStatus {
            replicas: spec,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        rs
    }

    fn scales(p: &Plan) -> Vec<(String, i32)> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::ScaleReplicaSet { name, replicas, .. } => Some((name.clone(), *replicas)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fenceposts_follow_kubernetes_rounding() {
        let mut d = deployment(10, "v1");
        assert_eq!(fenceposts(&d), (3, 2)); // surge rounds up, unavailable down
        d.spec.replicas = Some(1);
        assert_eq!(fenceposts(&d), (1, 0));
        let ru = d
            .spec
            .strategy
            .as_mut()
            .unwrap()
            .rolling_update
            .as_mut()
            .unwrap();
        ru.max_surge = Some(IntOrString::Int(0));
        ru.max_unavailable = Some(IntOrString::Int(0));
        assert_eq!(fenceposts(&d), (0, 1)); // never both zero
    }

    #[test]
    fn template_hash_is_stable_and_ignores_its_own_label() {
        let d = deployment(1, "v1");
        let h = template_hash(&d.spec.template, None);
        assert_eq!(h, template_hash(&d.spec.template, None));
        let mut labeled = d.spec.template.clone();
        labeled.metadata.labels.insert(HASH_LABEL.into(), h.clone());
        assert_eq!(h, template_hash(&labeled, None));
        assert_ne!(h, template_hash(&d.spec.template, Some(1)));
        assert!(h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
    }

    #[test]
    fn a_new_deployment_creates_its_first_replica_set() {
        let d = deployment(3, "v1");
        let p = plan(&d, &[], false, t(0));
        let [Action::CreateReplicaSet(rs), Action::AnnotateDeployment(ann)] = p.actions.as_slice()
        else {
            panic!("expected a create, got {:?}", p.actions);
        };
        assert_eq!(ann[REVISION], "1");
        assert_eq!(rs.spec.replicas, Some(3));
        assert_eq!(rs.metadata.annotations[REVISION], "1");
        let hash = &rs.spec.template.metadata.labels[HASH_LABEL];
        assert_eq!(rs.metadata.name, format!("web-{hash}"));
        assert_eq!(
            rs.spec.selector.as_ref().unwrap().match_labels[HASH_LABEL],
            *hash
        );
        assert_eq!(rs.metadata.owner_references[0].uid, "d-uid");
        let c = condition(&p.status.conditions, "Progressing").unwrap();
        assert_eq!(c.reason.as_deref(), Some("NewReplicaSetCreated"));
    }

    #[test]
    fn a_template_change_surges_the_new_set_first() {
        // 4 replicas: maxSurge 1, maxUnavailable 1.
        let mut d = deployment(4, "v2");
        let old = rs_for(&d, "v1", 1, 4, 4, 0);
        d.metadata.annotations.insert(REVISION.into(), "1".into());
        let p = plan(&d, std::slice::from_ref(&old), false, t(10));
        let [Action::CreateReplicaSet(new), Action::AnnotateDeployment(ann)] = p.actions.as_slice()
        else {
            panic!("got {:?}", p.actions);
        };
        assert_eq!(new.spec.replicas, Some(1), "4 + maxSurge 1 - 4 existing");
        assert_eq!(new.metadata.annotations[REVISION], "2");
        assert_eq!(ann[REVISION], "2");
    }

    #[test]
    fn old_sets_shrink_within_max_unavailable_then_the_new_one_grows() {
        let d = deployment(4, "v2");
        // New set has 1 replica, not available yet: total 5 = 4 + surge; 4 old available.
        let old = rs_for(&d, "v1", 1, 4, 4, 0);
        let new = rs_for(&d, "v2", 2, 1, 0, 10);
        let p = plan(&d, &[old.clone(), new.clone()], false, t(20));
        // min available 3: one old pod may go.
        assert_eq!(scales(&p), vec![(old.metadata.name.clone(), 3)]);
        // Next: the new pod is available → the new set grows to 2 (total 5 again).
        let mut old2 = rs_for(&d, "v1", 1, 3, 3, 0);
        old2.metadata.name = old.metadata.name.clone();
        let new2 = rs_for(&d, "v2", 2, 1, 1, 10);
        let p = plan(&d, &[old2.clone(), new2.clone()], false, t(30));
        assert_eq!(scales(&p), vec![(new2.metadata.name.clone(), 2)]);
        assert_eq!(p.status.updated_replicas, Some(1));
        assert_eq!(p.status.available_replicas, Some(4));
    }

    #[test]
    fn unhealthy_old_pods_are_removed_first_without_lowering_availability() {
        let d = deployment(4, "v2");
        // Old set: 4 wanted, only 2 available (2 crashing); new set at surge, none available.
        let old = rs_for(&d, "v1", 1, 4, 2, 0);
        let new = rs_for(&d, "v2", 2, 1, 0, 10);
        let p = plan(&d, &[old.clone(), new], false, t(20));
        // maxScaledDown = 5 - 3 - 1 = 1: one unhealthy old replica goes.
        assert_eq!(scales(&p), vec![(old.metadata.name.clone(), 3)]);
    }

    #[test]
    fn a_stale_status_does_not_let_the_old_set_shrink_too_far() {
        let d = deployment(4, "v2");
        // The old set was just scaled to 3 but its status still counts 4 available pods;
        // the new set has 2 replicas, 1 available. Really available: 3 + 1 = 4, minimum 3:
        // at most one old replica may go, not two.
        let mut old = rs_for(&d, "v1", 1, 3, 4, 0);
        old.status.as_mut().unwrap().replicas = 4;
        let new = rs_for(&d, "v2", 2, 2, 1, 10);
        let p = plan(&d, &[old.clone(), new], false, t(20));
        assert_eq!(scales(&p), vec![(old.metadata.name.clone(), 2)]);
    }

    #[test]
    fn never_drops_below_min_available() {
        let d = deployment(4, "v2");
        let old = rs_for(&d, "v1", 1, 3, 3, 0);
        let new = rs_for(&d, "v2", 2, 2, 0, 10);
        // 3 old available = min available: nothing may be scaled down, and no room to surge.
        let p = plan(&d, &[old, new], false, t(20));
        assert!(scales(&p).is_empty(), "{:?}", p.actions);
    }

    #[test]
    fn completes_and_reports_new_replica_set_available() {
        let mut d = deployment(2, "v2");
        d.metadata.annotations.insert(REVISION.into(), "2".into());
        let old = rs_for(&d, "v1", 1, 0, 0, 0);
        let new = rs_for(&d, "v2", 2, 2, 2, 10);
        let p = plan(&d, &[old, new], false, t(20));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        let c = condition(&p.status.conditions, "Progressing").unwrap();
        assert_eq!(c.reason.as_deref(), Some("NewReplicaSetAvailable"));
        let a = condition(&p.status.conditions, "Available").unwrap();
        assert_eq!(a.status, "True");
        assert_eq!(p.status.updated_replicas, Some(2));
        assert_eq!(p.status.unavailable_replicas, Some(0));
    }

    #[test]
    fn rollback_reuses_the_old_set_with_a_new_revision() {
        // Back to v1, whose set (revision 1) still exists at 0 replicas.
        let d = deployment(2, "v1");
        let v1 = rs_for(&d, "v1", 1, 0, 0, 0);
        let v2 = rs_for(&d, "v2", 2, 2, 2, 10);
        let p = plan(&d, &[v1.clone(), v2.clone()], false, t(20));
        assert!(p.actions.iter().any(|a| matches!(a,
            Action::ScaleReplicaSet { name, replicas: 1, annotations }
                if *name == v1.metadata.name && annotations[REVISION] == "3")));
        assert!(p
            .actions
            .iter()
            .any(|a| matches!(a, Action::AnnotateDeployment(ann) if ann[REVISION] == "3")));
    }

    #[test]
    fn recreate_scales_old_down_then_waits_for_pods_then_creates() {
        let mut d = deployment(3, "v2");
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        let old = rs_for(&d, "v1", 1, 3, 3, 0);
        let p = plan(&d, std::slice::from_ref(&old), true, t(10));
        assert_eq!(scales(&p), vec![(old.metadata.name.clone(), 0)]);
        assert!(!p
            .actions
            .iter()
            .any(|a| matches!(a, Action::CreateReplicaSet(_))));
        let old0 = rs_for(&d, "v1", 1, 0, 0, 0);
        let p = plan(&d, std::slice::from_ref(&old0), true, t(11));
        assert!(p.actions.is_empty(), "waits for old pods: {:?}", p.actions);
        let p = plan(&d, &[old0], false, t(12));
        assert!(
            matches!(p.actions.as_slice(), [Action::CreateReplicaSet(rs), ..] if rs.spec.replicas == Some(3))
        );
    }

    #[test]
    fn scaling_a_settled_deployment_resizes_its_only_set() {
        let mut d = deployment(10, "v1");
        let rs = rs_for(&deployment(1, "v1"), "v1", 1, 1, 1, 0);
        d.metadata.annotations.insert(REVISION.into(), "1".into());
        let p = plan(&d, std::slice::from_ref(&rs), false, t(10));
        assert_eq!(scales(&p), vec![(rs.metadata.name.clone(), 10)]);
    }

    #[test]
    fn scaling_during_a_rollout_is_proportional() {
        // 10 → 20 while v1 has 8 and v2 has 5 (maxSurge 3 at 10 replicas: max-replicas 13).
        let d10 = deployment(10, "v2");
        let old = rs_for(&d10, "v1", 1, 8, 8, 0);
        let new = rs_for(&d10, "v2", 2, 5, 0, 10);
        let d20 = deployment(20, "v2");
        let p = plan(&d20, &[old.clone(), new.clone()], false, t(20));
        let s = scales(&p);
        let total: i32 = s.iter().map(|(_, r)| r).sum();
        assert_eq!(total, 20 + 5, "20 replicas + 25% surge");
        let of = |n: &str| s.iter().find(|(name, _)| name == n).unwrap().1;
        assert!(
            of(&old.metadata.name) > 8 && of(&new.metadata.name) > 5,
            "{s:?}"
        );
    }

    #[test]
    fn a_resize_whose_share_rounds_to_zero_still_updates_every_active_set() {
        // v1 at 3 and v2 at 1 mid-rollout (both annotated for 3 replicas, max 4); scaled to
        // 4: the one replica to add goes to v1, v2's share rounds to 0. v2 must still get
        // desired-replicas 4, or every later sync would see a "scaling event" and the rollout
        // would never resume.
        let d3 = deployment(3, "v2");
        let old = rs_for(&d3, "v1", 1, 3, 3, 0);
        let new = rs_for(&d3, "v2", 2, 1, 0, 10);
        let d4 = deployment(4, "v2");
        let p = plan(&d4, &[old.clone(), new.clone()], false, t(20));
        let desired: BTreeMap<String, String> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::ScaleReplicaSet {
                    name, annotations, ..
                } => Some((name.clone(), annotations[DESIRED_REPLICAS].clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            desired.get(&new.metadata.name).map(String::as_str),
            Some("4"),
            "{p:?}"
        );
        assert_eq!(
            desired.get(&old.metadata.name).map(String::as_str),
            Some("4"),
            "{p:?}"
        );
    }

    #[test]
    fn paused_deployments_do_not_roll() {
        let mut d = deployment(2, "v2");
        d.spec.paused = Some(true);
        let old = rs_for(&d, "v1", 1, 2, 2, 0);
        let p = plan(&d, &[old], false, t(10));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        let c = condition(&p.status.conditions, "Progressing").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("Unknown", Some("DeploymentPaused"))
        );
    }

    #[test]
    fn progress_deadline_is_reported() {
        let mut d = deployment(2, "v2");
        d.spec.progress_deadline_seconds = Some(30);
        d.metadata.annotations.insert(REVISION.into(), "2".into());
        let old = rs_for(&d, "v1", 1, 1, 1, 0);
        let new = rs_for(&d, "v2", 2, 2, 0, 10);
        let mut status = DeploymentStatus {
            replicas: Some(3),
            updated_replicas: Some(2),
            ready_replicas: Some(1),
            available_replicas: Some(1),
            ..Default::default()
        };
        let mut c = cond("Progressing", "True", "ReplicaSetUpdated", "x");
        c.last_update_time = Some(Time(t(10)));
        status.conditions.push(c);
        d.status = Some(status);
        let p = plan(&d, &[old.clone(), new.clone()], false, t(20));
        assert_eq!(
            condition(&p.status.conditions, "Progressing")
                .unwrap()
                .reason
                .as_deref(),
            Some("ReplicaSetUpdated")
        );
        assert_eq!(p.requeue_after, Some(Duration::from_secs(21)));
        let p = plan(&d, &[old, new], false, t(41));
        let c = condition(&p.status.conditions, "Progressing").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some("ProgressDeadlineExceeded"))
        );
    }

    #[test]
    fn history_beyond_the_limit_is_deleted() {
        let mut d = deployment(1, "v4");
        d.spec.revision_history_limit = Some(1);
        d.metadata.annotations.insert(REVISION.into(), "4".into());
        let sets = vec![
            rs_for(&d, "v1", 1, 0, 0, 0),
            rs_for(&d, "v2", 2, 0, 0, 1),
            rs_for(&d, "v3", 3, 0, 0, 2),
            rs_for(&d, "v4", 4, 1, 1, 3),
        ];
        let p = plan(&d, &sets, false, t(10));
        let deleted: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| matches!(a, Action::DeleteReplicaSet(_)))
            .collect();
        assert_eq!(
            deleted,
            vec![
                &Action::DeleteReplicaSet(sets[0].metadata.name.clone()),
                &Action::DeleteReplicaSet(sets[1].metadata.name.clone()),
            ]
        );
    }
}
