//! fjord-gateway: the Gateway API (gateway.networking.k8s.io/v1) L7 data plane of fjord.
//!
//! * [`config`]: multi-document YAML → [`config::ObjectSet`] (all-or-nothing).
//! * [`table::build`]: objects + [`resolver::BackendResolver`] → immutable
//!   [`table::RoutingTable`] + [`table::StatusReport`] (pure).
//! * [`proxy::Gateway`]: the running proxy; [`proxy::Gateway::apply`] swaps a new table in
//!   atomically (in-flight requests keep the table they started with).
//! * [`echo::serve_echo`]: a test/demo backend answering with JSON about the request.
//!
//! Wiring into the agent (store mode): on every change of GatewayClass/Gateway/HTTPRoute/
//! ReferenceGrant/Secret/Namespace or Service/EndpointSlice objects, fill an
//! [`config::ObjectSet`] from the store snapshot, implement [`BackendResolver`] over the
//! snapshot's Services + ready EndpointSlice addresses, then
//!
//! ```no_run
//! # async fn f(gw: fjord_gateway::Gateway, objs: fjord_gateway::ObjectSet, r: fjord_gateway::StaticResolver) {
//! let status = gw.reconcile(&objs, &r).await.expect("listener ports could be bound");
//! for (key, st) in &status.http_routes { /* write st to HTTPRoute `key`'s status */ }
//! # }
//! ```
//!
//! A [`Gateway`] is created once (`Gateway::new(GatewayOptions{..})`) inside the agent's tokio
//! runtime; `reconcile`/`apply` may be called any number of times; `shutdown(grace)` on exit.

/// The seed blog post's HTTPRoute, verbatim (90 % of /api/v2 to backend-v1, 10 % to
/// backend-v2), as a string literal: `concat!` it into larger test manifests.
#[macro_export]
macro_rules! seed_httproute {
    () => {
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: production-traffic-split
  namespace: backend
spec:
  parentRefs:
  - name: external-gateway
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /api/v2
    backendRefs:
    - name: backend-v1
      port: 8080
      weight: 90
    - name: backend-v2
      port: 8080
      weight: 10
"#
    };
}

/// The seed blog post's HTTPRoute, verbatim (see [`seed_httproute!`]).
pub const SEED_HTTPROUTE: &str = seed_httproute!();


pub mod api;
pub mod config;
pub mod controller;
pub mod echo;
pub mod leader;
pub mod manifest;
pub mod matching;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod resolver;
pub mod table;
pub mod testing;
pub mod tls;

pub use config::ObjectSet;
pub use proxy::{Gateway, GatewayOptions};
pub use resolver::{AppProtocol, BackendResolver, ResolveError, ResolvedBackend, StaticResolver};
pub use table::{build, BuildOutput, LbPolicy, RoutingTable, StatusReport};
