//! Edge security policies: what a request must pass before it is forwarded.
//!
//! Owns two halves kept apart: `attach` (pure, called by `config::compile`) turns policy
//! resources into per-route settings on the compiled graph; `enforce` applies them per request
//! (I/O: JWKS fetches, Redis, the auth service). Nothing here routes or answers a request
//! itself: refusals become a [`Denial`] that `proxy::error` turns into the response.
//!
//! Per request the order is JWT, rate limits, AuthService. JWT first: it is local, and its
//! claims can key rate limits. Rate limits before the AuthService (Emissary runs its ext_authz
//! filter first): the limits are the cheap guard in front of a network call per request and of
//! the body buffered for `include_body`; the price is that a descriptor cannot key on a header
//! the auth service grants (key on a JWT claim instead).

pub mod extauth;
pub mod jwt;
pub mod ratelimit;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

pub use extauth::{AuthServiceSpec, ExtAuth, ReadAhead};
pub use jwt::{JwtPolicy, JwtPolicySpec};
pub use ratelimit::{Quota, RateLimitSpec, RouteLimit};

use crate::config::model::{Resource, Spec};
use crate::config::Diagnostic;
use crate::routes::{Action, Group, HostRoute, Route};

/// A refusal answered to the client as is (status, headers and a short body).
#[derive(Debug, Clone)]
pub struct Denial {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

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
    let mut policies: Vec<(&Resource, &JwtPolicySpec)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::JwtPolicy(p) => Some((*r, &**p)),
            _ => None,
        })
        .collect();
    policies.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    let mapping_labels = |route: &Route| {
        resources.iter().find_map(|r| match &r.spec {
            Spec::Mapping(_) if r.namespace == route.namespace && r.name == route.name => {
                Some(&r.labels)
            }
            _ => None,
        })
    };
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
        let mut targets = vec![false; routes.len()];
        for (i, name) in spec.mappings.iter().enumerate() {
            let mut found = false;
            for (t, route) in targets.iter_mut().zip(routes.iter()) {
                if route.namespace == res.namespace && &route.name == name {
                    *t = true;
                    found = true;
                }
            }
            if !found {
                diags.push(Diagnostic::warning(
                    "jwt-unknown-mapping",
                    &res.at(&format!("/spec/mappings/{i}")),
                    format!("JWTPolicy `{}` names Mapping `{name}`, which does not exist in namespace `{}`", res.name, res.namespace),
                ));
            }
        }
        if let Some(sel) = spec.mapping_selector.as_ref().filter(|s| !s.is_empty()) {
            for (t, route) in targets.iter_mut().zip(routes.iter()) {
                if mapping_labels(route).is_some_and(|l| sel.matches(l)) {
                    *t = true;
                }
            }
        }
        for (i, name) in spec.hosts.iter().enumerate() {
            let Some(h) = hosts
                .iter()
                .find(|h| h.namespace == res.namespace && &h.name == name)
            else {
                diags.push(Diagnostic::warning(
                    "jwt-unknown-host",
                    &res.at(&format!("/spec/hosts/{i}")),
                    format!("JWTPolicy `{}` names Host `{name}`, which does not exist in namespace `{}`", res.name, res.namespace),
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
                    "jwt-selects-nothing",
                    &res.at("/spec"),
                    format!("JWTPolicy `{}` protects no route", res.name),
                )
                .with_help("list Mappings in `mappings`, select them with `mappingSelector`, or name Hosts in `hosts`"),
            );
        }
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

/// Each RateLimit limit onto the Mappings whose `labels` declare its domain and group.
fn attach_rate_limits(resources: &[&Resource], routes: &mut [Route], diags: &mut Vec<Diagnostic>) {
    let mut limits = Vec::new();
    let mut list: Vec<(&Resource, &RateLimitSpec)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::RateLimit(s) => Some((*r, &**s)),
            _ => None,
        })
        .collect();
    list.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    for (res, spec) in list {
        match ratelimit::compile(&res.id(), spec) {
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
        let (groups, unsupported) = ratelimit::descriptor_groups(labels);
        let has_claims = groups.iter().any(|(_, _, entries)| {
            entries
                .iter()
                .any(|e| matches!(e, ratelimit::Entry::Claim { .. }))
        });
        if has_claims && f.jwt.is_none() {
            // Without a validated token there is never a claim, so the limit would never apply.
            diags.push(
                Diagnostic::error(
                    "ratelimit-claim-without-jwt",
                    &res.at("/spec/labels"),
                    format!(
                        "Mapping `{}` keys a rate limit on a JWT claim but no JWTPolicy covers it",
                        res.name
                    ),
                )
                .with_help(
                    "cover the Mapping with a JWTPolicy (mappings, mappingSelector or hosts)",
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
    let mut found: Vec<(&Resource, &AuthServiceSpec)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::AuthService(a) => Some((*r, &**a)),
            _ => None,
        })
        .collect();
    found.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
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

/// What a request that passed its route's policies takes along to its response.
#[derive(Debug, Default)]
pub struct Passed {
    /// The most restrictive limit that counted the request, when it reports headers.
    pub quota: Option<Quota>,
}

impl Passed {
    /// Add the `RateLimit-*` headers to the response.
    pub fn decorate(&self, h: &mut HeaderMap) {
        if let Some(q) = &self.quota {
            q.headers(h);
        }
    }
}

/// Run the route's policies on a request (JWT, rate limits, AuthService: see the module
/// docs), editing it (headers granted; with `include_body`, a [`ReadAhead`] extension holding
/// the body bytes already read) or refusing it.
pub async fn enforce(
    route: &crate::routes::Forward,
    req: &mut http::Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Passed, Box<Denial>> {
    let mut claims = None;
    if let Some(jwt) = &route.jwt {
        let verified = jwt.check(req.headers()).await?;
        let h = req.headers_mut();
        // A client must not choose the values the upstream reads as verified claims.
        for (_, name) in &jwt.forward {
            h.remove(name);
        }
        for (name, value) in verified.headers {
            h.append(name, value);
        }
        claims = Some(verified.claims);
    }
    let mut quota: Option<Quota> = None;
    for limit in &route.rate_limits {
        if let Some(q) = limit.check(req.headers(), peer, claims.as_deref()).await? {
            quota = Some(quota.map_or(q, |p| p.tighter(q)));
        }
    }
    if let Some(auth) = &route.ext_auth {
        let body = match auth.include_body {
            Some(inc) => {
                let (ahead, sent, partial) = auth.read_body(inc, req.body_mut()).await?;
                req.extensions_mut().insert(ahead);
                Some((sent, partial))
            }
            None => None,
        };
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let grant = auth
            .check(req.method(), pq, req.headers(), peer, body)
            .await?;
        let h = req.headers_mut();
        for (name, _) in &grant {
            h.remove(name);
        }
        for (name, value) in grant {
            h.append(name, value);
        }
    }
    Ok(Passed { quota })
}

/// Carry the state that should outlive a revision from `old` to `new` (called when `new` is
/// swapped in): the local rate-limit buckets of unchanged limits ([`ratelimit::carry_over`])
/// and the JWKS keys of policies reading the same key source ([`jwt::carry_over`]).
pub fn carry_over(old: &crate::routes::Graph, new: &crate::routes::Graph) {
    let policies = |g: &crate::routes::Graph| -> Vec<Arc<JwtPolicy>> {
        g.routes
            .iter()
            .filter_map(|r| match &r.action {
                Action::Forward(f) => f.jwt.clone(),
                _ => None,
            })
            .collect()
    };
    jwt::carry_over(&policies(old), &policies(new));
    let limits = |g: &crate::routes::Graph| -> Vec<Arc<ratelimit::Limit>> {
        g.routes
            .iter()
            .filter_map(|r| match &r.action {
                Action::Forward(f) => Some(f.rate_limits.iter().map(|l| l.limit.clone())),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let (old, new) = (limits(old), limits(new));
    ratelimit::carry_over(old.iter().map(|l| &**l), new.iter().map(|l| &**l));
}

/// The route's policies as `legate diff` fields (name, value); none when the route has none.
pub fn describe(route: &crate::routes::Forward) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(a) = &route.ext_auth {
        out.push((
            "ext_auth",
            format!(
                "http://{}{} (timeout {}, {})",
                a.authority,
                a.path_prefix,
                a.timeout.map_or("none".to_string(), |t| format!("{t:?}")),
                if a.failure_mode_allow {
                    "fails open".to_string()
                } else {
                    format!("{} when down", a.status_on_error.as_u16())
                }
            ) + &a.include_body.map_or(String::new(), |b| {
                format!(
                    ", body up to {} bytes{}",
                    b.max_bytes,
                    if b.allow_partial { " (partial)" } else { "" }
                )
            }),
        ));
    }
    if let Some(j) = &route.jwt {
        out.push(("jwt", j.name.clone()));
    }
    if !route.rate_limits.is_empty() {
        let limits: Vec<String> = route
            .rate_limits
            .iter()
            .map(|l| {
                format!(
                    "{} ({}/{:.0}s, burst {})",
                    l.limit.id,
                    l.limit.requests,
                    l.limit.requests as f64 / l.limit.rate,
                    l.limit.burst
                )
            })
            .collect();
        out.push(("rate_limits", limits.join(", ")));
    }
    out
}
