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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::Denial;

/// Local buckets kept per limit before idle ones are dropped.
const MAX_LOCAL_KEYS: usize = 100_000;
/// Largest descriptor value used in a key (a header could be long).
const MAX_VALUE_BYTES: usize = 256;

/// The RateLimit spec.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RateLimitSpec {
    pub backend: Option<String>,
    pub redis: Option<RedisSpec>,
    pub failure_mode: Option<String>,
    pub response_headers: Option<bool>,
    pub limits: Vec<LimitSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct RedisSpec {
    pub address: String,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct LimitSpec {
    pub name: String,
    pub domain: Option<String>,
    pub group: String,
    pub requests: u64,
    pub per: String,
    pub burst: Option<u64>,
}

/// One limit of a RateLimit, with its bucket store.
pub struct Limit {
    /// `namespace/name/limit`, the key prefix.
    pub id: String,
    pub domain: String,
    pub group: String,
    pub requests: u64,
    /// Tokens per second.
    pub rate: f64,
    pub burst: u64,
    /// Whether allowed responses carry `RateLimit-*` headers.
    pub response_headers: bool,
    backend: Backend,
}

/// The token buckets of one local limit, by descriptor key.
type Buckets = Mutex<HashMap<String, Bucket>>;

enum Backend {
    /// Set when the graph is swapped in: the previous revision's buckets when the limit is the
    /// same, else new ones (see [`carry_over`]).
    Local(OnceLock<Arc<Buckets>>),
    Redis(Redis),
}

// Debug feeds the graph hash: the configuration, never the counters.
impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Local(_) => "local".to_string(),
            Backend::Redis(r) => {
                format!("redis {} {:?} open={}", r.address, r.timeout, r.fail_open)
            }
        };
        f.debug_struct("Limit")
            .field("id", &self.id)
            .field("domain", &self.domain)
            .field("group", &self.group)
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("response_headers", &self.response_headers)
            .field("backend", &backend)
            .finish()
    }
}

/// One entry of a descriptor group on a Mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    RemoteAddress,
    Header {
        key: String,
        name: HeaderName,
        omit_if_not_present: bool,
    },
    Generic {
        key: String,
        value: String,
    },
    /// A claim of the validated JWT (Legate's extension).
    Claim {
        key: String,
        claim: String,
    },
}

/// A limit applied to a route, with the entries that make its key.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    pub limit: std::sync::Arc<Limit>,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A compile problem: JSON pointer, message, help.
type CompileError = (String, String, String);

/// Compile the limits of one RateLimit resource.
pub fn compile(id: &str, spec: &RateLimitSpec) -> Result<Vec<Limit>, CompileError> {
    let fail_open = spec.failure_mode.as_deref() != Some("closed");
    let mut out = Vec::new();
    for (i, l) in spec.limits.iter().enumerate() {
        let secs = match l.per.as_str() {
            "second" => 1.0,
            "minute" => 60.0,
            "hour" => 3600.0,
            other => {
                return Err((
                    format!("/spec/limits/{i}/per"),
                    format!("`per: {other}` is not a period"),
                    "use second, minute or hour".into(),
                ))
            }
        };
        let backend = match spec.backend.as_deref().unwrap_or("local") {
            "redis" => {
                let Some(r) = &spec.redis else {
                    return Err((
                        "/spec".into(),
                        "`backend: redis` needs `redis.address`".into(),
                        "add `redis: {address: redis:6379}`".into(),
                    ));
                };
                Backend::Redis(Redis {
                    address: r.address.clone(),
                    timeout: Duration::from_millis(r.timeout_ms.unwrap_or(50).max(1)),
                    fail_open,
                    pool: Mutex::new(Vec::new()),
                })
            }
            _ => Backend::Local(OnceLock::new()),
        };
        out.push(Limit {
            id: format!("{id}/{}", l.name),
            domain: l.domain.clone().unwrap_or_else(|| "ambassador".into()),
            group: l.group.clone(),
            requests: l.requests,
            rate: l.requests as f64 / secs,
            burst: l.burst.unwrap_or(l.requests).max(1),
            response_headers: spec.response_headers.unwrap_or(true),
            backend,
        });
    }
    Ok(out)
}

/// One descriptor group of a Mapping: domain, group name, entries.
pub type DescriptorGroup = (String, String, Vec<Entry>);

/// The descriptor groups of a Mapping's `labels`, and the entries Legate cannot evaluate
/// (reported by the caller).
pub fn descriptor_groups(labels: &Value) -> (Vec<DescriptorGroup>, Vec<String>) {
    let mut out = Vec::new();
    let mut unsupported = Vec::new();
    let Some(domains) = labels.as_object() else {
        return (out, unsupported);
    };
    for (domain, groups) in domains {
        for group in groups.as_array().into_iter().flatten() {
            for (name, entries) in group.as_object().into_iter().flatten() {
                let mut list = Vec::new();
                for e in entries.as_array().into_iter().flatten() {
                    let Some((kind, body)) = e.as_object().and_then(|o| o.iter().next()) else {
                        continue;
                    };
                    let s = |f: &str| body.get(f).and_then(Value::as_str).map(str::to_string);
                    match kind.as_str() {
                        "remote_address" => list.push(Entry::RemoteAddress),
                        "jwt_claim" => {
                            let Some(claim) = s("claim") else { continue };
                            list.push(Entry::Claim {
                                key: s("key").unwrap_or_else(|| claim.clone()),
                                claim,
                            });
                        }
                        "generic_key" => list.push(Entry::Generic {
                            key: s("key").unwrap_or_else(|| "generic_key".into()),
                            value: s("value").unwrap_or_default(),
                        }),
                        "request_headers" => {
                            let Some(name) = s("header_name").and_then(|h| {
                                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()
                            }) else {
                                continue;
                            };
                            list.push(Entry::Header {
                                key: s("key").unwrap_or_else(|| name.to_string()),
                                name,
                                omit_if_not_present: body
                                    .get("omit_if_not_present")
                                    .and_then(Value::as_bool)
                                    .unwrap_or(false),
                            });
                        }
                        other => unsupported.push(format!("{domain}.{name}: {other}")),
                    }
                }
                out.push((domain.clone(), name.clone(), list));
            }
        }
    }
    (out, unsupported)
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
    pub async fn check(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        claims: Option<&super::jwt::Claims>,
    ) -> Result<Option<Quota>, Box<Denial>> {
        let Some(key) = self.key(headers, peer, claims) else {
            return Ok(None);
        };
        let l = &*self.limit;
        let verdict = match &l.backend {
            Backend::Local(buckets) => local_take(
                buckets.get_or_init(Arc::default),
                &key,
                l.rate,
                l.burst as f64,
            ),
            Backend::Redis(r) => match r.take(&key, l.rate, l.burst).await {
                Ok(v) => v,
                Err(e) if r.fail_open => {
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

/// Give each local limit of `new` the buckets of the same limit in `old`, so a new revision
/// does not hand every client a full bucket again. "The same" is the whole definition: id,
/// rate and burst (the descriptor entries are part of each bucket's key already). Limits
/// without a match get new buckets.
pub fn carry_over<'a>(
    old: impl IntoIterator<Item = &'a Limit>,
    new: impl IntoIterator<Item = &'a Limit>,
) {
    let mut kept: HashMap<(&str, u64, u64), &Arc<Buckets>> = HashMap::new();
    for l in old {
        if let Backend::Local(cell) = &l.backend {
            if let Some(b) = cell.get() {
                kept.insert((l.id.as_str(), l.rate.to_bits(), l.burst), b);
            }
        }
    }
    for l in new {
        if let Backend::Local(cell) = &l.backend {
            let prev = kept.get(&(l.id.as_str(), l.rate.to_bits(), l.burst));
            // Already set when the same graph is swapped in again.
            let _ = cell.set(prev.map_or_else(Arc::default, |b| Arc::clone(b)));
        }
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

/// A minimal Redis client: RESP over TCP, a few idle connections kept.
struct Redis {
    address: String,
    timeout: Duration,
    fail_open: bool,
    pool: Mutex<Vec<BufReader<TcpStream>>>,
}

impl Redis {
    async fn take(&self, key: &str, rate: f64, burst: u64) -> Result<Verdict, String> {
        let work = async {
            let conn = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match conn {
                Some(c) => c,
                None => {
                    let s = TcpStream::connect(&self.address)
                        .await
                        .map_err(|e| format!("connect {}: {e}", self.address))?;
                    let _ = s.set_nodelay(true);
                    BufReader::new(s)
                }
            };
            let cmd = resp_command(&[
                "EVAL",
                SCRIPT,
                "1",
                &format!("legate:rl:{key}"),
                &rate.to_string(),
                &burst.to_string(),
            ]);
            conn.get_mut()
                .write_all(&cmd)
                .await
                .map_err(|e| e.to_string())?;
            let reply = read_reply(&mut conn).await?;
            let verdict = match reply {
                Reply::Array(items) => match items.as_slice() {
                    [Reply::Int(a), Reply::Bulk(t)] => Verdict {
                        allowed: *a == 1,
                        remaining: String::from_utf8_lossy(t).parse().unwrap_or(0.0),
                    },
                    _ => return Err("unexpected script reply".to_string()),
                },
                Reply::Error(e) => return Err(format!("redis: {e}")),
                _ => return Err("unexpected script reply".to_string()),
            };
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < 16 {
                pool.push(conn);
            }
            Ok(verdict)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("no answer from {} within {:?}", self.address, self.timeout))?
    }
}

fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug)]
enum Reply {
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Simple,
    Error(String),
    Array(Vec<Reply>),
}

async fn read_line(r: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_reply(
    r: &mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, String>> + Send + '_>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (tag, rest) = line.split_at(line.len().min(1));
        let num = || {
            rest.parse::<i64>()
                .map_err(|_| format!("bad RESP line {line:?}"))
        };
        match tag {
            "+" => Ok(Reply::Simple),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Int(num()?)),
            "$" => {
                let n = num()?;
                if n < 0 {
                    return Ok(Reply::Nil);
                }
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                buf.truncate(n as usize);
                Ok(Reply::Bulk(buf))
            }
            "*" => {
                let n = num()?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(read_reply(r).await?);
                }
                Ok(Reply::Array(items))
            }
            _ => Err(format!("bad RESP line {line:?}")),
        }
    })
}

#[cfg(test)]
mod tests {
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
