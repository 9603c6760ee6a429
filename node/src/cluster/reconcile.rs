//! Makes this node's local replicas match the cluster's metadata: creates
//! the replicas placed here, grows resized ones, deletes the ones the
//! cluster no longer places here; then follows each replica's epoch and,
//! where this node is the coordinator, sets where mutations are copied
//! before it starts serving the volume. Runs after every applied change and on a
//! timer, so a node that was down catches up when it returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::state::{ClusterState, ClusterVolume, Command};
use super::Cluster;
use crate::volume::Volumes;

/// A node taking a volume over asks the others this often whether they
/// still serve it (until its old coordinator's lease must have run out).
const TAKEOVER_ASK_INTERVAL: Duration = Duration::from_millis(100);
/// Volumes a node fences and starts serving at once after a takeover.
const TAKEOVERS_IN_FLIGHT: usize = 64;
/// Reconciliation also runs this often without a change.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// One pass; returns the problems met (each also logged).
pub fn reconcile_once(local_id: u64, state: &ClusterState, volumes: &Volumes) -> Vec<String> {
    let desired: BTreeMap<&str, &ClusterVolume> = state
        .volumes
        .values()
        .filter(|volume| volume.replica_nodes.contains(&local_id))
        .map(|volume| (volume.name.as_str(), volume))
        .collect();
    let mut problems = Vec::new();
    let mut note = |what: String| {
        tracing::warn!("{what}");
        problems.push(what);
    };
    for record in volumes.records() {
        match desired.get(record.name.as_str()) {
            Some(wanted) if wanted.id == record.id => {
                if wanted.size_bytes != record.size_bytes {
                    if let Err(error) = volumes.resize(&record.name, wanted.size_bytes) {
                        note(format!("cannot resize local replica of {}: {error}", record.name));
                    }
                }
            }
            _ => {
                tracing::info!(volume = %record.name, id = record.id, "removing a local replica the cluster no longer places here");
                if let Err(error) = volumes.delete(&record.name) {
                    note(format!("cannot remove local replica of {}: {error}", record.name));
                }
            }
        }
    }
    for record in volumes.snapshot_records() {
        if !keeps_snapshot_copy(state, local_id, &record.name, record.id) {
            tracing::info!(snapshot = %record.name, id = record.id, "removing a snapshot copy the cluster no longer keeps here");
            if let Err(error) = volumes.delete_snapshot(&record.name) {
                note(format!("cannot remove snapshot copy {}: {error}", record.name));
            }
        }
    }
    for (name, wanted) in &desired {
        if volumes.get(name).is_none() {
            tracing::info!(volume = %name, id = wanted.id, "creating a local replica");
            // A clone's first replicas start from their copy of its snapshot;
            // one added later (rebuild, --repl up) starts empty and is filled by resync.
            let from_snapshot = wanted.replica_added.get(&local_id).is_none_or(|added| *added <= 1);
            if let Err(error) = volumes.create_replica(wanted, from_snapshot) {
                note(format!("cannot create local replica of {name}: {error}"));
            }
        }
    }
    problems
}

/// Whether this node keeps its copy `name` (`VOLUME@SNAPSHOT`) with data
/// id `id`: while the cluster has that snapshot and lists this node as a
/// holder, or is still taking it (the copy may be here before the snapshot
/// is ready). A copy whose id this node's state has not handed out yet is
/// kept too: the coordinator sends the copy once the snapshot's id is
/// committed, and a replica may take it before it applies that entry (a
/// pass in between used to delete a copy the cluster then listed here).
fn keeps_snapshot_copy(state: &ClusterState, local_id: u64, name: &str, id: u64) -> bool {
    if id >= state.next_volume_id {
        return true;
    }
    crate::volume::snapshot::split_name(name).is_some_and(|(volume, snapshot)| {
        state
            .volumes
            .get(volume)
            .and_then(|v| v.snapshots.get(snapshot))
            .is_some_and(|taken| taken.id == id && (!taken.ready || taken.holders.contains(&local_id)))
    })
}

/// Epochs, replication targets and serving, from the applied state.
/// Replication is set before serving starts, so no write escapes it; a
/// volume this node newly coordinates is returned instead of served: its
/// replicas must be fenced first (`fence_and_serve`).
pub fn wire_serving(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Volumes) -> Vec<(String, u64)> {
    let mut to_fence = Vec::new();
    let local_id = cluster.local.id;
    for volume in state.volumes.values().filter(|v| v.replica_nodes.contains(&local_id)) {
        if volumes.get(&volume.name).is_none() {
            continue;
        }
        volumes.set_standby(&volume.name, volume.standby_of.is_some());
        volumes.set_qos(
            &volume.name,
            volume.io_priority,
            crate::volume::qos::Limits {
                iops: volume.iops_limit,
                mib_per_s: volume.mib_per_s_limit,
            },
        );
        let sole_copy_here = volume.replica_nodes.len() == 1 && volume.coordinator == local_id;
        volumes.set_lease_required(&volume.name, !sole_copy_here);
        volumes.set_epoch(&volume.name, volume.epoch);
        volumes.follow_tenure(&volume.name, volume.coordinator_since);
        if volume.coordinator != local_id {
            volumes.set_served(&volume.name, false);
            volumes.set_replication(&volume.name, None);
            cluster.drop_replication(&volume.name, volume.id);
            // Only the coordinator holds an encrypted volume's key (and so
            // serves its snapshots decrypted).
            if let Some(local) = volumes.get(&volume.name) {
                local.set_cipher(None);
            }
            volumes.lock_snapshots_of(&volume.name);
            continue;
        }
        unlock_with_cluster_key(state, volume, volumes);
        if volume.replica_nodes.len() > 1 {
            let replication = cluster.replication_or_new(&volume.name, volume.id);
            let mut targets: Vec<u64> = volume.in_sync.iter().copied().filter(|id| *id != local_id).collect();
            targets.sort_unstable();
            let mut current = crate::volume::Replicator::targets(&*replication);
            current.sort_unstable();
            replication.note_missed_at_start(&targets);
            if current != targets {
                tracing::info!(volume = %volume.name, replicas = ?targets, epoch = volume.epoch, "replicating to");
                let local = volumes.get(&volume.name);
                let links = targets
                    .iter()
                    .filter_map(|id| {
                        let node = state.nodes.get(id)?;
                        Some((*id, cluster.link_for(&node.peer_address, local.as_deref())))
                    })
                    .collect();
                replication.set_targets_at(links, volume.epoch);
            }
            volumes.set_replication(&volume.name, Some(replication as Arc<dyn crate::volume::Replicator>));
        } else {
            volumes.set_replication(&volume.name, None);
        }
        if cluster.suspects.lock().contains_key(&volume.name) {
            continue; // handed to another replica first (`settle_suspects`)
        }
        let served = volumes.get(&volume.name).is_some_and(|local| local.is_served());
        // A replica that missed a write goes out through Raft first (`fence`).
        let missed = cluster
            .replication(&volume.name)
            .is_some_and(|replication| replication.has_missed());
        // Epoch 1: a new volume never had another coordinator to fence off.
        if served || (!missed && (volume.replica_nodes.len() == 1 || volume.epoch <= 1)) {
            if !served {
                cluster.leases.kick.notify_one(); // its first reads wait for a lease
            }
            volumes.set_served(&volume.name, true);
        } else {
            to_fence.push((volume.name.clone(), volume.epoch));
        }
    }
    to_fence
}

/// Gives a volume this node coordinates its data key, when the cluster key
/// wraps it (a passphrase-wrapped key waits for `volume unlock`).
fn unlock_with_cluster_key(state: &ClusterState, volume: &ClusterVolume, volumes: &Volumes) {
    let (Some(wrapped), Some(local)) = (&volume.encryption, volumes.get(&volume.name)) else {
        return;
    };
    if local.is_unlocked() || wrapped.needs_passphrase() {
        return;
    }
    let Some(cluster_key) = &state.cluster_key else {
        tracing::error!(volume = %volume.name, "encrypted with the cluster key, but the cluster has none");
        return;
    };
    match wrapped.unwrap_cluster(
        cluster_key,
        &crate::cluster::volumes::key_context(volume.key_context_name()),
    ) {
        Ok(key) => {
            local.set_cipher(Some(Arc::new(crate::volume::crypt::VolumeCipher::new(&key))));
            tracing::info!(volume = %volume.name, "data key unlocked with the cluster key");
        }
        Err(error) => tracing::error!(volume = %volume.name, %error, "cannot unlock the data key"),
    }
}

/// Raises the in-sync replicas' epoch, then serves the volume.
pub async fn fence_and_serve(cluster: &Arc<Cluster>, volumes: &Volumes, name: &str, epoch: u64) {
    let (Some(replication), Some(local)) = (cluster.replication(name), volumes.get(name)) else {
        return;
    };
    match replication.fence(local.id, epoch).await {
        Ok(()) => {
            // Replica writes the old coordinator got admitted here land first.
            let _drained = local.epoch_gate.write().await;
            tracing::info!(volume = %name, epoch, "replicas fenced at the new epoch; serving");
            volumes.set_served(name, true);
            cluster.leases.kick.notify_one();
        }
        Err(error) => tracing::error!(volume = %name, %error, "cannot fence the replicas; not serving (retried)"),
    }
}

/// How long a suspect copy waits for another in-sync replica to answer
/// before this node serves its volume anyway (nothing better is up).
const SUSPECT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Copies here that may lack acknowledged writes (`Cluster::suspects`):
/// a volume this node coordinates moves to another in-sync replica that
/// answers, whose compare then repairs this copy; as a replica, the epoch
/// moves so the coordinator compares. Settled ones are forgotten.
async fn settle_suspects(cluster: &Arc<Cluster>, state: &ClusterState) {
    let names: Vec<(String, std::time::Instant)> = cluster
        .suspects
        .lock()
        .iter()
        .map(|(name, since)| (name.clone(), *since))
        .collect();
    for (name, since) in names {
        let local_id = cluster.local.id;
        let Some(volume) = state.volumes.get(&name).filter(|v| v.replica_nodes.contains(&local_id)) else {
            cluster.suspects.lock().remove(&name);
            continue;
        };
        if volume.replica_nodes.len() == 1 {
            cluster.suspects.lock().remove(&name);
            continue;
        }
        let command = if volume.coordinator == local_id {
            let heir = volume
                .in_sync
                .iter()
                .copied()
                .find(|id| *id != local_id && cluster.health.liveness(*id).up);
            match heir {
                Some(heir) => Command::SetCoordinator {
                    name: name.clone(),
                    node: heir,
                },
                None if since.elapsed() < SUSPECT_WAIT => continue,
                None => {
                    tracing::warn!(volume = %name, "no other in-sync replica answers; serving this node's copy, which may lack the last writes before its crash");
                    cluster.suspects.lock().remove(&name);
                    continue;
                }
            }
        } else {
            Command::ReplicaSuspect {
                name: name.clone(),
                node: local_id,
            }
        };
        match cluster.change(command).await {
            Ok(_) => {
                tracing::warn!(volume = %name, "this copy is compared with the coordinator's (its log ended at a damaged batch)");
                cluster.suspects.lock().remove(&name);
            }
            Err(error) => {
                tracing::warn!(volume = %name, %error, "cannot hand this copy over for a compare yet; retrying")
            }
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reconciles after every applied change and every `RECONCILE_INTERVAL`,
/// and when a volume this node takes over may be served.
pub async fn reconcile_loop(
    cluster: Arc<Cluster>,
    volumes: Arc<Volumes>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = cluster.applied_watch();
    loop {
        // The soonest a volume waiting to be taken over may be served.
        let mut takeover_at: Option<tokio::time::Instant> = None;
        if cluster.cluster_id().is_some() {
            let state = cluster.state();
            let (local_id, volumes) = (cluster.local.id, Arc::clone(&volumes));
            let pass_volumes = Arc::clone(&volumes);
            let pass = tokio::task::spawn_blocking(move || {
                reconcile_once(local_id, &state, &pass_volumes);
                state
            });
            match pass.await {
                Ok(state) => {
                    settle_suspects(&cluster, &state).await;
                    // Takeovers are independent: a node handed hundreds of
                    // volumes at once fences and serves them side by side.
                    use futures::StreamExt as _;
                    let to_fence = wire_serving(&cluster, &state, &volumes);
                    let waits: Vec<Option<tokio::time::Instant>> = futures::stream::iter(to_fence)
                        .map(|(name, epoch)| {
                            let (cluster, volumes) = (&cluster, &volumes);
                            async move {
                                let ready_at = tokio::time::Instant::from_std(cluster.takeover_ready_at(&name, epoch));
                                let now = tokio::time::Instant::now();
                                if ready_at > now && !cluster.others_released(&name).await {
                                    // Asked again soon; served at `ready_at` at the latest.
                                    return Some(ready_at.min(now + TAKEOVER_ASK_INTERVAL));
                                }
                                fence_and_serve(cluster, volumes, &name, epoch).await;
                                None
                            }
                        })
                        .buffer_unordered(TAKEOVERS_IN_FLIGHT)
                        .collect()
                        .await;
                    takeover_at = waits.into_iter().flatten().min();
                    crate::replication::resync::start_needed(&cluster, &state, &volumes);
                    crate::replication::scrub::start_needed(&cluster, &state, &volumes);
                    super::snapshots::start_scheduled(&cluster, &state, &volumes);
                    super::backups::start_scheduled(&cluster, &state, &volumes);
                    super::backups::start_standby_sync(&cluster, &state, &volumes);
                }
                Err(error) => tracing::error!(%error, "reconciliation task failed"),
            }
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            () = sleep_until_some(takeover_at) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::tests::{cluster, create};

    fn add_snapshot(state: &mut ClusterState, snapshot: &str) -> u64 {
        state.apply(Command::AddSnapshot {
            name: "v".into(),
            snapshot: snapshot.into(),
            created_unix_seconds: 6,
        });
        state.volumes["v"].snapshots[snapshot].id
    }

    #[test]
    fn a_snapshot_copy_taken_before_this_node_applied_the_snapshot_is_kept() {
        let mut state = cluster(3);
        state.apply(create("v", vec![1, 2, 3]));
        let behind = state.clone();
        let id = add_snapshot(&mut state, "s");
        // Node 3 got the copy from the coordinator but has not applied AddSnapshot yet.
        assert!(keeps_snapshot_copy(&behind, 3, "v@s", id));
        // Taken, not yet ready: kept on every node.
        assert!(keeps_snapshot_copy(&state, 3, "v@s", id));
        state.apply(Command::SnapshotReady {
            name: "v".into(),
            snapshot: "s".into(),
            holders: vec![1, 2],
        });
        assert!(keeps_snapshot_copy(&state, 2, "v@s", id));
        assert!(
            !keeps_snapshot_copy(&state, 3, "v@s", id),
            "ready, and node 3 is not a holder"
        );
        // A copy of an id the state handed out to something else, or of a deleted snapshot, goes.
        assert!(!keeps_snapshot_copy(&state, 2, "v@s", id - 1));
        state.apply(Command::DeleteSnapshot {
            name: "v".into(),
            snapshot: "s".into(),
        });
        assert!(!keeps_snapshot_copy(&state, 2, "v@s", id));
        assert!(!keeps_snapshot_copy(&state, 2, "w@s", id));
    }
}
