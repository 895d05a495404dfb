//! The blx agent as a library: [`agent::run`] assembles one agent (membership, consensus, the
//! leader's controllers, the node's VMM worker and the HTTP API) from an
//! [`config::AgentConfig`] and a [`world::World`], the one value that holds everything the
//! agent takes from its surroundings: sockets, the Raft stores, VM drivers, the wall clock,
//! entropy, host facts and the stop signal.
//!
//! ```text
//!   blx binary ── flags ──▶ AgentConfig ─┐
//!              ── World::real() ─────────┼──▶ agent::run ──▶ membership, consensus,
//!   simulator  ── simulated World ───────┘                   controller, worker, API
//! ```
//!
//! The binary builds the real world (OS sockets, RocksDB, QEMU and process drivers, the
//! system clock, the OS random source, SIGINT/SIGTERM); the simulator builds a simulated one
//! and starts many agents in one process. Nothing in the agent asks which world it is in.
//! The argument parser and the client commands live in the binary, not here.

pub mod access;
pub mod agent;
pub mod api;
mod api_tls;
pub mod api_vms;
pub mod audit;
pub mod config;
mod console;
mod control;
mod controller;
pub mod duration;
mod follow;
mod leader_loss;
mod metrics;
mod raft;
mod renewal;
pub mod size;
pub mod telemetry;
mod worker;
pub mod world;

pub use agent::{Agent, AgentView, run, start};
pub use config::AgentConfig;
pub use world::World;
