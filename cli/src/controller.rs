//! The leader's workload controller: records nodes as membership sees them, and runs the
//! scheduler whenever VMs or nodes change (and every second, so down-node grace periods
//! expire). Every decision is made by pure code in `blx_consensus::workload`; this task only
//! feeds it and proposes what it returns.

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
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            r = applied.changed() => if r.is_err() { return },
            r = members.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        if !cluster.node.is_leader() {
            continue;
        }
        let seen = node_updates(&membership, |id| contact.fresh(crate::raft::raft_id(id)));
        let changed = cluster.node.with_local_state(|s| node_changes(s, &seen));
        if !changed.is_empty() {
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

/// Every member as a node record would hold it. A member that gossip says is down but that
/// `answers_raft` (it answered this leader a moment ago) stays up: see
/// [`crate::raft::RaftContact`]. Failing it over would stop VMs on a node that runs them and
/// hears the leader, and place them again elsewhere.
fn node_updates(
    membership: &Membership,
    answers_raft: impl Fn(blx_membership::NodeId) -> bool,
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
                status: match m.state {
                    MemberState::Alive | MemberState::Suspect => NodeStatus::Up,
                    MemberState::Down if answers_raft(m.identity.id) => {
                        tracing::debug!(
                            node = %m.identity.id,
                            "gossip says down, but it answered Raft just now: kept up"
                        );
                        NodeStatus::Up
                    }
                    MemberState::Down => NodeStatus::Down,
                    MemberState::Left => NodeStatus::Left,
                },
            })
        })
        .collect()
}
