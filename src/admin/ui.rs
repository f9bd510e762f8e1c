//! The web dashboard's static files, embedded in the binary and served under `/ui/`.
//!
//! Owns: the file table, content types, cache validators and the security headers. Must not
//! compute anything the JSON API does not already answer: the page is plain HTML, CSS and
//! JavaScript that polls the admin API, with no build step and nothing loaded from elsewhere.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

/// Path, content type, body.
const FILES: [(&str, &str, &str); 4] = [
    (
        "/ui/",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "/ui/app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "/ui/app.css",
        "text/css; charset=utf-8",
        include_str!("ui/app.css"),
    ),
    (
        "/ui/favicon.svg",
        "image/svg+xml",
        include_str!("ui/favicon.svg"),
    ),
];

/// Only this origin's files and API; no inline script or style, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The answer to `GET path` when it is a dashboard path; `None` otherwise.
pub(super) fn serve<B>(path: &str, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    if path == "/" || path == "/ui" {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::FOUND;
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
        return Some(r);
    }
    let (_, ctype, body) = FILES.iter().find(|(p, _, _)| *p == path)?;
    // The files change only with the binary: a content hash is the validator, and every load
    // revalidates (cheap: a 304 without a body), so an upgrade never serves a stale script.
    let etag = format!("\"{:016x}\"", fnv1a(body.as_bytes()));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut r = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Full::new(Bytes::from_static(body.as_bytes())))
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    Some(r)
}

/// FNV-1a, 64 bits: a stable content hash for the ETag (not a security boundary).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}
