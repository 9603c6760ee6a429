//! Forming a cluster: `init` on the first node, join tokens, and `join`
//! (the new node asks a member over the peer protocol; the leader checks
//! the token, records the node, adds it as a learner and, while there are
//! fewer than `VOTERS_MAX` voters, promotes it).
//!
//! A token is `BLT2.<cluster id>.<CA fingerprint>.<secret>`; only the
//! SHA-256 of the secret is replicated, and it expires. Joining takes two
//! requests over TLS: the first, with no client certificate and the
//! member's CA checked against the token's fingerprint, gets the new node
//! its certificate; the second, over mutual TLS, joins (`peer::tls`).

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
const TOKEN_PREFIX: &str = "BLT2";

/// A join request (peer payload).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub node: NodeRecord,
    /// Only issue the node's certificate (the first step of a join).
    #[serde(default)]
    pub certificate_only: bool,
}

/// The answer to a join.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub cluster_id: uuid::Uuid,
    pub leader: u64,
    pub voter: bool,
    /// The new node's certificate (first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<crate::peer::tls::Bundle>,
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

/// What a join token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedToken {
    pub cluster_id: uuid::Uuid,
    /// Of the cluster CA's certificate (`peer::tls::fingerprint`).
    pub ca_fingerprint: String,
    pub secret: String,
}

/// Splits a token into its cluster id, CA fingerprint and secret.
pub fn parse_token(token: &str) -> Result<ParsedToken, ClusterError> {
    let bad = || {
        ClusterError::Invalid(
            "malformed join token: expected BLT2.<cluster id>.<CA fingerprint>.<secret> as printed by `ballast cluster token create`"
                .into(),
        )
    };
    let hex = |text: &str| text.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = token.trim().split('.').collect();
    let [prefix, cluster, fingerprint, secret] = parts[..] else {
        return Err(bad());
    };
    if prefix != TOKEN_PREFIX
        || secret.len() < 32
        || !hex(secret)
        || fingerprint.len() != crate::peer::tls::FINGERPRINT_HEX
        || !hex(fingerprint)
    {
        return Err(bad());
    }
    let cluster_id = uuid::Uuid::parse_str(cluster).map_err(|_| bad())?;
    Ok(ParsedToken {
        cluster_id,
        ca_fingerprint: fingerprint.to_ascii_lowercase(),
        secret: secret.to_owned(),
    })
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
        let ca = crate::peer::tls::new_ca(cluster_id).map_err(ClusterError::Internal)?;
        self.change(Command::SetCa { ca }).await?;
        self.change(Command::SetApiSecret {
            secret: super::state::ApiSecret(crate::api::auth::new_secret()),
        })
        .await?;
        self.renew_certificate()?;
        tracing::info!(%cluster_id, node = self.local.id, "cluster initialized (cluster CA made; peers use mutual TLS)");
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
        let fingerprint = self.tls.ca_fingerprint().ok_or_else(|| {
            ClusterError::Internal("this node has no cluster certificate; run `ballast cluster rotate-certs`".into())
        })?;
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
            token: format!("{TOKEN_PREFIX}.{}.{fingerprint}.{secret}", cluster_id.simple()),
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
        let parsed = parse_token(token)?;
        let cluster_id = parsed.cluster_id;
        // Raft traffic from the leader is admitted only once we know our cluster.
        self.set_cluster_id(Some(cluster_id))?;
        let mut request = JoinRequest {
            token: token.trim().to_owned(),
            node: self.local.record(NodeAdmin::Active),
            certificate_only: true,
        };
        let decode = |reply: Result<(FrameKind, Vec<u8>), crate::peer::PeerError>| match reply {
            Ok((FrameKind::JoinReply, bytes)) => serde_json::from_slice::<Result<JoinReply, String>>(&bytes)
                .map_err(|error| format!("unreadable join reply: {error}"))
                .and_then(|result| result),
            Ok((kind, _)) => Err(format!("unexpected answer {kind:?}")),
            Err(error) => Err(error.to_string()),
        };
        // First the certificate (the member proves it holds the token's CA)...
        let payload = serde_json::to_vec(&request).map_err(|e| ClusterError::Internal(e.to_string()))?;
        let first = decode(
            self.client
                .call_join(seed, &payload, &parsed.ca_fingerprint, JOIN_TIMEOUT)
                .await,
        );
        let reply = match first
            .and_then(|reply| reply.bundle.ok_or_else(|| "the member sent no certificate".to_owned()))
        {
            Ok(bundle) => match self.install_certificate(&bundle) {
                // ...then the join itself, over mutual TLS.
                Ok(()) => {
                    request.certificate_only = false;
                    let payload = serde_json::to_vec(&request).map_err(|e| ClusterError::Internal(e.to_string()))?;
                    decode(self.client.call(seed, FrameKind::Join, &payload, JOIN_TIMEOUT).await)
                }
                Err(error) => Err(error.to_string()),
            },
            Err(reason) => Err(reason),
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
    let parsed = parse_token(&request.token).map_err(|e| e.to_string())?;
    let (token_cluster, secret) = (parsed.cluster_id, parsed.secret);
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
    if request.certificate_only {
        let ca = cluster
            .with_state(|state| state.ca.clone())
            .ok_or("the cluster has no CA")?;
        let bundle = crate::peer::tls::issue(&ca, cluster_id, id)?;
        tracing::info!(node = id, name = %request.node.name, "issued a node certificate for a join");
        return Ok(JoinReply {
            cluster_id,
            leader: cluster.local.id,
            voter: false,
            bundle: Some(bundle),
        });
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
        bundle: None,
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
        let fingerprint = "0f".repeat(16);
        let token = format!("BLT2.{}.{fingerprint}.{secret}", cluster.simple());
        assert_eq!(
            parse_token(&token).unwrap(),
            ParsedToken {
                cluster_id: cluster,
                ca_fingerprint: fingerprint.clone(),
                secret: secret.clone(),
            }
        );
        for bad in [
            "",
            "BLT2",
            "BLT2.x.y.z",
            &format!("BLT1.{}.{secret}", cluster.simple()),
            &format!("BLT2.{}.{secret}", cluster.simple()),
            &format!("BLT2.{}.{fingerprint}.short", cluster.simple()),
            &format!("BLT2.{}.abc.{secret}", cluster.simple()),
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
