//! The storage engine of a node: reactor threads (one per core in use, each
//! pinned) that own the enrolled disks' stores, and a handle other threads
//! use to send them requests.
//!
//! Requests go through a bounded channel plus a wake-up of the reactor;
//! answers come back through a callback run on the reactor thread (so it
//! must be quick: send on a channel, complete a oneshot).

pub(crate) mod disk_io;
mod reactor;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Sender};
use disk_layout::{IoBuf, Reply, Store, StoreConfig, StoreError};
use kernel_iface::{EngineChoice, Waker};
use thiserror::Error;

pub use reactor::SHUTDOWN_TIMEOUT;

/// Requests queued per reactor before senders wait.
pub const REACTOR_QUEUE_MAX: usize = 65_536;

/// The answer callback of a request.
pub type ReplyFn = Box<dyn FnOnce(Result<Reply, StoreError>) + Send>;

/// A request to one disk's store.
#[derive(Debug)]
pub enum Command {
    Write {
        volume_id: u64,
        lba: u64,
        data: Vec<u8>,
        epoch: u64,
        volume_sequence: u64,
    },
    Read {
        volume_id: u64,
        lba: u64,
        block_count: u64,
    },
    Zero {
        volume_id: u64,
        lba: u64,
        block_count: u64,
        epoch: u64,
        volume_sequence: u64,
    },
    Flush,
    DeleteVolume {
        volume_id: u64,
    },
    /// `target`'s data becomes a copy of `source`'s, sharing every block
    /// (snapshot, clone, restore; `Store::clone_volume`).
    Clone {
        source: u64,
        target: u64,
        epoch: u64,
        volume_sequence: u64,
    },
    /// Write a checkpoint now (answered like a flush).
    Checkpoint,
}

pub(crate) enum Control {
    Request {
        disk: usize,
        command: Command,
        reply: ReplyFn,
    },
    Query {
        disk: usize,
        run: Box<dyn FnOnce(&Store) + Send>,
    },
    Shutdown,
}

/// One disk the engine should open.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub path: PathBuf,
}

/// How to run the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Cores to pin reactors to; empty: one unpinned reactor.
    pub cores: Vec<usize>,
    pub choice: EngineChoice,
    /// The node that must own every disk.
    pub node_uuid: [u8; 16],
    pub pipeline_depth: usize,
    pub checkpoint_interval_blocks: u64,
    /// Tests only: fail the I/O a plan file names (`kernel_iface::faults`).
    pub faults: Option<kernel_iface::faults::FaultSource>,
}

impl EngineConfig {
    #[must_use]
    pub fn new(node_uuid: [u8; 16]) -> Self {
        let defaults = StoreConfig::new("", None, 0);
        Self {
            cores: Vec::new(),
            choice: EngineChoice::Auto,
            node_uuid,
            pipeline_depth: defaults.pipeline_depth,
            checkpoint_interval_blocks: defaults.checkpoint_interval_blocks,
            faults: None,
        }
    }
}

/// Errors starting or using the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// a disk could not be opened
    #[error("cannot open disk {path}: {reason}")]
    Open { path: String, reason: String },
    /// a reactor thread could not start
    #[error("cannot start reactor thread: {0}")]
    Thread(String),
    /// the engine stopped
    #[error("the storage engine has stopped")]
    Stopped,
}

struct ReactorHandle {
    sender: Sender<Control>,
    waker: Arc<dyn Waker>,
    sleeping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReactorHandle {
    fn send(&self, control: Control) -> Result<(), EngineError> {
        self.sender.send(control).map_err(|_| EngineError::Stopped)?;
        if self.sleeping.load(Ordering::SeqCst) {
            self.waker.wake();
        }
        Ok(())
    }
}

/// What the engine knows of each opened disk.
#[derive(Clone, Debug)]
pub struct OpenedDisk {
    pub path: PathBuf,
    pub disk_uuid: [u8; 16],
    pub engine_kind: &'static str,
    /// Replay ended at a damaged batch (`Store::replay_ended_at_damage`).
    pub damaged_tail: bool,
}

/// Handle to the running engine.
pub struct Engine {
    routes: parking_lot::RwLock<Routes>,
    /// How it was started (disks added later open the same way).
    config: EngineConfig,
}

/// Where each disk's requests go; grows when a disk is added.
struct Routes {
    reactors: Vec<ReactorHandle>,
    /// Disk index -> (reactor, index within the reactor).
    placement: Vec<(usize, usize)>,
    disks: Vec<OpenedDisk>,
}

impl Engine {
    /// Opens every disk (replaying its log) on reactor threads and serves.
    pub fn start(disks: &[DiskSpec], config: &EngineConfig) -> Result<Self, EngineError> {
        let reactor_count = if disks.is_empty() {
            0
        } else {
            config.cores.len().clamp(1, disks.len())
        };
        let mut placement = Vec::with_capacity(disks.len());
        let mut groups: Vec<Vec<(usize, DiskSpec)>> = vec![Vec::new(); reactor_count];
        for (index, disk) in disks.iter().enumerate() {
            let reactor = index % reactor_count.max(1);
            placement.push((reactor, groups[reactor].len()));
            groups[reactor].push((index, disk.clone()));
        }
        let mut reactors = Vec::with_capacity(reactor_count);
        let mut opened = vec![None; disks.len()];
        let mut failure = None;
        for (number, group) in groups.into_iter().enumerate() {
            let core = config.cores.get(number).copied();
            match start_reactor(number, core, group, config) {
                Ok((handle, group_opened)) => {
                    reactors.push(handle);
                    for (index, disk) in group_opened {
                        opened[index] = Some(disk);
                    }
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let engine = Self {
            routes: parking_lot::RwLock::new(Routes {
                reactors,
                placement,
                disks: opened.into_iter().flatten().collect(),
            }),
            config: config.clone(),
        };
        if let Some(error) = failure {
            engine.shutdown();
            return Err(error);
        }
        Ok(engine)
    }

    /// The opened disks, by index.
    #[must_use]
    pub fn disks(&self) -> Vec<OpenedDisk> {
        self.routes.read().disks.clone()
    }

    /// Opens one more disk (pool expansion on a running node) on a reactor
    /// of its own; returns its index.
    pub fn add_disk(&self, spec: DiskSpec) -> Result<usize, EngineError> {
        let mut routes = self.routes.write();
        if routes.disks.iter().any(|disk| disk.path == spec.path) {
            return Err(EngineError::Open {
                path: spec.path.display().to_string(),
                reason: "it is already open".into(),
            });
        }
        let index = routes.disks.len();
        let number = routes.reactors.len();
        let core = (!self.config.cores.is_empty()).then(|| self.config.cores[number % self.config.cores.len()]);
        let (handle, mut opened) = start_reactor(number, core, vec![(index, spec)], &self.config)?;
        let (_, disk) = opened.pop().expect("one disk opened");
        routes.reactors.push(handle);
        routes.placement.push((number, 0));
        routes.disks.push(disk);
        Ok(index)
    }

    /// Sends a request; `reply` runs on the reactor thread when it is done.
    pub fn submit(&self, disk: usize, command: Command, reply: ReplyFn) {
        let routes = self.routes.read();
        let (reactor, local) = routes.placement[disk];
        let control = Control::Request {
            disk: local,
            command,
            reply,
        };
        if let Err(error) = routes.reactors[reactor].send(control) {
            tracing::error!(%error, disk, "request to a stopped engine");
        }
    }

    /// Runs `f` on the disk's store (on its reactor) and returns its result.
    pub fn query<T: Send + 'static>(
        &self,
        disk: usize,
        f: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (sender, receiver) = bounded(1);
        let run = Box::new(move |store: &Store| {
            let _ = sender.send(f(store));
        });
        {
            let routes = self.routes.read();
            let (reactor, local) = routes.placement[disk];
            routes.reactors[reactor].send(Control::Query { disk: local, run })?;
        }
        receiver.recv().map_err(|_| EngineError::Stopped)
    }

    /// Sends a request and waits for its answer (for tools and tests).
    pub fn call(&self, disk: usize, command: Command) -> Result<Reply, StoreError> {
        let (sender, receiver) = bounded(1);
        self.submit(
            disk,
            command,
            Box::new(move |result| {
                let _ = sender.send(result);
            }),
        );
        receiver.recv().unwrap_or_else(|_| {
            Err(StoreError::Failed {
                disk: format!("#{disk}"),
                cause: "storage engine stopped".into(),
            })
        })
    }

    /// Clean shutdown: every reactor writes a final checkpoint (bounded by
    /// `SHUTDOWN_TIMEOUT`) and stops.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let routes = self.routes.get_mut();
        for reactor in &routes.reactors {
            let _ = reactor.send(Control::Shutdown);
        }
        for reactor in &mut routes.reactors {
            if let Some(thread) = reactor.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

type Started = (ReactorHandle, Vec<(usize, OpenedDisk)>);

fn start_reactor(
    number: usize,
    core: Option<usize>,
    group: Vec<(usize, DiskSpec)>,
    config: &EngineConfig,
) -> Result<Started, EngineError> {
    let (sender, receiver) = bounded(REACTOR_QUEUE_MAX);
    let (ready_sender, ready_receiver) = bounded(1);
    let sleeping = Arc::new(AtomicBool::new(false));
    let config = config.clone();
    let thread_sleeping = Arc::clone(&sleeping);
    let thread = std::thread::Builder::new()
        .name(format!("ballast-reactor-{number}"))
        .spawn(move || {
            if let Some(core) = core {
                if let Err(error) = kernel_iface::affinity::pin_current_thread(core) {
                    tracing::warn!(core, %error, "could not pin reactor thread");
                }
            }
            match open_group(&group, &config) {
                Ok((engine, stores, opened)) => {
                    let _ = ready_sender.send(Ok((engine.waker(), opened)));
                    reactor::Reactor::new(engine, stores, receiver, thread_sleeping).run();
                }
                Err(error) => {
                    let _ = ready_sender.send(Err(error));
                }
            }
        })
        .map_err(|error| EngineError::Thread(error.to_string()))?;
    match ready_receiver.recv() {
        Ok(Ok((waker, opened))) => Ok((
            ReactorHandle {
                sender,
                waker,
                sleeping,
                thread: Some(thread),
            },
            opened,
        )),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            Err(EngineError::Thread("reactor thread died while opening disks".into()))
        }
    }
}

type OpenedGroup = (
    Box<dyn kernel_iface::IoEngine<IoBuf>>,
    Vec<Store>,
    Vec<(usize, OpenedDisk)>,
);

fn open_group(group: &[(usize, DiskSpec)], config: &EngineConfig) -> Result<OpenedGroup, EngineError> {
    let mut files = Vec::with_capacity(group.len());
    for (_, disk) in group {
        let opened = kernel_iface::device::open_exclusive(&disk.path, true).map_err(|error| EngineError::Open {
            path: disk.path.display().to_string(),
            reason: error.to_string(),
        })?;
        files.push(opened.file);
    }
    let mut engine = kernel_iface::open_engine(files, config.choice).map_err(|error| EngineError::Open {
        path: "(engine)".into(),
        reason: error.to_string(),
    })?;
    if let Some(source) = &config.faults {
        let disks = group.iter().map(|(index, _)| *index).collect();
        engine = Box::new(kernel_iface::faults::FaultyEngine::new(engine, source.clone(), disks));
    }
    let mut stores = Vec::with_capacity(group.len());
    let mut opened = Vec::with_capacity(group.len());
    for (file, (index, disk)) in group.iter().enumerate() {
        let name = disk.path.display().to_string();
        let mut store_config = StoreConfig::new(name.clone(), Some(config.node_uuid), open_nonce());
        store_config.pipeline_depth = config.pipeline_depth;
        store_config.checkpoint_interval_blocks = config.checkpoint_interval_blocks;
        let mut io = disk_io::DiskIo {
            engine: engine.as_mut(),
            file: u32::try_from(file).expect("few disks per reactor"),
        };
        let store = Store::open(&mut io, store_config).map_err(|error| EngineError::Open {
            path: name.clone(),
            reason: error.to_string(),
        })?;
        opened.push((
            *index,
            OpenedDisk {
                path: disk.path.clone(),
                disk_uuid: store.superblock().disk_uuid,
                engine_kind: engine.kind(),
                damaged_tail: store.replay_ended_at_damage(),
            },
        ));
        stores.push(store);
    }
    Ok((engine, stores, opened))
}

/// A fresh random value per store open (see the batch header's open_nonce).
fn open_nonce() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}
