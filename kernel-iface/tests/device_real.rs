//! Device discovery and exclusive open against real loop devices, with
//! real filesystems made by mkfs, real partition tables and real mounts.
//! Needs root and losetup; otherwise each test prints "SKIP: ..." and
//! returns. Every loop device is detached, and every mount unmounted, by
//! the exact device or path this test created, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kernel_iface::device::{self, BlockDevice, DeviceError, PathReport, Signature};
use kernel_iface::loopdev::{record_skip, unavailable_reason};

const DISK_BYTES: u64 = 256 << 20;
/// mkfs.xfs refuses filesystems under 300 MB.
const XFS_DISK_BYTES: u64 = 512 << 20;
/// How long to wait for the kernel to create partition device nodes.
const NODE_WAIT: Duration = Duration::from_secs(10);
/// How long the kernel's own partition scan gets before partx is used.
const PARTSCAN_WAIT: Duration = Duration::from_secs(1);
const DETACH_ATTEMPTS: u32 = 50;

/// A loop device this test attached; detached (by its exact path) on drop.
struct Loop {
    path: PathBuf,
}

impl Loop {
    fn attach(backing: &Path, extra: &[&str]) -> Self {
        let output = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .args(extra)
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            output.status.success(),
            "losetup {}: {}",
            backing.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(printed.starts_with("/dev/loop"), "losetup printed {printed:?}");
        // Nothing may fail between attaching and owning the guard, or the
        // device would be left attached.
        Self {
            path: PathBuf::from(printed),
        }
    }

    fn partition(&self, number: u32) -> PathBuf {
        PathBuf::from(format!("{}p{number}", self.path.display()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // The device may be busy for a moment after its last user closed it.
        for _ in 0..DETACH_ATTEMPTS {
            match Command::new("losetup").arg("-d").arg(&self.path).output() {
                Ok(output) if output.status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

/// A mount this test made; unmounted (by its path) on drop.
struct Mount {
    point: PathBuf,
}

impl Mount {
    fn new(device: &Path, point: PathBuf) -> Self {
        std::fs::create_dir_all(&point).unwrap();
        run("mount", &[device.as_os_str(), point.as_os_str()]);
        Self { point }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
    }
}

/// A backing file in its own temporary directory (on /var/tmp, a disk
/// filesystem, so direct I/O loop devices work), removed on drop.
/// Fields drop in order: mounts before loops before the directory.
struct Fixture {
    mounts: Vec<Mount>,
    device: Loop,
    backing: PathBuf,
    dir: tempfile::TempDir,
}

/// Attaches a fresh sparse disk of `size_bytes`, or says why not and returns None.
fn fixture(test: &str, size_bytes: u64, prepare: impl FnOnce(&Path), extra: &[&str]) -> Option<Fixture> {
    if let Some(why) = unavailable_reason() {
        record_skip(test, &why);
        return None;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(size_bytes).unwrap();
    prepare(&backing);
    let device = Loop::attach(&backing, extra);
    Some(Fixture {
        mounts: Vec::new(),
        device,
        backing,
        dir,
    })
}

fn plain_fixture(test: &str) -> Option<Fixture> {
    fixture(test, DISK_BYTES, |_| {}, &[])
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn tool_missing(test: &str, tool: &str) -> bool {
    let missing = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map_or(true, |output| !output.status.success());
    if missing {
        record_skip(test, &format!("{tool} is not installed"));
    }
    missing
}

fn listed(path: &Path) -> BlockDevice {
    let devices = device::list_block_devices().unwrap();
    devices
        .into_iter()
        .find(|d| d.path == path)
        .unwrap_or_else(|| panic!("{} not listed", path.display()))
}

fn reasons(device: &BlockDevice) -> String {
    let verdict = device::eligibility(device);
    assert_eq!(verdict.eligible, verdict.reasons.is_empty());
    verdict.reasons.join("; ")
}

/// Waits up to `wait` for `path` to exist; says whether it does.
fn wait_for_node(path: &Path, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Writes an MBR with one Linux partition from sector 2048 to the end.
fn write_mbr(backing: &Path) {
    let sectors = u32::try_from(std::fs::metadata(backing).unwrap().len() / 512).unwrap();
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::os::unix::fs::FileExt::write_all_at(&std::fs::File::options().write(true).open(backing).unwrap(), &mbr, 0)
        .unwrap();
}

#[test]
fn a_fresh_loop_device_is_listed_with_its_size_and_is_eligible() {
    let Some(f) = plain_fixture("a_fresh_loop_device_is_listed_with_its_size_and_is_eligible") else {
        return;
    };
    let device = listed(&f.device.path);
    assert_eq!(device.size_bytes, DISK_BYTES);
    assert_eq!(device.logical_block_bytes, 512);
    assert!(!device.is_partition && !device.read_only);
    assert_eq!(device.backing_file.as_deref(), Some(f.backing.to_str().unwrap()));
    assert_eq!((device.signature, device.probe_error.as_deref()), (None, None));
    assert_eq!(reasons(&device), "");
}

#[test]
fn a_device_with_an_ext4_filesystem_is_not_eligible_and_says_why() {
    let Some(f) = plain_fixture("a_device_with_an_ext4_filesystem_is_not_eligible_and_says_why") else {
        return;
    };
    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), f.device.path.as_os_str()]);
    let device = listed(&f.device.path);
    assert_eq!(device.signature, Some(Signature::Ext));
    assert_eq!(reasons(&device), "holds an existing ext2/3/4 filesystem");
}

#[test]
fn real_xfs_and_swap_signatures_made_by_their_tools_are_recognised() {
    let test = "real_xfs_and_swap_signatures_made_by_their_tools_are_recognised";
    if tool_missing(test, "mkfs.xfs") || tool_missing(test, "mkswap") {
        return;
    }
    let Some(f) = fixture(test, XFS_DISK_BYTES, |_| {}, &[]) else {
        return;
    };
    run("mkfs.xfs", &["-q".as_ref(), "-f".as_ref(), f.device.path.as_os_str()]);
    assert_eq!(listed(&f.device.path).signature, Some(Signature::Xfs));
    run("wipefs", &["-q".as_ref(), "-a".as_ref(), f.device.path.as_os_str()]);
    let wiped = listed(&f.device.path);
    assert_eq!(wiped.signature, None, "wipefs leaves nothing we recognise");
    assert_eq!(reasons(&wiped), "");
    run("mkswap", &[f.device.path.as_os_str()]);
    assert_eq!(listed(&f.device.path).signature, Some(Signature::Swap));
}

#[test]
fn a_mounted_device_is_not_eligible_and_cannot_be_opened_exclusively() {
    let Some(mut f) = plain_fixture("a_mounted_device_is_not_eligible_and_cannot_be_opened_exclusively") else {
        return;
    };
    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), f.device.path.as_os_str()]);
    let point = f.dir.path().join("mnt");
    f.mounts.push(Mount::new(&f.device.path, point.clone()));
    let device = listed(&f.device.path);
    assert_eq!(device.mountpoints, vec![point.display().to_string()]);
    assert!(reasons(&device).contains(&format!("mounted at {}", point.display())));
    match device::open_exclusive(&f.device.path, true) {
        Err(error @ DeviceError::Busy { .. }) => {
            assert!(error.to_string().contains(&f.device.path.display().to_string()));
        }
        other => panic!("open of a mounted device must be Busy, got {other:?}"),
    }
}

#[test]
fn an_open_device_cannot_be_opened_exclusively_twice_nor_mounted() {
    let Some(f) = plain_fixture("an_open_device_cannot_be_opened_exclusively_twice_nor_mounted") else {
        return;
    };
    // A filesystem, so that the mount attempt below fails only because we hold the device.
    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), f.device.path.as_os_str()]);
    let first = device::open_exclusive(&f.device.path, true).unwrap();
    assert!(first.is_block_device);
    assert_eq!(first.size_bytes, DISK_BYTES);
    assert_eq!(first.logical_block_bytes, 512);
    let second = device::open_exclusive(&f.device.path, true);
    assert!(matches!(second, Err(DeviceError::Busy { .. })), "{second:?}");
    let mount_point = f.dir.path().join("mnt");
    std::fs::create_dir(&mount_point).unwrap();
    let mounted = Command::new("mount")
        .arg(&f.device.path)
        .arg(&mount_point)
        .output()
        .unwrap();
    if mounted.status.success() {
        let _ = Command::new("umount").arg(&mount_point).status();
        panic!("the kernel mounted a device ballast holds exclusively");
    }
    drop(first);
    device::open_exclusive(&f.device.path, true).expect("free after close");
}

#[test]
fn a_read_only_device_is_not_eligible_and_cannot_be_opened_for_writing() {
    let Some(f) = fixture(
        "a_read_only_device_is_not_eligible_and_cannot_be_opened_for_writing",
        DISK_BYTES,
        |_| {},
        &["--read-only"],
    ) else {
        return;
    };
    let device = listed(&f.device.path);
    assert!(device.read_only);
    assert_eq!(reasons(&device), "read-only");
    let opened = device::open_exclusive(&f.device.path, true);
    assert!(matches!(opened, Err(DeviceError::ReadOnly { .. })), "{opened:?}");
}

#[test]
fn a_partitioned_device_lists_its_partitions_and_their_mounts() {
    let test = "a_partitioned_device_lists_its_partitions_and_their_mounts";
    if tool_missing(test, "partx") {
        return;
    }
    let Some(mut f) = fixture(test, DISK_BYTES, write_mbr, &["--partscan"]) else {
        return;
    };
    let partition = f.device.partition(1);
    // Kernels built without MBR parsing ignore --partscan; partx then adds
    // the partition with BLKPG (it goes away when the device is detached).
    if !wait_for_node(&partition, PARTSCAN_WAIT) {
        run("partx", &["--add".as_ref(), f.device.path.as_os_str()]);
        assert!(
            wait_for_node(&partition, NODE_WAIT),
            "{} never appeared",
            partition.display()
        );
    }
    let name = partition.file_name().unwrap().to_string_lossy().into_owned();
    let disk = listed(&f.device.path);
    assert_eq!(disk.partitions, vec![name.clone()]);
    assert_eq!(disk.signature, Some(Signature::DosPartitionTable));

    run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), partition.as_os_str()]);
    let point = f.dir.path().join("part-mnt");
    f.mounts.push(Mount::new(&partition, point.clone()));
    let disk = listed(&f.device.path);
    assert_eq!(disk.mountpoints, vec![format!("{} (via {name})", point.display())]);
    let text = reasons(&disk);
    for needle in ["mounted at", "has partitions", "DOS/MBR partition table"] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    let whole = device::open_exclusive(&f.device.path, true);
    assert!(
        matches!(whole, Err(DeviceError::Busy { .. })),
        "a disk with a mounted partition must be busy: {whole:?}"
    );

    match device::describe_path(&partition).unwrap() {
        PathReport::Block(reported) => {
            assert!(reported.is_partition);
            assert_eq!(reported.name, name);
            assert_eq!(reported.size_bytes, DISK_BYTES - 2048 * 512);
            assert_eq!(reported.signature, Some(Signature::Ext));
            assert_eq!(reported.mountpoints, vec![point.display().to_string()]);
            assert!(reported.partitions.is_empty());
        }
        other => panic!("expected a partition, got {other:?}"),
    }
}

#[test]
fn describe_path_follows_symlinks_to_the_device() {
    let Some(f) = plain_fixture("describe_path_follows_symlinks_to_the_device") else {
        return;
    };
    let link = f.dir.path().join("by-id-link");
    std::os::unix::fs::symlink(&f.device.path, &link).unwrap();
    match device::describe_path(&link).unwrap() {
        PathReport::Block(device) => {
            assert_eq!(device.path, f.device.path);
            assert_eq!(device.size_bytes, DISK_BYTES);
            assert!(!device.is_partition);
            assert_eq!(device::eligibility(&device).reasons, Vec::<String>::new());
        }
        other => panic!("expected a block device, got {other:?}"),
    }
}

#[test]
fn a_file_backing_a_loop_device_is_reported_as_in_use() {
    let Some(f) = plain_fixture("a_file_backing_a_loop_device_is_reported_as_in_use") else {
        return;
    };
    let report = device::describe_path(&f.backing).unwrap();
    let loop_name = f.device.path.file_name().unwrap().to_string_lossy().into_owned();
    match &report {
        PathReport::File { holders, .. } => assert_eq!(holders, &vec![loop_name.clone()]),
        other => panic!("expected a file, got {other:?}"),
    }
    let verdict = report.eligibility();
    assert!(!verdict.eligible);
    assert_eq!(verdict.reasons, vec![format!("in use by holders {loop_name}")]);
}

#[test]
fn a_regular_file_opened_exclusively_is_busy_for_a_second_opener() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(DISK_BYTES).unwrap();
    let first = device::open_exclusive(&path, true).unwrap();
    assert!(!first.is_block_device);
    assert_eq!(first.size_bytes, DISK_BYTES);
    let second = device::open_exclusive(&path, true);
    assert!(matches!(second, Err(DeviceError::Busy { .. })), "{second:?}");
    drop(first);
    device::open_exclusive(&path, true).expect("free after close");
}
