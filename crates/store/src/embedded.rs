//! The embedded, single-node backend, on [redb](https://docs.rs/redb).
//!
//! Why redb: it is a pure-Rust, well-maintained embedded database with ACID
//! transactions; a committed write transaction is fsynced before `commit`
//! returns (copy-on-write B-trees with checksummed commits), so a write the
//! agent acknowledged survives `kill -9` and power loss; it builds with no C
//! toolchain (unlike SQLite) and opens a file exclusively, so two agents can
//! never share one store by mistake.
//!
//! Layout: table `kv` (key → record), `log` ((revision, index) → event) with the
//! last [`HISTORY`] revisions for watch-from-revision, `meta` (revision,
//! compacted revision, lease sequence) and `leases` (id → TTL).

use crate::*;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Instant;
use tokio::sync::{broadcast, mpsc};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");

/// Revisions of history kept for watchers that resume from an older revision.
pub const HISTORY: u64 = 10_000;
const WATCH_BUFFER: usize = 4096;

fn db_err<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Database { context, message: e.to_string() }
}

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &str, b: &[u8]) -> Result<KeyValue> {
    if b.len() < 32 {
        return Err(StoreError::Corrupt { key: key.into(), reason: format!("record is {} bytes, header needs 32", b.len()) });
    }
    let n = |i: usize| i64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    Ok(KeyValue { key: key.into(), create_revision: n(0), mod_revision: n(1), version: n(2), lease: n(3), value: b[32..].to_vec() })
}

fn encode_event(ev: &WatchEvent) -> Vec<u8> {
    let mut out = vec![match ev.kind {
        EventKind::Put => 1u8,
        EventKind::Delete => 2u8,
    }];
    out.extend_from_slice(&(ev.kv.key.len() as u32).to_le_bytes());
    out.extend_from_slice(ev.kv.key.as_bytes());
    out.extend_from_slice(&encode_record(&ev.kv));
    out
}

fn decode_event(b: &[u8]) -> Result<WatchEvent> {
    let bad = |reason: &str| StoreError::Corrupt { key: "<history log>".into(), reason: reason.into() };
    if b.len() < 5 {
        return Err(bad("event too short"));
    }
    let kind = match b[0] {
        1 => EventKind::Put,
        2 => EventKind::Delete,
        _ => return Err(bad("unknown event kind")),
    };
    let klen = u32::from_le_bytes(b[1..5].try_into().unwrap()) as usize;
    let key = std::str::from_utf8(b.get(5..5 + klen).ok_or_else(|| bad("key truncated"))?).map_err(|_| bad("key not UTF-8"))?;
    let kv = decode_record(key, &b[5 + klen..])?;
    Ok(WatchEvent { kind, kv })
}

struct Inner {
    db: Database,
    path: String,
    /// Serializes commit + broadcast so watchers see revisions in order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
    /// lease → (ttl, deadline)
    leases: Mutex<HashMap<LeaseId, (Duration, Instant)>>,
    history: u64,
}

/// redb's in-process page cache (its default is 1 GiB).
pub const CACHE_BYTES: usize = 16 << 20;

/// The embedded store. Cheap to clone (shares one database).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl EmbeddedStore {
    /// Open (or create) the store file at `path`.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::open_with_history(path, HISTORY)
    }

    /// Like [`open`](Self::open), keeping `history` revisions for watchers (tests use small values).
    /// The page cache in the process is bounded by [`CACHE_BYTES`].
    pub fn open_with_history(path: impl AsRef<std::path::Path>, history: u64) -> Result<Self> {
        let history = history.max(1);
        let path = path.as_ref();
        let path_s = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.display().to_string(), source })?;
        }
        // redb caches every page it touched, up to 1 GiB by default: with 10,000 services
        // that was tens of MiB of the agent's RSS for data the OS page cache holds anyway.
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path_s.clone() },
            redb::DatabaseError::Storage(redb::StorageError::Io(source)) => StoreError::Io { path: path_s.clone(), source },
            other => StoreError::Database { context: "open", message: format!("{other} (file {path_s})") },
        })?;
        // Make sure every table exists and load leases.
        let mut leases = HashMap::new();
        {
            let w = db.begin_write().map_err(db_err("begin"))?;
            w.open_table(KV).map_err(db_err("open kv"))?;
            w.open_table(LOG).map_err(db_err("open log"))?;
            w.open_table(META).map_err(db_err("open meta"))?;
            let t = w.open_table(LEASES).map_err(db_err("open leases"))?;
            let now = Instant::now();
            for row in t.iter().map_err(db_err("read leases"))? {
                let (id, ttl) = row.map_err(db_err("read leases"))?;
                let ttl = Duration::from_millis(ttl.value());
                // Like etcd after a leader change: a lease gets a full TTL on restart.
                leases.insert(id.value(), (ttl, now + ttl));
            }
            drop(t);
            w.commit().map_err(db_err("commit"))?;
        }
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let inner = Arc::new(Inner { db, path: path_s, write_lock: Mutex::new(()), events, leases: Mutex::new(leases), history });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(expire_leases(Arc::downgrade(&inner)));
        }
        Ok(EmbeddedStore { inner })
    }

    pub fn path(&self) -> &str {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| StoreError::Database { context: "task", message: e.to_string() })?
    }
}

impl Inner {
    fn revision(&self) -> Result<Revision> {
        let r = self.db.begin_read().map_err(db_err("begin read"))?;
        let t = r.open_table(META).map_err(db_err("open meta"))?;
        Ok(t.get("revision").map_err(db_err("read meta"))?.map_or(0, |v| v.value()) as Revision)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self.db.begin_read().map_err(db_err("begin read"))?;
        let t = r.open_table(KV).map_err(db_err("open kv"))?;
        match t.get(key).map_err(db_err("get"))? {
            Some(v) => Ok(Some(decode_record(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<ListResponse> {
        let r = self.db.begin_read().map_err(db_err("begin read"))?;
        let meta = r.open_table(META).map_err(db_err("open meta"))?;
        let revision = meta.get("revision").map_err(db_err("read meta"))?.map_or(0, |v| v.value()) as Revision;
        let t = r.open_table(KV).map_err(db_err("open kv"))?;
        let mut kvs = Vec::new();
        for row in t.range(prefix..).map_err(db_err("range"))? {
            let (k, v) = row.map_err(db_err("range"))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            kvs.push(decode_record(key, v.value())?);
        }
        Ok(ListResponse { kvs, revision })
    }

    /// The one write path: evaluate compares, apply ops under a new revision,
    /// log the events, commit (fsync), then publish to watchers.
    fn write(&self, txn: Txn) -> Result<TxnResponse> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let w = self.db.begin_write().map_err(db_err("begin write"))?;
        let (succeeded, revision, events) = {
            let mut kv = w.open_table(KV).map_err(db_err("open kv"))?;
            let mut meta = w.open_table(META).map_err(db_err("open meta"))?;
            let mut log = w.open_table(LOG).map_err(db_err("open log"))?;
            let current = meta.get("revision").map_err(db_err("read meta"))?.map_or(0, |v| v.value());
            let mut succeeded = true;
            for c in &txn.compares {
                let cur = match kv.get(c.key()).map_err(db_err("get"))? {
                    Some(v) => Some(decode_record(c.key(), v.value())?),
                    None => None,
                };
                if !c.holds(cur.as_ref()) {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { txn.success } else { txn.failure };
            let rev = current + 1;
            let mut events = Vec::new();
            if !ops.is_empty() {
                let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
                for op in &ops {
                    if let Op::Put { lease: Some(l), .. } = op {
                        if *l != 0 && !leases.contains_key(l) {
                            return Err(StoreError::LeaseNotFound(*l));
                        }
                    }
                }
            }
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        let prev = match kv.get(key.as_str()).map_err(db_err("get"))? {
                            Some(v) => Some(decode_record(&key, v.value())?),
                            None => None,
                        };
                        let rec = KeyValue {
                            create_revision: prev.as_ref().map_or(rev as i64, |p| p.create_revision),
                            mod_revision: rev as i64,
                            version: prev.as_ref().map_or(1, |p| p.version + 1),
                            lease: lease.unwrap_or(0),
                            value,
                            key,
                        };
                        kv.insert(rec.key.as_str(), encode_record(&rec).as_slice()).map_err(db_err("put"))?;
                        events.push(WatchEvent { kind: EventKind::Put, kv: rec });
                    }
                    Op::Delete { key } => {
                        let existed = kv.remove(key.as_str()).map_err(db_err("delete"))?.is_some();
                        if existed {
                            let rec = KeyValue { key, value: vec![], create_revision: 0, mod_revision: rev as i64, version: 0, lease: 0 };
                            events.push(WatchEvent { kind: EventKind::Delete, kv: rec });
                        }
                    }
                }
            }
            if events.is_empty() {
                (succeeded, current as Revision, events)
            } else {
                for (i, ev) in events.iter().enumerate() {
                    log.insert((rev, i as u32), encode_event(ev).as_slice()).map_err(db_err("log"))?;
                }
                meta.insert("revision", rev).map_err(db_err("write meta"))?;
                // Compact the history every history/10 revisions down to `history` revisions.
                if rev % (self.history / 10).max(1) == 0 && rev > self.history {
                    let cut = rev - self.history;
                    let old: Vec<(u64, u32)> = log
                        .range(..(cut, 0))
                        .map_err(db_err("compact"))?
                        .map(|r| r.map(|(k, _)| k.value()))
                        .collect::<std::result::Result<_, _>>()
                        .map_err(db_err("compact"))?;
                    for k in old {
                        log.remove(k).map_err(db_err("compact"))?;
                    }
                    meta.insert("compacted", cut).map_err(db_err("write meta"))?;
                }
                (succeeded, rev as Revision, events)
            }
        };
        if events.is_empty() {
            w.abort().map_err(db_err("abort"))?;
        } else {
            w.commit().map_err(db_err("commit"))?;
            let _ = self.events.send(Arc::new(events));
        }
        Ok(TxnResponse { succeeded, revision })
    }

    fn history(&self, prefix: &str, from: Revision, to: Revision) -> Result<Vec<WatchEvent>> {
        let r = self.db.begin_read().map_err(db_err("begin read"))?;
        let meta = r.open_table(META).map_err(db_err("open meta"))?;
        let compacted = meta.get("compacted").map_err(db_err("read meta"))?.map_or(0, |v| v.value()) as Revision;
        if from <= compacted {
            return Err(StoreError::Compacted { requested: from, compacted: compacted + 1 });
        }
        let log = r.open_table(LOG).map_err(db_err("open log"))?;
        let mut out = Vec::new();
        for row in log.range((from as u64, 0)..=(to as u64, u32::MAX)).map_err(db_err("read log"))? {
            let (_, v) = row.map_err(db_err("read log"))?;
            let ev = decode_event(v.value())?;
            if ev.kv.key.starts_with(prefix) {
                out.push(ev);
            }
        }
        Ok(out)
    }

    fn revoke(&self, lease: LeaseId) -> Result<()> {
        let keys: Vec<String> = {
            let r = self.db.begin_read().map_err(db_err("begin read"))?;
            let t = r.open_table(KV).map_err(db_err("open kv"))?;
            let mut keys = Vec::new();
            for row in t.iter().map_err(db_err("scan"))? {
                let (k, v) = row.map_err(db_err("scan"))?;
                if decode_record(k.value(), v.value())?.lease == lease {
                    keys.push(k.value().to_string());
                }
            }
            keys
        };
        // Forget the lease first: once its keys' delete events are out, it must be gone.
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease);
        self.write(Txn::when(vec![]).and_then(keys.into_iter().map(Op::delete).collect()))?;
        let w = self.db.begin_write().map_err(db_err("begin write"))?;
        w.open_table(LEASES).map_err(db_err("open leases"))?.remove(lease).map_err(db_err("remove lease"))?;
        w.commit().map_err(db_err("commit"))?;
        Ok(())
    }

    fn kv_count(&self) -> Result<u64> {
        let r = self.db.begin_read().map_err(db_err("begin read"))?;
        r.open_table(KV).map_err(db_err("open kv"))?.len().map_err(db_err("len"))
    }
}

async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = {
            let leases = inner.leases.lock().unwrap_or_else(|p| p.into_inner());
            leases.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect()
        };
        for id in expired {
            let inner2 = inner.clone();
            match tokio::task::spawn_blocking(move || inner2.revoke(id)).await {
                Ok(Ok(())) => tracing::info!(lease = id, "lease expired; its keys were deleted"),
                Ok(Err(e)) => tracing::warn!(lease = id, error = %e, "could not expire lease"),
                Err(e) => tracing::warn!(lease = id, error = %e, "lease expiry task failed"),
            }
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<ListResponse> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let op = Op::Put { key: key.into(), value, lease };
        Ok(self.blocking(move |i| i.write(Txn::when(vec![]).and_then(vec![op]))).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let key = key.to_string();
        self.blocking(move |i| {
            let before = i.revision()?;
            let r = i.write(Txn::when(vec![]).and_then(vec![Op::delete(key)]))?;
            Ok((r.revision != before).then_some(r.revision))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.blocking(move |i| i.write(txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let prefix = prefix.to_string();
        // Subscribe under the write lock so no revision falls between the
        // history read and the live stream.
        let (mut live, current) = {
            let _g = self.inner.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            (self.inner.events.subscribe(), self.inner.revision()?)
        };
        let backlog = if from > 0 && from <= current {
            let p = prefix.clone();
            self.blocking(move |i| i.history(&p, from, current)).await?
        } else {
            vec![]
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            for ev in backlog {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(batch) => {
                        for ev in batch.iter() {
                            if ev.kv.mod_revision > current && ev.kv.key.starts_with(&prefix) && tx.send(Ok(ev.clone())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(StoreError::WatchLagged)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(WatchStream::new(rx))
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.blocking(|i| i.revision()).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.blocking(move |i| {
            let _g = i.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let w = i.db.begin_write().map_err(db_err("begin write"))?;
            let id = {
                let mut meta = w.open_table(META).map_err(db_err("open meta"))?;
                let id = meta.get("lease_seq").map_err(db_err("read meta"))?.map_or(0, |v| v.value()) + 1;
                meta.insert("lease_seq", id).map_err(db_err("write meta"))?;
                let mut t = w.open_table(LEASES).map_err(db_err("open leases"))?;
                t.insert(id as i64, ttl.as_millis() as u64).map_err(db_err("write lease"))?;
                id as i64
            };
            w.commit().map_err(db_err("commit"))?;
            i.leases.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (ttl, Instant::now() + ttl));
            Ok(id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut leases = self.inner.leases.lock().unwrap_or_else(|p| p.into_inner());
        let (ttl, deadline) = leases.get_mut(&lease).ok_or(StoreError::LeaseNotFound(lease))?;
        *deadline = Instant::now() + *ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if !self.inner.leases.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.blocking(move |i| i.revoke(lease)).await
    }
}

impl EmbeddedStore {
    /// Number of keys (for metrics).
    pub async fn key_count(&self) -> Result<u64> {
        self.blocking(|i| i.kv_count()).await
    }
}
