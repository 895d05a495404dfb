//! Tests of [`schedule`]: examples first, then properties over random clusters.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{
    ProptestConfig, TestCaseError, any, prop, prop_assert, prop_assert_eq, proptest,
};
use proptest::strategy::Strategy as Generator;

use super::schedule;
use crate::{Allocation, Constraint, NodeView, Plan, Preference, Resources, Strategy, VmRequest};

fn res(vcpus: u32, memory_mib: u64) -> Resources {
    Resources {
        vcpus,
        memory_mib,
        disk_mib: 1024,
    }
}

fn node(name: &str, vcpus: u32, memory_mib: u64) -> NodeView {
    NodeView {
        id: format!("id-{name}"),
        name: name.to_owned(),
        capacity: Resources {
            vcpus,
            memory_mib,
            disk_mib: 100_000,
        },
        labels: BTreeMap::new(),
        zone: None,
        schedulable: true,
    }
}

fn labelled(mut n: NodeView, pairs: &[(&str, &str)]) -> NodeView {
    n.labels.extend(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    n
}

fn zoned(mut n: NodeView, zone: &str) -> NodeView {
    n.zone = Some(zone.to_owned());
    n
}

fn vm(name: &str, vcpus: u32, memory_mib: u64) -> VmRequest {
    VmRequest {
        name: name.to_owned(),
        resources: res(vcpus, memory_mib),
        priority: 500,
        constraints: Vec::new(),
        preferences: Vec::new(),
        group: None,
        spread_zones: false,
    }
}

fn alloc(vm: &str, node: &str, resources: Resources, priority: u16) -> Allocation {
    Allocation {
        vm: vm.to_owned(),
        node: format!("id-{node}"),
        resources,
        priority,
        group: None,
    }
}

/// Node name of each placement, by VM name.
fn placed(plan: &Plan) -> BTreeMap<String, String> {
    plan.placements
        .iter()
        .map(|p| (p.vm.clone(), p.node.trim_start_matches("id-").to_owned()))
        .collect()
}

fn reasons(plan: &Plan) -> BTreeMap<String, String> {
    plan.unplaced
        .iter()
        .map(|u| (u.vm.clone(), u.reason.clone()))
        .collect()
}

#[test]
fn binpack_fills_the_fullest_node_and_spread_the_emptiest() {
    let nodes = [node("n1", 8, 8192), node("n2", 8, 8192)];
    let allocations = [alloc("old", "n1", res(4, 4096), 100)];
    for seed in 0..20 {
        let plan = schedule(
            &nodes,
            &allocations,
            &[vm("new", 1, 1024)],
            Strategy::Binpack,
            seed,
        );
        assert_eq!(placed(&plan)["new"], "n1", "binpack, seed {seed}");
        let plan = schedule(
            &nodes,
            &allocations,
            &[vm("new", 1, 1024)],
            Strategy::Spread,
            seed,
        );
        assert_eq!(placed(&plan)["new"], "n2", "spread, seed {seed}");
    }
}

#[test]
fn later_vms_see_earlier_placements() {
    let nodes = [node("n1", 4, 4096), node("n2", 4, 4096)];
    let pending = [
        vm("a", 1, 1024),
        vm("b", 1, 1024),
        vm("c", 1, 1024),
        vm("d", 1, 1024),
    ];
    let plan = schedule(&nodes, &[], &pending, Strategy::Spread, 1);
    let on: Vec<String> = placed(&plan).into_values().collect();
    assert_eq!(on.iter().filter(|n| *n == "n1").count(), 2, "{plan:?}");

    let plan = schedule(&nodes, &[], &pending, Strategy::Binpack, 1);
    let on: BTreeSet<String> = placed(&plan).into_values().collect();
    assert_eq!(on.len(), 1, "binpack keeps filling one node: {plan:?}");
}

#[test]
fn equal_scores_go_to_the_lowest_node_id() {
    // Two nodes, so the sample (at least two feasible nodes) always holds both.
    let nodes = [node("n2", 4, 4096), node("n1", 4, 4096)];
    for seed in 0..20 {
        let plan = schedule(&nodes, &[], &[vm("a", 1, 1024)], Strategy::Spread, seed);
        assert_eq!(placed(&plan)["a"], "n1", "seed {seed}");
    }
}

#[test]
fn anti_affinity_puts_a_group_of_three_on_three_nodes() {
    let nodes = [
        node("n1", 16, 16384),
        node("n2", 16, 16384),
        node("n3", 16, 16384),
    ];
    let pending: Vec<VmRequest> = (1..=4)
        .map(|i| VmRequest {
            group: Some("web".into()),
            ..vm(&format!("web-{i}"), 1, 512)
        })
        .collect();
    for strategy in [Strategy::Binpack, Strategy::Spread] {
        let plan = schedule(&nodes, &[], &pending[..3], strategy, 9);
        let on: BTreeSet<String> = placed(&plan).into_values().collect();
        assert_eq!(on.len(), 3, "{strategy:?}: {plan:?}");

        let plan = schedule(&nodes, &[], &pending, strategy, 9);
        assert_eq!(plan.placements.len(), 3);
        assert_eq!(
            reasons(&plan)["web-4"],
            "every node that fits already runs a VM of group web"
        );
    }
}

#[test]
fn existing_allocations_count_for_anti_affinity() {
    let nodes = [node("n1", 16, 16384), node("n2", 16, 16384)];
    let allocations = [Allocation {
        group: Some("db".into()),
        ..alloc("db-1", "n1", res(1, 512), 100)
    }];
    let pending = [VmRequest {
        group: Some("db".into()),
        ..vm("db-2", 1, 512)
    }];
    let plan = schedule(&nodes, &allocations, &pending, Strategy::Binpack, 3);
    assert_eq!(placed(&plan)["db-2"], "n2");
}

#[test]
fn constraints_and_pseudo_labels_pick_the_node() {
    let nodes = [
        zoned(labelled(node("n1", 8, 8192), &[("disk", "ssd")]), "a"),
        zoned(labelled(node("n2", 8, 8192), &[("disk", "hdd")]), "b"),
        labelled(node("n3", 8, 8192), &[("zone", "c"), ("gpu", "a100")]),
    ];
    let with = |name: &str, text: &str| VmRequest {
        constraints: vec![text.parse().unwrap()],
        ..vm(name, 1, 512)
    };
    let pending = [
        with("ssd", "disk=ssd"),
        with("not-ssd", "disk!=ssd"),
        with("zone-b", "zone=b"),
        with("zone-c", "zone in (c)"),
        with("by-name", "node.name=n2"),
        with("by-id", "node.id=id-n3"),
        with("gpu", "gpu"),
        with("no-gpu", "!gpu"),
    ];
    let plan = schedule(&nodes, &[], &pending, Strategy::Binpack, 5);
    let on = placed(&plan);
    assert_eq!(on["ssd"], "n1");
    assert_ne!(on["not-ssd"], "n1");
    assert_eq!(on["zone-b"], "n2");
    assert_eq!(on["zone-c"], "n3");
    assert_eq!(on["by-name"], "n2");
    assert_eq!(on["by-id"], "n3");
    assert_eq!(on["gpu"], "n3");
    assert_ne!(on["no-gpu"], "n3");
}

#[test]
fn preferences_outweigh_utilisation() {
    let nodes = [
        labelled(node("n1", 8, 8192), &[("disk", "hdd")]),
        labelled(node("n2", 8, 8192), &[("disk", "ssd")]),
    ];
    let allocations = [alloc("old", "n1", res(4, 4096), 100)];
    let prefer = |weight: i32| VmRequest {
        preferences: vec![Preference {
            constraint: "disk=ssd".parse().unwrap(),
            weight,
        }],
        ..vm("new", 1, 512)
    };
    for seed in 0..10 {
        let plan = schedule(&nodes, &allocations, &[prefer(80)], Strategy::Binpack, seed);
        assert_eq!(
            placed(&plan)["new"],
            "n2",
            "a strong preference wins over binpack"
        );
        let plan = schedule(&nodes, &allocations, &[prefer(-80)], Strategy::Spread, seed);
        assert_eq!(
            placed(&plan)["new"],
            "n1",
            "a negative preference wins over spread"
        );
    }
}

#[test]
fn a_preferred_node_is_found_however_many_nodes_there_are() {
    // With 64 nodes the plain sample is 6 nodes and would miss the one preferred node most of
    // the time; a VM with preferences scores up to 64.
    let nodes: Vec<NodeView> = (0..64)
        .map(|i| node(&format!("n{i:02}"), 8, 8192))
        .collect();
    for seed in 0..20 {
        let request = VmRequest {
            preferences: vec!["node.name=n37:100".parse().unwrap()],
            ..vm("pinned", 1, 512)
        };
        let plan = schedule(&nodes, &[], &[request], Strategy::Binpack, seed);
        assert_eq!(placed(&plan)["pinned"], "n37", "seed {seed}");
    }
}

#[test]
fn spread_zones_prefers_the_zone_with_fewest_of_the_group() {
    let nodes = [
        zoned(node("a1", 8, 8192), "a"),
        zoned(node("a2", 8, 8192), "a"),
        zoned(node("a3", 8, 8192), "a"),
        zoned(node("b1", 8, 8192), "b"),
        zoned(node("b2", 8, 8192), "b"),
    ];
    let allocations = [
        Allocation {
            group: Some("web".into()),
            ..alloc("web-0", "a1", res(1, 512), 100)
        },
        // Unschedulable nodes still count: their VMs are in the zone.
        Allocation {
            group: Some("web".into()),
            ..alloc("web-9", "b2", res(1, 512), 100)
        },
    ];
    let mut nodes = nodes.to_vec();
    nodes[4].schedulable = false;
    let pending: Vec<VmRequest> = (1..=2)
        .map(|i| VmRequest {
            group: Some("web".into()),
            spread_zones: true,
            ..vm(&format!("web-{i}"), 1, 512)
        })
        .collect();
    for seed in 0..10 {
        let plan = schedule(&nodes, &allocations, &pending, Strategy::Binpack, seed);
        let on = placed(&plan);
        // Zone a holds web-0 and zone b web-9: web-1 may go to either zone, and web-2 must
        // then go to the other one, even though zone a has a free node left either way.
        let zone = |n: &str| n.chars().next();
        assert_ne!(
            zone(&on["web-1"]),
            zone(&on["web-2"]),
            "seed {seed}: {plan:?}"
        );
    }
}

#[test]
fn higher_priority_places_first() {
    let nodes = [node("n1", 2, 2048)];
    let pending = [
        VmRequest {
            priority: 10,
            ..vm("a-low", 2, 2048)
        },
        VmRequest {
            priority: 900,
            ..vm("z-high", 2, 2048)
        },
    ];
    let plan = schedule(&nodes, &[], &pending, Strategy::Binpack, 0);
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].vm, "z-high");
    assert!(
        plan.preemptions.is_empty(),
        "placements of this pass are never preempted"
    );
    assert_eq!(plan.unplaced[0].vm, "a-low");
}

#[test]
fn high_priority_preempts_low_priority_only_when_nothing_fits() {
    let nodes = [node("n1", 4, 4096)];
    let allocations = [alloc("batch", "n1", res(4, 4096), 100)];
    let urgent = VmRequest {
        priority: 900,
        ..vm("urgent", 2, 2048)
    };

    // --- nothing else fits: the low-priority VM is evicted
    let plan = schedule(
        &nodes,
        &allocations,
        std::slice::from_ref(&urgent),
        Strategy::Binpack,
        0,
    );
    assert_eq!(placed(&plan)["urgent"], "n1");
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(plan.preemptions[0].victim, "batch");
    assert_eq!(plan.preemptions[0].node, "id-n1");
    assert_eq!(plan.preemptions[0].by, "urgent");

    // --- another node has room: no eviction
    let both = [node("n1", 4, 4096), node("n2", 4, 4096)];
    let plan = schedule(
        &both,
        &allocations,
        std::slice::from_ref(&urgent),
        Strategy::Binpack,
        0,
    );
    assert_eq!(placed(&plan)["urgent"], "n2");
    assert!(plan.preemptions.is_empty());

    // --- equal or higher priority is never evicted
    for priority in [900, 1000] {
        let allocations = [alloc("peer", "n1", res(4, 4096), priority)];
        let plan = schedule(
            &nodes,
            &allocations,
            std::slice::from_ref(&urgent),
            Strategy::Binpack,
            0,
        );
        assert!(
            plan.placements.is_empty() && plan.preemptions.is_empty(),
            "{plan:?}"
        );
        assert_eq!(
            reasons(&plan)["urgent"],
            "needs 2048 MiB memory; the largest free is 0 MiB on n1"
        );
    }

    // --- priority 0 preempts nothing
    let plan = schedule(
        &nodes,
        &allocations,
        &[VmRequest {
            priority: 0,
            ..urgent.clone()
        }],
        Strategy::Binpack,
        0,
    );
    assert!(plan.preemptions.is_empty());

    // --- an unschedulable node's VMs are never evicted
    let mut cordoned = nodes.clone();
    cordoned[0].schedulable = false;
    let plan = schedule(
        &cordoned,
        &allocations,
        std::slice::from_ref(&urgent),
        Strategy::Binpack,
        0,
    );
    assert!(plan.preemptions.is_empty());
    assert_eq!(reasons(&plan)["urgent"], "no schedulable node");
}

#[test]
fn preemption_picks_the_cheapest_node() {
    let nodes = [
        node("n1", 4, 4096),
        node("n2", 4, 4096),
        node("n3", 4, 4096),
        node("n4", 4, 4096),
    ];
    let allocations = [
        // n1: two small victims needed.
        alloc("n1-a", "n1", res(2, 2048), 10),
        alloc("n1-b", "n1", res(2, 2048), 10),
        // n2: one victim, priority 300.
        alloc("n2-a", "n2", res(4, 4096), 300),
        // n3: one victim, priority 200: the cheapest.
        alloc("n3-a", "n3", res(4, 4096), 200),
        // n4: one victim would do, but it has equal priority.
        alloc("n4-a", "n4", res(4, 4096), 800),
    ];
    let urgent = VmRequest {
        priority: 800,
        ..vm("urgent", 3, 3072)
    };
    let plan = schedule(&nodes, &allocations, &[urgent], Strategy::Binpack, 0);
    assert_eq!(placed(&plan)["urgent"], "n3", "{plan:?}");
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(plan.preemptions[0].victim, "n3-a");
}

#[test]
fn preemption_evicts_lowest_priority_then_largest_first() {
    let nodes = [node("n1", 8, 8192)];
    let allocations = [
        alloc("mid", "n1", res(2, 2048), 50),
        alloc("small", "n1", res(1, 1024), 20),
        alloc("big", "n1", res(3, 3072), 20),
        alloc("keep", "n1", res(2, 2048), 700),
    ];
    let plan = schedule(
        &nodes,
        &allocations,
        &[VmRequest {
            priority: 600,
            ..vm("urgent", 4, 4096)
        }],
        Strategy::Binpack,
        0,
    );
    let victims: Vec<&str> = plan.preemptions.iter().map(|p| p.victim.as_str()).collect();
    assert_eq!(victims, ["big", "small"], "{plan:?}");
    assert_eq!(placed(&plan)["urgent"], "n1");
}

#[test]
fn preemption_respects_constraints_and_anti_affinity() {
    let nodes = [
        labelled(node("n1", 4, 4096), &[("disk", "hdd")]),
        node("n2", 4, 4096),
    ];
    let allocations = [
        alloc("low-1", "n1", res(4, 4096), 10),
        Allocation {
            group: Some("web".into()),
            ..alloc("web-1", "n2", res(4, 4096), 10)
        },
    ];
    let urgent = VmRequest {
        priority: 900,
        group: Some("web".into()),
        constraints: vec!["disk=ssd".parse().unwrap()],
        ..vm("urgent", 2, 2048)
    };
    let plan = schedule(&nodes, &allocations, &[urgent], Strategy::Binpack, 0);
    assert!(plan.preemptions.is_empty(), "{plan:?}");
    assert_eq!(
        reasons(&plan)["urgent"],
        "no node satisfies disk=ssd (checked 2 nodes)"
    );

    let urgent = VmRequest {
        priority: 900,
        group: Some("web".into()),
        ..vm("urgent", 2, 2048)
    };
    let plan = schedule(&nodes, &allocations, &[urgent], Strategy::Binpack, 0);
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(
        plan.preemptions[0].victim, "low-1",
        "n2 runs the group, so only n1 may be used"
    );
}

#[test]
fn evicted_vms_free_room_for_later_vms_in_the_pass() {
    let nodes = [node("n1", 4, 4096)];
    let allocations = [alloc("batch", "n1", res(4, 4096), 100)];
    let pending = [
        VmRequest {
            priority: 900,
            ..vm("urgent", 2, 2048)
        },
        VmRequest {
            priority: 500,
            ..vm("next", 2, 2048)
        },
    ];
    let plan = schedule(&nodes, &allocations, &pending, Strategy::Binpack, 0);
    assert_eq!(plan.preemptions.len(), 1);
    assert_eq!(placed(&plan).len(), 2, "{plan:?}");
}

#[test]
fn reasons_say_what_to_change() {
    let nodes = [
        zoned(labelled(node("n1", 4, 4096), &[("disk", "ssd")]), "a"),
        zoned(labelled(node("n2", 8, 2048), &[("disk", "hdd")]), "b"),
        zoned(labelled(node("n3", 2, 4096), &[("disk", "hdd")]), "b"),
    ];
    let with = |name: &str, texts: &[&str], vcpus: u32, memory: u64| VmRequest {
        constraints: texts
            .iter()
            .map(|t| t.parse::<Constraint>().unwrap())
            .collect(),
        ..vm(name, vcpus, memory)
    };
    let pending = [
        with("zone-c", &["zone=c"], 1, 512),
        with("mixed", &["zone=a", "disk=hdd"], 1, 512),
        with("mixed-first", &["disk=nvme", "zone=b"], 1, 512),
        with("memory", &[], 1, 8192),
        with("vcpus", &["disk=hdd"], 16, 512),
        with("all-three", &[], 8, 4096),
    ];
    let plan = schedule(&nodes, &[], &pending, Strategy::Binpack, 0);
    let why = reasons(&plan);
    assert_eq!(why["zone-c"], "no node satisfies zone=c (checked 3 nodes)");
    assert_eq!(
        why["mixed"],
        "no node satisfies zone=a, disk=hdd together (checked 3 nodes)"
    );
    assert_eq!(
        why["mixed-first"],
        "no node satisfies disk=nvme (checked 3 nodes)"
    );
    assert_eq!(
        why["memory"],
        "needs 8192 MiB memory; the largest free is 4096 MiB on n1"
    );
    assert_eq!(
        why["vcpus"],
        "needs 16 vcpus; the largest free is 8 vcpus on n2"
    );
    assert_eq!(
        why["all-three"],
        "needs 8 vcpus, 4096 MiB memory and 1024 MiB disk on one node; none has all three free \
         (closest: n1 with 4 vcpus, 4096 MiB memory and 100000 MiB disk)"
    );

    let mut down = nodes.to_vec();
    for n in &mut down {
        n.schedulable = false;
    }
    let plan = schedule(&down, &[], &[vm("any", 1, 1)], Strategy::Binpack, 0);
    assert_eq!(reasons(&plan)["any"], "no schedulable node");
    let plan = schedule(&[], &[], &[vm("any", 1, 1)], Strategy::Binpack, 0);
    assert_eq!(reasons(&plan)["any"], "no schedulable node");

    let allocations = [Allocation {
        group: Some("web".into()),
        ..alloc("web-0", "n1", res(1, 1), 1)
    }];
    let grouped = |constraints: &[&str]| VmRequest {
        group: Some("web".into()),
        ..with("web-1", constraints, 1, 1)
    };
    let plan = schedule(
        &nodes[..1],
        &allocations,
        &[grouped(&[])],
        Strategy::Binpack,
        0,
    );
    assert_eq!(
        reasons(&plan)["web-1"],
        "every node that fits already runs a VM of group web"
    );
    let full = [Allocation {
        resources: res(4, 4096),
        ..allocations[0].clone()
    }];
    let plan = schedule(&nodes[..1], &full, &[grouped(&[])], Strategy::Binpack, 0);
    assert_eq!(
        reasons(&plan)["web-1"],
        "every schedulable node already runs a VM of group web"
    );
    let plan = schedule(
        &nodes[..1],
        &full,
        &[grouped(&["disk=ssd"])],
        Strategy::Binpack,
        0,
    );
    assert_eq!(
        reasons(&plan)["web-1"],
        "every node that satisfies its constraints already runs a VM of group web"
    );
}

#[test]
fn same_inputs_give_the_same_plan_whatever_the_input_order() {
    let (nodes, allocations, pending) = cluster(300, 200, 2_000, 42);
    for strategy in [Strategy::Binpack, Strategy::Spread] {
        let first = schedule(&nodes, &allocations, &pending, strategy, 7);
        assert_eq!(first, schedule(&nodes, &allocations, &pending, strategy, 7));
        assert!(
            !first.placements.is_empty() && !first.unplaced.is_empty(),
            "the test cluster fills up"
        );

        let mut nodes_reversed = nodes.clone();
        nodes_reversed.reverse();
        let mut allocations_reversed = allocations.clone();
        allocations_reversed.reverse();
        let mut pending_reversed = pending.clone();
        pending_reversed.reverse();
        assert_eq!(
            first,
            schedule(
                &nodes_reversed,
                &allocations_reversed,
                &pending_reversed,
                strategy,
                7
            )
        );

        let other_seed = schedule(&nodes, &allocations, &pending, strategy, 8);
        assert_ne!(
            first.placements, other_seed.placements,
            "the seed drives sampling"
        );
    }
}

/// A number below `n` from `rng`, in whatever integer type the caller needs.
fn pick<T: TryFrom<usize>>(rng: &mut super::SplitMix64, n: usize) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(rng.below(n)).expect("small numbers fit")
}

/// A pseudo-random cluster for tests that need volume; `seed` picks it.
fn cluster(
    nodes: usize,
    allocations: usize,
    pending: usize,
    seed: u64,
) -> (Vec<NodeView>, Vec<Allocation>, Vec<VmRequest>) {
    let rng = &mut super::SplitMix64(seed);
    let zones = ["a", "b", "c"];
    let nodes: Vec<NodeView> = (0..nodes)
        .map(|i| {
            let mut n = labelled(
                node(
                    &format!("n{i}"),
                    4 + 4 * pick::<u32>(rng, 4),
                    4096 << pick::<u64>(rng, 3),
                ),
                &[("arch", "x86")],
            );
            n.labels.insert(
                "disk".into(),
                if pick::<u8>(rng, 2) == 0 {
                    "ssd"
                } else {
                    "hdd"
                }
                .into(),
            );
            n.zone = Some(zones[pick::<usize>(rng, 3)].to_owned());
            n.schedulable = pick::<u8>(rng, 20) != 0;
            n
        })
        .collect();
    let node_count = nodes.len();
    let allocations: Vec<Allocation> = (0..allocations)
        .map(|i| {
            let on = format!("n{}", pick::<usize>(rng, node_count));
            let resources = res(1 + pick::<u32>(rng, 2), 512 << pick::<u64>(rng, 2));
            let group = (pick::<u8>(rng, 3) == 0).then(|| format!("g{}", pick::<u8>(rng, 5)));
            Allocation {
                group,
                ..alloc(&format!("a{i}"), &on, resources, pick(rng, 1000))
            }
        })
        .collect();
    let constraints = ["disk=ssd", "zone in a,b", "zone!=c", "arch", "!gpu"];
    let pending: Vec<VmRequest> = (0..pending)
        .map(|i| {
            let mut request = vm(
                &format!("vm{i}"),
                1 + pick::<u32>(rng, 4),
                256 << pick::<u64>(rng, 5),
            );
            request.priority = pick(rng, 1001);
            if pick::<u8>(rng, 2) == 0 {
                request
                    .constraints
                    .push(constraints[pick::<usize>(rng, 5)].parse().unwrap());
            }
            if pick::<u8>(rng, 4) == 0 {
                let text = constraints[pick::<usize>(rng, 5)];
                let weight = pick::<i32>(rng, 201) - 100;
                request
                    .preferences
                    .push(format!("{text}:{weight}").parse().unwrap());
            }
            if pick::<u8>(rng, 4) == 0 {
                request.group = Some(format!("g{}", pick::<u8>(rng, 20)));
                request.spread_zones = pick::<u8>(rng, 2) == 0;
            }
            request
        })
        .collect();
    (nodes, allocations, pending)
}

// ---------------------------------------------------------------------------------------------
// Properties

fn arb_resources(max_vcpus: u32, max_memory: u64) -> impl Generator<Value = Resources> {
    (0..=max_vcpus, 0..=max_memory, 0..=max_memory).prop_map(|(vcpus, memory_mib, disk_mib)| {
        Resources {
            vcpus,
            memory_mib,
            disk_mib,
        }
    })
}

fn arb_constraint() -> impl Generator<Value = Constraint> {
    prop::sample::select(vec![
        "disk=ssd",
        "disk!=ssd",
        "zone in a,b",
        "zone=c",
        "gpu",
        "!gpu",
        "node.name=n1",
        "rack=r1",
    ])
    .prop_map(|text| text.parse().unwrap())
}

fn arb_node(index: usize) -> impl Generator<Value = NodeView> {
    (
        arb_resources(16, 16_384),
        prop::option::of(prop::sample::select(vec!["ssd", "hdd"])),
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        any::<bool>(),
        prop::bool::weighted(0.85),
    )
        .prop_map(move |(capacity, disk, zone, gpu, schedulable)| {
            let mut labels = BTreeMap::new();
            if let Some(disk) = disk {
                labels.insert("disk".to_owned(), disk.to_owned());
            }
            if gpu {
                labels.insert("gpu".to_owned(), "yes".to_owned());
            }
            NodeView {
                id: format!("{index:04x}"),
                name: format!("n{index}"),
                capacity,
                labels,
                zone: zone.map(str::to_owned),
                schedulable,
            }
        })
}

fn arb_group() -> impl Generator<Value = Option<String>> {
    prop::option::of(prop::sample::select(vec!["g1", "g2", "g3"]).prop_map(str::to_owned))
}

#[derive(Debug, Clone)]
struct Input {
    nodes: Vec<NodeView>,
    allocations: Vec<Allocation>,
    pending: Vec<VmRequest>,
    strategy: Strategy,
    seed: u64,
}

fn arb_input() -> impl Generator<Value = Input> {
    (1usize..10)
        .prop_flat_map(|n| {
            let nodes: Vec<_> = (0..n).map(arb_node).collect();
            let allocation = (0..n + 1, arb_resources(6, 6_000), 0u16..=1000, arb_group());
            let request = (
                arb_resources(8, 8_000),
                0u16..=1000,
                prop::collection::vec(arb_constraint(), 0..3),
                prop::collection::vec((arb_constraint(), -100i32..=100), 0..3),
                arb_group(),
                any::<bool>(),
            );
            (
                nodes,
                prop::collection::vec(allocation, 0..25),
                prop::collection::vec(request, 0..25),
                prop::bool::ANY.prop_map(|spread| {
                    if spread {
                        Strategy::Spread
                    } else {
                        Strategy::Binpack
                    }
                }),
                any::<u64>(),
            )
        })
        .prop_map(|(nodes, allocations, requests, strategy, seed)| Input {
            allocations: allocations
                .into_iter()
                .enumerate()
                .map(|(i, (node, resources, priority, group))| Allocation {
                    vm: format!("a{i}"),
                    // Index n names a node that does not exist.
                    node: format!("{node:04x}"),
                    resources,
                    priority,
                    group,
                })
                .collect(),
            pending: requests
                .into_iter()
                .enumerate()
                .map(
                    |(i, (resources, priority, constraints, preferences, group, spread_zones))| {
                        VmRequest {
                            name: format!("vm{i}"),
                            resources,
                            priority,
                            constraints,
                            preferences: preferences
                                .into_iter()
                                .map(|(constraint, weight)| Preference { constraint, weight })
                                .collect(),
                            group,
                            spread_zones,
                        }
                    },
                )
                .collect(),
            nodes,
            strategy,
            seed,
        })
}

/// A node's labels as constraints see them, built independently of the scheduler's interning.
fn visible_labels(node: &NodeView) -> BTreeMap<String, String> {
    let mut labels = node.labels.clone();
    if let Some(zone) = &node.zone {
        labels
            .entry("zone".to_owned())
            .or_insert_with(|| zone.clone());
    }
    labels.insert("node.name".to_owned(), node.name.clone());
    labels.insert("node.id".to_owned(), node.id.clone());
    labels
}

/// One VM on a node after the plan: (name, resources, group).
type Resident = (String, Resources, Option<String>);

fn check_plan(input: &Input, plan: &Plan) -> Result<(), TestCaseError> {
    let nodes: BTreeMap<&str, &NodeView> = input.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let requests: BTreeMap<&str, &VmRequest> =
        input.pending.iter().map(|r| (r.name.as_str(), r)).collect();

    // Every pending VM is decided exactly once.
    let mut decided: Vec<&str> = plan.placements.iter().map(|p| p.vm.as_str()).collect();
    decided.extend(plan.unplaced.iter().map(|u| u.vm.as_str()));
    decided.sort_unstable();
    let mut expected: Vec<&str> = requests.keys().copied().collect();
    expected.sort_unstable();
    prop_assert_eq!(decided, expected);

    // Evictions: existing, strictly lower priority, on the node the evicting VM lands on, once.
    let mut evicted = BTreeSet::new();
    for p in &plan.preemptions {
        let victim = input
            .allocations
            .iter()
            .find(|a| a.vm == p.victim)
            .expect("victim exists");
        prop_assert_eq!(&victim.node, &p.node);
        prop_assert!(nodes[p.node.as_str()].schedulable);
        prop_assert!(victim.priority < requests[p.by.as_str()].priority);
        prop_assert!(
            plan.placements
                .iter()
                .any(|pl| pl.vm == p.by && pl.node == p.node)
        );
        prop_assert!(
            evicted.insert(p.victim.as_str()),
            "{} evicted twice",
            p.victim
        );
    }

    let mut residents: BTreeMap<&str, Vec<Resident>> = BTreeMap::new();
    for a in input
        .allocations
        .iter()
        .filter(|a| !evicted.contains(a.vm.as_str()))
    {
        residents.entry(a.node.as_str()).or_default().push((
            a.vm.clone(),
            a.resources,
            a.group.clone(),
        ));
    }
    for p in &plan.placements {
        let r = requests[p.vm.as_str()];
        residents.entry(p.node.as_str()).or_default().push((
            r.name.clone(),
            r.resources,
            r.group.clone(),
        ));
    }

    for p in &plan.placements {
        let node = nodes.get(p.node.as_str()).expect("placed on a known node");
        prop_assert!(
            node.schedulable,
            "{} placed on unschedulable {}",
            p.vm,
            node.name
        );
        let r = requests[p.vm.as_str()];
        let labels = visible_labels(node);
        for c in &r.constraints {
            prop_assert!(c.matches(&labels), "{} on {} breaks {}", p.vm, node.name, c);
        }
        let here = &residents[p.node.as_str()];
        let total = here.iter().fold([0u64; 3], |t, (_, res, _)| {
            [
                t[0] + u64::from(res.vcpus),
                t[1] + res.memory_mib,
                t[2] + res.disk_mib,
            ]
        });
        let cap = node.capacity;
        prop_assert!(
            total[0] <= u64::from(cap.vcpus)
                && total[1] <= cap.memory_mib
                && total[2] <= cap.disk_mib,
            "{} over-committed: {:?} > {:?}",
            node.name,
            total,
            cap
        );
        if let Some(group) = &r.group {
            let same = here
                .iter()
                .filter(|(_, _, g)| g.as_ref() == Some(group))
                .count();
            prop_assert_eq!(same, 1, "group {} twice on {}", group, node.name);
        }
    }

    // Without evictions free room only shrinks, so a VM left pending fits nowhere at the end.
    if plan.preemptions.is_empty() {
        for u in &plan.unplaced {
            let r = requests[u.vm.as_str()];
            for node in input.nodes.iter().filter(|n| n.schedulable) {
                let labels = visible_labels(node);
                let here = residents
                    .get(node.id.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let used = here.iter().fold([0u64; 3], |t, (_, res, _)| {
                    [
                        t[0] + u64::from(res.vcpus),
                        t[1] + res.memory_mib,
                        t[2] + res.disk_mib,
                    ]
                });
                let room = used[0] + u64::from(r.resources.vcpus) <= u64::from(node.capacity.vcpus)
                    && used[1] + r.resources.memory_mib <= node.capacity.memory_mib
                    && used[2] + r.resources.disk_mib <= node.capacity.disk_mib;
                let allowed = r.constraints.iter().all(|c| c.matches(&labels))
                    && r.group
                        .as_ref()
                        .is_none_or(|g| here.iter().all(|(_, _, h)| h.as_ref() != Some(g)));
                prop_assert!(
                    !(room && allowed),
                    "{} left pending ({}) but fits {}",
                    u.vm,
                    u.reason,
                    node.name
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plans_are_sound(input in arb_input()) {
        let plan = schedule(&input.nodes, &input.allocations, &input.pending, input.strategy, input.seed);
        check_plan(&input, &plan)?;
        let again = schedule(&input.nodes, &input.allocations, &input.pending, input.strategy, input.seed);
        prop_assert_eq!(&plan, &again);
        let mut shuffled = input.clone();
        shuffled.nodes.reverse();
        shuffled.allocations.reverse();
        let reordered = schedule(&shuffled.nodes, &shuffled.allocations, &shuffled.pending, input.strategy, input.seed);
        prop_assert_eq!(&plan, &reordered);
    }
}
