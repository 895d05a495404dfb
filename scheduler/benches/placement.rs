//! Placement throughput: one `schedule` call for 100,000 pending VMs on 10,000 nodes, per
//! strategy, on one core. Prints a markdown table.
//!
//! ```text
//! cargo bench -p blx-scheduler --bench placement
//! ```

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use blx_scheduler::{Allocation, NodeView, Resources, Strategy, VmRequest, schedule};

const NODES: usize = 10_000;
const RUNNING: usize = 20_000;
const PENDING: usize = 100_000;
const SEED: u64 = 0x5eed;

/// splitmix64, so the cluster is the same on every run.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        usize::try_from(z % n as u64).expect("below n")
    }

    fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }
}

fn cluster() -> (Vec<NodeView>, Vec<Allocation>, Vec<VmRequest>) {
    let dice = &mut Dice(SEED);
    let nodes: Vec<NodeView> = (0..NODES)
        .map(|i| {
            let zone = dice.pick(&["a", "b", "c"]);
            let mut labels = BTreeMap::new();
            labels.insert("disk".to_owned(), dice.pick(&["ssd", "hdd"]).to_owned());
            labels.insert("arch".to_owned(), "x86".to_owned());
            labels.insert("rack".to_owned(), format!("r{}", i / 40));
            NodeView {
                id: format!("{:016x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                name: format!("node-{i}"),
                capacity: Resources {
                    vcpus: dice.pick(&[32, 48, 64, 96]),
                    memory_mib: dice.pick(&[128, 256, 384, 512]) * 1024,
                    disk_mib: dice.pick(&[1, 2, 4]) * 1024 * 1024,
                },
                labels,
                zone: Some(zone.to_owned()),
                schedulable: dice.below(50) != 0,
            }
        })
        .collect();
    let sizes = [(1, 1024), (2, 2048), (2, 4096), (4, 8192), (8, 16384)];
    let allocations: Vec<Allocation> = (0..RUNNING)
        .map(|i| {
            let (vcpus, memory_mib) = dice.pick(&sizes);
            Allocation {
                vm: format!("running-{i}"),
                node: nodes[dice.below(NODES)].id.clone(),
                resources: Resources {
                    vcpus,
                    memory_mib,
                    disk_mib: 20 * 1024,
                },
                priority: u16::try_from(dice.below(500)).expect("small"),
                group: (dice.below(10) == 0).then(|| format!("svc-{}", dice.below(2_000))),
            }
        })
        .collect();
    let constraints = ["disk=ssd", "zone in a,b", "disk!=hdd", "arch=x86", "zone=c"];
    let preferences = ["zone=a:30", "disk=ssd:20", "rack in r1,r2,r3:-40"];
    let pending: Vec<VmRequest> = (0..PENDING)
        .map(|i| {
            let (vcpus, memory_mib) = dice.pick(&sizes);
            let mut request = VmRequest {
                name: format!("vm-{i:06}"),
                resources: Resources {
                    vcpus,
                    memory_mib,
                    disk_mib: dice.pick(&[10, 20, 50]) * 1024,
                },
                priority: u16::try_from(dice.below(1001)).expect("small"),
                constraints: Vec::new(),
                preferences: Vec::new(),
                group: None,
                spread_zones: false,
            };
            if dice.below(2) == 0 {
                request
                    .constraints
                    .push(dice.pick(&constraints).parse().expect("valid"));
            }
            if dice.below(1000) == 0 {
                // Nothing has a GPU: these stay pending and take the slow path.
                request.constraints.push("gpu".parse().expect("valid"));
            }
            if dice.below(5) == 0 {
                request
                    .preferences
                    .push(dice.pick(&preferences).parse().expect("valid"));
            }
            if dice.below(10) == 0 {
                request.group = Some(format!("web-{}", dice.below(2_000)));
                request.spread_zones = dice.below(2) == 0;
            }
            request
        })
        .collect();
    (nodes, allocations, pending)
}

fn main() {
    let (nodes, allocations, pending) = cluster();
    println!("| strategy | nodes | VMs | placed | unplaced | seconds | placements/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for strategy in [Strategy::Binpack, Strategy::Spread] {
        let start = Instant::now();
        let plan = black_box(schedule(
            black_box(&nodes),
            black_box(&allocations),
            black_box(&pending),
            strategy,
            SEED,
        ));
        let seconds = start.elapsed().as_secs_f64();
        let placed = plan.placements.len();
        println!(
            "| {strategy:?} | {} | {} | {placed} | {} | {seconds:.3} | {:.0} |",
            nodes.len(),
            pending.len(),
            plan.unplaced.len(),
            placed as f64 / seconds,
        );
    }
}
