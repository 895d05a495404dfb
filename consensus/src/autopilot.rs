//! The autopilot: decides, from what membership and Raft report, how the voter set should
//! change next. Pure: [`plan`] reads its inputs (time included) and returns a [`Plan`]; a small
//! task on the leader executes it with `add_learner` and `change_membership`.
//!
//! The Raft group holds the servers: the voters and a few standby learners. Every other node
//! is a client, which follows the state through a watch on a server and never hears from the
//! leader, so the leader's work grows with the servers, not with the cluster.
//!
//! Rules, in order:
//! 1. While there are fewer live learners than `standby_servers` plus the voters still
//!    missing, nodes that are up and outside the group become learners: from the zones with
//!    the fewest servers first, then by id.
//! 2. A voter that has been down past `voter_grace_secs`, or has left, is removed; never more
//!    than (voters - 1) / 2 at once, and never the leader (it hands over first).
//! 3. A learner that has been healthy (up, caught up within `max_learner_lag`) for
//!    `stabilization_secs` is promoted while there are fewer voters than desired, preferring
//!    zones that have no voter yet. The voter count stays odd.
//! 4. A learner that is down past the grace period, or has left, is removed.
//! 5. While there are more voters than desired (`desired_voters` was lowered) and nothing else
//!    changes the voter set, one voter per step goes back to being a learner: never the
//!    leader, from the zone with the most voters so the spread over zones is kept, the least
//!    healthy first.
//! 6. While there are more live learners than rule 1 wants and nothing else changes, one per
//!    step leaves the group and becomes a client: from the zone with the most servers, the
//!    least healthy first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::state::ClusterConfig;

/// Raft's node id: the membership node id read as a big-endian integer.
pub type RaftId = u64;

/// What the autopilot knows of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Membership says alive.
    pub up: bool,
    /// Membership says it left on purpose.
    pub left: bool,
    /// How long it has been in its current up/down state.
    pub state_for: Duration,
    /// Its failure zone.
    pub zone: Option<String>,
    /// Log entries it trails the leader by; None if the leader has no replication progress yet.
    pub lag: Option<u64>,
}

/// The Raft group as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftView {
    /// The leader (this node).
    pub leader: RaftId,
    /// Current voters.
    pub voters: BTreeSet<RaftId>,
    /// Current learners.
    pub learners: BTreeSet<RaftId>,
}

/// What to do next. Empty when nothing needs to change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Nodes to add as learners.
    pub add_learners: Vec<RaftId>,
    /// The new voter set, if it should change.
    pub voters: Option<BTreeSet<RaftId>>,
    /// Learners to drop from the group.
    pub remove_learners: Vec<RaftId>,
}

impl Plan {
    /// True when nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.add_learners.is_empty() && self.voters.is_none() && self.remove_learners.is_empty()
    }
}

/// Computes the next step.
pub fn plan(nodes: &BTreeMap<RaftId, NodeView>, raft: &RaftView, config: &ClusterConfig) -> Plan {
    let grace = Duration::from_secs(config.voter_grace_secs);
    let stable = Duration::from_secs(config.stabilization_secs);
    let gone = |id: &RaftId| {
        nodes
            .get(id)
            .is_none_or(|n| n.left || (!n.up && n.state_for >= grace))
    };
    let healthy = |id: &RaftId| {
        nodes.get(id).is_some_and(|n| {
            n.up && !n.left
                && n.state_for >= stable
                && n.lag.is_some_and(|l| l <= config.max_learner_lag)
        })
    };
    let mut out = Plan::default();

    // 2. Dead voters, bounded so a quorum of the old set always survives the change.
    let max_removals = raft.voters.len().saturating_sub(1) / 2;
    let mut voters = raft.voters.clone();
    let dead: Vec<RaftId> = raft
        .voters
        .iter()
        .filter(|id| **id != raft.leader && gone(id))
        .copied()
        .take(max_removals)
        .collect();
    for id in &dead {
        voters.remove(id);
    }

    // 1. Newcomers, as many as rule 3 may promote and the standbys need.
    let desired = usize::from(config.desired_voters);
    let standbys = usize::from(config.standby_servers);
    let live_voters = raft.voters.iter().filter(|id| !gone(id)).count();
    let want_learners = standbys + desired.saturating_sub(live_voters);
    let live_learners: Vec<RaftId> = raft
        .learners
        .iter()
        .filter(|id| !gone(id))
        .copied()
        .collect();
    let zone_of = |id: &RaftId| nodes.get(id).and_then(|n| n.zone.clone());
    let mut servers_in: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for id in raft.voters.iter().chain(&live_learners) {
        *servers_in.entry(zone_of(id)).or_default() += 1;
    }
    let mut newcomers: Vec<RaftId> = nodes
        .iter()
        .filter(|(id, n)| {
            n.up && !n.left && !raft.voters.contains(id) && !raft.learners.contains(id)
        })
        .map(|(id, _)| *id)
        .collect();
    for _ in 0..want_learners.saturating_sub(live_learners.len()) {
        let Some((at, _)) = newcomers
            .iter()
            .enumerate()
            .min_by_key(|(_, id)| (servers_in.get(&zone_of(id)).copied().unwrap_or(0), **id))
        else {
            break;
        };
        let id = newcomers.remove(at);
        *servers_in.entry(zone_of(&id)).or_default() += 1;
        out.add_learners.push(id);
    }
    out.add_learners.sort_unstable();

    // 3. Promotions toward the desired count, new zones first, then by id.
    let mut zones: BTreeSet<Option<String>> = voters
        .iter()
        .filter_map(|id| nodes.get(id))
        .map(|n| n.zone.clone())
        .collect();
    let mut candidates: Vec<RaftId> = raft
        .learners
        .iter()
        .filter(|id| healthy(id))
        .copied()
        .collect();
    candidates.sort_by_key(|id| (zones.contains(&nodes[id].zone), *id));
    let mut promoted = Vec::new();
    for id in candidates {
        if voters.len() + promoted.len() >= desired {
            break;
        }
        zones.insert(nodes[&id].zone.clone());
        promoted.push(id);
    }
    // Keep the count odd: an even voter set tolerates no more failures than the odd one below it.
    if (voters.len() + promoted.len()).is_multiple_of(2) && !promoted.is_empty() {
        promoted.pop();
    }
    voters.extend(promoted);
    // A voter set that shrank by removal only and came out even: keep one dead voter rather
    // than drop to an even count with no replacement.
    if voters.len().is_multiple_of(2) && !dead.is_empty() && voters.len() < raft.voters.len() {
        voters.insert(dead[dead.len() - 1]);
    }
    // 5. Too many voters: one steps down per step, from the most crowded zone.
    if voters == raft.voters && voters.len() > desired.max(1) && voters.len() >= 3 {
        let mut per_zone: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for id in &voters {
            *per_zone.entry(zone_of(id)).or_default() += 1;
        }
        let lag = |id: &RaftId| nodes.get(id).and_then(|n| n.lag).unwrap_or(u64::MAX);
        let demoted = voters
            .iter()
            .filter(|id| **id != raft.leader)
            .max_by_key(|id| (per_zone[&zone_of(id)], !healthy(id), lag(id), **id))
            .copied();
        if let Some(id) = demoted {
            voters.remove(&id);
        }
    }
    if voters != raft.voters {
        out.voters = Some(voters);
    }

    // 4. Learners that are gone.
    out.remove_learners = raft
        .learners
        .iter()
        .filter(|id| gone(id))
        .copied()
        .collect();

    // 6. More standbys than wanted: one goes back to being a client.
    if out.is_empty() && live_learners.len() > want_learners {
        let lag = |id: &RaftId| nodes.get(id).and_then(|n| n.lag).unwrap_or(u64::MAX);
        let leaving = live_learners
            .iter()
            .max_by_key(|id| {
                let crowd = servers_in.get(&zone_of(id)).copied().unwrap_or(0);
                (crowd, !healthy(id), lag(id), **id)
            })
            .copied();
        out.remove_learners.extend(leaving);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn up(zone: &str, lag: u64) -> NodeView {
        NodeView {
            up: true,
            left: false,
            state_for: Duration::from_secs(60),
            zone: Some(zone.into()),
            lag: Some(lag),
        }
    }

    fn down(for_secs: u64) -> NodeView {
        NodeView {
            up: false,
            left: false,
            state_for: Duration::from_secs(for_secs),
            zone: Some("z".into()),
            lag: None,
        }
    }

    fn cfg(desired: u8) -> ClusterConfig {
        ClusterConfig {
            desired_voters: desired,
            ..Default::default()
        }
    }

    #[test]
    fn one_voter_and_four_newcomers_end_with_three_voters() {
        let nodes: BTreeMap<RaftId, NodeView> = (1..=5).map(|i| (i, up("z", 0))).collect();
        let mut raft = RaftView {
            leader: 1,
            voters: [1].into(),
            learners: BTreeSet::new(),
        };
        let p = plan(&nodes, &raft, &cfg(3));
        assert_eq!(p.add_learners, vec![2, 3, 4, 5]);
        raft.learners = [2, 3, 4, 5].into();
        let p = plan(&nodes, &raft, &cfg(3));
        assert_eq!(p.voters, Some([1, 2, 3].into()));
        raft.voters = [1, 2, 3].into();
        raft.learners = [4, 5].into();
        assert!(plan(&nodes, &raft, &cfg(3)).is_empty());
        assert_eq!(
            plan(&nodes, &raft, &cfg(5)).voters,
            Some([1, 2, 3, 4, 5].into())
        );
    }

    #[test]
    fn promotions_prefer_new_zones_and_wait_for_stability() {
        let mut nodes: BTreeMap<RaftId, NodeView> = BTreeMap::new();
        nodes.insert(1, up("a", 0));
        nodes.insert(2, up("a", 0));
        nodes.insert(3, up("b", 0));
        nodes.insert(4, up("c", 0));
        let raft = RaftView {
            leader: 1,
            voters: [1].into(),
            learners: [2, 3, 4].into(),
        };
        assert_eq!(plan(&nodes, &raft, &cfg(3)).voters, Some([1, 3, 4].into()));
        nodes.get_mut(&3).unwrap().state_for = Duration::from_secs(1);
        nodes.get_mut(&4).unwrap().lag = Some(10_000);
        assert_eq!(
            plan(&nodes, &raft, &cfg(3)).voters,
            None,
            "2 alone would make the count even"
        );
    }

    #[test]
    fn a_dead_voter_is_replaced_after_the_grace_period_only() {
        let mut nodes: BTreeMap<RaftId, NodeView> = (1..=4).map(|i| (i, up("z", 0))).collect();
        nodes.insert(3, down(5));
        let raft = RaftView {
            leader: 1,
            voters: [1, 2, 3].into(),
            learners: [4].into(),
        };
        assert!(
            plan(&nodes, &raft, &cfg(3)).voters.is_none(),
            "within grace"
        );
        nodes.insert(3, down(31));
        assert_eq!(plan(&nodes, &raft, &cfg(3)).voters, Some([1, 2, 4].into()));
    }

    #[test]
    fn lowering_desired_voters_demotes_one_at_a_time_keeping_zones() {
        let zones = [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "c")];
        let nodes: BTreeMap<RaftId, NodeView> =
            zones.iter().map(|(id, z)| (*id, up(z, 0))).collect();
        let mut raft = RaftView {
            leader: 1,
            voters: [1, 2, 3, 4, 5].into(),
            learners: BTreeSet::new(),
        };
        assert!(plan(&nodes, &raft, &cfg(5)).is_empty());
        let mut steps = 0;
        while let Some(voters) = plan(&nodes, &raft, &cfg(3)).voters {
            assert_eq!(voters.len() + 1, raft.voters.len(), "one voter per step");
            assert!(voters.contains(&1), "the leader stays");
            raft.learners
                .extend(raft.voters.difference(&voters).copied());
            raft.voters = voters;
            steps += 1;
            assert!(steps <= 2, "{raft:?}");
        }
        assert_eq!(raft.voters.len(), 3);
        let spread: BTreeSet<_> = raft
            .voters
            .iter()
            .map(|id| zones[usize::try_from(*id).unwrap() - 1].1)
            .collect();
        assert_eq!(spread.len(), 3, "one voter in each zone: {:?}", raft.voters);
        assert!(plan(&nodes, &raft, &cfg(3)).is_empty(), "then it stays");
    }

    #[test]
    fn a_lagging_voter_steps_down_before_a_healthy_one() {
        let mut nodes: BTreeMap<RaftId, NodeView> = (1..=5).map(|i| (i, up("z", 0))).collect();
        nodes.get_mut(&2).unwrap().lag = Some(5_000);
        let raft = RaftView {
            leader: 5,
            voters: [1, 2, 3, 4, 5].into(),
            learners: BTreeSet::new(),
        };
        assert_eq!(
            plan(&nodes, &raft, &cfg(3)).voters,
            Some([1, 3, 4, 5].into())
        );
    }

    #[test]
    fn beyond_the_voters_only_the_standbys_join_raft_spread_over_zones() {
        let zones = ["a", "a", "a", "a", "b", "b", "c", "c", "c", "c"];
        let nodes: BTreeMap<RaftId, NodeView> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| (i as u64 + 1, up(z, 0)))
            .collect();
        let raft = RaftView {
            leader: 1,
            voters: [1, 5, 7].into(),
            learners: BTreeSet::new(),
        };
        let p = plan(&nodes, &raft, &cfg(3));
        // Each zone holds one voter: the two standbys go to the first two zones by id.
        assert_eq!(p.add_learners, vec![2, 6]);
        let raft = RaftView {
            learners: [2, 6].into(),
            ..raft
        };
        assert!(
            plan(&nodes, &raft, &cfg(3)).is_empty(),
            "the rest stay clients"
        );
        let none = ClusterConfig {
            standby_servers: 0,
            ..cfg(3)
        };
        assert_eq!(plan(&nodes, &raft, &none).remove_learners, vec![6]);
    }

    #[test]
    fn a_group_of_every_node_shrinks_to_the_standbys_one_learner_per_step() {
        let nodes: BTreeMap<RaftId, NodeView> = (1..=8).map(|i| (i, up("z", 0))).collect();
        let mut raft = RaftView {
            leader: 1,
            voters: [1, 2, 3].into(),
            learners: (4..=8).collect(),
        };
        let mut steps = 0;
        loop {
            let p = plan(&nodes, &raft, &cfg(3));
            if p.is_empty() {
                break;
            }
            assert!(p.add_learners.is_empty() && p.voters.is_none(), "{p:?}");
            assert_eq!(p.remove_learners.len(), 1, "{p:?}");
            raft.learners.remove(&p.remove_learners[0]);
            steps += 1;
            assert!(steps <= 3);
        }
        assert_eq!(raft.learners.len(), 2);
        // A voter that dies is replaced from the standbys, and a client takes the standby's place.
        let mut nodes = nodes;
        nodes.insert(3, down(31));
        let p = plan(&nodes, &raft, &cfg(3));
        assert_eq!(p.voters.as_ref().map(BTreeSet::len), Some(3), "{p:?}");
        assert_eq!(p.add_learners.len(), 1, "{p:?}");
    }

    fn arb_cluster() -> impl Strategy<Value = (BTreeMap<RaftId, NodeView>, RaftView, ClusterConfig)>
    {
        let node = (
            any::<bool>(),
            any::<bool>(),
            0u64..100,
            0u8..3,
            proptest::option::of(0u64..500),
        );
        (
            proptest::collection::vec(node, 1..10),
            any::<u64>(),
            prop_oneof![Just(1u8), Just(3), Just(5), Just(7)],
        )
            .prop_map(|(ns, pick, desired)| {
                let nodes: BTreeMap<RaftId, NodeView> = ns
                    .into_iter()
                    .enumerate()
                    .map(|(i, (up, left, secs, zone, lag))| {
                        (
                            i as u64 + 1,
                            NodeView {
                                up,
                                left: left && !up,
                                state_for: Duration::from_secs(secs),
                                zone: Some(format!("z{zone}")),
                                lag,
                            },
                        )
                    })
                    .collect();
                let ids: Vec<RaftId> = nodes.keys().copied().collect();
                let leader = ids[0];
                let mut voters: BTreeSet<RaftId> = [leader].into();
                let mut learners = BTreeSet::new();
                for (bit, id) in ids.iter().enumerate().skip(1) {
                    match (pick >> (2 * bit)) & 3 {
                        0 => {
                            voters.insert(*id);
                        }
                        1 => {
                            learners.insert(*id);
                        }
                        _ => {}
                    }
                }
                (
                    nodes,
                    RaftView {
                        leader,
                        voters,
                        learners,
                    },
                    ClusterConfig {
                        desired_voters: desired,
                        ..Default::default()
                    },
                )
            })
    }

    proptest! {
        #[test]
        fn plans_keep_quorum_and_promote_only_healthy_nodes((nodes, raft, config) in arb_cluster()) {
            let p = plan(&nodes, &raft, &config);
            if let Some(voters) = &p.voters {
                let removed = raft.voters.difference(voters).count();
                prop_assert!(removed <= raft.voters.len().saturating_sub(1) / 2, "removed {removed} of {:?}", raft.voters);
                prop_assert!(voters.contains(&raft.leader), "the leader never removes itself");
                for added in voters.difference(&raft.voters) {
                    let n = &nodes[added];
                    prop_assert!(n.up && !n.left && raft.learners.contains(added), "promoted an unhealthy or unknown node {added}");
                }
                // With every voter up, only rule 5 shrinks the set: by one, and not below
                // the desired count.
                let all_up = raft.voters.iter().all(|id| nodes.get(id).is_some_and(|n| n.up && !n.left));
                let shrank = raft.voters.len().saturating_sub(voters.len());
                if all_up && shrank > 0 {
                    prop_assert_eq!(shrank, 1, "demoted several at once: {:?}", voters);
                    prop_assert!(voters.len() >= usize::from(config.desired_voters), "shrank below desired: {:?}", voters);
                }
                let grew = voters.len() > raft.voters.len();
                prop_assert!(!grew || voters.len() % 2 == 1, "grew to an even count {voters:?}");
                prop_assert!(!grew || voters.len() <= usize::from(config.desired_voters));
            }
            for id in &p.add_learners {
                prop_assert!(nodes[id].up && !raft.voters.contains(id) && !raft.learners.contains(id));
            }
            let live = |id: &&RaftId| nodes.get(id).is_some_and(|n| n.up && !n.left);
            let learners_after = raft.learners.iter().filter(live).count() + p.add_learners.len();
            let wanted = usize::from(config.standby_servers) + usize::from(config.desired_voters);
            prop_assert!(p.add_learners.is_empty() || learners_after <= wanted, "{p:?}");
            prop_assert!(p.remove_learners.iter().all(|id| raft.learners.contains(id)));
        }
    }
}
