//! Kubernetes mode, the cluster-facing half: status written back on Mappings, Hosts and
//! RouteTests, and the Lease-based leader election that makes one replica the writer.
//!
//! Owns: talking to the API server about our own bookkeeping (status subresources, one
//! `coordination.k8s.io/v1` Lease). Must not: watch objects or build revisions (that is
//! `source::kube`), or touch the serving graph. Every replica serves traffic; only the leader
//! writes status.

pub mod lease;
pub mod status;

use std::sync::Arc;

use ::kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use lease::{default_identity, Leader, LeaseConfig};
pub use status::{spawn_status, Served, StatusWriter};

use crate::source::kube::Snapshot;

/// The election and the status writer, running. Dropping it stops both.
pub struct StatusHandle {
    leader: Leader,
    task: JoinHandle<()>,
}

impl StatusHandle {
    /// True while this replica holds the Lease and writes status.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.leader.watch()
    }
}

impl Drop for StatusHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Campaign for `lease` and write status from `snapshots` while leader. `served` carries the
/// id of the revision the gateway serves and its rollout state (sent at the swap and again
/// with the verdict).
pub fn start_status(
    client: Client,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    served: watch::Receiver<Option<Served>>,
    lease: LeaseConfig,
) -> StatusHandle {
    let leader = Leader::spawn(client.clone(), lease);
    let task = spawn_status(client, snapshots, served, leader.watch());
    StatusHandle { leader, task }
}
