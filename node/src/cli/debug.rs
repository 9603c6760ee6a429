//! `ballast debug`: drive the storage engine directly. `write-load` writes
//! self-describing blocks and logs every acknowledged write; `verify-load`
//! reopens the disks and checks that every acknowledged write is there
//! (the kill -9 test kills `write-load` at random moments).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use crossbeam_channel::unbounded;
use disk_layout::Reply;

use crate::datadir::DataDir;
use crate::engine::{Command, DiskSpec, Engine, EngineConfig};
use crate::pattern::{self, Decoded, PATTERN_BLOCK_BYTES};

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Random 4 KiB writes of self-describing blocks; logs each acknowledged write.
    WriteLoad(LoadArgs),
    /// Checks that every write in the ack log is readable with its content.
    VerifyLoad(LoadArgs),
    /// Through NBD: random 4 KiB writes of self-describing blocks, many in
    /// flight on one connection; logs every write sent and every
    /// acknowledgement (stops on time, or when the connection is cut and,
    /// with --reconnect-within, not back in time).
    NbdWriteLoad(crate::cli::load::NbdWriteLoadArgs),
    /// Through NBD: reads back every block an `nbd-write-load` wrote and
    /// proves each holds its newest acknowledged write (or a newer one sent).
    NbdVerifyLoad(crate::cli::load::NbdVerifyLoadArgs),
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Data directory of the node (its enrolled disks are used).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// File where acknowledged writes are appended (16 bytes each: lba, generation).
    #[arg(long)]
    pub ack_log: PathBuf,
    /// Volume id to write.
    #[arg(long, default_value_t = 1)]
    pub volume: u64,
    /// Index of the enrolled disk to use.
    #[arg(long, default_value_t = 0)]
    pub disk: usize,
    /// Blocks (4 KiB) of the volume the load covers.
    #[arg(long, default_value_t = 16384)]
    pub blocks: u64,
    /// Writes kept in flight.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Distinguishes runs: generations are (run << 40) + count.
    #[arg(long, default_value_t = 1)]
    pub run: u64,
    /// Use the pread/pwrite thread pool instead of io_uring.
    #[arg(long)]
    pub thread_pool: bool,
    /// Cores to pin reactor threads to, e.g. 0-3,6 (default: one unpinned reactor).
    #[arg(long)]
    pub cores: Option<String>,
}

/// Runs a debug command.
pub fn run(command: DebugCommand) -> Result<ExitCode> {
    match command {
        DebugCommand::WriteLoad(args) => write_load(&args),
        DebugCommand::VerifyLoad(args) => verify_load(&args),
        DebugCommand::NbdWriteLoad(args) => crate::cli::load::write(&args),
        DebugCommand::NbdVerifyLoad(args) => crate::cli::load::verify(&args),
    }
}

fn start_engine(args: &LoadArgs) -> Result<(DataDir, Engine)> {
    let data = DataDir::open(&args.data_dir, false)?;
    let disks = data.disks()?;
    if disks.is_empty() {
        bail!(
            "{} has no enrolled disks; run `ballast disk enroll` first",
            args.data_dir.display()
        );
    }
    if args.disk >= disks.len() {
        bail!("disk index {} out of range: {} disks enrolled", args.disk, disks.len());
    }
    let specs: Vec<DiskSpec> = disks.iter().map(|d| DiskSpec { path: d.path.clone() }).collect();
    let mut config = EngineConfig::new(*data.node.node_uuid.as_bytes());
    if args.thread_pool {
        config.choice = kernel_iface::EngineChoice::ThreadPool;
    }
    if let Some(cores) = &args.cores {
        config.cores = kernel_iface::affinity::parse_core_list(cores)?;
    }
    let engine = Engine::start(&specs, &config)?;
    Ok((data, engine))
}

fn write_load(args: &LoadArgs) -> Result<ExitCode> {
    if args.blocks < args.queue_depth as u64 || args.queue_depth == 0 {
        bail!("--blocks must be at least --queue-depth, and --queue-depth at least 1");
    }
    let (_data, engine) = start_engine(args)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.ack_log)
        .with_context(|| format!("cannot open ack log {}", args.ack_log.display()))?;
    let (sender, receiver) = unbounded();
    let mut in_flight: HashMap<u64, u64> = HashMap::new();
    let mut rng = disk_layout::sim_disk::SimRng::new(args.run ^ 0x0BA1_1A57);
    let mut count = 0u64;
    let mut acked = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    println!("write-load: started (engine {})", engine.disks()[args.disk].engine_kind);
    while Instant::now() < deadline || !in_flight.is_empty() {
        while Instant::now() < deadline && in_flight.len() < args.queue_depth {
            let lba = rng.below(args.blocks);
            if in_flight.contains_key(&lba) {
                continue;
            }
            count += 1;
            let generation = (args.run << 40) + count;
            let mut data = vec![0u8; PATTERN_BLOCK_BYTES];
            pattern::fill(&mut data, args.volume, lba, generation);
            in_flight.insert(lba, generation);
            let sender = sender.clone();
            engine.submit(
                args.disk,
                Command::Write {
                    volume_id: args.volume,
                    lba,
                    data: data.into(),
                    epoch: 1,
                    volume_sequence: generation,
                },
                Box::new(move |result| {
                    let _ = sender.send((lba, generation, result));
                }),
            );
        }
        let mut records = Vec::new();
        let first = receiver
            .recv_timeout(Duration::from_secs(30))
            .context("no write finished in 30 s")?;
        for (lba, generation, result) in std::iter::once(first).chain(receiver.try_iter()) {
            in_flight.remove(&lba);
            match result {
                Ok(Reply::Written) => {
                    acked += 1;
                    records.extend_from_slice(&lba.to_le_bytes());
                    records.extend_from_slice(&generation.to_le_bytes());
                }
                other => bail!("write of block {lba} failed: {other:?}"),
            }
        }
        // Logged only after the acknowledgement; a kill loses at most
        // records, never adds one.
        log.write_all(&records).context("cannot append to the ack log")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "write-load: {acked} writes acknowledged in {seconds:.1} s ({:.0} IOPS)",
        acked as f64 / seconds
    );
    engine.shutdown();
    Ok(ExitCode::SUCCESS)
}

fn read_ack_log(path: &Path) -> Result<(HashMap<u64, u64>, u64)> {
    let mut bytes = Vec::new();
    if path.exists() {
        std::fs::File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .with_context(|| format!("cannot read ack log {}", path.display()))?;
    }
    let mut newest: HashMap<u64, u64> = HashMap::new();
    let mut records = 0;
    for record in bytes.chunks_exact(16) {
        let lba = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
        let generation = u64::from_le_bytes(record[8..].try_into().expect("8 bytes"));
        let entry = newest.entry(lba).or_insert(0);
        *entry = (*entry).max(generation);
        records += 1;
    }
    Ok((newest, records))
}

fn verify_load(args: &LoadArgs) -> Result<ExitCode> {
    let (acked, records) = read_ack_log(&args.ack_log)?;
    let (_data, engine) = start_engine(args)?;
    let (mut lost, mut corrupt, mut checked) = (0u64, 0u64, 0u64);
    let chunk = 256u64;
    let mut lba = 0;
    while lba < args.blocks {
        let count = chunk.min(args.blocks - lba);
        let reply = engine.call(
            args.disk,
            Command::Scan {
                volume_id: args.volume,
                lba,
                block_count: count,
            },
        );
        let buf = match reply {
            Ok(Reply::Read(buf)) => buf,
            other => bail!("read of blocks {lba}+{count} failed: {other:?}"),
        };
        for (offset, block) in buf.as_slice().chunks_exact(PATTERN_BLOCK_BYTES).enumerate() {
            let block_lba = lba + offset as u64;
            let want = acked.get(&block_lba).copied();
            checked += 1;
            match (pattern::decode(block, args.volume, block_lba), want) {
                (Decoded::Garbage, _) => {
                    corrupt += 1;
                    eprintln!("corrupt: block {block_lba} holds bytes no write put there");
                }
                (Decoded::Zero, Some(generation)) => {
                    lost += 1;
                    eprintln!("lost: block {block_lba} is empty but generation {generation} was acknowledged");
                }
                (Decoded::Written { generation }, Some(want)) if generation < want => {
                    lost += 1;
                    eprintln!("lost: block {block_lba} holds generation {generation}, older than acknowledged {want}");
                }
                _ => {}
            }
        }
        lba += count;
    }
    engine.shutdown();
    println!("verify-load: blocks checked: {checked}, acked writes: {records}, lost: {lost}, corrupt: {corrupt}");
    Ok(if lost == 0 && corrupt == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
