//! fjord's cluster-state store.
//!
//! The [`Store`] trait follows etcd's v3 model so that the etcd backend maps onto
//! it one to one:
//! - one global, monotonically increasing **revision**; every write (a put, a
//!   delete, a whole transaction) creates exactly one new revision, and every
//!   key remembers the revision that created it and the one that last modified it;
//! - **transactions**: if every compare holds, apply the success ops, else the
//!   failure ops, atomically (compare-and-swap is a transaction);
//! - **watch from a revision**: every change at or after that revision, in
//!   order, then live changes; if the history was compacted past the requested
//!   revision, the watch fails with [`StoreError::Compacted`] and the caller
//!   re-lists (never silently misses an event);
//! - **leases**: keys put with a lease disappear when the lease expires.
//!
//! Backends: [`embedded::EmbeddedStore`] (single node, the default) and
//! [`etcd::EtcdStore`] (cluster mode).

pub mod embedded;
pub mod etcd;
pub mod testing;

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

pub type Revision = i64;
pub type LeaseId = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("store database error ({context}): {message}")]
    Database { context: &'static str, message: String },
    #[error("store at {path} is in use by another process (is another agent running for this node?)")]
    Locked { path: String },
    #[error("watch from revision {requested} is impossible: history before revision {compacted} was compacted; re-list and watch from the list's revision")]
    Compacted { requested: Revision, compacted: Revision },
    #[error("watcher fell behind the store's event stream and was dropped; re-list and watch again")]
    WatchLagged,
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid store URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("store is closed")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A key with its value and metadata, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Number of modifications since creation (1 after the first put).
    pub version: i64,
    /// 0 when the key has no lease.
    pub lease: LeaseId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResponse {
    pub kvs: Vec<KeyValue>,
    /// The store's revision at the time of the read: watch from `revision + 1`.
    pub revision: Revision,
}

/// A condition of a transaction. All are equality tests, as etcd's `Compare`
/// with `EQUAL`; a missing key has mod/create revision 0 and version 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    ModRevision(String, Revision),
    CreateRevision(String, Revision),
    Version(String, i64),
    Value(String, Vec<u8>),
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare::CreateRevision(key.into(), 0)
    }
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision(k, _) | Compare::CreateRevision(k, _) | Compare::Version(k, _) | Compare::Value(k, _) => k,
        }
    }
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match self {
            Compare::ModRevision(_, r) => current.map_or(0, |kv| kv.mod_revision) == *r,
            Compare::CreateRevision(_, r) => current.map_or(0, |kv| kv.create_revision) == *r,
            Compare::Version(_, v) => current.map_or(0, |kv| kv.version) == *v,
            Compare::Value(_, v) => current.is_some_and(|kv| &kv.value == v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease: None }
    }
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn when(compares: Vec<Compare>) -> Txn {
        Txn { compares, ..Default::default() }
    }
    pub fn and_then(mut self, ops: Vec<Op>) -> Txn {
        self.success = ops;
        self
    }
    pub fn or_else(mut self, ops: Vec<Op>) -> Txn {
        self.failure = ops;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv.value` is empty and `kv.mod_revision` is the
/// revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A stream of changes under a prefix, in revision order.
pub struct WatchStream {
    rx: tokio::sync::mpsc::Receiver<Result<WatchEvent>>,
}

impl WatchStream {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<WatchEvent>>) -> Self {
        WatchStream { rx }
    }
    /// The next event; `None` when the store closed the watch.
    pub async fn recv(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().await
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name of the backend, e.g. `embedded` or `etcd`.
    fn backend(&self) -> &'static str;
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    async fn list(&self, prefix: &str) -> Result<ListResponse>;
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;
    /// Deletes `key`; the revision of the delete, or `None` if it did not exist.
    async fn delete(&self, key: &str) -> Result<Option<Revision>>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;
    /// Changes under `prefix` from revision `from` on (`from <= 0`: only future changes).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;
    async fn current_revision(&self) -> Result<Revision>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Put `value` only if `key`'s mod revision is `expected` (0: only if absent).
    async fn compare_and_swap(&self, key: &str, expected: Revision, value: Vec<u8>) -> Result<TxnResponse> {
        self.txn(Txn::when(vec![Compare::ModRevision(key.into(), expected)]).and_then(vec![Op::put(key, value)]))
            .await
    }
}

/// Open a store from a URL: `embedded:PATH`, or `etcd:ENDPOINT[,ENDPOINT…]`
/// (e.g. `etcd:http://127.0.0.1:2379`) with TLS/auth from `etcd` (endpoints
/// there are ignored).
pub async fn open_with(url: &str, etcd: &etcd::EtcdOptions) -> Result<Arc<dyn Store>> {
    if let Some(eps) = url.strip_prefix("etcd:") {
        let endpoints: Vec<String> = eps.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(StoreError::BadUrl { url: url.into(), reason: "expected etcd:http://HOST:PORT[,http://HOST:PORT…]".into() });
        }
        let o = etcd::EtcdOptions { endpoints, ..etcd.clone() };
        return Ok(Arc::new(etcd::EtcdStore::connect(&o).await?));
    }
    open(url).await
}

/// Open a store from a URL: `embedded:PATH` or `etcd:ENDPOINTS` (no TLS/auth; see [`open_with`]).
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("etcd:") {
        return Box::pin(open_with(url, &etcd::EtcdOptions::default())).await;
    }
    if let Some(path) = url.strip_prefix("embedded:") {
        if path.is_empty() {
            return Err(StoreError::BadUrl { url: url.into(), reason: "embedded: needs a file path, e.g. embedded:/var/lib/fjord/store.redb".into() });
        }
        let store = embedded::EmbeddedStore::open(path)?;
        return Ok(Arc::new(store));
    }
    Err(StoreError::BadUrl { url: url.into(), reason: "expected embedded:PATH or etcd:http://HOST:PORT".into() })
}
