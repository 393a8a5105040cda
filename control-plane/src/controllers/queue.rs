//! A deduplicating work queue of object keys with delayed adds: a key is queued at most once
//! (and has at most one pending delayed add), so the queue is bounded by the number of
//! objects however often they change.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct State {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    /// (due, sequence) → key; `due_at` is the reverse index.
    delayed: BTreeMap<(Instant, u64), String>,
    due_at: HashMap<String, (Instant, u64)>,
    seq: u64,
    /// Consecutive failures per key, for the retry back-off.
    failures: HashMap<String, u32>,
}

#[derive(Clone, Default)]
pub struct WorkQueue {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl WorkQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `key` now (no-op if it is already queued).
    pub fn add(&self, key: &str) {
        let mut st = self.state.lock().expect("queue lock");
        if st.queued.insert(key.to_string()) {
            st.ready.push_back(key.to_string());
            drop(st);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`, unless an earlier add is already pending.
    pub fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let due = Instant::now() + delay;
        let mut st = self.state.lock().expect("queue lock");
        if let Some(&(at, seq)) = st.due_at.get(key) {
            if at <= due {
                return;
            }
            st.delayed.remove(&(at, seq));
        }
        st.seq += 1;
        let slot = (due, st.seq);
        st.delayed.insert(slot, key.to_string());
        st.due_at.insert(key.to_string(), slot);
        drop(st);
        self.notify.notify_one();
    }

    /// Re-queues a key whose reconcile failed, with exponential back-off (100 ms … 30 s).
    pub fn retry(&self, key: &str) -> Duration {
        let n = {
            let mut st = self.state.lock().expect("queue lock");
            let n = st.failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let delay = Duration::from_millis(100)
            .saturating_mul(1 << (n - 1).min(9))
            .min(Duration::from_secs(30));
        self.add_after(key, delay);
        delay
    }

    /// Consecutive failed (or requeued) attempts of `key` since it last reconciled.
    #[cfg(test)]
    pub(crate) fn failures(&self, key: &str) -> u32 {
        let st = self.state.lock().expect("queue lock");
        st.failures.get(key).copied().unwrap_or(0)
    }

    /// Clears the back-off of a key that reconciled.
    pub fn forget(&self, key: &str) {
        self.state.lock().expect("queue lock").failures.remove(key);
    }

    pub fn len(&self) -> usize {
        let st = self.state.lock().expect("queue lock");
        st.ready.len() + st.delayed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next key (due delayed adds first become ready), or `None` on shutdown.
    pub async fn next(&self, shutdown: &CancellationToken) -> Option<String> {
        loop {
            let next_due = {
                let mut st = self.state.lock().expect("queue lock");
                let now = Instant::now();
                while let Some((&slot, _)) = st.delayed.first_key_value() {
                    if slot.0 > now {
                        break;
                    }
                    let key = st.delayed.remove(&slot).expect("present");
                    st.due_at.remove(&key);
                    if st.queued.insert(key.clone()) {
                        st.ready.push_back(key);
                    }
                }
                if let Some(key) = st.ready.pop_front() {
                    st.queued.remove(&key);
                    return Some(key);
                }
                st.delayed.first_key_value().map(|(slot, _)| slot.0)
            };
            let sleep = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.notify.notified() => {}
                _ = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedups_and_orders() {
        let q = WorkQueue::new();
        let stop = CancellationToken::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.next(&stop).await.as_deref(), Some("a"));
        assert_eq!(q.next(&stop).await.as_deref(), Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn delayed_adds_keep_the_earliest() {
        let q = WorkQueue::new();
        let stop = CancellationToken::new();
        let start = Instant::now();
        q.add_after("a", Duration::from_secs(60));
        q.add_after("a", Duration::from_millis(50));
        q.add_after("a", Duration::from_secs(120));
        assert_eq!(q.len(), 1);
        assert_eq!(q.next(&stop).await.as_deref(), Some("a"));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(60));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn retries_back_off_and_forget_resets() {
        let q = WorkQueue::new();
        assert_eq!(q.retry("k"), Duration::from_millis(100));
        assert_eq!(q.retry("k"), Duration::from_millis(200));
        assert_eq!(q.retry("k"), Duration::from_millis(400));
        q.forget("k");
        assert_eq!(q.retry("k"), Duration::from_millis(100));
        for _ in 0..20 {
            q.retry("k");
        }
        assert_eq!(q.retry("k"), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn shutdown_ends_next() {
        let q = WorkQueue::new();
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(q.next(&stop).await, None);
    }
}
