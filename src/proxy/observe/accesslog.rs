//! The access log: one JSON line per request, written off the request path.
//!
//! A request only fills a [`Line`] (reference-counted clones, no formatting) and offers it to a
//! bounded channel when its response body ends; a writer task formats and writes. When the
//! writer falls behind, lines are dropped and counted (`legate_access_log_dropped_total`): a
//! slow disk or a blocked stdout never holds a request up.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use super::trace::TraceId;
use super::{Attempts, View};
use crate::metrics::Metrics;
use crate::proxy::body::RespBody;

/// Lines buffered between requests and the writer.
const CAPACITY: usize = 8192;

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// `--access-log`: `off` (none), `-` or `stdout`, or a file path (appended to).
    pub fn parse(v: &str) -> Option<Sink> {
        match v {
            "off" | "" => None,
            "-" | "stdout" => Some(Sink::Stdout),
            p => Some(Sink::File(PathBuf::from(p))),
        }
    }
}

/// The request side of the access log. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Line>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

impl AccessLog {
    /// Open the sink and start the writer, a thread of its own: writes block, and a blocked
    /// stdout must not take a runtime worker with it.
    pub fn start(sink: Sink) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = mpsc::channel(CAPACITY);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(AccessLog { tx })
    }

    /// Offer a finished line; drops (and counts) it when the writer is behind.
    fn send(&self, line: Line, metrics: &Metrics) {
        if self.tx.try_send(line).is_err() {
            metrics.access_log_dropped();
        }
    }
}

/// What one request's log line is made of, formatted by the writer.
pub struct Line {
    started: Instant,
    took: Duration,
    method: Method,
    /// Host, path and the client's request id, copied: a clone would share hyper's read buffer,
    /// which then cannot be reused for the connection's next request and is allocated anew.
    text: Vec<u8>,
    host: Option<Span>,
    path: Span,
    client_id: Option<Span>,
    user_agent: Option<Span>,
    /// The downstream peer (the TCP peer, not `X-Forwarded-For`).
    client: SocketAddr,
    /// Why the gateway answered itself instead of relaying an upstream response.
    pub failure: Option<String>,
    /// The request id the gateway generated (else the client's is logged).
    pub request_id: Option<HeaderValue>,
    pub trace_id: Option<TraceId>,
    pub route: Option<usize>,
    pub(crate) attempts: Attempts,
    snap: Arc<dyn View>,
    status: u16,
    bytes: u64,
}

impl Line {
    /// Capture the request head before the request is consumed (`started`: when it arrived).
    pub(crate) fn start<B, V: View>(
        req: &http::Request<B>,
        snap: &Arc<V>,
        started: Instant,
        client: SocketAddr,
    ) -> Line {
        let h = req.headers();
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => h.get(http::header::HOST).map(HeaderValue::as_bytes),
        };
        let path = req.uri().path().as_bytes();
        let client_id = h
            .get(&crate::proxy::headers::X_REQUEST_ID)
            .map(HeaderValue::as_bytes);
        let user_agent = h.get(http::header::USER_AGENT).map(HeaderValue::as_bytes);
        let mut text = Vec::with_capacity(
            host.map_or(0, <[u8]>::len)
                + path.len()
                + client_id.map_or(0, <[u8]>::len)
                + user_agent.map_or(0, <[u8]>::len),
        );
        let host = host.map(|b| Span::copy(&mut text, b));
        let path = Span::copy(&mut text, path);
        let client_id = client_id.map(|b| Span::copy(&mut text, b));
        let user_agent = user_agent.map(|b| Span::copy(&mut text, b));
        Line {
            started,
            took: Duration::ZERO,
            method: req.method().clone(),
            text,
            host,
            path,
            client_id,
            user_agent,
            client,
            failure: None,
            request_id: None,
            // A request that is never forwarded keeps the client's trace id, if any.
            trace_id: crate::proxy::observe::trace::incoming(req.headers()),
            route: None,
            attempts: Attempts::default(),
            snap: snap.clone() as Arc<dyn View>,
            status: 0,
            bytes: 0,
        }
    }

    /// Whether the client sent its own `x-request-id`.
    pub fn has_client_id(&self) -> bool {
        self.client_id.is_some()
    }

    /// Append the JSON line (hand-written, no `fmt`: the writer formats hundreds of thousands
    /// a second).
    fn write_json(&self, out: &mut Vec<u8>, clock: &mut Clock) {
        out.extend_from_slice(b"{\"time\":\"");
        clock.write(self.started, out);
        out.extend_from_slice(b"\",\"request_id\":");
        let id = match &self.request_id {
            Some(v) => Some(v.as_bytes()),
            None => self.client_id.map(|s| s.of(&self.text)),
        };
        opt_str(out, id);
        out.extend_from_slice(b",\"trace_id\":");
        match &self.trace_id {
            Some(id) => {
                let mut hex = [b'"'; 34];
                crate::proxy::observe::trace::hex(id, &mut hex[1..33]);
                out.extend_from_slice(&hex);
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"client\":");
        addr(out, Some(self.client));
        out.extend_from_slice(b",\"user_agent\":");
        opt_str(out, self.user_agent.map(|s| s.of(&self.text)));
        out.extend_from_slice(b",\"method\":");
        opt_str(out, Some(self.method.as_str().as_bytes()));
        out.extend_from_slice(b",\"host\":");
        opt_str(out, self.host.map(|s| s.of(&self.text)));
        out.extend_from_slice(b",\"path\":");
        opt_str(out, Some(self.path.of(&self.text)));
        out.extend_from_slice(b",\"status\":");
        int(out, u64::from(self.status));
        out.extend_from_slice(b",\"bytes\":");
        int(out, self.bytes);
        // Microseconds as a decimal of milliseconds: `1.234`.
        let us = self.took.as_micros().min(u128::from(u64::MAX)) as u64;
        out.extend_from_slice(b",\"duration_ms\":");
        int(out, us / 1000);
        out.push(b'.');
        let frac = us % 1000;
        out.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        out.extend_from_slice(b",\"upstream\":");
        let upstream = self.route.and_then(|i| self.snap.upstream(i));
        opt_str(out, upstream.map(str::as_bytes));
        out.extend_from_slice(b",\"upstream_addr\":");
        addr(out, self.attempts.peer);
        out.extend_from_slice(b",\"route\":");
        match self.route.and_then(|i| self.snap.route_name(i)) {
            Some((namespace, name)) => {
                out.push(b'"');
                escape_into(out, namespace.as_bytes());
                out.push(b'/');
                escape_into(out, name.as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"revision\":");
        opt_str(out, Some(self.snap.revision().as_bytes()));
        out.extend_from_slice(b",\"retries\":");
        int(out, u64::from(self.attempts.retries));
        out.extend_from_slice(b",\"error\":");
        opt_str(out, self.failure.as_deref().map(str::as_bytes));
        out.extend_from_slice(b"}\n");
    }

    #[cfg(test)]
    fn json(&self) -> serde_json::Value {
        let mut v = Vec::new();
        self.write_json(&mut v, &mut Clock::new());
        serde_json::from_slice(&v).unwrap()
    }
}

/// Where one string lies in [`Line`]'s `text`.
#[derive(Clone, Copy)]
struct Span(u32, u32);

impl Span {
    fn copy(text: &mut Vec<u8>, b: &[u8]) -> Span {
        let start = text.len();
        text.extend_from_slice(b);
        // Request heads are capped far below 4 GiB (`max_header_bytes`, `max_uri_bytes`).
        Span(start as u32, text.len() as u32)
    }

    fn of(self, text: &[u8]) -> &[u8] {
        text.get(self.0 as usize..self.1 as usize)
            .unwrap_or_default()
    }
}

/// The writer's wall clock. A line's time is when its request arrived, derived from its
/// `Instant` and a wall/monotonic pair read once per drain (so a request reads one clock, not
/// two). Lines of the same second share their `2006-01-02T15:04:05`.
struct Clock {
    wall: SystemTime,
    mono: Instant,
    secs: Option<u64>,
    text: Vec<u8>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            wall: SystemTime::now(),
            mono: Instant::now(),
            secs: None,
            text: Vec::new(),
        }
    }

    /// Read the clocks again (before a drain).
    fn sync(&mut self) {
        self.wall = SystemTime::now();
        self.mono = Instant::now();
    }

    /// Append the wall time of `at` as [`rfc3339`] does.
    fn write(&mut self, at: Instant, out: &mut Vec<u8>) {
        let ago = self.mono.saturating_duration_since(at);
        let t = self.wall.checked_sub(ago).unwrap_or(UNIX_EPOCH);
        self.write_wall(t, out);
    }

    fn write_wall(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.secs != Some(d.as_secs()) {
            self.text.clear();
            rfc3339(
                UNIX_EPOCH + Duration::from_secs(d.as_secs()),
                &mut self.text,
            );
            // Keep `...:05.`, drop `000Z`.
            self.text.truncate(self.text.len().saturating_sub(4));
            self.secs = Some(d.as_secs());
        }
        out.extend_from_slice(&self.text);
        let ms = d.subsec_millis();
        out.extend_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// A socket address as a JSON string (or `null`).
fn addr(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    match a {
        // An address has no character JSON must escape.
        Some(SocketAddr::V4(a)) => {
            out.push(b'"');
            for (i, o) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(out, u64::from(o));
            }
            out.push(b':');
            int(out, u64::from(a.port()));
            out.push(b'"');
        }
        Some(a) => {
            let _ = write!(out, "\"{a}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// A decimal integer, without `fmt`'s machinery (the writer formats a few per line).
fn int(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// A JSON string (or `null`); bytes that are not UTF-8 are replaced.
fn opt_str(out: &mut Vec<u8>, v: Option<&[u8]>) {
    let Some(v) = v else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    match std::str::from_utf8(v) {
        Ok(_) => escape_into(out, v),
        Err(_) => escape_into(out, String::from_utf8_lossy(v).as_bytes()),
    }
    out.push(b'"');
}

/// JSON string escaping of UTF-8 text (multi-byte sequences pass through).
fn escape_into(out: &mut Vec<u8>, v: &[u8]) {
    for &b in v {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                let _ = write!(out, "\\u{:04x}", b);
            }
            _ => out.push(b),
        }
    }
}

/// A response body that counts the bytes sent and logs the line when it ends (or is dropped
/// early because the client went away).
pub struct Counted {
    inner: RespBody,
    line: Option<Line>,
    logger: Arc<Logger>,
}

/// The access log and the metrics its drops are counted in, behind one pointer so a request
/// clones one `Arc` for both.
pub(crate) struct Logger {
    pub log: AccessLog,
    pub metrics: Arc<Metrics>,
}

impl Counted {
    pub(crate) fn new(
        inner: RespBody,
        mut line: Line,
        status: u16,
        logger: Arc<Logger>,
    ) -> Counted {
        line.status = status;
        Counted {
            inner,
            line: Some(line),
            logger,
        }
    }

    fn finish(&mut self) {
        if let Some(mut l) = self.line.take() {
            l.took = l.started.elapsed();
            self.logger.log.send(l, &self.logger.metrics);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = crate::proxy::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(l)) = (f.data_ref(), this.line.as_mut()) {
                    l.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long the writer sleeps between drains. Polling instead of waiting on the channel spares
/// every request a wake-up of the writer; the queue holds far more than a period's lines.
const PERIOD: Duration = Duration::from_millis(20);

/// The writer: format and write until every sender is gone.
fn write_lines(mut rx: mpsc::Receiver<Line>, mut out: Box<dyn Write + Send>) {
    use tokio::sync::mpsc::error::TryRecvError;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut clock = Clock::new();
    loop {
        clock.sync();
        let closed = loop {
            match rx.try_recv() {
                Ok(line) => {
                    line.write_json(&mut buf, &mut clock);
                    if buf.len() >= 64 * 1024 {
                        flush(&mut out, &mut buf);
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        flush(&mut out, &mut buf);
        if closed {
            return;
        }
        std::thread::sleep(PERIOD);
    }
}

fn flush(out: &mut Box<dyn Write + Send>, buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    if let Err(e) = out.write_all(buf).and_then(|()| out.flush()) {
        tracing::warn!(error = %e, "cannot write the access log");
    }
    buf.clear();
}

/// `2006-01-02T15:04:05.000Z`.
pub fn rfc3339(t: SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revision with no routes.
    struct Revision(HeaderValue, crate::reconcile::Evidence);

    impl View for Revision {
        fn revision(&self) -> &HeaderValue {
            &self.0
        }
        fn upstream(&self, _: usize) -> Option<&str> {
            None
        }
        fn route_name(&self, _: usize) -> Option<(&str, &str)> {
            None
        }
        fn stats(&self, _: usize) -> Option<&Arc<crate::metrics::RouteStats>> {
            None
        }
        fn evidence(&self) -> &crate::reconcile::Evidence {
            &self.1
        }
    }

    #[test]
    fn formats_utc_times() {
        let f = |t| {
            let mut v = Vec::new();
            rfc3339(t, &mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(f(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123);
        assert_eq!(f(t), "2024-02-29T23:59:59.123Z");
        let mut clock = Clock::new();
        let mut v = Vec::new();
        for ms in [1_709_251_199_123, 1_709_251_199_007, 1_709_251_200_450] {
            clock.write_wall(UNIX_EPOCH + Duration::from_millis(ms), &mut v);
            v.push(b' ');
        }
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "2024-02-29T23:59:59.123Z 2024-02-29T23:59:59.007Z 2024-03-01T00:00:00.450Z "
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, mut rx) = mpsc::channel(1);
        let log = AccessLog { tx };
        let metrics = Metrics::new();
        let snap = Arc::new(Revision(
            HeaderValue::from_static("abc"),
            Default::default(),
        ));
        let req = http::Request::get("http://h.test/p?q=secret")
            .header("user-agent", "curl/8.5")
            .body(())
            .unwrap();
        let logger = Arc::new(Logger {
            log,
            metrics: metrics.clone(),
        });
        for _ in 0..3 {
            let body = Counted::new(
                crate::proxy::body::full(Bytes::from_static(b"hi")),
                Line::start(
                    &req,
                    &snap,
                    Instant::now(),
                    "[2001:db8::1]:5000".parse().unwrap(),
                ),
                200,
                logger.clone(),
            );
            drop(body);
        }
        let mut line = rx.try_recv().unwrap();
        line.took = Duration::from_micros(12_034);
        line.trace_id = Some([0xab; 16]);
        line.attempts.retries = 3;
        line.attempts.peer = Some("10.0.0.7:8080".parse().unwrap());
        line.failure = Some("upstream connect failed: refused".into());
        let line = line.json();
        assert_eq!(line["client"], "[2001:db8::1]:5000");
        assert_eq!(line["user_agent"], "curl/8.5");
        assert_eq!(line["error"], "upstream connect failed: refused");
        assert_eq!(line["duration_ms"], 12.034);
        assert_eq!(line["trace_id"], "ab".repeat(16));
        assert_eq!(line["retries"], 3);
        assert_eq!(line["upstream_addr"], "10.0.0.7:8080");
        assert_eq!(line["bytes"], 0);
        assert_eq!(line["path"], "/p");
        assert_eq!(line["host"], "h.test");
        assert_eq!(line["status"], 200);
        assert_eq!(line["revision"], "abc");
        assert!(rx.try_recv().is_err());
        assert!(metrics
            .render(None)
            .contains("legate_access_log_dropped_total 2\n"));
    }

    #[test]
    fn escapes_strings() {
        let mut v = Vec::new();
        opt_str(&mut v, Some("a\"b\\c\nd\u{e9}".as_bytes()));
        opt_str(&mut v, Some(b"\xff"));
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "\"a\\\"b\\\\c\\u000ad\u{e9}\"\"\u{fffd}\""
        );
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!(Sink::parse("off"), None);
        assert_eq!(Sink::parse("-"), Some(Sink::Stdout));
        assert_eq!(
            Sink::parse("/var/log/a.log"),
            Some(Sink::File("/var/log/a.log".into()))
        );
    }
}
