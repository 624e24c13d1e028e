//! Network namespaces and rtnetlink helpers, shared by the agent (pod
//! plumbing) and fjordctl (the dev cluster). No shelling out to `ip`.
pub mod link;
pub mod netns;

pub use link::{LinkInfo, Netlink, NetlinkError, RouteInfo};

/// The name of a pod's host-side veth: `fj` + 11 hex digits of a hash of the
/// container ID and interface name (interface names are limited to 15 bytes).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a 64: stable across versions and machines, no dependency needed for 11 hex digits.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("fj{:011x}", h & 0xfff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    #[test]
    fn veth_names_fit_and_differ() {
        let a = super::host_veth_name("abc", "eth0");
        let b = super::host_veth_name("abd", "eth0");
        let c = super::host_veth_name("abc", "eth1");
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("fj"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, super::host_veth_name("abc", "eth0"));
    }
}
