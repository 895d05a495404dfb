//! What both drivers share: one supervised workload process in its own process group, its
//! `state.json`, its readiness watch on the console log, boot timeouts, exit detection and
//! adoption by a later agent process.
//!
//! A workload is spawned as the leader of a new process group (`pgid == pid`), with
//! `BLX_VM_RUN_DIR=<run dir>` in its environment so that a later agent can tell it from an
//! unrelated process that reused its pid. Signals go to the whole group. A workload this
//! process spawned is reaped with `try_wait`; an adopted one (the child of an earlier agent) can
//! only be watched through `/proc`, so its exit code is unknown.
//!
//! ```text
//!   spawn ─▶ Starting ──marker seen──▶ Running ◀──▶ Paused
//!              │  └──boot timeout──▶ Failed (group killed)
//!              └──────────exit──────▶ Exited
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::process::{Pid, Signal, WaitOptions};
use serde::{Deserialize, Serialize};

use crate::{Desired, DriverError, DriverKind, Observed, Phase};

/// A run directory's record of its workload, for adoption.
pub(crate) const STATE_FILE: &str = "state.json";
/// The workload's console (the guest's serial port, or the process's stdout and stderr).
pub(crate) const CONSOLE_LOG: &str = "console.log";
/// Set in each workload's environment to its canonical run directory.
pub(crate) const RUN_DIR_ENV: &str = "BLX_VM_RUN_DIR";
/// The reason given for an adopted workload found dead.
pub(crate) const EXITED_WHILE_AWAY: &str = "exited while the agent was away";
/// How long to wait for a killed process to go away.
const REAP_TIMEOUT: Duration = Duration::from_millis(1000);
/// How much console output one poll reads at most per workload.
const SCAN_BUDGET: u64 = 4 << 20;

/// `<run_dir>/state.json`: what a later agent needs to adopt the workload. Written when the
/// workload starts and when it becomes ready; removed when it is stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    /// VM name.
    pub(crate) name: String,
    /// Incarnation it was started as.
    pub(crate) incarnation: u64,
    /// The driver that started it.
    pub(crate) driver: DriverKind,
    /// Leader of its process group.
    pub(crate) pid: u32,
    /// The canonical run directory, as set in the workload's environment.
    pub(crate) run_dir: PathBuf,
    /// `now_ms` at start, in the clock of the agent that started it.
    pub(crate) started_at_ms: u64,
    /// Wall-clock start, Unix milliseconds: lets a later agent place the start in its own clock.
    pub(crate) started_at_unix_ms: u64,
    /// Restarts under this incarnation.
    pub(crate) restarts: u32,
    /// Readiness marker.
    pub(crate) ready_marker: Option<String>,
    /// Boot timeout, 0 for none.
    pub(crate) boot_timeout_ms: u64,
    /// Length of the console log when this start began: the marker is looked for after it.
    pub(crate) console_offset: u64,
    /// Milliseconds from start to the marker, once seen.
    pub(crate) boot_ms: Option<u64>,
    /// How it ended (Exited or Failed), once seen: a later agent reports that rather than
    /// "exited while away", so that a clean exit is not taken for a crash.
    pub(crate) ended: Option<Phase>,
}

impl StateFile {
    /// Reads `<run_dir>/state.json`; `Ok(None)` when there is none.
    pub(crate) fn read(run_dir: &Path) -> Result<Option<StateFile>, DriverError> {
        let path = run_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| DriverError::Io(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DriverError::Io(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes `<run_dir>/state.json` atomically (temporary file, then rename).
    fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let tmp = run_dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, run_dir.join(STATE_FILE))
    }
}

/// Watches a console log for the readiness marker, reading only bytes not seen yet and keeping
/// the last `marker.len() - 1` bytes so that a marker split across two reads is still found.
#[derive(Debug)]
pub(crate) struct ConsoleWatch {
    path: PathBuf,
    marker: Vec<u8>,
    offset: u64,
    tail: Vec<u8>,
}

impl ConsoleWatch {
    /// Watches `path` for `marker` from byte `offset` on.
    pub(crate) fn new(path: PathBuf, marker: &str, offset: u64) -> Self {
        ConsoleWatch {
            path,
            marker: marker.as_bytes().to_vec(),
            offset,
            tail: Vec::new(),
        }
    }

    /// Reads what was appended since the last call; true once the marker has appeared.
    pub(crate) fn scan(&mut self) -> bool {
        if self.marker.is_empty() {
            return true;
        }
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return false;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated under us: start over.
            self.offset = 0;
            self.tail.clear();
        }
        if len == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = std::mem::take(&mut self.tail);
        let read = (&mut file)
            .take(SCAN_BUDGET)
            .read_to_end(&mut buf)
            .unwrap_or(0);
        self.offset += read as u64;
        let found = read > 0 && contains(&buf, &self.marker);
        let keep = self.marker.len() - 1;
        self.tail = buf[buf.len().saturating_sub(keep)..].to_vec();
        found
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Milliseconds since the Unix epoch, 0 if the clock is before it.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

/// Sends `sig` to the process group led by `pid`. A group that is gone is not an error.
pub(crate) fn signal_group(pid: u32, sig: Signal) -> std::io::Result<()> {
    let Some(pid) = to_pid(pid) else {
        return Ok(());
    };
    match rustix::process::kill_process_group(pid, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The state letter in `/proc/<pid>/stat` (`R`, `S`, `T`, `Z`, ...), None when there is no such
/// process.
pub(crate) fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Whether `pid` is a live (not zombie) process whose environment carries
/// `BLX_VM_RUN_DIR=<run_dir>`: the workload started in that run directory, not a stranger that
/// reused its pid.
pub(crate) fn is_workload(pid: u32, run_dir: &Path) -> bool {
    if matches!(proc_state(pid), None | Some('Z' | 'X')) {
        return false;
    }
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut wanted = format!("{RUN_DIR_ENV}=").into_bytes();
    wanted.extend_from_slice(run_dir.as_os_str().as_encoded_bytes());
    environ
        .split(|b| *b == 0)
        .any(|var| var == wanted.as_slice())
}

/// "exited with code 3" / "killed by signal 9".
fn describe(status: ExitStatus) -> (Option<i32>, String) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (Some(code), format!("exited with code {code}")),
        (None, Some(sig)) => (None, format!("killed by signal {sig}")),
        (None, None) => (None, format!("exited ({status})")),
    }
}

/// "5 s", "1.5 s".
pub(crate) fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
    }
}

/// The last non-empty line of a small log file, for exit reasons.
fn last_line(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(str::to_owned)
}

/// The kernel's panic line (`Kernel panic - not syncing: ...`) in the last 64 KiB of a console
/// log after `offset`.
fn panic_line(console: &Path, offset: u64) -> Option<String> {
    const PANIC: &str = "Kernel panic - not syncing";
    let mut file = std::fs::File::open(console).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(offset.max(len.saturating_sub(64 << 10))))
        .ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().find(|l| l.contains(PANIC))?;
    Some(line[line.find(PANIC)?..].trim_end().to_owned())
}

/// Where a driver finds more about an exit than the exit status says.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExitHints {
    /// A log whose last line explains a non-zero exit (QEMU's stderr).
    pub(crate) stderr_log: Option<PathBuf>,
    /// An exit with code 0 may be a guest kernel panic (QEMU with `-no-reboot` and `panic=-1`
    /// exits cleanly when the guest reboots): look for the panic on the console, and report it
    /// as a crash (no exit code) so that `OnFailure` restarts it.
    pub(crate) guest_panic: bool,
}

/// Absolute, symlink-free form of a run directory (it must exist).
pub(crate) fn canonical_run_dir(run_dir: &Path) -> Result<PathBuf, DriverError> {
    std::fs::canonicalize(run_dir)
        .map_err(|e| DriverError::Io(format!("run directory {}: {e}", run_dir.display())))
}

/// One supervised workload process.
#[derive(Debug)]
pub(crate) struct Workload {
    state: StateFile,
    /// The run directory as the driver was given it.
    run_dir: PathBuf,
    /// Present while this process spawned it and has not reaped it.
    child: Option<Child>,
    /// Whether the process has been seen to end (reaped, or gone from /proc).
    gone: bool,
    phase: Phase,
    watch: Option<ConsoleWatch>,
    /// Adopted: `started_at_ms` is still in the earlier agent's clock until the next poll.
    clock_pending: bool,
    /// Where to learn more about an exit.
    hints: ExitHints,
    /// An adopted process that turned out to be our child has exited but is not reaped yet.
    reap_pending: bool,
}

impl Workload {
    /// Spawns `cmd` for `vm` as the leader of a new process group, stdin from /dev/null, with
    /// `BLX_VM_RUN_DIR` set, and records it in `<run_dir>/state.json`. The caller sets stdout
    /// and stderr. On any error nothing is left running.
    pub(crate) fn spawn(
        mut cmd: Command,
        vm: &Desired,
        run_dir: &Path,
        now_ms: u64,
        restarts: u32,
        hints: ExitHints,
    ) -> Result<Workload, DriverError> {
        let canonical = canonical_run_dir(run_dir)?;
        let console = run_dir.join(CONSOLE_LOG);
        let console_offset = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
        cmd.process_group(0)
            .stdin(Stdio::null())
            .env(RUN_DIR_ENV, &canonical);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().map_err(|e| spawn_error(&program, &e))?;
        let marker = vm.spec.ready_marker.clone().filter(|m| !m.is_empty());
        let state = StateFile {
            name: vm.name.clone(),
            incarnation: vm.incarnation,
            driver: vm.spec.driver,
            pid: child.id(),
            run_dir: canonical,
            started_at_ms: now_ms,
            started_at_unix_ms: unix_ms(),
            restarts,
            ready_marker: marker.clone(),
            boot_timeout_ms: vm.spec.boot_timeout_ms,
            console_offset,
            boot_ms: None,
            ended: None,
        };
        let mut workload = Workload {
            watch: marker
                .as_deref()
                .map(|m| ConsoleWatch::new(console, m, console_offset)),
            phase: if marker.is_some() {
                Phase::Starting
            } else {
                Phase::Running
            },
            state,
            run_dir: run_dir.to_path_buf(),
            child: Some(child),
            gone: false,
            clock_pending: false,
            hints,
            reap_pending: false,
        };
        if let Err(e) = workload.state.write(run_dir) {
            workload.kill_now();
            return Err(DriverError::Io(format!(
                "cannot write {}: {e}",
                run_dir.join(STATE_FILE).display()
            )));
        }
        Ok(workload)
    }

    /// Re-attaches to the workload recorded in `<run_dir>/state.json`. `Ok(None)` when there is
    /// no record, or it belongs to another driver. A recorded workload that no longer runs is
    /// returned as Exited, so that it is reported and can be forgotten with a stop.
    pub(crate) fn adopt(
        run_dir: &Path,
        kind: DriverKind,
        hints: ExitHints,
    ) -> Result<Option<Workload>, DriverError> {
        let Some(state) = StateFile::read(run_dir)? else {
            return Ok(None);
        };
        if state.driver != kind {
            return Ok(None);
        }
        // An ended workload's pid may belong to someone else by now: do not even look.
        let alive = state.ended.is_none() && is_workload(state.pid, &state.run_dir);
        let mut workload = Workload {
            watch: None,
            phase: Phase::Running,
            run_dir: run_dir.to_path_buf(),
            child: None,
            gone: !alive,
            clock_pending: true,
            hints,
            reap_pending: false,
            state,
        };
        if let Some(ended) = workload.state.ended.clone() {
            workload.phase = ended;
        } else if !alive {
            workload.reap_pending = reap_foreign(workload.state.pid) == Reap::NotYet;
            workload.phase = Phase::Exited {
                code: None,
                reason: EXITED_WHILE_AWAY.into(),
            };
        } else if let (Some(marker), None) = (&workload.state.ready_marker, workload.state.boot_ms)
        {
            // Not ready when the earlier agent last looked: look again from this start's offset.
            let mut watch = ConsoleWatch::new(
                run_dir.join(CONSOLE_LOG),
                marker,
                workload.state.console_offset,
            );
            if !watch.scan() {
                workload.phase = Phase::Starting;
                workload.watch = Some(watch);
            }
        }
        Ok(Some(workload))
    }

    /// VM name.
    pub(crate) fn name(&self) -> &str {
        &self.state.name
    }

    /// Incarnation.
    pub(crate) fn incarnation(&self) -> u64 {
        self.state.incarnation
    }

    /// Restarts under this incarnation.
    pub(crate) fn restarts(&self) -> u32 {
        self.state.restarts
    }

    /// Process group leader.
    pub(crate) fn pid(&self) -> u32 {
        self.state.pid
    }

    /// The run directory.
    pub(crate) fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Current phase.
    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether the process may still run (not yet seen to end).
    pub(crate) fn is_alive(&self) -> bool {
        !self.gone
    }

    /// Sets the phase after a successful pause or resume.
    pub(crate) fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// The observation of this workload.
    pub(crate) fn observe(&self) -> Observed {
        Observed {
            name: self.state.name.clone(),
            incarnation: self.state.incarnation,
            driver: self.state.driver,
            phase: self.phase.clone(),
            boot_ms: self.state.boot_ms,
            started_at_ms: self.state.started_at_ms,
            restarts: self.state.restarts,
            pid: (!self.gone).then_some(self.state.pid),
        }
    }

    /// Whether signals may go to the process group: the process is our unreaped child, or an
    /// adopted process that still carries our run directory in its environment.
    fn owns_group(&self) -> bool {
        if self.gone {
            return false;
        }
        self.child.is_some() || is_workload(self.state.pid, &self.state.run_dir)
    }

    /// Sends `sig` to the workload's process group.
    pub(crate) fn signal(&self, sig: Signal) -> Result<(), DriverError> {
        if !self.owns_group() {
            return Err(DriverError::WrongPhase(format!(
                "{} is not running",
                self.state.name
            )));
        }
        signal_group(self.state.pid, sig)
            .map_err(|e| DriverError::Io(format!("cannot signal {}: {e}", self.state.name)))
    }

    /// Reaps exits, looks for the readiness marker and enforces the boot timeout. Never blocks
    /// except to reap a process it has just killed.
    pub(crate) fn poll(&mut self, now_ms: u64) {
        if self.clock_pending {
            // Place the start in this agent's clock by wall-clock age.
            let age = unix_ms().saturating_sub(self.state.started_at_unix_ms);
            self.state.started_at_ms = now_ms.saturating_sub(age);
            self.clock_pending = false;
        }
        if self.gone {
            if self.reap_pending {
                self.reap_pending = reap_foreign(self.state.pid) == Reap::NotYet;
            }
            return;
        }
        if self.phase == Phase::Starting
            && let Some(watch) = &mut self.watch
            && watch.scan()
        {
            self.phase = Phase::Running;
            self.watch = None;
            self.state.boot_ms = Some(now_ms.saturating_sub(self.state.started_at_ms));
            if let Err(e) = self.state.write(&self.run_dir) {
                tracing::warn!(vm = %self.state.name, error = %e, "cannot record readiness in state.json");
            }
        }
        if let Some((code, reason)) = self.check_exit() {
            self.end(Phase::Exited { code, reason });
            return;
        }
        let timeout = self.state.boot_timeout_ms;
        if self.phase == Phase::Starting
            && timeout > 0
            && now_ms >= self.state.started_at_ms.saturating_add(timeout)
        {
            self.kill_now();
            let marker = self.state.ready_marker.clone().unwrap_or_default();
            self.end(Phase::Failed {
                reason: format!("no readiness line {marker:?} within {}", seconds(timeout)),
            });
        }
    }

    /// Records how the workload ended, here and in `state.json`.
    fn end(&mut self, phase: Phase) {
        self.phase = phase.clone();
        self.watch = None;
        self.state.ended = Some(phase);
        if let Err(e) = self.state.write(&self.run_dir) {
            tracing::warn!(vm = %self.state.name, error = %e, "cannot record the exit in state.json");
        }
    }

    /// Whether the process ended; if so, how. Kills what is left of its group.
    fn check_exit(&mut self) -> Option<(Option<i32>, String)> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    self.gone = true;
                    // Leftovers of the group (the pgid is not reused while members remain).
                    let _ = signal_group(self.state.pid, Signal::KILL);
                    let (code, mut reason) = describe(status);
                    if code != Some(0) {
                        if let Some(line) = self.hints.stderr_log.as_deref().and_then(last_line) {
                            reason = format!("{reason}: {line}");
                        }
                    } else if self.hints.guest_panic {
                        let console = self.run_dir.join(CONSOLE_LOG);
                        if let Some(line) = panic_line(&console, self.state.console_offset) {
                            return Some((None, format!("guest kernel panic: {line}")));
                        }
                    }
                    Some((code, reason))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(vm = %self.state.name, error = %e, "cannot wait for workload");
                    None
                }
            },
            None => {
                if is_workload(self.state.pid, &self.state.run_dir) {
                    None
                } else {
                    self.gone = true;
                    self.reap_pending = reap_foreign(self.state.pid) == Reap::NotYet;
                    Some((
                        None,
                        "exited (exit status unknown: not a child of this agent)".into(),
                    ))
                }
            }
        }
    }

    /// Waits up to `timeout` for the process to end, reaping it. True when it has.
    pub(crate) fn wait_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = match &mut self.child {
                Some(child) => matches!(child.try_wait(), Ok(Some(_)) | Err(_)),
                None => match proc_state(self.state.pid) {
                    None => true,
                    Some('Z' | 'X') => reap_foreign(self.state.pid) != Reap::NotYet,
                    Some(_) => false,
                },
            };
            if ended {
                self.child = None;
                self.gone = true;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends the workload: SIGTERM to the group (with SIGCONT, in case it is paused) and up to
    /// `grace` to exit, then SIGKILL to the group, and reaps it. Blocks at most
    /// `grace` + 1 s.
    pub(crate) fn terminate(&mut self, grace: Duration) {
        if !self.owns_group() {
            self.gone = true;
            self.child = None;
            return;
        }
        if !grace.is_zero() {
            let _ = signal_group(self.state.pid, Signal::TERM);
            let _ = signal_group(self.state.pid, Signal::CONT);
            if self.wait_gone(grace) {
                let _ = signal_group(self.state.pid, Signal::KILL);
                return;
            }
        }
        self.kill_now();
    }

    /// SIGKILL to the group, then reap.
    pub(crate) fn kill_now(&mut self) {
        if self.gone {
            return;
        }
        if (self.child.is_some() || is_workload(self.state.pid, &self.state.run_dir))
            && let Err(e) = signal_group(self.state.pid, Signal::KILL)
        {
            tracing::warn!(vm = %self.state.name, error = %e, "cannot kill workload");
        }
        if !self.wait_gone(REAP_TIMEOUT) {
            tracing::warn!(vm = %self.state.name, pid = self.state.pid, "workload still there after SIGKILL");
        }
    }

    /// Removes `state.json` so that no later agent adopts this workload again.
    pub(crate) fn forget(&self) {
        let _ = std::fs::remove_file(self.run_dir.join(STATE_FILE));
    }
}

/// What [`reap_foreign`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reap {
    /// It was our child, and is reaped.
    Reaped,
    /// It is our child but not done exiting (a multi-threaded process's leader can be a zombie
    /// while its other threads finish).
    NotYet,
    /// Not our child (its parent or init reaps it), or no such process.
    NotOurs,
}

/// Reaps `pid` if it happens to be a child of this process without a `Child` handle: an
/// adopted workload this process spawned through a driver it dropped (as in tests).
fn reap_foreign(pid: u32) -> Reap {
    let Some(pid) = to_pid(pid) else {
        return Reap::NotOurs;
    };
    match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
        Ok(Some(_)) => Reap::Reaped,
        Ok(None) => Reap::NotYet,
        Err(_) => Reap::NotOurs,
    }
}

/// Where `program` would be found: itself when it names a path, else the first match in `$PATH`.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn spawn_error(program: &str, e: &std::io::Error) -> DriverError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DriverError::Io(format!("{program} not found"))
    } else {
        DriverError::Io(format!("cannot start {program}: {e}"))
    }
}

/// The workloads a driver knows, by VM name.
#[derive(Debug, Default)]
pub(crate) struct Workloads {
    map: BTreeMap<String, Workload>,
}

impl Workloads {
    /// Checks that `name` may start: nothing of that name is alive. Drops a dead predecessor and
    /// returns the restart count for the new start (its count + 1 under the same incarnation).
    pub(crate) fn make_room(&mut self, name: &str, incarnation: u64) -> Result<u32, DriverError> {
        match self.map.get(name) {
            None => Ok(0),
            Some(w) if w.is_alive() => Err(DriverError::WrongPhase(format!(
                "{name} is already running (incarnation {})",
                w.incarnation()
            ))),
            Some(w) => {
                let restarts = if w.incarnation() == incarnation {
                    w.restarts().saturating_add(1)
                } else {
                    0
                };
                self.map.remove(name);
                Ok(restarts)
            }
        }
    }

    /// For adoption: whether `found` is already held. The same workload again gives its
    /// observation; a different one under a held name is refused; None when the name is free.
    pub(crate) fn held(&self, found: &Workload) -> Result<Option<Observed>, DriverError> {
        match self.map.get(found.name()) {
            None => Ok(None),
            Some(known)
                if known.pid() == found.pid() && known.incarnation() == found.incarnation() =>
            {
                Ok(Some(known.observe()))
            }
            Some(known) => Err(DriverError::WrongPhase(format!(
                "{} in {} is already held by this driver (pid {})",
                found.name(),
                found.run_dir().display(),
                known.pid()
            ))),
        }
    }

    /// Adds a workload, replacing one of the same name.
    pub(crate) fn insert(&mut self, workload: Workload) {
        self.map.insert(workload.name().to_owned(), workload);
    }

    /// The named workload.
    pub(crate) fn get_mut(&mut self, name: &str) -> Result<&mut Workload, DriverError> {
        self.map
            .get_mut(name)
            .ok_or_else(|| DriverError::Unknown(name.to_owned()))
    }

    /// Takes the named workload out of the table.
    pub(crate) fn remove(&mut self, name: &str) -> Result<Workload, DriverError> {
        self.map
            .remove(name)
            .ok_or_else(|| DriverError::Unknown(name.to_owned()))
    }

    /// Polls every workload and returns what each is doing.
    pub(crate) fn poll(&mut self, now_ms: u64) -> BTreeMap<String, Observed> {
        self.map
            .iter_mut()
            .map(|(name, w)| {
                w.poll(now_ms);
                (name.clone(), w.observe())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_split_across_reads_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, b"old BLX_READY from an earlier boot\n").unwrap();
        let offset = std::fs::metadata(&path).unwrap().len();
        let mut watch = ConsoleWatch::new(path.clone(), "BLX_READY", offset);
        assert!(!watch.scan(), "a marker before the offset must not count");
        let append = |bytes: &[u8]| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(bytes)
                .unwrap();
        };
        append(b"booting...\nBLX_RE");
        assert!(!watch.scan());
        assert!(!watch.scan());
        append(b"ADY 6.1\n");
        assert!(watch.scan());
    }

    #[test]
    fn truncated_console_is_rescanned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(
            &path,
            b"a lot of output that is longer than the next file\n",
        )
        .unwrap();
        let mut watch = ConsoleWatch::new(path.clone(), "READY", 0);
        assert!(!watch.scan());
        std::fs::write(&path, b"READY\n").unwrap();
        assert!(watch.scan());
    }

    #[test]
    fn guest_panics_are_found_after_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONSOLE_LOG);
        let old = "[ 1.3] Kernel panic - not syncing: old\n";
        std::fs::write(&path, format!("{old}[ 0.1] booting\n[ 1.377666] Kernel panic - not syncing: VFS: Unable to mount root fs\n")).unwrap();
        assert_eq!(
            panic_line(&path, old.len() as u64).as_deref(),
            Some("Kernel panic - not syncing: VFS: Unable to mount root fs")
        );
        std::fs::write(&path, "BLX_READY\n").unwrap();
        assert_eq!(panic_line(&path, 0), None);
    }

    #[test]
    fn seconds_read_well() {
        assert_eq!(seconds(5000), "5 s");
        assert_eq!(seconds(1500), "1.5 s");
        assert_eq!(seconds(250), "0.2 s");
    }

    #[test]
    fn proc_state_of_self_is_alive() {
        let me = std::process::id();
        assert!(
            matches!(proc_state(me), Some('R' | 'S')),
            "{:?}",
            proc_state(me)
        );
        assert_eq!(proc_state(u32::MAX), None);
        assert!(!is_workload(me, Path::new("/nonexistent")));
    }
}
