//! Hard constraints and soft preferences on node labels, and their text form.
//!
//! | text               | meaning                                   |
//! |--------------------|-------------------------------------------|
//! | `disk=ssd`         | label `disk` is `ssd`                     |
//! | `disk!=ssd`        | label `disk` is missing or not `ssd`      |
//! | `zone in a,b`      | label `zone` is `a` or `b` (also `(a,b)`) |
//! | `gpu`              | label `gpu` exists                        |
//! | `!gpu`             | label `gpu` does not exist                |
//!
//! A preference is a constraint with a weight: `zone=a:50` (weight -100 to 100, default 50).
//! Keys and values use the characters `A-Z a-z 0-9 . _ / -`; keys are at most 63 characters
//! long, values at most 255. Whitespace around keys, operators and values is ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted key, in bytes.
const MAX_KEY_LEN: usize = 63;
/// Longest accepted value, in bytes.
const MAX_VALUE_LEN: usize = 255;
/// Weight of a preference written without one.
const DEFAULT_WEIGHT: i32 = 50;
/// The forms a constraint may take, for error messages.
const FORMS: &str = "expected key=value, key!=value, key in a,b, key or !key";

/// How a constraint tests the value of its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The label exists and equals the value.
    Eq(String),
    /// The label is missing or differs from the value.
    Ne(String),
    /// The label exists and equals one of the values.
    In(Vec<String>),
    /// The label exists, whatever its value.
    Exists,
    /// The label does not exist.
    NotExists,
}

/// A hard requirement on a node's labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// The label key.
    pub key: String,
    /// The test applied to the label.
    pub op: Op,
}

/// A soft wish on a node's labels: nodes where the constraint holds score `weight` more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preference {
    /// What the node should satisfy.
    pub constraint: Constraint,
    /// -100 to 100; negative weights steer away from matching nodes.
    pub weight: i32,
}

/// Why a constraint or preference text was rejected. Each message quotes the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstraintError {
    /// The text has none of the forms `key=value`, `key!=value`, `key in a,b`, `key`, `!key`.
    Syntax {
        /// The text as given.
        input: String,
    },
    /// The key is empty, longer than 63 characters, or uses a character outside
    /// `A-Z a-z 0-9 . _ / -`.
    Key {
        /// The text as given.
        input: String,
        /// The offending key.
        key: String,
    },
    /// A value is empty, longer than 255 characters, or uses a character outside
    /// `A-Z a-z 0-9 . _ / -`.
    Value {
        /// The text as given.
        input: String,
        /// The offending value.
        value: String,
    },
    /// `key in` names no value.
    EmptyList {
        /// The text as given.
        input: String,
    },
    /// A preference's weight is not an integer from -100 to 100.
    Weight {
        /// The preference text as given.
        input: String,
        /// The offending weight.
        weight: String,
    },
}

impl fmt::Display for ConstraintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax { input } => write!(f, "constraint {input:?}: {FORMS}"),
            Self::Key { input, key } => {
                write!(f, "constraint {input:?}: ")?;
                describe_bad_word(f, "key", key, MAX_KEY_LEN)
            }
            Self::Value { input, value } => {
                write!(f, "constraint {input:?}: ")?;
                describe_bad_word(f, "value", value, MAX_VALUE_LEN)
            }
            Self::EmptyList { input } => {
                write!(
                    f,
                    "constraint {input:?}: `in` needs at least one value, as in key in a,b"
                )
            }
            Self::Weight { input, weight } => write!(
                f,
                "preference {input:?}: weight {weight:?} must be an integer from -100 to 100"
            ),
        }
    }
}

impl std::error::Error for ConstraintError {}

/// Says what is wrong with a key or value that [`valid_word`] rejected.
fn describe_bad_word(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    word: &str,
    max: usize,
) -> fmt::Result {
    if word.is_empty() {
        write!(f, "the {what} is empty")
    } else if word.len() > max {
        write!(
            f,
            "the {what} is {} characters long; the limit is {max}",
            word.len()
        )
    } else {
        write!(
            f,
            "{what} {word:?} may only contain letters, digits, '.', '_', '/' and '-'"
        )
    }
}

/// True when `word` is 1 to `max` characters from `A-Z a-z 0-9 . _ / -`.
fn valid_word(word: &str, max: usize) -> bool {
    !word.is_empty()
        && word.len() <= max
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
}

impl Constraint {
    /// Whether the constraint holds on a node with these labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::Eq(want) => value == Some(want),
            Op::Ne(want) => value != Some(want),
            Op::In(wants) => value.is_some_and(|v| wants.contains(v)),
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
        }
    }
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        let key_err = |key: &str| ConstraintError::Key {
            input: input.to_owned(),
            key: key.to_owned(),
        };
        let value_err = |value: &str| ConstraintError::Value {
            input: input.to_owned(),
            value: value.to_owned(),
        };
        let key_of = |key: &str| {
            let key = key.trim();
            if valid_word(key, MAX_KEY_LEN) {
                Ok(key.to_owned())
            } else {
                Err(key_err(key))
            }
        };
        let value_of = |value: &str| {
            let value = value.trim();
            if valid_word(value, MAX_VALUE_LEN) {
                Ok(value.to_owned())
            } else {
                Err(value_err(value))
            }
        };

        if let Some((key, value)) = text.split_once("!=") {
            return Ok(Self {
                key: key_of(key)?,
                op: Op::Ne(value_of(value)?),
            });
        }
        if let Some((key, value)) = text.split_once('=') {
            // Accept `==` as a spelling of `=`.
            let value = value.strip_prefix('=').unwrap_or(value);
            return Ok(Self {
                key: key_of(key)?,
                op: Op::Eq(value_of(value)?),
            });
        }
        let syntax = || ConstraintError::Syntax {
            input: input.to_owned(),
        };
        if let Some(key) = text.strip_prefix('!') {
            let key = key.trim();
            if !valid_word(key, usize::MAX) {
                return Err(syntax());
            }
            return Ok(Self {
                key: key_of(key)?,
                op: Op::NotExists,
            });
        }
        let Some((key, rest)) = text.split_once(char::is_whitespace) else {
            if !valid_word(text, usize::MAX) {
                return Err(syntax());
            }
            return Ok(Self {
                key: key_of(text)?,
                op: Op::Exists,
            });
        };
        let list = rest.trim_start().strip_prefix("in").filter(|after| {
            after.is_empty() || after.starts_with(char::is_whitespace) || after.starts_with('(')
        });
        let Some(list) = list else {
            return Err(syntax());
        };
        let key = key_of(key)?;
        let list = list.trim();
        let list = match list.strip_prefix('(') {
            Some(inner) => inner.strip_suffix(')').ok_or_else(syntax)?,
            None => list,
        };
        if list.trim().is_empty() {
            return Err(ConstraintError::EmptyList {
                input: input.to_owned(),
            });
        }
        let values = list
            .split(',')
            .map(value_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            key,
            op: Op::In(values),
        })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        match &self.op {
            Op::Eq(v) => write!(f, "{key}={v}"),
            Op::Ne(v) => write!(f, "{key}!={v}"),
            Op::In(vs) => write!(f, "{key} in {}", vs.join(",")),
            Op::Exists => write!(f, "{key}"),
            Op::NotExists => write!(f, "!{key}"),
        }
    }
}

impl FromStr for Preference {
    type Err = ConstraintError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        // ':' is not a key or value character, so the last one separates the weight.
        let (expr, weight) = match input.rsplit_once(':') {
            Some((expr, weight)) => {
                let weight_text = weight.trim();
                let weight = weight_text
                    .parse::<i32>()
                    .ok()
                    .filter(|w| (-100..=100).contains(w))
                    .ok_or_else(|| ConstraintError::Weight {
                        input: input.to_owned(),
                        weight: weight_text.to_owned(),
                    })?;
                (expr, weight)
            }
            None => (input, DEFAULT_WEIGHT),
        };
        Ok(Self {
            constraint: expr.parse()?,
            weight,
        })
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.constraint, self.weight)
    }
}

#[cfg(test)]
#[path = "constraint_test.rs"]
mod tests;
