//! Linearizability checker for key-value histories recorded by simulated clients.
//!
//! [`check`] decides whether a concurrent history of `Put`, `Get` and `Delete` operations could
//! have come from one register per key, every key initially absent, with each operation taking
//! effect atomically at a single point between its call and its return. Keys are checked
//! independently (a key-value store is linearizable exactly when every key's sub-history is).
//! The search is Wing & Gong's backtracking, as refined by Lowe and used by porcupine: a linked
//! list of call and return events, operations lifted out of the list once linearized, and a
//! cache of (set of linearized operations, register state) already explored. Two reductions
//! that are exact for a register keep failing searches small: a pending read of the current
//! state is linearized at once with no alternative tried, and an unknown-outcome write is only
//! tried right before a pending read of its value (unknown writes of one value being
//! interchangeable, they are taken in call order). The search stops, with an unknown verdict,
//! after a given number of steps; the cache grows with it (up to some 25 bytes a step).
//!
//! Unknown outcomes: an operation whose `ret` is `None` was called but never answered, or was
//! answered with an error that does not say whether it happened (a timeout, a leader change).
//! A `Get` with an unknown outcome constrains nothing and is dropped. A `Put` or `Delete` with
//! an unknown outcome may have taken effect once, at any point after its call (with no upper
//! bound), or never: the history is accepted if every operation with a known outcome can be
//! linearized, whether or not the unknown ones are. Operations refused outright (known not to
//! have happened) must be left out of the history by the caller.
//!
//! Time ties: when one operation's call and another's return carry the same timestamp, the two
//! are taken as concurrent. A return stamped before its own call is read as equal to the call.

use std::collections::{BTreeMap, BTreeSet};

/// A step budget that is ample for histories of a few thousand operations per key.
pub const DEFAULT_STEP_BUDGET: u64 = 5_000_000;

/// An operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Set the key to this value.
    Put(Vec<u8>),
    /// Read the key.
    Get,
    /// Remove the key.
    Delete,
}

/// What an operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvResult {
    /// The write (`Put` or `Delete`) was applied.
    Ok,
    /// What a `Get` read: `None` when the key was absent.
    Value(Option<Vec<u8>>),
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The client that issued it.
    pub client: u64,
    /// The key it touched.
    pub key: String,
    /// What it did.
    pub op: KvOp,
    /// When it was called, in virtual nanoseconds.
    pub call: u64,
    /// When it returned and what it returned; `None` when the outcome is unknown. A result of
    /// the wrong shape (`Value` for a write, `Ok` for a `Get`) can never be linearized.
    pub ret: Option<(u64, KvResult)>,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's history is linearizable.
    Linearizable,
    /// This key's history is not linearizable (the first such key, in key order).
    NotLinearizable {
        /// The key.
        key: String,
        /// Indexes into the checked history of all the operations on that key, ascending.
        ops: Vec<usize>,
    },
    /// The step budget ran out on this key (the first such key, in key order) before its
    /// history was settled, and no key was found not linearizable.
    Unknown {
        /// The key.
        key: String,
    },
}

/// Checks `history` for linearizability against a key-value register model, key by key.
///
/// `step_budget` bounds the search of each key (one step is one visit of an event in the
/// search); a key that needs more gives [`Verdict::Unknown`]. Every key is checked, so a key
/// that is not linearizable is reported even when an earlier key ran out of budget.
pub fn check(history: &[Operation], step_budget: u64) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        by_key
            .entry(operation.key.as_str())
            .or_default()
            .push(index);
    }
    let mut out_of_budget = None;
    for (key, indexes) in by_key {
        match check_key(history, &indexes, step_budget) {
            Outcome::Linearizable => {}
            Outcome::NotLinearizable => {
                return Verdict::NotLinearizable {
                    key: key.to_owned(),
                    ops: indexes,
                };
            }
            Outcome::OutOfBudget => {
                if out_of_budget.is_none() {
                    out_of_budget = Some(key.to_owned());
                }
            }
        }
    }
    match out_of_budget {
        Some(key) => Verdict::Unknown { key },
        None => Verdict::Linearizable,
    }
}

/// The result for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Linearizable,
    NotLinearizable,
    OutOfBudget,
}

/// The register state: [`ABSENT`], or the id of an interned value.
type State = usize;

/// The state of an absent key.
const ABSENT: State = 0;

/// What an operation does to the register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Sets the state (a `Put`, or a `Delete` setting [`ABSENT`]).
    Write(State),
    /// Requires the state to be this one, and leaves it.
    Read(State),
}

impl Effect {
    /// The state after this effect, or `None` if it cannot happen in `state`.
    fn apply(self, state: State) -> Option<State> {
        match self {
            Effect::Write(next) => Some(next),
            Effect::Read(expected) => (expected == state).then_some(state),
        }
    }
}

/// An operation of one key, ready for the search.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    effect: Effect,
    /// Whether the outcome is known (it must then be linearized).
    known: bool,
    call: u64,
    /// `u64::MAX` when the outcome is unknown.
    ret: u64,
    /// Index in the input history, to order ties deterministically.
    input: usize,
}

/// Gives each distinct value a state id, from 1 up.
fn intern<'a>(values: &mut BTreeMap<&'a [u8], State>, value: &'a [u8]) -> State {
    let next = values.len() + 1;
    *values.entry(value).or_insert(next)
}

/// Checks the operations of one key, `indexes` into `history`.
fn check_key(history: &[Operation], indexes: &[usize], step_budget: u64) -> Outcome {
    let mut values = BTreeMap::new();
    let mut ops = Vec::with_capacity(indexes.len());
    for &input in indexes {
        let operation = &history[input];
        let (effect, ret) = match (&operation.op, &operation.ret) {
            (KvOp::Get, None) => continue,
            (KvOp::Get, Some((at, KvResult::Value(read)))) => {
                let state = read
                    .as_deref()
                    .map_or(ABSENT, |value| intern(&mut values, value));
                (Effect::Read(state), Some(*at))
            }
            (KvOp::Get, Some((_, KvResult::Ok))) => return Outcome::NotLinearizable,
            (KvOp::Put(_) | KvOp::Delete, Some((_, KvResult::Value(_)))) => {
                return Outcome::NotLinearizable;
            }
            (KvOp::Put(value), ret) => (
                Effect::Write(intern(&mut values, value)),
                ret.as_ref().map(|(at, _)| *at),
            ),
            (KvOp::Delete, ret) => (Effect::Write(ABSENT), ret.as_ref().map(|(at, _)| *at)),
        };
        ops.push(Prepared {
            effect,
            known: ret.is_some(),
            call: operation.call,
            ret: ret.map_or(u64::MAX, |at| at.max(operation.call)),
            input,
        });
    }
    ops.sort_by_key(|op| (op.call, op.input));

    // The earliest return of a read of each state, and the states some known write sets.
    let mut first_read: BTreeMap<State, u64> = BTreeMap::new();
    let mut known_written = BTreeSet::new();
    for op in &ops {
        match op.effect {
            Effect::Read(state) => {
                let first = first_read.entry(state).or_insert(op.ret);
                *first = (*first).min(op.ret);
            }
            Effect::Write(state) if op.known => {
                known_written.insert(state);
            }
            Effect::Write(_) => {}
        }
    }

    // Unknown-outcome writes, grouped by the state they set, in call order.
    let mut unknown_by_state: BTreeMap<State, Vec<usize>> = BTreeMap::new();
    for (index, op) in ops.iter().enumerate() {
        if let (false, Effect::Write(state)) = (op.known, op.effect) {
            // A write of a state no read observed can be taken never to have happened:
            // wherever it took effect, no read sees the state it leaves before the next write,
            // so leaving it out keeps a linearization valid.
            if first_read.contains_key(&state) {
                unknown_by_state.entry(state).or_default().push(index);
            }
        }
    }
    let mut forced = Vec::new();
    for (&state, members) in &mut unknown_by_state {
        // Unknown writes of one state are interchangeable, so the ones that take effect can be
        // taken to be the earliest called, in call order. If no known write sets a state that
        // some read saw (and it is not the initial state), the first of them must take effect
        // before that read returned.
        if state != ABSENT && !known_written.contains(&state) {
            let first = members.remove(0);
            let deadline = first_read[&state];
            if ops[first].call > deadline {
                return Outcome::NotLinearizable;
            }
            ops[first].known = true;
            ops[first].ret = deadline;
            forced.push((state, first));
        }
    }

    let mut known_index = vec![usize::MAX; ops.len()];
    let mut known = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        if op.known {
            known_index[index] = known.len();
            known.push(*op);
        }
    }
    let chains: Vec<Chain> = unknown_by_state
        .into_iter()
        .filter(|(_, members)| !members.is_empty())
        .map(|(state, members)| Chain {
            state,
            calls: members.iter().map(|&index| ops[index].call).collect(),
            after: forced
                .iter()
                .find(|(forced_state, _)| *forced_state == state)
                .map(|&(_, index)| known_index[index]),
        })
        .collect();
    search(&known, &chains, step_budget)
}

/// The unknown-outcome writes of one state that may take effect, taken in call order: the
/// search state holds how many of them have.
#[derive(Debug, Clone)]
struct Chain {
    /// The state they set.
    state: State,
    /// Their calls, ascending.
    calls: Vec<u64>,
    /// A known (forced) write of the same state, earlier in the same order, that must come
    /// first.
    after: Option<usize>,
}

/// The list head (and end marker) of the event list.
const HEAD: usize = 0;

/// A circular doubly linked list of call and return events in time order, node [`HEAD`] the
/// sentinel. Nodes taken out keep their links, so they can be put back in the reverse order
/// they were taken out.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The operation of each node.
    op: Vec<usize>,
    /// The time of each node.
    time: Vec<u64>,
    /// Whether each node is a call (else a return).
    is_call: Vec<bool>,
}

impl Events {
    /// The pending operations: those whose calls come before the first return in the list.
    fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        let mut node = self.next[HEAD];
        std::iter::from_fn(move || {
            let current = node;
            self.is_call[current].then(|| {
                node = self.next[current];
                self.op[current]
            })
        })
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        self.prev[next] = prev;
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        self.prev[next] = node;
    }

    /// Takes an operation's call and return events out.
    fn lift(&mut self, call: usize, ret: usize) {
        self.unlink(call);
        self.unlink(ret);
    }

    /// Puts back what the matching [`Events::lift`] took out.
    fn unlift(&mut self, call: usize, ret: usize) {
        self.relink(ret);
        self.relink(call);
    }
}

/// The part of a search state the explored-states cache is keyed on: the set of linearized
/// known operations (as a bitset, stored from its first word that is not all ones to its last
/// word that is not zero) and the register state. The hash comes first so that most
/// comparisons end on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Explored {
    hash: u64,
    state: State,
    start: usize,
    words: Box<[u64]>,
}

impl Explored {
    fn new(hash: u64, state: State, bits: &[u64]) -> Self {
        let start = bits
            .iter()
            .position(|&word| word != u64::MAX)
            .unwrap_or(bits.len());
        let end = bits
            .iter()
            .rposition(|&word| word != 0)
            .map_or(start, |last| (last + 1).max(start));
        Explored {
            hash,
            state,
            start,
            words: bits[start..end].into(),
        }
    }
}

/// The explored states. With the same linearized known operations and register state, a
/// state that has used fewer unknown writes of every chain can do all the other can, so only
/// the minimal use counts are kept, and a state is pruned when one of them is no greater.
#[derive(Default)]
struct Cache {
    seen: BTreeMap<Explored, Vec<Box<[usize]>>>,
}

impl Cache {
    /// Records the state; false if it (or a state that can do all it can) was explored.
    fn visit(&mut self, key: Explored, used: &[usize]) -> bool {
        let minimal = self
            .seen
            .entry(key)
            .or_insert_with(|| Vec::with_capacity(1));
        let covers =
            |smaller: &[usize], larger: &[usize]| smaller.iter().zip(larger).all(|(s, l)| s <= l);
        if minimal.iter().any(|old| covers(old, used)) {
            return false;
        }
        minimal.retain(|old| !covers(used, old));
        minimal.push(used.into());
        true
    }
}

/// A fixed pseudo-random 64-bit value per operation (splitmix64), for the set's hash.
fn mix(index: usize) -> u64 {
    let mut z = (index as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A step of a linearization.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// The known operation of this index. `decisive` when it was a read of the state it found:
    /// that move loses nothing, so no other move from the same state is tried.
    Known { index: usize, decisive: bool },
    /// The next write of this chain, for the `wanted` read state at `position`, made when the
    /// first pending return was at `horizon`.
    Unknown {
        chain: usize,
        position: usize,
        horizon: u64,
    },
}

/// Where the search is in trying the moves from its current state.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// A state just reached: look for a pending read of the current state first.
    Enter,
    /// The known operations of the event list from this node, until the first return.
    List(usize),
    /// The unknown writes of the read states wanted by pending reads, from this position.
    Wanted { position: usize, horizon: u64 },
    /// Nothing more to try from this state.
    Exhausted,
}

/// The backtracking search over the known operations of one key (sorted by call) and the
/// chains of unknown-outcome writes (sorted by state).
///
/// Two reductions keep it small. A pending read (one called before the first pending return)
/// that matches the current state is linearized at once, without trying anything else: in any
/// linearization from here it can be moved up to this point. And an unknown-outcome write is
/// only tried right before a pending read of the state it sets: anywhere else it is not needed.
fn search(ops: &[Prepared], chains: &[Chain], step_budget: u64) -> Outcome {
    if ops.is_empty() {
        return Outcome::Linearizable;
    }

    // Events in time order, calls before returns at equal times (the two operations are then
    // concurrent).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (index, op) in ops.iter().enumerate() {
        order.push((op.call, false, index));
        order.push((op.ret, true, index));
    }
    order.sort_unstable();

    let nodes = order.len() + 1;
    let mut events = Events {
        next: vec![HEAD; nodes],
        prev: vec![HEAD; nodes],
        op: vec![0; nodes],
        time: vec![0; nodes],
        is_call: vec![false; nodes],
    };
    let mut call_node = vec![0; ops.len()];
    let mut ret_node = vec![0; ops.len()];
    for (position, &(time, is_return, index)) in order.iter().enumerate() {
        let node = position + 1;
        events.prev[node] = position;
        events.next[node] = if node + 1 == nodes { HEAD } else { node + 1 };
        events.op[node] = index;
        events.time[node] = time;
        events.is_call[node] = !is_return;
        if is_return {
            ret_node[index] = node;
        } else {
            call_node[index] = node;
        }
    }
    events.next[HEAD] = 1;
    events.prev[HEAD] = nodes - 1;

    // The states read by pending reads, other than the current one, ascending.
    let wanted_by = |events: &Events, state: State, wanted: &mut Vec<State>| {
        wanted.clear();
        wanted.extend(
            events
                .pending()
                .filter_map(|index| match ops[index].effect {
                    Effect::Read(read) if read != state => Some(read),
                    _ => None,
                }),
        );
        wanted.sort_unstable();
        wanted.dedup();
    };

    let keys: Vec<u64> = (0..ops.len()).map(mix).collect();
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    let mut hash = 0u64;
    let mut state = ABSENT;
    let mut linearized = 0;
    let mut used = vec![0usize; chains.len()];
    let mut wanted = Vec::new();
    // The moves made, each with the state before it.
    let mut stack: Vec<(Move, State)> = Vec::new();
    let mut cache = Cache::default();
    let mut cursor = Cursor::Enter;
    let mut steps = 0u64;

    loop {
        if steps >= step_budget {
            return Outcome::OutOfBudget;
        }
        steps += 1;
        // A known operation to try, and whether it is decisive.
        let mut attempt = None;
        match cursor {
            Cursor::Enter => {
                let read = events
                    .pending()
                    .find(|&index| ops[index].effect == Effect::Read(state));
                match read {
                    Some(index) => attempt = Some((index, true)),
                    None => cursor = Cursor::List(events.next[HEAD]),
                }
            }
            Cursor::List(node) if events.is_call[node] => {
                let index = events.op[node];
                // A pending read of another state cannot come next; one of this state would
                // have been taken on entering.
                if matches!(ops[index].effect, Effect::Write(_)) {
                    attempt = Some((index, false));
                } else {
                    cursor = Cursor::List(events.next[node]);
                }
            }
            Cursor::List(node) => {
                // The first pending return: no operation called after it can come next.
                wanted_by(&events, state, &mut wanted);
                cursor = Cursor::Wanted {
                    position: 0,
                    horizon: events.time[node],
                };
            }
            Cursor::Wanted { position, horizon } if position < wanted.len() => {
                let target = wanted[position];
                cursor = Cursor::Wanted {
                    position: position + 1,
                    horizon,
                };
                if let Ok(chain) = chains.binary_search_by_key(&target, |chain| chain.state) {
                    let next = &chains[chain];
                    let count = used[chain];
                    let available = count < next.calls.len()
                        && next.calls[count] <= horizon
                        && next
                            .after
                            .is_none_or(|first| bits[first / 64] & (1 << (first % 64)) != 0);
                    if available {
                        used[chain] += 1;
                        if cache.visit(Explored::new(hash, target, &bits), &used) {
                            stack.push((
                                Move::Unknown {
                                    chain,
                                    position,
                                    horizon,
                                },
                                state,
                            ));
                            state = target;
                            cursor = Cursor::Enter;
                        } else {
                            used[chain] -= 1;
                        }
                    }
                }
            }
            Cursor::Wanted { .. } | Cursor::Exhausted => {
                // Every move from here was tried: undo the last one and go on after it.
                let Some((last, before)) = stack.pop() else {
                    return Outcome::NotLinearizable;
                };
                state = before;
                cursor = match last {
                    Move::Known { index, decisive } => {
                        bits[index / 64] ^= 1 << (index % 64);
                        hash ^= keys[index];
                        linearized -= 1;
                        events.unlift(call_node[index], ret_node[index]);
                        if decisive {
                            Cursor::Exhausted
                        } else {
                            Cursor::List(events.next[call_node[index]])
                        }
                    }
                    Move::Unknown {
                        chain,
                        position,
                        horizon,
                    } => {
                        used[chain] -= 1;
                        wanted_by(&events, state, &mut wanted);
                        Cursor::Wanted {
                            position: position + 1,
                            horizon,
                        }
                    }
                };
            }
        }

        let Some((index, decisive)) = attempt else {
            continue;
        };
        let after = ops[index].effect.apply(state);
        if let Some(after) = after {
            bits[index / 64] ^= 1 << (index % 64);
            hash ^= keys[index];
            if cache.visit(Explored::new(hash, after, &bits), &used) {
                stack.push((Move::Known { index, decisive }, state));
                state = after;
                events.lift(call_node[index], ret_node[index]);
                linearized += 1;
                if linearized == ops.len() {
                    return Outcome::Linearizable;
                }
                cursor = Cursor::Enter;
                continue;
            }
            bits[index / 64] ^= 1 << (index % 64);
            hash ^= keys[index];
        }
        cursor = if decisive {
            Cursor::Exhausted
        } else {
            Cursor::List(events.next[call_node[index]])
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: u64 = DEFAULT_STEP_BUDGET;

    fn op(client: u64, key: &str, op: KvOp, call: u64, ret: Option<(u64, KvResult)>) -> Operation {
        Operation {
            client,
            key: key.to_owned(),
            op,
            call,
            ret,
        }
    }

    fn put(client: u64, value: &str, call: u64, ret: u64) -> Operation {
        op(
            client,
            "k",
            KvOp::Put(value.into()),
            call,
            Some((ret, KvResult::Ok)),
        )
    }

    fn put_unknown(client: u64, value: &str, call: u64) -> Operation {
        op(client, "k", KvOp::Put(value.into()), call, None)
    }

    fn delete(client: u64, call: u64, ret: u64) -> Operation {
        op(client, "k", KvOp::Delete, call, Some((ret, KvResult::Ok)))
    }

    fn get(client: u64, read: Option<&str>, call: u64, ret: u64) -> Operation {
        let read = read.map(|value| value.as_bytes().to_vec());
        op(
            client,
            "k",
            KvOp::Get,
            call,
            Some((ret, KvResult::Value(read))),
        )
    }

    fn assert_not_linearizable(history: &[Operation]) {
        match check(history, BUDGET) {
            Verdict::NotLinearizable { key, ops } => {
                assert_eq!(key, "k");
                assert_eq!(ops, (0..history.len()).collect::<Vec<_>>());
            }
            other => panic!("expected NotLinearizable, got {other:?}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check(&[], BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let history = [
            get(1, None, 0, 1),
            put(1, "a", 2, 3),
            get(2, Some("a"), 4, 5),
            put(2, "b", 6, 7),
            get(1, Some("b"), 8, 9),
            put(1, "a", 10, 11),
            get(2, Some("a"), 12, 13),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_completed_put_is_not_linearizable() {
        let history = [
            put(1, "a", 0, 1),
            put(1, "b", 2, 3),
            get(2, Some("a"), 4, 5),
        ];
        assert_not_linearizable(&history);
    }

    #[test]
    fn concurrent_put_and_get_may_see_old_or_new() {
        for read in [Some("a"), Some("b")] {
            let history = [put(1, "a", 0, 1), put(1, "b", 10, 20), get(2, read, 12, 18)];
            assert_eq!(
                check(&history, BUDGET),
                Verdict::Linearizable,
                "read {read:?}"
            );
        }
        // Two overlapping reads may see old then new, but a read that starts after another
        // returned the new value cannot see the old one.
        let history = [
            put(1, "a", 0, 1),
            put(1, "b", 10, 40),
            get(2, Some("b"), 12, 15),
            get(3, Some("a"), 14, 30),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
        let history = [
            put(1, "a", 0, 1),
            put(1, "b", 10, 40),
            get(2, Some("b"), 12, 15),
            get(3, Some("a"), 16, 30),
        ];
        assert_not_linearizable(&history);
    }

    #[test]
    fn ties_between_call_and_return_count_as_concurrent() {
        // The put returns at 10 and the get is called at 10: either order is allowed.
        let history = [put(1, "a", 0, 10), get(2, None, 10, 11)];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_puts_seen_in_consistent_order_is_linearizable() {
        let history = [
            put(1, "a", 0, 10),
            put(2, "b", 0, 10),
            get(3, Some("a"), 20, 21),
            get(4, Some("a"), 22, 23),
            get(3, Some("a"), 30, 31),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_puts_seen_in_inconsistent_orders_is_not_linearizable() {
        let history = [
            put(1, "a", 0, 10),
            put(2, "b", 0, 10),
            get(3, Some("a"), 20, 21),
            get(4, Some("b"), 22, 23),
            get(3, Some("b"), 30, 31),
            get(4, Some("a"), 32, 33),
        ];
        assert_not_linearizable(&history);
    }

    #[test]
    fn unknown_put_later_read_is_linearizable() {
        let history = [
            put(1, "a", 0, 1),
            put_unknown(2, "b", 2),
            get(3, Some("a"), 10, 11),
            get(3, Some("b"), 100, 101),
            get(1, Some("b"), 200, 201),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn unknown_put_never_read_is_linearizable() {
        let history = [
            put(1, "a", 0, 1),
            put_unknown(2, "b", 2),
            get(3, Some("a"), 10, 11),
            get(3, Some("a"), 20, 21),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn unknown_put_cannot_take_effect_before_its_call() {
        let history = [
            put(1, "a", 0, 1),
            get(3, Some("b"), 10, 11),
            put_unknown(2, "b", 20),
        ];
        assert_not_linearizable(&history);
    }

    #[test]
    fn unknown_put_takes_effect_at_most_once() {
        let history = [
            put(1, "a", 0, 1),
            put_unknown(2, "b", 2),
            get(3, Some("b"), 3, 4),
            get(3, Some("a"), 5, 6),
        ];
        assert_not_linearizable(&history);
        // With a second (unknown) write of "a" the old value may come back.
        let mut history = history.to_vec();
        history.insert(3, put_unknown(4, "a", 4));
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn unknown_get_is_ignored() {
        let history = [
            put(1, "a", 0, 1),
            op(2, "k", KvOp::Get, 2, None),
            get(3, Some("a"), 10, 11),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn read_of_never_written_value_is_not_linearizable() {
        let history = [put(1, "a", 0, 1), get(2, Some("z"), 2, 3)];
        assert_not_linearizable(&history);
        assert_not_linearizable(&[get(2, Some("z"), 2, 3)]);
    }

    #[test]
    fn delete_then_get_none_is_linearizable() {
        let history = [
            put(1, "a", 0, 1),
            get(2, Some("a"), 2, 3),
            delete(1, 4, 5),
            get(2, None, 6, 7),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
        let history = [put(1, "a", 0, 1), delete(1, 4, 5), get(2, Some("a"), 6, 7)];
        assert_not_linearizable(&history);
    }

    #[test]
    fn unknown_delete_may_be_observed() {
        let history = [
            put(1, "a", 0, 1),
            op(2, "k", KvOp::Delete, 2, None),
            get(3, Some("a"), 3, 4),
            get(3, None, 5, 6),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn result_of_wrong_shape_is_not_linearizable() {
        let history = [op(
            1,
            "k",
            KvOp::Put(b"a".to_vec()),
            0,
            Some((1, KvResult::Value(None))),
        )];
        assert_not_linearizable(&history);
        let history = [op(1, "k", KvOp::Get, 0, Some((1, KvResult::Ok)))];
        assert_not_linearizable(&history);
    }

    #[test]
    fn keys_are_checked_independently() {
        let on = |key: &str, mut operation: Operation| {
            operation.key = key.to_owned();
            operation
        };
        // Per key the history is fine; it would not be if the keys were one register.
        let history = [
            on("x", put(1, "a", 0, 1)),
            on("y", put(2, "b", 2, 3)),
            on("x", get(3, Some("a"), 4, 5)),
            on("y", get(3, Some("b"), 6, 7)),
        ];
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
        let mut history = history.to_vec();
        history.push(on("y", get(4, Some("a"), 8, 9)));
        history.push(on("z", get(4, None, 8, 9)));
        assert_eq!(
            check(&history, BUDGET),
            Verdict::NotLinearizable {
                key: "y".to_owned(),
                ops: vec![1, 3, 4]
            }
        );
    }

    #[test]
    fn exhausted_budget_gives_unknown() {
        let history: Vec<Operation> = (0..20).map(|i| put(1, "a", 2 * i, 2 * i + 1)).collect();
        assert_eq!(
            check(&history, 5),
            Verdict::Unknown {
                key: "k".to_owned()
            }
        );
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
        // A key found not linearizable wins over one out of budget.
        let mut history: Vec<Operation> = history
            .into_iter()
            .map(|mut operation| {
                operation.key = "a".to_owned();
                operation
            })
            .collect();
        history.push(get(1, Some("z"), 0, 1));
        assert!(matches!(check(&history, 5), Verdict::NotLinearizable { key, .. } if key == "k"));
    }

    /// xorshift64*, enough for generating test histories.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(mix(usize::try_from(seed).unwrap()) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }
    }

    struct Shape {
        ops: usize,
        keys: u64,
        values: u64,
        clients: u64,
        /// Percent of writes whose outcome is recorded as unknown.
        unknown_percent: u64,
        /// Percent of steps that also record an unknown write that never took effect.
        phantom_percent: u64,
    }

    /// A random sequential execution of registers, widened into a concurrent history: op `i`
    /// takes effect at `100 + 10 i` and its interval is stretched by up to a few ops' worth on
    /// both sides; op `i` is issued by client `i % clients`, whose ops never overlap.
    fn random_history(seed: u64, shape: &Shape) -> Vec<Operation> {
        let mut rng = Rng::new(seed);
        let mut registers: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let spread = 10 * shape.clients / 2 - 5;
        let mut history = Vec::new();
        for i in 0..shape.ops {
            let point = 100 + 10 * u64::try_from(i).unwrap();
            let key = format!("key{}", rng.below(shape.keys));
            let register = registers.entry(key.clone()).or_default();
            let value = format!("v{}", rng.below(shape.values)).into_bytes();
            let choice = rng.below(10);
            let (kv_op, result) = if choice < 4 {
                *register = Some(value.clone());
                (KvOp::Put(value), KvResult::Ok)
            } else if choice < 5 {
                *register = None;
                (KvOp::Delete, KvResult::Ok)
            } else {
                (KvOp::Get, KvResult::Value(register.clone()))
            };
            let call = point - 1 - rng.below(spread);
            let ret = point + 1 + rng.below(spread);
            let is_write = !matches!(kv_op, KvOp::Get);
            let ret = if is_write && rng.below(100) < shape.unknown_percent {
                None
            } else {
                Some((ret, result))
            };
            let client = u64::try_from(i).unwrap() % shape.clients;
            history.push(Operation {
                client,
                key: key.clone(),
                op: kv_op,
                call,
                ret,
            });
            if rng.below(100) < shape.phantom_percent {
                let value = format!("v{}", rng.below(shape.values)).into_bytes();
                history.push(Operation {
                    client: 1000 + client,
                    key,
                    op: KvOp::Put(value),
                    call,
                    ret: None,
                });
            }
        }
        history
    }

    /// Whether `value` could be what the read at `read` saw: some write of it, possibly before
    /// the read, is not followed by another write that certainly took effect in between.
    fn could_read(history: &[Operation], read: usize, value: &[u8]) -> bool {
        let r = &history[read];
        let (r_call, r_ret) = (r.call, r.ret.as_ref().unwrap().0);
        let end = |operation: &Operation| operation.ret.as_ref().map_or(u64::MAX, |(at, _)| *at);
        let writes = || {
            history
                .iter()
                .filter(|w| w.key == r.key && !matches!(w.op, KvOp::Get))
        };
        writes()
            .filter(|w| w.op == KvOp::Put(value.to_vec()) && w.call <= r_ret)
            .any(|w| {
                let w_end = end(w);
                !writes().any(|between| {
                    between.ret.is_some() && between.call > w_end && end(between) < r_call
                })
            })
    }

    const RANDOM: Shape = Shape {
        ops: 300,
        keys: 3,
        values: 4,
        clients: 8,
        unknown_percent: 10,
        phantom_percent: 5,
    };

    #[test]
    fn randomized_histories_are_linearizable() {
        for seed in 0..200 {
            let history = random_history(seed, &RANDOM);
            assert_eq!(
                check(&history, BUDGET),
                Verdict::Linearizable,
                "seed {seed}"
            );
        }
    }

    #[test]
    fn randomized_history_with_corrupted_read_is_not_linearizable() {
        let mut corrupted = 0;
        for seed in 0..200 {
            let mut history = random_history(seed, &RANDOM);
            let candidates = (0..history.len()).filter(|&i| history[i].op == KvOp::Get);
            let Some((read, value)) = candidates
                .flat_map(|i| (0..RANDOM.values).map(move |v| (i, format!("v{v}").into_bytes())))
                .find(|(i, value)| !could_read(&history, *i, value))
            else {
                continue;
            };
            let key = history[read].key.clone();
            history[read].ret.as_mut().unwrap().1 = KvResult::Value(Some(value));
            match check(&history, BUDGET) {
                Verdict::NotLinearizable { key: bad, ops } => {
                    assert_eq!(bad, key, "seed {seed}");
                    assert!(ops.contains(&read), "seed {seed}");
                    assert!(ops.iter().all(|&i| history[i].key == key), "seed {seed}");
                }
                other => panic!("seed {seed}: expected NotLinearizable, got {other:?}"),
            }
            corrupted += 1;
        }
        assert!(
            corrupted > 150,
            "only {corrupted} histories had a read to corrupt"
        );
    }

    const LARGE: Shape = Shape {
        ops: 2000,
        keys: 1,
        values: 6,
        clients: 8,
        unknown_percent: 5,
        phantom_percent: 3,
    };

    #[test]
    fn perf_two_thousand_ops_eight_clients() {
        let history = random_history(7, &LARGE);
        assert!(history.len() >= 2000);
        assert_eq!(check(&history, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn perf_two_thousand_ops_with_late_corrupted_read() {
        let mut history = random_history(11, &LARGE);
        let read = (0..history.len())
            .rev()
            .filter(|&i| history[i].op == KvOp::Get)
            .find(|&i| !could_read(&history, i, b"v0"))
            .unwrap();
        history[read].ret.as_mut().unwrap().1 = KvResult::Value(Some(b"v0".to_vec()));
        assert!(matches!(
            check(&history, BUDGET),
            Verdict::NotLinearizable { .. }
        ));
    }

    /// The definition, tried exhaustively: some order of all known-outcome operations and
    /// some of the unknown-outcome writes, each after every operation that returned before it
    /// was called, that a register accepts.
    fn brute_force(history: &[Operation]) -> bool {
        fn extend(ops: &[&Operation], done: &mut Vec<bool>, state: Option<&[u8]>) -> bool {
            if ops
                .iter()
                .zip(done.iter())
                .all(|(op, &done)| done || op.ret.is_none())
            {
                return true;
            }
            let end = |op: &Operation| op.ret.as_ref().map_or(u64::MAX, |(at, _)| *at);
            for i in 0..ops.len() {
                let blocked =
                    (0..ops.len()).any(|j| !done[j] && j != i && end(ops[j]) < ops[i].call);
                if done[i] || blocked {
                    continue;
                }
                let next = match (&ops[i].op, &ops[i].ret) {
                    (KvOp::Put(value), _) => Some(Some(value.as_slice())),
                    (KvOp::Delete, _) => Some(None),
                    (KvOp::Get, Some((_, KvResult::Value(read)))) => {
                        (read.as_deref() == state).then_some(state)
                    }
                    (KvOp::Get, _) => None,
                };
                if let Some(next) = next {
                    done[i] = true;
                    let found = extend(ops, done, next);
                    done[i] = false;
                    if found {
                        return true;
                    }
                }
            }
            false
        }
        let ops: Vec<&Operation> = history
            .iter()
            .filter(|op| op.op != KvOp::Get || op.ret.is_some())
            .collect();
        extend(&ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let (mut linearizable, mut not) = (0, 0);
        for seed in 0..20_000 {
            let mut rng = Rng::new(seed);
            let values: [&[u8]; 3] = [b"a", b"b", b"c"];
            let history: Vec<Operation> = (0..1 + rng.below(7))
                .map(|client| {
                    let call = rng.below(20);
                    let ret = call + 1 + rng.below(10);
                    let value = values[usize::try_from(rng.below(3)).unwrap()].to_vec();
                    let (kv_op, result) = match rng.below(20) {
                        0..8 => (KvOp::Put(value), KvResult::Ok),
                        8..11 => (KvOp::Delete, KvResult::Ok),
                        choice => (
                            KvOp::Get,
                            KvResult::Value((choice % 4 != 0).then_some(value)),
                        ),
                    };
                    let ret = (rng.below(5) != 0).then_some((ret, result));
                    op(client, "k", kv_op, call, ret)
                })
                .collect();
            let expected = brute_force(&history);
            let verdict = check(&history, BUDGET);
            assert_eq!(
                verdict == Verdict::Linearizable,
                expected,
                "seed {seed}: {history:?} gave {verdict:?}"
            );
            assert!(matches!(
                verdict,
                Verdict::Linearizable | Verdict::NotLinearizable { .. }
            ));
            if expected {
                linearizable += 1
            } else {
                not += 1
            }
        }
        assert!(
            linearizable > 5_000 && not > 5_000,
            "{linearizable} linearizable, {not} not"
        );
    }
}
