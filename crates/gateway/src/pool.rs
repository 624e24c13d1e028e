//! Keep-alive pool of HTTP/1.1 connections to backend endpoints.
//!
//! hyper-util's legacy client spawns a task per HTTP/1 request to put the connection back into
//! its pool; this pool instead puts the connection back when the response body ends (or is
//! dropped after its end), which saves a task spawn and a keyed pool lookup per request. A
//! connection whose response body is dropped early is closed, never reused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP/1.1 to {0}: {1}")]
    Http(SocketAddr, hyper::Error),
}

/// Idle connections per endpoint, and per thread with one runtime per worker thread (a
/// connection's task runs on the runtime that opened it: reusing it only on that thread
/// avoids cross-thread wake-ups per request).
type IdleKey = (Option<std::thread::ThreadId>, SocketAddr);

struct Shared {
    idle: Mutex<HashMap<IdleKey, Vec<SendRequest<ProxyBody>>>>,
    max_idle_per_endpoint: usize,
    connect_timeout: Duration,
    per_thread: bool,
}

impl Shared {
    fn key(&self, ep: SocketAddr) -> IdleKey {
        (self.per_thread.then(|| std::thread::current().id()), ep)
    }
}

/// HTTP/1.1 keep-alive pool. Cheap to clone.
#[derive(Clone)]
pub struct H1Pool {
    shared: Arc<Shared>,
}

impl H1Pool {
    /// `per_thread`: keep idle connections per thread (with one runtime per worker thread).
    pub fn new(max_idle_per_endpoint: usize, connect_timeout: Duration, per_thread: bool) -> Self {
        H1Pool {
            shared: Arc::new(Shared { idle: Mutex::new(HashMap::new()), max_idle_per_endpoint, connect_timeout, per_thread }),
        }
    }

    fn checkout(&self, ep: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&self.shared.key(ep))?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn checkin(shared: &Shared, ep: SocketAddr, s: SendRequest<ProxyBody>) {
        if s.is_closed() {
            return;
        }
        let mut idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(shared.key(ep)).or_default();
        if list.len() < shared.max_idle_per_endpoint {
            list.push(s);
        }
    }

    async fn connect(&self, ep: SocketAddr) -> Result<SendRequest<ProxyBody>, PoolError> {
        let tcp = tokio::time::timeout(self.shared.connect_timeout, TcpStream::connect(ep))
            .await
            .map_err(|_| PoolError::ConnectTimeout(ep))?
            .map_err(|e| PoolError::Connect(ep, e))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new().writev(false).handshake(TokioIo::new(tcp)).await.map_err(|e| PoolError::Http(ep, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %ep, error = %e, "backend connection closed with error");
            }
        });
        Ok(sender)
    }

    /// Send a request to `ep` on a pooled connection (or a new one).
    pub async fn send(&self, ep: SocketAddr, mut req: Request<ProxyBody>) -> Result<Response<ProxyBody>, PoolError> {
        // A pooled connection may have been closed by the backend just now: then try the next
        // one (or a fresh connection); hyper hands the request back if it was never written.
        let resp = loop {
            let (mut sender, fresh) = match self.checkout(ep) {
                Some(s) => (s, false),
                None => (self.connect(ep).await?, true),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(PoolError::Http(ep, e));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => break (resp, sender),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    _ => return Err(PoolError::Http(ep, e.into_error())),
                },
            }
        };
        let (resp, sender) = resp;
        let shared = self.shared.clone();
        Ok(resp.map(|body| {
            let b = ReturnOnEnd { inner: body, sender: Some(sender), shared, ep };
            http_body_util::BodyExt::boxed(b)
        }))
    }
}

/// Response body that hands its connection back to the pool once fully read.
struct ReturnOnEnd {
    inner: Incoming,
    sender: Option<SendRequest<ProxyBody>>,
    shared: Arc<Shared>,
    ep: SocketAddr,
}

impl ReturnOnEnd {
    fn give_back(&mut self) {
        if let Some(s) = self.sender.take() {
            H1Pool::checkin(&self.shared, self.ep, s);
        }
    }
}

impl Body for ReturnOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReturnOnEnd {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
