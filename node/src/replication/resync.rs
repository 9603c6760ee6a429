//! Bringing an out-of-sync replica back (resync), under live writes: the
//! coordinator first copies every new mutation to it as well ("catching
//! up"), then walks the volume 1 MiB at a time, each piece under the
//! volume's range lock so no write races the copy, sending allocated data
//! as writes and holes as zeroings; when the walk ends with the replica
//! still caught up, Raft takes it back into the in-sync set (epoch +1).
//!
//! This is a full copy of the allocated data (thin volumes copy what was
//! written); tracking the regions dirtied while a replica was out, so only
//! those are copied, is the next step.

use std::sync::Arc;

use super::wire::{self, OpKind, ReplicaOp};
use super::{VolumeReplication, REPLICA_TIMEOUT};
use crate::cluster::state::{ClusterState, Command};
use crate::cluster::Cluster;
use crate::peer::frame::FrameKind;
use crate::peer::mux::MuxLink;
use crate::volume::{Volume, Volumes};

/// Blocks copied under one hold of the range lock.
const CHUNK_BLOCKS: u64 = 256;
const BLOCK_BYTES: u64 = 4096;

/// What a finished resync moved.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResyncReport {
    pub copied_bytes: u64,
    pub zeroed_bytes: u64,
}

/// Starts a resync for every replica of a volume this node coordinates
/// that is out of sync, up, and not being resynced already.
pub fn start_needed(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Arc<Volumes>) {
    let local_id = cluster.local.id;
    for volume in state.volumes.values().filter(|v| v.coordinator == local_id) {
        let Some(replication) = cluster.replication(&volume.name) else {
            continue;
        };
        let Some(local) = volumes.get(&volume.name) else {
            continue;
        };
        for &node in volume.replica_nodes.iter().filter(|id| !volume.in_sync.contains(id)) {
            let Some(peer) = state.nodes.get(&node) else {
                continue;
            };
            if !cluster.health.liveness(node).up || !cluster.begin_resync(&volume.name, node) {
                continue;
            }
            let link = cluster.link(&peer.peer_address);
            let (cluster, replication, local, name) = (
                Arc::clone(cluster),
                Arc::clone(&replication),
                Arc::clone(&local),
                volume.name.clone(),
            );
            tokio::spawn(async move {
                tracing::info!(volume = %name, replica = node, "resync starts");
                match resync(&cluster, &local, &replication, node, link).await {
                    Ok(report) => tracing::info!(
                        volume = %name,
                        replica = node,
                        copied_bytes = report.copied_bytes,
                        zeroed_bytes = report.zeroed_bytes,
                        "resync done; the replica is in sync again"
                    ),
                    Err(error) => {
                        replication.stop_catching_up(node);
                        tracing::warn!(volume = %name, replica = node, %error, "resync failed; it is retried while the replica is up");
                    }
                }
                cluster.end_resync(&name, node);
            });
        }
    }
}

async fn resync(
    cluster: &Cluster,
    volume: &Volume,
    replication: &VolumeReplication,
    node: u64,
    link: Arc<MuxLink>,
) -> Result<ResyncReport, String> {
    replication.start_catching_up(node, Arc::clone(&link));
    let mut report = ResyncReport::default();
    let size_blocks = volume.size_bytes() / BLOCK_BYTES;
    let mut lba = 0;
    while lba < size_blocks {
        if !replication.is_catching_up(node) {
            return Err("the replica failed a live write during the resync".into());
        }
        let count = CHUNK_BLOCKS.min(size_blocks - lba);
        let _held = volume.lock_range(lba, count).await;
        let runs = volume
            .allocation(lba * BLOCK_BYTES, count * BLOCK_BYTES, usize::MAX)
            .await
            .map_err(|error| error.to_string())?;
        let mut at = lba;
        for (len_bytes, allocated) in runs {
            let blocks = len_bytes / BLOCK_BYTES;
            let kind = if allocated {
                let data = volume
                    .read(at * BLOCK_BYTES, len_bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                report.copied_bytes += len_bytes;
                OpKind::Write(data.to_vec())
            } else {
                report.zeroed_bytes += len_bytes;
                OpKind::Zero
            };
            let op = ReplicaOp {
                volume_id: volume.id,
                epoch: volume.epoch(),
                lba: at,
                block_count: blocks,
                volume_sequence: volume.next_sequence(),
                kind,
            };
            link.call(FrameKind::ReplicaWrite, &wire::encode(&op), REPLICA_TIMEOUT)
                .await
                .map_err(|error| error.to_string())?;
            at += blocks;
        }
        lba += count;
    }
    if !replication.is_catching_up(node) {
        return Err("the replica failed a live write during the resync".into());
    }
    cluster
        .change(Command::ReplicaIn {
            name: volume.name.clone(),
            node,
            by: cluster.local.id,
        })
        .await
        .map_err(|error| error.to_string())?;
    Ok(report)
}
