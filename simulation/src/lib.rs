//! blx simulation: a whole cluster in one process, under a seeded virtual-time network with
//! partitions, loss, crashes and clock skew, replayable from its seed.
//!
//! Not built yet. The membership crate already runs its SWIM state machine sans-IO on an
//! in-memory network in its unit tests; this crate will drive the real agents under turmoil.
