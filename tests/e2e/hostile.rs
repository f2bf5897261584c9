//! The hostile-traffic suite (issue 13): each attack against the three
//! listeners a hostile peer can reach — the sidecar's outbound listener
//! (h2c / HTTP/1 plaintext), its inbound listener through mTLS (a mesh
//! certificate from the test CA), and the control plane's gRPC listener
//! (TLS). For each one the test asserts
//!
//! - how the attacker is cut off (GOAWAY and its code, RST_STREAM, a 4xx
//!   answer, or the connection closed),
//! - that the attacked process's peak resident memory (`VmHWM`) stays
//!   within [`RSS_BOUND_KIB`] of its resident memory before the attack,
//! - that a well-behaved client on the same listener is served while the
//!   attack runs (once the attacker's first salvo is out) and after it.
//!
//! Attacks already covered elsewhere are not repeated: the sidecar's
//! slowloris (preface dribble, partial HTTP/1 head, silence before TLS,
//! dribble after it) and its outbound connection cap are in
//! `hardening.rs`; the control plane's stream limit, MadeYouReset with
//! malformed requests, oversized unauthenticated messages and its
//! connection cap in `control_hardening.rs`. What this file adds for those
//! is the listener each lacked.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use prost::Message;
use pylon::identity::dev::DevCa;
use pylon::identity::tls::client_config;
use pylon_proto::v1::{EchoReply, EchoRequest};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::common::control::ControlProc;
use crate::common::echo::{EchoApp, start_echo};
use crate::common::h2raw::{self, Cut};
use crate::common::http::{HttpApp, empty, full, h2_over, start_http_app, text};
use crate::common::{
    CLIENT_ID, PATIENCE, PYLON, PYLON_CONTROL, SERVER_ID, SidecarProc, TempDir, backend_yaml,
    eventually, sidecar_config,
};

/// How far above its resident memory before an attack the attacked
/// process's peak may go (debug build): generous for allocator slack, far
/// below what any of the attacks would take if it worked (tens of MiB to
/// gigabytes).
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// Limits set small on the sidecars so that each cut-off shows within a
/// test's patience.
const SIDECAR_LIMITS: &[(&str, &str)] = &[
    ("PYLON_CONNECTIONS_FIRST_BYTES_TIMEOUT", "1s"),
    ("PYLON_CONNECTIONS_HEADER_READ_TIMEOUT", "1s"),
    ("PYLON_CONNECTIONS_BODY_READ_TIMEOUT", "1s"),
    ("PYLON_CONNECTIONS_IDLE_TIMEOUT", "2s"),
    ("PYLON_CONNECTIONS_MAX_AGE_GRACE", "1s"),
    ("PYLON_INBOUND_HANDSHAKE_TIMEOUT", "1s"),
];

/// The same for the control plane.
const CONTROL_LIMITS: &[&str] = &["--handshake-timeout", "1s", "--keepalive-interval", "1s"];

/// The listener under attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Outbound,
    Inbound,
    Control,
}

use Listener::{Control, Inbound, Outbound};

const ALL: [Listener; 3] = [Outbound, Inbound, Control];
const SIDECARS: [Listener; 2] = [Outbound, Inbound];

/// Any connection a client can speak over: TCP or TLS.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
type Io = Box<dyn Duplex>;

/// An app (HTTP and gRPC), a client sidecar whose outbound listener routes
/// `web.test` (HTTP, retried on UNAVAILABLE) and `echo.test` (gRPC, a 5 s
/// request timeout) to them, a server sidecar in front of the HTTP app,
/// and a control plane.
struct Fixture {
    _dir: TempDir,
    ca: DevCa,
    app: HttpApp,
    _echo: EchoApp,
    client: SidecarProc,
    server: SidecarProc,
    cp: ControlProc,
}

fn policy(app: SocketAddr, echo: SocketAddr) -> String {
    backend_yaml("web", &[app.to_string()], None)
        + &backend_yaml("echo", &[echo.to_string()], None)
        + "apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: { name: web }
spec:
  hostnames: [\"web.test\"]
  rules:
    - backendRefs: [{ name: web }]
      retry: { attempts: 2, codes: [UNAVAILABLE] }
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: { name: echo }
spec:
  hostnames: [\"echo.test\"]
  rules:
    - backendRefs: [{ name: echo }]
      timeouts: { request: 5s }
---
"
}

impl Fixture {
    /// Everything started and ready; `env` adds to [`SIDECAR_LIMITS`] and
    /// `cp_args` to [`CONTROL_LIMITS`].
    async fn start(name: &str, env: &[(&str, &str)], cp_args: &[&str]) -> Fixture {
        let dir = TempDir::new(name);
        let ca = DevCa::new("pylon test root").unwrap();
        let app = start_http_app().await;
        let echo = start_echo().await;
        let mut limits = SIDECAR_LIMITS.to_vec();
        limits.extend_from_slice(env);
        let sidecar = |name: &str, id: &str, policy: &str| {
            let files = ca.write_identity(dir.path(), name, id).unwrap();
            let policy_path = dir.path().join(format!("{name}-policy.yaml"));
            std::fs::write(&policy_path, policy).unwrap();
            let cfg = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&cfg, sidecar_config(&files, &policy_path, app.addr)).unwrap();
            SidecarProc::spawn_with_env(PYLON, &cfg, &limits)
        };
        let client = sidecar("client", CLIENT_ID, &policy(app.addr, echo.addr));
        let server = sidecar("server", SERVER_ID, "");
        let mut args = CONTROL_LIMITS.to_vec();
        args.extend_from_slice(cp_args);
        let cp = ControlProc::spawn_with(
            PYLON_CONTROL,
            &dir.path().join("control"),
            "127.0.0.1:0".parse().unwrap(),
            &args,
        );
        client.wait_ready().await;
        server.wait_ready().await;
        Fixture {
            _dir: dir,
            ca,
            app,
            _echo: echo,
            client,
            server,
            cp,
        }
    }

    fn pid(&self, l: Listener) -> u32 {
        match l {
            Outbound => self.client.pid(),
            Inbound => self.server.pid(),
            Control => self.cp.pid(),
        }
    }

    fn addr(&self, l: Listener) -> SocketAddr {
        match l {
            Outbound => self.client.outbound,
            Inbound => self.server.inbound,
            Control => self.cp.addr,
        }
    }

    /// The TLS a client of `l` speaks (none outbound), offering `alpn`.
    fn tls(&self, l: Listener, alpn: &[&[u8]]) -> Option<Arc<rustls::ClientConfig>> {
        let mut config = match l {
            Outbound => return None,
            Inbound => {
                let store = self.ca.identity_store(CLIENT_ID, &[&self.ca]).unwrap();
                (*client_config(&store, SERVER_ID).unwrap()).clone()
            }
            Control => {
                let roots = pylon_control::cli::roots_from(&self.cp.ca_file()).unwrap();
                (*pylon_proto::client::client_config(roots, None).unwrap()).clone()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Some(Arc::new(config))
    }

    /// A connection to `l` (through TLS, ALPN h2, where `l` has it).
    async fn connect(&self, l: Listener) -> Io {
        self.connect_with(l, &[b"h2"]).await
    }

    /// A connection to `l` for HTTP/1 (no ALPN offered over TLS).
    async fn connect_http1(&self, l: Listener) -> Io {
        self.connect_with(l, &[]).await
    }

    async fn connect_with(&self, l: Listener, alpn: &[&[u8]]) -> Io {
        let tcp = TcpStream::connect(self.addr(l)).await.unwrap();
        match self.tls(l, alpn) {
            None => Box::new(tcp),
            Some(config) => Box::new(
                tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// The header block of a request to `l` whose stream stays open (its
    /// body not ended): `POST /echo` for `web.test` on a sidecar, a
    /// `WhoAmI` call on the control plane.
    fn open_request(&self, l: Listener) -> Vec<u8> {
        match l {
            Outbound => h2raw::request_block("POST", "http", "web.test", "/echo"),
            Inbound => h2raw::request_block("POST", "https", "web.test", "/echo"),
            Control => {
                let mut block =
                    h2raw::request_block("POST", "https", "127.0.0.1", "/pylon.v1.Identity/WhoAmI");
                block.extend(h2raw::header_block(&[
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ]));
                block
            }
        }
    }

    /// A well-behaved client of `l` is served: `GET /headers` answered 200
    /// through a sidecar; `pylon-control status` succeeds.
    async fn served(&self, l: Listener) {
        if l == Control {
            // On a thread of its own: the attack goes on meanwhile.
            let mut cli = std::process::Command::new(PYLON_CONTROL);
            cli.arg("status")
                .env("PYLON_CONTROL_SERVER", self.cp.address())
                .env(
                    "PYLON_CONTROL_TOKEN_FILE",
                    self.cp.data_dir.join("admin.token"),
                )
                .env("PYLON_CONTROL_CA_FILE", self.cp.ca_file());
            let out = tokio::task::spawn_blocking(move || cli.output())
                .await
                .unwrap()
                .unwrap();
            assert!(
                out.status.success(),
                "a well-behaved client of the control plane was not served: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let io = self.connect(l).await;
        let mut sender = h2_over(io).await.unwrap();
        let scheme = if l == Outbound { "http" } else { "https" };
        let resp = sender
            .send_request(
                Request::get(format!("{scheme}://web.test/headers"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("a well-behaved client of {l:?} was not served: {e}"));
        assert_eq!(resp.status(), StatusCode::OK, "{l:?}");
        text(resp).await;
    }

    /// Runs `attack` against `l` over a new connection: a well-behaved
    /// client is served once the attack has said its first salvo is out,
    /// and again after the attack ended; the process's peak memory stays
    /// within the bound. Returns what the attack saw.
    async fn under_attack<T, Fut>(
        &self,
        name: &str,
        l: Listener,
        io: Io,
        attack: impl FnOnce(Io, oneshot::Sender<()>) -> Fut,
    ) -> T
    where
        T: std::fmt::Debug + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let pid = self.pid(l);
        let before = memory(pid, "VmRSS");
        let (salvo, started) = oneshot::channel();
        let attacker = tokio::spawn(attack(io, salvo));
        let _ = started.await;
        self.served(l).await;
        let seen = attacker.await.unwrap();
        self.served(l).await;
        let (after, peak) = (memory(pid, "VmRSS"), memory(pid, "VmHWM"));
        eprintln!(
            "hostile: {name} on {l:?}: {seen:?}; VmRSS {before} KiB before, {after} KiB after, peak {peak} KiB"
        );
        assert!(
            peak <= before + RSS_BOUND_KIB,
            "{name} on {l:?}: peak RSS {peak} KiB, more than {RSS_BOUND_KIB} KiB above {before} KiB"
        );
        seen
    }

    /// `pylon_connection_limits_total{listener, limit}` of the sidecar
    /// behind `l`.
    async fn limit_hits(&self, l: Listener, limit: &str) -> u64 {
        let (sidecar, listener) = match l {
            Outbound => (&self.client, "outbound"),
            Inbound => (&self.server, "inbound"),
            Control => unreachable!("the control plane counts its own limits"),
        };
        sidecar
            .metric(&format!(
                "pylon_connection_limits_total{{listener=\"{listener}\",limit=\"{limit}\"}}"
            ))
            .await
    }
}

/// A field of `/proc/<pid>/status`, in KiB.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// What the attacker reads while its frames go out.
#[derive(Debug, Clone, Copy)]
enum Watch {
    /// Reads alongside, until a stream is reset or answered or the
    /// connection ends.
    Stream,
    /// Reads alongside, past stream resets, until the connection ends.
    Connection,
    /// Reads nothing until the writer is done (blocked and failed, or
    /// through), then until the connection ends: a flood whose answers
    /// the attacker never reads.
    AfterFlood,
}

/// An HTTP/2 attack: the connection set up with `settings`, `first`
/// written, then `again` written `times` times, while (or after) the
/// attacker watches for how the server cuts it off.
struct Salvo {
    settings: Vec<(u16, u32)>,
    first: Vec<u8>,
    again: Vec<u8>,
    times: usize,
    watch: Watch,
}

impl Salvo {
    fn once(first: Vec<u8>, watch: Watch) -> Salvo {
        Salvo {
            settings: Vec::new(),
            first,
            again: Vec::new(),
            times: 0,
            watch,
        }
    }

    async fn fire(self, mut io: Io, started: oneshot::Sender<()>) -> Cut {
        h2raw::handshake(&mut io, &self.settings).await;
        let (mut rd, mut wr) = tokio::io::split(io);
        let Salvo {
            first,
            again,
            times,
            watch,
            ..
        } = self;
        let writer = tokio::spawn(async move {
            let ok = wr.write_all(&first).await.is_ok();
            let _ = started.send(());
            if ok {
                for _ in 0..times {
                    if wr.write_all(&again).await.is_err() {
                        break;
                    }
                }
            }
            wr
        });
        let cut = match watch {
            Watch::Stream => h2raw::cut_off(&mut rd, PATIENCE).await,
            Watch::Connection => h2raw::connection_cut(&mut rd, PATIENCE).await,
            Watch::AfterFlood => {
                let _wr = tokio::time::timeout(PATIENCE, writer)
                    .await
                    .expect("the flood was neither stopped nor through");
                h2raw::connection_cut(&mut rd, PATIENCE).await
            }
        };
        cut.expect("the attacker was not cut off")
    }
}

/// The HTTP/2 attacks, by name, as the salvo each makes against `l`.
fn h2_salvo(f: &Fixture, attack: &str, l: Listener) -> Salvo {
    let open = f.open_request(l);
    match attack {
        // HEADERS then RST_STREAM, stream after stream, in one burst.
        "rapid reset" => {
            let mut burst = Vec::new();
            for i in 0..2_000u32 {
                burst.extend(h2raw::headers(2 * i + 1, &open, false));
                burst.extend(h2raw::rst_stream(2 * i + 1, h2raw::CANCEL));
            }
            Salvo::once(burst, Watch::Connection)
        }
        // Streams the server must reset itself: a WINDOW_UPDATE on each
        // open stream that overflows its window (a stream error,
        // FLOW_CONTROL_ERROR).
        "MadeYouReset" => {
            let mut burst = Vec::new();
            for i in 0..1_000u32 {
                burst.extend(h2raw::headers(2 * i + 1, &open, false));
                burst.extend(h2raw::window_update(2 * i + 1, 0x7fff_ffff));
            }
            Salvo::once(burst, Watch::Connection)
        }
        // A WINDOW_UPDATE of 0 on an open stream: h2 takes it as a
        // connection error at once.
        "WINDOW_UPDATE of 0" => {
            let mut burst = h2raw::headers(1, &open, false);
            burst.extend(h2raw::window_update(1, 0));
            Salvo::once(burst, Watch::Connection)
        }
        // HEADERS without END_HEADERS, then CONTINUATION frames of header
        // fields without end (64 MiB at most).
        "CONTINUATION flood" => {
            let mut fields = Vec::new();
            while fields.len() < h2raw::MAX_FRAME - 200 {
                h2raw::literal(&mut fields, "x-flood", &[b'a'; 100]);
            }
            Salvo {
                settings: Vec::new(),
                first: h2raw::frame(h2raw::HEADERS, 0, 1, &open),
                again: h2raw::frame(h2raw::CONTINUATION, 0, 1, &fields),
                times: 4096,
                watch: Watch::Connection,
            }
        }
        // One 4000-byte field inserted in the dynamic table, then
        // referenced 20,000 times (80 MB decoded from 24 KB).
        "HPACK bomb" => {
            let mut block = open;
            h2raw::literal_indexed(&mut block, "x-bomb", &[b'b'; 4000]);
            for _ in 0..20_000 {
                h2raw::indexed(&mut block, 62);
            }
            Salvo::once(h2raw::headers(1, &block, false), Watch::Stream)
        }
        "10,000 headers" => {
            let mut block = open;
            for i in 0..10_000 {
                h2raw::literal(&mut block, &format!("x-h{i}"), b"v");
            }
            Salvo::once(h2raw::headers(1, &block, false), Watch::Stream)
        }
        "a 1 MiB header" => {
            let mut block = open;
            h2raw::literal(&mut block, "x-big", &vec![b'c'; 1 << 20]);
            Salvo::once(h2raw::headers(1, &block, false), Watch::Stream)
        }
        // SETTINGS and PINGs that want an answer, their answers never read
        // (64 MiB of frames at most).
        "SETTINGS flood" => Salvo {
            settings: Vec::new(),
            first: h2raw::settings(&[]),
            again: h2raw::settings(&[]).repeat(1024),
            times: 8192,
            watch: Watch::AfterFlood,
        },
        "PING flood" => Salvo {
            settings: Vec::new(),
            first: h2raw::frame(h2raw::PING, 0, 0, &[0; 8]),
            again: h2raw::frame(h2raw::PING, 0, 0, &[0; 8]).repeat(1024),
            times: 4096,
            watch: Watch::AfterFlood,
        },
        other => panic!("no attack {other}"),
    }
}

/// Runs the HTTP/2 attack `name` against each listener in `on`; what cut
/// each attacker off, in order.
async fn h2_attack(f: &Fixture, name: &str, on: &[Listener]) -> Vec<Cut> {
    let mut cuts = Vec::new();
    for &l in on {
        let salvo = h2_salvo(f, name, l);
        let io = f.connect(l).await;
        cuts.push(f.under_attack(name, l, io, |io, s| salvo.fire(io, s)).await);
    }
    cuts
}

#[tokio::test]
async fn rapid_reset_is_cut_off_with_enhance_your_calm() {
    let f = Fixture::start("hostile-rapid-reset", &[], &[]).await;
    let cuts = h2_attack(&f, "rapid reset", &ALL).await;
    for (l, cut) in ALL.iter().zip(&cuts) {
        assert_eq!(*cut, Cut::GoAway(h2raw::ENHANCE_YOUR_CALM), "{l:?}");
    }
    assert!(f.limit_hits(Outbound, "http2_resets").await >= 1);
    assert!(f.limit_hits(Inbound, "http2_resets").await >= 1);
}

#[tokio::test]
async fn made_you_reset_is_cut_off_with_enhance_your_calm() {
    let f = Fixture::start("hostile-madeyoureset", &[], &[]).await;
    let cuts = h2_attack(&f, "MadeYouReset", &ALL).await;
    for (l, cut) in ALL.iter().zip(&cuts) {
        assert_eq!(*cut, Cut::GoAway(h2raw::ENHANCE_YOUR_CALM), "{l:?}");
    }
    assert!(f.limit_hits(Outbound, "http2_resets").await >= 1);
    assert!(f.limit_hits(Inbound, "http2_resets").await >= 1);
    let cuts = h2_attack(&f, "WINDOW_UPDATE of 0", &ALL).await;
    for (l, cut) in ALL.iter().zip(&cuts) {
        assert_eq!(*cut, Cut::GoAway(h2raw::PROTOCOL_ERROR), "{l:?}");
    }
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let f = Fixture::start("hostile-continuation", &[], &[]).await;
    let cuts = h2_attack(&f, "CONTINUATION flood", &ALL).await;
    for (l, cut) in ALL.iter().zip(&cuts) {
        assert_eq!(*cut, Cut::GoAway(h2raw::ENHANCE_YOUR_CALM), "{l:?}");
    }
}

/// The sidecars' header list limit is 64 KiB, the control plane's 16 KiB.
/// A header block past it is refused from its decoded size as it is read:
/// a bomb or a giant field takes the connection down
/// (`ENHANCE_YOUR_CALM`); many small fields get the stream a 431 on a
/// sidecar, while the control plane's smaller limit takes the connection
/// (`COMPRESSION_ERROR`: it stops decoding the block).
#[tokio::test]
async fn oversized_header_lists_are_refused() {
    let f = Fixture::start("hostile-headers", &[], &[]).await;
    let calm = Cut::GoAway(h2raw::ENHANCE_YOUR_CALM);
    for (attack, want) in [
        ("HPACK bomb", [calm, calm, calm]),
        (
            "10,000 headers",
            [
                Cut::Answered(1, Some(431)),
                Cut::Answered(1, Some(431)),
                Cut::GoAway(h2raw::COMPRESSION_ERROR),
            ],
        ),
        ("a 1 MiB header", [calm, calm, calm]),
    ] {
        let cuts = h2_attack(&f, attack, &ALL).await;
        for ((l, cut), want) in ALL.iter().zip(&cuts).zip(want) {
            assert_eq!(*cut, want, "{attack} on {l:?}");
        }
    }
}

/// A flood of frames that want an answer, the answers never read: the
/// server answers what it can, then stops reading (HTTP/2 back-pressure:
/// it reads no more frames until its answers are written), and the
/// attacker's writes block. The sidecar closes the connection at its idle
/// timeout (2 s here) plus `maxAgeGrace` (its GOAWAY cannot be written);
/// the control plane once a write has waited twice its keepalive interval
/// (2 s here). Either way the connection is closed under the attacker.
#[tokio::test]
async fn settings_and_ping_floods_are_held_back_and_closed() {
    let f = Fixture::start("hostile-floods", &[], &[]).await;
    for attack in ["SETTINGS flood", "PING flood"] {
        let cuts = h2_attack(&f, attack, &ALL).await;
        for (l, cut) in ALL.iter().zip(&cuts) {
            assert_eq!(*cut, Cut::Closed, "{attack} on {l:?}");
        }
    }
    assert!(f.limit_hits(Outbound, "idle_timeout").await >= 2);
    assert!(f.limit_hits(Inbound, "idle_timeout").await >= 2);
}

/// A caller that advertises a stream window of 0 and asks for 1 GiB: flow
/// control holds the response back hop by hop (the app produces a few
/// windows' worth, not the GiB), and the connection is told to go away
/// at its maximum age (3 s here; GOAWAY `NO_ERROR`) and closed after the
/// grace. The control plane has no large unauthenticated answers (its
/// refusals are trailers-only HEADERS, which flow control does not
/// hold), so this attack has nothing to stall there.
#[tokio::test]
async fn a_zero_window_stall_holds_back_the_response_and_is_closed_at_max_age() {
    let f = Fixture::start(
        "hostile-zero-window",
        &[("PYLON_CONNECTIONS_MAX_AGE", "3s")],
        &[],
    )
    .await;
    for l in SIDECARS {
        f.app.produced.store(0, Ordering::Relaxed);
        let scheme = if l == Outbound { "http" } else { "https" };
        let block = h2raw::request_block("GET", scheme, "web.test", "/big?bytes=1073741824");
        let salvo = Salvo {
            settings: vec![(h2raw::INITIAL_WINDOW_SIZE, 0)],
            first: h2raw::headers(1, &block, true),
            again: Vec::new(),
            times: 0,
            watch: Watch::Connection,
        };
        let io = f.connect(l).await;
        let cut = f
            .under_attack("zero-window stall", l, io, |io, s| salvo.fire(io, s))
            .await;
        assert_eq!(cut, Cut::GoAway(h2raw::NO_ERROR), "{l:?}: max age");
        let produced = f.app.produced.load(Ordering::Relaxed);
        eprintln!(
            "hostile: zero-window stall on {l:?}: the app produced {produced} bytes of 1 GiB"
        );
        assert!(
            produced < 64 << 20,
            "{l:?}: {produced} bytes produced for a caller that reads none"
        );
    }
}

/// Writes `bytes` (HTTP/1) and reads what comes back until the connection
/// closes; `None` if it stays open longer than [`PATIENCE`].
async fn http1_exchange(
    mut io: Io,
    bytes: Vec<u8>,
    started: oneshot::Sender<()>,
) -> Option<String> {
    let _ = io.write_all(&bytes).await;
    let _ = started.send(());
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 8192];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&out).to_string())
}

/// RFC 9112 § 6.3: a request with both may be refused, or read by its
/// Transfer-Encoding alone, but then the connection must close after the
/// response. The sidecars (hyper) do the latter: the app gets one
/// unambiguous request (chunked, no Content-Length) and nothing
/// smuggled behind it.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_the_connection_closed() {
    let f = Fixture::start("hostile-smuggling", &[], &[]).await;
    // The body is empty read as chunked, five bytes read by its length:
    // a front end and a back end that disagree would see different
    // second requests.
    let smuggle = b"POST /headers HTTP/1.1\r\nhost: web.test\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /status/299 HTTP/1.1\r\nhost: web.test\r\nconnection: close\r\n\r\n".to_vec();
    for l in SIDECARS {
        let io = f.connect_http1(l).await;
        let bytes = smuggle.clone();
        let answer = f
            .under_attack("CL+TE smuggling", l, io, |io, s| {
                http1_exchange(io, bytes, s)
            })
            .await
            .unwrap_or_else(|| panic!("{l:?}: the connection stayed open"));
        let (head, seen) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{l:?}:\n{answer}");
        assert!(head.contains("connection: close"), "{l:?}:\n{answer}");
        assert!(
            !seen.contains("content-length"),
            "{l:?}: the app got the ambiguous length:\n{answer}"
        );
        assert!(
            !answer.contains("HTTP/1.1 299"),
            "{l:?}: the request behind it was served:\n{answer}"
        );
    }
}

/// A unary gRPC call over `io` with raw h2: its `grpc-status` and, when
/// it succeeded, the reply.
async fn grpc_unary(
    io: Io,
    uri: &str,
    headers: &[(&str, &str)],
    message: &[u8],
) -> (String, Option<EchoReply>) {
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut req = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (response, mut body) = client.send_request(req.body(()).unwrap(), false).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    body.send_data(Bytes::from(framed), true).unwrap();
    let response = response.await.unwrap();
    if let Some(status) = response.headers().get("grpc-status") {
        return (status.to_str().unwrap().to_string(), None);
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let status = trailers["grpc-status"].to_str().unwrap().to_string();
    let reply = (data.len() > 5).then(|| EchoReply::decode(&data[5..]).unwrap());
    (status, reply)
}

#[tokio::test]
async fn absurd_grpc_timeouts_are_ignored_or_bounded_as_documented() {
    let f = Fixture::start("hostile-grpc-timeout", &[], &[]).await;
    let absurd = [
        "99999999H",
        "-1S",
        "12345678901234567890S",
        "garbage",
        "1X",
        "",
    ];
    let hello = EchoRequest {
        payload: b"hello".to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    for value in absurd {
        // Outbound, routed with `timeouts.request: 5s`: the valid absurd
        // value is bounded by the route, the invalid ones are ignored as
        // if absent; either way the app is told at most 5 s.
        let io = f.connect(Outbound).await;
        let (status, reply) = f
            .under_attack("absurd grpc-timeout", Outbound, io, {
                let hello = hello.clone();
                move |io, s| async move {
                    let _ = s.send(());
                    grpc_unary(
                        io,
                        "http://echo.test/pylon.v1.Echo/Unary",
                        &[("grpc-timeout", value)],
                        &hello,
                    )
                    .await
                }
            })
            .await;
        assert_eq!(status, "0", "{value:?}");
        let reply = reply.unwrap();
        let told: Vec<&String> = reply
            .metadata
            .iter()
            .filter(|l| l.starts_with("grpc-timeout: "))
            .collect();
        assert_eq!(told.len(), 1, "{value:?}: {:?}", reply.metadata);
        let told = pylon::http::deadline::parse_grpc_timeout(
            &http::HeaderValue::from_str(&told[0]["grpc-timeout: ".len()..]).unwrap(),
        )
        .unwrap();
        assert!(told <= Duration::from_secs(5), "{value:?}: {told:?}");

        // Inbound has no deadline of its own: the header is passed on as
        // it came and the call is served.
        let io = f.connect(Inbound).await;
        let status = f
            .under_attack(
                "absurd grpc-timeout",
                Inbound,
                io,
                move |io, s| async move {
                    let _ = s.send(());
                    let mut sender = h2_over(io).await.unwrap();
                    let resp = sender
                        .send_request(
                            Request::get("https://web.test/headers")
                                .header("grpc-timeout", value)
                                .body(empty())
                                .unwrap(),
                        )
                        .await
                        .unwrap();
                    let status = resp.status();
                    let seen = text(resp).await;
                    assert!(
                        value.is_empty() || seen.contains(&format!("grpc-timeout: {value}")),
                        "{value:?}: {seen}"
                    );
                    status
                },
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{value:?}");

        // The control plane (tonic) ignores what it cannot parse: the
        // caller gets the same answer as without the header.
        let io = f.connect(Control).await;
        let (status, _) = f
            .under_attack(
                "absurd grpc-timeout",
                Control,
                io,
                move |io, s| async move {
                    let _ = s.send(());
                    grpc_unary(
                        io,
                        "https://127.0.0.1/pylon.v1.Identity/WhoAmI",
                        &[("grpc-timeout", value)],
                        &[],
                    )
                    .await
                },
            )
            .await;
        assert_eq!(status, "16", "{value:?}: UNAUTHENTICATED, as without it");
    }
}

#[tokio::test]
async fn an_8_mib_body_with_retries_on_goes_through_once_with_memory_bounded() {
    let f = Fixture::start("hostile-8mib", &[], &[]).await;
    const SIZE: usize = 8 << 20;
    for l in SIDECARS {
        let io = f.connect(l).await;
        let scheme = if l == Outbound { "http" } else { "https" };
        let echoed = f
            .under_attack("8 MiB body, retries on", l, io, move |io, s| async move {
                let mut sender = h2_over(io).await.unwrap();
                let _ = s.send(());
                let resp = sender
                    .send_request(
                        Request::post(format!("{scheme}://web.test/echo"))
                            .body(full(vec![b'z'; SIZE]))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                resp.into_body().collect().await.unwrap().to_bytes().len()
            })
            .await;
        assert_eq!(echoed, SIZE, "{l:?}");
    }
    // The control plane refuses a message that size before reading it.
    let io = f.connect(Control).await;
    let (status, _) = f
        .under_attack("8 MiB message", Control, io, |io, s| async move {
            let _ = s.send(());
            grpc_unary(
                io,
                "https://127.0.0.1/pylon.v1.Identity/IssueCertificate",
                &[],
                &vec![0x30; SIZE],
            )
            .await
        })
        .await;
    assert_eq!(status, "8", "RESOURCE_EXHAUSTED");
}

#[tokio::test]
async fn slow_and_silent_clients_of_the_listeners_hardening_does_not_cover_are_cut_off() {
    let f = Fixture::start("hostile-slowloris", &[], &[]).await;
    // Inbound, through TLS: an HTTP/1 request head that never ends.
    let io = f.connect_http1(Inbound).await;
    let answer = f
        .under_attack("slowloris (HTTP/1 head)", Inbound, io, |io, s| {
            http1_exchange(
                io,
                b"GET /headers HTTP/1.1\r\nhost: web.test\r\nx-a: ".to_vec(),
                s,
            )
        })
        .await;
    // Closed (whichever limit fires, neither serves the request).
    let answer = answer.expect("the connection stayed open");
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Both limits are 1 s here: whichever fires first closes it.
    let hits = f.limit_hits(Inbound, "first_bytes_timeout").await
        + f.limit_hits(Inbound, "header_read_timeout").await;
    assert!(hits >= 1);

    // The control plane: silence before the TLS handshake, and a preface
    // dribbled after it.
    let silent: Io = Box::new(TcpStream::connect(f.cp.addr).await.unwrap());
    let closed = f
        .under_attack(
            "silence before TLS",
            Control,
            silent,
            |mut io, s| async move {
                let _ = s.send(());
                h2raw::closed(&mut io, PATIENCE).await
            },
        )
        .await;
    assert!(closed, "the control plane kept a silent connection");
    let io = f.connect(Control).await;
    let closed = f
        .under_attack("pre-preface dribble", Control, io, |mut io, s| async move {
            let _ = io.write_all(&h2raw::PREFACE[..10]).await;
            let _ = io.flush().await;
            let _ = s.send(());
            h2raw::closed(&mut io, PATIENCE).await
        })
        .await;
    assert!(closed, "the control plane kept a dribbling connection");
}

#[tokio::test]
async fn an_inbound_connection_flood_past_the_cap_is_closed_and_the_slots_come_back() {
    let f = Fixture::start(
        "hostile-conn-flood",
        &[("PYLON_INBOUND_MAX_CONNECTIONS", "8")],
        &[],
    )
    .await;
    let before = memory(f.server.pid(), "VmRSS");
    // Twice the cap, silent: eight hold the slots until the handshake
    // timeout, eight more are closed as they are accepted.
    let mut flood = Vec::new();
    for _ in 0..16 {
        flood.push(TcpStream::connect(f.server.inbound).await.unwrap());
    }
    for mut tcp in flood {
        assert!(
            h2raw::closed(&mut tcp, PATIENCE).await,
            "a flood connection stayed open"
        );
    }
    assert!(f.limit_hits(Inbound, "max_connections").await >= 8);
    assert!(f.limit_hits(Inbound, "handshake_timeout").await >= 1);
    // The slots the flood held come back: a mesh client is served.
    eventually("a mesh client served after the flood", async || {
        let io = f.connect(Inbound).await;
        let mut sender = h2_over(io).await.map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(
                Request::get("https://web.test/headers")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .map_err(|e| e.to_string())?;
        (resp.status() == StatusCode::OK)
            .then_some(())
            .ok_or_else(|| resp.status().to_string())
    })
    .await;
    let peak = memory(f.server.pid(), "VmHWM");
    eprintln!("hostile: connection flood on Inbound: VmRSS {before} KiB before, peak {peak} KiB");
    assert!(peak <= before + RSS_BOUND_KIB);
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_at_the_body_read_timeout() {
    let f = Fixture::start("hostile-body-timeout", &[], &[]).await;
    // HTTP/1, both listeners: ten bytes of a hundred, then nothing. The
    // app echoes what it gets, so the response has begun: the connection
    // is closed.
    for l in SIDECARS {
        let io = f.connect_http1(l).await;
        let answer = f
            .under_attack("stalled HTTP/1 body", l, io, |io, s| {
                http1_exchange(
                    io,
                    b"POST /echo HTTP/1.1\r\nhost: web.test\r\ncontent-length: 100\r\n\r\n0123456789"
                        .to_vec(),
                    s,
                )
            })
            .await
            .unwrap_or_else(|| panic!("{l:?}: the connection stayed open"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{l:?}: {answer}");
        assert!(f.limit_hits(l, "body_read_timeout").await >= 1, "{l:?}");
    }
    // HTTP/2 inbound: the echo under way, the stream is reset.
    let io = f.connect(Inbound).await;
    let cut = f
        .under_attack("stalled HTTP/2 body", Inbound, io, |mut io, s| async move {
            h2raw::handshake(&mut io, &[]).await;
            let mut salvo = h2raw::headers(
                1,
                &h2raw::request_block("POST", "https", "web.test", "/echo"),
                false,
            );
            salvo.extend(h2raw::frame(h2raw::DATA, 0, 1, b"0123456789"));
            io.write_all(&salvo).await.unwrap();
            let _ = s.send(());
            h2raw::cut_off(&mut io, PATIENCE).await
        })
        .await;
    assert_eq!(cut, Some(Cut::Reset(1, h2raw::INTERNAL_ERROR)));
    assert!(f.limit_hits(Inbound, "body_read_timeout").await >= 2);

    // gRPC outbound, to a server that waits for the whole message: no
    // response has begun, so the caller is told why.
    let io = f.connect(Outbound).await;
    let (status, error) = f
        .under_attack("stalled gRPC message", Outbound, io, |io, s| async move {
            let (client, conn) = h2::client::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let mut client = client.ready().await.unwrap();
            let req = Request::post("http://echo.test/pylon.v1.Echo/Unary")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = client.send_request(req, false).unwrap();
            // A 100-byte message announced, 5 bytes of it sent.
            body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2, 3, 4, 5]), false)
                .unwrap();
            let _ = s.send(());
            let response = response.await.unwrap();
            let h = response.headers();
            (
                h.get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string()),
                h.get("x-pylon-error")
                    .map(|v| v.to_str().unwrap().to_string()),
            )
        })
        .await;
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(error.as_deref(), Some("body-read-timeout"));
    assert!(f.limit_hits(Outbound, "body_read_timeout").await >= 2);
}
