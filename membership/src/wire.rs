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

use crate::identity::{NodeId, NodeIdentity};
use crate::meta::{MetaError, NodeMeta};
use crate::token::{JoinRefusal, TokenId, TokenInfo};

/// The format version byte that opens every message.
pub const FORMAT_VERSION: u8 = 1;
/// A foca SWIM packet, its header encoded by [`SwimCodec`]. (Kind 0 was the same packet with
/// the receiver's whole identity in its header, before 2026-12-05; this build refuses it.)
pub const KIND_SWIM: u8 = 2;
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

/// foca's packet codec: postcard, except that a header names its receiver by id and
/// generation only. The receiver's address is the one thing in a header its receiver already
/// knows: a packet reaches a node at its own address, so [`SwimCodec::decode_header`] puts
/// back the address the node gossips as its own. That is 7 or 8 of a ping's 40 bytes (IPv4;
/// 19 or 20 for IPv6), on every SWIM packet.
///
/// foca compares the whole identity when it checks that a packet is meant for this node, and
/// only the address when the packet is an announce (a joiner may know a seed by its address
/// alone); with the address restored, both checks come down to the id and the generation,
/// and an announce is taken by whichever node it reached. Members (in updates) keep their
/// address: for them it is news.
#[derive(Clone, Copy, Debug)]
pub struct SwimCodec {
    own_addr: SocketAddr,
}

impl SwimCodec {
    /// The codec of a node that gossips `own_addr` as its address.
    pub fn new(own_addr: SocketAddr) -> Self {
        SwimCodec { own_addr }
    }
}

/// A foca header as it goes on the wire: the receiver without its address.
#[derive(Serialize)]
struct HeaderOut<'a> {
    src: &'a NodeIdentity,
    src_incarnation: foca::Incarnation,
    dst_id: NodeId,
    dst_generation: u64,
    message: &'a foca::Message<NodeIdentity>,
}

#[derive(Deserialize)]
struct HeaderIn {
    src: NodeIdentity,
    src_incarnation: foca::Incarnation,
    dst_id: NodeId,
    dst_generation: u64,
    message: foca::Message<NodeIdentity>,
}

/// Serializes into foca's buffer without an allocation.
struct BufFlavor<B>(B);

impl<B: BufMut> postcard::ser_flavors::Flavor for BufFlavor<B> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if self.0.remaining_mut() < data.len() {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.0.put_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Reads one postcard value from the front of `buf` and consumes exactly its bytes.
fn take<T: for<'de> Deserialize<'de>>(mut buf: impl bytes::Buf) -> postcard::Result<T> {
    // foca hands the codec one contiguous packet.
    let chunk = buf.chunk();
    let (value, rest) = postcard::take_from_bytes(chunk)?;
    let used = chunk.len() - rest.len();
    buf.advance(used);
    Ok(value)
}

impl foca::Codec<NodeIdentity> for SwimCodec {
    type Error = postcard::Error;

    fn encode_header(
        &mut self,
        header: &foca::Header<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        let wire = HeaderOut {
            src: &header.src,
            src_incarnation: header.src_incarnation,
            dst_id: header.dst.id,
            dst_generation: header.dst.generation,
            message: &header.message,
        };
        postcard::serialize_with_flavor(&wire, BufFlavor(buf))
    }

    fn decode_header(
        &mut self,
        buf: impl bytes::Buf,
    ) -> Result<foca::Header<NodeIdentity>, Self::Error> {
        let wire: HeaderIn = take(buf)?;
        Ok(foca::Header {
            src: wire.src,
            src_incarnation: wire.src_incarnation,
            dst: NodeIdentity {
                id: wire.dst_id,
                addr: self.own_addr,
                generation: wire.dst_generation,
            },
            message: wire.message,
        })
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<NodeIdentity>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        postcard::serialize_with_flavor(member, BufFlavor(buf))
    }

    fn decode_member(
        &mut self,
        buf: impl bytes::Buf,
    ) -> Result<foca::Member<NodeIdentity>, Self::Error> {
        take(buf)
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

    fn identity(i: u8, addr: &str) -> NodeIdentity {
        NodeIdentity {
            id: NodeId([i; 8]),
            addr: addr.parse().unwrap(),
            generation: u64::from(i) * 1000,
        }
    }

    fn header(
        dst: NodeIdentity,
        message: foca::Message<NodeIdentity>,
    ) -> foca::Header<NodeIdentity> {
        foca::Header {
            src: identity(1, "10.0.0.1:7946"),
            src_incarnation: 3,
            dst,
            message,
        }
    }

    #[test]
    fn a_swim_header_arrives_whole_and_shorter_by_its_receiver_s_address() {
        let receiver = identity(2, "10.0.0.2:7946");
        let mut codec = SwimCodec::new(receiver.addr);
        for message in [
            foca::Message::Ping(7),
            foca::Message::Ack(7),
            foca::Message::PingReq {
                target: identity(4, "10.0.0.4:7946"),
                probe_number: 9,
            },
            foca::Message::Announce,
        ] {
            let sent = header(receiver, message);
            let mut ours = Vec::new();
            foca::Codec::encode_header(&mut codec, &sent, &mut ours).unwrap();
            let mut foca_s = Vec::new();
            foca::Codec::encode_header(&mut foca::PostcardCodec, &sent, &mut foca_s).unwrap();
            let address = postcard::to_allocvec(&receiver.addr).unwrap().len();
            assert_eq!(address, 7, "IPv4: the variant, 4 bytes, the port in 2");
            assert_eq!(ours.len() + address, foca_s.len(), "{sent:?}");
            let mut buf = &ours[..];
            assert_eq!(
                foca::Codec::decode_header(&mut codec, &mut buf).unwrap(),
                sent
            );
            assert!(
                buf.is_empty(),
                "the header's bytes, and no more, are consumed"
            );
        }
    }

    #[test]
    fn a_swim_header_names_its_receiver_at_the_receiver_s_own_address() {
        // A joiner that knows a seed by another address (a NAT, a second interface) reaches
        // it all the same; foca then checks the id and generation, which do travel.
        let mut codec = SwimCodec::new("192.168.1.5:7946".parse().unwrap());
        let sent = header(identity(2, "203.0.113.9:7946"), foca::Message::Announce);
        let mut bytes = Vec::new();
        foca::Codec::encode_header(&mut codec, &sent, &mut bytes).unwrap();
        let got = foca::Codec::decode_header(&mut codec, &bytes[..]).unwrap();
        assert_eq!(got.dst, identity(2, "192.168.1.5:7946"));
        assert_eq!((got.src, got.message), (sent.src, sent.message));
    }

    #[test]
    fn a_full_buffer_is_an_error_not_a_panic() {
        let mut codec = SwimCodec::new("10.0.0.2:7946".parse().unwrap());
        let mut small = [0u8; 10];
        let sent = header(identity(2, "10.0.0.2:7946"), foca::Message::Ping(1));
        assert!(foca::Codec::encode_header(&mut codec, &sent, &mut small[..]).is_err());
    }

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
            let mut codec = SwimCodec::new("10.0.0.1:7946".parse().unwrap());
            let _ = foca::Codec::decode_header(&mut codec, &bytes[..]);
            let _ = foca::Codec::decode_member(&mut codec, &bytes[..]);
        }
    }
}
