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

use std::sync::Arc;

use super::snapshots::{served_here, DiffQuery};
use super::volumes::{forward, invalid, VolumeOpError};
use super::Cluster;
use crate::backup::job::{self, BackupPlan, JobInfo, Jobs};
use crate::backup::repo::{Repo, RepoError};
use crate::backup::target::TargetUrl;
use crate::backup::{BackupBody, RestoreBody};
use crate::volume::{snapshot, Volumes};

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
        _ => 500,
    };
    VolumeOpError {
        status,
        message: error.to_string(),
    }
}

/// Opens the target (Argon2id runs on a blocking thread); `create` sets a new one up.
async fn open_repo(
    target: &str,
    options: crate::backup::TargetOptions,
    secret: crate::backup::Secret,
    create: bool,
) -> Result<Arc<Repo>, VolumeOpError> {
    let url = TargetUrl::parse(target).map_err(|error| invalid(error.to_string()))?;
    let params = create.then_some(crate::volume::crypt::KDF_PARAMS_DEFAULT);
    tokio::task::spawn_blocking(move || Repo::open(&url, &options, &secret, params))
        .await
        .map_err(|error| VolumeOpError {
            status: 500,
            message: error.to_string(),
        })?
        .map(Arc::new)
        .map_err(repo_error)
}

fn snapshot_name_now() -> String {
    let id = crate::backup::repo::backup_id("", crate::datadir::now_unix_seconds());
    format!("{BACKUP_PREFIX}{}", id.trim_start_matches('-'))
}

impl Cluster {
    /// Starts a backup of `name` (on its coordinator: forwarded there).
    pub async fn start_backup(
        self: &Arc<Self>,
        volumes: &Arc<Volumes>,
        jobs: &Arc<Jobs>,
        name: &str,
        body: BackupBody,
    ) -> Result<JobInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if body.mib_per_s == Some(0) {
            return Err(invalid("--mib-per-s must be at least 1".into()));
        }
        if volume.coordinator != self.local.id {
            let api = self.coordinator_api(&volume)?;
            let path = format!("/v1/volumes/{name}/backups");
            return forward(
                crate::api::auth::forwarding_token(self),
                move |client| client.post(&path, &body),
                api,
            )
            .await;
        }
        served_here(volumes, name)?;
        let repo = open_repo(&body.target, body.options, body.secret, true).await?;
        let lock = {
            let (repo, what) = (Arc::clone(&repo), format!("backup of {name}"));
            tokio::task::spawn_blocking(move || repo.lock(false, &what))
                .await
                .map_err(|error| invalid(error.to_string()))?
                .map_err(repo_error)?
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
            tokio::task::spawn_blocking(move || repo.manifests())
                .await
                .map_err(|error| invalid(error.to_string()))?
                .map_err(repo_error)?
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
            tokio::task::spawn_blocking(move || repo.new_backup_id(&name))
                .await
                .map_err(|error| invalid(error.to_string()))?
                .map_err(repo_error)?
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
        tokio::spawn(async move {
            let parent_snapshot = plan.parent.as_ref().map(|p| p.snapshot.clone());
            let outcome = job::run_backup(repo, Arc::new(lock), copy, plan, &job).await;
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
        jobs: &Arc<Jobs>,
        name: &str,
        body: RestoreBody,
    ) -> Result<JobInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        if volume.coordinator != self.local.id {
            let api = self.coordinator_api(&volume)?;
            let path = format!("/v1/volumes/{name}/backup-restore");
            return forward(
                crate::api::auth::forwarding_token(self),
                move |client| client.post(&path, &body),
                api,
            )
            .await;
        }
        let local = served_here(volumes, name)?;
        self.require_unused(name, local.connection_count(), "restoring a backup into")?;
        let repo = open_repo(&body.target, body.options, body.secret, false).await?;
        let (manifest, lock) = {
            let (repo, backup, what) = (Arc::clone(&repo), body.backup.clone(), format!("restore into {name}"));
            tokio::task::spawn_blocking(move || {
                let lock = repo.lock(false, &what)?;
                Ok::<_, RepoError>((repo.manifest(&backup)?, lock))
            })
            .await
            .map_err(|error| invalid(error.to_string()))?
            .map_err(repo_error)?
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
        tokio::spawn(async move {
            let outcome = job::run_restore(repo, Arc::new(lock), local, &manifest, &job).await;
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
