//! [`QemuDriver`]: boots guests with QEMU `-M microvm` and controls them over QMP.
//!
//! Each VM is one `qemu-system-x86_64` process, leader of its own process group, with:
//!
//! ```text
//! <run_dir>/console.log   guest serial console (ttyS0), appended
//! <run_dir>/qemu.log      QEMU's own stderr, for exit reasons
//! <run_dir>/qmp.sock      QMP: stop / cont / query-status / quit
//! <run_dir>/state.json    for adoption by a later agent
//! ```
//!
//! Acceleration is KVM or TCG. [`Accel::Auto`] probes once: it boots the first VM's kernel and
//! initramfs under KVM and waits up to [`PROBE_TIMEOUT`] for the readiness marker, and
//! remembers the answer in memory and in [`QemuConfig::accel_cache`]. A KVM that cannot run
//! the guest may leave QEMU spinning instead of exiting, so every wait here has a timeout and
//! every kill goes to the whole process group.
//!
//! The kernel command line always carries `tsc_early_khz=<host MHz × 1000>`: without it about
//! one TCG boot in ten hangs calibrating the TSC.
//!
//! Not done here: networking, snapshots, disk hot-plug, anything but x86-64.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::workload::{
    CONSOLE_LOG, ConsoleWatch, ExitHints, Workload, Workloads, find_program, seconds, signal_group,
};
use crate::{BootSpec, Desired, Driver, DriverError, DriverKind, Observed, Phase};

/// The QMP socket in a run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// QEMU's stderr in a run directory.
pub const QEMU_LOG: &str = "qemu.log";
/// How long the KVM probe waits for the readiness marker.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP exchange (connect, greeting, capabilities, command) may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stop waits for QMP to accept `quit` before it kills QEMU.
pub const QUIT_QMP_TIMEOUT: Duration = Duration::from_millis(500);
/// After `quit`, how long QEMU may take to exit before its group gets SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_millis(1000);
/// Fewest vCPUs.
pub const MIN_VCPUS: u32 = 1;
/// Most vCPUs.
pub const MAX_VCPUS: u32 = 64;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The kernel command line the driver always passes, before `tsc_early_khz` and the spec's own.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=t";
/// Longest path a Unix socket address holds (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Accel {
    /// KVM when a probe boot under KVM reaches the readiness marker, else TCG.
    #[default]
    Auto,
    /// Hardware virtualization: `-accel kvm -cpu host`.
    Kvm,
    /// Emulation: `-accel tcg -cpu qemu64`. Works everywhere, about 1.5 to 2.5 s to boot.
    Tcg,
}

impl Accel {
    /// `auto`, `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses `auto`, `kvm` or `tcg`.
    pub fn parse(s: &str) -> Option<Accel> {
        match s.trim() {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the QEMU driver runs QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    /// The QEMU binary, a path or a name looked up in `$PATH`. Default `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Acceleration. Default [`Accel::Auto`].
    pub accel: Accel,
    /// A file where the result of an [`Accel::Auto`] probe is remembered across agent restarts
    /// (it holds `kvm` or `tcg`). None: probe once per driver. Delete it to probe again.
    pub accel_cache: Option<PathBuf>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            accel_cache: None,
        }
    }
}

/// Boots `-M microvm` guests. See the [module docs](self).
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    /// Auto's answer once known.
    resolved: Option<Accel>,
    /// `tsc_early_khz`, when the host says.
    tsc_khz: Option<u64>,
    workloads: Workloads,
}

impl QemuDriver {
    /// A driver with `config`; probes nothing until the first start or [`Self::probe_accel`].
    pub fn new(config: QemuConfig) -> Self {
        QemuDriver {
            config,
            resolved: None,
            tsc_khz: host_tsc_khz(),
            workloads: Workloads::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The acceleration new VMs get: Kvm or Tcg, or None while Auto has not been resolved.
    pub fn accel(&self) -> Option<Accel> {
        match self.config.accel {
            Accel::Auto => self.resolved,
            fixed => Some(fixed),
        }
    }

    /// Resolves [`Accel::Auto`] to Kvm or Tcg, ahead of the first start if the caller likes:
    /// a fixed accel is returned as it is; else the answer remembered in memory or in
    /// [`QemuConfig::accel_cache`]; else TCG when `/dev/kvm` is missing; else a probe boot of
    /// `kernel` + `initrd` under KVM that must print `ready_marker` within [`PROBE_TIMEOUT`].
    /// Without a marker nothing can be probed: TCG, not remembered.
    pub fn probe_accel(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        ready_marker: Option<&str>,
    ) -> Result<Accel, DriverError> {
        if let Some(accel) = self.accel() {
            return Ok(accel);
        }
        if let Some(accel) = self.read_cache() {
            tracing::debug!(%accel, "acceleration from the cache");
            self.resolved = Some(accel);
            return Ok(accel);
        }
        let accel = if !Path::new("/dev/kvm").exists() {
            tracing::info!("no /dev/kvm: using TCG");
            Accel::Tcg
        } else {
            let Some(marker) = ready_marker.filter(|m| !m.is_empty()) else {
                tracing::info!("no readiness marker to probe KVM with: using TCG for this VM");
                return Ok(Accel::Tcg);
            };
            let started = Instant::now();
            let kvm = probe_kvm(
                &self.config.binary,
                kernel,
                initrd,
                marker,
                self.tsc_khz,
                PROBE_TIMEOUT,
            )?;
            let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
            tracing::info!(%accel, probe_ms = started.elapsed().as_millis(), "KVM probe done");
            accel
        };
        self.resolved = Some(accel);
        self.write_cache(accel);
        Ok(accel)
    }

    fn read_cache(&self) -> Option<Accel> {
        let path = self.config.accel_cache.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        match Accel::parse(&text) {
            Some(accel @ (Accel::Kvm | Accel::Tcg)) => Some(accel),
            _ => {
                tracing::warn!(path = %path.display(), "ignoring an acceleration cache that is not kvm or tcg");
                None
            }
        }
    }

    fn write_cache(&self, accel: Accel) {
        if let Some(path) = &self.config.accel_cache
            && let Err(e) = std::fs::write(path, format!("{accel}\n"))
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remember the acceleration");
        }
    }

    fn binary_missing(&self) -> DriverError {
        DriverError::InvalidSpec(format!(
            "{} not found; install qemu-system-x86",
            self.config.binary.display()
        ))
    }

    /// The QEMU command line for `vm` in `run_dir`.
    fn command(&self, vm: &Desired, run_dir: &Path, accel: Accel) -> Command {
        let spec = &vm.spec;
        let mut cmd = Command::new(&self.config.binary);
        cmd.args([
            "-M",
            "microvm",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        cmd.args(accel_args(accel));
        cmd.arg("-name").arg(escape(OsString::from(&vm.name)));
        cmd.arg("-m").arg(spec.memory_mib.to_string());
        cmd.arg("-smp").arg(spec.vcpus.to_string());
        if let Some(kernel) = &spec.kernel {
            cmd.arg("-kernel").arg(kernel);
        }
        if let Some(initrd) = &spec.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.arg("-append")
            .arg(kernel_cmdline(self.tsc_khz, spec.cmdline.as_deref()));
        if let Some(disk) = &spec.disk {
            cmd.arg("-drive")
                .arg(option_with_path("id=disk0,format=raw,if=none,file=", disk));
            cmd.args(["-device", "virtio-blk-device,drive=disk0"]);
        }
        cmd.arg("-chardev").arg(option_with_path(
            "file,id=console,append=on,path=",
            &run_dir.join(CONSOLE_LOG),
        ));
        cmd.args(["-serial", "chardev:console"]);
        let mut qmp = option_with_path("unix:", &run_dir.join(QMP_SOCKET));
        qmp.push(",server=on,wait=off");
        cmd.arg("-qmp").arg(qmp);
        cmd
    }

    fn qmp(&self, name: &str, run_dir: &Path, command: &str) -> Result<Value, DriverError> {
        qmp_execute(&run_dir.join(QMP_SOCKET), command, QMP_TIMEOUT)
            .map_err(|e| DriverError::Io(format!("QMP {command} on {name}: {e}")))
    }

    /// Moves a workload from phase `from` to `to` with one QMP command (`stop` or `cont`).
    fn switch(
        &mut self,
        name: &str,
        from: Phase,
        command: &str,
        to: Phase,
        verb: &str,
    ) -> Result<(), DriverError> {
        let workload = self.workloads.get_mut(name)?;
        if *workload.phase() != from {
            return Err(DriverError::WrongPhase(format!(
                "cannot {verb} {name}: it is {:?}, not {}",
                workload.phase(),
                if from == Phase::Running {
                    "running"
                } else {
                    "paused"
                }
            )));
        }
        let run_dir = workload.run_dir().to_path_buf();
        self.qmp(name, &run_dir, command)?;
        self.workloads.get_mut(name)?.set_phase(to);
        Ok(())
    }
}

impl Driver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
    }

    fn validate(&self, spec: &BootSpec) -> Result<(), DriverError> {
        if spec.driver != DriverKind::Qemu {
            return Err(DriverError::InvalidSpec(format!(
                "a {:?} spec given to the QEMU driver",
                spec.driver
            )));
        }
        let file = |what: &str, path: &Option<PathBuf>| match path {
            None => Err(DriverError::InvalidSpec(format!(
                "the QEMU driver needs a {what}"
            ))),
            Some(p) if !p.is_file() => Err(DriverError::InvalidSpec(format!(
                "{what} {} not found",
                p.display()
            ))),
            Some(_) => Ok(()),
        };
        file("kernel", &spec.kernel)?;
        file("initrd", &spec.initrd)?;
        if spec.disk.is_some() {
            file("disk", &spec.disk)?;
        }
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&spec.vcpus) {
            return Err(DriverError::InvalidSpec(format!(
                "{} vCPUs: the QEMU driver runs {MIN_VCPUS} to {MAX_VCPUS}",
                spec.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
            return Err(DriverError::InvalidSpec(format!(
                "{} MiB of memory: the QEMU driver runs {MIN_MEMORY_MIB} MiB to 1 TiB",
                spec.memory_mib
            )));
        }
        if find_program(&self.config.binary).is_none() {
            return Err(self.binary_missing());
        }
        if self.config.accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(DriverError::InvalidSpec(
                "accel kvm, but this node has no /dev/kvm".into(),
            ));
        }
        Ok(())
    }

    fn start(&mut self, vm: &Desired, run_dir: &Path, now_ms: u64) -> Result<(), DriverError> {
        self.validate(&vm.spec)?;
        let socket = run_dir.join(QMP_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DriverError::Io(format!(
                "QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter run directory",
                socket.display()
            )));
        }
        let restarts = self.workloads.make_room(&vm.name, vm.incarnation)?;
        let kernel = vm.spec.kernel.as_deref().unwrap_or(Path::new(""));
        let accel = self.probe_accel(
            kernel,
            vm.spec.initrd.as_deref(),
            vm.spec.ready_marker.as_deref(),
        )?;
        let _ = std::fs::remove_file(&socket);
        let log_path = run_dir.join(QEMU_LOG);
        let log = File::create(&log_path)
            .map_err(|e| DriverError::Io(format!("cannot open {}: {e}", log_path.display())))?;
        // The serial chardev appends to the console log; make sure it exists for the watch.
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(CONSOLE_LOG))
            .map_err(|e| {
                DriverError::Io(format!(
                    "cannot open the console log in {}: {e}",
                    run_dir.display()
                ))
            })?;
        let mut cmd = self.command(vm, run_dir, accel);
        cmd.stdout(Stdio::null()).stderr(log);
        let workload = Workload::spawn(cmd, vm, run_dir, now_ms, restarts, exit_hints(run_dir))
            .map_err(|e| match find_program(&self.config.binary) {
                None => self.binary_missing(),
                Some(_) => e,
            })?;
        tracing::info!(vm = %vm.name, incarnation = vm.incarnation, pid = workload.pid(), %accel, "QEMU started");
        self.workloads.insert(workload);
        Ok(())
    }

    fn stop(&mut self, name: &str) -> Result<(), DriverError> {
        let mut workload = self.workloads.remove(name)?;
        if workload.is_alive() {
            let socket = workload.run_dir().join(QMP_SOCKET);
            match qmp_execute(&socket, "quit", QUIT_QMP_TIMEOUT) {
                // QEMU may hang up before it answers: it is quitting either way.
                Ok(_) => {
                    if !workload.wait_gone(QUIT_GRACE) {
                        tracing::warn!(vm = %name, "QEMU did not quit in time; killing it");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    workload.wait_gone(QUIT_GRACE);
                }
                Err(e) => tracing::debug!(vm = %name, error = %e, "no QMP quit; killing QEMU"),
            }
            // Whatever is left of the group (all of it when quit failed).
            workload.kill_now();
        }
        workload.forget();
        let _ = std::fs::remove_file(workload.run_dir().join(QMP_SOCKET));
        tracing::info!(vm = %name, "QEMU stopped");
        Ok(())
    }

    fn pause(&mut self, name: &str) -> Result<(), DriverError> {
        self.switch(name, Phase::Running, "stop", Phase::Paused, "pause")
    }

    fn resume(&mut self, name: &str) -> Result<(), DriverError> {
        self.switch(name, Phase::Paused, "cont", Phase::Running, "resume")
    }

    fn adopt(&mut self, run_dir: &Path) -> Result<Option<Observed>, DriverError> {
        let Some(mut workload) = Workload::adopt(run_dir, DriverKind::Qemu, exit_hints(run_dir))?
        else {
            return Ok(None);
        };
        if let Some(known) = self.workloads.held(&workload)? {
            return Ok(Some(known));
        }
        if workload.is_alive() {
            match self.qmp(workload.name(), run_dir, "query-status") {
                Ok(status) => {
                    let running = status
                        .get("running")
                        .and_then(Value::as_bool)
                        .unwrap_or(true);
                    if !running && *workload.phase() == Phase::Running {
                        workload.set_phase(Phase::Paused);
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %workload.name(), error = %e, "adopted QEMU does not answer QMP")
                }
            }
        }
        let observed = workload.observe();
        self.workloads.insert(workload);
        Ok(Some(observed))
    }

    fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
        self.workloads.poll(now_ms)
    }
}

/// QEMU's stderr explains its errors; a clean exit may be a guest panic.
fn exit_hints(run_dir: &Path) -> ExitHints {
    ExitHints {
        stderr_log: Some(run_dir.join(QEMU_LOG)),
        guest_panic: true,
    }
}

/// `-accel` and `-cpu` for a resolved accel (Auto is taken as TCG).
fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg | Accel::Auto => ["-accel", "tcg", "-cpu", "qemu64"],
    }
}

/// The guest kernel command line: [`BASE_CMDLINE`], `tsc_early_khz`, then the spec's own.
pub fn kernel_cmdline(tsc_khz: Option<u64>, extra: Option<&str>) -> String {
    let mut line = BASE_CMDLINE.to_owned();
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

/// The host CPU's clock in kHz, from the first `cpu MHz` line of `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let value = line.split_once(':')?.1.trim();
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    let mut khz = whole.parse::<u64>().ok()?.checked_mul(1000)?;
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    khz += frac.parse::<u64>().ok()?;
    (khz > 0).then_some(khz)
}

/// QEMU's option syntax: a comma inside a value is written twice.
fn escape(value: OsString) -> OsString {
    let bytes = value.as_encoded_bytes();
    if !bytes.contains(&b',') {
        return value;
    }
    let text = value.to_string_lossy().replace(',', ",,");
    OsString::from(text)
}

/// `prefix` followed by `path` escaped for QEMU's option syntax.
fn option_with_path(prefix: &str, path: &Path) -> OsString {
    let mut option = OsString::from(prefix);
    option.push(escape(path.as_os_str().to_owned()));
    option
}

/// Boots `kernel` + `initrd` once under KVM with a throwaway console and reports whether
/// `ready_marker` appeared within `timeout`. QEMU is killed (its whole group) either way.
pub fn probe_kvm(
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    ready_marker: &str,
    tsc_khz: Option<u64>,
    timeout: Duration,
) -> Result<bool, DriverError> {
    // A fresh directory only this user can enter, under an unpredictable name: the probe may
    // run as root, and a guessable path in a shared /tmp could be planted beforehand.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("blx-kvm-probe-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(|e| DriverError::Io(format!("cannot create a private probe directory: {e}")))?;
    probe_in(
        dir.path(),
        binary,
        kernel,
        initrd,
        ready_marker,
        tsc_khz,
        timeout,
    )
}

fn probe_in(
    dir: &Path,
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    ready_marker: &str,
    tsc_khz: Option<u64>,
    timeout: Duration,
) -> Result<bool, DriverError> {
    use std::os::unix::process::CommandExt;
    let console = dir.join(CONSOLE_LOG);
    let log_path = dir.join(QEMU_LOG);
    let log = File::create(&log_path)
        .map_err(|e| DriverError::Io(format!("cannot create {}: {e}", log_path.display())))?;
    let mut cmd = Command::new(binary);
    cmd.args([
        "-M",
        "microvm",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    cmd.args(accel_args(Accel::Kvm));
    cmd.args(["-m", "128", "-smp", "1"]);
    cmd.arg("-kernel").arg(kernel);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.arg("-append").arg(kernel_cmdline(tsc_khz, None));
    cmd.arg("-chardev")
        .arg(option_with_path("file,id=console,path=", &console));
    cmd.args(["-serial", "chardev:console"]);
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DriverError::InvalidSpec(format!(
                "{} not found; install qemu-system-x86",
                binary.display()
            ))
        } else {
            DriverError::Io(format!("cannot start {}: {e}", binary.display()))
        }
    })?;
    let pid = child.id();
    let mut watch = ConsoleWatch::new(console, ready_marker, 0);
    let deadline = Instant::now() + timeout;
    let booted = loop {
        if watch.scan() {
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            // Exited (KVM refused the guest) — one last look at what it printed.
            break watch.scan();
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = signal_group(pid, rustix::process::Signal::KILL);
    let _ = child.wait();
    if !booted {
        let why = std::fs::read_to_string(&log_path).unwrap_or_default();
        let why = why
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no marker");
        tracing::info!(reason = why, timeout = %seconds(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)), "KVM probe boot did not reach the readiness marker");
    }
    Ok(booted)
}

/// Connects to the QMP socket at `path`, negotiates capabilities, runs `command` (no
/// arguments) and returns its `return` value. Asynchronous events are skipped. The whole
/// exchange times out after `timeout`.
pub fn qmp_execute(path: &Path, command: &str, timeout: Duration) -> std::io::Result<Value> {
    let mut qmp = Qmp::connect(path, timeout)?;
    qmp.execute(command)
}

/// A synchronous QMP client on one connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    deadline: Instant,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            deadline: Instant::now() + timeout,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::other(format!(
                "not a QMP greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "QMP timed out",
                ));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QMP connection closed",
                ));
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line).map_err(std::io::Error::other);
            }
        }
    }

    fn execute(&mut self, command: &str) -> std::io::Result<Value> {
        let request = serde_json::json!({ "execute": command });
        let mut bytes = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        self.reader.get_mut().write_all(&bytes)?;
        loop {
            let message = self.read_message()?;
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(std::io::Error::other(desc.to_owned()));
            }
            // {"event": ...} or anything else asynchronous: skip.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_khz_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu MHz\t\t: 2445.404\ncache size\t: 1 KB\n";
        assert_eq!(parse_cpu_khz(info), Some(2_445_404));
        assert_eq!(parse_cpu_khz("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(parse_cpu_khz("cpu MHz : 1999.9\n"), Some(1_999_900));
        assert_eq!(parse_cpu_khz("model name : x\n"), None);
    }

    #[test]
    fn cmdline_carries_tsc_and_extra() {
        assert_eq!(
            kernel_cmdline(Some(2_445_404), Some(" rdinit=/bin/sh ")),
            "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2445404 rdinit=/bin/sh"
        );
        assert_eq!(kernel_cmdline(None, None), BASE_CMDLINE);
    }

    #[test]
    fn commas_are_doubled() {
        assert_eq!(
            option_with_path("path=", Path::new("/a,b/c")),
            OsString::from("path=/a,,b/c")
        );
    }

    /// A fake QMP server that answers each request line with the next scripted reply lines.
    fn fake_qmp(dir: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = std::os::unix::net::UnixListener::bind(dir.join(QMP_SOCKET)).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut requests = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                requests.push(line.trim().to_owned());
                writer.write_all(reply.as_bytes()).unwrap();
            }
            requests
        })
    }

    #[test]
    fn qmp_skips_events_and_returns_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let server = fake_qmp(
            dir.path(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"event\": \"STOP\", \"timestamp\": {}}\r\n{\"return\": {\"status\": \"paused\", \"running\": false}}\r\n",
            ],
        );
        let status =
            qmp_execute(&dir.path().join(QMP_SOCKET), "query-status", QMP_TIMEOUT).unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(
            server.join().unwrap(),
            [
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"query-status"}"#
            ]
        );
    }

    #[test]
    fn qmp_errors_and_silence_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let server = fake_qmp(
            dir.path(),
            vec![
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n",
            ],
        );
        let err = qmp_execute(&dir.path().join(QMP_SOCKET), "nope", QMP_TIMEOUT).unwrap_err();
        assert_eq!(err.to_string(), "The command nope has not been found");
        server.join().unwrap();

        let quiet = tempfile::tempdir().unwrap();
        let _listener =
            std::os::unix::net::UnixListener::bind(quiet.path().join(QMP_SOCKET)).unwrap();
        let started = Instant::now();
        let err = qmp_execute(
            &quiet.path().join(QMP_SOCKET),
            "stop",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn accel_round_trips() {
        for accel in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(Accel::parse(accel.as_str()), Some(accel));
        }
        assert_eq!(Accel::parse("kvm\n"), Some(Accel::Kvm));
        assert_eq!(Accel::parse("xen"), None);
    }
}
