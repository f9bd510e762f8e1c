//! The CI recipes' comment scripts (examples/ci/*-comment.sh) against a fake GitHub / GitLab
//! API served by the test: posting to the real services cannot be tested from here, so this
//! checks the requests the recipes send, and that a second run edits the first comment.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// A one-thread HTTP/1.1 server: answers GETs with `list` (JSON) and everything else with
/// `{"id": 1}`; records every request.
fn fake_api(list: &'static str) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() || line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let mut headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                let h = h.trim_end().to_string();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap();
                    }
                    headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let reply = if method == "GET" { list } else { "{\"id\": 1}" };
            rec.lock().unwrap().push(Seen {
                method,
                path,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
        }
    });
    (addr, seen)
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/ci")
        .join(name)
        .display()
        .to_string()
}

fn body_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        "<!-- legate-diff -->\n### Legate route diff\n\nNo route changes.\n",
    )
    .unwrap();
    f
}

#[test]
fn github_comment_is_posted_then_edited() {
    let body = body_file();
    let run = |api: &str| {
        Command::new("bash")
            .arg(script("github-pr-comment.sh"))
            .arg(body.path())
            .env("GITHUB_API_URL", api)
            .env("GITHUB_TOKEN", "t0ken")
            .env("GITHUB_REPOSITORY", "acme/gateway-config")
            .env("PR_NUMBER", "42")
            .output()
            .unwrap()
    };
    let (api, seen) = fake_api("[{\"id\": 7, \"body\": \"an unrelated comment\"}]");
    let o = run(&api);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        (
            "GET",
            "/repos/acme/gateway-config/issues/42/comments?per_page=100"
        )
    );
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("POST", "/repos/acme/gateway-config/issues/42/comments")
    );
    assert!(reqs[1]
        .headers
        .contains(&("authorization".into(), "Bearer t0ken".into())));
    let v: serde_json::Value = serde_json::from_str(&reqs[1].body).unwrap();
    assert!(v["body"]
        .as_str()
        .unwrap()
        .starts_with("<!-- legate-diff -->"));

    // The next push finds its own comment by the marker and edits it.
    let (api, seen) = fake_api(
        "[{\"id\": 7, \"body\": \"hi\"}, {\"id\": 99, \"body\": \"<!-- legate-diff -->\\nold\"}]",
    );
    let o = run(&api);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("PATCH", "/repos/acme/gateway-config/issues/comments/99")
    );
}

#[test]
fn gitlab_note_is_posted_then_edited() {
    let body = body_file();
    let run = |api: &str| {
        Command::new("bash")
            .arg(script("gitlab-mr-comment.sh"))
            .arg(body.path())
            .env("CI_API_V4_URL", format!("{api}/api/v4"))
            .env("GITLAB_TOKEN", "glpat")
            .env("CI_PROJECT_ID", "17")
            .env("CI_MERGE_REQUEST_IID", "5")
            .output()
            .unwrap()
    };
    let (api, seen) = fake_api("[]");
    assert!(run(&api).status.success());
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("POST", "/api/v4/projects/17/merge_requests/5/notes")
    );
    assert!(reqs[1]
        .headers
        .contains(&("private-token".into(), "glpat".into())));
    let (api, seen) = fake_api("[{\"id\": 3, \"body\": \"<!-- legate-diff -->\"}]");
    assert!(run(&api).status.success());
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("PUT", "/api/v4/projects/17/merge_requests/5/notes/3")
    );
}
