//! The storage engine of a node: reactor threads (one per core in use, each
//! pinned) that own the enrolled disks' stores, and a handle other threads
//! use to send them requests.
//!
//! Requests go through a bounded channel plus a wake-up of the reactor;
//! answers come back through a callback run on the reactor thread (so it
//! must be quick: send on a channel, complete a oneshot).

pub(crate) mod disk_io;
pub mod guest;
mod reactor;
pub mod sched;
pub mod socket;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Sender};
use disk_layout::{IoBuf, Reply, Store, StoreConfig, StoreError};
use kernel_iface::{EngineChoice, Waker};
use thiserror::Error;

pub use guest::{FutureGuest, Guest, GuestState, Host, ReactorWaker};
pub use reactor::SHUTDOWN_TIMEOUT;
pub use sched::{IoClass, SchedStats, Work};

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
        /// Shared, not copied, until the store copies it into its batch
        /// (a FUSE-over-io_uring write lends it from the request's entry).
        data: bytes::Bytes,
        epoch: u64,
        volume_sequence: u64,
    },
    Read {
        volume_id: u64,
        lba: u64,
        block_count: u64,
    },
    /// A read by a pass over the data (scrub, drain, verify): as `Read`,
    /// but it never re-sequences what it reads (`Store::scan`).
    Scan {
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
        class: IoClass,
        command: Command,
        reply: ReplyFn,
    },
    Query {
        disk: usize,
        run: Box<dyn FnOnce(&Store) + Send>,
    },
    /// Serve this guest on the reactor's thread from now on.
    Guest(Box<dyn Guest>),
    Shutdown,
}

/// Discards per second by default: the store's default pace per interval
/// over the reactor's 100 ms interval (2.5 GiB/s).
pub const DISCARD_BYTES_PER_S_DEFAULT: u64 =
    disk_layout::store::DISCARD_BYTES_PER_INTERVAL_DEFAULT * 1000 / reactor::TICK_INTERVAL_MS;

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
    /// Freed segments discarded per second at most (0: none); a disk whose
    /// device has no discard support gets none either (logged).
    pub discard_bytes_per_s: u64,
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
            discard_bytes_per_s: DISCARD_BYTES_PER_S_DEFAULT,
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
    /// Process-wide unique (`guest::next_reactor_id`).
    id: u64,
    core: Option<usize>,
    sender: Sender<Control>,
    waker: Arc<dyn Waker>,
    notify_fd: Option<std::os::fd::RawFd>,
    sleeping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReactorHandle {
    /// Sends `control` to the reactor: kept on this thread if it is the
    /// reactor's own (no channel, no wake-up), counted in `handoffs` if it
    /// comes from another reactor.
    fn send(&self, control: Control, handoffs: &AtomicU64) -> Result<(), EngineError> {
        let Err(control) = guest::send_local(self.id, control) else {
            return Ok(());
        };
        if guest::on_a_reactor() {
            handoffs.fetch_add(1, Ordering::Relaxed);
        }
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
    /// Why freed segments are not discarded, when that was known at open
    /// (the node's rate is 0, or the device has no discard support).
    pub discard_off: Option<String>,
}

/// Handle to the running engine.
pub struct Engine {
    routes: parking_lot::RwLock<Routes>,
    /// How it was started (disks added later open the same way).
    config: EngineConfig,
    /// Requests a reactor's guest sent to another reactor.
    handoffs: AtomicU64,
    /// Guests handed to reactors (`host_guest`), ever.
    hosted: AtomicU64,
}

/// Where each disk's requests go; grows when a disk is added.
struct Routes {
    reactors: Vec<ReactorHandle>,
    /// Disk index -> (reactor, index within the reactor).
    placement: Vec<(usize, usize)>,
    disks: Vec<OpenedDisk>,
    /// Disk index -> its scheduler's counters.
    sched_stats: Vec<Arc<SchedStats>>,
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
        let sched_stats: Vec<Arc<SchedStats>> = disks.iter().map(|_| Arc::default()).collect();
        let mut failure = None;
        for (number, group) in groups.into_iter().enumerate() {
            let core = config.cores.get(number).copied();
            let stats = group
                .iter()
                .map(|(index, _)| Arc::clone(&sched_stats[*index]))
                .collect();
            match start_reactor(number, core, group, stats, config) {
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
                sched_stats,
            }),
            config: config.clone(),
            handoffs: AtomicU64::new(0),
            hosted: AtomicU64::new(0),
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
        let stats = Arc::<SchedStats>::default();
        let (handle, mut opened) = start_reactor(
            number,
            core,
            vec![(index, spec)],
            vec![Arc::clone(&stats)],
            &self.config,
        )?;
        let (_, disk) = opened.pop().expect("one disk opened");
        routes.sched_stats.push(stats);
        routes.reactors.push(handle);
        routes.placement.push((number, 0));
        routes.disks.push(disk);
        Ok(index)
    }

    /// Sends a request; `reply` runs on the reactor thread when it is done.
    /// Its class: the current task's background work (`sched::as_background`),
    /// else a medium-priority client's.
    pub fn submit(&self, disk: usize, command: Command, reply: ReplyFn) {
        let class = sched::class_for(crate::volume::qos::IoPriority::Medium);
        self.submit_as(disk, class, command, reply);
    }

    /// `submit` with the request's class given (`sched`).
    pub fn submit_as(&self, disk: usize, class: IoClass, command: Command, reply: ReplyFn) {
        let routes = self.routes.read();
        let (reactor, local) = routes.placement[disk];
        let control = Control::Request {
            disk: local,
            class,
            command,
            reply,
        };
        if let Err(error) = routes.reactors[reactor].send(control, &self.handoffs) {
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
            routes.reactors[reactor].send(Control::Query { disk: local, run }, &self.handoffs)?;
        }
        receiver.recv().map_err(|_| EngineError::Stopped)
    }

    /// The reactors that can host guests (those on io_uring), in order.
    #[must_use]
    pub fn hosts(&self) -> Vec<Host> {
        let routes = self.routes.read();
        routes
            .reactors
            .iter()
            .enumerate()
            .filter_map(|(number, reactor)| host_of(number, reactor))
            .collect()
    }

    /// The reactor that owns disk `disk`, as a host of guests (None when it
    /// does not run io_uring).
    #[must_use]
    pub fn host_of_disk(&self, disk: usize) -> Option<Host> {
        let routes = self.routes.read();
        let (number, _) = *routes.placement.get(disk)?;
        host_of(number, &routes.reactors[number])
    }

    /// Serves `guest` on reactor `reactor`'s thread until it finishes (or
    /// the engine stops, which drops it).
    pub fn host_guest(&self, reactor: usize, guest: Box<dyn Guest>) -> Result<(), EngineError> {
        let routes = self.routes.read();
        let handle = routes.reactors.get(reactor).ok_or(EngineError::Stopped)?;
        handle.send(Control::Guest(guest), &self.handoffs)?;
        self.hosted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `future` to completion on `host`'s reactor (a `FutureGuest`),
    /// in the current runtime's context (its I/O and timers wake it).
    pub fn host_future(
        &self,
        host: &Host,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), EngineError> {
        let guest = FutureGuest::new(future, host.waker.clone(), tokio::runtime::Handle::current());
        self.host_guest(host.reactor, Box::new(guest))
    }

    /// Guests (NBD and peer connections, FUSE io_uring queues) handed to
    /// the reactors since the engine started.
    #[must_use]
    pub fn guests_hosted(&self) -> u64 {
        self.hosted.load(Ordering::Relaxed)
    }

    /// Disk `disk`'s scheduler counters (None: no such disk).
    #[must_use]
    pub fn sched_stats(&self, disk: usize) -> Option<Arc<SchedStats>> {
        self.routes.read().sched_stats.get(disk).cloned()
    }

    /// Requests that a reactor's guest sent to another reactor's disk.
    #[must_use]
    pub fn handoffs(&self) -> u64 {
        self.handoffs.load(Ordering::Relaxed)
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
            let _ = reactor.send(Control::Shutdown, &self.handoffs);
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

/// Reactor `number` as a host of guests, if it runs io_uring.
fn host_of(number: usize, reactor: &ReactorHandle) -> Option<Host> {
    Some(Host {
        reactor: number,
        core: reactor.core,
        notify_fd: reactor.notify_fd?,
        waker: ReactorWaker::new(reactor.id, Arc::clone(&reactor.waker)),
    })
}

type Started = (ReactorHandle, Vec<(usize, OpenedDisk)>);

fn start_reactor(
    number: usize,
    core: Option<usize>,
    group: Vec<(usize, DiskSpec)>,
    sched_stats: Vec<Arc<SchedStats>>,
    config: &EngineConfig,
) -> Result<Started, EngineError> {
    let (sender, receiver) = bounded(REACTOR_QUEUE_MAX);
    let (ready_sender, ready_receiver) = bounded(1);
    let sleeping = Arc::new(AtomicBool::new(false));
    let config = config.clone();
    let thread_sleeping = Arc::clone(&sleeping);
    let id = guest::next_reactor_id();
    let thread = std::thread::Builder::new()
        .name(format!("ballast-reactor-{number}"))
        .spawn(move || {
            guest::enter_reactor(id);
            if let Some(core) = core {
                if let Err(error) = kernel_iface::affinity::pin_current_thread(core) {
                    tracing::warn!(core, %error, "could not pin reactor thread");
                }
            }
            match open_group(&group, &config) {
                Ok((engine, stores, opened)) => {
                    socket::enter(ReactorWaker::new(id, engine.waker()), engine.notify_fd().is_some());
                    let _ = ready_sender.send(Ok((engine.waker(), engine.notify_fd(), opened)));
                    reactor::Reactor::new(engine, stores, sched_stats, receiver, thread_sleeping).run();
                }
                Err(error) => {
                    let _ = ready_sender.send(Err(error));
                }
            }
        })
        .map_err(|error| EngineError::Thread(error.to_string()))?;
    match ready_receiver.recv() {
        Ok(Ok((waker, notify_fd, opened))) => Ok((
            ReactorHandle {
                id,
                core,
                sender,
                waker,
                notify_fd,
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
    let mut discards = Vec::with_capacity(group.len());
    for (_, disk) in group {
        let opened = kernel_iface::device::open_exclusive(&disk.path, true).map_err(|error| EngineError::Open {
            path: disk.path.display().to_string(),
            reason: error.to_string(),
        })?;
        discards.push(discard_setting(&opened, config.discard_bytes_per_s));
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
        store_config.discard_bytes_per_interval = discards[file].0;
        // The reactor never stops for a checkpoint's encoding (seconds on a full 1 TiB disk).
        store_config.checkpoint_encoding = disk_layout::store::CheckpointEncoding::Background;
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
                discard_off: discards[file].1.clone(),
            },
        ));
        stores.push(store);
    }
    Ok((engine, stores, opened))
}

/// The store's discard pace for one disk: the node's rate per interval, or
/// 0 and why (logged) when the node's rate is 0 or the device cannot take
/// discards.
fn discard_setting(opened: &kernel_iface::device::OpenedDevice, bytes_per_s: u64) -> (u64, Option<String>) {
    if bytes_per_s == 0 {
        return (0, Some("discard_mib_per_s is 0".into()));
    }
    if let Some(reason) = kernel_iface::device::discard_unsupported_reason(opened) {
        tracing::info!(disk = %opened.path.display(), %reason, "freed space will not be discarded");
        return (0, Some(reason));
    }
    ((bytes_per_s * reactor::TICK_INTERVAL_MS / 1000).max(1), None)
}

/// A fresh random value per store open (see the batch header's open_nonce).
fn open_nonce() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use disk_layout::{FormatParams, Store};

    use super::*;

    const NODE: [u8; 16] = [7; 16];
    const WAIT_MAX: Duration = Duration::from_secs(10);

    /// A formatted 64 MiB disk file, removed on drop.
    struct DiskFile(PathBuf);

    impl DiskFile {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("ballast-engine-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let size_bytes = 64 << 20;
            std::fs::File::create(&path).unwrap().set_len(size_bytes).unwrap();
            let opened = kernel_iface::device::open_exclusive(&path, true).unwrap();
            let mut engine: Box<dyn kernel_iface::IoEngine<IoBuf>> =
                kernel_iface::open_engine(vec![opened.file], kernel_iface::EngineChoice::Auto).unwrap();
            let mut io = disk_io::DiskIo {
                engine: engine.as_mut(),
                file: 0,
            };
            let params = FormatParams {
                disk_size_bytes: size_bytes,
                segment_size_bytes: 1 << 20,
                cluster_uuid: [1; 16],
                node_uuid: NODE,
                disk_uuid: [2; 16],
                created_unix_seconds: 1,
            };
            Store::format(&mut io, &params, name).unwrap();
            Self(path)
        }
    }

    impl Drop for DiskFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn start(disks: &[&DiskFile], cores: Vec<usize>) -> Arc<Engine> {
        let specs: Vec<DiskSpec> = disks.iter().map(|disk| DiskSpec { path: disk.0.clone() }).collect();
        let mut config = EngineConfig::new(NODE);
        config.cores = cores;
        Arc::new(Engine::start(&specs, &config).unwrap())
    }

    fn write(lba: u64, byte: u8) -> Command {
        Command::Write {
            volume_id: 1,
            lba,
            data: vec![byte; 4096].into(),
            epoch: 1,
            volume_sequence: lba + 1,
        }
    }

    /// Sends one write to `disk` on its first turn, finishes when answered;
    /// records the thread each turn and the answer ran on.
    struct OneWrite {
        engine: Arc<Engine>,
        disk: usize,
        sent: bool,
        answered: Arc<AtomicBool>,
        threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
        waker: ReactorWaker,
        finished: Arc<AtomicUsize>,
    }

    impl Guest for OneWrite {
        fn serve(&mut self) -> GuestState {
            self.threads.lock().unwrap().push(std::thread::current().id());
            if !self.sent {
                self.sent = true;
                let (answered, threads, waker) = (
                    Arc::clone(&self.answered),
                    Arc::clone(&self.threads),
                    self.waker.clone(),
                );
                self.engine.submit(
                    self.disk,
                    write(3, 0xab),
                    Box::new(move |result| {
                        assert!(result.is_ok(), "{result:?}");
                        threads.lock().unwrap().push(std::thread::current().id());
                        answered.store(true, Ordering::SeqCst);
                        waker.wake();
                    }),
                );
            }
            if self.answered.load(Ordering::SeqCst) {
                return GuestState::Finished;
            }
            GuestState::Serving
        }
    }

    impl Drop for OneWrite {
        fn drop(&mut self) {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT_MAX;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    type Threads = Arc<Mutex<Vec<std::thread::ThreadId>>>;

    impl OneWrite {
        /// The guest, the threads it records and its drop count.
        fn new(engine: &Arc<Engine>, host: &Host, disk: usize) -> (Self, Threads, Arc<AtomicUsize>) {
            let threads = Arc::new(Mutex::new(Vec::new()));
            let finished = Arc::new(AtomicUsize::new(0));
            let guest = OneWrite {
                engine: Arc::clone(engine),
                disk,
                sent: false,
                answered: Arc::new(AtomicBool::new(false)),
                threads: Arc::clone(&threads),
                waker: host.waker.clone(),
                finished: Arc::clone(&finished),
            };
            (guest, threads, finished)
        }
    }

    fn one_write(engine: &Arc<Engine>, host: &Host, disk: usize) -> (Threads, Arc<AtomicUsize>) {
        let (guest, threads, finished) = OneWrite::new(engine, host, disk);
        engine.host_guest(host.reactor, Box::new(guest)).unwrap();
        (threads, finished)
    }

    #[test]
    fn a_guest_is_served_on_its_reactor_thread_and_its_own_disks_answers_come_back_there_without_a_handoff() {
        let disk = DiskFile::new("own");
        let engine = start(&[&disk], Vec::new());
        let hosts = engine.hosts();
        assert_eq!(hosts.len(), 1, "one reactor on io_uring hosts guests");
        let (threads, finished) = one_write(&engine, &hosts[0], 0);
        wait_for("the guest to finish", || finished.load(Ordering::SeqCst) == 1);
        let threads = threads.lock().unwrap().clone();
        assert!(threads.len() >= 3, "turns and the answer: {threads:?}");
        assert!(
            threads.iter().all(|thread| *thread == threads[0]),
            "every turn and the answer ran on the reactor's thread: {threads:?}"
        );
        assert_ne!(threads[0], std::thread::current().id());
        assert_eq!(
            engine.handoffs(),
            0,
            "a request for the reactor's own disk is no hand-off"
        );
        let written = engine
            .call(
                0,
                Command::Read {
                    volume_id: 1,
                    lba: 3,
                    block_count: 1,
                },
            )
            .unwrap();
        let disk_layout::Reply::Read(buf) = written else {
            panic!("a read answers with data")
        };
        assert!(
            buf.as_slice().iter().all(|byte| *byte == 0xab),
            "the guest's write landed"
        );
    }

    #[test]
    fn a_guest_request_for_another_reactors_disk_is_a_counted_handoff() {
        let (first, second) = (DiskFile::new("first"), DiskFile::new("second"));
        let engine = start(&[&first, &second], vec![0, 0]);
        let hosts = engine.hosts();
        assert_eq!(hosts.len(), 2, "a reactor per disk");
        let (_, finished) = one_write(&engine, &hosts[0], 1);
        wait_for("the guest to finish", || finished.load(Ordering::SeqCst) == 1);
        assert_eq!(engine.handoffs(), 1);
    }

    #[test]
    fn a_hosted_future_woken_by_the_runtime_finishes_and_one_that_panics_leaves_the_reactor_serving() {
        let disk = DiskFile::new("future");
        let engine = start(&[&disk], Vec::new());
        let host = engine.hosts().remove(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (done_sender, done) = std::sync::mpsc::channel();
        // Woken from the runtime's timer thread, not the reactor's.
        let sleeper = FutureGuest::new(
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = done_sender.send(std::thread::current().id());
            },
            host.waker.clone(),
            runtime.handle().clone(),
        );
        engine.host_guest(host.reactor, Box::new(sleeper)).unwrap();
        let polled_on = done.recv_timeout(WAIT_MAX).expect("the woken future finished");
        assert_ne!(polled_on, std::thread::current().id());
        let panics = FutureGuest::new(
            async { panic!("a bug in hosted work") },
            host.waker.clone(),
            runtime.handle().clone(),
        );
        engine.host_guest(host.reactor, Box::new(panics)).unwrap();
        // The reactor still answers its disk and still hosts work.
        let (threads, finished) = one_write(&engine, &host, 0);
        wait_for("a guest after the panic", || finished.load(Ordering::SeqCst) == 1);
        assert_eq!(threads.lock().unwrap()[0], polled_on, "the same reactor thread");
    }

    /// A runtime with I/O, a reactor host, and a TCP connection accepted
    /// on the runtime: (runtime, engine, host, accepted, the client's end).
    fn hosted_connection(
        name: &str,
    ) -> (
        tokio::runtime::Runtime,
        Arc<Engine>,
        DiskFile,
        Host,
        tokio::net::TcpStream,
        std::net::TcpStream,
    ) {
        let disk = DiskFile::new(name);
        let engine = start(&[&disk], Vec::new());
        let host = engine.hosts().remove(0);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(address).unwrap();
        client.set_read_timeout(Some(WAIT_MAX)).unwrap();
        client.set_write_timeout(Some(WAIT_MAX)).unwrap();
        let (accepted, _) = runtime.block_on(listener.accept()).unwrap();
        (runtime, engine, disk, host, accepted, client)
    }

    #[test]
    fn a_hosted_socket_moves_to_its_reactors_ring_and_carries_data_both_ways_when_it_is_not_ready() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (runtime, engine, _disk, host, accepted, client) = hosted_connection("echo");
        let polls_before = socket::polls_armed();
        let (done_sender, done) = std::sync::mpsc::channel();
        // An echo: more than the socket buffers hold, so reads and writes
        // both find the socket not ready and wait on the ring.
        let _context = runtime.enter();
        engine
            .host_future(&host, async move {
                let mut socket = socket::HostableSocket::new(accepted);
                let mut buf = vec![0u8; 64 << 10];
                let mut echoed = 0usize;
                loop {
                    let read = socket.read(&mut buf).await.unwrap();
                    if read == 0 {
                        break;
                    }
                    socket.write_all(&buf[..read]).await.unwrap();
                    echoed += read;
                }
                socket.shutdown().await.unwrap();
                let _ = done_sender.send((echoed, socket.on_reactor(), std::thread::current().id()));
            })
            .unwrap();
        let sent: Vec<u8> = (0..(16usize << 20))
            .map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap())
            .collect();
        let mut writer = client.try_clone().unwrap();
        let writing = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                writer.write_all(&sent).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let mut received = Vec::new();
        (&client).read_to_end(&mut received).unwrap();
        writing.join().unwrap();
        let (echoed, on_reactor, thread) = done.recv_timeout(WAIT_MAX).expect("the echo finished");
        assert_eq!(echoed, sent.len());
        assert!(
            received == sent,
            "the echo came back changed ({} bytes)",
            received.len()
        );
        assert!(on_reactor, "the socket moved to the reactor's ring");
        assert_ne!(thread, std::thread::current().id());
        assert!(socket::polls_armed() > polls_before, "it waited on the ring");
    }

    #[test]
    fn a_socket_that_moves_to_a_reactor_while_a_runtime_task_waits_on_it_serves_that_task_from_the_ring() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (runtime, engine, _disk, host, accepted, mut client) = hosted_connection("moved");
        let (reader, mut writer) = tokio::io::split(socket::HostableSocket::new(accepted));
        let (started_sender, started) = std::sync::mpsc::channel();
        let (read_sender, read) = std::sync::mpsc::channel();
        let wanted = 4usize << 20;
        // A runtime task whose read is pending on the runtime's epoll when
        // the socket moves: it must be woken, and then served by the ring
        // (it reads from a runtime thread, the socket's polls are the reactor's).
        runtime.spawn(async move {
            let mut reader = reader;
            let mut received = vec![0u8; wanted];
            let mut reading = std::pin::pin!(reader.read_exact(&mut received));
            assert!(futures::poll!(&mut reading).is_pending(), "nothing was sent yet");
            started_sender.send(()).unwrap();
            let outcome = reading.await.map(|_| ());
            let _ = read_sender.send(outcome.map(|()| received));
        });
        started.recv_timeout(WAIT_MAX).unwrap();
        let _context = runtime.enter();
        let (moved_sender, moved) = std::sync::mpsc::channel();
        engine
            .host_future(&host, async move {
                // The first poll on the reactor moves the socket.
                writer.write_all(b"m").await.unwrap();
                let _ = moved_sender.send(());
            })
            .unwrap();
        moved.recv_timeout(WAIT_MAX).unwrap();
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"m");
        let sent: Vec<u8> = (0..wanted).map(|i| u8::try_from(i % 253).unwrap()).collect();
        client.write_all(&sent).unwrap();
        let received = read
            .recv_timeout(WAIT_MAX)
            .expect("the task that waited before the move was woken and read everything")
            .unwrap();
        assert!(received == sent, "the bytes read after the move differ");
    }

    #[test]
    fn a_hosted_socket_dropped_while_it_waits_on_the_ring_closes_the_connection() {
        use std::io::Read;
        use tokio::io::AsyncReadExt;
        let (runtime, engine, _disk, host, accepted, client) = hosted_connection("drop");
        let (done_sender, done) = std::sync::mpsc::channel();
        let _context = runtime.enter();
        engine
            .host_future(&host, async move {
                let mut socket = socket::HostableSocket::new(accepted);
                let mut buf = [0u8; 16];
                // Nothing comes: the read waits on the ring until the time-out drops it.
                let read = tokio::time::timeout(Duration::from_millis(50), socket.read(&mut buf)).await;
                let _ = done_sender.send((read.is_err(), socket.on_reactor()));
            })
            .unwrap();
        assert_eq!(done.recv_timeout(WAIT_MAX).unwrap(), (true, true));
        // The armed poll must not keep the socket open: the client sees the end.
        let mut rest = Vec::new();
        let read = (&client).read_to_end(&mut rest);
        assert!(matches!(read, Ok(0)), "the client saw the connection closed: {read:?}");
    }

    #[test]
    fn a_large_low_priority_write_beside_a_high_priority_one_goes_in_pieces_and_reads_back_whole() {
        use crate::volume::qos::IoPriority;
        let disk = DiskFile::new("pieces");
        let engine = start(&[&disk], Vec::new());
        let (sender, answers) = crossbeam_channel::unbounded();
        let answer = |what: &'static str| -> ReplyFn {
            let sender = sender.clone();
            Box::new(move |result| {
                let _ = sender.send((what, result));
            })
        };
        // A high-priority volume is active, then a low one writes 1 MiB.
        engine.submit_as(
            0,
            IoClass::Client(IoPriority::High),
            Command::Write {
                volume_id: 2,
                lba: 0,
                data: vec![1u8; 4096].into(),
                epoch: 1,
                volume_sequence: 1,
            },
            answer("high"),
        );
        let data: Vec<u8> = (0..1usize << 20)
            .map(|i| u8::try_from(i / 4096 % 251).unwrap())
            .collect();
        engine.submit_as(
            0,
            IoClass::Client(IoPriority::Low),
            Command::Write {
                volume_id: 1,
                lba: 100,
                data: data.clone().into(),
                epoch: 1,
                volume_sequence: 1,
            },
            answer("low"),
        );
        let mut answered = Vec::new();
        for _ in 0..2 {
            let (what, result) = answers.recv_timeout(WAIT_MAX).expect("both writes are answered");
            assert!(matches!(result, Ok(disk_layout::Reply::Written)), "{what}: {result:?}");
            answered.push(what);
        }
        answered.sort_unstable();
        assert_eq!(answered, ["high", "low"], "each write answered once");
        let stats = engine.sched_stats(0).unwrap();
        let low = IoClass::Client(IoPriority::Low).index();
        assert_eq!(
            stats.requests[low].load(Ordering::Relaxed),
            (1 << 20) / sched::PROTECTED_BYTES,
            "the low write went in pieces"
        );
        assert_eq!(stats.bytes[low].load(Ordering::Relaxed), 1 << 20);
        let read = engine
            .call(
                0,
                Command::Read {
                    volume_id: 1,
                    lba: 100,
                    block_count: 256,
                },
            )
            .unwrap();
        let disk_layout::Reply::Read(buf) = read else {
            panic!("a read answers with data")
        };
        assert!(buf.as_slice() == &data[..], "the pieces read back as the whole write");
    }

    #[test]
    fn a_guest_that_keeps_its_reactor_awake_still_gets_its_disk_io_done() {
        /// Wakes itself on every turn, so its reactor never sleeps.
        struct Restless {
            inner: OneWrite,
        }
        impl Guest for Restless {
            fn serve(&mut self) -> GuestState {
                self.inner.waker.wake();
                self.inner.serve()
            }
        }
        let disk = DiskFile::new("restless");
        let engine = start(&[&disk], Vec::new());
        let host = engine.hosts().remove(0);
        let (inner, _, finished) = OneWrite::new(&engine, &host, 0);
        engine.host_guest(host.reactor, Box::new(Restless { inner })).unwrap();
        wait_for("the write of a guest that never lets its reactor sleep", || {
            finished.load(Ordering::SeqCst) == 1
        });
    }
}
