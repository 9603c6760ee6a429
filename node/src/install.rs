//! `ballast install` / `ballast uninstall`: puts the running binary, a
//! documented config file and the systemd units of the node and the Docker
//! volume plugin on a host (or under `--root` for an image or a test), and
//! takes exactly that away again, never data.
//!
//! What goes where (relative to the root):
//!
//! | file | install | uninstall |
//! | --- | --- | --- |
//! | `usr/local/bin/ballast` | replaced (written beside, then renamed) | removed |
//! | `etc/ballast/ballast.toml` | written only when missing | removed only when still as installed |
//! | `etc/systemd/system/ballast-node.service` | replaced | removed |
//! | `etc/systemd/system/ballast-plugin.service` | replaced | removed |
//!
//! Docker finds the plugin by its socket, `/run/docker/plugins/ballast.sock`
//! (dockerd's discovery directory), so no `.spec` file is needed. Nothing
//! here talks to systemd or to the network: the command works offline and
//! under a root that is not the running system's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the binary goes, relative to the root.
pub const BINARY: &str = "usr/local/bin/ballast";
/// The config file, relative to the root.
pub const CONFIG: &str = "etc/ballast/ballast.toml";
/// The node's unit, relative to the root.
pub const NODE_UNIT: &str = "etc/systemd/system/ballast-node.service";
/// The plugin's unit, relative to the root.
pub const PLUGIN_UNIT: &str = "etc/systemd/system/ballast-plugin.service";

/// The config file as installed: every setting at its default, commented out.
pub const DEFAULT_CONFIG: &str = r#"# ballast node configuration (`ballast node run --config /etc/ballast/ballast.toml`).
# Every setting is optional; a flag of `ballast node run` overrides it.
# Written by `ballast install` when missing, never overwritten; `ballast
# uninstall` removes it only while it is unchanged.

# The data directory that `ballast disk enroll --data-dir ... /dev/DISK` made.
data_dir = "/var/lib/ballast"

# Where the node listens. Other nodes must reach listen_peer; clients the
# NBD and API addresses. Loopback by default: open them on purpose.
#listen_api = "127.0.0.1:9410"
#listen_nbd = "127.0.0.1:10809"
#listen_peer = "127.0.0.1:9411"

# NBD transport security: "required" (TLS always) or "plaintext-on-loopback".
#nbd_tls = "required"
#nbd_tls_names = ["storage-a.example", "10.0.0.5"]

# Shown in `ballast cluster status` (default: the host name); labels spread
# replicas over distinct zones.
#name = "host-a"
#labels = { zone = "a", rack = "r12" }

# Failure handling (as Raft leader / as a volume's coordinator).
#failover_after_s = 4
#rebuild_after_s = 600
#replica_timeout_ms = 5000

# Verification of every copy of each volume.
#scrub_interval_hours = 168
#scrub_mib_per_s = 64

# Freed disk space is told to the SSDs (discard/TRIM) at most this fast, in
# MiB/s; 0: never (for a device whose discards misbehave).
#discard_mib_per_s = 2560

# Alerts POSTed as JSON to a webhook.
#alert_webhook = "http://alerts.example:8080/ballast"

# API tokens of an identity provider.
#jwt_issuer = "https://idp.example"
#jwt_public_key_file = "/etc/ballast/idp.pem"

# Reactor cores (default: every core the process may use), the pread/pwrite
# engine instead of io_uring, and how attached devices are made: auto, ublk,
# nbd, fuse-uring, fuse.
#cores = "0-3"
#thread_pool = false
#attach_backend = "auto"
"#;

/// Hardening the node and the plugin can take. Left out on purpose: every
/// option that gives the service a mount namespace of its own (PrivateTmp,
/// ProtectSystem, ProtectHome, ProtectKernel*, ReadOnlyPaths...): the node
/// mounts the attach filesystem and the volumes containers use, and those
/// mounts must be the host's, where dockerd sees them.
const HARDENING: &str = "NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
";

/// The node's unit.
pub fn node_unit() -> String {
    format!(
        "# Written by `ballast install`; `ballast uninstall` removes it.
[Unit]
Description=ballast storage node (disks, replication, NBD, host attach)
After=network-online.target local-fs.target
Wants=network-online.target
# Attached devices and mounts are served by this node: Docker should start after it.
Before=docker.service

[Service]
Type=simple
ExecStart=/{BINARY} node run --config /{CONFIG}
# `systemctl reload ballast-node` after the binary was replaced: the node
# executes the new one in place; attached devices pause, never fail, and a
# new binary that cannot start gives way to the old one (`ballast node upgrade`).
# (within systemd's 90 s for a reload)
ExecReload=/{BINARY} node upgrade --config /{CONFIG} --timeout-s 80
Restart=on-failure
RestartSec=2
# A clean stop writes a final checkpoint (at most 30 s).
TimeoutStopSec=60
KillMode=mixed
LimitNOFILE=1048576
LimitMEMLOCK=infinity
{HARDENING}
[Install]
WantedBy=multi-user.target
"
    )
}

/// The Docker volume plugin's unit.
pub fn plugin_unit() -> String {
    format!(
        "# Written by `ballast install`; `ballast uninstall` removes it.
[Unit]
Description=ballast Docker volume plugin (docker volume create -d ballast)
After=ballast-node.service
Wants=ballast-node.service
# dockerd finds the plugin by its socket when it starts.
Before=docker.service

[Service]
Type=simple
ExecStart=/{BINARY} plugin serve
Restart=on-failure
RestartSec=2
{HARDENING}
[Install]
WantedBy=multi-user.target
"
    )
}

/// What `install` or `uninstall` does (or, with `dry_run`, would do).
#[derive(Debug)]
pub struct Options {
    /// The file-system root to install under (`/` on a host).
    pub root: PathBuf,
    /// Print the steps, change nothing.
    pub dry_run: bool,
    /// The binary to install (default: the running one).
    pub binary: Option<PathBuf>,
}

/// One step, as printed; the plan a dry run prints is what is carried out.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// "write", "keep" or "remove"
    pub action: &'static str,
    pub path: PathBuf,
    pub why: String,
    /// For a write: the bytes and the file mode.
    content: Option<(Vec<u8>, u32)>,
}

impl Step {
    fn write(path: PathBuf, bytes: Vec<u8>, mode: u32, why: String) -> Self {
        Self {
            action: "write",
            path,
            why,
            content: Some((bytes, mode)),
        }
    }

    fn other(action: &'static str, path: PathBuf, why: &str) -> Self {
        Self {
            action,
            path,
            why: why.to_owned(),
            content: None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<6} {}  ({})", self.action, self.path.display(), self.why)
    }
}

/// Installs; returns the steps taken (or planned, with `dry_run`).
pub fn install(options: &Options) -> Result<Vec<Step>> {
    let binary = match &options.binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot tell where the running binary is")?,
    };
    let image =
        std::fs::read(&binary).with_context(|| format!("cannot read the binary to install, {}", binary.display()))?;
    if !image.starts_with(b"\x7fELF") {
        bail!("{} is not an executable (ELF) file", binary.display());
    }
    let target = options.root.join(BINARY);
    refuse_if_running(&target)?;
    let why = format!("{} bytes from {}", image.len(), binary.display());
    let mut steps = vec![Step::write(target, image, 0o755, why)];
    let config = options.root.join(CONFIG);
    if config.exists() {
        steps.push(Step::other("keep", config, "exists; never overwritten"));
    } else {
        let why = "documented defaults".to_owned();
        steps.push(Step::write(config, DEFAULT_CONFIG.as_bytes().to_vec(), 0o640, why));
    }
    for (unit, text) in [(NODE_UNIT, node_unit()), (PLUGIN_UNIT, plugin_unit())] {
        let why = "systemd unit".to_owned();
        steps.push(Step::write(options.root.join(unit), text.into_bytes(), 0o644, why));
    }
    carry_out(&steps, options.dry_run)?;
    Ok(steps)
}

/// Uninstalls what `install` put there; never the data directory, and
/// never a config file that was changed since.
pub fn uninstall(options: &Options) -> Result<Vec<Step>> {
    refuse_if_running(&options.root.join(BINARY))?;
    let mut steps: Vec<Step> = [NODE_UNIT, PLUGIN_UNIT, BINARY]
        .into_iter()
        .map(|relative| options.root.join(relative))
        .filter(|path| path.exists())
        .map(|path| Step::other("remove", path, "installed by ballast install"))
        .collect();
    let config = options.root.join(CONFIG);
    match std::fs::read(&config) {
        Ok(text) if text == DEFAULT_CONFIG.as_bytes() => {
            steps.push(Step::other("remove", config, "unchanged since install"));
        }
        Ok(_) => steps.push(Step::other("keep", config, "changed since install: yours now")),
        Err(_) => {}
    }
    steps.push(Step::other(
        "keep",
        PathBuf::from(crate::datadir::DEFAULT_DIR),
        "data directories are never removed",
    ));
    carry_out(&steps, options.dry_run)?;
    if !options.dry_run {
        // The config directory goes too when nothing of the user's is left in it.
        let _ = std::fs::remove_dir(options.root.join("etc/ballast"));
    }
    Ok(steps)
}

/// Does the writes and removals of `steps` (nothing on a dry run).
fn carry_out(steps: &[Step], dry_run: bool) -> Result<()> {
    if dry_run {
        return Ok(());
    }
    for step in steps {
        match (&step.content, step.action) {
            (Some((bytes, mode)), _) => write_replacing(&step.path, bytes, *mode)?,
            (None, "remove") => {
                std::fs::remove_file(&step.path).with_context(|| format!("cannot remove {}", step.path.display()))?;
            }
            (None, _) => {}
        }
    }
    Ok(())
}

/// Writes `bytes` beside `path`, then renames it over `path` (a running
/// copy of the old binary goes on running), making its directory first.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let parent = path.parent().context("a path without a directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    crate::datadir::write_atomic_bytes(path, bytes, mode).with_context(|| format!("cannot write {}", path.display()))
}

/// Refuses when a process runs `binary` (a node or plugin of this install):
/// stop it first, so nothing is left half replaced under a running service.
fn refuse_if_running(binary: &Path) -> Result<()> {
    let Ok(target) = binary.canonicalize() else {
        return Ok(()); // not installed: nothing can run it
    };
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Ok(());
    };
    let own = std::process::id();
    for entry in processes.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe == target {
            bail!(
                "{} is running as process {pid}: stop it first (systemctl stop ballast-node ballast-plugin), then run this again; nothing was changed",
                target.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_config_is_one_the_node_accepts() {
        let file: crate::daemon::config::ConfigFile =
            toml::from_str(DEFAULT_CONFIG).expect("the default config parses");
        assert_eq!(file.data_dir.as_deref(), Some(Path::new(crate::datadir::DEFAULT_DIR)));
    }

    #[test]
    fn every_commented_setting_of_the_installed_config_is_a_real_key() {
        // Uncommented, the examples must still parse: a typo in a key would
        // otherwise only show when a user turns it on.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let parsed: Result<crate::daemon::config::ConfigFile, _> = toml::from_str(&uncommented);
        assert!(parsed.is_ok(), "{parsed:?}\n{uncommented}");
    }

    #[test]
    fn the_units_run_the_installed_binary_with_the_installed_config() {
        assert!(node_unit().contains("ExecStart=/usr/local/bin/ballast node run --config /etc/ballast/ballast.toml"));
        assert!(
            node_unit().contains("ExecReload=/usr/local/bin/ballast node upgrade --config /etc/ballast/ballast.toml")
        );
        assert!(plugin_unit().contains("ExecStart=/usr/local/bin/ballast plugin serve"));
        for unit in [node_unit(), plugin_unit()] {
            for private_mounts in ["PrivateTmp", "ProtectSystem", "ProtectHome", "ProtectKernel"] {
                assert!(
                    !unit.contains(private_mounts),
                    "{private_mounts} would hide the node's mounts from dockerd"
                );
            }
        }
    }
}
