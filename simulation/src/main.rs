//! `blx-simulation`: run one seed (`--seed N`) or a range (`--seeds A..B`) of simulated
//! clusters, print each run's seed and trace hash, and for a failure the invariant it broke
//! and the command that replays it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use blx_simulation::{RunConfig, replay_command, run};
use clap::Parser;

/// Runs blx clusters under simulated faults.
#[derive(Parser, Debug)]
#[command(name = "blx-simulation", version)]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this range of seeds, `A..B` (B not included).
    #[arg(long, value_parser = parse_range)]
    seeds: Option<(u64, u64)>,
    /// Agents per run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(3..=9))]
    agents: u64,
    /// Virtual seconds per run (faults fall between 20 s and 30 s before the end).
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    secs: u64,
    /// Print the run's event log (with --seed).
    #[arg(long)]
    events: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range like 1..100"))?;
    let a: u64 = a.parse().map_err(|_| format!("{a:?} is not a seed"))?;
    let b: u64 = b.parse().map_err(|_| format!("{b:?} is not a seed"))?;
    if a >= b {
        return Err(format!("{s:?} is empty"));
    }
    Ok((a, b))
}

/// Log lines stamped with the run's virtual time.
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:10.3}s", t.as_secs_f64()),
            None => write!(w, "{:>11}", "-"),
        }
    }
}

/// The replay command, with the non-default settings this run used.
fn replay(seed: u64, args: &Args) -> String {
    let mut cmd = replay_command(seed);
    if args.agents != 5 {
        cmd.push_str(&format!(" --agents {}", args.agents));
    }
    if args.secs != 75 {
        cmd.push_str(&format!(" --secs {}", args.secs));
    }
    cmd
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(filter) = std::env::var_os("BLX_LOG") {
        // turmoil's "node" span names the host each line comes from.
        let filter = format!("{},turmoil=info", filter.to_string_lossy());
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(VirtualTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let config = |seed| RunConfig {
        agents: usize::try_from(args.agents).unwrap_or(5),
        duration: Duration::from_secs(args.secs),
        keep_events: args.events,
        ..RunConfig::standard(seed)
    };
    let (from, to) = match (args.seed, args.seeds) {
        (Some(s), _) => (s, s + 1),
        (None, Some(r)) => r,
        (None, None) => (1, 2),
    };
    let started = Instant::now();
    let mut failures = Vec::new();
    for seed in from..to {
        let t = Instant::now();
        let outcome = run(&config(seed));
        for line in &outcome.events {
            println!("  {line}");
        }
        let verdict = match &outcome.violation {
            None => "ok".to_string(),
            Some(v) => format!("FAILED: {v}"),
        };
        println!(
            "seed {seed} trace {} ops {} dropped {} wall {:.1}s {verdict}",
            outcome.trace_hash,
            outcome.operations,
            outcome.dropped,
            t.elapsed().as_secs_f64()
        );
        if outcome.violation.is_some() {
            println!("  replay: {}", replay(seed, &args));
            failures.push(seed);
        }
    }
    let runs = to - from;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{runs} seeds in {wall:.1}s ({:.2} seeds/s, {} virtual s each), {} failed",
        runs as f64 / wall,
        args.secs,
        failures.len()
    );
    for seed in &failures {
        println!("  failed: {}", replay(*seed, &args));
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
