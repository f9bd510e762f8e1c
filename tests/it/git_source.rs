//! The git source against real repositories (`git` CLI), served over file:// and by a
//! test-started `git daemon` on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use legate::admin::{self, AdminState, HookSecret};
use legate::reconcile::{self, Handle, Live, Outcome, PassResult, RejectKind, Settings};
use legate::source::git::{GitOptions, GitSource};

use super::reconcile::{bad_mapping, mapping, outcome, settings};
use crate::support::eventually;

pub(crate) use crate::support::git::{daemon, git, Repo};

pub(crate) fn start_git(
    url: &str,
    reference: &str,
    cache: &Path,
    s: Settings,
) -> (Handle, Arc<Live>) {
    start_git_at(url, reference, None, cache, s)
}

fn start_git_at(
    url: &str,
    reference: &str,
    subdir: Option<&str>,
    cache: &Path,
    mut s: Settings,
) -> (Handle, Arc<Live>) {
    s.cache_dir = Some(cache.to_path_buf());
    let src = GitSource::new(GitOptions {
        url: url.to_string(),
        reference: reference.to_string(),
        subdir: subdir.map(str::to_string),
        cache_dir: cache.to_path_buf(),
        tree: s.config.tree.clone(),
        auth: Default::default(),
        allowed_signers: None,
    })
    .unwrap();
    let live = Live::new();
    let h = reconcile::start(Arc::new(src), live.clone(), s, None);
    (h, live)
}

#[tokio::test]
async fn commits_over_git_daemon_go_live_bad_is_rejected_fix_goes_live() {
    let repo = Repo::new();
    let c1 = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "add a",
    );
    let d = daemon(repo.path.parent().unwrap()).await;
    let cache = tempfile::tempdir().unwrap();
    let url = format!("git://127.0.0.1:{}/repo", d.port);
    let (h, live) = start_git(&url, "main", cache.path(), settings(None));
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(c1.as_str()));
    assert_eq!(live.load().len(), 1);
    let first = &h.history()[0];
    let info = first.commit.as_ref().unwrap();
    assert_eq!(info.summary, "add a");
    assert_eq!(info.author, "Ada <ada@example.test>");
    // Same commit: nothing else happens.
    assert!(matches!(h.sync().await, PassResult::Unchanged { .. }));

    let c2 = repo.commit(&[("b.yaml", Some(&bad_mapping("b")))], "break it");
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.revision, c2);
    assert_eq!(entry.outcome, Outcome::Rejected);
    assert_eq!(entry.reject, Some(RejectKind::Config));
    assert_eq!(live.load().len(), 1);
    assert_eq!(h.status().applied.as_deref(), Some(c1.as_str()));

    let c3 = repo.commit(
        &[("b.yaml", Some(&mapping("b", "/b/", "127.0.0.1:9002")))],
        "fix",
    );
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(h.status().applied.as_deref(), Some(c3.as_str()));
    assert_eq!(live.load().len(), 2);

    // A push announced by a signed webhook goes live without waiting for the poll.
    let c4 = repo.commit(
        &[("c.yaml", Some(&mapping("c", "/c/", "127.0.0.1:9003")))],
        "add c",
    );
    let state = AdminState {
        reconciler: h.clone(),
        hook_secret: Some(Arc::new(HookSecret::new("k").unwrap())),
        token: None,
        graph: None,
        metrics: None,
        recent: None,
    };
    let body: &'static [u8] = b"{}";
    let req = http::Request::post("/hooks/github")
        .header("x-hub-signature-256", admin::hooks::sign(b"k", body))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    assert_eq!(admin::handle(req, &state).await.status(), 202);
    eventually("the pushed commit to go live", || {
        h.status().applied.as_deref() == Some(c4.as_str())
    })
    .await;
    assert_eq!(live.load().len(), 3);
}

#[tokio::test]
async fn symlink_huge_file_and_alias_bomb_commits_are_rejected() {
    let repo = Repo::new();
    let good = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "good",
    );
    let cache = tempfile::tempdir().unwrap();
    let (h, live) = start_git(&repo.url(), "main", cache.path(), settings(None));
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(good.as_str()));

    let expect_reject = |r: PassResult, what: &str| {
        let PassResult::Recorded { entry } = &r else {
            panic!("{what}: {r:?}")
        };
        assert_eq!(entry.outcome, Outcome::Rejected, "{what}");
        entry.diagnostics.clone()
    };

    std::os::unix::fs::symlink("/etc/passwd", repo.path.join("evil.yaml")).unwrap();
    repo.commit(&[], "symlink escape");
    let diags = expect_reject(h.sync().await, "symlink");
    assert!(
        diags
            .iter()
            .any(|d| d.code == "symlink-escape" && d.file == "evil.yaml"),
        "{diags:?}"
    );
    assert_eq!(live.load().len(), 1);

    std::fs::remove_file(repo.path.join("evil.yaml")).unwrap();
    let big = "#".repeat(50 << 20);
    repo.commit(&[("big.yaml", Some(&big))], "50 MiB file");
    drop(big);
    let diags = expect_reject(h.sync().await, "big file");
    assert!(
        diags
            .iter()
            .any(|d| d.code == "file-too-large" && d.file == "big.yaml"),
        "{diags:?}"
    );
    assert_eq!(live.load().len(), 1);

    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
    }
    repo.commit(
        &[("big.yaml", None), ("bomb.yaml", Some(&bomb))],
        "alias bomb",
    );
    let diags = expect_reject(h.sync().await, "alias bomb");
    assert!(
        diags.iter().any(|d| d.message.contains("alias bomb")),
        "{diags:?}"
    );
    assert_eq!(live.load().len(), 1);
    assert_eq!(h.status().applied.as_deref(), Some(good.as_str()));
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_and_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.fetch_timeout = Duration::from_millis(500);
    let url = format!("git://127.0.0.1:{port}/repo");
    let (h, live) = start_git(&url, "main", cache.path(), s);
    let r = h.sync().await;
    let PassResult::SourceFailed { error } = &r else {
        panic!("{r:?}")
    };
    assert!(
        error.contains("timed out") || error.contains("has not returned"),
        "{error}"
    );
    let st = h.status();
    assert!(st.source_error.is_some());
    assert!(st.consecutive_failures >= 1);
    assert!(st.applied.is_none());
    assert!(live.load().is_empty());
    // Hung fetches are bounded: after a few, the source says so at once.
    let mut busy = false;
    for _ in 0..4 {
        let r = h.sync().await;
        let PassResult::SourceFailed { error } = &r else {
            panic!("{r:?}")
        };
        assert!(
            error.contains("timed out") || error.contains("have not returned"),
            "{error}"
        );
        busy |= error.contains("have not returned");
    }
    assert!(busy);
    assert!(h.status().consecutive_failures >= 5);
    // The server goes away: the stuck fetches end, and the next attempt really fetches.
    hold.abort();
    let mut last = String::new();
    for _ in 0..100 {
        let r = h.sync().await;
        let PassResult::SourceFailed { error } = &r else {
            panic!("{r:?}")
        };
        last = error.clone();
        if error.contains("cannot fetch") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.contains("cannot fetch"), "{last}");
}

#[tokio::test]
async fn restart_with_the_remote_down_serves_the_last_good_revision() {
    let repo = Repo::new();
    let good = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "good",
    );
    let cache = tempfile::tempdir().unwrap();
    let url = repo.url();
    let (h, _live) = start_git(&url, "main", cache.path(), settings(None));
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(good.as_str()));
    drop(h);

    // The remote disappears; the gateway restarts.
    let gone = repo.path.with_file_name("moved");
    std::fs::rename(&repo.path, &gone).unwrap();
    let (h, live) = start_git(&url, "main", cache.path(), settings(None));
    let r = h.sync().await;
    assert!(matches!(r, PassResult::SourceFailed { .. }), "{r:?}");
    let st = h.status();
    assert_eq!(st.applied.as_deref(), Some(good.as_str()));
    assert!(st.serving_cached);
    assert!(st.source_error.is_some());
    assert_eq!(live.load().len(), 1);
    assert!(h.history()[0].from_cache);
    std::fs::rename(&gone, &repo.path).unwrap();
}

#[tokio::test]
async fn a_force_push_is_applied_only_when_allowed() {
    let repo = Repo::new();
    let a = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    let b = repo.commit(
        &[("b.yaml", Some(&mapping("b", "/b/", "127.0.0.1:9002")))],
        "b",
    );
    let cache = tempfile::tempdir().unwrap();
    let url = repo.url();
    let (h, live) = start_git(&url, "main", cache.path(), settings(None));
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(b.as_str()));

    git(&repo.path, &["reset", "-q", "--hard", &a]);
    let c = repo.commit(
        &[("c.yaml", Some(&mapping("c", "/c/", "127.0.0.1:9003")))],
        "rewrite",
    );
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.outcome, Outcome::Rejected);
    assert_eq!(entry.reject, Some(RejectKind::ForcePush));
    assert!(entry.forced);
    assert_eq!(h.status().applied.as_deref(), Some(b.as_str()));
    assert_eq!(live.load().len(), 2);
    drop(h);

    let mut s = settings(None);
    s.allow_force_push = true;
    let (h, live) = start_git(&url, "main", cache.path(), s);
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(c.as_str()));
    let e = h.history().into_iter().find(|e| e.revision == c).unwrap();
    assert_eq!(e.outcome, Outcome::Applied);
    assert!(e.forced);
    assert_eq!(live.load().len(), 2);
}

#[tokio::test]
async fn pin_an_earlier_commit_then_unpin() {
    let repo = Repo::new();
    let a = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    let b = repo.commit(
        &[("b.yaml", Some(&mapping("b", "/b/", "127.0.0.1:9002")))],
        "b",
    );
    let cache = tempfile::tempdir().unwrap();
    let (h, live) = start_git(&repo.url(), "main", cache.path(), settings(None));
    h.sync().await;
    assert_eq!(live.load().len(), 2);
    let r = h.pin(&a).await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().len(), 1);
    // A pin is not a force push, and it survives a new commit upstream.
    repo.commit(
        &[("c.yaml", Some(&mapping("c", "/c/", "127.0.0.1:9003")))],
        "c",
    );
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(a.as_str()));
    let r = h.unpin().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(live.load().len(), 3);
    assert_ne!(h.status().applied.as_deref(), Some(b.as_str()));
}

#[tokio::test]
async fn a_tag_and_a_subdirectory_are_followed() {
    let repo = Repo::new();
    repo.commit(
        &[
            (
                "config/a.yaml",
                Some(&mapping("a", "/a/", "127.0.0.1:9001")),
            ),
            ("other/broken.yaml", Some(&bad_mapping("x"))),
        ],
        "a",
    );
    git(&repo.path, &["tag", "v1"]);
    repo.commit(
        &[(
            "config/b.yaml",
            Some(&mapping("b", "/b/", "127.0.0.1:9002")),
        )],
        "b",
    );
    let cache = tempfile::tempdir().unwrap();
    let (h, live) = start_git_at(
        &repo.url(),
        "v1",
        Some("config"),
        cache.path(),
        settings(None),
    );
    h.sync().await;
    let e = &h.history()[0];
    assert_eq!(e.outcome, Outcome::Applied, "{e:?}");
    assert_eq!(live.load().len(), 1);
}

// Measurements for bench/reconcile/run.sh (ignored in normal runs: they print figures and
// assert nothing about time).

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A `/proc/self/status` field in KiB (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[tokio::test]
#[ignore = "benchmark: run bench/reconcile/run.sh"]
async fn bench_commit_to_live_via_webhook() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = Repo::new();
    copy_tree(&root.join("examples/repo"), &repo.path);
    repo.commit(&[], "examples");
    let d = daemon(repo.path.parent().unwrap()).await;
    let cache = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.secrets_dir = Some(root.join("examples/secrets"));
    let url = format!("git://127.0.0.1:{}/repo", d.port);
    let (h, live) = start_git(&url, "main", cache.path(), s);
    h.sync().await;
    assert!(h.status().applied.is_some(), "{:?}", h.history());
    let state = AdminState {
        reconciler: h.clone(),
        hook_secret: Some(Arc::new(HookSecret::new("k").unwrap())),
        token: None,
        graph: None,
        metrics: None,
        recent: None,
    };
    let body: &'static [u8] = b"{}";
    let mut times = Vec::new();
    for i in 0..50 {
        let c = repo.commit(
            &[(
                "mappings/bench.yaml",
                Some(&mapping("bench", &format!("/bench{i}/"), "127.0.0.1:9001")),
            )],
            "bench",
        );
        let t = std::time::Instant::now();
        let req = http::Request::post("/hooks/github")
            .header("x-hub-signature-256", admin::hooks::sign(b"k", body))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        assert_eq!(admin::handle(req, &state).await.status(), 202);
        while h.status().applied.as_deref() != Some(c.as_str()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(t.elapsed());
    }
    let _ = live;
    times.sort();
    println!(
        "BENCH commit-to-live (webhook, git daemon, examples/repo, n=50): median {:?} p99 {:?} max {:?}",
        pct(&times, 0.5),
        pct(&times, 0.99),
        times[times.len() - 1]
    );
}

#[tokio::test]
#[ignore = "benchmark: run bench/reconcile/run.sh"]
async fn bench_ten_thousand_mappings() {
    let repo = Repo::new();
    let gen = |tag: &str| -> Vec<(String, String)> {
        (0..20)
            .map(|f| {
                let mut text = String::new();
                for i in 0..500 {
                    let n = f * 500 + i;
                    text.push_str("---\n");
                    text.push_str(&mapping(
                        &format!("m{n}"),
                        &format!("/{tag}/{n}/"),
                        "127.0.0.1:9001",
                    ));
                }
                (format!("m{f:02}.yaml"), text)
            })
            .collect()
    };
    let files = gen("v1");
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    repo.commit(&refs, "10k");
    let cache = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.config.tree.limits.max_total_bytes = 64 << 20;
    let (h, live) = start_git(&repo.url(), "main", cache.path(), s);
    h.sync().await;
    assert_eq!(
        live.load().len(),
        10_000,
        "{:?}",
        h.history()
            .first()
            .map(|e| &e.diagnostics[..e.diagnostics.len().min(3)])
    );

    let files = gen("v2");
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    repo.commit(&refs, "10k v2");
    let t = std::time::Instant::now();
    let r = h.sync().await;
    let pass = t.elapsed();
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.outcome, Outcome::Applied);
    let mut unchanged = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let r = h.sync().await;
        unchanged.push(t.elapsed());
        assert!(matches!(r, PassResult::Unchanged { .. }));
    }
    unchanged.sort();
    println!(
        "BENCH 10,000 Mappings (file://): new commit to swap {:?} (fetch {} ms, compile {} ms, swap {} ms); unchanged fetch median {:?} max {:?}, no recompile",
        pass,
        entry.timings.fetch_ms,
        entry.timings.compile_ms,
        entry.timings.swap_ms,
        pct(&unchanged, 0.5),
        unchanged[unchanged.len() - 1]
    );
}

#[tokio::test]
#[ignore = "benchmark: run bench/reconcile/run.sh"]
async fn bench_memory_over_1000_revisions() {
    let repo = Repo::new();
    let mut base = String::new();
    for i in 0..50 {
        base.push_str("---\n");
        base.push_str(&mapping(
            &format!("m{i}"),
            &format!("/m{i}/"),
            "127.0.0.1:9001",
        ));
    }
    repo.commit(&[("base.yaml", Some(&base))], "base");
    let cache = tempfile::tempdir().unwrap();
    let (h, _live) = start_git(&repo.url(), "main", cache.path(), settings(None));
    h.sync().await;
    let mut samples = Vec::new();
    let n: usize = std::env::var("LEGATE_BENCH_REVISIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for i in 0..n {
        repo.commit(
            &[(
                "v.yaml",
                Some(&mapping("v", &format!("/v{i}/"), "127.0.0.1:9001")),
            )],
            "rev",
        );
        let r = h.sync().await;
        assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
        if i % 100 == 99 {
            samples.push((
                i + 1,
                rss_kib(),
                status_kib("RssAnon:"),
                status_kib("RssFile:"),
            ));
        }
    }
    println!("BENCH RSS, RssAnon, RssFile (KiB) after N applied revisions: {samples:?}");
}

/// `git http-backend` run as CGI behind a small hyper server that demands basic auth.
async fn http_backend(base: PathBuf, auth: &'static str) -> u16 {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let base = base.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let base = base.clone();
                        async move {
                            let authorized = req
                                .headers()
                                .get("authorization")
                                .is_some_and(|v| v.as_bytes() == auth.as_bytes());
                            if !authorized {
                                let r = http::Response::builder()
                                    .status(401)
                                    .header("www-authenticate", "Basic realm=\"git\"")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap();
                                return Ok::<_, std::convert::Infallible>(r);
                            }
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            let ctype = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let out = tokio::task::spawn_blocking(move || {
                                use std::io::Write;
                                let mut child = Command::new("git")
                                    .arg("http-backend")
                                    .env("GIT_PROJECT_ROOT", &base)
                                    .env("GIT_HTTP_EXPORT_ALL", "1")
                                    .env("REQUEST_METHOD", method)
                                    .env("PATH_INFO", path)
                                    .env("QUERY_STRING", query)
                                    .env("CONTENT_TYPE", ctype)
                                    .env("CONTENT_LENGTH", body.len().to_string())
                                    .env("REMOTE_USER", "ada")
                                    .env("GIT_CONFIG_NOSYSTEM", "1")
                                    .stdin(Stdio::piped())
                                    .stdout(Stdio::piped())
                                    .stderr(Stdio::null())
                                    .spawn()
                                    .unwrap();
                                child.stdin.take().unwrap().write_all(&body).unwrap();
                                child.wait_with_output().unwrap().stdout
                            })
                            .await
                            .unwrap();
                            // CGI: headers, a blank line, the body.
                            let split = out
                                .windows(4)
                                .position(|w| w == b"\r\n\r\n")
                                .map(|i| (i, 4))
                                .or_else(|| {
                                    out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2))
                                })
                                .unwrap();
                            let head = String::from_utf8_lossy(&out[..split.0]).to_string();
                            let mut resp = http::Response::builder();
                            for line in head.lines() {
                                let (k, v) = line.split_once(':').unwrap();
                                if k.eq_ignore_ascii_case("status") {
                                    resp = resp.status(v.trim()[..3].parse::<u16>().unwrap());
                                } else {
                                    resp = resp.header(k.trim(), v.trim());
                                }
                            }
                            let body = Bytes::copy_from_slice(&out[split.0 + split.1..]);
                            Ok(resp.body(Full::new(body)).unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_basic_auth_against_git_http_backend() {
    let repo = Repo::new();
    let c1 = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    // user ada, token tok3n
    let port = http_backend(
        repo.path.parent().unwrap().to_path_buf(),
        "Basic YWRhOnRvazNu",
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/repo");

    let with_auth = |user: &str, pass: &str, cache: &Path| {
        let mut s = settings(None);
        s.cache_dir = Some(cache.to_path_buf());
        let src = GitSource::new(GitOptions {
            url: url.clone(),
            reference: "main".into(),
            subdir: None,
            cache_dir: cache.to_path_buf(),
            tree: Default::default(),
            auth: legate::source::git::GitAuth {
                userpass: Some((user.into(), pass.into())),
                ..Default::default()
            },
            allowed_signers: None,
        })
        .unwrap();
        let live = Live::new();
        (reconcile::start(Arc::new(src), live.clone(), s, None), live)
    };

    let cache = tempfile::tempdir().unwrap();
    let (h, live) = with_auth("ada", "wrong", cache.path());
    let r = h.sync().await;
    let PassResult::SourceFailed { error } = &r else {
        panic!("{r:?}")
    };
    assert!(
        !error.contains("wrong"),
        "the password must not be echoed: {error}"
    );
    assert!(live.load().is_empty());

    let cache = tempfile::tempdir().unwrap();
    let (h, live) = with_auth("ada", "tok3n", cache.path());
    h.sync().await;
    assert_eq!(
        h.status().applied.as_deref(),
        Some(c1.as_str()),
        "{:?}",
        h.status()
    );
    assert_eq!(live.load().len(), 1);
    // Status and history never show the credentials.
    let shown = serde_json::to_string(&(h.status(), h.history())).unwrap();
    assert!(!shown.contains("tok3n"));
}

#[tokio::test]
async fn only_commits_signed_by_an_allowed_signer_are_applied() {
    let keys = tempfile::tempdir().unwrap();
    for who in ["ada", "eve"] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", who, "-f"])
            .arg(keys.path().join(who))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let ada_pub = std::fs::read_to_string(keys.path().join("ada.pub")).unwrap();
    let allowed = keys.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        format!("ada@example.test namespaces=\"git\" {ada_pub}"),
    )
    .unwrap();

    let repo = Repo::new();
    let c1 = repo.commit_signed(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "signed by ada",
        &keys.path().join("ada"),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut s = settings(None);
    s.cache_dir = Some(cache.path().to_path_buf());
    let src = GitSource::new(GitOptions {
        url: repo.url(),
        reference: "main".into(),
        subdir: None,
        cache_dir: cache.path().to_path_buf(),
        tree: Default::default(),
        auth: Default::default(),
        allowed_signers: Some(allowed),
    })
    .unwrap();
    let live = Live::new();
    let h = reconcile::start(Arc::new(src), live.clone(), s, None);
    h.sync().await;
    assert_eq!(
        h.status().applied.as_deref(),
        Some(c1.as_str()),
        "{:?}",
        h.history()
    );
    let e = &h.history()[0];
    assert_eq!(
        e.commit.as_ref().unwrap().signer.as_deref(),
        Some("ada@example.test")
    );

    repo.commit(
        &[("b.yaml", Some(&mapping("b", "/b/", "127.0.0.1:9002")))],
        "unsigned",
    );
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.reject, Some(RejectKind::Signature), "{entry:?}");

    repo.commit_signed(&[], "signed by eve", &keys.path().join("eve"));
    let r = h.sync().await;
    let PassResult::Recorded { entry } = &r else {
        panic!("{r:?}")
    };
    assert_eq!(entry.reject, Some(RejectKind::Signature), "{entry:?}");
    assert!(entry
        .reason
        .as_deref()
        .unwrap()
        .contains("not in the allowed signers"));
    assert_eq!(live.load().len(), 1);

    let c4 = repo.commit_signed(&[], "signed by ada again", &keys.path().join("ada"));
    let r = h.sync().await;
    assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    assert_eq!(h.status().applied.as_deref(), Some(c4.as_str()));
    assert_eq!(live.load().len(), 2);
}

#[tokio::test]
async fn the_cache_repository_merges_its_packs() {
    let repo = Repo::new();
    let first = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    git(&repo.path, &["tag", "-a", "-m", "annotated", "t1"]);
    let cache = tempfile::tempdir().unwrap();
    let (h, live) = start_git(&repo.url(), "main", cache.path(), settings(None));
    h.sync().await;
    let mut last = first.clone();
    let mut middle = String::new();
    for i in 0..140 {
        last = repo.commit(
            &[(
                "v.yaml",
                Some(&mapping("v", &format!("/v{i}/"), "127.0.0.1:9001")),
            )],
            "rev",
        );
        assert_eq!(outcome(&h.sync().await), Some(Outcome::Applied));
        if i == 90 {
            middle = last.clone();
        }
    }
    assert_eq!(h.status().applied.as_deref(), Some(last.as_str()));
    let packs = walk_packs(cache.path());
    // 142 fetches, each leaving a pack: a full merge at 64, an incremental one (only what is
    // new since) at 64 more, then a few more.
    assert!((2..64).contains(&packs), "{packs} packs in the cache");
    let merged = find_file(cache.path(), "legate-packed").expect("the merge record");
    let record = std::fs::read_to_string(merged).unwrap();
    assert_eq!(
        record.lines().filter(|l| l.starts_with("pack ")).count(),
        2,
        "{record}"
    );
    // Everything reachable survived the merges: early and middle commits can still be pinned.
    for c in [&middle, &first] {
        let r = h.pin(c).await;
        assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
    }
    assert_eq!(live.load().len(), 1);
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn walk_packs(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walk_packs(&p);
        } else if p.extension().is_some_and(|x| x == "pack") {
            n += 1;
        }
    }
    n
}

#[tokio::test]
#[ignore = "benchmark: run bench/reconcile/run.sh"]
async fn bench_memory_over_1000_revisions_dir_source() {
    // The same revisions through a directory source, to separate libgit2 from the rest.
    let d = tempfile::tempdir().unwrap();
    let mut base = String::new();
    for i in 0..50 {
        base.push_str("---\n");
        base.push_str(&mapping(
            &format!("m{i}"),
            &format!("/m{i}/"),
            "127.0.0.1:9001",
        ));
    }
    std::fs::write(d.path().join("base.yaml"), base).unwrap();
    let live = Live::new();
    let src = Arc::new(legate::source::dir::DirSource::new(
        d.path(),
        Default::default(),
        None,
    ));
    let h = reconcile::start(src, live, settings(None), None);
    h.sync().await;
    let mut samples = Vec::new();
    for i in 0..2000 {
        std::fs::write(
            d.path().join("v.yaml"),
            mapping("v", &format!("/v{i}/"), "127.0.0.1:9001"),
        )
        .unwrap();
        let r = h.sync().await;
        assert_eq!(outcome(&r), Some(Outcome::Applied), "{r:?}");
        if i % 200 == 199 {
            samples.push((i + 1, rss_kib()));
        }
    }
    println!("BENCH RSS (KiB) after N applied revisions, dir source: {samples:?}");
}

/// A test-started `sshd` on a loopback port that serves git over ssh to one key.
struct Sshd {
    child: Child,
    port: u16,
    host_pub: String,
    _dir: tempfile::TempDir,
    user_key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen runs");
    assert!(st.success());
}

/// `None` when this machine has no sshd (the test then says so and does not pass silently
/// on a missing tool: it prints why it is skipped).
async fn sshd() -> Option<Sshd> {
    let bin = Path::new("/usr/sbin/sshd");
    if !bin.exists() || Command::new("ssh-keygen").arg("-?").output().is_err() {
        return None;
    }
    // The user sshd logs in as must be the one running the tests (root in CI).
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("user_key"));
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {pid}\nAllowUsers {user}\n",
        hk = d.join("host_key").display(),
        ak = d.join("authorized_keys").display(),
        pid = d.join("sshd.pid").display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
            return Some(Sshd {
                child,
                port,
                host_pub,
                user_key: d.join("user_key"),
                _dir: dir,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn ssh_with_known_unknown_and_changed_host_keys() {
    let Some(server) = sshd().await else {
        crate::support::tool_missing(
            "ssh_with_known_unknown_and_changed_host_keys",
            "no sshd on this machine (Debian package openssh-server)",
        );
        return;
    };
    let repo = Repo::new();
    let c1 = repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let url = format!(
        "ssh://{user}@127.0.0.1:{}{}",
        server.port,
        repo.path.display()
    );
    let keys = tempfile::tempdir().unwrap();
    let mut parts = server.host_pub.split_whitespace();
    let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
    let known = keys.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {kind} {key}\n", server.port),
    )
    .unwrap();
    let unknown = keys.path().join("empty_known_hosts");
    std::fs::write(&unknown, "# nothing known\n").unwrap();
    keygen(&keys.path().join("other"));
    let other = std::fs::read_to_string(keys.path().join("other.pub")).unwrap();
    let changed = keys.path().join("changed_known_hosts");
    std::fs::write(
        &changed,
        format!(
            "[127.0.0.1]:{} {}\n",
            server.port,
            other
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
    .unwrap();

    let start = |known_hosts: &Path, skip: bool| {
        let cache = tempfile::tempdir().unwrap();
        let mut s = settings(None);
        s.cache_dir = Some(cache.path().to_path_buf());
        let src = GitSource::new(GitOptions {
            url: url.clone(),
            reference: "main".into(),
            subdir: None,
            cache_dir: cache.path().to_path_buf(),
            tree: Default::default(),
            auth: legate::source::git::GitAuth {
                ssh_key: Some(server.user_key.clone()),
                known_hosts: Some(known_hosts.to_path_buf()),
                insecure_skip_host_key_check: skip,
                ..Default::default()
            },
            allowed_signers: None,
        })
        .unwrap();
        let live = Live::new();
        (
            reconcile::start(Arc::new(src), live.clone(), s, None),
            live,
            cache,
        )
    };

    // Known host key: the commit goes live.
    let (h, live, _c) = start(&known, false);
    h.sync().await;
    assert_eq!(
        h.status().applied.as_deref(),
        Some(c1.as_str()),
        "{:?}",
        h.status()
    );
    assert_eq!(live.load().len(), 1);
    // Unknown host: refused, nothing served.
    let (h, live, _c) = start(&unknown, false);
    let r = h.sync().await;
    let PassResult::SourceFailed { error } = &r else {
        panic!("{r:?}")
    };
    assert!(
        error.contains("not in") && error.contains("unknown host"),
        "{error}"
    );
    assert!(live.load().is_empty());
    // Changed host key: refused.
    let (h, live, _c) = start(&changed, false);
    let r = h.sync().await;
    let PassResult::SourceFailed { error } = &r else {
        panic!("{r:?}")
    };
    assert!(error.contains("does not match"), "{error}");
    assert!(live.load().is_empty());
    // The explicit opt-out accepts it.
    let (h, _live, _c) = start(&changed, true);
    h.sync().await;
    assert_eq!(h.status().applied.as_deref(), Some(c1.as_str()));
}

#[tokio::test]
async fn replicas_following_one_repository_converge_on_the_same_revision() {
    let repo = Repo::new();
    repo.commit(
        &[("a.yaml", Some(&mapping("a", "/a/", "127.0.0.1:9001")))],
        "a",
    );
    let d = daemon(repo.path.parent().unwrap()).await;
    let url = format!("git://127.0.0.1:{}/repo", d.port);
    // Three replicas, each with its own cache, as three pods would have.
    let caches: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas: Vec<_> = caches
        .iter()
        .map(|c| start_git(&url, "main", c.path(), settings(None)))
        .collect();
    let head = repo.commit(
        &[("b.yaml", Some(&mapping("b", "/b/", "127.0.0.1:9002")))],
        "b",
    );
    for (h, _) in &replicas {
        h.sync().await;
    }
    for (h, live) in &replicas {
        assert_eq!(h.status().applied.as_deref(), Some(head.as_str()));
        assert_eq!(live.load().len(), 2);
    }
    // Same commit, same compiled graph on every replica.
    let hashes: Vec<String> = replicas
        .iter()
        .map(|(_, l)| l.load().hash.clone())
        .collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
}
