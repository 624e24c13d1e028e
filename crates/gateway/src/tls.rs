//! TLS termination: certificates from `kubernetes.io/tls` Secrets, SNI-based selection, ALPN.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::api::Secret;
use crate::matching::hostname_matches;

/// Read `tls.crt`/`tls.key` from a Secret (`stringData` wins over base64 `data`) and build a
/// signing key. Errors name the Secret and the key.
pub fn certified_key_from_secret(secret: &Secret) -> Result<Arc<CertifiedKey>, String> {
    let key = secret.metadata.key();
    if let Some(t) = &secret.type_ {
        if t != "kubernetes.io/tls" {
            return Err(format!("Secret {key} has type `{t}`, expected `kubernetes.io/tls`"));
        }
    }
    let get = |k: &str| -> Result<Vec<u8>, String> {
        if let Some(v) = secret.string_data.get(k) {
            return Ok(v.as_bytes().to_vec());
        }
        match secret.data.get(k) {
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v.split_whitespace().collect::<String>())
                .map_err(|e| format!("Secret {key} data `{k}` is not valid base64: {e}")),
            None => Err(format!("Secret {key} has no `{k}`; a TLS Secret needs tls.crt and tls.key")),
        }
    };
    let crt = get("tls.crt")?;
    let pk = get("tls.key")?;
    certified_key_from_pem(&crt, &pk).map_err(|e| format!("Secret {key}: {e}"))
}

/// Build a [`CertifiedKey`] from PEM certificate chain and PEM private key.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt is not a valid PEM certificate chain: {e:?}"))?;
    if certs.is_empty() {
        return Err("tls.crt contains no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key is not a valid PEM private key: {e:?}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key is not a supported key type: {e}"))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| format!("tls.key does not belong to the certificate in tls.crt: {e}"))?;
    Ok(Arc::new(ck))
}

/// Chooses a certificate by SNI among the HTTPS listeners of one port: exact hostname first,
/// then the longest wildcard, then a listener without hostname.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn add(&mut self, hostname: Option<&str>, key: Arc<CertifiedKey>) {
        match hostname {
            None => {
                self.default.get_or_insert(key);
            }
            Some(h) if h.starts_with('*') => {
                self.wildcard.push((h.to_string(), key));
                self.wildcard.sort_by_key(|(h, _)| std::cmp::Reverse(h.len()));
            }
            Some(h) => {
                self.exact.entry(h.to_string()).or_insert(key);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }

    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, k)) = self.wildcard.iter().find(|(p, _)| hostname_matches(p, &name)) {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// A rustls server config (ring provider, TLS 1.2 + 1.3, ALPN `h2` and `http/1.1`).
pub fn server_config(resolver: SniResolver) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
