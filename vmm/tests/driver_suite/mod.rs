//! The test suite every [`Driver`] passes, and the helpers the driver and worker tests share.
//!
//! `suite(make, spec)` runs, with `spec` a workload that prints its readiness marker and then
//! runs until killed:
//! 1. an invalid spec is refused and leaves nothing behind;
//! 2. start → Running (marker seen) → pause → Paused → resume → Running → stop → no process;
//! 3. a workload left running by a dropped driver is adopted by a new one, which can pause,
//!    resume and stop it;
//! 4. a workload killed from outside is seen to exit, and a later driver adopting its run
//!    directory reports that exit; one that dies while no driver watches is reported as
//!    exited while away;
//! 5. a workload that never prints its marker fails at the boot timeout and is killed.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blx_vmm::{
    BootSpec, Desired, DesiredState, Driver, DriverError, Observed, Phase, RestartPolicy,
};

/// How long a boot may take in these tests (TCG on a busy 2-core machine included).
pub(crate) const BOOT_WAIT: Duration = Duration::from_secs(60);

/// Logs to the test's output (`RUST_LOG=debug` for more).
pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A test's clock: milliseconds since it began.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Self {
        Clock(Instant::now())
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap()
    }
}

/// A desired VM named `name` running `spec`.
pub(crate) fn desired(name: &str, incarnation: u64, spec: &BootSpec) -> Desired {
    Desired {
        name: name.into(),
        incarnation,
        spec: spec.clone(),
        state: DesiredState::Running,
        restart: RestartPolicy::Always,
    }
}

/// Polls `driver` until `name`'s observation satisfies `done`, failing after `within`.
pub(crate) fn wait_for(
    driver: &mut dyn Driver,
    clock: Clock,
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Observed) -> bool,
) -> Observed {
    let deadline = Instant::now() + within;
    loop {
        let seen = driver.poll(clock.now_ms()).remove(name);
        if let Some(seen) = &seen
            && done(seen)
        {
            return seen.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not {what} within {within:?}; last seen {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of live processes whose environment says they belong to `run_dir` (the workload and
/// everything it started).
pub(crate) fn processes_in(run_dir: &Path) -> BTreeSet<u32> {
    let Ok(canonical) = std::fs::canonicalize(run_dir) else {
        return BTreeSet::new();
    };
    let mut wanted = b"BLX_VM_RUN_DIR=".to_vec();
    wanted.extend_from_slice(canonical.as_os_str().as_encoded_bytes());
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_slice())
        {
            found.insert(pid);
        }
    }
    found
}

/// Asserts that the process `pid`, its process group and everything started in `run_dir` are
/// gone (zombies included), allowing a moment for the kernel to finish.
pub(crate) fn assert_gone(pid: u32, run_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    loop {
        let process = rustix::process::test_kill_process(raw).is_ok();
        let group = rustix::process::test_kill_process_group(raw).is_ok();
        let others = processes_in(run_dir);
        if !process && !group && others.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: process {pid} alive {process}, its group alive {group}, processes of {} {others:?}",
            run_dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary run root. Dropping it (also when a test fails) kills whatever still runs in
/// its run directories, so that a failing test leaves no processes behind.
pub(crate) struct Scratch(tempfile::TempDir);

impl Scratch {
    pub(crate) fn new() -> Self {
        Scratch(tempfile::tempdir().unwrap())
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.path()) else {
            return;
        };
        for entry in entries.flatten() {
            for pid in processes_in(&entry.path()) {
                if let Some(pid) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// A fresh run directory `<root>/<name>`.
pub(crate) fn run_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the whole suite against drivers made by `make`. `spec` must print its readiness
/// marker and then run until killed.
pub(crate) fn suite<D: Driver>(make: impl Fn() -> D, spec: BootSpec) {
    init_tracing();
    assert!(
        spec.ready_marker.is_some(),
        "the suite needs a spec with a readiness marker"
    );
    let root = Scratch::new();
    let clock = Clock::new();
    invalid_spec(&make, &spec, root.path(), clock);
    lifecycle(&make, &spec, root.path(), clock);
    adopt(&make, &spec, root.path(), clock);
    exit_detection(&make, &spec, root.path(), clock);
    boot_timeout(&make, &spec, root.path(), clock);
}

fn invalid_spec<D: Driver>(make: &impl Fn() -> D, spec: &BootSpec, root: &Path, clock: Clock) {
    tracing::info!("--- an invalid spec is refused and leaves nothing behind");
    let mut driver = make();
    let mut bad = spec.clone();
    bad.command.clear();
    bad.kernel = Some(root.join("no-such-kernel"));
    bad.vcpus = 0;
    assert!(matches!(
        driver.validate(&bad),
        Err(DriverError::InvalidSpec(_))
    ));
    let dir = run_dir(root, "invalid");
    let err = driver
        .start(&desired("invalid", 1, &bad), &dir, clock.now_ms())
        .unwrap_err();
    assert!(matches!(err, DriverError::InvalidSpec(_)), "{err:?}");
    assert!(driver.poll(clock.now_ms()).is_empty());
    assert!(!dir.join("state.json").exists());
    assert!(processes_in(&dir).is_empty());
    assert!(matches!(
        driver.stop("invalid"),
        Err(DriverError::Unknown(_))
    ));
    assert!(matches!(driver.adopt(&dir), Ok(None)));
}

fn lifecycle<D: Driver>(make: &impl Fn() -> D, spec: &BootSpec, root: &Path, clock: Clock) {
    tracing::info!("--- start → Running → pause → resume → stop");
    let mut driver = make();
    let dir = run_dir(root, "life");
    let vm = desired("life", 7, spec);
    driver.validate(spec).unwrap();
    driver.start(&vm, &dir, clock.now_ms()).unwrap();
    let started = driver
        .poll(clock.now_ms())
        .remove("life")
        .expect("observed right after start");
    assert!(
        matches!(started.phase, Phase::Starting | Phase::Running),
        "{started:?}"
    );
    assert_eq!((started.incarnation, started.driver), (7, spec.driver));
    let running = wait_for(&mut driver, clock, "life", BOOT_WAIT, "running", |o| {
        o.phase == Phase::Running
    });
    let pid = running.pid.expect("a running workload has a pid");
    let boot_ms = running.boot_ms.expect("boot time once the marker is seen");
    tracing::info!(boot_ms, pid, "booted");
    assert!(dir.join("state.json").is_file());
    assert!(processes_in(&dir).contains(&pid));
    assert!(
        matches!(
            driver.start(&vm, &dir, clock.now_ms()),
            Err(DriverError::WrongPhase(_))
        ),
        "a second start of a running VM must be refused"
    );

    tracing::info!("--- pause and resume");
    assert!(matches!(
        driver.resume("life"),
        Err(DriverError::WrongPhase(_))
    ));
    driver.pause("life").unwrap();
    assert_eq!(driver.poll(clock.now_ms())["life"].phase, Phase::Paused);
    assert!(matches!(
        driver.pause("life"),
        Err(DriverError::WrongPhase(_))
    ));
    driver.resume("life").unwrap();
    assert_eq!(driver.poll(clock.now_ms())["life"].phase, Phase::Running);
    assert!(matches!(
        driver.pause("nobody"),
        Err(DriverError::Unknown(_))
    ));

    tracing::info!("--- stop kills the whole group and forgets the VM");
    let before = Instant::now();
    driver.stop("life").unwrap();
    tracing::info!(stop_ms = before.elapsed().as_millis(), "stopped");
    assert!(
        before.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        before.elapsed()
    );
    assert!(!driver.poll(clock.now_ms()).contains_key("life"));
    assert_gone(pid, &dir);
    assert!(
        !dir.join("state.json").exists(),
        "a stopped VM must not be adopted later"
    );
    assert!(matches!(driver.stop("life"), Err(DriverError::Unknown(_))));
}

fn adopt<D: Driver>(make: &impl Fn() -> D, spec: &BootSpec, root: &Path, clock: Clock) {
    tracing::info!("--- a workload outlives its driver and is adopted by the next");
    let dir = run_dir(root, "adoptee");
    let pid = {
        let mut first = make();
        first
            .start(&desired("adoptee", 3, spec), &dir, clock.now_ms())
            .unwrap();
        let running = wait_for(&mut first, clock, "adoptee", BOOT_WAIT, "running", |o| {
            o.phase == Phase::Running
        });
        running.pid.unwrap()
        // `first` dropped here without stopping anything.
    };
    assert!(
        processes_in(&dir).contains(&pid),
        "dropping a driver must not stop its workloads"
    );
    let mut second = make();
    let adopted = second.adopt(&dir).unwrap().expect("adopted");
    assert_eq!(
        (adopted.name.as_str(), adopted.incarnation, adopted.pid),
        ("adoptee", 3, Some(pid))
    );
    assert_eq!(adopted.phase, Phase::Running);
    assert!(adopted.boot_ms.is_some(), "boot time survives adoption");
    assert_eq!(
        second.adopt(&dir).unwrap().map(|o| o.pid),
        Some(Some(pid)),
        "adopting twice is harmless"
    );
    let seen = second.poll(clock.now_ms()).remove("adoptee").unwrap();
    assert_eq!((seen.phase, seen.pid), (Phase::Running, Some(pid)));

    tracing::info!("--- the adopted workload can be paused, resumed and stopped");
    second.pause("adoptee").unwrap();
    assert_eq!(second.poll(clock.now_ms())["adoptee"].phase, Phase::Paused);
    {
        let mut third = make();
        let again = third.adopt(&dir).unwrap().unwrap();
        assert_eq!(
            again.phase,
            Phase::Paused,
            "a paused workload is adopted as paused"
        );
    }
    second.resume("adoptee").unwrap();
    assert_eq!(second.poll(clock.now_ms())["adoptee"].phase, Phase::Running);
    second.stop("adoptee").unwrap();
    assert!(second.poll(clock.now_ms()).is_empty());
    assert_gone(pid, &dir);
}

fn exit_detection<D: Driver>(make: &impl Fn() -> D, spec: &BootSpec, root: &Path, clock: Clock) {
    tracing::info!("--- a workload killed from outside is seen to exit");
    let mut driver = make();
    let dir = run_dir(root, "doomed");
    driver
        .start(&desired("doomed", 1, spec), &dir, clock.now_ms())
        .unwrap();
    let running = wait_for(&mut driver, clock, "doomed", BOOT_WAIT, "running", |o| {
        o.phase == Phase::Running
    });
    let pid = running.pid.unwrap();
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(raw, rustix::process::Signal::KILL).unwrap();
    let exited = wait_for(
        &mut driver,
        clock,
        "doomed",
        Duration::from_secs(5),
        "exited",
        |o| matches!(o.phase, Phase::Exited { .. }),
    );
    match &exited.phase {
        Phase::Exited { code, reason } => {
            assert_eq!(*code, None);
            assert!(reason.starts_with("killed by signal 9"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(exited.pid, None);
    assert_gone(pid, &dir);

    tracing::info!("--- a later driver reports the recorded exit");
    let mut later = make();
    let found = later
        .adopt(&dir)
        .unwrap()
        .expect("a dead workload's run directory is reported");
    assert_eq!(found.phase, exited.phase);
    assert_eq!(found.pid, None);
    later.stop("doomed").unwrap();
    assert!(!dir.join("state.json").exists());
    assert!(
        matches!(later.adopt(&dir), Ok(None)),
        "forgotten after the stop"
    );
    driver.stop("doomed").unwrap();
    assert!(driver.poll(clock.now_ms()).is_empty());

    tracing::info!(
        "--- a workload that dies while no driver watches is reported as exited while away"
    );
    let dir = run_dir(root, "unwatched");
    let pid = {
        let mut first = make();
        first
            .start(&desired("unwatched", 1, spec), &dir, clock.now_ms())
            .unwrap();
        let running = wait_for(&mut first, clock, "unwatched", BOOT_WAIT, "running", |o| {
            o.phase == Phase::Running
        });
        running.pid.unwrap()
    };
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(raw, rustix::process::Signal::KILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut later = make();
    let found = later.adopt(&dir).unwrap().expect("reported");
    assert_eq!(
        found.phase,
        Phase::Exited {
            code: None,
            reason: "exited while the agent was away".into()
        }
    );
    // The dead process is this test's own child: polls reap it once it has fully exited.
    let deadline = Instant::now() + Duration::from_secs(3);
    while rustix::process::test_kill_process(raw).is_ok() && Instant::now() < deadline {
        later.poll(clock.now_ms());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_gone(pid, &dir);
    later.stop("unwatched").unwrap();
    assert!(matches!(later.adopt(&dir), Ok(None)));
}

fn boot_timeout<D: Driver>(make: &impl Fn() -> D, spec: &BootSpec, root: &Path, clock: Clock) {
    tracing::info!("--- no readiness line within the boot timeout: Failed, and killed");
    let mut driver = make();
    let dir = run_dir(root, "silent");
    let mut silent = spec.clone();
    silent.ready_marker = Some("BLX_NEVER_PRINTED".into());
    silent.boot_timeout_ms = 1500;
    driver
        .start(&desired("silent", 1, &silent), &dir, clock.now_ms())
        .unwrap();
    let pid = driver.poll(clock.now_ms())["silent"].pid.unwrap();
    let failed = wait_for(
        &mut driver,
        clock,
        "silent",
        Duration::from_secs(10),
        "failed",
        |o| matches!(o.phase, Phase::Failed { .. }),
    );
    assert_eq!(
        failed.phase,
        Phase::Failed {
            reason: "no readiness line \"BLX_NEVER_PRINTED\" within 1.5 s".into()
        }
    );
    assert_eq!(failed.pid, None);
    assert_gone(pid, &dir);
    driver.stop("silent").unwrap();
    assert!(driver.poll(clock.now_ms()).is_empty());
}
