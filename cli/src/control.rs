//! The agent's answers to control requests: admission and token management.
//!
//! Once the cluster CA and token records are in the replicated state (the first agent moves
//! them there as soon as consensus is up), every member answers from a linearizable read of
//! that state and changes tokens through Raft, so any member can admit a node. Before that,
//! and whenever no leader is reachable, the first agent's local copy answers (the authority
//! role), and other members forward to it.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blx_consensus::authority::{AuthorityCommand, AuthorityState};
use blx_consensus::state::{Applied, Command};
use blx_membership::meta::Role;
use blx_membership::quic::{Caller, ControlService, QuicTransport};
use blx_membership::store::FileTokenStore;
use blx_membership::tls::ClusterCa;
use blx_membership::token::{
    JoinRefusal, MemTokenStore, TokenAuthority, TokenId, TokenInfo, TokenStore,
};
use blx_membership::wire::{ControlRequest, ControlResponse, JoinGrant, JoinRequest};
use blx_membership::{MemberState, Membership};

use crate::world::{Entropy, WallClock};

/// The CA and the token records, on the one node that holds them.
pub(crate) struct Authority {
    pub(crate) ca: ClusterCa,
    pub(crate) tokens: TokenAuthority<FileTokenStore>,
}

/// Serves control requests for one agent.
pub(crate) struct AgentControl {
    authority: Option<Mutex<Authority>>,
    clock: Arc<dyn WallClock>,
    entropy: Entropy,
    cluster: crate::raft::ClusterCell,
    membership: OnceLock<Membership>,
    transport: OnceLock<QuicTransport>,
}

impl AgentControl {
    pub(crate) fn new(
        authority: Option<Authority>,
        clock: Arc<dyn WallClock>,
        entropy: Entropy,
    ) -> Self {
        AgentControl {
            authority: authority.map(Mutex::new),
            clock,
            entropy,
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

    /// Serves a request from the replicated CA and tokens; failing that, here if this node is
    /// the authority, or forwarded there.
    pub(crate) async fn serve(&self, request: ControlRequest) -> ControlResponse {
        if let Some(response) = self.serve_replicated(&request).await {
            return response;
        }
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

    /// Answers from the replicated state, or None when it holds no CA yet or no leader
    /// answers (the caller falls back to the authority node).
    async fn serve_replicated(&self, request: &ControlRequest) -> Option<ControlResponse> {
        let cluster = self.cluster.get()?;
        let state = cluster.read(false).await.ok()?;
        let replicated = state.authority?;
        let now = self.clock.now_unix();
        let ca = match ClusterCa::from_pem(&replicated.ca_cert_pem, &replicated.ca_key_pem) {
            Ok(ca) => ca,
            Err(e) => return Some(ControlResponse::Failed(format!("the replicated CA: {e}"))),
        };
        let mut tokens =
            TokenAuthority::new(MemTokenStore::new(replicated.tokens), ca.fingerprint());
        let failed = |e: String| Some(ControlResponse::Failed(e));
        match request {
            ControlRequest::Join(req) => {
                Some(admit(&ca, &tokens, req.clone(), now, self.member_addrs()))
            }
            ControlRequest::TokenCreate { ttl_secs } => {
                if *ttl_secs == 0 || *ttl_secs > crate::duration::MAX_TTL.as_secs() {
                    return failed("ttl must be between 1 second and a year".into());
                }
                let token = match tokens.issue(now, *ttl_secs, self.entropy.bytes()) {
                    Ok(t) => t,
                    Err(e) => return failed(e.to_string()),
                };
                let Some(record) = tokens.store().records().get(&token.id).cloned() else {
                    return failed("the new token has no record".into());
                };
                let cmd = Command::Authority(AuthorityCommand::TokenPut(record));
                match cluster.write(cmd).await {
                    Ok(Ok(_)) => Some(ControlResponse::Token(token.to_string())),
                    Ok(Err(e)) => failed(e.to_string()),
                    Err(e) => failed(e.to_string()),
                }
            }
            ControlRequest::TokenList => Some(
                tokens
                    .list(now)
                    .map(ControlResponse::Tokens)
                    .unwrap_or_else(|e| ControlResponse::Failed(e.to_string())),
            ),
            ControlRequest::TokenRevoke { id } => {
                let cmd = Command::Authority(AuthorityCommand::TokenRevoke(*id));
                match cluster.write(cmd).await {
                    Ok(Ok(Applied::Revoked { existed })) => Some(ControlResponse::Revoked(existed)),
                    Ok(Ok(other)) => failed(format!("unexpected result {other:?}")),
                    Ok(Err(e)) => failed(e.to_string()),
                    Err(e) => failed(e.to_string()),
                }
            }
            ControlRequest::Service { .. } => None,
        }
    }

    /// Moves this node's CA and tokens into the replicated state, once consensus answers.
    /// Only the first agent holds them; on every later start the state already has them.
    pub(crate) async fn replicate_authority(&self) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        loop {
            match cluster.read(false).await {
                Ok(state) if state.authority.is_some() => return,
                Ok(_) => {
                    let init = {
                        let Some(authority) = self.authority() else {
                            return;
                        };
                        match authority.tokens.list_records() {
                            Ok(tokens) => AuthorityState {
                                ca_cert_pem: authority.ca.cert_pem(),
                                ca_key_pem: authority.ca.key_pem(),
                                tokens,
                            },
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the local token records");
                                return;
                            }
                        }
                    };
                    match cluster
                        .write(Command::Authority(AuthorityCommand::Init(init)))
                        .await
                    {
                        Ok(Ok(_)) => {
                            tracing::info!("the cluster CA and join tokens are now replicated");
                            return;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "replicating the CA"),
                        Err(e) => tracing::debug!(error = %e, "replicating the CA"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "waiting for consensus to replicate the CA"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
        let now = self.clock.now_unix();
        let store_failed =
            |e: blx_membership::token::StoreError| ControlResponse::Failed(e.to_string());
        match request {
            ControlRequest::Join(req) => {
                let members = self.member_addrs();
                admit(&authority.ca, &authority.tokens, req, now, members)
            }
            ControlRequest::TokenCreate { ttl_secs } => {
                if ttl_secs == 0 || ttl_secs > crate::duration::MAX_TTL.as_secs() {
                    return ControlResponse::Failed(
                        "ttl must be between 1 second and a year".into(),
                    );
                }
                match authority.tokens.issue(now, ttl_secs, self.entropy.bytes()) {
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

fn admit<S: TokenStore>(
    ca: &ClusterCa,
    tokens: &TokenAuthority<S>,
    req: JoinRequest,
    now: u64,
    members: Vec<std::net::SocketAddr>,
) -> ControlResponse {
    match tokens.check(req.token_id, &req.secret, now) {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => {
            tracing::warn!(token = %req.token_id, %refusal, "join refused");
            return ControlResponse::Refused(refusal);
        }
        Err(e) => return ControlResponse::Failed(e.to_string()),
    }
    match ca.sign_request(&req.csr_der, req.node) {
        Ok(cert) => {
            tracing::info!(node = %req.node, token = %req.token_id, "admitted a new node");
            ControlResponse::Joined(JoinGrant {
                cert_der: cert.to_vec(),
                ca_der: ca.cert_der().to_vec(),
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
