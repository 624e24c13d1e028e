//! A small client for the agent's API: HTTP/1.1 + JSON over a unix socket.
//! (See `fjord_model::api` for the endpoints.)

use fjord_model::api::*;
use fjord_model::cni::CniError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent not reachable at {socket}: {reason} (is fjord-agent running for this node?)")]
    Unreachable { socket: String, reason: String },
    #[error("agent at {socket} did not answer {what} within {secs} s")]
    Timeout { socket: String, what: String, secs: u64 },
    #[error("{0}")]
    Api(CniError),
    #[error("agent answered {what} with {status} and a body that is not valid JSON: {reason}")]
    Decode { what: String, status: u16, reason: String },
}

impl ClientError {
    /// The API's error, if the agent answered with one.
    pub fn api(&self) -> Option<&CniError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
    pub fn status_is_not_found(&self) -> bool {
        matches!(self, ClientError::Api(e) if e.code == fjord_model::cni::code::CONTAINER_UNKNOWN)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        AgentClient { socket: socket.as_ref().to_path_buf(), timeout: Duration::from_secs(30) }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request; decode a 2xx body as `T`, a non-2xx body as an API error.
    pub async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&(impl Serialize + ?Sized)>) -> Result<T> {
        let bytes = self.raw(method.clone(), path, body).await?;
        let (status, bytes) = bytes;
        let what = format!("{method} {path}");
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { what, status: status.as_u16(), reason: e.to_string() })
        } else {
            match serde_json::from_slice::<CniError>(&bytes) {
                Ok(e) => Err(ClientError::Api(e)),
                Err(e) => Err(ClientError::Decode {
                    what,
                    status: status.as_u16(),
                    reason: format!("{e}; body: {}", String::from_utf8_lossy(&bytes)),
                }),
            }
        }
    }

    /// Send one request and return status and body as they are.
    pub async fn raw(&self, method: Method, path: &str, body: Option<&(impl Serialize + ?Sized)>) -> Result<(StatusCode, Bytes)> {
        let socket = self.socket.display().to_string();
        let what = format!("{method} {path}");
        let fut = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| ClientError::Unreachable { socket: socket.clone(), reason: e.to_string() })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Unreachable { socket: socket.clone(), reason: e.to_string() })?;
            tokio::spawn(conn);
            let body = match body {
                Some(b) => Bytes::from(serde_json::to_vec(b).expect("request types serialize")),
                None => Bytes::new(),
            };
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "fjord-agent")
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("valid request");
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Unreachable { socket: socket.clone(), reason: e.to_string() })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable { socket: socket.clone(), reason: e.to_string() })?
                .to_bytes();
            Ok((status, bytes))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout { socket, what, secs: self.timeout.as_secs() }),
        }
    }

    pub async fn healthz(&self) -> Result<()> {
        let (status, body) = self.raw(Method::GET, "/healthz", None::<&()>).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Decode { what: "GET /healthz".into(), status: status.as_u16(), reason: String::from_utf8_lossy(&body).into() })
        }
    }

    pub async fn status(&self) -> Result<AgentStatus> {
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }
    pub async fn cni_add(&self, req: &CniRequest) -> Result<CniAddResponse> {
        self.call(Method::POST, "/v1/cni/add", Some(req)).await
    }
    pub async fn cni_del(&self, req: &CniRequest) -> Result<serde_json::Value> {
        self.call(Method::POST, "/v1/cni/del", Some(req)).await
    }
    pub async fn cni_check(&self, req: &CniRequest) -> Result<serde_json::Value> {
        self.call(Method::POST, "/v1/cni/check", Some(req)).await
    }
    pub async fn cni_gc(&self, req: &GcRequest) -> Result<GcResponse> {
        self.call(Method::POST, "/v1/cni/gc", Some(req)).await
    }
    pub async fn cni_status(&self) -> Result<serde_json::Value> {
        self.call(Method::GET, "/v1/cni/status", None::<&()>).await
    }
    pub async fn attachments(&self) -> Result<Vec<Attachment>> {
        self.call(Method::GET, "/v1/attachments", None::<&()>).await
    }
    pub async fn pods(&self) -> Result<Vec<Pod>> {
        self.call(Method::GET, "/v1/pods", None::<&()>).await
    }
    pub async fn create_pod(&self, pod: &Pod) -> Result<Pod> {
        self.call(Method::POST, "/v1/pods", Some(pod)).await
    }
    pub async fn update_pod(&self, pod: &Pod) -> Result<Pod> {
        self.call(Method::PUT, &format!("/v1/pods/{}/{}", pod.namespace, pod.name), Some(pod)).await
    }
    pub async fn get_pod(&self, ns: &str, name: &str) -> Result<Pod> {
        self.call(Method::GET, &format!("/v1/pods/{ns}/{name}"), None::<&()>).await
    }
    pub async fn delete_pod(&self, ns: &str, name: &str) -> Result<Pod> {
        self.call(Method::DELETE, &format!("/v1/pods/{ns}/{name}"), None::<&()>).await
    }
    pub async fn apply(&self, manifest: &str) -> Result<ManifestResponse> {
        self.call(Method::POST, "/v1/apply", Some(&ManifestRequest { manifest: manifest.into() })).await
    }
    pub async fn delete_objects(&self, manifest: &str) -> Result<ManifestResponse> {
        self.call(Method::POST, "/v1/delete", Some(&ManifestRequest { manifest: manifest.into() })).await
    }
    /// Services as stored (Kubernetes shape, JSON).
    pub async fn services(&self) -> Result<Vec<serde_json::Value>> {
        self.call(Method::GET, "/v1/services", None::<&()>).await
    }
    /// EndpointSlices as stored (Kubernetes shape, JSON).
    pub async fn endpointslices(&self) -> Result<Vec<serde_json::Value>> {
        self.call(Method::GET, "/v1/endpointslices", None::<&()>).await
    }
    /// Gateway API objects of a resource (`gatewayclasses`, `gateways`, `httproutes`,
    /// `referencegrants`) as stored, with their `status` merged in.
    pub async fn gatewayapi(&self, resource: &str) -> Result<Vec<serde_json::Value>> {
        self.call(Method::GET, &format!("/v1/gatewayapi/{resource}"), None::<&()>).await
    }
    /// The datapath's frontends (`vip:port/proto`) and the backends (`ip:port`) each holds now.
    pub async fn datapath_frontends(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        self.call(Method::GET, "/v1/datapath/frontends", None::<&()>).await
    }
    pub async fn metrics(&self) -> Result<String> {
        let (_, body) = self.raw(Method::GET, "/metrics", None::<&()>).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
