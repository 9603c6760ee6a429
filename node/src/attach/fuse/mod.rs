//! The FUSE backend of host attach: one filesystem, mounted by the node at
//! `DATA_DIR/attach/`, holds one file per attached volume, the size of the
//! volume; its reads, writes, fsyncs and fallocates go straight to the
//! volume (no NBD hop). A loop device with direct I/O over that file is the
//! host's block device. Works on any Linux with FUSE, where ublk and the
//! kernel NBD client may be missing.
//!
//! The protocol is our own (`proto`; only the handful of requests a loop
//! device and `ls` send), so requests are served concurrently: a channel
//! per core (`FUSE_DEV_IOC_CLONE`) is read by a thread of its own, which
//! answers metadata requests at once and hands reads, writes, fsyncs and
//! fallocates to the runtime; each is answered from wherever the volume
//! completes it. The kernel bounds what is in flight (`MAX_BACKGROUND`
//! asynchronous requests, and one synchronous request per blocked caller).

pub mod proto;
pub mod uring;

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernel_iface::fuse::{FuseChannel, Received};
use parking_lot::RwLock;

use self::proto::{Attr, InHeader, Operation};
use crate::metrics::Op;
use crate::volume::io::ReadData;
use crate::volume::Volume;

const ROOT: u64 = 1;
/// Attributes and names may be cached this long (sizes change only on resize).
const TTL_SECONDS: u64 = 1;
/// Largest write (and read) the kernel sends: 1 MiB, in 256 pages.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
const MAX_PAGES: u16 = 256;
/// Asynchronous requests (a loop device's direct I/O) the kernel keeps in
/// flight; its default (12) would cap a device's queue depth at 12.
pub const MAX_BACKGROUND: u16 = 256;
const CONGESTION_THRESHOLD: u16 = MAX_BACKGROUND / 4 * 3;
/// A request is at most its header, the write arguments and the data.
const REQUEST_BUFFER_BYTES: usize = MAX_WRITE_BYTES as usize + 4096;
/// Channels (threads reading requests) at most, whatever the core count.
const CHANNELS_MAX: usize = 16;
/// How long stopping waits for the channel threads.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest fallocate served in one request, so one request's work stays bounded.
const FALLOCATE_BYTES_MAX: u64 = 1 << 40;

/// The files of the attach filesystem, shared with the node.
#[derive(Default)]
pub struct Files {
    /// Inode → volume; inode = volume id + 1 (ids are never reused).
    by_inode: RwLock<BTreeMap<u64, Arc<Volume>>>,
    /// Until then, I/O on a volume not served yet waits for it instead of
    /// failing: a node that took its devices over from the binary it
    /// replaced (an upgrade in place) serves them once it is back in its
    /// cluster, a moment after it reads their first requests.
    wait_for_serving_until: parking_lot::Mutex<Option<Instant>>,
}

impl Files {
    pub fn insert(&self, volume: Arc<Volume>) {
        self.by_inode.write().insert(volume.id + 1, volume);
    }

    pub fn remove(&self, name: &str) {
        self.by_inode.write().retain(|_, volume| volume.name != name);
    }

    /// Forgets every file (their volumes are released).
    pub fn clear(&self) {
        self.by_inode.write().clear();
    }

    /// The volume attached under `name`, if any.
    pub fn named(&self, name: &str) -> Option<Arc<Volume>> {
        self.by_inode
            .read()
            .values()
            .find(|volume| volume.name == name)
            .cloned()
    }

    fn get(&self, inode: u64) -> Option<Arc<Volume>> {
        self.by_inode.read().get(&inode).cloned()
    }

    /// Lets I/O on volumes not served yet wait until `deadline` (see
    /// `wait_for_serving_until`).
    pub fn wait_for_serving(&self, deadline: Instant) {
        *self.wait_for_serving_until.lock() = Some(deadline);
    }

    /// The volume of `inode` for I/O: only while this node serves it (after
    /// a forced failover elsewhere, its old host gets errors, not stale
    /// data); with a deadline to wait for it to be served (after an upgrade
    /// in place) when that window is open.
    fn serving(&self, inode: u64) -> Result<(Arc<Volume>, Option<Instant>), i32> {
        let volume = self.get(inode).ok_or(libc::ENOENT)?;
        if volume.is_served() {
            return Ok((volume, None));
        }
        let window = *self.wait_for_serving_until.lock();
        match window.filter(|deadline| Instant::now() < *deadline) {
            Some(deadline) => Ok((volume, Some(deadline))),
            None => {
                tracing::warn!(volume = %volume.name, "I/O on an attached device of a volume this node no longer serves: refused");
                Err(libc::EIO)
            }
        }
    }

    fn by_name(&self, name: &[u8]) -> Option<Arc<Volume>> {
        self.by_inode
            .read()
            .values()
            .find(|volume| volume.name.as_bytes() == name)
            .cloned()
    }
}

/// Waits until `volume` is served or `deadline` passes (then EIO).
async fn served_by(volume: &Volume, deadline: Option<Instant>) -> Result<(), i32> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    while !volume.is_served() {
        if Instant::now() >= deadline {
            tracing::warn!(volume = %volume.name, "an attached device's volume was not served again in time after the node's upgrade: EIO");
            return Err(libc::EIO);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The errno a failed volume request answers (every backend).
pub(crate) fn errno(error: &crate::volume::VolumeIoError) -> i32 {
    match error {
        crate::volume::VolumeIoError::OutOfRange { .. } => libc::EINVAL,
        crate::volume::VolumeIoError::Locked { .. } => libc::EACCES,
        _ => libc::EIO,
    }
}

/// An answer's body.
pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    Read(ReadData),
}

/// An answer: 0 or an errno, and a body (sent only with 0).
pub struct Reply {
    pub errno: i32,
    pub body: Body,
}

impl Reply {
    pub(crate) fn ok(body: Body) -> Self {
        Self { errno: 0, body }
    }

    pub(crate) fn error(errno: i32) -> Self {
        Self {
            errno,
            body: Body::Empty,
        }
    }

    fn bytes(bytes: &[u8]) -> Self {
        Self::ok(Body::Bytes(bytes.to_vec()))
    }

    /// The answer's pieces after its header, and their length.
    pub(crate) fn pieces(&self) -> (Vec<IoSlice<'_>>, usize) {
        if self.errno != 0 {
            return (Vec::new(), 0);
        }
        match &self.body {
            Body::Empty => (Vec::new(), 0),
            Body::Bytes(bytes) => (vec![IoSlice::new(bytes)], bytes.len()),
            Body::Read(data) => (data.slices().map(IoSlice::new).collect(), data.len_bytes),
        }
    }
}

pub(crate) type Pending = Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// What a request gets.
pub enum Answer {
    Now(Reply),
    /// Served by the volume; answered when it completes.
    Later(Pending),
    /// Nothing (FORGET, INTERRUPT).
    Nothing,
}

/// Serves the attach filesystem's requests, whatever carries them.
pub struct AttachFs {
    files: Arc<Files>,
}

impl AttachFs {
    #[must_use]
    pub fn new(files: Arc<Files>) -> Self {
        Self { files }
    }

    fn attr_of(&self, inode: u64) -> Option<Attr> {
        if inode == ROOT {
            return Some(Attr {
                inode,
                size_bytes: 0,
                directory: true,
            });
        }
        self.files.get(inode).map(|volume| Attr {
            inode,
            size_bytes: volume.size_bytes(),
            directory: false,
        })
    }

    /// Answers one request.
    pub fn operate(&self, header: &InHeader, operation: Operation<'_>) -> Answer {
        self.operate_owning(header, operation, bytes::Bytes::copy_from_slice)
    }

    /// `operate`, with a write's data made owned by `own` (a copy, or a
    /// lease of the buffer it arrived in).
    pub fn operate_owning(
        &self,
        header: &InHeader,
        operation: Operation<'_>,
        own: impl FnOnce(&[u8]) -> bytes::Bytes,
    ) -> Answer {
        let inode = header.nodeid;
        match operation {
            Operation::Init { .. } => Answer::Now(Reply::error(libc::EPROTO)), // answered by the session
            Operation::Lookup { name } => Answer::Now(match self.files.by_name(name).filter(|_| inode == ROOT) {
                Some(volume) => Reply::bytes(&proto::encode_entry_out(
                    &Attr {
                        inode: volume.id + 1,
                        size_bytes: volume.size_bytes(),
                        directory: false,
                    },
                    TTL_SECONDS,
                )),
                None => Reply::error(libc::ENOENT),
            }),
            Operation::GetAttr => Answer::Now(match self.attr_of(inode) {
                Some(attr) => Reply::bytes(&proto::encode_attr_out(&attr, TTL_SECONDS)),
                None => Reply::error(libc::ENOENT),
            }),
            Operation::SetAttr { valid, size } => Answer::Now(match self.attr_of(inode) {
                // The size is the volume's: `ballast volume resize` changes it, not truncate.
                Some(attr) if valid & proto::FATTR_SIZE != 0 && size != attr.size_bytes => Reply::error(libc::EPERM),
                Some(attr) => Reply::bytes(&proto::encode_attr_out(&attr, TTL_SECONDS)),
                None => Reply::error(libc::ENOENT),
            }),
            Operation::Open => Answer::Now(match self.files.get(inode) {
                Some(_) => Reply::bytes(&proto::encode_open_out(
                    0,
                    proto::FOPEN_DIRECT_IO | proto::FOPEN_PARALLEL_DIRECT_WRITES | proto::FOPEN_NOFLUSH,
                )),
                None => Reply::error(libc::ENOENT),
            }),
            Operation::Read { offset, size } => self.read(inode, offset, size),
            Operation::Write { offset, data } => self.write(inode, offset, data.len(), || own(data)),
            Operation::Fsync => match self.files.get(inode) {
                Some(volume) => Answer::Later(Box::pin(async move {
                    match volume.counted(Op::Flush, 0, volume.flush()).await {
                        Ok(()) => Reply::ok(Body::Empty),
                        Err(error) => Reply::error(errno(&error)),
                    }
                })),
                None if inode == ROOT => Answer::Now(Reply::ok(Body::Empty)),
                None => Answer::Now(Reply::error(libc::ENOENT)),
            },
            Operation::Fallocate { offset, length, mode } => self.fallocate(inode, offset, length, mode),
            Operation::Flush | Operation::Release | Operation::ReleaseDir | Operation::Access => {
                Answer::Now(Reply::ok(Body::Empty))
            }
            Operation::OpenDir if inode == ROOT => Answer::Now(Reply::bytes(&proto::encode_open_out(0, 0))),
            Operation::OpenDir => Answer::Now(Reply::error(libc::ENOTDIR)),
            Operation::ReadDir { offset, size } => Answer::Now(self.read_dir(inode, offset, size)),
            Operation::StatFs => {
                let volumes = self.files.by_inode.read();
                let blocks = volumes.values().map(|volume| volume.size_bytes() / 4096).sum();
                Answer::Now(Reply::bytes(&proto::encode_statfs_out(blocks, volumes.len() as u64)))
            }
            Operation::NoReply => Answer::Nothing,
            Operation::Destroy => Answer::Now(Reply::ok(Body::Empty)),
            Operation::Unknown { opcode } => {
                tracing::debug!(opcode, "FUSE request the attach filesystem does not serve: ENOSYS");
                Answer::Now(Reply::error(libc::ENOSYS))
            }
        }
    }

    fn read(&self, inode: u64, offset: u64, size: u32) -> Answer {
        let (volume, wait) = match self.files.serving(inode) {
            Ok(serving) => serving,
            Err(errno) => return Answer::Now(Reply::error(errno)),
        };
        // Reads past the end return what there is (a file's semantics).
        let len = u64::from(size).min(volume.size_bytes().saturating_sub(offset));
        if len == 0 {
            return Answer::Now(Reply::ok(Body::Empty));
        }
        Answer::Later(Box::pin(async move {
            if let Err(errno) = served_by(&volume, wait).await {
                return Reply::error(errno);
            }
            match volume.counted(Op::Read, len, volume.read(offset, len)).await {
                Ok(data) => Reply::ok(Body::Read(data)),
                Err(error) => {
                    tracing::warn!(volume = %volume.name, %error, "attached device read failed");
                    Reply::error(errno(&error))
                }
            }
        }))
    }

    fn write(&self, inode: u64, offset: u64, len: usize, own: impl FnOnce() -> bytes::Bytes) -> Answer {
        let (volume, wait) = match self.files.serving(inode) {
            Ok(serving) => serving,
            Err(errno) => return Answer::Now(Reply::error(errno)),
        };
        let written = u32::try_from(len).unwrap_or(u32::MAX);
        // Out of the buffer it came in, which may take the next request.
        let data = own();
        // Every acknowledged write is durable (and replicated): FUA is implicit.
        Answer::Later(Box::pin(async move {
            if let Err(errno) = served_by(&volume, wait).await {
                return Reply::error(errno);
            }
            match volume
                .counted(Op::Write, u64::from(written), volume.write(offset, data))
                .await
            {
                Ok(()) => Reply::bytes(&proto::encode_write_out(written)),
                Err(error) => {
                    tracing::warn!(volume = %volume.name, %error, "attached device write failed");
                    Reply::error(errno(&error))
                }
            }
        }))
    }

    /// The loop device sends discards as punch-hole and write-zeroes as
    /// zero-range (or punch-hole when it may unmap).
    fn fallocate(&self, inode: u64, offset: u64, length: u64, mode: u32) -> Answer {
        let (volume, wait) = match self.files.serving(inode) {
            Ok(serving) => serving,
            Err(errno) => return Answer::Now(Reply::error(errno)),
        };
        let end = offset.saturating_add(length).min(volume.size_bytes());
        if length > FALLOCATE_BYTES_MAX || offset > end {
            return Answer::Now(Reply::error(libc::EINVAL));
        }
        let allocate = match mode & !proto::FALLOC_FL_KEEP_SIZE {
            // Preallocation: a thin volume reserves nothing; the range already reads.
            0 => return Answer::Now(Reply::ok(Body::Empty)),
            proto::FALLOC_FL_PUNCH_HOLE => false,
            proto::FALLOC_FL_ZERO_RANGE => true,
            _ => return Answer::Now(Reply::error(libc::EOPNOTSUPP)),
        };
        if end == offset {
            return Answer::Now(Reply::ok(Body::Empty));
        }
        Answer::Later(Box::pin(async move {
            if let Err(errno) = served_by(&volume, wait).await {
                return Reply::error(errno);
            }
            let op = if allocate { Op::WriteZeroes } else { Op::Trim };
            match volume
                .counted(op, end - offset, volume.write_zeroes(offset, end - offset, allocate))
                .await
            {
                Ok(()) => Reply::ok(Body::Empty),
                Err(error) => {
                    tracing::warn!(volume = %volume.name, %error, "attached device discard / write-zeroes failed");
                    Reply::error(errno(&error))
                }
            }
        }))
    }

    fn read_dir(&self, inode: u64, offset: u64, size: u32) -> Reply {
        if inode != ROOT {
            return Reply::error(libc::ENOTDIR);
        }
        let mut entries = vec![(ROOT, true, b".".to_vec()), (ROOT, true, b"..".to_vec())];
        for (inode, volume) in self.files.by_inode.read().iter() {
            entries.push((*inode, false, volume.name.as_bytes().to_vec()));
        }
        let mut out = Vec::new();
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (inode, directory, name)) in entries.iter().enumerate().skip(skip) {
            if !proto::push_dirent(&mut out, size as usize, *inode, index as u64 + 1, *directory, name) {
                break;
            }
        }
        Reply::ok(Body::Bytes(out))
    }
}

/// What INIT agrees to, given what the kernel offers.
pub fn negotiate(
    major: u32,
    minor: u32,
    max_readahead: u32,
    offered: u64,
    want_uring: bool,
) -> Result<proto::InitOut, String> {
    if major != proto::KERNEL_VERSION || minor < proto::KERNEL_MINOR_VERSION_MIN {
        return Err(format!(
            "the kernel speaks FUSE {major}.{minor}; the attach filesystem needs 7.{} or later",
            proto::KERNEL_MINOR_VERSION_MIN
        ));
    }
    let mut wanted = proto::ASYNC_READ
        | proto::BIG_WRITES
        | proto::ASYNC_DIO
        | proto::PARALLEL_DIROPS
        | proto::MAX_PAGES
        | proto::INIT_EXT;
    if want_uring {
        wanted |= proto::OVER_IO_URING;
    }
    Ok(proto::InitOut {
        minor: minor.min(proto::KERNEL_MINOR_VERSION),
        max_readahead,
        flags: offered & wanted,
        max_background: MAX_BACKGROUND,
        congestion_threshold: CONGESTION_THRESHOLD,
        max_write: MAX_WRITE_BYTES,
        max_pages: MAX_PAGES,
    })
}

/// Writes `reply` to request `unique` on `channel`.
fn send(channel: &FuseChannel, unique: u64, reply: &Reply) {
    let (pieces, body_bytes) = reply.pieces();
    let header = proto::encode_out_header(unique, -reply.errno, body_bytes);
    let mut parts = Vec::with_capacity(pieces.len() + 1);
    parts.push(IoSlice::new(&header));
    parts.extend(pieces);
    if let Err(error) = channel.send(&parts) {
        // ENOENT: the kernel gave up on the request (interrupted); ENODEV: the mount is gone.
        if !matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) {
            tracing::warn!(%error, unique, "FUSE answer not taken by the kernel");
        }
    }
}

/// What the channel that gets INIT tells the io_uring queues.
#[derive(Default)]
pub struct Init {
    /// Ask the kernel for FUSE over io_uring in the INIT answer.
    pub want_uring: bool,
    /// Set once the INIT answer is sent.
    pub done: uring::InitDone,
}

/// What a channel reader and the session share.
#[derive(Default)]
struct Control {
    /// Readers stop taking requests (an upgrade in place hands the session over).
    pausing: std::sync::atomic::AtomicBool,
    /// Requests read and not answered yet.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// A session handed to the next program of this process (an upgrade in
/// place): the descriptor of its first channel, kept across `execve`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandedOver {
    pub fd: i32,
    pub mountpoint: PathBuf,
}

/// A mounted attach filesystem and the threads serving its channels (and
/// its io_uring queues, with FUSE over io_uring).
pub struct Session {
    mountpoint: PathBuf,
    /// The channels, and the thread reading each (same order).
    channels: Vec<Arc<FuseChannel>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    queues: Option<uring::Queues>,
    filesystem: Arc<AttachFs>,
    runtime: tokio::runtime::Handle,
    control: Arc<Control>,
    /// Given to the next program: not unmounted on drop.
    handed_over: bool,
}

impl Session {
    /// Mounts the attach filesystem at `mountpoint` and serves it with
    /// `channel_count` channels (at most `CHANNELS_MAX`).
    pub fn mount(
        mountpoint: &Path,
        filesystem: Arc<AttachFs>,
        runtime: &tokio::runtime::Handle,
        channel_count: usize,
        use_uring: bool,
        engine: &crate::engine::Engine,
    ) -> Result<Self, String> {
        let first = kernel_iface::fuse::mount(mountpoint, "ballast").map_err(|error| {
            format!(
                "cannot mount the attach filesystem at {} (FUSE: /dev/fuse and CAP_SYS_ADMIN are needed): {error}",
                mountpoint.display()
            )
        })?;
        let first = Arc::new(first);
        let init = Arc::new(Init {
            want_uring: use_uring,
            done: uring::InitDone::default(),
        });
        let queues = if use_uring {
            match uring::Queues::start(&first, mountpoint, &filesystem, runtime, &init, engine) {
                Ok(queues) => Some(queues),
                Err(error) => {
                    let _ = kernel_iface::fuse::abort(mountpoint);
                    let _ = kernel_iface::fuse::unmount(mountpoint);
                    return Err(format!("FUSE over io_uring: {error}"));
                }
            }
        } else {
            None
        };
        let session = Self::serve(mountpoint, first, channel_count, queues, filesystem, runtime, &init);
        if session.is_err() {
            let _ = kernel_iface::fuse::unmount(mountpoint);
        }
        let session = session?;
        tracing::info!(mountpoint = %mountpoint.display(), channels = session.threads.len(), io_uring = use_uring, "host attach FUSE filesystem mounted");
        Ok(session)
    }

    /// Serves a session the program this process ran before handed over
    /// (`hand_over`): the filesystem stays mounted, and requests the kernel
    /// queued meanwhile are read now.
    pub fn adopt(
        handed: &HandedOver,
        filesystem: Arc<AttachFs>,
        runtime: &tokio::runtime::Handle,
        channel_count: usize,
    ) -> Result<Self, String> {
        // The descriptor came across execve in the hand-over record.
        let first = FuseChannel::from_inherited(handed.fd)
            .map_err(|error| format!("cannot take over the attach filesystem's FUSE session: {error}"))?;
        let session = Self::serve(
            &handed.mountpoint,
            Arc::new(first),
            channel_count,
            None,
            filesystem,
            runtime,
            &Arc::new(Init::default()),
        )?;
        tracing::info!(mountpoint = %handed.mountpoint.display(), channels = session.threads.len(), "host attach FUSE session taken over from the previous binary");
        Ok(session)
    }

    /// Clones channels of `first` and starts a reader on each.
    fn serve(
        mountpoint: &Path,
        first: Arc<FuseChannel>,
        channel_count: usize,
        queues: Option<uring::Queues>,
        filesystem: Arc<AttachFs>,
        runtime: &tokio::runtime::Handle,
        init: &Arc<Init>,
    ) -> Result<Self, String> {
        if let Err(error) = kernel_iface::process::install_wake_handler() {
            tracing::warn!(%error, "cannot install the channel readers' wake-up signal: an upgrade in place will be refused");
        }
        let mut channels = vec![Arc::clone(&first)];
        for _ in 1..channel_count.clamp(1, CHANNELS_MAX) {
            match first.clone_channel() {
                Ok(channel) => channels.push(Arc::new(channel)),
                Err(error) => {
                    tracing::warn!(%error, "cannot clone a FUSE channel; serving with fewer");
                    break;
                }
            }
        }
        let control = Arc::new(Control::default());
        let mut session = Self {
            mountpoint: mountpoint.to_owned(),
            channels: Vec::new(),
            threads: Vec::new(),
            queues,
            filesystem,
            runtime: runtime.clone(),
            control,
            handed_over: false,
        };
        for channel in channels {
            match session.start_reader(&channel, init) {
                Ok(thread) => {
                    session.channels.push(channel);
                    session.threads.push(thread);
                }
                Err(error) => tracing::warn!(%error, "cannot start a FUSE channel thread"),
            }
        }
        if session.threads.is_empty() {
            session.handed_over = true; // nothing to stop; the caller unmounts
            return Err("no FUSE channel thread could start".into());
        }
        Ok(session)
    }

    fn start_reader(
        &self,
        channel: &Arc<FuseChannel>,
        init: &Arc<Init>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (channel, filesystem, runtime) = (Arc::clone(channel), Arc::clone(&self.filesystem), self.runtime.clone());
        let (init, control) = (Arc::clone(init), Arc::clone(&self.control));
        std::thread::Builder::new()
            .name(format!("fuse-{}", self.threads.len()))
            .spawn(move || serve_channel(&channel, &filesystem, &runtime, &init, &control))
    }

    /// Whether requests come through io_uring queues.
    #[must_use]
    pub fn over_uring(&self) -> bool {
        self.queues.is_some()
    }

    /// Stops reading requests, answers every request already read, and
    /// gives the session's first channel up so that it survives `execve`
    /// (an upgrade in place). The filesystem stays mounted: requests the
    /// kernel gets meanwhile wait for the next program. On failure (FUSE
    /// over io_uring, a reader or a request that does not finish within
    /// `timeout`) the session serves on and says why.
    /// After success the session is inert: dropping it leaves the
    /// filesystem mounted.
    pub fn hand_over(&mut self, timeout: Duration) -> Result<HandedOver, String> {
        use std::os::unix::thread::JoinHandleExt;
        use std::sync::atomic::Ordering;
        if self.queues.is_some() {
            return Err("the attach filesystem is served over io_uring, whose queues cannot be handed to another program without stranding a request (see `Attached::why_not_kept` in attach): detach its devices or restart the node instead".into());
        }
        let deadline = Instant::now() + timeout;
        self.control.pausing.store(true, Ordering::SeqCst);
        // A reader blocked in read(2) returns EINTR when woken and then sees
        // `pausing`; one that got a request first serves it, then stops.
        while self.threads.iter().any(|thread| !thread.is_finished()) {
            if Instant::now() >= deadline {
                self.resume();
                return Err(format!("the FUSE channel readers did not stop within {timeout:?}"));
            }
            for thread in self.threads.iter().filter(|thread| !thread.is_finished()) {
                let _ = kernel_iface::process::wake_thread(thread.as_pthread_t());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        while self.control.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                self.resume();
                return Err(format!("requests of attached devices still ran after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // An answered request's task drops its channel just after answering.
        while self.channels.iter().any(|channel| Arc::strong_count(channel) > 1) {
            if Instant::now() >= deadline {
                self.resume();
                return Err(format!(
                    "answered requests still held their FUSE channels after {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut channels = std::mem::take(&mut self.channels);
        let first = channels.remove(0);
        let first = Arc::into_inner(first).expect("no other holder (checked above)");
        match first.into_inherited() {
            Ok(fd) => {
                for thread in std::mem::take(&mut self.threads) {
                    let _ = thread.join();
                }
                drop(channels); // clones: the session lives on in the first channel
                self.handed_over = true;
                Ok(HandedOver {
                    fd,
                    mountpoint: self.mountpoint.clone(),
                })
            }
            Err((first, error)) => {
                channels.insert(0, Arc::new(first));
                self.channels = channels;
                self.resume();
                Err(format!(
                    "cannot keep the FUSE session's descriptor across execve: {error}"
                ))
            }
        }
    }

    /// Readers start again on every channel whose reader stopped.
    fn resume(&mut self) {
        self.control.pausing.store(false, std::sync::atomic::Ordering::SeqCst);
        let init = Arc::new(Init::default());
        for index in 0..self.threads.len() {
            if self.threads[index].is_finished() {
                match self.start_reader(&Arc::clone(&self.channels[index]), &init) {
                    Ok(thread) => {
                        let _ = std::mem::replace(&mut self.threads[index], thread).join();
                    }
                    Err(error) => tracing::error!(%error, "cannot restart a FUSE channel reader"),
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        // Abort first: requests still queued fail at once, and every channel reads Ended.
        let _ = kernel_iface::fuse::abort(&self.mountpoint);
        if let Err(error) = kernel_iface::fuse::unmount(&self.mountpoint) {
            tracing::warn!(%error, mountpoint = %self.mountpoint.display(), "cannot unmount the attach filesystem");
        }
        if let Some(queues) = self.queues.as_mut() {
            queues.join(STOP_TIMEOUT);
        }
        join_bounded(std::mem::take(&mut self.threads), STOP_TIMEOUT, "channel");
    }
}

/// Joins `threads` that are ending, waiting at most `timeout` for all of
/// them; one still running then is left behind (and said so).
pub(crate) fn join_bounded(threads: Vec<std::thread::JoinHandle<()>>, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!("a FUSE {what} thread did not stop in time; left behind");
        }
    }
}

/// Reads requests from one channel until the filesystem goes away.
fn serve_channel(
    channel: &Arc<FuseChannel>,
    filesystem: &AttachFs,
    runtime: &tokio::runtime::Handle,
    init: &Init,
    control: &Arc<Control>,
) {
    use std::sync::atomic::Ordering;
    // Requests are polled here first (`spawn_polled_here`), inside the runtime.
    let _context = runtime.enter();
    let mut buffer = vec![0u8; REQUEST_BUFFER_BYTES];
    loop {
        if control.pausing.load(Ordering::SeqCst) {
            return;
        }
        let count = match channel.receive(&mut buffer) {
            Ok(Received::Request(count)) => count,
            Ok(Received::Again) => continue,
            Ok(Received::Ended) => return,
            Err(error) => {
                tracing::error!(%error, "reading the FUSE channel failed; this channel stops");
                return;
            }
        };
        let (header, operation) = match proto::decode(&buffer[..count]) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%error, "malformed FUSE request: EIO");
                if let Ok(header) = proto::decode_header(&buffer[..count]) {
                    send(channel, header.unique, &Reply::error(libc::EIO));
                }
                continue;
            }
        };
        if let Operation::Init {
            major,
            minor,
            max_readahead,
            flags,
        } = operation
        {
            let reply = match negotiate(major, minor, max_readahead, flags, init.want_uring) {
                Ok(agreed) => {
                    let uring = agreed.flags & proto::OVER_IO_URING != 0;
                    tracing::info!(
                        minor = agreed.minor,
                        flags = format!("{:#x}", agreed.flags),
                        io_uring = uring,
                        "FUSE session initialised"
                    );
                    if init.want_uring && !uring {
                        tracing::warn!("the kernel did not offer FUSE over io_uring; requests come through /dev/fuse");
                    }
                    Reply::bytes(&proto::encode_init_out(&agreed))
                }
                Err(reason) => {
                    tracing::error!(%reason, "FUSE INIT refused");
                    Reply::error(libc::EPROTO)
                }
            };
            send(channel, header.unique, &reply);
            init.done.set();
            continue;
        }
        match filesystem.operate(&header, operation) {
            Answer::Now(reply) => send(channel, header.unique, &reply),
            Answer::Later(pending) => {
                // Handed to the reactor from this thread; answered from wherever it completes.
                let channel = Arc::clone(channel);
                let control = Arc::clone(control);
                control.in_flight.fetch_add(1, Ordering::SeqCst);
                crate::in_flight::spawn_polled_here(runtime, async move {
                    let reply = pending.await;
                    send(&channel, header.unique, &reply);
                    drop(channel);
                    control.in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Answer::Nothing => {}
        }
    }
}
