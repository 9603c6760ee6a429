//! Device discovery and exclusive open against real loop devices, with
//! real filesystems made by mkfs and real mounts. Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;

use kernel_iface::device::{self, DeviceError, PathReport, Signature};
use kernel_iface::loopdev::{record_skip, unavailable_reason, LoopDevice};

struct Fixture {
    _dir: tempfile::TempDir,
    device: LoopDevice,
    mounted: Option<PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(point) = self.mounted.take() {
            let _ = Command::new("umount").arg(&point).status();
        }
    }
}

fn fixture(test: &str) -> Option<Fixture> {
    if let Some(why) = unavailable_reason() {
        record_skip(test, &why);
        return None;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(256 << 20).unwrap();
    let device = LoopDevice::attach(&backing, true).unwrap();
    Some(Fixture {
        _dir: dir,
        device,
        mounted: None,
    })
}

fn listed(path: &Path) -> device::BlockDevice {
    device::list_block_devices()
        .unwrap()
        .into_iter()
        .find(|d| d.path == path)
        .unwrap_or_else(|| panic!("{} not listed", path.display()))
}

fn mkfs_ext4(path: &Path) {
    let status = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn a_fresh_loop_device_is_listed_with_its_size_and_is_eligible() {
    let Some(f) = fixture("a_fresh_loop_device_is_listed_with_its_size_and_is_eligible") else {
        return;
    };
    let device = listed(f.device.path());
    assert_eq!(device.size_bytes, 256 << 20);
    assert!(device.backing_file.as_deref().unwrap_or("").ends_with("disk.img"));
    let verdict = device::eligibility(&device);
    assert!(verdict.eligible, "{:?}", verdict.reasons);
}

#[test]
fn a_device_with_an_ext4_filesystem_is_not_eligible_and_says_why() {
    let Some(f) = fixture("a_device_with_an_ext4_filesystem_is_not_eligible_and_says_why") else {
        return;
    };
    mkfs_ext4(f.device.path());
    let device = listed(f.device.path());
    assert_eq!(device.signature, Some(Signature::Ext));
    let verdict = device::eligibility(&device);
    assert!(!verdict.eligible);
    assert!(verdict.reasons.join(";").contains("ext2/3/4"), "{:?}", verdict.reasons);
}

#[test]
fn a_mounted_device_is_not_eligible_and_cannot_be_opened_exclusively() {
    let Some(mut f) = fixture("a_mounted_device_is_not_eligible_and_cannot_be_opened_exclusively") else {
        return;
    };
    mkfs_ext4(f.device.path());
    let point = f._dir.path().join("mnt");
    std::fs::create_dir(&point).unwrap();
    let status = Command::new("mount").arg(f.device.path()).arg(&point).status().unwrap();
    assert!(status.success(), "mount failed");
    f.mounted = Some(point.clone());
    let verdict = device::eligibility(&listed(f.device.path()));
    let reasons = verdict.reasons.join(";");
    assert!(reasons.contains(&point.display().to_string()), "{reasons}");
    match device::open_exclusive(f.device.path(), true) {
        Err(DeviceError::Busy { .. }) => {}
        other => panic!("open of a mounted device must be Busy, got {other:?}"),
    }
}

#[test]
fn an_open_device_cannot_be_opened_exclusively_twice() {
    let Some(f) = fixture("an_open_device_cannot_be_opened_exclusively_twice") else {
        return;
    };
    let first = device::open_exclusive(f.device.path(), true).unwrap();
    assert!(first.is_block_device);
    assert_eq!(first.size_bytes, 256 << 20);
    assert!(matches!(
        device::open_exclusive(f.device.path(), true),
        Err(DeviceError::Busy { .. })
    ));
    drop(first);
    device::open_exclusive(f.device.path(), true).expect("free after close");
}

#[test]
fn describe_path_follows_symlinks_to_the_device() {
    let Some(f) = fixture("describe_path_follows_symlinks_to_the_device") else {
        return;
    };
    let link = f._dir.path().join("by-id-link");
    std::os::unix::fs::symlink(f.device.path(), &link).unwrap();
    match device::describe_path(&link).unwrap() {
        PathReport::Block(device) => {
            assert_eq!(device.path, f.device.path());
            assert_eq!(device.size_bytes, 256 << 20);
        }
        other => panic!("expected a block device, got {other:?}"),
    }
}
