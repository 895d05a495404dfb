//! [`QuicTransport`]: one quinn endpoint per agent, for gossip datagrams and control streams.
//!
//! Connections are opened on demand, cached by peer address, and closed by quinn's idle
//! timeout. Incoming connections must either present a CA-signed certificate (members) or use
//! the join ALPN (joiners, who are served the join exchange and nothing else). A datagram too
//! large for the path goes on a unidirectional stream instead of being dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use quinn::Runtime as _;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::mpsc;

use crate::identity::{NODE_DNS_SUFFIX, NodeId, NodeIdentity};
use crate::tls::{
    JOIN_ALPN, MEMBER_ALPN, NodeCredentials, Revocations, TlsError, Validity, Verification,
    node_id_of,
};
use crate::transport::{Inbound, Transport};
use crate::wire::{self, ControlRequest, ControlResponse};

/// How long a connection may stay silent before quinn closes it.
/// Long enough that members who probe each other only every few seconds keep their
/// connection (a new handshake costs about 5 KB of certificates).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a control exchange.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams queued per peer while its connection is being set up.
const PENDING_LIMIT: usize = 64;

/// QUIC transport failures.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused the crypto configuration.
    #[error("QUIC configuration: {0}")]
    Config(String),
    /// The peer could not be reached or the handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The exchange broke off or timed out.
    #[error("control exchange with {addr} failed: {reason}")]
    Exchange {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// Who sent a control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A member, named by its certificate.
    Member(NodeId),
    /// A node without a certificate, asking to join.
    Joiner(SocketAddr),
}

/// Serves control requests. Implemented by the agent.
pub trait ControlService: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        &self,
        caller: Caller,
        request: ControlRequest,
    ) -> Pin<Box<dyn Future<Output = ControlResponse> + Send + '_>>;
}

enum Slot {
    Connecting(Vec<Bytes>),
    Ready(quinn::Connection, Answers),
}

/// Whether a connection still answers what is sent on it. Every datagram is ack-eliciting, so
/// a peer that hears us sends something back within milliseconds. A connection that has not
/// received anything for [`STALL_AFTER`] while we kept sending is stalled: after a long
/// partition, quinn's retransmission timer has backed off so far that the path may stay shut
/// for tens of seconds after it heals (found by the simulator). Such a connection is replaced
/// by a fresh handshake.
#[derive(Clone, Copy)]
struct Answers {
    /// Datagrams received on the connection when last looked at.
    received: u64,
    /// Since when we have been sending without the count moving.
    unanswered_since: Option<tokio::time::Instant>,
}

/// How long a connection may go unanswered while we send on it before it is replaced.
const STALL_AFTER: Duration = Duration::from_secs(3);

impl Answers {
    fn new(conn: &quinn::Connection) -> Self {
        Answers {
            received: conn.stats().udp_rx.datagrams,
            unanswered_since: None,
        }
    }

    /// Notes a send on `conn`; true if the connection is stalled.
    fn stalled(&mut self, conn: &quinn::Connection) -> bool {
        let now = tokio::time::Instant::now();
        let received = conn.stats().udp_rx.datagrams;
        if received != self.received {
            self.received = received;
            self.unanswered_since = Some(now);
            return false;
        }
        let since = *self.unanswered_since.get_or_insert(now);
        now.duration_since(since) >= STALL_AFTER
    }
}

/// Control-stream bytes by kind (a request and its answer, as the application writes them;
/// QUIC's framing and acknowledgements are not in it). Gossip datagrams are counted by SWIM.
#[derive(Clone)]
pub struct Traffic {
    /// Bytes this node wrote on control streams.
    pub sent: Family<KindLabel, Counter>,
    /// Bytes this node read from control streams.
    pub received: Family<KindLabel, Counter>,
    /// Names a service request's kind, from its service number.
    service_kind: fn(u8) -> &'static str,
}

/// The kind of a control exchange: `join`, `control`, or a service's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

impl Traffic {
    /// Counters that name service requests with `service_kind`.
    pub fn new(service_kind: fn(u8) -> &'static str) -> Self {
        Traffic {
            sent: Family::default(),
            received: Family::default(),
            service_kind,
        }
    }

    fn kind(&self, request: &ControlRequest) -> &'static str {
        match request {
            ControlRequest::Join(_) => "join",
            ControlRequest::Service { service, .. } => (self.service_kind)(*service),
            _ => "control",
        }
    }

    fn count(&self, kind: &str, sent: usize, received: usize) {
        let label = KindLabel { kind: kind.into() };
        self.sent.get_or_create(&label).inc_by(sent as u64);
        self.received.get_or_create(&label).inc_by(received as u64);
    }
}

struct Shared {
    endpoint: quinn::Endpoint,
    /// Counted control-stream bytes, once the agent asks for them.
    traffic: std::sync::OnceLock<Traffic>,
    /// Replaced when the node renews its certificate.
    client: Mutex<quinn::ClientConfig>,
    /// What builds the configurations again on renewal.
    token_key: [u8; 32],
    cids: CidRng,
    slots: Mutex<BTreeMap<SocketAddr, Slot>>,
    inbound: mpsc::Sender<Inbound>,
    /// Held weakly: the agent's control service holds this transport, and a strong link back
    /// would keep both (and the socket) alive after the agent is gone.
    control: std::sync::Weak<dyn ControlService>,
    /// Nodes whose certificates the verifiers refuse; their traffic on connections opened
    /// before they were revoked is dropped too.
    revoked: Revocations,
    checks: Verification,
}

/// The real transport: QUIC with mutual TLS.
#[derive(Clone)]
pub struct QuicTransport {
    shared: Arc<Shared>,
}

/// quinn's transport settings for every blx connection.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut tc = quinn::TransportConfig::default();
    tc.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    tc.keep_alive_interval(None);
    tc.datagram_receive_buffer_size(Some(1 << 20));
    tc.max_concurrent_bidi_streams(16u32.into());
    tc.max_concurrent_uni_streams(64u32.into());
    // Gossip packets are far below the minimum MTU, so probing for a larger one only costs.
    tc.mtu_discovery_config(None);
    Arc::new(tc)
}

/// Where a client draws the connection ids of its first packets: a seeded stream (quinn's
/// default draws from the OS).
#[derive(Clone)]
pub struct CidRng(Arc<Mutex<rand::rngs::StdRng>>);

impl CidRng {
    /// A stream that follows from `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        use rand::SeedableRng;
        CidRng(Arc::new(Mutex::new(rand::rngs::StdRng::from_seed(seed))))
    }
}

/// A client configuration from rustls, with blx's transport settings, drawing its initial
/// connection ids from `cids`.
pub fn client_config(
    tls: rustls::ClientConfig,
    cids: &CidRng,
) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config());
    let cids = cids.clone();
    client.initial_dst_cid_provider(Arc::new(move || {
        use rand::RngExt;
        // The initial destination id must be at least 8 bytes (RFC 9000, 7.2).
        let bytes: [u8; 8] = lock(&cids.0).random();
        quinn_proto::ConnectionId::new(&bytes)
    }));
    Ok(client)
}

/// The secrets and seeds a QUIC endpoint draws on, from the agent's entropy: with these fixed,
/// quinn makes no draw of its own from the operating system.
#[derive(Clone)]
pub struct EndpointSeeds {
    /// Key of the HMAC that signs stateless resets.
    pub reset_key: [u8; 64],
    /// Seed of quinn's endpoint RNG (connection RNGs, initial packet numbers).
    pub rng: [u8; 32],
    /// Seed of the connection-id generator.
    pub cids: [u8; 32],
    /// Key that protects address-validation (retry) tokens.
    pub token_key: [u8; 32],
}

/// Connection ids drawn from a seeded RNG. quinn's own generator draws from the OS.
struct SeededCids {
    rng: rand::rngs::StdRng,
}

impl quinn_proto::ConnectionIdGenerator for SeededCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use rand::RngExt;
        let bytes: [u8; CID_LEN] = self.rng.random();
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// 4-byte connection ids (quinn's default is 8): every gossip packet carries one, and an agent
/// has at most a few thousand connections to tell apart.
const CID_LEN: usize = 4;

/// A quinn endpoint on `socket`, with no server side yet (a joiner has no certificate until it
/// has joined; [`QuicTransport::new`] adds it). Every secret and seed comes from `seeds`.
pub fn endpoint(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    runtime: Arc<dyn quinn::Runtime>,
    seeds: &EndpointSeeds,
) -> Result<quinn::Endpoint, QuicError> {
    use rand::SeedableRng;
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seeds.reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.rng_seed(Some(seeds.rng));
    let cids = std::sync::Mutex::new(rand::rngs::StdRng::from_seed(seeds.cids));
    config.cid_generator(move || {
        // Each generator quinn asks for continues from the same seeded stream.
        let seed: [u8; 32] = {
            use rand::RngExt;
            lock(&cids).random()
        };
        Box::new(SeededCids {
            rng: rand::rngs::StdRng::from_seed(seed),
        })
    });
    let addr = socket
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    quinn::Endpoint::new_with_abstract_socket(config, None, socket, runtime)
        .map_err(|source| QuicError::Bind { addr, source })
}

/// A UDP socket of the operating system, as quinn takes it.
pub fn os_socket(addr: SocketAddr) -> Result<Arc<dyn quinn::AsyncUdpSocket>, QuicError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| QuicError::Bind { addr, source })?;
    quinn::TokioRuntime
        .wrap_udp_socket(socket)
        .map_err(|source| QuicError::Bind { addr, source })
}

impl QuicTransport {
    /// Serves members and joiners on `endpoint` with `creds`, and starts accepting
    /// connections. Datagrams from members go to `inbound`; control requests go to `control`,
    /// which the caller keeps alive (the transport holds it weakly). Certificates naming a
    /// node in `revoked` are refused (see [`QuicTransport::revoke`]).
    pub fn new(
        endpoint: quinn::Endpoint,
        creds: &NodeCredentials,
        token_key: [u8; 32],
        cids: &CidRng,
        inbound: mpsc::Sender<Inbound>,
        control: Arc<dyn ControlService>,
        checks: Verification,
    ) -> Result<Self, QuicError> {
        endpoint.set_server_config(Some(server_config(creds, &checks, token_key)?));
        let client = client_config(creds.member_client_config(&checks)?, cids)?;
        let shared = Arc::new(Shared {
            endpoint,
            traffic: std::sync::OnceLock::new(),
            client: Mutex::new(client),
            token_key,
            cids: cids.clone(),
            slots: Mutex::new(BTreeMap::new()),
            inbound,
            control: Arc::downgrade(&control),
            revoked: checks.revoked.clone(),
            checks,
        });
        tokio::spawn(accept_loop(shared.clone()));
        Ok(QuicTransport { shared })
    }

    /// Presents `creds` from now on, on new connections of either side (a renewed
    /// certificate); open connections carry on.
    pub fn use_credentials(&self, creds: &NodeCredentials) -> Result<(), QuicError> {
        let server = server_config(creds, &self.shared.checks, self.shared.token_key)?;
        let client = client_config(
            creds.member_client_config(&self.shared.checks)?,
            &self.shared.cids,
        )?;
        self.shared.endpoint.set_server_config(Some(server));
        *lock(&self.shared.client) = client;
        Ok(())
    }

    /// Closes connections whose peer certificate has expired (the handshake checked it, but
    /// a connection can outlive it). Returns how many were closed.
    pub fn close_expired(&self) -> usize {
        let Some(now) = self.shared.checks.time.current_time() else {
            return 0;
        };
        let mut slots = lock(&self.shared.slots);
        let before = slots.len();
        slots.retain(|addr, slot| match slot {
            Slot::Ready(conn, _)
                if peer_validity(conn).is_some_and(|v| v.not_after_unix < now.as_secs()) =>
            {
                tracing::info!(peer = %addr, "closing a connection whose peer certificate expired");
                conn.close(5u32.into(), b"certificate expired");
                false
            }
            _ => true,
        });
        before - slots.len()
    }

    /// Replaces the revocation list. New handshakes with a revoked node fail in the
    /// verifiers; open connections to nodes revoked by this call are closed, and anything
    /// still arriving from them is dropped.
    pub fn revoke(&self, ids: BTreeSet<NodeId>) {
        let added = self.shared.revoked.replace(ids);
        if added.is_empty() {
            return;
        }
        let mut slots = lock(&self.shared.slots);
        slots.retain(|addr, slot| match slot {
            Slot::Ready(conn, _) if peer_id(conn).is_some_and(|id| added.contains(&id)) => {
                tracing::info!(peer = %addr, "closing the connection of a revoked node");
                conn.close(4u32.into(), b"certificate revoked");
                false
            }
            _ => true,
        });
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Sends one control request to a member and waits for the answer.
    pub async fn request(
        &self,
        to: SocketAddr,
        id: Option<NodeId>,
        request: &ControlRequest,
    ) -> Result<ControlResponse, QuicError> {
        self.request_within(to, id, request, CONTROL_TIMEOUT).await
    }

    /// [`QuicTransport::request`] with a caller's timeout (Raft RPCs carry their own).
    pub async fn request_within(
        &self,
        to: SocketAddr,
        id: Option<NodeId>,
        request: &ControlRequest,
        timeout: Duration,
    ) -> Result<ControlResponse, QuicError> {
        let conn = self.connection(to, id).await?;
        let mut sizes = (0, 0);
        let answer = exchange_counted(&conn, request, timeout, &mut sizes).await;
        if let Some(traffic) = self.shared.traffic.get() {
            traffic.count(traffic.kind(request), sizes.0, sizes.1);
        }
        answer
    }

    /// Starts counting control-stream bytes by kind into `traffic` (the first call wins).
    pub fn count_traffic(&self, traffic: Traffic) {
        let _ = self.shared.traffic.set(traffic);
    }

    /// Closes every connection, telling peers, and waits briefly for them to hear it.
    pub async fn shutdown(&self) {
        self.shared.endpoint.close(0u32.into(), b"agent stopping");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }

    async fn connection(
        &self,
        addr: SocketAddr,
        id: Option<NodeId>,
    ) -> Result<quinn::Connection, QuicError> {
        if let Some(Slot::Ready(conn, _)) = lock(&self.shared.slots).get(&addr)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let conn = dial(&self.shared, addr, id).await?;
        adopt(&self.shared, conn.clone(), addr);
        Ok(conn)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Transport for QuicTransport {
    fn send(&self, to: &NodeIdentity, bytes: Bytes) {
        let mut slots = lock(&self.shared.slots);
        match slots.get_mut(&to.addr) {
            Some(Slot::Ready(conn, answers)) if conn.close_reason().is_none() => {
                if !answers.stalled(conn) {
                    send_on(conn, bytes);
                    return;
                }
                tracing::debug!(peer = %to.addr, "connection stalled; replacing it");
                conn.close(3u32.into(), b"stalled");
            }
            Some(Slot::Connecting(queue)) => {
                if queue.len() < PENDING_LIMIT {
                    queue.push(bytes);
                }
                return;
            }
            _ => {}
        }
        slots.insert(to.addr, Slot::Connecting(vec![bytes]));
        drop(slots);
        let shared = self.shared.clone();
        let (addr, id) = (to.addr, (!to.id.is_unknown()).then_some(to.id));
        tokio::spawn(async move {
            match dial(&shared, addr, id).await {
                Ok(conn) => adopt(&shared, conn, addr),
                Err(e) => {
                    tracing::debug!(error = %e, "gossip dial failed");
                    let mut slots = lock(&shared.slots);
                    if matches!(slots.get(&addr), Some(Slot::Connecting(_))) {
                        slots.remove(&addr);
                    }
                }
            }
        });
    }
}

fn send_on(conn: &quinn::Connection, bytes: Bytes) {
    // Metadata goes only from a node to each member directly (nobody relays it), so it must
    // not be lost: a stream, which QUIC retransmits. It is sent rarely.
    let reliable = bytes.get(1) == Some(&wire::KIND_META);
    let sent = if reliable {
        Err(quinn::SendDatagramError::TooLarge)
    } else {
        conn.send_datagram(bytes.clone())
    };
    match sent {
        Ok(()) => {}
        Err(quinn::SendDatagramError::TooLarge) => {
            let conn = conn.clone();
            tokio::spawn(async move {
                if let Ok(mut stream) = conn.open_uni().await {
                    let _ = stream.write_all(&bytes).await;
                    let _ = stream.finish();
                }
            });
        }
        Err(e) => tracing::debug!(error = %e, "datagram not sent"),
    }
}

async fn dial(
    shared: &Shared,
    addr: SocketAddr,
    id: Option<NodeId>,
) -> Result<quinn::Connection, QuicError> {
    let name = id
        .map(|i| i.dns_name())
        .unwrap_or_else(|| NODE_DNS_SUFFIX.to_string());
    let connecting = shared
        .endpoint
        .connect_with(lock(&shared.client).clone(), addr, &name)
        .map_err(|e| QuicError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    // A handshake that gets no answer would otherwise wait out the idle timeout, with the
    // peer's gossip queued behind it long after a partition has healed; give up early, and
    // the next send dials afresh.
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(result) => result.map_err(|e| QuicError::Connect {
            addr,
            reason: e.to_string(),
        }),
        Err(_) => Err(QuicError::Connect {
            addr,
            reason: format!("no handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
        }),
    }
}

/// Longest wait for a member's handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Caches a member connection, flushes what was queued for it, and serves it.
fn adopt(shared: &Arc<Shared>, conn: quinn::Connection, addr: SocketAddr) {
    let Some(peer) = peer_id(&conn) else {
        conn.close(1u32.into(), b"no node certificate");
        return;
    };
    // The newest handshake wins the slot: a peer that restarted on the same address dials us
    // afresh, and the connection we held to its previous process would swallow datagrams until
    // the idle timeout (its new endpoint cannot reset a connection it never knew). Both sides
    // read from every connection, so two live ones for a pair do no harm.
    if let Some(Slot::Connecting(queue)) =
        lock(&shared.slots).insert(addr, Slot::Ready(conn.clone(), Answers::new(&conn)))
    {
        for bytes in queue {
            send_on(&conn, bytes);
        }
    }
    tokio::spawn(serve_member(shared.clone(), conn, peer));
}

fn peer_validity(conn: &quinn::Connection) -> Option<Validity> {
    Validity::of(&peer_cert(conn)?)
}

/// The certificate the peer presented in the handshake.
fn peer_cert(conn: &quinn::Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
}

fn server_config(
    creds: &NodeCredentials,
    checks: &Verification,
    token_key: [u8; 32],
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(creds.server_config(checks)?)
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&token_key);
    let mut server = quinn::ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
    server.transport_config(transport_config());
    Ok(server)
}

fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    node_id_of(&peer_cert(conn)?)
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "incoming handshake failed");
                    return;
                }
            };
            match alpn(&conn).as_deref() {
                Some(MEMBER_ALPN) => {
                    let addr = conn.remote_address();
                    adopt(&shared, conn, addr);
                }
                Some(JOIN_ALPN) => serve_joiner(shared, conn).await,
                _ => conn.close(1u32.into(), b"unknown protocol"),
            }
        });
    }
}

async fn serve_member(shared: Arc<Shared>, conn: quinn::Connection, peer: NodeId) {
    let addr = conn.remote_address();
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(bytes) => deliver(&shared, peer, addr, bytes),
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(mut stream) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let read = tokio::time::timeout(CONTROL_TIMEOUT, stream.read_to_end(wire::MAX_STREAM_MESSAGE)).await;
                        if let Ok(Ok(bytes)) = read {
                            deliver(&shared, peer, addr, bytes.into());
                        }
                    });
                }
                Err(_) => break,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    tokio::spawn(serve_control(shared.clone(), Caller::Member(peer), send, recv));
                }
                Err(_) => break,
            },
        }
    }
    let mut slots = lock(&shared.slots);
    if matches!(slots.get(&addr), Some(Slot::Ready(c, _)) if c.stable_id() == conn.stable_id()) {
        slots.remove(&addr);
    }
}

fn deliver(shared: &Shared, from: NodeId, addr: SocketAddr, bytes: Bytes) {
    if shared.revoked.contains(from) {
        return;
    }
    if shared
        .inbound
        .try_send(Inbound { from, addr, bytes })
        .is_err()
    {
        tracing::debug!("inbound queue full; datagram dropped");
    }
}

async fn serve_joiner(shared: Arc<Shared>, conn: quinn::Connection) {
    let caller = Caller::Joiner(conn.remote_address());
    let served = tokio::time::timeout(CONTROL_TIMEOUT, async {
        if let Ok((send, recv)) = conn.accept_bi().await {
            serve_control(shared, caller, send, recv).await;
        }
    })
    .await;
    if served.is_err() {
        conn.close(2u32.into(), b"join timed out");
    }
}

async fn serve_control(
    shared: Arc<Shared>,
    caller: Caller,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limit = match caller {
        Caller::Member(_) => wire::MAX_MEMBER_MESSAGE,
        Caller::Joiner(_) => wire::MAX_CONTROL_MESSAGE,
    };
    let Some(control) = shared.control.upgrade() else {
        let _ = send
            .write_all(&wire::encode_control(&ControlResponse::Failed(
                "the agent is stopping".into(),
            )))
            .await;
        let _ = send.finish();
        return;
    };
    let mut counted: Option<(&'static str, usize)> = None;
    let response = match tokio::time::timeout(CONTROL_TIMEOUT, recv.read_to_end(limit)).await {
        Ok(Ok(bytes)) => match wire::decode_control_request(&bytes, limit).inspect(|request| {
            counted = shared
                .traffic
                .get()
                .map(|traffic| (traffic.kind(request), bytes.len()));
        }) {
            Ok(ControlRequest::Join(req)) => {
                control.handle(caller, ControlRequest::Join(req)).await
            }
            Ok(other) => match caller {
                Caller::Member(id) if shared.revoked.contains(id) => {
                    ControlResponse::Failed("this node's certificate is revoked".into())
                }
                Caller::Member(_) => control.handle(caller, other).await,
                Caller::Joiner(_) => ControlResponse::Failed(
                    "only a join request may be sent without a node certificate".into(),
                ),
            },
            Err(e) => ControlResponse::Failed(format!("bad request: {e}")),
        },
        Ok(Err(e)) => ControlResponse::Failed(format!("bad request: {e}")),
        Err(_) => ControlResponse::Failed("request timed out".into()),
    };
    let out = wire::encode_control(&response);
    if let (Some(traffic), Some((kind, read))) = (shared.traffic.get(), counted) {
        traffic.count(kind, out.len(), read);
    }
    let _ = send.write_all(&out).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(CONTROL_TIMEOUT, send.stopped()).await;
}

/// One request, one response, on a fresh bidirectional stream.
pub async fn exchange(
    conn: &quinn::Connection,
    request: &ControlRequest,
) -> Result<ControlResponse, QuicError> {
    exchange_within(conn, request, CONTROL_TIMEOUT).await
}

/// [`exchange`] with a caller's timeout.
pub async fn exchange_within(
    conn: &quinn::Connection,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, QuicError> {
    exchange_counted(conn, request, timeout, &mut (0, 0)).await
}

/// [`exchange_within`], adding the bytes written and read to `sizes`.
async fn exchange_counted(
    conn: &quinn::Connection,
    request: &ControlRequest,
    timeout: Duration,
    sizes: &mut (usize, usize),
) -> Result<ControlResponse, QuicError> {
    let addr = conn.remote_address();
    let err = |reason: String| QuicError::Exchange { addr, reason };
    tokio::time::timeout(timeout, async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        let out = wire::encode_control(request);
        sizes.0 += out.len();
        send.write_all(&out).await.map_err(|e| err(e.to_string()))?;
        send.finish().map_err(|e| err(e.to_string()))?;
        let bytes = recv
            .read_to_end(wire::MAX_MEMBER_MESSAGE)
            .await
            .map_err(|e| err(e.to_string()))?;
        sizes.1 += bytes.len();
        wire::decode_control_response(&bytes, wire::MAX_MEMBER_MESSAGE)
            .map_err(|e| err(e.to_string()))
    })
    .await
    .map_err(|_| err("timed out".into()))?
}
