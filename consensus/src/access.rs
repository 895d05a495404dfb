//! Who may use the HTTP API, and for what: API tokens with a scope, kept as records in the
//! replicated state so that every member checks them alike and a revocation reaches all.
//!
//! A token is `blxapi1.` followed by unpadded base64url of its id (8 bytes), its secret
//! (32 bytes) and a 4-byte checksum. Only the SHA-256 of the secret is stored. The secret
//! is 32 random bytes, so a fast hash is enough: there is nothing to guess from the hash.
//!
//! Scopes are ordered: `operator` may do what `write` may, and `write` what `read` may.
//! [`Command::scope`] says which a command needs; the leader checks a token's record against
//! it before it proposes the command, whichever member took the request.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use blx_membership::token::{TokenId, checksum};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::authority::AuthorityState;
use crate::state::Command;
use crate::workload::WorkloadCommand;

const PREFIX: &str = "blxapi1.";
const BODY_LEN: usize = 8 + 32 + 4;
/// Longest token name.
pub const MAX_NAME: usize = 64;
/// Most API token records kept.
pub const MAX_API_TOKENS: usize = 10_000;

/// What a token allows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads: members, status, keys, config, VMs, nodes.
    #[default]
    Read,
    /// Reads, and changes to keys and VMs.
    Write,
    /// Everything: tokens, config, nodes, snapshots, leadership.
    Operator,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Operator => "operator",
        })
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "operator" => Ok(Scope::Operator),
            other => Err(format!(
                "unknown scope {:?}: one of read, write, operator",
                other.chars().take(20).collect::<String>()
            )),
        }
    }
}

/// Who a write is made for, as it travels to the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    /// The node itself, or the operator on its machine (the local token of its data dir).
    Node,
    /// The holder of an API token, checked by the member whose API took the request.
    Token(TokenId),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node => f.write_str("node"),
            Caller::Token(id) => write!(f, "api token {id}"),
        }
    }
}

/// An API token as its holder has it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Which token this is.
    pub id: TokenId,
    /// The secret the holder proves it holds.
    pub secret: [u8; 32],
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a secret, as a record keeps it.
pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut body = Vec::with_capacity(BODY_LEN);
        body.extend_from_slice(&self.id.0);
        body.extend_from_slice(&self.secret);
        let sum = checksum(&body);
        body.extend_from_slice(&sum);
        write!(
            f,
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        )
    }
}

/// Why a token's text was refused before any record was looked at.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed API token: {0}")]
pub struct MalformedToken(String);

impl FromStr for ApiToken {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, MalformedToken> {
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| MalformedToken(format!("an API token starts with {PREFIX:?}")))?;
        // Base64 of BODY_LEN bytes is 59 characters; refuse long text before decoding it.
        if rest.len() > 64 {
            return Err(MalformedToken("too long".into()));
        }
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| MalformedToken("not valid base64url after the prefix".into()))?;
        if body.len() != BODY_LEN {
            return Err(MalformedToken(format!(
                "expected {BODY_LEN} bytes, got {} (was it cut short?)",
                body.len()
            )));
        }
        let (payload, sum) = body.split_at(BODY_LEN - 4);
        if checksum(payload) != sum {
            return Err(MalformedToken(
                "checksum mismatch (was it mistyped?)".into(),
            ));
        }
        let mut token = ApiToken {
            id: TokenId([0; 8]),
            secret: [0; 32],
        };
        token.id.0.copy_from_slice(&payload[..8]);
        token.secret.copy_from_slice(&payload[8..]);
        Ok(token)
    }
}

/// What the cluster keeps of an API token: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// The token id.
    pub id: TokenId,
    /// Who or what it is for, as the operator named it.
    pub name: String,
    /// What it allows.
    pub scope: Scope,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// When it was created, Unix seconds (the creating member's clock).
    pub created_unix: u64,
    /// When it stops working, Unix seconds.
    pub expires_unix: u64,
    /// Revoked tokens are refused everywhere.
    pub revoked: bool,
}

/// An API token as `blx api-token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct ApiTokenInfo {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_unix: u64,
    pub expires_unix: u64,
    /// `valid`, `expired` or `revoked`.
    pub status: String,
}

impl ApiTokenRecord {
    /// The record as a listing shows it at `now_unix`.
    pub fn info(&self, now_unix: u64) -> ApiTokenInfo {
        let status = if self.revoked {
            "revoked"
        } else if now_unix >= self.expires_unix {
            "expired"
        } else {
            "valid"
        };
        ApiTokenInfo {
            id: self.id.to_string(),
            name: self.name.clone(),
            scope: self.scope,
            created_unix: self.created_unix,
            expires_unix: self.expires_unix,
            status: status.into(),
        }
    }
}

/// Why a token was refused. `Unknown`, `Revoked` and `Expired` are 401 (no valid credential);
/// `Scope` is 403 (a valid credential that does not allow this).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Denied {
    /// No record of this id, or the secret does not match.
    #[error("API token refused: this cluster did not issue it")]
    Unknown,
    /// Revoked by an operator.
    #[error("API token {0} has been revoked")]
    Revoked(TokenId),
    /// Past its expiry.
    #[error("API token {0} has expired")]
    Expired(TokenId),
    /// Valid, but its scope is below what the request needs.
    #[error("API token {id} has scope {have}; this needs {need}")]
    Scope {
        /// The token.
        id: TokenId,
        /// Its scope.
        have: Scope,
        /// The scope needed.
        need: Scope,
    },
}

impl Denied {
    /// Whether this is a missing credential (401) rather than too small a one (403).
    pub fn unauthenticated(&self) -> bool {
        !matches!(self, Denied::Scope { .. })
    }
}

impl AuthorityState {
    /// Checks a presented token: the secret against the record's hash (in constant time),
    /// then revocation, expiry at `now_unix`, and that its scope covers `need`.
    pub fn authenticate(
        &self,
        token: &ApiToken,
        now_unix: u64,
        need: Scope,
    ) -> Result<&ApiTokenRecord, Denied> {
        let record = self.api_tokens.get(&token.id).ok_or(Denied::Unknown)?;
        let hash = secret_hash(&token.secret);
        if !bool::from(hash.ct_eq(&record.secret_hash)) {
            return Err(Denied::Unknown);
        }
        self.authorize(token.id, now_unix, need)
    }

    /// Checks a token by id alone (its secret was checked by the member that took the
    /// request): revocation, expiry at `now_unix`, and scope.
    pub fn authorize(
        &self,
        id: TokenId,
        now_unix: u64,
        need: Scope,
    ) -> Result<&ApiTokenRecord, Denied> {
        let record = self.api_tokens.get(&id).ok_or(Denied::Unknown)?;
        if record.revoked {
            return Err(Denied::Revoked(id));
        }
        if now_unix >= record.expires_unix {
            return Err(Denied::Expired(id));
        }
        if record.scope < need {
            return Err(Denied::Scope {
                id,
                have: record.scope,
                need,
            });
        }
        Ok(record)
    }
}

impl Command {
    /// The scope an API token needs for this command. Commands only nodes make (scheduling,
    /// reports, membership sync) need `operator`, so no narrower token can forge them.
    pub fn scope(&self) -> Scope {
        match self {
            Command::KvPut { .. } | Command::KvDelete { .. } => Scope::Write,
            Command::Workload(
                WorkloadCommand::VmCreate { .. }
                | WorkloadCommand::VmSetDesired { .. }
                | WorkloadCommand::VmDelete { .. },
            ) => Scope::Write,
            Command::Workload(_)
            | Command::ConfigSet { .. }
            | Command::ConfigRollback
            | Command::Restore { .. }
            | Command::Authority(_) => Scope::Operator,
            Command::Batch(cmds) => cmds
                .iter()
                .map(Command::scope)
                .max()
                .unwrap_or(Scope::Operator),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(scope: Scope) -> ApiTokenRecord {
        ApiTokenRecord {
            id: TokenId([3; 8]),
            name: "ci".into(),
            scope,
            secret_hash: secret_hash(&[9; 32]),
            created_unix: 100,
            expires_unix: 200,
            revoked: false,
        }
    }

    fn state(r: ApiTokenRecord) -> AuthorityState {
        AuthorityState {
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            tokens: Default::default(),
            nodes: Default::default(),
            api_tokens: [(r.id, r)].into_iter().collect(),
        }
    }

    #[test]
    fn a_token_round_trips_through_its_text() {
        let t = ApiToken {
            id: TokenId([1, 2, 3, 4, 5, 6, 7, 8]),
            secret: [0xab; 32],
        };
        let text = t.to_string();
        assert!(text.starts_with(PREFIX));
        assert_eq!(text.parse::<ApiToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains("ab"));
    }

    #[test]
    fn cut_mistyped_and_foreign_text_is_refused() {
        let text = ApiToken {
            id: TokenId([1; 8]),
            secret: [2; 32],
        }
        .to_string();
        assert!(text[..text.len() - 3].parse::<ApiToken>().is_err());
        let mut typo = text.clone().into_bytes();
        let last = typo.len() - 5;
        typo[last] = if typo[last] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        assert!(
            typo.parse::<ApiToken>()
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        assert!("blx1.abc".parse::<ApiToken>().is_err());
        assert!("".parse::<ApiToken>().is_err());
        assert!(
            format!("{PREFIX}{}", "A".repeat(5000))
                .parse::<ApiToken>()
                .is_err()
        );
    }

    #[test]
    fn authentication_checks_secret_revocation_expiry_and_scope() {
        let good = ApiToken {
            id: TokenId([3; 8]),
            secret: [9; 32],
        };
        let s = state(record(Scope::Write));
        assert!(s.authenticate(&good, 150, Scope::Write).is_ok());
        assert!(s.authenticate(&good, 150, Scope::Read).is_ok());
        let scope = s.authenticate(&good, 150, Scope::Operator).unwrap_err();
        assert!(!scope.unauthenticated());
        assert_eq!(
            s.authenticate(&good, 200, Scope::Read),
            Err(Denied::Expired(good.id))
        );
        let wrong = ApiToken {
            secret: [8; 32],
            ..good.clone()
        };
        assert_eq!(
            s.authenticate(&wrong, 150, Scope::Read),
            Err(Denied::Unknown)
        );
        let other = ApiToken {
            id: TokenId([4; 8]),
            ..good.clone()
        };
        assert_eq!(
            s.authenticate(&other, 150, Scope::Read),
            Err(Denied::Unknown)
        );
        let mut revoked = record(Scope::Operator);
        revoked.revoked = true;
        assert_eq!(
            state(revoked).authenticate(&good, 150, Scope::Read),
            Err(Denied::Revoked(good.id))
        );
    }

    #[test]
    fn node_only_commands_need_operator() {
        let put = Command::KvPut {
            key: "k".into(),
            value: vec![],
            cas: None,
        };
        assert_eq!(put.scope(), Scope::Write);
        let report = Command::Workload(WorkloadCommand::VmReports {
            node: "x".into(),
            reports: vec![],
            now_ms: 0,
        });
        assert_eq!(report.scope(), Scope::Operator);
        assert_eq!(Command::Batch(vec![put.clone()]).scope(), Scope::Write);
        assert_eq!(Command::Batch(vec![put, report]).scope(), Scope::Operator);
        assert!(Scope::Operator > Scope::Write && Scope::Write > Scope::Read);
        assert_eq!("write".parse::<Scope>(), Ok(Scope::Write));
        assert!("admin".parse::<Scope>().is_err());
    }
}
