//! Helpers for fjord-gateway's tests (unit and integration); not used by the gateway itself.

use fjord_model::keys;
use fjord_model::objects::{parse_manifests_with, Object, ValidationContext};
use fjord_store::{Op, Store, Txn};

/// Write manifests to `store` in one transaction, as `fjordctl apply` does: Services and
/// EndpointSlices as they are, Gateway API objects with `generation`/`creationTimestamp` carried
/// over from what the store already holds (`now` for new ones).
pub async fn put_manifests(store: &dyn Store, text: &str, now: &str) {
    let objs = parse_manifests_with(text, &ValidationContext::default(), Some(&crate::manifest::GatewayKinds)).expect("test manifests are valid");
    let mut ops = vec![];
    for o in objs {
        let (k, v) = match &o {
            Object::Service(s) => (keys::service(&s.metadata.namespace, &s.metadata.name), serde_json::to_vec(s).unwrap()),
            Object::EndpointSlice(e) => (keys::endpointslice(&e.metadata.namespace, &e.metadata.name), serde_json::to_vec(e).unwrap()),
            Object::Extension(x) => {
                let mut x = x.clone();
                let key = keys::object(keys::resource_of_kind(&x.kind).unwrap(), x.namespace.as_deref().unwrap_or(""), &x.name);
                let prev: Option<serde_json::Value> = store.get(&key).await.unwrap().map(|kv| serde_json::from_slice(&kv.value).unwrap());
                x.carry_over(prev.as_ref(), now);
                (key, serde_json::to_vec(&x.value).unwrap())
            }
        };
        ops.push(Op::put(k, v));
    }
    store.txn(Txn::when(vec![]).and_then(ops)).await.unwrap();
}
