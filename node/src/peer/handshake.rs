//! The peer handshake: the dialer says who it is, which cluster it believes
//! it belongs to, which ballast it runs and which peer protocol versions it
//! speaks; the listener refuses another cluster, a dialer with no protocol
//! version in common (the error names both ballast versions and both
//! ranges), or a clusterless dialer asking for anything but to join; else
//! it answers with the highest version both speak.
//!
//! Rolling upgrades: a build speaks a range of protocol versions
//! (`PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION`). A release that changes the
//! protocol raises the maximum and keeps the previous version for one
//! release, so nodes one release apart work together while a cluster is
//! upgraded node by node; `ballast cluster upgrade-status` shows where an
//! upgrade stands. The same rule binds Raft: a release that adds a
//! `Command` (or a field an older build would refuse) must not propose it
//! before every member speaks the protocol version that brought it (the
//! common version `upgrade-status` shows), or an older follower could not
//! read the log entry.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// First frame of a connection (JSON payload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The highest protocol version the dialer speaks.
    pub protocol_version: u16,
    /// The lowest (absent from builds that spoke only one version).
    #[serde(default)]
    pub min_protocol_version: Option<u16>,
    /// The dialer's ballast version (absent from older builds).
    #[serde(default)]
    pub version: Option<String>,
    /// None: the dialer is not in a cluster yet (it may only ask to join).
    pub cluster_id: Option<uuid::Uuid>,
    pub node_id: u64,
}

/// The listener's answer when it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version this connection speaks (the highest in common).
    pub protocol_version: u16,
    /// The listener's ballast version (absent from older builds).
    #[serde(default)]
    pub version: Option<String>,
    pub cluster_id: Option<uuid::Uuid>,
    pub node_id: u64,
}

/// What an accepted connection may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// a member of our cluster: every request
    Member,
    /// a node outside any cluster: join requests only
    JoinOnly,
}

/// How a build that sent no ballast version is named (builds before versions
/// were exchanged).
pub const UNNAMED_VERSION: &str = "(an older build)";

/// The protocol range a node reported, read with the rule for builds from
/// before ranges were reported (0-0: they spoke version 1 only).
#[must_use]
pub fn reported_range(min: u16, max: u16) -> (u16, u16) {
    if max == 0 {
        (1, 1)
    } else {
        (min.clamp(1, max), max)
    }
}

/// Which ballast a node runs and which peer protocol versions it speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speaks {
    pub version: String,
    pub min: u16,
    pub max: u16,
}

impl Speaks {
    /// A peer's, from what it sent (older builds send one version, no name).
    #[must_use]
    pub fn peer(version: Option<&str>, min: Option<u16>, max: u16) -> Self {
        Self {
            version: version.unwrap_or(UNNAMED_VERSION).to_owned(),
            min: min.unwrap_or(max).min(max),
            max,
        }
    }

    /// A build's, as it describes itself (`ballast version --json`).
    #[must_use]
    pub fn new_local(version: String, min: u16, max: u16) -> Self {
        Self { version, min, max }
    }

    /// "1" or "1-2".
    #[must_use]
    pub fn range(&self) -> String {
        range_text(self.min, self.max)
    }
}

/// "1" or "1-2".
#[must_use]
pub fn range_text(min: u16, max: u16) -> String {
    if min == max {
        min.to_string()
    } else {
        format!("{min}-{max}")
    }
}

/// Test hook: the ballast version this node advertises instead of its own.
pub const ADVERTISED_VERSION_ENV: &str = "BALLAST_ADVERTISED_VERSION";
/// Test hook: the peer protocol versions this node speaks ("N" or "MIN-MAX",
/// within what the build knows is not checked: a test stands in for another
/// build with it).
pub const PEER_PROTOCOL_ENV: &str = "BALLAST_PEER_PROTOCOL";

fn parse_range(text: &str) -> Result<(u16, u16), String> {
    let bad =
        || format!("{PEER_PROTOCOL_ENV}={text:?}: expected a version (e.g. 2) or a range (e.g. 1-2) of numbers from 1");
    let (min, max) = match text.trim().split_once('-') {
        Some((min, max)) => (min.trim(), max.trim()),
        None => (text.trim(), text.trim()),
    };
    let min: u16 = min.parse().map_err(|_| bad())?;
    let max: u16 = max.parse().map_err(|_| bad())?;
    if min == 0 || min > max {
        return Err(bad());
    }
    Ok((min, max))
}

/// This build's `Speaks`, with the test hooks applied (checked by
/// `check_local` at start-up).
fn local_from_env() -> Result<Speaks, String> {
    let version = match std::env::var(ADVERTISED_VERSION_ENV) {
        Ok(version) if !version.trim().is_empty() => version.trim().to_owned(),
        _ => env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (min, max) = match std::env::var(PEER_PROTOCOL_ENV) {
        Ok(text) => parse_range(&text)?,
        Err(_) => (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION),
    };
    Ok(Speaks::new_local(version, min, max))
}

static LOCAL: OnceLock<Result<Speaks, String>> = OnceLock::new();

/// Refuses a malformed test hook (the node does not start).
pub fn check_local() -> Result<(), String> {
    LOCAL
        .get_or_init(local_from_env)
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// What this node runs and speaks.
#[must_use]
pub fn local() -> &'static Speaks {
    static DEFAULT: OnceLock<Speaks> = OnceLock::new();
    match LOCAL.get_or_init(local_from_env) {
        Ok(speaks) => speaks,
        Err(_) => DEFAULT.get_or_init(|| {
            Speaks::new_local(
                env!("CARGO_PKG_VERSION").to_owned(),
                PROTOCOL_VERSION_MIN,
                PROTOCOL_VERSION,
            )
        }),
    }
}

/// The highest protocol version both speak, or an error naming both.
pub fn negotiate(theirs: &Speaks, ours: &Speaks) -> Result<u16, String> {
    let common = theirs.max.min(ours.max);
    if common >= theirs.min.max(ours.min) {
        return Ok(common);
    }
    let advice = if theirs.max < ours.min {
        "upgrade the other node first (nodes one release apart work together)"
    } else {
        "upgrade this node first (nodes one release apart work together)"
    };
    Err(format!(
        "no peer protocol in common: the other node runs ballast {} (peer protocol {}), this node runs ballast {} (peer protocol {}); {advice}",
        theirs.version,
        theirs.range(),
        ours.version,
        ours.range()
    ))
}

/// Decides on a `Hello`, given this node's cluster (None: not in one) and
/// what it speaks; on success also the protocol version of the connection.
pub fn admit(hello: &Hello, local_cluster: Option<uuid::Uuid>, ours: &Speaks) -> Result<(Admitted, u16), String> {
    let theirs = Speaks::peer(
        hello.version.as_deref(),
        hello.min_protocol_version,
        hello.protocol_version,
    );
    let protocol = negotiate(&theirs, ours)?;
    let admitted = match (hello.cluster_id, local_cluster) {
        (None, _) => Admitted::JoinOnly,
        (Some(theirs), Some(ours)) if theirs == ours => Admitted::Member,
        (Some(theirs), Some(ours)) => return Err(format!("this node belongs to cluster {ours}, not {theirs}")),
        (Some(_), None) => return Err("this node is not in a cluster (run `ballast cluster join` on it)".to_owned()),
    };
    Ok((admitted, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Speaks {
        Speaks::new_local("0.1.0".into(), 1, 1)
    }

    fn hello(cluster: Option<u128>) -> Hello {
        Hello {
            protocol_version: 1,
            min_protocol_version: Some(1),
            version: Some("0.1.0".into()),
            cluster_id: cluster.map(uuid::Uuid::from_u128),
            node_id: 9,
        }
    }

    #[test]
    fn members_of_the_same_cluster_are_admitted() {
        assert_eq!(
            admit(&hello(Some(1)), Some(uuid::Uuid::from_u128(1)), &ours()),
            Ok((Admitted::Member, 1))
        );
    }

    #[test]
    fn another_cluster_is_refused_and_strangers_may_only_join() {
        let error = admit(&hello(Some(2)), Some(uuid::Uuid::from_u128(1)), &ours()).unwrap_err();
        assert!(error.contains("belongs to cluster"), "{error}");
        assert_eq!(
            admit(&hello(None), Some(uuid::Uuid::from_u128(1)), &ours()),
            Ok((Admitted::JoinOnly, 1))
        );
        assert!(admit(&hello(Some(1)), None, &ours()).is_err());
    }

    #[test]
    fn nodes_one_release_apart_speak_the_highest_version_both_know() {
        let next = Speaks::new_local("0.2.0".into(), 1, 2);
        let after = Speaks::new_local("0.3.0".into(), 2, 3);
        assert_eq!(negotiate(&next, &ours()), Ok(1));
        assert_eq!(negotiate(&ours(), &next), Ok(1));
        assert_eq!(negotiate(&next, &after), Ok(2));
        assert_eq!(negotiate(&after, &after), Ok(3));
    }

    #[test]
    fn a_peer_with_no_version_in_common_is_refused_naming_both_releases() {
        let future = Speaks::new_local("0.3.0".into(), 2, 3);
        let error = negotiate(&future, &ours()).unwrap_err();
        for part in ["0.3.0", "2-3", "0.1.0", "peer protocol 1", "upgrade this node first"] {
            assert!(error.contains(part), "{part:?} missing from: {error}");
        }
        let error = negotiate(&ours(), &future).unwrap_err();
        assert!(error.contains("upgrade the other node first"), "{error}");
        let mut old = hello(Some(1));
        old.protocol_version = 3;
        old.min_protocol_version = Some(2);
        assert!(admit(&old, Some(uuid::Uuid::from_u128(1)), &ours())
            .unwrap_err()
            .contains("no peer protocol in common"));
    }

    #[test]
    fn a_hello_from_a_build_that_spoke_one_version_still_parses() {
        let old = br#"{"protocol_version":1,"cluster_id":null,"node_id":4}"#;
        let hello: Hello = serde_json::from_slice(old).unwrap();
        assert_eq!(hello.min_protocol_version, None);
        assert_eq!(admit(&hello, None, &ours()), Ok((Admitted::JoinOnly, 1)));
        let welcome: Welcome =
            serde_json::from_slice(br#"{"protocol_version":1,"cluster_id":null,"node_id":4}"#).unwrap();
        assert_eq!(welcome.version, None);
    }

    #[test]
    fn the_protocol_test_hook_takes_a_version_or_a_range_and_refuses_nonsense() {
        assert_eq!(parse_range("2"), Ok((2, 2)));
        assert_eq!(parse_range(" 1-2 "), Ok((1, 2)));
        for bad in ["", "0", "2-1", "x", "1-", "-1", "70000"] {
            assert!(parse_range(bad).is_err(), "{bad:?} accepted");
        }
    }
}
