//! Gateway API objects in the store (`apply`/`delete`/`get`) and the in-process gateway
//! (`fjord-agent --gateway`).
//!
//! Why in the agent: the embedded store (redb) can be opened by one process only, so on a
//! single-node cluster the only process that can watch the store is the agent itself. The
//! gateway runs on the agent's tokio runtime and store handle; with etcd, `fjord-gateway
//! --store etcd:...` runs the same controller as a separate process.

use fjord_model::cni::{code, CniError};
use fjord_model::keys;
use fjord_model::objects::ExtObject;
use fjord_store::{Op, Store};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn store_err(e: fjord_store::StoreError) -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, "the agent's store failed").details(e.to_string())
}

/// Store key of an extension object (`/fjord/v1/<resource>/[<ns>/]<name>`).
pub fn key_of(x: &ExtObject) -> String {
    let resource = keys::resource_of_kind(&x.kind).unwrap_or("unknown");
    keys::object(resource, x.namespace.as_deref().unwrap_or(""), &x.name)
}

/// The write for one applied object: keeps `creationTimestamp` and bumps `generation` when the
/// object changed (status conditions report it as `observedGeneration`).
pub async fn stage_put(store: &dyn Store, mut x: ExtObject) -> Result<Op, CniError> {
    let key = key_of(&x);
    let prev: Option<serde_json::Value> = store.get(&key).await.map_err(store_err)?.and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    x.carry_over(prev.as_ref(), &fjord_model::objects::rfc3339(now));
    Ok(Op::put(key, serde_json::to_vec(&x.value).expect("JSON")))
}

/// The resources `GET /v1/gatewayapi/{resource}` serves (Secrets are not listed: they hold keys).
pub const LISTABLE: [&str; 4] = ["gatewayclasses", "gateways", "httproutes", "referencegrants"];

/// Objects of a resource with their status (from `/fjord/v1/status/...`) merged in.
pub async fn list_with_status(store: &dyn Store, resource: &str) -> Result<Vec<serde_json::Value>, CniError> {
    if !LISTABLE.contains(&resource) {
        return Err(CniError::new(code::INVALID_CONFIG, format!("unknown resource {resource:?}; one of {}", LISTABLE.join(", "))));
    }
    let objs = store.list(&keys::resource_prefix(resource)).await.map_err(store_err)?;
    let status = store.list(&keys::status_prefix(resource)).await.map_err(store_err)?;
    let status: std::collections::HashMap<String, serde_json::Value> = status
        .kvs
        .iter()
        .filter_map(|kv| Some((kv.key.strip_prefix(&keys::status_prefix(resource))?.to_string(), serde_json::from_slice(&kv.value).ok()?)))
        .collect();
    let mut out = vec![];
    for kv in objs.kvs {
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&kv.value) else {
            tracing::warn!(key = kv.key, "skipping corrupt record");
            continue;
        };
        if let Some(s) = kv.key.strip_prefix(&keys::resource_prefix(resource)).and_then(|rest| status.get(rest)) {
            v["status"] = s.clone();
        }
        out.push(v);
    }
    Ok(out)
}

/// Start the gateway data plane and its store controller on this runtime. `listen` is the
/// address the listeners bind; `address` is what Gateways report in `status.addresses`.
/// Every agent with `--gateway` serves traffic; they elect one status writer among themselves
/// (and any `fjord-gateway --store`) with the lease [`fjord_gateway::leader::STATUS_LEASE_KEY`]
/// held as `identity` (the node name); each registers its address, and the writer lists all
/// of them in `Gateway.status.addresses`. Resign the returned elector on shutdown.
pub fn start(
    store: Arc<dyn Store>,
    listen: IpAddr,
    address: IpAddr,
    identity: &str,
    lease_ttl: Duration,
) -> (fjord_gateway::Gateway, fjord_gateway::leader::Elector) {
    let gw = fjord_gateway::Gateway::new(fjord_gateway::GatewayOptions { listen_ip: listen, ..Default::default() });
    let elector = fjord_gateway::leader::Elector::spawn(store.clone(), fjord_gateway::leader::STATUS_LEASE_KEY, identity, lease_ttl);
    let ctl = fjord_gateway::controller::Controller::new(store, gw.clone(), address).with_leadership(elector.leadership()).with_instance(identity, lease_ttl);
    tokio::spawn(ctl.run());
    (gw, elector)
}
