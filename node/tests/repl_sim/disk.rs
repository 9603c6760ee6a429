//! A node's disk: the real log-structured `disk_layout::Store` over a
//! fault-injecting `SimDisk`. Requests complete as a per-node driver task
//! lets the device run (a few at a time, in the device's seeded order); a
//! crash keeps only what the device made durable (torn writes included)
//! and the restart reopens the Store from that image, replaying its log.

use std::collections::HashMap;
use std::rc::Rc;

use disk_layout::sim_disk::SimDisk;
use disk_layout::{Done, FormatParams, Reply, Store, StoreConfig, StoreError};
use tokio::sync::{oneshot, Notify};

use super::Sim;

pub const BLOCK_BYTES: usize = 4096;
/// Volume id of the simulated volume (the cluster hands out 1 first).
pub const VOLUME_ID: u64 = 1;
/// 24 MiB disks with 1 MiB segments: small, and the cleaner gets to run.
const DISK_BYTES: usize = 24 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;

/// One store request.
pub enum Request {
    Write {
        lba: u64,
        data: Vec<u8>,
        epoch: u64,
        sequence: u64,
    },
    Zero {
        lba: u64,
        count: u64,
        epoch: u64,
        sequence: u64,
    },
    Read {
        lba: u64,
        count: u64,
    },
    Flush,
}

pub struct Disk {
    pub device: SimDisk,
    pub store: Store,
    waiting: HashMap<u64, oneshot::Sender<Result<Reply, StoreError>>>,
    next_tag: u64,
    /// Wakes the driver when a request was submitted.
    pub wake: Rc<Notify>,
}

fn config(seed: u64, node: u64, durable_writes: bool, nonce: u64) -> StoreConfig {
    let mut config = StoreConfig::new(format!("sim-disk-{node}"), Some(node_uuid(node)), nonce);
    config.checkpoint_interval_blocks = 1024;
    config.durable_writes = durable_writes;
    let _ = seed;
    config
}

fn node_uuid(node: u64) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&node.to_le_bytes());
    uuid[15] = 0xAA;
    uuid
}

impl Disk {
    /// A freshly formatted disk.
    pub fn format(seed: u64, node: u64, durable_writes: bool) -> Self {
        let mut device = SimDisk::new(DISK_BYTES, seed.wrapping_mul(1000).wrapping_add(node));
        let params = FormatParams {
            disk_size_bytes: DISK_BYTES as u64,
            segment_size_bytes: SEGMENT_BYTES,
            cluster_uuid: [1; 16],
            node_uuid: node_uuid(node),
            disk_uuid: [u8::try_from(node).expect("small ids"); 16],
            created_unix_seconds: 1,
        };
        Store::format(&mut device, &params, "sim").expect("format a simulated disk");
        let store = Store::open(&mut device, config(seed, node, durable_writes, 1)).expect("open a new disk");
        Self {
            device,
            store,
            waiting: HashMap::new(),
            next_tag: 1,
            wake: Rc::new(Notify::new()),
        }
    }

    /// The disk after a power cut at this instant, reopened (log replay).
    /// Requests in flight are dropped unanswered (their callers died too).
    pub fn crash_and_reopen(&mut self, seed: u64, node: u64, durable_writes: bool, crash_number: u64) {
        let nonce = seed.wrapping_mul(31).wrapping_add(crash_number * 7 + node);
        let mut device = self.device.crash(nonce);
        let store = Store::open(&mut device, config(seed, node, durable_writes, nonce + 1))
            .unwrap_or_else(|error| panic!("seed={seed}: node {node}'s store did not reopen after a crash: {error}"));
        self.device = device;
        self.store = store;
        self.waiting.clear();
        self.wake = Rc::new(Notify::new());
    }

    fn submit(&mut self, request: Request) -> oneshot::Receiver<Result<Reply, StoreError>> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let (sender, receiver) = oneshot::channel();
        self.waiting.insert(tag, sender);
        match request {
            Request::Write {
                lba,
                data,
                epoch,
                sequence,
            } => {
                self.store.write(tag, VOLUME_ID, lba, &data, epoch, sequence);
            }
            Request::Zero {
                lba,
                count,
                epoch,
                sequence,
            } => {
                self.store.zero(tag, VOLUME_ID, lba, count, epoch, sequence);
            }
            Request::Read { lba, count } => self.store.read(&mut self.device, tag, VOLUME_ID, lba, count),
            Request::Flush => self.store.flush(tag),
        }
        self.store.tick(&mut self.device);
        self.deliver();
        self.wake.notify_one();
        receiver
    }

    fn deliver(&mut self) {
        let mut done: Vec<Done> = Vec::new();
        self.store.drain_done(&mut done);
        for Done { tag, result } in done {
            if let Some(sender) = self.waiting.remove(&tag) {
                let _ = sender.send(result);
            }
        }
    }

    /// Lets the device complete some requests; true while work remains.
    pub fn step(&mut self) -> bool {
        self.store.tick(&mut self.device);
        for completion in self.device.run_some() {
            self.store.on_completion(&mut self.device, completion);
        }
        self.store.tick(&mut self.device);
        self.deliver();
        self.device.in_flight() > 0 || (!self.waiting.is_empty() && !self.store.is_failed())
    }

    /// Runs the device until nothing is in flight (bounded; no simulated time).
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            if !self.step() && self.device.in_flight() == 0 {
                return;
            }
        }
        panic!("a simulated store did not settle");
    }

    /// Reads `count` blocks at once, outside simulated time (final checks).
    pub fn read_now(&mut self, lba: u64, count: u64) -> Result<Vec<u8>, StoreError> {
        let mut receiver = self.submit(Request::Read { lba, count });
        for _ in 0..100_000 {
            match receiver.try_recv() {
                Ok(result) => return result.map(|reply| reply_bytes(&reply)),
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.step();
                }
                Err(oneshot::error::TryRecvError::Closed) => panic!("a final read was dropped"),
            }
        }
        panic!("a final read never finished");
    }
}

pub fn reply_bytes(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Read(buf) => buf.as_slice().to_vec(),
        other => panic!("a read answered {other:?}"),
    }
}

/// Submits `request` to node `id`'s store and waits for it (simulated
/// time passes as the driver runs the device). Err if the store failed or
/// the node crashed meanwhile.
pub async fn call(sim: &Rc<Sim>, id: u64, request: Request) -> Result<Reply, String> {
    let receiver = sim.node(id).disk.submit(request);
    match receiver.await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(_) => Err(format!("node {id}'s store went away (crash)")),
    }
}

/// Node `id`'s device: runs a few requests every 0.2-1.5 ms of simulated
/// time while any are in flight; sleeps otherwise.
pub async fn driver(sim: Rc<Sim>, id: u64) {
    loop {
        super::node::wait_unpaused(&sim, id).await;
        let (busy, wake) = {
            let mut node = sim.node(id);
            let busy = node.disk.step();
            (busy, Rc::clone(&node.disk.wake))
        };
        if busy {
            let pause = sim.range_ms(0, 2).max(std::time::Duration::from_micros(200));
            tokio::time::sleep(pause).await;
        } else {
            wake.notified().await;
        }
    }
}
