//! Reading block device facts from sysfs and turning them, with the mount
//! table and a look at the device's first and last bytes, into a
//! `BlockDevice`.
//!
//! ```text
//! /sys/block/NAME -> /sys/devices/.../block/NAME     a whole disk
//!     dev  size (512-byte sectors)  ro  removable  hidden  serial
//!     queue/{logical_block_size,physical_block_size,rotational}
//!     device/{model,serial}   loop/backing_file   holders/*
//!     NAMEp1/  (has a `partition` file)            a partition: dev size ro holders/*
//! /sys/dev/block/MAJOR:MINOR -> the directory of either
//! ```

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::mounts::{self, DeviceNumber, MountTable};
use super::{signature, BlockDevice};

/// Root of sysfs block devices (whole disks).
pub const SYS_BLOCK: &str = "/sys/block";
/// sysfs sizes are always in 512-byte sectors, whatever the device's blocks.
const SYSFS_SECTOR_BYTES: u64 = 512;
/// Used when a queue attribute is missing (it never is for real disks).
const BLOCK_BYTES_DEFAULT: u32 = 512;
/// Bounds directory walks (partitions, holders); a disk has at most a few
/// hundred partitions.
const ENTRIES_MAX: usize = 4096;

/// Trimmed contents of a sysfs attribute, if present and not empty.
pub fn attribute(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// A numeric sysfs attribute.
pub fn number(path: &Path) -> Option<u64> {
    attribute(path)?.parse().ok()
}

fn flag(path: &Path) -> bool {
    number(path) == Some(1)
}

/// `major:minor` of a sysfs block directory.
pub fn dev_number(dir: &Path) -> Option<DeviceNumber> {
    mounts::parse_device_number(&attribute(&dir.join("dev"))?)
}

/// Sorted names of the entries of `dir` that satisfy `keep`.
fn entry_names(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(ENTRIES_MAX)
        .filter(|entry| keep(&entry.path()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Names of the partitions of a disk (child directories with a `partition` file).
pub fn partitions(disk_dir: &Path) -> Vec<String> {
    entry_names(disk_dir, |path| path.join("partition").exists())
}

/// Entries of `dir/holders` (device-mapper, MD, bcache users of the device).
pub fn holders(dir: &Path) -> Vec<String> {
    entry_names(&dir.join("holders"), |_| true)
}

/// Whether `/sys/block/NAME` should be listed: not a RAM disk, not a
/// detached loop device, not a hidden multipath path device.
pub fn is_listed_disk(name: &str, dir: &Path) -> bool {
    if name.starts_with("ram") || name.starts_with("zram") {
        return false;
    }
    if name.starts_with("loop") && !dir.join("loop/backing_file").exists() {
        return false;
    }
    !flag(&dir.join("hidden"))
}

/// The device node of a sysfs name: "cciss!c0d0" is /dev/cciss/c0d0.
pub fn dev_path(name: &str) -> PathBuf {
    PathBuf::from("/dev").join(name.replace('!', "/"))
}

/// The sysfs directory of a device number (`/sys/dev/block/M:m`, resolved).
pub fn sysfs_dir_of(number: DeviceNumber) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{}:{}", number.0, number.1)).ok()
}

/// Loop devices whose backing file is `file` (compared after resolving links).
pub fn loop_devices_backed_by(file: &Path) -> Vec<String> {
    let Ok(target) = fs::canonicalize(file) else {
        return Vec::new();
    };
    entry_names(Path::new(SYS_BLOCK), |dir| {
        attribute(&dir.join("loop/backing_file"))
            .is_some_and(|backing| Path::new(backing.trim_end_matches(" (deleted)")) == target)
    })
}

/// What is on the device, read through a plain read-only descriptor
/// (never the caller's O_DIRECT one, so no alignment is needed). A device
/// that cannot be read gives `(None, Some(reason))`.
pub fn probe(path: &Path, size_bytes: u64) -> (Option<signature::Signature>, Option<String>) {
    if size_bytes == 0 {
        return (None, None);
    }
    match File::open(path).and_then(|file| signature::probe_signature(&file, size_bytes)) {
        Ok(found) => (found, None),
        Err(error) => (None, Some(format!("{}: {error}", path.display()))),
    }
}

/// Describes the disk or partition whose sysfs directory is `dir`.
/// Attributes of the medium (block sizes, rotational, model, serial,
/// backing file) come from the whole disk; usage (holders, mounts, size,
/// read-only, contents) from `dir` itself and, for a disk, its partitions.
pub fn describe(name: &str, dir: &Path, mounts: &MountTable, is_partition: bool) -> BlockDevice {
    let whole = if is_partition { dir.parent().unwrap_or(dir) } else { dir };
    let block_bytes = |attribute: &str| {
        number(&whole.join("queue").join(attribute))
            .and_then(|bytes| u32::try_from(bytes).ok())
            .unwrap_or(BLOCK_BYTES_DEFAULT)
    };
    let partitions = if is_partition { Vec::new() } else { partitions(dir) };
    let mut holders = holders(dir);
    let mut mountpoints = dev_number(dir)
        .and_then(|number| mounts.get(&number).cloned())
        .unwrap_or_default();
    for partition in &partitions {
        let partition_dir = dir.join(partition);
        holders.extend(holders_of_partition(&partition_dir, partition));
        if let Some(points) = dev_number(&partition_dir).and_then(|number| mounts.get(&number)) {
            mountpoints.extend(points.iter().map(|point| format!("{point} (via {partition})")));
        }
    }
    let size_bytes = number(&dir.join("size"))
        .unwrap_or(0)
        .saturating_mul(SYSFS_SECTOR_BYTES);
    let path = dev_path(name);
    let (signature, probe_error) = probe(&path, size_bytes);
    BlockDevice {
        name: name.to_owned(),
        path,
        size_bytes,
        logical_block_bytes: block_bytes("logical_block_size"),
        physical_block_bytes: block_bytes("physical_block_size"),
        rotational: flag(&whole.join("queue/rotational")),
        removable: flag(&whole.join("removable")),
        read_only: flag(&dir.join("ro")),
        model: attribute(&whole.join("device/model")),
        serial: attribute(&whole.join("device/serial")).or_else(|| attribute(&whole.join("serial"))),
        partitions,
        holders,
        mountpoints,
        signature,
        probe_error,
        backing_file: attribute(&whole.join("loop/backing_file")),
        is_partition,
    }
}

/// Holders of a partition, named with the partition ("dm-0 (via sda1)").
fn holders_of_partition(partition_dir: &Path, partition: &str) -> Vec<String> {
    holders(partition_dir)
        .into_iter()
        .map(|holder| format!("{holder} (via {partition})"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_names_with_bangs_map_to_subdirectories_of_dev() {
        assert_eq!(dev_path("cciss!c0d0"), Path::new("/dev/cciss/c0d0"));
        assert_eq!(dev_path("nvme0n1"), Path::new("/dev/nvme0n1"));
    }

    #[test]
    fn ram_disks_and_detached_loops_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_listed_disk("ram0", dir.path()));
        assert!(!is_listed_disk("zram0", dir.path()));
        assert!(!is_listed_disk("loop7", dir.path()), "no loop/backing_file");
        fs::create_dir(dir.path().join("loop")).unwrap();
        fs::write(dir.path().join("loop/backing_file"), "/var/tmp/x.img\n").unwrap();
        assert!(is_listed_disk("loop7", dir.path()));
        assert!(is_listed_disk("nvme0n1", dir.path()));
        fs::write(dir.path().join("hidden"), "1\n").unwrap();
        assert!(!is_listed_disk("nvme0c0n1", dir.path()), "hidden multipath path device");
    }

    #[test]
    fn a_fake_sysfs_disk_is_described_from_its_attributes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("fakedisk0");
        let write = |relative: &str, text: &str| {
            let path = disk.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("dev", "259:0\n");
        write("size", "2097152\n");
        write("ro", "0\n");
        write("removable", "0\n");
        write("queue/logical_block_size", "4096\n");
        write("queue/physical_block_size", "4096\n");
        write("queue/rotational", "1\n");
        write("device/model", "  Fake Disk 1TB   \n");
        write("serial", "SN123\n");
        write("fakedisk0p1/partition", "1\n");
        write("fakedisk0p1/dev", "259:1\n");
        fs::create_dir_all(disk.join("holders/md0")).unwrap();
        fs::create_dir_all(disk.join("fakedisk0p1/holders/dm-3")).unwrap();
        let mut mounts = MountTable::new();
        mounts.insert((259, 1), vec!["/srv".into()]);
        let device = describe("fakedisk0", &disk, &mounts, false);
        assert_eq!(device.size_bytes, 1 << 30);
        assert_eq!(device.logical_block_bytes, 4096);
        assert!(device.rotational);
        assert_eq!(device.model.as_deref(), Some("Fake Disk 1TB"));
        assert_eq!(device.serial.as_deref(), Some("SN123"));
        assert_eq!(device.partitions, vec!["fakedisk0p1".to_owned()]);
        assert_eq!(
            device.holders,
            vec!["md0".to_owned(), "dm-3 (via fakedisk0p1)".to_owned()]
        );
        assert_eq!(device.mountpoints, vec!["/srv (via fakedisk0p1)".to_owned()]);
        assert!(
            device.probe_error.is_some(),
            "/dev/fakedisk0 does not exist, so it cannot be probed"
        );

        let partition = describe("fakedisk0p1", &disk.join("fakedisk0p1"), &mounts, true);
        assert!(partition.is_partition);
        assert_eq!(
            partition.logical_block_bytes, 4096,
            "block sizes come from the whole disk"
        );
        assert_eq!(partition.model.as_deref(), Some("Fake Disk 1TB"));
        assert_eq!(partition.holders, vec!["dm-3".to_owned()]);
        assert_eq!(partition.mountpoints, vec!["/srv".to_owned()]);
    }
}
