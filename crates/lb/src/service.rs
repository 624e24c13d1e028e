//! Service description → datapath map entries.
//!
//! The agent maps a Kubernetes Service + its EndpointSlices onto [`Service`];
//! [`translate`] validates it and produces one [`FrontendEntries`] per
//! frontend: the service key (VIP, port, protocol), the chosen backend set and
//! the Maglev table (slot → index into that backend set). The datapath turns
//! those into map entries (ids, byte order) and switches them in atomically.
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use thiserror::Error;

use crate::maglev::{self, MaglevError};

/// L4 protocol of a frontend. Only TCP and UDP are supported by the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number (as in the IPv4 header).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl FromStr for Protocol {
    type Err = TranslateError;
    /// Parses Kubernetes protocol names ("TCP", "UDP"; case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            _ => Err(TranslateError::UnsupportedProtocol { protocol: s.to_string() }),
        }
    }
}

/// One endpoint of a frontend (EndpointSlice endpoint + the port's targetPort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// EndpointConditions.ready: receives new connections.
    pub ready: bool,
    /// EndpointConditions.serving: still answers (also while terminating).
    pub serving: bool,
    /// EndpointConditions.terminating.
    pub terminating: bool,
    /// Relative weight; `None` means 1, `Some(0)` means "no new connections".
    pub weight: Option<u32>,
}

impl Backend {
    /// A ready, serving, non-terminating backend of weight 1.
    pub fn ready(ip: Ipv4Addr, port: u16) -> Self {
        Backend { ip, port, ready: true, serving: true, terminating: false, weight: None }
    }
}

/// How the datapath treats new flows to a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrontendOptions {
    /// NodePort / externalIP / LoadBalancer address: also served to clients on
    /// the node's underlay (remote backends then get the node as source).
    pub external: bool,
    /// sessionAffinity ClientIP: seconds a client keeps its backend (None: off).
    pub affinity_timeout: Option<u32>,
}

/// One (VIP, port, protocol) the service is reachable at, with its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
    pub options: FrontendOptions,
}

impl Frontend {
    /// A ClusterIP-style frontend with default options.
    pub fn new(vip: Ipv4Addr, port: u16, protocol: Protocol, backends: Vec<Backend>) -> Self {
        Frontend { vip, port, protocol, backends, options: FrontendOptions::default() }
    }
}

/// A service as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// "namespace/name", used in errors and logs.
    pub name: String,
    pub frontends: Vec<Frontend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbConfig {
    /// Maglev table size M (prime). Must be the same on every node.
    pub maglev_size: u32,
    /// Maglev seed. Must be the same on every node.
    pub seed: u64,
    /// Upper bound on backends per frontend (datapath capacity guard).
    pub max_backends_per_frontend: usize,
    /// Build the M-slot table also for frontends the compact table serves alone (at most
    /// [`maglev::COMPACT_MAX_BACKENDS`] backends, no sessionAffinity). Off by default: their
    /// new flows never read it, and building it is ~96 % of the Maglev work (98 µs against
    /// 3.8 µs per frontend at M = 16381) and 64 KiB of kernel memory each.
    pub full_tables: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig { maglev_size: maglev::DEFAULT_TABLE_SIZE, seed: maglev::DEFAULT_SEED, max_backends_per_frontend: 1024, full_tables: false }
    }
}

/// The key of a frontend in the datapath's service map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.protocol)
    }
}

/// A backend address as programmed into the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl BackendAddr {
    /// The stable Maglev key of this backend: "ip:port".
    pub fn maglev_key(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendEntries {
    /// "namespace/name" of the owning service.
    pub service: String,
    pub key: ServiceKey,
    /// The active backends (sorted by address, no duplicates).
    pub backends: Vec<BackendAddr>,
    /// Maglev table of M slots: slot → index into `backends`. Empty if `backends` is empty,
    /// and when `compact` serves the frontend alone (no sessionAffinity, unless
    /// `LbConfig::full_tables`).
    pub maglev: Vec<u32>,
    pub options: FrontendOptions,
    /// Terminating but still serving backends not in the table: they get no new flows but
    /// keep their established ones (the datapath keeps their entries).
    pub draining: Vec<BackendAddr>,
    /// The compact Maglev table (same keys, weights and seed, [`maglev::COMPACT_TABLE_SIZE`]
    /// slots) → index into `backends`, when there are 1..=[`maglev::COMPACT_MAX_BACKENDS`]
    /// backends; else empty. The service entry holds it with the backends, so choosing a
    /// backend for a new flow touches no map but the services map.
    pub compact: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TranslateError {
    #[error("protocol {protocol:?} is not supported by fjord's datapath: use TCP or UDP")]
    UnsupportedProtocol { protocol: String },
    #[error("service name is empty: set it to \"namespace/name\"")]
    EmptyName,
    #[error("service {service}: frontends[{index}] ({vip}): port is 0: set a port between 1 and 65535")]
    ZeroFrontendPort { service: String, index: usize, vip: Ipv4Addr },
    #[error("service {service}: frontends[{index}].vip {vip} is not a usable unicast address")]
    BadVip { service: String, index: usize, vip: Ipv4Addr },
    #[error("service {service}: frontends[{index}] duplicates frontend {key}: list every VIP/port/protocol once")]
    DuplicateFrontend { service: String, index: usize, key: ServiceKey },
    #[error("service {service}: frontends[{frontend}].backends[{index}] ({ip}): port is 0: set the target port")]
    ZeroBackendPort { service: String, frontend: usize, index: usize, ip: Ipv4Addr },
    #[error("service {service}: frontends[{frontend}].backends[{index}].ip {ip} is not a usable unicast address")]
    BadBackendIp { service: String, frontend: usize, index: usize, ip: Ipv4Addr },
    #[error(
        "service {service}: frontend {key} has {count} active backends, more than the limit of {max}: \
         raise max_backends_per_frontend (and the datapath's backend map) or split the service"
    )]
    TooManyBackends { service: String, key: ServiceKey, count: usize, max: usize },
    #[error("service {service}: frontend {key}: {source}")]
    Maglev { service: String, key: ServiceKey, source: MaglevError },
}

fn unusable(ip: Ipv4Addr) -> bool {
    ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()
}

/// Validates `svc` and computes the datapath entries of each of its frontends.
///
/// Backend selection follows kube-proxy: ready backends get traffic; if a
/// frontend has none, serving+terminating backends are used (graceful
/// termination); otherwise the frontend has no backends (the datapath rejects
/// new connections to it). Duplicate endpoints (the same ip:port in two
/// EndpointSlices) are merged, the "most alive" copy winning.
pub fn translate(svc: &Service, cfg: &LbConfig) -> Result<Vec<FrontendEntries>, TranslateError> {
    if svc.name.trim().is_empty() {
        return Err(TranslateError::EmptyName);
    }
    maglev::validate_size(cfg.maglev_size).map_err(|source| TranslateError::Maglev {
        service: svc.name.clone(),
        key: ServiceKey { vip: Ipv4Addr::UNSPECIFIED, port: 0, protocol: Protocol::Tcp },
        source,
    })?;
    let mut seen = HashSet::new();
    let mut out: Vec<FrontendEntries> = Vec::with_capacity(svc.frontends.len());
    // (backend set, big table built?, index in `out` of the frontend whose tables were built from it)
    let mut built: Vec<(Vec<(String, u32)>, bool, usize)> = Vec::new();
    for (fi, fe) in svc.frontends.iter().enumerate() {
        let service = svc.name.clone();
        if fe.port == 0 {
            return Err(TranslateError::ZeroFrontendPort { service, index: fi, vip: fe.vip });
        }
        if unusable(fe.vip) {
            return Err(TranslateError::BadVip { service, index: fi, vip: fe.vip });
        }
        let key = ServiceKey { vip: fe.vip, port: fe.port, protocol: fe.protocol };
        if !seen.insert(key) {
            return Err(TranslateError::DuplicateFrontend { service, index: fi, key });
        }
        // merge duplicates: rank 2 = ready, 1 = serving+terminating, 0 = neither
        let mut merged: BTreeMap<(Ipv4Addr, u16), (u8, u32)> = BTreeMap::new();
        for (bi, b) in fe.backends.iter().enumerate() {
            if b.port == 0 {
                return Err(TranslateError::ZeroBackendPort { service, frontend: fi, index: bi, ip: b.ip });
            }
            if unusable(b.ip) {
                return Err(TranslateError::BadBackendIp { service, frontend: fi, index: bi, ip: b.ip });
            }
            let rank = if b.ready && !b.terminating {
                2
            } else if b.serving && b.terminating {
                1
            } else {
                0
            };
            let weight = b.weight.unwrap_or(1);
            let e = merged.entry((b.ip, b.port)).or_insert((rank, weight));
            if rank > e.0 {
                *e = (rank, weight);
            }
        }
        let best = if merged.values().any(|(r, w)| *r == 2 && *w > 0) { 2 } else { 1 };
        let chosen: Vec<(BackendAddr, u32)> = merged
            .iter()
            .filter(|(_, (r, w))| *r == best && *w > 0)
            .map(|(&(ip, port), &(_, w))| (BackendAddr { ip, port, protocol: fe.protocol }, w))
            .collect();
        if chosen.len() > cfg.max_backends_per_frontend {
            return Err(TranslateError::TooManyBackends {
                service,
                key,
                count: chosen.len(),
                max: cfg.max_backends_per_frontend,
            });
        }
        let draining: Vec<BackendAddr> = if best == 2 {
            merged.iter().filter(|(_, (r, _))| *r == 1).map(|(&(ip, port), _)| BackendAddr { ip, port, protocol: fe.protocol }).collect()
        } else {
            vec![]
        };
        let weighted: Vec<(String, u32)> = chosen.iter().map(|(a, w)| (a.maglev_key(), *w)).collect();
        // frontends of one service usually share their backends (ClusterIP and NodePort
        // on every node address, TCP and UDP of one port): build each distinct table once
        let small = (1..=maglev::COMPACT_MAX_BACKENDS).contains(&weighted.len());
        // the big table: for more backends, and for sessionAffinity (its misses use it)
        let big = !small || fe.options.affinity_timeout.is_some() || cfg.full_tables;
        let (table, compact) = match built.iter().find(|(w, b, _)| *w == weighted && *b == big) {
            Some((_, _, i)) => (out[*i].maglev.clone(), out[*i].compact.clone()),
            None => {
                built.push((weighted, big, out.len()));
                let w = &built.last().expect("pushed").0;
                let merr = |source| TranslateError::Maglev { service: service.clone(), key, source };
                let compact: Vec<u8> = if small {
                    maglev::build_table(w, maglev::COMPACT_TABLE_SIZE, cfg.seed).map_err(merr)?.into_iter().map(|i| i as u8).collect()
                } else {
                    Vec::new()
                };
                let table = if big {
                    maglev::build_table(w, cfg.maglev_size, cfg.seed).map_err(merr)?
                } else {
                    Vec::new()
                };
                (table, compact)
            }
        };
        out.push(FrontendEntries {
            service,
            key,
            backends: chosen.into_iter().map(|(a, _)| a).collect(),
            maglev: table,
            options: fe.options,
            draining,
            compact,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cfg() -> LbConfig {
        LbConfig { maglev_size: 251, full_tables: true, ..LbConfig::default() }
    }

    fn dns() -> Service {
        let backends = vec![Backend::ready(ip("10.244.1.6"), 53), Backend::ready(ip("10.244.1.5"), 53)];
        Service {
            name: "kube-system/kube-dns".into(),
            frontends: vec![
                Frontend::new(ip("10.96.0.10"), 53, Protocol::Udp, backends.clone()),
                Frontend::new(ip("10.96.0.10"), 53, Protocol::Tcp, backends),
            ],
        }
    }

    #[test]
    fn translates_each_frontend() {
        let out = translate(&dns(), &cfg()).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key, ServiceKey { vip: ip("10.96.0.10"), port: 53, protocol: Protocol::Udp });
        assert_eq!(out[0].service, "kube-system/kube-dns");
        // sorted by address
        assert_eq!(out[0].backends[0], BackendAddr { ip: ip("10.244.1.5"), port: 53, protocol: Protocol::Udp });
        assert_eq!(out[1].backends[1].protocol, Protocol::Tcp);
        for fe in &out {
            assert_eq!(fe.maglev.len(), 251);
            assert!(fe.maglev.iter().all(|&i| (i as usize) < fe.backends.len()));
            // both backends are used
            assert!(fe.maglev.contains(&0) && fe.maglev.contains(&1));
        }
        // same backend set (ip:port) on both frontends: one table, as built on its own
        assert_eq!(out[0].maglev, out[1].maglev);
        let keys: Vec<(String, u32)> = vec![("10.244.1.5:53".into(), 1), ("10.244.1.6:53".into(), 1)];
        assert_eq!(out[1].maglev, maglev::build_table(&keys, 251, LbConfig::default().seed).unwrap());
    }

    #[test]
    fn backend_order_does_not_change_the_result() {
        let mut s2 = dns();
        s2.frontends[0].backends.reverse();
        assert_eq!(translate(&dns(), &cfg()).unwrap(), translate(&s2, &cfg()).unwrap());
    }

    #[test]
    fn ready_backends_preferred_then_terminating() {
        let mut s = dns();
        s.frontends.truncate(1);
        let fe = &mut s.frontends[0];
        fe.backends.push(Backend { ip: ip("10.244.2.9"), port: 53, ready: false, serving: true, terminating: true, weight: None });
        fe.backends.push(Backend { ip: ip("10.244.2.10"), port: 53, ready: false, serving: false, terminating: false, weight: None });
        let out = translate(&s, &cfg()).unwrap();
        assert_eq!(out[0].backends.len(), 2, "only the ready ones");
        assert!(out[0].backends.iter().all(|b| b.ip.octets()[2] == 1));
        // the terminating one keeps serving its established flows; the dead one is gone
        assert_eq!(out[0].draining, vec![BackendAddr { ip: ip("10.244.2.9"), port: 53, protocol: Protocol::Udp }]);

        // no ready ones: fall back to serving+terminating
        for b in &mut s.frontends[0].backends {
            if b.ip.octets()[2] == 1 {
                b.ready = false;
                b.serving = false;
            }
        }
        let out = translate(&s, &cfg()).unwrap();
        assert_eq!(out[0].backends, vec![BackendAddr { ip: ip("10.244.2.9"), port: 53, protocol: Protocol::Udp }]);
        assert!(out[0].maglev.iter().all(|&i| i == 0));
        assert!(out[0].draining.is_empty(), "it is in the table itself");
    }

    #[test]
    fn no_backends_gives_empty_entries() {
        let mut s = dns();
        s.frontends[0].backends.clear();
        s.frontends[1].backends.iter_mut().for_each(|b| b.ready = false);
        s.frontends[1].backends.iter_mut().for_each(|b| b.serving = false);
        let out = translate(&s, &cfg()).unwrap();
        for fe in out {
            assert!(fe.backends.is_empty());
            assert!(fe.maglev.is_empty());
        }
    }

    #[test]
    fn duplicate_endpoints_are_merged() {
        let mut s = dns();
        s.frontends.truncate(1);
        let mut dup = Backend::ready(ip("10.244.1.5"), 53);
        dup.ready = false;
        s.frontends[0].backends.push(dup);
        let out = translate(&s, &cfg()).unwrap();
        assert_eq!(out[0].backends.len(), 2);
    }

    #[test]
    fn weights_shape_the_table() {
        let mut s = dns();
        s.frontends.truncate(1);
        s.frontends[0].backends[0].weight = Some(3); // 10.244.1.6 → index 1 after sorting
        let out = translate(&s, &LbConfig { full_tables: true, ..LbConfig::default() }).unwrap();
        let share = out[0].maglev.iter().filter(|&&i| i == 1).count() as f64 / out[0].maglev.len() as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
        // the compact table follows the weights too
        let share = out[0].compact.iter().filter(|&&i| i == 1).count() as f64 / out[0].compact.len() as f64;
        assert!((share - 0.75).abs() < 0.01, "compact: {share}");
        // weight 0: no new connections
        s.frontends[0].backends[0].weight = Some(0);
        let out = translate(&s, &cfg()).unwrap();
        assert_eq!(out[0].backends.len(), 1);
        assert_eq!(out[0].backends[0].ip, ip("10.244.1.5"));
    }

    /// A frontend with 1..=8 backends also gets the compact table (509 slots) its service
    /// entry holds: Maglev's balance (every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots) and
    /// disruption (removing one of N backends moves its own slots and few others); 9
    /// backends or none get none.
    #[test]
    fn small_frontends_get_a_compact_maglev_table() {
        let web = |n: usize| Service {
            name: "default/web".into(),
            frontends: vec![Frontend::new(
                ip("10.96.0.20"),
                80,
                Protocol::Tcp,
                (0..n).map(|i| Backend::ready(Ipv4Addr::new(10, 244, 1, 10 + i as u8), 8080)).collect(),
            )],
        };
        for n in [0, 9, 20] {
            assert!(translate(&web(n), &cfg()).unwrap()[0].compact.is_empty(), "{n} backends");
        }
        // the big table only where something reads it: more backends, or sessionAffinity
        let d = LbConfig::default();
        assert!(translate(&web(3), &d).unwrap()[0].maglev.is_empty(), "3 backends: the compact table alone");
        assert_eq!(translate(&web(9), &d).unwrap()[0].maglev.len(), d.maglev_size as usize);
        let mut sticky = web(3);
        sticky.frontends[0].options.affinity_timeout = Some(10800);
        let fe = translate(&sticky, &d).unwrap().remove(0);
        assert_eq!((fe.maglev.len(), fe.compact.len()), (d.maglev_size as usize, maglev::COMPACT_TABLE_SIZE as usize));
        for n in 1..=8usize {
            let fe = translate(&web(n), &LbConfig::default()).unwrap().remove(0);
            assert_eq!(fe.compact.len(), maglev::COMPACT_TABLE_SIZE as usize);
            let mut owned = vec![0usize; n];
            for &i in &fe.compact {
                owned[i as usize] += 1;
            }
            let (lo, hi) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n} backends: slots per backend {owned:?}");
            if n >= 2 {
                // remove the middle backend: only a few slots of the others move
                let mut fewer = web(n);
                let gone = fewer.frontends[0].backends.remove(n / 2);
                let after = translate(&fewer, &LbConfig::default()).unwrap().remove(0);
                let name = |fe: &FrontendEntries, i: u8| fe.backends[i as usize].ip;
                let kept: Vec<usize> = (0..fe.compact.len()).filter(|&s| name(&fe, fe.compact[s]) != gone.ip).collect();
                let moved = kept.iter().filter(|&&s| name(&fe, fe.compact[s]) != name(&after, after.compact[s])).count();
                let share = moved as f64 / fe.compact.len() as f64;
                assert!(share <= 0.04, "{n} → {} backends: {moved} other slots moved ({share:.3})", n - 1);
            }
        }
    }

    #[test]
    fn protocol_parsing() {
        assert_eq!("tcp".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert_eq!("UDP".parse::<Protocol>().unwrap(), Protocol::Udp);
        let e = "SCTP".parse::<Protocol>().unwrap_err();
        assert_eq!(e, TranslateError::UnsupportedProtocol { protocol: "SCTP".into() });
        assert!(e.to_string().contains("SCTP") && e.to_string().contains("TCP or UDP"));
        assert_eq!(Protocol::from_number(6), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_number(132), None);
        assert_eq!(Protocol::Udp.number(), 17);
    }

    #[test]
    fn bad_input_names_the_field() {
        let mut s = dns();
        s.frontends[1].port = 0;
        let e = translate(&s, &cfg()).unwrap_err();
        assert!(matches!(e, TranslateError::ZeroFrontendPort { index: 1, .. }));
        assert!(e.to_string().contains("frontends[1]"), "{e}");

        let mut s = dns();
        s.frontends[0].backends[1].port = 0;
        let e = translate(&s, &cfg()).unwrap_err().to_string();
        assert!(e.contains("frontends[0].backends[1]") && e.contains("kube-system/kube-dns"), "{e}");

        let mut s = dns();
        s.frontends[0].backends[0].ip = ip("0.0.0.0");
        assert!(matches!(translate(&s, &cfg()), Err(TranslateError::BadBackendIp { frontend: 0, index: 0, .. })));

        let mut s = dns();
        s.frontends[0].vip = ip("224.0.0.1");
        assert!(matches!(translate(&s, &cfg()), Err(TranslateError::BadVip { index: 0, .. })));

        let mut s = dns();
        s.frontends[1].protocol = Protocol::Udp;
        let e = translate(&s, &cfg()).unwrap_err();
        assert!(matches!(e, TranslateError::DuplicateFrontend { index: 1, .. }), "{e}");

        let mut s = dns();
        s.name = " ".into();
        assert_eq!(translate(&s, &cfg()), Err(TranslateError::EmptyName));

        let e = translate(&dns(), &LbConfig { maglev_size: 1000, ..cfg() }).unwrap_err().to_string();
        assert!(e.contains("1000") && e.contains("prime"), "{e}");
    }

    #[test]
    fn too_many_backends_is_an_error() {
        let mut s = dns();
        s.frontends.truncate(1);
        s.frontends[0].backends = (0..20).map(|i| Backend::ready(Ipv4Addr::new(10, 244, 3, i + 2), 53)).collect();
        let e = translate(&s, &LbConfig { max_backends_per_frontend: 10, ..cfg() }).unwrap_err();
        assert!(matches!(e, TranslateError::TooManyBackends { count: 20, max: 10, .. }));
        // and more backends than slots is a Maglev error
        let e = translate(&s, &LbConfig { maglev_size: 17, ..cfg() }).unwrap_err();
        assert!(matches!(e, TranslateError::Maglev { source: MaglevError::TooManyBackends { .. }, .. }), "{e}");
    }
}
