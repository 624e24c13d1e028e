//! Watch lag in seconds: every agent writes a heartbeat (its wall clock in
//! milliseconds) under `/fjord/v1/heartbeats/<node>` with its node lease and
//! watches everyone's; the time between a peer's write and this agent seeing
//! it is the store's write → watch delivery lag, the first leg of every
//! convergence (`fjord_store_watch_lag_seconds`). Clock skew between machines
//! adds to it (dev clusters share one clock). One small write per node every
//! `--heartbeat-interval`.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjord_model::keys;
use fjord_store::{EventKind, Store};
use tracing::{debug, warn};

use crate::agent::Agent;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Writes this node's heartbeat every `every` (once the node lease exists).
pub async fn beat(store: Arc<dyn Store>, node: String, lease: Arc<AtomicI64>, every: Duration) {
    let key = keys::heartbeat(&node);
    loop {
        let l = lease.load(Ordering::Relaxed);
        if l != 0 {
            if let Err(e) = store.put(&key, now_ms().to_string().into_bytes(), Some(l)).await {
                debug!(error = %e, "heartbeat not written (store unreachable or lease renewing)");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Watches every other node's heartbeat and records the lag.
pub async fn watch(agent: Arc<Agent>) {
    let (store, metrics) = (agent.store.clone(), &agent.metrics);
    let mine = keys::heartbeat(&agent.node);
    let mut backoff = Duration::from_millis(200);
    loop {
        let r: anyhow::Result<()> = async {
            let mut w = store.watch(&keys::heartbeats_prefix(), 0).await?;
            backoff = Duration::from_millis(200);
            while let Some(ev) = w.recv().await {
                let ev = ev?;
                if ev.kind != EventKind::Put || ev.kv.key == mine {
                    continue;
                }
                let Some(sent) = std::str::from_utf8(&ev.kv.value).ok().and_then(|s| s.parse::<i64>().ok()) else { continue };
                let lag = (now_ms() - sent).max(0) as f64 / 1000.0;
                metrics.watch_lag_seconds.observe(lag);
                metrics.watch_last_lag_seconds.set(lag);
            }
            anyhow::bail!("heartbeat watch ended")
        }
        .await;
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), "heartbeat watch interrupted; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
