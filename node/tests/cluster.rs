//! Real multi-node clusters on this host (node i on 127.0.0.(i+1)): forming
//! a cluster with tokens, placement of replicas, leader loss, a minority
//! partition cut with iptables, refused joins, and nodes of two releases
//! (a rolling upgrade's middle) working together.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{wait_until, TestCluster, CONVERGE_TIMEOUT};
use common::firewall::Firewall;
use common::node::TestNode;
use common::{record_skip, text};

fn replica_nodes(node: &TestNode, volume: &str) -> Vec<u64> {
    let info: serde_json::Value = node.inspect(volume);
    info["replica_nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect()
}

/// Runs `ballast ARGS` on `node` until it succeeds (bounded); its stdout.
fn cli_eventually(node: &TestNode, args: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let output = node.cli(args);
        if output.status.success() {
            return String::from_utf8(output.stdout).unwrap();
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "ballast {args:?} kept failing: {}",
            text(&output)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn three_nodes_form_a_cluster_and_a_repl3_volume_has_a_replica_on_each() {
    let cluster = TestCluster::start("three_nodes_form_a_cluster", 3, &[]);
    let status = cluster.status(1).unwrap();
    let roles: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.iter().filter(|role| **role == "leader").count(), 1, "{status:#}");
    assert_eq!(roles.iter().filter(|role| **role == "voter").count(), 2, "{status:#}");

    // Created through a follower; every node gets a local replica; the creating node serves it.
    cluster.nodes[1].cli_ok(&["volume", "create", "db", "--size", "64MiB", "--repl", "3"]);
    let mut replicas = replica_nodes(&cluster.nodes[2], "db");
    replicas.sort_unstable();
    let mut ids: Vec<u64> = cluster.nodes.iter().map(TestNode::node_id).collect();
    ids.sort_unstable();
    assert_eq!(replicas, ids);
    for node in &cluster.nodes {
        wait_until("local replica on every node", || node.local_replicas() == 1);
    }
    let info: serde_json::Value = cluster.nodes[0].inspect("db");
    assert_eq!(info["coordinator"].as_u64().unwrap(), cluster.nodes[1].node_id());
    // Only the coordinator exports it over NBD.
    if common::have_tool("three_nodes_form_a_cluster", "nbdinfo") {
        let served = Command::new("nbdinfo")
            .arg(cluster.nodes[1].uri("db"))
            .output()
            .unwrap();
        assert!(served.status.success(), "{}", text(&served));
        let elsewhere = Command::new("nbdinfo")
            .arg(cluster.nodes[0].uri("db"))
            .output()
            .unwrap();
        assert!(!elsewhere.status.success(), "a non-coordinator replica served NBD");
    }
    // Too many replicas for the cluster: refused with the reason.
    let output = cluster.nodes[0].cli(&["volume", "create", "big", "--size", "1GiB", "--repl", "4"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("--repl 4 needs 4"), "{}", text(&output));
    // Delete removes every replica.
    cluster.nodes[2].cli_ok(&["volume", "delete", "db"]);
    for node in &cluster.nodes {
        wait_until("replicas removed", || node.local_replicas() == 0);
    }
}

#[test]
fn replicas_go_to_distinct_zones_when_nodes_are_labelled() {
    let labels: [&[&str]; 3] = [&["--label", "zone=a"], &["--label", "zone=a"], &["--label", "zone=b"]];
    let cluster = TestCluster::start("replicas_go_to_distinct_zones", 3, &labels);
    cluster.nodes[0].cli_ok(&["volume", "create", "z", "--size", "64MiB", "--repl", "2"]);
    let replicas = replica_nodes(&cluster.nodes[0], "z");
    assert_eq!(replicas.len(), 2);
    assert!(
        replicas.contains(&cluster.nodes[2].node_id()),
        "zone b must hold one: {replicas:?}"
    );
    let output = cluster.nodes[0].cli(&["volume", "create", "zz", "--size", "64MiB", "--repl", "3"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("distinct zones"), "{}", text(&output));
}

use node::peer::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// The next release, as a test stands it in: another advertised version,
/// and a peer protocol range one version ahead that still speaks this one.
fn next_release() -> [(String, String); 2] {
    [
        ("BALLAST_ADVERTISED_VERSION".into(), "0.2.0-next".into()),
        (
            "BALLAST_PEER_PROTOCOL".into(),
            format!("{PROTOCOL_VERSION}-{}", PROTOCOL_VERSION + 1),
        ),
    ]
}

/// `cluster upgrade-status --json` on `node`.
fn upgrade_status(node: &TestNode) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(&["cluster", "upgrade-status", "--json"])).unwrap()
}

#[test]
fn killing_the_leader_elects_another_and_it_returns_as_the_next_release_and_catches_up() {
    let mut cluster = TestCluster::start("killing_the_leader", 3, &[]);
    cluster.nodes[0].cli_ok(&["volume", "create", "before", "--size", "64MiB", "--repl", "3"]);
    let status = cluster.status(0).unwrap();
    let old_leader = cluster.leader_index(&status);
    let old_id = cluster.nodes[old_leader].node_id();
    let view = upgrade_status(&cluster.nodes[0]);
    assert_eq!(view["versions"].as_object().unwrap().len(), 1, "{view:#}");
    assert_eq!(view["common_protocol"], PROTOCOL_VERSION, "{view:#}");
    cluster.nodes[old_leader].kill9();
    let survivors: Vec<usize> = (0..3).filter(|index| *index != old_leader).collect();
    let status = cluster.wait_for_on(&survivors, "a new leader", |status| {
        status["leader"].as_u64().is_some_and(|leader| leader != old_id)
    });
    let new_leader = cluster.leader_index(&status);
    assert_ne!(new_leader, old_leader);
    // Metadata writes continue with one node down (repl 2 fits the two survivors).
    let survivor = &cluster.nodes[survivors[0]];
    cli_eventually(
        survivor,
        &["volume", "create", "during", "--size", "64MiB", "--repl", "2"],
    );
    let listed = survivor.cli_ok(&["volume", "list", "--json"]);
    assert!(
        listed.contains("\"during\"") && listed.contains("\"before\""),
        "{listed}"
    );
    // The old leader returns as a follower, upgraded to the next release (a
    // rolling upgrade's step), and learns what it missed.
    cluster.nodes[old_leader].env = next_release().into_iter().collect();
    cluster.nodes[old_leader].restart();
    let returned = &cluster.nodes[old_leader];
    let survivor = &cluster.nodes[survivors[0]];
    wait_until("the returned node sees the new volume", || {
        returned.cli_ok(&["volume", "list", "--json"]).contains("\"during\"")
    });
    let status = cluster.wait_for("all three up again", |status| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|node| node["up"] == true)
    });
    assert!(status["leader"].as_u64().is_some());
    // Replication works across the two releases: the returned node's copy of
    // the repl=3 volume is resynced and back in sync.
    wait_until("the returned node's replica back in sync", || {
        let info = survivor.inspect("before");
        info["in_sync"]
            .as_array()
            .is_some_and(|in_sync| in_sync.iter().any(|id| id.as_u64() == Some(old_id)))
    });
    // upgrade-status shows the upgrade under way, from either release (once
    // a ping brought the returned node's new report: every second).
    for node in [survivor, returned] {
        let started = Instant::now();
        let mut view = upgrade_status(node);
        while view["newest"] != "0.2.0-next" || view["unknown"].as_array().is_some_and(|unknown| !unknown.is_empty()) {
            assert!(started.elapsed() < CONVERGE_TIMEOUT, "{view:#}");
            std::thread::sleep(Duration::from_millis(250));
            view = upgrade_status(node);
        }
        assert_eq!(view["versions"]["0.2.0-next"], serde_json::json!([old_id]), "{view:#}");
        assert_eq!(view["behind"].as_array().unwrap().len(), 2, "{view:#}");
        assert_eq!(view["common_protocol"], PROTOCOL_VERSION, "{view:#}");
    }
    let shown = survivor.cli_ok(&["cluster", "upgrade-status"]);
    assert!(
        shown.contains("upgrade under way: 1 of 3 node(s) run ballast 0.2.0-next")
            && shown.contains(&node::peer::handshake::range_text(
                PROTOCOL_VERSION_MIN,
                PROTOCOL_VERSION
            )),
        "{shown}"
    );
}

#[test]
fn a_partitioned_minority_cannot_change_metadata_and_healing_converges() {
    let test = "a_partitioned_minority";
    let Some(firewall) = Firewall::new() else {
        record_skip(
            test,
            "iptables is not usable here (needs root and the iptables package)",
        );
        return;
    };
    let cluster = TestCluster::start(test, 3, &[]);
    // Cut node 2 off: nothing reaches its peer port, nothing it sends reaches the others'.
    let isolated = &cluster.nodes[2];
    firewall.drop_tcp(None, &isolated.host, isolated.peer_port);
    for other in &cluster.nodes[..2] {
        firewall.drop_tcp(Some(&isolated.host), &other.host, other.peer_port);
    }
    // The minority cannot commit (its proposal times out with a clear error).
    let output = isolated.cli(&["volume", "create", "minority", "--size", "64MiB"]);
    assert!(!output.status.success(), "the minority committed a change");
    assert!(
        text(&output).contains("majority") || text(&output).contains("leader"),
        "{}",
        text(&output)
    );
    // The majority can.
    cli_eventually(
        &cluster.nodes[0],
        &["volume", "create", "majority", "--size", "64MiB", "--repl", "2"],
    );
    firewall.heal();
    // After healing every node agrees: the majority's change is there, the minority's is not.
    for node in &cluster.nodes {
        wait_until("converged after healing", || {
            let list = node.cli_ok(&["volume", "list", "--json"]);
            list.contains("\"majority\"")
        });
        let list = node.cli_ok(&["volume", "list", "--json"]);
        assert!(!list.contains("\"minority\""), "{list}");
    }
}

#[test]
fn joins_with_a_bad_or_expired_token_or_from_another_cluster_are_refused() {
    let test = "joins_with_a_bad_token";
    let cluster = TestCluster::start(test, 1, &[]);
    let seed = cluster.nodes[0].peer_address();
    let newcomer = TestNode::start_unclustered(test, "127.0.0.2", &[256 << 20], &[]);

    let token = cluster.token(0, "10m");
    let forged = format!("{}{}", &token[..token.len() - 4], "0000");
    let output = newcomer.cli(&["cluster", "join", &seed, "--token", &forged]);
    assert!(!output.status.success());
    assert!(text(&output).contains("unknown join token"), "{}", text(&output));

    let short = cluster.token(0, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let output = newcomer.cli(&["cluster", "join", &seed, "--token", &short]);
    assert!(!output.status.success());
    assert!(text(&output).contains("expired"), "{}", text(&output));

    let output = newcomer.cli(&["cluster", "join", &seed, "--token", "not-a-token"]);
    assert!(!output.status.success());
    assert!(text(&output).contains("malformed join token"), "{}", text(&output));

    // A node of another cluster: its peers refuse it at the handshake, and it cannot join.
    let other = TestNode::start_unclustered(test, "127.0.0.3", &[256 << 20], &[]);
    other.cli_ok(&["cluster", "init"]);
    let output = other.cli(&["cluster", "join", &seed, "--token", &token]);
    assert!(!output.status.success());
    assert!(text(&output).contains("already a member"), "{}", text(&output));
    let foreign_token = other.cli_ok(&["cluster", "token", "create"]).trim().to_owned();
    let output = newcomer.cli(&["cluster", "join", &seed, "--token", &foreign_token]);
    assert!(!output.status.success());
    // Refused before anything is sent: the member's CA is not the token's.
    assert!(
        text(&output).contains("does not match the join token's fingerprint"),
        "{}",
        text(&output)
    );

    // A node of a release with no peer protocol in common (two releases
    // ahead): refused at the handshake, naming both releases.
    let far_protocol = format!("{}-{}", PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
    let far = TestNode::start_unclustered_with_env(
        test,
        "127.0.0.4",
        &[128 << 20],
        &[],
        &[
            ("BALLAST_ADVERTISED_VERSION", "0.3.0-far"),
            ("BALLAST_PEER_PROTOCOL", &far_protocol),
        ],
    );
    let output = far.cli(&["cluster", "join", &seed, "--token", &token]);
    assert!(!output.status.success());
    for part in [
        "no peer protocol in common",
        &format!("ballast 0.3.0-far (peer protocol {far_protocol})"),
        &format!(
            "ballast {} (peer protocol {})",
            env!("CARGO_PKG_VERSION"),
            node::peer::handshake::range_text(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION)
        ),
    ] {
        assert!(text(&output).contains(part), "{part:?} missing: {}", text(&output));
    }
    drop(far);
    // A malformed protocol hook: the node does not start.
    let output = common::node::run_with_timeout(
        common::ballast()
            .env("BALLAST_PEER_PROTOCOL", "2-1")
            .args(["node", "run", "--data-dir"])
            .arg(newcomer.dir.path().join("unused")),
        Duration::from_secs(60),
    );
    assert!(!output.status.success());
    assert!(text(&output).contains("BALLAST_PEER_PROTOCOL"), "{}", text(&output));

    // Every slot of the seed's peer port taken by silent sockets (no TLS
    // handshake): the join still gets in, evicting the oldest of them.
    let flood: Vec<std::net::TcpStream> = (0..PEER_FLOOD)
        .filter_map(|_| std::net::TcpStream::connect(&seed).ok())
        .collect();
    assert!(
        flood.len() >= PEER_FLOOD * 9 / 10,
        "only {} connections opened",
        flood.len()
    );

    // The refusals left the newcomer free to join properly (token from a file).
    let token_file = newcomer.data().join("join.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    newcomer.cli_ok(&["cluster", "join", &seed, "--token-file", token_file.to_str().unwrap()]);
    drop(flood);
    assert!(
        cluster.nodes[0]
            .log_text()
            .contains("closed the oldest one still in its handshake"),
        "the join did not need to evict: the flood did not fill the peer port"
    );
    let status = newcomer.cli_ok(&["cluster", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status:#}");
}

/// Silent connections to a peer port in the join test: past its 256 slots.
const PEER_FLOOD: usize = 400;

#[test]
fn a_sixth_node_joins_as_a_learner_and_is_promoted_when_a_voter_is_decommissioned() {
    let cluster = TestCluster::start("a_sixth_node_joins_as_a_learner", 6, &[]);
    let roles = |status: &serde_json::Value| -> Vec<(u64, String)> {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| (node["id"].as_u64().unwrap(), node["role"].as_str().unwrap().to_owned()))
            .collect()
    };
    let status = cluster.status(0).unwrap();
    let learners: Vec<u64> = roles(&status)
        .into_iter()
        .filter(|(_, role)| role == "learner")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(learners, vec![cluster.nodes[5].node_id()], "{status:#}");
    // A voter leaves: the learner takes its vote.
    let leaving = cluster.nodes[4].node_id();
    cluster.nodes[0].cli_ok(&["node", "decommission", &leaving.to_string()]);
    let status = cluster.wait_for_on(&[0], "the learner promoted", |status| {
        let roles = roles(status);
        roles.len() == 5 && roles.iter().all(|(_, role)| role != "learner")
    });
    assert!(roles(&status).iter().all(|(id, _)| *id != leaving), "{status:#}");
}
