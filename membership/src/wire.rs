//! Every byte blx's membership layer puts on the network, and the decoders of what comes back.
//!
//! A datagram (or a unidirectional stream carrying one too large for a datagram) is
//! `[FORMAT_VERSION][kind][body]`: kind [`KIND_SWIM`] carries a foca packet, kind [`KIND_META`]
//! a postcard [`MetaUpdate`]. A control exchange is one request and one response, each a whole
//! bidirectional stream of `[FORMAT_VERSION][postcard body]`. Decoders never panic and refuse
//! anything over its size limit, of another version, or with trailing bytes.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::meta::{MetaError, NodeMeta};
use crate::token::{JoinRefusal, TokenId, TokenInfo};

/// The format version byte that opens every message.
pub const FORMAT_VERSION: u8 = 1;
/// A foca SWIM packet.
pub const KIND_SWIM: u8 = 0;
/// A metadata update pushed directly to one member.
pub const KIND_META: u8 = 1;
/// Largest gossip message accepted on a unidirectional stream.
pub const MAX_STREAM_MESSAGE: usize = 64 * 1024;
/// Largest control request or response from a joiner (no certificate yet).
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// Largest control request or response between members: Raft batches and snapshot chunks.
pub const MAX_MEMBER_MESSAGE: usize = 64 * 1024 * 1024;

/// Bytes that are not a valid blx message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Empty or cut short before the header ended.
    #[error("message too short")]
    Truncated,
    /// A format version this build does not speak.
    #[error("unsupported format version {0}")]
    Version(u8),
    /// A kind byte this build does not know.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Larger than the limit for its channel.
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The body does not decode, or bytes are left over after it.
    #[error("malformed message body: {0}")]
    Body(String),
    /// Decodes, but breaks a metadata limit.
    #[error("invalid metadata: {0}")]
    Meta(#[from] MetaError),
}

/// A node's metadata at one version. Higher versions replace lower ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaUpdate {
    /// Whose metadata this is.
    pub id: NodeId,
    /// Bumped by the owner on every change.
    pub version: u64,
    /// The metadata.
    pub meta: NodeMeta,
}

/// A decoded datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A foca packet, still encoded (foca decodes it).
    Swim(&'a [u8]),
    /// A metadata update.
    Meta(MetaUpdate),
}

/// Frames a foca packet.
pub fn encode_swim(packet: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.len() + 2);
    buf.put_u8(FORMAT_VERSION);
    buf.put_u8(KIND_SWIM);
    buf.put_slice(packet);
    buf.freeze()
}

/// Frames a metadata update.
pub fn encode_meta(update: &MetaUpdate) -> Bytes {
    let mut out = vec![FORMAT_VERSION, KIND_META];
    out.extend(postcard::to_allocvec(update).unwrap_or_default());
    out.into()
}

/// Encodes a metadata update as a foca custom broadcast item (no kind byte).
pub fn encode_meta_broadcast(update: &MetaUpdate) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend(postcard::to_allocvec(update).unwrap_or_default());
    out
}

/// Decodes a foca custom broadcast item made by [`encode_meta_broadcast`].
pub fn decode_meta_broadcast(buf: &[u8]) -> Result<MetaUpdate, WireError> {
    let body = versioned(buf, MAX_STREAM_MESSAGE)?;
    let update: MetaUpdate = exact(body)?;
    update.meta.validate()?;
    Ok(update)
}

/// Decodes one datagram (or one unidirectional-stream message).
pub fn decode_datagram(buf: &[u8]) -> Result<Datagram<'_>, WireError> {
    let body = versioned(buf, MAX_STREAM_MESSAGE)?;
    let (&kind, body) = body.split_first().ok_or(WireError::Truncated)?;
    match kind {
        KIND_SWIM if body.is_empty() => Err(WireError::Truncated),
        KIND_SWIM => Ok(Datagram::Swim(body)),
        KIND_META => {
            let update: MetaUpdate = exact(body)?;
            update.meta.validate()?;
            Ok(Datagram::Meta(update))
        }
        other => Err(WireError::Kind(other)),
    }
}

fn versioned(buf: &[u8], limit: usize) -> Result<&[u8], WireError> {
    if buf.len() > limit {
        return Err(WireError::TooLarge(buf.len()));
    }
    let (&version, body) = buf.split_first().ok_or(WireError::Truncated)?;
    if version != FORMAT_VERSION {
        return Err(WireError::Version(version));
    }
    Ok(body)
}

fn exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Body(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// A joiner's request for a node certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's id.
    pub token_id: TokenId,
    /// The token's secret (sent only over a connection whose server the joiner pinned).
    pub secret: [u8; 32],
    /// A certificate signing request for the joiner's fresh key (DER).
    pub csr_der: Vec<u8>,
}

/// What an accepted joiner receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// The id the cluster assigned to the joiner: fresh, never held by another node. The
    /// joiner does not choose it, so a token cannot buy a certificate for an existing node.
    pub node: NodeId,
    /// The joiner's node certificate, signed by the cluster CA (DER).
    pub cert_der: Vec<u8>,
    /// The cluster CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// Gossip addresses of current members, to announce to.
    pub members: Vec<SocketAddr>,
}

/// A request on a control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Admit a node (from a joiner, or forwarded by a member to the authority).
    Join(JoinRequest),
    /// Issue a token valid for this many seconds (members only).
    TokenCreate {
        /// Time to live, seconds.
        ttl_secs: u64,
    },
    /// List tokens (members only).
    TokenList,
    /// Revoke a token (members only).
    TokenRevoke {
        /// The token to revoke.
        id: TokenId,
    },
    /// Bytes for a service built on top of membership (Raft RPC, forwarded writes), which
    /// this crate carries without reading (members only).
    Service {
        /// Which service.
        service: u8,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A fresh certificate for the calling member, for the key in this certificate signing
    /// request (members only; the id is the caller's, from its current certificate).
    Renew {
        /// The request, DER.
        csr_der: Vec<u8>,
    },
}

/// The answer on a control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// The join was accepted.
    Joined(JoinGrant),
    /// The join was refused.
    Refused(JoinRefusal),
    /// A new token, in text form.
    Token(String),
    /// Every token.
    Tokens(Vec<TokenInfo>),
    /// Whether the revoked token existed.
    Revoked(bool),
    /// A service's answer.
    Service(Vec<u8>),
    /// The request could not be served; the text says why.
    Failed(String),
    /// The caller's renewed certificate (DER).
    Renewed(Vec<u8>),
}

/// Frames a control request or response.
pub fn encode_control<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend(postcard::to_allocvec(msg).unwrap_or_default());
    out
}

/// Decodes a control request of at most `limit` bytes.
pub fn decode_control_request(buf: &[u8], limit: usize) -> Result<ControlRequest, WireError> {
    exact(versioned(buf, limit)?)
}

/// Decodes a control response of at most `limit` bytes.
pub fn decode_control_response(buf: &[u8], limit: usize) -> Result<ControlResponse, WireError> {
    exact(versioned(buf, limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let update = MetaUpdate {
            id: NodeId([3; 8]),
            version: 7,
            meta: NodeMeta {
                name: "n".into(),
                ..Default::default()
            },
        };
        assert_eq!(
            decode_datagram(&encode_meta(&update)).unwrap(),
            Datagram::Meta(update.clone())
        );
        assert_eq!(
            decode_meta_broadcast(&encode_meta_broadcast(&update)).unwrap(),
            update
        );
        assert_eq!(
            decode_datagram(&encode_swim(b"xyz")).unwrap(),
            Datagram::Swim(b"xyz")
        );
        let req = ControlRequest::TokenRevoke {
            id: TokenId([1; 8]),
        };
        assert_eq!(
            decode_control_request(&encode_control(&req), MAX_CONTROL_MESSAGE).unwrap(),
            req
        );
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(decode_datagram(&[]), Err(WireError::Truncated));
        assert_eq!(decode_datagram(&[9, 0, 1]), Err(WireError::Version(9)));
        assert_eq!(
            decode_datagram(&[FORMAT_VERSION, 77]),
            Err(WireError::Kind(77))
        );
        assert_eq!(
            decode_datagram(&[FORMAT_VERSION, KIND_SWIM]),
            Err(WireError::Truncated)
        );
        let mut trailing = encode_control(&ControlRequest::TokenList);
        trailing.push(0);
        assert!(matches!(
            decode_control_request(&trailing, MAX_CONTROL_MESSAGE),
            Err(WireError::Body(_))
        ));
        assert!(matches!(
            decode_control_request(&vec![1; MAX_CONTROL_MESSAGE + 1], MAX_CONTROL_MESSAGE),
            Err(WireError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_datagram(&bytes);
            let _ = decode_meta_broadcast(&bytes);
            let _ = decode_control_request(&bytes, MAX_MEMBER_MESSAGE);
            let _ = decode_control_response(&bytes, MAX_MEMBER_MESSAGE);
        }
    }
}
