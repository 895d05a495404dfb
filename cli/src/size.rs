//! Sizes as operators type them: `256MiB`, `4GiB`, `512M`, `1G`, or a plain number of MiB.

/// Parses a size into bytes. Units: B, KiB/K, MiB/M, GiB/G, TiB/T (binary); no unit means MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256MiB or 4GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 0,
        "k" | "kib" | "kb" => 10,
        "" | "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return Err(format!("{s:?}: unit must be B, KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Bytes to whole MiB, rounding up, for VM and node memory.
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in [
            "",
            "MiB",
            "-1G",
            "1.5G",
            "12XB",
            "99999999999999999999T",
            "20000000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(mib(1), 1);
    }
}
