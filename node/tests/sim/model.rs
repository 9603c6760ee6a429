//! The workload and its model: what clients propose, what each committed
//! reply must say, and what the final state must hold given every reply.
//!
//! Operations on one volume name form a chain: the next one is proposed
//! only after the previous one was answered, so a committed reply fixes
//! the name's state. After an Unknown reply the chain stops, and the final
//! state may show the name with or without that last operation.

use std::collections::{BTreeMap, BTreeSet};

use node::cluster::state::{ClusterState, Command, NodeRecord, Outcome, Rejection, TokenRecord, TOKENS_MAX};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::client::Reply;
use super::network::NodeId;

/// Volume names the workload invents per run at most.
const NAMES_MAX: u64 = 400;
/// Node records the workload writes: 1-5 may run, 6 never does.
const RECORD_IDS_MAX: NodeId = 6;
/// In no replica set that is valid (never added).
const UNKNOWN_NODE: NodeId = 99;
const BLOCK_SIZE_BYTES: u32 = 4096;
const GIB: u64 = 1 << 30;

/// A node record as the workload writes it. Built from JSON so that fields
/// added to `NodeRecord` later with a serde default do not break the sim.
pub fn node_record(id: NodeId, version: u64) -> NodeRecord {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "name": format!("n{id}"),
        "peer_address": format!("sim-{id}"),
        "api_address": format!("sim-{id}:api-v{version}"),
        "nbd_address": format!("sim-{id}:nbd"),
        "labels": { "zone": format!("z{}", id % 3) },
        "admin": "active",
        "joined_unix_seconds": version,
    }))
    .expect("a valid node record")
}

/// What a name's volume must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Absent,
    /// `id` is unknown after a create whose reply was Unknown.
    Present {
        id: Option<u64>,
        size_bytes: u64,
        replica_nodes: Vec<NodeId>,
    },
}

#[derive(Clone, Debug)]
pub enum VolumeOp {
    Create {
        size_bytes: u64,
        replica_nodes: Vec<NodeId>,
    },
    Resize {
        size_bytes: u64,
    },
    Delete,
}

/// What the state machine must answer to an operation.
enum Answer {
    Volume(Expect),
    Exists,
    Missing,
    Invalid,
}

/// The answer to `op` on a name in state `now`, and the state after it.
fn step(now: &Expect, op: &VolumeOp) -> (Answer, Expect) {
    match (now, op) {
        (
            Expect::Absent,
            VolumeOp::Create {
                size_bytes,
                replica_nodes,
            },
        ) => {
            if replica_nodes.contains(&UNKNOWN_NODE) {
                return (Answer::Invalid, Expect::Absent);
            }
            let next = Expect::Present {
                id: None,
                size_bytes: *size_bytes,
                replica_nodes: replica_nodes.clone(),
            };
            (Answer::Volume(next.clone()), next)
        }
        (Expect::Present { .. }, VolumeOp::Create { .. }) => (Answer::Exists, now.clone()),
        (Expect::Absent, VolumeOp::Resize { .. } | VolumeOp::Delete) => (Answer::Missing, Expect::Absent),
        (
            Expect::Present {
                id,
                size_bytes,
                replica_nodes,
            },
            VolumeOp::Resize { size_bytes: new },
        ) => {
            if new < size_bytes {
                return (Answer::Invalid, now.clone());
            }
            let next = Expect::Present {
                id: *id,
                size_bytes: *new,
                replica_nodes: replica_nodes.clone(),
            };
            (Answer::Volume(next.clone()), next)
        }
        (Expect::Present { .. }, VolumeOp::Delete) => (Answer::Volume(now.clone()), Expect::Absent),
    }
}

fn matches(expect: &Expect, name: &str, actual: Option<&node::cluster::state::ClusterVolume>) -> bool {
    match (expect, actual) {
        (Expect::Absent, None) => true,
        (
            Expect::Present {
                id,
                size_bytes,
                replica_nodes,
            },
            Some(volume),
        ) => {
            id.is_none_or(|id| id == volume.id)
                && volume.name == name
                && volume.size_bytes == *size_bytes
                && &volume.replica_nodes == replica_nodes
                && volume.coordinator == replica_nodes[0]
                && volume.epoch == 1
                && volume.block_size_bytes == BLOCK_SIZE_BYTES
        }
        _ => false,
    }
}

struct Chain {
    now: Expect,
    /// After an Unknown reply: the state had that operation committed.
    alternative: Option<Expect>,
    busy: bool,
}

#[derive(Default)]
struct NodeHistory {
    /// Committed records by log index.
    committed: BTreeMap<u64, NodeRecord>,
    unknown: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenFate {
    Present,
    Absent,
    Either,
}

/// What a proposal was, for checking its reply.
#[derive(Clone, Debug)]
pub enum Pending {
    Volume { name: String, op: VolumeOp },
    Node { record: NodeRecord },
    Token { hash: String },
}

/// Replies per kind, for the summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub committed: u64,
    pub not_applied: u64,
    pub unknown: u64,
}

pub struct Model {
    chains: BTreeMap<String, Chain>,
    names_made: u64,
    nodes: BTreeMap<NodeId, NodeHistory>,
    /// Ids whose record is surely in the state (valid replica holders).
    members: BTreeSet<NodeId>,
    tokens: BTreeMap<String, TokenFate>,
    /// (log index, volume id) of every committed create.
    created: Vec<(u64, u64)>,
    /// Committed proposals by log index (two at one index would be a lost write).
    committed_at: BTreeMap<u64, String>,
    sequence: u64,
    pub counts: Counts,
}

impl Model {
    /// A model of a cluster whose `Init` of `first` committed at `index`.
    pub fn new(first: NodeRecord, index: u64) -> Self {
        let mut model = Self {
            chains: BTreeMap::new(),
            names_made: 0,
            nodes: BTreeMap::new(),
            members: BTreeSet::new(),
            tokens: BTreeMap::new(),
            created: Vec::new(),
            committed_at: BTreeMap::new(),
            sequence: 0,
            counts: Counts::default(),
        };
        model.members.insert(first.id);
        model.nodes.entry(first.id).or_default().committed.insert(index, first);
        model.committed_at.insert(index, "Init".into());
        model
    }

    /// The next proposal, or None if the workload has nothing to do now.
    pub fn next(&mut self, rng: &mut StdRng) -> Option<(Command, Pending)> {
        self.sequence += 1;
        let sequence = self.sequence;
        match rng.gen_range(0..100) {
            0..=64 => self.next_volume(rng),
            65..=82 => {
                let id = rng.gen_range(1..=RECORD_IDS_MAX);
                let record = node_record(id, sequence);
                let command = Command::AddNode { node: record.clone() };
                Some((command, Pending::Node { record }))
            }
            _ => {
                let hash = format!("token-{sequence}");
                let command = Command::CreateToken {
                    hash: hash.clone(),
                    // Never expires within a run: a token's presence depends on its reply alone.
                    record: TokenRecord {
                        expires_unix_seconds: u64::MAX,
                    },
                    now_unix_seconds: 1,
                };
                Some((command, Pending::Token { hash }))
            }
        }
    }

    fn next_volume(&mut self, rng: &mut StdRng) -> Option<(Command, Pending)> {
        let idle: Vec<&String> = self
            .chains
            .iter()
            .filter(|(_, chain)| !chain.busy && chain.alternative.is_none())
            .map(|(name, _)| name)
            .collect();
        let fresh = idle.is_empty() || rng.gen_range(0..100) < 30;
        let name = if fresh {
            if self.names_made >= NAMES_MAX {
                return None;
            }
            self.names_made += 1;
            let name = format!("vol-{}", self.names_made);
            self.chains.insert(
                name.clone(),
                Chain {
                    now: Expect::Absent,
                    alternative: None,
                    busy: false,
                },
            );
            name
        } else {
            (*idle.choose(rng).expect("not empty")).clone()
        };
        let chain = self.chains.get_mut(&name).expect("chain exists");
        let op = match (&chain.now, rng.gen_range(0..100)) {
            (Expect::Absent, 0..=4) => VolumeOp::Delete,
            (Expect::Absent, 5..=9) => VolumeOp::Resize { size_bytes: GIB },
            (Expect::Absent, _) => {
                let members: Vec<NodeId> = self.members.iter().copied().collect();
                let count = rng.gen_range(1..=members.len().min(3));
                let mut replica_nodes: Vec<NodeId> = members.choose_multiple(rng, count).copied().collect();
                if rng.gen_range(0..100) < 5 {
                    replica_nodes.push(UNKNOWN_NODE);
                }
                VolumeOp::Create {
                    size_bytes: GIB * rng.gen_range(1..=4),
                    replica_nodes,
                }
            }
            (Expect::Present { size_bytes, .. }, roll) => match roll {
                0..=34 => VolumeOp::Resize {
                    size_bytes: size_bytes + GIB * rng.gen_range(0..=2),
                },
                35..=44 => VolumeOp::Resize {
                    size_bytes: size_bytes.saturating_sub(GIB).max(1),
                },
                45..=59 => VolumeOp::Create {
                    size_bytes: GIB,
                    replica_nodes: vec![1],
                },
                _ => VolumeOp::Delete,
            },
        };
        chain.busy = true;
        let command = match &op {
            VolumeOp::Create {
                size_bytes,
                replica_nodes,
            } => Command::CreateVolume {
                name: name.clone(),
                size_bytes: *size_bytes,
                block_size_bytes: BLOCK_SIZE_BYTES,
                replica_nodes: replica_nodes.clone(),
                created_unix_seconds: self.sequence,
                encryption: None,
            },
            VolumeOp::Resize { size_bytes } => Command::ResizeVolume {
                name: name.clone(),
                size_bytes: *size_bytes,
                allow_shrink: false,
            },
            VolumeOp::Delete => Command::DeleteVolume { name: name.clone() },
        };
        Some((command, Pending::Volume { name, op }))
    }

    /// Takes in a reply; an error is a safety violation.
    pub fn on_reply(&mut self, pending: Pending, reply: &Reply) -> Result<(), String> {
        match reply {
            Reply::Committed { log_id, .. } => {
                self.counts.committed += 1;
                if let Some(other) = self.committed_at.insert(log_id.index, format!("{pending:?}")) {
                    return Err(format!(
                        "two proposals acknowledged at log index {}: {other} and {pending:?}",
                        log_id.index
                    ));
                }
            }
            Reply::NotApplied(_) => self.counts.not_applied += 1,
            Reply::Unknown(_) => self.counts.unknown += 1,
        }
        match pending {
            Pending::Volume { name, op } => self.on_volume_reply(&name, &op, reply),
            Pending::Node { record } => {
                let history = self.nodes.entry(record.id).or_default();
                match reply {
                    Reply::Committed { log_id, outcome } => {
                        if *outcome != Outcome::Done {
                            return Err(format!("AddNode {} answered {outcome:?}", record.id));
                        }
                        history.committed.insert(log_id.index, record.clone());
                        self.members.insert(record.id);
                    }
                    Reply::NotApplied(_) => {}
                    Reply::Unknown(_) => history.unknown = true,
                }
                Ok(())
            }
            Pending::Token { hash } => {
                let fate = match reply {
                    Reply::Committed {
                        outcome: Outcome::Done, ..
                    } => TokenFate::Present,
                    Reply::Committed {
                        outcome: Outcome::Rejected(Rejection::Invalid(_)),
                        ..
                    } => TokenFate::Absent,
                    Reply::Committed { outcome, .. } => return Err(format!("CreateToken {hash} answered {outcome:?}")),
                    Reply::NotApplied(_) => TokenFate::Absent,
                    Reply::Unknown(_) => TokenFate::Either,
                };
                self.tokens.insert(hash, fate);
                Ok(())
            }
        }
    }

    fn on_volume_reply(&mut self, name: &str, op: &VolumeOp, reply: &Reply) -> Result<(), String> {
        let chain = self.chains.get_mut(name).expect("a chain per proposed name");
        assert!(chain.busy, "reply for {name}, which had nothing in flight");
        chain.busy = false;
        let (answer, mut next) = step(&chain.now, op);
        let (log_id, outcome) = match reply {
            Reply::NotApplied(_) => return Ok(()),
            Reply::Unknown(_) => {
                chain.alternative = Some(next);
                return Ok(());
            }
            Reply::Committed { log_id, outcome } => (log_id, outcome),
        };
        let as_expected = match (&answer, outcome) {
            (Answer::Volume(expect), Outcome::Volume(volume)) => matches(expect, name, Some(volume)),
            (Answer::Exists, Outcome::Rejected(Rejection::Exists(_)))
            | (Answer::Missing, Outcome::Rejected(Rejection::Missing(_)))
            | (Answer::Invalid, Outcome::Rejected(Rejection::Invalid(_))) => true,
            _ => false,
        };
        if !as_expected {
            return Err(format!(
                "volume {name}: {op:?} on {:?} committed at {log_id} answered {outcome:?}",
                chain.now
            ));
        }
        if let (VolumeOp::Create { .. }, Outcome::Volume(volume)) = (op, outcome) {
            self.created.push((log_id.index, volume.id));
            next = Expect::Present {
                id: Some(volume.id),
                size_bytes: volume.size_bytes,
                replica_nodes: volume.replica_nodes.clone(),
            };
        }
        chain.now = next;
        Ok(())
    }

    /// Whether a reply is still owed for some volume name.
    pub fn busy_names(&self) -> usize {
        self.chains.values().filter(|chain| chain.busy).count()
    }

    /// Checks the final (converged) state against every reply.
    pub fn check_final(&self, state: &ClusterState) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, chain) in &self.chains {
            let actual = state.volumes.get(name);
            let allowed = matches(&chain.now, name, actual)
                || chain
                    .alternative
                    .as_ref()
                    .is_some_and(|other| matches(other, name, actual));
            if !allowed {
                errors.push(format!(
                    "volume {name}: final {actual:?}, expected {:?} (or {:?})",
                    chain.now, chain.alternative
                ));
            }
        }
        for name in state.volumes.keys() {
            if !self.chains.contains_key(name) {
                errors.push(format!("volume {name} was never proposed"));
            }
        }
        errors.extend(self.check_volume_ids(state));
        errors.extend(self.check_nodes(state));
        errors.extend(self.check_tokens(state));
        errors
    }

    fn check_volume_ids(&self, state: &ClusterState) -> Vec<String> {
        let mut errors = Vec::new();
        let mut created = self.created.clone();
        created.sort_unstable();
        for pair in created.windows(2) {
            if pair[1].1 <= pair[0].1 {
                errors.push(format!(
                    "volume id {} (log index {}) not above id {} (log index {}): ids reused or reordered",
                    pair[1].1, pair[1].0, pair[0].1, pair[0].0
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for volume in state.volumes.values() {
            if !ids.insert(volume.id) {
                errors.push(format!("volume id {} held by two volumes", volume.id));
            }
            if volume.id >= state.next_volume_id {
                errors.push(format!(
                    "volume {} has id {} but the next id is {}",
                    volume.name, volume.id, state.next_volume_id
                ));
            }
        }
        errors
    }

    fn check_nodes(&self, state: &ClusterState) -> Vec<String> {
        let mut errors = Vec::new();
        for (id, history) in &self.nodes {
            let Some((_, latest)) = history.committed.last_key_value() else {
                continue;
            };
            match state.nodes.get(id) {
                None => errors.push(format!("node record {id} was committed but is missing")),
                Some(record) if !history.unknown && record != latest => {
                    errors.push(format!("node record {id}: final {record:?}, last committed {latest:?}"));
                }
                Some(_) => {}
            }
        }
        for id in state.nodes.keys() {
            if !self.nodes.contains_key(id) {
                errors.push(format!("node record {id} was never proposed"));
            }
        }
        errors
    }

    fn check_tokens(&self, state: &ClusterState) -> Vec<String> {
        let mut errors = Vec::new();
        for (hash, fate) in &self.tokens {
            let present = state.tokens.contains_key(hash);
            let allowed = match fate {
                TokenFate::Present => present,
                TokenFate::Absent => !present,
                TokenFate::Either => true,
            };
            if !allowed {
                errors.push(format!("token {hash}: present={present}, expected {fate:?}"));
            }
        }
        for hash in state.tokens.keys() {
            if !self.tokens.contains_key(hash) {
                errors.push(format!("token {hash} was never proposed"));
            }
        }
        if state.tokens.len() > TOKENS_MAX {
            errors.push(format!("{} tokens, at most {TOKENS_MAX} allowed", state.tokens.len()));
        }
        errors
    }
}
