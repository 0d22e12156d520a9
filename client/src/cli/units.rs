//! Human units for tables: sizes in binary units (`256 MiB`), durations and ages in the
//! units `--retention` accepts (`7d`, `1h 30m`). JSON output keeps the raw numbers.

/// Bytes in the largest binary unit that keeps the number at least 1, with at most one
/// decimal: `91 B`, `1.5 KiB`, `256 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // Round to one decimal first, so 1023.96 KiB reads `1 MiB`, not `1024 KiB`.
    let mut tenths = (value * 10.0).round();
    if tenths >= 10_240.0 && unit + 1 < UNITS.len() {
        unit += 1;
        tenths = (tenths / 1024.0).round();
    }
    if tenths % 10.0 == 0.0 {
        format!("{} {}", tenths / 10.0, UNITS[unit])
    } else {
        format!("{:.1} {}", tenths / 10.0, UNITS[unit])
    }
}

/// A duration in milliseconds as days, hours, minutes, seconds and milliseconds, leaving
/// out the zero ones: `7d`, `1h 30m`, `500ms`, `0s`. Exact, and read back by `--retention`.
pub fn duration_ms(ms: u64) -> String {
    const PARTS: [(u64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    if ms == 0 {
        return "0s".into();
    }
    let mut left = ms;
    let mut out = Vec::new();
    for (size, unit) in PARTS {
        if left >= size {
            out.push(format!("{}{unit}", left / size));
            left %= size;
        }
    }
    out.join(" ")
}

/// An age (how long ago something happened) in its one or two largest units, rounded
/// down: `45s`, `3m 12s`, `2d 4h`. For tables, where `3d 4h 12m 9s 31ms` is noise.
pub fn age_ms(ms: u64) -> String {
    let full = duration_ms(ms);
    let parts: Vec<&str> = full.split(' ').collect();
    if parts.len() == 1 {
        return full;
    }
    // Milliseconds only matter for ages under a second.
    parts
        .iter()
        .take(2)
        .filter(|p| !p.ends_with("ms"))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A limit that may be absent (`-`) or negative (`unlimited`), formatted by `f` otherwise.
pub fn limit(value: Option<i64>, f: impl Fn(u64) -> String) -> String {
    match value {
        None => "-".into(),
        Some(v) if v < 0 => "unlimited".into(),
        Some(v) => f(v as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units_with_at_most_one_decimal() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(91), "91 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(268_435_456), "256 MiB");
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(
            bytes((1 << 20) - 1),
            "1 MiB",
            "rounds up into the next unit"
        );
        assert_eq!(bytes(5 << 30), "5 GiB");
        assert_eq!(bytes(u64::MAX), "16 EiB");
    }

    #[test]
    fn durations_are_exact_and_read_back_by_retention() {
        assert_eq!(duration_ms(604_800_000), "7d");
        assert_eq!(duration_ms(5_400_000), "1h 30m");
        assert_eq!(duration_ms(500), "500ms");
        assert_eq!(duration_ms(0), "0s");
        assert_eq!(duration_ms(90_061_001), "1d 1h 1m 1s 1ms");
        for ms in [
            1,
            999,
            1_000,
            61_000,
            604_800_000,
            90_061_001,
            31_536_000_000,
        ] {
            let text = duration_ms(ms);
            let back = crate::cli::parse_duration(&text).expect("parses");
            assert_eq!(back.as_millis() as u64, ms, "{text}");
        }
    }

    #[test]
    fn ages_keep_the_two_largest_units() {
        assert_eq!(age_ms(450), "450ms");
        assert_eq!(age_ms(45_300), "45s");
        assert_eq!(age_ms(192_500), "3m 12s");
        assert_eq!(age_ms(187_929_031), "2d 4h");
        assert_eq!(age_ms(3_600_000), "1h");
    }

    #[test]
    fn limits_say_unlimited_or_absent() {
        assert_eq!(limit(Some(-1), duration_ms), "unlimited");
        assert_eq!(limit(None, bytes), "-");
        assert_eq!(limit(Some(1 << 30), bytes), "1 GiB");
    }
}
