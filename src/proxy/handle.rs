//! The per-request path: limits, host and path, insecure policy, lookup, weighted pick, then a
//! redirect or a forward with rewrites and header edits.
//!
//! Kept lean on purpose: one snapshot load, no regex compiled, no graph cloned, and only the
//! allocations a request needs (the upstream path, the `X-Forwarded-For` value).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::body::{full, RespBody};
use super::error::ErrorSource;
use super::error::ProxyError;
use super::head;
use super::headers::{self as hdr, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use super::observe::{self, Exchange};
use super::{Prepared, Proxy, Snapshot};
use crate::routes::path::{normalize, EscapedSlashes, PathError};
use crate::routes::{Action, Arrival, RequestHead, Route, Routed};

/// What keeps a downstream connection counted (its `--max-connections` slot and its place in
/// the open-connections gauge); an upgraded connection's tunnel keeps a clone.
#[derive(Clone)]
#[allow(dead_code)] // held only for what its drop releases
pub(crate) struct ConnHold(
    pub(crate) Arc<(tokio::sync::OwnedSemaphorePermit, crate::metrics::ConnGuard)>,
);

/// What the forwarding headers are made from.
#[derive(Clone, Copy)]
struct Forwarding<'a> {
    /// The Module's settings (`use_remote_address`, `preserve_external_request_id`).
    module: &'a crate::routes::Settings,
    conn: ConnInfo,
    /// The checked authority.
    authority: &'a HeaderValue,
    /// The `Upgrade` the route lets through.
    upgrade: Option<&'a HeaderValue>,
}

/// Facts about the downstream connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The listener's own port (what `strip_matching_host_port` compares with).
    pub local_port: u16,
}

/// The SNI a TLS client sent, carried in each request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Sni(pub(crate) Arc<str>);

/// The `x-forwarded-client-cert` value of the connection's verified client certificate.
#[derive(Debug, Clone)]
pub(crate) struct ClientCert(pub(crate) HeaderValue);

static X_FORWARDED_CLIENT_CERT: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

impl Proxy {
    /// Serve one request; never fails (failures become responses in `error`).
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
        let mut ex = Exchange::start(&req, &snap, &self.settings, conn.remote);
        let mut resp = match self.serve(&snap, req, conn, &mut ex).await {
            Ok(r) => r,
            Err(e) => {
                if e.error_source() == ErrorSource::Upstream {
                    self.gateway_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                observe::count_error(&self.metrics, &snap, ex.route, &e);
                ex.failed(&e);
                if grpc {
                    e.into_grpc_response()
                } else {
                    e.into_response()
                }
            }
        };
        super::module::decorate(&snap.graph.settings, resp.headers_mut());
        self.observed(&snap, ex, resp)
    }

    async fn serve(
        &self,
        snap: &Arc<Snapshot>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        ex: &mut Exchange,
    ) -> Result<Response<RespBody>, ProxyError> {
        self.check_limits(&req)?;
        head::check_headers(req.headers())?;
        let graph = &*snap.graph;
        super::module::admit(
            &graph.settings,
            req.uri().path(),
            req.headers(),
            conn.remote.ip(),
            self.settings.xff_trusted_hops,
        )?;
        let authority = head::authority(&req)?;
        let authority_str = authority.to_str().unwrap_or("");
        let host = host_name(authority_str);
        let strip = graph
            .options
            .strip_matching_host_port
            .then_some(conn.local_port);
        let route_host = crate::routes::route_authority(authority_str, strip);
        let norm = match normalize(req.uri().path(), graph.normalize_options()) {
            Ok(n) => n,
            // `OPTIONS *` and friends: nothing to route.
            Err(PathError::NotAbsolute) => return Err(ProxyError::NoRoute),
            Err(PathError::BadEscape) => return Err(ProxyError::BadRequest("path escape")),
        };
        let escaped_slash = norm.escaped_slash;
        if let Cow::Owned(p) = norm.path {
            // From here on (policies, the AuthService, the upstream) the request carries the
            // normalized path in origin form.
            let pq = match req.uri().query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            *req.uri_mut() = PathAndQuery::from_maybe_shared(Bytes::from(pq))
                .map_err(|_| ProxyError::BadRequest("path"))?
                .into();
        }
        let uri = req.uri().clone();
        let path = uri.path();
        let query = uri.query();

        if let Some((prefix, svc)) = self.local.get() {
            if path.starts_with(prefix.as_str()) {
                return Ok(svc.call(req).await.map(full));
            }
        }
        if let Some(r) = super::module::reserved(&graph.settings, path) {
            return r;
        }

        let via = Arrival {
            secure: self.is_secure(&req, conn),
            tls_sni: conn
                .tls
                .then(|| req.extensions().get::<Sni>().map(|s| &*s.0)),
        };
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
            Routed::RedirectToHttps => return Ok(self.https_redirect(&host, path, query)),
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
        ex.route = Some(id.0);
        if escaped_slash && graph.normalize_options().escaped_slashes == EscapedSlashes::Reject {
            let allowed = matches!(&route.action, Action::Forward(f) if f.allow_escaped_slashes);
            if !allowed {
                return Err(ProxyError::BadRequest("escaped slash in the path"));
            }
        }
        let shadow = super::shadow::pick(snap, matched.group);
        match &route.action {
            Action::Redirect(_) => {
                let (status, loc) = redirect_location(route, path, query, authority_str, conn.tls)?;
                let mut resp = local(status, Bytes::new());
                resp.headers_mut().insert(header::LOCATION, loc);
                Ok(resp)
            }
            Action::Forward(f) => {
                let prep = snap.routes[id.0]
                    .as_ref()
                    .ok_or_else(|| ProxyError::Internal("forward route not prepared".into()))?;
                let upstream_pq = rewrite_path(route, path, query)?;
                // A CORS preflight is answered before any security policy runs (browsers send
                // it without credentials).
                let cors = prep.cors.as_ref();
                if let Some(r) = cors.and_then(|c| c.preflight(req.method(), req.headers())) {
                    return Ok(r);
                }
                let origin = cors.and_then(|c| c.origin(req.headers()));
                let upgrade = Self::upgrade(prep, req.headers())?;
                // Hop-by-hop headers go and the forwarding headers are set before any policy
                // adds a header: a client's `Connection: x-granted` cannot remove what the
                // AuthService grants, and the AuthService sees the real peer and authority.
                let fwd = Forwarding {
                    module: &graph.settings,
                    conn,
                    authority: &authority,
                    upgrade: upgrade.as_ref(),
                };
                self.forwarding_headers(&mut req, prep, fwd, ex);
                let passed = crate::guard::enforce(f, &prep.guard, &mut req, conn.remote)
                    .await
                    .map_err(ProxyError::Denied)?;
                let mut resp = self
                    .forward(snap, prep, req, conn, upstream_pq, upgrade, ex, shadow)
                    .await?;
                passed.decorate(resp.headers_mut());
                if let (Some(c), Some(o)) = (cors, origin) {
                    c.decorate(o, resp.headers_mut());
                }
                Ok(resp)
            }
        }
    }

    /// The `Upgrade` value to pass on when the route allows what the request asks for; a
    /// WebSocket the route does not allow is refused (403, as Envoy answers), not quietly
    /// proxied as a plain GET. Other upgrades (h2c, TLS) are ignored, as RFC 9110 lets a server
    /// do.
    fn upgrade(prep: &Prepared, h: &http::HeaderMap) -> Result<Option<HeaderValue>, ProxyError> {
        let upgrade = if prep.allow_upgrade.is_empty() || prep.http2 {
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

    /// Strip hop-by-hop headers and set `X-Forwarded-*`, `X-Request-Id`, the trace context and
    /// `Host` (the checked authority).
    fn forwarding_headers(
        &self,
        req: &mut Request<Incoming>,
        prep: &Prepared,
        fwd: Forwarding<'_>,
        ex: &mut Exchange,
    ) {
        let Forwarding {
            module,
            conn,
            authority,
            upgrade,
        } = fwd;
        let h = req.headers_mut();
        hdr::strip_hop_by_hop(h, prep.http2);
        if let Some(u) = upgrade {
            h.insert(header::UPGRADE, u.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if module.use_remote_address {
            hdr::set_forwarded_for(h, conn.remote.ip(), self.settings.xff_trusted_hops);
        }
        if self.settings.xff_trusted_hops == 0 || !h.contains_key(&X_FORWARDED_PROTO) {
            h.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
            );
        }
        h.insert(X_FORWARDED_HOST.clone(), authority.clone());
        if module.preserve_external_request_id == Some(false) || !h.contains_key(&X_REQUEST_ID) {
            let id = hdr::new_request_id();
            if self.settings.access_log.is_some() {
                ex.request_id = Some(id.clone());
            }
            h.insert(X_REQUEST_ID.clone(), id);
        }
        ex.trace_id = Some(ex.trace.propagate(h));
        h.insert(header::HOST, authority.clone());
    }

    /// Whether a request counts as secure for its Host's insecure action: the connection's own
    /// scheme, unless hops in front are trusted (`--xff-trusted-hops` >= 1) and one of them sent
    /// `X-Forwarded-Proto` (Envoy's rule under Emissary's default XFP security model).
    fn is_secure(&self, req: &Request<Incoming>, conn: ConnInfo) -> bool {
        if self.settings.xff_trusted_hops > 0 {
            if let Some(v) = req.headers().get(&X_FORWARDED_PROTO) {
                return v.as_bytes().eq_ignore_ascii_case(b"https");
            }
        }
        conn.tls
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

    // One call site; a struct for these would only be unpacked again.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        snap: &Snapshot,
        prep: &Prepared,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        upstream_pq: PathAndQuery,
        upgrade: Option<HeaderValue>,
        ex: &mut Exchange,
        shadow: Option<&Prepared>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let client_upgrade = upgrade.as_ref().map(|_| {
            (
                hyper::upgrade::on(&mut req),
                req.extensions_mut().remove::<ConnHold>(),
            )
        });
        let (mut parts, body) = req.into_parts();
        parts
            .extensions
            .insert(super::balance::ClientIp(conn.remote.ip()));
        // Envoy's SANITIZE_SET: a client's own XFCC never reaches the upstream; the verified
        // client certificate of the connection does.
        parts.headers.remove(&X_FORWARDED_CLIENT_CERT);
        if let Some(c) = parts.extensions.get::<ClientCert>() {
            parts
                .headers
                .insert(X_FORWARDED_CLIENT_CERT.clone(), c.0.clone());
        }
        let h = &mut parts.headers;
        if let Some(rewritten) = &prep.host_header {
            // HTTP/2 upstreams get it as `:authority` (see `retry::send_once`).
            h.insert(header::HOST, rewritten.clone());
        }
        let ctx = hdr::VarContext {
            peer: conn.remote,
            protocol: if parts.version == Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
        };
        hdr::edit(h, &prep.remove_request, &prep.add_request, &ctx, None);

        let replayable = prep.retry.is_some() || shadow.is_some();
        let limit = match (
            self.settings.limits.max_body_bytes,
            snap.graph.settings.max_request_body_bytes,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let body = match parts.extensions.remove::<crate::guard::ReadAhead>() {
            Some(ahead) => super::body::ReqBody::read_ahead(ahead, body, limit)
                .map_err(|_| ProxyError::BodyTooLarge)?,
            None => super::retry::request_body(body, replayable, limit).await?,
        };
        if let Some(sh) = shadow {
            self.shadows.copy(
                sh,
                &parts,
                &body,
                &upstream_pq,
                ex.attempts.trace.as_deref(),
            );
        }
        let mut resp =
            super::retry::send_upstream(prep, parts, body, upstream_pq, &mut ex.attempts).await?;
        let switched = match client_upgrade {
            Some((down, hold)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(down, up, hold, prep.tunnel_idle));
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
            &ctx,
            None,
        );
        if self.settings.debug_headers {
            parts
                .headers
                .insert(hdr::X_LEGATE_ROUTE.clone(), prep.label.clone());
            parts
                .headers
                .insert(hdr::X_LEGATE_REVISION.clone(), snap.revision.clone());
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Copy bytes both ways between an upgraded client connection and upstream connection, until
/// either side closes or no byte has passed either way for `idle`.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _hold: Option<ConnHold>,
    idle: Duration,
) {
    let (d, u) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let seen = Arc::new(super::server::LastSeen::new());
    let mut d = Watched(hyper_util::rt::TokioIo::new(d), seen.clone());
    let mut u = Watched(hyper_util::rt::TokioIo::new(u), seen.clone());
    let copy = tokio::io::copy_bidirectional(&mut d, &mut u);
    tokio::pin!(copy);
    let mut check = Box::pin(tokio::time::sleep(idle));
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
                return;
            }
            _ = &mut check => match seen.idle_deadline(idle) {
                None => {
                    tracing::debug!(idle_ms = idle.as_millis() as u64, "upgraded connection idle: closed");
                    return;
                }
                Some(at) => check.as_mut().reset(at),
            }
        }
    }
}

/// One side of a tunnel, noting every read that brought bytes.
struct Watched<T>(T, Arc<super::server::LastSeen>);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.1.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
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
