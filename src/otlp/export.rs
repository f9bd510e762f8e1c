//! The exporter: a bounded queue of finished spans, drained by one task that batches them (up
//! to [`BATCH`] spans, or what came within [`LINGER`] of the first) and posts each batch to the
//! collector's `/v1/traces` with the outbound client.
//!
//! A request only ever `try_send`s: when the queue is full (the collector is slow or down) the
//! span is dropped and counted, so tracing costs a request a channel push at most. A batch the
//! collector refuses or that fails to arrive is dropped and counted too, not retried: a retry
//! would hold memory for a collector that is already behind.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Uri};
use http_body_util::Full;
use tokio::sync::mpsc;

use super::Span;
use crate::metrics::SpanCounts;

/// Spans waiting to be exported, at most (about 1 MiB of small spans).
pub const QUEUE_SPANS: usize = 4096;
/// Spans in one export request, at most.
const BATCH: usize = 512;
/// How long the first span of a batch waits for more.
const LINGER: Duration = Duration::from_secs(1);
/// How often the export task looks at the queue while a batch fills.
const TICK: Duration = Duration::from_millis(20);
/// One export request, whole.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where spans go: the collector's OTLP/HTTP traces URL and the `service.name` they carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: Uri,
    pub service_name: String,
}

/// How the exporter is set up from the command line.
#[derive(Debug, Clone, Default)]
pub struct ExportSettings {
    /// `--otlp-endpoint`: wins over a TracingService's `service`.
    pub target: Option<Target>,
}

/// The exporter handle the request path holds; cheap to clone.
#[derive(Clone)]
pub struct Exporter {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Span>,
    /// The flag's target, if given.
    fixed: Option<Arc<Target>>,
    /// The target in force (the flag's, else the live revision's TracingService), shared with
    /// the export task.
    target: Arc<ArcSwapOption<Target>>,
    counts: Arc<SpanCounts>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("target", &self.inner.target.load())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Start the export task (on the current runtime). With no target it idles until a
    /// revision's TracingService names one.
    pub fn start(settings: ExportSettings) -> Exporter {
        let (tx, rx) = mpsc::channel(QUEUE_SPANS);
        let fixed = settings.target.map(Arc::new);
        let target = Arc::new(ArcSwapOption::new(fixed.clone()));
        let counts = Arc::new(SpanCounts::default());
        tokio::spawn(run(rx, target.clone(), counts.clone()));
        Exporter {
            inner: Arc::new(Inner {
                tx,
                fixed,
                target,
                counts,
            }),
        }
    }

    /// Whether spans are recorded at all (a target is set).
    pub fn enabled(&self) -> bool {
        self.inner.target.load().is_some()
    }

    /// The target of a new revision's TracingService (`None`: it has none). The flag's target,
    /// when given, stays.
    pub fn configure(&self, from_config: Option<Target>) {
        if self.inner.fixed.is_some() {
            return;
        }
        let cur = self.inner.target.load();
        if cur.as_deref() != from_config.as_ref() {
            self.inner.target.store(from_config.map(Arc::new));
        }
    }

    /// Queue a finished span; dropped (and counted) when the queue is full.
    pub fn submit(&self, span: Span) {
        if self.inner.tx.try_send(span).is_err() {
            self.inner.counts.dropped.fetch_add(1, Relaxed);
        }
    }

    /// The exported, dropped and failed span counts (shown as `legate_otlp_spans_total`).
    pub fn counts(&self) -> Arc<SpanCounts> {
        self.inner.counts.clone()
    }
}

async fn run(
    mut rx: mpsc::Receiver<Span>,
    target: Arc<ArcSwapOption<Target>>,
    counts: Arc<SpanCounts>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    loop {
        // An idle gateway's task sleeps here until the first span.
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        // Then it looks every TICK instead of waking for each span (a wake-up per span cost the
        // request path more than recording it): until a batch is full or LINGER has passed.
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() + rx.len() < BATCH
            && tokio::time::Instant::now() < until
            && !rx.is_closed()
        {
            tokio::time::sleep(TICK).await;
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match target.load_full() {
            None => {
                // The TracingService went away while these waited.
                counts.dropped.fetch_add(n, Relaxed);
            }
            Some(t) => match post(&t, &mut batch).await {
                Ok(()) => {
                    counts.exported.fetch_add(n, Relaxed);
                    failing = false;
                }
                Err(e) => {
                    counts.failed.fetch_add(n, Relaxed);
                    // Once per outage, not once per batch.
                    if !failing {
                        tracing::warn!(endpoint = %t.url, error = %e, spans = n, "OTLP export failed; spans dropped until the collector answers");
                    }
                    failing = true;
                }
            },
        }
        batch.clear();
    }
}

async fn post(t: &Target, batch: &mut Vec<Span>) -> Result<(), String> {
    let body = super::encode::request(batch, &t.service_name);
    let req = Request::builder()
        .method(Method::POST)
        .uri(t.url.clone())
        .header(CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let client = crate::outbound::global()?;
    let resp = client.send(req, POST_TIMEOUT, 64 * 1024).await?;
    if resp.status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", resp.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn span() -> Span {
        Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: None,
            flags: 1,
            kind: super::super::Kind::Server,
            name: "GET".into(),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            error: None,
            attributes: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // Nothing listens on port 9: posts would fail, but the export task has not even run
        // yet (this test never yields), so the queue fills.
        let x = Exporter::start(ExportSettings {
            target: Some(Target {
                url: "http://127.0.0.1:9/v1/traces".parse().unwrap(),
                service_name: "t".into(),
            }),
        });
        for _ in 0..QUEUE_SPANS + 5 {
            x.submit(span());
        }
        assert_eq!(x.counts().dropped.load(Relaxed), 5);
        assert_eq!(x.counts().exported.load(Relaxed), 0);
    }

    #[test]
    fn the_flag_target_wins_over_the_config() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let t = |u: &str| Target {
            url: u.parse().unwrap(),
            service_name: "s".into(),
        };
        let idle = Exporter::start(ExportSettings::default());
        assert!(!idle.enabled());
        idle.configure(Some(t("http://c:4318/v1/traces")));
        assert!(idle.enabled());
        idle.configure(None);
        assert!(!idle.enabled());
        let fixed = Exporter::start(ExportSettings {
            target: Some(t("http://flag:4318/v1/traces")),
        });
        fixed.configure(None);
        assert!(fixed.enabled());
        fixed.configure(Some(t("http://c:4318/v1/traces")));
        assert_eq!(
            fixed.inner.target.load().as_ref().unwrap().url.host(),
            Some("flag")
        );
    }
}
