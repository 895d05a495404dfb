//! Node identity: a stable id persisted in the data dir, the gossip address, and a generation
//! that every restart renews so the cluster can tell a restarted node from its stale past.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's permanent id: 64 random bits chosen when its data dir is created. Every SWIM packet
/// carries two ids, so they are kept short; collisions in a cluster of thousands are negligible.
///
/// The id is also the name in the node's certificate (see [`NodeId::dns_name`]), so a TLS
/// handshake binds a connection to the id that gossip announces.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 8]);

impl NodeId {
    /// The all-zero id, used for a seed whose id is not known yet.
    pub const UNKNOWN: NodeId = NodeId([0; 8]);

    /// Makes an id from random bytes supplied by the caller.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        NodeId(bytes)
    }

    /// True for [`NodeId::UNKNOWN`].
    pub fn is_unknown(&self) -> bool {
        *self == Self::UNKNOWN
    }

    /// The first 8 hex digits, for tables and logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }

    /// The DNS name carried by this node's certificate: `<16 hex digits>.node.blx`.
    pub fn dns_name(&self) -> String {
        format!("{self}.{NODE_DNS_SUFFIX}")
    }

    /// Parses a name made by [`NodeId::dns_name`].
    pub fn from_dns_name(name: &str) -> Option<Self> {
        let hex = name.strip_suffix(NODE_DNS_SUFFIX)?.strip_suffix('.')?;
        hex.parse().ok()
    }
}

/// The suffix of every node certificate's DNS name; the bare suffix is a name every node
/// certificate also carries, used to dial a seed whose id is not known yet.
pub const NODE_DNS_SUFFIX: &str = "node.blx";

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// A string that is not 32 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("a node id is 16 hex digits, got {0:?}")]
pub struct ParseNodeIdError(String);

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseNodeIdError(s.chars().take(64).collect());
        if s.len() != 16 || !s.is_ascii() {
            return Err(err());
        }
        let mut out = [0u8; 8];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(NodeId(out))
    }
}

/// What foca gossips about a node: its id, its gossip address and its generation.
///
/// Two identities with the same address conflict; the higher `(generation, id)` wins, so a
/// restarted node (whose generation was bumped on start) replaces its stale self everywhere and
/// the member list stays bounded by the number of addresses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The permanent node id.
    pub id: NodeId,
    /// Where the node's QUIC endpoint listens.
    pub addr: SocketAddr,
    /// Bumped on every start of the agent and on every renewal.
    pub generation: u64,
}

impl NodeIdentity {
    /// An identity standing for a seed address whose node id is not known yet.
    pub fn seed(addr: SocketAddr) -> Self {
        NodeIdentity {
            id: NodeId::UNKNOWN,
            addr,
            generation: 0,
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.id.short(), self.addr, self.generation)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            generation: self.generation.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.id) > (adversary.generation, adversary.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn node_id_round_trips_through_text_and_dns_name() {
        let id = NodeId::from_random([0xab; 8]);
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        assert_eq!(NodeId::from_dns_name(&id.dns_name()), Some(id));
        assert_eq!(NodeId::from_dns_name("node.blx"), None);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("é".repeat(8).parse::<NodeId>().is_err());
    }

    #[test]
    fn a_renewed_identity_wins_the_address() {
        let old = NodeIdentity {
            id: NodeId([1; 8]),
            addr: "127.0.0.1:1".parse().unwrap(),
            generation: 3,
        };
        let new = old.renew().unwrap();
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }
}
