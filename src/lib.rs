//! Legate: an API gateway whose configuration lives in git.
//!
//! The data flow is the module tree:
//! `source` (git, dir) -> revision -> `config` (parse, schema, compile) -> `routes::Graph`
//! -> `reconcile` (swap, verify, roll back, record) -> `proxy` (reads the current graph per
//! request; `guard` checks a route's AuthService, JWT and rate limits, keeping their live state
//! in a registry the proxy owns, so the graph holds plain values only). `admin` and `cli` read
//! the recorded status; `legate check` reuses `config` and `routes` with no server. `outbound` is
//! the one HTTP client for the gateway's own calls; `otlp` exports the spans the proxy records
//! through it. `scripts/check-module-cycles.py` keeps the
//! top-level modules free of import cycles.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod diff;
pub mod guard;
pub mod metrics;
pub mod notifications;
pub mod otlp;
pub mod outbound;
pub mod proxy;
pub mod reconcile;
pub mod routes;
pub mod source;
pub mod tls;
