//! Raw device discovery and exclusive open.
//!
//! `list_block_devices` describes every whole disk of the host (size, block
//! sizes, model, serial, partitions, holders, mounts, what is on it);
//! `eligibility` says whether ballast may take it and why not;
//! `describe_path` does the same for one path (block device, partition or
//! regular file); `open_exclusive` opens a device so nothing else can.

mod open;
pub mod signature;
mod sysfs;

use std::fs::File;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use open::{open_exclusive, OpenedDevice};
pub use signature::Signature;

/// Smallest device ballast will enroll.
pub const DEVICE_BYTES_MIN: u64 = 64 << 20;

/// Errors describing or opening devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// the path does not exist
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    /// another user holds the device
    #[error("{path} is busy: is it mounted or used by another process? see `ballast disk list`")]
    Busy { path: PathBuf },
    /// the filesystem holding a file-backed disk refuses O_DIRECT
    #[error("{path}: its filesystem does not support O_DIRECT (tmpfs?); put the file on ext4 or xfs")]
    DirectIoUnsupported { path: PathBuf },
    /// not a block device or regular file
    #[error("{path} is neither a block device nor a regular file")]
    NotADisk { path: PathBuf },
    /// any other I/O failure
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One whole disk (or, from `describe_path`, a partition) of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub partitions: Vec<String>,
    pub holders: Vec<String>,
    pub mountpoints: Vec<String>,
    pub signature: Option<Signature>,
    pub probe_error: Option<String>,
    pub backing_file: Option<String>,
    pub is_partition: bool,
}

/// Whether ballast may enroll a device, and every reason it may not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eligibility {
    pub eligible: bool,
    pub reasons: Vec<String>,
}

/// Decides eligibility. Each reason is one human-readable phrase.
#[must_use]
pub fn eligibility(device: &BlockDevice) -> Eligibility {
    let mut reasons = Vec::new();
    if !device.mountpoints.is_empty() {
        reasons.push(format!("mounted at {}", device.mountpoints.join(", ")));
    }
    if !device.holders.is_empty() {
        reasons.push(format!("in use by holders {}", device.holders.join(", ")));
    }
    if !device.partitions.is_empty() {
        reasons.push(format!("has partitions {}", device.partitions.join(", ")));
    }
    match device.signature {
        Some(Signature::Ballast) => reasons.push("already enrolled (ballast disk)".into()),
        Some(signature) => reasons.push(format!("holds a {}", signature.describe())),
        None => {}
    }
    if let Some(error) = &device.probe_error {
        reasons.push(format!("cannot be read to check its contents ({error})"));
    }
    if device.read_only {
        reasons.push("read-only".into());
    }
    if device.size_bytes < DEVICE_BYTES_MIN {
        reasons.push(format!("too small ({} bytes; at least 64 MiB)", device.size_bytes));
    }
    Eligibility {
        eligible: reasons.is_empty(),
        reasons,
    }
}

/// Every whole disk of the host, sorted by name. RAM disks and detached
/// loop devices are left out.
pub fn list_block_devices() -> Result<Vec<BlockDevice>, DeviceError> {
    let root = Path::new(sysfs::SYS_BLOCK);
    let entries = std::fs::read_dir(root).map_err(|source| DeviceError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mounts = sysfs::mounts_by_device();
    let mut devices = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        let dir = entry.path();
        if name.starts_with("loop") && !dir.join("loop/backing_file").exists() {
            continue;
        }
        devices.push(describe_sysfs(&name, &dir, &mounts, false));
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

fn describe_sysfs(
    name: &str,
    dir: &Path,
    mounts: &std::collections::HashMap<(u32, u32), Vec<String>>,
    is_partition: bool,
) -> BlockDevice {
    let queue = |attribute: &str| sysfs::number(&dir.join("queue").join(attribute));
    let whole = if is_partition { dir.parent().unwrap_or(dir) } else { dir };
    let partitions = if is_partition {
        Vec::new()
    } else {
        sysfs::partitions(dir)
    };
    let mut holders = sysfs::holders(dir);
    let mut mountpoints = sysfs::dev_number(dir)
        .and_then(|n| mounts.get(&n).cloned())
        .unwrap_or_default();
    for partition in &partitions {
        let partition_dir = dir.join(partition);
        holders.extend(sysfs::holders(&partition_dir));
        if let Some(points) = sysfs::dev_number(&partition_dir).and_then(|n| mounts.get(&n)) {
            mountpoints.extend(points.iter().map(|point| format!("{point} (via {partition})")));
        }
    }
    let size_bytes = sysfs::number(&dir.join("size")).unwrap_or(0) * 512;
    let path = PathBuf::from("/dev").join(name);
    let (signature, probe_error) = match File::open(&path) {
        Ok(file) if size_bytes > 0 => match signature::probe_signature(&file, size_bytes) {
            Ok(signature) => (signature, None),
            Err(error) => (None, Some(error.to_string())),
        },
        Ok(_) => (None, None),
        Err(error) => (None, Some(error.to_string())),
    };
    BlockDevice {
        name: name.to_owned(),
        path,
        size_bytes,
        logical_block_bytes: u32::try_from(queue("logical_block_size").unwrap_or(512)).unwrap_or(512),
        physical_block_bytes: u32::try_from(queue("physical_block_size").unwrap_or(512)).unwrap_or(512),
        rotational: whole.join("queue/rotational").exists()
            && sysfs::number(&whole.join("queue/rotational")) == Some(1),
        removable: sysfs::number(&whole.join("removable")) == Some(1),
        read_only: sysfs::number(&dir.join("ro")) == Some(1),
        model: sysfs::attribute(&whole.join("device/model")),
        serial: sysfs::attribute(&whole.join("device/serial")).or_else(|| sysfs::attribute(&whole.join("serial"))),
        partitions,
        holders,
        mountpoints,
        signature,
        probe_error,
        backing_file: sysfs::attribute(&dir.join("loop/backing_file")),
        is_partition,
    }
}

/// What `describe_path` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathReport {
    /// A block device (whole disk or partition).
    Block(Box<BlockDevice>),
    /// A regular file used as a disk.
    File {
        path: PathBuf,
        size_bytes: u64,
        signature: Option<Signature>,
    },
}

impl PathReport {
    /// Size in bytes.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        match self {
            Self::Block(device) => device.size_bytes,
            Self::File { size_bytes, .. } => *size_bytes,
        }
    }

    /// Eligibility, as for a listed device.
    #[must_use]
    pub fn eligibility(&self) -> Eligibility {
        match self {
            Self::Block(device) => eligibility(device),
            Self::File {
                path,
                size_bytes,
                signature,
            } => eligibility(&BlockDevice {
                name: path.display().to_string(),
                path: path.clone(),
                size_bytes: *size_bytes,
                logical_block_bytes: 512,
                physical_block_bytes: 4096,
                rotational: false,
                removable: false,
                read_only: false,
                model: None,
                serial: None,
                partitions: Vec::new(),
                holders: Vec::new(),
                mountpoints: Vec::new(),
                signature: *signature,
                probe_error: None,
                backing_file: None,
                is_partition: false,
            }),
        }
    }

    /// One line saying what the path is.
    #[must_use]
    pub fn summary(&self) -> String {
        let gib = |bytes: u64| format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30));
        let contents = |signature: &Option<Signature>| {
            signature.map_or("no known signature".to_owned(), |s| s.describe().to_owned())
        };
        match self {
            Self::Block(device) => format!(
                "{} {}, {}{}{}, {}",
                if device.is_partition {
                    "partition"
                } else {
                    "block device"
                },
                device.name,
                gib(device.size_bytes),
                device
                    .model
                    .as_ref()
                    .map(|m| format!(", model {m}"))
                    .unwrap_or_default(),
                device
                    .backing_file
                    .as_ref()
                    .map(|b| format!(", backed by {b}"))
                    .unwrap_or_default(),
                contents(&device.signature),
            ),
            Self::File {
                size_bytes, signature, ..
            } => format!("regular file, {}, {}", gib(*size_bytes), contents(signature)),
        }
    }
}

/// Describes one path: a block device (found in sysfs by its device
/// number, so /dev/disk/by-id links work), a partition, or a regular file.
pub fn describe_path(path: &Path) -> Result<PathReport, DeviceError> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DeviceError::NotFound { path: path.to_owned() },
        _ => DeviceError::Io {
            path: path.to_owned(),
            source,
        },
    })?;
    if metadata.file_type().is_file() {
        let size_bytes = metadata.len();
        let file = File::open(path).map_err(|source| DeviceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let signature = if size_bytes == 0 {
            None
        } else {
            signature::probe_signature(&file, size_bytes).map_err(|source| DeviceError::Io {
                path: path.to_owned(),
                source,
            })?
        };
        return Ok(PathReport::File {
            path: path.to_owned(),
            size_bytes,
            signature,
        });
    }
    if !metadata.file_type().is_block_device() {
        return Err(DeviceError::NotADisk { path: path.to_owned() });
    }
    let number = sysfs::block_number_of(path).ok_or_else(|| DeviceError::NotADisk { path: path.to_owned() })?;
    let dir = sysfs::sysfs_dir_of(number).ok_or_else(|| DeviceError::NotFound { path: path.to_owned() })?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_partition = dir.join("partition").exists();
    Ok(PathReport::Block(Box::new(describe_sysfs(
        &name,
        &dir,
        &sysfs::mounts_by_device(),
        is_partition,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> BlockDevice {
        BlockDevice {
            name: "loop0".into(),
            path: "/dev/loop0".into(),
            size_bytes: 1 << 30,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
            rotational: false,
            removable: false,
            read_only: false,
            model: None,
            serial: None,
            partitions: Vec::new(),
            holders: Vec::new(),
            mountpoints: Vec::new(),
            signature: None,
            probe_error: None,
            backing_file: None,
            is_partition: false,
        }
    }

    #[test]
    fn an_empty_unused_disk_is_eligible() {
        assert_eq!(
            eligibility(&healthy()),
            Eligibility {
                eligible: true,
                reasons: vec![]
            }
        );
    }

    #[test]
    fn every_problem_is_named() {
        let mut device = healthy();
        device.mountpoints = vec!["/data".into()];
        device.holders = vec!["dm-0".into()];
        device.partitions = vec!["loop0p1".into()];
        device.signature = Some(Signature::Ext);
        device.read_only = true;
        device.size_bytes = 1 << 20;
        let verdict = eligibility(&device);
        assert!(!verdict.eligible);
        let text = verdict.reasons.join("; ");
        for needle in [
            "mounted at /data",
            "dm-0",
            "loop0p1",
            "ext2/3/4",
            "read-only",
            "too small",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn a_ballast_disk_is_reported_as_already_enrolled() {
        let mut device = healthy();
        device.signature = Some(Signature::Ballast);
        assert_eq!(
            eligibility(&device).reasons,
            vec!["already enrolled (ballast disk)".to_owned()]
        );
    }

    #[test]
    fn listing_devices_works_on_this_host() {
        let devices = list_block_devices().unwrap();
        assert!(devices
            .iter()
            .all(|d| !d.name.starts_with("ram") && !d.name.starts_with("zram")));
    }

    #[test]
    fn describing_a_missing_path_says_not_found() {
        assert!(matches!(
            describe_path(Path::new("/nonexistent/disk")),
            Err(DeviceError::NotFound { .. })
        ));
    }
}
