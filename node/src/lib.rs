//! The ballast node: daemon and CLI.

#![forbid(unsafe_code)]

pub mod cli;
pub mod datadir;
pub mod engine;
pub mod enroll;
pub mod pattern;
pub mod size;
