//! The standalone `fjord-gateway` binary: config dir, reload on file change and SIGHUP, refusal
//! of a broken file, metrics endpoint, status file, graceful exit on SIGTERM.
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fjord_gateway::testing::put_manifests;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "gave up waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Write atomically (temp file + rename) so the gateway never reads half a file.
fn write_atomic(path: &std::path::Path, text: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config_errors(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fjord_gateway_config_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn try_get(url: &str) -> Option<Resp> {
    let c = client();
    let req = http::Request::builder().uri(url).body(empty()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await.ok()?.ok()?;
    let status = r.status().as_u16();
    let version = r.version();
    let headers = r.headers().clone();
    use http_body_util::BodyExt;
    let body = r.into_body().collect().await.ok()?.to_bytes();
    Some(Resp { status, headers, body, version })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_binary_reloads_refuses_bad_files_and_exits_gracefully() {
    let a = echo("a", "default").await;
    let b = echo("b", "default").await;
    let port = free_port();
    let mport = free_port();
    let dir = tempfile::Builder::new().prefix("fjtgw-").tempdir().unwrap();
    let status_file = dir.path().join("status.json");
    let cfg = dir.path().join("conf");
    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(
        cfg.join("00-base.yaml"),
        [class_and_gateway("gw", "default", port), static_service("a", "default", 80, &[a]), static_service("b", "default", 80, &[b])].join("---\n"),
    )
    .unwrap();
    let route = |path: &str, svc: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - matches: [{{path: {{value: {path}}}}}]\n    backendRefs: [{{name: {svc}, port: 80}}]\n")
    };
    std::fs::write(cfg.join("10-route.yaml"), route("/one", "a")).unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_fjord-gateway"))
        .args(["--config", cfg.to_str().unwrap(), "--listen-address", "127.0.0.1", "--metrics-addr", &format!("127.0.0.1:{mport}")])
        .args(["--status-file", status_file.to_str().unwrap(), "--poll-ms", "100", "--shutdown-grace-secs", "5", "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let u = |p: &str| format!("http://127.0.0.1:{port}{p}");
    eventually("gateway serves /one", || async { try_get(&u("/one")).await.is_some_and(|r| r.status == 200) }).await;
    assert_eq!(try_get(&u("/one")).await.unwrap().echo().pod, "a");
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert_eq!(st["httpRoutes"]["default/r"]["parents"][0]["conditions"][0]["reason"], "Accepted");

    // file change → reload
    write_atomic(&cfg.join("10-route.yaml"), route("/two", "b"));
    eventually("route /two after file change", || async { try_get(&u("/two")).await.is_some_and(|r| r.status == 200) }).await;
    assert_eq!(try_get(&u("/two")).await.unwrap().echo().pod, "b");
    assert_eq!(try_get(&u("/one")).await.unwrap().status, 404);

    // a broken file is refused whole; the running config stays
    write_atomic(&cfg.join("20-broken.yaml"), "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x}\nspec: {rulez: []}\n");
    let metrics = || async { try_get(&format!("http://127.0.0.1:{mport}/metrics")).await.map(|r| String::from_utf8_lossy(&r.body).into_owned()) };
    eventually("config error counted", || async { metrics().await.is_some_and(|m| config_errors(&m) >= 1) }).await;
    assert_eq!(try_get(&u("/two")).await.unwrap().status, 200);
    std::fs::remove_file(cfg.join("20-broken.yaml")).unwrap();

    // SIGHUP reload (polling would also catch it; the signal must not kill the process)
    write_atomic(&cfg.join("10-route.yaml"), route("/three", "a"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("route /three", || async { try_get(&u("/three")).await.is_some_and(|r| r.status == 200) }).await;

    let m = metrics().await.unwrap();
    assert!(m.contains("fjord_gateway_requests_total{route=\"default/r/0\",backend=\"default/a:80\",code=\"200\"}"), "{m}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "{code:?}");
}

#[test]
fn check_mode_prints_status_and_bad_config_fails_naming_the_field() {
    let dir = tempfile::Builder::new().prefix("fjtgw-").tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, class_and_gateway("gw", "default", 8080)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fjord-gateway")).args(["--check", "--config", f.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gateways"]["default/gw"]["conditions"][1]["type"], "Programmed");
    std::fs::write(&f, class_and_gateway("gw", "default", 8080).replace("protocol: HTTP", "protocol: HTTP\n    hostnme: x")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fjord-gateway")).args(["--check", "--config", f.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.listeners[0]") && err.contains("hostnme") && err.contains("c.yaml"), "{err}");
}

/// `fjord-gateway --store`: objects written to a store file (as `fjordctl apply` would) are
/// served, and the route's status is written back to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_mode_binary_serves_objects_from_the_store_and_writes_status() {
    use fjord_model::keys;
    let a = echo("a", "app").await;
    let port = free_port();
    let dir = tempfile::Builder::new().prefix("fjtgw-").tempdir().unwrap();
    let url = format!("embedded:{}", dir.path().join("store.redb").display());
    let text = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: app}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: app, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: app}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n",
        class_and_gateway("gw", "app", port),
        a.port()
    );
    {
        let store = fjord_store::open(&url).await.unwrap();
        put_manifests(store.as_ref(), &text, "2025-01-01T00:00:00Z").await;
    } // the store file is free again: one process per embedded store
    let child = Command::new(env!("CARGO_BIN_EXE_fjord-gateway"))
        .args(["--store", &url, "--listen-address", "127.0.0.1", "--workers", "1", "--shutdown-grace-secs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let u = format!("http://127.0.0.1:{port}/hello");
    eventually("the route is served from the store", || {
        let u = u.clone();
        async move { try_get(&u).await.is_some_and(|r| r.status == 200 && String::from_utf8_lossy(&r.body).contains("\"pod\":\"a\"")) }
    })
    .await;
    // The status write follows the table swap by a few milliseconds; the store file can only be
    // opened once the gateway has exited, so give it a moment before stopping it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = fjord_store::open(&url).await.unwrap();
    let st = store.get(&keys::status("httproutes", "app", "r")).await.unwrap().expect("route status written to the store");
    let v: serde_json::Value = serde_json::from_slice(&st.value).unwrap();
    assert_eq!(v["parents"][0]["conditions"][0]["status"], "True", "{v}");
    let g: serde_json::Value = serde_json::from_slice(&store.get(&keys::status("gateways", "app", "gw")).await.unwrap().unwrap().value).unwrap();
    assert_eq!(g["addresses"][0]["value"], "127.0.0.1");
}
