//! The health-check supervisors of the live graph's upstreams: started when a graph first
//! checks an upstream, kept across swaps that keep its checks, stopped when no route uses
//! them any more.

use std::sync::{Arc, Mutex};

use super::balance::Balancer;
use super::health::Health;
use super::pool::HostPool;

/// The health-check supervisor of one upstream health state, and the Mappings using it.
struct Checker {
    health: Arc<Health>,
    mappings: Vec<String>,
    pool: Arc<HostPool>,
    balancer: Arc<Balancer>,
    task: Option<tokio::task::AbortHandle>,
    /// The previous graph did not run these checks.
    new: bool,
}

/// Every supervisor running, by health state.
#[derive(Default)]
pub(crate) struct Checkers(Mutex<Vec<Checker>>);

impl Drop for Checkers {
    fn drop(&mut self) {
        let cur = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        for c in cur.iter() {
            if let Some(t) = &c.task {
                t.abort();
            }
        }
    }
}

impl Checkers {
    /// Start the health checkers the routes need (each: its Mapping's name, the pool and the
    /// balancer its checks dial through) and stop those no route uses any more.
    pub fn run<'a>(
        &self,
        routes: impl Iterator<Item = (String, &'a (Arc<HostPool>, Arc<Balancer>))>,
    ) {
        let mut want: Vec<Checker> = Vec::new();
        for (name, b) in routes {
            let Some(h) = &b.1.health else { continue };
            match want.iter_mut().find(|c| Arc::ptr_eq(&c.health, h)) {
                Some(c) => c.mappings.push(name),
                None => want.push(Checker {
                    health: h.clone(),
                    mappings: vec![name],
                    pool: b.0.clone(),
                    balancer: b.1.clone(),
                    task: None,
                    new: true,
                }),
            }
        }
        let mut cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for c in want.iter_mut() {
            if let Some(i) = cur.iter().position(|o| Arc::ptr_eq(&o.health, &c.health)) {
                c.task = cur.swap_remove(i).task.take();
                c.new = false;
            }
            if c.task.is_none() {
                // No runtime (e.g. a synchronous test): nothing can run the checks.
                if tokio::runtime::Handle::try_current().is_ok() {
                    c.task = Some(c.health.spawn_checkers(c.pool.clone(), c.balancer.clone()));
                }
            }
        }
        // What is left belongs to upstreams the new graph does not check: stop it.
        for old in cur.drain(..) {
            if let Some(t) = &old.task {
                t.abort();
            }
        }
        *cur = want;
    }

    /// Why upstreams the live graph checks and the previous one did not (a new upstream, or
    /// new checks) are down: every address fails its health checks. Checks the previous graph
    /// already ran are left out: the new revision did not change them, so their failure must
    /// not block it (e.g. a fix elsewhere while that upstream is down).
    pub fn unhealthy(&self) -> Vec<String> {
        let cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cur.iter()
            .filter(|c| c.new)
            .filter_map(|c| {
                c.health.all_down().map(|why| {
                    format!(
                        "{}: upstream {} is unhealthy: {why}",
                        c.mappings.join(", "),
                        c.health.label
                    )
                })
            })
            .collect()
    }

    /// Health-check supervisors running now (tests: none leak across swaps).
    pub fn running(&self) -> usize {
        let cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cur.iter()
            .filter(|c| c.task.as_ref().is_some_and(|t| !t.is_finished()))
            .count()
    }
}
