//! Linearizability: every key's history of client operations could have happened one at a
//! time, each at some instant between its call and its return (see
//! [`crate::linearizability`]; writes of unknown outcome may have happened or not).

use std::time::Duration;

use super::Violation;
use crate::linearizability::{Operation, Verdict, check as lin_check};

/// Search steps allowed per run before the check gives up (and says so).
const BUDGET: u64 = 20_000_000;

pub(crate) fn check(history: &[Operation], at: Duration) -> Option<Violation> {
    match lin_check(history, BUDGET) {
        Verdict::Linearizable => None,
        Verdict::NotLinearizable { key, ops } => Some(Violation {
            invariant: "linearizable",
            at,
            detail: format!(
                "the history of {key} ({} operations) is not linearizable",
                ops.len()
            ),
        }),
        Verdict::Unknown { key } => {
            tracing::warn!(%key, "linearizability check ran out of budget");
            None
        }
    }
}
