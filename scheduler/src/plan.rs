//! One scheduling pass: pending VMs in, a [`Plan`] out.
//!
//! ```text
//!  pending VMs, highest priority first, then by name
//!      │
//!      ▼
//!  sampled scan: visit schedulable nodes in a seeded order (random start, random stride
//!      │         coprime to their count); stop after K feasible ones; K = max(2, ⌈log2 n⌉)
//!      ├── some feasible ──▶ best score (ties: lowest node id) ──▶ Placement
//!      │
//!      ▼  none feasible after every node was visited
//!  full pass over every node: count why nodes fail, and price evictions of lower-priority VMs
//!      ├── a node frees enough ──▶ Preemption × victims, then Placement
//!      │
//!      ▼
//!  Unplaced { reason }
//! ```
//!
//! Every decision updates free resources and group membership, so later VMs in the same pass
//! see it. Labels, zones and groups are interned into integer ids once per call so the scan
//! compares integers, and the scan allocates nothing. Nodes are handled in id order whatever
//! the order of the input, and the only randomness is a splitmix64 stream seeded by `seed`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{
    Allocation, NodeView, Op, Placement, Plan, Preemption, Resources, Strategy, Unplaced, VmRequest,
};

/// Feasible nodes scored for a VM with preferences or zone spread.
const PREFERENCE_SAMPLE: usize = 64;

/// Score units: the whole utilisation range of a node, empty to full, is worth this much.
/// A preference of weight 100 is worth as much, and so is one more VM of the group in a zone.
const SCALE: i64 = 1_000_000;
/// An interned id that names nothing: a key or value no node carries, or no group.
const NONE: u32 = u32::MAX;
/// Resource dimensions, in the order of the `[u64; 3]` arrays.
const VCPUS: usize = 0;
const MEMORY: usize = 1;
const DISK: usize = 2;

/// Places `pending` VMs on `nodes`, given the `allocations` that already hold resources.
///
/// Pure and deterministic: the same inputs and `seed` give the same [`Plan`], whatever the
/// order of `nodes` and `allocations`. A node whose id appears twice counts once (its first
/// occurrence). Allocations on nodes not in `nodes` are ignored. Evicted VMs are not placed
/// again in this pass; the next pass sees them pending.
pub fn schedule(
    nodes: &[NodeView],
    allocations: &[Allocation],
    pending: &[VmRequest],
    strategy: Strategy,
    seed: u64,
) -> Plan {
    let mut pass = Pass::new(nodes, allocations, pending);
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&pending[a], &pending[b]);
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });

    let mut plan = Plan::default();
    let mut vm = Compiled::default();
    // VMs left pending since the last eviction, by signature, with their index in
    // `plan.unplaced`. Until something is evicted, room and group members only grow scarcer,
    // so a later VM with the same signature (and, coming later, no higher priority) fits
    // nowhere and can evict nothing either: it gets the same reason without another look at
    // every node. This keeps a full cluster with a long queue from costing two passes over
    // every node per pending VM.
    let mut pending_since_eviction: BTreeMap<Vec<u64>, (usize, &VmRequest)> = BTreeMap::new();
    for index in order {
        let request = &pending[index];
        pass.compile(request, &mut vm);
        if let Some(&(earlier, like)) = pending_since_eviction.get(vm.signature.as_slice()) {
            // Values no node carries intern alike; the reason quotes the constraints as written.
            if like.constraints == request.constraints {
                let reason = plan.unplaced[earlier].reason.clone();
                plan.unplaced.push(Unplaced {
                    vm: request.name.clone(),
                    reason,
                });
                continue;
            }
        }
        if let Some(node) = pass.sample(&vm, strategy, &mut rng) {
            pass.place(node, &vm);
            plan.placements.push(Placement {
                vm: request.name.clone(),
                node: pass.nodes[node].id.clone(),
            });
            continue;
        }
        let diagnosis = pass.diagnose(&vm);
        match diagnosis.preemption {
            Some(choice) => {
                pass.preempt(choice.node, request, &vm, &mut plan);
                pending_since_eviction.clear();
            }
            None => {
                let reason = pass.reason(request, &vm, &diagnosis);
                pending_since_eviction.insert(vm.signature.clone(), (plan.unplaced.len(), request));
                plan.unplaced.push(Unplaced {
                    vm: request.name.clone(),
                    reason,
                });
            }
        }
    }
    plan
}

/// The seeded pseudo-random stream (splitmix64): the pass's only source of randomness.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`, for `n > 0`.
    fn below(&mut self, n: usize) -> usize {
        let wide = (u128::from(self.next()) * n as u128) >> 64;
        usize::try_from(wide).expect("below n, so it fits in usize")
    }
}

/// Converts a count to an interned id.
fn id32(n: usize) -> u32 {
    u32::try_from(n).expect("fewer than 2^32 - 1 distinct names in one pass")
}

fn greatest_common_divisor(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn dims(r: &Resources) -> [u64; 3] {
    [u64::from(r.vcpus), r.memory_mib, r.disk_mib]
}

/// `used / cap` in [`SCALE`] units; a dimension with no capacity counts as full.
fn utilisation(used: u64, cap: u64) -> i64 {
    if cap == 0 {
        return SCALE;
    }
    let ratio = match used.checked_mul(SCALE as u64) {
        Some(scaled) => u128::from(scaled / cap),
        None => u128::from(used) * SCALE as u128 / u128::from(cap),
    };
    i64::try_from(ratio.min(SCALE as u128)).unwrap_or(SCALE)
}

/// How a compiled constraint tests the interned value of its key.
#[derive(Clone, Copy, Debug)]
enum Test {
    Eq(u32),
    Ne(u32),
    /// A range of `Compiled::in_values`.
    In(u32, u32),
    Exists,
    NotExists,
}

/// A constraint with its key and values interned.
#[derive(Clone, Copy, Debug)]
struct Check {
    key: u32,
    test: Test,
}

impl Check {
    #[inline]
    fn holds(&self, labels: &[(u32, u32)], in_values: &[u32]) -> bool {
        // Nodes carry a handful of labels: a linear walk of the sorted list beats a binary
        // search until there are dozens.
        let value = if labels.len() <= 16 {
            labels
                .iter()
                .take_while(|&&(k, _)| k <= self.key)
                .find(|&&(k, _)| k == self.key)
                .map(|&(_, v)| v)
        } else {
            labels
                .binary_search_by_key(&self.key, |&(k, _)| k)
                .ok()
                .map(|i| labels[i].1)
        };
        match self.test {
            Test::Eq(want) => value == Some(want),
            Test::Ne(want) => value != Some(want),
            Test::In(start, end) => {
                value.is_some_and(|v| in_values[start as usize..end as usize].contains(&v))
            }
            Test::Exists => value.is_some(),
            Test::NotExists => value.is_none(),
        }
    }
}

/// One pending VM, interned against the pass. Reused from VM to VM to avoid allocating.
#[derive(Default)]
struct Compiled {
    need: [u64; 3],
    priority: u16,
    group: u32,
    spread_zones: bool,
    constraints: Vec<Check>,
    /// Preference checks with their weight in score units.
    preferences: Vec<(Check, i64)>,
    in_values: Vec<u32>,
    /// What decides whether the VM fits anywhere: its needs, group and hard constraints.
    signature: Vec<u64>,
}

/// What the full pass over the nodes found for a VM that fits nowhere as things stand.
#[derive(Default)]
struct Diagnosis {
    /// Schedulable nodes.
    checked: usize,
    /// Nodes where every hard constraint holds.
    satisfying: usize,
    /// Satisfying nodes that have room, whatever their groups.
    satisfying_with_room: usize,
    /// Satisfying nodes without a VM of the group: the only ones preemption may use.
    eligible: usize,
    /// Per dimension, the largest free amount on an eligible node, and that node.
    largest_free: [Option<(u64, usize)>; 3],
    /// The eligible node short in the fewest dimensions (ties: lowest id).
    closest: Option<(usize, usize)>,
    preemption: Option<PreemptionChoice>,
}

/// The cheapest set of evictions found, compared in field order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PreemptionChoice {
    victims: usize,
    highest_priority: u16,
    priority_sum: u64,
    node: usize,
}

/// A node's capacity and what is allocated on it, side by side so a check touches one place.
/// `used` may exceed `cap` when the input over-commits a node; such a node takes nothing.
#[derive(Clone, Copy, Debug)]
struct Room {
    cap: [u64; 3],
    used: [u64; 3],
}

impl Room {
    #[inline]
    fn fits_after_freeing(&self, need: &[u64; 3], freed: &[u64; 3]) -> bool {
        (0..3).all(|d| {
            self.used[d]
                .saturating_sub(freed[d])
                .saturating_add(need[d])
                <= self.cap[d]
        })
    }

    fn free(&self) -> [u64; 3] {
        std::array::from_fn(|d| self.cap[d].saturating_sub(self.used[d]))
    }

    fn add(&mut self, amount: [u64; 3]) {
        for (used, amount) in self.used.iter_mut().zip(amount) {
            *used = used.saturating_add(amount);
        }
    }

    fn remove(&mut self, amount: [u64; 3]) {
        for (used, amount) in self.used.iter_mut().zip(amount) {
            *used = used.saturating_sub(amount);
        }
    }
}

/// The bit standing for `group` in a node's group mask.
fn group_bit(group: u32) -> u64 {
    1 << (group % 64)
}

/// An allocation as preemption sees it, stored with its node's other allocations.
#[derive(Clone, Copy, Debug)]
struct Victim {
    allocation: u32,
    priority: u16,
    evicted: bool,
    resources: [u64; 3],
}

/// The mutable state of one pass: nodes in id order and what each holds.
struct Pass<'a> {
    nodes: Vec<&'a NodeView>,
    allocations: &'a [Allocation],
    room: Vec<Room>,
    zone: Vec<u32>,
    /// Per node, `labels[label_start[i]..label_start[i + 1]]`: (key, value) ids sorted by key.
    label_start: Vec<u32>,
    labels: Vec<(u32, u32)>,
    /// Per node, (group, VM count) sorted by group.
    node_groups: Vec<Vec<(u32, u32)>>,
    /// Per node, bit `group % 64` set for each group in `node_groups`: most nodes run none
    /// of a VM's group, and this answers so without leaving the array.
    group_mask: Vec<u64>,
    /// Per group, (zone, VM count) sorted by zone, over every node.
    zone_groups: Vec<Vec<(u32, u32)>>,
    /// Per schedulable node, `victims[victim_start[i]..victim_start[i + 1]]`: its allocations
    /// in eviction order (lowest priority, then largest, then name).
    victim_start: Vec<u32>,
    victims: Vec<Victim>,
    /// Per allocation, its group (or `NONE`).
    alloc_group: Vec<u32>,
    /// Schedulable nodes, in id order.
    schedulable: Vec<u32>,
    /// Strides coprime to `schedulable.len()`, so a stride walk visits every node once.
    strides: Vec<u32>,
    /// How many feasible nodes the sampled scan looks for.
    sample_size: usize,
    keys: BTreeMap<&'a str, u32>,
    values: BTreeMap<&'a str, u32>,
    groups: BTreeMap<&'a str, u32>,
    /// Per constraint of the VM being diagnosed, on how many nodes it failed.
    failures: Vec<usize>,
}

impl<'a> Pass<'a> {
    fn new(nodes: &'a [NodeView], allocations: &'a [Allocation], pending: &'a [VmRequest]) -> Self {
        let mut sorted: Vec<&NodeView> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|later, earlier| later.id == earlier.id);
        let nodes = sorted;
        let n = nodes.len();

        let mut keys = BTreeMap::new();
        let mut values = BTreeMap::new();
        let mut zones: BTreeMap<Option<&str>, u32> = BTreeMap::new();
        let mut label_start = Vec::with_capacity(n + 1);
        let mut labels = Vec::new();
        let mut zone = Vec::with_capacity(n);
        for node in &nodes {
            let start = labels.len();
            label_start.push(id32(start));
            let mut intern = |key: &'a str, value: &'a str| {
                let next = id32(keys.len());
                let k = *keys.entry(key).or_insert(next);
                let next = id32(values.len());
                let v = *values.entry(value).or_insert(next);
                labels.push((k, v));
            };
            // Pseudo-labels: the node's own name and id win over labels of the same key.
            for (key, value) in &node.labels {
                if key != "node.name" && key != "node.id" {
                    intern(key, value);
                }
            }
            if let Some(z) = node
                .zone
                .as_deref()
                .filter(|_| !node.labels.contains_key("zone"))
            {
                intern("zone", z);
            }
            intern("node.name", &node.name);
            intern("node.id", &node.id);
            labels[start..].sort_unstable();
            let next = id32(zones.len());
            zone.push(*zones.entry(node.zone.as_deref()).or_insert(next));
        }
        label_start.push(id32(labels.len()));

        let mut groups = BTreeMap::new();
        let group_names = allocations.iter().filter_map(|a| a.group.as_deref());
        for name in group_names.chain(pending.iter().filter_map(|p| p.group.as_deref())) {
            let next = id32(groups.len());
            groups.entry(name).or_insert(next);
        }

        let mut room: Vec<Room> = nodes
            .iter()
            .map(|node| Room {
                cap: dims(&node.capacity),
                used: [0; 3],
            })
            .collect();
        let mut node_groups = vec![Vec::new(); n];
        let mut group_mask = vec![0u64; n];
        let mut zone_groups = vec![Vec::new(); groups.len()];
        let mut alloc_node = Vec::with_capacity(allocations.len());
        let mut alloc_group = Vec::with_capacity(allocations.len());
        let mut victim_count = vec![0u32; n + 1];
        for alloc in allocations {
            let node = nodes
                .binary_search_by(|node| node.id.as_str().cmp(&alloc.node))
                .ok();
            let group = alloc.group.as_deref().map_or(NONE, |g| groups[g]);
            alloc_node.push(node.map_or(NONE, id32));
            alloc_group.push(group);
            let Some(node) = node else { continue };
            room[node].add(dims(&alloc.resources));
            if group != NONE {
                bump(&mut node_groups[node], group, 1);
                group_mask[node] |= group_bit(group);
                bump(&mut zone_groups[group as usize], zone[node], 1);
            }
            if nodes[node].schedulable {
                victim_count[node + 1] += 1;
            }
        }
        let mut victim_start = victim_count;
        for i in 0..n {
            victim_start[i + 1] += victim_start[i];
        }
        let unset = Victim {
            allocation: NONE,
            priority: 0,
            evicted: false,
            resources: [0; 3],
        };
        let mut victims = vec![unset; victim_start[n] as usize];
        let mut fill: Vec<u32> = victim_start[..n].to_vec();
        for (index, &node) in alloc_node.iter().enumerate() {
            if node != NONE && nodes[node as usize].schedulable {
                let alloc = &allocations[index];
                victims[fill[node as usize] as usize] = Victim {
                    allocation: id32(index),
                    priority: alloc.priority,
                    evicted: false,
                    resources: dims(&alloc.resources),
                };
                fill[node as usize] += 1;
            }
        }
        for i in 0..n {
            victims[victim_start[i] as usize..victim_start[i + 1] as usize].sort_by(|a, b| {
                let (x, y) = (
                    &allocations[a.allocation as usize],
                    &allocations[b.allocation as usize],
                );
                x.priority
                    .cmp(&y.priority)
                    .then_with(|| y.resources.cmp(&x.resources))
                    .then_with(|| x.vm.cmp(&y.vm))
                    .then_with(|| a.allocation.cmp(&b.allocation))
            });
        }

        let schedulable: Vec<u32> = (0..n).filter(|&i| nodes[i].schedulable).map(id32).collect();
        let count = schedulable.len();
        let strides = if count <= 1 {
            vec![1]
        } else {
            (1..count)
                .filter(|&s| greatest_common_divisor(s, count) == 1)
                .map(id32)
                .collect()
        };
        let sample_size = (usize::BITS - count.saturating_sub(1).leading_zeros()).max(2) as usize;

        Self {
            nodes,
            allocations,
            room,
            zone,
            label_start,
            labels,
            node_groups,
            group_mask,
            zone_groups,
            victim_start,
            victims,
            alloc_group,
            schedulable,
            strides,
            sample_size,
            keys,
            values,
            groups,
            failures: Vec::new(),
        }
    }

    fn node_labels(&self, node: usize) -> &[(u32, u32)] {
        &self.labels[self.label_start[node] as usize..self.label_start[node + 1] as usize]
    }

    /// Interns `request` into `vm`, reusing its buffers.
    fn compile(&self, request: &VmRequest, vm: &mut Compiled) {
        vm.need = dims(&request.resources);
        vm.priority = request.priority;
        vm.group = request.group.as_deref().map_or(NONE, |g| self.groups[g]);
        vm.spread_zones = request.spread_zones;
        vm.constraints.clear();
        vm.preferences.clear();
        vm.in_values.clear();
        vm.signature.clear();
        vm.signature.extend(vm.need);
        vm.signature.push(u64::from(vm.group));
        vm.signature.push(request.constraints.len() as u64);
        for constraint in &request.constraints {
            let check = self.check(constraint, &mut vm.in_values);
            let (tag, a, b) = match check.test {
                Test::Eq(v) => (0, v, 0),
                Test::Ne(v) => (1, v, 0),
                Test::In(start, end) => (2, start, end),
                Test::Exists => (3, 0, 0),
                Test::NotExists => (4, 0, 0),
            };
            vm.signature
                .extend([u64::from(check.key), tag, u64::from(a), u64::from(b)]);
            vm.constraints.push(check);
        }
        // `In` ranges point into `in_values`, which holds only constraint values so far.
        vm.signature
            .extend(vm.in_values.iter().map(|&v| u64::from(v)));
        for preference in &request.preferences {
            let check = self.check(&preference.constraint, &mut vm.in_values);
            vm.preferences.push((
                check,
                i64::from(preference.weight.clamp(-100, 100)) * SCALE / 100,
            ));
        }
    }

    fn check(&self, constraint: &crate::Constraint, in_values: &mut Vec<u32>) -> Check {
        let value = |v: &str| self.values.get(v).copied().unwrap_or(NONE);
        let test = match &constraint.op {
            Op::Eq(v) => Test::Eq(value(v)),
            Op::Ne(v) => Test::Ne(value(v)),
            Op::In(vs) => {
                let start = id32(in_values.len());
                in_values.extend(vs.iter().map(|v| value(v)).filter(|&v| v != NONE));
                Test::In(start, id32(in_values.len()))
            }
            Op::Exists => Test::Exists,
            Op::NotExists => Test::NotExists,
        };
        Check {
            key: self
                .keys
                .get(constraint.key.as_str())
                .copied()
                .unwrap_or(NONE),
            test,
        }
    }

    fn has_room(&self, node: usize, need: &[u64; 3]) -> bool {
        self.room[node].fits_after_freeing(need, &[0; 3])
    }

    fn satisfies(&self, node: usize, vm: &Compiled) -> bool {
        let labels = self.node_labels(node);
        vm.constraints
            .iter()
            .all(|c| c.holds(labels, &vm.in_values))
    }

    fn runs_group(&self, node: usize, group: u32) -> bool {
        group != NONE
            && self.group_mask[node] & group_bit(group) != 0
            && self.node_groups[node]
                .binary_search_by_key(&group, |&(g, _)| g)
                .is_ok()
    }

    fn score(&self, node: usize, vm: &Compiled, strategy: Strategy) -> i64 {
        let Room { cap, used } = &self.room[node];
        let after = |d: usize| utilisation(used[d].saturating_add(vm.need[d]), cap[d]);
        let fullness = (after(VCPUS) + after(MEMORY)) / 2;
        let mut score = match strategy {
            Strategy::Binpack => fullness,
            Strategy::Spread => SCALE - fullness,
        };
        if !vm.preferences.is_empty() {
            let labels = self.node_labels(node);
            for (check, weight) in &vm.preferences {
                if check.holds(labels, &vm.in_values) {
                    score += weight;
                }
            }
        }
        if vm.spread_zones && vm.group != NONE {
            let in_zone = count(&self.zone_groups[vm.group as usize], self.zone[node]);
            score -= i64::from(in_zone) * SCALE;
        }
        score
    }

    /// The best of up to `sample_size` feasible nodes, visited in a seeded order; every node
    /// is visited before giving up. A VM with preferences or zone spread scores a wider sample
    /// ([`PREFERENCE_SAMPLE`] feasible nodes): in clusters up to that size it sees every node, so
    /// a small cluster never misses the node it prefers; beyond it, preferences that match a
    /// fair share of nodes (a zone, a disk type) are still found, at a bounded cost.
    fn sample(&self, vm: &Compiled, strategy: Strategy, rng: &mut SplitMix64) -> Option<usize> {
        let n = self.schedulable.len();
        if n == 0 {
            return None;
        }
        let limit = if vm.preferences.is_empty() && !vm.spread_zones {
            self.sample_size
        } else {
            self.sample_size.max(PREFERENCE_SAMPLE)
        };
        let mut position = rng.below(n);
        let stride = self.strides[rng.below(self.strides.len())] as usize;
        let mut best: Option<(i64, usize)> = None;
        let mut found = 0;
        for _ in 0..n {
            let node = self.schedulable[position] as usize;
            position += stride;
            if position >= n {
                position -= n;
            }
            if !self.has_room(node, &vm.need)
                || !self.satisfies(node, vm)
                || self.runs_group(node, vm.group)
            {
                continue;
            }
            let score = self.score(node, vm, strategy);
            if best.is_none_or(|(s, b)| score > s || (score == s && node < b)) {
                best = Some((score, node));
            }
            found += 1;
            if found >= limit {
                break;
            }
        }
        best.map(|(_, node)| node)
    }

    fn place(&mut self, node: usize, vm: &Compiled) {
        self.room[node].add(vm.need);
        if vm.group != NONE {
            bump(&mut self.node_groups[node], vm.group, 1);
            self.group_mask[node] |= group_bit(vm.group);
            bump(&mut self.zone_groups[vm.group as usize], self.zone[node], 1);
        }
    }

    /// Visits every schedulable node to learn why `vm` fits nowhere, and prices evicting
    /// lower-priority VMs on each node where only room is missing.
    fn diagnose(&mut self, vm: &Compiled) -> Diagnosis {
        let mut failures = std::mem::take(&mut self.failures);
        failures.clear();
        failures.resize(vm.constraints.len(), 0);
        let mut diagnosis = Diagnosis::default();
        for &node in &self.schedulable {
            let node = node as usize;
            diagnosis.checked += 1;
            let labels = self.node_labels(node);
            let mut satisfied = true;
            for (check, failed) in vm.constraints.iter().zip(failures.iter_mut()) {
                if !check.holds(labels, &vm.in_values) {
                    *failed += 1;
                    satisfied = false;
                }
            }
            if !satisfied {
                continue;
            }
            diagnosis.satisfying += 1;
            let room = self.has_room(node, &vm.need);
            if room {
                diagnosis.satisfying_with_room += 1;
            }
            if self.runs_group(node, vm.group) {
                continue;
            }
            diagnosis.eligible += 1;
            debug_assert!(!room, "the sampled scan visits every node before giving up");
            let free = self.room[node].free();
            for (d, largest) in diagnosis.largest_free.iter_mut().enumerate() {
                if largest.is_none_or(|(amount, _)| free[d] > amount) {
                    *largest = Some((free[d], node));
                }
            }
            let short = (0..3).filter(|&d| free[d] < vm.need[d]).count();
            if diagnosis.closest.is_none_or(|(fewest, _)| short < fewest) {
                diagnosis.closest = Some((short, node));
            }
            if let Some(choice) = self.price_evictions(node, vm, diagnosis.preemption) {
                diagnosis.preemption = Some(choice);
            }
        }
        self.failures = failures;
        diagnosis
    }

    /// Walks `node`'s lower-priority VMs in eviction order until `vm` fits; returns the cost
    /// if it beats `best`.
    fn price_evictions(
        &self,
        node: usize,
        vm: &Compiled,
        best: Option<PreemptionChoice>,
    ) -> Option<PreemptionChoice> {
        let mut freed = [0u64; 3];
        let mut choice = PreemptionChoice {
            victims: 0,
            highest_priority: 0,
            priority_sum: 0,
            node,
        };
        for victim in self.node_victims(node) {
            if victim.priority >= vm.priority {
                return None;
            }
            if victim.evicted {
                continue;
            }
            choice.victims += 1;
            if best.is_some_and(|b| choice.victims > b.victims) {
                return None;
            }
            choice.highest_priority = victim.priority;
            choice.priority_sum += u64::from(victim.priority);
            for (total, amount) in freed.iter_mut().zip(victim.resources) {
                *total = total.saturating_add(amount);
            }
            if self.room[node].fits_after_freeing(&vm.need, &freed) {
                return best.is_none_or(|b| choice < b).then_some(choice);
            }
        }
        None
    }

    fn node_victims(&self, node: usize) -> &[Victim] {
        &self.victims[self.victim_start[node] as usize..self.victim_start[node + 1] as usize]
    }

    /// Evicts on `node` exactly what [`Self::price_evictions`] priced, then places `request`.
    fn preempt(&mut self, node: usize, request: &VmRequest, vm: &Compiled, plan: &mut Plan) {
        let node_id = &self.nodes[node].id;
        let start = self.victim_start[node] as usize;
        let end = self.victim_start[node + 1] as usize;
        for slot in start..end {
            if self.has_room(node, &vm.need) {
                break;
            }
            let victim = &mut self.victims[slot];
            if victim.evicted {
                continue;
            }
            debug_assert!(victim.priority < vm.priority);
            victim.evicted = true;
            let index = victim.allocation as usize;
            let resources = victim.resources;
            self.room[node].remove(resources);
            let alloc = &self.allocations[index];
            let group = self.alloc_group[index];
            if group != NONE {
                bump(&mut self.node_groups[node], group, -1);
                self.group_mask[node] = self.node_groups[node]
                    .iter()
                    .fold(0, |mask, &(g, _)| mask | group_bit(g));
                bump(&mut self.zone_groups[group as usize], self.zone[node], -1);
            }
            plan.preemptions.push(Preemption {
                victim: alloc.vm.clone(),
                node: node_id.clone(),
                by: request.name.clone(),
            });
        }
        debug_assert!(self.has_room(node, &vm.need));
        self.place(node, vm);
        plan.placements.push(Placement {
            vm: request.name.clone(),
            node: node_id.clone(),
        });
    }

    /// Why `request` stays pending, in words a user can act on.
    fn reason(&self, request: &VmRequest, vm: &Compiled, diagnosis: &Diagnosis) -> String {
        let checked = diagnosis.checked;
        let nodes_word = if checked == 1 { "node" } else { "nodes" };
        if checked == 0 {
            return "no schedulable node".to_owned();
        }
        if diagnosis.satisfying == 0 {
            // Name the first constraint no node satisfies; failing that, all of them.
            return match self.failures.iter().position(|&f| f == checked) {
                Some(i) => format!(
                    "no node satisfies {} (checked {checked} {nodes_word})",
                    request.constraints[i]
                ),
                None => {
                    let all: Vec<String> = request
                        .constraints
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    format!(
                        "no node satisfies {} together (checked {checked} {nodes_word})",
                        all.join(", ")
                    )
                }
            };
        }
        let group = request.group.as_deref().unwrap_or_default();
        if diagnosis.satisfying_with_room > 0 {
            return format!("every node that fits already runs a VM of group {group}");
        }
        if diagnosis.eligible == 0 {
            return if request.constraints.is_empty() {
                format!("every schedulable node already runs a VM of group {group}")
            } else {
                format!(
                    "every node that satisfies its constraints already runs a VM of group {group}"
                )
            };
        }
        let amount = |d: usize, value: u64| match d {
            VCPUS if value == 1 => "1 vcpu".to_owned(),
            VCPUS => format!("{value} vcpus"),
            MEMORY => format!("{value} MiB memory"),
            _ => format!("{value} MiB disk"),
        };
        for d in [MEMORY, VCPUS, DISK] {
            if let Some((largest, node)) =
                diagnosis.largest_free[d].filter(|&(free, _)| free < vm.need[d])
            {
                let unit = match (d, largest) {
                    (VCPUS, 1) => "vcpu",
                    (VCPUS, _) => "vcpus",
                    _ => "MiB",
                };
                return format!(
                    "needs {}; the largest free is {largest} {unit} on {}",
                    amount(d, vm.need[d]),
                    self.nodes[node].name
                );
            }
        }
        // Every dimension is free somewhere, but never all on one node.
        let mut text = format!(
            "needs {}, {} and {} on one node; none has all three free",
            amount(VCPUS, vm.need[VCPUS]),
            amount(MEMORY, vm.need[MEMORY]),
            amount(DISK, vm.need[DISK])
        );
        if let Some((_, node)) = diagnosis.closest {
            let free = self.room[node].free();
            let _ = write!(
                text,
                " (closest: {} with {}, {} and {})",
                self.nodes[node].name,
                amount(VCPUS, free[VCPUS]),
                amount(MEMORY, free[MEMORY]),
                amount(DISK, free[DISK])
            );
        }
        text
    }
}

/// Adds `delta` to the count of `key` in a sorted (key, count) list, dropping it at zero.
fn bump(list: &mut Vec<(u32, u32)>, key: u32, delta: i32) {
    match list.binary_search_by_key(&key, |&(k, _)| k) {
        Ok(i) => {
            list[i].1 = list[i].1.saturating_add_signed(delta);
            if list[i].1 == 0 {
                list.remove(i);
            }
        }
        Err(i) if delta > 0 => list.insert(i, (key, delta.unsigned_abs())),
        Err(_) => {}
    }
}

/// The count of `key` in a sorted (key, count) list.
fn count(list: &[(u32, u32)], key: u32) -> u32 {
    list.binary_search_by_key(&key, |&(k, _)| k)
        .map_or(0, |i| list[i].1)
}

#[cfg(test)]
#[path = "plan_test.rs"]
mod tests;
