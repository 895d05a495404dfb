//! The cluster CA and the join-token records in the replicated state, so that any member can
//! admit a node and manage tokens, and losing the first agent loses neither. Token secrets
//! are never stored, only their hashes; the CA key is, as every member must be able to sign
//! a joiner's certificate. `operator snapshot save` leaves it out.

use std::collections::BTreeMap;

use blx_membership::token::{TokenId, TokenRecord};
use serde::{Deserialize, Serialize};

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
}

impl ClusterState {
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
