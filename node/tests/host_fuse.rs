//! The host path available on every Linux box: nbdfuse exposes a volume as
//! a file, a loop device turns it into a block device, ext4 goes on top.
//! Files written through it survive unmount and remount, and fsck is clean.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::{run_with_timeout, TestNode};
use common::{have_tool, record_skip, text, unavailable_reason, LoopDevice, Mount};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// nbdfuse serving one volume as MOUNTPOINT/nbd; unmounted and stopped (by pid) on drop.
struct Fuse {
    mountpoint: PathBuf,
    child: Child,
}

impl Fuse {
    fn start(mountpoint: &Path, uri: &str, pidfile: &Path) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(pidfile)
            .arg(mountpoint.join("nbd"))
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut fuse = Self {
            mountpoint: mountpoint.to_owned(),
            child,
        };
        let started = Instant::now();
        while !pidfile.exists() {
            if let Some(status) = fuse.child.try_wait().unwrap() {
                panic!("nbdfuse exited: {status}");
            }
            assert!(started.elapsed() < Duration::from_secs(30), "nbdfuse not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        fuse
    }

    fn file(&self) -> PathBuf {
        self.mountpoint.join("nbd")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.mountpoint).status();
        let _ = Command::new("fusermount").arg("-u").arg(&self.mountpoint).status();
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn must(command: &mut Command) -> String {
    let output = run_with_timeout(command, TOOL_TIMEOUT);
    assert!(output.status.success(), "{command:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn ext4_on_nbdfuse_and_a_loop_device_keeps_files_and_fscks_clean() {
    let test = "ext4_on_nbdfuse_and_a_loop_device_keeps_files_and_fscks_clean";
    if !have_tool(test, "nbdfuse") || !have_tool(test, "mkfs.ext4") {
        return;
    }
    if let Some(why) = unavailable_reason() {
        record_skip(test, &why);
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        record_skip(test, "no /dev/fuse");
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("fs", "256MiB");
    let fuse = Fuse::start(
        &node.dir.path().join("fuse"),
        &node.uri("fs"),
        &node.dir.path().join("nbdfuse.pid"),
    );
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mnt = node.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        // 4 KiB sectors: the export's minimum block size is 4096, so every
        // request the loop device sends through nbdfuse is aligned.
        let device =
            LoopDevice::attach_with_sector_size(&fuse.file(), false, Some(4096)).expect("losetup on the nbdfuse file");
        let dev = device.path().to_owned();
        must(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
        must(Command::new("mount").arg(&dev).arg(&mnt));
        let mounted = Mount(mnt.clone());
        for index in 0..20 {
            std::fs::write(mnt.join(format!("file-{index}")), &payload[index * 1000..]).unwrap();
        }
        must(Command::new("sync").arg("-f").arg(&mnt));
        drop(mounted);
        must(Command::new("fsck.ext4").args(["-f", "-n"]).arg(&dev));
        // Remount: every file reads back.
        must(Command::new("mount").arg(&dev).arg(&mnt));
        let mounted = Mount(mnt.clone());
        for index in 0..20 {
            let read = std::fs::read(mnt.join(format!("file-{index}"))).unwrap();
            assert!(read == payload[index * 1000..], "file-{index} differs after remount");
        }
        drop(mounted);
    }
    let info = node.cli_ok(&["volume", "inspect", "fs", "--json"]);
    let used = serde_json::from_str::<serde_json::Value>(&info).unwrap()["used_bytes"]
        .as_u64()
        .unwrap();
    assert!(used >= 20 * 2_900_000, "volume holds only {used} bytes");
    drop(fuse);
}
