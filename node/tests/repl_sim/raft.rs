//! The metadata service: Raft modeled as one linearizable store holding the
//! real `ClusterState` and applying commands with its real `apply`. A node
//! reaches it or not ("cut off from the Raft majority"): a proposal from a
//! node cut off fails after `raft_timeout`; one whose proposer is cut off
//! while it commits is applied, but the proposer hears a failure (an
//! ambiguous outcome, as with a lost reply). A node learns the state only
//! while it reaches the service: a moment after each commit (if it runs
//! then) and at each reconciler pass.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use ::node::cluster::state::{ClusterState, Command, Outcome};

use super::Sim;

#[derive(Default)]
pub struct Raft {
    pub state: ClusterState,
    /// Nodes cut off from the Raft majority.
    pub cut: BTreeSet<u64>,
    pub commits: u64,
    /// The volume's in-sync set as each epoch left it (for the checker: a
    /// write every one of them confirmed is carried into later epochs).
    pub in_sync_at_end_of_epoch: BTreeMap<u64, BTreeSet<u64>>,
}

impl Raft {
    pub fn reaches(&self, node: u64) -> bool {
        !self.cut.contains(&node)
    }
}

/// Proposes `command` from `from` (0: an operator, always reaching Raft).
/// Err for a rejection or a time-out (like `Cluster::change`).
pub async fn change(sim: &Rc<Sim>, from: u64, command: Command) -> Result<Outcome, String> {
    let started = tokio::time::Instant::now();
    if from != 0 {
        super::node::wait_unpaused(sim, from).await;
    }
    let reaches = from == 0 || sim.raft.borrow().reaches(from);
    if !reaches {
        tokio::time::sleep_until(started + sim.config.raft_timeout).await;
        sim.log(format!("raft: {command:?} from node {from} timed out (cut off)"));
        return Err("raft proposal timed out".into());
    }
    tokio::time::sleep(sim.range_ms(1, 6)).await;
    let outcome = {
        let mut raft = sim.raft.borrow_mut();
        raft.commits += 1;
        let outcome = raft.state.apply(command.clone());
        if let Some(volume) = raft.state.volumes.get(super::node::VOLUME).cloned() {
            raft.in_sync_at_end_of_epoch
                .insert(volume.epoch, volume.in_sync.iter().copied().collect());
        }
        outcome
    };
    sim.log(format!("raft: {command:?} from node {from} -> {}", describe(&outcome)));
    for id in sim.node_ids() {
        if sim.node(id).up {
            super::spawn_on(sim, id, learn(Rc::clone(sim), id));
        }
    }
    let still_reaches = from == 0 || sim.raft.borrow().reaches(from);
    if !still_reaches {
        tokio::time::sleep_until(started + sim.config.raft_timeout).await;
        return Err("raft proposal outcome unknown (cut off while committing)".into());
    }
    match outcome {
        Outcome::Rejected(rejection) => Err(rejection.to_string()),
        outcome => Ok(outcome),
    }
}

/// Node `id` applies the committed state (a moment later, while it runs
/// and reaches the majority), then its reconciler runs.
async fn learn(sim: Rc<Sim>, id: u64) {
    tokio::time::sleep(sim.range_ms(0, 2)).await;
    super::node::wait_unpaused(&sim, id).await;
    if !sim.raft.borrow().reaches(id) {
        return;
    }
    let state = sim.raft.borrow().state.clone();
    let wake = {
        let mut node = sim.node(id);
        node.known = state;
        Rc::clone(&node.reconcile_wake)
    };
    wake.notify_one();
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Volume(volume) => format!(
            "epoch {} coordinator {} in sync {:?}",
            volume.epoch, volume.coordinator, volume.in_sync
        ),
        Outcome::Rejected(rejection) => format!("rejected: {rejection}"),
        Outcome::Done => "done".into(),
    }
}
