//! `legate diff` through the binary: golden outputs over fixture pairs (set LEGATE_BLESS=1 to
//! rewrite them after an intended change), git revisions, and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn legate(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_legate"));
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().expect("run legate")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diff")
}

fn golden(case: &str, format: &str, ext: &str) -> String {
    let dir = fixtures().join(case);
    let base = dir.join("base");
    let head = dir.join("head");
    let o = legate(
        &[
            "diff",
            base.to_str().unwrap(),
            head.to_str().unwrap(),
            "--format",
            format,
        ],
        None,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got = String::from_utf8(o.stdout).unwrap();
    let file = dir.join(format!("expected.{ext}"));
    if std::env::var_os("LEGATE_BLESS").is_some() {
        std::fs::write(&file, &got).unwrap();
    }
    let want = std::fs::read_to_string(&file)
        .unwrap_or_else(|_| panic!("missing {}; run with LEGATE_BLESS=1", file.display()));
    assert_eq!(got, want, "{case} {format} differs from {}", file.display());
    got
}

#[test]
fn basic_changes_field_by_field() {
    let t = golden("basic", "text", "txt");
    assert!(t.contains("+ #3       default/new"));
    assert!(t.contains("- was #3   default/old"));
    assert!(t.contains("timeout: 3000ms -> 10000ms"));
    assert!(t.contains("now get 404"));
    golden("basic", "markdown", "md");
}

#[test]
fn shadowing_and_unreachable_routes_are_called_out() {
    let t = golden("shadow", "text", "txt");
    assert!(t.contains("SHADOWED: `default/catch-all` now takes the traffic of `default/users`"));
    assert!(t.contains("UNREACHABLE: `default/beta` cannot be reached"));
    golden("shadow", "markdown", "md");
}

#[test]
fn canary_shift_shows_before_and_after_shares() {
    let t = golden("canary", "text", "txt");
    assert!(t.contains("`default/quote-v2` (/quote/*) now takes 50% of its traffic, was 10%"));
}

#[test]
fn lost_tls_and_changed_redirect() {
    let t = golden("tls-redirect", "text", "txt");
    assert!(t.contains("TLS LOST: Host `default/www`"));
    assert!(t.contains("REDIRECT: `default/legacy` redirects differently"));
    let md = golden("tls-redirect", "markdown", "md");
    assert!(md.starts_with("<!-- legate-diff -->"));
}

#[test]
fn json_format_and_exit_codes() {
    let dir = fixtures();
    let same = dir.join("same");
    let args = |c: &str| -> Vec<String> {
        vec![
            "diff".into(),
            dir.join(c).join("base").display().to_string(),
            dir.join(c).join("head").display().to_string(),
        ]
    };
    let run = |c: &str, extra: &[&str]| {
        let mut a: Vec<String> = args(c);
        a.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        legate(&a, None)
    };
    assert_eq!(run("same", &["--exit-code"]).status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&run("same", &[]).stdout),
        "No route changes.\n"
    );
    assert_eq!(run("basic", &["--exit-code"]).status.code(), Some(1));
    assert_eq!(run("basic", &[]).status.code(), Some(0));
    let o = run("shadow", &["--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["added_mappings"], 1);
    assert!(v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == "shadowed"));
    // An invalid side: exit 2 with its diagnostics, never a crash.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("m.yaml"), "apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata: {name: x}\nspec: {prefix: /x/}\n").unwrap();
    let o = legate(
        &[
            "diff",
            same.join("base").to_str().unwrap(),
            bad.path().to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`spec.service` is required"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        legate(&["diff", "no-such-rev", "nor-this"], Some(bad.path()))
            .status
            .code(),
        Some(2)
    );
}

fn git(dir: &Path, args: &[&str]) {
    crate::support::git::git(dir, args);
}

#[test]
fn git_revisions_with_path() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    git(r, &["init", "-q", "-b", "main"]);
    std::fs::create_dir(r.join("gateway")).unwrap();
    std::fs::write(r.join("README.md"), "not config\n").unwrap();
    std::fs::copy(
        fixtures().join("canary/base/m.yaml"),
        r.join("gateway/m.yaml"),
    )
    .unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "base"]);
    std::fs::copy(
        fixtures().join("canary/head/m.yaml"),
        r.join("gateway/m.yaml"),
    )
    .unwrap();
    git(r, &["commit", "-qam", "shift the canary"]);
    let o = legate(
        &["diff", "HEAD~1", "HEAD", "--path", "gateway", "--exit-code"],
        Some(r),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("now takes 50% of its traffic, was 10%"),
        "{out}"
    );
    // --repo from elsewhere, and a branch name.
    let o = legate(
        &[
            "diff",
            "main",
            "HEAD",
            "--repo",
            r.to_str().unwrap(),
            "--path",
            "gateway",
            "--exit-code",
        ],
        None,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `A...B` compares B with the merge base of A and B (what a pull request changes): a change
/// that landed on A after B branched off is not shown as B undoing it. `A B` and `A..B` still
/// compare the two tips.
#[test]
fn three_dot_range_compares_against_the_merge_base() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    git(r, &["init", "-q", "-b", "main"]);
    std::fs::copy(fixtures().join("canary/base/m.yaml"), r.join("m.yaml")).unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "base"]);
    // The pull-request branch shifts the canary.
    git(r, &["checkout", "-qb", "feature"]);
    std::fs::copy(fixtures().join("canary/head/m.yaml"), r.join("m.yaml")).unwrap();
    git(r, &["commit", "-qam", "shift the canary"]);
    // Meanwhile main gains an unrelated route.
    git(r, &["checkout", "-q", "main"]);
    std::fs::write(
        r.join("other.yaml"),
        "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: other}\nspec: {hostname: \"*\", prefix: /other/, service: other:80}\n",
    )
    .unwrap();
    git(r, &["add", "."]);
    git(r, &["commit", "-qm", "unrelated route on main"]);

    let text = |args: &[&str]| {
        let o = legate(args, Some(r));
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let pr = text(&["diff", "main...feature"]);
    assert!(pr.contains("now takes 50% of its traffic, was 10%"), "{pr}");
    assert!(
        !pr.contains("default/other"),
        "the merge base has no `other`: {pr}"
    );
    for tips in [
        text(&["diff", "main", "feature"]),
        text(&["diff", "main..feature"]),
    ] {
        assert!(
            tips.contains("default/other"),
            "tips differ by `other`: {tips}"
        );
    }
    // A range and a second revision together is a usage error.
    let o = legate(&["diff", "main...feature", "HEAD"], Some(r));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already a range"));
}
