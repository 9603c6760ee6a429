//! One simulated run of one seed: a 3-node cluster formed as `cluster::join`
//! forms it, a safety phase (proposals from concurrent clients, crashes
//! and restarts, partitions, loss, delay, duplication, membership changes
//! up to 5 nodes), then a liveness phase (faults healed, crashed nodes
//! restarted) in which the cluster must elect a leader, commit and
//! converge; then every node restarts and must come back the same.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use node::cluster::state::{Command, Outcome};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{self, MembershipChange, Reply};
use super::model::{node_record, Model, Pending};
use super::network::{CutMode, Faults, Net, NodeId};
use super::node::{config, SimNode, SnapshotSettings};

mod liveness;

/// Steps of the safety phase at most.
const SAFETY_STEPS_MAX: u64 = 150;
/// Simulated time the safety phase may take at most.
const SAFETY_TIME_MAX: Duration = Duration::from_secs(60);
/// Simulated time between two steps at most.
const STEP_PAUSE_MS_MAX: u64 = 300;
/// Simulated time the cluster has to recover once faults heal.
const LIVENESS_TIME_MAX: Duration = Duration::from_secs(90);
/// Simulated time formation may take.
const FORMATION_TIME_MAX: Duration = Duration::from_secs(30);
/// Proposals in flight at once at most.
const CLIENTS_MAX: usize = 6;
/// Nodes in the cluster at most (it starts with 3).
const NODES_MAX: NodeId = 5;
const FIRST_NODES: NodeId = 3;
/// Trace lines shown with a failure.
const TRACE_TAIL_LINES: usize = 40;
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What a run did, for the summary line and the determinism check.
pub struct Summary {
    pub line: String,
    pub trace: Vec<String>,
}

pub struct Sim {
    seed: u64,
    rng: StdRng,
    net: Arc<Net>,
    /// Holds every node's directory until the run ends.
    root: tempfile::TempDir,
    nodes: BTreeMap<NodeId, SimNode>,
    snapshots: SnapshotSettings,
    model: Model,
    clients: JoinSet<(Pending, Reply)>,
    membership: JoinSet<Result<(), String>>,
    trace: Vec<String>,
    started: Instant,
    crashes: u64,
    partitions: u64,
    probes: u64,
}

/// A directory for the nodes' stores: tmpfs if there is one (fsyncs are free there).
fn scratch_dir(seed: u64) -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    let prefix = format!("ballast-sim-{seed}-");
    builder.prefix(&prefix);
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return dir;
        }
    }
    builder.tempdir().expect("a temporary directory")
}

/// Runs seed `seed` to the end; an error names the broken property.
pub async fn run(seed: u64) -> Result<Summary, String> {
    let mut sim = Sim::form(seed)
        .await
        .map_err(|error| format!("seed={seed}: formation: {error}"))?;
    let result = sim.phases().await;
    let summary = sim.summary();
    sim.stop_all().await;
    match result {
        Ok(()) => Ok(summary),
        Err(error) => {
            let tail = summary.trace.len().saturating_sub(TRACE_TAIL_LINES);
            Err(format!(
                "seed={seed}: {error}\n{}\nlast events:\n{}",
                summary.line,
                summary.trace[tail..].join("\n")
            ))
        }
    }
}

impl Sim {
    async fn form(seed: u64) -> Result<Self, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let net = Net::new(StdRng::seed_from_u64(rng.gen()), Faults::calm());
        let snapshots = if rng.gen_bool(0.5) {
            SnapshotSettings::NODE
        } else {
            // Short enough that snapshots are built, sent and installed within a run.
            SnapshotSettings {
                logs_since_last: rng.gen_range(5..=40),
                logs_kept: rng.gen_range(0..=5),
            }
        };
        let first = node_record(1, 0);
        let mut sim = Self {
            seed,
            rng,
            net,
            root: scratch_dir(seed),
            nodes: BTreeMap::new(),
            snapshots,
            model: Model::new(first.clone(), 0),
            clients: JoinSet::new(),
            membership: JoinSet::new(),
            trace: Vec::new(),
            started: Instant::now(),
            crashes: 0,
            partitions: 0,
            probes: 0,
        };
        sim.note(format!("seed {seed}, snapshots {snapshots:?}"));
        for id in 1..=FIRST_NODES {
            sim.add_node(id).await?;
        }
        let raft = sim.nodes[&1].raft().expect("running").clone();
        raft.initialize(BTreeMap::from([(1, client::sim_node(1))]))
            .await
            .map_err(|error| format!("initialize: {error}"))?;
        sim.wait_for_leader(FORMATION_TIME_MAX).await?;
        let init = Command::Init {
            cluster_id: uuid::Uuid::from_u64_pair(seed, 0xba11a57),
            node: first.clone(),
        };
        let Reply::Committed { log_id, outcome } = client::propose(Arc::clone(&sim.net), vec![1], init).await else {
            return Err("Init did not commit on a healthy single node".into());
        };
        if outcome != Outcome::Done {
            return Err(format!("Init answered {outcome:?}"));
        }
        sim.model = Model::new(first, log_id.index);
        for id in 2..=FIRST_NODES {
            sim.join(id).await?;
        }
        sim.note("formed".into());
        Ok(sim)
    }

    /// Adds `id` as `cluster::join` does: its record, then learner, then voter.
    async fn join(&mut self, id: NodeId) -> Result<(), String> {
        let record = node_record(id, 0);
        let command = Command::AddNode { node: record.clone() };
        let candidates = self.candidates();
        let reply = client::propose(Arc::clone(&self.net), candidates.clone(), command).await;
        if !matches!(reply, Reply::Committed { .. }) {
            return Err(format!("AddNode {id} during formation: {reply:?}"));
        }
        self.model.on_reply(Pending::Node { record }, &reply)?;
        for change in [MembershipChange::AddLearner(id), MembershipChange::Promote(id)] {
            client::change_membership(Arc::clone(&self.net), candidates.clone(), change)
                .await
                .map_err(|error| format!("formation: {error}"))?;
        }
        Ok(())
    }

    async fn phases(&mut self) -> Result<(), String> {
        self.safety_phase().await?;
        self.liveness_phase().await?;
        let converged = self.check_converged()?;
        self.restart_all(&converged).await?;
        self.recover(LIVENESS_TIME_MAX).await?;
        let again = self.check_converged()?;
        if again.volumes != converged.volumes || again.nodes != converged.nodes {
            return Err("volumes or nodes changed across a restart of every node".into());
        }
        Ok(())
    }

    fn note(&mut self, event: String) {
        let elapsed_ms = self.started.elapsed().as_millis();
        self.trace.push(format!("{elapsed_ms:>7} {event}"));
    }

    /// Every node ever started, in a seeded order (a client's list of nodes to try).
    fn candidates(&mut self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids.shuffle(&mut self.rng);
        ids
    }

    async fn add_node(&mut self, id: NodeId) -> Result<(), String> {
        let mut node = SimNode::new(id, self.root.path().join(format!("node-{id}")));
        node.start(&self.net, config(&mut self.rng, self.snapshots)).await?;
        self.nodes.insert(id, node);
        Ok(())
    }

    async fn safety_phase(&mut self) -> Result<(), String> {
        let faults = self.random_faults();
        self.net.set_faults(faults);
        for step in 0..SAFETY_STEPS_MAX {
            if self.started.elapsed() > SAFETY_TIME_MAX {
                self.note(format!("safety phase ends on time at step {step}"));
                break;
            }
            self.collect_replies()?;
            self.check_invariants()?;
            match self.rng.gen_range(0..100) {
                0..=54 => self.spawn_proposal(),
                55..=61 => self.crash_one().await?,
                62..=71 => self.restart_one().await?,
                72..=77 => self.partition(),
                78..=82 => {
                    let mut faults = self.net.faults();
                    faults.cuts.clear();
                    self.net.set_faults(faults);
                    self.note("heal cuts".into());
                }
                83..=86 => {
                    let faults = self.random_faults();
                    self.net.set_faults(faults);
                }
                87..=93 => self.membership_step().await?,
                _ => {}
            }
            let pause_ms = self.rng.gen_range(1..=STEP_PAUSE_MS_MAX);
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            self.sample()?;
        }
        Ok(())
    }

    fn random_faults(&mut self) -> Faults {
        let rng = &mut self.rng;
        let faults = Faults {
            cuts: self.net.faults().cuts,
            loss_per_mille: *[0, 0, 10, 50, 150].choose(rng).expect("not empty"),
            duplicate_per_mille: *[0, 20, 100].choose(rng).expect("not empty"),
            delay_ms_max: *[1, 5, 20, 60].choose(rng).expect("not empty"),
            spike_per_mille: *[0, 10, 50].choose(rng).expect("not empty"),
            spike_ms_max: *[300, 1500, 4000].choose(rng).expect("not empty"),
        };
        let line = format!(
            "faults: loss {}‰ dup {}‰ delay ≤{} ms spikes {}‰ ≤{} ms",
            faults.loss_per_mille,
            faults.duplicate_per_mille,
            faults.delay_ms_max,
            faults.spike_per_mille,
            faults.spike_ms_max
        );
        self.note(line);
        faults
    }

    fn spawn_proposal(&mut self) {
        if self.clients.len() >= CLIENTS_MAX {
            return;
        }
        let Some((command, pending)) = self.model.next(&mut self.rng) else {
            return;
        };
        let candidates = self.candidates();
        self.note(format!("propose to {candidates:?}: {pending:?}"));
        let net = Arc::clone(&self.net);
        self.clients.spawn(async move {
            let reply = client::propose(net, candidates, command).await;
            (pending, reply)
        });
    }

    fn collect_replies(&mut self) -> Result<(), String> {
        while let Some(joined) = self.clients.try_join_next() {
            let (pending, reply) = joined.map_err(|error| format!("client task failed: {error}"))?;
            self.on_reply(pending, &reply)?;
        }
        while let Some(joined) = self.membership.try_join_next() {
            let result = joined.map_err(|error| format!("membership task failed: {error}"))?;
            self.note(format!("membership change: {result:?}"));
        }
        Ok(())
    }

    fn on_reply(&mut self, pending: Pending, reply: &Reply) -> Result<(), String> {
        let brief = match reply {
            Reply::Committed { log_id, outcome } => format!("committed at {log_id}: {outcome:?}"),
            Reply::NotApplied(why) => format!("not applied: {why}"),
            Reply::Unknown(why) => format!("unknown: {why}"),
        };
        self.note(format!("reply {pending:?} -> {brief}"));
        self.model.on_reply(pending, reply)
    }

    async fn crash_one(&mut self) -> Result<(), String> {
        let running: Vec<NodeId> = self.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect();
        // Keep a majority up most of the time; now and then take it down too.
        let majority = self.nodes.len() / 2 + 1;
        if running.len() <= 1 || (running.len() <= majority && self.rng.gen_range(0..4) != 0) {
            return Ok(());
        }
        let id = *running.choose(&mut self.rng).expect("not empty");
        self.note(format!("crash node {id}"));
        self.crashes += 1;
        let node = self.nodes.get_mut(&id).expect("exists");
        node.crash(&self.net).await
    }

    async fn restart_one(&mut self) -> Result<(), String> {
        let down: Vec<NodeId> = self.nodes.values().filter(|n| !n.is_running()).map(|n| n.id).collect();
        let Some(id) = down.choose(&mut self.rng).copied() else {
            return Ok(());
        };
        self.note(format!("restart node {id}"));
        let config = config(&mut self.rng, self.snapshots);
        let node = self.nodes.get_mut(&id).expect("exists");
        node.start(&self.net, config).await
    }

    fn partition(&mut self) {
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids.shuffle(&mut self.rng);
        let mode = if self.rng.gen_bool(0.5) {
            CutMode::Refused
        } else {
            CutMode::Dropped
        };
        let mut faults = self.net.faults();
        let mut cut = |a: NodeId, b: NodeId| {
            faults.cuts.insert((a, b), mode);
        };
        let kind = self.rng.gen_range(0..10);
        let (left, right) = match kind {
            // Two sides, all links between them cut.
            0..=3 => {
                let at = self.rng.gen_range(1..ids.len());
                (ids[..at].to_vec(), ids[at..].to_vec())
            }
            // One node alone.
            4..=6 => (ids[..1].to_vec(), ids[1..].to_vec()),
            // One link, one way only.
            7..=8 => {
                cut(ids[0], ids[1]);
                (Vec::new(), Vec::new())
            }
            // One link both ways (the others still bridge it).
            _ => (ids[..1].to_vec(), ids[1..2].to_vec()),
        };
        for a in &left {
            for b in &right {
                cut(*a, *b);
                cut(*b, *a);
            }
        }
        self.partitions += 1;
        let line = format!("cut ({mode:?}): {:?}", faults.cuts.keys().collect::<Vec<_>>());
        self.net.set_faults(faults);
        self.note(line);
    }

    /// Grows the cluster (a new node joins) or moves a node between voter and learner.
    async fn membership_step(&mut self) -> Result<(), String> {
        if !self.membership.is_empty() {
            return Ok(());
        }
        let Some((voters, learners)) = self.nodes.values().find_map(|n| n.raft().map(client::roles)) else {
            return Ok(());
        };
        let next_id = NodeId::try_from(self.nodes.len()).expect("few nodes") + 1;
        let changes = if next_id <= NODES_MAX && self.rng.gen_bool(0.5) {
            self.add_node(next_id).await?;
            vec![
                MembershipChange::AddLearner(next_id),
                MembershipChange::Promote(next_id),
            ]
        } else if let Some(learner) = learners.iter().next() {
            vec![MembershipChange::Promote(*learner)]
        } else if voters.len() > 3 {
            let voters: Vec<NodeId> = voters.into_iter().collect();
            vec![MembershipChange::Demote(
                *voters.choose(&mut self.rng).expect("not empty"),
            )]
        } else {
            return Ok(());
        };
        self.note(format!("membership: {changes:?}"));
        let (net, candidates) = (Arc::clone(&self.net), self.candidates());
        self.membership.spawn(async move {
            for change in changes {
                client::change_membership(Arc::clone(&net), candidates.clone(), change).await?;
            }
            Ok(())
        });
        Ok(())
    }

    /// Reads every running node's metrics (leaders per term, stopped Rafts); fails on any panic.
    fn sample(&mut self) -> Result<(), String> {
        if super::panics() > 0 {
            return Err(format!(
                "{} panic(s) in the simulation (messages above)",
                super::panics()
            ));
        }
        for node in self.nodes.values() {
            let Some(metrics) = node.metrics() else { continue };
            if let Err(error) = &metrics.running_state {
                return Err(format!("node {}: raft stopped: {error}", node.id));
            }
            if metrics.state == openraft::ServerState::Leader {
                self.net
                    .with_observer(|observer| observer.on_leader_metrics(metrics.current_term, node.id));
            }
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), String> {
        let violations = self.net.with_observer(|observer| observer.violations.clone());
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations.join("\n"))
        }
    }

    async fn stop_all(&mut self) {
        self.clients.abort_all();
        self.membership.abort_all();
        for node in self.nodes.values_mut() {
            if node.is_running() {
                // The run's verdict is made; a node that will not stop cannot change it.
                let _ = node.crash(&self.net).await;
            }
        }
    }

    fn summary(&self) -> Summary {
        let stats = self.net.stats();
        let counts = self.model.counts;
        let several = self.net.with_observer(|observer| observer.terms_with_several_leaders());
        let line = format!(
            "seed={} nodes={} simulated={:.1}s proposals committed={} not_applied={} unknown={} crashes={} cuts={} \
             rpcs={} lost={} duplicated={} snapshots_sent={} terms_with_two_leaders={several}",
            self.seed,
            self.nodes.len(),
            self.started.elapsed().as_secs_f64(),
            counts.committed,
            counts.not_applied,
            counts.unknown,
            self.crashes,
            self.partitions,
            stats.delivered,
            stats.lost,
            stats.duplicated,
            stats.snapshots,
        );
        Summary {
            line,
            trace: self.trace.clone(),
        }
    }
}
