//! The etcd backend (v3 API via the `etcd-client` crate), for cluster mode.
//!
//! The [`Store`] trait is etcd's model, so this is a direct mapping: one store
//! revision is one etcd revision; `txn` is an etcd `Txn` with `EQUAL` compares;
//! watches start at a revision and a compacted start revision is reported as
//! [`StoreError::Compacted`] (the caller re-lists; no event is ever silently
//! skipped); leases are etcd leases. Works with etcd 3.4 (Debian's
//! `etcd-server`) and 3.5. TLS (CA, client certificate) and username/password
//! are supported through [`EtcdOptions`].

use crate::*;
use etcd_client as ec;

/// How to reach and authenticate to etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Endpoints, e.g. `http://127.0.0.1:2379` (several for a cluster).
    pub endpoints: Vec<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per-request timeout (default 5 s).
    pub timeout: Option<Duration>,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: ec::Client,
    endpoints: String,
}

fn err(context: &'static str) -> impl Fn(ec::Error) -> StoreError {
    move |e| {
        let message = match &e {
            ec::Error::GRpcStatus(s) => format!("{} ({:?})", s.message(), s.code()),
            other => other.to_string(),
        };
        StoreError::Database { context, message }
    }
}

fn revision_of(h: Option<&ec::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision())
}

fn kv_of(kv: &ec::KeyValue) -> Result<KeyValue> {
    let key = kv.key_str().map_err(|_| StoreError::Corrupt { key: String::from_utf8_lossy(kv.key()).into(), reason: "key is not UTF-8".into() })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn read_file(what: &str, p: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|source| StoreError::Io { path: format!("{what} {}", p.display()), source })
}

impl EtcdStore {
    /// Connect (the first request is made here, so a wrong address, TLS or
    /// password fails now with a clear error rather than later).
    pub async fn connect(o: &EtcdOptions) -> Result<EtcdStore> {
        if o.endpoints.is_empty() {
            return Err(StoreError::BadUrl { url: String::new(), reason: "no etcd endpoints given".into() });
        }
        let timeout = o.timeout.unwrap_or(Duration::from_secs(5));
        let mut opts = ec::ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout).with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&o.username, &o.password) {
            opts = opts.with_user(u.clone(), p.clone());
        } else if o.username.is_some() != o.password.is_some() {
            return Err(StoreError::BadUrl { url: o.endpoints.join(","), reason: "etcd username and password go together".into() });
        }
        let uses_tls = o.ca_file.is_some() || o.cert_file.is_some() || o.endpoints.iter().any(|e| e.starts_with("https://"));
        if uses_tls {
            let mut tls = ec::TlsOptions::new();
            if let Some(ca) = &o.ca_file {
                tls = tls.ca_certificate(ec::Certificate::from_pem(read_file("etcd CA file", ca)?));
            }
            match (&o.cert_file, &o.key_file) {
                (Some(c), Some(k)) => tls = tls.identity(ec::Identity::from_pem(read_file("etcd client certificate", c)?, read_file("etcd client key", k)?)),
                (None, None) => {}
                _ => return Err(StoreError::BadUrl { url: o.endpoints.join(","), reason: "etcd client certificate and key go together".into() }),
            }
            opts = opts.with_tls(tls);
        }
        let endpoints = o.endpoints.join(",");
        let mut client = ec::Client::connect(&o.endpoints, Some(opts)).await.map_err(|e| StoreError::Database {
            context: "connect",
            message: format!("cannot reach etcd at {endpoints}: {e}"),
        })?;
        // Prove the connection (and credentials) now.
        client.get("/fjord/v1/", Some(ec::GetOptions::new().with_count_only())).await.map_err(|e| StoreError::Database {
            context: "connect",
            message: format!("etcd at {endpoints} refused a read: {}", match &e {
                ec::Error::GRpcStatus(s) => s.message().to_string(),
                other => other.to_string(),
            }),
        })?;
        Ok(EtcdStore { client, endpoints })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }
}

fn compare_of(c: &Compare) -> ec::Compare {
    use ec::CompareOp::Equal;
    match c {
        Compare::ModRevision(k, r) => ec::Compare::mod_revision(k.as_str(), Equal, *r),
        Compare::CreateRevision(k, r) => ec::Compare::create_revision(k.as_str(), Equal, *r),
        Compare::Version(k, v) => ec::Compare::version(k.as_str(), Equal, *v),
        Compare::Value(k, v) => ec::Compare::value(k.as_str(), Equal, v.clone()),
    }
}

fn op_of(o: &Op) -> ec::TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            let opts = lease.filter(|l| *l != 0).map(|l| ec::PutOptions::new().with_lease(l));
            ec::TxnOp::put(key.as_str(), value.clone(), opts)
        }
        Op::Delete { key } => ec::TxnOp::delete(key.as_str(), None),
    }
}

fn lease_err(lease: LeaseId) -> impl Fn(ec::Error) -> StoreError {
    move |e| match &e {
        ec::Error::GRpcStatus(s) if s.message().contains("lease not found") => StoreError::LeaseNotFound(lease),
        ec::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => StoreError::LeaseNotFound(lease),
        _ => err("lease")(e),
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self.client.clone().get(key, None).await.map_err(err("get"))?;
        r.kvs().first().map(kv_of).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<ListResponse> {
        let r = self.client.clone().get(prefix, Some(ec::GetOptions::new().with_prefix())).await.map_err(err("list"))?;
        let mut kvs = Vec::with_capacity(r.kvs().len());
        for kv in r.kvs() {
            kvs.push(kv_of(kv)?);
        }
        Ok(ListResponse { kvs, revision: revision_of(r.header()) })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let opts = lease.filter(|l| *l != 0).map(|l| ec::PutOptions::new().with_lease(l));
        let r = self.client.clone().put(key, value, opts).await.map_err(lease_err(lease.unwrap_or(0)))?;
        Ok(revision_of(r.header()))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let r = self.client.clone().delete(key, None).await.map_err(err("delete"))?;
        Ok((r.deleted() > 0).then(|| revision_of(r.header())))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let t = ec::Txn::new()
            .when(txn.compares.iter().map(compare_of).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op_of).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op_of).collect::<Vec<_>>());
        let r = self.client.clone().txn(t).await.map_err(err("txn"))?;
        Ok(TxnResponse { succeeded: r.succeeded(), revision: revision_of(r.header()) })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let mut opts = ec::WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let mut stream = self.client.clone().watch(prefix, Some(opts)).await.map_err(err("watch"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            let _ = tx.send(Err(StoreError::Compacted { requested: from, compacted: resp.compact_revision() })).await;
                            return;
                        }
                        if resp.canceled() {
                            let _ = tx.send(Err(StoreError::Database { context: "watch", message: format!("etcd canceled the watch: {}", resp.cancel_reason()) })).await;
                            return;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let item = kv_of(kv).map(|kv| WatchEvent {
                                kind: match ev.event_type() {
                                    ec::EventType::Put => EventKind::Put,
                                    ec::EventType::Delete => EventKind::Delete,
                                },
                                kv,
                            });
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Err(StoreError::Database { context: "watch", message: "etcd closed the watch stream".into() })).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(err("watch")(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(WatchStream::new(rx))
    }

    async fn current_revision(&self) -> Result<Revision> {
        let r = self.client.clone().get("/fjord/v1/", Some(ec::GetOptions::new().with_count_only())).await.map_err(err("revision"))?;
        Ok(revision_of(r.header()))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let r = self.client.clone().lease_grant(secs, None).await.map_err(err("lease grant"))?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let (mut keeper, mut stream) = self.client.clone().lease_keep_alive(lease).await.map_err(lease_err(lease))?;
        keeper.keep_alive().await.map_err(lease_err(lease))?;
        match stream.message().await.map_err(lease_err(lease))? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.client.clone().lease_revoke(lease).await.map_err(lease_err(lease))?;
        Ok(())
    }
}
