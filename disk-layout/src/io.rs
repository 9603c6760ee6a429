//! The I/O trait the store runs over.
//!
//! Completion-based, like io_uring: the store submits requests that own
//! their buffers and learns of their completion later, from whoever drives
//! the device (a reactor in production, a loop in tests). Three backends
//! implement it: io_uring/O_DIRECT and a pread/pwrite thread pool (in the
//! node, over `kernel-iface`) and the in-memory fault-injecting `SimDisk`.
//!
//! Ordering contract (what real devices guarantee, and all the store relies on):
//! requests in flight together may complete in any order; a flush makes
//! durable every write whose completion was delivered before the flush was
//! submitted, nothing more.

use crate::buf::IoBuf;
use crate::error::IoFault;

/// What one request does.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset_bytes` into `buf`.
    Read { offset_bytes: u64, buf: IoBuf },
    /// Write `buf` at `offset_bytes`.
    Write { offset_bytes: u64, buf: IoBuf },
    /// Write `buf` at `offset_bytes` and make it durable before completing
    /// (FUA / RWF_DSYNC). Says nothing of other writes.
    WriteDurable { offset_bytes: u64, buf: IoBuf },
    /// Make completed writes durable (fdatasync / FLUSH CACHE).
    Flush,
    /// Tell the device `len_bytes` at `offset_bytes` hold nothing worth
    /// keeping (a discard on an SSD, a punched hole in a file): the range
    /// then reads as zeroes or as its old bytes. Unordered against every
    /// other request: the store discards only segments no request touches
    /// and none will until the discard completes.
    Discard { offset_bytes: u64, len_bytes: u64 },
}

/// One submitted request; `token` comes back in its completion.
#[derive(Debug)]
pub struct IoRequest {
    pub token: u64,
    pub op: IoOp,
}

/// The outcome of one request. `buf` is the request's buffer, returned.
#[derive(Debug)]
pub struct IoCompletion {
    pub token: u64,
    pub result: Result<(), IoFault>,
    pub buf: Option<IoBuf>,
}

/// Store tokens must leave the top 8 bits to the backend (disk number).
pub const TOKEN_BITS: u32 = 56;

/// A block device as the store sees it.
pub trait BlockIo {
    /// Queues a request. Never blocks on the device.
    fn submit(&mut self, request: IoRequest);

    /// Blocks until at least one submitted request completes, then appends
    /// every completion that is ready. Used only while a store is opened
    /// (replay), when it is the sole user of the device.
    fn wait(&mut self, out: &mut Vec<IoCompletion>);
}

/// Submits one request and waits for it alone. Only valid when nothing
/// else is in flight on `io` (store open and format).
pub fn run_one(io: &mut impl BlockIo, token: u64, op: IoOp) -> IoCompletion {
    io.submit(IoRequest { token, op });
    let mut out = Vec::with_capacity(1);
    loop {
        io.wait(&mut out);
        if let Some(position) = out.iter().position(|c| c.token == token) {
            let completion = out.swap_remove(position);
            assert!(out.is_empty(), "run_one used while other I/O was in flight");
            return completion;
        }
    }
}
