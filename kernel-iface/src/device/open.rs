//! Opening a disk so that nothing else can use it while ballast does:
//! O_EXCL on block devices (the kernel refuses it while the device is
//! mounted, held by dm/MD/LVM or opened O_EXCL elsewhere, and refuses those
//! while we hold it), and flock on regular files (which only keeps other
//! ballast processes out; enrollment checks for loop devices and swap).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::DeviceError;

/// An exclusively opened disk. Closing `file` releases it.
#[derive(Debug)]
pub struct OpenedDevice {
    pub file: File,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    pub is_block_device: bool,
}

// BLKGETSIZE64 is _IOR(0x12, 114, size_t): the device size in bytes.
nix::ioctl_read!(block_size_bytes, 0x12, 114, u64);
// BLKSSZGET is _IO(0x12, 104) but writes an int: the logical block size.
nix::ioctl_read_bad!(block_logical_size, libc::BLKSSZGET, libc::c_int);
// BLKROGET is _IO(0x12, 94) but writes an int: non-zero if read-only.
nix::ioctl_read_bad!(block_read_only, nix::request_code_none!(0x12, 94), libc::c_int);

/// How long a busy device is retried: a process that just exited may hold
/// it for a moment (the kernel releases io_uring files asynchronously).
const BUSY_RETRY: Duration = Duration::from_secs(3);
const BUSY_RETRY_STEP: Duration = Duration::from_millis(20);
/// Logical block size reported for a file-backed disk (the kernel's sector).
/// O_DIRECT on a file may need the filesystem's block, up to 4096; ballast
/// only does 4096-byte aligned I/O, which satisfies either.
const FILE_LOGICAL_BLOCK_BYTES: u32 = 512;
/// Logical block sizes the kernel can report (512 B to 64 KiB, powers of two).
const LOGICAL_BLOCK_BYTES_MIN: u32 = 512;
const LOGICAL_BLOCK_BYTES_MAX: u32 = 64 * 1024;

/// Why discards cannot reach `opened`, if they cannot: a block device whose
/// queue says `discard_max_bytes` = 0 (a partition answers for its disk's
/// queue). A regular file has no such flag: a punched hole is tried, and a
/// filesystem that refuses it turns discards off then.
#[must_use]
pub fn discard_unsupported_reason(opened: &OpenedDevice) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !opened.is_block_device {
        return None;
    }
    let rdev = match opened.file.metadata() {
        Ok(meta) => meta.rdev(),
        Err(error) => return Some(format!("cannot stat the device: {error}")),
    };
    let (Ok(major), Ok(minor)) = (
        u32::try_from(nix::sys::stat::major(rdev)),
        u32::try_from(nix::sys::stat::minor(rdev)),
    ) else {
        return Some(format!("device number {rdev:#x} out of range"));
    };
    let Some(dir) = super::sysfs::sysfs_dir_of((major, minor)) else {
        return Some(format!("no sysfs entry for device {major}:{minor}"));
    };
    let own = dir.join("queue/discard_max_bytes");
    let path = if own.exists() {
        own
    } else {
        dir.join("../queue/discard_max_bytes")
    };
    match super::sysfs::number(&path) {
        Some(0) => Some("the device does not support discard (queue/discard_max_bytes is 0)".into()),
        Some(_) => None,
        None => Some(format!("cannot read {}", path.display())),
    }
}

/// Opens `path` read-write for ballast's sole use (`direct`: O_DIRECT).
/// A device that stays busy for `BUSY_RETRY` is reported as `Busy`.
pub fn open_exclusive(path: &Path, direct: bool) -> Result<OpenedDevice, DeviceError> {
    let deadline = Instant::now() + BUSY_RETRY;
    loop {
        match open_exclusive_once(path, direct) {
            Err(DeviceError::Busy { .. }) if Instant::now() < deadline => std::thread::sleep(BUSY_RETRY_STEP),
            other => return other,
        }
    }
}

/// Maps an errno from opening or locking `path` to what it means here.
fn open_error(path: &Path, source: std::io::Error) -> DeviceError {
    let path = path.to_owned();
    match source.raw_os_error() {
        Some(libc::EBUSY | libc::EWOULDBLOCK) => DeviceError::Busy { path },
        Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => DeviceError::NotFound { path },
        Some(libc::EROFS) => DeviceError::ReadOnly { path },
        Some(libc::EACCES | libc::EPERM) => DeviceError::PermissionDenied { path },
        _ => DeviceError::Io { path, source },
    }
}

fn open_exclusive_once(path: &Path, direct: bool) -> Result<OpenedDevice, DeviceError> {
    let metadata = std::fs::metadata(path).map_err(|source| open_error(path, source))?;
    let direct_flag = if direct { libc::O_DIRECT } else { 0 };
    if metadata.file_type().is_block_device() {
        return open_block_device(path, direct_flag);
    }
    if !metadata.file_type().is_file() {
        return Err(DeviceError::NotADisk { path: path.to_owned() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | direct_flag)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            // open(2): EINVAL "the filesystem does not support O_DIRECT".
            Some(libc::EINVAL) if direct => DeviceError::DirectIoUnsupported { path: path.to_owned() },
            _ => open_error(path, source),
        })?;
    // The lock belongs to this open file description and goes away when
    // `file` closes (or the process dies), so it cannot be left behind.
    // SAFETY: flock takes a plain integer descriptor and touches no memory;
    // `file` keeps the descriptor open for the whole call.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(open_error(path, std::io::Error::last_os_error()));
    }
    // The size is read after locking, so no other ballast can have changed it.
    let size_bytes = file.metadata().map_err(|source| open_error(path, source))?.len();
    Ok(OpenedDevice {
        file,
        path: path.to_owned(),
        size_bytes,
        logical_block_bytes: FILE_LOGICAL_BLOCK_BYTES,
        is_block_device: false,
    })
}

fn open_block_device(path: &Path, direct_flag: libc::c_int) -> Result<OpenedDevice, DeviceError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC | direct_flag)
        .open(path)
        .map_err(|source| open_error(path, source))?;
    let ioctl_error = |errno: nix::errno::Errno| DeviceError::Io {
        path: path.to_owned(),
        source: errno.into(),
    };
    let mut size_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, aligned local; `file` keeps the descriptor open throughout.
    unsafe { block_size_bytes(file.as_raw_fd(), &raw mut size_bytes) }.map_err(ioctl_error)?;
    let mut read_only: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which points at
    // a live, aligned local; `file` keeps the descriptor open throughout.
    unsafe { block_read_only(file.as_raw_fd(), &raw mut read_only) }.map_err(ioctl_error)?;
    // Linux lets a read-only device be opened for writing and fails the
    // writes instead; refuse here, where the message can say why.
    if read_only != 0 {
        return Err(DeviceError::ReadOnly { path: path.to_owned() });
    }
    let mut logical: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live, aligned local; `file` keeps the descriptor open throughout.
    unsafe { block_logical_size(file.as_raw_fd(), &raw mut logical) }.map_err(ioctl_error)?;
    let logical_block_bytes = u32::try_from(logical)
        .ok()
        .filter(|bytes| bytes.is_power_of_two() && (LOGICAL_BLOCK_BYTES_MIN..=LOGICAL_BLOCK_BYTES_MAX).contains(bytes))
        .ok_or_else(|| DeviceError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!("kernel reports an impossible logical block size {logical}")),
        })?;
    Ok(OpenedDevice {
        file,
        path: path.to_owned(),
        size_bytes,
        logical_block_bytes,
        is_block_device: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /tmp may be tmpfs; /var/tmp is on a disk filesystem that takes O_DIRECT.
    fn disk_tempdir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    #[test]
    fn a_regular_file_can_be_opened_by_one_user_only() {
        let dir = disk_tempdir();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let first = open_exclusive(&path, true).unwrap();
        assert_eq!(first.size_bytes, 1 << 20);
        assert_eq!(first.logical_block_bytes, 512);
        assert!(!first.is_block_device);
        let second = open_exclusive(&path, true);
        assert!(matches!(second, Err(DeviceError::Busy { .. })), "{second:?}");
        drop(first);
        open_exclusive(&path, true).expect("free again once closed");
    }

    #[test]
    fn a_locked_file_is_busy_when_opened_through_a_symlink_too() {
        let dir = disk_tempdir();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let _first = open_exclusive(&path, false).unwrap();
        assert!(matches!(open_exclusive(&link, false), Err(DeviceError::Busy { .. })));
    }

    #[test]
    fn a_directory_or_character_device_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        for path in [dir.path(), Path::new("/dev/null")] {
            let result = open_exclusive(path, false);
            assert!(matches!(result, Err(DeviceError::NotADisk { .. })), "{result:?}");
        }
    }

    #[test]
    fn a_missing_path_is_not_found() {
        let result = open_exclusive(Path::new("/nonexistent/ballast-disk"), true);
        assert!(matches!(result, Err(DeviceError::NotFound { .. })), "{result:?}");
    }

    #[test]
    fn errnos_map_to_what_they_mean() {
        let path = Path::new("/dev/x");
        let map = |errno| open_error(path, std::io::Error::from_raw_os_error(errno));
        assert!(matches!(map(libc::EBUSY), DeviceError::Busy { .. }));
        assert!(matches!(map(libc::EWOULDBLOCK), DeviceError::Busy { .. }));
        assert!(matches!(map(libc::EROFS), DeviceError::ReadOnly { .. }));
        assert!(matches!(map(libc::EACCES), DeviceError::PermissionDenied { .. }));
        assert!(matches!(map(libc::ENXIO), DeviceError::NotFound { .. }));
        assert!(matches!(map(libc::EIO), DeviceError::Io { .. }));
    }
}
