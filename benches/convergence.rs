//! Convergence benchmark (issue: cluster mode): on a 3-node dev cluster with etcd, a
//! ClusterIP service has N+1 backend pods spread over the nodes while a client pod on every
//! node keeps connecting to it. N backends are deleted one at a time (CNI DEL through the
//! real plugin) and we measure, per deletion:
//!   (a) CNI DEL started → the last node's datapath no longer holds the backend
//!   (b) CNI DEL started → the last connection that still went to the deleted pod
//!       (answered by it, or refused/unreachable because it was gone)
//! plus client connections that failed otherwise (to live backends), and the etcd write rate.
//!
//! `cargo bench --bench convergence` (N = FJORD_BENCH_BACKENDS, default 100; bounded).
//! Targets: p99 < 100 ms for (a) and (b), zero failed connections to live backends.

use fjord_e2e::*;
use fjordctl::pod;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
enum Outcome {
    Answer(String),
    Failed(std::io::ErrorKind),
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke { 3 } else { std::env::var("FJORD_BENCH_BACKENDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100).clamp(3, 200) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(n, smoke));
}

/// `n` backends are deleted one at a time; one more stays, so the service never runs empty.
async fn run(n: usize, smoke: bool) {
    let pods = n + 1;
    let c = TestCluster::up_with(3, "etcd", "native").await;
    let vip = SocketAddr::new(Ipv4Addr::new(10, 96, 0, 90).into(), 80);
    let mut backends = vec![];
    for i in 0..pods {
        let node = format!("node{}", i % 3 + 1);
        let p = pod::add(&c.state, Some(&node), &format!("default/web{i}"), [("app".to_string(), "web".to_string())].into()).await.unwrap();
        let l = tcp_listen_in(&pod_netns(&p), "0.0.0.0:8080");
        let name = p.name.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.write_all(name.as_bytes());
            }
        });
        backends.push(p);
    }
    let mut clients = vec![];
    for i in 1..=3 {
        clients.push(pod::add(&c.state, Some(&format!("node{i}")), &format!("default/client{i}"), BTreeMap::new()).await.unwrap());
    }
    c.client_n(0)
        .apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.90\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n")
        .await
        .unwrap();
    let agents: Vec<_> = (0..3).map(|i| c.client_n(i)).collect();
    let key = "10.96.0.90:80/TCP".to_string();
    let holds = |f: &BTreeMap<String, Vec<String>>, ip: Ipv4Addr| f.get(&key).is_some_and(|b| b.iter().any(|x| x.starts_with(&format!("{ip}:"))));
    // Wait until every node programs all N backends.
    let ready = eventually(Duration::from_secs(60), || async {
        for a in &agents {
            let f = a.datapath_frontends().await.ok()?;
            if f.get(&key).map_or(0, |b| b.len()) != pods {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(ready.is_some(), "not every node programmed {pods} backends");
    let rev0 = c.client_n(0).status().await.unwrap().store.revision;

    // Clients on every node connect continuously (bounded by the run).
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, Outcome)>>> = Arc::default();
    let mut threads = vec![];
    for cl in &clients {
        let ns = pod_netns(cl);
        let (stop, log) = (stop.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            fjord_net::netns::run_in(&ns, || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let o = match std::net::TcpStream::connect_timeout(&vip, Duration::from_millis(500)) {
                        Ok(mut s) => {
                            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                            let mut out = String::new();
                            match s.read_to_string(&mut out) {
                                Ok(_) if !out.is_empty() => Outcome::Answer(out),
                                Ok(_) => Outcome::Failed(std::io::ErrorKind::UnexpectedEof),
                                Err(e) => Outcome::Failed(e.kind()),
                            }
                        }
                        Err(e) => Outcome::Failed(e.kind()),
                    };
                    log.lock().unwrap().push((t, o));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .unwrap();
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t_start = Instant::now();
    let mut conv_a = vec![];
    let mut dels: Vec<(Instant, String)> = vec![];
    for p in backends.iter().take(n) {
        let ip = p.ip.unwrap();
        let t0 = Instant::now();
        pod::del(&c.state, &format!("default/{}", p.name)).await.unwrap();
        loop {
            let mut any = false;
            for a in &agents {
                if let Ok(f) = a.datapath_frontends().await {
                    any |= holds(&f, ip);
                }
            }
            if !any {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "backend {ip} never left every node");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        conv_a.push(t0.elapsed().as_secs_f64() * 1000.0);
        dels.push((t0, p.name.clone()));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let elapsed = t_start.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let rev1 = c.client_n(0).status().await.unwrap().store.revision;

    // (b): per deletion, the last connection after its CNI DEL that still went to that pod
    // (answered by it), or that failed before the next deletion (it can only have been routed
    // to a pod that was gone).
    let log = log.lock().unwrap().clone();
    let mut conv_b = vec![];
    let mut failed_live = 0usize;
    let mut routed_dead = 0usize;
    for (i, (t0, name)) in dels.iter().enumerate() {
        let next = dels.get(i + 1).map(|d| d.0).unwrap_or_else(|| *t0 + Duration::from_millis(300));
        let mut last = Duration::ZERO;
        for (t, o) in log.iter().filter(|(t, _)| *t >= *t0) {
            match o {
                Outcome::Answer(who) if who == name => {
                    last = last.max(*t - *t0);
                    routed_dead += 1;
                }
                Outcome::Failed(_) if *t < next => {
                    last = last.max(*t - *t0);
                    routed_dead += 1;
                }
                _ => {}
            }
        }
        conv_b.push(last.as_secs_f64() * 1000.0);
    }
    let total = log.len();
    for (t, o) in &log {
        if let Outcome::Failed(k) = o {
            if *t < dels[0].0 {
                failed_live += 1;
                eprintln!("failure before any deletion: {k:?}");
            }
        }
    }
    println!("fjord convergence: 3 nodes (etcd, native routing), {pods} backends, {} deleted one at a time, clients on every node", dels.len());
    let mut a = conv_a.clone();
    let mut b = conv_b.clone();
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        (percentile(v, 50.0), percentile(v, 99.0), *v.last().unwrap())
    };
    let (a50, a99, amax) = stats(&mut a);
    let (b50, b99, bmax) = stats(&mut b);
    println!("(a) CNI DEL → backend gone from every node's datapath: p50 {a50:.1} ms  p99 {a99:.1} ms  max {amax:.1} ms");
    println!("(b) CNI DEL → last connection still going to the deleted pod: p50 {b50:.1} ms  p99 {b99:.1} ms  max {bmax:.1} ms");
    println!(
        "client connections: {total} in all, {routed_dead} went to a pod being deleted (answered by it or failed in its window), {failed_live} failed before any deletion"
    );
    println!("store writes: {} etcd revisions in {:.1} s = {:.0} writes/s ({:.1} per deleted pod)", rev1 - rev0, elapsed.as_secs_f64(), (rev1 - rev0) as f64 / elapsed.as_secs_f64(), (rev1 - rev0) as f64 / dels.len() as f64);
    if !smoke {
        println!("targets: (a) p99 < 100 ms: {}; (b) p99 < 100 ms: {}", if a99 < 100.0 { "MET" } else { "MISSED" }, if b99 < 100.0 { "MET" } else { "MISSED" });
    }
}
