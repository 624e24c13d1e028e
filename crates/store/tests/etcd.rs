//! The etcd backend against a real etcd (Debian's `etcd-server`), one private
//! etcd per test on loopback ports, with its data in a temp dir.
mod common;
use common::*;
use fjord_store::etcd::{EtcdOptions, EtcdStore};
use fjord_store::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    fjord_store::testing::free_loopback_port()
}

fn etcd_bin() -> String {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("etcd not found: install Debian's etcd-server (./fjord.sh does)");
}

async fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (cport, pport) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{cport}");
    let child = std::process::Command::new(etcd_bin())
        .args(["--name", "fjtest", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pport}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{pport}")])
        .args(["--initial-cluster", &format!("fjtest=http://127.0.0.1:{pport}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start etcd");
    let e = Etcd { child, _dir: dir, endpoint };
    let t0 = Instant::now();
    loop {
        if EtcdStore::connect(&opts(&e)).await.is_ok() {
            return e;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "etcd did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn opts(e: &Etcd) -> EtcdOptions {
    EtcdOptions { endpoints: vec![e.endpoint.clone()], ..Default::default() }
}

async fn store() -> (Etcd, EtcdStore) {
    let e = start_etcd().await;
    let s = EtcdStore::connect(&opts(&e)).await.unwrap();
    (e, s)
}

#[tokio::test]
async fn revisions() {
    let (_e, s) = store().await;
    revisions_follow_etcd_semantics(&s, "/fjord/v1/t").await;
}

#[tokio::test]
async fn list() {
    let (_e, s) = store().await;
    list_is_prefix_scoped_and_sorted(&s, "/fjord/v1/t").await;
}

#[tokio::test]
async fn txn_cas() {
    let (_e, s) = store().await;
    transactions_compare_and_swap(&s, "/fjord/v1/t").await;
}

#[tokio::test]
async fn concurrent_cas() {
    let (_e, s) = store().await;
    concurrent_cas_never_double_allocates(Arc::new(s), "/fjord/v1/t").await;
}

#[tokio::test]
async fn watch() {
    let (_e, s) = store().await;
    watch_replays_history_then_follows_live(&s, "/fjord/v1/t").await;
}

#[tokio::test]
async fn leases() {
    let (_e, s) = store().await;
    leases_expire_and_keepalive_holds_them(&s, "/fjord/v1/t", Duration::from_secs(2)).await;
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_reported_not_skipped() {
    let (e, s) = store().await;
    let first = s.put("/fjord/v1/c/k", b"0".to_vec(), None).await.unwrap();
    for i in 1..20 {
        s.put("/fjord/v1/c/k", format!("{i}").into_bytes(), None).await.unwrap();
    }
    let last = s.current_revision().await.unwrap();
    let mut raw = etcd_client::Client::connect([e.endpoint.as_str()], None).await.unwrap();
    raw.compact(last - 5, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
    let mut w = s.watch("/fjord/v1/c/", first).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), w.recv()).await.unwrap() {
        Some(Err(StoreError::Compacted { requested, compacted })) => {
            assert_eq!(requested, first);
            assert!(compacted >= last - 5, "{compacted}");
        }
        other => panic!("expected Compacted, got {:?}", other.map(|r| r.map(|e| e.kv.key))),
    }
    // From a revision still in history, every event arrives.
    let mut w = s.watch("/fjord/v1/c/", last - 2).await.unwrap();
    for want in last - 2..=last {
        assert_eq!(next(&mut w).await.kv.mod_revision, want);
    }
}

#[tokio::test]
async fn unreachable_etcd_is_a_clear_error_not_a_hang() {
    let port = free_port(); // nothing listens there
    let t0 = Instant::now();
    let r = EtcdStore::connect(&EtcdOptions { endpoints: vec![format!("http://127.0.0.1:{port}")], timeout: Some(Duration::from_secs(2)), ..Default::default() }).await;
    let e = r.err().expect("connect must fail").to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(30), "connect hung");
    // Bad URLs.
    for url in ["etcd:", "etcd:127.0.0.1:2379", "etcd:ftp://x"] {
        let e = fjord_store::open(url).await.err().expect("refused").to_string();
        assert!(e.contains("etcd:http://HOST:PORT"), "{url}: {e}");
    }
}

#[tokio::test]
async fn authentication_failure_is_reported_and_good_credentials_work() {
    let e = start_etcd().await;
    let mut raw = etcd_client::Client::connect([e.endpoint.as_str()], None).await.unwrap();
    raw.user_add("root", "rootpw", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();
    let with = |u: &str, p: &str| EtcdOptions { username: Some(u.into()), password: Some(p.into()), ..opts(&e) };
    let err = EtcdStore::connect(&with("root", "wrong")).await.err().expect("wrong password must fail").to_string();
    assert!(err.to_lowercase().contains("auth"), "{err}");
    let err = EtcdStore::connect(&opts(&e)).await.err().expect("anonymous must fail").to_string();
    assert!(err.contains("refused") || err.to_lowercase().contains("permission") || err.to_lowercase().contains("user"), "{err}");
    let ok = EtcdStore::connect(&with("root", "rootpw")).await.unwrap();
    ok.put("/fjord/v1/auth/x", b"1".to_vec(), None).await.unwrap();
    assert_eq!(ok.get("/fjord/v1/auth/x").await.unwrap().unwrap().value, b"1");
    let half = EtcdOptions { username: Some("root".into()), ..opts(&e) };
    assert!(EtcdStore::connect(&half).await.err().unwrap().to_string().contains("go together"));
}

/// Certificates made with the openssl CLI for one test: a CA, a server cert for 127.0.0.1,
/// a client cert.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fjord-test-ca"]);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{who}.key"), "-out", &format!("{who}.csr"), "-subj", &format!("/CN=fjord-{who}")]);
        run(&[
            "x509", "-req", "-in", &format!("{who}.csr"), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", &format!("{who}.crt"), "-days", "2", "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let (cport, pport) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{cport}");
    let mut child = std::process::Command::new(etcd_bin())
        .args(["--name", "fjtls", "--data-dir"])
        .arg(d.join("data"))
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pport}"), "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{pport}")])
        .args(["--initial-cluster", &format!("fjtls=http://127.0.0.1:{pport}")])
        .arg("--cert-file").arg(d.join("server.crt"))
        .arg("--key-file").arg(d.join("server.key"))
        .arg("--trusted-ca-file").arg(d.join("ca.crt"))
        .arg("--client-cert-auth")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start etcd");
    let good = EtcdOptions {
        endpoints: vec![endpoint.clone()],
        ca_file: Some(d.join("ca.crt")),
        cert_file: Some(d.join("client.crt")),
        key_file: Some(d.join("client.key")),
        ..Default::default()
    };
    let t0 = Instant::now();
    let s = loop {
        match EtcdStore::connect(&good).await {
            Ok(s) => break s,
            Err(e) => {
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    panic!("TLS connect failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    s.put("/fjord/v1/tls/x", b"1".to_vec(), None).await.unwrap();
    assert_eq!(s.get("/fjord/v1/tls/x").await.unwrap().unwrap().value, b"1");
    // Without a client certificate the server refuses.
    let no_cert = EtcdOptions { endpoints: vec![endpoint.clone()], ca_file: Some(d.join("ca.crt")), timeout: Some(Duration::from_secs(3)), ..Default::default() };
    assert!(EtcdStore::connect(&no_cert).await.is_err(), "etcd with --client-cert-auth accepted a client without a certificate");
    // A missing certificate file is named.
    let missing = EtcdOptions { cert_file: Some(d.join("nope.crt")), ..good.clone() };
    let e = EtcdStore::connect(&missing).await.err().unwrap().to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let _ = child.kill();
    let _ = child.wait();
}
