//! blx scheduler: placement of microVMs on nodes, as pure functions of cluster state.
//!
//! No IO, no async runtime, no clock: [`schedule`] takes the nodes, what already runs on them,
//! the VMs waiting for a place and a seed, and returns a [`Plan`]. Same inputs, same plan.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod constraint;
mod plan;

pub use constraint::{Constraint, ConstraintError, Op, Preference};
pub use plan::schedule;

/// What a VM needs, or what a node has.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in MiB.
    pub disk_mib: u64,
}

/// How placements choose among nodes that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Fill the fullest node that fits first, leaving whole nodes free for big VMs.
    #[default]
    Binpack,
    /// Prefer the emptiest node, spreading load and failure impact.
    Spread,
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Stable node id (hex), the key placements refer to.
    pub id: String,
    /// Human name, used in reasons.
    pub name: String,
    /// Total capacity offered to VMs.
    pub capacity: Resources,
    /// Labels constraints match against. The zone is also visible as label `zone`.
    pub labels: BTreeMap<String, String>,
    /// Failure zone, for spread.
    pub zone: Option<String>,
    /// False when the node is down, cordoned or draining: nothing new lands on it, and what
    /// runs on it is not preempted for new work.
    pub schedulable: bool,
}

/// A VM that already holds resources on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// VM name.
    pub vm: String,
    /// Node id.
    pub node: String,
    /// What it holds.
    pub resources: Resources,
    /// Its priority, 0 to 1000.
    pub priority: u16,
    /// Its anti-affinity group, if any.
    pub group: Option<String>,
}

/// A VM waiting for a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRequest {
    /// VM name, unique in the cluster.
    pub name: String,
    /// What it needs.
    pub resources: Resources,
    /// 0 to 1000; higher places first and may preempt lower.
    pub priority: u16,
    /// Hard constraints: every one must hold on the chosen node.
    pub constraints: Vec<Constraint>,
    /// Soft preferences, weighed into the score.
    pub preferences: Vec<Preference>,
    /// Anti-affinity group: no two VMs of one group share a node.
    pub group: Option<String>,
    /// Prefer the zone holding the fewest VMs of the same group.
    pub spread_zones: bool,
}

/// One VM assigned to one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM name.
    pub vm: String,
    /// Node id.
    pub node: String,
}

/// A running VM evicted so a higher-priority VM fits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    /// The evicted VM.
    pub victim: String,
    /// The node it was evicted from.
    pub node: String,
    /// The VM that takes its place.
    pub by: String,
}

/// A VM left pending, and why, in words a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// VM name.
    pub vm: String,
    /// For example "needs 8192 MiB memory; the largest free is 4096 MiB on n3".
    pub reason: String,
}

/// The outcome of one scheduling pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// New placements, in the order they were decided.
    pub placements: Vec<Placement>,
    /// Evictions the placements depend on.
    pub preemptions: Vec<Preemption>,
    /// VMs that stay pending.
    pub unplaced: Vec<Unplaced>,
}
