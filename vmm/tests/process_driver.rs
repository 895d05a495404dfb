//! The process driver: the shared driver suite, then what only it does.

mod driver_suite;

use std::time::{Duration, Instant};

use blx_vmm::process::ProcessDriver;
use blx_vmm::{BootSpec, Driver, DriverError, DriverKind, Phase};
use driver_suite::{Clock, Scratch, assert_gone, desired, processes_in, run_dir, wait_for};

fn sh(script: &str, marker: Option<&str>) -> BootSpec {
    BootSpec {
        ready_marker: marker.map(str::to_owned),
        ..BootSpec::process(vec!["sh".into(), "-c".into(), script.into()])
    }
}

#[test]
fn process_driver_passes_the_suite() {
    driver_suite::suite(
        ProcessDriver::new,
        sh(
            "echo booting; echo READY now; exec sleep 600",
            Some("READY"),
        ),
    );
}

#[test]
fn exit_codes_are_reported() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = ProcessDriver::new();
    let dir = run_dir(root.path(), "three");
    driver
        .start(
            &desired("three", 1, &sh("echo READY; exit 3", Some("READY"))),
            &dir,
            clock.now_ms(),
        )
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "three",
        Duration::from_secs(5),
        "exited",
        |o| matches!(o.phase, Phase::Exited { .. }),
    );
    assert_eq!(
        seen.phase,
        Phase::Exited {
            code: Some(3),
            reason: "exited with code 3".into()
        }
    );
    assert!(
        seen.boot_ms.is_some(),
        "the marker printed before the exit still counts"
    );
    driver.stop("three").unwrap();
}

#[test]
fn without_a_marker_it_is_ready_at_once() {
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = ProcessDriver::new();
    let dir = run_dir(root.path(), "plain");
    driver
        .start(
            &desired("plain", 1, &sh("exec sleep 600", None)),
            &dir,
            clock.now_ms(),
        )
        .unwrap();
    let seen = driver.poll(clock.now_ms()).remove("plain").unwrap();
    assert_eq!(seen.phase, Phase::Running);
    let pid = seen.pid.unwrap();
    driver.stop("plain").unwrap();
    assert_gone(pid, &dir);
}

#[test]
fn restart_counts_and_reads_only_the_new_output() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = ProcessDriver::new();
    let dir = run_dir(root.path(), "again");
    driver
        .start(
            &desired("again", 1, &sh("echo READY; exit 0", Some("READY"))),
            &dir,
            clock.now_ms(),
        )
        .unwrap();
    wait_for(
        &mut driver,
        clock,
        "again",
        Duration::from_secs(5),
        "exited",
        |o| matches!(o.phase, Phase::Exited { .. }),
    );
    tracing::info!("--- restart under the same incarnation: the old READY does not count");
    let mut quiet = sh("echo still booting; exec sleep 600", Some("READY"));
    quiet.boot_timeout_ms = 500;
    driver
        .start(&desired("again", 1, &quiet), &dir, clock.now_ms())
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "again",
        Duration::from_secs(5),
        "failed",
        |o| matches!(o.phase, Phase::Failed { .. }),
    );
    assert_eq!(seen.restarts, 1);
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert_eq!(
        console, "READY\nstill booting\n",
        "output of both runs, appended"
    );
    tracing::info!("--- a new incarnation starts the count again");
    driver
        .start(
            &desired("again", 2, &sh("echo READY; exec sleep 600", Some("READY"))),
            &dir,
            clock.now_ms(),
        )
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "again",
        Duration::from_secs(5),
        "running",
        |o| o.phase == Phase::Running,
    );
    assert_eq!((seen.incarnation, seen.restarts), (2, 0));
    driver.stop("again").unwrap();
    assert_gone(seen.pid.unwrap(), &dir);
}

#[test]
fn the_whole_group_goes() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = ProcessDriver::new();

    tracing::info!("--- stop takes the workload's children too");
    let dir = run_dir(root.path(), "family");
    let spec = sh("sleep 600 & sleep 600 & echo READY; wait", Some("READY"));
    driver
        .start(&desired("family", 1, &spec), &dir, clock.now_ms())
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "family",
        Duration::from_secs(5),
        "running",
        |o| o.phase == Phase::Running,
    );
    wait_until(|| processes_in(&dir).len() == 3);
    driver.stop("family").unwrap();
    assert_gone(seen.pid.unwrap(), &dir);

    tracing::info!("--- when the leader exits, what it left in its group is killed");
    let dir = run_dir(root.path(), "orphans");
    let spec = sh("sleep 600 & echo READY; sleep 0.3; exit 0", Some("READY"));
    driver
        .start(&desired("orphans", 1, &spec), &dir, clock.now_ms())
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "orphans",
        Duration::from_secs(5),
        "exited",
        |o| matches!(o.phase, Phase::Exited { .. }),
    );
    let leader = driver.poll(clock.now_ms());
    assert_eq!(leader["orphans"].pid, None);
    assert!(matches!(seen.phase, Phase::Exited { code: Some(0), .. }));
    wait_until(|| processes_in(&dir).is_empty());
    driver.stop("orphans").unwrap();

    tracing::info!("--- a workload that ignores SIGTERM is killed after the grace period");
    let dir = run_dir(root.path(), "stubborn");
    let spec = sh(
        "trap '' TERM; echo READY; while :; do sleep 0.1; done",
        Some("READY"),
    );
    driver
        .start(&desired("stubborn", 1, &spec), &dir, clock.now_ms())
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "stubborn",
        Duration::from_secs(5),
        "running",
        |o| o.phase == Phase::Running,
    );
    let before = Instant::now();
    driver.stop("stubborn").unwrap();
    assert!(
        before.elapsed() < Duration::from_millis(2500),
        "stop took {:?}",
        before.elapsed()
    );
    assert_gone(seen.pid.unwrap(), &dir);
}

#[test]
fn paused_processes_are_stopped() {
    let root = Scratch::new();
    let clock = Clock::new();
    let mut driver = ProcessDriver::new();
    let dir = run_dir(root.path(), "frozen");
    driver
        .start(
            &desired(
                "frozen",
                1,
                &sh("echo READY; exec sleep 600", Some("READY")),
            ),
            &dir,
            clock.now_ms(),
        )
        .unwrap();
    let seen = wait_for(
        &mut driver,
        clock,
        "frozen",
        Duration::from_secs(5),
        "running",
        |o| o.phase == Phase::Running,
    );
    driver.pause("frozen").unwrap();
    let pid = seen.pid.unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.contains(") T "), "SIGSTOP reached the process: {stat}");
    driver.stop("frozen").unwrap();
    assert_gone(pid, &dir);
}

#[test]
fn specs_are_checked() {
    let driver = ProcessDriver::new();
    let mut spec = sh("true", None);
    spec.command.clear();
    let err = driver.validate(&spec).unwrap_err();
    assert!(matches!(err, DriverError::InvalidSpec(_)));
    assert_eq!(
        err.to_string(),
        "invalid VM spec: the process driver needs a command"
    );
    spec.command = vec!["/no/such/program".into()];
    assert!(
        driver
            .validate(&spec)
            .unwrap_err()
            .to_string()
            .contains("/no/such/program")
    );
    spec.command = vec!["sh".into()];
    spec.driver = DriverKind::Qemu;
    assert!(matches!(
        driver.validate(&spec),
        Err(DriverError::InvalidSpec(_))
    ));
}

fn wait_until(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached in 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}
