//! Host attach: a volume this node serves, as a block device of this host.
//!
//! Backends, best first: ublk (ublk_drv), the kernel NBD client (nbd
//! module), FUSE + loop. Only FUSE + loop is built so far (`fuse`): it
//! works wherever FUSE does; on a host with ublk or the nbd module the
//! choice is logged and FUSE + loop is still used.

pub mod fuse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kernel_iface::loopdev::LoopDevice;
use parking_lot::Mutex;

use crate::volume::Volume;

/// Where the attach filesystem is mounted, under the data directory.
pub const MOUNT_DIR: &str = "attach";

/// What a host attach gave.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Device {
    /// The block device, e.g. /dev/loop3.
    pub device: PathBuf,
    /// "fuse" (FUSE file + loop device).
    pub backend: String,
}

/// The kernel pieces the faster backends need, if present.
#[must_use]
pub fn faster_backends_present() -> Vec<&'static str> {
    let mut present = Vec::new();
    if Path::new("/dev/ublk-control").exists() {
        present.push("ublk");
    }
    if Path::new("/sys/module/nbd").exists() {
        present.push("nbd");
    }
    present
}

/// Whether a filesystem is mounted at `path` (per /proc/self/mounts).
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mounts.lines().any(|line| {
        // /proc/self/mounts escapes spaces as \040.
        line.split_whitespace()
            .nth(1)
            .is_some_and(|target| target.replace("\\040", " ") == wanted)
    })
}

/// Loop devices (e.g. /dev/loop3) and the files backing them.
fn loop_backings() -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
            Some((PathBuf::from("/dev").join(name), backing.trim().to_owned()))
        })
        .collect()
}

fn detach_loop(device: &Path) -> bool {
    std::process::Command::new("losetup")
        .arg("-d")
        .arg(device)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Releases `device` if it is still the loop device of volume `name`'s
/// attach file (left by a node that died): the kernel frees it when its
/// last user closes it.
pub fn release_stale_loop(device: &Path, name: &str) {
    let suffix = format!("/{MOUNT_DIR}/{name}");
    let ours = loop_backings()
        .into_iter()
        .any(|(path, backing)| path == device && backing.trim_end_matches(" (deleted)").ends_with(&suffix));
    if ours && detach_loop(device) {
        tracing::info!(volume = %name, device = %device.display(), "released the loop device of a dead attachment");
    }
}

/// This node's attached volumes.
pub struct HostAttach {
    mountpoint: PathBuf,
    files: Arc<fuse::Files>,
    runtime: tokio::runtime::Handle,
    /// Declared before `session`: loop devices go before the unmount.
    devices: Mutex<BTreeMap<String, LoopDevice>>,
    session: Mutex<Option<fuser::BackgroundSession>>,
}

impl HostAttach {
    #[must_use]
    pub fn new(data_dir: &Path, runtime: tokio::runtime::Handle) -> Self {
        Self {
            mountpoint: data_dir.join(MOUNT_DIR),
            files: Arc::new(fuse::Files::default()),
            runtime,
            devices: Mutex::new(BTreeMap::new()),
            session: Mutex::new(None),
        }
    }

    fn ensure_mounted(&self) -> Result<(), String> {
        let mut session = self.session.lock();
        if session.is_some() {
            return Ok(());
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.mountpoint)
            .map_err(|e| format!("cannot make {}: {e}", self.mountpoint.display()))?;
        // Loop devices and a mount left by a killed node would make this one fail.
        let prefix = format!("{}/", self.mountpoint.display());
        for (device, backing) in loop_backings() {
            if backing.starts_with(&prefix) && detach_loop(&device) {
                tracing::info!(device = %device.display(), backing = %backing, "released a loop device left by this node's previous run");
            }
        }
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-q")
            .arg(&self.mountpoint)
            .status();
        let filesystem = fuse::AttachFs {
            files: Arc::clone(&self.files),
            runtime: self.runtime.clone(),
        };
        let options = [
            fuser::MountOption::FSName("ballast".into()),
            fuser::MountOption::Subtype("ballast".into()),
        ];
        let mounted = fuser::spawn_mount2(filesystem, &self.mountpoint, &options).map_err(|e| {
            format!(
                "cannot mount the attach filesystem at {} (FUSE: /dev/fuse and fusermount3 are needed): {e}",
                self.mountpoint.display()
            )
        })?;
        let faster = faster_backends_present();
        tracing::info!(mountpoint = %self.mountpoint.display(), backend = "fuse", faster_available_not_built = ?faster, "host attach filesystem mounted");
        *session = Some(mounted);
        Ok(())
    }

    /// Attaches `volume` (which this node serves) as a block device.
    pub fn attach(&self, volume: &Arc<Volume>) -> Result<Device, String> {
        if let Some(device) = self.devices.lock().get(&volume.name) {
            return Ok(Device {
                device: device.path().to_owned(),
                backend: "fuse".into(),
            });
        }
        self.ensure_mounted()?;
        self.files.insert(Arc::clone(volume));
        let file = self.mountpoint.join(&volume.name);
        let loop_device = LoopDevice::attach_with_sector_size(&file, true, Some(volume.block_size_bytes))
            .or_else(|_| LoopDevice::attach_with_sector_size(&file, false, Some(volume.block_size_bytes)))
            .map_err(|e| {
                self.files.remove(&volume.name);
                format!("cannot make a loop device over {}: {e}", file.display())
            })?;
        let device = Device {
            device: loop_device.path().to_owned(),
            backend: "fuse".into(),
        };
        tracing::info!(volume = %volume.name, device = %device.device.display(), backend = "fuse", "volume attached to this host");
        self.devices.lock().insert(volume.name.clone(), loop_device);
        Ok(device)
    }

    /// Removes `name`'s block device (unmount any filesystem on it first).
    pub fn detach(&self, name: &str) -> Result<(), String> {
        let Some(device) = self.devices.lock().remove(name) else {
            return Err(format!("volume {name} is not attached to this host"));
        };
        let path = device.path().to_owned();
        drop(device);
        self.files.remove(name);
        tracing::info!(volume = %name, device = %path.display(), "volume detached from this host");
        Ok(())
    }

    /// The block device of `name`, if attached here.
    #[must_use]
    pub fn device_of(&self, name: &str) -> Option<PathBuf> {
        self.devices.lock().get(name).map(|device| device.path().to_owned())
    }

    /// Detaches everything and unmounts (node shutdown).
    pub fn shutdown(&self) {
        self.devices.lock().clear();
        if let Some(session) = self.session.lock().take() {
            drop(session);
        }
    }
}
