//! `SimDisk`: an in-memory block device with fault injection, for tests and
//! the simulator. It keeps what reads see (`written`) apart from what would
//! survive a power cut (`durable`): a write becomes durable only through a
//! flush submitted after its completion was delivered. `crash` returns the
//! disk as a power cut would leave it: durable bytes, plus any subset of the
//! unflushed and in-flight writes, some of them torn at 512-byte sectors.
//!
//! Requests execute in a seeded random order when `wait` is called, so tests
//! exercise out-of-order completion deterministically.

use std::collections::BTreeSet;

use crate::buf::IoBuf;
use crate::error::IoFault;
use crate::io::{BlockIo, IoCompletion, IoOp, IoRequest};

const SECTOR_BYTES: usize = 512;
const EIO: i32 = 5;
const EOPNOTSUPP: i32 = 95;

/// A tiny deterministic PRNG (xorshift64*), so the crate needs no `rand`.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }

    /// Uniform index in `0..len` (len > 0).
    pub fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).expect("below len")
    }
}

struct UnflushedWrite {
    completion_number: u64,
    offset: usize,
    data: Vec<u8>,
}

struct QueuedRequest {
    request: IoRequest,
    /// For flushes: writes completed before submission.
    writes_completed_at_submit: u64,
}

/// Faults the disk injects.
#[derive(Clone, Debug, Default)]
pub struct SimFaults {
    /// Write attempts (counted from 0) at or after this number fail with EIO.
    pub fail_writes_from: Option<u64>,
    /// Flushes fail with EIO.
    pub fail_flushes: bool,
    /// Reads touching these 4 KiB blocks fail with EIO.
    pub eio_read_blocks: BTreeSet<u64>,
    /// Once this many flushes have completed, further flushes stay queued
    /// (a slow device cache flush) until the field is cleared.
    pub hold_flushes_after: Option<u64>,
    /// Discards fail with EOPNOTSUPP (a device without discard support).
    pub discard_unsupported: bool,
    /// Discards fail with EIO.
    pub fail_discards: bool,
}

/// Counters of what the device did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimStats {
    pub writes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub discard_bytes: u64,
}

/// An in-memory disk with separate written and durable images.
pub struct SimDisk {
    written: Vec<u8>,
    durable: Vec<u8>,
    unflushed: Vec<UnflushedWrite>,
    queue: Vec<QueuedRequest>,
    ready: Vec<IoCompletion>,
    writes_completed: u64,
    write_attempts: u64,
    rng: SimRng,
    /// Faults to inject; tests change them at any time.
    pub faults: SimFaults,
    pub stats: SimStats,
}

impl SimDisk {
    /// A zeroed disk of `size_bytes`, with request order driven by `seed`.
    #[must_use]
    pub fn new(size_bytes: usize, seed: u64) -> Self {
        Self::from_image(vec![0u8; size_bytes], seed)
    }

    fn from_image(image: Vec<u8>, seed: u64) -> Self {
        Self {
            written: image.clone(),
            durable: image,
            unflushed: Vec::new(),
            queue: Vec::new(),
            ready: Vec::new(),
            writes_completed: 0,
            write_attempts: 0,
            rng: SimRng::new(seed),
            faults: SimFaults::default(),
            stats: SimStats::default(),
        }
    }

    /// Size in bytes.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.written.len() as u64
    }

    /// Requests submitted and not yet completed.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Requests that can run now (held flushes excluded).
    #[must_use]
    pub fn runnable(&self) -> usize {
        if self.flushes_held() {
            self.queue
                .iter()
                .filter(|q| !matches!(q.request.op, IoOp::Flush))
                .count()
        } else {
            self.queue.len()
        }
    }

    /// Executes every queued request (in random order) and returns all
    /// completions (held flushes stay queued).
    pub fn run_all(&mut self) -> Vec<IoCompletion> {
        while let Some(pick) = self.pick_runnable() {
            self.execute(pick);
        }
        std::mem::take(&mut self.ready)
    }

    /// Executes a random non-empty subset of the queued requests.
    pub fn run_some(&mut self) -> Vec<IoCompletion> {
        let count = 1 + self.rng.index(self.queue.len().max(1));
        for _ in 0..count {
            match self.pick_runnable() {
                Some(pick) => self.execute(pick),
                None => break,
            }
        }
        std::mem::take(&mut self.ready)
    }

    fn flushes_held(&self) -> bool {
        self.faults
            .hold_flushes_after
            .is_some_and(|after| self.stats.flushes >= after)
    }

    /// A random queued request that may run now.
    fn pick_runnable(&mut self) -> Option<usize> {
        if self.queue.is_empty() {
            return None;
        }
        if !self.flushes_held() {
            return Some(self.rng.index(self.queue.len()));
        }
        let runnable: Vec<usize> = (0..self.queue.len())
            .filter(|&i| !matches!(self.queue[i].request.op, IoOp::Flush))
            .collect();
        (!runnable.is_empty()).then(|| runnable[self.rng.index(runnable.len())])
    }

    fn execute(&mut self, position: usize) {
        let QueuedRequest {
            request,
            writes_completed_at_submit,
        } = self.queue.swap_remove(position);
        let (result, buf) = match request.op {
            IoOp::Read { offset_bytes, mut buf } => (self.do_read(offset_bytes, &mut buf), Some(buf)),
            IoOp::Write { offset_bytes, buf } => (self.do_write(offset_bytes, &buf, false), Some(buf)),
            IoOp::WriteDurable { offset_bytes, buf } => (self.do_write(offset_bytes, &buf, true), Some(buf)),
            IoOp::Flush => (self.do_flush(writes_completed_at_submit), None),
            IoOp::Discard {
                offset_bytes,
                len_bytes,
            } => (self.do_discard(offset_bytes, len_bytes), None),
        };
        self.ready.push(IoCompletion {
            token: request.token,
            result,
            buf,
        });
    }

    fn range(&self, offset_bytes: u64, len: usize) -> Result<std::ops::Range<usize>, IoFault> {
        let start = usize::try_from(offset_bytes).map_err(|_| IoFault::Errno { errno: EIO })?;
        let end = start.checked_add(len).ok_or(IoFault::Errno { errno: EIO })?;
        if end > self.written.len() {
            return Err(IoFault::Errno { errno: EIO });
        }
        Ok(start..end)
    }

    fn do_read(&mut self, offset_bytes: u64, buf: &mut IoBuf) -> Result<(), IoFault> {
        let range = self.range(offset_bytes, buf.len())?;
        let first_block = range.start as u64 / 4096;
        let last_block = (range.end as u64).div_ceil(4096);
        if self
            .faults
            .eio_read_blocks
            .range(first_block..last_block)
            .next()
            .is_some()
        {
            return Err(IoFault::Errno { errno: EIO });
        }
        self.stats.reads += 1;
        self.stats.read_bytes += buf.len() as u64;
        buf.as_mut_slice().copy_from_slice(&self.written[range]);
        Ok(())
    }

    fn do_write(&mut self, offset_bytes: u64, buf: &IoBuf, durable: bool) -> Result<(), IoFault> {
        let attempt = self.write_attempts;
        self.write_attempts += 1;
        let range = self.range(offset_bytes, buf.len())?;
        if self.faults.fail_writes_from.is_some_and(|from| attempt >= from) {
            return Err(IoFault::Errno { errno: EIO });
        }
        self.stats.writes += 1;
        self.stats.write_bytes += buf.len() as u64;
        self.written[range.clone()].copy_from_slice(buf.as_slice());
        if durable {
            self.durable[range].copy_from_slice(buf.as_slice());
        } else {
            self.unflushed.push(UnflushedWrite {
                completion_number: self.writes_completed,
                offset: range.start,
                data: buf.as_slice().to_vec(),
            });
        }
        self.writes_completed += 1;
        Ok(())
    }

    /// A discard reads back as zeroes (what an SSD with deterministic read
    /// zeroes after TRIM returns, and the most visible outcome for tests).
    fn do_discard(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), IoFault> {
        if self.faults.discard_unsupported {
            return Err(IoFault::Errno { errno: EOPNOTSUPP });
        }
        if self.faults.fail_discards {
            return Err(IoFault::Errno { errno: EIO });
        }
        let len = usize::try_from(len_bytes).map_err(|_| IoFault::Errno { errno: EIO })?;
        let range = self.range(offset_bytes, len)?;
        self.stats.discards += 1;
        self.stats.discard_bytes += len_bytes;
        self.written[range.clone()].fill(0);
        self.durable[range].fill(0);
        Ok(())
    }

    /// True when every byte of the range reads as zero (a discard's mark).
    #[must_use]
    pub fn is_zero(&self, offset_bytes: usize, len: usize) -> bool {
        self.written[offset_bytes..offset_bytes + len].iter().all(|&b| b == 0)
    }

    fn do_flush(&mut self, writes_completed_at_submit: u64) -> Result<(), IoFault> {
        if self.faults.fail_flushes {
            return Err(IoFault::Errno { errno: EIO });
        }
        self.stats.flushes += 1;
        let (now_durable, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unflushed)
            .into_iter()
            .partition(|write| write.completion_number < writes_completed_at_submit);
        for write in now_durable {
            self.durable[write.offset..write.offset + write.data.len()].copy_from_slice(&write.data);
        }
        self.unflushed = still;
        Ok(())
    }

    /// The disk after a power cut: durable bytes plus, for each unflushed or
    /// in-flight write, one of: lost, applied whole, or torn (a random subset
    /// of its sectors). In-flight requests are gone.
    #[must_use]
    pub fn crash(&mut self, seed: u64) -> SimDisk {
        let mut rng = SimRng::new(seed);
        let mut image = self.durable.clone();
        let in_flight = self.queue.iter().filter_map(|queued| match &queued.request.op {
            IoOp::Write { offset_bytes, buf } | IoOp::WriteDurable { offset_bytes, buf } => {
                usize::try_from(*offset_bytes)
                    .ok()
                    .map(|offset| (offset, buf.as_slice()))
            }
            _ => None,
        });
        // A discard in flight at the cut happened or did not.
        for queued in &self.queue {
            if let IoOp::Discard {
                offset_bytes,
                len_bytes,
            } = queued.request.op
            {
                let Some(range) = usize::try_from(len_bytes)
                    .ok()
                    .and_then(|len| self.range(offset_bytes, len).ok())
                else {
                    continue;
                };
                if rng.below(2) == 0 {
                    image[range].fill(0);
                }
            }
        }
        let unflushed = self.unflushed.iter().map(|write| (write.offset, write.data.as_slice()));
        for (offset, data) in unflushed.chain(in_flight) {
            if offset + data.len() > image.len() {
                continue;
            }
            match rng.below(3) {
                0 => {}
                1 => image[offset..offset + data.len()].copy_from_slice(data),
                _ => {
                    for (sector, bytes) in data.chunks(SECTOR_BYTES).enumerate() {
                        if rng.below(2) == 0 {
                            let at = offset + sector * SECTOR_BYTES;
                            image[at..at + bytes.len()].copy_from_slice(bytes);
                        }
                    }
                }
            }
        }
        SimDisk::from_image(image, seed ^ 0x5EED)
    }

    /// The disk after a clean stop: everything written is kept.
    #[must_use]
    pub fn clean_copy(&self, seed: u64) -> SimDisk {
        SimDisk::from_image(self.written.clone(), seed)
    }

    /// Flips one bit in both images (bit rot).
    pub fn flip_bit(&mut self, offset_bytes: usize, bit: u8) {
        self.written[offset_bytes] ^= 1 << (bit % 8);
        self.durable[offset_bytes] ^= 1 << (bit % 8);
    }

    /// Reads bytes from the written image (for test assertions).
    #[must_use]
    pub fn peek(&self, offset_bytes: usize, len: usize) -> &[u8] {
        &self.written[offset_bytes..offset_bytes + len]
    }
}

impl BlockIo for SimDisk {
    fn submit(&mut self, request: IoRequest) {
        self.queue.push(QueuedRequest {
            request,
            writes_completed_at_submit: self.writes_completed,
        });
    }

    fn wait(&mut self, out: &mut Vec<IoCompletion>) {
        assert!(
            !self.queue.is_empty() || !self.ready.is_empty(),
            "SimDisk::wait with nothing in flight would block forever"
        );
        out.extend(self.run_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(disk: &mut SimDisk, token: u64, offset: u64, fill: u8) {
        let mut buf = IoBuf::new(4096);
        buf.as_mut_slice().fill(fill);
        disk.submit(IoRequest {
            token,
            op: IoOp::Write {
                offset_bytes: offset,
                buf,
            },
        });
    }

    #[test]
    fn unflushed_writes_may_vanish_in_a_crash_but_flushed_ones_survive() {
        let mut lost_seen = false;
        for seed in 0..20 {
            let mut disk = SimDisk::new(64 * 1024, seed);
            write(&mut disk, 1, 0, 0xAA);
            disk.run_all();
            disk.submit(IoRequest {
                token: 2,
                op: IoOp::Flush,
            });
            disk.run_all();
            write(&mut disk, 3, 4096, 0xBB);
            disk.run_all();
            let crashed = disk.crash(seed);
            assert!(crashed.peek(0, 4096).iter().all(|&b| b == 0xAA), "flushed write lost");
            lost_seen |= crashed.peek(4096, 4096).iter().all(|&b| b == 0);
        }
        assert!(lost_seen, "no seed lost the unflushed write");
    }

    #[test]
    fn a_flush_does_not_cover_writes_completed_after_it_was_submitted() {
        let mut disk = SimDisk::new(64 * 1024, 1);
        write(&mut disk, 1, 0, 0xAA);
        disk.submit(IoRequest {
            token: 2,
            op: IoOp::Flush,
        });
        // Execute the flush first, then the write.
        disk.execute(1);
        disk.execute(0);
        let crashed = disk.crash(0);
        let _ = crashed; // outcome is random; what matters is the durable image:
        assert!(disk.durable[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn injected_write_errors_are_reported_and_not_applied() {
        let mut disk = SimDisk::new(64 * 1024, 1);
        disk.faults.fail_writes_from = Some(0);
        write(&mut disk, 7, 0, 0xCC);
        let done = disk.run_all();
        assert_eq!(done[0].token, 7);
        assert!(done[0].result.is_err());
        assert!(disk.peek(0, 4096).iter().all(|&b| b == 0));
    }
}
