//! Config trees: where the YAML files of a revision come from.
//!
//! A [`ConfigTree`] yields the YAML files of one revision with their bytes. [`DirTree`] reads a
//! directory; the git source reads a tree object through the same trait. The shared rules live
//! here: which files count (`*.yaml`/`*.yml`, dot-directories skipped, include/exclude globs),
//! size limits per file and per revision, and symlinks that must not leave the root.

use std::fs;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::diag::{Diagnostic, Location};

/// Size limits that keep one revision from exhausting memory.
#[derive(Debug, Clone, Copy)]
pub struct TreeLimits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for TreeLimits {
    fn default() -> Self {
        TreeLimits {
            max_file_bytes: 1 << 20,
            max_total_bytes: 16 << 20,
        }
    }
}

/// Which files of a tree are config.
#[derive(Debug, Clone, Default)]
pub struct TreeOptions {
    pub limits: TreeLimits,
    /// Globs (relative paths, `/`-separated); when non-empty a file must match one.
    pub include: Vec<String>,
    /// Globs; a matching file is skipped.
    pub exclude: Vec<String>,
}

/// One YAML file of a revision.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the config root, `/`-separated.
    pub path: String,
    pub text: String,
}

/// The files of one revision and what was wrong with the ones that could not be read.
#[derive(Debug, Default)]
pub struct TreeRead {
    pub files: Vec<SourceFile>,
    pub diagnostics: Vec<Diagnostic>,
}

/// A source of config files.
pub trait ConfigTree {
    /// Read every config file, applying `opts`. Problems with single files become diagnostics;
    /// only a root that cannot be read at all is an `Err`.
    fn read(&self, opts: &TreeOptions) -> Result<TreeRead, String>;
}

/// Compiled include/exclude rules, shared by every tree kind.
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Filter {
    pub fn new(opts: &TreeOptions) -> Result<Filter, String> {
        let build = |globs: &[String]| -> Result<GlobSet, String> {
            let mut b = GlobSetBuilder::new();
            for g in globs {
                b.add(Glob::new(g).map_err(|e| format!("bad glob `{g}`: {e}"))?);
            }
            b.build().map_err(|e| e.to_string())
        };
        Ok(Filter {
            include: if opts.include.is_empty() {
                None
            } else {
                Some(build(&opts.include)?)
            },
            exclude: build(&opts.exclude)?,
        })
    }

    /// Whether a directory is entered (dot-directories such as `.git` and `.github` are not).
    pub fn enters_dir(&self, name: &str) -> bool {
        !name.starts_with('.')
    }

    /// Whether a file at `rel` is config.
    pub fn accepts_file(&self, rel: &str) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            return false;
        }
        if let Some(inc) = &self.include {
            if !inc.is_match(rel) {
                return false;
            }
        }
        !self.exclude.is_match(rel)
    }
}

/// Size accounting and text decoding shared by every tree kind.
pub struct Budget {
    limits: TreeLimits,
    used: u64,
    over_total: bool,
}

impl Budget {
    pub fn new(limits: TreeLimits) -> Budget {
        Budget {
            limits,
            used: 0,
            over_total: false,
        }
    }

    /// Check a file's size before reading it. `Err` carries the diagnostic.
    // A diagnostic is a cold-path value; boxing it would only add noise at every call site.
    #[allow(clippy::result_large_err)]
    pub fn admit(&mut self, rel: &str, size: u64) -> Result<(), Diagnostic> {
        let loc = file_loc(rel);
        if size > self.limits.max_file_bytes {
            return Err(Diagnostic::error(
                "file-too-large",
                &loc,
                format!(
                    "file is {} bytes, over the limit of {} bytes per file",
                    size, self.limits.max_file_bytes
                ),
            )
            .with_help("split it, move it out of the config path, or raise --max-file-bytes"));
        }
        if self.used + size > self.limits.max_total_bytes {
            let first = !self.over_total;
            self.over_total = true;
            return Err(Diagnostic::error(
                "revision-too-large",
                &loc,
                format!(
                    "the revision's YAML exceeds {} bytes in total{}",
                    self.limits.max_total_bytes,
                    if first {
                        ""
                    } else {
                        " (this file also skipped)"
                    }
                ),
            )
            .with_help("narrow the tree with --include/--exclude or raise --max-revision-bytes"));
        }
        self.used += size;
        Ok(())
    }

    /// Decode a file's bytes as UTF-8 text.
    #[allow(clippy::result_large_err)]
    pub fn decode(rel: &str, bytes: Vec<u8>) -> Result<SourceFile, Diagnostic> {
        let loc = file_loc(rel);
        if bytes.contains(&0) {
            return Err(Diagnostic::error(
                "binary-file",
                &loc,
                "file holds NUL bytes: it is binary, not YAML",
            )
            .with_help("remove it from the config path or exclude it with --exclude"));
        }
        match String::from_utf8(bytes) {
            Ok(mut text) => {
                if text.starts_with('\u{feff}') {
                    text.drain(..3);
                }
                Ok(SourceFile {
                    path: rel.to_string(),
                    text,
                })
            }
            Err(e) => {
                let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                Err(Diagnostic::error(
                    "not-utf8",
                    &Location {
                        file: rel.to_string(),
                        line,
                        column: 1,
                        pointer: String::new(),
                    },
                    "file is not valid UTF-8 text",
                )
                .with_help("save it as UTF-8"))
            }
        }
    }
}

fn file_loc(rel: &str) -> Location {
    Location {
        file: rel.to_string(),
        line: 1,
        column: 1,
        pointer: String::new(),
    }
}

/// A plain directory on disk.
#[derive(Debug, Clone)]
pub struct DirTree {
    root: PathBuf,
}

impl DirTree {
    pub fn new(root: impl Into<PathBuf>) -> DirTree {
        DirTree { root: root.into() }
    }
}

impl ConfigTree for DirTree {
    fn read(&self, opts: &TreeOptions) -> Result<TreeRead, String> {
        let meta = fs::metadata(&self.root)
            .map_err(|e| format!("cannot read {}: {e}", self.root.display()))?;
        let filter = Filter::new(opts)?;
        let mut out = TreeRead::default();
        let mut budget = Budget::new(opts.limits);
        let root = fs::canonicalize(&self.root)
            .map_err(|e| format!("cannot resolve {}: {e}", self.root.display()))?;
        if meta.is_file() {
            // A single file given as the tree.
            let name = self
                .root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            read_file(&root, &name, &mut budget, &mut out);
            return Ok(out);
        }
        let mut stack = vec![(root.clone(), String::new())];
        // Symlinked directories may form loops: enter each real directory once.
        let mut visited = std::collections::HashSet::new();
        while let Some((dir, rel_dir)) = stack.pop() {
            if !visited.insert(dir.clone()) {
                continue;
            }
            let mut entries: Vec<_> = match fs::read_dir(&dir) {
                Ok(rd) => rd.filter_map(Result::ok).collect(),
                Err(e) => {
                    out.diagnostics.push(Diagnostic::error(
                        "unreadable",
                        &file_loc(&rel_dir),
                        format!("cannot read directory: {e}"),
                    ));
                    continue;
                }
            };
            entries.sort_by_key(|e| e.file_name());
            for entry in entries.into_iter().rev() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = if rel_dir.is_empty() {
                    name.clone()
                } else {
                    format!("{rel_dir}/{name}")
                };
                let Ok(ft) = entry.file_type() else { continue };
                let mut path = entry.path();
                let mut is_dir = ft.is_dir();
                if ft.is_symlink() {
                    match check_symlink(&root, &path) {
                        Ok(target) => {
                            is_dir = target.is_dir();
                            path = target;
                        }
                        Err(msg) => {
                            // Only report links that would have been read as config or entered.
                            let relevant = filter.accepts_file(&rel)
                                || fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
                            if relevant && filter.enters_dir(&name) {
                                out.diagnostics.push(
                                    Diagnostic::error("symlink-escape", &file_loc(&rel), msg)
                                        .with_help(
                                            "replace the link with the file itself, or point it inside the config root",
                                        ),
                                );
                            }
                            continue;
                        }
                    }
                }
                if is_dir {
                    if filter.enters_dir(&name) {
                        stack.push((path, rel));
                    }
                } else if filter.accepts_file(&rel) {
                    read_file(&path, &rel, &mut budget, &mut out);
                }
            }
        }
        out.files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

fn read_file(path: &Path, rel: &str, budget: &mut Budget, out: &mut TreeRead) {
    let size = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) => {
            out.diagnostics.push(Diagnostic::error(
                "unreadable",
                &file_loc(rel),
                format!("cannot read file: {e}"),
            ));
            return;
        }
    };
    if let Err(d) = budget.admit(rel, size) {
        out.diagnostics.push(d);
        return;
    }
    // Read at most the limit even if the file grew since the size check.
    use std::io::Read;
    let mut bytes = Vec::with_capacity(size as usize);
    let res = fs::File::open(path).and_then(|f| {
        f.take(budget.limits.max_file_bytes + 1)
            .read_to_end(&mut bytes)
    });
    if let Err(e) = res {
        out.diagnostics.push(Diagnostic::error(
            "unreadable",
            &file_loc(rel),
            format!("cannot read file: {e}"),
        ));
        return;
    }
    if bytes.len() as u64 > budget.limits.max_file_bytes {
        if let Err(d) = budget.admit(rel, bytes.len() as u64) {
            out.diagnostics.push(d);
        }
        return;
    }
    match Budget::decode(rel, bytes) {
        Ok(f) => out.files.push(f),
        Err(d) => out.diagnostics.push(d),
    }
}

/// Resolve a symlink, refusing absolute targets and targets outside `root`.
fn check_symlink(root: &Path, link: &Path) -> Result<PathBuf, String> {
    let target = fs::read_link(link).map_err(|e| format!("cannot read symlink: {e}"))?;
    if target.is_absolute() {
        return Err(format!(
            "symlink to the absolute path `{}` is not allowed: config must stay inside the repository",
            target.display()
        ));
    }
    // Lexical check first (works for dangling links), then the real path.
    let parent = link.parent().unwrap_or(root);
    let mut lexical = parent.to_path_buf();
    for c in target.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::Normal(p) => lexical.push(p),
            _ => {}
        }
    }
    if !lexical.starts_with(root) {
        return Err(format!(
            "symlink to `{}` leaves the config root",
            target.display()
        ));
    }
    let real = fs::canonicalize(link).map_err(|e| format!("dangling symlink: {e}"))?;
    if !real.starts_with(root) {
        return Err(format!(
            "symlink to `{}` leaves the config root",
            target.display()
        ));
    }
    Ok(real)
}

/// An in-memory tree: for tests, benchmarks and sources that assemble files themselves.
#[derive(Debug, Clone, Default)]
pub struct MemTree {
    pub files: Vec<(String, Vec<u8>)>,
}

impl MemTree {
    pub fn new() -> MemTree {
        MemTree::default()
    }

    pub fn with(mut self, path: &str, text: impl Into<Vec<u8>>) -> MemTree {
        self.files.push((path.to_string(), text.into()));
        self
    }
}

impl ConfigTree for MemTree {
    fn read(&self, opts: &TreeOptions) -> Result<TreeRead, String> {
        let filter = Filter::new(opts)?;
        let mut budget = Budget::new(opts.limits);
        let mut out = TreeRead::default();
        let mut files = self.files.clone();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, bytes) in files {
            if path.split('/').any(|seg| seg.starts_with('.')) || !filter.accepts_file(&path) {
                continue;
            }
            if let Err(d) = budget.admit(&path, bytes.len() as u64) {
                out.diagnostics.push(d);
                continue;
            }
            match Budget::decode(&path, bytes) {
                Ok(f) => out.files.push(f),
                Err(d) => out.diagnostics.push(d),
            }
        }
        Ok(out)
    }
}
