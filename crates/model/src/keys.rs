//! The store's key layout. Every key lives under [`PREFIX`]; one writer per fact.
//!
//! | key | value | written by |
//! |---|---|---|
//! | `/fjord/v1/nodes/<node>` | [`NodeRecord`](crate::api::NodeRecord), under the node's lease | the node's agent |
//! | `/fjord/v1/podcidrs/<a.b.c.d-len>` | owning node name | the PodCIDR allocator (a transaction in the claiming agent) |
//! | `/fjord/v1/ipam/<node>/<ip>` | owner `"<containerID>/<ifname>"` | the node's agent (CNI ADD/DEL) |
//! | `/fjord/v1/attachments/<node>/<containerID>/<ifname>` | [`Attachment`](crate::api::Attachment) | the node's agent |
//! | `/fjord/v1/pods/<namespace>/<name>` | [`Pod`](crate::api::Pod) | `fjordctl pod` (stands in for the API server) |
//! | `/fjord/v1/services/<namespace>/<name>` | Service (JSON) | `fjordctl apply` |
//! | `/fjord/v1/endpointslices/<namespace>/<name>` | EndpointSlice (JSON) | `fjordctl apply` (selectorless services), or the agent owning the pods (`<service>-fjord-<node>`, under its node lease) |
//! | `/fjord/v1/clusterips/<ip>` | `<namespace>/<name>` of the Service holding it | `fjordctl apply` (allocation by transaction) |
//! | `/fjord/v1/heartbeats/<node>` | the node's wall clock in ms (under its lease) | fjord-agent, every `--heartbeat-interval`; peers measure the watch lag |
//! | `/fjord/v1/nodeports/<tcp\|udp>/<port>` | `<namespace>/<name>` of the Service holding it | `fjordctl apply` (allocation by transaction, 30000-32767) |
//! | `/fjord/v1/gatewayclasses/<name>` | GatewayClass (JSON, gateway.networking.k8s.io/v1) | `fjordctl apply` |
//! | `/fjord/v1/gateways/<namespace>/<name>` | Gateway (JSON) | `fjordctl apply` |
//! | `/fjord/v1/httproutes/<namespace>/<name>` | HTTPRoute (JSON) | `fjordctl apply` |
//! | `/fjord/v1/referencegrants/<namespace>/<name>` | ReferenceGrant (JSON) | `fjordctl apply` |
//! | `/fjord/v1/secrets/<namespace>/<name>` | Secret of type `kubernetes.io/tls` (JSON) | `fjordctl apply` |
//! | `/fjord/v1/status/<resource>/<namespace>/<name>` | the `status` of a Gateway API object (`<resource>` as above; GatewayClass: `status/gatewayclasses/<name>`) | the gateway controller (agent `--gateway`) |
//!
//! Spec and status live under different keys so that each has one writer: `apply` never
//! overwrites a status and the gateway never rewrites a spec; watches on the spec prefixes do not
//! fire for status writes.

use std::net::Ipv4Addr;

pub const PREFIX: &str = "/fjord/v1/";

pub fn node(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}
pub fn services_prefix() -> String {
    format!("{PREFIX}services/")
}
pub fn service(namespace: &str, name: &str) -> String {
    format!("{PREFIX}services/{namespace}/{name}")
}
pub fn endpointslices_prefix() -> String {
    format!("{PREFIX}endpointslices/")
}
pub fn endpointslice(namespace: &str, name: &str) -> String {
    format!("{PREFIX}endpointslices/{namespace}/{name}")
}
pub fn clusterip(ip: Ipv4Addr) -> String {
    format!("{PREFIX}clusterips/{ip}")
}
/// The allocation record of a nodePort (`proto` is `tcp` or `udp`).
pub fn nodeport(proto: &str, port: u16) -> String {
    format!("{PREFIX}nodeports/{}/{port}", proto.to_ascii_lowercase())
}
/// A node's heartbeat (its clock in ms), for the watch-lag metric.
pub fn heartbeat(node: &str) -> String {
    format!("{PREFIX}heartbeats/{node}")
}
pub fn heartbeats_prefix() -> String {
    format!("{PREFIX}heartbeats/")
}
pub fn nodeports_prefix() -> String {
    format!("{PREFIX}nodeports/")
}
/// Name of the EndpointSlice the agent of `node` writes for `service`.
pub fn agent_slice_name(service: &str, node: &str) -> String {
    format!("{service}-fjord-{node}")
}
pub fn nodes_prefix() -> String {
    format!("{PREFIX}nodes/")
}
pub fn podcidr_prefix() -> String {
    format!("{PREFIX}podcidrs/")
}
pub fn podcidr(cidr: ipnet::Ipv4Net) -> String {
    format!("{PREFIX}podcidrs/{}-{}", cidr.network(), cidr.prefix_len())
}
pub fn cidr_of_podcidr_key(key: &str) -> Option<ipnet::Ipv4Net> {
    let (ip, len) = key.rsplit('/').next()?.split_once('-')?;
    ipnet::Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()
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

/// Store resource names (plural, lower case, as in Kubernetes) of the kinds `fjordctl apply`
/// accepts besides Services and EndpointSlices. `None` for other kinds.
pub fn resource_of_kind(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "GatewayClass" => "gatewayclasses",
        "Gateway" => "gateways",
        "HTTPRoute" => "httproutes",
        "ReferenceGrant" => "referencegrants",
        "Secret" => "secrets",
        _ => return None,
    })
}
/// The resources of [`resource_of_kind`].
pub const EXTENSION_RESOURCES: [&str; 5] = ["gatewayclasses", "gateways", "httproutes", "referencegrants", "secrets"];

/// Prefix of a resource's objects: `/fjord/v1/<resource>/`.
pub fn resource_prefix(resource: &str) -> String {
    format!("{PREFIX}{resource}/")
}
/// Key of an object: `/fjord/v1/<resource>/<namespace>/<name>`, or `/fjord/v1/<resource>/<name>`
/// when `namespace` is empty (cluster-scoped).
pub fn object(resource: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{PREFIX}{resource}/{name}")
    } else {
        format!("{PREFIX}{resource}/{namespace}/{name}")
    }
}
/// Prefix of a resource's status records: `/fjord/v1/status/<resource>/`.
pub fn status_prefix(resource: &str) -> String {
    format!("{PREFIX}status/{resource}/")
}
/// Key of an object's status (same layout as [`object`] under `status/`).
pub fn status(resource: &str, namespace: &str, name: &str) -> String {
    object(&format!("status/{resource}"), namespace, name)
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

    #[test]
    fn gateway_keys() {
        assert_eq!(super::object("httproutes", "backend", "r"), "/fjord/v1/httproutes/backend/r");
        assert_eq!(super::object("gatewayclasses", "", "fjord"), "/fjord/v1/gatewayclasses/fjord");
        assert_eq!(super::status("httproutes", "backend", "r"), "/fjord/v1/status/httproutes/backend/r");
        assert!(super::status("gateways", "a", "b").starts_with(&super::status_prefix("gateways")));
        // status keys are not under any spec prefix
        for r in super::EXTENSION_RESOURCES {
            assert!(!super::status(r, "a", "b").starts_with(&super::resource_prefix(r)));
        }
        assert_eq!(super::resource_of_kind("HTTPRoute"), Some("httproutes"));
        assert_eq!(super::resource_of_kind("Service"), None);
    }

    #[test]
    fn podcidr_key_roundtrip() {
        let c: ipnet::Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(super::podcidr(c), "/fjord/v1/podcidrs/10.244.3.0-24");
        assert_eq!(super::cidr_of_podcidr_key(&super::podcidr(c)), Some(c));
        assert_eq!(super::cidr_of_podcidr_key("/fjord/v1/podcidrs/garbage"), None);
    }
}
