//! One replica's side of a scrub: how its copy of a region stands — each
//! block's state from the store's index and, when verifying, whether the
//! data on the disk still matches its crc (bit rot, a bad sector).
//!
//! Reads here go to the store directly, not through `read_stored`: a
//! failed block is reported, not repaired on the spot (the caller holds
//! the range lock a repair would need, and decides where good data is).

use disk_layout::{BlockState, Reply};

use super::io::BLOCK_BYTES;
use super::{Volume, VolumeIoError};
use crate::engine::Command;

/// Most blocks read from the store at once while verifying (1 MiB).
const VERIFY_READ_BLOCKS: u64 = 256;

/// How one copy of a region stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionCheck {
    /// Per block, from the first.
    pub states: Vec<BlockState>,
    /// Data read and checked (verify only).
    pub verified_bytes: u64,
    /// Blocks whose data failed its crc or could not be read (now `Bad`).
    pub bad_blocks: u64,
}

impl Volume {
    /// The state of each block of `lba..lba + block_count`; with `verify`
    /// the data blocks are read and those that fail become `Bad`. Blocks
    /// past the volume's end are holes.
    pub async fn check_region(&self, lba: u64, block_count: u64, verify: bool) -> Result<RegionCheck, VolumeIoError> {
        let engine = std::sync::Arc::clone(&self.engine);
        let gate = self.move_gate.read().await;
        let (disk, id) = (self.disk_index(), self.id);
        let mut states = tokio::task::spawn_blocking(move || {
            engine.query(disk, move |store| store.block_states(id, lba, block_count))
        })
        .await
        .map_err(|_| VolumeIoError::Stopped)?
        .map_err(|_| VolumeIoError::Stopped)?;
        drop(gate);
        let size_blocks = self.size_bytes() / BLOCK_BYTES;
        for (at, state) in states.iter_mut().enumerate() {
            if lba + at as u64 >= size_blocks {
                *state = BlockState::Hole;
            }
        }
        let mut check = RegionCheck {
            states,
            verified_bytes: 0,
            bad_blocks: 0,
        };
        if verify {
            self.verify_data(lba, &mut check).await?;
        }
        Ok(check)
    }

    /// Reads every data block of the region (runs of at most
    /// `VERIFY_READ_BLOCKS`); a run that fails is read block by block to
    /// find which.
    async fn verify_data(&self, lba: u64, check: &mut RegionCheck) -> Result<(), VolumeIoError> {
        let mut at = 0usize;
        while at < check.states.len() {
            if !matches!(check.states[at], BlockState::Data { .. }) {
                at += 1;
                continue;
            }
            let mut end = at + 1;
            while end < check.states.len()
                && ((end - at) as u64) < VERIFY_READ_BLOCKS
                && matches!(check.states[end], BlockState::Data { .. })
            {
                end += 1;
            }
            let run = (end - at) as u64;
            check.verified_bytes += run * BLOCK_BYTES;
            if !self.read_ok(lba + at as u64, run).await? {
                for block in at..end {
                    if !self.read_ok(lba + block as u64, 1).await? {
                        check.states[block] = BlockState::Bad;
                        check.bad_blocks += 1;
                    }
                }
            }
            at = end;
        }
        Ok(())
    }

    /// Reads blocks of this copy as stored, failing on a bad one (no repair).
    pub(crate) async fn read_local(&self, lba: u64, block_count: u64) -> Result<Vec<u8>, VolumeIoError> {
        let command = Command::Scan {
            volume_id: self.id,
            lba,
            block_count,
        };
        match self.call(command).await? {
            Reply::Read(buf) => Ok(buf.as_slice().to_vec()),
            other => unreachable!("read answered with {other:?}"),
        }
    }

    /// Writes blocks to this copy only (a scrub repairing it from a replica).
    pub(crate) async fn write_local(&self, lba: u64, data: Vec<u8>) -> Result<(), VolumeIoError> {
        let command = Command::Write {
            volume_id: self.id,
            lba,
            data: data.into(),
            epoch: self.serving_epoch().max(self.epoch()),
            volume_sequence: self.next_sequence(),
        };
        self.call(command).await.map(|_| ())
    }

    /// Makes blocks of this copy only read as zeroes.
    pub(crate) async fn zero_local(&self, lba: u64, block_count: u64) -> Result<(), VolumeIoError> {
        let command = Command::Zero {
            volume_id: self.id,
            lba,
            block_count,
            epoch: self.serving_epoch().max(self.epoch()),
            volume_sequence: self.next_sequence(),
        };
        self.call(command).await.map(|_| ())
    }

    /// Whether the blocks read back intact (false: a checksum or I/O error).
    async fn read_ok(&self, lba: u64, block_count: u64) -> Result<bool, VolumeIoError> {
        let command = Command::Scan {
            volume_id: self.id,
            lba,
            block_count,
        };
        match self.call(command).await {
            Ok(Reply::Read(_)) => Ok(true),
            Ok(other) => unreachable!("read answered with {other:?}"),
            Err(VolumeIoError::Store { source, .. }) if source.is_data_error() => {
                tracing::warn!(volume = %self.name, lba, block_count, error = %source, "scrub: data failed its check");
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }
}
