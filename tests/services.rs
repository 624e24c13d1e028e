//! Services end to end: `apply` → endpoint controller → eBPF datapath, with real packets
//! from a client pod to a ClusterIP, on a dev cluster.
use fjord_e2e::*;
use fjord_net::netns;
use fjordctl::pod;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A TCP server in `ns` on `port` that answers every connection with `name` and closes.
fn name_server(ns: &std::path::Path, port: u16, name: &str) {
    let l = tcp_listen_in(ns, &format!("0.0.0.0:{port}"));
    let name = name.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(name.as_bytes());
        }
    });
}

/// A UDP server answering every datagram with `name`.
fn udp_name_server(ns: &std::path::Path, port: u16, name: &str) {
    let u = udp_bind_in(ns, &format!("0.0.0.0:{port}"));
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(name.as_bytes(), from);
        }
    });
}

fn ask(ns: &std::path::Path, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tcp_connect_in(ns, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 5353
---
apiVersion: v1
kind: Service
metadata:
  name: empty
spec:
  selector:
    app: nothing-matches
  ports:
  - port: 80
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterip_tcp_udp_spread_endpoints_and_no_iptables() {
    let c = TestCluster::up().await;
    let mut webs = vec![];
    for i in 1..=3 {
        let p = pod::add_with_ports(&c.state, None, &format!("default/web{i}"), [("app".to_string(), "web".to_string())].into(), [("http".to_string(), 8080)].into())
            .await
            .unwrap();
        name_server(&pod_netns(&p), 8080, &p.name);
        udp_name_server(&pod_netns(&p), 5353, &p.name);
        webs.push(p);
    }
    let client = pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    let cns = pod_netns(&client);

    let r = c.client().apply(SERVICES).await.unwrap();
    assert_eq!(r.objects, vec!["Service/default/web", "Service/default/empty"]);
    let svcs = c.client().services().await.unwrap();
    let vip: Ipv4Addr = svcs.iter().find(|s| s["metadata"]["name"] == "web").unwrap()["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    assert!("10.96.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&vip), "{vip}");
    let empty_vip: Ipv4Addr = svcs.iter().find(|s| s["metadata"]["name"] == "empty").unwrap()["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();

    // The endpoint controller publishes the three pods with the named targetPort resolved.
    let client_api = c.client();
    let slices = eventually(Duration::from_secs(15), || async {
        let s = client_api.endpointslices().await.ok()?;
        let n: usize = s.iter().filter(|e| e["metadata"]["labels"]["kubernetes.io/service-name"] == "web").map(|e| e["endpoints"].as_array().map_or(0, |a| a.len())).sum();
        (n == 3).then_some(s)
    })
    .await
    .expect("3 endpoints for web");
    let web_slice = slices.iter().find(|e| e["metadata"]["labels"]["kubernetes.io/service-name"] == "web").unwrap();
    assert!(web_slice["ports"].as_array().unwrap().iter().any(|p| p["name"] == "http" && p["port"] == 8080), "{web_slice}");

    // TCP through the ClusterIP: every connection answered, spread over the three backends.
    let vip80 = SocketAddr::new(vip.into(), 80);
    eventually(Duration::from_secs(15), || async { ask(&cns, vip80).ok() }).await.expect("service answers");
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    let n = 300;
    for _ in 0..n {
        let who = ask(&cns, vip80).expect("connection through the ClusterIP");
        *hits.entry(who).or_default() += 1;
    }
    eprintln!("spread over {n} connections through {vip}:80: {hits:?}");
    assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), vec!["web1", "web2", "web3"], "{hits:?}");
    // Maglev over random source ports: each backend gets its share; ±60% of n/3 is far
    // outside what chance produces for n=300 (sd ≈ 8), yet catches a broken spread.
    for (k, v) in &hits {
        assert!(*v >= n / 3 * 4 / 10 && *v <= n / 3 * 16 / 10, "{k}: {v} of {n}: {hits:?}");
    }

    // UDP through the ClusterIP: the reply comes from the VIP.
    let u = udp_bind_in(&cns, "0.0.0.0:0");
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    u.send_to(b"q", SocketAddr::new(vip.into(), 53)).unwrap();
    let mut buf = [0u8; 64];
    let (k, from) = u.recv_from(&mut buf).expect("udp answer via the service");
    assert!(std::str::from_utf8(&buf[..k]).unwrap().starts_with("web"));
    assert_eq!(from, SocketAddr::new(vip.into(), 53), "reverse NAT restores the service address");

    // A service without backends refuses at once (TCP RST), it does not time out.
    // (ConnectionRefused means a RST came back; a silent drop would end in TimedOut.)
    let e = tcp_connect_in(&cns, SocketAddr::new(empty_vip.into(), 80)).expect_err("no backends");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // A deleted pod leaves the service: no new connection reaches it.
    pod::del(&c.state, "default/web3").await.unwrap();
    let gone = eventually(Duration::from_secs(15), || async {
        let s = client_api.endpointslices().await.ok()?;
        let n: usize = s.iter().filter(|e| e["metadata"]["labels"]["kubernetes.io/service-name"] == "web").map(|e| e["endpoints"].as_array().map_or(0, |a| a.len())).sum();
        (n == 2).then_some(())
    })
    .await;
    assert!(gone.is_some(), "web3 still an endpoint");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..60 {
        let who = ask(&cns, vip80).expect("service still answers with two backends");
        assert_ne!(who, "web3", "a deleted pod got a new connection");
    }

    // Status: the kube-proxy replacement is OK, hooks attached, maps counted.
    let st = c.client().status().await.unwrap();
    let dp = st.datapath.expect("datapath status");
    assert_eq!(dp.kube_proxy_replacement, "OK");
    assert_eq!(dp.attached.iter().filter(|a| a.starts_with("fj")).count(), 3, "web1, web2, client: {:?}", dp.attached);
    assert!(dp.attached.iter().any(|a| a == "eth0"), "the node's underlay device (NodePort, masquerade): {:?}", dp.attached);
    assert!(dp.frontends >= 3, "{dp:?}");
    assert!(dp.maps.iter().any(|m| m.entries > 0));

    let m = c.client().metrics().await.unwrap();
    assert!(m.lines().any(|l| l.starts_with("fjord_datapath_frontends{") && !l.trim_end().ends_with(" 0")), "{m}");
    assert!(m.lines().any(|l| l.starts_with("fjord_service_sync_duration_seconds_count{") && !l.trim_end().ends_with(" 0")), "{m}");

    // No iptables or nftables rules of fjord's in the node's namespace.
    let node_ns = c.node_netns();
    for cmd in [&["iptables-save"][..], &["nft", "list", "ruleset"][..]] {
        let (code, out) = run_in_ns(&node_ns, cmd);
        assert_eq!(code, 0, "{cmd:?}: {out}");
        let rules: Vec<&str> = out.lines().filter(|l| l.starts_with("-A") || l.trim_start().starts_with("ip ") || l.contains("dnat") || l.contains("10.96.")).collect();
        assert!(rules.is_empty(), "{cmd:?} shows rules: {rules:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_manifest_applies_nothing_and_names_the_field() {
    let c = TestCluster::up().await;
    let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: good}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  ports: [{port: 70000}]
"#;
    let e = c.client().apply(bad).await.unwrap_err().to_string();
    assert!(e.contains("document 2") && e.contains("spec.ports[0].port"), "{e}");
    assert!(c.client().services().await.unwrap().is_empty(), "half applied");
    // Unknown field, unknown kind, malformed YAML.
    for (m, word) in [
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}], colour: red}\n", "colour"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "Pod"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x\n", "document 1"),
    ] {
        let e = c.client().apply(m).await.unwrap_err().to_string();
        assert!(e.contains(word), "{m}: {e}");
    }
    assert!(c.client().services().await.unwrap().is_empty());
    // A ClusterIP that another service holds is refused, nothing applied.
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.77, ports: [{port: 80}]}\n").await.unwrap();
    let e = c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.77, ports: [{port: 80}]}\n").await.unwrap_err().to_string();
    assert!(e.contains("already allocated") && e.contains("default/a"), "{e}");
    assert_eq!(c.client().services().await.unwrap().len(), 1);
    // Delete removes it and frees its ClusterIP.
    let r = c.client().delete_objects("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n").await.unwrap();
    assert_eq!(r.objects, vec!["Service/default/a"]);
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.77, ports: [{port: 80}]}\n").await.unwrap();

    // nodePorts: allocated when left out, kept on re-apply, a clash names the holder and
    // applies nothing, delete frees them.
    let np = |name: &str, port: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, ports: [{{port: 80{port}}}]}}\n");
    let r = c.client().apply(&np("n1", "")).await.unwrap();
    assert_eq!(r.objects, vec!["Service/default/n1"]);
    let node_port = |svcs: &[serde_json::Value], name: &str| svcs.iter().find(|s| s["metadata"]["name"] == name).and_then(|s| s["spec"]["ports"][0]["nodePort"].as_u64());
    let first = node_port(&c.client().services().await.unwrap(), "n1").expect("a nodePort was allocated");
    assert!((30000..=32767).contains(&first), "{first}");
    c.client().apply(&np("n1", "")).await.unwrap();
    assert_eq!(node_port(&c.client().services().await.unwrap(), "n1"), Some(first), "re-apply keeps the nodePort");
    let clash = format!("{}---\n{}", np("n2", ""), np("n3", &format!(", nodePort: {first}")));
    let e = c.client().apply(&clash).await.unwrap_err().to_string();
    assert!(e.contains(&format!("nodePort {first}/TCP is already allocated to service default/n1")), "{e}");
    let names: Vec<String> = c.client().services().await.unwrap().iter().map(|s| s["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert!(!names.contains(&"n2".to_string()) && !names.contains(&"n3".to_string()), "half applied: {names:?}");
    c.client().delete_objects(&np("n1", "")).await.unwrap();
    c.client().apply(&np("n3", &format!(", nodePort: {first}"))).await.expect("a deleted service's nodePort is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_services_program_nothing_and_map_capacity_is_enforced_all_or_nothing() {
    let c = TestCluster::up_full(1, "embedded", "native", vec!["--max-services".into(), "2".into()]).await;
    let p = pod::add(&c.state, None, "default/db", [("app".to_string(), "db".to_string())].into()).await.unwrap();
    // Headless: endpoints are published, the datapath holds nothing.
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}\n").await.unwrap();
    let api = c.client();
    let slices = eventually(Duration::from_secs(15), || async {
        let s = api.endpointslices().await.ok()?;
        (!s.is_empty()).then_some(s)
    })
    .await
    .expect("headless service gets endpoints");
    assert_eq!(slices[0]["endpoints"][0]["addresses"][0], p.ip.unwrap().to_string());
    assert!(c.client().datapath_frontends().await.unwrap().is_empty(), "a headless service must not be in the datapath");
    // The service map holds 2 frontends: a service with 2 ports fits, one more port does not —
    // and a file that would overflow applies nothing.
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: two}\nspec: {ports: [{name: a, port: 80}, {name: b, port: 81}]}\n").await.unwrap();
    let e = c
        .client()
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: ok}\nspec: {clusterIP: None, ports: [{port: 1}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: three}\nspec: {ports: [{port: 82}]}\n")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--max-services") && e.contains("nothing was applied"), "{e}");
    let names: Vec<String> = c.client().services().await.unwrap().iter().map(|s| s["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec!["db", "two"], "half applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_through_a_clusterip_survives_kill_9_and_restart_of_the_agent() {
    let mut c = TestCluster::up().await;
    let web = pod::add(&c.state, None, "default/web", [("app".to_string(), "web".to_string())].into()).await.unwrap();
    let client = pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    let srv = echo_server(tcp_listen_in(&pod_netns(&web), "0.0.0.0:8080"), 3);
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.60, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n").await.unwrap();
    let vip = SocketAddr::new(Ipv4Addr::new(10, 96, 0, 60).into(), 80);
    let cns = pod_netns(&client);
    let mut conn = eventually(Duration::from_secs(15), || async { tcp_connect_in(&cns, vip).ok() }).await.expect("service reachable");
    assert_eq!(roundtrip(&mut conn, b"before").unwrap(), b"before");
    c.kill_agent(0).await;
    // The maps and programs are pinned: the flow and new connections keep working without the agent.
    assert_eq!(roundtrip(&mut conn, b"agent-dead").unwrap(), b"agent-dead");
    let mut c2 = tcp_connect_in(&cns, vip).expect("new connection through the ClusterIP while the agent is dead");
    assert_eq!(roundtrip(&mut c2, b"new").unwrap(), b"new");
    c.restart_agent(0).await;
    assert_eq!(roundtrip(&mut conn, b"after-restart").unwrap(), b"after-restart");
    let dp = c.client().status().await.unwrap().datapath.unwrap();
    assert_eq!(dp.kube_proxy_replacement, "OK");
    assert_eq!(dp.attached.iter().filter(|a| a.starts_with("fj")).count(), 2, "{:?}", dp.attached);
    let mut c3 = tcp_connect_in(&cns, vip).expect("new connection after the restart");
    assert_eq!(roundtrip(&mut c3, b"again").unwrap(), b"again");
    drop((conn, c2, c3));
    srv.join().unwrap();
}

/// A TCP server in `ns` answering every connection with "`name` `peer-ip`" (who served, and
/// which client address it saw) and closing.
fn who_server(ns: &std::path::Path, port: u16, name: &str) {
    let l = tcp_listen_in(ns, &format!("0.0.0.0:{port}"));
    let name = name.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let _ = s.write_all(format!("{name} {peer}").as_bytes());
        }
    });
}

/// (who answered, which client address it saw)
fn who(ns: &std::path::Path, addr: SocketAddr) -> std::io::Result<(String, String)> {
    let a = ask(ns, addr)?;
    let (n, p) = a.split_once(' ').ok_or_else(|| std::io::Error::other(format!("bad answer {a:?}")))?;
    Ok((n.to_string(), p.to_string()))
}

/// Sum of the samples of `name` whose labels include `label` (e.g. `event="snat_new"`).
fn metric(text: &str, name_and_label: &str) -> u64 {
    let (name, label) = name_and_label.split_once('{').unwrap_or((name_and_label, ""));
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label.trim_end_matches('"').trim_end_matches('}')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as u64
}

/// One datagram from a fresh socket in `ns` connected to `addr`, and the answer (or the error
/// the socket got, e.g. ECONNREFUSED from an ICMP port unreachable; WouldBlock after 3 s).
fn connected_udp_query(ns: &std::path::Path, addr: SocketAddr) -> std::io::Result<usize> {
    let u = udp_bind_in(ns, "0.0.0.0:0");
    u.set_read_timeout(Some(Duration::from_secs(3)))?;
    u.connect(addr)?;
    u.send(b"q")?;
    u.recv(&mut [0u8; 16])
}

fn refused(r: &std::io::Result<usize>) -> bool {
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn vip_of(svcs: &[serde_json::Value], name: &str) -> Ipv4Addr {
    svcs.iter().find(|s| s["metadata"]["name"] == name).unwrap_or_else(|| panic!("service {name}"))["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

const LOCAL_SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  selector: {app: solo}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: closed, port: 54, protocol: UDP, targetPort: 5454}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: sticky}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hairpin_session_affinity_and_masquerade() {
    let c = TestCluster::up().await;
    let label = |v: &str| -> BTreeMap<String, String> { [("app".to_string(), v.to_string())].into() };
    let solo = pod::add(&c.state, None, "default/solo", label("solo")).await.unwrap();
    who_server(&pod_netns(&solo), 8080, "solo");
    for i in 1..=3 {
        let p = pod::add(&c.state, None, &format!("default/sticky{i}"), label("sticky")).await.unwrap();
        who_server(&pod_netns(&p), 8080, &p.name);
    }
    let client = pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    let cns = pod_netns(&client);
    c.client().apply(LOCAL_SERVICES).await.unwrap();
    let svcs = c.client().services().await.unwrap();
    let (solo_vip, sticky_vip) = (vip_of(&svcs, "solo"), vip_of(&svcs, "sticky"));

    // Hairpin: the only backend of `solo` is the client itself. The pod reaches itself through
    // the ClusterIP and sees the hairpin address as the client (its own address would make
    // the reply skip the datapath).
    let sns = pod_netns(&solo);
    let (name, peer) = eventually(Duration::from_secs(15), || async { who(&sns, SocketAddr::new(solo_vip.into(), 80)).ok() })
        .await
        .expect("a pod reaches itself through its service");
    assert_eq!((name.as_str(), peer.as_str()), ("solo", "169.254.42.1"));
    for _ in 0..20 {
        assert_eq!(who(&sns, SocketAddr::new(solo_vip.into(), 80)).expect("hairpin again").0, "solo");
    }
    // ... and other clients are not hairpinned.
    assert_eq!(who(&cns, SocketAddr::new(solo_vip.into(), 80)).unwrap().1, client.ip.unwrap().to_string());
    // An ICMP error about a hairpin flow goes back into the pod, translated: solo's UDP port 5454
    // has no socket, so solo's kernel answers its own datagram (sent to the VIP, arriving from
    // the hairpin address) with port unreachable, which must reach solo's connected socket.
    let hairpin_udp = SocketAddr::new(solo_vip.into(), 54);
    for i in 0..3 {
        let got = connected_udp_query(&sns, hairpin_udp);
        assert!(refused(&got), "try {i}: port unreachable about a hairpin flow reaches the pod's socket: {got:?}");
    }

    // sessionAffinity ClientIP: every connection of one client goes to the same backend
    // (without affinity, 40 connections over 3 backends all landing on one: p = 3 * 3^-40).
    let sticky = SocketAddr::new(sticky_vip.into(), 80);
    eventually(Duration::from_secs(15), || async {
        let s = c.client().endpointslices().await.ok()?;
        let n: usize = s.iter().filter(|e| e["metadata"]["labels"]["kubernetes.io/service-name"] == "sticky").map(|e| e["endpoints"].as_array().map_or(0, |a| a.len())).sum();
        (n == 3).then_some(())
    })
    .await
    .expect("3 endpoints for sticky");
    let first = eventually(Duration::from_secs(15), || async { who(&cns, sticky).ok() }).await.expect("sticky answers").0;
    let before = metric(&c.client().metrics().await.unwrap(), "fjord_datapath_events{event=\"affinity_hit\"");
    for _ in 0..40 {
        assert_eq!(who(&cns, sticky).unwrap().0, first, "sessionAffinity ClientIP keeps the client on one backend");
    }
    let after = metric(&c.client().metrics().await.unwrap(), "fjord_datapath_events{event=\"affinity_hit\"");
    assert!(after >= before + 40, "affinity hits {before} -> {after}");
    // Another client has its own affinity (and still gets an answer).
    let (other, _) = who(&sns, sticky).unwrap();
    assert!(other.starts_with("sticky"), "{other}");

    // Host-network processes of the node (its namespace and socket-LB cgroup) reach the
    // ClusterIP through the socket-level LB; getpeername() shows the service address.
    let node = c.node();
    let cg = fjordctl::cluster::node_cgroup(&node.dir, &node.name).expect("cgroup v2");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c \"import socket; s=socket.create_connection(('{solo_vip}', 80), 5); print(s.recv(64).decode(), s.getpeername()[0])\"",
        cg.display()
    );
    let (code, out) = run_in_ns(&c.node_netns(), &["sh", "-c", &script]);
    assert_eq!(code, 0, "{out}");
    let mut words = out.split_whitespace();
    assert_eq!(words.next(), Some("solo"), "{out}");
    assert_eq!(words.nth(1), Some(solo_vip.to_string().as_str()), "getpeername shows the VIP: {out}");
    let m = c.client().metrics().await.unwrap();
    assert!(metric(&m, "fjord_datapath_events{event=\"sock_lb\"") >= 1, "{m}");
    // ... and sessionAffinity holds for them too (the node is one client): 30 connections,
    // one backend (without affinity: p = 3 * 3^-30 of all landing on one).
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c \"import socket\nfor _ in range(30): print(socket.create_connection(('{sticky_vip}', 80), 5).recv(64).decode().split()[0])\"",
        cg.display()
    );
    let (code, out) = run_in_ns(&c.node_netns(), &["sh", "-c", &script]);
    assert_eq!(code, 0, "{out}");
    let names: std::collections::BTreeSet<&str> = out.split_whitespace().collect();
    assert_eq!(names.len(), 1, "socket-LB connections of the node stick to one backend: {out}");
    assert!(names.iter().all(|n| n.starts_with("sticky")), "{out}");

    // Masquerade: a pod reaching "the internet" (the external namespace, outside the cluster
    // CIDR) arrives with the node's address; the reply finds its way back.
    let ext = netns::path(&c.state.ext_netns);
    who_server(&ext, 9000, "internet");
    let ext_addr = SocketAddr::new(c.state.ext_address.into(), 9000);
    for _ in 0..5 {
        let (n, seen) = who(&cns, ext_addr).expect("pod -> outside through masquerade");
        assert_eq!(n, "internet");
        assert_eq!(seen, c.node().address.to_string(), "the outside sees the node, not the pod");
    }
    let m = c.client().metrics().await.unwrap();
    let snat = metric(&m, "fjord_datapath_events{event=\"snat_new\"");
    assert!(snat >= 5, "{m}");
    assert_eq!(metric(&m, "fjord_datapath_events{event=\"snat_fail\""), 0);

    // ICMP echo is masqueraded too (the identifier is allocated like a port): the outside
    // sees the node's address, and the reply reaches the pod.
    let ext_ip = c.state.ext_address.to_string();
    let sniff = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ext.display()))
        .args(["python3", "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(10)\nwhile True:\n    p, a = s.recvfrom(256)\n    if p[20] == 8: print(a[0]); break"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ICMP listener in the external namespace");
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = run_in_ns(&cns, &["ping", "-c", "2", "-W", "3", &ext_ip]);
    assert_eq!(code, 0, "pod pings the outside through masquerade: {out}");
    let seen = sniff.wait_with_output().expect("listener output");
    assert_eq!(String::from_utf8_lossy(&seen.stdout).trim(), c.node().address.to_string(), "the outside sees pings from the node");
    let m = c.client().metrics().await.unwrap();
    assert!(metric(&m, "fjord_datapath_events{event=\"snat_new\"") > snat, "a ping took a SNAT identifier: {m}");

    // ICMP errors about masqueraded flows reach the pod: UDP to a port nobody listens on
    // "outside" gets port unreachable (sent to the node's address, quoting the node's address
    // and SNAT port), translated back, so the pod's connected socket sees "connection refused"
    // at once instead of a timeout.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect(('{ext_ip}', 9999))\ntry:\n    s.send(b'x'); s.recv(16); print('data')\nexcept ConnectionRefusedError: print('refused')\nexcept socket.timeout: print('timeout')"
    );
    let (code, out) = run_in_ns(&cns, &["python3", "-c", &script]);
    assert_eq!((code, out.trim()), (0, "refused"), "port unreachable from outside reaches the pod's socket");

    // ... and about masqueraded pings: the external namespace routes 198.51.100.0/24 nowhere
    // (an "unreachable" route), so it answers a ping there with "host unreachable" to the
    // node's address, quoting the node's address and SNAT identifier. Translated back, ping
    // (a raw socket that matches errors by the quoted identifier) reports it.
    let node_ns = c.node_netns();
    for (ns, args) in [
        (&ext, vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
        (&ext, vec!["ip", "route", "add", "unreachable", "198.51.100.0/24"]),
        (&node_ns, vec!["ip", "route", "add", "198.51.100.0/24", "via", ext_ip.as_str()]),
    ] {
        let (code, out) = run_in_ns(ns, &args);
        assert_eq!(code, 0, "{args:?}: {out}");
    }
    let (_, out) = run_in_ns(&cns, &["ping", "-c", "1", "-W", "3", "198.51.100.7"]);
    assert!(
        out.contains(&format!("From {ext_ip}")) && out.contains("Unreachable"),
        "the pod's ping learns that the destination is unreachable: {out}"
    );
}

const NODEPORT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  selector: {app: np}
  externalIPs: [172.18.100.1]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053},
          {name: closed, port: 54, protocol: UDP, targetPort: 5454, nodePort: 30054}]
---
apiVersion: v1
kind: Service
metadata: {name: itp}
spec:
  selector: {app: np}
  internalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  selector: {app: np}
  ports: [{port: 8443, targetPort: 8080}]
status:
  loadBalancer:
    ingress: [{ip: 172.18.100.2}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_externalips_and_traffic_policies_across_nodes() {
    nodeport_across_nodes("native").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodeport_across_nodes_over_vxlan() {
    nodeport_across_nodes("vxlan").await;
}

async fn nodeport_across_nodes(routing: &str) {
    let c = TestCluster::up_with(2, "etcd", routing).await;
    let label: BTreeMap<String, String> = [("app".to_string(), "np".to_string())].into();
    let (n0, n1) = (c.node_n(0).clone(), c.node_n(1).clone());
    let be0 = pod::add(&c.state, Some(&n0.name), "default/be0", label.clone()).await.unwrap();
    let be1 = pod::add(&c.state, Some(&n1.name), "default/be1", label.clone()).await.unwrap();
    who_server(&pod_netns(&be0), 8080, "be0");
    who_server(&pod_netns(&be1), 8080, "be1");
    udp_name_server(&pod_netns(&be0), 5353, "be0");
    udp_name_server(&pod_netns(&be1), 5353, "be1");
    let client = pod::add(&c.state, Some(&n0.name), "default/client", BTreeMap::new()).await.unwrap();
    let cns = pod_netns(&client);
    c.client().apply(NODEPORT).await.unwrap();
    let ext = netns::path(&c.state.ext_netns);
    let ext_ip = c.state.ext_address.to_string();
    // the external IP is routed to node 0 (as a router or BGP speaker would)
    for ip in ["172.18.100.1/32", "172.18.100.2/32"] {
        let (code, out) = run_in_ns(&ext, &["ip", "route", "add", ip, "via", &n0.address.to_string()]);
        assert_eq!(code, 0, "{out}");
    }

    // Both endpoints known on both nodes.
    for i in 0..2 {
        let api = c.client_n(i);
        eventually(Duration::from_secs(20), || async {
            let fe = api.datapath_frontends().await.ok()?;
            let has = fe.iter().any(|(k, b)| k.contains(":30080/") && b.len() == 2);
            has.then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("node {i} programs the NodePort with both backends"));
    }

    // NodePort on every node address from the external namespace. A local backend sees the
    // client's address; a backend on the other node sees the ingress node (SNAT), so its
    // replies come back through that node.
    for (node, local, remote) in [(&n0, "be0", "be1"), (&n1, "be1", "be0")] {
        let addr = SocketAddr::new(node.address.into(), 30080);
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for _ in 0..40 {
            let (n, peer) = who(&ext, addr).unwrap_or_else(|e| panic!("NodePort {addr}: {e}"));
            seen.insert(n, peer);
        }
        assert_eq!(seen.get(local), Some(&ext_ip), "{addr}: {seen:?}");
        assert_eq!(seen.get(remote), Some(&node.address.to_string()), "{addr}: {seen:?}");
    }
    // UDP NodePort: answered from the node address it was sent to, by local and remote backends.
    for node in [&n0, &n1] {
        let addr = SocketAddr::new(node.address.into(), 30053);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let u = udp_bind_in(&ext, "0.0.0.0:0");
            u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            u.send_to(b"q", addr).unwrap();
            let mut buf = [0u8; 64];
            let (k, from) = u.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP NodePort {addr}: {e}"));
            assert_eq!(from, addr, "the reply comes from the NodePort address");
            names.insert(String::from_utf8_lossy(&buf[..k]).to_string());
        }
        assert_eq!(names.len(), 2, "{addr}: local and remote backends answer: {names:?}");
    }
    // ICMP errors about service flows are translated back: nothing listens on the backends'
    // port 5454, so each backend's kernel answers "port unreachable", quoting the datagram as it
    // got it (client or SNAT address -> backend). A connected UDP socket only sees the error if
    // the quote names what it sent (its own address -> the service), so without the translation
    // every recv below times out. Over 16 sockets per frontend both backends answer (Maglev by
    // source port): a local one (fjord_from_pod), a remote one to a NodePort client (SNATed:
    // fjord_from_net) and to a pod client (fjord_to_pod).
    for be in [&be0, &be1] {
        // the backends' kernels may send as many errors as the test asks for
        let (code, out) = run_in_ns(&pod_netns(be), &["sysctl", "-qw", "net.ipv4.icmp_ratemask=0"]);
        assert_eq!(code, 0, "{out}");
    }
    let events = |text: &str| metric(text, "fjord_datapath_events{event=\"icmp_error_nat\"");
    let before = [events(&c.client_n(0).metrics().await.unwrap()), events(&c.client_n(1).metrics().await.unwrap())];
    let np_vip = vip_of(&c.client().services().await.unwrap(), "np");
    let tries = 16;
    for (ns, addr) in [
        (&ext, SocketAddr::new(n0.address.into(), 30054)),
        (&ext, SocketAddr::new(n1.address.into(), 30054)),
        (&cns, SocketAddr::new(np_vip.into(), 54)),
    ] {
        for i in 0..tries {
            let got = connected_udp_query(ns, addr);
            assert!(refused(&got), "{addr} try {i}: the backend's port unreachable must reach the client's socket as ECONNREFUSED: {got:?}");
        }
    }
    let after = [events(&c.client_n(0).metrics().await.unwrap()), events(&c.client_n(1).metrics().await.unwrap())];
    // node 0 translated the errors of its NodePort and of the pod client, node 1 of its NodePort
    assert_eq!((after[0] - before[0], after[1] - before[1]), (2 * tries, tries), "icmp_error_nat per node");

    // externalIPs are frontends too.
    let (n, _) = who(&ext, "172.18.100.1:80".parse().unwrap()).expect("externalIP from outside");
    assert!(n == "be0" || n == "be1");
    // ... and so are status.loadBalancer.ingress IPs.
    let (n, _) = who(&ext, "172.18.100.2:8443".parse().unwrap()).expect("LoadBalancer ingress IP from outside");
    assert!(n == "be0" || n == "be1");
    // internalTrafficPolicy Local: a client on node 0 only reaches node 0's endpoint.
    let itp = vip_of(&c.client().services().await.unwrap(), "itp");
    for _ in 0..30 {
        assert_eq!(who(&cns, SocketAddr::new(itp.into(), 80)).unwrap().0, "be0", "internalTrafficPolicy Local");
    }

    // externalTrafficPolicy Local: each node only uses its own endpoints, and the client
    // address is preserved.
    c.client().apply(&NODEPORT.replace("  externalIPs:", "  externalTrafficPolicy: Local\n  externalIPs:")).await.unwrap();
    for (i, node, local) in [(0, &n0, "be0"), (1, &n1, "be1")] {
        let api = c.client_n(i);
        eventually(Duration::from_secs(20), || async {
            let fe = api.datapath_frontends().await.ok()?;
            let one = fe.iter().any(|(k, b)| k.starts_with(&format!("{}:30080/", node.address)) && b.len() == 1);
            one.then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("node {i}: NodePort with only its local endpoint"));
        let addr = SocketAddr::new(node.address.into(), 30080);
        for _ in 0..20 {
            let (n, peer) = who(&ext, addr).unwrap();
            assert_eq!((n.as_str(), peer.as_str()), (local, ext_ip.as_str()), "{addr}");
        }
    }
    // No iptables rules anywhere on the service path.
    for i in 0..2 {
        let (code, out) = run_in_ns(&netns::path(&c.node_n(i).netns), &["iptables-save"]);
        assert_eq!(code, 0);
        assert!(!out.lines().any(|l| l.starts_with("-A")), "{out}");
    }
}

const SOCKET_LB_SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 81, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing-matches}
  ports: [{port: 80}]
"#;

/// `cluster up --socket-lb-pods` (Cilium's socket LB for pods): a pod's connect()/sendto() to a
/// ClusterIP goes straight to a backend in the cgroup hook, so the tc programs translate no
/// packet of the flow (no conntrack entry); getpeername()/recvfrom() still show the service.
/// Affinity services and services without backends are left to the tc program at the veth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_services_through_the_socket_lb() {
    let c = TestCluster::up_opts(1, "embedded", "native", vec![], true).await;
    let label = |v: &str| -> BTreeMap<String, String> { [("app".to_string(), v.to_string())].into() };
    for i in 1..=3 {
        let p = pod::add(&c.state, None, &format!("default/web{i}"), label("web")).await.unwrap();
        who_server(&pod_netns(&p), 8080, &p.name);
        udp_name_server(&pod_netns(&p), 5353, &p.name);
    }
    let client = pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    let client_ip = client.ip.unwrap().to_string();
    c.client().apply(SOCKET_LB_SERVICES).await.unwrap();
    let svcs = c.client().services().await.unwrap();
    let (web, sticky, empty) = (vip_of(&svcs, "web"), vip_of(&svcs, "sticky"), vip_of(&svcs, "empty"));
    let cns = pod_netns(&client);
    eventually(Duration::from_secs(15), || async { who(&cns, SocketAddr::new(web.into(), 80)).ok() }).await.expect("web answers");
    eventually(Duration::from_secs(15), || async { who(&cns, SocketAddr::new(sticky.into(), 81)).ok() }).await.expect("sticky answers");

    let counters = |m: &str| {
        ["sock_lb", "sock_to_tc", "ct_new", "affinity_hit", "rst_sent"].map(|e| metric(m, &format!("fjord_datapath_events{{event=\"{e}\"")))
    };
    let before = counters(&c.client().metrics().await.unwrap());
    // 30 TCP connections and 10 unconnected UDP queries from a process of the pod (`pod exec`
    // puts it in the node's pods cgroup), then the sticky and the empty service.
    let script = format!(
        r#"import socket
print("cgroup", [l for l in open("/proc/self/cgroup").read().split() if l.startswith("0::")][0])
for _ in range(30):
    s = socket.create_connection(("{web}", 80), 5)
    print("tcp", s.recv(64).decode(), s.getpeername()[0], s.getpeername()[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
for _ in range(10):
    u.sendto(b"q", ("{web}", 53)); d, a = u.recvfrom(64)
    print("udp", d.decode(), a[0], a[1])
for _ in range(10):
    print("sticky", socket.create_connection(("{sticky}", 81), 5).recv(64).decode())
try:
    socket.create_connection(("{empty}", 80), 5); print("empty connected")
except ConnectionRefusedError:
    print("empty refused")
"#
    );
    let (code, out) = c.fjordctl(&["pod", "exec", "default/client", "--", "python3", "-c", &script]);
    assert_eq!(code, 0, "{out}");
    let after = counters(&c.client().metrics().await.unwrap());
    let pods_cg = fjordctl::cluster::pods_cgroup(&c.node().dir, &c.node().name).unwrap();
    let cg_name = pods_cg.file_name().unwrap().to_string_lossy().to_string();
    assert!(out.lines().next().is_some_and(|l| l.ends_with(&format!("/{cg_name}"))), "pod exec runs in the pods cgroup: {out}");
    let mut served = BTreeMap::<String, usize>::new();
    for l in out.lines().filter(|l| l.starts_with("tcp ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(w[2], client_ip, "the backend sees the pod's own address: {l}");
        assert_eq!((w[3], w[4]), (web.to_string().as_str(), "80"), "getpeername() shows the service: {l}");
        *served.entry(w[1].to_string()).or_default() += 1;
    }
    assert_eq!(served.values().sum::<usize>(), 30, "{out}");
    // random socket cookies over 3 backends: all 30 on one has p = 3 * 3^-30
    assert!(served.len() >= 2 && served.keys().all(|k| k.starts_with("web")), "{served:?}");
    let udp: Vec<&str> = out.lines().filter(|l| l.starts_with("udp ")).collect();
    assert_eq!(udp.len(), 10, "{out}");
    for l in &udp {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert!(w[1].starts_with("web"), "{l}");
        assert_eq!((w[2], w[3]), (web.to_string().as_str(), "53"), "recvfrom() shows the service as the source: {l}");
    }
    let stickies: std::collections::BTreeSet<&str> = out.lines().filter_map(|l| l.strip_prefix("sticky ")).collect();
    assert_eq!(stickies.len(), 1, "sessionAffinity (left to tc, keyed by the pod's address) holds: {out}");
    assert!(out.contains("empty refused"), "no backends: connection refused at once (tc's RST): {out}");
    let d = |i: usize| after[i] - before[i];
    assert!(d(0) >= 40, "30 connects + 10 sendto translated in the cgroup hook: {before:?} -> {after:?}");
    assert!(d(1) >= 11, "sticky and empty left to tc: {before:?} -> {after:?}");
    assert_eq!(d(2), 10, "conntrack entries only for the 10 sticky flows (tc), none for the socket-LB flows: {before:?} -> {after:?}");
    assert!(d(3) >= 9, "affinity hits on the tc path: {before:?} -> {after:?}");
    assert!(d(4) >= 1, "RST for the empty service: {before:?} -> {after:?}");

    // A process outside the pods cgroup (this test, in the pod's namespace) uses the tc path.
    let before = counters(&c.client().metrics().await.unwrap());
    for _ in 0..5 {
        assert!(who(&cns, SocketAddr::new(web.into(), 80)).unwrap().0.starts_with("web"));
    }
    let after = counters(&c.client().metrics().await.unwrap());
    assert_eq!((after[0] - before[0], after[2] - before[2]), (0, 5), "tc path: 5 conntrack entries, no socket LB");

    let (code, out) = c.fjordctl(&["status", "--verbose"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Socket LB:") && out.contains(&pods_cg.display().to_string()), "status names the pods cgroup: {out}");
    // the pod-to-pod packets of all of the above went veth to veth (eBPF host routing)
    assert!(out.contains("Host Routing:     BPF"), "{out}");
    let routed = metric(&c.client().metrics().await.unwrap(), "fjord_datapath_events{event=\"host_routed\"");
    assert!(routed >= 100, "pod-to-pod packets delivered by bpf_redirect_peer: {routed}");
}

/// The socket LB picks among the backends a service entry holds itself (up to 8, equal
/// weights) and uses the Maglev table beyond that. With 10 backends (table) and then 7 (the
/// entry's list) every backend gets its share of 1,000 / 700 connections (expected 100 each;
/// each within 50..150, > 5 standard deviations), the three deleted pods get none, and no
/// connection fails or takes the tc path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_lb_spreads_over_every_backend_from_the_entry_or_the_table() {
    let c = TestCluster::up_opts(1, "embedded", "native", vec![], true).await;
    for i in 1..=10 {
        let p = pod::add(&c.state, None, &format!("default/many{i}"), [("app".to_string(), "many".to_string())].into()).await.unwrap();
        who_server(&pod_netns(&p), 8080, &p.name);
    }
    pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: many}\nspec:\n  selector: {app: many}\n  ports: [{port: 80, targetPort: 8080}]\n").await.unwrap();
    let vip = vip_of(&c.client().services().await.unwrap(), "many");
    let names = |n: usize| -> BTreeMap<String, usize> {
        let script = format!(
            "import socket\nfor _ in range({n}):\n    try: print(socket.create_connection(('{vip}', 80), 5).recv(64).decode().split()[0])\n    except OSError as e: print('error', e)\n"
        );
        let (code, out) = c.fjordctl(&["pod", "exec", "default/client", "--", "python3", "-c", &script]);
        assert_eq!(code, 0, "{out}");
        let mut m = BTreeMap::new();
        for l in out.lines() {
            *m.entry(l.to_string()).or_default() += 1;
        }
        m
    };
    eventually(Duration::from_secs(15), || async { (names(20).len() == 10).then_some(()) }).await.expect("all 10 backends answer");
    let counters = |m: &str| ["sock_lb", "ct_new"].map(|e| metric(m, &format!("fjord_datapath_events{{event=\"{e}\"")));
    let check = |got: &BTreeMap<String, usize>, want: &[String], n: usize| {
        assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want, "exactly these backends answer (no errors): {got:?}");
        assert_eq!(got.values().sum::<usize>(), n);
        assert!(got.values().all(|&k| (50..=150).contains(&k)), "every backend gets about 1/{} of {n}: {got:?}", want.len());
    };
    let all: Vec<String> = {
        let mut v: Vec<String> = (1..=10).map(|i| format!("many{i}")).collect();
        v.sort();
        v
    };
    let before = counters(&c.client().metrics().await.unwrap());
    check(&names(1000), &all, 1000);
    let after = counters(&c.client().metrics().await.unwrap());
    assert!(after[0] - before[0] >= 1000 && after[1] == before[1], "socket LB, no conntrack: {before:?} -> {after:?}");

    for i in [2, 5, 9] {
        pod::del(&c.state, &format!("default/many{i}")).await.unwrap();
    }
    let live: Vec<String> = all.iter().filter(|n| !["many2", "many5", "many9"].contains(&n.as_str())).cloned().collect();
    eventually(Duration::from_secs(15), || async { (names(50).keys().cloned().collect::<Vec<_>>() == live).then_some(()) })
        .await
        .expect("the deleted backends leave the service");
    let before = counters(&c.client().metrics().await.unwrap());
    check(&names(700), &live, 700);
    let after = counters(&c.client().metrics().await.unwrap());
    assert!(after[0] - before[0] >= 700 && after[1] == before[1], "socket LB, no conntrack: {before:?} -> {after:?}");
}

/// With the socket LB a pod's connection goes straight to the backend's address, so when that
/// backend pod is deleted no conntrack entry knows the flow. The datapath remembers the
/// node's deleted pod addresses (`fjord_gone`) and answers packets to them: the TCP
/// connection is reset and the connected UDP socket sees "connection refused" at once,
/// instead of a silent timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_backend_resets_socket_lb_connections_at_once() {
    let c = TestCluster::up_opts(1, "embedded", "native", vec![], true).await;
    let backend = pod::add(&c.state, None, "default/solo1", [("app".to_string(), "solo".to_string())].into()).await.unwrap();
    let bns = pod_netns(&backend);
    echo_server(tcp_listen_in(&bns, "0.0.0.0:8080"), 4);
    udp_name_server(&bns, 5353, "solo1");
    let client = pod::add(&c.state, None, "default/client", BTreeMap::new()).await.unwrap();
    c.client()
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: solo}\nspec:\n  selector: {app: solo}\n  ports:\n  - {name: t, port: 80, targetPort: 8080}\n  - {name: u, port: 53, protocol: UDP, targetPort: 5353}\n")
        .await
        .unwrap();
    let vip = vip_of(&c.client().services().await.unwrap(), "solo");
    let cns = pod_netns(&client);
    eventually(Duration::from_secs(15), || async { tcp_connect_in(&cns, SocketAddr::new(vip.into(), 80)).ok() }).await.expect("solo answers");

    let script = format!(
        r#"import socket, sys
s = socket.create_connection(("{vip}", 80), 5); s.settimeout(5)
s.sendall(b"ping"); print("tcp", s.recv(64).decode(), s.getpeername()[0], flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5); u.connect(("{vip}", 53))
u.send(b"q"); print("udp", u.recv(64).decode(), flush=True)
sys.stdin.readline()
try:
    s.sendall(b"again"); print("tcp-after", "data" if s.recv(64) else "eof")
except ConnectionResetError: print("tcp-after reset")
except socket.timeout: print("tcp-after timeout")
try:
    u.send(b"q"); u.recv(64); print("udp-after answered")
except ConnectionRefusedError: print("udp-after refused")
except socket.timeout: print("udp-after timeout")
"#
    );
    let mut child = c
        .fjordctl_cmd(&["pod", "exec", "default/client", "--", "python3", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let line = |out: &mut std::io::BufReader<std::process::ChildStdout>| {
        let mut l = String::new();
        std::io::BufRead::read_line(out, &mut l).unwrap();
        l.trim().to_string()
    };
    let backend_ip = backend.ip.unwrap().to_string();
    assert_eq!(line(&mut out), format!("tcp ping {vip}"), "connected through the service");
    assert_eq!(line(&mut out), "udp solo1");
    let before = metric(&c.client().metrics().await.unwrap(), "fjord_datapath_events{event=\"to_deleted_pod\"");
    pod::del(&c.state, "default/solo1").await.unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(line(&mut out), "tcp-after reset", "the connection to the deleted backend {backend_ip} is reset, not left hanging");
    assert_eq!(line(&mut out), "udp-after refused", "the connected UDP socket sees ICMP port unreachable");
    assert!(child.wait().unwrap().success());
    let after = metric(&c.client().metrics().await.unwrap(), "fjord_datapath_events{event=\"to_deleted_pod\"");
    assert!(after >= before + 2, "{before} -> {after}");

    // status lists the map with the one deleted address
    let (code, out) = c.fjordctl(&["status", "--verbose"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.contains("fjord_gone") && l.contains(" 1/")), "one deleted address remembered: {out}");
}
