//! Deadlines: the `grpc-timeout` header (parse and format, per the gRPC
//! HTTP/2 protocol spec) and the effective deadline of a call.
//!
//! A call's deadline is the earlier of the caller's (`grpc-timeout`) and the
//! route's (`timeouts.request`). Upstream attempts get the time that remains,
//! rewritten on each attempt. Enforcement lives with the call (`proxy::stack`)
//! and the response body (`proxy::end_of_body`).

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Parses `grpc-timeout`: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`). Anything else is treated as absent, as the spec asks.
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let bytes = value.as_bytes();
    let (&unit, digits) = bytes.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as `grpc-timeout` with the finest unit that fits in
/// eight digits, rounding down so the next hop never gets more time than
/// there is.
pub fn format_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u64 = 99_999_999;
    // In u64 (584 years of nanoseconds): u128 division is a library call.
    let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let units: [(u64, u8); 6] = [
        (1, b'n'),
        (1_000, b'u'),
        (1_000_000, b'm'),
        (1_000_000_000, b'S'),
        (60_000_000_000, b'M'),
        (3_600_000_000_000, b'H'),
    ];
    let (value, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos / per, unit))
        .find(|&(v, _)| v <= MAX)
        .unwrap_or((MAX, b'H'));
    let mut value = value as u32; // at most MAX
    // At most eight digits and the unit, written from the end.
    let mut buf = [0u8; 9];
    let mut at = buf.len() - 1;
    buf[at] = unit;
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[at..]).unwrap_or(HeaderValue::from_static("0n"))
}

/// The deadline of a call starting `now`: the earlier of the caller's
/// timeout and the route's; `None` when neither sets one.
pub fn effective_deadline(
    now: Instant,
    caller: Option<Duration>,
    route: Option<Duration>,
) -> Option<Instant> {
    let timeout = match (caller, route) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(now + timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<Duration> {
        parse_grpc_timeout(&HeaderValue::from_str(s).unwrap())
    }

    #[test]
    fn parses_every_unit_and_rejects_what_the_spec_rejects() {
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse("0m"), Some(Duration::ZERO));
        for bad in [
            "",
            "m",
            "123456789m",
            "1.5S",
            "-1S",
            "10s",
            "10",
            "1 S",
            "S1",
            "1Sx",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_with_the_finest_unit_that_fits_rounding_down() {
        let f = |d: Duration| format_grpc_timeout(d).to_str().unwrap().to_string();
        assert_eq!(f(Duration::from_nanos(5)), "5n");
        assert_eq!(f(Duration::from_millis(50)), "50000000n");
        assert_eq!(f(Duration::from_millis(150)), "150000u");
        assert_eq!(f(Duration::from_nanos(150_000_999)), "150000u");
        assert_eq!(f(Duration::from_secs(2)), "2000000u");
        assert_eq!(f(Duration::from_secs(500)), "500000m");
        assert_eq!(f(Duration::from_secs(200_000)), "200000S");
        assert_eq!(f(Duration::from_secs(400 * 86_400)), "34560000S");
        assert_eq!(f(Duration::from_secs(4000 * 86_400)), "5760000M");
        assert_eq!(f(Duration::ZERO), "0n");
        assert_eq!(f(Duration::from_nanos(99_999_999)), "99999999n");
        // Saturated at 584 years of nanoseconds: still never more than there is.
        assert_eq!(f(Duration::MAX), "5124095H");
        for d in [1u64, 999, 123_456_789, 86_400_000_000_000] {
            let d = Duration::from_nanos(d);
            let back = parse(&f(d)).unwrap();
            assert!(
                back <= d && back.as_nanos() * 1001 >= d.as_nanos() * 1000,
                "{d:?} → {back:?}"
            );
        }
    }

    #[test]
    fn the_earlier_deadline_wins() {
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(effective_deadline(now, None, None), None);
        assert_eq!(effective_deadline(now, Some(s(5)), None), Some(now + s(5)));
        assert_eq!(effective_deadline(now, None, Some(s(2))), Some(now + s(2)));
        assert_eq!(
            effective_deadline(now, Some(s(5)), Some(s(2))),
            Some(now + s(2))
        );
        assert_eq!(
            effective_deadline(now, Some(s(1)), Some(s(2))),
            Some(now + s(1))
        );
    }
}
