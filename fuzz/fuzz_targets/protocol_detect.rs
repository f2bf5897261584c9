//! Protocol detection of a redirected connection's first bytes, as
//! `transparent::detect` reads them: in whatever pieces the network
//! delivers. Invariants: no panic; the answer does not depend on how the
//! bytes were split; once decided it never changes as more bytes arrive;
//! undecided only while shorter than the HTTP/2 preface; an HTTP/2 answer
//! means exactly the preface.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pylon::proxy::transparent::{Protocol, classify, is_tls};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `detect`'s loop over reads of the given sizes: the protocol and how many
/// bytes were read before deciding.
fn detect(data: &[u8], sizes: &[u8]) -> (Protocol, usize) {
    let mut buf: Vec<u8> = Vec::new();
    let mut sizes = sizes.iter().map(|&s| usize::from(s % 32) + 1).cycle();
    let mut rest = data;
    loop {
        if let Some(p) = classify(&buf) {
            return (p, buf.len());
        }
        if buf.len() >= PREFACE.len() || rest.is_empty() {
            return (Protocol::Opaque, buf.len());
        }
        // A read fills at most the buffer's spare capacity (the preface length).
        let n = sizes
            .next()
            .unwrap_or(usize::MAX)
            .min(rest.len())
            .min(PREFACE.len() * 2);
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

fuzz_target!(|input: &[u8]| {
    let (sizes, data) = match input.split_first() {
        Some((&k, rest)) => rest.split_at(usize::from(k % 8).min(rest.len())),
        None => return,
    };
    let _ = is_tls(data);
    let mut decided: Option<Protocol> = None;
    for end in 0..=data.len().min(PREFACE.len() + 8) {
        let c = classify(&data[..end]);
        match (decided, c) {
            (Some(d), c) => assert_eq!(c, Some(d), "decided {d:?}, then {c:?} at {end}"),
            (None, Some(p)) => decided = Some(p),
            (None, None) => assert!(end < PREFACE.len(), "undecided after {end} bytes"),
        }
    }
    if let Some(p) = classify(data) {
        if p == Protocol::Http2 {
            assert!(data.starts_with(PREFACE));
        }
    }
    // Whole or in pieces: the same answer.
    let (whole, _) = detect(data, &[255]);
    let (pieces, _) = detect(data, if sizes.is_empty() { &[0] } else { sizes });
    assert_eq!(whole, pieces, "whole vs in pieces of {sizes:?}");
    if data.len() >= PREFACE.len() + 32 {
        // Enough bytes for any answer however they arrive.
        assert_eq!(whole, classify(data).unwrap_or(Protocol::Opaque));
    }
});
