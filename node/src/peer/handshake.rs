//! The peer handshake: the dialer says who it is and which cluster it
//! believes it belongs to; the listener refuses another cluster, another
//! protocol version, or a clusterless dialer asking for anything but to
//! join.

use serde::{Deserialize, Serialize};

use super::PROTOCOL_VERSION;

/// First frame of a connection (JSON payload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// None: the dialer is not in a cluster yet (it may only ask to join).
    pub cluster_id: Option<uuid::Uuid>,
    pub node_id: u64,
}

/// The listener's answer when it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
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

/// Decides on a `Hello`, given this node's cluster (None: not in one).
pub fn admit(hello: &Hello, local_cluster: Option<uuid::Uuid>) -> Result<Admitted, String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "peer protocol version {} is not supported (this node speaks {PROTOCOL_VERSION}); run the same ballast version on every node",
            hello.protocol_version
        ));
    }
    match (hello.cluster_id, local_cluster) {
        (None, _) => Ok(Admitted::JoinOnly),
        (Some(theirs), Some(ours)) if theirs == ours => Ok(Admitted::Member),
        (Some(theirs), Some(ours)) => Err(format!("this node belongs to cluster {ours}, not {theirs}")),
        (Some(_), None) => Err("this node is not in a cluster (run `ballast cluster join` on it)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(cluster: Option<u128>) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: cluster.map(uuid::Uuid::from_u128),
            node_id: 9,
        }
    }

    #[test]
    fn members_of_the_same_cluster_are_admitted() {
        assert_eq!(
            admit(&hello(Some(1)), Some(uuid::Uuid::from_u128(1))),
            Ok(Admitted::Member)
        );
    }

    #[test]
    fn another_cluster_or_version_is_refused_and_strangers_may_only_join() {
        let error = admit(&hello(Some(2)), Some(uuid::Uuid::from_u128(1))).unwrap_err();
        assert!(error.contains("belongs to cluster"), "{error}");
        assert_eq!(
            admit(&hello(None), Some(uuid::Uuid::from_u128(1))),
            Ok(Admitted::JoinOnly)
        );
        assert!(admit(&hello(Some(1)), None).is_err());
        let mut old = hello(Some(1));
        old.protocol_version = PROTOCOL_VERSION + 1;
        assert!(admit(&old, Some(uuid::Uuid::from_u128(1)))
            .unwrap_err()
            .contains("version"));
    }
}
