//! ublk_drv plumbing: the control device's io_uring (128-byte SQEs,
//! URING_CMD), and per queue: /dev/ublkcN, its io_uring, the read-only
//! mmap of its descriptor array and the tags' data buffers. The ublk
//! protocol itself (structs, command numbers, sequence) is the caller's
//! (node/src/attach/ublk.rs); this module knows only where `addr` sits in
//! the two command structs, so a safe caller can never point the kernel at
//! memory it does not own.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use memmap2::{Mmap, MmapMut, MmapOptions};

pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// `ublksrv_ctrl_cmd`: `len` (u16) at 6, `addr` (u64) at 8.
const CTRL_CMD_BYTES: usize = 32;
const CTRL_LEN_AT: usize = 6;
const CTRL_ADDR_AT: usize = 8;
/// `ublksrv_io_cmd`: `tag` (u16) at 2, `addr` (u64) at 8.
const IO_CMD_BYTES: usize = 16;
const IO_TAG_AT: usize = 2;
const IO_ADDR_AT: usize = 8;
const IO_DESC_BYTES: usize = 24;
/// UBLK_MAX_QUEUE_DEPTH: each queue's slot in the descriptor mmap is sized for it.
const QUEUE_DEPTH_MAX: u16 = 4096;

fn page_bytes() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(4096)
}

/// Length of one queue's descriptor mapping: `round_up(depth * 24, page)`.
fn descriptor_map_bytes(depth: u16, page: usize) -> usize {
    (usize::from(depth) * IO_DESC_BYTES).next_multiple_of(page)
}

/// Offset of queue `q_id`'s descriptors in /dev/ublkcN's mmap:
/// `UBLKSRV_CMD_BUF_OFFSET (0) + q_id * round_up(UBLK_MAX_QUEUE_DEPTH * 24,
/// page)`; the kernel checks the mapping is read-only and exactly
/// `descriptor_map_bytes(depth)` long.
fn descriptor_map_offset(q_id: u16, page: usize) -> u64 {
    u64::from(q_id) * descriptor_map_bytes(QUEUE_DEPTH_MAX, page) as u64
}

fn result_of(entry: &cqueue::Entry) -> io::Result<i32> {
    let result = entry.result();
    if result < 0 {
        Err(io::Error::from_raw_os_error(-result))
    } else {
        Ok(result)
    }
}

/// /dev/ublk-control and its ring.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
}

impl Control {
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL_PATH)?;
        // ublk_drv refuses control commands from 64-byte SQEs (EINVAL).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Self { ring, file })
    }

    /// Runs one command (`cmd`: a `ublksrv_ctrl_cmd`, its `addr` and `len`
    /// set here from `buffer`) and waits for its completion.
    pub fn command(&mut self, cmd_op: u32, cmd: [u8; CTRL_CMD_BYTES], buffer: Option<&mut [u8]>) -> io::Result<i32> {
        let mut area = [0u8; 80];
        area[..CTRL_CMD_BYTES].copy_from_slice(&cmd);
        let (addr, len) = match buffer {
            Some(buffer) => {
                let len = u16::try_from(buffer.len())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ublk control buffer over 64 KiB"))?;
                (buffer.as_mut_ptr() as u64, len)
            }
            None => (0, 0),
        };
        area[CTRL_LEN_AT..CTRL_LEN_AT + 2].copy_from_slice(&len.to_ne_bytes());
        area[CTRL_ADDR_AT..CTRL_ADDR_AT + 8].copy_from_slice(&addr.to_ne_bytes());
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(area)
            .build()
            .user_data(1);
        // SAFETY: the entry points at `buffer` (if any), which this call
        // borrows mutably until the completion below is reaped; nothing else
        // is in flight on this ring (each command is waited for).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| io::Error::other("ublk control ring full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
            if let Some(entry) = self.ring.completion().next() {
                return result_of(&entry);
            }
        }
    }
}

/// One queue of a ublk device; used by the thread that opened it.
pub struct Queue {
    /// Declared first: dropped (its commands canceled) before the buffers
    /// the kernel was given go away.
    ring: IoUring,
    descriptors: Mmap,
    buffers: MmapMut,
    buffer_bytes: usize,
    depth: u16,
    _file: File,
}

impl Queue {
    /// Opens /dev/ublkc`dev_id` (NotFound until it exists) for queue `q_id`.
    pub fn open(dev_id: u32, q_id: u16, depth: u16, buffer_bytes: usize) -> io::Result<Self> {
        assert!(depth > 0 && depth <= QUEUE_DEPTH_MAX, "queue depth {depth}");
        assert!(buffer_bytes > 0, "empty ublk buffers");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/ublkc{dev_id}"))?;
        let page = page_bytes();
        // SAFETY: a read-only shared mapping of the kernel's descriptor
        // array (ublk_drv refuses writable ones); the kernel writes it while
        // we read, so it is only ever read with `read_volatile` below.
        let descriptors = unsafe {
            MmapOptions::new()
                .offset(descriptor_map_offset(q_id, page))
                .len(descriptor_map_bytes(depth, page))
                .map(&file)?
        };
        let buffers = MmapOptions::new().len(usize::from(depth) * buffer_bytes).map_anon()?;
        let ring = IoUring::builder().build(u32::from(depth).next_power_of_two())?;
        Ok(Self {
            ring,
            descriptors,
            buffers,
            buffer_bytes,
            depth,
            _file: file,
        })
    }

    /// Queues a command for `tag`; `addr` is set to the tag's buffer.
    pub fn push(&mut self, cmd_op: u32, tag: u16, cmd: [u8; IO_CMD_BYTES]) -> io::Result<()> {
        assert!(tag < self.depth, "tag {tag} of a queue of {}", self.depth);
        let mut cmd = cmd;
        cmd[IO_TAG_AT..IO_TAG_AT + 2].copy_from_slice(&tag.to_ne_bytes());
        let addr = self.buffers.as_mut_ptr() as u64 + (usize::from(tag) * self.buffer_bytes) as u64;
        cmd[IO_ADDR_AT..IO_ADDR_AT + 8].copy_from_slice(&addr.to_ne_bytes());
        let entry = opcode::UringCmd16::new(types::Fd(self._file.as_raw_fd()), cmd_op)
            .cmd(cmd)
            .build()
            .user_data(u64::from(tag));
        // SAFETY: the entry points at the tag's buffer, owned by `self` and
        // freed only after the ring (field order); the kernel writes it only
        // while this thread is inside io_uring_enter (`submit`), when no
        // Rust reference to it exists (`buffers` borrows `self` mutably).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| io::Error::other("ublk queue ring full"))
    }

    /// Submits what was queued; with `wait`, blocks for one completion;
    /// appends each completion as `(tag, result)`.
    pub fn submit(&mut self, wait: bool, completions: &mut Vec<(u16, i32)>) -> io::Result<()> {
        self.ring.submit_and_wait(usize::from(wait))?;
        for entry in self.ring.completion() {
            let tag = u16::try_from(entry.user_data()).expect("user data is a tag");
            completions.push((tag, entry.result()));
        }
        Ok(())
    }

    /// A copy of `tag`'s descriptor.
    #[must_use]
    pub fn descriptor(&self, tag: u16) -> [u8; IO_DESC_BYTES] {
        assert!(tag < self.depth, "tag {tag} of a queue of {}", self.depth);
        let at = usize::from(tag) * IO_DESC_BYTES;
        let mut out = [0u8; IO_DESC_BYTES];
        for (index, byte) in out.iter_mut().enumerate() {
            // SAFETY: `at + index` lies inside the mapping (tag < depth, the
            // mapping holds depth descriptors); volatile because the kernel
            // writes it concurrently (it is stable once the tag's CQE is reaped).
            *byte = unsafe { self.descriptors.as_ptr().add(at + index).read_volatile() };
        }
        out
    }

    /// The tags' buffers, in tag order.
    pub fn buffers(&mut self) -> std::slice::ChunksExactMut<'_, u8> {
        self.buffers.chunks_exact_mut(self.buffer_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_queue_maps_whole_pages_of_descriptors_at_its_own_slot() {
        assert_eq!(descriptor_map_offset(0, 4096), 0);
        // 4096 descriptors of 24 bytes: 98 304 bytes, 24 pages, per queue.
        assert_eq!(descriptor_map_offset(2, 4096), 2 * 98_304);
        assert_eq!(descriptor_map_bytes(64, 4096), 4096);
        assert_eq!(descriptor_map_bytes(200, 4096), 8192);
        assert_eq!(descriptor_map_bytes(64, page_bytes()) % page_bytes(), 0);
    }

    #[test]
    fn missing_devices_are_not_found() {
        if std::path::Path::new(CONTROL_PATH).exists() {
            return;
        }
        assert_eq!(Control::open().err().unwrap().kind(), io::ErrorKind::NotFound);
        assert_eq!(
            Queue::open(4095, 0, 64, 4096).err().unwrap().kind(),
            io::ErrorKind::NotFound
        );
    }
}
