//! Services: `apply` (validation, ClusterIP allocation, one transaction), the
//! endpoint controller for this node's pods, and programming the eBPF
//! datapath from the store, driven by a watch (never polled).

use crate::agent::Agent;
use fjord_lb::{Backend, Frontend, FrontendOptions, LbConfig, Protocol as LbProtocol};
use fjord_model::api::{Attachment, Pod};
use fjord_model::cni::{code, CniError};
use fjord_model::keys;
use fjord_model::objects::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, EndpointTargetRef, IntOrString, Object, ObjectMeta, Protocol, Service,
    ServiceType, ValidationContext,
};
use fjord_store::{Compare, Op, Store, Txn};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_FJORD: &str = "fjord.dev/agent";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Datapath state for status and metrics.
#[derive(Default)]
pub struct ServiceView {
    pub last_sync: Mutex<Option<(Instant, Duration)>>,
    pub last_error: Mutex<Option<String>>,
    pub frontends: Mutex<usize>,
    pub backends: Mutex<usize>,
}

fn bad(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}
fn store_err(e: fjord_store::StoreError) -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, "the agent's store failed").details(e.to_string())
}

fn lb_proto(p: &Protocol) -> LbProtocol {
    match p {
        Protocol::TCP => LbProtocol::Tcp,
        Protocol::UDP => LbProtocol::Udp,
    }
}

/// Apply objects: all are written in one transaction, or none.
pub async fn apply(agent: &Agent, ctx: &ValidationContext, objects: Vec<Object>, max_frontends: Option<usize>) -> Result<Vec<Object>, CniError> {
    let store = &agent.store;
    let existing = store.list(&keys::services_prefix()).await.map_err(store_err)?;
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    for kv in &existing.kvs {
        if let Ok(s) = serde_json::from_slice::<Service>(&kv.value) {
            services.insert(format!("{}/{}", s.metadata.namespace, s.metadata.name), s);
        }
    }
    let taken = store.list("/fjord/v1/clusterips/").await.map_err(store_err)?;
    let mut used_ips: BTreeMap<Ipv4Addr, String> = taken
        .kvs
        .iter()
        .filter_map(|kv| Some((kv.key.rsplit('/').next()?.parse().ok()?, String::from_utf8_lossy(&kv.value).to_string())))
        .collect();
    let taken_ports = store.list(&keys::nodeports_prefix()).await.map_err(store_err)?;
    let mut used_ports: BTreeMap<String, String> =
        taken_ports.kvs.iter().map(|kv| (kv.key.clone(), String::from_utf8_lossy(&kv.value).to_string())).collect();
    let mut ops = vec![];
    let mut compares = vec![];
    let mut out = vec![];
    for obj in objects {
        match obj {
            Object::Service(mut s) => {
                let id = format!("{}/{}", s.metadata.namespace, s.metadata.name);
                let prev = services.get(&id).cloned();
                if !s.is_headless() {
                    match s.spec.cluster_ip.as_deref() {
                        None | Some("") => {
                            // Keep the address a re-applied service already has.
                            let ip = match prev.as_ref().and_then(|p| p.spec.cluster_ip.clone()).filter(|ip| ip != "None") {
                                Some(ip) => ip.parse::<Ipv4Addr>().map_err(|_| bad(format!("service {id}: stored clusterIP {ip} is invalid")))?,
                                None => {
                                    let cidr = ctx.service_cidr;
                                    let first = u32::from(cidr.network()) + 10; // .0-.9 reserved (like kube-dns's .10 convention, first free from .10)
                                    let last = u32::from(cidr.broadcast()) - 1;
                                    let ip = (first..=last).map(Ipv4Addr::from).find(|ip| !used_ips.contains_key(ip)).ok_or_else(|| {
                                        bad(format!("service {id}: no free ClusterIP left in the service CIDR {cidr}"))
                                    })?;
                                    compares.push(Compare::absent(keys::clusterip(ip)));
                                    ops.push(Op::put(keys::clusterip(ip), id.clone()));
                                    used_ips.insert(ip, id.clone());
                                    ip
                                }
                            };
                            s.spec.cluster_ip = Some(ip.to_string());
                        }
                        Some(ip) => {
                            let ip: Ipv4Addr = ip.parse().map_err(|_| bad(format!("service {id}: spec.clusterIP {ip:?} is not an IPv4 address")))?;
                            match used_ips.get(&ip) {
                                Some(owner) if *owner != id => {
                                    return Err(bad(format!("service {id}: spec.clusterIP {ip} is already allocated to service {owner}")));
                                }
                                Some(_) => {}
                                None => {
                                    compares.push(Compare::absent(keys::clusterip(ip)));
                                    ops.push(Op::put(keys::clusterip(ip), id.clone()));
                                    used_ips.insert(ip, id.clone());
                                }
                            }
                        }
                    }
                    if let (Some(p), Some(new)) = (prev.as_ref().and_then(|p| p.spec.cluster_ip.clone()), s.spec.cluster_ip.clone()) {
                        if p != new && p != "None" {
                            return Err(bad(format!("service {id}: spec.clusterIP is immutable ({p} → {new}); delete the service first")));
                        }
                    }
                }
                allocate_node_ports(&id, &mut s, prev.as_ref(), &mut used_ports, &mut compares, &mut ops)?;
                services.insert(id.clone(), s.clone());
                ops.push(Op::put(keys::service(&s.metadata.namespace, &s.metadata.name), serde_json::to_vec(&s).unwrap()));
                out.push(Object::Service(s));
            }
            Object::EndpointSlice(e) => {
                ops.push(Op::put(keys::endpointslice(&e.metadata.namespace, &e.metadata.name), serde_json::to_vec(&e).unwrap()));
                out.push(Object::EndpointSlice(e));
            }
            Object::Extension(x) => {
                ops.push(crate::gatewayapi::stage_put(store.as_ref(), x.clone()).await?);
                out.push(Object::Extension(x));
            }
        }
    }
    if let Some(max) = max_frontends {
        let addrs = agent.node_addresses().len();
        let n: usize = services.values().filter(|s| !s.is_headless()).map(|s| frontend_count(s, addrs)).sum();
        if n > max {
            return Err(bad(format!(
                "applying this would need {n} service frontends (VIP × port), more than the datapath's service map holds ({max}); \
                 nothing was applied. Start the agent with a larger --max-services."
            )));
        }
    }
    let r = store.txn(Txn::when(compares).and_then(ops)).await.map_err(store_err)?;
    if !r.succeeded {
        return Err(CniError::new(code::TRY_AGAIN_LATER, "a ClusterIP was taken concurrently; nothing was applied, apply again"));
    }
    Ok(out)
}

/// Gives every port of a NodePort/LoadBalancer service a nodePort: the one it
/// asks for (refused if another service holds it), the one it had, or the
/// first free one of 30000-32767. Ports the service no longer uses are released.
fn allocate_node_ports(
    id: &str,
    s: &mut Service,
    prev: Option<&Service>,
    used: &mut BTreeMap<String, String>,
    compares: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> Result<(), CniError> {
    let external = s.spec.type_.is_external() && s.spec.allocate_load_balancer_node_ports != Some(false) || s.spec.type_ == ServiceType::NodePort;
    let mut mine: HashSet<String> = HashSet::new();
    if external {
        for (i, p) in s.spec.ports.iter_mut().enumerate() {
            let proto = format!("{}", lb_proto(&p.protocol)).to_ascii_lowercase();
            let kept = prev
                .and_then(|pv| pv.spec.ports.iter().find(|q| q.port == p.port && q.protocol == p.protocol && q.name == p.name))
                .and_then(|q| q.node_port);
            let port = match p.node_port.or(kept) {
                Some(np) => {
                    let key = keys::nodeport(&proto, np);
                    match used.get(&key) {
                        Some(owner) if owner != id => {
                            return Err(bad(format!(
                                "service {id}: spec.ports[{i}].nodePort {np}/{} is already allocated to service {owner}; pick another or leave it out",
                                p.protocol
                            )));
                        }
                        Some(_) => {}
                        None => {
                            compares.push(Compare::absent(key.clone()));
                            ops.push(Op::put(key.clone(), id.to_string()));
                            used.insert(key, id.to_string());
                        }
                    }
                    np
                }
                None => {
                    let np = fjord_model::objects::NODE_PORT_RANGE
                        .clone()
                        .find(|np| !used.contains_key(&keys::nodeport(&proto, *np)))
                        .ok_or_else(|| bad(format!("service {id}: spec.ports[{i}]: no free nodePort left in 30000-32767")))?;
                    let key = keys::nodeport(&proto, np);
                    compares.push(Compare::absent(key.clone()));
                    ops.push(Op::put(key.clone(), id.to_string()));
                    used.insert(key, id.to_string());
                    np
                }
            };
            p.node_port = Some(port);
            mine.insert(keys::nodeport(&proto, port));
        }
    }
    // release what the previous version held and this one does not
    let stale: Vec<String> = used.iter().filter(|(k, owner)| owner.as_str() == id && !mine.contains(*k)).map(|(k, _)| k.clone()).collect();
    for k in stale {
        ops.push(Op::delete(k.clone()));
        used.remove(&k);
    }
    Ok(())
}

fn frontend_count(s: &Service, node_addresses: usize) -> usize {
    let vips = 1 + s.spec.external_ips.len() + lb_ips(s).len();
    let node_ports = s.spec.ports.iter().filter(|p| p.node_port.is_some()).count();
    vips * s.spec.ports.len() + node_ports * node_addresses
}

fn lb_ips(s: &Service) -> Vec<Ipv4Addr> {
    s.status.as_ref().and_then(|st| st.load_balancer.as_ref()).map(|lb| lb.ingress.iter().filter_map(|i| i.ip).collect()).unwrap_or_default()
}

/// Delete objects (and the ClusterIPs of deleted services). Missing ones are reported.
pub async fn delete(agent: &Agent, objects: &[Object]) -> Result<Vec<String>, CniError> {
    let mut ops = vec![];
    let mut missing = vec![];
    for o in objects {
        let key = match o {
            Object::Service(s) => keys::service(&s.metadata.namespace, &s.metadata.name),
            Object::EndpointSlice(e) => keys::endpointslice(&e.metadata.namespace, &e.metadata.name),
            Object::Extension(x) => crate::gatewayapi::key_of(x),
        };
        match agent.store.get(&key).await.map_err(store_err)? {
            None => missing.push(o.key()),
            Some(kv) => {
                if let Object::Service(_) = o {
                    if let Ok(s) = serde_json::from_slice::<Service>(&kv.value) {
                        if let Some(ip) = s.spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
                            ops.push(Op::delete(keys::clusterip(ip)));
                        }
                        for p in &s.spec.ports {
                            if let Some(np) = p.node_port {
                                ops.push(Op::delete(keys::nodeport(&format!("{}", lb_proto(&p.protocol)), np)));
                            }
                        }
                    }
                }
                ops.push(Op::delete(key));
            }
        }
    }
    agent.store.txn(Txn::when(vec![]).and_then(ops)).await.map_err(store_err)?;
    Ok(missing)
}

pub async fn list_services(store: &dyn Store) -> Result<Vec<Service>, CniError> {
    let l = store.list(&keys::services_prefix()).await.map_err(store_err)?;
    Ok(l.kvs.iter().filter_map(|kv| decode_logged(&kv.key, &kv.value)).collect())
}

pub async fn list_slices(store: &dyn Store) -> Result<Vec<EndpointSlice>, CniError> {
    let l = store.list(&keys::endpointslices_prefix()).await.map_err(store_err)?;
    Ok(l.kvs.iter().filter_map(|kv| decode_logged(&kv.key, &kv.value)).collect())
}

fn decode_logged<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Option<T> {
    match serde_json::from_slice(v) {
        Ok(x) => Some(x),
        Err(e) => {
            warn!(key, error = %e, "skipping corrupt record");
            None
        }
    }
}

/// The port a pod serves a service port on (numeric or named targetPort).
fn resolve_target(port: &fjord_model::objects::ServicePort, pod: &Pod) -> Option<u16> {
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod.ports.get(name).copied(),
    }
}

/// This node's EndpointSlices: for every service with a selector, the local pods that match.
pub fn desired_local_slices(node: &str, services: &[Service], pods: &[Pod], atts: &[Attachment]) -> BTreeMap<String, EndpointSlice> {
    let mut out = BTreeMap::new();
    for s in services {
        let Some(sel) = s.spec.selector.as_ref().filter(|m| !m.is_empty()) else { continue };
        let mut endpoints = vec![];
        let mut ports: Option<Vec<EndpointPort>> = None;
        for p in pods.iter().filter(|p| p.node == node && p.namespace == s.metadata.namespace) {
            if !sel.iter().all(|(k, v)| p.labels.get(k) == Some(v)) {
                continue;
            }
            let Some(att) = atts.iter().find(|a| Some(&a.container_id) == p.container_id.as_ref()) else { continue };
            let resolved: Option<Vec<EndpointPort>> = s
                .spec
                .ports
                .iter()
                .map(|sp| Some(EndpointPort { name: sp.name.clone(), port: Some(resolve_target(sp, p)?), protocol: sp.protocol.clone(), app_protocol: None }))
                .collect();
            let Some(resolved) = resolved else {
                warn!(service = %s.metadata.name, pod = %p.name, "pod does not declare the service's named targetPort; not an endpoint");
                continue;
            };
            // One slice per service and node: pods whose ports resolve differently are skipped.
            match &ports {
                None => ports = Some(resolved),
                Some(existing) if *existing != resolved => {
                    warn!(service = %s.metadata.name, pod = %p.name, "pod resolves the targetPorts differently from its peers on this node; skipped");
                    continue;
                }
                _ => {}
            }
            endpoints.push(Endpoint {
                addresses: vec![att.ip],
                conditions: EndpointConditions { ready: Some(p.phase == "Running"), serving: Some(p.phase == "Running"), terminating: Some(false) },
                node_name: Some(node.to_string()),
                target_ref: Some(EndpointTargetRef { kind: Some("Pod".into()), name: Some(p.name.clone()), namespace: Some(p.namespace.clone()), uid: Some(p.uid.clone()) }),
                hostname: None,
                zone: None,
                hints: Default::default(),
            });
        }
        if endpoints.is_empty() {
            continue;
        }
        let name = keys::agent_slice_name(&s.metadata.name, node);
        let mut labels = BTreeMap::new();
        labels.insert(SERVICE_NAME_LABEL.to_string(), s.metadata.name.clone());
        labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY_FJORD.to_string());
        endpoints.sort_by_key(|e| e.addresses[0]);
        let slice = EndpointSlice {
            api_version: "discovery.k8s.io/v1".into(),
            kind: "EndpointSlice".into(),
            metadata: ObjectMeta { name: name.clone(), namespace: s.metadata.namespace.clone(), labels, ..ObjectMeta::default() },
            address_type: "IPv4".into(),
            endpoints,
            ports: ports.unwrap_or_default(),
        };
        out.insert(keys::endpointslice(&s.metadata.namespace, &name), slice);
    }
    out
}

/// This node, as service translation needs it.
#[derive(Debug, Clone, Copy)]
pub struct LocalNode<'a> {
    /// Node name (EndpointSlice endpoints with this nodeName are local).
    pub name: &'a str,
    /// The node's addresses: NodePort frontends listen on each.
    pub addresses: &'a [Ipv4Addr],
}

/// The datapath's frontends for `services` with backends from `slices`, as
/// seen from `node`:
/// - the ClusterIP on every port (internalTrafficPolicy Local: only this node's endpoints),
/// - externalIPs and status.loadBalancer.ingress IPs on every port, and every
///   node address on each nodePort, marked external (reachable from the
///   underlay; externalTrafficPolicy Local: only this node's endpoints),
/// - sessionAffinity ClientIP on all of them.
pub fn desired_frontends<S: std::borrow::Borrow<EndpointSlice>>(services: &[Service], slices: &[S], node: &LocalNode) -> Vec<fjord_lb::Service> {
    let mut out = vec![];
    for s in services.iter().filter(|s| !s.is_headless()) {
        let Some(cip) = s.spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else { continue };
        let itp_local = s.spec.internal_traffic_policy.as_deref() == Some("Local");
        let etp_local = s.spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity_timeout = s.session_affinity_timeout();
        let mut external_vips: Vec<Ipv4Addr> = s.spec.external_ips.clone();
        external_vips.extend(lb_ips(s));
        let mine: Vec<&EndpointSlice> =
            slices.iter().map(|e| e.borrow()).filter(|e| e.metadata.namespace == s.metadata.namespace && e.service_name() == Some(s.metadata.name.as_str())).collect();
        let mut frontends = vec![];
        let mut seen = HashSet::new();
        for sp in &s.spec.ports {
            let proto = lb_proto(&sp.protocol);
            // (backend, is local)
            let mut backends: Vec<(Backend, bool)> = vec![];
            for slice in &mine {
                // Slice ports are named after the service port.
                let Some(ep) = slice.ports.iter().find(|p| p.name == sp.name && p.protocol == sp.protocol).and_then(|p| p.port) else { continue };
                for e in &slice.endpoints {
                    let local = e.node_name.as_deref() == Some(node.name);
                    for ip in &e.addresses {
                        let b = Backend { ip: *ip, port: ep, ready: e.is_ready(), serving: e.is_serving(), terminating: e.is_terminating(), weight: None };
                        backends.push((b, local));
                    }
                }
            }
            let pick = |local_only: bool| -> Vec<Backend> {
                backends.iter().filter(|(_, l)| !local_only || *l).map(|(b, _)| b.clone()).collect()
            };
            let mut push = |vip: Ipv4Addr, port: u16, external: bool, local_only: bool| {
                if seen.insert((vip, port, proto)) {
                    frontends.push(Frontend {
                        vip,
                        port,
                        protocol: proto,
                        backends: pick(local_only),
                        options: FrontendOptions { external, affinity_timeout },
                    });
                }
            };
            push(cip, sp.port, false, itp_local);
            for vip in &external_vips {
                push(*vip, sp.port, true, etp_local);
            }
            if let Some(np) = sp.node_port {
                for a in node.addresses {
                    push(*a, np, true, etp_local);
                }
            }
        }
        out.push(fjord_lb::Service { name: format!("{}/{}", s.metadata.namespace, s.metadata.name), frontends });
    }
    out
}

/// What the service controller knows: a mirror of the store's services,
/// EndpointSlices, pods and this node's attachments, fed by the watch (no
/// re-listing per event), plus what it programmed into the datapath per
/// service, so a change recomputes and reprograms only the services it touches.
#[derive(Default)]
struct Cache {
    /// "ns/name" → service
    services: HashMap<String, Service>,
    /// store key → slice
    slices: HashMap<String, EndpointSlice>,
    /// "ns/name" of a service → store keys of its slices (by the service-name label)
    slices_by_service: HashMap<String, BTreeSet<String>>,
    pods: BTreeMap<String, Pod>,
    atts: BTreeMap<String, Attachment>,
    /// "ns/name" → (frontend keys, backend count) programmed for it
    programmed: HashMap<String, (Vec<fjord_lb::ServiceKey>, usize)>,
    /// frontend → the service that programmed it (one writer per frontend)
    owner: HashMap<fjord_lb::ServiceKey, String>,
    frontends: usize,
    backends: usize,
}

/// What one batch of watch events changed.
#[derive(Default)]
struct Dirty {
    /// services ("ns/name") whose frontends must be recomputed
    services: BTreeSet<String>,
    /// pods or attachments changed: the endpoint controller looks at every service
    pods: bool,
    /// recompute everything (start, resync after a watch error)
    all: bool,
}

fn slice_owner(e: &EndpointSlice) -> Option<String> {
    e.service_name().map(|n| format!("{}/{}", e.metadata.namespace, n))
}

impl Cache {
    fn service_id(key: &str) -> Option<String> {
        key.strip_prefix(&keys::services_prefix()).map(str::to_string)
    }

    fn put_slice(&mut self, key: String, e: Option<EndpointSlice>, dirty: &mut Dirty) {
        let old = match &e {
            Some(new) => {
                if self.slices.get(&key) == Some(new) {
                    return; // our own write coming back through the watch
                }
                self.slices.insert(key.clone(), new.clone())
            }
            None => self.slices.remove(&key),
        };
        if let Some(o) = old.as_ref().and_then(slice_owner) {
            if let Some(set) = self.slices_by_service.get_mut(&o) {
                set.remove(&key);
                if set.is_empty() {
                    self.slices_by_service.remove(&o);
                }
            }
            dirty.services.insert(o);
        }
        if let Some(o) = e.as_ref().and_then(slice_owner) {
            self.slices_by_service.entry(o.clone()).or_default().insert(key);
            dirty.services.insert(o);
        }
    }

    /// Applies one watch event; false if the key is not one the controller follows.
    fn apply(&mut self, node: &str, kind: &fjord_store::EventKind, key: &str, value: &[u8], dirty: &mut Dirty) -> bool {
        let put = matches!(kind, fjord_store::EventKind::Put);
        if let Some(id) = Self::service_id(key) {
            let new: Option<Service> = if put { decode_logged(key, value) } else { None };
            let changed = match &new {
                Some(n) => self.services.get(&id) != Some(n),
                None => self.services.contains_key(&id),
            };
            if changed {
                match new {
                    Some(n) => self.services.insert(id.clone(), n),
                    None => self.services.remove(&id),
                };
                dirty.services.insert(id);
            }
        } else if key.starts_with(&keys::endpointslices_prefix()) {
            let new: Option<EndpointSlice> = if put { decode_logged(key, value) } else { None };
            self.put_slice(key.to_string(), new, dirty);
        } else if key.starts_with(&keys::pods_prefix()) {
            let new: Option<Pod> = if put { decode_logged(key, value) } else { None };
            if self.pods.get(key) != new.as_ref() {
                match new {
                    Some(p) => self.pods.insert(key.to_string(), p),
                    None => self.pods.remove(key),
                };
                dirty.pods = true;
            }
        } else if key.starts_with(&keys::attachments_prefix(node)) {
            let new: Option<Attachment> = if put { decode_logged(key, value) } else { None };
            if self.atts.get(key) != new.as_ref() {
                match new {
                    Some(a) => self.atts.insert(key.to_string(), a),
                    None => self.atts.remove(key),
                };
                dirty.pods = true;
            }
        } else {
            return false;
        }
        true
    }
}

/// Endpoint controller (one writer per fact: this node's pods → this node's
/// EndpointSlices) for the services `dirty` names, from the cache; writes the
/// difference in one transaction and folds it into the cache.
async fn sync_local_slices(agent: &Agent, cache: &mut Cache, dirty: &mut Dirty, lease: Option<i64>) -> anyhow::Result<()> {
    let everything = dirty.all || dirty.pods;
    let in_scope = |id: &str| everything || dirty.services.contains(id);
    let services: Vec<Service> = if everything {
        cache.services.values().cloned().collect()
    } else {
        dirty.services.iter().filter_map(|id| cache.services.get(id).cloned()).collect()
    };
    let pods: Vec<Pod> = cache.pods.values().cloned().collect();
    let atts: Vec<Attachment> = cache.atts.values().cloned().collect();
    let want = desired_local_slices(&agent.node, &services, &pods, &atts);
    let suffix = format!("-fjord-{}", agent.node);
    let mut ops = vec![];
    let mut writes: Vec<(String, Option<EndpointSlice>)> = vec![];
    for (k, e) in &want {
        if cache.slices.get(k) != Some(e) {
            ops.push(Op::Put { key: k.clone(), value: serde_json::to_vec(e)?, lease });
            writes.push((k.clone(), Some(e.clone())));
        }
    }
    // slices that may have to go: all, or (a change of a few services) only theirs — not a
    // walk over every slice of the cluster per change
    let candidates: Vec<(&String, &EndpointSlice)> = if everything {
        cache.slices.iter().collect()
    } else {
        dirty.services.iter().filter_map(|id| cache.slices_by_service.get(id)).flatten().filter_map(|k| cache.slices.get_key_value(k)).collect()
    };
    for (k, e) in candidates {
        let mine = e.metadata.labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_FJORD) && e.metadata.name.ends_with(&suffix);
        if mine && !want.contains_key(k) && slice_owner(e).is_some_and(|o| in_scope(&o)) {
            ops.push(Op::delete(k.clone()));
            writes.push((k.clone(), None));
        }
    }
    if !ops.is_empty() {
        agent.store.txn(Txn::when(vec![]).and_then(ops)).await?;
        for (k, e) in writes {
            cache.put_slice(k, e, dirty);
        }
    }
    Ok(())
}

/// What translation reads of the cache (shared with the translation threads while
/// `program_chunk` updates the bookkeeping).
#[derive(Clone, Copy)]
struct CacheView<'a> {
    services: &'a HashMap<String, Service>,
    slices: &'a HashMap<String, EndpointSlice>,
    slices_by_service: &'a HashMap<String, BTreeSet<String>>,
}

impl CacheView<'_> {
    /// Frontends of one service (not yet translated).
    fn frontends_of(&self, id: &str, node: &LocalNode) -> Vec<fjord_lb::Service> {
        let Some(s) = self.services.get(id) else { return vec![] };
        let slices: Vec<&EndpointSlice> = self.slices_by_service.get(id).into_iter().flatten().filter_map(|k| self.slices.get(k)).collect();
        desired_frontends(std::slice::from_ref(s), &slices, node)
    }
}

/// The controller's record of what it programmed (updated per chunk).
struct Book<'a> {
    programmed: &'a mut HashMap<String, (Vec<fjord_lb::ServiceKey>, usize)>,
    owner: &'a mut HashMap<fjord_lb::ServiceKey, String>,
    frontends: &'a mut usize,
    backends: &'a mut usize,
}

/// Services translated and programmed per chunk: bounds the memory of built
/// Maglev tables (64 KiB each at M = 16381; two chunks are alive at a time) and pays
/// one RCU grace period per chunk.
const PROGRAM_CHUNK: usize = 512;

/// Up to this many services (a change, in `program`) or frontends (in `translate_all`) are
/// translated on the calling thread: starting threads would cost more than the tables.
const INLINE_TRANSLATE: usize = 8;

/// Services in the store from which a cold start creates tables ahead (`load_cache`).
const PREFILL_MIN: usize = 256;

/// Translates (Maglev) on up to 2 threads; a few frontends (a single change) on this one
/// (starting threads would cost more than the tables: ~90 µs each).
fn translate_all(lbs: &[fjord_lb::Service], cfg: &LbConfig) -> Vec<(String, Result<Vec<fjord_lb::FrontendEntries>, String>)> {
    let one = |s: &fjord_lb::Service| (s.name.clone(), fjord_lb::translate(s, cfg).map_err(|e| e.to_string()));
    if lbs.len() <= INLINE_TRANSLATE {
        return lbs.iter().map(one).collect();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 2);
    let per = lbs.len().div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let hs: Vec<_> = lbs
            .chunks(per)
            .map(|part| sc.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("translate thread")).collect()
    })
}

/// Programs the datapath for the dirty services (all of them on a full sync):
/// per service, desired frontends → Maglev → upsert; frontends it no longer
/// has are deleted. On a full sync, frontends nobody owns (left from before a
/// restart) are deleted too. Chunks are pipelined: the Maglev tables of the next
/// chunk are built while the current one is written to the kernel.
fn program(dp: &mut fjord_datapath::Datapath, cache: &mut Cache, ids: Vec<String>, full: bool, node: &LocalNode) -> anyhow::Result<()> {
    let cfg = LbConfig { maglev_size: dp.config().maglev_size, ..LbConfig::default() };
    let mut wanted_all: HashSet<fjord_lb::ServiceKey> = HashSet::new();
    let chunks: Vec<&[String]> = ids.chunks(PROGRAM_CHUNK).collect();
    let Cache { services, slices, slices_by_service, programmed, owner, frontends, backends, .. } = cache;
    let view = CacheView { services, slices, slices_by_service };
    let mut book = Book { programmed, owner, frontends, backends };
    let cfg = &cfg;
    // a chunk's frontends are gathered (from the cache) and translated on the translation
    // threads, so nothing but kernel writes and bookkeeping runs on this one
    let translate = |chunk: &[String]| {
        let lbs: Vec<fjord_lb::Service> = chunk.iter().flat_map(|id| view.frontends_of(id, node)).collect();
        translate_all(&lbs, cfg)
    };
    let translate = &translate;
    if let [chunk] = chunks.as_slice() {
        if chunk.len() <= INLINE_TRANSLATE {
            // a change of a few services: nothing to overlap, no thread to start
            program_chunk(dp, &mut book, view.services, chunk, translate(chunk), &mut wanted_all)?;
            return finish(dp, &mut book, full, &wanted_all);
        }
    }
    std::thread::scope(|sc| -> anyhow::Result<()> {
        let mut next = chunks.first().map(|c| sc.spawn(move || translate(c)));
        for (k, chunk) in chunks.iter().enumerate() {
            let translated = next.take().expect("translation of this chunk was started").join().expect("translate thread");
            next = chunks.get(k + 1).map(|c| sc.spawn(move || translate(c)));
            program_chunk(dp, &mut book, view.services, chunk, translated, &mut wanted_all)?;
        }
        Ok(())
    })?;
    finish(dp, &mut book, full, &wanted_all)
}

/// After a full sync: frontends nobody wants (left from before a restart) are deleted.
fn finish(dp: &mut fjord_datapath::Datapath, book: &mut Book, full: bool, wanted_all: &HashSet<fjord_lb::ServiceKey>) -> anyhow::Result<()> {
    if full {
        let stale: Vec<fjord_lb::ServiceKey> = dp.services().into_iter().filter(|k| !wanted_all.contains(k)).collect();
        for k in &stale {
            book.owner.remove(k);
        }
        dp.delete_many(&stale)?;
    }
    Ok(())
}

/// Writes one translated chunk of services to the datapath and the bookkeeping.
fn program_chunk(
    dp: &mut fjord_datapath::Datapath,
    book: &mut Book,
    services: &HashMap<String, Service>,
    chunk: &[String],
    translated: Vec<(String, Result<Vec<fjord_lb::FrontendEntries>, String>)>,
    wanted_all: &mut HashSet<fjord_lb::ServiceKey>,
) -> anyhow::Result<()> {
    let mut by_service: HashMap<String, Vec<fjord_lb::FrontendEntries>> = HashMap::new();
    for (name, r) in translated {
        match r {
            Ok(fes) => by_service.entry(name).or_default().extend(fes),
            Err(e) => {
                warn!(service = %name, error = %e, "service skipped");
                by_service.entry(name).or_default();
            }
        }
    }
    let mut entries = vec![];
    let mut new_programmed: Vec<(String, Vec<fjord_lb::ServiceKey>, usize)> = vec![];
    for id in chunk {
        let fes = by_service.remove(id).unwrap_or_default();
        let mut keys_of = vec![];
        let mut nb = 0;
        for fe in fes {
            match book.owner.get(&fe.key) {
                Some(o) if o != id && services.contains_key(o) && !wanted_all.contains(&fe.key) && !chunk.contains(o) => {
                    warn!(service = %id, frontend = %fe.key, owner = %o, "frontend already belongs to another service; skipped");
                    continue;
                }
                _ => {}
            }
            if !wanted_all.insert(fe.key) {
                warn!(service = %id, frontend = %fe.key, "frontend listed by two services; skipped");
                continue;
            }
            keys_of.push(fe.key);
            nb += fe.backends.len();
            entries.push(fe);
        }
        new_programmed.push((id.clone(), keys_of, nb));
    }
    dp.upsert_many(&entries)?;
    drop(entries);
    let mut gone = vec![];
    for (id, keys_of, nb) in new_programmed {
        let (old_keys, old_nb) = book.programmed.remove(&id).unwrap_or_default();
        *book.frontends -= old_keys.len();
        *book.backends -= old_nb;
        for k in old_keys.iter().filter(|k| !keys_of.contains(k)) {
            if book.owner.get(k) == Some(&id) {
                book.owner.remove(k);
                if !wanted_all.contains(k) {
                    gone.push(*k);
                }
            }
        }
        for k in &keys_of {
            book.owner.insert(*k, id.clone());
        }
        *book.frontends += keys_of.len();
        *book.backends += nb;
        if !keys_of.is_empty() || services.contains_key(&id) {
            book.programmed.insert(id, (keys_of, nb));
        }
    }
    // frontends the services dropped: one batch (one RCU grace period for their tables)
    dp.delete_many(&gone)?;
    Ok(())
}

/// One pass over what changed: own EndpointSlices, then the datapath.
/// `seen`: when the agent received the first event of this batch.
async fn sync(agent: &Agent, dp: Option<&Arc<Mutex<fjord_datapath::Datapath>>>, cache: &mut Cache, mut dirty: Dirty, lease: Option<i64>, revision: i64, seen: Instant) -> anyhow::Result<()> {
    let t0 = Instant::now();
    sync_local_slices(agent, cache, &mut dirty, lease).await?;
    let t_slices = t0.elapsed();
    let Some(dp) = dp else { return Ok(()) };
    let ids: Vec<String> = if dirty.all {
        // every service, and every one programmed before (it may be gone since)
        let mut all: BTreeSet<String> = cache.services.keys().cloned().collect();
        all.extend(cache.programmed.keys().cloned());
        all.into_iter().collect()
    } else {
        dirty.services.iter().cloned().collect()
    };
    let n = ids.len();
    let dp = dp.clone();
    let dp_for_maintain = dp.clone();
    let full = dirty.all;
    let (node_name, addresses) = (agent.node.clone(), agent.node_addresses());
    let t_prog = Instant::now();
    // A change of a few services (~0.3 ms of map writes) runs right here when the datapath is
    // free: handing it to a blocking thread and back costs more (and up to ms when the cores
    // are busy). Larger syncs, or a datapath busy with upkeep, go to a blocking thread.
    let mut inline = None;
    if !full && n <= INLINE_TRANSLATE {
        if let Ok(mut g) = dp.try_lock() {
            inline = Some(program(&mut g, cache, ids.clone(), full, &LocalNode { name: &node_name, addresses: &addresses }));
        }
    }
    let (r, path) = if let Some(r) = inline {
        (r, "inline")
    } else {
        // the cache moves into the blocking task and back (map updates block on the kernel)
        let mut owned = std::mem::take(cache);
        let (back, r) = tokio::task::spawn_blocking(move || {
            let r = program(&mut dp.lock().unwrap(), &mut owned, ids, full, &LocalNode { name: &node_name, addresses: &addresses });
            (owned, r)
        })
        .await?;
        *cache = back;
        (r, "blocking thread")
    };
    let t_prog = t_prog.elapsed();
    r?;
    let (nfe, nbe) = (cache.frontends, cache.backends);
    let took = seen.elapsed();
    *agent.services.frontends.lock().unwrap() = nfe;
    *agent.services.backends.lock().unwrap() = nbe;
    *agent.services.last_sync.lock().unwrap() = Some((Instant::now(), t0.elapsed()));
    *agent.services.last_error.lock().unwrap() = None;
    agent.metrics.service_sync_seconds.observe(t0.elapsed().as_secs_f64());
    agent.metrics.service_event_to_datapath_seconds.observe(took.as_secs_f64());
    agent.metrics.service_last_event_to_datapath_seconds.set(took.as_secs_f64());
    agent.metrics.service_last_sync_services.set(n as i64);
    agent.metrics.service_synced_revision.set(revision);
    agent.metrics.datapath_frontends.set(nfe as i64);
    agent.metrics.datapath_backends.set(nbe as i64);
    tracing::debug!(
        services = n,
        frontends = nfe,
        backends = nbe,
        full,
        ms = took.as_secs_f64() * 1000.0,
        endpoint_controller_ms = t_slices.as_secs_f64() * 1000.0,
        program_ms = t_prog.as_secs_f64() * 1000.0,
        program_on = path,
        "services synced"
    );
    // after the change is in the maps: spare-table upkeep (waits one RCU grace period, so
    // that the next change can flip to a clean spare without waiting)
    // and the heap given back after a large sync (malloc_trim walks the whole heap: tens of
    // ms after 10,000 services, none of it needed for the maps to hold the change)
    let dp2 = dp_for_maintain;
    match tokio::task::spawn_blocking(move || {
        if n >= 64 {
            trim_heap();
        }
        dp2.lock().unwrap().maintain()
    })
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "Maglev spare-table upkeep failed"),
        Err(e) => warn!(error = %e, "Maglev spare-table upkeep task failed"),
    }
    Ok(())
}

/// Gives memory freed after a large sync (translated Maglev tables) back to the OS.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lists what the controller follows (at one revision) into a fresh cache.
/// On a cold start (the datapath holds no frontend) of many services, blank Maglev tables
/// are created on another thread meanwhile (see `TableStash`): the returned stash, to be
/// stopped once the first sync is done.
async fn load_cache(agent: &Agent, dp: Option<&Arc<Mutex<fjord_datapath::Datapath>>>) -> anyhow::Result<(Cache, i64, Option<Arc<fjord_datapath::TableStash>>)> {
    let mut cache = Cache::default();
    let mut dirty = Dirty::default();
    let t = Instant::now();
    let l = agent.store.list(keys::PREFIX).await?;
    let listed = t.elapsed();
    for kv in &l.kvs {
        cache.apply(&agent.node, &fjord_store::EventKind::Put, &kv.key, &kv.value, &mut dirty);
    }
    let stash = dp.and_then(|dp| start_prefill(dp, cache.big_tables_wanted()));
    tracing::debug!(records = l.kvs.len(), list_ms = listed.as_secs_f64() * 1000.0, decode_ms = (t.elapsed() - listed).as_secs_f64() * 1000.0, prefill = stash.is_some(), "service cache loaded");
    Ok((cache, l.revision, stash))
}

impl Cache {
    /// About how many services get a big Maglev table (M slots): those with sessionAffinity
    /// or more endpoints than fit a service entry; the others live in their service entries.
    fn big_tables_wanted(&self) -> usize {
        self.services
            .iter()
            .filter(|(id, s)| {
                s.session_affinity_timeout().is_some()
                    || self.slices_by_service.get(*id).into_iter().flatten().filter_map(|k| self.slices.get(k)).map(|sl| sl.endpoints.len()).sum::<usize>()
                        > fjord_lb::COMPACT_MAX_BACKENDS
            })
            .count()
    }
}

/// Starts filling the datapath's stash of blank tables on another thread when this is a
/// cold start (the datapath holds no frontend) of at least `PREFILL_MIN` services that
/// need big tables.
fn start_prefill(dp: &Mutex<fjord_datapath::Datapath>, services: usize) -> Option<Arc<fjord_datapath::TableStash>> {
    if services < PREFILL_MIN {
        return None;
    }
    let stash = dp.try_lock().ok().filter(|d| d.frontend_count() == 0)?.table_stash();
    let filler = stash.clone();
    std::thread::Builder::new().name("fjord-tbl-prefill".into()).spawn(move || filler.prefill(services)).ok()?;
    Some(stash)
}

/// Watch everything services depend on and reprogram what changed.
pub async fn run(agent: Arc<Agent>, dp: Option<Arc<Mutex<fjord_datapath::Datapath>>>, lease: Arc<std::sync::atomic::AtomicI64>) {
    let mut backoff = Duration::from_millis(100);
    let mut programmed = Cache::default();
    loop {
        let r: anyhow::Result<()> = async {
            let l = |lease: &std::sync::atomic::AtomicI64| Some(lease.load(std::sync::atomic::Ordering::Relaxed)).filter(|l| *l != 0);
            let seen = Instant::now();
            let (mut cache, rev, stash) = load_cache(&agent, dp.as_ref()).await?;
            // keep what is programmed (so a resync deletes frontends of services gone meanwhile)
            cache.programmed = std::mem::take(&mut programmed.programmed);
            cache.owner = std::mem::take(&mut programmed.owner);
            cache.frontends = programmed.frontends;
            cache.backends = programmed.backends;
            let res = sync(&agent, dp.as_ref(), &mut cache, Dirty { all: true, ..Dirty::default() }, l(&lease), rev, seen).await;
            if let Some(st) = stash {
                st.stop();
            }
            let res = match res {
                Ok(()) => {
                    // the full sync re-referenced every backend it wants: the entries a
                    // restart kept for draining flows that no service wants now can go
                    if let Some(dp) = dp.clone() {
                        match tokio::task::spawn_blocking(move || dp.lock().unwrap().drop_unused_backends()).await {
                            Ok(Ok(n)) if n > 0 => info!(removed = n, "removed backend entries no service references any more"),
                            Ok(Err(e)) => warn!(error = %e, "could not remove unused backend entries"),
                            _ => {}
                        }
                    }
                    let mut w = agent.store.watch(keys::PREFIX, rev + 1).await?;
                    backoff = Duration::from_millis(100);
                    watch_loop(&agent, dp.as_ref(), &mut cache, &mut w, &lease).await
                }
                Err(e) => Err(e),
            };
            programmed.programmed = std::mem::take(&mut cache.programmed);
            programmed.owner = std::mem::take(&mut cache.owner);
            programmed.frontends = cache.frontends;
            programmed.backends = cache.backends;
            res
        }
        .await;
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "service watch or sync interrupted; datapath keeps its state");
            *agent.services.last_error.lock().unwrap() = Some(format!("{e:#}"));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        info!("service controller resyncing");
    }
}

async fn watch_loop(
    agent: &Agent,
    dp: Option<&Arc<Mutex<fjord_datapath::Datapath>>>,
    cache: &mut Cache,
    w: &mut fjord_store::WatchStream,
    lease: &std::sync::atomic::AtomicI64,
) -> anyhow::Result<()> {
    use futures::FutureExt;
    loop {
        let ev = w.recv().await.ok_or_else(|| anyhow::anyhow!("watch ended"))??;
        let seen = Instant::now();
        let mut dirty = Dirty::default();
        let mut rev = ev.kv.mod_revision;
        let mut relevant = cache.apply(&agent.node, &ev.kind, &ev.kv.key, &ev.kv.value, &mut dirty);
        // take whatever else is already queued (a burst, e.g. one apply of many objects) without waiting
        let mut drained = 0usize;
        while let Some(more) = w.recv().now_or_never() {
            let ev = more.ok_or_else(|| anyhow::anyhow!("watch ended"))??;
            rev = rev.max(ev.kv.mod_revision);
            relevant |= cache.apply(&agent.node, &ev.kind, &ev.kv.key, &ev.kv.value, &mut dirty);
            drained += 1;
        }
        if drained >= 8 {
            // a burst (one apply of many objects) is still streaming in: take it whole
            // (a single apply — a Service and its slice, a few events — is programmed at once)
            // (until a 2 ms gap, at most 250 ms) so it is programmed in few large batches
            let deadline = Instant::now() + Duration::from_millis(250);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(2), w.recv()).await {
                    Ok(more) => {
                        let ev = more.ok_or_else(|| anyhow::anyhow!("watch ended"))??;
                        rev = rev.max(ev.kv.mod_revision);
                        relevant |= cache.apply(&agent.node, &ev.kind, &ev.kv.key, &ev.kv.value, &mut dirty);
                    }
                    Err(_) => break,
                }
            }
        }
        if !relevant || (dirty.services.is_empty() && !dirty.pods) {
            // nothing for the datapath (e.g. heartbeats): it is in sync through this revision
            agent.metrics.service_synced_revision.set(rev);
            continue;
        }
        let l = Some(lease.load(std::sync::atomic::Ordering::Relaxed)).filter(|l| *l != 0);
        if let Err(e) = sync(agent, dp, cache, dirty, l, rev, seen).await {
            // the cache is ahead of the datapath now: resync everything
            return Err(e.context("service sync failed"));
        }
    }
}
