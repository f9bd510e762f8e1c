//! Reconcile: take the source's current revision through read, compile and preflight, swap
//! the graph atomically, verify it, and record every outcome.
//!
//! Owns: the one reconcile loop (one pass at a time), the revision history, pin/unpin, the
//! last-applied record in the cache dir and the verification window. Must not parse YAML or
//! match requests (that is `config` and `routes`) nor know proxy internals: the graph goes
//! through [`GraphSink`]. Level-triggered: a trigger only says "look again"; each pass reads
//! the whole revision, so a lost trigger is healed by the next poll.

pub mod preflight;
pub mod verify;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::{self, Diagnostic, Severity};
use crate::routes::Graph;
use crate::source::{CommitInfo, Revision, Source, SourceError};

pub use verify::{ErrorCounter, VerifySettings};

/// Where the reconciler puts the graph new requests should see.
pub trait GraphSink: Send + Sync + 'static {
    /// Make `graph` current. Must not drop in-flight requests.
    fn swap(&self, graph: Arc<Graph>);
}

/// A graph holder for the proxy to read per request (`load`) and for tasks to watch.
pub struct Live {
    graph: ArcSwap<Graph>,
    tx: watch::Sender<Arc<Graph>>,
}

impl Live {
    pub fn new() -> Arc<Live> {
        let g = Graph::empty();
        Arc::new(Live {
            graph: ArcSwap::new(g.clone()),
            tx: watch::channel(g).0,
        })
    }

    /// The current graph.
    pub fn load(&self) -> Arc<Graph> {
        self.graph.load_full()
    }

    /// A receiver that sees every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Graph>> {
        self.tx.subscribe()
    }
}

impl GraphSink for Live {
    fn swap(&self, graph: Arc<Graph>) {
        self.graph.store(graph.clone());
        self.tx.send_replace(graph);
    }
}

/// How the reconciler behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: config::Options,
    /// TLS secrets directory for preflight (`None`: Hosts with `tlsSecret` are not checked).
    pub secrets_dir: Option<PathBuf>,
    /// Where the last applied revision is remembered (`state.json`).
    pub cache_dir: Option<PathBuf>,
    /// Periodic resync (git poll interval).
    pub poll: Duration,
    /// Longest a fetch may take.
    pub fetch_timeout: Duration,
    /// First retry delay after a source failure; doubles up to `poll`.
    pub backoff: Duration,
    /// Entries kept in the history.
    pub history: usize,
    /// Apply a head that does not descend from the applied commit.
    pub allow_force_push: bool,
    pub verify: VerifySettings,
    /// Where recorded history entries are broadcast. Give a sender whose receivers were made
    /// before `start` so that not even the first revision is missed; `None`: a private channel
    /// ([`Handle::subscribe`] still works, from the moment it is called).
    pub events: Option<broadcast::Sender<Entry>>,
    /// Where each source read's duration is counted (`legate_source_fetch_duration_seconds`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            config: config::Options::default(),
            secrets_dir: None,
            cache_dir: None,
            poll: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(60),
            backoff: Duration::from_secs(1),
            history: 50,
            allow_force_push: false,
            verify: VerifySettings::default(),
            events: None,
            metrics: None,
        }
    }
}

/// What became of a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Serving now.
    Applied,
    /// Never applied; see `reason` and `diagnostics`.
    Rejected,
    /// Applied, failed verification, swapped back.
    RolledBack,
    /// Was applied, then replaced by a newer revision.
    Superseded,
}

/// Why a revision was rejected, which decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectKind {
    /// The revision itself is wrong: final until a new revision or a manual sync.
    Config,
    /// Something outside the repository (a secret file): retried on every resync.
    External,
    /// A force push without `--allow-force-push`: final until a new revision or a manual sync.
    ForcePush,
    /// Unsigned, or not signed by an allowed signer: final until a new revision.
    Signature,
}

/// Time spent per stage, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub fetch_ms: u64,
    pub compile_ms: u64,
    pub preflight_ms: u64,
    pub swap_ms: u64,
    pub verify_ms: u64,
}

/// One entry of the history.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub revision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitInfo>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject: Option<RejectKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A force push (new head not descending from the applied one).
    pub forced: bool,
    /// Applied by a pin rather than by following the ref.
    pub pinned: bool,
    /// Served from the local cache at startup.
    pub from_cache: bool,
    /// Unix milliseconds.
    pub started_at: u64,
    pub finished_at: u64,
    pub timings: Timings,
    pub routes: usize,
    pub diagnostics: Vec<Diagnostic>,
}

/// The reconciler's current state, as the admin API shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub source: String,
    /// Revision being served.
    pub applied: Option<String>,
    /// Last revision a pass looked at.
    pub attempted: Option<String>,
    pub pinned: Option<String>,
    /// Swapped in and inside its verification window (serving, not yet recorded Applied).
    pub verifying: Option<String>,
    /// The served revision came from the local cache at startup and nothing newer has been
    /// applied since (the source was unreachable or its head broken).
    pub serving_cached: bool,
    /// Last source failure, while it persists.
    pub source_error: Option<String>,
    pub consecutive_failures: u32,
    /// Unix milliseconds of the last completed pass.
    pub last_pass_at: Option<u64>,
    pub passes: u64,
    /// Passes whose source read failed.
    pub fetch_failures: u64,
    /// Unix milliseconds of the last pass that read the source successfully.
    pub last_fetch_ok_at: Option<u64>,
    /// The history entry of the revision being served (commit, author, message, applied at).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<Entry>,
    /// The newest history entry: the last attempted revision, its outcome and diagnostics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<Entry>,
    /// `pinned` or `following`.
    pub mode: &'static str,
}

/// What one pass did, as answered to a manual sync or pin.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum PassResult {
    /// The revision is already served (or finally rejected): nothing done.
    Unchanged { revision: String },
    /// A history entry was recorded.
    Recorded { entry: Box<Entry> },
    /// The source failed.
    SourceFailed { error: String },
}

#[derive(Debug, Default)]
struct Shared {
    status: Status,
    history: VecDeque<Entry>,
}

enum Command {
    Sync {
        force: bool,
        reply: Option<oneshot::Sender<PassResult>>,
    },
    Pin {
        id: String,
        reply: oneshot::Sender<PassResult>,
    },
    Unpin {
        reply: oneshot::Sender<PassResult>,
    },
}

/// A cheap handle to a running reconciler.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    trigger: Arc<Notify>,
    events: broadcast::Sender<Entry>,
}

impl Handle {
    /// Every history entry as it is recorded (notifications, Kubernetes status). A slow
    /// receiver misses events (`Lagged`) instead of holding the reconciler up.
    pub fn subscribe(&self) -> broadcast::Receiver<Entry> {
        self.events.subscribe()
    }

    pub fn status(&self) -> Status {
        let s = self.lock();
        let mut st = s.status.clone();
        st.live = st.applied.as_ref().and_then(|id| {
            s.history
                .iter()
                .rev()
                .find(|e| &e.revision == id && e.outcome == Outcome::Applied)
                .cloned()
        });
        st.last_attempt = s.history.back().cloned();
        st.mode = if st.pinned.is_some() {
            "pinned"
        } else {
            "following"
        };
        st
    }

    /// History, newest first.
    pub fn history(&self) -> Vec<Entry> {
        self.lock().history.iter().rev().cloned().collect()
    }

    /// Ask for a fetch and pass soon (webhooks, file watches). Never blocks; bursts coalesce.
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// The notifier behind [`Handle::trigger`], for watchers that signal it directly.
    pub fn trigger_notify(&self) -> Arc<Notify> {
        self.trigger.clone()
    }

    /// Run a pass now and wait for it. A manual sync also retries a revision whose rejection
    /// was final.
    pub async fn sync(&self) -> PassResult {
        let (tx, rx) = oneshot::channel();
        self.send(
            Command::Sync {
                force: true,
                reply: Some(tx),
            },
            rx,
        )
        .await
    }

    /// Serve revision `id` and stop following the ref until [`Handle::unpin`].
    pub async fn pin(&self, id: &str) -> PassResult {
        let (tx, rx) = oneshot::channel();
        self.send(
            Command::Pin {
                id: id.to_string(),
                reply: tx,
            },
            rx,
        )
        .await
    }

    /// Follow the ref again.
    pub async fn unpin(&self) -> PassResult {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unpin { reply: tx }, rx).await
    }

    async fn send(&self, cmd: Command, rx: oneshot::Receiver<PassResult>) -> PassResult {
        if self.tx.send(cmd).await.is_err() {
            return PassResult::SourceFailed {
                error: "the reconciler has stopped".into(),
            };
        }
        rx.await.unwrap_or(PassResult::SourceFailed {
            error: "the reconciler has stopped".into(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Persisted {
    source: String,
    applied: Option<String>,
    pinned: Option<String>,
}

const STATE_FILE: &str = "state.json";

/// Start the reconcile loop on the current tokio runtime. The first thing it does is serve the
/// last applied revision from the cache dir, if there is one; then it follows the source.
pub fn start(
    source: Arc<dyn Source>,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    errors: Option<Arc<dyn ErrorCounter>>,
) -> Handle {
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::new(Mutex::new(Shared::default()));
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status
        .source = source.describe();
    let trigger = Arc::new(Notify::new());
    let events = settings
        .events
        .clone()
        .unwrap_or_else(|| broadcast::channel(64).0);
    let r = Reconciler {
        events: events.clone(),
        source,
        sink,
        settings,
        errors,
        shared: shared.clone(),
        rx,
        trigger: trigger.clone(),
        applied: None,
        final_reject: None,
        pinned: None,
        failures: 0,
    };
    tokio::spawn(r.run());
    Handle {
        tx,
        shared,
        trigger,
        events,
    }
}

struct AppliedRev {
    id: String,
    graph: Arc<Graph>,
}

struct Reconciler {
    events: broadcast::Sender<Entry>,
    source: Arc<dyn Source>,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    errors: Option<Arc<dyn ErrorCounter>>,
    shared: Arc<Mutex<Shared>>,
    rx: mpsc::Receiver<Command>,
    trigger: Arc<Notify>,
    applied: Option<AppliedRev>,
    /// A revision whose rejection (config error, force push, rollback) holds until a new
    /// revision or a manual sync.
    final_reject: Option<String>,
    pinned: Option<String>,
    failures: u32,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Reconciler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(mut self) {
        self.restore().await;
        let mut replies: Vec<oneshot::Sender<PassResult>> = Vec::new();
        let mut force = false;
        // The pin before a pin request, restored if the pinned revision cannot be found.
        let mut undo_pin: Option<Option<String>> = None;
        loop {
            let res = self.pass(force).await;
            if let (Some(prev), PassResult::SourceFailed { .. }) = (undo_pin.take(), &res) {
                self.pinned = prev;
                self.lock().status.pinned = self.pinned.clone();
                self.persist();
            }
            for r in replies.drain(..) {
                let _ = r.send(res.clone());
            }
            force = false;
            let delay = if self.failures == 0 {
                self.settings.poll
            } else {
                let exp = self.failures.saturating_sub(1).min(16);
                (self.settings.backoff * 2u32.pow(exp)).min(self.settings.poll)
            };
            // Wait for the poll, a trigger or a command; then take every queued command, so
            // a burst of webhooks makes one pass.
            let first = tokio::select! {
                c = self.rx.recv() => match c {
                    Some(c) => Some(c),
                    // Every handle is gone: nobody can ask for anything, keep polling.
                    None => { tokio::time::sleep(delay).await; None }
                },
                _ = self.trigger.notified() => None,
                _ = tokio::time::sleep(delay) => None,
            };
            let mut cmds: Vec<Command> = first.into_iter().collect();
            while let Ok(c) = self.rx.try_recv() {
                cmds.push(c);
            }
            let had_cmds = !cmds.is_empty();
            for c in cmds {
                match c {
                    Command::Sync { force: f, reply } => {
                        force |= f;
                        replies.extend(reply);
                    }
                    Command::Pin { id, reply } => {
                        undo_pin.get_or_insert(self.pinned.clone());
                        self.pinned = Some(id);
                        force = true;
                        replies.push(reply);
                    }
                    Command::Unpin { reply } => {
                        undo_pin = None;
                        self.pinned = None;
                        replies.push(reply);
                    }
                }
            }
            if had_cmds {
                self.lock().status.pinned = self.pinned.clone();
                self.persist();
            }
        }
    }

    fn state_path(&self) -> Option<PathBuf> {
        self.settings.cache_dir.as_ref().map(|d| d.join(STATE_FILE))
    }

    fn persist(&self) {
        let Some(path) = self.state_path() else {
            return;
        };
        let p = Persisted {
            source: self.source.describe(),
            applied: self.applied.as_ref().map(|a| a.id.clone()),
            pinned: self.pinned.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&p) {
            if let Err(e) = crate::source::dir::write_atomic(&path, &bytes) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the applied revision");
            }
        }
    }

    /// Serve the last applied revision from the local copy, before touching the network.
    async fn restore(&mut self) {
        let Some(path) = self.state_path() else {
            return;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let Ok(p) = serde_json::from_slice::<Persisted>(&bytes) else {
            tracing::warn!(path = %path.display(), "ignoring an unreadable state file");
            return;
        };
        if p.source != self.source.describe() {
            return;
        }
        self.pinned = p.pinned.clone();
        self.lock().status.pinned = self.pinned.clone();
        let Some(id) = p.applied else { return };
        let source = self.source.clone();
        let rev = match tokio::task::spawn_blocking(move || source.at(&id)).await {
            Ok(Ok(rev)) => rev,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the last applied revision is not in the cache");
                return;
            }
            Err(_) => return,
        };
        let started = now_ms();
        let t0 = Instant::now();
        let (outcome, compile_ms) = self.compile(&rev).await;
        let Some(graph) = outcome.graph.clone() else {
            tracing::warn!(revision = %rev.id, "the cached revision no longer compiles");
            return;
        };
        // Preflight is skipped on purpose: serving the last good graph beats serving nothing.
        let t1 = Instant::now();
        self.sink.swap(graph.clone());
        let entry = Entry {
            revision: rev.id.clone(),
            commit: rev.commit.clone(),
            outcome: Outcome::Applied,
            reject: None,
            reason: Some("served from the local cache at startup".into()),
            forced: false,
            pinned: self.pinned.is_some(),
            from_cache: true,
            started_at: started,
            finished_at: now_ms(),
            timings: Timings {
                compile_ms,
                swap_ms: ms(t1.elapsed()),
                ..Timings::default()
            },
            routes: graph.len(),
            diagnostics: outcome.diagnostics,
        };
        let _ = t0;
        self.applied = Some(AppliedRev {
            id: rev.id.clone(),
            graph,
        });
        let mut s = self.lock();
        s.status.applied = Some(rev.id);
        s.status.serving_cached = true;
        drop(s);
        self.record(entry);
    }

    fn record(&self, entry: Entry) {
        let mut s = self.lock();
        // A revision waiting for a secret is retried every resync: keep one entry for it, and
        // announce it once.
        let mut repeat = false;
        if entry.reject == Some(RejectKind::External) {
            if let Some(last) = s.history.back() {
                if last.revision == entry.revision && last.reject == Some(RejectKind::External) {
                    s.history.pop_back();
                    repeat = true;
                }
            }
        }
        if !repeat {
            let _ = self.events.send(entry.clone());
        }
        if entry.outcome == Outcome::Applied {
            for e in s.history.iter_mut() {
                if e.outcome == Outcome::Applied {
                    e.outcome = Outcome::Superseded;
                }
            }
        }
        s.history.push_back(entry);
        while s.history.len() > self.settings.history.max(1) {
            s.history.pop_front();
        }
    }

    async fn compile(&self, rev: &Revision) -> (config::Outcome, u64) {
        let tree = rev.tree.clone();
        let opts = self.settings.config.clone();
        let t = Instant::now();
        let out =
            tokio::task::spawn_blocking(move || config::load_and_compile(tree.as_ref(), &opts))
                .await
                .unwrap_or_else(|e| config::Outcome {
                    graph: None,
                    diagnostics: vec![Diagnostic::error(
                        "internal",
                        &config::Location {
                            file: String::new(),
                            line: 0,
                            column: 0,
                            pointer: String::new(),
                        },
                        format!("compile task failed: {e}"),
                    )],
                    files: 0,
                    resources: Vec::new(),
                });
        (out, ms(t.elapsed()))
    }

    async fn fetch(&self) -> Result<Revision, SourceError> {
        let source = self.source.clone();
        let applied = self.applied.as_ref().map(|a| a.id.clone());
        let pinned = self.pinned.clone();
        let task = tokio::task::spawn_blocking(move || match pinned {
            Some(id) => source.at(&id),
            None => source.current(applied.as_deref()),
        });
        match tokio::time::timeout(self.settings.fetch_timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(SourceError::Local(format!("source task failed: {e}"))),
            // The blocking call keeps running; the source refuses to start another meanwhile.
            Err(_) => Err(SourceError::Timeout {
                url: self.source.describe(),
                secs: self.settings.fetch_timeout.as_secs(),
            }),
        }
    }

    async fn pass(&mut self, force: bool) -> PassResult {
        let started = now_ms();
        let t_fetch = Instant::now();
        let fetched = self.fetch().await;
        let took = t_fetch.elapsed();
        let fetch_ms = ms(took);
        // A pinned pass reads the local copy only: not a fetch.
        if let (Some(m), None) = (&self.settings.metrics, &self.pinned) {
            m.source_fetch(self.source.kind(), fetched.is_ok(), took);
        }
        let rev = match fetched {
            Ok(r) => r,
            Err(e) => {
                self.failures += 1;
                let mut s = self.lock();
                s.status.source_error = Some(e.to_string());
                s.status.consecutive_failures = self.failures;
                s.status.last_pass_at = Some(now_ms());
                s.status.passes += 1;
                s.status.fetch_failures += 1;
                tracing::warn!(error = %e, failures = self.failures, "source failed");
                return PassResult::SourceFailed {
                    error: e.to_string(),
                };
            }
        };
        self.failures = 0;
        {
            let mut s = self.lock();
            s.status.source_error = None;
            s.status.consecutive_failures = 0;
            s.status.attempted = Some(rev.id.clone());
            s.status.last_pass_at = Some(now_ms());
            s.status.last_fetch_ok_at = s.status.last_pass_at;
            s.status.passes += 1;
        }
        let is_applied = self.applied.as_ref().map(|a| a.id == rev.id) == Some(true);
        let cached = self.lock().status.serving_cached;
        if is_applied && !cached {
            return PassResult::Unchanged { revision: rev.id };
        }
        if self.final_reject.as_deref() == Some(rev.id.as_str()) && !force {
            return PassResult::Unchanged { revision: rev.id };
        }
        let pinned = self.pinned.is_some();
        let mut entry = Entry {
            revision: rev.id.clone(),
            commit: rev.commit.clone(),
            outcome: Outcome::Rejected,
            reject: None,
            reason: None,
            forced: rev.forced,
            pinned,
            from_cache: false,
            started_at: started,
            finished_at: 0,
            timings: Timings {
                fetch_ms,
                ..Timings::default()
            },
            routes: 0,
            diagnostics: Vec::new(),
        };
        if rev.forced && !pinned && !self.settings.allow_force_push {
            entry.reject = Some(RejectKind::ForcePush);
            entry.reason = Some(format!(
                "{} does not descend from the applied revision (force push); start with --allow-force-push or pin it to apply it",
                rev.id
            ));
            return self.reject(entry, true);
        }
        if let Some(why) = &rev.signature_error {
            entry.reject = Some(RejectKind::Signature);
            entry.reason = Some(format!("signature check failed: {why}"));
            return self.reject(entry, true);
        }
        let (outcome, compile_ms) = self.compile(&rev).await;
        entry.timings.compile_ms = compile_ms;
        entry.diagnostics = outcome.diagnostics;
        let Some(graph) = outcome.graph else {
            let errors = entry
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            entry.reject = Some(RejectKind::Config);
            entry.reason = Some(format!("{errors} error(s) in the revision"));
            return self.reject(entry, true);
        };
        entry.routes = graph.len();
        if let Some(dir) = &self.settings.secrets_dir {
            let t = Instant::now();
            let dir = dir.clone();
            let resources = outcome.resources;
            let found =
                tokio::task::spawn_blocking(move || preflight::check_secrets(&resources, &dir))
                    .await
                    .unwrap_or_default();
            entry.timings.preflight_ms = ms(t.elapsed());
            if !found.is_empty() {
                entry.reject = Some(RejectKind::External);
                entry.reason = Some(format!(
                    "{} preflight error(s); retried on the next resync",
                    found.len()
                ));
                entry.diagnostics.extend(found);
                return self.reject(entry, false);
            }
        }
        // Swap.
        let t = Instant::now();
        let previous = self.applied.take();
        self.sink.swap(graph.clone());
        entry.timings.swap_ms = ms(t.elapsed());
        // Verify.
        self.lock().status.verifying = Some(rev.id.clone());
        let t = Instant::now();
        let verdict = verify::verify(&graph, &self.settings.verify, self.errors.as_deref()).await;
        entry.timings.verify_ms = ms(t.elapsed());
        self.lock().status.verifying = None;
        if let Err(reason) = verdict {
            match &previous {
                Some(p) => self.sink.swap(p.graph.clone()),
                None => self.sink.swap(Graph::empty()),
            }
            self.applied = previous;
            entry.outcome = Outcome::RolledBack;
            entry.reason = Some(reason);
            entry.finished_at = now_ms();
            self.final_reject = Some(rev.id.clone());
            tracing::warn!(revision = %rev.id, reason = entry.reason.as_deref().unwrap_or(""), "rolled back");
            self.record(entry.clone());
            return PassResult::Recorded {
                entry: Box::new(entry),
            };
        }
        self.applied = Some(AppliedRev {
            id: rev.id.clone(),
            graph,
        });
        self.final_reject = None;
        entry.outcome = Outcome::Applied;
        entry.finished_at = now_ms();
        {
            let mut s = self.lock();
            s.status.applied = Some(rev.id.clone());
            s.status.serving_cached = false;
        }
        let source = self.source.clone();
        let r2 = rev.clone();
        match tokio::task::spawn_blocking(move || source.remember(&r2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot remember the applied revision"),
            Err(e) => tracing::warn!(error = %e, "cannot remember the applied revision"),
        }
        self.persist();
        tracing::info!(revision = %rev.id, routes = entry.routes, "applied");
        self.record(entry.clone());
        PassResult::Recorded {
            entry: Box::new(entry),
        }
    }

    fn reject(&mut self, mut entry: Entry, is_final: bool) -> PassResult {
        entry.outcome = Outcome::Rejected;
        entry.finished_at = now_ms();
        if is_final {
            self.final_reject = Some(entry.revision.clone());
        }
        tracing::warn!(revision = %entry.revision, reason = entry.reason.as_deref().unwrap_or(""), "rejected");
        self.record(entry.clone());
        PassResult::Recorded {
            entry: Box::new(entry),
        }
    }
}

/// Which source `legate run` follows.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// `--dir PATH`: watched with a 200 ms debounce.
    Dir(PathBuf),
    /// `--repo URL` and friends.
    Git(Box<crate::source::git::GitOptions>),
}

/// A started reconciler with its file watches. Dropping it stops the watches (the loop keeps
/// polling as long as the runtime runs).
pub struct Running {
    pub handle: Handle,
    _watches: Vec<crate::source::dir::DirWatch>,
}

/// Build the source, start the loop, and watch the directory source and the secrets
/// directory (a secret that appears retries a revision waiting for it).
pub fn launch(
    spec: SourceSpec,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    errors: Option<Arc<dyn ErrorCounter>>,
) -> Result<Running, String> {
    const QUIET: Duration = Duration::from_millis(200);
    let mut watch_dirs = Vec::new();
    let source: Arc<dyn Source> = match spec {
        SourceSpec::Dir(path) => {
            watch_dirs.push(path.clone());
            Arc::new(crate::source::dir::DirSource::new(
                path,
                settings.config.tree.clone(),
                settings.cache_dir.clone(),
            ))
        }
        SourceSpec::Git(opts) => {
            Arc::new(crate::source::git::GitSource::new(*opts).map_err(|e| e.to_string())?)
        }
    };
    if let Some(s) = &settings.secrets_dir {
        if s.is_dir() {
            watch_dirs.push(s.clone());
        }
    }
    let handle = start(source, sink, settings, errors);
    let mut watches = Vec::new();
    for d in watch_dirs {
        watches.push(crate::source::dir::watch(
            &d,
            QUIET,
            handle.trigger_notify(),
        )?);
    }
    Ok(Running {
        handle,
        _watches: watches,
    })
}
