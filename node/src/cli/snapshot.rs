//! `ballast snapshot create | list | delete | restore`: clients of the node's
//! HTTP API. Clones are `ballast volume clone VOLUME@SNAPSHOT NEW`;
//! scheduled snapshots `ballast volume update VOLUME --snapshot-every 1h
//! --keep 24`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::api::client::{ApiClient, DEFAULT_API_URL};
use crate::cli::volume::path_segment;
use crate::cluster::snapshots::{DiffQuery, RestoreBody, SnapshotBody, SnapshotDiff, SnapshotInfo};
use crate::size::format_size;
use crate::volume::VolumeInfo;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The node API to talk to.
    #[arg(long, global = true, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
    pub api: String,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume, instantly and without
    /// copying data: every write acknowledged before it is in it, none
    /// after. Taken on every in-sync replica at the same point; readable
    /// (read-only) over NBD as `VOLUME@NAME` from any node holding a copy.
    Create {
        volume: String,
        /// Name: 1-63 of a-z 0-9 _ . - (first a letter or digit).
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List a volume's snapshots, oldest first.
    List {
        volume: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot. Its space is freed as far as neither the volume
    /// nor clones of it still use the same data.
    Delete { volume: String, name: String },
    /// The byte ranges of a volume that changed between two snapshots, or
    /// from a snapshot to now: what an incremental copy must move. Read
    /// from the storage maps (no data read); unchanged shared regions cost
    /// nothing to compare.
    Diff {
        volume: String,
        /// The earlier snapshot; without it every range holding data.
        #[arg(long)]
        from: Option<String>,
        /// The later snapshot; without it the volume as it is now.
        #[arg(long)]
        to: Option<String>,
        /// Machine-readable output (every range).
        #[arg(long)]
        json: bool,
    },
    /// Put a volume back to a snapshot: everything written since is gone
    /// (take another snapshot first to keep it). Refused while NBD clients
    /// are connected or the volume is attached to a host.
    Restore {
        volume: String,
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a snapshot command.
pub fn run(args: SnapshotArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api);
    match args.command {
        SnapshotCommand::Create { volume, name, json } => {
            let info: SnapshotInfo = client.post(
                &format!("/v1/volumes/{}/snapshots", path_segment(&volume)),
                &SnapshotBody { name },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "snapshot {}@{} taken ({}, on nodes {}); read it over NBD as {}@{}",
                    info.volume,
                    info.name,
                    format_size(info.size_bytes),
                    nodes(&info.holders),
                    info.volume,
                    info.name
                );
            }
        }
        SnapshotCommand::List { volume, json } => {
            let list: Vec<SnapshotInfo> = client.get(&format!("/v1/volumes/{}/snapshots", path_segment(&volume)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("volume {volume} has no snapshots");
            } else {
                println!(
                    "{:<32} {:>10} {:<20} {:<9} HOLDERS",
                    "SNAPSHOT", "SIZE", "CREATED (UTC)", "STATE"
                );
                for info in &list {
                    println!(
                        "{:<32} {:>10} {:<20} {:<9} {}",
                        format!("{}@{}", info.volume, info.name),
                        format_size(info.size_bytes),
                        utc(info.created_unix_seconds),
                        info.state,
                        nodes(&info.holders)
                    );
                }
            }
        }
        SnapshotCommand::Delete { volume, name } => {
            client.delete(&format!(
                "/v1/volumes/{}/snapshots/{}",
                path_segment(&volume),
                path_segment(&name)
            ))?;
            println!("deleted snapshot {volume}@{name}");
        }
        SnapshotCommand::Diff { volume, from, to, json } => {
            let path = DiffQuery { from, to }.path(&volume);
            let diff: SnapshotDiff = client.get(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&diff)?);
            } else {
                let side = |name: &Option<String>, none: &str| {
                    name.as_ref()
                        .map_or_else(|| none.to_owned(), |name| format!("{volume}@{name}"))
                };
                let ranges = diff.changed.len();
                println!(
                    "{} -> {}: {} changed in {ranges} range{} (of {})",
                    side(&diff.from, "nothing"),
                    side(&diff.to, "now"),
                    format_size(diff.changed_bytes),
                    if ranges == 1 { "" } else { "s" },
                    format_size(diff.size_bytes)
                );
                const SHOWN: usize = 20;
                for (offset, len) in diff.changed.iter().take(SHOWN) {
                    println!("  {offset:>16} +{}", format_size(*len));
                }
                if diff.changed.len() > SHOWN {
                    println!("  ... {} more (--json lists them all)", diff.changed.len() - SHOWN);
                }
            }
        }
        SnapshotCommand::Restore { volume, name, json } => {
            let info: VolumeInfo = client.post(
                &format!("/v1/volumes/{}/restore", path_segment(&volume)),
                &RestoreBody { snapshot: name.clone() },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("restored volume {volume} to snapshot {volume}@{name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn nodes(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
fn utc(unix: u64) -> String {
    // auto_name is `auto-YYYYMMDD-HHMMSS`: reuse its calendar arithmetic.
    let stamp = crate::cluster::snapshots::auto_name(unix);
    let digits = &stamp[crate::cluster::snapshots::AUTO_PREFIX.len()..];
    format!(
        "{}-{}-{} {}:{}:{}",
        &digits[0..4],
        &digits[4..6],
        &digits[6..8],
        &digits[9..11],
        &digits[11..13],
        &digits[13..15]
    )
}
