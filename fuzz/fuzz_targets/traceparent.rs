//! `traceparent` (a caller's header, read by the sidecar and the control
//! plane). Invariants: no panic; what parses has non-zero IDs, re-encodes
//! as version 00 and parses back to itself; a version-00 value round-trips
//! byte for byte (up to the flags beyond `sampled`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pylon_proto::traceparent::TraceParent;

fuzz_target!(|data: &[u8]| {
    let Some(p) = TraceParent::parse(data) else {
        return;
    };
    assert!(p.trace_id != 0 && p.span_id != 0);
    assert!(data.len() >= 55 && &data[..2] != b"ff");
    let encoded = p.encode();
    assert_eq!(TraceParent::parse(&encoded), Some(p));
    if data.starts_with(b"00-") {
        assert_eq!(data.len(), 55);
        assert_eq!(&encoded[..53], &data[..53]);
    }
});
