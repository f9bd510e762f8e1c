//! The integration-test binary: real binaries, sockets, files, git servers and clients.

// A gateway in another process or on real sockets runs on the wall clock; deadlines of the
// waits around it are measured on that clock too.
#![allow(clippy::disallowed_methods)]

mod acme;
mod ci_recipes;
mod compat;
mod config_cli;
mod dashboard;
mod deploy;
mod diff;
mod edge;
mod emissary;
mod gateway;
mod git_source;
mod golden;
mod h2_upstreams;
mod health;
mod kube;
mod listeners;
mod observability;
mod oidc;
mod otlp;
mod parity;
mod protocols;
mod proxy;
mod reconcile;
mod rollout;
mod security;
mod support;
mod tls;
mod traffic;
