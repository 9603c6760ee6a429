//! Backups of a volume to a target off the cluster, and restores from one,
//! run by the volume's coordinator (requests are forwarded there): it holds
//! the snapshot's copy, so the data is read with no network hop.
//!
//! A backup reads a snapshot: the one named, or one it takes now
//! (`backup-<time>`). When the target holds an earlier backup of this
//! volume from this cluster whose snapshot still exists here, only the
//! chunks the snapshot diff marks as changed since it are read; the rest
//! are that backup's chunks. Otherwise every chunk holding data is read
//! (and still deduplicated against the target). After a backup from a
//! snapshot it took, the previous backup's own snapshot is deleted: one
//! such snapshot per volume stays, as the base of the next backup.
//!
//! Targets can be registered by name (`backup target add`): their secret
//! and S3 options are kept in the cluster's metadata sealed under the
//! cluster key, so scheduled backups (`volume update --backup-every`) run
//! unattended on whichever node coordinates the volume, and commands may
//! name the target instead of giving its address and secret. Both are Raft
//! commands of peer protocol 2: refused until every member speaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::snapshots::{served_here, serving_here, DiffQuery};
use super::state::{BackupTargetRecord, ClusterState, Command};
use super::volumes::{forward, invalid, VolumeOpError};
use super::Cluster;
use crate::backup::job::{self, BackupPlan, JobInfo};
use crate::backup::repo::{Repo, RepoError};
use crate::backup::target::TargetUrl;
use crate::backup::{BackupBody, RestoreBody, Secret, TargetOptions};
use crate::volume::{snapshot, validate_name, VolumeInfo, Volumes};

/// The peer protocol that brought registered targets and backup schedules.
const PROTOCOL_BACKUP_TARGETS: u16 = 2;
/// Shortest time between scheduled backups.
pub const BACKUP_EVERY_MIN_SECONDS: u64 = 10;
/// Most backups of one volume a schedule keeps.
pub const BACKUP_KEEP_MAX: u32 = 10_000;
/// A scheduled backup that failed is tried again after this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// What a registered target's sealed record is bound to.
const SEAL_DOMAIN: &[u8] = b"ballast backup target v1\0";

/// Body of POST /v1/backup-targets.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetBody {
    pub name: String,
    pub url: String,
    pub secret: Secret,
    #[serde(default)]
    pub options: TargetOptions,
}

/// A registered target as listed (never its secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub url: String,
    pub created_unix_seconds: u64,
}

/// Body of PUT /v1/volumes/{name}/backup-schedule.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupScheduleBody {
    /// Seconds between scheduled backups (0: none).
    pub every_seconds: u64,
    /// Backups of the volume kept in the target (the oldest beyond are deleted).
    #[serde(default)]
    pub keep: u32,
    /// The registered target's name.
    #[serde(default)]
    pub target: String,
}

/// What a registered target's sealed record holds.
#[derive(Serialize, Deserialize)]
struct SealedTarget {
    secret: Secret,
    options: TargetOptions,
}

/// Scheduled backups as seen by the node coordinating the volumes.
#[derive(Default)]
pub struct Scheduled {
    /// When each volume's last backup succeeded (read from its target once).
    last: parking_lot::Mutex<BTreeMap<String, u64>>,
    running: parking_lot::Mutex<BTreeSet<String>>,
    /// Held while a standby applies a backup, and by a promote.
    standby_apply: tokio::sync::Mutex<()>,
    /// Registered targets opened here, with the sealed record they were opened from.
    opened: parking_lot::Mutex<BTreeMap<String, (String, Arc<Repo>)>>,
}

/// Ok when every member of `members` (id, the newest peer protocol it
/// reported, None: not heard from) speaks `version`.
fn protocol_gate(members: &[(u64, Option<u16>)], version: u16, what: &str) -> Result<(), String> {
    for (id, speaks) in members {
        match speaks {
            Some(max) if *max >= version => {}
            Some(max) => {
                return Err(format!(
                    "{what} needs peer protocol {version} on every member; node {id} speaks up to {max}: upgrade it first (`ballast cluster upgrade-status`)"
                ))
            }
            None => {
                return Err(format!(
                    "{what} needs peer protocol {version} on every member; node {id} has not answered, so its release is not known (retry when it is up)"
                ))
            }
        }
    }
    Ok(())
}

/// Names of the snapshots backups take start with this.
pub const BACKUP_PREFIX: &str = "backup-";

fn repo_error(error: RepoError) -> VolumeOpError {
    let status = match &error {
        RepoError::NotFound(_) => 404,
        RepoError::Locked(_) => 409,
        RepoError::Crypto(
            crate::backup::crypto::CryptoError::WrongSecret | crate::backup::crypto::CryptoError::WrongKind { .. },
        ) => 403,
        RepoError::Target(crate::backup::target::TargetError::BadUrl { .. }) => 400,
        RepoError::Target(crate::backup::target::TargetError::Denied { .. }) => 403,
        RepoError::Target(crate::backup::target::TargetError::Full { .. }) => 507,
        _ => 500,
    };
    VolumeOpError {
        status,
        message: error.to_string(),
    }
}

/// Runs `work` on the target (blocking I/O, Argon2id) off the async workers.
async fn on_target<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RepoError> + Send + 'static,
) -> Result<T, VolumeOpError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| VolumeOpError {
            status: 500,
            message: error.to_string(),
        })?
        .map_err(repo_error)
}

/// Opens the target; `create` sets a new one up.
async fn open_repo(
    target: &str,
    options: crate::backup::TargetOptions,
    secret: crate::backup::Secret,
    create: bool,
) -> Result<Arc<Repo>, VolumeOpError> {
    let url = TargetUrl::parse(target).map_err(|error| invalid(error.to_string()))?;
    let params = create.then_some(crate::volume::crypt::KDF_PARAMS_DEFAULT);
    on_target(move || Repo::open(&url, &options, &secret, params).map(Arc::new)).await
}

fn snapshot_name_now() -> String {
    let id = crate::backup::repo::backup_id("", crate::datadir::now_unix_seconds());
    format!("{BACKUP_PREFIX}{}", id.trim_start_matches('-'))
}

impl Cluster {
    /// POSTs `body` to `/v1/volumes/{name}/{route}` on `volume`'s coordinator (a forward).
    async fn post_to_coordinator<B, T>(
        &self,
        volume: &super::state::ClusterVolume,
        route: &str,
        body: B,
    ) -> Result<T, VolumeOpError>
    where
        B: Serialize + Send + 'static,
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let api = self.coordinator_api(volume)?;
        let path = format!("/v1/volumes/{}/{route}", volume.name);
        forward(
            crate::api::auth::forwarding_token(self),
            move |client| client.post(&path, &body),
            api,
        )
        .await
    }

    /// Refused (409) unless every member speaks peer protocol `version`.
    pub(super) fn require_protocol(&self, version: u16, what: &str) -> Result<(), VolumeOpError> {
        let members: Vec<(u64, Option<u16>)> = self
            .with_state(|state| state.nodes.keys().copied().collect::<Vec<_>>())
            .into_iter()
            .map(|id| {
                let speaks = if id == self.local.id {
                    Some(crate::peer::handshake::local().max)
                } else {
                    let liveness = self.health.liveness(id);
                    liveness.report.filter(|_| liveness.up).map(|report| {
                        if report.protocol_max == 0 {
                            1
                        } else {
                            report.protocol_max
                        }
                    })
                };
                (id, speaks)
            })
            .collect();
        protocol_gate(&members, version, what).map_err(|message| VolumeOpError { status: 409, message })
    }

    /// The address, options and secret of `target`: a URL with the secret
    /// given, or a registered target's name (its sealed record opened).
    async fn resolve_target(
        &self,
        target: &str,
        secret: Option<Secret>,
        options: TargetOptions,
    ) -> Result<(String, TargetOptions, Secret), VolumeOpError> {
        if target.contains("://") {
            let secret = secret.ok_or_else(|| {
                invalid(format!(
                    "{target}: give the target's secret (--passphrase-file or --key-file), or register it with `ballast backup target add`"
                ))
            })?;
            return Ok((target.to_owned(), options, secret));
        }
        let record = self
            .with_state(|state| state.backup_targets.get(target).cloned())
            .ok_or_else(|| VolumeOpError {
                status: 404,
                message: format!("no backup target named {target} (`ballast backup target list`; or give its URL)"),
            })?;
        let key = self.cluster_key().await?;
        let sealed = crate::backup::crypto::from_hex(&record.sealed).unwrap_or_default();
        let mut domain = SEAL_DOMAIN.to_vec();
        domain.extend_from_slice(target.as_bytes());
        let plain = key.open_bytes(&domain, &sealed).map_err(|error| VolumeOpError {
            status: 500,
            message: format!("cannot open the record of backup target {target}: {error}"),
        })?;
        let opened: SealedTarget = serde_json::from_slice(&plain).map_err(|error| VolumeOpError {
            status: 500,
            message: format!("the record of backup target {target} is not readable: {error}"),
        })?;
        Ok((record.url, opened.options, opened.secret))
    }

    /// Opens `target` (a URL with its secret, or a registered name); a
    /// registered target opened once is kept while its record is unchanged,
    /// so schedules and standbys do not run Argon2id at every look.
    async fn open_target(
        &self,
        target: &str,
        secret: Option<Secret>,
        options: TargetOptions,
        create: bool,
    ) -> Result<Arc<Repo>, VolumeOpError> {
        let sealed = if target.contains("://") {
            None
        } else {
            self.with_state(|state| state.backup_targets.get(target).map(|record| record.sealed.clone()))
        };
        if let Some(sealed) = &sealed {
            if let Some((opened_as, repo)) = self.scheduled_backups.opened.lock().get(target) {
                if opened_as == sealed {
                    return Ok(Arc::clone(repo));
                }
            }
        }
        let (url, options, secret) = self.resolve_target(target, secret, options).await?;
        let repo = open_repo(&url, options, secret, create).await?;
        if let Some(sealed) = sealed {
            self.scheduled_backups
                .opened
                .lock()
                .insert(target.to_owned(), (sealed, Arc::clone(&repo)));
        }
        Ok(repo)
    }

    /// Registers target `body.name` (opened first: set up if new, the secret checked).
    pub async fn add_backup_target(&self, body: TargetBody) -> Result<TargetInfo, VolumeOpError> {
        self.require_member()?;
        validate_name(&body.name).map_err(|_| {
            invalid(format!(
                "invalid target name {:?}: names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
                body.name
            ))
        })?;
        self.require_protocol(PROTOCOL_BACKUP_TARGETS, "registering a backup target")?;
        open_repo(&body.url, body.options.clone(), body.secret.clone(), true).await?;
        let key = self.cluster_key().await?;
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(&SealedTarget {
                secret: body.secret,
                options: body.options,
            })
            .expect("a target record serializes"),
        );
        let mut domain = SEAL_DOMAIN.to_vec();
        domain.extend_from_slice(body.name.as_bytes());
        let record = BackupTargetRecord {
            url: body.url.clone(),
            sealed: crate::backup::crypto::to_hex(&key.seal_bytes(&domain, &plain)),
            created_unix_seconds: crate::datadir::now_unix_seconds(),
        };
        let created_unix_seconds = record.created_unix_seconds;
        self.change(Command::SetBackupTarget {
            name: body.name.clone(),
            record,
        })
        .await?;
        tracing::info!(target = %body.name, url = %body.url, "backup target registered");
        Ok(TargetInfo {
            name: body.name,
            url: body.url,
            created_unix_seconds,
        })
    }

    #[must_use]
    pub fn list_backup_targets(&self) -> Vec<TargetInfo> {
        self.with_state(|state| {
            state
                .backup_targets
                .iter()
                .map(|(name, record)| TargetInfo {
                    name: name.clone(),
                    url: record.url.clone(),
                    created_unix_seconds: record.created_unix_seconds,
                })
                .collect()
        })
    }

    /// The backups in registered target `name`, oldest first.
    pub async fn registered_backups(&self, name: &str) -> Result<Vec<crate::backup::repo::Manifest>, VolumeOpError> {
        self.require_member()?;
        let repo = self.registered_repo(name).await?;
        on_target(move || repo.manifests()).await
    }

    /// Checks the chunks of `backup` (every backup: None) in registered
    /// target `name`, as `backup verify` does with the target's secret.
    pub async fn verify_registered(
        &self,
        name: &str,
        backup: Option<String>,
    ) -> Result<crate::backup::repo::VerifyReport, VolumeOpError> {
        self.require_member()?;
        let repo = self.registered_repo(name).await?;
        on_target(move || {
            let _lock = repo.lock(false, "verify (through the cluster)")?;
            repo.verify(backup.as_deref(), |_, _| {})
        })
        .await
    }

    /// Deletes `backup` from registered target `name` and frees the chunks
    /// no other backup uses.
    pub async fn delete_registered_backup(
        &self,
        name: &str,
        backup: String,
    ) -> Result<crate::backup::repo::DeleteReport, VolumeOpError> {
        self.require_member()?;
        let repo = self.registered_repo(name).await?;
        on_target(move || repo.delete(&backup)).await
    }

    async fn registered_repo(&self, name: &str) -> Result<Arc<Repo>, VolumeOpError> {
        if name.contains("://") {
            return Err(invalid(format!("{name}: give a registered target's name")));
        }
        self.open_target(name, None, TargetOptions::default(), false).await
    }

    pub async fn delete_backup_target(&self, name: &str) -> Result<(), VolumeOpError> {
        self.require_member()?;
        self.change(Command::DeleteBackupTarget { name: name.to_owned() })
            .await?;
        Ok(())
    }

    /// Sets (or clears, `every_seconds` 0) scheduled backups of `name`.
    pub async fn set_backup_schedule(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        body: &BackupScheduleBody,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        self.volume(name)?;
        if body.every_seconds != 0 {
            if body.every_seconds < BACKUP_EVERY_MIN_SECONDS {
                return Err(invalid(format!(
                    "--backup-every must be at least {BACKUP_EVERY_MIN_SECONDS} s (or 0 to stop)"
                )));
            }
            if !(1..=BACKUP_KEEP_MAX).contains(&body.keep) {
                return Err(invalid(format!(
                    "--backup-keep must be 1 to {BACKUP_KEEP_MAX} with --backup-every"
                )));
            }
            if body.target.is_empty() {
                return Err(invalid(
                    "--backup-target NAME is needed with --backup-every (a target registered with `ballast backup target add`)".into(),
                ));
            }
        }
        self.require_protocol(PROTOCOL_BACKUP_TARGETS, "a backup schedule")?;
        let volume = self
            .expect_volume(Command::SetBackupSchedule {
                name: name.to_owned(),
                every_seconds: body.every_seconds,
                keep: body.keep,
                target: if body.every_seconds == 0 {
                    String::new()
                } else {
                    body.target.clone()
                },
            })
            .await?;
        self.scheduled_backups.last.lock().remove(name);
        Ok(self.describe(volumes, &volume))
    }

    /// Starts a backup of `name` (on its coordinator: forwarded there).
    pub async fn start_backup(
        self: &Arc<Self>,
        volumes: &Arc<Volumes>,
        name: &str,
        body: BackupBody,
    ) -> Result<JobInfo, VolumeOpError> {
        let jobs = &self.backup_jobs;
        self.require_member()?;
        let volume = self.volume(name)?;
        if body.mib_per_s == Some(0) {
            return Err(invalid("--mib-per-s must be at least 1".into()));
        }
        if volume.coordinator != self.local.id {
            return self.post_to_coordinator(&volume, "backups", body).await;
        }
        let live = served_here(volumes, name)?;
        let repo = self.open_target(&body.target, body.secret, body.options, true).await?;
        let lock = {
            let (repo, what) = (Arc::clone(&repo), format!("backup of {name}"));
            on_target(move || repo.lock(false, &what)).await?
        };
        let (snapshot_name, took) = match body.snapshot {
            Some(snapshot) => {
                let taken = volume
                    .snapshots
                    .get(&snapshot)
                    .filter(|t| t.ready)
                    .ok_or_else(|| VolumeOpError {
                        status: 404,
                        message: format!("snapshot {name}@{snapshot} does not exist"),
                    })?;
                if !taken.holders.contains(&self.local.id) {
                    return Err(VolumeOpError {
                        status: 409,
                        message: format!(
                            "node {} serves {name} but holds no copy of {name}@{snapshot} (holders: {:?})",
                            self.local.id, taken.holders
                        ),
                    });
                }
                (snapshot, false)
            }
            None => {
                let base = snapshot_name_now();
                let mut snapshot = base.clone();
                for n in 2.. {
                    if !volume.snapshots.contains_key(&snapshot) {
                        break;
                    }
                    snapshot = format!("{base}-{n}");
                }
                self.create_snapshot(volumes, name, &snapshot).await?;
                (snapshot, true)
            }
        };
        let volume = self.volume(name)?;
        let taken = volume
            .snapshots
            .get(&snapshot_name)
            .cloned()
            .ok_or_else(|| VolumeOpError {
                status: 409,
                message: format!("snapshot {name}@{snapshot_name} was deleted before the backup started"),
            })?;
        let copy = volumes
            .get_served(&snapshot::full_name(name, &snapshot_name))
            .ok_or_else(|| VolumeOpError {
                status: 503,
                message: format!("this node's copy of {name}@{snapshot_name} is not ready; retry"),
            })?;
        let cluster_id = self.cluster_id().map(|id| id.to_string()).unwrap_or_default();
        // The newest earlier backup of this volume from this cluster whose snapshot is still here.
        let parent = {
            let repo = Arc::clone(&repo);
            on_target(move || repo.manifests()).await?
        }
        .into_iter()
        .rev()
        .find(|m| {
            m.volume == name
                && m.cluster_id == cluster_id
                && m.size_bytes == volume.size_bytes
                && m.snapshot != snapshot_name
                && volume
                    .snapshots
                    .get(&m.snapshot)
                    .is_some_and(|t| t.id == m.snapshot_id && t.ready)
                && volumes.snapshot(&snapshot::full_name(name, &m.snapshot)).is_some()
        });
        let diff = self
            .snapshot_diff(
                volumes,
                name,
                DiffQuery {
                    from: parent.as_ref().map(|p| p.snapshot.clone()),
                    to: Some(snapshot_name.clone()),
                },
            )
            .await?;
        let id = {
            let (repo, name) = (Arc::clone(&repo), name.to_owned());
            on_target(move || repo.new_backup_id(&name)).await?
        };
        let job = jobs.start(JobInfo {
            kind: "backup".into(),
            volume: name.to_owned(),
            node_api: self.api_of(self.local.id).unwrap_or_default(),
            backup: id.clone(),
            parent: parent.as_ref().map(|p| p.id.clone()),
            snapshot: snapshot_name.clone(),
            total_bytes: volume.size_bytes,
            ..JobInfo::default()
        });
        let info = job.info();
        tracing::info!(volume = %name, backup = %id, snapshot = %snapshot_name, parent = ?info.parent, changed_bytes = diff.changed_bytes, "backup starts");
        let plan = BackupPlan {
            id,
            volume: name.to_owned(),
            snapshot: snapshot_name.clone(),
            snapshot_id: taken.id,
            cluster_id,
            size_bytes: volume.size_bytes,
            parent,
            changed: diff.changed,
            mib_per_s: body.mib_per_s,
        };
        let (cluster, name) = (Arc::clone(self), name.to_owned());
        crate::engine::sched::spawn_background(crate::engine::Work::Backup, async move {
            let parent_snapshot = plan.parent.as_ref().map(|p| p.snapshot.clone());
            let outcome = job::run_backup(repo, Arc::new(lock), copy, live, plan, &job).await;
            match &outcome {
                Ok(manifest) => {
                    tracing::info!(volume = %name, backup = %manifest.id, read_bytes = manifest.read_bytes, stored_bytes = manifest.stored_bytes, "backup done");
                    // The previous base is no longer needed when this backup took its own.
                    if let Some(old) = parent_snapshot.filter(|old| took && old.starts_with(BACKUP_PREFIX)) {
                        if let Err(error) = cluster.delete_snapshot(&name, &old).await {
                            tracing::warn!(volume = %name, snapshot = %old, error = %error.message, "cannot delete the previous backup's snapshot");
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(volume = %name, %error, "backup failed");
                    if took {
                        let _ = cluster.delete_snapshot(&name, &snapshot_name).await;
                    }
                }
            }
            job.finish(outcome.map(|_| ()));
        });
        Ok(info)
    }

    /// Starts restoring backup `body.backup` into volume `name` (on its
    /// coordinator: forwarded there). Refused while clients use the volume.
    pub async fn start_restore(
        self: &Arc<Self>,
        volumes: &Arc<Volumes>,
        name: &str,
        body: RestoreBody,
    ) -> Result<JobInfo, VolumeOpError> {
        let jobs = &self.backup_jobs;
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id {
            return self.post_to_coordinator(&volume, "backup-restore", body).await;
        }
        if body.mib_per_s == Some(0) {
            return Err(invalid("--mib-per-s must be at least 1".into()));
        }
        let mib_per_s = body.mib_per_s;
        let local = served_here(volumes, name)?;
        self.require_unused(name, local.connection_count(), "restoring a backup into")?;
        // From here no client may open it until the restore ends.
        if !local.set_restoring(true) {
            return Err(VolumeOpError {
                status: 409,
                message: format!("a backup is being restored into {name} already"),
            });
        }
        let restoring = Restoring(Arc::clone(&local));
        if local.connection_count() > 0 {
            return Err(VolumeOpError {
                status: 409,
                message: format!("a client connected to {name}; disconnect it first"),
            });
        }
        let repo = self.open_target(&body.target, body.secret, body.options, false).await?;
        let (manifest, lock) = {
            let (repo, backup, what) = (Arc::clone(&repo), body.backup.clone(), format!("restore into {name}"));
            on_target(move || {
                let lock = repo.lock(false, &what)?;
                Ok((repo.manifest(&backup)?, lock))
            })
            .await?
        };
        if manifest.size_bytes > local.size_bytes() {
            return Err(invalid(format!(
                "backup {} is of a {}-byte volume; {name} holds {} bytes (resize it, or restore into a new volume)",
                manifest.id,
                manifest.size_bytes,
                local.size_bytes()
            )));
        }
        let job = jobs.start(JobInfo {
            kind: "restore".into(),
            volume: name.to_owned(),
            node_api: self.api_of(self.local.id).unwrap_or_default(),
            backup: manifest.id.clone(),
            parent: manifest.parent.clone(),
            snapshot: manifest.snapshot.clone(),
            total_bytes: manifest.size_bytes,
            ..JobInfo::default()
        });
        let info = job.info();
        tracing::info!(volume = %name, backup = %manifest.id, "restore of a backup starts");
        let name = name.to_owned();
        crate::engine::sched::spawn_background(crate::engine::Work::Backup, async move {
            let _restoring = restoring;
            let outcome = job::run_restore(repo, Arc::new(lock), local, &manifest, None, mib_per_s, &job).await;
            match &outcome {
                Ok(()) => tracing::info!(volume = %name, backup = %manifest.id, "restore of a backup done"),
                Err(error) => {
                    tracing::error!(volume = %name, backup = %manifest.id, %error, "restore of a backup failed")
                }
            }
            job.finish(outcome);
        });
        Ok(info)
    }
}

/// Starts the scheduled backups due of the volumes this node coordinates
/// and serves (one at a time per volume); after each, deletes that
/// volume's oldest backups in the target beyond its `backup_keep`.
pub fn start_scheduled(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Arc<Volumes>) {
    let now = crate::datadir::now_unix_seconds();
    for volume in state.volumes.values() {
        if volume.backup_every_seconds == 0 || !serving_here(cluster, volume, volumes) {
            continue;
        }
        let last = cluster.scheduled_backups.last.lock().get(&volume.name).copied();
        if last.is_some_and(|last| now < last + volume.backup_every_seconds) {
            continue;
        }
        if !cluster.scheduled_backups.running.lock().insert(volume.name.clone()) {
            continue;
        }
        let (cluster, volumes, volume) = (Arc::clone(cluster), Arc::clone(volumes), volume.clone());
        crate::engine::sched::spawn_background(crate::engine::Work::Backup, async move {
            scheduled_backup(&cluster, &volumes, &volume, last).await;
            cluster.scheduled_backups.running.lock().remove(&volume.name);
        });
    }
}

async fn scheduled_backup(
    cluster: &Arc<Cluster>,
    volumes: &Arc<Volumes>,
    volume: &super::state::ClusterVolume,
    last: Option<u64>,
) {
    let name = volume.name.as_str();
    let target = volume.backup_target.clone();
    let repo = match cluster
        .open_target(&target, None, TargetOptions::default(), false)
        .await
    {
        Ok(repo) => repo,
        Err(error) => {
            tracing::warn!(volume = %name, %target, error = %error.message, "scheduled backup: cannot open the target; retried later");
            note_attempt(cluster, name, volume.backup_every_seconds, false);
            return;
        }
    };
    let cluster_id = cluster.cluster_id().map(|id| id.to_string()).unwrap_or_default();
    if last.is_none() {
        // First look since this node took the volume: when was its last backup?
        let (repo2, name2, cluster_id2) = (Arc::clone(&repo), name.to_owned(), cluster_id.clone());
        let newest = tokio::task::spawn_blocking(move || {
            repo2.manifests().map(|all| {
                all.iter()
                    .filter(|m| m.volume == name2 && m.cluster_id == cluster_id2)
                    .map(|m| m.created_unix_seconds)
                    .max()
            })
        })
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
        cluster
            .scheduled_backups
            .last
            .lock()
            .insert(name.to_owned(), newest.unwrap_or(0));
        if newest.is_some_and(|newest| crate::datadir::now_unix_seconds() < newest + volume.backup_every_seconds) {
            return;
        }
    }
    let body = BackupBody {
        target: target.clone(),
        secret: None,
        options: TargetOptions::default(),
        snapshot: None,
        mib_per_s: None,
    };
    let started = match cluster.start_backup(volumes, name, body).await {
        Ok(job) => job,
        Err(error) => {
            tracing::warn!(volume = %name, %target, error = %error.message, "scheduled backup did not start; retried later");
            note_attempt(cluster, name, volume.backup_every_seconds, false);
            return;
        }
    };
    let finished = loop {
        match cluster.backup_jobs.get(started.id) {
            Some(job) if job.state == "running" => tokio::time::sleep(Duration::from_secs(1)).await,
            other => break other,
        }
    };
    let ok = finished.as_ref().is_some_and(|job| job.state == "done");
    note_attempt(cluster, name, volume.backup_every_seconds, ok);
    if !ok {
        return;
    }
    // Prune: this volume's backups from this cluster beyond `backup_keep`, oldest first.
    let (keep, name) = (volume.backup_keep as usize, name.to_owned());
    let pruned = tokio::task::spawn_blocking(move || {
        let mine: Vec<String> = repo
            .manifests()?
            .into_iter()
            .filter(|m| m.volume == name && m.cluster_id == cluster_id)
            .map(|m| m.id)
            .collect();
        let mut deleted = Vec::new();
        for id in mine.iter().take(mine.len().saturating_sub(keep)) {
            // The backup's own lock may still be being released: one retry.
            let outcome = repo.delete(id).or_else(|error| match error {
                RepoError::Locked(_) => {
                    std::thread::sleep(Duration::from_secs(2));
                    repo.delete(id)
                }
                other => Err(other),
            });
            outcome?;
            deleted.push(id.clone());
        }
        Ok::<_, RepoError>((name, deleted))
    })
    .await;
    match pruned {
        Ok(Ok((name, deleted))) if !deleted.is_empty() => {
            tracing::info!(volume = %name, ?deleted, "scheduled backup: older backups deleted beyond --backup-keep");
        }
        Ok(Err(error)) => {
            tracing::warn!(volume = %volume.name, %error, "scheduled backup: cannot delete older backups; tried again after the next")
        }
        _ => {}
    }
}

/// Records a scheduled backup's attempt: the next is due a period after a
/// success, `RETRY_AFTER_FAILURE` after a failure.
fn note_attempt(cluster: &Cluster, name: &str, every: u64, ok: bool) {
    let now = crate::datadir::now_unix_seconds();
    let last = if ok {
        now
    } else {
        (now + RETRY_AFTER_FAILURE.as_secs()).saturating_sub(every)
    };
    cluster.scheduled_backups.last.lock().insert(name.to_owned(), last);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_commands_wait_for_every_member_to_speak_their_protocol() {
        assert!(protocol_gate(&[(1, Some(2)), (2, Some(3))], 2, "x").is_ok());
        let old = protocol_gate(&[(1, Some(2)), (2, Some(1))], 2, "a backup schedule").unwrap_err();
        assert!(
            old.contains("node 2 speaks up to 1") && old.contains("upgrade-status"),
            "{old}"
        );
        let silent = protocol_gate(&[(1, Some(2)), (3, None)], 2, "x").unwrap_err();
        assert!(silent.contains("node 3 has not answered"), "{silent}");
    }
}

/// Clients are refused while this lives (a restore under way).
struct Restoring(Arc<crate::volume::Volume>);

impl Drop for Restoring {
    fn drop(&mut self) {
        self.0.set_restoring(false);
    }
}

/// A standby looks for a new backup of its source this often.
const STANDBY_POLL: Duration = Duration::from_secs(10);

/// Body of POST /v1/volumes/{name}/standby.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyBody {
    /// A registered target.
    pub target: String,
    /// The volume whose backups it follows.
    pub volume: String,
}

impl Cluster {
    /// Makes `name` (no client on it) a standby of `body.volume`'s backups
    /// in registered target `body.target` (on its coordinator: forwarded).
    pub async fn set_standby(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        body: StandbyBody,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id {
            return self.post_to_coordinator(&volume, "standby", body).await;
        }
        let local = served_here(volumes, name)?;
        self.require_unused(name, local.connection_count(), "making a standby of")?;
        self.require_protocol(PROTOCOL_BACKUP_TARGETS, "a standby volume")?;
        if body.target.contains("://") {
            return Err(invalid(format!(
                "{}: a standby follows a registered target (`ballast backup target add NAME URL`)",
                body.target
            )));
        }
        let backups = self.registered_backups(&body.target).await?;
        let newest = backups
            .iter()
            .rev()
            .find(|m| m.volume == body.volume)
            .ok_or_else(|| VolumeOpError {
                status: 404,
                message: format!("target {} holds no backup of {}", body.target, body.volume),
            })?;
        if newest.size_bytes > volume.size_bytes {
            return Err(invalid(format!(
                "{} is {} bytes in its newest backup; {name} holds {}",
                body.volume, newest.size_bytes, volume.size_bytes
            )));
        }
        let volume = self
            .expect_volume(Command::SetStandby {
                name: name.to_owned(),
                standby: Some(super::state::StandbyOf {
                    target: body.target.clone(),
                    volume: body.volume.clone(),
                    applied: String::new(),
                    applied_unix_seconds: 0,
                }),
            })
            .await?;
        tracing::info!(volume = %name, target = %body.target, source = %body.volume, "volume is now a standby");
        Ok(self.describe(volumes, &volume))
    }

    /// Makes standby `name` a normal volume, after the backup being
    /// applied (if any) is whole (on its coordinator: forwarded).
    pub async fn promote(&self, volumes: &Arc<Volumes>, name: &str) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.standby_of.is_none() {
            return Err(invalid(format!("volume {name} is not a standby")));
        }
        if volume.coordinator != self.local.id {
            return self
                .post_to_coordinator(&volume, "promote", serde_json::json!({}))
                .await;
        }
        // No apply runs while this is held: the volume is one backup, whole.
        let _no_apply = self.scheduled_backups.standby_apply.lock().await;
        let volume = self
            .expect_volume(Command::SetStandby {
                name: name.to_owned(),
                standby: None,
            })
            .await?;
        volumes.set_standby(name, false);
        tracing::warn!(volume = %name, "standby promoted: a normal volume now");
        Ok(self.describe(volumes, &volume))
    }
}

/// Starts bringing each standby this node coordinates up to its source's
/// newest backup (a poll every `STANDBY_POLL` per standby).
pub fn start_standby_sync(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Arc<Volumes>) {
    let now = crate::datadir::now_unix_seconds();
    for volume in state.volumes.values() {
        if volume.standby_of.is_none() || !serving_here(cluster, volume, volumes) {
            continue;
        }
        let key = format!("standby:{}", volume.name);
        let last = cluster.scheduled_backups.last.lock().get(&key).copied();
        if last.is_some_and(|last| now < last + STANDBY_POLL.as_secs()) {
            continue;
        }
        if !cluster.scheduled_backups.running.lock().insert(key.clone()) {
            continue;
        }
        cluster.scheduled_backups.last.lock().insert(key.clone(), now);
        let (cluster, volumes, name) = (Arc::clone(cluster), Arc::clone(volumes), volume.name.clone());
        crate::engine::sched::spawn_background(crate::engine::Work::Backup, async move {
            if let Err(error) = standby_sync(&cluster, &volumes, &name).await {
                tracing::warn!(volume = %name, %error, "standby: cannot apply the newest backup; tried again later");
            }
            cluster.scheduled_backups.running.lock().remove(&key);
        });
    }
}

async fn standby_sync(cluster: &Arc<Cluster>, volumes: &Arc<Volumes>, name: &str) -> Result<(), String> {
    let _one_apply = cluster.scheduled_backups.standby_apply.lock().await;
    // Looked at again under the lock: a promote may have come first.
    let Some(standby) = cluster.with_state(|state| state.volumes.get(name).and_then(|v| v.standby_of.clone())) else {
        return Ok(());
    };
    let repo = cluster
        .open_target(&standby.target, None, TargetOptions::default(), false)
        .await
        .map_err(|error| error.message)?;
    let listed = {
        let repo = Arc::clone(&repo);
        on_target(move || repo.manifests())
            .await
            .map_err(|error| error.message)?
    };
    let Some(newest) = listed.iter().rev().find(|m| m.volume == standby.volume).cloned() else {
        return Ok(());
    };
    if newest.id == standby.applied {
        return Ok(());
    }
    let local = served_here(volumes, name).map_err(|error| error.message)?;
    if newest.size_bytes > local.size_bytes() {
        return Err(format!(
            "backup {} is of a {}-byte volume; the standby holds {} (resize it)",
            newest.id,
            newest.size_bytes,
            local.size_bytes()
        ));
    }
    // Only the chunks that differ from the backup it holds, when that is still listed.
    let only = listed
        .iter()
        .find(|m| m.id == standby.applied && m.size_bytes == newest.size_bytes)
        .map(|held| job::changed_chunks(held, &newest));
    let lock = {
        let (repo, what) = (Arc::clone(&repo), format!("standby {name}"));
        on_target(move || repo.lock(false, &what))
            .await
            .map_err(|error| error.message)?
    };
    let job = cluster.backup_jobs.start(JobInfo {
        kind: "standby".into(),
        volume: name.to_owned(),
        node_api: cluster.api_of(cluster.local.id).unwrap_or_default(),
        backup: newest.id.clone(),
        parent: (!standby.applied.is_empty()).then(|| standby.applied.clone()),
        snapshot: newest.snapshot.clone(),
        total_bytes: newest.size_bytes,
        ..JobInfo::default()
    });
    tracing::info!(volume = %name, backup = %newest.id, incremental = only.is_some(), "standby: applying a new backup");
    let outcome = job::run_restore(repo, Arc::new(lock), local, &newest, only.as_deref(), None, &job).await;
    job.finish(outcome.clone());
    outcome?;
    cluster
        .change(Command::StandbyApplied {
            name: name.to_owned(),
            backup: newest.id.clone(),
            now_unix: crate::datadir::now_unix_seconds(),
        })
        .await
        .map_err(|error| error.to_string())?;
    tracing::info!(volume = %name, backup = %newest.id, "standby: backup applied");
    Ok(())
}
