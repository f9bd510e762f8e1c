//! CORS (Emissary's `cors` on a Mapping, Envoy's CORS filter semantics): a preflight from an
//! allowed origin is answered by the gateway (200, never forwarded); an actual request from an
//! allowed origin gets `Access-Control-Allow-Origin` (the request's origin) and the credential
//! and exposed-header headers on its response. A disallowed origin gets no CORS headers and its
//! preflight goes to the upstream like any request.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::proxy::body::{full, RespBody};
use crate::routes::Cors;

/// A route's CORS policy with its header values built once.
pub(crate) struct Policy {
    cors: Arc<Cors>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

fn joined(list: &[String]) -> Option<HeaderValue> {
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(",")).ok()
}

impl Policy {
    pub fn new(cors: Arc<Cors>) -> Policy {
        Policy {
            methods: joined(&cors.methods),
            headers: joined(&cors.headers),
            expose: joined(&cors.exposed_headers),
            max_age: cors.max_age.map(HeaderValue::from),
            cors,
        }
    }

    /// The allowed `Origin` of a request, if it has one.
    pub fn origin(&self, h: &HeaderMap) -> Option<HeaderValue> {
        let o = h.get(header::ORIGIN)?;
        self.cors.allows(o.to_str().ok()?).then(|| o.clone())
    }

    /// The gateway's answer to a preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) from an allowed origin.
    pub fn preflight(&self, method: &Method, h: &HeaderMap) -> Option<Response<RespBody>> {
        if method != Method::OPTIONS || !h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
            return None;
        }
        let origin = self.origin(h)?;
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::OK;
        let out = r.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.cors.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let pairs = [
            (header::ACCESS_CONTROL_ALLOW_METHODS, &self.methods),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, &self.headers),
            (header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ];
        for (name, v) in pairs {
            if let Some(v) = v {
                out.insert(name, v.clone());
            }
        }
        Some(r)
    }

    /// Headers on the response to an actual request from `origin` (already allowed).
    pub fn decorate(&self, origin: HeaderValue, out: &mut HeaderMap) {
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.cors.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}
