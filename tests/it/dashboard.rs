//! The web dashboard (`/ui/` on the admin listener) in a real browser: headless Chromium driven
//! by Selenium (`support/dashboard.py`) against the real binary following a git repository
//! served by `git daemon`. Also the dashboard's HTTP contract (types, caching, CSP, Origin).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::git_source::{daemon, Repo};
use crate::support::{empty, free_addr, get, send, Killed};

const INSTALL: &str =
    "apt-get install chromium chromium-driver; python3 -m pip install selenium==4.51.0";

fn driver() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/dashboard.py")
}

const ECHO: &str = "---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: echo\nspec:\n  hostname: \"*\"\n  prefix: /echo/\n  service: ECHO\n  rewrite: /\n";

/// The real binary following `git://127.0.0.1:{port}/repo`, with the demo echo on `echo` and
/// an admin token; (process, admin URL, proxy URL).
async fn gateway(
    port: u16,
    cache: &std::path::Path,
    echo: std::net::SocketAddr,
) -> (Killed, String, String) {
    let (http, admin) = (free_addr(), free_addr());
    let gw = Killed(
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .arg("run")
            .args(["--repo", &format!("git://127.0.0.1:{port}/repo")])
            .args(["--ref", "main", "--poll", "1s"])
            .arg("--cache-dir")
            .arg(cache)
            .args(["--demo-echo", &echo.to_string()])
            .args(["--http-listen", &http.to_string(), "--https-listen", "off"])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--verify-window", "0", "--access-log", "off"])
            .env("LEGATE_ADMIN_TOKEN", "t0ken")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = format!("http://{admin}");
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(http).await.is_ok()
            && get(&format!("{admin}/readyz"), &[]).await.status == 200
        {
            return (gw, admin, format!("http://{http}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not become ready");
}

fn first_commit(repo: &Repo, echo: &str) -> String {
    repo.commit(
        &[("config.yaml", Some(&ECHO.replace("ECHO", echo)))],
        "Route /echo/ to the demo echo",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_follows_commits_shows_rejections_and_pins_with_the_token() {
    let test = "dashboard_in_chromium";
    let ok = Command::new("python3")
        .arg(driver())
        .arg("check")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        crate::support::tool_missing(test, &format!("headless Chromium + Selenium ({INSTALL})"));
        return;
    }
    let repo = Repo::new();
    let echo = free_addr();
    first_commit(&repo, &echo.to_string());
    let d = daemon(repo.path.parent().unwrap()).await;
    let cache = tempfile::tempdir().unwrap();
    let (_gw, admin, http) = gateway(d.port, cache.path(), echo).await;
    // Traffic for the per-route table.
    for _ in 0..5 {
        assert_eq!(get(&format!("{http}/echo/x"), &[]).await.status, 200);
    }

    // `LEGATE_DASHBOARD_SCREENSHOT=docs/dashboard.png` refreshes the README's picture.
    let shots = tempfile::tempdir().unwrap();
    let shot = std::env::var("LEGATE_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shots.path().join("dashboard.png"));
    let (repo_dir, shot2) = (repo.path.clone(), shot.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(driver())
            .arg("run")
            .arg(&admin)
            .arg(&repo_dir)
            .arg("t0ken")
            .arg(&shot2)
            .env("SE_OFFLINE", "true")
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dashboard.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "ok a new commit goes live",
        "ok its diagnostics show file:line and the message",
        "ok pinning with the token changes the mode",
        "ok no console errors",
    ] {
        assert!(stdout.contains(step), "{stdout}");
    }
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_files_api_and_cross_origin_refusal() {
    let repo = Repo::new();
    let echo = free_addr();
    let c1 = first_commit(&repo, &echo.to_string());
    let d = daemon(repo.path.parent().unwrap()).await;
    let cache = tempfile::tempdir().unwrap();
    let (_gw, admin, http) = gateway(d.port, cache.path(), echo).await;

    let root = get(&format!("{admin}/"), &[]).await;
    assert_eq!(root.status, 302);
    assert_eq!(root.header("location"), Some("/ui/"));
    for (path, ctype) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let r = get(&format!("{admin}{path}"), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(ctype), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{path}");
        let csp = r.header("content-security-policy").unwrap();
        assert!(
            csp.contains("default-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        // Revalidation answers 304 without a body.
        let etag = r.header("etag").unwrap().to_string();
        let again = get(&format!("{admin}{path}"), &[("if-none-match", &etag)]).await;
        assert_eq!((again.status.as_u16(), again.body.as_str()), (304, ""));
    }
    // Nothing inline that the policy would block, nothing from another origin.
    let page = get(&format!("{admin}/ui/"), &[]).await.body;
    assert!(!page.contains("<script>") && !page.contains("style="));
    assert!(!page.contains("http://") && !page.contains("https://"));

    // Recent traffic per route, from the gateway's own counters.
    for _ in 0..3 {
        assert_eq!(get(&format!("{http}/echo/x"), &[]).await.status, 200);
    }
    let t = get(&format!("{admin}/api/traffic?minutes=1"), &[])
        .await
        .json();
    let echo_row = t["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "echo")
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(echo_row["requests"], 3, "{t}");
    assert_eq!(echo_row["error_ratio"], 0.0, "{t}");
    assert!(t["upstreams"].is_array());

    // The route diff of a revision against the one before it (none: the first).
    let dj = get(&format!("{admin}/api/revisions/{c1}/diff"), &[])
        .await
        .json();
    assert_eq!(dj["base"], serde_json::Value::Null, "{dj}");
    assert!(
        dj["text"].as_str().unwrap().contains("default/echo"),
        "{dj}"
    );
    let c2 = repo.commit(
        &[(
            "config.yaml",
            Some(
                &ECHO
                    .replace("ECHO", &echo.to_string())
                    .replace("/echo/", "/e/"),
            ),
        )],
        "Move echo to /e/",
    );
    for _ in 0..200 {
        if get(&format!("{admin}/api/status"), &[]).await.json()["applied"] == c2.as_str() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dj = get(&format!("{admin}/api/revisions/{c2}/diff"), &[])
        .await
        .json();
    assert_eq!(dj["base"], c1.as_str(), "{dj}");
    let text = dj["text"].as_str().unwrap();
    assert!(text.contains("/e/") && text.contains("/echo/"), "{text}");
    let none = get(&format!("{admin}/api/revisions/0123abcd/diff"), &[]).await;
    assert_eq!(none.status, 404);

    // A page of another origin cannot drive the admin API, even with the token; this one can.
    let host = admin.trim_start_matches("http://");
    let auth = ("authorization", "Bearer t0ken");
    let evil = send(
        "POST",
        &format!("{admin}/api/sync"),
        &[auth, ("origin", "http://evil.example")],
        empty(),
    )
    .await;
    assert_eq!(evil.status, 403, "{}", evil.body);
    let own = format!("http://{host}");
    let ok = send(
        "POST",
        &format!("{admin}/api/sync"),
        &[auth, ("origin", &own)],
        empty(),
    )
    .await;
    assert!(ok.status.is_success(), "{} {}", ok.status, ok.body);

    // `legate_source_out_of_sync`: 0 while the head is live, 1 once the head is rejected.
    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("legate_source_out_of_sync "))
            .map(str::to_string)
    };
    let m = get(&format!("{admin}/metrics"), &[]).await.body;
    assert_eq!(gauge(&m).as_deref(), Some("0"), "{m}");
    let bad = repo.commit(
        &[(
            "bad.yaml",
            Some(
                &ECHO
                    .replace("echo", "bad")
                    .replace("rewrite: /", "retries: lots"),
            ),
        )],
        "Break it",
    );
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        last = get(&format!("{admin}/api/status"), &[]).await.json();
        if last["last_attempt"]["revision"] == bad.as_str() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["last_attempt"]["outcome"], "Rejected", "{last}");
    let m = get(&format!("{admin}/metrics"), &[]).await.body;
    assert_eq!(gauge(&m).as_deref(), Some("1"), "{m}");
}
