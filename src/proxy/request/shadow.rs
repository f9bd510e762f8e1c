//! Traffic shadowing (Emissary's `shadow: true`): a copy of a share of a group's requests goes
//! to the shadow Mapping's upstream in the background, with `-shadow` appended to the Host (as
//! Envoy does); its response is read and discarded.
//!
//! A shadow never touches the real request: the copy is spawned, never awaited, and bounded by
//! [`MAX_IN_FLIGHT`] copies at once; copies beyond it, copies of upgrades, and copies of requests
//! whose body was not read whole (streamed, or over `retry::REPLAY_CAP`), are dropped and counted
//! (`legate_shadow_requests_total`).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::snapshot::{Prepared, Snapshot};
use crate::metrics::Metrics;
use crate::proxy::body::ReqBody;
use crate::proxy::observe::spans::AttemptTrace;
use crate::proxy::upstream::{retry, Target};
use crate::routes::Group;

/// Shadow copies in flight at once, over all routes.
pub const MAX_IN_FLIGHT: usize = 64;

/// What shadowing has done since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowStats {
    /// Copies started.
    pub sent: u64,
    /// Copies not made: too many in flight, or a body that was not read whole.
    pub dropped: u64,
}

pub(crate) struct Shadows {
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Shadows {
    pub fn new(metrics: Arc<Metrics>) -> Shadows {
        Shadows {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            metrics,
        }
    }

    /// Shadow copies in flight now.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.slots.available_permits()
    }
}

/// The shadow route of `group` if this request is to be copied (its weight is the percentage).
pub(crate) fn pick<'s>(snap: &'s Snapshot, group: &Group) -> Option<&'s Prepared> {
    let (id, pct) = group.shadow?;
    // Independent of the canary roll, so shadowed requests are not tied to one member.
    let roll = (((crate::proxy::headers::rand_u64() >> 32) * 100) >> 32) as u32;
    if roll >= pct {
        return None;
    }
    snap.routes.get(id.0)?.as_ref()
}

impl Shadows {
    /// Start a copy of the request about to go upstream (`parts` after header edits).
    /// With `trace` (a sampled trace), the copy gets its own client span.
    pub(crate) fn copy(
        &self,
        target: &Target,
        parts: &Parts,
        body: &ReqBody,
        pq: &PathAndQuery,
        trace: Option<&AttemptTrace>,
    ) {
        // An upgrade belongs to one connection and cannot be copied.
        let body = body
            .replay()
            .filter(|_| !parts.headers.contains_key(header::UPGRADE));
        let slot = body.and_then(|b| Some((b, self.slots.clone().try_acquire_owned().ok()?)));
        self.metrics.shadow(slot.is_some());
        let Some((body, slot)) = slot else {
            return;
        };
        let mut head = retry::clone_head(parts);
        let host = target
            .host_header
            .clone()
            .or_else(|| head.headers.get(header::HOST).cloned());
        if let Some(h) = host {
            let mut v = h.as_bytes().to_vec();
            v.extend_from_slice(b"-shadow");
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                head.headers.insert(header::HOST, v);
            }
        }
        let span = trace.map(|t| {
            let begun = t.begin(&mut head.headers);
            (begun, t.ctx, t.exporter.clone(), head.method.clone())
        });
        let (target, pq) = (target.clone(), pq.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut peer = None;
            let exchange = async {
                let resp = retry::send_once(&target, head, body, pq, &mut peer).await?;
                let status = resp.status().as_u16();
                // Read to the end so the connection goes back to the pool; nothing is kept.
                let mut b = resp.into_body();
                while let Some(f) = b.frame().await {
                    if f.is_err() {
                        break;
                    }
                }
                Ok::<_, crate::proxy::respond::ProxyError>(status)
            };
            let limit = target.timeout.unwrap_or(target.tunnel_idle);
            let result = match tokio::time::timeout(limit, exchange).await {
                Ok(r) => r,
                Err(_) => Err(crate::proxy::respond::ProxyError::Timeout),
            };
            if let Err(e) = &result {
                tracing::debug!(error = %e, "shadow request failed");
            }
            if let Some((begun, ctx, exporter, method)) = span {
                let outcome = result.as_ref().copied();
                let mut s = begun.finish(&ctx, &method, &target.authority, peer, 0, outcome);
                s.str("legate.shadow", "true");
                exporter.submit(s);
            }
        });
    }
}
