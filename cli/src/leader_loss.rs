//! Calling an election as soon as gossip says the leader is gone.
//!
//! openraft elects a new leader only after [`VOTE_LEASE`] and then a random 1050 to 1200 ms
//! without an append, so after a leader dies the cluster waits 2.25 to 2.4 s from its last
//! heartbeat. Gossip usually knows sooner: a leader that stops answering probes is suspect
//! within about a second. A voter that sees its leader suspect (or down) in gossip and has
//! heard nothing from it for the vote lease calls an election at once; the others grant
//! their votes as soon as their own lease has run out, as they would for openraft's timer.
//!
//! ```text
//!   leader dies ── probe missed ──▶ Suspect ─┐
//!   last append ──── VOTE_LEASE + jitter ────┴──▶ elect()        (openraft's timer: +1.05..1.2 s)
//! ```
//!
//! A jitter drawn from the agent's seed keeps the voters from standing all at once and
//! splitting the vote. Nothing here can elect a node that could not win anyway: the vote
//! lease and the log check are openraft's, unchanged. It only comes sooner: a voter that has
//! not heard a live leader for the lease, while gossip suspects that leader, would stand on
//! openraft's timer 0.65 to 1.1 s later, and the leader itself grants the vote (openraft keeps
//! no lease against votes for a leader), as it would then.

use std::time::Duration;

use blx_consensus::node::VOTE_LEASE;
use blx_membership::{MemberState, Membership};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::raft::{Cluster, node_id};

/// How often the leader's standing in gossip is looked at.
const CHECK: Duration = Duration::from_millis(50);

/// What every voter waits beyond the vote lease, so that the others' leases (which began a
/// little later, when the leader's last append reached them) are over when it asks.
const MARGIN: Duration = Duration::from_millis(100);

/// The most that one voter waits beyond that, so that two voters who lost the leader at the
/// same moment rarely stand in the same term.
const JITTER_MS: u64 = 300;

/// Runs until the task is dropped.
pub(crate) async fn run(cluster: Cluster, membership: Membership, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut jitter = draw(&mut rng);
    loop {
        tick.tick().await;
        let status = cluster.node.status();
        let Some(leader) = status.leader else {
            continue;
        };
        if leader == status.id || !status.voters.contains(&status.id) {
            continue;
        }
        let standing = membership.members().get(&node_id(leader)).map(|m| m.state);
        if !matches!(standing, Some(MemberState::Suspect | MemberState::Down)) {
            continue;
        }
        // A node that has heard no leader since it started leaves it to openraft's timer: a
        // voter that stands without need raises its term and deposes a live leader.
        let silent = cluster
            .node
            .stats()
            .last_leader_contact()
            .is_some_and(|at| at.elapsed() >= VOTE_LEASE + MARGIN + jitter);
        if !silent {
            continue;
        }
        tracing::info!(
            leader = %node_id(leader),
            ?standing,
            "the leader is gone in gossip and silent past the vote lease: calling an election"
        );
        if let Err(e) = cluster.node.elect().await {
            tracing::debug!(error = %e, "election not called");
        }
        // Give the election a full timeout to name someone else before standing again.
        let _ = tokio::time::timeout(
            VOTE_LEASE,
            cluster.node.wait_leader(|l| l.is_some_and(|l| l != leader)),
        )
        .await;
        jitter = draw(&mut rng);
    }
}

/// A jitter in `0..JITTER_MS`.
fn draw(rng: &mut StdRng) -> Duration {
    Duration::from_millis(rng.random_range(0..JITTER_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound_and_follows_the_seed() {
        let (mut a, mut b) = (StdRng::seed_from_u64(7), StdRng::seed_from_u64(7));
        let first: Vec<Duration> = (0..64).map(|_| draw(&mut a)).collect();
        let again: Vec<Duration> = (0..64).map(|_| draw(&mut b)).collect();
        assert_eq!(first, again, "the same seed draws the same jitters");
        assert!(first.iter().all(|d| *d < Duration::from_millis(JITTER_MS)));
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() > 32, "jitters spread: {distinct:?}");
    }
}
