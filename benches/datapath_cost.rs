//! What fjord's eBPF datapath costs traffic that needs no translation: direct pod-to-pod
//! connections (a pod IP, as the socket LB leaves them) on a one-node dev cluster, against
//! the same two pods on a plain node (veths and /32 routes, nothing attached) and on fjord
//! nodes with `--datapath off` (fjord's plumbing alone), with `--host-routing legacy` (the node's
//! kernel routes between the pods instead of eBPF host routing) and with `--attach-mode tcx`.
//!
//! This is the "direct, fjord node" vs "direct pod IP" gap of the services bench, measured
//! alone: one client pod and one echo pod per node, a single port, rows interleaved in
//! ROUNDS rounds (rotated order), every client in this process. One more fjord row has
//! FJORD_BENCH_SERVICES ClusterIP services (default 10,000 × 3 backends, none of them the
//! measured pods, all on the measured port, as in the services bench) installed: the direct
//! traffic should not care.
//!
//! `cargo bench --bench datapath_cost` (root; bounded: FJORD_BENCH_CRR connections and
//! FJORD_BENCH_RR transactions per row, defaults 6,000 and 10,000).

use fjord_e2e::*;
use fjordctl::{cluster, context::Home, pod};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;
const MSG: usize = 32;
const PORT: u16 = 9000;

/// Dev clusters and namespaces of this run; removed on drop (also after a panic).
#[derive(Default)]
struct Cleanup {
    clusters: Vec<(tempfile::TempDir, Home, String)>,
    netns: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let clusters = std::mem::take(&mut self.clusters);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            for (_tmp, home, name) in &clusters {
                let _ = rt.block_on(cluster::down(home, name, &|_| {}));
            }
        })
        .join();
        for n in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
    }
}

fn sh(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
}

static SERVERS: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
static PORTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Echo servers on PORT..PORT+PORTS in namespace `ns`, on one shared 1-thread runtime.
fn echo_in(ns: &std::path::Path) {
    let n = PORTS.load(std::sync::atomic::Ordering::Relaxed) as u16;
    let rt = SERVERS.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap());
    echo_servers(rt.handle(), ns, PORT..PORT + n);
}

/// A plain node: client and server namespaces on veths to a node namespace, /32 routes
/// through 169.254.1.1 as fjord plumbs pods, but no qdisc, no program, no agent.
fn plain_node(cl: &mut Cleanup) -> (PathBuf, SocketAddr) {
    let pfx = format!("fjdc{}", std::process::id());
    let (node, cns, sns) = (format!("{pfx}-n"), format!("{pfx}-c"), format!("{pfx}-s"));
    for n in [&node, &cns, &sns] {
        sh(&["ip", "netns", "add", n]);
        cl.netns.push(n.clone());
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    sh(&["ip", "netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (ns, host, ip) in [(&cns, "c0", "10.250.0.2"), (&sns, "s0", "10.250.0.3")] {
        sh(&["ip", "-n", &node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        sh(&["ip", "-n", &node, "link", "set", host, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &node, "addr", "add", "169.254.1.1/32", "dev", host]);
        sh(&["ip", "-n", &node, "route", "add", &format!("{ip}/32"), "dev", host]);
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        sh(&["ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"]);
    }
    echo_in(&fjord_net::netns::path(&sns));
    (fjord_net::netns::path(&cns), SocketAddr::from(([10, 250, 0, 3], PORT)))
}

/// `n` ClusterIP services (10.96.0.0/16 and up) × 3 backends that are not the measured pods
/// (10.244.0.200–202, absent) but listen on the measured ports, applied through the agent API.
async fn install_services(api: &fjord_api::AgentClient, n: usize) {
    let ports = PORTS.load(std::sync::atomic::Ordering::Relaxed);
    let absent: Vec<std::net::Ipv4Addr> = (200..203).map(|b| std::net::Ipv4Addr::new(10, 244, 0, b)).collect();
    let vip = |i: usize| std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 10)) + i as u32);
    apply_services(api, 0..n, |i| clusterip_manifest(&format!("s{i}"), vip(i), PORT + (i % ports) as u16, &absent), false, n).await;
}

/// A one-node dev cluster with `agent_args` and `services` services installed, a server pod
/// and a client pod.
async fn fjord_node(cl: &mut Cleanup, i: usize, agent_args: &[&str], services: usize) -> (PathBuf, SocketAddr) {
    let tmp = tempfile::Builder::new().prefix("fjdc").tempdir_in("/tmp").unwrap();
    let home = Home::new(Some(tmp.path().to_path_buf()));
    let name = format!("dc{}x{i}", std::process::id());
    let opts = cluster::UpOptions {
        name: name.clone(),
        nodes: 1,
        store: "embedded".into(),
        routing: "native".into(),
        bin_dir: bin_dir(),
        // the service datapath alone, as in the services bench
        agent_args: ["--no-gateway"].iter().chain(agent_args).map(|s| s.to_string()).collect(),
        socket_lb_pods: false,
    };
    let up = cluster::up(&home, &opts, &|_| {}).await;
    cl.clusters.push((tmp, home, name));
    let st = up.expect("cluster up");
    if services > 0 {
        install_services(&fjord_api::AgentClient::new(&st.nodes[0].api_socket), services).await;
    }
    let server = pod::add(&st, None, "bench/server", BTreeMap::new()).await.expect("server pod");
    let client = pod::add(&st, None, "bench/client", BTreeMap::new()).await.expect("client pod");
    echo_in(&pod_netns(&server));
    (pod_netns(&client), SocketAddr::new(server.ip.unwrap().into(), PORT))
}

#[derive(Default)]
struct Lat {
    crr: Vec<f64>,
    rr: Vec<f64>,
}

/// `crr` connections (connect + request/response + close), then `rr` request/responses on
/// one kept connection, from namespace `ns`; µs. A few unmeasured warm-up connections first.
fn measure(ns: &PathBuf, to: SocketAddr, crr: usize, rr: usize, lat: &mut Lat) {
    let (c, r) = fjord_net::netns::run_in(ns, || {
        let mut buf = [7u8; MSG];
        let conn = || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        };
        let rt = |s: &mut TcpStream, buf: &mut [u8; MSG]| -> std::io::Result<()> {
            s.write_all(&buf[..])?;
            s.read_exact(&mut buf[..])
        };
        for _ in 0..10 {
            let mut s = conn().expect("warm-up connection");
            rt(&mut s, &mut buf).expect("warm-up request");
        }
        let mut c = Vec::with_capacity(crr);
        let nports = PORTS.load(std::sync::atomic::Ordering::Relaxed) as u64;
        let mut x: u64 = 0x9e3779b97f4a7c15 ^ (crr as u64);
        for _ in 0..crr {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let to = SocketAddr::new(to.ip(), PORT + (x % nports) as u16);
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            rt(&mut s, &mut buf).expect("request/response");
            drop(s);
            c.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let mut r = Vec::with_capacity(rr);
        let mut s = conn().expect("connect");
        for _ in 0..rr {
            let t = Instant::now();
            rt(&mut s, &mut buf).expect("request/response");
            r.push(t.elapsed().as_secs_f64() * 1e6);
        }
        (c, r)
    })
    .expect("enter the client namespace");
    lat.crr.extend(c);
    lat.rr.extend(r);
}

fn p(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(v, q)
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let crr = if smoke { 40 } else { env("FJORD_BENCH_CRR", 6000).clamp(ROUNDS, 60000) };
    let rr = if smoke { 40 } else { env("FJORD_BENCH_RR", 10000).clamp(ROUNDS, 100000) };
    PORTS.store(if smoke { 3 } else { env("FJORD_BENCH_PORTS", 1).clamp(1, 1000) }, std::sync::atomic::Ordering::Relaxed);
    let services = if smoke { 20 } else { env("FJORD_BENCH_SERVICES", 10000).clamp(1, 10000) };
    let many = format!("fjord, tc, {services} services");
    let max_services = (services + 64).max(1024).to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _lock = kernel_lock();
    let mut cl = Cleanup::default();
    let mut rows: Vec<(&str, PathBuf, SocketAddr)> = vec![];
    let (ns, to) = plain_node(&mut cl);
    rows.push(("plain node (no fjord)", ns, to));
    for (i, (label, args, n)) in [
        ("fjord, --datapath off", &["--datapath", "off"][..], 0),
        ("fjord, tc (default)", &[][..], 0),
        ("fjord, --host-routing legacy", &["--host-routing", "legacy"][..], 0),
        ("fjord, --attach-mode tcx", &["--attach-mode", "tcx"][..], 0),
        (many.as_str(), &["--max-services", max_services.as_str()][..], services),
    ]
    .into_iter()
    .enumerate()
    {
        let (ns, to) = rt.block_on(fjord_node(&mut cl, i, args, n));
        rows.push((label, ns, to));
    }
    let mut lats: Vec<Lat> = rows.iter().map(|_| Lat::default()).collect();
    for r in 0..ROUNDS {
        for k in 0..rows.len() {
            let v = (k + r) % rows.len();
            measure(&rows[v].1, rows[v].2, crr.div_ceil(ROUNDS), rr.div_ceil(ROUNDS), &mut lats[v]);
        }
    }
    println!("fjord datapath cost on direct pod-to-pod traffic{}: TCP_CRR = connect + {MSG} B request/response + close ({crr} per row), TCP_RR = {MSG} B request/response on a kept connection ({rr} per row); µs; rows interleaved in {ROUNDS} rounds", if smoke { " (SMOKE: tiny counts, numbers meaningless)" } else { "" });
    println!("{:<28} {:>9} {:>9} {:>9} {:>9}", "node", "CRR p50", "CRR p99", "RR p50", "RR p99");
    let mut p50 = vec![];
    for ((label, ..), lat) in rows.iter().zip(lats.iter_mut()) {
        let (c50, c99, r50, r99) = (p(&mut lat.crr, 50.0), p(&mut lat.crr, 99.0), p(&mut lat.rr, 50.0), p(&mut lat.rr, 99.0));
        println!("{label:<28} {c50:>9.1} {c99:>9.1} {r50:>9.1} {r99:>9.1}");
        p50.push((label, c50, r50));
    }
    let (_, base_c, base_r) = p50[0];
    println!("ratios to the plain node (p50; > 1 means slower):");
    for (label, c, r) in &p50[1..] {
        println!("  {label:<28} CRR {:.3}  RR {:.3}", c / base_c, r / base_r);
    }
    drop(cl);
}
