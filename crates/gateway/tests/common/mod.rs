//! Shared helpers for the gateway integration tests: echo backends, free loopback ports, an
//! HTTP client, and YAML scaffolding. Everything runs on 127.0.0.1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fjord_gateway::echo::{spawn_echo, EchoOptions, EchoReply};
use fjord_gateway::{build, Gateway, GatewayOptions, ObjectSet, StaticResolver, StatusReport};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A loopback port for a server the test starts (see `fjord_store::testing`).
pub fn free_port() -> u16 {
    fjord_store::testing::free_loopback_port()
}

pub async fn echo(pod: &str, ns: &str) -> SocketAddr {
    let (a, _h) = spawn_echo("127.0.0.1:0".parse().unwrap(), EchoOptions { pod: pod.into(), namespace: ns.into() }).await.unwrap();
    a
}

pub fn class_and_gateway(name: &str, ns: &str, port: u16) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: fjord}}
spec: {{controllerName: fjord.dev/gateway}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  gatewayClassName: fjord
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
    allowedRoutes: {{namespaces: {{from: All}}}}
"#
    )
}

pub fn static_service(name: &str, ns: &str, port: u16, eps: &[SocketAddr]) -> String {
    let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports:\n  - port: {port}\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

pub fn static_service_h2c(name: &str, ns: &str, port: u16, eps: &[SocketAddr]) -> String {
    static_service(name, ns, port, eps).replace("endpoints:", "appProtocol: kubernetes.io/h2c\n    endpoints:")
}

/// Build from YAML documents (joined with ---).
pub fn build_docs(docs: &[String]) -> (fjord_gateway::RoutingTable, StatusReport) {
    let objs = ObjectSet::from_yaml("test", &docs.join("---\n")).expect("test YAML parses");
    let out = build(&objs, &StaticResolver::new(&objs.static_services));
    (out.table, out.status)
}

pub async fn gateway(docs: &[String]) -> (Gateway, StatusReport) {
    let gw = Gateway::new(GatewayOptions { listen_ip: "127.0.0.1".parse().unwrap(), access_log: false, ..Default::default() });
    let objs = ObjectSet::from_yaml("test", &docs.join("---\n")).expect("test YAML parses");
    let s = gw.reconcile(&objs, &StaticResolver::new(&objs.static_services)).await.expect("apply");
    (gw, s)
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http()
}

pub fn h2c_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|n| match n {}).boxed()
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Resp {
    pub fn echo(&self) -> EchoReply {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not echo JSON ({e}): status {} {:?}", self.status, String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, n: &str) -> Option<&str> {
        self.headers.get(n).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(c: &Client<HttpConnector, Body>, method: &str, url: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(empty()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), c.request(req)).await.expect("request did not finish").expect("request failed");
    let status = r.status().as_u16();
    let version = r.version();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    Resp { status, headers, body, version }
}

pub async fn get(c: &Client<HttpConnector, Body>, url: &str) -> Resp {
    send(c, "GET", url, &[]).await
}

