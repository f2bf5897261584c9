//! The W3C `traceparent` header (trace context level 1): read, as the
//! sidecar and the control plane continue a caller's trace, and written, as
//! the sidecar passes its span on.
//!
//! Plain IDs only: turning them into OpenTelemetry span contexts is the
//! caller's business. Not here: `tracestate`, sampling decisions.

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// Length of a version-00 value: `00-<32 hex>-<16 hex>-<2 hex>`.
const LEN: usize = 55;

/// A parsed `traceparent`: whose span a request is a child of, and whether
/// its trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lower-case hex). Later
    /// versions are read by their first four fields, as the specification
    /// asks; version `ff` and all-zero IDs are invalid.
    pub fn parse(b: &[u8]) -> Option<TraceParent> {
        if b.len() < LEN || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_u64(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != LEN) || (b.len() > LEN && b[LEN] != b'-')
        {
            return None;
        }
        let trace_id = u128::from(hex_u64(&b[3..19])?) << 64 | u128::from(hex_u64(&b[19..35])?);
        let span_id = hex_u64(&b[36..52])?;
        let flags = hex_u64(&b[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The version-00 value naming this span as the parent.
    pub fn encode(&self) -> [u8; LEN] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; LEN];
        out[..3].copy_from_slice(b"00-");
        for (i, byte) in self.trace_id.to_be_bytes().iter().enumerate() {
            out[3 + 2 * i] = HEX[usize::from(byte >> 4)];
            out[4 + 2 * i] = HEX[usize::from(byte & 15)];
        }
        out[35] = b'-';
        for (i, byte) in self.span_id.to_be_bytes().iter().enumerate() {
            out[36 + 2 * i] = HEX[usize::from(byte >> 4)];
            out[37 + 2 * i] = HEX[usize::from(byte & 15)];
        }
        out[52] = b'-';
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }
}

/// Lower-case hex digits (at most 16) as a number.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n = n << 4 | u64::from(v);
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips() {
        let p = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        assert_eq!(&p.encode()[..], VALID.as_bytes());
        let unsampled = TraceParent {
            sampled: false,
            ..p
        };
        assert!(unsampled.encode().ends_with(b"-00"));
        let flags = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03";
        assert!(TraceParent::parse(flags.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-abc-def-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        // A later version may append fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
    }
}
