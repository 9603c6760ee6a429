//! The writer and the checker of a checked load, each a pipeline of
//! requests on one NBD connection.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use disk_layout::sim_disk::SimRng;
use tokio::sync::mpsc;

use super::book::{self, Book, Verdict};
use crate::nbd::client::{self, ClientError, ExportUri, Receiver, Reply};
use crate::nbd::proto::{self, Request};
use crate::pattern::{self, PATTERN_BLOCK_BYTES};

/// Time to connect and finish the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request without a reply for this long ends the load (the server hangs).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
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
}

/// Why the load stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Its time was up.
    Time,
    /// The connection failed (e.g. the node died).
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
    /// Writes sent whose reply never came.
    pub unanswered: u64,
    pub elapsed: Duration,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub ended: Ended,
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

/// Writes random 4 KiB self-describing blocks with `queue_depth` in flight
/// until the time is up, the connection fails or a write is refused;
/// every write is logged as sent, then as acknowledged when it is.
pub async fn write_load(load: &WriteLoad) -> Result<WriteSummary> {
    if load.queue_depth == 0 || load.queue_depth > QUEUE_DEPTH_MAX {
        bail!("--queue-depth must be 1 to {QUEUE_DEPTH_MAX}");
    }
    let connection = client::connect(&load.uri, CONNECT_TIMEOUT).await?;
    if connection.flags & proto::TFLAG_READ_ONLY != 0 {
        bail!("{} is read-only", load.uri);
    }
    let blocks = blocks_of(connection.size_bytes, load.blocks, load.queue_depth)?;
    let mut rng = SimRng::new(load.seed);
    let stream = rng.next_u64();
    let mut log = AckLog::create(&load.ack_log, stream, blocks)?;
    let mut sender = connection.sender;
    let mut replies = spawn_replies(connection.receiver, None);
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("valid bounds");
    // cookie (the write's generation) -> (lba, sent at); a block has one write in flight at most.
    let mut in_flight: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let (mut generation, mut ended) = (0u64, None);
    let started = Instant::now();
    let deadline = started + load.duration;
    let mut data = vec![0u8; PATTERN_BLOCK_BYTES];
    loop {
        if ended.is_none() && Instant::now() >= deadline {
            ended = Some(Ended::Time);
        }
        while ended.is_none() && in_flight.len() < load.queue_depth {
            let lba = rng.below(blocks);
            if !busy.insert(lba) {
                continue;
            }
            generation += 1;
            log.sent(lba, generation)?;
            pattern::fill(&mut data, stream, lba, generation);
            let request = block_request(proto::CMD_WRITE, generation, lba);
            in_flight.insert(generation, (lba, Instant::now()));
            match tokio::time::timeout(REPLY_TIMEOUT, sender.request(&request, &data)).await {
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
        let written = reply.cookie;
        let Some((lba, sent_at)) = in_flight.remove(&written) else {
            bail!(
                "{}: a reply for cookie {} that is not in flight",
                load.uri,
                reply.cookie
            );
        };
        busy.remove(&lba);
        if reply.error == 0 {
            log.acknowledged(lba, written)?;
            let micros = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
            latency.saturating_record(micros.max(1));
        } else {
            ended.get_or_insert(Ended::Refused(reply.error));
        }
    }
    let summary = WriteSummary {
        sent: generation,
        acknowledged: log.book.acknowledgements(),
        unanswered: in_flight.len() as u64,
        elapsed: started.elapsed(),
        latency_us_p50: latency.value_at_quantile(0.5),
        latency_us_p99: latency.value_at_quantile(0.99),
        ended: ended.unwrap_or(Ended::Time),
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
