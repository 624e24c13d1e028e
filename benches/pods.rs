//! Pod churn benchmark: add and delete N pods one at a time on a one-node dev
//! cluster through the real CNI plugin (exec per call, as a runtime does) and
//! print CNI ADD / DEL latency p50/p99/max and the agent's RSS with N pods.
//!
//! `cargo bench --bench pods` (root; bounded: N pods, default 100, `FJORD_BENCH_PODS`).
//! Runs twice: with the eBPF datapath (default; every ADD attaches two tc programs) and with
//! `--datapath off` (the pod plumbing alone).
//! Targets (issue #2): ADD p99 < 50 ms, agent RSS < 30 MiB with 100 pods.

use fjord_e2e::*;
use fjordctl::pod;
use std::collections::BTreeMap;

fn summary(name: &str, v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, max) = (percentile(v, 50.0), percentile(v, 99.0), v[v.len() - 1]);
    println!("{name:<10} n={:<4} p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   max {max:>7.2} ms", v.len());
    (p50, p99)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a tiny smoke then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke { 3 } else { std::env::var("FJORD_BENCH_PODS").ok().and_then(|s| s.parse().ok()).unwrap_or(100).min(250) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        for (label, args) in [("datapath on (default)", vec![]), ("datapath off (--datapath off)", vec!["--datapath".to_string(), "off".to_string()])] {
            churn(n, smoke, label, args).await;
        }
    });
}

async fn churn(n: usize, smoke: bool, label: &str, agent_args: Vec<String>) {
    {
        let c = TestCluster::up_full(1, "embedded", "native", agent_args).await;
        let pid = c.node().agent_pid.unwrap();
        let rss0 = rss_of(pid).unwrap();
        let mut add = Vec::with_capacity(n);
        let mut del = Vec::with_capacity(n);
        for i in 0..n {
            let p = pod::add(&c.state, None, &format!("bench/p{i}"), BTreeMap::new()).await.expect("pod add");
            add.push(p.cni_add_ms.unwrap());
        }
        let rss_full = rss_of(pid).unwrap();
        let pods = pod::list(&c.state).await.unwrap();
        assert_eq!(pods.iter().filter(|p| p.status == "Running").count(), n, "every pod attached");
        for i in 0..n {
            let p = pod::del(&c.state, &format!("bench/p{i}")).await.expect("pod del");
            del.push(p.cni_del_ms.unwrap());
        }
        let rss_after = rss_of(pid).unwrap();
        println!("fjord pod churn, {label}: {n} pods added then deleted one at a time, CNI plugin exec'd per call (wall time of the plugin process)");
        let (_, add_p99) = summary("CNI ADD", &mut add);
        summary("CNI DEL", &mut del);
        let mib = |b: u64| b as f64 / 1048576.0;
        println!("agent RSS: {:.1} MiB idle, {:.1} MiB with {n} pods, {:.1} MiB after deleting them", mib(rss0), mib(rss_full), mib(rss_after));
        if !smoke {
            println!(
                "targets: ADD p99 < 50 ms: {}; agent RSS < 30 MiB with {n} pods: {}",
                if add_p99 < 50.0 { "MET" } else { "MISSED" },
                if mib(rss_full) < 30.0 { "MET" } else { "MISSED" }
            );
        }
    }
}
