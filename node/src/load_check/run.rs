//! The writer and the checker of a checked load, each a pipeline of
//! requests on one NBD connection (the writer's on a new one after a cut,
//! when asked to reconnect).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use disk_layout::sim_disk::SimRng;
use tokio::sync::mpsc;

use super::book::{self, Book, Verdict};
use crate::nbd::client::{self, ClientError, Connection, ExportUri, Receiver, Reply};
use crate::nbd::proto::{self, Request};
use crate::pattern::{self, PATTERN_BLOCK_BYTES};

/// Time to connect and finish the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request without a reply for this long ends the load (the server hangs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between two attempts to reconnect.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// Most requests kept in flight.
pub const QUEUE_DEPTH_MAX: usize = 1024;
/// Problems printed in full; the rest are counted.
const PROBLEMS_SHOWN_MAX: usize = 20;
#[allow(clippy::cast_possible_truncation)] // 4096
const BLOCK_U32: u32 = PATTERN_BLOCK_BYTES as u32;

/// What to write.
#[derive(Debug, Clone)]
pub struct WriteLoad {
    pub uri: ExportUri,
    pub ack_log: PathBuf,
    pub duration: Duration,
    pub queue_depth: usize,
    /// Blocks (4 KiB) from the start of the export the load covers (None: all).
    pub blocks: Option<u64>,
    /// Seeds the choice of blocks and tags this load's blocks.
    pub seed: u64,
    /// When the connection is cut before the time is up, connect to `uri`
    /// again, an attempt every `RECONNECT_INTERVAL`, for at most this long
    /// after the cut, and go on writing (None: a cut ends the load). The
    /// first connection is not retried.
    pub reconnect_within: Option<Duration>,
}

/// Why the load stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Its time was up.
    Time,
    /// The connection failed (e.g. the node died) and, when reconnecting,
    /// was not back in time.
    Cut(String),
    /// The server answered a write with an error (errno).
    Refused(u32),
    /// No reply came for `REPLY_TIMEOUT`.
    Stalled,
}

/// What the writer did.
#[derive(Debug)]
pub struct WriteSummary {
    pub sent: u64,
    pub acknowledged: u64,
    /// Writes sent whose reply never came (on every connection).
    pub unanswered: u64,
    pub elapsed: Duration,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub ended: Ended,
    /// `WriteLoad::reconnect_within`.
    pub reconnect_within: Option<Duration>,
    /// Cuts the load came back from: a new connection answered a write
    /// (or the load ended on it without a cut).
    pub reconnects: u64,
    /// The longest time from a cut to the connection that came back, or to
    /// the end of the load when none did (0: no cut while reconnecting).
    pub longest_disconnected_ms: u64,
}

impl std::fmt::Display for WriteSummary {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.elapsed.as_secs_f64().max(1e-3);
        #[allow(clippy::cast_precision_loss)] // a rate for people
        let iops = self.acknowledged as f64 / seconds;
        write!(
            formatter,
            "{} writes acknowledged ({} MiB) in {seconds:.1} s: {iops:.0} IOPS, latency p50 {} us, p99 {} us; ",
            self.acknowledged,
            (self.acknowledged * PATTERN_BLOCK_BYTES as u64) >> 20,
            self.latency_us_p50,
            self.latency_us_p99,
        )?;
        match &self.ended {
            Ended::Time => write!(formatter, "stopped on time")?,
            Ended::Cut(why) => write!(formatter, "the connection was cut ({why})")?,
            Ended::Refused(errno) => write!(formatter, "a write was refused with error {errno}")?,
            Ended::Stalled => write!(formatter, "no reply for {} s", REPLY_TIMEOUT.as_secs())?,
        }
        if self.reconnect_within.is_some() {
            write!(
                formatter,
                "; reconnects: {}, longest without a connection: {} ms",
                self.reconnects, self.longest_disconnected_ms
            )?;
        }
        if self.unanswered > 0 {
            write!(
                formatter,
                "; {} writes were in flight (never acknowledged: they may or may not be there)",
                self.unanswered
            )?;
        }
        Ok(())
    }
}

/// The ack log being written.
struct AckLog {
    book: Book,
    file: BufWriter<File>,
    path: PathBuf,
}

impl AckLog {
    fn create(path: &Path, stream: u64, blocks: u64) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("cannot create ack log {}", path.display()))?;
        let mut log = Self {
            book: Book::new(stream, blocks),
            file: BufWriter::with_capacity(1 << 20, file),
            path: path.to_owned(),
        };
        log.append(&book::encode_header(stream, blocks))?;
        Ok(log)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .with_context(|| format!("cannot write ack log {}", self.path.display()))
    }

    fn sent(&mut self, lba: u64, generation: u64) -> Result<()> {
        self.book.sent(lba, generation);
        self.append(&book::encode_record(false, lba, generation))
    }

    fn acknowledged(&mut self, lba: u64, generation: u64) -> Result<()> {
        self.book.acknowledged(lba, generation);
        self.append(&book::encode_record(true, lba, generation))
    }

    fn finish(mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|()| self.file.get_ref().sync_all())
            .with_context(|| format!("cannot write ack log {}", self.path.display()))
    }
}

/// Reads replies on a task of its own (a reply read is not cancel-safe)
/// and hands them over; the last item is the error that ended the connection.
fn spawn_replies(
    mut receiver: Receiver,
    read_bytes: Option<u32>,
) -> mpsc::UnboundedReceiver<Result<Reply, ClientError>> {
    let (sender, replies) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let reply = receiver.reply(|_| read_bytes).await;
            let failed = reply.is_err();
            if sender.send(reply).is_err() || failed {
                break;
            }
        }
    });
    replies
}

/// A request for the one block `lba`.
fn block_request(command: u16, cookie: u64, lba: u64) -> Request {
    Request {
        flags: 0,
        command,
        cookie,
        offset_bytes: lba * PATTERN_BLOCK_BYTES as u64,
        length_bytes: BLOCK_U32,
    }
}

/// Blocks the load covers: `wanted`, at most the export's.
fn blocks_of(size_bytes: u64, wanted: Option<u64>, queue_depth: usize) -> Result<u64> {
    let blocks = (size_bytes / PATTERN_BLOCK_BYTES as u64).min(wanted.unwrap_or(u64::MAX));
    if blocks < queue_depth as u64 {
        bail!("the load covers {blocks} blocks, fewer than the queue depth {queue_depth}: use a larger volume or --blocks");
    }
    Ok(blocks)
}

/// How the writer's time on one connection ended.
struct Session {
    ended: Ended,
    /// A reply (to any write) came on the connection.
    replied: bool,
}

/// The writer's state, kept across connections.
struct Writer<'a> {
    load: &'a WriteLoad,
    blocks: u64,
    stream: u64,
    rng: SimRng,
    log: AckLog,
    latency: hdrhistogram::Histogram<u64>,
    /// The last generation sent (generations are the requests' cookies, so
    /// they stay unique and increasing across connections).
    generation: u64,
    /// Blocks with a write in flight, and blocks in doubt.
    busy: HashSet<u64>,
    /// Blocks whose write was in flight when its connection was cut (its
    /// reply lost, it stays logged as sent only). They are not written
    /// again: the server may still apply such a write after a later one to
    /// the same block was acknowledged on a new connection, and the checker
    /// would rightly call the acknowledged write lost.
    in_doubt: u64,
    data: Vec<u8>,
}

impl Writer<'_> {
    /// Writes on `connection` until the time is up, it is cut or a write is
    /// refused; then waits for the replies still to come (until the cut).
    /// A `probe` sends one write and fills the pipeline once it is
    /// answered (a connection that fails at once leaves one write in doubt).
    async fn session(&mut self, connection: Connection, deadline: Instant, probe: bool) -> Result<Session> {
        let mut sender = connection.sender;
        let mut replies = spawn_replies(connection.receiver, None);
        // Blocks free to write; at least 1 (checked before reconnecting).
        let free = self.blocks - self.in_doubt;
        let depth = usize::try_from(free).map_or(self.load.queue_depth, |free| free.min(self.load.queue_depth));
        // cookie (the write's generation) -> (lba, sent at); a block has one write in flight at most.
        let mut in_flight: HashMap<u64, (u64, Instant)> = HashMap::new();
        let (mut ended, mut replied) = (None, false);
        loop {
            if ended.is_none() && Instant::now() >= deadline {
                ended = Some(Ended::Time);
            }
            let allowed = if probe && !replied { 1 } else { depth };
            while ended.is_none() && in_flight.len() < allowed {
                let lba = self.rng.below(self.blocks);
                if !self.busy.insert(lba) {
                    continue;
                }
                self.generation += 1;
                let generation = self.generation;
                self.log.sent(lba, generation)?;
                pattern::fill(&mut self.data, self.stream, lba, generation);
                let request = block_request(proto::CMD_WRITE, generation, lba);
                in_flight.insert(generation, (lba, Instant::now()));
                match tokio::time::timeout(REPLY_TIMEOUT, sender.request(&request, &self.data)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => ended = Some(Ended::Cut(error.to_string())),
                    Err(_) => ended = Some(Ended::Stalled),
                }
            }
            if in_flight.is_empty() {
                break;
            }
            let reply = match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
                Ok(Some(Ok(reply))) => reply,
                Ok(Some(Err(error))) => {
                    ended.get_or_insert(Ended::Cut(error.to_string()));
                    break;
                }
                Ok(None) => {
                    ended.get_or_insert(Ended::Cut("closed".into()));
                    break;
                }
                Err(_) => {
                    ended.get_or_insert(Ended::Stalled);
                    break;
                }
            };
            replied = true;
            let written = reply.cookie;
            let Some((lba, sent_at)) = in_flight.remove(&written) else {
                bail!(
                    "{}: a reply for cookie {} that is not in flight",
                    self.load.uri,
                    reply.cookie
                );
            };
            self.busy.remove(&lba);
            if reply.error == 0 {
                self.log.acknowledged(lba, written)?;
                let micros = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.latency.saturating_record(micros.max(1));
            } else {
                ended.get_or_insert(Ended::Refused(reply.error));
            }
        }
        // What is still in flight stays busy for good (see `in_doubt`).
        self.in_doubt += in_flight.len() as u64;
        Ok(Session {
            ended: ended.unwrap_or(Ended::Time),
            replied,
        })
    }

    /// Why a new connection cannot carry on the load (None: it can).
    fn unfit(&self, connection: &Connection) -> Option<String> {
        if connection.flags & proto::TFLAG_READ_ONLY != 0 {
            return Some(format!("{} is read-only", self.load.uri));
        }
        let needed = self.blocks * PATTERN_BLOCK_BYTES as u64;
        (connection.size_bytes < needed).then(|| {
            format!(
                "{} holds {} bytes, less than the load's {needed}",
                self.load.uri, connection.size_bytes
            )
        })
    }

    /// Connects to the load's export again, an attempt from `first` on
    /// every `RECONNECT_INTERVAL`, until one succeeds (the connection and
    /// when its attempt began) or `until`; else the last attempt's error
    /// (None: no attempt began before `until`). A refused or broken
    /// handshake is a failed attempt.
    async fn reconnect(&self, first: Instant, until: Instant) -> Result<(Connection, Instant), Option<String>> {
        let mut error = None;
        let mut next = first.max(Instant::now());
        while next < until {
            tokio::time::sleep_until(next.into()).await;
            let attempt = Instant::now();
            let timeout = until.saturating_duration_since(attempt).min(CONNECT_TIMEOUT);
            error = Some(match client::connect(&self.load.uri, timeout).await {
                Ok(connection) => match self.unfit(&connection) {
                    None => return Ok((connection, attempt)),
                    Some(why) => why,
                },
                Err(error) => error.to_string(),
            });
            next = (attempt + RECONNECT_INTERVAL).max(Instant::now());
        }
        Err(error)
    }
}

/// A cut the load has not come back from yet.
struct Outage {
    /// The first cut of the outage.
    since: Instant,
    why: String,
}

/// Writes random 4 KiB self-describing blocks with `queue_depth` in flight
/// until the time is up, the connection fails (for good, when
/// reconnecting) or a write is refused; every write is logged as sent, then
/// as acknowledged when it is.
///
/// With `reconnect_within`, a cut before the time is up is followed by
/// attempts to connect again (a refused or failed handshake, or a
/// connection cut before it answered any write, is a failed attempt) until
/// `reconnect_within` after the first cut, or the time is up; the load goes
/// on with the same log and generation counter on the new connection.
pub async fn write_load(load: &WriteLoad) -> Result<WriteSummary> {
    if load.queue_depth == 0 || load.queue_depth > QUEUE_DEPTH_MAX {
        bail!("--queue-depth must be 1 to {QUEUE_DEPTH_MAX}");
    }
    let mut connection = client::connect(&load.uri, CONNECT_TIMEOUT).await?;
    if connection.flags & proto::TFLAG_READ_ONLY != 0 {
        bail!("{} is read-only", load.uri);
    }
    let blocks = blocks_of(connection.size_bytes, load.blocks, load.queue_depth)?;
    let mut rng = SimRng::new(load.seed);
    let stream = rng.next_u64();
    let mut writer = Writer {
        load,
        blocks,
        stream,
        rng,
        log: AckLog::create(&load.ack_log, stream, blocks)?,
        latency: hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
        generation: 0,
        busy: HashSet::new(),
        in_doubt: 0,
        data: vec![0u8; PATTERN_BLOCK_BYTES],
    };
    let started = Instant::now();
    let deadline = started + load.duration;
    let (mut reconnects, mut longest_disconnected) = (0u64, Duration::ZERO);
    let mut outage: Option<Outage> = None;
    // When the current connection's attempt began, and when it succeeded.
    let (mut attempted_at, mut connected_at) = (started, started);
    let ended = loop {
        let session = writer.session(connection, deadline, outage.is_some()).await?;
        let cut = match &session.ended {
            Ended::Cut(why) => Some(why.clone()),
            _ => None,
        };
        // The connection came back unless it was cut before it answered.
        if session.replied || cut.is_none() {
            if let Some(outage) = outage.take() {
                reconnects += 1;
                longest_disconnected = longest_disconnected.max(connected_at - outage.since);
            }
        }
        let Some(why) = cut else {
            break session.ended;
        };
        let Some(within) = load.reconnect_within else {
            break Ended::Cut(why);
        };
        // A connection cut before it answered was a failed attempt: the next
        // one waits its turn.
        let first = if outage.is_some() {
            attempted_at + RECONNECT_INTERVAL
        } else {
            Instant::now()
        };
        let outage = outage.get_or_insert_with(|| Outage {
            since: Instant::now(),
            why,
        });
        if writer.in_doubt >= writer.blocks {
            longest_disconnected = longest_disconnected.max(outage.since.elapsed());
            break Ended::Cut(format!(
                "{}; not reconnecting: every block of the load has a write in doubt",
                outage.why
            ));
        }
        let window_end = outage.since + within;
        let until = window_end.min(deadline);
        match writer.reconnect(first, until).await {
            Ok((new, attempt)) => {
                connection = new;
                (attempted_at, connected_at) = (attempt, Instant::now());
            }
            Err(error) => {
                longest_disconnected = longest_disconnected.max(outage.since.elapsed());
                let late = if window_end <= deadline {
                    format!("not back within {} ms", within.as_millis())
                } else {
                    "not back before the load's time was up".to_owned()
                };
                let last = error.map_or_else(String::new, |error| format!(" (last attempt: {error})"));
                break Ended::Cut(format!("{}; {late}{last}", outage.why));
            }
        }
    };
    let Writer {
        log,
        latency,
        generation,
        in_doubt,
        ..
    } = writer;
    let summary = WriteSummary {
        sent: generation,
        acknowledged: log.book.acknowledgements(),
        unanswered: in_doubt,
        elapsed: started.elapsed(),
        latency_us_p50: latency.value_at_quantile(0.5),
        latency_us_p99: latency.value_at_quantile(0.99),
        ended,
        reconnect_within: load.reconnect_within,
        reconnects,
        longest_disconnected_ms: u64::try_from(longest_disconnected.as_millis()).unwrap_or(u64::MAX),
    };
    log.finish()?;
    Ok(summary)
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct VerifySummary {
    pub blocks: u64,
    /// Acknowledged writes whose block was checked.
    pub acknowledgements: u64,
    /// Blocks that hold a newer write that was sent and never acknowledged.
    pub unacknowledged_present: u64,
    pub lost: Vec<String>,
    pub corrupt: Vec<String>,
}

impl VerifySummary {
    #[must_use]
    pub fn passed(&self) -> bool {
        self.lost.is_empty() && self.corrupt.is_empty()
    }
}

impl std::fmt::Display for VerifySummary {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for problem in self.lost.iter().chain(&self.corrupt).take(PROBLEMS_SHOWN_MAX) {
            writeln!(formatter, "  {problem}")?;
        }
        write!(
            formatter,
            "{} acknowledged writes on {} blocks checked: {} lost, {} corrupt ({} blocks hold a later write whose reply never came)",
            self.acknowledgements,
            self.blocks,
            self.lost.len(),
            self.corrupt.len(),
            self.unacknowledged_present
        )
    }
}

/// Reads back every block the load in `ack_log` wrote, from `uri`, and
/// judges each against the log.
pub async fn verify_load(uri: &ExportUri, ack_log: &Path, queue_depth: usize) -> Result<VerifySummary> {
    if queue_depth == 0 || queue_depth > QUEUE_DEPTH_MAX {
        bail!("--queue-depth must be 1 to {QUEUE_DEPTH_MAX}");
    }
    let bytes = std::fs::read(ack_log).with_context(|| format!("cannot read ack log {}", ack_log.display()))?;
    let book = book::decode(&bytes).with_context(|| format!("ack log {}", ack_log.display()))?;
    let connection = client::connect(uri, CONNECT_TIMEOUT).await?;
    if connection.size_bytes < book.blocks * PATTERN_BLOCK_BYTES as u64 {
        bail!(
            "{uri} holds {} bytes, less than the {} blocks the load wrote",
            connection.size_bytes,
            book.blocks
        );
    }
    let mut sender = connection.sender;
    let mut replies = spawn_replies(connection.receiver, Some(BLOCK_U32));
    let mut summary = VerifySummary::default();
    let mut pending = book.histories.keys().copied();
    let mut in_flight = 0usize;
    loop {
        while in_flight < queue_depth {
            let Some(lba) = pending.next() else { break };
            let request = block_request(proto::CMD_READ, lba, lba);
            tokio::time::timeout(REPLY_TIMEOUT, sender.request(&request, &[]))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("{uri}: the server took no request for {} s", REPLY_TIMEOUT.as_secs())
                })??;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let reply = match tokio::time::timeout(REPLY_TIMEOUT, replies.recv()).await {
            Ok(Some(reply)) => reply?,
            Ok(None) => bail!("{uri}: the connection closed"),
            Err(_) => bail!("{uri}: no reply for {} s", REPLY_TIMEOUT.as_secs()),
        };
        in_flight -= 1;
        let lba = reply.cookie;
        if reply.error != 0 {
            bail!("{uri}: reading block {lba} failed with error {}", reply.error);
        }
        let history = book
            .histories
            .get(&lba)
            .with_context(|| format!("{uri}: a reply for block {lba}, which was not asked for"))?;
        summary.blocks += 1;
        summary.acknowledgements += history.acknowledgements;
        match book.judge(lba, &pattern::decode(&reply.data, book.stream, lba)) {
            Verdict::Expected => {}
            Verdict::Unacknowledged => summary.unacknowledged_present += 1,
            Verdict::Lost(what) => summary.lost.push(what),
            Verdict::Corrupt(what) => summary.corrupt.push(what),
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What the fake server does with one connection.
    #[derive(Clone, Copy, Debug)]
    enum Serve {
        /// Acknowledges this many writes, then closes (writes still in flight).
        AckThenClose(usize),
        /// Closes before the greeting.
        CloseAtOnce,
        /// Refuses the export in the handshake.
        RefuseExport,
        /// Completes the handshake, then closes.
        CloseAfterHandshake,
        /// Answers the first write with this errno.
        Fail(u32),
        /// Acknowledges every write until the client goes.
        Ack,
    }

    const TEST_BLOCKS: u64 = 64;

    /// Serves one connection each in turn (the last one again and again).
    async fn fake_server(plan: Vec<Serve>) -> ExportUri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = ExportUri::parse(&format!("nbd://{}/v", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move {
            for index in 0.. {
                let (stream, _) = listener.accept().await.unwrap();
                let serve = plan[index.min(plan.len() - 1)];
                // Errors are the client going away.
                let _ = serve_one(stream, serve).await;
            }
        });
        uri
    }

    async fn serve_one(mut stream: TcpStream, serve: Serve) -> std::io::Result<()> {
        if matches!(serve, Serve::CloseAtOnce) {
            return Ok(());
        }
        stream.write_all(&proto::server_greeting()).await?;
        let mut client_flags = [0u8; 4];
        stream.read_exact(&mut client_flags).await?;
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).await?;
        let option = proto::parse_option_header(&header).unwrap();
        assert_eq!(option.option, proto::OPT_GO);
        let mut body = vec![0u8; option.data_len as usize];
        stream.read_exact(&mut body).await?;
        if matches!(serve, Serve::RefuseExport) {
            let reply = proto::option_reply(proto::OPT_GO, proto::REP_ERR_UNKNOWN, b"not served yet");
            return stream.write_all(&reply).await;
        }
        let info = proto::info_export(TEST_BLOCKS * PATTERN_BLOCK_BYTES as u64, proto::TFLAG_HAS_FLAGS);
        stream
            .write_all(&proto::option_reply(proto::OPT_GO, proto::REP_INFO, &info))
            .await?;
        stream
            .write_all(&proto::option_reply(proto::OPT_GO, proto::REP_ACK, &[]))
            .await?;
        let mut answered = 0usize;
        loop {
            match serve {
                Serve::CloseAfterHandshake => return Ok(()),
                Serve::AckThenClose(count) if answered == count => return Ok(()),
                _ => {}
            }
            let mut head = [0u8; proto::REQUEST_HEADER_BYTES];
            stream.read_exact(&mut head).await?;
            let request = proto::parse_request(&head).unwrap();
            assert_eq!(request.command, proto::CMD_WRITE);
            let mut payload = vec![0u8; request.length_bytes as usize];
            stream.read_exact(&mut payload).await?;
            let error = match serve {
                Serve::Fail(errno) => errno,
                _ => 0,
            };
            stream.write_all(&proto::simple_reply(request.cookie, error)).await?;
            answered += 1;
        }
    }

    fn load(uri: ExportUri, ack_log: PathBuf, seconds: f64, reconnect_within: Option<Duration>) -> WriteLoad {
        WriteLoad {
            uri,
            ack_log,
            duration: Duration::from_secs_f64(seconds),
            queue_depth: 8,
            blocks: None,
            seed: 3,
            reconnect_within,
        }
    }

    #[tokio::test]
    async fn after_a_cut_the_writer_reconnects_through_failed_attempts_and_goes_on_with_the_same_log() {
        let uri = fake_server(vec![
            Serve::AckThenClose(50),
            Serve::CloseAtOnce,
            Serve::RefuseExport,
            Serve::CloseAfterHandshake,
            Serve::Ack,
        ])
        .await;
        let scratch = tempfile::tempdir().unwrap();
        let ack_log = scratch.path().join("ack.log");
        let written = write_load(&load(uri, ack_log.clone(), 1.5, Some(Duration::from_secs(5))))
            .await
            .unwrap();
        assert_eq!(written.ended, Ended::Time, "{written}");
        assert_eq!(written.reconnects, 1, "{written}");
        // Three failed attempts, 100 ms apart, before the fourth connection answered.
        assert!(written.longest_disconnected_ms >= 300, "{written}");
        assert!(written.longest_disconnected_ms < 1500, "{written}");
        // The first connection's writes in flight, and the probe sent on the
        // one closed after its handshake.
        assert!(written.unanswered >= 8 && written.unanswered <= 9, "{written}");
        assert!(written.acknowledged > 50, "{written}");
        assert_eq!(written.sent, written.acknowledged + written.unanswered, "{written}");
        let text = written.to_string();
        assert!(text.contains("reconnects: 1, longest without a connection: "), "{text}");

        let book = book::decode(&std::fs::read(&ack_log).unwrap()).unwrap();
        assert_eq!(book.acknowledgements(), written.acknowledged);
        let mut unacknowledged = 0;
        for (lba, history) in &book.histories {
            assert!(
                history.sent.windows(2).all(|pair| pair[0] < pair[1]),
                "block {lba}: generations go back: {history:?}"
            );
            // A write in doubt is its block's last: the block is not written again.
            let last = *history.sent.last().unwrap();
            if history.acknowledgements < history.sent.len() as u64 {
                assert_eq!(
                    history.acknowledgements + 1,
                    history.sent.len() as u64,
                    "block {lba}: {history:?}"
                );
                assert!(history.acknowledged < last, "block {lba}: {history:?}");
                unacknowledged += 1;
            } else {
                assert_eq!(history.acknowledged, last, "block {lba}: {history:?}");
            }
        }
        assert_eq!(unacknowledged, written.unanswered);
    }

    #[tokio::test]
    async fn without_reconnecting_or_past_the_window_a_cut_ends_the_load() {
        let scratch = tempfile::tempdir().unwrap();
        let uri = fake_server(vec![Serve::AckThenClose(20), Serve::CloseAtOnce]).await;
        let written = write_load(&load(uri, scratch.path().join("a.log"), 10.0, None))
            .await
            .unwrap();
        assert!(matches!(written.ended, Ended::Cut(_)), "{written}");
        assert_eq!((written.reconnects, written.longest_disconnected_ms), (0, 0));
        assert!(!written.to_string().contains("reconnects:"), "{written}");

        let uri = fake_server(vec![Serve::AckThenClose(20), Serve::RefuseExport]).await;
        let started = Instant::now();
        let within = Duration::from_millis(350);
        let written = write_load(&load(uri, scratch.path().join("b.log"), 10.0, Some(within)))
            .await
            .unwrap();
        let Ended::Cut(why) = &written.ended else {
            panic!("{written}")
        };
        assert!(
            why.contains("not back within 350 ms") && why.contains("not served yet"),
            "{why}"
        );
        assert_eq!(written.reconnects, 0, "{written}");
        assert!(written.longest_disconnected_ms >= 300, "{written}");
        assert!(started.elapsed() < Duration::from_secs(2), "{written}");

        // The load's time runs out first.
        let uri = fake_server(vec![Serve::AckThenClose(20), Serve::CloseAtOnce]).await;
        let written = write_load(&load(
            uri,
            scratch.path().join("c.log"),
            0.5,
            Some(Duration::from_secs(30)),
        ))
        .await
        .unwrap();
        let Ended::Cut(why) = &written.ended else {
            panic!("{written}")
        };
        assert!(why.contains("not back before the load's time was up"), "{why}");
        assert!(written.elapsed < Duration::from_secs(2), "{written}");
    }

    #[tokio::test]
    async fn a_refused_write_ends_the_load_even_when_reconnecting() {
        let scratch = tempfile::tempdir().unwrap();
        let uri = fake_server(vec![Serve::Fail(proto::EIO)]).await;
        let written = write_load(&load(
            uri,
            scratch.path().join("ack.log"),
            10.0,
            Some(Duration::from_secs(5)),
        ))
        .await
        .unwrap();
        assert_eq!(written.ended, Ended::Refused(proto::EIO), "{written}");
        assert_eq!(written.acknowledged, 0, "{written}");
    }
}
