//! The faults of one run, drawn from its seed before it starts: when each begins, what it
//! does, and when it heals. Every plan has at least one host crash with its restart, one
//! partition and one period of packet loss; the rest is drawn, one to four more plus one for
//! every 15 s of the fault window, so a long run stays busy.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// One fault, on hosts named by their index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The host loses power: its tasks stop, and what its disk had not synced is gone. It
    /// restarts from what its disk kept when the fault heals.
    Crash {
        /// The host.
        host: usize,
    },
    /// No traffic between the two groups, either way.
    Partition {
        /// One side (the other side is every other host).
        side: Vec<usize>,
    },
    /// Traffic from `from` to `to` is dropped; the other way still flows.
    OneWay {
        /// The sender whose datagrams are lost.
        from: usize,
        /// The receiver that no longer hears it.
        to: usize,
    },
    /// A share of the datagrams on every link to and from `host` is dropped.
    Loss {
        /// The host.
        host: usize,
        /// Percent dropped.
        percent: u8,
    },
    /// Every message to and from `host` may take up to this long.
    Latency {
        /// The host.
        host: usize,
        /// Most milliseconds a message takes.
        max_ms: u64,
    },
    /// The host's wall clock jumps by this many milliseconds (and stays off until healed).
    ClockSkew {
        /// The host.
        host: usize,
        /// Milliseconds added to its clock.
        skew_ms: i64,
    },
}

/// A fault with its start and end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// When it begins.
    pub at: Duration,
    /// When it heals.
    pub until: Duration,
    /// What it is.
    pub fault: Fault,
}

/// The faults of one run, sorted by start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The faults.
    pub faults: Vec<Scheduled>,
    /// Each host's wall clock skew from the start, in milliseconds.
    pub initial_skew_ms: Vec<i64>,
}

impl Plan {
    /// Draws a plan for `hosts` hosts whose faults begin and heal within `window`.
    pub fn draw(seed: u64, hosts: usize, window: (Duration, Duration)) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
        let (start, end) = window;
        let span = u64::try_from(end.saturating_sub(start).as_millis().max(1)).unwrap_or(u64::MAX);
        let pick_window = |rng: &mut StdRng, min_ms: u64, max_ms: u64| {
            let len = rng.random_range(min_ms..max_ms).min(span);
            let at = start + Duration::from_millis(rng.random_range(0..=span - len));
            (at, at + Duration::from_millis(len))
        };
        let mut faults = Vec::new();
        // The three every run has.
        let (at, until) = pick_window(&mut rng, 2_000, 10_000);
        faults.push(Scheduled {
            at,
            until,
            fault: Fault::Crash {
                host: rng.random_range(0..hosts),
            },
        });
        let (at, until) = pick_window(&mut rng, 3_000, 15_000);
        faults.push(Scheduled {
            at,
            until,
            fault: Fault::Partition {
                side: minority(&mut rng, hosts),
            },
        });
        let (at, until) = pick_window(&mut rng, 3_000, 20_000);
        faults.push(Scheduled {
            at,
            until,
            fault: Fault::Loss {
                host: rng.random_range(0..hosts),
                percent: rng.random_range(5..40),
            },
        });
        // And more of any kind: a few, plus one for every 15 s of the window.
        let more = rng.random_range(1..5) + span / 15_000;
        for _ in 0..more {
            let (at, until) = pick_window(&mut rng, 1_000, 15_000);
            let host = rng.random_range(0..hosts);
            let fault = match rng.random_range(0..6) {
                0 => Fault::Crash { host },
                1 => Fault::Partition {
                    side: minority(&mut rng, hosts),
                },
                2 => {
                    let to = (host + rng.random_range(1..hosts)) % hosts;
                    Fault::OneWay { from: host, to }
                }
                3 => Fault::Loss {
                    host,
                    percent: rng.random_range(5..60),
                },
                4 => Fault::Latency {
                    host,
                    max_ms: rng.random_range(20..400),
                },
                _ => Fault::ClockSkew {
                    host,
                    skew_ms: rng.random_range(-20_000..20_000),
                },
            };
            faults.push(Scheduled { at, until, fault });
        }
        faults.sort_by_key(|f| (f.at, f.until));
        let initial_skew_ms = (0..hosts)
            .map(|_| rng.random_range(-2_000..2_000))
            .collect();
        Plan {
            faults,
            initial_skew_ms,
        }
    }

    /// When the last fault heals.
    pub fn healed_at(&self) -> Duration {
        self.faults
            .iter()
            .map(|f| f.until)
            .max()
            .unwrap_or_default()
    }
}

/// A minority of the hosts (at least one): the side a partition cuts off.
fn minority(rng: &mut StdRng, hosts: usize) -> Vec<usize> {
    let size = rng.random_range(1..=(hosts.saturating_sub(1) / 2).max(1));
    let mut all: Vec<usize> = (0..hosts).collect();
    let mut side = Vec::new();
    for _ in 0..size {
        side.push(all.remove(rng.random_range(0..all.len())));
    }
    side.sort_unstable();
    side
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_a_function_of_its_seed_and_has_the_three_kinds() {
        let w = (Duration::from_secs(20), Duration::from_secs(60));
        let a = Plan::draw(7, 5, w);
        assert_eq!(a, Plan::draw(7, 5, w));
        assert_ne!(a, Plan::draw(8, 5, w));
        for seed in 0..200 {
            let p = Plan::draw(seed, 5, w);
            assert!(
                p.faults
                    .iter()
                    .any(|f| matches!(f.fault, Fault::Crash { .. }))
            );
            assert!(
                p.faults
                    .iter()
                    .any(|f| matches!(f.fault, Fault::Partition { .. }))
            );
            assert!(
                p.faults
                    .iter()
                    .any(|f| matches!(f.fault, Fault::Loss { .. }))
            );
            assert!(p.faults.iter().all(|f| f.at >= w.0 && f.until <= w.1));
        }
    }
}
