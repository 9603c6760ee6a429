//! A real `ballast plugin serve` process for tests, and the clean-up of
//! what host attach leaves on the host when a test fails or a node dies.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ballast;

pub struct PluginProcess {
    child: Child,
}

impl PluginProcess {
    /// Serves the plugin on `socket` through the node APIs `apis` (in
    /// order), authenticating with the token in `token_file`.
    pub fn start(apis: &[String], token_file: &Path, socket: &Path, mounts: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = ballast()
            .env("BALLAST_API", apis.join(","))
            .env("BALLAST_TOKEN_FILE", token_file)
            .args(["plugin", "serve", "--socket"])
            .arg(socket)
            .arg("--mounts")
            .arg(mounts)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "plugin socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    /// SIGTERM by pid, then reap.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// On any exit: unmounts `mountpoints` (lazily if a dead device holds
/// them), detaches the loop devices over files in `fuse_dirs`, and
/// unmounts those FUSE filesystems.
pub struct AttachLeftovers {
    pub mountpoints: Vec<PathBuf>,
    pub fuse_dirs: Vec<PathBuf>,
}

impl Drop for AttachLeftovers {
    fn drop(&mut self) {
        for mountpoint in &self.mountpoints {
            let _ = node::attach::unmount_even_if_dead(mountpoint);
        }
        for (device, backing) in kernel_iface::loopdev::backings() {
            if self.fuse_dirs.iter().any(|dir| Path::new(&backing).starts_with(dir)) {
                kernel_iface::loopdev::detach(&device);
            }
        }
        for dir in &self.fuse_dirs {
            let _ = Command::new("umount").arg("-l").arg(dir).output();
        }
    }
}

/// Whether a filesystem is mounted at `path`.
pub fn mounted(path: &Path) -> bool {
    node::attach::is_mounted(path)
}
