//! Sending a prepared request upstream: the circuit breaker's admission, then one attempt or,
//! under a route's `retry_policy`, several (Envoy's semantics).
//!
//! A retry needs the request again, so only bodies read whole are retried: no body, or a
//! declared length up to [`REPLAY_CAP`] (read before the first attempt). A retry happens only
//! before anything went downstream: an attempt's response is either returned whole (headers
//! first, body streamed) or dropped unread. Backoff is exponential with full jitter (25 ms base,
//! 250 ms cap); the route timeout bounds all attempts together, `per_try_timeout` each one.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{header, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use super::health::Outcome;
use super::{Target, UpstreamClient};
use crate::metrics::{BreakerLimit, RetryReason};
use crate::proxy::body::{Deadline, ReqBody, RespBody};
use crate::proxy::observe::Attempts;
use crate::proxy::respond::ProxyError;
use crate::routes::RetryOn;

/// Largest request body read whole so a retry or a shadow copy can send it again.
pub(crate) const REPLAY_CAP: u64 = 64 * 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// The header listing extra retriable codes for `retry_on: retriable-status-codes` (Envoy's).
const RETRIABLE_CODES: &str = "x-envoy-retriable-status-codes";

/// The request body to send: read whole when `replayable` is wanted and the declared length is
/// at most [`REPLAY_CAP`], else streamed as it arrives.
pub(crate) async fn request_body(
    body: Incoming,
    replayable: bool,
    limit: Option<u64>,
) -> Result<ReqBody, ProxyError> {
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n > 0 && n <= REPLAY_CAP);
    if !(replayable && small) {
        return Ok(ReqBody::new(body, limit));
    }
    let bytes: Bytes = body
        .collect()
        .await
        .map_err(|_| ProxyError::BadRequest("body"))?
        .to_bytes();
    Ok(ReqBody::buffered(bytes))
}

/// Admission by the circuit breaker, then the attempts; the breaker's slots stay taken until
/// the response body is dropped. `seen` receives the retries made and the last attempt's
/// upstream address, whatever the outcome.
pub(crate) async fn send_upstream(
    prep: &Target,
    parts: Parts,
    body: ReqBody,
    pq: PathAndQuery,
    seen: &mut Attempts,
) -> Result<Response<RespBody>, ProxyError> {
    let active = prep
        .breaker
        .request()
        .inspect_err(|_| prep.stats.upstream.refused(BreakerLimit::Requests))?;
    // The route timeout covers the whole response, up to its last byte (Envoy's route
    // timeout), except after a 101: a tunnel has its own idle limit. One timer per request:
    // the response body's `Deadline` takes it over (and resets it for the idle limit).
    let mut timer = prep.timeout.map(|t| Box::pin(tokio::time::sleep(t)));
    let grpc = crate::proxy::headers::is_grpc(&parts.headers);
    let sent = attempts(prep, parts, body, pq, seen);
    let resp = match timer.as_mut() {
        Some(t) => before(sent, t.as_mut())
            .await
            .ok_or(ProxyError::Timeout)??,
        None => sent.await?,
    };
    let (parts, body) = resp.into_parts();
    let body = if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
        body
    } else {
        RespBody::Limited(Box::new(Deadline::new(body, timer, prep.tunnel_idle, grpc)))
    };
    Ok(Response::from_parts(
        parts,
        RespBody::Held(Box::new(body), Box::new(active)),
    ))
}

/// `fut`'s output, or `None` when `timer` fires first (`tokio::time::timeout` without a
/// timer of its own, so the caller can hand its timer on).
async fn before<F: Future>(fut: F, mut timer: Pin<&mut tokio::time::Sleep>) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

async fn attempts(
    prep: &Target,
    parts: Parts,
    body: ReqBody,
    pq: PathAndQuery,
    seen: &mut Attempts,
) -> Result<Response<RespBody>, ProxyError> {
    // An upgrade belongs to one connection; it is never replayed.
    let policy = prep
        .retry
        .as_ref()
        .filter(|_| !parts.headers.contains_key(header::UPGRADE));
    let codes: Vec<u16> = match policy {
        Some(p) if p.on == RetryOn::RetriableStatusCodes => parts
            .headers
            .get_all(RETRIABLE_CODES)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|c| c.trim().parse().ok())
            .collect(),
        _ => Vec::new(),
    };
    let mut head = Some(parts);
    let mut body = Some(body);
    let mut tries = 0u32;
    // The retry slot of the attempt in progress.
    let mut _retry = None;
    loop {
        let cur = body
            .take()
            .ok_or_else(|| ProxyError::Internal("request body already sent".into()))?;
        let spare = match policy {
            Some(p) if tries < p.num_retries => cur.replay(),
            _ => None,
        };
        let mut this_head = match (&spare, head.as_ref()) {
            (Some(_), Some(h)) => clone_head(h),
            _ => head
                .take()
                .ok_or_else(|| ProxyError::Internal("request head already sent".into()))?,
        };
        // A sampled trace: this attempt's client span is the upstream's parent.
        let span = seen
            .trace
            .as_ref()
            .map(|t| (t.begin(&mut this_head.headers), this_head.method.clone()));
        // The address of this attempt only: one that fails to connect has none.
        seen.peer = None;
        let sent = send_once(prep, this_head, cur, pq.clone(), &mut seen.peer);
        let result = match policy.and_then(|p| p.per_try_timeout) {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or(Err(ProxyError::Timeout)),
            None => sent.await,
        };
        if let (Some(t), Some((begun, method))) = (seen.trace.as_mut(), span) {
            let outcome = result.as_ref().map(|r| r.status().as_u16());
            let s = begun.finish(&t.ctx, &method, &prep.authority, seen.peer, tries, outcome);
            t.spans.push(s);
        }
        if let (Some(p), Some(next)) = (policy, spare) {
            if let Some(why) = retry_reason(p.on, &result, &codes) {
                match prep.breaker.retry() {
                    Ok(slot) => {
                        drop(result);
                        tokio::time::sleep(backoff(tries)).await;
                        // Counted once the retry starts, so metrics and the log agree when the
                        // route timeout ends the backoff.
                        prep.stats.upstream.retry(why);
                        tries += 1;
                        seen.retries = tries;
                        body = Some(next);
                        _retry = Some(slot);
                        continue;
                    }
                    Err(limit) => {
                        prep.stats.upstream.refused(limit);
                        tracing::debug!(?limit, "retry skipped: circuit breaker limit reached");
                    }
                }
            }
        }
        return result;
    }
}

/// One exchange with the upstream of `prep`, at the address its balancer picks (when it has
/// one); `peer` receives the address it went to (when the connection gets that far).
pub(crate) async fn send_once(
    prep: &Target,
    mut parts: Parts,
    body: ReqBody,
    pq: PathAndQuery,
    peer: &mut Option<std::net::SocketAddr>,
) -> Result<Response<RespBody>, ProxyError> {
    let (addr, busy) = match &prep.balancer {
        Some(b) => b
            .pick(&parts)
            .await
            .map_or((None, None), |(a, g)| (Some(a), g)),
        None => (None, None),
    };
    let sent = match &prep.upstream {
        UpstreamClient::H1(pool) => {
            // Origin-form on an HTTP/1.1 connection the pool already dialled.
            parts.uri = Uri::from(pq);
            parts.version = Version::HTTP_11;
            pool.send_to(addr, Request::from_parts(parts, body), &prep.breaker, peer)
                .await
                .map(|r| r.map(|b| RespBody::Dyn(Box::new(b))))
        }
        UpstreamClient::H2(pool) => {
            // The client's authority (or `host_rewrite`) travels as `:authority` only; the
            // pool dials this route's upstream whatever the URI names.
            let authority = parts
                .headers
                .remove(header::HOST)
                .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| prep.authority.clone());
            let mut up = http::uri::Parts::default();
            up.scheme = Some(prep.scheme.clone());
            up.authority = Some(authority);
            up.path_and_query = Some(pq);
            parts.uri = Uri::from_parts(up)
                .map_err(|e| ProxyError::Internal(format!("upstream uri: {e}")))?;
            parts.version = Version::HTTP_2;
            pool.send_to(addr, Request::from_parts(parts, body), &prep.breaker, peer)
                .await
        }
    };
    if let (Some(h), Some(ip)) = (prep.balancer.as_ref().and_then(|b| b.health.as_ref()), addr) {
        match &sent {
            Ok(r) => h.record(ip, Outcome::Status(outlier_status(r))),
            Err(ProxyError::Connect(_) | ProxyError::Upstream(_)) => {
                h.record(ip, Outcome::LocalFailure)
            }
            Err(_) => {}
        }
    }
    if matches!(sent, Err(ProxyError::Overloaded)) {
        // The pool waits for a connection slot as a pending request (max_pending_requests).
        prep.stats.upstream.refused(BreakerLimit::Pending);
    }
    let resp = sent?;
    Ok(match busy {
        None => resp,
        Some(g) => resp.map(|b| RespBody::Held(Box::new(b), Box::new(g))),
    })
}

/// The status outlier detection counts for a response: a gRPC answer whose `grpc-status` came
/// in the head (trailers-only: a failure before any message) counts as the HTTP status Envoy
/// maps it to (14 UNAVAILABLE is a 503), anything else by its HTTP status.
fn outlier_status(r: &Response<RespBody>) -> u16 {
    let grpc = r
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok());
    match grpc {
        None => r.status().as_u16(),
        // gRPC's HTTP mapping (grpc/doc/http-grpc-status-mapping.md, Envoy's grpcToHttpStatus).
        Some(code) => match code {
            0 => 200,
            1 => 499,
            3 | 9 | 11 => 400,
            4 => 504,
            5 => 404,
            6 | 10 => 409,
            7 => 403,
            8 => 429,
            12 => 501,
            14 => 503,
            16 => 401,
            _ => 500,
        },
    }
}

/// Method, target, version and headers of a request (extensions are not copied).
pub(crate) fn clone_head(p: &Parts) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    if let Some(ip) = p.extensions.get::<super::balance::ClientIp>() {
        r.extensions_mut().insert(*ip);
    }
    r.into_parts().0
}

/// Why this outcome is retried, if `retry_on` covers it.
fn retry_reason(
    on: RetryOn,
    result: &Result<Response<RespBody>, ProxyError>,
    codes: &[u16],
) -> Option<RetryReason> {
    let why = match result {
        Ok(_) => RetryReason::Status,
        Err(ProxyError::Connect(_)) => RetryReason::Connect,
        Err(ProxyError::Timeout) => RetryReason::Timeout,
        Err(_) => RetryReason::Reset,
    };
    should_retry(on, result, codes).then_some(why)
}

/// Whether `retry_on` covers this outcome.
fn should_retry(
    on: RetryOn,
    result: &Result<Response<RespBody>, ProxyError>,
    codes: &[u16],
) -> bool {
    use RetryOn::*;
    match result {
        Ok(r) => {
            let s = r.status().as_u16();
            match on {
                FiveXx => s >= 500,
                GatewayError => matches!(s, 502..=504),
                Retriable4xx => s == 409,
                RetriableStatusCodes => codes.contains(&s),
                ConnectFailure | RefusedStream | Reset => false,
            }
        }
        Err(ProxyError::Connect(_)) => matches!(on, FiveXx | GatewayError | ConnectFailure | Reset),
        Err(ProxyError::Upstream(detail)) => match on {
            FiveXx | GatewayError | Reset => true,
            RefusedStream => detail.contains("refused"),
            _ => false,
        },
        Err(ProxyError::Timeout) => matches!(on, FiveXx | GatewayError | Reset),
        Err(_) => false,
    }
}

/// Delay before retry number `tries + 1`: uniform in `[0, min(25 ms * 2^tries, 250 ms)]`.
fn backoff(tries: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << tries.min(16))
        .min(BACKOFF_MAX);
    let micros = cap.as_micros() as u64;
    Duration::from_micros(crate::proxy::headers::rand_u64() % (micros + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_in_the_head_counts_as_its_http_mapping_for_outlier_detection() {
        let with = |status: u16, grpc: Option<&'static str>| {
            let mut r = Response::new(crate::proxy::body::full(Bytes::new()));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if let Some(g) = grpc {
                r.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static(g));
            }
            outlier_status(&r)
        };
        assert_eq!(with(503, None), 503);
        assert_eq!(with(200, None), 200);
        assert_eq!(with(200, Some("0")), 200);
        assert_eq!(with(200, Some("14")), 503);
        assert_eq!(with(200, Some("4")), 504);
        assert_eq!(with(200, Some("13")), 500);
        assert_eq!(with(200, Some("5")), 404);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for tries in 0..20 {
            let cap = (25u64 << tries.min(16)).min(250);
            for _ in 0..100 {
                assert!(backoff(tries) <= Duration::from_millis(cap));
            }
        }
        // Jittered: not always the same value.
        let seen: std::collections::HashSet<_> = (0..50).map(|_| backoff(3)).collect();
        assert!(seen.len() > 1);
    }

    #[test]
    fn retry_classes() {
        let status = |s: u16| {
            let mut r = Response::new(crate::proxy::body::full(Bytes::new()));
            *r.status_mut() = http::StatusCode::from_u16(s).unwrap();
            Ok(r)
        };
        assert!(should_retry(RetryOn::FiveXx, &status(500), &[]));
        assert!(!should_retry(RetryOn::GatewayError, &status(500), &[]));
        assert!(should_retry(RetryOn::GatewayError, &status(503), &[]));
        assert!(should_retry(RetryOn::Retriable4xx, &status(409), &[]));
        assert!(!should_retry(RetryOn::Retriable4xx, &status(404), &[]));
        assert!(should_retry(
            RetryOn::RetriableStatusCodes,
            &status(418),
            &[418]
        ));
        assert!(!should_retry(RetryOn::FiveXx, &status(200), &[]));
        let connect = Err(ProxyError::Connect("refused".into()));
        assert!(should_retry(RetryOn::ConnectFailure, &connect, &[]));
        assert!(!should_retry(RetryOn::Retriable4xx, &connect, &[]));
        let refused = Err(ProxyError::Upstream("stream error: refused stream".into()));
        assert!(should_retry(RetryOn::RefusedStream, &refused, &[]));
        assert!(!should_retry(RetryOn::ConnectFailure, &refused, &[]));
        assert!(!should_retry(
            RetryOn::FiveXx,
            &Err(ProxyError::BodyTooLarge),
            &[]
        ));
    }
}
