//! Value rules shared by the decoder (names, hostnames, SPIFFE IDs, header
//! tokens, match patterns) and the cross-resource checks over a complete set.
//!
//! Per-value rules are plain functions from text to a normalised value or a
//! message. The set checks look only at the model; they do not know YAML
//! lines, which `parse` adds afterwards.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::{BackendRef, Kind, PolicyError, Resource, Spec, TargetKind};

/// `metadata.name` and names that refer to resources: a lowercase RFC 1123
/// subdomain, `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`, at most 253 characters.
pub(crate) fn resource_name(s: &str) -> Result<String, String> {
    rfc1123(s, 253, true).map_err(|why| format!("invalid name {s:?}: {why}"))
}

/// A namespace: a lowercase RFC 1123 label, at most 63 characters.
pub(crate) fn namespace(s: &str) -> Result<String, String> {
    rfc1123(s, 63, false).map_err(|why| format!("invalid namespace {s:?}: {why}"))
}

/// A Kubernetes Service name: a DNS-1035 label (lowercase letters, digits
/// and `-`, starting with a letter, ending with a letter or digit, at most 63
/// characters), since it becomes the first label of the Service's DNS names.
pub(crate) fn service_name(s: &str) -> Result<String, String> {
    let fail = |why: &str| Err(format!("invalid Service name {s:?}: {why}"));
    rfc1123(s, 63, false).or_else(|why| fail(&why))?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return fail("must start with a lowercase letter");
    }
    Ok(s.to_string())
}

fn rfc1123(s: &str, max: usize, dots: bool) -> Result<String, String> {
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if s.is_empty() {
        Err("must not be empty".into())
    } else if s.len() > max {
        Err(format!("must be at most {max} characters"))
    } else if !s.chars().all(allowed) || !edge(s.chars().next()) || !edge(s.chars().last()) {
        let chars = if dots {
            "lowercase letters, digits, '-' and '.'"
        } else {
            "lowercase letters, digits and '-'"
        };
        Err(format!(
            "must consist of {chars}, and start and end with a letter or digit"
        ))
    } else {
        Ok(s.to_string())
    }
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens,
/// each at most 63 characters, at most 253 in all.
fn dns_labels(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for label in s.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "label {label:?} must be 1 to 63 letters, digits or inner hyphens"
            ));
        }
    }
    Ok(())
}

/// `endpoints.dns.hostname`; a trailing dot (fully qualified) is kept.
pub(crate) fn dns_hostname(s: &str) -> Result<String, String> {
    dns_labels(s.strip_suffix('.').unwrap_or(s))
        .map_err(|why| format!("invalid hostname {s:?}: {why}"))?;
    Ok(s.to_string())
}

/// A route hostname: a DNS name, an IP address or a `*.suffix` wildcard,
/// optionally with `:port`; returned lowercase.
pub(crate) fn route_hostname(s: &str) -> Result<String, String> {
    let fail = |why: &str| Err(format!("invalid hostname {s:?}: {why}"));
    let lower = s.to_ascii_lowercase();
    let (host, port) = if let Some(rest) = lower.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return fail("missing ']'");
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return fail("not an IPv6 address between '[' and ']'");
        }
        match after {
            "" => (ip, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return fail("expected ':port' after ']'"),
            },
        }
    } else if lower.parse::<Ipv6Addr>().is_ok() {
        (lower.as_str(), None)
    } else {
        match lower.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (lower.as_str(), None),
        }
    };
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return fail("port must be 1-65535");
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(lower.clone());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.contains('*') {
        return fail("a wildcard must be a leading '*.' label");
    }
    match dns_labels(name) {
        Ok(()) => Ok(lower.clone()),
        Err(why) => fail(&why),
    }
}

/// A static endpoint: `ip:port` (`[v6]:port`), port 1-65535.
pub(crate) fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            Err(format!("invalid endpoint {s:?}: port must be 1-65535"))
        }
        Ok(addr) => Ok(addr),
        Err(_) => Err(format!(
            "invalid endpoint {s:?} (expected ip:port, e.g. 10.0.0.7:8080 or [fd00::7]:8080)"
        )),
    }
}

/// `spiffe://trust-domain/path`: a non-empty trust domain of lowercase
/// letters, digits, `.`, `-` and `_`, then a path of one or more non-empty
/// segments that are not `.` or `..`.
pub(crate) fn spiffe_id(s: &str) -> Result<String, String> {
    let fail = |why: &str| Err(format!("invalid SPIFFE ID {s:?}: {why}"));
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return fail("must start with spiffe://");
    };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    if domain.is_empty() {
        return fail("the trust domain is empty");
    }
    if !domain
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
    {
        return fail("the trust domain may hold only lowercase letters, digits, '.', '-' and '_'");
    }
    if path.is_empty() {
        return fail("a path is required after the trust domain");
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return fail("path segments must be non-empty and not '.' or '..'");
        }
        if !segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
        {
            return fail("path segments may hold only letters, digits, '.', '-' and '_'");
        }
    }
    Ok(s.to_string())
}

/// An HTTP token (RFC 9110 `tchar`s), as header names and methods are.
fn http_token(s: &str, what: &str) -> Result<(), String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if s.is_empty() || !s.chars().all(tchar) {
        return Err(format!(
            "invalid {what} {s:?}: must be a non-empty HTTP token"
        ));
    }
    Ok(())
}

/// A header name, returned lowercase.
pub(crate) fn header_name(s: &str) -> Result<String, String> {
    http_token(s, "header name").map(|()| s.to_ascii_lowercase())
}

/// A header value: no control characters other than tab.
pub(crate) fn header_value(s: &str) -> Result<String, String> {
    if s.chars().any(|c| c.is_control() && c != '\t') {
        return Err("header values must not contain control characters".into());
    }
    Ok(s.to_string())
}

/// An HTTP method, returned uppercase.
pub(crate) fn http_method(s: &str) -> Result<String, String> {
    http_token(s, "HTTP method").map(|()| s.to_ascii_uppercase())
}

/// A path match value.
pub(crate) fn http_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("invalid path {s:?}: must start with \"/\""));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid path {s:?}: must not contain whitespace"));
    }
    Ok(s.to_string())
}

/// A gRPC service or method name in a match.
pub(crate) fn grpc_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid name {s:?}: must be non-empty, without '/' or whitespace"
        ));
    }
    Ok(s.to_string())
}

/// An authorization pattern: exact, `prefix*`, `*suffix` or `*`.
pub(crate) fn pattern(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let inner = s
        .strip_prefix('*')
        .or_else(|| s.strip_suffix('*'))
        .unwrap_or(s);
    if s != "*" && inner.contains('*') {
        return Err(format!(
            "invalid pattern {s:?}: '*' may only be the whole pattern, its first or its last character"
        ));
    }
    Ok(s.to_string())
}

/// A cross-resource problem: the index of the resource it is about, and the
/// error with its path (without a line: the model does not keep them).
pub(crate) type SetProblem = (usize, PolicyError);

/// The cross-resource rules over a complete set, in resource order.
pub(crate) fn check_set(resources: &[Resource]) -> Vec<SetProblem> {
    let mut problems = Vec::new();
    let mut seen = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let m = &r.metadata;
        if seen
            .insert((r.kind(), m.namespace.as_str(), m.name.as_str()), i)
            .is_some()
        {
            let message = format!(
                "duplicate: another {} named {:?} exists in namespace {:?}",
                r.kind(),
                m.name,
                m.namespace
            );
            problems.push((
                i,
                PolicyError::new(r.display_name(), "metadata.name", message),
            ));
        }
    }
    let backend = |ns: &str, name: &str| seen.contains_key(&(Kind::Backend, ns, name));
    let mut targeted: HashMap<(TargetKind, &str, &str), String> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let ns = r.metadata.namespace.as_str();
        let mut report = |path: String, message: String| {
            problems.push((i, PolicyError::new(r.display_name(), path, message)));
        };
        let mut refs = |rules: Vec<&[BackendRef]>| {
            for (j, rule) in rules.into_iter().enumerate() {
                for (k, b) in rule.iter().enumerate() {
                    let b_ns = b.namespace.as_deref().unwrap_or(ns);
                    if !backend(b_ns, &b.name) {
                        let where_ = if b_ns == ns {
                            String::new()
                        } else {
                            format!(" in namespace {b_ns:?}")
                        };
                        report(
                            format!("spec.rules[{j}].backendRefs[{k}].name"),
                            format!("no Backend {:?}{where_}", b.name),
                        );
                    }
                }
            }
        };
        match &r.spec {
            Spec::GrpcRoute(s) => refs(
                s.rules
                    .iter()
                    .map(|rule| rule.backend_refs.as_slice())
                    .collect(),
            ),
            Spec::HttpRoute(s) => refs(
                s.rules
                    .iter()
                    .map(|rule| rule.backend_refs.as_slice())
                    .collect(),
            ),
            Spec::BackendTrafficPolicy(s) => {
                for (j, t) in s.target_refs.iter().enumerate() {
                    let path = format!("spec.targetRefs[{j}].name");
                    if t.kind == TargetKind::Backend && !backend(ns, &t.name) {
                        report(path, format!("no Backend {:?}", t.name));
                        continue;
                    }
                    // One policy per target: two would leave which one wins
                    // to file order.
                    let key = (t.kind, ns, t.name.as_str());
                    if let Some(first) = targeted.get(&key) {
                        report(
                            path,
                            format!(
                                "{} {:?} is already targeted by {first}",
                                t.kind.as_str(),
                                t.name
                            ),
                        );
                    } else {
                        targeted.insert(key, r.display_name());
                    }
                }
            }
            Spec::Backend(_) | Spec::AuthorizationPolicy(_) => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "greeter",
            "greeter-v2",
            "a.b-c.d",
            "0",
            &"a".repeat(253),
        ] {
            assert_eq!(resource_name(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "Greeter",
            "-a",
            "a-",
            "a_b",
            "a.",
            ".a",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(resource_name(bad).is_err(), "{bad:?}");
        }
        assert!(namespace("team-a").is_ok());
        assert!(namespace(&"a".repeat(63)).is_ok());
        for bad in ["a.b", "A", "", &"a".repeat(64)] {
            assert!(namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostnames() {
        for (raw, want) in [
            ("Greeter", "greeter"),
            (
                "greeter.default.svc.cluster.local",
                "greeter.default.svc.cluster.local",
            ),
            ("*.Example.com", "*.example.com"),
            ("greeter:8080", "greeter:8080"),
            ("*.example.com:443", "*.example.com:443"),
            ("10.0.0.7", "10.0.0.7"),
            ("10.0.0.7:80", "10.0.0.7:80"),
            ("::1", "::1"),
            ("[FD00::7]:8080", "[fd00::7]:8080"),
            ("[fd00::7]", "[fd00::7]"),
        ] {
            assert_eq!(route_hostname(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "",
            "a..b",
            "-a",
            "a_b",
            "*",
            "a.*.com",
            "*a.com",
            "greeter:0",
            "greeter:99999",
            "greeter:",
            "[::1",
            "[x]:80",
            "[::1]80",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(route_hostname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(dns_hostname("Greeter.svc.").as_deref(), Ok("Greeter.svc."));
        assert!(dns_hostname("*.svc").is_err());
        assert!(dns_hostname("a:80").is_err());
    }

    #[test]
    fn spiffe_ids() {
        assert!(spiffe_id("spiffe://pylon.local/ns/default/sa/greeter").is_ok());
        for (bad, why) in [
            ("https://pylon.local/x", "must start with spiffe://"),
            ("spiffe:///ns/x", "trust domain is empty"),
            ("spiffe://pylon.local", "a path is required"),
            ("spiffe://pylon.local/", "a path is required"),
            ("spiffe://pylon.local/a//b", "non-empty"),
            ("spiffe://pylon.local/a/../b", "non-empty"),
            ("spiffe://Pylon.local/a", "lowercase"),
            ("spiffe://pylon.local/a b", "only letters"),
        ] {
            let err = spiffe_id(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn patterns_and_tokens() {
        for ok in [
            "*",
            "/helloworld.Greeter/*",
            "*.local",
            "exact",
            "spiffe://x/*",
        ] {
            assert!(pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "**", "a*b", "*a*", "a**"] {
            assert!(pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(header_name("X-Request-Id").as_deref(), Ok("x-request-id"));
        assert!(header_name("bad header").is_err());
        assert!(header_name("").is_err());
        assert_eq!(http_method("get").as_deref(), Ok("GET"));
        assert!(http_method("GE T").is_err());
        assert!(header_value("a\tb").is_ok());
        assert!(header_value("a\nb").is_err());
        assert!(http_path("/a").is_ok());
        assert!(http_path("a").is_err());
        assert!(http_path("/a b").is_err());
        assert!(grpc_name("helloworld.Greeter").is_ok());
        assert!(grpc_name("a/b").is_err());
        assert!(grpc_name("").is_err());
    }

    #[test]
    fn socket_addrs() {
        assert!(socket_addr("10.0.0.7:15006").is_ok());
        assert!(socket_addr("[fd00::7]:8080").is_ok());
        for bad in ["10.0.0.7", "greeter:80", "10.0.0.7:0", "10.0.0.7:70000", ""] {
            assert!(socket_addr(bad).is_err(), "{bad}");
        }
    }
}
