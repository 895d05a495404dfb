//! The transport seam between the SWIM driver and the network, so the simulator can swap QUIC
//! for a simulated network ([`crate::quic::QuicTransport`] is the real one).

use std::net::SocketAddr;

use bytes::Bytes;

use crate::identity::{NodeId, NodeIdentity};

/// A datagram received from an authenticated member.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The node id named by the sender's verified certificate.
    pub from: NodeId,
    /// The sender's address.
    pub addr: SocketAddr,
    /// The datagram, still encoded.
    pub bytes: Bytes,
}

/// Sends gossip datagrams. Delivery is best effort, like UDP: SWIM tolerates loss.
pub trait Transport: Send + Sync + 'static {
    /// Queues `bytes` for `to`; never blocks. A `to` whose id is unknown (a seed) is dialed by
    /// address alone and accepted if its certificate is signed by the cluster CA.
    fn send(&self, to: &NodeIdentity, bytes: Bytes);
}
