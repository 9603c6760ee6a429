//! Everything in ballast that talks to the Linux kernel.
//!
//! io_uring rings and the pread/pwrite fallback (`uring`, `pool`), raw
//! device discovery and exclusive open (`device`), CPU pinning (`affinity`).
//! All `unsafe` in ballast lives in this crate, each block with a
//! `// SAFETY:` comment and a test. It knows nothing of the on-disk format.

pub mod affinity;
pub mod device;
pub mod engine;
pub mod faults;
pub mod fuse;
pub mod fuse_uring;
pub mod lockfile;
pub mod loopdev;
pub mod nbd;
pub mod pool;
pub mod process;
pub mod ublk;
pub mod uring;

pub use engine::{open_engine, Completion, EngineChoice, IoEngine, IoKind, Submission, Waker};
