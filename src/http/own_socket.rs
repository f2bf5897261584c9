//! The connections this process opened, known by their local addresses, so
//! that one coming back to the sidecar through an iptables redirect (the
//! proxy's UID not excluded from interception) is refused instead of
//! recursing.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, PoisonError};

use tokio::net::TcpStream;

/// Local addresses of the connections this process opened.
static OWN_SOCKETS: LazyLock<Mutex<HashSet<SocketAddr>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));

/// A connection the sidecar opened, known as its own while this lives.
#[derive(Debug)]
pub struct OwnSocket(Option<SocketAddr>);

impl OwnSocket {
    pub fn register(tcp: &TcpStream) -> OwnSocket {
        let addr = tcp.local_addr().ok();
        if let Some(a) = addr {
            OWN_SOCKETS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(a);
        }
        OwnSocket(addr)
    }

    /// Whether `peer` (an accepted connection's remote address) is one of
    /// this process's own outgoing connections come back.
    pub fn is_own(peer: SocketAddr) -> bool {
        OWN_SOCKETS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&peer)
    }
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            OWN_SOCKETS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&a);
        }
    }
}
