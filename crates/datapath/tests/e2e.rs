//! End-to-end tests with real packets through the real kernel: test-created
//! network namespaces only (prefix fjtdp-), everything removed on drop.
mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use fjord_datapath::{Datapath, DatapathError, Stat};
use fjord_lb::{translate, Backend, Frontend, FrontendEntries, LbConfig, Protocol, Service, ServiceKey};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

fn lbcfg() -> LbConfig {
    LbConfig { maglev_size: 1021, ..LbConfig::default() }
}

/// ClusterIP 10.96.0.10: 80/TCP -> :8080, 53/UDP -> :5353 on the given pods.
fn cluster_ip(backends: &[Ipv4Addr]) -> Vec<FrontendEntries> {
    let svc = Service {
        name: "default/web".into(),
        frontends: vec![
            Frontend {
                vip: VIP,
                port: 80,
                protocol: Protocol::Tcp,
                backends: backends.iter().map(|ip| Backend::ready(*ip, TCP_TARGET)).collect(),
                options: Default::default(),
            },
            Frontend {
                vip: VIP,
                port: 53,
                protocol: Protocol::Udp,
                backends: backends.iter().map(|ip| Backend::ready(*ip, UDP_TARGET)).collect(),
                options: Default::default(),
            },
        ],
    };
    translate(&svc, &lbcfg()).expect("translate")
}

fn program(dp: &mut Datapath, entries: &[FrontendEntries]) {
    for e in entries {
        dp.upsert(e).unwrap_or_else(|err| panic!("upsert {}: {err}", e.key));
    }
}

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// Pods: 0 = client, 1..=3 = backends "b1".."b3".
fn start_backends(topo: &Topo, n: usize) -> Vec<Servers> {
    (1..=n).map(|i| spawn_servers(&topo.pods[i].ns.name, &format!("b{i}"), TCP_TARGET, UDP_TARGET)).collect()
}

#[test]
fn clusterip_tcp_udp_with_maglev_conntrack_and_revnat() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(4);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 3);
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    let entries = cluster_ip(&backends);
    program(&mut dp, &entries);
    // the kernel's tables hold exactly what fjord-lb computed (the compact tables, in the
    // service entries, pick every backend below)
    for e in &entries {
        let table = dp.maglev_table(&e.key).unwrap();
        let want: Vec<_> = e.maglev.iter().map(|&i| e.backends[i as usize]).collect();
        assert_eq!(table, want, "maglev table of {}", e.key);
        let (list, compact) = dp.inline_backends(&e.key).unwrap().expect("3 backends fit the entry");
        assert_eq!(list, e.backends);
        assert_eq!(compact, e.compact.iter().map(|&i| e.backends[i as usize]).collect::<Vec<_>>(), "compact table of {}", e.key);
    }
    // a service without backends: TCP SYN is answered with RST
    let empty = Service {
        name: "default/empty".into(),
        frontends: vec![Frontend { vip: Ipv4Addr::new(10, 96, 0, 11), port: 80, protocol: Protocol::Tcp, backends: vec![], options: Default::default() }],
    };
    program(&mut dp, &translate(&empty, &lbcfg()).unwrap());

    let client = topo.pods[0].ns.name.clone();
    const N: usize = 1000;
    let direct_to = SocketAddr::from((topo.pods[2].ip, TCP_TARGET));
    let direct_ips: Vec<Ipv4Addr> = backends.clone();
    let (spread, refused, udp, direct, reused) = in_netns(&client, || {
        // plain pod-to-pod traffic passes the programs untouched
        let direct = tcp_request(direct_to).expect("direct pod-to-pod connection");
        let mut spread: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..N {
            let b = tcp_request(tcp_vip()).unwrap_or_else(|e| panic!("connection {i} to {VIP}:80 failed: {e}"));
            *spread.entry(b).or_default() += 1;
        }
        let refused = tcp_request(SocketAddr::from(([10, 96, 0, 11], 80))).unwrap_err();

        // UDP: one socket, 64 queries in flight, every answer from the VIP
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let dst = SocketAddr::from((VIP, 53));
        for q in 0..64 {
            u.send_to(format!("q{q}").as_bytes(), dst).unwrap();
        }
        let mut answers = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..64 {
            let (n, from) = u.recv_from(&mut buf).expect("UDP answer (reply lost?)");
            answers.push((from, String::from_utf8_lossy(&buf[..n]).to_string()));
        }
        // the same client port, first to the VIP, then directly to a backend:
        // the direct replies must not be reverse-NATed by the old flow's entry
        let port = {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            u.send_to(b"via-vip", dst).unwrap();
            let (_, from) = u.recv_from(&mut buf).expect("answer via VIP");
            assert_eq!(from, dst);
            u.local_addr().unwrap().port()
        };
        let mut reused = Vec::new();
        for ip in &direct_ips {
            let u = UdpSocket::bind(("0.0.0.0", port)).unwrap();
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let to = SocketAddr::from((*ip, UDP_TARGET));
            u.send_to(b"direct", to).unwrap();
            let (_, from) = u.recv_from(&mut buf).expect("direct answer");
            reused.push((to, from));
        }
        (spread, refused, answers, direct, reused)
    });
    for (to, from) in &reused {
        assert_eq!(from, to, "direct reply must come from the backend itself, not the VIP");
    }
    assert_eq!(direct, "b2");

    // TCP: every connection reached a backend; spread within tolerance
    assert_eq!(spread.values().sum::<usize>(), N);
    assert_eq!(spread.len(), 3, "all three backends used: {spread:?}");
    for (b, n) in &spread {
        // expected 333 each; 200..=466 is > 8 standard deviations wide
        assert!((200..=466).contains(n), "backend {b} got {n} of {N}: {spread:?}");
    }
    println!("TCP spread over {N} connections: {spread:?}");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "no-backend service: {refused}");

    // UDP: all answered, from VIP:53 (reverse NAT), by one backend (same 5-tuple)
    let mut ids: Vec<String> = udp.iter().map(|(_, p)| p.split_whitespace().nth(1).unwrap().to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 64, "every query answered once");
    for (from, _) in &udp {
        assert_eq!(*from, SocketAddr::from((VIP, 53)), "reply source must be the VIP");
    }
    let first = udp[0].1.split_whitespace().next().unwrap().to_string();
    assert!(udp.iter().all(|(_, p)| p.starts_with(&first)), "one flow, one backend");

    let c = dp.counters().unwrap();
    assert!(c["dnat"] >= (N * 3) as u64, "{c:?}");
    assert!(c["revnat"] >= (N * 2) as u64, "{c:?}");
    assert_eq!(c["ct_new"], (N + 2) as u64, "one conntrack entry per TCP connection + 2 UDP flows: {c:?}");
    assert!(c["ct_stale"] >= 1, "{c:?}");
    assert_eq!(c["rst_sent"], 1, "{c:?}");
    assert_eq!(c["error"], 0, "{c:?}");
    let stats: BTreeMap<_, _> = dp.map_stats().unwrap().into_iter().map(|s| (s.name, s)).collect();
    assert_eq!(stats["fjord_services"].entries, 3);
    assert_eq!(stats["fjord_backends"].entries, 6, "3 pods × (TCP, UDP)");
    assert_eq!(stats["fjord_maglev"].entries, 0, "3 backends, no affinity: the compact tables in the entries serve them");
    assert_eq!(stats["fjord_revnat"].entries, 3);
    // every flow has 2 entries, minus the reply entry removed for the reused port
    assert_eq!(stats["fjord_ct"].entries, 2 * (N as u32 + 2) - 1);
    drop(dp);
}

#[test]
fn removing_a_backend_keeps_established_flows_to_survivors() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(4);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 3);
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    program(&mut dp, &cluster_ip(&backends));
    let client = topo.pods[0].ns.name.clone();

    std::thread::scope(|s| {
        let (to_client, from_test) = std::sync::mpsc::channel::<u8>();
        let (to_test, from_client) = std::sync::mpsc::channel::<Vec<(usize, String)>>();
        let h = s.spawn(move || {
            enter(&client);
            let mut conns: Vec<(Conn, String)> = (0..30)
                .map(|_| {
                    let mut c = Conn::open(tcp_vip()).expect("open");
                    let b = c.ask("first").expect("first answer");
                    (c, b)
                })
                .collect();
            to_test.send(conns.iter().enumerate().map(|(i, (_, b))| (i, b.clone())).collect()).unwrap();
            // phase 2: after b3 was removed from the service
            from_test.recv().unwrap();
            let mut survived = Vec::new();
            for (i, (c, b)) in conns.iter_mut().enumerate() {
                if b != "b3" {
                    let now = c.ask("again").unwrap_or_else(|e| panic!("established connection {i} to {b} broke: {e}"));
                    survived.push((i, now));
                }
            }
            let fresh: Vec<(usize, String)> = (0..200).map(|i| (i, tcp_request(tcp_vip()).expect("new connection"))).collect();
            to_test.send(survived).unwrap();
            to_test.send(fresh).unwrap();
            // phase 3: b3 is back; the Maglev table changed again
            from_test.recv().unwrap();
            let mut after = Vec::new();
            for (i, (c, b)) in conns.iter_mut().enumerate() {
                if b != "b3" {
                    after.push((i, c.ask("third").unwrap_or_else(|e| panic!("connection {i} to {b} broke: {e}"))));
                }
            }
            to_test.send(after).unwrap();
        });
        let initial = from_client.recv().unwrap();
        let by_id: BTreeMap<usize, String> = initial.into_iter().collect();
        assert!(by_id.values().any(|b| b != "b3"));

        dp.upsert_many(&cluster_ip(&backends[..2])).expect("remove b3 (batch)");
        assert_eq!(dp.service_backends(&ServiceKey { vip: VIP, port: 80, protocol: Protocol::Tcp }).unwrap().len(), 2);
        to_client.send(1).unwrap();
        let survived = from_client.recv().unwrap();
        let fresh = from_client.recv().unwrap();
        for (i, b) in &survived {
            assert_eq!(b, &by_id[i], "connection {i} must stay on its backend");
        }
        assert!(fresh.iter().all(|(_, b)| b == "b1" || b == "b2"), "no new connection to the removed backend");
        assert!(fresh.iter().any(|(_, b)| b == "b1") && fresh.iter().any(|(_, b)| b == "b2"));

        dp.upsert_many(&cluster_ip(&backends)).expect("add b3 back (batch)");
        to_client.send(2).unwrap();
        let after = from_client.recv().unwrap();
        for (i, b) in &after {
            assert_eq!(b, &by_id[i], "connection {i} keeps its backend when the table changes");
        }
        h.join().unwrap();
    });
    assert_eq!(dp.counter(Stat::Error).unwrap(), 0);
}

#[test]
fn pinned_maps_and_links_survive_a_loader_restart() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(3);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 2);
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    let entries = cluster_ip(&backends);
    program(&mut dp, &entries);
    let before = dp.map_stats().unwrap();
    let client = topo.pods[0].ns.name.clone();

    std::thread::scope(|s| {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (res_tx, res_rx) = std::sync::mpsc::channel::<String>();
        let h = s.spawn(move || {
            enter(&client);
            let mut c = Conn::open(tcp_vip()).unwrap();
            res_tx.send(c.ask("one").unwrap()).unwrap();
            wait.recv().unwrap(); // loader dropped: programs stay attached via pinned links
            res_tx.send(c.ask("two").unwrap()).unwrap();
            wait.recv().unwrap(); // new loader attached (program replaced in the links)
            res_tx.send(c.ask("three").unwrap()).unwrap();
            res_tx.send(tcp_request(tcp_vip()).unwrap()).unwrap();
        });
        let b = res_rx.recv().unwrap();
        drop(dp);
        go.send(()).unwrap();
        assert_eq!(res_rx.recv().unwrap(), b, "after the loader exited");

        let mut dp2 = Datapath::load(pins.config()).expect("reload with pinned maps");
        assert_eq!(dp2.map_stats().unwrap()[..4], before[..4], "state recovered from the pinned maps");
        assert_eq!(dp2.services().len(), 2);
        attach_all(&mut dp2, &topo);
        go.send(()).unwrap();
        assert_eq!(res_rx.recv().unwrap(), b, "after re-attaching the new programs");
        let fresh = res_rx.recv().unwrap();
        assert!(fresh == "b1" || fresh == "b2");
        h.join().unwrap();

        // re-programming the same service after the restart changes nothing
        program(&mut dp2, &entries);
        assert_eq!(dp2.map_stats().unwrap()[..4], before[..4]);
        let mut attached = dp2.attached();
        attached.sort();
        let mut veths: Vec<String> = topo.pods.iter().map(|p| p.veth.clone()).collect();
        veths.sort();
        assert_eq!(attached, veths);
        let node = topo.node.name.clone();
        in_netns(&node, || {
            for v in &veths {
                dp2.detach(v).unwrap();
            }
            assert!(matches!(dp2.detach(&veths[0]), Err(DatapathError::NotAttached { .. })));
        });
        assert!(dp2.attached().is_empty());
        // detached: the VIP is no longer translated (nothing answers on 10.96.0.10)
        let client = topo.pods[0].ns.name.clone();
        let r = in_netns(&client, || {
            std::net::TcpStream::connect_timeout(&tcp_vip(), Duration::from_millis(300)).map(|_| ())
        });
        assert!(r.is_err(), "VIP must not answer after detach");
    });
    drop(topo);
    assert!(leftover_netns().is_empty(), "netns left: {:?}", leftover_netns());
}

#[test]
fn udp_to_a_service_without_backends_gets_icmp_unreachable_and_stale_links_pruned() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let mut topo = Topo::new(2);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let empty = Service {
        name: "default/empty-dns".into(),
        frontends: vec![Frontend { vip: VIP, port: 53, protocol: Protocol::Udp, backends: vec![], options: Default::default() }],
    };
    dp.upsert_many(&translate(&empty, &lbcfg()).unwrap()).unwrap();
    let client = topo.pods[0].ns.name.clone();
    // a connected UDP socket gets the ICMP port unreachable as ECONNREFUSED
    let err = in_netns(&client, || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.connect(SocketAddr::from((VIP, 53))).unwrap();
        u.send(b"q").unwrap();
        let mut buf = [0u8; 64];
        u.recv(&mut buf).unwrap_err()
    });
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err} {:?}", dp.counters());
    assert_eq!(dp.counter(Stat::NoBackend).unwrap(), 1);
    assert_eq!(dp.counter(Stat::IcmpSent).unwrap(), 1);
    assert_eq!(dp.counter(Stat::Dnat).unwrap(), 0);

    // a pod deleted without detach leaves pins behind; prune removes exactly those
    let gone = topo.pods.pop().unwrap();
    let gone_veth = gone.veth.clone();
    sh(&["ip", "-n", &topo.node.name, "link", "del", &gone_veth]); // synchronous, unlike netns teardown
    drop(gone);
    let node = topo.node.name.clone();
    let pruned = in_netns(&node, || dp.prune_stale_links().unwrap());
    assert_eq!(pruned, vec![gone_veth]);
    assert_eq!(dp.attached(), vec![topo.pods[0].veth.clone()]);
    drop(dp);
    drop(topo);
    assert!(leftover_netns().is_empty(), "netns left: {:?}", leftover_netns());
}

/// Host-network client (a process in the node netns, in a test cgroup):
/// socket-level LB translates connect()/sendmsg() and restores the VIP for
/// getpeername()/recvfrom().
#[test]
fn socket_lb_for_host_network_processes() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(3);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 2);
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    dp.upsert_many(&cluster_ip(&backends)).unwrap();
    let cg = Cgroup::new();
    dp.attach_cgroup(&cg.0).expect("attach socket LB to the test cgroup");

    const SCRIPT: &str = r#"
import socket, json, collections
spread = collections.Counter(); peers = set()
for i in range(200):
    s = socket.create_connection(("10.96.0.10", 80), timeout=5)
    peers.add(s.getpeername())
    s.sendall(b"hello\n")
    spread[s.makefile().readline().split()[0]] += 1
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"q1", ("10.96.0.10", 53))
data, src = u.recvfrom(512)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)
c.connect(("10.96.0.10", 53)); c.send(b"q2")
data2, src2 = c.recvfrom(512)
print(json.dumps({"spread": spread, "peers": sorted(peers), "udp": [src, data.decode(), src2, data2.decode()]}))
"#;
    let procs = cg.0.join("cgroup.procs");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec ip netns exec {} python3 -c \"$0\"",
            procs.display(),
            topo.node.name
        ))
        .arg(SCRIPT)
        .output()
        .expect("run python3 client");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "client failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    println!("socket-LB client: {stdout}");
    // tiny parsing without a JSON dependency: check the pieces we need
    assert!(stdout.contains(r#""peers": [["10.96.0.10", 80]]"#), "getpeername must show the VIP: {stdout}");
    assert!(stdout.contains(r#""udp": [["10.96.0.10", 53], "b"#), "recvfrom must show the VIP: {stdout}");
    assert!(stdout.contains(r#" q1", ["10.96.0.10", 53], "b"#), "connected UDP: {stdout}");
    let count = |b: &str| -> usize {
        let k = format!("\"{b}\": ");
        stdout.find(&k).map(|i| stdout[i + k.len()..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()).unwrap_or(0)
    };
    let (b1, b2) = (count("b1"), count("b2"));
    assert_eq!(b1 + b2, 200, "{stdout}");
    assert!((60..=140).contains(&b1), "spread b1={b1} b2={b2}");
    assert!(dp.counter(Stat::SockLb).unwrap() >= 202);
    assert_eq!(dp.counter(Stat::CtNew).unwrap(), 0, "socket LB needs no per-packet NAT");
    dp.detach_cgroup(&cg.0).unwrap();
    drop(dp);
}

/// Bench (bounded): connection rate and bulk throughput through the VIP
/// versus direct pod-to-pod. Run with
/// `cargo test --release -p fjord-datapath --test e2e -- --ignored --nocapture bench_vip`
#[test]
#[ignore]
fn bench_vip_vs_direct() {
    use std::io::{Read, Write};
    use std::time::Instant;
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(2);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 1);
    dp.upsert_many(&cluster_ip(&[topo.pods[1].ip])).unwrap();
    // a bulk sink on the backend: reads until EOF, answers with the byte count
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink_ns = topo.pods[1].ns.name.clone();
    let sink_stop = stop.clone();
    let sink = std::thread::spawn(move || {
        enter(&sink_ns);
        let l = std::net::TcpListener::bind(("0.0.0.0", 9000)).unwrap();
        l.set_nonblocking(true).unwrap();
        while !sink_stop.load(std::sync::atomic::Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k as u64,
                        }
                    }
                    let _ = s.write_all(&n.to_le_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let bulk = Service {
        name: "default/bulk".into(),
        frontends: vec![Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 20),
            port: 9000,
            protocol: Protocol::Tcp,
            backends: vec![Backend::ready(topo.pods[1].ip, 9000)],
            options: Default::default(),
        }],
    };
    dp.upsert_many(&translate(&bulk, &lbcfg()).unwrap()).unwrap();
    let client = topo.pods[0].ns.name.clone();
    let direct = SocketAddr::from((topo.pods[1].ip, TCP_TARGET));
    const CONNS: usize = 3000;
    const BYTES: usize = 512 << 20;
    let results = in_netns(&client, || {
        let mut out = Vec::new();
        for (name, addr) in [("direct", direct), ("vip", tcp_vip()), ("direct", direct), ("vip", tcp_vip())] {
            let t = Instant::now();
            for _ in 0..CONNS {
                tcp_request(addr).unwrap();
            }
            out.push(format!("{name:6} {:8.0} connections/s (request+reply, sequential)", CONNS as f64 / t.elapsed().as_secs_f64()));
        }
        for (name, addr) in [
            ("direct", SocketAddr::from((topo.pods[1].ip, 9000))),
            ("vip", SocketAddr::from(([10, 96, 0, 20], 9000))),
            ("direct", SocketAddr::from((topo.pods[1].ip, 9000))),
            ("vip", SocketAddr::from(([10, 96, 0, 20], 9000))),
        ] {
            let buf = vec![7u8; 1 << 20];
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            for _ in 0..BYTES / buf.len() {
                s.write_all(&buf).unwrap();
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).unwrap();
            assert_eq!(u64::from_le_bytes(n), BYTES as u64);
            out.push(format!("{name:6} {:8.2} Gbit/s bulk TCP ({} MiB)", BYTES as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9, BYTES >> 20));
        }
        out
    });
    for r in results {
        println!("{r}");
    }
    println!("{:?}", dp.counters().unwrap());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sink.join().unwrap();
}

/// TCP state tracking and GC: a closed connection's entries (closing, 1 s timeout) and an
/// idle UDP flow (1 s) are collected; an open, established connection keeps its entries
/// and keeps working.
#[test]
fn conntrack_tracks_tcp_state_and_gc_removes_only_expired_flows() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(2);
    let cfg = fjord_datapath::DatapathConfig {
        timeouts: fjord_datapath::CtTimeouts { tcp_syn: 60, tcp_established: 3600, tcp_closing: 1, udp: 1 },
        ..pins.config()
    };
    let mut dp = Datapath::load(cfg).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 1);
    program(&mut dp, &cluster_ip(&[topo.pods[1].ip]));
    let client = topo.pods[0].ns.name.clone();
    let (mut open, closed_port) = in_netns(&client, || {
        let mut c = Conn::open(tcp_vip()).expect("open connection");
        assert_eq!(c.ask("hi").unwrap(), "b1");
        let mut s = Conn::open(tcp_vip()).unwrap();
        let port = s.local_port();
        assert_eq!(s.ask("x").unwrap(), "b1");
        drop(s); // FIN
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.send_to(b"q", SocketAddr::from((VIP, 53))).unwrap();
        let mut buf = [0u8; 64];
        u.recv_from(&mut buf).expect("udp answer");
        (c, port)
    });
    std::thread::sleep(Duration::from_millis(100));
    let fwd = |dp: &Datapath, port: u16, proto: u8| {
        dp.conntrack().unwrap().into_iter().find(|(k, _)| k.dir == 0 && k.proto == proto && (port == 0 || k.src().1 == port))
    };
    let open_port = open.local_port();
    let (_, v) = fwd(&dp, open_port, 6).expect("entry of the open connection");
    assert_eq!(v.state, fjord_datapath::layout::CT_ESTABLISHED, "{v:?}");
    let (_, v) = fwd(&dp, closed_port, 6).expect("entry of the closed connection");
    assert_eq!(v.state, fjord_datapath::layout::CT_CLOSING, "FIN seen: {v:?}");
    assert!(fwd(&dp, 0, 17).is_some(), "udp entry");

    std::thread::sleep(Duration::from_millis(2200));
    let st = dp.gc_conntrack().unwrap();
    assert!(st.removed >= 4, "closed TCP pair + UDP pair: {st:?}");
    assert!(fwd(&dp, closed_port, 6).is_none(), "closed connection collected");
    assert!(fwd(&dp, 0, 17).is_none(), "idle UDP flow collected");
    assert!(fwd(&dp, open_port, 6).is_some(), "established connection kept");
    let replies = dp.conntrack().unwrap().into_iter().filter(|(k, _)| k.dir == 1).count();
    assert_eq!(replies, 1, "only the open connection's reply entry is left");
    assert_eq!(in_netns(&client, move || open.ask("again").map(|a| (a, open))).unwrap().0, "b1");
}

/// Graceful termination: a terminating (still serving) backend gets no new flows but keeps
/// its established connection; when it is removed for good, that connection is reset at its
/// next packet instead of hanging.
#[test]
fn terminating_backend_drains_and_a_removed_one_resets() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(3);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 2);
    let (b1, b2) = (topo.pods[1].ip, topo.pods[2].ip);
    let svc = |b2_state: Option<bool>| {
        let mut backends = vec![Backend::ready(b1, TCP_TARGET)];
        if let Some(terminating) = b2_state {
            backends.push(Backend { ip: b2, port: TCP_TARGET, ready: !terminating, serving: true, terminating, weight: None });
        }
        let s = Service { name: "default/web".into(), frontends: vec![Frontend::new(VIP, 80, Protocol::Tcp, backends)] };
        translate(&s, &lbcfg()).unwrap()
    };
    program(&mut dp, &svc(Some(false)));
    let client = topo.pods[0].ns.name.clone();
    let mut conns = in_netns(&client, || {
        (0..40)
            .map(|_| {
                let mut c = Conn::open(tcp_vip()).unwrap();
                let b = c.ask("hi").unwrap();
                (c, b)
            })
            .collect::<Vec<_>>()
    });
    assert!(conns.iter().any(|(_, b)| b == "b2") && conns.iter().any(|(_, b)| b == "b1"), "both backends used");

    // b2 terminating: its established connections go on, new ones only reach b1
    dp.upsert_many(&svc(Some(true))).unwrap();
    let (conns2, fresh) = in_netns(&client, move || {
        for (c, b) in conns.iter_mut() {
            assert_eq!(&c.ask("draining").expect("established connection survives termination"), b);
        }
        let fresh: Vec<String> = (0..100).map(|_| tcp_request(tcp_vip()).unwrap()).collect();
        (conns, fresh)
    });
    conns = conns2;
    assert!(fresh.iter().all(|b| b == "b1"), "a terminating backend gets no new connection");

    // the agent restarts while b2 drains: the reload keeps b2's entry (no table or service
    // entry names it, only the agent's desired state does), so its connections go on before
    // and after the first sync; what that sync does not reference again is removed after it
    drop(dp);
    let mut dp = Datapath::load(pins.config()).expect("reload from pins");
    attach_all(&mut dp, &topo);
    let conns2 = in_netns(&client, move || {
        for (c, b) in conns.iter_mut() {
            assert_eq!(&c.ask("restarted").expect("a draining connection survives the restart"), b);
        }
        conns
    });
    conns = conns2;
    dp.upsert_many(&svc(Some(true))).unwrap();
    assert_eq!(dp.drop_unused_backends().unwrap(), 0, "the sync referenced b2 again");
    let conns2 = in_netns(&client, move || {
        for (c, b) in conns.iter_mut() {
            assert_eq!(&c.ask("synced").expect("a draining connection survives the first sync"), b);
        }
        conns
    });
    conns = conns2;

    // b2 removed: its connections are reset (not blackholed); b1's go on
    dp.upsert_many(&svc(None)).unwrap();
    in_netns(&client, move || {
        for (c, b) in conns.iter_mut() {
            let r = c.ask("after");
            if b == "b2" {
                let e = r.expect_err("the removed backend's connection must fail");
                assert!(
                    matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe),
                    "reset, not a timeout: {e}"
                );
            } else {
                assert_eq!(r.expect("b1's connection survives"), "b1");
            }
        }
    });
}

/// A full conntrack table evicts the oldest flows, it never refuses new ones: 300 connections
/// (600 entries) through a VIP with room for 64 entries all get answers.
#[test]
fn a_full_conntrack_table_evicts_the_oldest_flows_and_never_drops_new_ones() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(2);
    let mut dp = Datapath::load(fjord_datapath::DatapathConfig { ct_entries: 64, ..pins.config() }).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 1);
    program(&mut dp, &cluster_ip(&[topo.pods[1].ip]));
    let client = topo.pods[0].ns.name.clone();
    let answered = in_netns(&client, || (0..300).filter(|_| tcp_request(tcp_vip()).is_ok_and(|b| b == "b1")).count());
    assert_eq!(answered, 300, "every new flow is translated although the table is full");
    let entries = dp.conntrack().unwrap().len();
    assert!(entries <= 64 + 16, "the LRU stays at its size (per-CPU slack aside): {entries}");
    assert!(dp.counter(Stat::CtNew).unwrap() >= 300);
    assert_eq!(dp.counter(Stat::Error).unwrap(), 0, "no update failed");
}

/// sessionAffinity ClientIP: a client sticks to one backend while it keeps coming within the
/// timeout; after the timeout its next flow is balanced by Maglev again (no affinity hit).
#[test]
fn session_affinity_sticks_within_the_timeout_and_expires_after_it() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(4);
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    attach_all(&mut dp, &topo);
    let _servers = start_backends(&topo, 3);
    let backends: Vec<Backend> = topo.pods[1..].iter().map(|p| Backend::ready(p.ip, TCP_TARGET)).collect();
    let mut fe = Frontend::new(VIP, 80, Protocol::Tcp, backends);
    fe.options.affinity_timeout = Some(1);
    program(&mut dp, &translate(&Service { name: "default/sticky".into(), frontends: vec![fe] }, &lbcfg()).unwrap());
    let client = topo.pods[0].ns.name.clone();
    let c2 = client.clone();
    let first: Vec<String> = in_netns(&client, || (0..30).map(|_| tcp_request(tcp_vip()).unwrap()).collect());
    assert!(first.iter().all(|b| b == &first[0]), "one backend for the client within the timeout: {first:?}");
    assert!(dp.counter(Stat::Affinity).unwrap() >= 29);
    std::thread::sleep(Duration::from_millis(1600));
    let hits = dp.counter(Stat::Affinity).unwrap();
    in_netns(&c2, || tcp_request(tcp_vip()).unwrap());
    assert_eq!(dp.counter(Stat::Affinity).unwrap(), hits, "an expired affinity is not followed");
    // removing the sticky backend sends the client elsewhere at once
    let stuck = first[0].clone();
    let rest: Vec<Backend> = topo.pods[1..]
        .iter()
        .enumerate()
        .filter(|(i, _)| format!("b{}", i + 1) != stuck)
        .map(|(_, p)| Backend::ready(p.ip, TCP_TARGET))
        .collect();
    let mut fe = Frontend::new(VIP, 80, Protocol::Tcp, rest);
    fe.options.affinity_timeout = Some(1);
    program(&mut dp, &translate(&Service { name: "default/sticky".into(), frontends: vec![fe] }, &lbcfg()).unwrap());
    let after: Vec<String> = in_netns(&client, || (0..10).map(|_| tcp_request(tcp_vip()).unwrap()).collect());
    assert!(after.iter().all(|b| b != &stuck && b == &after[0]), "a new sticky backend among the rest: {after:?}");
}

/// `Ip: ForwDatagrams` of netns `ns`: packets its kernel forwarded (routed from one
/// interface to another).
fn forwarded(ns: &str) -> u64 {
    let out = std::process::Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"]).output().expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().expect("Ip: header"), ip.next().expect("Ip: values"));
    let i = names.split_whitespace().position(|n| n == "ForwDatagrams").expect("ForwDatagrams column");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn host_routing_delivers_between_local_pods_without_the_node_stack() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let topo = Topo::new(4);
    let node_net = fjord_datapath::NodeNet {
        node_ip: Ipv4Addr::new(192, 0, 2, 10),
        pod_cidr: (Ipv4Addr::new(10, 244, 1, 0), 24),
        cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
        masquerade: false,
    };
    let mut dp = Datapath::load(pins.config()).expect("load datapath");
    assert!(dp.config().host_routing, "eBPF host routing is the default");
    dp.set_node_net(&node_net).unwrap();
    attach_all(&mut dp, &topo);
    let node = topo.node.name.clone();
    // only this node's pod veths are targets
    let mut want: Vec<u32> = in_netns(&node, || topo.pods.iter().map(|p| nix::net::if_::if_nametoindex(p.veth.as_str()).unwrap()).collect());
    want.sort_unstable();
    assert_eq!(dp.host_routing_targets().unwrap(), want);
    let _servers = start_backends(&topo, 3);
    let backends: Vec<Ipv4Addr> = topo.pods[1..].iter().map(|p| p.ip).collect();
    program(&mut dp, &cluster_ip(&backends));
    let client = topo.pods[0].ns.name.clone();
    let direct_to = SocketAddr::from((topo.pods[3].ip, TCP_TARGET));
    // every kind of pod-to-pod packet: direct TCP, service TCP (DNAT both ways), service UDP
    let traffic = |n: usize| {
        in_netns(&client, || {
            let mut seen = BTreeMap::<String, usize>::new();
            for i in 0..n {
                assert_eq!(tcp_request(direct_to).unwrap_or_else(|e| panic!("direct connection {i}: {e}")), "b3");
                *seen.entry(tcp_request(tcp_vip()).unwrap_or_else(|e| panic!("service connection {i}: {e}"))).or_default() += 1;
                let u = UdpSocket::bind("0.0.0.0:0").unwrap();
                u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                u.send_to(b"q", (VIP, 53)).unwrap();
                let mut buf = [0u8; 64];
                let (_, from) = u.recv_from(&mut buf).expect("UDP answer");
                assert_eq!(from, SocketAddr::from((VIP, 53)), "the answer comes from the service address");
            }
            seen
        })
    };
    // the first packets resolve the node's neighbour entries (the kernel's path)
    traffic(5);
    let (fwd0, routed0) = (forwarded(&node), dp.counter(Stat::HostRouted).unwrap());
    let seen = traffic(30);
    let (fwd1, routed1) = (forwarded(&node), dp.counter(Stat::HostRouted).unwrap());
    assert!(seen.len() >= 2, "the service spreads over its backends: {seen:?}");
    assert_eq!(fwd1 - fwd0, 0, "pod-to-pod packets bypass the node's IP forwarding with eBPF host routing");
    // ≥ 5 packets per TCP connection each way, 1 each way for UDP
    assert!(routed1 - routed0 >= 30 * (2 * 10 + 2), "host-routed packets: {}", routed1 - routed0);
    assert_eq!(dp.counter(Stat::Error).unwrap(), 0);

    // a detached veth is no target any more: packets to its pod take the kernel's path
    let victim = topo.pods[3].veth.clone();
    in_netns(&node, || dp.detach(&victim)).unwrap();
    assert_eq!(dp.host_routing_targets().unwrap().len(), 3);
    let fwd2 = forwarded(&node);
    in_netns(&client, || assert_eq!(tcp_request(direct_to).unwrap(), "b3"));
    assert!(forwarded(&node) - fwd2 >= 5, "to a pod whose veth fjord left, the kernel forwards");
    in_netns(&node, || dp.attach(&victim)).unwrap();
    drop(dp);

    // legacy: the same datapath (pinned maps) with host routing off; the node's kernel routes
    let cfg = fjord_datapath::DatapathConfig { host_routing: false, ..pins.config() };
    let dp = Datapath::load(cfg).expect("reload with host routing off");
    let (fwd3, routed3) = (forwarded(&node), dp.counter(Stat::HostRouted).unwrap());
    let seen = traffic(10);
    assert!(!seen.is_empty());
    assert_eq!(dp.counter(Stat::HostRouted).unwrap(), routed3, "legacy host routing redirects nothing");
    assert!(forwarded(&node) - fwd3 >= 10 * (2 * 10 + 2), "legacy: the node forwards every packet");
    drop(dp);
    drop(topo);
    assert!(leftover_netns().is_empty(), "netns left: {:?}", leftover_netns());
}
