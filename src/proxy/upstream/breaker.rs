//! Circuit breakers (Emissary's `circuit_breakers`, Envoy's semantics): per upstream and limit
//! set, at most `max_requests` requests in flight, `max_connections` connections open (idle or
//! busy, held from dial to close by `pool` for HTTP/1.1 and by `h2` for HTTP/2),
//! `max_pending_requests` requests waiting for one, and `max_retries` retries in flight
//! (also held to the retry budget: 20% of active requests, at least 3). Over a limit the request
//! is answered 503 at once with `x-legate-overloaded: circuit-breaker`; nothing queues beyond
//! the pending limit.
//!
//! Owns only counters; the request path (`retry`) asks before each attempt and keeps the guards
//! until the response body is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::BreakerLimit;
use crate::proxy::respond::ProxyError;
use crate::routes::BreakerLimits;

/// Envoy's retry budget: retries in flight may reach this share of active requests...
const BUDGET_PERCENT: u32 = 20;
/// ...and at least this many whatever the traffic.
const MIN_RETRY_CONCURRENCY: u32 = 3;

/// The breakers of every upstream, shared across graphs so a reload keeps the counts.
#[derive(Default)]
pub(crate) struct Breakers {
    map: Mutex<HashMap<(String, BreakerLimits), Arc<Breaker>>>,
}

impl Breakers {
    /// The breaker of `upstream` (`scheme://authority`) with these limits.
    pub fn get(&self, upstream: String, limits: BreakerLimits) -> Arc<Breaker> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Forget breakers no graph uses any more (only this map holds them).
        if map.len() > 64 {
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        map.entry((upstream, limits))
            .or_insert_with(|| Arc::new(Breaker::new(limits)))
            .clone()
    }
}

/// The counters of one upstream.
pub(crate) struct Breaker {
    limits: BreakerLimits,
    active: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    connections: Arc<Semaphore>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("limits", &self.limits)
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Counts one request in flight until dropped.
pub(crate) struct Active(Arc<Breaker>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one retry in flight until dropped.
pub(crate) struct Retry(Arc<Breaker>);

impl Drop for Retry {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one request waiting for a connection until dropped.
pub(crate) struct Pending<'a>(&'a Breaker);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    fn new(limits: BreakerLimits) -> Breaker {
        Breaker {
            limits,
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
        }
    }

    /// Admit a request, or refuse it because `max_requests` are in flight.
    pub fn request(self: &Arc<Self>) -> Result<Active, ProxyError> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let guard = Active(self.clone());
        if before >= self.limits.max_requests {
            return Err(ProxyError::Overloaded);
        }
        Ok(guard)
    }

    /// A connection slot; waits as a pending request when all are taken, or refuses when
    /// `max_pending_requests` already wait (the pools do this in steps, to evict in between).
    #[cfg(test)]
    pub async fn connection(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Some(p) = self.try_connection() {
            return Ok(p);
        }
        let _pending = self.pending()?;
        self.wait_connection().await
    }

    /// A free connection slot, if any (no waiting).
    pub fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Count the caller as a pending request, or refuse because `max_pending_requests` wait.
    pub fn pending(&self) -> Result<Pending<'_>, ProxyError> {
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let guard = Pending(self);
        if before >= self.limits.max_pending_requests {
            return Err(ProxyError::Overloaded);
        }
        Ok(guard)
    }

    /// Wait for a connection slot (the caller counts itself as pending first).
    pub async fn wait_connection(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        self.connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ProxyError::Internal("connection limiter closed".into()))
    }

    /// Permission for one more retry, within `max_retries` and the retry budget; refused, the
    /// limit that was reached.
    pub fn retry(self: &Arc<Self>) -> Result<Retry, BreakerLimit> {
        let active = self.active.load(Ordering::Acquire);
        let budget = (active * BUDGET_PERCENT / 100).max(MIN_RETRY_CONCURRENCY);
        let before = self.retries.fetch_add(1, Ordering::AcqRel);
        let guard = Retry(self.clone());
        if before >= self.limits.max_retries {
            Err(BreakerLimit::Retries)
        } else if before >= budget {
            Err(BreakerLimit::RetryBudget)
        } else {
            Ok(guard)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_requests: u32, max_retries: u32) -> BreakerLimits {
        BreakerLimits {
            max_requests,
            max_retries,
            ..BreakerLimits::default()
        }
    }

    #[test]
    fn requests_over_the_limit_are_refused_and_slots_come_back() {
        let b = Arc::new(Breaker::new(limits(2, 3)));
        let a1 = b.request().unwrap();
        let _a2 = b.request().unwrap();
        assert!(matches!(b.request(), Err(ProxyError::Overloaded)));
        drop(a1);
        assert!(b.request().is_ok());
    }

    #[test]
    fn retries_follow_the_budget_and_max_retries() {
        let b = Arc::new(Breaker::new(limits(1024, 1000)));
        // 10 active: the budget is max(3, 2) = 3.
        let active: Vec<_> = (0..10).map(|_| b.request().unwrap()).collect();
        let held: Vec<_> = (0..3).map(|_| b.retry().unwrap()).collect();
        assert_eq!(b.retry().err(), Some(BreakerLimit::RetryBudget));
        drop(held);
        // 50 active: 20% is 10.
        let more: Vec<_> = (0..40).map(|_| b.request().unwrap()).collect();
        let held: Vec<_> = (0..10).map(|_| b.retry().unwrap()).collect();
        assert!(b.retry().is_err());
        drop((held, more, active));
        // max_retries caps the budget.
        let b = Arc::new(Breaker::new(limits(1024, 1)));
        let _r = b.retry().unwrap();
        assert_eq!(b.retry().err(), Some(BreakerLimit::Retries));
    }

    #[tokio::test]
    async fn pending_requests_are_bounded() {
        let b = Arc::new(Breaker::new(BreakerLimits {
            max_connections: 1,
            max_pending_requests: 1,
            ..BreakerLimits::default()
        }));
        let held = b.connection().await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.connection().await.map(drop) })
        };
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(b.connection().await, Err(ProxyError::Overloaded)));
        drop(held);
        waiter.await.unwrap().unwrap();
    }
}
