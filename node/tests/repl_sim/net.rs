//! The peer network between nodes: request/response calls like
//! `MuxLink::call` (answer or time-out), carrying the real wire bytes.
//! Faults: cut links (partitions), loss, duplication, delay spikes.
//!
//! Requests on one link arrive in the order sent (the real link is one TCP
//! connection; a delayed frame holds up the ones behind it), unless the
//! run sets `reorder`; then any request may overtake another and
//! duplicates arrive at any later time, like a datagram network.
//! Answers come back in any order (the real link matches them by id).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{node, spawn_on, Sim};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `FrameKind::ReplicaWrite`: a `wire::encode`d mutation.
    Write,
    /// `FrameKind::ReplicaFence`: `wire::encode_read(volume id, epoch, 1)`.
    Fence,
    /// `FrameKind::ReplicaRead`: `wire::encode_read(volume id, lba, count)`.
    Read,
}

#[derive(Default)]
pub struct Net {
    /// Cut links, as (lower id, higher id).
    cut: BTreeSet<(u64, u64)>,
    /// Loss and duplication are on (only inside fault windows).
    pub lossy: bool,
    /// Delay spikes (20-300 ms) are on.
    pub spikes: bool,
    /// Requests may overtake each other on a link (datagram-like).
    pub reorder: bool,
    /// Per directed link: the order requests are handed to the receiver.
    turns: BTreeMap<(u64, u64), Turns>,
    pub messages: u64,
}

impl Net {
    pub fn new(reorder: bool) -> Self {
        Self {
            reorder,
            ..Self::default()
        }
    }

    fn pair(a: u64, b: u64) -> (u64, u64) {
        (a.min(b), a.max(b))
    }

    pub fn is_cut(&self, a: u64, b: u64) -> bool {
        self.cut.contains(&Self::pair(a, b))
    }

    pub fn cut(&mut self, a: u64, b: u64) {
        self.cut.insert(Self::pair(a, b));
    }

    pub fn heal(&mut self, a: u64, b: u64) {
        self.cut.remove(&Self::pair(a, b));
    }

    pub fn heal_all(&mut self) {
        self.cut.clear();
        self.lossy = false;
        self.spikes = false;
    }
}

fn latency(sim: &Sim) -> Duration {
    let spikes = sim.net.borrow().spikes;
    if spikes && sim.percent(4) {
        return sim.range_ms(20, 300);
    }
    Duration::from_micros(100) + sim.range_ms(0, 1)
}

fn lost(sim: &Sim, from: u64, to: u64) -> bool {
    let (cut, lossy) = {
        let net = sim.net.borrow();
        (net.is_cut(from, to), net.lossy)
    };
    cut || (lossy && sim.percent(sim.config.loss_percent))
}

/// Sends `payload` from `from` to `to` and waits for the answer, at most
/// `timeout` (like `MuxLink::call`). A lost request or answer is a time-out.
pub async fn call(
    sim: &Rc<Sim>,
    from: u64,
    to: u64,
    kind: Kind,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    node::wait_unpaused(sim, from).await;
    let deadline = Instant::now() + timeout;
    let (answer, answered) = oneshot::channel();
    sim.net.borrow_mut().messages += 1;
    let duplicate = sim.net.borrow().lossy && sim.percent(sim.config.duplicate_percent);
    if duplicate {
        sim.log(format!("net: {kind:?} {from}->{to} duplicated"));
        tokio::task::spawn_local(deliver(Rc::clone(sim), from, to, kind, payload.clone(), None));
    }
    tokio::task::spawn_local(deliver(Rc::clone(sim), from, to, kind, payload, Some(answer)));
    let timed_out = || format!("node {to} did not answer within {timeout:?}");
    match tokio::time::timeout_at(deadline, answered).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => {
            tokio::time::sleep_until(deadline).await;
            Err(timed_out())
        }
        Err(_) => Err(timed_out()),
    }
}

/// One directed link's order: tickets taken at send, served in turn.
#[derive(Default)]
pub struct Turns {
    next_ticket: u64,
    serving: u64,
    notify: Rc<tokio::sync::Notify>,
}

async fn deliver(
    sim: Rc<Sim>,
    from: u64,
    to: u64,
    kind: Kind,
    payload: Vec<u8>,
    answer: Option<oneshot::Sender<Result<Vec<u8>, String>>>,
) {
    let reorder = sim.net.borrow().reorder;
    let ticket = {
        let mut net = sim.net.borrow_mut();
        let turns = net.turns.entry((from, to)).or_default();
        turns.next_ticket += 1;
        turns.next_ticket - 1
    };
    let lost_on_the_way = lost(&sim, from, to);
    tokio::time::sleep(latency(&sim)).await;
    if !reorder {
        // FIFO: wait for the requests sent before this one on this link.
        loop {
            let notify = {
                let net = sim.net.borrow();
                let turns = &net.turns[&(from, to)];
                if turns.serving == ticket {
                    break;
                }
                Rc::clone(&turns.notify)
            };
            notify.notified().await;
        }
    }
    if !lost_on_the_way {
        // The receiving process reads its socket only while it runs.
        node::wait_unpaused(&sim, to).await;
        let up = sim.node(to).up;
        if up && !sim.net.borrow().is_cut(from, to) {
            start_handler(&sim, from, to, kind, payload, answer);
        }
    }
    if !reorder {
        let mut net = sim.net.borrow_mut();
        let turns = net.turns.get_mut(&(from, to)).expect("taken a ticket");
        turns.serving += 1;
        turns.notify.notify_waiters();
    }
}

fn start_handler(
    sim: &Rc<Sim>,
    from: u64,
    to: u64,
    kind: Kind,
    payload: Vec<u8>,
    answer: Option<oneshot::Sender<Result<Vec<u8>, String>>>,
) {
    let handler_sim = Rc::clone(sim);
    spawn_on(sim, to, async move {
        let sim = handler_sim;
        let result = node::handle(&sim, to, kind, &payload).await;
        let Some(answer) = answer else {
            return;
        };
        // The answer travels on its own (not aborted if `to` crashes now).
        let back = Rc::clone(&sim);
        tokio::task::spawn_local(async move {
            if lost(&back, to, from) {
                return;
            }
            tokio::time::sleep(latency(&back)).await;
            if !back.net.borrow().is_cut(to, from) {
                let _ = answer.send(result);
            }
        });
    });
}
