//! The edge-security settings of a forwarding route (AuthService, JWTPolicy, RateLimit),
//! compiled by `config::guard`: plain values only. What they need across requests and
//! revisions (JWKS key sets, token buckets, Redis connections) lives in the registry of
//! `crate::guard`, which the proxy owns and keys by these values.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;

/// How much of the request body the auth service is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncludeBody {
    pub max_bytes: usize,
    /// Send the first `max_bytes` of a larger body instead of answering 413.
    pub allow_partial: bool,
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

/// Where the keys are.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq, Hash)]
#[serde(default)]
pub struct JwksSource {
    pub file: Option<String>,
    pub url: Option<String>,
    pub refresh_seconds: Option<u64>,
}

/// An accepted signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }
}

/// A compiled JWTPolicy. Its key set lives in `guard`'s registry, keyed by this value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtPolicy {
    /// `namespace/name`, for logs.
    pub name: String,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Alg>,
    pub skew: u64,
    pub required: Vec<String>,
    pub forward: Vec<(String, HeaderName)>,
    pub source: JwksSource,
}

/// One limit of a RateLimit. Its buckets (local) or connections (Redis) live in `guard`'s
/// registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    /// `namespace/name/limit`, the key prefix.
    pub id: String,
    pub domain: String,
    pub group: String,
    pub requests: u64,
    /// Tokens per second.
    pub rate: f64,
    pub burst: u64,
    /// Whether allowed responses carry `RateLimit-*` headers.
    pub response_headers: bool,
    pub backend: LimitBackend,
}

/// Where a limit's buckets are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBackend {
    /// In this process; a revision that keeps the limit as it was keeps its buckets.
    Local,
    /// In Redis, shared by every replica.
    Redis {
        /// `redis://` or `rediss://` URL (AUTH and database from it).
        address: String,
        /// Longest wait for an answer.
        timeout: Duration,
        /// No answer in time lets the request through (`failure_mode: open`), else 503.
        fail_open: bool,
    },
}

/// One entry of a descriptor group on a Mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    RemoteAddress,
    Header {
        key: String,
        name: HeaderName,
        omit_if_not_present: bool,
    },
    Generic {
        key: String,
        value: String,
    },
    /// A claim of the validated JWT (Legate's extension).
    Claim {
        key: String,
        claim: String,
    },
}

/// A limit applied to a route, with the entries that make its key.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    pub limit: Arc<Limit>,
    pub entries: Vec<Entry>,
}

/// A compiled OIDCLogin: plain values only. Its discovery document, key set and session keys
/// live in `guard`'s registry, keyed by this value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OidcLogin {
    /// `namespace/name`, for logs.
    pub name: String,
    /// The provider's issuer URL, exactly as its ID tokens name it (no trailing `/` added).
    pub issuer: String,
    pub client_id: String,
    /// Directory under `--secrets-dir` holding `client-secret` and `session-keys`.
    pub secret: String,
    /// Scopes asked for; always holds `openid`.
    pub scopes: Vec<String>,
    /// `aud` values accepted on bearer tokens (default: the client id).
    pub audiences: Vec<String>,
    /// Path prefix of the callback and logout endpoints, e.g. `/.legate`.
    pub prefix: String,
    /// Name of the session cookie; the login cookie is this name with `_login` appended.
    pub cookie: String,
    pub forward: Vec<(String, HeaderName)>,
    /// A session this close to its end (seconds) is renewed with its refresh token.
    pub refresh_before: u64,
    /// Where the provider sends the browser after RP-initiated logout.
    pub post_logout_redirect: Option<String>,
    /// Leeway for `exp` and `nbf` of tokens (seconds).
    pub skew: u64,
}
