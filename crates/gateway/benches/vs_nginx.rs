//! fjord-gateway vs nginx vs the backend directly, on loopback, with wrk.
//!
//! Run: `cargo bench -p fjord-gateway --bench vs_nginx` (needs `wrk` and `nginx` on PATH).
//! Environment: `FJTGW_BENCH_SECS` (default 5) seconds per wrk run, `FJTGW_BENCH_CONNS`
//! (default 32) connections, `FJTGW_BENCH_WORKERS` (default 1) worker threads for both proxies,
//! `FJTGW_BENCH_GATEWAY_BIN` another fjord-gateway binary to measure (interleaved A/B runs of an
//! old and a new build against the same nginx).
//!
//! Setup: two `fjord-echo` backends (separate processes); fjord-gateway configured with the
//! seed HTTPRoute (PathPrefix /api/v2, 90/10 weights); nginx configured with the same route and
//! weights (upstream weight=90/10, keepalive), on two ports: as configured by default, and with
//! `listen … deferred` (TCP_DEFER_ACCEPT, which fjord-gateway's listeners set); wrk with one
//! thread. Every run is bounded by
//! time; all processes are killed on exit, also on panic.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc {
    #[allow(dead_code)]
    name: &'static str,
    child: Child,
}
impl Drop for Proc {
    /// SIGTERM first (nginx's master then stops its workers; SIGKILL would orphan them), wait
    /// up to 5 s, then SIGKILL.
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    fjord_store::testing::free_loopback_port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peak RSS (VmHWM) in KiB of a process and its children (nginx master + workers).
fn rss_kib(pid: u32) -> u64 {
    let mut pids = vec![pid];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
    }
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// CPU time (user + system) in microseconds of a process and its children (nginx workers).
fn cpu_us(pid: u32) -> u64 {
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut pids = vec![pid];
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
    }
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| {
            // fields after the `(comm)`: state is field 3; utime 14, stime 15
            let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            t * 1_000_000 / tck
        })
        .sum()
}

#[derive(Debug, Default, Clone)]
struct WrkResult {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn parse_ms(s: &str) -> f64 {
    let (num, unit): (String, String) = s.chars().partition(|c| c.is_ascii_digit() || *c == '.');
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit.as_str() {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => f64::NAN,
    }
}

fn wrk(url: &str, secs: u64, conns: u32, close: bool) -> WrkResult {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", "--timeout", "5s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().expect("running wrk (install the Debian package `wrk`)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut r = WrkResult::default();
    let mut errors = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = parse_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = parse_ms(v.trim());
        } else if t.starts_with("Non-2xx") || t.starts_with("Socket errors") {
            errors.push(t.to_string());
        }
    }
    r.errors = errors.join("; ");
    r
}

fn write(path: &Path, s: &str) {
    std::fs::File::create(path).unwrap().write_all(s.as_bytes()).unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let secs: u64 = std::env::var("FJTGW_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).clamp(1, 60);
    let conns: u32 = std::env::var("FJTGW_BENCH_CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(32).clamp(1, 1000);
    let workers: u32 = std::env::var("FJTGW_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1).clamp(1, 16);
    for tool in ["wrk", "nginx"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")]).stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
            eprintln!("vs_nginx: `{tool}` not found; install the Debian packages wrk and nginx. Skipping.");
            return;
        }
    }
    let dir = tempfile::Builder::new().prefix("fjtgw-bench-").tempdir().unwrap();
    let echo_bin = PathBuf::from(env!("CARGO_BIN_EXE_fjord-echo"));
    let gw_bin = std::env::var_os("FJTGW_BENCH_GATEWAY_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fjord-gateway")));

    let (p1, p2, pg, pn, pnd) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let mut procs = Vec::new();
    for (port, pod) in [(p1, "backend-v1"), (p2, "backend-v2")] {
        let c = Command::new(&echo_bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--pod", pod, "--namespace", "backend"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        procs.push(Proc { name: "echo", child: c });
        wait_port(port, "fjord-echo");
    }

    // fjord-gateway with the seed route
    let cfg = dir.path().join("gateway.yaml");
    write(
        &cfg,
        &format!(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: fjord}}
spec: {{controllerName: fjord.dev/gateway}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: external-gateway, namespace: backend}}
spec:
  gatewayClassName: fjord
  listeners: [{{name: http, port: {pg}, protocol: HTTP}}]
---
apiVersion: fjord.dev/v1alpha1
kind: StaticService
metadata: {{name: backend-v1, namespace: backend}}
spec: {{ports: [{{port: 8080, endpoints: ["127.0.0.1:{p1}"]}}]}}
---
apiVersion: fjord.dev/v1alpha1
kind: StaticService
metadata: {{name: backend-v2, namespace: backend}}
spec: {{ports: [{{port: 8080, endpoints: ["127.0.0.1:{p2}"]}}]}}
---
{route}"#,
            route = fjord_gateway::SEED_HTTPROUTE
        ),
    );
    let gw = Command::new(&gw_bin)
        .args(["--config", cfg.to_str().unwrap(), "--listen-address", "127.0.0.1", "--no-access-log", "--poll-ms", "0"])
        .args(["--workers", &workers.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw = Proc { name: "fjord-gateway", child: gw };
    wait_port(pg, "fjord-gateway");

    // nginx with the same route and weights
    let nd = dir.path().join("nginx");
    let locations = r#"location = /api/v2 { proxy_pass http://split; proxy_http_version 1.1; proxy_set_header Connection ""; } location /api/v2/ { proxy_pass http://split; proxy_http_version 1.1; proxy_set_header Connection ""; } location / { return 404; }"#;
    std::fs::create_dir(&nd).unwrap();
    write(
        &nd.join("nginx.conf"),
        &format!(
            r#"worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream split {{ server 127.0.0.1:{p1} weight=90; server 127.0.0.1:{p2} weight=10; keepalive 256; }}
  server {{ listen 127.0.0.1:{pn}; {locations} }}
  server {{ listen 127.0.0.1:{pnd} deferred; {locations} }}
}}
"#,
            d = nd.display()
        ),
    );
    let ng = Command::new("nginx")
        .args(["-p", nd.to_str().unwrap(), "-c", nd.join("nginx.conf").to_str().unwrap(), "-e", nd.join("error.log").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ng = Proc { name: "nginx", child: ng };
    wait_port(pn, "nginx");
    wait_port(pnd, "nginx (deferred)");

    // "nginx deferred": the same nginx with `listen … deferred` (TCP_DEFER_ACCEPT, which
    // fjord-gateway's listeners use), so the socket option's share of the difference shows
    let targets = [
        ("direct (floor)", p1, None),
        ("fjord-gateway", pg, Some(&gw)),
        ("nginx", pn, Some(&ng)),
        ("nginx deferred", pnd, Some(&ng)),
    ];
    println!("# gateway binary {}", gw_bin.display());
    println!("# wrk -t1 -c{conns} -d{secs}s, proxies with {workers} worker thread(s)/process(es), 2 echo backends, 90/10 split, path /api/v2/bench");
    let mut results = Vec::new();
    for close in [false, true] {
        let mode = if close { "new connection per request" } else { "keep-alive" };
        for (name, port, proc_) in &targets {
            let url = format!("http://127.0.0.1:{port}/api/v2/bench");
            // warm-up (bounded)
            let _ = wrk(&url, 1, conns, close);
            let cpu0 = proc_.map(|p| cpu_us(p.child.id())).unwrap_or(0);
            let r = wrk(&url, secs, conns, close);
            let cpu = proc_.map(|p| cpu_us(p.child.id())).unwrap_or(0).saturating_sub(cpu0);
            let rss = proc_.map(|p| rss_kib(p.child.id())).unwrap_or(0);
            println!(
                "{mode:<27} {name:<15} {:>8.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  proxy CPU {:>5} us/req  peak RSS {:>6} KiB {}",
                r.rps,
                r.p50_ms,
                r.p99_ms,
                if proc_.is_some() { format!("{:.1}", cpu as f64 / r.requests.max(1) as f64) } else { "-".into() },
                if proc_.is_some() { rss.to_string() } else { "-".into() },
                if r.errors.is_empty() { String::new() } else { format!(" [{}]", r.errors) }
            );
            results.push((mode, *name, r, rss));
        }
    }
    println!("# ratios (fjord-gateway / nginx as configured by default; / nginx with `listen deferred`; / direct)");
    for mode in ["keep-alive", "new connection per request"] {
        let get = |n: &str| results.iter().find(|(m, name, _, _)| *m == mode && *name == n).unwrap();
        let (_, _, g, grss) = get("fjord-gateway");
        let (_, _, n, nrss) = get("nginx");
        let (_, _, nd, _) = get("nginx deferred");
        let (_, _, d, _) = get("direct (floor)");
        println!(
            "{mode:<27} throughput x{:.2} vs nginx, x{:.2} vs nginx deferred, x{:.2} vs direct; p99 x{:.2} vs nginx, x{:.2} vs nginx deferred; peak RSS x{:.2} vs nginx",
            g.rps / n.rps,
            g.rps / nd.rps,
            g.rps / d.rps,
            g.p99_ms / n.p99_ms,
            g.p99_ms / nd.p99_ms,
            *grss as f64 / *nrss as f64
        );
    }
    drop(gw);
    drop(ng);
    drop(procs);
}
