//! The node agent's API (HTTP/1.1 + JSON over a unix socket).
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/healthz` | `ok` |
//! | GET | `/v1/status` | → [`AgentStatus`] |
//! | POST | `/v1/cni/add` | [`CniRequest`] → [`CniAddResponse`] |
//! | POST | `/v1/cni/del` | [`CniRequest`] → `{}` |
//! | POST | `/v1/cni/check` | [`CniRequest`] → `{}` |
//! | POST | `/v1/cni/gc` | [`GcRequest`] → [`GcResponse`] |
//! | GET | `/v1/cni/status` | → `{}` when the agent can serve ADD |
//! | GET | `/v1/attachments` | → `[Attachment]` |
//! | GET | `/v1/pods` | → `[Pod]` |
//! | POST | `/v1/pods` | [`Pod`] → [`Pod`] (create only: 409 if it exists) |
//! | PUT | `/v1/pods/{ns}/{name}` | [`Pod`] → [`Pod`] (update) |
//! | GET/DELETE | `/v1/pods/{ns}/{name}` | → [`Pod`] |
//! | GET | `/metrics` | Prometheus text |
//!
//! Every error answer is a JSON [`ApiError`] with a non-2xx status; its `code`
//! is a CNI error code so the CNI plugin can pass it through unchanged.

use crate::cni::CniError;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// An error answer from the agent.
pub type ApiError = CniError;

/// A CNI ADD/DEL/CHECK forwarded by the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniRequest {
    pub container_id: String,
    pub ifname: String,
    #[serde(default)]
    pub netns: Option<String>,
    /// `CNI_ARGS`, e.g. `K8S_POD_NAMESPACE`, `K8S_POD_NAME`.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl CniRequest {
    pub fn pod_ref(&self) -> Option<(String, String)> {
        Some((self.args.get("K8S_POD_NAMESPACE")?.clone(), self.args.get("K8S_POD_NAME")?.clone()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniAddResponse {
    pub attachment: Attachment,
    pub host_mac: String,
    pub pod_mac: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    pub valid_attachments: Vec<crate::cni::AttachmentRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcResponse {
    pub removed: Vec<crate::cni::AttachmentRef>,
}

/// One pod interface on a node: the fact the agent owns ("endpoint").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub host_veth: String,
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    pub created_unix_ms: u64,
}

impl Attachment {
    pub fn attachment_ref(&self) -> crate::cni::AttachmentRef {
        crate::cni::AttachmentRef { container_id: self.container_id.clone(), ifname: self.ifname.clone() }
    }
}

/// A pod as fjord's dev tooling records it (standing in for the Kubernetes API server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named container ports (for Services' named targetPorts), e.g. {"http": 8080}.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    pub node: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// `Pending` (netns being set up), `Running`, `Failed`.
    #[serde(default = "pending")]
    pub phase: String,
}

fn pending() -> String {
    "Pending".into()
}

/// Validates a Kubernetes-style name (RFC 1123 label: lower-case alphanumerics and '-', ≤ 63).
pub fn validate_dns_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is invalid: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

/// Validates a label key/value pair (simplified Kubernetes rules).
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let name = key.rsplit('/').next().unwrap_or(key);
    let good = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty())
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
    };
    if !good(name, false) {
        return Err(format!("label key {key:?} is invalid: 1-63 letters, digits, '-', '_', '.', starting and ending alphanumeric"));
    }
    if !good(value, true) {
        return Err(format!("label value {value:?} (key {key:?}) is invalid: ≤63 letters, digits, '-', '_', '.', starting and ending alphanumeric"));
    }
    Ok(())
}

/// Parse `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("label {part:?} is not key=value"))?;
        validate_label(k, v)?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label key {k:?} given twice"));
        }
    }
    Ok(out)
}

/// The node record (`/fjord/v1/nodes/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    pub pod_cidr: Ipv4Net,
    /// Underlay addresses; the first is the one other nodes route and tunnel to.
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
    /// `native` or `vxlan`.
    #[serde(default)]
    pub routing: String,
    /// MAC of the node's VXLAN device (VXLAN mode).
    #[serde(default)]
    pub vtep_mac: Option<String>,
    /// API/health port capabilities etc.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamStatus {
    pub pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub capacity: u32,
    pub allocated: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    pub backend: String,
    pub revision: i64,
    pub healthy: bool,
    /// Round trip of a read against the store, in microseconds.
    pub round_trip_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    pub uptime_secs: u64,
    pub ipam: IpamStatus,
    pub store: StoreStatus,
    pub attachments: u32,
    pub zombies_cleaned: u64,
    pub netns: String,
    #[serde(default)]
    pub routing: String,
    /// Nodes this agent knows (itself included) and routes to.
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    #[serde(default)]
    pub last_route_sync_ms_ago: Option<u64>,
    #[serde(default)]
    pub last_route_error: Option<String>,
    /// Probes from this node to every other node.
    #[serde(default)]
    pub health: Vec<PeerHealth>,
    #[serde(default)]
    pub datapath: Option<DatapathStatus>,
}

/// The eBPF kube-proxy replacement on one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    /// `OK`, or `Disabled (reason)`.
    pub kube_proxy_replacement: String,
    pub pin_dir: String,
    /// Interfaces with fjord's tc programs (ingress + egress).
    pub attached: Vec<String>,
    /// How programs are attached: `tc` (clsact + cls_bpf) or `tcx`.
    #[serde(default)]
    pub attach_mode: String,
    /// Delivery between pods of this node: `BPF` (bpf_redirect_peer) or `Legacy` (kernel routing).
    #[serde(default)]
    pub host_routing: String,
    /// Node devices (not pod veths) with fjord's programs, as `name (ingress, egress)`.
    #[serde(default)]
    pub node_devices: Vec<String>,
    /// Cgroups v2 with the socket-level LB (connect4, sendmsg4, recvmsg4, getpeername4).
    #[serde(default)]
    pub socket_lb_cgroups: Vec<String>,
    pub maps: Vec<MapStatus>,
    pub counters: BTreeMap<String, u64>,
    pub frontends: u64,
    pub backends: u64,
    pub last_sync_ms_ago: Option<u64>,
    pub last_sync_duration_us: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapStatus {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    pub entries: u32,
}

/// `POST /v1/apply` and `POST /v1/delete`: multi-document YAML (or JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestRequest {
    pub manifest: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestResponse {
    /// `Kind/namespace/name` of each object applied or deleted.
    pub objects: Vec<String>,
    /// Objects that were not there (delete).
    #[serde(default)]
    pub missing: Vec<String>,
}

/// One node's view of another (ICMP echo and TCP connect to its health port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerHealth {
    pub node: String,
    pub address: Ipv4Addr,
    pub icmp_rtt_us: Option<u64>,
    pub tcp_rtt_us: Option<u64>,
    pub error: Option<String>,
}

/// Nodes whose RTT is far above the rest: more than 3x the median of all
/// measured RTTs and at least 1 ms above it (so microsecond noise on a quiet
/// LAN is not flagged).
pub fn slow_nodes(rtts: &[(String, u64)]) -> Vec<String> {
    if rtts.len() < 3 {
        return vec![];
    }
    let mut v: Vec<u64> = rtts.iter().map(|(_, r)| *r).collect();
    v.sort_unstable();
    let median = v[v.len() / 2];
    let mut out: Vec<String> = rtts.iter().filter(|(_, r)| *r > median * 3 && *r > median + 1000).map(|(n, _)| n.clone()).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let l = parse_labels("app=web, tier=frontend").unwrap();
        assert_eq!(l["app"], "web");
        assert_eq!(l["tier"], "frontend");
        assert!(parse_labels("app").unwrap_err().contains("key=value"));
        assert!(parse_labels("app=a,app=b").unwrap_err().contains("twice"));
        assert!(parse_labels("a pp=x").unwrap_err().contains("label key"));
        assert!(parse_labels("app=-x").unwrap_err().contains("label value"));
        assert!(parse_labels("example.com/app=x").is_ok());
        assert!(parse_labels("app=").is_ok());
    }

    #[test]
    fn slow_nodes_are_outliers_only() {
        let r = |v: &[(&str, u64)]| v.iter().map(|(n, x)| (n.to_string(), *x)).collect::<Vec<_>>();
        assert!(slow_nodes(&r(&[("a", 100), ("b", 120), ("c", 110), ("d", 130)])).is_empty());
        assert_eq!(slow_nodes(&r(&[("a", 100), ("b", 120), ("c", 110), ("d", 9000)])), vec!["d"]);
        // 3x the median but under 1 ms above it: noise, not flagged.
        assert!(slow_nodes(&r(&[("a", 50), ("b", 60), ("c", 55), ("d", 400)])).is_empty());
        assert!(slow_nodes(&r(&[("a", 100), ("d", 90000)])).is_empty(), "two samples say nothing");
    }

    #[test]
    fn dns_labels() {
        assert!(validate_dns_label("pod name", "web-1").is_ok());
        for bad in ["", "Web", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(validate_dns_label("pod name", bad).unwrap_err().contains("pod name"), "{bad}");
        }
    }
}
