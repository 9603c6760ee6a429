//! Reading block device facts from /sys/block, /proc/self/mountinfo and
//! /proc/swaps.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Root of sysfs block devices (whole disks).
pub const SYS_BLOCK: &str = "/sys/block";

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

/// `major:minor` of a sysfs block directory.
pub fn dev_number(dir: &Path) -> Option<(u32, u32)> {
    let text = attribute(&dir.join("dev"))?;
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Names of the partitions of a disk (child directories with a `partition` file).
pub fn partitions(disk_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(disk_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("partition").exists())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Entries of `dir/holders` (device-mapper, MD, bcache users of the device).
pub fn holders(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("holders"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Mount points by `major:minor`, from /proc/self/mountinfo, plus active
/// swap devices (as "[SWAP]") from /proc/swaps.
pub fn mounts_by_device() -> HashMap<(u32, u32), Vec<String>> {
    let mut mounts: HashMap<(u32, u32), Vec<String>> = HashMap::new();
    if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
        for line in text.lines() {
            // id parent major:minor root mountpoint ...
            let mut fields = line.split_whitespace();
            let (Some(_), Some(_), Some(dev), Some(_), Some(point)) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                continue;
            };
            if let Some((major, minor)) = dev.split_once(':') {
                if let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) {
                    mounts.entry((major, minor)).or_default().push(unescape(point));
                }
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/proc/swaps") {
        for line in text.lines().skip(1) {
            let Some(device) = line.split_whitespace().next() else {
                continue;
            };
            if let Some(number) = block_number_of(Path::new(device)) {
                mounts.entry(number).or_default().push("[SWAP]".into());
            }
        }
    }
    mounts
}

/// mountinfo escapes spaces and such as octal (`\040`).
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&text[index + 1..index + 4], 8) {
                out.push(value);
                index += 4;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `major:minor` of a block device node (following symlinks).
pub fn block_number_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let metadata = fs::metadata(path).ok()?;
    if !metadata.file_type().is_block_device() {
        return None;
    }
    let rdev = metadata.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// The sysfs directory of a device number (`/sys/dev/block/M:m`, resolved).
pub fn sysfs_dir_of(number: (u32, u32)) -> Option<PathBuf> {
    fs::canonicalize(format!("/sys/dev/block/{}:{}", number.0, number.1)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/odd\"), r"/odd\");
    }

    #[test]
    fn the_root_filesystem_is_among_the_mounts() {
        let mounts = mounts_by_device();
        assert!(mounts.values().flatten().any(|point| point == "/"), "{mounts:?}");
    }
}
