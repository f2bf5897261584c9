//! Header handling between hops (RFC 9110 §7.6.1) and the rewriting of a
//! request for the protocol of the next hop.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Version};

/// Set on a mesh hop (always HTTP/2) when the caller spoke HTTP/1, so the
/// receiving sidecar speaks HTTP/1.1 to its application.
pub const X_PYLON_ORIG_PROTO: HeaderName = HeaderName::from_static("x-pylon-orig-proto");

/// The caller's SPIFFE ID, as the inbound sidecar tells its application.
pub const X_PYLON_PEER_IDENTITY: HeaderName = HeaderName::from_static("x-pylon-peer-identity");

pub const ORIG_PROTO_HTTP1: HeaderValue = HeaderValue::from_static("HTTP/1.1");

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
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    if headers.contains_key(header::CONNECTION) {
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
    for name in HOP_BY_HOP {
        headers.remove(name);
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
