//! The sidecar's bootstrap configuration (`pylon.yaml` and `PYLON_*`
//! environment variables; injection writes the latter from pod
//! annotations). Input: the file, then optionally a NUL and environment
//! lines `<k><value>`, where byte `k` picks one of the known keys.
//! Invariants: no panic; a refusal says why (every problem, each a bounded
//! line); reading is deterministic.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pylon::config::{Config, env_name};

/// Every key the file may hold (`config::KEYS`), plus one it may not.
const KEYS: &[&str] = &[
    "admin.listen",
    "admin.probeListen",
    "outbound.listen",
    "outbound.retryBufferBytes",
    "outbound.unmatched",
    "outbound.detectTimeout",
    "outbound.serverFirstPorts",
    "inbound.listen",
    "inbound.app",
    "inbound.mode",
    "appProbes",
    "drainTimeout",
    "kubernetes.podName",
    "kubernetes.namespace",
    "kubernetes.serviceAccount",
    "kubernetes.podIp",
    "kubernetes.clusterDomain",
    "identity.files.cert",
    "identity.files.key",
    "identity.files.trustBundle",
    "identity.controlPlane",
    "identity.controlPlane.tokenFile",
    "policy.file",
    "policy.controlPlane",
    "policy.maxBytes",
    "controlPlane.address",
    "controlPlane.caFile",
    "controlPlane.tokenFile",
    "telemetry.serviceName",
    "telemetry.otlp.endpoint",
    "telemetry.sampling",
    "telemetry.accessLog",
    "telemetry.logFormat",
    "telemetry.otlp.metricsInterval",
    "stateDir",
    "dns.nameservers",
    "dns.searchDomains",
    "dns.minTtl",
    "dns.maxTtl",
    "no.suchKey",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (yaml, env_text) = text.split_once('\0').unwrap_or((&text, ""));
    let mut env = BTreeMap::new();
    for line in env_text.split('\n').filter(|l| !l.is_empty()) {
        let k = usize::from(line.as_bytes()[0]) % KEYS.len();
        let value = line.get(1..).unwrap_or_else(|| &line[line.len()..]);
        // The byte may start a multi-byte character: then the value is all of it.
        let value = if line.is_char_boundary(1) {
            value
        } else {
            line
        };
        env.insert(env_name(KEYS[k]), value.to_string());
    }
    let first = Config::from_parts(yaml, Path::new("/etc/pylon"), &env);
    let second = Config::from_parts(yaml, Path::new("/etc/pylon"), &env);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
        (Err(a), Err(b)) => {
            assert_eq!(a.0, b.0);
            assert!(!a.0.is_empty(), "refused without a reason");
            for e in &a.0 {
                assert!(!e.is_empty());
                assert!(
                    e.len() <= 1024 + 4 * data.len(),
                    "a {}-byte message for a {}-byte input",
                    e.len(),
                    data.len()
                );
            }
            let _ = a.to_string();
        }
        _ => panic!("the same input read two ways"),
    }
});
