//! `ballast debug nbd-write-load` / `nbd-verify-load`: the checked load of
//! `load_check` from the command line (the demo's proof across a failover).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::load_check::{self, WriteLoad};
use crate::nbd::client::ExportUri;

#[derive(Args, Debug)]
pub struct NbdWriteLoadArgs {
    /// The export: nbd://HOST[:PORT]/VOLUME (plaintext; a loopback listener).
    #[arg(long)]
    pub uri: String,
    /// File the writer logs every write sent and every acknowledgement to (replaced).
    #[arg(long)]
    pub ack_log: PathBuf,
    /// Stop after this many seconds (earlier when the connection is cut, unless it comes back
    /// within --reconnect-within).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Writes kept in flight on the connection.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: usize,
    /// Blocks (4 KiB) from the start of the volume the writes cover (default: all).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// Seeds the choice of blocks (and tags the blocks of this load).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// When the connection is cut, connect again (every 100 ms) for up to this many seconds
    /// after the cut and go on writing; writes in flight at the cut stay unacknowledged in the
    /// log and their blocks are not written again (default: a cut ends the load).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub reconnect_within: Option<Duration>,
}

/// Seconds, fractions allowed ("2", "0.5").
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a number of seconds from 0 up"))
}

#[derive(Args, Debug)]
pub struct NbdVerifyLoadArgs {
    /// The export to read back: nbd://HOST[:PORT]/VOLUME (any node serving it, or a clone).
    #[arg(long)]
    pub uri: String,
    /// The ack log `nbd-write-load` wrote.
    #[arg(long)]
    pub ack_log: PathBuf,
    /// Reads kept in flight.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: usize,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs the writer; prints what it did. The ack log, not the exit code, says what was acknowledged.
pub fn write(args: &NbdWriteLoadArgs) -> Result<ExitCode> {
    let load = WriteLoad {
        uri: ExportUri::parse(&args.uri)?,
        ack_log: args.ack_log.clone(),
        duration: Duration::from_secs(args.seconds),
        queue_depth: args.queue_depth,
        blocks: args.blocks,
        seed: args.seed,
        reconnect_within: args.reconnect_within,
    };
    let summary = runtime()?.block_on(load_check::write_load(&load))?;
    println!("nbd-write-load: {summary}");
    Ok(ExitCode::SUCCESS)
}

/// Runs the checker; fails when an acknowledged write is lost or a block corrupt.
pub fn verify(args: &NbdVerifyLoadArgs) -> Result<ExitCode> {
    let uri = ExportUri::parse(&args.uri)?;
    let summary = runtime()?.block_on(load_check::verify_load(&uri, &args.ack_log, args.queue_depth))?;
    println!("nbd-verify-load: {uri}: {summary}");
    Ok(if summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
