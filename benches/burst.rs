//! Pod burst benchmark (issue: cluster mode): on a 3-node dev cluster with etcd, create N pods
//! at once (concurrent CNI ADDs, spread over the nodes) and measure how long until every pod
//! answers ICMP echo from every node.
//!
//! `cargo bench --bench burst` (N = FJORD_BENCH_BURST, default 1000, at most 2000; nodes get
//! /22 PodCIDRs so 1,000 pods fit on 3 nodes). Bounded: the run stops after 10 minutes.

use fjord_e2e::*;
use fjordctl::pod;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke { 6 } else { std::env::var("FJORD_BENCH_BURST").ok().and_then(|s| s.parse().ok()).unwrap_or(1000).clamp(3, 2000) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let c = TestCluster::up_full(3, "etcd", "native", vec!["--node-cidr-size".into(), "22".into()]).await;
    let t0 = Instant::now();
    // 4 concurrent "runtimes" per node.
    let mut tasks = vec![];
    for w in 0..12 {
        let st = c.state.clone();
        tasks.push(tokio::spawn(async move {
            let node = format!("node{}", w % 3 + 1);
            let mut ips = vec![];
            let mut i = w;
            while i < n {
                let p = pod::add(&st, Some(&node), &format!("burst/p{i}"), BTreeMap::new()).await.expect("pod add");
                ips.push(p.ip.unwrap());
                i += 12;
            }
            ips
        }));
    }
    let mut ips: Vec<Ipv4Addr> = vec![];
    for t in tasks {
        ips.extend(t.await.unwrap());
    }
    let added = t0.elapsed();
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), n, "duplicate pod IPs");
    // Every node pings every pod until all answer.
    let mut reach = Duration::ZERO;
    for i in 0..3 {
        let ns = fjord_net::netns::path(&c.node_n(i).netns);
        let ips = ips.clone();
        let done = fjord_net::netns::run_async_in(&ns, move || async move {
            let mut pending: BTreeSet<Ipv4Addr> = ips.into_iter().collect();
            let mut seq = 0u16;
            while !pending.is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(600), "{} pods unreachable after 10 minutes", pending.len());
                let mut still = BTreeSet::new();
                for ip in pending {
                    seq = seq.wrapping_add(1);
                    if fjord_agent::health::icmp_echo(ip, 0xf1, seq, Duration::from_millis(200)).await.is_err() {
                        still.insert(ip);
                    }
                }
                if !still.is_empty() {
                    eprintln!("node{}: {} of the pods did not answer yet (e.g. {:?}) at {:.1} s", i + 1, still.len(), still.iter().take(3).collect::<Vec<_>>(), t0.elapsed().as_secs_f64());
                }
                pending = still;
            }
            t0.elapsed()
        })
        .await
        .unwrap();
        reach = reach.max(done);
    }
    println!("fjord pod burst: {n} pods created concurrently on 3 nodes (etcd, native routing, 12 concurrent CNI callers)");
    println!(
        "all CNI ADDs done after {:.1} s ({:.0} pods/s); every pod answered ICMP from every node after {:.1} s",
        added.as_secs_f64(),
        n as f64 / added.as_secs_f64(),
        reach.as_secs_f64()
    );
}
