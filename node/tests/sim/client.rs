//! Clients of the simulated cluster: proposals that follow ForwardToLeader
//! hints (bounded hops, bounded wait per try), and membership changes made
//! the way `cluster::join` makes them (learner first, then voter).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use node::cluster::state::{Command, Outcome};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, LogId, ServerState};

use super::network::{Net, NodeId, SimRaft};

/// Tries of one request at most (a hop to a hinted leader counts as one).
const HOPS_MAX: usize = 40;
/// Longest a proposal waits on one node for its commit.
const PROPOSAL_TRY_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a membership change waits on one node (a learner must catch up).
const MEMBERSHIP_TRY_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A client gives up after this long, as `Cluster::propose` does.
const PATIENCE: Duration = node::cluster::PROPOSE_TIMEOUT;

/// What a client learned about its proposal.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per simulated proposal
pub enum Reply {
    Committed {
        log_id: LogId<NodeId>,
        outcome: Outcome,
    },
    /// In no log: every node tried refused it without appending it.
    NotApplied(String),
    /// May or may not commit (time-out, node stopped, leader deposed while holding it).
    Unknown(String),
}

/// A node's term and whether it leads, from its metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Role {
    term: u64,
    leader: bool,
}

impl Role {
    fn of(raft: &SimRaft) -> Self {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        Self {
            term: metrics.current_term,
            leader: metrics.state == ServerState::Leader,
        }
    }
}

/// Where to go next: the hinted leader, else the next node on the list.
struct Route {
    candidates: Vec<NodeId>,
    position: usize,
    backoff: Duration,
}

impl Route {
    fn new(candidates: Vec<NodeId>) -> Self {
        assert!(!candidates.is_empty(), "a client needs a node to talk to");
        Self {
            candidates,
            position: 0,
            backoff: BACKOFF_MIN,
        }
    }

    fn first(&self) -> NodeId {
        self.candidates[0]
    }

    /// Follows `hint` at once; without one, waits and tries the next node.
    async fn next(&mut self, current: NodeId, hint: Option<NodeId>) -> NodeId {
        if let Some(leader) = hint.filter(|leader| *leader != current) {
            return leader;
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.position = (self.position + 1) % self.candidates.len();
        self.candidates[self.position]
    }
}

/// Proposes `command`, first to `candidates[0]`.
///
/// A ForwardToLeader answer is "not appended" only if the node neither
/// led nor changed term around the call: openraft also answers it to
/// proposals a deposed leader had appended and then truncated, and such
/// an entry may still be committed by a later leader that holds a copy.
pub async fn propose(net: Arc<Net>, candidates: Vec<NodeId>, command: Command) -> Reply {
    let mut route = Route::new(candidates);
    let mut target = route.first();
    let mut last_error = String::from("no node tried");
    let started = tokio::time::Instant::now();
    for _ in 0..HOPS_MAX {
        if started.elapsed() > PATIENCE {
            break;
        }
        let Some(raft) = net.raft(target) else {
            last_error = format!("node {target} is down");
            target = route.next(target, None).await;
            continue;
        };
        let before = Role::of(&raft);
        let result = tokio::time::timeout(PROPOSAL_TRY_TIMEOUT, raft.client_write(command.clone())).await;
        match result {
            Err(_) => return Reply::Unknown(format!("node {target}: no commit within {PROPOSAL_TRY_TIMEOUT:?}")),
            Ok(Ok(response)) => {
                net.with_observer(|observer| observer.on_committed_reply(response.log_id));
                return Reply::Committed {
                    log_id: response.log_id,
                    outcome: response.data,
                };
            }
            Ok(Err(RaftError::Fatal(error))) => return Reply::Unknown(format!("node {target} stopped: {error}")),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                // Let the node publish the metrics of what it just did.
                tokio::time::sleep(Duration::from_millis(1)).await;
                let after = Role::of(&raft);
                if before.leader || after.leader || before.term != after.term {
                    return Reply::Unknown(format!("node {target} answered ForwardToLeader around a leader change"));
                }
                last_error = format!("node {target} does not lead");
                target = route.next(target, forward.leader_id).await;
            }
            Ok(Err(RaftError::APIError(error))) => return Reply::Unknown(format!("node {target}: {error}")),
        }
    }
    Reply::NotApplied(format!("gave up: {last_error}"))
}

/// A change of the Raft membership.
#[derive(Clone, Copy, Debug)]
pub enum MembershipChange {
    AddLearner(NodeId),
    Promote(NodeId),
    Demote(NodeId),
}

pub fn sim_node(id: NodeId) -> BasicNode {
    BasicNode::new(format!("sim-{id}"))
}

/// Makes `change` on the leader (found through the hints).
pub async fn change_membership(net: Arc<Net>, candidates: Vec<NodeId>, change: MembershipChange) -> Result<(), String> {
    let mut route = Route::new(candidates);
    let mut target = route.first();
    let mut last_error = String::from("no node tried");
    let started = tokio::time::Instant::now();
    for _ in 0..HOPS_MAX {
        if started.elapsed() > PATIENCE {
            break;
        }
        let Some(raft) = net.raft(target) else {
            last_error = format!("node {target} is down");
            target = route.next(target, None).await;
            continue;
        };
        let call = async {
            match change {
                MembershipChange::AddLearner(id) => raft.add_learner(id, sim_node(id), true).await,
                MembershipChange::Promote(id) => {
                    let ids = BTreeSet::from([id]);
                    raft.change_membership(ChangeMembers::AddVoterIds(ids), false).await
                }
                MembershipChange::Demote(id) => {
                    let ids = BTreeSet::from([id]);
                    raft.change_membership(ChangeMembers::RemoveVoters(ids), true).await
                }
            }
        };
        match tokio::time::timeout(MEMBERSHIP_TRY_TIMEOUT, call).await {
            Err(_) => return Err(format!("{change:?} on node {target}: timed out")),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                last_error = format!("node {target} does not lead");
                target = route.next(target, forward.leader_id).await;
            }
            // An uninitialized or lagging node may refuse instead of forwarding.
            Ok(Err(error)) => {
                last_error = format!("node {target}: {error}");
                target = route.next(target, None).await;
            }
        }
    }
    Err(format!("{change:?}: gave up: {last_error}"))
}

/// Voters and learners as `raft` last applied them.
pub fn roles(raft: &SimRaft) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let membership = metrics.membership_config.membership();
    (membership.voter_ids().collect(), membership.learner_ids().collect())
}

/// The members `raft` knows (voters and learners) and their addresses.
pub fn members(raft: &SimRaft) -> BTreeMap<NodeId, BasicNode> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| (*id, node.clone()))
        .collect()
}
