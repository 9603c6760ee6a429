//! Upgrade in place (`ballast node upgrade`): the running node executes a
//! new binary in its own process, handing over what its clients hold.
//!
//! The old program, ordered through the API (`Upgrades`): checks the new
//! binary (`check_binary`: it runs, speaks a peer protocol every member
//! speaks, and reads this hand-over format); tells every member that it
//! upgrades (no failover of its volumes meanwhile, `UPGRADE_WINDOW`);
//! stops reading its FUSE session and its ublk queues and answers every
//! request it read (`attach::HostAttach::hand_over`; ublk devices wait in
//! the kernel for the next program's user recovery); closes NBD, API and peer connections
//! as at a stop but keeps the listening sockets; stops Raft and the engine
//! (final checkpoint); then `execve`s the new binary with the same
//! arguments, the listening sockets, the FUSE session's descriptor, the loop
//! devices' names, the ublk devices' numbers and a descriptor of the old binary in the hand-over record
//! (`Handoff`, in the environment). The process id stays: a supervisor
//! (systemd, the Docker plugin) sees nothing.
//!
//! The new program arms a rollback (`arm_from_env`, first thing in `main`):
//! if it exits or panics before it has taken everything over, it executes
//! the old binary again with the same record (`rolled_back` set), which
//! takes over in its place. A new program killed by a signal cannot roll
//! back. It takes the FUSE session last and disarms at once, so a failure
//! never closes the session's only descriptor.
//!
//! While the programs change, requests of attached devices wait in the
//! kernel (the filesystem above sees a pause, not an error), connections
//! to the listening sockets wait in their backlog, and NBD clients, whose
//! connections closed, reconnect.

use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::attach::AttachHandoff;

/// The environment variable that carries the hand-over record.
pub const ENV: &str = "BALLAST_HANDOFF";
/// The newest hand-over record format (2: ublk devices, `AttachHandoff::ublk`);
/// a record is written in the oldest format that carries it
/// (`AttachHandoff::format`), so a binary reading only 1 can still take over
/// a node without ublk devices. `ballast version --json` says which it reads.
pub const FORMAT: u32 = 2;
/// The formats this build takes over from.
pub const FORMATS_READ: [u32; 2] = [1, 2];
/// How long the other members wait for an upgrading node before they fail
/// its volumes over (it tells them when it is back).
pub const UPGRADE_WINDOW: Duration = Duration::from_secs(60);
/// How long the old program waits for the FUSE requests it read.
pub const DRAIN_ATTACHED: Duration = Duration::from_secs(20);
/// How long `check_binary` lets the new binary answer `version --json`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening sockets handed over (descriptors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    pub api: Option<RawFd>,
    pub nbd: Option<RawFd>,
    pub peer: Option<RawFd>,
}

/// What the old program hands to the new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub format: u32,
    /// Which upgrade this is (`Order::id`).
    pub id: u64,
    /// The version that handed over.
    pub from_version: String,
    /// The binary handed to.
    pub to_binary: PathBuf,
    /// The arguments the node runs with (the new program gets the same).
    pub args: Vec<String>,
    pub listeners: Listeners,
    pub attach: AttachHandoff,
    /// The old binary, open across execve: a failed new one runs it again.
    pub previous_binary_fd: RawFd,
    /// When the old program stopped taking requests (ms since the epoch).
    pub paused_at_unix_ms: u64,
    /// Set when this start is a rollback: why the new program failed.
    #[serde(default)]
    pub rolled_back: Option<String>,
}

/// An upgrade the API ordered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub binary: PathBuf,
    /// The version the new binary reported.
    pub to_version: String,
}

/// How the last upgrade of this node ended (shown by `node status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub id: u64,
    pub from_version: String,
    pub to_version: String,
    pub binary: PathBuf,
    /// "upgraded", "rolled back", or "refused".
    pub outcome: String,
    /// Why it rolled back or was refused.
    #[serde(default)]
    pub reason: Option<String>,
    /// How long attached devices and listeners waited (ms).
    pub paused_ms: u64,
    pub at_unix_ms: u64,
}

/// Upgrades ordered through the API, for the serving loop.
#[derive(Default)]
pub struct Upgrades {
    order: parking_lot::Mutex<Option<Order>>,
    wake: tokio::sync::Notify,
    last: parking_lot::Mutex<Option<UpgradeRecord>>,
}

impl Upgrades {
    /// Orders an upgrade; refused while one is under way.
    pub fn order(&self, order: Order) -> Result<(), String> {
        let mut slot = self.order.lock();
        if let Some(current) = slot.as_ref() {
            return Err(format!(
                "an upgrade to {} is under way already",
                current.binary.display()
            ));
        }
        *slot = Some(order);
        self.wake.notify_one();
        Ok(())
    }

    /// Waits for an order.
    pub async fn ordered(&self) -> Order {
        loop {
            let notified = self.wake.notified();
            if let Some(order) = self.order.lock().clone() {
                return order;
            }
            notified.await;
        }
    }

    /// The order failed before anything was handed over: the node serves on.
    pub fn refused(&self, order: &Order, reason: String) {
        tracing::error!(binary = %order.binary.display(), %reason, "upgrade in place refused; serving on");
        *self.order.lock() = None;
        self.record(UpgradeRecord {
            id: order.id,
            from_version: crate::peer::handshake::local().version.clone(),
            to_version: order.to_version.clone(),
            binary: order.binary.clone(),
            outcome: "refused".into(),
            reason: Some(reason),
            paused_ms: 0,
            at_unix_ms: crate::audit::now_unix_ms(),
        });
    }

    pub fn record(&self, record: UpgradeRecord) {
        *self.last.lock() = Some(record);
    }

    #[must_use]
    pub fn last(&self) -> Option<UpgradeRecord> {
        self.last.lock().clone()
    }
}

/// What `ballast version --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryVersion {
    pub version: String,
    pub peer_protocol_min: u16,
    pub peer_protocol_max: u16,
    /// The hand-over formats it takes over from (`FORMAT`).
    pub handoff_formats: Vec<u32>,
}

impl BinaryVersion {
    /// This program's.
    #[must_use]
    pub fn local() -> Self {
        let speaks = crate::peer::handshake::local();
        Self {
            version: speaks.version.clone(),
            peer_protocol_min: speaks.min,
            peer_protocol_max: speaks.max,
            handoff_formats: FORMATS_READ.to_vec(),
        }
    }
}

/// The binary an upgrade runs when none is named: the file at the path this
/// node was started from (a package manager replaces it there).
pub fn default_binary() -> Result<PathBuf, String> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|error| format!("cannot read /proc/self/exe: {error}"))?;
    let text = exe.to_string_lossy();
    Ok(PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text)))
}

/// Checks that `binary` can take this node over: an executable file that
/// answers `version --json` within `CHECK_TIMEOUT`, reads hand-over format
/// `format` (`HostAttach::handoff_format`), and speaks a peer protocol with
/// each of `members` (their versions and protocol ranges; unknown members
/// are skipped).
pub fn check_binary(
    binary: &Path,
    format: u32,
    members: &[crate::peer::handshake::Speaks],
) -> Result<BinaryVersion, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(binary).map_err(|error| format!("new binary {}: {error}", binary.display()))?;
    if !metadata.is_file() {
        return Err(format!("new binary {} is not a file", binary.display()));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "new binary {} is not executable (chmod +x it)",
            binary.display()
        ));
    }
    let mut child = std::process::Command::new(binary)
        .args(["version", "--json"])
        .env_remove(ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run the new binary {}: {error}", binary.display()))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new binary {} did not answer `version --json` within {CHECK_TIMEOUT:?}",
                    binary.display()
                ));
            }
            Err(error) => return Err(format!("waiting for the new binary: {error}")),
        }
    };
    let output = child
        .wait_with_output()
        .map_err(|error| format!("reading the new binary's answer: {error}"))?;
    if !status.success() {
        return Err(format!(
            "the new binary {} failed `version --json` ({status}): {}; a ballast from before upgrades in place cannot take a running node over",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let new: BinaryVersion = serde_json::from_slice(&output.stdout).map_err(|error| {
        format!(
            "the new binary {} answered `version --json` with something else ({error}): is it ballast?",
            binary.display()
        )
    })?;
    if !new.handoff_formats.contains(&format) {
        let why = if format >= 2 {
            " (format 2 carries ublk devices: detach them first, or stop this node and start the new binary)"
        } else {
            ": stop this node and start the new binary instead"
        };
        return Err(format!(
            "ballast {} cannot take over from this node (it reads hand-over formats {:?}, this node writes {format}){why}",
            new.version, new.handoff_formats
        ));
    }
    let speaks =
        crate::peer::handshake::Speaks::new_local(new.version.clone(), new.peer_protocol_min, new.peer_protocol_max);
    for member in members {
        crate::peer::handshake::negotiate(member, &speaks).map_err(|error| {
            format!(
                "ballast {} cannot work with a member of this cluster: {error}",
                new.version
            )
        })?;
    }
    Ok(new)
}

/// Descriptors of the listening sockets, kept for a hand-over (closed
/// unless one happens).
pub struct KeptListeners {
    api: OwnedFd,
    nbd: OwnedFd,
    peer: OwnedFd,
}

impl KeptListeners {
    /// Duplicates of the three listeners' descriptors.
    pub fn keep(api: &impl AsFd, nbd: &impl AsFd, peer: &impl AsFd) -> std::io::Result<Self> {
        Ok(Self {
            api: api.as_fd().try_clone_to_owned()?,
            nbd: nbd.as_fd().try_clone_to_owned()?,
            peer: peer.as_fd().try_clone_to_owned()?,
        })
    }

    fn inherit(self) -> std::io::Result<Listeners> {
        let inherit = |fd: OwnedFd| -> std::io::Result<RawFd> {
            let raw = fd.into_raw_fd();
            kernel_iface::process::keep_across_exec(raw)?;
            Ok(raw)
        };
        Ok(Listeners {
            api: Some(inherit(self.api)?),
            nbd: Some(inherit(self.nbd)?),
            peer: Some(inherit(self.peer)?),
        })
    }
}

/// Executes `order`'s binary in this process with what is handed over;
/// returns only if that failed, after trying to run the old binary again
/// (the error says what happened).
pub fn exec_new(
    order: &Order,
    listeners: KeptListeners,
    attach: AttachHandoff,
    previous_binary: OwnedFd,
    paused_at: u64,
) -> String {
    let listeners = match listeners.inherit() {
        Ok(listeners) => listeners,
        Err(error) => return format!("cannot keep the listening sockets across execve: {error}"),
    };
    let previous_binary_fd = previous_binary.into_raw_fd();
    if let Err(error) = kernel_iface::process::keep_across_exec(previous_binary_fd) {
        return format!("cannot keep the old binary open across execve: {error}");
    }
    let handoff = Handoff {
        format: attach.format(),
        id: order.id,
        from_version: crate::peer::handshake::local().version.clone(),
        to_binary: order.binary.clone(),
        args: std::env::args().collect(),
        listeners,
        attach,
        previous_binary_fd,
        paused_at_unix_ms: paused_at,
        rolled_back: None,
    };
    tracing::info!(binary = %order.binary.display(), version = %order.to_version, "executing the new binary");
    let error = exec(&order.binary, &handoff);
    let reason = format!("cannot execute {}: {error}", order.binary.display());
    tracing::error!(%reason, "running the old binary again");
    let error = roll_back_with(handoff, &reason);
    format!("{reason}; and the old binary could not run again either: {error}")
}

/// Replaces this program with `binary` and `handoff` (returns only on failure).
fn exec(binary: &Path, handoff: &Handoff) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let record = match serde_json::to_string(handoff) {
        Ok(record) => record,
        Err(error) => return std::io::Error::other(error),
    };
    std::process::Command::new(binary)
        .arg0(handoff.args.first().map_or("ballast", String::as_str))
        .args(handoff.args.iter().skip(1))
        .env(ENV, record)
        .exec()
}

/// Runs the old binary again with `handoff` (marked rolled back).
fn roll_back_with(mut handoff: Handoff, reason: &str) -> std::io::Error {
    handoff.rolled_back = Some(reason.to_owned());
    for fd in [handoff.listeners.api, handoff.listeners.nbd, handoff.listeners.peer]
        .into_iter()
        .flatten()
        .chain(handoff.attach.session.as_ref().map(|session| session.fd))
        .chain([handoff.previous_binary_fd])
    {
        let _ = kernel_iface::process::keep_across_exec(fd);
    }
    let previous = PathBuf::from(format!("/proc/self/fd/{}", handoff.previous_binary_fd));
    exec(&previous, &handoff)
}

/// The hand-over this program started with, until it disarms.
static ARMED: parking_lot::Mutex<Option<Handoff>> = parking_lot::const_mutex(None);
/// The hand-over this program started with (kept after disarming).
static STARTED_WITH: std::sync::OnceLock<Handoff> = std::sync::OnceLock::new();

/// Reads the hand-over record, if this program was started by an upgrade in
/// place, and arms the rollback: call first thing in `main`.
pub fn arm_from_env() {
    let Ok(text) = std::env::var(ENV) else {
        return;
    };
    std::env::remove_var(ENV);
    let handoff: Handoff = match serde_json::from_str(&text) {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("ballast: cannot read the hand-over record of an upgrade in place ({error}); running the previous binary again");
            if let Some(fd) = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|value| value.get("previous_binary_fd")?.as_i64())
                .and_then(|fd| RawFd::try_from(fd).ok())
            {
                use std::os::unix::process::CommandExt;
                let error = std::process::Command::new(format!("/proc/self/fd/{fd}"))
                    .args(std::env::args().skip(1))
                    .env(ENV, text)
                    .exec();
                eprintln!("ballast: cannot run the previous binary again: {error}");
            }
            return;
        }
    };
    let _ = STARTED_WITH.set(handoff.clone());
    *ARMED.lock() = Some(handoff);
    if let Err(error) = kernel_iface::process::at_exit(roll_back_at_exit) {
        eprintln!("ballast: {error}: a failed upgrade will not roll back on exit");
    }
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous_hook(info);
        roll_back(&format!("the new binary panicked: {info}"));
    }));
}

extern "C" fn roll_back_at_exit() {
    roll_back("the new binary exited before it had taken the node over");
}

/// Runs the old binary again if this program is an armed hand-over (see
/// `arm_from_env`); returns if it is not, or that failed.
pub fn roll_back(reason: &str) {
    let armed = ARMED.lock().take();
    let Some(handoff) = armed else {
        return;
    };
    if handoff.rolled_back.is_some() {
        // The old binary failed to take over again: nothing older to run.
        eprintln!("ballast: the previous binary could not take the node over again either ({reason})");
        return;
    }
    eprintln!("ballast: upgrade in place failed: {reason}; running the previous binary again");
    let error = roll_back_with(handoff, reason);
    eprintln!("ballast: cannot run the previous binary again: {error}");
}

/// The hand-over this program started with, if any.
#[must_use]
pub fn inherited() -> Option<&'static Handoff> {
    STARTED_WITH.get()
}

/// Everything is taken over: a failure from now on is this program's own
/// (no rollback). Closes the old binary's descriptor and returns what to
/// show of the upgrade.
pub fn disarm() -> Option<UpgradeRecord> {
    let handoff = ARMED.lock().take()?;
    let _ = kernel_iface::process::close_inherited(handoff.previous_binary_fd);
    let now = crate::audit::now_unix_ms();
    let paused_ms = now.saturating_sub(handoff.paused_at_unix_ms);
    let record = UpgradeRecord {
        id: handoff.id,
        from_version: handoff.from_version.clone(),
        to_version: crate::peer::handshake::local().version.clone(),
        binary: handoff.to_binary.clone(),
        outcome: if handoff.rolled_back.is_some() {
            "rolled back".into()
        } else {
            "upgraded".into()
        },
        reason: handoff.rolled_back.clone(),
        paused_ms,
        at_unix_ms: now,
    };
    match &record.reason {
        Some(reason) => {
            tracing::error!(%reason, version = %record.to_version, paused_ms, "upgrade in place failed; the previous binary took the node back")
        }
        None => tracing::info!(from = %record.from_version, to = %record.to_version, paused_ms, "upgraded in place"),
    }
    Some(record)
}

/// Opens the binary this process runs, for a rollback after execve.
pub fn open_running_binary() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/proc/self/exe")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary that answers `version --json` as a build reading `formats`.
    fn binary_reading(directory: &Path, formats: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let local = BinaryVersion::local();
        let path = directory.join(format!("ballast-{}", formats.replace(',', "-")));
        let answer = format!(
            r#"{{"version":"9.9.9","peer_protocol_min":{},"peer_protocol_max":{},"handoff_formats":[{formats}]}}"#,
            local.peer_protocol_min, local.peer_protocol_max
        );
        std::fs::write(&path, format!("#!/bin/sh\necho '{answer}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_binary_that_reads_only_format_1_cannot_take_ublk_devices_over() {
        let directory = tempfile::tempdir().unwrap();
        let old = binary_reading(directory.path(), "1");
        assert_eq!(check_binary(&old, 1, &[]).unwrap().version, "9.9.9");
        let error = check_binary(&old, 2, &[]).unwrap_err();
        assert!(error.contains("writes 2") && error.contains("ublk"), "{error}");
        let new = binary_reading(directory.path(), "1,2");
        assert!(check_binary(&new, 2, &[]).is_ok());
        assert_eq!(BinaryVersion::local().handoff_formats, FORMATS_READ);
        assert!(FORMATS_READ.contains(&FORMAT));
    }
}
