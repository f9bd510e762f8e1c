//! OpenID Connect login at the edge (Legate's `OIDCLogin`): the authorization code flow with
//! PKCE, `state` and `nonce` for browsers, the provider's bearer tokens for other clients.
//!
//! Stateless across replicas: the login in flight (state, nonce, PKCE verifier, the page to
//! return to) and the session (claims, expiry, refresh token) travel in cookies sealed with an
//! AEAD (ChaCha20-Poly1305, `ring`) under keys from `--secrets-dir/<secret>/session-keys`: the
//! first key seals, every key opens, so adding a key in front rotates without logging anyone
//! out, and gateways given the same keys accept each other's sessions. A cookie's purpose and
//! the issuer and client it was made for are sealed in as associated data, so a login cookie is
//! never taken for a session, nor one login's session for another's.
//!
//! Per process this holds only what can be fetched again: the provider's discovery document,
//! its key set (`jwt::KeyState`, as JWTPolicy's) and the secrets read from disk. The client
//! secret is read from `--secrets-dir/<secret>/client-secret`, sent only to the token endpoint
//! and never logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::jwt::{self, Claims, KeyState};
use super::Denial;
use crate::routes::guard::{Alg, JwksSource, JwtPolicy, OidcLogin};

/// How long the discovery document is used before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// How long the secrets read from disk are used before they are read again (a rotation
/// shows within this time).
const SECRETS_TTL: Duration = Duration::from_secs(10);
/// How long a browser has to come back from the provider.
const LOGIN_TTL: u64 = 600;
/// Longest the gateway waits for the provider (discovery, token endpoint).
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from the provider.
const MAX_PROVIDER_BYTES: usize = 256 * 1024;
/// A session without `exp` in its ID token and without `expires_in` lasts this long.
const DEFAULT_SESSION: u64 = 3600;
/// Browsers keep cookies up to 4096 bytes (name, value and attributes).
const MAX_COOKIE: usize = 4000;
/// After a failed refresh the next try waits a sixth of the refresh window (so a window gets
/// about six tries), at least this long...
const MIN_REFRESH_RETRY: u64 = 2;
/// ...and at most this long.
const MAX_REFRESH_RETRY: u64 = 30;

/// The fields of the provider's `.well-known/openid-configuration` Legate uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

/// What discovery gave, with the key set and the policies tokens are validated by.
struct Provider {
    doc: Discovery,
    keys: Arc<KeyState>,
    /// ID tokens: issuer, the client id as audience, `sub` required.
    id_tokens: JwtPolicy,
    /// Bearer tokens: issuer, the accepted audiences, claims forwarded.
    bearer: JwtPolicy,
    fetched: Instant,
}

/// The secrets of one login, read from `--secrets-dir/<secret>/`.
struct Secrets {
    client_secret: String,
    /// The first seals; all open.
    keys: Vec<LessSafeKey>,
    read: Instant,
}

/// The live state of one OIDCLogin (see the module docs).
pub(crate) struct Login {
    secrets_dir: Option<PathBuf>,
    client: Option<crate::outbound::Outbound>,
    provider: tokio::sync::Mutex<Option<Arc<Provider>>>,
    secrets: Mutex<Option<Arc<Secrets>>>,
}

/// What a request with a session or a bearer token takes upstream and back.
#[derive(Debug)]
pub struct Admitted {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub claims: Arc<Claims>,
    /// A renewed session cookie for the response.
    pub set_cookie: Option<HeaderValue>,
}

/// The session cookie's sealed content.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    /// Valid until (seconds since the Unix epoch).
    exp: u64,
    /// `sub` and the forwarded claims of the ID token.
    claims: Claims,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    /// The last ID token, sent back as `id_token_hint` at logout (Okta requires it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
    /// A refresh failed: the next is not tried before this time (seconds since the epoch), so
    /// a provider that is down is not asked again on every request of the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_at: Option<u64>,
}

/// The login cookie's sealed content: the login in flight.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    /// Path and query of the page asked for.
    return_to: String,
    exp: u64,
}

/// The token endpoint's answer.
#[derive(Debug, Deserialize)]
struct Tokens {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Why the token endpoint gave no tokens.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// It answered 4xx: the grant (code, refresh token) is spent, expired or not this client's.
    #[error("{0}")]
    Refused(String),
    /// It could not be reached or answered something else.
    #[error("{0}")]
    Failed(String),
}

fn now() -> u64 {
    // `exp` is a wall-clock time set by the provider: judged on the wall clock.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random(n: usize) -> Result<String, Box<Denial>> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| failure(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

impl Login {
    pub(crate) fn new(
        secrets_dir: Option<PathBuf>,
        client: Option<crate::outbound::Outbound>,
    ) -> Login {
        Login {
            secrets_dir,
            client,
            provider: tokio::sync::Mutex::new(None),
            secrets: Mutex::new(None),
        }
    }

    /// Admit a request with a valid session or bearer token; answer the login endpoints;
    /// send a browser without a session to the provider; refuse the rest with 401.
    pub(crate) async fn check(
        &self,
        p: &OidcLogin,
        req: &mut http::Request<hyper::body::Incoming>,
    ) -> Result<Admitted, Box<Denial>> {
        let path = req.uri().path();
        if let Some(endpoint) = path
            .strip_prefix(p.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            match endpoint {
                "callback" => return Err(self.callback(p, req.uri(), req.headers()).await),
                "logout" => return Err(self.logout(p, req.headers()).await),
                _ => {}
            }
        }
        if jwt::bearer(req.headers()).is_some() {
            let provider = self.provider(p).await?;
            let v = provider.bearer.check(&provider.keys, req.headers()).await?;
            return Ok(Admitted {
                headers: v.headers,
                claims: v.claims,
                set_cookie: None,
            });
        }
        let secrets = self.secrets(p)?;
        let session = read_session(p, &secrets, req.headers());
        if let Some(s) = session {
            let now = now();
            let mut set_cookie = None;
            let mut s = s;
            if s.refresh_token.is_some()
                && now.saturating_add(p.refresh_before) >= s.exp
                && s.retry_at.is_none_or(|t| now >= t)
            {
                s = match self.refresh(p, &secrets, &s).await {
                    Ok(renewed) => renewed,
                    Err(e) => {
                        tracing::info!(login = %p.name, error = %e, "session refresh failed");
                        refresh_failed(p, s, &e, now)
                    }
                };
                set_cookie = Some(session_cookie(p, &secrets, &s, req.headers())?);
            }
            if now < s.exp {
                strip_cookies(req.headers_mut(), &p.cookie);
                return Ok(Admitted {
                    headers: forwarded(p, &s.claims),
                    claims: Arc::new(s.claims),
                    set_cookie,
                });
            }
        }
        let browser = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
            && req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("text/html"));
        if !browser {
            return Err(jwt::unauthorized(None));
        }
        Err(self.start(p, &secrets, req).await)
    }

    /// Redirect to the provider's authorization endpoint, the login in flight sealed in the
    /// login cookie.
    async fn start(
        &self,
        p: &OidcLogin,
        secrets: &Secrets,
        req: &http::Request<hyper::body::Incoming>,
    ) -> Box<Denial> {
        let provider = match self.provider(p).await {
            Ok(pr) => pr,
            Err(d) => return d,
        };
        let made = (|| {
            let verifier = random(32)?;
            let pending = Pending {
                state: random(16)?,
                nonce: random(16)?,
                redirect_uri: format!(
                    "{}://{}{}/callback",
                    scheme(req.headers()),
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default(),
                    p.prefix
                ),
                return_to: return_to(req.uri()),
                exp: now() + LOGIN_TTL,
                verifier,
            };
            let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&pending.verifier));
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("response_type", "code")
                .append_pair("client_id", &p.client_id)
                .append_pair("redirect_uri", &pending.redirect_uri)
                .append_pair("scope", &p.scopes.join(" "))
                .append_pair("state", &pending.state)
                .append_pair("nonce", &pending.nonce)
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256")
                .finish();
            let sep = if provider.doc.authorization_endpoint.contains('?') {
                '&'
            } else {
                '?'
            };
            let location = format!("{}{sep}{query}", provider.doc.authorization_endpoint);
            let body = serde_json::to_vec(&pending).unwrap_or_default();
            let value = seal(secrets, &aad(p, "login"), &body)?;
            // One cookie per login in flight, so logins started in several tabs all finish.
            let c = format!(
                "{}={value}; Path={}; Max-Age={LOGIN_TTL}; HttpOnly; SameSite=Lax{}",
                login_cookie(p, &pending.state),
                p.prefix,
                secure(req.headers())
            );
            Ok::<_, Box<Denial>>(redirect(&location, &[c]))
        })();
        made.unwrap_or_else(|d| d)
    }

    /// The provider sent the browser back: check the login in flight, exchange the code,
    /// validate the ID token, set the session cookie and return to the page asked for.
    async fn callback(&self, p: &OidcLogin, uri: &http::Uri, headers: &HeaderMap) -> Box<Denial> {
        match self.complete(p, uri, headers).await {
            Ok(d) | Err(d) => d,
        }
    }

    async fn complete(
        &self,
        p: &OidcLogin,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<Box<Denial>, Box<Denial>> {
        let query: Vec<(String, String)> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let bad = |why: &str| {
            tracing::info!(login = %p.name, reason = why, "login callback refused");
            failure(
                StatusCode::BAD_REQUEST,
                &format!("login failed: {why}; open the page again to log in"),
            )
        };
        if let Some(e) = param("error") {
            // The provider's error code only: its description is the provider's text.
            let code: String = e
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(failure(
                StatusCode::FORBIDDEN,
                &format!("the identity provider refused the login ({code})"),
            ));
        }
        // RFC 9207: a provider that names itself in the answer must be this one (mix-up).
        if param("iss").is_some_and(|iss| iss != p.issuer) {
            return Err(bad("the answer comes from another issuer"));
        }
        let secrets = self.secrets(p)?;
        let state = param("state").ok_or_else(|| bad("no state"))?;
        let name = login_cookie(p, state);
        let Some(sealed) = cookie(headers, &name) else {
            // Logins are in flight, but none under this state.
            return Err(if logins(p, headers).next().is_some() {
                bad("state does not match")
            } else {
                bad("no valid login cookie")
            });
        };
        let pending =
            open_login(p, &secrets, sealed).ok_or_else(|| bad("no valid login cookie"))?;
        if pending.exp < now() {
            return Err(bad("the login took too long"));
        }
        // The name only picks the cookie: the state sealed in it decides.
        if !bool::from(state.as_bytes().ct_eq(pending.state.as_bytes())) {
            return Err(bad("state does not match"));
        }
        let code = param("code").ok_or_else(|| bad("no code"))?;
        let provider = self.provider(p).await?;
        let tokens = self
            .token(
                &provider,
                p,
                &secrets,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", &pending.redirect_uri),
                    ("code_verifier", &pending.verifier),
                ],
            )
            .await
            .map_err(|e| {
                tracing::warn!(login = %p.name, error = %e, "code exchange failed");
                match e {
                    // A spent, expired or replayed code: the browser's, not the gateway's.
                    TokenError::Refused(_) => bad("the identity provider refused the code"),
                    TokenError::Failed(_) => failure(
                        StatusCode::BAD_GATEWAY,
                        "login failed: the identity provider could not be asked",
                    ),
                }
            })?;
        let claims = self
            .id_claims(&provider, tokens.id_token.as_deref())
            .await
            .map_err(&bad)?;
        if claims.get("nonce").and_then(Value::as_str) != Some(pending.nonce.as_str()) {
            return Err(bad("nonce does not match"));
        }
        let session = new_session(p, &claims, &tokens, None);
        let set = session_cookie(p, &secrets, &session, headers)?;
        // This login's cookie, and those of logins that can no longer finish.
        let clear: Vec<String> = logins(p, headers)
            .filter(|(n, v)| {
                *n == name || open_login(p, &secrets, v).is_none_or(|other| other.exp < now())
            })
            .map(|(n, _)| {
                format!(
                    "{n}=; Path={}; Max-Age=0; HttpOnly; SameSite=Lax{}",
                    p.prefix,
                    secure(headers)
                )
            })
            .collect();
        let mut d = redirect(&pending.return_to, &clear);
        d.headers.append(header::SET_COOKIE, set);
        Ok(d)
    }

    /// End the session: clear the cookie, then the provider's RP-initiated logout when it
    /// offers one.
    async fn logout(&self, p: &OidcLogin, headers: &HeaderMap) -> Box<Denial> {
        if let Some(why) = cross_site(headers) {
            tracing::info!(login = %p.name, reason = why, "logout refused");
            return failure(
                StatusCode::FORBIDDEN,
                "logout refused: it was asked for by another site; use this site's logout link",
            );
        }
        let clear = format!(
            "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
            p.cookie,
            secure(headers)
        );
        let end = self
            .provider(p)
            .await
            .ok()
            .and_then(|pr| pr.doc.end_session_endpoint.clone());
        let hint = self
            .secrets(p)
            .ok()
            .and_then(|secrets| read_session(p, &secrets, headers))
            .and_then(|s| s.id_token);
        let location = match end {
            Some(end) => {
                let mut q = form_urlencoded::Serializer::new(String::new());
                q.append_pair("client_id", &p.client_id);
                if let Some(h) = &hint {
                    q.append_pair("id_token_hint", h);
                }
                if let Some(u) = &p.post_logout_redirect {
                    q.append_pair("post_logout_redirect_uri", u);
                }
                let sep = if end.contains('?') { '&' } else { '?' };
                format!("{end}{sep}{}", q.finish())
            }
            None => p.post_logout_redirect.clone().unwrap_or_else(|| "/".into()),
        };
        redirect(&location, &[clear])
    }

    /// Renew a session with its refresh token.
    async fn refresh(
        &self,
        p: &OidcLogin,
        secrets: &Secrets,
        s: &Session,
    ) -> Result<Session, TokenError> {
        let provider = self
            .provider(p)
            .await
            .map_err(|_| TokenError::Failed("provider unavailable".into()))?;
        let rt = s.refresh_token.as_deref().unwrap_or_default();
        let tokens = self
            .token(
                &provider,
                p,
                secrets,
                &[("grant_type", "refresh_token"), ("refresh_token", rt)],
            )
            .await?;
        let claims = match tokens.id_token.as_deref() {
            Some(t) => self
                .id_claims(&provider, Some(t))
                .await
                .map_err(|e| TokenError::Failed(e.to_string()))?,
            None => s.claims.clone(),
        };
        Ok(new_session(p, &claims, &tokens, Some(s)))
    }

    /// Validate an ID token with the provider's keys.
    async fn id_claims(
        &self,
        provider: &Provider,
        token: Option<&str>,
    ) -> Result<Claims, &'static str> {
        let token = token.ok_or("no ID token")?;
        provider
            .keys
            .validate_with(&provider.id_tokens, token, now())
            .await
    }

    /// POST a grant to the token endpoint (client_secret_basic).
    async fn token(
        &self,
        provider: &Provider,
        p: &OidcLogin,
        secrets: &Secrets,
        form: &[(&str, &str)],
    ) -> Result<Tokens, TokenError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        // RFC 6749 2.3.1: id and secret are form-encoded before Basic.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = STANDARD.encode(format!(
            "{}:{}",
            enc(&p.client_id),
            enc(&secrets.client_secret)
        ));
        let url = &provider.doc.token_endpoint;
        let req = http::Request::post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Failed(format!("{url}: {e}")))?;
        let resp = self
            .outbound()
            .map_err(TokenError::Failed)?
            .send(req, PROVIDER_TIMEOUT, MAX_PROVIDER_BYTES)
            .await
            .map_err(TokenError::Failed)?;
        if !resp.status.is_success() {
            // The provider's error code (never the request, which holds the secret).
            let code = serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            let msg = format!("{url}: answered {} {code}", resp.status);
            return Err(if resp.status.is_client_error() {
                TokenError::Refused(msg)
            } else {
                TokenError::Failed(msg)
            });
        }
        serde_json::from_slice(&resp.body)
            .map_err(|e| TokenError::Failed(format!("{url}: not a token answer: {e}")))
    }

    fn outbound(&self) -> Result<&crate::outbound::Outbound, String> {
        match &self.client {
            Some(c) => Ok(c),
            None => crate::outbound::global(),
        }
    }

    /// The discovery document and key set, fetched when missing or old (an old one is kept
    /// when a refetch fails).
    async fn provider(&self, p: &OidcLogin) -> Result<Arc<Provider>, Box<Denial>> {
        let mut slot = self.provider.lock().await;
        if let Some(pr) = slot
            .as_ref()
            .filter(|pr| pr.fetched.elapsed() < DISCOVERY_TTL)
        {
            return Ok(pr.clone());
        }
        match self.discover(p, slot.as_deref()).await {
            Ok(pr) => {
                let pr = Arc::new(pr);
                *slot = Some(pr.clone());
                Ok(pr)
            }
            Err(e) => {
                tracing::warn!(login = %p.name, error = %e, "OpenID discovery failed");
                slot.clone().ok_or_else(|| {
                    failure(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the identity provider cannot be reached; try again shortly",
                    )
                })
            }
        }
    }

    async fn discover(&self, p: &OidcLogin, old: Option<&Provider>) -> Result<Provider, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            p.issuer.trim_end_matches('/')
        );
        let req = http::Request::get(&url)
            .header(header::ACCEPT, "application/json")
            .body(http_body_util::Full::new(Bytes::new()))
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = self
            .outbound()?
            .send(req, PROVIDER_TIMEOUT, MAX_PROVIDER_BYTES)
            .await?;
        if !resp.status.is_success() {
            return Err(format!("{url}: answered {}", resp.status));
        }
        let doc: Discovery = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
        if doc.issuer != p.issuer {
            return Err(format!(
                "{url} names issuer `{}`, not `{}`",
                doc.issuer, p.issuer
            ));
        }
        let policy = |audiences: Vec<String>, forward, required: Vec<String>| JwtPolicy {
            name: p.name.clone(),
            issuer: Some(p.issuer.clone()),
            audiences,
            algorithms: vec![Alg::Rs256, Alg::Es256, Alg::EdDsa],
            skew: p.skew,
            required,
            forward,
            source: JwksSource {
                file: None,
                url: Some(doc.jwks_uri.clone()),
                refresh_seconds: None,
            },
        };
        let bearer = policy(p.audiences.clone(), p.forward.clone(), vec![]);
        let id_tokens = policy(vec![p.client_id.clone()], vec![], vec!["sub".into()]);
        let seed = old
            .filter(|o| o.doc.jwks_uri == doc.jwks_uri)
            .map(|o| &*o.keys);
        let keys = Arc::new(KeyState::new(&bearer, seed, self.client.clone()));
        Ok(Provider {
            doc,
            keys,
            id_tokens,
            bearer,
            fetched: Instant::now(),
        })
    }

    /// The client secret and session keys, read again every [`SECRETS_TTL`]; the last good
    /// ones are kept when a read fails.
    fn secrets(&self, p: &OidcLogin) -> Result<Arc<Secrets>, Box<Denial>> {
        let mut slot = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref().filter(|s| s.read.elapsed() < SECRETS_TTL) {
            return Ok(s.clone());
        }
        let read = match &self.secrets_dir {
            Some(dir) => read_secrets(&dir.join(&p.secret)),
            None => Err("legate runs without --secrets-dir".to_string()),
        };
        match read {
            Ok(s) => {
                let s = Arc::new(s);
                *slot = Some(s.clone());
                Ok(s)
            }
            Err(e) => {
                tracing::error!(login = %p.name, error = %e, "cannot read the OIDCLogin secret");
                slot.clone().ok_or_else(|| {
                    failure(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "login is not available: the gateway's OIDC secret is missing",
                    )
                })
            }
        }
    }
}

/// Read `client-secret` and `session-keys` from one secret's directory.
pub fn read_secrets_checked(dir: &Path) -> Result<(), String> {
    read_secrets(dir).map(|_| ())
}

fn read_secrets(dir: &Path) -> Result<Secrets, String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("cannot read {}: {e}", dir.join(name).display()))
    };
    let client_secret = read("client-secret")?.trim().to_string();
    if client_secret.is_empty() {
        return Err(format!("{} is empty", dir.join("client-secret").display()));
    }
    let keys = parse_keys(&read("session-keys")?)
        .map_err(|e| format!("{}: {e}", dir.join("session-keys").display()))?;
    Ok(Secrets {
        client_secret,
        keys,
        read: Instant::now(),
    })
}

/// One base64 key of 32 bytes per line (blank lines and `#` comments skipped); the first
/// seals.
fn parse_keys(text: &str) -> Result<Vec<LessSafeKey>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let raw = STANDARD
            .decode(line)
            .or_else(|_| URL_SAFE_NO_PAD.decode(line.trim_end_matches('=')))
            .map_err(|_| format!("line {} is not base64", i + 1))?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &raw).map_err(|_| {
            format!(
                "line {}: a key is 32 bytes (`openssl rand -base64 32`)",
                i + 1
            )
        })?;
        keys.push(LessSafeKey::new(key));
    }
    if keys.is_empty() {
        return Err("no key (one base64 32-byte key per line)".into());
    }
    Ok(keys)
}

/// Associated data sealed with a cookie: its purpose and the login it belongs to.
fn aad(p: &OidcLogin, purpose: &str) -> Vec<u8> {
    format!("legate-oidc/1 {purpose} {} {}", p.issuer, p.client_id).into_bytes()
}

fn seal(secrets: &Secrets, aad: &[u8], plain: &[u8]) -> Result<String, Box<Denial>> {
    let internal = || failure(StatusCode::INTERNAL_SERVER_ERROR, "cannot seal the cookie");
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| internal())?;
    let mut buf = plain.to_vec();
    let key = secrets.keys.first().ok_or_else(internal)?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .map_err(|_| internal())?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(URL_SAFE_NO_PAD.encode(out))
}

/// Open a sealed cookie value with any of the keys.
fn open(keys: &[LessSafeKey], aad: &[u8], value: &str) -> Option<Vec<u8>> {
    let raw = URL_SAFE_NO_PAD.decode(value).ok()?;
    if raw.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
        return None;
    }
    let (nonce, sealed) = raw.split_at(NONCE_LEN);
    keys.iter().find_map(|k| {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        k.open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()
            .map(|p| p.to_vec())
    })
}

/// A session from an ID token's claims (`sub` and the forwarded ones) and the token answer.
fn new_session(p: &OidcLogin, claims: &Claims, t: &Tokens, old: Option<&Session>) -> Session {
    let keep: Claims = claims
        .iter()
        .filter(|(k, _)| *k == "sub" || p.forward.iter().any(|(c, _)| c == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .or_else(|| t.expires_in.map(|e| now() + e))
        .unwrap_or_else(|| now() + DEFAULT_SESSION);
    Session {
        exp,
        claims: keep,
        refresh_token: t
            .refresh_token
            .clone()
            .or_else(|| old.and_then(|o| o.refresh_token.clone())),
        id_token: t
            .id_token
            .clone()
            .or_else(|| old.and_then(|o| o.id_token.clone())),
        retry_at: None,
    }
}

/// The session after a failed refresh: a refused refresh token is dropped (asking again cannot
/// help); otherwise the next try waits (see `MIN_REFRESH_RETRY`).
fn refresh_failed(p: &OidcLogin, mut s: Session, e: &TokenError, now: u64) -> Session {
    match e {
        TokenError::Refused(_) => s.refresh_token = None,
        TokenError::Failed(_) => {
            let wait = (p.refresh_before / 6).clamp(MIN_REFRESH_RETRY, MAX_REFRESH_RETRY);
            s.retry_at = Some(now + wait);
        }
    }
    s
}

/// The request's session, if its cookie opens with one of the keys.
fn read_session(p: &OidcLogin, secrets: &Secrets, headers: &HeaderMap) -> Option<Session> {
    let sealed = cookie(headers, &p.cookie)?;
    let plain = open(&secrets.keys, &aad(p, "session"), sealed)?;
    serde_json::from_slice(&plain).ok()
}

fn session_cookie(
    p: &OidcLogin,
    secrets: &Secrets,
    s: &Session,
    headers: &HeaderMap,
) -> Result<HeaderValue, Box<Denial>> {
    let body = serde_json::to_vec(s).unwrap_or_default();
    let value = seal(secrets, &aad(p, "session"), &body)?;
    let c = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax{}",
        p.cookie,
        secure(headers)
    );
    if c.len() > MAX_COOKIE {
        tracing::warn!(login = %p.name, bytes = c.len(), "session cookie is larger than browsers keep; forward fewer claims");
    }
    HeaderValue::from_str(&c)
        .map_err(|_| failure(StatusCode::INTERNAL_SERVER_ERROR, "cannot set the cookie"))
}

fn forwarded(p: &OidcLogin, claims: &Claims) -> Vec<(HeaderName, HeaderValue)> {
    p.forward
        .iter()
        .filter_map(|(claim, name)| {
            let v = match claims.get(claim) {
                None | Some(Value::Null) => return None,
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            };
            HeaderValue::from_str(&v).ok().map(|v| (name.clone(), v))
        })
        .collect()
}

/// The request's cookies, name and value.
fn cookies(h: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookies(h).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The login cookie of the login in flight with this state: the session cookie's name,
/// `_login_` and a short hash of the state (the state itself stays sealed inside).
fn login_cookie(p: &OidcLogin, state: &str) -> String {
    let h = sha2::Sha256::digest(state.as_bytes());
    let tag: String = h[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}_login_{tag}", p.cookie)
}

/// The request's login cookies (every login in flight in this browser).
fn logins<'a>(p: &OidcLogin, h: &'a HeaderMap) -> impl Iterator<Item = (&'a str, &'a str)> {
    let prefix = format!("{}_login_", p.cookie);
    cookies(h).filter(move |(k, _)| k.starts_with(&prefix))
}

fn open_login(p: &OidcLogin, secrets: &Secrets, sealed: &str) -> Option<Pending> {
    open(&secrets.keys, &aad(p, "login"), sealed).and_then(|b| serde_json::from_slice(&b).ok())
}

/// Take the login's own cookies out of the request: the upstream has no use for them.
fn strip_cookies(h: &mut HeaderMap, name: &str) {
    let login = format!("{name}_login_");
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && k != name && !k.starts_with(&login)
        })
        .map(str::to_string)
        .collect();
    h.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Why a request was sent by another site (a link, form or script there), if the browser says
/// so: `Sec-Fetch-Site` other than `same-origin` or `none` (typed, bookmarked), or an `Origin`
/// that is not this host. A request with neither (older browsers, programs) is taken as
/// same-site: the session cookie is `SameSite=Lax` in any case.
fn cross_site(h: &HeaderMap) -> Option<&'static str> {
    if let Some(site) = h.get("sec-fetch-site") {
        let ok = site.as_bytes().eq_ignore_ascii_case(b"same-origin")
            || site.as_bytes().eq_ignore_ascii_case(b"none");
        return (!ok).then_some("Sec-Fetch-Site is not same-origin");
    }
    let origin = h.get(header::ORIGIN)?.to_str().unwrap_or("null");
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(o), Some(host)) if o.eq_ignore_ascii_case(host) => None,
        _ => Some("Origin is another site"),
    }
}

/// `https` when the request came over TLS (the gateway set `X-Forwarded-Proto` already).
fn scheme(h: &HeaderMap) -> &'static str {
    let tls = h
        .get(super::X_FORWARDED_PROTO)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    if tls {
        "https"
    } else {
        "http"
    }
}

fn secure(h: &HeaderMap) -> &'static str {
    if scheme(h) == "https" {
        "; Secure"
    } else {
        ""
    }
}

/// The page to come back to: the request's path and query, never another site.
fn return_to(uri: &http::Uri) -> String {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    if pq.starts_with('/') && !pq.starts_with("//") {
        pq.to_string()
    } else {
        "/".to_string()
    }
}

fn redirect(location: &str, cookies: &[String]) -> Box<Denial> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            headers.append(header::SET_COOKIE, v);
        }
    }
    Box::new(Denial {
        status: StatusCode::FOUND,
        headers,
        body: Bytes::new(),
    })
}

fn failure(status: StatusCode, msg: &str) -> Box<Denial> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Box::new(Denial {
        status,
        headers,
        body: Bytes::from(format!("{msg}\n")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(keys: &str) -> Secrets {
        Secrets {
            client_secret: "s".into(),
            keys: parse_keys(keys).unwrap(),
            read: Instant::now(),
        }
    }

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    #[test]
    fn the_newest_key_seals_and_every_key_opens() {
        let old = secrets(K1);
        let rotated = secrets(&format!(
            "{K2}\n# the old key, until sessions made with it end\n{K1}\n"
        ));
        let sealed_old = seal(&old, b"a", b"hello").unwrap();
        assert_eq!(open(&rotated.keys, b"a", &sealed_old).unwrap(), b"hello");
        let sealed_new = seal(&rotated, b"a", b"hello").unwrap();
        assert!(
            open(&old.keys, b"a", &sealed_new).is_none(),
            "sealed with K2"
        );
        assert!(
            open(&rotated.keys, b"b", &sealed_new).is_none(),
            "other purpose"
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&sealed_new).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(open(&rotated.keys, b"a", &URL_SAFE_NO_PAD.encode(raw)).is_none());
    }

    #[test]
    fn bad_key_files_say_which_line() {
        assert!(parse_keys("").unwrap_err().contains("no key"));
        assert!(parse_keys("c2hvcnQ=").unwrap_err().contains("line 1"));
        assert!(parse_keys(&format!("{K1}\n!!"))
            .unwrap_err()
            .contains("line 2"));
    }

    #[test]
    fn cookies_are_found_and_the_logins_own_are_stripped() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; s=x"));
        h.append(
            header::COOKIE,
            HeaderValue::from_static("s_login_0a1b2c3d=y; b=2; s_login_ffffffff=z"),
        );
        assert_eq!(cookie(&h, "s"), Some("x"));
        assert_eq!(cookie(&h, "s_login_0a1b2c3d"), Some("y"));
        strip_cookies(&mut h, "s");
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
    }

    #[test]
    fn cross_site_logouts_are_recognised() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static("app.test"));
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert_eq!(cross_site(&h(&[])), None);
        assert_eq!(cross_site(&h(&[("sec-fetch-site", "same-origin")])), None);
        assert_eq!(cross_site(&h(&[("sec-fetch-site", "none")])), None);
        assert!(cross_site(&h(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&h(&[("sec-fetch-site", "same-site")])).is_some());
        assert_eq!(cross_site(&h(&[("origin", "http://app.test")])), None);
        assert!(cross_site(&h(&[("origin", "http://evil.test")])).is_some());
        assert!(cross_site(&h(&[("origin", "null")])).is_some());
    }

    #[test]
    fn return_to_stays_on_this_site() {
        let u = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(return_to(&u("/app?x=1")), "/app?x=1");
        assert_eq!(return_to(&u("//evil.example/")), "/");
    }
}
