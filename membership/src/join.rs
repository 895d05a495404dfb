//! The joiner's side of admission: dial an agent with the join ALPN, pin the CA the token names,
//! prove the token's secret, and receive a node certificate.

use std::net::SocketAddr;

use crate::identity::NODE_DNS_SUFFIX;
use crate::identity::NodeId;
use crate::quic::{CidRng, client_config, exchange};
use crate::tls::{NodeCredentials, PIN_MISMATCH, PendingKey, join_client_config, node_id_of};
use crate::token::{JoinRefusal, JoinToken};
use crate::wire::{ControlRequest, ControlResponse, JoinRequest};

/// Why a join attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Nothing answered at the address.
    #[error("no blx agent answered at {addr}: {reason}")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The agent there belongs to another cluster.
    #[error("the agent at {0} belongs to a different cluster than the one this token names")]
    WrongCluster(SocketAddr),
    /// The cluster refused the token.
    #[error(transparent)]
    Refused(#[from] JoinRefusal),
    /// The exchange broke the protocol.
    #[error("join with {addr} failed: {reason}")]
    Protocol {
        /// Where.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// What a successful join yields.
pub struct Joined {
    /// The node's new credentials.
    pub credentials: NodeCredentials,
    /// Members to announce to.
    pub members: Vec<SocketAddr>,
}

/// Asks the agent at `addr` to admit this node with `token`, from `endpoint` (the joiner's own,
/// which has no server side yet). The node's key is made from `key_seed`.
pub async fn request_join(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &JoinToken,
    key_seed: [u8; 32],
    cids: &CidRng,
    time: std::sync::Arc<dyn rustls::time_provider::TimeProvider>,
) -> Result<Joined, JoinError> {
    let proto = |reason: String| JoinError::Protocol { addr, reason };
    let pending = PendingKey::generate(key_seed).map_err(|e| proto(e.to_string()))?;
    let tls = join_client_config(token.ca_fingerprint, time).map_err(|e| proto(e.to_string()))?;
    let client = client_config(tls, cids).map_err(|e| proto(e.to_string()))?;
    let connecting = endpoint
        .connect_with(client, addr, NODE_DNS_SUFFIX)
        .map_err(|e| proto(e.to_string()))?;
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) if e.to_string().contains(PIN_MISMATCH) => {
            return Err(JoinError::WrongCluster(addr));
        }
        Err(e) => {
            return Err(JoinError::Unreachable {
                addr,
                reason: e.to_string(),
            });
        }
    };
    let request = ControlRequest::Join(JoinRequest {
        token_id: token.id,
        secret: token.secret,
        csr_der: pending.csr_der.clone(),
    });
    let response = exchange(&conn, &request)
        .await
        .map_err(|e| proto(e.to_string()))?;
    conn.close(0u32.into(), b"joined");
    match response {
        ControlResponse::Joined(grant) => {
            if grant.node == NodeId::UNKNOWN || node_id_of(&grant.cert_der) != Some(grant.node) {
                return Err(proto(format!(
                    "the granted certificate does not name the assigned id {}",
                    grant.node
                )));
            }
            let credentials = pending.into_credentials(grant.node, grant.cert_der, grant.ca_der);
            if credentials.ca_fingerprint() != token.ca_fingerprint {
                return Err(JoinError::WrongCluster(addr));
            }
            Ok(Joined {
                credentials,
                members: grant.members,
            })
        }
        ControlResponse::Refused(refusal) => Err(JoinError::Refused(refusal)),
        ControlResponse::Failed(reason) => Err(proto(reason)),
        other => Err(proto(format!("unexpected answer {other:?}"))),
    }
}
