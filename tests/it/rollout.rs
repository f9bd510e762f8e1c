//! Safe rollout through the real binary: verification windows judged per changed route, never
//! rolling back to nothing, windows that never hold a deploy up, retries, and one revision id.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::git_source::{daemon, Repo};
use crate::support::{free_addr, get, send, Killed, Upstream};

fn mapping(name: &str, prefix: &str, service: &str) -> String {
    format!(
        "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n"
    )
}

/// `legate run` on free ports, killed when dropped.
struct Gw {
    _child: Killed,
    http: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Gw {
    async fn start(source: &[&str], extra: &[&str]) -> Gw {
        let (http, admin) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .args(source)
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(extra)
            .env_remove("LEGATE_ADMIN_TOKEN")
            .env("LEGATE_WEBHOOK_SECRET", "s3cret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gw = Gw {
            _child: Killed(child),
            http,
            admin,
        };
        for _ in 0..1000 {
            if tokio::net::TcpStream::connect(admin).await.is_ok() {
                return gw;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the gateway did not start");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    async fn admin_get(&self, path: &str) -> Value {
        get(&format!("http://{}{path}", self.admin), &[])
            .await
            .json()
    }

    async fn status(&self) -> Value {
        self.admin_get("/api/status").await
    }

    /// `POST path` on the admin API: (status, body, time to answer).
    async fn post(&self, path: &str) -> (u16, Value, Duration) {
        let t = Instant::now();
        let r = send(
            "POST",
            &format!("http://{}{path}", self.admin),
            &[],
            crate::support::empty(),
        )
        .await;
        let took = t.elapsed();
        (r.status.as_u16(), r.json(), took)
    }

    /// The history entry of `rev` once it is no longer verifying.
    async fn verdict(&self, rev: &str) -> Value {
        for _ in 0..3000 {
            let h = self.admin_get("/api/revisions").await;
            if let Some(e) = h.as_array().unwrap().iter().find(|e| {
                e["revision"] == rev && e["outcome"] != "Verifying" && e["outcome"] != "Interrupted"
            }) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no verdict for {rev}");
    }

    async fn until(&self, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
        for _ in 0..3000 {
            let st = self.status().await;
            if cond(&st) {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}: {}", self.status().await);
    }
}

/// The revision a sync answered with (swapped in, or already serving: the directory watch
/// may have been first).
fn revision_of(body: &Value) -> String {
    body["entry"]["revision"]
        .as_str()
        .or(body["revision"].as_str())
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

fn body(b: &'static [u8]) -> crate::support::TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes::Bytes::from_static(b))
        .map_err(|e| match e {})
        .boxed()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

async fn status_of(url: &str) -> u16 {
    get(url, &[]).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_started_before_its_upstream_serves_once_it_is_up() {
    let up_addr = free_addr();
    let tree = tempfile::tempdir().unwrap();
    write(
        tree.path(),
        "m.yaml",
        &mapping("svc", "/svc/", &up_addr.to_string()),
    );
    let gw = Gw::start(
        &["--dir", tree.path().to_str().unwrap()],
        &[
            "--verify-window",
            "1500ms",
            "--verify-min-requests",
            "3",
            "--verify-retry",
            "500ms",
            "--verify-retry-max",
            "1s",
        ],
    )
    .await;
    let ready = format!("http://{}/readyz", gw.admin);
    for _ in 0..1000 {
        if status_of(&ready).await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // From now on /readyz must answer 200 whatever the window says.
    let watch = {
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..150 {
                seen.push(status_of(&ready).await);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            seen
        })
    };
    // The upstream is still starting: the first requests fail...
    for _ in 0..5 {
        assert_eq!(status_of(&gw.url("/svc/x")).await, 502);
    }
    let st = gw
        .until("the first revision degraded", |s| s["state"] == "degraded")
        .await;
    // ...but the revision keeps serving: never rolled back to nothing.
    assert!(st["applied"].is_string(), "{st}");
    assert_eq!(st["retry"]["kind"], "reverify", "{st}");
    assert!(
        st["live"]["reason"]
            .as_str()
            .unwrap()
            .contains("Mapping default/svc"),
        "{st}"
    );
    let _up = Upstream::start_on("svc", up_addr).await;
    assert_eq!(status_of(&gw.url("/svc/x")).await, 200);
    // Its retry probes the upstream, watches the revision again and verifies it.
    let st = gw
        .until("the revision verified", |s| {
            s["live"]["outcome"] == "Applied" && s["retry"].is_null()
        })
        .await;
    assert!(
        st["state"] == "verified" || st["state"] == "verified-unobserved",
        "{st}"
    );
    assert_eq!(status_of(&gw.url("/svc/x")).await, 200);
    let seen = watch.await.unwrap();
    assert!(seen.iter().all(|s| *s == 200), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_changed_routes_are_judged_and_a_failing_new_route_is_rolled_back() {
    let good = Upstream::start("good").await;
    let dead = free_addr();
    let tree = tempfile::tempdir().unwrap();
    write(tree.path(), "a.yaml", &mapping("a", "/a/", &good.service()));
    write(
        tree.path(),
        "broken.yaml",
        &mapping("broken", "/broken/", &dead.to_string()),
    );
    let gw = Gw::start(
        &["--dir", tree.path().to_str().unwrap()],
        &[
            "--verify-window",
            "2s",
            "--verify-min-requests",
            "5",
            "--poll",
            "1h",
        ],
    )
    .await;
    let st = gw
        .until("the first revision verified", |s| {
            s["live"]["outcome"] == "Applied"
        })
        .await;
    let first = st["applied"].as_str().unwrap().to_string();

    // A revision that only adds /c/, while the already broken /broken/ takes traffic.
    write(tree.path(), "c.yaml", &mapping("c", "/c/", &good.service()));
    let (_, body, _) = gw.post("/api/sync").await;
    let second = revision_of(&body);
    for _ in 0..10 {
        assert_eq!(status_of(&gw.url("/broken/x")).await, 502);
        assert_eq!(status_of(&gw.url("/c/x")).await, 200);
    }
    let v = gw.verdict(&second).await;
    assert_eq!(v["outcome"], "Applied", "{v}");
    assert_eq!(v["verdict"]["judgement"], "verified", "{v}");
    let judged: Vec<&str> = v["verdict"]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mapping"].as_str().unwrap())
        .collect();
    assert_eq!(judged, vec!["default/c"], "{v}");

    // A revision whose new route fails is rolled back to the last verified one.
    write(
        tree.path(),
        "d.yaml",
        &mapping("d", "/d/", &dead.to_string()),
    );
    let (_, body, _) = gw.post("/api/sync").await;
    let third = revision_of(&body);
    for _ in 0..6 {
        status_of(&gw.url("/d/x")).await;
    }
    let v = gw.verdict(&third).await;
    assert_eq!(v["outcome"], "RolledBack", "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("Mapping default/d"), "{reason}");
    assert!(reason.contains(&dead.to_string()), "{reason}");
    let st = gw.status().await;
    assert_eq!(st["applied"], second.as_str(), "{st}");
    assert_ne!(st["applied"], first.as_str());
    assert_eq!(status_of(&gw.url("/c/x")).await, 200);
    assert_eq!(status_of(&gw.url("/a/x")).await, 200);
    assert_eq!(status_of(&gw.url("/d/x")).await, 404);

    // `legate sync --wait` answers with the verdict, not the swap.
    std::fs::remove_file(tree.path().join("d.yaml")).unwrap();
    write(tree.path(), "e.yaml", &mapping("e", "/e/", &good.service()));
    let admin = gw.admin;
    let out = tokio::task::spawn_blocking(move || cli(admin, &["sync", "--wait"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("verdict: ") && text.contains("Applied"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_revision_is_retried_after_its_backoff_once_its_upstream_is_up() {
    let good = Upstream::start("good").await;
    let later = free_addr();
    let tree = tempfile::tempdir().unwrap();
    write(tree.path(), "a.yaml", &mapping("a", "/a/", &good.service()));
    let gw = Gw::start(
        &["--dir", tree.path().to_str().unwrap()],
        &[
            "--verify-window",
            "800ms",
            "--verify-min-requests",
            "3",
            "--verify-retry",
            "1s",
            "--verify-retry-max",
            "2s",
            "--poll",
            "1h",
        ],
    )
    .await;
    gw.until("the first revision verified", |s| {
        s["live"]["outcome"] == "Applied"
    })
    .await;
    write(
        tree.path(),
        "b.yaml",
        &mapping("b", "/b/", &later.to_string()),
    );
    let (_, body, _) = gw.post("/api/sync").await;
    let rev = revision_of(&body);
    for _ in 0..4 {
        status_of(&gw.url("/b/x")).await;
    }
    assert_eq!(gw.verdict(&rev).await["outcome"], "RolledBack");
    let st = gw.status().await;
    assert_eq!(st["retry"]["revision"], rev.as_str(), "{st}");
    assert_eq!(st["retry"]["kind"], "rollback", "{st}");
    assert_eq!(
        st["retry"]["upstreams"][0],
        later.to_string().as_str(),
        "{st}"
    );
    assert_eq!(status_of(&gw.url("/b/x")).await, 404);
    // Its probe fails while the upstream is down: the retry backs off.
    gw.until("a failed retry probe", |s| {
        s["retry"]["last_probe_error"].is_string()
    })
    .await;
    let _up = Upstream::start_on("later", later).await;
    let st = gw
        .until("the retried revision verified", |s| {
            s["applied"] == rev.as_str() && s["live"]["outcome"] == "Applied"
        })
        .await;
    assert!(st["retry"].is_null(), "{st}");
    assert_eq!(
        st["live"]["retry"].as_u64().map(|n| n >= 1),
        Some(true),
        "{st}"
    );
    assert_eq!(status_of(&gw.url("/b/x")).await, 200);
}

fn cli(admin: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .env_remove("LEGATE_ADMIN_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_revision_id_everywhere() {
    let up = Upstream::start("up").await;
    let repo = Repo::new();
    let commit = repo.commit(
        &[("m.yaml", Some(&mapping("m", "/m/", &up.service())))],
        "m",
    );
    let cache = tempfile::tempdir().unwrap();
    let log: PathBuf = cache.path().join("access.log");
    let gw = Gw::start(
        &[
            "--repo",
            &repo.url(),
            "--ref",
            "main",
            "--cache-dir",
            cache.path().join("c").to_str().unwrap(),
        ],
        &[
            "--verify-window",
            "0",
            "--debug-headers",
            "--access-log",
            log.to_str().unwrap(),
        ],
    )
    .await;
    gw.until("the commit live", |s| s["applied"] == commit.as_str())
        .await;
    let r = get(&gw.url("/m/x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-legate-revision"), Some(commit.as_str()));
    let st = gw.status().await;
    assert_eq!(st["applied"], commit.as_str());
    assert_eq!(st["live"]["revision"], commit.as_str());
    assert!(st["live"]["graph"].as_str().unwrap().len() == 12, "{st}");
    let revs = gw.admin_get("/api/revisions").await;
    assert_eq!(revs[0]["revision"], commit.as_str());
    let text = String::from_utf8(cli(gw.admin, &["status"]).stdout).unwrap();
    assert!(text.contains(&format!("revision:      {commit}")), "{text}");
    let mut line = None;
    for _ in 0..500 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("/m/x")) {
            line = Some(serde_json::from_str::<Value>(l).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let line = line.expect("an access log line");
    assert_eq!(line["revision"], commit.as_str(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_commits_a_second_apart_each_go_live_without_waiting_for_windows() {
    let up = Upstream::start("up").await;
    let repo = Repo::new();
    repo.commit(
        &[("m0.yaml", Some(&mapping("m0", "/m0/", &up.service())))],
        "m0",
    );
    let d = daemon(repo.path.parent().unwrap()).await;
    let cache = tempfile::tempdir().unwrap();
    let url = format!("git://127.0.0.1:{}/repo", d.port);
    let gw = Gw::start(
        &[
            "--repo",
            &url,
            "--ref",
            "main",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        // A 20 s window: every commit below lands inside the previous one's window.
        &["--verify-window", "20s", "--poll", "1h"],
    )
    .await;
    let hook = format!("http://{}/hooks/generic", gw.admin);
    gw.until("the first commit live", |s| s["applied"].is_string())
        .await;
    const BODY: &[u8] = b"{}";
    let sig = legate::admin::hooks::sign(b"s3cret", BODY);
    let mut live_times = Vec::new();
    let mut commits = Vec::new();
    for i in 1..=10 {
        let pushed = Instant::now();
        let (files, bad): (Vec<(String, Option<String>)>, bool) = if i == 5 {
            (
                vec![("bad.yaml".into(), Some("kind: Mapping\nspec: [\n".into()))],
                true,
            )
        } else if i == 6 {
            (
                vec![
                    ("bad.yaml".into(), None),
                    (
                        format!("m{i}.yaml"),
                        Some(mapping(&format!("m{i}"), &format!("/m{i}/"), &up.service())),
                    ),
                ],
                false,
            )
        } else {
            (
                vec![(
                    format!("m{i}.yaml"),
                    Some(mapping(&format!("m{i}"), &format!("/m{i}/"), &up.service())),
                )],
                false,
            )
        };
        let files: Vec<(&str, Option<&str>)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_deref()))
            .collect();
        let c = repo.commit(&files, &format!("commit {i}"));
        let r = send("POST", &hook, &[("x-legate-signature", &sig)], body(BODY)).await;
        assert_eq!(r.status, 202);
        if bad {
            loop {
                let h = gw.admin_get("/api/revisions").await;
                if h.as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["revision"] == c.as_str() && e["outcome"] == "Rejected")
                {
                    break;
                }
                assert!(pushed.elapsed() < Duration::from_secs(10), "{h}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } else {
            gw.until(&format!("commit {i} live"), |s| s["applied"] == c.as_str())
                .await;
            assert_eq!(status_of(&gw.url(&format!("/m{i}/"))).await, 200);
        }
        let took = pushed.elapsed();
        live_times.push(took);
        // Generous: a hang or a wait for a 20 s window shows, scheduling noise does not.
        assert!(took < Duration::from_secs(5), "commit {i} took {took:?}");
        commits.push(c);
        if let Some(rest) = Duration::from_secs(1).checked_sub(pushed.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    println!("FIGURE push-to-live (or rejected) over git daemon with a webhook, 20 s windows: {live_times:?}");
    let st = gw.status().await;
    assert_eq!(st["state"], "verifying", "{st}");
    // Interrupted revisions are told apart from verified-then-replaced ones.
    let h = gw.admin_get("/api/revisions").await;
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"] == "Interrupted"),
        "{h}"
    );

    // pin, unpin and sync answer at swap time, long before a 20 s window could end.
    let (code, body, pin_took) = gw.post(&format!("/api/pin/{}", commits[2])).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["entry"]["outcome"], "Verifying", "{body}");
    let st = gw.status().await;
    assert_eq!(st["applied"], commits[2].as_str());
    assert_eq!(
        st["verifying"],
        commits[2].as_str(),
        "the window is still running: {st}"
    );
    // While pinned the head is still fetched and shown.
    let newest = repo.commit(
        &[("m11.yaml", Some(&mapping("m11", "/m11/", &up.service())))],
        "11",
    );
    let (_, _, sync_took) = gw.post("/api/sync").await;
    let st = gw
        .until("the new head shown while pinned", |s| {
            s["head"] == newest.as_str()
        })
        .await;
    assert_eq!(st["out_of_sync"], true, "{st}");
    assert_eq!(st["applied"], commits[2].as_str(), "{st}");
    let (code, body, unpin_took) = gw.post("/api/unpin").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["entry"]["revision"], newest.as_str(), "{body}");
    println!("FIGURE admin replies: pin {pin_took:?}, sync {sync_took:?}, unpin {unpin_took:?}");
    for t in [pin_took, sync_took, unpin_took] {
        assert!(t < Duration::from_secs(5), "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_while_draining_after_sigterm() {
    let up = Upstream::start("slow").await;
    let tree = tempfile::tempdir().unwrap();
    write(tree.path(), "m.yaml", &mapping("m", "/m/", &up.service()));
    let gw = Gw::start(
        &["--dir", tree.path().to_str().unwrap()],
        &["--verify-window", "0", "--drain-timeout-secs", "20"],
    )
    .await;
    let ready = format!("http://{}/readyz", gw.admin);
    gw.until("a revision serves", |s| s["applied"].is_string())
        .await;
    assert_eq!(status_of(&ready).await, 200);
    // A request in flight keeps the drain going.
    let slow = tokio::spawn(get_owned(gw.url("/m/x?sleep_ms=1500")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = gw._child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut seen = 0;
    for _ in 0..200 {
        seen = status_of(&ready).await;
        if seen == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 503);
    let body = get(&ready, &[]).await;
    assert_eq!(body.body, "draining\n");
    assert_eq!(slow.await.unwrap(), 200);
}

async fn get_owned(url: String) -> u16 {
    get(&url, &[]).await.status.as_u16()
}
