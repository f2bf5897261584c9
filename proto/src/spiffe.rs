//! SPIFFE workload identities as the mesh uses them:
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, carried as
//! the single `spiffe://` URI SAN of an X.509 certificate.

/// A workload identity's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// Splits a workload SPIFFE ID, checking the characters SPIFFE allows in a
/// trust domain and in path segments. `None` for any other shape.
pub fn parse(id: &str) -> Option<WorkloadId<'_>> {
    let domain_ok = |d: &str| {
        !d.is_empty()
            && d.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
    };
    let segment_ok = |s: &str| {
        s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
    };
    parse_shape(id).filter(|w| {
        domain_ok(w.trust_domain) && segment_ok(w.namespace) && segment_ok(w.service_account)
    })
}

/// Splits an ID of the workload shape, `spiffe://<td>/ns/<ns>/sa/<sa>` with
/// a non-empty namespace and service account, without checking characters:
/// how the sidecar reads an identity it was given (its own, or a verified
/// peer's), which may come from a CA other than the mesh's. `None` for any
/// other shape.
pub fn parse_shape(id: &str) -> Option<WorkloadId<'_>> {
    let mut parts = id.strip_prefix("spiffe://")?.split('/');
    let (domain, ns_label, ns, sa_label, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (parts.next().is_none()
        && ns_label == "ns"
        && sa_label == "sa"
        && !ns.is_empty()
        && !sa.is_empty())
    .then_some(WorkloadId {
        trust_domain: domain,
        namespace: ns,
        service_account: sa,
    })
}

/// The single `spiffe://` URI SAN of a DER certificate.
pub fn id_of_certificate(der: &[u8]) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("the certificate has no subjectAltName, so no SPIFFE ID")?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
        _ => None,
    });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id.to_string()),
        (None, _) => Err("the certificate has no spiffe:// URI SAN".into()),
        (Some(_), Some(_)) => Err("the certificate has more than one spiffe:// URI SAN".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids() {
        assert_eq!(
            parse("spiffe://pylon.local/ns/default/sa/greeter"),
            Some(WorkloadId {
                trust_domain: "pylon.local",
                namespace: "default",
                service_account: "greeter"
            })
        );
        for bad in [
            "",
            "greeter",
            "spiffe://pylon.local/ns/default",
            "spiffe://pylon.local/ns/default/sa/",
            "spiffe://pylon.local/ns/default/sa/greeter/x",
            "spiffe://pylon.local/sa/greeter/ns/default",
            "spiffe:///ns/default/sa/greeter",
            "spiffe://Pylon/ns/a/sa/b",
            "spiffe://td/ns/../sa/b",
            "https://td/ns/a/sa/b",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn workload_shapes_without_character_checks() {
        let w = parse_shape("spiffe://Other CA/ns/Team X/sa/web").unwrap();
        assert_eq!(
            (w.trust_domain, w.namespace, w.service_account),
            ("Other CA", "Team X", "web")
        );
        assert_eq!(
            parse_shape("spiffe:///ns/a/sa/b").map(|w| w.trust_domain),
            Some("")
        );
        for bad in [
            "spiffe://td/ns/x/sa/",
            "spiffe://td/ns//sa/y",
            "spiffe://td/ns/x/sa/y/z",
            "spiffe://td/ns/x",
            "spiffe://td/sa/y/ns/x",
            "spiffe://td",
            "https://td/ns/x/sa/y",
        ] {
            assert_eq!(parse_shape(bad), None, "{bad}");
        }
    }
}
