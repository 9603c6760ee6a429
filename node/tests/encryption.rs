//! Encryption at rest, end to end: data written through NBD (nbdcopy)
//! leaves no plaintext on any replica's disk, reads back, and survives a
//! restart; a passphrase-wrapped volume serves nothing until unlocked,
//! refuses a wrong passphrase, and is locked again after a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{wait_until, TestCluster};
use common::node::{run_with_timeout, TestNode};
use common::{have_tool, text};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// A line no disk holds by chance (written to encrypted volumes).
const MARKER: &str = "ballast-plaintext-marker-7c1e9 the quick brown fox";
/// Another, written to a plain volume: the scan must find it.
const CONTROL: &str = "ballast-control-marker-52ad0 jumps over the lazy dog";

/// A 2 MiB file of `line`s.
fn marker_file(dir: &Path, line: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{}.bin", &line[..14]));
    let line = format!("{line}\n");
    let mut data = line.repeat((2 << 20) / line.len() + 1).into_bytes();
    data.truncate(2 << 20);
    std::fs::write(&path, data).unwrap();
    path
}

fn nbdcopy(from: &str, to: &str) -> std::process::Output {
    run_with_timeout(Command::new("nbdcopy").args([from, to]), TOOL_TIMEOUT)
}

/// Copies `file` into the volume at `uri`.
fn write_file(file: &Path, uri: &str) {
    let output = nbdcopy(file.to_str().unwrap(), uri);
    assert!(output.status.success(), "nbdcopy to {uri}: {}", text(&output));
}

/// The first `len` bytes of the volume at `uri`.
fn read_back(uri: &str, dir: &Path, len: usize) -> Vec<u8> {
    let path = dir.join("read-back.bin");
    let _ = std::fs::remove_file(&path);
    let output = nbdcopy(uri, path.to_str().unwrap());
    assert!(output.status.success(), "nbdcopy from {uri}: {}", text(&output));
    let mut data = std::fs::read(&path).unwrap();
    data.truncate(len);
    data
}

/// Whether `line` is anywhere on the node's disk (its backing file).
fn disk_holds(node: &TestNode, line: &str) -> bool {
    let disk = node.dir.path().join("disk0.img");
    let status = Command::new("grep")
        .args(["-q", "-a", "-F", line])
        .arg(&disk)
        .status()
        .unwrap();
    status.success()
}

fn nbd_ok(uri: &str) -> bool {
    run_with_timeout(Command::new("nbdinfo").arg(uri), TOOL_TIMEOUT)
        .status
        .success()
}

#[test]
fn an_encrypted_volume_leaves_no_plaintext_on_any_replica_and_survives_a_restart() {
    let test = "an_encrypted_volume_leaves_no_plaintext_on_any_replica";
    if !have_tool(test, "nbdcopy") || !have_tool(test, "nbdinfo") {
        return;
    }
    let mut cluster = TestCluster::start(test, 2, &[]);
    let node = &cluster.nodes[0];
    node.cli_ok(&[
        "volume",
        "create",
        "secret",
        "--size",
        "16MiB",
        "--repl",
        "2",
        "--encrypted",
    ]);
    node.cli_ok(&["volume", "create", "plain", "--size", "16MiB", "--repl", "2"]);
    let inspect: serde_json::Value = node.inspect("secret");
    assert_eq!(inspect["encryption"], "cluster-key");
    let scratch = tempfile::tempdir().unwrap();
    let marker = marker_file(scratch.path(), MARKER);
    let expected = std::fs::read(&marker).unwrap();
    write_file(&marker, &node.uri("secret"));
    write_file(&marker_file(scratch.path(), CONTROL), &node.uri("plain"));
    assert_eq!(read_back(&node.uri("secret"), scratch.path(), expected.len()), expected);

    // The control proves the scan finds plaintext; the encrypted copies hold none.
    for (index, node) in cluster.nodes.iter().enumerate() {
        assert!(
            disk_holds(node, CONTROL),
            "node {index}: the scan misses the plain volume's data"
        );
        assert!(
            !disk_holds(node, MARKER),
            "node {index}: plaintext of the encrypted volume is on disk"
        );
    }

    // The coordinator restarts: the key comes back from the cluster state.
    cluster.nodes[0].stop();
    cluster.nodes[0].restart();
    let node = &cluster.nodes[0];
    wait_until("the encrypted volume is served again", || nbd_ok(&node.uri("secret")));
    assert_eq!(read_back(&node.uri("secret"), scratch.path(), expected.len()), expected);
    assert!(!node.log_text().contains("cannot unlock the data key"));
}

#[test]
fn a_passphrase_volume_serves_only_once_unlocked_and_refuses_a_wrong_passphrase() {
    let test = "a_passphrase_volume_serves_only_once_unlocked";
    if !have_tool(test, "nbdcopy") || !have_tool(test, "nbdinfo") {
        return;
    }
    let mut node = TestNode::start(test, 256 << 20);
    let scratch = tempfile::tempdir().unwrap();
    let right = scratch.path().join("right.txt");
    let wrong = scratch.path().join("wrong.txt");
    std::fs::write(&right, "correct horse battery staple\n").unwrap();
    std::fs::write(&wrong, "incorrect horse battery staple\n").unwrap();
    node.cli_ok(&[
        "volume",
        "create",
        "vault",
        "--size",
        "16MiB",
        "--passphrase-file",
        right.to_str().unwrap(),
    ]);
    let inspect: serde_json::Value = node.inspect("vault");
    assert_eq!(inspect["encryption"], "passphrase");
    assert!(!nbd_ok(&node.uri("vault")), "a locked volume was served");
    assert!(node.log_text().contains("vault is encrypted and locked"));

    let refused = node.cli(&[
        "volume",
        "unlock",
        "vault",
        "--passphrase-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("wrong passphrase"), "{}", text(&refused));
    assert!(!nbd_ok(&node.uri("vault")));
    node.cli_ok(&[
        "volume",
        "unlock",
        "vault",
        "--passphrase-file",
        right.to_str().unwrap(),
    ]);

    let marker = marker_file(scratch.path(), MARKER);
    let expected = std::fs::read(&marker).unwrap();
    write_file(&marker, &node.uri("vault"));
    assert_eq!(read_back(&node.uri("vault"), scratch.path(), expected.len()), expected);
    assert!(!disk_holds(&node, MARKER), "plaintext reached the disk");
    // Neither the passphrase nor the key shows in the log.
    assert!(!node.log_text().contains("horse"));

    node.stop();
    node.restart();
    wait_until("the node serves again (the volume locked)", || {
        node.cli(&["volume", "inspect", "vault"]).status.success()
    });
    assert!(!nbd_ok(&node.uri("vault")), "locked again after a restart");
    node.cli_ok(&[
        "volume",
        "unlock",
        "vault",
        "--passphrase-file",
        right.to_str().unwrap(),
    ]);
    assert_eq!(read_back(&node.uri("vault"), scratch.path(), expected.len()), expected);
}
