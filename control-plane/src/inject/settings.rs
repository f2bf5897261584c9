//! The `pylon.dev/*` labels and annotations of a pod: read, checked, and
//! turned into what the injected containers are given.
//!
//! Every annotation is checked before anything is decided, so that a pod
//! with three mistakes is refused once, with all three.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::path::FieldPath;
use super::{Problem, quantity};

/// Label or annotation: `enabled` or `disabled` (opt out).
pub const INJECT: &str = "pylon.dev/inject";
pub const SKIP_INBOUND_PORTS: &str = "pylon.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "pylon.dev/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "pylon.dev/skip-outbound-cidrs";
pub const PROXY_CPU: &str = "pylon.dev/proxy-cpu";
pub const PROXY_MEMORY: &str = "pylon.dev/proxy-memory";
pub const PROXY_CPU_LIMIT: &str = "pylon.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_LIMIT: &str = "pylon.dev/proxy-memory-limit";
pub const DRAIN_TIMEOUT: &str = "pylon.dev/drain-timeout";
pub const LOG_LEVEL: &str = "pylon.dev/log-level";

/// A default quantity: its text, and its value in base units.
struct DefaultQuantity(&'static str, f64);

const DEFAULT_CPU_REQUEST: DefaultQuantity = DefaultQuantity("100m", 0.1);
const DEFAULT_MEMORY_REQUEST: DefaultQuantity = DefaultQuantity("64Mi", 64.0 * 1024.0 * 1024.0);
const DEFAULT_MEMORY_LIMIT: DefaultQuantity = DefaultQuantity("256Mi", 256.0 * 1024.0 * 1024.0);
pub const DEFAULT_DRAIN_TIMEOUT: &str = "30s";

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// How one pod's sidecar is set up, from its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `pylon-init`'s flags after `init-iptables`.
    pub init_flags: Vec<String>,
    /// The `pylon` container's `resources`.
    pub resources: Value,
    /// `PYLON_DRAIN_TIMEOUT`.
    pub drain_timeout: String,
    /// `PYLON_LOG`, when the pod sets one.
    pub log_level: Option<String>,
    /// `PYLON_WORKERS`: the sidecar's worker threads, the CPU it is given
    /// rounded up (its limit, else its request).
    pub workers: String,
}

/// Worker threads for a sidecar given `cpu` (its CPU limit, else its
/// request): the cores rounded up, at least one. A sidecar on a node with
/// 32 CPUs and no limit would otherwise start 32 workers, and tokio's
/// multi-thread scheduler costs about twice the CPU per request of its
/// current-thread one where the cores are shared (docs/performance.md).
fn workers_for(cpu: &str) -> String {
    let cores = quantity::parse(cpu).unwrap_or(1.0);
    // `3000m` may parse a hair above 3.0; CPU is kept to a thousandth of
    // a core, so nothing real lies within a millionth above a whole core.
    let workers = (cores - 1e-6)
        .ceil()
        .clamp(1.0, pylon_proto::MAX_WORKERS as f64);
    format!("{workers}")
}

/// Whether the pod's `pylon.dev/inject` label or annotation opts it out.
/// `metadata` is the pod's (or the pod template's) metadata.
pub fn opted_out(metadata: Option<&Value>, at: &FieldPath) -> Result<bool, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut disabled = false;
    for field in ["labels", "annotations"] {
        let Some(value) = metadata
            .and_then(|m| m.get(field))
            .and_then(|m| m.get(INJECT))
        else {
            continue;
        };
        match value.as_str() {
            Some("disabled") => disabled = true,
            Some("enabled") => {}
            _ => problems.push(Problem::at(
                &at.field(field).key(INJECT),
                format!("{value} is neither \"enabled\" nor \"disabled\""),
            )),
        }
    }
    if problems.is_empty() {
        Ok(disabled)
    } else {
        Err(problems)
    }
}

/// Reads the pod's annotations (`at` is where they are:
/// `….metadata.annotations`).
pub fn read(
    annotations: Option<&Map<String, Value>>,
    at: &FieldPath,
) -> Result<Settings, Vec<Problem>> {
    let empty = Map::new();
    let mut reader = Reader {
        annotations: annotations.unwrap_or(&empty),
        at,
        problems: Vec::new(),
    };
    let settings = reader.settings();
    if reader.problems.is_empty() {
        Ok(settings)
    } else {
        Err(reader.problems)
    }
}

/// Reads annotations, noting every problem on the way.
struct Reader<'a> {
    annotations: &'a Map<String, Value>,
    at: &'a FieldPath,
    problems: Vec<Problem>,
}

/// A quantity annotation: as written, and its value.
struct Quantity {
    text: String,
    value: f64,
}

impl Reader<'_> {
    fn settings(&mut self) -> Settings {
        let mut init_flags = Vec::new();
        for (key, flag, is_valid) in [
            (
                SKIP_INBOUND_PORTS,
                "--skip-inbound-ports",
                is_port as fn(&str) -> bool,
            ),
            (SKIP_OUTBOUND_PORTS, "--skip-outbound-ports", is_port),
            (SKIP_OUTBOUND_CIDRS, "--skip-outbound-cidrs", is_cidr),
        ] {
            if let Some(list) = self.list(key, is_valid) {
                init_flags.extend([flag.to_string(), list]);
            }
        }
        let (cpu_request, cpu_limit) =
            self.request_and_limit(PROXY_CPU, PROXY_CPU_LIMIT, DEFAULT_CPU_REQUEST, None);
        let (memory_request, memory_limit) = self.request_and_limit(
            PROXY_MEMORY,
            PROXY_MEMORY_LIMIT,
            DEFAULT_MEMORY_REQUEST,
            Some(DEFAULT_MEMORY_LIMIT),
        );
        let workers = workers_for(cpu_limit.as_deref().unwrap_or(&cpu_request));
        let mut limits = Map::new();
        if let Some(cpu) = cpu_limit {
            limits.insert("cpu".into(), cpu.into());
        }
        if let Some(memory) = memory_limit {
            limits.insert("memory".into(), memory.into());
        }
        Settings {
            init_flags,
            resources: json!({
                "requests": { "cpu": cpu_request, "memory": memory_request },
                "limits": limits,
            }),
            drain_timeout: self
                .duration(DRAIN_TIMEOUT)
                .unwrap_or_else(|| DEFAULT_DRAIN_TIMEOUT.to_string()),
            log_level: self.log_level(LOG_LEVEL),
            workers,
        }
    }

    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(Problem::at(&self.at.key(key), message));
    }

    /// The annotation's text, trimmed; `None` when absent or blank.
    fn text(&mut self, key: &str) -> Option<String> {
        match self.annotations.get(key)? {
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(s.trim().to_string()),
            other => {
                self.problem(
                    key,
                    format!("{other} is not a string (annotation values are strings: quote it)"),
                );
                None
            }
        }
    }

    /// A comma list with the whitespace removed, every entry checked.
    fn list(&mut self, key: &str, is_valid: fn(&str) -> bool) -> Option<String> {
        let text = self.text(key)?;
        let list: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let before = self.problems.len();
        for entry in list.split(',') {
            if entry.is_empty() {
                self.problem(key, format!("{text:?} has an empty entry"));
            } else if !is_valid(entry) {
                let what = if key == SKIP_OUTBOUND_CIDRS {
                    "a CIDR (e.g. 10.0.0.0/8, fd00::/8) or an IP address"
                } else {
                    "a port (1-65535)"
                };
                self.problem(key, format!("{entry:?} is not {what}"));
            }
        }
        (self.problems.len() == before).then_some(list)
    }

    fn quantity(&mut self, key: &str) -> Option<Quantity> {
        let text = self.text(key)?;
        match quantity::parse(&text) {
            Some(value) => Some(Quantity { text, value }),
            None => {
                self.problem(
                    key,
                    format!("{text:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)"),
                );
                None
            }
        }
    }

    /// A resource's request and limit. What is not given defaults, but
    /// never so that the request exceeds the limit (which the API server
    /// refuses): a request above the default limit raises the limit, a
    /// limit below the default request lowers the request.
    fn request_and_limit(
        &mut self,
        request_key: &str,
        limit_key: &str,
        default_request: DefaultQuantity,
        default_limit: Option<DefaultQuantity>,
    ) -> (String, Option<String>) {
        let request = self.quantity(request_key);
        let limit = self.quantity(limit_key);
        match (request, limit) {
            (Some(request), Some(limit)) => {
                if request.value > limit.value {
                    self.problem(
                        request_key,
                        format!(
                            "{:?} is more than the limit {limit_key} {:?}",
                            request.text, limit.text
                        ),
                    );
                }
                (request.text, Some(limit.text))
            }
            (Some(request), None) => {
                let limit = default_limit.map(|DefaultQuantity(text, value)| {
                    if request.value > value {
                        request.text.clone()
                    } else {
                        text.to_string()
                    }
                });
                (request.text, limit)
            }
            (None, Some(limit)) => {
                let DefaultQuantity(text, value) = default_request;
                let request = if value > limit.value {
                    limit.text.clone()
                } else {
                    text.to_string()
                };
                (request, Some(limit.text))
            }
            (None, None) => (
                default_request.0.to_string(),
                default_limit.map(|d| d.0.to_string()),
            ),
        }
    }

    fn duration(&mut self, key: &str) -> Option<String> {
        let text = self.text(key)?;
        match pylon_proto::policy::parse_duration(&text) {
            Ok(_) => Some(text),
            Err(_) => {
                self.problem(key, format!("{text:?} is not a duration (e.g. 30s, 1m30s)"));
                None
            }
        }
    }

    fn log_level(&mut self, key: &str) -> Option<String> {
        let text = self.text(key)?;
        if text.split(',').all(is_log_directive) {
            Some(text)
        } else {
            self.problem(
                key,
                format!(
                    "{text:?} is not a log level ({}) or a list of target=level directives",
                    LEVELS.join(", ")
                ),
            );
            None
        }
    }
}

fn is_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p != 0) && !s.starts_with('+')
}

/// `10.0.0.0/8`, `fd00::/8`, or one address.
fn is_cidr(s: &str) -> bool {
    let (address, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(address) = address.parse::<IpAddr>() else {
        return false;
    };
    let max = if address.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| {
        p.chars().all(|c| c.is_ascii_digit()) && p.parse::<u8>().is_ok_and(|p| p <= max)
    })
}

/// `info`, or `pylon=debug` (a target of letters, digits, `_`, `:`, `-`).
fn is_log_directive(s: &str) -> bool {
    let is_level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    match s.split_once('=') {
        None => is_level(s),
        Some((target, level)) => {
            !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
                && is_level(level)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn at() -> FieldPath {
        FieldPath::root().field("metadata").field("annotations")
    }

    #[test]
    fn the_defaults_match_their_text() {
        for d in [
            DEFAULT_CPU_REQUEST,
            DEFAULT_MEMORY_REQUEST,
            DEFAULT_MEMORY_LIMIT,
        ] {
            assert_eq!(quantity::parse(d.0), Some(d.1), "{}", d.0);
        }
    }

    #[test]
    fn no_annotations_give_the_defaults() {
        let s = read(None, &at()).unwrap();
        assert!(s.init_flags.is_empty());
        assert_eq!(
            s.resources,
            json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
        );
        assert_eq!(s.drain_timeout, "30s");
        assert_eq!(s.log_level, None);
        assert_eq!(s.workers, "1");
    }

    #[test]
    fn annotations_set_flags_resources_drain_and_log() {
        let a = annotations(&[
            (SKIP_INBOUND_PORTS, json!(" 9090, 9091 ")),
            (SKIP_OUTBOUND_PORTS, json!("")),
            (
                SKIP_OUTBOUND_CIDRS,
                json!("169.254.169.254/32,fd00::/8, 10.1.2.3"),
            ),
            (PROXY_CPU, json!("250m")),
            (PROXY_CPU_LIMIT, json!("1")),
            (PROXY_MEMORY, json!("128Mi")),
            (DRAIN_TIMEOUT, json!("45s")),
            (LOG_LEVEL, json!("info,pylon=debug")),
        ]);
        let s = read(Some(&a), &at()).unwrap();
        assert_eq!(
            s.init_flags,
            [
                "--skip-inbound-ports",
                "9090,9091",
                "--skip-outbound-cidrs",
                "169.254.169.254/32,fd00::/8,10.1.2.3"
            ]
        );
        assert_eq!(
            s.resources,
            json!({"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
        );
        assert_eq!(s.drain_timeout, "45s");
        assert_eq!(s.log_level.as_deref(), Some("info,pylon=debug"));
        assert_eq!(s.workers, "1");
    }

    #[test]
    fn workers_follow_the_cpu_limit_else_the_request_rounded_up() {
        for (given, workers) in [
            (vec![], "1"),
            (vec![(PROXY_CPU, "250m")], "1"),
            (vec![(PROXY_CPU, "2")], "2"),
            (vec![(PROXY_CPU, "1500m")], "2"),
            (vec![(PROXY_CPU, "3000m")], "3"),
            (vec![(PROXY_CPU, "250m"), (PROXY_CPU_LIMIT, "4")], "4"),
            (vec![(PROXY_CPU, "2"), (PROXY_CPU_LIMIT, "2.5")], "3"),
            (vec![(PROXY_CPU_LIMIT, "50m")], "1"),
            (vec![(PROXY_CPU, "100k")], "1024"),
        ] {
            let a = annotations(
                &given
                    .iter()
                    .map(|(k, v)| (*k, json!(v)))
                    .collect::<Vec<_>>(),
            );
            assert_eq!(read(Some(&a), &at()).unwrap().workers, workers, "{given:?}");
        }
    }

    #[test]
    fn a_request_never_defaults_above_its_limit_nor_a_limit_below_its_request() {
        let a = annotations(&[
            (PROXY_MEMORY, json!("1Gi")),
            (PROXY_CPU_LIMIT, json!("50m")),
        ]);
        let s = read(Some(&a), &at()).unwrap();
        assert_eq!(
            s.resources,
            json!({"requests": {"cpu": "50m", "memory": "1Gi"}, "limits": {"cpu": "50m", "memory": "1Gi"}})
        );
    }

    #[test]
    fn every_bad_annotation_is_reported_with_its_path() {
        let a = annotations(&[
            (SKIP_INBOUND_PORTS, json!("abc")),
            (SKIP_OUTBOUND_PORTS, json!("80,,0,70000")),
            (SKIP_OUTBOUND_CIDRS, json!("10.0.0.0/33,nope")),
            (PROXY_CPU, json!("lots")),
            (PROXY_MEMORY, json!("512Mi")),
            (PROXY_MEMORY_LIMIT, json!("256Mi")),
            (PROXY_CPU_LIMIT, json!(2)),
            (DRAIN_TIMEOUT, json!("30")),
            (LOG_LEVEL, json!("verbose")),
        ]);
        let problems: Vec<String> = read(Some(&a), &at())
            .unwrap_err()
            .iter()
            .map(Problem::to_string)
            .collect();
        let k = |key: &str| format!("metadata.annotations[{key:?}]");
        assert_eq!(
            problems,
            [
                format!("{}: \"abc\" is not a port (1-65535)", k(SKIP_INBOUND_PORTS)),
                format!(
                    "{}: \"80,,0,70000\" has an empty entry",
                    k(SKIP_OUTBOUND_PORTS)
                ),
                format!("{}: \"0\" is not a port (1-65535)", k(SKIP_OUTBOUND_PORTS)),
                format!(
                    "{}: \"70000\" is not a port (1-65535)",
                    k(SKIP_OUTBOUND_PORTS)
                ),
                format!(
                    "{}: \"10.0.0.0/33\" is not a CIDR (e.g. 10.0.0.0/8, fd00::/8) or an IP address",
                    k(SKIP_OUTBOUND_CIDRS)
                ),
                format!(
                    "{}: \"nope\" is not a CIDR (e.g. 10.0.0.0/8, fd00::/8) or an IP address",
                    k(SKIP_OUTBOUND_CIDRS)
                ),
                format!(
                    "{}: \"lots\" is not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1Gi)",
                    k(PROXY_CPU)
                ),
                format!(
                    "{}: 2 is not a string (annotation values are strings: quote it)",
                    k(PROXY_CPU_LIMIT)
                ),
                format!(
                    "{}: \"512Mi\" is more than the limit {PROXY_MEMORY_LIMIT} \"256Mi\"",
                    k(PROXY_MEMORY)
                ),
                format!(
                    "{}: \"30\" is not a duration (e.g. 30s, 1m30s)",
                    k(DRAIN_TIMEOUT)
                ),
                format!(
                    "{}: \"verbose\" is not a log level (trace, debug, info, warn, error, off) or a list of target=level directives",
                    k(LOG_LEVEL)
                ),
            ]
        );
    }

    #[test]
    fn the_inject_label_or_annotation_opts_out() {
        let at = FieldPath::root().field("metadata");
        let meta = |field: &str, v: &str| json!({ field: { INJECT: v } });
        assert!(opted_out(Some(&meta("labels", "disabled")), &at).unwrap());
        assert!(opted_out(Some(&meta("annotations", "disabled")), &at).unwrap());
        assert!(!opted_out(Some(&meta("labels", "enabled")), &at).unwrap());
        assert!(!opted_out(None, &at).unwrap());
        let err = opted_out(Some(&meta("labels", "false")), &at).unwrap_err();
        assert_eq!(
            err[0].to_string(),
            "metadata.labels[\"pylon.dev/inject\"]: \"false\" is neither \"enabled\" nor \"disabled\""
        );
    }
}
