//! The replication simulator's parts: one `Sim` (shared, single-threaded)
//! holds the nodes, the network, the metadata service and the checker; the
//! seed runner puts it on a current-thread tokio runtime with paused time.

pub mod check;
pub mod dirty;
pub mod disk;
pub mod net;
pub mod node;
pub mod raft;
pub mod world;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Once;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

/// Real time one seed may take before it counts as hung (a seed takes well
/// under a second; a deadlock or a task spinning without letting simulated
/// time pass would otherwise hang the run).
const SEED_WALL_TIME_MAX: Duration = Duration::from_secs(120);

thread_local! {
    static CURRENT_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

fn install_seed_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(seed) = CURRENT_SEED.with(Cell::get) {
                eprintln!(
                    "repl_sim: panic in seed={seed} (rerun: BALLAST_REPL_SIM_SEED={seed} cargo test -p node --test repl_sim -- --nocapture)"
                );
            }
            default(info);
        }));
    });
}

/// Runs `make(seed)` on a current-thread runtime with paused time, inside a
/// `LocalSet` (the simulation shares state through `Rc`).
pub fn simulate<T, F: Future<Output = T>>(seed: u64, future: F) -> T {
    install_seed_hook();
    CURRENT_SEED.with(|current| current.set(Some(seed)));
    let (done, watched) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(SEED_WALL_TIME_MAX) {
            eprintln!("repl_sim: seed={seed} still runs after {SEED_WALL_TIME_MAX:?} of real time: hung");
            std::process::exit(101);
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    let output = local.block_on(&runtime, future);
    drop(local);
    drop(runtime);
    drop(done);
    watchdog.join().expect("the watchdog ends");
    CURRENT_SEED.with(|current| current.set(None));
    output
}

/// Simulation parameters of one run (all drawn from the seed, or fixed by a
/// targeted test).
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Nodes in the cluster (ids 1..=nodes).
    pub nodes: u64,
    /// Replicas of the volume (on nodes 1..=replicas; node 1 coordinates first).
    pub replicas: u64,
    pub volume_blocks: u64,
    /// How long a replica may take to answer (`replica_timeout_ms`).
    pub replica_timeout: Duration,
    /// A proposal from a node cut off from the Raft majority fails after this.
    pub raft_timeout: Duration,
    /// The client gives a request up after this (its outcome is then unknown).
    pub client_timeout: Duration,
    /// Simulated length of the phase with faults.
    pub safety_phase: Duration,
    /// Most simulated time healing may take before the run fails.
    pub healing_max: Duration,
    /// Faults injected during the safety phase, at most.
    pub faults_max: u32,
    /// Client requests in flight at once, at most.
    pub client_depth: usize,
    /// Message loss / duplication in percent (while enabled).
    pub loss_percent: u32,
    pub duplicate_percent: u32,
    /// Proposed fix, not in the code yet: a catch-up write that fails after
    /// its replica was promoted (`ReplicaIn` committed, `promote` or the
    /// reconciler made it a target, `joining` cleared) drops it through
    /// Raft before the ack, like a joining one. The code only looks at
    /// `is_joining` and acknowledges without the now in-sync replica.
    pub fix_promoted_catch_up_failure: bool,
    /// Proposed fix, not in the code yet: `prepare` takes the in-flight
    /// guard, marks the dirty regions and snapshots the targets at one
    /// instant, and `replicate` sends to that snapshot. The code marks in
    /// `prepare` (a target is skipped) and snapshots later in `replicate`
    /// (after waiting for the guard or the dirty log): a target dropped in
    /// between gets neither the write nor a dirty mark.
    pub fix_prepare_snapshot: bool,
    /// Proposed fix, not in the code yet: a resync stamps its copies with
    /// the epoch it started at. The code stamps each with `volume.epoch()`,
    /// which the reconciler raises to the cluster's epoch also on a node
    /// that was deposed meanwhile; its copy then passes the new tenure's
    /// floor and overwrites acknowledged writes on the replica.
    pub fix_resync_epoch: bool,
    /// Proposed fix, not in the code yet: the replication remembers the
    /// epoch of the `ReplicaIn`/`ReplicaOut` that last moved its targets,
    /// and the reconciler leaves the targets alone when its state is
    /// older. The code lets a reconciler pass over a state from before the
    /// `ReplicaIn` (the node's applied state lags the commit, or the pass
    /// took its snapshot before) demote the replica `promote` just made a
    /// target: writes are acknowledged without a replica Raft lists in sync.
    pub fix_stale_demotion: bool,
    /// A resync shares its pieces out between the coordinator and the other
    /// in-sync replicas, reading a replica's pieces from it (`ReplicaRead`)
    /// and sending them on itself; as the code does unless
    /// `BALLAST_RESYNC_FROM=coordinator`.
    pub multi_source_resync: bool,
    /// The fix in `Volume::mutate`: a write is acknowledged only if the
    /// node still serves in the tenure it made the write in. Without it, a
    /// write that waited (on a replica, then on Raft) while its node was
    /// deposed, resynced from a copy without it, and made coordinator again
    /// was acknowledged by its late `ReplicaOut` and lost (seed 588).
    pub fix_tenure_ack: bool,
    /// The fix in `Volume::mutate` for torture finding 7: a write that
    /// landed here but not on every in-sync replica stops the serving at
    /// once (`stop_serving_after_a_failed_write`), before its range lock
    /// is let go; the reconciler serves again only where Raft still names
    /// this node. Without it a read answers with the unacknowledged write
    /// that a later coordinator's copy does not have.
    pub fix_stop_serving: bool,
    /// The fix for finding 7's open case: a target that failed a mutation
    /// and whose removal through Raft did not commit (no Raft majority
    /// reached) is remembered (`missed`), and so is a target the dirty
    /// log still tracks when the replication is made (a restart); the
    /// volume is served again only after each of them is dropped through
    /// Raft (`fence`), and their tracking is kept for the resync. Without
    /// it the reconciler serves again at the same epoch with the
    /// coordinator's copy ahead of a replica Raft lists in sync.
    pub fix_fence_out_missed: bool,
    /// The scrub's compare (`replication::scrub`, `Mode::Compare`): the
    /// serving coordinator compares its copy with every in-sync replica's
    /// once per epoch (and again after a restart, or when a pass stopped)
    /// and writes its version of each differing block to that replica.
    pub compare_after_epoch_change: bool,
    /// Requests may overtake each other on a link (see `net`).
    pub reorder: bool,
    /// The Store writes with FUA (else write + flush).
    pub durable_writes: bool,
    /// Fail the run on a monotonic-read violation (see `check`).
    pub strict_monotonic: bool,
    /// Fail the run when in-sync replicas end with different bytes.
    pub strict_convergence: bool,
    /// Print the trace as it happens.
    pub verbose: bool,
}

impl Config {
    /// The randomized configuration of `seed`.
    pub fn random(seed: u64, rng: &mut StdRng) -> Self {
        Self {
            seed,
            nodes: 3,
            replicas: if rng.gen_ratio(1, 4) { 2 } else { 3 },
            volume_blocks: 128 + 32 * rng.gen_range(0..5),
            replica_timeout: Duration::from_millis(rng.gen_range(100..300)),
            raft_timeout: Duration::from_millis(rng.gen_range(150..400)),
            client_timeout: Duration::from_millis(2500),
            safety_phase: Duration::from_millis(rng.gen_range(1500..3500)),
            healing_max: Duration::from_secs(60),
            faults_max: rng.gen_range(2..12),
            client_depth: rng.gen_range(1..5),
            loss_percent: rng.gen_range(0..6),
            duplicate_percent: rng.gen_range(0..6),
            fix_promoted_catch_up_failure: true,
            fix_prepare_snapshot: true,
            fix_resync_epoch: true,
            fix_stale_demotion: true,
            fix_tenure_ack: true,
            fix_stop_serving: true,
            fix_fence_out_missed: true,
            compare_after_epoch_change: true,
            // Not drawn from `rng`: the seeds' other choices stay as they were.
            multi_source_resync: !seed.is_multiple_of(3),
            reorder: false,
            durable_writes: seed.is_multiple_of(2),
            strict_monotonic: false,
            strict_convergence: false,
            verbose: false,
        }
    }
}

/// Counters of one run (summed over seeds for the summary line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub crashes: u64,
    pub failovers: u64,
    pub resyncs_incremental: u64,
    pub resyncs_full: u64,
    pub resyncs_failed: u64,
    /// Resync pieces an in-sync replica sent (not the coordinator).
    pub pieces_from_replicas: u64,
    pub replica_outs: u64,
    pub replica_ins_refused: u64,
    pub refused_stale: u64,
    pub lost: u64,
    pub corrupt: u64,
    pub monotonic_violations: u64,
    pub diverged_blocks: u64,
    /// Blocks the compare after an epoch change rewrote on a replica.
    pub compare_repaired: u64,
    pub fencing_violations: u64,
    pub unconfirmed_acks: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.writes_acked += other.writes_acked;
        self.writes_failed += other.writes_failed;
        self.reads_checked += other.reads_checked;
        self.crashes += other.crashes;
        self.failovers += other.failovers;
        self.resyncs_incremental += other.resyncs_incremental;
        self.resyncs_full += other.resyncs_full;
        self.resyncs_failed += other.resyncs_failed;
        self.pieces_from_replicas += other.pieces_from_replicas;
        self.replica_outs += other.replica_outs;
        self.replica_ins_refused += other.replica_ins_refused;
        self.refused_stale += other.refused_stale;
        self.lost += other.lost;
        self.corrupt += other.corrupt;
        self.monotonic_violations += other.monotonic_violations;
        self.diverged_blocks += other.diverged_blocks;
        self.compare_repaired += other.compare_repaired;
        self.fencing_violations += other.fencing_violations;
        self.unconfirmed_acks += other.unconfirmed_acks;
    }

    pub fn line(&self, seeds: usize) -> String {
        format!(
            "repl_sim: seeds {seeds}, writes acked {}, reads checked {}, crashes {}, failovers {}, resyncs {} (incremental {}, full {}; failed {}; pieces sent by replicas {}), replica outs {}, replica-ins refused (epoch moved) {}, stale refused {}, lost {}, corrupt {}, fencing violations {}, monotonic violations {}, diverged blocks {}, blocks the compare repaired {}",
            self.writes_acked,
            self.reads_checked,
            self.crashes,
            self.failovers,
            self.resyncs_incremental + self.resyncs_full,
            self.resyncs_incremental,
            self.resyncs_full,
            self.resyncs_failed,
            self.pieces_from_replicas,
            self.replica_outs,
            self.replica_ins_refused,
            self.refused_stale,
            self.lost,
            self.corrupt,
            self.fencing_violations,
            self.monotonic_violations,
            self.diverged_blocks,
            self.compare_repaired,
        )
    }
}

/// What one seed's run produced.
#[derive(Debug)]
pub struct Outcome {
    pub counters: Counters,
    pub trace: Vec<String>,
    /// Safety failures (empty when the seed passed).
    pub failures: Vec<String>,
}

/// Everything one run shares. Single-threaded: borrows never cross an await.
pub struct Sim {
    pub config: Config,
    pub rng: RefCell<StdRng>,
    pub trace: RefCell<Vec<String>>,
    pub counters: RefCell<Counters>,
    pub failures: RefCell<Vec<String>>,
    pub nodes: Vec<RefCell<node::Node>>,
    pub net: RefCell<net::Net>,
    pub raft: RefCell<raft::Raft>,
    pub check: RefCell<check::History>,
    start: tokio::time::Instant,
}

impl Sim {
    pub fn node(&self, id: u64) -> std::cell::RefMut<'_, node::Node> {
        self.nodes[index(id)].borrow_mut()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = u64> {
        1..=self.config.nodes
    }

    /// Milliseconds of simulated time since the start.
    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    pub fn log(&self, what: impl Into<String>) {
        let line = format!("{:>9.3}ms {}", self.now_ms(), what.into());
        if self.config.verbose {
            println!("{line}");
        }
        self.trace.borrow_mut().push(line);
    }

    /// A safety failure: recorded (the run goes on so the trace shows what followed).
    pub fn fail(&self, what: String) {
        self.log(format!("FAILURE: {what}"));
        self.failures.borrow_mut().push(what);
    }

    pub fn percent(&self, percent: u32) -> bool {
        percent > 0 && self.rng.borrow_mut().gen_range(0..100) < percent
    }

    pub fn range_ms(&self, low: u64, high: u64) -> Duration {
        Duration::from_micros(self.rng.borrow_mut().gen_range(low * 1000..high * 1000))
    }

    pub fn pick<T: Copy>(&self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let at = self.rng.borrow_mut().gen_range(0..items.len());
        Some(items[at])
    }
}

/// Index of node `id` (ids start at 1).
pub fn index(id: u64) -> usize {
    usize::try_from(id - 1).expect("small node ids")
}

/// Spawns a task of node `id`: it is aborted when the node crashes.
pub fn spawn_on<F: Future<Output = ()> + 'static>(sim: &Rc<Sim>, id: u64, future: F) {
    let handle = tokio::task::spawn_local(future);
    let mut node = sim.node(id);
    node.tasks.retain(|task| !task.is_finished());
    node.tasks.push(handle.abort_handle());
}
