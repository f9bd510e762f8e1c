//! `legate check`, `routes` and `schema` through the real binary, on real files: exit codes,
//! formats, and every kind of bad input the foundation issue lists.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) fn legate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(args)
        .output()
        .expect("run legate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const GOOD: &str = "apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: good\nspec:\n  hostname: '*'\n  prefix: /good/\n  service: good:8080\n";

/// A config directory holding these files (subdirectories made as needed).
pub(crate) fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    dir
}

/// [`tree`] of text files.
pub(crate) fn text_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let bytes: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_bytes())).collect();
    tree(&bytes)
}

/// `legate check DIR EXTRA...`.
pub(crate) fn check(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["check", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    legate(&args)
}

#[test]
fn examples_repo_is_valid_and_routes_print_in_order() {
    let ex = repo_root().join("examples/repo");
    let secrets = repo_root().join("examples/secrets");
    let o = check(&ex, &["--secrets-dir", secrets.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains(": valid:"));
    let o = legate(&["routes", ex.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let table = stdout(&o);
    assert!(table.contains("Host default/www"));
    // The 90/10 canary shows both shares.
    assert!(table.contains("default/quote ") && table.contains("90%") && table.contains("10%"));
    let json = legate(&["routes", ex.to_str().unwrap(), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["hash"].as_str().unwrap().len(), 64);
}

#[test]
fn missing_path_is_a_usage_error() {
    let o = legate(&["check", "/definitely/not/here"]);
    assert_eq!(o.status.code(), Some(2));
    let o = legate(&["check", "--format", "nonsense", "."]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn malformed_yaml_names_file_line_and_column() {
    let d = tree(&[
        (
            "bad.yaml",
            b"apiVersion: legate.dev/v1alpha1\nkind: Mapping\nspec: [unclosed\n",
        ),
        ("good.yaml", GOOD.as_bytes()),
    ]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("bad.yaml:"), "{out}");
    assert!(out.contains("error[yaml]: YAML syntax error"), "{out}");
}

#[test]
fn wrong_types_and_typos_are_explained() {
    let body = "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  hostname: '*'\n  prefx: /a/\n  prefix: /a/\n  service: a\n  timeout_ms: soon\n";
    let d = tree(&[("m.yaml", body.as_bytes())]);
    let o = check(d.path(), &["--format", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let diags = v["diagnostics"].as_array().unwrap();
    let typo = diags
        .iter()
        .find(|d| d["code"] == "unknown-field")
        .expect("typo");
    assert_eq!(typo["line"], 7);
    assert_eq!(typo["column"], 3);
    assert_eq!(typo["pointer"], "/spec/prefx");
    assert_eq!(typo["help"], "did you mean `prefix`?");
    let ty = diags
        .iter()
        .find(|d| d["pointer"] == "/spec/timeout_ms")
        .expect("type error");
    assert_eq!(ty["line"], 10);
    assert_eq!(v["valid"], false);
}

#[test]
fn near_miss_api_version_and_kind_get_suggestions() {
    let body = "apiVersion: getambassador.io/v3alpah1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  prefix: /a/\n  service: a\n---\napiVersion: legate.dev/v1alpha1\nkind: Mappping\nmetadata:\n  name: n\nspec:\n  prefix: /a/\n  service: a\n";
    let d = tree(&[("m.yaml", body.as_bytes())]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("did you mean `getambassador.io/v3alpha1`?"),
        "{out}"
    );
    assert!(out.contains("did you mean `Mapping`?"), "{out}");
}

#[test]
fn binary_and_non_utf8_files_are_rejected_by_name() {
    let d = tree(&[
        ("bin.yaml", b"\x00\x01\x02binary"),
        ("latin1.yaml", b"name: caf\xe9\n"),
        ("good.yaml", GOOD.as_bytes()),
    ]);
    let out = stdout(&check(d.path(), &[]));
    assert!(out.contains("bin.yaml:1:1: error[binary-file]"), "{out}");
    assert!(out.contains("latin1.yaml:1:1: error[not-utf8]"), "{out}");
}

#[test]
fn size_limits_per_file_and_per_revision() {
    let big = format!("# {}\n", "x".repeat(2 << 20));
    let d = tree(&[("big.yaml", big.as_bytes()), ("good.yaml", GOOD.as_bytes())]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("big.yaml:1:1: error[file-too-large]"));
    // At the limit passes, one byte past fails.
    let exact = GOOD.len().to_string();
    let d = tree(&[("good.yaml", GOOD.as_bytes())]);
    assert_eq!(
        check(d.path(), &["--max-file-bytes", &exact]).status.code(),
        Some(0)
    );
    let less = (GOOD.len() - 1).to_string();
    assert_eq!(
        check(d.path(), &["--max-file-bytes", &less]).status.code(),
        Some(1)
    );
    let d = tree(&[
        ("a.yaml", GOOD.as_bytes()),
        ("b.yaml", GOOD.replace("good", "other").as_bytes()),
    ]);
    let o = check(d.path(), &["--max-revision-bytes", &exact]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("error[revision-too-large]"));
}

#[test]
fn alias_bomb_and_deep_nesting_fail_cleanly() {
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..12 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        ));
    }
    let deep = "x: ".to_string() + &"[".repeat(500) + &"]".repeat(500) + "\n";
    let d = tree(&[
        ("bomb.yaml", bomb.as_bytes()),
        ("deep.yaml", deep.as_bytes()),
        ("good.yaml", GOOD.as_bytes()),
    ]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("bomb.yaml:") && out.contains("alias bomb"),
        "{out}"
    );
    assert!(
        out.contains("deep.yaml:") && out.contains("nests deeper"),
        "{out}"
    );
    assert!(
        out.contains("good.yaml") || out.contains("1 resource(s)"),
        "{out}"
    );
}

#[test]
fn symlinks_out_of_the_root_are_rejected() {
    let outside = tree(&[("secret.yaml", GOOD.as_bytes())]);
    let d = tree(&[("good.yaml", GOOD.as_bytes())]);
    std::os::unix::fs::symlink(
        outside.path().join("secret.yaml"),
        d.path().join("abs.yaml"),
    )
    .unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("../../escape.yaml", d.path().join("sub/rel.yaml")).unwrap();
    std::os::unix::fs::symlink("good.yaml", d.path().join("inside.yml")).unwrap();
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("abs.yaml:1:1: error[symlink-escape]") && out.contains("absolute path"),
        "{out}"
    );
    assert!(
        out.contains("sub/rel.yaml:1:1: error[symlink-escape]")
            && out.contains("leaves the config root"),
        "{out}"
    );
    // A link inside the root is followed: the same Mapping twice is a duplicate, naming both.
    assert!(out.contains("duplicate-resource"), "{out}");
}

#[test]
fn empty_repository_is_valid_with_zero_routes() {
    let d = tree(&[("README.md", b"# nothing here\n")]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.contains("0 route(s)") && out.contains("defines no routes"),
        "{out}"
    );
}

#[test]
fn dot_dirs_other_apis_and_fragments() {
    let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n";
    let frag = "prefix: /just-a-fragment/\n";
    let d = tree(&[
        (".github/workflows/ci.yaml", b"on: push\njobs: {}\n"),
        ("deploy.yaml", deploy.as_bytes()),
        ("frag.yaml", frag.as_bytes()),
        ("good.yaml", GOOD.as_bytes()),
    ]);
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(!out.contains(".github"), "{out}");
    assert!(out.contains("deploy.yaml:1:1: note[other-api]"), "{out}");
    assert!(
        out.contains("frag.yaml:1:1: warning[not-a-resource]"),
        "{out}"
    );
    // --strict makes the warning an error.
    assert_eq!(check(d.path(), &["--strict"]).status.code(), Some(1));
    // --exclude narrows the tree.
    let o = check(d.path(), &["--strict", "--exclude", "frag.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = check(d.path(), &["--include", "good.yaml"]);
    assert!(stdout(&o).contains("1 file(s)"));
}

#[test]
fn github_format_prints_workflow_annotations() {
    let body = "apiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hosname: x.example\n";
    let d = tree(&[("hosts/h.yaml", body.as_bytes())]);
    let o = check(d.path(), &["--format", "github"]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("::error "))
        .expect("annotation");
    assert!(line.contains("hosts/h.yaml,line=6,col=3"), "{line}");
    assert!(line.contains("did you mean `hostname`?"), "{line}");
}

#[test]
fn secrets_dir_check_names_the_host() {
    let ex = repo_root().join("examples/repo");
    let empty = tempfile::tempdir().unwrap();
    let o = check(&ex, &["--secrets-dir", empty.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("error[tls-secret]: Host `www`"), "{out}");
    // A key that does not belong to the certificate is caught too.
    let secrets = repo_root().join("examples/secrets/www-example-tls");
    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir(bad.path().join("www-example-tls")).unwrap();
    std::fs::copy(
        secrets.join("tls.crt"),
        bad.path().join("www-example-tls/tls.crt"),
    )
    .unwrap();
    std::fs::write(
        bad.path().join("www-example-tls/tls.key"),
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let o = check(&ex, &["--secrets-dir", bad.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("tls.key"), "{}", stdout(&o));
}

#[test]
fn schema_command_lists_fields_with_status() {
    let o = legate(&["schema", "mapping"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("prefix ") && l.contains("implemented")));
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("retry_policy ") && l.contains("implemented")));
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("health_checks ") && l.contains("implemented")));
    let o = legate(&["schema", "host", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
}

#[test]
fn ambassador_id_flag_selects_resources() {
    let body = GOOD.replace(
        "  hostname: '*'\n",
        "  hostname: '*'\n  ambassador_id: [blue]\n",
    );
    let d = tree(&[("m.yaml", body.as_bytes())]);
    let out = stdout(&check(d.path(), &[]));
    assert!(
        out.contains("note[other-ambassador-id]") && out.contains("`blue`"),
        "{out}"
    );
    assert!(out.contains("0 route(s)"));
    let out = stdout(&check(d.path(), &["--ambassador-id", "blue"]));
    assert!(out.contains("1 route(s)"), "{out}");
}

#[test]
fn gitlab_format_is_a_code_quality_report() {
    let body = "apiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: h\nspec:\n  hosname: x.example\n";
    let d = tree(&[("h.yaml", body.as_bytes())]);
    let o = check(d.path(), &["--format", "gitlab"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let issues = v.as_array().unwrap();
    assert!(!issues.is_empty());
    for i in issues {
        for key in ["description", "check_name", "fingerprint", "severity"] {
            assert!(i[key].is_string(), "{key} in {i}");
        }
        assert!(["info", "minor", "major", "critical", "blocker"]
            .contains(&i["severity"].as_str().unwrap()));
        assert!(i["location"]["path"].as_str().unwrap().ends_with("h.yaml"));
        assert!(i["location"]["lines"]["begin"].as_u64().unwrap() >= 1);
    }
    let typo = issues
        .iter()
        .find(|i| i["check_name"] == "legate/unknown-field")
        .unwrap();
    assert_eq!(typo["severity"], "major");
    assert_eq!(typo["location"]["lines"]["begin"], 6);
    // Fingerprints are stable run to run.
    let again: serde_json::Value =
        serde_json::from_slice(&check(d.path(), &["--format", "gitlab"]).stdout).unwrap();
    assert_eq!(v, again);
}

#[test]
fn failing_route_tests_fail_the_check_with_file_and_line() {
    let ex = repo_root().join("examples/repo");
    let d = tempfile::tempdir().unwrap();
    for entry in ["hosts.yaml", "mappings", "tests"] {
        let status = Command::new("cp")
            .arg("-r")
            .arg(ex.join(entry))
            .arg(d.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert_eq!(check(d.path(), &[]).status.code(), Some(0));
    // Break the echo route: its route test must fail and name the case.
    let echo = d.path().join("mappings/echo.yaml");
    let text =
        std::fs::read_to_string(&echo)
            .unwrap()
            .replacen("rewrite: /\n", "rewrite: /api/\n", 1);
    std::fs::write(&echo, text).unwrap();
    let o = check(d.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.contains("route-test-failed"))
        .expect("a failed case");
    assert!(line.starts_with("tests/routes.yaml:"), "{line}");
    assert!(
        line.contains("echo strips its prefix") && line.contains("expected upstream path `/hello`"),
        "{line}"
    );
}

#[test]
fn committed_crds_match_the_schemas() {
    let out = tempfile::tempdir().unwrap();
    let o = legate(&["crds", "--out", out.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let committed = repo_root().join("deploy/crds");
    let mut names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    // Every kind but those that exist only in Emissary's group (Module, TLSContext, ...) and
    // OIDCLogin, not served in Kubernetes mode yet.
    let emissary_only = legate::config::schema::Kind::ALL
        .iter()
        .filter(|k| k.emissary_only())
        .count();
    assert_eq!(
        names.len(),
        legate::config::schema::Kind::ALL.len() - emissary_only - 1
    );
    for n in names {
        let fresh = std::fs::read_to_string(out.path().join(&n)).unwrap();
        let old = std::fs::read_to_string(committed.join(&n)).unwrap_or_default();
        assert_eq!(
            fresh,
            old,
            "deploy/crds/{} is stale: run `legate crds --out deploy/crds`",
            n.to_string_lossy()
        );
        // Structural: no refs, unions, consts or closed objects; every node typed or open.
        let docs = legate::config::yaml::parse_documents(&fresh, Default::default()).unwrap();
        let crd = &docs[0].value;
        assert_eq!(crd["kind"], "CustomResourceDefinition");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["x-kubernetes-preserve-unknown-fields"], true,
            "typos must reach Legate"
        );
        fn walk(v: &serde_json::Value, path: &str) {
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("{path} not an object"));
            for bad in [
                "$ref",
                "oneOf",
                "anyOf",
                "const",
                "$defs",
                "x-legate-status",
            ] {
                assert!(!o.contains_key(bad), "{bad} at {path}");
            }
            assert!(
                o.get("additionalProperties") != Some(&serde_json::Value::Bool(false)),
                "closed object at {path}"
            );
            assert!(
                o.contains_key("type")
                    || o.contains_key("x-kubernetes-preserve-unknown-fields")
                    || o.contains_key("x-kubernetes-int-or-string"),
                "untyped node at {path}"
            );
            if let Some(p) = o.get("properties").and_then(|p| p.as_object()) {
                for (k, c) in p {
                    walk(c, &format!("{path}.{k}"));
                }
            }
            for k in ["items", "additionalProperties"] {
                if let Some(c) = o.get(k).filter(|c| c.is_object()) {
                    walk(c, &format!("{path}[{k}]"));
                }
            }
        }
        walk(&v["schema"]["openAPIV3Schema"], "root");
    }
}
