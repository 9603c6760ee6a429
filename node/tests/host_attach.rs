//! Host attach through the node's own FUSE backend: `volume attach
//! --device` gives a loop device over a FUSE file the node serves from the
//! volume; ext4 goes on it, files survive detach and a second attach, and
//! fsck is clean.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::node::{run_with_timeout, TestNode};
use common::{host_attach_available, text, Mount};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Cleans up on a failed test too: the filesystem on the device, the
/// device, and the node's FUSE mount (the node itself is killed -9).
struct Leftovers {
    mountpoint: PathBuf,
    fuse_dir: PathBuf,
    device: Option<PathBuf>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").arg("-d").arg(device).output();
        }
        let _ = Command::new("fusermount3").arg("-u").arg(&self.fuse_dir).output();
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run_with_timeout(Command::new(program).args(args), TOOL_TIMEOUT);
    assert!(output.status.success(), "{program} {args:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn attach(node: &TestNode, leftovers: &mut Leftovers) -> PathBuf {
    let device = PathBuf::from(node.cli_ok(&["volume", "attach", "data", "--device"]).trim());
    leftovers.device = Some(device.clone());
    assert!(
        device.to_string_lossy().starts_with("/dev/loop"),
        "{}",
        device.display()
    );
    device
}

fn loop_devices() -> String {
    run_ok("losetup", &["-a"])
}

#[test]
fn a_volume_attached_through_fuse_holds_an_ext4_filesystem_across_detach_and_reattach() {
    let test = "a_volume_attached_through_fuse_holds_an_ext4_filesystem";
    if !host_attach_available(test, &["fusermount3", "mkfs.ext4"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "256MiB");
    let mountpoint = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut leftovers = Leftovers {
        mountpoint: mountpoint.clone(),
        fuse_dir: node.data_dir.join("attach"),
        device: None,
    };

    let device = attach(&node, &mut leftovers);
    // Attaching again gives the same device.
    assert_eq!(attach(&node, &mut leftovers), device);
    run_ok("mkfs.ext4", &["-q", "-F", device.to_str().unwrap()]);
    let payload: Vec<u8> = (0..4 << 20).map(|i: u32| u8::try_from(i % 251).unwrap()).collect();
    {
        run_ok("mount", &[device.to_str().unwrap(), mountpoint.to_str().unwrap()]);
        let _mounted = Mount(mountpoint.clone());
        std::fs::write(mountpoint.join("payload.bin"), &payload).unwrap();
        std::fs::write(mountpoint.join("note.txt"), "written through FUSE + loop\n").unwrap();
        run_ok("sync", &[]);
    }
    node.cli_ok(&["volume", "detach", "data"]);
    leftovers.device = None;
    assert!(
        !loop_devices().contains(&format!("{}:", device.display())),
        "the loop device is gone after detach: {}",
        loop_devices()
    );
    let refused = node.cli(&["volume", "detach", "data"]);
    assert!(!refused.status.success(), "detaching twice");
    assert!(text(&refused).contains("not attached"), "{}", text(&refused));

    let device = attach(&node, &mut leftovers);
    run_ok("fsck.ext4", &["-n", "-f", device.to_str().unwrap()]);
    {
        run_ok("mount", &[device.to_str().unwrap(), mountpoint.to_str().unwrap()]);
        let _mounted = Mount(mountpoint.clone());
        assert_eq!(std::fs::read(mountpoint.join("payload.bin")).unwrap(), payload);
        assert_eq!(
            std::fs::read_to_string(mountpoint.join("note.txt")).unwrap(),
            "written through FUSE + loop\n"
        );
    }
    // The node serving the host's device keeps its memory resident.
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmLck:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    if kernel_iface::process::has_capability(14) {
        assert!(locked_kib > 0, "no memory locked by the serving node:\n{status}");
    }
    node.cli_ok(&["volume", "detach", "data"]);
    leftovers.device = None;
    let log = node.log_text();
    assert!(log.contains("host attach FUSE filesystem mounted"), "{log}");
    assert!(log.contains("host attach backend"), "{log}");
}

#[test]
fn a_forced_attach_backend_the_host_lacks_fails_the_attach_clearly_and_the_node_keeps_serving() {
    let test = "a_forced_attach_backend_the_host_lacks_fails_the_attach_clearly";
    for (backend, present, hint) in [
        ("nbd", "/sys/module/nbd", "modprobe nbd"),
        ("ublk", "/dev/ublk-control", "modprobe ublk_drv"),
    ] {
        if std::path::Path::new(present).exists() {
            common::record_skip(
                test,
                &format!("this host has {present}: the {backend} backend would work"),
            );
            continue;
        }
        let node = TestNode::start_unclustered(test, "127.0.0.1", &[1 << 30], &["--attach-backend", backend]);
        node.cli_ok(&["cluster", "init"]);
        node.create_volume("data", "64MiB");
        let refused = node.cli(&["volume", "attach", "data", "--device"]);
        assert!(!refused.status.success(), "{backend}: {}", text(&refused));
        assert!(text(&refused).contains(hint), "{backend}: {}", text(&refused));
        // Nothing was recorded: the volume is not attached anywhere.
        let info = node.inspect("data");
        assert_eq!(info["attached_to"], 0, "{backend}: {info:#}");
        node.cli_ok(&["volume", "list"]);
    }
    // A bad backend name is refused at start, with the choices.
    let bad = common::run(&[
        "node",
        "run",
        "--attach-backend",
        "floppy",
        "--data-dir",
        "/nonexistent",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("auto, ublk, nbd or fuse"), "{}", text(&bad));
}

#[test]
fn volume_mount_formats_on_first_use_and_volume_unmount_detaches() {
    let test = "volume_mount_formats_on_first_use";
    if !host_attach_available(test, &["fusermount3", "mkfs.ext4", "blkid"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "128MiB");
    let mountpoint = node.dir.path().join("mnt");
    let _leftovers = Leftovers {
        mountpoint: mountpoint.clone(),
        fuse_dir: node.data_dir.join("attach"),
        device: None,
    };
    let mounted = node.cli_ok(&["volume", "mount", "data", mountpoint.to_str().unwrap()]);
    assert!(mounted.contains("mounted volume data"), "{mounted}");
    let fs_type = run_ok("findmnt", &["-n", "-o", "FSTYPE", mountpoint.to_str().unwrap()]);
    assert_eq!(fs_type.trim(), "ext4");
    std::fs::write(mountpoint.join("kept.txt"), "kept\n").unwrap();
    let unmounted = node.cli_ok(&["volume", "unmount", "data"]);
    assert!(unmounted.contains("unmounted"), "{unmounted}");
    assert!(
        !std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(mountpoint.to_str().unwrap()),
        "still mounted"
    );
    // The second mount finds the filesystem and does not format it again.
    let again = node.cli(&["volume", "mount", "data", mountpoint.to_str().unwrap()]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(!text(&again).contains("making a"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(mountpoint.join("kept.txt")).unwrap(), "kept\n");
    node.cli_ok(&["volume", "unmount", "data"]);
    // Against another host's API, mount refuses (the device would be there).
    let remote = node.cli(&["volume", "--api", "http://10.9.9.9:9410", "mount", "data", "/tmp/x"]);
    assert!(!remote.status.success());
    assert!(text(&remote).contains("this host's node"), "{}", text(&remote));
}

#[test]
fn only_one_host_has_a_volume_attached_until_a_forced_failover_which_fences_the_old_one() {
    let test = "only_one_host_has_a_volume_attached";
    if !host_attach_available(test, &["fusermount3"]) {
        return;
    }
    let cluster = common::cluster::TestCluster::start(test, 2, &[]);
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    first.cli_ok(&["volume", "create", "data", "--size", "64MiB", "--repl", "2"]);
    common::cluster::wait_until("both replicas in sync", || {
        let info: serde_json::Value = first.inspect("data");
        info["in_sync"].as_array().is_some_and(|nodes| nodes.len() == 2)
    });
    let mut first_leftovers = Leftovers {
        mountpoint: first.dir.path().join("mnt"),
        fuse_dir: first.data_dir.join("attach"),
        device: None,
    };
    let mut second_leftovers = Leftovers {
        mountpoint: second.dir.path().join("mnt"),
        fuse_dir: second.data_dir.join("attach"),
        device: None,
    };
    let first_device = attach(first, &mut first_leftovers);
    let info: serde_json::Value = second.inspect("data");
    assert_eq!(info["attached_to"].as_u64(), Some(first.node_id()));

    // The second node may take over serving, but not the device while the
    // first host has it attached...
    let api = |node: &TestNode, method: &str, path: &str, body: &str| {
        let request = ureq::request(method, &format!("{}{path}", node.api_url()))
            .set("Authorization", &format!("Bearer {}", node.token()));
        match request.send_string(body) {
            Ok(response) => (response.status(), response.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap_or_default()),
            Err(error) => panic!("{method} {path}: {error}"),
        }
    };
    let (code, body) = api(second, "POST", "/v1/volumes/data/attach", r#"{"force":true}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = api(second, "POST", "/v1/volumes/data/device", "{}");
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("attached to node") && body.contains("--force-failover"),
        "{body}"
    );
    // ...and takes it with --force-failover (the first host is deemed lost).
    let taken = second.cli(&["volume", "attach", "data", "--device", "--force-failover"]);
    assert!(taken.status.success(), "{}", text(&taken));
    second_leftovers.device = Some(PathBuf::from(String::from_utf8_lossy(&taken.stdout).trim()));
    let info: serde_json::Value = first.inspect("data");
    assert_eq!(info["attached_to"].as_u64(), Some(second.node_id()));
    // The old host's device now fails instead of serving stale data.
    common::cluster::wait_until("the first host's device refuses I/O", || {
        !run_with_timeout(
            Command::new("dd").arg(format!("if={}", first_device.display())).args([
                "of=/dev/null",
                "bs=4096",
                "count=1",
                "iflag=direct",
            ]),
            TOOL_TIMEOUT,
        )
        .status
        .success()
    });
    first.cli_ok(&["volume", "detach", "data"]);
    first_leftovers.device = None;
    second.cli_ok(&["volume", "detach", "data"]);
    second_leftovers.device = None;
}

#[test]
fn an_attached_volume_grows_online_and_its_mounted_ext4_grows_with_it() {
    let test = "an_attached_volume_grows_online";
    if !host_attach_available(test, &["fusermount3", "mkfs.ext4", "resize2fs"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "128MiB");
    let mountpoint = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut leftovers = Leftovers {
        mountpoint: mountpoint.clone(),
        fuse_dir: node.data_dir.join("attach"),
        device: None,
    };
    let device = attach(&node, &mut leftovers);
    let device_bytes = || {
        run_ok("blockdev", &["--getsize64", device.to_str().unwrap()])
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(device_bytes(), 128 << 20);
    run_ok("mkfs.ext4", &["-q", "-F", device.to_str().unwrap()]);
    run_ok("mount", &[device.to_str().unwrap(), mountpoint.to_str().unwrap()]);
    let mut mounted = Some(Mount(mountpoint.clone()));
    std::fs::write(mountpoint.join("before.txt"), "written at 128 MiB\n").unwrap();
    let filesystem_bytes = || {
        let out = run_ok("df", &["-B1", "--output=size", mountpoint.to_str().unwrap()]);
        out.lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let small = filesystem_bytes();

    node.cli_ok(&["volume", "resize", "data", "--size", "384MiB"]);
    common::cluster::wait_until("the attached device follows the volume's size", || {
        device_bytes() == 384 << 20
    });
    // ext4 grows mounted (EXT4_IOC_RESIZE_FS) only with CAP_SYS_RESOURCE;
    // without it (some containers) it is grown unmounted, still attached.
    if kernel_iface::process::has_capability(24) {
        run_ok("resize2fs", &[device.to_str().unwrap()]);
    } else {
        println!("{test}: no CAP_SYS_RESOURCE here, so ext4 is grown unmounted (the device stays attached)");
        run_ok("sync", &[]);
        drop(mounted.take());
        run_ok("e2fsck", &["-f", "-p", device.to_str().unwrap()]);
        run_ok("resize2fs", &[device.to_str().unwrap()]);
        run_ok("mount", &[device.to_str().unwrap(), mountpoint.to_str().unwrap()]);
        mounted = Some(Mount(mountpoint.clone()));
    }
    let large = filesystem_bytes();
    assert!(
        large > small + (200 << 20),
        "the mounted filesystem grew online: {small} -> {large}"
    );
    std::fs::write(mountpoint.join("after.txt"), vec![7u8; 200 << 20]).unwrap();
    run_ok("sync", &[]);
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("before.txt")).unwrap(),
        "written at 128 MiB\n"
    );
    drop(mounted);
}
