//! How long the configuration source takes to produce a revision (a git fetch and resolve, a
//! directory read, a Kubernetes snapshot), by source kind and outcome, with its exposition.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::{head, histogram};

/// Source kinds, as [`crate::source::Source::kind`] names them.
const KINDS: [&str; 4] = ["git", "dir", "kubernetes", "other"];
const OUTCOMES: [&str; 2] = ["success", "failure"];
/// Upper bounds of the buckets, in milliseconds (5 ms .. 60 s: a fetch timeout is 60 s).
const BUCKETS_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 15_000, 60_000,
];

#[derive(Debug, Default)]
struct Histogram {
    /// Non-cumulative; `render` accumulates them.
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Fetch durations by source kind and outcome.
#[derive(Debug, Default)]
pub(super) struct FetchStats {
    by: [[Histogram; OUTCOMES.len()]; KINDS.len()],
}

impl FetchStats {
    pub fn observe(&self, kind: &str, ok: bool, took: Duration) {
        let k = KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(KINDS.len() - 1);
        let h = &self.by[k][usize::from(!ok)];
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = BUCKETS_MS.iter().position(|b| us <= b * 1_000) {
            h.buckets[i].fetch_add(1, Relaxed);
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_us.fetch_add(us, Relaxed);
    }

    /// Append `legate_source_fetch_duration_seconds`; only kind/outcome pairs seen so far.
    pub fn render(&self, out: &mut String) {
        const NAME: &str = "legate_source_fetch_duration_seconds";
        head(
            out,
            NAME,
            "histogram",
            "Time the source took to produce a revision (git: fetch and resolve), by source and outcome.",
        );
        for (k, kind) in KINDS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let h = &self.by[k][o];
                let count = h.count.load(Relaxed);
                if count == 0 {
                    continue;
                }
                histogram(
                    out,
                    NAME,
                    &format!("source=\"{kind}\",outcome=\"{outcome}\","),
                    BUCKETS_MS.iter().map(|b| *b as f64 / 1e3),
                    &h.buckets,
                    count,
                    h.sum_us.load(Relaxed),
                );
            }
        }
    }
}
