//! Post-merge feedback: an outgoing webhook for every revision that is Applied, Rejected or
//! RolledBack, so the author of a merged change learns its fate without reading gateway logs.
//!
//! Owns: the payload (generic JSON that is also a Slack incoming-webhook message: `text` plus a
//! `legate` object) and its delivery: one task, bounded retries with backoff and a timeout per
//! attempt, fed by the reconciler's event channel. Must not slow or block the reconciler: a
//! receiver that falls behind skips events (and says so) rather than queueing them forever.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use serde_json::json;
use tokio::sync::broadcast;

use crate::config::Severity;
use crate::reconcile::{Entry, Outcome};

/// Where and how notifications are sent.
#[derive(Debug, Clone)]
pub struct Notifier {
    pub url: Uri,
    /// Attempts per event (first try included).
    pub attempts: u32,
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// Wait before the second attempt; doubles after each failure.
    pub backoff: Duration,
}

impl Notifier {
    pub fn new(url: &str) -> Result<Notifier, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--notify-url `{url}`: {e}"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") if uri.host().is_some() => {}
            _ => {
                return Err(format!(
                    "--notify-url `{url}` must be an http:// or https:// URL"
                ))
            }
        }
        Ok(Notifier {
            url: uri,
            attempts: 3,
            timeout: Duration::from_secs(5),
            backoff: Duration::from_secs(1),
        })
    }

    /// Follow `events` until the channel closes, posting the ones worth telling.
    pub fn spawn(
        self,
        mut events: broadcast::Receiver<Entry>,
        source: String,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let entry = match events.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            skipped = n,
                            "notifications fell behind; some revisions were not announced"
                        );
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(body) = payload(&entry, &source) else {
                    continue;
                };
                self.deliver(body).await;
            }
        })
    }

    async fn deliver(&self, body: serde_json::Value) {
        let bytes = Bytes::from(body.to_string());
        let mut wait = self.backoff;
        for attempt in 1..=self.attempts.max(1) {
            match tokio::time::timeout(self.timeout, post(&self.url, bytes.clone())).await {
                Ok(Ok(status)) if status.is_success() => return,
                Ok(Ok(status)) => tracing::warn!(%status, attempt, "notification refused"),
                Ok(Err(e)) => tracing::warn!(error = %e, attempt, "notification failed"),
                Err(_) => tracing::warn!(attempt, "notification timed out"),
            }
            if attempt < self.attempts {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// The JSON sent for `entry`, or `None` when the outcome is not announced.
pub fn payload(entry: &Entry, source: &str) -> Option<serde_json::Value> {
    let verb = match entry.outcome {
        Outcome::Applied | Outcome::Verifying if entry.from_cache => return None,
        Outcome::Verifying => "is verifying",
        Outcome::Applied => "applied",
        Outcome::Degraded => "kept serving, degraded,",
        Outcome::Rejected => "rejected",
        Outcome::RolledBack => "rolled back",
        Outcome::Interrupted | Outcome::Superseded => return None,
    };
    let short = entry.revision.get(..12).unwrap_or(&entry.revision);
    let (who, what) = match &entry.commit {
        Some(c) => (c.author.clone(), c.summary.clone()),
        None => (String::new(), String::new()),
    };
    let errors: Vec<String> = entry
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .take(5)
        .map(|d| d.to_string())
        .collect();
    let mut text = format!("Legate {verb} revision {short}");
    if !what.is_empty() {
        text.push_str(&format!(" \u{201c}{what}\u{201d}"));
    }
    if !who.is_empty() {
        text.push_str(&format!(" by {who}"));
    }
    if let Some(r) = &entry.reason {
        text.push_str(&format!(": {r}"));
    }
    if !errors.is_empty() {
        text.push('\n');
        text.push_str(&errors.join("\n"));
    }
    Some(json!({
        "text": text,
        "legate": {
            "outcome": entry.outcome,
            "revision": entry.revision,
            "commit": entry.commit,
            "reason": entry.reason,
            "source": source,
            "routes": entry.routes,
            "forced": entry.forced,
            "errors": errors,
        },
    }))
}

/// Inner bound of one POST; the notifier's own `timeout` is the one that counts.
const POST_TIMEOUT: Duration = Duration::from_secs(60);

/// One POST of a JSON body through the outbound client; returns the response status.
async fn post(url: &Uri, body: Bytes) -> Result<http::StatusCode, String> {
    let req = Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("legate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = crate::outbound::global()?
        .send(req, POST_TIMEOUT, 64 * 1024)
        .await?;
    Ok(resp.status)
}
