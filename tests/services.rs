//! Services end to end: `apply` → endpoint controller → eBPF datapath, with real packets
//! from a client pod to a ClusterIP, on a dev cluster.
use fjord_e2e::*;
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
