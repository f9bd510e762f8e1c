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

// ---- The recipes themselves, run as written against a real repository ----------------------
//
// A bare "origin" with `main` and two pull-request branches (one that shifts a canary, one that
// breaks the config), cloned and checked out as the CI services do. Every shell step of the
// recipe runs in bash with the variables the service sets; `uses:` steps are emulated
// (checkout: the clone; cache: a hit, with the binary under test already in the cached
// install root, so the install step's own shell still runs); the comment goes to the fake API.

fn git_in(dir: &Path, args: &[&str]) {
    crate::support::git::git(dir, args);
}

/// `origin` (bare) with `main`, `feature` (canary 10% -> 50%) and `broken` (a Mapping without
/// `service`); each branch carries the recipe files as a config repository would.
fn config_origin(recipe: &str, recipe_dest: &str, comment: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("seed");
    std::fs::create_dir_all(work.join("ci")).unwrap();
    git_in(t.path(), &["init", "-q", "seed"]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diff/canary");
    std::fs::copy(fixtures.join("base/m.yaml"), work.join("m.yaml")).unwrap();
    let dest = work.join(recipe_dest);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(script(recipe), &dest).unwrap();
    std::fs::copy(script(comment), work.join("ci").join(comment)).unwrap();
    git_in(&work, &["add", "-A"]);
    git_in(&work, &["commit", "-qm", "base"]);
    git_in(&work, &["checkout", "-qb", "feature"]);
    std::fs::copy(fixtures.join("head/m.yaml"), work.join("m.yaml")).unwrap();
    git_in(&work, &["commit", "-qam", "shift the canary"]);
    git_in(&work, &["checkout", "-q", "main"]);
    git_in(&work, &["checkout", "-qb", "broken"]);
    std::fs::write(
        work.join("bad.yaml"),
        "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: bad}\nspec: {hostname: \"*\", prefix: /bad/}\n",
    )
    .unwrap();
    git_in(&work, &["add", "-A"]);
    git_in(&work, &["commit", "-qm", "break it"]);
    git_in(&work, &["checkout", "-q", "main"]);
    git_in(t.path(), &["clone", "-q", "--bare", "seed", "origin.git"]);
    t
}

/// A clone of `origin` on `branch`, as the CI checkout leaves it (full history).
fn checkout(origin: &Path, branch: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    git_in(
        t.path(),
        &[
            "clone",
            "-q",
            origin.join("origin.git").to_str().unwrap(),
            "w",
        ],
    );
    git_in(&t.path().join("w"), &["checkout", "-q", branch]);
    t
}

/// A cargo install root holding the binary under test, as a cache hit restores it.
fn cached_install(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_legate"), root.join("bin/legate")).unwrap();
}

fn recipe_yaml(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(script(name)).unwrap();
    let docs = legate::config::yaml::parse_documents(&text, Default::default()).unwrap();
    docs.into_iter().next().unwrap().value
}

/// `${{ expr }}` in a GitHub step's `env`, for the expressions the recipe uses.
fn gh_expr(v: &str, vars: &[(&str, &str)]) -> String {
    let mut out = v.to_string();
    while let Some(start) = out.find("${{") {
        let end = out[start..].find("}}").expect("closed expression") + start;
        let expr = out[start + 3..end].trim();
        let val = vars
            .iter()
            .find(|(k, _)| *k == expr)
            .unwrap_or_else(|| panic!("the test does not know `{expr}`"))
            .1;
        out.replace_range(start..end + 2, val);
    }
    out
}

struct JobRun {
    /// (step name, exit code) of every step that ran.
    steps: Vec<(String, i32)>,
    failed: bool,
    summary: String,
}

/// Run the GitHub workflow's `routes` job in `dir`, as Actions would for a pull request into
/// `main`.
fn run_github_job(dir: &Path, home: &Path, api: &str) -> JobRun {
    let wf = recipe_yaml("github-actions.yml");
    let job = &wf["jobs"]["routes"];
    let gh = tempfile::tempdir().unwrap();
    let summary = gh.path().join("summary.md");
    let path_file = gh.path().join("path");
    std::fs::write(&summary, "").unwrap();
    std::fs::write(&path_file, "").unwrap();
    let vars: Vec<(&str, &str)> = vec![
        ("vars.LEGATE_GIT", "https://git.example.test/legate.git"),
        ("vars.LEGATE_REV", "v0.1.0"),
        ("secrets.GITHUB_TOKEN", "ghs-token"),
        ("github.event.pull_request.number", "42"),
    ];
    let mut outputs: std::collections::HashMap<String, String> = Default::default();
    let mut run = JobRun {
        steps: Vec::new(),
        failed: false,
        summary: String::new(),
    };
    for step in job["steps"].as_array().unwrap() {
        let name = step["name"]
            .as_str()
            .or(step["uses"].as_str())
            .unwrap()
            .to_string();
        // `if:` (default `success()`): the recipe uses only `steps.<id>.outputs.<k> != 'v'`.
        let go = match step["if"].as_str() {
            None => !run.failed,
            Some(cond) => {
                let (lhs, rhs) = cond.split_once("!=").expect("a != condition");
                let mut p = lhs.trim().split('.');
                assert_eq!(p.next(), Some("steps"));
                let id = p.next().unwrap();
                assert_eq!(p.next(), Some("outputs"));
                let key = p.next().unwrap();
                let got = outputs
                    .get(&format!("{id}.{key}"))
                    .cloned()
                    .unwrap_or_default();
                !run.failed && got != rhs.trim().trim_matches('\'')
            }
        };
        if !go {
            continue;
        }
        if let Some(uses) = step["uses"].as_str() {
            assert!(
                uses.starts_with("actions/checkout@") || uses.starts_with("actions/cache@"),
                "{uses}"
            );
            continue;
        }
        let script_text = step["run"].as_str().unwrap();
        let out_file = gh.path().join("output");
        std::fs::write(&out_file, "").unwrap();
        let mut path = std::fs::read_to_string(&path_file)
            .unwrap()
            .lines()
            .rev()
            .collect::<Vec<_>>()
            .join(":");
        path.push(':');
        path.push_str(&std::env::var("PATH").unwrap());
        let mut c = Command::new("bash");
        c.args([
            "--noprofile",
            "--norc",
            "-eo",
            "pipefail",
            "-c",
            script_text,
        ])
        .current_dir(dir)
        .env("HOME", home)
        .env("PATH", path)
        .env("GITHUB_BASE_REF", "main")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_OUTPUT", &out_file)
        .env("GITHUB_PATH", &path_file)
        .env("GITHUB_API_URL", api)
        .env("GITHUB_REPOSITORY", "acme/gateway-config");
        for env in [&job["env"], &step["env"]] {
            if let Some(m) = env.as_object() {
                for (k, v) in m {
                    c.env(k, gh_expr(v.as_str().unwrap(), &vars));
                }
            }
        }
        let o = c.output().unwrap();
        let code = o.status.code().unwrap_or(-1);
        eprintln!(
            "step {name}: exit {code}\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if let Some(id) = step["id"].as_str() {
            for line in std::fs::read_to_string(&out_file).unwrap().lines() {
                if let Some((k, v)) = line.split_once('=') {
                    outputs.insert(format!("{id}.{k}"), v.to_string());
                }
            }
        }
        run.steps.push((name, code));
        if code != 0 {
            run.failed = true;
        }
    }
    run.summary = std::fs::read_to_string(&summary).unwrap();
    run
}

#[test]
fn github_recipe_runs_as_written_on_a_pull_request() {
    let origin = config_origin(
        "github-actions.yml",
        ".github/workflows/legate.yml",
        "github-pr-comment.sh",
    );
    let home = tempfile::tempdir().unwrap();
    cached_install(&home.path().join(".cargo-legate"));

    // A good pull request: every step passes and the comment carries the route diff.
    let co = checkout(origin.path(), "feature");
    let (api, seen) = fake_api("[]");
    let job = run_github_job(&co.path().join("w"), home.path(), &api);
    assert!(!job.failed, "{:?}", job.steps);
    assert!(job.steps.iter().any(|(n, _)| n.starts_with("Comment")));
    assert!(
        job.summary
            .contains("now takes 50% of its traffic, was 10%"),
        "{}",
        job.summary
    );
    let reqs = seen.lock().unwrap().clone();
    let post = reqs.iter().find(|r| r.method == "POST").expect("a comment");
    assert_eq!(post.path, "/repos/acme/gateway-config/issues/42/comments");
    assert!(post.body.contains("was 10%"), "{}", post.body);

    // A pull request that breaks the config: the comment still says why, then the job fails.
    let co = checkout(origin.path(), "broken");
    let (api, seen) = fake_api("[]");
    let job = run_github_job(&co.path().join("w"), home.path(), &api);
    assert!(job.failed, "{:?}", job.steps);
    let last = job.steps.last().unwrap();
    assert!(last.0.starts_with("Fail when"), "{:?}", job.steps);
    let reqs = seen.lock().unwrap().clone();
    let post = reqs.iter().find(|r| r.method == "POST").expect("a comment");
    assert!(post.body.contains("does not validate"), "{}", post.body);
    assert!(post.body.contains("bad.yaml"), "{}", post.body);
}

#[test]
fn gitlab_recipe_runs_as_written_on_a_merge_request() {
    let recipe = recipe_yaml("gitlab-ci.yml");
    let job = &recipe["legate"];
    assert!(
        job["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("rust:")),
        "the job names an image with cargo"
    );
    let origin = config_origin("gitlab-ci.yml", ".gitlab-ci.yml", "gitlab-mr-comment.sh");
    let run = |branch: &str| {
        let co = checkout(origin.path(), branch);
        let dir = co.path().join("w");
        cached_install(&dir.join(".cargo-legate"));
        let mut lines = Vec::new();
        for part in ["before_script", "script"] {
            for l in job[part].as_array().unwrap() {
                let l = l.as_str().unwrap();
                // Package installs need the image's apt; the machine running the test has
                // python3 and curl already.
                if l.starts_with("apt-get ") {
                    assert!(l.contains("python3") && l.contains("curl"), "{l}");
                    continue;
                }
                lines.push(l.to_string());
            }
        }
        let (api, seen) = fake_api("[]");
        let o = Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c"])
            .arg(lines.join("\n"))
            .current_dir(&dir)
            .env("CI_MERGE_REQUEST_TARGET_BRANCH_NAME", "main")
            .env("CI_API_V4_URL", format!("{api}/api/v4"))
            .env("CI_PROJECT_ID", "17")
            .env("CI_MERGE_REQUEST_IID", "5")
            .env("LEGATE_NOTE_TOKEN", "glpat")
            .env("LEGATE_GIT", "https://git.example.test/legate.git")
            .env("LEGATE_REV", "v0.1.0")
            .output()
            .unwrap();
        eprintln!(
            "{branch}: {:?}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let report = std::fs::read_to_string(dir.join("gl-code-quality-report.json")).unwrap();
        let note = seen
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.method == "POST")
            .map(|r| r.body.clone())
            .expect("a note");
        (o.status.code(), report, note, co)
    };
    let (code, report, note, _co) = run("feature");
    assert_eq!(code, Some(0));
    assert!(serde_json::from_str::<serde_json::Value>(&report)
        .unwrap()
        .is_array());
    assert!(note.contains("was 10%"), "{note}");
    let (code, report, note, _co) = run("broken");
    assert_eq!(code, Some(1), "the job fails with check's status");
    assert!(report.contains("bad.yaml"), "{report}");
    assert!(note.contains("does not validate"), "{note}");
}
