//! Backend resolution: Service namespace/name/port → ready endpoint addresses.
//!
//! The routing table builder asks a [`BackendResolver`]; in standalone mode that is a
//! [`StaticResolver`] built from `StaticService` objects, in the cluster the agent implements the
//! trait over its store snapshot (Services + EndpointSlices) and rebuilds the table when they change.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::api::StaticService;

/// How the proxy talks to a backend port (from the Service port's `appProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1 with keep-alive pools.
    Http1,
    /// HTTP/2 cleartext with prior knowledge (`appProtocol: kubernetes.io/h2c`).
    H2c,
}

impl AppProtocol {
    /// Map a Service port `appProtocol` value. Unknown values fall back to HTTP/1.1.
    pub fn from_app_protocol(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("http") | Some("HTTP") | Some("kubernetes.io/http") => Ok(AppProtocol::Http1),
            Some("kubernetes.io/h2c") | Some("h2c") => Ok(AppProtocol::H2c),
            Some(o) => Err(format!("unsupported appProtocol `{o}`; use `http` or `kubernetes.io/h2c`")),
        }
    }
}

/// A resolved Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBackend {
    /// Ready endpoints (may be empty: the Service exists but nothing is ready → 503).
    pub endpoints: Vec<SocketAddr>,
    pub protocol: AppProtocol,
}

/// Why a backend could not be resolved. These map to `ResolvedRefs=False/BackendNotFound`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("Service {namespace}/{name} does not exist")]
    ServiceNotFound { namespace: String, name: String },
    #[error("Service {namespace}/{name} has no port {port} (ports: {available:?})")]
    PortNotFound { namespace: String, name: String, port: u16, available: Vec<u16> },
    #[error("Service {namespace}/{name} port {port}: {message}")]
    Unsupported { namespace: String, name: String, port: u16, message: String },
}

/// Service → endpoints lookup used while building a routing table. Must be cheap and pure
/// (a lookup in a snapshot); the table is rebuilt when the answers change.
pub trait BackendResolver: Send + Sync {
    fn resolve(&self, namespace: &str, name: &str, port: u16) -> Result<ResolvedBackend, ResolveError>;
}

type PortTable = Vec<(u16, Result<ResolvedBackend, String>)>;

/// Resolver over `StaticService` objects.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    services: BTreeMap<(String, String), PortTable>,
}

impl StaticResolver {
    pub fn new(services: &[StaticService]) -> Self {
        let mut map = BTreeMap::new();
        for s in services {
            let ports = s
                .spec
                .ports
                .iter()
                .map(|p| {
                    let r = (|| {
                        let protocol = AppProtocol::from_app_protocol(p.app_protocol.as_deref())?;
                        let mut endpoints = Vec::new();
                        for (i, e) in p.endpoints.iter().enumerate() {
                            let a: SocketAddr = e.parse().map_err(|_| {
                                format!("spec.ports[port={}].endpoints[{i}] `{e}` is not ip:port", p.port)
                            })?;
                            endpoints.push(a);
                        }
                        Ok(ResolvedBackend { endpoints, protocol })
                    })();
                    (p.port, r)
                })
                .collect();
            map.insert((s.metadata.ns().to_string(), s.metadata.name.clone()), ports);
        }
        StaticResolver { services: map }
    }
}

impl BackendResolver for StaticResolver {
    fn resolve(&self, namespace: &str, name: &str, port: u16) -> Result<ResolvedBackend, ResolveError> {
        let Some(ports) = self.services.get(&(namespace.to_string(), name.to_string())) else {
            return Err(ResolveError::ServiceNotFound { namespace: namespace.into(), name: name.into() });
        };
        match ports.iter().find(|(p, _)| *p == port) {
            Some((_, Ok(b))) => Ok(b.clone()),
            Some((_, Err(m))) => {
                Err(ResolveError::Unsupported { namespace: namespace.into(), name: name.into(), port, message: m.clone() })
            }
            None => Err(ResolveError::PortNotFound {
                namespace: namespace.into(),
                name: name.into(),
                port,
                available: ports.iter().map(|(p, _)| *p).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ObjectSet;

    #[test]
    fn static_resolver_distinguishes_missing_service_and_port() {
        let s = ObjectSet::from_yaml(
            "t",
            "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {name: web, namespace: app}\nspec:\n  ports:\n  - port: 8080\n    endpoints: [\"127.0.0.1:9000\", \"127.0.0.2:9000\"]\n  - port: 9090\n    appProtocol: kubernetes.io/h2c\n    endpoints: []\n  - port: 7070\n    endpoints: [\"nonsense\"]\n",
        )
        .unwrap();
        let r = StaticResolver::new(&s.static_services);
        let b = r.resolve("app", "web", 8080).unwrap();
        assert_eq!(b.endpoints.len(), 2);
        assert_eq!(b.protocol, AppProtocol::Http1);
        assert_eq!(r.resolve("app", "web", 9090).unwrap().protocol, AppProtocol::H2c);
        assert!(matches!(r.resolve("app", "nope", 8080), Err(ResolveError::ServiceNotFound { .. })));
        assert!(matches!(r.resolve("other", "web", 8080), Err(ResolveError::ServiceNotFound { .. })));
        match r.resolve("app", "web", 1) {
            Err(ResolveError::PortNotFound { available, .. }) => assert_eq!(available, vec![8080, 9090, 7070]),
            o => panic!("{o:?}"),
        }
        let e = r.resolve("app", "web", 7070).unwrap_err().to_string();
        assert!(e.contains("endpoints[0]") && e.contains("nonsense"), "{e}");
    }
}
