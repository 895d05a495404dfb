//! The leader's workload controller: records nodes as membership sees them, and runs the
//! scheduler whenever VMs or nodes change (and every second, so down-node grace periods
//! expire). Every decision is made by pure code in `blx_consensus::workload`; this task only
//! feeds it and proposes what it returns.

use std::time::Duration;

use blx_consensus::state::Command;
use blx_consensus::workload::{NodeStatus, NodeUpdate, node_changes, plan_schedule};
use blx_membership::{MemberState, Membership};
use blx_scheduler::Resources;

use crate::raft::Cluster;

/// Runs until the task is dropped; does work only while this node leads.
pub(crate) async fn run(cluster: Cluster, membership: Membership, mut seed: u64) {
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
        let seen = node_updates(&membership);
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
        let plan = cluster
            .node
            .with_local_state(|s| plan_schedule(s, cluster.clock.now_ms(), seed));
        if let Some(cmd) = plan {
            propose(&cluster, cmd).await;
        }
    }
}

async fn propose(cluster: &Cluster, cmd: blx_consensus::workload::WorkloadCommand) {
    match cluster.node.write(Command::Workload(cmd)).await {
        Ok(Ok(_)) => {}
        // Another change got in first; the next pass plans against the new state.
        Ok(Err(e)) => tracing::debug!(error = %e, "scheduling pass refused"),
        Err(e) => tracing::debug!(error = %e, "scheduling pass not proposed"),
    }
}

/// Every member as a node record would hold it.
fn node_updates(membership: &Membership) -> Vec<NodeUpdate> {
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
                    MemberState::Down => NodeStatus::Down,
                    MemberState::Left => NodeStatus::Left,
                },
            })
        })
        .collect()
}
