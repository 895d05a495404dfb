//! The state machine on an in-memory network in virtual time: no sockets, no clock.

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;

use super::*;

struct Net {
    now: Instant,
    nodes: BTreeMap<NodeId, Swim>,
    dead: BTreeSet<NodeId>,
    /// Running, but cut off: nothing reaches them and nothing they send arrives.
    cut: BTreeSet<NodeId>,
    by_addr: BTreeMap<SocketAddr, NodeId>,
}

impl Net {
    fn new(n: u8) -> Net {
        let now = Instant::now();
        let mut net = Net {
            now,
            nodes: BTreeMap::new(),
            dead: BTreeSet::new(),
            cut: BTreeSet::new(),
            by_addr: BTreeMap::new(),
        };
        for i in 1..=n {
            let id = NodeId([i; 8]);
            let addr: SocketAddr = format!("10.0.0.{i}:7946").parse().unwrap();
            let identity = NodeIdentity {
                id,
                addr,
                generation: 1,
            };
            let meta = NodeMeta {
                name: format!("n{i}"),
                ..Default::default()
            };
            let swim = Swim::new(
                identity,
                meta,
                SwimConfig::lan(),
                StdRng::seed_from_u64(u64::from(i)),
                now,
            );
            net.by_addr.insert(addr, id);
            net.nodes.insert(id, swim);
        }
        net
    }

    fn join_all_to_first(&mut self) {
        let first = *self.nodes.values().next().unwrap().identity();
        let now = self.now;
        for swim in self.nodes.values_mut().skip(1) {
            swim.join([first.addr], now);
        }
    }

    /// Delivers every queued packet, then advances to the next deadline.
    fn step(&mut self) {
        self.deliver();
        let next = self
            .nodes
            .iter()
            .filter(|(id, _)| !self.dead.contains(id))
            .filter_map(|(_, s)| s.poll_deadline())
            .min();
        if let Some(at) = next {
            self.now = self.now.max(at);
            let now = self.now;
            for (id, swim) in &mut self.nodes {
                if !self.dead.contains(id) {
                    swim.handle_deadline(now);
                }
            }
        }
    }

    /// Runs every timer due in the next `d`, then moves the clock to its end.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        while self
            .nodes
            .iter()
            .filter(|(id, _)| !self.dead.contains(id))
            .filter_map(|(_, s)| s.poll_deadline())
            .min()
            .is_some_and(|at| at <= until)
        {
            self.step();
        }
        self.deliver();
        self.now = until;
    }

    /// Delivers every queued packet, with no time passing.
    fn deliver(&mut self) {
        let mut packets = Vec::new();
        for (id, swim) in &mut self.nodes {
            while let Some((to, bytes)) = swim.poll_transmit() {
                packets.push((*id, to.addr, bytes));
            }
            while swim.poll_event().is_some() {}
        }
        for (from, to, bytes) in packets {
            let Some(dst) = self.by_addr.get(&to).copied() else {
                continue;
            };
            if self.dead.contains(&dst)
                || self.dead.contains(&from)
                || self.cut.contains(&dst)
                || self.cut.contains(&from)
            {
                continue;
            }
            let now = self.now;
            let _ = self
                .nodes
                .get_mut(&dst)
                .unwrap()
                .handle_packet(from, &bytes, now);
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Net) -> bool) -> Duration {
        let start = self.now;
        while !done(self) {
            assert!(
                self.now - start < limit,
                "condition not met within {limit:?}"
            );
            self.step();
        }
        self.now - start
    }

    fn all_see(&self, who: NodeId, state: MemberState) -> bool {
        self.nodes
            .iter()
            .filter(|(id, _)| **id != who && !self.dead.contains(id))
            .all(|(_, s)| s.members().get(&who).is_some_and(|m| m.state == state))
    }

    fn converged(&self) -> bool {
        let n = self.nodes.len();
        self.nodes.values().all(|s| {
            s.members()
                .values()
                .filter(|m| m.state == MemberState::Alive && m.meta.is_some())
                .count()
                == n
        })
    }
}

#[test]
fn five_nodes_converge_with_metadata() {
    let mut net = Net::new(5);
    net.join_all_to_first();
    let took = net.run_until(Duration::from_secs(10), Net::converged);
    tracing::info!(?took, "converged");
    for swim in net.nodes.values() {
        let names: Vec<_> = swim
            .members()
            .values()
            .map(|m| m.meta.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["n1", "n2", "n3", "n4", "n5"]);
    }
}

#[test]
fn a_restarted_node_learns_everyone_s_metadata_again() {
    let mut net = Net::new(4);
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);

    tracing::info!("--- n3 restarts: same id and address, a new generation, knowing nobody");
    let id = NodeId([3; 8]);
    let old = *net.nodes[&id].identity();
    let restarted = NodeIdentity {
        generation: old.generation + 1,
        ..old
    };
    let meta = NodeMeta {
        name: "n3".into(),
        labels: [("rack".to_string(), "r7".to_string())].into(),
        ..Default::default()
    };
    let mut swim = Swim::new(
        restarted,
        meta,
        SwimConfig::lan(),
        StdRng::seed_from_u64(33),
        net.now,
    );
    let first = *net.nodes[&NodeId([1; 8])].identity();
    swim.join([first.addr], net.now);
    net.nodes.insert(id, swim);

    tracing::info!("--- the others see a rename, not a newcomer, and still tell it who they are");
    net.run_until(Duration::from_secs(10), Net::converged);
    let names: Vec<_> = net.nodes[&id]
        .members()
        .values()
        .map(|m| m.meta.as_ref().map(|m| m.name.clone()))
        .collect();
    assert_eq!(
        names,
        [
            Some("n1".into()),
            Some("n2".into()),
            Some("n3".into()),
            Some("n4".into())
        ]
    );

    tracing::info!("--- and they take its new metadata, though its count of changes began again");
    net.run_until(Duration::from_secs(10), |n| {
        n.nodes.values().all(|s| {
            s.members()[&id]
                .meta
                .as_ref()
                .is_some_and(|m| m.labels.get("rack").map(String::as_str) == Some("r7"))
        })
    });
}

#[test]
fn a_silent_node_is_declared_down_by_all() {
    let mut net = Net::new(5);
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);
    let victim = NodeId([5; 8]);
    net.dead.insert(victim);
    let took = net.run_until(Duration::from_secs(10), |n| {
        n.all_see(victim, MemberState::Down)
    });
    assert!(took < Duration::from_secs(5), "detection took {took:?}");
}

#[test]
fn a_member_declared_down_is_known_down_by_all_within_a_few_round_trips() {
    let mut net = Net::new(10);
    // Joined 37 ms apart, so that no two members' timers fall at the same instant, as on a
    // real network: news passed on by a timer would then not count.
    let first = *net.nodes.values().next().unwrap().identity();
    let joiners: Vec<NodeId> = net.nodes.keys().copied().skip(1).collect();
    for id in joiners {
        net.advance(Duration::from_millis(37));
        let now = net.now;
        net.nodes.get_mut(&id).unwrap().join([first.addr], now);
    }
    net.run_until(Duration::from_secs(10), Net::converged);
    let victim = NodeId([10; 8]);
    net.dead.insert(victim);
    net.run_until(Duration::from_secs(10), |n| {
        n.nodes
            .iter()
            .any(|(id, s)| *id != victim && s.members()[&victim].state == MemberState::Down)
    });
    // No timer runs from here on: only what the news itself sets off.
    for _ in 0..4 {
        net.deliver();
    }
    let unaware: Vec<String> = net
        .nodes
        .iter()
        .filter(|(id, s)| **id != victim && s.members()[&victim].state != MemberState::Down)
        .map(|(_, s)| s.identity().addr.to_string())
        .collect();
    assert!(
        unaware.is_empty(),
        "still unaware after 4 hops: {unaware:?}"
    );
}

#[test]
fn a_leaving_node_is_left_not_down() {
    let mut net = Net::new(4);
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);
    let leaver = NodeId([4; 8]);
    let now = net.now;
    net.nodes.get_mut(&leaver).unwrap().leave(now);
    net.run_until(Duration::from_secs(5), |n| {
        n.all_see(leaver, MemberState::Left)
    });
}

#[test]
fn a_packet_from_someone_else_is_refused() {
    let mut net = Net::new(2);
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);
    let a = NodeId([1; 8]);
    let b = NodeId([2; 8]);
    let now = net.now;
    // b's announce packet, delivered as if it came over a connection with a's certificate.
    let mut swim = net.nodes.remove(&b).unwrap();
    swim.join([SocketAddr::from(([10, 0, 0, 1], 7946))], now);
    let (_, bytes) = swim.poll_transmit().unwrap();
    let err = net
        .nodes
        .get_mut(&a)
        .unwrap()
        .handle_packet(NodeId([9; 8]), &bytes, now)
        .unwrap_err();
    assert!(matches!(err, PacketError::Spoofed { .. }), "{err}");
}

#[test]
fn the_same_seed_gives_the_same_history() {
    let trace = || {
        let mut net = Net::new(4);
        net.join_all_to_first();
        net.run_until(Duration::from_secs(10), Net::converged)
    };
    assert_eq!(trace(), trace());
}

#[test]
fn a_member_down_past_the_reap_time_is_forgotten() {
    let mut net = Net::new(3);
    for swim in net.nodes.values_mut() {
        swim.config.remove_down_after = Duration::from_secs(5);
        let cfg = swim.config.foca(3);
        swim.foca.set_config(cfg).unwrap();
    }
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);
    let victim = NodeId([3; 8]);
    net.dead.insert(victim);
    net.run_until(Duration::from_secs(10), |n| {
        n.all_see(victim, MemberState::Down)
    });
    net.run_until(Duration::from_secs(20), |n| {
        n.nodes
            .iter()
            .filter(|(id, _)| **id != victim)
            .all(|(_, s)| !s.members().contains_key(&victim))
    });
}

#[test]
fn both_sides_of_a_healed_split_find_each_other_again() {
    tracing::info!("--- a node cut off long enough that both sides hold the other down");
    let mut net = Net::new(4);
    net.join_all_to_first();
    net.run_until(Duration::from_secs(10), Net::converged);
    let island = NodeId([4; 8]);
    net.cut.insert(island);
    net.run_until(Duration::from_secs(20), |n| {
        n.all_see(island, MemberState::Down)
            && n.nodes[&island]
                .members()
                .iter()
                .filter(|(id, _)| **id != island)
                .all(|(_, m)| m.state == MemberState::Down)
    });
    tracing::info!("--- healed: everyone is alive again within two announce periods");
    net.cut.clear();
    net.run_until(SwimConfig::lan().announce_to_down * 2, Net::converged);
}
