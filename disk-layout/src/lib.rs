//! ballast's on-disk format and log-structured store.
//!
//! Pure: no threads, no syscalls. The store runs over the [`io::BlockIo`]
//! trait, so tests drive it over [`sim_disk::SimDisk`] (memory with injected
//! crashes, torn writes and errors) and production over io_uring.
//! `FORMAT.md` in this crate documents every byte.

#![forbid(unsafe_code)]

pub mod buf;
pub mod checkpoint;
pub mod codec;
pub mod error;
pub mod geometry;
pub mod index;
pub mod io;
pub mod record;
pub mod sim_disk;
pub mod store;
pub mod superblock;

pub use buf::IoBuf;
pub use error::{FormatError, IoFault, StoreError};
pub use io::{BlockIo, IoCompletion, IoOp, IoRequest};
pub use store::{BlockState, Done, FormatParams, Reply, SpaceReport, Store, StoreConfig, StoreStats};

/// Largest volume, in 4 KiB blocks (4 PiB); bounds every LBA the store accepts.
pub const LBA_LIMIT: u64 = 1 << 40;
