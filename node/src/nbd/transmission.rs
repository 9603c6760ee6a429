//! The transmission phase of one connection: a reader that parses requests
//! and starts each as its own task, and a writer that sends the answers in
//! the order they finish (replies are matched to requests by cookie).
//!
//! Limits: at most `IN_FLIGHT_REQUESTS_MAX` requests and
//! `IN_FLIGHT_BYTES_MAX` bytes of payload per connection; the reader stops
//! reading until earlier requests finish.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};

use super::handshake::{Session, REQUEST_BYTES_MAX};
use super::proto::{self, *};
use super::NbdError;
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
const PERMIT_BYTES: u32 = 4096;
/// Receive buffer of a connection (a payload at least this big bypasses it).
const READ_BUFFER_BYTES: usize = 128 * 1024;

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
}

fn error(errno: u32, message: impl Into<String>) -> Outcome {
    Outcome::Error {
        errno,
        message: message.into(),
    }
}

/// Serves requests until the client disconnects or breaks the protocol.
pub async fn serve<R, W>(reader: R, writer: W, session: Session, peer: &str) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // One receive takes every request the client has queued (headers and
    // small payloads), not two or three per request.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let (answers, answer_queue) = mpsc::unbounded_channel::<Answer>();
    let structured = session.structured_replies;
    let writer_task = tokio::spawn(write_answers(writer, answer_queue, structured));
    let requests = Arc::new(Semaphore::new(IN_FLIGHT_REQUESTS_MAX as usize));
    let bytes = Arc::new(Semaphore::new((IN_FLIGHT_BYTES_MAX / PERMIT_BYTES) as usize));
    let result = read_requests(&mut reader, &session, &answers, &requests, &bytes).await;
    drop(answers);
    // Requests already started still answer (the writer ends when they have).
    let written = writer_task.await.unwrap_or(Ok(()));
    if let Err(error) = &result {
        tracing::debug!(peer, %error, "NBD connection ended");
    }
    result.and(written.map_err(NbdError::from))
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    session: &Session,
    answers: &mpsc::UnboundedSender<Answer>,
    requests: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
) -> Result<(), NbdError> {
    loop {
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let request = proto::parse_request(&header).map_err(|e| NbdError::Protocol(e.to_string()))?;
        if request.command == CMD_DISC {
            return Ok(());
        }
        let request_permit = Arc::clone(requests).acquire_owned().await.expect("never closed");
        let cost = request
            .length_bytes
            .div_ceil(PERMIT_BYTES)
            .clamp(1, IN_FLIGHT_BYTES_MAX / PERMIT_BYTES);
        let byte_permit = Arc::clone(bytes).acquire_many_owned(cost).await.expect("never closed");
        let mut payload = Vec::new();
        if request.command == CMD_WRITE {
            if request.length_bytes > REQUEST_BYTES_MAX {
                if request.length_bytes > DISCARD_BYTES_MAX {
                    return Err(NbdError::Protocol(format!(
                        "write of {} bytes is over the advertised maximum",
                        request.length_bytes
                    )));
                }
                let copied = tokio::io::copy(
                    &mut (&mut *reader).take(u64::from(request.length_bytes)),
                    &mut tokio::io::sink(),
                )
                .await?;
                if copied < u64::from(request.length_bytes) {
                    return Ok(());
                }
            } else {
                match read_payload(reader, request.length_bytes as usize).await? {
                    Some(data) => payload = data,
                    // The client left mid-request: nothing was acknowledged.
                    None => return Ok(()),
                }
            }
        }
        let volume = Arc::clone(&session.volume);
        let answers = answers.clone();
        let structured = session.structured_replies;
        let base_allocation = session.base_allocation;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let in_flight = volume.stats.begin();
            let outcome = execute(&volume, &request, payload, structured, base_allocation).await;
            drop(in_flight);
            let op = match request.command {
                CMD_READ => Op::Read,
                CMD_WRITE => Op::Write,
                CMD_FLUSH => Op::Flush,
                CMD_TRIM => Op::Trim,
                CMD_WRITE_ZEROES => Op::WriteZeroes,
                _ => Op::Other,
            };
            let bytes = if matches!(op, Op::Flush | Op::Other) {
                0
            } else {
                u64::from(request.length_bytes)
            };
            let ok = !matches!(outcome, Outcome::Error { .. });
            volume.stats.op(op).record(bytes, started.elapsed(), ok);
            let _ = answers.send(Answer {
                cookie: request.cookie,
                offset_bytes: request.offset_bytes,
                outcome,
            });
            drop(byte_permit);
            drop(request_permit);
        });
    }
}

/// Reads a write's `len` payload bytes (straight into the vector: no
/// zeroing first); `None` if the client left before sending them all.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let missing = (len - payload.len()) as u64;
        if (&mut *reader).take(missing).read_buf(&mut payload).await? == 0 {
            return Ok(None);
        }
    }
    Ok(Some(payload))
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
        VolumeIoError::Stopped => ESHUTDOWN,
        VolumeIoError::Replication { .. } => EIO,
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

async fn write_answers<W: AsyncWrite + Unpin>(
    writer: W,
    mut queue: mpsc::UnboundedReceiver<Answer>,
    structured: bool,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(answer) = queue.recv().await {
        write_answer(&mut out, answer, structured).await?;
        // Batch the replies that are already waiting into one send.
        while let Ok(answer) = queue.try_recv() {
            write_answer(&mut out, answer, structured).await?;
        }
        out.flush().await?;
    }
    out.shutdown().await.or(Ok(()))
}

async fn write_answer<W: AsyncWrite + Unpin>(out: &mut W, answer: Answer, structured: bool) -> std::io::Result<()> {
    let cookie = answer.cookie;
    match (answer.outcome, structured) {
        (Outcome::Done, false) => out.write_all(&proto::simple_reply(cookie, 0)).await,
        (Outcome::Done, true) => {
            out.write_all(&proto::structured_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0))
                .await
        }
        (Outcome::Error { errno, .. }, false) => out.write_all(&proto::simple_reply(cookie, errno)).await,
        (Outcome::Error { errno, message }, true) => {
            out.write_all(&proto::structured_error(cookie, errno, &message)).await
        }
        (Outcome::Read(data), false) => {
            out.write_all(&proto::simple_reply(cookie, 0)).await?;
            for slice in data.slices() {
                out.write_all(slice).await?;
            }
            Ok(())
        }
        (Outcome::Read(data), true) => {
            let payload_len = u32::try_from(8 + data.len_bytes).expect("request maximum fits in u32");
            out.write_all(&proto::structured_header(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                payload_len,
            ))
            .await?;
            out.write_all(&answer.offset_bytes.to_be_bytes()).await?;
            for slice in data.slices() {
                out.write_all(slice).await?;
            }
            Ok(())
        }
        (Outcome::Extents(extents), _) => {
            out.write_all(&proto::block_status_reply(cookie, META_BASE_ALLOCATION_ID, &extents))
                .await
        }
    }
}
