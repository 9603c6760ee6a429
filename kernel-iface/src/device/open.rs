//! Opening a disk so that nothing else can use it while ballast does:
//! O_EXCL on block devices (the kernel refuses it while mounted or held,
//! and refuses mounts while we hold it), flock on regular files.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::DeviceError;

/// An exclusively opened disk.
#[derive(Debug)]
pub struct OpenedDevice {
    pub file: File,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    pub is_block_device: bool,
}

nix::ioctl_read!(block_size_64, 0x12, 114, u64);
nix::ioctl_read_bad!(block_logical_size, libc::BLKSSZGET, libc::c_int);

/// How long a busy device is retried: a process that just exited may hold
/// it for a moment (the kernel releases io_uring files asynchronously).
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(3);
const BUSY_RETRY_STEP: std::time::Duration = std::time::Duration::from_millis(20);

/// Opens `path` read-write for ballast's sole use (`direct`: O_DIRECT).
/// A device that stays busy for `BUSY_RETRY` is reported as `Busy`.
pub fn open_exclusive(path: &Path, direct: bool) -> Result<OpenedDevice, DeviceError> {
    let deadline = std::time::Instant::now() + BUSY_RETRY;
    loop {
        match open_exclusive_once(path, direct) {
            Err(DeviceError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(BUSY_RETRY_STEP);
            }
            other => return other,
        }
    }
}

fn open_exclusive_once(path: &Path, direct: bool) -> Result<OpenedDevice, DeviceError> {
    let io = |source: std::io::Error| match source.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EWOULDBLOCK) => DeviceError::Busy { path: path.to_owned() },
        Some(libc::ENOENT) => DeviceError::NotFound { path: path.to_owned() },
        Some(libc::EINVAL) if direct => DeviceError::DirectIoUnsupported { path: path.to_owned() },
        _ => DeviceError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    let direct_flag = if direct { libc::O_DIRECT } else { 0 };
    if metadata.file_type().is_block_device() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC | direct_flag)
            .open(path)
            .map_err(io)?;
        let mut size_bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live local; the fd is open for the whole call.
        unsafe { block_size_64(file.as_raw_fd(), &mut size_bytes) }.map_err(|errno| io(errno.into()))?;
        let mut logical: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which
        // points at a live local; the fd is open for the whole call.
        unsafe { block_logical_size(file.as_raw_fd(), &mut logical) }.map_err(|errno| io(errno.into()))?;
        return Ok(OpenedDevice {
            file,
            path: path.to_owned(),
            size_bytes,
            logical_block_bytes: u32::try_from(logical).unwrap_or(512),
            is_block_device: true,
        });
    }
    if !metadata.file_type().is_file() {
        return Err(DeviceError::NotADisk { path: path.to_owned() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | direct_flag)
        .open(path)
        .map_err(io)?;
    // The lock belongs to this open file and goes away when `file` closes.
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(OpenedDevice {
        file,
        path: path.to_owned(),
        size_bytes: metadata.len(),
        logical_block_bytes: 512,
        is_block_device: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_can_be_opened_by_one_user_only() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let first = open_exclusive(&path, true).unwrap();
        assert_eq!(first.size_bytes, 1 << 20);
        assert!(matches!(open_exclusive(&path, true), Err(DeviceError::Busy { .. })));
        drop(first);
        open_exclusive(&path, true).expect("free again once closed");
    }

    #[test]
    fn a_directory_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_exclusive(dir.path(), false),
            Err(DeviceError::NotADisk { .. })
        ));
    }
}
