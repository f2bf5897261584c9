//! Durations as policy writes them: `<integer><unit>` groups with units `h`,
//! `m`, `s` and `ms` (`250ms`, `2s`, `1m30s`), Gateway API style.
//!
//! Parsing accepts any non-empty sequence of groups; formatting emits the
//! canonical form: the largest single unit that states the value exactly.
//! Whether zero is acceptable is for callers to decide.

use std::time::Duration;

/// Units and their length in milliseconds; `ms` comes before `m` so that
/// `5ms` is not read as five minutes followed by a stray `s`.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1000)];

/// Parses `250ms`, `2s`, `1m30s`, `1h`. Rejects empty, negative, fractional,
/// unit-less and unknown-unit input, and totals that overflow.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |why: &str| Err(format!("invalid duration {s:?}: {why}"));
    if s.is_empty() {
        return fail("empty (expected e.g. 250ms, 2s, 1m30s)");
    }
    if s.starts_with('-') {
        return fail("negative durations are not allowed");
    }
    let mut rest = s;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return fail("expected a whole number before each unit (h, m, s, ms)");
        }
        let (number, after) = rest.split_at(digits);
        if after.starts_with(['.', ',']) {
            return fail(
                "fractional values are not allowed; use a smaller unit (1500ms, not 1.5s)",
            );
        }
        let Some((unit, scale)) = UNITS.iter().find(|(u, _)| after.starts_with(u)) else {
            let unit: String = after.chars().take_while(|c| !c.is_ascii_digit()).collect();
            return if unit.is_empty() {
                fail("missing unit (h, m, s or ms)")
            } else {
                fail(&format!("unknown unit {unit:?} (expected h, m, s or ms)"))
            };
        };
        let group = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(*scale))
            .and_then(|g| total.checked_add(g));
        match group {
            Some(sum) => total = sum,
            None => return fail("too large"),
        }
        rest = &after[unit.len()..];
    }
    Ok(Duration::from_millis(total))
}

/// The canonical spelling: the largest of `h`, `m`, `s`, `ms` that divides
/// the value exactly (`1h`, `5m`, `90s`, `1500ms`, `0s`). Sub-millisecond
/// precision cannot be written, so it rounds up: a positive duration never
/// turns into zero.
pub fn format_duration(d: Duration) -> String {
    let millis = d.as_nanos().div_ceil(1_000_000);
    if millis == 0 {
        return "0s".to_string();
    }
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if millis.is_multiple_of(per) {
            return format!("{}{unit}", millis / per);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_compound_groups() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("250ms", ms(250)),
            ("2s", ms(2000)),
            ("1m30s", ms(90_000)),
            ("1h", ms(3_600_000)),
            ("1h2m3s4ms", ms(3_723_004)),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("007s", ms(7000)),
            ("5m5ms", ms(300_005)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_input() {
        for (text, why) in [
            ("", "empty"),
            ("-1s", "negative"),
            ("1.5s", "fractional"),
            ("1,5s", "fractional"),
            ("10", "missing unit"),
            ("1s5", "missing unit"),
            ("5d", "unknown unit \"d\""),
            ("5 s", "unknown unit \" s\""),
            ("5S", "unknown unit \"S\""),
            ("5us", "unknown unit \"us\""),
            ("s", "whole number"),
            ("+5s", "whole number"),
            (" 5s", "whole number"),
            ("1h ", "whole number"),
            ("18446744073709551616ms", "too large"),
            ("18446744073709552s", "too large"),
            ("18446744073709551615ms1ms", "too large"),
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
            assert!(
                err.starts_with(&format!("invalid duration {text:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn formats_canonically_and_round_trips() {
        let ms = Duration::from_millis;
        for (d, want) in [
            (ms(1500), "1500ms"),
            (ms(2000), "2s"),
            (ms(90_000), "90s"),
            (ms(60_000), "1m"),
            (ms(300_000), "5m"),
            (ms(3_600_000), "1h"),
            (ms(5_400_000), "90m"),
            (ms(1), "1ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_micros(1500), "2ms"),
        ] {
            assert_eq!(format_duration(d), want);
        }
        assert_eq!(parse_duration("18446744073709551615ms"), Ok(ms(u64::MAX)));
        for n in [
            0u64,
            1,
            999,
            1000,
            1001,
            59_999,
            60_000,
            86_400_000,
            123_456_789,
            u64::MAX,
        ] {
            assert_eq!(parse_duration(&format_duration(ms(n))), Ok(ms(n)));
        }
    }
}
