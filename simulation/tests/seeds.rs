//! The CI seed set: every seed runs a 5-agent cluster through at least one crash and restart,
//! one partition and one period of packet loss (and more drawn from the seed), with every
//! invariant holding. Split in two so both test threads work.

use blx_simulation::{CI_SEEDS, REGRESSION_SEEDS, RunConfig, replay_command, run};

fn run_all(seeds: impl Iterator<Item = u64>) {
    let mut failed = Vec::new();
    for seed in seeds {
        let outcome = run(&RunConfig::standard(seed));
        println!(
            "seed {seed} trace {} ops {}",
            outcome.trace_hash, outcome.operations
        );
        if let Some(v) = outcome.violation {
            println!("seed {seed}: {v}\n  replay: {}", replay_command(seed));
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "seeds {failed:?} broke an invariant");
}

#[test]
fn first_half_of_the_ci_seeds_hold_every_invariant() {
    let mid = CI_SEEDS.start + (CI_SEEDS.end - CI_SEEDS.start) / 2;
    run_all(CI_SEEDS.start..mid);
}

#[test]
fn second_half_of_the_ci_seeds_and_the_regression_seeds_hold_every_invariant() {
    let mid = CI_SEEDS.start + (CI_SEEDS.end - CI_SEEDS.start) / 2;
    run_all(
        (mid..CI_SEEDS.end).chain(
            REGRESSION_SEEDS
                .iter()
                .copied()
                .filter(|s| !CI_SEEDS.contains(s)),
        ),
    );
}
