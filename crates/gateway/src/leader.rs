//! Leader election on fjord's store: one status writer among several gateway instances.
//!
//! Every instance (`fjord-agent --gateway`, `fjord-gateway --store`) serves traffic; only the
//! holder of the lease key (by default [`STATUS_LEASE_KEY`]) writes Gateway API status. The
//! semantics follow Kubernetes' `coordination.k8s.io` Lease as used by client-go's leader
//! election, with the expiry done by the store's own lease instead of clock comparisons:
//!
//! * **acquire**: one transaction `Compare::absent(key)` → `put(key, record, lease)` where the
//!   store lease has the TTL `leaseDurationSeconds`. Exactly one candidate wins.
//! * **renew**: the holder keeps the store lease alive every TTL/3 and checks the key is still
//!   its own. If it cannot renew for 2/3 of the TTL (client-go's `renewDeadline`) it steps down
//!   on its own, before the store expires the key, so two holders never overlap in time.
//! * **loss / take-over**: when the holder stops (crash, SIGKILL, partition), the store deletes
//!   the key after the TTL; the others watch the key and race for it on the delete. A holder
//!   that shuts down cleanly resigns (revokes the lease): the hand-over is immediate.
//! * **fencing**: the holder's writes carry [`Fence::compare`] (the key's create revision is
//!   still the one it created), so a deposed holder that did not notice yet cannot write.
//!
//! The record (JSON) says who holds it: `holderIdentity`, `leaseDurationSeconds`,
//! `acquireTime`, `leaseTransitions` (the number of earlier holders this candidate saw).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fjord_store::{Compare, EventKind, LeaseId, Op, Revision, Store, Txn};
use tokio::sync::watch;

/// The lease that elects the Gateway API status writer.
pub const STATUS_LEASE_KEY: &str = "/fjord/v1/leases/gateway-status";

/// What the holder of a lease key may attach to its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    /// The create revision of the holder's lease key.
    pub create_revision: Revision,
}

impl Fence {
    /// Holds only while the lease key is still the one this holder created.
    pub fn compare(&self) -> Compare {
        Compare::CreateRevision(self.key.clone(), self.create_revision)
    }
}

/// The lease record stored under the key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    pub holder_identity: String,
    pub lease_duration_seconds: u64,
    pub acquire_time: String,
    #[serde(default)]
    pub lease_transitions: u64,
}

/// Read the current holder of `key` (None: nobody holds it).
pub async fn holder(store: &dyn Store, key: &str) -> fjord_store::Result<Option<LeaseRecord>> {
    Ok(store.get(key).await?.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

/// A candidate's view of the election: `Some(fence)` while it leads.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<Option<Fence>>,
}

impl Leadership {
    /// The fence while this candidate leads.
    pub fn current(&self) -> Option<Fence> {
        self.rx.borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Wait for the next change (acquired or lost). Pending forever once the elector stopped.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

/// A running candidate; see the module docs.
pub struct Elector {
    task: tokio::task::JoinHandle<()>,
    lease: Arc<std::sync::Mutex<Option<LeaseId>>>,
    store: Arc<dyn Store>,
    leadership: Leadership,
}

impl Elector {
    /// Start campaigning for `key` as `identity` with lease duration `ttl` (≥ 1 s; the store's
    /// lease granularity is seconds with etcd).
    pub fn spawn(store: Arc<dyn Store>, key: &str, identity: &str, ttl: Duration) -> Elector {
        let (tx, rx) = watch::channel(None);
        let lease = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(campaign(store.clone(), key.to_string(), identity.to_string(), ttl, tx, lease.clone()));
        Elector { task, lease, store, leadership: Leadership { rx } }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Stop campaigning and give up the lease at once (clean shutdown: the next candidate takes
    /// over without waiting for the TTL).
    pub async fn resign(self) {
        self.task.abort();
        let _ = self.task.await;
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(l) = lease {
            if let Err(e) = self.store.revoke_lease(l).await {
                tracing::debug!(lease = l, error = %e, "revoking the leader lease");
            }
        }
    }

    /// Stop campaigning without touching the store, as a crashed process would: the lease
    /// expires after its TTL.
    pub fn abandon(self) {
        self.task.abort();
    }
}

fn now_rfc3339() -> String {
    fjord_model::objects::rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

async fn campaign(
    store: Arc<dyn Store>,
    key: String,
    identity: String,
    ttl: Duration,
    tx: watch::Sender<Option<Fence>>,
    lease_slot: Arc<std::sync::Mutex<Option<LeaseId>>>,
) {
    let renew_every = ttl / 3;
    let renew_deadline = ttl * 2 / 3;
    let mut transitions: u64 = 0;
    let mut last_holder: Option<String> = None;
    loop {
        // --- wait until nobody holds the key
        match store.get(&key).await {
            Err(e) => {
                tracing::warn!(key, error = %e, "leader election: reading the lease failed; retrying");
                tokio::time::sleep(renew_every).await;
                continue;
            }
            Ok(Some(kv)) => {
                if let Ok(r) = serde_json::from_slice::<LeaseRecord>(&kv.value) {
                    if last_holder.as_deref() != Some(&r.holder_identity) {
                        tracing::info!(key, holder = r.holder_identity, "leader election: following the current holder");
                        transitions = transitions.max(r.lease_transitions);
                        last_holder = Some(r.holder_identity);
                    }
                }
                wait_for_delete(store.as_ref(), &key, kv.mod_revision, ttl).await;
                continue;
            }
            Ok(None) => {}
        }
        // --- try to acquire
        let lease = match store.grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(key, error = %e, "leader election: granting a lease failed; retrying");
                tokio::time::sleep(renew_every).await;
                continue;
            }
        };
        let rec = LeaseRecord {
            holder_identity: identity.clone(),
            lease_duration_seconds: ttl.as_secs().max(1),
            acquire_time: now_rfc3339(),
            lease_transitions: transitions + u64::from(last_holder.is_some()),
        };
        let txn = Txn::when(vec![Compare::absent(&key)])
            .and_then(vec![Op::Put { key: key.clone(), value: serde_json::to_vec(&rec).expect("JSON"), lease: Some(lease) }]);
        let won = match store.txn(txn).await {
            Ok(r) => r.succeeded,
            Err(e) => {
                tracing::warn!(key, error = %e, "leader election: acquire transaction failed");
                false
            }
        };
        if !won {
            let _ = store.revoke_lease(lease).await;
            continue;
        }
        let created = match store.get(&key).await {
            Ok(Some(kv)) if kv.lease == lease => kv.create_revision,
            _ => {
                // Lost already (expired in between or deleted); start over.
                let _ = store.revoke_lease(lease).await;
                continue;
            }
        };
        *lease_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        transitions = rec.lease_transitions;
        last_holder = Some(identity.clone());
        tracing::info!(key, identity, lease_transitions = transitions, "leader election: acquired; this instance writes status");
        let _ = tx.send(Some(Fence { key: key.clone(), create_revision: created }));

        // --- hold: renew until it fails for longer than the renew deadline
        let mut last_ok = Instant::now();
        let mut wait = renew_every;
        let reason = loop {
            tokio::time::sleep(wait).await;
            match store.keep_alive(lease).await {
                Ok(()) => match store.get(&key).await {
                    Ok(Some(kv)) if kv.create_revision == created => {
                        last_ok = Instant::now();
                        wait = renew_every;
                        continue;
                    }
                    Ok(_) => break "the lease key was deleted or taken over",
                    Err(e) => tracing::warn!(key, error = %e, "leader election: checking the lease failed"),
                },
                Err(fjord_store::StoreError::LeaseNotFound(_)) => break "the lease expired",
                Err(e) => tracing::warn!(key, error = %e, "leader election: renewing the lease failed"),
            }
            if last_ok.elapsed() >= renew_deadline {
                break "could not renew within the renew deadline";
            }
            wait = (renew_every / 4).max(Duration::from_millis(100));
        };
        tracing::warn!(key, identity, reason, "leader election: lost the lease; this instance stops writing status");
        let _ = tx.send(None);
        lease_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = store.revoke_lease(lease).await;
    }
}

/// Wait until `key` is deleted after revision `seen` (or `ttl` passes: then the caller looks
/// again, which also covers a watch that cannot be opened).
async fn wait_for_delete(store: &dyn Store, key: &str, seen: Revision, ttl: Duration) {
    let Ok(mut w) = store.watch(key, seen + 1).await else {
        tokio::time::sleep(ttl / 3).await;
        return;
    };
    let _ = tokio::time::timeout(ttl, async {
        while let Some(Ok(ev)) = w.recv().await {
            if ev.kv.key == key && ev.kind == EventKind::Delete {
                return;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s = fjord_store::open(&format!("embedded:{}", dir.path().join("s.redb").display())).await.unwrap();
        (dir, s)
    }

    async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_takeover_after_ttl_and_immediate_on_resign() {
        let (_d, s) = store().await;
        let ttl = Duration::from_secs(2);
        let a = Elector::spawn(s.clone(), "/fjord/v1/leases/t", "a", ttl);
        let b = Elector::spawn(s.clone(), "/fjord/v1/leases/t", "b", ttl);
        let (la, lb) = (a.leadership(), b.leadership());
        assert!(wait_until(Duration::from_secs(10), || la.is_leader() || lb.is_leader()).await, "nobody leads");
        // never both, across several renewals (sampled), and one leads at the end
        let t0 = Instant::now();
        while t0.elapsed() < ttl * 2 {
            assert!(!(la.is_leader() && lb.is_leader()), "two leaders");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(wait_until(Duration::from_secs(10), || la.is_leader() ^ lb.is_leader()).await, "a {} b {}", la.is_leader(), lb.is_leader());
        let (leader, follower, lf) = if la.is_leader() { (a, b, lb) } else { (b, a, la) };
        let first = holder(s.as_ref(), "/fjord/v1/leases/t").await.unwrap().unwrap();
        assert_eq!(first.lease_transitions, 0);
        assert_eq!(first.lease_duration_seconds, 2);
        // the leader "crashes": the follower takes over once the store expired the lease
        leader.abandon();
        let t0 = Instant::now();
        assert!(wait_until(Duration::from_secs(15), || lf.is_leader()).await, "no take-over");
        let took = t0.elapsed();
        println!("take-over after the leader stopped: {:.2} s (TTL {} s)", took.as_secs_f64(), ttl.as_secs());
        let rec = holder(s.as_ref(), "/fjord/v1/leases/t").await.unwrap().unwrap();
        assert_ne!(rec.holder_identity, first.holder_identity);
        assert_eq!(rec.lease_transitions, 1);
        // a third candidate follows; the leader resigns: the hand-over needs no TTL wait
        let c = Elector::spawn(s.clone(), "/fjord/v1/leases/t", "c", Duration::from_secs(30));
        let lc = c.leadership();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!lc.is_leader());
        follower.resign().await;
        assert!(wait_until(Duration::from_secs(10), || lc.is_leader()).await, "no hand-over after resign");
        assert_eq!(holder(s.as_ref(), "/fjord/v1/leases/t").await.unwrap().unwrap().holder_identity, "c");
        c.resign().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_is_fenced_and_steps_down() {
        let (_d, s) = store().await;
        let a = Elector::spawn(s.clone(), "/fjord/v1/leases/f", "a", Duration::from_secs(3));
        let mut la = a.leadership();
        assert!(wait_until(Duration::from_secs(10), || la.is_leader()).await);
        let fence = la.current().unwrap();
        let write = |f: Fence| {
            let s = s.clone();
            async move { s.txn(Txn::when(vec![f.compare()]).and_then(vec![Op::put("/x", b"1".to_vec())])).await.unwrap().succeeded }
        };
        assert!(write(fence.clone()).await);
        // someone removes the key (an operator, or the lease expired while partitioned) and
        // another candidate takes it: the old fence no longer holds
        s.delete("/fjord/v1/leases/f").await.unwrap();
        let l2 = s.grant_lease(Duration::from_secs(30)).await.unwrap();
        s.put("/fjord/v1/leases/f", b"{\"holderIdentity\":\"z\",\"leaseDurationSeconds\":30,\"acquireTime\":\"\"}".to_vec(), Some(l2)).await.unwrap();
        assert!(!write(fence).await, "a deposed leader's write must fail");
        // and the old leader notices at its next renewal
        let t0 = Instant::now();
        while la.is_leader() && t0.elapsed() < Duration::from_secs(10) {
            tokio::time::timeout(Duration::from_secs(1), la.changed()).await.ok();
        }
        assert!(!la.is_leader());
        a.abandon();
    }
}
