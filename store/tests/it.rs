//! Store API tests on a real RocksDB in temporary directories.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use wasmctl_store::{
    EventKind, KeyValue, Op, OpResult, Precondition, Store, StoreConfig, StoreError, WatchEvent,
    WatchStream,
};

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir)
}

async fn open(cfg: StoreConfig) -> Store {
    tokio::time::timeout(Duration::from_secs(40), Store::open(cfg))
        .await
        .expect("open timed out")
        .expect("open")
}

fn put(key: &str, value: &str, precondition: Precondition) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        precondition,
    }
}

fn delete(key: &str, precondition: Precondition) -> Op {
    Op::Delete {
        key: key.to_owned(),
        precondition,
    }
}

async fn write1(store: &Store, op: Op) -> OpResult {
    let mut results = store.write(vec![op]).await.expect("write");
    assert_eq!(results.len(), 1);
    results.remove(0)
}

fn ok_revision(result: &OpResult) -> u64 {
    match result {
        OpResult::Ok { revision, .. } => *revision,
        other => panic!("expected Ok, got {other:?}"),
    }
}

async fn next_event(watch: &mut WatchStream) -> Result<WatchEvent, StoreError> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("no watch event within the deadline")
        .expect("watch stream ended")
}

#[tokio::test]
async fn open_makes_a_leader_at_revision_zero() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    assert!(store.is_leader());
    assert_eq!(store.revision(), 0);
    assert_eq!(store.compacted_revision(), 0);
    assert_eq!(store.get("missing").await.unwrap(), None);
    let status = store.status();
    assert!(status.is_leader);
    assert_eq!(status.current_leader, Some(1));
    store.shutdown().await.unwrap();
    // Idempotent, and the store refuses work afterwards.
    store.shutdown().await.unwrap();
    let err = store
        .write(vec![put("k", "v", Precondition::None)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let err = store.get("k").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(!store.is_leader());
}

#[tokio::test]
async fn preconditions_compare_and_swap() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;

    // Create.
    let r = write1(&store, put("k", "v1", Precondition::MustNotExist)).await;
    assert_eq!(
        r,
        OpResult::Ok {
            revision: 1,
            prev: None
        }
    );
    assert_eq!(
        write1(&store, put("k", "x", Precondition::MustNotExist)).await,
        OpResult::AlreadyExists
    );
    let v1 = KeyValue {
        key: "k".into(),
        value: "v1".into(),
        create_revision: 1,
        mod_revision: 1,
    };
    assert_eq!(store.get("k").await.unwrap(), Some(v1.clone()));

    // MustExist.
    assert_eq!(
        write1(&store, put("missing", "x", Precondition::MustExist)).await,
        OpResult::NotFound
    );
    let r = write1(&store, put("k", "v2", Precondition::MustExist)).await;
    assert_eq!(
        r,
        OpResult::Ok {
            revision: 2,
            prev: Some(v1)
        }
    );

    // ModRevision.
    assert_eq!(
        write1(&store, put("k", "x", Precondition::ModRevision(1))).await,
        OpResult::Conflict {
            current_mod_revision: 2
        }
    );
    assert_eq!(
        write1(&store, put("missing", "x", Precondition::ModRevision(1))).await,
        OpResult::NotFound
    );
    let r = write1(&store, put("k", "v3", Precondition::ModRevision(2))).await;
    assert_eq!(ok_revision(&r), 3);
    let v3 = store.get("k").await.unwrap().unwrap();
    assert_eq!(
        (v3.value.as_ref(), v3.create_revision, v3.mod_revision),
        (b"v3".as_slice(), 1, 3)
    );

    // Unconditional put.
    assert_eq!(
        ok_revision(&write1(&store, put("k", "v4", Precondition::None)).await),
        4
    );

    // Deletes.
    assert_eq!(
        write1(&store, delete("missing", Precondition::None)).await,
        OpResult::NotFound
    );
    assert_eq!(
        write1(&store, delete("missing", Precondition::MustExist)).await,
        OpResult::NotFound
    );
    assert_eq!(
        write1(&store, delete("k", Precondition::ModRevision(3))).await,
        OpResult::Conflict {
            current_mod_revision: 4
        }
    );
    assert_eq!(
        write1(&store, delete("k", Precondition::MustNotExist)).await,
        OpResult::AlreadyExists
    );
    let r = write1(&store, delete("k", Precondition::ModRevision(4))).await;
    match r {
        OpResult::Ok {
            revision: 5,
            prev: Some(prev),
        } => {
            assert_eq!(prev.value.as_ref(), b"v4");
            assert_eq!((prev.create_revision, prev.mod_revision), (1, 4));
        }
        other => panic!("unexpected delete result {other:?}"),
    }
    assert_eq!(store.get("k").await.unwrap(), None);

    // Re-creating gets a new create_revision.
    assert_eq!(
        ok_revision(&write1(&store, put("k", "v6", Precondition::MustNotExist)).await),
        6
    );
    let v6 = store.get("k").await.unwrap().unwrap();
    assert_eq!((v6.create_revision, v6.mod_revision), (6, 6));

    // Failed ops do not bump the revision.
    assert_eq!(store.revision(), 6);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn ops_of_one_write_apply_in_order_independently() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    let results = store
        .write(vec![
            put("a", "1", Precondition::MustNotExist),
            put("a", "2", Precondition::MustNotExist),
            put("a", "3", Precondition::ModRevision(1)),
            delete("b", Precondition::None),
            delete("a", Precondition::None),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(ok_revision(&results[0]), 1);
    assert_eq!(results[1], OpResult::AlreadyExists);
    assert_eq!(ok_revision(&results[2]), 2);
    assert_eq!(results[3], OpResult::NotFound);
    match &results[4] {
        OpResult::Ok {
            revision: 3,
            prev: Some(prev),
        } => assert_eq!(prev.value.as_ref(), b"3"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(store.revision(), 3);
    assert_eq!(store.write(vec![]).await.unwrap(), vec![]);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn data_and_revision_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    for i in 0..5 {
        write1(
            &store,
            put(&format!("k{i}"), &format!("v{i}"), Precondition::None),
        )
        .await;
    }
    write1(&store, delete("k0", Precondition::None)).await;
    assert_eq!(store.revision(), 6);
    store.shutdown().await.unwrap();
    drop(store);

    let store = open(config(dir.path())).await;
    assert!(store.is_leader());
    assert_eq!(store.revision(), 6);
    assert_eq!(store.get("k0").await.unwrap(), None);
    let k3 = store.get("k3").await.unwrap().unwrap();
    assert_eq!((k3.value.as_ref(), k3.mod_revision), (b"v3".as_slice(), 4));
    // The history survives too, and the counter continues.
    let mut watch = store.watch("", 4).unwrap();
    assert_eq!(next_event(&mut watch).await.unwrap().revision, 5);
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (e.revision, e.kind, e.key.as_str()),
        (6, EventKind::Delete, "k0")
    );
    assert_eq!(
        ok_revision(&write1(&store, put("k9", "v", Precondition::None)).await),
        7
    );
    assert_eq!(next_event(&mut watch).await.unwrap().revision, 7);
    drop(watch);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    let err = Store::open(config(dir.path()))
        .await
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::Storage(_)), "{err}");
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn range_with_prefix_start_after_and_limit() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    let mut ops: Vec<Op> = (1..=5)
        .map(|i| put(&format!("a/{i}"), "x", Precondition::None))
        .collect();
    ops.push(put("a", "x", Precondition::None));
    ops.push(put("b/1", "x", Precondition::None));
    ops.push(put("a0", "x", Precondition::None));
    store.write(ops).await.unwrap();
    let keys = |r: &wasmctl_store::RangeResult| {
        r.items.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>()
    };

    let r = store.range("a/", None, 2).await.unwrap();
    assert_eq!(keys(&r), ["a/1", "a/2"]);
    assert!(r.more);
    assert_eq!(r.revision, 8);
    let r = store.range("a/", Some("a/2"), 2).await.unwrap();
    assert_eq!(keys(&r), ["a/3", "a/4"]);
    assert!(r.more);
    let r = store.range("a/", Some("a/4"), 2).await.unwrap();
    assert_eq!(keys(&r), ["a/5"]);
    assert!(!r.more);
    let r = store.range("a/", Some("a/5"), 2).await.unwrap();
    assert!(r.items.is_empty() && !r.more);
    // Exactly `limit` left: no more.
    let r = store.range("a/", Some("a/3"), 2).await.unwrap();
    assert_eq!(keys(&r), ["a/4", "a/5"]);
    assert!(!r.more);
    // Unlimited, and a start_after before the prefix.
    let r = store.range("a/", Some("0"), 0).await.unwrap();
    assert_eq!(keys(&r), ["a/1", "a/2", "a/3", "a/4", "a/5"]);
    assert!(!r.more);
    let r = store.range("", None, 0).await.unwrap();
    assert_eq!(
        keys(&r),
        ["a", "a/1", "a/2", "a/3", "a/4", "a/5", "a0", "b/1"]
    );
    let r = store.range("c/", None, 0).await.unwrap();
    assert!(r.items.is_empty() && !r.more);
    assert_eq!(r.items.len(), 0);
    let first = &store.range("b/", None, 0).await.unwrap().items[0];
    assert_eq!((first.create_revision, first.mod_revision), (7, 7));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_replays_history_then_follows_live() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    for i in 1..=6 {
        let prefix = if i % 2 == 0 { "w/" } else { "x/" };
        write1(
            &store,
            put(&format!("{prefix}{i}"), "v", Precondition::None),
        )
        .await;
    }
    // Events of w/ after revision 2: 4 and 6.
    let mut watch = store.watch("w/", 2).unwrap();
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (e.revision, e.kind, e.key.as_str()),
        (4, EventKind::Put, "w/4")
    );
    assert_eq!(e.value.as_ref().unwrap().mod_revision, 4);
    assert_eq!(e.prev, None);
    assert_eq!(next_event(&mut watch).await.unwrap().revision, 6);

    // Live: an update and a delete, with their previous values.
    write1(&store, put("x/7", "v", Precondition::None)).await;
    write1(&store, put("w/4", "v2", Precondition::None)).await;
    write1(&store, delete("w/6", Precondition::None)).await;
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (e.revision, e.kind, e.key.as_str()),
        (8, EventKind::Put, "w/4")
    );
    assert_eq!(e.value.unwrap().create_revision, 4);
    assert_eq!(e.prev.unwrap().value.as_ref(), b"v");
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (e.revision, e.kind, e.key.as_str()),
        (9, EventKind::Delete, "w/6")
    );
    assert_eq!(e.value, None);
    assert_eq!(e.prev.unwrap().mod_revision, 6);

    // Concurrent writers and a watcher from 0 see every event exactly once, in order.
    let mut all = store.watch("", 0).unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .write(vec![put(&format!("c/{i}"), "v", Precondition::None)])
                    .await
                    .unwrap();
            }
        })
    };
    for want in 1..=209 {
        assert_eq!(next_event(&mut all).await.unwrap().revision, want);
    }
    writer.await.unwrap();
    assert_eq!(all.last_revision(), 209);

    // Shutting down ends the streams.
    store.shutdown().await.unwrap();
    let end = tokio::time::timeout(WAIT, all.next())
        .await
        .expect("stream must end");
    assert!(end.is_none(), "{end:?}");
    assert!(matches!(
        store.watch("", 209),
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn watch_below_the_compacted_revision_fails() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.history_size = 5;
    let store = open(cfg).await;
    for i in 0..20 {
        write1(&store, put(&format!("k{i}"), "v", Precondition::None)).await;
    }
    let compacted = store.compacted_revision();
    assert!(
        compacted >= 15,
        "history keeps at most 5 events, compacted={compacted}"
    );
    match store.watch("", compacted - 1) {
        Err(StoreError::Compacted {
            requested,
            compacted: c,
        }) => assert_eq!((requested, c), (compacted - 1, compacted)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("watch below the compacted revision must fail"),
    }
    assert!(matches!(
        store.watch("", 0),
        Err(StoreError::Compacted { .. })
    ));
    // From the compacted revision itself everything is still there.
    let mut watch = store.watch("", compacted).unwrap();
    for want in compacted + 1..=20 {
        assert_eq!(next_event(&mut watch).await.unwrap().revision, want);
    }
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn snapshot_is_built_and_state_survives_reopen() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.snapshot_logs = 20;
    let store = open(cfg.clone()).await;
    for i in 0..60 {
        write1(
            &store,
            put(&format!("s/{i:03}"), &format!("v{i}"), Precondition::None),
        )
        .await;
    }
    let status = store
        .wait_for_status(WAIT, |s| {
            s.snapshot_index.is_some() && s.purged_index.is_some()
        })
        .await
        .expect("a snapshot is built and logs are purged");
    assert!(status.snapshot_index.unwrap() >= 20, "{status:?}");
    assert!(dir.path().join("snapshot/current").is_file());
    store.shutdown().await.unwrap();
    drop(store);

    let store = open(cfg).await;
    assert_eq!(store.revision(), 60);
    let r = store.range("s/", None, 0).await.unwrap();
    assert_eq!(r.items.len(), 60);
    assert_eq!(r.items[59].value.as_ref(), b"v59");
    assert_eq!(r.items[59].mod_revision, 60);
    let status = store.status();
    assert!(status.purged_index.is_some(), "{status:?}");
    assert_eq!(
        ok_revision(&write1(&store, put("s/new", "v", Precondition::None)).await),
        61
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lagging_watcher_gets_watch_lagged() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.watch_channel_capacity = 4;
    cfg.fsync = false;
    let store = open(cfg).await;
    write1(&store, put("k", "v", Precondition::None)).await;
    let mut watch = store.watch("", 0).unwrap();
    // The first event comes from the history; the watch is subscribed to live events after it.
    assert_eq!(next_event(&mut watch).await.unwrap().revision, 1);
    for i in 0..50 {
        write1(&store, put(&format!("k{i}"), "v", Precondition::None)).await;
    }
    let mut last = 1;
    loop {
        match next_event(&mut watch).await {
            Ok(event) => {
                assert_eq!(
                    event.revision,
                    last + 1,
                    "no gap before the lag is reported"
                );
                last = event.revision;
            }
            Err(StoreError::WatchLagged) => break,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let end = tokio::time::timeout(WAIT, watch.next()).await.unwrap();
    assert!(end.is_none(), "the stream ends after WatchLagged");
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_config_is_rejected() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.watch_channel_capacity = 0;
    let err = Store::open(cfg).await.err().expect("must fail");
    assert!(matches!(err, StoreError::InvalidConfig(_)), "{err}");
}

#[tokio::test]
async fn watch_replays_a_long_history_in_chunks() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = false;
    let store = open(cfg).await;
    // 3000 events, every third one under "p/".
    for batch in 0..30 {
        let ops = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                let prefix = if n % 3 == 0 { "p/" } else { "q/" };
                put(&format!("{prefix}{n}"), "v", Precondition::None)
            })
            .collect();
        store.write(ops).await.unwrap();
    }
    assert_eq!(store.revision(), 3000);
    let mut watch = store.watch("p/", 0).unwrap();
    for n in (0..3000u64).step_by(3) {
        let e = next_event(&mut watch).await.unwrap();
        assert_eq!((e.revision, e.key), (n + 1, format!("p/{n}")));
    }
    // Then live, past the non-matching events.
    store
        .write(vec![
            put("q/live", "v", Precondition::None),
            put("p/live", "v", Precondition::None),
        ])
        .await
        .unwrap();
    let e = next_event(&mut watch).await.unwrap();
    assert_eq!((e.revision, e.key.as_str()), (3002, "p/live"));
    drop(watch);
    store.shutdown().await.unwrap();
}

/// A range read in chunks, each as of the first chunk's revision, is one consistent view even
/// though writes land between the chunks (updates, deletes before and after the chunk being
/// read, creates, a delete and re-create).
#[tokio::test]
async fn a_range_read_in_chunks_while_writes_land_sees_one_revision() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = false;
    let store = open(cfg).await;
    let mut ops: Vec<Op> = (1..=10)
        .map(|i| put(&format!("a/{i:02}"), "v1", Precondition::None))
        .collect();
    ops.push(put("b/1", "v1", Precondition::None));
    store.write(ops).await.unwrap();
    let before = store.range("a/", None, 0).await.unwrap();
    assert_eq!(before.items.len(), 10);

    let first = store.range("a/", None, 3).await.unwrap();
    let at = first.revision;
    assert_eq!(at, before.revision);
    assert!(first.more);
    let mut chunks = vec![first];
    let mut writes = vec![
        put("a/05", "v2", Precondition::None),
        put("a/05", "v3", Precondition::None),
        delete("a/07", Precondition::None),
        put("a/055", "new", Precondition::None),
        delete("a/02", Precondition::None),
        put("a/99", "new", Precondition::None),
        put("b/2", "other prefix", Precondition::None),
        delete("a/09", Precondition::None),
        put("a/09", "re-created", Precondition::None),
        delete("a/10", Precondition::None),
        put("a/00", "new, before everything", Precondition::None),
    ]
    .into_iter();
    loop {
        // Two writes between chunks.
        for op in writes.by_ref().take(2) {
            write1(&store, op).await;
        }
        let last = chunks.last().unwrap();
        if !last.more {
            break;
        }
        let after = last.items.last().unwrap().key.clone();
        let chunk = store.range_at("a/", Some(&after), 3, at).await.unwrap();
        assert_eq!(
            chunk.revision, at,
            "every chunk reports the first chunk's revision"
        );
        chunks.push(chunk);
    }
    for op in writes {
        write1(&store, op).await;
    }
    assert!(store.revision() > at + 8, "the writes landed");
    let sizes: Vec<usize> = chunks.iter().map(|c| c.items.len()).collect();
    assert_eq!(sizes, [3, 3, 3, 1], "10 keys in chunks of 3");
    let union: Vec<KeyValue> = chunks.into_iter().flat_map(|c| c.items).collect();
    assert_eq!(
        union, before.items,
        "the union is the range as of the first chunk"
    );

    // The whole range at once, as of that revision, and as of now.
    let again = store.range_at("a/", None, 0, at).await.unwrap();
    assert_eq!(again.items, before.items);
    let now = store.range("a/", None, 0).await.unwrap();
    assert_eq!(
        store.range_at("a/", None, 0, now.revision).await.unwrap(),
        now
    );
    // Limits count the keys of that revision: a/07 and a/10 (deleted since) still fill it.
    let r = store.range_at("a/", Some("a/06"), 2, at).await.unwrap();
    let keys: Vec<&str> = r.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!((keys, r.more), (vec!["a/07", "a/08"], true));
    let r = store.range_at("a/", Some("a/08"), 2, at).await.unwrap();
    let keys: Vec<&str> = r.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!((keys, r.more), (vec!["a/09", "a/10"], false));
    assert_eq!(r.items[0].value.as_ref(), b"v1");
    store.shutdown().await.unwrap();
}

/// A read as of a revision whose history is compacted fails with `Compacted` (it cannot be
/// served consistently); a revision the store has not reached fails too.
#[tokio::test]
async fn a_read_at_a_compacted_revision_fails() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.history_size = 5;
    cfg.fsync = false;
    let store = open(cfg).await;
    for i in 0..3 {
        write1(&store, put(&format!("k{i}"), "v", Precondition::None)).await;
    }
    let at = store.revision();
    assert!(store.range_at("", None, 0, at).await.is_ok());
    for i in 0..20 {
        write1(&store, put(&format!("k{i}"), "w", Precondition::None)).await;
    }
    let compacted = store.compacted_revision();
    assert!(compacted > at, "compacted={compacted}");
    match store.range_at("", None, 1, at).await {
        Err(StoreError::Compacted {
            requested,
            compacted: c,
        }) => assert_eq!((requested, c), (at, compacted)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(r) => panic!("a read at a compacted revision must fail, got {r:?}"),
    }
    // From the compacted revision on, the history is complete.
    let r = store.range_at("", None, 0, compacted).await.unwrap();
    assert_eq!(r.revision, compacted);
    let revision = store.revision();
    match store.range_at("", None, 0, revision + 1).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (revision + 1, revision))
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
    store.shutdown().await.unwrap();
}

/// `get_with_revision` reads the value and the revision from one snapshot: no write to the key
/// lies after the value and at or before the revision, however the reads interleave with writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_revision_reads_value_and_revision_together() {
    let dir = TempDir::new().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = false;
    let store = open(cfg).await;
    write1(&store, put("k", "0", Precondition::None)).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 1..=6000 {
                let r = write1(&store, put("k", &i.to_string(), Precondition::None)).await;
                revisions.push(ok_revision(&r));
            }
            revisions
        })
    };
    let mut reads = Vec::new();
    while !writer.is_finished() {
        let (kv, revision) = store.get_with_revision("k").await.unwrap();
        reads.push((kv.unwrap().mod_revision, revision));
    }
    let writes = writer.await.unwrap();
    assert!(reads.len() > 100, "{} reads", reads.len());
    for (mod_revision, revision) in reads {
        assert!(mod_revision <= revision);
        let missed: Vec<_> = writes
            .iter()
            .filter(|&&w| (mod_revision + 1..=revision).contains(&w))
            .collect();
        assert!(
            missed.is_empty(),
            "read value @{mod_revision} with revision {revision}: writes {missed:?} in between"
        );
    }
    store.shutdown().await.unwrap();
}

fn txn(compares: &[(&str, Precondition)], ops: Vec<Op>) -> Op {
    Op::Txn {
        compares: compares.iter().map(|(k, p)| (k.to_string(), *p)).collect(),
        ops,
    }
}

async fn value_of(store: &Store, key: &str) -> Option<String> {
    let kv = store.get(key).await.unwrap()?;
    Some(String::from_utf8(kv.value.to_vec()).unwrap())
}

#[tokio::test]
async fn a_txn_applies_all_its_ops_each_at_its_own_revision() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    ok_revision(&write1(&store, put("k", "v1", Precondition::None)).await);

    // A lone op before and after the Txn in the same write; the Txn writes `b` twice.
    let results = store
        .write(vec![
            put("before", "x", Precondition::None),
            txn(
                &[
                    ("k", Precondition::ModRevision(1)),
                    ("none", Precondition::MustNotExist),
                ],
                vec![
                    put("a", "new", Precondition::MustNotExist),
                    put("k", "v2", Precondition::ModRevision(1)),
                    put("b", "short-lived", Precondition::MustNotExist),
                    delete("b", Precondition::ModRevision(5)),
                ],
            ),
            put("after", "y", Precondition::None),
        ])
        .await
        .unwrap();
    assert_eq!(ok_revision(&results[0]), 2);
    let OpResult::Txn { results: inner } = &results[1] else {
        panic!("expected Txn, got {:?}", results[1]);
    };
    let revisions: Vec<u64> = inner.iter().map(ok_revision).collect();
    assert_eq!(revisions, [3, 4, 5, 6]);
    match &inner[1] {
        OpResult::Ok {
            prev: Some(prev), ..
        } => assert_eq!(prev.value.as_ref(), b"v1"),
        other => panic!("expected the replaced value, got {other:?}"),
    }
    assert_eq!(ok_revision(&results[2]), 7);
    assert_eq!(store.revision(), 7);
    assert_eq!(value_of(&store, "a").await.as_deref(), Some("new"));
    assert_eq!(value_of(&store, "k").await.as_deref(), Some("v2"));
    assert_eq!(value_of(&store, "b").await, None);
    let k = store.get("k").await.unwrap().unwrap();
    assert_eq!((k.create_revision, k.mod_revision), (1, 4));

    // The history holds one record per op: a read at a revision inside the Txn sees the
    // state after that op.
    let keys = |r: &wasmctl_store::RangeResult| -> Vec<String> {
        r.items.iter().map(|kv| kv.key.clone()).collect()
    };
    let at5 = store.range_at("", None, 0, 5).await.unwrap();
    assert_eq!(keys(&at5), ["a", "b", "before", "k"]);
    let at2 = store.range_at("", None, 0, 2).await.unwrap();
    assert_eq!(keys(&at2), ["before", "k"]);
    assert_eq!(at2.items[1].value.as_ref(), b"v1");

    // No ops: nothing is written, and the compares are still checked.
    let r = write1(&store, txn(&[("a", Precondition::MustExist)], vec![])).await;
    assert_eq!(r, OpResult::Txn { results: vec![] });
    assert_eq!(store.revision(), 7);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_txn_whose_compare_fails_applies_nothing() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    ok_revision(&write1(&store, put("taken", "owner", Precondition::None)).await);
    ok_revision(&write1(&store, put("k", "v1", Precondition::None)).await);

    let r = write1(
        &store,
        txn(
            &[
                ("k", Precondition::ModRevision(2)),
                ("taken", Precondition::MustNotExist),
            ],
            vec![
                put("k", "v2", Precondition::None),
                put("new", "v", Precondition::None),
            ],
        ),
    )
    .await;
    assert_eq!(
        r,
        OpResult::TxnFailed {
            failed: 1,
            key: "taken".into(),
            reason: Box::new(OpResult::AlreadyExists),
        }
    );
    let r = write1(
        &store,
        txn(
            &[("k", Precondition::ModRevision(1))],
            vec![put("k", "v2", Precondition::None)],
        ),
    )
    .await;
    assert_eq!(
        r,
        OpResult::TxnFailed {
            failed: 0,
            key: "k".into(),
            reason: Box::new(OpResult::Conflict {
                current_mod_revision: 2
            }),
        }
    );
    assert_eq!(store.revision(), 2);
    assert_eq!(value_of(&store, "k").await.as_deref(), Some("v1"));
    assert_eq!(value_of(&store, "new").await, None);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_txn_whose_op_fails_its_precondition_applies_nothing() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    ok_revision(&write1(&store, put("taken", "owner", Precondition::None)).await);

    // The second op fails against the store; the first would have succeeded.
    let r = write1(
        &store,
        txn(
            &[("free", Precondition::MustNotExist)],
            vec![
                put("free", "mine", Precondition::MustNotExist),
                put("taken", "mine", Precondition::MustNotExist),
            ],
        ),
    )
    .await;
    assert_eq!(
        r,
        OpResult::TxnFailed {
            failed: 2,
            key: "taken".into(),
            reason: Box::new(OpResult::AlreadyExists),
        }
    );
    // An op fails against what an earlier op of the same Txn wrote.
    let r = write1(
        &store,
        txn(
            &[],
            vec![
                put("x", "1", Precondition::MustNotExist),
                put("x", "2", Precondition::MustNotExist),
            ],
        ),
    )
    .await;
    assert!(
        matches!(&r, OpResult::TxnFailed { failed: 1, key, .. } if key == "x"),
        "{r:?}"
    );
    // A delete of a key that does not exist.
    let r = write1(
        &store,
        txn(
            &[],
            vec![
                put("y", "1", Precondition::None),
                delete("gone", Precondition::None),
            ],
        ),
    )
    .await;
    assert_eq!(
        r,
        OpResult::TxnFailed {
            failed: 1,
            key: "gone".into(),
            reason: Box::new(OpResult::NotFound),
        }
    );
    // A Txn inside a Txn is refused, and the ops around it still apply.
    let results = store
        .write(vec![
            txn(&[], vec![txn(&[], vec![put("z", "1", Precondition::None)])]),
            put("w", "1", Precondition::None),
        ])
        .await
        .unwrap();
    assert!(
        matches!(&results[0], OpResult::Invalid { .. }),
        "{results:?}"
    );
    assert_eq!(ok_revision(&results[1]), 2);
    for key in ["free", "x", "y", "z"] {
        assert_eq!(value_of(&store, key).await, None, "{key}");
    }
    assert_eq!(store.revision(), 2);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn watchers_get_one_event_per_op_of_an_applied_txn() {
    let dir = TempDir::new().unwrap();
    let store = open(config(dir.path())).await;
    ok_revision(&write1(&store, put("p/old", "v1", Precondition::None)).await);
    let mut live = store.watch("p/", 1).unwrap();
    // A failed Txn produces no event.
    let r = write1(
        &store,
        txn(
            &[("p/old", Precondition::MustNotExist)],
            vec![put("p/x", "v", Precondition::None)],
        ),
    )
    .await;
    assert!(matches!(r, OpResult::TxnFailed { .. }), "{r:?}");
    let r = write1(
        &store,
        txn(
            &[("p/old", Precondition::ModRevision(1))],
            vec![
                put("p/new", "v", Precondition::MustNotExist),
                put("q/other", "v", Precondition::None),
                delete("p/old", Precondition::ModRevision(1)),
            ],
        ),
    )
    .await;
    assert!(matches!(r, OpResult::Txn { .. }), "{r:?}");
    let expect = |events: Vec<WatchEvent>| {
        let got: Vec<_> = events
            .iter()
            .map(|e| (e.revision, e.kind, e.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, EventKind::Put, "p/new"),
                (4, EventKind::Delete, "p/old")
            ]
        );
        assert_eq!(events[1].prev.as_ref().unwrap().value.as_ref(), b"v1");
        assert!(events[1].value.is_none());
        assert_eq!(events[0].value.as_ref().unwrap().create_revision, 2);
    };
    let mut events = Vec::new();
    for _ in 0..2 {
        events.push(next_event(&mut live).await.unwrap());
    }
    expect(events);
    // The same from the history.
    let mut replay = store.watch("p/", 1).unwrap();
    let mut events = Vec::new();
    for _ in 0..2 {
        events.push(next_event(&mut replay).await.unwrap());
    }
    expect(events);
    let mut all = store.watch("", 1).unwrap();
    let mut revisions = Vec::new();
    for _ in 0..3 {
        revisions.push(next_event(&mut all).await.unwrap().revision);
    }
    assert_eq!(revisions, [2, 3, 4]);
    store.shutdown().await.unwrap();
}

/// Group commit: 64 concurrent writers share Raft entries, and each gets the result it would
/// have got alone: of 64 creates of one key exactly one succeeds, and 64 creates of distinct
/// keys all succeed with distinct revisions.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writes_share_entries_and_keep_their_own_results() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(config(dir.path())).await;
    let before = store.status().last_log_index.unwrap_or(0);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let same = s
                .write(vec![put(
                    "same",
                    &format!("v{i}"),
                    Precondition::MustNotExist,
                )])
                .await
                .unwrap();
            let own = s
                .write(vec![put(
                    &format!("own/{i}"),
                    "x",
                    Precondition::MustNotExist,
                )])
                .await
                .unwrap();
            (same, own)
        }));
    }
    let mut created = 0;
    let mut revisions = std::collections::BTreeSet::new();
    for t in tasks {
        let (same, own) = t.await.unwrap();
        match &same[0] {
            OpResult::Ok { .. } => created += 1,
            OpResult::AlreadyExists => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(revisions.insert(ok_revision(&own[0])));
    }
    assert_eq!(created, 1, "exactly one create of the same key wins");
    assert_eq!(revisions.len(), 64);
    let entries = store.status().last_log_index.unwrap_or(0) - before;
    eprintln!("128 writes of 64 concurrent writers took {entries} raft entries");
    store.shutdown().await.unwrap();
}
