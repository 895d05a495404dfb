//! The agent's answers to control requests: admission and token management.
//!
//! The cluster CA, the join-token records and the record of admitted node ids live in the
//! replicated state (the first agent moves its CA and bootstrap token there as soon as
//! consensus is up). Every member answers from a linearizable read of that state and changes
//! it through Raft, so any member can admit a node. Without that read (no quorum, no leader,
//! the cluster still starting) the answer is a refusal that says so: nothing is ever served
//! from a local copy, which revocations would not reach.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blx_consensus::authority::{AdmittedNode, AuthorityCommand, AuthorityState};
use blx_consensus::state::{Applied, Command, CommandError};
use blx_membership::quic::{Caller, ControlService};
use blx_membership::store::FileTokenStore;
use blx_membership::tls::{ClusterCa, Validity};
use blx_membership::token::{JoinRefusal, MemTokenStore, TokenAuthority, TokenId, TokenInfo};
use blx_membership::wire::{ControlRequest, ControlResponse, JoinGrant, JoinRequest};
use blx_membership::{MemberState, Membership, NodeId};

use crate::world::{Entropy, WallClock};

/// The CA and the token records of the agent that bootstrapped the cluster, in its data dir
/// until they are in the replicated state.
pub(crate) struct Authority {
    pub(crate) ca: ClusterCa,
    pub(crate) tokens: TokenAuthority<FileTokenStore>,
}

/// Why the replicated CA and tokens could not be read.
enum Unreadable {
    /// No linearizable read (no quorum, no leader, still starting): try again.
    NoQuorum(String),
    /// The state holds a CA that does not parse.
    Broken(String),
}

/// Serves control requests for one agent.
pub(crate) struct AgentControl {
    bootstrap: Option<Mutex<Authority>>,
    self_id: NodeId,
    /// How long the certificates this agent signs are valid.
    cert_validity: Duration,
    clock: Arc<dyn WallClock>,
    entropy: Entropy,
    cluster: crate::raft::ClusterCell,
    membership: OnceLock<Membership>,
}

impl AgentControl {
    pub(crate) fn new(
        bootstrap: Option<Authority>,
        self_id: NodeId,
        cert_validity: Duration,
        clock: Arc<dyn WallClock>,
        entropy: Entropy,
    ) -> Self {
        AgentControl {
            bootstrap: bootstrap.map(Mutex::new),
            self_id,
            cert_validity,
            clock,
            entropy,
            cluster: Default::default(),
            membership: OnceLock::new(),
        }
    }

    /// Starts answering consensus traffic.
    pub(crate) fn set_cluster(&self, cluster: crate::raft::Cluster) {
        let _ = self.cluster.set(cluster);
    }

    pub(crate) fn attach(&self, membership: Membership) {
        let _ = self.membership.set(membership);
    }

    fn bootstrap(&self) -> Option<std::sync::MutexGuard<'_, Authority>> {
        self.bootstrap
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The replicated CA and token records, from a linearizable read.
    async fn replicated(
        &self,
    ) -> Result<(&crate::raft::Cluster, AuthorityState, ClusterCa), Unreadable> {
        let cluster = self
            .cluster
            .get()
            .ok_or_else(|| Unreadable::NoQuorum("consensus is starting".into()))?;
        let state = cluster
            .read(false)
            .await
            .map_err(|e| Unreadable::NoQuorum(e.to_string()))?;
        let replicated = state.authority.ok_or_else(|| {
            Unreadable::NoQuorum("the cluster CA is not in the replicated state yet".into())
        })?;
        let ca = ClusterCa::from_pem(&replicated.ca_cert_pem, &replicated.ca_key_pem)
            .map_err(|e| Unreadable::Broken(format!("the replicated CA: {e}")))?;
        Ok((cluster, replicated, ca))
    }

    /// Serves a request from a linearizable read of the replicated CA and tokens; refuses
    /// it, saying why, when that read cannot be made.
    pub(crate) async fn serve(&self, request: ControlRequest) -> ControlResponse {
        let no_quorum = |why: String| {
            tracing::warn!(reason = %why, "control request refused: no quorum");
            match request {
                ControlRequest::Join(_) => ControlResponse::Refused(JoinRefusal::NoQuorum),
                _ => ControlResponse::Failed(format!(
                    "no quorum: the join tokens cannot be read or changed right now: {why}"
                )),
            }
        };
        let (cluster, replicated, ca) = match self.replicated().await {
            Ok(r) => r,
            Err(Unreadable::NoQuorum(why)) => return no_quorum(why),
            Err(Unreadable::Broken(e)) => return ControlResponse::Failed(e),
        };
        let now = self.clock.now_unix();
        let mut tokens = TokenAuthority::new(
            MemTokenStore::new(replicated.tokens.clone()),
            ca.fingerprint(),
        );
        let failed = |e: String| ControlResponse::Failed(e);
        match request {
            ControlRequest::Join(req) => {
                tracing::Instrument::instrument(
                    self.admit(cluster, &replicated, &ca, &tokens, req, now),
                    tracing::info_span!("agent.admit", otel.kind = "server"),
                )
                .await
            }
            ControlRequest::TokenCreate { ttl_secs } => {
                if ttl_secs == 0 || ttl_secs > crate::duration::MAX_TTL.as_secs() {
                    return failed("ttl must be between 1 second and a year".into());
                }
                let token = match tokens.issue(now, ttl_secs, self.entropy.bytes()) {
                    Ok(t) => t,
                    Err(e) => return failed(e.to_string()),
                };
                let Some(record) = tokens.store().records().get(&token.id).cloned() else {
                    return failed("the new token has no record".into());
                };
                let cmd = Command::Authority(AuthorityCommand::TokenPut(record));
                match cluster.write(cmd).await {
                    Ok(Ok(_)) => ControlResponse::Token(token.to_string()),
                    Ok(Err(e)) => failed(e.to_string()),
                    Err(e) => failed(format!("no quorum: {e}")),
                }
            }
            ControlRequest::TokenList => tokens
                .list(now)
                .map(ControlResponse::Tokens)
                .unwrap_or_else(|e| failed(e.to_string())),
            ControlRequest::TokenRevoke { id } => {
                let cmd = Command::Authority(AuthorityCommand::TokenRevoke(id));
                match cluster.write(cmd).await {
                    Ok(Ok(Applied::Revoked { existed })) => ControlResponse::Revoked(existed),
                    Ok(Ok(other)) => failed(format!("unexpected result {other:?}")),
                    Ok(Err(e)) => failed(e.to_string()),
                    Err(e) => failed(format!("no quorum: {e}")),
                }
            }
            ControlRequest::Service { .. } | ControlRequest::Renew { .. } => {
                failed("not a token request".into())
            }
        }
    }

    /// Signs a fresh certificate for member `node` (the id its current certificate names),
    /// from a linearizable read of the replicated CA; refused for a node the cluster never
    /// admitted or has removed.
    pub(crate) async fn renew(&self, node: NodeId, csr_der: &[u8]) -> ControlResponse {
        let (_, replicated, ca) = match self.replicated().await {
            Ok(r) => r,
            Err(Unreadable::NoQuorum(why)) => {
                return ControlResponse::Failed(format!("no quorum: {why}"));
            }
            Err(Unreadable::Broken(e)) => return ControlResponse::Failed(e),
        };
        match replicated.nodes.get(&node) {
            Some(n) if n.revoked => {
                return ControlResponse::Failed(format!(
                    "node {node} was removed from the cluster"
                ));
            }
            Some(_) => {}
            None => return ControlResponse::Failed(format!("node {node} was never admitted")),
        }
        let validity = Validity::starting(self.clock.now_unix(), self.cert_validity);
        match ca.sign_request(csr_der, node, validity) {
            Ok(cert) => {
                tracing::info!(%node, until = validity.not_after_unix, "renewed a node certificate");
                ControlResponse::Renewed(cert.to_vec())
            }
            Err(e) => ControlResponse::Failed(format!("bad certificate request: {e}")),
        }
    }

    /// Admits a joiner: checks its token's secret, assigns it a fresh id, commits the
    /// admission (which checks the token again against the committed records), and only then
    /// hands out the certificate.
    async fn admit(
        &self,
        cluster: &crate::raft::Cluster,
        replicated: &AuthorityState,
        ca: &ClusterCa,
        tokens: &TokenAuthority<MemTokenStore>,
        req: JoinRequest,
        now: u64,
    ) -> ControlResponse {
        match tokens.check(req.token_id, &req.secret, now) {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                tracing::warn!(token = %req.token_id, %refusal, "join refused");
                return ControlResponse::Refused(refusal);
            }
            Err(e) => return ControlResponse::Failed(e.to_string()),
        }
        let members = self
            .membership
            .get()
            .map(|m| m.members())
            .unwrap_or_default();
        let Some(node) = (0..16)
            .map(|_| NodeId::from_random(self.entropy.bytes()))
            .find(|id| {
                !id.is_unknown() && !replicated.nodes.contains_key(id) && !members.contains_key(id)
            })
        else {
            return ControlResponse::Failed("could not draw a free node id".into());
        };
        let validity = Validity::starting(now, self.cert_validity);
        let cert = match ca.sign_request(&req.csr_der, node, validity) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::warn!(error = %e, "join request with a bad certificate request");
                return ControlResponse::Refused(JoinRefusal::BadRequest);
            }
        };
        let cmd = Command::Authority(AuthorityCommand::Admit {
            node,
            token: req.token_id,
            at: now,
        });
        match cluster.write(cmd).await {
            Ok(Ok(_)) => {
                tracing::info!(%node, token = %req.token_id, "admitted a new node");
                ControlResponse::Joined(JoinGrant {
                    node,
                    cert_der: cert.to_vec(),
                    ca_der: ca.cert_der().to_vec(),
                    members: self.member_addrs(),
                })
            }
            Ok(Err(CommandError::JoinRefused(refusal))) => {
                tracing::warn!(token = %req.token_id, %refusal, "join refused at commit");
                ControlResponse::Refused(refusal)
            }
            Ok(Err(e)) => ControlResponse::Failed(e.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "join refused: the admission did not commit");
                ControlResponse::Refused(JoinRefusal::NoQuorum)
            }
        }
    }

    /// Moves the bootstrap CA and tokens into the replicated state, once consensus answers.
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
                        let Some(authority) = self.bootstrap() else {
                            return;
                        };
                        match authority.tokens.list_records() {
                            Ok(tokens) => AuthorityState {
                                ca_cert_pem: authority.ca.cert_pem(),
                                ca_key_pem: authority.ca.key_pem(),
                                tokens,
                                nodes: [(
                                    self.self_id,
                                    AdmittedNode {
                                        admitted_unix: self.clock.now_unix(),
                                        token: None,
                                        revoked: false,
                                    },
                                )]
                                .into(),
                                api_tokens: Default::default(),
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

impl ControlService for AgentControl {
    fn handle(
        &self,
        caller: Caller,
        request: ControlRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ControlResponse> + Send + '_>> {
        tracing::trace!(?caller, "control request");
        Box::pin(async move {
            match request {
                ControlRequest::Service { service, payload } => {
                    match (caller, self.cluster.get()) {
                        (Caller::Member(from), Some(cluster)) => {
                            cluster.serve(from, service, &payload).await
                        }
                        (Caller::Joiner(_), _) => ControlResponse::Failed("members only".into()),
                        (_, None) => ControlResponse::Failed("consensus is starting".into()),
                    }
                }
                ControlRequest::Renew { csr_der } => match caller {
                    Caller::Member(from) => self.renew(from, &csr_der).await,
                    Caller::Joiner(_) => ControlResponse::Failed("members only".into()),
                },
                other => self.serve(other).await,
            }
        })
    }
}
