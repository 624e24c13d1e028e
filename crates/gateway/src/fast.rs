//! HTTP/1.1 fast path for plain-TCP client connections.
//!
//! Most requests a gateway sees are HTTP/1.1 keep-alive requests without a body (or with a
//! small one that arrived with the head) routed to an HTTP/1.1 backend. For those, this module
//! does what nginx does: one task per client connection parses the head (httparse), routes it
//! with the same table and the same header logic as the hyper path
//! ([`super::upstream_head`]), writes the request to a pooled backend connection that the same
//! task owns, reads the response head, and copies the body through (Content-Length, chunked
//! passed through as is, or read-to-EOF re-chunked). No per-request task hops, channels or
//! boxed bodies; small responses leave in one `send`.
//!
//! Anything else hands the connection, with every byte read so far, to hyper for the rest of
//! its life ([`Next::Hyper`]): bodies that did not arrive with the head, `Transfer-Encoding`,
//! `Expect`, `Upgrade` (WebSocket), HTTP/1.0, CONNECT, absolute-form targets, heads that do not
//! parse or are large, rules with RequestRedirect or RequestMirror, h2c backends. Nothing has
//! been forwarded at that point, so hyper serves the request exactly as before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{local, strip_hop_by_hop, upstream_head, ConnCtx, Inner, Outcome};
use crate::matching::{normalize_host_cow, parse_query};
use crate::resolver::AppProtocol;
use crate::table::*;

/// Longest request head the fast path parses (longer ones go to hyper, which allows more).
const MAX_HEAD: usize = 16 * 1024;
/// Longest response head read from a backend.
const MAX_RESP_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
const MAX_RESP_HEADERS: usize = 100;
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// What the connection does next.
pub(super) enum Next {
    /// The connection is finished (closed by either side, an error, shutdown).
    Done,
    /// Serve the rest of the connection with hyper; the buffer holds the bytes read so far.
    Hyper,
}

/// A keep-alive connection to a backend endpoint, with bytes read past the last response.
struct Upstream {
    tcp: TcpStream,
    rbuf: BytesMut,
    idle_since: Instant,
}

type Key = (Option<std::thread::ThreadId>, SocketAddr);

/// Idle backend connections of the fast path, per endpoint (and per worker thread when every
/// worker has its own runtime: a socket is registered with the reactor that opened it).
pub(crate) struct RawPool {
    idle: Mutex<HashMap<Key, Vec<Upstream>>>,
    max_idle: usize,
    per_thread: bool,
}

impl RawPool {
    pub(crate) fn new(max_idle: usize, per_thread: bool) -> Self {
        RawPool { idle: Mutex::new(HashMap::new()), max_idle, per_thread }
    }

    fn key(&self, ep: SocketAddr) -> Key {
        (self.per_thread.then(|| std::thread::current().id()), ep)
    }

    fn checkout(&self, ep: SocketAddr) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&self.key(ep))?;
        while let Some(u) = list.pop() {
            if alive(&u) {
                return Some(u);
            }
        }
        None
    }

    fn checkin(&self, ep: SocketAddr, mut u: Upstream) {
        u.idle_since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(self.key(ep)).or_default();
        // drop connections idle for too long (the oldest are at the front)
        let stale = list.iter().take_while(|o| o.idle_since.elapsed() > IDLE_TIMEOUT).count();
        if stale > 0 {
            list.drain(..stale);
        }
        if list.len() < self.max_idle {
            list.push(u);
        }
    }
}

/// An idle connection is usable when the backend neither closed it nor sent anything.
/// `try_read` costs no system call unless the reactor saw the socket become readable.
fn alive(u: &Upstream) -> bool {
    if u.idle_since.elapsed() > IDLE_TIMEOUT {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(u.tcp.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The `date` header value, formatted once per second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, Option<HeaderValue>)> = const { std::cell::RefCell::new((0, None)) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        match &c.1 {
            Some(v) if c.0 == secs => v.clone(),
            _ => {
                let v = HeaderValue::from_str(&httpdate::fmt_http_date(now)).expect("an HTTP date is a valid header value");
                *c = (secs, Some(v.clone()));
                v
            }
        }
    })
}

fn has_token(v: &[u8], token: &str) -> bool {
    v.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A byte range in a head (8 bytes instead of a `Range<usize>`'s 16: a parsed head's ranges
/// are copied around by value).
#[derive(Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Where `part` lies in `base` (heads are far shorter than 4 GiB).
fn range_of(base: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    Span { start: start as u32, end: (start + part.len()) as u32 }
}

/// What the request head says, with byte ranges into the head.
struct ReqHead {
    len: usize,
    method: Method,
    path: Span,
    headers: [(Span, Span); MAX_HEADERS],
    n_headers: usize,
    body_len: usize,
    close: bool,
}

/// Parse a request head at the start of `buf`. `Ok(None)`: incomplete; `Err(())`: not for the
/// fast path (hyper decides what to do with it).
fn parse_request(buf: &[u8]) -> Result<Option<ReqHead>, ()> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    if req.version != Some(1) {
        return Err(());
    }
    let method = Method::from_bytes(req.method.ok_or(())?.as_bytes()).map_err(|_| ())?;
    if method == Method::CONNECT {
        return Err(());
    }
    let path = req.path.ok_or(())?;
    if !path.starts_with('/') {
        return Err(());
    }
    let mut head = ReqHead {
        len,
        method,
        path: range_of(buf, path.as_bytes()),
        headers: [(Span::default(), Span::default()); MAX_HEADERS],
        n_headers: req.headers.len(),
        body_len: 0,
        close: false,
    };
    let mut content_length = None;
    for (i, h) in req.headers.iter().enumerate() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
            if content_length.is_some() || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            content_length = Some(v.parse::<usize>().map_err(|_| ())?);
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") || n.eq_ignore_ascii_case(b"upgrade") || n.eq_ignore_ascii_case(b"expect") {
            return Err(());
        } else if n.eq_ignore_ascii_case(b"connection") && has_token(h.value, "close") {
            head.close = true;
        }
        head.headers[i] = (range_of(buf, n), range_of(buf, h.value));
    }
    head.body_len = content_length.unwrap_or(0);
    Ok(Some(head))
}

/// Capacity of a connection's read and write buffers.
const CONN_BUF: usize = 4096;
/// Buffers a worker thread keeps for the next connections (64 x 4 KiB).
const FREE_BUFS: usize = 64;

thread_local! {
    static FREE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A connection buffer from this worker's free list (or a new one); it goes back on drop.
/// With a new connection per request, two 4 KiB allocations per connection were a visible
/// part of the profile (malloc of a large chunk first consolidates glibc's fast bins).
pub(super) struct ConnBuf(BytesMut);

impl ConnBuf {
    pub(super) fn new() -> Self {
        ConnBuf(FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| BytesMut::with_capacity(CONN_BUF)))
    }

    /// The bytes, for good (the buffer does not go back to the free list).
    pub(super) fn take(mut self) -> BytesMut {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for ConnBuf {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for ConnBuf {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

impl Drop for ConnBuf {
    fn drop(&mut self) {
        let b = &mut self.0;
        b.clear();
        // Back to the free list when the whole allocation can be reused (request heads split
        // off it are gone by now) and it did not grow large.
        if b.capacity() <= 16 * CONN_BUF && b.try_reclaim(CONN_BUF) {
            let b = std::mem::take(b);
            let _ = FREE.try_with(|f| {
                let mut f = f.borrow_mut();
                if f.len() < FREE_BUFS {
                    f.push(b);
                }
            });
        }
    }
}

/// The client side of a connection. TCP_NODELAY is set before the second write on it, as
/// nginx does (it sets `tcp_nodelay` when a connection is kept alive): the first write on a
/// connection has nothing unacknowledged before it for Nagle's algorithm to wait for, and a
/// connection closed after one response that left in one write saves the system call.
pub(super) struct Client<'a> {
    pub(super) tcp: &'a mut TcpStream,
    wrote: bool,
    nodelay: bool,
}

impl<'a> Client<'a> {
    pub(super) fn new(tcp: &'a mut TcpStream) -> Self {
        Client { tcp, wrote: false, nodelay: false }
    }

    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.wrote && !self.nodelay {
            let _ = self.tcp.set_nodelay(true);
            self.nodelay = true;
        }
        self.wrote = true;
        self.tcp.write_all(b).await
    }
}

/// Serve HTTP/1.1 requests on a plain connection until it ends or a request needs hyper.
pub(super) async fn serve(inner: &Arc<Inner>, tcp: &mut Client<'_>, buf: &mut BytesMut, ctx: &ConnCtx) -> Next {
    let mut shutdown = inner.shutdown.subscribe();
    let mut out = ConnBuf::new();
    loop {
        // a complete head (and body) in `buf`
        let head = loop {
            match parse_request(buf) {
                Ok(Some(h)) if buf.len() >= h.len + h.body_len => break h,
                Ok(Some(_)) => return Next::Hyper,
                Ok(None) if buf.len() > MAX_HEAD => return Next::Hyper,
                Ok(None) => {}
                Err(()) => return Next::Hyper,
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            let r = if buf.is_empty() {
                if *shutdown.borrow() {
                    return Next::Done;
                }
                tokio::select! {
                    r = tcp.tcp.read_buf(buf) => r,
                    _ = shutdown.changed() => return Next::Done,
                }
            } else {
                tcp.tcp.read_buf(buf).await
            };
            match r {
                Ok(0) | Err(_) => return Next::Done,
                Ok(_) => {}
            }
        };
        let req = match take_request(buf, head) {
            Ok(r) => r,
            Err(Fallback) => return Next::Hyper,
        };
        match request(inner, tcp, buf, req, ctx, &mut out, &shutdown).await {
            Ok(true) => {}
            Ok(false) => return Next::Done,
            Err(Fallback) => return Next::Hyper,
        }
    }
}

struct Fallback;

/// Build a `HeaderMap` from the ranges of a parsed head (values share the head's memory).
fn header_map(head: &Bytes, ranges: &[(Span, Span)]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(ranges.len() + 4);
    for (n, v) in ranges {
        let name = HeaderName::from_bytes(&head[n.range()]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v.range())).ok()?;
        map.append(name, value);
    }
    Some(map)
}

fn put_head(out: &mut BytesMut, headers: &HeaderMap) {
    for (n, v) in headers {
        out.put_slice(n.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

fn put_status(out: &mut BytesMut, status: StatusCode, reason: Option<&[u8]>) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    match reason {
        Some(r) if !r.is_empty() => out.put_slice(r),
        _ => out.put_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.put_slice(b"\r\n");
}

/// A request split off the connection's buffer, with what [`request`] needs from its head.
/// The parsed ranges ([`ReqHead`]) stay out of the request's future: the future is part of
/// every connection's task, which is allocated and moved once per connection.
struct Req {
    /// The head's bytes (header values and the target share them).
    raw: Bytes,
    headers: HeaderMap,
    pq: http::uri::PathAndQuery,
    method: Method,
    body_len: usize,
    close: bool,
}

/// Put the head's bytes back in front of the buffer: hyper gets the connection as it came.
fn give_back(buf: &mut BytesMut, raw: &Bytes) -> Fallback {
    let mut b = BytesMut::with_capacity(raw.len() + buf.len());
    b.put_slice(raw);
    b.put_slice(buf);
    *buf = b;
    Fallback
}

fn take_request(buf: &mut BytesMut, head: ReqHead) -> Result<Req, Fallback> {
    let raw = buf.split_to(head.len).freeze();
    let Some(headers) = header_map(&raw, &head.headers[..head.n_headers]) else {
        return Err(give_back(buf, &raw));
    };
    let Ok(pq) = http::uri::PathAndQuery::from_maybe_shared(raw.slice(head.path.range())) else {
        return Err(give_back(buf, &raw));
    };
    Ok(Req { raw, headers, pq, method: head.method, body_len: head.body_len, close: head.close })
}

/// Serve one request. `Ok(true)`: the connection stays open for the next one.
async fn request(
    inner: &Arc<Inner>,
    tcp: &mut Client<'_>,
    buf: &mut BytesMut,
    head: Req,
    ctx: &ConnCtx,
    out: &mut BytesMut,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<bool, Fallback> {
    let start = Instant::now();
    let Req { raw, mut headers, pq, .. } = head;
    let table = inner.table.load_full();
    let mut out_ = Outcome::default();
    let is_head = head.method == Method::HEAD;
    let keep_alive = |shutdown: &tokio::sync::watch::Receiver<bool>| !head.close && !*shutdown.borrow();

    // Route (as route_request does); local answers are written here.
    let raw_host = headers.get(header::HOST).cloned().unwrap_or_else(|| HeaderValue::from_static(""));
    let host = normalize_host_cow(raw_host.to_str().unwrap_or(""));
    let routed = match table.ports.get(&ctx.port) {
        None => Err("no listener on this port\n"),
        Some(pt) => match pt.listener_for(&host) {
            None => Err("no listener for this host\n"),
            Some(l) => {
                let query = pq.query().map(parse_query).unwrap_or_default();
                let view = RequestView { host: &host, path: pq.path(), method: &head.method, headers: &headers, query: &query };
                match l.find(&view) {
                    None => Err("no route matched\n"),
                    Some(e) => Ok(e.clone()),
                }
            }
        },
    };
    let entry = match routed {
        Ok(e) => e,
        Err(msg) => {
            buf.advance(head.body_len);
            let ka = keep_alive(shutdown);
            let r = respond_local(inner, tcp, out, StatusCode::NOT_FOUND, msg, is_head, ka, &head.method, &pq, ctx, &out_, start).await;
            return Ok(r && ka);
        }
    };
    let rule = entry.rule.clone();
    if rule.redirect.is_some()
        || !rule.mirrors.is_empty()
        || rule.backends.choices.iter().any(|(_, c)| matches!(c.as_ref(), BackendChoice::Ready(b) if b.protocol != AppProtocol::Http1))
    {
        return Err(give_back(buf, &raw));
    }
    out_.rule = Some(rule.clone());
    let body = buf.split_to(head.body_len).freeze();

    let local_answer = |status: StatusCode, msg: &'static str| (status, msg);
    let picked = match rule.backends.pick().map(|c| c.as_ref()) {
        None => Err(local_answer(StatusCode::INTERNAL_SERVER_ERROR, "no backend with non-zero weight\n")),
        Some(BackendChoice::Fail { name, status }) => {
            out_.backend = Some(name.clone());
            Err(local_answer(*status, if *status == StatusCode::SERVICE_UNAVAILABLE { "no ready endpoints\n" } else { "backend reference not resolved\n" }))
        }
        Some(BackendChoice::Ready(b)) => Ok(b.clone()),
    };
    let backend = match picked {
        Ok(b) => b,
        Err((status, msg)) => {
            let ka = keep_alive(shutdown);
            let r = respond_local(inner, tcp, out, status, msg, is_head, ka, &head.method, &pq, ctx, &out_, start).await;
            return Ok(r && ka);
        }
    };
    out_.backend = Some(backend.name.clone());
    let Some((ep_index, in_flight)) = backend.pick_endpoint(inner.opts.lb_policy) else {
        let ka = keep_alive(shutdown);
        let r = respond_local(inner, tcp, out, StatusCode::SERVICE_UNAVAILABLE, "no ready endpoints\n", is_head, ka, &head.method, &pq, ctx, &out_, start).await;
        return Ok(r && ka);
    };
    let endpoint = backend.endpoints[ep_index];
    let client_pq = pq.clone();
    let upq = match upstream_head(&mut headers, Some(&client_pq), &entry, &backend, &raw_host, ctx) {
        Ok(p) => p,
        Err(_) => {
            let ka = keep_alive(shutdown);
            let r = respond_local(inner, tcp, out, StatusCode::BAD_REQUEST, "invalid rewritten path\n", is_head, ka, &head.method, &pq, ctx, &out_, start).await;
            return Ok(r && ka);
        }
    };

    // The request towards the backend, in one buffer.
    out.clear();
    out.put_slice(head.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(upq.as_str().as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    put_head(out, &headers);
    out.put_slice(&body);
    let idempotent = matches!(head.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);

    let exchange = exchange(inner, endpoint, out, idempotent);
    // Both timeouts cover the exchange here: the shorter one applies (the backend's on a tie, as
    // when one timer is nested in the other). One timer keeps the future small.
    let timeout = match (rule.request_timeout, rule.backend_timeout) {
        (None, None) => None,
        (Some(r), Some(b)) if r < b => Some((r, "request timeout\n")),
        (_, Some(b)) => Some((b, "backend timeout\n")),
        (Some(r), None) => Some((r, "request timeout\n")),
    };
    let result = match timeout {
        None => exchange.await,
        Some((t, msg)) => tokio::time::timeout(t, exchange).await.unwrap_or(Err(UpErr::Timeout(msg))),
    };
    drop(in_flight);
    let (mut up, resp) = match result {
        Ok(x) => x,
        Err(e) => {
            let (status, msg) = match e {
                UpErr::Timeout(m) => (StatusCode::GATEWAY_TIMEOUT, m),
                UpErr::Failed(e) => {
                    tracing::warn!(backend = &*backend.name, %endpoint, error = %e, "backend request failed");
                    (StatusCode::BAD_GATEWAY, "backend unavailable\n")
                }
            };
            let ka = keep_alive(shutdown);
            let r = respond_local(inner, tcp, out, status, msg, is_head, ka, &head.method, &pq, ctx, &out_, start).await;
            return Ok(r && ka);
        }
    };

    // Response head towards the client.
    let mut rh = resp.headers;
    strip_hop_by_hop(&mut rh);
    if let Some(ops) = &backend.response_headers {
        ops.apply(&mut rh);
    }
    if let Some(ops) = &rule.response_headers {
        ops.apply(&mut rh);
    }
    let framing = if is_head { Framing::None } else { resp.framing };
    match framing {
        Framing::Chunked | Framing::Eof => {
            rh.remove(header::CONTENT_LENGTH);
            rh.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        _ => {}
    }
    if !rh.contains_key(header::DATE) {
        rh.insert(header::DATE, date());
    }
    let ka = keep_alive(shutdown);
    if !ka {
        rh.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    finish(inner, resp.status, &head.method, &pq, ctx, &out_, start);
    out.clear();
    put_status(out, resp.status, resp.reason.as_deref());
    put_head(out, &rh);

    // Body.
    let body_ok = copy_body(tcp, &mut up, out, framing).await;
    match body_ok {
        Ok(()) => {
            if resp.reuse && up.rbuf.is_empty() {
                inner.raw_pool.checkin(endpoint, up);
            }
            Ok(ka)
        }
        Err(_) => Ok(false),
    }
}

fn finish(inner: &Arc<Inner>, status: StatusCode, method: &Method, pq: &http::uri::PathAndQuery, ctx: &ConnCtx, out: &Outcome, start: Instant) {
    let code = status.as_u16();
    let el = start.elapsed();
    inner.metrics.observe(out.rule.as_deref(), out.backend.as_ref(), code, el.as_secs_f64());
    if inner.opts.access_log {
        tracing::info!(
            target: "fjord_gateway::access",
            peer = %ctx.peer,
            method = %method,
            path = pq.path(),
            route = out.rule.as_ref().map(|r| r.label.as_str()).unwrap_or("-"),
            backend = out.backend.as_deref().unwrap_or("-"),
            status = code,
            duration_ms = el.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// Write a local answer (as [`super::local`] builds it). Returns false when the write failed.
#[allow(clippy::too_many_arguments)]
async fn respond_local(
    inner: &Arc<Inner>,
    tcp: &mut Client<'_>,
    out: &mut BytesMut,
    status: StatusCode,
    msg: &'static str,
    is_head: bool,
    keep_alive: bool,
    method: &Method,
    pq: &http::uri::PathAndQuery,
    ctx: &ConnCtx,
    o: &Outcome,
    start: Instant,
) -> bool {
    let mut resp = local(status, msg);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(msg.len()));
    h.insert(header::DATE, date());
    if !keep_alive {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    finish(inner, status, method, pq, ctx, o, start);
    out.clear();
    put_status(out, status, None);
    put_head(out, resp.headers());
    if !is_head {
        out.put_slice(msg.as_bytes());
    }
    tcp.write_all(out).await.is_ok()
}

enum UpErr {
    Timeout(&'static str),
    Failed(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// No length: the body ends when the backend closes (re-chunked towards the client).
    Eof,
}

struct RespHead {
    status: StatusCode,
    reason: Option<Vec<u8>>,
    headers: HeaderMap,
    framing: Framing,
    /// The backend connection can carry the next request.
    reuse: bool,
}

/// Send `req` to `ep` (pooled connection or a new one) and read the response head.
async fn exchange(inner: &Arc<Inner>, ep: SocketAddr, req: &[u8], idempotent: bool) -> Result<(Upstream, RespHead), UpErr> {
    let mut pooled = inner.raw_pool.checkout(ep);
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(u) => u,
            None => {
                let tcp = tokio::time::timeout(inner.opts.connect_timeout, TcpStream::connect(ep))
                    .await
                    .map_err(|_| UpErr::Failed(format!("connecting to {ep}: timed out")))?
                    .map_err(|e| UpErr::Failed(format!("connecting to {ep}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Upstream { tcp, rbuf: BytesMut::with_capacity(8192), idle_since: Instant::now() }
            }
        };
        match send_and_read_head(&mut up, req).await {
            Ok(h) => return Ok((up, h)),
            // A kept-alive connection the backend closed before answering: once more on a
            // fresh connection, for requests that may be repeated.
            Err((nothing_read, e)) => {
                if reused && nothing_read && idempotent {
                    continue;
                }
                return Err(UpErr::Failed(format!("HTTP/1.1 to {ep}: {e}")));
            }
        }
    }
}

/// Returns `Err((no response byte was read, error))`.
async fn send_and_read_head(up: &mut Upstream, req: &[u8]) -> Result<RespHead, (bool, String)> {
    up.tcp.write_all(req).await.map_err(|e| (true, e.to_string()))?;
    let mut read_any = false;
    loop {
        if !up.rbuf.is_empty() {
            let mut hs = [httparse::EMPTY_HEADER; MAX_RESP_HEADERS];
            let mut resp = httparse::Response::new(&mut hs);
            match resp.parse(&up.rbuf) {
                Ok(httparse::Status::Complete(n)) => {
                    let code = resp.code.unwrap_or(0);
                    if (100..200).contains(&code) {
                        if code == 101 {
                            return Err((false, "unexpected 101 Switching Protocols".into()));
                        }
                        // informational: skip it, the final response follows
                        up.rbuf.advance(n);
                        continue;
                    }
                    let status = StatusCode::from_u16(code).map_err(|_| (false, format!("invalid status {code}")))?;
                    let reason = resp.reason.filter(|r| Some(*r) != status.canonical_reason() && !r.is_empty()).map(|r| r.as_bytes().to_vec());
                    let v11 = resp.version == Some(1);
                    let mut te_chunked = None;
                    let mut cl: Option<u64> = None;
                    let mut conn_close = !v11;
                    let mut ranges = [(Span::default(), Span::default()); MAX_RESP_HEADERS];
                    for (i, h) in resp.headers.iter().enumerate() {
                        let name = h.name.as_bytes();
                        if name.eq_ignore_ascii_case(b"transfer-encoding") {
                            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"").trim_ascii();
                            te_chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
                        } else if name.eq_ignore_ascii_case(b"content-length") {
                            let v = std::str::from_utf8(h.value).ok().map(str::trim).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| (false, "invalid content-length".to_string()))?;
                            if cl.is_some_and(|c| c != v) {
                                return Err((false, "conflicting content-length".into()));
                            }
                            cl = Some(v);
                        } else if name.eq_ignore_ascii_case(b"connection") {
                            if has_token(h.value, "close") {
                                conn_close = true;
                            } else if !v11 && has_token(h.value, "keep-alive") {
                                conn_close = false;
                            }
                        }
                        ranges[i] = (range_of(&up.rbuf, name), range_of(&up.rbuf, h.value));
                    }
                    let n_headers = resp.headers.len();
                    let raw = up.rbuf.split_to(n).freeze();
                    let headers = header_map(&raw, &ranges[..n_headers]).ok_or_else(|| (false, "invalid response header".to_string()))?;
                    let framing = if code == 204 || code == 304 {
                        Framing::None
                    } else {
                        match (te_chunked, cl) {
                            (Some(true), _) => Framing::Chunked,
                            (Some(false), _) => Framing::Eof,
                            (None, Some(0)) => Framing::None,
                            (None, Some(n)) => Framing::Length(n),
                            (None, None) => Framing::Eof,
                        }
                    };
                    let reuse = !conn_close && framing != Framing::Eof;
                    return Ok(RespHead { status, reason, headers, framing, reuse });
                }
                Ok(httparse::Status::Partial) if up.rbuf.len() < MAX_RESP_HEAD => {}
                Ok(httparse::Status::Partial) => return Err((false, "response head too large".into())),
                Err(e) => return Err((false, format!("invalid response: {e}"))),
            }
        }
        if up.rbuf.capacity() - up.rbuf.len() < 1024 {
            up.rbuf.reserve(8192);
        }
        match up.tcp.read_buf(&mut up.rbuf).await {
            Ok(0) => return Err((!read_any, "connection closed before the response".into())),
            Ok(_) => read_any = true,
            Err(e) => return Err((!read_any, e.to_string())),
        }
    }
}

/// Chunked-encoding scanner: finds where a chunked body (with trailers) ends without changing it.
#[derive(Default)]
struct ChunkScan {
    state: CS,
    size: u64,
    line_len: usize,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum CS {
    #[default]
    Size,
    SizeExt,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScan {
    /// Consume bytes; returns how many belong to the body (all, or up to the end) or an error.
    fn feed(&mut self, b: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < b.len() && self.state != CS::Done {
            let c = b[i];
            match self.state {
                CS::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (c as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size.checked_mul(16).and_then(|s| s.checked_add(d)).ok_or(())?;
                        self.line_len += 1;
                    }
                    b';' | b' ' | b'\t' if self.line_len > 0 => self.state = CS::SizeExt,
                    b'\r' if self.line_len > 0 => self.state = CS::SizeLf,
                    _ => return Err(()),
                },
                CS::SizeExt => {
                    if c == b'\r' {
                        self.state = CS::SizeLf;
                    }
                }
                CS::SizeLf => {
                    if c != b'\n' {
                        return Err(());
                    }
                    self.line_len = 0;
                    self.state = if self.size == 0 { CS::Trailer } else { CS::Data };
                }
                CS::Data => {
                    let n = ((b.len() - i) as u64).min(self.size) as usize;
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = CS::DataCr;
                    }
                    continue;
                }
                CS::DataCr => self.state = if c == b'\r' { CS::DataLf } else { return Err(()) },
                CS::DataLf => {
                    if c != b'\n' {
                        return Err(());
                    }
                    self.state = CS::Size;
                }
                CS::Trailer => {
                    // a trailer line, or the empty line that ends the body
                    if c == b'\r' {
                        self.state = if self.line_len == 0 { CS::EndLf } else { CS::TrailerLf };
                    } else {
                        self.line_len += 1;
                    }
                }
                CS::TrailerLf => {
                    if c != b'\n' {
                        return Err(());
                    }
                    self.line_len = 0;
                    self.state = CS::Trailer;
                }
                CS::EndLf => {
                    if c != b'\n' {
                        return Err(());
                    }
                    self.state = CS::Done;
                }
                CS::Done => {}
            }
            i += 1;
        }
        Ok(i)
    }
}

/// Copy the response body from the backend to the client after the head in `out`. Small
/// bodies that came with the head leave in the same write.
async fn copy_body(tcp: &mut Client<'_>, up: &mut Upstream, out: &mut BytesMut, framing: Framing) -> Result<(), ()> {
    match framing {
        Framing::None => tcp.write_all(out).await.map_err(|_| ()),
        Framing::Length(mut left) => {
            loop {
                let n = (up.rbuf.len() as u64).min(left) as usize;
                out.put_slice(&up.rbuf[..n]);
                up.rbuf.advance(n);
                left -= n as u64;
                if !out.is_empty() {
                    tcp.write_all(out).await.map_err(|_| ())?;
                    out.clear();
                }
                if left == 0 {
                    return Ok(());
                }
                read_more(up).await?;
            }
        }
        Framing::Chunked => {
            let mut scan = ChunkScan::default();
            loop {
                let n = scan.feed(&up.rbuf)?;
                out.put_slice(&up.rbuf[..n]);
                up.rbuf.advance(n);
                if !out.is_empty() {
                    tcp.write_all(out).await.map_err(|_| ())?;
                    out.clear();
                }
                if scan.state == CS::Done {
                    return Ok(());
                }
                read_more(up).await?;
            }
        }
        Framing::Eof => loop {
            if !up.rbuf.is_empty() {
                let _ = std::fmt::Write::write_fmt(&mut FmtBuf(out), format_args!("{:x}\r\n", up.rbuf.len()));
                out.put_slice(&up.rbuf);
                out.put_slice(b"\r\n");
                up.rbuf.clear();
            }
            if !out.is_empty() {
                tcp.write_all(out).await.map_err(|_| ())?;
                out.clear();
            }
            match up.tcp.read_buf(&mut up.rbuf).await {
                Ok(0) => return tcp.write_all(b"0\r\n\r\n").await.map_err(|_| ()),
                Ok(_) => {}
                Err(_) => return Err(()),
            }
        },
    }
}

struct FmtBuf<'a>(&'a mut BytesMut);
impl std::fmt::Write for FmtBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

async fn read_more(up: &mut Upstream) -> Result<(), ()> {
    if up.rbuf.capacity() - up.rbuf.len() < 4096 {
        up.rbuf.reserve(16 * 1024);
    }
    match up.tcp.read_buf(&mut up.rbuf).await {
        Ok(0) | Err(_) => Err(()),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_scan_finds_the_end_across_splits() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..=end {
            let mut s = ChunkScan::default();
            let a = s.feed(&body[..split]).unwrap();
            assert_eq!(a, split);
            let b = s.feed(&body[split..]).unwrap();
            assert_eq!(split + b, end, "split {split}");
            assert!(s.state == CS::Done);
        }
        let mut s = ChunkScan::default();
        assert!(s.feed(b"zz\r\n").is_err());
        let mut s = ChunkScan::default();
        assert_eq!(s.feed(b"0\r\n\r\n").unwrap(), 5);
        assert!(s.state == CS::Done);
    }

    #[test]
    fn requests_that_need_hyper_are_refused() {
        let ok = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let h = parse_request(ok).unwrap().unwrap();
        assert!(h.close && h.body_len == 0 && h.len == ok.len());
        assert!(parse_request(b"GET /a HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        for bad in [
            &b"GET /a HTTP/1.0\r\n\r\n"[..],
            b"GET http://x/a HTTP/1.1\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(parse_request(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let post = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(parse_request(post).unwrap().unwrap().body_len, 3);
    }
}
