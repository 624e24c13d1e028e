//! HTTPS listeners: TLS termination from kubernetes.io/tls Secrets, SNI per hostname, ALPN h2.
mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use fjord_gateway::api::find_condition;
use http_body_util::BodyExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;

/// Accepts any certificate but records it, so the test can check which one the server chose.
#[derive(Debug)]
struct Recorder {
    seen: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(&self, ee: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(ee.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn secret(name: &str, hosts: &[&str]) -> (String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    let indent = |s: String| s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    let y = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}\n  tls.key: |\n{}\n",
        indent(ck.cert.pem()),
        indent(ck.key_pair.serialize_pem())
    );
    (y, ck.cert.der().to_vec())
}

/// Connect with SNI `sni` and ALPN `alpn`; GET `path`; return (cert DER seen, HTTP version, body).
async fn fetch(port: u16, sni: &str, alpn: &[&str], path: &str) -> (Vec<u8>, http::Version, u16, Bytes) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rec = Arc::new(Recorder { seen: Mutex::new(None), provider: provider.clone() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(rec.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = http::Request::builder().uri(format!("https://{sni}{path}")).header("host", sni).body(empty()).unwrap();
    let resp = if h2 {
        let mut req = req;
        req.headers_mut().remove("host");
        let (mut s, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().unwrap();
        s.send_request(req).await.unwrap()
    };
    let v = resp.version();
    let st = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen = rec.seen.lock().unwrap().clone().expect("a certificate was presented");
    (seen, v, st, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_terminates_tls_with_sni_per_hostname_and_alpn_h2() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = echo("a", "default").await;
    let port = free_port();
    let (sa, der_a) = secret("cert-a", &["a.example.com"]);
    let (sw, der_w) = secret("cert-wild", &["*.wild.example"]);
    let gw = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: fjord}}
spec: {{controllerName: fjord.dev/gateway}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: fjord
  listeners:
  - {{name: a, port: {port}, protocol: HTTPS, hostname: a.example.com, tls: {{certificateRefs: [{{name: cert-a}}]}}}}
  - {{name: wild, port: {port}, protocol: HTTPS, hostname: "*.wild.example", tls: {{certificateRefs: [{{name: cert-wild}}]}}}}
  - {{name: broken, port: {port}, protocol: HTTPS, hostname: broken.example, tls: {{certificateRefs: [{{name: missing}}]}}}}
"#
    );
    let r = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec:\n  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: a, port: 80}]}]\n";
    let (_g, st) = gateway(&[gw, sa, sw, static_service("a", "default", 80, &[a]), r.to_string()]).await;
    let broken = &st.gateways["default/gw"].listeners[2];
    assert_eq!(find_condition(&broken.conditions, "ResolvedRefs").unwrap().reason, "InvalidCertificateRef");
    assert_eq!(st.gateways["default/gw"].listeners[0].attached_routes, 1);

    let (seen, v, status, body) = fetch(port, "a.example.com", &["h2", "http/1.1"], "/x").await;
    assert_eq!(seen, der_a, "SNI a.example.com gets cert-a");
    assert_eq!(v, http::Version::HTTP_2, "ALPN h2");
    assert_eq!(status, 200);
    let e: fjord_gateway::echo::EchoReply = serde_json::from_slice(&body).unwrap();
    assert_eq!(e.header("x-forwarded-proto"), Some("https"));
    assert_eq!(e.host, "a.example.com");

    let (seen, v, status, _) = fetch(port, "x.wild.example", &["http/1.1"], "/y").await;
    assert_eq!(seen, der_w, "wildcard listener's certificate");
    assert_eq!(v, http::Version::HTTP_11);
    assert_eq!(status, 200);
}

#[test]
fn bad_secret_contents_name_the_secret_and_key() {
    let (mut y, _) = secret("s", &["a.example"]);
    y = y.replace("BEGIN PRIVATE KEY", "BEGIN NONSENSE").replace("END PRIVATE KEY", "END NONSENSE");
    let objs = fjord_gateway::ObjectSet::from_yaml("t", &y).unwrap();
    let e = match fjord_gateway::tls::certified_key_from_secret(&objs.secrets[0]) {
        Err(e) => e,
        Ok(_) => panic!("bad key accepted"),
    };
    assert!(e.contains("default/s") && e.contains("tls.key"), "{e}");
    let objs = fjord_gateway::ObjectSet::from_yaml("t", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\ndata: {tls.crt: \"!!!\"}\n").unwrap();
    let e = fjord_gateway::tls::certified_key_from_secret(&objs.secrets[0]).err().unwrap();
    assert!(e.contains("base64") && e.contains("tls.crt"), "{e}");
}
