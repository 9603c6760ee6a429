//! Raft's transport: openraft's RPCs as JSON payloads of peer-protocol
//! frames, sent with the node's pooled `PeerClient`; and the listening
//! side's dispatch of those frames into the local Raft.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TypeConfig;
use crate::peer::client::PeerClient;
use crate::peer::frame::FrameKind;
use crate::peer::PeerError;

type NodeId = u64;

/// Makes a `PeerNetwork` per Raft target.
pub struct PeerNetworkFactory {
    pub client: Arc<PeerClient>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerNetwork {
            client: Arc::clone(&self.client),
            target,
            address: node.addr.clone(),
        }
    }
}

/// Raft RPCs to one node.
pub struct PeerNetwork {
    client: Arc<PeerClient>,
    target: NodeId,
    address: String,
}

impl PeerNetwork {
    async fn send<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        kind: FrameKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let payload = serde_json::to_vec(request).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        let (reply_kind, reply) = self
            .client
            .call(&self.address, kind, &payload, option.hard_ttl())
            .await
            .map_err(|error| match error {
                error if error.is_unreachable() => RPCError::Unreachable(Unreachable::new(&error)),
                error => RPCError::Network(NetworkError::new(&error)),
            })?;
        if reply_kind != FrameKind::RaftReply {
            let error = PeerError::Protocol {
                address: self.address.clone(),
                reason: format!("expected a raft reply, got {reply_kind:?}"),
            };
            return Err(RPCError::Network(NetworkError::new(&error)));
        }
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(FrameKind::RaftAppend, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.send(FrameKind::RaftSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(FrameKind::RaftVote, &rpc, &option).await
    }
}

/// Answers a Raft frame with the local Raft's reply (serialized `Result`).
/// `heard_from` is told the sender of an append (a leader, alive now).
pub async fn dispatch(
    raft: &openraft::Raft<TypeConfig>,
    kind: FrameKind,
    payload: &[u8],
    heard_from: impl FnOnce(u64),
) -> Result<Vec<u8>, String> {
    fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
        serde_json::from_slice(payload).map_err(|error| format!("unreadable raft request: {error}"))
    }
    let reply = match kind {
        FrameKind::RaftAppend => {
            let request: AppendEntriesRequest<TypeConfig> = decode(payload)?;
            heard_from(request.vote.leader_id().voted_for().unwrap_or_default());
            serde_json::to_vec(&raft.append_entries(request).await)
        }
        FrameKind::RaftVote => serde_json::to_vec(&raft.vote(decode(payload)?).await),
        FrameKind::RaftSnapshot => serde_json::to_vec(&raft.install_snapshot(decode(payload)?).await),
        other => return Err(format!("{other:?} is not a raft request")),
    };
    reply.map_err(|error| format!("cannot encode raft reply: {error}"))
}
