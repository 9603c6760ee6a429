//! Synchronous replication on real processes: fio writes with checksums to
//! a repl=3 volume, a replica is killed mid-write (dropped from the in-sync
//! set, writes go on; it returns out of sync), then the coordinator is
//! killed under 32 writes in flight on one connection (the checked load of
//! `node::load_check`, which logs every acknowledgement) and the other
//! in-sync replica takes over (`volume attach`): fio's verify and the
//! checked load's both pass there. Returning replicas are resynced under live
//! writes and rejoin the in-sync set. A stale
//! coordinator's writes are refused by the replicas (epoch fencing).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{wait_until, TestCluster, CONVERGE_TIMEOUT};
use common::firewall::Firewall;
use common::nbd::NbdClient;
use common::node::{run_with_timeout, wait_exit_within, TestNode};
use common::{have_tool, record_skip, text};
use node::load_check::{self, WriteLoad};
use node::nbd::client::ExportUri;
use node::nbd::proto;

const FIO_TIMEOUT: Duration = Duration::from_secs(300);

fn ids(value: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

fn fio(uri: &str, dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut command = Command::new("fio");
    command
        .args([
            "--name=repl",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--output-format=json",
        ])
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=48M",
            "--verify=crc32c",
            "--randrepeat=1",
        ])
        .args(extra)
        .current_dir(dir);
    command
}

fn fio_error(output: &std::process::Output) -> i64 {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no fio JSON: {}", text(output)));
    let json: serde_json::Value = serde_json::from_str(&stdout[start..]).unwrap();
    json["jobs"][0]["error"].as_i64().unwrap()
}

#[test]
fn a_repl3_volume_loses_a_replica_then_its_coordinator_and_every_acknowledged_write_reads_back() {
    let test = "a_repl3_volume_loses_a_replica_then_its_coordinator";
    if !have_tool(test, "fio") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "db", "--size", "64MiB", "--repl", "3"]);
    let all: Vec<u64> = {
        let mut all: Vec<u64> = cluster.nodes.iter().map(TestNode::node_id).collect();
        all.sort_unstable();
        all
    };
    assert_eq!(ids(&cluster.nodes[1].inspect("db")["in_sync"]), all);
    let scratch = tempfile::tempdir().unwrap();

    // Writes while node 2 (a replica) dies: fio sees no error.
    let uri = cluster.nodes[0].uri("db");
    let mut writer = fio(&uri, scratch.path(), &["--do_verify=0", "--offset=16M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while cluster.nodes[0].inspect("db")["used_bytes"].as_u64().unwrap() < 8 << 20 {
        assert!(started.elapsed() < FIO_TIMEOUT, "fio wrote too little");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.nodes[2].kill9();
    let status = wait_exit_within(&mut writer, FIO_TIMEOUT, "fio did not finish");
    let output = writer.wait_with_output().unwrap();
    assert!(status.success(), "fio failed after a replica died: {}", text(&output));
    assert_eq!(fio_error(&output), 0);
    let info = cluster.nodes[0].inspect("db");
    let survivors: Vec<u64> = {
        let mut ids = vec![cluster.nodes[0].node_id(), cluster.nodes[1].node_id()];
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids(&info["in_sync"]), survivors, "{info:#}");
    assert!(info["epoch"].as_u64().unwrap() >= 2, "{info:#}");

    // Node 2 returns (it votes in Raft again; the coordinator starts resyncing it).
    cluster.nodes[2].restart();

    // The coordinator dies under 32 writes in flight on one connection
    // (blocks 0..4096, below fio's); node 1 (in sync) takes over with a higher epoch.
    let old_epoch = info["epoch"].as_u64().unwrap();
    let ack_log = scratch.path().join("ack.log");
    let load = WriteLoad {
        uri: ExportUri::parse(&uri).unwrap(),
        ack_log: ack_log.clone(),
        duration: Duration::from_secs(60),
        queue_depth: 32,
        blocks: Some(4096),
        seed: 7,
        reconnect_within: None,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let load_writer = runtime.spawn(async move { load_check::write_load(&load).await });
    let used = cluster.nodes[0].inspect("db")["used_bytes"].as_u64().unwrap();
    let started = Instant::now();
    while cluster.nodes[0].inspect("db")["used_bytes"].as_u64().unwrap() < used + (4 << 20) {
        assert!(started.elapsed() < FIO_TIMEOUT, "the checked load wrote too little");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.nodes[0].kill9();
    let written = runtime.block_on(load_writer).unwrap().unwrap();
    assert!(matches!(written.ended, load_check::Ended::Cut(_)), "{written}");
    assert!(written.acknowledged > 0, "{written}");
    let started = Instant::now();
    let attached = loop {
        let output = cluster.nodes[1].cli(&["volume", "attach", "db", "--force", "--json"]);
        if output.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap();
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "attach kept failing: {}",
            text(&output)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(attached["coordinator"].as_u64().unwrap(), cluster.nodes[1].node_id());
    assert!(attached["epoch"].as_u64().unwrap() > old_epoch);
    // The old coordinator may hold writes it never acknowledged: it is out of sync now.
    let in_sync = ids(&attached["in_sync"]);
    assert!(
        in_sync.contains(&cluster.nodes[1].node_id()) && !in_sync.contains(&cluster.nodes[0].node_id()),
        "{in_sync:?}"
    );

    // Every write fio saw acknowledged on node 0 reads back from node 1.
    let verify = run_with_timeout(
        &mut fio(
            &cluster.nodes[1].uri("db"),
            scratch.path(),
            &["--verify_only", "--verify_fatal=1", "--offset=16M"],
        ),
        FIO_TIMEOUT,
    );
    assert!(
        verify.status.success(),
        "verify on the new coordinator failed: {}",
        text(&verify)
    );
    assert_eq!(fio_error(&verify), 0);
    let new_uri = ExportUri::parse(&cluster.nodes[1].uri("db")).unwrap();
    let checked = runtime
        .block_on(load_check::verify_load(&new_uri, &ack_log, 32))
        .unwrap();
    assert!(checked.passed(), "{checked}");
    assert_eq!(checked.acknowledgements, written.acknowledged, "{checked}");

    // The checker is not blind: a block whose write was acknowledged, zeroed, is reported lost.
    let book = node::load_check::book::decode(&std::fs::read(&ack_log).unwrap()).unwrap();
    let (&zeroed, _) = book
        .histories
        .iter()
        .find(|(_, history)| history.acknowledged > 0)
        .unwrap();
    let mut client = NbdClient::connect(&new_uri.address, "db", Duration::from_secs(10)).unwrap();
    let (error, _) = client
        .request(proto::CMD_WRITE_ZEROES, zeroed * 4096, 4096, &[])
        .unwrap();
    assert_eq!(error, 0);
    let checked = runtime
        .block_on(load_check::verify_load(&new_uri, &ack_log, 32))
        .unwrap();
    assert_eq!(checked.lost.len(), 1, "{checked}");
    assert!(
        checked.lost[0].starts_with(&format!("block {zeroed}: zeroes")),
        "{checked}"
    );

    // The old coordinator comes back: it no longer serves the volume.
    cluster.nodes[0].restart();
    wait_until("the old coordinator learns of the failover", || {
        cluster.nodes[0].inspect("db")["coordinator"].as_u64().unwrap() == cluster.nodes[1].node_id()
    });
    if have_tool(test, "nbdinfo") {
        let started = Instant::now();
        loop {
            let old = Command::new("nbdinfo")
                .arg(cluster.nodes[0].uri("db"))
                .output()
                .unwrap();
            if !old.status.success() {
                break;
            }
            assert!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "the old coordinator still serves the volume"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_replica_refuses_writes_with_a_stale_epoch() {
    let test = "a_replica_refuses_writes_with_a_stale_epoch";
    let cluster = TestCluster::start(test, 2, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "f", "--size", "16MiB", "--repl", "2"]);
    let info = cluster.nodes[0].inspect("f");
    let volume_id = info["id"].as_u64().unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&cluster.nodes[0].cli_ok(&["cluster", "status", "--json"])).unwrap();
    let cluster_id: uuid::Uuid = status["cluster_id"].as_str().unwrap().parse().unwrap();
    // Fail the volume over to node 1 (epoch 2); node 0, the old coordinator, then acts on epoch 1.
    cluster.nodes[1].cli_ok(&["volume", "attach", "f", "--force"]);
    let epoch = cluster.nodes[1].inspect("f")["epoch"].as_u64().unwrap();
    assert!(epoch >= 2);
    wait_until("node 0 learns the new epoch", || {
        cluster.nodes[0].inspect("f")["epoch"].as_u64().unwrap() >= epoch
    });
    let op = node::replication::wire::ReplicaOp {
        volume_id,
        epoch: 1,
        lba: 0,
        block_count: 1,
        volume_sequence: 1,
        kind: node::replication::wire::OpKind::Write(vec![0xAB; 4096].into()),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let address = cluster.nodes[0].peer_address();
    let identity: std::sync::Arc<dyn Fn() -> (Option<uuid::Uuid>, u64) + Send + Sync> =
        std::sync::Arc::new(move || (Some(cluster_id), 7));
    // A member's certificate (node 1's): the epoch, not TLS, must refuse it.
    let tls = std::sync::Arc::new(node::peer::tls::PeerTls::default());
    tls.install(&node::peer::tls::read_bundle(cluster.nodes[1].data()).unwrap().unwrap())
        .unwrap();
    let client = node::peer::client::PeerClient::new(identity, None, tls);
    let reply = runtime.block_on(client.call(
        &address,
        node::peer::frame::FrameKind::ReplicaWrite,
        &node::replication::wire::encode(&op),
        Duration::from_secs(10),
    ));
    let error = reply.expect_err("a stale epoch must be refused").to_string();
    // Refused for its epoch (or, if node 0's reconciler has not yet stopped serving, as a write to a coordinator).
    assert!(
        error.contains("stale epoch") || error.contains("takes no replica writes"),
        "{error}"
    );
    // Nothing of it reached the data: the block still reads as zeroes on the coordinator.
    if have_tool(test, "qemu-io") {
        let output = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0 0 4096", &cluster.nodes[1].uri("f")])
            .output()
            .unwrap();
        assert!(
            output.status.success() && !text(&output).contains("failed"),
            "{}",
            text(&output)
        );
    }
}

/// Runs a size-based fio write job to completion; asserts it saw no error.
fn fio_write_ok(uri: &str, dir: &std::path::Path, offset: &str) {
    let output = run_with_timeout(
        &mut fio(uri, dir, &["--do_verify=0", &format!("--offset={offset}"), "--size=8M"]),
        FIO_TIMEOUT,
    );
    assert!(output.status.success(), "fio write failed: {}", text(&output));
    assert_eq!(fio_error(&output), 0, "{}", text(&output));
}

/// Verifies the 8 MiB a `fio_write_ok` at `offset` wrote; asserts fio saw no error.
fn fio_verify_ok(uri: &str, dir: &std::path::Path, offset: &str) {
    let verify = run_with_timeout(
        &mut fio(
            uri,
            dir,
            &[
                "--verify_only",
                "--verify_fatal=1",
                &format!("--offset={offset}"),
                "--size=8M",
            ],
        ),
        FIO_TIMEOUT,
    );
    assert!(
        verify.status.success(),
        "verify at {offset} on {uri}: {}",
        text(&verify)
    );
    assert_eq!(fio_error(&verify), 0);
}

#[test]
fn a_paused_replica_and_a_partitioned_replica_are_dropped_and_writes_go_on() {
    let test = "a_paused_replica_and_a_partitioned_replica_are_dropped";
    if !have_tool(test, "fio") {
        return;
    }
    let Some(firewall) = Firewall::new() else {
        record_skip(
            test,
            "iptables is not usable here (needs root and the iptables package)",
        );
        return;
    };
    // A short replica_timeout_ms: the pause below outlasts it quickly.
    let quick: &[&str] = &["--replica-timeout-ms", "1500"];
    let cluster = TestCluster::start(test, 3, &[quick, quick, quick]);
    cluster.nodes[0].cli_ok(&["volume", "create", "p", "--size", "64MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("p");
    let scratch = tempfile::tempdir().unwrap();
    let signal = |signal: &str, node: &TestNode| {
        let status = Command::new("kill")
            .args([signal, &node.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    // SIGSTOP node 2 for longer than the replica time-out: the writes stall, then go on without it.
    signal("-STOP", &cluster.nodes[2]);
    fio_write_ok(&uri, scratch.path(), "0");
    let in_sync = ids(&cluster.nodes[0].inspect("p")["in_sync"]);
    signal("-CONT", &cluster.nodes[2]);
    let mut expected = vec![cluster.nodes[0].node_id(), cluster.nodes[1].node_id()];
    expected.sort_unstable();
    assert_eq!(in_sync, expected);

    // Cut node 1's peer port off: dropped too (node 2 may be back by now, resynced).
    let cut = &cluster.nodes[1];
    firewall.drop_tcp(None, &cut.host, cut.peer_port);
    fio_write_ok(&uri, scratch.path(), "16M");
    let in_sync = ids(&cluster.nodes[0].inspect("p")["in_sync"]);
    assert!(
        !in_sync.contains(&cut.node_id()) && in_sync.contains(&cluster.nodes[0].node_id()),
        "{in_sync:?}"
    );
    let status: serde_json::Value = serde_json::from_str(&cluster.nodes[0].cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["volumes"][0]["health"], "degraded", "{status:#}");
    firewall.heal();
    // Healed, both come back through resync.
    let mut all: Vec<u64> = cluster.nodes.iter().map(TestNode::node_id).collect();
    all.sort_unstable();
    wait_until("both replicas back in sync", || {
        ids(&cluster.nodes[0].inspect("p")["in_sync"]) == all
    });

    // Every acknowledged write reads back from the coordinator.
    for offset in ["0", "16M"] {
        fio_verify_ok(&uri, scratch.path(), offset);
    }
}

/// Bytes `node`'s disks' schedulers handed to the store as `class`.
fn class_bytes(node: &TestNode, class: &str) -> f64 {
    let url = format!("{}/metrics", node.api_url());
    let body = ureq::get(&url)
        .set("authorization", &format!("Bearer {}", node.token()))
        .call()
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .into_string()
        .unwrap();
    body.lines()
        .filter(|line| {
            line.starts_with("ballast_disk_class_bytes_total{") && line.contains(&format!("class=\"{class}\""))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_returning_replica_is_resynced_under_writes_and_can_then_take_over() {
    let test = "a_returning_replica_is_resynced_under_writes";
    if !have_tool(test, "fio") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "r", "--size", "64MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("r");
    let scratch = tempfile::tempdir().unwrap();
    let all: Vec<u64> = {
        let mut all: Vec<u64> = cluster.nodes.iter().map(TestNode::node_id).collect();
        all.sort_unstable();
        all
    };

    fio_write_ok(&uri, scratch.path(), "0");
    // Node 2 misses a write phase: it drops out of sync.
    cluster.nodes[2].kill9();
    fio_write_ok(&uri, scratch.path(), "16M");
    assert_eq!(ids(&cluster.nodes[0].inspect("r")["in_sync"]).len(), 2);
    // It returns: the coordinator resyncs it while fio keeps writing, and it rejoins.
    cluster.nodes[2].restart();
    fio_write_ok(&uri, scratch.path(), "32M");
    wait_until("the returned replica is back in sync", || {
        ids(&cluster.nodes[0].inspect("r")["in_sync"]) == all
    });
    // Only what changed while it was out was copied (8 MiB written then, 8 MiB during the resync).
    let resync = cluster.nodes[0].inspect("r")["resyncs"][0].clone();
    assert_eq!(resync["state"], "done", "{resync:#}");
    assert_eq!(resync["mode"], "incremental", "{resync:#}");
    let dirty = resync["dirty_bytes"].as_u64().unwrap();
    let moved = resync["copied_bytes"].as_u64().unwrap();
    assert!(
        dirty <= 16 << 20,
        "dirty regions cover more than was written: {resync:#}"
    );
    assert!(
        moved * 10 <= dirty * 11,
        "resync moved more than 1.1x the dirty bytes: {resync:#}"
    );
    // It read from both healthy copies: node 1 sent part of it straight to node 2.
    assert_eq!(resync["sources"], 2, "{resync:#}");
    let from_replicas = resync["from_replicas_bytes"].as_u64().unwrap();
    assert!(
        from_replicas > 0 && from_replicas < moved,
        "the coordinator and the other replica each sent a share: {resync:#}"
    );
    // The copies went below the returning node's clients in its disk's
    // scheduler (the replica-write background flag, peer protocol 4).
    let resync_bytes = class_bytes(&cluster.nodes[2], "resync");
    assert!(
        resync_bytes > 0.0,
        "node 2 counted no resync-class bytes at its disk: {resync_bytes}"
    );
    fio_write_ok(&uri, scratch.path(), "48M");

    // Proof: node 2 takes the volume over and every acknowledged write reads back there.
    cluster.nodes[2].cli_ok(&["volume", "attach", "r", "--force"]);
    let uri = cluster.nodes[2].uri("r");
    for offset in ["0", "16M", "32M", "48M"] {
        fio_verify_ok(&uri, scratch.path(), offset);
    }
}

#[test]
fn a_coordinator_that_crashes_while_a_replica_is_out_still_resyncs_it_incrementally() {
    let test = "a_coordinator_that_crashes_while_a_replica_is_out";
    if !have_tool(test, "fio") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "d", "--size", "64MiB", "--repl", "3"]);
    let uri = cluster.nodes[0].uri("d");
    let scratch = tempfile::tempdir().unwrap();
    fio_write_ok(&uri, scratch.path(), "0");
    cluster.nodes[2].kill9();
    fio_write_ok(&uri, scratch.path(), "16M");
    assert_eq!(ids(&cluster.nodes[0].inspect("d")["in_sync"]).len(), 2);
    // The coordinator crashes and comes back: what it tracked is on disk.
    cluster.nodes[0].kill9();
    cluster.nodes[0].restart();
    cluster.nodes[2].restart();
    wait_until("the returned replica is back in sync", || {
        ids(&cluster.nodes[0].inspect("d")["in_sync"]).len() == 3
    });
    let resync = cluster.nodes[0].inspect("d")["resyncs"][0].clone();
    assert_eq!(resync["state"], "done", "{resync:#}");
    assert_eq!(resync["mode"], "incremental", "{resync:#}");
    let (dirty, moved) = (
        resync["dirty_bytes"].as_u64().unwrap(),
        resync["copied_bytes"].as_u64().unwrap(),
    );
    assert!(dirty <= 8 << 20 && moved <= dirty, "{resync:#}");
    // Node 2 takes over and holds both phases.
    cluster.nodes[2].cli_ok(&["volume", "attach", "d", "--force"]);
    let uri = cluster.nodes[2].uri("d");
    for offset in ["0", "16M"] {
        fio_verify_ok(&uri, scratch.path(), offset);
    }
}

#[test]
fn the_replica_count_is_raised_and_lowered_online_and_new_replicas_hold_the_data() {
    let test = "the_replica_count_is_raised_and_lowered_online";
    if !have_tool(test, "fio") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "u", "--size", "64MiB", "--repl", "1"]);
    let uri = cluster.nodes[0].uri("u");
    let scratch = tempfile::tempdir().unwrap();
    fio_write_ok(&uri, scratch.path(), "0");

    // Up to 3: two new replicas are filled from the coordinator and join;
    // `--wait` returns once they have.
    let updated: serde_json::Value =
        serde_json::from_str(&cluster.nodes[1].cli_ok(&["volume", "update", "u", "--repl", "3", "--wait", "--json"]))
            .unwrap();
    assert_eq!(updated["replicas"], 3, "{updated:#}");
    let mut all: Vec<u64> = cluster.nodes.iter().map(TestNode::node_id).collect();
    all.sort_unstable();
    let mut in_sync = ids(&updated["in_sync"]);
    in_sync.sort_unstable();
    assert_eq!(in_sync, all, "{updated:#}");
    let resync = cluster.nodes[0].inspect("u")["resyncs"][0].clone();
    assert_eq!(resync["mode"], "full", "{resync:#}");
    assert!(resync["copied_bytes"].as_u64().unwrap() >= 8 << 20, "{resync:#}");

    // Down to 2: one replica goes, and its node drops the data.
    cluster.nodes[0].cli_ok(&["volume", "update", "u", "--repl", "2"]);
    let info = cluster.nodes[0].inspect("u");
    let replicas = ids(&info["replica_nodes"]);
    assert_eq!(replicas.len(), 2);
    assert!(
        replicas.contains(&cluster.nodes[0].node_id()),
        "the coordinator keeps its replica"
    );
    let gone = cluster
        .nodes
        .iter()
        .find(|node| !replicas.contains(&node.node_id()))
        .unwrap();
    wait_until("the removed replica's data is released", || gone.local_replicas() == 0);
    let refused = cluster.nodes[0].cli(&["volume", "update", "u", "--repl", "9"]);
    assert!(
        !refused.status.success() && text(&refused).contains("--repl must be 1 to 5"),
        "{}",
        text(&refused)
    );

    // The coordinator dies: the remaining, added replica takes over and holds every write.
    let heir = replicas
        .iter()
        .copied()
        .find(|id| *id != cluster.nodes[0].node_id())
        .unwrap();
    let heir = cluster.index_of(heir);
    cluster.nodes[0].kill9();
    cluster.nodes[heir].cli_ok(&["volume", "attach", "u", "--force"]);
    fio_verify_ok(&cluster.nodes[heir].uri("u"), scratch.path(), "0");
}

#[test]
fn decommissioning_the_serving_node_moves_its_replicas_and_it_leaves_the_cluster() {
    let test = "decommissioning_the_serving_node";
    if !have_tool(test, "fio") {
        return;
    }
    let cluster = TestCluster::start(test, 4, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "d", "--size", "64MiB", "--repl", "3"]);
    let scratch = tempfile::tempdir().unwrap();
    fio_write_ok(&cluster.nodes[0].uri("d"), scratch.path(), "0");
    let leaving = cluster.nodes[0].node_id();

    // Asked through another node; the leader runs it.
    cluster.nodes[1].cli_ok(&["node", "decommission", &leaving.to_string()]);
    let info = cluster.nodes[1].inspect("d");
    let replicas = ids(&info["replica_nodes"]);
    assert_eq!(replicas.len(), 3, "{info:#}");
    assert!(!replicas.contains(&leaving), "{info:#}");
    assert_eq!(ids(&info["in_sync"]), replicas, "{info:#}");
    let status: serde_json::Value =
        serde_json::from_str(&cluster.nodes[1].cli_ok(&["cluster", "status", "--json"])).unwrap();
    let members: Vec<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(members.len(), 3, "{status:#}");
    assert!(!members.contains(&leaving));
    wait_until("the leaving node released its replica", || {
        cluster.nodes[0].local_replicas() == 0
    });

    // The volume is served by its new coordinator, with every write.
    let coordinator = cluster.index_of(info["coordinator"].as_u64().unwrap());
    wait_until("the new coordinator serves the volume", || {
        common::qemu_io_ok(&common::qemu_io(&cluster.nodes[coordinator].uri("d"), "read 0 4096"))
    });
    fio_verify_ok(&cluster.nodes[coordinator].uri("d"), scratch.path(), "0");
    // The cluster still changes metadata without it.
    cluster.nodes[coordinator].cli_ok(&["volume", "create", "after", "--size", "16MiB", "--repl", "3"]);
}

#[test]
fn the_leader_rebuilds_a_silent_nodes_replica_and_fails_over_a_silent_coordinator() {
    let test = "the_leader_rebuilds_and_fails_over";
    if !have_tool(test, "fio") {
        return;
    }
    let quick: &[&str] = &["--failover-after-s", "2", "--rebuild-after-s", "2"];
    let mut cluster = TestCluster::start(test, 3, &[quick, quick, quick]);
    cluster.nodes[0].cli_ok(&["volume", "create", "a", "--size", "64MiB", "--repl", "2"]);
    let scratch = tempfile::tempdir().unwrap();
    fio_write_ok(&cluster.nodes[0].uri("a"), scratch.path(), "0");
    let info = cluster.nodes[0].inspect("a");
    let first = ids(&info["replica_nodes"]);
    let coordinator = cluster.nodes[0].node_id();
    let other = cluster.index_of(first.iter().copied().find(|id| *id != coordinator).unwrap());
    let spare = (0..3).find(|index| *index != 0 && *index != other).unwrap();

    // The other replica's node dies: the spare gets a copy, the dead one is dropped.
    cluster.nodes[other].kill9();
    let mut expected = vec![coordinator, cluster.nodes[spare].node_id()];
    expected.sort_unstable();
    wait_until("the replica rebuilt on the spare node", || {
        let info = cluster.nodes[0].inspect("a");
        ids(&info["replica_nodes"]) == expected && ids(&info["in_sync"]) == expected
    });
    assert_eq!(cluster.nodes[0].inspect("a")["replicas"], 2);
    cluster.nodes[other].restart();

    // The coordinator dies: the leader serves the volume from the rebuilt replica.
    cluster.nodes[0].kill9();
    let heir = cluster.nodes[spare].node_id();
    wait_until("automatic failover", || {
        cluster.nodes[spare].inspect("a")["coordinator"].as_u64() == Some(heir)
            && Command::new("nbdinfo")
                .arg(cluster.nodes[spare].uri("a"))
                .output()
                .is_ok_and(|o| o.status.success())
    });
    fio_verify_ok(&cluster.nodes[spare].uri("a"), scratch.path(), "0");
}

#[test]
fn a_block_that_fails_its_checksum_is_served_from_a_replica_and_repaired() {
    let test = "a_block_that_fails_its_checksum_is_served_from_a_replica";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 2, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "c", "--size", "16MiB", "--repl", "2"]);
    let uri = cluster.nodes[0].uri("c");
    let qemu_io = |command: &str| {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", command, &uri])
            .output()
            .unwrap()
    };
    let written = qemu_io("write -P 0x5a 65536 4096");
    assert!(written.status.success(), "{}", text(&written));
    // Flip a byte of that block on the coordinator's disk, behind the store's back.
    let backing = cluster.nodes[0].dir.path().join("disk0.img");
    assert!(
        common::corrupt_block_filled_with(&backing, 0x5a),
        "the written block was not found on disk"
    );

    // The read still returns the written bytes, taken from node 1, and the local copy is rewritten.
    for _ in 0..2 {
        let read = qemu_io("read -P 0x5a 65536 4096");
        assert!(
            read.status.success() && !text(&read).contains("failed"),
            "{}",
            text(&read)
        );
    }
    let log = cluster.nodes[0].log_text();
    assert!(log.contains("repaired from a replica"), "{log}");
    assert_eq!(
        log.matches("local read failed").count(),
        1,
        "the second read must hit the repaired copy: {log}"
    );
}

#[test]
fn a_paused_coordinator_that_resumes_after_a_failover_gets_no_write_accepted() {
    let test = "a_paused_coordinator_that_resumes_after_a_failover";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let cluster = TestCluster::start(test, 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "s", "--size", "16MiB", "--repl", "3"]);
    let qemu_io = |node: &TestNode, command: &str| {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", command, &node.uri("s")])
            .output()
            .unwrap()
    };
    let written = qemu_io(&cluster.nodes[0], "write -P 0x11 0 4096");
    assert!(written.status.success(), "{}", text(&written));
    // Connected while the coordinator runs, so the late write rides an open session.
    let old = &cluster.nodes[0];
    let stop = |signal: &str| {
        let status = Command::new("kill")
            .args([signal, &old.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    stop("-STOP");
    let late = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 0 4096", &old.uri("s")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    cluster.nodes[1].cli_ok(&["volume", "attach", "s", "--force"]);
    stop("-CONT");
    let late = late.wait_with_output().unwrap();
    // Nor does the old one, even before it hears of the move: a write that
    // reached its copy but no replica stops it serving before any reader
    // can see it (torture caught a resumed coordinator showing one).
    let stale = qemu_io(old, "read -P 0x22 0 4096");
    assert!(
        !stale.status.success() || text(&stale).contains("failed"),
        "the deposed coordinator showed its unreplicated write (late write: {}): {}",
        text(&late),
        text(&stale)
    );
    // Whatever the old coordinator answered, the new one never shows its write.
    let read = qemu_io(&cluster.nodes[1], "read -P 0x11 0 4096");
    assert!(
        read.status.success() && !text(&read).contains("failed"),
        "the fenced coordinator's write became visible (late write: {}): {}",
        text(&late),
        text(&read)
    );
    // (The old coordinator may already be resynced from the new one and back in sync.)
    wait_until("the old coordinator stops serving", || {
        !qemu_io(old, "read 0 4096").status.success()
    });
}

#[test]
fn a_coordinator_paused_past_the_failover_timeout_is_replaced_and_never_answers_a_stale_read() {
    let test = "a_coordinator_paused_past_the_failover_timeout";
    if !have_tool(test, "qemu-io") {
        return;
    }
    let quick: &[&str] = &["--failover-after-s", "2"];
    let cluster = TestCluster::start(test, 3, &[quick, quick, quick]);
    cluster.nodes[0].cli_ok(&["volume", "create", "l", "--size", "16MiB", "--repl", "3"]);
    let old = &cluster.nodes[0];
    assert_eq!(old.inspect("l")["coordinator"].as_u64(), Some(old.node_id()));
    assert!(common::qemu_io_ok(&common::qemu_io(
        &old.uri("l"),
        "write -P 0x11 0 4096"
    )));
    let signal = |signal: &str| {
        let status = Command::new("kill")
            .args([signal, &old.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    // A pause well below the failover timeout moves nothing: the node keeps
    // renewing its lease once it runs again, and serves on.
    let epoch = old.inspect("l")["epoch"].as_u64();
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(700));
    signal("-CONT");
    wait_until("the briefly paused coordinator serves again", || {
        common::qemu_io_ok(&common::qemu_io(&old.uri("l"), "read -P 0x11 0 4096"))
    });
    let info = cluster.nodes[1].inspect("l");
    assert_eq!(
        (info["coordinator"].as_u64(), info["epoch"].as_u64()),
        (Some(old.node_id()), epoch),
        "a pause shorter than the failover timeout caused a failover"
    );

    // Paused past it: the leader moves the volume by itself, and the new
    // coordinator takes a write.
    signal("-STOP");
    let mut heir = None;
    wait_until("automatic failover away from the paused coordinator", || {
        heir = cluster.nodes[1].inspect("l")["coordinator"]
            .as_u64()
            .filter(|id| *id != old.node_id());
        heir.is_some()
    });
    let new = &cluster.nodes[cluster.index_of(heir.unwrap())];
    wait_until("the new coordinator takes a write", || {
        common::qemu_io_ok(&common::qemu_io(&new.uri("l"), "write -P 0x22 0 4096"))
    });
    // A client of the old coordinator asks while it is still paused: the
    // read is served only once the old node runs again, and it must not see
    // the block as it was before the new coordinator's write.
    let stale = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x11 0 4096", &old.uri("l")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal("-CONT");
    let stale = stale.wait_with_output().unwrap();
    assert!(
        !common::qemu_io_ok(&stale),
        "the replaced coordinator answered a read with the data from before the new coordinator's write: {}",
        text(&stale)
    );
    assert!(common::qemu_io_ok(&common::qemu_io(
        &new.uri("l"),
        "read -P 0x22 0 4096"
    )));
}
