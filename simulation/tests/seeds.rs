//! The CI seed set: every seed runs a 5-agent cluster through at least one crash and restart,
//! one partition and one period of packet loss (and more drawn from the seed), with every
//! invariant holding. Split in two so both test threads work, and a third runs a cluster with
//! clients beyond the servers.

use blx_simulation::{CI_SEEDS, REGRESSION_SEEDS, RunConfig, replay_command, run};

fn run_all(seeds: impl Iterator<Item = u64>) {
    run_with(seeds, 5);
}

fn run_with(seeds: impl Iterator<Item = u64>, agents: usize) {
    let mut failed = Vec::new();
    for seed in seeds {
        let outcome = run(&RunConfig {
            agents,
            ..RunConfig::standard(seed)
        });
        println!(
            "seed {seed} trace {} ops {}",
            outcome.trace_hash, outcome.operations
        );
        if let Some(v) = outcome.violation {
            let replay = match agents {
                5 => replay_command(seed),
                n => format!("{} --agents {n}", replay_command(seed)),
            };
            println!("seed {seed}: {v}\n  replay: {replay}");
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

/// Eight agents: three voters, two standbys and three clients that follow a server's watch,
/// through the same faults. Clients change role as voters die and come back.
#[test]
fn seeds_with_clients_beyond_the_servers_hold_every_invariant() {
    run_with(CI_SEEDS.start..CI_SEEDS.start + 6, 8);
}
