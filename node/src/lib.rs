//! The ballast node: daemon and CLI.

#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod attach;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod datadir;
pub mod engine;
pub mod enroll;
pub mod handoff;
pub mod in_flight;
pub mod install;
pub mod linearizable;
pub mod load_check;
pub mod local_nodes;
pub mod managed_plugin;
pub mod metrics;
pub mod nbd;
pub mod pattern;
pub mod peer;
pub mod plugin;
pub mod replication;
pub mod size;
pub mod volume;
