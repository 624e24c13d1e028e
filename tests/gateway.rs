//! Gateway API end to end on a dev cluster: `fjordctl apply` of GatewayClass/Gateway/HTTPRoute
//! + Services → the agent's store → the gateway on node1 (agent `--gateway`) → echo backends
//! (`fjord-echo`) in pod namespaces, with requests from the cluster's external namespace to the
//! node's underlay address. Real processes, real store, real HTTP.
use fjord_e2e::*;
use fjord_net::netns;
use fjordctl::pod;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GW_PORT: u16 = 8080;

const SEED: &str = concat!(
    r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fjord}
spec: {controllerName: fjord.dev/gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: external-gateway, namespace: backend}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
"#,
    fjord_gateway::seed_httproute!(),
    r#"---
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: backend}
spec:
  selector: {app: backend, version: v1}
  ports: [{name: http, port: 8080, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v2, namespace: backend}
spec:
  selector: {app: backend, version: v2}
  ports: [{name: http, port: 8080, targetPort: 9000}]
"#
);

/// Child processes (echo backends) killed on drop, also when the test panics. Declared after
/// the cluster, so they go before it.
#[derive(Default)]
struct Procs(Vec<std::process::Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start `fjord-echo` inside a pod's network namespace on port 9000.
fn echo_in(procs: &mut Procs, p: &pod::PodInfo) {
    let mut cmd = std::process::Command::new(bin_dir().join("fjord-echo"));
    cmd.args(["--listen", "0.0.0.0:9000", "--pod", &p.name, "--namespace", &p.namespace])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    netns::command_in(&mut cmd, &pod_netns(p)).unwrap();
    procs.0.push(cmd.spawn().expect("start fjord-echo (cargo build --workspace --bins)"));
}

/// fjordctl (the binary) against the test cluster: (exit code, stdout, stderr).
fn fjordctl(c: &TestCluster, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin_dir().join("fjordctl"))
        .env("FJORD_HOME", &c.home.dir)
        .arg("--cluster")
        .arg(&c.state.name)
        .args(args)
        .output()
        .expect("run fjordctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `fjordctl apply -f` of a manifest text.
fn apply(c: &TestCluster, text: &str) -> (i32, String, String) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    fjordctl(c, &["apply", "-f", &f.path().display().to_string()])
}

/// A keep-alive HTTP/1.1 client connection opened from namespace `ns`.
struct Conn {
    tx: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Conn {
    async fn open(ns: &Path, addr: SocketAddr) -> std::io::Result<Conn> {
        let s = tcp_connect_in(ns, addr)?;
        s.set_nonblocking(true)?;
        let s = tokio::net::TcpStream::from_std(s)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Conn { tx })
    }

    /// GET `path`: status and the echo's pod name (None if the answer is not from an echo).
    async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Option<String>)> {
        let req = hyper::Request::get(path).header("host", "gw.example").body(Empty::new())?;
        self.tx.ready().await?;
        let r = self.tx.send_request(req).await?;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await?.to_bytes();
        let pod = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["pod"].as_str().map(str::to_string));
        Ok((status, pod))
    }
}

struct Setup {
    c: TestCluster,
    ext: PathBuf,
    gw: SocketAddr,
    procs: Procs,
}

/// A cluster with pods backend/v1a (app=backend,version=v1) and backend/v2a (v2), each running
/// fjord-echo on :9000, and the seed applied with fjordctl; waits until /api/v2 is served.
async fn setup() -> Setup {
    let c = TestCluster::up().await;
    let mut procs = Procs::default();
    for (name, v) in [("v1a", "v1"), ("v2a", "v2")] {
        let labels: BTreeMap<String, String> = [("app".to_string(), "backend".to_string()), ("version".to_string(), v.to_string())].into();
        let p = pod::add(&c.state, None, &format!("backend/{name}"), labels).await.unwrap();
        echo_in(&mut procs, &p);
    }
    let (code, out, err) = apply(&c, SEED);
    assert_eq!(code, 0, "apply: {out}{err}");
    assert!(out.contains("httproute/backend/production-traffic-split configured"), "{out}");
    let ext = netns::path(&c.state.ext_netns);
    let gw = SocketAddr::new(c.node().address.into(), GW_PORT);
    // The gateway listens on the node's underlay address; both endpoints become ready.
    let ok = eventually(Duration::from_secs(30), || {
        let ext = ext.clone();
        async move {
            let mut conn = Conn::open(&ext, gw).await.ok()?;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let (st, p) = conn.get("/api/v2/ready").await.ok()?;
                if st == 200 {
                    seen.insert(p?);
                }
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;
    assert!(ok.is_some(), "gateway at {gw} never served both backends; agent log:\n{}", agent_log(&c));
    Setup { c, ext, gw, procs }
}

fn agent_log(c: &TestCluster) -> String {
    let log = std::fs::read_to_string(c.node().dir.join("agent.log")).unwrap_or_default();
    log.lines().filter(|l| !l.contains("fjord_gateway::access")).rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// `fjordctl get httproutes NAME -n NS -o json` → the route's first parent's conditions by type.
fn route_conditions(c: &TestCluster, ns: &str, name: &str) -> BTreeMap<String, serde_json::Value> {
    let (code, out, err) = fjordctl(c, &["get", "httproutes", name, "-n", ns, "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["status"]["parents"][0]["conditions"]
        .as_array()
        .map(|a| a.iter().map(|c| (c["type"].as_str().unwrap_or("").to_string(), c.clone())).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_route_split_404_route_change_status_and_bad_input() {
    let Setup { c, ext, gw, procs: _procs } = setup().await;

    // --- the seed: 90/10 over 10,000 requests from the external namespace, 404 elsewhere
    let mut conn = Conn::open(&ext, gw).await.unwrap();
    let n = 10_000;
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let t0 = Instant::now();
    for i in 0..n {
        let (st, p) = conn.get(&format!("/api/v2/items/{i}")).await.unwrap();
        assert_eq!(st, 200, "request {i}");
        *counts.entry(p.unwrap_or_default()).or_default() += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let v1 = *counts.get("v1a").unwrap_or(&0) as f64 * 100.0 / n as f64;
    let v2 = *counts.get("v2a").unwrap_or(&0) as f64 * 100.0 / n as f64;
    println!("split over {n} requests from ext: v1 {v1:.2}% v2 {v2:.2}% ({:.0} req/s on one keep-alive connection)", n as f64 / secs);
    assert!((v1 - 90.0).abs() <= 1.5 && (v2 - 10.0).abs() <= 1.5, "{counts:?}");
    for path in ["/", "/api", "/api/v2x", "/api/v1/items"] {
        assert_eq!(conn.get(path).await.unwrap().0, 404, "{path}");
    }
    // curl from the external namespace, as a user would (fjordctl cluster exec)
    let url = format!("http://{gw}/api/v2/hello");
    let (code, out, err) = fjordctl(&c, &["cluster", "exec", "--", "curl", "-s", "-m", "5", &url]);
    assert_eq!(code, 0, "curl: {out}{err}");
    assert!(out.contains("\"pod\":\"v1a\"") || out.contains("\"pod\":\"v2a\""), "{out}");

    // --- status in the store, shown by fjordctl get (yaml includes status)
    let yaml = eventually(Duration::from_secs(10), || async {
        let (code, yaml, _) = fjordctl(&c, &["get", "httproutes", "production-traffic-split", "-n", "backend", "-o", "yaml"]);
        (code == 0 && yaml.contains("observedGeneration: 1")).then_some(yaml)
    })
    .await
    .expect("route status in `get httproutes -o yaml`");
    for want in ["status:", "type: Accepted", "reason: Accepted", "type: ResolvedRefs", "reason: ResolvedRefs", "observedGeneration: 1", "controllerName: fjord.dev/gateway"] {
        assert!(yaml.contains(want), "{want:?} missing in:\n{yaml}");
    }
    let (code, gws, _) = fjordctl(&c, &["get", "gateways", "-n", "backend", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(gws.contains(&format!("value: {}", c.node().address)) && gws.contains("type: Programmed"), "{gws}");
    let (_, wide, _) = fjordctl(&c, &["get", "gateways", "-n", "backend", "-o", "wide"]);
    assert!(wide.contains("external-gateway") && wide.contains("http:8080/HTTP routes=1"), "{wide}");

    // --- a route change through the store becomes visible (watch-driven); measure apply → served
    let mut lat = vec![];
    for round in 0..10 {
        let (to, weights) = if round % 2 == 0 { ("v2a", ("0", "1")) } else { ("v1a", ("1", "0")) };
        let text = SEED.replace("weight: 90", &format!("weight: {}", weights.0)).replace("weight: 10", &format!("weight: {}", weights.1));
        let t = Instant::now();
        c.client().apply(&text).await.unwrap();
        let applied = t.elapsed();
        let seen = eventually(Duration::from_secs(10), || {
            let ext = ext.clone();
            async move {
                let mut conn = Conn::open(&ext, gw).await.ok()?;
                let deadline = Instant::now() + Duration::from_millis(500);
                while Instant::now() < deadline {
                    if conn.get("/api/v2/x").await.ok()?.1.as_deref() == Some(to) {
                        return Some(t.elapsed());
                    }
                }
                None
            }
        })
        .await
        .unwrap_or_else(|| panic!("route change to {to} never became visible; agent log:\n{}", agent_log(&c)));
        lat.push((applied.as_secs_f64() * 1000.0, seen.as_secs_f64() * 1000.0));
    }
    let mut vis: Vec<f64> = lat.iter().map(|l| l.1).collect();
    vis.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut api: Vec<f64> = lat.iter().map(|l| l.0).collect();
    api.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "route change apply -> served (10 changes): p50 {:.1} ms, max {:.1} ms (of which the apply API call: p50 {:.1} ms)",
        percentile(&vis, 50.0),
        vis[vis.len() - 1],
        percentile(&api, 50.0)
    );
    // The status is written right after the table swap (so it may trail the served change).
    let gen11 = eventually(Duration::from_secs(10), || async {
        (route_conditions(&c, "backend", "production-traffic-split").get("Accepted")?["observedGeneration"] == 11).then_some(())
    })
    .await;
    assert!(gen11.is_some(), "status never reached observedGeneration 11: {:?}", route_conditions(&c, "backend", "production-traffic-split"));

    // --- bad input: refused as a whole, names document and field; nothing applied
    let extra = "---\napiVersion: v1\nkind: Service\nmetadata: {name: extra, namespace: backend}\nspec:\n  ports: [{port: 80}]\n";
    let bad_regex = format!("{}{extra}", SEED.replace("type: PathPrefix\n        value: /api/v2", "type: RegularExpression\n        value: /api/(v2"));
    let (code, out, err) = apply(&c, &bad_regex);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("document 3") && err.contains("spec.rules[0].matches[0].path.value") && err.contains("invalid regular expression"), "{err}");
    let bad_filter = format!("{}{extra}", SEED.replace("    backendRefs:\n    - name: backend-v1", "    filters:\n    - type: Teleport\n    backendRefs:\n    - name: backend-v1"));
    let (code, _, err) = apply(&c, &bad_filter);
    assert_ne!(code, 0);
    assert!(err.contains("spec.rules[0].filters[0].type") && err.contains("unsupported filter type `Teleport`"), "{err}");
    let (code, _, err) = fjordctl(&c, &["get", "svc", "extra", "-n", "backend"]);
    assert_ne!(code, 0, "the Service of a refused file must not exist: {err}");
    let conds = route_conditions(&c, "backend", "production-traffic-split");
    assert_eq!(conds["Accepted"]["observedGeneration"], 11, "the route is unchanged: {conds:?}");
    let (st, p) = Conn::open(&ext, gw).await.unwrap().get("/api/v2/x").await.unwrap();
    assert_eq!((st, p.as_deref()), (200, Some("v1a")), "the last good route keeps serving");

    // --- delete: the route goes away, its status too
    let route_only = SEED.split("---").find(|d| d.contains("kind: HTTPRoute")).unwrap().to_string();
    let (code, out, err) = {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &route_only).unwrap();
        fjordctl(&c, &["delete", "-f", &f.path().display().to_string()])
    };
    assert_eq!(code, 0, "{out}{err}");
    let gone = eventually(Duration::from_secs(10), || {
        let ext = ext.clone();
        async move { (Conn::open(&ext, gw).await.ok()?.get("/api/v2/x").await.ok()?.0 == 404).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "deleted route still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_namespace_ref_needs_grant_and_port_unavailable_leaves_others_serving() {
    let Setup { c, ext, gw, procs: _procs } = setup().await;

    // A route in another namespace pointing at backend/backend-v2 without a ReferenceGrant.
    let cross = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: sneaky, namespace: other}
spec:
  parentRefs: [{name: external-gateway, namespace: backend}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{name: backend-v2, namespace: backend, port: 8080}]
"#;
    let (code, out, err) = apply(&c, cross);
    assert_eq!(code, 0, "{out}{err}");
    let conds = eventually(Duration::from_secs(10), || async {
        let conds = route_conditions(&c, "other", "sneaky");
        (conds.get("ResolvedRefs")?["reason"] == "RefNotPermitted").then_some(conds)
    })
    .await
    .unwrap_or_else(|| panic!("no RefNotPermitted condition; {:?}", route_conditions(&c, "other", "sneaky")));
    assert_eq!(conds["ResolvedRefs"]["status"], "False");
    let msg = conds["ResolvedRefs"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("ReferenceGrant"), "{msg}");
    let mut conn = Conn::open(&ext, gw).await.unwrap();
    assert_eq!(conn.get("/other/x").await.unwrap().0, 500, "a backendRef that is not permitted answers 500");
    // other routes are not disturbed
    for _ in 0..20 {
        assert_eq!(conn.get("/api/v2/x").await.unwrap().0, 200);
    }
    // with a ReferenceGrant in the target namespace the reference resolves
    let grant = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-other, namespace: backend}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: other}]
  to: [{group: "", kind: Service}]
"#;
    let (code, out, err) = apply(&c, grant);
    assert_eq!(code, 0, "{out}{err}");
    let ok = eventually(Duration::from_secs(10), || {
        let ext = ext.clone();
        async move {
            let (st, p) = Conn::open(&ext, gw).await.ok()?.get("/other/x").await.ok()?;
            (st == 200 && p.as_deref() == Some("v2a")).then_some(())
        }
    })
    .await;
    assert!(ok.is_some(), "granted reference never served");
    let resolved = eventually(Duration::from_secs(10), || async {
        (route_conditions(&c, "other", "sneaky").get("ResolvedRefs")?["status"] == "True").then_some(())
    })
    .await;
    assert!(resolved.is_some(), "ResolvedRefs never True after the grant: {:?}", route_conditions(&c, "other", "sneaky"));

    // PortUnavailable: something else holds 8090 on the node's address.
    let node_addr = c.node().address;
    let blocker = tcp_listen_in(&c.node_netns(), &format!("{node_addr}:8090"));
    let two = SEED.replace(
        "  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}",
        "  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}\n  - {name: alt, port: 8090, protocol: HTTP}",
    );
    let (code, out, err) = apply(&c, &two);
    assert_eq!(code, 0, "{out}{err}");
    let listener = |yaml_json: &serde_json::Value, name: &str| -> Option<BTreeMap<String, serde_json::Value>> {
        let ls = yaml_json[0]["status"]["listeners"].as_array()?;
        let l = ls.iter().find(|l| l["name"] == name)?;
        Some(l["conditions"].as_array()?.iter().map(|c| (c["type"].as_str().unwrap_or("").to_string(), c.clone())).collect())
    };
    let get_gw = || {
        let (code, out, err) = fjordctl(&c, &["get", "gateways", "external-gateway", "-n", "backend", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let alt = eventually(Duration::from_secs(10), || async {
        let g = get_gw();
        let alt = listener(&g, "alt")?;
        (alt.get("Accepted")?["reason"] == "PortUnavailable").then_some(alt)
    })
    .await
    .unwrap_or_else(|| panic!("no PortUnavailable: {}", get_gw()));
    assert_eq!(alt["Accepted"]["status"], "False");
    assert_eq!(alt["Programmed"]["status"], "False");
    let g = get_gw();
    assert_eq!(listener(&g, "http").unwrap()["Programmed"]["status"], "True", "{g}");
    assert_eq!(
        g[0]["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Programmed").unwrap()["status"],
        "True",
        "the Gateway still serves its other listener"
    );
    for _ in 0..20 {
        assert_eq!(conn.get("/api/v2/x").await.unwrap().0, 200, "port 8080 keeps serving");
    }
    // the port is freed: the listener is retried and comes up
    drop(blocker);
    let up = eventually(Duration::from_secs(20), || async {
        let g = get_gw();
        (listener(&g, "alt")?.get("Programmed")?["status"] == "True").then_some(())
    })
    .await;
    assert!(up.is_some(), "listener alt never programmed after the port was freed: {}", get_gw());
    let (st, _) = Conn::open(&ext, SocketAddr::new(node_addr.into(), 8090)).await.unwrap().get("/api/v2/x").await.unwrap();
    assert_eq!(st, 200);
}

/// A self-signed certificate for `host` (openssl CLI, EC P-256, key in PKCS#8): (cert PEM path,
/// key PEM path), in `dir`.
fn self_signed(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join(format!("{host}.crt")), dir.join(format!("{host}.key")));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={host}"), "-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (crt, key)
}

fn b64_decode(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (vec![], 0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = acc << 6 | A.iter().position(|a| *a == c).unwrap_or(0) as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn b64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A `kubernetes.io/tls` Secret manifest (base64 `data`, as `kubectl create secret tls` writes it).
fn tls_secret(ns: &str, name: &str, crt: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&std::fs::read(crt).unwrap()),
        b64(&std::fs::read(key).unwrap())
    )
}

/// curl from the external namespace: HTTPS to `host:port` resolved to `addr`, verifying against
/// `ca`, with `--http1.1` or `--http2` (ALPN). (exit code, "<http_version> <body>").
fn curl_tls(ext: &Path, addr: std::net::IpAddr, host: &str, port: u16, ca: &Path, path: &str, http2: bool) -> (i32, String) {
    let resolve = format!("{host}:{port}:{addr}");
    let url = format!("https://{host}:{port}{path}");
    let ca = ca.display().to_string();
    let argv = ["curl", "-sS", "-m", "5", if http2 { "--http2" } else { "--http1.1" }, "--resolve", &resolve, "--cacert", &ca, "-w", " %{http_version}", &url];
    run_in_ns(ext, &argv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listeners_from_secrets_with_sni_alpn_and_bad_certificate_refs() {
    let Setup { c, ext, gw: _, procs: _procs } = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let (crt_a, key_a) = self_signed(dir.path(), "secure.example");
    let (crt_b, key_b) = self_signed(dir.path(), "other.example");
    let (crt_x, key_x) = self_signed(dir.path(), "foreign.example");
    const HTTPS_PORT: u16 = 8443;
    let manifest = format!(
        "{}---\n{}---\n{}---\n{}",
        tls_secret("backend", "secure-cert", &crt_a, &key_a),
        tls_secret("backend", "other-cert", &crt_b, &key_b),
        // a Secret in another namespace, no ReferenceGrant for it
        tls_secret("certs", "foreign-cert", &crt_x, &key_x),
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: tls-gateway, namespace: backend}
spec:
  gatewayClassName: fjord
  listeners:
  - name: secure
    port: 8443
    protocol: HTTPS
    hostname: secure.example
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: secure-cert}]}
  - name: other
    port: 8443
    protocol: HTTPS
    hostname: other.example
    tls: {certificateRefs: [{name: other-cert}]}
  - name: foreign
    port: 8443
    protocol: HTTPS
    hostname: foreign.example
    tls: {certificateRefs: [{name: foreign-cert, namespace: certs}]}
  - name: missing
    port: 8443
    protocol: HTTPS
    hostname: missing.example
    tls: {certificateRefs: [{name: no-such-secret}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: tls-route, namespace: backend}
spec:
  parentRefs: [{name: tls-gateway}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: backend-v2, port: 8080}]
"#
    );
    let (code, out, err) = apply(&c, &manifest);
    assert_eq!(code, 0, "apply: {out}{err}");
    assert!(out.contains("secret/backend/secure-cert") && out.contains("gateway/backend/tls-gateway"), "{out}");
    let addr: std::net::IpAddr = c.node().address.into();

    // HTTPS with SNI secure.example: curl verifies the chain against secure.example's own
    // certificate, so an answer proves the SNI picked the right one.
    let body = eventually(Duration::from_secs(20), || async {
        let (code, out) = curl_tls(&ext, addr, "secure.example", HTTPS_PORT, &crt_a, "/v1/hello", false);
        (code == 0).then_some(out)
    })
    .await
    .unwrap_or_else(|| {
        let (_, out) = curl_tls(&ext, addr, "secure.example", HTTPS_PORT, &crt_a, "/v1/hello", false);
        panic!("HTTPS never served: {out}\nagent log:\n{}", agent_log(&c))
    });
    let (json, version) = body.rsplit_once(' ').unwrap();
    assert_eq!(version, "1.1", "{body}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["pod"], "v1a", "{v}");
    assert_eq!(v["path"], "/v1/hello", "{v}");
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "https", "{v}");

    // HTTP/2 negotiated by ALPN, second rule → v2
    let (code, out) = curl_tls(&ext, addr, "secure.example", HTTPS_PORT, &crt_a, "/v2/h2", true);
    assert_eq!(code, 0, "{out}");
    let (json, version) = out.rsplit_once(' ').unwrap();
    assert_eq!(version, "2", "ALPN must negotiate h2: {out}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!((v["pod"].as_str(), v["path"].as_str()), (Some("v2a"), Some("/v2/h2")), "{v}");

    // SNI other.example: that listener's certificate (verified against its own CA file); the
    // first certificate does not verify for it, so the server really switched certificates.
    let (code, out) = curl_tls(&ext, addr, "other.example", HTTPS_PORT, &crt_b, "/v1/x", true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"pod\":\"v1a\"") && out.ends_with(" 2"), "{out}");
    let (code, out) = curl_tls(&ext, addr, "other.example", HTTPS_PORT, &crt_a, "/v1/x", false);
    assert_ne!(code, 0, "other.example must not be served with secure.example's certificate: {out}");
    let (code, out) = curl_tls(&ext, addr, "secure.example", HTTPS_PORT, &crt_b, "/v1/x", false);
    assert_ne!(code, 0, "secure.example must not be served with other.example's certificate: {out}");

    // Many requests on one connection over TLS (keep-alive, HTTP/2 multiplexed by curl)
    let url = format!("https://secure.example:{HTTPS_PORT}/v1/n");
    let resolve = format!("secure.example:{HTTPS_PORT}:{addr}");
    let ca = crt_a.display().to_string();
    let mut argv = vec!["curl", "-sS", "-m", "20", "--http2", "--resolve", &resolve, "--cacert", &ca, "-w", "\n%{http_code}\n"];
    for _ in 0..50 {
        argv.push(&url);
    }
    let (code, out) = run_in_ns(&ext, &argv);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 50, "{out}");

    // Listener conditions: the foreign Secret is RefNotPermitted, the missing one
    // InvalidCertificateRef; both are left out while the good ones are programmed.
    let get_gw = || {
        let (code, out, err) = fjordctl(&c, &["get", "gateways", "tls-gateway", "-n", "backend", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let cond = |g: &serde_json::Value, listener: &str, t: &str| -> Option<serde_json::Value> {
        let l = g[0]["status"]["listeners"].as_array()?.iter().find(|l| l["name"] == listener)?.clone();
        l["conditions"].as_array()?.iter().find(|c| c["type"] == t).cloned()
    };
    let g = eventually(Duration::from_secs(10), || async {
        let g = get_gw();
        (cond(&g, "missing", "ResolvedRefs")?["reason"] == "InvalidCertificateRef").then_some(g)
    })
    .await
    .unwrap_or_else(|| panic!("no listener status: {}", get_gw()));
    for (l, reason) in [("foreign", "RefNotPermitted"), ("missing", "InvalidCertificateRef")] {
        let rr = cond(&g, l, "ResolvedRefs").unwrap();
        assert_eq!((rr["status"].as_str(), rr["reason"].as_str()), (Some("False"), Some(reason)), "{l}: {rr}");
        assert_eq!(cond(&g, l, "Programmed").unwrap()["status"], "False", "{l}: {g}");
    }
    let msg = cond(&g, "foreign", "ResolvedRefs").unwrap()["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("certs/foreign-cert") && msg.contains("ReferenceGrant"), "{msg}");
    let msg = cond(&g, "missing", "ResolvedRefs").unwrap()["message"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("no-such-secret") && msg.contains("not found"), "{msg}");
    for l in ["secure", "other"] {
        assert_eq!(cond(&g, l, "Programmed").unwrap()["status"], "True", "{l}: {g}");
        assert_eq!(cond(&g, l, "ResolvedRefs").unwrap()["status"], "True", "{l}: {g}");
    }
    // An SNI of a listener that is not programmed gets no certificate: the handshake fails.
    let (code, out) = curl_tls(&ext, addr, "foreign.example", HTTPS_PORT, &crt_x, "/v1/x", false);
    assert_ne!(code, 0, "foreign.example must not be served without a ReferenceGrant: {out}");

    // A ReferenceGrant in the Secret's namespace lets the listener use it.
    let grant = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gateways-may-use-certs, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: backend}]
  to: [{group: "", kind: Secret}]
"#;
    let (code, out, err) = apply(&c, grant);
    assert_eq!(code, 0, "{out}{err}");
    let served = eventually(Duration::from_secs(10), || async {
        let (code, out) = curl_tls(&ext, addr, "foreign.example", HTTPS_PORT, &crt_x, "/v2/x", true);
        (code == 0 && out.contains("\"pod\":\"v2a\"")).then_some(())
    })
    .await;
    assert!(served.is_some(), "granted Secret never served; {}", get_gw());
    let ok = eventually(Duration::from_secs(10), || async {
        (cond(&get_gw(), "foreign", "ResolvedRefs")?["status"] == "True").then_some(())
    })
    .await;
    assert!(ok.is_some(), "ResolvedRefs never True after the grant: {}", get_gw());
    // The missing Secret appears: its listener comes up too.
    let (crt_m, key_m) = self_signed(dir.path(), "missing.example");
    let (code, out, err) = apply(&c, &tls_secret("backend", "no-such-secret", &crt_m, &key_m));
    assert_eq!(code, 0, "{out}{err}");
    let served = eventually(Duration::from_secs(10), || async {
        let (code, out) = curl_tls(&ext, addr, "missing.example", HTTPS_PORT, &crt_m, "/v1/x", false);
        (code == 0 && out.contains("\"pod\":\"v1a\"")).then_some(())
    })
    .await;
    assert!(served.is_some(), "listener never served after its Secret was applied; {}", get_gw());
    // secure.example kept working throughout
    let (code, out) = curl_tls(&ext, addr, "secure.example", HTTPS_PORT, &crt_a, "/v1/still", true);
    assert_eq!(code, 0, "{out}");
    println!("https: SNI x2, ALPN h2/http1.1, RefNotPermitted, InvalidCertificateRef, grant + late Secret: ok ({out})");
}

/// Both nodes of a 2-node etcd cluster run the gateway (`--gateway` on every agent); backend
/// pods: v1a on node2, v2a on node1. Requests from the external namespace to either node's
/// address reach both (node1's gateway → v1a crosses to node2). Exactly one agent holds the
/// status lease and writes status (listing both nodes' addresses); when it is killed, the
/// other takes over after the lease TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_two_nodes_gateway_on_both_cross_node_backend_one_status_writer() {
    let args = ["--gateway", "--gateway-status-lease-ttl", "3s"].map(String::from).to_vec();
    let c = TestCluster::up_full(2, "etcd", "native", args).await;
    let mut procs = Procs::default();
    for (name, v, node) in [("v1a", "v1", "node2"), ("v2a", "v2", "node1")] {
        let labels: BTreeMap<String, String> = [("app".to_string(), "backend".to_string()), ("version".to_string(), v.to_string())].into();
        let node_name = c.state.nodes.iter().find(|n| n.name == node).map(|n| n.name.clone()).unwrap_or_else(|| panic!("no {node}"));
        let p = pod::add(&c.state, Some(&node_name), &format!("backend/{name}"), labels).await.unwrap();
        assert_eq!(p.node, node_name);
        echo_in(&mut procs, &p);
    }
    let (code, out, err) = apply(&c, SEED);
    assert_eq!(code, 0, "apply: {out}{err}");
    let ext = netns::path(&c.state.ext_netns);
    let addrs: Vec<SocketAddr> = (0..2).map(|i| SocketAddr::new(c.node_n(i).address.into(), GW_PORT)).collect();
    for gw in &addrs {
        let ok = eventually(Duration::from_secs(30), || {
            let ext = ext.clone();
            let gw = *gw;
            async move {
                let mut conn = Conn::open(&ext, gw).await.ok()?;
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..40 {
                    let (st, p) = conn.get("/api/v2/ready").await.ok()?;
                    if st == 200 {
                        seen.insert(p?);
                    }
                }
                (seen.len() == 2).then_some(())
            }
        })
        .await;
        assert!(ok.is_some(), "gateway at {gw} never served both backends; agent log:\n{}", agent_log(&c));
    }
    // node1's gateway: 1,000 requests, all answered, the 90% share by the pod on node2
    let mut conn = Conn::open(&ext, addrs[0]).await.unwrap();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..1000 {
        let (st, p) = conn.get(&format!("/api/v2/items/{i}")).await.unwrap();
        assert_eq!(st, 200, "request {i}");
        *counts.entry(p.unwrap_or_default()).or_default() += 1;
    }
    println!("etcd cluster, node1's gateway, 1000 requests: {counts:?}");
    assert!(counts.get("v1a").copied().unwrap_or(0) > 800 && counts.get("v2a").copied().unwrap_or(0) > 50, "{counts:?}");
    assert_eq!(conn.get("/nope").await.unwrap().0, 404);

    // One status writer: the lease in etcd names one node; the status it writes lists both
    // nodes' addresses (every gateway instance registers its own).
    let gw_status_addrs = || async {
        let (code, out, _) = fjordctl(&c, &["get", "gateways", "external-gateway", "-n", "backend", "-o", "json"]);
        (code == 0).then_some(())?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some(v[0]["status"]["addresses"].as_array()?.iter().filter_map(|a| a["value"].as_str().map(str::to_string)).collect::<Vec<_>>())
    };
    let mut all: Vec<String> = c.state.nodes.iter().map(|n| n.address.to_string()).collect();
    all.sort();
    let listed = eventually(Duration::from_secs(15), || async { (gw_status_addrs().await? == all).then_some(()) }).await;
    assert!(listed.is_some(), "status.addresses {:?}, want {all:?}", gw_status_addrs().await);
    // Read the lease record from etcd itself (its JSON gateway, from the external namespace).
    let endpoint = c.state.etcd.as_ref().expect("etcd cluster").endpoint.clone();
    let holder = || async {
        let body = format!("{{\"key\":\"{}\"}}", b64(b"/fjord/v1/leases/gateway-status"));
        let (code, out) = run_in_ns(&ext, &["curl", "-sS", "-m", "5", "-X", "POST", &format!("{endpoint}/v3/kv/range"), "-d", &body]);
        (code == 0).then_some(())?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let value = b64_decode(v["kvs"][0]["value"].as_str()?);
        let rec: serde_json::Value = serde_json::from_slice(&value).ok()?;
        rec["holderIdentity"].as_str().map(str::to_string)
    };
    let first = eventually(Duration::from_secs(10), holder).await.expect("status lease held in etcd");
    let leader = c.state.nodes.iter().position(|n| n.name == first).unwrap_or_else(|| panic!("lease holder {first} is no node"));
    let log = std::fs::read_to_string(c.node_n(leader).dir.join("agent.log")).unwrap_or_default();
    assert!(log.contains("leader election: acquired"), "the holder's agent logged its election");
    let other_log = std::fs::read_to_string(c.node_n(1 - leader).dir.join("agent.log")).unwrap_or_default();
    assert!(!other_log.contains("leader election: acquired"), "only one agent was elected");
    let conds = route_conditions(&c, "backend", "production-traffic-split");
    assert_eq!(conds["Accepted"]["status"], "True", "{conds:?}");

    // The leader's agent dies: the other node's agent takes over the lease, and the status it
    // writes lists only its own address once the dead instance's registration expired.
    c.kill_agent(leader).await;
    let other = 1 - leader;
    let t0 = Instant::now();
    let want = vec![c.node_n(other).address.to_string()];
    let took = eventually(Duration::from_secs(30), || async {
        (holder().await? == c.node_n(other).name && gw_status_addrs().await? == want).then_some(())
    })
    .await;
    assert!(took.is_some(), "status writer never moved to {}; holder {:?}, status addresses {:?}", c.node_n(other).name, holder().await, gw_status_addrs().await);
    println!("status writer moved from {} to {} {:.1} s after the kill (lease TTL 3 s)", c.node_n(leader).name, c.node_n(other).name, t0.elapsed().as_secs_f64());
    let own_pod = if c.node_n(other).name == "node2" { "v1a" } else { "v2a" };
    let served = eventually(Duration::from_secs(20), || {
        let ext = ext.clone();
        let gw = addrs[other];
        async move {
            let mut conn = Conn::open(&ext, gw).await.ok()?;
            for _ in 0..20 {
                if let Ok((200, Some(p))) = conn.get("/api/v2/after").await {
                    if p == own_pod {
                        return Some(());
                    }
                }
            }
            None
        }
    })
    .await;
    assert!(served.is_some(), "the surviving gateway no longer serves {own_pod}");
}
