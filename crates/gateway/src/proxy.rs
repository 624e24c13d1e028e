//! The running proxy: listeners, TLS termination, request routing, filters, forwarding.
//!
//! The routing table lives in an [`ArcSwap`]: every request loads the current table once and
//! keeps it until it finishes, so [`Gateway::apply`] never disturbs in-flight requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::matching::{normalize_host_cow, parse_query, replace_prefix};
use crate::metrics::Metrics;
use crate::resolver::AppProtocol;
use crate::table::*;

#[path = "fast.rs"]
mod fast;

/// Body type used for everything the proxy sends.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Runtime options.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Address the listeners bind (ports come from the Gateway listeners).
    pub listen_ip: IpAddr,
    /// Log one line per request at target `fjord_gateway::access`.
    pub access_log: bool,
    /// Connect timeout to backends.
    pub connect_timeout: Duration,
    /// Endpoint choice within a Service.
    pub lb_policy: LbPolicy,
    /// Worker runtimes, nginx style: every listener port gets one `SO_REUSEPORT` socket per
    /// worker, accepted and served on that worker only (the kernel spreads connections; no
    /// work stealing, no cross-thread wake-ups). Empty: everything on the calling runtime.
    pub workers: Vec<tokio::runtime::Handle>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            listen_ip: IpAddr::from([0, 0, 0, 0]),
            access_log: true,
            connect_timeout: Duration::from_secs(5),
            lb_policy: LbPolicy::RoundRobin,
            workers: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot listen on {addr} (Gateway listener port {port}): {source}; free the port or change the listener")]
    Bind { addr: SocketAddr, port: u16, source: std::io::Error },
}

struct PortHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

struct Inner {
    table: ArcSwap<RoutingTable>,
    opts: GatewayOptions,
    h1: Client<HttpConnector, ProxyBody>,
    h2: Client<HttpConnector, ProxyBody>,
    pool: crate::pool::H1Pool,
    /// Backend connections of the HTTP/1.1 fast path.
    raw_pool: fast::RawPool,
    ports: Mutex<HashMap<u16, PortHandle>>,
    /// Serialises `apply` calls.
    apply_lock: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
    pub metrics: Arc<Metrics>,
}

/// The gateway data plane. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Most messages have none of these: one pass over their few headers instead of a lookup
    // per hop-by-hop name.
    if !h.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    // Headers named in Connection are hop-by-hop too. Usually it names only `close` or
    // `keep-alive` and no header of that name exists: nothing to collect, no allocation.
    let mut named: Vec<HeaderName> = Vec::new();
    for v in h.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()) {
        for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if h.contains_key(t) {
                named.extend(HeaderName::from_bytes(t.as_bytes()).ok());
            }
        }
    }
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP.iter() {
        h.remove(n);
    }
}

fn local(status: StatusCode, msg: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

struct ConnGuard(Arc<Inner>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.metrics.active_connections.dec();
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// An IP address as text, formatted on the stack. As the owner of a `Bytes` it costs one
/// allocation, and clones of that `Bytes` (X-Forwarded-For of every request) none; a `Vec`'s
/// or `String`'s bytes would be copied once more and promoted on the first clone.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 48];
        let mut w = &mut buf[..];
        // at most 45 bytes (IPv4-mapped IPv6)
        let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
        let len = 48 - w.len();
        IpText { buf, len }
    }
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[derive(Clone)]
struct ConnCtx {
    port: u16,
    peer: SocketAddr,
    tls: bool,
    /// The TLS server name (SNI) the client asked for, if any.
    sni: Option<Box<str>>,
    /// The peer IP as a header value (for X-Forwarded-For), computed once per connection.
    peer_ip: HeaderValue,
}

impl ConnCtx {
    fn new(port: u16, peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_maybe_shared(Bytes::from_owner(IpText::new(peer.ip()))).expect("an IP is a valid header value");
        ConnCtx { port, peer, tls, sni: None, peer_ip }
    }
}

impl Gateway {
    /// A gateway with an empty table and no listeners. Must be created inside a tokio runtime.
    pub fn new(opts: GatewayOptions) -> Self {
        Self::with_metrics(opts, Arc::new(Metrics::new()))
    }

    pub fn with_metrics(opts: GatewayOptions, metrics: Arc<Metrics>) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(opts.connect_timeout));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(4096)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build(conn);
        let (shutdown, _) = watch::channel(false);
        Gateway {
            inner: Arc::new(Inner {
                table: ArcSwap::from_pointee(RoutingTable::default()),
                pool: crate::pool::H1Pool::new(1024, opts.connect_timeout, opts.workers.len() > 1),
                raw_pool: fast::RawPool::new(1024, opts.workers.len() > 1),
                opts,
                h1,
                h2,
                ports: Mutex::new(HashMap::new()),
                apply_lock: tokio::sync::Mutex::new(()),
                shutdown,
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The current table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.inner.table.load_full()
    }

    /// Address a Gateway listener port is bound to.
    pub fn local_addr(&self, port: u16) -> Option<SocketAddr> {
        self.inner.ports.lock().unwrap_or_else(|e| e.into_inner()).get(&port).map(|p| p.addr)
    }

    /// Swap in a new table: bind ports that are new (all or nothing: if one cannot be bound,
    /// nothing changes), swap the table atomically, then stop accepting on ports that are gone
    /// (their open connections finish normally). Requests started before the swap finish with
    /// the old table; requests started after it see the new one.
    pub async fn apply(&self, table: RoutingTable) -> Result<(), ApplyError> {
        let _g = self.inner.apply_lock.lock().await;
        let wanted: Vec<u16> = table.ports.keys().copied().collect();
        let existing: Vec<u16> = self.inner.ports.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        let mut new_listeners = Vec::new();
        let per_worker = self.inner.opts.workers.len() > 1;
        for &port in wanted.iter().filter(|p| !existing.contains(p)) {
            let addr = SocketAddr::new(self.inner.opts.listen_ip, port);
            let n = if per_worker { self.inner.opts.workers.len() } else { 1 };
            let mut ls = Vec::with_capacity(n);
            for _ in 0..n {
                ls.push(bind(addr, per_worker).map_err(|source| ApplyError::Bind { addr, port, source })?);
            }
            new_listeners.push((port, ls));
        }
        self.inner.table.store(Arc::new(table));
        self.inner.metrics.table_swaps.inc();
        let mut ports = self.inner.ports.lock().unwrap_or_else(|e| e.into_inner());
        for (port, ls) in new_listeners {
            let addr = ls[0].local_addr().unwrap_or(SocketAddr::new(self.inner.opts.listen_ip, port));
            let (stop, stop_rx) = watch::channel(false);
            let n = ls.len();
            for (i, l) in ls.into_iter().enumerate() {
                if n > 1 {
                    // Move the socket to its worker's reactor; the accept loop and every
                    // connection it accepts run on that worker.
                    let (inner, stop_rx) = (self.inner.clone(), stop_rx.clone());
                    let std = match l.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(port, error = %e, "listener socket could not be handed to a worker");
                            continue;
                        }
                    };
                    self.inner.opts.workers[i].spawn(async move {
                        match TcpListener::from_std(std) {
                            Ok(l) => accept_loop(inner, l, port, stop_rx).await,
                            Err(e) => tracing::warn!(port, error = %e, "worker could not register its listener"),
                        }
                    });
                } else {
                    tokio::spawn(accept_loop(self.inner.clone(), l, port, stop_rx.clone()));
                }
            }
            tracing::info!(port, %addr, sockets = n, "listening");
            ports.insert(port, PortHandle { addr, stop });
        }
        ports.retain(|port, h| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(port, "listener removed");
                let _ = h.stop.send(true);
            }
            keep
        });
        Ok(())
    }

    /// Build a table from `objs` (pure, see [`crate::table::build`]) and swap it in. Returns the
    /// status conditions for the caller to write back (GatewayClass, Gateway, HTTPRoute).
    /// On a bind error nothing changes and the old table keeps serving.
    pub async fn reconcile(
        &self,
        objs: &crate::config::ObjectSet,
        resolver: &dyn crate::resolver::BackendResolver,
    ) -> Result<StatusReport, ApplyError> {
        let out = crate::table::build(objs, resolver);
        self.apply(out.table).await?;
        Ok(out.status)
    }

    /// Graceful shutdown: stop accepting, ask open connections to finish their current requests
    /// (HTTP/1 keep-alive ends, HTTP/2 GOAWAY), wait up to `grace` for them.
    pub async fn shutdown(&self, grace: Duration) {
        {
            let ports = self.inner.ports.lock().unwrap_or_else(|e| e.into_inner());
            for h in ports.values() {
                let _ = h.stop.send(true);
            }
        }
        let _ = self.inner.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.active.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(open = self.inner.active.load(Ordering::Acquire), "shutdown grace period over; closing");
                break;
            }
        }
        self.inner.ports.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    if reuseport {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    defer_accept(&sock);
    sock.listen(1024)
}

/// TCP_DEFER_ACCEPT: the kernel completes the handshake but wakes `accept` only once the
/// client's first bytes arrived (every protocol served here has the client speak first: an
/// HTTP/1.1 request line, the HTTP/2 preface, a TLS ClientHello), so a new connection costs
/// one wake-up (accept + read) instead of two. Best effort: without it only that saving is lost.
fn defer_accept(sock: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let secs: libc::c_int = 30;
    // SAFETY: setsockopt on a socket we own, with a valid pointer and length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            &secs as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_DEFER_ACCEPT not set");
    }
}

async fn accept_loop(inner: Arc<Inner>, l: TcpListener, port: u16, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => { tracing::warn!(port, error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(10)).await; continue }
            },
            _ = stop.changed() => return,
        };
        inner.active.fetch_add(1, Ordering::AcqRel);
        inner.metrics.active_connections.inc();
        let guard = ConnGuard(inner.clone());
        let inner2 = inner.clone();
        tokio::spawn(async move {
            let _guard = guard;
            serve_conn(inner2, tcp, peer, port).await;
        });
    }
}

/// Serve one accepted connection. Its future is part of every connection's task (allocated and
/// moved once per connection), so the TLS and hyper paths, which need far more state than the
/// plain HTTP/1.1 fast path, are boxed: they only cost when taken.
async fn serve_conn(inner: Arc<Inner>, mut tcp: TcpStream, peer: SocketAddr, port: u16) {
    let (tls, is_https) = {
        let t = inner.table.load();
        let p = t.ports.get(&port);
        (p.and_then(|p| p.tls.clone()), p.map(|p| p.protocol) == Some(ListenerProtocol::Https))
    };
    if is_https {
        let Some(cfg) = tls else { return };
        let _ = tcp.set_nodelay(true);
        Box::pin(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            match acceptor.accept(tcp).await {
                Ok(s) => {
                    // ALPN decides the protocol; no preface sniffing needed.
                    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                    let mut ctx = ConnCtx::new(port, peer, true);
                    ctx.sni = s.get_ref().1.server_name().map(|n| n.to_ascii_lowercase().into_boxed_str());
                    serve_http(inner, Prefixed { pre: Bytes::new(), io: TokioIo::new(s) }, ctx, h2).await
                }
                Err(e) => tracing::debug!(%peer, port, error = %e, "TLS handshake failed"),
            }
        })
        .await
    } else {
        // Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c) when the connection starts
        // with the HTTP/2 preface. One ordinary read decides (hyper-util's auto builder reads
        // exactly the preface's 24 bytes first: an extra system call per connection); the
        // bytes read are handed to the HTTP server in front of the socket.
        let mut buf = fast::ConnBuf::new();
        let mut shutdown = inner.shutdown.subscribe();
        loop {
            let r = tokio::select! {
                r = tokio::io::AsyncReadExt::read_buf(&mut tcp, &mut *buf) => r,
                _ = shutdown.changed() => return,
            };
            match r {
                Ok(0) | Err(_) => return,
                Ok(_) if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) => continue,
                Ok(_) => break,
            }
        }
        let h2 = buf.starts_with(H2_PREFACE);
        let ctx = ConnCtx::new(port, peer, false);
        if !h2 {
            // TCP_NODELAY: set by the fast path once it writes twice, by hyper's path below
            match fast::serve(&inner, &mut fast::Client::new(&mut tcp), &mut buf, &ctx).await {
                fast::Next::Done => return,
                fast::Next::Hyper => {}
            }
        }
        let _ = tcp.set_nodelay(true);
        Box::pin(serve_http(inner, Prefixed { pre: buf.take().freeze(), io: TokioIo::new(tcp) }, ctx, h2)).await
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O stream with bytes already read from it in front.
struct Prefixed<T> {
    pre: Bytes,
    io: T,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Prefixed<T> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

async fn serve_http<I>(inner: Arc<Inner>, io: I, ctx: ConnCtx, h2: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut shutdown = inner.shutdown.subscribe();
    if *shutdown.borrow() {
        return;
    }
    let svc_inner = inner.clone();
    let peer = ctx.peer;
    let ctx = Arc::new(ctx);
    let svc = hyper::service::service_fn(move |req| {
        let inner = svc_inner.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(inner, req, &ctx).await) }
    });
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with error"); } }
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    } else {
        // Small responses: one write of head + body copied together instead of writev of two
        // buffers (less per-call work in the kernel).
        let conn = hyper::server::conn::http1::Builder::new().writev(false).serve_connection(io, svc).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(%peer, error = %e, "connection ended with error"); } }
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

/// Per-request outcome for logging/metrics.
#[derive(Default)]
struct Outcome {
    rule: Option<Arc<Rule>>,
    backend: Option<Arc<str>>,
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>, ctx: &ConnCtx) -> Response<ProxyBody> {
    let start = Instant::now();
    let log = if inner.opts.access_log { Some((req.method().clone(), req.uri().path().to_string())) } else { None };
    let mut out = Outcome::default();
    let table = inner.table.load_full();
    let resp = route_request(&inner, &table, req, ctx, &mut out).await;
    let code = resp.status().as_u16();
    let el = start.elapsed();
    inner.metrics.observe(out.rule.as_deref(), out.backend.as_ref(), code, el.as_secs_f64());
    if let Some((method, path)) = log {
        tracing::info!(
            target: "fjord_gateway::access",
            peer = %ctx.peer,
            %method,
            path,
            route = out.rule.as_ref().map(|r| r.label.as_str()).unwrap_or("-"),
            backend = out.backend.as_deref().unwrap_or("-"),
            status = code,
            duration_ms = el.as_secs_f64() * 1000.0,
            "request"
        );
    }
    resp
}

async fn route_request(
    inner: &Arc<Inner>,
    table: &Arc<RoutingTable>,
    req: Request<Incoming>,
    ctx: &ConnCtx,
    out: &mut Outcome,
) -> Response<ProxyBody> {
    let Some(pt) = table.ports.get(&ctx.port) else {
        return local(StatusCode::NOT_FOUND, "no listener on this port\n");
    };
    // The host as the client sent it (HTTP/2 :authority or Host). Cloning the Host header's
    // value is a reference-count bump, not a copy.
    let raw_host: HeaderValue = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).unwrap_or_else(|_| HeaderValue::from_static("")),
        None => req.headers().get(header::HOST).cloned().unwrap_or_else(|| HeaderValue::from_static("")),
    };
    let raw_host_str = raw_host.to_str().unwrap_or("");
    let host = normalize_host_cow(raw_host_str);
    let listener = pt.listener_for(&host);
    // On TLS, the listener was chosen by SNI (its certificate was presented): a Host that
    // selects another listener (HTTP/2 connection coalescing, or a Host for another
    // certificate) must not reach that listener's routes. The Gateway API answers 421
    // Misdirected Request (GatewayHTTPSListenerDetectMisdirectedRequests), so the client
    // retries on a connection of its own.
    if let Some(by_sni) = ctx.sni.as_deref().and_then(|sni| pt.listener_for(sni)) {
        if !listener.is_some_and(|l| std::ptr::eq(l, by_sni)) {
            return local(StatusCode::MISDIRECTED_REQUEST, "misdirected request: the Host names another listener than the TLS server name\n");
        }
    }
    let Some(listener) = listener else {
        return local(StatusCode::NOT_FOUND, "no listener for this host\n");
    };
    let query = req.uri().query().map(parse_query).unwrap_or_default();
    let entry = {
        let view = RequestView { host: &host, path: req.uri().path(), method: req.method(), headers: req.headers(), query: &query };
        listener.find(&view).cloned()
    };
    let Some(entry) = entry else {
        return local(StatusCode::NOT_FOUND, "no route matched\n");
    };
    let rule = entry.rule.clone();
    out.rule = Some(rule.clone());
    let fut = forward(inner, listener, &entry, req, &host, &raw_host, ctx, out);
    match rule.request_timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => local(StatusCode::GATEWAY_TIMEOUT, "request timeout\n"),
        },
        None => fut.await,
    }
}

fn modified_path(pm: &PathModifier, entry: &RouteEntry, path: &str) -> String {
    match pm {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(rep) => match &entry.path {
            PathMatcher::Prefix(prefix) => replace_prefix(path, prefix, rep),
            _ => path.to_string(),
        },
    }
}

/// The request head towards the backend (shared by the hyper path and the HTTP/1.1 fast
/// path): hop-by-hop headers stripped, Host kept (or set from the client's authority),
/// the rule's and the backend's header filters, URLRewrite, X-Forwarded-For/-Proto.
/// Returns the upstream path and query (or the local answer when the rewritten path is
/// invalid).
fn upstream_head(
    headers: &mut http::HeaderMap,
    client_pq: Option<&http::uri::PathAndQuery>,
    entry: &RouteEntry,
    backend: &Backend,
    raw_host: &HeaderValue,
    ctx: &ConnCtx,
) -> Result<http::uri::PathAndQuery, Response<ProxyBody>> {
    let rule = &entry.rule;
    strip_hop_by_hop(headers);
    if !headers.contains_key(header::HOST) && !raw_host.is_empty() {
        headers.insert(header::HOST, raw_host.clone());
    }
    if let Some(ops) = &rule.request_headers {
        ops.apply(headers);
    }
    // Upstream path and query: the client's, unless URLRewrite changes the path.
    let mut pq: Option<http::uri::PathAndQuery> = client_pq.cloned();
    if let Some(rw) = &rule.rewrite {
        if let Some(h) = &rw.hostname {
            headers.insert(header::HOST, h.clone());
        }
        if let Some(pm) = &rw.path {
            let path = client_pq.map(|p| p.path()).unwrap_or("/");
            let new_path = modified_path(pm, entry, path);
            let s = match client_pq.and_then(|p| p.query()) {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            match s.parse() {
                Ok(p) => pq = Some(p),
                Err(_) => return Err(local(StatusCode::BAD_REQUEST, "invalid rewritten path\n")),
            }
        }
    }
    let pq = pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if let Some(ops) = &backend.request_headers {
        ops.apply(headers);
    }
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    let xff = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", ctx.peer.ip())).ok(),
        None => Some(ctx.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(XFF, v);
    }
    headers.insert(XFP, HeaderValue::from_static(if ctx.tls { "https" } else { "http" }));
    Ok(pq)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    inner: &Arc<Inner>,
    listener: &ListenerTable,
    entry: &RouteEntry,
    mut req: Request<Incoming>,
    host: &str,
    raw_host: &HeaderValue,
    ctx: &ConnCtx,
    out: &mut Outcome,
) -> Response<ProxyBody> {
    let rule = &entry.rule;

    // RequestRedirect
    if let Some(r) = &rule.redirect {
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(|q| q.to_string());
        let listener_scheme = if listener.protocol == ListenerProtocol::Https { "https" } else { "http" };
        let scheme = r.scheme.as_deref().unwrap_or(listener_scheme);
        let hostname = r.hostname.as_deref().unwrap_or(host);
        let port = match (r.port, &r.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) if s == "https" => 443,
            (None, Some(_)) => 80,
            (None, None) => listener.port,
        };
        let default_port = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
        let new_path = r.path.as_ref().map(|pm| modified_path(pm, entry, &path)).unwrap_or(path);
        let mut loc = if default_port { format!("{scheme}://{hostname}{new_path}") } else { format!("{scheme}://{hostname}:{port}{new_path}") };
        if let Some(q) = &query {
            loc.push('?');
            loc.push_str(q);
        }
        let mut resp = Response::new(Empty::new().map_err(|n| match n {}).boxed());
        *resp.status_mut() = r.status;
        if let Ok(v) = HeaderValue::from_str(&loc) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        if let Some(ops) = &rule.response_headers {
            ops.apply(resp.headers_mut());
        }
        return resp;
    }

    // Pick the backend before touching the request: failures answer without forwarding.
    let backend = match rule.backends.pick().map(|c| c.as_ref()) {
        None => return local(StatusCode::INTERNAL_SERVER_ERROR, "no backend with non-zero weight\n"),
        Some(BackendChoice::Fail { name, status }) => {
            out.backend = Some(name.clone());
            return local(*status, if *status == StatusCode::SERVICE_UNAVAILABLE { "no ready endpoints\n" } else { "backend reference not resolved\n" });
        }
        Some(BackendChoice::Ready(b)) => b.clone(),
    };
    out.backend = Some(backend.name.clone());
    // counted in flight until the response head arrives (or the request fails)
    let Some((ep_index, _in_flight)) = backend.pick_endpoint(inner.opts.lb_policy) else {
        return local(StatusCode::SERVICE_UNAVAILABLE, "no ready endpoints\n");
    };
    let endpoint = backend.endpoints[ep_index];

    let is_upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let upgrade_value = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = if is_upgrade { Some(hyper::upgrade::on(&mut req)) } else { None };

    let (mut parts, body) = req.into_parts();
    let pq = match upstream_head(&mut parts.headers, parts.uri.path_and_query(), entry, &backend, raw_host, ctx) {
        Ok(pq) => pq,
        Err(resp) => return resp,
    };

    // RequestMirror: fire-and-forget copy (method, path, headers and body). The body is teed
    // chunk by chunk as the primary request streams; a mirror that cannot keep up (its buffer
    // is full) loses its copy, never slowing the primary request.
    let mut body: ProxyBody = body.boxed();
    let mut tees = Vec::new();
    for m in &rule.mirrors {
        if m.fraction < 1.0 && fastrand::f64() >= m.fraction {
            continue;
        }
        let Some(ep) = m.backend.next_endpoint() else { continue };
        let Ok(u) = format!("http://{ep}{}", pq.as_str()).parse::<Uri>() else { continue };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        tees.push(tx);
        let mbody = http_body_util::StreamBody::new(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|o| o.map(|b| Ok::<_, hyper::Error>(hyper::body::Frame::data(b))))
        }));
        let mut mreq = Request::new(mbody.boxed());
        *mreq.method_mut() = parts.method.clone();
        *mreq.headers_mut() = parts.headers.clone();
        mreq.headers_mut().insert("x-fjord-mirror", HeaderValue::from_static("1"));
        *mreq.uri_mut() = u;
        let client = if m.backend.protocol == AppProtocol::H2c { inner.h2.clone() } else { inner.h1.clone() };
        *mreq.version_mut() = if m.backend.protocol == AppProtocol::H2c { Version::HTTP_2 } else { Version::HTTP_11 };
        tokio::spawn(async move {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(30), client.request(mreq)).await {
                let _ = r.into_body().collect().await;
            }
        });
    }
    if !tees.is_empty() {
        body = TeeBody { inner: body, tees }.boxed();
    }

    let mut up = http::uri::Parts::default();
    up.scheme = Some(http::uri::Scheme::HTTP);
    up.authority = Some(backend.authorities[ep_index].clone());
    up.path_and_query = Some(pq);
    parts.uri = match Uri::from_parts(up) {
        Ok(u) => u,
        Err(_) => return local(StatusCode::BAD_REQUEST, "invalid request path\n"),
    };

    let result = if let (Some(client_upgrade), Some(up)) = (client_upgrade, upgrade_value) {
        parts.version = Version::HTTP_11;
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, up);
        let req = Request::from_parts(parts, body);
        let fut = upgrade_request(endpoint, req, client_upgrade, inner.opts.connect_timeout);
        match rule.backend_timeout {
            Some(t) => tokio::time::timeout(t, fut).await.unwrap_or(Err(UpstreamError::Timeout)),
            None => fut.await,
        }
    } else {
        let fut = async {
            match backend.protocol {
                AppProtocol::H2c => {
                    parts.version = Version::HTTP_2;
                    let req = Request::from_parts(parts, body);
                    inner.h2.request(req).await.map(|r| r.map(|b| b.boxed())).map_err(UpstreamError::Client)
                }
                AppProtocol::Http1 => {
                    parts.version = Version::HTTP_11;
                    // origin-form request line on a pooled connection
                    if let Some(pq) = parts.uri.path_and_query().cloned() {
                        parts.uri = Uri::from(pq);
                    }
                    let req = Request::from_parts(parts, body);
                    inner.pool.send(endpoint, req).await.map_err(UpstreamError::Pool)
                }
            }
        };
        match rule.backend_timeout {
            Some(t) => tokio::time::timeout(t, fut).await.unwrap_or(Err(UpstreamError::Timeout)),
            None => fut.await,
        }
    };

    let mut resp = match result {
        Ok(r) => r,
        Err(UpstreamError::Timeout) => return local(StatusCode::GATEWAY_TIMEOUT, "backend timeout\n"),
        Err(e) => {
            tracing::warn!(backend = &*backend.name, %endpoint, error = %e, "backend request failed");
            return local(StatusCode::BAD_GATEWAY, "backend unavailable\n");
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut());
    }
    if let Some(ops) = &backend.response_headers {
        ops.apply(resp.headers_mut());
    }
    if let Some(ops) = &rule.response_headers {
        ops.apply(resp.headers_mut());
    }
    resp
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("timeout")]
    Timeout,
    #[error("{0}")]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Pool(#[from] crate::pool::PoolError),
    #[error("{0}")]
    Hyper(#[from] hyper::Error),
}

/// Forward an `Upgrade` request on a dedicated HTTP/1.1 connection and splice the two upgraded
/// streams together when the backend answers 101.
async fn upgrade_request(
    endpoint: SocketAddr,
    req: Request<ProxyBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
    connect_timeout: Duration,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint)).await.map_err(|_| UpstreamError::Timeout)??;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream) {
                Ok((c, u)) => {
                    let mut c = TokioIo::new(c);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(|b| b.boxed()))
}

/// Request body that copies each data chunk to mirror channels.
struct TeeBody {
    inner: ProxyBody,
    tees: Vec<tokio::sync::mpsc::Sender<Bytes>>,
}

impl hyper::body::Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    // a mirror whose buffer is full loses its copy (sender dropped: body aborted)
                    self.tees.retain(|t| t.try_send(d.clone()).is_ok());
                }
            }
            std::task::Poll::Ready(_) => self.tees.clear(),
            std::task::Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = http::HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-kept"]);

        // nothing hop-by-hop: unchanged
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("close", HeaderValue::from_static("not named by a Connection header"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn peer_ip_text() {
        for ip in ["10.0.0.1", "::1", "::ffff:255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] {
            let c = ConnCtx::new(80, SocketAddr::new(ip.parse().unwrap(), 1), false);
            assert_eq!(c.peer_ip.to_str().unwrap(), ip);
        }
    }
}
