//! The values a compiled graph holds. Every field is already validated: a `Route` cannot carry
//! a bad regex, hostname glob or upstream address.

use std::fmt;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;

use super::HostPattern;

/// Index of a route in `Graph::routes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RouteId(pub usize);

/// A compiled Host resource.
#[derive(Debug, Clone)]
pub struct HostRoute {
    pub name: String,
    pub namespace: String,
    pub hostname: HostPattern,
    /// `namespace/name` of the TLS secret, when the Host terminates TLS.
    pub tls_secret: Option<SecretRef>,
    /// Its own TLS settings (a `tls` block or a TLSContext); `None`: the listener's.
    pub tls: Option<super::tls::TlsPolicy>,
    /// Its `acmeProvider`, when ACME is on (authority other than `none`).
    pub acme: Option<AcmeSpec>,
    /// What a cleartext request gets (Emissary's default: `Redirect`).
    pub insecure: InsecureAction,
    /// An extra cleartext port the insecure action applies to (`-1`: none).
    pub insecure_additional_port: Option<u16>,
    /// Groups associated with this Host, in match order.
    pub groups: Vec<usize>,
    pub source: String,
}

/// Where a Host's certificate is ordered by ACME ([`crate::tls::acme`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct AcmeSpec {
    /// The ACME directory URL.
    pub authority: String,
    pub email: Option<String>,
    /// The Secret holding the account key (`<name>/tls.key`).
    pub account_secret: String,
}

/// A reference to a Kubernetes-style TLS secret (`<secrets-dir>/<name>/tls.{crt,key}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// What a Host does with cleartext requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InsecureAction {
    Redirect,
    Reject,
    Route,
}

/// A canary group: Mappings with the same match. One position in the match order.
#[derive(Debug, Clone)]
pub struct Group {
    /// Members that take traffic, with cumulative weights ending at 100 (or 0 for none).
    pub members: Vec<(RouteId, u32)>,
    /// The shadow member, if any, and the percentage of requests copied to it.
    pub shadow: Option<(RouteId, u32)>,
    /// The match every member shares.
    pub matcher: RouteMatch,
    pub precedence: i64,
    /// Served by the default Host (`*`, present only when no Host is defined): the group has a
    /// hostname, a host regex or a redirect target to attach by, as Emissary requires.
    pub serves_without_host: bool,
}

impl Group {
    /// Pick the member for a uniform random `roll` in `0..100`.
    pub fn pick(&self, roll: u32) -> Option<RouteId> {
        self.members
            .iter()
            .find(|(_, cum)| roll < *cum)
            .or(self.members.last())
            .map(|(id, _)| *id)
    }

    /// The configured share of each member in percent.
    pub fn shares(&self) -> Vec<(RouteId, u32)> {
        let mut prev = 0;
        self.members
            .iter()
            .map(|(id, cum)| {
                let share = cum - prev;
                prev = *cum;
                (*id, share)
            })
            .collect()
    }
}

/// A compiled Mapping.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: RouteId,
    pub name: String,
    pub namespace: String,
    /// `file:line` of the Mapping.
    pub source: String,
    /// Name for metrics: `stats_name` or the Mapping name.
    pub stats_name: String,
    pub matcher: RouteMatch,
    pub precedence: i64,
    pub action: Action,
    /// Index of the group this route belongs to.
    pub group: usize,
}

/// Everything a request must satisfy.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub host: HostMatch,
    pub method: Option<MethodMatch>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
}

impl RouteMatch {
    /// The conditions beyond the path, checked on the candidates the index returns.
    pub fn matches_rest(&self, req: &super::RequestHead<'_>) -> bool {
        if !self.host.matches(req.host) {
            return false;
        }
        if let Some(m) = &self.method {
            if !m.matches(req.method) {
                return false;
            }
        }
        if !self.headers.iter().all(|h| header_ok(h, req)) {
            return false;
        }
        if !self.query.is_empty() {
            let q = req.query.unwrap_or("");
            for m in &self.query {
                if !query_has(q, &m.name, &m.test) {
                    return false;
                }
            }
        }
        true
    }
}

/// Whether the request satisfies one header condition.
pub(crate) fn header_ok(h: &ValueMatch, req: &super::RequestHead<'_>) -> bool {
    if h.name == AUTHORITY {
        // Not in the header map: the authority routing uses (Envoy's `:authority`).
        return h.test.matches(req.host) && !req.host.is_empty();
    }
    req.headers
        .get_all(h.name.as_str())
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| h.test.matches(v)))
}

pub(crate) fn query_has(query: &str, name: &str, test: &ValueTest) -> bool {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name && test.matches(v) {
            return true;
        }
    }
    false
}

/// The pseudo-header a Mapping's `headers`/`regex_headers` may test, as in Envoy.
pub const AUTHORITY: &str = ":authority";

/// How the path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// String prefix (Emissary's `prefix`; not segment-aware, as in Envoy).
    Prefix(String),
    /// The whole path equals this (`prefix_exact: true`).
    Exact(String),
    /// The regex must match the whole path (`prefix_regex: true`, Envoy's safe_regex).
    Regex(Regex),
}

impl PathMatch {
    pub fn as_str(&self) -> &str {
        match self {
            PathMatch::Prefix(s) | PathMatch::Exact(s) => s,
            PathMatch::Regex(r) => r.as_str(),
        }
    }
}

/// How the authority is matched at the route level.
#[derive(Debug, Clone)]
pub enum HostMatch {
    Any,
    Glob(HostPattern),
    /// `host` + `host_regex: true`: anchored regex over the host name.
    Regex(Regex),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Glob(p) => p.matches(host),
            HostMatch::Regex(r) => r.is_match(host),
        }
    }
}

#[derive(Debug, Clone)]
pub enum MethodMatch {
    Exact(String),
    Regex(Regex),
}

impl MethodMatch {
    pub fn matches(&self, method: &str) -> bool {
        match self {
            MethodMatch::Exact(m) => m == method,
            MethodMatch::Regex(r) => r.is_match(method),
        }
    }
}

/// A header or query-parameter condition.
#[derive(Debug, Clone)]
pub struct ValueMatch {
    /// Lowercase for headers; as written for query parameters.
    pub name: String,
    pub test: ValueTest,
}

#[derive(Debug, Clone)]
pub enum ValueTest {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
    Present,
}

impl ValueTest {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueTest::Exact(e) => e == v,
            ValueTest::Regex(r) => r.is_match(v),
            ValueTest::Present => true,
        }
    }
}

/// What a matched route does.
#[derive(Debug, Clone)]
pub enum Action {
    Forward(Box<Forward>),
    Redirect(Redirect),
}

/// Proxy to an upstream.
#[derive(Debug, Clone)]
pub struct Forward {
    pub upstream: Upstream,
    pub rewrite: Rewrite,
    pub host_rewrite: Option<String>,
    pub auto_host_rewrite: bool,
    pub add_request_headers: Vec<AddHeader>,
    pub remove_request_headers: Vec<String>,
    pub add_response_headers: Vec<AddHeader>,
    pub remove_response_headers: Vec<String>,
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// `cluster_idle_timeout_ms`: how long an upstream connection may sit idle in the pool
    /// (else `idle_timeout`, else 60 s).
    pub cluster_idle_timeout: Option<Duration>,
    /// Upgrade protocols allowed (lowercase), e.g. `websocket`.
    pub allow_upgrade: Vec<String>,
    /// Speak HTTP/2 to the upstream (gRPC).
    pub http2: bool,
    pub retry: Option<super::RetryPolicy>,
    pub breaker: super::BreakerLimits,
    pub cors: Option<std::sync::Arc<super::Cors>>,
    pub load_balancer: Option<super::LoadBalancer>,
    /// Passive ejection of failing addresses.
    pub outlier: Option<super::OutlierDetection>,
    /// Active health checks of every address.
    pub health_checks: Vec<super::HealthCheck>,
    /// The AuthService to ask first, unless the Mapping has `bypass_auth`.
    pub ext_auth: Option<std::sync::Arc<super::guard::ExtAuth>>,
    /// The JWTPolicy whose token the request must carry.
    pub jwt: Option<std::sync::Arc<super::guard::JwtPolicy>>,
    /// The OIDCLogin a browser logs in with (bearer tokens of its provider also pass).
    pub oidc: Option<std::sync::Arc<super::guard::OidcLogin>>,
    /// The RateLimit limits counting this route's requests.
    pub rate_limits: Vec<super::guard::RouteLimit>,
    /// TLS origination settings from the TLSContext named by `tls: NAME`.
    pub origin_tls: Option<OriginTls>,
    /// Serve paths holding `%2F`/`%5C` even when the graph refuses them (GitLab's
    /// `group%2Fname`, npm's `@scope%2fpkg`).
    pub allow_escaped_slashes: bool,
}

/// What a Mapping's `tls: NAME` takes from the TLSContext when connecting upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct OriginTls {
    pub context: String,
    /// Client certificate and key (`tls.crt`/`tls.key`) presented to the upstream.
    pub client_cert: Option<SecretRef>,
    /// CA (`ca.crt`, else `tls.crt`) the upstream's certificate must chain to, instead of the
    /// default roots.
    pub ca: Option<SecretRef>,
    /// Server name sent and verified, instead of the service's host.
    pub sni: Option<String>,
}

/// A header to add. `append: false` replaces existing values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddHeader {
    pub name: String,
    pub value: String,
    pub append: bool,
}

/// How the path is rewritten before forwarding.
#[derive(Debug, Clone)]
pub enum Rewrite {
    /// Forward the path unchanged (`rewrite: ""`).
    Keep,
    /// Replace the matched prefix (Envoy's prefix_rewrite). For a regex or exact match the
    /// whole path is the matched part.
    Prefix(String),
    /// `regex_rewrite`: replace every match of `pattern` with `substitution` (`$1` syntax).
    Regex {
        pattern: Regex,
        substitution: String,
    },
}

/// Answer with a redirect instead of proxying.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// New host (authority), when `host_redirect` is set.
    pub host: Option<String>,
    pub path: RedirectPath,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub enum RedirectPath {
    Keep,
    /// `path_redirect`: replace the whole path.
    Replace(String),
    /// `prefix_redirect`: replace the matched prefix.
    Prefix(String),
    Regex {
        pattern: Regex,
        substitution: String,
    },
}

/// The scheme spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
    /// Cleartext HTTP/2 by prior knowledge (`h2c://`).
    H2c,
}

/// A validated upstream address: `[scheme://]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    /// DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl Upstream {
    /// `host:port` with IPv6 bracketed, for `Host` headers and connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::H2c => "h2c",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

/// Why an upstream address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpstreamError(pub String);

impl std::str::FromStr for Upstream {
    type Err = UpstreamError;

    /// Emissary's `service` forms: `name`, `name:port`, `name.namespace:port`,
    /// `http://name[:port]`, `https://name[:port]`, IP literals (`[::1]:80` for IPv6).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = s.strip_prefix("h2c://") {
            (Scheme::H2c, r)
        } else if let Some((sch, _)) = s.split_once("://") {
            return Err(UpstreamError(format!(
                "unsupported scheme `{sch}://`; use http://, https://, h2c:// or none"
            )));
        } else {
            (Scheme::Http, s)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(UpstreamError("the service has no host".into()));
        }
        if rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(UpstreamError(format!(
                "`{s}` is not `[scheme://]host[:port]`: a service carries no path, user or spaces"
            )));
        }
        let default_port = match scheme {
            Scheme::Http | Scheme::H2c => 80,
            Scheme::Https => 443,
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UpstreamError(format!("`{s}`: unclosed `[` in IPv6 address")))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p, s)?,
                None if after.is_empty() => default_port,
                None => return Err(UpstreamError(format!("`{s}`: junk after `]`"))),
            };
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| UpstreamError(format!("`{h}` is not an IPv6 address")))?;
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p, s)?),
                None => (rest.to_string(), default_port),
            }
        };
        if !host.contains(':') && host.parse::<std::net::Ipv4Addr>().is_err() {
            validate_dns_name(&host).map_err(|e| UpstreamError(format!("`{host}`: {e}")))?;
        }
        Ok(Upstream {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

fn parse_port(p: &str, whole: &str) -> Result<u16, UpstreamError> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(UpstreamError(format!(
            "`{whole}`: port `{p}` is not a number from 1 to 65535"
        ))),
    }
}

/// Checks RFC 1123 host name syntax (labels of letters, digits and hyphens, 253 chars max).
pub fn validate_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label has 1 to 63 characters".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot start or end with `-`".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, `-` and `.` are allowed".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        let u: Upstream = "quote".parse().unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Http, "quote", 80)
        );
        let u: Upstream = "quote.default:8080".parse().unwrap();
        assert_eq!(u.authority(), "quote.default:8080");
        let u: Upstream = "https://shop.internal".parse().unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Https, 443));
        let u: Upstream = "[::1]:9000".parse().unwrap();
        assert_eq!(u.authority(), "[::1]:9000");
        let u: Upstream = "h2c://grpc.apps:50051".parse().unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::H2c, 50051));
        let u: Upstream = "127.0.0.1:9001".parse().unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:9001");
    }

    #[test]
    fn upstream_rejects_bad_forms() {
        for bad in [
            "",
            "ftp://x",
            "x:0",
            "x:99999",
            "x:port",
            "a b",
            "x/path",
            "-x",
            "[::1",
            "user@host",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn group_pick_follows_cumulative_weights() {
        let g = Group {
            members: vec![(RouteId(0), 90), (RouteId(1), 100)],
            shadow: None,
            matcher: RouteMatch {
                path: PathMatch::Prefix("/".into()),
                case_sensitive: true,
                host: HostMatch::Any,
                method: None,
                headers: vec![],
                query: vec![],
            },
            precedence: 0,
            serves_without_host: true,
        };
        assert_eq!(g.pick(0), Some(RouteId(0)));
        assert_eq!(g.pick(89), Some(RouteId(0)));
        assert_eq!(g.pick(90), Some(RouteId(1)));
        assert_eq!(g.pick(99), Some(RouteId(1)));
        assert_eq!(g.shares(), vec![(RouteId(0), 90), (RouteId(1), 10)]);
    }
}
