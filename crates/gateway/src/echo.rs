//! An echo backend for tests and demos. It answers every request with JSON describing what it
//! received (method, path, host, headers, protocol, body size) and who it is (pod name and
//! namespace), so a test can see which backend answered and what reached it.
//!
//! Control headers (for tests):
//! * `x-echo-status: 418` answer with that status;
//! * `x-echo-delay-ms: 200` wait before answering;
//! * `x-echo-stream: 1` answer at once and stream the request body back chunk by chunk
//!   (proves that bodies are streamed end to end).
//!
//! A request with `Upgrade` (e.g. WebSocket) gets `101 Switching Protocols` and every byte
//! sent afterwards is echoed back raw.
//! Serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Who the echo server says it is.
#[derive(Debug, Clone, Default)]
pub struct EchoOptions {
    pub pod: String,
    pub namespace: String,
}

/// The JSON body an echo server answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EchoReply {
    pub pod: String,
    pub namespace: String,
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Raw query string ("" when none).
    pub query: String,
    pub host: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// Header name (lowercase) → values.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_bytes: u64,
}

impl EchoReply {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).and_then(|v| v.first()).map(|s| s.as_str())
    }
}

type EchoBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> EchoBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn handle(opts: EchoOptions, mut req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(|s| s.to_string());
    if let Some(ms) = h("x-echo-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let proto = req.headers()[hyper::header::UPGRADE].clone();
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(hyper::header::UPGRADE, proto)
            .header(hyper::header::CONNECTION, "upgrade")
            .header("x-echo-pod", &opts.pod)
            .body(full(Bytes::new()))
            .expect("valid response");
        return Ok(resp);
    }
    if h("x-echo-stream").as_deref() == Some("1") {
        let mut body = req.into_body();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
        tokio::spawn(async move {
            while let Some(f) = body.frame().await {
                let stop = f.is_err();
                if tx.send(f).await.is_err() || stop {
                    break;
                }
            }
        });
        let mut rx = rx;
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let resp = Response::builder()
            .header("x-echo-pod", &opts.pod)
            .body(StreamBody::new(stream).boxed())
            .expect("valid response");
        return Ok(resp);
    }
    let status = h("x-echo-status").and_then(|v| v.parse::<u16>().ok()).and_then(|c| StatusCode::from_u16(c).ok());
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers.entry(k.as_str().to_string()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let protocol = format!("{:?}", req.version());
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(Ok(f)) = body.frame().await {
        if let Some(d) = f.data_ref() {
            n += d.len() as u64;
        }
    }
    let reply = EchoReply {
        pod: opts.pod.clone(),
        namespace: opts.namespace.clone(),
        method,
        path,
        query,
        host,
        protocol,
        headers,
        body_bytes: n,
    };
    let json = serde_json::to_vec(&reply).expect("serializable");
    let resp = Response::builder()
        .status(status.unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .header("x-echo-pod", &opts.pod)
        .body(full(json))
        .expect("valid response");
    Ok(resp)
}

/// Serve the echo backend on `listener` until `shutdown` completes.
pub async fn serve_echo(listener: TcpListener, opts: EchoOptions, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(e) => { tracing::warn!(error = %e, "echo accept failed"); continue } },
            _ = &mut shutdown => return,
        };
        let _ = tcp.set_nodelay(true);
        let opts = opts.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(opts.clone(), req));
            let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = b.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
        });
    }
}

/// Bind `addr` (port 0 for any) and serve in a background task; returns the bound address.
pub async fn spawn_echo(addr: SocketAddr, opts: EchoOptions) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    let h = tokio::spawn(serve_echo(l, opts, std::future::pending()));
    Ok((a, h))
}
