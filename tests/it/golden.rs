//! Golden diagnostics: each folder of tests/fixtures/check is a config tree, and its
//! `expected.txt` holds what `legate check` prints for it (LEGATE_BLESS=1 rewrites them), so a
//! change to any message shows in review.

use std::path::Path;
use std::process::Command;

#[test]
fn check_output_matches_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 4);
    let mut failures = Vec::new();
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let o = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["check", "--exclude", "expected.txt", "."])
            .current_dir(&case)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{name} should be invalid");
        let got = String::from_utf8(o.stdout).unwrap();
        let file = case.join("expected.txt");
        if std::env::var_os("LEGATE_BLESS").is_some() {
            std::fs::write(&file, &got).unwrap();
        }
        let want = std::fs::read_to_string(&file).unwrap_or_default();
        if got != want {
            failures.push(format!("--- {name}: expected\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
