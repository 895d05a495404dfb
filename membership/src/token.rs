//! Join tokens: their text form, and the authority that issues, lists, revokes and checks them.
//!
//! A token is `blx1.` followed by unpadded base64url of the cluster CA's SHA-256 fingerprint
//! (32 bytes), a token id (8 bytes), a secret (32 bytes) and a 4-byte checksum, so a token that
//! was cut or mistyped is told apart from one that is well-formed but forged. The authority
//! stores only the SHA-256 of each secret.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::tls::hex;

const PREFIX: &str = "blx1.";
const BODY_LEN: usize = 32 + 8 + 32 + 4;

/// A token's public id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 8]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl FromStr for TokenId {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let bad = || {
            TokenError::Malformed(format!(
                "a token id is 16 hex digits, got {:?}",
                s.chars().take(40).collect::<String>()
            ))
        };
        if s.len() != 16 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 8];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(TokenId(out))
    }
}

/// A join token as the joiner holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA certificate the joiner must find at the other end.
    pub ca_fingerprint: [u8; 32],
    /// Which token this is.
    pub id: TokenId,
    /// The secret the joiner proves it holds.
    pub secret: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a token's text was refused before anything was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The text is not a blx join token at all, or was cut or mistyped.
    #[error("malformed join token: {0}")]
    Malformed(String),
}

/// The first 4 bytes of the SHA-256 of `body`: the checksum at the end of a token's text,
/// which tells a cut or mistyped token from a forged one.
pub fn checksum(body: &[u8]) -> [u8; 4] {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    let mut out = [0u8; 4];
    out.copy_from_slice(&d.as_ref()[..4]);
    out
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut body = Vec::with_capacity(BODY_LEN);
        body.extend_from_slice(&self.ca_fingerprint);
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

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        let rest = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| TokenError::Malformed(format!("a token starts with {PREFIX:?}")))?;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| TokenError::Malformed("not valid base64url after the prefix".into()))?;
        if body.len() != BODY_LEN {
            return Err(TokenError::Malformed(format!(
                "expected {BODY_LEN} bytes, got {} (was it cut short?)",
                body.len()
            )));
        }
        let (payload, sum) = body.split_at(BODY_LEN - 4);
        if checksum(payload) != sum {
            return Err(TokenError::Malformed(
                "checksum mismatch (was it mistyped?)".into(),
            ));
        }
        let mut token = JoinToken {
            ca_fingerprint: [0; 32],
            id: TokenId([0; 8]),
            secret: [0; 32],
        };
        token.ca_fingerprint.copy_from_slice(&payload[..32]);
        token.id.0.copy_from_slice(&payload[32..40]);
        token.secret.copy_from_slice(&payload[40..72]);
        Ok(token)
    }
}

/// What the authority keeps of a token: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token id.
    pub id: TokenId,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// When it was created, seconds since the Unix epoch.
    pub created_unix: u64,
    /// When it stops admitting nodes, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// Revoked tokens admit nobody.
    pub revoked: bool,
}

/// A token as `blx token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The token id (16 hex digits).
    pub id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Expiry time, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// `valid`, `expired` or `revoked`.
    pub status: String,
}

/// Why the authority refused a join request. Sent to the joiner, which prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinRefusal {
    /// No token with this id exists, or the secret does not match: forged or from elsewhere.
    #[error("join token refused: this cluster did not issue it (forged, or for another cluster)")]
    Unknown,
    /// The token's time to live has passed.
    #[error("join token refused: it has expired; create a new one with `blx token create`")]
    Expired,
    /// An operator revoked the token.
    #[error("join token refused: it was revoked")]
    Revoked,
    /// The token is fine but the request around it is not (bad certificate request, bad name).
    #[error("join request refused: the request is malformed")]
    BadRequest,
    /// The cluster could not confirm the token against its replicated records (no Raft
    /// quorum, no leader, or the cluster is still starting). Nothing was granted.
    #[error(
        "join refused: no quorum: the cluster cannot confirm join tokens right now (no Raft leader); try again"
    )]
    NoQuorum,
}

/// Failures of the token store itself (not of a token).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the store failed.
    #[error("token store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The stored bytes do not decode.
    #[error("token store is corrupt: {0}")]
    Corrupt(String),
}

/// Where an authority keeps token records. The membership issue keeps them in a file in the
/// data dir ([`crate::store::FileTokenStore`]); replicated state backs it later.
pub trait TokenStore: Send + 'static {
    /// Every record, ordered by id.
    fn load(&self) -> Result<BTreeMap<TokenId, TokenRecord>, StoreError>;
    /// Replaces every record at once (atomically: all or nothing).
    fn save(&mut self, records: &BTreeMap<TokenId, TokenRecord>) -> Result<(), StoreError>;
}

/// Issues and checks join tokens. Time and randomness are passed in.
pub struct TokenAuthority<S> {
    store: S,
    ca_fingerprint: [u8; 32],
}

impl<S> TokenAuthority<S> {
    /// The store, for reading back what changed.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: TokenStore> TokenAuthority<S> {
    /// Every record, ordered by id (hashes only, never secrets).
    pub fn list_records(&self) -> Result<BTreeMap<TokenId, TokenRecord>, StoreError> {
        self.store.load()
    }
}

impl<S: TokenStore> TokenAuthority<S> {
    /// An authority for the CA with this fingerprint, keeping records in `store`.
    pub fn new(store: S, ca_fingerprint: [u8; 32]) -> Self {
        TokenAuthority {
            store,
            ca_fingerprint,
        }
    }

    /// Creates a token valid for `ttl_secs` from `now_unix`, from 40 random bytes.
    pub fn issue(
        &mut self,
        now_unix: u64,
        ttl_secs: u64,
        random: [u8; 40],
    ) -> Result<JoinToken, StoreError> {
        let mut id = TokenId([0; 8]);
        id.0.copy_from_slice(&random[..8]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&random[8..]);
        let mut records = self.store.load()?;
        records.insert(
            id,
            TokenRecord {
                id,
                secret_hash: crate::tls::fingerprint(&secret),
                created_unix: now_unix,
                expires_unix: now_unix.saturating_add(ttl_secs),
                revoked: false,
            },
        );
        self.store.save(&records)?;
        Ok(JoinToken {
            ca_fingerprint: self.ca_fingerprint,
            id,
            secret,
        })
    }

    /// Every token with its status at `now_unix`.
    pub fn list(&self, now_unix: u64) -> Result<Vec<TokenInfo>, StoreError> {
        Ok(self
            .store
            .load()?
            .values()
            .map(|r| TokenInfo {
                id: r.id.to_string(),
                created_unix: r.created_unix,
                expires_unix: r.expires_unix,
                status: if r.revoked {
                    "revoked"
                } else if now_unix >= r.expires_unix {
                    "expired"
                } else {
                    "valid"
                }
                .to_string(),
            })
            .collect())
    }

    /// Revokes a token; false when no such token exists.
    pub fn revoke(&mut self, id: TokenId) -> Result<bool, StoreError> {
        let mut records = self.store.load()?;
        let Some(record) = records.get_mut(&id) else {
            return Ok(false);
        };
        record.revoked = true;
        self.store.save(&records)?;
        Ok(true)
    }

    /// Checks a presented id and secret at `now_unix`.
    pub fn check(
        &self,
        id: TokenId,
        secret: &[u8; 32],
        now_unix: u64,
    ) -> Result<Result<(), JoinRefusal>, StoreError> {
        let records = self.store.load()?;
        let Some(record) = records.get(&id) else {
            return Ok(Err(JoinRefusal::Unknown));
        };
        let presented = crate::tls::fingerprint(secret);
        // Compare without an early exit, so timing says nothing about how much matched.
        let diff = presented
            .iter()
            .zip(record.secret_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        Ok(if diff != 0 {
            Err(JoinRefusal::Unknown)
        } else if record.revoked {
            Err(JoinRefusal::Revoked)
        } else if now_unix >= record.expires_unix {
            Err(JoinRefusal::Expired)
        } else {
            Ok(())
        })
    }
}

/// A store in memory: for tests, and for working on a copy of records kept elsewhere (the
/// replicated cluster state), with the changes read back from [`MemTokenStore::records`].
#[derive(Default)]
pub struct MemTokenStore(BTreeMap<TokenId, TokenRecord>);

impl MemTokenStore {
    /// A store holding these records.
    pub fn new(records: BTreeMap<TokenId, TokenRecord>) -> Self {
        MemTokenStore(records)
    }

    /// The records as they are now.
    pub fn records(&self) -> &BTreeMap<TokenId, TokenRecord> {
        &self.0
    }
}

impl TokenStore for MemTokenStore {
    fn load(&self) -> Result<BTreeMap<TokenId, TokenRecord>, StoreError> {
        Ok(self.0.clone())
    }

    fn save(&mut self, records: &BTreeMap<TokenId, TokenRecord>) -> Result<(), StoreError> {
        self.0 = records.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> TokenAuthority<MemTokenStore> {
        TokenAuthority::new(MemTokenStore::default(), [9; 32])
    }

    #[test]
    fn token_text_round_trips_and_damage_is_malformed() {
        let t = JoinToken {
            ca_fingerprint: [1; 32],
            id: TokenId([2; 8]),
            secret: [3; 32],
        };
        let text = t.to_string();
        assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        assert!(matches!(
            "hello".parse::<JoinToken>(),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            text[..text.len() - 3].parse::<JoinToken>(),
            Err(TokenError::Malformed(_))
        ));
        let mut typo = text.clone().into_bytes();
        let i = typo.len() - 10;
        typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
        let err = String::from_utf8(typo)
            .unwrap()
            .parse::<JoinToken>()
            .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn tokens_expire_and_can_be_revoked() {
        let mut a = authority();
        let t = a.issue(100, 10, [5; 40]).unwrap();
        assert_eq!(t.ca_fingerprint, [9; 32]);
        assert_eq!(a.check(t.id, &t.secret, 105).unwrap(), Ok(()));
        assert_eq!(
            a.check(t.id, &t.secret, 110).unwrap(),
            Err(JoinRefusal::Expired)
        );
        assert_eq!(
            a.check(t.id, &[0; 32], 105).unwrap(),
            Err(JoinRefusal::Unknown)
        );
        assert_eq!(
            a.check(TokenId([1; 8]), &t.secret, 105).unwrap(),
            Err(JoinRefusal::Unknown)
        );
        assert!(a.revoke(t.id).unwrap());
        assert!(!a.revoke(TokenId([1; 8])).unwrap());
        assert_eq!(
            a.check(t.id, &t.secret, 105).unwrap(),
            Err(JoinRefusal::Revoked)
        );
        assert_eq!(a.list(105).unwrap()[0].status, "revoked");
    }
}
