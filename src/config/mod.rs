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
pub mod listener;
pub mod model;
pub mod module;
pub mod oidc;
pub mod routetest;
pub mod schema;
pub mod tlscontext;
pub mod tracingservice;
pub mod traffic;
pub mod tree;
pub mod yaml;

use std::collections::BTreeMap;
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
    /// `--default-timeout-ms`: the `timeout_ms` of Mappings that set none and get none from
    /// the Module's `cluster_request_timeout_ms` (0: no route timeout).
    pub default_timeout_ms: u64,
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
            default_timeout_ms: compile::DEFAULT_TIMEOUT_MS,
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

/// A resource left out of a revision, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    /// Short CamelCase reason: `Invalid` for compile errors and failing route tests, else the
    /// reason the caller's own check or preset gave.
    pub reason: String,
    /// The errors that set it aside.
    pub errors: Vec<Diagnostic>,
}

/// What [`compile_setting_aside`] made of a set of resources.
#[derive(Debug)]
pub struct Screened {
    /// The graph of the resources kept; `None` when errors remain that no resource can be
    /// blamed for.
    pub graph: Option<Graph>,
    /// The resources left out, by index into the input.
    pub aside: BTreeMap<usize, SetAside>,
    /// Every finding of every round, once each, unsorted (warnings already errors under
    /// `--strict`).
    pub diagnostics: Vec<Diagnostic>,
}

/// Compile `resources`, set aside the ones that errors point at (compile errors, failing route
/// tests, and what `check` rejects in a resource that compiled), and compile the rest again,
/// until what is left compiles cleanly. `aside` holds resources left out from the start.
/// `--on-invalid=skip-resource` and the Kubernetes source both judge a revision this way.
pub fn compile_setting_aside(
    resources: &[Resource],
    opts: &Options,
    mut aside: BTreeMap<usize, SetAside>,
    check: &dyn Fn(&Resource) -> Option<(String, Diagnostic)>,
) -> Screened {
    let all: Vec<&Resource> = resources.iter().collect();
    let is_err = |d: &Diagnostic| {
        d.severity == Severity::Error || (opts.strict && d.severity == Severity::Warning)
    };
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    loop {
        let current: Vec<&Resource> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| !aside.contains_key(i))
            .map(|(_, r)| *r)
            .collect();
        let (graph, mut found) = compile::compile_refs_with(&current, &opts.routing);
        if !found.iter().any(is_err) {
            found.extend(routetest::run(&graph, current.iter().copied()));
        }
        if opts.strict {
            promote_warnings(&mut found);
        }
        let mut newly: BTreeMap<usize, SetAside> = BTreeMap::new();
        let mut unblamed = false;
        for d in found.iter().filter(|d| is_err(d)) {
            match owner(&all, d).filter(|i| !aside.contains_key(i)) {
                Some(i) => newly
                    .entry(i)
                    .or_insert_with(|| SetAside {
                        reason: "Invalid".into(),
                        errors: Vec::new(),
                    })
                    .errors
                    .push(d.clone()),
                None => unblamed = true,
            }
        }
        for (i, r) in all.iter().enumerate() {
            if aside.contains_key(&i) {
                continue;
            }
            if let Some((reason, d)) = check(r) {
                found.push(d.clone());
                newly
                    .entry(i)
                    .or_insert_with(|| SetAside {
                        reason,
                        errors: Vec::new(),
                    })
                    .errors
                    .push(d);
            }
        }
        for d in found {
            if !diagnostics.contains(&d) {
                diagnostics.push(d);
            }
        }
        if newly.is_empty() {
            return Screened {
                graph: (!unblamed).then_some(graph),
                aside,
                diagnostics,
            };
        }
        aside.extend(newly);
    }
}

impl Screened {
    /// The revision's outcome: `loaded`'s own findings with the rounds', and the resources
    /// kept.
    pub fn into_outcome(self, loaded: Loaded, opts: &Options) -> Outcome {
        let mut diagnostics = loaded.diagnostics;
        for d in self.diagnostics {
            if !diagnostics.contains(&d) {
                diagnostics.push(d);
            }
        }
        finish(&mut diagnostics, opts);
        let resources = loaded
            .resources
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !self.aside.contains_key(i))
            .map(|(_, r)| r)
            .collect();
        Outcome {
            graph: self.graph.map(Arc::new),
            diagnostics,
            files: loaded.files,
            resources,
        }
    }
}

/// `--on-invalid=skip-resource`: the resources errors point at are left out and reported;
/// schema-invalid documents never became resources.
fn skip_invalid(loaded: Loaded, opts: &Options) -> Outcome {
    compile_setting_aside(&loaded.resources, opts, BTreeMap::new(), &|_| None)
        .into_outcome(loaded, opts)
}

/// `--strict` (warnings become errors), then file-and-position order, duplicates removed.
fn finish(diagnostics: &mut Vec<Diagnostic>, opts: &Options) {
    if opts.strict {
        promote_warnings(diagnostics);
    }
    diagnostics.sort_by(|a, b| {
        (&a.file, a.line, a.column, &a.pointer).cmp(&(&b.file, b.line, b.column, &b.pointer))
    });
    diagnostics.dedup();
}

fn promote_warnings(diagnostics: &mut [Diagnostic]) {
    for d in diagnostics.iter_mut() {
        if d.severity == Severity::Warning {
            d.severity = Severity::Error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one set-aside loop: compile errors (`Invalid`), the caller's check on what compiled,
    /// and a preset, each left out with its reason; the rest compiles.
    #[test]
    fn compile_setting_aside_leaves_out_invalid_checked_and_preset_resources() {
        let doc = |name: &str, spec: &str| {
            format!("---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: {name}\nspec:\n  hostname: '*'\n{spec}")
        };
        let text = doc("good", "  prefix: /good/\n  service: good\n")
            + &doc(
                "bad",
                "  prefix: '/(x'\n  prefix_regex: true\n  service: x\n",
            )
            + &doc("vetoed", "  prefix: /v/\n  service: v\n")
            + &doc("preset", "  prefix: /p/\n  service: p\n");
        let opts = Options::default();
        let loaded = load(&MemTree::new().with("m.yaml", text), &opts);
        let index = |name: &str| {
            loaded
                .resources
                .iter()
                .position(|r| r.name == name)
                .unwrap()
        };
        let preset = SetAside {
            reason: "Preset".into(),
            errors: Vec::new(),
        };
        let veto = |r: &Resource| {
            (r.name == "vetoed").then(|| {
                let d = Diagnostic::error("veto", &r.at("/spec/service"), "not this one");
                ("Vetoed".to_string(), d)
            })
        };
        let s = compile_setting_aside(
            &loaded.resources,
            &opts,
            BTreeMap::from([(index("preset"), preset.clone())]),
            &veto,
        );
        let graph = s.graph.expect("what is left compiles");
        let names: Vec<&str> = graph.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["good"]);
        let bad = &s.aside[&index("bad")];
        assert_eq!(bad.reason, "Invalid");
        assert!(bad.errors.iter().any(|d| d.code == "bad-regex"), "{bad:?}");
        let vetoed = &s.aside[&index("vetoed")];
        assert_eq!(vetoed.reason, "Vetoed");
        assert_eq!(vetoed.errors[0].code, "veto");
        assert_eq!(s.aside[&index("preset")], preset);
        assert!(!s.aside.contains_key(&index("good")));
        assert!(s.diagnostics.iter().any(|d| d.code == "veto"));
    }
}
