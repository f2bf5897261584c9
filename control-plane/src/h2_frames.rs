//! Reads the HTTP/2 frames a server writes, to learn which streams and
//! connections it refused: `RST_STREAM` and `GOAWAY` with their error
//! codes. h2 enforces the limits ([`crate::limits`]) and says nothing to its
//! caller when a stream is refused; what it sends the peer is the one
//! complete account, so the listener counts that.
//!
//! Not here: changing or delaying a byte; reading what the client sends.

/// A frame the server sent that ends a stream or the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// `RST_STREAM` with this error code.
    Reset(u32),
    /// `GOAWAY` with this error code.
    GoAway(u32),
}

const HEADER_LEN: usize = 9;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;

/// Follows a server's outgoing byte stream frame by frame, however it is
/// split into writes.
#[derive(Debug, Default)]
pub struct FrameReader {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// The first payload bytes of a frame we read (RST_STREAM: the code;
    /// GOAWAY: the last stream id, then the code).
    wanted: [u8; 8],
    wanted_len: usize,
    wanted_total: usize,
    kind: u8,
}

impl FrameReader {
    /// Feeds bytes the server wrote, calling `on` for each complete
    /// RST_STREAM and GOAWAY.
    pub fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Sent)) {
        while !bytes.is_empty() {
            if self.header_len < HEADER_LEN {
                let n = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == HEADER_LEN {
                    self.start_frame();
                }
                continue;
            }
            let n = self.payload_left.min(bytes.len());
            let want = (self.wanted_total - self.wanted_len).min(n);
            self.wanted[self.wanted_len..self.wanted_len + want].copy_from_slice(&bytes[..want]);
            self.wanted_len += want;
            self.payload_left -= n;
            bytes = &bytes[n..];
            if want > 0 && self.wanted_len == self.wanted_total {
                self.emit(&mut on);
            }
            if self.payload_left == 0 {
                self.header_len = 0;
            }
        }
    }

    fn start_frame(&mut self) {
        let h = &self.header;
        self.payload_left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        self.kind = h[3];
        self.wanted_len = 0;
        self.wanted_total = match self.kind {
            RST_STREAM => 4,
            GOAWAY => 8,
            _ => 0,
        }
        .min(self.payload_left);
        if self.payload_left == 0 {
            self.header_len = 0;
        }
    }

    fn emit(&self, on: &mut impl FnMut(Sent)) {
        let w = &self.wanted;
        match (self.kind, self.wanted_total) {
            (RST_STREAM, 4) => on(Sent::Reset(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))),
            (GOAWAY, 8) => on(Sent::GoAway(u32::from_be_bytes([w[4], w[5], w[6], w[7]]))),
            _ => {}
        }
    }
}

/// The name of an HTTP/2 error code (RFC 9113 § 7), `other` for codes it
/// does not define: a bounded metric label.
pub fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn stream_of_frames() -> Vec<u8> {
        let mut bytes = frame(0x4, 0, &[0, 3, 0, 0, 0, 100]); // SETTINGS
        bytes.extend(frame(0x1, 1, &[0x88; 40])); // HEADERS
        bytes.extend(frame(RST_STREAM, 3, &7u32.to_be_bytes()));
        bytes.extend(frame(0x0, 1, &[0x52; 70_000 & 0xffff])); // DATA
        bytes.extend(frame(RST_STREAM, 5, &8u32.to_be_bytes()));
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend(11u32.to_be_bytes());
        goaway.extend(b"too_many_resets");
        bytes.extend(frame(GOAWAY, 0, &goaway));
        bytes
    }

    const EXPECTED: [Sent; 3] = [Sent::Reset(7), Sent::Reset(8), Sent::GoAway(11)];

    #[test]
    fn finds_resets_and_goaways_in_one_write() {
        let mut seen = Vec::new();
        FrameReader::default().feed(&stream_of_frames(), |s| seen.push(s));
        assert_eq!(seen, EXPECTED);
    }

    #[test]
    fn finds_them_however_the_bytes_are_split() {
        let bytes = stream_of_frames();
        for chunk in [1, 2, 3, 5, 8, 9, 10, 13, 4096] {
            let mut reader = FrameReader::default();
            let mut seen = Vec::new();
            for part in bytes.chunks(chunk) {
                reader.feed(part, |s| seen.push(s));
            }
            assert_eq!(seen, EXPECTED, "chunks of {chunk}");
        }
    }

    #[test]
    fn codes_have_bounded_names() {
        assert_eq!(code_name(7), "REFUSED_STREAM");
        assert_eq!(code_name(11), "ENHANCE_YOUR_CALM");
        assert_eq!(code_name(0x1234), "other");
    }
}
