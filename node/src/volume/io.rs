//! The data path of one volume: byte-addressed reads, writes, zeroing and
//! flushes turned into 4 KiB-block requests to the volume's disk store.
//!
//! Requests larger than one store request are split (at most
//! `STORE_REQUEST_BYTES_MAX` each) and submitted together. Writes that do not
//! cover whole 4 KiB blocks are read-modify-write under the volume's
//! exclusive lock: aligned writes hold the shared side until they complete,
//! so a read-modify-write never reverts bytes another write set.
//!
//! Durability: the store answers a write only once it is durable, so every
//! acknowledged write is durable (FUA is implicit) and a flush only has to
//! wait for writes still in flight.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use disk_layout::{IoBuf, Reply, StoreError};

use super::{Volume, VolumeIoError};
use crate::engine::Command;
use crate::replication::wire::{OpKind, ReplicaOp};

/// The store's block size.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest request sent to the store in one piece.
pub const STORE_REQUEST_BYTES_MAX: usize = 1 << 20;
/// How long a read waits for this node's serving lease to be renewed.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Reads redone when the lease ran out while one was under way.
const LEASE_READ_TRIES: usize = 3;

/// Data read from a volume: whole blocks, of which `skip_bytes` at the
/// front and whatever lies past `len_bytes` are not part of the answer.
#[derive(Debug)]
pub struct ReadData {
    pub bufs: Vec<IoBuf>,
    pub skip_bytes: usize,
    pub len_bytes: usize,
}

impl ReadData {
    /// The answer's bytes, in order, as slices of the block buffers.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let mut skip = self.skip_bytes;
        let mut left = self.len_bytes;
        self.bufs.iter().filter_map(move |buf| {
            let bytes = buf.as_slice();
            if skip >= bytes.len() {
                skip -= bytes.len();
                return None;
            }
            let take = (bytes.len() - skip).min(left);
            let slice = &bytes[skip..skip + take];
            skip = 0;
            left -= take;
            (take > 0).then_some(slice)
        })
    }

    /// Copies the answer into one vector (tests, read-modify-write).
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len_bytes);
        for slice in self.slices() {
            out.extend_from_slice(slice);
        }
        out
    }
}

/// `data`, written at `lba`, cut into pieces the store takes in one
/// request: (first block, bytes) each, sharing `data`'s buffer.
fn store_requests(lba: u64, data: &Bytes) -> impl Iterator<Item = (u64, Bytes)> + '_ {
    (0..data.len()).step_by(STORE_REQUEST_BYTES_MAX).map(move |at| {
        let piece = data.slice(at..(at + STORE_REQUEST_BYTES_MAX).min(data.len()));
        (lba + at as u64 / BLOCK_BYTES, piece)
    })
}

fn usize_of(value: u64) -> usize {
    usize::try_from(value).expect("request sizes fit in memory")
}

impl Volume {
    /// Runs a client's request (`op`, `bytes` long) counted in the volume's
    /// statistics: in flight meanwhile (resync and scrub yield to it), then
    /// its latency and outcome. NBD counts its requests itself; host attach
    /// (FUSE, ublk) goes through here.
    pub async fn counted<T>(
        &self,
        op: crate::metrics::Op,
        bytes: u64,
        request: impl std::future::Future<Output = Result<T, VolumeIoError>>,
    ) -> Result<T, VolumeIoError> {
        let started = std::time::Instant::now();
        self.admit_op(op, bytes).await;
        let in_flight = self.stats.begin();
        let outcome = request.await;
        drop(in_flight);
        self.stats.op(op).record(bytes, started.elapsed(), outcome.is_ok());
        outcome
    }

    pub(super) async fn call(&self, command: Command) -> Result<Reply, VolumeIoError> {
        // A drain switches disks only when no request is under way.
        let _gate = self.move_gate.read().await;
        let changed = self.changed_by(&command);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.submit(
            command,
            Box::new(move |result| {
                let _ = sender.send(result);
            }),
        );
        let reply = match receiver.await {
            Ok(result) => result.map_err(|source| VolumeIoError::Store {
                volume: self.name.clone(),
                source,
            }),
            Err(_) => Err(VolumeIoError::Stopped),
        };
        if let (Ok(_), Some((lba, block_count))) = (&reply, changed) {
            self.note_changed(lba, block_count);
        }
        reply
    }

    /// The blocks a request changes in this volume, if any.
    fn changed_by(&self, command: &Command) -> Option<(u64, u64)> {
        match command {
            Command::Write { lba, data, .. } => Some((*lba, data.len() as u64 / BLOCK_BYTES)),
            Command::Zero { lba, block_count, .. } => Some((*lba, *block_count)),
            Command::Clone { target, .. } if *target == self.id => {
                Some((0, self.size_bytes().div_ceil(BLOCK_BYTES).max(1)))
            }
            _ => None,
        }
    }

    /// Records changed blocks for a drain that is moving the volume (after
    /// they are durable, so its next copy of the region sees them).
    pub(super) fn note_changed(&self, lba: u64, block_count: u64) {
        if block_count == 0 {
            return;
        }
        if let Some(regions) = self.moving.lock().as_mut() {
            let region_blocks = super::drain::REGION_BLOCKS;
            regions.extend(lba / region_blocks..=(lba + block_count - 1) / region_blocks);
        }
    }

    /// Holds `[lba, lba + block_count)` against overlapping mutations (resync copies under it).
    pub async fn lock_range(&self, lba: u64, block_count: u64) -> super::range_lock::RangeGuard<'_> {
        self.ranges.lock(lba, block_count).await
    }

    /// The next number in the volume's order of mutations.
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Refuses changes to a snapshot's copy.
    fn check_writable(&self) -> Result<(), VolumeIoError> {
        if self.read_only {
            return Err(VolumeIoError::ReadOnly {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeIoError> {
        let size_bytes = self.size_bytes();
        if offset_bytes.checked_add(len_bytes).is_none_or(|end| end > size_bytes) {
            return Err(VolumeIoError::OutOfRange {
                volume: self.name.clone(),
                offset_bytes,
                len_bytes,
                size_bytes,
            });
        }
        Ok(())
    }

    /// Reads `len_bytes` at `offset_bytes` (any alignment), decrypted.
    pub async fn read(&self, offset_bytes: u64, len_bytes: u64) -> Result<ReadData, VolumeIoError> {
        let cipher = self.cipher()?;
        let mut data = self.read_leased(offset_bytes, len_bytes).await?;
        if let Some(cipher) = cipher {
            let mut lba = offset_bytes / BLOCK_BYTES;
            for buf in &mut data.bufs {
                let bytes = buf.as_mut_slice();
                cipher.decrypt_blocks(lba, bytes);
                lba += bytes.len() as u64 / BLOCK_BYTES;
            }
        }
        Ok(data)
    }

    /// A client's read: answered only if this node held its serving lease
    /// when the read was done (checked after it, so a stall in between
    /// cannot slip a stale read through); waits for a renewal otherwise.
    async fn read_leased(&self, offset_bytes: u64, len_bytes: u64) -> Result<ReadData, VolumeIoError> {
        let not_served = || VolumeIoError::NotServed {
            volume: self.name.clone(),
        };
        for _ in 0..LEASE_READ_TRIES {
            if !self.is_served() {
                return Err(not_served());
            }
            if !self.lease.holds() && !self.lease.wait(LEASE_WAIT, || !self.is_served()).await {
                break;
            }
            let data = if self.lease.is_required() {
                // Replicated: no write that is not durable everywhere yet is seen.
                let first_block = offset_bytes / BLOCK_BYTES;
                let end_block = (offset_bytes + len_bytes).div_ceil(BLOCK_BYTES);
                let _shared = self.ranges.share(first_block, end_block - first_block).await;
                // Held shared: a repair of a bad block needs no more (no write lands meanwhile).
                self.read_stored_locked(offset_bytes, len_bytes).await?
            } else {
                self.read_stored(offset_bytes, len_bytes).await?
            };
            // Both checked after the read: a node that answered "not serving"
            // to a new coordinator (`cluster::lease`) answers no read after.
            if !self.is_served() {
                return Err(not_served());
            }
            if self.lease.holds() {
                return Ok(data);
            }
        }
        self.stats
            .lease_refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(VolumeIoError::NoLease {
            volume: self.name.clone(),
        })
    }

    /// Reads what the disk holds (ciphertext of an encrypted volume): for
    /// copies to replicas, which never see the key.
    pub async fn read_stored(&self, offset_bytes: u64, len_bytes: u64) -> Result<ReadData, VolumeIoError> {
        self.read_stored_inner(offset_bytes, len_bytes, false).await
    }

    /// `read_stored` for a caller that holds the volume's range lock over
    /// the range (resync): a repair then must not take it again.
    pub async fn read_stored_locked(&self, offset_bytes: u64, len_bytes: u64) -> Result<ReadData, VolumeIoError> {
        self.read_stored_inner(offset_bytes, len_bytes, true).await
    }

    async fn read_stored_inner(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        locked: bool,
    ) -> Result<ReadData, VolumeIoError> {
        self.check_range(offset_bytes, len_bytes)?;
        let first_block = offset_bytes / BLOCK_BYTES;
        let end_block = (offset_bytes + len_bytes).div_ceil(BLOCK_BYTES);
        let per_request = STORE_REQUEST_BYTES_MAX as u64 / BLOCK_BYTES;
        let mut results = Vec::new();
        {
            let _gate = self.move_gate.read().await;
            let mut pending = Vec::new();
            let mut lba = first_block;
            while lba < end_block {
                let block_count = per_request.min(end_block - lba);
                let (sender, receiver) = tokio::sync::oneshot::channel();
                self.submit(
                    Command::Read {
                        volume_id: self.id,
                        lba,
                        block_count,
                    },
                    Box::new(move |result| {
                        let _ = sender.send(result);
                    }),
                );
                pending.push(receiver);
                lba += block_count;
            }
            for receiver in pending {
                results.push(receiver.await);
            }
        }
        // Repairs write (taking the gate again): outside the gate.
        let mut bufs = Vec::with_capacity(results.len());
        let mut lba = first_block;
        for result in results {
            let block_count = per_request.min(end_block - lba);
            match result {
                Ok(Ok(Reply::Read(buf))) => bufs.push(buf),
                Ok(Ok(other)) => unreachable!("read answered with {other:?}"),
                Ok(Err(source)) => bufs.push(self.repair(lba, block_count, source, locked).await?),
                Err(_) => return Err(VolumeIoError::Stopped),
            }
            lba += block_count;
        }
        Ok(ReadData {
            bufs,
            skip_bytes: usize_of(offset_bytes % BLOCK_BYTES),
            len_bytes: usize_of(len_bytes),
        })
    }

    /// A local read failed (bad checksum, I/O error): fetches the blocks
    /// from an in-sync replica, rewrites them locally (a new record; the
    /// bad one becomes garbage) and answers with them. `locked`: the caller
    /// holds the range lock over the blocks. Without a replica,
    /// or if none has them, the read fails with the local error.
    async fn repair(
        &self,
        lba: u64,
        block_count: u64,
        local: StoreError,
        locked: bool,
    ) -> Result<IoBuf, VolumeIoError> {
        let failed = |source| VolumeIoError::Store {
            volume: self.name.clone(),
            source,
        };
        let Some(replicator) = self.replicator() else {
            return Err(failed(local));
        };
        tracing::warn!(volume = %self.name, lba, block_count, error = %local, "local read failed; reading from a replica and repairing");
        // Held so no write lands between the fetch and the rewrite (unless
        // the caller holds it already: taking it again would wait forever).
        let _range = if locked {
            None
        } else {
            Some(self.ranges.lock(lba, block_count).await)
        };
        let data = match replicator.fetch(self.id, lba, block_count).await {
            Ok(data) if data.len() as u64 == block_count * BLOCK_BYTES => data,
            Ok(data) => {
                tracing::error!(volume = %self.name, lba, bytes = data.len(), "a replica answered a read with the wrong length");
                return Err(failed(local));
            }
            Err(reason) => {
                tracing::error!(volume = %self.name, lba, %reason, "no replica could serve the read");
                return Err(failed(local));
            }
        };
        let mut buf = IoBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(&data);
        let rewrite = Command::Write {
            volume_id: self.id,
            lba,
            data: data.into(),
            epoch: self.epoch(),
            volume_sequence: self.next_sequence(),
        };
        // Answered only once this node's own copy holds the same data: a
        // replica may hold a write whose local part failed (never
        // acknowledged); shown to a reader while this copy lacks it, a
        // restart of this node (its copy then wins the compare) would take
        // back what the reader saw (torture's linearizability checker
        // caught that under a failing disk).
        match self.call(rewrite).await {
            Ok(_) => {
                tracing::warn!(volume = %self.name, lba, block_count, "repaired from a replica");
                Ok(buf)
            }
            Err(error) => {
                tracing::error!(volume = %self.name, lba, %error, "a replica has the blocks but the local rewrite failed; the read fails");
                Err(failed(local))
            }
        }
    }

    /// Reads blocks for a coordinator repairing its copy (this node is a replica).
    pub async fn read_for_repair(&self, lba: u64, block_count: u64) -> Result<Vec<u8>, VolumeIoError> {
        Ok(self
            .read_stored(lba * BLOCK_BYTES, block_count * BLOCK_BYTES)
            .await?
            .to_vec())
    }

    /// Writes `data` at `offset_bytes` (any alignment); answers once durable.
    pub async fn write(&self, offset_bytes: u64, data: impl Into<Bytes>) -> Result<(), VolumeIoError> {
        let data: Bytes = data.into();
        self.check_writable()?;
        let len_bytes = data.len() as u64;
        self.check_range(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        if offset_bytes.is_multiple_of(BLOCK_BYTES) && len_bytes.is_multiple_of(BLOCK_BYTES) {
            let _shared = self.rmw.read().await;
            return self.write_aligned(offset_bytes / BLOCK_BYTES, data).await;
        }
        let _exclusive = self.rmw.write().await;
        let (lba, block_data) = self.merge_partial_blocks(offset_bytes, &data).await?;
        self.write_aligned(lba, block_data.into()).await
    }

    /// Builds whole blocks covering `offset_bytes..+data.len()`: the
    /// partial first and last blocks are read and patched.
    async fn merge_partial_blocks(&self, offset_bytes: u64, data: &[u8]) -> Result<(u64, Vec<u8>), VolumeIoError> {
        let first_block = offset_bytes / BLOCK_BYTES;
        let end_bytes = offset_bytes + data.len() as u64;
        let end_block = end_bytes.div_ceil(BLOCK_BYTES);
        let mut blocks = vec![0u8; usize_of((end_block - first_block) * BLOCK_BYTES)];
        if !offset_bytes.is_multiple_of(BLOCK_BYTES) {
            let head = self.read(first_block * BLOCK_BYTES, BLOCK_BYTES).await?.to_vec();
            blocks[..head.len()].copy_from_slice(&head);
        }
        if !end_bytes.is_multiple_of(BLOCK_BYTES)
            && (end_block - 1 > first_block || offset_bytes.is_multiple_of(BLOCK_BYTES))
        {
            let tail = self.read((end_block - 1) * BLOCK_BYTES, BLOCK_BYTES).await?.to_vec();
            let at = blocks.len() - tail.len();
            blocks[at..].copy_from_slice(&tail);
        }
        let start = usize_of(offset_bytes % BLOCK_BYTES);
        blocks[start..start + data.len()].copy_from_slice(data);
        Ok((first_block, blocks))
    }

    /// Writes whole blocks: encrypted first if the volume is.
    async fn write_aligned(&self, lba: u64, mut data: Bytes) -> Result<(), VolumeIoError> {
        debug_assert!((data.len() as u64).is_multiple_of(BLOCK_BYTES));
        if let Some(cipher) = self.cipher()? {
            // In place when `data` is the only owner of a buffer of its own.
            let mut buffer = bytes::BytesMut::from(data);
            cipher.encrypt_blocks(lba, &mut buffer);
            data = buffer.freeze();
        }
        if self.replicator().is_some() {
            // Replicated: each piece is ordered on its own.
            for (chunk_lba, chunk) in store_requests(lba, &data) {
                self.mutate(chunk_lba, chunk.len() as u64 / BLOCK_BYTES, Some(chunk))
                    .await?;
            }
            return Ok(());
        }
        if data.len() <= STORE_REQUEST_BYTES_MAX {
            return self
                .call(Command::Write {
                    volume_id: self.id,
                    lba,
                    data,
                    epoch: self.epoch(),
                    volume_sequence: self.next_sequence(),
                })
                .await
                .map(|_| ());
        }
        let _gate = self.move_gate.read().await;
        let mut pending = Vec::new();
        let block_count = data.len() as u64 / BLOCK_BYTES;
        for (chunk_lba, chunk) in store_requests(lba, &data) {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            self.submit(
                Command::Write {
                    volume_id: self.id,
                    lba: chunk_lba,
                    data: chunk,
                    epoch: self.epoch(),
                    volume_sequence: self.next_sequence(),
                },
                Box::new(move |result| {
                    let _ = sender.send(result);
                }),
            );
            pending.push(receiver);
        }
        let result = self.await_all(pending).await;
        // Parts may have landed even if one failed: count them all changed.
        self.note_changed(lba, block_count);
        result
    }

    /// One mutation (a write of `data`, or a zeroing when None) applied
    /// locally and on every in-sync replica at once, ordered against
    /// overlapping mutations; Ok only when all have it durable.
    async fn mutate(&self, lba: u64, block_count: u64, data: Option<Bytes>) -> Result<(), VolumeIoError> {
        let _range = self.ranges.lock(lba, block_count).await;
        // The serving tenure's epoch: if a newer coordinator fenced this node
        // meanwhile, the replicas refuse it.
        let tenure = self.serving_epoch();
        let (epoch, volume_sequence) = (tenure.max(1), self.next_sequence());
        let (command, kind) = match data {
            Some(data) => (
                Command::Write {
                    volume_id: self.id,
                    lba,
                    // Shared with the replica op, not copied.
                    data: data.clone(),
                    epoch,
                    volume_sequence,
                },
                OpKind::Write(data),
            ),
            None => (
                Command::Zero {
                    volume_id: self.id,
                    lba,
                    block_count,
                    epoch,
                    volume_sequence,
                },
                OpKind::Zero,
            ),
        };
        let op = ReplicaOp {
            volume_id: self.id,
            epoch,
            lba,
            block_count,
            volume_sequence,
            kind,
        };
        let Some(replicator) = self.replicator() else {
            // No replication: a single-replica volume, or this node stopped
            // coordinating (the reconciler stops serving before it drops the
            // replicator), and then the write must not be made here alone.
            if !self.is_served() {
                return Err(VolumeIoError::Replication {
                    volume: self.name.clone(),
                    reason: "this node no longer coordinates the volume".into(),
                });
            }
            return self.call(command).await.map(|_| ());
        };
        replicator
            .prepare(lba, block_count)
            .await
            .map_err(|reason| VolumeIoError::Replication {
                volume: self.name.clone(),
                reason,
            })?;
        let (local, remote) = tokio::join!(self.call(command), replicator.replicate(op));
        if let (Ok(_), Err(reason)) = (&local, &remote) {
            // Before the range lock is let go: no reader may see it.
            self.stop_serving_after_a_failed_write(reason);
        }
        local?;
        remote.map_err(|reason| VolumeIoError::Replication {
            volume: self.name.clone(),
            reason,
        })?;
        // Deposed and made coordinator again while this write was in flight
        // (it waited on a replica, then on Raft): meanwhile the other
        // coordinator's resync may have replaced this node's copy of the
        // range with one that never had the write, and the write's late
        // `ReplicaOut` then passes in the new tenure. It is not known to be
        // anywhere: fail it (found by `repl_sim`, seed 588).
        if self.serving_epoch() != tenure {
            return Err(VolumeIoError::Replication {
                volume: self.name.clone(),
                reason: format!(
                    "this node stopped serving the volume and serves it again (epoch {tenure} -> {}) while the write was in flight; it may not have reached any copy that counts",
                    self.serving_epoch()
                ),
            });
        }
        Ok(())
    }

    /// Applies a mutation the coordinator sent (this node is a replica).
    pub async fn apply_replica_op(&self, op: ReplicaOp) -> Result<(), VolumeIoError> {
        self.check_range(op.lba * BLOCK_BYTES, op.block_count * BLOCK_BYTES)?;
        let command = match op.kind {
            OpKind::Write(data) => Command::Write {
                volume_id: self.id,
                lba: op.lba,
                data,
                epoch: op.epoch,
                volume_sequence: op.volume_sequence,
            },
            OpKind::Zero => Command::Zero {
                volume_id: self.id,
                lba: op.lba,
                block_count: op.block_count,
                epoch: op.epoch,
                volume_sequence: op.volume_sequence,
            },
            OpKind::Snapshot { .. } | OpKind::Restore { .. } => {
                return Err(VolumeIoError::Replication {
                    volume: self.name.clone(),
                    reason: "snapshot operations are applied through the node's volumes".into(),
                })
            }
        };
        self.sequence.fetch_max(op.volume_sequence + 1, Ordering::AcqRel);
        self.call(command).await.map(|_| ())
    }

    async fn await_all(
        &self,
        pending: Vec<tokio::sync::oneshot::Receiver<Result<Reply, StoreError>>>,
    ) -> Result<(), VolumeIoError> {
        let mut first_error = None;
        for receiver in pending {
            let outcome = match receiver.await {
                Ok(Ok(_)) => continue,
                Ok(Err(source)) => VolumeIoError::Store {
                    volume: self.name.clone(),
                    source,
                },
                Err(_) => VolumeIoError::Stopped,
            };
            first_error.get_or_insert(outcome);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes the range read as zeroes. Without `allocate` the blocks are
    /// released (thin); with it they are written with zeroes (NO_HOLE).
    pub async fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64, allocate: bool) -> Result<(), VolumeIoError> {
        self.check_writable()?;
        self.check_range(offset_bytes, len_bytes)?;
        let first_full = offset_bytes.div_ceil(BLOCK_BYTES);
        let end_full = (offset_bytes + len_bytes) / BLOCK_BYTES;
        let aligned = offset_bytes.is_multiple_of(BLOCK_BYTES) && len_bytes.is_multiple_of(BLOCK_BYTES);
        if aligned {
            let _shared = self.rmw.read().await;
            return self.zero_blocks(first_full, end_full - first_full, allocate).await;
        }
        let _exclusive = self.rmw.write().await;
        if first_full < end_full {
            self.zero_blocks(first_full, end_full - first_full, allocate).await?;
        }
        // The partial blocks at either edge (or the one block holding the whole range).
        let head_end = (first_full * BLOCK_BYTES).min(offset_bytes + len_bytes);
        let tail_start = (end_full * BLOCK_BYTES).max(offset_bytes);
        let mut edges = vec![(offset_bytes, head_end)];
        if tail_start > head_end {
            edges.push((tail_start, offset_bytes + len_bytes));
        }
        for (start, end) in edges {
            if end > start {
                let zeroes = vec![0u8; usize_of(end - start)];
                let (lba, blocks) = self.merge_partial_blocks(start, &zeroes).await?;
                self.write_aligned(lba, blocks.into()).await?;
            }
        }
        Ok(())
    }

    async fn zero_blocks(&self, lba: u64, block_count: u64, allocate: bool) -> Result<(), VolumeIoError> {
        if block_count == 0 {
            return Ok(());
        }
        if !allocate {
            if self.replicator().is_some() {
                return self.mutate(lba, block_count, None).await;
            }
            return self
                .call(Command::Zero {
                    volume_id: self.id,
                    lba,
                    block_count,
                    epoch: self.epoch(),
                    volume_sequence: self.next_sequence(),
                })
                .await
                .map(|_| ());
        }
        let per_request = STORE_REQUEST_BYTES_MAX as u64 / BLOCK_BYTES;
        let mut done = 0;
        while done < block_count {
            let count = per_request.min(block_count - done);
            self.write_aligned(lba + done, vec![0u8; usize_of(count * BLOCK_BYTES)].into())
                .await?;
            done += count;
        }
        Ok(())
    }

    /// Releases whole blocks inside the range (partial blocks are left:
    /// a trim is advisory).
    pub async fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeIoError> {
        self.check_writable()?;
        self.check_range(offset_bytes, len_bytes)?;
        let first_full = offset_bytes.div_ceil(BLOCK_BYTES);
        let end_full = (offset_bytes + len_bytes) / BLOCK_BYTES;
        if first_full >= end_full {
            return Ok(());
        }
        let _shared = self.rmw.read().await;
        self.zero_blocks(first_full, end_full - first_full, false).await
    }

    /// Answers once every write answered before it is durable: at once,
    /// because a write (or zeroing) is answered only after it is durable on
    /// every in-sync replica (its batch goes out with FUA). No trip to the
    /// reactor, so a database's fsync after each commit costs nothing more.
    #[allow(clippy::unused_async)] // the contract of a flush, kept for callers
    pub async fn flush(&self) -> Result<(), VolumeIoError> {
        Ok(())
    }

    /// Allocation of the range as `(length_bytes, allocated)` runs covering
    /// it exactly, at most `runs_max` of them (the last may end early).
    pub async fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        runs_max: usize,
    ) -> Result<Vec<(u64, bool)>, VolumeIoError> {
        self.check_range(offset_bytes, len_bytes)?;
        let first_block = offset_bytes / BLOCK_BYTES;
        let end_block = (offset_bytes + len_bytes).div_ceil(BLOCK_BYTES);
        let engine = std::sync::Arc::clone(&self.engine);
        let _gate = self.move_gate.read().await;
        let (disk, id) = (self.disk_index(), self.id);
        let runs = tokio::task::spawn_blocking(move || {
            engine.query(disk, move |store| {
                store.block_status(id, first_block, end_block - first_block)
            })
        })
        .await
        .map_err(|_| VolumeIoError::Stopped)?
        .map_err(|_| VolumeIoError::Stopped)?;
        let end_bytes = offset_bytes + len_bytes;
        let mut out = Vec::new();
        for (lba, count, allocated) in runs {
            let start = (lba * BLOCK_BYTES).max(offset_bytes);
            let end = ((lba + count) * BLOCK_BYTES).min(end_bytes);
            if end > start {
                out.push((end - start, allocated));
            }
            if out.len() == runs_max {
                break;
            }
        }
        Ok(out)
    }
}
