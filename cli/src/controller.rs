//! The leader's workload controller: records nodes as membership sees them (and as their
//! silence proves them, see [`Tenure`]), and runs the scheduler whenever VMs or nodes change
//! (and every 250 ms, so down-node grace periods expire). Every decision is made by pure code
//! in `blx_consensus::workload`; this task only feeds it and proposes what it returns.

use std::time::Duration;

use blx_consensus::state::Command;
use blx_consensus::workload::{
    NodeStatus, NodeUpdate, WorkloadCommand, node_changes, plan_schedule,
};
use blx_membership::{MemberState, Membership};
use blx_scheduler::Resources;

use crate::raft::Cluster;

/// Runs until the task is dropped; does work only while this node leads.
pub(crate) async fn run(
    cluster: Cluster,
    membership: Membership,
    contact: std::sync::Arc<crate::raft::RaftContact>,
    mut seed: u64,
) {
    let mut applied = cluster.node.subscribe_workload();
    let mut members = membership.watch();
    let mut raft = cluster.node.raft.metrics();
    // Passes run at least this often, so grace periods and lapsed leases are seen in time.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tenure = Tenure::new(tokio::time::Instant::now());
    let mut leading = false;
    loop {
        tokio::select! {
            biased;
            r = applied.changed() => if r.is_err() { return stopped("state machine") },
            r = members.changed() => if r.is_err() { return stopped("membership") },
            // Wakes when leadership is won or lost (not on every commit): a leadership seen
            // late would only make its floor later, and its first pass later.
            r = raft.wait_for(|m| (m.state == openraft::ServerState::Leader) != leading) => {
                if r.is_err() { return stopped("raft") }
            }
            _ = tick.tick() => {}
        }
        leading = cluster.node.is_leader();
        let term = cluster.node.status().term;
        let Some(floor) = tenure.observe(leading, term, tokio::time::Instant::now()) else {
            continue;
        };
        tracing::trace!(floor_age = ?floor.elapsed(), "controller pass");
        let now = tokio::time::Instant::now();
        let seen = node_updates(&membership, |id, state| {
            let peer = crate::raft::raft_id(id);
            match state {
                MemberState::Down if contact.fresh(peer) => Voice::Fresh,
                // Silence matters for a node holding VMs, and for one already recorded down
                // (whose VMs have moved: a suspicion must not bring it back up).
                MemberState::Suspect
                    if contact.lapsed(peer, floor, now)
                        && cluster.node.with_local_state(|s| {
                            let id = id.to_string();
                            s.vms_on(&id).next().is_some()
                                || s.nodes
                                    .get(&id)
                                    .is_some_and(|n| n.status == NodeStatus::Down)
                        }) =>
                {
                    Voice::Lapsed
                }
                _ => Voice::Unsure,
            }
        });
        let changed = cluster.node.with_local_state(|s| node_changes(s, &seen));
        if !changed.is_empty() {
            let members = membership.members();
            for n in &changed {
                let gossip = members
                    .values()
                    .find(|m| m.identity.id.to_string() == n.id)
                    .map(|m| m.state);
                tracing::info!(node = %n.id, status = ?n.status, ?gossip, "recording the node");
            }
            propose(
                &cluster,
                blx_consensus::workload::WorkloadCommand::NodeSync {
                    nodes: changed,
                    now_ms: cluster.clock.now_ms(),
                },
            )
            .await;
        }
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let started = tokio::time::Instant::now();
        let (plan, counts) = cluster.node.with_local_state(|s| {
            let plan = plan_schedule(s, cluster.clock.now_ms(), seed);
            let counts = plan.as_ref().and_then(|p| PassCounts::of(s, p));
            (plan, counts)
        });
        cluster
            .metrics
            .scheduling_pass
            .observe(started.elapsed().as_secs_f64());
        let Some(cmd) = plan else {
            continue;
        };
        let span = tracing::info_span!(
            "scheduler.pass",
            placements = counts.as_ref().map(|c| c.placements),
            preemptions = counts.as_ref().map(|c| c.preemptions),
        );
        if tracing::Instrument::instrument(propose(&cluster, cmd), span).await
            && let Some(c) = counts
        {
            let m = &cluster.metrics;
            m.placements.inc_by(c.placements);
            m.preemptions.inc_by(c.preemptions);
            m.failovers.inc_by(c.failovers);
        }
    }
}

fn stopped(what: &str) {
    tracing::debug!(what, "the controller stops: its source closed");
}

/// Proposes `cmd`; true once it is applied.
async fn propose(cluster: &Cluster, cmd: blx_consensus::workload::WorkloadCommand) -> bool {
    let cmd = Command::Workload(cmd);
    let outcome = cluster.node.write(cmd.clone()).await;
    let seen = outcome
        .as_ref()
        .map(Clone::clone)
        .map_err(ToString::to_string);
    cluster.audit(
        cluster.self_id,
        blx_consensus::access::Caller::Node,
        &cmd,
        &seen,
    );
    match outcome {
        Ok(Ok(_)) => true,
        // Another change got in first; the next pass plans against the new state.
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "scheduling pass refused");
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "scheduling pass not proposed");
            false
        }
    }
}

/// What one scheduling pass does, for the metrics.
struct PassCounts {
    placements: u64,
    preemptions: u64,
    /// Placements of VMs whose node was lost (down past its grace, or drained).
    failovers: u64,
}

impl PassCounts {
    fn of(state: &blx_consensus::state::ClusterState, plan: &WorkloadCommand) -> Option<Self> {
        let WorkloadCommand::Schedule {
            placements,
            evictions,
            ..
        } = plan
        else {
            return None;
        };
        let failovers = placements
            .iter()
            .filter(|p| {
                state.vms.get(&p.vm).is_some_and(|vm| {
                    vm.node.as_deref().is_some_and(|n| n != p.node)
                        || vm
                            .status
                            .reason
                            .as_deref()
                            .is_some_and(|r| r.starts_with("node "))
                })
            })
            .count();
        Some(PassCounts {
            placements: placements.len() as u64,
            preemptions: evictions
                .iter()
                .filter(|e| e.reason.starts_with("preempted by"))
                .count() as u64,
            failovers: failovers as u64,
        })
    }
}

/// Since when this node, as leader, has heard every lease renewal and Raft answer there was
/// to hear, so a node's silence since then is silence indeed.
///
/// A node's lease was last confirmed by some leader with a quorum. If that leader was an
/// earlier one, it confirmed the renewal before this node's term began: either it voted for
/// this node or another term's leader (and stepped down then), or a majority had stopped
/// acknowledging it. openraft's vote lease does not bound it tighter, since a leader keeps
/// no lease against votes for itself. So the floor is the moment this node noticed it leads
/// (at or after its election), or this agent's start if later; it is fixed for one term.
pub(crate) struct Tenure {
    started: tokio::time::Instant,
    /// The term and the floor of the current leadership.
    floor: Option<(u64, tokio::time::Instant)>,
}

impl Tenure {
    fn new(started: tokio::time::Instant) -> Self {
        Tenure {
            started,
            floor: None,
        }
    }

    /// The floor while this node leads in `term` (both as seen at `now`), or None.
    fn observe(
        &mut self,
        leading: bool,
        term: u64,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        if !leading {
            self.floor = None;
            return None;
        }
        match self.floor {
            Some((t, floor)) if t == term => Some(floor),
            _ => {
                let floor = now.max(self.started);
                self.floor = Some((term, floor));
                Some(floor)
            }
        }
    }
}

/// What this leader knows first-hand of a node, beside gossip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Voice {
    /// It answered Raft or renewed its lease a moment ago ([`crate::raft::RaftContact::FRESH`]).
    Fresh,
    /// It holds VMs (or is recorded down) and has been silent for longer than its lease
    /// ([`crate::raft::RaftContact::lapsed`]): its worker has stopped them.
    Lapsed,
    /// Neither.
    Unsure,
}

/// Every member as a node record would hold it.
///
/// - A member that gossip says is down but whose `voice` is fresh stays up: see
///   [`crate::raft::RaftContact`]. Failing it over would stop VMs on a node that runs them
///   and hears the leader, and place them again elsewhere.
/// - A member that gossip only suspects, but whose lease has lapsed, is down: its VMs are
///   stopped, so they are placed again now rather than once gossip's suspicion runs out
///   (1.2 s later).
fn node_updates(
    membership: &Membership,
    voice: impl Fn(blx_membership::NodeId, MemberState) -> Voice,
) -> Vec<NodeUpdate> {
    membership
        .members()
        .values()
        .filter_map(|m| {
            let meta = m.meta.as_ref()?;
            Some(NodeUpdate {
                id: m.identity.id.to_string(),
                name: meta.name.clone(),
                capacity: Resources {
                    vcpus: meta.capacity.vcpus,
                    memory_mib: meta.capacity.memory_mib,
                    disk_mib: meta.capacity.disk_gib.saturating_mul(1024),
                },
                labels: meta.labels.clone(),
                zone: meta.zone.clone(),
                status: status_of(m.state, voice(m.identity.id, m.state)),
            })
        })
        .collect()
}

/// A node's status from gossip's view of it and this leader's own.
fn status_of(state: MemberState, voice: Voice) -> NodeStatus {
    match (state, voice) {
        (MemberState::Suspect, Voice::Lapsed) => NodeStatus::Down,
        (MemberState::Alive | MemberState::Suspect, _) => NodeStatus::Up,
        (MemberState::Down, Voice::Fresh) => NodeStatus::Up,
        (MemberState::Down, _) => NodeStatus::Down,
        (MemberState::Left, _) => NodeStatus::Left,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::raft::RaftContact;

    #[test]
    fn a_leader_vouches_from_when_it_noticed_its_term_and_never_before_its_start() {
        let started = Instant::now();
        let mut tenure = Tenure::new(started);
        assert_eq!(
            tenure.observe(false, 1, started),
            None,
            "a follower has no floor"
        );

        tracing::info!("--- elected long after start: the floor is when it noticed, for the term");
        let elected = started + Duration::from_secs(60);
        assert_eq!(tenure.observe(true, 2, elected), Some(elected));
        assert_eq!(
            tenure.observe(true, 2, elected + Duration::from_secs(5)),
            Some(elected),
            "the floor is fixed for the whole term"
        );

        tracing::info!("--- a new term, even one seen only while leading, starts a new floor");
        let again = elected + Duration::from_secs(9);
        assert_eq!(tenure.observe(true, 3, again), Some(again));
        tenure.observe(false, 3, again);
        assert_eq!(
            tenure.observe(true, 3, again + Duration::from_secs(1)),
            Some(again + Duration::from_secs(1))
        );

        tracing::info!("--- never earlier than the agent's start");
        let mut early = Tenure::new(started + Duration::from_secs(1));
        assert_eq!(
            early.observe(true, 1, started),
            Some(started + Duration::from_secs(1))
        );
    }

    #[test]
    fn a_lease_lapses_only_after_the_later_of_its_last_word_and_the_floor() {
        let contact = RaftContact::default();
        let floor = Instant::now();
        let lapse = RaftContact::LAPSED;
        tracing::info!("--- never heard: counted from the floor");
        assert!(!contact.lapsed(7, floor, floor + lapse - Duration::from_millis(1)));
        assert!(contact.lapsed(7, floor, floor + lapse));

        tracing::info!("--- heard after the floor: counted from the word");
        contact.answered(7);
        let word = Instant::now();
        assert!(!contact.lapsed(7, floor, word + lapse - Duration::from_millis(1)));
        assert!(contact.lapsed(7, floor, word + lapse));

        tracing::info!("--- a floor later than the word wins");
        let later = word + Duration::from_secs(10);
        assert!(!contact.lapsed(7, later, later + lapse - Duration::from_millis(1)));
    }

    #[test]
    fn gossip_suspicion_is_a_down_only_for_a_lapsed_lease_and_fresh_contact_outweighs_down() {
        // `node_updates` maps each member state and voice; the states that matter.
        for (state, voice, want) in [
            (MemberState::Suspect, Voice::Lapsed, NodeStatus::Down),
            (MemberState::Suspect, Voice::Unsure, NodeStatus::Up),
            (MemberState::Suspect, Voice::Fresh, NodeStatus::Up),
            (MemberState::Alive, Voice::Lapsed, NodeStatus::Up),
            (MemberState::Down, Voice::Fresh, NodeStatus::Up),
            (MemberState::Down, Voice::Unsure, NodeStatus::Down),
            (MemberState::Down, Voice::Lapsed, NodeStatus::Down),
            (MemberState::Left, Voice::Fresh, NodeStatus::Left),
        ] {
            assert_eq!(status_of(state, voice), want, "{state:?} with {voice:?}");
        }
    }
}
