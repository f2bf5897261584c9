//! `grpc-timeout` (a caller's header): parse, then the deadline it makes,
//! then the value the next hop gets. Invariants: only 1–8 digits and a unit
//! parse; formatting fits the spec (≤ 8 digits) and never grants more time
//! than there is; the deadline arithmetic never panics.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use pylon::http::deadline::{effective_deadline, format_grpc_timeout, parse_grpc_timeout};

fn check_format(d: Duration) {
    let v = format_grpc_timeout(d);
    let b = v.as_bytes();
    assert!((2..=9).contains(&b.len()), "{v:?}");
    let back = parse_grpc_timeout(&v).expect("a formatted grpc-timeout parses");
    let cap = Duration::from_secs(99_999_999 * 3600);
    assert!(
        back <= d.min(cap),
        "{d:?} formatted as {v:?} grows to {back:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let parsed = parse_grpc_timeout(&value);
        if let Some(d) = parsed {
            let (unit, digits) = data.split_last().expect("non-empty");
            assert!((1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit));
            assert!(b"HMSmun".contains(unit));
            check_format(d);
            // Time only moves forward: the route's bound wins when shorter.
            let now = tokio::time::Instant::now();
            let dl =
                effective_deadline(now, Some(d), Some(Duration::from_secs(1))).expect("a deadline");
            assert!(dl <= now + Duration::from_secs(1));
            let _ = effective_deadline(now, Some(d), None);
        }
    }
    // Any duration the proxy might have left, as the next hop's header.
    if data.len() >= 12 {
        let secs = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let nanos = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")) % 1_000_000_000;
        check_format(Duration::new(secs, nanos));
    }
});
