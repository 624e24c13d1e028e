//! `fjordctl pod`: acts like a container runtime (containerd + kubelet) for
//! the dev cluster: a network namespace per pod sandbox and CNI ADD/DEL
//! through the node's installed plugin and conflist.

use crate::context::{ClusterState, NodeState};
use crate::runtime::{Attachment, CniFailure, Runtime};
use anyhow::{bail, Context, Result};
use fjord_api::AgentClient;
use fjord_model::api::{validate_dns_label, Pod};
use fjord_net::netns;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

pub const POD_IFNAME: &str = "eth0";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub netns: String,
    pub container_id: String,
    pub labels: BTreeMap<String, String>,
    pub status: String,
    /// Time the CNI plugin took for ADD (only from `pod add`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni_add_ms: Option<f64>,
    /// Time the CNI plugin took for DEL (only from `pod del`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni_del_ms: Option<f64>,
}

pub fn parse_ref(s: &str) -> Result<(String, String)> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => ("default", s),
    };
    validate_dns_label("pod namespace", ns).map_err(anyhow::Error::msg)?;
    validate_dns_label("pod name", name).map_err(anyhow::Error::msg)?;
    Ok((ns.to_string(), name.to_string()))
}

pub fn netns_name(cluster: &str, ns: &str, name: &str) -> String {
    format!("{}pod.{ns}.{name}", ClusterState::netns_prefix(cluster))
}

fn runtime(node: &NodeState) -> Runtime {
    Runtime { conf_dir: node.cni_conf_dir.clone(), bin_dir: node.cni_bin_dir.clone(), host_netns: netns::path(&node.netns) }
}

fn random_id() -> Result<String> {
    let mut b = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn cni_args(ns: &str, name: &str, cid: &str) -> Vec<(String, String)> {
    vec![
        ("K8S_POD_NAMESPACE".into(), ns.into()),
        ("K8S_POD_NAME".into(), name.into()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), cid.into()),
    ]
}

pub async fn add(cluster: &ClusterState, node: Option<&str>, reference: &str, labels: BTreeMap<String, String>) -> Result<PodInfo> {
    add_with_ports(cluster, node, reference, labels, BTreeMap::new()).await
}

/// Like [`add`], with named container ports (for Services' named targetPorts).
pub async fn add_with_ports(
    cluster: &ClusterState,
    node: Option<&str>,
    reference: &str,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u16>,
) -> Result<PodInfo> {
    let (ns, name) = parse_ref(reference)?;
    let node = match node {
        Some(n) => cluster.node(n)?,
        None => cluster.nodes.first().context("cluster has no nodes")?,
    };
    // Pod names are unique in the cluster.
    for n in &cluster.nodes {
        if let Ok(p) = AgentClient::new(&n.api_socket).get_pod(&ns, &name).await {
            bail!("pod {ns}/{name} already exists on node {} (IP {}); delete it first with `fjordctl pod del {ns}/{name}`", p.node, p.ip.map_or("none".into(), |i| i.to_string()));
        }
    }
    let client = AgentClient::new(&node.api_socket);
    let cid = random_id()?;
    let ns_name = netns_name(&cluster.name, &ns, &name);
    let mut pod = Pod {
        namespace: ns.clone(),
        name: name.clone(),
        labels,
        ports,
        node: node.name.clone(),
        uid: random_id()?[..32].to_string(),
        container_id: Some(cid.clone()),
        netns: Some(netns::path(&ns_name).display().to_string()),
        ip: None,
        phase: "Pending".into(),
    };
    client.create_pod(&pod).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = async {
        let ns_path = netns::create(&ns_name).with_context(|| format!("creating the pod's network namespace {ns_name}"))?;
        let rt = runtime(node);
        let att = Attachment { container_id: &cid, netns: &ns_path, ifname: POD_IFNAME, args: cni_args(&ns, &name, &cid) };
        let (res, took) = rt.add(&att).map_err(|e| match e {
            CniFailure::Plugin { plugin, error } => anyhow::anyhow!(
                "CNI ADD failed in plugin {plugin}: code {}: {}{}",
                error.code,
                error.msg,
                if error.details.is_empty() { String::new() } else { format!(" ({})", error.details) }
            ),
            CniFailure::Other(e) => e,
        })?;
        let ip = res["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .context("CNI result has no IPv4 address")?;
        anyhow::Ok((ip, took))
    }
    .await;
    match result {
        Ok((ip, took)) => {
            pod.ip = Some(ip);
            pod.phase = "Running".into();
            client.update_pod(&pod).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(PodInfo {
                namespace: ns,
                name,
                node: node.name.clone(),
                ip: Some(ip),
                netns: ns_name,
                container_id: cid,
                labels: pod.labels,
                status: "Running".into(),
                cni_add_ms: Some(took.as_secs_f64() * 1000.0),
                cni_del_ms: None,
            })
        }
        Err(e) => {
            let _ = netns::delete(&ns_name);
            let _ = client.delete_pod(&ns, &name).await;
            Err(e)
        }
    }
}

async fn find<'a>(cluster: &'a ClusterState, ns: &str, name: &str) -> Result<(Pod, &'a NodeState)> {
    for n in &cluster.nodes {
        match AgentClient::new(&n.api_socket).get_pod(ns, name).await {
            Ok(p) => return Ok((p, n)),
            Err(e) if e.status_is_not_found() => continue,
            Err(e) => return Err(anyhow::anyhow!("asking node {}: {e}", n.name)),
        }
    }
    bail!("pod {ns}/{name} not found in cluster {} (`fjordctl pod list` shows the pods)", cluster.name)
}

pub async fn del(cluster: &ClusterState, reference: &str) -> Result<PodInfo> {
    let (ns, name) = parse_ref(reference)?;
    let (pod, node) = find(cluster, &ns, &name).await?;
    let cid = pod.container_id.clone().unwrap_or_default();
    let ns_path = pod.netns.clone().map(PathBuf::from).unwrap_or_else(|| netns::path(&netns_name(&cluster.name, &ns, &name)));
    let mut del_ms = None;
    if !cid.is_empty() {
        let att = Attachment { container_id: &cid, netns: &ns_path, ifname: POD_IFNAME, args: cni_args(&ns, &name, &cid) };
        let took = runtime(node).del(&att, None).map_err(|e| anyhow::anyhow!("CNI DEL failed: {e}"))?;
        del_ms = Some(took.as_secs_f64() * 1000.0);
    }
    netns::delete_path(&ns_path)?;
    AgentClient::new(&node.api_socket).delete_pod(&ns, &name).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(PodInfo {
        namespace: ns,
        name,
        node: node.name.clone(),
        ip: pod.ip,
        netns: ns_path.display().to_string(),
        container_id: cid,
        labels: pod.labels,
        status: "Deleted".into(),
        cni_add_ms: None,
        cni_del_ms: del_ms,
    })
}

pub async fn list(cluster: &ClusterState) -> Result<Vec<PodInfo>> {
    let mut out = Vec::new();
    for n in &cluster.nodes {
        let c = AgentClient::new(&n.api_socket);
        let pods = c.pods().await.map_err(|e| anyhow::anyhow!("node {}: {e}", n.name))?;
        let atts = c.attachments().await.map_err(|e| anyhow::anyhow!("node {}: {e}", n.name))?;
        // With a shared store (etcd) every agent sees every pod: take each node's own.
        for p in pods.into_iter().filter(|p| p.node == n.name) {
            let cid = p.container_id.clone().unwrap_or_default();
            let att = atts.iter().find(|a| a.container_id == cid);
            let status = match (&att, p.phase.as_str()) {
                (Some(_), _) => "Running".to_string(),
                (None, "Running") => "NetworkLost".to_string(),
                (None, phase) => phase.to_string(),
            };
            out.push(PodInfo {
                namespace: p.namespace,
                name: p.name,
                node: n.name.clone(),
                ip: att.map(|a| a.ip),
                netns: p.netns.unwrap_or_default(),
                container_id: cid,
                labels: p.labels,
                status,
                cni_add_ms: None,
                cni_del_ms: None,
            });
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

pub async fn netns_of(cluster: &ClusterState, reference: &str) -> Result<PathBuf> {
    Ok(netns_and_node_of(cluster, reference).await?.0)
}

/// The pod's network namespace and its node.
pub async fn netns_and_node_of<'a>(cluster: &'a ClusterState, reference: &str) -> Result<(PathBuf, &'a NodeState)> {
    let (ns, name) = parse_ref(reference)?;
    let (pod, node) = find(cluster, &ns, &name).await?;
    let p = pod.netns.map(PathBuf::from).context("pod has no network namespace")?;
    if !p.exists() {
        bail!("the network namespace of pod {ns}/{name} ({}) is gone", p.display());
    }
    Ok((p, node))
}
