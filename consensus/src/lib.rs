//! blx consensus: the cluster's replicated state and the autopilot that manages the Raft
//! voter set by itself.
//!
//! ```text
//!  API / CLI ──Command──▶ validate ──▶ Raft log (openraft) ──▶ apply ──▶ ClusterState
//!                                                                   (kv, config + history)
//!  membership events ──▶ autopilot::plan(nodes, raft, config) ──▶ add_learner / change_membership
//! ```
//!
//! Both [`state`] and [`autopilot`] are pure: no IO, no clock, ordered collections only, so the
//! simulator runs them as they are. The log stores are [`rocks`] (the agent's) and [`mem`] (the
//! simulator's), with [`durable`] saying which entries are on disk; [`network`] carries Raft RPC
//! over any byte transport, and [`node`] puts them together for the agent.

pub mod access;
pub mod authority;
pub mod autopilot;
pub mod durable;
pub mod machine;
pub mod mem;
pub mod network;
pub mod node;
#[cfg(feature = "rocks")]
pub mod rocks;
pub mod runtime;
pub mod state;
pub mod stats;
mod window;
pub mod workload;

#[cfg(test)]
mod durable_cluster_test;
#[cfg(all(test, feature = "rocks"))]
mod store_suite;
