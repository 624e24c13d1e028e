//! fjordctl: fjord's command line.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fjord_api::AgentClient;
use fjordctl::context::Home;
use fjordctl::{cluster, pod};
use std::path::PathBuf;

/// fjordctl: run and inspect fjord, a Kubernetes networking stack with an eBPF datapath.
///
/// fjordctl remembers the current dev cluster in $FJORD_HOME/config.json (default
/// ~/.fjord), like a kubeconfig, so commands after `cluster up` need no flags.
#[derive(Parser, Debug)]
#[command(name = "fjordctl", version, propagate_version = true)]
struct Cli {
    /// Directory for fjordctl's state (current cluster, cluster files).
    #[arg(long, global = true, env = "FJORD_HOME")]
    fjord_home: Option<PathBuf>,
    /// Cluster to act on (default: the current one).
    #[arg(long, global = true, env = "FJORD_CLUSTER")]
    cluster: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Local dev cluster (kind-like) made of network namespaces.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Pods in the dev cluster (fjordctl acts as the container runtime).
    #[command(subcommand)]
    Pod(PodCmd),
    /// Health of every node's agent, store and IPAM (`--verbose` for details).
    Status(StatusArgs),
    /// Show objects: nodes, services, endpoints, gatewayclasses, gateways, httproutes.
    #[command(subcommand)]
    Get(GetCmd),
    /// Create or update Services, EndpointSlices and Gateway API objects (GatewayClass, Gateway,
    /// HTTPRoute, ReferenceGrant, kubernetes.io/tls Secret) from multi-document YAML (or JSON).
    /// All or nothing: one invalid object applies nothing and names the object, field and reason.
    Apply {
        /// File to read, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects named in a manifest.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Check that this machine can run fjord: kernel, eBPF features (probed by loading),
    /// BTF, bpffs, cgroup v2, JIT, virtualization, sysctls, memory for maps, etcd fsync.
    Preflight(fjord_nodetools::PreflightArgs),
    /// Benchmarks of the node.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Kernel network tuning scaled to this machine's memory (dry run unless --apply).
    Tune(fjord_nodetools::TuneArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// etcd's write pattern (fio --rw=write --ioengine=sync --fdatasync=1 --size=22m --bs=2300):
    /// fdatasync latency percentiles and a verdict against etcd's guidance.
    Fsync(fjord_nodetools::BenchFsyncArgs),
}

#[derive(Subcommand, Debug)]
enum GetCmd {
    /// Nodes with addresses, PodCIDR, routing and health.
    Nodes {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Services (`svc`), optionally one by name.
    #[command(alias = "svc", alias = "service")]
    Services {
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// GatewayClasses (cluster-scoped), optionally one by name.
    #[command(alias = "gatewayclass", alias = "gc")]
    Gatewayclasses {
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Gateways with address and Programmed condition (`-o wide`: listeners; `-o yaml`: status).
    #[command(alias = "gateway", alias = "gtw")]
    Gateways {
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// HTTPRoutes with hostnames, parents and conditions (`-o wide`: reasons; `-o yaml`: status).
    #[command(alias = "httproute")]
    Httproutes {
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Endpoints of services (from their EndpointSlices).
    #[command(alias = "ep", alias = "endpointslices")]
    Endpoints {
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Create a dev cluster: an underlay bridge namespace, a namespace + agent per node
    /// (with fjord-cni and its conflist installed), an external client namespace.
    Up {
        /// Cluster name (lower-case letters, digits, '-').
        #[arg(long, default_value = "fjord")]
        name: String,
        /// Number of nodes. More than one needs the etcd store (cluster mode).
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// Cluster state store: embedded (single node) or etcd (a real etcd in its own
        /// namespace; needed for more than one node).
        #[arg(long, default_value = "embedded")]
        store: String,
        /// Pod routing between nodes (etcd store): native or vxlan.
        #[arg(long, default_value = "native")]
        routing: String,
        /// Extra flag for every node's fjord-agent (repeatable), e.g. --agent-arg=--datapath=off.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Socket-level LB for pods too (the default, as Cilium's bpf-lb-sock-hostns-only=false):
        /// a pod's connect() to a ClusterIP goes straight to a backend, so no packet of the flow
        /// is translated. With --socket-lb-pods=false pods use the tc programs at their veth
        /// (per-packet NAT with eBPF conntrack); the node's host-network processes always use
        /// the socket LB.
        #[arg(long, value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true",
            action = clap::ArgAction::Set)]
        socket_lb_pods: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a dev cluster: its agents, namespaces, links and files.
    Down {
        /// Cluster name (default: the current cluster).
        #[arg(long)]
        name: Option<String>,
    },
    /// List dev clusters (* marks the current one).
    List,
    /// Run a command in the cluster's external client namespace (on the underlay, outside every
    /// node), or with --node as a host-network process of that node (its namespace and cgroup,
    /// where the socket-level LB serves ClusterIPs).
    Exec {
        /// Run on this node (host network) instead of the external namespace.
        #[arg(long)]
        node: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum PodCmd {
    /// Create a pod: a network namespace plus CNI ADD through the node's plugin, as containerd does.
    Add {
        /// NAMESPACE/NAME (or NAME in namespace default).
        pod: String,
        /// Node to place the pod on (default: the first node).
        #[arg(long)]
        node: Option<String>,
        /// Labels, k=v,k2=v2.
        #[arg(long, default_value = "")]
        labels: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Delete a pod: CNI DEL, then its network namespace.
    Del {
        pod: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List pods on every node.
    List {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run a command inside a pod's network namespace: `fjordctl pod exec NS/NAME -- CMD ARGS...`.
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Show details: IPAM, store round trip, attachments, metrics.
    #[arg(short, long)]
    verbose: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Text,
    Wide,
    Json,
    Yaml,
}

fn emit<T: serde::Serialize>(o: Output, v: &T) -> Result<bool> {
    match o {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Yaml => print!("{}", serde_norway::to_string(v)?),
        _ => return Ok(false),
    }
    Ok(true)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) -> Result<i32> {
    let home = Home::new(cli.fjord_home.clone());
    match cli.cmd {
        Cmd::Cluster(c) => cluster_cmd(&home, cli.cluster.as_deref(), c).await,
        Cmd::Pod(p) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            pod_cmd(&cl, p).await
        }
        Cmd::Status(a) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            status(&cl, &a).await
        }
        Cmd::Get(GetCmd::Nodes { output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_nodes(&cl, output).await
        }
        Cmd::Get(GetCmd::Services { name, namespace, output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_services(&cl, name.as_deref(), &namespace, output).await
        }
        Cmd::Get(GetCmd::Endpoints { name, namespace, output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_endpoints(&cl, name.as_deref(), &namespace, output).await
        }
        Cmd::Get(GetCmd::Gatewayclasses { name, output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_gatewayapi(&cl, "gatewayclasses", name.as_deref(), None, output).await
        }
        Cmd::Get(GetCmd::Gateways { name, namespace, output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_gatewayapi(&cl, "gateways", name.as_deref(), Some(&namespace), output).await
        }
        Cmd::Get(GetCmd::Httproutes { name, namespace, output }) => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            get_gatewayapi(&cl, "httproutes", name.as_deref(), Some(&namespace), output).await
        }
        Cmd::Apply { file } => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            let text = read_manifest(&file)?;
            let r = any_agent(&cl).await?.apply(&text).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for o in r.objects {
                println!("{} configured", o.to_lowercase());
            }
            Ok(0)
        }
        Cmd::Delete { file } => {
            let cl = home.resolve(cli.cluster.as_deref())?;
            let text = read_manifest(&file)?;
            let r = any_agent(&cl).await?.delete_objects(&text).await.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for o in &r.objects {
                println!("{} deleted", o.to_lowercase());
            }
            for o in &r.missing {
                eprintln!("{} not found", o.to_lowercase());
            }
            Ok(if r.missing.is_empty() { 0 } else { 1 })
        }
        Cmd::Preflight(a) => fjord_nodetools::run_preflight(&a),
        Cmd::Bench(BenchCmd::Fsync(a)) => fjord_nodetools::run_bench_fsync(&a),
        Cmd::Tune(a) => fjord_nodetools::run_tune(&a),
    }
}

async fn cluster_cmd(home: &Home, explicit: Option<&str>, c: ClusterCmd) -> Result<i32> {
    match c {
        ClusterCmd::Up { name, nodes, store, routing, agent_args, socket_lb_pods, output } => {
            let quiet = output != Output::Text;
            let progress = |m: &str| {
                if !quiet {
                    println!("{m}")
                }
            };
            let opts = cluster::UpOptions { name: name.clone(), nodes, store, routing, bin_dir: cluster::bin_dir(), agent_args, socket_lb_pods };
            let st = cluster::up(home, &opts, &progress).await?;
            if !emit(output, &st)? {
                println!("cluster {name} is up; it is now the current cluster. Next: `fjordctl pod add default/web`, `fjordctl status`.");
            }
            Ok(0)
        }
        ClusterCmd::Down { name } => {
            let name = match name.or(explicit.map(str::to_string)) {
                Some(n) => n,
                None => home.config()?.current_cluster.context("no current cluster; pass --name NAME")?,
            };
            cluster::down(home, &name, &|m| println!("{m}")).await?;
            println!("cluster {name} removed");
            Ok(0)
        }
        ClusterCmd::List => {
            let cur = home.config()?.current_cluster;
            for n in cluster::list(home) {
                println!("{}{n}", if cur.as_deref() == Some(n.as_str()) { "* " } else { "  " });
            }
            Ok(0)
        }
        ClusterCmd::Exec { node: None, command } => {
            let cl = home.resolve(explicit)?;
            cluster::exec_in(&fjord_net::netns::path(&cl.ext_netns), &command)
        }
        ClusterCmd::Exec { node: Some(n), command } => {
            let cl = home.resolve(explicit)?;
            let node = cl.nodes.iter().find(|x| x.name == n).with_context(|| {
                format!("no node {n:?} in cluster {} (nodes: {})", cl.name, cl.nodes.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", "))
            })?;
            cluster::exec_on_node(node, &command)
        }
    }
}

async fn pod_cmd(cl: &fjordctl::context::ClusterState, p: PodCmd) -> Result<i32> {
    match p {
        PodCmd::Add { pod: r, node, labels, output } => {
            let labels = fjord_model::api::parse_labels(&labels).map_err(|e| anyhow::anyhow!("--labels: {e}"))?;
            let info = pod::add(cl, node.as_deref(), &r, labels).await?;
            if !emit(output, &info)? {
                println!(
                    "pod {}/{} created on {}: IP {}, netns {} (CNI ADD {:.1} ms)",
                    info.namespace,
                    info.name,
                    info.node,
                    info.ip.map_or("-".into(), |i| i.to_string()),
                    info.netns,
                    info.cni_add_ms.unwrap_or(0.0)
                );
            }
            Ok(0)
        }
        PodCmd::Del { pod: r, output } => {
            let info = pod::del(cl, &r).await?;
            if !emit(output, &info)? {
                println!("pod {}/{} deleted from {} (IP {} released)", info.namespace, info.name, info.node, info.ip.map_or("-".into(), |i| i.to_string()));
            }
            Ok(0)
        }
        PodCmd::List { output } => {
            let pods = pod::list(cl).await?;
            if !emit(output, &pods)? {
                let wide = output == Output::Wide;
                println!("{:<12} {:<20} {:<8} {:<15} {:<12}{}", "NAMESPACE", "NAME", "NODE", "IP", "STATUS", if wide { "  NETNS / LABELS" } else { "" });
                for p in pods {
                    let extra = if wide {
                        format!("  {} {}", p.netns, p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
                    } else {
                        String::new()
                    };
                    println!("{:<12} {:<20} {:<8} {:<15} {:<12}{extra}", p.namespace, p.name, p.node, p.ip.map_or("-".into(), |i| i.to_string()), p.status);
                }
            }
            Ok(0)
        }
        PodCmd::Exec { pod: r, command } => {
            let (ns, node) = pod::netns_and_node_of(cl, &r).await?;
            cluster::exec_in_pod(node, &ns, &command)
        }
    }
}

async fn status(cl: &fjordctl::context::ClusterState, a: &StatusArgs) -> Result<i32> {
    let mut nodes = Vec::new();
    let mut healthy = true;
    for n in &cl.nodes {
        let c = AgentClient::new(&n.api_socket).with_timeout(std::time::Duration::from_secs(5));
        let st = c.status().await;
        let mut v = serde_json::json!({"node": n.name, "address": n.address, "podCIDR": n.pod_cidr, "apiSocket": n.api_socket});
        match &st {
            Ok(s) => {
                v["agent"] = serde_json::json!("OK");
                v["status"] = serde_json::to_value(s)?;
                if a.verbose {
                    v["attachments"] = serde_json::to_value(c.attachments().await.map_err(|e| anyhow::anyhow!("{e}"))?)?;
                }
            }
            Err(e) => {
                healthy = false;
                v["agent"] = serde_json::json!(format!("UNREACHABLE: {e}"));
            }
        }
        v["kubeProxyReplacement"] = serde_json::json!(v["status"]["datapath"]["kubeProxyReplacement"].as_str().unwrap_or("Unknown (agent unreachable)"));
        nodes.push(v);
    }
    let mut out = serde_json::json!({"cluster": cl.name, "store": cl.store, "routing": cl.routing, "nodes": nodes});
    let preflight = a.verbose.then(|| fjord_nodetools::preflight_report(&fjord_nodetools::PreflightOptions::default()));
    if let Some(p) = &preflight {
        out["preflight"] = serde_json::to_value(p)?;
    }
    if emit(a.output, &out)? {
        return Ok(if healthy { 0 } else { 1 });
    }
    println!("Cluster:              {} (store: {})", cl.name, cl.store);
    for v in &nodes {
        println!("Node {}:", v["node"].as_str().unwrap_or("?"));
        println!("  Agent:              {}", v["agent"].as_str().unwrap_or("?"));
        println!("  Address:            {}", v["address"].as_str().unwrap_or("?"));
        if let Some(s) = v.get("status") {
            println!("  Store:              {} rev {} ({} µs round trip)", s["store"]["backend"].as_str().unwrap_or("?"), s["store"]["revision"], s["store"]["roundTripUs"]);
            println!("  IPAM:               {}/{} allocated from {} (gateway {})", s["ipam"]["allocated"], s["ipam"]["capacity"], s["ipam"]["podCidr"].as_str().unwrap_or("?"), s["ipam"]["gateway"].as_str().unwrap_or("?"));
            println!("  Pods attached:      {}", s["attachments"]);
            println!("  Zombies cleaned:    {}", s["zombiesCleaned"]);
            println!("  Uptime:             {} s", s["uptimeSecs"]);
            if let Some(ns) = s["nodes"].as_array().filter(|n| n.len() > 1) {
                let last = s["lastRouteSyncMsAgo"].as_u64().map_or("never".to_string(), |ms| format!("{ms} ms ago"));
                println!("  Routing:            {} to {} other nodes (last sync {last}{})", s["routing"].as_str().unwrap_or("?"), ns.len() - 1,
                    s["lastRouteError"].as_str().map(|e| format!(", last error: {e}")).unwrap_or_default());
            }
        }
        let dp = &v["status"]["datapath"];
        let kpr = dp["kubeProxyReplacement"].as_str().map(String::from).unwrap_or_else(|| v["kubeProxyReplacement"].as_str().unwrap_or("?").to_string());
        println!("  KubeProxyReplacement: {kpr}");
        if dp.is_object() && kpr == "OK" {
            let pods = dp["attached"].as_array().map_or(0, |a| a.iter().filter(|i| i.as_str().is_some_and(|i| i.starts_with("fj"))).count());
            let mode = match dp["attachMode"].as_str() {
                Some("tcx") => "tcx links",
                _ => "tc (clsact + cls_bpf)",
            };
            let devs: Vec<&str> = dp["nodeDevices"].as_array().map_or(vec![], |a| a.iter().filter_map(|d| d.as_str()).collect());
            println!("    Hooks:            {mode}: {pods} pod veths (ingress from_pod, egress to_pod); node devices {} \
                (ingress from_net: NodePort/externalIPs + SNAT replies; egress to_net: masquerade); no iptables rules",
                if devs.is_empty() { "none".to_string() } else { devs.join(", ") });
            match dp["hostRouting"].as_str() {
                Some("BPF") => println!("    Host Routing:     BPF (pod to pod on this node: bpf_redirect_peer from the sender's veth, no node IP stack)"),
                Some(m) if !m.is_empty() => println!("    Host Routing:     {m} (the node's kernel routes pod to pod)"),
                _ => {}
            }
            let cgs: Vec<&str> = dp["socketLbCgroups"].as_array().map_or(vec![], |a| a.iter().filter_map(|d| d.as_str()).collect());
            if !cgs.is_empty() {
                println!("    Socket LB:        cgroup connect4/sendmsg4/recvmsg4/getpeername4 on {}", cgs.join(", "));
            }
            println!("    Services:         {} frontends, {} backends; last sync {}{}", dp["frontends"], dp["backends"],
                dp["lastSyncMsAgo"].as_u64().map_or("never".into(), |ms| format!("{ms} ms ago")),
                dp["lastSyncDurationUs"].as_u64().map_or(String::new(), |us| format!(" (took {:.2} ms)", us as f64 / 1000.0)));
            if let Some(e) = dp["lastError"].as_str() {
                println!("    Last error:       {e}");
            }
            if a.verbose {
                println!("    Pins:             {}", dp["pinDir"].as_str().unwrap_or("?"));
                println!("    Maps:");
                for m in dp["maps"].as_array().cloned().unwrap_or_default() {
                    let (n, max) = (m["entries"].as_u64().unwrap_or(0), m["maxEntries"].as_u64().unwrap_or(0));
                    println!("      {:<22} {:<14} {:>8}/{:<8} {:>5.1}%", m["name"].as_str().unwrap_or("?"), m["kind"].as_str().unwrap_or("?"), n, max, if max > 0 { n as f64 * 100.0 / max as f64 } else { 0.0 });
                }
                if let Some(c) = dp["counters"].as_object() {
                    let line: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("    Counters:         {}", line.join(" "));
                }
            }
        }
        if a.verbose {
            if let Some(atts) = v.get("attachments").and_then(|x| x.as_array()) {
                println!("  Attachments:");
                for at in atts {
                    println!(
                        "    {:<15} {:<14} {}/{}  netns {}",
                        at["ip"].as_str().unwrap_or("?"),
                        at["hostVeth"].as_str().unwrap_or("?"),
                        at["podNamespace"].as_str().unwrap_or("-"),
                        at["podName"].as_str().unwrap_or("-"),
                        at["netns"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    if a.verbose && nodes.len() > 1 {
        print_health_matrix(&nodes);
    }
    if let Some(p) = &preflight {
        println!(
            "Preflight:            {} ({} pass, {} warn, {} fail, {} skipped; `fjordctl preflight` for fixes)",
            if p.ok { "OK" } else { "NOT READY" },
            p.summary.pass,
            p.summary.warn,
            p.summary.fail,
            p.summary.skip
        );
        for c in p.checks.iter().filter(|c| !matches!(c.status, fjord_nodetools::Status::Pass)) {
            println!("  {:?} {}: {}", c.status, c.id, c.reason);
        }
    }
    if !healthy {
        bail!("some agents are unreachable");
    }
    Ok(0)
}

async fn get_nodes(cl: &fjordctl::context::ClusterState, output: Output) -> Result<i32> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Row {
        name: String,
        addresses: Vec<std::net::Ipv4Addr>,
        pod_cidr: String,
        routing: String,
        health: String,
    }
    // Every agent knows every registered node (from the store); the first reachable one answers.
    let mut known: Option<Vec<fjord_model::api::NodeRecord>> = None;
    let mut health = std::collections::BTreeMap::new();
    for n in &cl.nodes {
        match AgentClient::new(&n.api_socket).with_timeout(std::time::Duration::from_secs(5)).status().await {
            Ok(s) => {
                health.insert(n.name.clone(), "Ready".to_string());
                if known.is_none() {
                    known = Some(s.nodes);
                }
            }
            Err(e) => {
                health.insert(n.name.clone(), format!("NotReady (agent: {e})"));
            }
        }
    }
    let records = known.unwrap_or_default();
    let mut rows: Vec<Row> = records
        .iter()
        .map(|r| Row {
            name: r.name.clone(),
            addresses: r.addresses.clone(),
            pod_cidr: r.pod_cidr.to_string(),
            routing: r.routing.clone(),
            health: health.get(&r.name).cloned().unwrap_or_else(|| "Registered (no local agent)".into()),
        })
        .collect();
    for n in &cl.nodes {
        if !records.iter().any(|r| r.name == n.name) {
            rows.push(Row {
                name: n.name.clone(),
                addresses: vec![n.address],
                pod_cidr: n.pod_cidr.to_string(),
                routing: n.routing.clone(),
                health: format!("NotRegistered; {}", health.get(&n.name).cloned().unwrap_or_default()),
            });
        }
    }
    if emit(output, &rows)? {
        return Ok(0);
    }
    println!("{:<10} {:<16} {:<16} {:<8} HEALTH", "NAME", "ADDRESS", "PODCIDR", "ROUTING");
    for r in rows {
        println!("{:<10} {:<16} {:<16} {:<8} {}", r.name, r.addresses.first().map_or("-".into(), |a| a.to_string()), r.pod_cidr, if r.routing.is_empty() { "-" } else { &r.routing }, r.health);
    }
    Ok(0)
}

/// Node-to-node reachability and RTT (rows: from, columns: to), like cilium-health.
fn print_health_matrix(nodes: &[serde_json::Value]) {
    let names: Vec<String> = nodes.iter().filter_map(|v| v["node"].as_str().map(String::from)).collect();
    println!("Node health (ICMP / TCP RTT, from row to column):");
    print!("  {:<10}", "");
    for n in &names {
        print!(" {n:>20}");
    }
    println!();
    let mut all = vec![];
    for v in nodes {
        let from = v["node"].as_str().unwrap_or("?");
        print!("  {from:<10}");
        let peers = v["status"]["health"].as_array().cloned().unwrap_or_default();
        for to in &names {
            let cell = if to == from {
                "-".to_string()
            } else {
                match peers.iter().find(|p| p["node"].as_str() == Some(to)) {
                    None => "not probed yet".to_string(),
                    Some(p) => {
                        let f = |k: &str| p[k].as_u64().map_or("FAIL".to_string(), |us| format!("{:.2}ms", us as f64 / 1000.0));
                        if let Some(us) = p["icmpRttUs"].as_u64() {
                            all.push((to.clone(), us));
                        }
                        format!("{} / {}", f("icmpRttUs"), f("tcpRttUs"))
                    }
                }
            };
            print!(" {cell:>20}");
        }
        println!();
    }
    let slow = fjord_model::api::slow_nodes(&all);
    if !slow.is_empty() {
        println!("  WARNING: RTT to {} is far above the rest (>3x the median)", slow.join(", "));
    }
}

fn read_manifest(file: &std::path::Path) -> Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading the manifest from stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// The first reachable agent (all agents share the cluster's store).
async fn any_agent(cl: &fjordctl::context::ClusterState) -> Result<AgentClient> {
    let mut last = None;
    for n in &cl.nodes {
        let c = AgentClient::new(&n.api_socket);
        match c.healthz().await {
            Ok(()) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    bail!("no agent of cluster {} is reachable: {}", cl.name, last.map(|e| e.to_string()).unwrap_or_default())
}

async fn get_services(cl: &fjordctl::context::ClusterState, name: Option<&str>, ns: &str, output: Output) -> Result<i32> {
    let all = any_agent(cl).await?.services().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let sel: Vec<&serde_json::Value> = all
        .iter()
        .filter(|s| s["metadata"]["namespace"] == ns && name.is_none_or(|n| s["metadata"]["name"] == n))
        .collect();
    if let Some(n) = name {
        if sel.is_empty() {
            bail!("service {ns}/{n} not found");
        }
    }
    if emit(output, &sel)? {
        return Ok(0);
    }
    println!("{:<20} {:<10} {:<15} {:<16} PORT(S)", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP");
    for s in sel {
        let ports: Vec<String> = s["spec"]["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let np = p["nodePort"].as_u64().map(|n| format!(":{n}")).unwrap_or_default();
                        format!("{}{np}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ext: Vec<String> = s["spec"]["externalIPs"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
        println!(
            "{:<20} {:<10} {:<15} {:<16} {}",
            s["metadata"]["name"].as_str().unwrap_or("?"),
            s["spec"]["type"].as_str().unwrap_or("ClusterIP"),
            s["spec"]["clusterIP"].as_str().unwrap_or("-"),
            if ext.is_empty() { "<none>".to_string() } else { ext.join(",") },
            ports.join(",")
        );
    }
    Ok(0)
}

async fn get_endpoints(cl: &fjordctl::context::ClusterState, name: Option<&str>, ns: &str, output: Output) -> Result<i32> {
    let all = any_agent(cl).await?.endpointslices().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let svc_of = |e: &serde_json::Value| e["metadata"]["labels"]["kubernetes.io/service-name"].as_str().unwrap_or("").to_string();
    let sel: Vec<&serde_json::Value> = all.iter().filter(|e| e["metadata"]["namespace"] == ns && name.is_none_or(|n| svc_of(e) == n)).collect();
    if emit(output, &sel)? {
        return Ok(0);
    }
    let mut by_svc: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for e in &sel {
        let ports: Vec<u64> = e["ports"].as_array().map(|p| p.iter().filter_map(|x| x["port"].as_u64()).collect()).unwrap_or_default();
        for ep in e["endpoints"].as_array().cloned().unwrap_or_default() {
            let ready = ep["conditions"]["ready"].as_bool().unwrap_or(true);
            let term = ep["conditions"]["terminating"].as_bool().unwrap_or(false);
            for a in ep["addresses"].as_array().cloned().unwrap_or_default() {
                for p in &ports {
                    let flag = if term { " (terminating)" } else if !ready { " (not ready)" } else { "" };
                    by_svc.entry(svc_of(e)).or_default().push(format!("{}:{p}{flag}", a.as_str().unwrap_or("?")));
                }
            }
        }
    }
    println!("{:<20} ENDPOINTS", "NAME");
    for (s, eps) in by_svc {
        println!("{s:<20} {}", eps.join(","));
    }
    Ok(0)
}

/// `status.conditions[type]` as `True`/`False` (reason in wide output), `-` when absent.
fn cond(conds: &serde_json::Value, t: &str, wide: bool) -> String {
    match conds.as_array().and_then(|a| a.iter().find(|c| c["type"] == t)) {
        None => "-".into(),
        Some(c) if wide => format!("{}({})", c["status"].as_str().unwrap_or("?"), c["reason"].as_str().unwrap_or("?")),
        Some(c) => c["status"].as_str().unwrap_or("?").to_string(),
    }
}

async fn get_gatewayapi(cl: &fjordctl::context::ClusterState, resource: &str, name: Option<&str>, ns: Option<&str>, output: Output) -> Result<i32> {
    let all = any_agent(cl).await?.gatewayapi(resource).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let sel: Vec<&serde_json::Value> = all
        .iter()
        .filter(|o| ns.is_none_or(|ns| o["metadata"]["namespace"] == ns) && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    if let Some(n) = name {
        if sel.is_empty() {
            let kind = match resource {
                "gatewayclasses" => "gatewayclass",
                "gateways" => "gateway",
                _ => "httproute",
            };
            bail!("{kind} {}{n} not found", ns.map(|n| format!("{n}/")).unwrap_or_default());
        }
    }
    if emit(output, &sel)? {
        return Ok(0);
    }
    let wide = output == Output::Wide;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    match resource {
        "gatewayclasses" => {
            println!("{:<20} {:<24} ACCEPTED", "NAME", "CONTROLLER");
            for o in sel {
                println!("{:<20} {:<24} {}", s(&o["metadata"]["name"]), s(&o["spec"]["controllerName"]), cond(&o["status"]["conditions"], "Accepted", wide));
            }
        }
        "gateways" => {
            print!("{:<24} {:<12} {:<16} {:<12}", "NAME", "CLASS", "ADDRESS", "PROGRAMMED");
            println!("{}", if wide { " LISTENERS" } else { "" });
            for o in sel {
                let addr: Vec<String> = o["status"]["addresses"].as_array().map(|a| a.iter().map(|x| s(&x["value"])).collect()).unwrap_or_default();
                print!(
                    "{:<24} {:<12} {:<16} {:<12}",
                    s(&o["metadata"]["name"]),
                    s(&o["spec"]["gatewayClassName"]),
                    if addr.is_empty() { "<pending>".into() } else { addr.join(",") },
                    cond(&o["status"]["conditions"], "Programmed", wide)
                );
                if wide {
                    let ls: Vec<String> = o["spec"]["listeners"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|l| {
                                    let st = o["status"]["listeners"].as_array().and_then(|sl| sl.iter().find(|x| x["name"] == l["name"]));
                                    let (prog, attached) = st.map(|x| (cond(&x["conditions"], "Accepted", true), x["attachedRoutes"].as_u64().unwrap_or(0))).unwrap_or(("-".into(), 0));
                                    format!("{}:{}/{} routes={attached} {prog}", s(&l["name"]), l["port"], s(&l["protocol"]))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    print!(" {}", ls.join("; "));
                }
                println!();
            }
        }
        _ => {
            print!("{:<28} {:<24} {:<24} {:<10} {:<12}", "NAME", "HOSTNAMES", "PARENTS", "ACCEPTED", "RESOLVEDREFS");
            println!("{}", if wide { " BACKENDS" } else { "" });
            for o in sel {
                let hosts: Vec<String> = o["spec"]["hostnames"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
                let parents: Vec<String> = o["spec"]["parentRefs"].as_array().map(|a| a.iter().map(|p| s(&p["name"])).collect()).unwrap_or_default();
                // conditions of the first parent (kubectl shows the same)
                let conds = &o["status"]["parents"][0]["conditions"];
                print!(
                    "{:<28} {:<24} {:<24} {:<10} {:<12}",
                    s(&o["metadata"]["name"]),
                    if hosts.is_empty() { "*".into() } else { hosts.join(",") },
                    parents.join(","),
                    cond(conds, "Accepted", wide),
                    cond(conds, "ResolvedRefs", wide)
                );
                if wide {
                    let mut b = vec![];
                    for r in o["spec"]["rules"].as_array().cloned().unwrap_or_default() {
                        for br in r["backendRefs"].as_array().cloned().unwrap_or_default() {
                            b.push(format!("{}:{} w={}", s(&br["name"]), br["port"], br["weight"].as_u64().unwrap_or(1)));
                        }
                    }
                    print!(" {}", b.join(","));
                }
                println!();
            }
        }
    }
    Ok(0)
}
