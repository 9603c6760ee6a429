//! Scrub on real processes: bit rot planted in the disk files of a replica
//! and of the coordinator is found by `ballast scrub start --wait`, both
//! copies are rewritten from a good one (a second pass finds nothing, the
//! metrics count it); a replica whose copy took a write the others never
//! saw is made to agree with the coordinator, checked by reading through
//! that replica after it takes the volume over.

mod common;

use common::cluster::TestCluster;
use common::{have_tool, qemu_io, qemu_io_ok, text};

/// `scrub start VOLUME --wait` on node 0; its table row for the volume as
/// (checksum errors, diverged, repaired, unrepairable).
fn scrub(cluster: &TestCluster, volume: &str) -> (u64, u64, u64, u64) {
    let out = cluster.nodes[0].cli_ok(&["scrub", "start", volume, "--wait", "--timeout", "120"]);
    let row = out
        .lines()
        .find(|line| line.split_whitespace().next() == Some(volume))
        .unwrap_or_else(|| panic!("no row for {volume}: {out}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1], "done", "{out}");
    assert_eq!(fields[2], "verify", "{out}");
    let number = |at: usize| fields[at].parse::<u64>().unwrap_or_else(|_| panic!("{out}"));
    (number(4), number(5), number(6), number(7))
}

fn metric(cluster: &TestCluster, index: usize, name: &str) -> u64 {
    let url = format!("{}/metrics", cluster.nodes[index].api_url());
    let body = ureq::get(&url)
        .set("authorization", &format!("Bearer {}", cluster.nodes[index].token()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| {
            panic!(
                "{name} not in the metrics: {}",
                body.lines()
                    .filter(|l| l.contains("scrub"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn scrub_finds_bit_rot_on_a_replica_and_the_coordinator_and_rewrites_both_from_a_good_copy() {
    let test = "scrub_finds_bit_rot";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "rot", "--size", "16MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("rot");
    for (fill, offset) in [(0x5a, 65536), (0x6b, 131072), (0x7c, 1 << 20)] {
        let written = qemu_io(&uri, &format!("write -P {fill:#x} {offset} 4096"));
        assert!(written.status.success(), "{}", text(&written));
    }
    assert_eq!(scrub(&cluster, "rot"), (0, 0, 0, 0), "a clean volume");

    // Rot behind the stores' backs: one block on replica node 1, another on the coordinator.
    let disk = |index: usize| cluster.nodes[index].dir.path().join("disk0.img");
    assert!(common::corrupt_block_filled_with(&disk(1), 0x5a));
    assert!(common::corrupt_block_filled_with(&disk(0), 0x6b));
    let (checksum, diverged, repaired, unrepairable) = scrub(&cluster, "rot");
    assert_eq!(
        (checksum, unrepairable),
        (2, 0),
        "both bad blocks found, both repairable"
    );
    assert_eq!(diverged, 0, "bad blocks are not divergence");
    assert_eq!(repaired, 2);
    // `ballast status` on any node shows what the coordinator's last pass found (from its report).
    common::cluster::wait_until("status shows the scrub's findings", || {
        cluster.nodes[2]
            .cli_ok(&["status"])
            .contains("scrub: 2 bad, 0 diverged, 2 repaired, 0 unrepairable")
    });
    assert_eq!(scrub(&cluster, "rot"), (0, 0, 0, 0), "both copies were rewritten");
    assert_eq!(metric(&cluster, 0, "ballast_scrub_checksum_errors_total"), 2);
    assert_eq!(metric(&cluster, 0, "ballast_scrub_repaired_blocks_total"), 2);
    assert!(metric(&cluster, 0, "ballast_scrub_verified_bytes_total") >= 3 * 3 * 4096);

    // What clients read is what they wrote, through every node's copy.
    for (fill, offset) in [(0x5a, 65536), (0x6b, 131072), (0x7c, 1 << 20)] {
        let read = qemu_io(&uri, &format!("read -P {fill:#x} {offset} 4096"));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
    assert!(
        !cluster.nodes[0].log_text().contains("local read failed"),
        "the scrub repaired the coordinator's copy before any read needed it"
    );
    cluster.nodes[1].cli_ok(&["volume", "attach", "rot", "--force"]);
    let uri = cluster.nodes[1].uri("rot");
    let read = qemu_io(&uri, "read -P 0x5a 65536 4096");
    assert!(qemu_io_ok(&read), "{}", text(&read));
    assert!(!cluster.nodes[1].log_text().contains("local read failed"));
}

#[test]
fn scrub_makes_a_replica_that_took_a_stray_write_agree_with_the_coordinator() {
    let test = "scrub_makes_a_replica_agree";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "div", "--size", "16MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("div");
    let written = qemu_io(&uri, "write -P 0x11 0 256k");
    assert!(written.status.success(), "{}", text(&written));
    let volume_id = cluster.nodes[0].inspect("div")["id"].as_u64().unwrap();

    // Node 2's copy takes writes nobody else saw (as a coordinator killed
    // mid-write can leave behind), written straight into its store while
    // it is stopped; the volume is not written meanwhile, so it stays in sync.
    cluster.nodes[2].stop();
    let ack_log = cluster.nodes[2].dir.path().join("stray.log");
    let stray = common::run(&[
        "debug",
        "write-load",
        "--data-dir",
        cluster.nodes[2].data_dir.to_str().unwrap(),
        "--ack-log",
        ack_log.to_str().unwrap(),
        "--volume",
        &volume_id.to_string(),
        "--blocks",
        "64",
        "--queue-depth",
        "4",
        "--seconds",
        "1",
    ]);
    assert!(stray.status.success(), "{}", text(&stray));
    cluster.nodes[2].restart();
    let node2 = cluster.nodes[2].node_id();
    cluster.wait_for("node 2 up and still in sync", |status| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|node| node["id"] == node2 && node["up"] == true)
            && status["volumes"][0]["in_sync"]
                .as_array()
                .unwrap()
                .iter()
                .any(|id| *id == node2)
    });

    let (checksum, diverged, repaired, unrepairable) = scrub(&cluster, "div");
    assert_eq!((checksum, unrepairable), (0, 0));
    assert!(diverged > 0 && diverged <= 64, "the stray blocks differ: {diverged}");
    assert_eq!(repaired, diverged);
    assert_eq!(scrub(&cluster, "div"), (0, 0, 0, 0), "every copy agrees now");
    assert!(metric(&cluster, 0, "ballast_scrub_divergent_blocks_total") >= diverged);

    // Served from node 2's copy, the volume holds what the client wrote.
    cluster.nodes[2].cli_ok(&["volume", "attach", "div", "--force"]);
    let read = qemu_io(&cluster.nodes[2].uri("div"), "read -P 0x11 0 256k");
    assert!(qemu_io_ok(&read), "{}", text(&read));
}

#[test]
fn a_resync_that_meets_a_rotten_block_repairs_it_from_another_replica_and_finishes() {
    let test = "a_resync_that_meets_a_rotten_block";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "rs", "--size", "16MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("rs");
    // Node 2 misses these writes; its resync copies them from node 0, whose copy of one rotted.
    cluster.nodes[2].kill9();
    let written = qemu_io(&uri, "write -P 0x3c 0 1M");
    assert!(written.status.success(), "{}", text(&written));
    let disk = cluster.nodes[0].dir.path().join("disk0.img");
    assert!(common::corrupt_block_filled_with(&disk, 0x3c));
    cluster.nodes[2].restart();
    let node2 = cluster.nodes[2].node_id();
    // Seen from node 0: node 2's own view may be the one from before it was dropped.
    cluster.wait_for_on(&[0], "node 2 resynced and in sync", |status| {
        status["volumes"][0]["in_sync"]
            .as_array()
            .is_some_and(|ids| ids.len() == 3 && ids.iter().any(|id| *id == node2))
    });
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("repaired from a replica"),
        "{}",
        log.lines()
            .filter(|l| !l.contains(" INFO ") || l.contains("resync"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(scrub(&cluster, "rs"), (0, 0, 0, 0), "every copy holds the data");
    cluster.nodes[2].cli_ok(&["volume", "attach", "rs", "--force"]);
    let read = qemu_io(&cluster.nodes[2].uri("rs"), "read -P 0x3c 0 1M");
    assert!(qemu_io_ok(&read), "{}", text(&read));
}
