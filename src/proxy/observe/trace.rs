//! W3C Trace Context (`traceparent`) propagation to upstreams.
//!
//! The gateway is one hop of a trace: a valid incoming `traceparent` is forwarded with the same
//! trace id and flags and a new parent (span) id; an absent or malformed one starts a new trace
//! (random trace and span ids, sampled with `--otlp-sample-ratio`), and a `tracestate` that came
//! with a malformed parent is dropped, as the spec asks. The sampling is parent-based: a client's
//! sampled flag is kept as it came. [`Context`] is the hop's view of its trace; the spans
//! themselves are recorded (when sampled and exported) in `spans`.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::proxy::headers::rand_u64;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A trace id (16 bytes, never all zero).
pub type TraceId = [u8; 16];

/// The trace id of the request's one valid `traceparent`, if it has one.
pub fn incoming(h: &HeaderMap) -> Option<TraceId> {
    valid_full(h).map(|(id, _, _)| id)
}

/// Trace id, parent span id and flags of the one valid `traceparent` (two headers are
/// invalid).
fn valid_full(h: &HeaderMap) -> Option<(TraceId, [u8; 8], u8)> {
    let mut all = h.get_all(&TRACEPARENT).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => parse(v.as_bytes()),
        _ => None,
    }
}

/// This hop of a trace: the trace, the client's span (when continued), the flags, and the
/// gateway's own (server) span id.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub trace_id: TraceId,
    /// The client's span id, from a valid incoming `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// The gateway's span for this request.
    pub span_id: [u8; 8],
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
}

impl Context {
    /// The request's trace: continued from its one valid `traceparent` (keeping the client's
    /// sampled flag), or a new one sampled with probability `ratio`.
    pub fn read(h: &HeaderMap, ratio: f64) -> Context {
        let (trace_id, parent, flags) = match valid_full(h) {
            Some((id, parent, flags)) => (id, Some(parent), flags),
            None => {
                let mut id = [0u8; 16];
                while id == [0; 16] {
                    id[..8].copy_from_slice(&rand_u64().to_be_bytes());
                    id[8..].copy_from_slice(&rand_u64().to_be_bytes());
                }
                (id, None, u8::from(sampled(ratio)))
            }
        };
        Context {
            trace_id,
            parent,
            span_id: new_span_id(),
            flags,
        }
    }

    /// Whether the trace is sampled (its spans are recorded).
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }

    /// Set the upstream's `traceparent`: this trace, with `span` as the parent. A `tracestate`
    /// goes with a continued trace only.
    pub fn write(&self, h: &mut HeaderMap, span: [u8; 8]) {
        if self.parent.is_none() {
            h.remove(&TRACESTATE);
        }
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex(&span, &mut out[36..52]);
        out[52] = b'-';
        hex(&[self.flags], &mut out[53..55]);
        if let Ok(v) = HeaderValue::from_bytes(&out) {
            h.insert(TRACEPARENT.clone(), v);
        }
    }

    /// Rewrite the request's `traceparent` for the upstream (the gateway's span as the parent);
    /// returns the trace id sent.
    pub fn propagate(&self, h: &mut HeaderMap) -> TraceId {
        self.write(h, self.span_id);
        self.trace_id
    }
}

/// A random span id (never all zero).
pub fn new_span_id() -> [u8; 8] {
    let mut span = [0u8; 8];
    while span == [0; 8] {
        span = rand_u64().to_be_bytes();
    }
    span
}

/// Rewrite the request's `traceparent` for the upstream; returns the trace id sent.
pub fn propagate(h: &mut HeaderMap, sample_ratio: f64) -> TraceId {
    Context::read(h, sample_ratio).propagate(h)
}

/// The trace id, parent id and flags of a valid `traceparent` (version 00, or a later version's
/// first four fields, as the spec allows).
fn parse(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace = unhex::<16>(&v[3..35])?;
    let parent = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    // Version 00 defines only the sampled bit.
    Some((trace, parent, flags & 0x01))
}

/// Lowercase hex only, as the spec requires.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = d(s[2 * i])? << 4 | d(s[2 * i + 1])?;
    }
    Some(out)
}

/// Lowercase hex of `bytes` into `out` (twice as long).
pub fn hex(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0x0f) as usize];
    }
}

/// Whether a new trace is sampled: true with probability `ratio`.
fn sampled(ratio: f64) -> bool {
    if ratio <= 0.0 {
        return false;
    }
    // 53 random bits as a uniform float in [0, 1).
    ((rand_u64() >> 11) as f64 / (1u64 << 53) as f64) < ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(incoming: &[&str], ratio: f64) -> String {
        let mut h = HeaderMap::new();
        for v in incoming {
            h.append(TRACEPARENT.clone(), HeaderValue::from_str(v).unwrap());
        }
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("k=v"));
        propagate(&mut h, ratio);
        assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
        let out = h.get(&TRACEPARENT).unwrap().to_str().unwrap().to_string();
        assert!(parse(out.as_bytes()).is_some(), "{out}");
        out
    }

    const GIVEN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn keeps_trace_and_flags_with_a_new_parent() {
        let out = run(&[GIVEN], 0.0);
        assert_eq!(&out[..36], &GIVEN[..36]);
        assert_ne!(&out[36..52], &GIVEN[36..52]);
        assert_eq!(&out[52..], "-01");
    }

    #[test]
    fn starts_a_trace_when_absent_or_invalid() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let out = run(&[bad], 0.0);
            assert_ne!(&out[3..35], &GIVEN[3..35], "{bad}");
            assert!(out.ends_with("-00"), "{out}");
        }
        // Two traceparent headers are invalid too.
        let out = run(&[GIVEN, GIVEN], 0.0);
        assert_ne!(&out[3..35], &GIVEN[3..35]);
        assert_ne!(run(&[], 0.0)[3..35], run(&[], 0.0)[3..35]);
    }

    #[test]
    fn accepts_later_versions_and_samples_by_ratio() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-more";
        let out = run(&[later], 0.0);
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert!(run(&[], 1.0).ends_with("-01"));
        assert!(run(&[], 0.0).ends_with("-00"));
    }
}
