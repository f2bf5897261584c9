//! `pylon init-iptables`: the init container's job (DESIGN § Kubernetes,
//! Interception). Placeholder until the rules land.

use std::process::ExitCode;

/// `pylon init-iptables` flags.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Print the `iptables-restore` input instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(_args: InitArgs) -> ExitCode {
    eprintln!("pylon init-iptables: not implemented yet");
    ExitCode::FAILURE
}
