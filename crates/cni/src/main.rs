//! fjord-cni: the CNI plugin. Container runtimes run it with `CNI_*` variables
//! and the network configuration on stdin; it forwards the request to the
//! node agent over the agent's unix socket and prints the spec's result or
//! error JSON. With the argument `install` it installs itself (see --help).

use anyhow::Context;
use clap::Parser;
use fjord_api::{AgentClient, ClientError};
use fjord_model::api::{CniRequest, GcRequest};
use fjord_model::cni::*;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// Install fjord-cni: copy this binary into the CNI bin dir and write a conflist.
#[derive(Parser, Debug)]
#[command(name = "fjord-cni install", version, about, long_about = None)]
struct Install {
    /// Directory the runtime looks for plugins in (its CNI_PATH).
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// Directory the runtime reads network configurations from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The agent's API socket, written into the conflist.
    #[arg(long, default_value = DEFAULT_AGENT_SOCKET)]
    agent_socket: String,
    /// Network name in the conflist.
    #[arg(long, default_value = "fjord")]
    network_name: String,
    /// MTU of pod interfaces.
    #[arg(long)]
    mtu: Option<u32>,
}

const HELP: &str = "fjord-cni: fjord's CNI plugin (CNI spec 1.1.0).

Runtimes call it with CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION, CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH and the plugin's network configuration
on stdin, e.g. {\"cniVersion\":\"1.1.0\",\"name\":\"fjord\",\"type\":\"fjord-cni\",
\"agentSocket\":\"/run/fjord/agent.sock\",\"mtu\":1500}. It forwards the request to
the fjord agent on agentSocket and prints the result (or a spec error with code,
msg, details) on stdout.

Usage:
  fjord-cni install [--bin-dir DIR] [--conf-dir DIR] [--agent-socket PATH]   install plugin + conflist
  fjord-cni --help | --version
";

fn main() {
    let mut argv = std::env::args().skip(1);
    match argv.next().as_deref() {
        Some("install") => {
            let a = Install::parse_from(std::iter::once("fjord-cni install".to_string()).chain(argv));
            if let Err(e) = install(&a) {
                eprintln!("fjord-cni install: error: {e:#}");
                std::process::exit(1);
            }
            return;
        }
        Some("-h") | Some("--help") | Some("help") => {
            print!("{HELP}");
            return;
        }
        Some("-V") | Some("--version") => {
            println!("fjord-cni {} (CNI spec {SPEC_VERSION})", env!("CARGO_PKG_VERSION"));
            return;
        }
        _ => {}
    }
    let code = match run() {
        Ok(out) => {
            println!("{out}");
            0
        }
        Err(e) => {
            println!("{}", serde_json::to_string(&e).expect("error serializes"));
            1
        }
    };
    std::process::exit(code);
}

fn run() -> Result<String, CniError> {
    let env = Env::parse(|k| std::env::var(k).ok())?;
    if env.command == Command::Version {
        return Ok(serde_json::to_string(&VersionInfo::current()).unwrap());
    }
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| CniError::new(code::IO_FAILURE, "cannot read stdin").details(e.to_string()))?;
    let conf = NetConf::parse(&stdin)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| CniError::new(code::IO_FAILURE, "cannot start runtime").details(e.to_string()))?;
    rt.block_on(dispatch(env, conf))
}

fn client_err(cmd: Command, e: ClientError) -> CniError {
    match e {
        ClientError::Api(e) => e,
        ClientError::Unreachable { .. } | ClientError::Timeout { .. } if cmd == Command::Status => {
            CniError::new(code::NOT_AVAILABLE, "fjord agent is not reachable: the plugin cannot serve ADD now").details(e.to_string())
        }
        ClientError::Unreachable { .. } | ClientError::Timeout { .. } => {
            CniError::new(code::TRY_AGAIN_LATER, "fjord agent is not reachable; try again later").details(e.to_string())
        }
        ClientError::Decode { .. } => CniError::new(code::IO_FAILURE, "unexpected answer from the fjord agent").details(e.to_string()),
    }
}

async fn dispatch(env: Env, conf: NetConf) -> Result<String, CniError> {
    let client = AgentClient::new(conf.agent_socket()).with_timeout(Duration::from_secs(60));
    let cmd = env.command;
    let req = || CniRequest {
        container_id: env.container_id.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        netns: env.netns.clone(),
        args: env.args.clone(),
        mtu: conf.mtu,
    };
    match cmd {
        Command::Add => {
            let r = client.cni_add(&req()).await.map_err(|e| client_err(cmd, e))?;
            let a = &r.attachment;
            let result = CniResult {
                cni_version: SPEC_VERSION.into(),
                interfaces: vec![
                    Interface { name: a.host_veth.clone(), mac: r.host_mac.clone(), mtu: Some(r.mtu), sandbox: None },
                    Interface { name: a.ifname.clone(), mac: r.pod_mac.clone(), mtu: Some(r.mtu), sandbox: Some(a.netns.clone()) },
                ],
                ips: vec![IpConfig { version: None, address: format!("{}/32", a.ip), gateway: Some(a.gateway), interface: Some(1) }],
                routes: vec![Route { dst: "0.0.0.0/0".into(), gw: Some(a.gateway) }],
                dns: Dns::default(),
            }
            .for_version(&conf.cni_version);
            Ok(serde_json::to_string(&result).unwrap())
        }
        Command::Del => {
            client.cni_del(&req()).await.map_err(|e| client_err(cmd, e))?;
            Ok(String::new())
        }
        Command::Check => {
            client.cni_check(&req()).await.map_err(|e| client_err(cmd, e))?;
            Ok(String::new())
        }
        Command::Status => {
            client.cni_status().await.map_err(|e| client_err(cmd, e))?;
            Ok(String::new())
        }
        Command::Gc => {
            let valid = conf.valid_attachments.clone().unwrap_or_default();
            client.cni_gc(&GcRequest { valid_attachments: valid }).await.map_err(|e| client_err(cmd, e))?;
            Ok(String::new())
        }
        Command::Version => unreachable!("handled before reading stdin"),
    }
}

fn install(a: &Install) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating this binary")?;
    std::fs::create_dir_all(&a.bin_dir).with_context(|| format!("creating --bin-dir {}", a.bin_dir.display()))?;
    std::fs::create_dir_all(&a.conf_dir).with_context(|| format!("creating --conf-dir {}", a.conf_dir.display()))?;
    let dst = a.bin_dir.join("fjord-cni");
    let tmp = a.bin_dir.join(".fjord-cni.tmp");
    std::fs::copy(&me, &tmp).with_context(|| format!("copying {} to {}", me.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dst).with_context(|| format!("installing {}", dst.display()))?;
    let mut plugin = serde_json::json!({"type": PLUGIN_TYPE, "agentSocket": a.agent_socket});
    if let Some(m) = a.mtu {
        plugin["mtu"] = m.into();
    }
    let conflist = serde_json::json!({"cniVersion": SPEC_VERSION, "name": a.network_name, "plugins": [plugin]});
    let conf = a.conf_dir.join("10-fjord.conflist");
    std::fs::write(&conf, serde_json::to_string_pretty(&conflist)? + "\n").with_context(|| format!("writing {}", conf.display()))?;
    println!("installed {}\nwrote {}", dst.display(), conf.display());
    Ok(())
}
