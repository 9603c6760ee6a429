//! Snapshots, clones and restores on real nodes (issue 11): a snapshot is
//! the volume at one point, read-only over NBD, taking no space until the
//! volume is overwritten; a clone shares the snapshot's data and diverges
//! from it; a restore brings the volume back; on a replicated volume the
//! snapshot is taken at one point on every replica, even under writes.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{wait_until, TestCluster};
use common::nbd::NbdClient;
use common::node::{wait_exit_within, TestNode};
use common::{have_tool, qemu_io, qemu_io_ok, qemu_io_read_only, text};
use node::nbd::proto;

fn snapshots(node: &TestNode, volume: &str) -> Vec<serde_json::Value> {
    let listed = node.cli_ok(&["snapshot", "list", volume, "--json"]);
    serde_json::from_str::<serde_json::Value>(&listed)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn nbd_address(node: &TestNode) -> String {
    node.uri("x")
        .trim_start_matches("nbd://")
        .trim_end_matches("/x")
        .to_owned()
}

/// Runs a qemu-io command that must succeed; a snapshot (`VOL@SNAP`) is
/// opened read-only, as its export is.
fn expect_pattern(uri: &str, command: &str) {
    let output = if uri.contains('@') {
        qemu_io_read_only(uri, command)
    } else {
        qemu_io(uri, command)
    };
    assert!(qemu_io_ok(&output), "{uri}: {command}: {}", text(&output));
}

#[test]
fn a_snapshot_stays_as_taken_is_read_only_over_nbd_and_deleting_it_frees_what_only_it_held() {
    let test = "a_snapshot_stays_as_taken";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.create_volume("db", "64MiB");
    let uri = node.uri("db");
    expect_pattern(&uri, "write -P 0x61 0 32M");
    let used_before = node.disk_used_bytes();

    let created = node.cli_ok(&["snapshot", "create", "db", "s1"]);
    assert!(created.contains("db@s1"), "{created}");
    assert_eq!(node.disk_used_bytes(), used_before, "a snapshot copies no data");
    let listed = snapshots(&node, "db");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "s1");
    assert_eq!(listed[0]["state"], "ready");
    assert_eq!(listed[0]["size_bytes"], 64u64 << 20);
    if have_tool(test, "nbdinfo") {
        let listed = std::process::Command::new("nbdinfo")
            .args(["--list", &format!("nbd://{}", nbd_address(&node))])
            .output()
            .unwrap();
        assert!(
            text(&listed).contains("db@s1"),
            "NBD_OPT_LIST names the snapshot: {}",
            text(&listed)
        );
    }
    let again = node.cli(&["snapshot", "create", "db", "s1"]);
    assert!(
        !again.status.success() && text(&again).contains("already exists"),
        "{}",
        text(&again)
    );

    // Overwrite half: the volume changes, the snapshot does not.
    expect_pattern(&uri, "write -P 0x62 0 16M");
    let snapshot_uri = node.uri("db@s1");
    expect_pattern(&snapshot_uri, "read -P 0x61 0 32M");
    expect_pattern(&snapshot_uri, "read -P 0 32M 32M");
    expect_pattern(&uri, "read -P 0x62 0 16M");
    expect_pattern(&uri, "read -P 0x61 16M 16M");
    assert_eq!(
        node.disk_used_bytes(),
        used_before + (16 << 20),
        "the overwritten half is held twice: the snapshot keeps the old data"
    );

    // What changed since the snapshot, from the maps: the overwritten half.
    let diff = |args: &[&str]| -> serde_json::Value {
        let mut command = vec!["snapshot", "diff", "db", "--json"];
        command.extend_from_slice(args);
        serde_json::from_str(&node.cli_ok(&command)).unwrap()
    };
    let since = diff(&["--from", "s1"]);
    assert_eq!(since["changed"], serde_json::json!([[0, 16 << 20]]), "{since}");
    assert_eq!(since["changed_bytes"], 16u64 << 20);
    let everything = diff(&["--to", "s1"]);
    assert_eq!(
        everything["changed"],
        serde_json::json!([[0, 32 << 20]]),
        "{everything}"
    );
    node.cli_ok(&["snapshot", "create", "db", "s2"]);
    assert_eq!(diff(&["--from", "s1", "--to", "s2"])["changed"], since["changed"]);
    assert_eq!(diff(&["--from", "s2"])["changed_bytes"], 0, "nothing written since s2");
    let readable = node.cli_ok(&["snapshot", "diff", "db", "--from", "s1"]);
    assert!(
        readable.contains("db@s1 -> now") && readable.contains("in 1 range "),
        "{readable}"
    );
    let unknown = node.cli(&["snapshot", "diff", "db", "--from", "nosuch"]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("db@nosuch does not exist"),
        "{}",
        text(&unknown)
    );
    node.cli_ok(&["snapshot", "delete", "db", "s2"]);

    // Read-only: the export says so, and a write is refused with EPERM.
    let mut client = NbdClient::connect(&nbd_address(&node), "db@s1", Duration::from_secs(10)).unwrap();
    assert_ne!(client.flags & proto::TFLAG_READ_ONLY, 0, "flags {:#x}", client.flags);
    let (error, _) = client.request(proto::CMD_WRITE, 0, 4096, &[0x63; 4096]).unwrap();
    assert_eq!(error, proto::EPERM);
    let (error, data) = client.request(proto::CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!((error, data), (0, vec![0x61; 4096]));
    drop(client);

    node.cli_ok(&["snapshot", "delete", "db", "s1"]);
    assert!(snapshots(&node, "db").is_empty());
    wait_until("the snapshot's own data freed", || {
        node.disk_used_bytes() == used_before
    });
    let gone = qemu_io(&snapshot_uri, "read 0 4096");
    assert!(!gone.status.success() || !qemu_io_ok(&gone), "{}", text(&gone));
    expect_pattern(&uri, "read -P 0x62 0 16M");
    expect_pattern(&uri, "read -P 0x61 16M 16M");
    let missing = node.cli(&["snapshot", "delete", "db", "s1"]);
    assert!(
        !missing.status.success() && text(&missing).contains("does not exist"),
        "{}",
        text(&missing)
    );
}

#[test]
fn a_clone_shares_its_snapshots_data_diverges_from_it_and_outlives_its_source_through_a_restart() {
    let test = "a_clone_shares_its_snapshots_data";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut node = TestNode::start(test, 512 << 20);
    node.create_volume("src", "64MiB");
    expect_pattern(&node.uri("src"), "write -P 0x41 0 32M");
    node.cli_ok(&["snapshot", "create", "src", "gold"]);
    let used_before = node.disk_used_bytes();

    let cloned = node.cli_ok(&["volume", "clone", "src@gold", "copy"]);
    assert!(cloned.contains("cloned volume copy"), "{cloned}");
    assert!(cloned.contains("cloned from: src@gold"), "{cloned}");
    assert_eq!(node.disk_used_bytes(), used_before, "a fresh clone takes no space");
    assert_eq!(node.inspect("copy")["used_bytes"], 32u64 << 20, "it maps all the data");

    let copy = node.uri("copy");
    expect_pattern(&copy, "write -P 0x43 0 8M");
    expect_pattern(&copy, "read -P 0x43 0 8M");
    expect_pattern(&copy, "read -P 0x41 8M 24M");
    expect_pattern(&node.uri("src@gold"), "read -P 0x41 0 32M");
    expect_pattern(&node.uri("src"), "read -P 0x41 0 32M");
    assert_eq!(node.disk_used_bytes(), used_before + (8 << 20));

    // Shared blocks survive a crash (the clone records are replayed) ...
    node.kill9();
    node.restart();
    expect_pattern(&copy, "read -P 0x43 0 8M");
    expect_pattern(&copy, "read -P 0x41 8M 24M");
    expect_pattern(&node.uri("src@gold"), "read -P 0x41 0 32M");
    assert_eq!(node.disk_used_bytes(), used_before + (8 << 20));
    // ... and the source's deletion (its snapshots go with it).
    node.cli_ok(&["volume", "delete", "src"]);
    wait_until("the source's snapshot copy released", || {
        !qemu_io(&node.uri("src@gold"), "read 0 4096").status.success()
    });
    expect_pattern(&copy, "read -P 0x41 8M 24M");
    // The copies are released after they stop being served: wait for the space.
    wait_until(
        "only the clone's blocks remain: 24 MiB shared before, 8 MiB its own",
        || node.disk_used_bytes() == 32 << 20,
    );
    let clone_of_gone = node.cli(&["volume", "clone", "src@gold", "copy2"]);
    assert!(!clone_of_gone.status.success(), "{}", text(&clone_of_gone));
}

#[test]
fn restoring_a_snapshot_brings_the_volume_back_and_is_refused_while_a_client_is_connected() {
    let test = "restoring_a_snapshot_brings_the_volume_back";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.create_volume("r", "64MiB");
    let uri = node.uri("r");
    expect_pattern(&uri, "write -P 0x51 0 16M");
    node.cli_ok(&["snapshot", "create", "r", "before"]);
    expect_pattern(&uri, "write -P 0x52 0 16M");
    expect_pattern(&uri, "write -P 0x53 16M 16M");

    let client = NbdClient::connect(&nbd_address(&node), "r", Duration::from_secs(10)).unwrap();
    let refused = node.cli(&["snapshot", "restore", "r", "before"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("in use"), "{}", text(&refused));
    drop(client);
    wait_until("the client's connection closed", || {
        node.inspect("r")["connections"] == 0
    });

    let restored = node.cli_ok(&["snapshot", "restore", "r", "before"]);
    assert!(restored.contains("restored volume r"), "{restored}");
    expect_pattern(&uri, "read -P 0x51 0 16M");
    expect_pattern(&uri, "read -P 0 16M 16M");
    // The snapshot is still there and the volume writable.
    expect_pattern(&node.uri("r@before"), "read -P 0x51 0 16M");
    expect_pattern(&uri, "write -P 0x54 0 4M");
    expect_pattern(&node.uri("r@before"), "read -P 0x51 0 4M");
    let unknown = node.cli(&["snapshot", "restore", "r", "nope"]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("does not exist"),
        "{}",
        text(&unknown)
    );
}

#[test]
fn scheduled_snapshots_are_taken_and_only_the_newest_are_kept() {
    let test = "scheduled_snapshots_are_taken";
    let node = TestNode::start(test, 256 << 20);
    node.create_volume("s", "16MiB");
    node.cli_ok(&["snapshot", "create", "s", "mine"]);
    let bad = node.cli(&["volume", "update", "s", "--snapshot-every", "1s", "--keep", "2"]);
    assert!(
        !bad.status.success() && text(&bad).contains("at least"),
        "{}",
        text(&bad)
    );
    let updated = node.cli_ok(&["volume", "update", "s", "--snapshot-every", "10s", "--keep", "2"]);
    assert!(updated.contains("one every 10 s, the newest 2 kept"), "{updated}");
    let auto = |list: &[serde_json::Value]| -> Vec<u64> {
        list.iter()
            .filter(|s| s["name"].as_str().unwrap().starts_with("auto-"))
            .map(|s| s["id"].as_u64().unwrap())
            .collect()
    };
    let mut first_seen = None;
    wait_until_long("three scheduled snapshots taken, the first of them expired", || {
        let list = snapshots(&node, "s");
        let ids = auto(&list);
        if first_seen.is_none() {
            first_seen = ids.first().copied();
        }
        assert!(ids.len() <= 3, "never more than keep (+1 being taken): {list:?}");
        assert!(
            list.iter().any(|s| s["name"] == "mine"),
            "a named snapshot never expires: {list:?}"
        );
        ids.len() == 2 && first_seen.is_some_and(|first| !ids.contains(&first))
    });
    let missing_keep = node.cli(&["volume", "update", "s", "--snapshot-every", "1h"]);
    assert!(
        !missing_keep.status.success() && text(&missing_keep).contains("--keep"),
        "{}",
        text(&missing_keep)
    );
    let stopped = node.cli_ok(&["volume", "update", "s", "--snapshot-every", "0"]);
    assert!(!stopped.contains("one every"), "{stopped}");
}

/// Like `wait_until`, for waits of up to two minutes.
fn wait_until_long(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("timed out waiting for: {what}");
}

/// Block `block` of write round `round`: the round and block in the first
/// 16 bytes, a byte derived from both after.
fn block_of(round: u64, block: u64) -> Vec<u8> {
    let mut data = vec![u8::try_from((round * 31 + block) % 251).unwrap(); 4096];
    data[..8].copy_from_slice(&round.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data
}

/// The round a block holds (0: never written), checking its bytes.
fn round_of(block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|b| *b == 0) {
        return 0;
    }
    let round = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(data, &block_of(round, block)[..], "block {block}: torn or foreign data");
    round
}

const BLOCKS: u64 = 256;

#[test]
fn a_snapshot_under_writes_holds_one_point_between_the_acknowledged_writes_on_every_replica() {
    let test = "a_snapshot_under_writes_holds_one_point";
    let cluster = TestCluster::start(test, 3, &[]);
    let admin = &cluster.nodes[0];
    admin.cli_ok(&["volume", "create", "v", "--size", "16MiB", "--repl", "3"]);
    wait_until("v in sync on three replicas", || {
        admin.inspect("v")["in_sync"].as_array().is_some_and(|s| s.len() == 3)
    });
    let coordinator = admin.inspect("v")["coordinator_nbd"].as_str().unwrap().to_owned();

    // One writer, each write acknowledged before the next: round-robin over
    // BLOCKS blocks, round by round. `acked` counts acknowledged writes.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, coordinator) = (Arc::clone(&acked), Arc::clone(&stop), coordinator.clone());
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&coordinator, "v", Duration::from_secs(20)).unwrap();
            let started = Instant::now();
            let mut sequence = 0u64;
            while !stop.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(90) {
                let (round, block) = (sequence / BLOCKS + 1, sequence % BLOCKS);
                let (error, _) = client
                    .request(proto::CMD_WRITE, block * 4096, 4096, &block_of(round, block))
                    .unwrap();
                assert_eq!(error, 0, "write {sequence}");
                sequence += 1;
                acked.store(sequence, Ordering::Release);
            }
        })
    };
    wait_until("two rounds written", || acked.load(Ordering::Acquire) > 2 * BLOCKS);
    let before = acked.load(Ordering::Acquire);
    admin.cli_ok(&["snapshot", "create", "v", "mid"]);
    let after = acked.load(Ordering::Acquire);
    wait_until("a round more written after it", || {
        acked.load(Ordering::Acquire) > after + BLOCKS
    });
    stop.store(true, Ordering::Release);
    writer.join().unwrap();

    let listed = snapshots(admin, "v");
    let holders = listed[0]["holders"].as_array().unwrap().clone();
    assert_eq!(holders.len(), 3, "every in-sync replica took it: {listed:?}");
    // Read the snapshot from every node (each serves its own copy).
    let mut copies = Vec::new();
    for node in &cluster.nodes {
        let mut client = connect_snapshot(node, "v@mid");
        let mut rounds = Vec::new();
        for block in 0..BLOCKS {
            let (error, data) = client.request(proto::CMD_READ, block * 4096, 4096, &[]).unwrap();
            assert_eq!(error, 0);
            rounds.push(round_of(block, &data));
        }
        copies.push(rounds);
    }
    assert!(copies.iter().all(|c| *c == copies[0]), "the copies differ: {copies:?}");
    // The state after exactly `point` writes: block b holds the round of the
    // last write to it among the first `point`.
    let point = (0..BLOCKS)
        .map(|block| match copies[0][usize::try_from(block).unwrap()] {
            0 => 0,
            round => (round - 1) * BLOCKS + block + 1,
        })
        .max()
        .unwrap();
    for block in 0..BLOCKS {
        let expected = if point > block {
            (point - block - 1) / BLOCKS + 1
        } else {
            0
        };
        assert_eq!(
            copies[0][usize::try_from(block).unwrap()],
            expected,
            "block {block}: the snapshot is not the volume after {point} writes"
        );
    }
    assert!(
        (before..=after).contains(&point),
        "the snapshot holds {point} writes; {before} were acknowledged before it was asked for, {after} when it answered"
    );
}

/// Connects to snapshot (or clone) export `name` on `node`. A snapshot
/// reaches each node through the cluster's metadata log: until this node has
/// applied it, the export is unknown there and the connection is closed in
/// the handshake. Retried, within a bound (each attempt bounded too, so one
/// slow attempt under load does not use up the whole wait).
fn connect_snapshot(node: &TestNode, name: &str) -> NbdClient {
    let started = Instant::now();
    loop {
        match NbdClient::connect(&nbd_address(node), name, Duration::from_secs(5)) {
            Ok(client) => return client,
            Err(error) if started.elapsed() > Duration::from_secs(60) => {
                panic!("{name} on node {} (tried for 60 s): {error}", node.node_id())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads `[offset, offset + len)` of export `name` on `node` (read-only)
/// and checks every byte is `fill`.
fn expect_fill(node: &TestNode, name: &str, offset: u64, len: u64, fill: u8) {
    let mut client = connect_snapshot(node, name);
    let mut at = offset;
    while at < offset + len {
        let piece = (offset + len - at).min(1 << 20);
        let (error, data) = client
            .request(proto::CMD_READ, at, u32::try_from(piece).unwrap(), &[])
            .unwrap();
        assert_eq!(error, 0, "{name} on node {}", node.node_id());
        let wrong = data.iter().position(|b| *b != fill);
        assert!(
            wrong.is_none(),
            "{name} on node {}: byte {} is {:#x}, not {fill:#x}",
            node.node_id(),
            at + wrong.unwrap_or(0) as u64,
            data[wrong.unwrap_or(0)]
        );
        at += piece;
    }
}

#[test]
fn restore_and_clone_reach_every_replica_of_a_replicated_volume() {
    let test = "restore_and_clone_reach_every_replica";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    let admin = &cluster.nodes[0];
    admin.cli_ok(&["volume", "create", "v", "--size", "16MiB", "--repl", "3"]);
    let coordinator = admin.inspect("v")["coordinator"].as_u64().unwrap();
    let serving = &cluster.nodes[cluster.index_of(coordinator)];
    let uri = serving.uri("v");
    expect_pattern(&uri, "write -P 0x71 0 8M");
    admin.cli_ok(&["snapshot", "create", "v", "s"]);
    expect_pattern(&uri, "write -P 0x72 0 8M");
    expect_pattern(&uri, "write -P 0x74 8M 4M");
    admin.cli_ok(&["snapshot", "restore", "v", "s"]);
    expect_pattern(&uri, "read -P 0x71 0 8M");
    expect_pattern(&uri, "read -P 0 8M 8M");

    // What each replica holds now: a snapshot's copy on each node is a
    // clone of that node's replica.
    admin.cli_ok(&["snapshot", "create", "v", "check"]);
    for node in &cluster.nodes {
        expect_fill(node, "v@check", 0, 8 << 20, 0x71);
        expect_fill(node, "v@check", 8 << 20, 8 << 20, 0);
    }

    // A clone of a snapshot held by three nodes has three in-sync replicas,
    // and writes to it reach them all.
    admin.cli_ok(&["volume", "clone", "v@s", "c"]);
    let info = admin.inspect("c");
    assert_eq!(info["in_sync"].as_array().unwrap().len(), 3, "{info:#}");
    let clone_coordinator = info["coordinator"].as_u64().unwrap();
    let clone_uri = cluster.nodes[cluster.index_of(clone_coordinator)].uri("c");
    expect_pattern(&clone_uri, "write -P 0x73 0 1M");
    expect_pattern(&clone_uri, "read -P 0x71 1M 7M");
    admin.cli_ok(&["snapshot", "create", "c", "cc"]);
    for node in &cluster.nodes {
        expect_fill(node, "c@cc", 0, 1 << 20, 0x73);
        expect_fill(node, "c@cc", 1 << 20, 7 << 20, 0x71);
        expect_fill(node, "v@s", 0, 8 << 20, 0x71);
    }
}

/// crc32c of every 1 MiB of export `name` on `node`.
fn digest(node: &TestNode, name: &str, size_bytes: u64) -> Vec<u32> {
    let mut client = connect_snapshot(node, name);
    (0..size_bytes / (1 << 20))
        .map(|mib| {
            let (error, data) = client.request(proto::CMD_READ, mib << 20, 1 << 20, &[]).unwrap();
            assert_eq!(error, 0, "{name} on node {}", node.node_id());
            crc32c::crc32c(&data)
        })
        .collect()
}

#[test]
fn snapshots_taken_under_fio_at_queue_depth_32_agree_on_every_replica_and_fio_verifies() {
    let test = "snapshots_taken_under_fio";
    if !have_tool(test, "fio") {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    let admin = &cluster.nodes[0];
    admin.cli_ok(&["volume", "create", "f", "--size", "32MiB", "--repl", "3"]);
    let info = admin.inspect("f");
    let serving = &cluster.nodes[cluster.index_of(info["coordinator"].as_u64().unwrap())];
    let scratch = tempfile::tempdir().unwrap();
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=snap",
            "--ioengine=nbd",
            &format!("--uri={}", serving.uri("f")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--io_size=256M",
            "--verify=crc32c",
            "--randrepeat=1",
            "--output-format=json",
        ])
        .current_dir(scratch.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fio");
    let mut taken = Vec::new();
    for index in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let name = format!("q{index}");
        admin.cli_ok(&["snapshot", "create", "f", &name]);
        taken.push(name);
    }
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio finished before the last snapshot: nothing was taken under load"
    );
    let status = wait_exit_within(&mut fio, Duration::from_secs(300), "fio did not finish");
    let output = fio.wait_with_output().unwrap();
    assert!(status.success(), "fio: {}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json_start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no fio JSON: {}", text(&output)));
    let report: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(report["jobs"][0]["error"], 0, "fio verify: {report:#}");
    for name in &taken {
        let export = format!("f@{name}");
        let copies: Vec<Vec<u32>> = cluster
            .nodes
            .iter()
            .map(|node| digest(node, &export, 32 << 20))
            .collect();
        assert!(
            copies.iter().all(|copy| *copy == copies[0]),
            "{export} differs between replicas"
        );
    }
    let first = digest(serving, "f@q0", 32 << 20);
    let volume = digest(serving, "f", 32 << 20);
    assert_ne!(first, volume, "writes after the first snapshot did not leak into it");
}

#[test]
fn an_encrypted_volumes_snapshot_and_clone_read_decrypted_where_the_volume_is_unlocked() {
    let test = "an_encrypted_volumes_snapshot_and_clone";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.cli_ok(&["volume", "create", "vault", "--size", "32MiB", "--encrypted"]);
    let uri = node.uri("vault");
    expect_pattern(&uri, "write -P 0x3c 0 8M");
    node.cli_ok(&["snapshot", "create", "vault", "day1"]);
    expect_pattern(&uri, "write -P 0x3d 0 4M");
    expect_pattern(&node.uri("vault@day1"), "read -P 0x3c 0 8M");

    let cloned = node.cli_ok(&["volume", "clone", "vault@day1", "vault-copy"]);
    assert!(
        cloned.contains("encryption:  AES-XTS-256"),
        "the clone is encrypted too: {cloned}"
    );
    let copy = node.uri("vault-copy");
    expect_pattern(&copy, "read -P 0x3c 0 8M");
    expect_pattern(&copy, "write -P 0x3e 0 1M");
    expect_pattern(&copy, "read -P 0x3e 0 1M");
    expect_pattern(&copy, "read -P 0x3c 1M 7M");
    expect_pattern(&uri, "read -P 0x3d 0 4M");

    node.cli_ok(&["snapshot", "restore", "vault", "day1"]);
    expect_pattern(&uri, "read -P 0x3c 0 8M");
    // What reached the disk is ciphertext: no block of the patterns is in its file.
    let disk = node.data().parent().unwrap().join("disk0.img");
    let bytes = std::fs::read(&disk).unwrap();
    for fill in [0x3c, 0x3d, 0x3e] {
        assert!(
            !bytes.chunks(4096).any(|block| block.iter().all(|b| *b == fill)),
            "plaintext {fill:#x} on disk"
        );
    }
}

fn in_sync_count(node: &TestNode, volume: &str) -> usize {
    node.inspect(volume)["in_sync"].as_array().map_or(0, Vec::len)
}

#[test]
fn a_replica_without_the_snapshot_copies_the_whole_restored_volume_when_it_returns() {
    let test = "a_replica_without_the_snapshot_copies";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "r3", "--size", "16MiB", "--repl", "3"]);
    let coordinator = cluster.index_of(cluster.nodes[0].inspect("r3")["coordinator"].as_u64().unwrap());
    let uri = cluster.nodes[coordinator].uri("r3");
    expect_pattern(&uri, "write -P 0x21 0 8M");
    // One replica is down while the snapshot is taken: it holds no copy.
    let absent = (coordinator + 1) % 3;
    cluster.nodes[absent].kill9();
    expect_pattern(&uri, "write -P 0x22 8M 1M");
    let admin = &cluster.nodes[coordinator];
    wait_until("the dead replica dropped from the in-sync set", || {
        in_sync_count(admin, "r3") == 2
    });
    let taken = admin.cli_ok(&["snapshot", "create", "r3", "s", "--json"]);
    let holders = serde_json::from_str::<serde_json::Value>(&taken).unwrap()["holders"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(holders, 2, "{taken}");
    expect_pattern(&uri, "write -P 0x23 0 4M");
    cluster.nodes[absent].restart();
    let admin = &cluster.nodes[coordinator];
    wait_until("the replica resynced", || in_sync_count(admin, "r3") == 3);

    // The returned replica refuses the restore (no copy): it must then copy
    // the whole restored volume, not only what changed while it was away.
    admin.cli_ok(&["snapshot", "restore", "r3", "s"]);
    wait_until("every replica in sync after the restore", || {
        in_sync_count(admin, "r3") == 3
    });
    let absent_id = cluster.nodes[absent].node_id();
    let info = admin.inspect("r3");
    let resync = info["resyncs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|resync| resync["node"] == absent_id)
        .unwrap_or_else(|| panic!("no resync of node {absent_id}: {info:#}"))
        .clone();
    assert!(
        resync["dirty_bytes"].as_u64().unwrap() >= 16 << 20,
        "the refused restore marked the whole volume for it: {resync:#}"
    );
    admin.cli_ok(&["snapshot", "create", "r3", "after"]);
    for node in &cluster.nodes {
        expect_fill(node, "r3@after", 0, 8 << 20, 0x21);
        expect_fill(node, "r3@after", 8 << 20, 1 << 20, 0x22);
        expect_fill(node, "r3@after", 9 << 20, 7 << 20, 0);
    }
}

/// Fills `[offset, offset + len)` of `volume` through `client` with blocks
/// that differ from each other and from any other `seed`.
fn write_distinct(client: &mut NbdClient, offset: u64, len: u64, seed: u64) {
    let mut at = offset;
    while at < offset + len {
        // Up to 1 MiB per request; each block its own bytes.
        let piece = (offset + len - at).min(1 << 20);
        let mut data = vec![0u8; usize::try_from(piece).unwrap()];
        for (b, block) in data.chunks_mut(4096).enumerate() {
            let block_at = at + b as u64 * 4096;
            for (i, word) in block.chunks_mut(8).enumerate() {
                word.copy_from_slice(
                    &(seed ^ (block_at << 8) ^ i as u64)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .to_le_bytes(),
                );
            }
        }
        let (error, _) = client
            .request(proto::CMD_WRITE, at, u32::try_from(piece).unwrap(), &data)
            .unwrap();
        assert_eq!(error, 0, "write at {at}");
        at += piece;
    }
}

fn read_all(client: &mut NbdClient, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap());
    let mut at = 0;
    while at < size {
        let (error, data) = client.request(proto::CMD_READ, at, 1 << 20, &[]).unwrap();
        assert_eq!(error, 0, "read at {at}");
        out.extend_from_slice(&data);
        at += 1 << 20;
    }
    out
}

fn backup_json(node: &TestNode, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(args)).unwrap()
}

#[test]
fn backups_are_incremental_encrypted_verified_restored_elsewhere_and_deleted_without_harm() {
    let test = "backups_are_incremental";
    let cluster = TestCluster::start(test, 3, &[]);
    let scratch = common::scratch();
    let target_dir = scratch.path().join("target");
    let target = format!("file://{}", target_dir.display());
    let passphrase = scratch.path().join("passphrase");
    std::fs::write(&passphrase, "correct horse battery\n").unwrap();
    let pass = passphrase.to_str().unwrap();
    let first_node = &cluster.nodes[0];
    first_node.cli_ok(&["volume", "create", "db", "--size", "32MiB", "--repl", "2"]);
    let coordinator = cluster.index_of(first_node.inspect("db")["coordinator"].as_u64().unwrap());
    // Every command below goes through a node that does not serve the volume: forwarded.
    let other = &cluster.nodes[(coordinator + 1) % 3];
    let mut client =
        NbdClient::connect(&nbd_address(&cluster.nodes[coordinator]), "db", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 8 << 20, 1);

    // The first backup reads what holds data: 8 MiB, not 32.
    let create = [
        "backup",
        "create",
        "db",
        "--target",
        &target,
        "--passphrase-file",
        pass,
        "--json",
    ];
    let full = backup_json(other, &create);
    assert_eq!(full["state"], "done", "{full:#}");
    assert_eq!(full["read_bytes"], 8 << 20, "{full:#}");
    assert!(full["parent"].is_null(), "{full:#}");
    let sent = full["stored_bytes"].as_u64().unwrap();
    assert!(sent > 8 << 20, "random data does not compress, and is sealed: {full:#}");
    let on_disk = std::fs::read_dir(target_dir.join("chunks"))
        .unwrap()
        .flat_map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap())
        .map(|file| std::fs::read(file.unwrap().path()).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(on_disk.len(), 32, "8 MiB in 256-KiB chunks");
    let plain = read_all(&mut client, 8 << 20);
    assert!(
        on_disk.iter().all(|chunk| !chunk
            .windows(64)
            .any(|w| plain[..256 << 10].windows(64).next() == Some(w))),
        "the volume's bytes are not in the target in the clear"
    );

    // Overwrite 1 MiB and add 1 MiB: the next backup reads those chunks only,
    // taken under writes (to the first MiB again, so the diff stays 2 MiB).
    write_distinct(&mut client, 0, 1 << 20, 2);
    write_distinct(&mut client, 20 << 20, 1 << 20, 3);
    // Scattered small writes (over data, and over zeros) go as patches:
    // only their blocks are read and sent.
    let scattered = [
        (3 << 20 | 8 << 10, 4 << 10),
        (5 << 20 | 100 << 10, 4 << 10),
        (6 << 20, 8 << 10),
        (28 << 20, 4 << 10),
    ];
    for (seed, (at, len)) in (4..).zip(scattered) {
        write_distinct(&mut client, at, len, seed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, address) = (Arc::clone(&stop), nbd_address(&cluster.nodes[coordinator]));
        std::thread::spawn(move || {
            let mut client = NbdClient::connect(&address, "db", Duration::from_secs(20)).unwrap();
            let started = Instant::now();
            let mut seed = 100;
            while !stop.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(60) {
                write_distinct(&mut client, 0, 1 << 20, seed);
                seed += 1;
            }
            seed - 100
        })
    };
    let incremental = backup_json(other, &create);
    stop.store(true, Ordering::Release);
    assert!(writer.join().unwrap() > 0, "no write ran beside the backup");
    assert_eq!(incremental["parent"], full["backup"], "{incremental:#}");
    assert_eq!(incremental["read_bytes"], (2 << 20) + (20 << 10), "{incremental:#}");
    let sent = incremental["stored_bytes"].as_u64().unwrap();
    assert!(
        sent < (2 << 20) + (20 << 10) + (32 << 10),
        "the patches send their blocks, not their chunks: {incremental:#}"
    );
    let snapshots_now: Vec<String> = snapshots(other, "db")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        snapshots_now,
        vec![incremental["snapshot"].as_str().unwrap().to_owned()],
        "one backup snapshot stays, the base of the next"
    );
    // What the backup must hold: its snapshot, not the volume written since.
    let snapshot = format!("db@{}", incremental["snapshot"].as_str().unwrap());
    let expected = read_all(&mut connect_snapshot(&cluster.nodes[coordinator], &snapshot), 32 << 20);
    drop(client);

    let listed = backup_json(other, &["backup", "list", &target, "--passphrase-file", pass, "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
    let verified = backup_json(
        other,
        &["backup", "verify", &target, "--passphrase-file", pass, "--json"],
    );
    assert_eq!(
        (
            verified["chunks"].as_u64(),
            verified["missing"].as_array().unwrap().len()
        ),
        (Some(44), 0),
        "40 chunks and 4 patches: {verified:#}"
    );

    // A wrong passphrase opens nothing, and says so.
    std::fs::write(scratch.path().join("wrong"), "wrong horse battery\n").unwrap();
    let wrong = other.cli(&[
        "backup",
        "list",
        &target,
        "--passphrase-file",
        scratch.path().join("wrong").to_str().unwrap(),
    ]);
    assert!(
        !wrong.status.success() && text(&wrong).contains("wrong passphrase"),
        "{}",
        text(&wrong)
    );

    // Deleting the first backup frees only the chunks the second replaced.
    let deleted = other.cli_ok(&[
        "backup",
        "delete",
        &target,
        full["backup"].as_str().unwrap(),
        "--passphrase-file",
        pass,
    ]);
    assert!(deleted.contains("4 chunks freed"), "{deleted}");

    // The second restores, whole, into a new replicated volume.
    let restored = backup_json(
        other,
        &[
            "backup",
            "restore",
            &target,
            incremental["backup"].as_str().unwrap(),
            "copy",
            "--repl",
            "2",
            "--passphrase-file",
            pass,
            "--json",
        ],
    );
    assert_eq!(restored["state"], "done", "{restored:#}");
    let copy_coordinator = cluster.index_of(other.inspect("copy")["coordinator"].as_u64().unwrap());
    let mut copy = NbdClient::connect(
        &nbd_address(&cluster.nodes[copy_coordinator]),
        "copy",
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        read_all(&mut copy, 32 << 20) == expected,
        "the restored volume differs from the backed-up one"
    );
    drop(copy);
    wait_until("the copy's replicas in sync", || in_sync_count(other, "copy") == 2);
    // A second volume with the same data adds almost nothing to the target
    // (dedup): only the 4 chunks the source holds as patches are new whole.
    let twin = backup_json(
        other,
        &[
            "backup",
            "create",
            "copy",
            "--target",
            &target,
            "--passphrase-file",
            pass,
            "--json",
        ],
    );
    assert_eq!(twin["state"], "done", "{twin:#}");
    assert!(
        twin["stored_bytes"].as_u64().unwrap() < 4 * (258 << 10),
        "of 37 chunks with data, 33 are the source's: {twin:#}"
    );

    // Damage is found by verify, without a restore.
    // (a chunk directory may be empty after the delete: the first chunk file in any)
    let victim = std::fs::read_dir(target_dir.join("chunks"))
        .unwrap()
        .flat_map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap())
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let damaged = other.cli(&["backup", "verify", &target, "--passphrase-file", pass]);
    assert!(
        !damaged.status.success() && text(&damaged).contains("damaged"),
        "{}",
        text(&damaged)
    );
}

/// A moto_server (a local S3-compatible server) on 127.0.0.1, stopped (by
/// its pid) when dropped.
struct MotoServer {
    child: std::process::Child,
    endpoint: String,
}

impl MotoServer {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// `start` with environment settings (INITIAL_NO_AUTH_ACTION_COUNT=0:
    /// every request must be signed with a key moto knows).
    fn start_with(env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        wait_until("moto_server listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }

    /// Creates `bucket` (moto takes unsigned requests).
    fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let address = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn backups_go_to_an_s3_compatible_store_and_come_back() {
    let test = "backups_go_to_an_s3";
    if !have_tool(test, "moto_server") {
        return;
    }
    let s3 = MotoServer::start();
    s3.create_bucket("ballast-backups");
    let node = TestNode::start(test, 256 << 20);
    let scratch = common::scratch();
    let key = scratch.path().join("key");
    std::fs::write(&key, [0x5au8; 32]).unwrap();
    let credentials = scratch.path().join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let (key, credentials) = (key.to_str().unwrap(), credentials.to_str().unwrap());
    let target = "s3://ballast-backups/site-a";
    let opts = [
        "--endpoint",
        &s3.endpoint,
        "--credentials-file",
        credentials,
        "--key-file",
        key,
    ];
    node.cli_ok(&["volume", "create", "s3vol", "--size", "8MiB"]);
    let mut client = NbdClient::connect(&nbd_address(&node), "s3vol", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 3 << 20, 7);
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&opts);
        backup_json(&node, &all)
    };
    let full = run(&["backup", "create", "s3vol", "--target", target, "--json"]);
    assert_eq!(
        (full["state"].as_str(), full["read_bytes"].as_u64()),
        (Some("done"), Some(3 << 20)),
        "{full:#}"
    );
    assert_eq!(full["yielded"], 0, "an idle client costs a backup no pause: {full:#}");
    write_distinct(&mut client, 4 << 20, 256 << 10, 8);
    let incremental = run(&["backup", "create", "s3vol", "--target", target, "--json"]);
    assert_eq!(incremental["read_bytes"], 256 << 10, "{incremental:#}");
    let expected = read_all(&mut client, 8 << 20);
    drop(client);
    let listed = run(&["backup", "list", target, "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed:#}");
    let verified = run(&["backup", "verify", target, "--json"]);
    assert_eq!(verified["chunks"], 13, "{verified:#}");
    let restored = run(&[
        "backup",
        "restore",
        target,
        incremental["backup"].as_str().unwrap(),
        "s3copy",
        "--json",
    ]);
    assert_eq!(restored["state"], "done", "{restored:#}");
    let mut copy = NbdClient::connect(&nbd_address(&node), "s3copy", Duration::from_secs(20)).unwrap();
    assert!(
        read_all(&mut copy, 8 << 20) == expected,
        "the volume restored from S3 differs"
    );
    // An unreachable endpoint is named (after a few quick retries).
    let unreachable = node.cli(&[
        "backup",
        "list",
        target,
        "--endpoint",
        "http://127.0.0.1:9",
        "--credentials-file",
        credentials,
        "--key-file",
        key,
    ]);
    assert!(
        !unreachable.status.success() && text(&unreachable).contains("127.0.0.1:9"),
        "{}",
        text(&unreachable)
    );
    // An absent bucket is named.
    let absent = node.cli(&[
        "backup",
        "list",
        "s3://no-such-bucket",
        "--endpoint",
        &s3.endpoint,
        "--credentials-file",
        credentials,
        "--key-file",
        key,
    ]);
    assert!(
        !absent.status.success() && text(&absent).contains("no-such-bucket"),
        "{}",
        text(&absent)
    );
}

#[test]
fn a_full_target_or_refused_credentials_fail_the_backup_by_name_and_nothing_is_listed() {
    let test = "a_full_target_or_refused";
    let node = TestNode::start(test, 256 << 20);
    let scratch = common::scratch();
    let key = scratch.path().join("key");
    std::fs::write(&key, [0x3cu8; 32]).unwrap();
    let key = key.to_str().unwrap();
    node.cli_ok(&["volume", "create", "fv", "--size", "16MiB"]);
    let mut client = NbdClient::connect(&nbd_address(&node), "fv", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 12 << 20, 21);
    drop(client);

    // A target with room for a few chunks (a 2-MiB tmpfs) fills up mid-backup.
    let small = scratch.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "ballast-test"])
        .arg(&small)
        .status()
        .is_ok_and(|status| status.success());
    if mounted {
        let _mount = common::Mount(small.clone());
        let target = format!("file://{}", small.join("t").display());
        let full = node.cli(&["backup", "create", "fv", "--target", &target, "--key-file", key]);
        let said = text(&full);
        assert!(
            !full.status.success() && said.contains("the target is full") && said.contains("backup delete"),
            "{said}"
        );
        let listed = backup_json(&node, &["backup", "list", &target, "--key-file", key, "--json"]);
        assert_eq!(
            listed.as_array().map(Vec::len),
            Some(0),
            "a cut backup is not listed: {listed:#}"
        );
        let leftovers = std::fs::read_dir(small.join("t/chunks"))
            .unwrap()
            .flat_map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap())
            .filter(|file| file.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(leftovers, 0, "no half-written object is left behind");
        // The node serves on: the volume reads, and a backup elsewhere works.
        let elsewhere = format!("file://{}", scratch.path().join("big").display());
        let done = backup_json(
            &node,
            &[
                "backup",
                "create",
                "fv",
                "--target",
                &elsewhere,
                "--key-file",
                key,
                "--json",
            ],
        );
        assert_eq!(done["state"], "done", "{done:#}");
    } else {
        common::record_skip(
            test,
            "cannot mount a tmpfs (needs root): the full-target half is not run",
        );
    }

    // Credentials the store does not know are named as such.
    if !have_tool(test, "moto_server") {
        return;
    }
    let strict = MotoServer::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let credentials = scratch.path().join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = AKIDNOBODY\naws_secret_access_key = not-a-secret\n",
    )
    .unwrap();
    let refused = node.cli(&[
        "backup",
        "create",
        "fv",
        "--target",
        "s3://guarded/x",
        "--endpoint",
        &strict.endpoint,
        "--credentials-file",
        credentials.to_str().unwrap(),
        "--key-file",
        key,
    ]);
    let said = text(&refused);
    assert!(
        !refused.status.success() && said.contains("refused the credentials") && said.contains("InvalidAccessKeyId"),
        "{said}"
    );
}

#[test]
fn scheduled_backups_run_unattended_to_a_registered_target_and_keep_the_newest() {
    let test = "scheduled_backups_run_unattended";
    let node = TestNode::start(test, 256 << 20);
    let scratch = common::scratch();
    let passphrase = scratch.path().join("passphrase");
    std::fs::write(&passphrase, "correct horse battery\n").unwrap();
    let url = format!("file://{}", scratch.path().join("site").display());
    node.cli_ok(&[
        "backup",
        "target",
        "add",
        "site",
        &url,
        "--passphrase-file",
        passphrase.to_str().unwrap(),
    ]);
    let targets = node.cli_ok(&["backup", "target", "list"]);
    assert!(targets.contains("site") && targets.contains(&url), "{targets}");
    node.cli_ok(&["volume", "create", "sv", "--size", "8MiB"]);
    let mut client = NbdClient::connect(&nbd_address(&node), "sv", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 1 << 20, 11);
    drop(client);
    // By name: no secret on the command line.
    let first = backup_json(&node, &["backup", "create", "sv", "--target", "site", "--json"]);
    assert_eq!(first["state"], "done", "{first:#}");
    let first = first["backup"].as_str().unwrap().to_owned();

    let updated = backup_json(
        &node,
        &[
            "volume",
            "update",
            "sv",
            "--backup-every",
            "10s",
            "--backup-keep",
            "2",
            "--backup-target",
            "site",
            "--json",
        ],
    );
    assert_eq!(
        (
            updated["backup_every_seconds"].as_u64(),
            updated["backup_keep"].as_u64()
        ),
        (Some(10), Some(2))
    );
    // Two scheduled backups later the first is gone and two remain.
    let started = Instant::now();
    let ids = loop {
        let listed = backup_json(&node, &["backup", "list", "site", "--volume", "sv", "--json"]);
        let ids: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        if !ids.contains(&first) && ids.len() == 2 {
            break ids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "scheduled backups and pruning: not within 90 s; backups now {ids:?}; log: {}",
            node.log_text()
                .lines()
                .filter(|l| l.contains("backup"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(ids.len() <= 3, "more than --backup-keep kept: {ids:?}");
        std::thread::sleep(Duration::from_secs(1));
    };
    // The newest restores.
    let restored = backup_json(&node, &["backup", "restore", "site", &ids[1], "sv2", "--json"]);
    assert_eq!(restored["state"], "done", "{restored:#}");

    let refused = node.cli(&["backup", "target", "delete", "site"]);
    assert!(
        !refused.status.success() && text(&refused).contains("--backup-every 0"),
        "{}",
        text(&refused)
    );
    node.cli_ok(&["volume", "update", "sv", "--backup-every", "0"]);

    // Inspect, verify and delete by name: the node uses the secret the cluster keeps.
    let inspected = node.cli_ok(&["backup", "inspect", "site", &ids[1]]);
    assert!(
        inspected.contains(&ids[1]) && inspected.contains("volume:    sv"),
        "{inspected}"
    );
    let verified = backup_json(&node, &["backup", "verify", "site", "--json"]);
    assert!(
        verified["chunks"].as_u64().unwrap() >= 4
            && verified["missing"].as_array().unwrap().is_empty()
            && verified["damaged"].as_array().unwrap().is_empty(),
        "{verified:#}"
    );
    // A scheduled backup that began just before the schedule ended may
    // hold the target a moment: the delete is refused meanwhile, by name.
    let started = Instant::now();
    let deleted = loop {
        let output = node.cli(&["backup", "delete", "site", &ids[0]]);
        if output.status.success() {
            break text(&output);
        }
        assert!(
            text(&output).contains("in use") && started.elapsed() < Duration::from_secs(30),
            "{}",
            text(&output)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(deleted.contains(&format!("deleted backup {}", ids[0])), "{deleted}");
    let listed = backup_json(&node, &["backup", "list", "site", "--json"]);
    assert!(
        listed.as_array().unwrap().iter().all(|m| m["id"] != ids[0].as_str()),
        "{listed:#}"
    );
    node.cli_ok(&["backup", "target", "delete", "site"]);
    assert!(node.cli_ok(&["backup", "target", "list"]).contains("no registered"));
}

/// Waits (polling each second, at most 60 s) until standby `volume` on
/// `node` has applied backup `backup`.
fn wait_applied(node: &TestNode, volume: &str, backup: &str) {
    let started = Instant::now();
    loop {
        let info = node.inspect(volume);
        if info["standby_applied"] == backup {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{volume} did not apply {backup} within 60 s: {info:#}; log: {}",
            node.log_text()
                .lines()
                .filter(|l| l.contains("standby"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_standby_on_a_second_cluster_follows_the_backups_and_serves_once_promoted() {
    let test = "a_standby_on_a_second_cluster";
    let site_a = TestNode::start(test, 256 << 20);
    let site_b = TestNode::start(test, 256 << 20);
    let scratch = common::scratch();
    let key = scratch.path().join("key");
    std::fs::write(&key, [0x33u8; 32]).unwrap();
    let url = format!("file://{}", scratch.path().join("dr").display());
    for node in [&site_a, &site_b] {
        node.cli_ok(&[
            "backup",
            "target",
            "add",
            "dr",
            &url,
            "--key-file",
            key.to_str().unwrap(),
        ]);
    }
    site_a.cli_ok(&["volume", "create", "pg", "--size", "8MiB"]);
    let mut client = NbdClient::connect(&nbd_address(&site_a), "pg", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 2 << 20, 21);
    let first = backup_json(&site_a, &["backup", "create", "pg", "--target", "dr", "--json"]);

    let standby = backup_json(
        &site_b,
        &["volume", "create", "pg-dr", "--standby-of", "dr/pg", "--json"],
    );
    assert_eq!(
        (standby["standby_of"].as_str(), standby["size_bytes"].as_u64()),
        (Some("dr/pg"), Some(8 << 20))
    );
    wait_applied(&site_b, "pg-dr", first["backup"].as_str().unwrap());
    assert!(
        NbdClient::connect(&nbd_address(&site_b), "pg-dr", Duration::from_secs(5)).is_err(),
        "a standby serves no client"
    );

    // The next backup of the source is applied too: only the chunk that changed is read.
    write_distinct(&mut client, 1 << 20, 256 << 10, 22);
    let expected = read_all(&mut client, 8 << 20);
    drop(client);
    let second = backup_json(&site_a, &["backup", "create", "pg", "--target", "dr", "--json"]);
    wait_applied(&site_b, "pg-dr", second["backup"].as_str().unwrap());
    let applying = backup_json(&site_b, &["backup", "job", "pg-dr", "2", "--json"]);
    assert_eq!(
        (applying["state"].as_str(), applying["read_bytes"].as_u64()),
        (Some("done"), Some(256 << 10)),
        "{applying:#}"
    );

    // The switch: promoted, it serves the source's data as of the last backup.
    let promoted = backup_json(&site_b, &["volume", "promote", "pg-dr", "--json"]);
    assert_eq!(promoted["standby_of"], "", "{promoted:#}");
    let mut copy = NbdClient::connect(&nbd_address(&site_b), "pg-dr", Duration::from_secs(20)).unwrap();
    assert!(
        read_all(&mut copy, 8 << 20) == expected,
        "the promoted standby differs from the source"
    );
    let again = site_b.cli(&["volume", "promote", "pg-dr"]);
    assert!(
        !again.status.success() && text(&again).contains("not a standby"),
        "{}",
        text(&again)
    );
}

/// Polls `backup job VOLUME ID` on `node` until `done(job)`, at most 60 s.
fn wait_job(
    node: &TestNode,
    volume: &str,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let job = backup_json(node, &["backup", "job", volume, id, "--json"]);
        if done(&job) {
            return job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: not within 60 s: {job:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn count_chunks(target: &std::path::Path) -> usize {
    std::fs::read_dir(target.join("chunks"))
        .map(|dirs| {
            dirs.map(|dir| std::fs::read_dir(dir.unwrap().path()).unwrap().count())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_backup_cut_by_a_crash_is_not_listed_the_next_sends_only_what_is_missing_and_a_restore_refuses_clients() {
    let test = "a_backup_cut_by_a_crash";
    let mut node = TestNode::start(test, 256 << 20);
    let scratch = common::scratch();
    let key = scratch.path().join("key");
    std::fs::write(&key, [0x44u8; 32]).unwrap();
    let key = key.to_str().unwrap().to_owned();
    let target_dir = scratch.path().join("t");
    let url = format!("file://{}", target_dir.display());
    node.cli_ok(&["volume", "create", "big", "--size", "32MiB"]);
    let mut client = NbdClient::connect(&nbd_address(&node), "big", Duration::from_secs(20)).unwrap();
    write_distinct(&mut client, 0, 32 << 20, 31);
    let expected = read_all(&mut client, 32 << 20);
    drop(client);

    // 4 MiB/s over 32 MiB: the node is killed a quarter of the way through.
    let slow = backup_json(
        &node,
        &[
            "backup",
            "create",
            "big",
            "--target",
            &url,
            "--key-file",
            &key,
            "--mib-per-s",
            "4",
            "--no-wait",
            "--json",
        ],
    );
    let id = slow["id"].to_string();
    // A client at work meanwhile (rewriting the same bytes): the backup yields to it.
    let mut client = NbdClient::connect(&nbd_address(&node), "big", Duration::from_secs(20)).unwrap();
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_secs(1) {
        write_distinct(&mut client, 0, 1 << 20, 31);
    }
    drop(client);
    let cut = wait_job(&node, "big", &id, "a quarter backed up", |job| {
        job["done_bytes"].as_u64() >= Some(8 << 20)
    });
    assert_eq!(cut["state"], "running", "--mib-per-s bounds the rate: {cut:#}");
    assert!(
        cut["yielded"].as_u64() > Some(0),
        "the backup did not yield to a busy client: {cut:#}"
    );
    node.kill9();
    node.restart();
    let listed = backup_json(&node, &["backup", "list", &url, "--key-file", &key, "--json"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(0),
        "a cut backup is never listed: {listed:#}"
    );
    let sent_before = count_chunks(&target_dir);
    assert!(
        (32..128).contains(&sent_before),
        "chunks the cut backup sent: {sent_before}"
    );

    // Run again: every chunk is read, only those the target lacks are sent.
    let resumed = backup_json(
        &node,
        &[
            "backup",
            "create",
            "big",
            "--target",
            &url,
            "--key-file",
            &key,
            "--json",
        ],
    );
    assert_eq!(
        (resumed["state"].as_str(), resumed["read_bytes"].as_u64()),
        (Some("done"), Some(32 << 20))
    );
    let missing = 128 - u64::try_from(sent_before).unwrap();
    let stored = resumed["stored_bytes"].as_u64().unwrap();
    assert!(
        stored > missing * (256 << 10) && stored < (missing + 1) * (256 << 10),
        "sent {stored} bytes for {missing} missing chunks: {resumed:#}"
    );
    assert_eq!(count_chunks(&target_dir), 128);

    // A restore refuses clients until it ends.
    let backup = resumed["backup"].as_str().unwrap();
    let restoring = backup_json(
        &node,
        &[
            "backup",
            "restore",
            &url,
            backup,
            "back",
            "--key-file",
            &key,
            "--mib-per-s",
            "4",
            "--no-wait",
            "--json",
        ],
    );
    let refused = NbdClient::connect(&nbd_address(&node), "back", Duration::from_secs(5));
    let id = restoring["id"].to_string();
    let during = backup_json(&node, &["backup", "job", "back", &id, "--json"]);
    assert!(
        refused.is_err() && during["state"] == "running",
        "a client opened a volume being restored: {during:#}"
    );
    wait_job(&node, "back", &id, "the restore", |job| job["state"] == "done");
    let mut back = NbdClient::connect(&nbd_address(&node), "back", Duration::from_secs(20)).unwrap();
    assert!(read_all(&mut back, 32 << 20) == expected, "the restored volume differs");
}
