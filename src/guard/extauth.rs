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

use super::Denial;
use crate::routes::guard::{ExtAuth, IncludeBody};

/// Largest auth-service answer body relayed to a client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// Longest wait for the next piece of a body read for `include_body`: a client that stalls is
/// answered 408 instead of holding a buffer (Envoy's stream idle timeout plays this part).
pub(crate) const BODY_STALL: Duration = Duration::from_secs(10);

/// The start of a request body, read to send it to the auth service; the proxy sends it
/// upstream ahead of what the client has not sent yet.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The whole body was read.
    pub complete: bool,
}

impl ExtAuth {
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
