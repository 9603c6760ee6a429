//! Errors of the disk-layout crate, one enum per concern.

use thiserror::Error;

/// Errors decoding or laying out on-disk structures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// segment size {segment_size_bytes} bytes is not a power of two between 1 MiB and 1 GiB
    #[error("segment size {segment_size_bytes} bytes is not a power of two between 1 MiB and 1 GiB")]
    BadSegmentSize { segment_size_bytes: u64 },
    /// the disk is too small for the minimum number of segments
    #[error(
        "disk of {disk_size_bytes} bytes is too small for 8 segments of {segment_size_bytes} bytes plus checkpoints"
    )]
    DiskTooSmall {
        disk_size_bytes: u64,
        segment_size_bytes: u64,
    },
    /// the disk is larger than the format can address
    #[error("disk of {disk_size_bytes} bytes is larger than the 4 PiB (2^40 blocks of 4 KiB) ballast can address")]
    DiskTooLarge { disk_size_bytes: u64 },
    /// more segments than a segment index can name
    #[error(
        "disk of {disk_size_bytes} bytes would hold more than 2^32 - 1 segments of {segment_size_bytes} bytes: \
         choose larger segments"
    )]
    TooManySegments {
        disk_size_bytes: u64,
        segment_size_bytes: u64,
    },
    /// no ballast superblock (wrong magic)
    #[error("no ballast superblock (magic does not match)")]
    BadMagic,
    /// checksum mismatch in a header
    #[error("{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    /// unknown format version
    #[error(
        "format version {found} is not supported by ballast {ballast}, which reads format {supported}; \
         nothing on the disk was changed: open it with the ballast that wrote it (or a newer one)"
    )]
    UnsupportedVersion {
        found: u32,
        supported: u32,
        ballast: &'static str,
    },
    /// superblock geometry is inconsistent
    #[error("superblock geometry is inconsistent")]
    BadGeometry,
    /// a field holds a value the format does not allow
    #[error("{what} holds an invalid value {value}")]
    BadField { what: &'static str, value: u64 },
}

/// An error reported by an I/O backend for one request.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IoFault {
    /// the device returned an error (errno)
    #[error("device error (errno {errno})")]
    Errno { errno: i32 },
    /// the device transferred fewer bytes than asked
    #[error("short transfer: {done_bytes} of {wanted_bytes} bytes")]
    Short { done_bytes: u64, wanted_bytes: u64 },
}

/// Errors of store operations, with the context a user needs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// the disk's superblock or checkpoint could not be used
    #[error("disk {disk}: {source}")]
    Format {
        disk: String,
        #[source]
        source: FormatError,
    },
    /// I/O failed
    #[error("disk {disk}: I/O error at byte {offset_bytes}: {fault}")]
    Io {
        disk: String,
        offset_bytes: u64,
        fault: IoFault,
    },
    /// data read back does not match its checksum
    #[error("disk {disk}: checksum mismatch reading volume {volume_id} block {lba} (disk block {address})")]
    Checksum {
        disk: String,
        volume_id: u64,
        lba: u64,
        address: u64,
    },
    /// the disk belongs to another node
    #[error("disk {disk} belongs to node {found}, not to this node {expected}")]
    WrongNode {
        disk: String,
        found: String,
        expected: String,
    },
    /// no space left for new data
    #[error("disk {disk}: no space left ({used_blocks} of {capacity_blocks} blocks used)")]
    NoSpace {
        disk: String,
        used_blocks: u64,
        capacity_blocks: u64,
    },
    /// request outside what the store accepts
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    /// the store stopped after an earlier write or flush failure and must be reopened
    #[error("disk {disk} is failed after an earlier I/O error and must be reopened: {cause}")]
    Failed { disk: String, cause: String },
    /// too many volumes on one disk
    #[error("disk {disk} already holds data of {count} volumes, the most one disk may hold")]
    TooManyVolumes { disk: String, count: u64 },
}

impl StoreError {
    /// True when retrying the same request later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }

    /// True when the data of the blocks read is bad (checksum mismatch or a
    /// read error) but the store itself still serves: a copy from a replica
    /// repairs it.
    #[must_use]
    pub fn is_data_error(&self) -> bool {
        matches!(self, Self::Checksum { .. } | Self::Io { .. })
    }

    /// The errno an NBD or block client should see.
    #[must_use]
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoSpace { .. } => 28,        // ENOSPC
            Self::InvalidRequest { .. } => 22, // EINVAL
            _ => 5,                            // EIO
        }
    }
}
