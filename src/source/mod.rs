//! Sources: where revisions come from (a git repository, a local directory, a Kubernetes
//! cluster's Mappings and Hosts).
//!
//! Owns: fetching, resolving the desired revision and the "something changed" signal. A source
//! never judges or swaps a graph (that is `reconcile`). The git and dir sources do not compile
//! either; the Kubernetes source compiles its snapshot to set invalid objects aside (a cluster
//! has no commit to reject whole), and `reconcile` compiles what it hands over once more.
//! Every method of [`Source`] may block (git2, file system); callers run them on
//! `spawn_blocking`.

pub mod dir;
pub mod git;
pub mod kube;
pub mod signature;

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::tree::{ConfigTree, SourceFile, TreeOptions, TreeRead};
use crate::config::Diagnostic;

/// Who made a git revision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitInfo {
    /// Full commit id (hex).
    pub id: String,
    /// `Name <email>`.
    pub author: String,
    /// First line of the message.
    pub summary: String,
    /// Commit time, seconds since the Unix epoch.
    pub time: i64,
    /// Principals of the verified SSH signature, when signatures are checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
}

/// One revision of the desired configuration, ready to be read.
#[derive(Clone)]
pub struct Revision {
    /// Stable id: the commit id for git, a content hash for a directory.
    pub id: String,
    pub commit: Option<CommitInfo>,
    /// The revision does not descend from the one applied (a force push).
    pub forced: bool,
    /// Why the revision's signature is not acceptable (only when signatures are required).
    pub signature_error: Option<String>,
    /// The files of the revision.
    pub tree: Arc<dyn ConfigTree + Send + Sync>,
}

impl std::fmt::Debug for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revision")
            .field("id", &self.id)
            .field("commit", &self.commit)
            .field("forced", &self.forced)
            .finish_non_exhaustive()
    }
}

/// Why a source could not produce a revision.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The remote could not be reached or answered with an error; retried with backoff.
    #[error("cannot fetch from {url}: {message}")]
    Fetch { url: String, message: String },
    /// The fetch did not finish in time.
    #[error("fetch from {url} timed out after {secs} s")]
    Timeout { url: String, secs: u64 },
    /// Too many earlier fetches are still hung; no new one is started until one ends.
    #[error("earlier fetches from {url} have not returned yet")]
    Busy { url: String },
    /// The ref or revision does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Local trouble (cache directory, config root).
    #[error("{0}")]
    Local(String),
}

/// Something that produces revisions.
pub trait Source: Send + Sync + 'static {
    /// Human description for status (`git file:///repo @ main`, `dir ./config`). Never holds
    /// credentials.
    fn describe(&self) -> String;
    /// The kind of source, a metric label: `git`, `dir`, `kubernetes`.
    fn kind(&self) -> &'static str {
        "other"
    }
    /// Fetch if remote and return the revision the source currently wants. `applied` is the
    /// id of the revision being served, for the force-push check.
    fn current(&self, applied: Option<&str>) -> Result<Revision, SourceError>;
    /// A revision by id, from the local copy only (pin, restart while the remote is down).
    fn at(&self, id: &str) -> Result<Revision, SourceError>;
    /// Keep what is needed to serve `rev` again after a restart.
    fn remember(&self, rev: &Revision) -> Result<(), SourceError>;

    /// Set aside the objects behind `mappings` (`namespace/name`) whose routes failed a
    /// verification window, as invalid objects are, until they change; a revision without them
    /// follows. Returns false when the source cannot (a git commit or a directory is one
    /// revision: it is rolled back whole instead).
    fn set_aside(&self, mappings: &[String], reason: &str) -> bool {
        let _ = (mappings, reason);
        false
    }
}

/// A tree already read into memory: what a directory revision is once hashed.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct MemTree {
    pub files: Vec<MemFile>,
    #[serde(skip)]
    pub diagnostics: Vec<Diagnostic>,
}

/// One file of a [`MemTree`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MemFile {
    pub path: String,
    pub text: String,
}

impl MemTree {
    pub fn from_read(read: TreeRead) -> MemTree {
        MemTree {
            files: read
                .files
                .into_iter()
                .map(|f| MemFile {
                    path: f.path,
                    text: f.text,
                })
                .collect(),
            diagnostics: read.diagnostics,
        }
    }

    /// Content hash: equal files and findings, equal id.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(f.path.as_bytes());
            h.update([0]);
            h.update((f.text.len() as u64).to_le_bytes());
            h.update(f.text.as_bytes());
        }
        for d in &self.diagnostics {
            h.update(d.code.as_bytes());
            h.update([0]);
            h.update(d.file.as_bytes());
            h.update([0]);
            h.update(d.message.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize()[..8])
    }
}

impl ConfigTree for MemTree {
    fn read(&self, _opts: &TreeOptions) -> Result<TreeRead, String> {
        Ok(TreeRead {
            files: self
                .files
                .iter()
                .map(|f| SourceFile {
                    path: f.path.clone(),
                    text: f.text.clone(),
                })
                .collect(),
            diagnostics: self.diagnostics.clone(),
        })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
