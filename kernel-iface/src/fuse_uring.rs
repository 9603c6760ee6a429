//! FUSE over io_uring (Linux 6.14+, `/sys/module/fuse/parameters/enable_uring`):
//! one queue per possible CPU, each an io_uring (128-byte SQEs) on which
//! the server registers entries, each a header buffer and a payload buffer.
//! A registered entry completes (a CQE) when the kernel put a request in
//! it; the answer is written into the same buffers and sent back with
//! COMMIT_AND_FETCH, which also arms the entry for the next request. The
//! kernel sends a request to the queue of the CPU its caller runs on.
//!
//! ```text
//! header buffer (fuse_uring_req_header, 288 bytes)
//!     0  in_out[128]   fuse_in_header of the request / fuse_out_header of the answer
//!   128  op_in[128]    the operation's fixed arguments (fuse_write_in, ...)
//!   256  flags u64  264 commit_id u64 (the request's unique)  272 payload_sz u32  276 padding  280 reserved
//! payload buffer: the rest of the request (write data, a name); the answer's
//!     arguments and data, payload_sz bytes of them
//! SQE command area (fuse_uring_cmd_req): flags u64, commit_id u64, qid u16, padding[6]
//! ```
//!
//! This module owns the buffers and the ring; the protocol is the caller's.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use memmap2::{MmapMut, MmapOptions};

use crate::fuse::FuseChannel;

/// `fuse_uring_req_header`.
pub const HEADER_BYTES: usize = 288;
pub const IN_OUT_AT: usize = 0;
pub const OP_IN_AT: usize = 128;
pub const OP_IN_BYTES: usize = 128;
pub const COMMIT_ID_AT: usize = 264;
pub const PAYLOAD_SIZE_AT: usize = 272;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// The possible CPUs (/sys/devices/system/cpu/possible): the kernel makes one queue for each.
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0;
    for range in text.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let parse = |value: &str| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| io::Error::other(format!("cannot read the possible CPUs from {text:?}")))
        };
        count += parse(last)? - parse(first)? + 1;
    }
    Ok(count)
}

const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
const _: () = assert!(
    std::mem::size_of::<libc::iovec>() == 16,
    "iovecs are kept as (address, length) u64 pairs"
);
/// Where `len` sits in an SQE.
const SQE_LEN_AT: usize = 24;

/// Sets an SQE's `len` (REGISTER's iovec count), which `UringCmd80` has no setter for.
fn with_len(entry: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is repr(C) and 128 bytes (asserted above): an
    // io_uring_sqe of plain integers and unions of them, then 64 bytes of
    // command; every bit pattern is a valid value, so bytes and back is sound.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
    bytes[SQE_LEN_AT..SQE_LEN_AT + 4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

/// The entries' payload buffers: one mapping, addressed by raw pointer so
/// leases of one entry and the queue's access to another can coexist.
struct Payloads {
    at: *mut u8,
    len: usize,
    _map: MmapMut,
}

// SAFETY: the pointer is into `_map`, owned here; the bytes are only read
// through leases and written through `FuseUringQueue::buffers` (`&mut`), whose
// callers write an entry only when no lease of it is alive.
unsafe impl Send for Payloads {}
// SAFETY: as above.
unsafe impl Sync for Payloads {}

/// Hands out leases of one entry's payload bytes (`FuseUringQueue::lessor`).
pub struct PayloadLessor {
    payloads: Arc<Payloads>,
    marker: Arc<()>,
    entry_at: usize,
    entry_len: usize,
}

impl PayloadLessor {
    /// A lease of `bytes`, which must lie in this entry's payload buffer
    /// (a slice of it from `buffers`); None when they do not.
    #[must_use]
    pub fn lease(&self, bytes: &[u8]) -> Option<PayloadLease> {
        // SAFETY: pointer arithmetic inside the mapping (checked by the caller's slice origin below).
        let entry_start = unsafe { self.payloads.at.add(self.entry_at) } as usize;
        let start = bytes.as_ptr() as usize;
        let within = start >= entry_start && start + bytes.len() <= entry_start + self.entry_len;
        within.then(|| PayloadLease {
            payloads: Arc::clone(&self.payloads),
            _marker: Arc::clone(&self.marker),
            at: self.entry_at + (start - entry_start),
            len: bytes.len(),
        })
    }
}

/// Bytes of a request's payload, read in place: the entry keeps them (it is
/// not re-armed, see `FuseUringQueue::is_leased`) while this lives.
pub struct PayloadLease {
    payloads: Arc<Payloads>,
    _marker: Arc<()>,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for PayloadLease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at..at + len` lies in the mapping (checked at `lease`),
        // which `payloads` keeps alive; nothing writes it while the lease
        // lives (the entry is not re-armed and the queue's owner does not
        // write a leased entry).
        unsafe { std::slice::from_raw_parts(self.payloads.at.add(self.at), self.len) }
    }
}

/// One queue: its ring and its entries' buffers. Used by one thread.
pub struct FuseUringQueue {
    /// Declared first: dropped (its commands canceled) before the buffers
    /// the kernel was given go away.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    headers: MmapMut,
    /// Shared with the `PayloadLease`s of requests still being served.
    payloads: Arc<Payloads>,
    /// Per entry: one reference here, one more per live lease of its payload.
    leases: Box<[Arc<()>]>,
    /// Each entry's two iovecs (header, payload) as the kernel reads them at
    /// registration: (address, length) pairs, the layout of `struct iovec`.
    iovecs: Box<[[u64; 2]]>,
    payload_bytes: usize,
    entries: u16,
    qid: u16,
    /// A descriptor of the session; kept open while the ring uses it.
    device: File,
}

impl FuseUringQueue {
    /// A queue `qid` of `entries` entries with `payload_bytes` payload
    /// buffers (at least the session's max_write), on `channel`'s session.
    pub fn new(channel: &FuseChannel, qid: u16, entries: u16, payload_bytes: usize) -> io::Result<Self> {
        assert!(entries > 0 && payload_bytes > 0, "an empty FUSE queue");
        let device = channel.duplicate()?;
        let headers = MmapOptions::new().len(usize::from(entries) * HEADER_BYTES).map_anon()?;
        // Touched only as far as requests reach: a 4 KiB write uses one page of its megabyte.
        let payloads = MmapOptions::new()
            .len(usize::from(entries) * payload_bytes)
            .map_anon()?;
        let mut iovecs = Vec::with_capacity(usize::from(entries) * 2);
        for entry in 0..usize::from(entries) {
            iovecs.push([
                headers.as_ptr() as u64 + (entry * HEADER_BYTES) as u64,
                HEADER_BYTES as u64,
            ]);
            iovecs.push([
                payloads.as_ptr() as u64 + (entry * payload_bytes) as u64,
                payload_bytes as u64,
            ]);
        }
        // Room for every entry's command.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((u32::from(entries) + 2).next_power_of_two())?;
        let mut payloads = payloads;
        let payloads = Arc::new(Payloads {
            at: payloads.as_mut_ptr(),
            len: payloads.len(),
            _map: payloads,
        });
        Ok(Self {
            ring,
            headers,
            payloads,
            leases: (0..entries).map(|_| Arc::new(())).collect(),
            iovecs: iovecs.into_boxed_slice(),
            payload_bytes,
            entries,
            qid,
            device,
        })
    }

    fn command(&self, cmd_op: u32, entry: u16, commit_id: u64) -> squeue::Entry128 {
        let mut area = [0u8; 80];
        area[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        area[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut command = opcode::UringCmd80::new(types::Fd(self.device.as_raw_fd()), cmd_op).cmd(area);
        if cmd_op == CMD_REGISTER {
            let iovecs = &self.iovecs[usize::from(entry) * 2..usize::from(entry) * 2 + 2];
            command = command.addr(Some(iovecs.as_ptr() as u64));
            return with_len(command.build(), 2).user_data(u64::from(entry));
        }
        command.build().user_data(u64::from(entry))
    }

    fn push(&mut self, entry: &squeue::Entry128) -> io::Result<()> {
        // SAFETY: every command points only at memory `self` owns (the
        // entry's iovecs and, through them, its buffers), which lives until
        // the ring is dropped first (field order); the kernel writes an
        // entry's buffers only between its command and its completion, and
        // the accessors below hand them out only through `&mut self`.
        unsafe { self.ring.submission().push(entry) }.map_err(|_| io::Error::other("FUSE queue ring full"))
    }

    /// Registers entry `entry`: it completes when a request is in it.
    pub fn register(&mut self, entry: u16) -> io::Result<()> {
        assert!(entry < self.entries, "entry {entry} of a queue of {}", self.entries);
        let command = self.command(CMD_REGISTER, entry, 0);
        self.push(&command)
    }

    /// Sends entry `entry`'s answer (written into its buffers) to request
    /// `commit_id` and arms the entry again.
    pub fn commit(&mut self, entry: u16, commit_id: u64) -> io::Result<()> {
        assert!(entry < self.entries, "entry {entry} of a queue of {}", self.entries);
        let command = self.command(CMD_COMMIT_AND_FETCH, entry, commit_id);
        self.push(&command)
    }

    /// Has the kernel write `eventfd` whenever a completion is posted (a
    /// request arrived), so a thread waiting elsewhere (a reactor on its own
    /// ring) learns of it.
    pub fn notify(&self, eventfd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(eventfd)
    }

    /// Hands queued commands to the kernel, without waiting (no system call
    /// when none is queued).
    pub fn submit_queued(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Appends each posted completion as `(user data, result)` (no system call).
    pub fn completions(&mut self, completions: &mut Vec<(u64, i32)>) {
        for entry in self.ring.completion() {
            completions.push((entry.user_data(), entry.result()));
        }
    }

    /// Entry `entry`'s header and payload buffers.
    pub fn buffers(&mut self, entry: u16) -> (&mut [u8], &mut [u8]) {
        assert!(entry < self.entries, "entry {entry} of a queue of {}", self.entries);
        let header_at = usize::from(entry) * HEADER_BYTES;
        let payload_at = usize::from(entry) * self.payload_bytes;
        assert!(payload_at + self.payload_bytes <= self.payloads.len);
        // SAFETY: the range lies in the mapping (asserted), which lives as
        // long as `self.payloads`; `&mut self` makes this the only slice
        // handed out through the queue, and callers take no lease of the
        // entry while they hold it (leases are only read, and `is_leased`
        // lets the caller check none is left before the entry is re-armed).
        let payload = unsafe { std::slice::from_raw_parts_mut(self.payloads.at.add(payload_at), self.payload_bytes) };
        (&mut self.headers[header_at..header_at + HEADER_BYTES], payload)
    }

    /// What `lease` needs to hand out entry `entry`'s payload bytes without
    /// copying them: take it before `buffers`.
    #[must_use]
    pub fn lessor(&self, entry: u16) -> PayloadLessor {
        assert!(entry < self.entries, "entry {entry} of a queue of {}", self.entries);
        PayloadLessor {
            payloads: Arc::clone(&self.payloads),
            marker: Arc::clone(&self.leases[usize::from(entry)]),
            entry_at: usize::from(entry) * self.payload_bytes,
            entry_len: self.payload_bytes,
        }
    }

    /// Whether a lease (or a lessor) of entry `entry`'s payload is still alive: its
    /// bytes must stay as they are, so the entry must not take the next
    /// request (which the kernel writes into the payload).
    #[must_use]
    pub fn is_leased(&self, entry: u16) -> bool {
        Arc::strong_count(&self.leases[usize::from(entry)]) > 1
    }

    #[must_use]
    pub fn entries(&self) -> u16 {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_command_carries_its_iovec_count_where_the_kernel_reads_len() {
        let entry = opcode::UringCmd80::new(types::Fd(3), CMD_REGISTER)
            .addr(Some(0x1000))
            .build();
        let entry = with_len(entry, 2).user_data(7);
        // SAFETY: as in `with_len` (a repr(C) 128-byte SQE of plain integers).
        let bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
        assert_eq!(bytes[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), CMD_REGISTER);
        assert_eq!(u64::from_ne_bytes(bytes[16..24].try_into().unwrap()), 0x1000);
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2);
        assert_eq!(u64::from_ne_bytes(bytes[32..40].try_into().unwrap()), 7);
    }

    #[test]
    fn a_lease_lends_only_its_entrys_payload_bytes_and_marks_the_entry_until_dropped() {
        let entry_bytes = 8192;
        let mut map = MmapOptions::new().len(2 * entry_bytes).map_anon().unwrap();
        map[entry_bytes..entry_bytes + 4].copy_from_slice(b"data");
        let payloads = Arc::new(Payloads {
            at: map.as_mut_ptr(),
            len: map.len(),
            _map: map,
        });
        let marker = Arc::new(());
        let lessor = PayloadLessor {
            payloads: Arc::clone(&payloads),
            marker: Arc::clone(&marker),
            entry_at: entry_bytes,
            entry_len: entry_bytes,
        };
        // SAFETY: in the test's own mapping, nothing else writes it.
        let whole = unsafe { std::slice::from_raw_parts(payloads.at, payloads.len) };
        assert!(lessor.lease(&whole[..16]).is_none(), "another entry's bytes");
        assert!(
            lessor.lease(&whole[entry_bytes - 1..entry_bytes + 1]).is_none(),
            "straddling two entries"
        );
        assert!(lessor.lease(&[0u8; 4]).is_none(), "bytes from elsewhere");
        let lease = lessor
            .lease(&whole[entry_bytes..entry_bytes + 4])
            .expect("the entry's own bytes");
        assert_eq!(lease.as_ref(), b"data");
        assert!(
            Arc::strong_count(&marker) > 2,
            "the lessor and the lease hold the entry"
        );
        drop(lessor);
        drop(payloads);
        assert_eq!(lease.as_ref(), b"data", "the lease keeps the mapping alive");
        drop(lease);
        assert_eq!(
            Arc::strong_count(&marker),
            1,
            "no lease left: the entry may take the next request"
        );
    }

    #[test]
    fn the_possible_cpus_are_counted_from_their_ranges() {
        let count = possible_cpus().unwrap();
        assert!(count >= 1);
        assert!(count >= std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
    }
}
