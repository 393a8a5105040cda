//! Several stores in one process, connected by an in-process transport with fault injection:
//! membership, replication, forwarding, failover, partitions, snapshots and removal, on real
//! RocksDB in temporary directories.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasmctl_store::{
    BoxFuture, MemberRole, Op, OpResult, Precondition, RaftTransport, Rpc, Store, StoreConfig,
    StoreError, StoreStatus, TransportError,
};

/// The deadline of every wait for the cluster to converge.
const WAIT: Duration = Duration::from_secs(20);
/// How often a polled condition is checked again.
const POLL: Duration = Duration::from_millis(20);
/// How long a membership must stay unchanged to count as settled (see `wait_voters`).
const SETTLED: Duration = Duration::from_millis(200);
const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: (u64, u64) = (250, 500);

// ---------------------------------------------------------------------------------------------
// The in-process network.

/// What happens to calls to or from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Calls fail at once with `Unreachable` (nothing is delivered).
    Unreachable,
    /// Calls are not delivered and fail with `Timeout` once their deadline passes.
    Stall,
}

/// The registry of the stores (by advertised address) and the faults injected between them.
#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<String, Store>>,
    faults: Mutex<HashMap<u64, Fault>>,
}

impl Net {
    fn new() -> Arc<Net> {
        Arc::new(Net::default())
    }

    /// The transport of node `id` (it knows its own id, for the faults of calls from it).
    fn transport(self: &Arc<Self>, id: u64) -> Arc<dyn RaftTransport> {
        Arc::new(NodeTransport {
            net: Arc::downgrade(self),
            id,
        })
    }

    fn register(&self, addr: &str, store: Store) {
        self.nodes.lock().unwrap().insert(addr.to_owned(), store);
    }

    fn unregister(&self, addr: &str) -> Option<Store> {
        self.nodes.lock().unwrap().remove(addr)
    }

    fn lookup(&self, addr: &str) -> Option<Store> {
        self.nodes.lock().unwrap().get(addr).cloned()
    }

    /// Calls to or from `id` fail with `Unreachable`.
    fn isolate(&self, id: u64) {
        self.set_fault(id, Fault::Unreachable);
    }

    fn set_fault(&self, id: u64, fault: Fault) {
        self.faults.lock().unwrap().insert(id, fault);
    }

    fn heal(&self, id: u64) {
        self.faults.lock().unwrap().remove(&id);
    }

    /// The fault of a call from `from` to `to` (a stall wins over unreachable).
    fn fault(&self, from: u64, to: u64) -> Option<Fault> {
        let faults = self.faults.lock().unwrap();
        let (a, b) = (faults.get(&from).copied(), faults.get(&to).copied());
        if a == Some(Fault::Stall) || b == Some(Fault::Stall) {
            Some(Fault::Stall)
        } else {
            a.or(b)
        }
    }
}

struct NodeTransport {
    net: Weak<Net>,
    id: u64,
}

impl RaftTransport for NodeTransport {
    fn call(
        &self,
        target: u64,
        addr: &str,
        rpc: Rpc,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<Result<Vec<u8>, TransportError>> {
        let net = self.net.clone();
        let from = self.id;
        let addr = addr.to_owned();
        Box::pin(async move {
            let gone = || TransportError::Unreachable("the test network is gone".to_owned());
            let store = {
                let net = net.upgrade().ok_or_else(gone)?;
                match net.fault(from, target) {
                    Some(Fault::Unreachable) => {
                        return Err(TransportError::Unreachable(format!(
                            "partitioned: {rpc:?} from node {from} to node {target}"
                        )))
                    }
                    Some(Fault::Stall) => {
                        tokio::time::sleep(timeout).await;
                        return Err(TransportError::Timeout(timeout));
                    }
                    None => {}
                }
                let store = net.lookup(&addr).ok_or_else(|| {
                    TransportError::Unreachable(format!("nothing listens at {addr}"))
                })?;
                if store.node_id() != target {
                    return Err(TransportError::Unreachable(format!(
                        "{addr} is node {}, not node {target}",
                        store.node_id()
                    )));
                }
                store
            };
            let answer = tokio::time::timeout(timeout, store.handle_rpc(rpc, &body)).await;
            drop(store);
            // A partition that began while the call was in flight loses the answer.
            let net = net.upgrade().ok_or_else(gone)?;
            if net.fault(from, target).is_some() {
                return Err(TransportError::Failed(format!(
                    "connection from node {from} to node {target} lost in flight"
                )));
            }
            match answer {
                Err(_) => Err(TransportError::Timeout(timeout)),
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(e)) => Err(TransportError::Failed(format!("{rpc:?} failed: {e}"))),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A cluster of stores in temporary directories.

struct Node {
    addr: String,
    cfg: StoreConfig,
    store: Option<Store>,
    _dir: TempDir,
}

struct Cluster {
    name: &'static str,
    started: Instant,
    net: Arc<Net>,
    nodes: BTreeMap<u64, Node>,
}

fn addr(id: u64) -> String {
    format!("node-{id}.test:6443")
}

impl Cluster {
    fn new(name: &'static str) -> Cluster {
        Cluster {
            name,
            started: Instant::now(),
            net: Net::new(),
            nodes: BTreeMap::new(),
        }
    }

    /// Seconds since the cluster was made, for the timings printed.
    fn t(&self) -> String {
        format!("{:.2}s", self.started.elapsed().as_secs_f64())
    }

    fn log(&self, msg: &str) {
        eprintln!("[{} {}] {msg}", self.name, self.t());
    }

    /// Opens node `id` in a new directory (`bootstrap`: initialize a one-voter cluster).
    async fn start_with(&mut self, id: u64, bootstrap: bool, tweak: impl FnOnce(&mut StoreConfig)) {
        let dir = TempDir::new().unwrap();
        let mut cfg = StoreConfig::new(dir.path());
        cfg.node_id = id;
        cfg.advertise_addr = addr(id);
        cfg.fsync = false;
        cfg.bootstrap = bootstrap;
        cfg.transport = self.net.transport(id);
        cfg.heartbeat_ms = HEARTBEAT_MS;
        cfg.election_timeout_ms = ELECTION_MS;
        tweak(&mut cfg);
        let node = Node {
            addr: cfg.advertise_addr.clone(),
            cfg,
            store: None,
            _dir: dir,
        };
        self.nodes.insert(id, node);
        self.open(id).await;
    }

    async fn start(&mut self, id: u64, bootstrap: bool) {
        self.start_with(id, bootstrap, |_| {}).await
    }

    /// Opens the store of node `id` (again) and registers it on the network.
    async fn open(&mut self, id: u64) {
        let cfg = self.nodes[&id].cfg.clone();
        let opened = Instant::now();
        let store = match tokio::time::timeout(Duration::from_secs(40), Store::open(cfg)).await {
            Ok(Ok(store)) => store,
            Ok(Err(e)) => panic!("opening node {id}: {e}\n{}", self.dump()),
            Err(_) => panic!("opening node {id} timed out\n{}", self.dump()),
        };
        self.log(&format!("node {id} open in {:?}", opened.elapsed()));
        let node = self.nodes.get_mut(&id).unwrap();
        self.net.register(&node.addr, store.clone());
        node.store = Some(store);
    }

    /// Shuts node `id` down and forgets every handle of it (its directory stays).
    async fn stop(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        let store = node.store.take().expect("node is running");
        self.net.unregister(&node.addr);
        store.shutdown().await.expect("shutdown");
        drop(store);
        self.log(&format!("node {id} stopped"));
    }

    fn s(&self, id: u64) -> Store {
        self.nodes[&id]
            .store
            .clone()
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    fn running(&self) -> Vec<Store> {
        self.nodes
            .values()
            .filter_map(|n| n.store.clone())
            .collect()
    }

    /// Every node's state, for failure messages.
    fn dump(&self) -> String {
        let mut out = format!("cluster state at {}:\n", self.t());
        for (id, node) in &self.nodes {
            match &node.store {
                None => out.push_str(&format!("  node {id}: stopped\n")),
                Some(s) => {
                    let members: Vec<String> = s
                        .members()
                        .iter()
                        .map(|m| format!("{}:{:?}", m.id, m.role))
                        .collect();
                    out.push_str(&format!(
                        "  node {id}: {:?}\n    members {members:?} removed={} lag={:?}\n",
                        s.status(),
                        s.removed(),
                        s.replication_lag()
                    ));
                }
            }
        }
        out
    }

    /// Polls `check` until it yields a value; panics with the cluster state after `timeout`.
    async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            if let Some(v) = check().await {
                self.log(&format!("{what}: after {:?}", start.elapsed()));
                return v;
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {timeout:?}\n{}", self.dump());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `on` sees `n` voters, has applied its whole log, and its status stayed
    /// the same for [`SETTLED`].
    ///
    /// `members()` lists the union of a joint configuration's voters, and nothing public tells a
    /// joint configuration from a uniform one; openraft applies the joint entry before it
    /// proposes the uniform one (`Raft::change_membership` is two proposals). A change is
    /// complete once the status (log, applied, term, leader) has not changed for a while
    /// (heartbeats do not change it). `members()` and `status()` are separate reads, so the
    /// members are read between two equal statuses.
    async fn wait_voters(&self, on: u64, n: usize) {
        let s = self.s(on);
        let what = format!("node {on} sees {n} voters");
        let start = Instant::now();
        let deadline = start + WAIT;
        let mut settled_since: Option<(StoreStatus, Instant)> = None;
        loop {
            let before = s.status();
            let count = voters(&s);
            let after = s.status();
            let ok =
                before == after && count == n && after.last_applied_index == after.last_log_index;
            settled_since = match settled_since {
                Some((st, t)) if ok && st == after => Some((st, t)),
                _ if ok => Some((after, Instant::now())),
                _ => None,
            };
            if settled_since
                .as_ref()
                .is_some_and(|(_, t)| t.elapsed() >= SETTLED)
            {
                self.log(&format!("{what}: after {:?}", start.elapsed()));
                return;
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {WAIT:?}\n{}", self.dump());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `on` knows a leader other than `not`; returns it.
    async fn wait_new_leader(&self, on: u64, not: u64) -> u64 {
        let s = self.s(on);
        let start = Instant::now();
        match s
            .wait_for_status(WAIT, |st| st.current_leader.is_some_and(|l| l != not))
            .await
        {
            Ok(st) => {
                let leader = st.current_leader.unwrap();
                self.log(&format!(
                    "node {on} sees new leader {leader} (term {}) after {:?}",
                    st.term,
                    start.elapsed()
                ));
                leader
            }
            Err(e) => panic!("no new leader seen by node {on}: {e}\n{}", self.dump()),
        }
    }

    /// Waits until every running node has applied the same revision, at least `at_least`.
    async fn wait_same_revision(&self, at_least: u64) -> u64 {
        self.eventually("every node at the same revision", WAIT, || async {
            let revs: Vec<u64> = self.running().iter().map(Store::revision).collect();
            let first = revs[0];
            (first >= at_least && revs.iter().all(|r| *r == first)).then_some(first)
        })
        .await
    }

    /// Node 1 bootstraps, nodes 2 and 3 join as learners and are promoted to voters.
    async fn three_voters(name: &'static str) -> Cluster {
        let mut c = Cluster::new(name);
        c.start(1, true).await;
        c.start(2, false).await;
        c.start(3, false).await;
        let s1 = c.s(1);
        for id in [2, 3] {
            if let Err(e) = s1.add_learner(id, &addr(id)).await {
                panic!("add_learner({id}): {e}\n{}", c.dump());
            }
        }
        c.wait_voters(1, 3).await;
        c
    }

    async fn shutdown_all(mut self) {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            if self.nodes[&id].store.is_some() {
                self.stop(id).await;
            }
        }
        self.log("all nodes shut down");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("[{}] test failed; {}", self.name, self.dump());
        }
    }
}

fn voters(s: &Store) -> usize {
    s.members()
        .iter()
        .filter(|m| m.role == MemberRole::Voter)
        .count()
}

fn learners(s: &Store) -> Vec<u64> {
    s.members()
        .iter()
        .filter(|m| m.role == MemberRole::Learner)
        .map(|m| m.id)
        .collect()
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        precondition: Precondition::None,
    }
}

fn ok_revision(results: &[OpResult]) -> u64 {
    match results {
        [OpResult::Ok { revision, .. }] => *revision,
        other => panic!("expected one Ok, got {other:?}"),
    }
}

async fn value_of(s: &Store, key: &str) -> Result<Option<String>, StoreError> {
    Ok(s.get(key)
        .await?
        .map(|kv| String::from_utf8(kv.value.to_vec()).unwrap()))
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_form_replicate_and_answer_anywhere() {
    let mut c = Cluster::new("form");
    c.start(1, true).await;
    c.start(2, false).await;
    c.start(3, false).await;
    let (s1, s2, s3) = (c.s(1), c.s(2), c.s(3));
    assert!(s1.is_leader());
    assert_eq!(
        s2.status().current_leader,
        None,
        "a pristine joiner knows no leader"
    );

    s1.add_learner(2, &addr(2)).await.expect("add_learner(2)");
    // Idempotent with the same address; refused with another address or a taken one.
    s1.add_learner(2, &addr(2))
        .await
        .expect("add_learner(2) again");
    let err = s1.add_learner(2, &addr(9)).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    let err = s1.add_learner(9, &addr(2)).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    // A membership change asked of a member that is not the leader is forwarded to it: wait
    // for node 2 to know the leader first.
    s2.wait_for_status(WAIT, |st| st.current_leader == Some(1))
        .await
        .expect("node 2 learns the leader");
    s2.add_learner(3, &addr(3))
        .await
        .expect("add_learner(3) forwarded by node 2");
    c.log("learners added");

    c.wait_voters(1, 3).await;
    c.wait_voters(2, 3).await;
    c.wait_voters(3, 3).await;
    assert!(learners(&s1).is_empty());

    // A write on a follower is forwarded to the leader.
    assert!(!s2.is_leader());
    let t = Instant::now();
    let rev = ok_revision(
        &s2.write(vec![put("k1", "v1")])
            .await
            .expect("write on node 2"),
    );
    c.log(&format!("forwarded write took {:?}", t.elapsed()));
    // ... and applied on node 2 when it returns.
    assert!(s2.revision() >= rev, "node 2 at {} < {rev}", s2.revision());

    // A read on another follower sees it (read index).
    let t = Instant::now();
    let kv = s3
        .get("k1")
        .await
        .expect("get on node 3")
        .expect("k1 on node 3");
    c.log(&format!("follower read took {:?}", t.elapsed()));
    assert_eq!(&kv.value[..], b"v1");
    assert_eq!(kv.mod_revision, rev);
    let range = s3.range("k", None, 0).await.expect("range on node 3");
    assert_eq!(range.items.len(), 1);
    assert!(range.revision >= rev);

    // A write on the leader is read on the followers.
    let rev2 = ok_revision(&s1.write(vec![put("k2", "v2")]).await.expect("write on 1"));
    assert_eq!(value_of(&s2, "k2").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(value_of(&s3, "k2").await.unwrap().as_deref(), Some("v2"));

    let same = c.wait_same_revision(rev2).await;
    assert_eq!(same, rev2);

    // Status of the members over the transport, and the leader's view of replication.
    let st3 = s1
        .member_status(3, Duration::from_secs(2))
        .await
        .expect("member_status(3)");
    assert_eq!(st3.node_id, 3);
    assert_eq!(st3.current_leader, Some(1));
    let lag = s1.replication_lag().expect("the leader knows the lag");
    assert!(lag.contains_key(&2) && lag.contains_key(&3), "{lag:?}");
    assert!(s2.replication_lag().is_none(), "a follower has no lag view");

    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_dies_and_another_commits() {
    let mut c = Cluster::three_voters("failover").await;
    let rev_a = ok_revision(&c.s(1).write(vec![put("a", "1")]).await.expect("write a"));
    c.wait_same_revision(rev_a).await;

    c.stop(1).await;
    let leader = c.wait_new_leader(2, 1).await;
    assert!(leader == 2 || leader == 3, "leader {leader}");
    c.wait_new_leader(3, 1).await;

    // A write on a survivor that is not (necessarily) the leader.
    let survivor = if leader == 2 { 3 } else { 2 };
    let t = Instant::now();
    let rev_b = ok_revision(
        &c.s(survivor)
            .write(vec![put("b", "2")])
            .await
            .unwrap_or_else(|e| panic!("write on node {survivor}: {e}\n{}", c.dump())),
    );
    c.log(&format!("write after failover took {:?}", t.elapsed()));
    assert!(rev_b > rev_a);
    assert_eq!(
        value_of(&c.s(leader), "b").await.unwrap().as_deref(),
        Some("2")
    );

    // The old leader comes back from its directory, follows and catches up.
    c.open(1).await;
    let s1 = c.s(1);
    let got = c
        .eventually("node 1 reads b after restart", WAIT, || async {
            match value_of(&s1, "b").await {
                Ok(Some(v)) => Some(v),
                _ => None,
            }
        })
        .await;
    assert_eq!(got, "2");
    assert_eq!(value_of(&s1, "a").await.unwrap().as_deref(), Some("1"));
    let rev = c.wait_same_revision(rev_b).await;
    assert_eq!(rev, rev_b);
    assert!(s1.status().term >= 2, "node 1 did not learn the new term");
    // And a write through it still works.
    let rev_c = ok_revision(&s1.write(vec![put("c", "3")]).await.expect("write on 1"));
    c.wait_same_revision(rev_c).await;

    c.shutdown_all().await;
}

/// The leader is cut off (`fault`): nothing it is asked is acknowledged, while the majority
/// elects a new leader and commits; after healing, the old leader has the majority's history
/// and not its own unacknowledged write.
async fn isolated_leader_does_not_acknowledge(name: &'static str, fault: Fault) {
    let c = Cluster::three_voters(name).await;
    let (s1, s2, s3) = (c.s(1), c.s(2), c.s(3));
    let rev0 = ok_revision(&s1.write(vec![put("before", "0")]).await.expect("write"));
    c.wait_same_revision(rev0).await;

    c.net.set_fault(1, fault);
    c.log(&format!("leader 1 cut off ({fault:?})"));
    let lone_write = async {
        let t = Instant::now();
        let r = s1.write(vec![put("lost", "x")]).await;
        (r, t.elapsed())
    };
    let lone_read = async {
        let t = Instant::now();
        let r = s1.get("before").await;
        (r, t.elapsed())
    };
    let majority = async {
        let leader = c.wait_new_leader(2, 1).await;
        let t = Instant::now();
        let r = s2.write(vec![put("majority", "m")]).await;
        c.log(&format!(
            "majority (leader {leader}) write took {:?}",
            t.elapsed()
        ));
        r
    };
    let ((write, write_took), (read, read_took), majority) =
        tokio::join!(lone_write, lone_read, majority);
    c.log(&format!(
        "isolated leader: write -> {write:?} after {write_took:?}; read -> {read:?} after {read_took:?}"
    ));
    match &write {
        Err(StoreError::Timeout(_)) | Err(StoreError::Unavailable(_)) => {}
        other => panic!("a write on an isolated leader must not succeed: {other:?}"),
    }
    assert!(
        read.is_err(),
        "a stale read on the isolated leader: {read:?}"
    );
    let rev_m = ok_revision(&majority.expect("the majority commits"));
    assert_eq!(
        value_of(&s3, "majority").await.unwrap().as_deref(),
        Some("m")
    );

    c.net.heal(1);
    c.log("healed node 1");
    let got = c
        .eventually("old leader reads the majority's write", WAIT, || async {
            match value_of(&s1, "majority").await {
                Ok(Some(v)) => Some(v),
                _ => None,
            }
        })
        .await;
    assert_eq!(got, "m");
    assert!(s1.status().term >= 2, "node 1 did not learn the new term");
    let rev = c.wait_same_revision(rev_m).await;
    assert_eq!(
        rev, rev_m,
        "the lost write must not have been applied anywhere"
    );
    for s in c.running() {
        assert_eq!(
            value_of(&s, "lost").await.unwrap(),
            None,
            "node {} has the unacknowledged write",
            s.node_id()
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_leader_does_not_acknowledge() {
    isolated_leader_does_not_acknowledge("isolated-leader", Fault::Unreachable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_leader_does_not_acknowledge() {
    isolated_leader_does_not_acknowledge("stalled-leader", Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_member_catches_up_by_snapshot() {
    const KEYS: usize = 300;
    // 300 x 16 KiB: the snapshot (~5 MB) takes two 3 MiB chunks.
    let pad = "x".repeat(16 * 1024);
    let mut c = Cluster::new("snapshot");
    c.start_with(1, true, |cfg| cfg.snapshot_logs = 50).await;
    let s1 = c.s(1);
    let t = Instant::now();
    for i in 0..KEYS {
        s1.write(vec![put(
            &format!("key/{i:04}"),
            &format!("value {i} {pad}"),
        )])
        .await
        .expect("write");
    }
    c.log(&format!("{KEYS} writes took {:?}", t.elapsed()));
    let st = s1
        .wait_for_status(WAIT, |st| st.purged_index.is_some())
        .await
        .unwrap_or_else(|e| panic!("no logs purged: {e}\n{}", c.dump()));
    c.log(&format!("leader status after purge: {st:?}"));

    c.start_with(2, false, |cfg| cfg.snapshot_logs = 50).await;
    let s2 = c.s(2);
    s1.add_learner(2, &addr(2)).await.expect("add_learner(2)");
    c.wait_voters(1, 2).await;
    let st2 = s2
        .wait_for_status(WAIT, |st| st.snapshot_index.is_some())
        .await
        .unwrap_or_else(|e| panic!("node 2 has no snapshot: {e}\n{}", c.dump()));
    c.log(&format!("node 2 status: {st2:?}"));
    let rev = c.wait_same_revision(KEYS as u64).await;
    assert_eq!(rev, KEYS as u64);

    let range = s2.range("key/", None, 0).await.expect("range on node 2");
    assert_eq!(range.items.len(), KEYS);
    assert!(!range.more);
    for (i, kv) in range.items.iter().enumerate() {
        assert_eq!(kv.key, format!("key/{i:04}"));
        assert_eq!(kv.value, format!("value {i} {pad}").into_bytes());
        assert_eq!(kv.mod_revision, i as u64 + 1);
    }
    assert_eq!(
        value_of(&s2, "key/0000").await.unwrap(),
        Some(format!("value 0 {pad}"))
    );
    // The history before the installed snapshot is not on node 2: a watch from before it is
    // refused, one from the snapshot's revision works.
    let compacted = s2.compacted_revision();
    assert!(
        compacted > 0 && compacted <= st2.revision,
        "compacted at {compacted}"
    );
    assert!(
        matches!(s2.watch("", 0), Err(StoreError::Compacted { .. })),
        "a watch from revision 0 on node 2"
    );
    s2.watch("key/", compacted)
        .expect("watch from the compacted revision");

    // Both replicate the next write.
    let rev_next = ok_revision(&s2.write(vec![put("after", "x")]).await.expect("write on 2"));
    c.wait_same_revision(rev_next).await;
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removal_refusals_and_removal() {
    // The only voter of a one-voter cluster cannot be removed.
    {
        let mut c = Cluster::new("remove-last");
        c.start(1, true).await;
        let err = c.s(1).remove_member(1).await.unwrap_err();
        match &err {
            StoreError::Invalid(m) if m.contains("last voter") => {}
            other => panic!("expected a last-voter refusal, got {other:?}"),
        }
        let err = c.s(1).remove_member(7).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        c.shutdown_all().await;
    }

    let c = Cluster::three_voters("remove").await;
    let (s1, s2, s3) = (c.s(1), c.s(2), c.s(3));
    let rev0 = ok_revision(&s1.write(vec![put("k", "v")]).await.expect("write"));
    c.wait_same_revision(rev0).await;

    c.net.isolate(3);
    c.log("node 3 isolated");
    // An isolated follower refuses to read (no stale read), while the leader refuses to remove
    // node 2: that would leave {1, 3} with only node 1 answering.
    let isolated_read = async {
        let t = Instant::now();
        let r = s3.get("k").await;
        c.log(&format!(
            "read on isolated node 3: {r:?} after {:?}",
            t.elapsed()
        ));
        r
    };
    let refusals = async {
        let err = s1.remove_member(2).await.unwrap_err();
        match &err {
            StoreError::Invalid(m) if m.contains("would lose quorum") => {}
            other => panic!("expected a quorum refusal, got {other:?}\n{}", c.dump()),
        }
        c.log(&format!("removing node 2 refused: {err}"));
        // Asked of a follower, the refusal is forwarded back.
        let err = s2.remove_member(2).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Invalid(m) if m.contains("would lose quorum")),
            "{err:?}"
        );
    };
    let (read, ()) = tokio::join!(isolated_read, refusals);
    assert!(read.is_err(), "a stale read on an isolated follower");

    // Removing the isolated node leaves {1, 2}, both alive.
    let t = Instant::now();
    s1.remove_member(3)
        .await
        .unwrap_or_else(|e| panic!("remove_member(3): {e}\n{}", c.dump()));
    c.log(&format!("removing node 3 took {:?}", t.elapsed()));
    c.wait_voters(1, 2).await;
    c.wait_voters(2, 2).await;
    assert!(s1.members().iter().all(|m| m.id != 3), "{:?}", s1.members());
    let rev1 = ok_revision(
        &s2.write(vec![put("k", "v2")])
            .await
            .expect("write, 2 voters"),
    );

    // The removed node, healed, does not disturb the others (it campaigns with its stale
    // membership; the leader lease of the others refuses its votes) ...
    let term = s1.status().term;
    c.net.heal(3);
    c.log("node 3 healed");
    let rev2 = ok_revision(&s1.write(vec![put("k", "v3")]).await.expect("write after"));
    assert!(rev2 > rev1);
    assert_eq!(value_of(&s2, "k").await.unwrap().as_deref(), Some("v3"));
    // ... and it finds out that it was removed, and stops.
    c.eventually("node 3 sees itself removed", WAIT, || async {
        s3.removed().then_some(())
    })
    .await;
    let err = s3.write(vec![put("k", "from 3")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(s1.is_leader(), "{}", c.dump());
    assert_eq!(
        s1.status().term,
        term,
        "the removed node disrupted the leader"
    );
    c.shutdown_all().await;
}

/// With four voters {1, 2, 3, 4} and 3, 4 cut off, removing 4 leaves {1, 2, 3} of which a
/// majority (1, 2) answers, but the joint change also needs a majority of the old four (three):
/// it can never commit. It must be refused, not proposed (it would hang, report an unknown
/// outcome, and take effect later, whenever 3 or 4 comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_needs_the_old_majority_too() {
    let mut c = Cluster::new("remove-even");
    c.start(1, true).await;
    for id in 2..=4 {
        c.start(id, false).await;
    }
    let s1 = c.s(1);
    for id in 2..=4 {
        s1.add_learner(id, &addr(id))
            .await
            .unwrap_or_else(|e| panic!("add_learner({id}): {e}\n{}", c.dump()));
    }
    c.wait_voters(1, 4).await;
    c.net.isolate(3);
    c.net.isolate(4);
    let t = Instant::now();
    let r = s1.remove_member(4).await;
    c.log(&format!(
        "remove_member(4) -> {r:?} after {:?}",
        t.elapsed()
    ));
    c.net.heal(3);
    c.net.heal(4);
    match &r {
        Err(StoreError::Invalid(m)) if m.contains("would lose quorum") => {}
        other => panic!(
            "removing a voter without a majority of the old voters: {other:?}\n{}",
            c.dump()
        ),
    }
    c.wait_voters(1, 4).await;
    c.shutdown_all().await;
}

/// A member removed while unreachable, wiped, and added again under the same id and address (an
/// operator replacing a dead server) must not be stopped by the leader's late notice of the
/// first removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_added_again_is_not_stopped_by_an_old_removal() {
    let mut c = Cluster::three_voters("re-add").await;
    let s1 = c.s(1);
    c.net.isolate(3);
    s1.remove_member(3)
        .await
        .unwrap_or_else(|e| panic!("remove_member(3): {e}\n{}", c.dump()));
    c.wait_voters(1, 2).await;
    // The old server 3 is gone for good; a new one (empty directory) takes its place.
    c.stop(3).await;
    c.net.heal(3);
    c.start(3, false).await;
    s1.add_learner(3, &addr(3))
        .await
        .unwrap_or_else(|e| panic!("add_learner(3) again: {e}\n{}", c.dump()));
    c.wait_voters(1, 3).await;
    let rev = ok_revision(&s1.write(vec![put("k", "v")]).await.expect("write"));
    c.wait_same_revision(rev).await;
    // Past the leader's retry period of the old notice (1 s between attempts).
    let s3 = c.s(3);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert!(!s3.removed(), "the new node 3 was stopped\n{}", c.dump());
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(value_of(&s3, "k").await.unwrap().as_deref(), Some("v"));
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_connected_voter_notices() {
    let c = Cluster::three_voters("remove-connected").await;
    let (s1, s3) = (c.s(1), c.s(3));
    s1.remove_member(3)
        .await
        .unwrap_or_else(|e| panic!("remove_member(3): {e}\n{}", c.dump()));
    c.wait_voters(1, 2).await;
    c.eventually("node 3 sees itself removed", WAIT, || async {
        s3.removed().then_some(())
    })
    .await;
    let rev = ok_revision(&s1.write(vec![put("k", "v")]).await.expect("write after"));
    assert!(rev >= 1);
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_leader_hands_over() {
    let c = Cluster::three_voters("remove-leader").await;
    let (s1, s2, s3) = (c.s(1), c.s(2), c.s(3));
    let rev0 = ok_revision(&s1.write(vec![put("k", "v")]).await.expect("write"));
    c.wait_same_revision(rev0).await;
    let t = Instant::now();
    s2.remove_member(1)
        .await
        .unwrap_or_else(|e| panic!("remove_member(1) via node 2: {e}\n{}", c.dump()));
    c.log(&format!("removing the leader took {:?}", t.elapsed()));
    let leader = c.wait_new_leader(2, 1).await;
    c.wait_new_leader(3, 1).await;
    c.wait_voters(leader, 2).await;
    assert!(c.s(leader).members().iter().all(|m| m.id != 1));
    c.eventually("node 1 sees itself removed", WAIT, || async {
        s1.removed().then_some(())
    })
    .await;
    let rev1 = ok_revision(&s3.write(vec![put("k", "v2")]).await.expect("write after"));
    assert!(rev1 > rev0);
    assert_eq!(value_of(&s2, "k").await.unwrap().as_deref(), Some("v2"));
    c.shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learners_beyond_five_stay_learners() {
    let mut c = Cluster::new("six");
    c.start(1, true).await;
    for id in 2..=6 {
        c.start(id, false).await;
    }
    let s1 = c.s(1);
    for id in 2..=6 {
        s1.add_learner(id, &addr(id))
            .await
            .unwrap_or_else(|e| panic!("add_learner({id}): {e}\n{}", c.dump()));
    }
    c.wait_voters(1, 5).await;
    let rev = ok_revision(&s1.write(vec![put("k", "v")]).await.expect("write"));
    c.wait_same_revision(rev).await;
    // The sixth is caught up, yet stays a learner for several promotion rounds (a known
    // duration: the promoter looks every 250 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(voters(&s1), 5, "{:?}", s1.members());
    assert_eq!(learners(&s1).len(), 1, "{:?}", s1.members());
    let learner = learners(&s1)[0];
    assert_eq!(
        value_of(&c.s(learner), "k").await.unwrap().as_deref(),
        Some("v"),
        "a learner reads through the leader's read index"
    );
    c.shutdown_all().await;
}
