//! Prometheus metrics of the agent (text format on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    pub command: String,
    pub result: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub cni_requests: Family<CniLabels, Counter>,
    pub cni_add_seconds: Histogram,
    pub cni_del_seconds: Histogram,
    pub ipam_capacity: Gauge,
    pub ipam_allocated: Gauge,
    pub attachments: Gauge,
    pub zombies_cleaned: Counter<u64, AtomicU64>,
    pub store_revision: Gauge,
    pub rss_bytes: Gauge,
    pub route_sync_seconds: Histogram,
    pub service_sync_seconds: Histogram,
    /// Store revision the service controller last synced the datapath to.
    pub service_synced_revision: Gauge,
    pub datapath_frontends: Gauge,
    pub datapath_backends: Gauge,
    /// Watch event received → datapath programmed (includes the endpoint controller).
    pub service_event_to_datapath_seconds: Histogram,
    pub service_last_event_to_datapath_seconds: Gauge<f64, AtomicU64>,
    /// Services recomputed by the last sync.
    pub service_last_sync_services: Gauge,
    /// eBPF datapath counters (bpf/fjord.h enum fj_stat), by event.
    pub datapath_events: Family<EventLabels, Gauge>,
    pub ct_gc_removed: Counter<u64, AtomicU64>,
    pub ct_gc_seconds: Histogram,
    /// A peer's heartbeat write → this agent's watch seeing it.
    pub watch_lag_seconds: Histogram,
    pub watch_last_lag_seconds: Gauge<f64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EventLabels {
    pub event: String,
}

impl Metrics {
    pub fn new(node: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels("fjord", [(std::borrow::Cow::Borrowed("node"), std::borrow::Cow::Owned(node.to_string()))].into_iter());
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
        let m = Metrics {
            cni_requests: Family::default(),
            cni_add_seconds: Histogram::new(buckets.into_iter()),
            cni_del_seconds: Histogram::new(buckets.into_iter()),
            ipam_capacity: Gauge::default(),
            ipam_allocated: Gauge::default(),
            attachments: Gauge::default(),
            zombies_cleaned: Counter::default(),
            store_revision: Gauge::default(),
            rss_bytes: Gauge::default(),
            route_sync_seconds: Histogram::new(buckets.into_iter()),
            service_sync_seconds: Histogram::new(buckets.into_iter()),
            service_synced_revision: Gauge::default(),
            datapath_frontends: Gauge::default(),
            datapath_backends: Gauge::default(),
            datapath_events: Family::default(),
            ct_gc_removed: Counter::default(),
            ct_gc_seconds: Histogram::new(buckets.into_iter()),
            watch_lag_seconds: Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0].into_iter()),
            watch_last_lag_seconds: Gauge::default(),
            service_event_to_datapath_seconds: Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0].into_iter()),
            service_last_event_to_datapath_seconds: Gauge::default(),
            service_last_sync_services: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("cni_requests", "CNI requests served, by command and result", m.cni_requests.clone());
        registry.register("cni_add_duration_seconds", "Time to serve a CNI ADD (IPAM + store + plumbing)", m.cni_add_seconds.clone());
        registry.register("cni_del_duration_seconds", "Time to serve a CNI DEL", m.cni_del_seconds.clone());
        registry.register("ipam_capacity_addresses", "Pod addresses the node's PodCIDR can give", m.ipam_capacity.clone());
        registry.register("ipam_allocated_addresses", "Pod addresses allocated", m.ipam_allocated.clone());
        registry.register("attachments", "Pod interfaces attached on this node", m.attachments.clone());
        registry.register(
            "zombie_cleanups",
            "Attachments whose network namespace vanished without CNI DEL, cleaned up by the agent",
            m.zombies_cleaned.clone(),
        );
        registry.register("store_revision", "Last revision of the store seen by the agent", m.store_revision.clone());
        registry.register("agent_rss_bytes", "Resident memory of the agent", m.rss_bytes.clone());
        registry.register("route_sync_duration_seconds", "Time to bring routes to other nodes in line with the store after a change", m.route_sync_seconds.clone());
        registry.register(
            "service_sync_duration_seconds",
            "Time from a watched change to the datapath holding it (endpoint controller + map updates)",
            m.service_sync_seconds.clone(),
        );
        registry.register(
            "service_synced_revision",
            "Store revision the datapath was last synced to (compare with fjord_store_revision for the watch lag)",
            m.service_synced_revision.clone(),
        );
        registry.register("datapath_frontends", "Service frontends (VIP x port) in the eBPF maps", m.datapath_frontends.clone());
        registry.register("datapath_backends", "Backends referenced by the eBPF maps", m.datapath_backends.clone());
        registry.register(
            "datapath_events",
            "eBPF datapath counters since the maps were created, by event (dnat, revnat, ct_new, snat_new, snat_fail = no free SNAT port, hairpin_new, affinity_hit, nodeport_new, ...)",
            m.datapath_events.clone(),
        );
        registry.register("conntrack_gc_removed", "Conntrack entries removed by GC (idle past their timeout)", m.ct_gc_removed.clone());
        registry.register("conntrack_gc_duration_seconds", "Time of one conntrack GC pass", m.ct_gc_seconds.clone());
        registry.register(
            "store_watch_lag_seconds",
            "Time from another node writing its heartbeat to this agent's watch delivering it (store write -> watch lag)",
            m.watch_lag_seconds.clone(),
        );
        registry.register("store_watch_last_lag_seconds", "The last heartbeat's watch lag", m.watch_last_lag_seconds.clone());
        registry.register(
            "service_event_to_datapath_seconds",
            "Time from the agent receiving a watched change (first event of a batch) to the eBPF maps holding it",
            m.service_event_to_datapath_seconds.clone(),
        );
        registry.register(
            "service_last_event_to_datapath_seconds",
            "The last sync's time from receiving the change to the eBPF maps holding it",
            m.service_last_event_to_datapath_seconds.clone(),
        );
        registry.register("service_last_sync_services", "Services recomputed by the last sync", m.service_last_sync_services.clone());
        Metrics { registry, ..m }
    }

    pub fn cni(&self, command: &str, ok: bool) {
        self.cni_requests.get_or_create(&CniLabels { command: command.into(), result: if ok { "ok" } else { "error" }.into() }).inc();
    }

    pub fn render(&self) -> String {
        self.rss_bytes.set(rss_bytes() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding metrics to a String");
        out
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}
