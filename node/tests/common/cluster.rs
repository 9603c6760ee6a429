//! A local cluster of real `ballast node run` processes for tests: node i
//! listens on 127.0.0.(i+1), so firewall rules can cut one node off.

use std::time::{Duration, Instant};

use super::node::TestNode;

/// Longest the cluster may take to agree on something.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// N nodes: node 0 initialized the cluster, the others joined through it.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    /// Starts `count` nodes (one 256 MiB disk each), `labels[i]` passed to node i.
    pub fn start(test: &str, count: usize, labels: &[&[&str]]) -> Self {
        let nodes: Vec<TestNode> = (0..count)
            .map(|index| {
                let host = format!("127.0.0.{}", index + 1);
                let extra = labels.get(index).copied().unwrap_or(&[]);
                TestNode::start_unclustered(test, &host, &[256 << 20], extra)
            })
            .collect();
        nodes[0].cli_ok(&["cluster", "init"]);
        let cluster = Self { nodes };
        for index in 1..count {
            let token = cluster.token(0, "10m");
            let seed = cluster.nodes[0].peer_address();
            cluster.nodes[index].cli_ok(&["cluster", "join", &seed, "--token", &token]);
        }
        for index in 0..count {
            cluster.wait_for_on(&[index], "every node up and a leader, seen from each", |status| {
                status["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.len() == count && nodes.iter().all(|node| node["up"] == true))
                    && !status["leader"].is_null()
            });
        }
        cluster
    }

    /// A join token made on node `index`.
    pub fn token(&self, index: usize, ttl: &str) -> String {
        self.nodes[index]
            .cli_ok(&["cluster", "token", "create", "--ttl", ttl])
            .trim()
            .to_owned()
    }

    /// `cluster status --json` as seen by node `index` (None if it does not answer).
    pub fn status(&self, index: usize) -> Option<serde_json::Value> {
        let output = self.nodes[index].cli(&["cluster", "status", "--json"]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Polls every node's status until one satisfies `check` (bounded).
    pub fn wait_for(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.wait_for_on(&(0..self.nodes.len()).collect::<Vec<_>>(), what, check)
    }

    /// Polls the status of the nodes `indexes` until one satisfies `check`.
    pub fn wait_for_on(
        &self,
        indexes: &[usize],
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        let mut last = serde_json::Value::Null;
        while started.elapsed() < CONVERGE_TIMEOUT {
            for &index in indexes {
                if let Some(status) = self.status(index) {
                    if check(&status) {
                        return status;
                    }
                    last = status;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("cluster did not reach '{what}' within {CONVERGE_TIMEOUT:?}; last status: {last:#}");
    }

    /// Waits until node `observer` sees the node with id `down` as down,
    /// with a leader elected among the rest.
    pub fn wait_seen_down(&self, observer: usize, down: u64) {
        self.wait_for_on(&[observer], &format!("node {down} seen down"), |status| {
            status["nodes"]
                .as_array()
                .is_some_and(|nodes| nodes.iter().any(|node| node["id"] == down && node["up"] == false))
                && !status["leader"].is_null()
        });
    }

    /// Index of the node that leads, per node `asked`'s status.
    pub fn leader_index(&self, status: &serde_json::Value) -> usize {
        let leader = status["leader"].as_u64().expect("a leader");
        self.index_of(leader)
    }

    /// Index of the node with cluster id `id`.
    pub fn index_of(&self, id: u64) -> usize {
        self.nodes
            .iter()
            .position(|node| node.node_id() == id)
            .unwrap_or_else(|| panic!("no node has id {id}"))
    }
}

/// Polls `check` until it holds (bounded by `CONVERGE_TIMEOUT`).
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "{what}: not within {CONVERGE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
