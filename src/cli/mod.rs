//! The command line: `check`, `routes`, `schema`, `run`. Parses flags and calls the library;
//! output formats live here, decisions do not.

/// `print!` that ends the process quietly when stdout is closed (`legate routes | head`),
/// instead of panicking as `print!` does.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::write_stdout(&format!($($arg)*)) };
}
macro_rules! outln {
    () => { $crate::cli::write_stdout("\n") };
    ($($arg:tt)*) => { $crate::cli::write_stdout(&(format!($($arg)*) + "\n")) };
}

pub mod output;
pub mod remote;
pub mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Options, TreeLimits, TreeOptions};

/// Legate: an API gateway whose configuration lives in git.
#[derive(Debug, Parser)]
#[command(name = "legate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format of the gateway's own logs.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "LEGATE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config tree: schema, semantics, optionally TLS secrets. Exit 0 valid, 1 errors, 2 usage/I-O.
    Check(CheckArgs),
    /// Print the compiled route table in match order.
    Routes(RoutesArgs),
    /// Print the resource schemas, or the fields and their implementation status.
    Schema(SchemaArgs),
    /// Show what a change does to the routes: BASE and HEAD are git revisions (of --repo) or directories.
    Diff(DiffArgs),
    /// Print or write the Kubernetes CRDs generated from the schemas.
    Crds(CrdsArgs),
    /// Run the gateway.
    Run(Box<run::RunArgs>),
    /// A running gateway's live revision, last attempt and mode (admin API).
    Status(remote::Remote),
    /// A running gateway's revision history.
    Revisions(remote::Remote),
    /// Make a running gateway fetch and reconcile now.
    Sync(remote::Remote),
    /// Make a running gateway serve this revision and stop following its source.
    Pin(remote::PinArgs),
    /// Make a running gateway follow its source again.
    Unpin(remote::Remote),
    /// Which Mapping a running gateway would pick for a request, and why.
    Explain(remote::ExplainArgs),
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Write one file per CRD into this directory (e.g. deploy/crds) instead of printing.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Flags shared by every command that reads a config tree.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Namespace for resources without metadata.namespace.
    #[arg(long, default_value = "default", env = "LEGATE_NAMESPACE")]
    pub namespace: String,
    /// This gateway's ambassador_id; resources for other ids are skipped.
    #[arg(long, default_value = "default", env = "LEGATE_AMBASSADOR_ID")]
    pub ambassador_id: String,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
    /// Only read files matching these globs (relative to the root; repeatable).
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// Skip files matching these globs (repeatable).
    #[arg(long = "exclude", value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Largest YAML file read, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_file_bytes: u64,
    /// Largest total of YAML in one revision, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_revision_bytes: u64,
    /// What an invalid resource does to its revision: reject the whole revision (default), or
    /// apply the valid resources and report the invalid ones.
    #[arg(long, value_enum, default_value = "reject", env = "LEGATE_ON_INVALID")]
    pub on_invalid: OnInvalid,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OnInvalid {
    Reject,
    SkipResource,
}

impl ConfigArgs {
    pub fn options(&self) -> Options {
        Options {
            tree: TreeOptions {
                limits: TreeLimits {
                    max_file_bytes: self.max_file_bytes,
                    max_total_bytes: self.max_revision_bytes,
                },
                include: self.include.clone(),
                exclude: self.exclude.clone(),
            },
            namespace: self.namespace.clone(),
            ambassador_id: self.ambassador_id.clone(),
            strict: self.strict,
            skip_invalid: self.on_invalid == OnInvalid::SkipResource,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CheckFormat {
    Text,
    Json,
    /// GitHub Actions workflow annotations.
    Github,
    /// GitLab Code Quality report (JSON array).
    Gitlab,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config root (directory or single file).
    #[arg(default_value = ".")]
    pub path: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Also check that the TLS secrets Hosts name exist here (`<dir>/<name>/tls.crt|tls.key`).
    #[arg(long, env = "LEGATE_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: CheckFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TableFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RoutesArgs {
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// Show the table a running gateway serves (admin API) instead of compiling PATH.
    #[arg(long)]
    pub live: bool,
    #[command(flatten)]
    pub remote: remote::Remote,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub format: TableFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DiffFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The revision before the change: a git revision (branch, tag, commit) or a directory.
    pub base: String,
    /// The revision after the change.
    pub head: String,
    /// The git repository for revision arguments (default: the one containing the current directory).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Subdirectory of the repository (or of each directory) holding the config.
    #[arg(long)]
    pub path: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[arg(long, value_enum, default_value = "text")]
    pub format: DiffFormat,
    /// Exit 1 when routes changed and 0 when they did not (as `git diff --exit-code`).
    #[arg(long)]
    pub exit_code: bool,
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// `mapping` or `host`; all kinds when omitted.
    pub kind: Option<String>,
    /// Print the JSON Schema itself instead of the field table.
    #[arg(long)]
    pub json: bool,
}

/// Run the CLI; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Check(a) => check(a),
        Command::Routes(a) => routes(a),
        Command::Schema(a) => schema(a),
        Command::Diff(a) => diff(a),
        Command::Crds(a) => crds(a),
        Command::Status(r) => remote::run(remote::Call::Status, &r),
        Command::Revisions(r) => remote::run(remote::Call::Revisions, &r),
        Command::Sync(r) => remote::run(remote::Call::Sync, &r),
        Command::Pin(a) => remote::run(remote::Call::Pin(&a.revision), &a.remote),
        Command::Unpin(r) => remote::run(remote::Call::Unpin, &r),
        Command::Explain(a) => remote::run(remote::Call::Explain(&a), &a.remote),
        Command::Run(a) => {
            let cfg = a.config.options();
            run::run(*a, cfg)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("legate: {e:#}");
            2
        }
    }
}

fn check(a: CheckArgs) -> anyhow::Result<i32> {
    if !a.path.exists() {
        anyhow::bail!("{}: no such file or directory", a.path.display());
    }
    let opts = a.config.options();
    let mut outcome = config::check_dir(&a.path, &opts);
    if let Some(dir) = &a.secrets_dir {
        let extra = crate::reconcile::preflight::check_secrets(&outcome.resources, dir);
        let failed = extra.iter().any(|d| d.severity == config::Severity::Error);
        outcome.diagnostics.extend(extra);
        if failed {
            outcome.graph = None;
        }
    }
    output::print_check(&outcome, a.format, &a.path);
    Ok(if outcome.is_ok() { 0 } else { 1 })
}

fn routes(a: RoutesArgs) -> anyhow::Result<i32> {
    if a.live {
        return remote::run(remote::Call::Routes, &a.remote);
    }
    if !a.path.exists() {
        anyhow::bail!("{}: no such file or directory", a.path.display());
    }
    let outcome = config::check_dir(&a.path, &a.config.options());
    let Some(graph) = &outcome.graph else {
        output::print_check(&outcome, CheckFormat::Text, &a.path);
        return Ok(1);
    };
    for d in outcome
        .diagnostics
        .iter()
        .filter(|d| d.severity >= config::Severity::Warning)
    {
        eprintln!("{d}");
    }
    match a.format {
        TableFormat::Text => out!("{}", output::route_table(graph)),
        TableFormat::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&output::route_table_json(graph))?
        ),
    }
    Ok(0)
}

fn schema(a: SchemaArgs) -> anyhow::Result<i32> {
    use config::schema::{fields, Kind};
    let kinds: Vec<Kind> = match a.kind.as_deref() {
        None => Kind::ALL.to_vec(),
        Some(k) => match Kind::ALL
            .into_iter()
            .find(|x| x.name().eq_ignore_ascii_case(k))
        {
            Some(x) => vec![x],
            None => anyhow::bail!(
                "unknown kind `{k}`: use one of {}",
                Kind::ALL.map(|k| k.name().to_lowercase()).join(", ")
            ),
        },
    };
    for k in kinds {
        if a.json {
            outln!("{}", k.schema_text().trim_end());
            continue;
        }
        outln!("{} ({})", k.name(), k.schema_file());
        for f in fields(k) {
            let status = format!("{:?}", f.status).to_ascii_lowercase();
            out!("  {:<36} {:<12} {}", f.name, status, f.description);
            if let Some(n) = &f.note {
                out!(" [{n}]");
            }
            outln!();
        }
        outln!();
    }
    Ok(0)
}

/// Compile one side of a diff: a directory, or a git revision of `repo`.
fn diff_side(
    spec: &str,
    a: &DiffArgs,
    opts: &Options,
) -> anyhow::Result<(String, config::Outcome)> {
    let as_dir = std::path::Path::new(spec);
    if as_dir.is_dir() {
        let root = match &a.path {
            Some(sub) => as_dir.join(sub),
            None => as_dir.to_path_buf(),
        };
        return Ok((spec.to_string(), config::check_dir(&root, opts)));
    }
    let repo = git2::Repository::discover(&a.repo).map_err(|e| {
        anyhow::anyhow!(
            "`{spec}` is not a directory, and {} is not in a git repository: {}",
            a.repo.display(),
            e.message()
        )
    })?;
    let commit = repo
        .revparse_single(spec)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| {
            anyhow::anyhow!(
                "`{spec}` is neither a directory nor a revision of {}: {}",
                repo.path().display(),
                e.message()
            )
        })?;
    let label = format!("{spec} ({})", &commit.id().to_string()[..12]);
    let tree = crate::source::git::GitTree {
        repo: repo.path().to_path_buf(),
        commit: commit.id(),
        subdir: a.path.clone(),
    };
    Ok((label, config::load_and_compile(&tree, opts)))
}

/// The route timeout covers whole responses: point out the head side's stream-looking Mappings
/// that keep one and did not in the base (on stderr, so the diff itself stays as it is).
fn warn_new_stream_timeouts(base: &config::Outcome, head: &config::Outcome) {
    let key = |d: &config::Diagnostic| (d.file.clone(), d.pointer.clone(), d.message.clone());
    let old: std::collections::HashSet<_> = base
        .diagnostics
        .iter()
        .filter(|d| d.code == "stream-timeout")
        .map(key)
        .collect();
    for d in head
        .diagnostics
        .iter()
        .filter(|d| d.code == "stream-timeout")
    {
        if !old.contains(&key(d)) {
            eprintln!("{d}");
        }
    }
}

fn diff(a: DiffArgs) -> anyhow::Result<i32> {
    let opts = a.config.options();
    let (bl, base) = diff_side(&a.base, &a, &opts)?;
    let (hl, head) = diff_side(&a.head, &a, &opts)?;
    let mut invalid = false;
    for (label, side) in [(&bl, &base), (&hl, &head)] {
        if !side.is_ok() {
            invalid = true;
            eprintln!("{label} does not validate:");
            for d in side
                .diagnostics
                .iter()
                .filter(|d| d.severity == config::Severity::Error)
            {
                eprintln!("  {d}");
            }
        }
    }
    let (Some(bg), Some(hg)) = (&base.graph, &head.graph) else {
        debug_assert!(invalid);
        return Ok(2);
    };
    let d = crate::diff::diff(bg, hg);
    warn_new_stream_timeouts(&base, &head);
    let out = match a.format {
        DiffFormat::Text => crate::diff::render::text(&d),
        DiffFormat::Markdown => crate::diff::render::markdown(&d),
        DiffFormat::Json => crate::diff::render::json(&d),
    };
    out!("{out}");
    if a.format == DiffFormat::Json {
        outln!();
    }
    Ok(if a.exit_code && !d.is_empty() { 1 } else { 0 })
}

/// The generated CRD files: (file name, YAML text).
pub fn crd_files() -> Vec<(String, String)> {
    use config::schema::Kind;
    Kind::ALL
        .iter()
        .map(|k| {
            let text = format!(
                "# Generated by `legate crds` from {}; do not edit.\n{}",
                k.schema_file(),
                config::yaml::to_yaml(&config::crd::crd(*k))
            );
            (format!("{}.legate.dev.yaml", config::crd::plural(*k)), text)
        })
        .collect()
}

fn crds(a: CrdsArgs) -> anyhow::Result<i32> {
    let files = crd_files();
    match a.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for (name, text) in files {
                std::fs::write(dir.join(&name), text)?;
                eprintln!("wrote {}", dir.join(&name).display());
            }
        }
        None => {
            for (i, (_, text)) in files.iter().enumerate() {
                if i > 0 {
                    outln!("---");
                }
                out!("{text}");
            }
        }
    }
    Ok(0)
}

/// Write to stdout; a closed pipe ends the process with the shell's SIGPIPE status.
pub fn write_stdout(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("legate: cannot write output: {e}");
        std::process::exit(2);
    }
}
