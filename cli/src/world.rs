//! [`World`]: everything an agent takes from its surroundings, handed to it in one value.
//!
//! [`World::real`] is the operating system's: UDP sockets, RocksDB under the data dir, the
//! QEMU and process drivers, the system clock, the OS random source, this host's name,
//! addresses and resources, and SIGINT/SIGTERM. A simulator builds its own from the same
//! traits.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blx_consensus::node::{ConsensusError, Stores};
use blx_membership::meta::Capacity;
use blx_membership::token::JoinToken;
use blx_vmm::Driver;
use blx_vmm::qemu::Accel;
use rand::SeedableRng;

/// A boxed future, as the world's traits return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The network: the UDP socket under QUIC, and where the HTTP API is served.
pub trait Net: Send + Sync + 'static {
    /// Binds the UDP socket the agent's QUIC endpoint runs on.
    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<Arc<dyn quinn::AsyncUdpSocket>>>;
    /// Serves the API's `router` on `addr` until the returned task is aborted: over HTTPS
    /// with `tls` when it is given (an address beyond loopback), plain HTTP otherwise.
    fn serve_api(
        &self,
        addr: SocketAddr,
        router: axum::Router,
        tls: Option<blx_membership::tls::ServingCert>,
    ) -> BoxFuture<'_, std::io::Result<tokio::task::JoinHandle<()>>>;
}

/// Opens the Raft log store and state machine of node `id`.
pub trait RaftStores: Send + Sync + 'static {
    /// Opens (creating if needed) the stores; `dir` is the agent's data dir.
    fn open(&self, id: u64, dir: &Path) -> Result<Stores, ConsensusError>;
}

/// The wall clock: token expiry and the stamps the leader puts on state changes. (Timers and
/// timeouts use tokio's clock, which a simulator controls.)
pub trait WallClock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// What a node's VM drivers are made from.
#[derive(Clone, Debug)]
pub struct DriverContext {
    /// Run directories, one per VM.
    pub run_root: PathBuf,
    /// QEMU acceleration, as configured.
    pub accel: Accel,
}

/// Makes the VM drivers of a node's worker.
pub type DriverFactory = Arc<dyn Fn(&DriverContext) -> Vec<Box<dyn Driver>> + Send + Sync>;

/// The agent's source of randomness: node ids, token secrets, key material, scheduler seeds
/// and every seed of the QUIC stack and of openraft come from it. Cheap to clone; clones draw
/// from the same stream.
#[derive(Clone)]
pub struct Entropy(Arc<Mutex<rand::rngs::StdRng>>);

impl Entropy {
    /// A stream that follows from `seed` (for a simulator: the same seed, the same draws).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Entropy(Arc::new(Mutex::new(rand::rngs::StdRng::from_seed(seed))))
    }

    /// A stream seeded from the operating system's secure random source.
    pub fn os() -> Self {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .expect("the OS random source works");
        Entropy::from_seed(seed)
    }

    /// `N` random bytes.
    pub fn bytes<const N: usize>(&self) -> [u8; N] {
        use rand::Rng;
        let mut out = [0u8; N];
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fill_bytes(&mut out);
        out
    }

    /// A random u64.
    pub fn u64(&self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Facts about the host the agent runs on.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The host name, the node's default name if it is a valid one.
    pub hostname: Option<String>,
    /// The host's non-loopback addresses, the first IPv4 one advertised when `--bind` is a
    /// wildcard.
    pub addresses: Vec<IpAddr>,
    /// What the host has to offer VMs, unless the config says less.
    pub capacity: Capacity,
}

/// Where the agent tells its operator what only they may see.
pub trait Operator: Send + Sync + 'static {
    /// A new cluster was bootstrapped here; `token` admits the next agents for `ttl`.
    fn bootstrapped(&self, token: &JoinToken, ttl: Duration);
    /// The agent is admitted and serves its API.
    fn running(&self) {}
    /// The agent knows its node id: telemetry can name the node, and export its metrics.
    fn identified(&self, _node: &crate::telemetry::NodeTelemetry) {}
}

/// The terminal: the token on standard output (so a script can capture it), the rest on
/// standard error.
pub struct Terminal;

impl Operator for Terminal {
    fn bootstrapped(&self, token: &JoinToken, ttl: Duration) {
        eprintln!(
            "blx: bootstrapped a new cluster (CA {}).",
            &blx_membership::tls::hex(&token.ca_fingerprint)[..16]
        );
        eprintln!(
            "blx: join other agents with this token (valid {}s):",
            ttl.as_secs()
        );
        println!("{token}");
    }

    fn identified(&self, node: &crate::telemetry::NodeTelemetry) {
        crate::telemetry::identified(node);
    }

    fn running(&self) {
        if let Err(e) = notify_service_manager("READY=1") {
            tracing::warn!(error = %e, "cannot tell the service manager the agent is ready");
        }
    }
}

/// Sends `state` to the service manager's socket when there is one (systemd's `Type=notify`
/// sets `NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract socket name).
fn notify_service_manager(state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(())
}

/// Everything an agent takes from its surroundings.
pub struct World {
    /// Sockets.
    pub net: Arc<dyn Net>,
    /// The Raft stores.
    pub raft: Arc<dyn RaftStores>,
    /// The VM drivers.
    pub drivers: DriverFactory,
    /// The wall clock.
    pub clock: Arc<dyn WallClock>,
    /// Randomness.
    pub entropy: Entropy,
    /// This host.
    pub host: HostFacts,
    /// Resolves when the agent is to stop (it leaves the cluster first).
    pub stop: BoxFuture<'static, ()>,
    /// Where the first join token goes.
    pub operator: Arc<dyn Operator>,
}

impl World {
    /// The operating system's world; the agent stops on SIGINT or SIGTERM.
    pub fn real() -> World {
        World {
            net: Arc::new(OsNet),
            raft: Arc::new(RocksStores),
            drivers: Arc::new(real_drivers),
            clock: Arc::new(SystemClock),
            entropy: Entropy::os(),
            host: HostFacts::of_this_host(),
            stop: Box::pin(signals()),
            operator: Arc::new(Terminal),
        }
    }
}

/// The real VM drivers: QEMU microvm and plain processes.
pub fn real_drivers(ctx: &DriverContext) -> Vec<Box<dyn Driver>> {
    vec![
        Box::new(blx_vmm::qemu::QemuDriver::new(blx_vmm::qemu::QemuConfig {
            accel: ctx.accel,
            accel_cache: Some(ctx.run_root.join("accel")),
            ..blx_vmm::qemu::QemuConfig::default()
        })),
        Box::new(blx_vmm::process::ProcessDriver::default()),
    ]
}

async fn signals() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The operating system's sockets.
pub struct OsNet;

impl Net for OsNet {
    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<Arc<dyn quinn::AsyncUdpSocket>>> {
        Box::pin(async move {
            blx_membership::quic::os_socket(addr).map_err(|e| std::io::Error::other(e.to_string()))
        })
    }

    fn serve_api(
        &self,
        addr: SocketAddr,
        router: axum::Router,
        tls: Option<blx_membership::tls::ServingCert>,
    ) -> BoxFuture<'_, std::io::Result<tokio::task::JoinHandle<()>>> {
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let Some(tls) = tls else {
                let listener = crate::api_tls::plain(listener);
                return Ok(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, router).await {
                        tracing::error!(error = %e, "the HTTP API stopped");
                    }
                }));
            };
            let config = tls
                .server_config()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let listener = crate::api_tls::ApiListener::new(listener, Arc::new(config))?;
            Ok(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "the HTTPS API stopped");
                }
            }))
        })
    }
}

/// RocksDB under `<data dir>/raft`.
pub struct RocksStores;

impl RaftStores for RocksStores {
    fn open(&self, id: u64, dir: &Path) -> Result<Stores, ConsensusError> {
        Stores::open_rocks(&dir.join("raft"), id)
    }
}

/// The system clock.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

impl HostFacts {
    /// This machine's name, addresses, CPUs and memory.
    pub fn of_this_host() -> HostFacts {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string());
        let addresses = if_addrs::get_if_addrs()
            .map(|all| {
                all.into_iter()
                    .map(|i| i.ip())
                    .filter(|ip| !ip.is_loopback())
                    .collect()
            })
            .unwrap_or_default();
        let vcpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        HostFacts {
            hostname,
            addresses,
            capacity: Capacity {
                vcpus,
                memory_mib,
                disk_gib: 0,
            },
        }
    }
}
