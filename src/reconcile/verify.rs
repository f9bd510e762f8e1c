//! Verification window: after a swap, watch what the new revision changed and say whether to
//! keep it. Evidence only: the error ratio of each changed route (from the per-route counters
//! the request path fills, see [`super::evidence`]), HTTP health probes to the changed routes'
//! upstreams (`--health-path`), and the Mappings' active health checks (a hook the proxy
//! implements). Too little traffic is not a failure: the verdict is "verified, unobserved".
//!
//! Owns: the window's rules and its verdict. Must not swap graphs or record history: the
//! reconcile loop runs a window as a task and acts on its verdict only if no newer revision
//! was swapped in meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::evidence::{Changed, Evidence, Tally};
use crate::routes::{Action, Graph, Scheme};

/// What the proxy knows about upstream health beyond per-request counts.
pub trait UpstreamHealth: Send + Sync + 'static {
    /// One line per upstream of the live graph whose every address fails its active health
    /// checks and that the previous graph did not check, naming its Mappings.
    fn unhealthy_upstreams(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How a new revision is watched after the swap, and how a failed one is retried.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// Length of the window; zero disables verification.
    pub window: Duration,
    /// Path probed with `GET` on the plain-HTTP upstreams of changed routes (`None`: no probes).
    pub probe_path: Option<String>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Consecutive failed probes of one upstream that fail the revision.
    pub probe_failures: u32,
    /// A changed route fails when more than this share of its requests failed...
    pub max_error_ratio: f64,
    /// ...and it has at least this many requests.
    pub min_requests: u64,
    /// Count 5xx answers the upstream itself sent as failures (off: only failures the gateway
    /// made: connect errors, resets, timeouts).
    pub count_upstream_5xx: bool,
    /// First delay before a failed revision is retried; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            window: Duration::from_secs(10),
            probe_path: None,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            probe_failures: 3,
            max_error_ratio: 0.2,
            min_requests: 10,
            count_upstream_5xx: false,
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(15 * 60),
        }
    }
}

/// What a window concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Judgement {
    /// Every changed route had enough traffic and stayed under the threshold (or nothing
    /// changed, or verification is off).
    Verified,
    /// No failure seen, but some changed route had fewer requests than the minimum. Still a
    /// rollback target: nothing said it is wrong.
    VerifiedUnobserved,
    /// Evidence of failure: a route over the threshold, a failed probe, an unhealthy upstream.
    Failed,
}

/// One changed route in a verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReport {
    pub mapping: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Why the route was judged: `new`, `changed`, `may receive traffic of ...`.
    pub why: String,
    #[serde(flatten)]
    pub tally: Tally,
    pub failed: bool,
}

/// Route reports kept in a verdict beyond the failed ones (a first revision judges every route).
const MAX_REPORTS: usize = 50;

/// A window's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub judgement: Judgement,
    pub summary: String,
    /// How many routes were judged.
    #[serde(default)]
    pub judged: usize,
    /// The failed routes, then the busiest others, at most 50 of those.
    pub routes: Vec<RouteReport>,
    /// Upstreams whose failure failed the revision: a retry waits until they answer a probe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_upstreams: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.judgement != Judgement::Failed
    }
}

/// A changed route under watch, with what earlier (interrupted) windows saw of the same
/// fingerprint: a steady stream of commits that keep a route as it is still reaches a verdict.
#[derive(Debug, Clone)]
pub struct Watched {
    pub route: Changed,
    pub carried: Tally,
    /// When this fingerprint first went live since the last verified revision.
    pub since: Instant,
}

/// One verification window over a swapped-in revision.
pub struct Window {
    pub graph: Arc<Graph>,
    pub evidence: Arc<Evidence>,
    pub routes: Vec<Watched>,
    pub settings: VerifySettings,
    pub health: Option<Arc<dyn UpstreamHealth>>,
}

impl Window {
    /// What `w` has seen, carried evidence included.
    pub fn tally(&self, w: &Watched) -> Tally {
        w.carried.plus(self.evidence.get(w.route.index))
    }

    /// When the last changed route has been live for the window.
    pub fn deadline(&self) -> Instant {
        let start = self.routes.iter().map(|w| w.since).max();
        start.unwrap_or_else(Instant::now) + self.settings.window
    }

    fn bad(&self, t: &Tally) -> u64 {
        t.failures
            + if self.settings.count_upstream_5xx {
                t.upstream_5xx
            } else {
                0
            }
    }

    fn failing(&self, t: &Tally) -> bool {
        t.requests >= self.settings.min_requests.max(1)
            && self.bad(t) as f64 / t.requests as f64 > self.settings.max_error_ratio
    }

    /// What a verdict keeps: the failed routes, then the busiest others.
    fn kept(&self, mut all: Vec<RouteReport>) -> Vec<RouteReport> {
        all.sort_by_key(|r| (!r.failed, std::cmp::Reverse(r.tally.requests)));
        let failed = all.iter().filter(|r| r.failed).count();
        all.truncate(failed + MAX_REPORTS);
        all
    }

    /// The evidence so far (the failed routes, then the busiest others), for status.
    pub fn progress(&self) -> Vec<RouteReport> {
        self.kept(self.reports())
    }

    fn reports(&self) -> Vec<RouteReport> {
        self.routes
            .iter()
            .map(|w| {
                let t = self.tally(w);
                RouteReport {
                    mapping: w.route.mapping.clone(),
                    upstream: w.route.upstream.clone(),
                    why: w.route.why.clone(),
                    failed: self.failing(&t),
                    tally: t,
                }
            })
            .collect()
    }

    fn what_failed(&self) -> String {
        if self.settings.count_upstream_5xx {
            "failed (gateway-made upstream failures and upstream 5xx)"
        } else {
            "failed at the gateway (connect errors, resets, timeouts)"
        }
        .to_string()
    }

    /// The verdict now, if the evidence already decides (a failure) or the window is over.
    pub fn judge(&self, now: Instant) -> Option<Verdict> {
        let routes = self.reports();
        let failed: Vec<&RouteReport> = routes.iter().filter(|r| r.failed).collect();
        if !failed.is_empty() {
            let parts: Vec<String> = failed
                .iter()
                .map(|r| {
                    format!(
                        "Mapping {} (upstream {}): {} of {} requests {}",
                        r.mapping,
                        r.upstream.as_deref().unwrap_or("-"),
                        self.bad(&r.tally),
                        r.tally.requests,
                        self.what_failed()
                    )
                })
                .collect();
            let failed_upstreams = unique(failed.iter().filter_map(|r| r.upstream.clone()));
            return Some(Verdict {
                judgement: Judgement::Failed,
                summary: format!(
                    "{}; threshold: more than {}% of at least {} requests",
                    parts.join("; "),
                    self.settings.max_error_ratio * 100.0,
                    self.settings.min_requests.max(1)
                ),
                judged: routes.len(),
                routes: self.kept(routes),
                failed_upstreams,
            });
        }
        if now < self.deadline() {
            return None;
        }
        let quiet: Vec<String> = routes
            .iter()
            .filter(|r| r.tally.requests < self.settings.min_requests.max(1))
            .map(|r| format!("{} ({} requests)", r.mapping, r.tally.requests))
            .collect();
        let (judgement, summary) = if quiet.is_empty() {
            (
                Judgement::Verified,
                format!(
                    "{} changed route(s) served under the threshold",
                    routes.len()
                ),
            )
        } else {
            (
                Judgement::VerifiedUnobserved,
                format!(
                    "no failure seen, but too little traffic to judge (fewer than {} requests): {}; still a rollback target",
                    self.settings.min_requests.max(1),
                    quiet.join(", ")
                ),
            )
        };
        Some(Verdict {
            judgement,
            summary,
            judged: routes.len(),
            routes: self.kept(routes),
            failed_upstreams: Vec::new(),
        })
    }

    fn failed_with(&self, summary: String, failed_upstreams: Vec<String>) -> Verdict {
        Verdict {
            judgement: Judgement::Failed,
            summary,
            judged: self.routes.len(),
            routes: self.kept(self.reports()),
            failed_upstreams,
        }
    }

    /// Watch until the evidence decides or the window ends.
    pub async fn run(&self) -> Verdict {
        if self.settings.window.is_zero() || self.routes.is_empty() {
            return Verdict {
                judgement: Judgement::Verified,
                summary: if self.routes.is_empty() {
                    "no route changed".into()
                } else {
                    "verification is off (--verify-window 0)".into()
                },
                judged: self.routes.len(),
                routes: self.kept(self.reports()),
                failed_upstreams: Vec::new(),
            };
        }
        let targets: Vec<String> = match &self.settings.probe_path {
            Some(_) => probe_targets(&self.graph, self.routes.iter().map(|w| w.route.index)),
            None => Vec::new(),
        };
        let client = Prober::new();
        let mut probe_fails: HashMap<String, (u32, String)> = HashMap::new();
        loop {
            if let Some(path) = &self.settings.probe_path {
                for addr in &targets {
                    match client.get(addr, path, self.settings.probe_timeout).await {
                        Ok(()) => {
                            probe_fails.remove(addr);
                        }
                        Err(why) => {
                            let e = probe_fails.entry(addr.clone()).or_default();
                            e.0 += 1;
                            e.1 = why;
                            if e.0 >= self.settings.probe_failures.max(1) {
                                return self.failed_with(
                                    format!(
                                        "health probe GET {path} to {addr} failed {} times: {}",
                                        e.0, e.1
                                    ),
                                    vec![addr.clone()],
                                );
                            }
                        }
                    }
                }
            }
            if let Some(why) = self
                .health
                .as_ref()
                .and_then(|h| h.unhealthy_upstreams().into_iter().next())
            {
                let ups = unique(self.routes.iter().filter_map(|w| w.route.upstream.clone()));
                return self.failed_with(why, ups);
            }
            let now = Instant::now();
            if let Some(v) = self.judge(now) {
                return v;
            }
            let left = self.deadline().saturating_duration_since(now);
            tokio::time::sleep(
                self.settings
                    .probe_interval
                    .min(left)
                    .max(Duration::from_millis(1)),
            )
            .await;
        }
    }
}

fn unique(it: impl Iterator<Item = String>) -> Vec<String> {
    it.collect::<BTreeSet<_>>().into_iter().collect()
}

/// `host:port` of the plain-HTTP upstreams of the routes `indexes`, deduplicated.
pub fn probe_targets(graph: &Graph, indexes: impl Iterator<Item = usize>) -> Vec<String> {
    let mut set = BTreeSet::new();
    for i in indexes {
        if let Some(Action::Forward(f)) = graph.routes.get(i).map(|r| &r.action) {
            if f.upstream.scheme == Scheme::Http {
                set.insert(f.upstream.authority());
            }
        }
    }
    set.into_iter().collect()
}

/// Health probes over hyper's client (no pooled connection: each probe dials, so a restarted
/// upstream is seen as it is now).
pub struct Prober {
    client: Result<crate::outbound::Outbound, String>,
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

impl Prober {
    pub fn new() -> Prober {
        // A fresh connection per probe; `legate run`'s `--upstream-ca` is trusted as well.
        Prober {
            client: crate::outbound::unpooled(),
        }
    }

    /// `GET path` on `addr`; a 2xx or 3xx answer is healthy.
    pub async fn get(&self, addr: &str, path: &str, timeout: Duration) -> Result<(), String> {
        let code = self.status(addr, path, timeout).await?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("status {code}"))
        }
    }

    /// The status `GET path` on `addr` answers with.
    pub async fn status(&self, addr: &str, path: &str, timeout: Duration) -> Result<u16, String> {
        let uri: http::Uri = format!("http://{addr}{path}")
            .parse()
            .map_err(|e| format!("bad probe URL: {e}"))?;
        let req = http::Request::get(uri)
            .header(http::header::USER_AGENT, "legate-verify")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| format!("bad probe request: {e}"))?;
        match &self.client {
            Ok(c) => c.status(req, timeout).await,
            Err(e) => Err(format!("no HTTP client: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::evidence::{changed, Observed};
    use super::*;

    fn window(routes: usize, window: Duration) -> Window {
        let g = crate::routes::Graph::empty();
        let evidence = Evidence::new(routes);
        let now = Instant::now();
        let routes = (0..routes)
            .map(|i| Watched {
                route: Changed {
                    index: i,
                    fingerprint: format!("f{i}"),
                    mapping: format!("default/m{i}"),
                    upstream: Some(format!("127.0.0.1:{}", 9000 + i)),
                    why: "new".into(),
                },
                carried: Tally::default(),
                since: now,
            })
            .collect();
        let _ = changed;
        Window {
            graph: g,
            evidence,
            routes,
            settings: VerifySettings {
                window,
                ..VerifySettings::default()
            },
            health: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_window_is_verified_unobserved_at_its_end() {
        let w = window(1, Duration::from_secs(10));
        let t = Instant::now();
        let v = w.run().await;
        assert_eq!(v.judgement, Judgement::VerifiedUnobserved, "{v:?}");
        assert!(
            v.summary.contains("default/m0 (0 requests)"),
            "{}",
            v.summary
        );
        assert!(t.elapsed() >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_route_fails_early_and_is_named() {
        let w = Arc::new(window(2, Duration::from_secs(10)));
        let w2 = w.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            for _ in 0..10 {
                w2.evidence.record(1, Observed::UpstreamFailure);
                // The other route is busy and fine: it does not dilute route 1's ratio.
                w2.evidence.record(0, Observed::Fine);
            }
        });
        let t = Instant::now();
        let v = w.run().await;
        assert_eq!(v.judgement, Judgement::Failed);
        assert!(v.summary.contains("default/m1"), "{}", v.summary);
        assert!(!v.summary.contains("default/m0"), "{}", v.summary);
        assert_eq!(v.failed_upstreams, vec!["127.0.0.1:9001".to_string()]);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn below_threshold_or_minimum_is_no_failure_and_5xx_count_only_when_asked() {
        let mut w = window(1, Duration::from_secs(5));
        // 2 of 10 is 20%: not more than the 20% threshold.
        for i in 0..10 {
            w.evidence.record(
                0,
                if i < 2 {
                    Observed::UpstreamFailure
                } else {
                    Observed::Fine
                },
            );
        }
        assert_eq!(w.run().await.judgement, Judgement::Verified);
        // Upstream 5xx are not failures by default...
        let e = Evidence::new(1);
        for _ in 0..10 {
            e.record(0, Observed::Upstream5xx);
        }
        w.evidence = e;
        w.routes[0].since = Instant::now();
        assert!(w.judge(Instant::now()).is_none());
        // ...unless asked for.
        w.settings.count_upstream_5xx = true;
        assert_eq!(
            w.judge(Instant::now()).unwrap().judgement,
            Judgement::Failed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn carried_evidence_counts_and_the_window_runs_from_first_live() {
        let mut w = window(1, Duration::from_secs(10));
        w.routes[0].carried = Tally {
            requests: 9,
            failures: 9,
            upstream_5xx: 0,
        };
        w.routes[0].since = Instant::now();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(w.judge(Instant::now()).is_none());
        w.evidence.record(0, Observed::UpstreamFailure);
        assert_eq!(
            w.judge(Instant::now()).unwrap().judgement,
            Judgement::Failed
        );
        // The deadline is 10 s after the route first went live, not after this window began.
        assert_eq!(w.deadline(), w.routes[0].since + Duration::from_secs(10));
    }

    #[tokio::test]
    async fn probes_use_http_and_name_the_failure() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let p = Prober::new();
        let e = p
            .get(&addr, "/healthz", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.contains("connect") || e.contains("refused"), "{e}");
    }
}
