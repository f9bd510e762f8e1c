//! Edge security at request time: what a request must pass before it is forwarded (the
//! route's OIDCLogin, AuthService, JWTPolicy and RateLimits, compiled by `config::guard` into the plain
//! values of `routes::guard`).
//!
//! Owns the state those values need across requests and revisions, in one [`Registry`] the
//! proxy keeps: JWKS key sets (refreshed in the background) by policy, OIDC providers
//! (discovery, keys, session keys) by login, local token buckets by limit, Redis connections
//! by address. A route's share is resolved once when a graph is
//! prepared ([`Registry::route`]), and state no prepared route holds is dropped
//! ([`Registry::prune`]). `enforce` applies the policies per request (I/O: JWKS fetches, Redis,
//! the auth service). Nothing here routes or answers a request itself: refusals become a
//! [`Denial`] that `proxy::respond` turns into the response.
//!
//! Per request the order is OIDC login or JWT, rate limits, AuthService. A route has at most
//! one of OIDCLogin and JWTPolicy (compile refuses both). JWT first: it is local, and its
//! claims can key rate limits. Rate limits before the AuthService (Emissary runs its ext_authz
//! filter first): the limits are the cheap guard in front of a network call per request and of
//! the body buffered for `include_body`; the price is that a descriptor cannot key on a header
//! the auth service grants (key on a JWT claim instead).

pub mod extauth;
pub mod jwt;
pub mod oidc;
pub mod ratelimit;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

pub use extauth::ReadAhead;
pub use ratelimit::Quota;

use crate::routes::guard::{JwtPolicy, Limit, LimitBackend, OidcLogin};

/// Set by the proxy before any policy runs: whether the request came over TLS.
pub(crate) const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

/// The live state of the edge policies, shared across revisions (see the module docs).
#[derive(Default)]
pub struct Registry {
    /// JWKS URLs are fetched with it (the proxy's: it trusts `--upstream-ca`); `None`: the
    /// process-wide [`crate::outbound::global`].
    client: Option<crate::outbound::Outbound>,
    jwt: Mutex<HashMap<JwtPolicy, Arc<jwt::KeyState>>>,
    /// Where OIDCLogin secrets are read (`--secrets-dir`).
    secrets_dir: Option<PathBuf>,
    oidc: Mutex<HashMap<OidcLogin, Arc<oidc::Login>>>,
    /// By limit id, rate and burst: a revision that changes none of them keeps the buckets (the
    /// descriptor entries are part of each bucket's key already).
    local: Mutex<HashMap<(String, u64, u64), Arc<ratelimit::Buckets>>>,
    redis: Mutex<HashMap<(String, Duration), Arc<ratelimit::Redis>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("jwt", &lock(&self.jwt).len())
            .field("oidc", &lock(&self.oidc).len())
            .field("local", &lock(&self.local).len())
            .field("redis", &lock(&self.redis).len())
            .finish()
    }
}

/// One route's share of the [`Registry`], resolved when its graph is prepared.
#[derive(Default, Clone)]
pub struct RouteState {
    jwt: Option<Arc<jwt::KeyState>>,
    oidc: Option<Arc<oidc::Login>>,
    /// One per `Forward::rate_limits`, in order.
    limits: Vec<ratelimit::Counter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// A registry whose JWKS and OpenID provider calls go through `client`, reading OIDCLogin
    /// secrets under `secrets_dir`.
    pub fn new(client: crate::outbound::Outbound, secrets_dir: Option<PathBuf>) -> Registry {
        Registry {
            client: Some(client),
            secrets_dir,
            ..Registry::default()
        }
    }

    /// The state `route`'s policies use.
    pub fn route(&self, route: &crate::routes::Forward) -> RouteState {
        RouteState {
            jwt: route.jwt.as_ref().map(|p| self.keys(p)),
            oidc: route.oidc.as_ref().map(|p| {
                lock(&self.oidc)
                    .entry((**p).clone())
                    .or_insert_with(|| {
                        Arc::new(oidc::Login::new(
                            self.secrets_dir.clone(),
                            self.client.clone(),
                        ))
                    })
                    .clone()
            }),
            limits: route
                .rate_limits
                .iter()
                .map(|l| self.counter(&l.limit))
                .collect(),
        }
    }

    fn keys(&self, policy: &JwtPolicy) -> Arc<jwt::KeyState> {
        let mut map = lock(&self.jwt);
        if let Some(k) = map.get(policy) {
            return k.clone();
        }
        // A new or changed policy starts with the keys of one reading the same source, so a
        // new revision does not start cold (a first request waiting for a fetch, or refused
        // while the JWKS endpoint is down). The verified-token memory is not shared: the new
        // policy may judge tokens differently.
        let seed = map
            .iter()
            .find(|(p, k)| p.source == policy.source && k.has_keys())
            .map(|(_, k)| k.clone());
        let k = Arc::new(jwt::KeyState::new(
            policy,
            seed.as_deref(),
            self.client.clone(),
        ));
        map.insert(policy.clone(), k.clone());
        k
    }

    fn counter(&self, limit: &Limit) -> ratelimit::Counter {
        match &limit.backend {
            LimitBackend::Local => ratelimit::Counter::Local(
                lock(&self.local)
                    .entry((limit.id.clone(), limit.rate.to_bits(), limit.burst))
                    .or_default()
                    .clone(),
            ),
            LimitBackend::Redis {
                address, timeout, ..
            } => ratelimit::Counter::Redis(
                lock(&self.redis)
                    .entry((address.clone(), *timeout))
                    .or_insert_with(|| Arc::new(ratelimit::Redis::new(address, *timeout)))
                    .clone(),
            ),
        }
    }

    /// Drop the state no prepared route holds any more (only this registry does). Called after
    /// a graph is swapped in; state of a graph still finishing requests goes at a later call.
    pub fn prune(&self) {
        lock(&self.jwt).retain(|_, k| Arc::strong_count(k) > 1);
        lock(&self.oidc).retain(|_, k| Arc::strong_count(k) > 1);
        lock(&self.local).retain(|_, b| Arc::strong_count(b) > 1);
        lock(&self.redis).retain(|_, r| Arc::strong_count(r) > 1);
    }

    /// How many key sets, local limits and Redis clients are kept (for tests).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            lock(&self.jwt).len(),
            lock(&self.local).len(),
            lock(&self.redis).len(),
        )
    }
}

/// A refusal answered to the client as is (status, headers and a short body).
#[derive(Debug, Clone)]
pub struct Denial {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a request that passed its route's policies takes along to its response.
#[derive(Debug, Default)]
pub struct Passed {
    /// The most restrictive limit that counted the request, when it reports headers.
    pub quota: Option<Quota>,
    /// A renewed OIDC session cookie.
    pub set_cookie: Option<http::HeaderValue>,
}

impl Passed {
    /// Add the `RateLimit-*` headers to the response.
    pub fn decorate(&self, h: &mut HeaderMap) {
        if let Some(q) = &self.quota {
            q.headers(h);
        }
        if let Some(c) = &self.set_cookie {
            h.append(http::header::SET_COOKIE, c.clone());
        }
    }
}

/// Run the route's policies on a request (JWT, rate limits, AuthService: see the module
/// docs), editing it (headers granted; with `include_body`, a [`ReadAhead`] extension holding
/// the body bytes already read) or refusing it.
pub async fn enforce(
    route: &crate::routes::Forward,
    state: &RouteState,
    req: &mut http::Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Passed, Box<Denial>> {
    let mut claims = None;
    let mut set_cookie = None;
    if let (Some(login), Some(live)) = (&route.oidc, &state.oidc) {
        let admitted = live.check(login, req).await?;
        grant(req.headers_mut(), &login.forward, admitted.headers);
        claims = Some(admitted.claims);
        set_cookie = admitted.set_cookie;
    }
    if let (Some(jwt), Some(keys)) = (&route.jwt, &state.jwt) {
        let verified = jwt.check(keys, req.headers()).await?;
        grant(req.headers_mut(), &jwt.forward, verified.headers);
        claims = Some(verified.claims);
    }
    let mut quota: Option<Quota> = None;
    for (limit, counter) in route.rate_limits.iter().zip(&state.limits) {
        if let Some(q) = limit
            .check(counter, req.headers(), peer, claims.as_deref())
            .await?
        {
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
    Ok(Passed { quota, set_cookie })
}

/// Set the claim headers of a validated token or session. A client must not choose the values
/// the upstream reads as verified claims: every forwarded name is removed first.
fn grant(
    h: &mut HeaderMap,
    forward: &[(String, http::HeaderName)],
    granted: Vec<(http::HeaderName, http::HeaderValue)>,
) {
    for (_, name) in forward {
        h.remove(name);
    }
    for (name, value) in granted {
        h.append(name, value);
    }
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
    if let Some(o) = &route.oidc {
        out.push(("oidc", format!("{} ({})", o.name, o.issuer)));
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
