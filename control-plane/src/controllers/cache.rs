//! The controllers' shared informer: every object of the store in memory, kept current by ONE
//! watch of the whole key space, indexed by uid and by owner uid, with change handlers that
//! enqueue work.
//!
//! Like client-go's shared informers, but in-process: the store is local, so there is one
//! list and one watch for every controller. After a controller writes, it waits until the
//! cache has seen that revision ([`Cache::wait_for`]) before it looks again, so a reconcile
//! never acts twice on its own stale view (client-go needs "expectations" for this).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmctl_store::{EventKind, Store, StoreError};

use crate::objects::decode_kv;

/// One change as seen by the cache: `old` is `None` for a new key, `new` is `None` for a
/// deleted one. After a re-list, every key is reported (as a resync).
pub struct Change<'a> {
    pub key: &'a str,
    pub old: Option<&'a Arc<Value>>,
    pub new: Option<&'a Arc<Value>>,
}

impl Change<'_> {
    /// The object after the change, or before it for a deletion.
    pub fn object(&self) -> Option<&Arc<Value>> {
        self.new.or(self.old)
    }
}

type Handler = Box<dyn Fn(&Cache, &Change) + Send + Sync>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Arc<Value>>,
    /// uid → key.
    by_uid: HashMap<String, String>,
    /// owner uid → keys of the objects that list it in `ownerReferences`.
    dependents: HashMap<String, BTreeSet<String>>,
}

impl State {
    fn insert(&mut self, key: &str, value: Arc<Value>) -> Option<Arc<Value>> {
        let old = self.remove(key);
        if let Some(uid) = value["metadata"]["uid"].as_str() {
            self.by_uid.insert(uid.to_string(), key.to_string());
        }
        for owner in owner_uids(&value) {
            self.dependents
                .entry(owner.to_string())
                .or_default()
                .insert(key.to_string());
        }
        self.objects.insert(key.to_string(), value);
        old
    }

    fn remove(&mut self, key: &str) -> Option<Arc<Value>> {
        let old = self.objects.remove(key)?;
        if let Some(uid) = old["metadata"]["uid"].as_str() {
            if self.by_uid.get(uid).map(String::as_str) == Some(key) {
                self.by_uid.remove(uid);
            }
        }
        for owner in owner_uids(&old) {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(owner);
                }
            }
        }
        Some(old)
    }
}

fn owner_uids(v: &Value) -> impl Iterator<Item = &str> {
    v["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["uid"].as_str())
}

struct Inner {
    store: Store,
    state: RwLock<State>,
    /// The store revision the cache reflects (0 until the first list).
    revision: watch::Sender<u64>,
    handlers: Mutex<Vec<Handler>>,
}

/// A cheap handle to the shared cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl Cache {
    pub fn new(store: Store) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                store,
                state: RwLock::new(State::default()),
                revision: watch::channel(0).0,
                handlers: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Registers a handler, called (on the cache's task, so it must be quick: enqueue keys)
    /// for every change after it is applied. Register before [`Cache::run`].
    pub fn on_change(&self, f: impl Fn(&Cache, &Change) + Send + Sync + 'static) {
        self.inner
            .handlers
            .lock()
            .expect("handlers lock")
            .push(Box::new(f));
    }

    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.read().objects.get(key).cloned()
    }

    pub fn get_by_uid(&self, uid: &str) -> Option<Arc<Value>> {
        let st = self.read();
        st.by_uid.get(uid).and_then(|k| st.objects.get(k)).cloned()
    }

    /// Whether an object with this uid exists.
    pub fn has_uid(&self, uid: &str) -> bool {
        self.read().by_uid.contains_key(uid)
    }

    /// Objects whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Vec<Arc<Value>> {
        self.read()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Keys starting with `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.read()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The objects that list `owner_uid` in their ownerReferences, with their keys.
    pub fn dependents(&self, owner_uid: &str) -> Vec<(String, Arc<Value>)> {
        let st = self.read();
        st.dependents
            .get(owner_uid)
            .into_iter()
            .flatten()
            .filter_map(|k| st.objects.get(k).map(|v| (k.clone(), v.clone())))
            .collect()
    }

    /// The store revision the cache reflects.
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// Waits until the cache reflects `revision` (a write this process made), at most
    /// `timeout`; returns whether it does.
    pub async fn wait_for(&self, revision: u64, timeout: Duration) -> bool {
        let mut rx = self.inner.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits for the first complete list.
    pub async fn wait_synced(&self, shutdown: &CancellationToken) -> bool {
        let mut rx = self.inner.revision.subscribe();
        tokio::select! {
            r = rx.wait_for(|r| *r > 0) => r.is_ok(),
            _ = shutdown.cancelled() => false,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().expect("cache lock")
    }

    fn notify(&self, change: &Change) {
        let handlers = self.inner.handlers.lock().expect("handlers lock");
        for h in handlers.iter() {
            h(self, change);
        }
    }

    /// Lists everything, then follows the store's watch; re-lists when the watch cannot go
    /// on (history compacted, receiver lagged). Returns on shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let from = match self.relist().await {
                Ok(rev) => rev,
                Err(e) => {
                    tracing::warn!(error = %e, "controller cache: listing the store failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            match self.follow(from, &shutdown).await {
                Ok(()) => return,
                Err(e) => tracing::info!(error = %e, "controller cache: watch ended; re-listing"),
            }
        }
    }

    /// Replaces the state with a fresh list and reports every key (changed or not: a resync).
    async fn relist(&self) -> Result<u64, StoreError> {
        // Objects only: the store's own keys (`/wasmctl/...`: module chunks, allocation
        // records, leases) all sort before "/\u{10FFFF}", and object keys after it.
        let range = self
            .inner
            .store
            .range("", Some(INTERNAL_KEYS_END), 0)
            .await?;
        let mut fresh = State::default();
        for kv in &range.items {
            if let Ok(v) = decode_kv(kv) {
                fresh.insert(&kv.key, Arc::new(v));
            }
        }
        let old = {
            let mut st = self.inner.state.write().expect("cache lock");
            std::mem::replace(&mut *st, fresh)
        };
        self.inner.revision.send_replace(range.revision.max(1));
        let new = self.read().objects.clone();
        for (key, value) in &new {
            self.notify(&Change {
                key,
                old: old.objects.get(key),
                new: Some(value),
            });
        }
        for (key, value) in old.objects.iter().filter(|(k, _)| !new.contains_key(*k)) {
            self.notify(&Change {
                key,
                old: Some(value),
                new: None,
            });
        }
        Ok(range.revision)
    }

    async fn follow(&self, from: u64, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let mut watch = self.inner.store.watch("", from)?;
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ev = watch.next() => ev,
            };
            let ev = match ev {
                None => return Ok(()),
                Some(ev) => ev?,
            };
            if ev.key.starts_with('/') {
                // The store's own keys are no objects.
                self.inner.revision.send_replace(ev.revision);
                continue;
            }
            let new = match (ev.kind, &ev.value) {
                (EventKind::Put, Some(kv)) => decode_kv(kv).ok().map(Arc::new),
                _ => None,
            };
            let old = {
                let mut st = self.inner.state.write().expect("cache lock");
                match &new {
                    Some(v) => st.insert(&ev.key, v.clone()),
                    None => st.remove(&ev.key),
                }
            };
            self.inner.revision.send_replace(ev.revision);
            if old.is_some() || new.is_some() {
                self.notify(&Change {
                    key: &ev.key,
                    old: old.as_ref(),
                    new: new.as_ref(),
                });
            }
        }
    }
}

/// The last possible key of the store's own (`/`-prefixed) keys: objects come after it.
const INTERNAL_KEYS_END: &str = "/\u{10FFFF}";

/// `ns` and `name` of a namespaced store key (`replicasets.apps/default/web-1`).
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.splitn(3, '/');
    parts.next()?;
    Some((parts.next()?, parts.next()?))
}
