//! The spans of one sampled exchange, for the OTLP exporter: the server span (the request as
//! the gateway answered it) and a client span per upstream attempt and shadow copy, with
//! OpenTelemetry's HTTP attribute names.
//!
//! Recorded only when the trace is sampled and an exporter target is set; otherwise nothing
//! here runs. Each attempt sends the upstream its own client span as the `traceparent` parent,
//! so an upstream's spans hang under the attempt that reached it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::SystemTime;

use http::uri::Authority;
use http::{HeaderMap, Method};
use tokio::time::Instant;

use super::trace::{new_span_id, Context};
use super::View;
use crate::otlp::{Exporter, Kind, Span};
use crate::proxy::respond::ProxyError;

/// What the server span needs from the request's arrival.
pub(crate) struct Recording {
    start: SystemTime,
    began: Instant,
    method: Method,
    path: String,
    client: SocketAddr,
    tags: Vec<(Cow<'static, str>, String)>,
}

/// What each upstream attempt needs to record its client span; kept with the attempts.
#[derive(Debug)]
pub(crate) struct AttemptTrace {
    pub ctx: Context,
    pub exporter: Exporter,
    /// Client spans of the attempts made so far.
    pub spans: Vec<Span>,
}

/// An attempt under way: its span id and when it started.
pub(crate) struct Begun {
    span_id: [u8; 8],
    start: SystemTime,
    began: Instant,
}

/// Start recording a request, if its trace is sampled and spans are exported.
pub(crate) fn start<B>(
    req: &http::Request<B>,
    snap: &dyn View,
    ctx: &Context,
    exporter: Option<&Exporter>,
    client: SocketAddr,
) -> Option<(Box<Recording>, Box<AttemptTrace>)> {
    let exporter = exporter.filter(|x| ctx.sampled() && x.enabled())?;
    let tags = snap
        .tracing()
        .map(|t| tag_headers(req.headers(), &t.tag_headers))
        .unwrap_or_default();
    let rec = Recording {
        start: SystemTime::now(),
        began: Instant::now(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        client,
        tags,
    };
    let attempts = AttemptTrace {
        ctx: *ctx,
        exporter: exporter.clone(),
        spans: Vec::new(),
    };
    Some((Box::new(rec), Box::new(attempts)))
}

/// `http.request.header.<name>` attributes of the TracingService's `tag_headers`.
fn tag_headers(h: &HeaderMap, names: &[String]) -> Vec<(Cow<'static, str>, String)> {
    let mut out = Vec::new();
    for n in names {
        let vals: Vec<&str> = h
            .get_all(n.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !vals.is_empty() {
            out.push((
                Cow::Owned(format!("http.request.header.{n}")),
                vals.join(","),
            ));
        }
    }
    out
}

impl Begun {
    /// Begin a client span and name it as the upstream's parent in `h`.
    pub(crate) fn new(ctx: &Context, h: &mut HeaderMap) -> Begun {
        let span_id = new_span_id();
        ctx.write(h, span_id);
        Begun {
            span_id,
            start: SystemTime::now(),
            began: Instant::now(),
        }
    }

    /// The finished client span of an attempt (`resend`: attempts before it).
    pub(crate) fn finish(
        self,
        ctx: &Context,
        method: &Method,
        upstream: &Authority,
        peer: Option<SocketAddr>,
        resend: u32,
        outcome: Result<u16, &ProxyError>,
    ) -> Span {
        let mut s = Span {
            trace_id: ctx.trace_id,
            span_id: self.span_id,
            parent: Some(ctx.span_id),
            flags: ctx.flags,
            kind: Kind::Client,
            name: method.as_str().to_string(),
            start: self.start,
            end: self.start + self.began.elapsed(),
            error: None,
            attributes: Vec::with_capacity(8),
        };
        s.str("http.request.method", method.as_str());
        s.str("server.address", upstream.host());
        if let Some(p) = upstream.port_u16() {
            s.int("server.port", i64::from(p));
        }
        if let Some(p) = peer {
            s.str("network.peer.address", p.ip().to_string());
            s.int("network.peer.port", i64::from(p.port()));
        }
        if resend > 0 {
            s.int("http.request.resend_count", i64::from(resend));
        }
        match outcome {
            Ok(status) => {
                s.int("http.response.status_code", i64::from(status));
                if status >= 400 {
                    s.error = Some(status.to_string());
                }
            }
            Err(e) => s.error = Some(error_type(e).to_string()),
        }
        s
    }
}

impl AttemptTrace {
    /// Begin the client span of the next attempt.
    pub(crate) fn begin(&self, h: &mut HeaderMap) -> Begun {
        Begun::new(&self.ctx, h)
    }
}

/// `error.type` of an attempt that got no response.
fn error_type(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::Connect(_) => "connect",
        ProxyError::Timeout => "timeout",
        ProxyError::Overloaded => "overloaded",
        _ => "upstream",
    }
}

/// Finish the exchange: its client spans and its server span go to the exporter.
pub(crate) fn finish(
    snap: &dyn View,
    rec: Recording,
    attempts: AttemptTrace,
    route: Option<usize>,
    status: http::StatusCode,
) {
    let AttemptTrace {
        ctx,
        exporter,
        spans,
    } = attempts;
    for s in spans {
        exporter.submit(s);
    }
    let path = route.and_then(|i| snap.route_path(i));
    let method = rec.method.as_str();
    let name = match path {
        Some(p) => format!("{method} {p}"),
        None => method.to_string(),
    };
    let mut s = Span {
        trace_id: ctx.trace_id,
        span_id: ctx.span_id,
        parent: ctx.parent,
        flags: ctx.flags,
        kind: Kind::Server,
        name,
        start: rec.start,
        end: rec.start + rec.began.elapsed(),
        error: status
            .is_server_error()
            .then(|| status.as_u16().to_string()),
        attributes: Vec::with_capacity(8 + rec.tags.len()),
    };
    s.str("http.request.method", method);
    s.str("url.path", rec.path);
    s.str("client.address", rec.client.ip().to_string());
    s.int("http.response.status_code", i64::from(status.as_u16()));
    if let Some(p) = path {
        s.str("http.route", p);
    }
    if let Some((ns, name)) = route.and_then(|i| snap.route_name(i)) {
        s.str("legate.mapping", format!("{ns}/{name}"));
    }
    s.str("legate.revision", snap.revision().to_str().unwrap_or(""));
    for (k, v) in rec.tags {
        s.str(k, v);
    }
    exporter.submit(s);
}
