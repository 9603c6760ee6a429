//! The transmission phase of one connection, served by one future (hosted
//! by the reactor of the volume's disk, `nbd::transmit`, or a runtime task): it reads
//! requests, runs them concurrently (each a future in the task's own set, so
//! a request costs no task spawn and no thread hop of its own), and writes
//! the answers in the order they finish (replies are matched to requests by
//! cookie), all without blocking one on the other: a client that is sending
//! a long write while its replies wait is still read from, and one that
//! stops reading its replies stops being read once the budget below is used.
//!
//! Limits: at most `IN_FLIGHT_REQUESTS_MAX` requests and
//! `IN_FLIGHT_BYTES_MAX` bytes of payload (writes in memory, reads being
//! gathered or waiting to be sent) per connection, plus the one request
//! being received; the connection stops reading until earlier requests
//! finish. Large requests (`SPAWN_BYTES_MIN` and up) to an encrypted volume
//! run as tasks of their own, so their encryption can use another core.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::handshake::{Session, REQUEST_BYTES_MAX};
use super::proto::{self, *};
use super::NbdError;
use crate::in_flight::InFlight;
use crate::metrics::Op;
use crate::volume::io::ReadData;
use crate::volume::{Volume, VolumeIoError};

/// Requests in flight per connection.
pub const IN_FLIGHT_REQUESTS_MAX: u32 = 256;
/// Payload bytes (writes in memory, reads being gathered) per connection.
pub const IN_FLIGHT_BYTES_MAX: u32 = 96 << 20;
/// A too-large write's payload up to this size is read and dropped (so the
/// connection stays usable); beyond it the connection is closed.
pub const DISCARD_BYTES_MAX: u32 = 64 << 20;
/// Most extents one BLOCK_STATUS answer carries.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 16 * 1024;
/// Receive buffer of a connection (a payload at least this big bypasses it).
const READ_BUFFER_BYTES: usize = 128 * 1024;
/// Bytes a connection receives before it lets the thread serving it turn
/// to other work (on a reactor: its disk's answers and the other
/// connections, a quiet high-priority one among them).
const RECEIVE_BYTES_PER_TURN: usize = 256 * 1024;
/// Requests of at least this many bytes to an encrypted volume run as
/// tasks of their own.
const SPAWN_BYTES_MIN: u32 = 64 * 1024;
/// Read data up to this size is copied into the send buffer; larger is
/// sent from the block buffers it was read into.
const COPY_READ_BYTES_MAX: usize = 16 * 1024;
/// A sent segment's buffer up to this capacity is kept for the next.
const SPARE_BYTES_MAX: usize = 1 << 20;
/// Slices handed to one vectored send.
const SEND_SLICES_MAX: usize = 256;

/// How a request ended.
enum Outcome {
    Done,
    Read(ReadData),
    Extents(Vec<(u32, u32)>),
    Error { errno: u32, message: String },
}

struct Answer {
    cookie: u64,
    offset_bytes: u64,
    outcome: Outcome,
    /// What the request counted against the connection's byte budget.
    cost_bytes: u64,
}

fn error(errno: u32, message: impl Into<String>) -> Outcome {
    Outcome::Error {
        errno,
        message: message.into(),
    }
}

/// Where the request being received stands.
enum Inbound {
    /// `have` bytes of the next header are in `bytes`.
    Header {
        bytes: [u8; REQUEST_HEADER_BYTES],
        have: usize,
    },
    /// A write whose payload is arriving.
    Payload { request: Request, payload: Vec<u8> },
    /// A write over the maximum whose payload is read and dropped.
    Discard { request: Request, left: u64 },
}

impl Inbound {
    fn header() -> Self {
        Inbound::Header {
            bytes: [0; REQUEST_HEADER_BYTES],
            have: 0,
        }
    }
}

/// Answers encoded and waiting to be sent.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already sent.
    sent: usize,
    bytes: usize,
    /// Sent since the last flush (TLS keeps records until flushed).
    unflushed: bool,
    /// A sent segment's buffer, kept for the next (no allocation and no
    /// growing copies per batch of small answers).
    spare: Option<Vec<u8>>,
}

enum Segment {
    Bytes(Vec<u8>),
    Data(ReadData),
}

impl Segment {
    fn len(&self) -> usize {
        match self {
            Segment::Bytes(bytes) => bytes.len(),
            Segment::Data(data) => data.len_bytes,
        }
    }
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Copies `bytes` to the end of the last segment (or a new one).
    fn put(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len();
        if let Some(Segment::Bytes(last)) = self.segments.back_mut() {
            last.extend_from_slice(bytes);
            return;
        }
        let mut segment = self
            .spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(bytes.len().max(4096)));
        segment.extend_from_slice(bytes);
        self.segments.push_back(Segment::Bytes(segment));
    }

    fn put_data(&mut self, data: ReadData) {
        if data.len_bytes <= COPY_READ_BYTES_MAX {
            for slice in data.slices() {
                self.put(slice);
            }
        } else if data.len_bytes > 0 {
            self.bytes += data.len_bytes;
            self.segments.push_back(Segment::Data(data));
        }
    }

    /// The next bytes to send, at most `SEND_SLICES_MAX` slices.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        /// Adds what of `slice` is not sent yet; false when `out` is full.
        fn add<'a>(out: &mut Vec<IoSlice<'a>>, skip: &mut usize, slice: &'a [u8]) -> bool {
            if *skip >= slice.len() {
                *skip -= slice.len();
                return true;
            }
            out.push(IoSlice::new(&slice[*skip..]));
            *skip = 0;
            out.len() < SEND_SLICES_MAX
        }
        let mut out = Vec::new();
        let mut skip = self.sent;
        for segment in &self.segments {
            let more = match segment {
                Segment::Bytes(bytes) => add(&mut out, &mut skip, bytes),
                Segment::Data(data) => data.slices().all(|slice| add(&mut out, &mut skip, slice)),
            };
            if !more {
                break;
            }
        }
        out
    }

    /// `n` more bytes were sent.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        self.unflushed = true;
        while n > 0 {
            let front = self.segments.front().expect("sent bytes were queued").len() - self.sent;
            if n < front {
                self.sent += n;
                return;
            }
            n -= front;
            self.sent = 0;
            if let Some(Segment::Bytes(mut sent)) = self.segments.pop_front() {
                if sent.capacity() <= SPARE_BYTES_MAX {
                    sent.clear();
                    self.spare = Some(sent);
                }
            }
        }
    }

    fn push(&mut self, answer: Answer, structured: bool) {
        let cookie = answer.cookie;
        match (answer.outcome, structured) {
            (Outcome::Done, false) => self.put(&proto::simple_reply(cookie, 0)),
            (Outcome::Done, true) => self.put(&proto::structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)),
            (Outcome::Error { errno, .. }, false) => self.put(&proto::simple_reply(cookie, errno)),
            (Outcome::Error { errno, message }, true) => self.put(&proto::structured_error(cookie, errno, &message)),
            (Outcome::Read(data), false) => {
                self.put(&proto::simple_reply(cookie, 0));
                self.put_data(data);
            }
            (Outcome::Read(data), true) => {
                let payload_len = u32::try_from(8 + data.len_bytes).expect("request maximum fits in u32");
                self.put(&proto::structured_header(
                    cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    payload_len,
                ));
                self.put(&answer.offset_bytes.to_be_bytes());
                self.put_data(data);
            }
            (Outcome::Extents(extents), _) => {
                self.put(&proto::block_status_reply(cookie, META_BASE_ALLOCATION_ID, &extents));
            }
        }
    }
}

/// One connection's state.
struct Connection {
    session: Session,
    inbound: Inbound,
    in_flight: InFlight<Answer>,
    /// Payload bytes of the requests in flight.
    in_flight_bytes: u64,
    outbox: Outbox,
    /// The client sent DISC, left, or broke the protocol: nothing more is read.
    ended: Option<Result<(), NbdError>>,
}

/// Serves requests until the client disconnects or breaks the protocol.
///
/// When `stop` turns true the connection ends cleanly: no request is read
/// after it, every request already read is answered and the answers
/// flushed, then the socket is shut down (a client sees a disconnect
/// between requests, never a request left without its answer).
pub async fn serve<R, W>(
    reader: R,
    mut writer: W,
    session: Session,
    peer: &str,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // One receive takes every request the client has queued (headers and
    // small payloads), not two or three per request.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut connection = Connection {
        session,
        inbound: Inbound::header(),
        in_flight: InFlight::new(),
        in_flight_bytes: 0,
        outbox: Outbox::default(),
        ended: None,
    };
    let mut received_this_turn = 0usize;
    loop {
        if received_this_turn >= RECEIVE_BYTES_PER_TURN {
            received_this_turn = 0;
            tokio::task::yield_now().await;
        }
        let reading = connection.ended.is_none() && connection.has_room();
        let running = connection.ended.is_none();
        if connection.ended.is_some()
            && connection.in_flight.is_empty()
            && connection.outbox.is_empty()
            && !connection.outbox.unflushed
        {
            break;
        }
        let Connection {
            inbound,
            in_flight,
            outbox,
            ..
        } = &mut connection;
        let slices = outbox.slices();
        let flush = outbox.is_empty() && outbox.unflushed;
        tokio::select! {
            biased;
            answer = in_flight.next(), if !in_flight.is_empty() => {
                // Biased: every answer already there is taken before the next send.
                connection.answered(answer);
            }
            sent = send(&mut writer, &slices), if !slices.is_empty() || flush => {
                match sent? {
                    None => connection.outbox.unflushed = false,
                    Some(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                    Some(n) => connection.outbox.advance(n),
                }
            }
            received = receive(&mut reader, inbound), if reading => {
                match received {
                    Ok(0) => connection.ended = Some(Ok(())),
                    Ok(n) => {
                        received_this_turn += n;
                        connection.take_requests(&mut reader);
                    }
                    Err(e) => connection.ended = Some(Err(e.into())),
                }
            }
            () = stopped(&mut stop), if running => {
                tracing::debug!(peer, "NBD connection stops: answering what it read, then closing");
                connection.ended = Some(Ok(()));
            }
        }
    }
    let _ = writer.shutdown().await;
    let result = connection.ended.take().unwrap_or(Ok(()));
    if let Err(error) = &result {
        tracing::debug!(peer, %error, "NBD connection ended");
    }
    result
}

/// Resolves once `stop` is (or turns) true; never without one.
async fn stopped(stop: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(stop) => {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
        None => std::future::pending().await,
    }
}

/// Sends what `slices` hold (`Some(bytes sent)`), or flushes when they are
/// empty (`None`). Cancel-safe.
async fn send<W: AsyncWrite + Unpin>(writer: &mut W, slices: &[IoSlice<'_>]) -> std::io::Result<Option<usize>> {
    if slices.is_empty() {
        writer.flush().await?;
        return Ok(None);
    }
    writer.write_vectored(slices).await.map(Some)
}

/// Reads more of the request being received: into the write's payload, or
/// into the buffer. Cancel-safe: dropped before it finishes, nothing was read.
async fn receive<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, inbound: &mut Inbound) -> std::io::Result<usize> {
    match inbound {
        Inbound::Payload { request, payload } => {
            let missing = request.length_bytes as usize - payload.len();
            // Straight into the payload (no zeroing first); a big one bypasses the buffer.
            (&mut *reader).take(missing as u64).read_buf(payload).await
        }
        Inbound::Header { .. } | Inbound::Discard { .. } => Ok(reader.fill_buf().await?.len()),
    }
}

impl Connection {
    /// Whether another request may be taken.
    fn has_room(&self) -> bool {
        (self.in_flight.len() as u64) < u64::from(IN_FLIGHT_REQUESTS_MAX)
            && self.in_flight_bytes + self.outbox.bytes as u64 <= u64::from(IN_FLIGHT_BYTES_MAX)
    }

    fn answered(&mut self, answer: Answer) {
        self.in_flight_bytes -= answer.cost_bytes;
        self.outbox.push(answer, self.session.structured_replies);
    }

    /// Takes every request (and payload byte) the buffer holds, as long as
    /// the budget allows; the buffer is left empty or the budget full.
    fn take_requests<R: AsyncRead + Unpin>(&mut self, reader: &mut BufReader<R>) {
        while self.ended.is_none() {
            let room = self.has_room();
            let buffer = reader.buffer();
            match &mut self.inbound {
                Inbound::Header { bytes, have } => {
                    if buffer.is_empty() || !room {
                        return;
                    }
                    let take = buffer.len().min(REQUEST_HEADER_BYTES - *have);
                    bytes[*have..*have + take].copy_from_slice(&buffer[..take]);
                    *have += take;
                    reader.consume(take);
                    if *have == REQUEST_HEADER_BYTES {
                        let header = *bytes;
                        self.inbound = Inbound::header();
                        self.header(&header);
                    }
                }
                Inbound::Payload { request, payload } => {
                    let missing = request.length_bytes as usize - payload.len();
                    let take = buffer.len().min(missing);
                    payload.extend_from_slice(&buffer[..take]);
                    reader.consume(take);
                    if take < missing {
                        return;
                    }
                    if let Inbound::Payload { request, payload } =
                        std::mem::replace(&mut self.inbound, Inbound::header())
                    {
                        self.start(request, payload);
                    }
                }
                Inbound::Discard { request, left } => {
                    let take = buffer.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    reader.consume(take);
                    if *left > 0 {
                        return;
                    }
                    let request = *request;
                    self.inbound = Inbound::header();
                    // Answered with an error: the request is over the maximum.
                    self.start(request, Vec::new());
                }
            }
        }
    }

    /// A complete request header.
    fn header(&mut self, header: &[u8; REQUEST_HEADER_BYTES]) {
        let request = match proto::parse_request(header) {
            Ok(request) => request,
            Err(e) => {
                self.ended = Some(Err(NbdError::Protocol(e.to_string())));
                return;
            }
        };
        if request.command == CMD_DISC {
            self.ended = Some(Ok(()));
            return;
        }
        if request.command != CMD_WRITE {
            self.start(request, Vec::new());
        } else if request.length_bytes > DISCARD_BYTES_MAX {
            self.ended = Some(Err(NbdError::Protocol(format!(
                "write of {} bytes is over the advertised maximum",
                request.length_bytes
            ))));
        } else if request.length_bytes > REQUEST_BYTES_MAX {
            self.inbound = Inbound::Discard {
                request,
                left: u64::from(request.length_bytes),
            };
        } else if request.length_bytes == 0 {
            self.start(request, Vec::new());
        } else {
            self.inbound = Inbound::Payload {
                request,
                payload: Vec::with_capacity(request.length_bytes as usize),
            };
        }
    }

    /// Starts a request (its payload, if any, complete).
    fn start(&mut self, request: Request, payload: Vec<u8>) {
        // Data bytes the request moves (reads and writes): its budget cost.
        let cost_bytes = if matches!(request.command, CMD_READ | CMD_WRITE) {
            request.length_bytes.min(REQUEST_BYTES_MAX)
        } else {
            0
        };
        self.in_flight_bytes += u64::from(cost_bytes);
        let volume = Arc::clone(&self.session.volume);
        // Only an encrypted volume's large requests gain from a task of their
        // own (the cipher runs on another core); a plaintext one's work is the
        // reactor's either way, and the hop cost two context switches per
        // request.
        let spawn = cost_bytes >= SPAWN_BYTES_MIN && volume.encrypted;
        let structured = self.session.structured_replies;
        let base_allocation = self.session.base_allocation;
        let cost = u64::from(cost_bytes);
        let run = run_request(volume, request, payload, structured, base_allocation, cost);
        if spawn {
            self.in_flight.spawn(run, move |e| Answer {
                cookie: request.cookie,
                offset_bytes: request.offset_bytes,
                outcome: error(EIO, format!("request failed: {e}")),
                cost_bytes: cost,
            });
        } else {
            self.in_flight.push(Box::pin(run));
        }
    }
}

/// Runs one request and records it in the volume's statistics.
async fn run_request(
    volume: Arc<Volume>,
    request: Request,
    payload: Vec<u8>,
    structured: bool,
    base_allocation: bool,
    cost_bytes: u64,
) -> Answer {
    let started = std::time::Instant::now();
    let op = match request.command {
        CMD_READ => Op::Read,
        CMD_WRITE => Op::Write,
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => Op::Trim,
        CMD_WRITE_ZEROES => Op::WriteZeroes,
        _ => Op::Other,
    };
    // The volume's limits first (a wait counts in the request's latency).
    volume.admit_op(op, u64::from(request.length_bytes)).await;
    let in_flight = volume.stats.begin();
    let outcome = execute(&volume, &request, payload, structured, base_allocation).await;
    drop(in_flight);
    let bytes = if matches!(op, Op::Flush | Op::Other) {
        0
    } else {
        u64::from(request.length_bytes)
    };
    let ok = !matches!(outcome, Outcome::Error { .. });
    volume.stats.op(op).record(bytes, started.elapsed(), ok);
    Answer {
        cookie: request.cookie,
        offset_bytes: request.offset_bytes,
        outcome,
        cost_bytes,
    }
}

/// Checks a request against the export; `Err` is the answer to send.
fn validate(volume: &Volume, request: &Request, structured: bool, base_allocation: bool) -> Result<(), Outcome> {
    if volume.is_deleted() {
        return Err(error(ESHUTDOWN, format!("volume {} was deleted", volume.name)));
    }
    if !volume.is_served() {
        return Err(error(
            ESHUTDOWN,
            format!(
                "volume {} is now served by another node (`ballast volume inspect` shows which)",
                volume.name
            ),
        ));
    }
    let allowed_flags = match request.command {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_CACHE => 0,
        other => return Err(error(EINVAL, format!("unknown command {other}"))),
    };
    if request.flags & !allowed_flags != 0 {
        return Err(error(
            EINVAL,
            format!("flags {:#x} not valid for this command", request.flags),
        ));
    }
    if request.flags & CMD_FLAG_DF != 0 && !structured {
        return Err(error(EINVAL, "DF needs structured replies"));
    }
    if request.command == CMD_BLOCK_STATUS && !base_allocation {
        return Err(error(EINVAL, "BLOCK_STATUS needs the base:allocation meta context"));
    }
    if request.command == CMD_FLUSH {
        return Ok(());
    }
    if request.length_bytes == 0 {
        return Err(error(EINVAL, "zero-length request"));
    }
    let payload_command = matches!(request.command, CMD_READ | CMD_WRITE);
    if payload_command && request.length_bytes > REQUEST_BYTES_MAX {
        let errno = if structured { EOVERFLOW } else { EINVAL };
        return Err(error(
            errno,
            format!("request over the {REQUEST_BYTES_MAX}-byte maximum"),
        ));
    }
    let size = volume.size_bytes();
    let in_range = request
        .offset_bytes
        .checked_add(u64::from(request.length_bytes))
        .is_some_and(|end| end <= size);
    if !in_range {
        let errno = if matches!(request.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        let message = format!(
            "{} bytes at {} reach past the end of the volume ({size} bytes)",
            request.length_bytes, request.offset_bytes
        );
        return Err(error(errno, message));
    }
    if request.command == CMD_WRITE_ZEROES
        && request.flags & CMD_FLAG_FAST_ZERO != 0
        && request.flags & CMD_FLAG_NO_HOLE != 0
    {
        return Err(error(ENOTSUP, "allocating zeroes is not fast"));
    }
    Ok(())
}

async fn execute(
    volume: &Volume,
    request: &Request,
    payload: Vec<u8>,
    structured: bool,
    base_allocation: bool,
) -> Outcome {
    if let Err(outcome) = validate(volume, request, structured, base_allocation) {
        return outcome;
    }
    let offset = request.offset_bytes;
    let len = u64::from(request.length_bytes);
    let result = match request.command {
        CMD_READ => return volume.read(offset, len).await.map_or_else(io_error, Outcome::Read),
        CMD_WRITE => volume.write(offset, payload).await,
        CMD_FLUSH => volume.flush().await,
        CMD_TRIM => volume.trim(offset, len).await,
        CMD_WRITE_ZEROES => {
            volume
                .write_zeroes(offset, len, request.flags & CMD_FLAG_NO_HOLE != 0)
                .await
        }
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS => {
            let runs_max = if request.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                BLOCK_STATUS_EXTENTS_MAX
            };
            return match volume.allocation(offset, len, runs_max).await {
                Ok(runs) => Outcome::Extents(
                    runs.into_iter()
                        .map(|(length, allocated)| {
                            let flags = if allocated { 0 } else { STATE_HOLE | STATE_ZERO };
                            (u32::try_from(length).expect("within one request"), flags)
                        })
                        .collect(),
                ),
                Err(e) => io_error(e),
            };
        }
        _ => unreachable!("validated"),
    };
    result.map_or_else(io_error, |()| Outcome::Done)
}

fn io_error(error: VolumeIoError) -> Outcome {
    use disk_layout::StoreError;
    let errno = match &error {
        VolumeIoError::OutOfRange { .. } => EINVAL,
        VolumeIoError::Stopped | VolumeIoError::NotServed { .. } => ESHUTDOWN,
        VolumeIoError::Replication { .. } | VolumeIoError::NoLease { .. } => EIO,
        VolumeIoError::Locked { .. } | VolumeIoError::ReadOnly { .. } => EPERM,
        VolumeIoError::Store { source, .. } => match source {
            StoreError::NoSpace { .. } => ENOSPC,
            StoreError::InvalidRequest { .. } => EINVAL,
            _ => EIO,
        },
    };
    tracing::warn!(%error, "NBD request failed");
    error_outcome(errno, &error)
}

fn error_outcome(errno: u32, error: &VolumeIoError) -> Outcome {
    Outcome::Error {
        errno,
        message: error.to_string(),
    }
}
