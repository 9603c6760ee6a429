//! `ballast backup create | restore | list | inspect | verify | delete`.
//! Create and restore are jobs on the node serving the volume (the CLI
//! starts them through the API and shows their progress); list, inspect,
//! verify and delete read the target from here, with its secret.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use crate::api::client::{ApiClient, ClientError, DEFAULT_API_URL};
use crate::backup::job::JobInfo;
use crate::backup::repo::{DeleteReport, Manifest, Repo, VerifyReport};
use crate::backup::target::TargetUrl;
use crate::backup::{BackupBody, RestoreBody, Secret, TargetOptions};
use crate::cli::volume::path_segment;
use crate::size::format_size;
use crate::volume::VolumeInfo;

/// How a target is opened: its secret, and for S3 where and as whom.
#[derive(Args, Debug, Clone)]
pub struct SecretArgs {
    /// S3 endpoint, for stores other than AWS (MinIO, Ceph RGW, ...):
    /// http://HOST:PORT or https://HOST.
    #[arg(long, value_name = "URL", global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, or us-east-1).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// S3 credentials in the AWS shared-credentials format (the profile
    /// AWS_PROFILE names, or [default]); without it AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY are used. Sent to the node with the request.
    #[arg(long, value_name = "FILE", global = true)]
    pub credentials_file: Option<PathBuf>,
    /// A file holding the target's passphrase (first line; 8-1024 bytes).
    /// Or set BALLAST_BACKUP_PASSPHRASE.
    #[arg(long, value_name = "FILE", global = true)]
    pub passphrase_file: Option<PathBuf>,
    /// A file holding the target's key: 32 bytes, raw or as 64 hex digits
    /// (make one with `head -c 32 /dev/urandom > key`).
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
}

impl SecretArgs {
    /// How to reach `target` (S3 only; a directory needs nothing).
    fn options(&self, target: &str) -> Result<TargetOptions> {
        if !target.starts_with("s3://") {
            return Ok(TargetOptions::default());
        }
        let (mut id, mut key) = (
            std::env::var("AWS_ACCESS_KEY_ID").ok(),
            std::env::var("AWS_SECRET_ACCESS_KEY").ok().map(Zeroizing::new),
        );
        if let Some(path) = &self.credentials_file {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
            );
            let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
            let (found_id, found_key) = shared_credentials(&text, &profile);
            if found_id.is_none() || found_key.is_none() {
                bail!(
                    "{} has no aws_access_key_id and aws_secret_access_key under [{profile}]",
                    path.display()
                );
            }
            (id, key) = (found_id, found_key);
        }
        Ok(TargetOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: id,
            secret_access_key: key,
        })
    }

    /// The secret to send with a request about `target`: none for a
    /// registered target's name (the cluster keeps its secret).
    fn secret_for(&self, target: &str) -> Result<Option<Secret>> {
        if !target.contains("://") {
            return Ok(None);
        }
        TargetUrl::parse(target)?;
        Ok(Some(self.secret()?))
    }

    fn secret(&self) -> Result<Secret> {
        if let Some(path) = &self.key_file {
            let bytes = Zeroizing::new(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
            return Secret::from_key_file(&bytes).with_context(|| format!("{}", path.display()));
        }
        let passphrase = match &self.passphrase_file {
            Some(path) => {
                let text = Zeroizing::new(
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
                );
                Zeroizing::new(text.lines().next().unwrap_or_default().to_owned())
            }
            None => match std::env::var("BALLAST_BACKUP_PASSPHRASE") {
                Ok(text) => Zeroizing::new(text),
                Err(_) => bail!(
                    "a backup target is opened with its secret: give --passphrase-file FILE or --key-file FILE, or set BALLAST_BACKUP_PASSPHRASE"
                ),
            },
        };
        let len = passphrase.len();
        if !(crate::volume::crypt::PASSPHRASE_BYTES_MIN..=crate::volume::crypt::PASSPHRASE_BYTES_MAX).contains(&len) {
            bail!("a backup passphrase is 8-1024 bytes; this one is {len}");
        }
        Ok(Secret::Passphrase(passphrase))
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The node API to talk to.
    #[arg(long, global = true, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
    pub api: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// Register a target by name, with its secret (and S3 options): kept in
    /// the cluster sealed under the cluster key, so backups run unattended
    /// (`volume update VOL --backup-every 6h --backup-keep 28 --backup-target
    /// NAME`) and commands may name it instead of giving its URL and secret.
    /// The target is opened first (set up if new; a wrong secret is refused).
    Add { name: String, url: String },
    /// The registered targets (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forget a registered target (refused while a schedule uses it); its
    /// backups stay in it.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Registered targets: `backup target add NAME URL`, `list`, `delete NAME`.
    #[command(subcommand)]
    Target(TargetCommand),
    /// Back a volume up to a target off the cluster: a snapshot is taken
    /// (or the one named is used) and read by the node serving the volume;
    /// after the first backup only the chunks changed since the previous
    /// one are read and sent. Data is deduplicated across the target,
    /// compressed and encrypted on the node. A target is set up by its
    /// first backup, with the secret given then.
    Create {
        volume: String,
        /// Where: file:///absolute/path (a directory, e.g. an NFS mount),
        /// s3://bucket[/prefix] (with --endpoint for stores other than AWS),
        /// or the name of a registered target (no secret needed then).
        #[arg(long)]
        target: String,
        /// Back up this existing snapshot instead of taking one.
        #[arg(long)]
        snapshot: Option<String>,
        /// Read at most this many MiB per second, leaving the rest of the disk to the volume's clients.
        #[arg(long, value_name = "MIB")]
        mib_per_s: Option<u64>,
        /// Start the backup and return; `backup job VOLUME ID` follows it.
        #[arg(long)]
        no_wait: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new volume (made here with the backup's
    /// size), or into an existing one no client uses (`--into-existing`).
    Restore {
        /// A target's URL, or a registered target's name.
        target: String,
        backup: String,
        volume: String,
        /// Replicas of the new volume.
        #[arg(long, default_value_t = 1)]
        repl: u32,
        /// Overwrite VOLUME, which exists (at least the backup's size).
        #[arg(long)]
        into_existing: bool,
        /// Write at most this many MiB per second.
        #[arg(long, value_name = "MIB")]
        mib_per_s: Option<u64>,
        /// Start the restore and return; `backup job VOLUME ID` follows it.
        /// The volume serves no client until the restore ends.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// The backups in a target, oldest first.
    List {
        /// A target's URL, or a registered target's name.
        target: String,
        /// Only this volume's.
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One backup's details.
    Inspect {
        /// A target's URL, or a registered target's name.
        target: String,
        backup: String,
        #[arg(long)]
        json: bool,
    },
    /// Check, without restoring, that every chunk a backup needs (or every
    /// backup, without BACKUP) is in the target and intact. Exits 1 if not.
    Verify {
        /// A target's URL, or a registered target's name (then the node
        /// reads it, with the secret the cluster keeps).
        target: String,
        backup: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup and free the chunks no other backup uses. Waits for
    /// no one: refused while a backup, restore or verify uses the target.
    Delete {
        /// A target's URL, or a registered target's name (then the node
        /// deletes, with the secret the cluster keeps).
        target: String,
        backup: String,
    },
    /// A backup or restore job's state, from the node running it.
    Job {
        volume: String,
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

/// The access key id and secret key of `profile` in an AWS shared-credentials file.
fn shared_credentials(text: &str, profile: &str) -> (Option<String>, Option<Zeroizing<String>>) {
    let (mut section, mut id, mut key) = (String::new(), None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().trim_start_matches("profile ").to_owned();
        } else if section == profile {
            if let Some((name, value)) = line.split_once('=') {
                match name.trim() {
                    "aws_access_key_id" => id = Some(value.trim().to_owned()),
                    "aws_secret_access_key" => key = Some(Zeroizing::new(value.trim().to_owned())),
                    _ => {}
                }
            }
        }
    }
    (id, key)
}

fn open(target: &str, args: &SecretArgs) -> Result<Repo> {
    let url = TargetUrl::parse(target)?;
    Ok(Repo::open(&url, &args.options(target)?, &args.secret()?, None)?)
}

pub fn run(args: BackupArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api);
    match args.command {
        BackupCommand::Create {
            volume,
            target,
            snapshot,
            mib_per_s,
            no_wait,
            json,
        } => {
            let secret = args.secret.secret_for(&target)?;
            let body = BackupBody {
                options: args.secret.options(&target)?,
                target,
                secret,
                snapshot,
                mib_per_s,
            };
            let job: JobInfo = client.post(&format!("/v1/volumes/{}/backups", path_segment(&volume)), &body)?;
            let job = if no_wait { job } else { follow(&job, "backing up")? };
            report_job(&job, json)
        }
        BackupCommand::Restore {
            target,
            backup,
            volume,
            repl,
            into_existing,
            mib_per_s,
            no_wait,
            json,
        } => {
            let manifest = manifest_of(&client, &args.secret, &target, &backup)?;
            let path = format!("/v1/volumes/{}", path_segment(&volume));
            match client.get::<VolumeInfo>(&path) {
                Ok(_) if !into_existing => {
                    bail!("volume {volume} exists; restore into a new name, or give --into-existing to overwrite it")
                }
                Ok(_) => {}
                Err(ClientError::Refused { status: 404, .. }) if !into_existing => {
                    crate::cli::export::create_plain(&client, &volume, manifest.size_bytes, repl)?;
                    eprintln!("created volume {volume} ({})", format_size(manifest.size_bytes));
                }
                Err(error) => return Err(error.into()),
            }
            let secret = args.secret.secret_for(&target)?;
            let body = RestoreBody {
                options: args.secret.options(&target)?,
                target,
                secret,
                backup,
                mib_per_s,
            };
            let job: JobInfo = client.post(&format!("{path}/backup-restore"), &body)?;
            let job = if no_wait { job } else { follow(&job, "restoring")? };
            report_job(&job, json)
        }
        BackupCommand::List { target, volume, json } => {
            let all = if target.contains("://") {
                open(&target, &args.secret)?.manifests()?
            } else {
                registered(&client, &target)?
            };
            let all: Vec<Manifest> = all
                .into_iter()
                .filter(|m| volume.as_ref().is_none_or(|v| *v == m.volume))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no backups");
            } else {
                println!(
                    "{:<40} {:<16} {:>10} {:>10}  {:<24} PARENT",
                    "BACKUP", "VOLUME", "SIZE", "SENT", "SNAPSHOT"
                );
                for m in &all {
                    println!(
                        "{:<40} {:<16} {:>10} {:>10}  {:<24} {}",
                        m.id,
                        m.volume,
                        format_size(m.size_bytes),
                        format_size(m.stored_bytes),
                        m.snapshot,
                        m.parent.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Inspect { target, backup, json } => {
            let m = manifest_of(&client, &args.secret, &target, &backup)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!("backup:    {}", m.id);
                println!("volume:    {} ({})", m.volume, format_size(m.size_bytes));
                println!(
                    "snapshot:  {} (data id {}, cluster {})",
                    m.snapshot, m.snapshot_id, m.cluster_id
                );
                println!("parent:    {}", m.parent.as_deref().unwrap_or("none (a full backup)"));
                println!(
                    "chunks:    {} of {} hold data ({} each)",
                    m.data_chunks(),
                    m.chunks.len(),
                    format_size(m.chunk_bytes)
                );
                if !m.patches.is_empty() {
                    let blocks: u32 = m.patches.iter().map(|p| p.blocks.count_ones()).sum();
                    println!(
                        "patched:   {} chunks keep an earlier chunk and replace {} blocks of {} in it",
                        m.patches.len(),
                        blocks,
                        format_size(crate::backup::repo::PATCH_BLOCK)
                    );
                }
                println!("read:      {}", format_size(m.read_bytes));
                println!("sent:      {} (new chunks, compressed)", format_size(m.stored_bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Verify { target, backup, json } => {
            let report = if target.contains("://") {
                let repo = open(&target, &args.secret)?;
                let _lock = repo.lock(false, "verify")?;
                let bar = crate::cli::progress::items(0, "verifying chunks");
                let report = repo.verify(backup.as_deref(), |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })?;
                bar.finish_and_clear();
                report
            } else {
                // A registered target: the node reads it with the secret the cluster keeps.
                let bar = crate::cli::progress::spinner(&format!("verifying {target} on the node"));
                let node = ApiClient::with_timeout(&args.api, REGISTERED_VERIFY_TIMEOUT);
                let report: VerifyReport = node.post(
                    &format!("/v1/backup-targets/{}/verify", path_segment(&target)),
                    &serde_json::json!({ "backup": backup }),
                )?;
                bar.finish_and_clear();
                report
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for id in &report.missing {
                    println!("missing: chunk {id}");
                }
                for why in &report.damaged {
                    println!("damaged: {why}");
                }
                println!(
                    "{} backup(s), {} chunks ({}): {}",
                    report.backups.len(),
                    report.chunks,
                    format_size(report.bytes),
                    if report.intact() {
                        "all present and intact".to_owned()
                    } else {
                        format!("{} missing, {} damaged", report.missing.len(), report.damaged.len())
                    }
                );
            }
            Ok(if report.intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        BackupCommand::Delete { target, backup } => {
            let report: DeleteReport = if target.contains("://") {
                open(&target, &args.secret)?.delete(&backup)?
            } else {
                client.delete_for(&format!(
                    "/v1/backup-targets/{}/backups/{}",
                    path_segment(&target),
                    path_segment(&backup)
                ))?
            };
            println!(
                "deleted backup {backup}: {} chunks freed ({}), {} kept for other backups",
                report.chunks_freed,
                format_size(report.bytes_freed),
                report.chunks_kept
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Job { volume, id, json } => {
            let job: JobInfo = client.get(&format!("/v1/volumes/{}/backup-jobs/{id}", path_segment(&volume)))?;
            report_job(&job, json)
        }
        BackupCommand::Target(TargetCommand::Add { name, url }) => {
            TargetUrl::parse(&url)?;
            let body = crate::cluster::backups::TargetBody {
                options: args.secret.options(&url)?,
                secret: args.secret.secret()?,
                name,
                url,
            };
            let info: crate::cluster::backups::TargetInfo = client.post("/v1/backup-targets", &body)?;
            println!(
                "registered backup target {} ({}): its secret is kept in the cluster, sealed under the cluster key",
                info.name, info.url
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Target(TargetCommand::List { json }) => {
            let all: Vec<crate::cluster::backups::TargetInfo> = client.get("/v1/backup-targets")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no registered backup targets");
            } else {
                for target in &all {
                    println!("{:<24} {}", target.name, target.url);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Target(TargetCommand::Delete { name }) => {
            client.delete(&format!("/v1/backup-targets/{}", path_segment(&name)))?;
            println!("forgot backup target {name} (its backups stay where they are)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How long a verify of a registered target (run by the node, no progress
/// reported) may take.
const REGISTERED_VERIFY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Backup `backup`'s manifest: read here from a target's URL, or through
/// the node from a registered target.
fn manifest_of(client: &ApiClient, secret: &SecretArgs, target: &str, backup: &str) -> Result<Manifest> {
    if target.contains("://") {
        return Ok(open(target, secret)?.manifest(backup)?);
    }
    registered(client, target)?
        .into_iter()
        .find(|m| m.id == backup)
        .with_context(|| format!("no backup {backup:?} in target {target}"))
}

/// The backups of registered target `name`, through the node.
fn registered(client: &ApiClient, name: &str) -> Result<Vec<Manifest>> {
    Ok(client.get(&format!("/v1/backup-targets/{}/backups", path_segment(name)))?)
}

/// Polls the job on the node running it until it ends, with a progress bar.
fn follow(started: &JobInfo, what: &str) -> Result<JobInfo> {
    let node = ApiClient::new(&started.node_api);
    let bar = crate::cli::progress::bytes(started.total_bytes, &format!("{what} {}", started.volume));
    let path = format!(
        "/v1/volumes/{}/backup-jobs/{}",
        path_segment(&started.volume),
        started.id
    );
    loop {
        let job: JobInfo = node
            .get(&path)
            .with_context(|| format!("cannot follow job {} on {}", started.id, started.node_api))?;
        bar.set_position(job.done_bytes);
        if job.state != "running" {
            bar.finish_and_clear();
            return Ok(job);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn report_job(job: &JobInfo, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
    } else {
        match job.state.as_str() {
            "running" => println!(
                "{} job {} of {} runs on {} ({} of {}); follow it with `ballast backup job {} {} --api {}`",
                job.kind,
                job.id,
                job.volume,
                job.node_api,
                format_size(job.done_bytes),
                format_size(job.total_bytes),
                job.volume,
                job.id,
                job.node_api
            ),
            "done" if job.kind == "backup" => println!(
                "backed up {} as {} in {:.1} s: read {}, sent {}{}",
                job.volume,
                job.backup,
                job.seconds,
                format_size(job.read_bytes),
                format_size(job.stored_bytes),
                job.parent
                    .as_ref()
                    .map(|p| format!(" (incremental on {p})"))
                    .unwrap_or_default()
            ),
            "done" => println!(
                "restored {} into {} in {:.1} s ({} read from the target)",
                job.backup,
                job.volume,
                job.seconds,
                format_size(job.read_bytes)
            ),
            _ => {}
        }
    }
    if job.state == "failed" {
        bail!(
            "{} of {} failed: {}",
            job.kind,
            job.volume,
            job.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_credentials_are_read_from_the_named_profile() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[profile backup]\naws_access_key_id=C\naws_secret_access_key=D\n";
        let (id, key) = shared_credentials(text, "backup");
        assert_eq!(
            (id.as_deref(), key.as_deref().map(String::as_str)),
            (Some("C"), Some("D"))
        );
        let (id, _) = shared_credentials(text, "default");
        assert_eq!(id.as_deref(), Some("A"));
        assert_eq!(shared_credentials(text, "none").0, None);
    }
}
