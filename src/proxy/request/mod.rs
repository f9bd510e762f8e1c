//! The per-request path, as named phases over one [`RequestCtx`] (pingora's `ProxyHttp` phases
//! are the model). [`Proxy::handle`] runs them top to bottom; the first that answers ends it:
//!
//! 1. [`read_head`](Proxy::read_head): limits, header checks, the Module's admission, the
//!    authority, the path normalized once (every later phase sees the normalized request);
//! 2. [`local_service`](Proxy::local_service) and `module::reserved`: paths answered in-process;
//! 3. [`route`](Proxy::route): insecure action, lookup, weighted pick, escaped slashes, shadow;
//! 4. [`redirect`](Proxy::redirect) for a redirect route; for a forward route:
//! 5. CORS preflight, [`upgrade`](Proxy::upgrade),
//!    [`forwarding_headers`](Proxy::forwarding_headers);
//! 6. [`guards`](Proxy::guards): JWT, rate limits, AuthService (`crate::guard`);
//! 7. [`forward`](Proxy::forward): request header edits, the body, the shadow copy, the upstream
//!    exchange (`upstream::retry`), the tunnel after a switch;
//! 8. [`response_headers`](Proxy::response_headers), then the guards' and CORS decorations;
//! 9. in `handle`: a failure becomes its response (`respond`), the Module's headers are added,
//!    and the exchange goes to the observer (metrics, access log).
//!
//! Kept lean on purpose: one snapshot load, no regex compiled, no graph cloned, and only the
//! allocations a request needs (the upstream path, the `X-Forwarded-For` value).
//!
//! Imports `upstream` and the leaves (`respond`, `body`, `headers`, `conn`, `tunnel`,
//! `observe`), never `listen`.

pub(crate) mod cors;
pub(crate) mod head;
pub(crate) mod module;
pub(crate) mod shadow;
pub(crate) mod snapshot;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use super::{LocalService, Proxy};
use crate::proxy::body::{full, ReqBody, RespBody};
use crate::proxy::conn::{ClientCert, ConnHold, ConnInfo, Sni};
use crate::proxy::headers::{self as hdr, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use crate::proxy::observe::{self, Exchange};
use crate::proxy::respond::{ErrorSource, ProxyError};
use crate::proxy::upstream::{balance::ClientIp, retry};
use crate::routes::path::{normalize, EscapedSlashes, PathError};
use crate::routes::{Action, Arrival, RequestHead, Route, Routed};
use snapshot::{Prepared, Snapshot};

static X_FORWARDED_CLIENT_CERT: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

/// What one request's phases share: the snapshot it reads from start to end, the connection it
/// came on, what observing learns, and what each phase found for the later ones.
pub(crate) struct RequestCtx<'s> {
    /// The snapshot current when the request arrived.
    pub snap: &'s Snapshot,
    /// The connection's facts; `xff_hops` is the Listener's `l7Depth` on a revision's own port.
    pub conn: ConnInfo,
    /// The revision's Listener (index in `Graph::listeners`) on the connection's port, if the
    /// revision has its own: its Hosts and security model apply.
    pub listener: Option<usize>,
    /// What metrics and the access log learn about the exchange.
    pub ex: Exchange,
    /// The checked authority (`read_head`).
    pub authority: HeaderValue,
    /// The normalized request target, origin form (`read_head`).
    pub uri: Uri,
    /// The path held an escaped slash before normalization (`read_head`).
    pub escaped_slash: bool,
    /// The route matched and picked (`route`).
    pub route: Option<&'s Route>,
    /// The shadow route this request is copied to (`route`).
    pub shadow: Option<&'s Prepared>,
    /// The path and query sent upstream (after the route's rewrite).
    pub upstream_pq: Option<PathAndQuery>,
    /// The `Upgrade` the route lets through (`upgrade`).
    pub upgrade: Option<HeaderValue>,
}

impl<'s> RequestCtx<'s> {
    fn new(snap: &'s Snapshot, conn: ConnInfo, ex: Exchange) -> RequestCtx<'s> {
        let graph = &*snap.graph;
        let listener = graph
            .listener_on(conn.local_port)
            .filter(|&i| graph.listeners[i].protocol.is_http());
        let conn = ConnInfo {
            xff_hops: listener.map_or(conn.xff_hops, |i| graph.listeners[i].l7_depth),
            ..conn
        };
        RequestCtx {
            snap,
            conn,
            listener,
            ex,
            authority: HeaderValue::from_static(""),
            uri: Uri::default(),
            escaped_slash: false,
            route: None,
            shadow: None,
            upstream_pq: None,
            upgrade: None,
        }
    }
}

/// What the `route` phase found.
enum Routing<'s> {
    /// A forward route and its prepared form.
    Forward(&'s Route, &'s Prepared),
    /// A redirect route.
    Redirect(&'s Route),
    /// Answered already (the insecure action's redirect to HTTPS).
    Answered(Response<RespBody>),
}

impl Proxy {
    /// Serve one request; never fails (failures become responses in `respond`).
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<RespBody> {
        // ACME HTTP-01 answers for orders in flight, before anything else looks at the request.
        if let Some(answer) = self.acme.get().and_then(|a| a.answer(req.uri().path())) {
            return answer.map(full);
        }
        let snap = self.shared.load_full();
        let grpc = hdr::is_grpc(req.headers());
        let ex = Exchange::start(&req, &snap, &self.observer, conn.remote);
        let mut ctx = RequestCtx::new(&snap, conn, ex);
        let mut resp = match self.serve(&mut ctx, req).await {
            Ok(r) => r,
            Err(e) => self.failed(&mut ctx, e, grpc),
        };
        module::decorate(&snap.graph.settings, resp.headers_mut());
        self.observer.finish(&*snap, ctx.ex, resp)
    }

    /// The phases, in order.
    async fn serve(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let mut req = self.read_head(ctx, req)?;
        if let Some(svc) = self.local_service(ctx.uri.path()) {
            return Ok(svc.call(req).await.map(full));
        }
        if let Some(r) = module::reserved(&ctx.snap.graph.settings, ctx.uri.path()) {
            return r;
        }
        let (route, prep) = match self.route(ctx, &req)? {
            Routing::Forward(route, prep) => (route, prep),
            Routing::Redirect(route) => return Self::redirect(ctx, route),
            Routing::Answered(resp) => return Ok(resp),
        };
        let Action::Forward(f) = &route.action else {
            return Err(ProxyError::Internal("not a forwarding route".into()));
        };
        ctx.upstream_pq = Some(rewrite_path(route, ctx.uri.path(), ctx.uri.query())?);
        // A CORS preflight is answered before any security policy runs (browsers send it
        // without credentials).
        let cors = prep.cors.as_ref();
        if let Some(r) = cors.and_then(|c| c.preflight(req.method(), req.headers())) {
            return Ok(r);
        }
        let origin = cors.and_then(|c| c.origin(req.headers()));
        ctx.upgrade = Self::upgrade(prep, req.headers())?;
        // Hop-by-hop headers go and the forwarding headers are set before any policy adds a
        // header: a client's `Connection: x-granted` cannot remove what the AuthService
        // grants, and the AuthService sees the real peer and authority.
        self.forwarding_headers(ctx, &mut req, prep);
        let passed = Self::guards(ctx, f, prep, &mut req).await?;
        let mut resp = self.forward(ctx, prep, req).await?;
        passed.decorate(resp.headers_mut());
        if let (Some(c), Some(o)) = (cors, origin) {
            c.decorate(o, resp.headers_mut());
        }
        Ok(resp)
    }

    /// Phase: check the request head against the limits and the Module, take its authority and
    /// normalize its path once (from here on, policies, the AuthService and the upstream see
    /// the normalized path in origin form).
    fn read_head(
        &self,
        ctx: &mut RequestCtx<'_>,
        mut req: Request<Incoming>,
    ) -> Result<Request<Incoming>, ProxyError> {
        self.check_limits(&req)?;
        head::check_headers(req.headers())?;
        let graph = &*ctx.snap.graph;
        module::admit(
            &graph.settings,
            req.uri().path(),
            req.headers(),
            ctx.conn.remote.ip(),
            ctx.conn.xff_hops,
        )?;
        ctx.authority = head::authority(&req)?;
        let norm = match normalize(req.uri().path(), graph.normalize_options()) {
            Ok(n) => n,
            // `OPTIONS *` and friends: nothing to route.
            Err(PathError::NotAbsolute) => return Err(ProxyError::NoRoute),
            Err(PathError::BadEscape) => return Err(ProxyError::BadRequest("path escape")),
        };
        ctx.escaped_slash = norm.escaped_slash;
        if let Cow::Owned(p) = norm.path {
            let pq = match req.uri().query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            *req.uri_mut() = PathAndQuery::from_maybe_shared(Bytes::from(pq))
                .map_err(|_| ProxyError::BadRequest("path"))?
                .into();
        }
        ctx.uri = req.uri().clone();
        Ok(req)
    }

    /// Phase: the in-process service of a reserved path prefix, if `path` is under it.
    fn local_service(&self, path: &str) -> Option<&Arc<dyn LocalService>> {
        let (prefix, svc) = self.local.get()?;
        path.starts_with(prefix.as_str()).then_some(svc)
    }

    /// Phase: the Host's insecure action, the route lookup, the weighted pick among a group's
    /// members, the escaped-slash policy of the picked route, and the shadow pick.
    fn route<'s>(
        &self,
        ctx: &mut RequestCtx<'s>,
        req: &Request<Incoming>,
    ) -> Result<Routing<'s>, ProxyError> {
        let snap = ctx.snap;
        let graph = &*snap.graph;
        let authority_str = ctx.authority.to_str().unwrap_or("");
        let strip = graph
            .options
            .strip_matching_host_port
            .then_some(ctx.conn.local_port);
        let route_host = crate::routes::route_authority(authority_str, strip);
        let via = Arrival {
            secure: is_secure(req, ctx.conn, ctx.listener.map(|i| &graph.listeners[i])),
            tls_sni: ctx
                .conn
                .tls
                .then(|| req.extensions().get::<Sni>().map(|s| &*s.0)),
            listener: ctx.listener,
        };
        let (path, query) = (ctx.uri.path(), ctx.uri.query());
        let head = RequestHead {
            host: &route_host,
            method: req.method().as_str(),
            path,
            query,
            headers: req.headers(),
        };
        // The insecure action comes before any policy (auth) runs, as Emissary's redirect
        // routes turn ext_authz off.
        let matched = match graph.route_request(&head, via) {
            Routed::Route(m) => m,
            Routed::RedirectToHttps => {
                let host = host_name(authority_str);
                return Ok(Routing::Answered(self.https_redirect(&host, path, query)));
            }
            Routed::Rejected | Routed::NoRoute => return Err(ProxyError::NoRoute),
        };
        let members = &matched.group.members;
        let id = if members.len() == 1 {
            members[0].0
        } else {
            matched
                .group
                .pick(hdr::roll())
                .ok_or(ProxyError::NoHealthyUpstream)?
        };
        let route = graph.route(id);
        ctx.ex.route = Some(id.0);
        ctx.route = Some(route);
        if ctx.escaped_slash && graph.normalize_options().escaped_slashes == EscapedSlashes::Reject
        {
            let allowed = matches!(&route.action, Action::Forward(f) if f.allow_escaped_slashes);
            if !allowed {
                return Err(ProxyError::BadRequest("escaped slash in the path"));
            }
        }
        ctx.shadow = shadow::pick(snap, matched.group);
        match &route.action {
            Action::Redirect(_) => Ok(Routing::Redirect(route)),
            Action::Forward(_) => {
                let prep = snap.routes[id.0]
                    .as_ref()
                    .ok_or_else(|| ProxyError::Internal("forward route not prepared".into()))?;
                Ok(Routing::Forward(route, prep))
            }
        }
    }

    /// Phase: a redirect route's answer.
    fn redirect(ctx: &RequestCtx<'_>, route: &Route) -> Result<Response<RespBody>, ProxyError> {
        let authority_str = ctx.authority.to_str().unwrap_or("");
        let (status, loc) = redirect_location(
            route,
            ctx.uri.path(),
            ctx.uri.query(),
            authority_str,
            ctx.conn.tls,
        )?;
        let mut resp = local(status, Bytes::new());
        resp.headers_mut().insert(header::LOCATION, loc);
        Ok(resp)
    }

    /// Phase: the `Upgrade` value to pass on when the route allows what the request asks for;
    /// a WebSocket the route does not allow is refused (403, as Envoy answers), not quietly
    /// proxied as a plain GET. Other upgrades (h2c, TLS) are ignored, as RFC 9110 lets a server
    /// do.
    fn upgrade(prep: &Prepared, h: &http::HeaderMap) -> Result<Option<HeaderValue>, ProxyError> {
        let upgrade = if prep.allow_upgrade.is_empty() || prep.target.http2 {
            None
        } else {
            hdr::allowed_upgrade(h, &prep.allow_upgrade)
        };
        if upgrade.is_none()
            && hdr::requested_upgrade(h).is_some_and(|p| p.eq_ignore_ascii_case("websocket"))
            && !prep
                .allow_upgrade
                .iter()
                .any(|a| a.eq_ignore_ascii_case("websocket"))
        {
            return Err(ProxyError::UpgradeRefused);
        }
        Ok(upgrade)
    }

    /// Phase: strip hop-by-hop headers and set `X-Forwarded-*`, `X-Request-Id`, the trace
    /// context and `Host` (the checked authority).
    fn forwarding_headers(
        &self,
        ctx: &mut RequestCtx<'_>,
        req: &mut Request<Incoming>,
        prep: &Prepared,
    ) {
        // The Module's settings (`use_remote_address`, `preserve_external_request_id`).
        let module = &ctx.snap.graph.settings;
        let conn = ctx.conn;
        let h = req.headers_mut();
        hdr::strip_hop_by_hop(h, prep.target.http2);
        if let Some(u) = &ctx.upgrade {
            h.insert(header::UPGRADE, u.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if module.use_remote_address {
            hdr::set_forwarded_for(h, conn.remote.ip(), conn.xff_hops);
        }
        if conn.xff_hops == 0 || !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
            );
        }
        h.insert(X_FORWARDED_HOST.clone(), ctx.authority.clone());
        if module.preserve_external_request_id == Some(false) || !h.contains_key(&X_REQUEST_ID) {
            let id = hdr::new_request_id();
            if self.settings.access_log.is_some() {
                ctx.ex.request_id = Some(id.clone());
            }
            h.insert(X_REQUEST_ID.clone(), id);
        }
        ctx.ex.trace_id = Some(ctx.ex.trace.propagate(h));
        h.insert(header::HOST, ctx.authority.clone());
    }

    /// Phase: the route's edge policies (OIDC login or JWT, rate limits, AuthService) on the
    /// routed request.
    async fn guards(
        ctx: &RequestCtx<'_>,
        f: &crate::routes::Forward,
        prep: &Prepared,
        req: &mut Request<Incoming>,
    ) -> Result<crate::guard::Passed, ProxyError> {
        crate::guard::enforce(f, &prep.guard, req, ctx.conn.remote)
            .await
            .map_err(ProxyError::Denied)
    }

    /// Phase: send the request upstream (request header edits, the body under its limit, the
    /// shadow copy, retries and the route timeout in `upstream::retry`), start the tunnel
    /// after a switch, and edit the response head.
    async fn forward(
        &self,
        ctx: &mut RequestCtx<'_>,
        prep: &Prepared,
        mut req: Request<Incoming>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let conn = ctx.conn;
        let upstream_pq = ctx
            .upstream_pq
            .take()
            .ok_or_else(|| ProxyError::Internal("no upstream path".into()))?;
        let client_upgrade = ctx.upgrade.as_ref().map(|_| {
            (
                hyper::upgrade::on(&mut req),
                req.extensions_mut().remove::<ConnHold>(),
            )
        });
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ClientIp(conn.remote.ip()));
        // Envoy's SANITIZE_SET: a client's own XFCC never reaches the upstream; the verified
        // client certificate of the connection does.
        parts.headers.remove(&X_FORWARDED_CLIENT_CERT);
        if let Some(c) = parts.extensions.get::<ClientCert>() {
            parts
                .headers
                .insert(X_FORWARDED_CLIENT_CERT.clone(), c.0.clone());
        }
        let h = &mut parts.headers;
        if let Some(rewritten) = &prep.target.host_header {
            // HTTP/2 upstreams get it as `:authority` (see `retry::send_once`).
            h.insert(header::HOST, rewritten.clone());
        }
        let vars = hdr::VarContext {
            peer: conn.remote,
            protocol: if parts.version == Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
        };
        hdr::edit(h, &prep.remove_request, &prep.add_request, &vars, None);

        let replayable = prep.target.retry.is_some() || ctx.shadow.is_some();
        let limit = match (
            self.settings.limits.max_body_bytes,
            ctx.snap.graph.settings.max_request_body_bytes,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let body = match parts.extensions.remove::<crate::guard::ReadAhead>() {
            Some(ahead) => {
                ReqBody::read_ahead(ahead, body, limit).map_err(|_| ProxyError::BodyTooLarge)?
            }
            None => retry::request_body(body, replayable, limit).await?,
        };
        if let Some(sh) = ctx.shadow {
            let trace = ctx.ex.attempts.trace.as_deref();
            self.shadows
                .copy(&sh.target, &parts, &body, &upstream_pq, trace);
        }
        let mut resp =
            retry::send_upstream(&prep.target, parts, body, upstream_pq, &mut ctx.ex.attempts)
                .await?;
        let switched = match client_upgrade {
            Some((down, hold)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(crate::proxy::tunnel::tunnel(
                    down,
                    up,
                    hold,
                    prep.target.tunnel_idle,
                ));
                resp.headers().get(header::UPGRADE).cloned()
            }
            _ => None,
        };
        if switched.is_none() && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A switch nobody asked for would leave the client reading a foreign protocol.
            return Err(ProxyError::Upstream(
                "unsolicited 101 Switching Protocols".into(),
            ));
        }
        Ok(self.response_headers(ctx, prep, resp, switched, &vars))
    }

    /// Phase: the upstream response head as the client gets it: framing fixed, hop-by-hop
    /// headers stripped, the route's header edits and the debug headers.
    fn response_headers(
        &self,
        ctx: &RequestCtx<'_>,
        prep: &Prepared,
        resp: Response<RespBody>,
        switched: Option<HeaderValue>,
        vars: &hdr::VarContext,
    ) -> Response<RespBody> {
        let (mut parts, body) = resp.into_parts();
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            // Both framings: the body was read by Transfer-Encoding (RFC 9112 §6.3), so the
            // length is stale; passed on, it would make the client wait for bytes never sent.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        hdr::strip_hop_by_hop(&mut parts.headers, false);
        if let Some(u) = switched {
            parts.headers.insert(header::UPGRADE, u);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        hdr::edit(
            &mut parts.headers,
            &prep.remove_response,
            &prep.add_response,
            vars,
            None,
        );
        if self.settings.debug_headers {
            parts
                .headers
                .insert(hdr::X_LEGATE_ROUTE.clone(), prep.label.clone());
            parts
                .headers
                .insert(hdr::X_LEGATE_REVISION.clone(), ctx.snap.revision.clone());
        }
        Response::from_parts(parts, body)
    }

    /// The request failed: count it and answer with its response (`respond`).
    fn failed(&self, ctx: &mut RequestCtx<'_>, e: ProxyError, grpc: bool) -> Response<RespBody> {
        if e.error_source() == ErrorSource::Upstream {
            self.gateway_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        observe::count_error(&self.metrics, ctx.snap, ctx.ex.route, &e);
        ctx.ex.failed(&e);
        if grpc {
            e.into_grpc_response()
        } else {
            e.into_response()
        }
    }

    fn check_limits(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        let limits = &self.settings.limits;
        let uri = req.uri();
        let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        if uri_len > limits.max_uri_bytes {
            return Err(ProxyError::UriTooLong);
        }
        let h = req.headers();
        if h.len() > limits.max_headers {
            return Err(ProxyError::HeadersTooLarge);
        }
        let mut bytes = 0usize;
        for (n, v) in h {
            bytes += n.as_str().len() + v.len();
        }
        if bytes > limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge);
        }
        if let Some(max) = limits.max_body_bytes {
            if let Some(len) = h.get(header::CONTENT_LENGTH) {
                let len: u64 = len
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(ProxyError::BadRequest("content-length"))?;
                if len > max {
                    return Err(ProxyError::BodyTooLarge);
                }
            }
        }
        Ok(())
    }

    fn https_redirect(&self, host: &str, path: &str, query: Option<&str>) -> Response<RespBody> {
        let port = self.settings.https_redirect_port;
        let mut loc = String::with_capacity(16 + host.len() + path.len());
        loc.push_str("https://");
        loc.push_str(host);
        if port != 443 {
            loc.push(':');
            loc.push_str(&port.to_string());
        }
        loc.push_str(path);
        if let Some(q) = query {
            loc.push('?');
            loc.push_str(q);
        }
        let mut resp = local(StatusCode::MOVED_PERMANENTLY, Bytes::new());
        if let Ok(v) = HeaderValue::from_str(&loc) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

/// A small local response.
fn local(status: StatusCode, body: Bytes) -> Response<RespBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

/// The host name of an authority: port and userinfo removed, lowercase.
fn host_name(authority: &str) -> Cow<'_, str> {
    let a = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let h = if a.starts_with('[') {
        // `[v6]:port`: keep the brackets, which is how Host patterns spell IPv6.
        a.find(']').map_or(a, |i| &a[..=i])
    } else {
        a.rsplit_once(':').map_or(a, |(h, _)| h)
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

/// The path and query sent upstream (the rewrite itself lives in `routes`, shared with route
/// tests).
fn rewrite_path(
    route: &Route,
    path: &str,
    query: Option<&str>,
) -> Result<PathAndQuery, ProxyError> {
    let new = route
        .upstream_path(path, query)
        .ok_or_else(|| ProxyError::Internal("not a forwarding route".into()))?;
    PathAndQuery::from_maybe_shared(Bytes::from(new))
        .map_err(|_| ProxyError::Internal("rewritten path is not a valid URI path".into()))
}

/// `Location` of a Mapping redirect (computed in `routes`, shared with route tests).
fn redirect_location(
    route: &Route,
    path: &str,
    query: Option<&str>,
    authority: &str,
    tls: bool,
) -> Result<(StatusCode, HeaderValue), ProxyError> {
    let scheme = if tls { "https" } else { "http" };
    let (status, loc) = route
        .redirect_location(scheme, authority, path, query)
        .ok_or_else(|| ProxyError::Internal("not a redirecting route".into()))?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let loc = HeaderValue::from_str(&loc)
        .map_err(|_| ProxyError::Internal("redirect location".into()))?;
    Ok((status, loc))
}

/// Whether a request counts as secure for its Host's insecure action. On a Listener of the
/// revision, its security model decides. On the flags' listeners: the connection's own scheme,
/// unless hops in front are trusted (`--xff-trusted-hops` >= 1) and one of them sent
/// `X-Forwarded-Proto` (Envoy's rule under Emissary's default XFP security model).
fn is_secure(
    req: &Request<Incoming>,
    conn: ConnInfo,
    listener: Option<&crate::routes::ListenerRoute>,
) -> bool {
    let proto = req.headers().get(&X_FORWARDED_PROTO).map(|v| v.as_bytes());
    match listener {
        Some(l) => l.secure(conn.tls, proto),
        None if conn.xff_hops > 0 => proto.map_or(conn.tls, |p| p.eq_ignore_ascii_case(b"https")),
        None => conn.tls,
    }
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn host_names() {
        assert_eq!(host_name("Example.COM:8080"), "example.com");
        assert_eq!(host_name("example.com"), "example.com");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("u@h.test:1"), "h.test");
        assert_eq!(host_name("h.test."), "h.test");
    }
}
