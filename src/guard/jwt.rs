//! JWT validation (Legate's `JWTPolicy`): signature with `ring`, then issuer, audience, time
//! and required claims; chosen claims forwarded to the upstream as headers.
//!
//! Only asymmetric algorithms are accepted (RS256, ES256, EdDSA), and a token's `alg` must both
//! be allowed by the policy and fit the key type, so `none` and HS256-signed-with-the-public-key
//! (algorithm confusion) are refused before any signature check. Keys come from a JWKS file or
//! URL, cached, and kept when a refresh fails. Refreshes run in the background (stale while
//! revalidate): a request is answered with the cached keys while newer ones are fetched; only a
//! cold start with no keys at all waits, at most [`COLD_WAIT`]. A token naming a key id the set
//! does not hold triggers an early refresh, at most once per [`UNKNOWN_KID_INTERVAL`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;
use sha2::Digest;

use super::Denial;
use crate::routes::guard::{Alg, JwksSource, JwtPolicy};

/// Largest token considered (a header line is capped anyway; this bounds the decode work).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const DEFAULT_REFRESH_SECS: u64 = 300;
/// Verified tokens remembered per policy (by SHA-256) before the memory is cleared.
const MAX_VERIFIED: usize = 10_000;
/// After a failed fetch, wait this long before trying again (requests use the kept keys).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Longest a request waits for the first key set of a policy.
pub const COLD_WAIT: Duration = Duration::from_secs(5);
/// Least time between two refreshes triggered by unknown key ids (a client can send any kid).
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);

/// The claims of a validated token.
pub type Claims = serde_json::Map<String, Value>;

/// What a valid token grants: headers for the upstream and its claims (rate-limit keys).
#[derive(Debug)]
pub struct Verified {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub claims: Arc<Claims>,
}

/// The key set of one policy and its refreshing; shared with the background refresh task.
pub(crate) struct KeyState {
    name: String,
    source: JwksSource,
    refresh: Duration,
    /// The keys requests verify with, read without waiting for a fetch in progress.
    current: Mutex<Arc<Vec<Jwk>>>,
    /// When the keys were last fetched, or a fetch last failed (and whether it worked).
    checked: Mutex<Option<(Instant, bool)>>,
    /// A refresh task is running.
    refreshing: AtomicBool,
    /// Woken when a refresh ends (a cold start waits for it).
    done: tokio::sync::Notify,
    /// When an unknown key id last triggered a refresh.
    last_unknown_kid: Mutex<Option<Instant>>,
    verified: Mutex<HashMap<[u8; 32], Arc<Claims>>>,
    /// Fetches a JWKS URL; `None`: the process-wide client.
    client: Option<crate::outbound::Outbound>,
}

/// One usable key of a JWKS.
#[derive(Debug, Clone)]
pub struct Jwk {
    kid: Option<String>,
    alg: Alg,
    /// RSA: (n, e); EC: the uncompressed point; Ed25519: the 32-byte key.
    material: KeyMaterial,
}

#[derive(Debug, Clone)]
enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Raw(Vec<u8>),
}

impl JwtPolicy {
    /// Validate the request's bearer token: the headers to set on the request and the claims.
    pub(crate) async fn check(
        &self,
        keys: &Arc<KeyState>,
        headers: &HeaderMap,
    ) -> Result<Verified, Box<Denial>> {
        // `exp` and `nbf` are wall-clock times set by the issuer: judged on the wall clock.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.check_at(keys, headers, now).await
    }

    /// [`JwtPolicy::check`] at `now` (seconds since the Unix epoch), the time `exp` and `nbf`
    /// are judged against, for a fresh token and a remembered one alike.
    pub(crate) async fn check_at(
        &self,
        keys: &Arc<KeyState>,
        headers: &HeaderMap,
        now: u64,
    ) -> Result<Verified, Box<Denial>> {
        let Some(token) = bearer(headers) else {
            return Err(unauthorized(None));
        };
        let key_set = keys.keys().await;
        let refuse = |why: &'static str| {
            tracing::debug!(policy = %self.name, reason = why, "JWT refused");
            unauthorized(Some(why))
        };
        // Signature, issuer, audience and claims of a token do not change while the keys do
        // not: a token seen before costs a hash and its time check, not a signature check.
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let claims = match keys.remembered(&digest) {
            Some(c) => {
                self.check_times(&c, now).map_err(refuse)?;
                c
            }
            None => match self.validate(token, &key_set, now) {
                Ok(c) => {
                    let c = Arc::new(c);
                    keys.remember(digest, c.clone());
                    c
                }
                Err(why) => {
                    if why == UNKNOWN_KID {
                        keys.unknown_kid();
                    }
                    return Err(refuse(why));
                }
            },
        };
        let mut out = Vec::new();
        for (claim, name) in &self.forward {
            let v = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&v) {
                out.push((name.clone(), v));
            }
        }
        Ok(Verified {
            headers: out,
            claims,
        })
    }

    /// Check a token against keys at time `now` (seconds); the claims, or why not.
    pub fn validate(&self, token: &str, keys: &[Jwk], now: u64) -> Result<Claims, &'static str> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err("token too long");
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a signed JWT");
        };
        let header: Value = decode_json(h).ok_or("bad header")?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(Alg::parse)
            .ok_or("algorithm not accepted")?;
        if !self.algorithms.contains(&alg) {
            return Err("algorithm not accepted");
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| "bad signature encoding")?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        if let Some(kid) = kid {
            if !keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
                return Err(UNKNOWN_KID);
            }
        }
        let verified = keys
            .iter()
            .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
            .any(|k| k.verify(signed, &sig));
        if !verified {
            return Err("signature does not verify");
        }
        let claims = match decode_json(p).ok_or("bad payload")? {
            Value::Object(m) => m,
            _ => return Err("bad payload"),
        };
        self.check_times(&claims, now)?;
        if let Some(iss) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err("wrong issuer");
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err("wrong audience");
            }
        }
        if self.required.iter().any(|c| !claims.contains_key(c)) {
            return Err("required claim missing");
        }
        Ok(claims)
    }

    /// `exp` and `nbf` at time `now`, with the clock skew.
    fn check_times(&self, claims: &Claims, now: u64) -> Result<(), &'static str> {
        let num = |k: &str| claims.get(k).and_then(Value::as_u64);
        if let Some(exp) = num("exp") {
            if now > exp.saturating_add(self.skew) {
                return Err("token expired");
            }
        } else if claims.contains_key("exp") {
            return Err("bad exp");
        }
        if let Some(nbf) = num("nbf") {
            if now.saturating_add(self.skew) < nbf {
                return Err("token not yet valid");
            }
        }
        Ok(())
    }
}

/// Why a token naming a key id the key set does not hold is refused.
const UNKNOWN_KID: &str = "unknown key id";

/// Clears `refreshing` and wakes cold-start waiters when the refresh task ends, however it ends.
struct RefreshDone(Arc<KeyState>);

impl Drop for RefreshDone {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

impl KeyState {
    /// The key set of `policy`, starting with the keys of `seed` (a policy reading the same
    /// source) when there is one.
    pub(crate) fn new(
        policy: &JwtPolicy,
        seed: Option<&KeyState>,
        client: Option<crate::outbound::Outbound>,
    ) -> KeyState {
        let (current, checked) = match seed {
            Some(s) => (
                s.current(),
                *s.checked.lock().unwrap_or_else(|e| e.into_inner()),
            ),
            None => (Arc::new(Vec::new()), None),
        };
        KeyState {
            name: policy.name.clone(),
            source: policy.source.clone(),
            refresh: Duration::from_secs(
                policy
                    .source
                    .refresh_seconds
                    .unwrap_or(DEFAULT_REFRESH_SECS)
                    .max(1),
            ),
            current: Mutex::new(current),
            checked: Mutex::new(checked),
            refreshing: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            last_unknown_kid: Mutex::new(None),
            verified: Mutex::new(HashMap::new()),
            client,
        }
    }

    /// Validate `token` by `policy` with these keys (an unknown key id triggers an early
    /// refresh, as for bearer tokens): its claims, or why not.
    pub(crate) async fn validate_with(
        self: &Arc<Self>,
        policy: &JwtPolicy,
        token: &str,
        now: u64,
    ) -> Result<Claims, &'static str> {
        let keys = self.keys().await;
        let out = policy.validate(token, &keys, now);
        if out.as_ref().err() == Some(&UNKNOWN_KID) {
            self.unknown_kid();
        }
        out
    }

    /// Whether any keys are held.
    pub(crate) fn has_keys(&self) -> bool {
        !self.current().is_empty()
    }

    /// Claims of a token verified before with the current keys (only its times can change).
    fn remembered(&self, digest: &[u8; 32]) -> Option<Arc<Claims>> {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    fn remember(&self, digest: [u8; 32], claims: Arc<Claims>) {
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_VERIFIED {
            map.clear();
        }
        map.insert(digest, claims);
    }

    fn current(&self) -> Arc<Vec<Jwk>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a fetch is due: never fetched, or the refresh period (after a failure, the
    /// retry delay) has passed.
    fn due(&self) -> bool {
        match *self.checked.lock().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some((at, ok)) => {
                at.elapsed()
                    >= if ok {
                        self.refresh
                    } else {
                        RETRY_AFTER_FAILURE
                    }
            }
        }
    }

    /// The keys to verify with now. Never waits for a refresh while keys are cached; with
    /// none yet, waits for the first fetch at most [`COLD_WAIT`].
    async fn keys(self: &Arc<Self>) -> Arc<Vec<Jwk>> {
        let keys = self.current();
        if !keys.is_empty() {
            if self.due() {
                self.refresh_in_background();
            }
            return keys;
        }
        let done = self.done.notified();
        tokio::pin!(done);
        // Registered before the task starts, so its end cannot be missed.
        done.as_mut().enable();
        let running = if self.due() {
            self.refresh_in_background()
        } else {
            self.refreshing.load(Ordering::Acquire)
        };
        if running {
            let _ = tokio::time::timeout(COLD_WAIT, done).await;
        }
        self.current()
    }

    /// A token named a key id the set does not hold: the issuer may have rotated, so fetch
    /// again now, unless an unknown id already did so recently.
    fn unknown_kid(self: &Arc<Self>) {
        {
            let mut last = self
                .last_unknown_kid
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.refresh_in_background();
    }

    /// Start a refresh task unless one runs; whether one runs now.
    fn refresh_in_background(self: &Arc<Self>) -> bool {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return true;
        }
        let state = RefreshDone(self.clone());
        tokio::spawn(async move {
            let ks = &state.0;
            let outcome = fetch(&ks.source, ks.client.as_ref())
                .await
                .and_then(|b| parse_jwks(&b));
            let ok = match outcome {
                Ok(keys) => {
                    *ks.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                    // A key may have been withdrawn: verify every token again.
                    ks.verified
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                    true
                }
                Err(e) => {
                    tracing::warn!(policy = %ks.name, error = %e, "JWKS fetch failed; keeping the previous keys");
                    false
                }
            };
            *ks.checked.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), ok));
        });
        true
    }
}

impl Jwk {
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match (&self.material, self.alg) {
            (KeyMaterial::Rsa { n, e }, Alg::Rs256) => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            (KeyMaterial::Raw(k), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, k)
                    .verify(msg, sig)
                    .is_ok()
            }
            (KeyMaterial::Raw(k), Alg::EdDsa) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(msg, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// The usable keys of a JWKS document; keys of other types (e.g. `oct`) are skipped, so a
/// symmetric key can never verify anything.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no `keys` list")?;
    let b64 = |k: &Value, f: &str| {
        k.get(f)
            .and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
    };
    let mut out = Vec::new();
    for k in list {
        let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
        let declared = k.get("alg").and_then(Value::as_str);
        let key = match (
            k.get("kty").and_then(Value::as_str),
            k.get("crv").and_then(Value::as_str),
        ) {
            (Some("RSA"), _) => b64(k, "n")
                .zip(b64(k, "e"))
                .map(|(n, e)| (Alg::Rs256, KeyMaterial::Rsa { n, e })),
            (Some("EC"), Some("P-256")) => b64(k, "x").zip(b64(k, "y")).and_then(|(x, y)| {
                (x.len() == 32 && y.len() == 32).then(|| {
                    let mut p = Vec::with_capacity(65);
                    p.push(4);
                    p.extend_from_slice(&x);
                    p.extend_from_slice(&y);
                    (Alg::Es256, KeyMaterial::Raw(p))
                })
            }),
            (Some("OKP"), Some("Ed25519")) => {
                b64(k, "x").map(|x| (Alg::EdDsa, KeyMaterial::Raw(x)))
            }
            _ => None,
        };
        let Some((alg, material)) = key else { continue };
        // A key that declares another algorithm is not used for this one.
        if declared.is_some_and(|d| Alg::parse(d) != Some(alg)) {
            continue;
        }
        out.push(Jwk { kid, alg, material });
    }
    if out.is_empty() {
        return Err("JWKS has no usable RS256, ES256 or Ed25519 key".into());
    }
    Ok(out)
}

fn decode_json(part: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub(crate) fn unauthorized(why: Option<&str>) -> Box<Denial> {
    let challenge = match why {
        None => "Bearer".to_string(),
        Some(w) => format!("Bearer error=\"invalid_token\", error_description=\"{w}\""),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        headers.insert(header::WWW_AUTHENTICATE, v);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Box::new(Denial {
        status: http::StatusCode::UNAUTHORIZED,
        headers,
        body: Bytes::from_static(b"unauthorized\n"),
    })
}

/// Read the JWKS document from its file or URL.
async fn fetch(
    src: &JwksSource,
    client: Option<&crate::outbound::Outbound>,
) -> Result<Vec<u8>, String> {
    if let Some(path) = &src.file {
        let body = tokio::fs::read(path)
            .await
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("{path} is larger than {MAX_JWKS_BYTES} bytes"));
        }
        return Ok(body);
    }
    let url = src.url.as_deref().unwrap_or_default();
    let req = http::Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(http_body_util::Full::new(Bytes::new()))
        .map_err(|e| format!("{url}: {e}"))?;
    let client = match client {
        Some(c) => c,
        None => crate::outbound::global()?,
    };
    let resp = client
        .send(req, Duration::from_secs(5), MAX_JWKS_BYTES)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status.is_success() {
        return Err(format!("{url}: answered {}", resp.status));
    }
    Ok(resp.body.to_vec())
}

#[cfg(test)]
mod registry_tests {
    use super::super::Registry;
    use super::*;
    use crate::routes::guard::{Limit, LimitBackend};

    fn policy(name: &str, issuer: &str) -> JwtPolicy {
        JwtPolicy {
            name: name.into(),
            issuer: Some(issuer.into()),
            audiences: vec![],
            algorithms: vec![Alg::Rs256],
            skew: 60,
            required: vec![],
            forward: vec![],
            source: JwksSource {
                file: Some("/keys/jwks.json".into()),
                url: None,
                refresh_seconds: None,
            },
        }
    }

    fn key() -> Jwk {
        Jwk {
            kid: Some("k1".into()),
            alg: Alg::EdDsa,
            material: KeyMaterial::Raw(vec![7; 32]),
        }
    }

    #[test]
    fn an_unchanged_policy_keeps_its_key_set_and_a_changed_one_starts_with_its_keys() {
        let reg = Registry::default();
        let old = reg.keys(&policy("ns/p", "https://a"));
        *old.current.lock().unwrap() = Arc::new(vec![key()]);
        // The same policy in a new revision: the same state (keys and verified memory).
        let same = reg.keys(&policy("ns/p", "https://a"));
        assert!(Arc::ptr_eq(&old, &same));
        // A changed policy reading the same source: its own state, seeded with the keys.
        let changed = reg.keys(&policy("ns/p", "https://b"));
        assert!(!Arc::ptr_eq(&old, &changed));
        assert_eq!(changed.current().len(), 1);
        assert!(changed.verified.lock().unwrap().is_empty());
    }

    #[test]
    fn prune_drops_state_no_prepared_route_holds() {
        let reg = Registry::default();
        let limit = |rate: f64| Limit {
            id: "ns/rl/l".into(),
            domain: "ambassador".into(),
            group: "g".into(),
            requests: 10,
            rate,
            burst: 10,
            response_headers: true,
            backend: LimitBackend::Local,
        };
        let held_keys = reg.keys(&policy("ns/p", "https://a"));
        let held = reg.counter(&limit(10.0));
        drop(reg.keys(&policy("ns/q", "https://a")));
        drop(reg.counter(&limit(1.0)));
        assert_eq!(reg.sizes(), (2, 2, 0));
        reg.prune();
        assert_eq!(reg.sizes(), (1, 1, 0));
        // What is still held is what the next lookup finds.
        assert!(Arc::ptr_eq(
            &held_keys,
            &reg.keys(&policy("ns/p", "https://a"))
        ));
        match (held, reg.counter(&limit(10.0))) {
            (
                super::super::ratelimit::Counter::Local(a),
                super::super::ratelimit::Counter::Local(b),
            ) => {
                assert!(Arc::ptr_eq(&a, &b))
            }
            _ => panic!("a local limit counts locally"),
        }
    }
}

#[cfg(test)]
mod clock_tests {
    use super::super::Registry;
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn b64(b: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    #[tokio::test]
    async fn exp_and_nbf_are_judged_at_the_given_time_for_a_remembered_token_too() {
        let dir = tempfile::tempdir().unwrap();
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let jwks = dir.path().join("jwks.json");
        let set = serde_json::json!({"keys": [
            {"kty": "OKP", "kid": "k", "crv": "Ed25519", "x": b64(key.public_key())},
        ]});
        std::fs::write(&jwks, set.to_string()).unwrap();
        let policy = JwtPolicy {
            name: "p".into(),
            issuer: None,
            audiences: vec![],
            algorithms: vec![Alg::EdDsa],
            skew: 0,
            required: vec![],
            forward: vec![],
            source: JwksSource {
                file: Some(jwks.display().to_string()),
                url: None,
                refresh_seconds: None,
            },
        };
        let input = format!(
            "{}.{}",
            b64(r#"{"alg":"EdDSA","kid":"k"}"#),
            b64(serde_json::json!({"sub": "alice", "nbf": 1000, "exp": 2000}).to_string())
        );
        let token = format!("{input}.{}", b64(key.sign(input.as_bytes())));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let reg = Registry::default();
        let keys = reg.keys(&policy);
        assert!(policy.check_at(&keys, &h, 999).await.is_err(), "before nbf");
        // Verified once, then served from the verified-token memory, whose times still apply.
        assert!(policy.check_at(&keys, &h, 1500).await.is_ok());
        assert!(policy.check_at(&keys, &h, 2000).await.is_ok());
        assert!(policy.check_at(&keys, &h, 2001).await.is_err(), "after exp");
        assert!(
            policy.check_at(&keys, &h, 999).await.is_err(),
            "remembered, before nbf"
        );
    }

    /// An unknown key id starts a refresh at once, and again only after
    /// [`UNKNOWN_KID_INTERVAL`]. Observed on the `refreshing` flag, which is set before
    /// `check_at` returns (nothing else runs in between on this single-threaded runtime).
    #[tokio::test(start_paused = true)]
    async fn unknown_key_ids_refresh_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let jwks = dir.path().join("jwks.json");
        let set = serde_json::json!({"keys": [
            {"kty": "OKP", "kid": "k1", "crv": "Ed25519", "x": b64(key.public_key())},
        ]});
        std::fs::write(&jwks, set.to_string()).unwrap();
        let policy = JwtPolicy {
            name: "p".into(),
            issuer: None,
            audiences: vec![],
            algorithms: vec![Alg::EdDsa],
            skew: 0,
            required: vec![],
            forward: vec![],
            source: JwksSource {
                file: Some(jwks.display().to_string()),
                url: None,
                refresh_seconds: Some(3600),
            },
        };
        let reg = Registry::default();
        let keys = reg.keys(&policy);
        // Warm: the keys in hand, fetched just now.
        *keys.current.lock().unwrap() = Arc::new(parse_jwks(set.to_string().as_bytes()).unwrap());
        *keys.checked.lock().unwrap() = Some((Instant::now(), true));
        let input = format!(
            "{}.{}",
            b64(r#"{"alg":"EdDSA","kid":"k3"}"#),
            b64(r#"{"sub":"alice"}"#)
        );
        let token = format!("{input}.{}", b64(key.sign(input.as_bytes())));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let refreshing = || keys.refreshing.load(Ordering::SeqCst);
        let unknown = || async { policy.check_at(&keys, &h, 1).await.map(|_| ()) };
        assert!(!refreshing());
        assert!(unknown().await.is_err());
        assert!(refreshing(), "an unknown key id refreshes at once");
        while refreshing() {
            tokio::task::yield_now().await;
        }
        for i in 0..10 {
            tokio::time::advance(Duration::from_millis(900)).await;
            assert!(unknown().await.is_err());
            assert!(!refreshing(), "refreshed again {} ms later", (i + 1) * 900);
        }
        tokio::time::advance(UNKNOWN_KID_INTERVAL).await;
        assert!(unknown().await.is_err());
        assert!(
            refreshing(),
            "an interval later an unknown id refreshes again"
        );
    }
}
