//! What leaders put on the wire, checked as it passes: a log id names one
//! entry (Log Matching), an entry once committed at an index is the only
//! one ever committed there, and who led which term.
//!
//! openraft 0.9 (without its `single-term-leader` feature) identifies a
//! leader by (term, node id) and may elect two nodes, one after the other,
//! in the same term; so "one leader per term" is not an invariant of this
//! Raft. What it protects, one committed entry per index, is checked here
//! directly; the leaders seen per term are counted for the report.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use node::cluster::TypeConfig;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
use openraft::{EntryPayload, LogId, Vote};

use super::network::NodeId;

/// Violations go to a list (RPCs run in tasks whose panics tokio would swallow).
#[derive(Default)]
pub struct Observer {
    /// Payload hash of every log id seen.
    entries: BTreeMap<LogId<NodeId>, u64>,
    /// The committed log id at each index, as leaders and clients were told.
    committed: BTreeMap<u64, LogId<NodeId>>,
    /// Leaders seen per term (on the wire and in metrics).
    pub leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    pub violations: Vec<String>,
}

fn payload_hash(payload: &EntryPayload<TypeConfig>) -> u64 {
    let bytes = serde_json::to_vec(payload).expect("entries serialize");
    // DefaultHasher::new() has fixed keys: the same bytes hash alike in every run.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Observer {
    pub fn on_append(&mut self, from: NodeId, rpc: &AppendEntriesRequest<TypeConfig>) {
        self.sender_leads(from, &rpc.vote, "AppendEntries");
        for entry in &rpc.entries {
            let hash = payload_hash(&entry.payload);
            match self.entries.insert(entry.log_id, hash) {
                Some(seen) if seen != hash => self.violations.push(format!(
                    "log matching: node {from} sent {} with a payload other than the one seen before",
                    entry.log_id
                )),
                _ => {}
            }
        }
        let Some(commit) = rpc.leader_commit else { return };
        // Everything in the leader's log up to its commit index is committed.
        let claimed = rpc
            .prev_log_id
            .iter()
            .chain(rpc.entries.iter().map(|entry| &entry.log_id));
        let claimed: Vec<LogId<NodeId>> = claimed.filter(|id| id.index <= commit.index).copied().collect();
        for log_id in claimed {
            self.committed_at(log_id, &format!("node {from}'s AppendEntries"));
        }
    }

    pub fn on_snapshot(&mut self, from: NodeId, rpc: &InstallSnapshotRequest<TypeConfig>) {
        self.sender_leads(from, &rpc.vote, "InstallSnapshot");
        if let Some(last) = rpc.meta.last_log_id {
            self.committed_at(last, &format!("node {from}'s snapshot"));
        }
    }

    /// A client was told `log_id` committed.
    pub fn on_committed_reply(&mut self, log_id: LogId<NodeId>) {
        self.committed_at(log_id, "a client's reply");
    }

    /// `node` reported itself leader of `term` in its metrics.
    pub fn on_leader_metrics(&mut self, term: u64, node: NodeId) {
        self.leaders.entry(term).or_default().insert(node);
    }

    /// Terms in which more than one node led (legal in openraft 0.9, see above).
    pub fn terms_with_several_leaders(&self) -> usize {
        self.leaders.values().filter(|leaders| leaders.len() > 1).count()
    }

    fn sender_leads(&mut self, from: NodeId, vote: &Vote<NodeId>, what: &str) {
        if vote.leader_id().voted_for() != Some(from) || !vote.is_committed() {
            self.violations
                .push(format!("node {from} sent {what} without leading: vote {vote}"));
            return;
        }
        self.leaders.entry(vote.leader_id().term).or_default().insert(from);
    }

    fn committed_at(&mut self, log_id: LogId<NodeId>, source: &str) {
        match self.committed.insert(log_id.index, log_id) {
            Some(before) if before != log_id => self.violations.push(format!(
                "two entries committed at index {}: {before} and {log_id} (from {source})",
                log_id.index
            )),
            _ => {}
        }
    }
}
