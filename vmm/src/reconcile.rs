//! The reconciler: what should run on this node against what does, as a list of [`Action`]s.
//!
//! Pure and deterministic: no clock (the caller passes `now_ms`), no I/O, maps walked in key
//! order. At most one action per VM name per round; the worker applies them and calls again on
//! its next tick, so a replacement is two rounds (Stop, then Start).
//!
//! ```text
//!   desired ─┐
//!            ├─▶ reconcile(now_ms) ─▶ [Stop | Start | Pause | Resume]* ─▶ worker applies
//!  observed ─┘
//! ```

use std::collections::BTreeMap;

use crate::{Action, Desired, DesiredState, Observed, Phase, RestartPolicy};

/// The wait before restart number `restarts + 1`, counted from the last start: none for the
/// first restart, then 1 s, 2 s, 4 s, ... up to [`MAX_BACKOFF_MS`].
pub(crate) fn restart_backoff_ms(restarts: u32) -> u64 {
    match restarts {
        0 => 0,
        n => 1000u64
            .checked_shl(n - 1)
            .unwrap_or(u64::MAX)
            .min(MAX_BACKOFF_MS),
    }
}

/// The longest wait between restarts.
pub(crate) const MAX_BACKOFF_MS: u64 = 30_000;

/// Compares `desired` (keyed by VM name) with `observed` (keyed by VM name) and returns the
/// actions that bring this node closer to the desired state, at most one per name, in name
/// order.
///
/// - observed, not desired, or of another incarnation → `Stop`
/// - desired Running/Paused, not observed → `Start`
/// - desired Stopped, observed Starting/Running/Paused → `Stop`
/// - desired Running, observed Paused → `Resume`; desired Paused, observed Running → `Pause`
///   (a Starting VM is left to finish booting)
/// - observed Exited/Failed, desired Running/Paused → `Start` as the restart policy allows,
///   once the backoff has passed since the last start: none before the first restart, then
///   1 s, 2 s, 4 s, ... up to 30 s
pub fn reconcile(
    desired: &BTreeMap<String, Desired>,
    observed: &BTreeMap<String, Observed>,
    now_ms: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    // Both maps are sorted; walk the union of names in order.
    let mut names: Vec<&String> = desired.keys().chain(observed.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let action = match (desired.get(name), observed.get(name)) {
            (None, None) => None,
            (None, Some(_)) => Some(Action::Stop { name: name.clone() }),
            (Some(want), None) => match want.state {
                DesiredState::Running | DesiredState::Paused => Some(Action::Start(want.clone())),
                DesiredState::Stopped => None,
            },
            (Some(want), Some(seen)) => step(name, want, seen, now_ms),
        };
        actions.extend(action);
    }
    actions
}

/// The one action for a VM that is both desired and observed.
fn step(name: &str, want: &Desired, seen: &Observed, now_ms: u64) -> Option<Action> {
    let stop = || {
        Some(Action::Stop {
            name: name.to_owned(),
        })
    };
    if seen.incarnation != want.incarnation {
        return stop();
    }
    match (&want.state, &seen.phase) {
        (DesiredState::Stopped, Phase::Starting | Phase::Running | Phase::Paused) => stop(),
        (DesiredState::Stopped, Phase::Exited { .. } | Phase::Failed { .. }) => None,
        (DesiredState::Running, Phase::Paused) => Some(Action::Resume {
            name: name.to_owned(),
        }),
        (DesiredState::Paused, Phase::Running) => Some(Action::Pause {
            name: name.to_owned(),
        }),
        (
            DesiredState::Running | DesiredState::Paused,
            Phase::Starting | Phase::Running | Phase::Paused,
        ) => None,
        (
            DesiredState::Running | DesiredState::Paused,
            Phase::Exited { .. } | Phase::Failed { .. },
        ) => {
            let policy_allows = match want.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => {
                    !matches!(seen.phase, Phase::Exited { code: Some(0), .. })
                }
                RestartPolicy::Never => false,
            };
            let due = now_ms
                >= seen
                    .started_at_ms
                    .saturating_add(restart_backoff_ms(seen.restarts));
            (policy_allows && due).then(|| Action::Start(want.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::{BootSpec, DriverKind};

    fn spec() -> BootSpec {
        BootSpec {
            boot_timeout_ms: 1000,
            ..BootSpec::process(vec!["true".into()])
        }
    }

    fn want(name: &str, incarnation: u64, state: DesiredState, restart: RestartPolicy) -> Desired {
        Desired {
            name: name.into(),
            incarnation,
            spec: spec(),
            state,
            restart,
        }
    }

    fn seen(
        name: &str,
        incarnation: u64,
        phase: Phase,
        started_at_ms: u64,
        restarts: u32,
    ) -> Observed {
        Observed {
            name: name.into(),
            incarnation,
            driver: DriverKind::Process,
            phase,
            boot_ms: None,
            started_at_ms,
            restarts,
            pid: None,
        }
    }

    fn one(d: Option<Desired>, o: Option<Observed>, now_ms: u64) -> Vec<Action> {
        let desired: BTreeMap<_, _> = d.into_iter().map(|d| (d.name.clone(), d)).collect();
        let observed: BTreeMap<_, _> = o.into_iter().map(|o| (o.name.clone(), o)).collect();
        reconcile(&desired, &observed, now_ms)
    }

    fn stop(name: &str) -> Action {
        Action::Stop { name: name.into() }
    }

    fn exited(code: Option<i32>) -> Phase {
        Phase::Exited {
            code,
            reason: "x".into(),
        }
    }

    #[test]
    fn undesired_is_stopped() {
        let o = seen("a", 1, Phase::Running, 0, 0);
        assert_eq!(one(None, Some(o.clone()), 0), vec![stop("a")]);
        let dead = seen("a", 1, exited(Some(0)), 0, 0);
        assert_eq!(one(None, Some(dead), 0), vec![stop("a")]);
    }

    #[test]
    fn new_incarnation_replaces_the_old() {
        let d = want("a", 2, DesiredState::Running, RestartPolicy::Always);
        let o = seen("a", 1, Phase::Running, 0, 0);
        assert_eq!(one(Some(d.clone()), Some(o), 0), vec![stop("a")]);
        // Next round, once the stop removed the observation.
        assert_eq!(one(Some(d.clone()), None, 0), vec![Action::Start(d)]);
    }

    #[test]
    fn desired_running_or_paused_is_started() {
        for state in [DesiredState::Running, DesiredState::Paused] {
            let d = want("a", 1, state, RestartPolicy::Always);
            assert_eq!(one(Some(d.clone()), None, 0), vec![Action::Start(d)]);
        }
        let d = want("a", 1, DesiredState::Stopped, RestartPolicy::Always);
        assert_eq!(one(Some(d), None, 0), vec![]);
    }

    #[test]
    fn desired_stopped_stops_what_is_alive() {
        let d = want("a", 1, DesiredState::Stopped, RestartPolicy::Always);
        for phase in [Phase::Starting, Phase::Running, Phase::Paused] {
            assert_eq!(
                one(Some(d.clone()), Some(seen("a", 1, phase, 0, 0)), 0),
                vec![stop("a")]
            );
        }
        for phase in [exited(Some(1)), Phase::Failed { reason: "x".into() }] {
            assert_eq!(
                one(Some(d.clone()), Some(seen("a", 1, phase, 0, 0)), 0),
                vec![]
            );
        }
    }

    #[test]
    fn pause_and_resume() {
        let run = want("a", 1, DesiredState::Running, RestartPolicy::Always);
        let pause = want("a", 1, DesiredState::Paused, RestartPolicy::Always);
        let name = || "a".to_owned();
        assert_eq!(
            one(
                Some(run.clone()),
                Some(seen("a", 1, Phase::Paused, 0, 0)),
                0
            ),
            vec![Action::Resume { name: name() }]
        );
        assert_eq!(
            one(
                Some(pause.clone()),
                Some(seen("a", 1, Phase::Running, 0, 0)),
                0
            ),
            vec![Action::Pause { name: name() }]
        );
        // Still booting: wait.
        assert_eq!(
            one(Some(pause), Some(seen("a", 1, Phase::Starting, 0, 0)), 0),
            vec![]
        );
        assert_eq!(
            one(Some(run), Some(seen("a", 1, Phase::Starting, 0, 0)), 0),
            vec![]
        );
    }

    #[test]
    fn restart_policies() {
        let cases = [
            (RestartPolicy::Always, exited(Some(0)), true),
            (RestartPolicy::Always, exited(Some(3)), true),
            (
                RestartPolicy::Always,
                Phase::Failed { reason: "x".into() },
                true,
            ),
            (RestartPolicy::OnFailure, exited(Some(0)), false),
            (RestartPolicy::OnFailure, exited(Some(3)), true),
            (RestartPolicy::OnFailure, exited(None), true),
            (
                RestartPolicy::OnFailure,
                Phase::Failed { reason: "x".into() },
                true,
            ),
            (RestartPolicy::Never, exited(Some(3)), false),
            (
                RestartPolicy::Never,
                Phase::Failed { reason: "x".into() },
                false,
            ),
        ];
        for (policy, phase, restarts) in cases {
            let d = want("a", 1, DesiredState::Running, policy);
            let got = one(Some(d.clone()), Some(seen("a", 1, phase.clone(), 0, 0)), 0);
            let expected = if restarts {
                vec![Action::Start(d)]
            } else {
                vec![]
            };
            assert_eq!(got, expected, "{policy:?} {phase:?}");
        }
    }

    #[test]
    fn restarts_back_off() {
        assert_eq!(restart_backoff_ms(0), 0);
        assert_eq!(restart_backoff_ms(1), 1000);
        assert_eq!(restart_backoff_ms(2), 2000);
        assert_eq!(restart_backoff_ms(5), 16_000);
        assert_eq!(restart_backoff_ms(6), 30_000);
        assert_eq!(restart_backoff_ms(200), 30_000);
        let d = want("a", 1, DesiredState::Running, RestartPolicy::Always);
        let o = seen("a", 1, exited(Some(1)), 10_000, 2);
        assert_eq!(one(Some(d.clone()), Some(o.clone()), 11_999), vec![]);
        assert_eq!(
            one(Some(d.clone()), Some(o), 12_000),
            vec![Action::Start(d)]
        );
    }

    #[test]
    fn actions_come_in_name_order() {
        let desired: BTreeMap<_, _> = ["c", "a"]
            .into_iter()
            .map(|n| {
                (
                    n.to_owned(),
                    want(n, 1, DesiredState::Running, RestartPolicy::Always),
                )
            })
            .collect();
        let observed: BTreeMap<_, _> = [("b".to_owned(), seen("b", 1, Phase::Running, 0, 0))]
            .into_iter()
            .collect();
        let names: Vec<String> = reconcile(&desired, &observed, 0)
            .iter()
            .map(action_name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    fn action_name(a: &Action) -> String {
        match a {
            Action::Start(d) => d.name.clone(),
            Action::Stop { name } | Action::Pause { name } | Action::Resume { name } => {
                name.clone()
            }
        }
    }

    // --- property tests

    fn arb_state() -> impl Strategy<Value = DesiredState> {
        prop_oneof![
            Just(DesiredState::Running),
            Just(DesiredState::Paused),
            Just(DesiredState::Stopped)
        ]
    }

    fn arb_policy() -> impl Strategy<Value = RestartPolicy> {
        prop_oneof![
            Just(RestartPolicy::Always),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Never)
        ]
    }

    fn arb_phase() -> impl Strategy<Value = Phase> {
        prop_oneof![
            Just(Phase::Starting),
            Just(Phase::Running),
            Just(Phase::Paused),
            proptest::option::of(-1i32..4).prop_map(|code| Phase::Exited {
                code,
                reason: "r".into()
            }),
            Just(Phase::Failed { reason: "f".into() }),
        ]
    }

    const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

    fn arb_desired() -> impl Strategy<Value = BTreeMap<String, Desired>> {
        proptest::collection::btree_map(
            proptest::sample::select(&NAMES[..]).prop_map(str::to_owned),
            (1u64..3, arb_state(), arb_policy()),
            0..5,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(name, (inc, state, policy))| {
                    let d = want(&name, inc, state, policy);
                    (name, d)
                })
                .collect()
        })
    }

    fn arb_observed() -> impl Strategy<Value = BTreeMap<String, Observed>> {
        proptest::collection::btree_map(
            proptest::sample::select(&NAMES[..]).prop_map(str::to_owned),
            (1u64..3, arb_phase(), 0u64..100_000, 0u32..10),
            0..5,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(name, (inc, phase, at, restarts))| {
                    let o = seen(&name, inc, phase, at, restarts);
                    (name, o)
                })
                .collect()
        })
    }

    /// What the node looks like once every desired VM is where it should be.
    fn ideal(desired: &BTreeMap<String, Desired>) -> BTreeMap<String, Observed> {
        desired
            .iter()
            .filter_map(|(name, d)| {
                let phase = match d.state {
                    DesiredState::Running => Phase::Running,
                    DesiredState::Paused => Phase::Paused,
                    DesiredState::Stopped => return None,
                };
                Some((name.clone(), seen(name, d.incarnation, phase, 0, 0)))
            })
            .collect()
    }

    proptest! {
        #[test]
        fn at_most_one_action_per_name(d in arb_desired(), o in arb_observed(), now in 0u64..200_000) {
            let actions = reconcile(&d, &o, now);
            let names: BTreeSet<String> = actions.iter().map(action_name).collect();
            prop_assert_eq!(names.len(), actions.len());
        }

        #[test]
        fn never_starts_a_vm_desired_stopped(d in arb_desired(), o in arb_observed(), now in 0u64..200_000) {
            for a in reconcile(&d, &o, now) {
                if let Action::Start(vm) = a {
                    prop_assert_ne!(vm.state, DesiredState::Stopped);
                    prop_assert_eq!(Some(&vm), d.get(&vm.name));
                }
            }
        }

        #[test]
        fn undesired_observations_are_stopped(d in arb_desired(), o in arb_observed(), now in 0u64..200_000) {
            let actions = reconcile(&d, &o, now);
            for name in o.keys().filter(|n| !d.contains_key(*n)) {
                prop_assert!(actions.contains(&Action::Stop { name: name.clone() }), "{} not stopped", name);
            }
        }

        #[test]
        fn only_known_names_are_acted_on(d in arb_desired(), o in arb_observed(), now in 0u64..200_000) {
            for a in reconcile(&d, &o, now) {
                let name = action_name(&a);
                prop_assert!(d.contains_key(&name) || o.contains_key(&name));
                if matches!(a, Action::Pause { .. } | Action::Resume { .. } | Action::Stop { .. }) {
                    prop_assert!(o.contains_key(&name));
                }
            }
        }

        #[test]
        fn ideal_outcome_needs_no_action(d in arb_desired(), now in 0u64..200_000) {
            prop_assert_eq!(reconcile(&d, &ideal(&d), now), vec![]);
        }

        #[test]
        fn converges_when_actions_succeed(d in arb_desired(), o in arb_observed()) {
            // Applying each round's actions (and letting boots finish) settles in a few rounds.
            let mut o = o;
            let now = 1_000_000;
            for _ in 0..4 {
                for a in reconcile(&d, &o, now) {
                    match a {
                        Action::Start(vm) => {
                            o.insert(vm.name.clone(), seen(&vm.name, vm.incarnation, Phase::Starting, now, 0));
                        }
                        Action::Stop { name } => {
                            o.remove(&name);
                        }
                        Action::Pause { name } => o.get_mut(&name).unwrap().phase = Phase::Paused,
                        Action::Resume { name } => o.get_mut(&name).unwrap().phase = Phase::Running,
                    }
                }
                for seen in o.values_mut().filter(|s| s.phase == Phase::Starting) {
                    seen.phase = Phase::Running;
                }
            }
            prop_assert_eq!(reconcile(&d, &o, now), vec![]);
        }

        #[test]
        fn deterministic(d in arb_desired(), o in arb_observed(), now in 0u64..200_000) {
            prop_assert_eq!(reconcile(&d, &o, now), reconcile(&d, &o, now));
        }
    }
}
