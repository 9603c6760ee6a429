//! `ballast cluster init | token create | join | status` and `ballast
//! status`: clients of the local node's API.

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
        /// A token from `ballast cluster token create` on a member.
        #[arg(long, env = "BALLAST_JOIN_TOKEN")]
        token: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Nodes (role, health, space) and volumes (replicas, health).
    Status {
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
        ClusterCommand::Join { address, token, json } => {
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
        ClusterCommand::Status { json } => {
            let status: ClusterStatus = client.get("/v1/cluster")?;
            print_status(&status, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ballast status`.
pub fn status(api: &str, json: bool) -> Result<ExitCode> {
    let status: ClusterStatus = ApiClient::new(api).get("/v1/cluster")?;
    print_status(&status, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(status: &ClusterStatus, json: bool) -> Result<()> {
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
        .map_or_else(|| "none (no quorum?)".to_owned(), |id| id.to_string());
    println!(
        "cluster {cluster_id}  leader {leader}  term {}  (as seen by node {})",
        status.term, status.this_node
    );
    println!();
    println!(
        "{:<20} {:<16} {:<8} {:<6} {:<12} {:>10} {:>10} {:>5}  LABELS",
        "NODE", "NAME", "ROLE", "STATE", "ADMIN", "USED", "CAPACITY", "REPL"
    );
    for node in &status.nodes {
        let mark = if node.id == status.this_node { "*" } else { "" };
        let labels: Vec<String> = node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<20} {:<16} {:<8} {:<6} {:<12} {:>10} {:>10} {:>5}  {}",
            format!("{}{mark}", node.id),
            node.name,
            node.role,
            if node.up { "up" } else { "DOWN" },
            format!("{:?}", node.admin).to_lowercase(),
            format_size(node.used_bytes),
            format_size(node.capacity_bytes),
            node.replicas,
            labels.join(",")
        );
    }
    println!();
    if status.volumes.is_empty() {
        println!("no volumes");
        return Ok(());
    }
    println!(
        "{:<24} {:>10} {:>5} {:<12} {:<20} REPLICAS",
        "VOLUME", "SIZE", "EPOCH", "HEALTH", "COORDINATOR"
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
        println!(
            "{:<24} {:>10} {:>5} {:<12} {:<20} {} ({}/{} up)",
            volume.name,
            format_size(volume.size_bytes),
            volume.epoch,
            volume.health,
            volume.coordinator,
            replicas.join(","),
            volume.replicas_up,
            volume.replica_nodes.len()
        );
    }
    println!();
    print_alerts(&status.alerts, false);
    Ok(())
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
        print_alerts(&alerts, all);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_alerts(alerts: &[crate::cluster::alerts::Alert], all: bool) {
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
            None => "ACTIVE".to_owned(),
            Some(at) => format!("cleared {}", ago(at)),
        };
        println!(
            "{:<9} {:<8} {:<28} {:>9} {:>9}  {}",
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
fn format_age(seconds: u64) -> String {
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
