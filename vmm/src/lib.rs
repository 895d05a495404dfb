//! blx VMM worker: boots, watches and stops the microVMs placed on this node.
//!
//! Not built yet. It will hold the `Driver` trait with the QEMU microvm and process drivers,
//! and a pure `reconcile(desired, observed) -> actions`.
