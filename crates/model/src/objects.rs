//! The Kubernetes objects `fjordctl apply -f FILE` accepts for the eBPF
//! kube-proxy replacement: core/v1 `Service` and discovery.k8s.io/v1
//! `EndpointSlice`.
//!
//! The types are hand-written with the real Kubernetes field names and
//! `deny_unknown_fields`, so a typo in a manifest is an error instead of a
//! silently ignored field. [`parse_manifests`] reads a multi-document YAML (or
//! JSON) text, checks every object against Kubernetes' rules plus fjord's own
//! limits (IPv4 only, TCP/UDP only, no ExternalName) and returns either every
//! object or the first error, naming the document, object and field path.
//! Pure: no I/O.

use ipnet::Ipv4Net;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The service CIDR used when nothing else is configured.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// The label that links an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The range a `nodePort` must fall in (Kubernetes' default).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// ClientIP session affinity timeout when none is given (Kubernetes' default: 3 hours).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT: u32 = 10800;
/// The largest ClientIP session affinity timeout Kubernetes allows (1 day).
pub const MAX_SESSION_AFFINITY_TIMEOUT: u32 = 86400;

fn default_ns() -> String {
    "default".to_string()
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/// Standard object metadata (the subset fjord keeps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// Set by Kubernetes on controller-made objects (e.g. EndpointSlices owned by a Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

impl Default for ObjectMeta {
    fn default() -> Self {
        ObjectMeta {
            name: String::new(),
            namespace: default_ns(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            uid: None,
            resource_version: None,
            generation: None,
            creation_timestamp: None,
            generate_name: None,
            owner_references: Vec::new(),
        }
    }
}

/// L4 protocol of a port. fjord's datapath handles TCP and UDP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "TCP" => Ok(Protocol::TCP),
            "UDP" => Ok(Protocol::UDP),
            "SCTP" => Err(de::Error::custom(
                "protocol SCTP is not supported by fjord; use TCP or UDP",
            )),
            other => Err(de::Error::custom(format!(
                "unknown protocol {other:?}; use TCP or UDP (upper-case)"
            ))),
        }
    }
}

/// A port number or a named port (`targetPort`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(p) => write!(f, "{p}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(p) => s.serialize_u16(*p),
            IntOrString::String(v) => s.serialize_str(v),
        }
    }
}

fn port_out_of_range<E: de::Error>(v: impl fmt::Display) -> E {
    E::custom(format!("{v} is not a valid port (1-65535)"))
}

fn port_from_i128<E: de::Error>(v: i128) -> Result<u16, E> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(port_out_of_range(v))
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                port_from_i128(v as i128).map(IntOrString::Int)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                port_from_i128(v as i128).map(IntOrString::Int)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A port number 1-65535 with a helpful error message.
struct PortNum(u16);

impl<'de> Deserialize<'de> for PortNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortNum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortNum, E> {
                port_from_i128(v as i128).map(PortNum)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortNum, E> {
                port_from_i128(v as i128).map(PortNum)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PortNum, E> {
                Err(port_out_of_range(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortNum, E> {
                Err(E::custom(format!(
                    "{v:?} is not a valid port: write a number 1-65535 without quotes"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

fn de_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    PortNum::deserialize(d).map(|p| p.0)
}

fn de_opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    Option::<PortNum>::deserialize(d).map(|p| p.map(|p| p.0))
}

/// `spec.type`. ExternalName is not supported by fjord.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
    /// NodePort and LoadBalancer services are reachable from outside the cluster.
    pub fn is_external(&self) -> bool {
        matches!(self, ServiceType::NodePort | ServiceType::LoadBalancer)
    }
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ServiceType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "ClusterIP" => Ok(ServiceType::ClusterIP),
            "NodePort" => Ok(ServiceType::NodePort),
            "LoadBalancer" => Ok(ServiceType::LoadBalancer),
            "ExternalName" => Err(de::Error::custom(
                "type ExternalName is not supported by fjord; use ClusterIP, NodePort or LoadBalancer",
            )),
            other => Err(de::Error::custom(format!(
                "unknown service type {other:?}; use ClusterIP, NodePort or LoadBalancer"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(deserialize_with = "de_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default, deserialize_with = "de_opt_port", skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// The port on the backends: `targetPort` if it is a number, else `port`.
    /// (A named targetPort is resolved through the EndpointSlice's ports.)
    pub fn target_port_number(&self) -> Option<u16> {
        match &self.target_port {
            None => Some(self.port),
            Some(IntOrString::Int(p)) => Some(*p),
            Some(IntOrString::String(_)) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(rename = "type", default)]
    pub type_: ServiceType,
    /// `"None"` makes the service headless; `""` or absent means "allocate one".
    #[serde(rename = "clusterIP", default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(rename = "externalIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_not_ready_addresses: Option<bool>,
    /// Only `["IPv4"]` (or empty) is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<String>,
    /// `SingleStack` or `PreferDualStack` (which is single-stack IPv4 here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<String>,
    /// LoadBalancer only: the address the load balancer should use.
    #[serde(rename = "loadBalancerIP", default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// LoadBalancer only: client CIDRs allowed to reach the load balancer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_load_balancer_node_ports: Option<bool>,
    /// LoadBalancer with externalTrafficPolicy Local only.
    #[serde(default, deserialize_with = "de_opt_port", skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerIngress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `VIP` or `Proxy` (Kubernetes ≥ 1.30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerStatus {
    #[serde(default)]
    pub ingress: Vec<LoadBalancerIngress>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceStatus>,
}

impl Service {
    /// `clusterIP: None`.
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some("None")
            || self.spec.cluster_ips.first().map(String::as_str) == Some("None")
    }

    /// The given cluster IP, if it is an address (not absent, empty or `None`).
    pub fn cluster_ip(&self) -> Option<Ipv4Addr> {
        self.spec
            .cluster_ip
            .as_deref()
            .or(self.spec.cluster_ips.first().map(String::as_str))
            .and_then(|s| s.parse().ok())
    }

    /// With `sessionAffinity: ClientIP`: the given timeout or 10800 s; else `None`.
    pub fn session_affinity_timeout(&self) -> Option<u32> {
        if self.spec.session_affinity.as_deref() != Some("ClientIP") {
            return None;
        }
        Some(
            self.spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_SESSION_AFFINITY_TIMEOUT),
        )
    }

    /// Load balancer addresses from `status.loadBalancer.ingress[].ip`.
    pub fn load_balancer_ips(&self) -> Vec<Ipv4Addr> {
        self.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .map(|lb| lb.ingress.iter().filter_map(|i| i.ip).collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<EndpointTargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Topology hints (accepted and kept; fjord does not route by zone yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<EndpointHints>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointHints {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_zones: Vec<NamedHint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_nodes: Vec<NamedHint>,
}

/// `{name: ...}` entry of `hints.forZones` / `hints.forNodes`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedHint {
    pub name: String,
}

impl Endpoint {
    /// Kubernetes: an absent `ready` is interpreted as ready.
    pub fn is_ready(&self) -> bool {
        self.conditions.ready.unwrap_or(true)
    }
    /// Kubernetes: an absent `serving` takes the value of `ready`.
    pub fn is_serving(&self) -> bool {
        self.conditions.serving.unwrap_or_else(|| self.is_ready())
    }
    /// Kubernetes: an absent `terminating` is interpreted as not terminating.
    pub fn is_terminating(&self) -> bool {
        self.conditions.terminating.unwrap_or(false)
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de_opt_port", skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    /// The Service this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }
}

/// One object `fjordctl apply` accepts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // a handful per apply; boxing would only add noise
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    /// A kind validated by an [`ExtensionKinds`] (the Gateway API kinds and TLS Secrets,
    /// validated by fjord-gateway).
    Extension(ExtObject),
}

impl Object {
    pub fn kind(&self) -> &str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Extension(x) => &x.kind,
        }
    }
    /// Metadata of the core kinds (extension objects keep theirs in [`ExtObject::value`]).
    pub fn metadata(&self) -> Option<&ObjectMeta> {
        match self {
            Object::Service(s) => Some(&s.metadata),
            Object::EndpointSlice(e) => Some(&e.metadata),
            Object::Extension(_) => None,
        }
    }
    /// The namespace; empty for cluster-scoped kinds (GatewayClass).
    pub fn namespace(&self) -> &str {
        match self {
            Object::Service(s) => &s.metadata.namespace,
            Object::EndpointSlice(e) => &e.metadata.namespace,
            Object::Extension(x) => x.namespace.as_deref().unwrap_or(""),
        }
    }
    pub fn name(&self) -> &str {
        match self {
            Object::Service(s) => &s.metadata.name,
            Object::EndpointSlice(e) => &e.metadata.name,
            Object::Extension(x) => &x.name,
        }
    }
    /// `"Service/ns/name"`, or `"GatewayClass/name"` for cluster-scoped kinds.
    pub fn key(&self) -> String {
        if self.namespace().is_empty() {
            format!("{}/{}", self.kind(), self.name())
        } else {
            format!("{}/{}/{}", self.kind(), self.namespace(), self.name())
        }
    }
}

/// An object of a kind that an [`ExtensionKinds`] validated. The model checks the
/// document frame (apiVersion, kind, metadata.name/namespace); the extension checks the rest
/// and returns the canonical object.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtObject {
    pub api_version: String,
    pub kind: String,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
    /// The whole object as JSON (apiVersion, kind, metadata, spec/data…), without `status`.
    pub value: serde_json::Value,
}

impl Serialize for ExtObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl ExtObject {
    /// Keep what the store owns across re-applies: `metadata.creationTimestamp` (route
    /// precedence: the oldest route wins) from `prev`, and `metadata.generation`, which starts
    /// at 1 and grows by one whenever anything outside `metadata` changes (status conditions
    /// report it as `observedGeneration`). `now` is an RFC 3339 timestamp.
    pub fn carry_over(&mut self, prev: Option<&serde_json::Value>, now: &str) {
        let body = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                m.remove("status");
            }
            v
        };
        let prev_meta = prev.and_then(|p| p.get("metadata"));
        let prev_gen = prev_meta.and_then(|m| m.get("generation")).and_then(|g| g.as_i64());
        let created = prev_meta.and_then(|m| m.get("creationTimestamp")).and_then(|c| c.as_str()).map(str::to_string);
        let generation = match (prev, prev_gen) {
            (Some(p), Some(g)) if body(p) == body(&self.value) => g,
            (Some(_), Some(g)) => g + 1,
            _ => 1,
        };
        if let Some(m) = self.value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.insert("generation".into(), generation.into());
            m.insert("creationTimestamp".into(), created.unwrap_or_else(|| now.to_string()).into());
        }
    }
}

/// `2024-05-01T10:00:00Z` for seconds since the Unix epoch (UTC; the form Kubernetes uses for
/// `creationTimestamp` and `lastTransitionTime`, which sorts by time as text).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86400) as i64;
    let rem = unix_secs % 86400;
    // civil_from_days (H. Hinnant)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A problem found by an [`ExtensionKinds`] validator: field path (e.g.
/// `spec.rules[0].matches[0].path.value`) and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Kinds validated outside this crate. The model cannot depend on fjord-gateway (which depends
/// on the model for Services, EndpointSlices and the key layout), so the gateway plugs its
/// parser and validation in here: [`parse_manifests_with`] hands it every document of a kind it
/// names, and reports its errors with the document and object like every other error.
pub trait ExtensionKinds: Send + Sync {
    /// The apiVersions accepted for `kind`, or `None` if the kind is not handled.
    fn api_versions(&self, kind: &str) -> Option<&'static [&'static str]>;
    /// Is `kind` cluster-scoped (no namespace)?
    fn cluster_scoped(&self, kind: &str) -> bool;
    /// Human-readable list of the handled kinds, for error messages.
    fn describe(&self) -> &'static str;
    /// Parse and validate one document (already known to be of a handled kind and apiVersion).
    fn validate(&self, api_version: &str, kind: &str, value: serde_norway::Value) -> Result<ExtObject, FieldError>;
}

/// Dispatches on `kind`; no semantic validation (use [`parse_manifests`] for that).
impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => serde_json::from_value(v)
                .map(Object::Service)
                .map_err(de::Error::custom),
            Some("EndpointSlice") => serde_json::from_value(v)
                .map(Object::EndpointSlice)
                .map_err(de::Error::custom),
            Some(other) => Err(de::Error::custom(format!(
                "unsupported kind {other:?}; expected Service or EndpointSlice"
            ))),
            None => Err(de::Error::custom("missing kind; expected Service or EndpointSlice")),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors and context
// ---------------------------------------------------------------------------

/// Why a manifest was refused, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.display())]
pub struct ManifestError {
    /// 1-based position of the YAML document in the text.
    pub document: usize,
    pub kind: Option<String>,
    /// `"ns/name"`.
    pub object: Option<String>,
    /// Field path, e.g. `spec.ports[1].port`; empty when the whole document is at fault.
    pub field: String,
    pub reason: String,
}

impl ManifestError {
    /// `document 2 (Service default/web): spec.ports[1].port: 70000 is not a valid port (1-65535)`
    pub fn display(&self) -> String {
        let mut s = format!("document {}", self.document);
        match (&self.kind, &self.object) {
            (Some(k), Some(o)) => s.push_str(&format!(" ({k} {o})")),
            (Some(k), None) => s.push_str(&format!(" ({k})")),
            (None, Some(o)) => s.push_str(&format!(" ({o})")),
            (None, None) => {}
        }
        s.push_str(": ");
        if !self.field.is_empty() {
            s.push_str(&self.field);
            s.push_str(": ");
        }
        s.push_str(&self.reason);
        s
    }
}

/// Cluster settings the validation depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationContext {
    pub service_cidr: Ipv4Net,
}

impl Default for ValidationContext {
    fn default() -> Self {
        ValidationContext {
            service_cidr: DEFAULT_SERVICE_CIDR.parse().expect("valid default service CIDR"),
        }
    }
}

/// A field-level problem before document/object context is attached.
#[derive(Debug)]
struct Fe {
    field: String,
    reason: String,
}

fn fe(field: impl Into<String>, reason: impl Into<String>) -> Fe {
    Fe {
        field: field.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Name rules
// ---------------------------------------------------------------------------

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: ≤63, lower-case alphanumerics and '-', starts and ends alphanumeric.
fn check_dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("is {} characters long; the maximum is 63", s.len()));
    }
    if !s.chars().all(|c| is_lower_alnum(c) || c == '-')
        || !s.starts_with(is_lower_alnum)
        || !s.ends_with(is_lower_alnum)
    {
        return Err("must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit".into());
    }
    Ok(())
}

/// RFC 1035 label: an RFC 1123 label that starts with a letter (Kubernetes' rule for Service names).
fn check_dns1035_label(s: &str) -> Result<(), String> {
    check_dns1123_label(s)?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("must start with a lower-case letter (RFC 1035 label)".into());
    }
    Ok(())
}

/// RFC 1123 subdomain: ≤253, dot-separated RFC 1123 labels.
fn check_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("is {} characters long; the maximum is 253", s.len()));
    }
    for part in s.split('.') {
        if part.is_empty()
            || !part.chars().all(|c| is_lower_alnum(c) || c == '-')
            || !part.starts_with(is_lower_alnum)
            || !part.ends_with(is_lower_alnum)
        {
            return Err("must be a DNS subdomain: lower-case letters, digits, '-' and '.', each part starting and ending with a letter or digit".into());
        }
    }
    Ok(())
}

/// IANA_SVC_NAME: ≤15, lower-case alphanumerics and '-', at least one letter,
/// no leading, trailing or double '-'.
fn check_iana_svc_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 15 {
        return Err(format!("is {} characters long; a port name has at most 15", s.len()));
    }
    if !s.chars().all(|c| is_lower_alnum(c) || c == '-') {
        return Err("may only contain lower-case letters, digits and '-'".into());
    }
    if !s.chars().any(|c| c.is_ascii_lowercase()) {
        return Err("must contain at least one letter".into());
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not start or end with '-' or contain '--'".into());
    }
    Ok(())
}

fn is_label_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// The "name" part of a label key, and label values: ≤63,
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn check_label_token(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err(format!("is {} characters long; the maximum is 63", s.len()));
    }
    if !s.chars().all(is_label_name_char)
        || !s.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !s.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err("may only contain letters, digits, '-', '_' and '.', and must start and end with a letter or digit".into());
    }
    Ok(())
}

fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        check_dns1123_subdomain(p).map_err(|e| format!("the prefix {p:?} {e}"))?;
    }
    if name.is_empty() {
        return Err("the name part must not be empty".into());
    }
    check_label_token(name).map_err(|e| format!("the name part {name:?} {e}"))
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    check_label_token(v)
}

fn check_labels(map: &BTreeMap<String, String>, field: &str, values: bool) -> Result<(), Fe> {
    for (k, v) in map {
        let f = format!("{field}[{k:?}]");
        check_label_key(k).map_err(|e| fe(&f, format!("key {k:?} is not a valid key: {e}; rename it")))?;
        if values {
            check_label_value(v).map_err(|e| fe(&f, format!("value {v:?} is not a valid label value: {e}")))?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum NameRule {
    Dns1035Label,
    Dns1123Subdomain,
}

fn check_meta(m: &ObjectMeta, rule: NameRule) -> Result<(), Fe> {
    let name_check = match rule {
        NameRule::Dns1035Label => check_dns1035_label(&m.name),
        NameRule::Dns1123Subdomain => check_dns1123_subdomain(&m.name),
    };
    name_check.map_err(|e| fe("metadata.name", format!("name {:?} {e}; rename the object", m.name)))?;
    check_dns1123_label(&m.namespace).map_err(|e| {
        fe(
            "metadata.namespace",
            format!("namespace {:?} {e}; use a valid namespace name", m.namespace),
        )
    })?;
    check_labels(&m.labels, "metadata.labels", true)?;
    check_labels(&m.annotations, "metadata.annotations", false)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Semantic validation
// ---------------------------------------------------------------------------

fn check_cluster_ip(s: &str, field: &str, ctx: &ValidationContext) -> Result<(), Fe> {
    if s.is_empty() || s == "None" {
        return Ok(());
    }
    let cidr = ctx.service_cidr;
    let ip: Ipv4Addr = match s.parse() {
        Ok(ip) => ip,
        Err(_) if s.parse::<Ipv6Addr>().is_ok() => {
            return Err(fe(
                field,
                format!("{s} is an IPv6 address; fjord is IPv4-only: use an address from {cidr} or leave it out"),
            ))
        }
        Err(_) => {
            return Err(fe(
                field,
                format!("{s:?} is not a valid IPv4 address; use an address from {cidr}, \"None\" for a headless service, or leave it out"),
            ))
        }
    };
    if !cidr.contains(&ip) {
        return Err(fe(
            field,
            format!("{ip} is outside the service CIDR {cidr}; use an address inside it or leave it out to have one allocated"),
        ));
    }
    if ip == cidr.network() || ip == cidr.broadcast() {
        return Err(fe(
            field,
            format!("{ip} is the network or broadcast address of the service CIDR {cidr}; pick another address"),
        ));
    }
    Ok(())
}

fn validate_service(s: &Service, ctx: &ValidationContext) -> Result<(), Fe> {
    check_meta(&s.metadata, NameRule::Dns1035Label)?;
    let spec = &s.spec;
    let headless = s.is_headless();
    let ty = spec.type_;

    // clusterIP / clusterIPs
    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip(ip, "spec.clusterIP", ctx)?;
    }
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        let f = format!("spec.clusterIPs[{i}]");
        if i > 0 {
            return Err(fe(f, "fjord is single-stack IPv4: give at most one cluster IP"));
        }
        check_cluster_ip(ip, &f, ctx)?;
        if let Some(c) = spec.cluster_ip.as_deref().filter(|c| !c.is_empty()) {
            if c != ip {
                return Err(fe(f, format!("{ip:?} differs from spec.clusterIP {c:?}; they must be equal")));
            }
        }
    }

    // IP families
    for (i, fam) in spec.ip_families.iter().enumerate() {
        let f = format!("spec.ipFamilies[{i}]");
        if fam == "IPv6" {
            return Err(fe(f, "IPv6 is not supported by fjord (IPv4 only); use [IPv4] or leave ipFamilies out"));
        }
        if fam != "IPv4" {
            return Err(fe(f, format!("unknown IP family {fam:?}; use IPv4")));
        }
        if i > 0 {
            return Err(fe(f, "fjord is single-stack IPv4: list IPv4 once"));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") | Some("PreferDualStack") => {}
        Some("RequireDualStack") => {
            return Err(fe(
                "spec.ipFamilyPolicy",
                "RequireDualStack is not supported by fjord (IPv4 only); use SingleStack",
            ))
        }
        Some(other) => {
            return Err(fe(
                "spec.ipFamilyPolicy",
                format!("unknown policy {other:?}; use SingleStack or PreferDualStack"),
            ))
        }
    }

    if headless && ty != ServiceType::ClusterIP {
        return Err(fe(
            "spec.type",
            format!("a headless Service (clusterIP: None) cannot be type {ty}; use type ClusterIP or give it a cluster IP"),
        ));
    }

    // ports
    if spec.ports.is_empty() && !headless {
        return Err(fe(
            "spec.ports",
            "a Service needs at least one port; add one, or set clusterIP: None for a headless service",
        ));
    }
    let multi = spec.ports.len() > 1;
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut port_protos: HashMap<(u16, Protocol), usize> = HashMap::new();
    let mut node_ports: HashMap<(u16, Protocol), usize> = HashMap::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let base = format!("spec.ports[{i}]");
        match p.name.as_deref() {
            None | Some("") if multi => {
                return Err(fe(
                    format!("{base}.name"),
                    "a Service with more than one port needs a unique name on every port; add a name such as \"http\"",
                ))
            }
            None | Some("") => {}
            Some(n) => {
                check_dns1123_label(n).map_err(|e| fe(format!("{base}.name"), format!("port name {n:?} {e}")))?;
                if let Some(j) = names.insert(n, i) {
                    return Err(fe(
                        format!("{base}.name"),
                        format!("duplicate port name {n:?} (also spec.ports[{j}]); give every port a unique name"),
                    ));
                }
            }
        }
        if p.port == 0 {
            return Err(fe(format!("{base}.port"), "0 is not a valid port (1-65535)"));
        }
        if let Some(j) = port_protos.insert((p.port, p.protocol), i) {
            return Err(fe(
                format!("{base}.port"),
                format!("duplicate port {}/{} (also spec.ports[{j}]); each port and protocol may appear once", p.port, p.protocol),
            ));
        }
        match &p.target_port {
            Some(IntOrString::Int(0)) => {
                return Err(fe(format!("{base}.targetPort"), "0 is not a valid port (1-65535)"))
            }
            Some(IntOrString::String(n)) => check_iana_svc_name(n).map_err(|e| {
                fe(
                    format!("{base}.targetPort"),
                    format!("{n:?} is neither a port number nor a valid port name: it {e}"),
                )
            })?,
            _ => {}
        }
        if let Some(np) = p.node_port {
            let f = format!("{base}.nodePort");
            if headless {
                return Err(fe(f, "a headless Service (clusterIP: None) cannot have a nodePort; remove it"));
            }
            if !ty.is_external() {
                return Err(fe(
                    f,
                    format!("nodePort is only allowed when spec.type is NodePort or LoadBalancer (this Service is {ty}); remove it or change spec.type"),
                ));
            }
            if !NODE_PORT_RANGE.contains(&np) {
                return Err(fe(
                    f,
                    format!("{np} is outside the node port range {}-{}; pick a port in it or leave it out", NODE_PORT_RANGE.start(), NODE_PORT_RANGE.end()),
                ));
            }
            if let Some(j) = node_ports.insert((np, p.protocol), i) {
                return Err(fe(
                    f,
                    format!("duplicate nodePort {np}/{} (also spec.ports[{j}]); every port needs its own nodePort", p.protocol),
                ));
            }
        }
    }

    // session affinity
    let client_ip = match spec.session_affinity.as_deref() {
        None | Some("None") => false,
        Some("ClientIP") => true,
        Some(other) => {
            return Err(fe(
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?}; use None or ClientIP"),
            ))
        }
    };
    if let Some(cfg) = &spec.session_affinity_config {
        if !client_ip {
            return Err(fe(
                "spec.sessionAffinityConfig",
                "only allowed with sessionAffinity: ClientIP; remove it or set sessionAffinity: ClientIP",
            ));
        }
        if let Some(t) = cfg.client_ip.as_ref().and_then(|c| c.timeout_seconds) {
            if !(1..=MAX_SESSION_AFFINITY_TIMEOUT).contains(&t) {
                return Err(fe(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is out of range; use 1-{MAX_SESSION_AFFINITY_TIMEOUT} seconds"),
                ));
            }
        }
    }

    // traffic policies
    if let Some(etp) = spec.external_traffic_policy.as_deref() {
        let f = "spec.externalTrafficPolicy";
        if etp != "Cluster" && etp != "Local" {
            return Err(fe(f, format!("unknown policy {etp:?}; use Cluster or Local")));
        }
        if !ty.is_external() && spec.external_ips.is_empty() {
            return Err(fe(
                f,
                format!("only allowed for type NodePort or LoadBalancer or with externalIPs (this Service is {ty}); remove it"),
            ));
        }
    }
    if let Some(itp) = spec.internal_traffic_policy.as_deref() {
        if itp != "Cluster" && itp != "Local" {
            return Err(fe(
                "spec.internalTrafficPolicy",
                format!("unknown policy {itp:?}; use Cluster or Local"),
            ));
        }
    }

    // external IPs
    for (i, ip) in spec.external_ips.iter().enumerate() {
        let f = format!("spec.externalIPs[{i}]");
        if ctx.service_cidr.contains(ip) {
            return Err(fe(
                f,
                format!("{ip} is inside the service CIDR {}; external IPs must be outside it: use an address that reaches the nodes", ctx.service_cidr),
            ));
        }
        if ip.is_unspecified() || ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_broadcast() {
            return Err(fe(f, format!("{ip} is a special address and cannot be an external IP; use a unicast address that reaches the nodes")));
        }
        if let Some(j) = spec.external_ips[..i].iter().position(|o| o == ip) {
            return Err(fe(f, format!("duplicate external IP {ip} (also spec.externalIPs[{j}]); list it once")));
        }
    }

    // load balancer fields
    if !spec.load_balancer_source_ranges.is_empty() && ty != ServiceType::LoadBalancer {
        return Err(fe(
            "spec.loadBalancerSourceRanges",
            format!("only allowed for type LoadBalancer (this Service is {ty}); remove it"),
        ));
    }
    if spec.load_balancer_ip.is_some() && ty != ServiceType::LoadBalancer {
        return Err(fe(
            "spec.loadBalancerIP",
            format!("only allowed for type LoadBalancer (this Service is {ty}); remove it"),
        ));
    }
    if let Some(hc) = spec.health_check_node_port {
        let f = "spec.healthCheckNodePort";
        if ty != ServiceType::LoadBalancer || spec.external_traffic_policy.as_deref() != Some("Local") {
            return Err(fe(
                f,
                "only allowed for type LoadBalancer with externalTrafficPolicy: Local; remove it",
            ));
        }
        if !NODE_PORT_RANGE.contains(&hc) {
            return Err(fe(
                f,
                format!("{hc} is outside the node port range {}-{}", NODE_PORT_RANGE.start(), NODE_PORT_RANGE.end()),
            ));
        }
    }

    // selector
    if let Some(sel) = &spec.selector {
        check_labels(sel, "spec.selector", true)?;
    }

    // status
    if let Some(lb) = s.status.as_ref().and_then(|st| st.load_balancer.as_ref()) {
        for (i, ing) in lb.ingress.iter().enumerate() {
            if ing.ip.is_none() && ing.hostname.is_none() {
                return Err(fe(
                    format!("status.loadBalancer.ingress[{i}]"),
                    "an ingress entry needs an ip or a hostname; add one or remove the entry",
                ));
            }
        }
    }
    Ok(())
}

fn validate_endpoint_slice(e: &EndpointSlice) -> Result<(), Fe> {
    check_meta(&e.metadata, NameRule::Dns1123Subdomain)?;
    check_address_type(&e.address_type)?;
    match e.service_name() {
        None => {
            return Err(fe(
                "metadata.labels",
                format!("label {SERVICE_NAME_LABEL} is missing; set it to the name of the Service this slice belongs to"),
            ))
        }
        Some(svc) => check_dns1035_label(svc).map_err(|err| {
            fe(
                format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
                format!("{svc:?} is not a valid Service name: it {err}"),
            )
        })?,
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        let base = format!("endpoints[{i}]");
        if ep.addresses.is_empty() {
            return Err(fe(
                format!("{base}.addresses"),
                "an endpoint needs at least one address; add the pod's IPv4 address",
            ));
        }
        if let Some(h) = &ep.hostname {
            check_dns1123_label(h).map_err(|err| fe(format!("{base}.hostname"), format!("hostname {h:?} {err}")))?;
        }
        if let Some(n) = &ep.node_name {
            check_dns1123_subdomain(n).map_err(|err| fe(format!("{base}.nodeName"), format!("node name {n:?} {err}")))?;
        }
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, p) in e.ports.iter().enumerate() {
        let base = format!("ports[{i}]");
        let name = p.name.as_deref().unwrap_or("");
        if !name.is_empty() {
            check_dns1123_label(name).map_err(|err| fe(format!("{base}.name"), format!("port name {name:?} {err}")))?;
        }
        if let Some(j) = names.insert(name, i) {
            return Err(fe(
                format!("{base}.name"),
                format!("duplicate port name {name:?} (also ports[{j}]); every port in a slice needs a unique name"),
            ));
        }
        if p.port == Some(0) {
            return Err(fe(format!("{base}.port"), "0 is not a valid port (1-65535)"));
        }
    }
    Ok(())
}

fn check_address_type(t: &str) -> Result<(), Fe> {
    match t {
        "IPv4" => Ok(()),
        "IPv6" | "FQDN" => Err(fe(
            "addressType",
            format!("addressType {t} is not supported by fjord (IPv4 only); use IPv4"),
        )),
        other => Err(fe(
            "addressType",
            format!("unknown addressType {other:?}; use IPv4"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

const SUPPORTED: &str = "Service (apiVersion v1), EndpointSlice (apiVersion discovery.k8s.io/v1) and List (apiVersion v1)";

type YamlValue = serde_norway::Value;

fn get_str<'a>(v: &'a YamlValue, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

/// Context of one document (or one `List` item) for error messages.
struct DocCtx<'a> {
    document: usize,
    prefix: &'a str,
    kind: Option<String>,
    object: Option<String>,
}

impl DocCtx<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError {
            document: self.document,
            kind: self.kind.clone(),
            object: self.object.clone(),
            field: format!("{}{}", self.prefix, field)
                .trim_end_matches('.')
                .to_string(),
            reason: reason.into(),
        }
    }
    fn from_fe(&self, e: Fe) -> ManifestError {
        self.err(&e.field, e.reason)
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: YamlValue, dc: &DocCtx<'_>) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        dc.err(&path, with_hint(e.into_inner().to_string()))
    })
}

/// Add a "what to do" to serde's messages.
fn with_hint(msg: String) -> String {
    let hint = if msg.contains("invalid IPv4 address syntax") {
        "; write an IPv4 address such as 10.244.1.5"
    } else if msg.contains("invalid IP address syntax") {
        "; write an IPv4 CIDR such as 192.0.2.0/24"
    } else if msg.starts_with("invalid type") && msg.ends_with("expected a string") {
        "; put the value in quotes"
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        "; fix the value's type"
    } else if msg.starts_with("missing field") {
        "; add it"
    } else if msg.starts_with("unknown field") {
        " (remove it or fix the spelling)"
    } else {
        ""
    };
    msg + hint
}

fn parse_value(
    value: YamlValue,
    document: usize,
    prefix: &str,
    ctx: &ValidationContext,
    ext: Option<&dyn ExtensionKinds>,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let mut dc = DocCtx {
        document,
        prefix,
        kind: None,
        object: None,
    };
    if !value.is_mapping() {
        return Err(dc.err(
            "",
            "a manifest must be a mapping with apiVersion, kind and metadata; check the indentation",
        ));
    }
    let kind = get_str(&value, "kind").map(str::to_string);
    let api_version = get_str(&value, "apiVersion").map(str::to_string);
    if let Some(meta) = value.get("metadata") {
        if let Some(name) = get_str(meta, "name") {
            let ns = get_str(meta, "namespace").unwrap_or("default");
            dc.object = Some(format!("{ns}/{name}"));
        }
    }
    dc.kind = kind.clone();
    let supported = match ext {
        Some(x) => format!("{SUPPORTED}, {}", x.describe()),
        None => SUPPORTED.to_string(),
    };
    let Some(kind) = kind else {
        return Err(dc.err("kind", format!("kind is missing; supported kinds: {supported}")));
    };
    if let Some((x, versions)) = ext.and_then(|x| Some((x, x.api_versions(&kind)?))) {
        if x.cluster_scoped(&kind) {
            dc.object = value.get("metadata").and_then(|m| get_str(m, "name")).map(str::to_string);
        }
        return parse_extension(x, versions, &kind, api_version.as_deref(), value, &dc, out);
    }
    let want_api = match kind.as_str() {
        "Service" | "List" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        other => {
            return Err(dc.err(
                "kind",
                format!("kind {other:?} is not supported by fjord apply; supported kinds: {supported}"),
            ))
        }
    };
    match api_version.as_deref() {
        Some(a) if a == want_api => {}
        Some(a) => {
            return Err(dc.err(
                "apiVersion",
                format!("apiVersion {a:?} is not supported for kind {kind}; use apiVersion: {want_api}"),
            ))
        }
        None => {
            return Err(dc.err(
                "apiVersion",
                format!("apiVersion is missing; use apiVersion: {want_api}"),
            ))
        }
    }
    match kind.as_str() {
        "Service" => {
            let svc: Service = typed(value, &dc)?;
            validate_service(&svc, ctx).map_err(|e| dc.from_fe(e))?;
            out.push(Object::Service(svc));
        }
        "EndpointSlice" => {
            // Refuse other address types before the addresses fail to parse as IPv4.
            if let Some(t) = get_str(&value, "addressType") {
                check_address_type(t).map_err(|e| dc.from_fe(e))?;
            }
            let slice: EndpointSlice = typed(value, &dc)?;
            validate_endpoint_slice(&slice).map_err(|e| dc.from_fe(e))?;
            out.push(Object::EndpointSlice(slice));
        }
        _ => {
            // List
            let YamlValue::Mapping(map) = value else { unreachable!("checked above") };
            for (k, _) in map.iter() {
                let key = k.as_str().unwrap_or("?");
                if !matches!(key, "apiVersion" | "kind" | "items" | "metadata") {
                    return Err(dc.err(key, format!("unknown field {key:?} in a List; a List has apiVersion, kind, metadata and items")));
                }
            }
            let items = match map.get("items") {
                Some(YamlValue::Sequence(items)) => items.clone(),
                Some(YamlValue::Null) | None => Vec::new(),
                Some(_) => return Err(dc.err("items", "items must be a sequence of objects")),
            };
            for (i, item) in items.into_iter().enumerate() {
                let p = format!("{prefix}items[{i}].");
                parse_value(item, document, &p, ctx, ext, out)?;
            }
        }
    }
    Ok(())
}

/// A document of a kind an extension handles: the frame (apiVersion, metadata.name and
/// namespace) is checked here, the rest by the extension.
fn parse_extension(
    x: &dyn ExtensionKinds,
    versions: &[&str],
    kind: &str,
    api_version: Option<&str>,
    value: YamlValue,
    dc: &DocCtx<'_>,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    match api_version {
        Some(a) if versions.contains(&a) => {}
        Some(a) => {
            return Err(dc.err("apiVersion", format!("apiVersion {a:?} is not supported for kind {kind}; use apiVersion: {}", versions.join(" or "))))
        }
        None => return Err(dc.err("apiVersion", format!("apiVersion is missing; use apiVersion: {}", versions[0]))),
    }
    let meta = value.get("metadata");
    let Some(name) = meta.and_then(|m| get_str(m, "name")) else {
        return Err(dc.err("metadata.name", "name is missing; add metadata.name"));
    };
    check_dns1123_subdomain(name).map_err(|e| dc.err("metadata.name", format!("name {name:?} {e}; rename the object")))?;
    if x.cluster_scoped(kind) {
        if meta.and_then(|m| m.get("namespace")).is_some() {
            return Err(dc.err("metadata.namespace", format!("{kind} is cluster-scoped; remove metadata.namespace")));
        }
    } else if let Some(ns) = meta.and_then(|m| m.get("namespace")) {
        let ns = ns.as_str().unwrap_or("");
        check_dns1123_label(ns).map_err(|e| dc.err("metadata.namespace", format!("namespace {ns:?} {e}; use a valid namespace name")))?;
    }
    let o = x.validate(api_version.unwrap_or_default(), kind, value).map_err(|e| dc.err(&e.field, e.reason))?;
    out.push(Object::Extension(o));
    Ok(())
}

/// Parse and validate a multi-document YAML (or JSON) text. All or nothing:
/// the first invalid document fails the whole call. Empty documents are
/// skipped; a `kind: List` contributes its `items`.
pub fn parse_manifests(text: &str, ctx: &ValidationContext) -> Result<Vec<Object>, ManifestError> {
    parse_manifests_with(text, ctx, None)
}

/// [`parse_manifests`], also accepting the kinds `ext` handles (validated by it).
pub fn parse_manifests_with(text: &str, ctx: &ValidationContext, ext: Option<&dyn ExtensionKinds>) -> Result<Vec<Object>, ManifestError> {
    let mut out: Vec<Object> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = YamlValue::deserialize(doc).map_err(|e| ManifestError {
            document,
            kind: None,
            object: None,
            field: String::new(),
            reason: format!("not valid YAML: {e}; fix the syntax"),
        })?;
        if value.is_null() {
            continue;
        }
        let start = out.len();
        parse_value(value, document, "", ctx, ext, &mut out)?;
        for obj in &out[start..] {
            if let Some(first) = seen.insert(obj.key(), document) {
                let (kind, ns, name) = (obj.kind(), obj.namespace(), obj.name());
                return Err(ManifestError {
                    document,
                    kind: Some(kind.to_string()),
                    object: Some(format!("{ns}/{name}")),
                    field: "metadata.name".into(),
                    reason: format!(
                        "{kind} {ns}/{name} is defined twice (first in document {first}); remove or rename one of them"
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// Multi-document YAML for `fjordctl get -o yaml`; [`parse_manifests`] reads it back.
pub fn to_yaml(objects: &[Object]) -> String {
    objects
        .iter()
        .map(|o| serde_norway::to_string(o).expect("objects serialize to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
        parse_manifests(text, &ValidationContext::default())
    }

    fn parse_ok(text: &str) -> Vec<Object> {
        match parse(text) {
            Ok(o) => o,
            Err(e) => panic!("expected success, got: {e}"),
        }
    }

    /// Assert the error's document, object ("ns/name" or None), field and a word of the reason.
    #[track_caller]
    fn assert_err(text: &str, document: usize, object: Option<&str>, field: &str, word: &str) -> ManifestError {
        let e = match parse(text) {
            Ok(o) => panic!("expected an error at {field}, got {} objects", o.len()),
            Err(e) => e,
        };
        assert_eq!(e.document, document, "document in: {e}");
        assert_eq!(e.object.as_deref(), object, "object in: {e}");
        assert_eq!(e.field, field, "field in: {e}");
        assert!(e.reason.contains(word), "reason should contain {word:?}: {e}");
        e
    }

    /// A Service `shop/web` with the given spec (lines indented by 2).
    fn svc(spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n{spec}")
    }

    const PORT80: &str = "  ports:\n  - port: 80\n";

    /// A slice `shop/web-abc` with the given body after metadata.name/namespace.
    fn slice(labels_and_rest: &str) -> String {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: shop\n{labels_and_rest}")
    }

    const SLICE_LABEL: &str = "  labels:\n    kubernetes.io/service-name: web\n";

    const GOOD: &str = r#"
# a realistic file
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels:
    app.kubernetes.io/name: web
  annotations:
    example.com/owner: team-a
spec:
  selector:
    app: web
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: metrics
    protocol: TCP
    port: 9090
    targetPort: metrics
    appProtocol: http
---
apiVersion: v1
kind: Service
metadata:
  name: dns
  namespace: kube-system
spec:
  type: NodePort
  selector:
    k8s-app: kube-dns
  ports:
  - name: dns
    protocol: UDP
    port: 53
    targetPort: 53
    nodePort: 30053
  - name: dns-tcp
    protocol: TCP
    port: 53
    targetPort: 53
    nodePort: 30053
  externalTrafficPolicy: Local
---
apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  clusterIP: None
  selector:
    app: db
---
apiVersion: v1
kind: Service
metadata:
  name: sticky
spec:
  selector:
    app: sticky
  ports:
  - port: 8080
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
---
apiVersion: v1
kind: Service
metadata:
  name: edge
spec:
  type: LoadBalancer
  selector:
    app: edge
  ports:
  - name: https
    port: 443
    targetPort: 8443
    nodePort: 31443
  externalIPs:
  - 172.18.0.100
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Local
status:
  loadBalancer:
    ingress:
    - ip: 172.18.0.200
    - hostname: edge.example.com
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
    endpointslice.kubernetes.io/managed-by: fjord
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
- name: metrics
  port: 9090
endpoints:
- addresses: ["10.244.1.5"]
  conditions:
    ready: true
  nodeName: node-1
  targetRef:
    kind: Pod
    name: web-1
    namespace: shop
    uid: 0f1e
- addresses: ["10.244.2.7"]
  conditions:
    ready: false
    serving: true
    terminating: true
  nodeName: node-2
  zone: zone-a
- addresses: ["10.244.3.9"]
"#;

    #[test]
    fn good_realistic_manifests() {
        let objs = parse_ok(GOOD);
        let keys: Vec<String> = objs.iter().map(Object::key).collect();
        assert_eq!(
            keys,
            [
                "Service/shop/web",
                "Service/kube-system/dns",
                "Service/default/db",
                "Service/default/sticky",
                "Service/default/edge",
                "EndpointSlice/shop/web-abc12"
            ]
        );
        let Object::Service(web) = &objs[0] else { panic!() };
        assert_eq!(objs[0].kind(), "Service");
        assert_eq!(objs[0].namespace(), "shop");
        assert_eq!(objs[0].name(), "web");
        assert_eq!(web.spec.type_, ServiceType::ClusterIP);
        assert_eq!(web.cluster_ip(), Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert!(!web.is_headless());
        assert_eq!(web.spec.ports.len(), 2);
        assert_eq!(web.spec.ports[0].protocol, Protocol::TCP, "default protocol");
        assert_eq!(web.spec.ports[0].target_port, Some(IntOrString::String("http".into())));
        assert_eq!(web.spec.ports[0].target_port_number(), None);
        assert_eq!(web.spec.ports[1].app_protocol.as_deref(), Some("http"));
        assert_eq!(web.metadata.annotations["example.com/owner"], "team-a");
        assert_eq!(web.session_affinity_timeout(), None);

        let Object::Service(dns) = &objs[1] else { panic!() };
        assert_eq!(dns.spec.type_, ServiceType::NodePort);
        assert_eq!(dns.spec.ports[0].protocol, Protocol::UDP);
        assert_eq!(dns.spec.ports[0].node_port, Some(30053));
        assert_eq!(dns.spec.ports[1].target_port_number(), Some(53));
        assert_eq!(dns.spec.external_traffic_policy.as_deref(), Some("Local"));

        let Object::Service(db) = &objs[2] else { panic!() };
        assert!(db.is_headless());
        assert!(db.spec.ports.is_empty());
        assert_eq!(db.cluster_ip(), None);
        assert_eq!(db.metadata.namespace, "default");

        let Object::Service(sticky) = &objs[3] else { panic!() };
        assert_eq!(sticky.session_affinity_timeout(), Some(600));
        assert_eq!(sticky.spec.ports[0].target_port_number(), Some(8080));

        let Object::Service(edge) = &objs[4] else { panic!() };
        assert_eq!(edge.spec.type_, ServiceType::LoadBalancer);
        assert_eq!(edge.spec.external_ips, [Ipv4Addr::new(172, 18, 0, 100)]);
        assert_eq!(edge.load_balancer_ips(), [Ipv4Addr::new(172, 18, 0, 200)]);
        let ing = &edge.status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress;
        assert_eq!(ing[1].hostname.as_deref(), Some("edge.example.com"));

        let Object::EndpointSlice(s) = &objs[5] else { panic!() };
        assert_eq!(s.service_name(), Some("web"));
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(s.ports[1].protocol, Protocol::TCP);
        assert_eq!(s.ports[1].port, Some(9090));
        let e = &s.endpoints;
        assert_eq!(e[0].addresses, [Ipv4Addr::new(10, 244, 1, 5)]);
        assert!(e[0].is_ready() && e[0].is_serving() && !e[0].is_terminating());
        assert_eq!(e[0].target_ref.as_ref().unwrap().name.as_deref(), Some("web-1"));
        assert!(!e[1].is_ready() && e[1].is_serving() && e[1].is_terminating());
        assert_eq!(e[1].zone.as_deref(), Some("zone-a"));
        // Absent conditions: ready and serving, not terminating (Kubernetes' reading).
        assert!(e[2].is_ready() && e[2].is_serving() && !e[2].is_terminating());
    }

    #[test]
    fn serving_follows_ready_when_absent() {
        let ep = Endpoint {
            addresses: vec![Ipv4Addr::new(10, 244, 0, 1)],
            conditions: EndpointConditions { ready: Some(false), serving: None, terminating: None },
            ..Default::default()
        };
        assert!(!ep.is_ready());
        assert!(!ep.is_serving());
    }

    #[test]
    fn client_ip_affinity_default_timeout() {
        let objs = parse_ok(&svc("  ports:\n  - port: 80\n  sessionAffinity: ClientIP\n"));
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.session_affinity_timeout(), Some(DEFAULT_SESSION_AFFINITY_TIMEOUT));
        let objs = parse_ok(&svc("  ports:\n  - port: 80\n  sessionAffinity: None\n"));
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.session_affinity_timeout(), None);
    }

    #[test]
    fn json_input() {
        let text = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"api","namespace":"prod"},
            "spec":{"type":"NodePort","ports":[{"port":443,"targetPort":8443,"nodePort":32000}],"selector":{"app":"api"}}}"#;
        let objs = parse_ok(text);
        assert_eq!(objs[0].key(), "Service/prod/api");
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.spec.ports[0].target_port, Some(IntOrString::Int(8443)));
        assert_eq!(s.spec.ports[0].node_port, Some(32000));
        // JSON errors carry the path too.
        let bad = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"api"},"spec":{"ports":[{"port":70000}]}}"#;
        assert_err(bad, 1, Some("default/api"), "spec.ports[0].port", "not a valid port");
    }

    #[test]
    fn multi_doc_with_empty_documents() {
        let text = format!("---\n---\n{}\n---\n# only a comment\n---\n{}---\n", svc(PORT80), slice(SLICE_LABEL).to_string() + "addressType: IPv4\nendpoints: []\n");
        let objs = parse_ok(&text);
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].key(), "Service/shop/web");
        assert_eq!(objs[1].key(), "EndpointSlice/shop/web-abc");
        assert!(parse_ok("").is_empty());
        assert!(parse_ok("---\n---\n").is_empty());
        assert!(parse_ok("# nothing\n").is_empty());
    }

    #[test]
    fn document_numbers_count_every_document() {
        // Document 1 empty, 2 good, 3 bad.
        let text = format!("---\n---\n{}---\n{}", svc(PORT80), svc("  ports:\n  - port: 80\n  - port: 70000\n").replace("name: web", "name: web2"));
        let e = assert_err(&text, 3, Some("shop/web2"), "spec.ports[1].port", "not a valid port");
        assert_eq!(e.kind.as_deref(), Some("Service"));
    }

    #[test]
    fn error_display_format() {
        let text = format!("{}---\n{}", svc(PORT80).replace("namespace: shop", "namespace: default"),
            svc("  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: 70000\n").replace("name: web", "name: web2").replace("namespace: shop", "namespace: default"));
        let e = parse(&text).unwrap_err();
        assert_eq!(e.to_string(), "document 2 (Service default/web2): spec.ports[1].port: 70000 is not a valid port (1-65535)");
        let e = ManifestError { document: 4, kind: None, object: None, field: String::new(), reason: "boom".into() };
        assert_eq!(e.to_string(), "document 4: boom");
    }

    #[test]
    fn list_kind() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a}
  spec: {ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: b}
  spec: {ports: [{port: 0}]}
"#;
        assert_err(text, 1, Some("default/b"), "items[1].spec.ports[0].port", "not a valid port");
        let good = text.replace("port: 0", "port: 81");
        let objs = parse_ok(&good);
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].key(), "Service/default/b");
        assert_err("apiVersion: v1\nkind: List\nitems: 3\n", 1, None, "items", "sequence");
        assert_err("apiVersion: v1\nkind: List\nitems: []\nextra: 1\n", 1, None, "extra", "unknown field");
        // Duplicates across a List count too.
        let dup = text.replace("name: b", "name: a").replace("port: 0", "port: 81");
        assert_err(&dup, 1, Some("default/a"), "metadata.name", "twice");
    }

    #[test]
    fn kubectl_dry_run_output_is_accepted() {
        // `kubectl create service clusterip web --tcp=80:8080 --dry-run=client -o yaml`
        let text = r#"apiVersion: v1
kind: Service
metadata:
  creationTimestamp: null
  labels:
    app: web
  name: web
spec:
  ports:
  - name: 80-8080
    port: 80
    protocol: TCP
    targetPort: 8080
  selector:
    app: web
  type: ClusterIP
status:
  loadBalancer: {}
"#;
        let objs = parse_ok(text);
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.metadata.creation_timestamp, None);
        assert_eq!(s.spec.ports[0].name.as_deref(), Some("80-8080"));
    }

    #[test]
    fn cluster_export_fields_are_accepted() {
        let text = svc(r#"  type: LoadBalancer
  clusterIP: 10.96.12.34
  clusterIPs: [10.96.12.34]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  allocateLoadBalancerNodePorts: true
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports:
  - port: 80
    nodePort: 30080
"#)
        .replace("  namespace: shop\n", "  namespace: shop\n  uid: 6a1f0c2e-0f1e-4b8c-9d2a-5e7f3c1b2a90\n  resourceVersion: \"42\"\n  generation: 3\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n");
        let objs = parse_ok(&text);
        let Object::Service(s) = &objs[0] else { panic!() };
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.metadata.generation, Some(3));
        assert_eq!(s.spec.health_check_node_port, Some(32100));
        assert_eq!(s.cluster_ip(), Some(Ipv4Addr::new(10, 96, 12, 34)));
    }

    #[test]
    fn controller_made_slice_export_is_accepted() {
        // Shape of `kubectl get endpointslice -o yaml` from a real cluster.
        let text = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2024-05-01T10:00:00Z"
  creationTimestamp: "2024-05-01T10:00:00Z"
  generateName: web-
  generation: 4
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-x7k2p
  namespace: shop
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: web
    uid: 6a1f0c2e-0f1e-4b8c-9d2a-5e7f3c1b2a90
  resourceVersion: "1234"
  uid: 9b2c1d3e-1111-2222-3333-444455556666
addressType: IPv4
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  hints:
    forZones:
    - name: zone-a
  nodeName: node-1
  targetRef:
    kind: Pod
    name: web-5d8f-abcde
    namespace: shop
    uid: 0c0c0c0c-1111-2222-3333-444455556666
  zone: zone-a
ports:
- name: http
  port: 8080
  protocol: TCP
"#;
        let objs = parse_ok(text);
        let Object::EndpointSlice(s) = &objs[0] else { panic!() };
        assert_eq!(s.metadata.owner_references[0].kind, "Service");
        assert_eq!(s.metadata.generate_name.as_deref(), Some("web-"));
        assert_eq!(s.endpoints[0].hints.as_ref().unwrap().for_zones[0].name, "zone-a");
        assert_eq!(parse_ok(&to_yaml(&objs)), objs);
        let bad = text.replace("    uid: 6a1f0c2e-0f1e-4b8c-9d2a-5e7f3c1b2a90\n", "");
        assert_err(&bad, 1, Some("shop/web-x7k2p"), "metadata.ownerReferences[0]", "missing field `uid`");
    }

    #[test]
    fn to_yaml_round_trips() {
        let objs = parse_ok(GOOD);
        let yaml = to_yaml(&objs);
        assert_eq!(yaml.matches("\n---\n").count(), objs.len() - 1, "{yaml}");
        assert!(yaml.contains("clusterIP: 10.96.0.10"), "{yaml}");
        assert!(yaml.contains("externalIPs:"), "{yaml}");
        assert!(yaml.contains("type: NodePort"), "{yaml}");
        assert_eq!(parse_ok(&yaml), objs);
        assert_eq!(to_yaml(&[]), "");
    }

    #[test]
    fn object_serde_json_round_trip() {
        let objs = parse_ok(GOOD);
        for o in &objs {
            let json = serde_json::to_string(o).unwrap();
            let back: Object = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, o);
        }
        let e = serde_json::from_str::<Object>(r#"{"kind":"Pod"}"#).unwrap_err();
        assert!(e.to_string().contains("Pod"), "{e}");
        assert!(serde_json::from_str::<Object>(r#"{"apiVersion":"v1"}"#).is_err());
    }

    #[test]
    fn custom_service_cidr() {
        let ctx = ValidationContext { service_cidr: "10.100.0.0/24".parse().unwrap() };
        assert!(parse_manifests(&svc("  clusterIP: 10.100.0.5\n  ports:\n  - port: 80\n"), &ctx).is_ok());
        let e = parse_manifests(&svc("  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n"), &ctx).unwrap_err();
        assert_eq!(e.field, "spec.clusterIP");
        assert!(e.reason.contains("10.100.0.0/24"), "{e}");
        assert_eq!(ValidationContext::default().service_cidr.to_string(), DEFAULT_SERVICE_CIDR);
    }

    // ---- bad input: document level ----

    #[test]
    fn bad_yaml_syntax() {
        let text = format!("{}---\nkind: Service\n  bad: [indent\n", svc(PORT80));
        let e = assert_err(&text, 2, None, "", "not valid YAML");
        assert_eq!(e.kind, None);
    }

    #[test]
    fn bad_duplicate_yaml_key() {
        let text = "apiVersion: v1\nkind: Service\nkind: Service\n";
        assert_err(text, 1, None, "", "duplicate");
    }

    #[test]
    fn bad_document_not_a_mapping() {
        assert_err("- a\n- b\n", 1, None, "", "mapping");
        assert_err(&format!("{}---\njust a string\n", svc(PORT80)), 2, None, "", "mapping");
    }

    #[test]
    fn bad_unknown_kind() {
        let e = assert_err("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n", 1, Some("default/p"), "kind", "Pod");
        assert!(e.reason.contains("Service") && e.reason.contains("EndpointSlice"), "{e}");
        assert_eq!(e.kind.as_deref(), Some("Pod"));
    }

    #[test]
    fn bad_missing_kind() {
        let e = assert_err("apiVersion: v1\nmetadata:\n  name: p\n", 1, Some("default/p"), "kind", "missing");
        assert!(e.reason.contains("Service"), "{e}");
    }

    #[test]
    fn bad_api_version() {
        assert_err(&svc(PORT80).replace("apiVersion: v1", "apiVersion: v2"), 1, Some("shop/web"), "apiVersion", "use apiVersion: v1");
        assert_err(&svc(PORT80).replace("apiVersion: v1\n", ""), 1, Some("shop/web"), "apiVersion", "missing");
        let s = slice(SLICE_LABEL).replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1") + "addressType: IPv4\n";
        assert_err(&s, 1, Some("shop/web-abc"), "apiVersion", "discovery.k8s.io/v1");
    }

    #[test]
    fn bad_duplicate_objects() {
        let text = format!("{}---\n{}", svc(PORT80), svc("  ports:\n  - port: 81\n"));
        let e = assert_err(&text, 2, Some("shop/web"), "metadata.name", "twice");
        assert!(e.reason.contains("document 1"), "{e}");
        // Same name, different namespace or kind: fine.
        let ok = format!("{}---\n{}", svc(PORT80), svc(PORT80).replace("namespace: shop", "namespace: other"));
        assert_eq!(parse_ok(&ok).len(), 2);
        let ok = format!("{}---\n{}addressType: IPv4\n", svc(PORT80), slice(SLICE_LABEL).replace("web-abc", "web"));
        assert_eq!(parse_ok(&ok).len(), 2);
    }

    #[test]
    fn bad_unknown_fields() {
        assert_err(&svc("  portz:\n  - port: 80\n"), 1, Some("shop/web"), "spec.portz", "unknown field");
        assert_err(&svc("  ports:\n  - port: 80\n    prot: TCP\n"), 1, Some("shop/web"), "spec.ports[0].prot", "unknown field");
        let e = assert_err(&svc(PORT80).replace("  namespace: shop\n", "  namespace: shop\n  lables: {}\n"), 1, Some("shop/web"), "metadata.lables", "unknown field");
        assert!(e.reason.contains("`labels`") && e.reason.contains("fix the spelling"), "{e}");
        assert_err(&(svc(PORT80) + "extra: 1\n"), 1, Some("shop/web"), "extra", "unknown field");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\n  condition: {}\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].condition", "unknown field");
    }

    #[test]
    fn bad_type_errors_name_the_field() {
        assert_err(&svc("  ports:\n  - port: \"80\"\n"), 1, Some("shop/web"), "spec.ports[0].port", "without quotes");
        assert_err(&svc("  ports:\n  - port: 80\n  selector:\n    app: true\n"), 1, Some("shop/web"), "spec.selector.app", "in quotes");
        assert_err(&svc("  ports: 80\n"), 1, Some("shop/web"), "spec.ports", "sequence");
        assert_err("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n", 1, Some("default/web"), "", "missing field `spec`; add it");
        assert_err("apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {ports: [{port: 80}]}\n", 1, None, "metadata", "name");
        assert_err(&svc("  ports:\n  - protocol: TCP\n"), 1, Some("shop/web"), "spec.ports[0]", "port");
    }

    // ---- bad input: metadata ----

    #[test]
    fn bad_names() {
        assert_err(&svc(PORT80).replace("name: web", "name: Web"), 1, Some("shop/Web"), "metadata.name", "DNS label");
        let long = "a".repeat(64);
        assert_err(&svc(PORT80).replace("name: web", &format!("name: {long}")), 1, Some(&format!("shop/{long}")), "metadata.name", "63");
        assert_err(&svc(PORT80).replace("name: web", "name: 1web"), 1, Some("shop/1web"), "metadata.name", "letter");
        assert_err(&svc(PORT80).replace("name: web", "name: web-"), 1, Some("shop/web-"), "metadata.name", "DNS label");
        assert_err(&svc(PORT80).replace("name: web", "name: \"\""), 1, Some("shop/"), "metadata.name", "empty");
        assert_err(&svc(PORT80).replace("name: web", "name: a.b"), 1, Some("shop/a.b"), "metadata.name", "DNS label");
        assert_err(&svc(PORT80).replace("namespace: shop", "namespace: Shop_1"), 1, Some("Shop_1/web"), "metadata.namespace", "namespace");
    }

    #[test]
    fn bad_labels_and_annotations() {
        let with_labels = |l: &str| svc(PORT80).replace("  namespace: shop\n", &format!("  namespace: shop\n  labels:\n    {l}\n"));
        assert_err(&with_labels("\"bad key\": x"), 1, Some("shop/web"), "metadata.labels[\"bad key\"]", "not a valid key");
        assert_err(&with_labels("\"Example.com/app\": x"), 1, Some("shop/web"), "metadata.labels[\"Example.com/app\"]", "prefix");
        assert_err(&with_labels("\"example.com/\": x"), 1, Some("shop/web"), "metadata.labels[\"example.com/\"]", "empty");
        assert_err(&with_labels("app: \"-web\""), 1, Some("shop/web"), "metadata.labels[\"app\"]", "not a valid label value");
        let long = "v".repeat(64);
        assert_err(&with_labels(&format!("app: {long}")), 1, Some("shop/web"), "metadata.labels[\"app\"]", "63");
        // Good labels: prefix, dots, underscores, empty value.
        assert!(parse(&with_labels("app.kubernetes.io/part-of: My_App.v1")).is_ok());
        assert!(parse(&with_labels("empty: \"\"")).is_ok());
        let with_ann = |a: &str| svc(PORT80).replace("  namespace: shop\n", &format!("  namespace: shop\n  annotations:\n    {a}\n"));
        assert_err(&with_ann("\"a/b/c\": x"), 1, Some("shop/web"), "metadata.annotations[\"a/b/c\"]", "not a valid key");
        // Annotation values are free text.
        assert!(parse(&with_ann("note: \"any text, even -- this!\"")).is_ok());
    }

    // ---- bad input: Service ports ----

    #[test]
    fn bad_no_ports() {
        assert_err(&svc("  selector:\n    app: web\n"), 1, Some("shop/web"), "spec.ports", "at least one port");
        assert_err(&svc("  ports: []\n"), 1, Some("shop/web"), "spec.ports", "headless");
    }

    #[test]
    fn bad_port_numbers() {
        assert_err(&svc("  ports:\n  - port: 70000\n"), 1, Some("shop/web"), "spec.ports[0].port", "70000 is not a valid port");
        assert_err(&svc("  ports:\n  - port: 0\n"), 1, Some("shop/web"), "spec.ports[0].port", "not a valid port");
        assert_err(&svc("  ports:\n  - port: -1\n"), 1, Some("shop/web"), "spec.ports[0].port", "not a valid port");
        assert_err(&svc("  ports:\n  - port: 80.5\n"), 1, Some("shop/web"), "spec.ports[0].port", "not a valid port");
    }

    #[test]
    fn bad_protocol() {
        assert_err(&svc("  ports:\n  - port: 80\n    protocol: SCTP\n"), 1, Some("shop/web"), "spec.ports[0].protocol", "not supported by fjord");
        assert_err(&svc("  ports:\n  - port: 80\n    protocol: tcp\n"), 1, Some("shop/web"), "spec.ports[0].protocol", "unknown protocol");
    }

    #[test]
    fn bad_service_type() {
        assert_err(&svc("  type: ExternalName\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.type", "not supported by fjord");
        assert_err(&svc("  type: Nodeport\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.type", "unknown service type");
    }

    #[test]
    fn bad_duplicate_port_protocol() {
        let e = assert_err(&svc("  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: 80\n"), 1, Some("shop/web"), "spec.ports[1].port", "duplicate port 80/TCP");
        assert!(e.reason.contains("spec.ports[0]"), "{e}");
        // Same port, different protocol is fine.
        assert!(parse(&svc("  ports:\n  - name: a\n    port: 53\n    protocol: UDP\n  - name: b\n    port: 53\n")).is_ok());
    }

    #[test]
    fn bad_port_names() {
        assert_err(&svc("  ports:\n  - name: a\n    port: 80\n  - port: 81\n"), 1, Some("shop/web"), "spec.ports[1].name", "more than one port");
        assert_err(&svc("  ports:\n  - port: 80\n  - name: b\n    port: 81\n"), 1, Some("shop/web"), "spec.ports[0].name", "name");
        assert_err(&svc("  ports:\n  - name: http\n    port: 80\n  - name: http\n    port: 81\n"), 1, Some("shop/web"), "spec.ports[1].name", "duplicate port name");
        assert_err(&svc("  ports:\n  - name: HTTP\n    port: 80\n"), 1, Some("shop/web"), "spec.ports[0].name", "DNS label");
        assert_err(&svc(&format!("  ports:\n  - name: {}\n    port: 80\n", "p".repeat(64))), 1, Some("shop/web"), "spec.ports[0].name", "63");
        // A single unnamed port is fine.
        assert!(parse(&svc(PORT80)).is_ok());
    }

    #[test]
    fn bad_target_ports() {
        let tp = |t: &str| svc(&format!("  ports:\n  - port: 80\n    targetPort: {t}\n"));
        assert_err(&tp("70000"), 1, Some("shop/web"), "spec.ports[0].targetPort", "not a valid port");
        assert_err(&tp("0"), 1, Some("shop/web"), "spec.ports[0].targetPort", "not a valid port");
        assert_err(&tp("HTTP"), 1, Some("shop/web"), "spec.ports[0].targetPort", "lower-case");
        assert_err(&tp("web-http-metrics1"), 1, Some("shop/web"), "spec.ports[0].targetPort", "15");
        assert_err(&tp("\"8080\""), 1, Some("shop/web"), "spec.ports[0].targetPort", "one letter");
        assert_err(&tp("my--port"), 1, Some("shop/web"), "spec.ports[0].targetPort", "'--'");
        assert_err(&tp("-port"), 1, Some("shop/web"), "spec.ports[0].targetPort", "start or end");
        assert_err(&tp("\"\""), 1, Some("shop/web"), "spec.ports[0].targetPort", "empty");
        assert_err(&tp("[1]"), 1, Some("shop/web"), "spec.ports[0].targetPort", "port number");
        assert!(parse(&tp("http-alt")).is_ok());
        assert!(parse(&tp("65535")).is_ok());
    }

    #[test]
    fn bad_node_ports() {
        assert_err(&svc("  ports:\n  - port: 80\n    nodePort: 30080\n"), 1, Some("shop/web"), "spec.ports[0].nodePort", "only allowed when spec.type is NodePort or LoadBalancer");
        assert_err(&svc("  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 8080\n"), 1, Some("shop/web"), "spec.ports[0].nodePort", "node port range");
        assert_err(&svc("  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 32768\n"), 1, Some("shop/web"), "spec.ports[0].nodePort", "30000-32767");
        assert_err(&svc("  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 99999\n"), 1, Some("shop/web"), "spec.ports[0].nodePort", "not a valid port");
        assert_err(&svc("  type: LoadBalancer\n  ports:\n  - name: a\n    port: 80\n    nodePort: 30080\n  - name: b\n    port: 81\n    nodePort: 30080\n"), 1, Some("shop/web"), "spec.ports[1].nodePort", "duplicate nodePort");
        assert!(parse(&svc("  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 30000\n")).is_ok());
        assert!(parse(&svc("  type: NodePort\n  ports:\n  - port: 80\n")).is_ok(), "nodePort may be left to allocation");
    }

    // ---- bad input: Service addresses ----

    #[test]
    fn bad_cluster_ip() {
        let cip = |ip: &str| svc(&format!("  clusterIP: {ip}\n  ports:\n  - port: 80\n"));
        assert_err(&cip("10.97.0.1"), 1, Some("shop/web"), "spec.clusterIP", "outside the service CIDR");
        assert_err(&cip("10.96.0.0"), 1, Some("shop/web"), "spec.clusterIP", "network or broadcast");
        assert_err(&cip("10.96.255.255"), 1, Some("shop/web"), "spec.clusterIP", "network or broadcast");
        assert_err(&cip("10.96.0.300"), 1, Some("shop/web"), "spec.clusterIP", "not a valid IPv4");
        assert_err(&cip("\"fd00::10\""), 1, Some("shop/web"), "spec.clusterIP", "IPv6");
        assert!(parse(&cip("\"\"")).is_ok(), "empty clusterIP means allocate");
        assert!(parse(&cip("10.96.255.254")).is_ok());
    }

    #[test]
    fn bad_cluster_ips() {
        let s = |extra: &str| svc(&format!("  clusterIP: 10.96.0.10\n{extra}  ports:\n  - port: 80\n"));
        assert_err(&s("  clusterIPs: [10.96.0.11]\n"), 1, Some("shop/web"), "spec.clusterIPs[0]", "differs");
        assert_err(&s("  clusterIPs: [10.96.0.10, \"fd00::1\"]\n"), 1, Some("shop/web"), "spec.clusterIPs[1]", "single-stack");
        assert_err(&svc("  clusterIPs: [10.1.0.1]\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.clusterIPs[0]", "outside");
        assert!(parse(&s("  clusterIPs: [10.96.0.10]\n")).is_ok());
    }

    #[test]
    fn bad_ip_families() {
        assert_err(&svc("  ipFamilies: [IPv6]\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.ipFamilies[0]", "not supported by fjord");
        assert_err(&svc("  ipFamilies: [IPv4, IPv6]\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.ipFamilies[1]", "IPv6");
        assert_err(&svc("  ipFamilies: [ipv4]\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.ipFamilies[0]", "unknown IP family");
        assert_err(&svc("  ipFamilyPolicy: RequireDualStack\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.ipFamilyPolicy", "not supported");
        assert_err(&svc("  ipFamilyPolicy: Single\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.ipFamilyPolicy", "unknown policy");
        assert!(parse(&svc("  ipFamilyPolicy: PreferDualStack\n  ports:\n  - port: 80\n")).is_ok());
    }

    #[test]
    fn bad_headless() {
        assert_err(&svc("  clusterIP: None\n  type: NodePort\n  ports:\n  - port: 80\n"), 1, Some("shop/web"), "spec.type", "headless");
        assert_err(&svc("  clusterIP: None\n  type: LoadBalancer\n"), 1, Some("shop/web"), "spec.type", "headless");
        assert_err(&svc("  clusterIP: None\n  ports:\n  - port: 80\n    nodePort: 30080\n"), 1, Some("shop/web"), "spec.ports[0].nodePort", "headless");
        assert!(parse(&svc("  clusterIP: None\n  ports:\n  - port: 80\n")).is_ok());
    }

    #[test]
    fn bad_session_affinity() {
        assert_err(&svc("  ports:\n  - port: 80\n  sessionAffinity: Sticky\n"), 1, Some("shop/web"), "spec.sessionAffinity", "None or ClientIP");
        let t = |n: &str| svc(&format!("  ports:\n  - port: 80\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {n}\n"));
        assert_err(&t("0"), 1, Some("shop/web"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "1-86400");
        assert_err(&t("86401"), 1, Some("shop/web"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range");
        assert_err(&t("-5"), 1, Some("shop/web"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "u32");
        assert!(parse(&t("86400")).is_ok());
        let no_client_ip = svc("  ports:\n  - port: 80\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n");
        assert_err(&no_client_ip, 1, Some("shop/web"), "spec.sessionAffinityConfig", "ClientIP");
        assert_err(&no_client_ip.replace("  sessionAffinityConfig", "  sessionAffinity: None\n  sessionAffinityConfig"), 1, Some("shop/web"), "spec.sessionAffinityConfig", "ClientIP");
    }

    #[test]
    fn bad_traffic_policies() {
        assert_err(&svc("  type: NodePort\n  ports:\n  - port: 80\n  externalTrafficPolicy: Nearest\n"), 1, Some("shop/web"), "spec.externalTrafficPolicy", "Cluster or Local");
        assert_err(&svc("  ports:\n  - port: 80\n  externalTrafficPolicy: Local\n"), 1, Some("shop/web"), "spec.externalTrafficPolicy", "only allowed");
        // Kubernetes allows it on a ClusterIP service with externalIPs.
        assert!(parse(&svc("  ports:\n  - port: 80\n  externalIPs: [172.18.0.5]\n  externalTrafficPolicy: Local\n")).is_ok());
        assert_err(&svc("  ports:\n  - port: 80\n  internalTrafficPolicy: Topology\n"), 1, Some("shop/web"), "spec.internalTrafficPolicy", "Cluster or Local");
        assert!(parse(&svc("  ports:\n  - port: 80\n  internalTrafficPolicy: Cluster\n")).is_ok());
    }

    #[test]
    fn bad_external_ips() {
        assert_err(&svc("  ports:\n  - port: 80\n  externalIPs: [172.18.0.5, 10.96.1.1]\n"), 1, Some("shop/web"), "spec.externalIPs[1]", "inside the service CIDR");
        assert_err(&svc("  ports:\n  - port: 80\n  externalIPs: [172.18.0.300]\n"), 1, Some("shop/web"), "spec.externalIPs[0]", "IP");
        assert_err(&svc("  ports:\n  - port: 80\n  externalIPs: [127.0.0.1]\n"), 1, Some("shop/web"), "spec.externalIPs[0]", "special");
        assert_err(&svc("  ports:\n  - port: 80\n  externalIPs: [172.18.0.5, 172.18.0.5]\n"), 1, Some("shop/web"), "spec.externalIPs[1]", "duplicate");
    }

    #[test]
    fn bad_load_balancer_fields() {
        assert_err(&svc("  ports:\n  - port: 80\n  loadBalancerSourceRanges: [10.0.0.0/8]\n"), 1, Some("shop/web"), "spec.loadBalancerSourceRanges", "LoadBalancer");
        assert_err(&svc("  ports:\n  - port: 80\n  loadBalancerIP: 172.18.0.9\n"), 1, Some("shop/web"), "spec.loadBalancerIP", "LoadBalancer");
        assert_err(&svc("  type: LoadBalancer\n  ports:\n  - port: 80\n  healthCheckNodePort: 32000\n"), 1, Some("shop/web"), "spec.healthCheckNodePort", "Local");
        assert_err(&svc("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  ports:\n  - port: 80\n  healthCheckNodePort: 1000\n"), 1, Some("shop/web"), "spec.healthCheckNodePort", "range");
        let st = svc(PORT80) + "status:\n  loadBalancer:\n    ingress:\n    - {}\n";
        assert_err(&st, 1, Some("shop/web"), "status.loadBalancer.ingress[0]", "ip or a hostname");
        let st = svc(PORT80) + "status:\n  loadBalancer:\n    ingress:\n    - ip: not-an-ip\n";
        assert_err(&st, 1, Some("shop/web"), "status.loadBalancer.ingress[0].ip", "IP");
    }

    #[test]
    fn bad_selector() {
        assert_err(&svc("  ports:\n  - port: 80\n  selector:\n    app: \"web app\"\n"), 1, Some("shop/web"), "spec.selector[\"app\"]", "not a valid label value");
        assert_err(&svc("  ports:\n  - port: 80\n  selector:\n    \"/app\": web\n"), 1, Some("shop/web"), "spec.selector[\"/app\"]", "prefix");
    }

    // ---- bad input: EndpointSlice ----

    #[test]
    fn bad_address_type() {
        let s = slice(SLICE_LABEL) + "addressType: IPv6\nendpoints:\n- addresses: [\"fd00::1\"]\n";
        assert_err(&s, 1, Some("shop/web-abc"), "addressType", "not supported by fjord");
        let s = slice(SLICE_LABEL) + "addressType: FQDN\nendpoints:\n- addresses: [a.example.com]\n";
        assert_err(&s, 1, Some("shop/web-abc"), "addressType", "IPv4 only");
        assert_err(&(slice(SLICE_LABEL) + "addressType: ipv4\n"), 1, Some("shop/web-abc"), "addressType", "unknown addressType");
        assert_err(&(slice(SLICE_LABEL) + "endpoints: []\n"), 1, Some("shop/web-abc"), "", "addressType");
    }

    #[test]
    fn bad_slice_service_name_label() {
        let s = slice("  labels:\n    app: web\n") + "addressType: IPv4\n";
        let e = assert_err(&s, 1, Some("shop/web-abc"), "metadata.labels", "kubernetes.io/service-name");
        assert_eq!(e.kind.as_deref(), Some("EndpointSlice"));
        assert_err(&(slice("") + "addressType: IPv4\n"), 1, Some("shop/web-abc"), "metadata.labels", "missing");
        let s = slice("  labels:\n    kubernetes.io/service-name: 9web\n") + "addressType: IPv4\n";
        assert_err(&s, 1, Some("shop/web-abc"), "metadata.labels[\"kubernetes.io/service-name\"]", "not a valid Service name");
    }

    #[test]
    fn bad_slice_names() {
        let long = format!("{}.{}", "a".repeat(200), "b".repeat(60));
        let s = slice(SLICE_LABEL).replace("name: web-abc", &format!("name: {long}")) + "addressType: IPv4\n";
        assert_err(&s, 1, Some(&format!("shop/{long}")), "metadata.name", "253");
        let s = slice(SLICE_LABEL).replace("name: web-abc", "name: web..abc") + "addressType: IPv4\n";
        assert_err(&s, 1, Some("shop/web..abc"), "metadata.name", "DNS subdomain");
        // Dotted names are fine for slices.
        let s = slice(SLICE_LABEL).replace("name: web-abc", "name: web.abc") + "addressType: IPv4\n";
        assert!(parse(&s).is_ok());
    }

    #[test]
    fn bad_endpoints() {
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\n- addresses: []\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[1].addresses", "at least one address");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- conditions: {ready: true}\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].addresses", "at least one address");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.300]\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].addresses[0]", "such as 10.244.1.5");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\n  conditions: {ready: maybe}\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].conditions.ready", "bool");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\n  hostname: Web_1\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].hostname", "DNS label");
        let s = slice(SLICE_LABEL) + "addressType: IPv4\nendpoints:\n- addresses: [10.244.0.1]\n  nodeName: Node_1\n";
        assert_err(&s, 1, Some("shop/web-abc"), "endpoints[0].nodeName", "DNS subdomain");
    }

    #[test]
    fn bad_slice_ports() {
        let p = |ports: &str| slice(SLICE_LABEL) + "addressType: IPv4\nports:\n" + ports;
        assert_err(&p("- name: http\n  port: 70000\n"), 1, Some("shop/web-abc"), "ports[0].port", "not a valid port");
        assert_err(&p("- name: http\n  port: 0\n"), 1, Some("shop/web-abc"), "ports[0].port", "not a valid port");
        assert_err(&p("- name: http\n  port: 80\n- name: http\n  port: 81\n"), 1, Some("shop/web-abc"), "ports[1].name", "duplicate port name");
        assert_err(&p("- port: 80\n- port: 81\n"), 1, Some("shop/web-abc"), "ports[1].name", "duplicate");
        assert_err(&p("- name: Http\n  port: 80\n"), 1, Some("shop/web-abc"), "ports[0].name", "DNS label");
        assert_err(&p("- name: dns\n  port: 53\n  protocol: SCTP\n"), 1, Some("shop/web-abc"), "ports[0].protocol", "not supported by fjord");
        let objs = parse_ok(&p("- port: 80\n- name: metrics\n"));
        let Object::EndpointSlice(s) = &objs[0] else { panic!() };
        assert_eq!(s.ports[0].name, None);
        assert_eq!(s.ports[1].port, None);
    }

    #[test]
    fn all_or_nothing() {
        // A good document before a bad one: nothing is returned.
        let text = format!("{}---\n{}", svc(PORT80), slice("") + "addressType: IPv4\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.document, 2);
        assert_eq!(e.kind.as_deref(), Some("EndpointSlice"));
    }

    #[test]
    fn name_rule_helpers() {
        assert!(check_iana_svc_name("http").is_ok());
        assert!(check_iana_svc_name("a-b-1").is_ok());
        assert!(check_iana_svc_name("123").is_err());
        assert!(check_iana_svc_name("a".repeat(15).as_str()).is_ok());
        assert!(check_iana_svc_name("a".repeat(16).as_str()).is_err());
        assert!(check_dns1123_label("0abc").is_ok());
        assert!(check_dns1035_label("0abc").is_err());
        assert!(check_dns1123_subdomain("a.b-c.d").is_ok());
        assert!(check_dns1123_subdomain(".a").is_err());
        assert!(check_label_key("example.com/name_x.y").is_ok());
        assert!(check_label_key("a/b/c").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("a_").is_err());
    }

    /// A toy extension: kind `Widget` (example.dev/v1) with `spec.size` < 10; `Thing` cluster-scoped.
    struct Widgets;
    impl ExtensionKinds for Widgets {
        fn api_versions(&self, kind: &str) -> Option<&'static [&'static str]> {
            matches!(kind, "Widget" | "Thing").then_some(&["example.dev/v1"])
        }
        fn cluster_scoped(&self, kind: &str) -> bool {
            kind == "Thing"
        }
        fn describe(&self) -> &'static str {
            "Widget (example.dev/v1)"
        }
        fn validate(&self, api_version: &str, kind: &str, value: serde_norway::Value) -> Result<ExtObject, FieldError> {
            let v: serde_json::Value = serde_json::to_value(&value).unwrap();
            if v["spec"]["size"].as_u64().unwrap_or(0) >= 10 {
                return Err(FieldError { field: "spec.size".into(), reason: "must be < 10".into() });
            }
            Ok(ExtObject {
                api_version: api_version.into(),
                kind: kind.into(),
                namespace: (kind != "Thing").then(|| v["metadata"]["namespace"].as_str().unwrap_or("default").to_string()),
                name: v["metadata"]["name"].as_str().unwrap().into(),
                value: v,
            })
        }
    }

    #[test]
    fn extension_kinds_mix_with_services_all_or_nothing() {
        let ctx = ValidationContext::default();
        let w = "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w, namespace: app}\nspec: {size: 3}\n";
        let text = format!("{}\n---\n{w}", svc("  ports:\n  - port: 80\n"));
        let objs = parse_manifests_with(&text, &ctx, Some(&Widgets)).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].key(), "Widget/app/w");
        // without the extension the kind is unknown, and the message lists what is supported
        let e = parse(&text).unwrap_err();
        assert_eq!((e.document, e.field.as_str()), (2, "kind"));
        // the extension's error names document, object and field
        let bad = format!("{}\n---\n{}", svc("  ports:\n  - port: 80\n"), w.replace("size: 3", "size: 30"));
        let e = parse_manifests_with(&bad, &ctx, Some(&Widgets)).unwrap_err();
        assert_eq!((e.document, e.object.as_deref(), e.field.as_str()), (2, Some("app/w"), "spec.size"), "{e}");
        assert!(e.to_string().contains("must be < 10"), "{e}");
        // the frame is checked here: apiVersion, name, namespace of cluster-scoped kinds
        let e = parse_manifests_with(&w.replace("example.dev/v1", "example.dev/v2"), &ctx, Some(&Widgets)).unwrap_err();
        assert_eq!(e.field, "apiVersion", "{e}");
        let e = parse_manifests_with(&w.replace("name: w", "name: W_"), &ctx, Some(&Widgets)).unwrap_err();
        assert_eq!(e.field, "metadata.name", "{e}");
        let t = "apiVersion: example.dev/v1\nkind: Thing\nmetadata: {name: t, namespace: x}\n";
        let e = parse_manifests_with(t, &ctx, Some(&Widgets)).unwrap_err();
        assert_eq!(e.field, "metadata.namespace", "{e}");
        let objs = parse_manifests_with("apiVersion: example.dev/v1\nkind: Thing\nmetadata: {name: t}\n", &ctx, Some(&Widgets)).unwrap();
        assert_eq!(objs[0].key(), "Thing/t");
        // duplicates across the file
        let e = parse_manifests_with(&format!("{w}---\n{w}"), &ctx, Some(&Widgets)).unwrap_err();
        assert!(e.reason.contains("defined twice"), "{e}");
    }

    #[test]
    fn ext_object_generation_and_creation_timestamp() {
        let mk = |size: u64| ExtObject {
            api_version: "example.dev/v1".into(),
            kind: "Widget".into(),
            namespace: Some("default".into()),
            name: "w".into(),
            value: serde_json::json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": size}}),
        };
        let mut a = mk(1);
        a.carry_over(None, "2025-01-01T00:00:00Z");
        assert_eq!(a.value["metadata"]["generation"], 1);
        let mut b = mk(1);
        b.carry_over(Some(&a.value), "2025-02-01T00:00:00Z");
        assert_eq!(b.value["metadata"]["generation"], 1, "unchanged spec keeps the generation");
        assert_eq!(b.value["metadata"]["creationTimestamp"], "2025-01-01T00:00:00Z");
        let mut c = mk(2);
        c.carry_over(Some(&b.value), "2025-03-01T00:00:00Z");
        assert_eq!(c.value["metadata"]["generation"], 2);
        assert_eq!(c.value["metadata"]["creationTimestamp"], "2025-01-01T00:00:00Z");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951782400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1714557600), "2024-05-01T10:00:00Z");
        assert_eq!(rfc3339(4102444799), "2099-12-31T23:59:59Z");
    }
}
