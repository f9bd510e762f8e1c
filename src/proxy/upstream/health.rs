//! Upstream address health: passive outlier detection (Envoy's consecutive-failure ejection) and
//! active health checks, per upstream and policy, kept across graph swaps so a reload neither
//! forgets an ejection nor restarts the checkers.
//!
//! Owns the per-address state and the checker tasks' loop. Must not pick addresses (that is
//! `balance`, which asks [`Health::filter`] first) nor dial them (that is `pool`).
//!
//! Rules where Envoy leaves room or Legate differs:
//! - An address is ejected only while the ejected share of the upstream's addresses is below
//!   `max_ejection_percent` (Envoy's test, so the first ejection of two or more addresses is
//!   always allowed when the percent is above 0), and never the last address not ejected.
//! - Ejection lasts `base_ejection_time` × the times the address was ejected (capped at 300 s or
//!   the base, whichever is longer); every `interval` an address spends back in rotation takes one
//!   off that count.
//! - Connect failures and resets count as gateway failures (and as 5xx); per-try timeouts do not.
//! - Addresses start healthy; a health check takes one out after `unhealthy_threshold` failures
//!   and brings it back after `healthy_threshold` passes.
//! - Panic mode: when every address is ejected or unhealthy, all of them take traffic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::pool::HostPool;

/// Where the checkers learn the upstream's current addresses (the balancer, which resolves
/// them): `health` filters what the balancer picks from, so it must not import it.
pub trait Addresses: Send + Sync + 'static {
    /// Every address of the upstream, sorted (empty when the name does not resolve).
    fn addresses(&self) -> impl std::future::Future<Output = Vec<IpAddr>> + Send;
}
use crate::metrics::EndpointStats;
use crate::routes::{HealthCheck, OutlierDetection, Probe};

/// Longest ejection unless the base itself is longer (Envoy's `max_ejection_time` default).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What one exchange with an address came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Status(u16),
    /// Connect failure or reset: a gateway failure.
    LocalFailure,
}

#[derive(Debug, Default)]
struct Address {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the next decay of `times_ejected` is due.
    decay_at: Option<Instant>,
    /// Per health check: whether it holds the address out of rotation.
    failing: Vec<bool>,
    /// Why the last check failed.
    reason: String,
    /// A checker runs for this address (it is in the upstream's current address set).
    checked: bool,
}

impl Address {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    fn unhealthy(&self) -> bool {
        self.failing.iter().any(|f| *f)
    }
}

/// The health of one upstream's addresses under one outlier and health-check policy.
pub(crate) struct Health {
    /// `host:port` of the upstream, for logs, metrics and verification messages.
    pub label: String,
    outlier: Option<OutlierDetection>,
    pub checks: Vec<HealthCheck>,
    state: Mutex<HashMap<IpAddr, Address>>,
    /// Addresses in the set the balancer last saw (for `max_ejection_percent`).
    known: AtomicUsize,
    stats: Arc<EndpointStats>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Health {
    pub fn new(
        label: String,
        outlier: Option<OutlierDetection>,
        checks: Vec<HealthCheck>,
        stats: Arc<EndpointStats>,
    ) -> Health {
        Health {
            label,
            outlier,
            checks,
            state: Mutex::new(HashMap::new()),
            known: AtomicUsize::new(0),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Address>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep only the addresses that may take traffic; all of them when none may (panic mode).
    pub fn filter(&self, addrs: &mut Vec<IpAddr>) {
        self.known.store(addrs.len(), Ordering::Relaxed);
        let now = Instant::now();
        let mut state = self.lock();
        if state.len() > 2 * addrs.len() + 16 {
            // Addresses DNS no longer returns (e.g. replaced pods) are forgotten once they
            // outnumber the live ones, unless an ejection or a checker still holds them.
            state.retain(|ip, a| addrs.contains(ip) || a.ejected(now) || a.checked);
        }
        let (mut ejected, mut unhealthy) = (0, 0);
        let ok = |ip: &IpAddr| {
            state
                .get(ip)
                .is_none_or(|a| !a.ejected(now) && !a.unhealthy())
        };
        for ip in addrs.iter() {
            if let Some(a) = state.get(ip) {
                ejected += usize::from(a.ejected(now));
                unhealthy += usize::from(a.unhealthy());
            }
        }
        self.stats.set_addresses(addrs.len(), ejected, unhealthy);
        if ejected == 0 && unhealthy == 0 {
            return;
        }
        if addrs.iter().any(ok) {
            addrs.retain(ok);
        } else {
            tracing::debug!(upstream = %self.label, "every address is ejected or unhealthy; using all (panic mode)");
        }
    }

    /// Count the outcome of one exchange with `ip`; may eject it.
    pub fn record(&self, ip: IpAddr, outcome: Outcome) {
        let Some(od) = &self.outlier else {
            return;
        };
        let now = Instant::now();
        let mut state = self.lock();
        let ejected_now = state.values().filter(|a| a.ejected(now)).count();
        let a = state.entry(ip).or_default();
        let (five, gateway) = match outcome {
            Outcome::Status(s) if s < 500 => {
                a.consecutive_5xx = 0;
                a.consecutive_gateway = 0;
                if let Some(at) = a.decay_at.filter(|at| now >= *at && !a.ejected(now)) {
                    let elapsed = (now - at).as_nanos() / od.interval.as_nanos().max(1);
                    let steps = u32::try_from(elapsed).unwrap_or(u32::MAX).saturating_add(1);
                    a.times_ejected = a.times_ejected.saturating_sub(steps);
                    a.decay_at = (a.times_ejected > 0).then(|| later(now, od.interval));
                }
                return;
            }
            Outcome::Status(s) => (true, matches!(s, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        a.consecutive_5xx = if five {
            a.consecutive_5xx.saturating_add(1)
        } else {
            0
        };
        a.consecutive_gateway = if gateway {
            a.consecutive_gateway.saturating_add(1)
        } else {
            0
        };
        if a.ejected(now) {
            return;
        }
        let trip = (od.consecutive_5xx > 0 && a.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_gateway_failure > 0
                && a.consecutive_gateway >= od.consecutive_gateway_failure);
        if !trip {
            return;
        }
        a.consecutive_5xx = 0;
        a.consecutive_gateway = 0;
        let n = match self.known.load(Ordering::Relaxed) {
            0 => state.len(),
            k => k,
        };
        if !may_eject(ejected_now, n, od.max_ejection_percent) {
            tracing::debug!(upstream = %self.label, %ip, "not ejected: max_ejection_percent reached");
            return;
        }
        let Some(a) = state.get_mut(&ip) else {
            return;
        };
        a.times_ejected = a.times_ejected.saturating_add(1);
        let time = od
            .base_ejection_time
            .saturating_mul(a.times_ejected)
            .min(MAX_EJECTION.max(od.base_ejection_time));
        a.ejected_until = Some(later(now, time));
        a.decay_at = Some(later(now, time.saturating_add(od.interval)));
        self.stats.ejected();
        tracing::info!(upstream = %self.label, %ip, ms = time.as_millis() as u64, "ejected an upstream address");
    }

    /// `Some(reason)` when health checks run on at least one address and every checked address
    /// fails them.
    pub fn all_down(&self) -> Option<String> {
        if self.checks.is_empty() {
            return None;
        }
        let state = self.lock();
        let checked: Vec<(&IpAddr, &Address)> = state.iter().filter(|(_, a)| a.checked).collect();
        if checked.is_empty() || !checked.iter().all(|(_, a)| a.unhealthy()) {
            return None;
        }
        let last = checked
            .iter()
            .map(|(_, a)| a.reason.as_str())
            .find(|r| !r.is_empty())
            .unwrap_or("");
        Some(format!(
            "all {} address(es) fail their health check ({last})",
            checked.len()
        ))
    }

    fn set_checked(&self, ip: IpAddr, on: bool) {
        let mut state = self.lock();
        if on {
            let a = state.entry(ip).or_default();
            a.checked = true;
            a.failing = vec![false; self.checks.len()];
        } else if let Some(a) = state.get_mut(&ip) {
            a.checked = false;
            a.failing.clear();
        }
    }

    fn set_failing(&self, ip: IpAddr, check: usize, failing: bool, reason: &str) {
        let mut state = self.lock();
        if let Some(a) = state.get_mut(&ip) {
            if let Some(f) = a.failing.get_mut(check) {
                if *f != failing {
                    tracing::info!(upstream = %self.label, %ip, healthy = !failing, reason, "health check changed an address's state");
                }
                *f = failing;
            }
            if !reason.is_empty() {
                a.reason = reason.to_string();
            }
        }
    }

    /// Run the health checks of this upstream until the returned task is aborted: one task per
    /// address, started and stopped as the upstream's address set changes.
    pub fn spawn_checkers<A: Addresses>(
        self: &Arc<Self>,
        pool: Arc<HostPool>,
        balance: Arc<A>,
    ) -> tokio::task::AbortHandle {
        let me = self.clone();
        tokio::spawn(async move { me.supervise(pool, balance).await }).abort_handle()
    }

    async fn supervise<A: Addresses>(self: Arc<Self>, pool: Arc<HostPool>, balance: Arc<A>) {
        // Dropping the map (the supervisor aborted) aborts every address task.
        let mut tasks: HashMap<IpAddr, AbortOnDrop> = HashMap::new();
        let every = self
            .checks
            .iter()
            .map(|c| c.interval)
            .min()
            .unwrap_or(Duration::from_secs(5))
            .max(Duration::from_millis(10));
        loop {
            let addrs = balance.addresses().await;
            tasks.retain(|ip, _| {
                let keep = addrs.contains(ip);
                if !keep {
                    self.set_checked(*ip, false);
                }
                keep
            });
            for ip in addrs {
                if tasks.contains_key(&ip) {
                    continue;
                }
                self.set_checked(ip, true);
                let (me, pool) = (self.clone(), pool.clone());
                tasks.insert(ip, AbortOnDrop(tokio::spawn(me.check_address(pool, ip))));
            }
            tokio::time::sleep(every.max(Duration::from_secs(1))).await;
        }
    }

    async fn check_address(self: Arc<Self>, pool: Arc<HostPool>, ip: IpAddr) {
        let n = self.checks.len();
        // Per check: consecutive failures, consecutive passes, next run.
        let mut fails = vec![0u32; n];
        let mut passes = vec![0u32; n];
        let mut failing = vec![false; n];
        let start = Instant::now();
        let mut next = vec![start; n];
        loop {
            let now = Instant::now();
            for i in 0..n {
                if next[i] > now {
                    continue;
                }
                let c = &self.checks[i];
                next[i] = later(now, c.interval);
                let result = match &c.probe {
                    Probe::Http { .. } => pool.probe(ip, &c.probe, c.timeout).await,
                    Probe::Grpc { .. } => pool.probe_grpc(ip, &c.probe, c.timeout).await,
                };
                match result {
                    Ok(()) => {
                        fails[i] = 0;
                        passes[i] = passes[i].saturating_add(1);
                        if failing[i] && passes[i] >= c.healthy_threshold {
                            failing[i] = false;
                            self.set_failing(ip, i, false, "");
                        }
                    }
                    Err(why) => {
                        passes[i] = 0;
                        fails[i] = fails[i].saturating_add(1);
                        if fails[i] >= c.unhealthy_threshold {
                            failing[i] = true;
                        }
                        self.set_failing(ip, i, failing[i], &why);
                    }
                }
            }
            let Some(wake) = next.iter().min().copied() else {
                return;
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// `now + d`, or a year from now when a configured duration is too large to add.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// Envoy's test: eject while the ejected share is below the percent; never the last address.
fn may_eject(ejected_now: usize, addresses: usize, max_percent: u32) -> bool {
    ejected_now + 1 < addresses && ejected_now * 100 < addresses * max_percent as usize
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The health state of every upstream and policy, shared across graphs.
#[derive(Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<String, Arc<Health>>>,
}

impl Registry {
    /// The health of `label` under this policy (one object per upstream and policy).
    pub fn get(
        &self,
        key: String,
        label: &str,
        outlier: Option<&OutlierDetection>,
        checks: &[HealthCheck],
        metrics: &crate::metrics::Metrics,
    ) -> Arc<Health> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Forget states no graph uses any more (only this map holds them).
        if map.len() > 64 {
            map.retain(|_, h| Arc::strong_count(h) > 1);
        }
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(Health::new(
                    label.to_string(),
                    outlier.cloned(),
                    checks.to_vec(),
                    metrics.upstream(label),
                ))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 2,
            consecutive_gateway_failure: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 10,
        }
    }

    fn ips(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    fn health(od: OutlierDetection) -> Health {
        Health::new("svc:80".into(), Some(od), Vec::new(), Arc::default())
    }

    #[test]
    fn ejection_rule() {
        // One of two, never the last.
        assert!(may_eject(0, 2, 10));
        assert!(!may_eject(1, 2, 100));
        assert!(!may_eject(0, 1, 100));
        // 10 % of 20 is two.
        assert!(may_eject(1, 20, 10));
        assert!(!may_eject(2, 20, 10));
        assert!(!may_eject(0, 5, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_with_each_ejection_and_ends() {
        let h = health(od());
        let all = ips(2);
        let mut a = all.clone();
        h.filter(&mut a);
        let bad = all[0];
        h.record(bad, Outcome::Status(500));
        h.record(bad, Outcome::Status(200));
        h.record(bad, Outcome::Status(503));
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, all, "not consecutive");
        h.record(bad, Outcome::LocalFailure);
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, vec![all[1]]);
        // The other cannot be ejected too.
        h.record(all[1], Outcome::Status(500));
        h.record(all[1], Outcome::Status(500));
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, vec![all[1]]);
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, all, "back after base_ejection_time");
        h.record(bad, Outcome::Status(500));
        h.record(bad, Outcome::Status(500));
        tokio::time::advance(Duration::from_secs(15)).await;
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, vec![all[1]], "second ejection lasts twice the base");
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, all);
        // Behaving for two intervals takes both ejections off the count: the next lasts the
        // base again.
        tokio::time::advance(Duration::from_secs(2)).await;
        h.record(bad, Outcome::Status(200));
        h.record(bad, Outcome::Status(500));
        h.record(bad, Outcome::Status(500));
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut a = all.clone();
        h.filter(&mut a);
        assert_eq!(a, all);
    }

    #[test]
    fn addresses_that_left_are_forgotten() {
        let h = health(od());
        for i in 0..40u8 {
            h.record(IpAddr::from([10, 1, 0, i]), Outcome::Status(500));
        }
        let mut a = ips(2);
        h.filter(&mut a);
        assert!(h.lock().len() <= 2);
    }
}
