//! fjord-agent: the node daemon.
use anyhow::{bail, Context, Result};
use clap::Parser;
use fjord_agent::cluster::{self, Routing};
use fjord_agent::{agent, ipam, server};
use fjord_net::{netns, Netlink};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// fjord's node agent. It owns the networking of the network namespace it runs
/// in (the node): pod IP addresses from the node's PodCIDR (kubernetes-mode
/// IPAM), a veth pair and routes per pod, cleanup of pods whose namespace
/// vanished without CNI DEL. The CNI plugin (fjord-cni) and fjordctl talk to it
/// over HTTP+JSON on a unix socket (--api-socket).
///
/// Safety: the agent refuses to run in the machine's initial network namespace
/// unless --allow-host-network is given (a real node); the dev cluster runs one
/// agent per node namespace.
#[derive(Parser, Debug)]
#[command(name = "fjord-agent", version)]
struct Args {
    /// Name of this node.
    #[arg(long, env = "FJORD_NODE")]
    node: String,
    /// Where cluster state lives: `embedded:PATH` (a local database file; the single-node
    /// default) or `etcd:http://HOST:PORT[,…]` (cluster mode; every agent shares it).
    #[arg(long, env = "FJORD_STORE", default_value = "embedded:/var/lib/fjord/store.redb")]
    store: String,
    /// This node's PodCIDR, e.g. 10.244.1.0/24. Pods get addresses from it; its first
    /// address is the pods' gateway. Without it the agent claims a free range of
    /// --cluster-cidr in the store (and keeps it across restarts).
    #[arg(long, env = "FJORD_POD_CIDR")]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// The cluster's pod network; node PodCIDRs are allocated from it.
    #[arg(long, env = "FJORD_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// Prefix length of each node's PodCIDR.
    #[arg(long, env = "FJORD_NODE_CIDR_SIZE", default_value_t = 24)]
    node_cidr_size: u8,
    /// How pods reach other nodes' pods: native (a route per remote PodCIDR via the node's
    /// address) or vxlan (an overlay for underlays that do not route pod addresses).
    #[arg(long, env = "FJORD_ROUTING", value_enum, default_value = "native")]
    routing: Routing,
    /// This node's underlay address (default: the first IPv4 address of a non-loopback interface).
    #[arg(long, env = "FJORD_NODE_ADDRESS")]
    node_address: Option<std::net::Ipv4Addr>,
    /// TTL of the node's registration lease: a node whose agent stops renewing it leaves
    /// every other node's routing after this long.
    #[arg(long, env = "FJORD_NODE_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    node_lease_ttl: Duration,
    /// The eBPF kube-proxy replacement: on (load and attach the datapath; fail if it cannot)
    /// or off (pods only, no Services).
    #[arg(long, env = "FJORD_DATAPATH", default_value = "on", value_parser = ["on", "off"])]
    datapath: String,
    /// bpffs directory for this node's pinned maps and links (default /sys/fs/bpf/fjord/<node>).
    /// An agent restart re-uses what is pinned there, so flows survive it.
    #[arg(long, env = "FJORD_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,
    /// Capacity of the service map (service frontends: VIP × port).
    #[arg(long, env = "FJORD_MAX_SERVICES", default_value_t = 1024)]
    max_services: u32,
    /// Maglev table size per frontend (prime; the same on every node).
    #[arg(long, env = "FJORD_MAGLEV_TABLE_SIZE", default_value_t = 16381)]
    maglev_table_size: u32,
    /// Spare Maglev tables kept ready: a backend change is written into one and switched in
    /// with one service-map update, without waiting for an RCU grace period (M x 8 bytes of
    /// kernel memory each).
    #[arg(long, env = "FJORD_MAGLEV_TABLE_POOL", default_value_t = 32)]
    maglev_table_pool: u32,
    /// Conntrack entries (LRU: a full table evicts the oldest flows, never refuses new ones).
    /// Default: derived from memory, one entry per 32 KiB of RAM (power of two, 64Ki..4Mi;
    /// 24 GiB -> 524288), the same scale `fjordctl tune` uses for nf_conntrack_max.
    #[arg(long, env = "FJORD_CT_ENTRIES")]
    ct_entries: Option<u32>,
    /// How the tc programs are attached to interfaces: tc (clsact qdisc + cls_bpf filter;
    /// ~1 ms per interface) or tcx (TCX links, Linux >= 6.6; each waits for an RCU grace
    /// period, 7-43 ms measured).
    #[arg(long, env = "FJORD_ATTACH_MODE", default_value = "tc", value_parser = ["tc", "tcx"])]
    attach_mode: String,
    /// How packets between pods of this node are delivered: ebpf (the sender's veth program
    /// hands them straight into the receiver's namespace with bpf_redirect_peer, skipping the
    /// node's IP stack; Cilium's "Host Routing: BPF") or legacy (the node's kernel routes
    /// them). Traffic to other nodes and the outside is routed by the kernel either way.
    #[arg(long, env = "FJORD_HOST_ROUTING", default_value = "ebpf", value_parser = ["ebpf", "legacy"])]
    host_routing: String,
    /// Masquerade in eBPF: pod traffic to destinations outside --cluster-cidr leaves through
    /// the underlay with the node's address (like Cilium's bpf.masquerade=true).
    #[arg(long, env = "FJORD_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    masquerade: bool,
    /// Source ports for SNAT (NodePort to a backend on another node, masquerade), MIN-MAX.
    /// The default lies above the kernel's ephemeral range (32768-60999), so SNAT never
    /// collides with the node's own connections.
    #[arg(long, env = "FJORD_SNAT_PORT_RANGE", default_value = "61000-65535", value_parser = parse_port_range)]
    snat_port_range: (u16, u16),
    /// Conntrack timeout of TCP flows after the SYN, until the backend answers.
    #[arg(long, env = "FJORD_CT_TIMEOUT_TCP_SYN", default_value = "60s", value_parser = parse_duration)]
    ct_timeout_tcp_syn: Duration,
    /// Conntrack timeout of established TCP flows without packets.
    #[arg(long, env = "FJORD_CT_TIMEOUT_TCP_ESTABLISHED", default_value = "6h", value_parser = parse_duration)]
    ct_timeout_tcp_established: Duration,
    /// Conntrack timeout of TCP flows after a FIN or RST.
    #[arg(long, env = "FJORD_CT_TIMEOUT_TCP_CLOSING", default_value = "10s", value_parser = parse_duration)]
    ct_timeout_tcp_closing: Duration,
    /// Conntrack timeout of UDP flows without packets.
    #[arg(long, env = "FJORD_CT_TIMEOUT_UDP", default_value = "60s", value_parser = parse_duration)]
    ct_timeout_udp: Duration,
    /// A cgroup v2 directory whose processes get the socket-level LB: connect()/sendmsg() to a
    /// service go straight to a backend, so no packet of the flow needs translating. Give the
    /// node's host-network processes' cgroup (they have no veth for the tc programs), and the
    /// pods' parent cgroup (e.g. /sys/fs/cgroup/kubepods.slice) for pods too, as Cilium does
    /// by default. Repeat the flag (or separate by commas in the env) for several. Created if
    /// missing; the cgroup2 root itself is refused.
    #[arg(long, env = "FJORD_SOCKET_LB_CGROUP", value_delimiter = ',')]
    socket_lb_cgroup: Vec<PathBuf>,
    /// How often conntrack GC removes entries idle past their timeout.
    #[arg(long, env = "FJORD_CT_GC_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    ct_gc_interval: Duration,
    /// How often this node writes its heartbeat; other nodes measure the store's watch lag
    /// from it (fjord_store_watch_lag_seconds). `0s` disables it.
    #[arg(long, env = "FJORD_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// The Service CIDR: ClusterIPs are allocated from it.
    #[arg(long, env = "FJORD_SERVICE_CIDR", default_value = "10.96.0.0/16")]
    service_cidr: ipnet::Ipv4Net,
    /// How often to probe every other node (ICMP echo + TCP connect to port 4240).
    #[arg(long, env = "FJORD_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    health_interval: Duration,
    /// etcd: CA certificate (PEM) to verify the servers.
    #[arg(long, env = "FJORD_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// etcd: client certificate (PEM), with --etcd-key.
    #[arg(long, env = "FJORD_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// etcd: client key (PEM).
    #[arg(long, env = "FJORD_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// etcd: user name, with --etcd-password.
    #[arg(long, env = "FJORD_ETCD_USER")]
    etcd_user: Option<String>,
    /// etcd: password.
    #[arg(long, env = "FJORD_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Unix socket of the agent's API (used by fjord-cni and fjordctl).
    #[arg(long, env = "FJORD_API_SOCKET", default_value = fjord_model::cni::DEFAULT_AGENT_SOCKET)]
    api_socket: PathBuf,
    /// TCP address for Prometheus metrics (`/metrics`), in the agent's namespace; `none` to disable.
    /// Metrics are also served on the API socket.
    #[arg(long, env = "FJORD_METRICS_ADDR", default_value = "127.0.0.1:9962")]
    metrics_addr: String,
    /// Safety-net interval for the zombie sweep (pods whose namespace vanished without
    /// CNI DEL are normally noticed at once from kernel link events). E.g. 5s, 500ms.
    #[arg(long, env = "FJORD_ZOMBIE_SWEEP", default_value = "5s", value_parser = parse_duration)]
    zombie_sweep_interval: Duration,
    /// Allow running in the machine's initial network namespace (a real node, where the
    /// agent manages the host's networking: ip_forward, pod routes). Never used by tests.
    #[arg(long, env = "FJORD_ALLOW_HOST_NETWORK")]
    allow_host_network: bool,
    /// Run the Gateway API proxy in this agent, fed from the store (GatewayClass with
    /// controllerName fjord.dev/gateway, Gateway, HTTPRoute, ReferenceGrant, TLS Secrets,
    /// Services/EndpointSlices); it writes Gateway and HTTPRoute status back to the store.
    #[arg(long, env = "FJORD_GATEWAY")]
    gateway: bool,
    /// Address the Gateway listeners bind (default: this node's underlay address, which is
    /// also what Gateways report in status.addresses).
    #[arg(long, env = "FJORD_GATEWAY_LISTEN_ADDRESS")]
    gateway_listen_address: Option<std::net::IpAddr>,
    /// Serve the gateway's Prometheus metrics (per route and backend) at http://ADDR/metrics.
    #[arg(long, env = "FJORD_GATEWAY_METRICS_ADDR")]
    gateway_metrics_addr: Option<std::net::SocketAddr>,
    /// Gateway status writer election: every --gateway agent serves traffic, the holder of the
    /// store lease /fjord/v1/leases/gateway-status writes status. A holder that stops without
    /// resigning is replaced after this long.
    #[arg(long, env = "FJORD_GATEWAY_STATUS_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    gateway_status_lease_ttl: Duration,
    /// Log format: text or json. Log level from RUST_LOG (default info).
    #[arg(long, env = "FJORD_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not a range like 61000-65535"))?;
    let lo: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port number"))?;
    let hi: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port number"))?;
    if lo < 1024 || hi < lo {
        return Err(format!("{s:?}: need 1024 <= MIN <= MAX"));
    }
    Ok((lo, hi))
}

/// Whether a live agent answers on `socket` (GET /healthz within 2 s). A socket that
/// accepts connections but never answers (its process is being torn down) is stale.
async fn agent_answers(socket: &std::path::Path) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: fjord\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        buf[..n].starts_with(b"HTTP/1.1 200").then_some(())
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Some(())) => true,
        Ok(None) => false,
        Err(_) => {
            warn!(socket = %socket.display(), "the API socket accepts connections but nobody answers; treating it as stale");
            false
        }
    }
}

fn secs(d: Duration) -> u32 {
    d.as_secs().clamp(1, u32::MAX as u64) as u32
}

fn main() {
    // At most two malloc arenas: the Maglev tables of a large sync are built and freed on
    // several threads, and glibc's default (8 per core) left ~10-20 MiB of freed memory in
    // extra arenas after 10,000 services (measured: RSS 100-112 -> 87-95 MiB, same speed;
    // one arena made the sync 15 % slower).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async_main());
}

async fn async_main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if let Err(e) = run(args).await {
        tracing::error!("{e:#}");
        eprintln!("fjord-agent: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    fjord_model::api::validate_dns_label("--node", &args.node).map_err(anyhow::Error::msg)?;
    if netns::in_init_netns() && !args.allow_host_network {
        bail!(
            "refusing to manage the machine's initial network namespace: run fjord-agent inside a node's network \
             namespace (as `fjordctl cluster up` does), or pass --allow-host-network on a real node"
        );
    }
    if args.api_socket.exists() {
        if agent_answers(&args.api_socket).await {
            bail!("another agent is already serving on {} (stop it first)", args.api_socket.display());
        }
        std::fs::remove_file(&args.api_socket).with_context(|| format!("removing stale socket {}", args.api_socket.display()))?;
    }
    let etcd_opts = fjord_store::etcd::EtcdOptions {
        endpoints: vec![],
        ca_file: args.etcd_ca.clone(),
        cert_file: args.etcd_cert.clone(),
        key_file: args.etcd_key.clone(),
        username: args.etcd_user.clone(),
        password: args.etcd_password.clone(),
        timeout: None,
    };
    // The store may not be up yet (etcd starting, network): retry with backoff, not crash.
    let mut backoff = Duration::from_millis(200);
    let store = loop {
        match fjord_store::open_with(&args.store, &etcd_opts).await {
            Ok(s) => break s,
            Err(e @ (fjord_store::StoreError::BadUrl { .. } | fjord_store::StoreError::Locked { .. } | fjord_store::StoreError::Io { .. })) => {
                return Err(e).with_context(|| format!("opening store --store {}", args.store));
            }
            Err(e) if e.to_string().to_lowercase().contains("auth") => {
                return Err(e).with_context(|| format!("opening store --store {} (check --etcd-user/--etcd-password)", args.store));
            }
            Err(e) => {
                warn!(store = %args.store, error = %e, retry_in_ms = backoff.as_millis() as u64, "store not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let pod_cidr = match args.pod_cidr {
        Some(c) => c,
        None => cluster::allocate_pod_cidr(store.as_ref(), &args.node, args.cluster_cidr, args.node_cidr_size).await?,
    };
    let pool = ipam::Pool::new(pod_cidr).context("PodCIDR")?;
    // The node forwards between its pods and the underlay.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward in the node's namespace")?;
    let nl = Netlink::new().context("opening a netlink socket")?;
    let mut addresses = Vec::new();
    let mut underlay_dev = String::new();
    for l in nl.links().await? {
        if l.name == "lo" || l.name.starts_with("fj") || l.name == cluster::VXLAN_DEV {
            continue;
        }
        for (ip, _) in nl.addrs(&l.name).await? {
            if args.node_address.is_none_or(|a| a == ip) {
                if underlay_dev.is_empty() {
                    underlay_dev = l.name.clone();
                    addresses.insert(0, ip);
                } else {
                    addresses.push(ip);
                }
            }
        }
    }
    if let Some(a) = args.node_address {
        if addresses.first() != Some(&a) {
            bail!("--node-address {a} is not an address of any interface in the agent's namespace");
        }
    }
    let agent = agent::Agent::new(args.node.clone(), store.clone(), pool, nl.clone(), &format!("{:?}", args.routing).to_lowercase());
    *agent.addresses.lock().unwrap() = addresses.clone();
    agent.check_pod_cidr().await?;
    let mut record = fjord_model::api::NodeRecord {
        name: args.node.clone(),
        pod_cidr,
        addresses: addresses.clone(),
        routing: format!("{:?}", args.routing).to_lowercase(),
        vtep_mac: None,
        capabilities: vec!["cni".into()],
    };
    record.vtep_mac = cluster::RouteSync::prepare(&nl, args.routing, &record, &underlay_dev).await.context("setting up the overlay")?;
    let lease = Arc::new(std::sync::atomic::AtomicI64::new(0));
    tokio::spawn(cluster::keep_registered(store.clone(), record.clone(), args.node_lease_ttl, lease.clone()));
    if !args.heartbeat_interval.is_zero() {
        tokio::spawn(fjord_agent::lag::beat(store.clone(), args.node.clone(), lease.clone(), args.heartbeat_interval));
    }
    if args.datapath == "on" {
        let mut cfg = fjord_datapath::DatapathConfig::for_node(&args.node);
        if let Some(d) = &args.bpf_pin_dir {
            cfg.pin_dir = d.clone();
        }
        cfg.max_services = args.max_services;
        cfg.maglev_size = args.maglev_table_size;
        cfg.ct_entries = match args.ct_entries {
            Some(n) => n,
            None => {
                let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo to size conntrack")?;
                let mem = fjord_nodetools::host::parse_meminfo(&meminfo).map_err(|e| anyhow::anyhow!("/proc/meminfo: {e}"))?;
                let n = fjord_nodetools::mapsize::ct_entries_for_memory(mem.total_bytes);
                info!(ct_entries = n, mem_gib = mem.total_bytes >> 30, "conntrack sized from memory (--ct-entries overrides)");
                n
            }
        };
        cfg.table_pool = args.maglev_table_pool;
        cfg.attach = args.attach_mode.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        cfg.host_routing = args.host_routing == "ebpf";
        cfg.snat_ports = args.snat_port_range;
        cfg.timeouts = fjord_datapath::CtTimeouts {
            tcp_syn: secs(args.ct_timeout_tcp_syn),
            tcp_established: secs(args.ct_timeout_tcp_established),
            tcp_closing: secs(args.ct_timeout_tcp_closing),
            udp: secs(args.ct_timeout_udp),
        };
        let pin_dir = cfg.pin_dir.clone();
        let names: Vec<String> = agent.attachments().await.map_err(|e| anyhow::anyhow!("{e}"))?.into_iter().map(|a| a.host_veth).collect();
        let node_net = addresses.first().map(|ip| fjord_datapath::NodeNet {
            node_ip: *ip,
            pod_cidr: (pod_cidr.network(), pod_cidr.prefix_len()),
            cluster_cidr: (args.cluster_cidr.network(), args.cluster_cidr.prefix_len()),
            masquerade: args.masquerade,
        });
        // (device, masquerade on its egress): the underlay, and the overlay in VXLAN mode
        let mut net_devs: Vec<(String, bool)> = vec![];
        if !underlay_dev.is_empty() {
            net_devs.push((underlay_dev.clone(), args.masquerade));
        }
        if args.routing == Routing::Vxlan {
            net_devs.push((cluster::VXLAN_DEV.to_string(), false));
        }
        let socket_lb_cgroup = args.socket_lb_cgroup.clone();
        let dp = tokio::task::spawn_blocking(move || -> anyhow::Result<fjord_datapath::Datapath> {
            let mut dp = fjord_datapath::Datapath::load(cfg)?;
            if let Some(net) = &node_net {
                dp.set_node_net(net)?;
            }
            dp.maintain().context("filling the Maglev spare-table pool")?;
            // NodePort/externalIP frontends and SNAT replies arrive on the underlay (and the
            // overlay); masquerade happens on the underlay's egress
            for (dev, masquerade) in &net_devs {
                dp.attach_net(dev, *masquerade).with_context(|| format!("attaching to the node device {dev}"))?;
            }
            for n in &names {
                dp.attach(n).with_context(|| format!("re-attaching to {n}"))?;
            }
            for cg in &socket_lb_cgroup {
                prepare_socket_lb_cgroup(cg)?;
                dp.attach_cgroup(cg).with_context(|| format!("attaching the socket LB to {}", cg.display()))?;
            }
            let pruned = dp.prune_stale_links()?;
            if !pruned.is_empty() {
                info!(?pruned, "removed pinned links of interfaces that are gone");
            }
            Ok(dp)
        })
        .await?
        .with_context(|| format!("loading the eBPF datapath (pins in {}); --datapath off runs without Services", pin_dir.display()))?;
        info!(pin_dir = %pin_dir.display(), "eBPF datapath loaded: KubeProxyReplacement OK");
        let dp = Arc::new(std::sync::Mutex::new(dp));
        let gone = dp.lock().unwrap().gone_ips();
        // an address in use by a pod is never "gone" (e.g. marked by an older agent whose
        // record of the reuse was lost)
        for att in agent.attachments().await.unwrap_or_default() {
            if gone.contains(att.ip) {
                warn!(ip = %att.ip, "a pod's address was marked deleted in the datapath; clearing it");
                gone.clear(att.ip)?;
            }
        }
        let _ = agent.gone_ips.set(gone);
        let _ = agent.datapath.set(dp.clone());
        tokio::spawn(conntrack_gc(agent.clone(), dp, args.ct_gc_interval));
    } else {
        *agent.datapath_error.lock().unwrap() = Some("--datapath off".into());
    }
    if !args.heartbeat_interval.is_zero() {
        tokio::spawn(fjord_agent::lag::watch(agent.clone()));
    }
    tokio::spawn(fjord_agent::services::run(agent.clone(), agent.datapath.get().cloned(), lease.clone()));
    let sync = cluster::RouteSync { me: record, routing: args.routing, underlay_dev: underlay_dev.clone(), nl: nl.clone(), view: agent.nodes.clone(), sync_seconds: agent.metrics.route_sync_seconds.clone() };
    tokio::spawn(sync.run(store.clone()));
    if let Some(addr) = addresses.first().copied() {
        tokio::spawn(async move {
            if let Err(e) = fjord_agent::health::serve(addr).await {
                warn!(error = %e, %addr, "health endpoint not available");
            }
        });
        tokio::spawn(fjord_agent::health::run_prober(args.node.clone(), agent.nodes.clone(), agent.health.clone(), args.health_interval));
    }
    let mut gateway_elector = None;
    if args.gateway {
        let address = addresses.first().map(|a| std::net::IpAddr::V4(*a)).or(args.gateway_listen_address).context("--gateway needs a node address")?;
        let listen = args.gateway_listen_address.unwrap_or(address);
        let (gw, elector) = fjord_agent::gatewayapi::start(store.clone(), listen, address, &args.node, args.gateway_status_lease_ttl);
        gateway_elector = Some(elector);
        if let Some(addr) = args.gateway_metrics_addr {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --gateway-metrics-addr {addr}"))?;
            tokio::spawn(fjord_gateway::metrics::serve_metrics(l, gw.metrics()));
        }
        info!(%listen, %address, "gateway: serving Gateway API routes from the store");
    }
    // Reconcile what happened while the agent was down.
    // A failed sweep is not fatal: the reaper below runs it again every --zombie-sweep-interval.
    let cleaned = agent.sweep_zombies("agent start").await.unwrap_or_else(|e| {
        warn!(error = %e, "initial zombie sweep failed; the periodic sweep will retry");
        Vec::new()
    });
    let atts = agent.attachments().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let ipam = agent.ipam_status().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    info!(node = %args.node, pod_cidr = %pod_cidr, routing = ?args.routing, gateway = %pool_gateway(&agent), addresses = ?addresses,
          attachments = atts.len(), allocated = ipam.allocated, zombies_cleaned = cleaned.len(), store = %args.store, "agent starting");
    tokio::spawn(agent::run_zombie_reaper(agent.clone(), args.zombie_sweep_interval));

    let netns_label = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
    let app = server::router(server::Ctx {
        agent: agent.clone(),
        netns_label,
        validation: fjord_model::objects::ValidationContext { service_cidr: args.service_cidr },
        max_services: (args.datapath == "on").then_some(args.max_services as usize),
    });
    if let Some(dir) = args.api_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&args.api_socket).with_context(|| format!("binding API socket {}", args.api_socket.display()))?;
    if args.metrics_addr != "none" {
        let tcp = tokio::net::TcpListener::bind(&args.metrics_addr).await.with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
        let a = agent.clone();
        let metrics_app = axum::Router::new().route("/metrics", axum::routing::get(move || async move { a.render_metrics() }));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, metrics_app).await {
                warn!(error = %e, "metrics server stopped");
            }
        });
    }
    info!(socket = %args.api_socket.display(), metrics = %args.metrics_addr, "API listening");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        info!("shutting down (pods keep their networking)");
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("API server")?;
    let _ = std::fs::remove_file(&args.api_socket);
    if let Some(e) = gateway_elector {
        // hand the status writer role over now rather than after the lease TTL
        e.resign().await;
    }
    Ok(())
}

fn pool_gateway(a: &agent::Agent) -> std::net::Ipv4Addr {
    a.pool.gateway()
}

/// Periodic conntrack GC (entries idle past their timeout).
async fn conntrack_gc(agent: Arc<agent::Agent>, dp: Arc<std::sync::Mutex<fjord_datapath::Datapath>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let dp = dp.clone();
        let t0 = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || dp.lock().unwrap().gc_conntrack()).await {
            Ok(Ok(st)) => {
                agent.metrics.ct_gc_removed.inc_by(st.removed);
                agent.metrics.ct_gc_seconds.observe(t0.elapsed().as_secs_f64());
                if st.removed > 0 {
                    tracing::debug!(scanned = st.scanned, removed = st.removed, "conntrack GC");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "conntrack GC failed"),
            Err(e) => warn!(error = %e, "conntrack GC task failed"),
        }
    }
}

/// Checks (and creates) the socket-LB cgroup: a cgroup v2 directory below the root, never the
/// root itself (that would put every process of the machine behind fjord's socket LB).
fn prepare_socket_lb_cgroup(cg: &std::path::Path) -> anyhow::Result<()> {
    let is_cg2 = |p: &std::path::Path| {
        nix::sys::statfs::statfs(p).map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).unwrap_or(false)
    };
    let parent = cg.parent().with_context(|| format!("--socket-lb-cgroup {}: not a cgroup directory", cg.display()))?;
    if !is_cg2(parent) {
        bail!("--socket-lb-cgroup {}: {} is not on a cgroup v2 filesystem", cg.display(), parent.display());
    }
    if !cg.exists() {
        std::fs::create_dir(cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
    }
    // the root of a cgroup2 mount has no cgroup.type file
    if !cg.join("cgroup.type").exists() {
        bail!("--socket-lb-cgroup {}: refusing the cgroup v2 root (every process of the machine); give a child cgroup", cg.display());
    }
    Ok(())
}
