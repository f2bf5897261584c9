//! Process logs: `tracing` records written to stderr as text or JSON lines,
//! filtered by an `EnvFilter` that can be replaced while the process runs
//! (`PUT /log-level` on the admin server).
//!
//! The filter starts from `PYLON_LOG` (else a default the command picks) and
//! is held behind a reload handle kept in a process-wide cell, so the admin
//! server reaches it without threading it through every constructor. A
//! process that never called [`init`] (a library user, a unit test) has no
//! handle, and the admin server says so.
//!
//! [`Throttle`] keeps a log line that an attacker can provoke (a limit
//! hit on every connection) from flooding the log.
//!
//! Not here: request-scoped fields (trace and request IDs) and access logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

pub use crate::config::LogFormat;

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Starts logging to stderr in `format`, filtered by `PYLON_LOG` or else
/// `default_filter`. A bad `PYLON_LOG` is reported on stderr and the default
/// used. Calling it again does nothing.
pub fn init(format: LogFormat, default_filter: &str) {
    if FILTER.get().is_some() {
        return;
    }
    let filter = match std::env::var("PYLON_LOG") {
        Ok(directive) => EnvFilter::try_new(&directive).unwrap_or_else(|e| {
            eprintln!("pylon: PYLON_LOG={directive:?} is not a valid filter ({e}); using {default_filter:?}");
            EnvFilter::new(default_filter)
        }),
        Err(_) => EnvFilter::new(default_filter),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => Registry::default().with(filter).with(fmt).try_init(),
        LogFormat::Json => Registry::default()
            .with(filter)
            .with(fmt.json().flatten_event(false).with_current_span(true))
            .try_init(),
    };
    if result.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Lets one log line through per interval, counting the ones it held back.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

impl Throttle {
    /// `Some(n)` when a line may be logged now (`n` lines were held back
    /// since the last one), `None` when it was logged less than `every`
    /// ago.
    pub fn permit(&self, every: Duration) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match *last {
            Some(at) if now.duration_since(at) < every => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.skipped.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Why the filter could not be read or replaced.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error("log level control is not available in this process")]
    Unavailable,
    #[error("invalid filter directive: {0}")]
    Invalid(String),
}

/// The filter in force, as a directive (`info,pylon::proxy=debug`).
pub fn current_filter() -> Result<String, LevelError> {
    let handle = FILTER.get().ok_or(LevelError::Unavailable)?;
    handle
        .with_current(ToString::to_string)
        .map_err(|_| LevelError::Unavailable)
}

/// Replaces the filter with `directive` (a level such as `debug`, or any
/// `EnvFilter` directive list). A directive that does not parse changes
/// nothing. Returns the filter now in force.
pub fn set_filter(directive: &str) -> Result<String, LevelError> {
    let filter = parse_filter(directive)?;
    let handle = FILTER.get().ok_or(LevelError::Unavailable)?;
    handle.reload(filter).map_err(|_| LevelError::Unavailable)?;
    current_filter()
}

/// Parses a directive strictly: every comma-separated part must be a valid
/// directive (`EnvFilter::try_new` would skip a bad one silently).
fn parse_filter(directive: &str) -> Result<EnvFilter, LevelError> {
    let directive = directive.trim();
    if directive.is_empty() {
        return Err(LevelError::Invalid("empty directive".to_string()));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(directive)
        .map_err(|e| LevelError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_and_counts_the_rest() {
        let t = Throttle::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(t.permit(hour), Some(0));
        assert_eq!(t.permit(hour), None);
        assert_eq!(t.permit(hour), None);
        assert_eq!(t.permit(Duration::ZERO), Some(2));
    }

    #[test]
    fn formats_parse() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(" text "), Ok(LogFormat::Text));
        assert!(LogFormat::parse("xml").unwrap_err().contains("xml"));
    }

    #[test]
    fn directives_parse_strictly() {
        assert!(parse_filter("debug").is_ok());
        assert!(parse_filter("info,pylon::proxy=debug").is_ok());
        for bad in ["", "  ", "info,pylon=shouty", "pylon=99"] {
            assert!(
                matches!(parse_filter(bad), Err(LevelError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
