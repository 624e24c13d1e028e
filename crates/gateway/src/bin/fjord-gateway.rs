//! fjord-gateway: the Gateway API L7 proxy: standalone mode (objects from YAML files) or store
//! mode (`--store`, objects from fjord's store; the agent's `--gateway` runs the same controller).
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fjord_gateway::config::{config_files, ObjectSet};
use fjord_gateway::{build, Gateway, GatewayOptions, StaticResolver, StatusReport};
use sha2::Digest;

/// fjord-gateway: Gateway API (gateway.networking.k8s.io/v1) proxy with HTTP/1.1, HTTP/2 (h2c
/// and ALPN) and TLS termination, hot-reloaded routing.
///
/// --config is a YAML file or a directory of *.yaml/*.yml files, each holding one or more
/// `---`-separated documents of these kinds:
///
///   gateway.networking.k8s.io/v1  GatewayClass (spec.controllerName: fjord.dev/gateway),
///                                 Gateway (listeners: HTTP/HTTPS), HTTPRoute
///   gateway.networking.k8s.io/v1beta1  ReferenceGrant
///   v1  Secret (type kubernetes.io/tls; data or stringData with tls.crt / tls.key),
///       Namespace (only its labels: for allowedRoutes.namespaces.from: Selector)
///   fjord.dev/v1alpha1  StaticService: backends for standalone mode, e.g.
///
///     apiVersion: fjord.dev/v1alpha1
///     kind: StaticService
///     metadata: {name: backend-v1, namespace: backend}
///     spec:
///       ports:
///       - port: 8080                      # the port backendRefs name
///         appProtocol: http               # or kubernetes.io/h2c
///         endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]   # ready endpoints
///
/// Store mode (--store etcd:http://HOST:PORT, instead of --config): the same objects (without
/// StaticService: backends are Services + EndpointSlices) are read from fjord's store, where
/// `fjordctl apply` puts them, and watched; Gateway/HTTPRoute status is written back. On a
/// single node with the embedded store, run the gateway inside the agent (fjord-agent --gateway).
///
/// The configuration is reloaded on SIGHUP and when the files change (polled). A file that does
/// not parse is refused as a whole and the running configuration stays. Objects that parse but
/// are invalid (bad regex, unknown filter type, conflicting listener, cross-namespace ref without
/// ReferenceGrant) are refused individually: see the status conditions (--status-file, logs;
/// `--check` prints them and exits).
///
/// Metrics (--metrics-addr): fjord_gateway_requests_total{route,backend,code},
/// fjord_gateway_request_duration_seconds{route}, fjord_gateway_table_swaps_total,
/// fjord_gateway_config_errors_total, fjord_gateway_active_connections.
/// Access log: one line per request (target fjord_gateway::access) with route, backend, status,
/// duration; filter with RUST_LOG.
#[derive(Parser, Debug)]
#[command(name = "fjord-gateway", version, verbatim_doc_comment)]
struct Args {
    /// YAML file or directory with Gateway API objects and StaticServices.
    #[arg(long, env = "FJORD_GATEWAY_CONFIG", required_unless_present = "store", conflicts_with = "store")]
    config: Option<PathBuf>,
    /// Store mode: read Gateway API objects, Services and EndpointSlices from fjord's store
    /// (`etcd:http://HOST:PORT[,…]`; an `embedded:PATH` store can only be used by the agent that
    /// owns it, so on a single node use `fjord-agent --gateway`), watch it, and write Gateway and
    /// HTTPRoute status back.
    #[arg(long, env = "FJORD_STORE")]
    store: Option<String>,
    /// Store mode: the address Gateways report in status.addresses (default: --listen-address).
    #[arg(long, env = "FJORD_GATEWAY_STATUS_ADDRESS")]
    status_address: Option<IpAddr>,
    /// Store mode: several instances (and agents with --gateway) on one store all serve traffic
    /// and elect one status writer with the store lease /fjord/v1/leases/gateway-status held
    /// under this name (default: HOSTNAME-PID).
    #[arg(long, env = "FJORD_GATEWAY_IDENTITY")]
    identity: Option<String>,
    /// Store mode: lease duration of the status writer election (seconds); a writer that stops
    /// without resigning is replaced after this long.
    #[arg(long, env = "FJORD_GATEWAY_STATUS_LEASE_TTL", default_value_t = 15)]
    status_lease_ttl_secs: u64,
    /// IP address the Gateway listeners bind (ports come from the listeners).
    #[arg(long, env = "FJORD_GATEWAY_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "FJORD_GATEWAY_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Write computed status conditions (JSON) to this file after every (re)load.
    #[arg(long, env = "FJORD_GATEWAY_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// How often to check the config files for changes (metadata only), in milliseconds
    /// (0 = reload only on SIGHUP).
    #[arg(long, env = "FJORD_GATEWAY_POLL_MS", default_value_t = 50)]
    poll_ms: u64,
    /// Do not log one line per request.
    #[arg(long, env = "FJORD_GATEWAY_NO_ACCESS_LOG")]
    no_access_log: bool,
    /// Seconds to let open requests finish on SIGTERM/SIGINT.
    #[arg(long, env = "FJORD_GATEWAY_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Worker threads (default: number of CPUs), like nginx's worker_processes: each worker is a
    /// single-threaded runtime with its own SO_REUSEPORT socket per listener port.
    #[arg(long, env = "FJORD_GATEWAY_WORKERS")]
    workers: Option<usize>,
    /// How a request picks an endpoint of a Service: round-robin, or least-request (power of
    /// two random choices, fewer requests in flight wins).
    #[arg(long, env = "FJORD_GATEWAY_LB", value_enum, default_value_t = Lb::RoundRobin)]
    lb: Lb,
    /// Only parse and validate the config, print the status JSON and exit.
    #[arg(long)]
    check: bool,
}

/// Cheap change detector: names, sizes, inodes and modification times of the config files
/// (editors that replace files atomically change the inode). Contents are not read.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Lb {
    RoundRobin,
    LeastRequest,
}

fn fingerprint(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let mut h = sha2::Sha256::new();
    for f in config_files(path).ok()? {
        let md = std::fs::metadata(&f).ok()?;
        h.update(f.to_string_lossy().as_bytes());
        for v in [md.len(), md.ino(), md.mtime() as u64, md.mtime_nsec() as u64, md.ctime() as u64, md.ctime_nsec() as u64] {
            h.update(v.to_le_bytes());
        }
    }
    Some(h.finalize().to_vec())
}

fn status_json(s: &StatusReport) -> serde_json::Value {
    serde_json::json!({
        "gatewayClasses": s.gateway_classes,
        "gateways": s.gateways,
        "httpRoutes": s.http_routes,
    })
}

fn log_status(s: &StatusReport) {
    for (k, g) in &s.gateways {
        for l in &g.listeners {
            for c in l.conditions.iter().filter(|c| (c.type_ == "Conflicted") == c.is_true()) {
                tracing::warn!(gateway = k, listener = l.name, condition = c.type_, reason = c.reason, message = c.message, "listener not ready");
            }
        }
    }
    for (k, r) in &s.http_routes {
        for p in &r.parents {
            for c in &p.conditions {
                let bad = if c.type_ == "PartiallyInvalid" { c.is_true() } else { !c.is_true() };
                if bad {
                    tracing::warn!(route = k, parent = p.parent_ref.name, condition = c.type_, reason = c.reason, message = c.message, "route problem");
                }
            }
        }
    }
}

async fn load_and_apply(args: &Args, gw: &Gateway) -> anyhow::Result<()> {
    let config = args.config.as_ref().context("--config is required")?;
    let objs = ObjectSet::load_path(config).context("config refused; the running configuration is unchanged")?;
    let resolver = StaticResolver::new(&objs.static_services);
    let out = build(&objs, &resolver);
    log_status(&out.status);
    if let Some(f) = &args.status_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&status_json(&out.status))?).with_context(|| format!("writing --status-file {}", tmp.display()))?;
        std::fs::rename(&tmp, f).with_context(|| format!("writing --status-file {}", f.display()))?;
    }
    gw.apply(out.table).await.context("new configuration not applied")?;
    tracing::info!(config = %config.display(), "configuration applied");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if args.check {
        let config = args.config.as_ref().context("--check needs --config")?;
        let objs = ObjectSet::load_path(config).context("config refused")?;
        let out = build(&objs, &StaticResolver::new(&objs.static_services));
        println!("{}", serde_json::to_string_pretty(&status_json(&out.status))?);
        return Ok(());
    }
    // nginx's model: N workers, each a single-threaded runtime on its own thread with its own
    // SO_REUSEPORT socket per listener port (no work stealing, no cross-thread wake-ups).
    // The main thread is worker 0 and also runs the config/store side.
    let n = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let mut handles = Vec::new();
    for i in 1..n {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a worker runtime")?;
        handles.push(rt.handle().clone());
        std::thread::Builder::new()
            .name(format!("fjord-gw-worker-{i}"))
            .spawn(move || rt.block_on(std::future::pending::<()>()))
            .context("starting a worker thread")?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let mut workers = vec![rt.handle().clone()];
    workers.extend(handles);
    rt.block_on(run(args, if n > 1 { workers } else { Vec::new() }))
}

async fn run(args: Args, workers: Vec<tokio::runtime::Handle>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let lb_policy = match args.lb {
        Lb::RoundRobin => fjord_gateway::LbPolicy::RoundRobin,
        Lb::LeastRequest => fjord_gateway::LbPolicy::LeastRequest,
    };
    let gw = Gateway::new(GatewayOptions {
        listen_ip: args.listen_address,
        access_log: !args.no_access_log,
        lb_policy,
        workers,
        ..Default::default()
    });
    let mut elector = None;
    if let Some(url) = &args.store {
        let store = fjord_store::open(url).await.with_context(|| format!("opening --store {url}"))?;
        let address = args.status_address.unwrap_or(args.listen_address);
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let ttl = Duration::from_secs(args.status_lease_ttl_secs.max(1));
        let e = fjord_gateway::leader::Elector::spawn(store.clone(), fjord_gateway::leader::STATUS_LEASE_KEY, &identity, ttl);
        tokio::spawn(fjord_gateway::controller::Controller::new(store, gw.clone(), address).with_leadership(e.leadership()).with_instance(&identity, ttl).run());
        elector = Some(e);
        tracing::info!(store = %url, %address, identity, "store mode: serving Gateway API objects from the store");
    } else {
        load_and_apply(&args, &gw).await?;
    }
    if let Some(addr) = args.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
        tracing::info!(%addr, "metrics at /metrics");
        tokio::spawn(fjord_gateway::metrics::serve_metrics(l, gw.metrics()));
    }
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let config = args.config.clone();
    let mut last = config.as_deref().and_then(fingerprint);
    let poll = Duration::from_millis(if args.poll_ms == 0 { 3_600_000 } else { args.poll_ms });
    let metrics: Arc<_> = gw.metrics();
    loop {
        let reload = tokio::select! {
            _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); config.is_some() }
            _ = tokio::time::sleep(poll), if args.poll_ms > 0 && config.is_some() => {
                let fp = config.as_deref().and_then(fingerprint);
                if fp.is_some() && fp != last { last = fp; tracing::info!("config changed: reloading"); true } else { false }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        if reload {
            if let Err(e) = load_and_apply(&args, &gw).await {
                metrics.config_errors.inc();
                tracing::error!("{e:#}");
            }
        }
    }
    tracing::info!(grace_secs = args.shutdown_grace_secs, "shutting down");
    if let Some(e) = elector {
        e.resign().await;
    }
    gw.shutdown(Duration::from_secs(args.shutdown_grace_secs)).await;
    Ok(())
}
