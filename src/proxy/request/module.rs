//! The per-request part of Emissary's `Module` settings, read from the live graph's
//! [`Settings`]: client address filters, escaped slashes, the Module's header and body limits,
//! the reserved `/ambassador/v0/` prefix, and the `Server` header.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::proxy::body::{full, RespBody};
use crate::proxy::headers::X_FORWARDED_FOR;
use crate::proxy::respond::ProxyError;
use crate::routes::settings::{has_escaped_slash, DIAG_PREFIX};
use crate::routes::Settings;

/// Refuse what the Module says to refuse, before routing.
pub(crate) fn admit(
    s: &Settings,
    raw_path: &str,
    headers: &HeaderMap,
    peer: IpAddr,
    trusted_hops: usize,
) -> Result<(), ProxyError> {
    if let Some(f) = &s.ip_filter {
        if !f.admits(peer, client_address(headers, peer, trusted_hops)) {
            return Err(ProxyError::AddressDenied);
        }
    }
    if s.reject_escaped_slashes && has_escaped_slash(raw_path) {
        return Err(ProxyError::BadRequest("escaped slash in path"));
    }
    if let Some(max) = s.max_request_header_bytes {
        let bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        if bytes > max {
            return Err(ProxyError::HeadersTooLarge);
        }
    }
    if let (Some(max), Some(len)) = (
        s.max_request_body_bytes,
        headers.get(header::CONTENT_LENGTH),
    ) {
        if len
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l > max)
        {
            return Err(ProxyError::BodyTooLarge);
        }
    }
    Ok(())
}

/// Envoy's "remote" address: with `trusted_hops` hops in front, the entry that many places
/// from the right of the client's `X-Forwarded-For`; otherwise the connection's address.
fn client_address(headers: &HeaderMap, peer: IpAddr, trusted_hops: usize) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let i = entries.len().saturating_sub(trusted_hops);
    entries.get(i).and_then(|e| e.parse().ok()).unwrap_or(peer)
}

/// With `diagnostics` enabled, `/ambassador/v0/` belongs to the gateway: the two probes answer
/// as Emissary's do, and the rest (Emissary's diagnostics UI) is not there.
pub(crate) fn reserved(s: &Settings, path: &str) -> Option<Result<Response<RespBody>, ProxyError>> {
    if !s.diagnostics || !path.starts_with(DIAG_PREFIX) {
        return None;
    }
    Some(match &path[DIAG_PREFIX.len()..] {
        "check_alive" => Ok(text(StatusCode::OK, "ambassador liveness check OK\n")),
        "check_ready" => Ok(text(StatusCode::OK, "ambassador readiness check OK\n")),
        _ => Err(ProxyError::NoRoute),
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `server_name`: Envoy overwrites the `Server` header of every response with it.
pub(crate) fn decorate(s: &Settings, h: &mut HeaderMap) {
    if let Some(name) = &s.server_name {
        if let Ok(v) = HeaderValue::from_str(name) {
            h.insert(header::SERVER, v);
        }
    }
}
