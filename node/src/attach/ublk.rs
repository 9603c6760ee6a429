//! The ublk backend of host attach: a volume served as /dev/ublkbN by the
//! kernel's ublk_drv, its requests handled here (no NBD hop, no FUSE).
//!
//! This module owns the ublk protocol (include/uapi/linux/ublk_cmd.h): the
//! `#[repr(C)]` structs and their encoding into command bytes, the command
//! numbers, the device's start and stop sequence, and the handling of each
//! request against the volume. The kernel plumbing (io_uring URING_CMD
//! submission, the read-only mmap of each queue's descriptor array, the
//! tags' data buffers the kernel copies into) needs `unsafe`, which this
//! crate forbids: it sits behind the `Kernel`, `ControlRing` and
//! `QueueRing` traits, to be implemented in kernel-iface.
//!
//! Start: ADD_DEV (the kernel picks the device number), SET_PARAMS, one
//! thread per queue opens /dev/ublkcN and FETCHes every tag, then
//! START_DEV (which waits for those fetches) makes /dev/ublkbN. Each
//! completed FETCH is a request; its answer goes back with
//! COMMIT_AND_FETCH, which arms the tag again. Stop: STOP_DEV removes the
//! disk and completes every armed tag with ABORT, the queue threads end,
//! and DEL_DEV (after their char devices are closed) frees the device.
//!
//! Kept across an upgrade in place (user recovery, Linux 6.0+): devices are
//! made with UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE, so when
//! their server's queues end the kernel quiesces the disk instead of
//! removing it: new requests wait, and requests handed to the old server
//! but not answered are issued again to the next one. To hand over, each
//! queue thread is woken (`Kernel::interrupt`), submits the answers of the
//! batch it served and parks (`pause`); `release` ends the threads without
//! STOP_DEV. The next program (same pid, or this one after a node crash,
//! from `attach::UBLK_RECORD`) recovers: GET_DEV_INFO, START_USER_RECOVERY (EBUSY
//! until the old queues' descriptors are released), FETCH every tag, and
//! END_USER_RECOVERY once the volume is served here again, which lets the
//! waiting requests through (`recover`).

use std::io;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::volume::{Volume, VolumeIoError};

/// The ublk control device; present once ublk_drv is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Queues (one serving thread each); raise it when a benchmark shows the need.
const QUEUE_COUNT: u16 = 1;
/// Requests in flight per queue (tags).
const QUEUE_DEPTH: u16 = 64;
/// Largest request, and the size of each tag's buffer: memory is
/// `QUEUE_COUNT * QUEUE_DEPTH * IO_BUFFER_BYTES` (32 MiB) per device.
const IO_BUFFER_BYTES: u32 = 512 * 1024;
/// Largest discard, so one request's work stays bounded.
const DISCARD_BYTES_MAX: u64 = 1 << 30;
/// Largest write-zeroes (with NOUNMAP it writes every byte).
const WRITE_ZEROES_BYTES_MAX: u64 = 64 << 20;
/// The store's block (discard granularity, physical block).
const STORE_BLOCK_BYTES: u32 = 4096;
const SECTOR_BYTES: u64 = 512;
/// How long /dev/ublkcN may take to appear after ADD_DEV.
const CHAR_DEVICE_WAIT_MS: u64 = 5_000;
/// How long the queue threads may take to open their device and fetch.
const QUEUE_READY_TIMEOUT_MS: u64 = 10_000;
/// How long the queue threads may take to end after STOP_DEV.
const QUEUE_EXIT_TIMEOUT_MS: u64 = 30_000;
const POLL_INTERVAL_MS: u64 = 10;
/// How long START_USER_RECOVERY may answer EBUSY (the old server's queue
/// descriptors are released by the kernel after its threads end).
const RECOVERY_START_WAIT_MS: u64 = 10_000;
/// How often a pausing device wakes its queue threads.
const WAKE_INTERVAL_MS: u64 = 2;

// ---------------------------------------------------------------------------
// UAPI: structs, bit for bit as in include/uapi/linux/ublk_cmd.h. Fields are
// native-endian (the kernel's); the encoders below are the only way they
// become bytes.
// ---------------------------------------------------------------------------

/// `struct ublksrv_ctrl_cmd`: the command area of a control SQE (128-byte SQEs).
///
/// ```text
///  0 dev_id u32 | 4 queue_id u16 | 6 len u16 | 8 addr u64 | 16 data[0] u64
/// 24 dev_path_len u16 | 26 pad u16 | 28 reserved u32                  = 32
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// u16::MAX when the command is not for one queue (ADD_DEV checks it).
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`: ADD_DEV's argument, returned filled in.
///
/// ```text
///  0 nr_hw_queues u16 | 2 queue_depth u16 | 4 state u16 | 6 pad0 u16
///  8 max_io_buf_bytes u32 | 12 dev_id u32 | 16 ublksrv_pid i32 | 20 pad1 u32
/// 24 flags u64 | 32 ublksrv_flags u64 | 40 owner_uid u32 | 44 owner_gid u32
/// 48 reserved1 u64 | 56 reserved2 u64                                  = 64
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one per tag in the queue's mmapped array.
///
/// ```text
///  0 op_flags u32 (op: bits 0-7) | 4 nr_sectors u32 | 8 start_sector u64
/// 16 addr u64                                                          = 24
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: the command area of an I/O SQE.
///
/// ```text
///  0 q_id u16 | 2 tag u16 | 4 result i32 | 8 addr u64                  = 16
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// The leading part of `struct ublk_params` this backend sets: header,
/// basic, discard. SET_PARAMS copies `len` bytes; the rest (devt, zoned,
/// dma, segment) stays zero, so any kernel's larger struct accepts it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
}

pub const CTRL_CMD_BYTES: usize = 32;
pub const DEV_INFO_BYTES: usize = 64;
pub const IO_DESC_BYTES: usize = 24;
pub const IO_CMD_BYTES: usize = 16;
/// The sizes the ioctl encoding carries (the kernel's `sizeof`).
const CTRL_CMD_SIZE: u32 = 32;
const IO_CMD_SIZE: u32 = 16;
/// Bytes of `Params` the kernel reads: up to the end of `discard`.
const PARAMS_LEN: usize = offset_of!(Params, discard) + size_of::<ParamDiscard>();
const PARAMS_LEN_U32: u32 = 60;
const _: () = assert!(size_of::<CtrlCmd>() == CTRL_CMD_BYTES);
const _: () = assert!(size_of::<DevInfo>() == DEV_INFO_BYTES);
const _: () = assert!(size_of::<IoDesc>() == IO_DESC_BYTES);
const _: () = assert!(size_of::<IoCmd>() == IO_CMD_BYTES);
const _: () = assert!(size_of::<ParamBasic>() == 32);
const _: () = assert!(size_of::<ParamDiscard>() == 20);
const _: () = assert!(PARAMS_LEN == PARAMS_LEN_U32 as usize);
const _: () = assert!(CTRL_CMD_BYTES == CTRL_CMD_SIZE as usize);
const _: () = assert!(IO_CMD_BYTES == IO_CMD_SIZE as usize);

// Command numbers (`_IOC_NR`).
const CMD_GET_DEV_INFO: u32 = 0x02;
const CMD_ADD_DEV: u32 = 0x04;
const CMD_DEL_DEV: u32 = 0x05;
const CMD_START_DEV: u32 = 0x06;
const CMD_STOP_DEV: u32 = 0x07;
const CMD_SET_PARAMS: u32 = 0x08;
const CMD_START_USER_RECOVERY: u32 = 0x10;
const CMD_END_USER_RECOVERY: u32 = 0x11;
const IO_FETCH_REQ: u32 = 0x20;
const IO_COMMIT_AND_FETCH_REQ: u32 = 0x21;

/// `_IOC_READ | _IOC_WRITE` (`_IOWR`).
const IOC_READ_WRITE: u32 = 3;

/// `_IOC(dir, 'u', nr, size)`: dir in bits 30-31, size 16-29, type 8-15, nr 0-7.
const fn ioc(dir: u32, nr: u32, size_bytes: u32) -> u32 {
    (dir << 30) | (size_bytes << 16) | ((b'u' as u32) << 8) | nr
}

pub const UBLK_U_CMD_ADD_DEV: u32 = ioc(IOC_READ_WRITE, CMD_ADD_DEV, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_DEL_DEV: u32 = ioc(IOC_READ_WRITE, CMD_DEL_DEV, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_START_DEV: u32 = ioc(IOC_READ_WRITE, CMD_START_DEV, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_STOP_DEV: u32 = ioc(IOC_READ_WRITE, CMD_STOP_DEV, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_SET_PARAMS: u32 = ioc(IOC_READ_WRITE, CMD_SET_PARAMS, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ioc(IOC_READ_WRITE, CMD_GET_DEV_INFO, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, CMD_START_USER_RECOVERY, CTRL_CMD_SIZE);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, CMD_END_USER_RECOVERY, CTRL_CMD_SIZE);
pub const UBLK_U_IO_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, IO_FETCH_REQ, IO_CMD_SIZE);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, IO_COMMIT_AND_FETCH_REQ, IO_CMD_SIZE);

/// Use of the ioctl-encoded command numbers (else the legacy plain ones).
const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// The device outlives its server: quiesced, not removed, when the queues end.
const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// Requests the old server held unanswered go to the next one again.
const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

#[cfg(test)]
const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
#[cfg(test)]
const UBLK_ATTR_FUA: u32 = 1 << 3;
/// The device attributes: neither a volatile cache nor FUA (see `params_for`).
const WRITE_THROUGH_ATTRS: u32 = 0;
const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;

pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
/// In `op_flags`: zero by writing, not by releasing blocks.
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;

/// A fetch completed with a request to serve.
const UBLK_IO_RES_OK: i32 = 0;
/// The device is stopping: the tag is not armed again.
const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// Linux's ENOTSUPP (not in libc): old kernels answer it to unknown commands.
const ENOTSUPP: i32 = 524;

/// Writes each listed field of `$value` (a `$ty`) into `$bytes` at its
/// `offset_of!`, native-endian.
macro_rules! encode {
    ($bytes:ident, $value:expr, $ty:ty, [$($field:ident),* $(,)?]) => {
        $(
            let at = offset_of!($ty, $field);
            let field_bytes = $value.$field.to_ne_bytes();
            $bytes[at..at + field_bytes.len()].copy_from_slice(&field_bytes);
        )*
    };
}

/// Reads a `$ty` from `$bytes`, each listed field at its `offset_of!`. A
/// struct with fields left out (padding, reserved: left at their defaults)
/// says so with a trailing `..`; without it, a forgotten field does not compile.
macro_rules! decode {
    ($bytes:ident, $ty:ident { $($field:ident: $field_ty:ty),* , .. }) => {
        $ty { $($field: decode!(@field $bytes, $ty, $field, $field_ty),)* ..$ty::default() }
    };
    ($bytes:ident, $ty:ident { $($field:ident: $field_ty:ty),* $(,)? }) => {
        $ty { $($field: decode!(@field $bytes, $ty, $field, $field_ty),)* }
    };
    (@field $bytes:ident, $ty:ident, $field:ident, $field_ty:ty) => {
        <$field_ty>::from_ne_bytes(
            $bytes[offset_of!($ty, $field)..][..size_of::<$field_ty>()]
                .try_into()
                .expect("a field lies inside its struct"),
        )
    };
}

impl CtrlCmd {
    /// A command for device `dev_id`, not for a queue, with no buffer.
    #[must_use]
    pub fn new(dev_id: u32) -> Self {
        Self {
            dev_id,
            queue_id: u16::MAX,
            ..Self::default()
        }
    }

    #[must_use]
    pub fn to_bytes(&self) -> [u8; CTRL_CMD_BYTES] {
        let mut bytes = [0; CTRL_CMD_BYTES];
        encode!(bytes, self, Self, [dev_id, queue_id, len, addr, dev_path_len]);
        let data = offset_of!(Self, data);
        bytes[data..data + 8].copy_from_slice(&self.data[0].to_ne_bytes());
        bytes
    }

    #[must_use]
    pub fn from_bytes(bytes: &[u8; CTRL_CMD_BYTES]) -> Self {
        let mut cmd = decode!(
            bytes,
            CtrlCmd {
                dev_id: u32,
                queue_id: u16,
                len: u16,
                addr: u64,
                dev_path_len: u16,
                ..
            }
        );
        let data = offset_of!(Self, data);
        cmd.data[0] = u64::from_ne_bytes(bytes[data..data + 8].try_into().expect("data lies inside the command"));
        cmd
    }
}

impl DevInfo {
    #[must_use]
    pub fn to_bytes(&self) -> [u8; DEV_INFO_BYTES] {
        let mut bytes = [0; DEV_INFO_BYTES];
        encode!(
            bytes,
            self,
            Self,
            [
                nr_hw_queues,
                queue_depth,
                state,
                max_io_buf_bytes,
                dev_id,
                ublksrv_pid,
                flags,
                ublksrv_flags,
                owner_uid,
                owner_gid
            ]
        );
        bytes
    }

    #[must_use]
    pub fn from_bytes(bytes: &[u8; DEV_INFO_BYTES]) -> Self {
        decode!(
            bytes,
            DevInfo {
                nr_hw_queues: u16,
                queue_depth: u16,
                state: u16,
                max_io_buf_bytes: u32,
                dev_id: u32,
                ublksrv_pid: i32,
                flags: u64,
                ublksrv_flags: u64,
                owner_uid: u32,
                owner_gid: u32,
                ..
            }
        )
    }
}

impl IoDesc {
    #[must_use]
    pub fn to_bytes(&self) -> [u8; IO_DESC_BYTES] {
        let mut bytes = [0; IO_DESC_BYTES];
        encode!(bytes, self, Self, [op_flags, nr_sectors, start_sector, addr]);
        bytes
    }

    #[must_use]
    pub fn from_bytes(bytes: &[u8; IO_DESC_BYTES]) -> Self {
        decode!(
            bytes,
            IoDesc {
                op_flags: u32,
                nr_sectors: u32,
                start_sector: u64,
                addr: u64
            }
        )
    }
}

impl IoCmd {
    #[must_use]
    pub fn to_bytes(&self) -> [u8; IO_CMD_BYTES] {
        let mut bytes = [0; IO_CMD_BYTES];
        encode!(bytes, self, Self, [q_id, tag, result, addr]);
        bytes
    }

    #[must_use]
    pub fn from_bytes(bytes: &[u8; IO_CMD_BYTES]) -> Self {
        decode!(
            bytes,
            IoCmd {
                q_id: u16,
                tag: u16,
                result: i32,
                addr: u64
            }
        )
    }
}

impl Params {
    /// The bytes SET_PARAMS reads (`PARAMS_LEN` of them, padded to 8).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; size_of::<Params>()] {
        let mut bytes = [0; size_of::<Params>()];
        encode!(bytes, self, Self, [len, types]);
        let mut basic = [0; size_of::<ParamBasic>()];
        encode!(
            basic,
            self.basic,
            ParamBasic,
            [
                attrs,
                logical_bs_shift,
                physical_bs_shift,
                io_opt_shift,
                io_min_shift,
                max_sectors,
                chunk_sectors,
                dev_sectors,
                virt_boundary_mask,
            ]
        );
        let mut discard = [0; size_of::<ParamDiscard>()];
        encode!(
            discard,
            self.discard,
            ParamDiscard,
            [
                discard_alignment,
                discard_granularity,
                max_discard_sectors,
                max_write_zeroes_sectors,
                max_discard_segments
            ]
        );
        let basic_at = offset_of!(Self, basic);
        bytes[basic_at..basic_at + basic.len()].copy_from_slice(&basic);
        let discard_at = offset_of!(Self, discard);
        bytes[discard_at..discard_at + discard.len()].copy_from_slice(&discard);
        bytes
    }
}

/// Which command numbers the kernel takes. Kernels since 6.x accept the
/// ioctl-encoded ones (and without CONFIG_BLKDEV_UBLK_LEGACY_OPCODES only
/// those); the first kernels with ublk (6.0-6.2) know only the plain ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Opcodes {
    encoded: bool,
}

impl Opcodes {
    fn control(self, nr: u32) -> u32 {
        if self.encoded {
            ioc(IOC_READ_WRITE, nr, CTRL_CMD_SIZE)
        } else {
            nr
        }
    }

    fn io(self, nr: u32) -> u32 {
        if self.encoded {
            ioc(IOC_READ_WRITE, nr, IO_CMD_SIZE)
        } else {
            nr
        }
    }
}

/// The device ADD_DEV asks for; `dev_id` u32::MAX lets the kernel pick.
fn dev_info_wanted(pid: i32) -> DevInfo {
    DevInfo {
        nr_hw_queues: QUEUE_COUNT,
        queue_depth: QUEUE_DEPTH,
        max_io_buf_bytes: IO_BUFFER_BYTES,
        dev_id: u32::MAX,
        ublksrv_pid: pid,
        flags: UBLK_F_CMD_IOCTL_ENCODE
            | UBLK_F_URING_CMD_COMP_IN_TASK
            | UBLK_F_USER_RECOVERY
            | UBLK_F_USER_RECOVERY_REISSUE,
        ..DevInfo::default()
    }
}

fn sectors_u32(bytes: u64) -> u32 {
    u32::try_from(bytes / SECTOR_BYTES).unwrap_or(u32::MAX)
}

/// The parameters of a volume of `size_bytes` with `block_size_bytes`
/// logical blocks; `max_io_bytes` is what the kernel granted at ADD_DEV.
fn params_for(size_bytes: u64, block_size_bytes: u32, max_io_bytes: u32) -> Result<Params, String> {
    // ublk_drv takes logical blocks of 512 bytes to a page (4 KiB here).
    if !block_size_bytes.is_power_of_two() || !(512..=STORE_BLOCK_BYTES).contains(&block_size_bytes) {
        return Err(format!(
            "block size {block_size_bytes} is not usable with ublk (a power of two from 512 to 4096)"
        ));
    }
    let shift = |bytes: u32| u8::try_from(bytes.trailing_zeros()).expect("a u32's bit index fits in u8");
    Ok(Params {
        len: PARAMS_LEN_U32,
        types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
        basic: ParamBasic {
            // No volatile write cache: every acknowledged write is durable
            // on every in-sync replica, so the kernel completes a flush
            // at once (a flush covers completed writes only) and drops FUA,
            // as for an SSD with power-loss protection.
            attrs: WRITE_THROUGH_ATTRS,
            logical_bs_shift: shift(block_size_bytes),
            // Smaller writes are read-modify-write of a 4 KiB store block.
            physical_bs_shift: shift(STORE_BLOCK_BYTES),
            io_min_shift: shift(STORE_BLOCK_BYTES),
            io_opt_shift: shift(max_io_bytes.max(STORE_BLOCK_BYTES)),
            max_sectors: sectors_u32(u64::from(max_io_bytes)),
            chunk_sectors: 0,
            dev_sectors: size_bytes / SECTOR_BYTES,
            virt_boundary_mask: 0,
        },
        discard: ParamDiscard {
            discard_alignment: 0,
            discard_granularity: STORE_BLOCK_BYTES,
            max_discard_sectors: sectors_u32(DISCARD_BYTES_MAX),
            max_write_zeroes_sectors: sectors_u32(WRITE_ZEROES_BYTES_MAX),
            // ublk_drv refuses anything but single-segment discards.
            max_discard_segments: 1,
            reserved0: 0,
        },
    })
}

// ---------------------------------------------------------------------------
// Requests: one decoded descriptor against the volume, pure of the kernel.
// ---------------------------------------------------------------------------

/// A request the kernel handed over, decoded from its descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: u8,
    /// `op_flags` without the op (UBLK_IO_F_* bits).
    pub flags: u32,
    pub sector_count: u32,
    pub start_sector: u64,
}

impl Request {
    #[must_use]
    pub fn from_desc(desc: &IoDesc) -> Self {
        Self {
            op: u8::try_from(desc.op_flags & 0xff).expect("masked to 8 bits"),
            flags: desc.op_flags & !0xff,
            sector_count: desc.nr_sectors,
            start_sector: desc.start_sector,
        }
    }
}

/// What requests need of a volume (a trait so tests run on memory).
trait BlockTarget: Sync {
    fn target_name(&self) -> &str;
    fn serving(&self) -> bool;
    async fn read_into(&self, offset_bytes: u64, out: &mut [u8]) -> Result<(), VolumeIoError>;
    async fn write_bytes(&self, offset_bytes: u64, data: Vec<u8>) -> Result<(), VolumeIoError>;
    async fn flush_writes(&self) -> Result<(), VolumeIoError>;
    async fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeIoError>;
    async fn zero(&self, offset_bytes: u64, len_bytes: u64, allocate: bool) -> Result<(), VolumeIoError>;
}

use crate::metrics::Op;

impl BlockTarget for Volume {
    fn target_name(&self) -> &str {
        &self.name
    }

    fn serving(&self) -> bool {
        self.is_served()
    }

    async fn read_into(&self, offset_bytes: u64, out: &mut [u8]) -> Result<(), VolumeIoError> {
        let data = self
            .counted(Op::Read, out.len() as u64, self.read(offset_bytes, out.len() as u64))
            .await?;
        let mut filled = 0;
        for slice in data.slices() {
            out[filled..filled + slice.len()].copy_from_slice(slice);
            filled += slice.len();
        }
        assert_eq!(filled, out.len(), "a volume read answers every byte asked");
        Ok(())
    }

    async fn write_bytes(&self, offset_bytes: u64, data: Vec<u8>) -> Result<(), VolumeIoError> {
        let bytes = data.len() as u64;
        self.counted(Op::Write, bytes, self.write(offset_bytes, data)).await
    }

    async fn flush_writes(&self) -> Result<(), VolumeIoError> {
        self.counted(Op::Flush, 0, self.flush()).await
    }

    async fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeIoError> {
        self.counted(Op::Trim, len_bytes, self.trim(offset_bytes, len_bytes))
            .await
    }

    async fn zero(&self, offset_bytes: u64, len_bytes: u64, allocate: bool) -> Result<(), VolumeIoError> {
        self.counted(
            Op::WriteZeroes,
            len_bytes,
            self.write_zeroes(offset_bytes, len_bytes, allocate),
        )
        .await
    }
}

use super::fuse::errno;

/// Serves `request` with `buffer` (the tag's) as its data; answers the
/// COMMIT result: bytes done for reads and writes, 0 for the others, or
/// -errno.
async fn handle<T: BlockTarget>(target: &T, request: Request, buffer: &mut [u8]) -> i32 {
    // After a forced failover elsewhere, this host gets errors, not stale data.
    if !target.serving() {
        tracing::warn!(volume = %target.target_name(), "I/O on a ublk device of a volume this node no longer serves: refused");
        return -libc::EIO;
    }
    let len_bytes = u64::from(request.sector_count) * SECTOR_BYTES;
    let Some(offset_bytes) = request.start_sector.checked_mul(SECTOR_BYTES) else {
        return -libc::EINVAL;
    };
    let data_len = usize::try_from(len_bytes).unwrap_or(usize::MAX);
    let moves_data = matches!(request.op, UBLK_IO_OP_READ | UBLK_IO_OP_WRITE);
    // The kernel keeps requests within max_sectors, so this is its bug if hit.
    if moves_data && data_len > buffer.len() {
        tracing::warn!(volume = %target.target_name(), len_bytes, "ublk request larger than its buffer: refused");
        return -libc::EINVAL;
    }
    let done = match request.op {
        UBLK_IO_OP_READ => target.read_into(offset_bytes, &mut buffer[..data_len]).await,
        // Every acknowledged write is durable (and replicated): FUA is implicit.
        UBLK_IO_OP_WRITE => target.write_bytes(offset_bytes, buffer[..data_len].to_vec()).await,
        UBLK_IO_OP_FLUSH => target.flush_writes().await,
        UBLK_IO_OP_DISCARD => target.discard(offset_bytes, len_bytes).await,
        UBLK_IO_OP_WRITE_ZEROES => {
            let allocate = request.flags & UBLK_IO_F_NOUNMAP != 0;
            target.zero(offset_bytes, len_bytes, allocate).await
        }
        _ => return -libc::EOPNOTSUPP,
    };
    match done {
        // A read or write must answer all its bytes: the kernel requeues
        // the rest of a short write and fails a read that answers 0.
        Ok(()) if moves_data => i32::try_from(data_len).expect("bounded by the buffer size"),
        Ok(()) => 0,
        Err(error) => {
            tracing::warn!(volume = %target.target_name(), op = request.op, offset_bytes, len_bytes, %error, "ublk request failed");
            -errno(&error)
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel plumbing, as the safe calls this backend makes. The implementation
// needs `unsafe` (io_uring SQE submission, the descriptor mmap) and lives in
// kernel-iface; its contract is written on each method.
// ---------------------------------------------------------------------------

/// Opens ublk's character devices.
pub trait Kernel: Send + Sync {
    /// Opens /dev/ublk-control with an io_uring of 128-byte SQEs (ublk_drv
    /// refuses control commands from 64-byte SQEs with EINVAL).
    fn open_control(&self) -> io::Result<Box<dyn ControlRing>>;

    /// Opens /dev/ublkc`dev_id` for queue `q_id` (NotFound until it
    /// exists): an io_uring of at least `depth` entries, the descriptor
    /// array mmapped read-only (`kernel_iface::ublk`), and
    /// `depth` data buffers of `buffer_bytes`. Called on the thread that
    /// will submit the queue's commands.
    fn open_queue(&self, dev_id: u32, q_id: u16, depth: u16, buffer_bytes: usize) -> io::Result<Box<dyn QueueRing>>;

    /// Makes `thread`'s blocking `QueueRing::submit` return `Interrupted`
    /// (if it is in one, or as it enters it) so that it looks at its pause.
    fn interrupt(&self, thread: &std::thread::JoinHandle<()>);
}

/// The control device's ring.
pub trait ControlRing: Send {
    /// Runs one control command, blocking until its completion: `cmd` is a
    /// `ublksrv_ctrl_cmd` whose `addr` and `len` the implementation points
    /// at `buffer` (left 0 without one). Answers a completion result ≥ 0,
    /// or a negative one as `io::Error::from_raw_os_error(-result)`.
    fn command(&mut self, cmd_op: u32, cmd: [u8; CTRL_CMD_BYTES], buffer: Option<&mut [u8]>) -> io::Result<i32>;
}

/// One queue's ring, descriptors and buffers; used by one thread only.
pub trait QueueRing {
    /// Queues an I/O command for `tag`: `cmd` is a `ublksrv_io_cmd` whose
    /// `addr` the implementation sets to the tag's buffer; the completion
    /// carries `tag`.
    fn push(&mut self, cmd_op: u32, tag: u16, cmd: [u8; IO_CMD_BYTES]) -> io::Result<()>;

    /// Submits what was queued and, with `wait`, blocks until at least one
    /// completion; appends every completion as `(tag, result)`.
    fn submit(&mut self, wait: bool, completions: &mut Vec<(u16, i32)>) -> io::Result<()>;

    /// A copy of the descriptor the kernel wrote for `tag`.
    fn descriptor(&self, tag: u16) -> [u8; IO_DESC_BYTES];

    /// The tags' data buffers, in tag order.
    fn buffers(&mut self) -> std::slice::ChunksExactMut<'_, u8>;
}

/// Whether this host can make ublk devices (/dev/ublk-control exists).
#[must_use]
pub fn available() -> bool {
    Path::new(CONTROL_PATH).exists()
}

/// The kernel plumbing of this build.
fn system_kernel() -> Result<Arc<dyn Kernel>, String> {
    if !available() {
        return Err(format!(
            "ublk is not available on this host: {CONTROL_PATH} is missing (load ublk_drv: modprobe ublk_drv)"
        ));
    }
    Ok(Arc::new(SystemKernel))
}

/// The traits above over `kernel_iface::ublk` (the io_uring commands and
/// the descriptor mmap, whose `unsafe` lives there).
struct SystemKernel;

impl Kernel for SystemKernel {
    fn open_control(&self) -> io::Result<Box<dyn ControlRing>> {
        Ok(Box::new(kernel_iface::ublk::Control::open()?))
    }

    fn open_queue(&self, dev_id: u32, q_id: u16, depth: u16, buffer_bytes: usize) -> io::Result<Box<dyn QueueRing>> {
        Ok(Box::new(kernel_iface::ublk::Queue::open(
            dev_id,
            q_id,
            depth,
            buffer_bytes,
        )?))
    }

    fn interrupt(&self, thread: &std::thread::JoinHandle<()>) {
        use std::os::unix::thread::JoinHandleExt;
        // io_uring_enter waiting for completions returns EINTR on a signal
        // with a handler (installed without SA_RESTART). Never signal
        // without the handler: the default action ends the process.
        if kernel_iface::process::install_wake_handler().is_ok() {
            let _ = kernel_iface::process::wake_thread(thread.as_pthread_t());
        }
    }
}

impl ControlRing for kernel_iface::ublk::Control {
    fn command(&mut self, cmd_op: u32, cmd: [u8; CTRL_CMD_BYTES], buffer: Option<&mut [u8]>) -> io::Result<i32> {
        kernel_iface::ublk::Control::command(self, cmd_op, cmd, buffer)
    }
}

impl QueueRing for kernel_iface::ublk::Queue {
    fn push(&mut self, cmd_op: u32, tag: u16, cmd: [u8; IO_CMD_BYTES]) -> io::Result<()> {
        kernel_iface::ublk::Queue::push(self, cmd_op, tag, cmd)
    }

    fn submit(&mut self, wait: bool, completions: &mut Vec<(u16, i32)>) -> io::Result<()> {
        kernel_iface::ublk::Queue::submit(self, wait, completions)
    }

    fn descriptor(&self, tag: u16) -> [u8; IO_DESC_BYTES] {
        kernel_iface::ublk::Queue::descriptor(self, tag)
    }

    fn buffers(&mut self) -> std::slice::ChunksExactMut<'_, u8> {
        kernel_iface::ublk::Queue::buffers(self)
    }
}

fn os_error(what: &str, error: &io::Error) -> String {
    format!("ublk {what} failed: {error}")
}

/// Runs control command `nr` on device `dev_id`.
fn control(
    ring: &mut dyn ControlRing,
    opcodes: Opcodes,
    nr: u32,
    dev_id: u32,
    data: u64,
    buffer: Option<&mut [u8]>,
) -> io::Result<i32> {
    let mut cmd = CtrlCmd::new(dev_id);
    cmd.data[0] = data;
    ring.command(opcodes.control(nr), cmd.to_bytes(), buffer)
}

/// Runs control command `nr` (ADD_DEV or GET_DEV_INFO: its buffer is a
/// `ublksrv_ctrl_dev_info`, `info` on the way in) with the encoded command
/// number and then the legacy one; answers the device info the kernel
/// wrote and the numbers it takes (it tells by UBLK_F_CMD_IOCTL_ENCODE).
fn dev_info_command(
    ring: &mut dyn ControlRing,
    nr: u32,
    dev_id: u32,
    info: [u8; DEV_INFO_BYTES],
) -> io::Result<(DevInfo, Opcodes)> {
    let mut last_error = None;
    for opcodes in [Opcodes { encoded: true }, Opcodes { encoded: false }] {
        let mut buffer = info;
        match control(ring, opcodes, nr, dev_id, 0, Some(&mut buffer)) {
            Ok(_) => {
                let info = DevInfo::from_bytes(&buffer);
                let encoded = info.flags & UBLK_F_CMD_IOCTL_ENCODE != 0;
                return Ok((info, Opcodes { encoded }));
            }
            Err(error) if matches!(error.raw_os_error(), Some(libc::EOPNOTSUPP | ENOTSUPP)) => {
                last_error = Some(error);
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error.expect("both attempts failed"))
}

/// ADD_DEV; answers the device the kernel made and the numbers it takes.
fn add_device(ring: &mut dyn ControlRing, pid: i32) -> Result<(DevInfo, Opcodes), String> {
    dev_info_command(ring, CMD_ADD_DEV, u32::MAX, dev_info_wanted(pid).to_bytes())
        .map_err(|error| os_error("ADD_DEV", &error))
}

/// GET_DEV_INFO of `dev_id`; answers the device and the numbers it takes.
fn device_info(ring: &mut dyn ControlRing, dev_id: u32) -> Result<(DevInfo, Opcodes), String> {
    dev_info_command(ring, CMD_GET_DEV_INFO, dev_id, [0; DEV_INFO_BYTES])
        .map_err(|error| format!("ublk device {dev_id}: GET_DEV_INFO failed: {error}"))
}

/// The control device's ring, or why it cannot be opened.
fn open_control(kernel: &dyn Kernel) -> Result<Box<dyn ControlRing>, String> {
    kernel
        .open_control()
        .map_err(|e| format!("cannot open {CONTROL_PATH}: {e}"))
}

/// START_USER_RECOVERY, again while the kernel answers EBUSY (the previous
/// server's queue descriptors are not released yet), for at most
/// `RECOVERY_START_WAIT_MS`.
fn start_recovery(ring: &mut dyn ControlRing, opcodes: Opcodes, dev_id: u32) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_millis(RECOVERY_START_WAIT_MS);
    loop {
        match control(ring, opcodes, CMD_START_USER_RECOVERY, dev_id, 0, None) {
            Ok(_) => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
            }
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                return Err(format!(
                    "ublk device {dev_id}: START_USER_RECOVERY still busy after {RECOVERY_START_WAIT_MS} ms (its previous server's queues are still open)"
                ))
            }
            Err(error) => return Err(os_error("START_USER_RECOVERY", &error)),
        }
    }
}

/// Stops and deletes device `dev_id`, left by a server that is gone and
/// that no volume here will serve again: its waiting requests fail.
pub fn remove_left(dev_id: u32) -> Result<(), String> {
    let kernel = system_kernel()?;
    remove_left_with(kernel.as_ref(), dev_id)
}

fn remove_left_with(kernel: &dyn Kernel, dev_id: u32) -> Result<(), String> {
    let mut ring = open_control(kernel)?;
    let (_, opcodes) = device_info(ring.as_mut(), dev_id)?;
    control(ring.as_mut(), opcodes, CMD_STOP_DEV, dev_id, 0, None).map_err(|e| os_error("STOP_DEV", &e))?;
    control(ring.as_mut(), opcodes, CMD_DEL_DEV, dev_id, 0, None).map_err(|e| os_error("DEL_DEV", &e))?;
    Ok(())
}

/// Whether device `dev_id` exists, was made for user recovery and waits for
/// a server (its own is gone, or is this process before an upgrade): the
/// only devices a node starting after a crash takes back or removes.
pub fn left_waiting(dev_id: u32) -> Result<bool, String> {
    let kernel = system_kernel()?;
    let mut ring = open_control(kernel.as_ref())?;
    let info = match device_info(ring.as_mut(), dev_id) {
        Ok((info, _)) => info,
        Err(_) => return Ok(false), // gone (ENODEV): nothing to do
    };
    let ours = u32::try_from(info.ublksrv_pid)
        .is_ok_and(|pid| pid == std::process::id() || kernel_iface::process::send_signal(pid, 0).is_err());
    Ok(info.flags & UBLK_F_USER_RECOVERY != 0 && ours)
}

/// What a queue thread does when its device is handed over.
#[derive(Default)]
struct Pause {
    /// Set to stop reading requests; cleared to serve on.
    asked: std::sync::atomic::AtomicBool,
    state: parking_lot::Mutex<PauseState>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct PauseState {
    /// Queue threads parked.
    parked: usize,
    /// The device is handed over: parked threads end.
    released: bool,
}

impl Pause {
    fn asked(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits while paused; true when released (the thread ends and leaves
    /// its queue to the next program), false when resumed.
    fn park(&self) -> bool {
        let mut state = self.state.lock();
        state.parked += 1;
        self.changed.notify_all();
        while self.asked() && !state.released {
            self.changed.wait(&mut state);
        }
        state.parked -= 1;
        self.changed.notify_all();
        state.released
    }

    fn resume(&self) {
        let _state = self.state.lock();
        self.asked.store(false, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn release(&self) {
        self.state.lock().released = true;
        self.changed.notify_all();
    }
}

/// A recovered device's END_USER_RECOVERY, waiting for its volume.
struct RecoveryEnd {
    cancel: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// A volume served as /dev/ublkbN; stopped and deleted on drop.
pub struct UblkDevice {
    dev_id: u32,
    path: PathBuf,
    volume_name: String,
    opcodes: Opcodes,
    control: Box<dyn ControlRing>,
    kernel: Arc<dyn Kernel>,
    queues: Vec<std::thread::JoinHandle<()>>,
    pause: Arc<Pause>,
    /// The kernel granted UBLK_F_USER_RECOVERY: the device can be kept
    /// across an upgrade in place.
    recoverable: bool,
    /// Released to the next program: dropping leaves the device.
    released: bool,
    recovery_end: Option<RecoveryEnd>,
}

impl UblkDevice {
    /// Adds a ublk device for `volume`, starts it and serves its I/O:
    /// requests are handled on `runtime` (volume I/O is async).
    pub fn start(volume: Arc<Volume>, runtime: tokio::runtime::Handle) -> Result<Self, String> {
        let kernel = system_kernel()?;
        let size_bytes = volume.size_bytes();
        let block_size_bytes = volume.block_size_bytes;
        Self::start_with(&kernel, volume, size_bytes, block_size_bytes, runtime)
    }

    fn start_with<T: BlockTarget + Send + 'static>(
        kernel: &Arc<dyn Kernel>,
        target: Arc<T>,
        size_bytes: u64,
        block_size_bytes: u32,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        let name = target.target_name().to_owned();
        let mut ring = open_control(kernel.as_ref())?;
        let pid = i32::try_from(std::process::id()).expect("Linux pids fit in i32");
        let (info, opcodes) = add_device(ring.as_mut(), pid)?;
        // From here on, dropping `device` stops and deletes what was made.
        let mut device = Self::new(kernel, info.dev_id, name.clone(), opcodes, ring);
        device.recoverable = info.flags & UBLK_F_USER_RECOVERY != 0;
        if !device.recoverable {
            tracing::info!(volume = %name, device = %device.path.display(), "this kernel's ublk_drv has no user recovery: the device cannot be kept across an upgrade in place");
        }
        // The kernel rounds max_io_buf_bytes down to a page; use what it kept.
        let max_io_bytes = info.max_io_buf_bytes.min(IO_BUFFER_BYTES);
        let mut params = params_for(size_bytes, block_size_bytes, max_io_bytes)?.to_bytes();
        control(
            device.control.as_mut(),
            opcodes,
            CMD_SET_PARAMS,
            info.dev_id,
            0,
            Some(&mut params),
        )
        .map_err(|e| os_error("SET_PARAMS", &e))?;
        device.spawn_queues(kernel, &target, &info, max_io_bytes, &runtime)?;
        // START_DEV waits (interruptibly, with no time-out) until every tag
        // of every queue is fetched: only sent once the queues said so.
        control(
            device.control.as_mut(),
            opcodes,
            CMD_START_DEV,
            info.dev_id,
            u64::from(pid.unsigned_abs()),
            None,
        )
        .map_err(|e| os_error("START_DEV", &e))?;
        tracing::info!(volume = %name, device = %device.path.display(), queues = info.nr_hw_queues, depth = info.queue_depth, "ublk device started");
        Ok(device)
    }

    fn new(
        kernel: &Arc<dyn Kernel>,
        dev_id: u32,
        volume_name: String,
        opcodes: Opcodes,
        control: Box<dyn ControlRing>,
    ) -> Self {
        Self {
            dev_id,
            path: PathBuf::from(format!("/dev/ublkb{dev_id}")),
            volume_name,
            opcodes,
            control,
            kernel: Arc::clone(kernel),
            queues: Vec::new(),
            pause: Arc::new(Pause::default()),
            recoverable: false,
            released: false,
            recovery_end: None,
        }
    }

    /// Takes over device `dev_id`, which serves `volume` and whose previous
    /// server (the old binary of this process, or a node that crashed) is
    /// gone: user recovery, its queues fetched here, then, on a thread, once
    /// the volume is served (at the latest at `serving_deadline`, after
    /// which its I/O fails), END_USER_RECOVERY lets the waiting requests in.
    /// On failure the device is left as it was (quiesced) for the caller to
    /// retry, hand back, or remove (`remove_left`).
    pub fn recover(
        volume: Arc<Volume>,
        dev_id: u32,
        runtime: tokio::runtime::Handle,
        serving_deadline: Instant,
    ) -> Result<Self, String> {
        let kernel = system_kernel()?;
        Self::recover_with(&kernel, volume, dev_id, runtime, serving_deadline)
    }

    fn recover_with<T: BlockTarget + Send + 'static>(
        kernel: &Arc<dyn Kernel>,
        target: Arc<T>,
        dev_id: u32,
        runtime: tokio::runtime::Handle,
        serving_deadline: Instant,
    ) -> Result<Self, String> {
        let name = target.target_name().to_owned();
        let mut ring = open_control(kernel.as_ref())?;
        let (info, opcodes) = device_info(ring.as_mut(), dev_id)?;
        if info.flags & UBLK_F_USER_RECOVERY == 0 {
            return Err(format!(
                "ublk device {dev_id} was made without user recovery: it cannot be taken over"
            ));
        }
        start_recovery(ring.as_mut(), opcodes, dev_id)?;
        let mut device = Self::new(kernel, dev_id, name.clone(), opcodes, ring);
        device.recoverable = true;
        // Requests as large as the device was made for (max_sectors).
        if let Err(error) = device.spawn_queues(kernel, &target, &info, info.max_io_buf_bytes, &runtime) {
            device.release_queues();
            return Err(error);
        }
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kernel, ending) = (Arc::clone(kernel), Arc::clone(&cancel));
        let thread = std::thread::Builder::new()
            .name(format!("ublk{dev_id}end"))
            .spawn(move || {
                end_recovery_when_served(
                    kernel.as_ref(),
                    target.as_ref(),
                    opcodes,
                    dev_id,
                    serving_deadline,
                    &ending,
                )
            })
            .map_err(|e| {
                device.release_queues();
                format!("cannot start a thread: {e}")
            })?;
        device.recovery_end = Some(RecoveryEnd { cancel, thread });
        tracing::info!(volume = %name, device = %device.path.display(), "ublk device taken over: its requests wait until the volume is served here");
        Ok(device)
    }

    /// The kernel's number of this device.
    #[must_use]
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Whether the device can be kept across an upgrade in place.
    #[must_use]
    pub fn recoverable(&self) -> bool {
        self.recoverable
    }

    /// Stops reading requests: each queue thread submits the answers of
    /// the batch it served and parks. Requests the kernel hands over
    /// meanwhile wait: served after `resume`, issued again to the next
    /// program after `release`. On failure (a thread still serving at
    /// `deadline`) the device serves on.
    pub fn pause(&self, deadline: Instant) -> Result<(), String> {
        self.pause.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        let parked = self.wait_for_queues(deadline, true, |running| self.pause.state.lock().parked >= running);
        if parked {
            return Ok(());
        }
        self.resume();
        Err(format!(
            "the queues of {} ({}) did not stop serving in time",
            self.path.display(),
            self.volume_name
        ))
    }

    /// Polls until `done(number of queue threads still running)` or
    /// `deadline` (false then), interrupting the running ones each turn
    /// when `wake` (see `Kernel::interrupt`).
    fn wait_for_queues(&self, deadline: Instant, wake: bool, done: impl Fn(usize) -> bool) -> bool {
        loop {
            let running: Vec<&std::thread::JoinHandle<()>> =
                self.queues.iter().filter(|queue| !queue.is_finished()).collect();
            if done(running.len()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if wake {
                for queue in running {
                    self.kernel.interrupt(queue);
                }
            }
            std::thread::sleep(Duration::from_millis(if wake {
                WAKE_INTERVAL_MS
            } else {
                POLL_INTERVAL_MS
            }));
        }
    }

    /// Serves on after `pause`.
    pub fn resume(&self) {
        self.pause.resume();
    }

    /// Ends the paused queue threads without stopping the device: the
    /// kernel quiesces it and keeps its requests for the next program,
    /// which `recover`s it. Answers the device's number.
    #[must_use]
    pub fn release(mut self) -> u32 {
        self.release_queues();
        self.dev_id
    }

    /// Ends the queue threads (and a waiting END_USER_RECOVERY) and leaves
    /// the device to whoever recovers it next.
    fn release_queues(&mut self) {
        self.cancel_recovery_end();
        self.pause.asked.store(true, std::sync::atomic::Ordering::SeqCst);
        self.pause.release();
        // Parked ones end at once; one waiting in the kernel needs waking.
        let deadline = Instant::now() + Duration::from_millis(QUEUE_EXIT_TIMEOUT_MS);
        if !self.wait_for_queues(deadline, true, |running| running == 0) {
            tracing::warn!(device = %self.path.display(), "ublk queue threads did not end when released");
        }
        for queue in std::mem::take(&mut self.queues) {
            if queue.is_finished() && queue.join().is_err() {
                tracing::warn!(device = %self.path.display(), "a ublk queue thread panicked");
            }
        }
        self.released = true;
    }

    fn cancel_recovery_end(&mut self) {
        if let Some(end) = self.recovery_end.take() {
            end.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = end.thread.join();
        }
    }

    /// Starts the queue threads; answers once each has fetched every tag.
    fn spawn_queues<T: BlockTarget + Send + 'static>(
        &mut self,
        kernel: &Arc<dyn Kernel>,
        target: &Arc<T>,
        info: &DevInfo,
        max_io_bytes: u32,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), String> {
        let (ready_sender, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        for q_id in 0..info.nr_hw_queues {
            let queue = QueueSetup {
                dev_id: info.dev_id,
                q_id,
                depth: info.queue_depth,
                buffer_bytes: usize::try_from(max_io_bytes).expect("u32 fits in usize"),
                opcodes: self.opcodes,
            };
            let (kernel, target, runtime) = (Arc::clone(kernel), Arc::clone(target), runtime.clone());
            let (ready_sender, pause) = (ready_sender.clone(), Arc::clone(&self.pause));
            let handle = std::thread::Builder::new()
                .name(format!("ublk{}q{q_id}", info.dev_id))
                .spawn(move || {
                    run_queue(
                        &queue,
                        kernel.as_ref(),
                        target.as_ref(),
                        &runtime,
                        &ready_sender,
                        &pause,
                    )
                })
                .map_err(|e| format!("cannot start a ublk queue thread: {e}"))?;
            self.queues.push(handle);
        }
        let deadline = Instant::now() + Duration::from_millis(QUEUE_READY_TIMEOUT_MS);
        for _ in 0..info.nr_hw_queues {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    return Err(format!(
                        "ublk device {}: its queues were not ready within {QUEUE_READY_TIMEOUT_MS} ms",
                        self.dev_id
                    ))
                }
            }
        }
        Ok(())
    }

    /// The block device, e.g. /dev/ublkb0.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (bounded) for the queue threads; false if one is still running.
    fn join_queues(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_millis(QUEUE_EXIT_TIMEOUT_MS);
        if !self.wait_for_queues(deadline, false, |running| running == 0) {
            return false;
        }
        for queue in self.queues.drain(..) {
            if queue.join().is_err() {
                tracing::warn!(device = %self.path.display(), "a ublk queue thread panicked");
            }
        }
        true
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.cancel_recovery_end();
        self.pause.resume();
        let (opcodes, dev_id) = (self.opcodes, self.dev_id);
        // STOP_DEV removes the disk (waiting for requests in flight, which
        // the queue threads still serve), then completes every fetched tag
        // with ABORT, which ends the queue threads.
        if let Err(error) = control(self.control.as_mut(), opcodes, CMD_STOP_DEV, dev_id, 0, None) {
            tracing::warn!(volume = %self.volume_name, device = %self.path.display(), %error, "ublk STOP_DEV failed; the device is left");
            return;
        }
        // DEL_DEV waits until the device is released, which needs the queue
        // threads' /dev/ublkcN closed: never sent while one still runs.
        if !self.join_queues() {
            tracing::warn!(volume = %self.volume_name, device = %self.path.display(), "ublk queue threads did not end after STOP_DEV; the device is left");
            return;
        }
        match control(self.control.as_mut(), opcodes, CMD_DEL_DEV, dev_id, 0, None) {
            Ok(_) => tracing::info!(volume = %self.volume_name, device = %self.path.display(), "ublk device deleted"),
            Err(error) => {
                tracing::warn!(volume = %self.volume_name, device = %self.path.display(), %error, "ublk DEL_DEV failed")
            }
        }
    }
}

struct QueueSetup {
    dev_id: u32,
    q_id: u16,
    depth: u16,
    buffer_bytes: usize,
    opcodes: Opcodes,
}

/// A queue thread: opens the queue, fetches every tag, says so on `ready`,
/// then serves until the device stops.
fn run_queue<T: BlockTarget>(
    queue: &QueueSetup,
    kernel: &dyn Kernel,
    target: &T,
    runtime: &tokio::runtime::Handle,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
    pause: &Pause,
) {
    let mut ring = match open_queue_waiting(kernel, queue) {
        Ok(ring) => ring,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let fetched = fetch_all(ring.as_mut(), queue);
    let failed = fetched.is_err();
    let _ = ready.send(fetched);
    if failed {
        return;
    }
    match serve(ring.as_mut(), queue, target, runtime, pause) {
        Ok(Ended::Stopped) => {}
        Ok(Ended::Released) => {
            tracing::info!(volume = %target.target_name(), dev_id = queue.dev_id, q_id = queue.q_id, "ublk queue released for the next program");
        }
        Err(error) => {
            tracing::warn!(volume = %target.target_name(), dev_id = queue.dev_id, q_id = queue.q_id, %error, "ublk queue stopped on an error");
        }
    }
}

/// Waits (polling) until `target` is served, `deadline` passes or
/// `cancel` is set; then, unless cancelled, sends END_USER_RECOVERY.
fn end_recovery_when_served<T: BlockTarget>(
    kernel: &dyn Kernel,
    target: &T,
    opcodes: Opcodes,
    dev_id: u32,
    deadline: Instant,
    cancel: &std::sync::atomic::AtomicBool,
) {
    let cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
    while !target.serving() && Instant::now() < deadline && !cancelled() {
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
    if cancelled() {
        return;
    }
    if !target.serving() {
        tracing::warn!(volume = %target.target_name(), dev_id, "the volume of a ublk device taken over is not served here in time: its requests fail");
    }
    let pid = u64::from(std::process::id());
    let ended = kernel
        .open_control()
        .and_then(|mut ring| control(ring.as_mut(), opcodes, CMD_END_USER_RECOVERY, dev_id, pid, None));
    match ended {
        Ok(_) => {
            tracing::info!(volume = %target.target_name(), dev_id, "ublk device recovered: its waiting requests go on")
        }
        Err(error) => {
            tracing::warn!(volume = %target.target_name(), dev_id, %error, "ublk END_USER_RECOVERY failed: the device's requests wait")
        }
    }
}

/// How a queue thread's serving ended.
enum Ended {
    /// The device stopped (every tag aborted).
    Stopped,
    /// Handed over: the queue is left to the next program.
    Released,
}

/// /dev/ublkcN appears (devtmpfs, udev) a moment after ADD_DEV.
fn open_queue_waiting(kernel: &dyn Kernel, queue: &QueueSetup) -> Result<Box<dyn QueueRing>, String> {
    let deadline = Instant::now() + Duration::from_millis(CHAR_DEVICE_WAIT_MS);
    loop {
        match kernel.open_queue(queue.dev_id, queue.q_id, queue.depth, queue.buffer_bytes) {
            Ok(ring) => return Ok(ring),
            Err(error) if error.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
            }
            Err(error) => {
                return Err(format!(
                    "cannot open /dev/ublkc{} queue {}: {error}",
                    queue.dev_id, queue.q_id
                ))
            }
        }
    }
}

/// FETCH_REQ for every tag. The kernel binds the queue to the thread that
/// fetched it and refuses commands from any other, so the same thread
/// serves it afterwards.
fn fetch_all(ring: &mut dyn QueueRing, queue: &QueueSetup) -> Result<(), String> {
    for tag in 0..queue.depth {
        let cmd = IoCmd {
            q_id: queue.q_id,
            tag,
            ..IoCmd::default()
        };
        ring.push(queue.opcodes.io(IO_FETCH_REQ), tag, cmd.to_bytes())
            .map_err(|e| os_error("FETCH_REQ", &e))?;
    }
    let mut completions = Vec::new();
    ring.submit(false, &mut completions)
        .map_err(|e| os_error("FETCH_REQ", &e))?;
    // A refused fetch completes at once; an accepted one only with a request.
    if let Some((tag, result)) = completions.iter().find(|(_, result)| *result < 0) {
        return Err(format!(
            "ublk FETCH_REQ of tag {tag} failed: {}",
            io::Error::from_raw_os_error(-result)
        ));
    }
    assert!(completions.is_empty(), "no request before START_DEV");
    Ok(())
}

/// Serves requests until every tag is aborted (the device stopped) or
/// the device is released while paused.
fn serve<T: BlockTarget>(
    ring: &mut dyn QueueRing,
    queue: &QueueSetup,
    target: &T,
    runtime: &tokio::runtime::Handle,
    pause: &Pause,
) -> io::Result<Ended> {
    let depth = usize::from(queue.depth);
    let mut armed = depth;
    let mut completions = Vec::with_capacity(depth);
    let mut requests: Vec<Option<Request>> = vec![None; depth];
    while armed > 0 {
        completions.clear();
        // Paused: the last batch's answers go in without waiting for more.
        let pausing = pause.asked();
        match ring.submit(!pausing, &mut completions) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for &(tag, result) in &completions {
            assert!(tag < queue.depth, "completion of an unknown tag {tag}");
            armed -= 1;
            match result {
                UBLK_IO_RES_OK => {
                    let desc = IoDesc::from_bytes(&ring.descriptor(tag));
                    requests[usize::from(tag)] = Some(Request::from_desc(&desc));
                }
                UBLK_IO_RES_ABORT => {}
                _ => {
                    tracing::warn!(volume = %target.target_name(), tag, result, "ublk I/O command failed; its tag is dropped")
                }
            }
        }
        // Requests read now stay with their tags: served below once
        // resumed; after a release the kernel issues them again to the
        // next program (UBLK_F_USER_RECOVERY_REISSUE).
        if pausing && pause.park() {
            return Ok(Ended::Released);
        }
        // The batch runs concurrently; requests arriving meanwhile wait for
        // the next turn (the kernel copies their data on this thread only).
        let work = ring
            .buffers()
            .zip(requests.iter_mut())
            .enumerate()
            .filter_map(|(tag, (buffer, slot))| {
                let request = slot.take()?;
                Some(async move { (tag, handle(target, request, buffer).await) })
            });
        let answers = runtime.block_on(futures::future::join_all(work));
        for (tag, result) in answers {
            let tag = u16::try_from(tag).expect("tags are below the u16 depth");
            let cmd = IoCmd {
                q_id: queue.q_id,
                tag,
                result,
                addr: 0,
            };
            ring.push(queue.opcodes.io(IO_COMMIT_AND_FETCH_REQ), tag, cmd.to_bytes())?;
            armed += 1;
        }
    }
    Ok(Ended::Stopped)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use parking_lot::{Condvar, Mutex};

    use super::*;

    #[test]
    fn struct_layouts_match_the_uapi() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(offset_of!(CtrlCmd, dev_id), 0);
        assert_eq!(offset_of!(CtrlCmd, queue_id), 4);
        assert_eq!(offset_of!(CtrlCmd, len), 6);
        assert_eq!(offset_of!(CtrlCmd, addr), 8);
        assert_eq!(offset_of!(CtrlCmd, data), 16);
        assert_eq!(offset_of!(CtrlCmd, dev_path_len), 24);
        assert_eq!(offset_of!(CtrlCmd, pad), 26);
        assert_eq!(offset_of!(CtrlCmd, reserved), 28);

        assert_eq!(size_of::<DevInfo>(), 64);
        let dev_info = [
            (offset_of!(DevInfo, nr_hw_queues), 0),
            (offset_of!(DevInfo, queue_depth), 2),
            (offset_of!(DevInfo, state), 4),
            (offset_of!(DevInfo, pad0), 6),
            (offset_of!(DevInfo, max_io_buf_bytes), 8),
            (offset_of!(DevInfo, dev_id), 12),
            (offset_of!(DevInfo, ublksrv_pid), 16),
            (offset_of!(DevInfo, pad1), 20),
            (offset_of!(DevInfo, flags), 24),
            (offset_of!(DevInfo, ublksrv_flags), 32),
            (offset_of!(DevInfo, owner_uid), 40),
            (offset_of!(DevInfo, owner_gid), 44),
            (offset_of!(DevInfo, reserved1), 48),
            (offset_of!(DevInfo, reserved2), 56),
        ];
        for (actual, expected) in dev_info {
            assert_eq!(actual, expected);
        }

        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(offset_of!(IoDesc, op_flags), 0);
        assert_eq!(offset_of!(IoDesc, nr_sectors), 4);
        assert_eq!(offset_of!(IoDesc, start_sector), 8);
        assert_eq!(offset_of!(IoDesc, addr), 16);

        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(offset_of!(IoCmd, q_id), 0);
        assert_eq!(offset_of!(IoCmd, tag), 2);
        assert_eq!(offset_of!(IoCmd, result), 4);
        assert_eq!(offset_of!(IoCmd, addr), 8);

        assert_eq!(size_of::<ParamBasic>(), 32);
        let basic = [
            (offset_of!(ParamBasic, attrs), 0),
            (offset_of!(ParamBasic, logical_bs_shift), 4),
            (offset_of!(ParamBasic, physical_bs_shift), 5),
            (offset_of!(ParamBasic, io_opt_shift), 6),
            (offset_of!(ParamBasic, io_min_shift), 7),
            (offset_of!(ParamBasic, max_sectors), 8),
            (offset_of!(ParamBasic, chunk_sectors), 12),
            (offset_of!(ParamBasic, dev_sectors), 16),
            (offset_of!(ParamBasic, virt_boundary_mask), 24),
        ];
        for (actual, expected) in basic {
            assert_eq!(actual, expected);
        }

        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(offset_of!(ParamDiscard, discard_alignment), 0);
        assert_eq!(offset_of!(ParamDiscard, discard_granularity), 4);
        assert_eq!(offset_of!(ParamDiscard, max_discard_sectors), 8);
        assert_eq!(offset_of!(ParamDiscard, max_write_zeroes_sectors), 12);
        assert_eq!(offset_of!(ParamDiscard, max_discard_segments), 16);
        assert_eq!(offset_of!(ParamDiscard, reserved0), 18);

        // struct ublk_params: len, types, then basic at 8 and discard at 40.
        assert_eq!(offset_of!(Params, len), 0);
        assert_eq!(offset_of!(Params, types), 4);
        assert_eq!(offset_of!(Params, basic), 8);
        assert_eq!(offset_of!(Params, discard), 40);
        assert_eq!(PARAMS_LEN, 60);
    }

    #[test]
    fn command_numbers_are_the_kernels() {
        // _IOWR('u', nr, 32-byte ublksrv_ctrl_cmd) = 3 << 30 | 32 << 16 | 0x75 << 8 | nr.
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xC020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xC020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xC020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xC020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xC020_7508);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0xC020_7502);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xC020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xC020_7511);
        // _IOWR('u', nr, 16-byte ublksrv_io_cmd).
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xC010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xC010_7521);
        let encoded = Opcodes { encoded: true };
        let legacy = Opcodes { encoded: false };
        assert_eq!(encoded.control(CMD_STOP_DEV), UBLK_U_CMD_STOP_DEV);
        assert_eq!(legacy.control(CMD_STOP_DEV), 0x07);
        assert_eq!(encoded.io(IO_COMMIT_AND_FETCH_REQ), UBLK_U_IO_COMMIT_AND_FETCH_REQ);
        assert_eq!(legacy.io(IO_FETCH_REQ), 0x20);
        assert_eq!(UBLK_IO_RES_ABORT, -19);
    }

    #[test]
    fn encodings_round_trip() {
        let cmd = CtrlCmd {
            dev_id: 3,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            dev_path_len: 9,
            pad: 0,
            reserved: 0,
        };
        assert_eq!(CtrlCmd::from_bytes(&cmd.to_bytes()), cmd);
        assert_eq!(&cmd.to_bytes()[4..6], &u16::MAX.to_ne_bytes());
        let info = DevInfo {
            flags: UBLK_F_CMD_IOCTL_ENCODE,
            owner_gid: 5,
            ..dev_info_wanted(1234)
        };
        assert_eq!(DevInfo::from_bytes(&info.to_bytes()), info);
        let desc = IoDesc {
            op_flags: u32::from(UBLK_IO_OP_WRITE_ZEROES) | UBLK_IO_F_NOUNMAP,
            nr_sectors: 8,
            start_sector: 1 << 40,
            addr: 77,
        };
        assert_eq!(IoDesc::from_bytes(&desc.to_bytes()), desc);
        let io = IoCmd {
            q_id: 1,
            tag: 63,
            result: -5,
            addr: 9,
        };
        assert_eq!(IoCmd::from_bytes(&io.to_bytes()), io);
        let request = Request::from_desc(&desc);
        assert_eq!(request.op, UBLK_IO_OP_WRITE_ZEROES);
        assert_eq!(request.flags, UBLK_IO_F_NOUNMAP);
    }

    #[test]
    fn params_describe_the_volume() {
        let params = params_for(10 << 30, 4096, IO_BUFFER_BYTES).unwrap();
        assert_eq!(params.len, 60);
        assert_eq!(params.types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(params.basic.logical_bs_shift, 12);
        assert_eq!(params.basic.physical_bs_shift, 12);
        assert_eq!(params.basic.io_opt_shift, 19);
        assert_eq!(params.basic.max_sectors, 1024);
        assert_eq!(params.basic.dev_sectors, 10 << 21);
        assert_eq!(
            params.basic.attrs & (UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA),
            0,
            "write-through: the kernel sends no flushes"
        );
        assert_eq!(params.discard.max_discard_segments, 1);
        assert_eq!(params.discard.discard_granularity, 4096);
        let bytes = params.to_bytes();
        assert_eq!(&bytes[0..4], &60u32.to_ne_bytes());
        assert_eq!(bytes[8 + 4], 12);
        assert_eq!(&bytes[8 + 16..8 + 24], &(10u64 << 21).to_ne_bytes());
        assert_eq!(&bytes[40 + 16..40 + 18], &1u16.to_ne_bytes());
        assert_eq!(
            params_for(1 << 20, 512, IO_BUFFER_BYTES)
                .unwrap()
                .basic
                .logical_bs_shift,
            9
        );
        assert!(params_for(1 << 20, 8192, IO_BUFFER_BYTES).unwrap_err().contains("8192"));
        assert!(params_for(1 << 20, 1000, IO_BUFFER_BYTES).is_err());
    }

    /// A volume in memory.
    struct MemoryTarget {
        bytes: Mutex<Vec<u8>>,
        served: std::sync::atomic::AtomicBool,
        /// How often `serving` was asked.
        serving_asked: std::sync::atomic::AtomicUsize,
        flushes: Mutex<u32>,
        zeroed: Mutex<Vec<(u64, u64, bool)>>,
    }

    impl MemoryTarget {
        fn new(size_bytes: usize) -> Self {
            Self {
                bytes: Mutex::new(vec![0; size_bytes]),
                served: std::sync::atomic::AtomicBool::new(true),
                serving_asked: std::sync::atomic::AtomicUsize::new(0),
                flushes: Mutex::new(0),
                zeroed: Mutex::new(Vec::new()),
            }
        }

        fn range(&self, offset_bytes: u64, len_bytes: u64) -> Result<std::ops::Range<usize>, VolumeIoError> {
            let size_bytes = self.bytes.lock().len() as u64;
            if offset_bytes + len_bytes > size_bytes {
                return Err(VolumeIoError::OutOfRange {
                    volume: "memory".into(),
                    offset_bytes,
                    len_bytes,
                    size_bytes,
                });
            }
            Ok(usize::try_from(offset_bytes).unwrap()..usize::try_from(offset_bytes + len_bytes).unwrap())
        }
    }

    impl BlockTarget for MemoryTarget {
        fn target_name(&self) -> &str {
            "memory"
        }

        fn serving(&self) -> bool {
            self.serving_asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.served.load(std::sync::atomic::Ordering::SeqCst)
        }

        async fn read_into(&self, offset_bytes: u64, out: &mut [u8]) -> Result<(), VolumeIoError> {
            let range = self.range(offset_bytes, out.len() as u64)?;
            out.copy_from_slice(&self.bytes.lock()[range]);
            Ok(())
        }

        async fn write_bytes(&self, offset_bytes: u64, data: Vec<u8>) -> Result<(), VolumeIoError> {
            let range = self.range(offset_bytes, data.len() as u64)?;
            self.bytes.lock()[range].copy_from_slice(&data);
            Ok(())
        }

        async fn flush_writes(&self) -> Result<(), VolumeIoError> {
            *self.flushes.lock() += 1;
            Ok(())
        }

        async fn discard(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeIoError> {
            self.zero(offset_bytes, len_bytes, false).await
        }

        async fn zero(&self, offset_bytes: u64, len_bytes: u64, allocate: bool) -> Result<(), VolumeIoError> {
            let range = self.range(offset_bytes, len_bytes)?;
            self.bytes.lock()[range].fill(0);
            self.zeroed.lock().push((offset_bytes, len_bytes, allocate));
            Ok(())
        }
    }

    fn request(op: u8, start_sector: u64, sector_count: u32) -> Request {
        Request {
            op,
            flags: 0,
            sector_count,
            start_sector,
        }
    }

    fn run<T: BlockTarget>(target: &T, request: Request, buffer: &mut [u8]) -> i32 {
        futures::executor::block_on(handle(target, request, buffer))
    }

    #[test]
    fn requests_reach_the_volume() {
        let target = MemoryTarget::new(1 << 20);
        let mut buffer = vec![0u8; 64 * 1024];
        buffer[..8192].fill(0xab);
        assert_eq!(run(&target, request(UBLK_IO_OP_WRITE, 8, 16), &mut buffer), 8192);
        assert!(target.bytes.lock()[4096..12288].iter().all(|&b| b == 0xab));
        buffer.fill(0);
        assert_eq!(run(&target, request(UBLK_IO_OP_READ, 0, 32), &mut buffer), 16384);
        assert!(buffer[..4096].iter().all(|&b| b == 0));
        assert!(buffer[4096..12288].iter().all(|&b| b == 0xab));
        assert_eq!(run(&target, request(UBLK_IO_OP_FLUSH, 0, 0), &mut buffer), 0);
        assert_eq!(*target.flushes.lock(), 1);
        assert_eq!(run(&target, request(UBLK_IO_OP_DISCARD, 8, 8), &mut buffer), 0);
        assert!(target.bytes.lock()[4096..8192].iter().all(|&b| b == 0));
        let mut zeroes = request(UBLK_IO_OP_WRITE_ZEROES, 16, 8);
        assert_eq!(run(&target, zeroes, &mut buffer), 0);
        zeroes.flags = UBLK_IO_F_NOUNMAP;
        assert_eq!(run(&target, zeroes, &mut buffer), 0);
        let zeroed = target.zeroed.lock().clone();
        assert_eq!(zeroed, [(4096, 4096, false), (8192, 4096, false), (8192, 4096, true)]);
        assert!(target.bytes.lock().iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_requests_answer_errors() {
        let target = MemoryTarget::new(1 << 20);
        let mut buffer = vec![0u8; 64 * 1024];
        assert_eq!(run(&target, request(4, 0, 8), &mut buffer), -libc::EOPNOTSUPP);
        assert_eq!(
            run(&target, request(UBLK_IO_OP_READ, 2048, 8), &mut buffer),
            -libc::EINVAL
        );
        assert_eq!(
            run(&target, request(UBLK_IO_OP_WRITE, 2047, 16), &mut buffer),
            -libc::EINVAL
        );
        assert_eq!(
            run(&target, request(UBLK_IO_OP_READ, 0, 256), &mut buffer),
            -libc::EINVAL
        );
        assert_eq!(
            run(&target, request(UBLK_IO_OP_READ, u64::MAX, 8), &mut buffer),
            -libc::EINVAL
        );
        target.served.store(false, std::sync::atomic::Ordering::SeqCst);
        for op in [UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH] {
            assert_eq!(run(&target, request(op, 0, 8), &mut buffer), -libc::EIO);
        }
    }

    #[test]
    fn volume_errors_map_to_errnos() {
        let out_of_range = VolumeIoError::OutOfRange {
            volume: "v".into(),
            offset_bytes: 0,
            len_bytes: 1,
            size_bytes: 0,
        };
        assert_eq!(errno(&out_of_range), libc::EINVAL);
        assert_eq!(errno(&VolumeIoError::Locked { volume: "v".into() }), libc::EACCES);
        assert_eq!(errno(&VolumeIoError::Stopped), libc::EIO);
    }

    #[test]
    fn missing_control_device_is_named() {
        assert!(!available(), "this test host has no ublk_drv");
        let error = system_kernel().err().expect("no kernel plumbing without ublk_drv");
        assert!(error.contains("/dev/ublk-control"), "{error}");
        assert!(error.contains("modprobe ublk_drv"), "{error}");
    }

    /// ublk_drv's side of the protocol, as far as the sequence goes,
    /// with user recovery: when the queue closes while the device is not
    /// stopped, it is quiesced and requests handed to the old server but
    /// not answered are issued again (REISSUE).
    #[derive(Default)]
    struct FakeState {
        control_ops: Vec<u32>,
        params: Vec<u8>,
        fetched: Vec<bool>,
        queue_open: bool,
        stopped: bool,
        /// The server is gone and none has ended recovery: nothing is dispatched.
        quiesced: bool,
        /// The flags the device was made with (ADD_DEV's answer).
        flags: u64,
        /// START_USER_RECOVERY answers EBUSY this many more times.
        busy_starts: u32,
        /// END_USER_RECOVERY's pid.
        ended_by: Option<u64>,
        /// Requests waiting for a fetched tag: descriptor and data for writes.
        incoming: VecDeque<(IoDesc, Vec<u8>)>,
        /// Requests handed to a tag, not yet reaped by the server.
        dispatched: VecDeque<(u16, IoDesc, Vec<u8>)>,
        /// Requests reaped by the server and not answered, by tag.
        reaped: Vec<Option<(IoDesc, Vec<u8>)>>,
        /// (tag, result, buffer contents) of each commit.
        commits: Vec<(u16, i32, Vec<u8>)>,
        /// The server's queue thread was interrupted (`Kernel::interrupt`).
        interrupted: bool,
    }

    impl FakeState {
        /// Hands waiting requests to fetched tags while a server serves.
        fn dispatch(&mut self) {
            while !self.quiesced && !self.stopped && !self.incoming.is_empty() {
                let Some(tag) = self.fetched.iter().position(|&fetched| fetched) else {
                    return;
                };
                let (desc, data) = self.incoming.pop_front().unwrap();
                self.fetched[tag] = false;
                self.dispatched.push_back((u16::try_from(tag).unwrap(), desc, data));
            }
        }
    }

    #[derive(Default)]
    struct FakeKernel {
        state: Mutex<FakeState>,
        changed: Condvar,
        legacy_only: bool,
        /// An old ublk_drv: ADD_DEV drops the user-recovery flags.
        no_recovery: bool,
    }

    impl FakeKernel {
        /// The block layer sends a request to the device.
        fn send(&self, desc: IoDesc, data: Vec<u8>) {
            let mut state = self.state.lock();
            state.incoming.push_back((desc, data));
            state.dispatch();
            self.changed.notify_all();
        }
    }

    struct FakeControl(Arc<FakeKernel>);
    struct FakeQueue {
        kernel: Arc<FakeKernel>,
        pushed: Vec<(u32, u16, IoCmd)>,
        descriptors: Vec<IoDesc>,
        memory: Vec<u8>,
        buffer_bytes: usize,
    }

    const FAKE_DEV_ID: u32 = 7;

    impl Kernel for Arc<FakeKernel> {
        fn open_control(&self) -> io::Result<Box<dyn ControlRing>> {
            Ok(Box::new(FakeControl(Arc::clone(self))))
        }

        fn open_queue(
            &self,
            dev_id: u32,
            q_id: u16,
            depth: u16,
            buffer_bytes: usize,
        ) -> io::Result<Box<dyn QueueRing>> {
            assert_eq!((dev_id, q_id, depth), (FAKE_DEV_ID, 0, QUEUE_DEPTH));
            let mut state = self.state.lock();
            assert!(!state.queue_open, "the queue is open already");
            state.queue_open = true;
            state.fetched = vec![false; usize::from(depth)];
            state.reaped = vec![None; usize::from(depth)];
            Ok(Box::new(FakeQueue {
                kernel: Arc::clone(self),
                pushed: Vec::new(),
                descriptors: vec![IoDesc::default(); usize::from(depth)],
                memory: vec![0; usize::from(depth) * buffer_bytes],
                buffer_bytes,
            }))
        }

        fn interrupt(&self, _thread: &std::thread::JoinHandle<()>) {
            self.state.lock().interrupted = true;
            self.changed.notify_all();
        }
    }

    impl ControlRing for FakeControl {
        fn command(&mut self, cmd_op: u32, cmd: [u8; CTRL_CMD_BYTES], buffer: Option<&mut [u8]>) -> io::Result<i32> {
            let cmd = CtrlCmd::from_bytes(&cmd);
            let mut state = self.0.state.lock();
            state.control_ops.push(cmd_op);
            if self.0.legacy_only && cmd_op > 0xff {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            assert_eq!(cmd.queue_id, u16::MAX);
            if cmd_op & 0xff != CMD_ADD_DEV {
                assert_eq!(cmd.dev_id, FAKE_DEV_ID);
            }
            let recovery = if self.0.no_recovery {
                0
            } else {
                UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE
            };
            match cmd_op & 0xff {
                CMD_ADD_DEV => {
                    let buffer = buffer.expect("ADD_DEV carries the device info");
                    let mut info = DevInfo::from_bytes(&<[u8; DEV_INFO_BYTES]>::try_from(&buffer[..]).unwrap());
                    assert_eq!((cmd.dev_id, info.dev_id), (u32::MAX, u32::MAX));
                    info.dev_id = FAKE_DEV_ID;
                    if self.0.legacy_only {
                        info.flags &= !UBLK_F_CMD_IOCTL_ENCODE;
                    }
                    info.flags &= !(UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE) | recovery;
                    state.flags = info.flags;
                    buffer.copy_from_slice(&info.to_bytes());
                }
                CMD_GET_DEV_INFO => {
                    let buffer = buffer.expect("GET_DEV_INFO fills the device info");
                    let encode = if self.0.legacy_only { 0 } else { UBLK_F_CMD_IOCTL_ENCODE };
                    let info = DevInfo {
                        dev_id: FAKE_DEV_ID,
                        nr_hw_queues: QUEUE_COUNT,
                        queue_depth: QUEUE_DEPTH,
                        max_io_buf_bytes: IO_BUFFER_BYTES,
                        ublksrv_pid: i32::try_from(std::process::id()).unwrap(),
                        flags: encode | (state.flags & !UBLK_F_CMD_IOCTL_ENCODE),
                        ..DevInfo::default()
                    };
                    buffer.copy_from_slice(&info.to_bytes());
                }
                CMD_SET_PARAMS => state.params = buffer.expect("SET_PARAMS carries the params").to_vec(),
                CMD_START_DEV => {
                    assert_eq!(cmd.data[0], u64::from(std::process::id()));
                    // The kernel would wait; a fake that waits could hang the test.
                    assert!(
                        state.fetched.iter().all(|&f| f),
                        "START_DEV before every tag was fetched"
                    );
                }
                CMD_START_USER_RECOVERY => {
                    if state.busy_starts > 0 || state.queue_open {
                        state.busy_starts = state.busy_starts.saturating_sub(1);
                        return Err(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                    if !state.quiesced {
                        return Err(io::Error::from_raw_os_error(libc::EINVAL));
                    }
                }
                CMD_END_USER_RECOVERY => {
                    assert!(state.quiesced, "END_USER_RECOVERY of a live device");
                    assert!(
                        state.fetched.iter().all(|&f| f),
                        "END_USER_RECOVERY before every tag was fetched"
                    );
                    state.quiesced = false;
                    state.ended_by = Some(cmd.data[0]);
                    state.dispatch();
                    self.0.changed.notify_all();
                }
                CMD_STOP_DEV => {
                    state.stopped = true;
                    self.0.changed.notify_all();
                }
                CMD_DEL_DEV => assert!(!state.queue_open, "DEL_DEV with /dev/ublkcN still open"),
                _ => return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
            }
            Ok(0)
        }
    }

    impl QueueRing for FakeQueue {
        fn push(&mut self, cmd_op: u32, tag: u16, cmd: [u8; IO_CMD_BYTES]) -> io::Result<()> {
            self.pushed.push((cmd_op, tag, IoCmd::from_bytes(&cmd)));
            Ok(())
        }

        fn submit(&mut self, wait: bool, completions: &mut Vec<(u16, i32)>) -> io::Result<()> {
            let kernel = Arc::clone(&self.kernel);
            let mut state = kernel.state.lock();
            let encoded = !kernel.legacy_only;
            let submitted = !self.pushed.is_empty();
            for (cmd_op, tag, cmd) in self.pushed.drain(..) {
                assert_eq!((cmd.tag, cmd.q_id), (tag, 0));
                let index = usize::from(tag);
                assert!(!state.fetched[index], "a command for an armed tag");
                let (fetch, commit) = (
                    Opcodes { encoded }.io(IO_FETCH_REQ),
                    Opcodes { encoded }.io(IO_COMMIT_AND_FETCH_REQ),
                );
                if cmd_op == commit {
                    assert!(
                        state.reaped[index].take().is_some(),
                        "a commit of a tag with no request"
                    );
                    let buffer = self.memory[index * self.buffer_bytes..][..self.buffer_bytes].to_vec();
                    state.commits.push((tag, cmd.result, buffer));
                } else {
                    assert_eq!(cmd_op, fetch);
                }
                state.fetched[index] = true;
            }
            state.dispatch();
            kernel.changed.notify_all();
            loop {
                if state.stopped {
                    for (tag, fetched) in state.fetched.iter_mut().enumerate() {
                        if std::mem::take(fetched) {
                            completions.push((u16::try_from(tag).unwrap(), UBLK_IO_RES_ABORT));
                        }
                    }
                }
                while let Some((tag, desc, data)) = state.dispatched.pop_front() {
                    let index = usize::from(tag);
                    self.descriptors[index] = desc;
                    self.memory[index * self.buffer_bytes..][..data.len()].copy_from_slice(&data);
                    state.reaped[index] = Some((desc, data));
                    completions.push((tag, UBLK_IO_RES_OK));
                }
                if !wait || !completions.is_empty() {
                    return Ok(());
                }
                // io_uring_enter: a signal ends the wait with EINTR unless it submitted.
                if std::mem::take(&mut state.interrupted) {
                    return if submitted {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(libc::EINTR))
                    };
                }
                kernel.changed.wait(&mut state);
            }
        }

        fn descriptor(&self, tag: u16) -> [u8; IO_DESC_BYTES] {
            self.descriptors[usize::from(tag)].to_bytes()
        }

        fn buffers(&mut self) -> std::slice::ChunksExactMut<'_, u8> {
            self.memory.chunks_exact_mut(self.buffer_bytes)
        }
    }

    impl Drop for FakeQueue {
        fn drop(&mut self) {
            let mut state = self.kernel.state.lock();
            state.queue_open = false;
            if !state.stopped && state.flags & UBLK_F_USER_RECOVERY != 0 {
                // The server is gone: quiesce, and issue again what it held
                // (REISSUE), else fail it.
                state.quiesced = true;
                let mut held: Vec<(u16, IoDesc, Vec<u8>)> = (0..)
                    .zip(state.reaped.iter_mut())
                    .filter_map(|(tag, slot)| slot.take().map(|(desc, data)| (tag, desc, data)))
                    .collect();
                held.extend(state.dispatched.drain(..));
                if state.flags & UBLK_F_USER_RECOVERY_REISSUE != 0 {
                    for (_, desc, data) in held.into_iter().rev() {
                        state.incoming.push_front((desc, data));
                    }
                } else {
                    for (tag, _, _) in held {
                        state.commits.push((tag, -libc::EIO, Vec::new()));
                    }
                }
                state.fetched.fill(false);
            }
            self.kernel.changed.notify_all();
        }
    }

    fn wait_for_commits(kernel: &FakeKernel, count: usize) -> Vec<(u16, i32, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = kernel.state.lock();
        while state.commits.len() < count {
            assert!(Instant::now() < deadline, "the queue did not answer");
            kernel.changed.wait_for(&mut state, Duration::from_millis(50));
        }
        state.commits.clone()
    }

    fn serve_a_write_and_a_read(legacy_only: bool) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let fake = Arc::new(FakeKernel {
            legacy_only,
            ..FakeKernel::default()
        });
        let kernel: Arc<dyn Kernel> = Arc::new(Arc::clone(&fake));
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let device =
            UblkDevice::start_with(&kernel, Arc::clone(&target), 1 << 20, 4096, runtime.handle().clone()).unwrap();
        assert_eq!(device.path(), Path::new("/dev/ublkb7"));
        let write = IoDesc {
            op_flags: u32::from(UBLK_IO_OP_WRITE),
            nr_sectors: 8,
            start_sector: 16,
            addr: 0,
        };
        let read = IoDesc {
            op_flags: u32::from(UBLK_IO_OP_READ),
            nr_sectors: 16,
            start_sector: 8,
            addr: 0,
        };
        fake.send(write, vec![0x5a; 4096]);
        let commits = wait_for_commits(&fake, 1);
        assert_eq!(commits[0].1, 4096);
        fake.send(read, Vec::new());
        let commits = wait_for_commits(&fake, 2);
        assert_eq!(commits[1].1, 8192);
        assert!(commits[1].2[..4096].iter().all(|&b| b == 0));
        assert!(commits[1].2[4096..8192].iter().all(|&b| b == 0x5a));
        drop(device);
        let state = fake.state.lock();
        let opcodes = Opcodes { encoded: !legacy_only };
        let mut expected: Vec<u32> = [CMD_ADD_DEV, CMD_SET_PARAMS, CMD_START_DEV, CMD_STOP_DEV, CMD_DEL_DEV]
            .map(|nr| opcodes.control(nr))
            .to_vec();
        if legacy_only {
            expected.insert(0, UBLK_U_CMD_ADD_DEV);
        }
        assert_eq!(state.control_ops, expected);
        assert_eq!(&state.params[0..4], &60u32.to_ne_bytes());
        assert!(!state.queue_open);
    }

    fn write_of(start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(UBLK_IO_OP_WRITE),
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    fn started(fake: &Arc<FakeKernel>, target: &Arc<MemoryTarget>, runtime: &tokio::runtime::Runtime) -> UblkDevice {
        let kernel: Arc<dyn Kernel> = Arc::new(Arc::clone(fake));
        UblkDevice::start_with(&kernel, Arc::clone(target), 1 << 20, 4096, runtime.handle().clone()).unwrap()
    }

    /// A device started on `fake`, paused and released: its number.
    fn handed_over(fake: &Arc<FakeKernel>, target: &Arc<MemoryTarget>, runtime: &tokio::runtime::Runtime) -> u32 {
        let device = started(fake, target, runtime);
        device.pause(Instant::now() + Duration::from_secs(10)).unwrap();
        device.release()
    }

    /// The next server's recovery of `dev_id` on `fake`.
    fn recovered(
        fake: &Arc<FakeKernel>,
        target: &Arc<MemoryTarget>,
        dev_id: u32,
        runtime: &tokio::runtime::Runtime,
        serving_deadline: Instant,
    ) -> Result<UblkDevice, String> {
        let kernel: Arc<dyn Kernel> = Arc::new(Arc::clone(fake));
        UblkDevice::recover_with(
            &kernel,
            Arc::clone(target),
            dev_id,
            runtime.handle().clone(),
            serving_deadline,
        )
    }

    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap()
    }

    fn wait_until(kernel: &FakeKernel, what: &str, done: impl Fn(&FakeState) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = kernel.state.lock();
        while !done(&state) {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            kernel.changed.wait_for(&mut state, Duration::from_millis(50));
        }
    }

    #[test]
    fn a_device_handed_over_is_recovered_by_the_next_server_and_loses_no_request() {
        let runtime = one_worker();
        let fake = Arc::new(FakeKernel::default());
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let device = started(&fake, &target, &runtime);
        assert!(device.recoverable(), "ADD_DEV asked for user recovery and got it");
        fake.send(write_of(0, 8), vec![0x11; 4096]);
        wait_for_commits(&fake, 1);

        device.pause(Instant::now() + Duration::from_secs(10)).unwrap();
        // Handed to a tag the paused server does not read: issued again later.
        fake.send(write_of(8, 8), vec![0x22; 4096]);
        let dev_id = device.release();
        assert_eq!(dev_id, FAKE_DEV_ID);
        {
            let state = fake.state.lock();
            assert!(state.quiesced && !state.queue_open, "the queue ended, the device waits");
            assert!(!state.stopped, "a released device is not stopped");
            assert_eq!(state.commits.len(), 1);
        }
        // Sent while no server runs: waits in the kernel.
        fake.send(write_of(16, 8), vec![0x33; 4096]);

        // The next server, before its volume is served here.
        target.served.store(false, std::sync::atomic::Ordering::SeqCst);
        fake.state.lock().busy_starts = 3;
        let recovered = recovered(
            &fake,
            &target,
            dev_id,
            &runtime,
            Instant::now() + Duration::from_secs(30),
        )
        .unwrap();
        // The recovery waits, asking whether the volume is served, while
        // the requests wait in the kernel.
        let asked = target.serving_asked.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while target.serving_asked.load(std::sync::atomic::Ordering::SeqCst) < asked + 3 {
            assert!(Instant::now() < deadline, "the recovery does not look at its volume");
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let state = fake.state.lock();
            let starts = state
                .control_ops
                .iter()
                .filter(|&&op| op == UBLK_U_CMD_START_USER_RECOVERY)
                .count();
            assert_eq!(starts, 4, "START_USER_RECOVERY is tried again while busy");
            assert!(state.control_ops.contains(&UBLK_U_CMD_GET_DEV_INFO));
            assert!(state.fetched.iter().all(|&fetched| fetched), "every tag fetched");
            assert_eq!(state.ended_by, None, "recovery ends only once the volume is served");
            assert_eq!(state.commits.len(), 1, "no request served before that");
        }
        target.served.store(true, std::sync::atomic::Ordering::SeqCst);
        let commits = wait_for_commits(&fake, 3);
        assert!(
            commits[1..].iter().all(|(_, result, _)| *result == 4096),
            "{:?}",
            commits.iter().map(|c| c.1).collect::<Vec<_>>()
        );
        assert_eq!(fake.state.lock().ended_by, Some(u64::from(std::process::id())));
        {
            let bytes = target.bytes.lock();
            assert!(bytes[..4096].iter().all(|&b| b == 0x11));
            assert!(
                bytes[4096..8192].iter().all(|&b| b == 0x22),
                "the request held by the old server"
            );
            assert!(
                bytes[8192..12288].iter().all(|&b| b == 0x33),
                "the request sent between servers"
            );
        }
        drop(recovered);
        let state = fake.state.lock();
        assert!(state.stopped && !state.queue_open);
        assert_eq!(state.control_ops.last(), Some(&UBLK_U_CMD_DEL_DEV));
        let stops = state
            .control_ops
            .iter()
            .filter(|&&op| op == UBLK_U_CMD_STOP_DEV)
            .count();
        assert_eq!(stops, 1, "only the last server stops the device");
    }

    #[test]
    fn a_paused_device_serves_on_when_resumed() {
        let runtime = one_worker();
        let fake = Arc::new(FakeKernel::default());
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let device = started(&fake, &target, &runtime);
        device.pause(Instant::now() + Duration::from_secs(10)).unwrap();
        fake.send(write_of(0, 8), vec![0x44; 4096]);
        assert!(fake.state.lock().commits.is_empty(), "a paused device answers nothing");
        device.resume();
        let commits = wait_for_commits(&fake, 1);
        assert_eq!(commits[0].1, 4096);
        fake.send(write_of(8, 8), vec![0x55; 4096]);
        wait_for_commits(&fake, 2);
        drop(device);
        assert!(fake.state.lock().stopped);
    }

    #[test]
    fn a_recovered_device_whose_volume_is_not_served_in_time_fails_its_requests() {
        let runtime = one_worker();
        let fake = Arc::new(FakeKernel::default());
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let dev_id = handed_over(&fake, &target, &runtime);
        fake.send(write_of(0, 8), vec![0x66; 4096]);
        target.served.store(false, std::sync::atomic::Ordering::SeqCst);
        let recovered = recovered(&fake, &target, dev_id, &runtime, Instant::now()).unwrap();
        let commits = wait_for_commits(&fake, 1);
        assert_eq!(commits[0].1, -libc::EIO);
        assert!(target.bytes.lock().iter().all(|&b| b == 0));
        drop(recovered);
    }

    #[test]
    fn devices_without_user_recovery_are_not_kept_nor_taken_over() {
        let runtime = one_worker();
        let fake = Arc::new(FakeKernel {
            no_recovery: true,
            ..FakeKernel::default()
        });
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let device = started(&fake, &target, &runtime);
        assert!(!device.recoverable());
        let error = recovered(&fake, &target, FAKE_DEV_ID, &runtime, Instant::now())
            .err()
            .expect("no recovery of a device made without it");
        assert!(error.contains("without user recovery"), "{error}");
        drop(device);
        assert!(fake.state.lock().stopped);
    }

    #[test]
    fn a_device_left_by_a_dead_server_is_removed_on_request() {
        let runtime = one_worker();
        let fake = Arc::new(FakeKernel::default());
        let target = Arc::new(MemoryTarget::new(1 << 20));
        let dev_id = handed_over(&fake, &target, &runtime);
        let kernel: Arc<dyn Kernel> = Arc::new(Arc::clone(&fake));
        remove_left_with(kernel.as_ref(), dev_id).unwrap();
        wait_until(&fake, "stopped", |state| state.stopped);
        let ops = fake.state.lock().control_ops.clone();
        assert_eq!(
            &ops[ops.len() - 3..],
            &[UBLK_U_CMD_GET_DEV_INFO, UBLK_U_CMD_STOP_DEV, UBLK_U_CMD_DEL_DEV]
        );
    }

    #[test]
    fn device_serves_and_stops_in_order() {
        serve_a_write_and_a_read(false);
    }

    #[test]
    fn old_kernels_get_legacy_command_numbers() {
        serve_a_write_and_a_read(true);
    }
}
