//! Deterministic simulation of the replication protocol, with a checker
//! over acknowledged writes.
//!
//! Real (the production code, called as is):
//! - each node's disk: `disk_layout::Store` over a fault-injecting
//!   `SimDisk`; a write counts as durable only when the Store acknowledges
//!   it; a crash keeps the device's durable image (unflushed writes lost or
//!   torn) and the restart reopens the Store, replaying its log; disk EIO
//!   is the device's injected write failure;
//! - the wire codec: every mutation travels as `replication::wire::encode`d
//!   bytes and replicas `decode` them; fences as `encode_read`/`decode_read`;
//! - the fencing rules `replication::admit_mutation` (against the floor:
//!   the volume's fence floor or the applied `coordinator_since`, whichever
//!   is higher) and `admit_fence`;
//! - the dirty-map identity type `replication::dirty::Identity`;
//! - the metadata: `cluster::state::ClusterState::apply` (CreateVolume,
//!   ReplicaOut, which always bumps the epoch, ReplicaIn with its
//!   `expect_epoch` refusal, SetCoordinator with `coordinator_since`).
//!
//! Modeled (mirroring the real control flow step by step, see
//! `repl_sim/node.rs`): client reads under the range lock, answered only
//! while still serving (`Volume::read_leased`); `Volume::mutate` (range lock; no replicator and
//! not served: refused; `Replicator::prepare` marks new dirty regions
//! durably; then local write and `replicate` joined; acknowledged only
//! in the serving tenure it was made in),
//! `VolumeReplication::replicate` (shared in-flight guard; a failed target
//! or joining replica is tracked durably, then `fence_out`; a failed
//! catching-up one only stops catching up), `fence_out` (targets and
//! joining nodes), `fence`, `mark_dirty` with its generations,
//! `set_targets`, `promote`, `stop_catching_up`, `drain`, `dirty_regions`
//! (trusted only for the identity the resync starts with), `forget_all`;
//! the replica's `apply` / `raise_epoch` under the epoch gate with
//! `Volumes::fence` (fence floor persisted in the metadata record, so a
//! restart starts from it; epoch back to the record's, 1) and
//! `follow_tenure`; the reconciler's `wire_serving` / `fence_and_serve`
//! (`drop_replication` forgets the tracking); `resync` (catch up, drain,
//! copy dirty regions or everything piece by piece, each piece under the
//! range lock with its allocation looked at again under it, grouped by the
//! real `resync::next_group` and paced by the real `resync::pause_after`
//! and `busy_pause` (clients busy: requests in flight), `set_joining`,
//! `ReplicaIn` at the epoch seen, `promote`; on failure `stop_catching_up`,
//! which fences a joining replica out through Raft first). The dirty log
//! (`dirty.redb`) is `repl_sim/dirty.rs`: batched commits by one writer,
//! queued changes lost on a crash, the committed tables kept and loaded
//! by the next `VolumeReplication`. Raft is one linearizable store a node
//! reaches or not (a cut-off proposer times out; one cut off while
//! committing hears a failure although the change applied); each node
//! that reaches it applies a commit a moment later (its `tenure`, its
//! `identity_now` and the resync's `expect_epoch` read that applied state,
//! which survives a restart). The peer network delivers requests on a link
//! in order (one TCP connection) with delay, loss, duplication and cuts;
//! `reorder` makes it datagram-like.
//!
//! Not simulated: Raft itself (see `cluster_sim`), the NBD protocol,
//! unaligned writes (read-modify-write), reads repaired from a replica
//! (bit rot), `AddReplica` / `RemoveReplica` / `RemoveNode` (the replica
//! set is fixed, so `replica_added` is always 1 and the incarnation half
//! of the identity rule is not exercised; the tenure half is), failures
//! of the dirty log or of the metadata record's write, the engine's
//! threads, clocks and leases; clients always follow the coordinator Raft
//! names.
//!
//! Checked (see `repl_sim/check.rs`): every read returns per block the
//! newest write acknowledged before it started or a later one, never
//! foreign or torn bytes; at every acknowledgement every in-sync replica
//! confirmed the write; no replica lets a mutation land at an epoch below
//! one it confirmed to a fencing coordinator (also across its restarts);
//! after healing all replicas are in sync and hold the same bytes, which
//! pass the read rule; reads are monotonic (no read returns an older
//! version of a block than an earlier read did) and the in-sync replicas
//! end with the same bytes also where only unacknowledged writes differed
//! (the strict checks; `BALLAST_REPL_SIM_STRICT=0` only counts them).
//!
//! Also modeled since torture finding 7: `stop_serving_after_a_failed_write`
//! (`fix_stop_serving`), a target that missed a write while its removal
//! could not commit going out through Raft before the volume is served
//! again (`fix_fence_out_missed`, also for tracking found at a restart),
//! and the scrub's compare after every epoch change and restart
//! (`compare_after_epoch_change`). `BALLAST_REPL_SIM_OFF=name,...` runs
//! without any of these parts or fixes.
//!
//! Four races this simulator found lost acknowledged writes; the code now
//! has the fix for each, and the default run models it
//! (`Config::fix_promoted_catch_up_failure`, `fix_prepare_snapshot`,
//! `fix_resync_epoch`, `fix_stale_demotion`: the real code as it is). The
//! ignored tests `current_code_*` run the code as it was before those
//! fixes and fail, showing the simulator still catches each race. (The
//! names are historical; the flags can go once nobody needs that proof.)
//! Known gap, ignored test: links that reorder. Without the compare the
//! strict checks fail (ignored test `without_the_compare_*`).
//!
//! Reproduce: `BALLAST_REPL_SIM_SEED=N cargo test -p node --test repl_sim
//! -- --nocapture` prints seed N's trace; `BALLAST_REPL_SIM_SEEDS=K` runs K
//! seeds (from `BALLAST_REPL_SIM_SEED_BASE`, default 0).

// Small simulated sizes only.
#![allow(clippy::cast_possible_truncation)]

#[path = "common/shards.rs"]
mod shards;
#[path = "repl_sim/mod.rs"]
mod sim;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;

use sim::world::{self, Fault, Plan, Target};
use sim::{simulate, Config, Counters, Outcome};

/// Seeds a plain `cargo test` runs, on every core (thousands outside CI,
/// figures in the README).
const SEEDS_DEFAULT: u64 = 500;
/// Seeds beyond those that once found a bug, run every time too.
const REGRESSION_SEEDS: [u64; 1] = [588];

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: expected a number")),
    )
}

/// `BALLAST_REPL_SIM_OFF=fix_stop_serving,compare_after_epoch_change,...`
/// runs without those parts (to see what each one buys).
fn switch_off(config: &mut Config) {
    let Ok(names) = std::env::var("BALLAST_REPL_SIM_OFF") else {
        return;
    };
    for name in names.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let flag = match name {
            "fix_promoted_catch_up_failure" => &mut config.fix_promoted_catch_up_failure,
            "fix_prepare_snapshot" => &mut config.fix_prepare_snapshot,
            "fix_resync_epoch" => &mut config.fix_resync_epoch,
            "fix_stale_demotion" => &mut config.fix_stale_demotion,
            "fix_tenure_ack" => &mut config.fix_tenure_ack,
            "fix_stop_serving" => &mut config.fix_stop_serving,
            "fix_fence_out_missed" => &mut config.fix_fence_out_missed,
            "compare_after_epoch_change" => &mut config.compare_after_epoch_change,
            "multi_source_resync" => &mut config.multi_source_resync,
            other => panic!("BALLAST_REPL_SIM_OFF: no part named {other}"),
        };
        *flag = false;
    }
}

/// Monotonic reads and converged bytes are failures unless
/// `BALLAST_REPL_SIM_STRICT=0` (then only counted).
fn strict() -> bool {
    std::env::var("BALLAST_REPL_SIM_STRICT").map_or(true, |value| value.trim() != "0")
}

fn run_seeds(label: &str, adjust: fn(&mut Config)) {
    let single = env_u64("BALLAST_REPL_SIM_SEED");
    let seeds: Vec<u64> = match single {
        Some(seed) => vec![seed],
        None => {
            let base = env_u64("BALLAST_REPL_SIM_SEED_BASE").unwrap_or(0);
            let range = base..base + env_u64("BALLAST_REPL_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
            let regressions = REGRESSION_SEEDS.into_iter().filter(|seed| !range.contains(seed));
            range.clone().chain(regressions).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = Counters::default();
    let mut failed = Vec::new();
    let outcomes = shards::on_every_core(&seeds, |seed| {
        simulate(
            seed,
            world::run_seed(seed, |config| {
                config.verbose = single.is_some();
                config.strict_monotonic = strict();
                config.strict_convergence = strict();
                adjust(config);
                switch_off(config);
            }),
        )
    });
    for (seed, outcome) in outcomes {
        total.add(&outcome.counters);
        if !outcome.failures.is_empty() {
            eprintln!("{label}: seed={seed} failed:\n  {}", outcome.failures.join("\n  "));
            failed.push(seed);
        }
    }
    println!("{} ({label}) in {:?}", total.line(seeds.len()), started.elapsed());
    assert!(
        failed.is_empty(),
        "{label}: failed seeds {failed:?}; rerun one with BALLAST_REPL_SIM_SEED=N (first: seed={})",
        failed[0]
    );
}

#[test]
fn simulated_replication_loses_no_acknowledged_write() {
    run_seeds("repl_sim", |_| {});
}

#[test]
fn a_seed_replays_the_same_run() {
    let seed = env_u64("BALLAST_REPL_SIM_SEED").unwrap_or(7);
    let first = simulate(seed, world::run_seed(seed, |_| {}));
    let second = simulate(seed, world::run_seed(seed, |_| {}));
    if let Some(index) = first.trace.iter().zip(&second.trace).position(|(a, b)| a != b) {
        panic!(
            "seed={seed} did not replay: event {index} was\n  {}\nthen\n  {}",
            first.trace[index], second.trace[index]
        );
    }
    assert_eq!(first.trace.len(), second.trace.len(), "seed={seed}");
    assert_eq!(first.counters, second.counters, "seed={seed}");
}

/// A fixed scenario: no random faults, `faults` at the given times.
fn scripted(seed: u64, replicas: u64, faults: Vec<(u64, Fault)>) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut config = Config::random(seed, &mut rng);
    config.replicas = replicas;
    config.volume_blocks = 128;
    config.replica_timeout = Duration::from_millis(200);
    config.raft_timeout = Duration::from_millis(300);
    config.safety_phase = Duration::from_millis(2500);
    config.client_depth = 3;
    config.loss_percent = 0;
    config.duplicate_percent = 0;
    config.verbose = std::env::var_os("BALLAST_REPL_SIM_TRACE").is_some();
    switch_off(&mut config);
    let plan = Plan {
        faults: faults
            .into_iter()
            .map(|(at_ms, fault)| (Duration::from_millis(at_ms), fault))
            .collect(),
    };
    simulate(seed, world::run(config, plan, rng))
}

fn assert_passed(outcome: &Outcome) {
    assert!(
        outcome.failures.is_empty(),
        "failures: {:#?}\ntrace:\n{}",
        outcome.failures,
        outcome.trace.join("\n")
    );
}

fn traced(outcome: &Outcome, needle: &str) -> bool {
    outcome.trace.iter().any(|line| line.contains(needle))
}

#[test]
fn an_old_coordinator_paused_across_a_failover_gets_no_write_accepted() {
    let outcome = scripted(
        11,
        3,
        vec![
            (
                400,
                Fault::Pause {
                    target: Target::Node(1),
                    length: Duration::from_millis(1200),
                },
            ),
            (450, Fault::Failover { to: Target::Node(2) }),
            // It resumes without hearing of the failover (else it may stop
            // serving before any of its writes leaves).
            (
                460,
                Fault::CutFromRaft {
                    target: Target::Node(1),
                    length: Duration::from_millis(1300),
                },
            ),
        ],
    );
    assert_passed(&outcome);
    assert_eq!(outcome.counters.failovers, 1);
    assert!(
        outcome.counters.refused_stale > 0 || traced(&outcome, "coordinates volume"),
        "the old coordinator's writes were refused:\n{}",
        outcome.trace.join("\n")
    );
    assert_eq!(outcome.counters.fencing_violations, 0);
    assert!(outcome.counters.writes_acked > 50);
}

/// Node 3 learns of the new coordinator only through its fence (it is
/// cut from Raft), then restarts: its persisted fence floor (the metadata
/// record) still refuses the old coordinator, which resumes afterwards.
#[test]
fn a_restarted_replica_keeps_refusing_a_coordinator_it_was_fenced_against() {
    let cut = |target, at_ms, length_ms| {
        (
            at_ms,
            Fault::CutFromRaft {
                target: Target::Node(target),
                length: Duration::from_millis(length_ms),
            },
        )
    };
    let outcome = scripted(
        17,
        3,
        vec![
            (
                400,
                Fault::Pause {
                    target: Target::Node(1),
                    length: Duration::from_millis(1200),
                },
            ),
            cut(3, 420, 1500),
            (450, Fault::Failover { to: Target::Node(2) }),
            cut(1, 460, 1300),
            (
                700,
                Fault::Crash {
                    target: Target::Node(3),
                    down: Duration::from_millis(100),
                },
            ),
        ],
    );
    assert_passed(&outcome);
    assert_eq!(outcome.counters.failovers, 1);
    assert_eq!(outcome.counters.fencing_violations, 0);
    assert!(
        outcome.counters.refused_stale > 0,
        "node 3 refused the old coordinator after its restart:\n{}",
        outcome.trace.join("\n")
    );
}

/// Torture finding 7's open case: replica 3 misses writes (its link is
/// cut) while the coordinator cannot reach Raft, so its removal cannot
/// commit and the writes fail with this copy ahead of replica 3, which Raft
/// still lists in sync. The coordinator stops serving, and serves again
/// only once replica 3 is out through Raft (else a read here could show a
/// write that a later coordinator, node 3, does not have).
#[test]
fn a_replica_that_missed_a_write_is_dropped_through_raft_before_the_volume_is_served_again() {
    let outcome = scripted(
        19,
        3,
        vec![
            (
                300,
                Fault::CutFromRaft {
                    target: Target::Node(1),
                    length: Duration::from_millis(900),
                },
            ),
            (
                310,
                Fault::Partition {
                    a: Target::Node(1),
                    b: Target::Node(3),
                    length: Duration::from_millis(400),
                },
            ),
        ],
    );
    assert_passed(&outcome);
    let line = |needle: &str| outcome.trace.iter().position(|line| line.contains(needle));
    let stopped = line("node 1: a write reached this copy but not every replica; not serving")
        .unwrap_or_else(|| panic!("a write failed on node 1:\n{}", outcome.trace.join("\n")));
    let dropped = line("raft: ReplicaOut { name: \"v\", node: 3, by: 1 } from node 1 -> epoch")
        .unwrap_or_else(|| panic!("replica 3 went out through Raft:\n{}", outcome.trace.join("\n")));
    let served_again = outcome.trace[stopped..]
        .iter()
        .position(|line| line.contains("node 1: serving at epoch") || line.contains("node 1: replicas fenced at epoch"))
        .map(|at| stopped + at)
        .unwrap_or_else(|| panic!("node 1 served again:\n{}", outcome.trace.join("\n")));
    assert!(
        dropped < served_again,
        "node 1 served again (line {served_again}) before replica 3 was out through Raft (line {dropped}):\n{}",
        outcome.trace.join("\n")
    );
}

#[test]
fn a_replica_that_misses_a_write_is_dropped_before_the_write_is_acknowledged() {
    let outcome = scripted(
        12,
        3,
        vec![(
            300,
            Fault::Partition {
                a: Target::Node(1),
                b: Target::Node(3),
                length: Duration::from_millis(700),
            },
        )],
    );
    assert_passed(&outcome);
    assert!(outcome.counters.replica_outs >= 1);
    assert_eq!(outcome.counters.unconfirmed_acks, 0);
    assert!(traced(&outcome, "ReplicaOut { name: \"v\", node: 3, by: 1 }"));
}

#[test]
fn a_coordinator_cut_off_from_raft_fails_writes_instead_of_acknowledging_them_without_a_replica() {
    let outcome = scripted(
        13,
        3,
        vec![
            (
                300,
                Fault::CutFromRaft {
                    target: Target::Node(1),
                    length: Duration::from_millis(800),
                },
            ),
            (
                310,
                Fault::Partition {
                    a: Target::Node(1),
                    b: Target::Node(2),
                    length: Duration::from_millis(600),
                },
            ),
        ],
    );
    assert_passed(&outcome);
    assert!(outcome.counters.writes_failed > 0);
    assert_eq!(outcome.counters.unconfirmed_acks, 0);
}

#[test]
fn resync_after_a_short_outage_copies_only_dirty_regions() {
    let outcome = scripted(
        14,
        3,
        vec![(
            300,
            Fault::Partition {
                a: Target::Node(1),
                b: Target::Node(2),
                length: Duration::from_millis(400),
            },
        )],
    );
    assert_passed(&outcome);
    assert!(outcome.counters.resyncs_incremental >= 1, "{:?}", outcome.counters);
}

#[test]
fn a_new_coordinator_resyncs_a_returning_replica_with_a_full_copy() {
    let outcome = scripted(
        15,
        3,
        vec![
            (
                300,
                Fault::Crash {
                    target: Target::Node(3),
                    down: Duration::from_millis(600),
                },
            ),
            (400, Fault::Failover { to: Target::Node(2) }),
        ],
    );
    assert_passed(&outcome);
    assert!(outcome.counters.resyncs_full >= 1, "{:?}", outcome.counters);
}

#[test]
fn a_replica_whose_disk_fails_is_dropped_and_rejoins_after_replacement() {
    let outcome = scripted(
        16,
        2,
        vec![(
            300,
            Fault::DiskEio {
                target: Target::Node(2),
                length: Duration::from_millis(500),
            },
        )],
    );
    assert_passed(&outcome);
    assert!(outcome.counters.replica_outs >= 1);
}

/// The current code: a write sent to a catching-up replica, whose
/// `ReplicaIn` commits (and `promote` makes it a target) before the send
/// times out, is taken for a failure of a replica still catching up
/// (`is_joining` is false by then) and acknowledged without that in-sync
/// replica (13 of the first 500 seeds, the first 19).
#[test]
#[ignore = "fixed in replicate (kept to show the race is caught): a promoted replica's failed catch-up write is acknowledged without it"]
fn current_code_acknowledges_a_write_a_just_promoted_replica_missed() {
    run_seeds("repl_sim current code (promoted catch-up failure)", |config| {
        config.fix_promoted_catch_up_failure = false;
    });
}

/// The current code: a write prepared while replica R is a target (no
/// dirty mark for R) waits for the in-flight guard behind a resync's
/// drain (or for the dirty log); meanwhile another write's failure drops
/// R; the write then goes to the new targets only. R's incremental resync
/// misses it and R rejoins without an acknowledged write (seeds 61, 109,
/// 247, 287 and 365 of the first 500, until the resync took its range lock
/// per piece and paced busy clients' copies (2026-12-07): that shifted every
/// run's timing, and no seed of the first 2500 meets the race now).
#[test]
#[ignore = "fixed in prepare/replicate (kept to show the race is caught): a target dropped between them gets neither the write nor a dirty mark"]
fn current_code_resync_misses_a_write_prepared_before_its_replica_was_dropped() {
    run_seeds("repl_sim current code (prepare snapshot)", |config| {
        config.fix_prepare_snapshot = false;
    });
}

/// The current code: a coordinator deposed while its resync of replica
/// R runs learns the new epoch (the reconciler's `set_epoch`) and its
/// `copy_span` stamps the remaining copies with it; R, in sync under the
/// new coordinator (floor: its tenure), takes the stale copy over writes
/// the new coordinator acknowledged (seed 132 of the first 500; since the
/// store zeroes the log's next blocks at open, which shifts every run's
/// timing, seeds 588 and 1284 of the first 4000: `BALLAST_REPL_SIM_SEEDS=4000`).
#[test]
#[ignore = "fixed in resync (kept to show the race is caught): copies carried the current epoch, also after the coordinator was deposed"]
fn current_code_lets_a_deposed_coordinators_resync_overwrite_acknowledged_writes() {
    run_seeds("repl_sim current code (resync epoch)", |config| {
        config.fix_resync_epoch = false;
    });
}

/// The current code: the coordinator commits `ReplicaIn` and promotes
/// the replica, but its applied state still predates the commit (cut off
/// from the majority right after it, here); a reconciler pass over that
/// state demotes the replica (`set_targets`), and writes are acknowledged
/// without it while Raft lists it in sync (seed 976 of the first 3000
/// until the store began zeroing the log's next blocks at open; that shifted
/// every run's timing, and no seed of the first 4000 meets the race now).
#[test]
#[ignore = "fixed in wire_serving (kept to show the race is caught): a stale state demoted a replica promote() just made a target"]
fn current_code_lets_a_stale_reconciler_pass_demote_a_promoted_replica() {
    run_seeds("repl_sim current code (stale demotion)", |config| {
        config.fix_stale_demotion = false;
    });
}

/// The code before the tenure check in `Volume::mutate`: a write waits on
/// a replica that does not answer while its coordinator is deposed; the
/// new coordinator's resync replaces the old one's copy of the range with
/// its own (without the write); the old coordinator is made coordinator
/// again, and the write's late `ReplicaOut` commits in the new tenure:
/// the write is acknowledged and lost (seed 588 of the first 4000).
#[test]
#[ignore = "fixed in Volume::mutate (kept to show the race is caught): a write was acknowledged across its node's deposition and re-election"]
fn current_code_acknowledges_a_write_its_coordinator_lost_while_deposed() {
    run_seeds("repl_sim current code (tenure ack)", |config| {
        config.fix_tenure_ack = false;
    });
}

/// Without the compare after an epoch change, a coordinator that crashes
/// mid-write and serves again after its restart leaves the in-sync
/// replicas holding that unacknowledged write while it does not (seeds 13,
/// 152, 169, ... of the first 500: 9 seeds, 18 blocks): the copies stay different. The real
/// code compares after every epoch change and after a restart
/// (`replication::scrub`); the default run models that and is strict.
#[test]
#[ignore = "the compare is in the code (kept to show the strict checks catch its absence)"]
fn without_the_compare_in_sync_replicas_keep_different_unacknowledged_writes() {
    run_seeds("repl_sim without the compare", |config| {
        config.compare_after_epoch_change = false;
    });
}

/// Requests may overtake each other and duplicates arrive late: a datagram
/// network. The replica applies mutations in arrival order and does not
/// look at `volume_sequence`, so this needs an ordered transport; kept
/// apart to show what breaks without one.
#[test]
#[ignore = "the protocol needs in-order links; run to see what reordering does"]
fn with_reordering_links_replicas_may_apply_stale_writes() {
    run_seeds("repl_sim reorder", |config| {
        config.loss_percent = config.loss_percent.max(2);
        config.duplicate_percent = config.duplicate_percent.max(5);
        config.reorder = true;
    });
}
