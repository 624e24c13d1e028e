//! What the socket LB costs a connection, and whether that grows with the number of services:
//! one client pod and one echo pod on a one-node dev cluster with the socket LB for pods
//! (`cluster up --socket-lb-pods`). Every ClusterIP service has the echo pod as its only
//! backend (on one of PORTS ports), so a connection to a VIP and a direct connection reach
//! the same socket, and the only difference is the connect() hook. Rows, from the same pod:
//!   direct, outside the pods cgroup   no socket hook at all
//!   direct, in the pods cgroup        the hook runs and finds no service
//!   VIP, in the pods cgroup           the socket LB translates (random VIP per connection)
//!   the first VIP only                the same, always one service (its map entries stay hot)
//! measured with 1 service installed, with FJORD_BENCH_SERVICES (default 10,000), and with 1
//! again (drift check). Each phase alternates three client processes in the cgroup with three
//! outside it; each runs ROUNDS interleaved rounds.
//!
//! `cargo bench --bench socket_lb_cost` (root; bounded: FJORD_BENCH_CRR connections per row and
//! phase, default 3,000; FJORD_BENCH_AGENT_ARGS adds agent flags).

use fjord_e2e::*;
use fjordctl::{cluster, context::Home, pod};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const PORT: u16 = 9000;
/// Ports of the echo pod: connections spread over them, so TIME_WAIT sockets of a phase never
/// crowd the ephemeral port range of one destination.
const PORTS: usize = 100;
const ROUNDS: usize = 20;
const MSG: usize = 32;
const ROWS: [&str; 4] = ["direct, outside the pods cgroup", "direct, in the pods cgroup", "VIP (socket LB), in the pods cgroup", "the first VIP only, in the pods cgroup"];

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Child process: joins `cg` (unless "-"), enters the client namespace and measures the rows
/// it is given, interleaved; prints "row µs" lines.
fn child() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    let l: Vec<&str> = input.lines().collect();
    let (cg, ns, server) = (l[0], l[1], l[2].parse::<Ipv4Addr>().unwrap());
    let (services, per): (usize, usize) = (l[3].parse().unwrap(), l[4].parse().unwrap());
    let rows: Vec<usize> = l[5].split(',').map(|r| r.parse().unwrap()).collect();
    if cg != "-" {
        std::fs::write(Path::new(cg).join("cgroup.procs"), std::process::id().to_string()).expect("join the pods cgroup");
    }
    let out = fjord_net::netns::run_in(Path::new(ns), || {
        let mut x: u64 = 0x9e3779b97f4a7c15 ^ std::process::id() as u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [7u8; MSG];
        let mut lat: Vec<(usize, f64)> = vec![];
        for r in 0..ROUNDS {
            for k in 0..rows.len() {
                let row = rows[(k + r) % rows.len()];
                for _ in 0..per {
                    // a random VIP; a direct connection goes to a random echo port (with one
                    // service, the VIP's backend is always the first port)
                    let r = rnd() as usize;
                    let to = if row == 3 { SocketAddr::new(vip(0).into(), 80) } else if row == 2 { SocketAddr::new(vip(r % services).into(), 80) } else { SocketAddr::new(server.into(), PORT + (r % PORTS) as u16) };
                    let t = Instant::now();
                    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap_or_else(|e| panic!("connect {to}: {e}"));
                    let connected = t.elapsed().as_secs_f64() * 1e6;
                    s.set_nodelay(true).unwrap();
                    s.write_all(&buf).unwrap();
                    s.read_exact(&mut buf).unwrap();
                    drop(s);
                    lat.push((row, t.elapsed().as_secs_f64() * 1e6));
                    lat.push((row + ROWS.len(), connected));
                }
            }
        }
        lat
    })
    .expect("enter the client namespace");
    let mut o = String::new();
    for (row, us) in out {
        o.push_str(&format!("{row} {us}\n"));
    }
    std::io::stdout().write_all(o.as_bytes()).unwrap();
}

fn run_child(cg: Option<&Path>, ns: &Path, server: Ipv4Addr, services: usize, per: usize, rows: &[usize], lat: &mut [Vec<f64>; 8]) {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap())
        .env("FJSLC_CHILD", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the client");
    let cg = cg.map_or("-".to_string(), |c| c.display().to_string());
    let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    let input = format!("{cg}\n{}\n{server}\n{services}\n{per}\n{}\n", ns.display(), rows.join(","));
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "client process failed");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let (row, us) = l.split_once(' ').unwrap();
        lat[row.parse::<usize>().unwrap()].push(us.parse().unwrap());
    }
}

/// Services `from..to` (apply, or delete), each with the echo pod as its only backend.
async fn services(api: &fjord_api::AgentClient, server: Ipv4Addr, from: usize, to: usize, delete: bool) {
    let doc = |i: usize| clusterip_manifest(&format!("s{i}"), vip(i), PORT + (i % PORTS) as u16, &[server]);
    apply_services(api, from..to, doc, delete, if delete { from } else { to }).await;
}

fn main() {
    if std::env::var_os("FJSLC_CHILD").is_some() {
        return child();
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = if smoke { 20 } else { env("FJORD_BENCH_SERVICES", 10000).clamp(2, 10000) };
    let crr = if smoke { 60 } else { env("FJORD_BENCH_CRR", 3000).clamp(120, 6000) };
    // per client process and row: crr / 3 processes / ROUNDS
    let per = crr.div_ceil(3 * ROUNDS);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _lock = kernel_lock();
    let tmp = tempfile::Builder::new().prefix("fjslc").tempdir_in("/tmp").unwrap();
    let home = Home::new(Some(tmp.path().to_path_buf()));
    let name = format!("slc{}", std::process::id());
    let max = (n + 64).max(1024).to_string();
    let opts = cluster::UpOptions {
        name: name.clone(),
        nodes: 1,
        store: "embedded".into(),
        routing: "native".into(),
        bin_dir: bin_dir(),
        // FJORD_BENCH_AGENT_ARGS: more agent flags, e.g. "--maglev-table-size 1021"
        agent_args: ["--no-gateway".to_string(), "--max-services".into(), max]
            .into_iter()
            .chain(std::env::var("FJORD_BENCH_AGENT_ARGS").unwrap_or_default().split_whitespace().map(String::from))
            .collect(),
        socket_lb_pods: true,
    };
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let st = cluster::up(&home, &opts, &|_| {}).await.expect("cluster up");
            let cg = cluster::pods_cgroup(&st.nodes[0].dir, &st.nodes[0].name).expect("cgroup v2");
            let server = pod::add(&st, None, "bench/server", BTreeMap::new()).await.expect("server pod");
            let client = pod::add(&st, None, "bench/client", BTreeMap::new()).await.expect("client pod");
            let sip = server.ip.unwrap();
            echo_servers(&tokio::runtime::Handle::current(), &pod_netns(&server), PORT..PORT + PORTS as u16);
            let cns = pod_netns(&client);
            // With 1 service every VIP connection goes to the same backend address and port:
            // 12,000+ of them in a few seconds leave that many TIME_WAIT sockets, and finding
            // a free source port for that one destination then slows connect() (the "1
            // service again" phase measured 3-12 µs of it before). Reusing TIME_WAIT ports
            // (safe with TCP timestamps) keeps every row's port search short; the client
            // pod's namespace is the bench's own.
            fjord_net::netns::run_in(&cns, || std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")).unwrap().expect("tcp_tw_reuse in the client pod");
            let api = fjord_api::AgentClient::new(&st.nodes[0].api_socket);
            let sock0 = api.metrics().await.unwrap();
            println!(
                "fjord socket-LB cost{}: TCP_CRR (connect + {MSG} B request/response + close) from one client pod to one echo pod (every service's only backend), {crr} per row and phase, µs",
                if smoke { " (SMOKE: tiny counts, numbers meaningless)" } else { "" }
            );
            let mut p50s: Vec<(String, usize, [f64; 8])> = vec![];
            for (phase, installed) in [("1 service", 1usize), (&*format!("{n} services"), n), ("1 service again", 1)] {
                let have = p50s.last().map_or(0, |(_, k, _)| *k);
                if installed > have {
                    services(&api, sip, have, installed, false).await;
                } else if installed < have {
                    services(&api, sip, installed, have, true).await;
                }
                let mut lat: [Vec<f64>; 8] = Default::default();
                for _ in 0..3 {
                    run_child(Some(&cg), &cns, sip, installed, per, &[1, 2, 3], &mut lat);
                    run_child(None, &cns, sip, installed, per, &[0], &mut lat);
                }
                let p = lat.map(|mut v| {
                    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    percentile(&v, 50.0)
                });
                println!("{phase}:");
                for (i, row) in ROWS.iter().enumerate() {
                    println!("  {row:<38} CRR p50 {:>7.1}   connect() p50 {:>6.1}", p[i], p[i + ROWS.len()]);
                }
                p50s.push((phase.to_string(), installed, p));
            }
            println!("socket LB over a direct connect from the same pod (CRR p50, µs; > 0 means the VIP is slower):");
            for (phase, _, p) in &p50s {
                println!("  {phase:<18} VIP − direct in the cgroup {:+.1}   VIP − direct outside {:+.1}   cgroup hook alone {:+.1}   first VIP only − direct in {:+.1}", p[2] - p[1], p[2] - p[0], p[1] - p[0], p[3] - p[1]);
            }
            let (a, b) = (p50s[0].2[2], p50s[1].2[2]);
            println!("VIP @{n} / VIP @1: {:.3}", b / a);
            // the VIP rows really went through the socket LB
            let sock = |m: &str| -> f64 { m.lines().filter(|l| l.starts_with("fjord_datapath_events{") && l.contains("event=\"sock_lb\"")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum() };
            let translated = sock(&api.metrics().await.unwrap()) - sock(&sock0);
            assert!(translated >= (3 * crr) as f64 * 0.99, "only {translated} socket-LB translations for {} VIP connections", 3 * crr);
        })
    }));
    let _ = rt.block_on(cluster::down(&home, &name, &|_| {}));
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}
