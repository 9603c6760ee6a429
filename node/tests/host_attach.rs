//! Host attach through the node's own FUSE backend: `volume attach
//! --device` gives a loop device over a FUSE file the node serves from the
//! volume; ext4 goes on it, files survive detach and a second attach, and
//! fsck is clean. Writers with many O_DIRECT writes in flight lose no
//! acknowledged write when the node is killed -9 under them; the dead
//! node's device fails its I/O instead of hanging; discards read back as
//! zeroes and give the space back; bad requests get errors while the node
//! goes on serving.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use node::load_check::book::{Book, Verdict};

use common::node::{run_with_timeout, wait_exit_within, TestNode};
use common::{host_attach_available, text, Mount};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Cleans up on a failed test too: the filesystem on the device, the
/// device, and the node's FUSE mount (the node itself is killed -9).
struct Leftovers {
    mountpoint: PathBuf,
    fuse_dir: PathBuf,
    device: Option<PathBuf>,
}

impl Leftovers {
    /// Nothing left over yet from `node`'s test: its `mnt` directory and its attach mount.
    fn of(node: &TestNode) -> Self {
        Self {
            mountpoint: node.dir.path().join("mnt"),
            fuse_dir: node.data_dir.join("attach"),
            device: None,
        }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").arg("-d").arg(device).output();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.fuse_dir).output();
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

/// `volume detach data`: the device is gone, nothing left to clean up.
fn detach(node: &TestNode, leftovers: &mut Leftovers) {
    node.cli_ok(&["volume", "detach", "data"]);
    leftovers.device = None;
}

fn loop_devices() -> String {
    run_ok("losetup", &["-a"])
}

#[test]
fn a_volume_attached_through_fuse_holds_an_ext4_filesystem_across_detach_and_reattach() {
    let test = "a_volume_attached_through_fuse_holds_an_ext4_filesystem";
    if !host_attach_available(test, &["mkfs.ext4"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "256MiB");
    let mountpoint = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut leftovers = Leftovers::of(&node);

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
    // The attached device's requests count as the volume's client I/O (a
    // resync or scrub yields to them; `volume latency` and /metrics show them).
    let latency = node.cli(&["volume", "latency", "data", "--json"]);
    assert!(latency.status.success(), "{}", text(&latency));
    let latency: serde_json::Value = serde_json::from_slice(&latency.stdout).unwrap();
    let count = |op: &str| {
        latency["ops"]
            .as_array()
            .and_then(|ops| ops.iter().find(|entry| entry["op"] == op))
            .and_then(|entry| entry["count"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        count("write") > 0 && count("flush") > 0,
        "attached-device requests not counted: {latency:#}"
    );
    detach(&node, &mut leftovers);
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
    detach(&node, &mut leftovers);
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
    assert!(
        text(&bad).contains("auto, ublk, nbd, fuse-uring or fuse"),
        "{}",
        text(&bad)
    );
}

#[test]
fn volume_mount_formats_on_first_use_and_volume_unmount_detaches() {
    let test = "volume_mount_formats_on_first_use";
    if !host_attach_available(test, &["mkfs.ext4", "blkid"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "128MiB");
    let mountpoint = node.dir.path().join("mnt");
    let _leftovers = Leftovers::of(&node);
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
    if !host_attach_available(test, &[]) {
        return;
    }
    let cluster = common::cluster::TestCluster::start(test, 2, &[]);
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    first.cli_ok(&["volume", "create", "data", "--size", "64MiB", "--repl", "2"]);
    common::cluster::wait_until("both replicas in sync", || {
        let info: serde_json::Value = first.inspect("data");
        info["in_sync"].as_array().is_some_and(|nodes| nodes.len() == 2)
    });
    let mut first_leftovers = Leftovers::of(first);
    let mut second_leftovers = Leftovers::of(second);
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
    detach(first, &mut first_leftovers);
    detach(second, &mut second_leftovers);
}

#[test]
fn an_attached_volume_grows_online_and_its_mounted_ext4_grows_with_it() {
    let test = "an_attached_volume_grows_online";
    if !host_attach_available(test, &["mkfs.ext4", "resize2fs"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "128MiB");
    let mountpoint = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut leftovers = Leftovers::of(&node);
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

/// Writers on an attached device: `WRITERS` threads write random blocks of
/// one shared range with O_DIRECT (each block has one write in flight at
/// most, so its writes are ordered), logging every write sent and every one
/// acknowledged, until `stop` or their first failed write.
struct DeviceLoad {
    book: Arc<Mutex<(Book, HashSet<u64>)>>,
    acknowledged: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    writers: Vec<std::thread::JoinHandle<()>>,
}

const WRITERS: usize = 4;
const LOAD_BLOCKS: u64 = 16_384;

impl DeviceLoad {
    /// Starts writers that go on with `book` (the volume's history so far).
    fn start(device: &Path, book: Book, seed: u64) -> Self {
        let stream = book.stream;
        let newest = book
            .histories
            .values()
            .flat_map(|history| history.sent.iter().copied())
            .max()
            .unwrap_or(0);
        let book = Arc::new(Mutex::new((book, HashSet::new())));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(newest));
        let writers = (0..WRITERS as u64)
            .map(|writer| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(device)
                    .unwrap();
                let (book, acknowledged, stop, generation) = (
                    Arc::clone(&book),
                    Arc::clone(&acknowledged),
                    Arc::clone(&stop),
                    Arc::clone(&generation),
                );
                std::thread::spawn(move || {
                    let mut rng = disk_layout::sim_disk::SimRng::new(seed * 31 + writer);
                    let mut buffer = disk_layout::IoBuf::new(4096);
                    while !stop.load(Ordering::Relaxed) {
                        let lba = rng.below(LOAD_BLOCKS);
                        let version = {
                            let mut guard = book.lock().unwrap();
                            if !guard.1.insert(lba) {
                                continue;
                            }
                            let version = generation.fetch_add(1, Ordering::Relaxed) + 1;
                            guard.0.sent(lba, version);
                            version
                        };
                        node::pattern::fill(buffer.as_mut_slice(), stream, lba, version);
                        let written = file.write_at(buffer.as_slice(), lba * 4096);
                        let mut guard = book.lock().unwrap();
                        guard.1.remove(&lba);
                        if written.is_err() {
                            return; // the node died under it: this write may or may not be there
                        }
                        guard.0.acknowledged(lba, version);
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self {
            book,
            acknowledged,
            stop,
            writers,
        }
    }

    /// Stops the writers (bounded: a writer on a dead device gets an error, never hangs) and gives the book.
    fn finish(mut self) -> Book {
        self.stop.store(true, Ordering::Relaxed);
        let started = std::time::Instant::now();
        for writer in self.writers.drain(..) {
            while !writer.is_finished() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "a writer on the attached device hangs"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            writer.join().unwrap();
        }
        self.book.lock().unwrap().0.clone()
    }
}

/// Reads every block `book` touched from `device` and judges it; the count of acknowledged writes checked.
fn verify_device(device: &Path, book: &Book) -> u64 {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap();
    let mut buffer = disk_layout::IoBuf::new(4096);
    let mut checked = 0;
    for (&lba, history) in &book.histories {
        file.read_exact_at(buffer.as_mut_slice(), lba * 4096).unwrap();
        let found = node::pattern::decode(buffer.as_slice(), book.stream, lba);
        match book.judge(lba, &found) {
            Verdict::Expected | Verdict::Unacknowledged => {}
            Verdict::Lost(what) | Verdict::Corrupt(what) => panic!("{}: {what}", device.display()),
        }
        checked += history.acknowledgements;
    }
    checked
}

/// The loop devices whose backing file is `file`.
fn loops_over(file: &Path) -> Vec<String> {
    loop_devices()
        .lines()
        .filter(|line| line.contains(&*file.to_string_lossy()))
        .map(|line| line.split(':').next().unwrap().to_owned())
        .collect()
}

/// Kills `node` -9 under `DeviceLoad` writers `trials` times; after each
/// restart every acknowledged write must read back. The acknowledged writes checked.
fn crash_trials(node: &mut TestNode, leftovers: &mut Leftovers, trials: u64, backend: &str) -> u64 {
    let attach_file = node.data_dir.join("attach").join("data");
    // One history across the trials: a block may hold an earlier trial's write.
    let mut book = Book::new(0xA77A_C400, LOAD_BLOCKS);
    let mut checked = 0;
    for trial in 1..=trials {
        let device = attach(node, leftovers);
        let status = node.cli_ok(&["node", "status", "--json"]);
        assert!(
            status.contains(&format!("\"attach_backend\": \"{backend}\"")),
            "{status}"
        );
        let load = DeviceLoad::start(&device, book, trial);
        // Kill after a varying number of acknowledged writes.
        let wanted = 500 + (trial * 7919) % 3000;
        let started = std::time::Instant::now();
        while load.acknowledged.load(Ordering::Relaxed) < wanted {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the writers made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        node.kill9();
        book = load.finish();
        // The dead node's device fails its I/O (not a hang, not stale data).
        assert!(
            read_first_block(&device).is_err(),
            "trial {trial}: a read on the dead node's device succeeded"
        );
        node.restart();
        let device = attach(node, leftovers);
        assert_eq!(
            loops_over(&attach_file),
            vec![device.display().to_string()],
            "trial {trial}: the dead node's loop device was released"
        );
        checked = verify_device(&device, &book);
        detach(node, leftovers);
    }
    checked
}

#[test]
fn killing_the_node_under_concurrent_direct_writes_loses_no_acknowledged_write_and_fsck_stays_clean() {
    let test = "killing_the_node_under_concurrent_direct_writes";
    if !host_attach_available(test, &["mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let mut node = TestNode::start_unclustered(test, "127.0.0.1", &[1 << 30], &["--attach-backend", "fuse"]);
    node.cli_ok(&["cluster", "init"]);
    node.create_volume("data", "256MiB");
    let mountpoint = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut leftovers = Leftovers::of(&node);
    // BALLAST_ATTACH_CRASH_TRIALS runs many more outside CI.
    let trials = std::env::var("BALLAST_ATTACH_CRASH_TRIALS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| common::iterations(6, 3) as u64);
    let checked = crash_trials(&mut node, &mut leftovers, trials, "fuse");
    println!("{test}: {trials} trials, {checked} acknowledged writes checked, 0 lost");

    // A filesystem whose node is killed mid-write: fsck is clean after the next attach.
    let device = attach(&node, &mut leftovers);
    run_ok("mkfs.ext4", &["-q", "-F", device.to_str().unwrap()]);
    run_ok("mount", &[device.to_str().unwrap(), mountpoint.to_str().unwrap()]);
    let mounted = Mount(mountpoint.clone());
    for index in 0..64 {
        std::fs::write(
            mountpoint.join(format!("f{index}")),
            vec![u8::try_from(index).unwrap(); 64 << 10],
        )
        .unwrap();
    }
    run_ok("sync", &[]);
    let background = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mountpoint.join("big").display()))
        .args(["bs=1M", "count=100", "oflag=direct"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    node.kill9();
    // The filesystem over the dead device goes lazily (its journal can no longer be written).
    run_ok("umount", &["-l", mountpoint.to_str().unwrap()]);
    std::mem::forget(mounted);
    let _ = background.wait_with_output();
    let _ = Command::new("losetup").arg("-d").arg(&device).output();
    node.restart();
    let device = attach(&node, &mut leftovers);
    run_ok("fsck.ext4", &["-n", "-f", device.to_str().unwrap()]);
    detach(&node, &mut leftovers);
}

#[test]
fn discards_read_back_as_zeroes_and_give_space_back_and_bad_requests_get_errors() {
    let test = "discards_read_back_as_zeroes_and_give_space_back";
    if !host_attach_available(test, &["blkdiscard", "fio"]) {
        return;
    }
    let node = TestNode::start(test, 1 << 30);
    node.create_volume("data", "128MiB");
    let mut leftovers = Leftovers::of(&node);
    let device = attach(&node, &mut leftovers);
    let device_name = device.to_str().unwrap();
    run_ok(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={device_name}"),
            "bs=1M",
            "count=16",
            "oflag=direct",
        ],
    );
    let used = || node.inspect("data")["used_bytes"].as_u64().unwrap();
    assert!(used() >= 16 << 20, "{}", used());
    // Discard (punch hole) the first 8 MiB, write-zeroes (zero range) the next 4 MiB.
    run_ok("blkdiscard", &["-o", "0", "-l", "8MiB", device_name]);
    run_ok("blkdiscard", &["-z", "-o", "8MiB", "-l", "4MiB", device_name]);
    let read = |offset_mib: u64, mib: u64| {
        let output = run_with_timeout(
            Command::new("dd").args([
                &format!("if={device_name}"),
                "of=/dev/stdout",
                "bs=1M",
                &format!("skip={offset_mib}"),
                &format!("count={mib}"),
                "iflag=direct",
                "status=none",
            ]),
            TOOL_TIMEOUT,
        );
        assert!(output.status.success(), "{}", text(&output));
        output.stdout
    };
    assert!(
        read(0, 12).iter().all(|&byte| byte == 0),
        "discarded ranges read back as zeroes"
    );
    assert!(read(12, 4).iter().any(|&byte| byte != 0), "the rest is untouched");
    common::cluster::wait_until("the discarded space is given back", || used() <= 9 << 20);
    let queue = |name: &str| {
        let base = device.file_name().unwrap().to_str().unwrap();
        std::fs::read_to_string(format!("/sys/block/{base}/queue/{name}"))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(queue("rotational"), "0");
    assert_eq!(
        queue("write_cache"),
        "write through",
        "no volatile cache: an fsync on the device need not cross FUSE"
    );
    assert_eq!(queue("logical_block_size"), "4096");
    assert_ne!(queue("discard_max_bytes"), "0");

    // Bad requests through the attach file itself: each gets an error, the node goes on.
    let file = node.data_dir.join("attach").join("data");
    let past_end = std::fs::OpenOptions::new().read(true).open(&file).unwrap();
    let mut buffer = [0u8; 4096];
    assert_eq!(
        past_end.read_at(&mut buffer, 200 << 20).unwrap(),
        0,
        "a read past the end reads nothing"
    );
    let writer = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    assert!(
        writer.write_at(&buffer, 200 << 20).is_err(),
        "a write past the end is refused"
    );
    assert!(
        writer.set_len(1 << 20).is_err(),
        "the size is the volume's, not truncate's"
    );
    let xattr = Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(&file)
        .output();
    if let Ok(output) = xattr {
        assert!(!output.status.success(), "extended attributes are not served");
    }
    assert!(std::fs::File::open(node.data_dir.join("attach").join("no-such-volume")).is_err());
    // Detach while fio writes: fio gets errors, the node serves on.
    let mut fio = Command::new("fio")
        .args([
            "--name=detach",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
        ])
        .args(["--iodepth=16", "--time_based", "--runtime=30", "--output=/dev/null"])
        .arg(format!("--filename={device_name}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    detach(&node, &mut leftovers);
    let status = wait_exit_within(&mut fio, Duration::from_secs(60), "fio hangs on a detached device");
    assert!(!status.success(), "fio saw its device go away");
    let device = attach(&node, &mut leftovers);
    assert!(read_first_block(&device).is_ok(), "the node serves the volume again");
    detach(&node, &mut leftovers);
}

fn read_first_block(device: &Path) -> std::io::Result<()> {
    let mut buffer = disk_layout::IoBuf::new(4096);
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)?
        .read_exact_at(buffer.as_mut_slice(), 0)
}

/// Turns FUSE over io_uring on or off for a test, and back to what it was after.
struct UringSwitch {
    was: String,
}

impl UringSwitch {
    fn new() -> Self {
        Self {
            was: std::fs::read_to_string(kernel_iface::fuse::URING_PARAMETER).unwrap(),
        }
    }

    fn turn(&self, on: bool) {
        std::fs::write(kernel_iface::fuse::URING_PARAMETER, if on { "1" } else { "0" }).unwrap();
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        let _ = std::fs::write(kernel_iface::fuse::URING_PARAMETER, self.was.trim());
    }
}

#[test]
fn fuse_over_io_uring_serves_attached_devices_loses_no_acknowledged_write_and_is_hinted_when_off() {
    let test = "fuse_over_io_uring_serves_attached_devices";
    if !host_attach_available(test, &["fio"]) {
        return;
    }
    if kernel_iface::fuse::uring_enabled().is_none() {
        common::record_skip(
            test,
            "this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)",
        );
        return;
    }
    // Off: a node says what it would take, and a forced fuse-uring attach says why it cannot.
    let switch = UringSwitch::new();
    switch.turn(false);
    let mut node = TestNode::start_unclustered(test, "127.0.0.1", &[1 << 30], &["--attach-backend", "fuse-uring"]);
    node.cli_ok(&["cluster", "init"]);
    node.create_volume("data", "256MiB");
    let refused = node.cli(&["volume", "attach", "data", "--device"]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("enable_uring"), "{}", text(&refused));
    node.stop();
    let mut classic = TestNode::start_unclustered(test, "127.0.0.1", &[256 << 20], &["--attach-backend", "fuse"]);
    classic.cli_ok(&["cluster", "init"]);
    let status = classic.cli_ok(&["node", "status"]);
    assert!(
        status.contains("host attach: fuse") && status.contains("enable_uring"),
        "{status}"
    );
    classic.stop();

    // On: requests come through the io_uring queues, which the reactors serve
    // (the channel threads stay idle).
    switch.turn(true);
    node.restart();
    let mut leftovers = Leftovers::of(&node);
    let device = attach(&node, &mut leftovers);
    let fio = run_with_timeout(
        Command::new("fio")
            .args([
                "--name=uring",
                "--ioengine=io_uring",
                "--direct=1",
                "--rw=randrw",
                "--bs=4k,64k",
            ])
            // Above the blocks the crash trials write.
            .args([
                "--iodepth=32",
                "--offset=128M",
                "--size=64M",
                "--verify=crc32c",
                "--output=/dev/null",
            ])
            .arg(format!("--filename={}", device.display())),
        TOOL_TIMEOUT,
    );
    assert!(
        fio.status.success(),
        "fio verify through FUSE over io_uring: {}",
        text(&fio)
    );
    // Its queues cannot be handed to a new binary (the kernel strands a
    // request handed to a queue as it ends): an upgrade in place is refused,
    // naming the backend and why, and the node serves on in its process.
    let pid = node.pid();
    let refused = node.cli(&["node", "upgrade", "--binary", env!("CARGO_BIN_EXE_ballast")]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("fuse-uring")
            && text(&refused).contains("stranded")
            && text(&refused).contains("detach them first"),
        "{}",
        text(&refused)
    );
    assert_eq!(node.pid(), pid);
    assert!(node.status()["upgrade"].is_null(), "{}", node.status());
    let cpu_of = |prefix: &str| -> u64 {
        std::fs::read_dir(format!("/proc/{}/task", node.pid()))
            .unwrap()
            .flatten()
            .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix)))
            .map(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
                let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
            })
            .sum()
    };
    let (reactors, channels) = (cpu_of("ballast-reactor"), cpu_of("fuse-"));
    assert!(
        channels * 10 <= reactors,
        "the reactors' queues, not the channels, served the requests: reactors {reactors} ticks, channels {channels}"
    );
    detach(&node, &mut leftovers);
    let checked = crash_trials(&mut node, &mut leftovers, common::iterations(3, 2) as u64, "fuse-uring");
    println!("{test}: {checked} acknowledged writes checked through FUSE over io_uring, 0 lost");
}
