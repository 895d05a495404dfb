//! Durations as operators type them: `90s`, `15m`, `1h`, `7d`.

use std::time::Duration;

/// Longest token lifetime accepted.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `<number><unit>` with unit `s`, `m`, `h` or `d`; zero and more than a year are refused.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86400),
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    match secs.map(Duration::from_secs) {
        Some(d) if d.is_zero() => Err("a duration must be positive".into()),
        Some(d) if d <= MAX_TTL => Ok(d),
        _ => Err(format!("{s:?} is longer than a year")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_and_limits_hold() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172800)));
        for bad in ["", "0s", "h", "1y", "-1h", "999999999999999999d", "400d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
