//! The worker end to end with the process driver: reconciling, restarts, failed starts,
//! incarnations and adoption after an agent restart.

mod driver_suite;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use blx_vmm::process::ProcessDriver;
use blx_vmm::{
    BootSpec, Desired, DesiredState, Driver, DriverKind, Observed, Phase, RestartPolicy, Worker,
};
use driver_suite::{Clock, Scratch, assert_gone, desired};

fn sh(script: &str) -> BootSpec {
    BootSpec {
        ready_marker: Some("READY".into()),
        ..BootSpec::process(vec!["sh".into(), "-c".into(), script.into()])
    }
}

const SERVE: &str = "echo READY; exec sleep 600";

fn worker(root: &Path) -> Worker {
    let drivers: Vec<Box<dyn Driver>> = vec![Box::new(ProcessDriver::new())];
    Worker::new(root.to_path_buf(), drivers)
}

fn want(vms: &[&Desired]) -> BTreeMap<String, Desired> {
    vms.iter().map(|d| (d.name.clone(), (*d).clone())).collect()
}

/// Ticks until `done` holds for the observations, failing after `within`.
fn tick_until(
    worker: &mut Worker,
    desired: &BTreeMap<String, Desired>,
    clock: Clock,
    within: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, Observed>) -> bool,
) -> BTreeMap<String, Observed> {
    let deadline = Instant::now() + within;
    loop {
        let seen = worker.tick(desired, clock.now_ms());
        if done(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} within {within:?}: {seen:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn phase_of<'a>(seen: &'a BTreeMap<String, Observed>, name: &str) -> Option<&'a Phase> {
    seen.get(name).map(|o| &o.phase)
}

#[test]
fn follows_the_desired_state() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut worker = worker(root.path());
    let mut vm = desired("web", 1, &sh(SERVE));
    let wait = Duration::from_secs(5);

    tracing::info!("--- desired Running: started, then running");
    let seen = tick_until(&mut worker, &want(&[&vm]), clock, wait, "running", |s| {
        phase_of(s, "web") == Some(&Phase::Running)
    });
    let pid = seen["web"].pid.unwrap();
    let dir = root.path().join("web");
    assert_eq!(worker.console_log("web"), dir.join("console.log"));
    assert_eq!(
        std::fs::read_to_string(worker.console_log("web")).unwrap(),
        "READY\n"
    );

    tracing::info!("--- Paused, then Running again");
    vm.state = DesiredState::Paused;
    tick_until(&mut worker, &want(&[&vm]), clock, wait, "paused", |s| {
        phase_of(s, "web") == Some(&Phase::Paused)
    });
    vm.state = DesiredState::Running;
    let seen = tick_until(&mut worker, &want(&[&vm]), clock, wait, "running", |s| {
        phase_of(s, "web") == Some(&Phase::Running)
    });
    assert_eq!(seen["web"].pid, Some(pid), "resumed, not restarted");

    tracing::info!("--- Stopped: stopped and gone from the observations");
    vm.state = DesiredState::Stopped;
    let seen = worker.tick(&want(&[&vm]), clock.now_ms());
    assert!(seen.is_empty(), "{seen:?}");
    assert_gone(pid, &dir);
    assert!(
        worker.tick(&want(&[&vm]), clock.now_ms()).is_empty(),
        "a stopped VM stays stopped"
    );

    tracing::info!("--- a new incarnation replaces the old one, with a fresh console");
    vm.state = DesiredState::Running;
    let seen = tick_until(&mut worker, &want(&[&vm]), clock, wait, "running", |s| {
        phase_of(s, "web") == Some(&Phase::Running)
    });
    let first = seen["web"].pid.unwrap();
    vm.incarnation = 2;
    let seen = worker.tick(&want(&[&vm]), clock.now_ms());
    assert!(
        !seen.contains_key("web"),
        "the old incarnation is stopped first: {seen:?}"
    );
    assert_gone(first, &dir);
    let seen = tick_until(&mut worker, &want(&[&vm]), clock, wait, "running", |s| {
        phase_of(s, "web") == Some(&Phase::Running)
    });
    assert_eq!((seen["web"].incarnation, seen["web"].restarts), (2, 0));
    assert_eq!(
        std::fs::read_to_string(worker.console_log("web")).unwrap(),
        "READY\n"
    );

    tracing::info!("--- no longer desired: stopped and forgotten");
    let second = seen["web"].pid.unwrap();
    assert!(worker.tick(&BTreeMap::new(), clock.now_ms()).is_empty());
    assert_gone(second, &dir);
}

#[test]
fn restarts_follow_the_policy_with_backoff() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut worker = worker(root.path());
    let mut crashing = desired("crash", 1, &sh("echo READY; exit 3"));
    crashing.restart = RestartPolicy::OnFailure;
    let mut done = desired("done", 1, &sh("echo READY; exit 0"));
    done.restart = RestartPolicy::OnFailure;
    let mut never = desired("never", 1, &sh("echo READY; exit 3"));
    never.restart = RestartPolicy::Never;
    let all = want(&[&crashing, &done, &never]);

    tracing::info!("--- a crash is restarted at once, then after 1 s, then after 2 s");
    let started = Instant::now();
    let seen = tick_until(
        &mut worker,
        &all,
        clock,
        Duration::from_secs(10),
        "restarted twice",
        |s| {
            s.get("crash")
                .is_some_and(|o| o.restarts >= 2 && matches!(o.phase, Phase::Exited { .. }))
        },
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "backoff skipped: {:?}",
        started.elapsed()
    );
    assert_eq!(seen["crash"].restarts, 2);
    let log = std::fs::read_to_string(worker.console_log("crash")).unwrap();
    assert_eq!(
        log, "READY\nREADY\nREADY\n",
        "restarts append to the console"
    );

    tracing::info!("--- a clean exit under OnFailure and any exit under Never stay down");
    assert_eq!(
        seen["done"].phase,
        Phase::Exited {
            code: Some(0),
            reason: "exited with code 0".into()
        }
    );
    assert_eq!(seen["done"].restarts, 0);
    assert_eq!(seen["never"].restarts, 0);
    assert!(matches!(
        seen["never"].phase,
        Phase::Exited { code: Some(3), .. }
    ));

    tracing::info!("--- a VM desired Stopped after it exited stays as it is");
    let mut stopped = done.clone();
    stopped.state = DesiredState::Stopped;
    let seen = worker.tick(&want(&[&stopped]), clock.now_ms());
    assert!(matches!(
        phase_of(&seen, "done"),
        Some(Phase::Exited { .. })
    ));
    assert!(!seen.contains_key("crash") && !seen.contains_key("never"));
    worker.shutdown_all();
    assert!(worker.tick(&BTreeMap::new(), clock.now_ms()).is_empty());
}

#[test]
fn failed_starts_are_reported_and_retried() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut worker = worker(root.path());
    let mut broken = sh(SERVE);
    broken.command.clear();
    let vm = desired("broken", 1, &broken);
    assert!(worker.validate(&broken).is_err());
    let seen = worker.tick(&want(&[&vm]), clock.now_ms());
    assert_eq!(
        seen["broken"].phase,
        Phase::Failed {
            reason: "invalid VM spec: the process driver needs a command".into()
        }
    );
    assert_eq!((seen["broken"].restarts, seen["broken"].pid), (0, None));

    tracing::info!("--- retried under the restart policy, with backoff");
    let seen = worker.tick(&want(&[&vm]), clock.now_ms());
    assert_eq!(seen["broken"].restarts, 1, "first retry is immediate");
    let seen = worker.tick(&want(&[&vm]), clock.now_ms());
    assert_eq!(seen["broken"].restarts, 1, "second retry waits a second");

    tracing::info!("--- a VM for a driver this node lacks, or with a bad name, fails the same way");
    let mut qemu = sh(SERVE);
    qemu.driver = DriverKind::Qemu;
    let elsewhere = desired("elsewhere", 1, &qemu);
    let sneaky = desired("../escape", 1, &sh(SERVE));
    let seen = worker.tick(&want(&[&elsewhere, &sneaky]), clock.now_ms());
    assert!(!seen.contains_key("broken"), "no longer desired: forgotten");
    assert!(
        matches!(phase_of(&seen, "elsewhere"), Some(Phase::Failed { reason }) if reason.contains("no Qemu driver"))
    );
    assert!(
        matches!(phase_of(&seen, "../escape"), Some(Phase::Failed { reason }) if reason.contains("run directory"))
    );
    assert!(!root.path().parent().unwrap().join("escape").exists());
    assert!(worker.tick(&BTreeMap::new(), clock.now_ms()).is_empty());
}

#[test]
fn a_new_agent_adopts_what_the_old_one_left() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let keep = desired("keep", 4, &sh(SERVE));
    let orphan = desired("orphan", 1, &sh(SERVE));
    let dead = desired("dead", 1, &sh(SERVE));
    let paused = Desired {
        state: DesiredState::Paused,
        ..desired("paused", 1, &sh(SERVE))
    };
    let all = want(&[&keep, &orphan, &dead, &paused]);

    tracing::info!("--- the first agent starts four VMs and goes away without stopping them");
    let pids: BTreeMap<String, u32> = {
        let mut first = worker(root.path());
        let seen = tick_until(&mut first, &all, clock, Duration::from_secs(5), "up", |s| {
            s.len() == 4
                && s.values().all(|o| {
                    o.phase
                        == if o.name == "paused" {
                            Phase::Paused
                        } else {
                            Phase::Running
                        }
                })
        });
        seen.iter()
            .map(|(n, o)| (n.clone(), o.pid.unwrap()))
            .collect()
    };
    let raw = rustix::process::Pid::from_raw(i32::try_from(pids["dead"]).unwrap()).unwrap();
    rustix::process::kill_process(raw, rustix::process::Signal::KILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{}/stat", pids["dead"]))
        .map_or(true, |s| s.contains(") Z "))
    {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(5));
    }

    tracing::info!("--- the next agent adopts them all, the dead one as exited");
    let mut second = worker(root.path());
    let adopted: BTreeMap<String, Observed> = second
        .adopt_all()
        .into_iter()
        .map(|o| (o.name.clone(), o))
        .collect();
    assert_eq!(
        adopted.keys().collect::<Vec<_>>(),
        ["dead", "keep", "orphan", "paused"]
    );
    assert_eq!(adopted["keep"].pid, Some(pids["keep"]));
    assert_eq!(adopted["keep"].incarnation, 4);
    assert_eq!(adopted["paused"].phase, Phase::Paused);
    assert_eq!(
        adopted["dead"].phase,
        Phase::Exited {
            code: None,
            reason: "exited while the agent was away".into()
        }
    );

    tracing::info!("--- what is still desired is kept as it is; the rest is stopped and forgotten");
    let still = want(&[&keep, &paused]);
    let seen = second.tick(&still, clock.now_ms());
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["keep", "paused"]);
    assert_eq!(
        seen["keep"].pid,
        Some(pids["keep"]),
        "adopted, not restarted"
    );
    assert_eq!(seen["keep"].phase, Phase::Running);
    assert_eq!(seen["paused"].phase, Phase::Paused);
    assert_gone(pids["orphan"], &root.path().join("orphan"));
    assert!(!root.path().join("dead/state.json").exists());
    assert!(!root.path().join("orphan/state.json").exists());
    assert!(
        second.adopt_all().len() == 2,
        "only the two kept VMs are on record"
    );

    second.shutdown_all();
    for name in ["keep", "paused"] {
        assert_gone(pids[name], &root.path().join(name));
    }
}

#[test]
fn a_clean_exit_stays_clean_across_agent_restarts() {
    driver_suite::init_tracing();
    let root = Scratch::new();
    let clock = Clock::new();
    let mut job = desired("job", 1, &sh("echo READY; exit 0"));
    job.restart = RestartPolicy::OnFailure;
    let all = want(&[&job]);
    {
        let mut first = worker(root.path());
        tick_until(
            &mut first,
            &all,
            clock,
            Duration::from_secs(5),
            "done",
            |s| {
                matches!(
                    phase_of(s, "job"),
                    Some(Phase::Exited { code: Some(0), .. })
                )
            },
        );
    }
    tracing::info!("--- the next agent sees the recorded clean exit, not a crash, and leaves it");
    let mut second = worker(root.path());
    let adopted = second.adopt_all();
    assert_eq!(adopted.len(), 1);
    let clean = Phase::Exited {
        code: Some(0),
        reason: "exited with code 0".into(),
    };
    assert_eq!(adopted[0].phase, clean);
    let seen = second.tick(&all, clock.now_ms());
    assert_eq!((&seen["job"].phase, seen["job"].restarts), (&clean, 0));
    assert_eq!(
        std::fs::read_to_string(second.console_log("job")).unwrap(),
        "READY\n"
    );
}
