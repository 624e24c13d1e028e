//! Cluster mode end to end: a real etcd in the dev cluster, several nodes, native and
//! VXLAN routing, and faults (etcd down, a node gone for good, racing allocations).
use fjord_e2e::*;
use fjord_net::netns;
use fjordctl::pod;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// TCP, UDP and ICMP from pod `from` to pod `to`.
fn assert_pods_talk(from: &pod::PodInfo, to: &pod::PodInfo, port: u16) {
    let (nf, nt) = (pod_netns(from), pod_netns(to));
    let ip_to = to.ip.unwrap();
    let l = tcp_listen_in(&nt, &format!("0.0.0.0:{port}"));
    let srv = echo_server(l, 1);
    let mut s = tcp_connect_in(&nf, SocketAddr::new(ip_to.into(), port)).unwrap_or_else(|e| panic!("tcp {} -> {}: {e}", from.name, to.name));
    assert_eq!(roundtrip(&mut s, b"cross-node tcp").unwrap(), b"cross-node tcp");
    drop(s);
    srv.join().unwrap();
    let ut = udp_bind_in(&nt, &format!("0.0.0.0:{port}"));
    let uf = udp_bind_in(&nf, "0.0.0.0:0");
    ut.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    uf.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    uf.send_to(b"cross-node udp", SocketAddr::new(ip_to.into(), port)).unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = ut.recv_from(&mut buf).unwrap_or_else(|e| panic!("udp {} -> {}: {e}", from.name, to.name));
    assert_eq!(&buf[..n], b"cross-node udp");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(from.ip.unwrap()), "pod source address preserved across nodes");
    ut.send_to(b"back", peer).unwrap();
    let (n, _) = uf.recv_from(&mut buf).expect("udp reply");
    assert_eq!(&buf[..n], b"back");
    let (code, out) = run_in_ns(&nf, &["ping", "-c", "1", "-W", "3", &ip_to.to_string()]);
    assert_eq!(code, 0, "ping {} -> {}: {out}", from.name, to.name);
}

async fn wait_routes(c: &TestCluster, node: usize, want: usize) -> Vec<fjord_net::RouteInfo> {
    let ns = netns::path(&c.node_n(node).netns);
    eventually(Duration::from_secs(30), || {
        let ns = ns.clone();
        async move {
            let r: Vec<_> = routes_in(&ns).await.into_iter().filter(|r| r.fjord).collect();
            (r.len() == want).then_some(r)
        }
    })
    .await
    .unwrap_or_else(|| panic!("node{} never had {want} fjord routes", node + 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_native_routing_pods_talk_across_nodes() {
    let c = TestCluster::up_with(3, "etcd", "native").await;
    // Distinct PodCIDRs, claimed from the cluster CIDR.
    let cidrs: std::collections::BTreeSet<_> = c.state.nodes.iter().map(|n| n.pod_cidr).collect();
    assert_eq!(cidrs.len(), 3, "{cidrs:?}");
    let mut pods = vec![];
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        pods.push(pod::add(&c.state, Some(&format!("node{}", i + 1)), &format!("default/{n}"), BTreeMap::new()).await.unwrap());
    }
    for i in 0..3 {
        assert!(c.node_n(i).pod_cidr.contains(&pods[i].ip.unwrap()));
        let routes = wait_routes(&c, i, 2).await;
        for r in &routes {
            let owner = c.state.nodes.iter().find(|n| n.pod_cidr == r.dst).expect("route to a known PodCIDR");
            assert_eq!(r.gateway, Some(owner.address), "native route via the node's address");
        }
    }
    assert_pods_talk(&pods[0], &pods[1], 7001);
    assert_pods_talk(&pods[2], &pods[0], 7002);
    assert_pods_talk(&pods[1], &pods[2], 7003);
    // Node health: every agent probes the other two over ICMP and TCP.
    let client = c.client_n(0);
    let health = eventually(Duration::from_secs(30), || async {
        let h = client.status().await.ok()?.health;
        (h.len() == 2 && h.iter().all(|p| p.icmp_rtt_us.is_some() && p.tcp_rtt_us.is_some())).then_some(h)
    })
    .await
    .expect("node1 never reached both peers");
    assert_eq!(health.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), vec!["node2", "node3"]);
    // Pod names are unique across the cluster (shared store).
    let e = pod::add(&c.state, Some("node3"), "default/a", BTreeMap::new()).await.unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(pod::list(&c.state).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_routing_pods_talk_across_nodes() {
    let c = TestCluster::up_with(3, "etcd", "vxlan").await;
    let mut pods = vec![];
    for i in 1..=3 {
        pods.push(pod::add(&c.state, Some(&format!("node{i}")), &format!("default/p{i}"), BTreeMap::new()).await.unwrap());
    }
    for i in 0..3 {
        let routes = wait_routes(&c, i, 2).await;
        for r in &routes {
            let other = c.state.nodes.iter().find(|n| n.pod_cidr == r.dst).expect("a route per other node's PodCIDR");
            assert_ne!(other.name, c.node_n(i).name);
            assert_eq!(r.gateway, Some(other.pod_cidr.network()), "VXLAN route via the remote VTEP address");
        }
        let links = links_in(&netns::path(&c.node_n(i).netns)).await;
        assert!(links.contains(&"vxfjord".to_string()), "{links:?}");
    }
    // The underlay itself has no route to pod addresses: only the tunnel can carry them.
    let (_, out) = run_in_ns(&netns::path(&c.state.ext_netns), &["ip", "route", "get", &pods[1].ip.unwrap().to_string()]);
    assert!(!out.contains("via 172.18"), "{out}");
    let mut port = 7101;
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                assert_pods_talk(&pods[a], &pods[b], port);
                port += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_30s_keeps_forwarding_and_agents_resync_without_flushing() {
    let mut c = TestCluster::up_with(2, "etcd", "native").await;
    let a = pod::add(&c.state, Some("node1"), "default/a", BTreeMap::new()).await.unwrap();
    let b = pod::add(&c.state, Some("node2"), "default/b", [("app".to_string(), "db".to_string())].into()).await.unwrap();
    wait_routes(&c, 0, 1).await;
    let l = tcp_listen_in(&pod_netns(&b), "0.0.0.0:7200");
    // pod connections: conn, conn2; ClusterIP connections: before, during, with node2's agent
    // restarted, after
    let srv = echo_server(l, 6);
    let mut conn = tcp_connect_in(&pod_netns(&a), SocketAddr::new(b.ip.unwrap().into(), 7200)).unwrap();
    assert_eq!(roundtrip(&mut conn, b"before").unwrap(), b"before");
    // A ClusterIP whose only backend is b (on node2), used from a (on node1).
    c.client_n(0).apply("apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec:\n  clusterIP: 10.96.0.90\n  selector: {app: db}\n  ports: [{port: 80, targetPort: 7200}]\n").await.unwrap();
    let vip = SocketAddr::new(Ipv4Addr::new(10, 96, 0, 90).into(), 80);
    let apis = [c.client_n(0), c.client_n(1)];
    let frontends = |i: usize| {
        let api = apis[i].clone();
        async move { api.datapath_frontends().await.unwrap() }
    };
    let programmed = eventually(Duration::from_secs(20), || async {
        let fe = frontends(0).await;
        (fe.get("10.96.0.90:80/TCP").map(Vec::len) == Some(1)).then_some(fe)
    })
    .await
    .expect("node1 programs the ClusterIP with b");
    let via_vip = |what: &'static [u8]| {
        let mut s = tcp_connect_in(&pod_netns(&a), vip).unwrap_or_else(|e| panic!("ClusterIP connect ({}): {e}", String::from_utf8_lossy(what)));
        assert_eq!(roundtrip(&mut s, what).unwrap(), what);
    };
    via_vip(b"vip-before");

    let etcd = c.state.etcd.clone().unwrap();
    assert!(fjordctl::cluster::stop_etcd(&etcd, nix::sys::signal::Signal::SIGKILL).unwrap());
    let t0 = std::time::Instant::now();
    // During the outage: the established flow and new connections (to the pod and through the
    // ClusterIP) all work.
    assert_eq!(roundtrip(&mut conn, b"etcd-down").unwrap(), b"etcd-down");
    let mut conn2 = tcp_connect_in(&pod_netns(&a), SocketAddr::new(b.ip.unwrap().into(), 7200)).expect("new connection during the outage");
    assert_eq!(roundtrip(&mut conn2, b"new-during-outage").unwrap(), b"new-during-outage");
    via_vip(b"vip-during-outage");
    // A new pod cannot be added: a clear, retryable error.
    let e = pod::add(&c.state, Some("node1"), "default/x", BTreeMap::new()).await.unwrap_err().to_string();
    assert!(!e.is_empty());
    assert!(!netns::exists(&pod::netns_name(&c.state.name, "default", "x")), "failed add left its namespace");
    // An agent that starts while the store is unreachable waits for it (retrying with backoff)
    // instead of exiting, and touches nothing meanwhile: node2's agent, killed and started again.
    c.kill_agent(1).await;
    let node2 = c.node_n(1).clone();
    let pid2 = fjordctl::cluster::start_agent(&bin_dir(), &node2).unwrap();
    // Stay down for 30 s, checking the datapath keeps its routes and services.
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(routes_in(&netns::path(&c.node_n(0).netns)).await.iter().filter(|r| r.fjord).count(), 1, "route flushed while etcd was down");
        assert_eq!(roundtrip(&mut conn, b"still").unwrap(), b"still");
        assert_eq!(frontends(0).await, programmed, "node1's services changed while etcd was down");
        assert!(fjordctl::cluster::pid_alive(pid2), "node2's agent exited because the store was unreachable");
    }
    via_vip(b"vip-agent-restarted");
    let log2 = std::fs::read_to_string(node2.dir.join("agent.log")).unwrap();
    let retries = log2.matches("store not reachable yet; retrying").count();
    assert!(retries >= 3, "node2's agent should retry the store with backoff, saw {retries} retries");
    // etcd returns (same data dir): agents reconnect and resync.
    let pid = restart_etcd(&c);
    let mut st = c.home.load_cluster(&c.state.name).unwrap();
    st.etcd.as_mut().unwrap().pid = Some(pid);
    st.nodes[1].agent_pid = Some(pid2);
    c.home.save_cluster(&st).unwrap();
    c.reload();
    fjordctl::cluster::wait_for_agent(c.node_n(1), pid2).await.expect("node2's agent comes up once etcd is back");
    for i in 0..2 {
        let client = c.client_n(i);
        let ok = eventually(Duration::from_secs(60), || async {
            let s = client.status().await.ok()?;
            (s.store.healthy && s.nodes.len() == 2).then_some(())
        })
        .await;
        assert!(ok.is_some(), "node{}'s agent did not reconnect to etcd", i + 1);
    }
    let x = eventually(Duration::from_secs(60), || async { pod::add(&c.state, Some("node1"), "default/y", BTreeMap::new()).await.ok() }).await.expect("pod add after etcd returned");
    assert!(x.ip.is_some());
    assert_eq!(roundtrip(&mut conn, b"after").unwrap(), b"after");
    assert_eq!(wait_routes(&c, 0, 1).await.len(), 1);
    assert_eq!(frontends(0).await, programmed, "node1's resync changed its services");
    via_vip(b"vip-after");
    drop((conn, conn2));
    srv.join().unwrap();
}

fn restart_etcd(c: &TestCluster) -> u32 {
    use std::os::unix::process::CommandExt;
    let e = c.state.etcd.as_ref().unwrap();
    let log = std::fs::OpenOptions::new().append(true).open(e.data_dir.join("etcd.log")).unwrap();
    let peer = format!("http://{}:2380", e.address);
    let mut cmd = std::process::Command::new("/usr/bin/etcd");
    cmd.args(["--name", "fjord", "--data-dir"])
        .arg(e.data_dir.join("data"))
        .args(["--listen-client-urls", &e.endpoint, "--advertise-client-urls", &e.endpoint])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer, "--initial-cluster", &format!("fjord={peer}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    netns::command_in(&mut cmd, &netns::path(&e.netns)).unwrap();
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    cmd.spawn().unwrap().id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_for_good_leaves_every_other_node_after_its_lease() {
    let c = TestCluster::up_with(3, "etcd", "native").await;
    for i in 0..3 {
        wait_routes(&c, i, 2).await;
    }
    // A service with one backend on node1 and one on node3: every node programs both.
    let web: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
    let w1 = pod::add(&c.state, Some("node1"), "default/w1", web.clone()).await.unwrap();
    let w3 = pod::add(&c.state, Some("node3"), "default/w3", web).await.unwrap();
    c.client_n(0).apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.81\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n").await.unwrap();
    let backends = |i: usize| {
        let api = c.client_n(i);
        async move {
            let mut b = api.datapath_frontends().await.ok()?.remove("10.96.0.81:80/TCP")?;
            b.sort();
            Some(b)
        }
    };
    let both = {
        let mut v = vec![format!("{}:8080", w1.ip.unwrap()), format!("{}:8080", w3.ip.unwrap())];
        v.sort();
        v
    };
    for i in 0..3 {
        let got = eventually(Duration::from_secs(20), || async { backends(i).await.filter(|b| *b == both) }).await;
        assert!(got.is_some(), "node{} programs both backends: {:?}", i + 1, backends(i).await);
    }
    // `fjordctl get nodes -o json`: every node with its address, PodCIDR and health.
    let get_nodes = || {
        let out = c.fjordctl_cmd(&["get", "nodes", "-o", "json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        v.into_iter().map(|n| (n["name"].as_str().unwrap().to_string(), n)).collect::<BTreeMap<_, _>>()
    };
    let nodes = get_nodes();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for n in &c.state.nodes {
        let row = &nodes[&n.name];
        assert_eq!(row["addresses"][0], n.address.to_string(), "{row}");
        assert_eq!(row["podCidr"], n.pod_cidr.to_string(), "{row}");
        assert_eq!(row["health"], "Ready", "{row}");
    }
    let dead = c.node_n(2).clone();
    // kill -9: no goodbye; only the lease (5 s in the dev cluster) removes it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dead.agent_pid.unwrap() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    for i in 0..2 {
        let routes = wait_routes(&c, i, 1).await;
        assert!(routes.iter().all(|r| r.dst != dead.pod_cidr), "route to the dead node left on node{}", i + 1);
        // Its endpoints (published under its lease) leave the other nodes' datapaths too.
        let only_w1 = vec![format!("{}:8080", w1.ip.unwrap())];
        let got = eventually(Duration::from_secs(20), || async { backends(i).await.filter(|b| *b == only_w1) }).await;
        assert!(got.is_some(), "node{} still sends to the dead node's pod: {:?}", i + 1, backends(i).await);
    }
    let st = c.client_n(0).status().await.unwrap();
    assert_eq!(st.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), vec!["node1", "node2"]);
    let nodes = get_nodes();
    assert_eq!(nodes["node1"]["health"], "Ready");
    let h = nodes["node3"]["health"].as_str().unwrap();
    assert!(h.starts_with("NotRegistered; NotReady"), "node3 after its lease: {h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cni_adds_never_share_an_ip_and_corrupt_records_are_skipped() {
    let c = TestCluster::up_with(2, "etcd", "native").await;
    // 12 pods on node1 at once (each ADD a separate plugin process).
    let mut tasks = vec![];
    for i in 0..12 {
        let st = c.state.clone();
        tasks.push(tokio::spawn(async move { pod::add(&st, Some("node1"), &format!("race/p{i}"), BTreeMap::new()).await }));
    }
    let mut ips = std::collections::BTreeSet::new();
    for t in tasks {
        let p = t.await.unwrap().unwrap();
        assert!(ips.insert(p.ip.unwrap()), "IP {:?} given twice", p.ip);
    }
    assert_eq!(ips.len(), 12);
    // A corrupt value under the prefix: logged and skipped; the good nodes stay routed.
    let bad_ns = netns::path(&c.state.etcd.as_ref().unwrap().netns);
    let endpoint = c.state.etcd.as_ref().unwrap().endpoint.clone();
    let put = netns::run_async_in(&bad_ns, move || async move {
        let s = fjord_store::etcd::EtcdStore::connect(&fjord_store::etcd::EtcdOptions { endpoints: vec![endpoint], ..Default::default() }).await?;
        use fjord_store::Store;
        s.put("/fjord/v1/nodes/garbage", b"{not json".to_vec(), None).await?;
        s.put(&fjord_model::keys::service("default", "garbage"), b"{not json".to_vec(), None).await?;
        s.put(&fjord_model::keys::endpointslice("default", "garbage"), b"[1,2".to_vec(), None).await
    })
    .await
    .unwrap();
    put.unwrap();
    // A change after it still gets applied: a third pod on node2 is reachable from node1.
    let a = pod::add(&c.state, Some("node1"), "default/a", BTreeMap::new()).await.unwrap();
    let b = pod::add(&c.state, Some("node2"), "default/b", [("app".to_string(), "b".to_string())].into()).await.unwrap();
    assert_eq!(wait_routes(&c, 0, 1).await[0].gateway, Some(c.node_n(1).address));
    assert_pods_talk(&a, &b, 7300);
    // ... and so does a service applied after the corrupt service and slice records.
    c.client_n(0).apply("apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  clusterIP: 10.96.0.91\n  selector: {app: b}\n  ports: [{port: 80, targetPort: 7301}]\n").await.unwrap();
    let want = vec![format!("{}:7301", b.ip.unwrap())];
    for i in 0..2 {
        let api = c.client_n(i);
        let got = eventually(Duration::from_secs(20), || async { api.datapath_frontends().await.ok()?.remove("10.96.0.91:80/TCP").filter(|x| *x == want) }).await;
        assert!(got.is_some(), "node{} did not program the service next to the corrupt records", i + 1);
    }
    let log = std::fs::read_to_string(c.node_n(0).dir.join("agent.log")).unwrap();
    assert!(log.contains("skipping corrupt node record"), "corrupt node record not reported");
    assert!(log.contains("skipping corrupt record") && log.contains("/services/default/garbage"), "corrupt service record not reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podcidr_allocation_races_never_produce_duplicates() {
    // Eight agents' allocators racing on one real etcd (inside a namespace of ours).
    let c = TestCluster::up_with(1, "etcd", "native").await;
    let e = c.state.etcd.clone().unwrap();
    let ns = netns::path(&e.netns);
    let got = netns::run_async_in(&ns, move || async move {
        let s: std::sync::Arc<dyn fjord_store::Store> = std::sync::Arc::new(
            fjord_store::etcd::EtcdStore::connect(&fjord_store::etcd::EtcdOptions { endpoints: vec![e.endpoint], ..Default::default() }).await.unwrap(),
        );
        let mut tasks = vec![];
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                fjord_agent::cluster::allocate_pod_cidr(s.as_ref(), &format!("racer{i}"), "10.244.0.0/16".parse().unwrap(), 24).await.unwrap()
            }));
        }
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        // A node that comes back keeps its range.
        let again = fjord_agent::cluster::allocate_pod_cidr(s.as_ref(), "racer3", "10.244.0.0/16".parse().unwrap(), 24).await.unwrap();
        (out, again)
    })
    .await
    .unwrap();
    let (cidrs, again) = got;
    let set: std::collections::BTreeSet<_> = cidrs.iter().collect();
    assert_eq!(set.len(), 8, "duplicate PodCIDRs: {cidrs:?}");
    assert!(!set.contains(&c.node().pod_cidr), "a racer got node1's range");
    assert_eq!(again, cidrs[3]);
    let _: Ipv4Addr = again.network();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusterip_with_backends_on_three_nodes_works_from_every_node() {
    use std::io::{Read, Write};
    let c = TestCluster::up_with(3, "etcd", "native").await;
    for i in 0..3 {
        wait_routes(&c, i, 2).await;
    }
    let mut clients = vec![];
    for i in 1..=3 {
        let w = pod::add(&c.state, Some(&format!("node{i}")), &format!("default/web{i}"), [("app".to_string(), "web".to_string())].into()).await.unwrap();
        let l = tcp_listen_in(&pod_netns(&w), "0.0.0.0:8080");
        let name = w.name.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.write_all(name.as_bytes());
            }
        });
        clients.push(pod::add(&c.state, Some(&format!("node{i}")), &format!("default/client{i}"), BTreeMap::new()).await.unwrap());
    }
    c.client_n(0)
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.80\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\n")
        .await
        .unwrap();
    let vip = SocketAddr::new(Ipv4Addr::new(10, 96, 0, 80).into(), 80);
    for (i, cl) in clients.iter().enumerate() {
        let ns = pod_netns(cl);
        // Every node's endpoint controller publishes its pod; every node programs all three.
        let seen = eventually(Duration::from_secs(20), || {
            let ns = ns.clone();
            async move {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..60 {
                    let mut s = tcp_connect_in(&ns, vip).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                    let mut out = String::new();
                    s.read_to_string(&mut out).ok()?;
                    seen.insert(out);
                }
                (seen.len() == 3).then_some(seen)
            }
        })
        .await;
        assert!(seen.is_some(), "clients on node{} did not reach backends on all three nodes", i + 1);
    }
    // NodePort: from the external namespace, every node's address reaches the backends of all
    // three nodes (remote ones through SNAT to the ingress node).
    let ext = fjord_net::netns::path(&c.state.ext_netns);
    for i in 0..3 {
        let addr = SocketAddr::new(c.node_n(i).address.into(), 30080);
        let ext = ext.clone();
        let seen = eventually(Duration::from_secs(20), || {
            let ext = ext.clone();
            async move {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..60 {
                    let mut s = tcp_connect_in(&ext, addr).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                    let mut out = String::new();
                    s.read_to_string(&mut out).ok()?;
                    seen.insert(out);
                }
                (seen.len() == 3).then_some(seen)
            }
        })
        .await;
        assert!(seen.is_some(), "NodePort {addr} did not reach backends on all three nodes");
    }
    // Every agent measures the store's watch lag from the other nodes' heartbeats.
    for i in 0..3 {
        let api = c.client_n(i);
        let n = eventually(Duration::from_secs(20), || async {
            let m = api.metrics().await.ok()?;
            let count: f64 = m.lines().find(|l| l.starts_with("fjord_store_watch_lag_seconds_count{"))?.rsplit(' ').next()?.parse().ok()?;
            (count >= 2.0).then_some(count)
        })
        .await;
        assert!(n.is_some(), "node {i} saw no heartbeats of its peers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_kill_9_keeps_its_pods_working_and_resyncs_on_restart() {
    let mut c = TestCluster::up_with(3, "etcd", "native").await;
    for i in 0..3 {
        wait_routes(&c, i, 2).await;
    }
    let a = pod::add(&c.state, Some("node1"), "default/a", BTreeMap::new()).await.unwrap();
    let b = pod::add(&c.state, Some("node2"), "default/b", BTreeMap::new()).await.unwrap();
    let l = tcp_listen_in(&pod_netns(&b), "0.0.0.0:7400");
    let srv = echo_server(l, 2);
    let mut conn = tcp_connect_in(&pod_netns(&a), SocketAddr::new(b.ip.unwrap().into(), 7400)).unwrap();
    assert_eq!(roundtrip(&mut conn, b"before").unwrap(), b"before");
    let node2 = c.node_n(1).clone();
    c.kill_agent(1).await;
    // Its pod keeps working: the established flow and a new connection.
    assert_eq!(roundtrip(&mut conn, b"agent-dead").unwrap(), b"agent-dead");
    let mut conn2 = tcp_connect_in(&pod_netns(&a), SocketAddr::new(b.ip.unwrap().into(), 7400)).expect("new connection while node2's agent is dead");
    assert_eq!(roundtrip(&mut conn2, b"new").unwrap(), b"new");
    // Restart: same PodCIDR, routes everywhere again, the flow survives.
    c.restart_agent(1).await;
    assert_eq!(c.client_n(1).status().await.unwrap().ipam.pod_cidr, node2.pod_cidr, "a node that comes back keeps its range");
    for i in 0..3 {
        wait_routes(&c, i, 2).await;
    }
    assert_eq!(roundtrip(&mut conn, b"after").unwrap(), b"after");
    let p = pod::list(&c.state).await.unwrap();
    assert_eq!(p.iter().find(|x| x.name == "b").unwrap().ip, b.ip);
    drop((conn, conn2));
    srv.join().unwrap();
}

/// A client on one node connected straight to a pod on another node (a direct pod IP, or a
/// backend the socket LB chose): when that pod is deleted, its node answers the client's next
/// packets (TCP RST, ICMP port unreachable for UDP) instead of letting them vanish, in both
/// routing modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_on_another_node_resets_its_connections_native_and_vxlan() {
    for routing in ["native", "vxlan"] {
        let c = TestCluster::up_with(2, "etcd", routing).await;
        let server = pod::add(&c.state, Some("node1"), "default/server", BTreeMap::new()).await.unwrap();
        let client = pod::add(&c.state, Some("node2"), "default/client", BTreeMap::new()).await.unwrap();
        wait_routes(&c, 1, 1).await;
        let (sns, cns) = (pod_netns(&server), pod_netns(&client));
        let _srv = echo_server(tcp_listen_in(&sns, "0.0.0.0:7300"), 1);
        let udp_srv = udp_bind_in(&sns, "0.0.0.0:7301");
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while let Ok((n, from)) = udp_srv.recv_from(&mut b) {
                let _ = udp_srv.send_to(&b[..n], from);
            }
        });
        let sip = server.ip.unwrap();
        let mut conn = tcp_connect_in(&cns, SocketAddr::new(sip.into(), 7300)).unwrap();
        assert_eq!(roundtrip(&mut conn, b"before").unwrap(), b"before", "{routing}");
        let u = udp_bind_in(&cns, "0.0.0.0:0");
        u.connect(SocketAddr::new(sip.into(), 7301)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.send(b"q").unwrap();
        let mut b = [0u8; 64];
        assert_eq!(u.recv(&mut b).unwrap(), 1, "{routing}");

        pod::del(&c.state, "default/server").await.unwrap();
        let err = roundtrip(&mut conn, b"after").expect_err("the server pod is gone");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{routing}: reset at once, not a timeout: {err}");
        u.send(b"q").unwrap();
        let err = u.recv(&mut b).expect_err("the server pod is gone");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{routing}: ICMP port unreachable: {err}");
        let m = c.client_n(0).metrics().await.unwrap();
        let gone: f64 = m.lines().filter(|l| l.contains("event=\"to_deleted_pod\"")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        assert!(gone >= 2.0, "node1 answered for its deleted pod ({routing}): {gone}");
    }
}
