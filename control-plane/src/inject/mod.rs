//! Sidecar injection: one implementation behind `pylon inject` ([`cli`])
//! and the admission webhook ([`webhook`]).
//!
//! [`inject`] takes a Kubernetes object as JSON and returns it meshed: the
//! pod (or a workload's pod template) gains the `pylon-init` and `pylon`
//! init containers and their volumes ([`pod`]), its app probes go through
//! the sidecar ([`probes`]), and its `pylon.dev/*` annotations say how
//! ([`settings`]). Objects of other kinds, opted-out pods and pods already
//! injected come back exactly as they were, so injecting twice changes
//! nothing.
//!
//! Not here: what the injected containers do (`pylon init-iptables`,
//! `pylon proxy`), and which pods the webhook is sent (its configuration).

pub mod cli;
pub mod patch;
mod path;
mod pod;
mod probes;
mod quantity;
mod settings;
pub mod webhook;
mod workload;
pub mod yaml;

use std::fmt;

pub use cli::{InjectArgs, run_cli};
pub use path::FieldPath;
pub use workload::{inject, inject_pod};

/// The image of both injected containers when none is given.
pub const DEFAULT_IMAGE: &str = concat!("pylon/pylon:", env!("CARGO_PKG_VERSION"));
/// Where injected sidecars reach the control plane when nothing else is
/// said: the Service `pylon-control install` creates.
pub const DEFAULT_CONTROL_PLANE: &str = "https://pylon-control.pylon-system.svc:15010";

/// What every injected sidecar is given, whatever the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The image of `pylon-init` and `pylon`.
    pub image: String,
    /// The control plane's URL (`PYLON_CONTROL_PLANE_ADDRESS`).
    pub control_plane: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.to_string(),
            control_plane: DEFAULT_CONTROL_PLANE.to_string(),
        }
    }
}

/// One thing that keeps a pod from being injected, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the object, e.g.
    /// `spec.template.metadata.annotations["pylon.dev/proxy-cpu"]`.
    pub path: String,
    pub message: String,
}

impl Problem {
    pub(crate) fn at(path: &FieldPath, message: impl Into<String>) -> Problem {
        Problem {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why an object cannot be injected: every problem found, not only the
/// first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InjectError {
    pub problems: Vec<Problem>,
}

impl InjectError {
    /// The problems on one line, `; ` between them.
    pub fn one_line(&self) -> String {
        let problems: Vec<String> = self.problems.iter().map(Problem::to_string).collect();
        problems.join("; ")
    }
}

impl fmt::Display for InjectError {
    /// One problem a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
