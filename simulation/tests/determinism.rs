//! A run is a function of its seed: the same seed gives the same trace hash, in this process
//! and in a fresh one, and another seed gives another.

use blx_simulation::{RunConfig, run};

#[test]
fn one_seed_twice_gives_one_trace_and_another_seed_another() {
    let config = RunConfig {
        duration: std::time::Duration::from_secs(60),
        ..RunConfig::standard(7)
    };
    let first = run(&config);
    let second = run(&config);
    assert_eq!(first.violation, None, "seed 7 failed");
    assert_eq!(first.trace_hash, second.trace_hash, "seed 7 ran two ways");
    assert!(
        first.operations > 50,
        "the clients did little: {}",
        first.operations
    );
    let other = run(&RunConfig {
        seed: 8,
        ..config.clone()
    });
    assert_ne!(first.trace_hash, other.trace_hash);

    // The replay command's binary, in a process of its own, prints the same hash.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blx-simulation"))
        .args(["--seed", "7", "--secs", "60"])
        .output()
        .expect("the simulator binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("seed 7 trace {} ", first.trace_hash)),
        "a fresh process gave another trace: {stdout}"
    );
}
