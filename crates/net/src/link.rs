//! rtnetlink helpers: links, addresses and routes in the current thread's
//! network namespace. Each call names what it did in its error.

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

/// Route protocol number that marks routes fjord owns (like `proto bird`), so the
/// agent can find and remove exactly its own routes.
pub const FJORD_ROUTE_PROTOCOL: u8 = 0x66;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

#[derive(Debug, thiserror::Error)]
#[error("netlink: {op}: {source}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub source: rtnetlink::Error,
}

impl NetlinkError {
    /// The errno the kernel answered, if any.
    pub fn errno(&self) -> Option<i32> {
        match &self.source {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// A dump the kernel interrupted because the table changed under it (EBUSY on
/// kernels that report NLM_F_DUMP_INTR as an error, or EINTR) is simply retried:
/// interfaces of other pods come and go while the agent lists them.
async fn dump_retry<T, F, Fut>(op: &str, mut dump: F) -> Result<Vec<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Vec<T>, rtnetlink::Error>>,
{
    let mut attempt = 0;
    loop {
        match dump().await {
            Err(rtnetlink::Error::NetlinkError(e))
                if attempt < 8 && matches!(e.code.map(|c| -c.get()), Some(libc::EBUSY) | Some(libc::EINTR)) =>
            {
                attempt += 1;
                tracing::debug!(op, attempt, "netlink dump interrupted; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(2 * attempt)).await;
            }
            r => return r.map_err(ctx(op)),
        }
    }
}

fn ctx(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError { op, source }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    pub master: Option<u32>,
}

fn link_info(m: &LinkMessage) -> LinkInfo {
    let mut li = LinkInfo {
        index: m.header.index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => li.name = n.clone(),
            LinkAttribute::Address(b) => li.mac = b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":"),
            LinkAttribute::Mtu(m) => li.mtu = *m,
            LinkAttribute::Controller(c) => li.master = Some(*c),
            _ => {}
        }
    }
    li
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope_link: bool,
    /// Installed by fjord (protocol [`FJORD_ROUTE_PROTOCOL`]).
    pub fjord: bool,
}

/// A netlink connection bound to the namespace of the thread that made it.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open a connection (in the current thread's namespace) and drive it on the current runtime.
    pub fn new() -> std::io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(link_info)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| -c.get()) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(ctx(format!("get link {name}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        dump_retry("list links", || async {
            let mut out = Vec::new();
            let mut s = self.handle.link().get().execute();
            while let Some(m) = s.try_next().await? {
                out.push(link_info(&m));
            }
            Ok(out)
        })
        .await
    }

    async fn require(&self, name: &str) -> Result<LinkInfo> {
        self.link(name).await?.ok_or_else(|| NetlinkError {
            op: format!("find link {name}"),
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// Create a veth pair `name` <-> `peer`.
    pub async fn add_veth(&self, name: &str, peer: &str, mtu: Option<u32>) -> Result<()> {
        let mut b = LinkVeth::new(name, peer);
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.handle.link().add(b.build()).execute().await.map_err(ctx(format!("create veth {name} <-> {peer}")))
    }

    pub async fn add_bridge(&self, name: &str) -> Result<()> {
        self.handle.link().add(LinkBridge::new(name).build()).execute().await.map_err(ctx(format!("create bridge {name}")))
    }

    /// Move link `name` into the namespace open as `ns`.
    pub async fn move_to_netns(&self, name: &str, ns: &std::fs::File) -> Result<()> {
        let li = self.require(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(li.index).setns_by_fd(ns.as_raw_fd()).build())
            .execute()
            .await
            .map_err(ctx(format!("move {name} to another network namespace")))
    }

    pub async fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        let li = self.require(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(li.index).name(new_name.to_string()).build())
            .execute()
            .await
            .map_err(ctx(format!("rename {name} to {new_name}")))
    }

    pub async fn set_up(&self, name: &str) -> Result<u32> {
        let li = self.require(name).await?;
        self.handle.link().set(LinkUnspec::new_with_index(li.index).up().build()).execute().await.map_err(ctx(format!("set {name} up")))?;
        Ok(li.index)
    }

    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<()> {
        let li = self.require(name).await?;
        let br = self.require(bridge).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(li.index).controller(br.index).build())
            .execute()
            .await
            .map_err(ctx(format!("attach {name} to bridge {bridge}")))
    }

    /// Delete a link; `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(li) = self.link(name).await? else { return Ok(false) };
        match self.handle.link().del(li.index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| -c.get()) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(ctx(format!("delete link {name}"))(e)),
        }
    }

    /// Add an IPv4 address; adding one that is already there is fine.
    pub async fn add_addr(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        let li = self.require(name).await?;
        match self.handle.address().add(li.index, IpAddr::V4(addr), prefix).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| -c.get()) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(ctx(format!("add address {addr}/{prefix} to {name}"))(e)),
        }
    }

    /// IPv4 addresses (with prefix length) on link `name`.
    pub async fn addrs(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>> {
        let li = self.require(name).await?;
        dump_retry(&format!("list addresses of {name}"), || async {
            let mut out = Vec::new();
            let mut s = self.handle.address().get().set_link_index_filter(li.index).execute();
            while let Some(m) = s.try_next().await? {
                if m.header.family != AddressFamily::Inet {
                    continue;
                }
                for a in &m.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                        out.push((*ip, m.header.prefix_len));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Add (or replace) an IPv4 route in the main table.
    pub async fn replace_route(&self, dst: Ipv4Net, gateway: Option<Ipv4Addr>, oif: Option<&str>, scope_link: bool) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst.addr(), dst.prefix_len());
        if let Some(gw) = gateway {
            b = b.gateway(gw);
        }
        if let Some(name) = oif {
            b = b.output_interface(self.require(name).await?.index);
        }
        if scope_link {
            b = b.scope(RouteScope::Link);
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("add route {dst}{}{}", gateway.map(|g| format!(" via {g}")).unwrap_or_default(), oif.map(|o| format!(" dev {o}")).unwrap_or_default())))
    }

    /// Add (or replace) a fjord-owned route to `dst` via `gateway`, optionally
    /// out of `oif` with `onlink` (the gateway is reachable on the link without a
    /// route of its own, as with VXLAN).
    pub async fn replace_fjord_route(&self, dst: Ipv4Net, gateway: Ipv4Addr, oif: Option<&str>, onlink: bool) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(gateway)
            .protocol(RouteProtocol::Other(FJORD_ROUTE_PROTOCOL));
        if let Some(name) = oif {
            b = b.output_interface(self.require(name).await?.index);
        }
        if onlink {
            b = b.onlink();
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("add route {dst} via {gateway}{}", oif.map(|o| format!(" dev {o}")).unwrap_or_default())))
    }

    /// A VXLAN device (VNI `vni`, UDP `port`, source `local`, over `dev`), no learning:
    /// the agent manages its FDB and neighbour entries.
    pub async fn add_vxlan(&self, name: &str, vni: u32, local: Ipv4Addr, dev: &str, port: u16, mtu: u32) -> Result<()> {
        let underlay = self.require(dev).await?;
        let m = LinkVxlan::new(name, vni).dev(underlay.index).local(local).port(port).learning(false).mtu(mtu).build();
        self.handle.link().add(m).execute().await.map_err(ctx(format!("create vxlan {name} (vni {vni}, local {local}, dev {dev})")))
    }

    /// Permanent neighbour entry `ip lladdr mac dev link`.
    pub async fn replace_neighbour(&self, link: &str, ip: Ipv4Addr, mac: &[u8]) -> Result<()> {
        let li = self.require(link).await?;
        self.handle
            .neighbours()
            .add(li.index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("add neighbour {ip} on {link}")))
    }

    /// FDB entry on a VXLAN device: frames for `mac` go to the VTEP at `dst`.
    pub async fn replace_fdb(&self, link: &str, mac: &[u8], dst: Ipv4Addr) -> Result<()> {
        let li = self.require(link).await?;
        self.handle
            .neighbours()
            .add_bridge(li.index, mac)
            .destination(IpAddr::V4(dst))
            // NTF_SELF: the entry belongs to the vxlan device itself (`bridge fdb … self`).
            .flags(netlink_packet_route::neighbour::NeighbourFlags::Own)
            .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("add fdb entry on {link} to {dst}")))
    }

    /// Delete a route exactly as listed (destination, gateway, interface).
    pub async fn delete_route_info(&self, r: &RouteInfo) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(r.dst.addr(), r.dst.prefix_len());
        if let Some(g) = r.gateway {
            b = b.gateway(g);
        }
        if let Some(o) = r.oif {
            b = b.output_interface(o);
        }
        if r.fjord {
            b = b.protocol(RouteProtocol::Other(FJORD_ROUTE_PROTOCOL));
        }
        match self.handle.route().del(b.build()).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if matches!(e.code.map(|c| -c.get()), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(ctx(format!("delete route {}", r.dst))(e)),
        }
    }

    /// Delete an IPv4 route by destination; missing is fine.
    pub async fn delete_route(&self, dst: Ipv4Net) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst.addr(), dst.prefix_len()).build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if matches!(e.code.map(|c| -c.get()), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(ctx(format!("delete route {dst}"))(e)),
        }
    }

    /// IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<RouteInfo>> {
        dump_retry("list routes", || async {
            let mut out = Vec::new();
            let mut s = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
            while let Some(m) = s.try_next().await? {
                if let Some(r) = route_info(&m) {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await
    }
}

fn route_info(m: &RouteMessage) -> Option<RouteInfo> {
    if m.header.table != 254 {
        return None; // main table only
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(RouteInfo {
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        scope_link: m.header.scope == RouteScope::Link,
        fjord: m.header.protocol == RouteProtocol::Other(FJORD_ROUTE_PROTOCOL),
    })
}
