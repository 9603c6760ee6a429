//! Forming a cluster: `init` on the first node, join tokens, and `join`
//! (the new node asks a member over the peer protocol; the leader checks
//! the token, records the node, adds it as a learner and, while there are
//! fewer than `VOTERS_MAX` voters, promotes it).
//!
//! A token is `BLT1.<cluster id>.<secret>`; only the SHA-256 of the secret
//! is replicated, and it expires.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::state::{Command, NodeAdmin, NodeRecord, TokenRecord, VOTERS_MAX};
use super::{Cluster, ClusterError};
use crate::datadir::now_unix_seconds;
use crate::peer::frame::FrameKind;

/// Longest a join waits for the leader to bring the new node up to date.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default life of a join token.
pub const TOKEN_TTL_SECONDS_DEFAULT: u64 = 3600;
/// Longest life of a join token.
pub const TOKEN_TTL_SECONDS_MAX: u64 = 7 * 24 * 3600;
const TOKEN_PREFIX: &str = "BLT1";

/// A join request (peer payload).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub node: NodeRecord,
}

/// The answer to a join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub cluster_id: uuid::Uuid,
    pub leader: u64,
    pub voter: bool,
}

/// A fresh token and when it expires.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewToken {
    pub token: String,
    pub expires_unix_seconds: u64,
}

fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits a token into its cluster id and secret.
pub fn parse_token(token: &str) -> Result<(uuid::Uuid, String), ClusterError> {
    let bad = || {
        ClusterError::Invalid(
            "malformed join token: expected BLT1.<cluster id>.<secret> as printed by `ballast cluster token create`"
                .into(),
        )
    };
    let mut parts = token.trim().split('.');
    let (Some(prefix), Some(cluster), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if prefix != TOKEN_PREFIX || secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let cluster_id = uuid::Uuid::parse_str(cluster).map_err(|_| bad())?;
    Ok((cluster_id, secret.to_owned()))
}

impl Cluster {
    /// Makes this node the first member of a new cluster.
    pub async fn init(&self) -> Result<uuid::Uuid, ClusterError> {
        if let Some(existing) = self.cluster_id() {
            return Err(ClusterError::AlreadyMember(existing));
        }
        let cluster_id = uuid::Uuid::new_v4();
        self.set_cluster_id(Some(cluster_id))?;
        let members = BTreeMap::from([(self.local.id, BasicNode::new(&self.local.peer_address))]);
        if let Err(error) = self.raft.initialize(members).await {
            self.set_cluster_id(None)?;
            return Err(ClusterError::Internal(format!("cannot initialize raft: {error}")));
        }
        self.change(Command::Init {
            cluster_id,
            node: self.local.record(NodeAdmin::Active),
        })
        .await?;
        tracing::info!(%cluster_id, node = self.local.id, "cluster initialized");
        Ok(cluster_id)
    }

    /// A join token valid for `ttl_seconds`.
    pub async fn create_token(&self, ttl_seconds: u64) -> Result<NewToken, ClusterError> {
        let cluster_id = self.require_member()?;
        if ttl_seconds == 0 || ttl_seconds > TOKEN_TTL_SECONDS_MAX {
            return Err(ClusterError::Invalid(format!(
                "token lifetime must be 1 s to {TOKEN_TTL_SECONDS_MAX} s (7 days)"
            )));
        }
        let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let now = now_unix_seconds();
        let expires_unix_seconds = now + ttl_seconds;
        self.change(Command::CreateToken {
            hash: hash_secret(&secret),
            record: TokenRecord { expires_unix_seconds },
            now_unix_seconds: now,
        })
        .await?;
        Ok(NewToken {
            token: format!("{TOKEN_PREFIX}.{}.{secret}", cluster_id.simple()),
            expires_unix_seconds,
        })
    }

    /// Joins the cluster of `token` through the member at `seed` (peer address).
    pub async fn join(&self, seed: &str, token: &str, has_volumes: bool) -> Result<JoinReply, ClusterError> {
        if let Some(existing) = self.cluster_id() {
            return Err(ClusterError::AlreadyMember(existing));
        }
        if has_volumes {
            return Err(ClusterError::Invalid(
                "this node has volumes of its own; only an empty node can join a cluster".into(),
            ));
        }
        let (cluster_id, _) = parse_token(token)?;
        // Raft traffic from the leader is admitted only once we know our cluster.
        self.set_cluster_id(Some(cluster_id))?;
        let request = JoinRequest {
            token: token.trim().to_owned(),
            node: self.local.record(NodeAdmin::Active),
        };
        let payload = serde_json::to_vec(&request).map_err(|e| ClusterError::Internal(e.to_string()))?;
        let reply = self.client.call(seed, FrameKind::Join, &payload, JOIN_TIMEOUT).await;
        let reply = match reply {
            Ok((FrameKind::JoinReply, bytes)) => serde_json::from_slice::<Result<JoinReply, String>>(&bytes)
                .map_err(|error| format!("unreadable join reply: {error}"))
                .and_then(|result| result),
            Ok((kind, _)) => Err(format!("unexpected answer {kind:?}")),
            Err(error) => Err(error.to_string()),
        };
        match reply {
            Ok(reply) => {
                self.wait_for_members(JOIN_TIMEOUT).await;
                tracing::info!(%cluster_id, leader = reply.leader, voter = reply.voter, "joined the cluster");
                Ok(reply)
            }
            Err(reason) => {
                let initialized = self.raft.is_initialized().await.unwrap_or(false);
                if !initialized {
                    self.set_cluster_id(None)?;
                }
                Err(ClusterError::JoinRefused(reason))
            }
        }
    }

    /// Waits until the replicated state lists this node (the leader's log reached us).
    async fn wait_for_members(&self, limit: Duration) {
        let mut applied = self.applied_watch();
        let _ = tokio::time::timeout(limit, async {
            while !self.with_state(|state| state.nodes.contains_key(&self.local.id)) {
                if applied.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Answers a join request: the leader decides; other members pass it on.
pub(super) async fn handle_join(cluster: &Cluster, payload: &[u8]) -> Result<Vec<u8>, String> {
    let request: JoinRequest =
        serde_json::from_slice(payload).map_err(|error| format!("unreadable join request: {error}"))?;
    let result = if cluster.is_leader() {
        admit(cluster, request).await
    } else {
        forward_join(cluster, payload).await
    };
    serde_json::to_vec(&result).map_err(|e| e.to_string())
}

async fn forward_join(cluster: &Cluster, payload: &[u8]) -> Result<JoinReply, String> {
    let leader = cluster
        .leader()
        .ok_or("the cluster has no leader right now; retry shortly")?;
    let address = cluster
        .with_state(|state| state.nodes.get(&leader).map(|node| node.peer_address.clone()))
        .ok_or("the leader is not in the node table yet; retry shortly")?;
    match cluster
        .client
        .call(&address, FrameKind::Join, payload, JOIN_TIMEOUT)
        .await
    {
        Ok((FrameKind::JoinReply, bytes)) => {
            serde_json::from_slice::<Result<JoinReply, String>>(&bytes).map_err(|e| e.to_string())?
        }
        Ok((kind, _)) => Err(format!("leader answered {kind:?}")),
        Err(error) => Err(format!("cannot reach the leader: {error}")),
    }
}

async fn admit(cluster: &Cluster, request: JoinRequest) -> Result<JoinReply, String> {
    let cluster_id = cluster.cluster_id().ok_or("this node is not in a cluster")?;
    let (token_cluster, secret) = parse_token(&request.token).map_err(|e| e.to_string())?;
    if token_cluster != cluster_id {
        return Err(format!(
            "the token is for cluster {token_cluster}, this is cluster {cluster_id}"
        ));
    }
    let now = now_unix_seconds();
    let token = cluster.with_state(|state| state.tokens.get(&hash_secret(&secret)).cloned());
    match token {
        None => return Err("unknown join token (create one with `ballast cluster token create`)".into()),
        Some(token) if token.expires_unix_seconds <= now => {
            return Err(format!(
                "the join token expired {} s ago; create a new one",
                now - token.expires_unix_seconds
            ))
        }
        Some(_) => {}
    }
    let id = request.node.id;
    if let Some(existing) = cluster.with_state(|state| state.nodes.get(&id).cloned()) {
        if existing.uuid != request.node.uuid {
            return Err(format!(
                "node id {id} is already taken by node {} ({}); re-create this node's data directory to get another id",
                existing.name, existing.peer_address
            ));
        }
    }
    tracing::info!(node = id, name = %request.node.name, peer = %request.node.peer_address, "admitting a node");
    cluster
        .change(Command::AddNode {
            node: request.node.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let (voters, learners) = cluster.roles();
    if !voters.contains(&id) && !learners.contains(&id) {
        cluster
            .raft
            .add_learner(id, BasicNode::new(&request.node.peer_address), true)
            .await
            .map_err(|error| format!("cannot add the node as a learner: {error}"))?;
    }
    let (voters, _) = cluster.roles();
    let voter = voters.contains(&id) || voters.len() < VOTERS_MAX;
    if !voters.contains(&id) && voter {
        cluster
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|error| format!("cannot make the node a voter: {error}"))?;
    }
    Ok(JoinReply {
        cluster_id,
        leader: cluster.local.id,
        voter,
    })
}

/// Keeps this node's record (addresses, labels) current after restarts.
pub(super) async fn refresh_own_record(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(current) = cluster.with_state(|state| state.nodes.get(&cluster.local.id).cloned()) else {
            continue;
        };
        let mut wanted = cluster.local.record(current.admin);
        wanted.joined_unix_seconds = current.joined_unix_seconds;
        if wanted == current {
            return;
        }
        tracing::info!("updating this node's addresses/labels in the cluster");
        if cluster.change(Command::AddNode { node: wanted }).await.is_ok() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_garbage_is_refused() {
        let cluster = uuid::Uuid::new_v4();
        let secret = "ab".repeat(32);
        let token = format!("BLT1.{}.{secret}", cluster.simple());
        assert_eq!(parse_token(&token).unwrap(), (cluster, secret));
        for bad in [
            "",
            "BLT1",
            "BLT1.x.y",
            &format!("BLT2.{}.{}", cluster.simple(), "ab".repeat(32)),
            &format!("BLT1.{}.short", cluster.simple()),
        ] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_hash_hides_the_secret() {
        let hash = hash_secret("secret");
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains("secret"));
    }
}
