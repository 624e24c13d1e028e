//! The Gateway API kinds for `fjordctl apply`: [`GatewayKinds`] plugs this crate's parser and
//! validation into `fjord_model::objects::parse_manifests_with`.
//!
//! Dependency direction: fjord-gateway depends on fjord-model (Services, EndpointSlices and the
//! store key layout feed the proxy), so the model cannot call into the gateway; instead it
//! defines the [`ExtensionKinds`] trait and the agent passes [`GatewayKinds`] to it. One parser
//! and one set of rules serve both the standalone YAML mode and the store.
//!
//! What is refused here (the object is wrong on its own): unknown fields, wrong types, invalid
//! regular expressions, unsupported filter/match types, bad weights, timeouts, hostnames,
//! listener protocols, duplicate listener names, Secrets that are not valid `kubernetes.io/tls`.
//! What depends on other objects (missing Services, cross-namespace references without a
//! ReferenceGrant, listener conflicts, ports that cannot be bound) is reported as status
//! conditions by the controller.

use fjord_model::objects::{ExtObject, ExtensionKinds, FieldError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::*;

pub const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
pub const GATEWAY_V1BETA1: &str = "gateway.networking.k8s.io/v1beta1";

/// The Gateway API kinds (and TLS Secrets) for `parse_manifests_with`.
pub struct GatewayKinds;

impl ExtensionKinds for GatewayKinds {
    fn api_versions(&self, kind: &str) -> Option<&'static [&'static str]> {
        match kind {
            "GatewayClass" | "Gateway" | "HTTPRoute" => Some(&[GATEWAY_V1]),
            "ReferenceGrant" => Some(&[GATEWAY_V1BETA1, GATEWAY_V1]),
            "Secret" => Some(&["v1"]),
            _ => None,
        }
    }

    fn cluster_scoped(&self, kind: &str) -> bool {
        kind == "GatewayClass"
    }

    fn describe(&self) -> &'static str {
        "GatewayClass, Gateway, HTTPRoute (apiVersion gateway.networking.k8s.io/v1), ReferenceGrant \
         (gateway.networking.k8s.io/v1beta1) and Secret (v1, type kubernetes.io/tls)"
    }

    fn validate(&self, api_version: &str, kind: &str, value: serde_norway::Value) -> Result<ExtObject, FieldError> {
        let mut value = value;
        if let serde_norway::Value::Mapping(m) = &mut value {
            m.remove("apiVersion");
            m.remove("kind");
            // status belongs to the controller; it is ignored on input
            m.remove("status");
        }
        let (meta, json) = match kind {
            "GatewayClass" => {
                let o: GatewayClass = typed(value)?;
                (o.metadata.clone(), canonical(&o))
            }
            "Gateway" => {
                let o: Gateway = typed(value)?;
                crate::table::validate_gateway(&o).map_err(split)?;
                (o.metadata.clone(), canonical(&o))
            }
            "HTTPRoute" => {
                let o: HttpRoute = typed(value)?;
                crate::table::validate_route(&o).map_err(split)?;
                (o.metadata.clone(), canonical(&o))
            }
            "ReferenceGrant" => {
                let o: ReferenceGrant = typed(value)?;
                (o.metadata.clone(), canonical(&o))
            }
            "Secret" => {
                let o: Secret = typed(value)?;
                match o.type_.as_deref() {
                    Some("kubernetes.io/tls") => {}
                    other => {
                        return Err(FieldError {
                            field: "type".into(),
                            reason: format!(
                                "Secret type {:?} is not stored by fjord; only `type: kubernetes.io/tls` Secrets (for Gateway listeners) are accepted",
                                other.unwrap_or("Opaque")
                            ),
                        })
                    }
                }
                crate::tls::certified_key_from_secret(&o)
                    .map_err(|e| FieldError { field: "data".into(), reason: format!("{e}; give a PEM certificate chain and its private key") })?;
                (o.metadata.clone(), canonical(&o))
            }
            other => return Err(FieldError { field: "kind".into(), reason: format!("kind {other} is not handled by fjord-gateway") }),
        };
        let cluster = self.cluster_scoped(kind);
        let mut json = json;
        if let Some(obj) = json.as_object_mut() {
            obj.insert("apiVersion".into(), api_version.into());
            obj.insert("kind".into(), kind.into());
            if !cluster {
                if let Some(m) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    m.insert("namespace".into(), meta.ns().into());
                }
            }
        }
        Ok(ExtObject {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            namespace: (!cluster).then(|| meta.ns().to_string()),
            name: meta.name.clone(),
            value: json,
        })
    }
}

fn typed<T: DeserializeOwned>(value: serde_norway::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError { field: if path == "." { String::new() } else { path }, reason: e.into_inner().to_string() }
    })
}

fn canonical<T: Serialize>(o: &T) -> serde_json::Value {
    serde_json::to_value(o).expect("Gateway API objects serialize to JSON")
}

/// `spec.rules[0].x: reason` → field and reason.
fn split(msg: String) -> FieldError {
    match msg.split_once(": ") {
        Some((f, r)) if !f.contains(' ') => FieldError { field: f.to_string(), reason: r.to_string() },
        _ => FieldError { field: String::new(), reason: msg },
    }
}

/// Decode a stored Gateway API object (JSON with apiVersion and kind) into its type.
pub fn decode_stored<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        m.remove("status");
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjord_model::objects::{parse_manifests_with, Object, ValidationContext};

    const SEED: &str = concat!(
    r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: fjord}
spec: {controllerName: fjord.dev/gateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: external-gateway, namespace: backend}
spec:
  gatewayClassName: fjord
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
---
"#,
    crate::seed_httproute!(),
    r#"---
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: backend}
spec:
  selector: {app: v1}
  ports: [{port: 8080}]
"#
);

    fn parse(text: &str) -> Result<Vec<Object>, fjord_model::objects::ManifestError> {
        parse_manifests_with(text, &ValidationContext::default(), Some(&GatewayKinds))
    }

    #[test]
    fn seed_with_services_parses_and_round_trips_through_the_store_form() {
        let objs = parse(SEED).unwrap();
        let keys: Vec<String> = objs.iter().map(|o| o.key()).collect();
        assert_eq!(
            keys,
            ["GatewayClass/fjord", "Gateway/backend/external-gateway", "HTTPRoute/backend/production-traffic-split", "Service/backend/backend-v1"]
        );
        let Object::Extension(r) = &objs[2] else { panic!() };
        assert_eq!(r.value["apiVersion"], GATEWAY_V1);
        let back: HttpRoute = decode_stored(&serde_json::to_vec(&r.value).unwrap()).unwrap();
        assert_eq!(back.spec.rules[0].backend_refs[1].weight, Some(10));
        assert_eq!(back.metadata.namespace.as_deref(), Some("backend"));
    }

    #[track_caller]
    fn refused(text: &str, document: usize, field: &str, word: &str) {
        let e = parse(text).expect_err("must be refused");
        assert_eq!(e.document, document, "{e}");
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(word), "{word:?} in {e}");
    }

    #[test]
    fn invalid_objects_are_refused_naming_document_field_and_reason() {
        // invalid regex
        let t = SEED.replace("type: PathPrefix\n        value: /api/v2", "type: RegularExpression\n        value: /api/(v2");
        refused(&t, 3, "spec.rules[0].matches[0].path.value", "invalid regular expression");
        // unknown filter type
        let t = SEED.replace("    backendRefs:\n    - name: backend-v1", "    filters:\n    - type: Teleport\n    backendRefs:\n    - name: backend-v1");
        refused(&t, 3, "spec.rules[0].filters[0].type", "unsupported filter type `Teleport`");
        // bad weights
        refused(&SEED.replace("weight: 90", "weight: -1"), 3, "spec.rules[0].backendRefs[0].weight", "invalid value");
        refused(&SEED.replace("weight: 90", "weight: 2000000"), 3, "spec.rules[0].backendRefs[0].weight", "exceeds");
        // unknown field (typo)
        refused(&SEED.replace("weight: 10", "wieght: 10"), 3, "spec.rules[0].backendRefs[1].wieght", "unknown field");
        // listener protocol, duplicate names
        refused(&SEED.replace("protocol: HTTP}", "protocol: UDP}"), 2, "spec.listeners[0]", "not supported");
        let t = SEED.replace("  - {name: http, port: 8080, protocol: HTTP}", "  - {name: http, port: 8080, protocol: HTTP}\n  - {name: http, port: 8081, protocol: HTTP}");
        refused(&t, 2, "spec.listeners[1]", "duplicate listener name");
        refused(&SEED.replace("port: 8080, protocol", "port: 0, protocol"), 2, "spec.listeners[0].port", "not a valid port");
        // GatewayClass is cluster-scoped
        refused(&SEED.replace("metadata: {name: fjord}", "metadata: {name: fjord, namespace: x}"), 1, "metadata.namespace", "cluster-scoped");
        // Secrets: only valid TLS secrets
        let s = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: Opaque\ndata: {a: Yg==}\n";
        refused(s, 1, "type", "kubernetes.io/tls");
        let s = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\nstringData: {tls.crt: nope, tls.key: nope}\n";
        refused(s, 1, "data", "PEM");
        // apiVersion
        refused(&SEED.replace("v1\nkind: HTTPRoute", "v1alpha2\nkind: HTTPRoute"), 3, "apiVersion", "v1alpha2");
    }

    #[test]
    fn reference_grant_v1beta1_and_status_on_input_ignored() {
        let t = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: other}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: backend}]\n  to: [{group: \"\", kind: Service}]\nstatus: {anything: 1}\n";
        let o = parse(t).unwrap();
        assert_eq!(o[0].key(), "ReferenceGrant/other/g");
        let Object::Extension(x) = &o[0] else { panic!() };
        assert!(x.value.get("status").is_none());
    }
}
