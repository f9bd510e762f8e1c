//! OTLP trace export (issue 20) against a real receiver: `support/otlp_receiver.py` decodes
//! each export with the `opentelemetry-proto` package. Checks the server span and the client
//! spans of attempts, retries and shadow copies with their parent-child links and HTTP
//! attributes, a continued client `traceparent`, and parent-based sampling.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use legate::otlp::{ExportSettings, Exporter, Target};
use legate::proxy::Settings;
use serde_json::Value;

use crate::support::*;

const PIP: &str = "python3 -m pip install opentelemetry-proto==1.45.2";

fn receiver_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/otlp_receiver.py")
}

/// The receiver process and every span (or error) it printed so far.
pub struct Receiver {
    _child: Killed,
    pub port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Start the receiver; `None` (a failure under CI) when opentelemetry-proto is missing.
    pub fn start(test: &str) -> Option<Receiver> {
        let ok = Command::new("python3")
            .arg(receiver_script())
            .arg("check")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            tool_missing(
                test,
                &format!("python3 opentelemetry-proto is not installed ({PIP})"),
            );
            return None;
        }
        let mut child = Command::new("python3")
            .arg(receiver_script())
            .arg("serve")
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let out = child.stdout.take().unwrap();
        let child = Killed(child);
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("otlp_receiver.py serve printed {line:?}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                let v: Value = serde_json::from_str(&l).expect("the receiver prints JSON");
                sink.lock().unwrap().push(v);
            }
        });
        Some(Receiver {
            _child: child,
            port,
            lines,
        })
    }

    /// The traces URL, as `--otlp-endpoint` makes it.
    pub fn url(&self) -> http::Uri {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
            .parse()
            .unwrap()
    }

    /// Everything received, once `done` holds for it (20 s at most, then the test fails).
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.lines.lock().unwrap().clone();
            assert!(
                got.iter().all(|v| v.get("error").is_none()),
                "the receiver refused an export: {got:#?}"
            );
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < until,
                "no {what} within 20 s; received: {got:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The spans of trace `trace` (hex).
pub fn of_trace<'a>(spans: &'a [Value], trace: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["trace_id"] == trace).collect()
}

pub fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

const SERVER: i64 = 2;
const CLIENT: i64 = 3;

fn kind(s: &Value) -> i64 {
    s["kind"].as_i64().unwrap()
}

fn exporter(rx: &Receiver) -> Exporter {
    Exporter::start(ExportSettings {
        target: Some(Target {
            url: rx.url(),
            service_name: "edge".into(),
        }),
    })
}

/// The trace id and parent span id of a `traceparent` the upstream saw.
fn ids(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exports_server_and_client_spans_linked_with_http_attributes() {
    let Some(rx) =
        Receiver::start("otlp_exports_server_and_client_spans_linked_with_http_attributes")
    else {
        return;
    };
    let up = Upstream::start("u").await;
    let copy = Upstream::start("copy").await;
    let yaml = [
        route("api", "/api/", &up.service(), ""),
        route(
            "retried",
            "/r/",
            &up.service(),
            "retry_policy:\n  retry_on: 5xx\n  num_retries: 1",
        ),
        route("main", "/s/", &up.service(), ""),
        route("shadow", "/s/", &copy.service(), "shadow: true"),
    ]
    .concat();
    let settings = Settings {
        otlp: Some(exporter(&rx)),
        debug_headers: true,
        ..Default::default()
    };
    let gw = Gateway::with(&yaml, settings).await;

    // A client's sampled trace is continued: same trace id, the client's span as the parent.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(
        &gw.url("/api/items?q=1"),
        &[("traceparent", given), ("x-user", "ann")],
    )
    .await;
    assert_eq!(r.status, 200);
    let revision = r.header("x-legate-revision").unwrap().to_string();
    let (trace, upstream_parent, flags) = ids(&r.seen("traceparent").unwrap());
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(flags, "01");

    // No traceparent: a new trace (sampled: ratio 1 while exporting); a 503 retried once.
    let r = get(&gw.url("/r/x?status=503"), &[]).await;
    assert_eq!(r.status, 503);
    let (retried_trace, _, _) = ids(&r.seen("traceparent").unwrap());

    // A shadowed request: the copy gets its own client span.
    let r = get(&gw.url("/s/y"), &[]).await;
    assert_eq!(r.status, 200);
    let (shadow_trace, _, _) = ids(&r.seen("traceparent").unwrap());

    let spans = rx
        .wait_for("spans of the three requests", |s| {
            of_trace(s, &trace).len() == 2
                && of_trace(s, &retried_trace).len() == 3
                && of_trace(s, &shadow_trace).len() == 3
        })
        .await;

    // The continued trace: server span under the client's span, client span under it, and the
    // upstream's traceparent names the client span.
    let t = of_trace(&spans, &trace);
    let server = t.iter().find(|s| kind(s) == SERVER).unwrap();
    let client = t.iter().find(|s| kind(s) == CLIENT).unwrap();
    assert_eq!(server["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(client["parent_span_id"], server["span_id"]);
    assert_eq!(client["span_id"], upstream_parent.as_str());
    assert_eq!(server["name"], "GET /api/");
    assert_eq!(attr(server, "http.request.method"), "GET");
    assert_eq!(attr(server, "url.path"), "/api/items");
    assert_eq!(attr(server, "http.route"), "/api/");
    assert_eq!(attr(server, "legate.mapping"), "default/api");
    assert_eq!(attr(server, "http.response.status_code"), 200);
    assert_eq!(attr(server, "legate.revision"), revision.as_str());
    assert_eq!(attr(server, "client.address"), "127.0.0.1");
    assert_eq!(server["resource"]["service.name"], "edge");
    assert_eq!(server["scope"], "legate");
    assert_eq!(server["status"], 0);
    assert!(server["end"].as_u64() >= client["end"].as_u64());
    assert!(server["start"].as_u64() <= client["start"].as_u64());
    assert_eq!(attr(client, "http.request.method"), "GET");
    assert_eq!(attr(client, "server.address"), "127.0.0.1");
    assert_eq!(attr(client, "server.port"), up.addr.port());
    assert_eq!(attr(client, "network.peer.address"), "127.0.0.1");
    assert_eq!(attr(client, "network.peer.port"), up.addr.port());
    assert_eq!(attr(client, "http.response.status_code"), 200);

    // The retried request: a new trace (no parent), two client spans under the server span,
    // the second one a resend; 503 is an error on both kinds.
    let t = of_trace(&spans, &retried_trace);
    let server = t.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(server["parent_span_id"], "");
    assert_eq!(server["status"], 2);
    assert_eq!(attr(server, "error.type"), "503");
    let clients: Vec<_> = t.iter().filter(|s| kind(s) == CLIENT).collect();
    assert_eq!(clients.len(), 2);
    for c in &clients {
        assert_eq!(c["parent_span_id"], server["span_id"]);
        assert_eq!(attr(c, "http.response.status_code"), 503);
        assert_eq!(c["status"], 2);
    }
    assert_ne!(clients[0]["span_id"], clients[1]["span_id"]);
    let resends: Vec<_> = clients
        .iter()
        .map(|c| attr(c, "http.request.resend_count").as_i64())
        .collect();
    assert!(
        resends.contains(&None) && resends.contains(&Some(1)),
        "{resends:?}"
    );

    // The shadowed request: the real attempt and the copy, both under the server span.
    let t = of_trace(&spans, &shadow_trace);
    let server = t.iter().find(|s| kind(s) == SERVER).unwrap();
    let copies: Vec<_> = t
        .iter()
        .filter(|s| kind(s) == CLIENT && attr(s, "legate.shadow") == "true")
        .collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["parent_span_id"], server["span_id"]);
    assert_eq!(attr(copies[0], "server.port"), copy.addr.port());

    let text = gw.proxy.metrics().render(None);
    assert!(
        text.lines().any(
            |l| l.starts_with("legate_otlp_spans_total{outcome=\"exported\"} ")
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_sampling_is_parent_based() {
    let Some(rx) = Receiver::start("otlp_sampling_is_parent_based") else {
        return;
    };
    let up = Upstream::start("u").await;
    let settings = Settings {
        otlp: Some(exporter(&rx)),
        trace_sample_ratio: Some(0.0),
        ..Default::default()
    };
    let gw = Gateway::with(&route("api", "/api/", &up.service(), ""), settings).await;

    // Ratio 0: a new trace is not sampled, and an unsampled parent stays unsampled.
    let r = get(&gw.url("/api/new"), &[]).await;
    let (fresh, _, flags) = ids(&r.seen("traceparent").unwrap());
    assert_eq!(flags, "00");
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let r = get(&gw.url("/api/no"), &[("traceparent", unsampled)]).await;
    assert_eq!(ids(&r.seen("traceparent").unwrap()).2, "00");
    // A sampled parent is honoured whatever the ratio.
    let sampled = "00-33333333333333333333333333333333-4444444444444444-01";
    let r = get(&gw.url("/api/yes"), &[("traceparent", sampled)]).await;
    assert_eq!(ids(&r.seen("traceparent").unwrap()).2, "01");

    // Spans leave in the order they were finished: once the sampled trace is in, the two
    // before it would be too had they been recorded.
    let spans = rx
        .wait_for("the sampled trace", |s| {
            of_trace(s, "33333333333333333333333333333333").len() == 2
        })
        .await;
    assert!(of_trace(&spans, &fresh).is_empty(), "{spans:#?}");
    assert!(of_trace(&spans, "11111111111111111111111111111111").is_empty());
    assert_eq!(spans.len(), 2, "{spans:#?}");
}

fn tracing_service(name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("---\napiVersion: getambassador.io/v3alpha1\nkind: TracingService\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_tracingservice_from_the_config_repo_configures_export() {
    let Some(rx) = Receiver::start("otlp_tracingservice_from_the_config_repo_configures_export")
    else {
        return;
    };
    let up = Upstream::start("u").await;
    let yaml = route("api", "/api/", &up.service(), "")
        + &tracing_service(
            "tracing",
            &format!(
                "driver: opentelemetry\nservice: 127.0.0.1:{}\nsampling:\n  overall: 0\ntag_headers: [X-User]\nconfig:\n  service_name: from-repo",
                rx.port
            ),
        );
    // No flag target: the exporter waits for the revision's TracingService.
    let settings = Settings {
        otlp: Some(Exporter::start(ExportSettings::default())),
        ..Default::default()
    };
    let gw = Gateway::with(&yaml, settings).await;

    // `sampling.overall: 0`: a new trace is not sampled; a sampled parent still is.
    let r = get(&gw.url("/api/a"), &[]).await;
    let (fresh, _, flags) = ids(&r.seen("traceparent").unwrap());
    assert_eq!(flags, "00");
    let sampled = "00-55555555555555555555555555555555-6666666666666666-01";
    let r = get(
        &gw.url("/api/b"),
        &[("traceparent", sampled), ("x-user", "ann")],
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = rx
        .wait_for("the sampled trace", |s| {
            of_trace(s, "55555555555555555555555555555555").len() == 2
        })
        .await;
    assert!(of_trace(&spans, &fresh).is_empty());
    let server = spans.iter().find(|s| kind(s) == SERVER).unwrap();
    assert_eq!(server["resource"]["service.name"], "from-repo");
    assert_eq!(attr(server, "http.request.header.x-user"), "ann");

    // A revision without the TracingService stops the export; one with it starts it again.
    // Spans leave in order, so once the last trace is in, the middle one would be too.
    gw.proxy
        .swap(compile(&route("api", "/api/", &up.service(), "")));
    let off = "00-77777777777777777777777777777777-6666666666666666-01";
    assert_eq!(
        get(&gw.url("/api/c"), &[("traceparent", off)]).await.status,
        200
    );
    gw.proxy.swap(compile(&yaml));
    let on = "00-88888888888888888888888888888888-6666666666666666-01";
    assert_eq!(
        get(&gw.url("/api/d"), &[("traceparent", on)]).await.status,
        200
    );
    let spans = rx
        .wait_for("the trace after the TracingService came back", |s| {
            of_trace(s, "88888888888888888888888888888888").len() == 2
        })
        .await;
    assert!(of_trace(&spans, "77777777777777777777777777777777").is_empty());
}

#[test]
fn otlp_tracingservice_drivers_and_fields_are_checked() {
    let check = |yaml: &str| {
        let tree = Tree::new(yaml);
        legate::config::check_dir(tree.path(), &legate::config::Options::default())
    };
    let codes = |out: &legate::config::Outcome| -> Vec<(String, &'static str)> {
        out.diagnostics
            .iter()
            .map(|d| (format!("{:?}", d.severity), d.code))
            .collect()
    };

    // zipkin: accepted, nothing exported, a warning saying so.
    let out = check(&tracing_service(
        "z",
        "driver: zipkin\nservice: zipkin:9411",
    ));
    let g = out.graph.as_ref().expect("a zipkin TracingService loads");
    assert!(g.settings.tracing.is_none());
    assert!(
        codes(&out).contains(&("Warning".into(), "tracing-not-exported")),
        "{:?}",
        codes(&out)
    );

    // lightstep: refused, as Emissary refuses it.
    let out = check(&tracing_service("l", "driver: lightstep\nservice: ls:443"));
    assert!(out.graph.is_none());
    assert!(codes(&out).contains(&("Error".into(), "tracing-driver")));

    // The gRPC port, Envoy-only sampling and driver settings warn; the rest is read.
    let out = check(&tracing_service(
        "o",
        "driver: opentelemetry\nservice: otel:4317\nsampling:\n  overall: 25\n  random: 50\nconfig:\n  trace_id_128bit: true\ncustom_tags: []",
    ));
    let t = out
        .graph
        .as_ref()
        .unwrap()
        .settings
        .tracing
        .clone()
        .unwrap();
    assert_eq!(t.collector.to_string(), "http://otel:4317/v1/traces");
    assert_eq!(t.sampling, Some(0.25));
    assert_eq!(t.service_name, "legate");
    let c = codes(&out);
    for code in [
        "tracing-grpc-port",
        "not-implemented",
        "not-implemented-yet",
    ] {
        assert!(c.contains(&("Warning".into(), code)), "{code}: {c:?}");
    }

    // Two TracingServices: an error on the second.
    let two = tracing_service("a", "driver: opentelemetry\nservice: c:4318")
        + &tracing_service("b", "driver: opentelemetry\nservice: c:4318");
    let out = check(&two);
    assert!(out.graph.is_none());
    assert!(codes(&out).contains(&("Error".into(), "duplicate-tracingservice")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_legate_run_exports_with_the_flags() {
    let Some(rx) = Receiver::start("otlp_legate_run_exports_with_the_flags") else {
        return;
    };
    // A bad endpoint is refused before anything starts.
    let bad = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["run", "--dir", ".", "--otlp-endpoint", "grpc://c:4317"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--otlp-endpoint") && err.contains("http://"),
        "{err}"
    );

    let up = Upstream::start("u").await;
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("m.yaml"),
        route("api", "/api/", &up.service(), ""),
    )
    .unwrap();
    let (http, admin) = (free_addr(), free_addr());
    let _gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .arg("--dir")
            .arg(config.path())
            .args(["--otlp-endpoint", &format!("127.0.0.1:{}", rx.port)])
            .args(["--otlp-service-name", "bin", "--verify-window", "0"])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string(), "--access-log", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{http}/api/x");
    let until = Instant::now() + Duration::from_secs(20);
    let trace = loop {
        if tokio::net::TcpStream::connect(http).await.is_ok() {
            let r = get(&url, &[]).await;
            if r.status == 200 {
                break ids(&r.seen("traceparent").unwrap()).0;
            }
        }
        assert!(Instant::now() < until, "legate run did not serve /api/x");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // No ratio given: 1 while exporting.
    let spans = rx
        .wait_for("the request's spans", |s| of_trace(s, &trace).len() == 2)
        .await;
    let server = of_trace(&spans, &trace)
        .into_iter()
        .find(|s| kind(s) == SERVER)
        .unwrap();
    assert_eq!(server["resource"]["service.name"], "bin");
    assert!(!attr(server, "legate.revision").as_str().unwrap().is_empty());
    loop {
        let text = get(&format!("http://{admin}/metrics"), &[]).await.body;
        let exported = text
            .lines()
            .find_map(|l| l.strip_prefix("legate_otlp_spans_total{outcome=\"exported\"} "))
            .map(|n| n.parse::<u64>().unwrap());
        if exported.is_some_and(|n| n >= 2) {
            break;
        }
        assert!(
            Instant::now() < until,
            "no exported count in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
