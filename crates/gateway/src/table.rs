//! The immutable routing table and its pure builder.
//!
//! [`build`] turns an [`ObjectSet`] plus a [`BackendResolver`] into a [`RoutingTable`] and a
//! [`StatusReport`] (GatewayClass, Gateway/listener and HTTPRoute conditions). It does no I/O:
//! the runtime swaps the table in atomically, the caller writes the status wherever it lives.
//!
//! Matching precedence (Gateway API HTTPRoute spec), evaluated per listener:
//! 1. hostname: the most specific matching hostname first (exact, then longer wildcards, then
//!    routes without hostname); a less specific hostname's rules are tried when no rule of a
//!    more specific one matches;
//! 2. `Exact` path, then `RegularExpression` (implementation-specific: longer pattern first),
//!    then `PathPrefix` with the most characters;
//! 3. a method match; 4. most header matches; 5. most query-param matches;
//! 6. the oldest route (creationTimestamp), 7. `namespace/name` alphabetically;
//! 8. rule order, then match order within the route.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use regex::Regex;

use crate::api::*;
use crate::config::ObjectSet;
use crate::matching::*;
use crate::resolver::{AppProtocol, BackendResolver, ResolveError};
use crate::tls::{certified_key_from_secret, server_config, SniResolver};

// ================================================================ compiled table

/// Listener protocol supported by the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    Http,
    Https,
}

/// The immutable routing table. Cheap to share (`Arc`), swapped as a whole.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub ports: BTreeMap<u16, PortTable>,
}

/// Everything served on one port.
#[derive(Debug)]
pub struct PortTable {
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// TLS config with the SNI resolver for HTTPS ports.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Programmed listeners, most specific hostname first.
    pub listeners: Vec<ListenerTable>,
}

#[derive(Debug)]
pub struct ListenerTable {
    /// `namespace/gateway/listener`.
    pub id: String,
    pub hostname: Option<String>,
    pub port: u16,
    pub protocol: ListenerProtocol,
    pub vhosts: VirtualHosts,
}

/// Route entries grouped by effective hostname.
#[derive(Debug, Default)]
pub struct VirtualHosts {
    exact: HashMap<String, Vec<Arc<RouteEntry>>>,
    /// (`*.suffix` pattern, entries), longest pattern first.
    wildcard: Vec<(String, Vec<Arc<RouteEntry>>)>,
    any: Vec<Arc<RouteEntry>>,
}

impl VirtualHosts {
    /// Entry lists applicable to `host`, most specific hostname first.
    pub fn candidates<'a, 'h>(&'a self, host: &'h str) -> impl Iterator<Item = &'a Arc<RouteEntry>> + use<'a, 'h> {
        let exact = self.exact.get(host).into_iter().flatten();
        let wild = self.wildcard.iter().filter(move |(p, _)| hostname_matches(p, host)).flat_map(|(_, v)| v.iter());
        exact.chain(wild).chain(self.any.iter())
    }

    fn insert(&mut self, hostname: &Option<String>, e: Arc<RouteEntry>) {
        match hostname {
            None => self.any.push(e),
            Some(h) if h.starts_with('*') => match self.wildcard.iter_mut().find(|(p, _)| p == h) {
                Some((_, v)) => v.push(e),
                None => self.wildcard.push((h.clone(), vec![e])),
            },
            Some(h) => self.exact.entry(h.clone()).or_default().push(e),
        }
    }

    fn finish(&mut self) {
        let sort = |v: &mut Vec<Arc<RouteEntry>>| v.sort_by(|a, b| a.key.cmp(&b.key));
        self.exact.values_mut().for_each(sort);
        self.wildcard.iter_mut().for_each(|(_, v)| sort(v));
        self.wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        sort(&mut self.any);
    }
}

impl ListenerTable {
    /// Find the route entry for a request.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Arc<RouteEntry>> {
        self.vhosts.candidates(req.host).find(|e| e.matches(req))
    }
}

impl PortTable {
    /// Pick the listener for a host: exact hostname, then longest wildcard, then none.
    pub fn listener_for(&self, host: &str) -> Option<&ListenerTable> {
        self.listeners.iter().find(|l| l.hostname.as_deref().is_none_or(|p| hostname_matches(p, host)))
    }
}

/// What the matcher looks at in a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a http::HeaderMap,
    pub query: &'a [(String, String)],
}

/// Sort key realising the precedence rules (smaller sorts first).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct EntryKey {
    path_kind: u8,
    neg_path_len: i64,
    no_method: bool,
    neg_headers: i64,
    neg_query: i64,
    created: String,
    route: String,
    rule: usize,
    match_index: usize,
}

#[derive(Debug)]
pub enum PathMatcher {
    Exact(String),
    /// Normalised prefix (no trailing slash; empty = `/`).
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
pub enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn is_match(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(x) => x == v,
            ValueMatcher::Regex(r) => r.is_match(v),
        }
    }
}

/// One `matches[]` entry of one rule, placed in precedence order.
#[derive(Debug)]
pub struct RouteEntry {
    key: EntryKey,
    pub path: PathMatcher,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatcher)>,
    pub query: Vec<(String, ValueMatcher)>,
    pub rule: Arc<Rule>,
}

impl RouteEntry {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => p == r.path,
            PathMatcher::Prefix(p) => path_prefix_matches(p, r.path),
            PathMatcher::Regex(re) => re.is_match(r.path),
        };
        if !path_ok {
            return false;
        }
        if let Some(m) = &self.method {
            if m != r.method {
                return false;
            }
        }
        for (name, vm) in &self.headers {
            let mut vals = r.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).peekable();
            if vals.peek().is_none() {
                return false;
            }
            let joined = vals.collect::<Vec<_>>().join(",");
            if !vm.is_match(&joined) {
                return false;
            }
        }
        for (name, vm) in &self.query {
            match query_param(r.query, name) {
                Some(v) if vm.is_match(v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A compiled HTTPRoute rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the HTTPRoute.
    pub route: String,
    pub index: usize,
    /// `namespace/name/index`: the `route` label in metrics and access logs.
    pub label: String,
    /// Metric handles cached on first use (avoids label allocation per request).
    pub metrics: crate::metrics::RuleMetrics,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
    pub backends: BackendSet,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
}

/// Header set/add/remove operations.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug)]
pub struct Mirror {
    pub backend: Arc<Backend>,
    /// Fraction of requests mirrored, in [0, 1].
    pub fraction: f64,
}

/// A resolved backend (one Service port) with its ready endpoints.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name:port`.
    pub name: Arc<str>,
    pub endpoints: Vec<SocketAddr>,
    /// `ip:port` authorities of `endpoints`, for building upstream URIs without parsing.
    pub authorities: Vec<http::uri::Authority>,
    pub protocol: AppProtocol,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    rr: AtomicUsize,
    /// Requests in flight per endpoint (for least-request balancing).
    in_flight: Vec<AtomicUsize>,
}

/// How a request picks an endpoint of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Strict rotation.
    #[default]
    RoundRobin,
    /// Power of two choices: two random endpoints, the one with fewer requests in flight.
    LeastRequest,
}

/// Counts a request as in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend {
    /// Next endpoint, round-robin. `None` when no endpoint is ready.
    pub fn next_endpoint(&self) -> Option<SocketAddr> {
        self.next_endpoint_index().map(|i| self.endpoints[i])
    }

    /// Index of the next endpoint, round-robin.
    pub fn next_endpoint_index(&self) -> Option<usize> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.rr.fetch_add(1, Ordering::Relaxed);
        Some(i % self.endpoints.len())
    }

    /// Pick an endpoint with `policy` and count the request in flight on it until the returned
    /// guard is dropped. `None` when no endpoint is ready.
    pub fn pick_endpoint(self: &Arc<Self>, policy: LbPolicy) -> Option<(usize, InFlight)> {
        let n = self.endpoints.len();
        let i = match (policy, n) {
            (_, 0) => return None,
            (_, 1) => 0,
            (LbPolicy::RoundRobin, _) => self.next_endpoint_index()?,
            (LbPolicy::LeastRequest, _) => {
                let a = fastrand::usize(0..n);
                let mut b = fastrand::usize(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (la, lb) = (self.in_flight[a].load(Ordering::Relaxed), self.in_flight[b].load(Ordering::Relaxed));
                if lb < la {
                    b
                } else {
                    a
                }
            }
        };
        self.in_flight[i].fetch_add(1, Ordering::Relaxed);
        Some((i, InFlight(self.clone(), i)))
    }

    /// Requests currently in flight on endpoint `i`.
    pub fn in_flight(&self, i: usize) -> usize {
        self.in_flight[i].load(Ordering::Relaxed)
    }

    fn new(name: String, endpoints: Vec<SocketAddr>, protocol: AppProtocol, rq: Option<HeaderOps>, rs: Option<HeaderOps>) -> Self {
        let n_eps = endpoints.len();
        let authorities = endpoints
            .iter()
            .map(|e| e.to_string().parse().expect("a socket address is a valid authority"))
            .collect();
        Backend {
            name: name.into(),
            endpoints,
            authorities,
            protocol,
            request_headers: rq,
            response_headers: rs,
            rr: AtomicUsize::new(0),
            in_flight: endpoints_counters(n_eps),
        }
    }
}

/// The outcome of picking a backendRef.
#[derive(Debug)]
pub enum BackendChoice {
    Ready(Arc<Backend>),
    /// Answer with this status (500 for an unresolved ref, 503 for no ready endpoints).
    Fail { name: Arc<str>, status: StatusCode },
}

/// Weighted choice among backendRefs.
#[derive(Debug)]
pub struct BackendSet {
    pub choices: Vec<(u32, Arc<BackendChoice>)>,
    /// Smooth weighted round-robin schedule (indices into `choices`) when the total weight is
    /// small; otherwise weighted random.
    schedule: Vec<u16>,
    cumulative: Vec<u64>,
    counter: AtomicUsize,
}

const MAX_SCHEDULE: u64 = 10_000;

impl BackendSet {
    pub fn new(choices: Vec<(u32, Arc<BackendChoice>)>) -> Self {
        let total: u64 = choices.iter().map(|(w, _)| *w as u64).sum();
        let mut schedule = Vec::new();
        let mut cumulative = Vec::new();
        if total > 0 && total <= MAX_SCHEDULE && choices.len() < u16::MAX as usize {
            let g = choices.iter().filter(|(w, _)| *w > 0).fold(0u64, |g, (w, _)| gcd(g, *w as u64));
            let n = total / g;
            let mut current: Vec<i64> = vec![0; choices.len()];
            for _ in 0..n {
                let mut best = 0;
                for (i, (w, _)) in choices.iter().enumerate() {
                    current[i] += (*w as u64 / g) as i64;
                    if current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= n as i64;
                schedule.push(best as u16);
            }
        } else {
            let mut acc = 0;
            for (w, _) in &choices {
                acc += *w as u64;
                cumulative.push(acc);
            }
        }
        BackendSet { choices, schedule, cumulative, counter: AtomicUsize::new(0) }
    }

    /// Pick a backendRef. `None` when there is nothing to pick (no refs, or all weights 0): 500.
    pub fn pick(&self) -> Option<&Arc<BackendChoice>> {
        if !self.schedule.is_empty() {
            let i = self.counter.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
            return Some(&self.choices[self.schedule[i] as usize].1);
        }
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let r = fastrand::u64(0..total);
        let i = self.cumulative.partition_point(|c| *c <= r);
        Some(&self.choices[i].1)
    }
}

fn endpoints_counters(n: usize) -> Vec<AtomicUsize> {
    (0..n).map(|_| AtomicUsize::new(0)).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

// ================================================================ status report

/// Conditions computed for every object fjord owns. Keys are `namespace/name` (GatewayClass:
/// name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusReport {
    pub gateway_classes: BTreeMap<String, GatewayClassStatus>,
    pub gateways: BTreeMap<String, GatewayStatus>,
    pub http_routes: BTreeMap<String, RouteStatus>,
}

/// Result of [`build`].
#[derive(Debug)]
pub struct BuildOutput {
    pub table: RoutingTable,
    pub status: StatusReport,
}

// ================================================================ builder

struct ListenerState {
    gw_key: String,
    gw_ns: String,
    name: String,
    hostname: Option<String>,
    port: u16,
    protocol: ListenerProtocol,
    programmed: bool,
    allowed_from: String,
    allow_selector: Option<LabelSelector>,
    http_route_allowed: bool,
    cert: Option<Arc<rustls::sign::CertifiedKey>>,
    vhosts: VirtualHosts,
    attached: u32,
}

#[allow(clippy::too_many_arguments)]
fn ref_granted(
    grants: &[ReferenceGrant],
    from_group: &str,
    from_kind: &str,
    from_ns: &str,
    to_group: &str,
    to_kind: &str,
    to_ns: &str,
    to_name: &str,
) -> bool {
    grants.iter().any(|g| {
        g.metadata.ns() == to_ns
            && g.spec.from.iter().any(|f| f.group == from_group && f.kind == from_kind && f.namespace == from_ns)
            && g.spec.to.iter().any(|t| {
                t.group == to_group && t.kind == to_kind && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    })
}

/// Build the routing table and all status conditions. Pure: no I/O.
pub fn build(objs: &ObjectSet, resolver: &dyn BackendResolver) -> BuildOutput {
    let mut status = StatusReport::default();

    // --- GatewayClasses
    let mut our_classes = std::collections::BTreeSet::new();
    for gc in &objs.gateway_classes {
        if gc.spec.controller_name == CONTROLLER_NAME {
            our_classes.insert(gc.metadata.name.clone());
            status.gateway_classes.insert(
                gc.metadata.name.clone(),
                GatewayClassStatus {
                    conditions: vec![Condition::new(
                        "Accepted",
                        true,
                        "Accepted",
                        "handled by fjord.dev/gateway",
                        gc.metadata.generation,
                    )],
                },
            );
        }
    }

    // --- Gateways and listeners, oldest Gateway first (it wins port conflicts)
    let mut gateways: Vec<&Gateway> =
        objs.gateways.iter().filter(|g| our_classes.contains(&g.spec.gateway_class_name)).collect();
    gateways.sort_by(|a, b| {
        let ka = (a.metadata.creation_timestamp.clone().unwrap_or_default(), a.metadata.key());
        let kb = (b.metadata.creation_timestamp.clone().unwrap_or_default(), b.metadata.key());
        ka.cmp(&kb)
    });
    let secrets: HashMap<String, &Secret> = objs.secrets.iter().map(|s| (s.metadata.key(), s)).collect();
    // port -> (protocol, accepted hostnames)
    let mut ports: BTreeMap<u16, (ListenerProtocol, Vec<Option<String>>)> = BTreeMap::new();
    let mut listeners: Vec<ListenerState> = Vec::new();
    // gateway key -> range of indices into `listeners`, and per-listener conditions
    let mut gw_listeners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut listener_conds: Vec<(Vec<Condition>, Vec<RouteGroupKind>)> = Vec::new();

    for gw in &gateways {
        let gen = gw.metadata.generation;
        let gw_key = gw.metadata.key();
        let gw_ns = gw.metadata.ns().to_string();
        let mut seen_names = std::collections::BTreeSet::new();
        for (li, l) in gw.spec.listeners.iter().enumerate() {
            let field = format!("Gateway {gw_key} spec.listeners[{li}] ({})", l.name);
            let mut accepted: Result<(), (&str, String)> = Ok(());
            let mut conflicted: Option<(&str, String)> = None;
            let mut refs: Result<(), (&str, String)> = Ok(());
            let mut cert = None;
            if !seen_names.insert(l.name.clone()) {
                accepted = Err(("Invalid", format!("{field}: duplicate listener name; listener names must be unique")));
            }
            let protocol = match l.protocol.as_str() {
                "HTTP" => Some(ListenerProtocol::Http),
                "HTTPS" => Some(ListenerProtocol::Https),
                other => {
                    accepted = Err((
                        "UnsupportedProtocol",
                        format!("{field}: protocol `{other}` is not supported; use HTTP or HTTPS"),
                    ));
                    None
                }
            };
            if let Some(h) = &l.hostname {
                if let Err(e) = validate_hostname(h) {
                    accepted = Err(("Invalid", format!("{field}.hostname: {e}")));
                }
            }
            // allowedRoutes
            let ar = l.allowed_routes.clone().unwrap_or_default();
            let ns = ar.namespaces.clone().unwrap_or_default();
            let allowed_from = ns.from.clone().unwrap_or_else(|| "Same".into());
            if !matches!(allowed_from.as_str(), "Same" | "All" | "Selector") {
                accepted =
                    Err(("Invalid", format!("{field}.allowedRoutes.namespaces.from: `{allowed_from}` must be Same, All or Selector")));
            }
            if allowed_from == "Selector" {
                match &ns.selector {
                    None => {
                        accepted = Err(("Invalid", format!("{field}.allowedRoutes.namespaces.selector: required with from: Selector")))
                    }
                    Some(sel) => {
                        if let Err(e) = sel.matches(&Default::default()) {
                            accepted = Err(("Invalid", format!("{field}.allowedRoutes.namespaces.selector.{e}")));
                        }
                    }
                }
            }
            let mut supported_kinds = Vec::new();
            if ar.kinds.is_empty() {
                supported_kinds.push(RouteGroupKind { group: Some(GATEWAY_GROUP.into()), kind: "HTTPRoute".into() });
            } else {
                for k in &ar.kinds {
                    let g = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
                    if g == GATEWAY_GROUP && k.kind == "HTTPRoute" {
                        supported_kinds.push(RouteGroupKind { group: Some(GATEWAY_GROUP.into()), kind: "HTTPRoute".into() });
                    } else {
                        refs = Err((
                            "InvalidRouteKinds",
                            format!("{field}.allowedRoutes.kinds: {g}/{} is not supported; only HTTPRoute", k.kind),
                        ));
                    }
                }
            }
            // TLS
            if protocol == Some(ListenerProtocol::Https) {
                match &l.tls {
                    None => {
                        refs = Err(("InvalidCertificateRef", format!("{field}: HTTPS listener needs tls.certificateRefs")))
                    }
                    Some(tls) if tls.mode.as_deref().unwrap_or("Terminate") != "Terminate" => {
                        accepted = Err((
                            "UnsupportedProtocol",
                            format!("{field}.tls.mode: only Terminate is supported for HTTPS"),
                        ))
                    }
                    Some(tls) if tls.certificate_refs.is_empty() => {
                        refs = Err(("InvalidCertificateRef", format!("{field}: tls.certificateRefs is empty")))
                    }
                    Some(tls) => {
                        for (ci, r) in tls.certificate_refs.iter().enumerate() {
                            let rf = format!("{field}.tls.certificateRefs[{ci}]");
                            let g = r.group.as_deref().unwrap_or("");
                            let k = r.kind.as_deref().unwrap_or("Secret");
                            if !g.is_empty() || k != "Secret" {
                                refs = Err(("InvalidCertificateRef", format!("{rf}: {g}/{k} is not supported; use a core Secret")));
                                continue;
                            }
                            let sns = r.namespace.clone().unwrap_or_else(|| gw_ns.clone());
                            if sns != gw_ns
                                && !ref_granted(&objs.reference_grants, GATEWAY_GROUP, "Gateway", &gw_ns, "", "Secret", &sns, &r.name)
                            {
                                refs = Err((
                                    "RefNotPermitted",
                                    format!("{rf}: Secret {sns}/{} is in another namespace and no ReferenceGrant in {sns} allows it", r.name),
                                ));
                                continue;
                            }
                            match secrets.get(&format!("{sns}/{}", r.name)) {
                                None => {
                                    refs = Err(("InvalidCertificateRef", format!("{rf}: Secret {sns}/{} not found", r.name)))
                                }
                                Some(s) => match certified_key_from_secret(s) {
                                    Ok(k) => {
                                        cert.get_or_insert(k);
                                    }
                                    Err(e) => refs = Err(("InvalidCertificateRef", format!("{rf}: {e}"))),
                                },
                            }
                        }
                        if cert.is_none() && refs.is_ok() {
                            refs = Err(("InvalidCertificateRef", format!("{field}: no usable certificate")));
                        }
                    }
                }
            }
            // conflicts (only for otherwise valid listeners)
            if let (Ok(()), Some(p)) = (&accepted, protocol) {
                match ports.get_mut(&l.port) {
                    Some((pp, _)) if *pp != p => {
                        conflicted = Some((
                            "ProtocolConflict",
                            format!("{field}: port {} is already used with another protocol by an older listener", l.port),
                        ))
                    }
                    Some((_, hosts)) if hosts.contains(&l.hostname) => {
                        conflicted = Some((
                            "HostnameConflict",
                            format!(
                                "{field}: port {} hostname {} is already served by an older listener",
                                l.port,
                                l.hostname.as_deref().unwrap_or("(any)")
                            ),
                        ))
                    }
                    Some((_, hosts)) => {
                        if refs.is_ok() {
                            hosts.push(l.hostname.clone())
                        }
                    }
                    None => {
                        if refs.is_ok() {
                            ports.insert(l.port, (p, vec![l.hostname.clone()]));
                        }
                    }
                }
            }
            let programmed = accepted.is_ok() && conflicted.is_none() && refs.is_ok();
            let mut conds = Vec::new();
            match &accepted {
                Ok(()) => conds.push(Condition::new("Accepted", true, "Accepted", "listener accepted", gen)),
                Err((r, m)) => conds.push(Condition::new("Accepted", false, r, m.clone(), gen)),
            }
            match &conflicted {
                None => conds.push(Condition::new("Conflicted", false, "NoConflicts", "no conflicts", gen)),
                Some((r, m)) => conds.push(Condition::new("Conflicted", true, r, m.clone(), gen)),
            }
            match &refs {
                Ok(()) => conds.push(Condition::new("ResolvedRefs", true, "ResolvedRefs", "all references resolved", gen)),
                Err((r, m)) => conds.push(Condition::new("ResolvedRefs", false, r, m.clone(), gen)),
            }
            if programmed {
                conds.push(Condition::new("Programmed", true, "Programmed", "listener programmed", gen));
            } else {
                let why = accepted
                    .as_ref()
                    .err()
                    .map(|x| x.1.clone())
                    .or(conflicted.as_ref().map(|x| x.1.clone()))
                    .or(refs.as_ref().err().map(|x| x.1.clone()))
                    .unwrap_or_default();
                conds.push(Condition::new("Programmed", false, "Invalid", why, gen));
            }
            gw_listeners.entry(gw_key.clone()).or_default().push(listeners.len());
            listener_conds.push((conds, supported_kinds.clone()));
            listeners.push(ListenerState {
                gw_key: gw_key.clone(),
                gw_ns: gw_ns.clone(),
                name: l.name.clone(),
                hostname: l.hostname.clone(),
                port: l.port,
                protocol: protocol.unwrap_or(ListenerProtocol::Http),
                programmed,
                allowed_from: allowed_from.clone(),
                allow_selector: ns.selector.clone(),
                http_route_allowed: !supported_kinds.is_empty(),
                cert,
                vhosts: VirtualHosts::default(),
                attached: 0,
            });
        }
    }

    // --- HTTPRoutes, oldest first
    let mut routes: Vec<&HttpRoute> = objs.http_routes.iter().collect();
    routes.sort_by(|a, b| {
        let ka = (a.metadata.creation_timestamp.clone().unwrap_or_default(), a.metadata.key());
        let kb = (b.metadata.creation_timestamp.clone().unwrap_or_default(), b.metadata.key());
        ka.cmp(&kb)
    });
    let gw_by_key: HashMap<String, &Gateway> = gateways.iter().map(|g| (g.metadata.key(), *g)).collect();
    let ns_labels: HashMap<&str, BTreeMap<String, String>> =
        objs.namespaces.iter().map(|n| (n.metadata.name.as_str(), n.metadata.labels.clone())).collect();

    for route in routes {
        let rkey = route.metadata.key();
        let rns = route.metadata.ns().to_string();
        let gen = route.metadata.generation;
        let mut parents_status = Vec::new();
        // our parents only
        let our_parents: Vec<&ParentReference> = route
            .spec
            .parent_refs
            .iter()
            .filter(|p| {
                p.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
                    && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
                    && gw_by_key.contains_key(&format!("{}/{}", p.namespace.as_deref().unwrap_or(&rns), p.name))
            })
            .collect();
        if our_parents.is_empty() {
            continue;
        }
        let mut hostname_err = None;
        for (i, h) in route.spec.hostnames.iter().enumerate() {
            if let Err(e) = validate_hostname(h) {
                hostname_err = Some(format!("HTTPRoute {rkey} spec.hostnames[{i}]: {e}"));
            }
        }
        let compiled = compile_rules(route, objs, resolver);
        let valid_rules: Vec<&CompiledRule> = compiled.iter().filter(|c| c.error.is_none()).collect();
        let rule_errors: Vec<String> = compiled.iter().filter_map(|c| c.error.clone()).collect();
        let ref_problem = compiled.iter().find_map(|c| c.ref_problem.clone());

        for p in our_parents {
            let gw_key = format!("{}/{}", p.namespace.as_deref().unwrap_or(&rns), p.name);
            let mut conds = Vec::new();
            let idxs = gw_listeners.get(&gw_key).cloned().unwrap_or_default();
            let by_section: Vec<usize> = idxs
                .into_iter()
                .filter(|&i| p.section_name.as_ref().is_none_or(|s| *s == listeners[i].name))
                .filter(|&i| p.port.is_none_or(|port| port == listeners[i].port))
                .collect();
            let allowed: Vec<usize> = by_section
                .iter()
                .copied()
                .filter(|&i| {
                    let l = &listeners[i];
                    let ns_ok = match l.allowed_from.as_str() {
                        "All" => true,
                        "Same" => l.gw_ns == rns,
                        // A namespace without a Namespace object has no labels (besides the
                        // well-known kubernetes.io/metadata.name, which is always set).
                        "Selector" => l.allow_selector.as_ref().is_some_and(|s| {
                            let mut labels = ns_labels.get(rns.as_str()).cloned().unwrap_or_default();
                            labels.insert("kubernetes.io/metadata.name".into(), rns.clone());
                            s.matches(&labels).unwrap_or(false)
                        }),
                        _ => false,
                    };
                    ns_ok && l.http_route_allowed
                })
                .collect();
            let attach: Vec<(usize, Vec<Option<String>>)> = allowed
                .iter()
                .filter_map(|&i| intersect_hostnames(listeners[i].hostname.as_deref(), &route.spec.hostnames).map(|h| (i, h)))
                .collect();
            let accepted: Result<(), (&str, String)> = if let Some(e) = &hostname_err {
                Err(("UnsupportedValue", e.clone()))
            } else if by_section.is_empty() {
                Err(("NoMatchingParent", format!("Gateway {gw_key} has no listener matching sectionName/port of this parentRef")))
            } else if allowed.is_empty() {
                Err(("NotAllowedByListeners", format!("no listener of Gateway {gw_key} allows HTTPRoutes from namespace {rns}")))
            } else if attach.is_empty() {
                Err(("NoMatchingListenerHostname", format!("no hostname of HTTPRoute {rkey} intersects a listener hostname of Gateway {gw_key}")))
            } else if valid_rules.is_empty() && !rule_errors.is_empty() {
                Err(("UnsupportedValue", rule_errors.join("; ")))
            } else {
                Ok(())
            };
            match &accepted {
                Ok(()) => conds.push(Condition::new("Accepted", true, "Accepted", format!("attached to Gateway {gw_key}"), gen)),
                Err((r, m)) => conds.push(Condition::new("Accepted", false, r, m.clone(), gen)),
            }
            match &ref_problem {
                None => conds.push(Condition::new("ResolvedRefs", true, "ResolvedRefs", "all references resolved", gen)),
                Some((r, m)) => conds.push(Condition::new("ResolvedRefs", false, r, m.clone(), gen)),
            }
            if accepted.is_ok() && !rule_errors.is_empty() {
                conds.push(Condition::new(
                    "PartiallyInvalid",
                    true,
                    "UnsupportedValue",
                    format!("invalid rules dropped: {}", rule_errors.join("; ")),
                    gen,
                ));
            }
            if accepted.is_ok() {
                for (i, hostnames) in attach {
                    let l = &mut listeners[i];
                    l.attached += 1;
                    if !l.programmed {
                        continue;
                    }
                    for cr in &valid_rules {
                        for m in &cr.matches {
                            for h in &hostnames {
                                l.vhosts.insert(h, m.clone());
                            }
                        }
                    }
                }
            }
            // The parentRef as the API server stores it: `group` and `kind` have CRD defaults,
            // so status consumers (and the conformance suite) see them set.
            let parent_ref = ParentReference {
                group: Some(p.group.clone().unwrap_or_else(|| GATEWAY_GROUP.into())),
                kind: Some(p.kind.clone().unwrap_or_else(|| "Gateway".into())),
                ..p.clone()
            };
            parents_status.push(RouteParentStatus {
                parent_ref,
                controller_name: CONTROLLER_NAME.into(),
                conditions: conds,
            });
        }
        status.http_routes.insert(rkey, RouteStatus { parents: parents_status });
    }

    // --- gateway status + table
    let mut table = RoutingTable::default();
    for gw in &gateways {
        let key = gw.metadata.key();
        let gen = gw.metadata.generation;
        let idxs = gw_listeners.get(&key).cloned().unwrap_or_default();
        let mut ls = Vec::new();
        let mut n_ok = 0;
        for &i in &idxs {
            let l = &listeners[i];
            if l.programmed {
                n_ok += 1;
            }
            ls.push(ListenerStatus {
                name: l.name.clone(),
                supported_kinds: listener_conds[i].1.clone(),
                attached_routes: l.attached,
                conditions: listener_conds[i].0.clone(),
            });
        }
        let all_ok = n_ok == idxs.len();
        let mut conds = vec![Condition::new(
            "Accepted",
            n_ok > 0 || idxs.is_empty(),
            if all_ok { "Accepted" } else { "ListenersNotValid" },
            if all_ok { "Gateway accepted".to_string() } else { format!("{} of {} listeners are not valid", idxs.len() - n_ok, idxs.len()) },
            gen,
        )];
        conds.push(if n_ok > 0 {
            Condition::new("Programmed", true, "Programmed", "serving", gen)
        } else {
            Condition::new("Programmed", false, "Invalid", "no valid listener", gen)
        });
        status.gateways.insert(key, GatewayStatus { conditions: conds, listeners: ls });
    }
    let mut sni: BTreeMap<u16, SniResolver> = BTreeMap::new();
    for l in listeners.into_iter().filter(|l| l.programmed) {
        let mut vhosts = l.vhosts;
        vhosts.finish();
        if let Some(c) = &l.cert {
            sni.entry(l.port).or_default().add(l.hostname.as_deref(), c.clone());
        }
        let pt = table.ports.entry(l.port).or_insert_with(|| PortTable {
            port: l.port,
            protocol: l.protocol,
            tls: None,
            listeners: Vec::new(),
        });
        pt.listeners.push(ListenerTable {
            id: format!("{}/{}", l.gw_key, l.name),
            hostname: l.hostname,
            port: l.port,
            protocol: l.protocol,
            vhosts,
        });
    }
    for pt in table.ports.values_mut() {
        // most specific listener hostname first: exact, longer wildcard, none
        pt.listeners.sort_by_key(|l| match &l.hostname {
            None => (2, 0),
            Some(h) if h.starts_with('*') => (1, -(h.len() as i64)),
            Some(_) => (0, 0),
        });
        if let Some(r) = sni.remove(&pt.port) {
            // The resolver holds only valid keys, so building the config cannot fail on input.
            pt.tls = server_config(r).ok();
        }
    }
    BuildOutput { table, status }
}

/// Resolves every backend (to no endpoints): for validating objects on their own.
struct AnyBackend;
impl BackendResolver for AnyBackend {
    fn resolve(&self, _: &str, _: &str, _: u16) -> Result<crate::resolver::ResolvedBackend, ResolveError> {
        Ok(crate::resolver::ResolvedBackend { endpoints: vec![], protocol: AppProtocol::Http1 })
    }
}

/// Check an HTTPRoute on its own (what does not depend on other objects): hostnames, matches
/// (path types, regular expressions, methods, headers, query params), filters (types and their
/// fields), weights, timeouts. Err is `field: reason` with the field relative to the object
/// (`spec.rules[0].matches[0].path.value: invalid regular expression …`). Used by `fjordctl
/// apply`; the same checks make a rule invalid (a status condition) when the table is built.
pub fn validate_route(route: &HttpRoute) -> Result<(), String> {
    for (i, h) in route.spec.hostnames.iter().enumerate() {
        validate_hostname(h).map_err(|e| format!("spec.hostnames[{i}]: {e}"))?;
    }
    let prefix = format!("HTTPRoute {} ", route.metadata.key());
    for c in compile_rules(route, &ObjectSet::default(), &AnyBackend) {
        if let Some(e) = c.error {
            return Err(e.strip_prefix(&prefix).unwrap_or(&e).to_string());
        }
    }
    Ok(())
}

/// Check a Gateway on its own: every listener must be acceptable (protocol HTTP/HTTPS, valid
/// hostname, unique name, port 1-65535, allowedRoutes, TLS mode). Conflicts between listeners,
/// certificate references and port binding are reported as status conditions instead. Err is
/// `field: reason` relative to the object.
pub fn validate_gateway(gw: &Gateway) -> Result<(), String> {
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        if l.port == 0 {
            return Err(format!("spec.listeners[{i}].port: 0 is not a valid port (1-65535)"));
        }
    }
    let objs = ObjectSet {
        gateway_classes: vec![GatewayClass {
            metadata: ObjectMeta { name: gw.spec.gateway_class_name.clone(), ..Default::default() },
            spec: GatewayClassSpec { controller_name: CONTROLLER_NAME.into(), description: None, parameters_ref: None },
        }],
        gateways: vec![gw.clone()],
        ..Default::default()
    };
    let out = build(&objs, &AnyBackend);
    let prefix = format!("Gateway {} ", gw.metadata.key());
    for (i, l) in out.status.gateways.get(&gw.metadata.key()).map(|s| s.listeners.as_slice()).unwrap_or_default().iter().enumerate() {
        if let Some(c) = find_condition(&l.conditions, "Accepted").filter(|c| !c.is_true()) {
            let m = c.message.strip_prefix(&prefix).unwrap_or(&c.message);
            // "spec.listeners[0] (web).hostname: …" → "spec.listeners[0].hostname: …"
            let m = m.replacen(&format!("spec.listeners[{i}] ({})", l.name), &format!("spec.listeners[{i}]"), 1);
            return Err(m);
        }
    }
    Ok(())
}

struct CompiledRule {
    matches: Vec<Arc<RouteEntry>>,
    /// Why this rule is invalid (it is dropped).
    error: Option<String>,
    /// First unresolved reference (ResolvedRefs=False reason, message); the rule still serves.
    ref_problem: Option<(&'static str, String)>,
}

fn header_ops(f: &HttpHeaderFilter, field: &str) -> Result<HeaderOps, String> {
    let mut ops = HeaderOps::default();
    let hv = |n: &str, v: &str, i: usize, list: &str| -> Result<(HeaderName, HeaderValue), String> {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("{field}.{list}[{i}].name: `{n}` is not a valid header name"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("{field}.{list}[{i}].value: not a valid header value"))?;
        Ok((name, value))
    };
    for (i, h) in f.set.iter().enumerate() {
        ops.set.push(hv(&h.name, &h.value, i, "set")?);
    }
    for (i, h) in f.add.iter().enumerate() {
        ops.add.push(hv(&h.name, &h.value, i, "add")?);
    }
    for (i, n) in f.remove.iter().enumerate() {
        ops.remove.push(
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{field}.remove[{i}]: `{n}` is not a valid header name"))?,
        );
    }
    Ok(ops)
}

fn compile_regex(v: &str, field: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{v})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("{field}: invalid regular expression `{v}`: {}", e.to_string().lines().last().unwrap_or("")))
}

fn path_modifier(p: &HttpPathModifier, field: &str) -> Result<PathModifier, String> {
    match p.type_.as_str() {
        "ReplaceFullPath" => match &p.replace_full_path {
            Some(v) if v.starts_with('/') => Ok(PathModifier::Full(v.clone())),
            _ => Err(format!("{field}.replaceFullPath: required with type ReplaceFullPath and must start with /")),
        },
        "ReplacePrefixMatch" => match &p.replace_prefix_match {
            Some(v) if v.is_empty() || v.starts_with('/') => Ok(PathModifier::Prefix(v.clone())),
            _ => Err(format!("{field}.replacePrefixMatch: required with type ReplacePrefixMatch and must start with /")),
        },
        o => Err(format!("{field}.type: `{o}` is not supported; use ReplaceFullPath or ReplacePrefixMatch")),
    }
}

/// Resolve a backend reference (Service) of a route. Err = (reason, message).
#[allow(clippy::too_many_arguments)]
fn resolve_ref(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<u16>,
    route: &HttpRoute,
    objs: &ObjectSet,
    resolver: &dyn BackendResolver,
    field: &str,
) -> Result<(String, crate::resolver::ResolvedBackend), (&'static str, String)> {
    let rns = route.metadata.ns();
    let g = group.unwrap_or("");
    let k = kind.unwrap_or("Service");
    if !(g.is_empty() || g == "core") || k != "Service" {
        return Err(("InvalidKind", format!("{field}: {g}/{k} is not supported; only core Services")));
    }
    let ns = namespace.unwrap_or(rns);
    if ns != rns && !ref_granted(&objs.reference_grants, GATEWAY_GROUP, "HTTPRoute", rns, "", "Service", ns, name) {
        return Err((
            "RefNotPermitted",
            format!("{field}: Service {ns}/{name} is in another namespace and no ReferenceGrant in {ns} allows HTTPRoutes from {rns}"),
        ));
    }
    let Some(port) = port else {
        return Err(("BackendNotFound", format!("{field}.port: required for a Service backend")));
    };
    let display = format!("{ns}/{name}:{port}");
    match resolver.resolve(ns, name, port) {
        Ok(b) => Ok((display, b)),
        Err(e @ ResolveError::Unsupported { .. }) => Err(("UnsupportedProtocol", format!("{field}: {e}"))),
        Err(e) => Err(("BackendNotFound", format!("{field}: {e}"))),
    }
}

fn compile_rules(route: &HttpRoute, objs: &ObjectSet, resolver: &dyn BackendResolver) -> Vec<CompiledRule> {
    let rkey = route.metadata.key();
    let created = route.metadata.creation_timestamp.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let base = format!("HTTPRoute {rkey} spec.rules[{ri}]");
        let mut ref_problem: Option<(&'static str, String)> = None;
        let res: Result<Vec<Arc<RouteEntry>>, String> = (|| {
            // filters
            let mut request_headers = None;
            let mut response_headers = None;
            let mut redirect = None;
            let mut rewrite = None;
            let mut mirrors = Vec::new();
            for (fi, f) in rule.filters.iter().enumerate() {
                let field = format!("{base}.filters[{fi}]");
                let once = |present: bool| {
                    if present {
                        Err(format!("{field}.type: {} may appear only once per rule", f.type_))
                    } else {
                        Ok(())
                    }
                };
                match f.type_.as_str() {
                    "RequestHeaderModifier" => {
                        once(request_headers.is_some())?;
                        let h = f.request_header_modifier.as_ref().ok_or(format!("{field}.requestHeaderModifier: required for this type"))?;
                        request_headers = Some(header_ops(h, &format!("{field}.requestHeaderModifier"))?);
                    }
                    "ResponseHeaderModifier" => {
                        once(response_headers.is_some())?;
                        let h = f.response_header_modifier.as_ref().ok_or(format!("{field}.responseHeaderModifier: required for this type"))?;
                        response_headers = Some(header_ops(h, &format!("{field}.responseHeaderModifier"))?);
                    }
                    "RequestRedirect" => {
                        once(redirect.is_some())?;
                        let r = f.request_redirect.as_ref().ok_or(format!("{field}.requestRedirect: required for this type"))?;
                        let ff = format!("{field}.requestRedirect");
                        if let Some(s) = &r.scheme {
                            if s != "http" && s != "https" {
                                return Err(format!("{ff}.scheme: `{s}` must be http or https"));
                            }
                        }
                        if let Some(h) = &r.hostname {
                            validate_hostname(h).map_err(|e| format!("{ff}.hostname: {e}"))?;
                            if h.starts_with('*') {
                                return Err(format!("{ff}.hostname: wildcards are not allowed"));
                            }
                        }
                        let code = r.status_code.unwrap_or(302);
                        if ![301, 302, 303, 307, 308].contains(&code) {
                            return Err(format!("{ff}.statusCode: {code} must be 301, 302, 303, 307 or 308"));
                        }
                        let path = r.path.as_ref().map(|p| path_modifier(p, &format!("{ff}.path"))).transpose()?;
                        redirect = Some(Redirect {
                            scheme: r.scheme.clone(),
                            hostname: r.hostname.clone(),
                            path,
                            port: r.port,
                            status: StatusCode::from_u16(code).expect("valid code"),
                        });
                    }
                    "URLRewrite" => {
                        once(rewrite.is_some())?;
                        let r = f.url_rewrite.as_ref().ok_or(format!("{field}.urlRewrite: required for this type"))?;
                        let ff = format!("{field}.urlRewrite");
                        let hostname = match &r.hostname {
                            Some(h) => {
                                validate_hostname(h).map_err(|e| format!("{ff}.hostname: {e}"))?;
                                Some(HeaderValue::from_str(h).map_err(|_| format!("{ff}.hostname: invalid"))?)
                            }
                            None => None,
                        };
                        let path = r.path.as_ref().map(|p| path_modifier(p, &format!("{ff}.path"))).transpose()?;
                        rewrite = Some(Rewrite { hostname, path });
                    }
                    "RequestMirror" => {
                        let m = f.request_mirror.as_ref().ok_or(format!("{field}.requestMirror: required for this type"))?;
                        let b = &m.backend_ref;
                        let fraction = match (&m.percent, &m.fraction) {
                            (Some(p), _) if *p <= 100 => *p as f64 / 100.0,
                            (Some(p), _) => return Err(format!("{field}.requestMirror.percent: {p} must be 0..100")),
                            (None, Some(fr)) => {
                                let d = fr.denominator.unwrap_or(100);
                                if d == 0 || fr.numerator > d {
                                    return Err(format!("{field}.requestMirror.fraction: numerator must be <= denominator > 0"));
                                }
                                fr.numerator as f64 / d as f64
                            }
                            (None, None) => 1.0,
                        };
                        match resolve_ref(
                            b.group.as_deref(),
                            b.kind.as_deref(),
                            &b.name,
                            b.namespace.as_deref(),
                            b.port,
                            route,
                            objs,
                            resolver,
                            &format!("{field}.requestMirror.backendRef"),
                        ) {
                            Ok((name, rb)) => mirrors.push(Mirror {
                                backend: Arc::new(Backend::new(name, rb.endpoints, rb.protocol, None, None)),
                                fraction,
                            }),
                            Err(p) => {
                                ref_problem.get_or_insert(p);
                            }
                        }
                    }
                    other => {
                        return Err(format!(
                            "{field}.type: unsupported filter type `{other}`; supported: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror"
                        ))
                    }
                }
            }
            if redirect.is_some() && rewrite.is_some() {
                return Err(format!("{base}.filters: RequestRedirect and URLRewrite cannot be used in the same rule"));
            }
            let uses_prefix_rewrite = matches!(redirect.as_ref().and_then(|r| r.path.as_ref()), Some(PathModifier::Prefix(_)))
                || matches!(rewrite.as_ref().and_then(|r| r.path.as_ref()), Some(PathModifier::Prefix(_)));
            // timeouts
            let (mut request_timeout, mut backend_timeout) = (None, None);
            if let Some(t) = &rule.timeouts {
                if let Some(s) = &t.request {
                    let d = parse_duration(s).map_err(|e| format!("{base}.timeouts.request: {e}"))?;
                    request_timeout = (!d.is_zero()).then_some(d);
                }
                if let Some(s) = &t.backend_request {
                    let d = parse_duration(s).map_err(|e| format!("{base}.timeouts.backendRequest: {e}"))?;
                    backend_timeout = (!d.is_zero()).then_some(d);
                }
                if let (Some(r), Some(b)) = (request_timeout, backend_timeout) {
                    if b > r {
                        return Err(format!("{base}.timeouts.backendRequest must not exceed timeouts.request"));
                    }
                }
            }
            // backends
            let mut choices = Vec::new();
            for (bi, b) in rule.backend_refs.iter().enumerate() {
                let field = format!("{base}.backendRefs[{bi}]");
                let weight = b.weight.unwrap_or(1);
                if weight > 1_000_000 {
                    return Err(format!("{field}.weight: {weight} exceeds 1000000"));
                }
                let (mut rq, mut rs) = (None, None);
                for (fi, f) in b.filters.iter().enumerate() {
                    let ff = format!("{field}.filters[{fi}]");
                    match f.type_.as_str() {
                        "RequestHeaderModifier" => {
                            let h = f.request_header_modifier.as_ref().ok_or(format!("{ff}.requestHeaderModifier: required"))?;
                            rq = Some(header_ops(h, &format!("{ff}.requestHeaderModifier"))?);
                        }
                        "ResponseHeaderModifier" => {
                            let h = f.response_header_modifier.as_ref().ok_or(format!("{ff}.responseHeaderModifier: required"))?;
                            rs = Some(header_ops(h, &format!("{ff}.responseHeaderModifier"))?);
                        }
                        other => {
                            return Err(format!(
                                "{ff}.type: filter type `{other}` is not supported on a backendRef; supported: RequestHeaderModifier, ResponseHeaderModifier"
                            ))
                        }
                    }
                }
                let choice = match resolve_ref(
                    b.group.as_deref(),
                    b.kind.as_deref(),
                    &b.name,
                    b.namespace.as_deref(),
                    b.port,
                    route,
                    objs,
                    resolver,
                    &field,
                ) {
                    Ok((name, rb)) if rb.endpoints.is_empty() => {
                        BackendChoice::Fail { name: name.into(), status: StatusCode::SERVICE_UNAVAILABLE }
                    }
                    Ok((name, rb)) => BackendChoice::Ready(Arc::new(Backend::new(name, rb.endpoints, rb.protocol, rq, rs))),
                    Err(p) => {
                        let name = format!("{}/{}:{}", b.namespace.as_deref().unwrap_or(route.metadata.ns()), b.name, b.port.unwrap_or(0));
                        ref_problem.get_or_insert(p);
                        BackendChoice::Fail { name: name.into(), status: StatusCode::INTERNAL_SERVER_ERROR }
                    }
                };
                choices.push((weight, Arc::new(choice)));
            }
            let rule_c = Arc::new(Rule {
                route: rkey.clone(),
                index: ri,
                label: format!("{rkey}/{ri}"),
                metrics: Default::default(),
                request_headers,
                response_headers,
                redirect,
                rewrite,
                mirrors,
                backends: BackendSet::new(choices),
                request_timeout,
                backend_timeout,
            });
            // matches
            let default_match = [HttpRouteMatch::default()];
            let matches: &[HttpRouteMatch] = if rule.matches.is_empty() { &default_match } else { &rule.matches };
            let mut entries = Vec::new();
            for (mi, m) in matches.iter().enumerate() {
                let field = format!("{base}.matches[{mi}]");
                let pm = m.path.clone().unwrap_or_default();
                let value = pm.value.clone().unwrap_or_else(|| "/".into());
                let (path, path_kind, len) = match pm.type_.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        return Err(format!("{field}.path.value: `{value}` must start with /"))
                    }
                    "Exact" => (PathMatcher::Exact(value.clone()), 0, value.len()),
                    "PathPrefix" => {
                        let n = normalize_prefix(&value);
                        let l = n.len();
                        (PathMatcher::Prefix(n), 2, l)
                    }
                    "RegularExpression" => {
                        (PathMatcher::Regex(compile_regex(&value, &format!("{field}.path.value"))?), 1, value.len())
                    }
                    o => {
                        return Err(format!(
                            "{field}.path.type: `{o}` is not supported; use Exact, PathPrefix or RegularExpression"
                        ))
                    }
                };
                if uses_prefix_rewrite && !matches!(path, PathMatcher::Prefix(_)) {
                    return Err(format!("{field}.path: ReplacePrefixMatch needs a PathPrefix match"));
                }
                let method = match &m.method {
                    None => None,
                    Some(s) => {
                        const OK: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
                        if !OK.contains(&s.as_str()) {
                            return Err(format!("{field}.method: `{s}` is not an HTTP method the spec allows"));
                        }
                        Some(Method::from_bytes(s.as_bytes()).expect("known method"))
                    }
                };
                let mut headers: Vec<(HeaderName, ValueMatcher)> = Vec::new();
                for (hi, h) in m.headers.iter().enumerate() {
                    let hf = format!("{field}.headers[{hi}]");
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| format!("{hf}.name: `{}` is not a valid header name", h.name))?;
                    if headers.iter().any(|(n, _)| *n == name) {
                        continue; // only the first entry for a name counts
                    }
                    let vm = match h.type_.as_deref().unwrap_or("Exact") {
                        "Exact" => ValueMatcher::Exact(h.value.clone()),
                        "RegularExpression" => ValueMatcher::Regex(compile_regex(&h.value, &format!("{hf}.value"))?),
                        o => return Err(format!("{hf}.type: `{o}` is not supported; use Exact or RegularExpression")),
                    };
                    headers.push((name, vm));
                }
                let mut query: Vec<(String, ValueMatcher)> = Vec::new();
                for (qi, q) in m.query_params.iter().enumerate() {
                    let qf = format!("{field}.queryParams[{qi}]");
                    if q.name.is_empty() {
                        return Err(format!("{qf}.name: must not be empty"));
                    }
                    if query.iter().any(|(n, _)| *n == q.name) {
                        continue;
                    }
                    let vm = match q.type_.as_deref().unwrap_or("Exact") {
                        "Exact" => ValueMatcher::Exact(q.value.clone()),
                        "RegularExpression" => ValueMatcher::Regex(compile_regex(&q.value, &format!("{qf}.value"))?),
                        o => return Err(format!("{qf}.type: `{o}` is not supported; use Exact or RegularExpression")),
                    };
                    query.push((q.name.clone(), vm));
                }
                entries.push(Arc::new(RouteEntry {
                    key: EntryKey {
                        path_kind,
                        neg_path_len: -(len as i64),
                        no_method: method.is_none(),
                        neg_headers: -(headers.len() as i64),
                        neg_query: -(query.len() as i64),
                        created: created.clone(),
                        route: rkey.clone(),
                        rule: ri,
                        match_index: mi,
                    },
                    path,
                    method,
                    headers,
                    query,
                    rule: rule_c.clone(),
                }));
            }
            Ok(entries)
        })();
        match res {
            Ok(matches) => out.push(CompiledRule { matches, error: None, ref_problem }),
            Err(e) => out.push(CompiledRule { matches: vec![], error: Some(e), ref_problem: None }),
        }
    }
    out
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
