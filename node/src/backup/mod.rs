//! Off-cluster backups: incremental, deduplicated, compressed and
//! encrypted copies of volumes in a target outside the cluster (a
//! directory, or an S3-compatible store), restorable into a new volume
//! on any cluster that has the target's secret.
//!
//! - `crypto`: the target's keys (from a passphrase or a key file), chunk
//!   names, sealing.
//! - `target`: where the objects live (`file:///path`, `s3://bucket/prefix`).
//! - `repo`: the target's layout: config, chunks, manifests, locks;
//!   list, verify and delete run here, in the CLI, against the target.
//! - `job`: a backup or restore run by the node serving the volume
//!   (`cluster::backups` starts them).

pub mod crypto;
pub mod job;
pub mod repo;
pub mod target;

use serde::{Deserialize, Serialize};

pub use crypto::Secret;
pub use target::TargetOptions;

/// Body of POST /v1/volumes/{name}/backups.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBody {
    /// A URL, or the name of a registered target (its secret kept in the cluster).
    pub target: String,
    /// The target's secret (None for a registered target).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// How to reach an S3 target (endpoint, region, credentials).
    #[serde(default)]
    pub options: TargetOptions,
    /// Back up this snapshot (taken on every in-sync replica); None: take one now.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Bound on the bytes read per second, MiB.
    #[serde(default)]
    pub mib_per_s: Option<u64>,
}

/// Body of POST /v1/volumes/{name}/backup-restore.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    pub target: String,
    #[serde(default)]
    pub secret: Option<Secret>,
    #[serde(default)]
    pub options: TargetOptions,
    pub backup: String,
    /// Bound on the bytes written per second, MiB.
    #[serde(default)]
    pub mib_per_s: Option<u64>,
}
