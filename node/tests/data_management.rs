//! Data management on a real node (issue 11): thin provisioning and TRIM —
//! a volume uses disk space only for what was written, and a discard
//! gives the space back (the volume's allocation at once, the disk's live
//! blocks with it; the cleaner then reuses the segments).

mod common;

use std::process::Command;

use common::cluster::{wait_until, TestCluster};
use common::node::TestNode;
use common::{have_tool, qemu_io, qemu_io_ok, qemu_io_read_only, text};

#[test]
fn a_volume_uses_space_only_for_written_data_and_a_trim_gives_it_back() {
    let test = "a_volume_uses_space_only_for_written_data";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.create_volume("thin", "1GiB");
    assert_eq!(node.inspect("thin")["used_bytes"], 0, "a new volume holds nothing");
    let uri = node.uri("thin");
    let written = qemu_io(&uri, "write -P 0x61 64M 96M");
    assert!(written.status.success(), "{}", text(&written));
    let info = node.inspect("thin");
    assert_eq!(info["size_bytes"], 1u64 << 30);
    assert_eq!(info["used_bytes"], 96u64 << 20, "allocated: what was written");
    let before = node.disk_used_bytes();
    assert!(before >= 96 << 20, "{before}");
    let inspect = node.cli_ok(&["volume", "inspect", "thin"]);
    assert!(inspect.contains("used:"), "{inspect}");

    let trimmed = qemu_io(&uri, "discard 64M 80M");
    assert!(trimmed.status.success(), "{}", text(&trimmed));
    assert_eq!(
        node.inspect("thin")["used_bytes"],
        16u64 << 20,
        "allocation drops with the trim"
    );
    let after = node.disk_used_bytes();
    assert!(
        before - after >= 80 << 20,
        "the disk's live data drops too: {before} -> {after}"
    );
    // The trimmed range reads as zeroes, the rest as written.
    let zeroes = qemu_io(&uri, "read -P 0 64M 80M");
    assert!(qemu_io_ok(&zeroes), "{}", text(&zeroes));
    let kept = qemu_io(&uri, "read -P 0x61 144M 16M");
    assert!(qemu_io_ok(&kept), "{}", text(&kept));

    // The space is reusable: more than the disk holds goes through once trimmed space is cleaned.
    for round in 0..4u64 {
        let written = qemu_io(&uri, &format!("write -P {:#x} 256M 300M", 0x70 + round));
        assert!(written.status.success(), "round {round}: {}", text(&written));
        let trimmed = qemu_io(&uri, "discard 256M 300M");
        assert!(trimmed.status.success(), "round {round}: {}", text(&trimmed));
    }
    assert_eq!(node.inspect("thin")["used_bytes"], 16u64 << 20);

    // Freed segments reach the device as discards: the loop device (or the
    // plain file) gets them punched out of its backing file, whose
    // allocation falls back to about the live data once the idle store's
    // checkpoints have freed the dead segments.
    let status = node.cli_ok(&["node", "status"]);
    assert!(status.contains("discard on"), "{status}");
    let backing = node.dir.path().join("disk0.img");
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&backing).unwrap().blocks() * 512
    };
    let peak = allocated();
    assert!(
        peak >= 256 << 20,
        "1.3 GiB went through a 512 MiB disk: {peak} bytes allocated"
    );
    wait_until("trimmed and cleaned segments discarded", || allocated() <= 128 << 20);
    // A deleted volume's space goes back to the device too.
    node.create_volume("gone", "1GiB");
    let written = qemu_io(&node.uri("gone"), "write -P 0x33 0 160M");
    assert!(written.status.success(), "{}", text(&written));
    let with_gone = allocated();
    assert!(with_gone >= 160 << 20, "{with_gone}");
    node.cli_ok(&["volume", "delete", "gone"]);
    wait_until("a deleted volume's segments discarded", || allocated() <= 128 << 20);
    let metrics = ureq::get(&format!("{}/metrics", node.api_url()))
        .set("authorization", &format!("Bearer {}", node.token()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("ballast_disk_discarded_bytes_total{") && !line.ends_with(" 0")),
        "{metrics}"
    );
    // What was kept is intact.
    let kept = qemu_io(&uri, "read -P 0x61 144M 16M");
    assert!(qemu_io_ok(&kept), "{}", text(&kept));
}

#[test]
fn a_volume_exports_to_raw_and_qcow2_and_imports_back_byte_for_byte() {
    let test = "a_volume_exports_to_raw_and_qcow2";
    if !have_tool(test, "qemu-io") || !have_tool(test, "qemu-img") {
        return;
    }
    let node = TestNode::start(test, 512 << 20);
    node.create_volume("src", "64MiB");
    let uri = node.uri("src");
    for (fill, offset) in [(0x11, "0"), (0x22, "10M"), (0x33, "63M")] {
        let written = qemu_io(&uri, &format!("write -P {fill:#x} {offset} 1M"));
        assert!(written.status.success(), "{}", text(&written));
    }
    let dir = common::scratch();
    let raw = dir.path().join("src.raw");
    let qcow2 = dir.path().join("src.qcow2");
    node.cli_ok(&["volume", "export", "src", raw.to_str().unwrap()]);
    node.cli_ok(&["volume", "export", "src", qcow2.to_str().unwrap(), "--format", "qcow2"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 64 << 20);
    let refused = node.cli(&["volume", "export", "src", raw.to_str().unwrap()]);
    assert!(
        !refused.status.success() && text(&refused).contains("exists"),
        "{}",
        text(&refused)
    );
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .args([&raw, &qcow2])
        .output()
        .unwrap();
    assert!(same.status.success(), "{}", text(&same));
    let qcow2_bytes = std::fs::metadata(&qcow2).unwrap().len();
    assert!(
        qcow2_bytes < 8 << 20,
        "qcow2 holds only the written data: {qcow2_bytes}"
    );

    // Back in as a new volume (made to the image's size, holes left unallocated).
    node.cli_ok(&["volume", "import", qcow2.to_str().unwrap(), "copy"]);
    let info = node.inspect("copy");
    assert_eq!(info["size_bytes"], 64u64 << 20);
    assert_eq!(info["used_bytes"], 3u64 << 20, "thin: only the written megabytes");
    for (fill, offset) in [(0x11, "0"), (0x22, "10M"), (0x33, "63M")] {
        let read = qemu_io(&node.uri("copy"), &format!("read -P {fill:#x} {offset} 1M"));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
    let zero = qemu_io(&node.uri("copy"), "read -P 0 20M 1M");
    assert!(qemu_io_ok(&zero), "{}", text(&zero));
    // Into an existing volume too small for the image: refused, saying so.
    node.create_volume("small", "16MiB");
    let refused = node.cli(&["volume", "import", raw.to_str().unwrap(), "small"]);
    assert!(
        !refused.status.success() && text(&refused).contains("smaller than the image"),
        "{}",
        text(&refused)
    );
}

#[test]
fn a_disk_enrolled_into_a_running_node_takes_new_volumes_at_once_and_stays_after_a_restart() {
    let test = "a_disk_enrolled_into_a_running_node";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut node = TestNode::start(test, 128 << 20);
    let dir = common::scratch();
    let Some(extra) = common::loop_device(test, dir.path(), 512 << 20) else {
        return;
    };
    node.create_volume("a", "96MiB");
    let written = qemu_io(&node.uri("a"), "write -P 0x51 0 48M");
    assert!(written.status.success(), "{}", text(&written));
    let capacity = |node: &TestNode| -> (usize, u64) {
        let disks = node.disks();
        (
            disks.len(),
            disks.iter().map(|d| d["capacity_bytes"].as_u64().unwrap()).sum(),
        )
    };
    let (count, before) = capacity(&node);
    assert_eq!(count, 1);

    // The node runs: `disk enroll` asks it to enroll the device itself.
    let enrolled = node.cli_ok(&[
        "disk",
        "enroll",
        "--data-dir",
        node.data_dir.to_str().unwrap(),
        "--api",
        &node.api_url(),
        extra.path().to_str().unwrap(),
    ]);
    assert!(enrolled.contains("into the running node"), "{enrolled}");
    let (count, after) = capacity(&node);
    assert_eq!(count, 2);
    assert!(after > before + (300 << 20), "{before} -> {after}");
    let again = node.cli(&[
        "disk",
        "enroll",
        "--data-dir",
        node.data_dir.to_str().unwrap(),
        "--api",
        &node.api_url(),
        extra.path().to_str().unwrap(),
    ]);
    assert!(
        !again.status.success(),
        "a disk already enrolled is refused: {}",
        text(&again)
    );

    // A new volume goes to the new disk: more than the first disk could hold.
    node.create_volume("b", "256MiB");
    assert_eq!(node.inspect("b")["disk_path"], extra.path().to_str().unwrap());
    let written = qemu_io(&node.uri("b"), "write -P 0x52 0 200M");
    assert!(written.status.success(), "{}", text(&written));

    node.stop();
    node.restart();
    assert_eq!(capacity(&node).0, 2, "the enrolled disk is in the data directory");
    for (volume, fill, len) in [("a", 0x51, "48M"), ("b", 0x52, "200M")] {
        let read = qemu_io(&node.uri(volume), &format!("read -P {fill:#x} 0 {len}"));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
}

#[test]
fn a_volume_shrinks_only_when_allowed_and_the_discarded_tail_reads_zeroes_on_every_replica_after_a_grow() {
    let test = "a_volume_shrinks_only_when_allowed";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 2, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "s", "--size", "32MiB", "--repl", "2"]);
    let uri = cluster.nodes[0].uri("s");
    for (fill, offset) in [(0x71, "0"), (0x72, "24M")] {
        let written = qemu_io(&uri, &format!("write -P {fill:#x} {offset} 8M"));
        assert!(written.status.success(), "{}", text(&written));
    }
    let refused = cluster.nodes[1].cli(&["volume", "resize", "s", "--size", "16MiB"]);
    assert!(
        !refused.status.success() && text(&refused).contains("--allow-shrink"),
        "{}",
        text(&refused)
    );
    // Asked through the replica: the coordinator decides (forwarded).
    cluster.nodes[1].cli_ok(&["volume", "resize", "s", "--size", "16MiB", "--allow-shrink"]);
    for node in &cluster.nodes {
        wait_until("both copies shrunk", || {
            node.inspect("s")["size_bytes"] == 16u64 << 20 && node.inspect("s")["used_bytes"] == 8u64 << 20
        });
    }
    let past_end = qemu_io(&uri, "read 20M 4k");
    assert!(
        !past_end.status.success() || text(&past_end).contains("failed"),
        "{}",
        text(&past_end)
    );
    cluster.nodes[0].cli_ok(&["volume", "resize", "s", "--size", "32MiB"]);
    wait_until("grown on both", || {
        cluster
            .nodes
            .iter()
            .all(|node| node.inspect("s")["size_bytes"] == 32u64 << 20)
    });
    for index in [0, 1] {
        if index == 1 {
            cluster.nodes[1].cli_ok(&["volume", "attach", "s", "--force"]);
        }
        let uri = cluster.nodes[index].uri("s");
        let kept = qemu_io(&uri, "read -P 0x71 0 8M");
        assert!(qemu_io_ok(&kept), "node {index}: {}", text(&kept));
        let gone = qemu_io(&uri, "read -P 0 24M 8M");
        assert!(qemu_io_ok(&gone), "node {index}: {}", text(&gone));
    }
}

#[test]
fn disk_remove_moves_volumes_and_snapshots_off_a_disk_while_a_client_writes() {
    let test = "disk_remove_moves_volumes_and_snapshots";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut node = TestNode::start_with_disks(test, &[512 << 20, 512 << 20]);
    node.create_volume("a", "64MiB");
    let uri = node.uri("a");
    let written = qemu_io(&uri, "write -P 0x5a 0 24M");
    assert!(written.status.success(), "{}", text(&written));
    node.cli_ok(&["snapshot", "create", "a", "s"]);
    let overwritten = qemu_io(&uri, "write -P 0x5b 0 4M");
    assert!(overwritten.status.success(), "{}", text(&overwritten));
    let source = node.inspect("a")["disk_uuid"].as_str().unwrap().to_owned();
    let source_path = node.disks().iter().find(|d| d["disk_uuid"] == source.as_str()).unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned();

    // A client keeps writing 4 KiB blocks, each acknowledged before the
    // next, while the drain runs; every one must read back after it.
    let address = uri.trim_start_matches("nbd://").trim_end_matches("/a").to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut client =
                common::nbd::NbdClient::connect(&address, "a", std::time::Duration::from_secs(20)).unwrap();
            let started = std::time::Instant::now();
            let mut acked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire)
                && started.elapsed() < std::time::Duration::from_secs(60)
            {
                let block = 8192 + acked % 2048; // 32 MiB..40 MiB
                let fill = u8::try_from(acked % 200 + 1).unwrap();
                let (error, _) = client
                    .request(node::nbd::proto::CMD_WRITE, block * 4096, 4096, &[fill; 4096])
                    .unwrap();
                assert_eq!(error, 0);
                acked += 1;
            }
            acked
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let removed = node.cli_ok(&["disk", "remove", &source_path]);
    assert!(removed.contains(&format!("disk {source_path} removed")), "{removed}");
    stop.store(true, std::sync::atomic::Ordering::Release);
    let acked = writer.join().unwrap();
    assert!(acked > 0);

    let target = node.inspect("a")["disk_uuid"].as_str().unwrap().to_owned();
    assert_ne!(target, source, "the volume moved");
    let disks = node.disks();
    let drained = disks.iter().find(|d| d["disk_uuid"] == source.as_str()).unwrap();
    assert_eq!(drained["state"], "removed", "{disks:?}");
    assert_eq!(drained["used_bytes"], 0, "{disks:?}");
    let check = |node: &TestNode| {
        for (command, what) in [
            ("read -P 0x5b 0 4M", "the overwritten start"),
            ("read -P 0x5a 4M 20M", "the rest of the first write"),
            ("read -P 0 24M 8M", "a hole"),
        ] {
            let read = qemu_io(&node.uri("a"), command);
            assert!(qemu_io_ok(&read), "{what}: {}", text(&read));
        }
        // The last write to each block of the writer's range holds.
        let blocks = acked.min(2048);
        for index in 0..blocks {
            let last = acked - 1 - (acked - 1 - index) % 2048;
            let block = 8192 + last % 2048;
            let fill = last % 200 + 1;
            let read = qemu_io(&node.uri("a"), &format!("read -P {fill} {} 4096", block * 4096));
            assert!(qemu_io_ok(&read), "block {block}: {}", text(&read));
        }
        let snapshot = qemu_io_read_only(&node.uri("a@s"), "read -P 0x5a 0 24M");
        assert!(qemu_io_ok(&snapshot), "the snapshot moved too: {}", text(&snapshot));
    };
    check(&node);
    // A restart opens only the remaining disk, and everything is there.
    node.stop();
    node.restart();
    assert_eq!(node.disks().len(), 1, "the removed disk is not opened again");
    check(&node);
    let only = node.cli(&["disk", "remove", &target]);
    assert!(
        !only.status.success() && text(&only).contains("only disk"),
        "{}",
        text(&only)
    );
}
