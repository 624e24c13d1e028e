//! Pod plumbing with rtnetlink: a veth pair per pod interface.
//!
//! ```text
//!  node netns                                 pod netns
//!  fjXXXXXXXXXXX  (10.244.N.1/32, up)  <──veth──>  eth0 (10.244.N.M/32, up)
//!  route 10.244.N.M/32 dev fjXXX scope link        route 10.244.N.1 dev eth0 scope link
//!                                                  default via 10.244.N.1 dev eth0
//! ```
//! Every host-side veth carries the gateway address, so a pod's ARP for its
//! gateway is answered by its own veth peer; the node forwards between pods
//! with its /32 host routes. No bridge, no proxy ARP, no iptables.

use fjord_net::{netns, Netlink};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::Path;

pub struct PodSide {
    pub mac: String,
}

/// Temporary name of the pod end while it is still in the node namespace.
pub fn peer_tmp_name(host_veth: &str) -> String {
    format!("fp{}", &host_veth[2..])
}

/// Create the veth pair (both ends still in the node's namespace). On error, the
/// caller removes the host end.
pub async fn create_pair(nl: &Netlink, host_veth: &str, mtu: u32) -> anyhow::Result<()> {
    let tmp = peer_tmp_name(host_veth);
    // Leftovers of an interrupted earlier attempt.
    nl.delete_link(host_veth).await?;
    nl.delete_link(&tmp).await?;
    nl.add_veth(host_veth, &tmp, Some(mtu)).await?;
    Ok(())
}

/// Move the pod end into the pod's namespace and configure both ends (after [`create_pair`]).
pub async fn configure(
    nl: &Netlink,
    netns_path: &Path,
    host_veth: &str,
    ifname: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> anyhow::Result<(String, PodSide)> {
    use anyhow::Context;
    let tmp = peer_tmp_name(host_veth);
    let ns_file = netns::open(netns_path)?;
    nl.move_to_netns(&tmp, &ns_file).await?;
    nl.set_up(host_veth).await?;
    nl.add_addr(host_veth, gateway, 32).await?;
    nl.replace_route(Ipv4Net::new(ip, 32).unwrap(), None, Some(host_veth), true).await?;
    let host_mac = nl.link(host_veth).await?.map(|l| l.mac).unwrap_or_default();
    let host_mac_bytes = mac_bytes(&host_mac).context("reading the host veth's MAC")?;
    let ifname_s = ifname.to_string();
    let pod = netns::run_async_in(netns_path, move || async move {
        let nl = Netlink::new().context("netlink socket in the pod namespace")?;
        if nl.link(&ifname_s).await?.is_some() {
            anyhow::bail!("interface {ifname_s} already exists in the pod's network namespace");
        }
        nl.rename(&tmp, &ifname_s).await?;
        nl.set_up("lo").await?;
        nl.set_up(&ifname_s).await?;
        nl.add_addr(&ifname_s, ip, 32).await?;
        nl.replace_route(Ipv4Net::new(gateway, 32).unwrap(), None, Some(&ifname_s), true).await?;
        nl.replace_route("0.0.0.0/0".parse().unwrap(), Some(gateway), Some(&ifname_s), false).await?;
        // Static neighbour entries on both ends: no ARP on pod start, and permanent entries do
        // not count against the kernel's neighbour-table limit (gc_thresh3, shared by every
        // namespace of the machine), which dynamic entries of ~1,000 pods overflow.
        nl.replace_neighbour(&ifname_s, gateway, &host_mac_bytes).await?;
        let mac = nl.link(&ifname_s).await?.map(|l| l.mac).unwrap_or_default();
        Ok::<_, anyhow::Error>(PodSide { mac })
    })
    .await??;
    let pod_mac = mac_bytes(&pod.mac).context("reading the pod interface's MAC")?;
    nl.replace_neighbour(host_veth, ip, &pod_mac).await?;
    Ok((host_mac, pod))
}

/// `aa:bb:cc:dd:ee:ff` → 6 bytes.
pub fn mac_bytes(s: &str) -> anyhow::Result<Vec<u8>> {
    let v: Vec<u8> = s.split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).collect();
    anyhow::ensure!(v.len() == 6, "{s:?} is not a MAC address");
    Ok(v)
}

/// What CHECK found wrong (empty: all as set up).
pub async fn check(nl: &Netlink, netns_path: &Path, host_veth: &str, ifname: &str, ip: Ipv4Addr, gateway: Ipv4Addr) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    match nl.link(host_veth).await? {
        None => problems.push(format!("host interface {host_veth} is missing")),
        Some(l) => {
            if !l.up {
                problems.push(format!("host interface {host_veth} is down"));
            }
            if !nl.addrs(host_veth).await?.contains(&(gateway, 32)) {
                problems.push(format!("host interface {host_veth} lacks gateway address {gateway}/32"));
            }
            let routes = nl.routes().await?;
            let want = Ipv4Net::new(ip, 32).unwrap();
            if !routes.iter().any(|r| r.dst == want && r.oif == Some(l.index)) {
                problems.push(format!("host route {want} dev {host_veth} is missing"));
            }
        }
    }
    if !netns_path.exists() {
        problems.push(format!("network namespace {} does not exist", netns_path.display()));
        return Ok(problems);
    }
    let ifname_s = ifname.to_string();
    let inside = netns::run_async_in(netns_path, move || async move {
        let mut p = Vec::new();
        let nl = Netlink::new()?;
        let Some(l) = nl.link(&ifname_s).await? else {
            p.push(format!("interface {ifname_s} is missing in the pod"));
            return Ok::<_, anyhow::Error>(p);
        };
        if !l.up {
            p.push(format!("pod interface {ifname_s} is down"));
        }
        if !nl.addrs(&ifname_s).await?.contains(&(ip, 32)) {
            p.push(format!("pod interface {ifname_s} lacks address {ip}/32"));
        }
        let routes = nl.routes().await?;
        if !routes.iter().any(|r| r.dst.prefix_len() == 0 && r.gateway == Some(gateway) && r.oif == Some(l.index)) {
            p.push(format!("pod default route via {gateway} dev {ifname_s} is missing"));
        }
        if !routes.iter().any(|r| r.dst == Ipv4Net::new(gateway, 32).unwrap() && r.oif == Some(l.index)) {
            p.push(format!("pod route {gateway} dev {ifname_s} is missing"));
        }
        Ok(p)
    })
    .await??;
    problems.extend(inside);
    Ok(problems)
}
