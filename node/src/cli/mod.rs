//! Command-line interface. Each command prints one clear line on error,
//! with a hint where one helps, and exits non-zero.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// ballast: replicated block volumes on the raw disks of ordinary servers.
#[derive(Parser, Debug)]
#[command(name = "ballast", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log verbosity (error, warn, info, debug, trace); RUST_LOG overrides.
    /// Default: info for the daemon, warn for one-shot commands.
    #[arg(long, global = true, env = "BALLAST_LOG")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// The node API every command calls (also accepted after the command,
    /// as `--api`, or from BALLAST_API); default http://127.0.0.1:9410.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the command line; `--api` before the command counts for the
    /// command (as BALLAST_API does), an `--api` after it wins.
    #[must_use]
    pub fn parse_args() -> Self {
        let cli = Self::parse();
        let Some(api) = cli.api.clone() else {
            return cli;
        };
        // Every command's `--api` reads BALLAST_API when not given: set it and parse again.
        // Single-threaded here (nothing has started yet).
        std::env::set_var("BALLAST_API", api);
        Self::parse()
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Find, enroll and inspect the disks ballast stores data on.
    #[command(subcommand)]
    Disk(crate::cli::disk::DiskCommand),
    /// Run a node (the daemon) or ask a running one how it is.
    #[command(subcommand)]
    Node(crate::cli::node::NodeCommand),
    /// Create, list, inspect, resize and delete volumes (through the node's API).
    Volume(crate::cli::volume::VolumeArgs),
    /// Form and inspect the cluster: init, join tokens, join, status.
    Cluster(crate::cli::cluster::ClusterArgs),
    /// The whole fleet at a glance: is my data safe right now, and if not,
    /// why and since when. Nodes (state, version, cores, disks, space),
    /// volumes (health, replicas in sync, where attached, resync progress
    /// with ETA) and active alerts; the same as `ballast cluster status`.
    Status {
        /// The node API to ask.
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
        api: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Redraw every SECONDS until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Check every copy of volumes for bit rot and disagreeing replicas,
    /// and repair them: `ballast scrub start [VOLUME...] [--wait]`,
    /// `ballast scrub status`.
    Scrub(crate::cli::scrub::ScrubArgs),
    /// Point-in-time copies of volumes: `ballast snapshot create VOLUME
    /// NAME`, `list VOLUME`, `delete VOLUME NAME`, `restore VOLUME NAME`.
    /// Instant and thin (they share data with the volume); read them over
    /// NBD as `VOLUME@NAME`, make a writable copy with `ballast volume clone
    /// VOLUME@NAME NEW`, schedule them with `ballast volume update VOLUME
    /// --snapshot-every 1h --keep 24`.
    Snapshot(crate::cli::snapshot::SnapshotArgs),
    /// Backups off the cluster: `ballast backup create VOLUME --target
    /// file:///PATH`, `restore TARGET BACKUP NEW-VOLUME`, `list TARGET`,
    /// `inspect TARGET BACKUP`, `verify TARGET [BACKUP]`, `delete TARGET
    /// BACKUP`. Incremental (only changed chunks are read and sent after
    /// the first), deduplicated, compressed and encrypted on the node; the
    /// secret is a passphrase (--passphrase-file, BALLAST_BACKUP_PASSPHRASE)
    /// or a key file (--key-file).
    Backup(crate::cli::backup::BackupArgs),
    /// API tokens and NBD client certificates: `ballast auth token create
    /// --subject NAME --role user --ttl 24h`, `ballast auth cert create
    /// --subject NAME --out DIR`.
    ///
    /// Every API request needs a token; on a node's host (as root) the CLI
    /// finds the admin token of the node it calls by itself (the node
    /// records its data directory under /run/ballast/api/ while it runs);
    /// BALLAST_TOKEN, or a file named by BALLAST_TOKEN_FILE, overrides it.
    /// Users see and use only the volumes they created.
    Auth {
        /// The node API to ask.
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
        api: String,
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// What needs attention: active alerts (node down, volume degraded,
    /// disk full or failing, clock skew), and with --all the cleared ones.
    Alerts {
        /// The node API to ask.
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
        api: String,
        /// Include cleared alerts (the cluster keeps the last 256).
        #[arg(long)]
        all: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The Docker volume plugin: `ballast plugin serve` next to this host's node.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// The audit trail of a node of this host (read from its data
    /// directory): every API request that changed something and every one
    /// refused for its token (401) or its rights (403): when, who, from
    /// where, what, and the answer. Never a token or a request body.
    Audit {
        /// The node whose data directory holds the trail (found through
        /// its record in /run/ballast/api).
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL)]
        api: String,
        /// Read this data directory instead.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// Only entries of this last while: 90s, 30m, 1h, 2d.
        #[arg(long, value_name = "AGE")]
        since: Option<String>,
        /// One JSON object per line, as stored.
        #[arg(long)]
        json: bool,
    },
    /// Installs this binary as a service: /usr/local/bin/ballast,
    /// /etc/ballast/ballast.toml (documented defaults, written only when
    /// missing), and the systemd units ballast-node.service and
    /// ballast-plugin.service. Works offline; talks to neither systemd nor
    /// the network. Then: `ballast disk enroll --data-dir /var/lib/ballast
    /// /dev/DISK` and `systemctl enable --now ballast-node ballast-plugin`.
    Install {
        /// Install under this root instead of / (an image, a chroot).
        #[arg(long, default_value = "/")]
        root: std::path::PathBuf,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The binary to install (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<std::path::PathBuf>,
    },
    /// Removes what `ballast install` put there: the binary, the units, and
    /// the config file if it is unchanged. Never a data directory.
    Uninstall {
        /// Uninstall from this root instead of /.
        #[arg(long, default_value = "/")]
        root: std::path::PathBuf,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// This binary's version, the peer protocol versions it speaks and the
    /// upgrade-in-place hand-over formats it takes over from (what `ballast
    /// node upgrade` checks a new binary against).
    Version {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Self-test tools: drive the storage engine directly (used by the test suite).
    #[command(subcommand, hide = true)]
    Debug(crate::cli::debug::DebugCommand),
}

impl Command {
    /// A long-running server (the node, the plugin) or a self-test tool
    /// that talks to servers which may go away under it: these keep
    /// SIGPIPE ignored and handle a broken connection as an error.
    fn serves(&self) -> bool {
        matches!(
            self,
            Self::Node(crate::cli::node::NodeCommand::Run(_)) | Self::Plugin(_) | Self::Debug(_)
        )
    }
}

/// `ballast audit`: the trail of the node at `api` (or in `data_dir`).
fn show_audit(
    api: &str,
    data_dir: Option<std::path::PathBuf>,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir
        .or_else(|| crate::local_nodes::data_dir_of(api))
        .unwrap_or_else(|| std::path::PathBuf::from(crate::datadir::DEFAULT_DIR));
    let since_unix_ms = match since {
        Some(age) => crate::audit::now_unix_ms().saturating_sub(cluster::parse_ttl(age)?.saturating_mul(1000)),
        None => 0,
    };
    if !data_dir.join(crate::audit::FILE).exists() {
        anyhow::bail!(
            "no audit trail in {} (nothing audited yet, or not a node's data directory: use --data-dir)",
            data_dir.display()
        );
    }
    let entries = crate::audit::read(&data_dir, since_unix_ms)?;
    let mut out = std::io::stdout().lock();
    for entry in &entries {
        let line = if json {
            serde_json::to_string(entry)?
        } else {
            let seconds = i64::try_from(entry.time_unix_ms / 1000).unwrap_or(i64::MAX);
            let at = time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z  {:<3}  {:<12} {:<5} {:<21} {:<6} {}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second(),
                entry.status,
                entry.subject,
                entry.role,
                entry.source,
                entry.action,
                entry.target
            )
        };
        std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `ballast install` / `uninstall`: the steps, then what to do next.
fn run_install(
    root: std::path::PathBuf,
    dry_run: bool,
    binary: Option<std::path::PathBuf>,
    installing: bool,
) -> anyhow::Result<ExitCode> {
    let options = crate::install::Options { root, dry_run, binary };
    let steps = if installing {
        crate::install::install(&options)?
    } else {
        crate::install::uninstall(&options)?
    };
    if dry_run {
        println!("dry run: nothing was changed; this would be done:");
    }
    for step in &steps {
        println!("{step}");
    }
    if installing && !dry_run {
        println!(
            "\nnext: enroll a disk (ballast disk enroll --data-dir /var/lib/ballast /dev/DISK),\n      \
             then systemctl daemon-reload && systemctl enable --now ballast-node ballast-plugin"
        );
    } else if !installing && !dry_run {
        println!("\nrun systemctl daemon-reload so systemd forgets the removed units");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Serve the Docker volume plugin (protocol v1) on a unix socket until SIGTERM:
    /// `docker volume create -d ballast --opt size=10GiB --opt repl=3 NAME`, then
    /// `docker run -v NAME:/data ...` attaches, formats on first use and mounts it here.
    Serve {
        /// The node API of this host (the plugin attaches and mounts here); several
        /// nodes of this host, comma-separated, are tried in order, so the plugin
        /// goes on through the next one when its node dies.
        #[arg(long, env = "BALLAST_API", default_value = crate::api::client::DEFAULT_API_URL, value_delimiter = ',')]
        api: Vec<String>,
        /// The socket dockerd finds plugins by.
        #[arg(long, default_value = crate::plugin::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Where volumes are mounted for containers (the plugin's state file is kept there too).
        #[arg(long, default_value = crate::plugin::DEFAULT_MOUNTS)]
        mounts: std::path::PathBuf,
    },
    /// The Docker managed plugin's entrypoint (scripts/docker-plugin.sh builds
    /// the plugin): enrolls DISKS not yet enrolled, runs the node, makes it a
    /// one-node cluster with INIT=single, and serves the volume plugin against
    /// it until SIGTERM (`docker plugin disable`), then stops the node. Each
    /// setting is the plugin's environment variable (`docker plugin set
    /// ballast DISKS=/dev/nvme1n1`) or the flag.
    Managed {
        /// The node's data directory (in the plugin: a bind mount of the host's).
        #[arg(long, env = "DATA_DIR", default_value = "/var/lib/ballast")]
        data_dir: std::path::PathBuf,
        /// Disks (or files) to enroll, comma-separated; enrolled ones are skipped.
        #[arg(long, env = "DISKS", value_delimiter = ',')]
        disks: Vec<std::path::PathBuf>,
        /// `single`: make the node a one-node cluster if it is in none; empty:
        /// leave it alone (join it to a cluster with `ballast cluster join`).
        #[arg(long, env = "INIT", default_value = "")]
        init: String,
        /// The node's API address (the plugin talks to it; so does the CLI).
        #[arg(long, env = "LISTEN_API", default_value = crate::daemon::config::DEFAULT_LISTEN_API)]
        listen_api: String,
        /// The node's NBD address.
        #[arg(long, env = "LISTEN_NBD", default_value = crate::daemon::config::DEFAULT_LISTEN_NBD)]
        listen_nbd: String,
        /// The node's peer address (Raft, replication): one the other hosts
        /// reach, for a node that joins a cluster.
        #[arg(long, env = "LISTEN_PEER", default_value = crate::daemon::config::DEFAULT_LISTEN_PEER)]
        listen_peer: String,
        /// The socket dockerd gave the plugin.
        #[arg(long, default_value = crate::plugin::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Where volumes are mounted: the plugin's propagated mount.
        #[arg(long, env = "MOUNTS", default_value = crate::managed_plugin::DEFAULT_MOUNTS)]
        mounts: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthCommand {
    /// Token commands.
    #[command(subcommand)]
    Token(AuthTokenCommand),
    /// Client certificates for NBD over TLS (nbds://).
    #[command(subcommand)]
    Cert(AuthCertCommand),
}

#[derive(Subcommand, Debug)]
pub enum AuthCertCommand {
    /// Write a client certificate signed by the cluster CA into DIR as
    /// ca-cert.pem, client-cert.pem and client-key.pem (0600): the layout
    /// libnbd and qemu read, e.g.
    /// `nbdinfo 'nbds://HOST/VOLUME?tls-certificates=DIR'`.
    /// Over TLS the certificate's subject owns what a token of that subject
    /// owns; a user may get one only for itself.
    Create {
        /// Who it is for.
        #[arg(long)]
        subject: String,
        /// admin (every volume) or user (own volumes only).
        #[arg(long, default_value = "user", value_parser = ["user", "admin"])]
        role: String,
        /// A group the subject is in (repeatable), as in `auth token create`.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Lifetime in whole days: with d (or s, m, h, rounded down to days; 1d to 366d).
        #[arg(long, default_value = "365d")]
        ttl: String,
        /// Directory to write the files into (made 0700 if missing; existing files are replaced).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthTokenCommand {
    /// Print a new API token signed by the cluster (valid on every node).
    Create {
        /// Who it is for (becomes the owner of the volumes it creates).
        #[arg(long)]
        subject: String,
        /// admin (everything) or user (own volumes only).
        #[arg(long, default_value = "user", value_parser = ["user", "admin"])]
        role: String,
        /// A group the subject is in (repeatable): it may use volumes created with `--group` of it.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Lifetime: seconds, or with s, m, h, d (at most 366d).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

impl Command {
    /// Long-running commands log their progress; one-shot commands only problems.
    fn default_log_level(&self) -> &'static str {
        match self {
            Self::Debug(_) | Self::Node(crate::cli::node::NodeCommand::Run(_)) => "info",
            Self::Disk(_)
            | Self::Node(_)
            | Self::Volume(_)
            | Self::Cluster(_)
            | Self::Status { .. }
            | Self::Scrub(_)
            | Self::Snapshot(_)
            | Self::Backup(_)
            | Self::Alerts { .. }
            | Self::Auth { .. }
            | Self::Audit { .. }
            | Self::Install { .. }
            | Self::Uninstall { .. }
            | Self::Version { .. } => "warn",
            Self::Plugin(_) => "info",
        }
    }
}

pub mod backup;
pub mod cluster;
pub mod debug;
pub mod disk;
pub mod export;
pub mod load;
pub mod node;
pub mod progress;
pub mod scrub;
pub mod snapshot;
pub mod upgrade;
pub mod volume;

/// Runs the CLI.
#[must_use]
pub fn main() -> ExitCode {
    // First: a node started by an upgrade in place runs the old binary
    // again if it fails before it has taken over (even on a bad argument).
    crate::handoff::arm_from_env();
    let cli = Cli::parse_args();
    if !cli.command.serves() {
        // `ballast status | head` ends quietly when head has read enough.
        kernel_iface::process::default_sigpipe();
    }
    let level = cli
        .log_level
        .clone()
        .unwrap_or_else(|| cli.command.default_log_level().to_owned());
    init_logging(&level, cli.log_format);
    let log_format = cli.log_format;
    let result = match cli.command {
        Command::Disk(command) => disk::run(command),
        Command::Debug(command) => debug::run(command),
        Command::Node(command) => node::run(command),
        Command::Volume(args) => volume::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Scrub(args) => scrub::run(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Backup(args) => backup::run(args),
        Command::Status { api, json, watch } => cluster::status(&api, json, watch),
        Command::Plugin(PluginCommand::Serve { api, socket, mounts }) => {
            crate::plugin::serve(crate::plugin::PluginOptions {
                socket,
                apis: api,
                mounts,
            })
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Managed {
            data_dir,
            disks,
            init,
            listen_api,
            listen_nbd,
            listen_peer,
            socket,
            mounts,
        }) => {
            match init.as_str() {
                "single" | "" => {}
                other => {
                    eprintln!("error: INIT={other:?}: use single (a one-node cluster) or leave it empty");
                    return ExitCode::from(2);
                }
            }
            let init_single = init == "single";
            crate::managed_plugin::run(&crate::managed_plugin::ManagedOptions {
                data_dir,
                disks,
                init_single,
                listen_api,
                listen_nbd,
                listen_peer,
                socket,
                mounts,
            })
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Alerts { api, all, json } => cluster::alerts(&api, all, json),
        Command::Version { json } => {
            let version = crate::handoff::BinaryVersion::local();
            if json {
                match serde_json::to_string(&version) {
                    Ok(text) => println!("{text}"),
                    Err(error) => {
                        eprintln!("error: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!(
                    "ballast {} (peer protocol {}, upgrade hand-over formats {:?})",
                    version.version,
                    crate::peer::handshake::range_text(version.peer_protocol_min, version.peer_protocol_max),
                    version.handoff_formats
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            api,
            data_dir,
            since,
            json,
        } => show_audit(&api, data_dir, since.as_deref(), json),
        Command::Install { root, dry_run, binary } => run_install(root, dry_run, binary, true),
        Command::Uninstall { root, dry_run } => run_install(root, dry_run, None, false),
        Command::Auth {
            api,
            command:
                AuthCommand::Token(AuthTokenCommand::Create {
                    subject,
                    role,
                    groups,
                    ttl,
                }),
        } => cluster::create_api_token(&api, &subject, &role, &groups, &ttl),
        Command::Auth {
            api,
            command:
                AuthCommand::Cert(AuthCertCommand::Create {
                    subject,
                    role,
                    groups,
                    ttl,
                    out,
                }),
        } => cluster::create_client_cert(&api, &subject, &role, &groups, &ttl, &out),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            if log_format == LogFormat::Json {
                // With --log-format json every line on stderr is JSON, the last error too.
                let line = serde_json::json!({"level": "ERROR", "fields": {"message": format!("{error:#}")}});
                eprintln!("{line}");
            } else {
                eprintln!("error: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    // openraft narrates every election and membership step at info;
    // rustls warns of every client that sends an IP address as SNI (GnuTLS
    // does, so libnbd and qemu), which is harmless.
    let mut level = level.to_owned();
    if !level.contains("openraft") {
        level.push_str(",openraft=warn");
    }
    if !level.contains("rustls") {
        level.push_str(",rustls=error");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}
