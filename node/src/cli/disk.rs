//! `ballast disk list | enroll | status | remove`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kernel_iface::device::{self, BlockDevice};
use serde::Serialize;

use crate::datadir::DataDir;
use crate::engine::{DiskSpec, Engine, EngineConfig};
use crate::enroll::{self, EnrollOptions};
use crate::size::{format_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// List every block device with its size and model, and why it can or cannot be enrolled.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print only the paths of eligible devices, one per line (for scripts).
        #[arg(long, conflicts_with = "json")]
        eligible: bool,
    },
    /// Format devices for ballast and add them to a node's data directory.
    ///
    /// Prints what it finds on each device first. Refuses a device that is
    /// mounted or held by LVM/MD/device-mapper (always), or that has
    /// partitions or a filesystem/RAID/LVM signature (unless --force, which
    /// destroys them). A path that does not exist becomes a regular file of
    /// --size bytes (for development and tests).
    Enroll(EnrollArgs),
    /// Empty a disk of a running node and stop using it: its volume and
    /// snapshot copies move to the node's other disks while clients keep
    /// using them (snapshots and clones that shared blocks there are copied
    /// in full), then the disk is forgotten. Prints progress until done; the
    /// node closes the disk at its next restart, after which it can be
    /// detached.
    Remove {
        /// The disk: its path or uuid (see `ballast node status`).
        disk: String,
        /// The running node's API.
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
        api: String,
        /// Start the drain and return at once (follow it in `ballast node status`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the enrolled disks of a (stopped) node: space used, segments, write amplification.
    Status {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The node's data directory (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Destroy partitions and signatures found on the devices.
    #[arg(long)]
    pub force: bool,
    /// Create missing paths as regular files of this size (e.g. 4GiB).
    #[arg(long)]
    pub size: Option<String>,
    /// Segment size: the unit of log writing and cleaning (1MiB..1GiB, power of two).
    #[arg(long, default_value = "8MiB")]
    pub segment_size: String,
    /// Do not discard (TRIM) the whole device before formatting it. By
    /// default enrollment tells the SSD that every block is free, so its
    /// garbage collection starts clean; skipped with a message on devices
    /// without discard support.
    #[arg(long, env = "BALLAST_NO_DISCARD")]
    pub no_discard: bool,
    /// Devices (or files) to enroll.
    #[arg(required = true)]
    pub devices: Vec<PathBuf>,
    /// When the node of --data-dir is running, it enrolls the devices
    /// itself through this API (and uses them at once).
    #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
    pub api: String,
}

/// Runs a disk command.
pub fn run(command: DiskCommand) -> Result<ExitCode> {
    match command {
        DiskCommand::List { json, eligible } => list(json, eligible),
        DiskCommand::Enroll(args) => enroll_all(&args),
        DiskCommand::Status { data_dir, json } => status(&data_dir, json),
        DiskCommand::Remove { disk, api, no_wait } => remove(&disk, &api, no_wait),
    }
}

fn remove(disk: &str, api: &str, no_wait: bool) -> Result<ExitCode> {
    use crate::api::NodeStatus;
    use crate::volume::drain::DrainStatus;
    let client = crate::api::client::ApiClient::new(api);
    let node: NodeStatus = client.get("/v1/node")?;
    let Some(found) = node
        .disks
        .iter()
        .find(|d| d.path == disk || d.disk_uuid.to_string() == disk)
    else {
        let known: Vec<String> = node
            .disks
            .iter()
            .map(|d| format!("{} ({})", d.path, d.disk_uuid))
            .collect();
        bail!(
            "the node at {api} has no disk {disk:?}; its disks: {}",
            known.join(", ")
        );
    };
    let uuid = found.disk_uuid;
    let started: DrainStatus = client.post(&format!("/v1/node/disks/{uuid}/remove"), &serde_json::json!({}))?;
    println!(
        "draining disk {} ({uuid}): {} volume/snapshot copies to move",
        started.path, started.copies_total
    );
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = String::new();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let node: NodeStatus = client.get("/v1/node")?;
        let Some(drain) = node.drains.iter().find(|d| d.disk_uuid == uuid) else {
            bail!("the node no longer reports the drain (restarted?); see `ballast node status`");
        };
        let line = format!(
            "{} of {} copies moved, {} copied",
            drain.copies_moved,
            drain.copies_total,
            format_size(drain.bytes_copied)
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match drain.state.as_str() {
            "removed" => {
                println!(
                    "disk {} removed: it holds no data and the node will not open it again; detach it after the node's next restart",
                    drain.path
                );
                return Ok(ExitCode::SUCCESS);
            }
            "failed" => {
                eprintln!("error: drain of {} failed: {}", drain.path, drain.error);
                eprintln!("the disk is in use again; fix the cause and run `ballast disk remove` again");
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
}

#[derive(Serialize)]
struct ListedDevice<'a> {
    name: &'a str,
    path: String,
    size_bytes: u64,
    logical_block_bytes: u32,
    physical_block_bytes: u32,
    rotational: bool,
    model: Option<&'a str>,
    serial: Option<&'a str>,
    backing_file: Option<&'a str>,
    signature: Option<&'static str>,
    mountpoints: &'a [String],
    holders: &'a [String],
    partitions: &'a [String],
    eligible: bool,
    reasons: Vec<String>,
}

fn listed(device: &BlockDevice) -> ListedDevice<'_> {
    let verdict = device::eligibility(device);
    ListedDevice {
        name: &device.name,
        path: device.path.display().to_string(),
        size_bytes: device.size_bytes,
        logical_block_bytes: device.logical_block_bytes,
        physical_block_bytes: device.physical_block_bytes,
        rotational: device.rotational,
        model: device.model.as_deref(),
        serial: device.serial.as_deref(),
        backing_file: device.backing_file.as_deref(),
        signature: device.signature.map(|s| s.describe()),
        mountpoints: &device.mountpoints,
        holders: &device.holders,
        partitions: &device.partitions,
        eligible: verdict.eligible,
        reasons: verdict.reasons,
    }
}

fn list(json: bool, eligible_only: bool) -> Result<ExitCode> {
    let devices = device::list_block_devices()?;
    let rows: Vec<ListedDevice<'_>> = devices.iter().map(listed).collect();
    if eligible_only {
        for row in rows.iter().filter(|row| row.eligible) {
            println!("{}", row.path);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:>10} {:<5} {:<22} {:<9} WHY",
        "DEVICE", "SIZE", "TYPE", "MODEL", "ELIGIBLE"
    );
    for row in &rows {
        let kind = if row.rotational { "hdd" } else { "ssd" };
        let model = row.model.or(row.backing_file).unwrap_or("-");
        let why = if row.eligible {
            "unused, no signature".to_owned()
        } else {
            row.reasons.join("; ")
        };
        println!(
            "{:<10} {:>10} {:<5} {:<22} {:<9} {}",
            row.name,
            format_size(row.size_bytes),
            kind,
            truncate(model, 22),
            if row.eligible { "yes" } else { "no" },
            why
        );
    }
    if rows.is_empty() {
        println!("(no block devices found)");
    }
    Ok(ExitCode::SUCCESS)
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let kept: String = text
            .chars()
            .rev()
            .take(width - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{kept}")
    }
}

fn enroll_all(args: &EnrollArgs) -> Result<ExitCode> {
    let options = EnrollOptions {
        force: args.force,
        create_size_bytes: args.size.as_deref().map(parse_size).transpose()?,
        segment_size_bytes: parse_size(&args.segment_size)?,
        discard: !args.no_discard,
    };
    let data = match DataDir::open(&args.data_dir, true) {
        Err(crate::datadir::DataDirError::Locked(_)) => return enroll_online(args, &options),
        other => other?,
    };
    println!(
        "node {} (data directory {})",
        data.node.node_uuid,
        args.data_dir.display()
    );
    let mut failures = 0;
    for path in &args.devices {
        if let Err(error) = enroll::enroll(&data, path, &options) {
            eprintln!("error: {error}");
            failures += 1;
        }
    }
    if failures > 0 {
        bail!("{failures} of {} devices were not enrolled", args.devices.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The node of the data directory is running: it enrolls each device and
/// opens it at once (pool expansion without a restart).
fn enroll_online(args: &EnrollArgs, options: &EnrollOptions) -> Result<ExitCode> {
    let token = std::fs::read_to_string(args.data_dir.join(crate::api::auth::ADMIN_TOKEN_FILE))
        .ok()
        .map(|text| text.trim().to_owned())
        .or_else(|| crate::api::auth::cli_token(&args.api));
    let client = crate::api::client::ApiClient::new(&args.api).with_token(token);
    println!(
        "the node of {} is running: enrolling through its API ({})",
        args.data_dir.display(),
        args.api
    );
    let mut failures = 0;
    for path in &args.devices {
        let path = if path.is_relative() {
            std::env::current_dir()?.join(path)
        } else {
            path.clone()
        };
        let body = crate::api::EnrollBody {
            path: path.clone(),
            force: options.force,
            create_size_bytes: options.create_size_bytes,
            segment_size_bytes: options.segment_size_bytes,
            no_discard: !options.discard,
        };
        match client.post::<_, crate::datadir::DiskRecord>("/v1/node/disks", &body) {
            Ok(record) => println!(
                "enrolled {} ({}, disk {}) into the running node: new volumes may use it now",
                record.path.display(),
                format_size(record.size_bytes),
                record.disk_uuid
            ),
            Err(error) => {
                eprintln!("error: {}: {error}", path.display());
                failures += 1;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} devices were not enrolled", args.devices.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct DiskStatus {
    path: String,
    disk_uuid: String,
    size_bytes: u64,
    capacity_bytes: u64,
    used_bytes: u64,
    segments: u32,
    free_segments: u32,
    volumes: usize,
    engine: &'static str,
}

fn status(data_dir: &std::path::Path, json: bool) -> Result<ExitCode> {
    let data = DataDir::open(data_dir, false)?;
    let records = data.disks()?;
    if records.is_empty() {
        bail!(
            "{} has no enrolled disks; enroll one with `ballast disk enroll --data-dir {} DEVICE`",
            data_dir.display(),
            data_dir.display()
        );
    }
    let specs: Vec<DiskSpec> = records.iter().map(|r| DiskSpec { path: r.path.clone() }).collect();
    let engine = Engine::start(&specs, &EngineConfig::new(*data.node.node_uuid.as_bytes()))?;
    let mut rows = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let (space, volumes) = engine.query(index, |store| (store.space(), store.volume_ids().len()))?;
        rows.push(DiskStatus {
            path: record.path.display().to_string(),
            disk_uuid: record.disk_uuid.to_string(),
            size_bytes: record.size_bytes,
            capacity_bytes: space.capacity_blocks * 4096,
            used_bytes: space.used_blocks * 4096,
            segments: space.segment_count,
            free_segments: space.free_segments,
            volumes,
            engine: engine.disks()[index].engine_kind,
        });
    }
    engine.shutdown();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("node {}", data.node.node_uuid);
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>13} {:>7}",
            "DISK", "SIZE", "CAPACITY", "USED", "FREE SEGMENTS", "VOLUMES"
        );
        for row in &rows {
            println!(
                "{:<24} {:>10} {:>10} {:>10} {:>6}/{:<6} {:>7}",
                truncate(&row.path, 24),
                format_size(row.size_bytes),
                format_size(row.capacity_bytes),
                format_size(row.used_bytes),
                row.free_segments,
                row.segments,
                row.volumes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
