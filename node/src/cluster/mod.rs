//! Cluster membership and metadata: an embedded Raft group (openraft over
//! the peer protocol, redb-backed: `store`, `network`) whose state machine
//! (`state`) holds the nodes, volumes, replica sets, epochs and join
//! tokens. Every change goes through `Cluster::propose`; a follower hands
//! its proposal to the leader over the peer protocol.
//!
//! Around it: `join` (init, tokens, join), `health` (every node pings the
//! others and learns their free space), `placement`, and `reconcile`
//! (makes this node's local replicas match the cluster's volumes).

pub mod alerts;
pub mod automation;
pub mod backups;
pub mod decommission;
pub mod health;
pub mod join;
pub mod lease;
pub mod network;
pub mod placement;
pub mod reconcile;
pub mod snapshots;
pub mod state;
pub mod status;
pub mod store;
pub mod volumes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use parking_lot::RwLock;
use std::io::Cursor;
use thiserror::Error;

use crate::peer::client::PeerClient;
use crate::peer::frame::FrameKind;
use crate::peer::server::PeerHandler;
use health::{Health, NodeReport};
use state::{ClusterState, Command, NodeRecord, Outcome, Rejection};
use store::{ClusterDb, LogStore, StateMachine};

openraft::declare_raft_types!(
    /// ballast's Raft: commands in, outcomes out, u64 node ids, peer addresses as nodes.
    pub TypeConfig: D = Command, R = Outcome, SnapshotData = Cursor<Vec<u8>>,
);

/// Longest a proposal waits for a leader and a commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Raft heartbeat; elections start after 4-8 missed ones.
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
/// Each Raft instance draws its election timeout once, uniformly from [min, max).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1000;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 2000;
/// A snapshot is built after this many applied entries since the last one.
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 1000;
/// Entries a snapshot leaves in the log (for slightly lagging followers).
pub const SNAPSHOT_LOGS_KEPT: u64 = 100;
/// A forwarded request to a peer waits at most this long per try.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of cluster operations.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// this node has not been initialized or joined
    #[error("this node is not in a cluster yet: run `ballast cluster init` on the first node, `ballast cluster join` on the others")]
    NotInCluster,
    /// init or join on a node that is a member already
    #[error("this node is already a member of cluster {0}")]
    AlreadyMember(uuid::Uuid),
    /// no leader could commit in time (quorum lost?)
    #[error("no Raft leader committed the change within {0:?}: is a majority of the voting nodes up and reachable? (`ballast cluster status`)")]
    NoQuorum(Duration),
    /// the state machine refused the change
    #[error("{0}")]
    Rejected(Rejection),
    /// a bad request
    #[error("{0}")]
    Invalid(String),
    /// a join failed
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// Raft stopped (fatal storage error) or another internal failure
    #[error("cluster: {0}")]
    Internal(String),
}

/// How this node describes itself to the cluster.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub id: u64,
    pub uuid: uuid::Uuid,
    pub name: String,
    pub peer_address: String,
    pub api_address: String,
    pub nbd_address: String,
    pub labels: BTreeMap<String, String>,
}

impl LocalNode {
    fn record(&self, admin: state::NodeAdmin) -> NodeRecord {
        NodeRecord {
            id: self.id,
            uuid: self.uuid,
            name: self.name.clone(),
            peer_address: self.peer_address.clone(),
            api_address: self.api_address.clone(),
            nbd_address: self.nbd_address.clone(),
            labels: self.labels.clone(),
            admin,
            joined_unix_seconds: crate::datadir::now_unix_seconds(),
        }
    }
}

/// This node's view of and handle on the cluster.
pub struct Cluster {
    pub local: LocalNode,
    pub raft: Raft<TypeConfig>,
    db: Arc<ClusterDb>,
    /// Shared with the peer client, whose hellos carry it.
    cluster_id: Arc<RwLock<Option<uuid::Uuid>>>,
    state: Arc<RwLock<ClusterState>>,
    applied: Arc<tokio::sync::watch::Sender<u64>>,
    pub client: Arc<PeerClient>,
    pub health: Health,
    /// This node's local replicas (set once at start-up).
    volumes: Arc<std::sync::OnceLock<Arc<crate::volume::Volumes>>>,
    /// Multiplexed data-path connections, by peer address and the reactor
    /// whose volumes use them (`link_for`).
    links: parking_lot::Mutex<std::collections::HashMap<LinkKey, Arc<crate::peer::mux::MuxLink>>>,
    /// Replication of the volumes this node coordinates, by name.
    replications: parking_lot::Mutex<std::collections::HashMap<String, Arc<crate::replication::VolumeReplication>>>,
    /// Resyncs running: (volume, replica node).
    resyncing: parking_lot::Mutex<std::collections::HashSet<(String, u64)>>,
    /// When the leader fails over and rebuilds by itself.
    automation: RwLock<automation::Automation>,
    replica_timeout: RwLock<Duration>,
    /// Where the leader POSTs alert changes.
    alert_webhook: RwLock<Option<String>>,
    /// This node's certificate for the peer port (mutual TLS).
    pub tls: Arc<crate::peer::tls::PeerTls>,
    data_dir: std::path::PathBuf,
    /// The durable dirty-region map of the volumes this node coordinates.
    dirty: Arc<crate::replication::dirty::DirtyLog>,
    /// The last resync of each (volume, replica), for `volume inspect`.
    resyncs: parking_lot::Mutex<std::collections::BTreeMap<(String, u64), crate::replication::resync::ResyncStatus>>,
    /// The scrubs of the volumes this node coordinates.
    pub scrubs: crate::replication::scrub::Scrubs,
    /// Volumes whose scheduled snapshot (or its expiry) is under way here.
    pub(crate) scheduled_snapshots: parking_lot::Mutex<std::collections::BTreeSet<String>>,
    /// Backups and restores of backups run by this node.
    pub backup_jobs: Arc<crate::backup::job::Jobs>,
    /// Scheduled backups of the volumes this node coordinates: when each
    /// last succeeded (read from its target once), and which are under way.
    pub(crate) scheduled_backups: backups::Scheduled,
    /// Volumes whose copy here may lack acknowledged writes (the log of
    /// their disk ended at a damaged batch), with when that was found:
    /// not served from here until another copy was compared with it.
    pub suspects: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Serving leases: this node's, and as leader, who renewed when.
    pub leases: lease::Leases,
}

/// A node id from the node's uuid: stable for the data directory's life,
/// short enough for people to type (32 bits; a join that would collide with
/// another node's id is refused, see `join::admit`).
#[must_use]
pub fn node_id_of(node_uuid: uuid::Uuid) -> u64 {
    let bytes = node_uuid.as_bytes();
    u64::from(u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))).max(1)
}

impl Cluster {
    /// Opens the cluster metadata of `data_dir` and starts Raft (idle until
    /// the node is initialized or joined).
    pub async fn open(
        data_dir: &std::path::Path,
        local: LocalNode,
        report: Box<dyn Fn() -> NodeReport + Send + Sync>,
    ) -> anyhow::Result<Arc<Self>> {
        let db = ClusterDb::open(data_dir)?;
        // It holds the cluster CA's key (`peer::tls`): owner only.
        std::fs::set_permissions(
            data_dir.join(store::CLUSTER_FILE),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let tls = Arc::new(crate::peer::tls::PeerTls::default());
        if let Some(bundle) = crate::peer::tls::read_bundle(data_dir)? {
            tls.install(&bundle)
                .map_err(|error| anyhow::anyhow!("the node certificate in {}: {error}", data_dir.display()))?;
        }
        let dirty = crate::replication::dirty::DirtyLog::open(data_dir)?;
        let cluster_id = db.cluster_id()?;
        let machine = StateMachine::open(Arc::clone(&db))?;
        let (state, applied) = (Arc::clone(&machine.state), Arc::clone(&machine.applied));
        let config = openraft::Config {
            cluster_name: "ballast".into(),
            heartbeat_interval: HEARTBEAT_INTERVAL_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_LOGS_SINCE_LAST),
            max_in_snapshot_log_to_keep: SNAPSHOT_LOGS_KEPT,
            ..Default::default()
        }
        .validate()
        .map_err(|error| anyhow::anyhow!("raft config: {error}"))?;
        let identity_cell = Arc::new(RwLock::new(cluster_id));
        let identity = {
            let cell = Arc::clone(&identity_cell);
            let id = local.id;
            Arc::new(move || (*cell.read(), id)) as Arc<dyn Fn() -> (Option<uuid::Uuid>, u64) + Send + Sync>
        };
        let bind_ip = local.peer_address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let client = Arc::new(PeerClient::new(identity, bind_ip, Arc::clone(&tls)));
        let network = network::PeerNetworkFactory {
            client: Arc::clone(&client),
        };
        let raft = Raft::new(
            local.id,
            Arc::new(config),
            network,
            LogStore::new(Arc::clone(&db)),
            machine,
        )
        .await
        .map_err(|error| anyhow::anyhow!("cannot start raft: {error}"))?;
        let cluster = Arc::new(Self {
            health: Health::new(local.id, report),
            local,
            raft,
            db,
            cluster_id: identity_cell,
            state,
            applied,
            client,
            volumes: Arc::new(std::sync::OnceLock::new()),
            dirty,
            tls,
            data_dir: data_dir.to_owned(),
            links: parking_lot::Mutex::new(std::collections::HashMap::new()),
            replications: parking_lot::Mutex::new(std::collections::HashMap::new()),
            resyncing: parking_lot::Mutex::new(std::collections::HashSet::new()),
            resyncs: parking_lot::Mutex::new(BTreeMap::new()),
            scrubs: crate::replication::scrub::Scrubs::new(),
            scheduled_snapshots: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
            backup_jobs: Arc::default(),
            scheduled_backups: backups::Scheduled::default(),
            suspects: parking_lot::Mutex::new(std::collections::HashMap::new()),
            leases: lease::Leases::default(),
            automation: RwLock::new(automation::Automation::default()),
            replica_timeout: RwLock::new(crate::replication::REPLICA_TIMEOUT_DEFAULT),
            alert_webhook: RwLock::new(None),
        });
        Ok(cluster)
    }

    /// Sets when this node, as leader, fails over and rebuilds by itself.
    pub fn set_automation(&self, automation: automation::Automation) {
        *self.automation.write() = automation;
    }

    /// When this node, as leader, fails over and rebuilds by itself.
    pub fn automation(&self) -> automation::Automation {
        *self.automation.read()
    }

    /// How long a replica may take to make a mutation durable before the
    /// coordinator drops it from the in-sync set.
    pub fn replica_timeout(&self) -> Duration {
        *self.replica_timeout.read()
    }

    /// Issues this node a certificate from the cluster CA, stores it in the
    /// data directory and uses it for new peer connections (open ones keep
    /// theirs): renewal without downtime.
    pub fn renew_certificate(&self) -> Result<crate::peer::tls::Bundle, ClusterError> {
        let cluster_id = self.require_member()?;
        let ca = self
            .with_state(|state| state.ca.clone())
            .ok_or_else(|| ClusterError::Internal("the cluster has no CA yet".into()))?;
        let bundle = crate::peer::tls::issue(&ca, cluster_id, self.local.id).map_err(ClusterError::Internal)?;
        self.install_certificate(&bundle)?;
        Ok(bundle)
    }

    /// Stores `bundle` in the data directory and uses it from now on.
    pub fn install_certificate(&self, bundle: &crate::peer::tls::Bundle) -> Result<(), ClusterError> {
        crate::peer::tls::write_bundle(&self.data_dir, bundle)
            .map_err(|error| ClusterError::Internal(format!("cannot store the node certificate: {error}")))?;
        self.tls.install(bundle).map_err(ClusterError::Internal)
    }

    /// Sets where the leader POSTs alert changes.
    pub fn set_alert_webhook(&self, url: Option<String>) {
        *self.alert_webhook.write() = url;
    }

    #[must_use]
    pub fn alert_webhook(&self) -> Option<String> {
        self.alert_webhook.read().clone()
    }

    /// Sets `replica_timeout_ms` (applies to volumes coordinated from now on).
    pub fn set_replica_timeout(&self, timeout: Duration) {
        *self.replica_timeout.write() = timeout;
    }

    /// Hands the cluster this node's local replicas (once, at start-up).
    pub fn attach_volumes(&self, volumes: Arc<crate::volume::Volumes>) {
        let _ = self.volumes.set(volumes);
    }

    /// The data-path link from `volume` to the peer at `address` (made on
    /// first use): one connection per peer and reactor, so volumes on
    /// different cores share no connection, send lock or reader, and the
    /// replies of a volume's replicas are read on the reactor that serves
    /// it (its disk's), which wakes its writers without a system call.
    /// Every replica message of a volume goes through this one link (live
    /// writes, catch-up and resync copies alike: their order matters).
    /// (Without a local copy of the volume, the link of no reactor.)
    pub fn link_for(&self, address: &str, volume: Option<&crate::volume::Volume>) -> Arc<crate::peer::mux::MuxLink> {
        let reactor = volume.and_then(|volume| {
            volume
                .engine()
                .host_of_disk(volume.disk_index())
                .map(|host| host.reactor)
        });
        self.link_on(address, reactor)
    }

    /// The data-path links made so far: (peer address, reactor).
    pub fn links(&self) -> Vec<(String, Option<usize>)> {
        let mut links: Vec<_> = self.links.lock().keys().cloned().collect();
        links.sort_unstable();
        links
    }

    /// The data-path link to the peer at `address` for the volumes of
    /// `reactor` (None: no reactor runs them, e.g. the thread pool).
    fn link_on(&self, address: &str, reactor: Option<usize>) -> Arc<crate::peer::mux::MuxLink> {
        let mut links = self.links.lock();
        Arc::clone(links.entry((address.to_owned(), reactor)).or_insert_with(|| {
            let volumes = Arc::clone(&self.volumes);
            let reader_host: crate::peer::mux::ReaderHost =
                Arc::new(move |reading| host_on_reactor(&volumes, reading, reactor));
            Arc::new(crate::peer::mux::MuxLink::new(
                Arc::clone(&self.client),
                address.to_owned(),
                Some(reader_host),
            ))
        }))
    }

    /// The replication of a volume this node coordinates.
    pub fn replication(&self, name: &str) -> Option<Arc<crate::replication::VolumeReplication>> {
        self.replications.lock().get(name).cloned()
    }

    /// The replication of `name`, made on first use.
    pub fn replication_or_new(
        self: &Arc<Self>,
        name: &str,
        volume_id: u64,
    ) -> Arc<crate::replication::VolumeReplication> {
        let mut replications = self.replications.lock();
        Arc::clone(replications.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(crate::replication::VolumeReplication::new(
                Arc::downgrade(self),
                name.to_owned(),
                volume_id,
                self.replica_timeout(),
                Arc::clone(&self.dirty),
            ))
        }))
    }

    /// Forgets the replication of a volume this node no longer coordinates
    /// (and the dirty regions it tracked: another coordinator took over).
    pub fn drop_replication(&self, name: &str, volume_id: u64) {
        match self.replications.lock().remove(name) {
            Some(replication) => replication.forget_all(),
            None => self.dirty.forget(volume_id, None),
        }
    }

    /// Marks a resync as running; false if it already was.
    pub fn begin_resync(&self, name: &str, node: u64) -> bool {
        self.resyncing.lock().insert((name.to_owned(), node))
    }

    /// Records how a resync stands.
    pub fn note_resync(&self, name: &str, status: crate::replication::resync::ResyncStatus) {
        self.resyncs.lock().insert((name.to_owned(), status.node), status);
    }

    /// The resyncs of `name` this node ran or runs.
    /// This node's report, with the resyncs it runs as coordinator.
    pub async fn report(&self) -> health::NodeReport {
        let mut report = self.health.local_report().await;
        report.cert_expires_unix = self.tls.expires_unix();
        report.resyncs = self
            .resyncs
            .lock()
            .iter()
            .map(|((volume, _), status)| (volume.clone(), status.clone()))
            .collect();
        report.scrubs = self.scrubs.all();
        report
    }

    pub fn resyncs_of(&self, name: &str) -> Vec<crate::replication::resync::ResyncStatus> {
        self.resyncs
            .lock()
            .iter()
            .filter(|((volume, _), _)| volume == name)
            .map(|(_, status)| status.clone())
            .collect()
    }

    /// Marks a resync as over.
    pub fn end_resync(&self, name: &str, node: u64) {
        self.resyncing.lock().remove(&(name.to_owned(), node));
    }

    /// The cluster this node belongs to, if any.
    pub fn cluster_id(&self) -> Option<uuid::Uuid> {
        *self.cluster_id.read()
    }

    fn set_cluster_id(&self, cluster_id: Option<uuid::Uuid>) -> Result<(), ClusterError> {
        self.db
            .set_cluster_id(cluster_id)
            .map_err(|error| ClusterError::Internal(error.to_string()))?;
        *self.cluster_id.write() = cluster_id;
        Ok(())
    }

    /// The applied metadata (may trail the leader by a heartbeat).
    pub fn state(&self) -> ClusterState {
        self.state.read().clone()
    }

    /// Reads the applied metadata without copying it.
    pub fn with_state<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read())
    }

    /// Waits for the next applied change (or `limit`).
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Fails unless this node is in a cluster.
    pub fn require_member(&self) -> Result<uuid::Uuid, ClusterError> {
        self.cluster_id().ok_or(ClusterError::NotInCluster)
    }

    /// Commits `command` through Raft (via the leader) and returns its outcome.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ClusterError> {
        self.require_member()?;
        // One id for every try: a retry after a lost answer is not applied twice.
        let command = match command {
            once @ Command::Once { .. } => once,
            command => Command::Once {
                id: uuid::Uuid::new_v4(),
                command: Box::new(command),
            },
        };
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        while started.elapsed() < PROPOSE_TIMEOUT {
            match self.raft.client_write(command.clone()).await {
                Ok(response) => return Ok(response.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                    if let Some(leader) = forward.leader_node {
                        match self.forward_proposal(&leader, &command).await {
                            Ok(outcome) => return Ok(outcome),
                            Err(error) => {
                                tracing::debug!(%error, leader = %leader.addr, "proposal forward failed; retrying")
                            }
                        }
                    }
                }
                Err(RaftError::APIError(error)) => return Err(ClusterError::Internal(error.to_string())),
                Err(RaftError::Fatal(error)) => return Err(ClusterError::Internal(format!("raft stopped: {error}"))),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        Err(ClusterError::NoQuorum(PROPOSE_TIMEOUT))
    }

    async fn forward_proposal(&self, leader: &BasicNode, command: &Command) -> Result<Outcome, String> {
        let payload = serde_json::to_vec(command).map_err(|e| e.to_string())?;
        let (kind, reply) = self
            .client
            .call(&leader.addr, FrameKind::Propose, &payload, FORWARD_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        if kind != FrameKind::ProposeReply {
            return Err(format!("unexpected reply {kind:?}"));
        }
        let result: Result<Outcome, String> = serde_json::from_slice(&reply).map_err(|e| e.to_string())?;
        result
    }

    /// Proposes and turns a rejection into an error.
    pub async fn change(&self, command: Command) -> Result<Outcome, ClusterError> {
        match self.propose(command).await? {
            Outcome::Rejected(rejection) => Err(ClusterError::Rejected(rejection)),
            outcome => Ok(outcome),
        }
    }

    /// The peer address of the current leader, if known.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Starts the background work: health pings and metadata refresh.
    pub fn spawn_background(self: &Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(health::ping_loop(Arc::clone(self), stop.clone()));
        tokio::spawn(lease::lease_loop(Arc::clone(self), stop.clone()));
        tokio::spawn(join::refresh_own_record(Arc::clone(self), stop.clone()));
        tokio::spawn(automation::automation_loop(Arc::clone(self), stop));
    }

    /// Who is a voter, who a learner (from the applied membership).
    pub fn roles(&self) -> (Vec<u64>, Vec<u64>) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        (voters, learners)
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }
}

/// A data-path link's peer address and the reactor whose volumes use it.
type LinkKey = (String, Option<usize>);

/// Runs a peer connection's work on a reactor: `reactor` if given, else the
/// caller's own if it runs on one, else each in turn
/// (`BALLAST_PEER_ON_REACTORS=0`: on the runtime). Hands it back when there
/// is no reactor to run it (no volumes yet, the thread pool).
fn host_on_reactor(
    volumes: &std::sync::OnceLock<Arc<crate::volume::Volumes>>,
    served: crate::peer::server::HostedConnection,
    reactor: Option<usize>,
) -> Result<(), crate::peer::server::HostedConnection> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let on = *ON.get_or_init(|| std::env::var("BALLAST_PEER_ON_REACTORS").map_or(true, |value| value != "0"));
    let Some(volumes) = volumes.get().filter(|_| on) else {
        return Err(served);
    };
    let engine = volumes.engine();
    let hosts = engine.hosts();
    if hosts.is_empty() {
        return Err(served);
    }
    let host = hosts
        .iter()
        .find(|host| Some(host.reactor) == reactor)
        .or_else(|| hosts.iter().find(|host| host.waker.is_current()))
        .unwrap_or_else(|| &hosts[NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % hosts.len()]);
    if let Err(error) = engine.host_future(host, served) {
        // The engine is stopping: the connection ends (the dropped guest drops it).
        tracing::debug!(%error, "peer connection not hosted");
    }
    Ok(())
}

impl PeerHandler for Cluster {
    fn identity(&self) -> (Option<uuid::Uuid>, u64) {
        (self.cluster_id(), self.local.id)
    }

    /// On a reactor (in turn), like NBD connections: a replica write read
    /// off the connection reaches the store, and its acknowledgement the
    /// socket, on that thread, with no hop through the runtime's threads
    /// (`BALLAST_PEER_ON_REACTORS=0`: on the runtime).
    fn host(&self, served: crate::peer::server::HostedConnection) -> Result<(), crate::peer::server::HostedConnection> {
        host_on_reactor(&self.volumes, served, None)
    }

    async fn handle(&self, kind: FrameKind, payload: Vec<u8>) -> Result<(FrameKind, Vec<u8>), String> {
        match kind {
            FrameKind::RaftAppend | FrameKind::RaftVote | FrameKind::RaftSnapshot => {
                network::dispatch(&self.raft, kind, &payload, |leader| self.heard_from_leader(leader))
                    .await
                    .map(|reply| (FrameKind::RaftReply, reply))
            }
            FrameKind::Propose => {
                let command: Command =
                    serde_json::from_slice(&payload).map_err(|error| format!("unreadable proposal: {error}"))?;
                let result = match self.raft.client_write(command).await {
                    Ok(response) => Ok(response.data),
                    Err(error) => Err(format!("not committed here: {error}")),
                };
                let reply = serde_json::to_vec(&result).map_err(|e| e.to_string())?;
                Ok((FrameKind::ProposeReply, reply))
            }
            FrameKind::Ping => {
                let report = self.report().await;
                Ok((FrameKind::Pong, serde_json::to_vec(&report).map_err(|e| e.to_string())?))
            }
            FrameKind::ServingQuery => self
                .answer_serving(&payload)
                .map(|answer| (FrameKind::ServingAnswer, answer)),
            FrameKind::LeaseRequest => self
                .grant_lease(&payload)
                .await
                .map(|grant| (FrameKind::LeaseGrant, grant)),
            FrameKind::Join => join::handle_join(self, &payload)
                .await
                .map(|reply| (FrameKind::JoinReply, reply)),
            FrameKind::ReplicaWrite => {
                let volumes = self.volumes.get().ok_or("this node is starting")?;
                let tenure = |name: &str| self.state.read().volumes.get(name).map_or(0, |v| v.coordinator_since);
                let local = self.local.id;
                let holds = |name: &str, id: u64| {
                    self.state.read().volumes.get(name).is_some_and(|volume| {
                        volume
                            .snapshots
                            .values()
                            .any(|taken| taken.id == id && taken.ready && taken.holders.contains(&local))
                    })
                };
                crate::replication::apply(volumes, payload, tenure, holds)
                    .await
                    .map(|()| (FrameKind::ReplicaAck, Vec::new()))
            }
            FrameKind::ReplicaFence => {
                let volumes = self.volumes.get().ok_or("this node is starting")?;
                crate::replication::raise_epoch(volumes, &payload)
                    .await
                    .map(|()| (FrameKind::ReplicaAck, Vec::new()))
            }
            FrameKind::ReplicaRead => {
                let volumes = self.volumes.get().ok_or("this node is starting")?;
                crate::replication::read(volumes, &payload)
                    .await
                    .map(|data| (FrameKind::ReplicaData, data))
            }
            FrameKind::ReplicaScrub => {
                let volumes = self.volumes.get().ok_or("this node is starting")?;
                // A scrub's reads take what this disk's clients leave.
                crate::engine::sched::as_background(
                    crate::engine::Work::Scrub,
                    crate::replication::scrub::answer(volumes, &payload),
                )
                .await
                .map(|answer| (FrameKind::ReplicaScrubbed, answer))
            }
            other => Err(format!("{other:?} is not a request")),
        }
    }
}
