//! Loop devices: a regular file as a block device (`losetup`). Used by the
//! test suite and the demo to stand in for NVMe disks, and later by host
//! attach (FUSE + loop). Detached on drop, by the exact device attached.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An attached loop device; detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` (with direct I/O when `direct_io`).
    pub fn attach(backing: &Path, direct_io: bool) -> std::io::Result<Self> {
        Self::attach_with_sector_size(backing, direct_io, None)
    }

    /// Attaches `backing` with a logical sector size (e.g. 4096 for a
    /// backing file that only takes 4 KiB-aligned I/O).
    pub fn attach_with_sector_size(
        backing: &Path,
        direct_io: bool,
        sector_bytes: Option<u32>,
    ) -> std::io::Result<Self> {
        let mut command = Command::new("losetup");
        command.arg("--find").arg("--show");
        if direct_io {
            command.arg("--direct-io=on");
        }
        if let Some(bytes) = sector_bytes {
            command.arg("--sector-size").arg(bytes.to_string());
        }
        let output = command.arg(backing).output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "losetup {} failed: {}",
                backing.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(Self { path })
    }

    /// Takes charge of a loop device a previous program of this process
    /// attached (an upgrade in place; see `keep`).
    #[must_use]
    pub fn adopt(path: PathBuf) -> Self {
        Self { path }
    }

    /// Lets the device live on without this value (it is not detached):
    /// the device node, for whoever adopts it.
    #[must_use]
    pub fn keep(self) -> PathBuf {
        let path = self.path.clone();
        std::mem::forget(self);
        path
    }

    /// The device node, e.g. /dev/loop3.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue settings for a device that is a fast SSD underneath: not
    /// rotational (no seek-minded scheduling or readahead), no I/O
    /// scheduler, the deepest queue the device takes. What a setting
    /// refuses stays as the kernel made it; the settings in force are returned.
    #[must_use]
    pub fn tune_as_ssd(&self) -> Vec<(String, String)> {
        let Some(name) = self.path.file_name().and_then(|name| name.to_str()) else {
            return Vec::new();
        };
        let queue = PathBuf::from("/sys/block").join(name).join("queue");
        for (setting, value) in [("rotational", "0"), ("scheduler", "none"), ("nr_requests", "256")] {
            let _ = std::fs::write(queue.join(setting), value);
        }
        [
            "rotational",
            "scheduler",
            "nr_requests",
            "write_cache",
            "discard_max_bytes",
            "logical_block_size",
        ]
        .iter()
        .map(|setting| {
            let value = std::fs::read_to_string(queue.join(setting)).unwrap_or_default();
            ((*setting).to_owned(), value.trim().to_owned())
        })
        .collect()
    }
}

impl LoopDevice {
    /// Tells the block layer the device has no volatile write cache
    /// (`queue/write_cache` = "write through"), as an SSD with power-loss
    /// protection says: flushes then complete at once without reaching the
    /// device, and FUA is dropped from writes. Only true when every write
    /// the backing file completes is already durable; whether the kernel
    /// took the setting.
    pub fn declare_write_through(&self) -> bool {
        let Some(name) = self.path.file_name().and_then(|name| name.to_str()) else {
            return false;
        };
        let setting = PathBuf::from("/sys/block").join(name).join("queue/write_cache");
        std::fs::write(&setting, "write through").is_ok()
            && std::fs::read_to_string(&setting).is_ok_and(|value| value.trim() == "write through")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // The device may be briefly busy after its last user exited.
        for _ in 0..50 {
            if detach(&self.path) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

/// `losetup -d DEVICE`: detaches it now, or (busy) when its last user
/// closes it; whether losetup succeeded.
pub fn detach(device: &Path) -> bool {
    Command::new("losetup")
        .arg("-d")
        .arg(device)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The loop devices in use (e.g. /dev/loop3) and the files backing them
/// (as /sys/block/loopN/loop/backing_file names them).
#[must_use]
pub fn backings() -> Vec<(PathBuf, String)> {
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

/// Why loop devices cannot be used here, if they cannot.
#[must_use]
pub fn unavailable_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root for loop devices".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop module missing)".into());
    }
    if Command::new("losetup").arg("--version").output().is_err() {
        return Some("losetup is not installed".into());
    }
    None
}

/// Reports a skipped test: prints `SKIP: test: why` and appends it to the
/// file named by `BALLAST_SKIP_LOG`, which `scripts/test.sh` counts.
pub fn record_skip(test: &str, why: &str) {
    let line = format!("SKIP: {test}: {why}");
    println!("{line}");
    if let Some(path) = std::env::var_os("BALLAST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
            let _ = writeln!(file, "{line}");
        }
    }
}
