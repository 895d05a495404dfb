//! blx membership: who is in the cluster, who may join, and who has failed.
//!
//! SWIM failure detection and dissemination by [foca], driven sans-IO by [`swim::Swim`]; gossip
//! travels as QUIC datagrams ([`quic::QuicTransport`]) between nodes that each hold a
//! certificate signed by the cluster CA; a node without one may only ask to join, with a token
//! ([`token`], [`join`]). On a LAN, agents find each other over mDNS ([`discovery`]).
//!
//! ```text
//!   mDNS / --seed ──▶ join (token, pinned CA) ──▶ node certificate
//!                                                      │
//!   QUIC endpoint (mTLS) ──datagrams──▶ driver ──▶ Swim (foca + member table + metadata)
//!          ▲                              │                 │
//!          └──────────── send ────────────┘                 └──▶ MemberEvent stream
//! ```
//!
//! This crate does not know about Raft, scheduling or VMs; it hands a [`swim::MemberEvent`]
//! stream and a member table to whoever builds on it. Token records sit behind the
//! [`token::TokenStore`] trait so replicated state can hold them later.

pub mod discovery;
pub mod driver;
pub mod identity;
pub mod join;
pub mod meta;
pub mod quic;
pub mod store;
pub mod swim;
pub mod tls;
pub mod token;
pub mod transport;
pub mod wire;

pub use driver::Membership;
pub use identity::{NodeId, NodeIdentity};
pub use meta::NodeMeta;
pub use swim::{Member, MemberEvent, MemberState, Swim, SwimConfig};
