//! Store mode: the gateway fed from fjord's store (used by `fjord-agent --gateway` and
//! `fjord-gateway --store`).
//!
//! [`Controller::run`] lists GatewayClasses, Gateways, HTTPRoutes, ReferenceGrants, TLS Secrets,
//! Services and EndpointSlices, builds the routing table ([`crate::table::build`], pure) with a
//! [`StoreResolver`] (Service port → the ready endpoints of its EndpointSlices, on the slice port
//! named like the Service port, i.e. the targetPort), swaps it into the running
//! [`Gateway`], and writes the status of every GatewayClass, Gateway and HTTPRoute it owns to
//! `/fjord/v1/status/...`. Then it watches the store from the listed revision and does the same
//! on every relevant change (bursts coalesced); nothing is polled. A listener port that cannot
//! be bound is left out (`Accepted=False/PortUnavailable`) while everything else is served; it is
//! retried every few seconds and on every change.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fjord_model::keys;
use fjord_model::objects::{EndpointSlice, Protocol, Service};
use fjord_store::{Op, Store, Txn};

use crate::api::*;
use crate::config::ObjectSet;
use crate::leader::{Fence, Leadership};
use crate::manifest::decode_stored;
use crate::proxy::{ApplyError, Gateway};
use crate::resolver::{AppProtocol, BackendResolver, ResolveError, ResolvedBackend};
use crate::table::{build, StatusReport};

/// Services and their EndpointSlices from a store snapshot.
#[derive(Debug, Default, Clone)]
pub struct StoreResolver {
    services: HashMap<(String, String), Service>,
    slices: HashMap<(String, String), Vec<EndpointSlice>>,
}

impl StoreResolver {
    pub fn new(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Self {
        let mut r = StoreResolver::default();
        for s in services {
            r.services.insert((s.metadata.namespace.clone(), s.metadata.name.clone()), s);
        }
        for e in slices {
            if let Some(svc) = e.service_name() {
                r.slices.entry((e.metadata.namespace.clone(), svc.to_string())).or_default().push(e);
            }
        }
        r
    }
}

impl BackendResolver for StoreResolver {
    fn resolve(&self, namespace: &str, name: &str, port: u16) -> Result<ResolvedBackend, ResolveError> {
        let key = (namespace.to_string(), name.to_string());
        let Some(svc) = self.services.get(&key) else {
            return Err(ResolveError::ServiceNotFound { namespace: namespace.into(), name: name.into() });
        };
        let Some(sp) = svc.spec.ports.iter().find(|p| p.port == port) else {
            return Err(ResolveError::PortNotFound {
                namespace: namespace.into(),
                name: name.into(),
                port,
                available: svc.spec.ports.iter().map(|p| p.port).collect(),
            });
        };
        let unsupported = |message: String| ResolveError::Unsupported { namespace: namespace.into(), name: name.into(), port, message };
        if sp.protocol != Protocol::TCP {
            return Err(unsupported(format!("protocol {} is not HTTP-capable; use a TCP port", sp.protocol)));
        }
        let protocol = AppProtocol::from_app_protocol(sp.app_protocol.as_deref()).map_err(unsupported)?;
        let mut endpoints: Vec<SocketAddr> = Vec::new();
        for slice in self.slices.get(&key).map(Vec::as_slice).unwrap_or_default() {
            // The slice's port named like the Service port is the targetPort on the pods.
            let Some(target) = slice.ports.iter().find(|p| p.name == sp.name && p.protocol == sp.protocol).and_then(|p| p.port) else {
                continue;
            };
            for e in slice.endpoints.iter().filter(|e| e.is_ready()) {
                for ip in &e.addresses {
                    endpoints.push(SocketAddr::new(IpAddr::V4(*ip), target));
                }
            }
        }
        endpoints.sort();
        endpoints.dedup();
        Ok(ResolvedBackend { endpoints, protocol })
    }
}

/// Everything the gateway reads from the store, at (about) one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub objects: ObjectSet,
    pub resolver: StoreResolver,
}

fn decode_all<T: serde::de::DeserializeOwned>(kvs: &[fjord_store::KeyValue], what: &str, out: &mut Vec<T>) {
    for kv in kvs {
        match decode_stored::<T>(&kv.value) {
            Ok(o) => out.push(o),
            Err(e) => tracing::warn!(key = kv.key, kind = what, error = %e, "skipping a stored object that does not decode"),
        }
    }
}

impl Snapshot {
    pub async fn load(store: &dyn Store) -> anyhow::Result<Snapshot> {
        let mut objs = ObjectSet::default();
        let list = |r: &'static str| async move { store.list(&keys::resource_prefix(r)).await.with_context(|| format!("listing {r}")) };
        decode_all(&list("gatewayclasses").await?.kvs, "GatewayClass", &mut objs.gateway_classes);
        decode_all(&list("gateways").await?.kvs, "Gateway", &mut objs.gateways);
        decode_all(&list("httproutes").await?.kvs, "HTTPRoute", &mut objs.http_routes);
        decode_all(&list("referencegrants").await?.kvs, "ReferenceGrant", &mut objs.reference_grants);
        decode_all(&list("secrets").await?.kvs, "Secret", &mut objs.secrets);
        let mut services: Vec<Service> = Vec::new();
        for kv in store.list(&keys::services_prefix()).await.context("listing services")?.kvs {
            match serde_json::from_slice(&kv.value) {
                Ok(s) => services.push(s),
                Err(e) => tracing::warn!(key = kv.key, error = %e, "skipping a stored Service that does not decode"),
            }
        }
        let mut slices: Vec<EndpointSlice> = Vec::new();
        for kv in store.list(&keys::endpointslices_prefix()).await.context("listing endpointslices")?.kvs {
            match serde_json::from_slice(&kv.value) {
                Ok(s) => slices.push(s),
                Err(e) => tracing::warn!(key = kv.key, error = %e, "skipping a stored EndpointSlice that does not decode"),
            }
        }
        Ok(Snapshot { objects: objs, resolver: StoreResolver::new(services, slices) })
    }
}

/// Every running gateway instance registers its address here (under a lease), so the status
/// writer can list all of them in `Gateway.status.addresses`.
pub const INSTANCES_PREFIX: &str = "/fjord/v1/gateway-instances/";

/// Is a changed key one the gateway depends on?
pub fn relevant_key(k: &str) -> bool {
    k.starts_with(INSTANCES_PREFIX)
        || keys::EXTENSION_RESOURCES.iter().any(|r| k.starts_with(&keys::resource_prefix(r)))
        || k.starts_with(&keys::services_prefix())
        || k.starts_with(&keys::endpointslices_prefix())
}

/// What one sync did (for logs, metrics and tests).
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub revision: i64,
    pub duration: Duration,
    /// Listener ports that could not be bound: port → error.
    pub unavailable_ports: BTreeMap<u16, String>,
    pub status_writes: usize,
}

pub struct Controller {
    store: Arc<dyn Store>,
    gw: Gateway,
    /// The address written to `Gateway.status.addresses`.
    address: IpAddr,
    /// Revision of the last completed sync (for `synced_revision`).
    synced: Arc<std::sync::atomic::AtomicI64>,
    /// With several instances on one store: only the elected one writes status.
    leadership: Option<Leadership>,
    /// Status records this instance wrote or deleted (for tests and metrics).
    status_writes: Arc<std::sync::atomic::AtomicU64>,
    /// (identity, lease TTL) under which this instance registers its address.
    instance: Option<(String, Duration)>,
    /// This instance's listener ports that could not be bound, published in its instance
    /// record, so the status writer reports them even when it is another instance.
    own_unavailable: Arc<tokio::sync::watch::Sender<BTreeMap<u16, String>>>,
}

impl Controller {
    pub fn new(store: Arc<dyn Store>, gw: Gateway, address: IpAddr) -> Self {
        Controller {
            store,
            gw,
            address,
            synced: Default::default(),
            leadership: None,
            status_writes: Default::default(),
            instance: None,
            own_unavailable: Arc::new(tokio::sync::watch::channel(BTreeMap::new()).0),
        }
    }

    /// Write status only while `leadership` leads (see [`crate::leader`]); without this the
    /// controller assumes it is the only instance and always writes.
    pub fn with_leadership(mut self, leadership: Leadership) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// Register this instance's address under [`INSTANCES_PREFIX`]`<identity>` with a store lease
    /// of `ttl` while [`Controller::run`] runs; the status writer reports the addresses of all
    /// registered instances in `Gateway.status.addresses` (an instance that stops leaves after
    /// `ttl`).
    pub fn with_instance(mut self, identity: &str, ttl: Duration) -> Self {
        self.instance = Some((identity.to_string(), ttl));
        self
    }

    /// Status records written or deleted by this instance so far.
    pub fn status_writes_total(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.status_writes.clone()
    }

    /// The store revision the running table reflects (0 before the first sync).
    pub fn synced_revision(&self) -> Arc<std::sync::atomic::AtomicI64> {
        self.synced.clone()
    }

    /// One pass: snapshot → table → swap → status. Listener ports that cannot be bound are
    /// left out of the table and reported.
    pub async fn sync(&self) -> anyhow::Result<SyncReport> {
        let t0 = Instant::now();
        let revision = self.store.current_revision().await?;
        let snap = Snapshot::load(self.store.as_ref()).await?;
        let mut unavailable: BTreeMap<u16, String> = BTreeMap::new();
        let status = loop {
            let mut out = build(&snap.objects, &snap.resolver);
            out.table.ports.retain(|p, _| !unavailable.contains_key(p));
            match self.gw.apply(out.table).await {
                Ok(()) => break out.status,
                Err(ApplyError::Bind { port, source, addr }) => {
                    tracing::warn!(port, %addr, error = %source, "Gateway listener port cannot be bound; serving the other listeners");
                    unavailable.insert(port, format!("cannot listen on {addr}: {source}"));
                }
            }
        };
        self.own_unavailable.send_if_modified(|m| {
            let changed = *m != unavailable;
            *m = unavailable.clone();
            changed
        });
        // every instance's unbindable ports (from their records; this one's as just found)
        let mut all_unavailable = unavailable.clone();
        let mut addresses = vec![self.address];
        if let Some((me, _)) = &self.instance {
            for kv in self.store.list(INSTANCES_PREFIX).await?.kvs {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&kv.value) else { continue };
                if let Some(a) = v["address"].as_str().and_then(|a| a.parse().ok()) {
                    addresses.push(a);
                }
                let id = v["identity"].as_str().unwrap_or("?");
                if id == me.as_str() {
                    continue;
                }
                for (port, err) in v["unavailablePorts"].as_object().into_iter().flatten() {
                    if let (Ok(port), Some(err)) = (port.parse::<u16>(), err.as_str()) {
                        all_unavailable.entry(port).or_insert_with(|| format!("on gateway instance {id}: {err}"));
                    }
                }
            }
        }
        let status = mark_unavailable(status, &snap.objects, &all_unavailable);
        addresses.sort();
        addresses.dedup();
        let status_writes = match &self.leadership {
            None => self.write_status(&status, &addresses, None).await?,
            Some(l) => match l.current() {
                Some(fence) => self.write_status(&status, &addresses, Some(&fence)).await?,
                None => 0,
            },
        };
        self.synced.store(revision, std::sync::atomic::Ordering::Relaxed);
        let report = SyncReport { revision, duration: t0.elapsed(), unavailable_ports: unavailable, status_writes };
        tracing::info!(
            revision,
            ms = report.duration.as_secs_f64() * 1000.0,
            gateways = snap.objects.gateways.len(),
            routes = snap.objects.http_routes.len(),
            status_writes,
            "gateway table synced from the store"
        );
        Ok(report)
    }

    /// Write changed status records and remove those of objects that are gone (also objects
    /// deleted while no instance was writing), in one transaction, fenced by the leader lease
    /// when there is one. `lastTransitionTime` is kept while a condition's status does not change.
    async fn write_status(&self, st: &StatusReport, addresses: &[IpAddr], fence: Option<&Fence>) -> anyhow::Result<usize> {
        let now = fjord_model::objects::rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        let mut want: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (name, s) in &st.gateway_classes {
            want.insert(keys::status("gatewayclasses", "", name), serde_json::to_value(s)?);
        }
        for (key, s) in &st.gateways {
            let (ns, name) = key.split_once('/').unwrap_or(("default", key));
            let mut v = serde_json::to_value(s)?;
            v["addresses"] = addresses.iter().map(|a| serde_json::json!({ "type": "IPAddress", "value": a.to_string() })).collect();
            want.insert(keys::status("gateways", ns, name), v);
        }
        for (key, s) in &st.http_routes {
            let (ns, name) = key.split_once('/').unwrap_or(("default", key));
            want.insert(keys::status("httproutes", ns, name), serde_json::to_value(s)?);
        }
        let mut have: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for r in ["gatewayclasses", "gateways", "httproutes"] {
            for kv in self.store.list(&keys::status_prefix(r)).await?.kvs {
                have.insert(kv.key.clone(), serde_json::from_slice(&kv.value).unwrap_or(serde_json::Value::Null));
            }
        }
        let mut ops = Vec::new();
        for (k, mut v) in want {
            stamp_transitions(&mut v, have.get(&k), &now);
            if have.get(&k) != Some(&v) {
                ops.push(Op::put(k, serde_json::to_vec(&v)?));
            }
        }
        for k in have.keys() {
            let still = st.gateway_classes.keys().map(|n| keys::status("gatewayclasses", "", n)).any(|x| x == *k)
                || st.gateways.keys().chain(st.http_routes.keys()).any(|key| {
                    let (ns, name) = key.split_once('/').unwrap_or(("default", key));
                    *k == keys::status("gateways", ns, name) || *k == keys::status("httproutes", ns, name)
                });
            if !still {
                ops.push(Op::delete(k.clone()));
            }
        }
        let n = ops.len();
        if n > 0 {
            let compares = fence.map(|f| vec![f.compare()]).unwrap_or_default();
            let r = self.store.txn(Txn::when(compares).and_then(ops)).await.context("writing Gateway API status")?;
            if !r.succeeded {
                tracing::warn!("not the status writer any more (the leader lease changed hands); status not written");
                return Ok(0);
            }
            self.status_writes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Sync, then watch and sync on every relevant change, forever. Store errors (etcd away,
    /// compaction) are retried with backoff after a fresh list; the running table keeps serving.
    pub async fn run(self) {
        let _presence = self.instance.clone().map(|(identity, ttl)| {
            AbortOnDrop(tokio::spawn(register_instance(self.store.clone(), identity, self.address, ttl, self.own_unavailable.subscribe())))
        });
        let mut backoff = Duration::from_millis(100);
        let mut lead = self.leadership.clone();
        loop {
            let r: anyhow::Result<()> = async {
                let rev = self.store.current_revision().await?;
                let mut report = self.sync().await?;
                let mut w = self.store.watch(keys::PREFIX, rev + 1).await?;
                backoff = Duration::from_millis(100);
                loop {
                    // Ports that could not be bound are retried now and then; everything else
                    // waits for a change.
                    let retry = if report.unavailable_ports.is_empty() { Duration::from_secs(3600) } else { Duration::from_secs(3) };
                    // A change of leadership syncs at once: a new leader writes the status
                    // (and removes stale records) without waiting for the next change.
                    let ev = tokio::select! {
                        ev = tokio::time::timeout(retry, w.recv()) => match ev {
                            Err(_) => None,
                            Ok(ev) => Some(ev.ok_or_else(|| anyhow::anyhow!("watch ended"))??),
                        },
                        _ = leadership_changed(&mut lead) => None,
                    };
                    if let Some(ev) = ev {
                        if !relevant_key(&ev.kv.key) {
                            continue;
                        }
                        // Coalesce a burst (one apply is one transaction, but slices and
                        // services may follow each other closely).
                        while let Ok(Some(more)) = tokio::time::timeout(Duration::from_millis(2), w.recv()).await {
                            more?;
                        }
                    }
                    report = self.sync().await?;
                }
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "gateway store sync interrupted; the running table keeps serving");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep `INSTANCES_PREFIX<identity>` → `{"identity", "address", "unavailablePorts"}` (port →
/// why this instance could not bind it; rewritten when that changes) in the store under a lease
/// of `ttl`, renewed every ttl/3; re-registered if the lease is lost.
async fn register_instance(store: Arc<dyn Store>, identity: String, address: IpAddr, ttl: Duration, mut unavailable: tokio::sync::watch::Receiver<BTreeMap<u16, String>>) {
    let key = format!("{INSTANCES_PREFIX}{identity}");
    let value = |u: &BTreeMap<u16, String>| {
        serde_json::to_vec(&serde_json::json!({ "identity": identity, "address": address.to_string(), "unavailablePorts": u })).expect("JSON")
    };
    loop {
        let r: anyhow::Result<()> = async {
            let lease = store.grant_lease(ttl).await?;
            let v = value(&unavailable.borrow_and_update());
            store.put(&key, v, Some(lease)).await?;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ttl / 3, ttl / 3);
            loop {
                tokio::select! {
                    _ = tick.tick() => store.keep_alive(lease).await?,
                    r = unavailable.changed() => {
                        if r.is_err() {
                            // the controller is gone: keep the record alive until aborted
                            std::future::pending::<()>().await;
                        }
                        let v = value(&unavailable.borrow_and_update());
                        store.put(&key, v, Some(lease)).await?;
                    }
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(key, error = %format!("{e:#}"), "gateway instance registration lost; registering again");
            tokio::time::sleep(ttl / 6).await;
        }
    }
}

async fn leadership_changed(l: &mut Option<Leadership>) {
    match l {
        Some(l) => l.changed().await,
        None => std::future::pending().await,
    }
}

/// Keep `lastTransitionTime` of conditions whose status did not change since `prev`; stamp
/// `now` on the others. Works on any status JSON (conditions at any depth, matched by path).
fn stamp_transitions(v: &mut serde_json::Value, prev: Option<&serde_json::Value>, now: &str) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let p = prev.and_then(|p| p.get(k));
                if k == "conditions" {
                    if let Some(conds) = child.as_array_mut() {
                        for c in conds {
                            let t = c["type"].clone();
                            let old = p.and_then(|p| p.as_array()).and_then(|a| a.iter().find(|o| o["type"] == t));
                            let ts = match old {
                                Some(o) if o["status"] == c["status"] => o["lastTransitionTime"].as_str().unwrap_or(now).to_string(),
                                _ => now.to_string(),
                            };
                            c["lastTransitionTime"] = ts.into();
                        }
                    }
                } else {
                    stamp_transitions(child, p, now);
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, child) in a.iter_mut().enumerate() {
                stamp_transitions(child, prev.and_then(|p| p.get(i)), now);
            }
        }
        _ => {}
    }
}

/// Listeners on ports that could not be bound: `Accepted=False/PortUnavailable`,
/// `Programmed=False`; the Gateway's own conditions follow.
fn mark_unavailable(mut st: StatusReport, objs: &ObjectSet, unavailable: &BTreeMap<u16, String>) -> StatusReport {
    if unavailable.is_empty() {
        return st;
    }
    for g in &objs.gateways {
        let Some(gs) = st.gateways.get_mut(&g.metadata.key()) else { continue };
        let gen = g.metadata.generation;
        let mut changed = false;
        for ls in gs.listeners.iter_mut() {
            let Some(l) = g.spec.listeners.iter().find(|l| l.name == ls.name) else { continue };
            let Some(err) = unavailable.get(&l.port) else { continue };
            let programmed = find_condition(&ls.conditions, "Programmed").is_some_and(|c| c.is_true());
            if !programmed {
                continue;
            }
            changed = true;
            for c in ls.conditions.iter_mut() {
                match c.type_.as_str() {
                    "Accepted" => *c = Condition::new("Accepted", false, "PortUnavailable", format!("listener port {}: {err}", l.port), gen),
                    "Programmed" => *c = Condition::new("Programmed", false, "Invalid", format!("listener port {} is unavailable", l.port), gen),
                    _ => {}
                }
            }
        }
        if changed {
            let total = gs.listeners.len();
            let ok = gs.listeners.iter().filter(|l| find_condition(&l.conditions, "Programmed").is_some_and(|c| c.is_true())).count();
            gs.conditions = vec![
                Condition::new(
                    "Accepted",
                    ok > 0,
                    "ListenersNotValid",
                    format!("{} of {total} listeners are not valid", total - ok),
                    gen,
                ),
                if ok > 0 {
                    Condition::new("Programmed", true, "Programmed", "serving", gen)
                } else {
                    Condition::new("Programmed", false, "AddressNotUsable", "no listener port could be bound", gen)
                },
            ];
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjord_model::objects::{parse_manifests_with, Object, ValidationContext};

    fn store_objects(text: &str) -> (ObjectSet, StoreResolver) {
        let objs = parse_manifests_with(text, &ValidationContext::default(), Some(&crate::manifest::GatewayKinds)).unwrap();
        let (mut set, mut svcs, mut slices) = (ObjectSet::default(), vec![], vec![]);
        for o in objs {
            match o {
                Object::Service(s) => svcs.push(s),
                Object::EndpointSlice(e) => slices.push(e),
                Object::Extension(x) => {
                    let b = serde_json::to_vec(&x.value).unwrap();
                    match x.kind.as_str() {
                        "GatewayClass" => set.gateway_classes.push(decode_stored(&b).unwrap()),
                        "Gateway" => set.gateways.push(decode_stored(&b).unwrap()),
                        "HTTPRoute" => set.http_routes.push(decode_stored(&b).unwrap()),
                        "ReferenceGrant" => set.reference_grants.push(decode_stored(&b).unwrap()),
                        _ => set.secrets.push(decode_stored(&b).unwrap()),
                    }
                }
            }
        }
        (set, StoreResolver::new(svcs, slices))
    }

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 8080, targetPort: http}
  - {name: grpc, port: 9090, appProtocol: kubernetes.io/h2c}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-fjord-node1
  namespace: app
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 18080}
- {name: grpc, port: 19090}
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
- addresses: [10.244.1.6]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-fjord-node2
  namespace: app
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 18080}
endpoints:
- addresses: [10.244.2.5]
"#;


    /// Write manifests to the store as `fjordctl apply` does (generation carried over).
    async fn put_manifests(store: Arc<dyn Store>, text: String) {
        crate::testing::put_manifests(store.as_ref(), &text, "2025-01-01T00:00:00Z").await;
    }

    fn svc_with_endpoint(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: app, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
        )
    }

    fn route_to(name: &str, backend: &str) -> String {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 80}}]\n")
    }

    /// GET http://addr/x through a gateway: the echo's pod name.
    async fn who_at(addr: SocketAddr) -> Option<String> {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let r = client.get(format!("http://{addr}/x").parse().unwrap()).await.ok()?;
        let body = http_body_util::BodyExt::collect(r.into_body()).await.ok()?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        v["pod"].as_str().map(str::to_string)
    }

    async fn until<T, F: std::future::Future<Output = Option<T>>>(limit: Duration, mut f: impl FnMut() -> F) -> Option<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = f().await {
                return Some(v);
            }
            if t0.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A store holding the GW Gateway with one listener (on a free port, returned), Service
    /// `one` with a local echo backend, and `extra` manifests.
    async fn one_listener_store(extra: &[String]) -> (tempfile::TempDir, Arc<dyn Store>, u16) {
        let dir = tempfile::tempdir().unwrap();
        let store = fjord_store::open(&format!("embedded:{}", dir.path().join("s.redb").display())).await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = l.local_addr().unwrap().port();
        tokio::spawn(crate::echo::serve_echo(l, crate::echo::EchoOptions { pod: "one".into(), namespace: "app".into() }, std::future::pending::<()>()));
        let gw_port = fjord_store::testing::free_loopback_port();
        let gw_yaml = GW.replace("18001", &gw_port.to_string()).replace("  - {name: b, port: 18002, protocol: HTTP}\n", "");
        let mut docs = vec![svc_with_endpoint("one", echo_port), gw_yaml];
        docs.extend(extra.iter().cloned());
        put_manifests(store.clone(), docs.join("---\n")).await;
        (dir, store, gw_port)
    }

    /// One gateway instance `id` on `ip` with a status-writer elector and an instance record.
    fn spawn_instance(
        store: &Arc<dyn Store>,
        id: &str,
        ip: IpAddr,
        ttl: Duration,
    ) -> (Gateway, crate::leader::Elector, Arc<std::sync::atomic::AtomicU64>, tokio::task::JoinHandle<()>) {
        let gw = Gateway::new(crate::proxy::GatewayOptions { listen_ip: ip, access_log: false, ..Default::default() });
        let elector = crate::leader::Elector::spawn(store.clone(), crate::leader::STATUS_LEASE_KEY, id, ttl);
        let ctl = Controller::new(store.clone(), gw.clone(), ip).with_leadership(elector.leadership()).with_instance(id, ttl);
        let writes = ctl.status_writes_total();
        (gw, elector, writes, tokio::spawn(ctl.run()))
    }

    /// Two gateway instances on one store (as two agents with `--gateway`, or an agent and
    /// `fjord-gateway --store`): both serve traffic, exactly one writes status, and it lists
    /// both instances' addresses. When it stops without resigning (a crash), the other takes
    /// over after the lease TTL, the dead instance's address leaves `status.addresses`, and the
    /// status of a route deleted while nobody was writing is removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_one_status_writer_and_take_over() {
        let (_dir, store, gw_port) = one_listener_store(&[route_to("r", "one"), route_to("doomed", "one")]).await;

        let ttl = Duration::from_secs(2);
        let mut instances = vec![];
        for (id, ip) in [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")] {
            let ip: IpAddr = ip.parse().unwrap();
            let (gw, elector, writes, task) = spawn_instance(&store, id, ip, ttl);
            instances.push((id, ip, gw, elector, writes, task));
        }
        // both serve
        for (_, ip, ..) in &instances {
            let addr = SocketAddr::new(*ip, gw_port);
            assert_eq!(until(Duration::from_secs(20), || who_at(addr)).await.as_deref(), Some("one"), "{addr} serves");
        }
        let status_addrs = || async {
            let kv = store.get(&keys::status("gateways", "app", "gw")).await.ok()??;
            let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
            Some(v["addresses"].as_array()?.iter().filter_map(|a| a["value"].as_str().map(str::to_string)).collect::<Vec<_>>())
        };
        // the status lists both instances
        let both = until(Duration::from_secs(10), || async { (status_addrs().await? == ["127.0.0.1", "127.0.0.2"]).then_some(()) }).await;
        assert!(both.is_some(), "status.addresses: {:?}", status_addrs().await);
        // a few more changes: still only one writer
        for i in 0..3 {
            put_manifests(store.clone(), route_to(&format!("extra{i}"), "one")).await;
        }
        let extra_done = until(Duration::from_secs(10), || async { store.get(&keys::status("httproutes", "app", "extra2")).await.ok()?.map(|_| ()) }).await;
        assert!(extra_done.is_some());
        let counts: Vec<u64> = instances.iter().map(|i| i.4.load(std::sync::atomic::Ordering::Relaxed)).collect();
        assert!((counts[0] > 0) ^ (counts[1] > 0), "exactly one instance writes status: {counts:?}");
        let leader_idx = if counts[0] > 0 { 0 } else { 1 };
        let holder = crate::leader::holder(store.as_ref(), crate::leader::STATUS_LEASE_KEY).await.unwrap().unwrap();
        assert_eq!(holder.holder_identity, instances[leader_idx].0);

        // the leader crashes: its controller, proxy and elector stop, nothing is cleaned up
        let (_, _, gw, elector, _, task) = instances.remove(leader_idx);
        elector.abandon();
        task.abort();
        gw.shutdown(Duration::from_millis(100)).await;
        // a route is deleted while nobody writes status
        store.delete(&keys::object("httproutes", "app", "doomed")).await.unwrap();
        let (other_id, other_ip, other_gw, other_elector, other_writes, _other_task) = instances.remove(0);
        let t0 = Instant::now();
        let took_over = until(Duration::from_secs(20), || async { (status_addrs().await? == [other_ip.to_string()]).then_some(()) }).await;
        assert!(took_over.is_some(), "the other instance never took over the status: {:?}", status_addrs().await);
        println!("status writer take-over: {:.2} s after the leader stopped (lease TTL {} s)", t0.elapsed().as_secs_f64(), ttl.as_secs());
        assert!(other_writes.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(crate::leader::holder(store.as_ref(), crate::leader::STATUS_LEASE_KEY).await.unwrap().unwrap().holder_identity, other_id);
        let stale = until(Duration::from_secs(10), || async { store.get(&keys::status("httproutes", "app", "doomed")).await.ok()?.is_none().then_some(()) }).await;
        assert!(stale.is_some(), "status of a deleted route is removed by the new leader");
        assert!(store.get(&keys::status("httproutes", "app", "r")).await.unwrap().is_some());
        // the survivor still serves
        assert_eq!(who_at(SocketAddr::new(other_ip, gw_port)).await.as_deref(), Some("one"));
        other_elector.resign().await;
        other_gw.shutdown(Duration::from_millis(100)).await;
    }

    /// A listener port that one instance cannot bind (taken by another program on its address)
    /// while the status writer can: the writer reports it from that instance's record
    /// (`Accepted=False/PortUnavailable`, naming the instance), and clears it once the
    /// instance binds the port on its retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_unavailable_on_a_non_writer_instance_is_reported() {
        let (_dir, store, gw_port) = one_listener_store(&[route_to("r", "one")]).await;
        // another program holds the port on node-b's address
        let squatter = std::net::TcpListener::bind(("127.0.0.2", gw_port)).unwrap();

        let ttl = Duration::from_secs(2);
        let mut keep = vec![];
        for (id, ip) in [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")] {
            let (gw, elector, _, task) = spawn_instance(&store, id, ip.parse().unwrap(), ttl);
            if id == "node-a" {
                // node-a writes the status: it holds the lease before node-b starts
                let led = until(Duration::from_secs(10), || async {
                    (crate::leader::holder(store.as_ref(), crate::leader::STATUS_LEASE_KEY).await.ok()??.holder_identity == "node-a").then_some(())
                })
                .await;
                assert!(led.is_some(), "node-a became the status writer");
            }
            keep.push((gw, elector, task));
        }
        let listener = || async {
            let kv = store.get(&keys::status("gateways", "app", "gw")).await.ok()??;
            let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
            let c = v["listeners"][0]["conditions"].as_array()?.iter().find(|c| c["type"] == "Accepted")?.clone();
            Some((c["status"].as_str()?.to_string(), c["reason"].as_str()?.to_string(), c["message"].as_str()?.to_string()))
        };
        let reported = until(Duration::from_secs(10), || async { listener().await.filter(|c| c.1 == "PortUnavailable") }).await;
        let last = listener().await;
        let (status, _, message) = reported.unwrap_or_else(|| panic!("node-b's unbindable port is reported: {last:?}"));
        assert_eq!(status, "False");
        assert!(message.contains("node-b") && message.contains(&gw_port.to_string()), "{message}");
        // node-a serves meanwhile
        assert_eq!(until(Duration::from_secs(10), || who_at(SocketAddr::new("127.0.0.1".parse().unwrap(), gw_port))).await.as_deref(), Some("one"));
        // the port is freed: node-b binds it on its retry, its record clears, the status follows
        drop(squatter);
        let cleared = until(Duration::from_secs(20), || async { listener().await.filter(|c| c.0 == "True") }).await;
        assert!(cleared.is_some(), "the condition clears once node-b listens: {:?}", listener().await);
        assert_eq!(until(Duration::from_secs(10), || who_at(SocketAddr::new("127.0.0.2".parse().unwrap(), gw_port))).await.as_deref(), Some("one"));
        for (gw, elector, task) in keep {
            elector.resign().await;
            task.abort();
            gw.shutdown(Duration::from_millis(100)).await;
        }
    }

    #[test]
    fn store_resolver_maps_service_port_to_ready_endpoints_on_the_target_port() {
        let (_, r) = store_objects(SVC);
        let b = r.resolve("app", "web", 8080).unwrap();
        assert_eq!(b.endpoints, vec!["10.244.1.5:18080".parse().unwrap(), "10.244.2.5:18080".parse().unwrap()]);
        assert_eq!(b.protocol, AppProtocol::Http1);
        let g = r.resolve("app", "web", 9090).unwrap();
        assert_eq!(g.protocol, AppProtocol::H2c);
        assert_eq!(g.endpoints, vec!["10.244.1.5:19090".parse().unwrap()]);
        assert!(matches!(r.resolve("app", "web", 53), Err(ResolveError::Unsupported { .. })));
        assert!(matches!(r.resolve("app", "web", 1), Err(ResolveError::PortNotFound { .. })));
        assert!(matches!(r.resolve("app", "nope", 8080), Err(ResolveError::ServiceNotFound { .. })));
        assert!(matches!(r.resolve("other", "web", 8080), Err(ResolveError::ServiceNotFound { .. })));
    }

    const GW: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fjord}
spec: {controllerName: fjord.dev/gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: app}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: a, port: 18001, protocol: HTTP}
  - {name: b, port: 18002, protocol: HTTP}
"#;

    #[test]
    fn cross_namespace_ref_without_grant_is_ref_not_permitted_and_with_grant_resolves() {
        let route = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: other}
spec:
  parentRefs: [{name: gw, namespace: app}]
  rules:
  - backendRefs: [{name: web, namespace: app, port: 8080}]
"#;
        let gw = GW.replace("protocol: HTTP}", "protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}");
        let (objs, r) = store_objects(&format!("{SVC}---\n{gw}{route}"));
        let out = build(&objs, &r);
        let c = &out.status.http_routes["other/r"].parents[0].conditions;
        let rr = find_condition(c, "ResolvedRefs").unwrap();
        assert_eq!((rr.status.as_str(), rr.reason.as_str()), ("False", "RefNotPermitted"), "{c:?}");
        let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: app}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: other}]\n  to: [{group: \"\", kind: Service}]\n";
        let (objs, r) = store_objects(&format!("{SVC}---\n{gw}{route}{grant}"));
        let out = build(&objs, &r);
        let c = &out.status.http_routes["other/r"].parents[0].conditions;
        assert!(find_condition(c, "ResolvedRefs").unwrap().is_true(), "{c:?}");
    }

    #[test]
    fn unavailable_port_marks_only_its_listener() {
        let (objs, r) = store_objects(GW);
        let out = build(&objs, &r);
        let st = mark_unavailable(out.status, &objs, &[(18002u16, "in use".to_string())].into());
        let g = &st.gateways["app/gw"];
        let a = find_condition(&g.listeners[0].conditions, "Accepted").unwrap();
        let b = find_condition(&g.listeners[1].conditions, "Accepted").unwrap();
        assert!(a.is_true());
        assert_eq!((b.status.as_str(), b.reason.as_str()), ("False", "PortUnavailable"));
        assert!(!find_condition(&g.listeners[1].conditions, "Programmed").unwrap().is_true());
        assert!(find_condition(&g.conditions, "Programmed").unwrap().is_true(), "listener a still serves");
        assert_eq!(find_condition(&g.conditions, "Accepted").unwrap().reason, "ListenersNotValid");
    }

    #[test]
    fn transition_times_are_kept_while_status_is_unchanged() {
        let mut v = serde_json::json!({"conditions": [{"type": "Accepted", "status": "True"}], "listeners": [{"conditions": [{"type": "Programmed", "status": "True"}]}]});
        stamp_transitions(&mut v, None, "T1");
        assert_eq!(v["listeners"][0]["conditions"][0]["lastTransitionTime"], "T1");
        let prev = v.clone();
        let mut w = serde_json::json!({"conditions": [{"type": "Accepted", "status": "False"}], "listeners": [{"conditions": [{"type": "Programmed", "status": "True"}]}]});
        stamp_transitions(&mut w, Some(&prev), "T2");
        assert_eq!(w["conditions"][0]["lastTransitionTime"], "T2");
        assert_eq!(w["listeners"][0]["conditions"][0]["lastTransitionTime"], "T1");
    }

    #[test]
    fn relevant_keys() {
        assert!(relevant_key("/fjord/v1/httproutes/a/b"));
        assert!(relevant_key("/fjord/v1/endpointslices/a/b"));
        assert!(relevant_key("/fjord/v1/gateway-instances/node1"));
        assert!(!relevant_key("/fjord/v1/leases/gateway-status"));
        assert!(!relevant_key("/fjord/v1/status/httproutes/a/b"));
        assert!(!relevant_key("/fjord/v1/pods/a/b"));
    }

    /// The whole loop on a real (embedded) store and real sockets on loopback: apply through the
    /// store, requests reach an echo backend, a route change is served after the watch fires,
    /// status lands in the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_fed_gateway_serves_updates_and_writes_status() {
        let dir = tempfile::tempdir().unwrap();
        let store = fjord_store::open(&format!("embedded:{}", dir.path().join("s.redb").display())).await.unwrap();
        // echo backends on loopback
        let mut ports = vec![];
        for name in ["one", "two"] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(l.local_addr().unwrap().port());
            tokio::spawn(crate::echo::serve_echo(l, crate::echo::EchoOptions { pod: name.to_string(), namespace: "app".to_string() }, std::future::pending::<()>()));
        }
        let gw_port = fjord_store::testing::free_loopback_port();
        let svc = |name: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: app, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
            )
        };
        let route = |backend: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: app}}\nspec:\n  parentRefs: [{{name: gw}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 80}}]\n")
        };
        let put_all = |text: String| put_manifests(store.clone(), text);
        let gw_yaml = GW.replace("18001", &gw_port.to_string()).replace("  - {name: b, port: 18002, protocol: HTTP}\n", "");
        put_all(format!("{}---\n{}---\n{gw_yaml}---\n{}", svc("one", ports[0]), svc("two", ports[1]), route("one"))).await;

        let gw = Gateway::new(crate::proxy::GatewayOptions { listen_ip: "127.0.0.1".parse().unwrap(), access_log: false, ..Default::default() });
        let ctl = Controller::new(store.clone(), gw.clone(), "127.0.0.1".parse().unwrap());
        let synced = ctl.synced_revision();
        tokio::spawn(ctl.run());

        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let who = |client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>>| async move {
            let uri: http::Uri = format!("http://127.0.0.1:{gw_port}/x").parse().unwrap();
            let r = client.get(uri).await.ok()?;
            let body = http_body_util::BodyExt::collect(r.into_body()).await.ok()?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            v["pod"].as_str().map(str::to_string)
        };
        let t0 = Instant::now();
        let mut first = None;
        while t0.elapsed() < Duration::from_secs(20) {
            first = who(client.clone()).await;
            if first.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(first.as_deref(), Some("one"));
        // the table is served as soon as it is swapped in; the sync completes (and records its
        // revision) after the status write that follows
        let t_sync = Instant::now();
        while synced.load(std::sync::atomic::Ordering::Relaxed) == 0 && t_sync.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(synced.load(std::sync::atomic::Ordering::Relaxed) > 0, "the first sync completed");

        // route change through the store
        let t1 = Instant::now();
        put_all(route("two")).await;
        let mut seen = None;
        while t1.elapsed() < Duration::from_secs(20) {
            if who(client.clone()).await.as_deref() == Some("two") {
                seen = Some(t1.elapsed());
                break;
            }
        }
        let seen = seen.expect("route change becomes visible");
        println!("store write -> route change served: {:.1} ms", seen.as_secs_f64() * 1000.0);

        // status in the store
        let mut st = None;
        let t2 = Instant::now();
        while t2.elapsed() < Duration::from_secs(10) {
            if let Some(kv) = store.get(&keys::status("httproutes", "app", "r")).await.unwrap() {
                let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
                if v["parents"][0]["conditions"][0]["observedGeneration"] == 2 {
                    st = Some(v);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = st.expect("route status with observedGeneration 2");
        assert_eq!(st["parents"][0]["conditions"][0]["type"], "Accepted");
        assert_eq!(st["parents"][0]["conditions"][0]["status"], "True");
        assert!(st["parents"][0]["conditions"][0]["lastTransitionTime"].is_string());
        let g: serde_json::Value = serde_json::from_slice(&store.get(&keys::status("gateways", "app", "gw")).await.unwrap().unwrap().value).unwrap();
        assert_eq!(g["addresses"][0]["value"], "127.0.0.1");
        gw.shutdown(Duration::from_secs(1)).await;
    }
}
