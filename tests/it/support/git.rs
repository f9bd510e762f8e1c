//! Git fixtures: the `git` CLI with a fixed identity, a work repository builder, and a
//! `git daemon` on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Run `git` in `dir` with a fixed identity and no user or system config; its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.test")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.test")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work repository under `<tmp>/repo`.
pub struct Repo {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
}

impl Repo {
    pub fn new() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("repo");
        std::fs::create_dir(&path).unwrap();
        git(&path, &["init", "-q", "-b", "main"]);
        Repo { _tmp: tmp, path }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Write (Some) or delete (None) files and commit; returns the commit id.
    pub fn commit(&self, files: &[(&str, Option<&str>)], msg: &str) -> String {
        self.commit_with(files, msg, &[])
    }

    /// Commit signed with an SSH private key.
    pub fn commit_signed(&self, files: &[(&str, Option<&str>)], msg: &str, key: &Path) -> String {
        let key = format!("user.signingkey={}", key.display());
        self.commit_with(files, msg, &["-c", "gpg.format=ssh", "-c", &key])
    }

    fn commit_with(&self, files: &[(&str, Option<&str>)], msg: &str, pre: &[&str]) -> String {
        for (name, text) in files {
            let p = self.path.join(name);
            match text {
                Some(t) => {
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    std::fs::write(&p, t).unwrap();
                }
                None => {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        git(&self.path, &["add", "-A"]);
        let mut args: Vec<&str> = pre.to_vec();
        args.extend(["commit", "-q", "--allow-empty", "-m", msg]);
        if !pre.is_empty() {
            args.push("-S");
        }
        git(&self.path, &args);
        git(&self.path, &["rev-parse", "HEAD"])
    }
}

/// `git daemon` serving the parent of a repository; killed on drop.
pub struct Daemon {
    child: Child,
    pub port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn daemon(base: &Path) -> Daemon {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Run git-daemon itself: `git daemon` would fork it as a child that outlives a kill.
    let exec_path = git(base, &["--exec-path"]);
    let child = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args([
            "--reuseaddr",
            "--export-all",
            "--informative-errors",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon starts");
    let d = Daemon { child, port };
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("git daemon did not start");
}
