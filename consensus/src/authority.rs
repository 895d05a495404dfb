//! The cluster CA, the join-token records and the record of every admitted node in the
//! replicated state, so that any member can admit a node and manage tokens, and losing the
//! first agent loses none of them. Token secrets are never stored, only their hashes; the CA
//! key is, as the member that admits a joiner signs its certificate. `operator snapshot save`
//! leaves it out.
//!
//! A node id is admitted once: [`AuthorityCommand::Admit`] commits the id before its
//! certificate is signed, refuses an id that was ever admitted, and checks the token against
//! the committed records, so a token revoked before the admission commits admits no one.
//! [`AuthorityCommand::NodeRevoke`] marks a node revoked for good; every member refuses
//! certificates naming it.

use std::collections::{BTreeMap, BTreeSet};

use blx_membership::NodeId;
use blx_membership::token::{JoinRefusal, TokenId, TokenRecord};
use serde::{Deserialize, Serialize};

use crate::access::{ApiTokenRecord, MAX_API_TOKENS, MAX_NAME};
use crate::state::{ClusterState, CommandError};

/// Most token records kept.
pub const MAX_TOKENS: usize = 10_000;
/// Largest PEM document accepted for the CA certificate or key.
pub const MAX_PEM: usize = 16 * 1024;
/// Expired tokens are dropped this long after they expire (they still list as expired until
/// then).
pub const EXPIRED_KEPT_SECS: u64 = 7 * 24 * 3600;

/// The CA and the token records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityState {
    /// The CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The CA private key, PEM.
    pub ca_key_pem: String,
    /// Token records by id.
    pub tokens: BTreeMap<TokenId, TokenRecord>,
    /// Every node ever admitted, the first one included. Ids are never reused.
    pub nodes: BTreeMap<NodeId, AdmittedNode>,
    /// API token records by id (see [`crate::access`]).
    pub api_tokens: BTreeMap<TokenId, ApiTokenRecord>,
}

/// One admitted node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmittedNode {
    /// When it was admitted (the admitting member's clock, Unix seconds).
    pub admitted_unix: u64,
    /// The token it joined with; None for the node that bootstrapped the cluster.
    pub token: Option<TokenId>,
    /// Revoked by an operator (`blx node remove`): its certificates are refused everywhere.
    pub revoked: bool,
}

impl AuthorityState {
    /// The ids whose certificates every member refuses.
    pub fn revoked_nodes(&self) -> BTreeSet<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.revoked)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Changes to the CA and tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthorityCommand {
    /// Moves the first agent's CA and tokens into the replicated state; once per cluster.
    Init(AuthorityState),
    /// Adds a token record.
    TokenPut(TokenRecord),
    /// Revokes a token.
    TokenRevoke(TokenId),
    /// Records a joiner's new id, before its certificate is signed. Refused when the id was
    /// ever admitted or is all zeros, or when the token is unknown, revoked or expired at `at`.
    Admit {
        /// The id the admitting member chose.
        node: NodeId,
        /// The token the joiner proved.
        token: TokenId,
        /// The admitting member's clock, Unix seconds.
        at: u64,
    },
    /// Revokes a node for good.
    NodeRevoke(NodeId),
    /// Adds an API token record.
    ApiTokenPut(ApiTokenRecord),
    /// Revokes an API token.
    ApiTokenRevoke(TokenId),
}

/// Most admitted-node records kept (a cluster that admitted this many must start over).
pub const MAX_NODES: usize = 100_000;

impl ClusterState {
    /// The nodes whose certificates every member refuses (none before the CA is replicated).
    pub fn revoked_nodes(&self) -> BTreeSet<NodeId> {
        self.authority
            .as_ref()
            .map(AuthorityState::revoked_nodes)
            .unwrap_or_default()
    }

    pub(crate) fn validate_authority(&self, cmd: &AuthorityCommand) -> Result<(), CommandError> {
        match cmd {
            AuthorityCommand::Init(a) => {
                if self.authority.is_some() {
                    return Err(CommandError::Conflict(
                        "the cluster CA is already in the replicated state".into(),
                    ));
                }
                if a.ca_cert_pem.is_empty()
                    || a.ca_key_pem.is_empty()
                    || a.ca_cert_pem.len() > MAX_PEM
                    || a.ca_key_pem.len() > MAX_PEM
                    || a.tokens.len() > MAX_TOKENS
                    || a.tokens.iter().any(|(id, r)| *id != r.id)
                    || a.nodes.len() > MAX_NODES
                    || a.nodes.contains_key(&NodeId::UNKNOWN)
                    || a.api_tokens.len() > MAX_API_TOKENS
                    || a.api_tokens.iter().any(|(id, r)| *id != r.id)
                {
                    return Err(CommandError::InvalidConfig(
                        "a CA of at most 16 KiB of PEM and at most 10000 tokens, keyed by id"
                            .into(),
                    ));
                }
                Ok(())
            }
            AuthorityCommand::TokenPut(record) => {
                let a = self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                if a.tokens.contains_key(&record.id) {
                    return Err(CommandError::Conflict(format!(
                        "token {} already exists",
                        record.id
                    )));
                }
                if a.tokens.len() >= MAX_TOKENS {
                    return Err(CommandError::InvalidConfig(format!(
                        "at most {MAX_TOKENS} tokens; revoke some first"
                    )));
                }
                Ok(())
            }
            AuthorityCommand::TokenRevoke(_) => {
                self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                Ok(())
            }
            AuthorityCommand::Admit { node, token, at } => {
                let a = self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                if *node == NodeId::UNKNOWN || a.nodes.contains_key(node) {
                    return Err(CommandError::Conflict(format!(
                        "node id {node} is taken or reserved"
                    )));
                }
                if a.nodes.len() >= MAX_NODES {
                    return Err(CommandError::InvalidConfig(format!(
                        "at most {MAX_NODES} nodes can ever be admitted"
                    )));
                }
                let refusal = match a.tokens.get(token) {
                    None => Some(JoinRefusal::Unknown),
                    Some(r) if r.revoked => Some(JoinRefusal::Revoked),
                    Some(r) if *at >= r.expires_unix => Some(JoinRefusal::Expired),
                    Some(_) => None,
                };
                match refusal {
                    Some(r) => Err(CommandError::JoinRefused(r)),
                    None => Ok(()),
                }
            }
            AuthorityCommand::NodeRevoke(node) => {
                let a = self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                if !a.nodes.contains_key(node) {
                    return Err(CommandError::NoSuchNode(node.to_string()));
                }
                Ok(())
            }
            AuthorityCommand::ApiTokenPut(record) => {
                let a = self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                if a.api_tokens.contains_key(&record.id) {
                    return Err(CommandError::Conflict(format!(
                        "API token {} already exists",
                        record.id
                    )));
                }
                if record.name.is_empty()
                    || record.name.len() > MAX_NAME
                    || !record
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                {
                    return Err(CommandError::InvalidConfig(format!(
                        "an API token name is 1 to {MAX_NAME} of A-Z a-z 0-9 - _ . @"
                    )));
                }
                if record.expires_unix <= record.created_unix {
                    return Err(CommandError::InvalidConfig(
                        "an API token must expire after it is created".into(),
                    ));
                }
                if a.api_tokens.len() >= MAX_API_TOKENS {
                    return Err(CommandError::InvalidConfig(format!(
                        "at most {MAX_API_TOKENS} API tokens; revoke some first"
                    )));
                }
                Ok(())
            }
            AuthorityCommand::ApiTokenRevoke(_) => {
                self.authority.as_ref().ok_or(CommandError::NoAuthority)?;
                Ok(())
            }
        }
    }

    /// Applies a validated command; answers whether a revoked token existed.
    pub(crate) fn apply_authority(&mut self, cmd: &AuthorityCommand) -> bool {
        match cmd {
            AuthorityCommand::Init(a) => {
                self.authority = Some(a.clone());
                true
            }
            AuthorityCommand::TokenPut(record) => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                // The new record's creation time is the clock here, so every member drops the
                // same expired records.
                let now = record.created_unix;
                a.tokens
                    .retain(|_, r| r.expires_unix.saturating_add(EXPIRED_KEPT_SECS) > now);
                a.tokens.insert(record.id, record.clone());
                true
            }
            AuthorityCommand::TokenRevoke(id) => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                match a.tokens.get_mut(id) {
                    Some(r) => {
                        r.revoked = true;
                        true
                    }
                    None => false,
                }
            }
            AuthorityCommand::Admit { node, token, at } => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                a.nodes.insert(
                    *node,
                    AdmittedNode {
                        admitted_unix: *at,
                        token: Some(*token),
                        revoked: false,
                    },
                );
                true
            }
            AuthorityCommand::NodeRevoke(node) => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                match a.nodes.get_mut(node) {
                    Some(n) => {
                        let was = n.revoked;
                        n.revoked = true;
                        !was
                    }
                    None => false,
                }
            }
            AuthorityCommand::ApiTokenPut(record) => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                // As for join tokens: the new record's clock drops long-expired records.
                let now = record.created_unix;
                a.api_tokens
                    .retain(|_, r| r.expires_unix.saturating_add(EXPIRED_KEPT_SECS) > now);
                a.api_tokens.insert(record.id, record.clone());
                true
            }
            AuthorityCommand::ApiTokenRevoke(id) => {
                let Some(a) = self.authority.as_mut() else {
                    return false;
                };
                match a.api_tokens.get_mut(id) {
                    Some(r) => {
                        r.revoked = true;
                        true
                    }
                    None => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Applied, Command};

    fn record(id: u8, created: u64, expires: u64) -> TokenRecord {
        TokenRecord {
            id: TokenId([id; 8]),
            secret_hash: [id; 32],
            created_unix: created,
            expires_unix: expires,
            revoked: false,
        }
    }

    #[test]
    fn tokens_need_a_ca_and_the_ca_is_set_once() {
        let mut s = ClusterState::default();
        let put = Command::Authority(AuthorityCommand::TokenPut(record(1, 0, 10)));
        assert_eq!(s.apply(1, &put), Err(CommandError::NoAuthority));
        let init = Command::Authority(AuthorityCommand::Init(AuthorityState {
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            tokens: BTreeMap::new(),
            nodes: BTreeMap::new(),
            api_tokens: BTreeMap::new(),
        }));
        s.apply(2, &init).unwrap();
        assert!(matches!(s.apply(3, &init), Err(CommandError::Conflict(_))));
        s.apply(4, &put).unwrap();
        assert!(matches!(s.apply(5, &put), Err(CommandError::Conflict(_))));
        let revoke = |id| Command::Authority(AuthorityCommand::TokenRevoke(TokenId([id; 8])));
        assert_eq!(
            s.apply(6, &revoke(1)),
            Ok(Applied::Revoked { existed: true })
        );
        assert_eq!(
            s.apply(7, &revoke(9)),
            Ok(Applied::Revoked { existed: false })
        );
        assert!(s.authority.as_ref().unwrap().tokens[&TokenId([1; 8])].revoked);
        // A week after it expired, a token is dropped when the next one is made.
        let later = Command::Authority(AuthorityCommand::TokenPut(record(
            2,
            10 + EXPIRED_KEPT_SECS,
            u64::MAX,
        )));
        s.apply(8, &later).unwrap();
        let ids: Vec<TokenId> = s
            .authority
            .as_ref()
            .unwrap()
            .tokens
            .keys()
            .copied()
            .collect();
        assert_eq!(ids, [TokenId([2; 8])]);
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;
    use crate::state::{Applied, Command};

    fn node(n: u8) -> NodeId {
        NodeId::from_random([n; 8])
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let mut tokens = BTreeMap::new();
        for (id, revoked) in [(1, false), (2, true)] {
            tokens.insert(
                TokenId([id; 8]),
                TokenRecord {
                    id: TokenId([id; 8]),
                    secret_hash: [id; 32],
                    created_unix: 0,
                    expires_unix: 100,
                    revoked,
                },
            );
        }
        let mut nodes = BTreeMap::new();
        nodes.insert(
            node(9),
            AdmittedNode {
                admitted_unix: 0,
                token: None,
                revoked: false,
            },
        );
        let init = AuthorityState {
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
            tokens,
            nodes,
            api_tokens: BTreeMap::new(),
        };
        s.apply(1, &Command::Authority(AuthorityCommand::Init(init)))
            .unwrap();
        s
    }

    fn admit(n: NodeId, token: u8, at: u64) -> Command {
        Command::Authority(AuthorityCommand::Admit {
            node: n,
            token: TokenId([token; 8]),
            at,
        })
    }

    #[test]
    fn an_id_is_admitted_once_and_never_the_zero_id() {
        let mut s = cluster();
        s.apply(2, &admit(node(3), 1, 10)).unwrap();
        for taken in [node(3), node(9), NodeId::UNKNOWN] {
            assert!(matches!(
                s.apply(3, &admit(taken, 1, 10)),
                Err(CommandError::Conflict(_))
            ));
        }
        let a = s.authority.as_ref().unwrap();
        assert_eq!(a.nodes.len(), 2);
        assert_eq!(a.nodes[&node(3)].token, Some(TokenId([1; 8])));
    }

    #[test]
    fn admission_checks_the_committed_token() {
        let mut s = cluster();
        let cases = [
            (2, 10, JoinRefusal::Revoked),
            (1, 100, JoinRefusal::Expired),
            (7, 10, JoinRefusal::Unknown),
        ];
        for (token, at, refusal) in cases {
            assert_eq!(
                s.apply(2, &admit(node(4), token, at)),
                Err(CommandError::JoinRefused(refusal))
            );
        }
        assert!(!s.authority.as_ref().unwrap().nodes.contains_key(&node(4)));
    }

    #[test]
    fn a_revoked_node_stays_revoked() {
        let mut s = cluster();
        let revoke = |n| Command::Authority(AuthorityCommand::NodeRevoke(n));
        assert_eq!(s.apply(2, &revoke(node(9))), Ok(Applied::Nothing));
        assert!(matches!(
            s.apply(3, &revoke(node(5))),
            Err(CommandError::NoSuchNode(_))
        ));
        let a = s.authority.as_ref().unwrap();
        assert_eq!(a.revoked_nodes(), BTreeSet::from([node(9)]));
        // Its id cannot be admitted again.
        assert!(s.apply(4, &admit(node(9), 1, 10)).is_err());
    }
}
