//! The cluster's replicated metadata and the commands that change it: a
//! pure, deterministic state machine (every node applies the same commands
//! in the same order and ends in the same state). Raft (`store`) feeds it.
//!
//! Decisions that need the wall clock or a node's local view (placement,
//! token expiry, liveness) are made by the proposer and carried in the
//! command; `apply` only validates what must hold for every node alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::volume::qos::IoPriority;

/// Most voting members; further nodes are learners.
pub const VOTERS_MAX: usize = 5;
/// Most nodes in one cluster.
pub const NODES_MAX: usize = 256;
/// Most join tokens alive at once (expired ones are dropped as new ones come).
pub const TOKENS_MAX: usize = 64;

/// Administrative state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAdmin {
    /// takes new replicas
    Active,
    /// keeps its replicas, takes no new ones (planned work on the host)
    Maintenance,
    /// its replicas are moving away; then it leaves the cluster
    Decommissioning,
}

/// A member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// The node's data-directory uuid (tells apart two nodes whose ids collide).
    #[serde(default)]
    pub uuid: uuid::Uuid,
    /// Host name, for people.
    pub name: String,
    pub peer_address: String,
    pub api_address: String,
    pub nbd_address: String,
    /// e.g. zone=a, rack=r12: placement spreads replicas over distinct zones.
    pub labels: BTreeMap<String, String>,
    pub admin: NodeAdmin,
    pub joined_unix_seconds: u64,
}

impl NodeRecord {
    /// The failure domain placement spreads over (its `zone` label, if any).
    #[must_use]
    pub fn zone(&self) -> Option<&str> {
        self.labels.get("zone").map(String::as_str)
    }
}

/// A volume as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVolume {
    pub name: String,
    /// Cluster-wide id of the volume's data (never reused).
    pub id: u64,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    /// Copies wanted (`replica_nodes` holds one more while a replica is
    /// being replaced).
    pub replicas: u32,
    /// Nodes holding a replica; distinct.
    pub replica_nodes: Vec<u64>,
    /// Replicas that hold every acknowledged write: the coordinator copies
    /// each mutation to them and acknowledges only once all have it.
    #[serde(default)]
    pub in_sync: Vec<u64>,
    /// The node serving the volume (NBD, attach); one of `in_sync`.
    pub coordinator: u64,
    /// Fencing epoch: bumps whenever the coordinator or replica set changes.
    pub epoch: u64,
    /// The epoch the current coordinator took over at: replicas refuse
    /// mutations sent at an older epoch (a former coordinator's). Later
    /// bumps within one coordinator's tenure fence nobody.
    #[serde(default)]
    pub coordinator_since: u64,
    /// The epoch each replica was created at (`AddReplica`; 1 for the first
    /// set): tells a replica apart from an earlier one on the same node.
    #[serde(default)]
    pub replica_added: BTreeMap<u64, u64>,
    pub created_unix_seconds: u64,
    /// The data key of an encrypted volume, wrapped (by the cluster key or
    /// a passphrase); None: not encrypted.
    #[serde(default)]
    pub encryption: Option<Box<crate::volume::crypt::WrappedKey>>,
    /// Verifying scrubs asked for (`ScrubVolume` +1) and the last one done
    /// (`ScrubDone`): the coordinator runs one while requested > done.
    #[serde(default)]
    pub scrub_requested: u64,
    #[serde(default)]
    pub scrub_done: u64,
    /// When the last verifying scrub finished (Unix seconds; 0: never).
    #[serde(default)]
    pub scrub_done_unix: u64,
    /// Snapshots by name.
    #[serde(default)]
    pub snapshots: BTreeMap<String, ClusterSnapshot>,
    /// The snapshot (data id) this volume was cloned from: each replica's
    /// data starts as a clone of its node's copy of it.
    #[serde(default)]
    pub clone_of: Option<u64>,
    /// Scheduled snapshots: one every this many seconds (0: none), named
    /// `auto-YYYYMMDD-HHMMSS`; only the newest `snapshot_keep` are kept.
    #[serde(default)]
    pub snapshot_every_seconds: u64,
    #[serde(default)]
    pub snapshot_keep: u32,
    /// Scheduled backups: one every this many seconds (0: none) to the
    /// registered target `backup_target`; only the newest `backup_keep` of
    /// this volume are kept there.
    #[serde(default)]
    pub backup_every_seconds: u64,
    #[serde(default)]
    pub backup_keep: u32,
    #[serde(default)]
    pub backup_target: String,
    /// A standby follows another volume's backups in a registered target:
    /// it serves no client until promoted (`volume promote`).
    #[serde(default)]
    pub standby_of: Option<StandbyOf>,
    /// The volume name its wrapped data key is bound to (`key_context`): a
    /// clone of an encrypted volume shares its source's key. Empty: its own.
    #[serde(default)]
    pub key_name: String,
    /// I/O priority class and limits, paced by the node serving the
    /// volume (`volume update --io-priority --iops-limit --mib-per-s-limit`).
    /// Peer protocol 3.
    #[serde(default, skip_serializing_if = "IoPriority::is_medium")]
    pub io_priority: IoPriority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mib_per_s_limit: Option<u64>,
}

impl ClusterVolume {
    /// The name the volume's data key is bound to.
    #[must_use]
    pub fn key_context_name(&self) -> &str {
        if self.key_name.is_empty() {
            &self.name
        } else {
            &self.key_name
        }
    }
}

/// A read-only point-in-time copy of a volume, sharing its blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Data id of the snapshot's copies (from the volume id sequence).
    pub id: u64,
    pub created_unix_seconds: u64,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// Nodes holding a copy: the replicas that took it. Empty until ready.
    pub holders: Vec<u64>,
    /// False while the coordinator is taking it (copies may exist on some
    /// nodes already; they are kept until it is ready or deleted).
    pub ready: bool,
}

/// Which host has a volume attached read-write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub node: u64,
    /// The volume's epoch when it was attached.
    pub epoch: u64,
    pub since_unix: u64,
}

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSecret(pub String);

impl std::fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiSecret(..)")
    }
}

/// A join token's record: only its hash is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_unix_seconds: u64,
}

/// Everything the cluster agrees on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: Option<uuid::Uuid>,
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub volumes: BTreeMap<String, ClusterVolume>,
    /// Next volume id handed out; ids are never reused.
    pub next_volume_id: u64,
    /// Join tokens by the hex SHA-256 of their secret.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Outcomes of the last `PROPOSALS_REMEMBERED` proposals by id, oldest
    /// first: a proposal retried after a lost answer gets its first outcome
    /// instead of being applied twice.
    #[serde(default)]
    pub recent_proposals: std::collections::VecDeque<(uuid::Uuid, Outcome)>,
    /// The cluster CA (its key signs node certificates; `peer::tls`).
    #[serde(default)]
    pub ca: Option<crate::peer::tls::ClusterCa>,
    /// The secret cluster API tokens are signed with (`api::auth`).
    #[serde(default)]
    pub api_secret: Option<ApiSecret>,
    /// Wraps the data keys of volumes encrypted without a passphrase.
    #[serde(default)]
    pub cluster_key: Option<crate::volume::crypt::ClusterKey>,
    /// Backup targets registered by name (`backup target add`): their
    /// address, and their secret and S3 options sealed under the cluster key.
    #[serde(default)]
    pub backup_targets: BTreeMap<String, BackupTargetRecord>,
    /// Volume owners (token subjects) by volume name; none: the admins'.
    #[serde(default)]
    pub owners: BTreeMap<String, String>,
    /// Volume group ACLs by volume name: members of the group may use it.
    #[serde(default)]
    pub groups: BTreeMap<String, String>,
    /// Alerts by key, active and recently cleared (bounded, `alerts`).
    #[serde(default)]
    pub alerts: BTreeMap<String, super::alerts::Alert>,
    /// Volumes attached to a host as a block device (read-write), by name:
    /// one host at a time.
    #[serde(default)]
    pub attachments: BTreeMap<String, Attachment>,
}

/// Most snapshots of one volume.
pub const SNAPSHOTS_PER_VOLUME_MAX: usize = 256;

/// Proposals whose outcome is kept for retries.
pub const PROPOSALS_REMEMBERED: usize = 1024;

/// A change to the cluster's metadata (the Raft log's payload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `command`, applied at most once however often it is proposed under `id`.
    Once {
        id: uuid::Uuid,
        command: Box<Command>,
    },
    /// First entry of a new cluster.
    Init {
        cluster_id: uuid::Uuid,
        node: NodeRecord,
    },
    /// A node joined (or rejoined with new addresses).
    AddNode {
        node: NodeRecord,
    },
    /// A join token.
    CreateToken {
        hash: String,
        record: TokenRecord,
        now_unix_seconds: u64,
    },
    CreateVolume {
        name: String,
        size_bytes: u64,
        block_size_bytes: u32,
        replica_nodes: Vec<u64>,
        created_unix_seconds: u64,
        /// The wrapped data key of an encrypted volume.
        #[serde(default)]
        encryption: Option<crate::volume::crypt::WrappedKey>,
    },
    ResizeVolume {
        name: String,
        size_bytes: u64,
        /// A smaller size is refused unless this says the data past the new
        /// end may be discarded.
        #[serde(default)]
        allow_shrink: bool,
    },
    DeleteVolume {
        name: String,
    },
    /// `node`'s copy may lack acknowledged writes (its log ended at a
    /// damaged batch after a crash): the epoch moves, so the coordinator
    /// compares the copies and rewrites what differs.
    ReplicaSuspect {
        name: String,
        node: u64,
    },
    /// Asks the volume's coordinator for a verifying scrub.
    ScrubVolume {
        name: String,
    },
    /// The coordinator finished a verifying scrub that started when
    /// `scrub_requested` was `generation`.
    ScrubDone {
        name: String,
        generation: u64,
        at_unix: u64,
    },
    SetNodeAdmin {
        id: u64,
        admin: NodeAdmin,
    },
    /// The coordinator `by` drops `node` from the in-sync set (it stopped
    /// answering); bumps the epoch.
    ReplicaOut {
        name: String,
        node: u64,
        by: u64,
    },
    /// A new, empty replica on `node`; it joins the in-sync set once
    /// resynced. `grow`: the wanted replica count goes up with it (`volume
    /// update --repl`); otherwise it replaces one that is leaving (rebuild,
    /// decommission).
    AddReplica {
        name: String,
        node: u64,
        grow: bool,
    },
    /// `node` no longer holds a replica; never the coordinator. `shrink`:
    /// the wanted replica count goes down with it.
    RemoveReplica {
        name: String,
        node: u64,
        shrink: bool,
    },
    /// The cluster's CA, made at init (set once).
    SetCa {
        ca: crate::peer::tls::ClusterCa,
    },
    /// The cluster's API token secret, made at init (set once).
    SetApiSecret {
        secret: ApiSecret,
    },
    /// The key that wraps encrypted volumes' keys (set once, made with the
    /// first encrypted volume).
    SetClusterKey {
        key: crate::volume::crypt::ClusterKey,
    },
    /// `command` (a CreateVolume) applied, and `owner` (a token subject)
    /// recorded as the new volume's owner, atomically.
    Owned {
        owner: String,
        /// A group whose members may use the volume too ("" = none).
        #[serde(default)]
        group: String,
        command: Box<Command>,
    },
    /// The leader's view of what needs attention changed: `raise` started
    /// (or is still true, refreshing last-seen), `clear` ended.
    Alerts {
        raise: Vec<super::alerts::Raised>,
        clear: Vec<String>,
        now_unix: u64,
    },
    /// A decommissioned node (holding no replica) leaves the node table.
    RemoveNode {
        id: u64,
    },
    /// The coordinator `by` brought `node`'s replica up to date (resync);
    /// it rejoins the in-sync set; bumps the epoch. Refused unless the
    /// epoch is still `expect_epoch` (when given): a `ReplicaOut` of the
    /// node that Raft ordered first (it failed meanwhile) wins.
    ReplicaIn {
        name: String,
        node: u64,
        by: u64,
        #[serde(default)]
        expect_epoch: Option<u64>,
    },
    /// `node` (an in-sync replica) becomes the coordinator; bumps the epoch,
    /// fencing the old coordinator's writes, and drops the old coordinator
    /// from the in-sync set.
    SetCoordinator {
        name: String,
        node: u64,
    },
    /// Volume `name` is attached read-write to `node`'s host. Refused while
    /// another node holds it, unless `force` (that host is lost).
    Attach {
        name: String,
        node: u64,
        force: bool,
        now_unix: u64,
    },
    /// `node` no longer has `name` attached (no-op if another node has).
    Detach {
        name: String,
        node: u64,
    },
    /// Snapshot `snapshot` of volume `name` is being taken: gets its id.
    AddSnapshot {
        name: String,
        snapshot: String,
        created_unix_seconds: u64,
    },
    /// The coordinator took the snapshot on `holders`.
    SnapshotReady {
        name: String,
        snapshot: String,
        holders: Vec<u64>,
    },
    DeleteSnapshot {
        name: String,
        snapshot: String,
    },
    /// A new volume `name` whose data is a clone of snapshot `snapshot` of
    /// volume `source`: its replicas are the snapshot's holders.
    CloneVolume {
        name: String,
        source: String,
        snapshot: String,
        created_unix_seconds: u64,
    },
    /// Scheduled snapshots of `name` (every 0: none).
    SetSnapshotSchedule {
        name: String,
        every_seconds: u64,
        keep: u32,
    },
    /// Registers (or replaces) backup target `name`. Peer protocol 2.
    SetBackupTarget {
        name: String,
        record: BackupTargetRecord,
    },
    /// Forgets backup target `name` (refused while a schedule uses it). Peer protocol 2.
    DeleteBackupTarget {
        name: String,
    },
    /// Scheduled backups of volume `name` (`every_seconds` 0: none). Peer protocol 2.
    SetBackupSchedule {
        name: String,
        every_seconds: u64,
        keep: u32,
        target: String,
    },
    /// Makes `name` a standby of a volume's backups (None: promotes it). Peer protocol 2.
    SetStandby {
        name: String,
        standby: Option<StandbyOf>,
    },
    /// Standby `name` now holds backup `backup`. Peer protocol 2.
    StandbyApplied {
        name: String,
        backup: String,
        now_unix: u64,
    },
    /// Volume `name`'s I/O priority class and limits (None: unlimited). Peer protocol 3.
    SetQos {
        name: String,
        priority: IoPriority,
        iops_limit: Option<u64>,
        mib_per_s_limit: Option<u64>,
    },
}

/// What a standby volume follows, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyOf {
    /// A registered backup target.
    pub target: String,
    /// The source volume's name in its backups.
    pub volume: String,
    /// The last backup applied ("" before the first).
    #[serde(default)]
    pub applied: String,
    #[serde(default)]
    pub applied_unix_seconds: u64,
}

/// A registered backup target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTargetRecord {
    pub url: String,
    /// Hex of the target's secret and S3 options, sealed under the cluster key.
    pub sealed: String,
    pub created_unix_seconds: u64,
}

/// Why a command was not applied (the same on every node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    Exists(String),
    Missing(String),
    Invalid(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exists(message) | Self::Missing(message) | Self::Invalid(message) => f.write_str(message),
        }
    }
}

/// What applying a command answered. (One per applied Raft entry, moved
/// once: the size of a volume in it costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    #[default]
    Done,
    Volume(ClusterVolume),
    Rejected(Rejection),
}

/// Sets a value the cluster gets once (its CA, keys, secrets).
fn set_once<T>(slot: &mut Option<T>, value: T, exists: &str) -> Outcome {
    if slot.is_some() {
        return Outcome::Rejected(Rejection::Exists(exists.into()));
    }
    *slot = Some(value);
    Outcome::Done
}

impl ClusterState {
    /// Applies one command; the outcome goes back to the proposer. Must be
    /// deterministic (no clock, no randomness): a restart re-applies the
    /// log after the last snapshot (`store.rs`).
    pub fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::Once { id, command } => self.apply_once(id, *command),
            Command::Owned { owner, group, command } => self.apply_owned(owner, group, *command),
            Command::Init { cluster_id, node } => self.init(cluster_id, node),
            Command::AddNode { node } => self.add_node(node),
            Command::RemoveNode { id } => self.remove_node(id),
            Command::SetNodeAdmin { id, admin } => self.set_node_admin(id, admin),
            Command::CreateToken {
                hash,
                record,
                now_unix_seconds,
            } => self.create_token(hash, record, now_unix_seconds),
            Command::CreateVolume {
                name,
                size_bytes,
                block_size_bytes,
                replica_nodes,
                created_unix_seconds,
                encryption,
            } => {
                let created =
                    self.create_volume(name, size_bytes, block_size_bytes, replica_nodes, created_unix_seconds);
                self.with_encryption(created, encryption)
            }
            Command::ResizeVolume {
                name,
                size_bytes,
                allow_shrink,
            } => self.resize_volume(&name, size_bytes, allow_shrink),
            Command::ReplicaSuspect { name, node } => self.replica_suspect(&name, node),
            Command::ScrubVolume { name } => self.update_volume(&name, |volume| {
                volume.scrub_requested += 1;
                Ok(())
            }),
            Command::ScrubDone {
                name,
                generation,
                at_unix,
            } => self.update_volume(&name, |volume| {
                volume.scrub_done = volume.scrub_done.max(generation.min(volume.scrub_requested));
                volume.scrub_done_unix = volume.scrub_done_unix.max(at_unix);
                Ok(())
            }),
            Command::DeleteVolume { name } => self.delete_volume(&name),
            Command::ReplicaOut { name, node, by } => self.replica_out(&name, node, by),
            Command::SetCoordinator { name, node } => self.set_coordinator(&name, node),
            Command::Attach {
                name,
                node,
                force,
                now_unix,
            } => self.attach(name, node, force, now_unix),
            Command::Detach { name, node } => {
                if self.attachments.get(&name).is_some_and(|held| held.node == node) {
                    self.attachments.remove(&name);
                }
                Outcome::Done
            }
            Command::ReplicaIn {
                name,
                node,
                by,
                expect_epoch,
            } => self.replica_in(&name, node, by, expect_epoch),
            Command::AddReplica { name, node, grow } => self.add_replica(&name, node, grow),
            Command::RemoveReplica { name, node, shrink } => self.remove_replica(&name, node, shrink),
            Command::AddSnapshot {
                name,
                snapshot,
                created_unix_seconds,
            } => self.add_snapshot(&name, snapshot, created_unix_seconds),
            Command::SnapshotReady {
                name,
                snapshot,
                holders,
            } => self.update_volume(&name, |volume| {
                let taken = volume
                    .snapshots
                    .get_mut(&snapshot)
                    .ok_or_else(|| Rejection::Missing(format!("snapshot {name}@{snapshot} does not exist")))?;
                taken.ready = true;
                taken.holders = holders;
                Ok(())
            }),
            Command::DeleteSnapshot { name, snapshot } => {
                self.update_volume(&name, |volume| match volume.snapshots.remove(&snapshot) {
                    Some(_) => Ok(()),
                    None => Err(Rejection::Missing(format!("snapshot {name}@{snapshot} does not exist"))),
                })
            }
            Command::CloneVolume {
                name,
                source,
                snapshot,
                created_unix_seconds,
            } => self.clone_volume(name, &source, &snapshot, created_unix_seconds),
            Command::SetSnapshotSchedule {
                name,
                every_seconds,
                keep,
            } => self.update_volume(&name, |volume| {
                volume.snapshot_every_seconds = every_seconds;
                volume.snapshot_keep = keep;
                Ok(())
            }),
            Command::SetBackupTarget { name, record } => {
                self.backup_targets.insert(name, record);
                Outcome::Done
            }
            Command::DeleteBackupTarget { name } => {
                if let Some(user) = self
                    .volumes
                    .values()
                    .find(|v| v.backup_every_seconds > 0 && v.backup_target == name)
                {
                    return Outcome::Rejected(Rejection::Invalid(format!(
                        "volume {} backs up to {name} on a schedule; stop it first (volume update {} --backup-every 0)",
                        user.name, user.name
                    )));
                }
                if self.backup_targets.remove(&name).is_none() {
                    return Outcome::Rejected(Rejection::Missing(format!("no backup target {name}")));
                }
                Outcome::Done
            }
            Command::SetBackupSchedule {
                name,
                every_seconds,
                keep,
                target,
            } => {
                if every_seconds > 0 && !self.backup_targets.contains_key(&target) {
                    return Outcome::Rejected(Rejection::Missing(format!(
                        "no backup target {target} (register it with `ballast backup target add`)"
                    )));
                }
                self.update_volume(&name, |volume| {
                    volume.backup_every_seconds = every_seconds;
                    volume.backup_keep = keep;
                    volume.backup_target = target;
                    Ok(())
                })
            }
            Command::SetQos {
                name,
                priority,
                iops_limit,
                mib_per_s_limit,
            } => {
                let limits = crate::volume::qos::Limits {
                    iops: iops_limit,
                    mib_per_s: mib_per_s_limit,
                };
                if let Err(why) = limits.check() {
                    return Outcome::Rejected(Rejection::Invalid(why));
                }
                self.update_volume(&name, |volume| {
                    volume.io_priority = priority;
                    volume.iops_limit = iops_limit;
                    volume.mib_per_s_limit = mib_per_s_limit;
                    Ok(())
                })
            }
            Command::SetStandby { name, standby } => {
                if let Some(standby) = &standby {
                    if !self.backup_targets.contains_key(&standby.target) {
                        return Outcome::Rejected(Rejection::Missing(format!(
                            "no backup target {} (register it with `ballast backup target add`)",
                            standby.target
                        )));
                    }
                }
                self.update_volume(&name, |volume| {
                    volume.standby_of = standby;
                    Ok(())
                })
            }
            Command::StandbyApplied { name, backup, now_unix } => self.update_volume(&name, |volume| {
                let Some(standby) = volume.standby_of.as_mut() else {
                    return Err(Rejection::Invalid(format!(
                        "volume {} is no longer a standby",
                        volume.name
                    )));
                };
                standby.applied = backup;
                standby.applied_unix_seconds = now_unix;
                Ok(())
            }),
            Command::SetApiSecret { secret } => {
                set_once(&mut self.api_secret, secret, "the cluster already has an API secret")
            }
            Command::SetClusterKey { key } => set_once(&mut self.cluster_key, key, "the cluster already has a key"),
            Command::SetCa { ca } => set_once(&mut self.ca, ca, "the cluster already has a CA"),
            Command::Alerts { raise, clear, now_unix } => {
                super::alerts::apply(&mut self.alerts, raise, &clear, now_unix);
                Outcome::Done
            }
        }
    }

    /// A proposal with an id: applied once; a retry gets the first outcome.
    fn apply_once(&mut self, id: uuid::Uuid, command: Command) -> Outcome {
        if let Some((_, outcome)) = self.recent_proposals.iter().find(|(seen, _)| *seen == id) {
            return outcome.clone();
        }
        let outcome = self.apply(command);
        if self.recent_proposals.len() >= PROPOSALS_REMEMBERED {
            self.recent_proposals.pop_front();
        }
        self.recent_proposals.push_back((id, outcome.clone()));
        outcome
    }

    /// A volume made by `command` belongs to `owner` (and `group`, if any).
    fn apply_owned(&mut self, owner: String, group: String, command: Command) -> Outcome {
        let outcome = self.apply(command);
        if let Outcome::Volume(volume) = &outcome {
            self.owners.insert(volume.name.clone(), owner);
            if !group.is_empty() {
                self.groups.insert(volume.name.clone(), group);
            }
        }
        outcome
    }

    fn init(&mut self, cluster_id: uuid::Uuid, node: NodeRecord) -> Outcome {
        if self.cluster_id.is_some() {
            return Outcome::Rejected(Rejection::Exists("the cluster is already initialized".into()));
        }
        self.cluster_id = Some(cluster_id);
        self.next_volume_id = 1;
        self.nodes.insert(node.id, node);
        Outcome::Done
    }

    fn add_node(&mut self, node: NodeRecord) -> Outcome {
        if !self.nodes.contains_key(&node.id) && self.nodes.len() >= NODES_MAX {
            return Outcome::Rejected(Rejection::Invalid(format!("the cluster already has {NODES_MAX} nodes")));
        }
        self.nodes.insert(node.id, node);
        Outcome::Done
    }

    fn remove_node(&mut self, id: u64) -> Outcome {
        if let Some(volume) = self.volumes.values().find(|v| v.replica_nodes.contains(&id)) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {id} still holds a replica of volume {}",
                volume.name
            )));
        }
        match self.nodes.remove(&id) {
            Some(_) => Outcome::Done,
            None => Outcome::Rejected(Rejection::Missing(format!("node {id} is not a member"))),
        }
    }

    fn set_node_admin(&mut self, id: u64, admin: NodeAdmin) -> Outcome {
        match self.nodes.get_mut(&id) {
            Some(node) => {
                node.admin = admin;
                Outcome::Done
            }
            None => Outcome::Rejected(Rejection::Missing(format!("node {id} is not a member"))),
        }
    }

    fn create_token(&mut self, hash: String, record: TokenRecord, now_unix_seconds: u64) -> Outcome {
        self.tokens
            .retain(|_, token| token.expires_unix_seconds > now_unix_seconds);
        if self.tokens.len() >= TOKENS_MAX {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "{TOKENS_MAX} join tokens are already alive; wait for some to expire"
            )));
        }
        self.tokens.insert(hash, record);
        Outcome::Done
    }

    /// A created volume's encryption, in the outcome and in the state.
    fn with_encryption(&mut self, created: Outcome, encryption: Option<crate::volume::crypt::WrappedKey>) -> Outcome {
        match created {
            Outcome::Volume(mut volume) => {
                volume.encryption = encryption.map(Box::new);
                if let Some(stored) = self.volumes.get_mut(&volume.name) {
                    stored.encryption.clone_from(&volume.encryption);
                }
                Outcome::Volume(volume)
            }
            other => other,
        }
    }

    /// Changes an existing volume with `change`; the volume after it, or
    /// the rejection (a missing volume, or what `change` refused).
    fn update_volume(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut ClusterVolume) -> Result<(), Rejection>,
    ) -> Outcome {
        let Some(volume) = self.volumes.get_mut(name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        match change(volume) {
            Ok(()) => Outcome::Volume(volume.clone()),
            Err(rejection) => Outcome::Rejected(rejection),
        }
    }

    fn resize_volume(&mut self, name: &str, size_bytes: u64, allow_shrink: bool) -> Outcome {
        self.update_volume(name, |volume| {
            if size_bytes < volume.size_bytes && !allow_shrink {
                return Err(Rejection::Invalid(format!(
                    "volume {name} is {} bytes; shrinking discards the data past the new end: pass --allow-shrink to do it",
                    volume.size_bytes
                )));
            }
            volume.size_bytes = size_bytes;
            Ok(())
        })
    }

    fn replica_suspect(&mut self, name: &str, node: u64) -> Outcome {
        self.update_volume(name, |volume| {
            if !volume.replica_nodes.contains(&node) {
                return Err(Rejection::Invalid(format!("node {node} holds no replica of {name}")));
            }
            volume.epoch += 1;
            Ok(())
        })
    }

    fn delete_volume(&mut self, name: &str) -> Outcome {
        match self.volumes.remove(name) {
            Some(volume) => {
                self.owners.remove(name);
                self.groups.remove(name);
                self.attachments.remove(name);
                Outcome::Volume(volume)
            }
            None => Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist"))),
        }
    }

    fn attach(&mut self, name: String, node: u64, force: bool, now_unix: u64) -> Outcome {
        let Some(volume) = self.volumes.get(&name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        match self.attachments.get(&name) {
            // A conflict (409), like an existing name.
            Some(held) if held.node != node && !force => Outcome::Rejected(Rejection::Exists(format!(
                "volume {name} is attached to node {}'s host (since epoch {}); detach it there, or pass --force-failover if that host is lost",
                held.node, held.epoch
            ))),
            _ => {
                let attachment = Attachment {
                    node,
                    epoch: volume.epoch,
                    since_unix: now_unix,
                };
                self.attachments.insert(name, attachment);
                Outcome::Done
            }
        }
    }

    fn create_volume(
        &mut self,
        name: String,
        size_bytes: u64,
        block_size_bytes: u32,
        replica_nodes: Vec<u64>,
        created_unix_seconds: u64,
    ) -> Outcome {
        if self.volumes.contains_key(&name) {
            return Outcome::Rejected(Rejection::Exists(format!("volume {name} already exists")));
        }
        if let Err(reason) = self.check_replica_set(&replica_nodes) {
            return Outcome::Rejected(Rejection::Invalid(reason));
        }
        let id = self.next_volume_id.max(1);
        self.next_volume_id = id + 1;
        let volume = ClusterVolume {
            name: name.clone(),
            id,
            size_bytes,
            block_size_bytes,
            replicas: u32::try_from(replica_nodes.len()).expect("replica sets are small"),
            coordinator: replica_nodes[0],
            in_sync: replica_nodes.clone(),
            replica_added: replica_nodes.iter().map(|node| (*node, 1)).collect(),
            replica_nodes,
            epoch: 1,
            coordinator_since: 1,
            created_unix_seconds,
            encryption: None,
            scrub_requested: 0,
            scrub_done: 0,
            scrub_done_unix: 0,
            snapshots: BTreeMap::new(),
            clone_of: None,
            snapshot_every_seconds: 0,
            snapshot_keep: 0,
            backup_every_seconds: 0,
            backup_keep: 0,
            backup_target: String::new(),
            standby_of: None,
            key_name: String::new(),
            io_priority: IoPriority::default(),
            iops_limit: None,
            mib_per_s_limit: None,
        };
        self.volumes.insert(name, volume.clone());
        Outcome::Volume(volume)
    }

    fn add_snapshot(&mut self, name: &str, snapshot: String, created_unix_seconds: u64) -> Outcome {
        let id = self.next_volume_id.max(1);
        let Some(volume) = self.volumes.get_mut(name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        if volume.snapshots.contains_key(&snapshot) {
            return Outcome::Rejected(Rejection::Exists(format!("snapshot {name}@{snapshot} already exists")));
        }
        if volume.snapshots.len() >= SNAPSHOTS_PER_VOLUME_MAX {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "volume {name} already has {SNAPSHOTS_PER_VOLUME_MAX} snapshots; delete some first"
            )));
        }
        let size_bytes = volume.size_bytes;
        volume.snapshots.insert(
            snapshot,
            ClusterSnapshot {
                id,
                created_unix_seconds,
                size_bytes,
                holders: Vec::new(),
                ready: false,
            },
        );
        self.next_volume_id = id + 1;
        Outcome::Volume(volume.clone())
    }

    fn clone_volume(&mut self, name: String, source: &str, snapshot: &str, created_unix_seconds: u64) -> Outcome {
        let Some(origin) = self.volumes.get(source) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {source} does not exist")));
        };
        let Some(taken) = origin.snapshots.get(snapshot).filter(|taken| taken.ready) else {
            return Outcome::Rejected(Rejection::Missing(format!(
                "snapshot {source}@{snapshot} does not exist (or is still being taken)"
            )));
        };
        let mut holders: Vec<u64> = taken
            .holders
            .iter()
            .copied()
            .filter(|id| self.nodes.contains_key(id))
            .collect();
        if holders.is_empty() {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "no node holds a copy of snapshot {source}@{snapshot} any more"
            )));
        }
        // The source's coordinator first (it serves the clone), if it holds a copy.
        if let Some(at) = holders.iter().position(|id| *id == origin.coordinator) {
            holders.swap(0, at);
        }
        let (size_bytes, block_size_bytes, clone_of) = (taken.size_bytes, origin.block_size_bytes, taken.id);
        // An encrypted source's data is ciphertext under its key: the clone shares the key.
        let (encryption, key_name) = (origin.encryption.clone(), origin.key_context_name().to_owned());
        match self.create_volume(name, size_bytes, block_size_bytes, holders, created_unix_seconds) {
            Outcome::Volume(mut volume) => {
                volume.clone_of = Some(clone_of);
                if encryption.is_some() {
                    volume.encryption = encryption;
                    volume.key_name = key_name;
                }
                if let Some(stored) = self.volumes.get_mut(&volume.name) {
                    stored.clone_from(&volume);
                }
                Outcome::Volume(volume)
            }
            other => other,
        }
    }

    /// The volume `name`, if node `by` is its coordinator.
    fn coordinated_by(&mut self, name: &str, by: u64) -> Result<&mut ClusterVolume, Rejection> {
        let volume = self
            .volumes
            .get_mut(name)
            .ok_or_else(|| Rejection::Missing(format!("volume {name} does not exist")))?;
        if volume.coordinator != by {
            return Err(Rejection::Invalid(format!(
                "node {by} is not the coordinator of volume {name} (node {} is, epoch {})",
                volume.coordinator, volume.epoch
            )));
        }
        Ok(volume)
    }

    fn replica_out(&mut self, name: &str, node: u64, by: u64) -> Outcome {
        let volume = match self.coordinated_by(name, by) {
            Ok(volume) => volume,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        if node == volume.coordinator {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "the coordinator of {name} cannot drop itself"
            )));
        }
        // The epoch moves even if the node was out already: a ReplicaIn of it
        // proposed before (its expect_epoch now stale) cannot apply after this.
        volume.in_sync.retain(|id| *id != node);
        volume.epoch += 1;
        Outcome::Volume(volume.clone())
    }

    fn add_replica(&mut self, name: &str, node: u64, grow: bool) -> Outcome {
        if !self.nodes.contains_key(&node) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {node} is not a member of the cluster"
            )));
        }
        let Some(volume) = self.volumes.get_mut(name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        if volume.replica_nodes.contains(&node) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {node} already holds a replica of {name}"
            )));
        }
        volume.replica_nodes.push(node);
        // A new incarnation: whatever was known of an earlier replica on
        // this node (dirty regions) does not describe this one.
        volume.epoch += 1;
        volume.replica_added.insert(node, volume.epoch);
        if grow {
            volume.replicas += 1;
        }
        Outcome::Volume(volume.clone())
    }

    fn remove_replica(&mut self, name: &str, node: u64, shrink: bool) -> Outcome {
        let Some(volume) = self.volumes.get_mut(name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        if volume.coordinator == node {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {node} coordinates {name}; attach the volume elsewhere first"
            )));
        }
        if !volume.replica_nodes.contains(&node) {
            return Outcome::Rejected(Rejection::Invalid(format!("node {node} holds no replica of {name}")));
        }
        volume.replica_nodes.retain(|id| *id != node);
        volume.replica_added.remove(&node);
        // Its copies of the volume's snapshots go with it.
        for taken in volume.snapshots.values_mut() {
            taken.holders.retain(|id| *id != node);
        }
        if shrink {
            volume.replicas = volume.replicas.saturating_sub(1).max(1);
        }
        if volume.in_sync.contains(&node) {
            volume.in_sync.retain(|id| *id != node);
            volume.epoch += 1;
        }
        Outcome::Volume(volume.clone())
    }

    fn replica_in(&mut self, name: &str, node: u64, by: u64, expect_epoch: Option<u64>) -> Outcome {
        let volume = match self.coordinated_by(name, by) {
            Ok(volume) => volume,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        if expect_epoch.is_some_and(|epoch| epoch != volume.epoch) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "volume {name} changed (epoch {}, expected {}) while node {node} was resynced; resync again",
                volume.epoch,
                expect_epoch.unwrap_or(0)
            )));
        }
        if !volume.replica_nodes.contains(&node) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {node} holds no replica of volume {name}"
            )));
        }
        if !volume.in_sync.contains(&node) {
            volume.in_sync.push(node);
            volume.epoch += 1;
        }
        Outcome::Volume(volume.clone())
    }

    fn set_coordinator(&mut self, name: &str, node: u64) -> Outcome {
        let Some(volume) = self.volumes.get_mut(name) else {
            return Outcome::Rejected(Rejection::Missing(format!("volume {name} does not exist")));
        };
        if !volume.in_sync.contains(&node) {
            return Outcome::Rejected(Rejection::Invalid(format!(
                "node {node} holds no in-sync replica of volume {name} (in sync: {:?})",
                volume.in_sync
            )));
        }
        if volume.coordinator != node {
            // The old coordinator may hold writes it never acknowledged and
            // the others lack: it is out of sync until it is resynced.
            let old = volume.coordinator;
            volume.in_sync.retain(|id| *id != old);
            volume.coordinator = node;
            volume.epoch += 1;
            volume.coordinator_since = volume.epoch;
        }
        Outcome::Volume(volume.clone())
    }

    /// A replica set must name distinct, known nodes.
    fn check_replica_set(&self, replica_nodes: &[u64]) -> Result<(), String> {
        if replica_nodes.is_empty() {
            return Err("a volume needs at least one replica".into());
        }
        for (index, id) in replica_nodes.iter().enumerate() {
            if !self.nodes.contains_key(id) {
                return Err(format!("node {id} is not a member of the cluster"));
            }
            if replica_nodes[..index].contains(id) {
                return Err(format!("node {id} would hold two replicas of one volume"));
            }
        }
        Ok(())
    }

    /// Number of replicas each node holds.
    #[must_use]
    pub fn replicas_per_node(&self) -> BTreeMap<u64, usize> {
        let mut count: BTreeMap<u64, usize> = self.nodes.keys().map(|id| (*id, 0)).collect();
        for volume in self.volumes.values() {
            for node in &volume.replica_nodes {
                *count.entry(*node).or_default() += 1;
            }
        }
        count
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn node(id: u64, zone: Option<&str>) -> NodeRecord {
        NodeRecord {
            id,
            uuid: uuid::Uuid::from_u128(u128::from(id)),
            name: format!("n{id}"),
            peer_address: format!("127.0.0.{id}:9411"),
            api_address: format!("127.0.0.{id}:9410"),
            nbd_address: format!("127.0.0.{id}:10809"),
            labels: zone
                .map(|z| [("zone".to_owned(), z.to_owned())].into())
                .unwrap_or_default(),
            admin: NodeAdmin::Active,
            joined_unix_seconds: 0,
        }
    }

    pub(crate) fn cluster(nodes: u64) -> ClusterState {
        let mut state = ClusterState::default();
        assert_eq!(
            state.apply(Command::Init {
                cluster_id: uuid::Uuid::from_u128(7),
                node: node(1, None),
            }),
            Outcome::Done
        );
        for id in 2..=nodes {
            assert_eq!(state.apply(Command::AddNode { node: node(id, None) }), Outcome::Done);
        }
        state
    }

    pub(crate) fn create(name: &str, replica_nodes: Vec<u64>) -> Command {
        Command::CreateVolume {
            name: name.into(),
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            replica_nodes,
            created_unix_seconds: 5,
            encryption: None,
        }
    }

    #[test]
    fn a_volume_is_attached_to_one_host_at_a_time_unless_forced() {
        let mut state = cluster(2);
        assert!(matches!(state.apply(create("v", vec![1, 2])), Outcome::Volume(_)));
        let attach = |node, force| Command::Attach {
            name: "v".into(),
            node,
            force,
            now_unix: 9,
        };
        assert_eq!(state.apply(attach(1, false)), Outcome::Done);
        assert_eq!(state.apply(attach(1, false)), Outcome::Done, "again on the same host");
        let Outcome::Rejected(Rejection::Exists(reason)) = state.apply(attach(2, false)) else {
            panic!("a second host attached");
        };
        assert!(
            reason.contains("node 1") && reason.contains("--force-failover"),
            "{reason}"
        );
        // A detach by another node changes nothing; by the holder frees it.
        state.apply(Command::Detach {
            name: "v".into(),
            node: 2,
        });
        assert_eq!(state.attachments["v"].node, 1);
        assert_eq!(state.apply(attach(2, true)), Outcome::Done, "forced failover");
        assert_eq!(state.attachments["v"].node, 2);
        state.apply(Command::Detach {
            name: "v".into(),
            node: 2,
        });
        assert!(state.attachments.is_empty());
        assert_eq!(state.apply(attach(1, false)), Outcome::Done);
        state.apply(Command::DeleteVolume { name: "v".into() });
        assert!(state.attachments.is_empty(), "a deleted volume is attached nowhere");
    }

    #[test]
    fn io_limits_are_kept_with_the_volume_and_nonsense_is_refused() {
        let mut state = cluster(1);
        state.apply(create("a", vec![1]));
        let qos = |iops_limit, mib_per_s_limit| Command::SetQos {
            name: "a".into(),
            priority: IoPriority::High,
            iops_limit,
            mib_per_s_limit,
        };
        let Outcome::Volume(volume) = state.apply(qos(Some(5000), Some(200))) else {
            panic!("limits refused")
        };
        assert_eq!(
            (volume.io_priority, volume.iops_limit, volume.mib_per_s_limit),
            (IoPriority::High, Some(5000), Some(200))
        );
        assert!(matches!(
            state.apply(qos(Some(0), None)),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert!(matches!(
            state.apply(qos(None, Some(0))),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert_eq!(state.volumes["a"].iops_limit, Some(5000), "a refusal changes nothing");
        // Lifted, and a volume at the defaults serializes as before protocol 3.
        state.apply(Command::SetQos {
            name: "a".into(),
            priority: IoPriority::Medium,
            iops_limit: None,
            mib_per_s_limit: None,
        });
        let json = serde_json::to_string(&state.volumes["a"]).unwrap();
        assert!(!json.contains("io_priority") && !json.contains("limit"), "{json}");
    }

    #[test]
    fn volume_ids_are_never_reused_and_names_are_unique() {
        let mut state = cluster(3);
        let Outcome::Volume(first) = state.apply(create("a", vec![1, 2])) else {
            panic!()
        };
        assert!(matches!(
            state.apply(create("a", vec![3])),
            Outcome::Rejected(Rejection::Exists(_))
        ));
        assert!(matches!(
            state.apply(Command::DeleteVolume { name: "a".into() }),
            Outcome::Volume(_)
        ));
        let Outcome::Volume(second) = state.apply(create("a", vec![3])) else {
            panic!()
        };
        assert!(second.id > first.id);
        assert_eq!(first.coordinator, 1);
        assert_eq!(first.epoch, 1);
    }

    #[test]
    fn replica_sets_of_unknown_or_repeated_nodes_are_rejected() {
        let mut state = cluster(2);
        assert!(matches!(
            state.apply(create("a", vec![1, 1])),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert!(matches!(
            state.apply(create("a", vec![1, 9])),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert!(matches!(
            state.apply(create("a", vec![])),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert!(state.volumes.is_empty());
    }

    #[test]
    fn resize_shrinks_only_when_allowed_and_init_happens_once() {
        let mut state = cluster(1);
        state.apply(create("a", vec![1]));
        let grow = Command::ResizeVolume {
            name: "a".into(),
            size_bytes: 2 << 30,
            allow_shrink: false,
        };
        assert!(matches!(state.apply(grow), Outcome::Volume(v) if v.size_bytes == 2 << 30));
        let shrink = Command::ResizeVolume {
            name: "a".into(),
            size_bytes: 1 << 20,
            allow_shrink: false,
        };
        assert!(matches!(
            state.apply(shrink.clone()),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        let allowed = Command::ResizeVolume {
            name: "a".into(),
            size_bytes: 1 << 20,
            allow_shrink: true,
        };
        assert!(matches!(state.apply(allowed), Outcome::Volume(v) if v.size_bytes == 1 << 20));
        let again = Command::Init {
            cluster_id: uuid::Uuid::from_u128(8),
            node: node(2, None),
        };
        assert!(matches!(state.apply(again), Outcome::Rejected(_)));
        assert_eq!(state.cluster_id, Some(uuid::Uuid::from_u128(7)));
    }

    #[test]
    fn only_the_coordinator_drops_replicas_and_each_change_bumps_the_epoch() {
        let mut state = cluster(3);
        state.apply(create("a", vec![1, 2, 3]));
        let out = |node, by| Command::ReplicaOut {
            name: "a".into(),
            node,
            by,
        };
        assert!(matches!(
            state.apply(out(3, 2)),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        assert!(matches!(
            state.apply(out(1, 1)),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
        let Outcome::Volume(volume) = state.apply(out(3, 1)) else {
            panic!()
        };
        assert_eq!((volume.in_sync.clone(), volume.epoch), (vec![1, 2], 2));
        // Failing over to an out-of-sync replica is refused; to an in-sync one fences the old coordinator.
        let to = |node| Command::SetCoordinator { name: "a".into(), node };
        assert!(matches!(state.apply(to(3)), Outcome::Rejected(Rejection::Invalid(_))));
        let Outcome::Volume(volume) = state.apply(to(2)) else {
            panic!()
        };
        assert_eq!((volume.coordinator, volume.epoch, volume.coordinator_since), (2, 3, 3));
        assert!(matches!(
            state.apply(out(2, 1)),
            Outcome::Rejected(Rejection::Invalid(_))
        ));
    }

    #[test]
    fn replicas_are_added_out_of_sync_and_removed_but_never_the_coordinator() {
        let mut state = cluster(3);
        state.apply(create("a", vec![1]));
        let add = |node| Command::AddReplica {
            name: "a".into(),
            node,
            grow: true,
        };
        let Outcome::Volume(volume) = state.apply(add(2)) else {
            panic!()
        };
        assert_eq!(
            (volume.replica_nodes.clone(), volume.in_sync.clone(), volume.replicas),
            (vec![1, 2], vec![1], 2)
        );
        assert_eq!(volume.replica_added, BTreeMap::from([(1, 1), (2, 2)]));
        assert!(matches!(state.apply(add(2)), Outcome::Rejected(_)));
        assert!(matches!(state.apply(add(9)), Outcome::Rejected(_)));
        let remove = |node| Command::RemoveReplica {
            name: "a".into(),
            node,
            shrink: true,
        };
        assert!(matches!(state.apply(remove(1)), Outcome::Rejected(_)));
        let Outcome::Volume(volume) = state.apply(remove(2)) else {
            panic!()
        };
        assert_eq!((volume.replica_nodes, volume.replicas), (vec![1], 1));
        assert_eq!(volume.replica_added, BTreeMap::from([(1, 1)]));
        // Added again, it is a new incarnation.
        let Outcome::Volume(volume) = state.apply(add(2)) else {
            panic!()
        };
        assert_eq!(volume.replica_added, BTreeMap::from([(1, 1), (2, 3)]));
    }

    #[test]
    fn a_proposal_retried_under_its_id_is_applied_once_and_answered_alike() {
        let mut state = cluster(2);
        let once = Command::Once {
            id: uuid::Uuid::from_u128(42),
            command: Box::new(create("a", vec![1, 2])),
        };
        let first = state.apply(once.clone());
        assert!(matches!(first, Outcome::Volume(_)));
        assert_eq!(
            state.apply(once),
            first,
            "a retry must get the first outcome, not 'exists'"
        );
        assert_eq!(state.volumes.len(), 1);
        for n in 0..PROPOSALS_REMEMBERED + 5 {
            state.apply(Command::Once {
                id: uuid::Uuid::from_u128(1000 + n as u128),
                command: Box::new(Command::DeleteVolume { name: "none".into() }),
            });
        }
        assert_eq!(state.recent_proposals.len(), PROPOSALS_REMEMBERED);
    }

    #[test]
    fn expired_tokens_are_dropped_when_new_ones_arrive() {
        let mut state = cluster(1);
        let token = |hash: &str, expires| Command::CreateToken {
            hash: hash.into(),
            record: TokenRecord {
                expires_unix_seconds: expires,
            },
            now_unix_seconds: 100,
        };
        state.apply(token("old", 50));
        state.apply(token("new", 500));
        assert_eq!(state.tokens.keys().collect::<Vec<_>>(), vec!["new"]);
    }
}
