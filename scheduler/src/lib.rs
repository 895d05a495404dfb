//! blx scheduler: placement of microVMs on nodes, as pure functions of cluster state.
//!
//! Not built yet. It will hold resources, strategies (binpack, spread), constraints,
//! affinities, priorities and preemption, with no IO and no async runtime.
