//! The `pylon` command: `pylon proxy` runs a sidecar, `pylon demo` a small
//! mesh on loopback.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pylon::config::Config;
#[cfg(feature = "full")]
use pylon::demo::DemoArgs;
use pylon::sidecar::Sidecar;
use pylon::telemetry::logging;
use pylon_proto::signal::stop_signal;

/// jemalloc rather than glibc's malloc (ADR 18): a request through a
/// sidecar makes some twenty allocations, most of them small and freed on
/// the same worker; glibc's arenas spent about 9 % of the instructions of
/// a request on them (`_int_malloc`, `_int_free`, `malloc_consolidate`,
/// and `memalign` for every task tokio spawns).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "pylon",
    version,
    about = "A service-mesh sidecar proxy for gRPC and HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar.
    Proxy {
        /// The bootstrap configuration file; every key can also be set by
        /// environment (PYLON_ADMIN_LISTEN, PYLON_INBOUND_APP, ...).
        #[arg(long, short, env = "PYLON_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a two-sidecar mTLS mesh on loopback with live gRPC traffic and
    /// print what it measures.
    #[cfg(feature = "full")]
    Demo(DemoArgs),
    /// Add the sidecar to Kubernetes workloads: reads YAML (a file or `-`),
    /// writes the meshed YAML to stdout.
    #[cfg(feature = "full")]
    Inject(pylon_control::inject::InjectArgs),
    /// The init container's job: redirect the pod's TCP traffic to the
    /// sidecar with iptables.
    InitIptables(pylon::iptables::InitArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Proxy { config } => {
            // The configuration is read before logging starts (it says how
            // to log); its errors go to stderr as plain text.
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("pylon: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(config.log_format, "info");
            match runtime(config.workers) {
                Ok(rt) => rt.block_on(run_proxy(config)),
                Err(code) => code,
            }
        }
        #[cfg(feature = "full")]
        Command::Inject(args) => pylon_control::inject::run_cli(args),
        Command::InitIptables(args) => pylon::iptables::run(args),
        #[cfg(feature = "full")]
        Command::Demo(args) => {
            // Sidecar logs would break up the demo's table.
            logging::init(logging::LogFormat::Text, "error");
            let rt = match runtime(None) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(pylon::demo::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pylon demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The runtime: tokio's multi-thread scheduler with `workers` threads (the
/// configuration's `workers`, else `TOKIO_WORKER_THREADS`, else the CPUs
/// available to the process) — or, when that count is one, the
/// current-thread scheduler. One worker has no one to share tasks with, and
/// the current-thread scheduler skips the work-stealing bookkeeping (shared
/// queues, idle-worker wake-ups) that every task of a one-worker
/// multi-thread runtime still pays for; the blocking pool is the same in
/// both (docs/performance.md).
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let workers = workers.or_else(|| match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(v) => v.trim().parse::<usize>().ok(),
        Err(_) => std::thread::available_parallelism()
            .ok()
            .map(std::num::NonZeroUsize::get),
    });
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) if n > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        // Left to tokio, which reads a TOKIO_WORKER_THREADS of 0 or not a
        // number itself (and refuses it).
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("pylon: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

async fn run_proxy(config: Config) -> ExitCode {
    // Start may wait for the control plane (the first certificate); a stop
    // signal meanwhile ends the process at once.
    let started = tokio::select! {
        started = Sidecar::start(config) => started,
        _ = stop_signal() => {
            tracing::info!("stop signal received before the sidecar started");
            return ExitCode::SUCCESS;
        }
    };
    let sidecar = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pylon: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = stop_signal() => tracing::info!("stop signal received; draining"),
        _ = sidecar.draining() => tracing::info!("drain requested"),
    }
    // Draining: readiness is 503, the listeners are closed, open calls
    // finish within drainTimeout. A second signal ends the wait.
    tokio::select! {
        _ = sidecar.stop() => tracing::info!("stopped"),
        _ = stop_signal() => tracing::warn!("second stop signal: exiting without waiting for open calls"),
    }
    ExitCode::SUCCESS
}
