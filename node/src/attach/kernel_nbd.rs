//! The kernel NBD client backend of host attach: a free /dev/nbdN is
//! handed one end of a socket pair (ioctl NBD_SET_SOCK) and the node serves
//! the NBD transmission phase on the other end, with the same code as its
//! NBD listener (no handshake: the kernel client starts in transmission,
//! simple replies). No network hop and no TLS: both ends are this process
//! and the kernel.
//!
//! The ioctl interface (`linux/nbd.h`), used here rather than netlink
//! because it needs nothing but the nbd module: SET_BLKSIZE, SET_SIZE_BLOCKS,
//! SET_FLAGS, SET_TIMEOUT, SET_SOCK, then DO_IT, which blocks a thread for
//! the life of the device and returns after DISCONNECT (or when the socket
//! closes); CLEAR_SOCK releases the device for the next user.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::nbd::proto::{TFLAG_HAS_FLAGS, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES};
use crate::volume::Volume;

use kernel_iface::nbd::{
    ioctl, NBD_CLEAR_QUE, NBD_CLEAR_SOCK, NBD_DISCONNECT, NBD_DO_IT, NBD_SET_BLKSIZE, NBD_SET_FLAGS,
    NBD_SET_SIZE_BLOCKS, NBD_SET_SOCK, NBD_SET_TIMEOUT,
};

/// Seconds the kernel waits on one request before failing it. Replication
/// fail-over of a replica takes up to the replica time-out (5 s default);
/// the kernel client must outwait it rather than fail the filesystem.
const REQUEST_TIMEOUT_S: u64 = 120;
/// How long a detach waits for the kernel to let go of the device.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Whether this host has the kernel NBD client (the nbd module and its devices).
#[must_use]
pub fn available() -> bool {
    Path::new("/sys/module/nbd").exists() && Path::new("/dev/nbd0").exists()
}

fn require_available() -> Result<(), String> {
    if available() {
        Ok(())
    } else {
        Err(
            "the kernel NBD client is not available (no /sys/module/nbd or /dev/nbd0: load it with `modprobe nbd`)"
                .into(),
        )
    }
}

/// The flags the kernel client is given: what the volume serves. No
/// `SEND_FLUSH`: the kernel then sets up the device without a volatile write
/// cache, so it sends no flushes (every acknowledged write is durable on
/// every in-sync replica already) and a database's fsync costs no round trip.
#[must_use]
pub fn transmission_flags() -> u64 {
    u64::from(TFLAG_HAS_FLAGS | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES)
}

/// The setup ioctls, in order, with their arguments (before SET_SOCK).
#[must_use]
pub fn setup_ioctls(size_bytes: u64, block_size_bytes: u32) -> [(u64, u64); 4] {
    let block = u64::from(block_size_bytes);
    [
        (NBD_SET_BLKSIZE, block),
        (NBD_SET_SIZE_BLOCKS, size_bytes / block),
        (NBD_SET_FLAGS, transmission_flags()),
        (NBD_SET_TIMEOUT, REQUEST_TIMEOUT_S),
    ]
}

/// The nbd devices under `sys_block` (e.g. /sys/block) no one uses: no
/// `pid` file (no DO_IT running) and size 0; lowest number first.
#[must_use]
pub fn free_devices(sys_block: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut free: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let number: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            let dir = entry.path();
            let in_use = dir.join("pid").exists()
                || std::fs::read_to_string(dir.join("size")).is_ok_and(|size| size.trim() != "0");
            (!in_use).then_some(number)
        })
        .collect();
    free.sort_unstable();
    free
}

/// A volume as /dev/nbdN; disconnected and released on drop.
pub struct NbdDevice {
    path: PathBuf,
    device: Arc<std::fs::File>,
    /// The thread blocked in DO_IT.
    do_it: Option<std::thread::JoinHandle<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl NbdDevice {
    /// Connects a free nbd device to `volume`, served on `runtime`.
    pub fn start(volume: Arc<Volume>, runtime: &tokio::runtime::Handle) -> Result<Self, String> {
        require_available()?;
        let mut last_error = String::from("no free /dev/nbdN (raise the nbd module's nbds_max)");
        for number in free_devices(Path::new("/sys/block")) {
            let path = PathBuf::from(format!("/dev/nbd{number}"));
            match Self::connect(&path, &volume, runtime) {
                Ok(device) => return Ok(device),
                // Another process took it between the look and the ioctl.
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {}
                Err(error) => last_error = format!("{}: {error}", path.display()),
            }
        }
        Err(last_error)
    }

    fn connect(path: &Path, volume: &Arc<Volume>, runtime: &tokio::runtime::Handle) -> std::io::Result<Self> {
        let device = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?);
        let (ours, kernels) = UnixStream::pair()?;
        for (request, arg) in setup_ioctls(volume.size_bytes(), volume.block_size_bytes) {
            ioctl(&*device, request, arg)?;
        }
        let kernels = OwnedFd::from(kernels);
        if let Err(error) = ioctl(&*device, NBD_SET_SOCK, u64::try_from(kernels.as_raw_fd()).unwrap_or(0)) {
            let _ = ioctl(&*device, NBD_CLEAR_SOCK, 0);
            return Err(error);
        }
        ours.set_nonblocking(true)?;
        let session = crate::nbd::handshake::Session {
            volume: Arc::clone(volume),
            structured_replies: false,
            base_allocation: false,
        };
        let name = volume.name.clone();
        let server = runtime.spawn(async move {
            let stream = match tokio::net::UnixStream::from_std(ours) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(volume = %name, %error, "kernel NBD socket unusable");
                    return;
                }
            };
            let (reader, writer) = stream.into_split();
            if let Err(error) = crate::nbd::transmission::serve(reader, writer, session, "kernel-nbd", None).await {
                tracing::warn!(volume = %name, %error, "kernel NBD client connection ended");
            }
        });
        let waiting = Arc::clone(&device);
        let shown = path.display().to_string();
        let do_it = std::thread::Builder::new().name("nbd-do-it".into()).spawn(move || {
            // The kernel keeps the socket it was given; ours may close.
            let _kernels = kernels;
            if let Err(error) = ioctl(&*waiting, NBD_DO_IT, 0) {
                tracing::debug!(device = %shown, %error, "NBD_DO_IT returned");
            }
            let _ = ioctl(&*waiting, NBD_CLEAR_QUE, 0);
            let _ = ioctl(&*waiting, NBD_CLEAR_SOCK, 0);
        })?;
        Ok(Self {
            path: path.to_owned(),
            device,
            do_it: Some(do_it),
            server: Some(server),
        })
    }

    /// The block device, e.g. /dev/nbd0.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        if let Err(error) = ioctl(&*self.device, NBD_DISCONNECT, 0) {
            tracing::warn!(device = %self.path.display(), %error, "NBD_DISCONNECT failed");
        }
        if let Some(do_it) = self.do_it.take() {
            let started = std::time::Instant::now();
            while !do_it.is_finished() && started.elapsed() < RELEASE_WAIT {
                std::thread::sleep(Duration::from_millis(20));
            }
            if do_it.is_finished() {
                let _ = do_it.join();
            } else {
                tracing::warn!(device = %self.path.display(), "the kernel did not release the NBD device in time");
            }
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_set_up_with_the_volume_geometry_and_what_it_serves() {
        let ioctls = setup_ioctls(1 << 30, 4096);
        assert_eq!(ioctls[0], (NBD_SET_BLKSIZE, 4096));
        assert_eq!(ioctls[1], (NBD_SET_SIZE_BLOCKS, (1 << 30) / 4096));
        assert_eq!(ioctls[2].0, NBD_SET_FLAGS);
        // HAS_FLAGS | SEND_TRIM | SEND_WRITE_ZEROES (nbd.h bits 0, 5, 6); no
        // SEND_FLUSH, so the kernel treats the device as write-through
        assert_eq!(ioctls[2].1, 1 | 1 << 5 | 1 << 6);
        assert_eq!(ioctls[3], (NBD_SET_TIMEOUT, REQUEST_TIMEOUT_S));
    }

    #[test]
    fn only_unused_nbd_devices_are_free_lowest_first() {
        let sys = tempfile::tempdir().unwrap();
        let device = |name: &str, size: &str, pid: bool| {
            let dir = sys.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("size"), size).unwrap();
            if pid {
                std::fs::write(dir.join("pid"), "1234\n").unwrap();
            }
        };
        device("nbd10", "0\n", false);
        device("nbd2", "0\n", false);
        device("nbd0", "2097152\n", true);
        device("nbd1", "0\n", true);
        device("nbd3", "8\n", false);
        device("loop0", "0\n", false);
        device("nbdx", "0\n", false);
        assert_eq!(free_devices(sys.path()), vec![2, 10]);
        assert!(free_devices(&sys.path().join("missing")).is_empty());
    }

    #[test]
    fn starting_without_the_nbd_module_says_how_to_get_it() {
        if available() {
            return;
        }
        let error = require_available().unwrap_err();
        assert!(error.contains("modprobe nbd"), "{error}");
    }
}
