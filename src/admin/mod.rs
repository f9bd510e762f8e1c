//! Admin API: reconciler status, history, manual sync, pin/unpin, webhook triggers, and the
//! web dashboard under `/ui/` (static files embedded in the binary, see [`ui`]).
//!
//! Owns: HTTP handlers over a [`reconcile::Handle`]. Must not change the graph itself: every
//! write goes through the reconciler. Webhook bodies are authenticated before anything else and
//! never parsed: a valid hook only asks for a fetch, the content comes from the source.

pub mod hooks;
mod ui;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;

use crate::reconcile::{self, Outcome, PassResult};

pub use hooks::{HookKind, HookSecret, MAX_HOOK_BODY};

/// What the admin handlers need.
#[derive(Clone)]
pub struct AdminState {
    pub reconciler: reconcile::Handle,
    /// Webhook secret; hooks answer 404 without one.
    pub hook_secret: Option<Arc<HookSecret>>,
    /// The graph the proxy serves now, for `/api/routes` and `/api/routes/explain`.
    pub graph: Option<GraphView>,
    /// Bearer token required for every mutating call (`POST /api/...`); `None`: not required
    /// (only allowed while the admin listener is on loopback).
    pub token: Option<Arc<String>>,
    /// The proxy's metrics, for `GET /metrics`; 404 without them.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Recent per-route traffic for the dashboard (`GET /api/traffic`); empty without it.
    pub recent: Option<Arc<crate::metrics::Recent>>,
}

/// Reads the live graph.
pub type GraphView = Arc<dyn Fn() -> Arc<crate::routes::Graph> + Send + Sync>;

/// `GET /api/routes/explain?method=&host=&path=&header=name:value&query=`: which Mapping would
/// serve the request, and why.
fn explain(g: &crate::routes::Graph, query: &str) -> serde_json::Value {
    use crate::routes::describe::{describe_action, describe_match, why_not};
    let mut method = "GET".to_string();
    let mut host = "localhost".to_string();
    let mut path = "/".to_string();
    let mut q: Option<String> = None;
    let mut headers = http::HeaderMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "method" => method = v.to_ascii_uppercase(),
            "host" => host = v.to_ascii_lowercase(),
            "path" => path = v,
            "query" => q = Some(v),
            "header" => {
                if let Some((n, val)) = v.split_once(':') {
                    if let (Ok(n), Ok(val)) = (
                        http::HeaderName::from_bytes(n.trim().as_bytes()),
                        http::HeaderValue::from_str(val.trim()),
                    ) {
                        headers.append(n, val);
                    }
                }
            }
            _ => {}
        }
    }
    // The port is part of the match, as in the proxy (which may strip the listener's own).
    let host_name = crate::routes::route_authority(&host, None).into_owned();
    // The proxy's normalizer: explain routes what the gateway would route.
    let normalized = match crate::routes::path::normalize(&path, g.normalize_options()) {
        Ok(n) => n.path.into_owned(),
        Err(crate::routes::path::PathError::NotAbsolute) => {
            return serde_json::json!({"matched": false, "answer": "404 no route (the path does not start with /)"})
        }
        Err(e) => {
            return serde_json::json!({"matched": false, "answer": format!("400 bad request: {e}")})
        }
    };
    let path = normalized;
    let head = crate::routes::RequestHead {
        host: &host_name,
        method: &method,
        path: &path,
        query: q.as_deref(),
        headers: &headers,
    };
    let via = match g.host_for(&host_name) {
        Some(h) => {
            serde_json::json!({"host": format!("{}/{}", h.namespace, h.name), "hostname": h.hostname.to_string(), "insecure": format!("{:?}", h.insecure)})
        }
        None if g.hosts.is_empty() => serde_json::json!(
            "no Host is defined: the default Host (`*`) serves the Mappings that have a hostname"
        ),
        None => serde_json::json!("no Host matches this authority: 404"),
    };
    let found = g.lookup(&head);
    // Positions count from 1 within the table, as `legate routes` numbers them; every group
    // before the winner (all of them when none wins) says why it lost.
    let table = g.table_for(&host_name).map(|t| &g.tables[t].groups[..]);
    let mut lost = Vec::new();
    let mut position = None;
    for (n, &gi) in table.unwrap_or(&[]).iter().enumerate() {
        if found.as_ref().is_some_and(|m| m.group_index == gi) {
            position = Some(n + 1);
            break;
        }
        if lost.len() < MAX_EXPLAINED {
            lost.push(serde_json::json!({
                "position": n + 1,
                "match": describe_match(g, gi),
                "mappings": g.groups[gi].shares().iter().map(|(id, _)| {
                    let r = g.route(*id);
                    format!("{}/{}", r.namespace, r.name)
                }).collect::<Vec<_>>(),
                "lost": why_not(g, gi, &head).unwrap_or_else(|| "matches, but a group before it won".into()),
            }));
        }
    }
    match found {
        None => {
            serde_json::json!({"matched": false, "table": via, "answer": "404 no route", "candidates": lost})
        }
        Some(m) => serde_json::json!({
            "matched": true,
            "path": path,
            "table": via,
            "match": describe_match(g, m.group_index),
            "position": position,
            "candidates": lost,
            "members": m.group.shares().iter().map(|(id, share)| {
                let r = g.route(*id);
                serde_json::json!({
                    "mapping": format!("{}/{}", r.namespace, r.name),
                    "source": r.source,
                    "weight": share,
                    "action": describe_action(&r.action),
                    "upstream_path": r.upstream_path(&path, q.as_deref()),
                })
            }).collect::<Vec<_>>(),
        }),
    }
}

/// Earlier candidates an explanation lists at most.
const MAX_EXPLAINED: usize = 100;

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `req` carries `Authorization: Bearer <token>` (constant-time comparison).
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.as_bytes().ct_eq(token.as_bytes()).into())
}

/// Route one admin request: `GET /api/status`, `GET /api/revisions`, `POST /api/sync`,
/// `POST /api/pin/{rev}`, `POST /api/unpin`, `POST /hooks/{github,gitlab,generic}`.
pub async fn handle<B>(req: Request<B>, state: &AdminState) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(kind) = path.strip_prefix("/hooks/") {
        return hooks::handle(kind, req, state).await;
    }
    match (&method, path.as_str()) {
        // Open to probes and scrapers even when a token is configured.
        // Emissary's probe paths, so a migrated Deployment's probes keep working.
        (&Method::GET, "/healthz" | "/ambassador/v0/check_alive") => {
            return text(StatusCode::OK, "ok\n")
        }
        (&Method::GET, "/metrics") => return metrics(state),
        (&Method::GET, "/readyz" | "/ambassador/v0/check_ready") => {
            // Ready once a graph serves, in every serving state (verifying, degraded...);
            // not ready while draining after SIGTERM, so load balancers stop sending.
            let st = state.reconciler.status();
            return if st.draining {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if st.applied.is_some() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no revision serves yet\n")
            };
        }
        _ => {}
    }
    if method == Method::GET {
        if let Some(r) = ui::serve(&path, &req) {
            return r;
        }
    }
    if method == Method::POST {
        if let Err(why) = same_origin(&req, state.token.is_some()) {
            return error(StatusCode::FORBIDDEN, &why);
        }
        if let Some(t) = &state.token {
            if !authorized(&req, t) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "this call needs `Authorization: Bearer <admin token>`",
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
    }
    match (method, path.as_str()) {
        (Method::GET, "/api/status") => {
            let mut st = serde_json::to_value(state.reconciler.status()).unwrap_or_default();
            if let Some(o) = st.as_object_mut() {
                // Writes under --cache-dir failing (a full disk): restarts would serve an older
                // revision until this clears.
                o.insert(
                    "cache_error".into(),
                    crate::source::dir::cache_failure().into(),
                );
            }
            json(StatusCode::OK, &st)
        }
        (Method::GET, "/api/revisions") => json(StatusCode::OK, &state.reconciler.history()),
        (Method::GET, "/api/routes") => match &state.graph {
            Some(g) => json(
                StatusCode::OK,
                &crate::routes::describe::route_table_json(&g()),
            ),
            None => error(StatusCode::NOT_FOUND, "no route graph on this listener"),
        },
        (Method::GET, "/api/routes/explain") => match &state.graph {
            Some(g) => json(
                StatusCode::OK,
                &explain(&g(), req.uri().query().unwrap_or("")),
            ),
            None => error(StatusCode::NOT_FOUND, "no route graph on this listener"),
        },
        (Method::GET, "/api/traffic") => traffic(state, req.uri().query().unwrap_or("")),
        (Method::GET, "/api/certificates") => json(
            StatusCode::OK,
            &state
                .metrics
                .as_ref()
                .map(|m| m.certificates())
                .unwrap_or_default(),
        ),
        (Method::GET, p) if p.starts_with("/api/revisions/") && p.ends_with("/diff") => {
            let rev = &p["/api/revisions/".len()..p.len() - "/diff".len()];
            revision_diff(state, rev)
        }
        (Method::POST, "/api/sync") => pass(state.reconciler.sync().await),
        (Method::POST, "/api/unpin") => pass(state.reconciler.unpin().await),
        (Method::POST, p) if p.starts_with("/api/pin/") => {
            let rev = &p["/api/pin/".len()..];
            if rev.is_empty() || rev.len() > 128 || !rev.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "a revision id is hex or alphanumeric",
                );
            }
            pass(state.reconciler.pin(rev).await)
        }
        (_, "/api/status" | "/api/revisions" | "/api/sync" | "/api/unpin") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// A browser sends `Origin` with every cross-site POST: a mutating call from a page of another
/// origin is refused even when it carries the token (a stolen token aside, this stops a page
/// the operator visits from driving the admin API). Tools that send no `Origin` (curl, the
/// CLI) are not affected.
///
/// Without a token (loopback only), the Host must also be a loopback name: DNS rebinding
/// would otherwise make a hostile page same-origin.
fn same_origin<B>(req: &Request<B>, token_set: bool) -> Result<(), String> {
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return Ok(());
    };
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    if host.is_empty() || origin != format!("http://{host}") {
        return Err(format!(
            "cross-origin call refused: Origin `{origin}` is not this admin listener (http://{host})"
        ));
    }
    // Without a token, a page whose name was rebound to 127.0.0.1 would be same-origin: only
    // loopback names count then.
    let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if token_set || loopback {
        Ok(())
    } else {
        Err(format!(
            "refused: without an admin token, the dashboard's changes are taken only from a loopback name (not `{host}`)"
        ))
    }
}

/// `GET /api/traffic?minutes=N` (1 to 15, default 5): request rate, error ratio and p99 per
/// route over the last minutes, from the gateway's own counters, and the upstreams' address
/// health.
fn traffic(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let minutes = query
        .split('&')
        .find_map(|p| p.strip_prefix("minutes="))
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(5)
        .clamp(1, 15);
    let traffic = state
        .recent
        .as_ref()
        .map(|r| r.traffic(std::time::Duration::from_secs(minutes * 60)));
    let upstreams = state
        .metrics
        .as_ref()
        .map(|m| m.upstream_health())
        .unwrap_or_default();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "minutes": minutes,
            "seconds": traffic.as_ref().map(|t| t.seconds),
            "routes": traffic.map(|t| t.routes).unwrap_or_default(),
            "upstreams": upstreams,
        }),
    )
}

/// `GET /api/revisions/{rev}/diff`: the route diff of a revision against the one swapped in
/// before it, as `legate diff` computes it (text and JSON).
fn revision_diff(state: &AdminState, rev: &str) -> Response<Full<Bytes>> {
    if rev.is_empty() || rev.len() > 128 || !rev.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return error(
            StatusCode::BAD_REQUEST,
            "a revision id is hex or alphanumeric",
        );
    }
    match state.reconciler.diff(rev) {
        Ok(d) => json(
            StatusCode::OK,
            &serde_json::json!({
                "revision": rev,
                "base": d.base,
                "text": crate::diff::render::text(&d.diff),
                "diff": d.diff,
            }),
        ),
        Err(e) => error(StatusCode::NOT_FOUND, &e),
    }
}

/// Open admin connections at most; more are closed at accept (the proxy's descriptor budget
/// keeps this many back for them).
pub const MAX_CONNECTIONS: usize = 64;
/// Time an admin client has to send a request head, from accept.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Serve [`handle`] on `listener` until the task is dropped (for tests and a bare admin port).
/// An accept error (EMFILE, say) is logged and retried after a pause, never the end of the
/// listener: probes, metrics and the API must come back with the descriptors.
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = std::time::Duration::from_millis(10);
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin connection refused: {MAX_CONNECTIONS} open");
            continue;
        };
        tokio::spawn(serve_one(stream, state.clone(), slot));
    }
}

/// One admin connection: one request (no keep-alive), whose head must arrive within
/// [`HEADER_TIMEOUT`] from accept.
async fn serve_one(
    stream: tokio::net::TcpStream,
    state: AdminState,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = started.clone();
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        seen.store(true, std::sync::atomic::Ordering::Relaxed);
        async move { Ok::<_, Infallible>(handle(req, &state).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false);
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = tokio::time::sleep(HEADER_TIMEOUT) => {
            // A request in progress finishes; a connection that never sent one is dropped.
            if started.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = conn.await;
            }
        }
    }
}

/// `GET /metrics`: Prometheus text format.
fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(m) = &state.metrics else {
        return text(StatusCode::NOT_FOUND, "no metrics on this listener\n");
    };
    let view = crate::metrics::ReconcileView::from(&state.reconciler.status());
    let mut text = m.render(Some(&view));
    let failing = u8::from(crate::source::dir::cache_failure().is_some());
    text.push_str(&format!(
        "# HELP legate_cache_write_failing 1 while writes under --cache-dir fail (a full disk).\n\
         # TYPE legate_cache_write_failing gauge\nlegate_cache_write_failing {failing}\n"
    ));
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// The answer to sync, pin and unpin, given at swap time: 202 for "swapped in, verifying"
/// (poll `/api/revisions` or use `legate sync --wait` for the verdict), 200 for a revision
/// verified at once (nothing changed, or verification off) or already served, 409 for a
/// rejection, 502 when the source failed.
fn pass(r: PassResult) -> Response<Full<Bytes>> {
    let code = match &r {
        PassResult::Unchanged { .. } => StatusCode::OK,
        PassResult::Recorded { entry } if entry.outcome == Outcome::Verifying => {
            StatusCode::ACCEPTED
        }
        PassResult::Recorded { entry } if entry.outcome == Outcome::Applied => StatusCode::OK,
        PassResult::Recorded { .. } => StatusCode::CONFLICT,
        PassResult::SourceFailed { .. } => StatusCode::BAD_GATEWAY,
    };
    json(code, &r)
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r
}

pub(crate) fn json<T: serde::Serialize>(code: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(code, &serde_json::json!({ "error": msg }))
}
