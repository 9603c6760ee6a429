//! `ballast node upgrade` on a 3-node cluster under I/O (issue 29 item 3):
//! fio with verify on ext4 on a device attached through FUSE + loop, and a
//! checked NBD load that reconnects, while every node is upgraded in place
//! to another build (a wrapper advertising another version), one after the
//! other. The attached device sees no error, no acknowledged write is lost,
//! the NBD client reconnected, and every node runs the new build in the
//! process it started in. On the way: a binary that is missing, not
//! executable, not ballast, or speaks no peer protocol of the cluster is
//! refused with nothing changed, and one that fails to start rolls back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::load_check::{self, WriteLoad};
use node::nbd::client::ExportUri;

use common::cluster::TestCluster;
use common::node::{run_with_timeout, TestNode};
use common::plugin::AttachLeftovers;
use common::{host_attach_available, text};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// fio rounds at most (each writes and verifies 24 MiB).
const FIO_ROUNDS_MAX: usize = 200;
const NEW_VERSION: &str = "0.99.0-upgrade-test";
/// The NBD load runs this long: every node's upgrade fits in it.
const LOAD_TIME: Duration = Duration::from_secs(20);

/// A shell script standing in for another build: `body` runs the binary.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn upgrade(node: &TestNode, binary: &Path) -> std::process::Output {
    node.cli(&[
        "node",
        "upgrade",
        "--binary",
        binary.to_str().unwrap(),
        "--timeout-s",
        "90",
    ])
}

fn version_of(node: &TestNode) -> String {
    node.status()["version"].as_str().unwrap().to_owned()
}

/// fio rounds (write then verify 24 MiB of files with crc32c) on the mounted
/// filesystem until `stop`; the output of each round that failed.
fn fio_rounds(directory: PathBuf, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut rounds = 0;
    while !stop.load(Ordering::Acquire) && rounds < FIO_ROUNDS_MAX {
        rounds += 1;
        let output = run_with_timeout(
            Command::new("fio").args([
                "--name=upgrade",
                &format!("--directory={}", directory.display()),
                "--size=24m",
                "--rw=randwrite",
                "--bs=4k",
                "--ioengine=psync",
                "--direct=1",
                "--fsync=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=terse",
            ]),
            TOOL_TIMEOUT,
        );
        if !output.status.success() {
            failures.push(text(&output));
        }
    }
    (rounds, failures)
}

#[test]
fn every_node_upgrades_in_place_under_io_with_no_device_error_and_no_lost_write() {
    let test = "every_node_upgrades_in_place_under_io";
    if !host_attach_available(test, &["mkfs.ext4", "fio"]) {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    let scratch = tempfile::tempdir().unwrap();
    let old_version = version_of(&cluster.nodes[0]);
    let real = env!("CARGO_BIN_EXE_ballast");
    let new_build = script(
        scratch.path(),
        "ballast-new",
        &format!("BALLAST_ADVERTISED_VERSION={NEW_VERSION} exec {real} \"$@\""),
    );

    // The attached device: coordinated by node 0, a replica on every node.
    let (attacher, loader) = (&cluster.nodes[0], &cluster.nodes[1]);
    attacher.cli_ok(&["volume", "create", "files", "--size", "256MiB", "--repl", "3"]);
    let mountpoint = attacher.dir.path().join("mnt");
    // Unmounted and detached on a failed test too (the nodes are stopped by pid).
    let _leftovers = AttachLeftovers {
        mountpoints: vec![mountpoint.clone()],
        fuse_dirs: vec![attacher.data_dir.join("attach")],
    };
    let device = attacher
        .cli_ok(&["volume", "attach", "files", "--device"])
        .trim()
        .to_owned();
    let mkfs = run_with_timeout(Command::new("mkfs.ext4").args(["-q", &device]), TOOL_TIMEOUT);
    assert!(mkfs.status.success(), "{}", text(&mkfs));
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mount = run_with_timeout(Command::new("mount").arg(&device).arg(&mountpoint), TOOL_TIMEOUT);
    assert!(mount.status.success(), "{}", text(&mount));

    // The NBD volume: coordinated by node 1.
    loader.cli_ok(&["volume", "create", "blocks", "--size", "64MiB", "--repl", "3"]);
    loader.cli_ok(&["volume", "attach", "blocks"]);

    // Bad binaries first (node 2): refused, nothing changed.
    let target = &cluster.nodes[2];
    let pid = target.pid();
    let not_executable = scratch.path().join("not-executable");
    std::fs::write(&not_executable, "").unwrap();
    let not_ballast = script(scratch.path(), "not-ballast", "echo hello");
    let other_protocol = script(
        scratch.path(),
        "other-protocol",
        &format!("BALLAST_PEER_PROTOCOL=7 exec {real} \"$@\""),
    );
    for (binary, expected) in [
        (scratch.path().join("missing"), "No such file"),
        (not_executable, "not executable"),
        (not_ballast, "is it ballast?"),
        (other_protocol, "no peer protocol in common"),
    ] {
        let refused = upgrade(target, &binary);
        assert!(!refused.status.success(), "{}: {}", binary.display(), text(&refused));
        assert!(
            text(&refused).contains(expected),
            "{}: {}",
            binary.display(),
            text(&refused)
        );
        assert_eq!(target.pid(), pid);
        assert_eq!(version_of(target), old_version);
    }
    // A build that fails once executed (here: it rejects its arguments) rolls back.
    let failing = script(
        scratch.path(),
        "ballast-failing",
        &format!("case \"$1\" in version) exec {real} \"$@\";; esac\nexec {real} --no-such-flag \"$@\""),
    );
    let rolled_back = upgrade(target, &failing);
    assert!(!rolled_back.status.success(), "{}", text(&rolled_back));
    assert!(text(&rolled_back).contains("runs ballast"), "{}", text(&rolled_back));
    assert_eq!(version_of(target), old_version);
    assert_eq!(target.status()["upgrade"]["outcome"], "rolled back");

    // The loads.
    let stop = Arc::new(AtomicBool::new(false));
    let fio = {
        let (directory, stop) = (mountpoint.clone(), Arc::clone(&stop));
        std::thread::spawn(move || fio_rounds(directory, stop))
    };
    let ack_log = scratch.path().join("ack.log");
    let load = WriteLoad {
        uri: ExportUri::parse(&loader.uri("blocks")).unwrap(),
        ack_log: ack_log.clone(),
        duration: LOAD_TIME,
        queue_depth: 16,
        blocks: Some(4096),
        seed: 29,
        reconnect_within: Some(Duration::from_secs(60)),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let writer = runtime.spawn(async move { load_check::write_load(&load).await });
    let load_started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    // Every node, one after the other.
    for (index, node) in cluster.nodes.iter().enumerate() {
        let pid = node.pid();
        let upgraded = upgrade(node, &new_build);
        assert!(
            upgraded.status.success(),
            "node {index}: {}\n{}",
            text(&upgraded),
            node.log_text()
        );
        assert!(text(&upgraded).contains("upgraded in place"), "{}", text(&upgraded));
        assert_eq!(node.pid(), pid, "node {index} runs in the process it started in");
        assert_eq!(version_of(node), NEW_VERSION);
        assert_eq!(node.status()["upgrade"]["outcome"], "upgraded");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        load_started.elapsed() < LOAD_TIME,
        "the upgrades took {:?}, longer than the NBD load",
        load_started.elapsed()
    );
    cluster.wait_for("every node on the new build", |status| {
        status["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .all(|node| node["up"] == true && node["version"] == NEW_VERSION)
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let (rounds, failures) = fio.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {rounds} fio rounds failed: {failures:#?}",
        failures.len()
    );
    // Rounds ran back to back from before the first upgrade to after the last.
    assert!(rounds >= 1, "fio ran {rounds} rounds");

    // The NBD load came back after its coordinator's upgrade, and every
    // write it got acknowledged reads back from another replica (moved there).
    let written = runtime.block_on(writer).unwrap().unwrap();
    assert!(written.reconnects >= 1, "{written}");
    assert!(matches!(written.ended, load_check::Ended::Time), "{written}");
    cluster.nodes[2].cli_ok(&["volume", "attach", "blocks", "--force"]);
    let uri = ExportUri::parse(&cluster.nodes[2].uri("blocks")).unwrap();
    let verified = runtime.block_on(load_check::verify_load(&uri, &ack_log, 16)).unwrap();
    assert!(verified.passed(), "{verified}");
    assert!(verified.acknowledgements > 100, "{verified}");

    // Clean up: the filesystem, then the device.
    let unmount = run_with_timeout(Command::new("umount").arg(&mountpoint), TOOL_TIMEOUT);
    assert!(unmount.status.success(), "{}", text(&unmount));
    attacher.cli_ok(&["volume", "detach", "files"]);
}
