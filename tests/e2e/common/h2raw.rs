//! Raw HTTP/2 for clients that break the rules: a frame writer, a tiny
//! HPACK encoder (literal fields, with or without indexing, and indexed
//! references; no Huffman), a frame reader, the error codes by name, and
//! a reader that waits for the server to cut the client off (GOAWAY,
//! RST_STREAM, EOF).
//!
//! Works over any byte stream: plaintext (h2c) or TLS (ALPN h2).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;

/// The largest frame payload a peer must accept (SETTINGS_MAX_FRAME_SIZE
/// default).
pub const MAX_FRAME: usize = 16_384;

/// The name of an HTTP/2 error code, for messages.
pub fn error_name(code: u32) -> &'static str {
    match code {
        NO_ERROR => "NO_ERROR",
        PROTOCOL_ERROR => "PROTOCOL_ERROR",
        INTERNAL_ERROR => "INTERNAL_ERROR",
        FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
        STREAM_CLOSED => "STREAM_CLOSED",
        FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
        REFUSED_STREAM => "REFUSED_STREAM",
        CANCEL => "CANCEL",
        COMPRESSION_ERROR => "COMPRESSION_ERROR",
        ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
        _ => "another code",
    }
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame with `settings` (identifier, value).
pub fn settings(settings: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in settings {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// A header block sent as HEADERS and as many CONTINUATION frames as it
/// needs, the last with END_HEADERS.
pub fn headers(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= END_HEADERS;
    }
    let mut out = frame(HEADERS, flags, stream, first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        out.extend(frame(CONTINUATION, flags, stream, chunk));
    }
    out
}

/// HPACK: an integer with an `prefix`-bit prefix after the bits of `first`.
fn integer(out: &mut Vec<u8>, first: u8, prefix: u8, n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = n - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, its name a literal too.
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    string(out, name.as_bytes());
    string(out, value);
}

/// A literal field with incremental indexing: the decoder adds it to its
/// dynamic table (as entry 62, the newest).
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    string(out, name.as_bytes());
    string(out, value);
}

/// A reference to table entry `index` (static 1–61, dynamic from 62).
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    integer(out, 0x80, 7, index);
}

/// The block of literal `fields`.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        literal(&mut block, name, value.as_bytes());
    }
    block
}

/// The pseudo-headers of a request, as literal fields.
pub fn request_block(method: &str, scheme: &str, authority: &str, path: &str) -> Vec<u8> {
    header_block(&[
        (":method", method),
        (":scheme", scheme),
        (":authority", authority),
        (":path", path),
    ])
}

/// One frame read.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        code(&self.payload, at)
    }
}

pub fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream,
        payload,
    })
}

/// The preface and our `settings`, then the server's SETTINGS read and
/// acknowledged: the connection is ready for streams.
pub async fn handshake(io: &mut (impl AsyncRead + AsyncWrite + Unpin), ours: &[(u16, u32)]) {
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(ours));
    io.write_all(&hello).await.unwrap();
    loop {
        let f = read_frame(io).await.expect("the server's SETTINGS");
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            break;
        }
    }
    io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
}

/// How the server cut a client off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// GOAWAY with this error code.
    GoAway(u32),
    /// RST_STREAM of this stream with this code.
    Reset(u32, u32),
    /// A response head that ended the stream, its `:status` when it could
    /// be read.
    Answered(u32, Option<u16>),
    /// The connection ended without either (EOF or a transport error).
    Closed,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Cut::GoAway(code) => write!(f, "GOAWAY {}", error_name(code)),
            Cut::Reset(stream, code) => write!(f, "RST_STREAM {stream} {}", error_name(code)),
            Cut::Answered(stream, status) => write!(f, "stream {stream} answered {status:?}"),
            Cut::Closed => f.write_str("closed"),
        }
    }
}

/// Reads frames until the server cuts the client off (GOAWAY, RST_STREAM,
/// a response that ends its stream, or the end of the connection); `None`
/// if nothing of the kind came within `patience`. PINGs and SETTINGS are
/// not answered: the reader only watches.
pub async fn cut_off(io: &mut (impl AsyncRead + Unpin), patience: Duration) -> Option<Cut> {
    tokio::time::timeout(patience, async {
        loop {
            let Ok(f) = read_frame(io).await else {
                return Cut::Closed;
            };
            match f.kind {
                GOAWAY => return Cut::GoAway(f.error_code()),
                RST_STREAM => return Cut::Reset(f.stream, f.error_code()),
                HEADERS if f.flags & END_STREAM != 0 => {
                    return Cut::Answered(f.stream, status_of(&f.payload));
                }
                _ => {}
            }
        }
    })
    .await
    .ok()
}

/// Reads frames until the server ends the connection itself (GOAWAY, or
/// EOF / a transport error), past any stream resets and responses; `None`
/// if it did not within `patience`.
pub async fn connection_cut(io: &mut (impl AsyncRead + Unpin), patience: Duration) -> Option<Cut> {
    tokio::time::timeout(patience, async {
        loop {
            match read_frame(io).await {
                Ok(f) if f.kind == GOAWAY => return Cut::GoAway(f.error_code()),
                Ok(_) => {}
                Err(_) => return Cut::Closed,
            }
        }
    })
    .await
    .ok()
}

/// Reads until the connection ends (EOF or an error), whatever frames
/// come first; whether it did within `patience`.
pub async fn closed(io: &mut (impl AsyncRead + Unpin), patience: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(patience, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The `:status` of a response header block when its first field gives it
/// plainly: an indexed static entry (8–14), or a literal with the static
/// name `:status` whose value is raw or Huffman-coded digits.
pub fn status_of(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    if first & 0x80 != 0 {
        let i = usize::from(first & 0x7f);
        return (8..=14).contains(&i).then(|| STATIC[i - 8]);
    }
    // Literal with incremental indexing (6-bit name index), without
    // indexing or never indexed (4-bit): name index 8 is `:status`.
    let name = if first & 0x40 != 0 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if name != 8 {
        return None;
    }
    let len_byte = *block.get(1)?;
    let len = usize::from(len_byte & 0x7f);
    let value = block.get(2..2 + len)?;
    let digits = if len_byte & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// Decodes a Huffman-coded string of ASCII digits (HPACK's codes for
/// `0`–`2` are five bits, `3`–`9` six).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let value = |from: usize, n: usize| -> Option<u8> {
        bits.get(from..from + n)
            .map(|b| b.iter().fold(0u8, |v, bit| (v << 1) | bit))
    };
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        if bits[at..].iter().all(|&b| b == 1) && bits.len() - at < 8 {
            break; // padding
        }
        match value(at, 5)? {
            v @ 0..=2 => {
                out.push(char::from(b'0' + v));
                at += 5;
            }
            _ => {
                let v = value(at, 6)?;
                if !(0b011001..=0b011111).contains(&v) {
                    return None;
                }
                out.push(char::from(b'3' + (v - 0b011001)));
                at += 6;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_from_a_response_head() {
        assert_eq!(status_of(&[0x88]), Some(200));
        assert_eq!(status_of(&[0x08, 3, b'4', b'3', b'1']), Some(431));
        // "431" Huffman-coded: 011010 011001 00001, padded with ones.
        assert_eq!(status_of(&[0x48, 0x83, 0x69, 0x90, 0xff]), Some(431));
    }
}
