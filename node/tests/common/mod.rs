//! Shared helpers for tests that run the real `ballast` binary on loop devices.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use kernel_iface::loopdev::{record_skip, unavailable_reason, LoopDevice};

/// The binary under test.
pub fn ballast() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ballast"));
    command.env("BALLAST_LOG", "warn");
    command
}

/// Runs `ballast ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    ballast().args(args).output().expect("run ballast")
}

/// Enrolls a new file disk `dir/disk.img` of `size` (e.g. "256MiB") into a new
/// data directory `dir/data`, `extra` more `disk enroll` arguments; both paths.
pub fn enroll_file_disk(dir: &Path, size: &str, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let file = dir.join("disk.img");
    let enrolled = ballast()
        .args(["disk", "enroll", "--data-dir"])
        .arg(&data)
        .args(["--size", size])
        .args(extra)
        .arg(&file)
        .output()
        .expect("run ballast");
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    (data, file)
}

/// stdout + stderr of an output, for messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A temporary directory on a real filesystem (O_DIRECT works there, not on tmpfs).
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").expect("scratch directory")
}

/// A loop device over a new backing file of `size_bytes` in `dir`, or None
/// (with the skip recorded) when loop devices are unavailable.
pub fn loop_device(test: &str, dir: &Path, size_bytes: u64) -> Option<LoopDevice> {
    if let Some(why) = unavailable_reason() {
        record_skip(test, &why);
        return None;
    }
    let backing = dir.join(format!("disk-{}.img", std::process::id()));
    std::fs::File::create(&backing).unwrap().set_len(size_bytes).unwrap();
    Some(LoopDevice::attach(&backing, true).expect("losetup"))
}

/// Unmounts a path on drop.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Seconds-bounded count of loop iterations: fewer with BALLAST_TEST_QUICK=1.
pub fn iterations(full: usize, quick: usize) -> usize {
    if std::env::var("BALLAST_TEST_QUICK").as_deref() == Ok("1") {
        quick
    } else {
        full
    }
}

pub mod cluster;
pub mod firewall;
pub mod nbd;
pub mod node;
pub mod plugin;

/// True when this host can attach volumes through FUSE + loop (loop
/// devices, /dev/fuse, and every one of `tools` on PATH); otherwise records
/// why `test` skips.
pub fn host_attach_available(test: &str, tools: &[&str]) -> bool {
    if let Some(why) = unavailable_reason() {
        record_skip(test, &why);
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        record_skip(test, "no /dev/fuse (FUSE is not available on this host)");
        return false;
    }
    tools.iter().all(|tool| have_tool(test, tool))
}

/// True when `tool` is on PATH; otherwise records a skip for `test`.
pub fn have_tool(test: &str, tool: &str) -> bool {
    let found =
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if !found {
        record_skip(
            test,
            &format!("{tool} is not installed (ci/install-deps.sh installs it)"),
        );
    }
    found
}

/// Overwrites the first byte of the first 4 KiB block of `path` that is all `fill`; true if found.
pub fn corrupt_block_filled_with(path: &std::path::Path, fill: u8) -> bool {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut block = vec![0u8; 4096];
    let mut offset = 0u64;
    while file.read_exact(&mut block).is_ok() {
        if block.iter().all(|byte| *byte == fill) {
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&[!fill]).unwrap();
            file.sync_all().unwrap();
            return true;
        }
        offset += 4096;
    }
    false
}

/// `qemu-io -f raw -c COMMAND URI` (one command against an NBD export).
pub fn qemu_io(uri: &str, command: &str) -> Output {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, uri])
        .output()
        .expect("run qemu-io")
}

/// Runs one qemu-io command on `uri` opened read-only (a snapshot's export
/// refuses read-write opens).
pub fn qemu_io_read_only(uri: &str, command: &str) -> Output {
    Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", command, uri])
        .output()
        .expect("run qemu-io")
}

/// Whether a qemu-io run succeeded: exit status 0 and no failed command
/// (qemu-io exits 0 after a failed read or write).
pub fn qemu_io_ok(output: &Output) -> bool {
    output.status.success() && !text(output).contains("failed")
}
