//! The agent's answers to control requests: admission and token management. The authority
//! (the node holding the CA key) answers itself; any other member forwards to it over QUIC.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blx_membership::meta::Role;
use blx_membership::quic::{Caller, ControlService, QuicTransport};
use blx_membership::store::FileTokenStore;
use blx_membership::tls::ClusterCa;
use blx_membership::token::{JoinRefusal, TokenAuthority, TokenId, TokenInfo};
use blx_membership::wire::{ControlRequest, ControlResponse, JoinGrant, JoinRequest};
use blx_membership::{MemberState, Membership};

/// The CA and the token records, on the one node that holds them.
pub(crate) struct Authority {
    pub(crate) ca: ClusterCa,
    pub(crate) tokens: TokenAuthority<FileTokenStore>,
}

/// Serves control requests for one agent.
pub(crate) struct AgentControl {
    authority: Option<Mutex<Authority>>,
    cluster: crate::raft::ClusterCell,
    membership: OnceLock<Membership>,
    transport: OnceLock<QuicTransport>,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bytes from the operating system's secure random source.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("the OS random source works");
    out
}

impl AgentControl {
    pub(crate) fn new(authority: Option<Authority>) -> Self {
        AgentControl {
            authority: authority.map(Mutex::new),
            cluster: Default::default(),
            membership: OnceLock::new(),
            transport: OnceLock::new(),
        }
    }

    /// Starts answering consensus traffic.
    pub(crate) fn set_cluster(&self, cluster: crate::raft::Cluster) {
        let _ = self.cluster.set(cluster);
    }

    pub(crate) fn attach(&self, membership: Membership, transport: QuicTransport) {
        let _ = self.membership.set(membership);
        let _ = self.transport.set(transport);
    }

    fn authority(&self) -> Option<std::sync::MutexGuard<'_, Authority>> {
        self.authority
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Serves a request here if this node is the authority, or forwards it there.
    pub(crate) async fn serve(&self, request: ControlRequest) -> ControlResponse {
        if self.authority.is_some() {
            return self.serve_locally(request);
        }
        let Some((addr, id)) = self.find_authority() else {
            return match request {
                ControlRequest::Join(_) => ControlResponse::Refused(JoinRefusal::NoAuthority),
                _ => ControlResponse::Failed(
                    "no alive member holds the cluster CA; token operations are unavailable".into(),
                ),
            };
        };
        let Some(transport) = self.transport.get() else {
            return ControlResponse::Failed("agent is starting".into());
        };
        match transport.request(addr, Some(id), &request).await {
            Ok(response) => response,
            Err(e) => ControlResponse::Failed(format!("forwarding to the authority failed: {e}")),
        }
    }

    fn find_authority(&self) -> Option<(std::net::SocketAddr, blx_membership::NodeId)> {
        let members = self.membership.get()?.members();
        members
            .values()
            .find(|m| {
                m.state == MemberState::Alive
                    && m.meta
                        .as_ref()
                        .is_some_and(|meta| meta.roles.contains(&Role::Authority))
            })
            .map(|m| (m.identity.addr, m.identity.id))
    }

    fn serve_locally(&self, request: ControlRequest) -> ControlResponse {
        let Some(mut authority) = self.authority() else {
            return ControlResponse::Failed("not the authority".into());
        };
        let now = now_unix();
        let store_failed =
            |e: blx_membership::token::StoreError| ControlResponse::Failed(e.to_string());
        match request {
            ControlRequest::Join(req) => {
                let members = self.member_addrs();
                admit(&authority, req, now, members)
            }
            ControlRequest::TokenCreate { ttl_secs } => {
                if ttl_secs == 0 || ttl_secs > crate::duration::MAX_TTL.as_secs() {
                    return ControlResponse::Failed(
                        "ttl must be between 1 second and a year".into(),
                    );
                }
                match authority.tokens.issue(now, ttl_secs, random()) {
                    Ok(token) => ControlResponse::Token(token.to_string()),
                    Err(e) => store_failed(e),
                }
            }
            ControlRequest::TokenList => authority
                .tokens
                .list(now)
                .map(ControlResponse::Tokens)
                .unwrap_or_else(store_failed),
            ControlRequest::TokenRevoke { id } => authority
                .tokens
                .revoke(id)
                .map(ControlResponse::Revoked)
                .unwrap_or_else(store_failed),
            ControlRequest::Service { .. } => {
                ControlResponse::Failed("not an authority request".into())
            }
        }
    }

    fn member_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.membership
            .get()
            .map(|m| {
                m.members()
                    .values()
                    .filter(|m| m.state == MemberState::Alive)
                    .map(|m| m.identity.addr)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) async fn token_create(&self, ttl: Duration) -> Result<String, String> {
        match self
            .serve(ControlRequest::TokenCreate {
                ttl_secs: ttl.as_secs(),
            })
            .await
        {
            ControlResponse::Token(t) => Ok(t),
            other => Err(failure(other)),
        }
    }

    pub(crate) async fn token_list(&self) -> Result<Vec<TokenInfo>, String> {
        match self.serve(ControlRequest::TokenList).await {
            ControlResponse::Tokens(t) => Ok(t),
            other => Err(failure(other)),
        }
    }

    pub(crate) async fn token_revoke(&self, id: TokenId) -> Result<bool, String> {
        match self.serve(ControlRequest::TokenRevoke { id }).await {
            ControlResponse::Revoked(found) => Ok(found),
            other => Err(failure(other)),
        }
    }
}

fn failure(response: ControlResponse) -> String {
    match response {
        ControlResponse::Failed(reason) => reason,
        other => format!("unexpected answer from the authority: {other:?}"),
    }
}

fn admit(
    authority: &Authority,
    req: JoinRequest,
    now: u64,
    members: Vec<std::net::SocketAddr>,
) -> ControlResponse {
    match authority.tokens.check(req.token_id, &req.secret, now) {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => {
            tracing::warn!(token = %req.token_id, %refusal, "join refused");
            return ControlResponse::Refused(refusal);
        }
        Err(e) => return ControlResponse::Failed(e.to_string()),
    }
    match authority.ca.sign_request(&req.csr_der, req.node) {
        Ok(cert) => {
            tracing::info!(node = %req.node, token = %req.token_id, "admitted a new node");
            ControlResponse::Joined(JoinGrant {
                cert_der: cert.to_vec(),
                ca_der: authority.ca.cert_der().to_vec(),
                members,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "join request with a bad certificate request");
            ControlResponse::Refused(JoinRefusal::BadRequest)
        }
    }
}

impl ControlService for AgentControl {
    fn handle(
        &self,
        caller: Caller,
        request: ControlRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ControlResponse> + Send + '_>> {
        tracing::trace!(?caller, "control request");
        Box::pin(async move {
            match request {
                ControlRequest::Service { service, payload } => match self.cluster.get() {
                    Some(cluster) => cluster.serve(service, &payload).await,
                    None => ControlResponse::Failed("consensus is starting".into()),
                },
                other => self.serve(other).await,
            }
        })
    }
}
