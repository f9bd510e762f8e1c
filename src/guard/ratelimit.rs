//! Rate limiting (Legate's `RateLimit` kind over Emissary's Mapping `labels` descriptors).
//!
//! *What* is counted comes from the Mapping, as in Emissary: `labels: {<domain>: [{<group>:
//! [entries]}]}` where entries are `remote_address`, `request_headers` and `generic_key`, plus
//! Legate's `jwt_claim` (a claim of the token the route's JWTPolicy validated). *How much* comes
//! from a `RateLimit` limit naming that domain and group: `requests` per second/minute/hour with
//! a `burst` (the bucket size). Each distinct list of entry values is one token bucket, kept
//! either in this process (`local`, carried over to the next revision while the limit's
//! definition is unchanged) or in Redis (`redis`, shared by every replica; one atomic Lua script
//! per check). When Redis does not answer within `timeout_ms`, `failure_mode: open` lets the
//! request through and `closed` answers 503.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use serde_json::Value;

use super::Denial;
use crate::routes::guard::{Entry, LimitBackend, RouteLimit};

/// Local buckets kept per limit before idle ones are dropped.
const MAX_LOCAL_KEYS: usize = 100_000;
/// Largest descriptor value used in a key (a header could be long).
const MAX_VALUE_BYTES: usize = 256;

/// The token buckets of one local limit, by descriptor key.
pub(crate) type Buckets = Mutex<HashMap<String, Bucket>>;

/// Where one route limit counts: its local buckets or its Redis client.
#[derive(Clone)]
pub(crate) enum Counter {
    Local(Arc<Buckets>),
    Redis(Arc<Redis>),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Outcome of one check.
struct Verdict {
    allowed: bool,
    /// Tokens left after this request.
    remaining: f64,
}

/// Where an allowed request stands against one limit, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// The bucket size.
    pub limit: u64,
    /// Tokens left, fractional.
    pub remaining: f64,
    /// Tokens per second.
    pub rate: f64,
}

impl Quota {
    /// `RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full), as on a
    /// 429.
    pub fn headers(&self, h: &mut HeaderMap) {
        let reset = ((self.limit as f64 - self.remaining) / self.rate)
            .ceil()
            .max(0.0) as u64;
        h.insert(
            HeaderName::from_static("ratelimit-limit"),
            HeaderValue::from(self.limit),
        );
        h.insert(
            HeaderName::from_static("ratelimit-remaining"),
            HeaderValue::from(self.remaining.max(0.0).floor() as u64),
        );
        h.insert(
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(reset),
        );
    }

    /// The tighter of two: fewer whole requests left, then the smaller bucket.
    pub fn tighter(self, other: Quota) -> Quota {
        let key = |q: &Quota| (q.remaining.max(0.0).floor() as u64, q.limit);
        if key(&other) < key(&self) {
            other
        } else {
            self
        }
    }
}

impl RouteLimit {
    /// The bucket key for this request; `None` when the descriptor does not apply (a header
    /// entry whose header is absent, as Envoy does; a claim the token does not carry, or no
    /// validated token at all).
    fn key(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        claims: Option<&super::jwt::Claims>,
    ) -> Option<String> {
        let mut key = self.limit.id.clone();
        for e in &self.entries {
            let (k, v) = match e {
                Entry::RemoteAddress => ("remote_address".to_string(), peer.ip().to_string()),
                Entry::Generic { key, value } => (key.clone(), value.clone()),
                Entry::Claim { key, claim } => {
                    let v = match claims?.get(claim)? {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        // Null, lists and objects name no one.
                        _ => return None,
                    };
                    (key.clone(), v.chars().take(MAX_VALUE_BYTES).collect())
                }
                Entry::Header {
                    key,
                    name,
                    omit_if_not_present,
                } => match headers.get(name).and_then(|v| v.to_str().ok()) {
                    Some(v) => (key.clone(), v.chars().take(MAX_VALUE_BYTES).collect()),
                    None if *omit_if_not_present => continue,
                    None => return None,
                },
            };
            key.push('|');
            key.push_str(&k);
            key.push('=');
            key.push_str(&v);
        }
        Some(key)
    }

    /// Count the request; `Ok` carries where it stands when the limit applied and reports
    /// `RateLimit-*` headers, `Err` is the answer to a refused request.
    pub(crate) async fn check(
        &self,
        counter: &Counter,
        headers: &HeaderMap,
        peer: SocketAddr,
        claims: Option<&super::jwt::Claims>,
    ) -> Result<Option<Quota>, Box<Denial>> {
        let Some(key) = self.key(headers, peer, claims) else {
            return Ok(None);
        };
        let l = &*self.limit;
        let fail_open = matches!(
            l.backend,
            LimitBackend::Redis {
                fail_open: true,
                ..
            }
        );
        let verdict = match counter {
            Counter::Local(buckets) => local_take(buckets, &key, l.rate, l.burst as f64),
            Counter::Redis(r) => match r.take(&key, l.rate, l.burst).await {
                Ok(v) => v,
                Err(e) if fail_open => {
                    tracing::warn!(limit = %l.id, error = %e, "Redis unavailable; failure_mode open lets the request through");
                    return Ok(None);
                }
                Err(e) => {
                    tracing::warn!(limit = %l.id, error = %e, "Redis unavailable; failure_mode closed refuses");
                    let mut h = HeaderMap::new();
                    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(Box::new(Denial {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        headers: h,
                        body: Bytes::from_static(b"rate limiter unavailable\n"),
                    }));
                }
            },
        };
        let quota = Quota {
            limit: l.burst,
            remaining: verdict.remaining,
            rate: l.rate,
        };
        if verdict.allowed {
            return Ok(l.response_headers.then_some(quota));
        }
        let retry = ((1.0 - verdict.remaining) / l.rate).ceil().max(1.0) as u64;
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from(retry));
        quota.headers(&mut h);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Err(Box::new(Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers: h,
            body: Bytes::from_static(b"too many requests\n"),
        }))
    }
}

fn local_take(buckets: &Buckets, key: &str, rate: f64, cap: f64) -> Verdict {
    let now = Instant::now();
    let mut map = buckets.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_LOCAL_KEYS && !map.contains_key(key) {
        // A bucket that has refilled is the same as no bucket: dropping it loses nothing.
        map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < cap);
        if map.len() >= MAX_LOCAL_KEYS {
            // Still full of active keys: drop the least recently used half.
            let mut ages: Vec<Instant> = map.values().map(|b| b.at).collect();
            ages.sort();
            let cut = ages[ages.len() / 2];
            map.retain(|_, b| b.at > cut);
        }
    }
    let b = map.entry(key.to_string()).or_insert(Bucket {
        tokens: cap,
        at: now,
    });
    b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(cap);
    b.at = now;
    let allowed = b.tokens >= 1.0;
    if allowed {
        b.tokens -= 1.0;
    }
    Verdict {
        allowed,
        remaining: b.tokens,
    }
}

/// The token bucket in Redis: refill from the server's clock, take one, expire when full.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate / 1000)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - tokens) * 1000 / rate) + 1000)
return {allowed, tostring(tokens)}
"#;

/// The Redis client of one address: the `redis` crate's multiplexed connection (opened on first
/// use, opened again after an error), the script sent by its SHA-1 (`EVALSHA`, loaded once
/// when the server does not know it), AUTH and database from the URL, TLS for `rediss://`.
pub(crate) struct Redis {
    /// As configured, for messages (a password in it is not shown).
    address: String,
    timeout: Duration,
    client: Result<redis::Client, String>,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

/// `address` without a password, for logs and errors.
fn redact(address: &str) -> String {
    match (address.find("://"), address.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &address[..s + 3], &address[at + 1..]),
        _ => address.to_string(),
    }
}

impl Redis {
    pub(crate) fn new(address: &str, timeout: Duration) -> Redis {
        Redis {
            address: redact(address),
            timeout,
            client: redis::Client::open(address).map_err(|e| e.to_string()),
            conn: Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connect {}: {e}", self.address))?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    async fn take(&self, key: &str, rate: f64, burst: u64) -> Result<Verdict, String> {
        static BUCKET: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(SCRIPT));
        let work = async {
            let mut conn = self.connection().await?;
            let reply: Result<(i64, String), _> = BUCKET
                .key(format!("legate:rl:{key}"))
                .arg(rate.to_string())
                .arg(burst.to_string())
                .invoke_async(&mut conn)
                .await;
            match reply {
                Ok((allowed, tokens)) => Ok(Verdict {
                    allowed: allowed == 1,
                    remaining: tokens.parse().unwrap_or(0.0),
                }),
                Err(e) => {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                        // Open a new connection next time.
                        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    Err(format!("redis {}: {e}", self.address))
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // A connection that did not answer in time may be stuck: start afresh.
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Err(format!(
                    "no answer from {} within {:?}",
                    self.address, self.timeout
                ))
            }
        }
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_local_bucket_refills_at_its_rate_on_the_tokio_clock() {
        let buckets = Buckets::default();
        // 1 per second, burst 2.
        let take = || local_take(&buckets, "tenant-a", 1.0, 2.0).allowed;
        assert!(take());
        assert!(take());
        assert!(!take());
        // Not a whole token yet.
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!take());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(take());
        assert!(!take());
        // Another key has its own bucket.
        assert!(local_take(&buckets, "tenant-b", 1.0, 2.0).allowed);
        // A long pause refills to the burst, never past it.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(take());
        assert!(take());
        assert!(!take());
    }
}
