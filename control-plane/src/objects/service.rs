//! Services in writes: the cluster IP and node ports a created or updated Service gets, the
//! allocation records that make them its own, and the allocated values an update keeps. The
//! allocation itself is [`allocator`]'s (pure); this is the registry's side of it.
//!
//! Every address a Service holds has a record, `/wasmctl/alloc/clusterip/<ip>` or
//! `/wasmctl/alloc/nodeport/<port>`, whose value names the Service (`NAMESPACE/NAME/UID`, as
//! text: not JSON, so that the controllers' cache, which follows the whole keyspace, skips
//! it). The records change only in the store transaction that writes the Service: a create
//! puts them (each `MustNotExist`), an update puts the new ones and deletes the released ones,
//! a delete — [`Objects::delete_now`](super::Objects), or the update that removes the last
//! finalizer — deletes them. Two API servers that hand out the same address at the same time
//! thus cannot both commit: the second transaction fails as a whole ([`AllocRace`]) and the
//! write allocates again, seeing the address as taken.
//!
//! Services stored before the records existed have none: every allocation still sees what the
//! stored Services hold as taken, and [`Objects::backfill_service_records`] (at bootstrap)
//! writes their records.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_json::Value;
use wasmctl_api::core::Service;
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_store::{Op, OpResult, Precondition};

use super::{encode_for_store, set_rv, ListOptions, Objects};
use crate::allocator::{self, AllocError, Allocated};
use crate::error::ApiError;

/// The prefix of every allocation record.
pub(crate) const RECORD_PREFIX: &str = "/wasmctl/alloc/";
const CLUSTER_IP_PREFIX: &str = "/wasmctl/alloc/clusterip/";
const NODE_PORT_PREFIX: &str = "/wasmctl/alloc/nodeport/";
/// How many times a create allocates again after another writer took one of its addresses.
const MAX_ALLOC_ATTEMPTS: usize = 8;

fn ip_record(ip: Ipv4Addr) -> String {
    format!("{CLUSTER_IP_PREFIX}{ip}")
}

fn port_record(port: i32) -> String {
    format!("{NODE_PORT_PREFIX}{port}")
}

/// The address a record key stands for, added to `taken`.
fn add_taken(taken: &mut Allocated, key: &str) {
    if let Some(ip) = key.strip_prefix(CLUSTER_IP_PREFIX) {
        if let Ok(ip) = ip.parse() {
            taken.ips.insert(ip);
        }
    } else if let Some(port) = key.strip_prefix(NODE_PORT_PREFIX) {
        if let Ok(port) = port.parse() {
            taken.node_ports.insert(port);
        }
    }
}

/// The record keys of the addresses `svc` holds.
fn record_keys(svc: &Service) -> BTreeSet<String> {
    let held = Allocated::from_services([svc]);
    let ips = held.ips.into_iter().map(ip_record);
    ips.chain(held.node_ports.into_iter().map(port_record))
        .collect()
}

/// Who holds an address, as a record's value names it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    namespace: String,
    name: String,
    uid: String,
}

impl Owner {
    fn of(svc: &Service) -> Owner {
        let m = &svc.metadata;
        Owner {
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone(),
            uid: m.uid.clone().unwrap_or_default(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        format!("{}/{}/{}", self.namespace, self.name, self.uid).into_bytes()
    }

    /// `None` for a value that is not `NAMESPACE/NAME/UID` (no such record is ever written).
    fn decode(value: &[u8]) -> Option<Owner> {
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.splitn(3, '/');
        Some(Owner {
            namespace: parts.next()?.to_owned(),
            name: parts.next()?.to_owned(),
            uid: parts.next()?.to_owned(),
        })
    }

    fn same_object(&self, ns: Option<&str>, name: &str) -> bool {
        self.namespace == ns.unwrap_or("") && self.name == name
    }
}

/// A stored allocation record.
#[derive(Clone, Debug)]
struct Record {
    owner: Option<Owner>,
    mod_revision: u64,
}

/// The record ops that take `svc`'s addresses for it and release the records of this Service
/// (by uid) for addresses it no longer holds, given the `records` as they are (`old` is its
/// stored version). A record missing for
/// an address it holds (a Service stored before the records) is put as well; an address it
/// keeps that a record gives to another Service is left alone (with a warning: the stored
/// state has two owners of one address, and this write does not make it worse).
fn record_ops(svc: &Service, old: Option<&Service>, records: &BTreeMap<String, Record>) -> Vec<Op> {
    let owner = Owner::of(svc);
    let mine = |r: &Record| r.owner.as_ref().is_some_and(|o| o.uid == owner.uid);
    let want = record_keys(svc);
    let had = old.map(record_keys).unwrap_or_default();
    let mut ops = Vec::new();
    for key in &want {
        match records.get(key) {
            Some(r) if mine(r) => {}
            Some(r) if had.contains(key) => tracing::warn!(
                record = %key,
                namespace = %owner.namespace,
                service = %owner.name,
                recorded_owner = ?r.owner,
                "a Service keeps an address recorded as another's"
            ),
            // Absent (or, if another writer took it since `allocate` looked, the Txn fails).
            _ => ops.push(Op::Put {
                key: key.clone(),
                value: owner.encode(),
                precondition: Precondition::MustNotExist,
            }),
        }
    }
    // Released: every record of this Service for an address it no longer holds.
    for (key, r) in records {
        if mine(r) && !want.contains(key) {
            ops.push(Op::Delete {
                key: key.clone(),
                precondition: Precondition::ModRevision(r.mod_revision),
            });
        }
    }
    ops
}

/// A Service write failed because an allocation record changed since it was read: another
/// writer took `key`'s address (or released one) concurrently. Allocate again.
#[derive(Debug)]
pub(super) struct AllocRace {
    pub key: String,
}

/// What [`Objects::allocate_service`] decided: the Service, and the record ops to commit with
/// it.
pub(super) struct Allocation {
    pub service: Value,
    pub records: Vec<Op>,
}

fn corrupt(e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("decoding a Service: {e}"))
}

impl Objects {
    /// Every allocation record.
    async fn records(&self) -> Result<BTreeMap<String, Record>, ApiError> {
        let range = self.store.range(RECORD_PREFIX, None, 0).await?;
        Ok(range
            .items
            .into_iter()
            .map(|kv| {
                let record = Record {
                    owner: Owner::decode(&kv.value),
                    mod_revision: kv.mod_revision,
                };
                (kv.key, record)
            })
            .collect())
    }

    /// Gives the Service `obj` (defaulted and validated; `old` is the stored version for an
    /// update) its cluster IP and node ports, checked against every other stored Service and
    /// every allocation record not of this Service (nor in `raced`: records a previous attempt
    /// found taken), and the record ops that go with it.
    pub(super) async fn allocate_service(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        old: Option<&Value>,
        obj: Value,
        raced: &BTreeSet<String>,
    ) -> Result<Allocation, ApiError> {
        let all = self.list(info, None, &ListOptions::default()).await?;
        let others: Vec<Service> = all
            .items
            .into_iter()
            .filter(|v| v["metadata"]["namespace"].as_str() != ns || v["metadata"]["name"] != name)
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let mut taken = Allocated::from_services(&others);
        let records = self.records().await?;
        for (key, record) in &records {
            let own = record
                .owner
                .as_ref()
                .is_some_and(|o| o.same_object(ns, name));
            if !own {
                add_taken(&mut taken, key);
            }
        }
        for key in raced {
            add_taken(&mut taken, key);
        }
        let mut svc: Service = serde_json::from_value(obj).map_err(corrupt)?;
        let old: Option<Service> = old
            .map(|v| serde_json::from_value(v.clone()))
            .transpose()
            .map_err(corrupt)?;
        allocator::allocate(
            &mut svc,
            old.as_ref(),
            &taken,
            &self.services.ranges,
            &mut rand::thread_rng(),
        )
        .map_err(|e| match e {
            AllocError::Invalid(inv) => ApiError::invalid(info, name, inv),
            AllocError::Full(m) => ApiError::Internal(m),
        })?;
        let ops = record_ops(&svc, old.as_ref(), &records);
        Ok(Allocation {
            service: serde_json::to_value(&svc).map_err(corrupt)?,
            records: ops,
        })
    }

    /// The ops that delete the records of the stored Service `current` (those naming it), to
    /// commit with its deletion. A Service that does not decode has none.
    pub(super) async fn service_release_ops(&self, current: &Value) -> Result<Vec<Op>, ApiError> {
        let Ok(svc) = serde_json::from_value::<Service>(current.clone()) else {
            return Ok(Vec::new());
        };
        let owner = Owner::of(&svc);
        let mut ops = Vec::new();
        for key in record_keys(&svc) {
            let Some(kv) = self.store.get(&key).await? else {
                continue;
            };
            if Owner::decode(&kv.value).is_some_and(|o| o.uid == owner.uid) {
                ops.push(Op::Delete {
                    key,
                    precondition: Precondition::ModRevision(kv.mod_revision),
                });
            }
        }
        Ok(ops)
    }

    /// Writes a Service's own op `main` together with its record ops, in one transaction. The
    /// result is `main`'s as if it were written alone (`Ok`, or why it was not applied), or
    /// [`AllocRace`] if a record op failed (nothing was written).
    pub(super) async fn write_service(
        &self,
        main: Op,
        records: Vec<Op>,
    ) -> Result<Result<OpResult, AllocRace>, ApiError> {
        let op = if records.is_empty() {
            main
        } else {
            let mut ops = Vec::with_capacity(records.len() + 1);
            ops.push(main);
            ops.extend(records);
            Op::Txn {
                compares: Vec::new(),
                ops,
            }
        };
        let result = self.store.write(vec![op]).await?.into_iter().next();
        match result {
            Some(OpResult::Txn { mut results }) if !results.is_empty() => {
                Ok(Ok(results.swap_remove(0)))
            }
            Some(OpResult::TxnFailed {
                failed: 0, reason, ..
            }) => Ok(Ok(*reason)),
            Some(OpResult::TxnFailed { key, .. }) => Ok(Err(AllocRace { key })),
            Some(
                r @ (OpResult::Ok { .. }
                | OpResult::NotFound
                | OpResult::AlreadyExists
                | OpResult::Conflict { .. }),
            ) => Ok(Ok(r)),
            other => Err(ApiError::Internal(format!(
                "unexpected store result {other:?}"
            ))),
        }
    }

    /// Creates the Service `obj` (with its server-managed metadata, defaulted and validated) at
    /// `key`: allocates its addresses and writes it with their records, allocating again (at
    /// most [`MAX_ALLOC_ATTEMPTS`] times) when another writer took one of them meanwhile.
    pub(super) async fn create_service(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
        key: &str,
        obj: Value,
    ) -> Result<Value, ApiError> {
        let mut raced = BTreeSet::new();
        for _ in 0..MAX_ALLOC_ATTEMPTS {
            let alloc = self
                .allocate_service(info, ns, name, None, obj.clone(), &raced)
                .await?;
            let mut obj = alloc.service;
            let main = Op::Put {
                key: key.to_owned(),
                value: encode_for_store(&obj)?,
                precondition: Precondition::MustNotExist,
            };
            match self.write_service(main, alloc.records).await? {
                Ok(OpResult::Ok { revision, .. }) => {
                    set_rv(&mut obj, revision);
                    return Ok(obj);
                }
                Ok(OpResult::AlreadyExists) => return Err(ApiError::already_exists(info, name)),
                Ok(other) => {
                    return Err(ApiError::Internal(format!(
                        "unexpected store result {other:?}"
                    )))
                }
                Err(race) => {
                    tracing::debug!(service = %key, record = %race.key, "an address was taken concurrently; allocating again");
                    raced.insert(race.key);
                }
            }
        }
        Err(ApiError::conflict(
            info,
            name,
            "its addresses were taken by concurrent writers too many times; please try again",
        ))
    }

    /// Writes the allocation records missing for stored Services (those stored before the
    /// records existed), each Service's in one transaction that also checks it is unchanged.
    /// Idempotent, safe with other servers doing the same; a Service changed meanwhile is left
    /// to its writer (who writes its records).
    pub(super) async fn backfill_service_records(&self) -> Result<(), ApiError> {
        let info = registry::resolve("services").expect("services are served");
        let page = self.list(info, None, &ListOptions::default()).await?;
        let records = self.records().await?;
        let mut written = 0usize;
        for item in page.items {
            let Ok(svc) = serde_json::from_value::<Service>(item.clone()) else {
                continue;
            };
            let ops = record_ops(&svc, Some(&svc), &records);
            if ops.is_empty() {
                continue;
            }
            let Some(rev) = item["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok())
            else {
                continue;
            };
            let key = Self::key(info, svc.metadata.namespace.as_deref(), &svc.metadata.name);
            let txn = Op::Txn {
                compares: vec![(key.clone(), Precondition::ModRevision(rev))],
                ops,
            };
            match self.store.write(vec![txn]).await?.into_iter().next() {
                Some(OpResult::Txn { .. }) => written += 1,
                Some(OpResult::TxnFailed { key: failed, .. }) => {
                    tracing::debug!(service = %key, failed = %failed, "not backfilling the records of a Service that changed or whose address is recorded");
                }
                other => {
                    return Err(ApiError::Internal(format!(
                        "unexpected store result {other:?}"
                    )))
                }
            }
        }
        if written > 0 {
            tracing::info!(
                services = written,
                "wrote the allocation records of Services stored without them"
            );
        }
        Ok(())
    }
}

/// An update of a Service keeps the allocated values it omits ([`allocator::carry_over`]);
/// one that does not decode is left for validation to report.
pub(super) fn carry_over_service(current: &Value, next: Value) -> Value {
    let old = serde_json::from_value::<Service>(current.clone());
    let new = serde_json::from_value::<Service>(next.clone());
    match (old, new) {
        (Ok(old), Ok(mut new)) => {
            allocator::carry_over(&old, &mut new);
            serde_json::to_value(&new).unwrap_or(next)
        }
        _ => next,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use serde_json::json;
    use tokio_util::sync::CancellationToken;
    use wasmctl_api::meta::DeleteOptions;
    use wasmctl_store::Store;

    use super::*;
    use crate::allocator::ServiceRanges;
    use crate::controllers::tests::open;

    fn services() -> &'static ResourceInfo {
        registry::resolve("services").expect("served")
    }

    /// Small ranges, so that concurrent creates compete for the same addresses.
    fn small_ranges() -> ServiceRanges {
        ServiceRanges {
            cluster_ip: "127.96.0.0/27".parse().unwrap(), // 30 addresses
            node_ports: "30000-30029".parse().unwrap(),   // 30 ports
        }
    }

    fn node_port_service(name: &str, extra: Value) -> Value {
        let mut v = json!({"metadata": {"name": name}, "spec": {"type": "NodePort",
            "selector": {"app": name}, "ports": [{"port": 80}]}});
        merge(&mut v, extra);
        v
    }

    fn merge(v: &mut Value, extra: Value) {
        super::super::merge_patch(v, &extra);
    }

    fn ip_of(svc: &Value) -> String {
        svc["spec"]["clusterIP"].as_str().unwrap().to_owned()
    }

    fn ports_of(svc: &Value) -> Vec<i64> {
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["nodePort"].as_i64())
            .collect()
    }

    /// Every record, as `key -> NAMESPACE/NAME/UID`.
    async fn records(store: &Store) -> BTreeMap<String, String> {
        let range = store.range(RECORD_PREFIX, None, 0).await.unwrap();
        range
            .items
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8(kv.value.to_vec()).unwrap()))
            .collect()
    }

    /// The records the stored Services should have: one per address, naming its holder.
    async fn expected_records(objects: &Objects) -> BTreeMap<String, String> {
        let list = objects
            .list(services(), None, &ListOptions::default())
            .await
            .unwrap();
        let mut out = BTreeMap::new();
        for v in list.items {
            let svc: Service = serde_json::from_value(v).unwrap();
            let owner = String::from_utf8(Owner::of(&svc).encode()).unwrap();
            for key in record_keys(&svc) {
                assert!(
                    out.insert(key.clone(), owner.clone()).is_none(),
                    "{key} is held twice"
                );
            }
        }
        out
    }

    #[test]
    fn record_ops_take_new_addresses_and_release_old_ones() {
        let svc = |uid: &str, ip: &str, ports: &[i32]| -> Service {
            let ports: Vec<Value> = ports
                .iter()
                .map(|np| json!({"port": 80, "nodePort": np}))
                .collect();
            serde_json::from_value(json!({"metadata": {"name": "s", "namespace": "ns",
                "uid": uid}, "spec": {"type": "NodePort", "clusterIP": ip,
                "clusterIPs": [ip], "ports": ports}}))
            .unwrap()
        };
        let record = |owner: &str, mod_revision| Record {
            owner: Owner::decode(owner.as_bytes()),
            mod_revision,
        };
        let summary = |ops: Vec<Op>| -> Vec<String> {
            ops.into_iter()
                .map(|op| match op {
                    Op::Put {
                        key,
                        value,
                        precondition,
                    } => {
                        assert_eq!(precondition, Precondition::MustNotExist);
                        format!("put {key} {}", String::from_utf8(value).unwrap())
                    }
                    Op::Delete { key, precondition } => format!("delete {key} {precondition:?}"),
                    Op::Txn { .. } => panic!("no Txn here"),
                })
                .collect()
        };
        // A create: every address.
        let new = svc("u1", "127.96.0.5", &[30001]);
        assert_eq!(
            summary(record_ops(&new, None, &BTreeMap::new())),
            [
                "put /wasmctl/alloc/clusterip/127.96.0.5 ns/s/u1",
                "put /wasmctl/alloc/nodeport/30001 ns/s/u1"
            ]
        );
        // An update that moves a node port: the new one is put, the old one deleted; the
        // cluster IP (recorded) is untouched.
        let records = BTreeMap::from([
            (
                ip_record("127.96.0.5".parse().unwrap()),
                record("ns/s/u1", 3),
            ),
            (port_record(30001), record("ns/s/u1", 4)),
        ]);
        let moved = svc("u1", "127.96.0.5", &[30002]);
        assert_eq!(
            summary(record_ops(&moved, Some(&new), &records)),
            [
                "put /wasmctl/alloc/nodeport/30002 ns/s/u1",
                "delete /wasmctl/alloc/nodeport/30001 ModRevision(4)"
            ]
        );
        assert!(record_ops(&new, Some(&new), &records).is_empty());
        // A Service stored without records gets the missing ones; an address it keeps that is
        // recorded for another Service is left alone, and others' records are never deleted.
        let others = BTreeMap::from([
            (
                ip_record("127.96.0.5".parse().unwrap()),
                record("ns/t/u2", 3),
            ),
            (port_record(30009), record("ns/t/u2", 5)),
        ]);
        assert_eq!(
            summary(record_ops(&new, Some(&new), &others)),
            ["put /wasmctl/alloc/nodeport/30001 ns/s/u1"]
        );
        assert_eq!(
            Owner::decode(b"ns/s/u1"),
            Some(Owner {
                namespace: "ns".into(),
                name: "s".into(),
                uid: "u1".into()
            })
        );
        assert_eq!(Owner::decode(b"garbage"), None);
    }

    /// Issue 12: two API servers (two `Objects` on one store, nothing shared in process)
    /// creating Services at once never hand out one address twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_on_two_servers_never_share_an_address() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, a) = open(dir.path()).await;
        let a = a.with_service_ranges(small_ranges());
        let b = Objects::new(store.clone(), CancellationToken::new())
            .with_service_ranges(small_ranges());
        let mut tasks = Vec::new();
        for i in 0..24 {
            let objects = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let svc = node_port_service(&format!("s{i}"), json!({}));
                objects.create(services(), Some("default"), svc).await
            }));
        }
        let mut ips = HashSet::new();
        let mut ports = HashSet::new();
        for t in tasks {
            let svc = t.await.unwrap().expect("created");
            assert!(ips.insert(ip_of(&svc)), "{} handed out twice", ip_of(&svc));
            for np in ports_of(&svc) {
                assert!(ports.insert(np), "node port {np} handed out twice");
            }
        }
        assert_eq!((ips.len(), ports.len()), (24, 24));
        assert_eq!(records(&store).await, expected_records(&a).await);

        // The same address requested on both servers at once: exactly one wins, the other gets
        // kube-apiserver's 422.
        let free_ip = (1..=30)
            .map(|i| format!("127.96.0.{i}"))
            .find(|ip| !ips.contains(ip))
            .unwrap();
        let free_port = (30000..30030).find(|p| !ports.contains(p)).unwrap();
        let request = |name: &str| {
            node_port_service(
                name,
                json!({"spec": {"clusterIP": free_ip, "ports": [{"port": 80, "nodePort": free_port}]}}),
            )
        };
        let (ra, rb) = tokio::join!(
            a.create(services(), Some("default"), request("x")),
            b.create(services(), Some("default"), request("y")),
        );
        let (won, lost) = match (ra, rb) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("expected one winner: {other:?}"),
        };
        assert_eq!(ip_of(&won), free_ip);
        assert_eq!(lost.code(), 422, "{lost}");
        let msg = lost.to_string();
        assert!(msg.contains("already allocated"), "{msg}");
        assert_eq!(records(&store).await, expected_records(&a).await);
    }

    #[tokio::test]
    async fn deleting_or_changing_a_service_releases_its_addresses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        let objects = objects.with_service_ranges(small_ranges());
        let other = Objects::new(store.clone(), CancellationToken::new())
            .with_service_ranges(small_ranges());
        let first = objects
            .create(
                services(),
                Some("default"),
                node_port_service("first", json!({})),
            )
            .await
            .unwrap();
        let (ip, port) = (ip_of(&first), ports_of(&first)[0]);
        let taken = |name: &str| {
            node_port_service(
                name,
                json!({"spec": {"clusterIP": ip, "ports": [{"port": 80, "nodePort": port}]}}),
            )
        };
        let err = other
            .create(services(), Some("default"), taken("second"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), 422, "{err}");

        // A type change to ClusterIP releases the node port; another port gets a new one.
        let update = |spec: Value| {
            let mut v = first.clone();
            v["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("resourceVersion");
            v["spec"] = spec;
            v
        };
        let cip = objects
            .update(
                services(),
                Some("default"),
                "first",
                update(
                    json!({"type": "ClusterIP", "clusterIP": ip, "selector": {"app": "first"},
                    "ports": [{"port": 80}]}),
                ),
                crate::objects::Subresource::Main,
            )
            .await
            .unwrap();
        assert!(ports_of(&cip).is_empty(), "{cip}");
        assert_eq!(records(&store).await, expected_records(&objects).await);
        let mut with_port = node_port_service(
            "holder",
            json!({"spec": {"ports": [{"port": 80, "nodePort": port}]}}),
        );
        with_port["spec"]["clusterIP"] = json!(null);
        let holder = other
            .create(services(), Some("default"), with_port)
            .await
            .expect("the released node port is free");
        assert_eq!(ports_of(&holder), [port]);
        let two = objects
            .patch(
                services(),
                Some("default"),
                "holder",
                json!({"spec": {"ports": [{"name": "a", "port": 80, "nodePort": port},
                    {"name": "b", "port": 81}]}}),
                crate::objects::Subresource::Main,
            )
            .await
            .unwrap();
        assert_eq!(ports_of(&two).len(), 2);
        assert_eq!(records(&store).await, expected_records(&objects).await);

        // Deleting releases the cluster IP (and the node ports) in the same write.
        let opts = DeleteOptions::default();
        objects
            .delete(services(), Some("default"), "first", &opts)
            .await
            .unwrap();
        other
            .delete(services(), Some("default"), "holder", &opts)
            .await
            .unwrap();
        assert!(records(&store).await.is_empty());
        let second = other
            .create(services(), Some("default"), taken("second"))
            .await
            .expect("a deleted Service's addresses are free");
        assert_eq!(
            (ip_of(&second), ports_of(&second)),
            (ip.clone(), vec![port])
        );

        // A Service kept by a finalizer holds its addresses until the finalizer goes.
        let held = objects
            .patch(
                services(),
                Some("default"),
                "second",
                json!({"metadata": {"finalizers": ["example.com/hold"]}}),
                crate::objects::Subresource::Main,
            )
            .await
            .unwrap();
        assert!(held["metadata"]["finalizers"].is_array());
        objects
            .delete(services(), Some("default"), "second", &opts)
            .await
            .unwrap();
        assert_eq!(records(&store).await.len(), 2);
        objects
            .patch(
                services(),
                Some("default"),
                "second",
                json!({"metadata": {"finalizers": null}}),
                crate::objects::Subresource::Main,
            )
            .await
            .unwrap();
        let gone = objects.get(services(), Some("default"), "second").await;
        assert!(matches!(gone, Err(ApiError::NotFound { .. })), "{gone:?}");
        assert!(records(&store).await.is_empty());

        // A namespace's deletion deletes its Services, and with them their records.
        let namespaces = registry::resolve("namespaces").unwrap();
        objects
            .create(namespaces, None, json!({"metadata": {"name": "doomed"}}))
            .await
            .unwrap();
        objects
            .create(services(), Some("doomed"), taken("third"))
            .await
            .unwrap();
        assert_eq!(records(&store).await.len(), 2);
        objects
            .delete(namespaces, None, "doomed", &opts)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !records(&store).await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the namespace's Service kept its records"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Services stored before the records existed: their addresses count as taken, and
    /// bootstrap writes their records.
    #[tokio::test]
    async fn services_stored_without_records_are_backfilled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, objects) = open(dir.path()).await;
        let legacy = json!({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "legacy", "namespace": "default", "uid": "u-legacy",
            "creationTimestamp": "2024-01-01T00:00:00Z"}, "spec": {"type": "NodePort",
            "clusterIP": "127.96.0.9", "clusterIPs": ["127.96.0.9"], "selector": {"app": "l"},
            "ports": [{"port": 80, "nodePort": 30099, "protocol": "TCP", "targetPort": 80}]}});
        let key = services().key("default", "legacy");
        store
            .write(vec![Op::Put {
                key,
                value: serde_json::to_vec(&legacy).unwrap(),
                precondition: Precondition::MustNotExist,
            }])
            .await
            .unwrap();
        // Without records, what the Service holds is still taken.
        let clash = node_port_service(
            "clash",
            json!({"spec": {"clusterIP": "127.96.0.9", "ports": [{"port": 80}]}}),
        );
        let err = objects
            .create(services(), Some("default"), clash)
            .await
            .unwrap_err();
        assert_eq!(err.code(), 422, "{err}");
        assert!(records(&store).await.is_empty());

        objects.bootstrap().await.unwrap();
        let want = BTreeMap::from([
            (
                "/wasmctl/alloc/clusterip/127.96.0.9".to_owned(),
                "default/legacy/u-legacy".to_owned(),
            ),
            (
                "/wasmctl/alloc/nodeport/30099".to_owned(),
                "default/legacy/u-legacy".to_owned(),
            ),
        ]);
        assert_eq!(records(&store).await, want);
        let revision = store.revision();
        objects.bootstrap().await.unwrap();
        assert_eq!(
            store.revision(),
            revision,
            "a second backfill writes nothing"
        );
        objects
            .delete(
                services(),
                Some("default"),
                "legacy",
                &DeleteOptions::default(),
            )
            .await
            .unwrap();
        assert!(records(&store).await.is_empty());
    }
}
