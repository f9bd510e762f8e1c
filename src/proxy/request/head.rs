//! The first phase of a request: check its head and normalize it once. Everything after this
//! (hooks prefix, routing, policies, the AuthService, forwarding) sees the one authority and
//! the one path chosen here.
//!
//! Authority (RFC 9112 §3.2, RFC 9113 §8.3.1):
//! - HTTP/1.x needs exactly one valid `Host`; in absolute form (`GET http://a/x`) the target's
//!   authority replaces it. HTTP/1.0 without `Host` is refused too (Legate has no default host
//!   to give it).
//! - HTTP/2 takes `:authority`; a `host` header that differs from it makes the request
//!   malformed.
//! - userinfo (`user@host`) is refused, never silently stripped.
//! - a valid name is letters, digits, `-`, `_`, `.` (a trailing dot too), or a bracketed IPv6
//!   literal, with an optional port.
//!
//! Header names with `_` are refused (Envoy's edge guidance,
//! `headers_with_underscores_action: REJECT_REQUEST`): upstreams that read `x_user_id` as
//! `x-user-id` would see a header the policies never removed.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};

use crate::proxy::respond::ProxyError;

/// The request's authority (`host[:port]`, as the client wrote it), checked.
pub(crate) fn authority<B>(req: &Request<B>) -> Result<HeaderValue, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("duplicate host"));
    }
    let target = req.uri().authority().map(|a| a.as_str());
    let chosen = match req.version() {
        Version::HTTP_2 | Version::HTTP_3 => match (target, host) {
            (Some(t), Some(h)) if !h.as_bytes().eq_ignore_ascii_case(t.as_bytes()) => {
                return Err(ProxyError::BadRequest("host differs from :authority"));
            }
            (Some(t), _) => t.as_bytes(),
            (None, Some(h)) => h.as_bytes(),
            (None, None) => return Err(ProxyError::BadRequest("missing :authority")),
        },
        _ => {
            // RFC 9112 §3.2: a request without Host is a 400, even in absolute form; with an
            // absolute target, its authority replaces the Host header.
            let Some(h) = host else {
                return Err(ProxyError::BadRequest("missing host"));
            };
            target.map_or(h.as_bytes(), str::as_bytes)
        }
    };
    if !valid_authority(chosen) {
        return Err(ProxyError::BadRequest("invalid host"));
    }
    HeaderValue::from_bytes(chosen).map_err(|_| ProxyError::BadRequest("invalid host"))
}

/// `name[:port]` or `[v6][:port]`; no userinfo, no empty name.
pub fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|&c| c == b']') else {
            return false;
        };
        let v6 = &a[1..end];
        let ok = !v6.is_empty()
            && v6
                .iter()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
            && std::str::from_utf8(v6).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
        if !ok {
            return false;
        }
        match &a[end + 1..] {
            [] => (&a[..0], None),
            [b':', p @ ..] => (&a[..0], Some(p)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&c| c == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
            return false;
        }
    }
    if a.first() == Some(&b'[') {
        return true;
    }
    let name = host.strip_suffix(b".").unwrap_or(host);
    !name.is_empty()
        && !name.starts_with(b".")
        && !name.windows(2).any(|w| w == b"..")
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Refuse header names with an underscore.
pub(crate) fn check_headers(h: &HeaderMap) -> Result<(), ProxyError> {
    if h.keys().any(|n| n.as_str().contains('_')) {
        return Err(ProxyError::BadRequest("header name with an underscore"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::valid_authority;

    #[test]
    fn authorities() {
        for ok in [
            "example.com",
            "example.com:8080",
            "my_host.internal",
            "example.com.",
            "[::1]",
            "[::1]:8443",
            "10.0.0.1:80",
            "localhost",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "u@example.com",
            "example.com:",
            "example.com:123456",
            "example.com:x",
            "[::1",
            "[zz]",
            "a b",
            "a..b",
            ".a",
            "a/b",
            "[::1]x",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }
}
