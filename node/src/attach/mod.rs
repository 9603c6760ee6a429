//! Host attach: a volume this node serves, as a block device of this host.
//!
//! Backends, best first: ublk (`ublk`, ublk_drv: /dev/ublkbN, requests
//! through io_uring commands, no socket), the kernel NBD client
//! (`kernel_nbd`, nbd module: /dev/nbdN over a socket pair to this
//! process), FUSE over io_uring + loop (`fuse::uring`: Linux 6.14+ with
//! the fuse module's `enable_uring` on), FUSE + loop (`fuse`: works
//! wherever FUSE does). `attach_backend` (node flag or
//! config) forces one; `auto` takes the best the host has, and logs the
//! choice. At the first attach the node locks its memory (mlockall,
//! on fault), so serving this host's own writeback never waits on reclaim.

pub mod fuse;
pub mod kernel_nbd;
pub mod ublk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kernel_iface::loopdev::LoopDevice;
use parking_lot::Mutex;

use crate::volume::Volume;

/// Where the attach filesystem is mounted, under the data directory.
pub const MOUNT_DIR: &str = "attach";

/// Which backend makes the block devices (`attach_backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The best this host has: ublk, else nbd, else fuse.
    #[default]
    Auto,
    /// ublk_drv (/dev/ublkbN).
    Ublk,
    /// The kernel NBD client (/dev/nbdN).
    Nbd,
    /// A FUSE file served over io_uring queues, and a loop device (/dev/loopN).
    FuseUring,
    /// A FUSE file and a loop device (/dev/loopN).
    Fuse,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "ublk" => Ok(Self::Ublk),
            "nbd" => Ok(Self::Nbd),
            "fuse-uring" => Ok(Self::FuseUring),
            "fuse" => Ok(Self::Fuse),
            other => Err(format!(
                "unknown attach backend {other:?}: use auto, ublk, nbd, fuse-uring or fuse"
            )),
        }
    }
}

impl Backend {
    /// The backend `self` stands for on this host (`auto` resolved).
    #[must_use]
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if ublk::available() => Self::Ublk,
            Self::Auto if kernel_nbd::available() => Self::Nbd,
            Self::Auto if kernel_iface::fuse::uring_enabled() == Some(true) => Self::FuseUring,
            Self::Auto => Self::Fuse,
            chosen => chosen,
        }
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ublk => "ublk",
            Self::Nbd => "nbd",
            Self::FuseUring => "fuse-uring",
            Self::Fuse => "fuse",
        }
    }
}

/// Why FUSE over io_uring cannot be used here, and what would make it so (None: it can).
#[must_use]
pub fn fuse_uring_unavailable() -> Option<String> {
    match kernel_iface::fuse::uring_enabled() {
        Some(true) => None,
        Some(false) => Some(format!(
            "this kernel can serve FUSE over io_uring but it is off: `echo 1 > {}` (as root) turns it on",
            kernel_iface::fuse::URING_PARAMETER
        )),
        None => Some("this kernel has no FUSE over io_uring (Linux 6.14 or later, CONFIG_FUSE_IO_URING)".into()),
    }
}

/// One attached volume's device, by backend.
enum Attached {
    /// The loop device; whether the FUSE session runs over io_uring.
    Fuse(LoopDevice, bool),
    Nbd(kernel_nbd::NbdDevice),
    Ublk(ublk::UblkDevice),
}

impl Attached {
    fn path(&self) -> &Path {
        match self {
            Self::Fuse(device, _) => device.path(),
            Self::Nbd(device) => device.path(),
            Self::Ublk(device) => device.path(),
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Self::Fuse(_, true) => "fuse-uring",
            Self::Fuse(_, false) => "fuse",
            Self::Nbd(_) => "nbd",
            Self::Ublk(_) => "ublk",
        }
    }

    /// Why this device cannot be kept across an upgrade in place (None:
    /// it is: a FUSE + loop device, or a ublk device made for user recovery).
    fn why_not_kept(&self) -> Option<&'static str> {
        match self {
            Self::Fuse(_, false) => None,
            // fs/fuse/dev_uring.c (Linux 6.14-6.18): an entry the kernel may hand
            // a request to is taken back only by ending its io_uring (or the
            // thread that armed it); a request handed to it in that moment is
            // completed with -ECANCELED into no process, and waits, unanswerable,
            // until the filesystem is aborted. There is no fetch-free commit to
            // drain the queues, and the connection cannot return to /dev/fuse.
            Self::Fuse(_, true) => Some(
                "FUSE over io_uring: the kernel cannot stop handing requests to the queues except by ending them, and a request handed over as they end is stranded until the filesystem is aborted",
            ),
            Self::Ublk(device) if device.recoverable() => None,
            Self::Ublk(_) => Some(
                "ublk: this kernel's ublk_drv did not grant user recovery (UBLK_F_USER_RECOVERY) to the device, so it ends with its server",
            ),
            // nbd.c: NBD_DO_IT's thread holds the connection; it ends with the
            // process image, and the device's sockets are shut down with it.
            Self::Nbd(_) => Some(
                "the kernel NBD client: its connection lives in a thread blocked in NBD_DO_IT, which ends with the process image",
            ),
        }
    }

    fn device(&self) -> Device {
        Device {
            device: self.path().to_owned(),
            backend: self.backend().into(),
        }
    }
}

/// What a host attach gave.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Device {
    /// The block device, e.g. /dev/loop3.
    pub device: PathBuf,
    /// "ublk", "nbd" (kernel NBD client), "fuse-uring" (FUSE over io_uring
    /// file + loop device) or "fuse" (FUSE file + loop device).
    pub backend: String,
}

/// A block device's size from sysfs (None if it is not there).
fn device_size_bytes(device: &Path) -> Option<u64> {
    let name = device.file_name()?.to_str()?;
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
}

/// This process's mounts (/proc/self/mounts): source and target of each.
pub fn mounts() -> std::io::Result<Vec<(String, PathBuf)>> {
    let table = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next()?;
            // /proc/self/mounts escapes spaces as \040.
            let target = fields.next()?.replace("\\040", " ");
            Some((source.to_owned(), PathBuf::from(target)))
        })
        .collect())
}

/// Whether a filesystem is mounted at `path`.
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    mounts().is_ok_and(|mounts| mounts.iter().any(|(_, target)| target == path))
}

/// Unmounts the filesystem at `path` if one is mounted there; lazily
/// (`umount -l`) when a plain unmount fails, as it may over a device whose
/// node died.
pub fn unmount_even_if_dead(path: &Path) -> Result<(), String> {
    if !is_mounted(path) {
        return Ok(());
    }
    let plain = std::process::Command::new("umount").arg(path).output();
    if plain.is_ok_and(|output| output.status.success()) {
        return Ok(());
    }
    let lazy = std::process::Command::new("umount")
        .arg("-l")
        .arg(path)
        .output()
        .map_err(|error| format!("umount -l {}: {error}", path.display()))?;
    if lazy.status.success() {
        Ok(())
    } else {
        Err(format!(
            "umount {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&lazy.stderr).trim()
        ))
    }
}

/// Releases `device` if it is still the loop device of volume `name`'s
/// attach file (left by a node that died): the kernel frees it when its
/// last user closes it.
pub fn release_stale_loop(device: &Path, name: &str) {
    let suffix = format!("/{MOUNT_DIR}/{name}");
    let ours = kernel_iface::loopdev::backings()
        .into_iter()
        .any(|(path, backing)| path == device && backing.trim_end_matches(" (deleted)").ends_with(&suffix));
    if ours && kernel_iface::loopdev::detach(device) {
        tracing::info!(volume = %name, device = %device.display(), "released the loop device of a dead attachment");
    }
}

/// Attached devices handed to the next binary of this process (an upgrade
/// in place): the FUSE session and the loop devices over its files, and
/// the ublk devices waiting for user recovery.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachHandoff {
    pub session: Option<fuse::HandedOver>,
    /// (volume, loop device)
    pub devices: Vec<(String, PathBuf)>,
    /// (volume, ublk device id); hand-over format 2 (`handoff::FORMAT`).
    #[serde(default)]
    pub ublk: Vec<(String, u32)>,
}

impl AttachHandoff {
    /// The oldest hand-over format that carries all of it: 2 with ublk
    /// devices (a binary reading only format 1 would leave them waiting).
    #[must_use]
    pub fn format(&self) -> u32 {
        Self::format_for(!self.ublk.is_empty())
    }

    /// The format of a hand-over with or without ublk devices.
    #[must_use]
    pub fn format_for(ublk: bool) -> u32 {
        if ublk {
            2
        } else {
            1
        }
    }
}

/// The ublk devices a node serves, under its data directory: a node that
/// starts after a crash takes them back (`HostAttach::recover_left`).
pub const UBLK_RECORD: &str = "ublk-devices.json";

/// The record's (volume, ublk device id) pairs; none if it is missing or unreadable.
fn read_ublk_record(path: &Path) -> Vec<(String, u32)> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(path = %path.display(), %error, "unreadable record of ublk devices: ignored");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Replaces the record (removes it when there are none), atomically.
fn write_ublk_record(path: &Path, devices: &[(String, u32)]) -> std::io::Result<()> {
    if devices.is_empty() {
        return match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        };
    }
    let text = serde_json::to_vec(devices).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// How long a handed-over device's requests may wait for the new binary
/// to serve its volume again (it rejoins its cluster first).
pub const ADOPTED_SERVING_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// This node's attached volumes.
pub struct HostAttach {
    mountpoint: PathBuf,
    /// `UBLK_RECORD` in the data directory.
    ublk_record: PathBuf,
    files: Arc<fuse::Files>,
    runtime: tokio::runtime::Handle,
    backend: Backend,
    /// What was asked for (`auto` may fall back from fuse-uring to fuse).
    configured: Backend,
    /// Declared before `session`: loop devices go before the unmount.
    devices: Mutex<BTreeMap<String, Attached>>,
    session: Mutex<Option<fuse::Session>>,
    memory_locked: std::sync::Once,
}

impl HostAttach {
    #[must_use]
    pub fn new(data_dir: &Path, runtime: tokio::runtime::Handle, backend: Backend) -> Self {
        let resolved = backend.resolve();
        tracing::info!(
            configured = backend.name(),
            chosen = resolved.name(),
            ublk = ublk::available(),
            kernel_nbd = kernel_nbd::available(),
            fuse_uring = fuse_uring_unavailable().as_deref().unwrap_or("available"),
            "host attach backend"
        );
        Self {
            mountpoint: data_dir.join(MOUNT_DIR),
            ublk_record: data_dir.join(UBLK_RECORD),
            files: Arc::new(fuse::Files::default()),
            runtime,
            backend: resolved,
            configured: backend,
            devices: Mutex::new(BTreeMap::new()),
            session: Mutex::new(None),
            memory_locked: std::sync::Once::new(),
        }
    }

    /// Locks the node's memory once, before its first device exists.
    fn lock_memory(&self) {
        self.memory_locked.call_once(|| match kernel_iface::process::lock_memory() {
            Ok(()) => tracing::info!("memory locked (mlockall, on fault): serving this host's devices never waits on reclaim"),
            Err(error) => tracing::warn!(%error, "cannot lock memory: under memory pressure, writeback through this host's attached devices could stall"),
        });
    }

    /// Mounts the attach filesystem if it is not; whether it runs over io_uring.
    fn ensure_mounted(&self, uring: bool, engine: &crate::engine::Engine) -> Result<bool, String> {
        let mut session = self.session.lock();
        if let Some(session) = session.as_ref() {
            return Ok(session.over_uring());
        }
        // Loop devices and a mount left by a killed node would make this one fail.
        let prefix = format!("{}/", self.mountpoint.display());
        for (device, backing) in kernel_iface::loopdev::backings() {
            if backing.starts_with(&prefix) && kernel_iface::loopdev::detach(&device) {
                tracing::info!(device = %device.display(), backing = %backing, "released a loop device left by this node's previous run");
            }
        }
        // A killed node's mount is still there (its directory answers ENOTCONN).
        if is_mounted(&self.mountpoint) {
            let _ = kernel_iface::fuse::unmount(&self.mountpoint);
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.mountpoint)
            .map_err(|e| format!("cannot make {}: {e}", self.mountpoint.display()))?;
        let filesystem = Arc::new(fuse::AttachFs::new(Arc::clone(&self.files)));
        let channels = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let mounted = fuse::Session::mount(&self.mountpoint, filesystem, &self.runtime, channels, uring, engine)?;
        *session = Some(mounted);
        Ok(uring)
    }

    /// Attaches `volume` (which this node serves) as a block device.
    pub fn attach(&self, volume: &Arc<Volume>) -> Result<Device, String> {
        if let Some(attached) = self.devices.lock().get(&volume.name) {
            return Ok(attached.device());
        }
        self.lock_memory();
        let attached = match self.backend {
            Backend::Ublk => Attached::Ublk(ublk::UblkDevice::start(Arc::clone(volume), self.runtime.clone())?),
            Backend::Nbd => Attached::Nbd(kernel_nbd::NbdDevice::start(Arc::clone(volume), &self.runtime)?),
            Backend::FuseUring | Backend::Fuse | Backend::Auto => {
                let (device, uring) = self.attach_fuse(volume)?;
                Attached::Fuse(device, uring)
            }
        };
        let device = attached.device();
        tracing::info!(volume = %volume.name, device = %device.device.display(), backend = %device.backend, "volume attached to this host");
        let is_ublk = matches!(attached, Attached::Ublk(_));
        self.devices.lock().insert(volume.name.clone(), attached);
        if is_ublk {
            self.record_ublk();
        }
        Ok(device)
    }

    /// Rewrites `UBLK_RECORD` from the ublk devices attached now.
    fn record_ublk(&self) {
        let devices: Vec<(String, u32)> = self
            .devices
            .lock()
            .iter()
            .filter_map(|(name, attached)| match attached {
                Attached::Ublk(device) => Some((name.clone(), device.dev_id())),
                _ => None,
            })
            .collect();
        if let Err(error) = write_ublk_record(&self.ublk_record, &devices) {
            tracing::warn!(path = %self.ublk_record.display(), %error, "cannot record this node's ublk devices: after a crash they would wait until removed by hand (`ublk del`)");
        }
    }

    /// The hand-over format an upgrade in place would write now.
    #[must_use]
    pub fn handoff_format(&self) -> u32 {
        let ublk = self
            .devices
            .lock()
            .values()
            .any(|attached| matches!(attached, Attached::Ublk(_)));
        AttachHandoff::format_for(ublk)
    }

    /// A loop device over the volume's FUSE file; whether the session runs over io_uring.
    fn attach_fuse(&self, volume: &Arc<Volume>) -> Result<(LoopDevice, bool), String> {
        let unavailable = fuse_uring_unavailable();
        let uring = match (self.configured, unavailable) {
            (Backend::FuseUring, Some(why)) => return Err(format!("attach backend fuse-uring: {why}")),
            (Backend::FuseUring, None) => true,
            // `auto` chose it at start; the kernel setting may have changed since.
            (_, None) => self.backend == Backend::FuseUring,
            (_, Some(_)) => false,
        };
        let uring = self.ensure_mounted(uring, volume.engine())?;
        self.files.insert(Arc::clone(volume));
        let file = self.mountpoint.join(&volume.name);
        let device = LoopDevice::attach_with_sector_size(&file, true, Some(volume.block_size_bytes))
            .or_else(|_| LoopDevice::attach_with_sector_size(&file, false, Some(volume.block_size_bytes)))
            .map_err(|e| {
                self.files.remove(&volume.name);
                format!("cannot make a loop device over {}: {e}", file.display())
            })?;
        // The FUSE file is opened for direct I/O and a write is answered
        // only once durable on every in-sync replica: nothing the loop device
        // completed sits in a volatile cache, so its flushes (a database's
        // fsync after each commit) need not cross FUSE at all.
        if !device.declare_write_through() {
            tracing::warn!(volume = %volume.name, device = %device.path().display(), "the loop device keeps its write-back cache setting: each fsync costs a FUSE round trip");
        }
        let queue = device.tune_as_ssd();
        tracing::info!(volume = %volume.name, device = %device.path().display(), ?queue, "loop device queue");
        Ok((device, uring))
    }

    /// Removes `name`'s block device (unmount any filesystem on it first).
    pub fn detach(&self, name: &str) -> Result<(), String> {
        let Some(device) = self.devices.lock().remove(name) else {
            return Err(format!("volume {name} is not attached to this host"));
        };
        let path = device.path().to_owned();
        let is_ublk = matches!(device, Attached::Ublk(_));
        drop(device);
        if is_ublk {
            self.record_ublk();
        }
        self.files.remove(name);
        tracing::info!(volume = %name, device = %path.display(), "volume detached from this host");
        Ok(())
    }

    /// Makes the FUSE + loop devices follow their volumes' sizes after a
    /// grow (or shrink): the file's attributes are read again, then the
    /// loop device takes the new capacity (`losetup -c`), so a filesystem
    /// on it can be grown online. Kernel NBD and ublk devices keep their
    /// size until attached again.
    pub fn follow_sizes(&self) {
        let devices: Vec<(String, PathBuf)> = self
            .devices
            .lock()
            .iter()
            .filter(|(_, attached)| matches!(attached, Attached::Fuse(..)))
            .map(|(name, attached)| (name.clone(), attached.path().to_owned()))
            .collect();
        for (name, device) in devices {
            let Some(volume) = self.files.named(&name) else {
                continue;
            };
            let wanted = volume.size_bytes();
            if device_size_bytes(&device).is_none_or(|current| current == wanted) {
                continue;
            }
            // The loop device reads the size of its backing file's inode: let
            // the kernel ask the FUSE filesystem for it again (TTL 1 s).
            let _ = std::fs::metadata(self.mountpoint.join(&name));
            let refreshed = std::process::Command::new("losetup")
                .arg("-c")
                .arg(&device)
                .status()
                .is_ok_and(|status| status.success());
            if refreshed && device_size_bytes(&device) == Some(wanted) {
                tracing::info!(volume = %name, device = %device.display(), size_bytes = wanted, "attached device resized; grow the filesystem on it now (resize2fs, xfs_growfs)");
            }
        }
    }

    /// The backend in use, and what would make it faster here, if anything.
    #[must_use]
    pub fn describe(&self) -> (String, Option<String>) {
        let note = match self.backend {
            // Only when the kernel has it and it is switched off: a setting away.
            Backend::Fuse | Backend::Auto if kernel_iface::fuse::uring_enabled() == Some(false) => {
                fuse_uring_unavailable()
                    .map(|why| format!("FUSE + loop serves attached devices; {why}, and restart the node"))
            }
            _ => None,
        };
        (self.backend.name().to_owned(), note)
    }

    /// The block device of `name`, if attached here.
    #[must_use]
    pub fn device_of(&self, name: &str) -> Option<Device> {
        self.devices.lock().get(name).map(Attached::device)
    }

    /// Why attached devices cannot be kept across an upgrade in place, if so.
    #[must_use]
    pub fn hand_over_refusal(&self) -> Option<String> {
        let devices = self.devices.lock();
        let mut names = Vec::new();
        // (backend, why), each backend once.
        let mut reasons = std::collections::BTreeSet::new();
        for (name, attached) in devices.iter() {
            if let Some(why) = attached.why_not_kept() {
                names.push(name.as_str());
                reasons.insert((attached.backend(), why));
            }
        }
        if names.is_empty() {
            return None;
        }
        let (backends, why): (Vec<&str>, Vec<&str>) = reasons.into_iter().unzip();
        Some(format!(
            "attached devices of {} use a backend ({}) whose devices this node cannot keep across an upgrade in place ({}): detach them first (`ballast volume detach`), or stop and start the node; devices of the fuse backend, and ublk devices the kernel made for user recovery, are kept",
            names.join(", "),
            backends.join(", "),
            why.join("; ")
        ))
    }

    /// Stops serving attached devices without removing them: every request
    /// read is answered, then the FUSE session and the loop devices are
    /// given up for the next binary of this process (`adopt`), and the ublk
    /// devices' queues end, leaving the kernel to hold their requests until
    /// it recovers them. On failure every device serves on.
    pub fn hand_over(&self, timeout: std::time::Duration) -> Result<AttachHandoff, String> {
        if let Some(why) = self.hand_over_refusal() {
            return Err(why);
        }
        let deadline = std::time::Instant::now() + timeout;
        // Held throughout: no attach or detach while devices change hands.
        let mut devices = self.devices.lock();
        let ublk: Vec<&ublk::UblkDevice> = devices
            .values()
            .filter_map(|attached| match attached {
                Attached::Ublk(device) => Some(device),
                _ => None,
            })
            .collect();
        // ublk first: a paused device serves on if anything below fails.
        for (index, device) in ublk.iter().enumerate() {
            if let Err(error) = device.pause(deadline) {
                ublk[..index].iter().for_each(|device| device.resume());
                return Err(error);
            }
        }
        let mut session = self.session.lock();
        let handed = match session.as_mut() {
            Some(current) => match current.hand_over(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(handed) => Some(handed),
                Err(error) => {
                    ublk.iter().for_each(|device| device.resume());
                    return Err(error);
                }
            },
            None => None,
        };
        drop(ublk);
        drop(session.take()); // inert: the filesystem stays mounted
        let mut handoff = AttachHandoff {
            session: handed,
            ..AttachHandoff::default()
        };
        for (name, attached) in std::mem::take(&mut *devices) {
            match attached {
                Attached::Fuse(device, _) => handoff.devices.push((name, device.keep())),
                Attached::Ublk(device) => handoff.ublk.push((name, device.release())),
                Attached::Nbd(_) => unreachable!("refused by hand_over_refusal"),
            }
        }
        // Their volumes (and so the engine) are released for a clean stop.
        // The ublk record stays: the devices wait for the next program.
        self.files.clear();
        Ok(handoff)
    }

    /// Takes over the devices the previous binary of this process handed
    /// over: FUSE requests are read at once and wait (at most
    /// `ADOPTED_SERVING_WAIT`) until this node serves their volumes again;
    /// ublk devices are recovered and let their requests in then.
    pub fn adopt(&self, handoff: &AttachHandoff, volumes: &crate::volume::Volumes) -> Result<(), String> {
        if !handoff.devices.is_empty() || !handoff.ublk.is_empty() {
            self.lock_memory();
        }
        let deadline = std::time::Instant::now() + ADOPTED_SERVING_WAIT;
        for (name, dev_id) in &handoff.ublk {
            let Some(volume) = volumes.get(name) else {
                tracing::error!(volume = %name, dev_id, "a ublk device handed over names a volume this node does not hold: removed, its I/O fails");
                if let Err(error) = ublk::remove_left(*dev_id) {
                    tracing::warn!(dev_id, %error, "cannot remove the ublk device");
                }
                continue;
            };
            let device = ublk::UblkDevice::recover(volume, *dev_id, self.runtime.clone(), deadline)?;
            self.devices.lock().insert(name.clone(), Attached::Ublk(device));
        }
        self.record_ublk();
        let Some(handed) = &handoff.session else {
            return Ok(());
        };
        for (name, device) in &handoff.devices {
            match volumes.get(name) {
                Some(volume) => self.files.insert(volume),
                None => {
                    tracing::error!(volume = %name, device = %device.display(), "a device handed over names a volume this node does not hold: its I/O fails")
                }
            }
            self.devices
                .lock()
                .insert(name.clone(), Attached::Fuse(LoopDevice::adopt(device.clone()), false));
        }
        self.files.wait_for_serving(deadline);
        let filesystem = Arc::new(fuse::AttachFs::new(Arc::clone(&self.files)));
        let channels = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let session = fuse::Session::adopt(handed, filesystem, &self.runtime, channels)?;
        *self.session.lock() = Some(session);
        tracing::info!(
            devices = handoff.devices.len() + handoff.ublk.len(),
            "attached devices taken over from the previous binary"
        );
        Ok(())
    }

    /// At a start without a hand-over: the ublk devices this node's
    /// previous run left (`UBLK_RECORD`: it crashed or was killed), whose
    /// requests the kernel holds, are taken back when this node holds their
    /// volumes (the requests go on once it serves them), else removed (the
    /// requests fail). Devices another live process serves are left alone.
    pub fn recover_left(&self, volumes: &crate::volume::Volumes) {
        let recorded = read_ublk_record(&self.ublk_record);
        if recorded.is_empty() {
            return;
        }
        let deadline = std::time::Instant::now() + ADOPTED_SERVING_WAIT;
        for (name, dev_id) in recorded {
            match ublk::left_waiting(dev_id) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(volume = %name, dev_id, %error, "cannot look at a ublk device this node left");
                    continue;
                }
            }
            let recovered = volumes
                .get(&name)
                .ok_or_else(|| format!("volume {name} is not held by this node"))
                .and_then(|volume| ublk::UblkDevice::recover(volume, dev_id, self.runtime.clone(), deadline));
            match recovered {
                Ok(device) => {
                    self.lock_memory();
                    tracing::info!(volume = %name, device = %device.path().display(), "ublk device left by this node's previous run taken back");
                    self.devices.lock().insert(name, Attached::Ublk(device));
                }
                Err(error) => {
                    tracing::warn!(volume = %name, dev_id, %error, "removing a ublk device left by this node's previous run: its waiting requests fail");
                    if let Err(error) = ublk::remove_left(dev_id) {
                        tracing::warn!(volume = %name, dev_id, %error, "cannot remove the ublk device");
                    }
                }
            }
        }
        self.record_ublk();
    }

    /// Detaches everything and unmounts (node shutdown).
    pub fn shutdown(&self) {
        let mut devices = std::mem::take(&mut *self.devices.lock());
        let had_ublk = devices.values().any(|attached| matches!(attached, Attached::Ublk(_)));
        devices.clear();
        // After a hand-over there are none here, and the record stays for
        // the next program.
        if had_ublk {
            self.record_ublk();
        }
        if let Some(session) = self.session.lock().take() {
            drop(session);
        }
        self.files.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ublk_record_round_trips_and_goes_when_empty() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(UBLK_RECORD);
        assert!(read_ublk_record(&path).is_empty(), "no record: nothing left");
        let devices = vec![("db".to_owned(), 3), ("logs".to_owned(), 11)];
        write_ublk_record(&path, &devices).unwrap();
        assert_eq!(read_ublk_record(&path), devices);
        write_ublk_record(&path, &[]).unwrap();
        assert!(!path.exists(), "an empty record is removed");
        write_ublk_record(&path, &[]).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read_ublk_record(&path).is_empty(), "an unreadable record is ignored");
    }

    #[test]
    fn hand_overs_with_ublk_devices_need_format_2_and_format_1_records_still_read() {
        let mut handoff = AttachHandoff::default();
        assert_eq!(handoff.format(), 1);
        handoff.ublk.push(("db".into(), 0));
        assert_eq!(handoff.format(), 2);
        let old: AttachHandoff = serde_json::from_str(r#"{"session":null,"devices":[["v","/dev/loop3"]]}"#).unwrap();
        assert!(old.ublk.is_empty());
        assert_eq!(old.devices, [("v".to_owned(), PathBuf::from("/dev/loop3"))]);
        assert!(crate::handoff::FORMATS_READ.contains(&1) && crate::handoff::FORMATS_READ.contains(&2));
    }
}
