//! emptyDir volumes: their bounds and their clean-up (the kubelet's eviction manager's
//! `emptyDirLimitEviction`, and its orphaned-pod-directory clean-up).
//!
//! A pod's emptyDirs are host directories `PODS/{namespace}_{name}_{uid}/volumes/{volume}`
//! preopened into its guests ([`crate::runtime::pod::Mount`]). They share the disk with the
//! agent's compile cache and, under `wasmctl up`, with the server's RocksDB, so every one is
//! bounded:
//!
//! - **bytes**: `sizeLimit` when it is set and positive (as in Kubernetes, `0` sets none),
//!   else the node's `--emptydir-default-limit` (default 1Gi). A per-volume default rather
//!   than the node's ephemeral-storage capacity, because that capacity is the very disk a
//!   single guest must not be able to fill. Usage is counted like `du`: allocated blocks of
//!   every entry, so sparse files count what they occupy;
//! - **inodes**: `--emptydir-inode-limit` per volume (default 65536, ext4's default of one
//!   inode per 16 KiB of a 1Gi volume), so millions of empty files are bounded too;
//! - **depth**: [`MAX_DEPTH`] nested directories, so the walk's open descriptors are bounded.
//!
//! One node-wide [`VolumeMonitor`] measures every watched volume each `--emptydir-check-period`
//! (default 250 ms) on one blocking thread, pausing at least as long as a pass took (so at
//! most half a core). A walk stops as soon as a volume is over a bound, so its work is at most
//! `inode limit + 1` entries per volume (~3.5 µs an entry here: a volume at the default 65536
//! inodes takes ~0.25 s a pass, an empty one microseconds). A volume over a bound evicts
//! its pod as the kubelet does: the pod is stopped at once (grace 0), its status becomes
//! `phase: Failed, reason: Evicted, message: Usage of EmptyDir volume "NAME" exceeds the limit
//! "SIZE". `, its volumes are removed, and it is not restarted (a ReplicaSet replaces it).
//! wasmtime-wasi has no hook on filesystem writes (only `socket_addr_check` for sockets), so
//! the bound is checked, not enforced per write: a guest can overshoot by what it writes
//! between two passes.
//!
//! Clean-up: [`remove_orphans`] removes the directory of every pod uid the agent runs no
//! worker for (force-deleted while the agent was down, or deleted out from under it), at each
//! full list of the agent's pods and whenever a pod worker ends, but never at shutdown (a
//! pod stopped by the agent's shutdown keeps its volumes for the next start).

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wasmctl_api::core::{ContainerState, ContainerStateTerminated, PodSpec, PodStatus};
use wasmctl_api::Quantity;

/// Directories nested deeper than this in one emptyDir evict the pod (the walk holds one open
/// descriptor per level).
pub const MAX_DEPTH: usize = 256;

/// The node's emptyDir bounds (`wasmctl agent --emptydir-*`).
#[derive(Debug, Clone)]
pub struct VolumeLimits {
    /// The size of an emptyDir without a (positive) `sizeLimit`.
    pub default_size_limit: Quantity,
    /// Inodes (files, directories, links) one emptyDir may hold.
    pub max_inodes: u64,
    /// Time between two measuring passes.
    pub period: Duration,
}

impl Default for VolumeLimits {
    fn default() -> Self {
        VolumeLimits {
            default_size_limit: Quantity::from("1Gi"),
            max_inodes: 65536,
            period: Duration::from_millis(250),
        }
    }
}

/// One emptyDir of a pod, with its byte bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmptyDir {
    pub name: String,
    pub path: PathBuf,
    pub limit: u64,
    /// The bound as the user (or the node's flag) wrote it, for the eviction message.
    pub limit_shown: String,
}

/// The emptyDirs of a pod whose directory is `pod_dir`.
pub fn empty_dirs(spec: &PodSpec, pod_dir: &Path, limits: &VolumeLimits) -> Vec<EmptyDir> {
    let default = (
        limits.default_size_limit.bytes().unwrap_or(i64::MAX).max(0) as u64,
        limits.default_size_limit.to_string(),
    );
    spec.volumes
        .iter()
        .filter_map(|v| {
            let ed = v.empty_dir.as_ref()?;
            let (limit, limit_shown) = ed
                .size_limit
                .as_ref()
                .and_then(|q| {
                    q.bytes()
                        .ok()
                        .filter(|b| *b > 0)
                        .map(|b| (b as u64, q.0.clone()))
                })
                .unwrap_or_else(|| default.clone());
            Some(EmptyDir {
                name: v.name.clone(),
                path: volumes_dir(pod_dir).join(&v.name),
                limit,
                limit_shown,
            })
        })
        .collect()
}

/// Where a pod's volumes live inside its directory.
pub fn volumes_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("volumes")
}

/// What a walk of a volume counted (it stops early once over a bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Allocated bytes (`st_blocks * 512`, as `du`).
    pub bytes: u64,
    /// Entries, the volume's own directory included.
    pub inodes: u64,
    /// Deepest level of directories seen (the volume itself is 0).
    pub depth: usize,
}

/// Measures `root` like `du` without following symlinks or leaving it (descriptor-relative,
/// so no path length limits what is counted). Stops once `bytes > max_bytes`,
/// `inodes > max_inodes` or `depth > MAX_DEPTH`; entries that vanish mid-walk are skipped.
pub fn measure(root: &Path, max_bytes: u64, max_inodes: u64) -> Usage {
    let mut u = Usage::default();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(top) = Dir::open(root, flags, Mode::empty()) else {
        return u;
    };
    if let Ok(st) = nix::sys::stat::fstat(top.as_raw_fd()) {
        u.bytes = (st.st_blocks.max(0) as u64).saturating_mul(512);
    }
    u.inodes = 1;
    let over = |u: &Usage| u.bytes > max_bytes || u.inodes > max_inodes || u.depth > MAX_DEPTH;
    let mut stack = vec![top.into_iter()];
    while let Some(dir) = stack.last_mut() {
        if over(&u) {
            break;
        }
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let fd = dir.as_raw_fd();
        let Ok(st) = fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        u.inodes += 1;
        u.bytes = u
            .bytes
            .saturating_add((st.st_blocks.max(0) as u64).saturating_mul(512));
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            u.depth = u.depth.max(stack.len());
            if u.depth > MAX_DEPTH {
                continue;
            }
            if let Ok(sub) = Dir::openat(Some(fd), name, flags, Mode::empty()) {
                stack.push(sub.into_iter());
            }
        }
    }
    u
}

/// Kubernetes' eviction message when `u` is over one of `v`'s bounds (`emptyDirMessageFmt`:
/// `Usage of EmptyDir volume %q exceeds the limit %q. `), else `None`.
pub fn over_limit(v: &EmptyDir, u: Usage, max_inodes: u64) -> Option<String> {
    let limit = if u.bytes > v.limit {
        v.limit_shown.clone()
    } else if u.inodes > max_inodes {
        format!("{max_inodes} inodes")
    } else if u.depth > MAX_DEPTH {
        format!("{MAX_DEPTH} nested directories")
    } else {
        return None;
    };
    Some(format!(
        "Usage of EmptyDir volume {:?} exceeds the limit {limit:?}. ",
        v.name
    ))
}

/// The status of a pod the kubelet evicted (`evictPod`: phase Failed, reason `Evicted`): the
/// worker's last status with every container not ready and the pod's Ready conditions false.
pub fn evicted_status(mut st: PodStatus, message: &str) -> PodStatus {
    st.phase = Some("Failed".into());
    st.reason = Some("Evicted".into());
    st.message = Some(message.to_string());
    for c in &mut st.conditions {
        if c.type_ == "Ready" || c.type_ == "ContainersReady" {
            if c.status != "False" {
                c.last_transition_time = Some(wasmctl_api::Time::now());
            }
            c.status = "False".into();
            c.reason = Some("PodCompleted".into());
        }
    }
    let now = wasmctl_api::Time::now();
    for c in &mut st.container_statuses {
        c.ready = false;
        c.started = Some(false);
        // Killed with grace 0: a runner aborted before it reported its exit is reported
        // here, as the kill it was (137).
        if let Some(running) = c.state.as_ref().and_then(|s| s.running.clone()) {
            c.state = Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 137,
                    signal: None,
                    reason: Some("Error".into()),
                    message: None,
                    started_at: running.started_at,
                    finished_at: Some(now),
                }),
                ..Default::default()
            });
        }
    }
    st
}

struct Watched {
    volumes: Vec<EmptyDir>,
    evict: mpsc::Sender<String>,
}

/// Measures the emptyDirs of every pod the agent runs, node-wide, one pass per period.
pub struct VolumeMonitor {
    limits: VolumeLimits,
    pods: Mutex<HashMap<String, Watched>>,
}

/// A pod's registration with the monitor; dropping it stops the measuring.
pub struct Watch {
    monitor: Arc<VolumeMonitor>,
    uid: String,
    rx: mpsc::Receiver<String>,
}

impl Watch {
    /// Resolves with the eviction message once one of the pod's volumes is over a bound.
    pub async fn evicted(&mut self) -> String {
        match self.rx.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.monitor
            .pods
            .lock()
            .expect("volume monitor lock")
            .remove(&self.uid);
    }
}

impl VolumeMonitor {
    pub fn new(limits: VolumeLimits) -> Arc<VolumeMonitor> {
        Arc::new(VolumeMonitor {
            limits,
            pods: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> &VolumeLimits {
        &self.limits
    }

    /// Starts measuring `volumes` of the pod `uid`.
    pub fn watch(self: &Arc<Self>, uid: &str, volumes: Vec<EmptyDir>) -> Watch {
        let (tx, rx) = mpsc::channel(1);
        if !volumes.is_empty() {
            self.pods
                .lock()
                .expect("volume monitor lock")
                .insert(uid.to_string(), Watched { volumes, evict: tx });
        }
        Watch {
            monitor: self.clone(),
            uid: uid.to_string(),
            rx,
        }
    }

    /// One pass over every watched volume; a pod over a bound is told (once) and no longer
    /// measured. Blocking (file system walks).
    pub fn pass(&self) {
        let snapshot: Vec<(String, Vec<EmptyDir>)> = self
            .pods
            .lock()
            .expect("volume monitor lock")
            .iter()
            .map(|(uid, w)| (uid.clone(), w.volumes.clone()))
            .collect();
        for (uid, volumes) in snapshot {
            let verdict = volumes.iter().find_map(|v| {
                let u = measure(&v.path, v.limit, self.limits.max_inodes);
                over_limit(v, u, self.limits.max_inodes).map(|m| (m, u))
            });
            if let Some((message, u)) = verdict {
                if let Some(w) = self.pods.lock().expect("volume monitor lock").remove(&uid) {
                    tracing::info!(%uid, %message, bytes = u.bytes, inodes = u.inodes, "evicting pod");
                    let _ = w.evict.try_send(message);
                }
            }
        }
    }

    /// Runs passes until `shutdown`. The pause after a pass is the period, or as long as the
    /// pass took if longer, so the walks take at most half of one core.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let me = self.clone();
            let started = std::time::Instant::now();
            let _ = tokio::task::spawn_blocking(move || me.pass()).await;
            let pause = self.limits.period.max(started.elapsed());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The pod uid a directory of the pods dir belongs to (`{namespace}_{name}_{uid}`: namespaces
/// and pod names never hold `_`); `None` for anything else, which is never removed.
pub fn dir_uid(name: &str) -> Option<&str> {
    let mut parts = name.split('_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && !ns.is_empty() && !pod.is_empty() && !uid.is_empty()).then_some(uid)
}

/// Where orphans are moved before they are removed.
fn trash(pods_dir: &Path) -> PathBuf {
    pods_dir.join(".removing")
}

/// Removes the directories of pods whose uid is not in `live`. Call it from the loop that
/// starts pod workers, with the uids of every worker it has: the decision and a rename out of
/// the way happen here (a readdir of the pods dir), so no worker started later can lose its
/// directory; the removal itself runs on the blocking pool. Returns how many were found.
pub fn remove_orphans(pods_dir: &Path, live: &HashSet<String>) -> usize {
    let Ok(entries) = std::fs::read_dir(pods_dir) else {
        return 0;
    };
    let trash = trash(pods_dir);
    let mut found = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(uid) = name.to_str().and_then(dir_uid) else {
            continue;
        };
        if live.contains(uid) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let _ = std::fs::create_dir_all(&trash);
        match std::fs::rename(e.path(), trash.join(&name)) {
            Ok(()) => {
                found += 1;
                tracing::info!(dir = %e.path().display(), "removing the directory of a pod this node no longer runs");
            }
            Err(err) => {
                tracing::warn!(dir = %e.path().display(), error = %err, "could not remove an orphaned pod directory")
            }
        }
    }
    if trash.exists() {
        tokio::task::spawn_blocking(move || {
            if let Ok(entries) = std::fs::read_dir(&trash) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn vol(dir: &Path, limit: u64) -> EmptyDir {
        EmptyDir {
            name: "data".into(),
            path: dir.to_path_buf(),
            limit,
            limit_shown: "1Mi".into(),
        }
    }

    #[test]
    fn measures_like_du_and_stops_at_the_bounds() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut f = std::fs::File::create(root.join("a")).unwrap();
        f.write_all(&vec![7u8; 256 * 1024]).unwrap();
        f.sync_all().unwrap();
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/e/empty"), b"").unwrap();
        std::os::unix::fs::symlink("/", root.join("d/up")).unwrap();
        let u = measure(root, u64::MAX, u64::MAX);
        // root, a, d, d/e, d/e/empty, d/up (the link itself: `/` is not walked).
        assert_eq!(u.inodes, 6, "{u:?}");
        assert!(u.bytes >= 256 * 1024, "{u:?}");
        assert!(u.bytes < 1024 * 1024, "{u:?}");
        assert_eq!(u.depth, 2);

        let v = vol(root, 1 << 20);
        assert_eq!(over_limit(&v, u, 100), None);
        let small = vol(root, 1024);
        assert_eq!(
            over_limit(&small, measure(root, 1024, 100), 100).as_deref(),
            Some("Usage of EmptyDir volume \"data\" exceeds the limit \"1Mi\". ")
        );
        let few = measure(root, u64::MAX, 3);
        assert_eq!(few.inodes, 4, "the walk stops past the inode bound");
        assert_eq!(
            over_limit(&v, few, 3).as_deref(),
            Some("Usage of EmptyDir volume \"data\" exceeds the limit \"3 inodes\". ")
        );
    }

    #[test]
    fn deep_trees_are_bounded() {
        let t = tempfile::tempdir().unwrap();
        let mut p = t.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 2 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let u = measure(t.path(), u64::MAX, u64::MAX);
        assert!(u.depth > MAX_DEPTH);
        assert!(over_limit(&vol(t.path(), u64::MAX), u, u64::MAX)
            .unwrap()
            .contains("nested directories"));
    }

    #[test]
    fn sizes_come_from_size_limit_or_the_node_default() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [],
            "volumes": [
                {"name": "a", "emptyDir": {"sizeLimit": "1Mi"}},
                {"name": "b", "emptyDir": {}},
                {"name": "c", "emptyDir": {"sizeLimit": "0"}},
            ],
        }))
        .unwrap();
        let limits = VolumeLimits {
            default_size_limit: Quantity::from("2Mi"),
            ..Default::default()
        };
        let v = empty_dirs(&spec, Path::new("/p"), &limits);
        let got: Vec<(&str, u64, &str)> = v
            .iter()
            .map(|v| (v.name.as_str(), v.limit, v.limit_shown.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", 1 << 20, "1Mi"),
                ("b", 2 << 20, "2Mi"),
                ("c", 2 << 20, "2Mi")
            ]
        );
        assert_eq!(v[0].path, Path::new("/p/volumes/a"));
    }

    #[test]
    fn an_evicted_status_is_failed_for_good() {
        let st: PodStatus = serde_json::from_value(serde_json::json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "i",
                "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}],
        }))
        .unwrap();
        let st = evicted_status(st, "m");
        assert_eq!(st.phase.as_deref(), Some("Failed"));
        assert_eq!(st.reason.as_deref(), Some("Evicted"));
        assert_eq!(st.message.as_deref(), Some("m"));
        assert_eq!(st.conditions[0].status, "False");
        assert_eq!(st.conditions[1].status, "True");
        let c = &st.container_statuses[0];
        let t = c.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((t.exit_code, c.ready), (137, false));
        assert!(t.started_at.is_some());
    }

    #[tokio::test]
    async fn only_dirs_of_pods_not_running_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let pods = t.path();
        for d in [
            "default_web_uid-1/volumes/data",
            "default_gone_uid-2/volumes/data",
        ] {
            std::fs::create_dir_all(pods.join(d)).unwrap();
        }
        std::fs::create_dir_all(pods.join("not-a-pod")).unwrap();
        let live: HashSet<String> = ["uid-1".to_string()].into();
        assert_eq!(remove_orphans(pods, &live), 1);
        assert!(pods.join("default_web_uid-1/volumes/data").exists());
        assert!(!pods.join("default_gone_uid-2").exists());
        assert!(pods.join("not-a-pod").exists());
        assert_eq!(dir_uid("a_b_c"), Some("c"));
        assert_eq!(dir_uid("a_b"), None);
        assert_eq!(dir_uid("a_b_c_d"), None);
    }
}
