//! `ballast cluster upgrade-status`: which ballast each node runs, which
//! peer protocol versions it speaks, and whether the cluster is in the
//! middle of a rolling upgrade (and which nodes are still to do).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use crate::cluster::status::ClusterStatus;
use crate::peer::handshake::{range_text, reported_range};

/// One node as the upgrade sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeVersion {
    pub id: u64,
    pub name: String,
    pub up: bool,
    /// None: the node never answered (or is down), so its version is unknown.
    pub version: Option<String>,
    pub protocol_min: u16,
    pub protocol_max: u16,
}

/// Where a rolling upgrade stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpgradeStatus {
    pub nodes: Vec<NodeVersion>,
    /// Version -> the nodes that run it.
    pub versions: BTreeMap<String, Vec<u64>>,
    /// The newest version any node runs (by peer protocol, then by number).
    pub newest: Option<String>,
    /// Nodes that answer and do not run `newest` yet.
    pub behind: Vec<u64>,
    /// Nodes whose version is not known (down, or never answered).
    pub unknown: Vec<u64>,
    /// The highest peer protocol version every known node speaks (None:
    /// some of them have none in common and cannot work together).
    pub common_protocol: Option<u16>,
}

/// Numeric parts of a version, for ordering ("0.10.0" after "0.9.1").
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().unwrap_or(u64::MAX))
        .collect()
}

#[must_use]
pub fn upgrade_status(status: &ClusterStatus) -> UpgradeStatus {
    let nodes: Vec<NodeVersion> = status
        .nodes
        .iter()
        .map(|node| {
            let known = node.up && !node.version.is_empty();
            // A node whose API predates ranges reports none: read as such.
            let (protocol_min, protocol_max) = if known {
                reported_range(node.protocol_min, node.protocol_max)
            } else {
                (0, 0)
            };
            NodeVersion {
                id: node.id,
                name: node.name.clone(),
                up: node.up,
                version: known.then(|| node.version.clone()),
                protocol_min,
                protocol_max,
            }
        })
        .collect();
    let known: Vec<&NodeVersion> = nodes.iter().filter(|node| node.version.is_some()).collect();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for node in &known {
        versions
            .entry(node.version.clone().unwrap_or_default())
            .or_default()
            .push(node.id);
    }
    let newest = known
        .iter()
        .max_by_key(|node| (node.protocol_max, version_key(node.version.as_deref().unwrap_or(""))))
        .and_then(|node| node.version.clone());
    let behind = known
        .iter()
        .filter(|node| node.version != newest)
        .map(|node| node.id)
        .collect();
    let unknown = nodes
        .iter()
        .filter(|node| node.version.is_none())
        .map(|node| node.id)
        .collect();
    let low = known.iter().map(|node| node.protocol_min).max();
    let high = known.iter().map(|node| node.protocol_max).min();
    let common_protocol = match (low, high) {
        (Some(low), Some(high)) if low <= high => Some(high),
        _ => None,
    };
    UpgradeStatus {
        nodes,
        versions,
        newest,
        behind,
        unknown,
        common_protocol,
    }
}

fn ids(list: &[u64]) -> String {
    list.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// Prints it; exit 1 when the known nodes have no peer protocol in common
/// (some of them cannot talk to each other), else 0.
pub fn print(status: &ClusterStatus, json: bool) -> Result<ExitCode> {
    let view = upgrade_status(status);
    let compatible = view.common_protocol.is_some() || view.versions.is_empty();
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!(
            "{:<6} {:<16} {:<6} {:<16} PEER PROTOCOL",
            "NODE", "NAME", "STATE", "VERSION"
        );
        for node in &view.nodes {
            let mark = if node.id == status.this_node { "*" } else { "" };
            println!(
                "{:<6} {:<16} {:<6} {:<16} {}",
                format!("{}{mark}", node.id),
                node.name,
                if node.up { "up" } else { "DOWN" },
                node.version.as_deref().unwrap_or("unknown"),
                if node.version.is_some() {
                    range_text(node.protocol_min, node.protocol_max)
                } else {
                    "-".to_owned()
                }
            );
        }
        println!();
        let newest = view.newest.as_deref().unwrap_or("unknown");
        match view.versions.len() {
            0 => println!("no node answered: versions unknown"),
            1 => println!("every node that answers runs ballast {newest}: no upgrade under way"),
            _ => println!(
                "upgrade under way: {} of {} node(s) run ballast {newest}; still to upgrade: node(s) {}",
                view.versions.get(newest).map_or(0, Vec::len),
                view.nodes.len(),
                ids(&view.behind)
            ),
        }
        if !view.unknown.is_empty() {
            println!(
                "node(s) {} do not answer: their version is unknown (a node being upgraded is down for a moment)",
                ids(&view.unknown)
            );
        }
        match view.common_protocol {
            Some(protocol) => println!("peer protocol in common: {protocol} (the nodes work together)"),
            None if compatible => {}
            None => println!(
                "NO PEER PROTOCOL IN COMMON: some of these nodes refuse each other; upgrade one release at a time \
                 (nodes one release apart work together)"
            ),
        }
    }
    Ok(if compatible {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::status::NodeView;

    fn node(id: u64, up: bool, version: &str, min: u16, max: u16) -> NodeView {
        let mut view: NodeView = serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("n{id}"), "role": "voter", "admin": "active", "up": up,
            "last_answer_ms": null, "last_error": null, "capacity_bytes": 0, "used_bytes": 0,
            "replicas": 0, "peer_address": "", "api_address": "", "nbd_address": "", "labels": {},
        }))
        .expect("a node view");
        view.version = version.to_owned();
        view.protocol_min = min;
        view.protocol_max = max;
        view
    }

    fn status(nodes: Vec<NodeView>) -> ClusterStatus {
        let mut status: ClusterStatus = serde_json::from_value(serde_json::json!({
            "cluster_id": null, "this_node": 1, "leader": 1, "term": 1, "last_applied_index": 1,
            "nodes": [], "volumes": [],
        }))
        .expect("a status");
        status.nodes = nodes;
        status
    }

    #[test]
    fn a_cluster_half_upgraded_names_the_newest_release_and_the_nodes_still_to_do() {
        let view = upgrade_status(&status(vec![
            node(1, true, "0.1.0", 1, 1),
            node(2, true, "0.2.0", 1, 2),
            node(3, false, "", 0, 0),
        ]));
        assert_eq!(view.newest.as_deref(), Some("0.2.0"));
        assert_eq!(view.behind, vec![1]);
        assert_eq!(view.unknown, vec![3]);
        assert_eq!(view.common_protocol, Some(1));
        assert_eq!(view.versions.len(), 2);
    }

    #[test]
    fn nodes_with_no_protocol_in_common_are_reported() {
        let view = upgrade_status(&status(vec![
            node(1, true, "0.1.0", 1, 1),
            node(2, true, "0.3.0", 2, 3),
        ]));
        assert_eq!(view.common_protocol, None);
        let view = upgrade_status(&status(vec![
            node(1, true, "0.9.0", 1, 1),
            node(2, true, "0.10.0", 1, 1),
        ]));
        assert_eq!(view.newest.as_deref(), Some("0.10.0"), "by number, not by text");
        assert_eq!(view.common_protocol, Some(1));
    }

    #[test]
    fn a_report_from_a_build_before_protocol_ranges_counts_as_version_one() {
        let view = upgrade_status(&status(vec![node(1, true, "0.1.0", 0, 0)]));
        assert_eq!((view.nodes[0].protocol_min, view.nodes[0].protocol_max), (1, 1));
        assert_eq!(view.common_protocol, Some(1));
    }
}
