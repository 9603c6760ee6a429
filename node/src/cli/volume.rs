//! `ballast volume create | list | inspect | delete | resize | clone | ...`: clients of the
//! local node's HTTP API (`--api` or BALLAST_API for another node).

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::api::client::{ApiClient, DEFAULT_API_URL};
use crate::api::{CreateBody, ResizeBody};
use crate::size::{format_size, parse_size};
use crate::volume::VolumeInfo;

#[derive(Args, Debug)]
pub struct VolumeArgs {
    /// The node API to talk to.
    #[arg(long, global = true, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
    pub api: String,
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume, exported over NBD under its name.
    Create {
        /// Name: 1-63 of a-z 0-9 _ . - (first a letter or digit).
        name: String,
        /// Size, e.g. 10GiB, 512M (KiB/MiB/GiB/TiB or K/M/G/T; multiple of 4 KiB).
        #[arg(long, required_unless_present = "standby_of")]
        size: Option<String>,
        /// Make it a standby of VOLUME's backups in registered target TARGET
        /// (e.g. on a second cluster): it takes the newest backup's size,
        /// applies each new backup as it appears (only the chunks that
        /// changed) and serves no client until `volume promote`.
        #[arg(long, value_name = "TARGET/VOLUME", conflicts_with_all = ["encrypted", "passphrase_file", "size"])]
        standby_of: Option<String>,
        /// Copies of the data, each on a different node (and zone, when nodes are labelled).
        #[arg(long, default_value_t = 1)]
        repl: u32,
        /// Block size advertised to clients (512 or 4096).
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Encrypt the data at rest (AES-XTS-256 per 4 KiB block; replicas
        /// hold ciphertext). The key is wrapped by the cluster key, unless
        /// --passphrase-file is given.
        #[arg(long)]
        encrypted: bool,
        /// Wrap the key with the passphrase in FILE (Argon2id; implies
        /// --encrypted): the volume then serves I/O only after `volume
        /// unlock` on the node serving it, after every restart or failover.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<std::path::PathBuf>,
        /// Members of GROUP (tokens made with `auth token create --group GROUP`) may use the volume as its owner does.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        #[command(flatten)]
        qos: QosArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Unlock a passphrase-encrypted volume on the node serving it (--api).
    Unlock {
        name: String,
        /// File holding the passphrase (its first line).
        #[arg(long, value_name = "FILE")]
        passphrase_file: std::path::PathBuf,
    },
    /// List volumes.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Inspect {
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create a writable volume from a snapshot, instantly: it shares the
    /// snapshot's data (no copy) until either is written. Its replicas are
    /// on the nodes holding the snapshot.
    Clone {
        /// The snapshot, as VOLUME@SNAPSHOT.
        snapshot: String,
        /// Name of the new volume.
        name: String,
        /// Members of GROUP may use the new volume as its owner does.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Change a volume's settings online: the number of replicas, scheduled snapshots, scheduled backups, I/O priority and limits.
    ///
    /// New replicas are placed like at create, start empty and join the
    /// in-sync set once the coordinator has copied the data to them (see
    /// `volume inspect`); lowering removes out-of-sync replicas first.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["repl", "snapshot_every", "backup_every", "io_priority", "iops_limit", "mib_per_s_limit"])))]
    Update {
        name: String,
        /// Copies of the data wanted (1 to 5).
        #[arg(long)]
        repl: Option<u32>,
        /// Take a snapshot named auto-YYYYMMDD-HHMMSS (UTC) this often, e.g. 1h, 30m, 1d
        /// (at least 10s); 0 stops them. Needs --keep (except 0).
        #[arg(long, value_name = "INTERVAL")]
        snapshot_every: Option<String>,
        /// Scheduled snapshots to keep: the oldest beyond are deleted (snapshots you
        /// name yourself are never deleted by the schedule).
        #[arg(long, value_name = "N", requires = "snapshot_every")]
        keep: Option<u32>,
        /// Back the volume up this often (e.g. 6h, 1d; at least 10s) to the
        /// target --backup-target names, run by the node serving it; 0 stops them.
        #[arg(long, value_name = "INTERVAL")]
        backup_every: Option<String>,
        /// Backups of this volume to keep in the target: the oldest beyond are deleted.
        #[arg(long, value_name = "N", requires = "backup_every")]
        backup_keep: Option<u32>,
        /// A target registered with `ballast backup target add NAME URL`.
        #[arg(long, value_name = "NAME", requires = "backup_every")]
        backup_target: Option<String>,
        #[command(flatten)]
        qos: QosArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Wait until every wanted replica is in sync (a progress bar on a terminal).
        #[arg(long)]
        wait: bool,
    },
    /// Make a standby volume a normal one (the disaster-recovery switch):
    /// it keeps the last backup it applied whole (one being applied is
    /// finished first) and serves clients from now on.
    Promote {
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Serve the volume from this node (the one --api points at): failover when its node is down.
    ///
    /// The node must hold an in-sync replica. The epoch goes up, so the old
    /// coordinator's writes are refused by the replicas from then on.
    Attach {
        name: String,
        /// Take over even though the current coordinator is up (its clients get errors), and
        /// with --device even though another host has it attached (that host is lost).
        #[arg(long, alias = "force-failover")]
        force: bool,
        /// Also make the volume a block device of this host (FUSE file + loop device) and print its
        /// path. One host at a time: refused while another host has it attached.
        #[arg(long)]
        device: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove the block device `volume attach --device` made on this host (unmount it first).
    Detach { name: String },
    /// Attach the volume to this host, make a filesystem on first use, and mount it at PATH.
    ///
    /// Runs against this host's node (--api on loopback): the device is a
    /// loop device of this host. An existing filesystem is never
    /// reformatted, whatever --fs says.
    Mount {
        name: String,
        path: std::path::PathBuf,
        /// Filesystem made on first use.
        #[arg(long, default_value = "ext4", value_parser = ["ext4", "xfs"])]
        fs: String,
    },
    /// Unmount the volume's filesystem(s) on this host and detach its block device.
    Unmount { name: String },
    /// Delete a volume and release its space (refused while clients are connected).
    Delete { name: String },
    /// Latency percentiles of the client requests (NBD, host attach) the node at --api served for
    /// the volume since the last reset, measured server side (from a request
    /// read to its reply queued): set them beside what the client sees (fio's
    /// clat) to tell the network and the client from ballast.
    Latency {
        name: String,
        /// After printing, start the percentiles afresh (take one interval per run).
        #[arg(long)]
        reset: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (clients see the new size when they reconnect).
    Resize {
        name: String,
        /// New size. Growing is online (clients see it when they reconnect;
        /// grow the filesystem then, e.g. resize2fs).
        #[arg(long)]
        size: String,
        /// Allow a smaller size: the data past the new end is discarded on
        /// every replica (refused while clients are connected or the volume
        /// is attached; shrink the filesystem first).
        #[arg(long)]
        allow_shrink: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Copy a volume into an image file (a backup off the cluster), with
    /// qemu-img over NBD with TLS from the node serving it. The volume is
    /// read as it is during the copy: stop its writers first (or export a
    /// quiet filesystem) for a consistent image.
    Export {
        name: String,
        /// The image file to write (must not exist).
        file: std::path::PathBuf,
        /// Image format: raw, or qcow2 (only the written data takes space), or any qemu-img writes.
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// Copy an image file (raw, qcow2, vmdk, ... whatever qemu-img reads)
    /// into a volume; the volume is created to the image's size when it
    /// does not exist (holes stay unallocated).
    Import {
        /// The image file to read.
        file: std::path::PathBuf,
        name: String,
        /// Copies of a volume the import creates.
        #[arg(long, default_value_t = 1)]
        repl: u32,
        /// The image's format (default: what qemu-img detects).
        #[arg(long)]
        format: Option<String>,
    },
}

/// Runs a volume command.
pub fn run(args: VolumeArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api);
    match args.command {
        VolumeCommand::Create {
            name,
            size,
            standby_of,
            repl,
            block_size,
            encrypted,
            passphrase_file,
            group,
            qos,
            json,
        } => {
            let standby = standby_of
                .map(|of| {
                    of.split_once('/')
                        .map(|(target, volume)| (target.to_owned(), volume.to_owned()))
                        .with_context(|| format!("--standby-of takes TARGET/VOLUME, got {of:?}"))
                })
                .transpose()?;
            let size_bytes = match (&size, &standby) {
                (Some(size), _) => parse_size(size).with_context(|| format!("bad --size {size:?}"))?,
                (None, Some((target, volume))) => {
                    let backups: Vec<crate::backup::repo::Manifest> =
                        client.get(&format!("/v1/backup-targets/{}/backups", path_segment(target)))?;
                    backups
                        .iter()
                        .rev()
                        .find(|m| m.volume == *volume)
                        .with_context(|| format!("target {target} holds no backup of {volume}"))?
                        .size_bytes
                }
                (None, None) => anyhow::bail!("--size is needed"),
            };
            let passphrase = passphrase_file.as_deref().map(read_passphrase).transpose()?;
            let body = CreateBody {
                name,
                size_bytes,
                block_size_bytes: block_size,
                replicas: repl,
                encrypted: encrypted || passphrase.is_some(),
                passphrase,
                group: group.unwrap_or_default(),
            };
            let info: VolumeInfo = client.post("/v1/volumes", &body)?;
            let info = if qos.given() {
                match put_qos(&client, &qos, &info) {
                    Ok(info) => info,
                    Err(error) => {
                        // Not left half made: the volume goes with the refusal.
                        let _ = client.delete(&format!("/v1/volumes/{}", path_segment(&info.name)));
                        return Err(error);
                    }
                }
            } else {
                info
            };
            let Some((target, volume)) = standby else {
                return print_one(&info, json, "created");
            };
            let body = crate::cluster::backups::StandbyBody { target, volume };
            let path = format!("/v1/volumes/{}/standby", path_segment(&info.name));
            let info: VolumeInfo = match client.post(&path, &body) {
                Ok(info) => info,
                Err(error) => {
                    // Not left half made: the volume goes with the refusal.
                    let _ = client.delete(&format!("/v1/volumes/{}", path_segment(&info.name)));
                    return Err(error.into());
                }
            };
            print_one(&info, json, "created")
        }
        VolumeCommand::Promote { name, json } => {
            let info: VolumeInfo = client.post(
                &format!("/v1/volumes/{}/promote", path_segment(&name)),
                &serde_json::json!({}),
            )?;
            print_one(&info, json, "promoted")
        }
        VolumeCommand::List { json } => {
            let list: Vec<VolumeInfo> = client.get("/v1/volumes")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Inspect { name, json } => {
            let info: VolumeInfo = client.get(&format!("/v1/volumes/{}", path_segment(&name)))?;
            print_one(&info, json, "")
        }
        VolumeCommand::Clone {
            snapshot,
            name,
            group,
            json,
        } => {
            let Some((volume, snap)) = crate::volume::snapshot::split_name(&snapshot) else {
                anyhow::bail!(
                    "name the snapshot as VOLUME@SNAPSHOT (got {snapshot:?}); see `ballast snapshot list VOLUME`"
                );
            };
            let info: VolumeInfo = client.post(
                &format!(
                    "/v1/volumes/{}/snapshots/{}/clone",
                    path_segment(volume),
                    path_segment(snap)
                ),
                &crate::api::CloneBody {
                    name,
                    group: group.unwrap_or_default(),
                },
            )?;
            print_one(&info, json, "cloned")
        }
        VolumeCommand::Update {
            name,
            repl,
            snapshot_every,
            keep,
            backup_every,
            backup_keep,
            backup_target,
            qos,
            json,
            wait,
        } => {
            let mut info = None;
            if qos.given() {
                let current: VolumeInfo = client.get(&format!("/v1/volumes/{}", path_segment(&name)))?;
                info = Some(put_qos(&client, &qos, &current)?);
            }
            if let Some(every) = backup_every {
                let every_seconds =
                    crate::cli::cluster::parse_ttl(&every).with_context(|| format!("bad --backup-every {every:?}"))?;
                let body = crate::cluster::backups::BackupScheduleBody {
                    every_seconds,
                    keep: backup_keep.unwrap_or(0),
                    target: backup_target.unwrap_or_default(),
                };
                info = Some(client.put_json::<_, VolumeInfo>(
                    &format!("/v1/volumes/{}/backup-schedule", path_segment(&name)),
                    &body,
                )?);
            }
            if let Some(every) = snapshot_every {
                let every_seconds = crate::cli::cluster::parse_ttl(&every)
                    .with_context(|| format!("bad --snapshot-every {every:?}"))?;
                let body = crate::cluster::snapshots::ScheduleBody {
                    every_seconds,
                    keep: keep.unwrap_or(0),
                };
                info = Some(client.put_json::<_, VolumeInfo>(
                    &format!("/v1/volumes/{}/snapshot-schedule", path_segment(&name)),
                    &body,
                )?);
            }
            if let Some(replicas) = repl {
                info = Some(client.put_json(
                    &format!("/v1/volumes/{}/replicas", path_segment(&name)),
                    &crate::api::ReplicasBody { replicas },
                )?);
            }
            let info = info.expect("clap requires one change");
            if !wait {
                return print_one(&info, json, "updated");
            }
            let info = wait_in_sync(&client, &name)?;
            print_one(&info, json, "updated")
        }
        VolumeCommand::Attach {
            name,
            force,
            device,
            json,
        } => {
            let info: VolumeInfo = client.post(
                &format!("/v1/volumes/{}/attach", path_segment(&name)),
                &crate::api::AttachBody { force },
            )?;
            if device {
                let device: crate::attach::Device = client.post(
                    &format!("/v1/volumes/{}/device", path_segment(&name)),
                    &crate::api::AttachBody { force },
                )?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&device)?);
                } else {
                    println!("{}", device.device.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            print_one(&info, json, "attached")
        }
        VolumeCommand::Mount { name, path, fs } => mount(&client, &args.api, &name, &path, &fs),
        VolumeCommand::Unmount { name } => unmount(&client, &name),
        VolumeCommand::Detach { name } => {
            client.delete(&format!("/v1/volumes/{}/device", path_segment(&name)))?;
            println!("detached volume {name} from this host");
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Unlock { name, passphrase_file } => {
            let body = crate::api::UnlockBody {
                passphrase: read_passphrase(&passphrase_file)?,
            };
            client.post_no_content(&format!("/v1/volumes/{}/unlock", path_segment(&name)), &body)?;
            println!("unlocked volume {name}");
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Latency { name, reset, json } => {
            let path = format!("/v1/volumes/{}/latency", path_segment(&name));
            let latency: crate::api::VolumeLatency = client.get(&path)?;
            if reset {
                client.delete(&path)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&latency)?);
            } else {
                print!("{}", latency_table(&latency));
            }
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Delete { name } => {
            client.delete(&format!("/v1/volumes/{}", path_segment(&name)))?;
            println!("deleted volume {name}");
            Ok(ExitCode::SUCCESS)
        }
        VolumeCommand::Resize {
            name,
            size,
            allow_shrink,
            json,
        } => {
            let size_bytes = parse_size(&size).with_context(|| format!("bad --size {size:?}"))?;
            let info: VolumeInfo = client.patch(
                &format!("/v1/volumes/{}", path_segment(&name)),
                &ResizeBody {
                    size_bytes,
                    allow_shrink,
                },
            )?;
            print_one(&info, json, "resized")
        }
        VolumeCommand::Export { name, file, format } => crate::cli::export::export(&client, &name, &file, &format),
        VolumeCommand::Import {
            file,
            name,
            repl,
            format,
        } => crate::cli::export::import(&client, &file, &name, repl, format.as_deref()),
    }
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
    std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))
}

/// Whether an API URL names this host (a loopback address).
pub(crate) fn is_local_api(api: &str) -> bool {
    let host = api.split("://").nth(1).unwrap_or(api);
    let host = host.split('/').next().unwrap_or(host);
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `volume mount`: attach here, mkfs on first use, mount.
fn mount(client: &ApiClient, api: &str, name: &str, path: &std::path::Path, fs: &str) -> Result<ExitCode> {
    let device = mount_volume(client, api, name, path, fs)?;
    println!("mounted volume {name} ({}) at {}", device.display(), path.display());
    Ok(ExitCode::SUCCESS)
}

/// Attaches `name` to this host, makes a `fs` filesystem on first use and
/// mounts it at `path`; the block device.
pub(crate) fn mount_volume(
    client: &ApiClient,
    api: &str,
    name: &str,
    path: &std::path::Path,
    fs: &str,
) -> Result<std::path::PathBuf> {
    use std::ffi::OsStr;
    if !is_local_api(api) {
        anyhow::bail!("volume mount uses this host's node: point --api at it (a loopback address), not {api}");
    }
    let _: VolumeInfo = client.post(
        &format!("/v1/volumes/{}/attach", path_segment(name)),
        &crate::api::AttachBody { force: false },
    )?;
    let device: crate::attach::Device = client.post(
        &format!("/v1/volumes/{}/device", path_segment(name)),
        &crate::api::AttachBody { force: false },
    )?;
    let dev = device.device.as_os_str();
    let probe = run_tool(
        "blkid",
        &[
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("value"),
            OsStr::new("-s"),
            OsStr::new("TYPE"),
            dev,
        ],
    )?;
    let existing = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
    if existing.is_empty() {
        eprintln!("making a {fs} filesystem on {} (first use)", device.device.display());
        let made = run_tool(&format!("mkfs.{fs}"), &[OsStr::new("-q"), dev])?;
        if !made.status.success() {
            anyhow::bail!(
                "mkfs.{fs} {} failed: {}",
                device.device.display(),
                String::from_utf8_lossy(&made.stderr).trim()
            );
        }
    } else if existing != fs {
        eprintln!(
            "{} already holds {existing}; mounting it as it is",
            device.device.display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("cannot make {}", path.display()))?;
    let mounted = run_tool("mount", &[dev, path.as_os_str()])?;
    if !mounted.status.success() {
        anyhow::bail!(
            "mount {} {} failed: {}",
            device.device.display(),
            path.display(),
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
    }
    Ok(device.device)
}

/// `volume unmount`: unmount every mount of the volume's device here, then detach it.
fn unmount(client: &ApiClient, name: &str) -> Result<ExitCode> {
    for target in unmount_volume(client, name)? {
        println!("unmounted {target}");
    }
    println!("detached volume {name} from this host");
    Ok(ExitCode::SUCCESS)
}

/// Unmounts every mount of `name`'s device on this host and detaches it;
/// the mountpoints it unmounted.
pub(crate) fn unmount_volume(client: &ApiClient, name: &str) -> Result<Vec<String>> {
    let mut unmounted = Vec::new();
    let device: crate::attach::Device = client.get(&format!("/v1/volumes/{}/device", path_segment(name)))?;
    let mounts = crate::attach::mounts().context("cannot read /proc/self/mounts")?;
    let device_text = device.device.to_string_lossy().into_owned();
    for (_, target) in mounts.into_iter().filter(|(source, _)| *source == device_text) {
        let done = run_tool("umount", &[target.as_os_str()])?;
        if !done.status.success() {
            anyhow::bail!(
                "umount {} failed (in use?): {}",
                target.display(),
                String::from_utf8_lossy(&done.stderr).trim()
            );
        }
        unmounted.push(target.display().to_string());
    }
    client.delete(&format!("/v1/volumes/{}/device", path_segment(name)))?;
    Ok(unmounted)
}

/// The passphrase in `path`: its first line, without the line end.
fn read_passphrase(path: &std::path::Path) -> Result<crate::api::Passphrase> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
    );
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        anyhow::bail!("the passphrase file {} is empty", path.display());
    }
    Ok(crate::api::Passphrase(zeroize::Zeroizing::new(line.to_owned())))
}

/// Keeps a user's name from changing the URL path (the node rejects bad names).
pub(crate) fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Longest `volume update --wait` waits.
const IN_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Polls the volume until it has its wanted replicas, all in sync; a bar
/// follows the resync bytes meanwhile.
fn wait_in_sync(client: &ApiClient, name: &str) -> Result<VolumeInfo> {
    let path = format!("/v1/volumes/{}", path_segment(name));
    let started = std::time::Instant::now();
    let bar = crate::cli::progress::bytes(0, &format!("{name}: resync"));
    loop {
        let info: VolumeInfo = client.get(&path)?;
        let wanted = info.replicas as usize;
        if info.replica_nodes.len() == wanted && info.in_sync.len() == wanted {
            bar.finish_and_clear();
            return Ok(info);
        }
        let running: Vec<_> = info.resyncs.iter().filter(|r| r.state == "running").collect();
        let total: u64 = running.iter().map(|r| r.dirty_bytes).sum();
        let moved: u64 = running.iter().map(|r| r.copied_bytes + r.zeroed_bytes).sum();
        bar.set_length(total.max(1));
        bar.set_position(moved.min(total));
        bar.set_message(format!(
            "{name}: {}/{wanted} replicas in sync, resync",
            info.in_sync.len()
        ));
        if started.elapsed() > IN_SYNC_WAIT {
            bar.abandon();
            anyhow::bail!(
                "volume {name} is still not fully in sync after {IN_SYNC_WAIT:?}; see `ballast volume inspect {name}`"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A volume's I/O priority and limits on the command line.
#[derive(Args, Debug, Default)]
pub struct QosArgs {
    /// I/O priority class: high, medium (the default) or low. Kept in the
    /// cluster and shown; the disk does not weigh classes against each
    /// other yet (requests are served first come, first served).
    #[arg(long, value_name = "CLASS")]
    pub io_priority: Option<String>,
    /// At most N requests per second from the volume's clients (reads,
    /// writes, trims; flushes are free), paced by the node serving it;
    /// `none` lifts the limit. Admin only.
    #[arg(long, value_name = "N|none")]
    pub iops_limit: Option<String>,
    /// At most N MiB per second read and written by the volume's clients;
    /// `none` lifts the limit. Admin only.
    #[arg(long, value_name = "N|none")]
    pub mib_per_s_limit: Option<String>,
}

impl QosArgs {
    fn given(&self) -> bool {
        self.io_priority.is_some() || self.iops_limit.is_some() || self.mib_per_s_limit.is_some()
    }

    /// `current`'s priority and limits with these changes.
    fn merged(&self, current: &VolumeInfo) -> Result<crate::cluster::volumes::QosBody> {
        let limit = |given: &Option<String>, flag: &str, now: Option<u64>| -> Result<Option<u64>> {
            match given.as_deref() {
                None => Ok(now),
                Some("none") => Ok(None),
                Some(text) => text
                    .parse::<u64>()
                    .map(Some)
                    .with_context(|| format!("bad {flag} {text:?}: give a whole number, or none")),
            }
        };
        Ok(crate::cluster::volumes::QosBody {
            io_priority: match &self.io_priority {
                Some(text) => text.parse().map_err(anyhow::Error::msg)?,
                None => current.io_priority,
            },
            iops_limit: limit(&self.iops_limit, "--iops-limit", current.iops_limit)?,
            mib_per_s_limit: limit(&self.mib_per_s_limit, "--mib-per-s-limit", current.mib_per_s_limit)?,
        })
    }
}

fn put_qos(client: &ApiClient, qos: &QosArgs, current: &VolumeInfo) -> Result<VolumeInfo> {
    let body = qos.merged(current)?;
    Ok(client.put_json(&format!("/v1/volumes/{}/qos", path_segment(&current.name)), &body)?)
}

fn print_one(info: &VolumeInfo, json: bool, verb: &str) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(ExitCode::SUCCESS);
    }
    if !verb.is_empty() {
        println!("{verb} volume {}: {}", info.name, format_size(info.size_bytes));
    }
    println!("name:        {}", info.name);
    println!(
        "size:        {} ({} bytes)",
        format_size(info.size_bytes),
        info.size_bytes
    );
    println!("used:        {}", format_size(info.used_bytes));
    println!("block size:  {}", info.block_size_bytes);
    let nodes: Vec<String> = info.replica_nodes.iter().map(u64::to_string).collect();
    println!("replicas:    {} on nodes {}", info.replicas, nodes.join(", "));
    let in_sync: Vec<String> = info.in_sync.iter().map(u64::to_string).collect();
    println!("in sync:     {}", in_sync.join(", "));
    println!("coordinator: node {} (epoch {})", info.coordinator, info.epoch);
    if !info.disk_path.is_empty() {
        println!("disk:        {} ({})", info.disk_path, info.disk_uuid);
    }
    println!("connections: {}", info.connections);
    println!("export:      nbd://{}/{}", info.coordinator_nbd, info.name);
    let owner = if info.owner.is_empty() {
        "the admins"
    } else {
        &info.owner
    };
    if info.group.is_empty() {
        println!("owner:       {owner}");
    } else {
        println!("owner:       {owner} (and group {})", info.group);
    }
    if info.attached_to != 0 {
        println!("attached:    to node {}'s host (block device)", info.attached_to);
    }
    if info.snapshots > 0 || info.snapshot_every_seconds > 0 {
        let schedule = if info.snapshot_every_seconds > 0 {
            format!(
                "; one every {} s, the newest {} kept",
                info.snapshot_every_seconds, info.snapshot_keep
            )
        } else {
            String::new()
        };
        println!(
            "snapshots:   {}{schedule} (`ballast snapshot list {}`)",
            info.snapshots, info.name
        );
    }
    if !info.standby_of.is_empty() {
        println!(
            "standby of:  {} (applied: {}; serves no client until `ballast volume promote {}`)",
            info.standby_of,
            if info.standby_applied.is_empty() {
                "nothing yet"
            } else {
                &info.standby_applied
            },
            info.name
        );
    }
    if info.backup_every_seconds > 0 {
        println!(
            "backups:     one every {} s to target {}, the newest {} kept (`ballast backup list {}`)",
            info.backup_every_seconds, info.backup_target, info.backup_keep, info.backup_target
        );
    }
    if info.iops_limit.is_some() || info.mib_per_s_limit.is_some() || !info.io_priority.is_medium() {
        let limit = |value: Option<u64>, unit: &str| {
            value.map_or_else(|| format!("no {unit} limit"), |v| format!("at most {v} {unit}"))
        };
        println!(
            "io:          priority {}; {}, {}",
            info.io_priority.as_str(),
            limit(info.iops_limit, "IOPS"),
            limit(info.mib_per_s_limit, "MiB/s")
        );
    }
    if !info.cloned_from.is_empty() {
        println!("cloned from: {}", info.cloned_from);
    }
    if !info.encryption.is_empty() {
        println!(
            "encryption:  AES-XTS-256, key wrapped by the {}",
            info.encryption.replace('-', " ")
        );
    }
    if !info.health.is_empty() {
        let down: Vec<String> = info.replicas_down.iter().map(u64::to_string).collect();
        println!(
            "health:      {}{}",
            info.health,
            if down.is_empty() {
                String::new()
            } else {
                format!(" (down: {})", down.join(", "))
            }
        );
    }
    for resync in &info.resyncs {
        let moved = resync.copied_bytes + resync.zeroed_bytes;
        let eta = resync
            .eta_seconds()
            .map_or_else(String::new, |seconds| format!(", about {seconds}s left"));
        let rate = resync
            .copied_bytes_per_s()
            .map_or_else(String::new, |bytes| format!(" at {}/s", format_size(bytes)));
        let sources = match resync.sources {
            0 | 1 => String::new(),
            count => format!(
                " from {count} copies ({} by replicas)",
                format_size(resync.from_replicas_bytes)
            ),
        };
        println!(
            "resync:      to node {}: {} ({}), {} of {} looked at, {} copied{rate}{sources}{eta}{}",
            resync.node,
            resync.state,
            resync.mode,
            format_size(moved),
            format_size(resync.dirty_bytes),
            format_size(resync.copied_bytes),
            resync
                .error
                .as_deref()
                .map_or_else(String::new, |error| format!("; {error}"))
        );
    }
    for alert in &info.alerts {
        println!("ALERT:       {} {}", alert.key, alert.message);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &[VolumeInfo]) {
    if list.is_empty() {
        println!("no volumes (create one with `ballast volume create NAME --size 10GiB`)");
        return;
    }
    println!(
        "{:<24} {:>10} {:>10} {:>6} {:>5} {:>5}  EXPORT",
        "NAME", "SIZE", "USED", "BLOCK", "REPL", "CONNS"
    );
    for info in list {
        println!(
            "{:<24} {:>10} {:>10} {:>6} {:>5} {:>5}  nbd://{}/{}",
            info.name,
            format_size(info.size_bytes),
            format_size(info.used_bytes),
            info.block_size_bytes,
            info.replicas,
            info.connections,
            info.coordinator_nbd,
            info.name
        );
    }
}

/// The percentiles as a table, in microseconds.
fn latency_table(latency: &crate::api::VolumeLatency) -> String {
    let mut out = format!(
        "volume {} on node {}: client requests since the last reset, server side (microseconds)\n",
        latency.volume, latency.node_id
    );
    if latency.ops.is_empty() {
        out.push_str("no request served since the last reset\n");
        return out;
    }
    out.push_str(&format!(
        "{:<13} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "op", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
    ));
    for op in &latency.ops {
        out.push_str(&format!(
            "{:<13} {:>10} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            op.op, op.count, op.mean_us, op.p50_us, op.p90_us, op.p99_us, op.p99_9_us, op.max_us
        ));
    }
    out
}
