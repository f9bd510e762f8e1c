//! Recent traffic for the dashboard: a small in-process ring of snapshots of the per-route
//! counters, taken every few seconds, from which request rate, error ratio and p99 per route
//! over the last minutes are computed, without Prometheus. Must not count anything itself: it
//! only reads [`Metrics`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::{Metrics, BUCKETS_US};

/// One route's counters at one moment.
#[derive(Debug, Clone, Default)]
struct RouteSample {
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS_US.len()],
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    routes: BTreeMap<String, RouteSample>,
}

/// One route's traffic over a recent window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteRate {
    /// The route label (a Mapping's `stats_name`; `none`: no route matched).
    pub route: String,
    pub requests: u64,
    pub per_second: f64,
    /// Share of 5xx answers; `None` without requests.
    pub error_ratio: Option<f64>,
    /// Upper bound of the bucket holding the 99th percentile, in milliseconds; `None` without
    /// requests or above the largest bucket (10 s).
    pub p99_ms: Option<f64>,
}

/// Recent traffic over a window, as `GET /api/traffic` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    /// The seconds the figures cover (shorter than asked while the ring fills).
    pub seconds: f64,
    pub routes: Vec<RouteRate>,
}

/// The ring of snapshots.
#[derive(Debug)]
pub struct Recent {
    metrics: Arc<Metrics>,
    ring: Mutex<VecDeque<Sample>>,
    keep: usize,
}

impl Recent {
    /// A ring of at most `keep` snapshots of `metrics`.
    pub fn new(metrics: Arc<Metrics>, keep: usize) -> Arc<Recent> {
        Arc::new(Recent {
            metrics,
            ring: Mutex::new(VecDeque::new()),
            keep: keep.max(1),
        })
    }

    /// Take a snapshot every `every` while the ring is referenced elsewhere.
    pub fn spawn(self: &Arc<Self>, every: Duration) {
        let me: Weak<Recent> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match me.upgrade() {
                    Some(r) => r.sample(),
                    None => return,
                }
            }
        });
    }

    /// Take one snapshot now.
    pub fn sample(&self) {
        let s = self.read();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.push_back(s);
        while ring.len() > self.keep {
            ring.pop_front();
        }
    }

    fn read(&self) -> Sample {
        let routes = self
            .metrics
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let routes = routes
            .iter()
            .map(|(name, s)| {
                let mut r = RouteSample::default();
                for by_status in &s.requests {
                    r.requests += by_status.iter().map(|n| n.load(Relaxed)).sum::<u64>();
                    r.errors += by_status[4].load(Relaxed);
                }
                for (b, n) in r.buckets.iter_mut().zip(&s.buckets) {
                    *b = n.load(Relaxed);
                }
                (name.clone(), r)
            })
            .collect();
        Sample {
            at: Instant::now(),
            routes,
        }
    }

    /// Traffic per route between the oldest snapshot inside `window` and now. Routes without
    /// requests in the window are left out.
    pub fn traffic(&self, window: Duration) -> Traffic {
        let now = self.read();
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let since = now.at.checked_sub(window);
        let Some(base) = ring
            .iter()
            .find(|s| since.is_none_or(|t| s.at >= t))
            .or(ring.back())
        else {
            return Traffic {
                seconds: 0.0,
                routes: Vec::new(),
            };
        };
        let seconds = now.at.duration_since(base.at).as_secs_f64();
        let empty = RouteSample::default();
        let routes = now
            .routes
            .iter()
            .filter_map(|(name, cur)| {
                let old = base.routes.get(name).unwrap_or(&empty);
                let requests = cur.requests.saturating_sub(old.requests);
                if requests == 0 {
                    return None;
                }
                let errors = cur.errors.saturating_sub(old.errors);
                let mut buckets = [0; BUCKETS_US.len()];
                for (i, b) in buckets.iter_mut().enumerate() {
                    *b = cur.buckets[i].saturating_sub(old.buckets[i]);
                }
                Some(RouteRate {
                    route: name.clone(),
                    requests,
                    per_second: if seconds > 0.0 {
                        requests as f64 / seconds
                    } else {
                        0.0
                    },
                    error_ratio: Some(errors as f64 / requests as f64),
                    p99_ms: quantile_bound(&buckets, requests, 0.99),
                })
            })
            .collect();
        Traffic { seconds, routes }
    }
}

/// The upper bound (ms) of the bucket holding quantile `q` of `count` observations, given
/// non-cumulative bucket counts; `None` when it lies above the largest bucket.
fn quantile_bound(buckets: &[u64], count: u64, q: f64) -> Option<f64> {
    let rank = (count as f64 * q).ceil() as u64;
    let mut cum = 0;
    for (n, bound) in buckets.iter().zip(BUCKETS_US) {
        cum += n;
        if cum >= rank.max(1) {
            return Some(bound as f64 / 1e3);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, StatusCode};

    #[tokio::test(start_paused = true)]
    async fn rates_cover_only_the_window() {
        let m = Metrics::new();
        let r = m.route("api");
        let get = super::super::method_class(&Method::GET);
        for _ in 0..50 {
            r.record(get, StatusCode::OK, Duration::from_millis(3));
        }
        let recent = Recent::new(m.clone(), 100);
        recent.sample();
        tokio::time::advance(Duration::from_secs(10)).await;
        recent.sample();
        // In the last 10 s: 18 fast answers, 2 slow 502s.
        for _ in 0..18 {
            r.record(get, StatusCode::OK, Duration::from_millis(3));
        }
        for _ in 0..2 {
            r.record(get, StatusCode::BAD_GATEWAY, Duration::from_millis(400));
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let t = recent.traffic(Duration::from_secs(10));
        assert_eq!(t.seconds, 10.0);
        assert_eq!(t.routes.len(), 1, "{t:?}");
        let a = &t.routes[0];
        assert_eq!((a.route.as_str(), a.requests), ("api", 20));
        assert_eq!(a.per_second, 2.0);
        assert_eq!(a.error_ratio, Some(0.1));
        assert_eq!(
            a.p99_ms,
            Some(500.0),
            "the 400 ms answers sit in the 500 ms bucket"
        );
        // Over the whole ring the first 50 count too.
        let all = recent.traffic(Duration::from_secs(3600));
        assert_eq!(
            all.routes[0].requests, 20,
            "the ring starts at its first snapshot"
        );
        assert_eq!(all.seconds, 20.0);
    }

    #[test]
    fn quantile_bound_picks_the_bucket() {
        let mut b = [0u64; BUCKETS_US.len()];
        b[0] = 99;
        b[5] = 1;
        assert_eq!(quantile_bound(&b, 100, 0.99), Some(1.0));
        assert_eq!(quantile_bound(&b, 100, 1.0), Some(50.0));
        assert_eq!(quantile_bound(&[0; BUCKETS_US.len()], 3, 0.99), None);
    }
}
