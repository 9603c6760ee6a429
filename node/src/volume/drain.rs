//! Draining a disk (`ballast disk remove`): every volume copy and snapshot
//! copy on it moves to the node's other disks while clients keep using
//! them, then the disk is forgotten.
//!
//! A volume moves in passes: its data is copied region by region (4 MiB:
//! the destination's blocks zeroed, the source's data blocks written), and
//! every mutation that lands meanwhile marks its regions to copy again
//! (`Volume::note_changed`, after the mutation is durable). When few are
//! left, the drain holds the volume's move gate exclusively (no request is
//! under way, none starts), copies the rest, records the new disk in the
//! volume's metadata and switches the handle to it; then the old copy is
//! released. A crash before the switch leaves the old copy in force (the
//! partial one is released at start-up as data without metadata).
//!
//! Copies are made block by block, so volumes and snapshots that shared
//! blocks on the drained disk no longer share them on the new one.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use disk_layout::{BlockState, Reply, StoreError};
use serde::{Deserialize, Serialize};

use super::{io::BLOCK_BYTES, Volume, VolumeError, Volumes};
use crate::engine::{Command, Engine};

/// Blocks per region copied at once (4 MiB).
pub const REGION_BLOCKS: u64 = 1024;
/// Catch-up passes before the final, exclusive one.
const CATCH_UP_PASSES: usize = 8;
/// Regions left over that the final pass copies while clients wait.
const FINAL_REGIONS_MAX: usize = 16;
/// Largest store request (1 MiB).
const REQUEST_BLOCKS: u64 = 256;

/// A drain's progress, in GET /v1/node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DrainStatus {
    pub disk_uuid: uuid::Uuid,
    pub path: String,
    /// "draining", "removed" (empty and forgotten: the node stops using it
    /// at its next restart) or "failed".
    pub state: String,
    /// Volume and snapshot copies on the disk when the drain started, and moved so far.
    pub copies_total: u64,
    pub copies_moved: u64,
    pub bytes_copied: u64,
    /// Why it failed ("" otherwise); the disk is in use again.
    pub error: String,
}

impl Volumes {
    /// True when no new data may go to engine disk `disk` (drained or draining).
    #[must_use]
    pub fn is_retired(&self, disk: usize) -> bool {
        self.drains
            .lock()
            .get(&disk)
            .is_some_and(|status| status.state != "failed")
    }

    /// Every drain since the node started.
    #[must_use]
    pub fn drains(&self) -> Vec<DrainStatus> {
        self.drains.lock().values().cloned().collect()
    }

    /// Starts moving everything on disk `disk_uuid` to the other disks, in
    /// the background; `forget` runs once it is empty (removes the disk's
    /// enrollment record). Refused for an unknown disk, the only disk, one
    /// already draining, or when the other disks lack the room.
    pub fn start_drain(
        self: &Arc<Self>,
        disk_uuid: uuid::Uuid,
        forget: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> Result<DrainStatus, VolumeError> {
        let disk = self.disk_index(disk_uuid).ok_or_else(|| {
            VolumeError::InvalidOption(format!(
                "disk {disk_uuid} is not enrolled in this node (see `ballast disk list`)"
            ))
        })?;
        let disk_count = self.disks.read().len();
        let others: Vec<usize> = (0..disk_count).filter(|d| *d != disk && !self.is_retired(*d)).collect();
        if others.is_empty() {
            return Err(VolumeError::InvalidOption(format!(
                "disk {disk_uuid} is this node's only disk in use: enroll another first (`ballast disk enroll`)"
            )));
        }
        let mut drains = self.drains.lock();
        if drains.get(&disk).is_some_and(|status| status.state != "failed") {
            return Err(VolumeError::InvalidOption(format!(
                "disk {disk_uuid} is already {}",
                drains[&disk].state
            )));
        }
        let copies = self.copies_on(disk);
        let needed: u64 = copies.iter().map(|copy| self.used_bytes(copy)).sum();
        let room: u64 = others
            .iter()
            .filter_map(|d| self.engine.query(*d, |store| store.space()).ok())
            .map(|space| space.capacity_blocks.saturating_sub(space.used_blocks) * BLOCK_BYTES)
            .sum();
        if needed > room {
            return Err(VolumeError::InvalidOption(format!(
                "the other disks have {} free, the data on disk {disk_uuid} needs {}: enroll more space first",
                crate::size::format_size(room),
                crate::size::format_size(needed)
            )));
        }
        let status = DrainStatus {
            disk_uuid,
            path: self.disk_path(disk),
            state: "draining".into(),
            copies_total: copies.len() as u64,
            copies_moved: 0,
            bytes_copied: 0,
            error: String::new(),
        };
        drains.insert(disk, status.clone());
        drop(drains);
        tracing::info!(disk = %status.path, copies = copies.len(), bytes = needed, "draining disk");
        let volumes = Arc::clone(self);
        crate::engine::sched::spawn_background(crate::engine::Work::Drain, async move {
            let result = volumes.drain(disk).await.and_then(|()| forget());
            let mut drains = volumes.drains.lock();
            let status = drains.get_mut(&disk).expect("inserted above");
            match result {
                Ok(()) => {
                    status.state = "removed".into();
                    tracing::info!(disk = %status.path, "disk drained and removed; the node stops using it at its next restart");
                }
                Err(error) => {
                    status.state = "failed".into();
                    status.error.clone_from(&error);
                    tracing::error!(disk = %status.path, %error, "drain failed; the disk is in use again");
                }
            }
        });
        Ok(status)
    }

    /// Volume and snapshot copies on engine disk `disk`.
    fn copies_on(&self, disk: usize) -> Vec<Arc<Volume>> {
        let live = self.live.read();
        let snapshots = self.snapshots.read();
        live.values()
            .chain(snapshots.values())
            .map(|(_, volume)| volume)
            .filter(|volume| volume.disk_index() == disk && !volume.is_deleted())
            .cloned()
            .collect()
    }

    async fn drain(&self, disk: usize) -> Result<(), String> {
        // Copies made on the disk while it drains (a clone's replica) are
        // picked up by the next round; bounded all the same.
        for _ in 0..16 {
            let copies = self.copies_on(disk);
            if copies.is_empty() {
                return Ok(());
            }
            for copy in copies {
                let to = self.pick_disk().map_err(|error| error.to_string())?;
                self.move_copy(&copy, disk, to).await?;
                if let Some(status) = self.drains.lock().get_mut(&disk) {
                    status.copies_moved += 1;
                }
            }
        }
        Err("new volumes kept arriving on the disk; retry".into())
    }

    /// Moves one volume (or snapshot) copy from disk `from` to disk `to`.
    async fn move_copy(&self, volume: &Arc<Volume>, from: usize, to: usize) -> Result<(), String> {
        let engine = Arc::clone(&self.engine);
        let stale = query(&engine, to, |store| store.volume_ids()).await?;
        if stale.contains(&volume.id) {
            release(&engine, to, volume.id).await?;
        }
        *volume.moving.lock() = Some(BTreeSet::new());
        let result = self.copy_then_switch(volume, from, to).await;
        *volume.moving.lock() = None;
        match result {
            Ok(()) => {
                release(&engine, from, volume.id).await?;
                tracing::info!(volume = %volume.name, from = %self.disk_path(from), to = %self.disk_path(to), "moved to another disk");
                Ok(())
            }
            Err(error) => {
                let _ = release(&engine, to, volume.id).await;
                Err(format!("moving {}: {error}", volume.name))
            }
        }
    }

    async fn copy_then_switch(&self, volume: &Arc<Volume>, from: usize, to: usize) -> Result<(), String> {
        let regions = volume.size_bytes().div_ceil(REGION_BLOCKS * BLOCK_BYTES);
        self.copy_regions(volume, from, to, (0..regions).collect(), false)
            .await?;
        for _ in 0..CATCH_UP_PASSES {
            let dirty = take_dirty(volume);
            if dirty.len() <= FINAL_REGIONS_MAX {
                volume.note_regions(dirty);
                break;
            }
            self.copy_regions(volume, from, to, dirty, true).await?;
        }
        let _exclusive = volume.move_gate.write().await;
        let dirty = take_dirty(volume);
        self.copy_regions(volume, from, to, dirty, true).await?;
        let uuid = self.disks.read()[to].uuid;
        let meta = self.meta.lock();
        let live_record = self.live.read().get(&volume.name).map(|(record, _)| record.clone());
        let mut record = live_record
            .or_else(|| {
                self.snapshots
                    .read()
                    .get(&volume.name)
                    .map(|(record, _)| record.clone())
            })
            .ok_or_else(|| format!("{} was deleted while it moved", volume.name))?;
        record.disk_uuid = uuid;
        meta.update(&record).map_err(|error| error.to_string())?;
        for map in [&self.live, &self.snapshots] {
            if let Some(entry) = map.write().get_mut(&volume.name) {
                entry.0.disk_uuid = uuid;
            }
        }
        volume.disk.store(to, Ordering::Release);
        Ok(())
    }

    /// Copies `regions` of `volume` from disk `from` to `to`; `rewrite`:
    /// zero the destination's region first (it holds an older copy).
    async fn copy_regions(
        &self,
        volume: &Volume,
        from: usize,
        to: usize,
        regions: Vec<u64>,
        rewrite: bool,
    ) -> Result<(), String> {
        let engine = Arc::clone(&self.engine);
        let size_blocks = volume.size_bytes().div_ceil(BLOCK_BYTES);
        let id = volume.id;
        let (epoch, volume_sequence) = (volume.epoch(), volume.next_sequence());
        for region in regions {
            let lba = region * REGION_BLOCKS;
            if lba >= size_blocks {
                continue;
            }
            let count = REGION_BLOCKS.min(size_blocks - lba);
            let states = query(&engine, from, move |store| store.block_states(id, lba, count)).await?;
            if let Some(bad) = states.iter().position(|state| *state == BlockState::Bad) {
                return Err(format!(
                    "block {} of {} is unreadable on this disk: repair it from a replica (`ballast scrub start {}`) and retry",
                    lba + bad as u64,
                    volume.name,
                    volume.name
                ));
            }
            if rewrite {
                let zero = Command::Zero {
                    volume_id: id,
                    lba,
                    block_count: count,
                    epoch,
                    volume_sequence,
                };
                call(&engine, to, zero).await?;
            }
            let mut at = 0u64;
            while at < count {
                if !matches!(states[usize::try_from(at).expect("small")], BlockState::Data { .. }) {
                    at += 1;
                    continue;
                }
                let mut end = at + 1;
                while end < count
                    && end - at < REQUEST_BLOCKS
                    && matches!(states[usize::try_from(end).expect("small")], BlockState::Data { .. })
                {
                    end += 1;
                }
                let read = Command::Scan {
                    volume_id: id,
                    lba: lba + at,
                    block_count: end - at,
                };
                let Reply::Read(buf) = call(&engine, from, read).await? else {
                    return Err("a read answered with something else".into());
                };
                let data = buf.as_slice().to_vec();
                let written = data.len() as u64;
                let write = Command::Write {
                    volume_id: id,
                    lba: lba + at,
                    data: data.into(),
                    epoch,
                    volume_sequence,
                };
                call(&engine, to, write).await?;
                if let Some(status) = self.drains.lock().get_mut(&from) {
                    status.bytes_copied += written;
                }
                at = end;
            }
        }
        Ok(())
    }
}

impl Volume {
    /// Puts regions back to be copied again.
    fn note_regions(&self, regions: Vec<u64>) {
        if let Some(dirty) = self.moving.lock().as_mut() {
            dirty.extend(regions);
        }
    }
}

fn take_dirty(volume: &Volume) -> Vec<u64> {
    volume
        .moving
        .lock()
        .as_mut()
        .map(|dirty| std::mem::take(dirty).into_iter().collect())
        .unwrap_or_default()
}

async fn call(engine: &Arc<Engine>, disk: usize, command: Command) -> Result<Reply, String> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    engine.submit(
        disk,
        command,
        Box::new(move |result| {
            let _ = sender.send(result);
        }),
    );
    receiver
        .await
        .map_err(|_| "the storage engine stopped".to_owned())?
        .map_err(|error: StoreError| error.to_string())
}

async fn query<T: Send + 'static>(
    engine: &Arc<Engine>,
    disk: usize,
    f: impl FnOnce(&disk_layout::Store) -> T + Send + 'static,
) -> Result<T, String> {
    let engine = Arc::clone(engine);
    tokio::task::spawn_blocking(move || engine.query(disk, f))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())
}

async fn release(engine: &Arc<Engine>, disk: usize, volume_id: u64) -> Result<(), String> {
    call(engine, disk, Command::DeleteVolume { volume_id })
        .await
        .map(|_| ())
}
