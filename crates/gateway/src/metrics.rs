//! Prometheus metrics (per route and backend) and a tiny `/metrics` HTTP endpoint.

use std::convert::Infallible;
use std::sync::{Mutex, OnceLock, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name/rule` or `-` when no route matched.
    pub route: String,
    /// `namespace/name:port` or `-`.
    pub backend: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// All gateway metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub table_swaps: Counter,
    pub config_errors: Counter,
    pub active_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fjord_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let table_swaps = Counter::default();
        let config_errors = Counter::default();
        let active_connections = Gauge::default();
        registry.register("requests", "HTTP requests by route, backend and status code", requests.clone());
        registry.register("request_duration_seconds", "Request duration by route", duration.clone());
        registry.register("table_swaps", "Routing tables swapped in", table_swaps.clone());
        registry.register("config_errors", "Configurations refused (parse errors)", config_errors.clone());
        registry.register("active_connections", "Open client connections", active_connections.clone());
        Metrics { registry: Mutex::new(registry), requests, duration, table_swaps, config_errors, active_connections }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut s, &reg).expect("writing to a String cannot fail");
        s
    }
}

/// Serve `GET /metrics` (anything else: 404) on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let m = m.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                            .body(Full::new(Bytes::from(m.encode())))
                    } else {
                        Response::builder().status(404).body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    };
                    Ok::<_, Infallible>(resp.expect("static response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// Per-rule cache of metric handles, filled on first use.
#[derive(Debug, Default)]
pub struct RuleMetrics {
    duration: OnceLock<Histogram>,
    counters: RwLock<Vec<(u16, std::sync::Arc<str>, Counter)>>,
}

impl Metrics {
    /// Count one finished request. `rule` is `None` when no route matched.
    pub fn observe(&self, rule: Option<&crate::table::Rule>, backend: Option<&std::sync::Arc<str>>, code: u16, secs: f64) {
        let Some(rule) = rule else {
            self.requests.get_or_create(&RequestLabels { route: "-".into(), backend: "-".into(), code }).inc();
            self.duration.get_or_create(&RouteLabels { route: "-".into() }).observe(secs);
            return;
        };
        let cache = &rule.metrics;
        cache
            .duration
            .get_or_init(|| self.duration.get_or_create(&RouteLabels { route: rule.label.clone() }).clone())
            .observe(secs);
        let b: &str = backend.map(|b| &**b).unwrap_or("-");
        {
            let list = cache.counters.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, c)) = list.iter().find(|(k, n, _)| *k == code && &**n == b) {
                c.inc();
                return;
            }
        }
        let c = self
            .requests
            .get_or_create(&RequestLabels { route: rule.label.clone(), backend: b.to_string(), code })
            .clone();
        c.inc();
        cache.counters.write().unwrap_or_else(|e| e.into_inner()).push((code, b.into(), c));
    }
}
