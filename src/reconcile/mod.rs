//! Reconcile: take the source's current revision through read, compile and preflight, swap
//! the graph atomically, verify it, and record every outcome.
//!
//! Owns: the one reconcile loop (one pass at a time), the revision history, pin/unpin, the
//! serving and last verified revisions in the cache dir, verification windows and the retry of
//! revisions a window failed. Must not parse YAML or match requests (that is `config` and
//! `routes`) nor know proxy internals: the graph goes through [`GraphSink`]. Level-triggered: a
//! trigger only says "look again"; each pass reads the whole revision, so a lost trigger is
//! healed by the next poll.
//!
//! A window never holds the loop up: it runs as a task and reports its verdict with the
//! generation it was started for. Every swap bumps the generation, so the verdict of a window a
//! newer revision interrupted is dropped instead of swapping anything.

pub mod evidence;
pub mod preflight;
pub mod verify;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::{self, Diagnostic, Severity};
use crate::routes::Graph;
use crate::source::{CommitInfo, Revision, Source, SourceError};

pub use evidence::{Evidence, Observed, Tally};
pub use verify::{Judgement, UpstreamHealth, Verdict, VerifySettings};

/// Where the reconciler puts the graph new requests should see.
pub trait GraphSink: Send + Sync + 'static {
    /// Make `graph` current. Must not drop in-flight requests.
    fn swap(&self, graph: Arc<Graph>);

    /// Make `graph` current as revision `revision` (the id shown everywhere: access log,
    /// `x-legate-revision`), counting each request a route answers into `evidence`.
    fn serve(&self, graph: Arc<Graph>, revision: &str, evidence: Arc<Evidence>) {
        let _ = (revision, evidence);
        self.swap(graph)
    }

    /// Get ready to serve `graph` (bind the ports it opens); `Err` rejects the revision with
    /// that reason, and the serving one goes on.
    fn prepare(&self, graph: &Graph) -> Result<(), String> {
        let _ = graph;
        Ok(())
    }
}

/// A [`GraphSink`] that only holds the graph: the current one (`load`), a watch of every swap
/// (`subscribe`), and the revision id and evidence counters it serves under (`served`). Tests
/// use it where no proxy runs; the proxy is a `GraphSink` of its own.
pub struct Live {
    graph: ArcSwap<Graph>,
    tx: watch::Sender<Arc<Graph>>,
    served: Mutex<(String, Arc<Evidence>)>,
}

impl Live {
    pub fn new() -> Arc<Live> {
        let g = Graph::empty();
        Arc::new(Live {
            graph: ArcSwap::new(g.clone()),
            tx: watch::channel(g).0,
            served: Mutex::new((String::new(), Evidence::new(0))),
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

    /// The revision id and evidence counters of the current graph (tests count into them as
    /// the proxy would).
    pub fn served(&self) -> (String, Arc<Evidence>) {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl GraphSink for Live {
    fn swap(&self, graph: Arc<Graph>) {
        let n = graph.len();
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) =
            (graph.hash.clone(), Evidence::new(n));
        self.graph.store(graph.clone());
        self.tx.send_replace(graph);
    }

    fn serve(&self, graph: Arc<Graph>, revision: &str, evidence: Arc<Evidence>) {
        *self.served.lock().unwrap_or_else(|e| e.into_inner()) = (revision.to_string(), evidence);
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
    /// Where the serving and last verified revisions are remembered (`state.json`).
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
    /// Where recorded history entries are broadcast (at swap time, and again with the
    /// verdict). Give a sender whose receivers were made before `start` so that not even the
    /// first revision is missed; `None`: a private channel ([`Handle::subscribe`] still works,
    /// from the moment it is called).
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

impl From<&Status> for crate::metrics::ReconcileView {
    fn from(s: &Status) -> Self {
        crate::metrics::ReconcileView {
            revision: s.applied.clone(),
            passes: s.passes,
            fetch_failures: s.fetch_failures,
            consecutive_failures: s.consecutive_failures,
            last_pass_at: s.last_pass_at,
            last_fetch_ok_at: s.last_fetch_ok_at,
            out_of_sync: s.head.is_some() && s.applied.is_some() && s.head != s.applied,
        }
    }
}

/// Count every history entry the reconciler records from now on in `metrics`
/// (`legate_reconcile_revisions_total`).
pub fn count_outcomes(
    metrics: &Arc<crate::metrics::Metrics>,
    mut rx: tokio::sync::broadcast::Receiver<Entry>,
) {
    let metrics = metrics.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(e) => metrics.revision_outcome(e.outcome.metric_label()),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// What became of a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Swapped in and serving; its verification window runs.
    Verifying,
    /// Serving, verified (or verified-unobserved: see the entry's `verdict`).
    Applied,
    /// Serving although its window failed: there was nothing verified to go back to (a first
    /// revision), or it is pinned. Retried (re-verified) with backoff.
    Degraded,
    /// Never applied; see `reason` and `diagnostics`.
    Rejected,
    /// Applied, failed verification, swapped back to the last verified revision. Retried with
    /// backoff once its failed upstreams answer a probe.
    RolledBack,
    /// Swapped in, then replaced by a newer revision before its window ended: never judged.
    Interrupted,
    /// Was verified and serving, then replaced by a newer revision.
    Superseded,
}

impl Outcome {
    /// The `outcome` label of `legate_reconcile_revisions_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Rejected => "rejected",
            Outcome::RolledBack => "rolled_back",
            Outcome::Superseded => "superseded",
            Outcome::Verifying => "verifying",
            Outcome::Degraded => "degraded",
            Outcome::Interrupted => "interrupted",
        }
    }
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

/// One entry of the history. Written when a revision is swapped in (`Verifying`) or rejected,
/// and updated in place with the window's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The revision id: the commit id for git, the content id for a directory or Kubernetes.
    pub revision: String,
    /// Short hash of the compiled graph (equal configs, equal hash), beside the revision id.
    pub graph: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitInfo>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject: Option<RejectKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The verification window's verdict, once it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// A force push (new head not descending from the applied one).
    pub forced: bool,
    /// Applied by a pin rather than by following the ref.
    pub pinned: bool,
    /// Served from the local cache at startup.
    pub from_cache: bool,
    /// Applied by a retry after its window failed (the attempt number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unix milliseconds of the last change (the swap, then the verdict).
    pub finished_at: u64,
    pub timings: Timings,
    pub routes: usize,
    pub diagnostics: Vec<Diagnostic>,
    /// Identifies the entry across its updates.
    #[serde(skip)]
    seq: u64,
}

/// The serving revision's state, as `legate status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LiveState {
    Verifying,
    Verified,
    VerifiedUnobserved,
    Degraded,
    Pinned,
    FromCache,
}

/// A revision a window failed, waiting to be tried again.
#[derive(Debug, Clone, Serialize)]
pub struct RetryView {
    pub revision: String,
    /// Attempts so far (the next one is `attempts + 1`).
    pub attempts: u32,
    pub delay_ms: u64,
    /// Unix milliseconds of the next attempt.
    pub next_at: u64,
    /// Upstreams that must answer a probe before the attempt.
    pub upstreams: Vec<String>,
    /// `rollback` (swapped in again) or `reverify` (still serving, watched again).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_probe_error: Option<String>,
}

/// The reconciler's current state, as the admin API shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub source: String,
    /// Revision being served (also during its window).
    pub applied: Option<String>,
    /// Short hash of the serving graph.
    pub graph: Option<String>,
    /// State of the serving revision.
    pub state: Option<LiveState>,
    /// The last revision that passed its window: what a failing one is judged against and
    /// rolled back to.
    pub verified: Option<String>,
    /// Last revision a pass looked at.
    pub attempted: Option<String>,
    pub pinned: Option<String>,
    /// The source's head (also while pinned).
    pub head: Option<String>,
    /// Pinned and the head is another revision.
    pub out_of_sync: bool,
    /// Swapped in and inside its verification window.
    pub verifying: Option<String>,
    /// The served revision came from the local cache at startup and nothing newer has been
    /// applied since (the source was unreachable or its head broken).
    pub serving_cached: bool,
    /// The running window and its evidence so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowView>,
    /// A revision a window failed, waiting for its retry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryView>,
    /// SIGTERM received: connections are draining (`/readyz` answers 503).
    pub draining: bool,
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

/// What one pass did, as answered to a manual sync or pin: at swap time, so a swapped-in
/// revision answers `Verifying` (its verdict comes later, see `legate sync --wait`).
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

#[derive(Default)]
struct Shared {
    status: Status,
    history: VecDeque<Entry>,
    /// The running window, for its evidence so far in status.
    window: Option<(String, Arc<verify::Window>)>,
    /// Compiled graphs of the revisions swapped in lately (newest last, at most
    /// [`KEPT_GRAPHS`]), so the dashboard can diff a revision against the one before it
    /// without reading the source again.
    graphs: VecDeque<(String, Arc<Graph>)>,
}

/// How many compiled graphs [`Shared::graphs`] keeps.
pub const KEPT_GRAPHS: usize = 20;

/// The route diff of a revision against the revision served before it.
#[derive(Debug)]
pub struct RevisionDiff {
    /// The revision before (`None`: the first revision, compared with no routes).
    pub base: Option<String>,
    pub diff: crate::diff::RouteDiff,
}

/// The running verification window, as status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WindowView {
    pub revision: String,
    /// Until the last changed route has been live for the window.
    pub ends_in_ms: u64,
    /// How many routes are judged.
    pub judged: usize,
    /// Evidence so far: the failing routes, then the busiest others.
    pub routes: Vec<verify::RouteReport>,
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

fn is_serving(o: Outcome) -> bool {
    matches!(o, Outcome::Verifying | Outcome::Applied | Outcome::Degraded)
}

impl Handle {
    /// Every history entry as it is recorded or updated (notifications, Kubernetes status). A
    /// slow receiver misses events (`Lagged`) instead of holding the reconciler up.
    pub fn subscribe(&self) -> broadcast::Receiver<Entry> {
        self.events.subscribe()
    }

    pub fn status(&self) -> Status {
        let s = self.lock();
        let mut st = s.status.clone();
        st.live = st.applied.as_ref().and_then(|id| {
            let mine = s.history.iter().rev().filter(|e| &e.revision == id);
            mine.clone()
                .find(|e| is_serving(e.outcome))
                .or_else(|| mine.clone().next())
                .cloned()
        });
        st.last_attempt = s.history.back().cloned();
        st.window = s.window.as_ref().map(|(rev, w)| WindowView {
            revision: rev.clone(),
            ends_in_ms: ms(w.deadline().saturating_duration_since(Instant::now())),
            judged: w.routes.len(),
            routes: w.progress(),
        });
        st.mode = if st.pinned.is_some() {
            "pinned"
        } else {
            "following"
        };
        st.out_of_sync = st.pinned.is_some() && st.head.is_some() && st.head != st.applied;
        st.state = st.live.as_ref().map(|e| match e.outcome {
            Outcome::Verifying => LiveState::Verifying,
            Outcome::Degraded => LiveState::Degraded,
            _ if st.pinned.is_some() => LiveState::Pinned,
            _ if st.serving_cached => LiveState::FromCache,
            _ if e.verdict.as_ref().map(|v| v.judgement) == Some(Judgement::VerifiedUnobserved) => {
                LiveState::VerifiedUnobserved
            }
            _ => LiveState::Verified,
        });
        st
    }

    /// History, newest first.
    pub fn history(&self) -> Vec<Entry> {
        self.lock().history.iter().rev().cloned().collect()
    }

    /// The route diff of revision `id` against the revision swapped in before it. Only the
    /// last [`KEPT_GRAPHS`] swapped-in revisions are kept; a rejected revision never compiled,
    /// so it has no diff (its diagnostics say why).
    pub fn diff(&self, id: &str) -> Result<RevisionDiff, String> {
        let s = self.lock();
        let Some(at) = s.graphs.iter().rposition(|(r, _)| r == id) else {
            return Err(format!(
                "revision {id} is not among the last {KEPT_GRAPHS} revisions swapped in (a rejected revision has no routes: see its diagnostics)"
            ));
        };
        let head = &s.graphs[at].1;
        let before = s.graphs.iter().take(at).rev().find(|(r, _)| r != id);
        let diff = match before {
            Some((_, base)) => crate::diff::diff(base, head),
            None => crate::diff::diff(&Graph::empty(), head),
        };
        Ok(RevisionDiff {
            base: before.map(|(r, _)| r.clone()),
            diff,
        })
    }

    /// Ask for a fetch and pass soon (webhooks, file watches). Never blocks; bursts coalesce.
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// The notifier behind [`Handle::trigger`], for watchers that signal it directly.
    pub fn trigger_notify(&self) -> Arc<Notify> {
        self.trigger.clone()
    }

    /// SIGTERM: report not ready from now on (`/readyz` 503) while connections drain.
    pub fn set_draining(&self) {
        self.lock().status.draining = true;
    }

    /// Run a pass now and wait for it (not for a window: the answer comes at swap time). A
    /// manual sync also retries a revision whose rejection was final.
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

/// `state.json` in the cache dir.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    source: String,
    /// The serving revision.
    applied: Option<String>,
    pinned: Option<String>,
    /// Format 2 adds the fields below; in format 1 the applied revision was always verified.
    #[serde(default)]
    format: u32,
    #[serde(default)]
    verified: Option<String>,
    /// Verdicts of the revisions named above.
    #[serde(default)]
    verdicts: BTreeMap<String, Verdict>,
    #[serde(default)]
    retry: Option<PersistedRetry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistedRetry {
    revision: String,
    attempts: u32,
    delay_ms: u64,
    next_at: u64,
    upstreams: Vec<String>,
    reverify: bool,
}

const STATE_FILE: &str = "state.json";

/// Start the reconcile loop on the current tokio runtime. The first thing it does is serve the
/// last applied revision from the cache dir, if there is one; then it follows the source.
pub fn start(
    source: Arc<dyn Source>,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    health: Option<Arc<dyn UpstreamHealth>>,
) -> Handle {
    start_with(source, sink, settings, health, Arc::new(Notify::new()))
}

/// [`start`] with the "something changed" notifier the source was given.
fn start_with(
    source: Arc<dyn Source>,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    health: Option<Arc<dyn UpstreamHealth>>,
    trigger: Arc<Notify>,
) -> Handle {
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::new(Mutex::new(Shared::default()));
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status
        .source = source.describe();
    let events = settings
        .events
        .clone()
        .unwrap_or_else(|| broadcast::channel(64).0);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let r = Reconciler {
        events: events.clone(),
        source,
        sink,
        settings,
        health,
        shared: shared.clone(),
        rx,
        trigger: trigger.clone(),
        serving: None,
        verified: None,
        active: None,
        generation: 0,
        seq: 0,
        pending: HashMap::new(),
        retry: None,
        done_tx,
        done_rx,
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

#[derive(Clone)]
struct AppliedRev {
    id: String,
    graph: Arc<Graph>,
    rev: Revision,
}

/// The window running over the serving revision.
struct Active {
    generation: u64,
    seq: u64,
    window: Arc<verify::Window>,
    task: tokio::task::AbortHandle,
    started: Instant,
}

/// A verdict reported by a window task.
struct Done {
    generation: u64,
    verdict: Verdict,
}

struct Retry {
    revision: String,
    attempts: u32,
    delay: Duration,
    next_at: Instant,
    next_at_ms: u64,
    upstreams: Vec<String>,
    /// Still serving (degraded): watch it again instead of swapping it in.
    reverify: bool,
    last_probe_error: Option<String>,
}

struct Reconciler {
    events: broadcast::Sender<Entry>,
    source: Arc<dyn Source>,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    health: Option<Arc<dyn UpstreamHealth>>,
    shared: Arc<Mutex<Shared>>,
    rx: mpsc::Receiver<Command>,
    trigger: Arc<Notify>,
    /// The revision being served.
    serving: Option<AppliedRev>,
    /// The last revision that passed its window.
    verified: Option<AppliedRev>,
    active: Option<Active>,
    /// Bumped at every swap; a window's verdict counts only for its own generation.
    generation: u64,
    seq: u64,
    /// Evidence of changed routes (by fingerprint) from windows a newer revision interrupted,
    /// since the last verified revision: (what they saw, when the fingerprint went live).
    pending: HashMap<String, (Tally, Instant)>,
    retry: Option<Retry>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
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

fn short(hash: &str) -> String {
    hash.get(..12).unwrap_or(hash).to_string()
}

/// What woke the loop.
enum Wake {
    Pass(Option<Command>),
    Verdict(Done),
    Retry,
}

impl Reconciler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remember the graph of a revision just swapped in, for [`Handle::diff`].
    fn keep_graph(&self, id: &str, graph: &Arc<Graph>) {
        let mut s = self.lock();
        if s.graphs.back().is_some_and(|(r, _)| r == id) {
            return;
        }
        s.graphs.push_back((id.to_string(), graph.clone()));
        while s.graphs.len() > KEPT_GRAPHS {
            s.graphs.pop_front();
        }
    }

    async fn run(mut self) {
        self.restore().await;
        let mut replies: Vec<oneshot::Sender<PassResult>> = Vec::new();
        let mut force = false;
        // The pin before a pin request, restored if the pinned revision cannot be found.
        let mut undo_pin: Option<Option<String>> = None;
        let mut do_pass = true;
        loop {
            if do_pass {
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
            }
            do_pass = true;
            let delay = if self.failures == 0 {
                self.settings.poll
            } else {
                let exp = self.failures.saturating_sub(1).min(16);
                (self.settings.backoff * 2u32.pow(exp)).min(self.settings.poll)
            };
            let retry_at = self.retry.as_ref().map(|r| r.next_at);
            // Wait for the poll, a trigger, a command, a window's verdict or a retry; then take
            // every queued command, so a burst of webhooks makes one pass.
            let wake = tokio::select! {
                c = self.rx.recv() => match c {
                    Some(c) => Wake::Pass(Some(c)),
                    // Every handle is gone: nobody can ask for anything, keep polling.
                    None => { tokio::time::sleep(delay).await; Wake::Pass(None) }
                },
                _ = self.trigger.notified() => Wake::Pass(None),
                _ = tokio::time::sleep(delay) => Wake::Pass(None),
                Some(d) = self.done_rx.recv() => Wake::Verdict(d),
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => Wake::Retry,
            };
            let first = match wake {
                Wake::Pass(c) => c,
                Wake::Verdict(d) => {
                    self.on_verdict(d).await;
                    do_pass = false;
                    continue;
                }
                Wake::Retry => {
                    // A rollback retry makes a pass of its own (the head must still be it).
                    do_pass = self.retry_due().await;
                    force = do_pass;
                    continue;
                }
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
        let mut verdicts = BTreeMap::new();
        {
            let s = self.lock();
            for id in [&self.serving, &self.verified].into_iter().flatten() {
                let v = s
                    .history
                    .iter()
                    .rev()
                    .find(|e| e.revision == id.id && e.verdict.is_some())
                    .and_then(|e| e.verdict.clone());
                if let Some(v) = v {
                    verdicts.insert(id.id.clone(), v);
                }
            }
        }
        let p = Persisted {
            source: self.source.describe(),
            applied: self.serving.as_ref().map(|a| a.id.clone()),
            pinned: self.pinned.clone(),
            format: 2,
            verified: self.verified.as_ref().map(|a| a.id.clone()),
            verdicts,
            retry: self.retry.as_ref().map(|r| PersistedRetry {
                revision: r.revision.clone(),
                attempts: r.attempts,
                delay_ms: ms(r.delay),
                next_at: r.next_at_ms,
                upstreams: r.upstreams.clone(),
                reverify: r.reverify,
            }),
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&p) {
            if let Err(e) = crate::source::dir::write_atomic(&path, &bytes) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the applied revision");
            }
        }
    }

    /// Read and compile revision `id` from the local copy (restart).
    async fn load_cached(&self, id: &str) -> Option<(Revision, config::Outcome, u64)> {
        let source = self.source.clone();
        let id2 = id.to_string();
        let rev = match tokio::task::spawn_blocking(move || source.at(&id2)).await {
            Ok(Ok(rev)) => rev,
            Ok(Err(e)) => {
                tracing::warn!(revision = %id, error = %e, "a remembered revision is not in the cache");
                return None;
            }
            Err(_) => return None,
        };
        let (outcome, compile_ms) = self.compile(&rev).await;
        if outcome.graph.is_none() {
            tracing::warn!(revision = %rev.id, "a cached revision no longer compiles");
            return None;
        }
        Some((rev, outcome, compile_ms))
    }

    /// Serve the serving revision from the local copy, before touching the network. A
    /// revision whose window passed before is served as verified (no new window); one whose
    /// window had not ended, or failed (degraded), is watched again.
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
        let Some(id) = p.applied.clone() else { return };
        // Format 1 recorded a revision only once it passed its window.
        let verified_id = if p.format < 2 {
            Some(id.clone())
        } else {
            p.verified.clone()
        };
        if let Some(v) = verified_id.as_ref().filter(|v| **v != id) {
            if let Some((rev, out, _)) = self.load_cached(v).await {
                if let Some(graph) = out.graph {
                    self.verified = Some(AppliedRev {
                        id: rev.id.clone(),
                        graph,
                        rev,
                    });
                    self.lock().status.verified = Some(v.clone());
                }
            }
        }
        let Some((rev, outcome, compile_ms)) = self.load_cached(&id).await else {
            return;
        };
        let Some(graph) = outcome.graph.clone() else {
            return;
        };
        let started = now_ms();
        let mut entry = self.new_entry(&rev, started);
        entry.from_cache = true;
        entry.pinned = self.pinned.is_some();
        entry.timings.compile_ms = compile_ms;
        entry.routes = graph.len();
        entry.graph = short(&graph.hash);
        entry.diagnostics = outcome.diagnostics;
        if let Some(r) = p.retry {
            if !r.reverify {
                // Rolled back: not swapped in again before its retry, restart or not.
                self.final_reject = Some(r.revision.clone());
            }
            let wait = Duration::from_millis(r.next_at.saturating_sub(now_ms()));
            self.retry = Some(Retry {
                revision: r.revision,
                attempts: r.attempts,
                delay: Duration::from_millis(r.delay_ms),
                next_at: Instant::now() + wait,
                next_at_ms: r.next_at,
                upstreams: r.upstreams,
                reverify: r.reverify,
                last_probe_error: None,
            });
            self.show_retry();
        }
        if verified_id.as_deref() == Some(id.as_str()) {
            // Preflight is skipped on purpose: serving the last good graph beats serving nothing.
            let t = Instant::now();
            self.sink
                .serve(graph.clone(), &rev.id, Evidence::new(graph.len()));
            self.keep_graph(&rev.id, &graph);
            entry.timings.swap_ms = ms(t.elapsed());
            entry.outcome = Outcome::Applied;
            entry.reason = Some("served from the local cache at startup (verified before)".into());
            entry.verdict = p.verdicts.get(&id).cloned();
            entry.finished_at = now_ms();
            let a = AppliedRev {
                id: rev.id.clone(),
                graph,
                rev,
            };
            self.serving = Some(a.clone());
            self.verified = Some(a);
            {
                let mut s = self.lock();
                s.status.applied = Some(id.clone());
                s.status.graph = Some(entry.graph.clone());
                s.status.verified = Some(id);
                s.status.serving_cached = true;
            }
            self.upsert(entry);
        } else {
            entry.reason = Some(
                "served from the local cache at startup; it had not passed its window: verifying again"
                    .into(),
            );
            self.go_live(rev, graph, entry).await;
            self.lock().status.serving_cached = true;
        }
    }

    fn new_entry(&mut self, rev: &Revision, started: u64) -> Entry {
        self.seq += 1;
        Entry {
            revision: rev.id.clone(),
            graph: String::new(),
            commit: rev.commit.clone(),
            outcome: Outcome::Rejected,
            reject: None,
            reason: None,
            verdict: None,
            forced: rev.forced,
            pinned: self.pinned.is_some(),
            from_cache: false,
            retry: None,
            started_at: started,
            finished_at: 0,
            timings: Timings::default(),
            routes: 0,
            diagnostics: Vec::new(),
            seq: self.seq,
        }
    }

    /// Record `entry`, replacing the entry with the same `seq` if there is one, and announce it.
    fn upsert(&self, entry: Entry) {
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
        match s.history.iter_mut().find(|e| e.seq == entry.seq) {
            Some(e) => *e = entry,
            None => s.history.push_back(entry),
        }
        while s.history.len() > self.settings.history.max(1) {
            s.history.pop_front();
        }
    }

    /// Change the outcome of the newest entry of revision `id` that has outcome `from`.
    fn set_outcome(&self, id: &str, from: &[Outcome], to: Outcome) {
        let found = {
            let s = self.lock();
            s.history
                .iter()
                .rev()
                .find(|e| e.revision == id && from.contains(&e.outcome))
                .cloned()
        };
        if let Some(mut e) = found {
            e.outcome = to;
            e.finished_at = now_ms();
            self.upsert(e);
        }
    }

    fn entry_by_seq(&self, seq: u64) -> Option<Entry> {
        self.lock().history.iter().find(|e| e.seq == seq).cloned()
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

    /// Read the source's head in the background while pinned, only to show it (and "out of
    /// sync"): a pinned pass serves from the local copy and never waits for the network.
    fn watch_head(&self) {
        let source = self.source.clone();
        let applied = self.serving.as_ref().map(|a| a.id.clone());
        let shared = self.shared.clone();
        let metrics = self.settings.metrics.clone();
        let timeout = self.settings.fetch_timeout;
        tokio::spawn(async move {
            let t = Instant::now();
            let kind = source.kind();
            let task = tokio::task::spawn_blocking(move || source.current(applied.as_deref()));
            let head = match tokio::time::timeout(timeout, task).await {
                Ok(Ok(r)) => r.ok(),
                _ => None,
            };
            if let Some(m) = &metrics {
                m.source_fetch(kind, head.is_some(), t.elapsed());
            }
            if let Some(h) = head {
                shared.lock().unwrap_or_else(|e| e.into_inner()).status.head = Some(h.id);
            }
        });
    }

    /// The revision to serve: the source's head, or the pinned one from the local copy.
    async fn fetch(&self) -> Result<Revision, SourceError> {
        let source = self.source.clone();
        let applied = self.serving.as_ref().map(|a| a.id.clone());
        let pinned = self.pinned.clone();
        if pinned.is_some() {
            self.watch_head();
        }
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
        let (rev, fetch_ms) = match self.fetch_recorded().await {
            Ok(fetched) => fetched,
            Err(failed) => return failed,
        };
        self.cancel_stale_retry(&rev);
        if let Some(unchanged) = self.unchanged(&rev, force) {
            return unchanged;
        }
        let mut entry = self.new_entry(&rev, started);
        entry.timings.fetch_ms = fetch_ms;
        if let Some((kind, reason)) = self.refusal(&rev) {
            entry.reject = Some(kind);
            entry.reason = Some(reason);
            return self.reject(entry, true);
        }
        let graph = match self.compile_checked(&rev, &mut entry).await {
            Ok(graph) => graph,
            Err(is_final) => return self.reject(entry, is_final),
        };
        if let Some(r) = self.retry.as_ref().filter(|r| r.revision == rev.id) {
            entry.retry = Some(r.attempts);
        }
        let entry = self.go_live(rev, graph, entry).await;
        PassResult::Recorded {
            entry: Box::new(entry),
        }
    }

    /// Fetch the desired revision and record the attempt in the status and metrics; on a
    /// failure, the pass's result. Also returns how long the fetch took (ms).
    async fn fetch_recorded(&mut self) -> Result<(Revision, u64), PassResult> {
        let t_fetch = Instant::now();
        let fetched = self.fetch().await;
        let took = t_fetch.elapsed();
        // A pinned pass reads the local copy only: not a fetch (the head is read beside it).
        if let (Some(m), None) = (&self.settings.metrics, &self.pinned) {
            m.source_fetch(self.source.kind(), fetched.is_ok(), took);
        }
        if let (Ok(r), None) = (&fetched, &self.pinned) {
            self.lock().status.head = Some(r.id.clone());
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
                return Err(PassResult::SourceFailed {
                    error: e.to_string(),
                });
            }
        };
        self.failures = 0;
        let mut s = self.lock();
        s.status.source_error = None;
        s.status.consecutive_failures = 0;
        s.status.attempted = Some(rev.id.clone());
        s.status.last_pass_at = Some(now_ms());
        s.status.last_fetch_ok_at = s.status.last_pass_at;
        s.status.passes += 1;
        drop(s);
        Ok((rev, ms(took)))
    }

    /// A new head cancels the retry of an older revision.
    fn cancel_stale_retry(&mut self, rev: &Revision) {
        if self.retry.as_ref().is_some_and(|r| r.revision != rev.id) {
            tracing::info!(revision = %rev.id, "a new revision cancels the pending retry");
            self.retry = None;
            self.show_retry();
            self.persist();
        }
    }

    /// `Unchanged` when `rev` is already serving, or was finally rejected and not forced.
    fn unchanged(&mut self, rev: &Revision, force: bool) -> Option<PassResult> {
        let is_serving = self.serving.as_ref().map(|a| a.id == rev.id) == Some(true);
        if is_serving {
            // The source confirms what the cache served.
            self.lock().status.serving_cached = false;
            return Some(PassResult::Unchanged {
                revision: rev.id.clone(),
            });
        }
        if self.final_reject.as_deref() == Some(rev.id.as_str()) && !force {
            return Some(PassResult::Unchanged {
                revision: rev.id.clone(),
            });
        }
        None
    }

    /// Why the source's history refuses `rev` before it is compiled: a force push (unless
    /// allowed or pinned) or a failed signature check.
    fn refusal(&self, rev: &Revision) -> Option<(RejectKind, String)> {
        if rev.forced && self.pinned.is_none() && !self.settings.allow_force_push {
            return Some((
                RejectKind::ForcePush,
                format!(
                    "{} does not descend from the applied revision (force push); start with --allow-force-push or pin it to apply it",
                    rev.id
                ),
            ));
        }
        rev.signature_error.as_ref().map(|why| {
            (
                RejectKind::Signature,
                format!("signature check failed: {why}"),
            )
        })
    }

    /// Compile `rev` and preflight its TLS secrets, filling `entry`; on a rejection, whether it
    /// is final (`false`: a preflight error, retried on the next resync).
    async fn compile_checked(&self, rev: &Revision, entry: &mut Entry) -> Result<Arc<Graph>, bool> {
        let (outcome, compile_ms) = self.compile(rev).await;
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
            return Err(true);
        };
        entry.routes = graph.len();
        entry.graph = short(&graph.hash);
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
                return Err(false);
            }
        }
        if let Err(why) = self.sink.prepare(&graph) {
            entry.reject = Some(RejectKind::External);
            entry.reason = Some(format!("{why}; retried on the next resync"));
            entry.diagnostics.push(
                Diagnostic::error("listener-bind", &Default::default(), why)
                    .with_help("free the port, or change the Listener's port"),
            );
            return Err(false);
        }
        Ok(graph)
    }

    /// Swap `graph` in as revision `rev` and start its window, judged against the last
    /// verified revision. Interrupts the running window (its evidence is carried over by route
    /// fingerprint). Returns the entry as recorded at swap time.
    async fn go_live(&mut self, rev: Revision, graph: Arc<Graph>, mut entry: Entry) -> Entry {
        let now = Instant::now();
        if let Some(a) = self.active.take() {
            a.task.abort();
            for w in &a.window.routes {
                self.pending
                    .insert(w.route.fingerprint.clone(), (a.window.tally(w), w.since));
            }
            if let Some(mut e) = self.entry_by_seq(a.seq) {
                e.outcome = Outcome::Interrupted;
                e.reason = Some(format!(
                    "replaced by {} before its window ended",
                    short(&rev.id)
                ));
                e.timings.verify_ms = ms(a.started.elapsed());
                e.finished_at = now_ms();
                self.upsert(e);
            }
        } else if let Some(s) = &self.serving {
            let id = s.id.clone();
            self.set_outcome(&id, &[Outcome::Applied], Outcome::Superseded);
        }
        self.generation += 1;
        let base = self.verified.as_ref().map(|v| v.graph.clone());
        let changed = evidence::changed(base.as_deref(), &graph);
        let routes: Vec<verify::Watched> = changed
            .into_iter()
            .map(|c| {
                let (carried, since) = self
                    .pending
                    .get(&c.fingerprint)
                    .copied()
                    .unwrap_or((Tally::default(), now));
                verify::Watched {
                    route: c,
                    carried,
                    since,
                }
            })
            .collect();
        self.pending
            .retain(|fp, _| routes.iter().any(|w| &w.route.fingerprint == fp));
        let ev = Evidence::new(graph.len());
        let t = Instant::now();
        self.sink.serve(graph.clone(), &rev.id, ev.clone());
        self.keep_graph(&rev.id, &graph);
        entry.timings.swap_ms = ms(t.elapsed());
        entry.graph = short(&graph.hash);
        entry.routes = graph.len();
        self.serving = Some(AppliedRev {
            id: rev.id.clone(),
            graph: graph.clone(),
            rev,
        });
        {
            let mut s = self.lock();
            s.status.applied = Some(entry.revision.clone());
            s.status.graph = Some(entry.graph.clone());
            s.status.serving_cached = false;
        }
        let window = Arc::new(verify::Window {
            graph,
            evidence: ev,
            routes,
            settings: self.settings.verify.clone(),
            health: self.health.clone(),
        });
        entry.outcome = Outcome::Verifying;
        entry.finished_at = now_ms();
        if self.settings.verify.window.is_zero() || window.routes.is_empty() {
            let v = window.run().await;
            return self.finish(entry, v, Duration::ZERO).await;
        }
        tracing::info!(revision = %entry.revision, routes = entry.routes, judged = window.routes.len(), "swapped in; verifying");
        let generation = self.generation;
        let tx = self.done_tx.clone();
        let w = window.clone();
        let task = tokio::spawn(async move {
            let verdict = w.run().await;
            let _ = tx.send(Done {
                generation,
                verdict,
            });
        })
        .abort_handle();
        self.active = Some(Active {
            generation,
            seq: entry.seq,
            window,
            task,
            started: now,
        });
        {
            let mut s = self.lock();
            s.status.verifying = Some(entry.revision.clone());
            s.window = self
                .active
                .as_ref()
                .map(|a| (entry.revision.clone(), a.window.clone()));
        }
        self.persist();
        self.upsert(entry.clone());
        entry
    }

    async fn on_verdict(&mut self, d: Done) {
        let Some(a) = self.active.take_if(|a| a.generation == d.generation) else {
            // A window a newer revision interrupted: its verdict is for nothing that serves.
            return;
        };
        let Some(entry) = self.entry_by_seq(a.seq) else {
            return;
        };
        self.finish(entry, d.verdict, a.started.elapsed()).await;
    }

    /// Act on the verdict for the serving revision (`entry`): keep it verified, roll back to
    /// the last verified revision, or keep it serving as degraded when there is none (or it is
    /// pinned). Returns the entry as recorded.
    async fn finish(&mut self, mut entry: Entry, v: Verdict, took: Duration) -> Entry {
        {
            let mut s = self.lock();
            s.status.verifying = None;
            s.window = None;
        }
        entry.timings.verify_ms = ms(took);
        entry.finished_at = now_ms();
        let Some(serving) = self.serving.clone() else {
            return entry;
        };
        if v.passed() {
            entry.outcome = Outcome::Applied;
            entry.reason = None;
            self.verified = Some(serving.clone());
            self.pending.clear();
            self.final_reject = None;
            if self
                .retry
                .as_ref()
                .is_some_and(|r| r.revision == serving.id)
            {
                self.retry = None;
                self.show_retry();
            }
            let source = self.source.clone();
            let r2 = serving.rev.clone();
            match tokio::task::spawn_blocking(move || source.remember(&r2)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot remember the applied revision"),
                Err(e) => tracing::warn!(error = %e, "cannot remember the applied revision"),
            }
            tracing::info!(revision = %entry.revision, verdict = %v.summary, "verified");
            entry.verdict = Some(v);
            self.lock().status.verified = Some(serving.id.clone());
        } else if let Some(failed) = self.set_aside(&v) {
            // Kubernetes: only the failing objects go, other teams' objects stay as they are.
            entry.outcome = Outcome::Degraded;
            entry.reason = Some(format!(
                "set aside {} (VerificationFailed); a revision without them follows: {}",
                failed.join(", "),
                v.summary
            ));
            tracing::warn!(revision = %entry.revision, reason = %v.summary, "failing objects set aside");
            entry.verdict = Some(v);
        } else {
            let target = self
                .verified
                .clone()
                .filter(|t| t.id != serving.id && self.pinned.is_none());
            match target {
                Some(t) => {
                    self.generation += 1;
                    self.sink
                        .serve(t.graph.clone(), &t.id, Evidence::new(t.graph.len()));
                    self.serving = Some(t.clone());
                    self.pending.clear();
                    {
                        let mut s = self.lock();
                        s.status.applied = Some(t.id.clone());
                        s.status.graph = Some(short(&t.graph.hash));
                    }
                    self.set_outcome(&t.id, &[Outcome::Superseded], Outcome::Applied);
                    entry.outcome = Outcome::RolledBack;
                    entry.reason = Some(format!("rolled back to {}: {}", short(&t.id), v.summary));
                    self.final_reject = Some(serving.id.clone());
                    tracing::warn!(revision = %entry.revision, reason = %v.summary, "rolled back");
                    self.schedule_retry(&serving.id, &v, false);
                }
                None => {
                    entry.outcome = Outcome::Degraded;
                    let why = if self.pinned.is_some() {
                        "pinned: kept serving"
                    } else {
                        "no verified revision to go back to: kept serving"
                    };
                    entry.reason = Some(format!("{why}: {}", v.summary));
                    tracing::warn!(revision = %entry.revision, reason = %v.summary, "degraded");
                    self.schedule_retry(&serving.id, &v, true);
                }
            }
            entry.verdict = Some(v);
        }
        self.upsert(entry.clone());
        self.persist();
        entry
    }

    /// Ask the source to set aside the Mappings whose routes failed (Kubernetes mode); the
    /// Mappings when it did.
    fn set_aside(&self, v: &Verdict) -> Option<Vec<String>> {
        if self.pinned.is_some() {
            return None;
        }
        let failed: Vec<String> = v
            .routes
            .iter()
            .filter(|r| r.failed)
            .map(|r| r.mapping.clone())
            .collect();
        (!failed.is_empty() && self.source.set_aside(&failed, &v.summary)).then_some(failed)
    }

    fn schedule_retry(&mut self, id: &str, v: &Verdict, reverify: bool) {
        let s = &self.settings.verify;
        let prev = self
            .retry
            .as_ref()
            .filter(|r| r.revision == id)
            .map(|r| (r.attempts, r.delay));
        let (attempts, delay) = next_retry(prev, s.retry_initial, s.retry_max);
        self.retry = Some(Retry {
            revision: id.to_string(),
            attempts,
            delay,
            next_at: Instant::now() + delay,
            next_at_ms: now_ms() + ms(delay),
            upstreams: v.failed_upstreams.clone(),
            reverify,
            last_probe_error: None,
        });
        self.show_retry();
    }

    fn show_retry(&self) {
        let view = self.retry.as_ref().map(|r| RetryView {
            revision: r.revision.clone(),
            attempts: r.attempts,
            delay_ms: ms(r.delay),
            next_at: r.next_at_ms,
            upstreams: r.upstreams.clone(),
            kind: if r.reverify { "reverify" } else { "rollback" },
            last_probe_error: r.last_probe_error.clone(),
        });
        self.lock().status.retry = view;
    }

    /// The retry is due: probe the upstreams that failed it (they accept a connection); if
    /// they do, watch the
    /// degraded revision again, or (returns true) make a pass that swaps the rolled-back one
    /// in again if it is still the head. Else back off.
    async fn retry_due(&mut self) -> bool {
        let Some(r) = self.retry.as_ref() else {
            return false;
        };
        // A TCP connect, whatever the upstream's scheme: the window that follows judges the
        // rest (and runs the --health-path probes).
        let timeout = self.settings.verify.probe_timeout;
        let mut failed = None;
        for up in &r.upstreams {
            let res = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(up)).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect: {e}")),
                Err(_) => Err(format!("no connection within {} ms", timeout.as_millis())),
            };
            if let Err(e) = res {
                failed = Some(format!("{up}: {e}"));
                break;
            }
        }
        let id = r.revision.clone();
        let reverify = r.reverify;
        if let Some(why) = failed {
            let max = self.settings.verify.retry_max;
            if let Some(r) = self.retry.as_mut() {
                r.delay = next_retry(Some((r.attempts, r.delay)), r.delay, max).1;
                r.next_at = Instant::now() + r.delay;
                r.next_at_ms = now_ms() + ms(r.delay);
                r.last_probe_error = Some(why.clone());
            }
            tracing::info!(revision = %id, error = %why, "retry postponed: an upstream still fails its probe");
            self.show_retry();
            self.persist();
            return false;
        }
        if reverify {
            // Still serving: a new generation with fresh counters, judged as before.
            let Some(s) = self.serving.clone().filter(|s| s.id == id) else {
                self.retry = None;
                self.show_retry();
                return false;
            };
            let mut entry = self.new_entry(&s.rev, now_ms());
            entry.retry = self.retry.as_ref().map(|r| r.attempts);
            entry.reason = Some("retry: its failed upstreams answer again; verifying again".into());
            // Park the retry far away while the window runs; the verdict reschedules it.
            if let Some(r) = self.retry.as_mut() {
                r.next_at = Instant::now() + Duration::from_secs(365 * 24 * 3600);
            }
            self.go_live(s.rev.clone(), s.graph.clone(), entry).await;
            false
        } else {
            if let Some(r) = self.retry.as_mut() {
                r.next_at = Instant::now() + Duration::from_secs(365 * 24 * 3600);
            }
            self.final_reject = None;
            true
        }
    }

    fn reject(&mut self, mut entry: Entry, is_final: bool) -> PassResult {
        entry.outcome = Outcome::Rejected;
        entry.finished_at = now_ms();
        if is_final {
            self.final_reject = Some(entry.revision.clone());
        }
        tracing::warn!(revision = %entry.revision, reason = entry.reason.as_deref().unwrap_or(""), "rejected");
        self.upsert(entry.clone());
        PassResult::Recorded {
            entry: Box::new(entry),
        }
    }
}

/// The attempt number and delay of the next retry of a failed revision: `initial` first, then
/// doubling up to `max`.
fn next_retry(prev: Option<(u32, Duration)>, initial: Duration, max: Duration) -> (u32, Duration) {
    match prev {
        Some((attempts, delay)) => (attempts + 1, (delay * 2).min(max)),
        None => (1, initial.min(max)),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which source `legate run` follows.
pub enum SourceSpec {
    /// `--dir PATH`: watched with a 200 ms debounce.
    Dir(PathBuf),
    /// `--repo URL` and friends.
    Git(Box<crate::source::git::GitOptions>),
    /// `--kubernetes`: the cluster's objects, watched through the client.
    Kubernetes(Box<KubeSpec>),
}

/// What the Kubernetes source watches, and through which API client.
pub struct KubeSpec {
    pub client: ::kube::Client,
    pub options: crate::source::kube::KubeOptions,
}

impl SourceSpec {
    /// How notifications name the source (never with credentials).
    pub fn name(&self) -> String {
        match self {
            SourceSpec::Dir(d) => d.display().to_string(),
            SourceSpec::Git(g) => crate::source::git::redact(&g.url),
            SourceSpec::Kubernetes(_) => "kubernetes".into(),
        }
    }
}

/// A started reconciler with its source's watches. Dropping it stops the watches (the loop
/// keeps polling as long as the runtime runs).
pub struct Running {
    pub handle: Handle,
    _watches: Vec<crate::source::dir::DirWatch>,
    kube: Option<crate::source::kube::KubeWatch>,
}

impl Running {
    /// The Kubernetes watches, in Kubernetes mode (their snapshots feed the status writer).
    pub fn kube(&self) -> Option<&crate::source::kube::KubeWatch> {
        self.kube.as_ref()
    }
}

/// Build the source, start the loop, and watch what says "something changed": the directory
/// source and the secrets directory (a secret that appears retries a revision waiting for
/// it), or the Kubernetes watches (each snapshot with news asks for a pass at once, a
/// set-aside object's replacement too). Every source starts here.
pub async fn launch(
    spec: SourceSpec,
    sink: Arc<dyn GraphSink>,
    settings: Settings,
    health: Option<Arc<dyn UpstreamHealth>>,
) -> Result<Running, String> {
    const QUIET: Duration = Duration::from_millis(200);
    let trigger = Arc::new(Notify::new());
    let mut watch_dirs = Vec::new();
    let mut kube = None;
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
        SourceSpec::Kubernetes(k) => {
            let KubeSpec { client, options } = *k;
            let w = crate::source::kube::start(client, options, Some(trigger.clone()))
                .await
                .map_err(|e| e.to_string())?;
            let source = Arc::new(w.source());
            kube = Some(w);
            source
        }
    };
    // In Kubernetes mode the source writes the secrets directory itself.
    if let Some(s) = settings.secrets_dir.as_ref().filter(|_| kube.is_none()) {
        if s.is_dir() {
            watch_dirs.push(s.clone());
        }
    }
    let handle = start_with(source, sink, settings, health, trigger);
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
        kube,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_one_minute_doubling_to_fifteen() {
        let (i, m) = (Duration::from_secs(60), Duration::from_secs(900));
        let mut prev = None;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let next = next_retry(prev, i, m);
            delays.push(next.1.as_secs());
            prev = Some(next);
        }
        assert_eq!(delays, vec![60, 120, 240, 480, 900, 900]);
        assert_eq!(prev.unwrap().0, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_wakes_the_loop_at_its_time_and_not_before() {
        let at = Instant::now() + Duration::from_secs(60);
        let t = Instant::now();
        sleep_until_opt(Some(at)).await;
        assert_eq!(t.elapsed(), Duration::from_secs(60));
        // No retry: never wakes (the select's other branches do).
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until_opt(None)).await;
        assert!(never.is_err());
    }
}
