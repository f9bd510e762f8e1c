//! Webhooks: authenticate a push notification and trigger a fetch.
//!
//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`. GitLab:
//! `X-Gitlab-Token: <secret>`. Generic: `X-Legate-Signature: sha256=<hex HMAC>`. Comparisons are
//! constant-time; the body is capped at 1 MiB and checked before anything reads it as data.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{error, json, AdminState};

/// Largest webhook body accepted.
pub const MAX_HOOK_BODY: usize = 1 << 20;

/// Fetches triggered by webhooks start at most this often. A delivery inside the gap
/// schedules one fetch at its end (later ones join it), so the last push is always fetched
/// while a replayed or redelivered delivery storm costs one pass per gap, not one per request
/// (de-duplicating on the delivery id would swallow deliberate redeliveries).
pub const MIN_FETCH_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// The shared webhook secret, and the throttle of the fetches its hooks trigger. `Debug`
/// never shows the secret.
pub struct HookSecret(Vec<u8>, std::sync::Mutex<Throttle>);

/// When webhook-triggered fetches last started, and whether one is scheduled.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<tokio::time::Instant>,
    scheduled: bool,
}

/// What a valid delivery does.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Trigger a fetch now.
    Now,
    /// Trigger one at this time.
    At(tokio::time::Instant),
    /// One is scheduled already: it will see this push too.
    Joined,
}

impl Throttle {
    fn admit(&mut self, now: tokio::time::Instant) -> Admit {
        if self.scheduled {
            return Admit::Joined;
        }
        match self.last {
            Some(last) if now < last + MIN_FETCH_GAP => {
                self.scheduled = true;
                Admit::At(last + MIN_FETCH_GAP)
            }
            _ => {
                self.last = Some(now);
                Admit::Now
            }
        }
    }

    fn fired(&mut self, at: tokio::time::Instant) {
        self.last = Some(at);
        self.scheduled = false;
    }
}

impl std::fmt::Debug for HookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookSecret(<redacted>)")
    }
}

impl HookSecret {
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<HookSecret, String> {
        let s: Vec<u8> = secret.into();
        if s.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        Ok(HookSecret(s, std::sync::Mutex::new(Throttle::default())))
    }

    /// Ask for a fetch, within [`MIN_FETCH_GAP`]; returns whether it starts now.
    fn trigger(self: &std::sync::Arc<Self>, reconciler: &crate::reconcile::Handle) -> bool {
        let now = tokio::time::Instant::now();
        let admit = self.1.lock().unwrap_or_else(|e| e.into_inner()).admit(now);
        match admit {
            Admit::Now => {
                reconciler.trigger();
                true
            }
            Admit::At(at) => {
                let (me, reconciler) = (self.clone(), reconciler.clone());
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    me.1.lock().unwrap_or_else(|e| e.into_inner()).fired(at);
                    reconciler.trigger();
                });
                false
            }
            Admit::Joined => false,
        }
    }

    /// Read the secret from a file (trailing newline trimmed).
    pub fn from_file(path: &std::path::Path) -> Result<HookSecret, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read the webhook secret {}: {e}", path.display()))?;
        let end = text
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        HookSecret::new(text[..end].to_vec())
    }

    /// Read the secret from an environment variable.
    pub fn from_env(var: &str) -> Result<Option<HookSecret>, String> {
        match std::env::var(var) {
            Ok(v) => HookSecret::new(v.into_bytes()).map(Some),
            Err(_) => Ok(None),
        }
    }

    fn hmac_ok(&self, body: &[u8], header: Option<&[u8]>) -> bool {
        let Some(sig) = header.and_then(|h| h.strip_prefix(b"sha256=")) else {
            return false;
        };
        let Some(sig) = unhex(sig) else { return false };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    }

    fn token_ok(&self, header: Option<&[u8]>) -> bool {
        let Some(token) = header else { return false };
        // Hash both sides so the comparison does not leak the secret's length.
        let a = Sha256::digest(token);
        let b = Sha256::digest(&self.0);
        a.ct_eq(&b).into()
    }
}

/// Which kind of webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Github,
    Gitlab,
    Generic,
}

impl HookKind {
    pub fn parse(s: &str) -> Option<HookKind> {
        match s {
            "github" => Some(HookKind::Github),
            "gitlab" => Some(HookKind::Gitlab),
            "generic" => Some(HookKind::Generic),
            _ => None,
        }
    }
}

/// Handle `POST <prefix>/{github,gitlab,generic}`; `kind` is the last path segment. Mount it
/// on the admin listener (`/hooks/`) and on the proxy listeners (`/.legate/hooks/`).
pub async fn handle<B>(kind: &str, req: Request<B>, state: &AdminState) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (Some(kind), Some(secret)) = (HookKind::parse(kind), state.hook_secret.as_ref()) else {
        return error(StatusCode::NOT_FOUND, "no such webhook");
    };
    if req.method() != http::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "webhooks are POST");
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_HOOK_BODY as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "webhook body over 1 MiB");
    }
    let (parts, body) = req.into_parts();
    let header = |name: &str| parts.headers.get(name).map(|v| v.as_bytes().to_vec());
    // GitLab sends the token in a header: check it before reading the body at all.
    if kind == HookKind::Gitlab && !secret.token_ok(header("x-gitlab-token").as_deref()) {
        return error(StatusCode::UNAUTHORIZED, "bad or missing X-Gitlab-Token");
    }
    let body = match Limited::new(body, MAX_HOOK_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return error(StatusCode::PAYLOAD_TOO_LARGE, "webhook body over 1 MiB");
            }
            return error(StatusCode::BAD_REQUEST, "cannot read the webhook body");
        }
    };
    let ok = match kind {
        HookKind::Github => secret.hmac_ok(&body, header("x-hub-signature-256").as_deref()),
        HookKind::Generic => secret.hmac_ok(&body, header("x-legate-signature").as_deref()),
        HookKind::Gitlab => true,
    };
    if !ok {
        return error(StatusCode::UNAUTHORIZED, "bad or missing signature");
    }
    let now = secret.trigger(&state.reconciler);
    json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "triggered": true, "deferred": !now }),
    )
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let v = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// `sha256=<hex>` signature of `body`, as GitHub sends it (for tests and clients).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!(
        "sha256={}",
        crate::source::hex(&mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deliveries_inside_the_gap_join_one_scheduled_fetch() {
        let mut t = Throttle::default();
        let t0 = tokio::time::Instant::now();
        assert_eq!(t.admit(t0), Admit::Now);
        let at = t0 + MIN_FETCH_GAP;
        assert_eq!(t.admit(t0), Admit::At(at));
        for _ in 0..100 {
            assert_eq!(t.admit(t0), Admit::Joined);
        }
        t.fired(at);
        assert_eq!(t.admit(at), Admit::At(at + MIN_FETCH_GAP));
        t.fired(at + MIN_FETCH_GAP);
        assert_eq!(t.admit(at + MIN_FETCH_GAP * 3), Admit::Now);
    }
}
