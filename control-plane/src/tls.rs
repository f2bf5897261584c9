//! The control plane's TLS listeners: accept within a connection cap,
//! handshake and read the first protocol bytes within a deadline, and hand
//! the server each connection with who is on the other end. What a
//! connection's server writes is read for the HTTP/2 resets and GOAWAYs
//! that say a limit was hit ([`crate::h2_frames`]), and counted. A peer
//! that stops reading what the server writes (a SETTINGS or PING flood
//! whose answers it never reads, a dead peer) is cut off once a write has
//! waited twice the keepalive interval: HTTP/2's own keepalive cannot
//! close such a connection, since its GOAWAY would have to be written
//! first.
//!
//! tonic's own TLS cannot change its configuration at run time (a CA
//! rotation changes the serving certificate and the client-certificate
//! roots), so the server runs over this acceptor instead
//! (`serve_with_incoming`).
//!
//! Not here: the HTTP/2 limits themselves (hyper's, set by the servers from
//! [`ListenerLimits`]), authentication.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::h2_frames::FrameReader;
use crate::limits::ListenerLimits;
use crate::telemetry::{ListenerMetrics, Refusal};

/// The client connection preface of HTTP/2 (RFC 9113 § 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A listener's limits and what it counts.
#[derive(Clone)]
pub struct Guard {
    pub limits: ListenerLimits,
    pub metrics: ListenerMetrics,
    permits: Arc<Semaphore>,
    open: Arc<AtomicUsize>,
    /// How long a connection lives at most, from its handshake: then it is
    /// closed under the server, whatever is in flight.
    lifetime: Option<Duration>,
}

impl Guard {
    pub fn new(limits: ListenerLimits, metrics: ListenerMetrics) -> Guard {
        metrics.set_open(0);
        Guard {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            open: Arc::new(AtomicUsize::new(0)),
            lifetime: None,
            limits,
            metrics,
        }
    }

    /// Connections are closed `lifetime` after their handshake (`None`:
    /// never). The server's own maximum age ends a connection gracefully
    /// once its calls are done; this is the bound for calls that never are.
    pub fn with_lifetime(self, lifetime: Option<Duration>) -> Guard {
        Guard { lifetime, ..self }
    }

    /// A place for one more connection, unless `max_connections` are open.
    fn admit(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.set_open(open);
        Some(Slot {
            _permit: permit,
            open: self.open.clone(),
            metrics: self.metrics.clone(),
        })
    }
}

/// A connection's place under the cap, given back when it is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
    metrics: ListenerMetrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let open = self.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        self.metrics.set_open(open);
    }
}

/// Who is on the other end of a connection (a request extension).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The client's certificate chain, when it presented one.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A TLS connection served by tonic or hyper.
pub struct TlsConnection {
    tls: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// The first bytes, read to tell the protocol, given back first.
    first: Vec<u8>,
    first_read: usize,
    /// Follows the frames the server writes, on an HTTP/2 connection.
    frames: Option<FrameReader>,
    metrics: ListenerMetrics,
    /// When the connection is closed under the server, if ever.
    closes_at: Option<Pin<Box<tokio::time::Sleep>>>,
    write_stall: WriteStall,
    _slot: Slot,
}

/// How long a write may wait for the peer to read before the connection
/// is cut; the clock runs only while a write is blocked.
struct WriteStall {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStall {
    fn new(limit: Duration) -> WriteStall {
        WriteStall { limit, sleep: None }
    }

    /// `polled`, or an error once the write has been blocked for the limit
    /// (`true` the first time, to count it).
    fn check<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> (Poll<std::io::Result<T>>, bool) {
        if polled.is_ready() {
            self.sleep = None;
            return (polled, false);
        }
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_pending() {
            return (Poll::Pending, false);
        }
        let err = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer read nothing for {limit:?}"),
        );
        (Poll::Ready(Err(err)), true)
    }
}

impl TlsConnection {
    /// `polled` under the write-stall limit, a cut counted once.
    fn unless_stalled<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        let (polled, cut) = self.write_stall.check(polled, cx);
        if cut {
            self.metrics.refused(
                Refusal::WriteStall,
                self.peer.addr,
                &format_args!(
                    "the peer read nothing for {:?}: cut off",
                    self.write_stall.limit
                ),
            );
        }
        polled
    }

    fn observe(&mut self, written: &[u8]) {
        if let Some(frames) = &mut self.frames {
            let (metrics, peer) = (&self.metrics, self.peer.addr);
            frames.feed(written, |sent| metrics.sent(sent, peer));
        }
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(closes_at) = &mut this.closes_at
            && closes_at.as_mut().poll(cx).is_ready()
        {
            tracing::debug!(peer = %this.peer.addr, "closing a connection past its maximum age and grace");
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection is past its maximum age",
            )));
        }
        if this.first_read < this.first.len() {
            let rest = &this.first[this.first_read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.first_read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.tls).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.observe(&buf[..n]);
        }
        self.unless_stalled(written, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.tls).poll_flush(cx);
        self.unless_stalled(flushed, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let shut = Pin::new(&mut self.tls).poll_shutdown(cx);
        self.unless_stalled(shut, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.tls).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = written {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(b.len());
                self.observe(&b[..take]);
                n -= take;
            }
        }
        self.unless_stalled(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The serving configuration: `chain_pem` (leaf first) and `key_pem`, ALPN
/// h2. A client may present a certificate, which must then verify against
/// `client_roots` (the mesh trust bundle, DER); clients without one
/// authenticate by token.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    client_roots: &[Vec<u8>],
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    for der in client_roots {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configurations of `configs`, for an HTTPS listener: ALPN h2 and
/// http/1.1 (the API server calls webhooks over either), the rest the
/// same. Follows every change of `configs`.
pub fn for_https(
    mut configs: watch::Receiver<Arc<ServerConfig>>,
) -> watch::Receiver<Arc<ServerConfig>> {
    let https = |config: &ServerConfig| {
        let mut config = config.clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    };
    let (tx, rx) = watch::channel(https(&configs.borrow_and_update()));
    tokio::spawn(async move {
        while configs.changed().await.is_ok() {
            let next = https(&configs.borrow_and_update());
            if tx.send(next).is_err() {
                return;
            }
        }
    });
    rx
}

/// Accepts on `listener` and yields handshaken connections; a refused
/// connection (over the cap, a handshake that fails or takes too long, no
/// protocol bytes in time) is counted, logged at a bounded rate and
/// dropped, never ends the stream.
///
/// Each connection is served with the configuration current when it was
/// accepted: a new serving certificate or trust bundle (CA rotation) applies
/// to new connections, open ones continue.
pub fn incoming(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    guard: Guard,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to
                    // close rather than spin.
                    tracing::warn!(listener = guard.metrics.listener(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Some(slot) = guard.admit() else {
                guard.metrics.refused(
                    Refusal::Limit,
                    addr,
                    &format_args!("{} connections open", guard.limits.max_connections),
                );
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(configs.borrow().clone());
            let (tx, guard) = (tx.clone(), guard.clone());
            tokio::spawn(async move {
                if let Some(connection) = handshake(acceptor, tcp, addr, &guard, slot).await {
                    let _ = tx.send(Ok(connection)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake and the first bytes, within the handshake timeout.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    guard: &Guard,
    slot: Slot,
) -> Option<TlsConnection> {
    let deadline = tokio::time::Instant::now() + guard.limits.handshake_timeout;
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            guard.metrics.refused(Refusal::HandshakeFailed, addr, &e);
            return None;
        }
        Err(_) => {
            guard.metrics.refused(
                Refusal::HandshakeTimeout,
                addr,
                &format_args!(
                    "no TLS handshake within {:?}",
                    guard.limits.handshake_timeout
                ),
            );
            return None;
        }
    };
    let Ok(first) = tokio::time::timeout_at(deadline, first_bytes(&mut tls)).await else {
        guard.metrics.refused(
            Refusal::FirstBytesTimeout,
            addr,
            &format_args!(
                "no request within {:?} of connecting",
                guard.limits.handshake_timeout
            ),
        );
        return None;
    };
    let first = first.ok()?;
    let certificates = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
    let h2 = first.as_slice() == H2_PREFACE;
    Some(TlsConnection {
        tls,
        peer: PeerInfo { addr, certificates },
        first,
        first_read: 0,
        frames: h2.then(FrameReader::default),
        closes_at: guard.lifetime.map(|l| Box::pin(tokio::time::sleep(l))),
        metrics: guard.metrics.clone(),
        write_stall: WriteStall::new(guard.limits.keepalive_interval * 2),
        _slot: slot,
    })
}

/// Reads until the bytes tell the protocol: the whole HTTP/2 preface, or
/// bytes that cannot begin it (an HTTP/1 request), or the end of the stream.
async fn first_bytes<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
        let n = stream
            .read(&mut chunk[..H2_PREFACE.len() - first.len()])
            .await?;
        if n == 0 {
            break;
        }
        first.extend_from_slice(&chunk[..n]);
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_the_limit_fails_and_any_progress_restarts_the_clock() {
        let limit = Duration::from_secs(20);
        let mut stall = WriteStall::new(limit);
        let mut check = |polled: Poll<std::io::Result<usize>>| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            stall.check(polled, &mut cx)
        };
        assert!(matches!(check(Poll::Pending), (Poll::Pending, false)));
        tokio::time::advance(limit - Duration::from_secs(1)).await;
        assert!(matches!(check(Poll::Pending), (Poll::Pending, false)));
        // The peer read something: the clock starts again.
        assert!(matches!(
            check(Poll::Ready(Ok(1))),
            (Poll::Ready(Ok(1)), false)
        ));
        assert!(matches!(check(Poll::Pending), (Poll::Pending, false)));
        tokio::time::advance(limit - Duration::from_secs(1)).await;
        assert!(matches!(check(Poll::Pending), (Poll::Pending, false)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (polled, cut) = check(Poll::Pending);
        assert!(cut);
        let Poll::Ready(Err(e)) = polled else {
            panic!("not cut: {polled:?}")
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn first_bytes_stop_where_the_protocol_is_known() {
        let read =
            |bytes: &'static [u8]| async move { first_bytes(&mut &bytes[..]).await.unwrap() };
        let mut preface_and_more = H2_PREFACE.to_vec();
        preface_and_more.extend_from_slice(b"\0\0\0\x04");
        let leaked: &'static [u8] = Box::leak(preface_and_more.into_boxed_slice());
        assert_eq!(read(leaked).await, H2_PREFACE);
        // An HTTP/1 request shorter than the preface: what came, without
        // waiting for more.
        assert_eq!(
            read(b"GET / HTTP/1.1\r\n\r\n").await,
            b"GET / HTTP/1.1\r\n\r\n"
        );
        assert_eq!(read(b"PRI *").await, b"PRI *", "the end of the stream");
    }

    #[tokio::test]
    async fn a_dribbling_client_never_completes_the_first_bytes() {
        use futures_util::FutureExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PRI * HT")
            .await
            .unwrap();
        // Everything sent so far is read, and more is awaited: the
        // listener's deadline is what ends this.
        assert!(first_bytes(&mut server).now_or_never().is_none());
    }
}
