//! Raw device discovery and exclusive open.
//!
//! `list_block_devices` describes every whole disk of the host (size, block
//! sizes, model, serial, partitions, holders, mounts, what is on it);
//! `eligibility` says whether ballast may take it and why not;
//! `describe_path` does the same for one path (block device, partition or
//! regular file); `open_exclusive` opens a device so nothing else can.
//!
//! Files: `sysfs` reads /sys, `mounts` parses /proc mount and swap tables,
//! `signature` (with `zfs_label`) recognises contents from raw bytes,
//! `report` describes a single path, `open` does the exclusive open.

mod mounts;
mod open;
mod report;
pub mod signature;
mod sysfs;
mod zfs_label;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use open::{discard_unsupported_reason, open_exclusive, OpenedDevice};
pub use report::{describe_path, PathReport};
pub use signature::Signature;

/// Smallest device ballast will enroll.
pub const DEVICE_BYTES_MIN: u64 = 64 << 20;

/// Most whole disks `list_block_devices` reports; beyond this the rest are
/// logged and left out (a bound on the walk, far above any real server).
pub const DEVICES_MAX: usize = 4096;

/// Errors describing or opening devices. Each names the path and says why.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// the path does not exist
    #[error("{path} does not exist (see `ballast disk list` for the disks of this host)")]
    NotFound { path: PathBuf },
    /// another user holds the device: mounted, part of LVM/MD/dm, or opened
    /// exclusively (or flock'ed, for a file) by another process
    #[error("{path} is busy: is it mounted or used by another process? see `ballast disk list`")]
    Busy { path: PathBuf },
    /// the filesystem holding a file-backed disk refuses O_DIRECT
    #[error("{path}: its filesystem does not support O_DIRECT (tmpfs?); put the file on ext4 or xfs")]
    DirectIoUnsupported { path: PathBuf },
    /// not a block device or regular file
    #[error(
        "{path} is neither a block device nor a regular file; give a disk such as /dev/nvme0n1, a partition, or a file"
    )]
    NotADisk { path: PathBuf },
    /// the device or its filesystem is read-only
    #[error("{path} is read-only; ballast needs to write to it")]
    ReadOnly { path: PathBuf },
    /// opening needs privileges this process lacks
    #[error("permission denied opening {path}; run as root (or a member of the disk group)")]
    PermissionDenied { path: PathBuf },
    /// a block device node with no matching sysfs entry
    #[error("{path} is block device {major}:{minor}, which has no entry under /sys/dev/block; is sysfs mounted?")]
    NotInSysfs { path: PathBuf, major: u32, minor: u32 },
    /// any other I/O failure
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl DeviceError {
    /// True when something else is using the device (retrying later, after
    /// unmounting or stopping the user, may succeed).
    #[must_use]
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy { .. })
    }

    /// The path the error is about.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            Self::NotFound { path }
            | Self::Busy { path }
            | Self::DirectIoUnsupported { path }
            | Self::NotADisk { path }
            | Self::ReadOnly { path }
            | Self::PermissionDenied { path }
            | Self::NotInSysfs { path, .. }
            | Self::Io { path, .. } => path,
        }
    }
}

/// One whole disk (or, from `describe_path`, a partition) of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name ("nvme0n1", "loop3", "sda1").
    pub name: String,
    /// Device node ("/dev/nvme0n1").
    pub path: PathBuf,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    pub physical_block_bytes: u32,
    pub rotational: bool,
    pub removable: bool,
    pub read_only: bool,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Partition names of a whole disk (empty for a partition).
    pub partitions: Vec<String>,
    /// Users stacked on the device or its partitions (dm-N, mdN, bcacheN),
    /// a partition's marked "(via sda1)".
    pub holders: Vec<String>,
    /// Where it or its partitions are mounted; "[SWAP]" for active swap.
    pub mountpoints: Vec<String>,
    /// What its first and last bytes hold; `None` if nothing known, or if
    /// the probe failed (then `probe_error` says why).
    pub signature: Option<Signature>,
    pub probe_error: Option<String>,
    /// For a loop device, the file behind it.
    pub backing_file: Option<String>,
    pub is_partition: bool,
}

/// Whether ballast may enroll a device, and every reason it may not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eligibility {
    pub eligible: bool,
    /// Every reason, for display.
    pub reasons: Vec<String>,
    /// Reasons `--force` must never override: the device is in use or unusable.
    pub in_use: Vec<String>,
    /// Reasons `--force` overrides by destroying what is there.
    pub would_destroy: Vec<String>,
}

/// Decides eligibility. Each reason is one human-readable phrase, filed as
/// `in_use` (never overridden) or `would_destroy` (overridden by --force).
#[must_use]
pub fn eligibility(device: &BlockDevice) -> Eligibility {
    let mut in_use = Vec::new();
    let mut would_destroy = Vec::new();
    if !device.mountpoints.is_empty() {
        in_use.push(format!("mounted at {}", device.mountpoints.join(", ")));
    }
    if !device.holders.is_empty() {
        in_use.push(format!("in use by holders {}", device.holders.join(", ")));
    }
    if !device.partitions.is_empty() {
        would_destroy.push(format!("has partitions {}", device.partitions.join(", ")));
    }
    match device.signature {
        Some(Signature::Ballast) => would_destroy.push("already enrolled (ballast disk)".into()),
        Some(signature) => would_destroy.push(format!("holds an existing {}", signature.describe())),
        None => {}
    }
    if let Some(error) = &device.probe_error {
        // Unknown contents: never enroll what could not be read, even forced.
        in_use.push(format!("contents could not be probed ({error})"));
    }
    if device.read_only {
        in_use.push("read-only".into());
    }
    if device.size_bytes < DEVICE_BYTES_MIN {
        in_use.push(format!(
            "too small ({} bytes; at least {} MiB)",
            device.size_bytes,
            DEVICE_BYTES_MIN >> 20
        ));
    }
    debug_assert!(device.probe_error.is_none() || device.signature.is_none());
    let reasons: Vec<String> = in_use.iter().chain(&would_destroy).cloned().collect();
    Eligibility {
        eligible: reasons.is_empty(),
        reasons,
        in_use,
        would_destroy,
    }
}

/// Every whole disk of the host, sorted by name. RAM disks, detached loop
/// devices and hidden multipath path devices are left out. Each listed
/// device is read (its first and last 128 KiB) to see what it holds.
pub fn list_block_devices() -> Result<Vec<BlockDevice>, DeviceError> {
    let root = Path::new(sysfs::SYS_BLOCK);
    let entries = std::fs::read_dir(root).map_err(|source| DeviceError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mounts = mounts::current();
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DeviceError::Io {
            path: root.to_owned(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if !sysfs::is_listed_disk(&name, &dir) {
            continue;
        }
        if devices.len() == DEVICES_MAX {
            tracing::warn!(
                devices_max = DEVICES_MAX,
                "more block devices than ballast lists; the rest are left out"
            );
            break;
        }
        devices.push(sysfs::describe(&name, &dir, &mounts, false));
    }
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn healthy() -> BlockDevice {
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
                reasons: vec![],
                in_use: vec![],
                would_destroy: vec![],
            }
        );
    }

    #[test]
    fn every_problem_is_named() {
        let mut device = healthy();
        device.mountpoints = vec!["/data".into(), "[SWAP]".into()];
        device.holders = vec!["dm-0".into()];
        device.partitions = vec!["loop0p1".into()];
        device.signature = Some(Signature::Ext);
        device.read_only = true;
        device.size_bytes = 1 << 20;
        let verdict = eligibility(&device);
        assert!(!verdict.eligible);
        assert_eq!(verdict.reasons.len(), 6, "{:?}", verdict.reasons);
        let text = verdict.reasons.join("; ");
        for needle in [
            "mounted at /data, [SWAP]",
            "holders dm-0",
            "partitions loop0p1",
            "holds an existing ext2/3/4 filesystem",
            "read-only",
            "too small (1048576 bytes; at least 64 MiB)",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn each_problem_alone_makes_a_disk_ineligible() {
        let problems: [fn(&mut BlockDevice); 7] = [
            |d| d.mountpoints = vec!["/x".into()],
            |d| d.holders = vec!["md0".into()],
            |d| d.partitions = vec!["loop0p1".into()],
            |d| d.signature = Some(Signature::Swap),
            |d| d.probe_error = Some("EIO".into()),
            |d| d.read_only = true,
            |d| d.size_bytes = DEVICE_BYTES_MIN - 1,
        ];
        for (index, problem) in problems.iter().enumerate() {
            let mut device = healthy();
            problem(&mut device);
            let verdict = eligibility(&device);
            assert!(!verdict.eligible, "problem {index}");
            assert_eq!(verdict.reasons.len(), 1, "problem {index}: {:?}", verdict.reasons);
        }
        let mut exact = healthy();
        exact.size_bytes = DEVICE_BYTES_MIN;
        assert!(eligibility(&exact).eligible, "64 MiB exactly is enough");
    }

    #[test]
    fn a_failed_probe_is_a_reason_that_names_the_error() {
        let mut device = healthy();
        device.probe_error = Some("/dev/loop0: Input/output error".into());
        assert_eq!(
            eligibility(&device).reasons,
            vec!["contents could not be probed (/dev/loop0: Input/output error)".to_owned()]
        );
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
    fn listing_leaves_out_ram_disks_and_detached_loops() {
        let devices = list_block_devices().unwrap();
        assert!(devices
            .iter()
            .all(|d| !d.name.starts_with("ram") && !d.name.starts_with("zram")));
        assert!(devices
            .iter()
            .filter(|d| d.name.starts_with("loop"))
            .all(|d| d.backing_file.is_some()));
        assert!(devices.windows(2).all(|pair| pair[0].name < pair[1].name), "sorted");
    }

    #[test]
    fn every_error_names_its_path() {
        let path = PathBuf::from("/dev/sdz");
        let errors = [
            DeviceError::NotFound { path: path.clone() },
            DeviceError::Busy { path: path.clone() },
            DeviceError::DirectIoUnsupported { path: path.clone() },
            DeviceError::NotADisk { path: path.clone() },
            DeviceError::ReadOnly { path: path.clone() },
            DeviceError::PermissionDenied { path: path.clone() },
            DeviceError::NotInSysfs {
                path: path.clone(),
                major: 8,
                minor: 240,
            },
            DeviceError::Io {
                path: path.clone(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            },
        ];
        for error in &errors {
            assert!(error.to_string().contains("/dev/sdz"), "{error}");
            assert_eq!(error.path(), path);
        }
        assert!(errors[1].is_busy());
        assert!(errors[1].to_string().contains("ballast disk list"));
        assert!(!errors[0].is_busy());
    }
}

#[cfg(test)]
mod force_tests {
    use super::*;

    fn device() -> BlockDevice {
        BlockDevice {
            name: "loop9".into(),
            path: "/dev/loop9".into(),
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
    fn data_on_a_disk_is_forceable_but_use_of_it_is_not() {
        let mut stale_swap = device();
        stale_swap.signature = Some(Signature::Swap);
        stale_swap.partitions = vec!["loop9p1".into()];
        let verdict = eligibility(&stale_swap);
        assert!(verdict.in_use.is_empty(), "{:?}", verdict.in_use);
        assert_eq!(verdict.would_destroy.len(), 2);
        let mut busy = device();
        busy.mountpoints = vec!["[SWAP]".into()];
        busy.probe_error = Some("EIO".into());
        busy.read_only = true;
        let verdict = eligibility(&busy);
        assert_eq!(verdict.in_use.len(), 3, "{:?}", verdict.in_use);
        assert!(verdict.would_destroy.is_empty());
    }
}
