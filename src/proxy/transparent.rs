//! Transparent traffic: what to do with a connection iptables redirected.
//!
//! - [`detect`] reads a connection's first bytes (within a timeout) and
//!   says whether it speaks HTTP/1, HTTP/2 (the preface), or something else
//!   (TLS, a database protocol, or silence: a server-first protocol);
//!   the bytes read are replayed to whoever serves it ([`Prefixed`]).
//! - [`passthrough`] carries an opaque connection to its original
//!   destination, byte for byte.
//!
//! [`OwnSocket`] (in `http`, where connections are opened) remembers the
//! local addresses of the connections the sidecar itself opens, so that one
//! coming back through a redirect (the proxy's UID not excluded from
//! interception) is refused instead of recursing.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::own_socket::OwnSocket;
pub use crate::http::prefixed::Prefixed;

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else: passed through unchanged.
    Opaque,
}

/// The HTTP/2 connection preface (RFC 9113 § 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request-line starts of HTTP/1 (RFC 9110 methods).
const H1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];
/// The most bytes detection needs: the HTTP/2 preface.
const DETECT_BYTES: usize = H2_PREFACE.len();

/// Classifies a connection's first bytes; `None` while they could still be
/// the start of more than one answer.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    let mut undecided = false;
    for (candidate, protocol) in std::iter::once((H2_PREFACE, Protocol::Http2))
        .chain(H1_METHODS.iter().map(|m| (*m, Protocol::Http1)))
    {
        let n = prefix.len().min(candidate.len());
        if prefix[..n] == candidate[..n] {
            if n == candidate.len() {
                return Some(protocol);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Whether `prefix` starts a TLS handshake record (a ClientHello): content
/// type 22, major version 3.
pub fn is_tls(prefix: &[u8]) -> bool {
    prefix.len() >= 2 && prefix[0] == 0x16 && prefix[1] == 0x03
}

/// Reads `tcp`'s first bytes until they say what it speaks, or until
/// `timeout` (a client that waits for the server to speak first) or EOF:
/// then it is opaque. Returns the bytes read, to be replayed.
pub async fn detect(tcp: &mut TcpStream, timeout: Duration) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(DETECT_BYTES);
    let read = async {
        loop {
            if let Some(p) = classify(&buf) {
                return io::Result::Ok(p);
            }
            if buf.len() >= DETECT_BYTES || tcp.read_buf(&mut buf).await? == 0 {
                return Ok(Protocol::Opaque);
            }
        }
    };
    let protocol = match tokio::time::timeout(timeout, read).await {
        Ok(r) => r?,
        Err(_) => Protocol::Opaque,
    };
    Ok((protocol, buf.freeze()))
}

/// How long an opaque connection's connect may take.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries `client` (whose first bytes, already read, are `prefix`) to
/// `dst` unchanged, until both directions close; logs how it ended.
pub async fn passthrough(client: TcpStream, prefix: Bytes, dst: SocketAddr) {
    let peer = client.peer_addr().ok();
    match copy_to(client, prefix, dst).await {
        Ok((up, down)) => tracing::debug!(?peer, %dst, up, down, "connection passed through"),
        Err(e) => {
            tracing::debug!(?peer, %dst, error = %e, "connection passed through ended with an error");
        }
    }
}

async fn copy_to(mut client: TcpStream, prefix: Bytes, dst: SocketAddr) -> io::Result<(u64, u64)> {
    let mut upstream = tokio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _own = OwnSocket::register(&upstream);
    let _ = upstream.set_nodelay(true);
    if !prefix.is_empty() {
        upstream.write_all(&prefix).await?;
    }
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok((up + prefix.len() as u64, down))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http1_http2_tls_and_the_rest() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"G"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST "), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        // `P` could be POST, PUT, PATCH or the HTTP/2 preface.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(classify(&more), Some(Protocol::Http2));
        // A TLS ClientHello, a Redis command, an SSH banner, lowercase get.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert!(is_tls(&[0x16, 0x03, 0x01]));
        assert!(!is_tls(b"GET /"));
        assert!(!is_tls(&[0x16]));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn detection_reads_across_segments_and_gives_up_on_silence() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PRI * HTTP/2").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            client.write_all(b".0\r\n\r\nSM\r\n\r\n").await.unwrap();
            client
        });
        let (p, prefix) = detect(&mut server, Duration::from_secs(30)).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        assert_eq!(&prefix[..], H2_PREFACE);
        let _client = writer.await.unwrap();

        // A server-first protocol: the client says nothing.
        let (_client, mut server) = pair().await;
        let (p, prefix) = detect(&mut server, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!((p, prefix.len()), (Protocol::Opaque, 0));

        // EOF before a decision.
        let (mut client, mut server) = pair().await;
        client.write_all(b"GE").await.unwrap();
        drop(client);
        let (p, prefix) = detect(&mut server, Duration::from_secs(30)).await.unwrap();
        assert_eq!((p, &prefix[..]), (Protocol::Opaque, &b"GE"[..]));
    }

    #[tokio::test]
    async fn prefixed_replays_what_detection_read() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (p, prefix) = detect(&mut server, Duration::from_secs(30)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        drop(client);
        let mut all = Vec::new();
        Prefixed::new(prefix, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn own_sockets_are_known_while_open() {
        let (client, _server) = pair().await;
        let local = client.local_addr().unwrap();
        assert!(!OwnSocket::is_own(local));
        let own = OwnSocket::register(&client);
        assert!(OwnSocket::is_own(local));
        drop(own);
        assert!(!OwnSocket::is_own(local));
    }
}
