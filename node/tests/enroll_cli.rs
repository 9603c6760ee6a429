//! `ballast disk enroll` and `disk list` on real loop devices: what is
//! refused, what --force does, and what the user is told.

mod common;

use std::process::Command;

use common::{loop_device, run, scratch, text, Mount};

#[test]
fn a_device_with_a_filesystem_is_refused_unless_forced() {
    let dir = scratch();
    let Some(device) = loop_device(
        "a_device_with_a_filesystem_is_refused_unless_forced",
        dir.path(),
        256 << 20,
    ) else {
        return;
    };
    let dev = device.path().to_str().unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F", dev])
        .status()
        .unwrap()
        .success());
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let refused = run(&["disk", "enroll", "--data-dir", data, dev]);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(
        message.contains("ext2/3/4 filesystem") && message.contains("--force"),
        "{message}"
    );
    let forced = run(&["disk", "enroll", "--data-dir", data, "--force", dev]);
    let message = text(&forced);
    assert!(forced.status.success(), "{message}");
    assert!(
        message.contains("destroying") && message.contains("enrolled"),
        "{message}"
    );
    // The filesystem signature is gone; the disk now reads as ballast's.
    let listed = text(&run(&["disk", "list"]));
    let line = listed
        .lines()
        .find(|l| l.starts_with(device.path().file_name().unwrap().to_str().unwrap()))
        .unwrap();
    assert!(line.contains("already enrolled"), "{line}");
}

#[test]
fn a_mounted_device_is_refused_even_when_forced() {
    let dir = scratch();
    let Some(device) = loop_device("a_mounted_device_is_refused_even_when_forced", dir.path(), 256 << 20) else {
        return;
    };
    let dev = device.path().to_str().unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F", dev])
        .status()
        .unwrap()
        .success());
    let point = dir.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    assert!(Command::new("mount").arg(dev).arg(&point).status().unwrap().success());
    let _mount = Mount(point.clone());
    let data = dir.path().join("data");
    let refused = run(&["disk", "enroll", "--data-dir", data.to_str().unwrap(), "--force", dev]);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(
        message.contains("mounted at") && message.contains("unmount"),
        "{message}"
    );
    // Nothing was written: the filesystem still mounts fine (it is mounted).
    assert!(point.join("lost+found").exists());
}

#[test]
fn a_missing_file_needs_a_size_and_then_becomes_a_disk() {
    let dir = scratch();
    let data = dir.path().join("data");
    let file = dir.path().join("file-disk.img");
    let (data, file) = (data.to_str().unwrap(), file.to_str().unwrap());
    let refused = run(&["disk", "enroll", "--data-dir", data, file]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("--size"), "{}", text(&refused));
    let created = run(&[
        "disk",
        "enroll",
        "--data-dir",
        data,
        "--size",
        "128MiB",
        "--segment-size",
        "1MiB",
        file,
    ]);
    assert!(created.status.success(), "{}", text(&created));
    assert_eq!(std::fs::metadata(file).unwrap().len(), 128 << 20);
    let status = run(&["disk", "status", "--data-dir", data, "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(rows[0]["size_bytes"], 128 << 20);
    assert_eq!(rows[0]["used_bytes"], 0);
    // Enrolling it again is refused: it is already a ballast disk.
    let again = run(&["disk", "enroll", "--data-dir", data, file]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already enrolled"), "{}", text(&again));
}

#[test]
fn a_disk_of_another_node_is_refused_at_start() {
    let dir = scratch();
    let file = dir.path().join("shared.img");
    let (a, b) = (dir.path().join("node-a"), dir.path().join("node-b"));
    let enrolled = run(&[
        "disk",
        "enroll",
        "--data-dir",
        a.to_str().unwrap(),
        "--size",
        "128MiB",
        "--segment-size",
        "1MiB",
        file.to_str().unwrap(),
    ]);
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    // Node B's directory claims the same disk (as a careless copy would).
    assert!(run(&[
        "disk",
        "enroll",
        "--data-dir",
        b.to_str().unwrap(),
        "--size",
        "128MiB",
        dir.path().join("b.img").to_str().unwrap()
    ])
    .status
    .success());
    std::fs::copy(a.join("disks.toml"), b.join("disks.toml")).unwrap();
    let status = run(&["disk", "status", "--data-dir", b.to_str().unwrap()]);
    assert!(!status.status.success());
    assert!(text(&status).contains("belongs to node"), "{}", text(&status));
}

#[test]
fn bad_sizes_get_a_clear_error() {
    let dir = scratch();
    let out = run(&[
        "disk",
        "enroll",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--size",
        "ten",
        "x.img",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid size \"ten\""), "{}", text(&out));
    let out = run(&[
        "disk",
        "enroll",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--size",
        "64MiB",
        "--segment-size",
        "3MiB",
        dir.path().join("y.img").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("power of two"), "{}", text(&out));
}

/// A rolling upgrade's guard on disks: a disk in a format this build does
/// not read (written by a newer ballast) stops the node with an error that
/// names both format versions and this ballast's, and not a byte changes.
#[test]
fn a_disk_in_a_newer_format_is_refused_naming_both_versions_and_left_unchanged() {
    let dir = scratch();
    let (data, file) = common::enroll_file_disk(dir.path(), "64MiB", &["--segment-size", "1MiB"]);
    // Both superblock copies (bytes 0 and 4096) say format 2, checksums valid.
    let mut image = std::fs::read(&file).unwrap();
    for copy in [0_usize, 4096] {
        let block = &mut image[copy..copy + 4096];
        block[8..12].copy_from_slice(&2_u32.to_le_bytes());
        let crc = disk_layout::codec::crc32c_with_hole(block, 12);
        block[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&file, &image).unwrap();
    let expected = [
        "format version 2 is not supported by ballast",
        env!("CARGO_PKG_VERSION"),
        "reads format 1",
        "nothing on the disk was changed",
    ];
    let status = run(&["disk", "status", "--data-dir", data.to_str().unwrap()]);
    assert!(!status.status.success());
    let started = common::node::run_with_timeout(
        common::ballast()
            .args(["node", "run", "--data-dir", data.to_str().unwrap()])
            .args(["--listen-api", "127.0.0.1:0", "--listen-nbd", "127.0.0.1:0"])
            .args(["--listen-peer", "127.0.0.1:0"]),
        std::time::Duration::from_secs(60),
    );
    assert!(!started.status.success(), "the node started on a disk it cannot read");
    for output in [&status, &started] {
        for part in expected {
            assert!(text(output).contains(part), "{part:?} missing: {}", text(output));
        }
    }
    assert!(std::fs::read(&file).unwrap() == image, "the disk was changed");
}

/// A loop device over a backing file whose every byte was written, as a
/// used SSD's blocks are; returns it with its backing file.
fn written_loop_device(
    test: &str,
    dir: &std::path::Path,
) -> Option<(kernel_iface::loopdev::LoopDevice, std::path::PathBuf)> {
    let device = loop_device(test, dir, 64 << 20)?;
    let backing = dir.join(format!("disk-{}.img", std::process::id()));
    std::fs::write(&backing, vec![0x5A; 64 << 20]).unwrap();
    Some((device, backing))
}

fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn enrollment_discards_the_whole_device_unless_told_not_to() {
    let test = "enrollment_discards_the_whole_device_unless_told_not_to";
    let (kept_dir, discarded_dir) = (scratch(), scratch());
    let Some((kept, kept_backing)) = written_loop_device(test, kept_dir.path()) else {
        return;
    };
    let Some((discarded, discarded_backing)) = written_loop_device(test, discarded_dir.path()) else {
        return;
    };
    let data = kept_dir.path().join("data");
    let data = data.to_str().unwrap();
    let enroll = |device: &kernel_iface::loopdev::LoopDevice, extra: &[&str]| {
        let mut args = vec![
            "disk",
            "enroll",
            "--data-dir",
            data,
            "--force",
            "--segment-size",
            "1MiB",
        ];
        args.extend_from_slice(extra);
        args.push(device.path().to_str().unwrap());
        let output = run(&args);
        assert!(output.status.success(), "{}", text(&output));
        text(&output)
    };
    let message = enroll(&kept, &["--no-discard"]);
    assert!(
        message.contains("not discarding") && message.contains("--no-discard"),
        "{message}"
    );
    assert!(
        allocated_bytes(&kept_backing) >= 60 << 20,
        "--no-discard left the device's blocks as they were"
    );
    let message = enroll(&discarded, &[]);
    assert!(message.contains("discarded 64 MiB"), "{message}");
    let left = allocated_bytes(&discarded_backing);
    assert!(
        left <= 8 << 20,
        "{left} bytes still allocated: only the superblocks, checkpoint slots and wiped ends are written after the discard"
    );
}

/// First byte at or after `offset` of `path` that holds data (SEEK_DATA),
/// or None when the rest of the sparse file is a hole.
fn data_at_or_after(path: &std::path::Path, offset: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let offset = libc::off_t::try_from(offset).unwrap();
    // SAFETY: lseek on a descriptor this function owns; no memory is passed.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    u64::try_from(found).ok()
}

/// Disks larger than 16 TiB (the limit of 32-bit block addresses) hold data
/// at addresses beyond 2^32 blocks, and it reads back intact after the
/// store is reopened. The disk is a 20 TiB loop device over a sparse file in
/// memory (tmpfs: only the blocks written take memory); the store fills its
/// highest segments first, so the load's writes land beyond 16 TiB.
#[test]
fn a_disk_beyond_16_tib_holds_data_above_16_tib_that_reads_back_after_a_reopen() {
    let test = "a_disk_beyond_16_tib_holds_data_above_16_tib_that_reads_back_after_a_reopen";
    if let Some(why) = common::unavailable_reason() {
        common::record_skip(test, &why);
        return;
    }
    let memory = tempfile::tempdir_in("/dev/shm").expect("a directory on tmpfs");
    let backing = memory.path().join("big.img");
    let size: u64 = 20 << 40;
    std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
    let device = kernel_iface::loopdev::LoopDevice::attach(&backing, false).expect("losetup");
    let dir = scratch();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let dev = device.path().to_str().unwrap();
    let enrolled = run(&["disk", "enroll", "--data-dir", data, "--no-discard", dev]);
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    let ack_log = dir.path().join("acks");
    let ack_log = ack_log.to_str().unwrap();
    let load = |command: &str| {
        let output = run(&[
            "debug",
            command,
            "--data-dir",
            data,
            "--ack-log",
            ack_log,
            "--blocks",
            "20000",
            "--seconds",
            "2",
        ]);
        assert!(output.status.success(), "{command}: {}", text(&output));
        text(&output)
    };
    let written = load("write-load");
    assert!(written.contains("writes acknowledged"), "{written}");
    let high = data_at_or_after(&backing, 16 << 40);
    assert!(
        high.is_some_and(|offset| offset < size),
        "no data was written beyond 16 TiB: {high:?}"
    );
    let verified = load("verify-load");
    assert!(verified.contains("lost: 0, corrupt: 0"), "{verified}");
}
