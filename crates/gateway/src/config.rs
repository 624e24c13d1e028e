//! Parsing multi-document YAML (Gateway API objects, TLS Secrets and fjord `StaticService`s)
//! into an [`ObjectSet`]. Parsing is all-or-nothing: one bad document refuses the whole input,
//! so a half-written file never replaces a working configuration.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::*;

/// All objects the gateway consumes, as given (not yet validated against each other).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectSet {
    pub gateway_classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub http_routes: Vec<HttpRoute>,
    pub reference_grants: Vec<ReferenceGrant>,
    pub secrets: Vec<Secret>,
    pub static_services: Vec<StaticService>,
    /// Namespaces, for their labels (`allowedRoutes.namespaces.from: Selector`).
    pub namespaces: Vec<Namespace>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}, document {index}: {message}")]
    Document { source_name: String, index: usize, message: String },
    #[error("cannot read config {path}: {source}; check that the path exists and is readable")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config {path}: no *.yaml or *.yml files found; put Gateway API manifests there")]
    Empty { path: PathBuf },
    #[error("duplicate {kind} {key}: defined in {first} and again in {second}; each object must be defined once")]
    Duplicate { kind: &'static str, key: String, first: String, second: String },
}

/// Text of the kinds accepted, for error messages and --help.
pub const SUPPORTED_KINDS: &str = "gateway.networking.k8s.io/v1 GatewayClass, Gateway, HTTPRoute; \
gateway.networking.k8s.io/v1beta1 ReferenceGrant; v1 Secret (type kubernetes.io/tls), Namespace (labels); fjord.dev/v1alpha1 StaticService";

impl ObjectSet {
    /// Parse one YAML text (one or more `---`-separated documents) and add its objects.
    /// `source_name` (a file name) is used in error messages.
    pub fn add_yaml(&mut self, source_name: &str, text: &str) -> Result<(), ConfigError> {
        let mut staged = self.clone();
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            let index = i + 1;
            let err = |message: String| ConfigError::Document { source_name: source_name.to_string(), index, message };
            let value = serde_norway::Value::deserialize(doc).map_err(|e| err(format!("invalid YAML: {e}")))?;
            if value.is_null() {
                continue;
            }
            let serde_norway::Value::Mapping(mut map) = value else {
                return Err(err("expected a mapping with apiVersion, kind, metadata".into()));
            };
            let take_str = |map: &mut serde_norway::Mapping, field: &str| -> Result<String, ConfigError> {
                match map.remove(field) {
                    Some(serde_norway::Value::String(s)) => Ok(s),
                    Some(_) => Err(err(format!("field `{field}` must be a string"))),
                    None => Err(err(format!("missing field `{field}`"))),
                }
            };
            let api_version = take_str(&mut map, "apiVersion")?;
            let kind = take_str(&mut map, "kind")?;
            // `status` written by a controller is ignored on input.
            map.remove("status");
            let value = serde_norway::Value::Mapping(map);
            let what = format!("{kind} ({api_version})");
            let gw = |v: &str| v == "gateway.networking.k8s.io/v1" || v == "gateway.networking.k8s.io/v1beta1";
            match (api_version.as_str(), kind.as_str()) {
                (v, "GatewayClass") if gw(v) => staged.gateway_classes.push(de(value, &what).map_err(err)?),
                (v, "Gateway") if gw(v) => staged.gateways.push(de(value, &what).map_err(err)?),
                (v, "HTTPRoute") if gw(v) => staged.http_routes.push(de(value, &what).map_err(err)?),
                (v, "ReferenceGrant") if gw(v) => staged.reference_grants.push(de(value, &what).map_err(err)?),
                ("v1", "Secret") => staged.secrets.push(de(value, &what).map_err(err)?),
                ("v1", "Namespace") => staged.namespaces.push(de(value, &what).map_err(err)?),
                ("fjord.dev/v1alpha1", "StaticService") => staged.static_services.push(de(value, &what).map_err(err)?),
                _ => {
                    return Err(err(format!(
                        "unsupported object kind `{kind}` with apiVersion `{api_version}`; supported: {SUPPORTED_KINDS}"
                    )))
                }
            }
        }
        staged.check_duplicates(source_name)?;
        *self = staged;
        Ok(())
    }

    fn check_duplicates(&self, source_name: &str) -> Result<(), ConfigError> {
        fn dup(kind: &'static str, keys: impl Iterator<Item = String>, src: &str) -> Result<(), ConfigError> {
            let mut seen = std::collections::BTreeSet::new();
            for k in keys {
                if !seen.insert(k.clone()) {
                    return Err(ConfigError::Duplicate { kind, key: k, first: "an earlier document".into(), second: src.into() });
                }
            }
            Ok(())
        }
        // GatewayClass is cluster-scoped: key by name only.
        dup("GatewayClass", self.gateway_classes.iter().map(|o| o.metadata.name.clone()), source_name)?;
        dup("Gateway", self.gateways.iter().map(|o| o.metadata.key()), source_name)?;
        dup("HTTPRoute", self.http_routes.iter().map(|o| o.metadata.key()), source_name)?;
        dup("ReferenceGrant", self.reference_grants.iter().map(|o| o.metadata.key()), source_name)?;
        dup("Secret", self.secrets.iter().map(|o| o.metadata.key()), source_name)?;
        dup("StaticService", self.static_services.iter().map(|o| o.metadata.key()), source_name)?;
        dup("Namespace", self.namespaces.iter().map(|o| o.metadata.name.clone()), source_name)?;
        Ok(())
    }

    /// Parse a YAML string (all-or-nothing).
    pub fn from_yaml(source_name: &str, text: &str) -> Result<Self, ConfigError> {
        let mut s = ObjectSet::default();
        s.add_yaml(source_name, text)?;
        Ok(s)
    }

    /// Load a file, or every `*.yaml`/`*.yml` file of a directory (sorted by name, not recursive).
    pub fn load_path(path: &Path) -> Result<Self, ConfigError> {
        let files = config_files(path)?;
        let mut s = ObjectSet::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| ConfigError::Io { path: f.clone(), source })?;
            s.add_yaml(&f.display().to_string(), &text)?;
        }
        Ok(s)
    }
}

/// The files `load_path` would read.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let md = std::fs::metadata(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    if md.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let rd = std::fs::read_dir(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    for e in rd {
        let e = e.map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        let p = e.path();
        let ok = matches!(p.extension().and_then(|x| x.to_str()), Some("yaml") | Some("yml"));
        let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if ok && !hidden && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::Empty { path: path.to_path_buf() });
    }
    Ok(files)
}

fn de<T: DeserializeOwned>(value: serde_norway::Value, what: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            format!("{what}: {inner}")
        } else {
            format!("{what}: field `{path}`: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_route_and_reports_unknown_field_with_path() {
        let y = crate::SEED_HTTPROUTE;
        let s = ObjectSet::from_yaml("t.yaml", y).unwrap();
        assert_eq!(s.http_routes.len(), 1);
        assert_eq!(s.http_routes[0].spec.rules[0].backend_refs[0].weight, Some(90));

        let bad = y.replace("weight: 10", "wieght: 10");
        let e = ObjectSet::from_yaml("t.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("t.yaml, document 1"), "{e}");
        assert!(e.contains("spec.rules[0].backendRefs[1]"), "{e}");
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn unknown_kind_and_missing_fields_are_refused_whole() {
        let mut s = ObjectSet::default();
        let y = "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {name: a}\nspec: {ports: []}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        let e = s.add_yaml("f", y).unwrap_err().to_string();
        assert!(e.contains("document 2") && e.contains("ConfigMap"), "{e}");
        assert!(s.static_services.is_empty(), "nothing half-applied");
        let e = ObjectSet::from_yaml("f", "kind: Gateway\n").unwrap_err().to_string();
        assert!(e.contains("apiVersion"), "{e}");
        let e = ObjectSet::from_yaml("f", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {listeners: []}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gatewayClassName"), "{e}");
    }

    #[test]
    fn duplicates_are_refused() {
        let y = "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {name: a}\nspec: {ports: []}\n";
        let e = ObjectSet::from_yaml("f", &format!("{y}---\n{y}")).unwrap_err().to_string();
        assert!(e.contains("duplicate StaticService default/a"), "{e}");
    }

    #[test]
    fn loads_directory_sorted_and_errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.yaml"), "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {name: b}\nspec: {ports: []}\n").unwrap();
        std::fs::write(d.path().join("a.yml"), "apiVersion: fjord.dev/v1alpha1\nkind: StaticService\nmetadata: {name: a}\nspec: {ports: []}\n").unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let s = ObjectSet::load_path(d.path()).unwrap();
        let names: Vec<_> = s.static_services.iter().map(|s| s.metadata.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let e = ObjectSet::load_path(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(ObjectSet::load_path(empty.path()), Err(ConfigError::Empty { .. })));
    }
}
