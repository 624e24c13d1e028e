//! Semantics of the embedded store against a real database file.
mod common;
use common::*;
use fjord_store::embedded::EmbeddedStore;
use fjord_store::*;
use std::sync::Arc;
use std::time::Duration;

fn tmp() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("store.redb");
    (d, p)
}

fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let (d, p) = tmp();
    (d, EmbeddedStore::open(&p).unwrap())
}

#[tokio::test]
async fn revisions() {
    let (_d, s) = store();
    assert_eq!(s.current_revision().await.unwrap(), 0);
    revisions_follow_etcd_semantics(&s, "/t").await;
}

#[tokio::test]
async fn list() {
    let (_d, s) = store();
    list_is_prefix_scoped_and_sorted(&s, "/t").await;
}

#[tokio::test]
async fn txn_cas() {
    let (_d, s) = store();
    transactions_compare_and_swap(&s, "/t").await;
}

#[tokio::test]
async fn concurrent_cas() {
    let (_d, s) = store();
    concurrent_cas_never_double_allocates(Arc::new(s), "/t").await;
}

#[tokio::test]
async fn watch() {
    let (_d, s) = store();
    watch_replays_history_then_follows_live(&s, "/t").await;
}

#[tokio::test]
async fn leases() {
    let (_d, s) = store();
    leases_expire_and_keepalive_holds_them(&s, "/t", Duration::from_millis(400)).await;
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
