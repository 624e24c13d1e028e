//! Semantics of the embedded store against a real database file.
use fjord_store::embedded::EmbeddedStore;
use fjord_store::*;
use std::time::Duration;

fn tmp() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("store.redb");
    (d, p)
}

async fn next(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.recv()).await.expect("watch event within 10 s").expect("stream open").expect("event ok")
}

#[tokio::test]
async fn revisions_follow_etcd_semantics() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    assert_eq!(s.current_revision().await.unwrap(), 0);
    let r1 = s.put("/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/a", b"2".to_vec(), None).await.unwrap();
    let r3 = s.put("/b", b"x".to_vec(), None).await.unwrap();
    assert_eq!((r1, r2, r3), (1, 2, 3));
    let a = s.get("/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"2");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 2, 2));
    // Deleting a missing key does not create a revision.
    assert_eq!(s.delete("/missing").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), 3);
    assert_eq!(s.delete("/a").await.unwrap(), Some(4));
    assert!(s.get("/a").await.unwrap().is_none());
    // Re-created key starts a new life.
    s.put("/a", b"3".to_vec(), None).await.unwrap();
    let a = s.get("/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.version), (5, 1));
}

#[tokio::test]
async fn list_is_prefix_scoped_and_sorted() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    for k in ["/x/2", "/x/1", "/xy/1", "/w"] {
        s.put(k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    let l = s.list("/x/").await.unwrap();
    assert_eq!(l.kvs.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), vec!["/x/1", "/x/2"]);
    assert_eq!(l.revision, 4);
}

#[tokio::test]
async fn transactions_compare_and_swap() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    // Create-if-absent succeeds once.
    let t = || Txn::when(vec![Compare::absent("/ip/10.0.0.2")]).and_then(vec![Op::put("/ip/10.0.0.2", "pod-a"), Op::put("/owner/pod-a", "10.0.0.2")]);
    let first = s.txn(t()).await.unwrap();
    assert!(first.succeeded);
    let second = s.txn(t()).await.unwrap();
    assert!(!second.succeeded);
    assert_eq!(second.revision, first.revision, "a failed txn without failure ops writes nothing");
    // Both puts of one txn share a revision.
    let a = s.get("/ip/10.0.0.2").await.unwrap().unwrap();
    let b = s.get("/owner/pod-a").await.unwrap().unwrap();
    assert_eq!(a.mod_revision, b.mod_revision);
    // CAS on mod revision.
    let stale = s.compare_and_swap("/ip/10.0.0.2", a.mod_revision - 1, b"x".to_vec()).await.unwrap();
    assert!(!stale.succeeded);
    let ok = s.compare_and_swap("/ip/10.0.0.2", a.mod_revision, b"pod-b".to_vec()).await.unwrap();
    assert!(ok.succeeded);
    assert_eq!(s.get("/ip/10.0.0.2").await.unwrap().unwrap().value, b"pod-b");
    // Failure branch runs when a compare fails.
    let r = s
        .txn(Txn::when(vec![Compare::Value("/ip/10.0.0.2".into(), b"nope".to_vec())]).and_then(vec![Op::delete("/ip/10.0.0.2")]).or_else(vec![Op::put("/conflict", "1")]))
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert!(s.get("/conflict").await.unwrap().is_some());
    assert!(s.get("/ip/10.0.0.2").await.unwrap().is_some());
    // Version compare.
    let r = s.txn(Txn::when(vec![Compare::Version("/conflict".into(), 1)]).and_then(vec![Op::delete("/conflict")])).await.unwrap();
    assert!(r.succeeded);
}

#[tokio::test]
async fn concurrent_cas_never_double_allocates() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    let mut handles = vec![];
    for w in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut won = vec![];
            for slot in 0..20 {
                let k = format!("/slot/{slot}");
                let r = s.txn(Txn::when(vec![Compare::absent(k.clone())]).and_then(vec![Op::put(k, format!("w{w}"))])).await.unwrap();
                if r.succeeded {
                    won.push(slot);
                }
            }
            (w, won)
        }));
    }
    let mut owners = std::collections::HashMap::new();
    for h in handles {
        let (w, won) = h.await.unwrap();
        for slot in won {
            assert!(owners.insert(slot, w).is_none(), "slot {slot} won twice");
        }
    }
    assert_eq!(owners.len(), 20);
    for (slot, w) in owners {
        assert_eq!(s.get(&format!("/slot/{slot}")).await.unwrap().unwrap().value, format!("w{w}").into_bytes());
    }
}

#[tokio::test]
async fn watch_replays_history_then_follows_live() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    s.put("/w/a", b"1".to_vec(), None).await.unwrap(); // rev 1
    s.put("/other", b"x".to_vec(), None).await.unwrap(); // rev 2
    s.put("/w/b", b"2".to_vec(), None).await.unwrap(); // rev 3
    let mut w = s.watch("/w/", 2).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.as_str(), e.kv.mod_revision), (EventKind::Put, "/w/b", 3));
    s.delete("/w/a").await.unwrap(); // rev 4
    s.put("/other", b"y".to_vec(), None).await.unwrap(); // rev 5, filtered out
    s.put("/w/c", b"3".to_vec(), None).await.unwrap(); // rev 6
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.as_str(), e.kv.mod_revision), (EventKind::Delete, "/w/a", 4));
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.as_str(), e.kv.mod_revision, e.kv.value.as_slice()), (EventKind::Put, "/w/c", 6, &b"3"[..]));
    // A watch from 0 sees only the future.
    let mut f = s.watch("/w/", 0).await.unwrap();
    s.put("/w/d", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next(&mut f).await.kv.key, "/w/d");
}

#[tokio::test]
async fn watch_from_compacted_revision_fails_loudly() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open_with_history(&p, 50).unwrap();
    for i in 0..120 {
        s.put("/k", format!("{i}").into_bytes(), None).await.unwrap();
    }
    match s.watch("/k", 3).await {
        Err(StoreError::Compacted { requested: 3, compacted }) => assert!(compacted > 3 && compacted <= 71, "{compacted}"),
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // Recent history is still there.
    let mut w = s.watch("/k", 115).await.unwrap();
    assert_eq!(next(&mut w).await.kv.mod_revision, 115);
}

#[tokio::test]
async fn leases_expire_and_keepalive_holds_them() {
    let (_d, p) = tmp();
    let s = EmbeddedStore::open(&p).unwrap();
    let short = s.grant_lease(Duration::from_millis(400)).await.unwrap();
    let kept = s.grant_lease(Duration::from_millis(400)).await.unwrap();
    assert_ne!(short, kept);
    s.put("/node/a", b"a".to_vec(), Some(short)).await.unwrap();
    s.put("/node/b", b"b".to_vec(), Some(kept)).await.unwrap();
    let mut w = s.watch("/node/", 0).await.unwrap();
    // Keep `kept` alive while `short` expires.
    let ev = loop {
        s.keep_alive(kept).await.unwrap();
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(100), w.recv()).await {
            break ev.unwrap();
        }
    };
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, "/node/a"));
    assert!(s.get("/node/b").await.unwrap().is_some());
    assert!(matches!(s.keep_alive(short).await, Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(s.put("/x", vec![], Some(short)).await, Err(StoreError::LeaseNotFound(_))));
    s.revoke_lease(kept).await.unwrap();
    assert!(s.get("/node/b").await.unwrap().is_none());
}

#[tokio::test]
async fn state_survives_reopen_and_file_is_exclusive() {
    let (_d, p) = tmp();
    {
        let s = EmbeddedStore::open(&p).unwrap();
        s.put("/a", b"1".to_vec(), None).await.unwrap();
        s.put("/b", b"2".to_vec(), None).await.unwrap();
        match EmbeddedStore::open(&p) {
            Err(StoreError::Locked { path }) => assert!(path.contains("store.redb")),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("second open of the same file must fail"),
        }
    }
    let s = EmbeddedStore::open(&p).unwrap();
    assert_eq!(s.current_revision().await.unwrap(), 2);
    assert_eq!(s.put("/c", vec![], None).await.unwrap(), 3);
    // History survives too.
    let mut w = s.watch("/", 1).await.unwrap();
    assert_eq!(next(&mut w).await.kv.key, "/a");
}

#[tokio::test]
async fn bad_urls_are_explained() {
    for (url, word) in [("embedded:", "file path"), ("etcd:http://127.0.0.1:2379", "etcd"), ("redis://x", "embedded:PATH")] {
        match fjord_store::open(url).await {
            Err(e) => assert!(e.to_string().contains(word), "{url}: {e}"),
            Ok(_) => panic!("{url} should be refused"),
        }
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    use std::io::{BufRead, BufReader};
    let (_d, p) = tmp();
    for round in 0..3 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fjord-store-crashtest"))
            .arg(&p)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last = None;
        // Kill somewhere mid-stream (different point each round).
        for _ in 0..(50 + round * 37) {
            let line = lines.next().unwrap().unwrap();
            last = Some(line.strip_prefix("acked ").unwrap().parse::<u64>().unwrap());
        }
        nix_kill(child.id());
        child.wait().unwrap();
        let last = last.unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let s = EmbeddedStore::open(&p).unwrap();
            for n in 0..=last {
                let kv = s.get(&format!("crash/{n:08}")).await.unwrap();
                assert!(kv.is_some(), "round {round}: acknowledged key {n} lost after kill -9 (last acked {last})");
            }
        });
    }
}

fn nix_kill(pid: u32) {
    // SIGKILL: no chance to flush anything.
    let r = unsafe { libc_kill(pid as i32, 9) };
    assert_eq!(r, 0);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
