//! fjordctl's state on disk (like a kubeconfig): `$FJORD_HOME` (default
//! `~/.fjord`) holds `config.json` (the current cluster) and one directory per
//! dev cluster with `cluster.json` (everything `cluster up` made, so `cluster
//! down` can remove exactly that).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub current_cluster: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub pod_cidr: ipnet::Ipv4Net,
    pub dir: PathBuf,
    pub api_socket: PathBuf,
    pub store: String,
    pub agent_pid: Option<u32>,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub underlay_veth: String,
    /// `native` or `vxlan` (cluster mode).
    #[serde(default)]
    pub routing: String,
    /// The agent claims its PodCIDR from the store (cluster mode) instead of `--pod-cidr`.
    #[serde(default)]
    pub allocate_pod_cidr: bool,
    /// Extra fjord-agent flags (e.g. `--datapath off`), kept for restarts.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Pods get the socket-level LB too (their parent cgroup is given to the agent).
    #[serde(default)]
    pub socket_lb_pods: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EtcdState {
    pub netns: String,
    pub address: Ipv4Addr,
    pub endpoint: String,
    pub data_dir: PathBuf,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterState {
    pub name: String,
    pub store: String,
    pub created_unix: u64,
    pub underlay_netns: String,
    pub underlay_cidr: ipnet::Ipv4Net,
    pub ext_netns: String,
    pub ext_address: Ipv4Addr,
    pub nodes: Vec<NodeState>,
    #[serde(default)]
    pub etcd: Option<EtcdState>,
    #[serde(default)]
    pub routing: String,
}

impl ClusterState {
    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!("cluster {} has no node {name:?}; nodes: {}", self.name, self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "))
        })
    }
    /// Every network namespace of this cluster starts with this prefix.
    pub fn netns_prefix(name: &str) -> String {
        format!("fjord-{name}.")
    }
}

pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    pub fn new(dir: Option<PathBuf>) -> Home {
        let dir = dir.unwrap_or_else(|| std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from).join(".fjord"));
        Home { dir }
    }
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn cluster_dir(&self, name: &str) -> PathBuf {
        self.dir.join("clusters").join(name)
    }
    pub fn config(&self) -> Result<Config> {
        let p = self.config_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not valid fjordctl config JSON; fix or delete it", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    pub fn save_config(&self, c: &Config) -> Result<()> {
        write_atomic(&self.config_path(), &serde_json::to_vec_pretty(c)?)
    }
    pub fn load_cluster(&self, name: &str) -> Result<ClusterState> {
        let p = self.cluster_dir(name).join("cluster.json");
        let b = std::fs::read(&p).with_context(|| format!("cluster {name:?} not found ({} missing); `fjordctl cluster up --name {name}` creates it", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))
    }
    pub fn save_cluster(&self, c: &ClusterState) -> Result<()> {
        write_atomic(&self.cluster_dir(&c.name).join("cluster.json"), &serde_json::to_vec_pretty(c)?)
    }
    /// The cluster named by `--cluster`/`FJORD_CLUSTER`, else the current one.
    pub fn resolve(&self, explicit: Option<&str>) -> Result<ClusterState> {
        let name = match explicit {
            Some(n) => n.to_string(),
            None => match self.config()?.current_cluster {
                Some(n) => n,
                None => bail!("no current cluster: run `fjordctl cluster up` first, or pass --cluster NAME"),
            },
        };
        self.load_cluster(&name)
    }
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
