//! One run: a cluster of nodes with one volume, a client workload against
//! the coordinator, a plan of faults (random per seed, or scripted by a
//! targeted test), a healing phase, and the final convergence check.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use ::node::cluster::state::{ClusterState, Command, NodeAdmin, NodeRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::check::{History, Violation};
use super::disk::{Disk, BLOCK_BYTES};
use super::node::{self, ClientOp, Node, VOLUME};
use super::{raft, Config, Counters, Outcome, Sim};

/// Who a fault hits, resolved when it fires.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Node(u64),
    /// The coordinator named in Raft at that moment.
    Coordinator,
    /// Some other replica holder, at random.
    Replica,
}

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Power cut; restarts after `down`.
    Crash { target: Target, down: Duration },
    /// The link between two nodes is cut.
    Partition { a: Target, b: Target, length: Duration },
    /// The node's links to every other node are cut (Raft still reached).
    CutFromPeers { target: Target, length: Duration },
    /// The node cannot reach the Raft majority.
    CutFromRaft { target: Target, length: Duration },
    /// SIGSTOP: the node handles nothing for `length`.
    Pause { target: Target, length: Duration },
    /// The node's disk fails every write; the node is restarted (disk
    /// replaced by its own crash image, errors gone) after `length`.
    DiskEio { target: Target, length: Duration },
    /// An operator names another in-sync replica coordinator (Raft `SetCoordinator`).
    Failover { to: Target },
    /// Loss, duplication and delay spikes on all links.
    Lossy { length: Duration },
}

/// A run's schedule: faults at simulated times after the start.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub faults: Vec<(Duration, Fault)>,
}

impl Plan {
    pub fn random(config: &Config, rng: &mut StdRng) -> Self {
        let count = rng.gen_range(1..=config.faults_max);
        let phase_ms = u64::try_from(config.safety_phase.as_millis()).expect("short");
        let mut faults = Vec::new();
        for _ in 0..count {
            let at = Duration::from_millis(rng.gen_range(50..phase_ms));
            let length = Duration::from_millis(rng.gen_range(50..900));
            let target = match rng.gen_range(0..3) {
                0 => Target::Coordinator,
                1 => Target::Replica,
                _ => Target::Node(rng.gen_range(1..=config.nodes)),
            };
            let fault = match rng.gen_range(0..100) {
                0..15 => Fault::Crash { target, down: length },
                15..27 => Fault::Partition {
                    a: Target::Coordinator,
                    b: Target::Replica,
                    length,
                },
                27..37 => Fault::CutFromPeers { target, length },
                37..47 => Fault::CutFromRaft { target, length },
                47..59 => Fault::Pause {
                    target,
                    length: config.replica_timeout + length,
                },
                59..67 => Fault::DiskEio {
                    target: Target::Replica,
                    length,
                },
                67..85 => Fault::Failover { to: Target::Replica },
                _ => Fault::Lossy { length },
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|(at, _)| *at);
        Self { faults }
    }
}

fn node_record(id: u64) -> NodeRecord {
    NodeRecord {
        id,
        uuid: uuid::Uuid::from_u128(u128::from(id)),
        name: format!("n{id}"),
        peer_address: format!("sim-{id}"),
        api_address: format!("sim-{id}"),
        nbd_address: format!("sim-{id}"),
        labels: std::collections::BTreeMap::new(),
        admin: NodeAdmin::Active,
        joined_unix_seconds: 0,
    }
}

fn initial_state(config: &Config) -> ClusterState {
    let mut state = ClusterState::default();
    state.apply(Command::Init {
        cluster_id: uuid::Uuid::from_u128(1),
        node: node_record(1),
    });
    for id in 2..=config.nodes {
        state.apply(Command::AddNode { node: node_record(id) });
    }
    state.apply(Command::CreateVolume {
        name: VOLUME.into(),
        size_bytes: config.volume_blocks * BLOCK_BYTES as u64,
        block_size_bytes: 4096,
        replica_nodes: (1..=config.replicas).collect(),
        created_unix_seconds: 1,
        encryption: None,
    });
    state
}

/// Runs one seed's simulation (random config and plan).
pub async fn run_seed(seed: u64, adjust: impl FnOnce(&mut Config)) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut config = Config::random(seed, &mut rng);
    adjust(&mut config);
    let plan = Plan::random(&config, &mut rng);
    run(config, plan, rng).await
}

/// Runs `plan` under `config`.
pub async fn run(config: Config, plan: Plan, rng: StdRng) -> Outcome {
    let state = initial_state(&config);
    let nodes = (1..=config.nodes)
        .map(|id| RefCell::new(Node::new(id, Disk::format(config.seed, id, config.durable_writes))))
        .collect();
    let sim = Rc::new(Sim {
        check: RefCell::new(History::new(config.volume_blocks)),
        rng: RefCell::new(rng),
        trace: RefCell::new(Vec::new()),
        counters: RefCell::new(Counters::default()),
        failures: RefCell::new(Vec::new()),
        nodes,
        net: RefCell::new(super::net::Net::new(config.reorder)),
        raft: RefCell::new(raft::Raft {
            state,
            ..raft::Raft::default()
        }),
        config: config.clone(),
        start: Instant::now(),
    });
    sim.log(format!("config {config:?}"));
    sim.log(format!("plan {:?}", plan.faults));
    for id in sim.node_ids() {
        node::start(&sim, id);
    }
    let client_on = Rc::new(std::cell::Cell::new(true));
    let client = tokio::task::spawn_local(client(Rc::clone(&sim), Rc::clone(&client_on)));
    let faults = tokio::task::spawn_local(inject(Rc::clone(&sim), plan));
    tokio::time::sleep(config.safety_phase).await;
    faults.abort();
    heal(&sim, &client_on).await;
    let _ = client.await;
    converge(&sim).await;
    final_check(&sim);
    let trace = sim.trace.borrow().clone();
    let counters = sim.counters.borrow().clone();
    let failures = sim.failures.borrow().clone();
    Outcome {
        counters,
        trace,
        failures,
    }
}

fn coordinator(sim: &Sim) -> u64 {
    sim.raft.borrow().state.volumes[VOLUME].coordinator
}

fn resolve(sim: &Sim, target: Target) -> u64 {
    match target {
        Target::Node(id) => id,
        Target::Coordinator => coordinator(sim),
        Target::Replica => {
            let volume = sim.raft.borrow().state.volumes[VOLUME].clone();
            let others: Vec<u64> = volume
                .replica_nodes
                .iter()
                .copied()
                .filter(|id| *id != volume.coordinator)
                .collect();
            sim.pick(&others).unwrap_or(volume.coordinator)
        }
    }
}

async fn inject(sim: Rc<Sim>, plan: Plan) {
    let start = sim.start;
    for (at, fault) in plan.faults {
        tokio::time::sleep_until(start + at).await;
        apply_fault(&sim, fault).await;
    }
}

/// Runs `undo` after `length` (in its own task, so it outlives the plan).
fn later(length: Duration, undo: impl FnOnce() + 'static) {
    tokio::task::spawn_local(async move {
        tokio::time::sleep(length).await;
        undo();
    });
}

pub async fn apply_fault(sim: &Rc<Sim>, fault: Fault) {
    match fault {
        Fault::Crash { target, down } => {
            let id = resolve(sim, target);
            if !sim.node(id).up {
                return;
            }
            sim.log(format!("fault: crash node {id} for {down:?}"));
            node::crash(sim, id);
            let sim = Rc::clone(sim);
            later(down, move || restart(&sim, id));
        }
        Fault::Partition { a, b, length } => {
            let (a, b) = (resolve(sim, a), resolve(sim, b));
            if a == b {
                return;
            }
            sim.log(format!("fault: cut link {a}-{b} for {length:?}"));
            sim.net.borrow_mut().cut(a, b);
            let sim = Rc::clone(sim);
            later(length, move || {
                sim.log(format!("heal: link {a}-{b}"));
                sim.net.borrow_mut().heal(a, b);
            });
        }
        Fault::CutFromPeers { target, length } => {
            let id = resolve(sim, target);
            sim.log(format!("fault: node {id} cut from its peers for {length:?}"));
            let others: Vec<u64> = sim.node_ids().filter(|other| *other != id).collect();
            for &other in &others {
                sim.net.borrow_mut().cut(id, other);
            }
            let sim = Rc::clone(sim);
            later(length, move || {
                sim.log(format!("heal: node {id}'s links"));
                for other in others {
                    sim.net.borrow_mut().heal(id, other);
                }
            });
        }
        Fault::CutFromRaft { target, length } => {
            let id = resolve(sim, target);
            sim.log(format!("fault: node {id} cut from Raft for {length:?}"));
            sim.raft.borrow_mut().cut.insert(id);
            let sim = Rc::clone(sim);
            later(length, move || {
                sim.log(format!("heal: node {id} reaches Raft"));
                sim.raft.borrow_mut().cut.remove(&id);
            });
        }
        Fault::Pause { target, length } => {
            let id = resolve(sim, target);
            if !sim.node(id).up {
                return;
            }
            sim.log(format!("fault: pause node {id} for {length:?}"));
            sim.node(id).paused_until = Some(Instant::now() + length);
        }
        Fault::DiskEio { target, length } => {
            let id = resolve(sim, target);
            if id == coordinator(sim) || !sim.node(id).up {
                return;
            }
            sim.log(format!(
                "fault: node {id}'s disk fails writes; replaced after {length:?}"
            ));
            sim.node(id).disk.device.faults.fail_writes_from = Some(0);
            let sim = Rc::clone(sim);
            later(length, move || {
                if sim.node(id).up {
                    node::crash(&sim, id);
                    restart(&sim, id);
                }
            });
        }
        Fault::Failover { to } => {
            let volume = sim.raft.borrow().state.volumes[VOLUME].clone();
            let to = match to {
                Target::Replica => {
                    let candidates: Vec<u64> = volume
                        .in_sync
                        .iter()
                        .copied()
                        .filter(|id| *id != volume.coordinator && sim.node(*id).up)
                        .collect();
                    match sim.pick(&candidates) {
                        Some(id) => id,
                        None => return,
                    }
                }
                other => resolve(sim, other),
            };
            sim.log(format!("fault: failover of the coordinator to node {to}"));
            let command = Command::SetCoordinator {
                name: VOLUME.into(),
                node: to,
            };
            if raft::change(sim, 0, command).await.is_ok() {
                sim.counters.borrow_mut().failovers += 1;
            }
        }
        Fault::Lossy { length } => {
            sim.log(format!("fault: lossy network for {length:?}"));
            {
                let mut net = sim.net.borrow_mut();
                net.lossy = true;
                net.spikes = true;
            }
            let sim = Rc::clone(sim);
            later(length, move || {
                let mut net = sim.net.borrow_mut();
                net.lossy = false;
                net.spikes = false;
            });
        }
    }
}

fn restart(sim: &Rc<Sim>, id: u64) {
    if sim.node(id).up {
        return;
    }
    sim.log(format!("restart node {id}"));
    node::start(sim, id);
}

/// Faults stop; every node restarts (rolling, under live writes).
async fn heal(sim: &Rc<Sim>, client_on: &Rc<std::cell::Cell<bool>>) {
    sim.log("healing: faults stop");
    sim.net.borrow_mut().heal_all();
    sim.raft.borrow_mut().cut.clear();
    for id in sim.node_ids() {
        sim.node(id).paused_until = None;
    }
    // Leftover undo tasks of the plan (partitions healing later) are harmless.
    for id in sim.node_ids() {
        if sim.node(id).up {
            node::crash(sim, id);
        }
        restart(sim, id);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    client_on.set(false);
}

/// Waits until every replica is in sync and the coordinator serves.
async fn converge(sim: &Rc<Sim>) {
    let deadline = Instant::now() + sim.config.healing_max;
    loop {
        sim.net.borrow_mut().heal_all();
        let volume = sim.raft.borrow().state.volumes[VOLUME].clone();
        let all_in = volume.replica_nodes.iter().all(|id| volume.in_sync.contains(id));
        let serving = {
            let coordinator = sim.node(volume.coordinator);
            coordinator.served && coordinator.resyncing.is_empty()
        };
        if all_in && serving {
            sim.log(format!("converged at epoch {}", volume.epoch));
            return;
        }
        if Instant::now() >= deadline {
            sim.fail(format!(
                "liveness: not converged after {:?} of healing (in sync {:?} of {:?}, coordinator {})",
                sim.config.healing_max, volume.in_sync, volume.replica_nodes, volume.coordinator
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every replica's store: same bytes everywhere, and rule 1 holds for them.
fn final_check(sim: &Rc<Sim>) {
    let volume = sim.raft.borrow().state.volumes[VOLUME].clone();
    let blocks = sim.config.volume_blocks;
    let started = sim.check.borrow_mut().read_start();
    let mut images = Vec::new();
    for &id in &volume.replica_nodes {
        let mut node = sim.node(id);
        node.disk.settle();
        let image = node
            .disk
            .read_now(0, blocks)
            .unwrap_or_else(|error| panic!("seed={}: final read of node {id} failed: {error}", sim.config.seed));
        images.push((id, image));
    }
    let (coordinator_image, _) = images
        .iter()
        .find(|(id, _)| *id == volume.coordinator)
        .map(|(_, image)| (image.clone(), ()))
        .expect("the coordinator holds a replica");
    for lba in 0..blocks {
        let at = usize::try_from(lba).expect("small") * BLOCK_BYTES;
        let expected = &coordinator_image[at..at + BLOCK_BYTES];
        for (id, image) in &images {
            let block = &image[at..at + BLOCK_BYTES];
            if block != expected {
                sim.counters.borrow_mut().diverged_blocks += 1;
                let what = format!(
                    "convergence: block {lba} differs on node {id} ({:?}) from coordinator {} ({:?}); history {}",
                    super::check::decode_content(lba, block),
                    volume.coordinator,
                    super::check::decode_content(lba, expected),
                    sim.check.borrow().describe(lba)
                );
                if sim.config.strict_convergence {
                    sim.fail(what);
                } else {
                    sim.log(what);
                }
            }
            let verdict = sim.check.borrow_mut().check_block(started, lba, block, false);
            if let Err(violation) = verdict {
                note_violation(sim, violation, &format!("final image of node {id}"));
            }
        }
    }
}

fn note_violation(sim: &Rc<Sim>, violation: Violation, context: &str) {
    match violation {
        Violation::Corrupt(what) => {
            sim.counters.borrow_mut().corrupt += 1;
            sim.fail(format!("corrupt ({context}): {what}"));
        }
        Violation::Lost(what) => {
            sim.counters.borrow_mut().lost += 1;
            sim.fail(format!("lost acknowledged write ({context}): {what}"));
        }
        Violation::Monotonic(what) => {
            sim.counters.borrow_mut().monotonic_violations += 1;
            if sim.config.strict_monotonic {
                sim.fail(format!("monotonic reads ({context}): {what}"));
            } else {
                sim.log(format!("monotonic reads violated ({context}): {what}"));
            }
        }
    }
}

/// The client: up to `client_depth` requests in flight against the
/// coordinator Raft names, never two mutations of one block at once.
async fn client(sim: Rc<Sim>, on: Rc<std::cell::Cell<bool>>) {
    let mut in_flight: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    while on.get() {
        in_flight.retain(|task| !task.is_finished());
        if in_flight.len() < sim.config.client_depth {
            let request = next_request(&sim);
            if let Some(request) = request {
                in_flight.push(tokio::task::spawn_local(request));
            }
        }
        let pause = sim.range_ms(0, 4);
        tokio::time::sleep(pause).await;
    }
    for task in in_flight {
        let _ = task.await;
    }
}

type Request = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

fn next_request(sim: &Rc<Sim>) -> Option<Request> {
    let blocks = sim.config.volume_blocks;
    let (choice, lba, count) = {
        let mut rng = sim.rng.borrow_mut();
        let choice = rng.gen_range(0..100);
        let count = match choice {
            0..55 => rng.gen_range(1..=4),
            55..65 => rng.gen_range(1..=8),
            _ => rng.gen_range(1..=8),
        };
        (choice, rng.gen_range(0..=blocks - count), count)
    };
    let sim = Rc::clone(sim);
    let target = coordinator(&sim);
    match choice {
        0..65 => {
            if !sim.check.borrow().free(lba, count) {
                return None;
            }
            let zero = choice >= 55;
            let (write_id, data) = sim.check.borrow_mut().issue(lba, count, zero);
            Some(Box::pin(async move {
                let op = match data {
                    Some(data) => ClientOp::Write { lba, data },
                    None => ClientOp::Zero { lba, count },
                };
                let result = request(&sim, target, op).await;
                let ok = result.is_ok();
                sim.log(format!(
                    "client: w{write_id} {} {lba}+{count} at node {target}: {}",
                    if zero { "zero" } else { "write" },
                    result.map_or_else(|error| error, |_| "acked".into())
                ));
                let mut counters = sim.counters.borrow_mut();
                if ok {
                    counters.writes_acked += 1;
                } else {
                    counters.writes_failed += 1;
                }
                drop(counters);
                sim.check.borrow_mut().finish(write_id, lba, count, ok);
            }))
        }
        65..95 => {
            let started = sim.check.borrow_mut().read_start();
            Some(Box::pin(async move {
                let Ok(data) = request(&sim, target, ClientOp::Read { lba, count }).await else {
                    return;
                };
                sim.counters.borrow_mut().reads_checked += 1;
                for (offset, block) in data.chunks(BLOCK_BYTES).enumerate() {
                    let block_lba = lba + offset as u64;
                    let verdict = sim.check.borrow_mut().check_block(started, block_lba, block, true);
                    if let Err(violation) = verdict {
                        note_violation(&sim, violation, &format!("client read at node {target}"));
                    }
                }
            }))
        }
        _ => Some(Box::pin(async move {
            let _ = request(&sim, target, ClientOp::Flush).await;
        })),
    }
}

/// One client request to `target` (an NBD connection): Err if the node is
/// down, crashes meanwhile, refuses, or does not answer in time.
async fn request(sim: &Rc<Sim>, target: u64, op: ClientOp) -> Result<Vec<u8>, String> {
    if !sim.node(target).up {
        return Err(format!("node {target} is down"));
    }
    let (answer, answered) = tokio::sync::oneshot::channel();
    let node_sim = Rc::clone(sim);
    super::spawn_on(sim, target, async move {
        let _ = answer.send(node::serve(&node_sim, target, op).await);
    });
    match tokio::time::timeout(sim.config.client_timeout, answered).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(format!("node {target} went away")),
        Err(_) => Err("client time-out".into()),
    }
}
