//! The simulated world one agent is handed: turmoil UDP under QUIC, the in-memory Raft store
//! on a "disk" that outlives the host's crashes, a VM driver whose VMs boot and crash in
//! virtual time, a skewed wall clock, seeded entropy, and a stop signal that never fires
//! (hosts are crashed, not stopped).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blx::world::{BoxFuture, HostFacts, Net, Operator, RaftStores, WallClock};
use blx_consensus::mem::{MemLogStore, MemStateMachine};
use blx_consensus::node::{ConsensusError, Stores};
use blx_membership::meta::Capacity;
use blx_membership::token::JoinToken;
use blx_vmm::{BootSpec, Desired, Driver, DriverError, DriverKind, Observed, Phase};

use crate::udp::{LinkFaults, SimUdpSocket};

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Virtual time since the simulation began, on the current host.
pub(crate) fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// turmoil's UDP for QUIC; the API is not served on a socket: its router goes into `api`,
/// where the host's clients call it in-process, presenting the local token the agent wrote
/// to `data_dir` as the CLI on its machine would.
pub(crate) struct SimNet {
    pub(crate) faults: Arc<LinkFaults>,
    pub(crate) api: Arc<Mutex<Option<axum::Router>>>,
    pub(crate) data_dir: std::path::PathBuf,
}

impl Net for SimNet {
    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<Arc<dyn quinn::AsyncUdpSocket>>> {
        Box::pin(async move {
            let socket = SimUdpSocket::bind(addr, self.faults.clone()).await?;
            Ok(socket as Arc<dyn quinn::AsyncUdpSocket>)
        })
    }

    fn serve_api(
        &self,
        _addr: SocketAddr,
        router: axum::Router,
        _tls: Option<blx_membership::tls::ServingCert>,
    ) -> BoxFuture<'_, std::io::Result<tokio::task::JoinHandle<()>>> {
        Box::pin(async move {
            let token = std::fs::read_to_string(self.data_dir.join(blx::access::LOCAL_TOKEN_FILE))?;
            let bearer = axum::http::HeaderValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(std::io::Error::other)?;
            let router = router.layer(axum::middleware::map_request(
                move |mut request: axum::extract::Request| {
                    let bearer = bearer.clone();
                    async move {
                        request
                            .headers_mut()
                            .insert(axum::http::header::AUTHORIZATION, bearer);
                        request
                    }
                },
            ));
            *lock(&self.api) = Some(router);
            Ok(tokio::spawn(std::future::pending::<()>()))
        })
    }
}

/// A host's disk for Raft: the in-memory stores of its last run. A restart opens what a power
/// loss would have left of them.
#[derive(Clone, Default)]
pub(crate) struct SimDisk {
    stores: Arc<Mutex<Option<(MemLogStore, MemStateMachine)>>>,
}

impl SimDisk {
    /// The state machine of the current run, to look at.
    pub(crate) fn machine(&self) -> Option<MemStateMachine> {
        lock(&self.stores).as_ref().map(|(_, sm)| sm.clone())
    }
}

impl RaftStores for SimDisk {
    fn open(&self, id: u64, _dir: &Path) -> Result<Stores, ConsensusError> {
        let mut slot = lock(&self.stores);
        let (log, sm) = match slot.take() {
            Some((log, sm)) => {
                let log = log.after_power_loss(id);
                let sm = sm.after_power_loss(&log);
                (log, sm)
            }
            None => {
                let log = MemLogStore::new(id);
                let sm = MemStateMachine::for_log(&log);
                (log, sm)
            }
        };
        *slot = Some((log.clone(), sm.clone()));
        Ok(Stores::Mem(log, sm))
    }
}

/// The simulation's epoch plus virtual time, plus this host's skew (which a fault changes).
pub(crate) struct SimClock {
    pub(crate) epoch_ms: u64,
    pub(crate) skew_ms: Arc<AtomicI64>,
}

impl WallClock for SimClock {
    fn now_ms(&self) -> u64 {
        let t = self.epoch_ms as i64
            + i64::try_from(now().as_millis()).unwrap_or(i64::MAX)
            + self.skew_ms.load(Ordering::Relaxed);
        u64::try_from(t).unwrap_or(0)
    }
}

/// Takes the first agent's join token for the others.
pub(crate) struct SimOperator {
    pub(crate) token: Arc<Mutex<Option<JoinToken>>>,
}

impl Operator for SimOperator {
    fn bootstrapped(&self, token: &JoinToken, _ttl: Duration) {
        *lock(&self.token) = Some(token.clone());
    }
}

/// The same facts for every simulated host.
pub(crate) fn host_facts(name: &str, ip: IpAddr) -> HostFacts {
    HostFacts {
        hostname: Some(name.to_string()),
        addresses: vec![ip],
        capacity: Capacity {
            vcpus: 4,
            memory_mib: HOST_MEMORY_MIB,
            disk_gib: 0,
        },
    }
}

/// Memory each simulated host offers.
pub(crate) const HOST_MEMORY_MIB: u64 = 2048;

/// Where VMs run, across every host of a run: (VM, host) → virtual time it began running.
/// A host's entries go when its driver does (the host crashed: its VMs died with it).
#[derive(Clone, Default)]
pub(crate) struct VmRegistry {
    running: Arc<Mutex<BTreeMap<(String, IpAddr), Duration>>>,
}

impl VmRegistry {
    /// A copy of what runs where.
    pub(crate) fn snapshot(&self) -> BTreeMap<(String, IpAddr), Duration> {
        lock(&self.running).clone()
    }

    fn set(&self, vm: &str, host: IpAddr, running: bool) {
        let mut map = lock(&self.running);
        let key = (vm.to_string(), host);
        if running {
            map.entry(key).or_insert_with(now);
        } else {
            map.remove(&key);
        }
    }

    fn clear_host(&self, host: IpAddr) {
        lock(&self.running).retain(|(_, h), _| *h != host);
    }
}

/// One simulated VM.
struct SimVm {
    incarnation: u64,
    started_at_ms: u64,
    boot_ms: u64,
    /// Milliseconds after boot at which it crashes, if it is a crashing kind.
    crash_after_ms: Option<u64>,
    phase: Phase,
    restarts: u32,
}

/// A VM driver whose VMs are entries in a table: they boot after a delay drawn from their name
/// and incarnation, run, and (with `crashy` in their command) crash after a while; the worker
/// restarts them under their restart policy, as it would real ones. Claims the process kind,
/// so the API's process VMs run here.
pub(crate) struct SimDriver {
    host: IpAddr,
    registry: VmRegistry,
    vms: BTreeMap<String, SimVm>,
}

impl SimDriver {
    pub(crate) fn new(host: IpAddr, registry: VmRegistry) -> Self {
        registry.clear_host(host);
        SimDriver {
            host,
            registry,
            vms: BTreeMap::new(),
        }
    }
}

impl Drop for SimDriver {
    fn drop(&mut self) {
        self.registry.clear_host(self.host);
    }
}

/// A number from the VM's name, incarnation and start count: the same VM boots the same way in
/// every run of a seed.
fn draw(name: &str, incarnation: u64, restarts: u32, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in name
        .bytes()
        .chain(incarnation.to_le_bytes())
        .chain(restarts.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Driver for SimDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn blocks(&self) -> bool {
        false
    }

    fn validate(&self, spec: &BootSpec) -> Result<(), DriverError> {
        if spec.command.is_empty() {
            return Err(DriverError::InvalidSpec("empty command".into()));
        }
        Ok(())
    }

    fn start(&mut self, vm: &Desired, _run_dir: &Path, now_ms: u64) -> Result<(), DriverError> {
        self.validate(&vm.spec)?;
        let restarts = match self.vms.get(&vm.name) {
            Some(old) if old.incarnation == vm.incarnation => old.restarts + 1,
            _ => 0,
        };
        let crashy = vm.spec.command.iter().any(|a| a == "crashy");
        self.vms.insert(
            vm.name.clone(),
            SimVm {
                incarnation: vm.incarnation,
                started_at_ms: now_ms,
                boot_ms: 200 + draw(&vm.name, vm.incarnation, restarts, 1) % 1000,
                crash_after_ms: crashy
                    .then(|| 5_000 + draw(&vm.name, vm.incarnation, restarts, 2) % 25_000),
                phase: Phase::Starting,
                restarts,
            },
        );
        self.registry.set(&vm.name, self.host, false);
        Ok(())
    }

    fn stop(&mut self, name: &str) -> Result<(), DriverError> {
        self.vms
            .remove(name)
            .ok_or_else(|| DriverError::Unknown(name.into()))?;
        self.registry.set(name, self.host, false);
        Ok(())
    }

    fn pause(&mut self, name: &str) -> Result<(), DriverError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| DriverError::Unknown(name.into()))?;
        vm.phase = Phase::Paused;
        Ok(())
    }

    fn resume(&mut self, name: &str) -> Result<(), DriverError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| DriverError::Unknown(name.into()))?;
        vm.phase = Phase::Running;
        Ok(())
    }

    fn adopt(&mut self, _run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        // A simulated host's VMs die with it.
        Ok(None)
    }

    fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
        let mut out = BTreeMap::new();
        for (name, vm) in &mut self.vms {
            let up_for = now_ms.saturating_sub(vm.started_at_ms);
            if vm.phase == Phase::Starting && up_for >= vm.boot_ms {
                vm.phase = Phase::Running;
            }
            if matches!(vm.phase, Phase::Running)
                && vm.crash_after_ms.is_some_and(|c| up_for >= vm.boot_ms + c)
            {
                vm.phase = Phase::Exited {
                    code: Some(1),
                    reason: "simulated crash".into(),
                };
            }
            let running = matches!(vm.phase, Phase::Running | Phase::Paused);
            self.registry.set(name, self.host, running);
            out.insert(
                name.clone(),
                Observed {
                    name: name.clone(),
                    incarnation: vm.incarnation,
                    driver: DriverKind::Process,
                    phase: vm.phase.clone(),
                    boot_ms: (up_for >= vm.boot_ms).then_some(vm.boot_ms),
                    started_at_ms: vm.started_at_ms,
                    restarts: vm.restarts,
                    pid: None,
                },
            );
        }
        out
    }
}
