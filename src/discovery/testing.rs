//! A DNS server on loopback for the tests and the demo: it answers A and
//! AAAA queries from a table that the test changes while it runs, fails
//! names on demand and counts the queries it receives. It is not a name
//! server (no zones, no recursion, no EDNS options), and production
//! resolution never talks to it.
//!
//! ```ignore
//! let server = TestDnsServer::start().await?;
//! server.set("greeter.test", vec![ip], 1);
//! let dns = Dns::new(&DnsConfig { min_ttl: Duration::from_secs(1), ..server.config() })?;
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::DnsConfig;

/// Serves UDP and TCP on one port of 127.0.0.1 until dropped. Names are
/// case-insensitive and a trailing dot is optional; unknown names get
/// NXDOMAIN. Negative answers (NXDOMAIN, or no address of the asked family)
/// carry an SOA allowing them to be cached for [`NEGATIVE_TTL_SECS`], as a
/// real server's would: a client that caches them would not see a name come
/// back.
pub struct TestDnsServer {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Table {
    answers: HashMap<String, Answer>,
    queries: HashMap<String, usize>,
}

/// The negative-caching TTL (RFC 2308) announced with NXDOMAIN and empty
/// answers.
pub const NEGATIVE_TTL_SECS: u32 = 3600;

enum Answer {
    Addresses { ips: Vec<IpAddr>, ttl: u32 },
    ServFail,
}

impl TestDnsServer {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and starts
    /// serving. Must be called within a tokio runtime.
    pub async fn start() -> io::Result<TestDnsServer> {
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr()?;
        let table = Arc::new(Mutex::new(Table::default()));
        let tasks = vec![
            tokio::spawn(serve_udp(udp, table.clone())),
            tokio::spawn(serve_tcp(tcp, table.clone())),
        ];
        Ok(TestDnsServer { addr, table, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The default DNS configuration, with this server as the only name
    /// server.
    pub fn config(&self) -> DnsConfig {
        DnsConfig {
            nameservers: vec![self.addr],
            ..DnsConfig::default()
        }
    }

    /// Answers `name` with `ips` (A for the IPv4 ones, AAAA for the IPv6
    /// ones) and TTL `ttl_secs`. No address of the asked family: NOERROR
    /// with an empty answer.
    pub fn set(&self, name: &str, ips: Vec<IpAddr>, ttl_secs: u32) {
        self.lock()
            .answers
            .insert(key(name), Answer::Addresses { ips, ttl: ttl_secs });
    }

    /// Answers `name` with SERVFAIL until it is set again.
    pub fn fail(&self, name: &str) {
        self.lock().answers.insert(key(name), Answer::ServFail);
    }

    /// Forgets `name`: NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.lock().answers.remove(&key(name));
    }

    /// Queries received for `name`, of any type, over UDP and TCP. One
    /// resolution asks at least twice (A and AAAA) per name it tries.
    pub fn queries(&self, name: &str) -> usize {
        self.lock().queries.get(&key(name)).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

impl Drop for TestDnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panicking test thread must not take the server down with it.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A UDP socket and a TCP listener on the same port: resolvers reach a name
/// server at one address over both.
async fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    for _ in 0..32 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no loopback port free for both UDP and TCP",
    ))
}

async fn serve_udp(socket: UdpSocket, table: Arc<Mutex<Table>>) {
    let mut buf = vec![0; 4096];
    loop {
        // Errors here are per datagram (e.g. an ICMP error from an earlier
        // reply): skip and keep serving.
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(reply) = respond(&table, &buf[..n]) else {
            continue;
        };
        let bytes = match reply.to_vec() {
            Ok(b) if b.len() <= usize::from(reply.max_payload()) => b,
            // Too large for the client's UDP buffer: it retries over TCP.
            _ => match reply.truncate().to_vec() {
                Ok(b) => b,
                Err(_) => continue,
            },
        };
        let _ = socket.send_to(&bytes, peer).await;
    }
}

async fn serve_tcp(listener: TcpListener, table: Arc<Mutex<Table>>) {
    // Dropping the set (when this task is aborted) ends every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.spawn(serve_tcp_connection(stream, table.clone()));
        while connections.try_join_next().is_some() {}
    }
}

/// DNS over TCP: each message is prefixed with its length (two bytes).
async fn serve_tcp_connection(mut stream: TcpStream, table: Arc<Mutex<Table>>) {
    loop {
        let mut len = [0; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut request = vec![0; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut request).await.is_err() {
            return;
        }
        let Some(bytes) = respond(&table, &request).and_then(|m| m.to_vec().ok()) else {
            return;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The reply to one query message; `None` for bytes that are not a DNS
/// message (no id to answer to).
fn respond(table: &Mutex<Table>, request: &[u8]) -> Option<Message> {
    let request = Message::from_vec(request).ok()?;
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(request.max_payload());
        reply.set_edns(edns);
    }

    let [query] = request.queries.as_slice() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return Some(reply);
    };
    let name = key(&query.name().to_ascii());
    let mut table = lock(table);
    *table.queries.entry(name.clone()).or_default() += 1;
    match table.answers.get(&name) {
        None => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(negative_soa(query.name()));
        }
        Some(Answer::ServFail) => reply.metadata.response_code = ResponseCode::ServFail,
        Some(Answer::Addresses { ips, ttl }) => {
            let wanted = |ip: &&IpAddr| match query.query_type() {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                _ => false,
            };
            for ip in ips.iter().filter(wanted) {
                reply.add_answer(Record::from_rdata(
                    query.name().clone(),
                    *ttl,
                    RData::from(*ip),
                ));
            }
            if reply.answers.is_empty() {
                reply.add_authority(negative_soa(query.name()));
            }
        }
    }
    Some(reply)
}

/// An SOA for the authority section of a negative answer, owned by the
/// asked name itself (the server has no zones).
fn negative_soa(name: &Name) -> Record {
    let soa = SOA::new(
        name.clone(),
        name.clone(),
        1,
        3600,
        600,
        86_400,
        NEGATIVE_TTL_SECS,
    );
    Record::from_rdata(name.clone(), NEGATIVE_TTL_SECS, RData::SOA(soa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::Name;

    fn ask(table: &Mutex<Table>, name: &str, record_type: RecordType) -> Message {
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        let reply = respond(table, &query.to_vec().unwrap()).unwrap();
        Message::from_vec(&reply.to_vec().unwrap()).unwrap()
    }

    #[test]
    fn answers_from_the_table() {
        let table = Mutex::new(Table::default());
        lock(&table).answers.insert(
            "a.test".into(),
            Answer::Addresses {
                ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                ttl: 9,
            },
        );
        lock(&table)
            .answers
            .insert("bad.test".into(), Answer::ServFail);

        let a = ask(&table, "A.test.", RecordType::A);
        assert_eq!(a.metadata.id, 7);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.queries.len(), 1, "the question is echoed");
        let got: Vec<_> = a
            .answers
            .iter()
            .map(|r| (r.data.ip_addr(), r.ttl))
            .collect();
        assert_eq!(got, [(Some("10.0.0.1".parse().unwrap()), 9)]);

        let aaaa = ask(&table, "a.test", RecordType::AAAA);
        assert_eq!(aaaa.answers.len(), 1);
        assert!(ask(&table, "a.test", RecordType::MX).answers.is_empty());
        assert_eq!(
            ask(&table, "bad.test", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::ServFail
        );
        assert_eq!(
            ask(&table, "nope.test", RecordType::A)
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(lock(&table).queries.get("a.test"), Some(&3));
    }

    #[tokio::test]
    async fn serves_over_tcp_too() {
        let server = TestDnsServer::start().await.unwrap();
        server.set("t.test", vec!["10.0.0.5".parse().unwrap()], 5);
        let mut query = Message::new(9, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_ascii("t.test.").unwrap(),
            RecordType::A,
        ));
        let bytes = query.to_vec().unwrap();

        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
        stream
            .write_all(&[&len[..], &bytes].concat())
            .await
            .unwrap();
        let mut len = [0; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 9);
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(server.queries("T.TEST"), 1);
    }
}
