//! End-to-end: a one-node dev cluster, pods with real traffic, restarts, zombies, teardown.
use fjord_e2e::*;
use fjord_net::netns;
use fjordctl::pod;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_talk_tcp_udp_icmp_and_del_cleans_up() {
    let c = TestCluster::up().await;
    let a = pod::add(&c.state, None, "default/a", BTreeMap::new()).await.unwrap();
    let b = pod::add(&c.state, None, "prod/b", [("app".to_string(), "web".to_string())].into()).await.unwrap();
    let (ip_a, ip_b) = (a.ip.unwrap(), b.ip.unwrap());
    assert_ne!(ip_a, ip_b);
    for ip in [ip_a, ip_b] {
        assert!(c.node().pod_cidr.contains(&ip), "{ip} outside {}", c.node().pod_cidr);
        assert_ne!(ip, "10.244.1.1".parse::<std::net::Ipv4Addr>().unwrap(), "gateway handed out");
    }
    let (na, nb) = (pod_netns(&a), pod_netns(&b));

    // TCP a -> b
    let l = tcp_listen_in(&nb, "0.0.0.0:8080");
    let srv = echo_server(l, 1);
    let mut s = tcp_connect_in(&na, SocketAddr::new(ip_b.into(), 8080)).expect("tcp a->b");
    assert_eq!(roundtrip(&mut s, b"hello over tcp").unwrap(), b"hello over tcp");
    assert_eq!(s.peer_addr().unwrap().ip(), std::net::IpAddr::V4(ip_b));
    drop(s);
    srv.join().unwrap();

    // UDP b -> a, and the reply comes back from a's address
    let ua = udp_bind_in(&na, "0.0.0.0:5353");
    let ub = udp_bind_in(&nb, "0.0.0.0:0");
    ub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ua.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ub.send_to(b"ping-udp", SocketAddr::new(ip_a.into(), 5353)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = ua.recv_from(&mut buf).expect("udp at a");
    assert_eq!(&buf[..n], b"ping-udp");
    assert_eq!(from.ip(), std::net::IpAddr::V4(ip_b), "source address preserved (no NAT between pods)");
    ua.send_to(b"pong-udp", from).unwrap();
    let (n, from) = ub.recv_from(&mut buf).expect("udp reply at b");
    assert_eq!(&buf[..n], b"pong-udp");
    assert_eq!(from, SocketAddr::new(ip_a.into(), 5353));

    // ICMP both ways, and pod -> node
    let (code, out) = run_in_ns(&na, &["ping", "-c", "1", "-W", "3", &ip_b.to_string()]);
    assert_eq!(code, 0, "ping a->b: {out}");
    let (code, out) = run_in_ns(&nb, &["ping", "-c", "1", "-W", "3", &ip_a.to_string()]);
    assert_eq!(code, 0, "ping b->a: {out}");
    let (code, out) = run_in_ns(&na, &["ping", "-c", "1", "-W", "3", &c.node().address.to_string()]);
    assert_eq!(code, 0, "ping a->node: {out}");

    // TCP pod -> node (a listener in the node's namespace on its underlay address)
    let l = tcp_listen_in(&c.node_netns(), &format!("{}:9000", c.node().address));
    let srv = echo_server(l, 1);
    let mut s = tcp_connect_in(&na, SocketAddr::new(c.node().address.into(), 9000)).expect("tcp a->node");
    assert_eq!(roundtrip(&mut s, b"to the node").unwrap(), b"to the node");
    drop(s);
    srv.join().unwrap();

    // pod del removes veth, host route and the address
    let atts = c.client().attachments().await.unwrap();
    let veth_b = atts.iter().find(|x| x.ip == ip_b).unwrap().host_veth.clone();
    assert!(links_in(&c.node_netns()).await.contains(&veth_b));
    let before = c.client().status().await.unwrap().ipam.allocated;
    let d = pod::del(&c.state, "prod/b").await.unwrap();
    assert_eq!(d.ip, Some(ip_b));
    assert!(!links_in(&c.node_netns()).await.contains(&veth_b), "host veth left behind");
    let routes = routes_in(&c.node_netns()).await;
    assert!(!routes.iter().any(|r| r.dst.addr() == ip_b), "host route left behind: {routes:?}");
    assert!(!netns::path(&b.netns).exists(), "pod netns left behind");
    assert_eq!(c.client().status().await.unwrap().ipam.allocated, before - 1);
    assert!(c.client().attachments().await.unwrap().iter().all(|x| x.ip != ip_b));
    // a still works; b's name is free again
    let (code, _) = run_in_ns(&na, &["ping", "-c", "1", "-W", "3", &c.node().address.to_string()]);
    assert_eq!(code, 0);
    let b2 = pod::add(&c.state, None, "prod/b", BTreeMap::new()).await.unwrap();
    assert_ne!(b2.ip, Some(ip_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_9_and_restart_keeps_pods_flows_and_ips() {
    let mut c = TestCluster::up().await;
    let a = pod::add(&c.state, None, "default/a", BTreeMap::new()).await.unwrap();
    let b = pod::add(&c.state, None, "default/b", BTreeMap::new()).await.unwrap();
    let l = tcp_listen_in(&pod_netns(&b), "0.0.0.0:7000");
    let srv = echo_server(l, 1);
    let mut conn = tcp_connect_in(&pod_netns(&a), SocketAddr::new(b.ip.unwrap().into(), 7000)).unwrap();
    assert_eq!(roundtrip(&mut conn, b"before").unwrap(), b"before");

    c.kill_agent(0).await;
    // While the agent is down, the established connection keeps working.
    assert_eq!(roundtrip(&mut conn, b"agent-down").unwrap(), b"agent-down");
    c.restart_agent(0).await;

    assert_eq!(roundtrip(&mut conn, b"after-restart").unwrap(), b"after-restart");
    let pods = pod::list(&c.state).await.unwrap();
    let ip = |n: &str| pods.iter().find(|p| p.name == n).unwrap().ip;
    assert_eq!(ip("a"), a.ip, "a kept its IP");
    assert_eq!(ip("b"), b.ip, "b kept its IP");
    assert!(pods.iter().all(|p| p.status == "Running"), "{pods:?}");
    // The allocator knows what is taken after the restart.
    let c3 = pod::add(&c.state, None, "default/c", BTreeMap::new()).await.unwrap();
    assert!(c3.ip != a.ip && c3.ip != b.ip, "restarted agent re-allocated a live pod's IP");
    drop(conn);
    srv.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_deleted_behind_the_agents_back_is_cleaned_up() {
    let c = TestCluster::up().await;
    // Both pods back a service, so the zombie's endpoint must leave the datapath too.
    let app: BTreeMap<String, String> = [("app".to_string(), "z".to_string())].into();
    let a = pod::add(&c.state, None, "default/a", app.clone()).await.unwrap();
    let z = pod::add(&c.state, None, "default/zombie", app).await.unwrap();
    let veth = c.client().attachments().await.unwrap().into_iter().find(|x| Some(x.ip) == z.ip).unwrap().host_veth;
    c.client().apply("apiVersion: v1\nkind: Service\nmetadata: {name: z}\nspec:\n  clusterIP: 10.96.0.70\n  selector: {app: z}\n  ports: [{port: 80}]\n").await.unwrap();
    let backends = || async {
        let mut b = c.client().datapath_frontends().await.ok()?.remove("10.96.0.70:80/TCP")?;
        b.sort();
        Some(b)
    };
    let mut both = vec![format!("{}:80", a.ip.unwrap()), format!("{}:80", z.ip.unwrap())];
    both.sort();
    assert!(eventually(Duration::from_secs(20), || async { backends().await.filter(|b| *b == both) }).await.is_some(), "{:?}", backends().await);
    // The "runtime" crashes: the namespace goes away, no CNI DEL.
    netns::delete(&z.netns).unwrap();
    let client = c.client();
    let gone = eventually(Duration::from_secs(15), || async {
        let atts = client.attachments().await.ok()?;
        atts.iter().all(|x| Some(x.ip) != z.ip).then_some(())
    })
    .await;
    assert!(gone.is_some(), "zombie attachment not cleaned up within 15 s");
    assert!(!links_in(&c.node_netns()).await.contains(&veth), "zombie veth left");
    assert!(!routes_in(&c.node_netns()).await.iter().any(|r| Some(r.dst.addr()) == z.ip), "zombie route left");
    let st = c.client().status().await.unwrap();
    assert_eq!(st.zombies_cleaned, 1);
    assert_eq!(st.ipam.allocated, 1);
    let metrics = c.client().metrics().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("fjord_zombie_cleanups_total") && l.trim_end().ends_with(" 1")), "{metrics}");
    let pods = pod::list(&c.state).await.unwrap();
    assert_eq!(pods.iter().find(|p| p.name == "zombie").unwrap().status, "NetworkLost");
    // ... and its endpoint left the service.
    let only_a = vec![format!("{}:80", a.ip.unwrap())];
    assert!(eventually(Duration::from_secs(20), || async { backends().await.filter(|b| *b == only_a) }).await.is_some(), "zombie endpoint kept: {:?}", backends().await);
    // The healthy pod is untouched.
    assert_eq!(pods.iter().find(|p| p.name == "a").unwrap().ip, a.ip);

    // A pod veth that no attachment owns (e.g. left by a failed DEL) goes at the next sweep.
    netns::run_async_in(&c.node_netns(), || async {
        let nl = fjord_net::Netlink::new().unwrap();
        nl.add_veth("fj0123456789a", "fp0123456789a", None).await.unwrap();
    })
    .await
    .unwrap();
    let ns = c.node_netns();
    let swept = eventually(Duration::from_secs(20), || {
        let ns = ns.clone();
        async move { (!links_in(&ns).await.iter().any(|l| l == "fj0123456789a" || l == "fp0123456789a")).then_some(()) }
    })
    .await;
    assert!(swept.is_some(), "stray pod veth not removed by the sweep");
    assert!(links_in(&c.node_netns()).await.contains(&c.client().attachments().await.unwrap()[0].host_veth), "the live pod's veth must stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_down_leaves_nothing_and_bad_input_is_refused_cleanly() {
    let c = TestCluster::up().await;
    let name = c.state.name.clone();
    pod::add(&c.state, None, "default/a", BTreeMap::new()).await.unwrap();

    // A second `cluster up` with the same name: clear error, existing cluster intact.
    let opts = fjordctl::cluster::UpOptions { name: name.clone(), nodes: 1, store: "embedded".into(), routing: "native".into(), bin_dir: bin_dir(), agent_args: vec![], socket_lb_pods: false };
    let e = fjordctl::cluster::up(&c.home, &opts, &|_| {}).await.unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains(&name), "{e}");
    c.client().healthz().await.expect("existing agent still healthy");
    assert_eq!(pod::list(&c.state).await.unwrap().len(), 1);

    // Pod name collision.
    let e = pod::add(&c.state, None, "default/a", BTreeMap::new()).await.unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("default/a"), "{e}");
    // Bad names, bad node, bad labels.
    for (r, word) in [("Default/a", "namespace"), ("default/A_b", "pod name"), ("default/", "pod name")] {
        let e = pod::add(&c.state, None, r, BTreeMap::new()).await.unwrap_err().to_string();
        assert!(e.contains(word), "{r}: {e}");
    }
    let e = pod::add(&c.state, Some("node9"), "default/x", BTreeMap::new()).await.unwrap_err().to_string();
    assert!(e.contains("node9"), "{e}");
    let e = pod::add(&c.state, None, "default/x", [("bad key".to_string(), "v".to_string())].into()).await.unwrap_err().to_string();
    assert!(e.contains("label key"), "{e}");
    assert!(!netns::exists(&pod::netns_name(&name, "default", "x")), "failed add left a namespace");
    assert_eq!(pod::list(&c.state).await.unwrap().len(), 1, "failed adds left pods behind");
    // Unknown fields in an API body are refused by the agent, naming the field.
    let (status, body) = c
        .client()
        .raw(hyper::Method::POST, "/v1/pods", Some(&serde_json::json!({"namespace":"default","name":"y","node":"node1","colour":"red"})))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 400);
    assert!(String::from_utf8_lossy(&body).contains("colour"), "{}", String::from_utf8_lossy(&body));
    // Multi-node on the embedded store is refused, naming etcd.
    let opts = fjordctl::cluster::UpOptions { name: "other".into(), nodes: 3, store: "embedded".into(), routing: "native".into(), bin_dir: bin_dir(), agent_args: vec![], socket_lb_pods: false };
    let e = fjordctl::cluster::up(&c.home, &opts, &|_| {}).await.unwrap_err().to_string();
    assert!(e.contains("etcd"), "{e}");
    assert!(netns::list("fjord-other.").is_empty());

    // Down removes every namespace, process and file.
    let pid = c.node().agent_pid.unwrap();
    let dir = c.home.cluster_dir(&name);
    fjordctl::cluster::down(&c.home, &name, &|_| {}).await.unwrap();
    assert!(netns::list(&fjordctl::context::ClusterState::netns_prefix(&name)).is_empty(), "namespaces left");
    assert!(!fjordctl::cluster::pid_alive(pid), "agent still running");
    assert!(!dir.exists(), "state dir left");
    assert_eq!(c.home.config().unwrap().current_cluster, None);
    let e = fjordctl::cluster::down(&c.home, &name, &|_| {}).await.unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn agent_refuses_the_initial_network_namespace() {
    // Run in this test's own namespace? No: the point is the root namespace, and the
    // agent must refuse before touching anything.
    let out = std::process::Command::new(bin_dir().join("fjord-agent"))
        .args(["--node", "n1", "--store", "embedded:/nonexistent/x.redb", "--pod-cidr", "10.244.1.0/24", "--api-socket", "/tmp/fjord-never.sock", "--metrics-addr", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to manage the machine's initial network namespace"), "{err}");
    assert!(!std::path::Path::new("/tmp/fjord-never.sock").exists());
}
