//! Directory source: the content of a local directory is the revision (for development).
//!
//! The revision id is a content hash of the files that count as config, so saving a file
//! twice with the same bytes is no change. [`watch`] turns file-system events into debounced
//! "something changed" signals; the reconciler then re-reads the whole tree (level-triggered),
//! so a lost event only delays a change until the next periodic resync.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};

use super::{MemTree, Revision, Source, SourceError};
use crate::config::tree::{ConfigTree, DirTree, TreeOptions};

/// How many recent revisions are kept in memory so they can be pinned.
const RECENT: usize = 8;
/// File under the cache dir holding the last applied revision's files.
const SNAPSHOT: &str = "dir-snapshot.json";

/// A directory on disk.
pub struct DirSource {
    root: PathBuf,
    opts: TreeOptions,
    cache_dir: Option<PathBuf>,
    recent: Mutex<VecDeque<(String, Arc<MemTree>)>>,
    /// An applied revision whose snapshot could not be written (a full disk): written again on
    /// every pass until it is, so the cache catches up once space returns.
    unsaved: Mutex<Option<Revision>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    id: String,
    root: String,
    tree: MemTree,
}

impl DirSource {
    /// `cache_dir`, when given, receives a copy of the last applied revision's files, so a
    /// restart whose directory is broken serves it.
    pub fn new(root: impl Into<PathBuf>, opts: TreeOptions, cache_dir: Option<PathBuf>) -> Self {
        DirSource {
            root: root.into(),
            opts,
            cache_dir,
            recent: Mutex::new(VecDeque::new()),
            unsaved: Mutex::new(None),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn keep(&self, id: &str, tree: &Arc<MemTree>) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.iter().any(|(i, _)| i == id) {
            return;
        }
        if r.len() >= RECENT {
            r.pop_front();
        }
        r.push_back((id.to_string(), tree.clone()));
    }
}

impl Source for DirSource {
    fn kind(&self) -> &'static str {
        "dir"
    }

    fn describe(&self) -> String {
        format!("dir {}", self.root.display())
    }

    fn current(&self, _applied: Option<&str>) -> Result<Revision, SourceError> {
        let unsaved = self
            .unsaved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rev) = unsaved {
            if let Err(e) = self.remember(&rev) {
                tracing::warn!(error = %e, "the cache still cannot take the applied revision");
            }
        }
        let read = DirTree::new(&self.root)
            .read(&self.opts)
            .map_err(SourceError::Local)?;
        let tree = Arc::new(MemTree::from_read(read));
        let id = tree.hash();
        self.keep(&id, &tree);
        Ok(Revision {
            id,
            commit: None,
            forced: false,
            signature_error: None,
            tree,
        })
    }

    fn at(&self, id: &str) -> Result<Revision, SourceError> {
        let found = {
            let r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            r.iter().find(|(i, _)| i == id).map(|(_, t)| t.clone())
        };
        let tree = match found {
            Some(t) => t,
            None => {
                let snap = self
                    .cache_dir
                    .as_ref()
                    .and_then(|d| std::fs::read(d.join(SNAPSHOT)).ok())
                    .and_then(|b| serde_json::from_slice::<Snapshot>(&b).ok())
                    .filter(|s| s.id == id)
                    .ok_or_else(|| {
                        SourceError::NotFound(format!(
                            "revision {id} of {} is no longer held in memory or in the cache",
                            self.root.display()
                        ))
                    })?;
                Arc::new(snap.tree)
            }
        };
        Ok(Revision {
            id: id.to_string(),
            commit: None,
            forced: false,
            signature_error: None,
            tree,
        })
    }

    fn remember(&self, rev: &Revision) -> Result<(), SourceError> {
        let Some(dir) = &self.cache_dir else {
            return Ok(());
        };
        let read = rev
            .tree
            .read(&self.opts)
            .map_err(|e| SourceError::Local(format!("cannot snapshot revision: {e}")))?;
        let snap = Snapshot {
            id: rev.id.clone(),
            root: self.root.display().to_string(),
            tree: MemTree::from_read(read),
        };
        let bytes = serde_json::to_vec(&snap).map_err(|e| SourceError::Local(e.to_string()))?;
        let written = write_atomic(&dir.join(SNAPSHOT), &bytes)
            .map_err(|e| SourceError::Local(format!("cannot write {}: {e}", dir.display())));
        if written.is_err() {
            *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()) = Some(rev.clone());
        }
        written
    }
}

/// The last failure to write under `--cache-dir` (a full disk, say), until a write succeeds
/// again; `/api/status` and `/metrics` report it.
static CACHE_FAILURE: Mutex<std::collections::BTreeMap<PathBuf, String>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Why the cache directory cannot be written now, if it cannot.
pub fn cache_failure() -> Option<String> {
    CACHE_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .next()
        .cloned()
}

/// Write through a temporary file and a rename, so a crash leaves the old or the new file. A
/// failed write removes its temporary file (a full disk must not keep filling with them).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    })();
    let mut failure = CACHE_FAILURE.lock().unwrap_or_else(|e| e.into_inner());
    match &written {
        Ok(()) => {
            failure.remove(path);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            failure.insert(
                path.to_path_buf(),
                format!("cannot write {}: {e}", path.display()),
            );
        }
    }
    written
}

/// A running directory watch. Dropping it stops the watch.
pub struct DirWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watch `root` (recursively) and its parent (to see the root itself replaced), and call
/// `trigger.notify_one()` once per burst of events, after `quiet` without events. The watch is
/// re-armed after every burst, so a directory replaced by a rename is watched again.
pub fn watch(root: &Path, quiet: Duration, trigger: Arc<Notify>) -> Result<DirWatch, String> {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Errors (queue overflow) count as a change too: the pass re-reads everything.
        if ev.map(|e| !e.kind.is_access()).unwrap_or(true) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    let root = root.to_path_buf();
    let parent = root
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf);
    arm(&mut watcher, &root, parent.as_deref())
        .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    let task = tokio::spawn(async move {
        let (out_tx, mut out_rx) = mpsc::channel::<()>(1);
        let deb = tokio::spawn(debounce(rx, quiet, out_tx));
        while out_rx.recv().await.is_some() {
            // Re-arm: a renamed-away root leaves a dead inotify watch behind.
            let _ = watcher.unwatch(&root);
            if let Err(e) = arm(&mut watcher, &root, parent.as_deref()) {
                tracing::warn!(dir = %root.display(), error = %e, "cannot re-arm the directory watch");
            }
            trigger.notify_one();
        }
        deb.abort();
    });
    Ok(DirWatch { task })
}

fn arm(
    w: &mut notify::RecommendedWatcher,
    root: &Path,
    parent: Option<&Path>,
) -> notify::Result<()> {
    if let Some(p) = parent {
        // Non-recursive: only to learn that the root was created, removed or renamed.
        let _ = w.watch(p, RecursiveMode::NonRecursive);
    }
    w.watch(root, RecursiveMode::Recursive)
}

/// Collapse bursts: after the first event, wait until `quiet` passes with no event, then send
/// one signal. Ends when the input closes.
pub async fn debounce(mut rx: mpsc::UnboundedReceiver<()>, quiet: Duration, out: mpsc::Sender<()>) {
    while rx.recv().await.is_some() {
        loop {
            match tokio::time::timeout(quiet, rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => {
                    let _ = out.send(()).await;
                    return;
                }
                Err(_) => break,
            }
        }
        if out.send(()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_gives_one_signal_after_the_quiet_time() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (otx, mut orx) = mpsc::channel(4);
        tokio::spawn(debounce(rx, Duration::from_millis(200), otx));
        let start = tokio::time::Instant::now();
        for _ in 0..100 {
            tx.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        orx.recv().await.unwrap();
        // 100 events 10 ms apart, then 200 ms of quiet: one signal, not before the burst ended.
        assert!(start.elapsed() >= Duration::from_millis(1000 + 200 - 10));
        assert!(orx.try_recv().is_err());
        tx.send(()).unwrap();
        orx.recv().await.unwrap();
    }

    #[test]
    fn equal_content_gives_equal_ids() {
        let a = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("m.yaml"), "a: 1\n").unwrap();
        let s = DirSource::new(a.path(), TreeOptions::default(), None);
        let r1 = s.current(None).unwrap();
        std::fs::write(a.path().join("m.yaml"), "a: 1\n").unwrap();
        assert_eq!(s.current(None).unwrap().id, r1.id);
        std::fs::write(a.path().join("m.yaml"), "a: 2\n").unwrap();
        let r3 = s.current(None).unwrap();
        assert_ne!(r3.id, r1.id);
        assert_eq!(s.at(&r1.id).unwrap().id, r1.id);
    }
}
