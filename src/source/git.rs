//! Git source: fetch a ref into a bare cache repository and read config straight from the
//! object database at the resolved commit.
//!
//! No working tree is ever checked out, so a symlink or a path in a commit cannot touch the
//! disk: [`GitTree`] walks tree objects and applies the same filter and size budget as a
//! directory. The fetch is not shallow, because the force-push check needs the ancestry of the
//! applied commit. git2 is blocking: every method here runs on `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use git2::{
    AutotagOption, CertificateCheckStatus, Cred, CredentialType, FetchOptions, ObjectType, Oid,
    RemoteCallbacks, Repository,
};

use super::{CommitInfo, Revision, Source, SourceError};
use crate::config::tree::{Budget, ConfigTree, Filter, TreeOptions, TreeRead};
use crate::config::{Diagnostic, Location};

/// Git file mode of a symbolic link.
const MODE_SYMLINK: i32 = 0o120000;
/// Ref in the cache repository that keeps the applied commit reachable.
const APPLIED_REF: &str = "refs/legate/applied";
/// Ref that receives the fetched head.
const HEAD_REF: &str = "refs/legate/head";
/// Concurrent (mostly: hung) fetches allowed per source.
/// Another fetch holds the remote-tracking ref's lock file. libgit2 reports it either as
/// `Locked` ("failed to lock file") or as a plain OS error ("failed to create locked file ...:
/// File exists"), depending on the path that takes the lock.
fn is_lock_contention(e: &git2::Error) -> bool {
    e.code() == git2::ErrorCode::Locked
        || (e.class() == git2::ErrorClass::Os && e.message().contains(".lock"))
}

/// How long a fetch waits in all for another fetch to release the remote-tracking ref.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_FETCHES: usize = 3;
/// Every fetch leaves a pack; past this many they are merged into one (libgit2 has no gc).
const MAX_PACKS: usize = 64;

/// Counts one running fetch.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Credentials for a remote. `Debug` never prints secrets.
#[derive(Clone, Default)]
pub struct GitAuth {
    /// Basic auth (user, password or token) for http(s).
    pub userpass: Option<(String, String)>,
    /// Private key file for ssh.
    pub ssh_key: Option<PathBuf>,
    /// known_hosts file checked for ssh remotes (plain `host[,host] type base64` lines).
    pub known_hosts: Option<PathBuf>,
    /// Accept any ssh host key. Only for tests and first contact by hand.
    pub insecure_skip_host_key_check: bool,
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitAuth")
            .field(
                "userpass",
                &self.userpass.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("ssh_key", &self.ssh_key)
            .field("known_hosts", &self.known_hosts)
            .field(
                "insecure_skip_host_key_check",
                &self.insecure_skip_host_key_check,
            )
            .finish()
    }
}

impl GitAuth {
    /// Basic auth from `file` (`user:password`, or a bare token) or from the environment
    /// (`LEGATE_GIT_USERNAME` + `LEGATE_GIT_PASSWORD`, or `LEGATE_GIT_TOKEN`).
    pub fn userpass_from(file: Option<&Path>) -> Result<Option<(String, String)>, String> {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read git credentials file {}: {e}", f.display()))?;
            let line = text.lines().next().unwrap_or("").trim();
            if line.is_empty() {
                return Err(format!("git credentials file {} is empty", f.display()));
            }
            return Ok(Some(match line.split_once(':') {
                Some((u, p)) => (u.to_string(), p.to_string()),
                None => ("x-access-token".to_string(), line.to_string()),
            }));
        }
        if let Ok(t) = std::env::var("LEGATE_GIT_TOKEN") {
            return Ok(Some(("x-access-token".to_string(), t)));
        }
        match (
            std::env::var("LEGATE_GIT_USERNAME"),
            std::env::var("LEGATE_GIT_PASSWORD"),
        ) {
            (Ok(u), Ok(p)) => Ok(Some((u, p))),
            _ => Ok(None),
        }
    }
}

/// Where and what to fetch.
#[derive(Debug, Clone)]
pub struct GitOptions {
    pub url: String,
    /// Branch, tag or full commit id; `HEAD` follows the remote's default branch.
    pub reference: String,
    /// Config root inside the repository.
    pub subdir: Option<String>,
    /// The bare cache repository lives under this directory.
    pub cache_dir: PathBuf,
    pub tree: TreeOptions,
    pub auth: GitAuth,
    /// Require the commit to carry an SSH signature by a key in this allowed_signers file.
    pub allowed_signers: Option<PathBuf>,
}

/// A remote repository followed at a ref.
pub struct GitSource {
    opts: GitOptions,
    repo_path: PathBuf,
    /// Fetches running now. One that hangs past the reconciler's timeout keeps counting until
    /// libgit2 returns; new fetches may start beside it (so a recovered server is seen) up to
    /// [`MAX_FETCHES`], then the source reports itself busy instead of piling up threads.
    fetching: Arc<AtomicUsize>,
}

impl GitSource {
    /// Open (or create) the bare cache repository.
    pub fn new(opts: GitOptions) -> Result<GitSource, SourceError> {
        let key = super::hex(&<sha2::Sha256 as sha2::Digest>::digest(opts.url.as_bytes())[..8]);
        let repo_path = opts.cache_dir.join(format!("git-{key}.git"));
        if !repo_path.join("HEAD").exists() {
            std::fs::create_dir_all(&opts.cache_dir).map_err(|e| {
                SourceError::Local(format!("cannot create {}: {e}", opts.cache_dir.display()))
            })?;
            Repository::init_bare(&repo_path).map_err(|e| {
                SourceError::Local(format!(
                    "cannot create the cache repository {}: {}",
                    repo_path.display(),
                    e.message()
                ))
            })?;
        }
        Ok(GitSource {
            opts,
            repo_path,
            fetching: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Path of the bare cache repository.
    pub fn repo_path(&self) -> &Path {
        &self.repo_path
    }

    fn open(&self) -> Result<Repository, SourceError> {
        Repository::open_bare(&self.repo_path).map_err(|e| {
            SourceError::Local(format!(
                "cannot open the cache repository {}: {}",
                self.repo_path.display(),
                e.message()
            ))
        })
    }

    fn fetch_err(&self, e: git2::Error) -> SourceError {
        SourceError::Fetch {
            url: redact(&self.opts.url),
            message: e.message().to_string(),
        }
    }

    fn fetch(&self, repo: &Repository) -> Result<(), SourceError> {
        if self.fetching.fetch_add(1, Ordering::SeqCst) >= MAX_FETCHES {
            self.fetching.fetch_sub(1, Ordering::SeqCst);
            return Err(SourceError::Busy {
                url: redact(&self.opts.url),
            });
        }
        let _guard = InFlight(self.fetching.clone());
        let r = &self.opts.reference;
        let refspecs: Vec<String> = if is_full_commit(r) {
            if repo.find_commit(Oid::from_str(r).expect("hex")).is_ok() {
                return Ok(());
            }
            // Servers rarely serve a bare commit id: fetch the branches and look for it.
            vec!["+refs/heads/*:refs/remotes/origin/*".into()]
        } else if r == "HEAD" {
            vec![format!("+HEAD:{HEAD_REF}")]
        } else if let Some(tag) = r.strip_prefix("refs/tags/") {
            vec![format!("+refs/tags/{tag}:refs/tags/{tag}")]
        } else if let Some(b) = r.strip_prefix("refs/heads/") {
            vec![format!("+refs/heads/{b}:{HEAD_REF}")]
        } else {
            // A short name: branch or tag. Fetch both patterns; the missing one is no error.
            vec![
                format!("+refs/heads/{r}:refs/remotes/origin/{r}"),
                format!("+refs/tags/{r}:refs/tags/{r}"),
            ]
        };
        let mut remote = repo
            .remote_anonymous(&self.opts.url)
            .map_err(|e| self.fetch_err(e))?;
        let refused = Arc::new(std::sync::Mutex::new(None));
        // Two fetches may overlap (a pinned gateway reads the head in the background while a
        // pass fetches): the later one finds the remote-tracking ref locked for a moment.
        // Wait for the other to write it rather than failing the pass: up to LOCK_WAIT in all,
        // since a loaded machine can deschedule the other fetch while it holds the lock.
        let mut waited = std::time::Duration::ZERO;
        let mut pause = std::time::Duration::from_millis(25);
        let fetched = loop {
            let mut fo = FetchOptions::new();
            fo.remote_callbacks(self.callbacks(refused.clone()));
            fo.download_tags(AutotagOption::None);
            match remote.fetch(&refspecs, Some(&mut fo), None) {
                Err(e) if is_lock_contention(&e) && waited < LOCK_WAIT => {
                    std::thread::sleep(pause);
                    waited += pause;
                    pause = (pause * 2).min(std::time::Duration::from_millis(400));
                }
                other => break other,
            }
        };
        fetched.map_err(
            |e| match refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(why) => SourceError::Fetch {
                    url: redact(&self.opts.url),
                    message: why,
                },
                None => self.fetch_err(e),
            },
        )?;
        // Only when no other fetch runs, so no pack is being written beside the merge.
        if self.fetching.load(Ordering::SeqCst) == 1 {
            if let Err(e) = compact(repo, MAX_PACKS) {
                tracing::warn!(repo = %self.repo_path.display(), error = %e.message(), "cannot merge the cache's packs");
            }
        }
        Ok(())
    }

    /// `refused` receives the host-key verdict: libgit2 replaces a callback's error message
    /// with a generic one, so the reason is carried beside it.
    fn callbacks(
        &self,
        refused: Arc<std::sync::Mutex<Option<String>>>,
    ) -> RemoteCallbacks<'static> {
        let auth = self.opts.auth.clone();
        let mut cb = RemoteCallbacks::new();
        let mut tries = 0u32;
        let cred_auth = auth.clone();
        cb.credentials(move |_url, user, allowed| {
            // libgit2 asks again after a refused credential: give up instead of looping.
            tries += 1;
            if tries > 2 {
                return Err(git2::Error::from_str("the remote refused the credentials"));
            }
            if allowed.contains(CredentialType::SSH_KEY) {
                if let Some(key) = &cred_auth.ssh_key {
                    return Cred::ssh_key(user.unwrap_or("git"), None, key, None);
                }
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                if let Some((u, p)) = &cred_auth.userpass {
                    return Cred::userpass_plaintext(u, p);
                }
            }
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(user.unwrap_or("git"));
            }
            Err(git2::Error::from_str(
                "the remote asks for credentials and none are configured",
            ))
        });
        cb.certificate_check(move |cert, host| {
            let Some(hk) = cert.as_hostkey() else {
                // TLS: libgit2 has already verified the chain against the system roots.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            if auth.insecure_skip_host_key_check {
                return Ok(CertificateCheckStatus::CertificateOk);
            }
            let Some(raw) = hk.hostkey() else {
                return Err(git2::Error::from_str("the ssh server sent no host key"));
            };
            let Some(file) = &auth.known_hosts else {
                return Err(git2::Error::from_str(
                    "ssh host key cannot be checked: no known_hosts file configured",
                ));
            };
            let why = match check_known_host(file, host, raw) {
                HostKey::Match => return Ok(CertificateCheckStatus::CertificateOk),
                HostKey::Changed => format!(
                    "the ssh host key of {host} does not match {}: refusing (it changed, or someone is in the middle)",
                    file.display()
                ),
                HostKey::Unknown => format!(
                    "the ssh host key of {host} is not in {}: refusing an unknown host",
                    file.display()
                ),
            };
            *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            Err(git2::Error::from_str(&why))
        });
        cb
    }

    fn resolve(&self, repo: &Repository) -> Result<Oid, SourceError> {
        let r = &self.opts.reference;
        let candidates: Vec<String> = if is_full_commit(r) {
            vec![r.clone()]
        } else if r == "HEAD" || r.starts_with("refs/heads/") {
            vec![HEAD_REF.into()]
        } else if r.starts_with("refs/tags/") {
            vec![r.clone()]
        } else {
            vec![format!("refs/remotes/origin/{r}"), format!("refs/tags/{r}")]
        };
        for c in &candidates {
            if let Ok(obj) = repo.revparse_single(c) {
                if let Ok(commit) = obj.peel_to_commit() {
                    return Ok(commit.id());
                }
            }
        }
        Err(SourceError::NotFound(format!(
            "ref `{r}` not found in {}",
            redact(&self.opts.url)
        )))
    }

    fn revision(&self, repo: &Repository, oid: Oid, forced: bool) -> Result<Revision, SourceError> {
        let commit = repo
            .find_commit(oid)
            .map_err(|e| SourceError::NotFound(format!("commit {oid}: {}", e.message())))?;
        let author = commit.author();
        let info = CommitInfo {
            id: oid.to_string(),
            author: format!(
                "{} <{}>",
                String::from_utf8_lossy(author.name_bytes()),
                String::from_utf8_lossy(author.email_bytes())
            ),
            summary: String::from_utf8_lossy(commit.summary_bytes().unwrap_or(b"")).into_owned(),
            time: commit.time().seconds(),
            signer: None,
        };
        let mut info = info;
        let mut signature_error = None;
        if let Some(file) = &self.opts.allowed_signers {
            let checked = super::signature::load_allowed_signers(file).and_then(|signers| {
                let (sig, data) = repo
                    .extract_signature(&oid, None)
                    .map_err(|_| "the commit is not signed".to_string())?;
                super::signature::verify(&sig, &data, &signers)
            });
            match checked {
                Ok(who) => info.signer = Some(who),
                Err(e) => signature_error = Some(e),
            }
        }
        Ok(Revision {
            id: oid.to_string(),
            commit: Some(info),
            forced,
            signature_error,
            tree: Arc::new(GitTree {
                repo: self.repo_path.clone(),
                commit: oid,
                subdir: self.opts.subdir.clone(),
            }),
        })
    }
}

impl Source for GitSource {
    fn kind(&self) -> &'static str {
        "git"
    }

    fn describe(&self) -> String {
        let mut s = format!("git {} @ {}", redact(&self.opts.url), self.opts.reference);
        if let Some(p) = &self.opts.subdir {
            s.push_str(&format!(" path {p}"));
        }
        s
    }

    fn current(&self, applied: Option<&str>) -> Result<Revision, SourceError> {
        let repo = self.open()?;
        self.fetch(&repo)?;
        let head = self.resolve(&repo)?;
        let forced = match applied.and_then(|a| Oid::from_str(a).ok()) {
            Some(a) if a != head && repo.find_commit(a).is_ok() => {
                !repo.graph_descendant_of(head, a).unwrap_or(false)
            }
            _ => false,
        };
        self.revision(&repo, head, forced)
    }

    fn at(&self, id: &str) -> Result<Revision, SourceError> {
        let repo = self.open()?;
        let obj = repo
            .revparse_single(id)
            .map_err(|e| SourceError::NotFound(format!("revision `{id}`: {}", e.message())))?;
        let commit = obj
            .peel_to_commit()
            .map_err(|e| SourceError::NotFound(format!("revision `{id}`: {}", e.message())))?;
        self.revision(&repo, commit.id(), false)
    }

    fn remember(&self, rev: &Revision) -> Result<(), SourceError> {
        let repo = self.open()?;
        let oid = Oid::from_str(&rev.id)
            .map_err(|e| SourceError::Local(format!("bad commit id {}: {e}", rev.id)))?;
        repo.reference(APPLIED_REF, oid, true, "legate: applied")
            .map(|_| ())
            .map_err(|e| {
                SourceError::Local(format!("cannot record applied commit: {}", e.message()))
            })
    }
}

/// The packs this cache wrote itself (merges), and the ref tips they hold everything under.
const PACKED_FILE: &str = "legate-packed";

/// Merges since the last full repack after which the next merge is a full one.
const MAX_MERGED: usize = 32;

/// Keep the cache's pack count bounded, with memory that does not grow with the history.
///
/// Each fetch that brings objects adds a pack. Once there are `max` or more, the packs fetches
/// wrote are merged into one holding only what is new since the last merge: a walk from the
/// refs that hides the tips recorded then, so its memory is proportional to the new objects,
/// not to the whole history (a full walk grew the process by about 4 KiB per revision: the
/// allocator keeps the peak of the largest merge). Every [`MAX_MERGED`] merges, one full
/// repack puts everything reachable into one pack and drops what no ref reaches (commits a
/// force push left behind). Returns the pack count afterwards.
pub fn compact(repo: &Repository, max: usize) -> Result<usize, git2::Error> {
    let pack_dir = repo.path().join("objects/pack");
    let packs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "pack"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let old = packs(&pack_dir);
    if old.len() < max {
        return Ok(old.len());
    }
    let state_path = pack_dir.join(PACKED_FILE);
    let (mut ours, tips) = read_packed(&state_path);
    // Merged packs still present; a missing one (or none yet) means a full repack.
    ours.retain(|n| old.iter().any(|p| stem(p) == Some(n.as_str())));
    let full = ours.is_empty() || ours.len() >= MAX_MERGED;
    let mut pb = repo.packbuilder()?;
    let mut walk = repo.revwalk()?;
    let mut new_tips = Vec::new();
    for r in repo.references()? {
        let r = r?;
        let Some(target) = r.target() else { continue };
        if let Ok(tag) = repo.find_tag(target) {
            pb.insert_object(tag.id(), None)?;
        }
        if let Ok(c) = r.peel_to_commit() {
            walk.push(c.id())?;
            new_tips.push(c.id());
        }
    }
    if !full {
        for t in &tips {
            // A tip a force push left behind may be gone: nothing to hide then.
            if repo.find_commit(*t).is_ok() {
                walk.hide(*t)?;
            }
        }
    }
    pb.insert_walk(&mut walk)?;
    pb.write(&pack_dir, 0o644)?;
    let keep = pb
        .name()?
        .map(|n| format!("pack-{n}"))
        .ok_or_else(|| git2::Error::from_str("the merged pack has no name"))?;
    let mut all_tips = if full { Vec::new() } else { tips };
    all_tips.extend(new_tips);
    all_tips.sort();
    all_tips.dedup();
    if full {
        ours.clear();
    }
    ours.push(keep.clone());
    write_packed(&state_path, &ours, &all_tips);
    for p in old {
        let name = stem(&p);
        if name == Some(keep.as_str()) || ours.iter().any(|o| Some(o.as_str()) == name) {
            continue;
        }
        for ext in ["pack", "idx", "rev"] {
            let _ = std::fs::remove_file(p.with_extension(ext));
        }
    }
    Ok(packs(&pack_dir).len())
}

fn stem(p: &Path) -> Option<&str> {
    p.file_stem().and_then(|s| s.to_str())
}

/// `pack <name>` and `tip <oid>` lines.
fn read_packed(path: &Path) -> (Vec<String>, Vec<Oid>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut packs = Vec::new();
    let mut tips = Vec::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("pack", n)) => packs.push(n.to_string()),
            Some(("tip", t)) => tips.extend(Oid::from_str(t).ok()),
            _ => {}
        }
    }
    (packs, tips)
}

fn write_packed(path: &Path, packs: &[String], tips: &[Oid]) {
    let mut text = String::new();
    for p in packs {
        text.push_str(&format!("pack {p}\n"));
    }
    for t in tips {
        text.push_str(&format!("tip {t}\n"));
    }
    if let Err(e) = super::dir::write_atomic(path, text.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the merged packs");
    }
}

fn is_full_commit(r: &str) -> bool {
    r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The URL without any `user:password@`.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, tail) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some((_, host)) = auth.rsplit_once('@') {
            return format!("{scheme}://{host}{tail}");
        }
    }
    url.to_string()
}

/// The config tree of one commit, read from the object database.
#[derive(Debug, Clone)]
pub struct GitTree {
    pub repo: PathBuf,
    pub commit: Oid,
    pub subdir: Option<String>,
}

fn loc(rel: &str) -> Location {
    Location {
        file: rel.to_string(),
        line: 1,
        column: 1,
        pointer: String::new(),
    }
}

impl ConfigTree for GitTree {
    fn read(&self, opts: &TreeOptions) -> Result<TreeRead, String> {
        let repo = Repository::open_bare(&self.repo)
            .map_err(|e| format!("cannot open {}: {}", self.repo.display(), e.message()))?;
        let commit = repo
            .find_commit(self.commit)
            .map_err(|e| format!("commit {}: {}", self.commit, e.message()))?;
        let mut tree = commit
            .tree()
            .map_err(|e| format!("tree of {}: {}", self.commit, e.message()))?;
        if let Some(sub) = self.subdir.as_deref().map(|s| s.trim_matches('/')) {
            if !sub.is_empty() {
                let entry = tree.get_path(Path::new(sub)).map_err(|_| {
                    format!("path `{sub}` does not exist in commit {}", self.commit)
                })?;
                if entry.filemode() == MODE_SYMLINK {
                    return Err(format!(
                        "path `{sub}` is a symlink in commit {}",
                        self.commit
                    ));
                }
                tree = repo.find_tree(entry.id()).map_err(|_| {
                    format!("path `{sub}` is not a directory in commit {}", self.commit)
                })?;
            }
        }
        let filter = Filter::new(opts)?;
        let mut budget = Budget::new(opts.limits);
        let odb = repo.odb().map_err(|e| e.message().to_string())?;
        let mut out = TreeRead::default();
        let mut stack = vec![(tree, String::new())];
        while let Some((t, rel_dir)) = stack.pop() {
            for entry in t.iter() {
                let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
                let rel = if rel_dir.is_empty() {
                    name.clone()
                } else {
                    format!("{rel_dir}/{name}")
                };
                match entry.kind() {
                    Some(ObjectType::Tree) if filter.enters_dir(&name) => {
                        match repo.find_tree(entry.id()) {
                            Ok(sub) => stack.push((sub, rel)),
                            Err(e) => out.diagnostics.push(Diagnostic::error(
                                "unreadable",
                                &loc(&rel),
                                format!("cannot read directory: {}", e.message()),
                            )),
                        }
                    }
                    Some(ObjectType::Commit) if filter.enters_dir(&name) => {
                        out.diagnostics.push(Diagnostic::note(
                            "submodule-skipped",
                            &loc(&rel),
                            "submodule skipped: config is read from this repository only",
                        ));
                    }
                    Some(ObjectType::Blob) if entry.filemode() == MODE_SYMLINK => {
                        // Links are refused, not followed: the reader never leaves the tree.
                        let looks_dir = !name.contains('.');
                        if filter.enters_dir(&name) && (filter.accepts_file(&rel) || looks_dir) {
                            out.diagnostics.push(
                                Diagnostic::error(
                                    "symlink-escape",
                                    &loc(&rel),
                                    "symlinks are not followed in a git revision",
                                )
                                .with_help("replace the link with the file itself"),
                            );
                        }
                    }
                    Some(ObjectType::Blob) => {
                        if !filter.accepts_file(&rel) {
                            continue;
                        }
                        // Size from the object header first: a huge blob is never loaded.
                        let size = match odb.read_header(entry.id()) {
                            Ok((size, _)) => size as u64,
                            Err(e) => {
                                out.diagnostics.push(Diagnostic::error(
                                    "unreadable",
                                    &loc(&rel),
                                    format!("cannot read file: {}", e.message()),
                                ));
                                continue;
                            }
                        };
                        if let Err(d) = budget.admit(&rel, size) {
                            out.diagnostics.push(d);
                            continue;
                        }
                        match repo.find_blob(entry.id()) {
                            Ok(b) => match Budget::decode(&rel, b.content().to_vec()) {
                                Ok(f) => out.files.push(f),
                                Err(d) => out.diagnostics.push(d),
                            },
                            Err(e) => out.diagnostics.push(Diagnostic::error(
                                "unreadable",
                                &loc(&rel),
                                format!("cannot read file: {}", e.message()),
                            )),
                        }
                    }
                    _ => {}
                }
            }
        }
        out.files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

enum HostKey {
    Match,
    Changed,
    Unknown,
}

/// Look `host` up in an OpenSSH known_hosts file (plain host patterns; hashed `|1|` entries
/// are not supported and never match).
fn check_known_host(file: &Path, host: &str, key: &[u8]) -> HostKey {
    let Ok(text) = std::fs::read_to_string(file) else {
        return HostKey::Unknown;
    };
    let want = base64(key);
    let mut seen = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let names_match = hosts.split(',').any(|h| {
            h == host
                || h.strip_prefix('[')
                    .and_then(|r| r.split_once("]:"))
                    .map(|(n, _)| n)
                    == Some(host)
        });
        if names_match {
            if b64 == want {
                return HostKey::Match;
            }
            seen = true;
        }
    }
    if seen {
        HostKey::Changed
    } else {
        HostKey::Unknown
    }
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Set libgit2's process-wide server timeouts, so a git server that accepts the connection and
/// never answers cannot stall a fetch thread forever. Call once at startup, before any fetch.
#[allow(unsafe_code)]
pub fn set_network_timeouts(
    connect: std::time::Duration,
    io: std::time::Duration,
) -> Result<(), git2::Error> {
    let ms = |d: std::time::Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: these write libgit2's global options without synchronization; git2 requires
    // that no other thread runs then. `main` calls this before it starts the tokio runtime or
    // any other thread, and nothing else calls it.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(ms(connect))?;
        git2::opts::set_server_timeout_in_milliseconds(ms(io))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("https://u:tok@h/x.git"), "https://h/x.git");
        assert_eq!(redact("file:///tmp/r"), "file:///tmp/r");
    }

    #[test]
    fn known_hosts_match_change_unknown() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("kh");
        std::fs::write(
            &f,
            format!("[127.0.0.1]:2222 ssh-ed25519 {}\n", base64(b"key1")),
        )
        .unwrap();
        assert!(matches!(
            check_known_host(&f, "127.0.0.1", b"key1"),
            HostKey::Match
        ));
        assert!(matches!(
            check_known_host(&f, "127.0.0.1", b"key2"),
            HostKey::Changed
        ));
        assert!(matches!(
            check_known_host(&f, "other", b"key1"),
            HostKey::Unknown
        ));
    }
}
