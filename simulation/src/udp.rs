//! QUIC over turmoil's simulated UDP.
//!
//! [`SimUdpSocket`] implements [`quinn::AsyncUdpSocket`] on top of a
//! [`turmoil::net::UdpSocket`], so a whole quinn stack (endpoint driver,
//! connections, TLS) can run inside a deterministic turmoil simulation via
//! [`quinn::Endpoint::new_with_abstract_socket`] with [`quinn::TokioRuntime`]
//! (turmoil hosts are paused-clock tokio runtimes, and `TokioRuntime` reads
//! tokio's clock, so quinn's timers follow virtual time).
//!
//! Besides turmoil's own link model (latency, partitions, holds),
//! [`LinkFaults`] adds seeded per-directed-link datagram loss, applied on the
//! sending side before a datagram enters turmoil's network.
//!
//! Behaviour worth knowing:
//! - One datagram per transmit and per receive (no GSO/GRO), no ECN.
//! - Sending never blocks: turmoil's UDP has no back-pressure, so
//!   [`quinn::UdpPoller`] is always ready and `try_send` never returns
//!   `WouldBlock`. Send errors from turmoil (e.g. "connection refused" for an
//!   address that is not a simulated host) are swallowed like a real UDP
//!   socket's ICMP errors, i.e. the datagram is lost.
//! - turmoil has no public call that tells a host its own IP address, and
//!   only lets sockets bind the unspecified or loopback address. To know the
//!   source IP of a link, [`SimUdpSocket::bind`] learns it by sending one
//!   multicast datagram to itself on a throw-away socket; that costs one
//!   simulation tick.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use quinn::udp::{RecvMeta, Transmit};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Faults the simulator applies to datagrams, shared by every socket of a run.
///
/// Holds a loss probability per directed link `(from, to)` of host IP
/// addresses and a seeded RNG; the RNG is drawn from only for datagrams on a
/// link whose loss probability is above zero, so adding a lossy link does not
/// perturb the draws of an otherwise identical run elsewhere.
pub struct LinkFaults {
    state: Mutex<FaultState>,
    /// Sequence for the self-discovery probes of [`SimUdpSocket::bind`].
    probe_seq: AtomicU32,
}

struct FaultState {
    loss: BTreeMap<(IpAddr, IpAddr), f64>,
    rng: StdRng,
    dropped: u64,
}

impl LinkFaults {
    /// Creates a fault table with no loss on any link and an RNG seeded with
    /// `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(FaultState {
                loss: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                dropped: 0,
            }),
            probe_seq: AtomicU32::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the probability that a datagram sent from `from` to `to` is lost.
    ///
    /// `p` is clamped to `[0, 1]`; `0.0` (or NaN) clears the link. The
    /// reverse direction is not affected.
    pub fn set_loss(&self, from: IpAddr, to: IpAddr, p: f64) {
        let mut state = self.state();
        if p > 0.0 {
            state.loss.insert((from, to), p.min(1.0));
        } else {
            state.loss.remove(&(from, to));
        }
    }

    /// Clears the loss on every link. The RNG and the drop count are kept.
    pub fn clear(&self) {
        self.state().loss.clear();
    }

    /// Decides whether one datagram from `from` to `to` is lost, and counts
    /// it if so. Draws from the seeded RNG only when the link's loss
    /// probability is above zero.
    pub fn should_drop(&self, from: IpAddr, to: IpAddr) -> bool {
        let mut state = self.state();
        let Some(&p) = state.loss.get(&(from, to)) else {
            return false;
        };
        let drop = state.rng.random::<f64>() < p;
        if drop {
            state.dropped += 1;
        }
        drop
    }

    /// Number of datagrams [`should_drop`](Self::should_drop) has dropped.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }
}

impl fmt::Debug for LinkFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("LinkFaults")
            .field("loss", &state.loss)
            .field("dropped", &state.dropped)
            .finish_non_exhaustive()
    }
}

type ReadableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// quinn's socket over a turmoil UDP socket.
///
/// Create it with [`SimUdpSocket::bind`] and hand it to
/// [`quinn::Endpoint::new_with_abstract_socket`].
pub struct SimUdpSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    /// The address reported to quinn (the address that was bound).
    local_addr: SocketAddr,
    /// This host's IP: the `from` of every link this socket sends on.
    local_ip: IpAddr,
    faults: Arc<LinkFaults>,
    /// turmoil only offers an async `readable()`; the pending future is kept
    /// here between `poll_recv` calls so its waker registration survives.
    readable: Mutex<Option<ReadableFuture>>,
}

impl SimUdpSocket {
    /// Binds a turmoil UDP socket on the current simulated host (must be
    /// called inside a turmoil host).
    ///
    /// `addr` is the unspecified address (`0.0.0.0` / `::`) or the host's own
    /// IP, with a port (`0` picks an ephemeral one); the socket is bound on
    /// the unspecified address either way, since turmoil binds nothing else
    /// besides loopback. A loopback `addr` binds loopback. The host's own IP
    /// is found out with a one-tick multicast probe (see the module docs).
    ///
    /// # Errors
    ///
    /// turmoil's bind errors (e.g. `AddrInUse`), and `AddrNotAvailable` if
    /// `addr` names an IP that is not this host's.
    ///
    /// # Panics
    ///
    /// Outside a turmoil host, and (as turmoil does) if the IP version of
    /// `addr` differs from the simulation's.
    pub async fn bind(addr: SocketAddr, faults: Arc<LinkFaults>) -> io::Result<Arc<Self>> {
        let requested = addr.ip();
        let (bind_addr, local_ip) = if requested.is_loopback() {
            (addr, requested)
        } else {
            let unspecified = unspecified_like(requested);
            let sock_bind = SocketAddr::new(unspecified, addr.port());
            (sock_bind, unspecified)
        };
        let inner = turmoil::net::UdpSocket::bind(bind_addr).await?;
        let bound = inner.local_addr()?;
        let local_ip = if local_ip.is_loopback() {
            local_ip
        } else {
            let own = discover_host_ip(requested, &faults).await?;
            if !requested.is_unspecified() && requested != own {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{requested} is not this host's address ({own})"),
                ));
            }
            own
        };
        let local_addr = if requested.is_unspecified() {
            bound
        } else {
            SocketAddr::new(requested, bound.port())
        };
        Ok(Arc::new(Self {
            inner: Arc::new(inner),
            local_addr,
            local_ip,
            faults,
            readable: Mutex::new(None),
        }))
    }

    /// Sends one datagram unless the fault table drops it.
    fn send_one(&self, contents: &[u8], destination: SocketAddr) {
        if self.faults.should_drop(self.local_ip, destination.ip()) {
            return;
        }
        // turmoil's UDP never blocks; its errors mean "not delivered",
        // which for UDP is loss, as quinn-udp treats send errors.
        let _ = self.inner.try_send_to(contents, destination);
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Learns the current host's IP: a socket joined to a multicast group that
/// has no other member sends to the group and receives its own datagram
/// through turmoil's multicast loopback, whose origin carries the host IP.
async fn discover_host_ip(family: IpAddr, faults: &LinkFaults) -> io::Result<IpAddr> {
    let seq = faults.probe_seq.fetch_add(1, Ordering::Relaxed);
    let [_, a, b, c] = seq.to_be_bytes();
    let unspecified = unspecified_like(family);
    let probe = turmoil::net::UdpSocket::bind(SocketAddr::new(unspecified, 0)).await?;
    let group = match family {
        IpAddr::V4(_) => {
            let group = Ipv4Addr::new(239, a, b, c);
            probe.join_multicast_v4(group, Ipv4Addr::UNSPECIFIED)?;
            probe.set_multicast_loop_v4(true)?;
            IpAddr::V4(group)
        }
        IpAddr::V6(_) => {
            let group = Ipv6Addr::new(
                0xff05,
                0,
                0,
                0,
                0,
                0x626c,
                u16::from(a),
                u16::from_be_bytes([b, c]),
            );
            probe.join_multicast_v6(&group, 0)?;
            probe.set_multicast_loop_v6(true)?;
            IpAddr::V6(group)
        }
    };
    let port = probe.local_addr()?.port();
    let nonce = seq.to_le_bytes();
    probe.send_to(&nonce, SocketAddr::new(group, port)).await?;
    let mut buf = [0u8; 8];
    let wait = async {
        loop {
            let (n, origin) = probe.recv_from(&mut buf).await?;
            if buf[..n] == nonce {
                return Ok::<_, io::Error>(origin.ip());
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(1), wait).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "host address probe did not loop back",
        )),
    }
}

impl fmt::Debug for SimUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdpSocket")
            .field("local_addr", &self.local_addr)
            .field("local_ip", &self.local_ip)
            .finish_non_exhaustive()
    }
}

/// Write readiness for [`SimUdpSocket`]: always ready, since turmoil's UDP
/// has no back-pressure and `try_send` never returns `WouldBlock`.
#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for SimUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match transmit.segment_size {
            // Not produced while `max_transmit_segments() == 1`, but split
            // honestly if it ever is.
            Some(segment) if segment > 0 && segment < transmit.contents.len() => {
                for chunk in transmit.contents.chunks(segment) {
                    self.send_one(chunk, transmit.destination);
                }
            }
            _ => self.send_one(transmit.contents, transmit.destination),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self.readable.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // A pending `readable()` holds turmoil's receive lock, so it must
            // finish before `try_recv_from` can succeed.
            if let Some(fut) = readable.as_mut() {
                match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => {
                        *readable = None;
                        result?;
                    }
                }
            }
            let mut filled = 0;
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
                match self.inner.try_recv_from(buf) {
                    Ok((len, origin)) => {
                        *meta = RecvMeta {
                            addr: origin,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: Some(self.local_ip),
                        };
                        filled += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if filled == 0 => return Poll::Ready(Err(e)),
                    Err(_) => break,
                }
            }
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
            let inner = Arc::clone(&self.inner);
            *readable = Some(Box::pin(async move { inner.readable().await }));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        // turmoil delivers every datagram whole, whatever its size.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::{
        error::Error,
        sync::atomic::AtomicU64,
        time::{SystemTime, UNIX_EPOCH},
    };

    use bytes::Bytes;
    use quinn::{
        ClientConfig, ConnectionError, ConnectionId, ConnectionIdGenerator, Endpoint,
        EndpointConfig, IdleTimeout, ServerConfig, TokioRuntime, TransportConfig, VarInt,
        crypto::rustls::{QuicClientConfig, QuicServerConfig},
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};

    type TestResult<T = ()> = Result<T, Box<dyn Error>>;
    /// (virtual time since the simulation started, bytes received)
    type Log = Arc<Mutex<Vec<(Duration, Vec<u8>)>>>;

    const EPOCH_SECS: u64 = 1_700_000_000;
    const SERVER_PORT: u16 = 4433;
    const ALPN: &[u8] = b"blx-sim-test";

    fn epoch() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(EPOCH_SECS)
    }

    /// Wall time as the simulation sees it: the fixed epoch plus virtual time.
    fn virtual_since_unix_epoch() -> Duration {
        turmoil::since_epoch().unwrap_or(Duration::from_secs(EPOCH_SECS))
    }

    /// Clock for rustls and quinn's token handling that never reads the host clock.
    #[derive(Debug)]
    struct SimClock;

    impl rustls::time_provider::TimeProvider for SimClock {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(virtual_since_unix_epoch()))
        }
    }

    impl quinn::TimeSource for SimClock {
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + virtual_since_unix_epoch()
        }
    }

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// quinn's default CID generators read the thread RNG; this one is seeded.
    struct SeededCids {
        state: u64,
    }

    impl ConnectionIdGenerator for SeededCids {
        fn generate_cid(&mut self) -> ConnectionId {
            ConnectionId::new(&splitmix64(&mut self.state).to_le_bytes())
        }
        fn cid_len(&self) -> usize {
            8
        }
        fn cid_lifetime(&self) -> Option<Duration> {
            None
        }
    }

    #[derive(Clone)]
    struct Pki {
        cert: CertificateDer<'static>,
        key_pkcs8: Vec<u8>,
    }

    /// Ed25519 so that signatures, hence handshake packet sizes, are the
    /// same length every run (ECDSA DER signatures vary by a byte or two).
    fn make_pki() -> Pki {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let params = rcgen::CertificateParams::new(vec!["server".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("self-signed cert");
        Pki {
            cert: cert.der().clone(),
            key_pkcs8: key.serialize_der(),
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn transport(idle_ms: u32) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(idle_ms))));
        t.datagram_receive_buffer_size(Some(64 * 1024));
        t.datagram_send_buffer_size(64 * 1024);
        Arc::new(t)
    }

    fn endpoint_config(seed: u8) -> EndpointConfig {
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[seed; 32]);
        let mut cfg = EndpointConfig::new(Arc::new(reset_key));
        cfg.rng_seed(Some([seed; 32]));
        let made = AtomicU64::new(0);
        cfg.cid_generator(move || {
            let n = made.fetch_add(1, Ordering::Relaxed);
            Box::new(SeededCids {
                state: (u64::from(seed) << 32) ^ n,
            })
        });
        cfg
    }

    fn server_config(pki: &Pki) -> ServerConfig {
        let mut tls = rustls::ServerConfig::builder_with_details(provider(), Arc::new(SimClock))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_pkcs8.clone())),
            )
            .expect("server cert");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls).expect("quic server crypto");
        let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&[0x5a; 32]);
        let mut cfg = ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
        cfg.transport_config(transport(10_000));
        cfg.time_source(Arc::new(SimClock));
        cfg
    }

    fn client_config(pki: &Pki, seed: u64, idle_ms: u32) -> ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.cert.clone()).expect("trust anchor");
        let mut tls = rustls::ClientConfig::builder_with_details(provider(), Arc::new(SimClock))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).expect("quic client crypto");
        let mut cfg = ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport(idle_ms));
        let state = Mutex::new(seed);
        cfg.initial_dst_cid_provider(Arc::new(move || {
            let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
            let mut cid = [0u8; 16];
            cid[..8].copy_from_slice(&splitmix64(&mut s).to_le_bytes());
            cid[8..].copy_from_slice(&splitmix64(&mut s).to_le_bytes());
            ConnectionId::new(&cid)
        }));
        cfg
    }

    fn build_sim() -> turmoil::Sim<'static> {
        turmoil::Builder::new()
            .rng_seed(7)
            .epoch(epoch())
            .simulation_duration(Duration::from_secs(60))
            .udp_capacity(1024)
            .build()
    }

    fn any_v4(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    }

    /// Server: answers "ping" on each bidirectional stream with "pong" and
    /// echoes every datagram.
    fn start_server(sim: &mut turmoil::Sim<'_>, pki: &Pki, faults: &Arc<LinkFaults>) {
        let pki = pki.clone();
        let faults = Arc::clone(faults);
        sim.host("server", move || {
            let cfg = server_config(&pki);
            let faults = Arc::clone(&faults);
            async move {
                let socket = SimUdpSocket::bind(any_v4(SERVER_PORT), faults).await?;
                let endpoint = Endpoint::new_with_abstract_socket(
                    endpoint_config(1),
                    Some(cfg),
                    socket,
                    Arc::new(TokioRuntime),
                )?;
                while let Some(incoming) = endpoint.accept().await {
                    tokio::spawn(serve(incoming));
                }
                Ok(())
            }
        });
    }

    async fn serve(incoming: quinn::Incoming) {
        let Ok(conn) = incoming.await else { return };
        let echo = conn.clone();
        tokio::spawn(async move {
            while let Ok(datagram) = echo.read_datagram().await {
                let _ = echo.send_datagram(datagram);
            }
        });
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let Ok(msg) = recv.read_to_end(1024).await else {
                    return;
                };
                if msg == b"ping" {
                    let _ = send.write_all(b"pong").await;
                }
                let _ = send.finish();
            });
        }
    }

    /// Ping/pong on a stream, then a datagram round trip; logs both replies.
    async fn exchange(conn: &quinn::Connection, log: &Log) -> TestResult {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"ping").await?;
        send.finish()?;
        let pong = recv.read_to_end(1024).await?;
        assert_eq!(pong, b"pong");
        let at = turmoil::sim_elapsed().ok_or("no sim time")?;
        log.lock().expect("log").push((at, pong));

        // Datagrams are unreliable, and turmoil's default latency (0-100 ms,
        // drawn per message) reorders a lot: a packet can reach the client
        // after the server retired the connection ID it carries, and is then
        // dropped. So retry until one round trip succeeds.
        let mut echoed = None;
        for _ in 0..20 {
            conn.send_datagram(Bytes::from_static(b"dgram"))?;
            let wait = Duration::from_millis(250);
            if let Ok(got) = tokio::time::timeout(wait, conn.read_datagram()).await {
                echoed = Some(got?);
                break;
            }
        }
        let echoed = echoed.ok_or("no datagram echo after 20 tries")?;
        assert_eq!(&echoed[..], b"dgram");
        let at = turmoil::sim_elapsed().ok_or("no sim time")?;
        log.lock().expect("log").push((at, echoed.to_vec()));
        Ok(())
    }

    fn server_addr() -> SocketAddr {
        SocketAddr::new(turmoil::lookup("server"), SERVER_PORT)
    }

    fn run_ping_pong(pki: &Pki) -> Vec<(Duration, Vec<u8>)> {
        let faults = LinkFaults::new(11);
        let log: Log = Arc::default();
        let mut sim = build_sim();
        start_server(&mut sim, pki, &faults);
        let client_pki = pki.clone();
        let client_log = Arc::clone(&log);
        let client_faults = Arc::clone(&faults);
        sim.client("client", async move {
            let socket = SimUdpSocket::bind(any_v4(0), client_faults).await?;
            let endpoint = Endpoint::new_with_abstract_socket(
                endpoint_config(2),
                None,
                socket,
                Arc::new(TokioRuntime),
            )?;
            let conn = endpoint
                .connect_with(
                    client_config(&client_pki, 2, 5_000),
                    server_addr(),
                    "server",
                )?
                .await?;
            exchange(&conn, &client_log).await?;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok(())
        });
        sim.run().expect("simulation");
        assert_eq!(faults.dropped(), 0);
        log.lock().expect("log").clone()
    }

    #[test]
    fn quic_ping_pong_and_datagram() {
        let log = run_ping_pong(&make_pki());
        let bytes: Vec<&[u8]> = log.iter().map(|(_, b)| b.as_slice()).collect();
        assert_eq!(bytes, [&b"pong"[..], &b"dgram"[..]]);
        assert!(log[0].0 > Duration::ZERO);
    }

    #[test]
    fn total_loss_times_out_then_recovers() {
        let pki = make_pki();
        let faults = LinkFaults::new(3);
        let log: Log = Arc::default();
        let mut sim = build_sim();
        start_server(&mut sim, &pki, &faults);
        let client_pki = pki.clone();
        let client_log = Arc::clone(&log);
        let client_faults = Arc::clone(&faults);
        sim.client("client", async move {
            let socket = SimUdpSocket::bind(any_v4(0), Arc::clone(&client_faults)).await?;
            let endpoint = Endpoint::new_with_abstract_socket(
                endpoint_config(2),
                None,
                socket,
                Arc::new(TokioRuntime),
            )?;
            let me = turmoil::lookup("client");
            let server = turmoil::lookup("server");
            client_faults.set_loss(me, server, 1.0);

            let started = turmoil::sim_elapsed().ok_or("no sim time")?;
            let lost = endpoint
                .connect_with(
                    client_config(&client_pki, 2, 1_000),
                    server_addr(),
                    "server",
                )?
                .await;
            assert!(
                matches!(lost, Err(ConnectionError::TimedOut)),
                "expected a timeout, got {lost:?}"
            );
            let waited = turmoil::sim_elapsed().ok_or("no sim time")? - started;
            assert!(
                waited >= Duration::from_secs(1),
                "timed out after {waited:?}"
            );
            assert!(client_faults.dropped() > 0);

            client_faults.clear();
            let conn = endpoint
                .connect_with(
                    client_config(&client_pki, 3, 5_000),
                    server_addr(),
                    "server",
                )?
                .await?;
            exchange(&conn, &client_log).await?;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            Ok(())
        });
        sim.run().expect("simulation");
        assert!(faults.dropped() > 0);
        assert_eq!(log.lock().expect("log").len(), 2);
    }

    #[test]
    fn same_seeds_same_timeline() {
        let pki = make_pki();
        let first = run_ping_pong(&pki);
        let second = run_ping_pong(&pki);
        assert_eq!(first.len(), 2);
        assert_eq!(first, second);
    }

    #[test]
    fn bind_learns_host_ip_v4_and_v6() {
        for version in [turmoil::IpVersion::V4, turmoil::IpVersion::V6] {
            let mut sim = turmoil::Builder::new()
                .rng_seed(7)
                .epoch(epoch())
                .ip_version(version)
                .build();
            let faults = LinkFaults::new(1);
            sim.client("a", async move {
                let me = turmoil::lookup("a");
                let any = SocketAddr::new(unspecified_like(me), 0);
                let first = SimUdpSocket::bind(any, Arc::clone(&faults)).await?;
                assert_eq!(first.local_ip, me);
                assert!(first.local_addr.ip().is_unspecified());
                // Naming the host's own IP works and is what quinn is told.
                let named =
                    SimUdpSocket::bind(SocketAddr::new(me, 7000), Arc::clone(&faults)).await?;
                assert_eq!(
                    quinn::AsyncUdpSocket::local_addr(&*named)?,
                    SocketAddr::new(me, 7000)
                );
                // Another IP is refused.
                let other = match me {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 9, 9)),
                };
                let err = SimUdpSocket::bind(SocketAddr::new(other, 7001), Arc::clone(&faults))
                    .await
                    .expect_err("foreign IP");
                assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
                Ok(())
            });
            sim.run().expect("simulation");
        }
    }

    #[test]
    fn link_faults_are_directed_and_seeded() {
        let a: IpAddr = Ipv4Addr::new(192, 168, 0, 1).into();
        let b: IpAddr = Ipv4Addr::new(192, 168, 0, 2).into();
        let draws = |seed| {
            let faults = LinkFaults::new(seed);
            faults.set_loss(a, b, 0.5);
            let pattern: Vec<bool> = (0..64).map(|_| faults.should_drop(a, b)).collect();
            assert!((0..64).all(|_| !faults.should_drop(b, a)));
            let dropped = pattern.iter().filter(|d| **d).count();
            assert_eq!(faults.dropped(), u64::try_from(dropped).expect("count"));
            pattern
        };
        assert_eq!(draws(5), draws(5));

        let faults = LinkFaults::new(1);
        faults.set_loss(a, b, 1.0);
        assert!(faults.should_drop(a, b));
        faults.set_loss(a, b, 0.0);
        assert!(!faults.should_drop(a, b));
        faults.set_loss(a, b, 1.0);
        faults.clear();
        assert!(!faults.should_drop(a, b));
        assert_eq!(faults.dropped(), 1);
    }
}
