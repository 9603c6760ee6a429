//! Enrolling a disk: check what is on it, refuse what would destroy data
//! (unless forced), wipe old signatures, format, verify, record.

use std::path::{Path, PathBuf};

use disk_layout::geometry::Geometry;
use disk_layout::store::{FormatParams, StoreConfig};
use disk_layout::{IoBuf, Store};
use kernel_iface::device::{self, PathReport};
use kernel_iface::{EngineChoice, IoEngine};
use thiserror::Error;

use crate::datadir::{now_unix_seconds, DataDir, DataDirError, DiskRecord};
use crate::engine::disk_io::DiskIo;
use crate::size::format_size;

/// Bytes zeroed at the start and end of a disk before formatting, so old
/// partition tables and RAID/LVM labels (some live at the end) are gone.
const WIPE_BYTES: u64 = 1 << 20;

/// Why a disk was not enrolled.
#[derive(Debug, Error)]
pub enum EnrollError {
    /// the device is in use and can never be enrolled while it is
    #[error("refusing {path}: {reasons}; {hint}")]
    InUse {
        path: PathBuf,
        reasons: String,
        hint: &'static str,
    },
    /// the device holds data; --force would destroy it
    #[error("refusing {path}: {reasons}; rerun with --force to destroy it")]
    HoldsData { path: PathBuf, reasons: String },
    /// the path is missing
    #[error("{path} does not exist; to use a regular file as a disk, give --size (e.g. --size 10GiB)")]
    Missing { path: PathBuf },
    /// describing or opening the device failed
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    /// formatting failed
    #[error("formatting {path} failed: {reason}")]
    Format { path: PathBuf, reason: String },
    /// the data directory could not be updated
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// creating the backing file failed
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
}

/// Segment size of a disk enrolled without one given (`disk enroll`'s
/// default, the API's, the managed plugin's).
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// How to enroll.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    pub force: bool,
    /// Create a regular file of this size when the path does not exist.
    pub create_size_bytes: Option<u64>,
    pub segment_size_bytes: u64,
    /// Discard the whole device before formatting (the SSD starts with
    /// every block free); skipped with a message where unsupported.
    pub discard: bool,
}

/// What was found on a device and what enrolling it does.
#[derive(Clone, Debug)]
pub struct Findings {
    pub summary: String,
    /// Reasons that forbid enrollment even with --force (mounted, held).
    pub in_use: Vec<String>,
    /// Data that --force would destroy (signatures, partitions).
    pub would_destroy: Vec<String>,
    pub size_bytes: u64,
}

/// Inspects `path` without changing it.
pub fn inspect(path: &Path) -> Result<Findings, EnrollError> {
    let report = device::describe_path(path)?;
    Ok(findings_of(&report))
}

fn findings_of(report: &PathReport) -> Findings {
    let eligibility = report.eligibility();
    Findings {
        summary: report.summary(),
        in_use: eligibility.in_use,
        would_destroy: eligibility.would_destroy,
        size_bytes: report.size_bytes(),
    }
}

/// Enrolls one device into `data`: checks, wipes, formats, verifies, records.
pub fn enroll(data: &DataDir, path: &Path, options: &EnrollOptions) -> Result<DiskRecord, EnrollError> {
    if !path.exists() {
        let Some(size) = options.create_size_bytes else {
            return Err(EnrollError::Missing { path: path.to_owned() });
        };
        create_file(path, size)?;
        println!("created {} ({})", path.display(), format_size(size));
    }
    let findings = inspect(path)?;
    println!("found {}: {}", path.display(), findings.summary);
    if !findings.in_use.is_empty() {
        return Err(EnrollError::InUse {
            path: path.to_owned(),
            reasons: findings.in_use.join("; "),
            hint: "unmount it or stop what uses it, then retry",
        });
    }
    if !findings.would_destroy.is_empty() {
        if !options.force {
            return Err(EnrollError::HoldsData {
                path: path.to_owned(),
                reasons: findings.would_destroy.join("; "),
            });
        }
        println!(
            "destroying on {}: {}",
            path.display(),
            findings.would_destroy.join("; ")
        );
    }
    let geometry =
        Geometry::compute(findings.size_bytes, options.segment_size_bytes).map_err(|error| EnrollError::Format {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    let disk_uuid = uuid::Uuid::new_v4();
    let capacity_blocks = format_device(path, data, disk_uuid, &findings, options)?;
    let record = DiskRecord {
        path: path.to_owned(),
        disk_uuid,
        size_bytes: findings.size_bytes,
        segment_size_bytes: options.segment_size_bytes,
        enrolled_unix_seconds: now_unix_seconds(),
    };
    data.add_disk(record.clone())?;
    let capacity = capacity_blocks * disk_layout::geometry::BLOCK_SIZE_BYTES;
    println!(
        "enrolled {} as disk {disk_uuid}: {}, {} segments of {}, about {} for data",
        path.display(),
        format_size(findings.size_bytes),
        geometry.segment_count,
        format_size(options.segment_size_bytes),
        format_size(capacity)
    );
    Ok(record)
}

fn create_file(path: &Path, size_bytes: u64) -> Result<(), EnrollError> {
    let create = |source| EnrollError::Create {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(create)?;
    file.set_len(size_bytes).map_err(create)?;
    file.sync_all().map_err(create)
}

fn format_device(
    path: &Path,
    data: &DataDir,
    disk_uuid: uuid::Uuid,
    findings: &Findings,
    options: &EnrollOptions,
) -> Result<u64, EnrollError> {
    let (size_bytes, segment_size_bytes) = (findings.size_bytes, options.segment_size_bytes);
    let format_error = |reason: String| EnrollError::Format {
        path: path.to_owned(),
        reason,
    };
    let opened = device::open_exclusive(path, true)?;
    let discard_refused = options
        .discard
        .then(|| device::discard_unsupported_reason(&opened))
        .flatten();
    let mut engine: Box<dyn IoEngine<IoBuf>> =
        kernel_iface::open_engine(vec![opened.file], EngineChoice::Auto).map_err(|e| format_error(e.to_string()))?;
    let mut io = DiskIo {
        engine: engine.as_mut(),
        file: 0,
    };
    match (options.discard, discard_refused) {
        (false, _) => println!("not discarding {} (--no-discard)", path.display()),
        (true, Some(reason)) => println!("not discarding {}: {reason}", path.display()),
        (true, None) => discard_whole(&mut io, path, size_bytes),
    }
    wipe(&mut io, size_bytes).map_err(|e| format_error(e.to_string()))?;
    let params = FormatParams {
        disk_size_bytes: size_bytes,
        segment_size_bytes,
        cluster_uuid: data.node.cluster_uuid.map_or([0; 16], |uuid| *uuid.as_bytes()),
        node_uuid: *data.node.node_uuid.as_bytes(),
        disk_uuid: *disk_uuid.as_bytes(),
        created_unix_seconds: now_unix_seconds(),
    };
    let name = path.display().to_string();
    Store::format(&mut io, &params, &name).map_err(|e| format_error(e.to_string()))?;
    // Prove the disk opens before recording it.
    let config = StoreConfig::new(name, Some(params.node_uuid), 1);
    let store = Store::open(&mut io, config).map_err(|e| format_error(format!("does not open after format: {e}")))?;
    Ok(store.space().capacity_blocks)
}

/// Discards in pieces of this size, so progress shows on large devices.
const DISCARD_PIECE_BYTES: u64 = 1 << 30;
/// Progress is printed at most this often.
const DISCARD_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the device that every block is free (before formatting, so an SSD
/// starts with nothing to keep). A refusal or failure ends it with a
/// message: the disk works without it.
fn discard_whole(io: &mut DiskIo<'_>, path: &Path, size_bytes: u64) {
    use disk_layout::io::{run_one, IoOp};
    let end = size_bytes / 4096 * 4096;
    let started = std::time::Instant::now();
    let mut last_report = started;
    println!(
        "discarding all {} of {} (the SSD learns that every block is free)",
        format_size(end),
        path.display()
    );
    let mut offset_bytes = 0;
    while offset_bytes < end {
        let len_bytes = DISCARD_PIECE_BYTES.min(end - offset_bytes);
        if let Err(fault) = run_one(
            io,
            1,
            IoOp::Discard {
                offset_bytes,
                len_bytes,
            },
        )
        .result
        {
            println!(
                "the device refused a discard at {} ({fault}): enrolling without it",
                format_size(offset_bytes)
            );
            return;
        }
        offset_bytes += len_bytes;
        if last_report.elapsed() >= DISCARD_PROGRESS_EVERY && offset_bytes < end {
            last_report = std::time::Instant::now();
            println!(
                "  discarded {} of {} ({} %)",
                format_size(offset_bytes),
                format_size(end),
                offset_bytes * 100 / end
            );
        }
    }
    println!(
        "discarded {} in {:.1} s",
        format_size(end),
        started.elapsed().as_secs_f64()
    );
}

/// Zeroes the first and last `WIPE_BYTES` of the device.
fn wipe(io: &mut DiskIo<'_>, size_bytes: u64) -> Result<(), disk_layout::IoFault> {
    use disk_layout::io::{run_one, IoOp};
    let len = WIPE_BYTES.min(size_bytes / 2) / 4096 * 4096;
    let tail = (size_bytes - len) / 4096 * 4096;
    for offset_bytes in [0, tail] {
        let buf = IoBuf::new(usize::try_from(len).expect("1 MiB"));
        run_one(io, 1, IoOp::Write { offset_bytes, buf }).result?;
    }
    run_one(io, 1, IoOp::Flush).result
}
