//! Reconcile: take a revision through validate, compile and preflight, then hand the graph to
//! the proxy. This module so far holds the preflight checks that need the outside world.

pub mod preflight;
