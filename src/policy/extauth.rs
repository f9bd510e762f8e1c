//! External authorization over HTTP (Emissary's `AuthService` with `proto: http`).
//!
//! For each request the gateway sends the auth service the method, `path_prefix` + path and
//! query, and a fixed set of headers plus `allowed_request_headers`, with an empty body, or with
//! the request body when `include_body` is set: the body is read ahead up to `max_bytes` (a
//! larger one is cut there with `allow_partial`, refused with 413 without), and the bytes read
//! are handed to the proxy as a [`ReadAhead`] to be sent upstream before the rest. A 2xx
//! answer lets the request through with `allowed_authorization_headers` (and `Authorization`)
//! copied onto it; any other answer goes back to the client as the auth service wrote it; no
//! answer (refused, reset, timed out) means `status_on_error`, or the request passes when
//! `failure_mode_allow` is set.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::Denial;
use crate::routes::{Scheme, Upstream};

/// Headers always sent to the auth service (Emissary's fixed list).
const ALWAYS_SENT: [&str; 9] = [
    "authorization",
    "cookie",
    "from",
    "proxy-authorization",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

/// Largest auth-service answer body relayed to a client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Longest wait for the next piece of a body read for `include_body`: a client that stalls is
/// answered 408 instead of holding a buffer (Envoy's stream idle timeout plays this part).
pub(crate) const BODY_STALL: Duration = Duration::from_secs(10);

/// The AuthService spec fields Legate reads (the schema admits the rest).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct AuthServiceSpec {
    pub auth_service: String,
    pub path_prefix: Option<String>,
    pub proto: Option<String>,
    pub timeout_ms: Option<u64>,
    pub allowed_request_headers: Vec<String>,
    pub allowed_authorization_headers: Vec<String>,
    pub status_on_error: Option<StatusOnError>,
    pub failure_mode_allow: bool,
    pub include_body: Option<IncludeBodySpec>,
    pub add_auth_headers: std::collections::BTreeMap<String, String>,
    pub allow_request_body: bool,
}

/// `include_body: {max_bytes, allow_partial}`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct IncludeBodySpec {
    pub max_bytes: u64,
    #[serde(default)]
    pub allow_partial: bool,
}

/// How much of the request body the auth service is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncludeBody {
    pub max_bytes: usize,
    /// Send the first `max_bytes` of a larger body instead of answering 413.
    pub allow_partial: bool,
}

/// The start of a request body, read to send it to the auth service; the proxy sends it
/// upstream ahead of what the client has not sent yet.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The whole body was read.
    pub complete: bool,
}

/// `status_on_error: {code}`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StatusOnError {
    pub code: Option<u16>,
}

/// A compiled AuthService: every header name and the target parsed once.
#[derive(Debug)]
pub struct ExtAuth {
    /// `host:port` of the auth service.
    pub authority: String,
    pub path_prefix: String,
    /// `None`: `timeout_ms: 0`, no limit (Envoy's reading of a zero timeout).
    pub timeout: Option<Duration>,
    /// `add_auth_headers`: set on every auth request.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    pub request_headers: Vec<HeaderName>,
    pub authorization_headers: Vec<HeaderName>,
    pub status_on_error: StatusCode,
    pub failure_mode_allow: bool,
    pub include_body: Option<IncludeBody>,
}

/// A compile problem: JSON pointer, message, help.
type CompileError = (&'static str, String, String);

impl ExtAuth {
    pub fn compile(spec: &AuthServiceSpec) -> Result<ExtAuth, CompileError> {
        if spec.proto.as_deref() == Some("grpc") {
            return Err((
                "/spec/proto",
                "`proto: grpc` is not supported by Legate".into(),
                "run the auth service's HTTP variant and set `proto: http`".into(),
            ));
        }
        let up: Upstream = spec.auth_service.parse().map_err(|e| {
            (
                "/spec/auth_service",
                format!(
                    "auth_service `{}` is not a usable address: {e}",
                    spec.auth_service
                ),
                "write `host:port` or `http://host:port`".to_string(),
            )
        })?;
        if up.scheme != Scheme::Http {
            return Err((
                "/spec/auth_service",
                format!("auth_service `{}` must be plain HTTP", spec.auth_service),
                "write `host:port` or `http://host:port`; TLS to the auth service is not supported"
                    .into(),
            ));
        }
        let prefix = spec.path_prefix.clone().unwrap_or_default();
        if !prefix.is_empty() && !prefix.starts_with('/') {
            return Err((
                "/spec/path_prefix",
                format!("path_prefix `{prefix}` does not start with `/`"),
                "write it as `/extauth`".into(),
            ));
        }
        let names =
            |pointer: &'static str, list: &[String]| -> Result<Vec<HeaderName>, CompileError> {
                list.iter()
                    .map(|n| {
                        HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).map_err(|_| {
                            (
                                pointer,
                                format!("`{n}` is not a valid header name"),
                                "use letters, digits and `-`".to_string(),
                            )
                        })
                    })
                    .collect()
            };
        let mut request_headers = names(
            "/spec/allowed_request_headers",
            &spec.allowed_request_headers,
        )?;
        for n in ALWAYS_SENT {
            let n = HeaderName::from_static(n);
            if !request_headers.contains(&n) {
                request_headers.push(n);
            }
        }
        let mut authorization_headers = names(
            "/spec/allowed_authorization_headers",
            &spec.allowed_authorization_headers,
        )?;
        if !authorization_headers.contains(&header::AUTHORIZATION) {
            authorization_headers.push(header::AUTHORIZATION);
        }
        let code = spec
            .status_on_error
            .as_ref()
            .and_then(|s| s.code)
            .unwrap_or(403);
        let status_on_error = StatusCode::from_u16(code).map_err(|_| {
            (
                "/spec/status_on_error/code",
                format!("{code} is not an HTTP status"),
                "use a status between 100 and 599".to_string(),
            )
        })?;
        let mut add_headers = Vec::new();
        for (name, value) in &spec.add_auth_headers {
            let pair = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .zip(HeaderValue::from_str(value).ok());
            let Some(pair) = pair else {
                return Err((
                    "/spec/add_auth_headers",
                    format!("`{name}: {value}` is not a valid header"),
                    "use a header name and a value without control characters".to_string(),
                ));
            };
            add_headers.push(pair);
        }
        Ok(ExtAuth {
            authority: up.authority(),
            path_prefix: prefix.trim_end_matches('/').to_string(),
            timeout: match spec.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            add_headers,
            request_headers,
            authorization_headers,
            status_on_error,
            failure_mode_allow: spec.failure_mode_allow,
            include_body: spec
                .include_body
                .as_ref()
                .map(|b| IncludeBody {
                    max_bytes: usize::try_from(b.max_bytes).unwrap_or(usize::MAX),
                    allow_partial: b.allow_partial,
                })
                // Emissary's older switch, used only without `include_body` (v3httpfilter.py).
                .or(spec.allow_request_body.then_some(IncludeBody {
                    max_bytes: 4096,
                    allow_partial: true,
                }))
                .filter(|b| b.max_bytes > 0),
        })
    }

    /// Read the start of `body` for the auth service: what was read (to go upstream first),
    /// the bytes to send the auth service, and whether they are only part of the body.
    pub async fn read_body(
        &self,
        inc: IncludeBody,
        body: &mut hyper::body::Incoming,
    ) -> Result<(ReadAhead, Bytes, bool), Box<Denial>> {
        use hyper::body::Body;
        let too_large = || {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Box::new(Denial {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                headers,
                body: Bytes::from_static(b"request body too large\n"),
            })
        };
        let max = inc.max_bytes;
        if !inc.allow_partial && body.size_hint().lower() > max as u64 {
            return Err(too_large());
        }
        let mut buf = BytesMut::new();
        let mut trailers = None;
        let mut complete = false;
        // At most one frame past the cap is held: enough to know the body is larger.
        while buf.len() <= max {
            let Ok(next) = tokio::time::timeout(BODY_STALL, body.frame()).await else {
                return Err(Box::new(Denial {
                    status: StatusCode::REQUEST_TIMEOUT,
                    headers: HeaderMap::new(),
                    body: Bytes::from_static(b"request body stalled\n"),
                }));
            };
            match next {
                None => {
                    complete = true;
                    break;
                }
                Some(Err(_)) => {
                    return Err(Box::new(Denial {
                        status: StatusCode::BAD_REQUEST,
                        headers: HeaderMap::new(),
                        body: Bytes::from_static(b"request body could not be read\n"),
                    }))
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => buf.extend_from_slice(&d),
                    Err(f) => {
                        trailers = f.into_trailers().ok();
                        complete = true;
                        break;
                    }
                },
            }
        }
        let data = buf.freeze();
        let partial = data.len() > max;
        if partial && !inc.allow_partial {
            return Err(too_large());
        }
        let sent = data.slice(..data.len().min(max));
        Ok((
            ReadAhead {
                data,
                trailers,
                complete,
            },
            sent,
            partial,
        ))
    }

    /// Ask the auth service about a request, with `body` (the bytes, and whether they are only
    /// the start of the request body) when `include_body` is set. `Ok` carries the headers to
    /// copy onto the request.
    pub async fn check(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        peer: SocketAddr,
        body: Option<(Bytes, bool)>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Box<Denial>> {
        let uri = format!(
            "http://{}{}{}",
            self.authority, self.path_prefix, path_and_query
        );
        let Ok(uri) = uri.parse::<Uri>() else {
            return Err(self.on_error("auth request URI does not parse"));
        };
        let (body, partial) = match body {
            Some((b, p)) => (b, Some(p)),
            None => (Bytes::new(), None),
        };
        let len = body.len();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        for name in &self.request_headers {
            for v in headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        if let Some(host) = headers.get(header::HOST) {
            h.insert(header::HOST, host.clone());
        }
        if !h.contains_key("x-forwarded-for") {
            if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
                h.insert(HeaderName::from_static("x-forwarded-for"), v);
            }
        }
        for (name, value) in &self.add_headers {
            h.insert(name.clone(), value.clone());
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Some(p) = partial {
            // What Envoy tells an auth service about the body it was sent.
            h.insert(
                HeaderName::from_static("x-envoy-auth-partial-body"),
                HeaderValue::from_static(if p { "true" } else { "false" }),
            );
            if let Some(ct) = headers.get(header::CONTENT_TYPE) {
                h.insert(header::CONTENT_TYPE, ct.clone());
            }
        }

        let exchange = async {
            let resp = client().request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_DENIAL_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        let answer = match self.timeout {
            Some(t) => tokio::time::timeout(t, exchange).await,
            None => Ok(exchange.await),
        };
        let (parts, body) = match answer {
            Err(_) => return self.unreachable("auth service timed out"),
            Ok(Err(e)) => return self.unreachable(&e),
            Ok(Ok(r)) => r,
        };
        if parts.status.is_success() {
            let mut copy = Vec::new();
            for name in &self.authorization_headers {
                for v in parts.headers.get_all(name) {
                    copy.push((name.clone(), v.clone()));
                }
            }
            return Ok(copy);
        }
        let mut relay = parts.headers;
        for hop in [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
            header::UPGRADE,
            HeaderName::from_static("keep-alive"),
        ] {
            relay.remove(hop);
        }
        Err(Box::new(Denial {
            status: parts.status,
            headers: relay,
            body,
        }))
    }

    fn unreachable(&self, why: &str) -> Result<Vec<(HeaderName, HeaderValue)>, Box<Denial>> {
        if self.failure_mode_allow {
            tracing::warn!(auth_service = %self.authority, error = why, "auth service unavailable; failure_mode_allow lets the request through");
            return Ok(Vec::new());
        }
        Err(self.on_error(why))
    }

    fn on_error(&self, why: &str) -> Box<Denial> {
        tracing::warn!(auth_service = %self.authority, error = why, "auth service unavailable; refusing");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Box::new(Denial {
            status: self.status_on_error,
            headers,
            body: Bytes::from_static(b"authorization unavailable\n"),
        })
    }
}

/// One client for every auth call: keeps connections to the auth service alive.
fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        Client::builder(TokioExecutor::new()).build(conn)
    })
}
