//! With the deliberate bug on (`--features unsafe-early-ack`: the leader acknowledges KV
//! writes before they commit), the CI seed set finds it, on the durability or the
//! linearizability invariant, and names the command that replays it.
#![cfg(feature = "unsafe-early-ack")]

use blx_simulation::{CI_SEEDS, RunConfig, replay_command, run};

#[test]
fn the_ci_seeds_catch_a_leader_that_acknowledges_before_commit() {
    for seed in CI_SEEDS {
        let outcome = run(&RunConfig::standard(seed));
        if let Some(v) = outcome.violation {
            println!(
                "seed {seed} found it: {v}\n  replay: {}",
                replay_command(seed)
            );
            assert!(
                matches!(v.invariant, "acknowledged_writes" | "linearizable"),
                "seed {seed} broke another invariant: {v}"
            );
            assert!(replay_command(seed).contains(&format!("--seed {seed}")));
            return;
        }
    }
    panic!("no CI seed caught the early acknowledgement");
}
