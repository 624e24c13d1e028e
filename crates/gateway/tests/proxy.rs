//! End-to-end tests of the proxy with real sockets on 127.0.0.1, real HTTP clients and the
//! echo backend.
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fjord_gateway::api::find_condition;
use http_body_util::BodyExt;

const SEED_ROUTE: &str = fjord_gateway::SEED_HTTPROUTE;

fn route(name: &str, ns: &str, gw: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: {gw}, namespace: {ns}}}]\n  rules:\n{rules}\n"
    )
}

/// A gateway on a free port with one route ("default/g", every request) to one echo backend "a".
async fn one_backend_gateway() -> (fjord_gateway::Gateway, u16) {
    let a = echo("a", "default").await;
    let port = free_port();
    let (gw, _) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        route("g", "default", "gw", "  - backendRefs: [{name: a, port: 80}]"),
    ])
    .await;
    (gw, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_route_splits_90_10_over_10000_requests_and_404s_elsewhere() {
    let v1 = echo("backend-v1-pod", "backend").await;
    let v2 = echo("backend-v2-pod", "backend").await;
    let port = free_port();
    let (gw, status) = gateway(&[
        class_and_gateway("external-gateway", "backend", port),
        static_service("backend-v1", "backend", 8080, &[v1]),
        static_service("backend-v2", "backend", 8080, &[v2]),
        SEED_ROUTE.to_string(),
    ])
    .await;
    let st = &status.http_routes["backend/production-traffic-split"].parents[0].conditions;
    assert!(find_condition(st, "Accepted").unwrap().is_true(), "{st:?}");
    assert!(find_condition(st, "ResolvedRefs").unwrap().is_true(), "{st:?}");

    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let counts: Arc<std::sync::Mutex<HashMap<String, usize>>> = Default::default();
    let mut tasks = Vec::new();
    const N: usize = 10_000;
    const WORKERS: usize = 16;
    for w in 0..WORKERS {
        let (c, base, counts) = (c.clone(), base.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..N / WORKERS {
                let r = get(&c, &format!("{base}/api/v2/items/{w}-{i}")).await;
                assert_eq!(r.status, 200);
                *counts.lock().unwrap().entry(r.echo().pod).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let total: usize = counts.values().sum();
    assert_eq!(total, N);
    let p1 = counts["backend-v1-pod"] as f64 * 100.0 / total as f64;
    let p2 = counts["backend-v2-pod"] as f64 * 100.0 / total as f64;
    println!("split over {total} requests: v1 {p1:.2}% v2 {p2:.2}%");
    assert!((p1 - 90.0).abs() <= 1.5 && (p2 - 10.0).abs() <= 1.5, "{counts:?}");

    assert_eq!(get(&c, &format!("{base}/api/v3")).await.status, 404);
    assert_eq!(get(&c, &format!("{base}/api/v2x")).await.status, 404, "PathPrefix is segment-wise");
    assert_eq!(get(&c, &format!("{base}/")).await.status, 404);
    assert_eq!(get(&c, &format!("{base}/api/v2")).await.status, 200);
    let m = gw.metrics().encode();
    assert!(m.contains("route=\"backend/production-traffic-split/0\""), "{m}");
    assert!(m.contains("backend=\"backend/backend-v1:8080\""), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_headers_query_method_hostnames_end_to_end() {
    let a = echo("a", "default").await;
    let b = echo("b", "default").await;
    let port = free_port();
    let r = route(
        "m",
        "default",
        "gw",
        r#"  - matches: [{path: {value: /}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /x}, headers: [{name: x-version, value: "2"}]}, {path: {value: /x}, queryParams: [{name: v, type: RegularExpression, value: "2|two"}]}]
    backendRefs: [{name: b, port: 80}]
  - matches: [{path: {type: Exact, value: /x/exact}, method: DELETE}]
    backendRefs: [{name: b, port: 80}]"#,
    );
    let hosted = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: hosted, namespace: default}\nspec:\n  parentRefs: [{name: gw}]\n  hostnames: [\"*.b.example\"]\n  rules: [{backendRefs: [{name: b, port: 80}]}]\n";
    let (_gw, _) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service("b", "default", 80, &[b]),
        r,
        hosted.to_string(),
    ])
    .await;
    let c = client();
    let u = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(get(&c, &u("/x")).await.echo().pod, "a");
    assert_eq!(send(&c, "GET", &u("/x/y"), &[("x-version", "2")]).await.echo().pod, "b");
    assert_eq!(send(&c, "GET", &u("/x/y"), &[("x-version", "3")]).await.echo().pod, "a");
    assert_eq!(get(&c, &u("/x?v=two")).await.echo().pod, "b");
    assert_eq!(get(&c, &u("/x?v=two2")).await.echo().pod, "a");
    assert_eq!(send(&c, "DELETE", &u("/x/exact"), &[]).await.echo().pod, "b");
    assert_eq!(send(&c, "GET", &u("/x/exact"), &[]).await.echo().pod, "a");
    assert_eq!(send(&c, "GET", &u("/anything"), &[("host", "foo.b.example")]).await.echo().pod, "b");
    assert_eq!(send(&c, "GET", &u("/anything"), &[("host", "b.example")]).await.echo().pod, "a");
}

/// A backend that records every request it receives (for RequestMirror).
async fn recorder() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(String, http::HeaderMap, Bytes)>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (p, b) = req.into_parts();
                        let body = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        let _ = tx.send((p.uri.to_string(), p.headers, body));
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
            });
        }
    });
    (a, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_headers_redirect_rewrite_mirror_timeouts() {
    let a = echo("a", "default").await;
    let (mirror, mut mirrored) = recorder().await;
    let port = free_port();
    let r = route(
        "f",
        "default",
        "gw",
        r#"  - matches: [{path: {value: /hdr}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: new}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: x-resp, value: r}]
        add: [{name: x-resp-add, value: r2}]
        remove: [x-echo-pod]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /redir}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.org, statusCode: 301}}]
  - matches: [{path: {value: /redir-port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8443, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]
  - matches: [{path: {value: /redir-full}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full}}}]
  - matches: [{path: {value: /rw}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /rwfull}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /only}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /slowbackend}}]
    timeouts: {backendRequest: 300ms}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /perbackend}}]
    backendRefs:
    - name: a
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: a}]}}]"#,
    );
    let (_gw, st) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service("mirror", "default", 80, &[mirror]),
        r,
    ])
    .await;
    let conds = &st.http_routes["default/f"].parents[0].conditions;
    assert!(find_condition(conds, "Accepted").unwrap().is_true(), "{conds:?}");
    assert!(find_condition(conds, "PartiallyInvalid").is_none(), "{conds:?}");
    let c = client();
    let u = |p: &str| format!("http://127.0.0.1:{port}{p}");

    let r = send(&c, "GET", &u("/hdr"), &[("x-set", "old"), ("x-add", "orig"), ("x-remove", "gone")]).await;
    let e = r.echo();
    assert_eq!(e.headers["x-set"], vec!["new"]);
    assert_eq!(e.headers["x-add"], vec!["orig", "added"]);
    assert!(!e.headers.contains_key("x-remove"));
    assert_eq!(r.header("x-resp"), Some("r"));
    assert_eq!(r.header("x-resp-add"), Some("r2"));
    assert_eq!(r.header("x-echo-pod"), None);

    let r = get(&c, &u("/redir/x?q=1")).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://example.org/redir/x?q=1"));
    let r = get(&c, &u("/redir-port/x")).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://127.0.0.1:8443/new/x"));
    let r = get(&c, &u("/redir-full/abc")).await;
    assert_eq!(r.header("location"), Some(format!("http://127.0.0.1:{port}/full").as_str()));

    let e = get(&c, &u("/rw/x?k=v")).await.echo();
    assert_eq!((e.path.as_str(), e.query.as_str(), e.host.as_str()), ("/v2/x", "k=v", "rewritten.example"));
    let e = get(&c, &u("/rw")).await.echo();
    assert_eq!(e.path, "/v2");
    let e = get(&c, &u("/rwfull/a/b")).await.echo();
    assert_eq!(e.path, "/only");
    let e = get(&c, &u("/perbackend")).await.echo();
    assert_eq!(e.header("x-backend"), Some("a"));
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));

    let r = send(&c, "GET", &u("/mirror/m1"), &[("x-trace", "t1")]).await;
    assert_eq!(r.echo().path, "/mirror/m1", "the primary backend answers");
    let (uri, headers, body) = tokio::time::timeout(Duration::from_secs(20), mirrored.recv()).await.expect("mirror copy arrives").unwrap();
    assert_eq!(uri, "/mirror/m1");
    assert_eq!(headers.get("x-trace").unwrap(), "t1");
    assert_eq!(headers.get("x-fjord-mirror").unwrap(), "1");
    assert!(body.is_empty());
    // with a body: the mirror gets a copy of it, the primary gets all of it
    let payload = Bytes::from(vec![b'z'; 100_000]);
    let req = http::Request::builder()
        .method("POST")
        .uri(u("/mirror/m2"))
        .body(http_body_util::Full::new(payload.clone()).map_err(|n| match n {}).boxed())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let e: fjord_gateway::echo::EchoReply = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(e.body_bytes, 100_000);
    let (uri, _, body) = tokio::time::timeout(Duration::from_secs(20), mirrored.recv()).await.expect("mirror copy arrives").unwrap();
    assert_eq!(uri, "/mirror/m2");
    assert_eq!(body, payload);

    assert_eq!(send(&c, "GET", &u("/slow"), &[("x-echo-delay-ms", "3000")]).await.status, 504);
    assert_eq!(send(&c, "GET", &u("/slowbackend"), &[("x-echo-delay-ms", "3000")]).await.status, 504);
    assert_eq!(send(&c, "GET", &u("/slow"), &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_zero_missing_backends_and_no_endpoints() {
    let a = echo("a", "default").await;
    let b = echo("b", "default").await;
    let port = free_port();
    let r = route(
        "w",
        "default",
        "gw",
        r#"  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 5}]
  - matches: [{path: {value: /allzero}}]
    backendRefs: [{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 0}]
  - matches: [{path: {value: /missing}}]
    backendRefs: [{name: a, port: 80}, {name: does-not-exist, port: 80}]
  - matches: [{path: {value: /badport}}]
    backendRefs: [{name: a, port: 80}, {name: b, port: 9999}]
  - matches: [{path: {value: /noeps}}]
    backendRefs: [{name: empty, port: 80}]
  - matches: [{path: {value: /nobackends}}]"#,
    );
    let (_gw, st) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service("b", "default", 80, &[b]),
        static_service("empty", "default", 80, &[]),
        r,
    ])
    .await;
    let rr = find_condition(&st.http_routes["default/w"].parents[0].conditions, "ResolvedRefs").unwrap();
    assert_eq!((rr.status.as_str(), rr.reason.as_str()), ("False", "BackendNotFound"));
    let c = client();
    let u = |p: &str| format!("http://127.0.0.1:{port}{p}");
    for _ in 0..20 {
        assert_eq!(get(&c, &u("/zero")).await.echo().pod, "b");
        assert_eq!(get(&c, &u("/allzero")).await.status, 500);
        assert_eq!(get(&c, &u("/nobackends")).await.status, 500);
        assert_eq!(get(&c, &u("/noeps")).await.status, 503);
    }
    for path in ["/missing", "/badport"] {
        let mut by_status: HashMap<u16, usize> = HashMap::new();
        for _ in 0..100 {
            let r = get(&c, &u(path)).await;
            if r.status == 200 {
                assert_eq!(r.echo().pod, "a");
            }
            *by_status.entry(r.status).or_default() += 1;
        }
        assert_eq!(by_status.get(&200), Some(&50), "{path}: {by_status:?}");
        assert_eq!(by_status.get(&500), Some(&50), "{path}: {by_status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_h2c_from_clients_and_to_backends() {
    let a = echo("a", "default").await;
    let port = free_port();
    let r = route("h", "default", "gw", "  - matches: [{path: {value: /h1}}]\n    backendRefs: [{name: a, port: 80}]\n  - matches: [{path: {value: /h2}}]\n    backendRefs: [{name: a2, port: 80}]");
    let (_gw, _) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service_h2c("a2", "default", 80, &[a]),
        r,
    ])
    .await;
    let h2 = h2c_client();
    let r = get(&h2, &format!("http://127.0.0.1:{port}/h1/x")).await;
    assert_eq!(r.version, http::Version::HTTP_2);
    let e = r.echo();
    assert_eq!(e.protocol, "HTTP/1.1", "HTTP/1.1 to a plain backend");
    assert_eq!(e.host, format!("127.0.0.1:{port}"), "authority becomes Host");
    let r = get(&h2, &format!("http://127.0.0.1:{port}/h2/x")).await;
    assert_eq!(r.echo().protocol, "HTTP/2.0", "h2c to an appProtocol kubernetes.io/h2c backend");
    let r = get(&client(), &format!("http://127.0.0.1:{port}/h2/y")).await;
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(r.echo().protocol, "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_nothing_and_changes_are_visible_immediately() {
    let a = echo("a", "default").await;
    let b = echo("b", "default").await;
    let port = free_port();
    let docs = |target: &str, extra_path: &str| {
        vec![
            class_and_gateway("gw", "default", port),
            static_service("a", "default", 80, &[a]),
            static_service("b", "default", 80, &[b]),
            route(
                "load",
                "default",
                "gw",
                &format!("  - matches: [{{path: {{value: /load}}}}]\n    backendRefs: [{{name: {target}, port: 80}}]\n  - matches: [{{path: {{value: {extra_path}}}}}]\n    backendRefs: [{{name: {target}, port: 80}}]"),
            ),
        ]
    };
    let (gw, _) = gateway(&docs("a", "/v0")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let c = client();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // slow-ish requests so that swaps happen while requests are in flight
                let r = send(&c, "GET", &format!("http://127.0.0.1:{port}/load"), &[("x-echo-delay-ms", "5")]).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let c = client();
    for i in 1..=40 {
        let target = if i % 2 == 0 { "a" } else { "b" };
        let path = format!("/v{i}");
        let (t, _) = build_docs(&docs(target, &path));
        gw.apply(t).await.unwrap();
        // the very next request sees the new table (no propagation delay at all)
        let r = get(&c, &format!("http://127.0.0.1:{port}{path}")).await;
        assert_eq!(r.status, 200, "new route {path} visible right after apply");
        assert_eq!(r.echo().pod, target);
        let old = get(&c, &format!("http://127.0.0.1:{port}/v{}", i - 1)).await;
        assert_eq!(old.status, 404, "old route gone");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    println!("under reload: {} ok, {} failed", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 0, "the load actually ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_bodies_both_ways_and_websocket_upgrade() {
    let (_gw, port) = one_backend_gateway().await;
    // Streaming: each chunk must come back before the next is sent; a proxy that buffered
    // whole bodies would deadlock here (the outer timeout turns that into a failure).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, hyper::Error>>(1);
    let body = http_body_util::StreamBody::new(futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    }));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/stream"))
        .header("x-echo-stream", "1")
        .body(body.boxed())
        .unwrap();
    let c = client();
    tokio::time::timeout(Duration::from_secs(20), async {
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"one")))).await.unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while got.len() < 3 {
            let f = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(f.data_ref().unwrap());
        }
        assert_eq!(&got, b"one");
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"two")))).await.unwrap();
        got.clear();
        while got.len() < 3 {
            let f = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(f.data_ref().unwrap());
        }
        assert_eq!(&got, b"two");
        drop(tx);
    })
    .await
    .expect("streamed chunk by chunk");

    // WebSocket-style Upgrade passes through and bytes flow both ways.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
    })
    .await
    .expect("101 head");
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping-through-gateway").await.unwrap();
    let mut buf = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ping-through-gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_refused_with_conditions_and_disturb_nothing() {
    let a = echo("a", "default").await;
    let o = echo("o", "other").await;
    let port = free_port();
    let conflicting = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: late, namespace: default, creationTimestamp: \"2099-01-01T00:00:00Z\"}}\nspec:\n  gatewayClassName: fjord\n  listeners:\n  - {{name: clash, port: {port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: x}}]}}}}\n"
    );
    let (gw, st) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service("o", "other", 80, &[o]),
        route("good", "default", "gw", "  - matches: [{path: {value: /good}}]\n    backendRefs: [{name: a, port: 80}]"),
        route("regex", "default", "gw", "  - matches: [{path: {type: RegularExpression, value: \"/r(\"}}]\n    backendRefs: [{name: a, port: 80}]"),
        route("filter", "default", "gw", "  - matches: [{path: {value: /f}}]\n    filters: [{type: CORS, cors: {}}]\n    backendRefs: [{name: a, port: 80}]"),
        route("xns", "default", "gw", "  - matches: [{path: {value: /xns}}]\n    backendRefs: [{name: o, namespace: other, port: 80}]"),
        conflicting,
    ])
    .await;
    let c = |r: &str, t: &str| find_condition(&st.http_routes[r].parents[0].conditions, t).unwrap().clone();
    assert_eq!(c("default/regex", "Accepted").reason, "UnsupportedValue");
    assert_eq!(c("default/filter", "Accepted").reason, "UnsupportedValue");
    assert!(c("default/filter", "Accepted").message.contains("CORS"));
    assert_eq!(c("default/xns", "ResolvedRefs").reason, "RefNotPermitted");
    let late = &st.gateways["default/late"].listeners[0];
    let conflicted = find_condition(&late.conditions, "Conflicted").unwrap();
    assert_eq!((conflicted.status.as_str(), conflicted.reason.as_str()), ("True", "ProtocolConflict"));
    assert!(c("default/good", "Accepted").is_true());

    let cl = client();
    let u = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(get(&cl, &u("/good")).await.echo().pod, "a");
    assert_eq!(get(&cl, &u("/r(")).await.status, 404);
    assert_eq!(get(&cl, &u("/f")).await.status, 404);
    assert_eq!(get(&cl, &u("/xns")).await.status, 500, "unpermitted cross-namespace ref answers 500");

    // A ReferenceGrant fixes the cross-namespace ref without touching the rest.
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: allow, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: \"\", kind: Service, name: o}]\n";
    let (t, st) = build_docs(&[
        class_and_gateway("gw", "default", port),
        static_service("a", "default", 80, &[a]),
        static_service("o", "other", 80, &[o]),
        route("good", "default", "gw", "  - matches: [{path: {value: /good}}]\n    backendRefs: [{name: a, port: 80}]"),
        route("xns", "default", "gw", "  - matches: [{path: {value: /xns}}]\n    backendRefs: [{name: o, namespace: other, port: 80}]"),
        grant.to_string(),
    ]);
    assert!(find_condition(&st.http_routes["default/xns"].parents[0].conditions, "ResolvedRefs").unwrap().is_true());
    gw.apply(t).await.unwrap();
    assert_eq!(get(&cl, &u("/xns")).await.echo().pod, "o");
    assert_eq!(get(&cl, &u("/good")).await.echo().pod, "a");
}

/// A backend that counts accepted TCP connections; `close: true` answers every request with
/// `Connection: close` (so pooled connections go stale).
async fn counting_backend(close: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            acc.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| async move {
                    let mut r = http::Response::new(http_body_util::Full::new(Bytes::from_static(b"counted")));
                    if close {
                        r.headers_mut().insert("connection", http::HeaderValue::from_static("close"));
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
            });
        }
    });
    (a, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_kept_alive_and_stale_ones_are_replaced() {
    let (keep, keep_accepts) = counting_backend(false).await;
    let (close, close_accepts) = counting_backend(true).await;
    let port = free_port();
    let (_gw, _) = gateway(&[
        class_and_gateway("gw", "default", port),
        static_service("keep", "default", 80, &[keep]),
        static_service("close", "default", 80, &[close]),
        route(
            "k",
            "default",
            "gw",
            "  - matches: [{path: {value: /keep}}]\n    backendRefs: [{name: keep, port: 80}]\n  - matches: [{path: {value: /close}}]\n    backendRefs: [{name: close, port: 80}]",
        ),
    ])
    .await;
    let c = client();
    for _ in 0..50 {
        let r = get(&c, &format!("http://127.0.0.1:{port}/keep")).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"counted"[..]));
    }
    assert_eq!(keep_accepts.load(Ordering::SeqCst), 1, "sequential requests reuse one backend connection");
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/close")).await.status, 200);
    }
    assert_eq!(close_accepts.load(Ordering::SeqCst), 20, "a closed backend connection is never reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let (gw, port) = one_backend_gateway().await;
    let c = client();
    // warm a keep-alive connection, then start a slow request on it
    assert_eq!(get(&c, &format!("http://127.0.0.1:{port}/warm")).await.status, 200);
    let c2 = c.clone();
    let slow = tokio::spawn(async move { send(&c2, "GET", &format!("http://127.0.0.1:{port}/slow"), &[("x-echo-delay-ms", "500")]).await });
    // wait until the request is in flight (the gateway counts it as an open connection)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !gw.metrics().encode().contains("fjord_gateway_requests_total{route=\"default/g/0\"") {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.shutdown(Duration::from_secs(20)).await;
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request finished during graceful shutdown");
    assert_eq!(r.echo().path, "/slow");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "listener closed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_round_robin_and_least_request() {
    let e1 = echo("ep1", "default").await;
    let e2 = echo("ep2", "default").await;
    let port_rr = free_port();
    let port_lr = free_port();
    let docs = |port: u16| {
        [
            class_and_gateway("gw", "default", port),
            static_service("svc", "default", 80, &[e1, e2]),
            route("r", "default", "gw", "  - backendRefs: [{name: svc, port: 80}]"),
        ]
        .join("---\n")
    };
    let mk = |policy| fjord_gateway::Gateway::new(fjord_gateway::GatewayOptions {
        listen_ip: "127.0.0.1".parse().unwrap(),
        access_log: false,
        lb_policy: policy,
        ..Default::default()
    });
    let rr = mk(fjord_gateway::LbPolicy::RoundRobin);
    let objs = fjord_gateway::ObjectSet::from_yaml("t", &docs(port_rr)).unwrap();
    rr.reconcile(&objs, &fjord_gateway::StaticResolver::new(&objs.static_services)).await.unwrap();
    let lr = mk(fjord_gateway::LbPolicy::LeastRequest);
    let objs = fjord_gateway::ObjectSet::from_yaml("t", &docs(port_lr)).unwrap();
    lr.reconcile(&objs, &fjord_gateway::StaticResolver::new(&objs.static_services)).await.unwrap();

    let c = client();
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get(&c, &format!("http://127.0.0.1:{port_rr}/")).await.echo().pod);
    }
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "round-robin alternates: {seen:?}");

    // least-request: while one request is stuck on an endpoint, everything else goes to the other
    let c2 = c.clone();
    let slow = tokio::spawn(async move { send(&c2, "GET", &format!("http://127.0.0.1:{port_lr}/slow"), &[("x-echo-delay-ms", "1500")]).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let busy_pod = loop {
        // find which endpoint holds the slow request
        let t = lr.table();
        let entry = t.ports[&port_lr].listeners[0]
            .find(&fjord_gateway::table::RequestView {
                host: "127.0.0.1",
                path: "/",
                method: &http::Method::GET,
                headers: &http::HeaderMap::new(),
                query: &[],
            })
            .cloned()
            .unwrap();
        let b = match entry.rule.backends.choices[0].1.as_ref() {
            fjord_gateway::table::BackendChoice::Ready(b) => b.clone(),
            o => panic!("{o:?}"),
        };
        if b.in_flight(0) == 1 {
            break "ep1";
        }
        if b.in_flight(1) == 1 {
            break "ep2";
        }
        assert!(std::time::Instant::now() < deadline, "slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for _ in 0..10 {
        let p = get(&c, &format!("http://127.0.0.1:{port_lr}/fast")).await.echo().pod;
        assert_ne!(p, busy_pod, "least-request avoids the busy endpoint");
    }
    assert_eq!(slow.await.unwrap().echo().pod, busy_pod);
}

/// nginx-style workers: two single-threaded runtimes on their own threads, each with its own
/// SO_REUSEPORT socket per listener port (two listening sockets on the port). New connections
/// are all answered, HTTP/1.1 and h2c, and removing the listener closes both sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_worker_reuseport_listeners_serve_and_stop_together() {
    let a = echo("a", "default").await;
    let port = free_port();
    let mut workers = vec![];
    let mut stops = vec![];
    for i in 0..2 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        workers.push(rt.handle().clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        std::thread::Builder::new().name(format!("test-worker-{i}")).spawn(move || rt.block_on(async { let _ = rx.await; })).unwrap();
    }
    use fjord_gateway::{Gateway, GatewayOptions, ObjectSet, StaticResolver};
    let gw = Gateway::new(GatewayOptions { listen_ip: "127.0.0.1".parse().unwrap(), access_log: false, workers, ..Default::default() });
    let docs = [class_and_gateway("gw", "default", port), static_service("a", "default", 80, &[a]), route("r", "default", "gw", "  - backendRefs: [{name: a, port: 80}]")];
    let objs = ObjectSet::from_yaml("test", &docs.join("---\n")).unwrap();
    gw.reconcile(&objs, &StaticResolver::new(&objs.static_services)).await.expect("apply");
    // fresh connections (one client per request): every one is answered, whichever worker's
    // socket the kernel picked
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_hex = format!("0100007F:{port:04X}");
    let sockets = listening.lines().filter(|l| l.split_whitespace().nth(1) == Some(port_hex.as_str()) && l.split_whitespace().nth(3) == Some("0A")).count();
    assert_eq!(sockets, 2, "one listening socket per worker");
    for i in 0..200 {
        let r = get(&client(), &format!("http://127.0.0.1:{port}/x/{i}")).await;
        assert_eq!(r.status, 200, "request {i}");
    }
    // an HTTP/2-only (prior knowledge) client gets an answer only if the worker spoke h2c
    let r = get(&h2c_client(), &format!("http://127.0.0.1:{port}/h2")).await;
    assert_eq!(r.status, 200);
    // the listener goes away: both sockets close
    gw.apply(fjord_gateway::RoutingTable::default()).await.unwrap();
    let gone = async {
        loop {
            let t = std::fs::read_to_string("/proc/net/tcp").unwrap();
            if !t.lines().any(|l| l.split_whitespace().nth(1) == Some(port_hex.as_str()) && l.split_whitespace().nth(3) == Some("0A")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), gone).await.expect("both worker sockets closed");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    for s in stops {
        let _ = s.send(());
    }
}

/// Listeners use TCP_DEFER_ACCEPT: a client that connects and sends nothing is not handed to
/// the proxy (no task, no open connection counted), so a new connection costs the proxy one
/// wake-up (accept + read of its first bytes); once the client speaks it is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_wait_in_the_kernel_until_the_client_speaks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, port) = one_backend_gateway().await;
    let open = || {
        let text = gw.metrics().encode();
        text.lines().find(|l| l.starts_with("fjord_gateway_active_connections ")).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap_or(-1.0)
    };
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("the handshake completes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(open(), 0.0, "a connection that sent nothing is not accepted yet");
    silent.write_all(b"GET /late HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut resp)).await.expect("answered").unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"/late\""), "the echo backend saw the request: {resp}");
}
