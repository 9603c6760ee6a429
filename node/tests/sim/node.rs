//! One simulated node: the real `LogStore` and `StateMachine` over a
//! `ClusterDb` in its own directory, under a real `openraft::Raft` whose
//! network is the simulated one. A crash shuts Raft down at an await
//! point (every store write is one redb transaction, committed before the
//! write's future returns, so this is a kill -9 between writes), waits for
//! the store to close, and a restart reopens the same directory.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use node::cluster::state::ClusterState;
use node::cluster::store::{ClusterDb, LogStore, StateMachine};
use node::cluster::{
    ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_INTERVAL_MS, SNAPSHOT_LOGS_KEPT,
    SNAPSHOT_LOGS_SINCE_LAST,
};
use openraft::storage::RaftLogStorage;
use openraft::{Config, Raft, RaftMetrics, SnapshotPolicy};
use parking_lot::RwLock;
use rand::rngs::StdRng;
use rand::Rng;

use super::network::{Net, NodeId, SimNetworkFactory, SimRaft};

/// Longest a shutdown may take before the node counts as hung.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the store may stay open after a shutdown (in-flight RPCs hold log readers).
const STORE_RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

/// When snapshots are taken (the node's policy, or a short one so runs see snapshots).
#[derive(Clone, Copy, Debug)]
pub struct SnapshotSettings {
    pub logs_since_last: u64,
    pub logs_kept: u64,
}

impl SnapshotSettings {
    pub const NODE: Self = Self {
        logs_since_last: SNAPSHOT_LOGS_SINCE_LAST,
        logs_kept: SNAPSHOT_LOGS_KEPT,
    };
}

/// The node's Raft config (`Cluster::open`), with the election timeout drawn
/// from the seed. openraft draws it once per `Raft`, uniformly from
/// [min, max), with its own unseeded thread RNG; drawing it here and
/// passing the range [t, t+1) keeps that distribution but makes it
/// reproducible. (openraft also derives its leader lease and the
/// smaller-log timeout from max; those become t+1 and 2(t+1) instead of
/// 2000 ms and 4000 ms.)
pub fn config(rng: &mut StdRng, snapshots: SnapshotSettings) -> Arc<Config> {
    let election_timeout_ms = rng.gen_range(ELECTION_TIMEOUT_MIN_MS..ELECTION_TIMEOUT_MAX_MS);
    let config = Config {
        cluster_name: "ballast".into(),
        heartbeat_interval: HEARTBEAT_INTERVAL_MS,
        election_timeout_min: election_timeout_ms,
        election_timeout_max: election_timeout_ms + 1,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshots.logs_since_last),
        max_in_snapshot_log_to_keep: snapshots.logs_kept,
        ..Config::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// How a node goes down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// `Raft::shutdown`: Raft stops at its next await point.
    Shutdown,
    /// The last handle is dropped without a shutdown; Raft's tasks see their
    /// channels close and end (only safe when no one else holds a handle).
    Drop,
}

struct Running {
    raft: SimRaft,
    state: Arc<RwLock<ClusterState>>,
    db: Weak<ClusterDb>,
}

/// What a node had persisted when it last stopped, checked when it restarts.
#[derive(Clone, Copy, Debug, Default)]
struct Durable {
    vote_term: u64,
    last_log_index: Option<u64>,
    last_applied_index: Option<u64>,
}

pub struct SimNode {
    pub id: NodeId,
    dir: PathBuf,
    pub incarnation: u64,
    running: Option<Running>,
    durable: Durable,
}

impl SimNode {
    pub fn new(id: NodeId, dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("node directory");
        Self {
            id,
            dir,
            incarnation: 0,
            running: None,
            durable: Durable::default(),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    pub fn raft(&self) -> Option<&SimRaft> {
        self.running.as_ref().map(|running| &running.raft)
    }

    pub fn metrics(&self) -> Option<RaftMetrics<NodeId, openraft::BasicNode>> {
        self.raft().map(|raft| raft.metrics().borrow().clone())
    }

    /// The applied metadata (what the node would serve).
    pub fn state(&self) -> Option<ClusterState> {
        self.running.as_ref().map(|running| running.state.read().clone())
    }

    /// Opens the store and starts Raft; checks that nothing persisted was lost.
    pub async fn start(&mut self, net: &Arc<Net>, config: Arc<Config>) -> Result<(), String> {
        assert!(self.running.is_none(), "node {} is already running", self.id);
        let db = ClusterDb::open(&self.dir).map_err(|error| format!("node {}: {error}", self.id))?;
        let machine = StateMachine::open(Arc::clone(&db)).map_err(|error| format!("node {}: {error}", self.id))?;
        let mut log = LogStore::new(Arc::clone(&db));
        self.check_recovered(&mut log).await?;
        let state = Arc::clone(&machine.state);
        let applied = Arc::clone(&machine.applied);
        let factory = SimNetworkFactory {
            from: self.id,
            net: Arc::clone(net),
        };
        let raft = Raft::new(self.id, config, factory, log, machine)
            .await
            .map_err(|error| format!("node {}: raft did not start: {error}", self.id))?;
        // Raft::new re-applied the committed entries after the last snapshot.
        let applied = *applied.borrow();
        if let Some(before) = self.durable.last_applied_index {
            if applied < before {
                return Err(format!(
                    "node {} restarted with applied index {applied}, had applied {before}",
                    self.id
                ));
            }
        }
        self.incarnation += 1;
        net.register(self.id, self.incarnation, raft.clone());
        self.running = Some(Running {
            raft,
            state,
            db: Arc::downgrade(&db),
        });
        Ok(())
    }

    /// The vote and the log (the applied state is checked once Raft has
    /// re-applied the committed log, in `start`).
    async fn check_recovered(&self, log: &mut LogStore) -> Result<(), String> {
        let id = self.id;
        let vote = log.read_vote().await.map_err(|error| format!("node {id}: {error}"))?;
        let log_state = log
            .get_log_state()
            .await
            .map_err(|error| format!("node {id}: {error}"))?;
        let durable = self.durable;
        let vote_term = vote.map_or(0, |vote| vote.leader_id().term);
        if vote_term < durable.vote_term {
            return Err(format!(
                "node {id} restarted with vote term {vote_term}, had voted in term {}",
                durable.vote_term
            ));
        }
        let last_log_index = log_state.last_log_id.map(|id| id.index);
        if last_log_index < durable.last_log_index {
            return Err(format!(
                "node {id} restarted with last log index {last_log_index:?}, had {:?}",
                durable.last_log_index
            ));
        }
        Ok(())
    }

    /// Stops the node as a crash would and waits until its store is closed.
    pub async fn crash(&mut self, net: &Arc<Net>) -> Result<(), String> {
        self.stop(net, Stop::Shutdown).await
    }

    /// Stops the node (see `Stop`) and waits until its store is closed.
    pub async fn stop(&mut self, net: &Arc<Net>, how: Stop) -> Result<(), String> {
        let id = self.id;
        let running = self
            .running
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        net.unregister(id);
        if how == Stop::Shutdown {
            match tokio::time::timeout(SHUTDOWN_TIMEOUT, running.raft.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(format!("node {id}: raft task failed: {error}")),
                Err(_) => return Err(format!("node {id}: shutdown took over {SHUTDOWN_TIMEOUT:?}")),
            }
        }
        let metrics = running.raft.metrics().borrow().clone();
        self.durable = Durable {
            vote_term: metrics.vote.leader_id().term,
            last_log_index: metrics.last_log_index,
            last_applied_index: metrics.last_applied.map(|id| id.index),
        };
        let Running { raft, state, db } = running;
        drop((raft, state));
        let started = tokio::time::Instant::now();
        while db.strong_count() > 0 {
            if started.elapsed() > STORE_RELEASE_TIMEOUT {
                return Err(format!(
                    "node {id}: store still open {STORE_RELEASE_TIMEOUT:?} after shutdown"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}
