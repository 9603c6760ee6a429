//! `ballast cluster init | token create | join | status | upgrade-status`
//! and `ballast status`: clients of the local node's API.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::api::client::{ApiClient, DEFAULT_API_URL};
use crate::api::{JoinBody, TokenBody};
use crate::cluster::join::NewToken;
use crate::cluster::status::ClusterStatus;
use crate::size::format_size;

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// The node API to talk to.
    #[arg(long, global = true, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
    pub api: String,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a new cluster with this node as its first member (Raft leader).
    Init {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Join the cluster of TOKEN through ADDRESS, the peer address (HOST:PORT, default port 9411) of any member.
    Join {
        address: String,
        /// A token from `ballast cluster token create` on a member (visible
        /// in the process list: prefer --token-file or BALLAST_JOIN_TOKEN).
        #[arg(long, env = "BALLAST_JOIN_TOKEN", required_unless_present = "token_file")]
        token: Option<String>,
        /// A file holding the join token.
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Renew node certificates (peer mutual TLS) from the cluster CA, without
    /// downtime: new peer connections use the new certificate at once.
    RotateCerts {
        /// Every member (through each one's API), not only the --api node.
        #[arg(long)]
        all: bool,
    },
    /// Nodes (role, health, space) and volumes (replicas, health).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Where a rolling upgrade stands: each node's ballast version and peer
    /// protocol versions, the nodes still to upgrade, and the protocol version
    /// they all speak. Upgrade one node at a time, one release at a time
    /// (nodes one release apart work together). Exits 1 when some nodes have
    /// no peer protocol in common (they refuse each other).
    UpgradeStatus {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new join token (only its hash is stored in the cluster).
    Create {
        /// How long it stays valid: seconds, or with s/m/h/d (max 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Parses a lifetime like `90`, `90s`, `30m`, `1h`, `2d` into seconds.
pub fn parse_ttl(text: &str) -> Result<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .with_context(|| format!("bad lifetime {text:?}: use e.g. 90s, 30m, 1h, 2d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad lifetime {text:?}: the unit must be s, m, h or d"),
    };
    number.checked_mul(scale).context("lifetime too long")
}

/// Runs a cluster command.
pub fn run(args: ClusterArgs) -> Result<ExitCode> {
    let client = ApiClient::new(&args.api);
    match args.command {
        ClusterCommand::Init { json } => {
            let status: ClusterStatus = client.post("/v1/cluster/init", &serde_json::json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let id = status.cluster_id.map(|id| id.to_string()).unwrap_or_default();
                println!(
                    "initialized cluster {id} with node {} as its first member",
                    status.this_node
                );
                println!("next: `ballast cluster token create` here, then `ballast cluster join <this node's peer address> --token <token>` on each other node");
            }
        }
        ClusterCommand::Token(TokenCommand::Create { ttl, json }) => {
            let body = TokenBody {
                ttl_seconds: parse_ttl(&ttl)?,
            };
            let token: NewToken = client.post("/v1/cluster/tokens", &body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&token)?);
            } else {
                println!("{}", token.token);
            }
        }
        ClusterCommand::Join {
            address,
            token,
            token_file,
            json,
        } => {
            let token = match (token, token_file) {
                (Some(token), _) => token,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the join token from {}", path.display()))?
                    .trim()
                    .to_owned(),
                (None, None) => bail!("give the join token with --token-file PATH or BALLAST_JOIN_TOKEN"),
            };
            let address = if address.contains(':') {
                address
            } else {
                format!("{address}:9411")
            };
            let status: ClusterStatus = client.post("/v1/cluster/join", &JoinBody { address, token })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let id = status.cluster_id.map(|id| id.to_string()).unwrap_or_default();
                println!("node {} joined cluster {id}", status.this_node);
            }
        }
        ClusterCommand::RotateCerts { all } => {
            let targets: Vec<(String, String)> = if all {
                let status: ClusterStatus = client.get("/v1/cluster")?;
                status
                    .nodes
                    .iter()
                    .map(|node| (node.id.to_string(), format!("http://{}", node.api_address)))
                    .collect()
            } else {
                vec![("this node".to_owned(), args.api.clone())]
            };
            let mut failures = 0;
            for (who, api) in targets {
                match ApiClient::new(&api)
                    .post::<_, serde_json::Value>("/v1/cluster/rotate-certs", &serde_json::json!({}))
                {
                    Ok(answer) => println!(
                        "node {}: new certificate (cluster CA {})",
                        answer["node"],
                        answer["ca_fingerprint"].as_str().unwrap_or_default()
                    ),
                    Err(error) => {
                        eprintln!("node {who}: {error}");
                        failures += 1;
                    }
                }
            }
            if failures > 0 {
                bail!("{failures} node(s) kept their old certificate");
            }
        }
        ClusterCommand::Status { json } => {
            let status: ClusterStatus = client.get("/v1/cluster")?;
            print_status(&status, json, Style::for_stdout())?;
            return Ok(status_exit(&status));
        }
        ClusterCommand::UpgradeStatus { json } => {
            let status: ClusterStatus = client.get("/v1/cluster")?;
            return super::upgrade::print(&status, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ballast status`.
pub fn status(api: &str, json: bool, watch: Option<u64>) -> Result<ExitCode> {
    let client = ApiClient::new(api);
    let Some(every) = watch else {
        let status: ClusterStatus = client.get("/v1/cluster")?;
        print_status(&status, json, Style::for_stdout())?;
        return Ok(status_exit(&status));
    };
    let every = std::time::Duration::from_secs(every.max(1));
    loop {
        let shown = client.get::<ClusterStatus>("/v1/cluster");
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H");
        match shown {
            Ok(status) => print_status(&status, json, Style::for_stdout())?,
            Err(error) => println!("error: {error} (retrying every {}s)", every.as_secs()),
        }
        println!("\n(refreshing every {}s; Ctrl-C to stop)", every.as_secs());
        std::thread::sleep(every);
    }
}

/// `status`'s exit code: 1 for a node outside any cluster (nothing it
/// could hold is safe yet; scripts waiting for a cluster see it), else 0.
fn status_exit(status: &ClusterStatus) -> ExitCode {
    if status.cluster_id.is_none() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Colour on a terminal, plain text otherwise (or with NO_COLOR set).
#[derive(Clone, Copy)]
struct Style {
    colour: bool,
}

impl Style {
    fn for_stdout() -> Self {
        Self {
            colour: std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(self, text: &str, code: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Pads first (so columns line up), then colours.
    fn cell(self, text: &str, width: usize, code: &str) -> String {
        self.paint(&format!("{text:<width$}"), code)
    }
}

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31;1";
const PLAIN: &str = "0";

fn health_colour(health: &str) -> &'static str {
    match health {
        "healthy" | "up" => GREEN,
        "degraded" => YELLOW,
        _ => RED,
    }
}

fn format_seconds(seconds: u64) -> String {
    match seconds {
        0..=99 => format!("{seconds}s"),
        100..=5999 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60),
    }
}

fn print_status(status: &ClusterStatus, json: bool, style: Style) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    let Some(cluster_id) = status.cluster_id else {
        println!(
            "node {} is not in a cluster: run `ballast cluster init` (first node) or `ballast cluster join` (others)",
            status.this_node
        );
        return Ok(());
    };
    let leader = status
        .leader
        .map_or_else(|| style.paint("none (no quorum?)", RED), |id| id.to_string());
    let down = status.nodes.iter().filter(|node| !node.up).count();
    let unhealthy = status.volumes.iter().filter(|v| v.health != "healthy").count();
    let verdict = if status.leader.is_none() || status.volumes.iter().any(|v| v.health == "unavailable") {
        style.paint("DATA AT RISK OR UNREACHABLE", RED)
    } else if down > 0 || unhealthy > 0 {
        style.paint("DEGRADED (data safe on the in-sync replicas)", YELLOW)
    } else {
        style.paint("HEALTHY", GREEN)
    };
    println!("cluster {cluster_id}  {verdict}");
    println!(
        "leader {leader}  term {}  applied {}  (as seen by node {})",
        status.term, status.last_applied_index, status.this_node
    );
    println!();
    println!(
        "{:<12} {:<14} {:<8} {:<6} {:<12} {:>9} {:>9} {:>5} {:>5} {:<8} {:>6}  LABELS",
        "NODE", "NAME", "ROLE", "STATE", "ADMIN", "USED", "CAPACITY", "DISKS", "REPL", "VERSION", "CORES"
    );
    for node in &status.nodes {
        let mark = if node.id == status.this_node { "*" } else { "" };
        let labels: Vec<String> = node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let state = if node.up { "up" } else { "DOWN" };
        let failed = node.disks.iter().filter(|d| d.failed).count();
        let disks = if failed > 0 {
            style.paint(&format!("{}!{failed}", node.disks.len()), RED)
        } else {
            node.disks.len().to_string()
        };
        println!(
            "{:<12} {:<14} {:<8} {} {:<12} {:>9} {:>9} {:>5} {:>5} {:<8} {:>6}  {}",
            format!("{}{mark}", node.id),
            node.name,
            node.role,
            style.cell(state, 6, health_colour(state)),
            format!("{:?}", node.admin).to_lowercase(),
            format_size(node.used_bytes),
            format_size(node.capacity_bytes),
            disks,
            node.replicas,
            node.version,
            node.cores,
            labels.join(",")
        );
        if !node.up {
            let seen = node.last_answer_ms.map_or_else(
                || "never answered".to_owned(),
                |ms| format!("last answered {} ago", format_seconds(ms / 1000)),
            );
            let why = node.last_error.as_deref().unwrap_or("no answer");
            println!("{:<12} {}", "", style.paint(&format!("{seen}: {why}"), RED));
        }
    }
    println!();
    if status.volumes.is_empty() {
        println!("no volumes");
    } else {
        println!(
            "{:<20} {:>9} {:>9} {:<11} {:>5} {:<22} {:<24} {:<18} RESYNC / SCRUB",
            "VOLUME", "SIZE", "USED", "HEALTH", "REPL", "ATTACHED (NBD)", "REPLICAS", "IO"
        );
        for volume in &status.volumes {
            let replicas: Vec<String> = volume
                .replica_nodes
                .iter()
                .map(|id| {
                    if volume.in_sync.contains(id) {
                        id.to_string()
                    } else {
                        format!("{id}(stale)")
                    }
                })
                .collect();
            let attached = format!(
                "{}@{} x{}",
                volume.coordinator,
                volume.nbd_address.rsplit(':').next().unwrap_or_default(),
                volume.connections
            );
            let resync: Vec<String> = volume
                .resyncs
                .iter()
                .filter(|r| r.state == "running")
                .map(|r| {
                    let percent = ((r.copied_bytes + r.zeroed_bytes) * 100)
                        .checked_div(r.dirty_bytes)
                        .unwrap_or(100);
                    let eta = r
                        .eta_seconds()
                        .map_or_else(|| "ETA ?".to_owned(), |s| format!("ETA {}", format_seconds(s)));
                    format!("->{} {} {percent}% {eta}", r.node, r.mode)
                })
                .collect();
            let mut resync = resync;
            if let Some(scrub) = &volume.scrub {
                let found = scrub.checksum_errors + scrub.divergent_blocks + scrub.unrepairable_blocks;
                if scrub.state == "running" && scrub.mode == "verify" {
                    let percent = (scrub.scanned_bytes * 100).checked_div(scrub.size_bytes).unwrap_or(100);
                    resync.push(format!("scrub {percent}%"));
                } else if found > 0 {
                    resync.push(format!(
                        "scrub: {} bad, {} diverged, {} repaired, {} unrepairable",
                        scrub.checksum_errors, scrub.divergent_blocks, scrub.repaired_blocks, scrub.unrepairable_blocks
                    ));
                }
            }
            let mut io = vec![volume.io_priority.as_str().to_owned()];
            io.extend(volume.iops_limit.map(|iops| format!("{iops}iops")));
            io.extend(volume.mib_per_s_limit.map(|mib| format!("{mib}MiB/s")));
            println!(
                "{:<20} {:>9} {:>9} {} {:>5} {:<22} {:<24} {:<18} {}",
                volume.name,
                format_size(volume.size_bytes),
                format_size(volume.used_bytes),
                style.cell(&volume.health, 11, health_colour(&volume.health)),
                format!("{}/{}", volume.in_sync.len(), volume.replicas),
                attached,
                replicas.join(","),
                io.join(" "),
                if resync.is_empty() {
                    "-".to_owned()
                } else {
                    resync.join(" ")
                }
            );
        }
    }
    println!();
    print_alerts(&status.alerts, false, style);
    Ok(())
}

/// `ballast auth token create`.
pub fn create_api_token(api: &str, subject: &str, role: &str, groups: &[String], ttl: &str) -> Result<ExitCode> {
    let role = if role == "admin" {
        crate::api::auth::Role::Admin
    } else {
        crate::api::auth::Role::User
    };
    let body = crate::api::ApiTokenBody {
        subject: subject.to_owned(),
        role,
        ttl_seconds: parse_ttl(ttl)?,
        groups: groups.to_vec(),
    };
    let answer: serde_json::Value = ApiClient::new(api).post("/v1/auth/tokens", &body)?;
    println!("{}", answer["token"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

/// `ballast auth cert create`: a client certificate for NBD over TLS, in the
/// files libnbd's `tls-certificates=DIR` reads.
pub fn create_client_cert(
    api: &str,
    subject: &str,
    role: &str,
    groups: &[String],
    ttl: &str,
    out: &std::path::Path,
) -> Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let role = if role == "admin" {
        crate::api::auth::Role::Admin
    } else {
        crate::api::auth::Role::User
    };
    let body = crate::api::ClientCertBody {
        subject: subject.to_owned(),
        role,
        ttl_seconds: parse_ttl(ttl)?,
        groups: groups.to_vec(),
    };
    let cert: crate::api::ClientCert = ApiClient::new(api).post("/v1/auth/certs", &body)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("cannot make {}", out.display()))?;
    for (name, text) in [
        ("ca-cert.pem", &cert.ca_pem),
        ("client-cert.pem", &cert.cert_pem),
        ("client-key.pem", &cert.key_pem),
    ] {
        let path = out.join(name);
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    println!(
        "client certificate for {subject} in {} (valid {} more days); use it with nbds://HOST:PORT/VOLUME?tls-certificates={}",
        out.display(),
        cert.expires_unix.saturating_sub(crate::datadir::now_unix_seconds()) / 86_400,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `ballast alerts`: what needs attention, and what did.
pub fn alerts(api: &str, all: bool, json: bool) -> Result<ExitCode> {
    let path = if all {
        "/v1/alerts?all=true"
    } else {
        "/v1/alerts?all=false"
    };
    let alerts: Vec<crate::cluster::alerts::Alert> = ApiClient::new(api).get(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&alerts)?);
    } else {
        print_alerts(&alerts, all, Style::for_stdout());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_alerts(alerts: &[crate::cluster::alerts::Alert], all: bool, style: Style) {
    if alerts.is_empty() {
        println!("{}", if all { "no alerts recorded" } else { "no active alerts" });
        return;
    }
    let now = crate::datadir::now_unix_seconds();
    let ago = |unix: u64| format_age(now.saturating_sub(unix));
    println!(
        "{:<9} {:<8} {:<28} {:>9} {:>9}  MESSAGE",
        "STATE", "SEVERITY", "ALERT", "SINCE", "LAST"
    );
    for alert in alerts {
        let state = match alert.cleared_unix {
            None => {
                let code = match alert.severity {
                    crate::cluster::alerts::Severity::Critical => RED,
                    crate::cluster::alerts::Severity::Warning => YELLOW,
                };
                style.cell("ACTIVE", 9, code)
            }
            Some(at) => style.cell(&format!("cleared {}", ago(at)), 9, PLAIN),
        };
        println!(
            "{} {:<8} {:<28} {:>9} {:>9}  {}",
            state,
            format!("{:?}", alert.severity).to_lowercase(),
            alert.key,
            ago(alert.first_seen_unix),
            ago(alert.last_seen_unix),
            alert.message
        );
    }
}

/// "42s ago", "5m ago", "3h ago", "2d ago".
pub(crate) fn format_age(seconds: u64) -> String {
    match seconds {
        0..=119 => format!("{seconds}s ago"),
        120..=7199 => format!("{}m ago", seconds / 60),
        7200..=172_799 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_take_units() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("2d").unwrap(), 172_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
