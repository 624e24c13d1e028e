//! Store semantics every backend must have; each backend's test file runs these.
#![allow(dead_code)]
use fjord_store::*;
use std::time::Duration;

pub async fn next(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.recv()).await.expect("watch event within 10 s").expect("stream open").expect("event ok")
}

/// Revisions relative to the store's start (etcd starts at 1, embedded at 0).
pub async fn revisions_follow_etcd_semantics(s: &dyn Store, p: &str) {
    let base = s.current_revision().await.unwrap();
    let (a, b) = (format!("{p}/a"), format!("{p}/b"));
    let r1 = s.put(&a, b"1".to_vec(), None).await.unwrap();
    let r2 = s.put(&a, b"2".to_vec(), None).await.unwrap();
    let r3 = s.put(&b, b"x".to_vec(), None).await.unwrap();
    assert_eq!((r1, r2, r3), (base + 1, base + 2, base + 3));
    let kv = s.get(&a).await.unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (base + 1, base + 2, 2));
    assert_eq!(s.delete(&format!("{p}/missing")).await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), base + 3, "deleting a missing key creates no revision");
    assert_eq!(s.delete(&a).await.unwrap(), Some(base + 4));
    assert!(s.get(&a).await.unwrap().is_none());
    s.put(&a, b"3".to_vec(), None).await.unwrap();
    let kv = s.get(&a).await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (base + 5, 1), "a re-created key starts a new life");
}

pub async fn list_is_prefix_scoped_and_sorted(s: &dyn Store, p: &str) {
    for k in ["x/2", "x/1", "xy/1", "w"] {
        s.put(&format!("{p}/{k}"), k.as_bytes().to_vec(), None).await.unwrap();
    }
    let l = s.list(&format!("{p}/x/")).await.unwrap();
    let keys: Vec<String> = l.kvs.iter().map(|kv| kv.key.trim_start_matches(p).to_string()).collect();
    assert_eq!(keys, vec!["/x/1", "/x/2"]);
    assert_eq!(l.revision, s.current_revision().await.unwrap());
}

pub async fn transactions_compare_and_swap(s: &dyn Store, p: &str) {
    let ip = format!("{p}/ip/10.0.0.2");
    let owner = format!("{p}/owner/pod-a");
    let t = || Txn::when(vec![Compare::absent(ip.clone())]).and_then(vec![Op::put(ip.clone(), "pod-a"), Op::put(owner.clone(), "10.0.0.2")]);
    let first = s.txn(t()).await.unwrap();
    assert!(first.succeeded);
    let second = s.txn(t()).await.unwrap();
    assert!(!second.succeeded);
    assert_eq!(s.current_revision().await.unwrap(), first.revision, "a failed txn without failure ops writes nothing");
    let a = s.get(&ip).await.unwrap().unwrap();
    let b = s.get(&owner).await.unwrap().unwrap();
    assert_eq!(a.mod_revision, b.mod_revision, "ops of one txn share a revision");
    assert!(!s.compare_and_swap(&ip, a.mod_revision - 1, b"x".to_vec()).await.unwrap().succeeded);
    assert!(s.compare_and_swap(&ip, a.mod_revision, b"pod-b".to_vec()).await.unwrap().succeeded);
    assert_eq!(s.get(&ip).await.unwrap().unwrap().value, b"pod-b");
    let conflict = format!("{p}/conflict");
    let r = s
        .txn(Txn::when(vec![Compare::Value(ip.clone(), b"nope".to_vec())]).and_then(vec![Op::delete(ip.clone())]).or_else(vec![Op::put(conflict.clone(), "1")]))
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert!(s.get(&conflict).await.unwrap().is_some(), "failure ops ran");
    assert!(s.get(&ip).await.unwrap().is_some(), "success ops did not run");
    assert!(s.txn(Txn::when(vec![Compare::Version(conflict.clone(), 1)]).and_then(vec![Op::delete(conflict.clone())])).await.unwrap().succeeded);
}

pub async fn concurrent_cas_never_double_allocates(s: std::sync::Arc<dyn Store>, p: &str) {
    let mut handles = vec![];
    for w in 0..8 {
        let s = s.clone();
        let p = p.to_string();
        handles.push(tokio::spawn(async move {
            let mut won = vec![];
            for slot in 0..20 {
                let k = format!("{p}/slot/{slot}");
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
        assert_eq!(s.get(&format!("{p}/slot/{slot}")).await.unwrap().unwrap().value, format!("w{w}").into_bytes());
    }
}

pub async fn watch_replays_history_then_follows_live(s: &dyn Store, p: &str) {
    let w_ = format!("{p}/w/");
    let r1 = s.put(&format!("{p}/w/a"), b"1".to_vec(), None).await.unwrap();
    s.put(&format!("{p}/other"), b"x".to_vec(), None).await.unwrap();
    let r3 = s.put(&format!("{p}/w/b"), b"2".to_vec(), None).await.unwrap();
    let mut w = s.watch(&w_, r1 + 1).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.clone(), e.kv.mod_revision), (EventKind::Put, format!("{p}/w/b"), r3));
    let r4 = s.delete(&format!("{p}/w/a")).await.unwrap().unwrap();
    s.put(&format!("{p}/other"), b"y".to_vec(), None).await.unwrap();
    let r6 = s.put(&format!("{p}/w/c"), b"3".to_vec(), None).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.clone(), e.kv.mod_revision), (EventKind::Delete, format!("{p}/w/a"), r4));
    let e = next(&mut w).await;
    assert_eq!((e.kind, e.kv.key.clone(), e.kv.mod_revision, e.kv.value.clone()), (EventKind::Put, format!("{p}/w/c"), r6, b"3".to_vec()));
    let mut f = s.watch(&w_, 0).await.unwrap();
    s.put(&format!("{p}/w/d"), b"4".to_vec(), None).await.unwrap();
    assert_eq!(next(&mut f).await.kv.key, format!("{p}/w/d"));
}

/// `ttl` must be a few times the backend's lease granularity.
pub async fn leases_expire_and_keepalive_holds_them(s: &dyn Store, p: &str, ttl: Duration) {
    let short = s.grant_lease(ttl).await.unwrap();
    let kept = s.grant_lease(ttl).await.unwrap();
    assert_ne!(short, kept);
    s.put(&format!("{p}/node/a"), b"a".to_vec(), Some(short)).await.unwrap();
    s.put(&format!("{p}/node/b"), b"b".to_vec(), Some(kept)).await.unwrap();
    let mut w = s.watch(&format!("{p}/node/"), 0).await.unwrap();
    let t0 = std::time::Instant::now();
    let ev = loop {
        s.keep_alive(kept).await.unwrap();
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(250), w.recv()).await {
            break ev.unwrap();
        }
        assert!(t0.elapsed() < ttl * 10 + Duration::from_secs(10), "lease never expired");
    };
    assert_eq!((ev.kind, ev.kv.key.clone()), (EventKind::Delete, format!("{p}/node/a")));
    assert!(s.get(&format!("{p}/node/b")).await.unwrap().is_some(), "kept-alive lease expired");
    let ka = s.keep_alive(short).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound(_))), "{ka:?}");
    let put = s.put(&format!("{p}/x"), vec![], Some(short)).await;
    assert!(matches!(put, Err(StoreError::LeaseNotFound(_))), "{put:?}");
    s.revoke_lease(kept).await.unwrap();
    assert!(s.get(&format!("{p}/node/b")).await.unwrap().is_none());
}
