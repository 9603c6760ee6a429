//! What the kernel is using a block device for right now: mounts (from
//! /proc/self/mountinfo) and active swap (from /proc/swaps), keyed by
//! `major:minor` so that any name of the device (/dev/sda1, a by-id link,
//! a dm name) matches. Parsing is pure, over the files' text.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

/// A block device number, `(major, minor)`.
pub type DeviceNumber = (u32, u32);

/// Mount points (and "[SWAP]") by device number.
pub type MountTable = HashMap<DeviceNumber, Vec<String>>;

/// Bounds the lines read from each /proc file; a host with more mounts
/// than this is not one ballast was built for (the rest are ignored).
const LINES_MAX: usize = 65_536;

/// What active swap is reported as, like lsblk does.
pub const SWAP_MOUNTPOINT: &str = "[SWAP]";

/// One line of mountinfo: the device number the kernel gives the mount,
/// where it is mounted, and its source as written (e.g. "/dev/sda1").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub device: DeviceNumber,
    pub mountpoint: String,
    pub source: String,
}

/// Parses "major:minor".
pub fn parse_device_number(text: &str) -> Option<DeviceNumber> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Parses /proc/self/mountinfo. Malformed lines are skipped.
///
/// ```text
/// 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw
/// (1)(2)(3)   (4)   (5)         (6)       (7...)   -  fstype source options
/// ```
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .take(LINES_MAX)
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split_whitespace();
            let device = parse_device_number(fields.nth(2)?)?;
            let mountpoint = unescape(fields.nth(1)?);
            let source = unescape(after.split_whitespace().nth(1).unwrap_or(""));
            Some(MountEntry {
                device,
                mountpoint,
                source,
            })
        })
        .collect()
}

/// Parses /proc/swaps into the paths of active swap areas (devices or files).
pub fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1) // the header
        .take(LINES_MAX)
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// /proc escapes space, tab, newline and backslash in paths as octal (`\040`).
pub fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' {
            let digits = bytes
                .get(index + 1..index + 4)
                .and_then(|d| std::str::from_utf8(d).ok());
            if let Some(value) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
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
pub fn block_number_of(path: &Path) -> Option<DeviceNumber> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let metadata = fs::metadata(path).ok()?;
    if !metadata.file_type().is_block_device() {
        return None;
    }
    let rdev = metadata.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// Builds the table from mount entries and swap paths. `number_of` turns a
/// path into a device number (injected so tests need no devices).
pub fn build_table(
    entries: &[MountEntry],
    swaps: &[String],
    number_of: impl Fn(&Path) -> Option<DeviceNumber>,
) -> MountTable {
    let mut table = MountTable::new();
    let mut add = |device: DeviceNumber, point: &str| {
        let points = table.entry(device).or_default();
        if !points.iter().any(|known| known == point) {
            points.push(point.to_owned());
        }
    };
    for entry in entries {
        add(entry.device, &entry.mountpoint);
        // btrfs (and other multi-device filesystems) report an anonymous
        // 0:N number, so the source path is resolved too.
        if entry.source.starts_with('/') {
            if let Some(device) = number_of(Path::new(&entry.source)).filter(|&d| d != entry.device) {
                add(device, &entry.mountpoint);
            }
        }
    }
    for swap in swaps {
        if let Some(device) = number_of(Path::new(swap)) {
            add(device, SWAP_MOUNTPOINT);
        }
    }
    table
}

/// The mounts and active swap of this host, as this process sees them.
/// Unreadable /proc files give an empty table (and a warning): the
/// exclusive open still refuses a mounted device.
pub fn current() -> MountTable {
    let read = |path: &str| {
        fs::read_to_string(path).unwrap_or_else(|error| {
            tracing::warn!(path, %error, "cannot read; mounts may be missing from device reports");
            String::new()
        })
    };
    let entries = parse_mountinfo(&read("/proc/self/mountinfo"));
    let swaps = parse_swaps(&read("/proc/swaps"));
    build_table(&entries, &swaps, block_number_of)
}

/// Active swap files (regular files) among /proc/swaps, as paths.
pub fn active_swap_paths() -> Vec<String> {
    fs::read_to_string("/proc/swaps")
        .map(|text| parse_swaps(&text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
30 27 8:1 / /data rw,relatime shared:1 - ext4 /dev/sda1 rw
31 27 0:45 / /pool rw - btrfs /dev/sdb rw,space_cache
32 27 8:1 /sub /mnt/with\\040space rw - ext4 /dev/sda1 rw
33 27 bad line without separator
34 27 7:3 / /again rw - xfs /dev/loop3 rw
35 27 7:3 / /again rw - xfs /dev/loop3 rw
";

    #[test]
    fn mountinfo_lines_give_device_mountpoint_and_source() {
        let entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries.len(), 6, "the malformed line is skipped: {entries:?}");
        assert_eq!(
            entries[1],
            MountEntry {
                device: (8, 1),
                mountpoint: "/data".into(),
                source: "/dev/sda1".into()
            }
        );
        assert_eq!(entries[3].mountpoint, "/mnt/with space");
    }

    #[test]
    fn mounts_are_keyed_by_number_and_by_resolved_source() {
        let number_of = |path: &Path| match path.to_str()? {
            "/dev/sdb" => Some((8, 16)),
            "/dev/sda1" => Some((8, 1)),
            "/dev/loop3" => Some((7, 3)),
            "/swapdev" => Some((252, 0)),
            _ => None,
        };
        let table = build_table(
            &parse_mountinfo(MOUNTINFO),
            &parse_swaps("Filename Type Size Used Priority\n/swapdev partition 1 0 -2\n/swapfile file 1 0 -3\n"),
            number_of,
        );
        assert_eq!(table[&(8, 1)], vec!["/data".to_owned(), "/mnt/with space".to_owned()]);
        assert_eq!(
            table[&(8, 16)],
            vec!["/pool".to_owned()],
            "btrfs is found by its source"
        );
        assert_eq!(table[&(7, 3)], vec!["/again".to_owned()], "duplicates are merged");
        assert_eq!(table[&(252, 0)], vec![SWAP_MOUNTPOINT.to_owned()]);
        assert!(!table.values().flatten().any(|p| p.contains("swapfile")));
    }

    #[test]
    fn proc_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/tab\011x\134y"), "/tab\tx\\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/odd\"), r"/odd\");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
        assert_eq!(unescape(r"\999"), r"\999");
    }

    #[test]
    fn the_root_filesystem_is_among_the_mounts_of_this_host() {
        let entries = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap());
        assert!(entries.iter().any(|entry| entry.mountpoint == "/"), "{entries:?}");
    }
}
