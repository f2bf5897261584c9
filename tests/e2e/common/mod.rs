//! What the end-to-end tests share beyond `pylon-test-support` (processes,
//! admin client, OTLP receivers, polling, policy builders — re-exported
//! here): identities, the two-sidecar mesh, and the apps and environments
//! only these tests need (echo and chaos servers, HTTP apps, a token
//! issuer, network namespaces, pods, Kubernetes tooling).
//!
//! Shared by several test crates, each of which uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod chaos;
pub mod echo;
pub mod h2raw;
pub mod http;
pub mod issuer;
pub mod k8s;
pub mod netns;
pub mod pods;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pylon::identity::dev::DevCa;
pub use pylon_test_support::admin::{admin_get, admin_request, admin_send};
pub use pylon_test_support::policy::{backend_yaml, route_yaml};
pub use pylon_test_support::process::{Process, strip_ansi};
pub use pylon_test_support::sidecar::{SidecarProc, set_policy, sidecar_config};
pub use pylon_test_support::{
    PATIENCE, TempDir, eventually, eventually_blocking, eventually_every, write_atomic,
    write_secret,
};
pub use pylon_test_support::{control, otlp, policy};

/// The binaries under test, as cargo built them for this test crate.
pub const PYLON: &str = env!("CARGO_BIN_EXE_pylon");
pub const PYLON_CONTROL: &str = env!("CARGO_BIN_EXE_pylon-control");

pub const TRUST_DOMAIN: &str = "pylon.test";
pub const CLIENT_ID: &str = "spiffe://pylon.test/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://pylon.test/ns/default/sa/echo";

/// The policy the client sidecar of a [`Mesh`] starts with: `echo.test`
/// (gRPC) and `web.test` (HTTP) both go to the app behind the server
/// sidecar, over mTLS.
pub fn mesh_policy(server_inbound: SocketAddr) -> String {
    backend_yaml("app", &[server_inbound.to_string()], Some(SERVER_ID))
        + &route_yaml("GRPCRoute", "echo", "echo.test", &[("app", 1)])
        + &route_yaml("HTTPRoute", "web", "web.test", &[("app", 1)])
}

/// Starts a sidecar in front of `app` with identity `id` and an empty
/// policy of its own.
pub fn server_sidecar(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    app: SocketAddr,
) -> SidecarProc {
    server_sidecar_with_env(ca, dir, name, id, app, &[])
}

/// [`server_sidecar`], with `env` set for the process.
pub fn server_sidecar_with_env(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    app: SocketAddr,
    env: &[(&str, &str)],
) -> SidecarProc {
    let files = ca.write_identity(dir, name, id).unwrap();
    let policy = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy, "").unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, sidecar_config(&files, &policy, app)).unwrap();
    SidecarProc::spawn_with_env(PYLON, &cfg, env)
}

/// Starts a client-side sidecar (identity [`CLIENT_ID`]) with `policy`;
/// returns it and its policy file.
pub fn client_sidecar(ca: &DevCa, dir: &Path, policy: &str) -> (SidecarProc, PathBuf) {
    client_sidecar_as(ca, dir, "client", CLIENT_ID, policy)
}

/// Starts a client-side sidecar with identity `id` and `policy`, its files
/// in `dir` named after `name`; returns it and its policy file.
pub fn client_sidecar_as(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    policy: &str,
) -> (SidecarProc, PathBuf) {
    client_sidecar_with_env(ca, dir, name, id, policy, &[])
}

/// [`client_sidecar_as`], with `env` set for the process.
pub fn client_sidecar_with_env(
    ca: &DevCa,
    dir: &Path,
    name: &str,
    id: &str,
    policy: &str,
    env: &[(&str, &str)],
) -> (SidecarProc, PathBuf) {
    let files = ca.write_identity(dir, name, id).unwrap();
    let policy_path = dir.join(format!("{name}-policy.yaml"));
    std::fs::write(&policy_path, policy).unwrap();
    let unused_app: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, sidecar_config(&files, &policy_path, unused_app)).unwrap();
    (SidecarProc::spawn_with_env(PYLON, &cfg, env), policy_path)
}

/// Two sidecars with mTLS between them: `client` (outbound side) and
/// `server` (inbound side, in front of `app`).
pub struct Mesh {
    pub dir: TempDir,
    pub ca: DevCa,
    pub client: SidecarProc,
    pub server: SidecarProc,
    /// The client sidecar's policy file.
    pub policy: PathBuf,
}

impl Mesh {
    pub async fn start(app: SocketAddr) -> Mesh {
        Self::start_with(app, mesh_policy).await
    }

    /// Starts the mesh with the client's policy made from the server
    /// sidecar's inbound address.
    pub async fn start_with(app: SocketAddr, policy: impl Fn(SocketAddr) -> String) -> Mesh {
        Self::start_with_env(app, policy, &[], &[]).await
    }

    /// [`Mesh::start_with`], with `client_env` and `server_env` set for the
    /// two sidecar processes.
    pub async fn start_with_env(
        app: SocketAddr,
        policy: impl Fn(SocketAddr) -> String,
        client_env: &[(&str, &str)],
        server_env: &[(&str, &str)],
    ) -> Mesh {
        let dir = TempDir::new("mesh");
        let ca = DevCa::new("pylon test root").unwrap();
        let server = server_sidecar_with_env(&ca, dir.path(), "server", SERVER_ID, app, server_env);
        let (client, policy) = client_sidecar_with_env(
            &ca,
            dir.path(),
            "client",
            CLIENT_ID,
            &policy(server.inbound),
            client_env,
        );
        server.wait_ready().await;
        client.wait_ready().await;
        Mesh {
            dir,
            ca,
            client,
            server,
            policy,
        }
    }

    /// Rewrites the client's policy and waits until it is installed.
    pub async fn set_policy(&self, yaml: &str) {
        set_policy(&self.client, &self.policy, yaml).await;
    }
}
