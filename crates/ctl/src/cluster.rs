//! The local dev cluster: network namespaces only, nothing in the machine's
//! root namespace changes.
//!
//! ```text
//!   fjord-NAME.underlay   bridge br0 (the "underlay", 172.18.0.0/16)
//!     ├── veth ── fjord-NAME.node1  eth0 172.18.0.2   agent (+ gateway), PodCIDR 10.244.1.0/24
//!     │                └── veth ── fjord-NAME.pod.NS.POD  eth0 10.244.1.x/32
//!     └── veth ── fjord-NAME.ext    eth0 172.18.255.1 (external client / "the internet")
//! ```

use crate::context::{ClusterState, EtcdState, Home, NodeState};
use anyhow::{bail, Context, Result};
use fjord_api::AgentClient;
use fjord_net::{netns, Netlink};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const UNDERLAY_CIDR: &str = "172.18.0.0/16";
pub const EXT_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 255, 1);
pub const ETCD_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);

pub struct UpOptions {
    pub name: String,
    pub nodes: u32,
    pub store: String,
    /// `native` or `vxlan` (etcd store only).
    pub routing: String,
    pub bin_dir: PathBuf,
    /// Extra fjord-agent flags for every node (e.g. `--datapath off`).
    pub agent_args: Vec<String>,
    /// Attach the socket-level LB to the pods' cgroup too (Cilium's default,
    /// `bpf-lb-sock-hostns-only=false`); otherwise pods use the tc programs at their veth.
    pub socket_lb_pods: bool,
}

/// Where fjord's binaries are: `FJORD_BIN_DIR`, else next to this fjordctl.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FJORD_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."))
}

pub fn validate_name(name: &str) -> Result<()> {
    fjord_model::api::validate_dns_label("cluster name", name).map_err(anyhow::Error::msg)?;
    if name.len() > 40 {
        bail!("cluster name {name:?} is too long (max 40 characters)");
    }
    Ok(())
}

fn node_address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 1 + i as u8)
}

/// Create the cluster. On failure everything made so far is removed again.
pub async fn up(home: &Home, o: &UpOptions, progress: &dyn Fn(&str)) -> Result<ClusterState> {
    validate_name(&o.name)?;
    if o.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    match o.store.as_str() {
        "embedded" if o.nodes > 1 => bail!(
            "--nodes {} needs --store etcd: the embedded store is a single-node store (every agent would keep its own \
             state, so nodes could not learn each other's PodCIDRs and pods)",
            o.nodes
        ),
        "embedded" if o.routing != "native" => bail!("--routing {} needs --store etcd (a single node routes nothing to other nodes)", o.routing),
        "embedded" | "etcd" => {}
        other => bail!("--store {other:?} is unknown: use embedded or etcd"),
    }
    if !matches!(o.routing.as_str(), "native" | "vxlan") {
        bail!("--routing {:?} is unknown: use native or vxlan", o.routing);
    }
    if o.nodes > 200 {
        bail!("--nodes {} is more than the dev cluster's limit of 200", o.nodes);
    }
    let dir = home.cluster_dir(&o.name);
    if dir.join("cluster.json").exists() {
        bail!(
            "cluster {:?} already exists (state in {}); use it, or remove it with `fjordctl cluster down --name {}`",
            o.name,
            dir.display(),
            o.name
        );
    }
    let leftovers = netns::list(&ClusterState::netns_prefix(&o.name));
    if !leftovers.is_empty() {
        bail!(
            "network namespaces of a cluster named {:?} exist without its state ({}); remove them with `fjordctl cluster down --name {}`",
            o.name,
            leftovers.join(", "),
            o.name
        );
    }
    for b in ["fjord-agent", "fjord-cni"] {
        if !o.bin_dir.join(b).exists() {
            bail!("{b} not found in {} (build with `cargo build --release`, or set FJORD_BIN_DIR)", o.bin_dir.display());
        }
    }
    let prefix = ClusterState::netns_prefix(&o.name);
    let mut state = ClusterState {
        name: o.name.clone(),
        store: o.store.clone(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        underlay_netns: format!("{prefix}underlay"),
        underlay_cidr: UNDERLAY_CIDR.parse().unwrap(),
        ext_netns: format!("{prefix}ext"),
        ext_address: EXT_ADDRESS,
        nodes: vec![],
        etcd: None,
        routing: o.routing.clone(),
    };
    // Save first, so that `cluster down` can clean up whatever a failure leaves.
    home.save_cluster(&state)?;
    let r = build(home, o, &mut state, progress).await;
    if let Err(e) = r {
        progress(&format!("cluster up failed: {e:#}; removing what was made"));
        let _ = down(home, &o.name, &|_| {}).await;
        return Err(e);
    }
    let mut cfg = home.config()?;
    cfg.current_cluster = Some(o.name.clone());
    home.save_config(&cfg)?;
    Ok(state)
}

async fn build(home: &Home, o: &UpOptions, state: &mut ClusterState, progress: &dyn Fn(&str)) -> Result<()> {
    let underlay = netns::create(&state.underlay_netns)?;
    progress(&format!("created namespace {} with bridge br0 (underlay {})", state.underlay_netns, state.underlay_cidr));
    netns::run_async_in(&underlay, || async {
        let nl = Netlink::new()?;
        nl.set_up("lo").await?;
        nl.add_bridge("br0").await?;
        nl.set_up("br0").await?;
        anyhow::Ok(())
    })
    .await??;
    let prefix_len = state.underlay_cidr.prefix_len();
    // External client namespace.
    let ext = netns::create(&state.ext_netns)?;
    attach_to_underlay(&underlay, &ext, "ext", state.ext_address, prefix_len).await?;
    progress(&format!("created namespace {} (external client) at {}", state.ext_netns, state.ext_address));
    home.save_cluster(state)?;
    if o.store == "etcd" {
        let etcd = start_etcd(home, state, &underlay, prefix_len).await?;
        progress(&format!("started etcd (pid {}) in namespace {} at {}", etcd.pid.unwrap_or(0), etcd.netns, etcd.endpoint));
        state.etcd = Some(etcd);
        home.save_cluster(state)?;
    }
    let etcd_endpoint = state.etcd.as_ref().map(|e| e.endpoint.clone());
    let store_url = |dir: &Path| -> String {
        match &etcd_endpoint {
            Some(e) => format!("etcd:{e}"),
            None => format!("embedded:{}", dir.join("store.redb").display()),
        }
    };
    for i in 1..=o.nodes {
        let name = format!("node{i}");
        let ns_name = format!("{}{name}", ClusterState::netns_prefix(&state.name));
        let node_ns = netns::create(&ns_name)?;
        let address = node_address(i);
        let veth = format!("n{i}");
        attach_to_underlay(&underlay, &node_ns, &veth, address, prefix_len).await?;
        let dir = home.cluster_dir(&state.name).join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut node = NodeState {
            name: name.clone(),
            netns: ns_name.clone(),
            address,
            pod_cidr: format!("10.244.{i}.0/24").parse().unwrap(),
            api_socket: dir.join("agent.sock"),
            store: store_url(&dir),
            cni_bin_dir: dir.join("cni/bin"),
            cni_conf_dir: dir.join("cni/net.d"),
            dir,
            agent_pid: None,
            underlay_veth: veth,
            routing: o.routing.clone(),
            allocate_pod_cidr: o.store == "etcd",
            agent_args: o.agent_args.clone(),
            socket_lb_pods: o.socket_lb_pods,
        };
        // the pods' parent cgroup (kubelet's kubepods.slice): `pod exec` runs commands in it
        if let Some(cg) = pods_cgroup(&node.dir, &node.name) {
            if !cg.exists() {
                std::fs::create_dir(&cg).with_context(|| format!("creating the pods' cgroup {}", cg.display()))?;
            }
        }
        // node1 runs the Gateway API proxy (listeners on its underlay address, reachable from ext),
        // unless `--agent-arg --no-gateway` asks for a cluster without it (e.g. benchmarks of the
        // service datapath alone).
        let no_gateway = node.agent_args.iter().any(|a| a == "--no-gateway");
        node.agent_args.retain(|a| a != "--no-gateway");
        if i == 1 && !no_gateway && !node.agent_args.iter().any(|a| a == "--gateway") {
            node.agent_args.push("--gateway".into());
        }
        install_cni(&o.bin_dir, &node)?;
        state.nodes.push(node.clone());
        home.save_cluster(state)?;
        let pid = start_agent(&o.bin_dir, &node)?;
        node.agent_pid = Some(pid);
        *state.nodes.last_mut().unwrap() = node.clone();
        home.save_cluster(state)?;
        wait_for_agent(&node, pid).await?;
        if node.allocate_pod_cidr {
            let st = AgentClient::new(&node.api_socket).status().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            node.pod_cidr = st.ipam.pod_cidr;
            *state.nodes.last_mut().unwrap() = node.clone();
            home.save_cluster(state)?;
        }
        progress(&format!(
            "created node {name}: namespace {ns_name}, address {address}, PodCIDR {}, agent pid {pid}, API {}",
            node.pod_cidr,
            node.api_socket.display()
        ));
        progress(&format!("  CNI plugin {}/fjord-cni, conflist {}/10-fjord.conflist", node.cni_bin_dir.display(), node.cni_conf_dir.display()));
    }
    Ok(())
}

/// etcd (Debian's etcd-server) in its own namespace on the underlay.
async fn start_etcd(home: &Home, state: &ClusterState, underlay: &Path, prefix_len: u8) -> Result<EtcdState> {
    use std::os::unix::process::CommandExt;
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"].into_iter().map(PathBuf::from).find(|p| p.exists())
        .context("etcd not found: install Debian's etcd-server (./fjord.sh does)")?;
    let ns_name = format!("{}etcd", ClusterState::netns_prefix(&state.name));
    let ns = netns::create(&ns_name)?;
    attach_to_underlay(underlay, &ns, "etcd", ETCD_ADDRESS, prefix_len).await?;
    let dir = home.cluster_dir(&state.name).join("etcd");
    std::fs::create_dir_all(&dir)?;
    let endpoint = format!("http://{ETCD_ADDRESS}:2379");
    let peer = format!("http://{ETCD_ADDRESS}:2380");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["--name", "fjord", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("fjord={peer}")])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    netns::command_in(&mut cmd, &ns)?;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let pid = cmd.spawn().context("starting etcd")?.id();
    let etcd = EtcdState { netns: ns_name, address: ETCD_ADDRESS, endpoint, data_dir: dir.clone(), pid: Some(pid) };
    let t0 = Instant::now();
    let addr = std::net::SocketAddr::new(ETCD_ADDRESS.into(), 2379);
    loop {
        let up = netns::run_in(&ns, move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())?;
        if up {
            return Ok(etcd);
        }
        if !pid_alive(pid) || t0.elapsed() > Duration::from_secs(30) {
            bail!("etcd did not start; see {}", dir.join("etcd.log").display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A veth from the underlay bridge into `ns`, named eth0 there, with `addr`.
async fn attach_to_underlay(underlay: &Path, ns: &Path, veth: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
    let ns_file = netns::open(ns)?;
    let veth_s = veth.to_string();
    let peer = format!("{veth}p");
    let peer2 = peer.clone();
    netns::run_async_in(underlay, move || async move {
        let nl = Netlink::new()?;
        nl.add_veth(&veth_s, &peer2, None).await?;
        nl.set_master(&veth_s, "br0").await?;
        nl.set_up(&veth_s).await?;
        nl.move_to_netns(&peer2, &ns_file).await?;
        anyhow::Ok(())
    })
    .await??;
    netns::run_async_in(ns, move || async move {
        let nl = Netlink::new()?;
        nl.rename(&peer, "eth0").await?;
        nl.set_up("lo").await?;
        nl.set_up("eth0").await?;
        nl.add_addr("eth0", addr, prefix_len).await?;
        anyhow::Ok(())
    })
    .await??;
    Ok(())
}

fn install_cni(bin_dir: &Path, node: &NodeState) -> Result<()> {
    let out = std::process::Command::new(bin_dir.join("fjord-cni"))
        .arg("install")
        .arg("--bin-dir")
        .arg(&node.cni_bin_dir)
        .arg("--conf-dir")
        .arg(&node.cni_conf_dir)
        .arg("--agent-socket")
        .arg(&node.api_socket)
        .output()
        .context("running fjord-cni install")?;
    if !out.status.success() {
        bail!("fjord-cni install failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Start the node's agent inside the node's namespace, detached, logging to agent.log.
pub fn start_agent(bin_dir: &Path, node: &NodeState) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let log_path = node.dir.join("agent.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(bin_dir.join("fjord-agent"));
    cmd.arg("--node").arg(&node.name).arg("--store").arg(&node.store);
    if !node.allocate_pod_cidr {
        cmd.arg("--pod-cidr").arg(node.pod_cidr.to_string());
    }
    if !node.routing.is_empty() {
        cmd.arg("--routing").arg(&node.routing);
    }
    cmd.args(&node.agent_args);
    // Pins per cluster and node, so clusters never share eBPF maps; `cluster down` removes them.
    cmd.arg("--bpf-pin-dir").arg(bpf_pin_dir(&node.dir, &node.name));
    // Socket-level LB for the node's host-network processes (a cgroup of the cluster's own).
    if let Some(cg) = node_cgroup(&node.dir, &node.name) {
        cmd.arg("--socket-lb-cgroup").arg(cg);
    }
    // ... and for its pods when the cluster asks for it
    if node.socket_lb_pods {
        if let Some(cg) = pods_cgroup(&node.dir, &node.name) {
            cmd.arg("--socket-lb-cgroup").arg(cg);
        }
    }
    // Short leases in the dev cluster, so a dead node leaves quickly.
    cmd.arg("--node-lease-ttl").arg("5s")
        .arg("--api-socket")
        .arg(&node.api_socket)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FJORD_") {
            cmd.env_remove(k);
        }
    }
    netns::command_in(&mut cmd, &netns::path(&node.netns))?;
    // SAFETY: setsid is async-signal-safe; it detaches the agent from fjordctl's session.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let child = cmd.spawn().context("starting fjord-agent")?;
    Ok(child.id())
}

pub async fn wait_for_agent(node: &NodeState, pid: u32) -> Result<()> {
    let client = AgentClient::new(&node.api_socket).with_timeout(Duration::from_secs(2));
    let t0 = Instant::now();
    loop {
        if client.healthz().await.is_ok() {
            return Ok(());
        }
        if !pid_alive(pid) || t0.elapsed() > Duration::from_secs(30) {
            let log = std::fs::read_to_string(node.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("agent of {} did not come up; last lines of {}:\n{}", node.name, node.dir.join("agent.log").display(), tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether process `pid` still runs. A zombie (exited, not yet reaped) counts
/// as dead only once every thread has exited: a killed multi-threaded process
/// shows its leader as a zombie while other threads still hold its files.
pub fn pid_alive(pid: u32) -> bool {
    let zombie = |stat: &str| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']));
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| !zombie(&s)))
}

/// Is `pid` the agent of `node` (and not some other process that reused the pid)?
fn is_ours(pid: u32, program: &str, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<String> = c.split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
            args.first().is_some_and(|a| a.ends_with(program)) && args.iter().any(|a| a.contains(marker))
        })
        .unwrap_or(false)
}

pub fn stop_agent(node: &NodeState, signal: nix::sys::signal::Signal) -> Result<bool> {
    let Some(pid) = node.agent_pid else { return Ok(false) };
    if !is_ours(pid, "fjord-agent", &node.api_socket.display().to_string()) {
        return Ok(false);
    }
    stop_pid(pid, &node.name, signal)
}

/// Stop the cluster's etcd (e.g. for fault tests); `cluster down` also does this.
pub fn stop_etcd(etcd: &EtcdState, signal: nix::sys::signal::Signal) -> Result<bool> {
    let Some(pid) = etcd.pid else { return Ok(false) };
    if !is_ours(pid, "etcd", &etcd.data_dir.display().to_string()) {
        return Ok(false);
    }
    stop_pid(pid, "etcd", signal)
}

fn stop_pid(pid: u32, what: &str, signal: nix::sys::signal::Signal) -> Result<bool> {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    let t0 = Instant::now();
    while pid_alive(pid) {
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("pid {pid} ({what}) does not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// bpffs directory of a dev-cluster node: /sys/fs/bpf/fjord/<cluster>/<node>, where the
/// cluster is identified by its state directory's name.
pub fn bpf_pin_dir(node_dir: &Path, node: &str) -> PathBuf {
    let cluster = node_dir.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Path::new(BPF_ROOT).join(format!("dev-{cluster}")).join(node)
}

pub const BPF_ROOT: &str = "/sys/fs/bpf/fjord";

/// The cgroup v2 mount, if this machine has one (unified or hybrid layout).
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().map(PathBuf::from).find(|p| {
        p.join("cgroup.procs").exists()
            && nix::sys::statfs::statfs(p.as_path()).map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).unwrap_or(false)
    })
}

/// The cgroup whose processes are the node's host-network processes: the agent attaches
/// the socket-level LB there (`--socket-lb-cgroup`). `cluster exec --node` runs commands in it.
pub fn node_cgroup(node_dir: &Path, node: &str) -> Option<PathBuf> {
    let cluster = node_dir.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    cgroup2_root().map(|r| r.join(format!("fjord-dev-{cluster}-{node}")))
}

/// The parent cgroup of a node's pods (like kubelet's kubepods.slice): `pod exec` runs
/// commands in it; with `cluster up --socket-lb-pods` the agent attaches the socket LB to it.
pub fn pods_cgroup(node_dir: &Path, node: &str) -> Option<PathBuf> {
    node_cgroup(node_dir, node).map(|c| PathBuf::from(format!("{}-pods", c.display())))
}

/// Removes a dev-cluster node cgroup: processes still in it (started by `cluster exec
/// --node`) are killed first.
fn remove_node_cgroup(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        if std::fs::remove_dir(cg).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!("could not remove cgroup {} (processes still in it?)", cg.display())
}

/// Remove every namespace, process and file of cluster `name`. Works from the
/// state file and, if that is gone, from the namespace prefix.
pub async fn down(home: &Home, name: &str, progress: &dyn Fn(&str)) -> Result<()> {
    validate_name(name)?;
    let state = home.load_cluster(name).ok();
    let prefix = ClusterState::netns_prefix(name);
    let existing_ns = netns::list(&prefix);
    if state.is_none() && existing_ns.is_empty() {
        bail!("cluster {name:?} does not exist (no state in {} and no namespaces {prefix}*)", home.cluster_dir(name).display());
    }
    if let Some(s) = &state {
        for n in &s.nodes {
            if stop_agent(n, nix::sys::signal::Signal::SIGTERM)? {
                progress(&format!("stopped agent of {} (pid {})", n.name, n.agent_pid.unwrap_or(0)));
            }
        }
        if let Some(e) = &s.etcd {
            if stop_etcd(e, nix::sys::signal::Signal::SIGTERM)? {
                progress(&format!("stopped etcd (pid {})", e.pid.unwrap_or(0)));
            }
        }
    }
    // Pods first (their veths go with them), then nodes, ext, underlay.
    let mut all = netns::list(&prefix);
    all.sort_by_key(|n| (!n.starts_with(&format!("{prefix}pod.")), n.ends_with(".underlay")));
    for ns in all {
        netns::delete(&ns)?;
        progress(&format!("deleted namespace {ns}"));
    }
    if let Some(s) = &state {
        for n in &s.nodes {
            for cg in [node_cgroup(&n.dir, &n.name), pods_cgroup(&n.dir, &n.name)].into_iter().flatten() {
                if cg.exists() {
                    remove_node_cgroup(&cg)?;
                    progress(&format!("removed cgroup {}", cg.display()));
                }
            }
        }
    }
    let pins = Path::new(BPF_ROOT).join(format!("dev-{name}"));
    if pins.exists() {
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing eBPF pins {}", pins.display()))?;
        progress(&format!("removed eBPF pins {}", pins.display()));
    }
    let _ = std::fs::remove_dir(BPF_ROOT); // only if no other cluster or node uses it
    let dir = home.cluster_dir(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        progress(&format!("removed {}", dir.display()));
    }
    let mut cfg = home.config()?;
    if cfg.current_cluster.as_deref() == Some(name) {
        cfg.current_cluster = None;
        home.save_config(&cfg)?;
    }
    Ok(())
}

/// Names of clusters with state under `home`.
pub fn list(home: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.dir.join("clusters"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("cluster.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Like [`exec_in`], as a host-network process of a node: inside the node's namespace and
/// its socket-LB cgroup (so ClusterIPs work through the socket-level LB).
pub fn exec_on_node(node: &NodeState, argv: &[String]) -> Result<i32> {
    join_cgroup(node_cgroup(&node.dir, &node.name))?;
    exec_in(&netns::path(&node.netns), argv)
}

/// Like [`exec_in`], as a process of a pod: inside its network namespace and its node's pods
/// cgroup (where the socket-level LB serves ClusterIPs with `cluster up --socket-lb-pods`).
pub fn exec_in_pod(node: &NodeState, ns: &Path, argv: &[String]) -> Result<i32> {
    join_cgroup(pods_cgroup(&node.dir, &node.name))?;
    exec_in(ns, argv)
}

/// Moves this process into `cg`, if there is such a cgroup.
fn join_cgroup(cg: Option<PathBuf>) -> Result<()> {
    if let Some(cg) = cg.filter(|c| c.exists()) {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    Ok(())
}

/// Replace this process with a command running inside a namespace (like `ip netns exec`),
/// so signals and the exit code are the command's own. Returns only on failure.
pub fn exec_in(ns: &Path, argv: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let (prog, args) = argv.split_first().context("no command given (use: -- CMD ARGS...)")?;
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args);
    netns::command_in(&mut cmd, ns)?;
    let err = cmd.exec();
    Err(anyhow::Error::from(err).context(format!("running {prog} in {}", ns.display())))
}
