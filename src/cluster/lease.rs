//! Leader election on a `coordination.k8s.io/v1` Lease: acquire it when absent or expired,
//! renew it while held, give it up in our own mind when renewals fail for a whole lease
//! duration (another replica may have taken it by then).

use std::time::Duration;

use ::kube::api::{Api, PostParams};
use ::kube::Client;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which Lease, who we are, and the timing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Holder identity: the pod name (hostname) of this replica.
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews and the others look.
    pub retry: Duration,
}

impl LeaseConfig {
    /// `legate-status` in `namespace`, 15 s lease, renewed every 5 s.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: "legate-status".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(5),
        }
    }
}

/// This replica's identity: `POD_NAME`, else `HOSTNAME`, else /etc/hostname.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("legate-{}", std::process::id()))
}

/// A running election. Dropping it stops campaigning (the Lease then expires).
pub struct Leader {
    is_leader: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Leader {
    /// Start campaigning.
    pub fn spawn(client: Client, cfg: LeaseConfig) -> Leader {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(campaign(client, cfg, tx));
        Leader {
            is_leader: rx,
            task,
        }
    }

    /// True while this replica holds the Lease.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn campaign(client: Client, cfg: LeaseConfig, tx: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        match try_hold(&api, &cfg, Utc::now()).await {
            Ok(held) => {
                if held {
                    last_ok = tokio::time::Instant::now();
                }
                if *tx.borrow() != held {
                    tracing::info!(identity = %cfg.identity, leader = held, "status-writer leadership changed");
                }
                tx.send_replace(held);
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "cannot read or renew the Lease");
                if *tx.borrow() && last_ok.elapsed() >= cfg.duration {
                    tracing::warn!(identity = %cfg.identity, "Lease not renewed for a whole lease duration; no longer writing status");
                    tx.send_replace(false);
                }
            }
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// One round: returns whether we hold the Lease afterwards. Conflicts (another replica wrote
/// first) mean "not leader"; the API server's resourceVersion check keeps two from winning.
pub async fn try_hold(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: DateTime<Utc>,
) -> Result<bool, ::kube::Error> {
    let secs = cfg.duration.as_secs().max(1) as i32;
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            conflict_is_false(api.create(&PostParams::default(), &lease).await)
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            if holder == cfg.identity {
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(secs);
            } else {
                let their_secs = spec.lease_duration_seconds.unwrap_or(secs);
                let expired = match &spec.renew_time {
                    Some(MicroTime(t)) => {
                        *t + k8s_openapi::chrono::Duration::seconds(their_secs.into()) < now
                    }
                    None => true,
                };
                if !holder.is_empty() && !expired {
                    return Ok(false);
                }
                spec.holder_identity = Some(cfg.identity.clone());
                spec.lease_duration_seconds = Some(secs);
                spec.acquire_time = Some(MicroTime(now));
                spec.renew_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            conflict_is_false(api.replace(&cfg.name, &PostParams::default(), &lease).await)
        }
    }
}

fn conflict_is_false(r: Result<Lease, ::kube::Error>) -> Result<bool, ::kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(::kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
