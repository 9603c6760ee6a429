//! The node's HTTP API (JSON over HTTP/1.1, axum). The CLI's `volume`
//! commands are thin clients of it (`client`).
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/health | | `{"status":"ok"}` |
//! | GET | /v1/node | | node id, disks, space |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | `CreateBody` | 201 `VolumeInfo` |
//! | GET | /v1/volumes/{name} | | `VolumeInfo` |
//! | PATCH | /v1/volumes/{name} | `{"size_bytes":N}` | `VolumeInfo` (grow only) |
//! | DELETE | /v1/volumes/{name} | | 204 |
//!
//! Errors are `{"error": "one line"}` with 400 (bad input), 404 (no such
//! volume), 409 (exists, in use), 500/503 (the node's fault).

pub mod client;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::volume::{CreateRequest, VolumeError, Volumes};

/// Largest request body accepted.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Body of POST /v1/volumes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default = "default_block_size")]
    pub block_size_bytes: u32,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
}

fn default_block_size() -> u32 {
    4096
}
fn default_replicas() -> u32 {
    1
}

/// Body of PATCH /v1/volumes/{name}.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeBody {
    pub size_bytes: u64,
}

/// One disk in GET /v1/node.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub path: String,
    pub disk_uuid: uuid::Uuid,
    pub engine: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// GET /v1/node.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_uuid: uuid::Uuid,
    pub version: String,
    pub disks: Vec<DiskStatus>,
    pub volume_count: usize,
}

/// The error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What handlers share.
pub struct ApiState {
    pub volumes: Arc<Volumes>,
    pub node: Box<dyn Fn() -> NodeStatus + Send + Sync>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<VolumeError> for ApiError {
    fn from(error: VolumeError) -> Self {
        let status = match &error {
            VolumeError::Missing { .. } => StatusCode::NOT_FOUND,
            VolumeError::Exists { .. } | VolumeError::InUse { .. } => StatusCode::CONFLICT,
            VolumeError::NoDisks | VolumeError::DiskMissing { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ if error.is_client_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(%error, "volume operation failed");
        }
        Self(status, error.to_string())
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {error}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("task failed: {error}")))?
        .map_err(ApiError::from)
}

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/v1/node", get(node_status))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(inspect_volume).patch(resize_volume).delete(delete_volume),
        )
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API path; see /v1/volumes".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

async fn node_status(State(state): State<Arc<ApiState>>) -> Result<Json<NodeStatus>, ApiError> {
    let state = Arc::clone(&state);
    let status = tokio::task::spawn_blocking(move || (state.node)())
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(Json(status))
}

async fn list_volumes(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let volumes = Arc::clone(&state.volumes);
    let list = blocking(move || Ok(volumes.list())).await?;
    Ok(Json(list).into_response())
}

async fn create_volume(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: CreateBody = parse_body(&body)?;
    let request = CreateRequest {
        name: body.name,
        size_bytes: body.size_bytes,
        block_size_bytes: body.block_size_bytes,
        replicas: body.replicas,
    };
    let volumes = Arc::clone(&state.volumes);
    let info = blocking(move || volumes.create(&request)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn inspect_volume(State(state): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let volumes = Arc::clone(&state.volumes);
    let info = blocking(move || volumes.inspect(&name)).await?;
    Ok(Json(info).into_response())
}

async fn resize_volume(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ResizeBody = parse_body(&body)?;
    let volumes = Arc::clone(&state.volumes);
    let info = blocking(move || volumes.resize(&name, body.size_bytes)).await?;
    Ok(Json(info).into_response())
}

async fn delete_volume(State(state): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let volumes = Arc::clone(&state.volumes);
    blocking(move || volumes.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
