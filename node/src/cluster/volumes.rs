//! Volume administration in a cluster: the API's create, resize, delete,
//! list and inspect. Metadata changes go through Raft; the local replica
//! is made by the reconciler, which `create` and `resize` wait for when
//! this node holds a replica. Operations that need the volume's
//! coordinator (delete checks its NBD connections; inspect shows its
//! replica's usage) are forwarded to the coordinator's API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::placement::place;
use super::state::{ClusterVolume, Command, Outcome, Rejection};
use super::{Cluster, ClusterError};
use crate::api::client::{ApiClient, ClientError};
use crate::volume::crypt::{ClusterKey, VolumeCipher, VolumeKey, WrappedKey};
use crate::volume::{validate_name, validate_size, VolumeInfo, Volumes, BLOCK_SIZES_BYTES};

/// The peer protocol that brought `Command::SetQos`.
const PROTOCOL_QOS: u16 = 3;

/// Body of `PUT /v1/volumes/{name}/qos`: the whole set (a limit left out is lifted).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosBody {
    #[serde(default)]
    pub io_priority: crate::volume::qos::IoPriority,
    #[serde(default)]
    pub iops_limit: Option<u64>,
    #[serde(default)]
    pub mib_per_s_limit: Option<u64>,
}

/// Most replicas of one volume.
pub const REPLICAS_MAX: u32 = 5;
/// Longest `create`/`resize` wait for the local replica to follow the metadata.
const LOCAL_REPLICA_TIMEOUT: Duration = Duration::from_secs(10);

/// What `volume create` asks for.
#[derive(Debug)]
pub struct CreateVolume {
    pub name: String,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    pub replicas: u32,
    /// The API token subject creating it (recorded with the volume).
    pub owner: String,
    /// A group whose members may use it too ("" = none).
    pub group: String,
    pub encryption: Encryption,
}

/// Whether and how a new volume is encrypted.
#[derive(Debug, Default)]
pub enum Encryption {
    #[default]
    None,
    /// Its key wrapped by the cluster key: unlocked wherever it is served.
    ClusterKey,
    /// Its key wrapped by this passphrase (Argon2id): unlocked by
    /// `volume unlock` on the node serving it.
    Passphrase(zeroize::Zeroizing<String>),
}

/// The associated data a volume's wrapped key is bound to.
#[must_use]
pub fn key_context(name: &str) -> Vec<u8> {
    format!("ballast volume {name}").into_bytes()
}

/// A failure of a volume operation, with the HTTP status the API answers.
#[derive(Debug)]
pub struct VolumeOpError {
    pub status: u16,
    pub message: String,
}

impl From<ClusterError> for VolumeOpError {
    fn from(error: ClusterError) -> Self {
        let status = match &error {
            ClusterError::Rejected(Rejection::Exists(_)) | ClusterError::AlreadyMember(_) => 409,
            ClusterError::Rejected(Rejection::Missing(_)) => 404,
            ClusterError::Rejected(Rejection::Invalid(_)) | ClusterError::Invalid(_) => 400,
            ClusterError::JoinRefused(_) => 403,
            ClusterError::NotInCluster | ClusterError::NoQuorum(_) => 503,
            ClusterError::Internal(_) => 500,
        };
        Self {
            status,
            message: error.to_string(),
        }
    }
}

impl From<crate::volume::VolumeError> for VolumeOpError {
    fn from(error: crate::volume::VolumeError) -> Self {
        use crate::volume::VolumeError as E;
        let status = match &error {
            E::Missing { .. } => 404,
            E::Exists { .. } | E::InUse { .. } => 409,
            E::NoDisks | E::DiskMissing { .. } => 503,
            _ if error.is_client_error() => 400,
            _ => 500,
        };
        Self {
            status,
            message: error.to_string(),
        }
    }
}

impl From<ClientError> for VolumeOpError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Refused { status, message } => Self { status, message },
            other => Self {
                status: 502,
                message: other.to_string(),
            },
        }
    }
}

pub(super) fn invalid(message: String) -> VolumeOpError {
    VolumeOpError { status: 400, message }
}

impl Cluster {
    /// Creates a volume: validates, places replicas, commits, and waits for
    /// the local replica when this node holds one.
    pub async fn create_volume(
        &self,
        volumes: &Arc<Volumes>,
        request: CreateVolume,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        validate_name(&request.name)?;
        validate_size(request.size_bytes)?;
        if !BLOCK_SIZES_BYTES.contains(&request.block_size_bytes) {
            return Err(invalid(format!(
                "block size {} is not supported; use 512 or 4096",
                request.block_size_bytes
            )));
        }
        if request.replicas == 0 || request.replicas > REPLICAS_MAX {
            return Err(invalid(format!("--repl must be 1 to {REPLICAS_MAX}")));
        }
        if self.with_state(|state| state.volumes.contains_key(&request.name)) {
            return Err(
                ClusterError::Rejected(Rejection::Exists(format!("volume {} already exists", request.name))).into(),
            );
        }
        let members: Vec<u64> = self.with_state(|state| state.nodes.keys().copied().collect());
        let views = self.health.views(&members).await;
        let mut placed = self.with_state(|state| place(state, &views, request.replicas as usize, self.local.id));
        if placed.is_err() {
            // This node's view may be a ping old (a node just joined or returned): look again.
            self.ping_all().await;
            let views = self.health.views(&members).await;
            placed = self.with_state(|state| place(state, &views, request.replicas as usize, self.local.id));
        }
        let replica_nodes = placed.map_err(invalid)?;
        let encryption = self.wrap_new_key(&request.name, request.encryption).await?;
        let create = Command::CreateVolume {
            name: request.name.clone(),
            size_bytes: request.size_bytes,
            block_size_bytes: request.block_size_bytes,
            replica_nodes,
            created_unix_seconds: crate::datadir::now_unix_seconds(),
            encryption,
        };
        // The owner is recorded in the same entry: no node sees the volume without it.
        let volume = self
            .expect_volume(Command::Owned {
                owner: request.owner.clone(),
                group: request.group.clone(),
                command: Box::new(create),
            })
            .await?;
        tracing::info!(volume = %volume.name, id = volume.id, replicas = ?volume.replica_nodes, "volume created");
        self.wait_local(volumes, &volume).await;
        Ok(self.describe(volumes, &volume))
    }

    /// A new data key for volume `name`, wrapped as asked (None: plain).
    async fn wrap_new_key(&self, name: &str, encryption: Encryption) -> Result<Option<WrappedKey>, VolumeOpError> {
        let context = key_context(name);
        let key = VolumeKey::generate();
        let wrapped = match encryption {
            Encryption::None => return Ok(None),
            Encryption::ClusterKey => {
                let cluster_key = self.cluster_key().await?;
                WrappedKey::with_cluster_key(&key, &cluster_key, &context)
            }
            Encryption::Passphrase(passphrase) => {
                // Argon2id takes a while and 64 MiB: off the async threads.
                tokio::task::spawn_blocking(move || WrappedKey::with_passphrase(&key, passphrase.as_bytes(), &context))
                    .await
                    .map_err(|error| VolumeOpError {
                        status: 500,
                        message: error.to_string(),
                    })?
            }
        };
        wrapped.map(Some).map_err(|error| VolumeOpError {
            status: 400,
            message: error.to_string(),
        })
    }

    /// The cluster key, made on first use.
    pub(super) async fn cluster_key(&self) -> Result<ClusterKey, VolumeOpError> {
        if let Some(key) = self.with_state(|state| state.cluster_key.clone()) {
            return Ok(key);
        }
        match self
            .change(Command::SetClusterKey {
                key: ClusterKey::generate(),
            })
            .await
        {
            Ok(_) | Err(ClusterError::Rejected(Rejection::Exists(_))) => {}
            Err(error) => return Err(error.into()),
        }
        self.with_state(|state| state.cluster_key.clone())
            .ok_or_else(|| VolumeOpError {
                status: 503,
                message: "the cluster key is not applied on this node yet; retry".into(),
            })
    }

    /// Unlocks a passphrase-encrypted volume on this node, which must serve it.
    pub async fn unlock_volume(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        passphrase: zeroize::Zeroizing<String>,
    ) -> Result<(), VolumeOpError> {
        self.require_member()?;
        let volume = self
            .with_state(|state| state.volumes.get(name).cloned())
            .ok_or_else(|| VolumeOpError {
                status: 404,
                message: format!("volume {name} does not exist"),
            })?;
        let Some(wrapped) = volume.encryption.clone() else {
            return Err(invalid(format!("volume {name} is not encrypted")));
        };
        if !wrapped.needs_passphrase() {
            return Err(invalid(format!(
                "volume {name} is encrypted with the cluster key: it unlocks by itself"
            )));
        }
        if volume.coordinator != self.local.id {
            let api = self
                .with_state(|state| state.nodes.get(&volume.coordinator).map(|n| n.api_address.clone()))
                .unwrap_or_default();
            return Err(VolumeOpError {
                status: 409,
                message: format!(
                    "volume {name} is served by node {} (API {api}): unlock it there (--api http://{api})",
                    volume.coordinator
                ),
            });
        }
        let local = volumes.get(name).ok_or_else(|| VolumeOpError {
            status: 503,
            message: format!("volume {name} has no local replica here yet; retry"),
        })?;
        let context = key_context(volume.key_context_name());
        let key = tokio::task::spawn_blocking(move || wrapped.unwrap_passphrase(passphrase.as_bytes(), &context))
            .await
            .map_err(|error| VolumeOpError {
                status: 500,
                message: error.to_string(),
            })?;
        let key = key.map_err(|error| {
            tracing::warn!(volume = %name, %error, "volume unlock refused");
            VolumeOpError {
                status: 403,
                message: error.to_string(),
            }
        })?;
        local.set_cipher(Some(Arc::new(VolumeCipher::new(&key))));
        tracing::info!(volume = %name, "volume unlocked");
        Ok(())
    }

    /// Asks the volume's coordinator for a verifying scrub (through Raft,
    /// so it runs even if the coordinator changes before it starts).
    pub async fn request_scrub(&self, name: &str) -> Result<ClusterVolume, VolumeOpError> {
        self.require_member()?;
        self.expect_volume(Command::ScrubVolume { name: name.to_owned() }).await
    }

    /// Refuses an operation that rewrites `name` under its users (`doing`,
    /// e.g. "shrinking") while NBD clients are connected to it here
    /// (`connections`) or it is attached to a host: their caches would not
    /// match the data.
    pub(crate) fn require_unused(&self, name: &str, connections: usize, doing: &str) -> Result<(), VolumeOpError> {
        if connections > 0 {
            return Err(crate::volume::VolumeError::InUse {
                name: name.to_owned(),
                connections,
            }
            .into());
        }
        if let Some(attached) = self.with_state(|state| state.attachments.get(name).map(|a| a.node)) {
            return Err(VolumeOpError {
                status: 409,
                message: format!("volume {name} is attached to node {attached}; detach it before {doing}"),
            });
        }
        Ok(())
    }

    /// Grows a volume, or shrinks it when `allow_shrink` (the data past the
    /// new end is discarded on every replica). A shrink is decided by the
    /// coordinator (forwarded there), refused while NBD clients are
    /// connected or the volume is attached to a host.
    pub async fn resize_volume(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        validate_size(size_bytes)?;
        let current = self.volume(name)?;
        if size_bytes < current.size_bytes {
            if !allow_shrink {
                return Err(VolumeOpError {
                    status: 400,
                    message: format!(
                        "volume {name} is {} bytes; shrinking discards the data past the new end: pass --allow-shrink to do it",
                        current.size_bytes
                    ),
                });
            }
            if current.coordinator != self.local.id {
                let api = self.api_of(current.coordinator).ok_or_else(|| VolumeOpError {
                    status: 503,
                    message: format!("the coordinator of {name} is not known; cannot check its clients"),
                })?;
                let path = format!("/v1/volumes/{name}");
                let body = crate::api::ResizeBody {
                    size_bytes,
                    allow_shrink,
                };
                return forward(
                    crate::api::auth::forwarding_token(self),
                    move |client| client.patch(&path, &body),
                    api,
                )
                .await;
            }
            let connections = volumes.get(name).map_or(0, |local| local.connection_count());
            self.require_unused(name, connections, "shrinking")?;
        }
        let volume = self
            .expect_volume(Command::ResizeVolume {
                name: name.to_owned(),
                size_bytes,
                allow_shrink,
            })
            .await?;
        self.wait_local(volumes, &volume).await;
        Ok(self.describe(volumes, &volume))
    }

    /// Changes the number of replicas online: new ones are placed like at
    /// create, start empty and join the in-sync set once the coordinator
    /// resynced them; removal takes out-of-sync replicas first, never the
    /// coordinator.
    /// Sets `name`'s I/O priority class and limits (the whole set: a
    /// limit left None is lifted). Applied by the node serving the volume.
    pub async fn set_qos(&self, volumes: &Volumes, name: &str, body: &QosBody) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        self.volume(name)?;
        crate::volume::qos::Limits {
            iops: body.iops_limit,
            mib_per_s: body.mib_per_s_limit,
        }
        .check()
        .map_err(invalid)?;
        self.require_protocol(PROTOCOL_QOS, "I/O priority and limits")?;
        let volume = self
            .expect_volume(Command::SetQos {
                name: name.to_owned(),
                priority: body.io_priority,
                iops_limit: body.iops_limit,
                mib_per_s_limit: body.mib_per_s_limit,
            })
            .await?;
        Ok(self.describe(volumes, &volume))
    }

    pub async fn update_replicas(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        replicas: u32,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        if replicas == 0 || replicas > REPLICAS_MAX {
            return Err(invalid(format!("--repl must be 1 to {REPLICAS_MAX}")));
        }
        let mut volume = self.volume(name)?;
        let wanted = replicas as usize;
        if wanted > volume.replica_nodes.len() {
            let members: Vec<u64> = self.with_state(|state| state.nodes.keys().copied().collect());
            self.ping_all().await;
            let mut views = self.health.views(&members).await;
            for id in &volume.replica_nodes {
                if let Some(view) = views.get_mut(id) {
                    view.up = false;
                }
            }
            let more = wanted - volume.replica_nodes.len();
            let added = self
                .with_state(|state| place(state, &views, more, self.local.id))
                .map_err(|error| invalid(format!("cannot add {more} replica(s): {error}")))?;
            for node in added {
                volume = self
                    .expect_volume(Command::AddReplica {
                        name: name.to_owned(),
                        node,
                        grow: true,
                    })
                    .await?;
            }
        }
        while volume.replica_nodes.len() > wanted {
            let victim = volume
                .replica_nodes
                .iter()
                .rev()
                .copied()
                .find(|id| !volume.in_sync.contains(id))
                .or_else(|| {
                    volume
                        .replica_nodes
                        .iter()
                        .rev()
                        .copied()
                        .find(|id| *id != volume.coordinator)
                })
                .expect("a volume with several replicas has one besides its coordinator");
            volume = self
                .expect_volume(Command::RemoveReplica {
                    name: name.to_owned(),
                    node: victim,
                    shrink: true,
                })
                .await?;
        }
        tracing::info!(volume = %name, replicas = ?volume.replica_nodes, "replica count changed");
        Ok(self.describe(volumes, &volume))
    }

    pub(super) async fn expect_volume(&self, command: Command) -> Result<ClusterVolume, VolumeOpError> {
        match self.change(command).await? {
            Outcome::Volume(volume) => Ok(volume),
            outcome => Err(VolumeOpError {
                status: 500,
                message: format!("unexpected outcome {outcome:?}"),
            }),
        }
    }

    /// Makes this node the volume's coordinator (failover, or moving where
    /// it is served). Refused unless this node holds an in-sync replica;
    /// refused while the current coordinator is up and may have clients of
    /// it, unless `force`. A coordinator whose latest report shows no
    /// connection to the volume (one that just took it over by failover)
    /// hands it over: it stops serving first (`cluster::lease`).
    pub async fn attach_volume(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        force: bool,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id && !force && self.may_have_clients(volume.coordinator, name) {
            return Err(VolumeOpError {
                status: 409,
                message: format!(
                    "volume {name} is served by node {}, which is up; stop its clients first, or pass --force to take it over (its clients get errors)",
                    volume.coordinator
                ),
            });
        }
        let volume = self
            .expect_volume(Command::SetCoordinator {
                name: name.to_owned(),
                node: self.local.id,
            })
            .await?;
        tracing::info!(volume = %name, epoch = volume.epoch, "this node now serves the volume");
        let started = Instant::now();
        while started.elapsed() < LOCAL_REPLICA_TIMEOUT
            && volumes.get_served(name).is_none_or(|v| v.epoch() < volume.epoch)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.describe(volumes, &volume))
    }

    /// Whether node `id`, up, may have clients of volume `name`: its latest
    /// report lists connections to it, or there is no report to say.
    fn may_have_clients(&self, id: u64, name: &str) -> bool {
        let liveness = self.health.liveness(id);
        liveness.up
            && liveness.report.is_none_or(|report| {
                report
                    .served
                    .iter()
                    .any(|served| served.name == name && served.connections > 0)
            })
    }

    /// Deletes a volume; the coordinator refuses while clients are connected.
    pub async fn delete_volume(&self, volumes: &Arc<Volumes>, name: &str) -> Result<(), VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id {
            if let Some(api) = self.api_of(volume.coordinator) {
                if self.health.liveness(volume.coordinator).up {
                    let path = format!("/v1/volumes/{name}");
                    return forward(
                        crate::api::auth::forwarding_token(self),
                        move |client| client.delete(&path),
                        api,
                    )
                    .await;
                }
            }
            tracing::warn!(volume = %name, coordinator = volume.coordinator, "coordinator unreachable; deleting without its connection check");
        } else if let Some(local) = volumes.get(name) {
            let connections = local.connection_count();
            if connections > 0 {
                return Err(crate::volume::VolumeError::InUse {
                    name: name.to_owned(),
                    connections,
                }
                .into());
            }
        }
        self.change(Command::DeleteVolume { name: name.to_owned() }).await?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// One volume, with its coordinator's replica details.
    pub async fn inspect_volume(&self, volumes: &Arc<Volumes>, name: &str) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id
            && volumes.get(name).is_none()
            && self.health.liveness(volume.coordinator).up
        {
            if let Some(api) = self.api_of(volume.coordinator) {
                let path = format!("/v1/volumes/{name}");
                let token = crate::api::auth::forwarding_token(self);
                if let Ok(info) = forward(token, move |client| client.get::<VolumeInfo>(&path), api).await {
                    return Ok(info);
                }
            }
        }
        Ok(self.describe(volumes, &volume))
    }

    /// Every volume of the cluster.
    pub fn list_volumes(&self, volumes: &Volumes) -> Result<Vec<VolumeInfo>, VolumeOpError> {
        self.require_member()?;
        let all: Vec<ClusterVolume> = self.with_state(|state| state.volumes.values().cloned().collect());
        Ok(all.iter().map(|volume| self.describe(volumes, volume)).collect())
    }

    pub(super) fn volume(&self, name: &str) -> Result<ClusterVolume, VolumeOpError> {
        self.with_state(|state| state.volumes.get(name).cloned())
            .ok_or_else(|| ClusterError::Rejected(Rejection::Missing(format!("volume {name} does not exist"))).into())
    }

    pub(super) fn api_of(&self, node: u64) -> Option<String> {
        self.with_state(|state| state.nodes.get(&node).map(|n| format!("http://{}", n.api_address)))
    }

    /// Cluster facts, plus the local replica's when this node holds one.
    pub(super) fn describe(&self, volumes: &Volumes, volume: &ClusterVolume) -> VolumeInfo {
        let mut info = volumes.inspect(&volume.name).unwrap_or_else(|_| VolumeInfo {
            name: volume.name.clone(),
            id: volume.id,
            size_bytes: volume.size_bytes,
            used_bytes: 0,
            block_size_bytes: volume.block_size_bytes,
            replicas: volume.replicas,
            disk_uuid: uuid::Uuid::nil(),
            disk_path: String::new(),
            connections: 0,
            created_unix_seconds: volume.created_unix_seconds,
            state: "ready".into(),
            coordinator: 0,
            coordinator_nbd: String::new(),
            replica_nodes: Vec::new(),
            in_sync: Vec::new(),
            resyncs: Vec::new(),
            scrub: None,
            epoch: 0,
            health: String::new(),
            replicas_down: Vec::new(),
            alerts: Vec::new(),
            owner: String::new(),
            group: String::new(),
            encryption: String::new(),
            attached_to: 0,
            snapshots: 0,
            snapshot_every_seconds: 0,
            snapshot_keep: 0,
            backup_every_seconds: 0,
            backup_keep: 0,
            backup_target: String::new(),
            standby_of: String::new(),
            standby_applied: String::new(),
            cloned_from: String::new(),
            io_priority: crate::volume::qos::IoPriority::default(),
            iops_limit: None,
            mib_per_s_limit: None,
        });
        info.snapshots = volume.snapshots.len();
        info.snapshot_every_seconds = volume.snapshot_every_seconds;
        info.snapshot_keep = volume.snapshot_keep;
        info.backup_every_seconds = volume.backup_every_seconds;
        info.backup_keep = volume.backup_keep;
        info.backup_target.clone_from(&volume.backup_target);
        info.io_priority = volume.io_priority;
        info.iops_limit = volume.iops_limit;
        info.mib_per_s_limit = volume.mib_per_s_limit;
        if let Some(standby) = &volume.standby_of {
            info.standby_of = format!("{}/{}", standby.target, standby.volume);
            info.standby_applied.clone_from(&standby.applied);
        }
        info.cloned_from = volume
            .clone_of
            .and_then(|id| {
                self.with_state(|state| {
                    state.volumes.values().find_map(|source| {
                        source
                            .snapshots
                            .iter()
                            .find(|(_, taken)| taken.id == id)
                            .map(|(name, _)| crate::volume::snapshot::full_name(&source.name, name))
                    })
                })
            })
            .unwrap_or_default();
        info.encryption = match &volume.encryption {
            None => String::new(),
            Some(wrapped) if wrapped.needs_passphrase() => "passphrase".into(),
            Some(_) => "cluster-key".into(),
        };
        info.size_bytes = volume.size_bytes;
        info.replicas = volume.replicas;
        info.coordinator = volume.coordinator;
        info.coordinator_nbd = self
            .with_state(|state| state.nodes.get(&volume.coordinator).map(|n| n.nbd_address.clone()))
            .unwrap_or_default();
        info.replica_nodes.clone_from(&volume.replica_nodes);
        info.in_sync.clone_from(&volume.in_sync);
        info.resyncs = self.resyncs_of(&volume.name);
        info.scrub = self.scrubs.of(&volume.name);
        info.epoch = volume.epoch;
        let up = |id: u64| self.health.liveness(id).up;
        info.replicas_down = volume.replica_nodes.iter().copied().filter(|id| !up(*id)).collect();
        info.health = super::status::volume_health(volume, up).into();
        (info.owner, info.group, info.attached_to) = self.with_state(|state| {
            (
                state.owners.get(&volume.name).cloned().unwrap_or_default(),
                state.groups.get(&volume.name).cloned().unwrap_or_default(),
                state.attachments.get(&volume.name).map_or(0, |a| a.node),
            )
        });
        info.alerts = self.with_state(|state| {
            super::alerts::sorted(&state.alerts)
                .into_iter()
                .filter(|alert| alert.is_active() && alert.subject == volume.name && alert.kind.starts_with("volume_"))
                .collect()
        });
        info
    }

    /// Waits (bounded) until the local replica matches `volume`, when this node holds one.
    pub(super) async fn wait_local(&self, volumes: &Volumes, volume: &ClusterVolume) {
        if !volume.replica_nodes.contains(&self.local.id) {
            return;
        }
        let started = Instant::now();
        while started.elapsed() < LOCAL_REPLICA_TIMEOUT {
            let ready = volumes
                .get(&volume.name)
                .is_some_and(|local| local.id == volume.id && local.size_bytes() >= volume.size_bytes);
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(volume = %volume.name, "local replica not ready within {LOCAL_REPLICA_TIMEOUT:?}");
    }
}

/// Runs a blocking API call against another node.
pub(super) async fn forward<T: Send + 'static>(
    token: Option<String>,
    call: impl FnOnce(&ApiClient) -> Result<T, ClientError> + Send + 'static,
    api: String,
) -> Result<T, VolumeOpError> {
    tokio::task::spawn_blocking(move || call(&ApiClient::new(&api).with_token(token)))
        .await
        .map_err(|error| VolumeOpError {
            status: 500,
            message: error.to_string(),
        })?
        .map_err(VolumeOpError::from)
}
