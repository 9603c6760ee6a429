//! Snapshots, restores and clones in a cluster.
//!
//! A snapshot is taken by the volume's coordinator: it gets an id through
//! Raft (`AddSnapshot`), holds the whole volume's range lock (so no
//! mutation is half applied anywhere), clones its own copy and sends the
//! same clone, as a mutation ordered with the writes, to every in-sync
//! replica, then records which nodes took it (`SnapshotReady`). Each
//! holder's copy shares its blocks with the volume (`Store::clone_volume`):
//! taking one copies nothing. A restore is the reverse clone, sent the same
//! way; a clone is a new volume placed on the snapshot's holders, each of
//! which makes its replica a clone of its copy. Snapshots of a volume are
//! deleted with it; clones live on (they share blocks, not metadata).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::state::{ClusterSnapshot, ClusterVolume, Command};
use super::volumes::{forward, invalid, VolumeOpError};
use super::Cluster;
use crate::replication::wire::{OpKind, ReplicaOp};
use crate::volume::{io::BLOCK_BYTES, snapshot, validate_name, Volume, VolumeInfo, Volumes};

/// Names of scheduled snapshots start with this.
pub const AUTO_PREFIX: &str = "auto-";

/// What `snapshot list` shows of one snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub id: u64,
    pub created_unix_seconds: u64,
    pub size_bytes: u64,
    /// Nodes holding a copy (any serves `VOLUME@NAME` read-only over NBD).
    pub holders: Vec<u64>,
    /// "ready", or "creating" while (or if) its coordinator is taking it.
    pub state: String,
}

/// What `snapshot diff` answers: the byte ranges of a volume that differ
/// between two points (a snapshot and a later one, or the volume now).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDiff {
    pub volume: String,
    /// The earlier snapshot (None: nothing: the ranges are all the data).
    pub from: Option<String>,
    /// The later snapshot (None: the volume as it is now).
    pub to: Option<String>,
    pub size_bytes: u64,
    /// `(offset_bytes, len_bytes)`, ascending, 4 KiB-aligned.
    pub changed: Vec<(u64, u64)>,
    pub changed_bytes: u64,
}

/// Query parameters of GET /v1/volumes/{name}/diff.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiffQuery {
    pub from: Option<String>,
    pub to: Option<String>,
}

impl DiffQuery {
    /// The request path of this diff of `volume`.
    #[must_use]
    pub fn path(&self, volume: &str) -> String {
        use crate::cli::volume::path_segment;
        let mut path = format!("/v1/volumes/{}/diff?", path_segment(volume));
        for (key, value) in [("from", &self.from), ("to", &self.to)] {
            if let Some(value) = value {
                path.push_str(&format!("{key}={}&", path_segment(value)));
            }
        }
        path
    }
}

/// The volume `name` as this node (its coordinator) serves it; 503 until it does.
pub(super) fn served_here(volumes: &Volumes, name: &str) -> Result<Arc<Volume>, VolumeOpError> {
    volumes.get_served(name).ok_or_else(|| VolumeOpError {
        status: 503,
        message: format!("volume {name} is not served on this node yet; retry"),
    })
}

/// Blocks compared per store query: the store answers on its reactor, so
/// each query stays short (1 GiB of LBAs; chunks shared with the base are
/// skipped whole).
const DIFF_WINDOW_BLOCKS: u64 = 1 << 18;

impl SnapshotInfo {
    fn of(volume: &str, name: &str, snapshot: &ClusterSnapshot) -> Self {
        Self {
            volume: volume.to_owned(),
            name: name.to_owned(),
            id: snapshot.id,
            created_unix_seconds: snapshot.created_unix_seconds,
            size_bytes: snapshot.size_bytes,
            holders: snapshot.holders.clone(),
            state: if snapshot.ready { "ready" } else { "creating" }.into(),
        }
    }
}

/// Body of POST /v1/volumes/{name}/snapshots.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    pub name: String,
}

/// Body of POST /v1/volumes/{name}/restore.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    pub snapshot: String,
}

/// Body of PUT /v1/volumes/{name}/snapshot-schedule.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleBody {
    /// Seconds between scheduled snapshots (0: none).
    pub every_seconds: u64,
    /// Scheduled snapshots kept (the oldest beyond are deleted).
    pub keep: u32,
}

/// Shortest time between scheduled snapshots.
pub const SCHEDULE_SECONDS_MIN: u64 = 10;

fn check_name(snapshot: &str) -> Result<(), VolumeOpError> {
    validate_name(snapshot).map_err(|_| {
        invalid(format!(
            "invalid snapshot name {snapshot:?}: names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        ))
    })
}

impl Cluster {
    /// Every snapshot of `name`, oldest first.
    pub fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        let mut all: Vec<SnapshotInfo> = volume
            .snapshots
            .iter()
            .map(|(snapshot, taken)| SnapshotInfo::of(name, snapshot, taken))
            .collect();
        all.sort_by_key(|info| (info.created_unix_seconds, info.id));
        Ok(all)
    }

    /// The ranges of `name` that differ from snapshot `from` (None: all
    /// its data) to snapshot `to` (None: the volume now), computed from the
    /// maps of the coordinator's store, no data read (forwarded there).
    pub async fn snapshot_diff(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        query: DiffQuery,
    ) -> Result<SnapshotDiff, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        for snapshot in [&query.from, &query.to].into_iter().flatten() {
            if !volume.snapshots.contains_key(snapshot.as_str()) {
                return Err(VolumeOpError {
                    status: 404,
                    message: format!("snapshot {name}@{snapshot} does not exist"),
                });
            }
        }
        if volume.coordinator != self.local.id {
            let api = self.coordinator_api(&volume)?;
            let path = query.path(name);
            return forward(
                crate::api::auth::forwarding_token(self),
                move |client| client.get(&path),
                api,
            )
            .await;
        }
        let copy = |snapshot: &Option<String>| -> Result<Option<Arc<Volume>>, VolumeOpError> {
            let Some(snapshot) = snapshot else {
                return Ok(None);
            };
            volumes
                .snapshot(&snapshot::full_name(name, snapshot))
                .map(Some)
                .ok_or_else(|| VolumeOpError {
                    status: 503,
                    message: format!(
                        "snapshot {name}@{snapshot} has no copy on this node (its coordinator) yet; retry"
                    ),
                })
        };
        let (from, to) = (copy(&query.from)?, copy(&query.to)?);
        let to = match to {
            Some(to) => to,
            None => served_here(volumes, name)?,
        };
        if from.as_ref().is_some_and(|from| from.disk_index() != to.disk_index()) {
            return Err(VolumeOpError {
                status: 409,
                message: format!(
                    "{name}: the two sides of the diff lie on different disks of this node (a disk was drained since): no diff, take a full copy"
                ),
            });
        }
        let (disk, from_id, to_id, size_bytes) = (to.disk_index(), from.map(|from| from.id), to.id, to.size_bytes());
        let blocks = size_bytes.div_ceil(BLOCK_BYTES);
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut lba = 0;
        while lba < blocks {
            let count = DIFF_WINDOW_BLOCKS.min(blocks - lba);
            let engine = Arc::clone(to.engine());
            let runs = tokio::task::spawn_blocking(move || {
                engine.query(disk, move |store| store.changed_blocks(from_id, to_id, lba, count))
            })
            .await
            .map_err(|error| VolumeOpError {
                status: 500,
                message: error.to_string(),
            })?
            .map_err(|error| VolumeOpError {
                status: 503,
                message: format!("the storage engine did not answer: {error}"),
            })?;
            for (start, count) in runs {
                let (offset, len) = (start * BLOCK_BYTES, count * BLOCK_BYTES);
                match changed.last_mut() {
                    Some((at, run)) if *at + *run == offset => *run += len,
                    _ => changed.push((offset, len)),
                }
            }
            lba += count;
        }
        let changed_bytes = changed.iter().map(|(_, len)| len).sum();
        Ok(SnapshotDiff {
            volume: name.to_owned(),
            from: query.from,
            to: query.to,
            size_bytes,
            changed,
            changed_bytes,
        })
    }

    /// Takes snapshot `snapshot` of `name` (on its coordinator: forwarded there).
    pub async fn create_snapshot(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, VolumeOpError> {
        self.require_member()?;
        check_name(snapshot)?;
        let volume = self.volume(name)?;
        if volume.snapshots.contains_key(snapshot) {
            return Err(VolumeOpError {
                status: 409,
                message: format!("snapshot {name}@{snapshot} already exists"),
            });
        }
        if volume.coordinator != self.local.id {
            let api = self.coordinator_api(&volume)?;
            let path = format!("/v1/volumes/{name}/snapshots");
            let body = SnapshotBody {
                name: snapshot.to_owned(),
            };
            return forward(
                crate::api::auth::forwarding_token(self),
                move |client| client.post(&path, &body),
                api,
            )
            .await;
        }
        let local = served_here(volumes, name)?;
        let added = self
            .expect_volume(Command::AddSnapshot {
                name: name.to_owned(),
                snapshot: snapshot.to_owned(),
                created_unix_seconds: crate::datadir::now_unix_seconds(),
            })
            .await?;
        let id = added
            .snapshots
            .get(snapshot)
            .map(|taken| taken.id)
            .ok_or_else(|| VolumeOpError {
                status: 500,
                message: format!("snapshot {name}@{snapshot} vanished while it was taken"),
            })?;
        let holders = match self.take_everywhere(volumes, &local, snapshot, id).await {
            Ok(holders) => holders,
            Err(error) => {
                tracing::error!(volume = %name, snapshot, %error, "snapshot failed; deleting it");
                let _ = self
                    .change(Command::DeleteSnapshot {
                        name: name.to_owned(),
                        snapshot: snapshot.to_owned(),
                    })
                    .await;
                return Err(VolumeOpError {
                    status: 500,
                    message: format!("snapshot {name}@{snapshot} failed: {error}"),
                });
            }
        };
        let ready = self
            .expect_volume(Command::SnapshotReady {
                name: name.to_owned(),
                snapshot: snapshot.to_owned(),
                holders,
            })
            .await?;
        let taken = ready.snapshots.get(snapshot).ok_or_else(|| VolumeOpError {
            status: 409,
            message: format!("snapshot {name}@{snapshot} was deleted while it was taken"),
        })?;
        tracing::info!(volume = %name, snapshot, id, holders = ?taken.holders, "snapshot taken");
        Ok(SnapshotInfo::of(name, snapshot, taken))
    }

    /// Clones the local copy and every in-sync replica's under the whole
    /// volume's range lock; returns the nodes that took it.
    async fn take_everywhere(
        &self,
        volumes: &Arc<Volumes>,
        local: &Arc<Volume>,
        snapshot: &str,
        id: u64,
    ) -> Result<Vec<u64>, String> {
        let blocks = local.size_bytes().div_ceil(BLOCK_BYTES).max(1);
        let _whole = local.lock_range(0, blocks).await;
        let replicator = local.replicator();
        let before = replicator.as_ref().map(|r| r.targets()).unwrap_or_default();
        let (epoch, volume_sequence) = (local.serving_epoch().max(1), local.next_sequence());
        let op = ReplicaOp {
            volume_id: local.id,
            epoch,
            lba: 0,
            block_count: 0,
            volume_sequence,
            kind: OpKind::Snapshot {
                id,
                name: snapshot.to_owned(),
            },
        };
        let remote = async {
            match &replicator {
                Some(replicator) => replicator.replicate(op).await,
                None => Ok(()),
            }
        };
        let (taken, copied) = tokio::join!(
            volumes.take_snapshot(local, snapshot, id, epoch, volume_sequence),
            remote
        );
        taken.map_err(|error| error.to_string())?;
        copied?;
        // A replica dropped meanwhile did not take it; one added meanwhile was not sent it.
        let after = replicator.as_ref().map(|r| r.targets()).unwrap_or_default();
        let mut holders = vec![self.local.id];
        holders.extend(before.into_iter().filter(|node| after.contains(node)));
        Ok(holders)
    }

    /// Deletes a snapshot; each holder releases its copy (blocks the volume
    /// or its clones still map stay).
    pub async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<(), VolumeOpError> {
        self.require_member()?;
        self.expect_volume(Command::DeleteSnapshot {
            name: name.to_owned(),
            snapshot: snapshot.to_owned(),
        })
        .await?;
        tracing::info!(volume = %name, snapshot, "snapshot deleted");
        Ok(())
    }

    /// Puts volume `name` back to snapshot `snapshot` (on its coordinator:
    /// forwarded there). Refused while clients are connected or it is
    /// attached: their caches would not match the data.
    pub async fn restore_snapshot(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        snapshot: &str,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        let volume = self.volume(name)?;
        let taken = volume
            .snapshots
            .get(snapshot)
            .filter(|taken| taken.ready)
            .cloned()
            .ok_or_else(|| VolumeOpError {
                status: 404,
                message: format!("snapshot {name}@{snapshot} does not exist"),
            })?;
        if volume.coordinator != self.local.id {
            let api = self.coordinator_api(&volume)?;
            let path = format!("/v1/volumes/{name}/restore");
            let body = RestoreBody {
                snapshot: snapshot.to_owned(),
            };
            return forward(
                crate::api::auth::forwarding_token(self),
                move |client| client.post(&path, &body),
                api,
            )
            .await;
        }
        if !taken.holders.contains(&self.local.id) {
            return Err(VolumeOpError {
                status: 409,
                message: format!(
                    "node {} serves {name} but holds no copy of {name}@{snapshot} (holders: {:?}); move the volume to a holder with `ballast volume attach {name}` there",
                    self.local.id, taken.holders
                ),
            });
        }
        let local = served_here(volumes, name)?;
        self.require_unused(name, local.connection_count(), "restoring")?;
        let blocks = local.size_bytes().div_ceil(BLOCK_BYTES).max(1);
        {
            let _whole = local.lock_range(0, blocks).await;
            let replicator = local.replicator();
            let (epoch, volume_sequence) = (local.serving_epoch().max(1), local.next_sequence());
            if let Some(replicator) = &replicator {
                // Replicas out of sync now must copy the whole volume when they return.
                replicator.prepare(0, blocks).await.map_err(|reason| VolumeOpError {
                    status: 503,
                    message: format!("cannot restore {name}: {reason}"),
                })?;
            }
            // The whole volume as its range: a replica that fails it is
            // marked dirty over all of it, and copies all of it on return.
            let op = ReplicaOp {
                volume_id: local.id,
                epoch,
                lba: 0,
                block_count: blocks,
                volume_sequence,
                kind: OpKind::Restore { id: taken.id },
            };
            let remote = async {
                match &replicator {
                    Some(replicator) => replicator.replicate(op).await,
                    None => Ok(()),
                }
            };
            let (restored, copied) = tokio::join!(
                volumes.restore_snapshot(&local, taken.id, epoch, volume_sequence),
                remote
            );
            restored?;
            copied.map_err(|reason| VolumeOpError {
                status: 503,
                message: format!("restore of {name} not copied to its replicas: {reason}"),
            })?;
        }
        tracing::warn!(volume = %name, snapshot, "volume restored");
        Ok(self.describe(volumes, &volume))
    }

    /// Creates volume `new_name`, writable, whose data starts as snapshot
    /// `snapshot` of `source` (sharing its blocks).
    pub async fn clone_snapshot(
        &self,
        volumes: &Arc<Volumes>,
        source: &str,
        snapshot: &str,
        new_name: &str,
        owner: String,
        group: String,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        validate_name(new_name)?;
        self.volume(source)?;
        let clone = Command::CloneVolume {
            name: new_name.to_owned(),
            source: source.to_owned(),
            snapshot: snapshot.to_owned(),
            created_unix_seconds: crate::datadir::now_unix_seconds(),
        };
        let volume = self
            .expect_volume(Command::Owned {
                owner,
                group,
                command: Box::new(clone),
            })
            .await?;
        tracing::info!(volume = %new_name, source, snapshot, replicas = ?volume.replica_nodes, "volume cloned from a snapshot");
        self.wait_local(volumes, &volume).await;
        Ok(self.describe(volumes, &volume))
    }

    /// Sets (or clears, `every_seconds` 0) scheduled snapshots of `name`.
    pub async fn set_snapshot_schedule(
        &self,
        volumes: &Arc<Volumes>,
        name: &str,
        schedule: &ScheduleBody,
    ) -> Result<VolumeInfo, VolumeOpError> {
        self.require_member()?;
        if schedule.every_seconds != 0 && schedule.every_seconds < SCHEDULE_SECONDS_MIN {
            return Err(invalid(format!(
                "--snapshot-every must be at least {SCHEDULE_SECONDS_MIN} s (or 0 to stop)"
            )));
        }
        if schedule.every_seconds != 0 && schedule.keep == 0 {
            return Err(invalid("--keep must be at least 1 with --snapshot-every".into()));
        }
        let cap = u32::try_from(super::state::SNAPSHOTS_PER_VOLUME_MAX).unwrap_or(u32::MAX);
        if schedule.keep > cap {
            return Err(invalid(format!("--keep must be at most {cap}")));
        }
        let volume = self
            .expect_volume(Command::SetSnapshotSchedule {
                name: name.to_owned(),
                every_seconds: schedule.every_seconds,
                keep: schedule.keep,
            })
            .await?;
        Ok(self.describe(volumes, &volume))
    }

    pub(super) fn coordinator_api(&self, volume: &ClusterVolume) -> Result<String, VolumeOpError> {
        self.api_of(volume.coordinator).ok_or_else(|| VolumeOpError {
            status: 503,
            message: format!("the coordinator of {} is not known; retry", volume.name),
        })
    }
}

/// Whether this node coordinates `volume` and serves it at its epoch (where
/// scheduled work on it runs).
pub(super) fn serving_here(cluster: &Cluster, volume: &ClusterVolume, volumes: &Volumes) -> bool {
    volume.coordinator == cluster.local.id
        && volumes
            .get_served(&volume.name)
            .is_some_and(|local| local.serving_epoch() != 0)
}

/// Takes the scheduled snapshots due, and deletes expired ones, of the
/// volumes this node coordinates and serves (one job per volume at a time).
pub fn start_scheduled(cluster: &Arc<Cluster>, state: &super::state::ClusterState, volumes: &Arc<Volumes>) {
    let now_unix = crate::datadir::now_unix_seconds();
    for volume in state.volumes.values() {
        if volume.snapshot_every_seconds == 0 || !serving_here(cluster, volume, volumes) {
            continue;
        }
        let due = scheduled_due(volume, now_unix);
        let expired = scheduled_expired(volume);
        if due.is_none() && expired.is_empty() {
            continue;
        }
        if !cluster.scheduled_snapshots.lock().insert(volume.name.clone()) {
            continue;
        }
        let (cluster, volumes, name) = (Arc::clone(cluster), Arc::clone(volumes), volume.name.clone());
        tokio::spawn(async move {
            if let Some(snapshot) = due {
                match cluster.create_snapshot(&volumes, &name, &snapshot).await {
                    Ok(_) => tracing::info!(volume = %name, snapshot, "scheduled snapshot taken"),
                    Err(error) => {
                        tracing::warn!(volume = %name, snapshot, error = %error.message, "scheduled snapshot failed; retrying at the next pass")
                    }
                }
            }
            for snapshot in expired {
                match cluster.delete_snapshot(&name, &snapshot).await {
                    Ok(()) => tracing::info!(volume = %name, snapshot, "scheduled snapshot expired"),
                    Err(error) => {
                        tracing::warn!(volume = %name, snapshot, error = %error.message, "cannot delete an expired scheduled snapshot")
                    }
                }
            }
            cluster.scheduled_snapshots.lock().remove(&name);
        });
    }
}

/// The scheduled snapshot due for `volume` at `now` (its name), if any.
#[must_use]
pub fn scheduled_due(volume: &ClusterVolume, now_unix: u64) -> Option<String> {
    if volume.snapshot_every_seconds == 0 {
        return None;
    }
    let last = volume
        .snapshots
        .iter()
        .filter(|(name, _)| name.starts_with(AUTO_PREFIX))
        .map(|(_, taken)| taken.created_unix_seconds)
        .max()
        .unwrap_or(0);
    if now_unix < last.saturating_add(volume.snapshot_every_seconds) {
        return None;
    }
    Some(auto_name(now_unix))
}

/// Scheduled snapshots of `volume` beyond its `snapshot_keep`, oldest first.
#[must_use]
pub fn scheduled_expired(volume: &ClusterVolume) -> Vec<String> {
    let mut auto: Vec<(&String, &ClusterSnapshot)> = volume
        .snapshots
        .iter()
        .filter(|(name, taken)| name.starts_with(AUTO_PREFIX) && taken.ready)
        .collect();
    auto.sort_by_key(|(_, taken)| (taken.created_unix_seconds, taken.id));
    let keep = volume.snapshot_keep as usize;
    if volume.snapshot_every_seconds == 0 || auto.len() <= keep {
        return Vec::new();
    }
    let excess = auto.len() - keep;
    auto.into_iter().take(excess).map(|(name, _)| name.clone()).collect()
}

/// `auto-YYYYMMDD-HHMMSS` (UTC).
#[must_use]
pub fn auto_name(unix: u64) -> String {
    let days = unix / 86_400;
    let seconds = unix % 86_400;
    let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{AUTO_PREFIX}{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The full export name of a snapshot (re-exported for the CLI).
#[must_use]
pub fn export_name(volume: &str, name: &str) -> String {
    snapshot::full_name(volume, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(every: u64, keep: u32, auto: &[(u64, &str)]) -> ClusterVolume {
        let mut volume: ClusterVolume = serde_json::from_value(serde_json::json!({
            "name": "v", "id": 1, "size_bytes": 4096, "block_size_bytes": 4096, "replicas": 1,
            "replica_nodes": [1], "coordinator": 1, "epoch": 1, "created_unix_seconds": 100,
        }))
        .unwrap();
        volume.snapshot_every_seconds = every;
        volume.snapshot_keep = keep;
        for (index, (at, name)) in auto.iter().enumerate() {
            volume.snapshots.insert(
                (*name).to_owned(),
                ClusterSnapshot {
                    id: 10 + index as u64,
                    created_unix_seconds: *at,
                    size_bytes: 4096,
                    holders: vec![1],
                    ready: true,
                },
            );
        }
        volume
    }

    #[test]
    fn auto_names_are_utc_timestamps() {
        assert_eq!(auto_name(0), "auto-19700101-000000");
        assert_eq!(auto_name(1795651199), "auto-20261125-235959");
        assert_eq!(auto_name(951_782_400), "auto-20000229-000000");
    }

    #[test]
    fn a_scheduled_snapshot_is_due_once_the_interval_passed_since_the_last_one() {
        assert_eq!(scheduled_due(&volume(0, 3, &[]), 10_000), None, "no schedule");
        assert_eq!(
            scheduled_due(&volume(3600, 3, &[]), 10_000),
            Some(auto_name(10_000)),
            "none taken yet"
        );
        let taken = volume(3600, 3, &[(9_000, "auto-a")]);
        assert_eq!(scheduled_due(&taken, 12_599), None);
        assert_eq!(scheduled_due(&taken, 12_600), Some(auto_name(12_600)));
        let manual_only = volume(3600, 3, &[(9_000, "before-upgrade")]);
        assert!(
            scheduled_due(&manual_only, 9_001).is_some(),
            "manual snapshots do not count"
        );
    }

    #[test]
    fn only_the_newest_scheduled_snapshots_are_kept_and_manual_ones_never_expire() {
        let volume = volume(
            3600,
            2,
            &[(100, "auto-1"), (300, "auto-3"), (200, "auto-2"), (50, "mine")],
        );
        assert_eq!(scheduled_expired(&volume), vec!["auto-1".to_owned()]);
        let mut stopped = volume.clone();
        stopped.snapshot_every_seconds = 0;
        assert!(
            scheduled_expired(&stopped).is_empty(),
            "a cleared schedule expires nothing"
        );
    }
}
