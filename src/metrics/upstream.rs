//! Per-route upstream counters (retries, circuit-breaker refusals) and the gateway-wide shadow
//! copy counters, with their exposition.
//!
//! Kept apart from the request counters so each family of upstream metrics is one block here
//! and one call in `render`. Label values are fixed enums; the route label is a `stats_name`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::{head, RouteStats};

/// What made the gateway retry an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The upstream answered with a status `retry_on` covers.
    Status,
    /// No connection could be made.
    Connect,
    /// The connection or stream failed mid-exchange.
    Reset,
    /// `per_try_timeout` expired.
    Timeout,
}

const RETRY_REASONS: [&str; 4] = ["status", "connect", "reset", "timeout"];

/// Which circuit-breaker limit refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerLimit {
    /// `max_requests` in flight: the request is answered 503.
    Requests,
    /// `max_pending_requests` already wait for one of `max_connections`: answered 503.
    Pending,
    /// `max_retries` retries in flight: the retry is not made.
    Retries,
    /// The retry budget (20% of active requests, at least 3): the retry is not made.
    RetryBudget,
}

const OPEN_LIMITS: [&str; 2] = ["requests", "pending"];
const RETRY_LIMITS: [&str; 2] = ["max_retries", "budget"];

/// The upstream counters of one route label.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    retries: [AtomicU64; RETRY_REASONS.len()],
    /// Requests answered 503, by [`OPEN_LIMITS`].
    open: [AtomicU64; OPEN_LIMITS.len()],
    /// Retries not made, by [`RETRY_LIMITS`].
    denied: [AtomicU64; RETRY_LIMITS.len()],
}

impl UpstreamStats {
    /// Count one retry made.
    pub fn retry(&self, why: RetryReason) {
        self.retries[why as usize].fetch_add(1, Relaxed);
    }

    /// Count one refusal by the circuit breaker.
    pub fn refused(&self, limit: BreakerLimit) {
        match limit {
            BreakerLimit::Requests => &self.open[0],
            BreakerLimit::Pending => &self.open[1],
            BreakerLimit::Retries => &self.denied[0],
            BreakerLimit::RetryBudget => &self.denied[1],
        }
        .fetch_add(1, Relaxed);
    }
}

/// Shadow copies started and not made, over all routes.
#[derive(Debug, Default)]
pub(super) struct ShadowCounts {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
}

type Family = fn(&UpstreamStats) -> &[AtomicU64];

/// Append the upstream families (`routes`: escaped label, stats); zero series are left out.
pub(super) fn render(
    out: &mut String,
    routes: &[(String, Arc<RouteStats>)],
    shadow: &ShadowCounts,
) {
    let families: [(&str, &str, &str, &[&str], Family); 3] = [
        (
            "legate_upstream_retries_total",
            "Retries made, by route and what was retried (status, connect, reset, timeout).",
            "reason",
            &RETRY_REASONS,
            |u| &u.retries,
        ),
        (
            "legate_circuit_breaker_open_total",
            "Requests answered 503 because a circuit breaker limit was reached, by route and limit (requests, pending; max_connections overflows as pending).",
            "limit",
            &OPEN_LIMITS,
            |u| &u.open,
        ),
        (
            "legate_upstream_retries_denied_total",
            "Retries retry_on asked for but the circuit breaker refused, by route and limit (max_retries, budget).",
            "limit",
            &RETRY_LIMITS,
            |u| &u.denied,
        ),
    ];
    for (name, help, label, values, f) in families {
        head(out, name, "counter", help);
        for (route, stats) in routes {
            for (v, n) in values.iter().zip(f(&stats.upstream)) {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "{name}{{route=\"{route}\",{label}=\"{v}\"}} {n}");
                }
            }
        }
    }
    head(
        out,
        "legate_shadow_requests_total",
        "counter",
        "Shadow copies, by outcome (sent; dropped: too many in flight or a body not read whole).",
    );
    for (o, n) in [("sent", &shadow.sent), ("dropped", &shadow.dropped)] {
        let _ = writeln!(
            out,
            "legate_shadow_requests_total{{outcome=\"{o}\"}} {}",
            n.load(Relaxed)
        );
    }
}
