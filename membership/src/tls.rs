//! The cluster CA, node certificates and the rustls configurations of every QUIC connection.
//!
//! Every node certificate is signed by the cluster CA and names the node by
//! [`NodeId::dns_name`] plus the shared name [`NODE_DNS_SUFFIX`]. Members dial each other by id
//! (so a certificate is bound to the id gossip announces) and dial seeds by the shared name.
//! A joiner has no certificate yet: it dials with [`JOIN_ALPN`], pins the CA by the fingerprint
//! in its token, and may do nothing on that connection but ask to join.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::{NODE_DNS_SUFFIX, NodeId};

/// ALPN of member-to-member connections (gossip, control RPC). Both sides hold node certificates.
pub const MEMBER_ALPN: &[u8] = b"blx/1";
/// ALPN of a joiner's connection: no client certificate, and only a join request is served.
pub const JOIN_ALPN: &[u8] = b"blx-join/1";

/// Failures building or using certificates and TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not generate, parse or sign a certificate or key.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate signing request named something other than the joining node.
    #[error("certificate request is malformed: {0}")]
    BadRequest(String),
}

/// The ring crypto provider, shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate: what a join token pins.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The cluster certificate authority: created by the first agent, held by the authority node.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &hex(&self.fingerprint()))
            .finish()
    }
}

impl ClusterCa {
    /// Creates a new CA whose Ed25519 key is made from `seed` (32 bytes of the agent's
    /// entropy, so a simulated cluster's certificates are reproducible).
    pub fn generate(cluster_name: &str, seed: [u8; 32]) -> Result<Self, TlsError> {
        let key = ed25519_key(seed)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("blx cluster CA {cluster_name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Rebuilds a CA from its certificate and PKCS#8 key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_to_der(cert_pem)?;
        Ok(ClusterCa { cert_der, key })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        der_to_pem("CERTIFICATE", &self.cert_der)
    }

    /// The CA key in PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    /// Issues a certificate for `node` from a certificate signing request, ignoring whatever
    /// names the request asks for: the CA decides what a node is called.
    pub fn sign_request(
        &self,
        csr_der: &[u8],
        node: NodeId,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| TlsError::BadRequest(e.to_string()))?;
        let params = node_params(node, validity)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(params.signed_by(&csr.public_key, &issuer)?.der().clone())
    }

    /// Issues a certificate for `node` with a key made from `seed`: what the first agent
    /// gives itself.
    pub fn issue_node(
        &self,
        node: NodeId,
        seed: [u8; 32],
        validity: Validity,
    ) -> Result<NodeCredentials, TlsError> {
        let key = ed25519_key(seed)?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = node_params(node, validity)?.signed_by(&key, &issuer)?;
        Ok(NodeCredentials {
            id: node,
            cert_der: cert.der().clone(),
            ca_der: self.cert_der.clone(),
            key_der: key.serialize_der(),
        })
    }
}

/// An Ed25519 key pair from 32 seed bytes. Ed25519 because its signatures are deterministic
/// and always 64 bytes: with key material drawn from a seeded source, every certificate and
/// handshake message has the same bytes and the same size from run to run, which a simulated
/// cluster needs (ECDSA signatures draw fresh randomness and vary in length).
fn ed25519_key(seed: [u8; 32]) -> Result<KeyPair, TlsError> {
    // PKCS#8 v1 (RFC 8410): SEQUENCE { INTEGER 0, AlgorithmIdentifier { id-Ed25519 },
    // OCTET STRING { OCTET STRING seed } }.
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let pkcs8 = PrivatePkcs8KeyDer::from(der);
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &pkcs8,
        &rcgen::PKCS_ED25519,
    )?)
}

/// When a certificate is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First valid second.
    pub not_before_unix: u64,
    /// Last valid second.
    pub not_after_unix: u64,
}

impl Validity {
    /// Valid for `lifetime` from `now`. The start is set back by [`CLOCK_SLACK_SECS`] so a
    /// member whose clock runs a little behind the signer's accepts it at once.
    pub fn starting(now_unix: u64, lifetime: std::time::Duration) -> Self {
        Validity {
            not_before_unix: now_unix.saturating_sub(CLOCK_SLACK_SECS),
            not_after_unix: now_unix.saturating_add(lifetime.as_secs()),
        }
    }

    /// The validity a certificate states, if it parses.
    pub fn of(cert_der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
        let v = cert.validity();
        Some(Validity {
            not_before_unix: u64::try_from(v.not_before.timestamp()).ok()?,
            not_after_unix: u64::try_from(v.not_after.timestamp()).ok()?,
        })
    }

    /// When a node should renew: two thirds of the way through.
    pub fn renew_at(&self) -> u64 {
        let start = self.not_before_unix.saturating_add(CLOCK_SLACK_SECS);
        start + self.not_after_unix.saturating_sub(start) * 2 / 3
    }
}

/// How far back a new certificate's validity starts, for members whose clocks lag.
pub const CLOCK_SLACK_SECS: u64 = 300;

fn unix_time(secs: u64) -> Result<time::OffsetDateTime, TlsError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| TlsError::BadRequest(format!("time {secs} is out of range")))
}

fn node_params(node: NodeId, validity: Validity) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(vec![node.dns_name(), NODE_DNS_SUFFIX.to_string()])?;
    params.not_before = unix_time(validity.not_before_unix)?;
    params.not_after = unix_time(validity.not_after_unix)?;
    params
        .distinguished_name
        .push(DnType::CommonName, node.dns_name());
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// A key and a certificate signing request made by a joiner, before it holds a certificate.
pub struct PendingKey {
    key: KeyPair,
    /// DER of the certificate signing request to send with the join request.
    pub csr_der: Vec<u8>,
}

impl PendingKey {
    /// Makes a key from `seed` and a request for a certificate. The request names no node:
    /// the admitting side assigns the id and writes it into the certificate it signs.
    pub fn generate(seed: [u8; 32]) -> Result<Self, TlsError> {
        let key = ed25519_key(seed)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "blx joiner");
        let csr = params.serialize_request(&key)?;
        Ok(PendingKey {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// Completes the credentials with the certificate the cluster granted.
    pub fn into_credentials(
        self,
        node: NodeId,
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
    ) -> NodeCredentials {
        NodeCredentials {
            id: node,
            cert_der: cert_der.into(),
            ca_der: ca_der.into(),
            key_der: self.key.serialize_der(),
        }
    }
}

/// What a node needs to take part in the cluster: its certificate, its key and the CA.
#[derive(Clone)]
pub struct NodeCredentials {
    /// The node this certificate names.
    pub id: NodeId,
    /// The node certificate, signed by the CA.
    pub cert_der: CertificateDer<'static>,
    /// The cluster CA certificate.
    pub ca_der: CertificateDer<'static>,
    /// The node's private key, PKCS#8 DER. Secret.
    pub key_der: Vec<u8>,
}

impl fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// The fingerprint of the cluster CA these credentials belong to.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca_der)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone(), self.ca_der.clone()]
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        Ok(Arc::new(roots))
    }

    /// The server side of every connection: members must present a CA-signed certificate
    /// that names a node not in `revoked` (anything else fails the handshake); joiners may
    /// present none, and are then served nothing but the join exchange.
    pub fn server_config(&self, checks: &Verification) -> Result<rustls::ServerConfig, TlsError> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(MemberClientVerifier {
            inner,
            revoked: checks.revoked.clone(),
        });
        let mut config =
            rustls::ServerConfig::builder_with_details(provider(), checks.time.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(self.chain(), self.key())?;
        config.alpn_protocols = vec![MEMBER_ALPN.to_vec(), JOIN_ALPN.to_vec()];
        Ok(config)
    }

    /// The client side of member-to-member connections: mutual TLS against the cluster CA,
    /// refusing a server whose certificate names a node in `revoked`.
    pub fn member_client_config(
        &self,
        checks: &Verification,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(MemberServerVerifier {
            inner,
            revoked: checks.revoked.clone(),
            any_node: false,
        });
        let mut config =
            rustls::ClientConfig::builder_with_details(provider(), checks.time.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(self.chain(), self.key())?;
        config.alpn_protocols = vec![MEMBER_ALPN.to_vec()];
        Ok(config)
    }
}

/// What a member checks of a peer's certificate beyond the CA's signature: the revocation
/// list, and the validity period against this clock (the agent's wall clock, so a simulated
/// cluster checks expiry in simulated time).
#[derive(Clone, Debug)]
pub struct Verification {
    /// Revoked node ids.
    pub revoked: Revocations,
    /// The time certificates are checked at.
    pub time: Arc<dyn rustls::time_provider::TimeProvider>,
}

impl Verification {
    /// No revocations yet, the system clock.
    pub fn system() -> Self {
        Verification {
            revoked: Revocations::default(),
            time: Arc::new(rustls::time_provider::DefaultTimeProvider),
        }
    }
}

/// The node ids whose certificates are refused: the revocation list of the replicated state,
/// shared by the verifiers of one endpoint and its transport. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Revocations(Arc<RwLock<BTreeSet<NodeId>>>);

impl Revocations {
    /// Whether `id` is revoked.
    pub fn contains(&self, id: NodeId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// Replaces the list; the ids newly revoked by this call.
    pub fn replace(&self, ids: BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let added = ids.difference(&current).copied().collect();
        *current = ids;
        added
    }

    /// Refuses a verified certificate that names a revoked node.
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match node_id_of(end_entity) {
            Some(id) if self.contains(id) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            )),
            _ => Ok(()),
        }
    }
}

/// The server's check of a member's certificate: the CA's signature, then the revocation list.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Revocations,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revoked.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A member's check of the member it dials: the CA's signature, then the revocation list.
/// With `any_node` (the CLI dialling an HTTPS API by address), the certificate is checked
/// under the name every node certificate carries instead of the name dialled.
#[derive(Debug)]
struct MemberServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    revoked: Revocations,
    any_node: bool,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let shared;
        let server_name = if self.any_node {
            shared = ServerName::try_from(NODE_DNS_SUFFIX)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            &shared
        } else {
            server_name
        };
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.revoked.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client side of a joiner's connection: no client certificate; the server must present a
/// chain that ends in the CA whose fingerprint the token carries.
pub fn join_client_config(
    ca_fingerprint: [u8; 32],
    time: Arc<dyn rustls::time_provider::TimeProvider>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_details(provider(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            fingerprint: ca_fingerprint,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    Ok(config)
}

/// ALPN of the HTTP API.
const HTTP1_ALPN: &[u8] = b"http/1.1";

/// The certificate the HTTPS API presents: this node's current cluster certificate, which
/// the renewal task replaces in place, so a renewed certificate serves the next handshake.
#[derive(Clone, Debug)]
pub struct ServingCert(Arc<RwLock<Arc<rustls::sign::CertifiedKey>>>);

impl ServingCert {
    /// Serves `creds`.
    pub fn new(creds: &NodeCredentials) -> Result<Self, TlsError> {
        Ok(ServingCert(Arc::new(RwLock::new(Arc::new(
            Self::certified(creds)?,
        )))))
    }

    /// Serves `creds` from the next handshake on.
    pub fn replace(&self, creds: &NodeCredentials) -> Result<(), TlsError> {
        let key = Arc::new(Self::certified(creds)?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    fn certified(creds: &NodeCredentials) -> Result<rustls::sign::CertifiedKey, TlsError> {
        Ok(rustls::sign::CertifiedKey::from_der(
            creds.chain(),
            creds.key(),
            &provider(),
        )?)
    }

    /// The server side of the HTTPS API: this certificate, TLS 1.3, no client certificate
    /// (API callers prove themselves with a bearer token).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        config.alpn_protocols = vec![HTTP1_ALPN.to_vec()];
        Ok(config)
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The client side of the HTTPS API: the server must present a node certificate signed by
/// the cluster CA `ca_der`, whatever address it was dialled at (node certificates name nodes,
/// not addresses).
pub fn api_client_config(
    ca_der: CertificateDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der)?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberServerVerifier {
            inner,
            revoked: Revocations::default(),
            any_node: true,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![HTTP1_ALPN.to_vec()];
    Ok(config)
}

/// The message rustls reports when a server's chain does not end in the pinned CA.
pub const PIN_MISMATCH: &str = "server certificate is not issued by the CA this token names";

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| rustls::Error::General(PIN_MISMATCH.into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let shared = ServerName::try_from(NODE_DNS_SUFFIX)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], &shared, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The node id a verified peer certificate names, if it names one.
pub fn node_id_of(cert_der: &[u8]) -> Option<NodeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => NodeId::from_dns_name(dns),
        _ => None,
    })
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// PEM-encodes DER.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes the first PEM block (of any label).
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    let (_, der) = <(SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::BadRequest(format!("bad PEM: {e}")))?;
    Ok(der.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour() -> Validity {
        Validity::starting(1_700_000_000, std::time::Duration::from_secs(3600))
    }

    #[test]
    fn a_certificate_states_the_validity_it_was_given() {
        let ca = ClusterCa::generate("t", [1; 32]).unwrap();
        let creds = ca.issue_node(NodeId([7; 8]), [2; 32], hour()).unwrap();
        let v = Validity::of(&creds.cert_der).unwrap();
        assert_eq!(v, hour());
        assert_eq!(
            v.not_after_unix - v.not_before_unix,
            3600 + CLOCK_SLACK_SECS
        );
        assert_eq!(v.renew_at(), 1_700_000_000 + 2400);
    }

    #[test]
    fn a_signed_request_names_the_node_the_ca_chose() {
        let ca = ClusterCa::generate("t", [1; 32]).unwrap();
        let node = NodeId([7; 8]);
        let pending = PendingKey::generate([2; 32]).unwrap();
        let cert = ca.sign_request(&pending.csr_der, node, hour()).unwrap();
        assert_eq!(node_id_of(&cert), Some(node));
        let creds = pending.into_credentials(node, cert.to_vec(), ca.cert_der().to_vec());
        assert!(creds.server_config(&Verification::system()).is_ok());
        assert!(creds.member_client_config(&Verification::system()).is_ok());
        assert!(ca.sign_request(b"garbage", node, hour()).is_err());
    }

    #[test]
    fn the_same_seeds_give_the_same_certificates() {
        let a = ClusterCa::generate("t", [4; 32]).unwrap();
        let b = ClusterCa::generate("t", [4; 32]).unwrap();
        assert_eq!(a.cert_der(), b.cert_der());
        let node = NodeId([5; 8]);
        assert_eq!(
            a.issue_node(node, [6; 32], hour()).unwrap().cert_der,
            b.issue_node(node, [6; 32], hour()).unwrap().cert_der
        );
        assert_ne!(
            ClusterCa::generate("t", [7; 32]).unwrap().cert_der(),
            a.cert_der()
        );
    }

    #[test]
    fn ca_survives_a_pem_round_trip() {
        let ca = ClusterCa::generate("t", [1; 32]).unwrap();
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let creds = again.issue_node(NodeId([1; 8]), [3; 32], hour()).unwrap();
        assert_eq!(node_id_of(&creds.cert_der), Some(NodeId([1; 8])));
    }
}
