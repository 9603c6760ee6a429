//! Where a new volume's replicas go: N distinct healthy active nodes,
//! distinct zones when nodes carry zone labels, favouring free space per
//! replica already held; the proposing node first when it qualifies, so a
//! volume created on a node is served there.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{ClusterState, NodeAdmin};

/// What placement knows about one node beyond the replicated state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub up: bool,
    pub free_bytes: u64,
}

/// Picks `replicas` nodes, or says why it cannot.
pub fn place(
    state: &ClusterState,
    views: &BTreeMap<u64, NodeView>,
    replicas: usize,
    preferred: u64,
) -> Result<Vec<u64>, String> {
    let held = state.replicas_per_node();
    let mut candidates: Vec<(u64, u64)> = state
        .nodes
        .values()
        .filter(|node| node.admin == NodeAdmin::Active)
        .filter_map(|node| {
            let view = views.get(&node.id).copied().unwrap_or_default();
            let free = view.free_bytes;
            (view.up && free > 0).then(|| {
                let score = free / (1 + held.get(&node.id).copied().unwrap_or(0) as u64);
                (node.id, score)
            })
        })
        .collect();
    // Highest score first; the preferred node ahead of all; ties by id.
    candidates.sort_by_key(|&(id, score)| (id != preferred, std::cmp::Reverse(score), id));
    let zoned = state.nodes.values().any(|node| node.zone().is_some());
    let mut chosen = Vec::with_capacity(replicas);
    let mut zones = BTreeSet::new();
    for (id, _) in &candidates {
        if chosen.len() == replicas {
            break;
        }
        let zone = state.nodes[id].zone().unwrap_or("");
        if zoned && !zones.insert(zone) {
            continue;
        }
        chosen.push(*id);
    }
    if chosen.len() < replicas {
        let usable = candidates.len();
        let what = if zoned { "distinct zones" } else { "nodes" };
        return Err(format!(
            "--repl {replicas} needs {replicas} healthy active {what} with free space; {} found ({usable} usable node(s) of {} in the cluster)",
            chosen.len(),
            state.nodes.len()
        ));
    }
    debug_assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), chosen.len());
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{Command, NodeRecord};
    use proptest::prelude::*;

    fn node(id: u64, zone: Option<&str>) -> NodeRecord {
        NodeRecord {
            id,
            uuid: uuid::Uuid::nil(),
            name: format!("n{id}"),
            peer_address: String::new(),
            api_address: String::new(),
            nbd_address: String::new(),
            labels: zone
                .map(|z| [("zone".to_owned(), z.to_owned())].into())
                .unwrap_or_default(),
            admin: NodeAdmin::Active,
            joined_unix_seconds: 0,
        }
    }

    fn state(zones: &[Option<&str>]) -> (ClusterState, BTreeMap<u64, NodeView>) {
        let mut state = ClusterState::default();
        let mut views = BTreeMap::new();
        for (index, zone) in zones.iter().enumerate() {
            let id = index as u64 + 1;
            state.apply(Command::AddNode { node: node(id, *zone) });
            views.insert(
                id,
                NodeView {
                    up: true,
                    free_bytes: 1 << 40,
                },
            );
        }
        (state, views)
    }

    #[test]
    fn the_preferred_node_comes_first_and_replicas_are_distinct() {
        let (state, views) = state(&[None, None, None]);
        let chosen = place(&state, &views, 3, 2).unwrap();
        assert_eq!(chosen[0], 2);
        assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), 3);
    }

    #[test]
    fn down_maintenance_and_full_nodes_get_no_replicas() {
        let (mut state, mut views) = state(&[None, None, None, None]);
        views.get_mut(&1).unwrap().up = false;
        views.get_mut(&2).unwrap().free_bytes = 0;
        state.apply(Command::SetNodeAdmin {
            id: 3,
            admin: NodeAdmin::Maintenance,
        });
        assert_eq!(place(&state, &views, 1, 1).unwrap(), vec![4]);
        let error = place(&state, &views, 2, 1).unwrap_err();
        assert!(error.contains("--repl 2 needs 2"), "{error}");
    }

    #[test]
    fn zones_are_distinct_when_labelled() {
        let (state, views) = state(&[Some("a"), Some("a"), Some("b"), Some("b")]);
        let chosen = place(&state, &views, 2, 1).unwrap();
        let zones: BTreeSet<_> = chosen.iter().map(|id| state.nodes[id].zone()).collect();
        assert_eq!(zones.len(), 2);
        assert!(place(&state, &views, 3, 1).unwrap_err().contains("distinct zones"));
    }

    proptest! {
        #[test]
        fn placement_never_puts_two_replicas_on_one_node_or_zone(
            zones in prop::collection::vec(prop::option::of(0u8..3), 1..9),
            up in prop::collection::vec(any::<bool>(), 9),
            replicas in 1usize..5, preferred in 1u64..10,
        ) {
            let names: Vec<Option<String>> = zones.iter().map(|z| z.map(|z| format!("z{z}"))).collect();
            let refs: Vec<Option<&str>> = names.iter().map(|z| z.as_deref()).collect();
            let (state, mut views) = state(&refs);
            for (id, view) in &mut views {
                view.up = up[usize::try_from(*id).unwrap() - 1];
            }
            if let Ok(chosen) = place(&state, &views, replicas, preferred) {
                prop_assert_eq!(chosen.len(), replicas);
                prop_assert_eq!(chosen.iter().collect::<BTreeSet<_>>().len(), replicas);
                prop_assert!(chosen.iter().all(|id| views[id].up));
                if state.nodes.values().any(|n| n.zone().is_some()) {
                    let zones: BTreeSet<_> = chosen.iter().map(|id| state.nodes[id].zone()).collect();
                    prop_assert_eq!(zones.len(), replicas);
                }
            }
        }
    }
}
