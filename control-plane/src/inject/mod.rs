//! Sidecar injection: one implementation behind `pylon inject` and the
//! admission webhook. Placeholder until it lands.

use std::process::ExitCode;

/// `pylon inject` flags.
#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The manifests to mesh (`-` for stdin).
    #[arg(long, short)]
    pub file: String,
}

pub fn run_cli(_args: InjectArgs) -> ExitCode {
    eprintln!("pylon inject: not implemented yet");
    ExitCode::FAILURE
}
