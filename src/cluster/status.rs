//! Status written back on each watched object: the `Accepted` condition (the diagnostics as
//! `legate check` prints them), `observedGeneration`, and the gateway revision serving it.
//!
//! Written with a merge patch on the status subresource, only by the leader, and only when the
//! wanted status differs from what was last written (or, after a leader change, from what the
//! object already carries): a status write comes back through the watch, and must not cause
//! another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, Patch, PatchParams};
use ::kube::Client;
use k8s_openapi::chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::source::kube::{ObjectRef, Snapshot, Verdict};

/// How often failed writes are retried when nothing else happens.
const RETRY: Duration = Duration::from_secs(30);

/// The revision this replica serves and its rollout state (`verifying`, `verified`,
/// `verified-unobserved`, `degraded`), as the lease holder's own reconciler judged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub revision: String,
    pub state: String,
}

impl From<String> for Served {
    /// A revision served as verified.
    fn from(revision: String) -> Served {
        Served {
            revision,
            state: "verified".into(),
        }
    }
}

/// The part of a status that decides whether to write (no timestamps).
#[derive(Debug, Clone, PartialEq)]
struct Core {
    generation: Option<i64>,
    revision: Option<String>,
    /// The served revision's rollout state (with `revision`).
    rollout: Option<String>,
    accepted: bool,
    reason: String,
    message: String,
}

#[derive(Debug, Clone)]
struct Written {
    core: Core,
    since: String,
}

/// Remembers what it wrote, so equal statuses are never written twice.
pub struct StatusWriter {
    client: Client,
    written: HashMap<ObjectRef, Written>,
}

impl StatusWriter {
    pub fn new(client: Client) -> StatusWriter {
        StatusWriter {
            client,
            written: HashMap::new(),
        }
    }

    /// Forget what was written (on becoming leader: another replica may have written since).
    pub fn forget(&mut self) {
        self.written.clear();
    }

    /// Write the status of every object of `snap` whose status changed. `served` is the id of
    /// the revision the gateway serves. Returns how many objects were patched.
    pub async fn publish(&mut self, snap: &Snapshot, served: Option<&Served>) -> usize {
        let serving = served.filter(|s| s.revision == snap.revision.id);
        self.written
            .retain(|k, _| snap.verdicts.iter().any(|v| &v.object == k));
        let mut patched = 0;
        for v in &snap.verdicts {
            let core = Core {
                generation: v.generation,
                revision: serving.filter(|_| v.accepted).map(|s| s.revision.clone()),
                rollout: serving.filter(|_| v.accepted).map(|s| s.state.clone()),
                accepted: v.accepted,
                reason: v.reason.clone(),
                message: v.message.clone(),
            };
            let previous = match self.written.get(&v.object) {
                Some(w) => Some(w.clone()),
                None => seen(v),
            };
            if let Some(p) = &previous {
                if p.core == core {
                    self.written.insert(v.object.clone(), p.clone());
                    continue;
                }
            }
            let since = match &previous {
                Some(p) if p.core.accepted == core.accepted => p.since.clone(),
                _ => Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            };
            let body = body(&core, &since);
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.client.clone(),
                &v.object.namespace,
                &v.object.kind.api_resource(),
            );
            match api
                .patch_status(
                    &v.object.name,
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
            {
                Ok(_) => {
                    patched += 1;
                    self.written
                        .insert(v.object.clone(), Written { core, since });
                }
                Err(::kube::Error::Api(e)) if e.code == 404 => {
                    // Deleted meanwhile; the next snapshot drops it.
                }
                Err(e) => {
                    tracing::warn!(object = %v.object, error = %e, "cannot write status; will retry");
                }
            }
        }
        patched
    }
}

/// The status body of a merge patch.
fn body(core: &Core, since: &str) -> Value {
    json!({
        "status": {
            "observedGeneration": core.generation,
            "revision": core.revision,
            "rollout": core.rollout,
            "conditions": [{
                "type": "Accepted",
                "status": if core.accepted { "True" } else { "False" },
                "reason": core.reason,
                "message": core.message,
                "observedGeneration": core.generation,
                "lastTransitionTime": since,
            }],
        }
    })
}

/// What the object already carries, read back from the watch.
fn seen(v: &Verdict) -> Option<Written> {
    let s = v.status.as_ref()?;
    let cond = s
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Accepted"))?;
    Some(Written {
        core: Core {
            generation: s.get("observedGeneration").and_then(Value::as_i64),
            revision: s
                .get("revision")
                .and_then(Value::as_str)
                .map(str::to_string),
            rollout: s.get("rollout").and_then(Value::as_str).map(str::to_string),
            accepted: cond.get("status").and_then(Value::as_str) == Some("True"),
            reason: cond
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            message: cond
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        },
        since: cond
            .get("lastTransitionTime")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// Write statuses whenever a snapshot, the served revision or leadership changes, while this
/// replica is the leader.
pub fn spawn_status(
    client: Client,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    mut served: watch::Receiver<Option<Served>>,
    mut leader: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut writer = StatusWriter::new(client);
        let mut was_leader = false;
        loop {
            let is_leader = *leader.borrow_and_update();
            if is_leader && !was_leader {
                writer.forget();
            }
            was_leader = is_leader;
            let snap = snapshots.borrow_and_update().clone();
            let srv = served.borrow_and_update().clone();
            if let (true, Some(snap)) = (is_leader, snap) {
                writer.publish(&snap, srv.as_ref()).await;
            }
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { return },
                r = served.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    })
}
