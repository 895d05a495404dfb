//! The invariants every run is held to, one module each. Each checker is fed a [`Sample`] of
//! every host now and then while the run goes on, and once more at the end; it reports the
//! first violation it sees.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use blx_consensus::node::Status;
use blx_consensus::state::ClusterState;
use blx_membership::{MemberState, NodeId};

pub(crate) mod acknowledged_writes;
pub(crate) mod capacity;
pub(crate) mod convergence;
pub(crate) mod leader_per_term;
pub(crate) mod linearizable;
pub(crate) mod single_vm_copy;
pub(crate) mod state_machines_agree;

/// What one host looks like at one moment.
#[derive(Clone, Debug)]
pub(crate) struct HostSample {
    /// The host's index.
    pub(crate) index: usize,
    /// Its node id, once its agent has one.
    pub(crate) id: Option<NodeId>,
    /// Whether its agent runs (not crashed, and started).
    pub(crate) running: bool,
    /// Raft's view, while it runs.
    pub(crate) raft: Option<Status>,
    /// The member table's states, while it runs.
    pub(crate) members: BTreeMap<NodeId, MemberState>,
    /// The applied index and state, while it runs.
    pub(crate) applied: Option<(u64, ClusterState)>,
}

/// Every host at one moment, and where VMs actually run.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    /// Virtual time.
    pub(crate) at: Duration,
    /// Each host.
    pub(crate) hosts: Vec<HostSample>,
    /// (VM, host) → since when it runs there.
    pub(crate) vms: BTreeMap<(String, IpAddr), Duration>,
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// Virtual time it was seen.
    pub at: Duration,
    /// What was seen.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant {} broken at {:.3}s: {}",
            self.invariant,
            self.at.as_secs_f64(),
            self.detail
        )
    }
}

/// A digest of a state, to compare states cheaply.
pub(crate) fn state_digest(state: &ClusterState) -> [u8; 32] {
    let bytes = blx_consensus::machine::encode(state);
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
