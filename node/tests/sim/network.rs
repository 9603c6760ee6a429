//! The simulated network: every openraft RPC goes straight to the target's
//! `Raft` in this process, through seeded faults: cuts between nodes
//! (connection refused, or packets dropped until the RPC times out), loss
//! of the request or of the reply, delay, delay spikes and duplicated
//! delivery. A crashed node refuses connections.
//!
//! The network also watches what leaders put on the wire (`wire::Observer`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use node::cluster::TypeConfig;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::Rng;

use super::wire::Observer;

pub type NodeId = u64;
pub type SimRaft = Raft<TypeConfig>;

/// How a cut link fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Connection refused at once (openraft backs off).
    Refused,
    /// Packets vanish: the caller waits out its RPC time-out.
    Dropped,
}

/// The fault parameters in force; the driver changes them between steps.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Directed: `(from, to)` cannot reach `to`.
    pub cuts: BTreeMap<(NodeId, NodeId), CutMode>,
    pub loss_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// Each leg (request, reply) takes 0..=this.
    pub delay_ms_max: u64,
    pub spike_per_mille: u32,
    pub spike_ms_max: u64,
}

impl Faults {
    /// No faults: what the liveness phase runs on.
    pub fn calm() -> Self {
        Self {
            delay_ms_max: 2,
            ..Self::default()
        }
    }
}

/// What happened on the wire, for the run's summary line.
#[derive(Clone, Debug, Default)]
pub struct NetStats {
    pub delivered: u64,
    pub lost: u64,
    pub refused: u64,
    pub cut: u64,
    pub duplicated: u64,
    pub snapshots: u64,
}

struct Inner {
    rng: StdRng,
    faults: Faults,
    /// Running nodes: incarnation and handle. A crashed node is absent.
    live: BTreeMap<NodeId, (u64, SimRaft)>,
    observer: Observer,
    stats: NetStats,
}

/// The network shared by all simulated nodes.
pub struct Net {
    inner: Mutex<Inner>,
}

/// How one RPC will travel, drawn when it is sent.
struct Route {
    incarnation: u64,
    request_delay: Duration,
    reply_delay: Duration,
    request_lost: bool,
    reply_lost: bool,
    duplicate_after: Option<Duration>,
}

enum Failure {
    Refused,
    TimedOut,
    Reset,
}

#[derive(Debug)]
struct SimFault(&'static str);

impl std::fmt::Display for SimFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SimFault {}

impl Failure {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match self {
            Self::Refused => RPCError::Unreachable(Unreachable::new(&SimFault("connection refused"))),
            Self::TimedOut => RPCError::Network(NetworkError::new(&SimFault("timed out"))),
            Self::Reset => RPCError::Network(NetworkError::new(&SimFault("connection reset"))),
        }
    }
}

impl Net {
    pub fn new(rng: StdRng, faults: Faults) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                rng,
                faults,
                live: BTreeMap::new(),
                observer: Observer::default(),
                stats: NetStats::default(),
            }),
        })
    }

    pub fn register(&self, id: NodeId, incarnation: u64, raft: SimRaft) {
        let previous = self.inner.lock().live.insert(id, (incarnation, raft));
        assert!(previous.is_none(), "node {id} registered twice");
    }

    pub fn unregister(&self, id: NodeId) {
        let removed = self.inner.lock().live.remove(&id);
        assert!(removed.is_some(), "node {id} was not running");
    }

    /// The running node `id`, as a client would reach it.
    pub fn raft(&self, id: NodeId) -> Option<SimRaft> {
        self.inner.lock().live.get(&id).map(|(_, raft)| raft.clone())
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.inner.lock().faults.clone()
    }

    pub fn stats(&self) -> NetStats {
        self.inner.lock().stats.clone()
    }

    pub fn with_observer<T>(&self, f: impl FnOnce(&mut Observer) -> T) -> T {
        f(&mut self.inner.lock().observer)
    }

    fn route(&self, from: NodeId, to: NodeId, duplicable: bool) -> Result<Route, Failure> {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some((incarnation, _)) = inner.live.get(&to) else {
            inner.stats.refused += 1;
            return Err(Failure::Refused);
        };
        let incarnation = *incarnation;
        if let Some(mode) = inner.faults.cuts.get(&(from, to)) {
            inner.stats.cut += 1;
            return Err(match mode {
                CutMode::Refused => Failure::Refused,
                CutMode::Dropped => Failure::TimedOut,
            });
        }
        let faults = &inner.faults;
        let rng = &mut inner.rng;
        let leg = |rng: &mut StdRng| {
            let mut delay_ms = rng.gen_range(0..=faults.delay_ms_max);
            if rng.gen_range(0..1000) < faults.spike_per_mille {
                delay_ms += rng.gen_range(0..=faults.spike_ms_max);
            }
            Duration::from_millis(delay_ms)
        };
        let request_delay = leg(rng);
        let reply_delay = leg(rng);
        let request_lost = rng.gen_range(0..1000) < faults.loss_per_mille;
        let reply_lost = rng.gen_range(0..1000) < faults.loss_per_mille;
        let duplicate = duplicable && rng.gen_range(0..1000) < faults.duplicate_per_mille;
        let duplicate_after = duplicate.then(|| leg(rng) + Duration::from_millis(rng.gen_range(0..=200)));
        if request_lost || reply_lost {
            inner.stats.lost += 1;
        }
        if duplicate {
            inner.stats.duplicated += 1;
        }
        Ok(Route {
            incarnation,
            request_delay,
            reply_delay,
            request_lost,
            reply_lost,
            duplicate_after,
        })
    }

    /// The incarnation `incarnation` of `to`, if it still runs and `from` still reaches it.
    fn deliverable(&self, from: NodeId, to: NodeId, incarnation: u64) -> Result<SimRaft, Failure> {
        let inner = self.inner.lock();
        match inner.live.get(&to) {
            Some((running, raft)) if *running == incarnation => {
                if inner.faults.cuts.contains_key(&(from, to)) {
                    Err(Failure::TimedOut)
                } else {
                    Ok(raft.clone())
                }
            }
            // The process this message was sent to is gone.
            _ => Err(Failure::Reset),
        }
    }

    /// Carries one request from `from` to `to` and its reply back.
    async fn exchange<Resp, E, Fut>(
        self: &Arc<Self>,
        from: NodeId,
        to: NodeId,
        option: &RPCOption,
        duplicable: bool,
        deliver: Arc<dyn Fn(SimRaft) -> Fut + Send + Sync>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Fut: Future<Output = Result<Resp, RaftError<NodeId, E>>> + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
    {
        let timeout = option.hard_ttl();
        let route = match self.route(from, to, duplicable) {
            Ok(route) => route,
            Err(Failure::TimedOut) => {
                tokio::time::sleep(timeout).await;
                return Err(Failure::TimedOut.into_rpc());
            }
            Err(failure) => return Err(failure.into_rpc()),
        };
        if let Some(after) = route.duplicate_after {
            let (net, deliver) = (Arc::clone(self), Arc::clone(&deliver));
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Ok(raft) = net.deliverable(from, to, route.incarnation) {
                    let _ = deliver(raft).await;
                }
            });
        }
        tokio::time::sleep(route.request_delay).await;
        if route.request_lost {
            tokio::time::sleep(timeout).await;
            return Err(Failure::TimedOut.into_rpc());
        }
        let raft = match self.deliverable(from, to, route.incarnation) {
            Ok(raft) => raft,
            Err(Failure::TimedOut) => {
                tokio::time::sleep(timeout).await;
                return Err(Failure::TimedOut.into_rpc());
            }
            Err(failure) => return Err(failure.into_rpc()),
        };
        let result = deliver(raft).await;
        tokio::time::sleep(route.reply_delay).await;
        if route.reply_lost {
            tokio::time::sleep(timeout).await;
            return Err(Failure::TimedOut.into_rpc());
        }
        self.inner.lock().stats.delivered += 1;
        match result {
            Ok(reply) => Ok(reply),
            // The target stopped while handling it: to the caller, a dropped connection.
            Err(RaftError::Fatal(_)) => Err(Failure::Reset.into_rpc()),
            Err(error) => Err(RPCError::RemoteError(RemoteError::new(to, error))),
        }
    }
}

/// Makes `SimNetwork`s for one node.
pub struct SimNetworkFactory {
    pub from: NodeId,
    pub net: Arc<Net>,
}

impl RaftNetworkFactory<TypeConfig> for SimNetworkFactory {
    type Network = SimNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        SimNetwork {
            from: self.from,
            to: target,
            net: Arc::clone(&self.net),
        }
    }
}

/// RPCs from one node to another.
pub struct SimNetwork {
    from: NodeId,
    to: NodeId,
    net: Arc<Net>,
}

impl RaftNetwork<TypeConfig> for SimNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.net.with_observer(|observer| observer.on_append(self.from, &rpc));
        let deliver = Arc::new(move |raft: SimRaft| {
            let rpc = rpc.clone();
            async move { raft.append_entries(rpc).await }
        });
        self.net.exchange(self.from, self.to, &option, true, deliver).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.net.with_observer(|observer| observer.on_snapshot(self.from, &rpc));
        self.net.inner.lock().stats.snapshots += 1;
        // Snapshot chunks carry offsets; a duplicate would only be refused, so none are made.
        let deliver = Arc::new(move |raft: SimRaft| {
            let rpc = rpc.clone();
            async move { raft.install_snapshot(rpc).await }
        });
        self.net.exchange(self.from, self.to, &option, false, deliver).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let deliver = Arc::new(move |raft: SimRaft| {
            let rpc = rpc.clone();
            async move { raft.vote(rpc).await }
        });
        self.net.exchange(self.from, self.to, &option, true, deliver).await
    }
}
