//! The store's key layout. Every key lives under [`PREFIX`]; one writer per fact.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `/fjord/v1/nodes/<node>` | [`NodeRecord`](crate::api::NodeRecord) | the node's agent |
//! | `/fjord/v1/ipam/<node>/<ip>` | owner `"<containerID>/<ifname>"` | the node's agent (CNI ADD/DEL) |
//! | `/fjord/v1/attachments/<node>/<containerID>/<ifname>` | [`Attachment`](crate::api::Attachment) | the node's agent |
//! | `/fjord/v1/pods/<namespace>/<name>` | [`Pod`](crate::api::Pod) | `fjordctl pod` (stands in for the API server) |

use std::net::Ipv4Addr;

pub const PREFIX: &str = "/fjord/v1/";

pub fn node(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}
pub fn ipam_prefix(node: &str) -> String {
    format!("{PREFIX}ipam/{node}/")
}
pub fn ipam(node: &str, ip: Ipv4Addr) -> String {
    format!("{PREFIX}ipam/{node}/{ip}")
}
pub fn attachments_prefix(node: &str) -> String {
    format!("{PREFIX}attachments/{node}/")
}
pub fn attachment(node: &str, container_id: &str, ifname: &str) -> String {
    format!("{PREFIX}attachments/{node}/{container_id}/{ifname}")
}
pub fn pods_prefix() -> String {
    format!("{PREFIX}pods/")
}
pub fn pod(namespace: &str, name: &str) -> String {
    format!("{PREFIX}pods/{namespace}/{name}")
}

/// The IP of an IPAM key (`.../ipam/<node>/<ip>`), if it is one.
pub fn ip_of_ipam_key(key: &str) -> Option<Ipv4Addr> {
    key.rsplit('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipam_key_roundtrip() {
        let k = super::ipam("n1", "10.244.1.7".parse().unwrap());
        assert_eq!(k, "/fjord/v1/ipam/n1/10.244.1.7");
        assert!(k.starts_with(&super::ipam_prefix("n1")));
        assert_eq!(super::ip_of_ipam_key(&k), Some("10.244.1.7".parse().unwrap()));
    }
}
