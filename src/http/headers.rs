//! Header handling between hops (RFC 9110 §7.6.1), the rewriting of a
//! request for the protocol of the next hop, and what a caller may not
//! tell the next hop: fields only the mesh sets (`x-pylon-*`,
//! `x-forwarded-client-cert`) are removed from what callers send, and
//! names with underscores are dropped or refused.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::UnderscoreAction;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Version};

/// Set on a mesh hop (always HTTP/2) when the caller spoke HTTP/1, so the
/// receiving sidecar speaks HTTP/1.1 to its application.
pub const X_PYLON_ORIG_PROTO: HeaderName = HeaderName::from_static("x-pylon-orig-proto");

/// The caller's SPIFFE ID, as the inbound sidecar tells its application.
pub const X_PYLON_PEER_IDENTITY: HeaderName = HeaderName::from_static("x-pylon-peer-identity");

pub const ORIG_PROTO_HTTP1: HeaderValue = HeaderValue::from_static("HTTP/1.1");

/// The caller's certificate, as the inbound sidecar tells its application
/// (Envoy's format: `By=<this workload>;URI=<the caller>`).
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What only the mesh sets.
const MESH_PREFIX: &str = "x-pylon-";

/// Fields a peer sidecar sets on a mesh hop, kept on inbound when the
/// caller proved its identity: the caller's HTTP version, the attempt
/// number (`proxy::call`).
const MESH_HOP: [HeaderName; 2] = [
    X_PYLON_ORIG_PROTO,
    HeaderName::from_static("x-pylon-attempt"),
];

/// What the inbound sidecar tells the app about a caller that proved its
/// identity.
#[derive(Debug, Clone)]
pub struct PeerHeaders {
    /// `x-pylon-peer-identity`: the caller's SPIFFE ID.
    pub identity: HeaderValue,
    /// `x-forwarded-client-cert`.
    pub xfcc: HeaderValue,
}

impl PeerHeaders {
    /// The headers for a caller `peer` of this workload `own` (SPIFFE IDs).
    pub fn new(own: &str, peer: &str) -> Option<PeerHeaders> {
        Some(PeerHeaders {
            identity: HeaderValue::from_str(peer).ok()?,
            xfcc: HeaderValue::from_str(&format!("By={own};URI={peer}")).ok()?,
        })
    }
}

/// Readies a request from the local app (outbound): no `x-pylon-*` field
/// it sent goes on, and names with underscores are dropped or refused.
/// `Err` names the refused field.
pub fn sanitize_outbound(
    headers: &mut HeaderMap,
    underscores: UnderscoreAction,
) -> Result<(), HeaderName> {
    sanitize(headers, &[], underscores)
}

/// Readies a request for the local app (inbound): from a caller that
/// proved its identity (`peer`), the fields its sidecar set for this hop
/// stay and the caller's identity and certificate are set; every other
/// `x-pylon-*` field and any `x-forwarded-client-cert` the caller sent are
/// removed, and names with underscores dropped or refused. `Err` names the
/// refused field.
pub fn sanitize_inbound(
    headers: &mut HeaderMap,
    peer: Option<&PeerHeaders>,
    underscores: UnderscoreAction,
) -> Result<(), HeaderName> {
    let keep: &[HeaderName] = if peer.is_some() { &MESH_HOP } else { &[] };
    headers.remove(X_FORWARDED_CLIENT_CERT);
    sanitize(headers, keep, underscores)?;
    if let Some(peer) = peer {
        headers.insert(X_PYLON_PEER_IDENTITY, peer.identity.clone());
        headers.insert(X_FORWARDED_CLIENT_CERT, peer.xfcc.clone());
    }
    Ok(())
}

fn sanitize(
    headers: &mut HeaderMap,
    keep: &[HeaderName],
    underscores: UnderscoreAction,
) -> Result<(), HeaderName> {
    // Nothing is allocated for the usual request, which has neither.
    let unwanted = |name: &HeaderName| {
        let s = name.as_str();
        (s.starts_with(MESH_PREFIX) && !keep.contains(name)) || s.contains('_')
    };
    if !headers.keys().any(unwanted) {
        return Ok(());
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| unwanted(n)).cloned().collect();
    for name in names {
        if name.as_str().contains('_') && underscores == UnderscoreAction::Reject {
            return Err(name);
        }
        headers.remove(&name);
    }
    Ok(())
}

/// Fields that describe one connection and never cross a proxy, besides
/// those named in `Connection`.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Removes hop-by-hop fields. Returns whether the caller announced it
/// accepts trailers (`TE: trailers`), which the next hop must hear again.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // Most messages carry none of them: one pass over the few names present
    // costs less than a hashed lookup per hop-by-hop name (this runs on
    // every request and response, in both sidecars). The pass notes which
    // are present, so that only those are looked up and removed: a gRPC
    // call always carries `te`, and usually nothing else of the list.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return false;
    }
    let has = |name: &HeaderName| {
        HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .is_some_and(|i| present & (1 << i) != 0)
    };
    let te_trailers = has(&header::TE)
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    if has(&header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    te_trailers
}

/// Readies an upstream response for the caller: hop-by-hop fields removed,
/// and the HTTP version left for this hop's server to choose (a response
/// carries the version of whoever sends it, here the proxy).
pub fn response_for_caller<B>(resp: &mut http::Response<B>) {
    strip_hop_by_hop(resp.headers_mut());
    *resp.version_mut() = Version::default();
}

/// Where a request goes next and how it is spoken there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
}

/// Rewrites `req` (already stripped of hop-by-hop fields) for the next hop:
/// HTTP/2 carries the authority in the URI (`:authority`) and no `Host`;
/// HTTP/1.1 carries an origin-form target and a `Host` field.
pub fn rewrite_for(
    req: &mut Request<impl Sized>,
    wire: Wire,
    scheme: Scheme,
    authority: Option<&Authority>,
    te_trailers: bool,
) {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match wire {
        Wire::Http2 => {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme);
            parts.authority = authority.cloned();
            parts.path_and_query = Some(path);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
            if te_trailers {
                req.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            *req.version_mut() = Version::HTTP_2;
        }
        Wire::Http1 => {
            *req.uri_mut() = Uri::from(path);
            if let Some(a) = authority
                && !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            if te_trailers {
                req.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            *req.version_mut() = Version::HTTP_11;
        }
    }
}

/// The authority a request names: `:authority` / the absolute URI, else the
/// `Host` field.
pub fn request_authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_local_app_cannot_send_what_only_the_mesh_sets() {
        let mut h = headers(&[
            ("x-pylon-peer-identity", "spiffe://x/forged"),
            ("x-pylon-orig-proto", "HTTP/1.1"),
            ("x_pylon_peer_identity", "spiffe://x/forged"),
            ("x-kept", "1"),
            ("content-type", "application/grpc"),
        ]);
        sanitize_outbound(&mut h, UnderscoreAction::Drop).unwrap();
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-kept"]);

        let mut h = headers(&[("x_custom", "1"), ("x-pylon-a", "1")]);
        assert_eq!(
            sanitize_outbound(&mut h, UnderscoreAction::Reject).unwrap_err(),
            "x_custom"
        );
    }

    #[test]
    fn inbound_sets_the_callers_identity_and_certificate() {
        let own = "spiffe://t/ns/default/sa/echo";
        let peer = PeerHeaders::new(own, "spiffe://t/ns/default/sa/client").unwrap();
        let mut h = headers(&[
            ("x-pylon-peer-identity", "spiffe://t/forged"),
            ("x-forwarded-client-cert", "By=a;URI=spiffe://t/forged"),
            ("x-pylon-orig-proto", "HTTP/1.1"),
            ("x-pylon-attempt", "2"),
            ("x-pylon-other", "1"),
        ]);
        sanitize_inbound(&mut h, Some(&peer), UnderscoreAction::Drop).unwrap();
        assert_eq!(
            h["x-pylon-peer-identity"],
            "spiffe://t/ns/default/sa/client"
        );
        assert_eq!(
            h["x-forwarded-client-cert"],
            "By=spiffe://t/ns/default/sa/echo;URI=spiffe://t/ns/default/sa/client"
        );
        assert_eq!(h["x-pylon-orig-proto"], "HTTP/1.1");
        assert_eq!(h["x-pylon-attempt"], "2");
        assert!(!h.contains_key("x-pylon-other"));

        // A plaintext caller: nothing of the mesh's, no certificate.
        let mut h = headers(&[
            ("x-pylon-peer-identity", "spiffe://t/forged"),
            ("x-forwarded-client-cert", "URI=spiffe://t/forged"),
            ("x-pylon-orig-proto", "HTTP/1.1"),
            ("accept", "*/*"),
        ]);
        sanitize_inbound(&mut h, None, UnderscoreAction::Drop).unwrap();
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["accept"]
        );
    }

    #[test]
    fn strips_hop_by_hop_and_fields_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(strip_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn each_hop_by_hop_field_alone_is_stripped() {
        for (name, value) in [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("te", "gzip"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            let te_trailers = strip_hop_by_hop(&mut h);
            assert_eq!(te_trailers, value == "trailers", "{name}: {value}");
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert!(h.contains_key("x-kept"));
        }
    }

    #[test]
    fn http1_to_http2_moves_host_into_the_uri() {
        let mut req = Request::builder()
            .uri("/a?b=c")
            .header(header::HOST, "greeter:8080")
            .body(())
            .unwrap();
        let authority = request_authority(&req).unwrap();
        rewrite_for(
            &mut req,
            Wire::Http2,
            Scheme::HTTPS,
            Some(&authority),
            false,
        );
        assert_eq!(req.uri(), "https://greeter:8080/a?b=c");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.version(), Version::HTTP_2);
    }

    #[test]
    fn http2_to_http1_uses_origin_form_and_host() {
        let mut req = Request::builder()
            .uri("http://greeter/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let authority = request_authority(&req).unwrap();
        rewrite_for(&mut req, Wire::Http1, Scheme::HTTP, Some(&authority), true);
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()[header::HOST], "greeter");
        assert_eq!(req.headers()[header::TE], "trailers");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
