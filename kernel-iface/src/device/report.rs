//! Describing one path given by the operator (enrollment checks exactly
//! the target it was given): a whole disk, a partition, or a regular file.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::{eligibility, mounts, signature, sysfs, BlockDevice, DeviceError, Eligibility, Signature};

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
        /// Loop devices backed by this file ("loop3").
        holders: Vec<String>,
        /// "[SWAP]" when the file is active swap.
        mountpoints: Vec<String>,
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
                holders,
                mountpoints,
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
                holders: holders.clone(),
                mountpoints: mountpoints.clone(),
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
        let contents = |signature: &Option<Signature>| signature.map_or("no known signature", |s| s.describe());
        match self {
            Self::Block(device) => {
                let kind = if device.is_partition {
                    "partition"
                } else {
                    "block device"
                };
                let model = device
                    .model
                    .as_ref()
                    .map(|m| format!(", model {m}"))
                    .unwrap_or_default();
                let backing = device
                    .backing_file
                    .as_ref()
                    .map(|b| format!(", backed by {b}"))
                    .unwrap_or_default();
                let name = &device.name;
                let size = gib(device.size_bytes);
                let contents = contents(&device.signature);
                format!("{kind} {name}, {size}{model}{backing}, {contents}")
            }
            Self::File {
                size_bytes, signature, ..
            } => format!("regular file, {}, {}", gib(*size_bytes), contents(signature)),
        }
    }
}

fn gib(bytes: u64) -> String {
    // Display only: the precision lost converting to f64 does not matter.
    #[allow(clippy::cast_precision_loss)]
    let value = bytes as f64 / f64::from(1u32 << 30);
    format!("{value:.1} GiB")
}

/// Describes one path: a block device (found in sysfs by its device
/// number, so /dev/disk/by-id links and dm names work), a partition
/// (reported with its own mounts, holders and contents), or a regular file.
pub fn describe_path(path: &Path) -> Result<PathReport, DeviceError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => DeviceError::NotFound { path: path.to_owned() },
        std::io::ErrorKind::PermissionDenied => DeviceError::PermissionDenied { path: path.to_owned() },
        _ => DeviceError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if metadata.file_type().is_file() {
        return describe_file(path, metadata.len()).map_err(io);
    }
    if !metadata.file_type().is_block_device() {
        return Err(DeviceError::NotADisk { path: path.to_owned() });
    }
    let number = mounts::block_number_of(path).ok_or_else(|| DeviceError::NotFound { path: path.to_owned() })?;
    let dir = sysfs::sysfs_dir_of(number).ok_or_else(|| DeviceError::NotInSysfs {
        path: path.to_owned(),
        major: number.0,
        minor: number.1,
    })?;
    let name = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| DeviceError::NotInSysfs {
            path: path.to_owned(),
            major: number.0,
            minor: number.1,
        })?;
    let is_partition = dir.join("partition").exists();
    let device = sysfs::describe(&name, &dir, &mounts::current(), is_partition);
    debug_assert!(device.is_partition == is_partition);
    Ok(PathReport::Block(Box::new(device)))
}

fn describe_file(path: &Path, size_bytes: u64) -> std::io::Result<PathReport> {
    let file = File::open(path)?;
    let signature = signature::probe_signature(&file, size_bytes)?;
    let canonical = std::fs::canonicalize(path)?;
    let is_active_swap = mounts::active_swap_paths()
        .iter()
        .any(|swap| std::fs::canonicalize(swap).is_ok_and(|swap| swap == canonical));
    let mountpoints = if is_active_swap {
        vec![mounts::SWAP_MOUNTPOINT.to_owned()]
    } else {
        Vec::new()
    };
    Ok(PathReport::File {
        path: path.to_owned(),
        size_bytes,
        signature,
        holders: sysfs::loop_devices_backed_by(path),
        mountpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describing_a_missing_path_says_not_found() {
        assert!(matches!(
            describe_path(Path::new("/nonexistent/disk")),
            Err(DeviceError::NotFound { .. })
        ));
    }

    #[test]
    fn describing_a_character_device_or_directory_says_not_a_disk() {
        for path in ["/dev/null", "/tmp"] {
            assert!(
                matches!(describe_path(Path::new(path)), Err(DeviceError::NotADisk { .. })),
                "{path}"
            );
        }
    }

    #[test]
    fn a_regular_file_is_described_with_its_size_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = File::create(&path).unwrap();
        file.set_len(128 << 20).unwrap();
        let report = describe_path(&path).unwrap();
        assert_eq!(report.size_bytes(), 128 << 20);
        assert!(report.eligibility().eligible, "{:?}", report.eligibility());
        assert_eq!(report.summary(), "regular file, 0.1 GiB, no known signature");

        std::os::unix::fs::FileExt::write_all_at(&file, b"XFSB", 0).unwrap();
        let report = describe_path(&path).unwrap();
        assert!(matches!(
            report,
            PathReport::File {
                signature: Some(Signature::Xfs),
                ..
            }
        ));
        assert_eq!(
            report.eligibility().reasons,
            vec!["holds an existing XFS filesystem".to_owned()]
        );
    }

    #[test]
    fn a_small_regular_file_is_ineligible_as_too_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let reasons = describe_path(&path).unwrap().eligibility().reasons;
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].starts_with("too small"), "{reasons:?}");
    }
}
