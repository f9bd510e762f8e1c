//! Configuration: read a tree of YAML, check it against the JSON Schemas, compile it.
//!
//! Owns: the file tree walk and its limits (`tree`), the YAML front end (`yaml`), schema
//! validation (`schema`), the raw resource model (`model`) and `compile`, the only way to build
//! a `routes::Graph`. Pure: no tokio, no sockets; `legate check`, `legate diff` and the
//! reconciler all call [`load_and_compile`], so a pull request sees what the gateway will do.

pub mod annotations;
pub mod compile;
pub mod convert;
pub mod crd;
pub mod diag;
pub mod guard;
pub mod model;
pub mod module;
pub mod routetest;
pub mod schema;
pub mod tlscontext;
pub mod tracingservice;
pub mod traffic;
pub mod tree;
pub mod yaml;

use std::sync::Arc;

pub use compile::compile;
pub use diag::{Counts, Diagnostic, Location, Severity};
pub use model::{load, Loaded, Resource};
pub use tree::{ConfigTree, DirTree, MemTree, TreeLimits, TreeOptions};

use crate::routes::Graph;

/// Options that change how a revision is read and judged.
#[derive(Debug, Clone)]
pub struct Options {
    pub tree: TreeOptions,
    /// Namespace for resources without `metadata.namespace`.
    pub namespace: String,
    /// This gateway's `ambassador_id`.
    pub ambassador_id: String,
    /// Warnings count as errors.
    pub strict: bool,
    /// Compile the valid resources even when others are invalid (`--on-invalid=skip-resource`;
    /// Kubernetes mode). The invalid ones are still reported as errors and left out.
    pub skip_invalid: bool,
    /// How the compiled graph routes (label-selector strictness, host-port stripping).
    pub routing: crate::routes::RoutingOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tree: TreeOptions::default(),
            namespace: "default".into(),
            ambassador_id: "default".into(),
            strict: false,
            skip_invalid: false,
            routing: crate::routes::RoutingOptions::default(),
        }
    }
}

/// The result of reading, validating and compiling one revision.
#[derive(Debug)]
pub struct Outcome {
    /// The compiled graph, present when there are no errors (warnings under `--strict` count).
    pub graph: Option<Arc<Graph>>,
    /// Every finding, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// Number of YAML files read.
    pub files: usize,
    /// The resources that were loaded (Mappings and Hosts for this gateway).
    pub resources: Vec<Resource>,
}

impl Outcome {
    pub fn counts(&self) -> Counts {
        Counts::of(&self.diagnostics)
    }

    pub fn is_ok(&self) -> bool {
        self.graph.is_some()
    }
}

/// Read `tree`, validate every document and compile the whole revision.
pub fn load_and_compile(tree: &dyn ConfigTree, opts: &Options) -> Outcome {
    let loaded = load(tree, opts);
    if opts.skip_invalid {
        return skip_invalid(loaded, opts);
    }
    let (graph, mut diagnostics) = {
        let refs: Vec<&Resource> = loaded.resources.iter().collect();
        let (g, d) = compile::compile_refs_with(&refs, &opts.routing);
        let mut all = loaded.diagnostics;
        all.extend(d);
        (g, all)
    };
    // Route tests judge the routes only when the routes themselves compiled cleanly.
    if !diagnostics.iter().any(|d| d.severity == Severity::Error) {
        diagnostics.extend(routetest::run(&graph, &loaded.resources));
    }
    finish(&mut diagnostics, opts);
    let errors = diagnostics.iter().any(|d| d.severity == Severity::Error);
    Outcome {
        graph: if errors { None } else { Some(Arc::new(graph)) },
        diagnostics,
        files: loaded.files,
        resources: loaded.resources,
    }
}

/// Convenience for a plain directory.
pub fn check_dir(path: &std::path::Path, opts: &Options) -> Outcome {
    load_and_compile(&DirTree::new(path), opts)
}

/// The resource whose document holds `d`: same file, the last resource document starting at
/// or before its line. Only for findings of `compile` and route tests, which always point
/// inside a resource's own document.
fn owner(resources: &[&Resource], d: &Diagnostic) -> Option<usize> {
    resources
        .iter()
        .enumerate()
        .filter(|(_, r)| r.loc.file == d.file && r.doc.pos.line <= d.line)
        .max_by_key(|(_, r)| r.doc.pos.line)
        .map(|(i, _)| i)
}

/// Leave out the resources that compile errors or failing route tests point at, and compile
/// the rest, until it compiles cleanly. Schema-invalid documents never became resources.
fn skip_invalid(loaded: Loaded, opts: &Options) -> Outcome {
    let all: Vec<&Resource> = loaded.resources.iter().collect();
    let mut keep = vec![true; all.len()];
    let mut diagnostics = loaded.diagnostics.clone();
    let is_err = |d: &Diagnostic| {
        d.severity == Severity::Error || (opts.strict && d.severity == Severity::Warning)
    };
    let graph = loop {
        let current: Vec<&Resource> = all
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| *r)
            .collect();
        let (graph, mut found) = compile::compile_refs_with(&current, &opts.routing);
        if !found.iter().any(is_err) {
            found.extend(routetest::run(&graph, current.iter().copied()));
        }
        let bad: Vec<usize> = found
            .iter()
            .filter(|d| is_err(d))
            .filter_map(|d| owner(&all, d))
            .collect();
        for d in found {
            if !diagnostics.contains(&d) {
                diagnostics.push(d);
            }
        }
        let newly: Vec<usize> = bad.into_iter().filter(|&i| keep[i]).collect();
        if newly.is_empty() {
            break graph;
        }
        for i in newly {
            keep[i] = false;
        }
    };
    finish(&mut diagnostics, opts);
    let resources = loaded
        .resources
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(r, _)| r.clone())
        .collect();
    Outcome {
        graph: Some(Arc::new(graph)),
        diagnostics,
        files: loaded.files,
        resources,
    }
}

/// `--strict` (warnings become errors), then file-and-position order, duplicates removed.
fn finish(diagnostics: &mut Vec<Diagnostic>, opts: &Options) {
    if opts.strict {
        for d in diagnostics.iter_mut() {
            if d.severity == Severity::Warning {
                d.severity = Severity::Error;
            }
        }
    }
    diagnostics.sort_by(|a, b| {
        (&a.file, a.line, a.column, &a.pointer).cmp(&(&b.file, b.line, b.column, &b.pointer))
    });
    diagnostics.dedup();
}
