//! `ballast scrub`: check every copy of volumes for bit rot and for
//! replicas that disagree, and repair them (run by each volume's
//! coordinator; see `replication::scrub`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::api::client::ApiClient;
use crate::api::ScrubStarted;
use crate::cluster::status::{ClusterStatus, VolumeView};

#[derive(Args, Debug)]
pub struct ScrubArgs {
    /// The node API to ask.
    #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL, global = true)]
    pub api: String,
    #[command(subcommand)]
    pub command: ScrubCommand,
}

#[derive(Subcommand, Debug)]
pub enum ScrubCommand {
    /// Verify volumes now: each coordinator reads every data block of its
    /// copy and of each in-sync replica's, checks them against their
    /// checksums, compares the copies, and rewrites any bad or differing
    /// block from a good copy. Throttled (node setting `scrub_mib_per_s`);
    /// nodes also do this every `scrub_interval_hours` by themselves.
    Start {
        /// Volumes to scrub (default: every volume you may use).
        volumes: Vec<String>,
        /// Wait until they are done and print what was found; exit 1 if a
        /// bad block could not be repaired.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// The last scrub of each volume: when, what it found and repaired.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `ballast scrub`.
pub fn run(args: ScrubArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api);
    match args.command {
        ScrubCommand::Start { volumes, wait, timeout } => start(&client, volumes, wait, Duration::from_secs(timeout)),
        ScrubCommand::Status { json } => {
            let status: ClusterStatus = client.get("/v1/cluster")?;
            if json {
                let rows: Vec<_> = status
                    .volumes
                    .iter()
                    .map(|v| serde_json::json!({"volume": v.name, "scrub": v.scrub, "scrub_done_unix": v.scrub_done_unix}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&status.volumes);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn start(client: &ApiClient, volumes: Vec<String>, wait: bool, timeout: Duration) -> Result<ExitCode> {
    let names = if volumes.is_empty() {
        let listed: Vec<crate::volume::VolumeInfo> = client.get("/v1/volumes")?;
        listed.into_iter().map(|v| v.name).collect()
    } else {
        volumes
    };
    if names.is_empty() {
        println!("no volumes to scrub");
        return Ok(ExitCode::SUCCESS);
    }
    let mut started = Vec::new();
    for name in &names {
        let answer: ScrubStarted = client.post(&format!("/v1/volumes/{name}/scrub"), &serde_json::json!({}))?;
        println!(
            "{}: scrub requested (coordinator node {})",
            answer.volume, answer.coordinator
        );
        started.push(answer);
    }
    if !wait {
        println!("follow it with `ballast scrub status`");
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + timeout;
    let bar = crate::cli::progress::items(started.len() as u64, "scrubbing");
    loop {
        let status: ClusterStatus = client.get("/v1/cluster")?;
        let views: Vec<&VolumeView> = started
            .iter()
            .filter_map(|s| status.volumes.iter().find(|v| v.name == s.volume))
            .collect();
        let done = started
            .iter()
            .filter(|s| {
                status
                    .volumes
                    .iter()
                    .find(|v| v.name == s.volume)
                    .is_none_or(|v| v.scrub_done >= s.generation)
            })
            .count();
        bar.set_position(done as u64);
        if done == started.len() {
            bar.finish_and_clear();
            print_table(&views.into_iter().cloned().collect::<Vec<_>>());
            let unrepairable: u64 = status
                .volumes
                .iter()
                .filter(|v| started.iter().any(|s| s.volume == v.name))
                .filter_map(|v| v.scrub.as_ref())
                .map(|s| s.unrepairable_blocks)
                .sum();
            if unrepairable > 0 {
                bail!("{unrepairable} bad block(s) could not be repaired from any copy: reads of them fail until they are rewritten");
            }
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            bail!(
                "{} of {} scrubs not done after {}s; `ballast scrub status` shows how far they are",
                started.len() - done,
                started.len(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_table(volumes: &[VolumeView]) {
    println!(
        "{:<24} {:<8} {:<8} {:>9} {:>10} {:>9} {:>9} {:>12} {:<20}",
        "VOLUME", "STATE", "MODE", "PROGRESS", "CHECKSUM", "DIVERGED", "REPAIRED", "UNREPAIRABLE", "LAST VERIFIED"
    );
    for volume in volumes {
        let last = if volume.scrub_done_unix == 0 {
            "never".to_owned()
        } else {
            crate::cli::cluster::format_age(crate::datadir::now_unix_seconds().saturating_sub(volume.scrub_done_unix))
        };
        match &volume.scrub {
            None => println!(
                "{:<24} {:<8} {:<8} {:>9} {:>10} {:>9} {:>9} {:>12} {:<20}",
                volume.name, "-", "-", "-", "-", "-", "-", "-", last
            ),
            Some(scrub) => {
                let progress = (scrub.scanned_bytes * 100).checked_div(scrub.size_bytes).unwrap_or(100);
                println!(
                    "{:<24} {:<8} {:<8} {:>8}% {:>10} {:>9} {:>9} {:>12} {:<20}",
                    volume.name,
                    scrub.state,
                    scrub.mode,
                    progress,
                    scrub.checksum_errors,
                    scrub.divergent_blocks,
                    scrub.repaired_blocks,
                    scrub.unrepairable_blocks,
                    last
                );
                if let Some(error) = &scrub.error {
                    println!("    stopped: {error}");
                }
            }
        }
    }
}
