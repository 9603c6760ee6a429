//! A failing disk under a live volume, on real processes: each node runs
//! with the test-only fault layer (`--inject-faults PLAN`, kernel-iface
//! `faults`). The coordinator's disk starts failing every I/O with EIO:
//! a read it cannot rewrite from a replica fails (never shown from the
//! replica alone), the leader moves the volume to an in-sync replica at once, clients go
//! on there, and nothing acknowledged is lost. A replica's disk failing is
//! dropped from the in-sync set while writes go on. A failed node
//! restarted with a working disk is resynced and serves the same bytes.

mod common;

use std::path::PathBuf;

use common::cluster::{wait_until, TestCluster};
use common::{have_tool, qemu_io, qemu_io_ok, text};

/// A 3-node cluster whose nodes read their fault plans from the returned files.
fn cluster_with_plans(test: &str) -> (TestCluster, Vec<PathBuf>, tempfile::TempDir) {
    let dir = common::scratch();
    let plans: Vec<PathBuf> = (0..3).map(|index| dir.path().join(format!("plan-{index}"))).collect();
    let flags: Vec<Vec<&str>> = plans
        .iter()
        .map(|plan| vec!["--inject-faults", plan.to_str().unwrap()])
        .collect();
    let flags: Vec<&[&str]> = flags.iter().map(Vec::as_slice).collect();
    (TestCluster::start(test, 3, &flags), plans, dir)
}

fn coordinator(cluster: &TestCluster, observer: usize, volume: &str) -> u64 {
    cluster.nodes[observer].inspect(volume)["coordinator"].as_u64().unwrap()
}

#[test]
fn a_coordinator_whose_disk_fails_hands_the_volume_to_a_replica_and_loses_nothing() {
    let test = "a_coordinator_whose_disk_fails";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let (mut cluster, plans, _dir) = cluster_with_plans(test);
    cluster.nodes[0].cli_ok(&["volume", "create", "d", "--size", "16MiB", "--repl", "3"]);
    assert_eq!(coordinator(&cluster, 0, "d"), cluster.nodes[0].node_id());
    let written = qemu_io(&cluster.nodes[0].uri("d"), "write -P 0x21 0 1M");
    assert!(qemu_io_ok(&written), "{}", text(&written));

    std::fs::write(&plans[0], "any 0\n").unwrap();
    // The first read that meets the failing disk finds the blocks on a
    // replica, but the coordinator cannot rewrite its own copy: the read
    // fails rather than show bytes the coordinator's copy may lack (a
    // restart would take them back).
    let mut reads = 0;
    loop {
        reads += 1;
        assert!(reads <= 200, "no read met the failing disk in 200 tries");
        let read = qemu_io(&cluster.nodes[0].uri("d"), "read -P 0x21 0 64k");
        if cluster.nodes[0].log_text().contains("local read failed") {
            assert!(
                !qemu_io_ok(&read),
                "a read the coordinator could not rewrite locally was answered from a replica: {}",
                text(&read)
            );
            break;
        }
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
    assert!(cluster.nodes[0]
        .log_text()
        .contains("a replica has the blocks but the local rewrite failed; the read fails"));
    // The next write fails on the coordinator's disk (not acknowledged) and stops its store.
    wait_until("the coordinator's store fails", || {
        !qemu_io_ok(&qemu_io(&cluster.nodes[0].uri("d"), "write -P 0x22 1M 64k"))
    });
    let old = cluster.nodes[0].node_id();
    wait_until("the volume served by another node", || {
        let now = coordinator(&cluster, 1, "d");
        now != old && now != 0
    });
    let heir = cluster.index_of(coordinator(&cluster, 1, "d"));
    assert!(
        cluster
            .nodes
            .iter()
            .any(|node| node.log_text().contains("the coordinator's disk failed; failing over")),
        "the leader says why it failed over"
    );
    let uri = cluster.nodes[heir].uri("d");
    // The heir serves once its replicas are fenced and the old node said it serves no more.
    wait_until("the heir serves the volume", || {
        qemu_io_ok(&qemu_io(&uri, "write -P 0x23 2M 1M"))
    });
    for (fill, offset) in [(0x21, 0), (0x23, 2 << 20)] {
        let read = qemu_io(&uri, &format!("read -P {fill:#x} {offset} 1M"));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }

    // The disk works again after a restart (a replaced disk): resynced, it serves the same bytes.
    std::fs::write(&plans[0], "").unwrap();
    cluster.nodes[0].kill9();
    cluster.nodes[0].restart();
    // Seen from the new coordinator: node 0's own view may be the one from before it failed.
    cluster.wait_for_on(&[heir], "node 0 back in sync", |status| {
        status["volumes"][0]["in_sync"]
            .as_array()
            .is_some_and(|ids| ids.len() == 3)
    });
    cluster.nodes[0].cli_ok(&["volume", "attach", "d", "--force"]);
    let uri = cluster.nodes[0].uri("d");
    for (fill, offset) in [(0x21, 0), (0x23, 2 << 20)] {
        let read = qemu_io(&uri, &format!("read -P {fill:#x} {offset} 1M"));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
}

#[test]
fn a_replica_whose_disk_fails_leaves_the_in_sync_set_and_writes_go_on() {
    let test = "a_replica_whose_disk_fails";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let (cluster, plans, _dir) = cluster_with_plans(test);
    cluster.nodes[0].cli_ok(&["volume", "create", "r", "--size", "16MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("r");
    std::fs::write(&plans[2], "write 0\n").unwrap();
    let failing = cluster.nodes[2].node_id();
    let in_sync = || -> Vec<u64> {
        cluster.nodes[0].inspect("r")["in_sync"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect()
    };
    // Writes are acknowledged all along (the node reads its plan within
    // 100 ms): the failing replica is dropped, not waited for.
    let mut round = 0u64;
    common::cluster::wait_until("the failing replica out of the in-sync set", || {
        let written = qemu_io(
            &uri,
            &format!("write -P {:#x} {} 64k", 0x40 + round % 8, (round % 8) << 16),
        );
        assert!(qemu_io_ok(&written), "round {round}: {}", text(&written));
        round += 1;
        !in_sync().contains(&failing)
    });
    assert_eq!(in_sync().len(), 2);
    for round in 0..8u64 {
        let written = qemu_io(&uri, &format!("write -P {:#x} {} 64k", 0x40 + round, round << 16));
        assert!(qemu_io_ok(&written), "round {round}: {}", text(&written));
    }
    for round in 0..8u64 {
        let read = qemu_io(&uri, &format!("read -P {:#x} {} 64k", 0x40 + round, round << 16));
        assert!(qemu_io_ok(&read), "{}", text(&read));
    }
    cluster.wait_for("cluster status shows the failed disk", |status| {
        status["nodes"].as_array().unwrap().iter().any(|node| {
            node["id"] == failing
                && node["disks"]
                    .as_array()
                    .is_some_and(|disks| disks.iter().any(|d| d["failed"] == true))
        })
    });
}
