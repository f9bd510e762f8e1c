//! The edge-security resources as written (`AuthService`, `JWTPolicy`, `RateLimit`) and their
//! compilation onto the Forward routes they cover (`routes::guard`'s plain values). Pure: no
//! I/O; the requests are checked by `crate::guard`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::model::{LabelSelector, Resource, Spec};
use super::Diagnostic;
use crate::routes::guard::{
    Alg, Entry, ExtAuth, IncludeBody, JwksSource, JwtPolicy, Limit, LimitBackend, RouteLimit,
};
use crate::routes::{Action, Group, HostRoute, Route, Scheme, Upstream};

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

/// AuthService `timeout_ms` when unset.
const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// Attach the policy resources among `resources` to the Forward routes they cover, reporting
/// every problem with them into `diags`.
pub fn attach(
    resources: &[&Resource],
    routes: &mut [Route],
    hosts: &[HostRoute],
    groups: &[Group],
    diags: &mut Vec<Diagnostic>,
) {
    attach_jwt(resources, routes, hosts, groups, diags);
    super::oidc::attach(resources, routes, hosts, groups, diags);
    attach_rate_limits(resources, routes, diags);
    let auth = compile_auth(resources, diags);
    let Some(auth) = auth else { return };
    for route in routes {
        let Action::Forward(f) = &mut route.action else {
            continue;
        };
        let bypass = resources.iter().any(|r| {
            r.namespace == route.namespace
                && r.name == route.name
                && matches!(&r.spec, Spec::Mapping(m) if m.bypass_auth)
        });
        if !bypass {
            f.ext_auth = Some(auth.clone());
        }
    }
}

/// Each JWTPolicy onto the Mappings it names or selects and those of the Hosts it names.
fn attach_jwt(
    resources: &[&Resource],
    routes: &mut [Route],
    hosts: &[HostRoute],
    groups: &[Group],
    diags: &mut Vec<Diagnostic>,
) {
    let policies: Vec<(&Resource, &JwtPolicySpec)> =
        super::model::of_kind(resources, |s| match s {
            Spec::JwtPolicy(p) => Some(&**p),
            _ => None,
        });
    // Which policy covers each route, to report overlaps.
    let mut owner: Vec<Option<String>> = vec![None; routes.len()];
    for (res, spec) in policies {
        let policy = match JwtPolicy::compile(res.id(), spec) {
            Ok(p) => Arc::new(p),
            Err((pointer, msg, help)) => {
                diags.push(
                    Diagnostic::error("bad-jwtpolicy", &res.at(pointer), msg).with_help(help),
                );
                continue;
            }
        };
        let targets = Coverage {
            kind: "JWTPolicy",
            codes: [
                "jwt-unknown-mapping",
                "jwt-unknown-host",
                "jwt-selects-nothing",
            ],
            mappings: &spec.mappings,
            selector: spec.mapping_selector.as_ref(),
            hosts: &spec.hosts,
        }
        .targets(res, resources, routes, hosts, groups, diags);
        for (i, route) in routes.iter_mut().enumerate() {
            if !targets[i] {
                continue;
            }
            let Action::Forward(f) = &mut route.action else {
                continue;
            };
            if let Some(first) = &owner[i] {
                diags.push(
                    Diagnostic::error(
                        "jwt-overlap",
                        &res.at("/spec"),
                        format!(
                            "Mapping `{}` is covered by JWTPolicy `{first}` and by `{}`",
                            route.name,
                            res.id()
                        ),
                    )
                    .with_help("let one JWTPolicy cover each Mapping"),
                );
                continue;
            }
            owner[i] = Some(res.id());
            f.jwt = Some(policy.clone());
        }
    }
}

/// Where a policy resource applies: Mappings it names, Mappings its selector matches, and the
/// Mappings of the Hosts it names (JWTPolicy and OIDCLogin attach alike).
pub(crate) struct Coverage<'a> {
    /// The kind, for messages.
    pub kind: &'static str,
    /// Diagnostic codes: a named Mapping or Host does not exist, nothing is covered.
    pub codes: [&'static str; 3],
    pub mappings: &'a [String],
    pub selector: Option<&'a LabelSelector>,
    pub hosts: &'a [String],
}

impl Coverage<'_> {
    /// Which of `routes` the policy `res` covers; unknown names and covering nothing are warned.
    pub(crate) fn targets(
        &self,
        res: &Resource,
        resources: &[&Resource],
        routes: &[Route],
        hosts: &[HostRoute],
        groups: &[Group],
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<bool> {
        let kind = self.kind;
        let [unknown_mapping, unknown_host, nothing] = self.codes;
        let mut targets = vec![false; routes.len()];
        for (i, name) in self.mappings.iter().enumerate() {
            let mut found = false;
            for (t, route) in targets.iter_mut().zip(routes.iter()) {
                if route.namespace == res.namespace && &route.name == name {
                    *t = true;
                    found = true;
                }
            }
            if !found {
                diags.push(Diagnostic::warning(
                    unknown_mapping,
                    &res.at(&format!("/spec/mappings/{i}")),
                    format!("{kind} `{}` names Mapping `{name}`, which does not exist in namespace `{}`", res.name, res.namespace),
                ));
            }
        }
        if let Some(sel) = self.selector.filter(|s| !s.is_empty()) {
            for (t, route) in targets.iter_mut().zip(routes.iter()) {
                let labels = resources.iter().find_map(|r| match &r.spec {
                    Spec::Mapping(_) if r.namespace == route.namespace && r.name == route.name => {
                        Some(&r.labels)
                    }
                    _ => None,
                });
                if labels.is_some_and(|l| sel.matches(l)) {
                    *t = true;
                }
            }
        }
        for (i, name) in self.hosts.iter().enumerate() {
            let Some(h) = hosts
                .iter()
                .find(|h| h.namespace == res.namespace && &h.name == name)
            else {
                diags.push(Diagnostic::warning(
                    unknown_host,
                    &res.at(&format!("/spec/hosts/{i}")),
                    format!(
                        "{kind} `{}` names Host `{name}`, which does not exist in namespace `{}`",
                        res.name, res.namespace
                    ),
                ));
                continue;
            };
            for &g in &h.groups {
                let Some(group) = groups.get(g) else { continue };
                for (id, _) in group.members.iter().chain(group.shadow.iter()) {
                    if let Some(t) = targets.get_mut(id.0) {
                        *t = true;
                    }
                }
            }
        }
        if !targets.contains(&true) {
            diags.push(
                Diagnostic::warning(
                    nothing,
                    &res.at("/spec"),
                    format!("{kind} `{}` protects no route", res.name),
                )
                .with_help("list Mappings in `mappings`, select them with `mappingSelector`, or name Hosts in `hosts`"),
            );
        }
        targets
    }
}

/// Each RateLimit limit onto the Mappings whose `labels` declare its domain and group.
fn attach_rate_limits(resources: &[&Resource], routes: &mut [Route], diags: &mut Vec<Diagnostic>) {
    let mut limits = Vec::new();
    let list: Vec<(&Resource, &RateLimitSpec)> = super::model::of_kind(resources, |s| match s {
        Spec::RateLimit(s) => Some(&**s),
        _ => None,
    });
    for (res, spec) in list {
        match compile_limits(&res.id(), spec) {
            Ok(l) => limits.extend(l.into_iter().map(|l| (res, Arc::new(l)))),
            Err((pointer, msg, help)) => diags
                .push(Diagnostic::error("bad-ratelimit", &res.at(&pointer), msg).with_help(help)),
        }
    }
    let mut used = vec![false; limits.len()];
    for route in routes.iter_mut() {
        let Action::Forward(f) = &mut route.action else {
            continue;
        };
        let Some((res, labels)) = resources.iter().find_map(|r| match &r.spec {
            Spec::Mapping(m) if r.namespace == route.namespace && r.name == route.name => {
                m.labels.as_ref().map(|l| (*r, l))
            }
            _ => None,
        }) else {
            continue;
        };
        let (groups, unsupported) = descriptor_groups(labels);
        let has_claims = groups
            .iter()
            .any(|(_, _, entries)| entries.iter().any(|e| matches!(e, Entry::Claim { .. })));
        if has_claims && f.jwt.is_none() && f.oidc.is_none() {
            // Without a validated token there is never a claim, so the limit would never apply.
            diags.push(
                Diagnostic::error(
                    "ratelimit-claim-without-jwt",
                    &res.at("/spec/labels"),
                    format!(
                        "Mapping `{}` keys a rate limit on a JWT claim but no JWTPolicy or OIDCLogin covers it",
                        res.name
                    ),
                )
                .with_help(
                    "cover the Mapping with a JWTPolicy or an OIDCLogin (mappings, mappingSelector or hosts)",
                ),
            );
        }
        for u in unsupported {
            diags.push(Diagnostic::warning(
                "ratelimit-entry-ignored",
                &res.at("/spec/labels"),
                format!(
                    "descriptor entry `{u}` is not evaluated by Legate; it is left out of the key"
                ),
            ));
        }
        for (domain, group, entries) in groups {
            for (i, (_, limit)) in limits.iter().enumerate() {
                if limit.domain == domain && limit.group == group {
                    used[i] = true;
                    f.rate_limits.push(RouteLimit {
                        limit: limit.clone(),
                        entries: entries.clone(),
                    });
                }
            }
        }
    }
    for (i, (res, limit)) in limits.iter().enumerate() {
        if !used[i] {
            diags.push(
                Diagnostic::warning(
                    "ratelimit-unused",
                    &res.at("/spec/limits"),
                    format!(
                        "limit `{}` counts nothing: no Mapping has a `{}` group in its `labels.{}`",
                        limit.id, limit.group, limit.domain
                    ),
                )
                .with_help("add the descriptor group to the Mappings to limit"),
            );
        }
    }
}

/// The one AuthService of the gateway. Emissary merges several into one auth filter (their
/// services become weighted endpoints of one cluster when TLS, protocol and timeouts agree, and
/// the last one's settings win); Legate refuses a second one instead, since which settings
/// apply would depend on the order resources are read in.
fn compile_auth(resources: &[&Resource], diags: &mut Vec<Diagnostic>) -> Option<Arc<ExtAuth>> {
    let found: Vec<(&Resource, &AuthServiceSpec)> = super::model::of_kind(resources, |s| match s {
        Spec::AuthService(a) => Some(&**a),
        _ => None,
    });
    let (first, spec) = *found.first()?;
    for (extra, _) in &found[1..] {
        diags.push(
            Diagnostic::error(
                "duplicate-authservice",
                &extra.at("/metadata/name"),
                format!(
                    "AuthService `{}` is a second AuthService; `{}` is already the gateway's (Emissary would merge them into one auth filter, the last one's settings winning)",
                    extra.id(),
                    first.id()
                ),
            )
            .with_help("keep one AuthService per gateway: put the auth services behind one address, or use ambassador_id to split gateways"),
        );
    }
    match ExtAuth::compile(spec) {
        Ok(a) => Some(Arc::new(a)),
        Err((pointer, msg, help)) => {
            diags.push(
                Diagnostic::error("bad-authservice", &first.at(pointer), msg).with_help(help),
            );
            None
        }
    }
}

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

/// `status_on_error: {code}`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StatusOnError {
    pub code: Option<u16>,
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
}

/// The JWTPolicy spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct JwtPolicySpec {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    pub algorithms: Vec<String>,
    pub clock_skew_seconds: Option<u64>,
    pub required_claims: Vec<String>,
    pub forward_claims: BTreeMap<String, String>,
    pub mappings: Vec<String>,
    #[serde(rename = "mappingSelector")]
    pub mapping_selector: Option<LabelSelector>,
    pub hosts: Vec<String>,
}

impl JwtPolicy {
    pub fn compile(name: String, spec: &JwtPolicySpec) -> Result<JwtPolicy, CompileError> {
        let algorithms = if spec.algorithms.is_empty() {
            vec![Alg::Rs256, Alg::Es256, Alg::EdDsa]
        } else {
            spec.algorithms
                .iter()
                .map(|a| {
                    Alg::parse(a).ok_or_else(|| {
                        (
                            "/spec/algorithms",
                            format!("algorithm `{a}` is not accepted"),
                            "use RS256, ES256 or EdDSA (symmetric HS* and `none` are refused)"
                                .to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        match (&spec.jwks.file, &spec.jwks.url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "/spec/jwks",
                    "jwks needs exactly one of `file` or `url`".into(),
                    "set `file: /path/jwks.json` or `url: https://issuer/.well-known/jwks.json`"
                        .into(),
                ))
            }
            (None, Some(u)) => {
                let ok = u.starts_with("https://")
                    || u.starts_with("http://127.0.0.1")
                    || u.starts_with("http://localhost")
                    || u.starts_with("http://[::1]");
                if !ok || u.parse::<http::Uri>().is_err() {
                    return Err((
                        "/spec/jwks/url",
                        format!("jwks url `{u}` is not an https:// URL"),
                        "keys must be fetched over HTTPS (plain http only for loopback)".into(),
                    ));
                }
            }
            (Some(_), None) => {}
        }
        let forward = forward_claims(&spec.forward_claims)?;
        Ok(JwtPolicy {
            name: name.clone(),
            issuer: spec.issuer.clone(),
            audiences: spec.audiences.clone(),
            algorithms,
            skew: spec.clock_skew_seconds.unwrap_or(60),
            required: spec.required_claims.clone(),
            forward,
            source: spec.jwks.clone(),
        })
    }
}

/// The RateLimit spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RateLimitSpec {
    pub backend: Option<String>,
    pub redis: Option<RedisSpec>,
    pub failure_mode: Option<String>,
    pub response_headers: Option<bool>,
    pub limits: Vec<LimitSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RedisSpec {
    pub address: String,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct LimitSpec {
    pub name: String,
    pub domain: Option<String>,
    pub group: String,
    pub requests: u64,
    pub per: String,
    pub burst: Option<u64>,
}

/// Compile the limits of one RateLimit resource.
pub fn compile_limits(
    id: &str,
    spec: &RateLimitSpec,
) -> Result<Vec<Limit>, (String, String, String)> {
    let fail_open = spec.failure_mode.as_deref() != Some("closed");
    let mut out = Vec::new();
    for (i, l) in spec.limits.iter().enumerate() {
        let secs = match l.per.as_str() {
            "second" => 1.0,
            "minute" => 60.0,
            "hour" => 3600.0,
            other => {
                return Err((
                    format!("/spec/limits/{i}/per"),
                    format!("`per: {other}` is not a period"),
                    "use second, minute or hour".into(),
                ))
            }
        };
        let backend = match spec.backend.as_deref().unwrap_or("local") {
            "redis" => {
                let Some(r) = &spec.redis else {
                    return Err((
                        "/spec".into(),
                        "`backend: redis` needs `redis.address`".into(),
                        "add `redis: {address: redis:6379}`".into(),
                    ));
                };
                // `host:port`, or a URL: `redis://[user:password@]host:port[/db]`, `rediss://`
                // for TLS.
                let address = if r.address.contains("://") {
                    r.address.clone()
                } else {
                    format!("redis://{}", r.address)
                };
                if let Err(e) = redis::Client::open(address.as_str()) {
                    return Err((
                        "/spec/redis/address".into(),
                        format!("`{}` is not a Redis address: {e}", r.address),
                        "write host:port, redis://[user:password@]host:port[/db] or rediss:// for TLS".into(),
                    ));
                }
                LimitBackend::Redis {
                    address,
                    timeout: Duration::from_millis(r.timeout_ms.unwrap_or(50).max(1)),
                    fail_open,
                }
            }
            _ => LimitBackend::Local,
        };
        out.push(Limit {
            id: format!("{id}/{}", l.name),
            domain: l.domain.clone().unwrap_or_else(|| "ambassador".into()),
            group: l.group.clone(),
            requests: l.requests,
            rate: l.requests as f64 / secs,
            burst: l.burst.unwrap_or(l.requests).max(1),
            response_headers: spec.response_headers.unwrap_or(true),
            backend,
        });
    }
    Ok(out)
}

/// One descriptor group of a Mapping: domain, group name, entries.
pub type DescriptorGroup = (String, String, Vec<Entry>);

/// The descriptor groups of a Mapping's `labels`, and the entries Legate cannot evaluate
/// (reported by the caller).
pub fn descriptor_groups(labels: &Value) -> (Vec<DescriptorGroup>, Vec<String>) {
    let mut out = Vec::new();
    let mut unsupported = Vec::new();
    let Some(domains) = labels.as_object() else {
        return (out, unsupported);
    };
    for (domain, groups) in domains {
        for group in groups.as_array().into_iter().flatten() {
            for (name, entries) in group.as_object().into_iter().flatten() {
                let mut list = Vec::new();
                for e in entries.as_array().into_iter().flatten() {
                    let Some((kind, body)) = e.as_object().and_then(|o| o.iter().next()) else {
                        continue;
                    };
                    let s = |f: &str| body.get(f).and_then(Value::as_str).map(str::to_string);
                    match kind.as_str() {
                        "remote_address" => list.push(Entry::RemoteAddress),
                        "jwt_claim" => {
                            let Some(claim) = s("claim") else { continue };
                            list.push(Entry::Claim {
                                key: s("key").unwrap_or_else(|| claim.clone()),
                                claim,
                            });
                        }
                        "generic_key" => list.push(Entry::Generic {
                            key: s("key").unwrap_or_else(|| "generic_key".into()),
                            value: s("value").unwrap_or_default(),
                        }),
                        "request_headers" => {
                            let Some(name) = s("header_name").and_then(|h| {
                                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                            }) else {
                                continue;
                            };
                            list.push(Entry::Header {
                                key: s("key").unwrap_or_else(|| name.to_string()),
                                name,
                                omit_if_not_present: body
                                    .get("omit_if_not_present")
                                    .and_then(Value::as_bool)
                                    .unwrap_or(false),
                            });
                        }
                        other => unsupported.push(format!("{domain}.{name}: {other}")),
                    }
                }
                out.push((domain.clone(), name.clone(), list));
            }
        }
    }
    (out, unsupported)
}

/// `forward_claims` (claim -> header) of a JWTPolicy or an OIDCLogin, the header names checked.
pub(super) fn forward_claims(
    claims: &BTreeMap<String, String>,
) -> Result<Vec<(String, HeaderName)>, CompileError> {
    claims
        .iter()
        .map(|(claim, h)| {
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map(|n| (claim.clone(), n))
                .map_err(|_| {
                    (
                        "/spec/forward_claims",
                        format!("`{h}` is not a valid header name"),
                        "use letters, digits and `-`".to_string(),
                    )
                })
        })
        .collect()
}
