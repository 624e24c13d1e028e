//! Helpers for fjord's end-to-end tests and benchmarks.
//!
//! Safety: everything here works in namespaces the test creates (a dev cluster
//! with a unique name, prefixed `fjord-e2e…`) and removes them in `Drop`, also
//! when the test panics. Kernel-touching tests are serialized across processes
//! by an flock on `/run/fjord-e2e.lock`.

use anyhow::{Context, Result};
use fjord_api::AgentClient;
use fjord_net::netns;
use fjordctl::cluster::{self, UpOptions};
use fjordctl::context::{ClusterState, Home};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Directory holding fjord-agent, fjord-cni and fjordctl (the cargo target dir of this build).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FJORD_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/test-xxxx  or  target/<profile>/test-xxxx
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for b in ["fjord-agent", "fjord-cni", "fjordctl"] {
        assert!(
            dir.join(b).exists(),
            "{b} is not built in {}: run `cargo build --workspace --bins` (add --release for benchmarks) first; ./fjord.sh does",
            dir.display()
        );
    }
    dir
}

/// Cross-process lock serializing tests that touch the kernel.
pub struct KernelLock(#[allow(dead_code)] std::fs::File);

pub fn kernel_lock() -> KernelLock {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open("/run/fjord-e2e.lock").expect("open lock file");
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc_flock(f.as_raw_fd(), 2 /* LOCK_EX */) };
    assert_eq!(r, 0, "flock");
    KernelLock(f)
}

extern "C" {
    #[link_name = "flock"]
    fn libc_flock(fd: i32, op: i32) -> i32;
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A dev cluster that exists for one test and is removed on drop.
pub struct TestCluster {
    pub home: Home,
    pub state: ClusterState,
    _tmp: tempfile::TempDir,
    _lock: KernelLock,
}

impl TestCluster {
    pub async fn up() -> TestCluster {
        Self::up_with(1, "embedded", "native").await
    }

    /// A cluster of `nodes` nodes on `store` (embedded|etcd) with `routing` (native|vxlan).
    pub async fn up_with(nodes: u32, store: &str, routing: &str) -> TestCluster {
        Self::up_full(nodes, store, routing, vec![]).await
    }

    /// Like [`up_with`](Self::up_with), with extra fjord-agent flags.
    pub async fn up_full(nodes: u32, store: &str, routing: &str, agent_args: Vec<String>) -> TestCluster {
        Self::up_opts(nodes, store, routing, agent_args, false).await
    }

    /// Like [`up_full`](Self::up_full); `socket_lb_pods`: `cluster up --socket-lb-pods`.
    pub async fn up_opts(nodes: u32, store: &str, routing: &str, agent_args: Vec<String>, socket_lb_pods: bool) -> TestCluster {
        let lock = kernel_lock();
        let tmp = tempfile::Builder::new().prefix("fj").tempdir_in("/tmp").unwrap();
        let home = Home::new(Some(tmp.path().to_path_buf()));
        let name = format!("e2e{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let opts = UpOptions { name, nodes, store: store.into(), routing: routing.into(), bin_dir: bin_dir(), agent_args, socket_lb_pods };
        let state = cluster::up(&home, &opts, &|_| {}).await.expect("cluster up");
        TestCluster { home, state, _tmp: tmp, _lock: lock }
    }

    pub fn node(&self) -> &fjordctl::context::NodeState {
        &self.state.nodes[0]
    }

    pub fn node_n(&self, i: usize) -> &fjordctl::context::NodeState {
        &self.state.nodes[i]
    }

    pub fn client_n(&self, i: usize) -> AgentClient {
        AgentClient::new(&self.state.nodes[i].api_socket)
    }

    pub fn client(&self) -> AgentClient {
        AgentClient::new(&self.node().api_socket)
    }

    /// `kill -9` the agent of node `i` and wait until every thread of it is gone.
    pub async fn kill_agent(&self, i: usize) {
        let pid = self.state.nodes[i].agent_pid.expect("agent pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
        let dead = eventually(Duration::from_secs(10), || async { (!cluster::pid_alive(pid)).then_some(()) }).await;
        assert!(dead.is_some(), "agent {pid} survived SIGKILL");
    }

    /// Start node `i`'s agent again (as `cluster up` did), wait for it, record its pid.
    pub async fn restart_agent(&mut self, i: usize) {
        let node = self.state.nodes[i].clone();
        let pid = cluster::start_agent(&bin_dir(), &node).unwrap();
        cluster::wait_for_agent(&node, pid).await.unwrap();
        let mut st = self.home.load_cluster(&self.state.name).unwrap();
        st.nodes[i].agent_pid = Some(pid);
        self.home.save_cluster(&st).unwrap();
        self.reload();
    }

    pub fn reload(&mut self) {
        self.state = self.home.load_cluster(&self.state.name).unwrap();
    }

    pub fn node_netns(&self) -> PathBuf {
        netns::path(&self.node().netns)
    }

    /// The fjordctl binary, pointed at this cluster, with `args`.
    pub fn fjordctl_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(bin_dir().join("fjordctl"));
        c.arg("--fjord-home").arg(&self.home.dir).args(["--cluster", &self.state.name]).args(args);
        c
    }

    /// Runs the fjordctl binary against this cluster: (exit code, stdout + stderr).
    pub fn fjordctl(&self, args: &[&str]) -> (i32, String) {
        let out = self.fjordctl_cmd(args).output().expect("run fjordctl");
        (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let name = self.state.name.clone();
        let home = Home::new(Some(self.home.dir.clone()));
        // Drop may run outside a runtime (after a panic); use a private one.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(cluster::down(&home, &name, &|_| {}))
        })
        .join();
    }
}

pub fn pod_netns(pod: &fjordctl::pod::PodInfo) -> PathBuf {
    netns::path(&pod.netns)
}

pub fn tcp_listen_in(ns: &Path, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    netns::run_in(ns, move || TcpListener::bind(addr)).unwrap().expect("bind")
}

pub fn tcp_connect_in(ns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    netns::run_in(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5))).unwrap()
}

pub fn udp_bind_in(ns: &Path, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    netns::run_in(ns, move || UdpSocket::bind(addr)).unwrap().expect("bind udp")
}

/// Serve `n` echo connections on `l` in a thread.
pub fn echo_server(l: TcpListener, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = l.accept() else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Write `msg` and read it back.
pub fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// Run a command in a namespace; (exit code, stdout+stderr).
pub fn run_in_ns(ns: &Path, argv: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(argv[0]);
    cmd.args(&argv[1..]);
    netns::command_in(&mut cmd, ns).unwrap();
    let out = cmd.output().expect("run command");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Poll `f` until it returns Some or `limit` passes (for eventual states; not a timing assertion).
pub async fn eventually<T, F: FnMut() -> Fut, Fut: std::future::Future<Output = Option<T>>>(limit: Duration, mut f: F) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Links in a namespace, by name.
pub async fn links_in(ns: &Path) -> Vec<String> {
    netns::run_async_in(ns, || async {
        let nl = fjord_net::Netlink::new().unwrap();
        nl.links().await.unwrap().into_iter().map(|l| l.name).collect::<Vec<_>>()
    })
    .await
    .unwrap()
}

pub async fn routes_in(ns: &Path) -> Vec<fjord_net::RouteInfo> {
    netns::run_async_in(ns, || async {
        let nl = fjord_net::Netlink::new().unwrap();
        nl.routes().await.unwrap()
    })
    .await
    .unwrap()
}

/// Resident memory of a process, in bytes.
pub fn rss_of(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).context("read status")?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// Percentile (nearest-rank) of a sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Echo servers on `ports` in namespace `ns`, as tasks on the runtime `rt` (one task per
/// listener and per connection): the benchmarks' backends.
pub fn echo_servers(rt: &tokio::runtime::Handle, ns: &Path, ports: std::ops::Range<u16>) {
    let listeners = netns::run_in(ns, || {
        ports
            .map(|p| {
                let l = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], p))).expect("bind echo port");
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    let _g = rt.enter();
    for l in listeners {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

/// The value of metric `name` (without labels, or its first labelled series) in a Prometheus
/// text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until the agent's datapath holds `n` frontends; how long that took, or None after `limit`.
pub async fn wait_frontends(c: &AgentClient, n: usize, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if let Ok(m) = c.metrics().await {
            if metric(&m, "fjord_datapath_frontends") == Some(n as f64) {
                return Some(t.elapsed());
            }
        }
        if t.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A ClusterIP Service `bench/<name>` on port 80 and its EndpointSlice: `endpoints` on `target_port`.
pub fn clusterip_manifest(name: &str, vip: std::net::Ipv4Addr, target_port: u16, endpoints: &[std::net::Ipv4Addr]) -> String {
    let mut m = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 80}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{port: {target_port}}}]\nendpoints:\n"
    );
    for e in endpoints {
        m.push_str(&format!("- addresses: [\"{e}\"]\n"));
    }
    m
}

/// Applies (or deletes) the services `range`, each written by `doc`, through the agent API in
/// bodies of 1,000 (the API takes up to 2 MB), then waits until the datapath holds `expect`
/// frontends.
pub async fn apply_services(api: &AgentClient, range: std::ops::Range<usize>, doc: impl Fn(usize) -> String, delete: bool, expect: usize) {
    for start in range.clone().step_by(1000) {
        let m: String = (start..(start + 1000).min(range.end)).map(&doc).collect();
        if delete {
            api.delete_objects(&m).await.expect("delete services");
        } else {
            api.apply(&m).await.expect("apply services");
        }
    }
    assert!(wait_frontends(api, expect, Duration::from_secs(120)).await.is_some(), "the agent did not reach {expect} frontends");
}
