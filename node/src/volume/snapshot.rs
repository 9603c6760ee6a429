//! This node's copies of snapshots: read-only volumes named
//! `VOLUME@SNAPSHOT` whose data is a store clone of the volume's
//! (`Store::clone_volume`: no data is copied, blocks are shared until the
//! volume overwrites them). Each copy has a metadata record like a volume
//! (`snapshot_of` set), so start-up keeps it; its data is cloned before the
//! record is written, so a crash in between leaves an orphan start-up
//! releases, never a record without data.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::meta::{MetaError, VolumeRecord, VolumeState};
use super::{io, Volume, VolumeError, Volumes};
use crate::engine::Command;

/// The export and record name of snapshot `snapshot` of `volume`.
#[must_use]
pub fn full_name(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

/// Splits `VOLUME@SNAPSHOT`.
#[must_use]
pub fn split_name(full: &str) -> Option<(&str, &str)> {
    full.split_once('@')
}

impl Volumes {
    /// This node's copy of snapshot `VOLUME@SNAPSHOT`.
    #[must_use]
    pub fn snapshot(&self, full: &str) -> Option<Arc<Volume>> {
        self.snapshots.read().get(full).map(|(_, volume)| Arc::clone(volume))
    }

    /// Drops the data key from `volume`'s snapshot copies (this node no
    /// longer coordinates the volume).
    pub fn lock_snapshots_of(&self, volume: &str) {
        let prefix = format!("{volume}@");
        for (name, (_, copy)) in self.snapshots.read().iter() {
            if name.starts_with(&prefix) && copy.encrypted {
                copy.set_cipher(None);
            }
        }
    }

    /// This node's copy of the snapshot with data id `id`.
    #[must_use]
    pub fn snapshot_by_id(&self, id: u64) -> Option<Arc<Volume>> {
        self.snapshots
            .read()
            .values()
            .find(|(record, _)| record.id == id)
            .map(|(_, volume)| Arc::clone(volume))
    }

    /// The records of every local snapshot copy.
    #[must_use]
    pub fn snapshot_records(&self) -> Vec<VolumeRecord> {
        self.snapshots
            .read()
            .values()
            .map(|(record, _)| record.clone())
            .collect()
    }

    /// Clones `volume`'s local data, as of now in its store's order, to a
    /// new snapshot copy `name` with data id `id`, durably. The caller
    /// orders it against the volume's writes (the coordinator holds the
    /// whole volume's range lock; a replica gets it in that order).
    pub async fn take_snapshot(
        &self,
        volume: &Volume,
        name: &str,
        id: u64,
        epoch: u64,
        volume_sequence: u64,
    ) -> Result<(), VolumeError> {
        let full = full_name(&volume.name, name);
        if volume.moving.lock().is_some() {
            return Err(VolumeError::InvalidOption(format!(
                "volume {} is moving to another disk of node (disk remove); take the snapshot when it is done",
                volume.name
            )));
        }
        if let Some((record, _)) = self.snapshots.read().get(&full) {
            if record.id == id {
                return Ok(()); // a retried op: it is there already
            }
            return Err(VolumeError::Exists { name: full });
        }
        volume
            .call(Command::Clone {
                source: volume.id,
                target: id,
                epoch,
                volume_sequence,
            })
            .await?;
        let mut record = self
            .live
            .read()
            .get(&volume.name)
            .map(|(record, _)| record.clone())
            .ok_or_else(|| VolumeError::Missing {
                name: volume.name.clone(),
            })?;
        record.name.clone_from(&full);
        record.id = id;
        record.size_bytes = volume.size_bytes();
        record.replicas = 1;
        record.created_unix_seconds = crate::datadir::now_unix_seconds();
        record.state = VolumeState::Ready;
        record.snapshot_of = Some(volume.id);
        let meta = self.meta.lock();
        meta.insert(&record).map_err(|error| match error {
            MetaError::Exists { name } => VolumeError::Exists { name },
            other => VolumeError::Meta(other),
        })?;
        let handle = self.handle(&record, volume.disk_index(), 1);
        self.snapshots.write().insert(full.clone(), (record, handle));
        drop(meta);
        tracing::info!(snapshot = %full, id, "snapshot taken");
        Ok(())
    }

    /// Makes `volume`'s local data that of this node's copy of snapshot
    /// `snapshot_id` (ordered like `take_snapshot`); data past the volume's
    /// current end is discarded.
    pub async fn restore_snapshot(
        &self,
        volume: &Volume,
        snapshot_id: u64,
        epoch: u64,
        volume_sequence: u64,
    ) -> Result<(), VolumeError> {
        let snapshot = self.snapshot_by_id(snapshot_id).ok_or_else(|| VolumeError::Missing {
            name: format!("snapshot with data id {snapshot_id} of {}", volume.name),
        })?;
        if volume.moving.lock().is_some()
            || snapshot.moving.lock().is_some()
            || snapshot.disk_index() != volume.disk_index()
        {
            return Err(VolumeError::InvalidOption(format!(
                "{} and its snapshot are not on the same disk of this node (disk remove under way); retry when it is done",
                volume.name
            )));
        }
        volume
            .call(Command::Clone {
                source: snapshot_id,
                target: volume.id,
                epoch,
                volume_sequence,
            })
            .await?;
        let (end, snapshot_end) = (
            volume.size_bytes().div_ceil(io::BLOCK_BYTES),
            snapshot.size_bytes().div_ceil(io::BLOCK_BYTES),
        );
        if snapshot_end > end {
            volume
                .call(Command::Zero {
                    volume_id: volume.id,
                    lba: end,
                    block_count: snapshot_end - end,
                    epoch,
                    volume_sequence,
                })
                .await?;
        }
        volume.sequence.fetch_max(volume_sequence + 1, Ordering::AcqRel);
        tracing::warn!(volume = %volume.name, snapshot = %snapshot.name, "volume restored from its snapshot");
        Ok(())
    }

    /// Deletes this node's copy of a snapshot; refused while NBD clients
    /// read it.
    pub fn delete_snapshot(&self, full: &str) -> Result<(), VolumeError> {
        self.delete_from(&self.snapshots, full)?;
        tracing::info!(snapshot = %full, "snapshot copy deleted");
        Ok(())
    }
}
