//! The FUSE wire format (include/uapi/linux/fuse.h), for the few requests
//! the attach filesystem serves. Native-endian (the kernel's; x86_64 and
//! aarch64 are little-endian, asserted below). Pure: bytes in, values out.
//!
//! ```text
//! request:  fuse_in_header (40)  | op arguments | payload (write data, a name)
//!   0 len u32   4 opcode u32   8 unique u64   16 nodeid u64
//!  24 uid u32  28 gid u32     32 pid u32      36 total_extlen u16  38 padding u16
//! answer:   fuse_out_header (16) | op result | data
//!   0 len u32   4 error i32 (0 or -errno)   8 unique u64
//! ```

use thiserror::Error;

const _: () = assert!(
    cfg!(target_endian = "little"),
    "FUSE structs are native-endian; only little-endian is built"
);

pub const IN_HEADER_BYTES: usize = 40;
pub const OUT_HEADER_BYTES: usize = 16;

/// The protocol version spoken (7.x; x is the minor the kernel offers, at most this).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 42;
/// Oldest minor accepted: 7.28 brought max_pages.
pub const KERNEL_MINOR_VERSION_MIN: u32 = 28;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;

// INIT flags (flags; flags2 holds bits 32..63).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
pub const ASYNC_DIO: u64 = 1 << 15;
pub const PARALLEL_DIROPS: u64 = 1 << 18;
pub const MAX_PAGES: u64 = 1 << 22;
pub const INIT_EXT: u64 = 1 << 30;
pub const OVER_IO_URING: u64 = 1 << 41;

// OPEN answer flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR valid bits.
pub const FATTR_SIZE: u32 = 1 << 3;

// fallocate modes (linux/falloc.h).
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// A request the codec cannot take.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// fewer bytes than the header or the operation's arguments
    #[error("truncated {what}: {have} of {need} bytes")]
    Truncated {
        what: &'static str,
        have: usize,
        need: usize,
    },
    /// the header's length disagrees with the bytes read
    #[error("request header says {said} bytes, {read} were read")]
    Length { said: u32, read: usize },
}

/// A request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

/// One request: what the attach filesystem needs of it.
#[derive(Debug, PartialEq, Eq)]
pub enum Operation<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Lookup {
        name: &'a [u8],
    },
    GetAttr,
    SetAttr {
        valid: u32,
        size: u64,
    },
    Open,
    Read {
        offset: u64,
        size: u32,
    },
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Fsync,
    Flush,
    Release,
    StatFs,
    OpenDir,
    ReadDir {
        offset: u64,
        size: u32,
    },
    ReleaseDir,
    Access,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    /// Needs no answer (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
    Destroy,
    /// Anything else: answered ENOSYS.
    Unknown {
        opcode: u32,
    },
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn need<'a>(bytes: &'a [u8], count: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
    if bytes.len() < count {
        return Err(ProtoError::Truncated {
            what,
            have: bytes.len(),
            need: count,
        });
    }
    Ok(&bytes[..count])
}

/// Parses a request's header.
pub fn decode_header(bytes: &[u8]) -> Result<InHeader, ProtoError> {
    let header = need(bytes, IN_HEADER_BYTES, "request header")?;
    Ok(InHeader {
        len: u32_at(header, 0),
        opcode: u32_at(header, 4),
        unique: u64_at(header, 8),
        nodeid: u64_at(header, 16),
    })
}

/// Parses a whole request as read from /dev/fuse (header, arguments, payload).
pub fn decode(bytes: &[u8]) -> Result<(InHeader, Operation<'_>), ProtoError> {
    let header = decode_header(bytes)?;
    if header.len as usize != bytes.len() {
        return Err(ProtoError::Length {
            said: header.len,
            read: bytes.len(),
        });
    }
    let body = &bytes[IN_HEADER_BYTES..];
    Ok((header, decode_operation(header.opcode, body, &[])?))
}

/// Parses an operation's arguments `args`; its data may follow them in
/// `args` (/dev/fuse) or come apart in `payload` (io_uring).
pub fn decode_operation<'a>(opcode: u32, args: &'a [u8], payload: &'a [u8]) -> Result<Operation<'a>, ProtoError> {
    // Where the variable part lives: after the arguments, or apart.
    let rest = |fixed: usize| if payload.is_empty() { &args[fixed..] } else { payload };
    Ok(match opcode {
        INIT => {
            // fuse_init_in: major, minor, max_readahead, flags, then (7.36+) flags2.
            let fixed = need(args, 16, "INIT")?;
            let flags2 = if args.len() >= 20 {
                u64::from(u32_at(args, 16))
            } else {
                0
            };
            Operation::Init {
                major: u32_at(fixed, 0),
                minor: u32_at(fixed, 4),
                max_readahead: u32_at(fixed, 8),
                flags: u64::from(u32_at(fixed, 12)) | flags2 << 32,
            }
        }
        LOOKUP => {
            let name = rest(0);
            // The name is NUL-terminated.
            let name = name.split(|&byte| byte == 0).next().unwrap_or(name);
            Operation::Lookup { name }
        }
        GETATTR => Operation::GetAttr,
        SETATTR => {
            // fuse_setattr_in: valid u32, padding u32, fh u64, size u64, ...
            let fixed = need(args, 24, "SETATTR")?;
            Operation::SetAttr {
                valid: u32_at(fixed, 0),
                size: u64_at(fixed, 16),
            }
        }
        OPEN => Operation::Open,
        READ => {
            // fuse_read_in: fh u64, offset u64, size u32, read_flags u32, lock_owner u64, flags u32, padding u32.
            let fixed = need(args, 24, "READ")?;
            Operation::Read {
                offset: u64_at(fixed, 8),
                size: u32_at(fixed, 16),
            }
        }
        WRITE => {
            // fuse_write_in (40 bytes): fh u64, offset u64, size u32, write_flags u32, lock_owner u64, flags u32, padding u32.
            let fixed = need(args, 40, "WRITE")?;
            let size = u32_at(fixed, 16) as usize;
            let data = need(rest(40), size, "WRITE data")?;
            Operation::Write {
                offset: u64_at(fixed, 8),
                data,
            }
        }
        FSYNC => Operation::Fsync,
        FLUSH => Operation::Flush,
        RELEASE => Operation::Release,
        STATFS => Operation::StatFs,
        OPENDIR => Operation::OpenDir,
        READDIR => {
            let fixed = need(args, 24, "READDIR")?;
            Operation::ReadDir {
                offset: u64_at(fixed, 8),
                size: u32_at(fixed, 16),
            }
        }
        RELEASEDIR => Operation::ReleaseDir,
        FSYNCDIR => Operation::Fsync,
        ACCESS => Operation::Access,
        FALLOCATE => {
            // fuse_fallocate_in: fh u64, offset u64, length u64, mode u32, padding u32.
            let fixed = need(args, 28, "FALLOCATE")?;
            Operation::Fallocate {
                offset: u64_at(fixed, 8),
                length: u64_at(fixed, 16),
                mode: u32_at(fixed, 24),
            }
        }
        FORGET | BATCH_FORGET | INTERRUPT => Operation::NoReply,
        DESTROY => Operation::Destroy,
        opcode => Operation::Unknown { opcode },
    })
}

/// An answer's header.
#[must_use]
pub fn encode_out_header(unique: u64, error: i32, body_bytes: usize) -> [u8; OUT_HEADER_BYTES] {
    let len = u32::try_from(OUT_HEADER_BYTES + body_bytes).expect("answers are far below 4 GiB");
    let mut out = [0u8; OUT_HEADER_BYTES];
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&error.to_le_bytes());
    out[8..16].copy_from_slice(&unique.to_le_bytes());
    out
}

/// What INIT agrees to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub max_pages: u16,
}

/// fuse_init_out (64 bytes): major, minor, max_readahead, flags u32;
/// max_background, congestion_threshold u16; max_write, time_gran u32;
/// max_pages, map_alignment u16; flags2, max_stack_depth u32; request_timeout u16; unused.
#[must_use]
pub fn encode_init_out(init: &InitOut) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[0..4].copy_from_slice(&KERNEL_VERSION.to_le_bytes());
    out[4..8].copy_from_slice(&init.minor.to_le_bytes());
    out[8..12].copy_from_slice(&init.max_readahead.to_le_bytes());
    #[allow(clippy::cast_possible_truncation)] // the low and high halves
    {
        out[12..16].copy_from_slice(&(init.flags as u32).to_le_bytes());
        out[32..36].copy_from_slice(&((init.flags >> 32) as u32).to_le_bytes());
    }
    out[16..18].copy_from_slice(&init.max_background.to_le_bytes());
    out[18..20].copy_from_slice(&init.congestion_threshold.to_le_bytes());
    out[20..24].copy_from_slice(&init.max_write.to_le_bytes());
    out[24..28].copy_from_slice(&1u32.to_le_bytes()); // time_gran: 1 ns
    out[28..30].copy_from_slice(&init.max_pages.to_le_bytes());
    out
}

/// A file's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub inode: u64,
    pub size_bytes: u64,
    pub directory: bool,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const ATTR_BYTES: usize = 88;

/// fuse_attr (88 bytes): ino, size, blocks, atime, mtime, ctime u64;
/// atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags u32.
fn encode_attr(attr: &Attr, out: &mut [u8]) {
    debug_assert_eq!(out.len(), ATTR_BYTES);
    out[0..8].copy_from_slice(&attr.inode.to_le_bytes());
    out[8..16].copy_from_slice(&attr.size_bytes.to_le_bytes());
    out[16..24].copy_from_slice(&attr.size_bytes.div_ceil(512).to_le_bytes());
    let mode = if attr.directory {
        S_IFDIR | 0o700
    } else {
        S_IFREG | 0o600
    };
    out[60..64].copy_from_slice(&mode.to_le_bytes());
    out[64..68].copy_from_slice(&(if attr.directory { 2u32 } else { 1 }).to_le_bytes());
    out[80..84].copy_from_slice(&4096u32.to_le_bytes()); // blksize
}

/// fuse_entry_out (128 bytes): nodeid, generation, entry_valid, attr_valid
/// u64; entry_valid_nsec, attr_valid_nsec u32; attr.
#[must_use]
pub fn encode_entry_out(attr: &Attr, valid_seconds: u64) -> [u8; 128] {
    let mut out = [0u8; 128];
    out[0..8].copy_from_slice(&attr.inode.to_le_bytes());
    out[16..24].copy_from_slice(&valid_seconds.to_le_bytes());
    out[24..32].copy_from_slice(&valid_seconds.to_le_bytes());
    encode_attr(attr, &mut out[40..128]);
    out
}

/// fuse_attr_out (104 bytes): attr_valid u64, attr_valid_nsec u32, dummy u32, attr.
#[must_use]
pub fn encode_attr_out(attr: &Attr, valid_seconds: u64) -> [u8; 104] {
    let mut out = [0u8; 104];
    out[0..8].copy_from_slice(&valid_seconds.to_le_bytes());
    encode_attr(attr, &mut out[16..104]);
    out
}

/// fuse_open_out (16 bytes): fh u64, open_flags u32, backing_id i32.
#[must_use]
pub fn encode_open_out(handle: u64, open_flags: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..8].copy_from_slice(&handle.to_le_bytes());
    out[8..12].copy_from_slice(&open_flags.to_le_bytes());
    out
}

/// fuse_write_out (8 bytes): size u32, padding u32.
#[must_use]
pub fn encode_write_out(size: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0..4].copy_from_slice(&size.to_le_bytes());
    out
}

/// fuse_statfs_out (80 bytes): blocks, bfree, bavail, files, ffree u64;
/// bsize, namelen, frsize, padding u32; spare[6] u32.
#[must_use]
pub fn encode_statfs_out(blocks: u64, files: u64) -> [u8; 80] {
    let mut out = [0u8; 80];
    out[0..8].copy_from_slice(&blocks.to_le_bytes());
    out[24..32].copy_from_slice(&files.to_le_bytes());
    out[40..44].copy_from_slice(&4096u32.to_le_bytes());
    out[44..48].copy_from_slice(&255u32.to_le_bytes());
    out[48..52].copy_from_slice(&4096u32.to_le_bytes());
    out
}

/// Appends a fuse_dirent (ino u64, off u64, namelen u32, type u32, name,
/// padded to 8) if it fits in `limit` bytes; false when it does not.
pub fn push_dirent(
    out: &mut Vec<u8>,
    limit: usize,
    inode: u64,
    next_offset: u64,
    directory: bool,
    name: &[u8],
) -> bool {
    let entry_bytes = (24 + name.len()).next_multiple_of(8);
    if out.len() + entry_bytes > limit {
        return false;
    }
    out.extend_from_slice(&inode.to_le_bytes());
    out.extend_from_slice(&next_offset.to_le_bytes());
    out.extend_from_slice(&u32::try_from(name.len()).expect("short names").to_le_bytes());
    let kind: u32 = if directory { 4 } else { 8 }; // DT_DIR, DT_REG
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + (entry_bytes - 24 - name.len()), 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; IN_HEADER_BYTES];
        let len = u32::try_from(IN_HEADER_BYTES + body.len()).unwrap();
        bytes[0..4].copy_from_slice(&len.to_le_bytes());
        bytes[4..8].copy_from_slice(&opcode.to_le_bytes());
        bytes[8..16].copy_from_slice(&unique.to_le_bytes());
        bytes[16..24].copy_from_slice(&nodeid.to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn a_write_request_gives_its_offset_and_exactly_its_data() {
        let mut body = vec![0u8; 40];
        body[8..16].copy_from_slice(&8192u64.to_le_bytes());
        body[16..20].copy_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(b"hello");
        let bytes = request(WRITE, 9, 3, &body);
        let (header, operation) = decode(&bytes).unwrap();
        assert_eq!((header.unique, header.nodeid, header.opcode), (9, 3, WRITE));
        assert_eq!(
            operation,
            Operation::Write {
                offset: 8192,
                data: b"hello"
            }
        );
        // The same arguments with the data apart (io_uring's payload buffer).
        assert_eq!(
            decode_operation(WRITE, &body[..40], b"hello").unwrap(),
            Operation::Write {
                offset: 8192,
                data: b"hello"
            }
        );
    }

    #[test]
    fn short_or_inconsistent_requests_are_refused_not_read_past() {
        assert!(matches!(decode(&[0u8; 10]), Err(ProtoError::Truncated { .. })));
        let mut bytes = request(READ, 1, 2, &[0u8; 8]);
        assert!(matches!(
            decode(&bytes),
            Err(ProtoError::Truncated { what: "READ", .. })
        ));
        bytes[0] = 200;
        assert!(matches!(decode(&bytes), Err(ProtoError::Length { said: 200, .. })));
        // A write whose size field claims more data than came.
        let mut body = vec![0u8; 40];
        body[16..20].copy_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&[1u8; 100]);
        assert!(matches!(
            decode(&request(WRITE, 1, 2, &body)),
            Err(ProtoError::Truncated { what: "WRITE data", .. })
        ));
    }

    #[test]
    fn init_flags_join_both_words_and_the_answer_splits_them_again() {
        let mut body = vec![0u8; 64];
        body[0..4].copy_from_slice(&7u32.to_le_bytes());
        body[4..8].copy_from_slice(&44u32.to_le_bytes());
        body[12..16].copy_from_slice(&u32::try_from(ASYNC_DIO | INIT_EXT).unwrap().to_le_bytes());
        body[16..20].copy_from_slice(&u32::try_from(OVER_IO_URING >> 32).unwrap().to_le_bytes());
        let bytes = request(INIT, 1, 0, &body);
        let (_, operation) = decode(&bytes).unwrap();
        let Operation::Init {
            major, minor, flags, ..
        } = operation
        else {
            panic!("{operation:?}")
        };
        assert_eq!((major, minor, flags), (7, 44, ASYNC_DIO | INIT_EXT | OVER_IO_URING));
        let out = encode_init_out(&InitOut {
            minor: 42,
            max_readahead: 0,
            flags: ASYNC_DIO | OVER_IO_URING,
            max_background: 256,
            congestion_threshold: 192,
            max_write: 1 << 20,
            max_pages: 256,
        });
        assert_eq!(u32_at(&out, 12), u32::try_from(ASYNC_DIO).unwrap());
        assert_eq!(u32_at(&out, 32), u32::try_from(OVER_IO_URING >> 32).unwrap());
        assert_eq!(u32_at(&out, 20), 1 << 20);
        assert_eq!(u16::from_le_bytes([out[28], out[29]]), 256);
    }

    #[test]
    fn lookup_names_stop_at_their_nul_and_unknown_opcodes_are_named() {
        let bytes = request(LOOKUP, 1, 1, b"pg-data\0");
        let (_, operation) = decode(&bytes).unwrap();
        assert_eq!(operation, Operation::Lookup { name: b"pg-data" });
        let bytes = request(4242, 1, 1, b"");
        let (_, operation) = decode(&bytes).unwrap();
        assert_eq!(operation, Operation::Unknown { opcode: 4242 });
    }

    #[test]
    fn answers_carry_their_length_error_and_unique() {
        let header = encode_out_header(77, -libc::EIO, 8);
        assert_eq!(u32_at(&header, 0), 24);
        assert_eq!(i32::from_le_bytes(header[4..8].try_into().unwrap()), -libc::EIO);
        assert_eq!(u64_at(&header, 8), 77);
        let entry = encode_entry_out(
            &Attr {
                inode: 5,
                size_bytes: 1 << 30,
                directory: false,
            },
            1,
        );
        assert_eq!(u64_at(&entry, 0), 5);
        assert_eq!(u64_at(&entry, 48), 1 << 30);
        assert_eq!(u32_at(&entry, 40 + 60), S_IFREG | 0o600);
    }

    #[test]
    fn directory_entries_are_padded_to_eight_and_stop_at_the_limit() {
        let mut out = Vec::new();
        assert!(push_dirent(&mut out, 64, 1, 1, true, b"."));
        assert_eq!(out.len(), 32);
        assert!(!push_dirent(&mut out, 64, 5, 2, false, b"a-long-volume-name"));
        assert_eq!(out.len(), 32);
    }
}
