//! Observability: `GET /metrics` after known traffic (counts match, promtool accepts the text),
//! retry, circuit-breaker and git fetch metrics, the access log line of a request (retries,
//! trace id, upstream address), and W3C `traceparent` propagation.

use std::sync::Arc;

use legate::admin::AdminState;
use legate::reconcile::{self, Outcome};
use legate::source::dir::DirSource;

use crate::reconcile::{outcome, settings};
use crate::support::{get, mapping, route, send, Gateway, Tree, Upstream};
use crate::traffic::{flaky, gate, gated, spawn_gets, Scripted};

fn config(up: &Upstream) -> String {
    let svc = up.service();
    [
        route("api", "/api/", &svc, "stats_name: api-stats"),
        route("web", "/web/", &svc, ""),
        route("slow", "/slow/", &svc, "timeout_ms: 50"),
        // Nothing listens on port 1: every request is a connect failure.
        mapping(
            "dead",
            "hostname: '*'\nprefix: /dead/\nservice: 127.0.0.1:1",
        ),
    ]
    .concat()
}

/// The value of the sample with exactly this name and label set.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

/// The sum of every series of metric `name`, whatever its labels.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_known_traffic_and_pass_promtool() {
    let up = Upstream::start("u").await;
    let yaml = config(&up);
    let gw = Gateway::start(&yaml).await;
    // The real reconciler feeding the same proxy, so revision and pass metrics are live.
    let tree = Tree::new(&yaml);
    let src = Arc::new(DirSource::new(
        tree.path(),
        legate::config::Options::default().tree,
        None,
    ));
    let h = reconcile::start(src, gw.proxy.clone(), settings(None), None);
    // Subscribed before the first pass can run (the test runtime is single-threaded).
    reconcile::count_outcomes(gw.proxy.metrics(), h.subscribe());
    let first = h.sync().await;
    assert!(matches!(outcome(&first), Some(Outcome::Applied) | None));
    assert!(h.status().applied.is_some(), "{first:?}");

    for _ in 0..3 {
        assert_eq!(get(&gw.url("/api/x?token=secret"), &[]).await.status, 200);
    }
    for _ in 0..2 {
        let r = send("POST", &gw.url("/web/y"), &[], crate::support::empty()).await;
        assert_eq!(r.status, 200);
    }
    // An upstream's own 503 is relayed: a 5xx for the route, not a gateway error.
    assert_eq!(get(&gw.url("/web/z?status=503"), &[]).await.status, 503);
    assert_eq!(get(&gw.url("/nowhere/raw-path"), &[]).await.status, 404);
    assert_eq!(get(&gw.url("/dead/"), &[]).await.status, 502);
    assert_eq!(get(&gw.url("/slow/?sleep_ms=5000"), &[]).await.status, 504);

    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let state = AdminState {
        reconciler: h.clone(),
        hook_secret: None,
        graph: None,
        // A token guards mutating calls only: /metrics stays open.
        token: Some(Arc::new("t0ken".into())),
        metrics: Some(gw.proxy.metrics().clone()),
        recent: None,
    };
    let server = tokio::spawn(legate::admin::serve(admin, state));
    let url = format!("http://{admin_addr}/metrics");

    // The history event reaches the metrics through a broadcast: wait for it.
    let mut text = String::new();
    for _ in 0..500 {
        let r = get(&url, &[]).await;
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        text = r.body;
        if sample(
            &text,
            "legate_reconcile_revisions_total{outcome=\"applied\"}",
        ) == Some(1.0)
        {
            break;
        }
        tokio::task::yield_now().await;
    }
    let req = |route: &str, m: &str, s: &str| {
        sample(
            &text,
            &format!("legate_requests_total{{route=\"{route}\",method=\"{m}\",status=\"{s}\"}}"),
        )
    };
    assert_eq!(
        sample(
            &text,
            "legate_reconcile_revisions_total{outcome=\"applied\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(req("api-stats", "GET", "2xx"), Some(3.0), "{text}");
    assert_eq!(req("web", "POST", "2xx"), Some(2.0), "{text}");
    assert_eq!(req("web", "GET", "5xx"), Some(1.0), "{text}");
    assert_eq!(req("none", "GET", "4xx"), Some(1.0), "{text}");
    assert_eq!(req("dead", "GET", "5xx"), Some(1.0), "{text}");
    assert_eq!(req("slow", "GET", "5xx"), Some(1.0), "{text}");
    // The Mapping name is not a label when stats_name is set.
    assert_eq!(req("api", "GET", "2xx"), None);
    assert_eq!(
        sample(
            &text,
            "legate_request_duration_seconds_count{route=\"api-stats\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "legate_request_duration_seconds_bucket{route=\"web\",le=\"+Inf\"}"
        ),
        Some(3.0)
    );
    // Failures the gateway answered itself, by route.
    assert_eq!(
        sample(
            &text,
            "legate_upstream_connect_failures_total{route=\"dead\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "legate_upstream_timeouts_total{route=\"slow\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "legate_gateway_errors_total{route=\"dead\"}"),
        Some(1.0)
    );
    assert_eq!(total(&text, "legate_gateway_errors_total"), 2.0, "{text}");
    assert!(sample(&text, "legate_downstream_connections").is_some());
    let rev = h.status().applied.unwrap();
    assert_eq!(
        sample(
            &text,
            &format!("legate_revision_info{{revision=\"{rev}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "legate_reconcile_passes_total{outcome=\"fetched\"}"),
        Some(h.status().passes as f64)
    );
    assert!(sample(&text, "legate_source_last_success_age_seconds").is_some());
    // Bounded labels: no raw paths, query values or revision ids on request metrics.
    for bad in ["raw-path", "secret", "/api/"] {
        assert!(!text.contains(bad), "{bad} leaked into the metrics");
    }
    assert!(!text
        .lines()
        .any(|l| l.starts_with("legate_request") && l.contains(&rev)));

    promtool_check(&text);
    server.abort();
}

/// `promtool check metrics` (Debian package `prometheus`) must accept the exposition.
fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            crate::support::tool_missing(
                "promtool check",
                &format!("promtool not runnable ({e}); install the Debian package `prometheus`"),
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected the metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn access_log_lines_match_the_requests() {
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, settings) = logging_to(dir.path());
    let gw = Gateway::with(&config(&up), settings).await;

    let given = get(
        &gw.url("/api/x?token=secret"),
        &[("x-request-id", "req-1"), ("user-agent", "legate-test/1")],
    )
    .await;
    assert_eq!(given.status, 200);
    let generated = get(&gw.url("/web/y"), &[]).await;
    assert_eq!(generated.status, 200);
    let nowhere = get(&gw.url("/nowhere"), &[]).await;
    assert_eq!(nowhere.status, 404);

    let lines = log_lines(&path, 3).await;
    let by_path = |p: &str| lines.iter().find(|l| l["path"] == p).unwrap().clone();
    let rev = &gw.proxy.graph().hash[..12];

    let a = by_path("/api/x");
    assert_eq!(a["request_id"], "req-1");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["host"], gw.http.to_string());
    assert_eq!(a["status"], 200);
    assert_eq!(a["bytes"], given.body.len() as u64);
    assert_eq!(a["upstream"], up.service());
    assert!(a["route"].as_str().unwrap().ends_with("/api"), "{a}");
    assert_eq!(a["revision"], rev);
    assert_eq!(a["retries"], 0);
    assert!(a["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(a["time"].as_str().unwrap().ends_with('Z'));

    // The id the gateway made up is the one the upstream saw.
    let w = by_path("/web/y");
    assert_eq!(
        w["request_id"].as_str(),
        generated.seen("x-request-id").as_deref()
    );
    assert_eq!(w["bytes"], generated.body.len() as u64);

    let n = by_path("/nowhere");
    assert_eq!(n["status"], 404);
    assert!(n["route"].is_null() && n["upstream"].is_null());
    // Every line has an id, the gateway's own answers too, and the client got it to quote.
    assert_eq!(
        n["request_id"].as_str(),
        nowhere.header("x-request-id"),
        "{n}"
    );
    assert_eq!(n["error"], "no route matches the request");
    assert!(a["error"].is_null());
    assert_eq!(a["user_agent"], "legate-test/1");
    // The TCP peer: this test's client on loopback.
    assert!(
        a["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{a}"
    );
    // The query string never reaches the log.
    assert!(!std::fs::read_to_string(&path).unwrap().contains("secret"));
}

/// Proxy settings with the access log going to `access.log` under `dir`.
fn logging_to(dir: &std::path::Path) -> (std::path::PathBuf, legate::proxy::Settings) {
    use legate::proxy::accesslog::{AccessLog, Sink};
    let path = dir.join("access.log");
    let settings = legate::proxy::Settings {
        access_log: Some(AccessLog::start(Sink::File(path.clone())).unwrap()),
        ..Default::default()
    };
    (path, settings)
}

/// The access log's lines once there are `n` (the writer is a thread of its own).
async fn log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    crate::support::eventually("the access log lines", || read().len() == n).await;
    read()
}

/// A `traceparent` as `(trace id, parent id, flags)`, checked for the W3C shape.
fn traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert_eq!(parts[0], "00");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(hex(parts[1], 32) && parts[1] != "0".repeat(32), "{v}");
    assert!(hex(parts[2], 16) && parts[2] != "0".repeat(16), "{v}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn traceparent_is_forwarded_with_a_new_parent_or_started() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start(&config(&up)).await;

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(
        &gw.url("/api/"),
        &[("traceparent", given), ("tracestate", "vendor=1")],
    )
    .await;
    let (trace, parent, flags) = traceparent(&r.seen("traceparent").unwrap());
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7");
    assert_eq!(flags, "01");
    assert_eq!(r.seen("tracestate").as_deref(), Some("vendor=1"));

    // Absent: a new trace, not sampled at the default ratio of 0; each request its own.
    let a = get(&gw.url("/api/"), &[])
        .await
        .seen("traceparent")
        .unwrap();
    let b = get(&gw.url("/api/"), &[])
        .await
        .seen("traceparent")
        .unwrap();
    let (ta, _, fa) = traceparent(&a);
    let (tb, _, _) = traceparent(&b);
    assert_ne!(ta, tb);
    assert_eq!(fa, "00");

    // Malformed: replaced by a new trace, and its tracestate dropped.
    let r = get(
        &gw.url("/api/"),
        &[("traceparent", "00-xyz-01"), ("tracestate", "vendor=1")],
    )
    .await;
    traceparent(&r.seen("traceparent").unwrap());
    assert_eq!(r.seen("tracestate"), None);

    // Sample ratio 1: every new trace is sampled.
    let settings = legate::proxy::Settings {
        trace_sample_ratio: Some(1.0),
        ..Default::default()
    };
    let all = Gateway::with(&config(&up), settings).await;
    let v = get(&all.url("/api/"), &[])
        .await
        .seen("traceparent")
        .unwrap();
    assert_eq!(traceparent(&v).2, "01");
}

/// Routes for the upstream-policy counters: retries on status and on connect failure, a small
/// `max_requests` breaker, and a breaker that allows no retry.
fn policies(flaky: &Scripted, gated: &Scripted, refused: &Scripted, dead: &str) -> String {
    [
        route("r", "/r/", &flaky.service(), "stats_name: retried\nretry_policy:\n  retry_on: 5xx\n  num_retries: 3"),
        route("c", "/c/", dead, "retry_policy:\n  retry_on: connect-failure\n  num_retries: 2"),
        route("b", "/b/", &gated.service(), "timeout_ms: 60000\ncircuit_breakers:\n  - max_requests: 2"),
        route("n", "/n/", &refused.service(), "retry_policy:\n  retry_on: 5xx\n  num_retries: 3\ncircuit_breakers:\n  - max_retries: 0"),
    ]
    .concat()
}

/// A loopback address nothing listens on.
async fn dead_addr() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_circuit_breaker_counters_match_the_traffic() {
    // Five 503s, then 200s: the first request uses all 3 retries and fails, the second
    // succeeds on its second attempt.
    let up = flaky(5, 503).await;
    let (open, rx) = gate();
    let held_up = gated(rx).await;
    let refused_up = flaky(10, 503).await;
    let gw = Gateway::start(&policies(&up, &held_up, &refused_up, &dead_addr().await)).await;

    assert_eq!(get(&gw.url("/r/x"), &[]).await.status, 503);
    assert_eq!(get(&gw.url("/r/x"), &[]).await.status, 200);
    assert_eq!(up.hits(), 6, "4 + 2 attempts");
    // Every attempt refused at connect: 2 retries, then 502.
    assert_eq!(get(&gw.url("/c/x"), &[]).await.status, 502);
    // max_retries 0: the 503 goes through unretried, and the refusal is counted.
    assert_eq!(get(&gw.url("/n/x"), &[]).await.status, 503);
    assert_eq!(refused_up.hits(), 1);

    // Two requests hold the max_requests: 2 breaker; the next ones are refused at once.
    let url = gw.url("/b/x");
    let held = spawn_gets(&url, 2);
    crate::support::eventually("two requests held", || held_up.hits() == 2).await;
    let mut breaker_503s = 0;
    for _ in 0..3 {
        let r = get(&url, &[]).await;
        if r.status == 503 && r.header("x-legate-overloaded") == Some("circuit-breaker") {
            breaker_503s += 1;
        }
    }
    assert_eq!(breaker_503s, 3);
    open.send(true).unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }

    let text = gw.proxy.metrics().render(None);
    let retries = |route: &str, reason: &str| {
        sample(
            &text,
            &format!("legate_upstream_retries_total{{route=\"{route}\",reason=\"{reason}\"}}"),
        )
    };
    // The upstream's hits minus the requests that reached it: the retries made.
    assert_eq!(retries("retried", "status"), Some(4.0), "{text}");
    assert_eq!(retries("c", "connect"), Some(2.0), "{text}");
    assert_eq!(retries("b", "status"), None, "{text}");
    assert_eq!(
        sample(
            &text,
            "legate_circuit_breaker_open_total{route=\"b\",limit=\"requests\"}"
        ),
        Some(breaker_503s as f64),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "legate_upstream_retries_denied_total{route=\"n\",limit=\"max_retries\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // The 503 the breaker made is a gateway answer, the relayed ones are not.
    assert_eq!(
        total(&text, "legate_gateway_errors_total"),
        breaker_503s as f64 + 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "legate_shadow_requests_total{outcome=\"sent\"}"),
        Some(0.0)
    );
    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_shows_retries_trace_id_and_upstream_address() {
    let flaky_up = flaky(2, 503).await;
    let up = Upstream::start("u").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, settings) = logging_to(dir.path());
    let yaml = route(
        "r",
        "/r/",
        &flaky_up.service(),
        "retry_policy:\n  retry_on: 5xx\n  num_retries: 3",
    ) + &config(&up);
    let gw = Gateway::with(&yaml, settings).await;

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(&gw.url("/r/x"), &[("traceparent", given)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(flaky_up.hits(), 3);
    let started = get(&gw.url("/api/started"), &[]).await;
    assert_eq!(started.status, 200);
    let sent_trace = traceparent(&started.seen("traceparent").unwrap()).0;
    assert_eq!(
        get(&gw.url("/nowhere"), &[("traceparent", given)])
            .await
            .status,
        404
    );

    assert_eq!(get(&gw.url("/dead/"), &[]).await.status, 502);

    let lines = log_lines(&path, 4).await;
    let by_path = |p: &str| lines.iter().find(|l| l["path"] == p).unwrap().clone();

    let retried = by_path("/r/x");
    assert_eq!(retried["retries"], 2, "{retried}");
    assert_eq!(retried["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(retried["upstream"], flaky_up.service());
    assert_eq!(retried["upstream_addr"], flaky_up.service());

    // No traceparent sent: the trace the gateway started, as the upstream received it.
    let s = by_path("/api/started");
    assert_eq!(s["retries"], 0);
    assert_eq!(s["trace_id"], sent_trace.as_str(), "{s}");
    assert_eq!(s["upstream_addr"], up.service());

    // Forwarded, but no connection was made: no address.
    let dead = by_path("/dead/");
    assert_eq!(dead["upstream"], "127.0.0.1:1");
    assert!(dead["upstream_addr"].is_null(), "{dead}");

    // Never forwarded: the client's trace id still, and no upstream.
    let n = by_path("/nowhere");
    assert_eq!(n["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(n["upstream_addr"].is_null() && n["upstream"].is_null());
}

#[tokio::test]
async fn git_fetch_durations_are_counted_by_outcome() {
    use crate::git_source::{start_git, Repo};
    let repo = Repo::new();
    repo.commit(
        &[(
            "m.yaml",
            Some(&crate::reconcile::mapping("a", "/a/", "127.0.0.1:9")),
        )],
        "first",
    );
    let metrics = legate::metrics::Metrics::new();
    let cache = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.metrics = Some(metrics.clone());
    let (h, _live) = start_git(&repo.url(), "main", cache.path(), s.clone());
    h.sync().await;
    assert!(h.status().applied.is_some());
    repo.commit(&[], "second");
    h.sync().await;
    let fetched = h.status().passes;
    assert!(fetched >= 2);

    // A remote that does not exist: failed fetches (no retry before the test reads them).
    s.backoff = std::time::Duration::from_secs(3600);
    let gone = tempfile::tempdir().unwrap();
    let missing = format!("file://{}/nothing-here", gone.path().display());
    let (bad, _live) = start_git(&missing, "main", gone.path(), s);
    assert!(matches!(
        bad.sync().await,
        reconcile::PassResult::SourceFailed { .. }
    ));
    let failed = bad.status().passes;

    let text = metrics.render(None);
    let series = |outcome: &str, part: &str| {
        sample(
            &text,
            &format!(
                "legate_source_fetch_duration_seconds_{part}{{source=\"git\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(series("success", "count"), Some(fetched as f64), "{text}");
    assert_eq!(series("failure", "count"), Some(failed as f64), "{text}");
    let inf = "legate_source_fetch_duration_seconds_bucket{source=\"git\",outcome=\"success\",le=\"+Inf\"}";
    assert_eq!(sample(&text, inf), Some(fetched as f64));
    assert!(series("success", "sum").unwrap() > 0.0, "{text}");
    promtool_check(&text);
}
