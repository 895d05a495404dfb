//! blx consensus: the cluster's replicated state on openraft and RocksDB.
//!
//! Not built yet. It will own the openraft type config, `Command` and `ClusterState`, the
//! RocksDB log store and state machine, Raft RPC over the membership crate's QUIC endpoint,
//! and the autopilot controller that promotes learners and replaces dead voters.
