//! The agent's HTTP+JSON API (see `fjord_model::api` for the endpoint table).

use crate::agent::Agent;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fjord_model::api::*;
use fjord_model::cni::{code, CniError};
use std::sync::Arc;

#[derive(Clone)]
pub struct Ctx {
    pub agent: Arc<Agent>,
    pub netns_label: String,
    pub validation: fjord_model::objects::ValidationContext,
    pub max_services: Option<usize>,
}

fn parse(c: &Ctx, b: &[u8]) -> Result<Vec<fjord_model::objects::Object>, ApiErr> {
    let req: ManifestRequest = body(b)?;
    fjord_model::objects::parse_manifests_with(&req.manifest, &c.validation, Some(&fjord_gateway::manifest::GatewayKinds)).map_err(|e| ApiErr(CniError::new(code::INVALID_CONFIG, e.to_string())))
}

pub struct ApiErr(pub CniError);

impl From<CniError> for ApiErr {
    fn from(e: CniError) -> Self {
        ApiErr(e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            code::INVALID_ENV | code::INVALID_CONFIG | code::DECODE_FAILURE | code::INCOMPATIBLE_VERSION | code::UNSUPPORTED_FIELD => StatusCode::BAD_REQUEST,
            code::CONTAINER_UNKNOWN => StatusCode::NOT_FOUND,
            code::ALREADY_EXISTS => StatusCode::CONFLICT,
            code::TRY_AGAIN_LATER | code::NOT_AVAILABLE | code::IPAM_EXHAUSTED => StatusCode::SERVICE_UNAVAILABLE,
            code::CHECK_FAILED => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0)).into_response()
    }
}

type R<T> = Result<Json<T>, ApiErr>;

/// Reject bodies that are not the expected JSON with a CNI-style error naming the problem.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiErr> {
    serde_json::from_slice(bytes).map_err(|e| ApiErr(CniError::new(code::DECODE_FAILURE, format!("request body is not valid: {e}"))))
}

pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(|State(c): State<Ctx>| async move { c.agent.render_metrics() }))
        .route("/v1/status", get(|State(c): State<Ctx>| async move { R::<AgentStatus>::Ok(Json(c.agent.status(c.netns_label.clone()).await?)) }))
        .route(
            "/v1/cni/add",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move { R::<CniAddResponse>::Ok(Json(c.agent.add(&body(&b)?).await?)) }),
        )
        .route(
            "/v1/cni/del",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move {
                c.agent.del(&body(&b)?).await?;
                R::<serde_json::Value>::Ok(Json(serde_json::json!({})))
            }),
        )
        .route(
            "/v1/cni/check",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move {
                c.agent.check(&body(&b)?).await?;
                R::<serde_json::Value>::Ok(Json(serde_json::json!({})))
            }),
        )
        .route(
            "/v1/cni/gc",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move {
                let req: GcRequest = body(&b)?;
                R::<GcResponse>::Ok(Json(GcResponse { removed: c.agent.gc(&req.valid_attachments).await? }))
            }),
        )
        .route(
            "/v1/cni/status",
            get(|State(c): State<Ctx>| async move {
                c.agent.cni_status().await?;
                R::<serde_json::Value>::Ok(Json(serde_json::json!({})))
            }),
        )
        .route(
            "/v1/apply",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move {
                let objs = parse(&c, &b)?;
                let applied = crate::services::apply(&c.agent, &c.validation, objs, c.max_services).await?;
                R::<ManifestResponse>::Ok(Json(ManifestResponse { objects: applied.iter().map(|o| o.key()).collect(), missing: vec![] }))
            }),
        )
        .route(
            "/v1/delete",
            post(|State(c): State<Ctx>, b: axum::body::Bytes| async move {
                let objs = parse(&c, &b)?;
                let missing = crate::services::delete(&c.agent, &objs).await?;
                let objects = objs.iter().map(|o| o.key()).filter(|k| !missing.contains(k)).collect();
                R::<ManifestResponse>::Ok(Json(ManifestResponse { objects, missing }))
            }),
        )
        .route(
            "/v1/services",
            get(|State(c): State<Ctx>| async move { R::<Vec<fjord_model::objects::Service>>::Ok(Json(crate::services::list_services(c.agent.store.as_ref()).await?)) }),
        )
        .route(
            "/v1/endpointslices",
            get(|State(c): State<Ctx>| async move { R::<Vec<fjord_model::objects::EndpointSlice>>::Ok(Json(crate::services::list_slices(c.agent.store.as_ref()).await?)) }),
        )
        .route(
            "/v1/datapath/frontends",
            get(|State(c): State<Ctx>| async move {
                // What the datapath holds now: frontend → backends (after the last map update returned).
                let Some(dp) = c.agent.datapath.get().cloned() else { return R::<serde_json::Value>::Ok(Json(serde_json::json!({}))) };
                let v = tokio::task::spawn_blocking(move || {
                    let dp = dp.lock().unwrap();
                    let mut out = serde_json::Map::new();
                    for k in dp.services() {
                        let b: Vec<String> = dp.service_backends(&k).unwrap_or_default().iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
                        out.insert(k.to_string(), serde_json::json!(b));
                    }
                    serde_json::Value::Object(out)
                })
                .await
                .map_err(|e| ApiErr(CniError::new(code::IO_FAILURE, e.to_string())))?;
                R::<serde_json::Value>::Ok(Json(v))
            }),
        )
        .route(
            "/v1/gatewayapi/{resource}",
            get(|State(c): State<Ctx>, Path(resource): Path<String>| async move {
                R::<Vec<serde_json::Value>>::Ok(Json(crate::gatewayapi::list_with_status(c.agent.store.as_ref(), &resource).await?))
            }),
        )
        .route("/v1/attachments", get(|State(c): State<Ctx>| async move { R::<Vec<Attachment>>::Ok(Json(c.agent.attachments().await?)) }))
        .route(
            "/v1/pods",
            get(|State(c): State<Ctx>| async move { R::<Vec<Pod>>::Ok(Json(c.agent.pods().await?)) })
                .post(|State(c): State<Ctx>, b: axum::body::Bytes| async move { R::<Pod>::Ok(Json(c.agent.create_pod(body(&b)?).await?)) }),
        )
        .route(
            "/v1/pods/{ns}/{name}",
            get(|State(c): State<Ctx>, Path((ns, name)): Path<(String, String)>| async move { R::<Pod>::Ok(Json(c.agent.get_pod(&ns, &name).await?)) })
                .put(|State(c): State<Ctx>, Path((ns, name)): Path<(String, String)>, b: axum::body::Bytes| async move {
                    let pod: Pod = body(&b)?;
                    if pod.namespace != ns || pod.name != name {
                        return Err(ApiErr(CniError::new(code::INVALID_CONFIG, format!("body names pod {}/{}, path names {ns}/{name}", pod.namespace, pod.name))));
                    }
                    R::<Pod>::Ok(Json(c.agent.update_pod(pod).await?))
                })
                .delete(|State(c): State<Ctx>, Path((ns, name)): Path<(String, String)>| async move { R::<Pod>::Ok(Json(c.agent.delete_pod(&ns, &name).await?)) }),
        )
        .with_state(ctx)
}
