//! Cluster mode: PodCIDR allocation, node registration under a lease, and
//! routes to every other node's PodCIDR (native routing or VXLAN), all driven
//! by a watch on the store (never polled).

use fjord_model::api::NodeRecord;
use fjord_model::keys;
use fjord_net::Netlink;
use fjord_store::{Compare, LeaseId, Op, Store, StoreError, Txn};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const VXLAN_DEV: &str = "vxfjord";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// A route per remote PodCIDR via that node's address (nodes share an L2/L3 underlay).
    Native,
    /// A VXLAN overlay (kernel vxlan device; FDB and neighbour entries managed by the agent).
    Vxlan,
}

/// The PodCIDR of `node`: the one it had (a node that comes back keeps its
/// range), else the first free `/size` of `cluster`, claimed by a transaction
/// so two nodes can never get the same range.
pub async fn allocate_pod_cidr(store: &dyn Store, node: &str, cluster: Ipv4Net, size: u8) -> anyhow::Result<Ipv4Net> {
    if size < cluster.prefix_len() || size > 30 {
        anyhow::bail!("--node-cidr-size /{size} does not fit in --cluster-cidr {cluster}");
    }
    for attempt in 0..16 {
        let taken = store.list(&keys::podcidr_prefix()).await?;
        let mut used = std::collections::HashSet::new();
        for kv in &taken.kvs {
            let owner = String::from_utf8_lossy(&kv.value).to_string();
            let cidr = keys::cidr_of_podcidr_key(&kv.key);
            if owner == node {
                if let Some(c) = cidr {
                    return Ok(c);
                }
            }
            if let Some(c) = cidr {
                used.insert(c);
            }
        }
        // Skip the cluster's first subnet (10.244.0.0/24): nodes number from 1, as in the dev cluster.
        let Some(free) = cluster.subnets(size)?.skip(1).find(|c| !used.contains(c)) else {
            anyhow::bail!("--cluster-cidr {cluster} has no free /{size} left for node {node} ({} nodes hold one)", used.len());
        };
        let key = keys::podcidr(free);
        let r = store.txn(Txn::when(vec![Compare::absent(key.clone())]).and_then(vec![Op::put(key, node)])).await?;
        if r.succeeded {
            info!(node, pod_cidr = %free, "allocated PodCIDR");
            return Ok(free);
        }
        tracing::debug!(attempt, "PodCIDR race lost; retrying");
    }
    anyhow::bail!("could not allocate a PodCIDR: other nodes kept winning the race")
}

/// Register the node under a lease and keep it alive; re-register if the lease
/// is lost (e.g. the store was down longer than the TTL).
pub async fn keep_registered(store: Arc<dyn Store>, record: NodeRecord, ttl: Duration, lease_out: Arc<std::sync::atomic::AtomicI64>) {
    let key = keys::node(&record.name);
    let value = serde_json::to_vec(&record).expect("node record serializes");
    let mut lease: Option<LeaseId> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let r: Result<(), StoreError> = async {
            match lease {
                Some(l) => store.keep_alive(l).await,
                None => {
                    let l = store.grant_lease(ttl).await?;
                    store.put(&key, value.clone(), Some(l)).await?;
                    info!(node = %record.name, lease = l, ttl_s = ttl.as_secs(), "node registered");
                    lease = Some(l);
                    lease_out.store(l, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
            }
        }
        .await;
        match r {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                tokio::time::sleep(ttl / 3).await;
            }
            Err(StoreError::LeaseNotFound(_)) => {
                warn!(node = %record.name, "node lease expired; registering again");
                lease = None;
            }
            Err(e) => {
                warn!(node = %record.name, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot renew node lease; the datapath keeps its last state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Live view of the nodes, for status and metrics.
#[derive(Default)]
pub struct NodeView {
    pub nodes: std::sync::Mutex<BTreeMap<String, NodeRecord>>,
    pub last_sync: std::sync::Mutex<Option<(Instant, Duration)>>,
    pub last_error: std::sync::Mutex<Option<String>>,
}

pub struct RouteSync {
    pub me: NodeRecord,
    pub routing: Routing,
    pub underlay_dev: String,
    pub nl: Netlink,
    pub view: Arc<NodeView>,
    pub sync_seconds: prometheus_client::metrics::histogram::Histogram,
}


impl RouteSync {
    /// Prepare the local side of the overlay (VXLAN device) and return the VTEP MAC.
    pub async fn prepare(nl: &Netlink, routing: Routing, me: &NodeRecord, underlay_dev: &str) -> anyhow::Result<Option<String>> {
        if routing != Routing::Vxlan {
            nl.delete_link(VXLAN_DEV).await?;
            return Ok(None);
        }
        let local = *me.addresses.first().ok_or_else(|| anyhow::anyhow!("node {} has no address for the VXLAN tunnel", me.name))?;
        if nl.link(VXLAN_DEV).await?.is_none() {
            nl.add_vxlan(VXLAN_DEV, VXLAN_VNI, local, underlay_dev, VXLAN_PORT, 1450).await?;
        }
        nl.set_up(VXLAN_DEV).await?;
        // The device carries the PodCIDR's network address: remote nodes route to it.
        nl.add_addr(VXLAN_DEV, me.pod_cidr.network(), 32).await?;
        Ok(nl.link(VXLAN_DEV).await?.map(|l| l.mac))
    }

    /// Make the routes match `nodes`: one per other node, nothing for nodes that left.
    pub async fn apply(&self, nodes: &BTreeMap<String, NodeRecord>) -> anyhow::Result<usize> {
        let mut want: BTreeMap<Ipv4Net, &NodeRecord> = BTreeMap::new();
        for n in nodes.values().filter(|n| n.name != self.me.name) {
            if n.addresses.is_empty() {
                continue;
            }
            want.insert(n.pod_cidr, n);
        }
        let mut changes = 0;
        for (cidr, n) in &want {
            let addr = n.addresses[0];
            match self.routing {
                Routing::Native => self.nl.replace_fjord_route(*cidr, addr, None, false).await?,
                Routing::Vxlan => {
                    let Some(mac) = n.vtep_mac.as_deref().and_then(|m| crate::plumbing::mac_bytes(m).ok()) else {
                        warn!(node = %n.name, "remote node publishes no VTEP MAC (is it in VXLAN mode?); no route to it");
                        continue;
                    };
                    let vtep_ip = n.pod_cidr.network();
                    self.nl.replace_neighbour(VXLAN_DEV, vtep_ip, &mac).await?;
                    self.nl.replace_fdb(VXLAN_DEV, &mac, addr).await?;
                    self.nl.replace_fjord_route(*cidr, vtep_ip, Some(VXLAN_DEV), true).await?;
                }
            }
            changes += 1;
        }
        for r in self.nl.routes().await? {
            if r.fjord && !want.contains_key(&r.dst) {
                self.nl.delete_route_info(&r).await?;
                info!(dst = %r.dst, "removed route to a node that left");
            }
        }
        Ok(changes)
    }

    /// Watch the nodes and keep routes in sync. Store outages leave the last
    /// routes in place (the datapath keeps forwarding); on reconnect the agent
    /// re-lists and changes only what differs.
    pub async fn run(self, store: Arc<dyn Store>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let r: anyhow::Result<()> = async {
                let l = store.list(&keys::nodes_prefix()).await?;
                let mut nodes = BTreeMap::new();
                for kv in &l.kvs {
                    match serde_json::from_slice::<NodeRecord>(&kv.value) {
                        Ok(n) => {
                            nodes.insert(n.name.clone(), n);
                        }
                        Err(e) => warn!(key = %kv.key, error = %e, "skipping corrupt node record"),
                    }
                }
                self.sync(&nodes).await;
                let mut w = store.watch(&keys::nodes_prefix(), l.revision + 1).await?;
                backoff = Duration::from_millis(200);
                while let Some(ev) = w.recv().await {
                    let ev = ev?;
                    let name = ev.kv.key.trim_start_matches(&keys::nodes_prefix()).to_string();
                    match ev.kind {
                        fjord_store::EventKind::Put => match serde_json::from_slice::<NodeRecord>(&ev.kv.value) {
                            Ok(n) => {
                                nodes.insert(name, n);
                            }
                            Err(e) => {
                                warn!(key = %ev.kv.key, error = %e, "skipping corrupt node record");
                                continue;
                            }
                        },
                        fjord_store::EventKind::Delete => {
                            nodes.remove(&name);
                        }
                    }
                    self.sync(&nodes).await;
                }
                anyhow::bail!("node watch ended")
            }
            .await;
            if let Err(e) = r {
                warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "node watch interrupted; keeping current routes and re-listing");
                *self.view.last_error.lock().unwrap() = Some(format!("{e:#}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    async fn sync(&self, nodes: &BTreeMap<String, NodeRecord>) {
        let t0 = Instant::now();
        match self.apply(nodes).await {
            Ok(n) => {
                *self.view.last_sync.lock().unwrap() = Some((Instant::now(), t0.elapsed()));
                self.sync_seconds.observe(t0.elapsed().as_secs_f64());
                tracing::debug!(routes = n, ms = t0.elapsed().as_secs_f64() * 1000.0, "routes synced");
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "route sync failed");
                *self.view.last_error.lock().unwrap() = Some(format!("{e:#}"));
            }
        }
        *self.view.nodes.lock().unwrap() = nodes.clone();
    }
}
