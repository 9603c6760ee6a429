//! The node's HTTP API (JSON over HTTP/1.1, axum). The CLI's `volume`
//! commands are thin clients of it (`client`).
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/health, /healthz | | `{"status":"ok"}` (the process answers) |
//! | GET | /readyz | | 200 `{"status":"ready"}` when every disk is open and the node is in a cluster with a known leader; else 503 with the reasons |
//! | GET | /metrics | | Prometheus metrics (OpenMetrics text, `metrics`) |
//! | GET | /v1/node | | node id, disks, space |
//! | POST | /v1/node/disks | `EnrollBody` | 201 `DiskRecord`: the disk formatted, recorded and opened, new volumes may go there (pool expansion) |
//! | POST | /v1/node/upgrade | `UpgradeBody` | 202 `handoff::Order`: the binary checked (it runs, reads this node's hand-over, speaks a peer protocol every member speaks), then the node executes it in place keeping attached devices and listening sockets; follow it in GET /v1/node `upgrade` |
//! | POST | /v1/node/disks/{uuid}/remove | | 202 `DrainStatus`: the disk's data moves to the node's other disks while in use, then the disk is forgotten; follow it in GET /v1/node `drains` |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | `CreateBody` | 201 `VolumeInfo` |
//! | GET | /v1/volumes/{name} | | `VolumeInfo` |
//! | PATCH | /v1/volumes/{name} | `{"size_bytes":N}` | `VolumeInfo` (grow; shrink with `"allow_shrink":true`, refused while clients are connected or it is attached) |
//! | DELETE | /v1/volumes/{name} | | 204 |
//! | PUT | /v1/volumes/{name}/replicas | `{"replicas":N}` | `VolumeInfo` |
//! | POST | /v1/volumes/{name}/attach | `{"force":false}` | `VolumeInfo` (this node serves it now) |
//! | POST | /v1/volumes/{name}/device | | `Device` (a block device of this host; this node must serve the volume) |
//! | GET | /v1/volumes/{name}/device | | `Device` if attached to this host, else 404 |
//! | DELETE | /v1/volumes/{name}/device | | 204 (the block device removed) |
//! | POST | /v1/volumes/{name}/scrub | | 202 `ScrubStarted` (the coordinator verifies every copy and repairs; follow it in GET /v1/cluster) |
//! | GET | /v1/volumes/{name}/latency | | `VolumeLatency`: percentiles of the client requests (NBD and host attach) this node served since the reset (hdrhistogram, 1 % resolution); 404 where the volume is not served |
//! | DELETE | /v1/volumes/{name}/latency | | 204 (the percentiles start afresh; counters and `/metrics` stay) |
//! | POST | /v1/volumes/{name}/unlock | `{"passphrase":"..."}` | 204 (a passphrase-encrypted volume, on the node serving it) |
//! | GET | /v1/volumes/{name}/snapshots | | `[SnapshotInfo]`, oldest first |
//! | POST | /v1/volumes/{name}/snapshots | `{"name":"SNAP"}` | 201 `SnapshotInfo` (crash-consistent, on every in-sync replica; exported read-only over NBD as `NAME@SNAP`) |
//! | DELETE | /v1/volumes/{name}/snapshots/{snapshot} | | 204 |
//! | POST | /v1/volumes/{name}/snapshots/{snapshot}/clone | `{"name":"NEW","group":""}` | 201 `VolumeInfo` (a writable volume sharing the snapshot's data) |
//! | POST | /v1/volumes/{name}/restore | `{"snapshot":"SNAP"}` | `VolumeInfo` (the volume's data is the snapshot's again; refused while clients are connected or it is attached) |
//! | GET | /v1/volumes/{name}/diff | `?from=SNAP&to=SNAP` (either may be left out: nothing / the volume now) | `SnapshotDiff`: the byte ranges that differ, from the coordinator's maps (no data read) |
//! | PUT | /v1/volumes/{name}/snapshot-schedule | `{"every_seconds":N,"keep":K}` | `VolumeInfo` (scheduled snapshots `auto-YYYYMMDD-HHMMSS`, the newest K kept; N 0 stops) |
//! | GET | /v1/cluster | | `ClusterStatus` |
//! | GET | /v1/alerts | | `[Alert]`, active first (`?all=false`: active only) |
//! | POST | /v1/cluster/init | | `ClusterStatus` |
//! | POST | /v1/cluster/tokens | `{"ttl_seconds":N}` | `NewToken` |
//! | POST | /v1/cluster/rotate-certs | | `{"node":ID,"ca_fingerprint":"..."}` (this node's peer certificate renewed) |
//! | POST | /v1/cluster/join | `{"address":"HOST:PORT","token":"..."}` | `ClusterStatus` |
//! | PUT | /v1/cluster/nodes/{id}/maintenance | `{"on":true}` | 204 |
//! | POST | /v1/cluster/nodes/{id}/decommission | | 204 once the node left (may take long) |
//!
//! | POST | /v1/auth/tokens | `{"subject":"NAME","role":"user","ttl_seconds":N}` | 201 `{"token":"..."}` (admin) |
//! | GET | /v1/auth/whoami | | `{"subject":"...","role":"user","groups":[]}`: the caller, as its token says (any role) |
//! | POST | /v1/auth/certs | same as tokens | 201 `ClientCert` (NBD TLS client certificate; a user for itself only) |
//!
//! Every request but `/healthz`, `/readyz` and `/v1/health` needs
//! `Authorization: Bearer <token>` (`auth`): 401 without a valid one.
//! Volume routes are open to users for the volumes they own (403 for
//! others'); every other route needs the admin role (403).
//!
//! Volume operations need the node to be in a cluster (503 otherwise);
//! they go through Raft and may be forwarded to the volume's coordinator.
//!
//! Errors are `{"error": "one line"}` with 400 (bad input), 404 (no such
//! volume), 409 (exists, in use), 500/503 (the node's fault).

pub mod auth;
pub mod client;
pub mod serve;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::cluster::snapshots::{RestoreBody, ScheduleBody, SnapshotBody};
use crate::cluster::state::{Command, NodeAdmin};
use crate::cluster::volumes::{CreateVolume, Encryption, VolumeOpError};
use crate::cluster::{Cluster, ClusterError};
use crate::volume::Volumes;

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
    /// Encrypt the data at rest (AES-XTS-256), key wrapped by the cluster key.
    #[serde(default)]
    pub encrypted: bool,
    /// Wrap the key with this passphrase instead (implies `encrypted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<Passphrase>,
    /// Members of this group (a token's `groups`) may use the volume too.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

/// A passphrase: zeroized when dropped, never shown by Debug.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Passphrase(pub zeroize::Zeroizing<String>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// Body of POST /v1/node/disks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    pub path: std::path::PathBuf,
    /// Destroy partitions and signatures found on it.
    #[serde(default)]
    pub force: bool,
    /// Make a missing path a regular file of this size (development).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_size_bytes: Option<u64>,
    #[serde(default = "default_segment_size")]
    pub segment_size_bytes: u64,
    /// Do not discard the whole device before formatting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_discard: bool,
}

fn default_segment_size() -> u64 {
    crate::enroll::DEFAULT_SEGMENT_BYTES
}

/// Formats a disk, records it in the data directory and opens it: the
/// node's capacity grows without a restart.
async fn enroll_disk(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: EnrollBody = parse_body(&body)?;
    let worker = Arc::clone(&state);
    let outcome = tokio::task::spawn_blocking(move || {
        let data = worker.data.lock();
        let options = crate::enroll::EnrollOptions {
            force: body.force,
            create_size_bytes: body.create_size_bytes,
            segment_size_bytes: body.segment_size_bytes,
            discard: !body.no_discard,
        };
        let record = crate::enroll::enroll(&data, &body.path, &options)
            .map_err(|error| ApiError(StatusCode::CONFLICT, error.to_string()))?;
        let index = worker
            .engine
            .add_disk(crate::engine::DiskSpec {
                path: record.path.clone(),
            })
            .map_err(|error| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("enrolled but not opened: {error}; restart the node to use it"),
                )
            })?;
        worker.volumes.add_disk(index);
        tracing::info!(path = %record.path.display(), disk = index, "disk enrolled into the running node");
        Ok::<_, ApiError>(record)
    })
    .await
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))??;
    Ok((StatusCode::CREATED, Json(outcome)).into_response())
}

async fn upgrade_node(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: UpgradeBody = parse_body_or_default(&body)?;
    if let Some(why) = state.attach.hand_over_refusal() {
        return Err(ApiError(StatusCode::CONFLICT, why));
    }
    let binary = match body.binary {
        Some(binary) => binary,
        None => crate::handoff::default_binary().map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error))?,
    };
    // Every member whose version is known must work with the new binary.
    let members: Vec<crate::peer::handshake::Speaks> = state.cluster.with_state(|cluster| {
        cluster
            .nodes
            .keys()
            .filter(|id| **id != state.cluster.local.id)
            .filter_map(|id| state.cluster.health.liveness(*id).report)
            .filter(|report| !report.version.is_empty())
            .map(|report| {
                let (min, max) = crate::peer::handshake::reported_range(report.protocol_min, report.protocol_max);
                crate::peer::handshake::Speaks::peer(Some(&report.version), Some(min), max)
            })
            .collect()
    });
    let (checked, format) = (binary.clone(), state.attach.handoff_format());
    let new = tokio::task::spawn_blocking(move || crate::handoff::check_binary(&checked, format, &members))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|error| ApiError(StatusCode::BAD_REQUEST, error))?;
    let order = crate::handoff::Order {
        id: crate::audit::now_unix_ms(),
        binary,
        to_version: new.version,
    };
    state
        .upgrades
        .order(order.clone())
        .map_err(|error| ApiError(StatusCode::CONFLICT, error))?;
    Ok((StatusCode::ACCEPTED, Json(order)).into_response())
}

async fn remove_disk(State(state): State<Arc<ApiState>>, Path(uuid): Path<String>) -> Result<Response, ApiError> {
    let disk_uuid = uuid::Uuid::parse_str(&uuid)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("{uuid:?} is not a disk uuid")))?;
    let data = Arc::clone(&state);
    let forget = Box::new(move || {
        data.data
            .lock()
            .remove_disk(disk_uuid)
            .map(|_| ())
            .map_err(|error| format!("drained, but its enrollment record stays: {error}"))
    });
    let status = state
        .volumes
        .start_drain(disk_uuid, forget)
        .map_err(|error| ApiError(StatusCode::CONFLICT, error.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// Body of POST /v1/volumes/{name}/unlock.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlockBody {
    pub passphrase: Passphrase,
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
    /// A smaller size discards the data past the new end (refused otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_shrink: bool,
}

/// Body of POST /v1/cluster/tokens.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    #[serde(default = "default_token_ttl")]
    pub ttl_seconds: u64,
}

fn default_token_ttl() -> u64 {
    crate::cluster::join::TOKEN_TTL_SECONDS_DEFAULT
}

/// Body of POST /v1/cluster/join.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// Peer address (HOST:PORT) of any member.
    pub address: String,
    pub token: String,
}

/// Body of PUT /v1/cluster/nodes/{id}/maintenance.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceBody {
    pub on: bool,
}

/// One disk in GET /v1/node.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskStatus {
    pub path: String,
    pub disk_uuid: uuid::Uuid,
    pub engine: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// "in use", "draining", "removed" (drained and forgotten: not opened
    /// after the node restarts, then safe to detach) or "drain failed".
    #[serde(default)]
    pub state: String,
    /// "on", or "off: why" (freed segments told to the device, or not).
    #[serde(default)]
    pub discard: String,
}

/// GET /v1/node.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_uuid: uuid::Uuid,
    /// The node's id in the cluster.
    #[serde(default)]
    pub node_id: u64,
    #[serde(default)]
    pub cluster_id: Option<uuid::Uuid>,
    pub version: String,
    pub disks: Vec<DiskStatus>,
    pub volume_count: usize,
    /// Drains (`disk remove`) since the node started, with their progress.
    #[serde(default)]
    pub drains: Vec<crate::volume::drain::DrainStatus>,
    /// How `volume attach --device` makes devices here (ublk, nbd, fuse-uring, fuse).
    #[serde(default)]
    pub attach_backend: String,
    /// What would make host attach faster here, if anything (e.g. the
    /// kernel could serve FUSE over io_uring but it is switched off).
    #[serde(default)]
    pub attach_note: Option<String>,
    /// How this node's last upgrade in place ended (None: none since it started).
    #[serde(default)]
    pub upgrade: Option<crate::handoff::UpgradeRecord>,
}

/// Body of POST /v1/node/upgrade.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UpgradeBody {
    /// The new binary (default: the file at the path the node was started from).
    #[serde(default)]
    pub binary: Option<std::path::PathBuf>,
}

/// The error body.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What handlers share.
pub struct ApiState {
    pub volumes: Arc<Volumes>,
    pub cluster: Arc<Cluster>,
    pub auth: Arc<auth::Authenticator>,
    pub engine: Arc<crate::engine::Engine>,
    pub node: Box<dyn Fn() -> NodeStatus + Send + Sync>,
    /// Volumes attached to this host as block devices.
    pub attach: Arc<crate::attach::HostAttach>,
    /// The node's data directory (disks are enrolled into it online).
    pub data: Arc<parking_lot::Mutex<crate::datadir::DataDir>>,
    /// Every change and every refusal of the API (`crate::audit`).
    pub audit: Arc<crate::audit::AuditLog>,
    /// Upgrades in place ordered through the API.
    pub upgrades: Arc<crate::handoff::Upgrades>,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<VolumeOpError> for ApiError {
    fn from(error: VolumeOpError) -> Self {
        let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %error.message, "volume operation failed");
        }
        Self(status, error.message)
    }
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> Self {
        VolumeOpError::from(error).into()
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| ApiError(StatusCode::BAD_REQUEST, format!("bad JSON body: {error}")))
}

/// An optional body: none at all means the defaults.
fn parse_body_or_default<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        parse_body(body)
    }
}

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readiness))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node_status))
        .route("/v1/node/disks", post(enroll_disk))
        .route("/v1/node/upgrade", post(upgrade_node))
        .route("/v1/node/disks/{uuid}/remove", post(remove_disk))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(inspect_volume).patch(resize_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/unlock", post(unlock_volume))
        .route("/v1/volumes/{name}/scrub", post(scrub_volume))
        .route(
            "/v1/volumes/{name}/latency",
            get(volume_latency).delete(reset_volume_latency),
        )
        .route(
            "/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/volumes/{name}/snapshots/{snapshot}/clone", post(clone_snapshot))
        .route("/v1/volumes/{name}/restore", post(restore_snapshot))
        .route("/v1/volumes/{name}/diff", get(snapshot_diff))
        .route("/v1/volumes/{name}/backups", post(start_backup))
        .route("/v1/volumes/{name}/backup-restore", post(start_backup_restore))
        .route("/v1/volumes/{name}/backup-jobs/{id}", get(backup_job))
        .route("/v1/volumes/{name}/backup-schedule", put(backup_schedule))
        .route("/v1/volumes/{name}/standby", post(set_standby))
        .route("/v1/volumes/{name}/promote", post(promote_volume))
        .route("/v1/backup-targets", get(list_backup_targets).post(add_backup_target))
        .route(
            "/v1/backup-targets/{target}",
            axum::routing::delete(delete_backup_target),
        )
        .route("/v1/backup-targets/{target}/backups", get(registered_backups))
        .route(
            "/v1/backup-targets/{target}/backups/{backup}",
            axum::routing::delete(delete_registered_backup),
        )
        .route("/v1/backup-targets/{target}/verify", post(verify_registered))
        .route("/v1/volumes/{name}/snapshot-schedule", put(snapshot_schedule))
        .route(
            "/v1/volumes/{name}/device",
            get(device_of).post(attach_device).delete(detach_device),
        )
        .route("/v1/volumes/{name}/replicas", put(update_replicas))
        .route("/v1/volumes/{name}/qos", put(set_qos))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/alerts", get(list_alerts))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/cluster/tokens", post(cluster_token))
        .route("/v1/cluster/join", post(cluster_join))
        .route("/v1/cluster/rotate-certs", post(rotate_certs))
        .route("/v1/cluster/nodes/{id}/maintenance", put(node_maintenance))
        .route("/v1/cluster/nodes/{id}/decommission", post(node_decommission))
        .route("/v1/auth/tokens", post(create_api_token))
        .route("/v1/auth/certs", post(create_client_cert))
        .route("/v1/auth/whoami", get(whoami))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API path; see /v1/volumes".into()) })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

/// Checks the bearer token of every request but the health probes, and
/// that non-volume routes come from an admin; the caller is then known to
/// the handler (`Extension<Caller>`) and to forwarding (`auth::CALLER`).
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    let target = request.uri().path().to_owned();
    let source = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |info| info.0.to_string());
    let (response, caller) = authenticate_and_run(&state, request, next).await;
    let target = response
        .extensions()
        .get::<AuditTarget>()
        .map_or(target, |named| named.0.clone());
    let status = response.status();
    let changes = method != axum::http::Method::GET && method != axum::http::Method::HEAD;
    if changes || status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        state.audit.record(&crate::audit::Entry::now(
            caller.as_ref(),
            source,
            method.to_string(),
            target,
            status.as_u16(),
        ));
    }
    response
}

/// What a change acted on, when the path does not say it (a volume created
/// by `POST /v1/volumes` is named in the body): the handler puts it in the
/// response's extensions, and the audit trail records it for the path.
#[derive(Clone, Debug)]
struct AuditTarget(String);

/// The check itself; returns the response and the verified caller, if any.
async fn authenticate_and_run(
    state: &ApiState,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> (Response, Option<auth::Caller>) {
    let path = request.uri().path().to_owned();
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/v1/health") {
        return (next.run(request).await, None);
    }
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| token.trim().to_owned());
    let Some(token) = token else {
        let refusal = ApiError(
            StatusCode::UNAUTHORIZED,
            "missing API token: send `Authorization: Bearer TOKEN` (the CLI on a node's host reads DATA_DIR/admin.token: set BALLAST_TOKEN_FILE, or BALLAST_TOKEN)".into(),
        );
        return (refusal.into_response(), None);
    };
    let caller = match state.auth.check(&token) {
        Ok(caller) => caller,
        Err(reason) => {
            tracing::warn!(%path, %reason, "API request refused");
            return (ApiError(StatusCode::UNAUTHORIZED, reason).into_response(), None);
        }
    };
    // Users may use their volumes, and get a client certificate for themselves.
    if !caller.is_admin() && !path.starts_with("/v1/volumes") && path != "/v1/auth/certs" && path != "/v1/auth/whoami" {
        let refusal = ApiError(
            StatusCode::FORBIDDEN,
            format!("{path} needs the admin role ({} is a user)", caller.subject),
        );
        return (refusal.into_response(), Some(caller));
    }
    request.extensions_mut().insert(caller.clone());
    let response = auth::CALLER.scope(caller.clone(), next.run(request)).await;
    (response, Some(caller))
}

async fn whoami(Extension(caller): Extension<auth::Caller>) -> Response {
    Json(caller).into_response()
}

/// 403 unless `caller` may use volume `name` (404 comes from the operation).
fn owned(state: &ApiState, caller: &auth::Caller, name: &str) -> Result<(), ApiError> {
    let owner = state.cluster.with_state(|cluster| {
        cluster.volumes.contains_key(name).then(|| {
            (
                cluster.owners.get(name).cloned().unwrap_or_default(),
                cluster.groups.get(name).cloned().unwrap_or_default(),
            )
        })
    });
    match owner {
        Some((owner, group)) => caller
            .may_use(name, &owner, &group)
            .map_err(|reason| ApiError(StatusCode::FORBIDDEN, reason)),
        None => Ok(()),
    }
}

/// Body of POST /v1/auth/tokens.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenBody {
    pub subject: String,
    pub role: auth::Role,
    pub ttl_seconds: u64,
    /// Groups the subject belongs to (volume group ACLs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

async fn create_api_token(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: ApiTokenBody = parse_body(&body)?;
    check_subject(&body.subject)?;
    for group in &body.groups {
        check_subject(group).map_err(|_| bad_group(group))?;
    }
    if body.ttl_seconds == 0 || body.ttl_seconds > auth::TOKEN_SECONDS_MAX {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("ttl_seconds must be 1 to {}", auth::TOKEN_SECONDS_MAX),
        ));
    }
    let caller = auth::Caller {
        subject: body.subject.clone(),
        role: body.role,
        groups: body.groups.clone(),
    };
    let token = state
        .auth
        .mint_cluster(&caller, body.ttl_seconds)
        .map_err(|reason| ApiError(StatusCode::SERVICE_UNAVAILABLE, reason))?;
    tracing::info!(subject = %body.subject, role = ?body.role, ttl_seconds = body.ttl_seconds, "API token issued");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "token": token }))).into_response())
}

fn bad_group(group: &str) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("group {group:?} must be 1-64 characters of letters, digits, - _ . @"),
    )
}

fn check_subject(subject: &str) -> Result<(), ApiError> {
    let subject_ok = !subject.is_empty()
        && subject.len() <= 64
        && subject
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if subject_ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            "subject must be 1-64 characters of letters, digits, - _ . @".into(),
        ))
    }
}

/// Body of POST /v1/auth/certs (same fields as a token).
pub type ClientCertBody = ApiTokenBody;

/// Answer of POST /v1/auth/certs: a client certificate for NBD over TLS.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub expires_unix: u64,
}

/// Issues a client certificate (admins for anyone; a user for itself only).
async fn create_client_cert(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ClientCertBody = parse_body(&body)?;
    check_subject(&body.subject)?;
    for group in &body.groups {
        check_subject(group).map_err(|_| bad_group(group))?;
    }
    let own_groups = body.groups.iter().all(|group| caller.groups.contains(group));
    if !caller.is_admin() && (body.subject != caller.subject || body.role != auth::Role::User || !own_groups) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "a user may only get a user certificate for itself ({}), with groups it is in",
                caller.subject
            ),
        ));
    }
    if body.ttl_seconds < 86_400 || body.ttl_seconds > auth::TOKEN_SECONDS_MAX {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "a certificate lives whole days: ttl_seconds must be 86400 to {}",
                auth::TOKEN_SECONDS_MAX
            ),
        ));
    }
    let issued = state
        .cluster
        .cluster_id()
        .zip(state.cluster.with_state(|s| s.ca.clone()));
    let Some((cluster_id, ca)) = issued else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is not in a cluster (certificates are signed by the cluster CA)".into(),
        ));
    };
    let days = body.ttl_seconds / 86_400;
    let bundle = crate::peer::tls::issue_client(&ca, cluster_id, &body.subject, body.role, &body.groups, days)
        .map_err(|reason| ApiError(StatusCode::INTERNAL_SERVER_ERROR, reason))?;
    tracing::info!(subject = %body.subject, role = ?body.role, days, by = %caller.subject, "NBD client certificate issued");
    let answer = ClientCert {
        ca_pem: bundle.ca_pem,
        cert_pem: bundle.cert_pem,
        key_pem: bundle.key_pem,
        expires_unix: bundle.expires_unix,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let status = state.cluster.status().await;
    let metrics = crate::metrics::NodeMetrics {
        volumes: Arc::clone(&state.volumes),
        cluster: Arc::clone(&state.cluster),
        engine: Arc::clone(&state.engine),
        status,
    };
    let text = tokio::task::spawn_blocking(move || crate::metrics::render(metrics))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics".into()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn readiness(State(state): State<Arc<ApiState>>) -> Response {
    let engine = Arc::clone(&state.engine);
    let mut problems: Vec<String> = tokio::task::spawn_blocking(move || {
        engine
            .disks()
            .iter()
            .enumerate()
            .filter_map(|(index, disk)| match engine.query(index, |store| store.is_failed()) {
                Ok(false) => None,
                Ok(true) => Some(format!("disk {} failed", disk.path.display())),
                Err(error) => Some(format!("disk {}: {error}", disk.path.display())),
            })
            .collect()
    })
    .await
    .unwrap_or_else(|error| vec![error.to_string()]);
    if state.cluster.cluster_id().is_none() {
        problems.push("not in a cluster (run `ballast cluster init` or `ballast cluster join`)".into());
    } else if state.cluster.raft.metrics().borrow().current_leader.is_none() {
        problems.push("no Raft leader known".into());
    }
    if problems.is_empty() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "problems": problems})),
        )
            .into_response()
    }
}

async fn node_status(State(state): State<Arc<ApiState>>) -> Result<Json<NodeStatus>, ApiError> {
    let state = Arc::clone(&state);
    let status = tokio::task::spawn_blocking(move || (state.node)())
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(Json(status))
}

async fn list_volumes(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
) -> Result<Response, ApiError> {
    let mut list = state.cluster.list_volumes(&state.volumes)?;
    list.retain(|info| caller.may_use(&info.name, &info.owner, &info.group).is_ok());
    Ok(Json(list).into_response())
}

async fn create_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: CreateBody = parse_body(&body)?;
    let encryption = match body.passphrase {
        Some(passphrase) => Encryption::Passphrase(passphrase.0),
        None if body.encrypted => Encryption::ClusterKey,
        None => Encryption::None,
    };
    let target = AuditTarget(format!("/v1/volumes/{}", body.name));
    let request = CreateVolume {
        name: body.name,
        size_bytes: body.size_bytes,
        block_size_bytes: body.block_size_bytes,
        replicas: body.replicas,
        owner: caller.subject,
        group: body.group,
        encryption,
    };
    let mut response = match state.cluster.create_volume(&state.volumes, request).await {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    };
    response.extensions_mut().insert(target);
    Ok(response)
}

async fn inspect_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let info = state.cluster.inspect_volume(&state.volumes, &name).await?;
    Ok(Json(info).into_response())
}

async fn resize_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: ResizeBody = parse_body(&body)?;
    let info = state
        .cluster
        .resize_volume(&state.volumes, &name, body.size_bytes, body.allow_shrink)
        .await?;
    Ok(Json(info).into_response())
}

async fn delete_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    state.cluster.delete_volume(&state.volumes, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Answer of POST /v1/volumes/{name}/scrub: the scrub asked for is done
/// when the volume's `scrub_done` reaches `generation`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScrubStarted {
    pub volume: String,
    pub generation: u64,
    pub coordinator: u64,
}

async fn scrub_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let volume = state.cluster.request_scrub(&name).await?;
    let started = ScrubStarted {
        volume: volume.name,
        generation: volume.scrub_requested,
        coordinator: volume.coordinator,
    };
    Ok((StatusCode::ACCEPTED, Json(started)).into_response())
}

/// Latency percentiles of one volume's requests on one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeLatency {
    pub volume: String,
    pub node_id: u64,
    /// One entry per kind of request served since the reset.
    pub ops: Vec<crate::metrics::LatencyPercentiles>,
}

/// The volume as opened on this node for I/O, or 404 saying where to ask.
fn served_here(state: &ApiState, name: &str) -> Result<Arc<crate::volume::Volume>, ApiError> {
    state.volumes.get(name).filter(|v| v.is_served()).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "volume {name} is not served on this node: ask the API of the node serving it \
                 (`ballast volume inspect {name}` names its coordinator)"
            ),
        )
    })
}

async fn volume_latency(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let volume = served_here(&state, &name)?;
    let latency = VolumeLatency {
        volume: name,
        node_id: state.cluster.local.id,
        ops: volume.stats.latency(),
    };
    Ok(Json(latency).into_response())
}

async fn reset_volume_latency(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    served_here(&state, &name)?.stats.reset_latency();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_snapshots(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    Ok(Json(state.cluster.list_snapshots(&name)?).into_response())
}

async fn snapshot_diff(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<crate::cluster::snapshots::DiffQuery>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    Ok(Json(state.cluster.snapshot_diff(&state.volumes, &name, query).await?).into_response())
}

async fn start_backup(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: crate::backup::BackupBody = parse_body(&body)?;
    let job = state.cluster.start_backup(&state.volumes, &name, body).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn start_backup_restore(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: crate::backup::RestoreBody = parse_body(&body)?;
    let job = state.cluster.start_restore(&state.volumes, &name, body).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn backup_job(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path((name, id)): Path<(String, u64)>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let job = state
        .cluster
        .backup_jobs
        .get(id)
        .filter(|job| job.volume == name)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no backup job {id} of {name} on this node"),
            )
        })?;
    Ok(Json(job).into_response())
}

async fn backup_schedule(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: crate::cluster::backups::BackupScheduleBody = parse_body(&body)?;
    let info = state.cluster.set_backup_schedule(&state.volumes, &name, &body).await?;
    Ok(Json(info).into_response())
}

async fn set_standby(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: crate::cluster::backups::StandbyBody = parse_body(&body)?;
    Ok(Json(state.cluster.set_standby(&state.volumes, &name, body).await?).into_response())
}

async fn promote_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    Ok(Json(state.cluster.promote(&state.volumes, &name).await?).into_response())
}

async fn add_backup_target(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: crate::cluster::backups::TargetBody = parse_body(&body)?;
    let target = state.cluster.add_backup_target(body).await?;
    Ok((StatusCode::CREATED, Json(target)).into_response())
}

async fn list_backup_targets(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(state.cluster.list_backup_targets()).into_response())
}

async fn registered_backups(
    State(state): State<Arc<ApiState>>,
    Path(target): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.cluster.registered_backups(&target).await?).into_response())
}

/// What `POST /v1/backup-targets/{target}/verify` checks.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    /// One backup; absent: every backup of the target.
    #[serde(default)]
    backup: Option<String>,
}

async fn verify_registered(
    State(state): State<Arc<ApiState>>,
    Path(target): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: VerifyBody = parse_body_or_default(&body)?;
    Ok(Json(state.cluster.verify_registered(&target, body.backup).await?).into_response())
}

async fn delete_registered_backup(
    State(state): State<Arc<ApiState>>,
    Path((target, backup)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.cluster.delete_registered_backup(&target, backup).await?).into_response())
}

async fn delete_backup_target(
    State(state): State<Arc<ApiState>>,
    Path(target): Path<String>,
) -> Result<Response, ApiError> {
    state.cluster.delete_backup_target(&target).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_snapshot(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: SnapshotBody = parse_body(&body)?;
    let info = state.cluster.create_snapshot(&state.volumes, &name, &body.name).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn delete_snapshot(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path((name, snapshot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    state.cluster.delete_snapshot(&name, &snapshot).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of POST /v1/volumes/{name}/snapshots/{snapshot}/clone.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneBody {
    /// The new volume.
    pub name: String,
    /// A group whose members may use the new volume too.
    #[serde(default)]
    pub group: String,
}

async fn clone_snapshot(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path((name, snapshot)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: CloneBody = parse_body(&body)?;
    let info = state
        .cluster
        .clone_snapshot(&state.volumes, &name, &snapshot, &body.name, caller.subject, body.group)
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn restore_snapshot(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: RestoreBody = parse_body(&body)?;
    let info = state
        .cluster
        .restore_snapshot(&state.volumes, &name, &body.snapshot)
        .await?;
    Ok(Json(info).into_response())
}

async fn snapshot_schedule(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: ScheduleBody = parse_body(&body)?;
    let info = state
        .cluster
        .set_snapshot_schedule(&state.volumes, &name, &body)
        .await?;
    Ok(Json(info).into_response())
}

/// Body of PUT /v1/volumes/{name}/replicas.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasBody {
    pub replicas: u32,
}

/// A volume's priority and limits are the administrator's: a user who
/// could raise their own would defeat them.
async fn set_qos(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "a volume's I/O priority and limits are set by an admin".into(),
        ));
    }
    let body: crate::cluster::volumes::QosBody = parse_body(&body)?;
    Ok(Json(state.cluster.set_qos(&state.volumes, &name, &body).await?).into_response())
}

async fn update_replicas(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: ReplicasBody = parse_body(&body)?;
    let info = state
        .cluster
        .update_replicas(&state.volumes, &name, body.replicas)
        .await?;
    Ok(Json(info).into_response())
}

/// Body of POST /v1/volumes/{name}/attach.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachBody {
    #[serde(default)]
    pub force: bool,
}

async fn attach_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: AttachBody = parse_body_or_default(&body)?;
    let info = state.cluster.attach_volume(&state.volumes, &name, body.force).await?;
    Ok(Json(info).into_response())
}

async fn unlock_volume(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: UnlockBody = parse_body(&body)?;
    state
        .cluster
        .unlock_volume(&state.volumes, &name, body.passphrase.0)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn attach_device(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let body: AttachBody = parse_body_or_default(&body)?;
    let Some(volume) = state.volumes.get_served(&name) else {
        let coordinator = state
            .cluster
            .with_state(|cluster| cluster.volumes.get(&name).map(|v| v.coordinator));
        return Err(match coordinator {
            None => ApiError(StatusCode::NOT_FOUND, format!("volume {name} does not exist")),
            Some(node) => ApiError(
                StatusCode::CONFLICT,
                format!("volume {name} is served by node {node}, not this one: `ballast volume attach {name} --device` takes it over first"),
            ),
        });
    };
    if let Some(reason) = volume.refusal() {
        return Err(ApiError(StatusCode::CONFLICT, reason));
    }
    if !volume.is_unlocked() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            crate::volume::VolumeIoError::Locked { volume: name }.to_string(),
        ));
    }
    // One host at a time: recorded in Raft before the device exists. A
    // holder that is down has lost its host's device with it (and its
    // writes are fenced by the epoch this node took over at): no force
    // is needed to attach here.
    let holder = state
        .cluster
        .with_state(|cluster| cluster.attachments.get(&name).map(|held| held.node));
    let holder_down =
        holder.is_some_and(|node| node != state.cluster.local.id && !state.cluster.health.liveness(node).up);
    if holder_down && !body.force {
        tracing::warn!(volume = %name, holder = ?holder, "the node the volume is attached to is down; attaching here");
    }
    state
        .cluster
        .change(crate::cluster::state::Command::Attach {
            name: name.clone(),
            node: state.cluster.local.id,
            force: body.force || holder_down,
            now_unix: crate::datadir::now_unix_seconds(),
        })
        .await?;
    let attach = Arc::clone(&state.attach);
    let made = tokio::task::spawn_blocking(move || attach.attach(&volume))
        .await
        .unwrap_or_else(|error| Err(error.to_string()));
    match made {
        Ok(device) => Ok(Json(device).into_response()),
        Err(reason) => {
            // No device: the attachment record goes too.
            drop_attachment(&state, &name, "could not drop the attachment record of a failed attach").await;
            Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, reason))
        }
    }
}

async fn device_of(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    match state.attach.device_of(&name) {
        Some(device) => Ok(Json(device).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("volume {name} is not attached to this host"),
        )),
    }
}

async fn detach_device(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<auth::Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    owned(&state, &caller, &name)?;
    let attach = Arc::clone(&state.attach);
    let detached_name = name.clone();
    tokio::task::spawn_blocking(move || attach.detach(&detached_name))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|reason| ApiError(StatusCode::NOT_FOUND, reason))?;
    drop_attachment(
        &state,
        &name,
        "device removed, but the attach record stays until the cluster takes the change",
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Drops this node's attachment record of `name` (a no-op if another node
/// holds it); `failure` is logged if the cluster does not take the change.
async fn drop_attachment(state: &ApiState, name: &str, failure: &str) {
    let dropped = state
        .cluster
        .change(crate::cluster::state::Command::Detach {
            name: name.to_owned(),
            node: state.cluster.local.id,
        })
        .await;
    if let Err(error) = dropped {
        tracing::warn!(volume = %name, %error, "{failure}");
    }
}

/// Query of GET /v1/alerts.
#[derive(Debug, Deserialize)]
struct AlertsQuery {
    #[serde(default = "default_all")]
    all: bool,
}

fn default_all() -> bool {
    true
}

async fn list_alerts(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(query): axum::extract::Query<AlertsQuery>,
) -> Response {
    let alerts: Vec<crate::cluster::alerts::Alert> = state
        .cluster
        .with_state(|cluster| crate::cluster::alerts::sorted(&cluster.alerts))
        .into_iter()
        .filter(|alert| query.all || alert.is_active())
        .collect();
    Json(alerts).into_response()
}

async fn cluster_status(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(state.cluster.status().await).into_response())
}

async fn cluster_init(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    if state.volumes.count() > 0 {
        return Err(ClusterError::Invalid(
            "this node has volumes of its own; only an empty node can start a cluster".into(),
        )
        .into());
    }
    state.cluster.init().await?;
    write_admin_token(&state);
    Ok(Json(state.cluster.status().await).into_response())
}

async fn cluster_token(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: TokenBody = if body.is_empty() {
        TokenBody {
            ttl_seconds: default_token_ttl(),
        }
    } else {
        parse_body(&body)?
    };
    let token = state.cluster.create_token(body.ttl_seconds).await?;
    Ok((StatusCode::CREATED, Json(token)).into_response())
}

/// The node's admin token becomes cluster-signed (valid on every node).
fn write_admin_token(state: &ApiState) {
    if let Err(error) = state.auth.write_admin_token() {
        tracing::error!(%error, "cannot rewrite the admin token");
    }
}

async fn rotate_certs(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let cluster = Arc::clone(&state.cluster);
    tokio::task::spawn_blocking(move || cluster.renew_certificate())
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))??;
    tracing::info!("node certificate renewed");
    Ok(Json(serde_json::json!({
        "node": state.cluster.local.id,
        "ca_fingerprint": state.cluster.tls.ca_fingerprint(),
    }))
    .into_response())
}

async fn cluster_join(State(state): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let body: JoinBody = parse_body(&body)?;
    state
        .cluster
        .join(&body.address, &body.token, state.volumes.count() > 0)
        .await?;
    write_admin_token(&state);
    Ok(Json(state.cluster.status().await).into_response())
}

async fn node_decommission(State(state): State<Arc<ApiState>>, Path(id): Path<u64>) -> Result<Response, ApiError> {
    let cluster = Arc::clone(&state.cluster);
    if !cluster.is_leader() {
        // The leader runs it; this node passes the request on.
        let leader = cluster
            .leader()
            .and_then(|leader| {
                cluster.with_state(|s| s.nodes.get(&leader).map(|n| format!("http://{}", n.api_address)))
            })
            .ok_or_else(|| {
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the cluster has no leader right now; retry shortly".into(),
                )
            })?;
        let path = format!("/v1/cluster/nodes/{id}/decommission");
        let token = auth::forwarding_token(&cluster);
        let forwarded = tokio::task::spawn_blocking(move || {
            client::ApiClient::with_timeout(&leader, DECOMMISSION_TIMEOUT)
                .with_token(token)
                .post::<_, serde_json::Value>(&path, &serde_json::json!({}))
        })
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
        forwarded.map_err(VolumeOpError::from)?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // A task of its own: a client that hangs up does not stop it half-way.
    let task = tokio::spawn(async move { cluster.decommission(id).await });
    task.await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))??;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Longest a decommission request waits.
pub const DECOMMISSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

async fn node_maintenance(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<u64>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: MaintenanceBody = parse_body(&body)?;
    let admin = if body.on {
        NodeAdmin::Maintenance
    } else {
        NodeAdmin::Active
    };
    state.cluster.change(Command::SetNodeAdmin { id, admin }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
