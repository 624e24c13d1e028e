//! The agent's state and its CNI operations.

use crate::ipam::Pool;
use crate::metrics::Metrics;
use crate::plumbing;
use fjord_model::api::*;
use fjord_model::cni::{code, AttachmentRef, CniError};
use fjord_model::keys;
use fjord_net::{host_veth_name, Netlink};
use fjord_store::{Compare, Op, Store, Txn};
use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

pub const DEFAULT_MTU: u32 = 1500;

pub struct Agent {
    pub node: String,
    pub store: Arc<dyn Store>,
    pub pool: Pool,
    pub nl: Netlink,
    pub metrics: Metrics,
    pub started: Instant,
    /// `native` or `vxlan`.
    pub routing: String,
    /// The nodes this agent knows (from the store's watch).
    pub nodes: Arc<crate::cluster::NodeView>,
    /// Probes to the other nodes.
    pub health: Arc<crate::health::HealthView>,
    /// The eBPF service datapath, once loaded (absent with --datapath off or if loading failed).
    pub datapath: std::sync::OnceLock<Arc<Mutex<fjord_datapath::Datapath>>>,
    /// Addresses of this node's deleted pods in the datapath (set with the datapath).
    pub gone_ips: std::sync::OnceLock<Arc<fjord_datapath::GoneIps>>,
    /// Why the datapath is not loaded, if it is not.
    pub datapath_error: Mutex<Option<String>>,
    /// Service controller state.
    pub services: crate::services::ServiceView,
    /// This node's underlay addresses (NodePort frontends listen on each).
    pub addresses: Mutex<Vec<Ipv4Addr>>,
    /// Serializes ADD/DEL/GC/zombie cleanup on this node.
    cni_lock: tokio::sync::Mutex<()>,
    /// Last address given (round-robin cursor).
    cursor: Mutex<Option<Ipv4Addr>>,
    /// Host veths the agent itself is deleting (not zombies).
    deleting: Mutex<HashSet<String>>,
}

fn store_err(e: fjord_store::StoreError) -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, "the agent's store failed").details(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, CniError> {
    serde_json::from_slice(v).map_err(|e| CniError::new(code::IO_FAILURE, format!("corrupt record in store under {key}")).details(e.to_string()))
}

impl Agent {
    /// Copies the eBPF datapath counters into the Prometheus metrics.
    pub fn refresh_datapath_metrics(&self) {
        let Some(dp) = self.datapath.get() else { return };
        let counters = match dp.lock().unwrap().counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "reading datapath counters");
                return;
            }
        };
        for (name, v) in counters {
            self.metrics.datapath_events.get_or_create(&crate::metrics::EventLabels { event: name.to_string() }).set(v as i64);
        }
    }

    /// Renders /metrics (datapath counters refreshed first).
    pub fn render_metrics(&self) -> String {
        self.refresh_datapath_metrics();
        self.metrics.render()
    }

    /// This node's underlay addresses (first = the primary one).
    pub fn node_addresses(&self) -> Vec<Ipv4Addr> {
        self.addresses.lock().unwrap().clone()
    }

    pub fn new(node: String, store: Arc<dyn Store>, pool: Pool, nl: Netlink, routing: &str) -> Arc<Agent> {
        let metrics = Metrics::new(&node);
        metrics.ipam_capacity.set(pool.capacity() as i64);
        Arc::new(Agent {
            node,
            store,
            pool,
            nl,
            metrics,
            started: Instant::now(),
            routing: routing.to_string(),
            nodes: Arc::new(crate::cluster::NodeView::default()),
            health: Arc::new(crate::health::HealthView::default()),
            datapath: std::sync::OnceLock::new(),
            datapath_error: Mutex::new(None),
            gone_ips: std::sync::OnceLock::new(),
            services: crate::services::ServiceView::default(),
            addresses: Mutex::new(Vec::new()),
            cni_lock: tokio::sync::Mutex::new(()),
            cursor: Mutex::new(None),
            deleting: Mutex::new(HashSet::new()),
        })
    }

    /// Refuse a PodCIDR change while pods hold addresses from the old one.
    pub async fn check_pod_cidr(&self) -> anyhow::Result<()> {
        let key = keys::node(&self.node);
        if let Some(kv) = self.store.get(&key).await? {
            let prev: NodeRecord = serde_json::from_slice(&kv.value)?;
            if prev.pod_cidr != self.pool.cidr() {
                let allocated = self.store.list(&keys::ipam_prefix(&self.node)).await?.kvs.len();
                if allocated > 0 {
                    anyhow::bail!(
                        "node {} was registered with PodCIDR {} and {allocated} pod addresses are still allocated from it; \
                         start the agent with --pod-cidr {} or delete the node's pods first",
                        self.node,
                        prev.pod_cidr,
                        prev.pod_cidr
                    );
                }
            }
        }
        Ok(())
    }

    pub async fn attachments(&self) -> Result<Vec<Attachment>, CniError> {
        let l = self.store.list(&keys::attachments_prefix(&self.node)).await.map_err(store_err)?;
        self.metrics.store_revision.set(l.revision);
        let mut out = Vec::new();
        for kv in l.kvs {
            match decode::<Attachment>(&kv.key, &kv.value) {
                Ok(a) => out.push(a),
                Err(e) => warn!(key = %kv.key, error = %e, "skipping corrupt attachment record"),
            }
        }
        self.metrics.attachments.set(out.len() as i64);
        Ok(out)
    }

    async fn attachment(&self, cid: &str, ifname: &str) -> Result<Option<Attachment>, CniError> {
        let key = keys::attachment(&self.node, cid, ifname);
        match self.store.get(&key).await.map_err(store_err)? {
            Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
            None => Ok(None),
        }
    }

    async fn used_ips(&self) -> Result<BTreeSet<Ipv4Addr>, CniError> {
        let l = self.store.list(&keys::ipam_prefix(&self.node)).await.map_err(store_err)?;
        let used: BTreeSet<Ipv4Addr> = l.kvs.iter().filter_map(|kv| keys::ip_of_ipam_key(&kv.key)).collect();
        self.metrics.ipam_allocated.set(used.len() as i64);
        Ok(used)
    }

    pub async fn ipam_status(&self) -> Result<IpamStatus, CniError> {
        let used = self.used_ips().await?;
        Ok(IpamStatus { pod_cidr: self.pool.cidr(), gateway: self.pool.gateway(), capacity: self.pool.capacity(), allocated: used.len() as u32 })
    }

    fn netns_of(req: &CniRequest) -> Result<PathBuf, CniError> {
        let ns = req.netns.as_deref().ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required"))?;
        let p = PathBuf::from(ns);
        if !p.exists() {
            return Err(CniError::new(code::INVALID_ENV, format!("CNI_NETNS {ns} does not exist"))
                .details("the pod's network namespace must exist before ADD/CHECK"));
        }
        Ok(p)
    }

    pub async fn add(&self, req: &CniRequest) -> Result<CniAddResponse, CniError> {
        let t0 = Instant::now();
        let r = self.add_inner(req).await;
        self.metrics.cni("ADD", r.is_ok());
        self.metrics.cni_add_seconds.observe(t0.elapsed().as_secs_f64());
        match &r {
            Ok(a) => info!(pod = ?req.pod_ref(), container = %req.container_id, ip = %a.attachment.ip, ms = t0.elapsed().as_millis() as u64, "pod attached"),
            Err(e) => warn!(container = %req.container_id, error = %e, "CNI ADD failed"),
        }
        r
    }

    async fn add_inner(&self, req: &CniRequest) -> Result<CniAddResponse, CniError> {
        let netns_path = Self::netns_of(req)?;
        let mtu = req.mtu.unwrap_or(DEFAULT_MTU);
        let _g = self.cni_lock.lock().await;
        if let Some(existing) = self.attachment(&req.container_id, &req.ifname).await? {
            let same_ns = existing.netns == netns_path.display().to_string();
            if same_ns && self.nl.link(&existing.host_veth).await.ok().flatten().is_some() {
                // A retried ADD: answer with what exists.
                let host_mac = self.nl.link(&existing.host_veth).await.ok().flatten().map(|l| l.mac).unwrap_or_default();
                return Ok(CniAddResponse { attachment: existing, host_mac, pod_mac: String::new(), mtu });
            }
            return Err(CniError::new(
                code::ALREADY_EXISTS,
                format!("attachment {}/{} already exists on node {} with IP {}", req.container_id, req.ifname, self.node, existing.ip),
            )
            .details("run CNI DEL for it first"));
        }
        // Allocate: compare-and-swap on the IPAM key, retried on a lost race.
        let akey = keys::attachment(&self.node, &req.container_id, &req.ifname);
        let host_veth = host_veth_name(&req.container_id, &req.ifname);
        let mut attempt = 0;
        let t_alloc = Instant::now();
        let att = loop {
            attempt += 1;
            let used = self.used_ips().await?;
            let cursor = *self.cursor.lock().unwrap();
            let Some(ip) = self.pool.next_free(&used, cursor) else {
                return Err(CniError::new(
                    code::IPAM_EXHAUSTED,
                    format!("no free pod address on node {}: PodCIDR {} has {} addresses and all are allocated", self.node, self.pool.cidr(), self.pool.capacity()),
                )
                .details("delete pods on this node, or give the node a larger PodCIDR"));
            };
            let (pod_namespace, pod_name) = req.pod_ref().unzip();
            let att = Attachment {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                netns: netns_path.display().to_string(),
                node: self.node.clone(),
                ip,
                gateway: self.pool.gateway(),
                host_veth: host_veth.clone(),
                pod_namespace,
                pod_name,
                created_unix_ms: now_ms(),
            };
            let ikey = keys::ipam(&self.node, ip);
            let owner = format!("{}/{}", req.container_id, req.ifname);
            let txn = Txn::when(vec![Compare::absent(ikey.clone()), Compare::absent(akey.clone())])
                .and_then(vec![Op::put(ikey, owner), Op::put(akey.clone(), serde_json::to_vec(&att).unwrap())]);
            let r = self.store.txn(txn).await.map_err(store_err)?;
            if r.succeeded {
                *self.cursor.lock().unwrap() = Some(ip);
                self.metrics.store_revision.set(r.revision);
                break att;
            }
            if attempt >= 8 {
                return Err(CniError::new(code::TRY_AGAIN_LATER, "could not allocate a pod address: the store kept changing underneath"));
            }
        };
        let t_store = t_alloc.elapsed();
        // the address belongs to a pod again
        if let Some(g) = self.gone_ips.get() {
            if let Err(e) = g.clear(att.ip) {
                warn!(ip = %att.ip, error = %e, "could not clear a reused pod address in the datapath");
            }
        }
        let t1 = Instant::now();
        // The datapath attach (two TCX links: each waits for an RCU grace period) runs while
        // the pod end is moved and configured.
        let plumbed = match plumbing::create_pair(&self.nl, &host_veth, mtu).await {
            Ok(()) => {
                let (attached, configured) = tokio::join!(
                    self.attach_datapath(&host_veth),
                    plumbing::configure(&self.nl, &netns_path, &host_veth, &req.ifname, att.ip, att.gateway)
                );
                tracing::debug!(container = %req.container_id, store_ms = t_store.as_secs_f64() * 1e3, plumb_and_attach_ms = t1.elapsed().as_secs_f64() * 1e3, "ADD phases");
                match (configured, attached) {
                    (Ok(x), Ok(())) => Ok(x),
                    (Err(e), _) => Err(e),
                    (_, Err(e)) => Err(e.context("attaching the service datapath to the pod's veth")),
                }
            }
            Err(e) => Err(e),
        };
        match plumbed {
            Ok((host_mac, pod)) => {
                self.metrics.ipam_allocated.inc();
                self.metrics.attachments.inc();
                Ok(CniAddResponse { attachment: att, host_mac, pod_mac: pod.mac, mtu })
            }
            Err(e) => {
                // Nothing half-applied: remove the interface and the allocation.
                self.mark_deleting(&host_veth, true);
                let _ = self.nl.delete_link(&host_veth).await;
                let _ = self.nl.delete_link(&plumbing::peer_tmp_name(&host_veth)).await;
                self.mark_deleting(&host_veth, false);
                let _ = self.release(&att).await;
                Err(CniError::new(code::PLUMBING_FAILED, format!("could not set up {} in {}", req.ifname, netns_path.display())).details(format!("{e:#}")))
            }
        }
    }

    pub async fn datapath_status(&self) -> DatapathStatus {
        let last_sync = *self.services.last_sync.lock().unwrap();
        let mut st = DatapathStatus {
            frontends: *self.services.frontends.lock().unwrap() as u64,
            backends: *self.services.backends.lock().unwrap() as u64,
            last_sync_ms_ago: last_sync.map(|(t, _)| t.elapsed().as_millis() as u64),
            last_sync_duration_us: last_sync.map(|(_, d)| d.as_micros() as u64),
            last_error: self.services.last_error.lock().unwrap().clone(),
            ..Default::default()
        };
        let Some(dp) = self.datapath.get().cloned() else {
            st.kube_proxy_replacement = format!("Disabled ({})", self.datapath_error.lock().unwrap().clone().unwrap_or_else(|| "datapath not loaded".into()));
            return st;
        };
        let r = tokio::task::spawn_blocking(move || {
            let dp = dp.lock().unwrap();
            let mode = format!("{:?}", dp.config().attach).to_lowercase();
            let host_routing = if dp.config().host_routing { "BPF" } else { "Legacy" };
            let cgroups: Vec<String> = dp.socket_lb_cgroups().iter().map(|c| c.display().to_string()).collect();
            (dp.config().pin_dir.display().to_string(), dp.attached(), dp.map_stats(), dp.counters(), mode, dp.attachments(), cgroups, host_routing)
        })
        .await;
        match r {
            Ok((pin, attached, maps, counters, mode, detail, cgroups, host_routing)) => {
                st.pin_dir = pin;
                st.host_routing = host_routing.into();
                st.socket_lb_cgroups = cgroups;
                st.attached = attached;
                st.attach_mode = mode;
                let mut devs: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (iface, dir) in detail.into_iter().filter(|(i, _)| !i.starts_with("fj")) {
                    devs.entry(iface).or_default().push(dir);
                }
                st.node_devices = devs.into_iter().map(|(i, d)| format!("{i} ({})", d.join(", "))).collect();
                match (maps, counters) {
                    (Ok(m), Ok(c)) => {
                        st.maps = m.into_iter().map(|m| MapStatus { name: m.name.into(), kind: m.kind.into(), max_entries: m.max_entries, entries: m.entries }).collect();
                        st.counters = c.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                        st.kube_proxy_replacement = "OK".into();
                    }
                    (Err(e), _) | (_, Err(e)) => st.kube_proxy_replacement = format!("Degraded (reading maps failed: {e})"),
                }
            }
            Err(e) => st.kube_proxy_replacement = format!("Degraded ({e})"),
        }
        st
    }

    /// Attach the service datapath to a pod's host veth (no-op without a datapath).
    pub async fn attach_datapath(&self, veth: &str) -> anyhow::Result<()> {
        let Some(dp) = self.datapath.get().cloned() else { return Ok(()) };
        let veth = veth.to_string();
        tokio::task::spawn_blocking(move || dp.lock().unwrap().attach(&veth)).await??;
        Ok(())
    }

    async fn prune_datapath_pins(&self) {
        let Some(dp) = self.datapath.get().cloned() else { return };
        let _ = tokio::task::spawn_blocking(move || dp.lock().unwrap().prune_stale_links()).await;
    }

    fn mark_deleting(&self, veth: &str, on: bool) {
        let mut d = self.deleting.lock().unwrap();
        if on {
            d.insert(veth.to_string());
        } else {
            d.remove(veth);
        }
    }

    pub fn is_deleting(&self, veth: &str) -> bool {
        self.deleting.lock().unwrap().contains(veth)
    }

    async fn release(&self, att: &Attachment) -> Result<(), CniError> {
        let txn = Txn::when(vec![]).and_then(vec![
            Op::delete(keys::ipam(&self.node, att.ip)),
            Op::delete(keys::attachment(&self.node, &att.container_id, &att.ifname)),
        ]);
        self.store.txn(txn).await.map_err(store_err)?;
        // packets still sent to the address get a RST / ICMP unreachable from the datapath
        if let Some(g) = self.gone_ips.get() {
            if let Err(e) = g.mark(att.ip) {
                warn!(ip = %att.ip, error = %e, "could not mark a released pod address in the datapath");
            }
        }
        let _ = self.used_ips().await;
        let _ = self.attachments().await;
        Ok(())
    }

    pub async fn del(&self, req: &CniRequest) -> Result<(), CniError> {
        let t0 = Instant::now();
        let r = async {
            let _g = self.cni_lock.lock().await;
            self.del_locked(&req.container_id, &req.ifname).await
        }
        .await;
        self.metrics.cni("DEL", r.is_ok());
        self.metrics.cni_del_seconds.observe(t0.elapsed().as_secs_f64());
        r
    }

    /// Remove an attachment (idempotent: unknown attachments are fine).
    async fn del_locked(&self, cid: &str, ifname: &str) -> Result<(), CniError> {
        let att = self.attachment(cid, ifname).await?;
        let host_veth = att.as_ref().map_or_else(|| host_veth_name(cid, ifname), |a| a.host_veth.clone());
        // Release the attachment first: every node's endpoint controller and datapath start
        // dropping the pod as a backend while its interface is still being torn down (the
        // kernel's veth teardown waits for an RCU grace period). No ADD can take the address
        // meanwhile: ADD and DEL hold the same lock.
        if let Some(att) = &att {
            self.release(att).await?;
        }
        self.mark_deleting(&host_veth, true);
        let r = self.nl.delete_link(&host_veth).await;
        // The kernel drops the tc links with the interface; remove their pins.
        self.prune_datapath_pins().await;
        self.mark_deleting(&host_veth, false);
        r.map_err(|e| CniError::new(code::IO_FAILURE, format!("could not delete {host_veth}")).details(e.to_string()))?;
        if let Some(att) = att {
            info!(container = %cid, ip = %att.ip, pod = ?att.pod_name, "pod detached");
        }
        Ok(())
    }

    pub async fn check(&self, req: &CniRequest) -> Result<(), CniError> {
        let r = async {
            let netns_path = Self::netns_of(req)?;
            let att = self.attachment(&req.container_id, &req.ifname).await?.ok_or_else(|| {
                CniError::new(code::CONTAINER_UNKNOWN, format!("no attachment {}/{} on node {}", req.container_id, req.ifname, self.node))
            })?;
            let problems = plumbing::check(&self.nl, &netns_path, &att.host_veth, &req.ifname, att.ip, att.gateway)
                .await
                .map_err(|e| CniError::new(code::IO_FAILURE, "CHECK could not inspect the interfaces").details(format!("{e:#}")))?;
            if problems.is_empty() {
                Ok(())
            } else {
                Err(CniError::new(code::CHECK_FAILED, format!("attachment {}/{} is not as set up: {}", req.container_id, req.ifname, problems.join("; "))))
            }
        }
        .await;
        self.metrics.cni("CHECK", r.is_ok());
        r
    }

    pub async fn gc(&self, valid: &[AttachmentRef]) -> Result<Vec<AttachmentRef>, CniError> {
        let keep: HashSet<&AttachmentRef> = valid.iter().collect();
        let _g = self.cni_lock.lock().await;
        let mut removed = Vec::new();
        for att in self.attachments().await? {
            let r = att.attachment_ref();
            if !keep.contains(&r) {
                self.del_locked(&att.container_id, &att.ifname).await?;
                info!(container = %att.container_id, ip = %att.ip, "GC removed a stale attachment");
                removed.push(r);
            }
        }
        self.metrics.cni("GC", true);
        Ok(removed)
    }

    pub async fn cni_status(&self) -> Result<(), CniError> {
        let ipam = self.ipam_status().await?;
        if ipam.allocated >= ipam.capacity {
            return Err(CniError::new(code::NOT_AVAILABLE, format!("node {} has no free pod address ({} of {} allocated)", self.node, ipam.allocated, ipam.capacity)));
        }
        Ok(())
    }

    /// Clean up attachments whose network namespace or host veth vanished
    /// without a CNI DEL (runtime crash). Returns what was cleaned.
    pub async fn sweep_zombies(&self, reason: &str) -> Result<Vec<Attachment>, CniError> {
        let _g = self.cni_lock.lock().await;
        let links: HashSet<String> = self
            .nl
            .links()
            .await
            .map_err(|e| CniError::new(code::IO_FAILURE, "list links").details(e.to_string()))?
            .into_iter()
            .map(|l| l.name)
            .collect();
        let mut cleaned = Vec::new();
        let atts = self.attachments().await?;
        // Pod veths no attachment owns (a DEL whose link deletion failed, a crash between
        // creating the pair and recording it): remove them with their routes.
        let owned: HashSet<&str> = atts.iter().map(|a| a.host_veth.as_str()).collect();
        let is_pod_veth = |n: &str| n.len() == 13 && (n.starts_with("fj") || n.starts_with("fp")) && n[2..].chars().all(|c| c.is_ascii_hexdigit());
        for stray in links.iter().filter(|n| is_pod_veth(n) && !owned.contains(n.as_str()) && !owned.contains(format!("fj{}", &n[2..]).as_str())) {
            if self.is_deleting(stray) {
                continue;
            }
            if self.nl.delete_link(stray).await.unwrap_or(false) {
                warn!(veth = %stray, reason, "removed a pod veth that no attachment owns");
            }
        }
        for att in atts {
            let veth_gone = !links.contains(&att.host_veth);
            let netns_gone = !Path::new(&att.netns).exists();
            if (veth_gone || netns_gone) && !self.is_deleting(&att.host_veth) {
                if !veth_gone {
                    let _ = self.nl.delete_link(&att.host_veth).await;
                }
                self.prune_datapath_pins().await;
                self.release(&att).await?;
                self.metrics.zombies_cleaned.inc();
                warn!(
                    container = %att.container_id, ip = %att.ip, pod = ?att.pod_name, netns = %att.netns, veth_gone, netns_gone, reason,
                    "zombie attachment cleaned up: its network namespace disappeared without CNI DEL; address released, veth and route removed"
                );
                cleaned.push(att);
            }
        }
        Ok(cleaned)
    }

    pub async fn status(&self, netns_label: String) -> Result<AgentStatus, CniError> {
        let t0 = Instant::now();
        let revision = self.store.current_revision().await;
        let rtt = t0.elapsed();
        let ipam = self.ipam_status().await?;
        let attachments = self.attachments().await?.len() as u32;
        let datapath = self.datapath_status().await;
        Ok(AgentStatus {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            ipam,
            store: StoreStatus {
                backend: self.store.backend().into(),
                healthy: revision.is_ok(),
                revision: revision.unwrap_or(-1),
                round_trip_us: rtt.as_micros() as u64,
            },
            attachments,
            zombies_cleaned: self.metrics.zombies_cleaned.get(),
            netns: netns_label,
            routing: self.routing.clone(),
            nodes: self.nodes.nodes.lock().unwrap().values().cloned().collect(),
            last_route_sync_ms_ago: self.nodes.last_sync.lock().unwrap().map(|(t, _)| t.elapsed().as_millis() as u64),
            last_route_error: self.nodes.last_error.lock().unwrap().clone(),
            health: self.health.peers.lock().unwrap().values().cloned().collect(),
            datapath: Some(datapath),
        })
    }

    // ---- pods (the dev tooling's stand-in for the API server) ----

    pub async fn create_pod(&self, pod: Pod) -> Result<Pod, CniError> {
        validate_pod(&pod, &self.node)?;
        let key = keys::pod(&pod.namespace, &pod.name);
        let r = self
            .store
            .txn(Txn::when(vec![Compare::absent(key.clone())]).and_then(vec![Op::put(key.clone(), serde_json::to_vec(&pod).unwrap())]))
            .await
            .map_err(store_err)?;
        if !r.succeeded {
            let existing: Option<Pod> = match self.store.get(&key).await.map_err(store_err)? {
                Some(kv) => decode(&key, &kv.value).ok(),
                None => None,
            };
            return Err(CniError::new(
                code::ALREADY_EXISTS,
                format!(
                    "pod {}/{} already exists{}",
                    pod.namespace,
                    pod.name,
                    existing.map(|p| format!(" (node {}, IP {})", p.node, p.ip.map_or("none".into(), |i| i.to_string()))).unwrap_or_default()
                ),
            )
            .details("choose another name or delete it first with `fjordctl pod del NS/NAME`"));
        }
        Ok(pod)
    }

    pub async fn update_pod(&self, pod: Pod) -> Result<Pod, CniError> {
        validate_pod(&pod, &self.node)?;
        let key = keys::pod(&pod.namespace, &pod.name);
        let cur = self.store.get(&key).await.map_err(store_err)?.ok_or_else(|| not_found(&pod.namespace, &pod.name))?;
        let r = self.store.compare_and_swap(&key, cur.mod_revision, serde_json::to_vec(&pod).unwrap()).await.map_err(store_err)?;
        if !r.succeeded {
            return Err(CniError::new(code::TRY_AGAIN_LATER, format!("pod {}/{} changed concurrently; retry", pod.namespace, pod.name)));
        }
        Ok(pod)
    }

    pub async fn get_pod(&self, ns: &str, name: &str) -> Result<Pod, CniError> {
        let key = keys::pod(ns, name);
        let kv = self.store.get(&key).await.map_err(store_err)?.ok_or_else(|| not_found(ns, name))?;
        decode(&key, &kv.value)
    }

    pub async fn delete_pod(&self, ns: &str, name: &str) -> Result<Pod, CniError> {
        let pod = self.get_pod(ns, name).await?;
        self.store.delete(&keys::pod(ns, name)).await.map_err(store_err)?;
        Ok(pod)
    }

    pub async fn pods(&self) -> Result<Vec<Pod>, CniError> {
        let l = self.store.list(&keys::pods_prefix()).await.map_err(store_err)?;
        let mut out = Vec::new();
        for kv in l.kvs {
            match decode::<Pod>(&kv.key, &kv.value) {
                Ok(p) => out.push(p),
                Err(e) => warn!(key = %kv.key, error = %e, "skipping corrupt pod record"),
            }
        }
        Ok(out)
    }
}

fn not_found(ns: &str, name: &str) -> CniError {
    CniError::new(code::CONTAINER_UNKNOWN, format!("pod {ns}/{name} not found")).details("`fjordctl pod list` shows the pods")
}

fn validate_pod(pod: &Pod, node: &str) -> Result<(), CniError> {
    let bad = |m: String| CniError::new(code::INVALID_CONFIG, m);
    validate_dns_label("pod namespace", &pod.namespace).map_err(bad)?;
    validate_dns_label("pod name", &pod.name).map_err(bad)?;
    for (k, v) in &pod.labels {
        validate_label(k, v).map_err(bad)?;
    }
    if pod.node != node {
        return Err(bad(format!("pod {}/{} names node {:?}, but this agent serves node {node:?}", pod.namespace, pod.name, pod.node)));
    }
    Ok(())
}

/// Watch link deletions in the agent's namespace and sweep for zombies when a
/// pod's host veth disappears (its namespace was destroyed); also sweep every
/// `interval` as a safety net (a lost netlink event, a deleted netns file).
pub async fn run_zombie_reaper(agent: Arc<Agent>, interval: Duration) {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;
    let events = match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
        Ok((conn, _handle, events)) => {
            tokio::spawn(conn);
            Some(events)
        }
        Err(e) => {
            warn!(error = %e, "cannot subscribe to link events; zombie cleanup falls back to periodic sweeps");
            None
        }
    };
    let mut events = events.map(|e| e.boxed());
    // Runtimes keep pod namespaces under /run/netns: a deleted namespace file is noticed at
    // once, before the kernel gets round to destroying the namespace and its veth.
    let inotify = netns_dir_watch();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reason = tokio::select! {
            _ = tick.tick() => "periodic sweep",
            r = async { match inotify.as_ref() { Some(fd) => fd.readable().await, None => std::future::pending().await } } => {
                match r {
                    Ok(mut guard) => {
                        let deleted = guard.get_inner().0.read_events().map(|evs| !evs.is_empty()).unwrap_or(false);
                        guard.clear_ready();
                        if !deleted { continue; }
                        "network namespace file deleted"
                    }
                    Err(_) => continue,
                }
            }
            ev = async { match events.as_mut() { Some(s) => s.next().await, None => std::future::pending().await } } => {
                match ev {
                    Some((msg, _)) => match msg.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                            let name = l.attributes.iter().find_map(|a| match a {
                                netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                                _ => None,
                            });
                            match name {
                                Some(n) if n.starts_with("fj") && !agent.is_deleting(&n) => "host veth deleted by the kernel",
                                _ => continue,
                            }
                        }
                        _ => continue,
                    },
                    None => {
                        warn!("link event stream ended; zombie cleanup continues with periodic sweeps");
                        events = None;
                        continue;
                    }
                }
            }
        };
        if let Err(e) = agent.sweep_zombies(reason).await {
            warn!(error = %e, "zombie sweep failed");
        }
    }
}

struct Watch(nix::sys::inotify::Inotify);
impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

fn netns_dir_watch() -> Option<tokio::io::unix::AsyncFd<Watch>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let dir = fjord_net::netns::NETNS_DIR;
    let _ = std::fs::create_dir_all(dir);
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    if let Err(e) = ino.add_watch(dir, AddWatchFlags::IN_DELETE) {
        warn!(error = %e, dir, "cannot watch the netns directory; relying on link events and sweeps");
        return None;
    }
    // SAFETY: the fd is owned by `Watch`, which the AsyncFd owns; it is closed only when both drop.
    unsafe { tokio::io::unix::AsyncFd::register(Watch(ino)) }.ok()
}
