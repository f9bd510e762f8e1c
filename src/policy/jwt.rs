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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest;

use super::Denial;
use crate::config::model::LabelSelector;

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

/// The JWTPolicy spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct JwtPolicySpec {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    pub algorithms: Vec<String>,
    pub clock_skew_seconds: Option<u64>,
    pub required_claims: Vec<String>,
    pub forward_claims: BTreeMap<String, String>,
    pub mappings: Vec<String>,
    #[serde(rename = "mappingSelector")]
    pub mapping_selector: Option<LabelSelector>,
    pub hosts: Vec<String>,
}

/// Where the keys are.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct JwksSource {
    pub file: Option<String>,
    pub url: Option<String>,
    pub refresh_seconds: Option<u64>,
}

/// An accepted signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }
}

/// A compiled JWTPolicy.
pub struct JwtPolicy {
    /// `namespace/name`, for logs.
    pub name: String,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Alg>,
    pub skew: u64,
    pub required: Vec<String>,
    pub forward: Vec<(String, HeaderName)>,
    pub source: JwksSource,
    keys: Arc<KeyState>,
}

/// The key set of one policy and its refreshing; shared with the background refresh task.
struct KeyState {
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
}

// Debug feeds the graph hash: the configuration, never the cache.
impl std::fmt::Debug for JwtPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtPolicy")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("algorithms", &self.algorithms)
            .field("skew", &self.skew)
            .field("required", &self.required)
            .field("forward", &self.forward)
            .field("source", &self.source)
            .finish()
    }
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

/// A compile problem: JSON pointer, message, help.
type CompileError = (&'static str, String, String);

impl JwtPolicy {
    pub fn compile(name: String, spec: &JwtPolicySpec) -> Result<JwtPolicy, CompileError> {
        let algorithms = if spec.algorithms.is_empty() {
            vec![Alg::Rs256, Alg::Es256, Alg::EdDsa]
        } else {
            spec.algorithms
                .iter()
                .map(|a| {
                    Alg::parse(a).ok_or_else(|| {
                        (
                            "/spec/algorithms",
                            format!("algorithm `{a}` is not accepted"),
                            "use RS256, ES256 or EdDSA (symmetric HS* and `none` are refused)"
                                .to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        match (&spec.jwks.file, &spec.jwks.url) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "/spec/jwks",
                    "jwks needs exactly one of `file` or `url`".into(),
                    "set `file: /path/jwks.json` or `url: https://issuer/.well-known/jwks.json`"
                        .into(),
                ))
            }
            (None, Some(u)) => {
                let ok = u.starts_with("https://")
                    || u.starts_with("http://127.0.0.1")
                    || u.starts_with("http://localhost")
                    || u.starts_with("http://[::1]");
                if !ok || u.parse::<http::Uri>().is_err() {
                    return Err((
                        "/spec/jwks/url",
                        format!("jwks url `{u}` is not an https:// URL"),
                        "keys must be fetched over HTTPS (plain http only for loopback)".into(),
                    ));
                }
            }
            (Some(_), None) => {}
        }
        let forward = spec
            .forward_claims
            .iter()
            .map(|(claim, h)| {
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map(|n| (claim.clone(), n))
                    .map_err(|_| {
                        (
                            "/spec/forward_claims",
                            format!("`{h}` is not a valid header name"),
                            "use letters, digits and `-`".to_string(),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(JwtPolicy {
            name: name.clone(),
            issuer: spec.issuer.clone(),
            audiences: spec.audiences.clone(),
            algorithms,
            skew: spec.clock_skew_seconds.unwrap_or(60),
            required: spec.required_claims.clone(),
            forward,
            source: spec.jwks.clone(),
            keys: Arc::new(KeyState {
                name,
                source: spec.jwks.clone(),
                refresh: Duration::from_secs(
                    spec.jwks
                        .refresh_seconds
                        .unwrap_or(DEFAULT_REFRESH_SECS)
                        .max(1),
                ),
                current: Mutex::new(Arc::new(Vec::new())),
                checked: Mutex::new(None),
                refreshing: AtomicBool::new(false),
                done: tokio::sync::Notify::new(),
                last_unknown_kid: Mutex::new(None),
                verified: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Validate the request's bearer token: the headers to set on the request and the claims.
    pub async fn check(&self, headers: &HeaderMap) -> Result<Verified, Box<Denial>> {
        // `exp` and `nbf` are wall-clock times set by the issuer: judged on the wall clock.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.check_at(headers, now).await
    }

    /// [`JwtPolicy::check`] at `now` (seconds since the Unix epoch), the time `exp` and `nbf`
    /// are judged against, for a fresh token and a remembered one alike.
    pub async fn check_at(&self, headers: &HeaderMap, now: u64) -> Result<Verified, Box<Denial>> {
        let Some(token) = bearer(headers) else {
            return Err(unauthorized(None));
        };
        let keys = self.keys.keys().await;
        let refuse = |why: &'static str| {
            tracing::debug!(policy = %self.name, reason = why, "JWT refused");
            unauthorized(Some(why))
        };
        // Signature, issuer, audience and claims of a token do not change while the keys do
        // not: a token seen before costs a hash and its time check, not a signature check.
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let claims = match self.keys.remembered(&digest) {
            Some(c) => {
                self.check_times(&c, now).map_err(refuse)?;
                c
            }
            None => match self.validate(token, &keys, now) {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.keys.remember(digest, c.clone());
                    c
                }
                Err(why) => {
                    if why == UNKNOWN_KID {
                        self.keys.unknown_kid();
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

/// Give each policy of `new` that has no keys yet the keys of a policy of `old` reading the same
/// source, so a new revision does not start cold (a first request waiting for a fetch, or
/// refused while the JWKS endpoint is down). The verified-token memory is not carried: the
/// new policy may judge tokens differently.
pub fn carry_over(old: &[Arc<JwtPolicy>], new: &[Arc<JwtPolicy>]) {
    for p in new {
        if !p.keys.current().is_empty() {
            continue;
        }
        let Some(prev) = old
            .iter()
            .find(|o| o.source == p.source && !o.keys.current().is_empty())
        else {
            continue;
        };
        *p.keys.current.lock().unwrap_or_else(|e| e.into_inner()) = prev.keys.current();
        *p.keys.checked.lock().unwrap_or_else(|e| e.into_inner()) =
            *prev.keys.checked.lock().unwrap_or_else(|e| e.into_inner());
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
            let outcome = fetch(&ks.source).await.and_then(|b| parse_jwks(&b));
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(why: Option<&str>) -> Box<Denial> {
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
async fn fetch(src: &JwksSource) -> Result<Vec<u8>, String> {
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
    tokio::time::timeout(Duration::from_secs(5), get(url))
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

/// One GET over a fresh connection (JWKS fetches are rare).
async fn get(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    use hyper_util::rt::TokioIo;

    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, uri.authority().map_or("", |a| a.as_str()))
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    async fn exchange<S>(io: S, req: http::Request<Empty<Bytes>>) -> Result<Vec<u8>, String>
    where
        S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes().to_vec())
    }
    if tls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name =
            rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        exchange(TokioIo::new(stream), req).await
    } else {
        exchange(TokioIo::new(tcp), req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn b64(b: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// A policy reading an Ed25519 key from a file, and a token it accepts until `exp`.
    fn policy_and_token(dir: &std::path::Path, exp: u64) -> (JwtPolicy, HeaderMap) {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let jwks = dir.join("jwks.json");
        let set = serde_json::json!({"keys": [
            {"kty": "OKP", "kid": "k", "crv": "Ed25519", "x": b64(key.public_key())},
        ]});
        std::fs::write(&jwks, set.to_string()).unwrap();
        let spec: JwtPolicySpec = serde_json::from_value(serde_json::json!({
            "jwks": {"file": jwks.display().to_string()},
            "clock_skew_seconds": 0,
            "mappings": ["secure"],
        }))
        .unwrap();
        let policy = JwtPolicy::compile("p".into(), &spec).unwrap();
        let input = format!(
            "{}.{}",
            b64(r#"{"alg":"EdDSA","kid":"k"}"#),
            b64(serde_json::json!({"sub": "alice", "nbf": 1000, "exp": exp}).to_string())
        );
        let token = format!("{input}.{}", b64(key.sign(input.as_bytes())));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        (policy, h)
    }

    #[tokio::test]
    async fn exp_and_nbf_are_judged_at_the_given_time_for_a_remembered_token_too() {
        let dir = tempfile::tempdir().unwrap();
        let (p, h) = policy_and_token(dir.path(), 2000);
        assert!(p.check_at(&h, 999).await.is_err(), "before nbf");
        // Verified once, then served from the verified-token memory, whose times still apply.
        assert!(p.check_at(&h, 1500).await.is_ok());
        assert!(p.check_at(&h, 2000).await.is_ok());
        assert!(p.check_at(&h, 2001).await.is_err(), "after exp");
        assert!(p.check_at(&h, 999).await.is_err(), "remembered, before nbf");
    }
}
