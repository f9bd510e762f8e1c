//! OTLP trace export: the spans the request path records (a server span per request, a client
//! span per upstream attempt and shadow copy) leave the gateway as OTLP/HTTP protobuf.
//!
//! Owns the span record ([`Span`]), its encoding into `opentelemetry-proto`'s prost messages
//! (`encode`), and the exporter ([`Exporter`]): a bounded queue drained by one background task
//! that batches and posts with the outbound client. Must not decide sampling (the request path
//! records only sampled traces, `proxy::observe::trace` decides) nor ever make a request wait:
//! a full queue drops the span and counts it.

mod encode;
mod export;

use std::borrow::Cow;
use std::time::SystemTime;

pub use export::{ExportSettings, Exporter, Target, QUEUE_SPANS};

/// A trace id (16 bytes) and a span id (8 bytes), as on the wire.
pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Whether the span is the gateway answering (server) or calling an upstream (client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span, plain values only.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The client's span for a server span (none when the trace starts here); the server span
    /// for a client span.
    pub parent: Option<SpanId>,
    /// The W3C trace flags (bit 0: sampled).
    pub flags: u8,
    pub kind: Kind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Set for a failed exchange (OpenTelemetry's HTTP rules: 5xx on a server span, 4xx and
    /// 5xx or no response on a client span), with the `error.type`.
    pub error: Option<String>,
    pub attributes: Vec<(Cow<'static, str>, Value)>,
}

impl Span {
    /// Add a string attribute.
    pub fn str(&mut self, key: impl Into<Cow<'static, str>>, v: impl Into<String>) {
        self.attributes.push((key.into(), Value::Str(v.into())));
    }

    /// Add an integer attribute.
    pub fn int(&mut self, key: &'static str, v: i64) {
        self.attributes.push((key.into(), Value::Int(v)));
    }
}
