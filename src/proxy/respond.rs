//! Every way a request can fail, and the one place that turns a failure into a response.
//!
//! Bodies are short fixed strings: a client learns the class of failure (its status code), never
//! an upstream address, an OS error or a Rust type name. Details go to the log.
//!
//! A leaf every layer may use (it knows only `body` and `headers`): the request layer answers
//! its `ProxyError`s here, the upstream layer classifies hyper's errors here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::proxy::body::{full, RespBody};

/// Which side failed (pingora's `ErrorSource`): decides the status code, the log level, and
/// whether the failure counts against a revision (only `Upstream` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something we refuse, or went away.
    Client,
    /// The upstream could not be reached or misbehaved.
    Upstream,
    /// A bug or a resource problem in the gateway itself.
    Internal,
}

/// A request the proxy answers itself instead of with an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("request target longer than the limit")]
    UriTooLong,
    #[error("request headers larger than the limit")]
    HeadersTooLarge,
    #[error("request body larger than the limit")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    ClientBody(#[from] crate::proxy::body::ClientBody),
    #[error("WebSocket upgrade asked of a route that does not allow it")]
    UpgradeRefused,
    #[error("route group has no member taking traffic")]
    NoHealthyUpstream,
    #[error("upstream connect failed: {0}")]
    Connect(String),
    #[error("upstream request failed: {0}")]
    Upstream(String),
    #[error("upstream did not answer within the route timeout")]
    Timeout,
    #[error("upstream circuit breaker open")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("refused by a security policy ({})", .0.status)]
    Denied(Box<crate::guard::Denial>),
    #[error("client address refused by the Module's ip_allow/ip_deny")]
    AddressDenied,
}

impl ProxyError {
    pub fn error_source(&self) -> ErrorSource {
        use ProxyError::*;
        match self {
            NoRoute | UriTooLong | HeadersTooLarge | BodyTooLarge | BadRequest(_)
            | ClientBody(_) | UpgradeRefused | Denied(_) | AddressDenied => ErrorSource::Client,
            NoHealthyUpstream | Connect(_) | Upstream(_) | Timeout | Overloaded => {
                ErrorSource::Upstream
            }
            Internal(_) => ErrorSource::Internal,
        }
    }

    /// Whether this failure counts against the serving revision in its verification window: a
    /// failure on the upstream side that the gateway itself saw (connect error, reset, timeout,
    /// no healthy member). Never a client-side kind (anything [`ErrorSource::Client`]: malformed
    /// or aborted requests, limits, policy answers including an AuthService's relayed 5xx), so
    /// a new client-error kind is excluded by its side. An open circuit breaker is load the
    /// operator chose to shed, and the failures that opened it were counted already.
    pub fn counts_against_revision(&self) -> bool {
        self.error_source() == ErrorSource::Upstream && !matches!(self, ProxyError::Overloaded)
    }

    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            NoRoute => StatusCode::NOT_FOUND,
            // Envoy's answer (`upgrade_failed`), so Emissary users see what they know.
            UpgradeRefused | AddressDenied => StatusCode::FORBIDDEN,
            UriTooLong => StatusCode::URI_TOO_LONG,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BadRequest(_) | ClientBody(crate::proxy::body::ClientBody::Malformed(_)) => {
                StatusCode::BAD_REQUEST
            }
            // nginx's "client closed request": what the access log shows for an abort.
            ClientBody(crate::proxy::body::ClientBody::Aborted(_)) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            NoHealthyUpstream | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Connect(_) | Upstream(_) => StatusCode::BAD_GATEWAY,
            Timeout => StatusCode::GATEWAY_TIMEOUT,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Denied(d) => d.status,
        }
    }

    fn body(&self) -> &'static str {
        use ProxyError::*;
        match self {
            NoRoute => "no route\n",
            UriTooLong => "uri too long\n",
            HeadersTooLarge => "request headers too large\n",
            BodyTooLarge => "request body too large\n",
            BadRequest(_) | ClientBody(_) => "bad request\n",
            UpgradeRefused => "websocket upgrade not allowed on this route (allow_upgrade)\n",
            NoHealthyUpstream => "no healthy upstream\n",
            Connect(_) | Upstream(_) => "upstream unavailable\n",
            Timeout => "upstream timeout\n",
            Overloaded => "upstream overloaded\n",
            Internal(_) => "internal error\n",
            Denied(_) => "",
            // Envoy's RBAC filter answers with this body.
            AddressDenied => "RBAC: access denied",
        }
    }

    /// The response the client gets; logs the detail the client does not.
    pub fn into_response(self) -> Response<RespBody> {
        match self.error_source() {
            ErrorSource::Client => tracing::debug!(error = %self, "request refused"),
            ErrorSource::Upstream => tracing::warn!(error = %self, "upstream failure"),
            ErrorSource::Internal => tracing::error!(error = %self, "internal failure"),
        }
        if let ProxyError::Denied(d) = self {
            // The policy wrote the answer (an auth service's own denial, a 401, a 429).
            let mut resp = Response::new(full(d.body));
            *resp.status_mut() = d.status;
            *resp.headers_mut() = d.headers;
            return resp;
        }
        let mut resp = Response::new(full(Bytes::from_static(self.body().as_bytes())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self, ProxyError::Overloaded) {
            resp.headers_mut().insert(
                crate::proxy::headers::X_LEGATE_OVERLOADED.clone(),
                HeaderValue::from_static("circuit-breaker"),
            );
        }
        if matches!(
            self,
            ProxyError::BodyTooLarge | ProxyError::BadRequest(_) | ProxyError::ClientBody(_)
        ) {
            // The unread rest of the body makes the connection unusable for another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The answer to a gRPC request (`content-type: application/grpc*`): a trailers-only
    /// response, HTTP 200 with `grpc-status` and `grpc-message` in the head, so gRPC clients
    /// see UNAVAILABLE or DEADLINE_EXCEEDED instead of a bare HTTP error (as Envoy answers).
    pub fn into_grpc_response(self) -> Response<RespBody> {
        use ProxyError::*;
        let code = match &self {
            Timeout => "4",
            NoRoute => "12",
            UpgradeRefused | AddressDenied => "7",
            UriTooLong | HeadersTooLarge | BodyTooLarge | BadRequest(_) => "13",
            ClientBody(_) => "1",
            NoHealthyUpstream | Connect(_) | Upstream(_) | Overloaded => "14",
            Internal(_) => "13",
            // Policy refusals: UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED.
            Denied(d) => match d.status.as_u16() {
                401 => "16",
                403 => "7",
                429 => "8",
                _ => "2",
            },
        };
        // The fixed short bodies are plain ASCII: valid grpc-message values as they are.
        let message = HeaderValue::from_static(self.body().trim_end());
        let mut resp = self.into_response();
        *resp.body_mut() = full(Bytes::new());
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        h.insert("grpc-message", message);
        resp
    }
}

impl ProxyError {
    /// Classify a failure of an upstream exchange (HTTP/1.1 or HTTP/2).
    pub fn from_hyper(e: hyper::Error) -> ProxyError {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if let Some(c) = client_side(s) {
                return c;
            }
            src = s.source();
        }
        ProxyError::Upstream(chain(&e))
    }
}

/// The client's failure hidden in an upstream exchange's error: the request body it sent was
/// too large, broken or cut off.
fn client_side(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    use crate::proxy::body::ClientBody;
    if e.is::<crate::proxy::body::TooLarge>() {
        return Some(ProxyError::BodyTooLarge);
    }
    Some(ProxyError::ClientBody(
        match e.downcast_ref::<ClientBody>()? {
            ClientBody::Aborted(m) => ClientBody::Aborted(m.clone()),
            ClientBody::Malformed(m) => ClientBody::Malformed(m.clone()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_upstream_side_failures_count_against_a_revision() {
        assert!(ProxyError::Connect("refused".into()).counts_against_revision());
        assert!(ProxyError::Upstream("reset".into()).counts_against_revision());
        assert!(ProxyError::Timeout.counts_against_revision());
        assert!(ProxyError::NoHealthyUpstream.counts_against_revision());
        assert!(!ProxyError::Overloaded.counts_against_revision());
        assert!(!ProxyError::BadRequest("body").counts_against_revision());
        assert!(!ProxyError::BodyTooLarge.counts_against_revision());
        assert!(!ProxyError::NoRoute.counts_against_revision());
        assert!(!ProxyError::Internal("bug".into()).counts_against_revision());
        let relayed = crate::guard::Denial {
            status: StatusCode::BAD_GATEWAY,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        };
        assert!(!ProxyError::Denied(Box::new(relayed)).counts_against_revision());
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream TLS: {0}")]
    UpstreamTls(#[from] crate::tls::TlsError),
    #[error("TLS listener: {0}")]
    ServerTls(#[from] rustls::Error),
    /// A listener handed in has no local address (it was never bound, or its socket failed).
    #[error("listener has no local address: {0}")]
    LocalAddr(std::io::Error),
    /// A worker's thread, runtime or listener could not be set up (`--workers`).
    #[error("cannot start a worker: {0}")]
    Worker(std::io::Error),
}
