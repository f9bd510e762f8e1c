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
    /// Rewrite getambassador.io/v2 (and v1) resources as v3alpha1, as Emissary converts them.
    Convert(ConvertArgs),
    /// Run the gateway.
    Run(Box<run::RunArgs>),
    /// A running gateway's live revision, last attempt and mode (admin API).
    Status(remote::Remote),
    /// A running gateway's revision history.
    Revisions(remote::Remote),
    /// Make a running gateway fetch and reconcile now. Answers when the revision is swapped
    /// in (`verifying`); with --wait, when its verification window has a verdict.
    Sync(remote::WaitArgs),
    /// Make a running gateway serve this revision and stop following its source.
    Pin(remote::PinArgs),
    /// Make a running gateway follow its source again.
    Unpin(remote::WaitArgs),
    /// Which Mapping a running gateway would pick for a request, and why.
    Explain(remote::ExplainArgs),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// A YAML file, or a directory searched for `*.yaml`/`*.yml` files.
    pub path: PathBuf,
    /// Rewrite the files in place instead of printing the converted text.
    #[arg(long)]
    pub write: bool,
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
    /// Emissary's opt-out of strict label selectors (same environment variable): a Host with a
    /// mappingSelector then takes a Mapping whose hostname OR labels match, and one matching
    /// label is enough. Default: both must match, and every label.
    #[arg(long, env = "DISABLE_STRICT_LABEL_SELECTORS")]
    pub disable_strict_label_selectors: bool,
    /// Request timeout of Mappings that set no `timeout_ms` and get none from the Module's
    /// `cluster_request_timeout_ms`, in milliseconds (Emissary's 3000 by default; 0: none).
    #[arg(long, env = "LEGATE_DEFAULT_TIMEOUT_MS", default_value_t = 3000)]
    pub default_timeout_ms: u64,
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
            default_timeout_ms: self.default_timeout_ms,
            routing: crate::routes::RoutingOptions {
                loose_label_selectors: self.disable_strict_label_selectors,
                ..Default::default()
            },
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
    /// Also check that the TLS secrets Hosts name exist here (`<dir>/<name>/tls.crt|tls.key`), and
    /// the secrets OIDCLogins name (`<dir>/<name>/client-secret|session-keys`).
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
    /// `A...B` (one argument) compares the merge base of A and B with B, as a pull request
    /// shows it; `A..B` is the same as `A B` (the two tips).
    pub base: String,
    /// The revision after the change (omitted with `A...B` or `A..B`).
    pub head: Option<String>,
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
        Command::Convert(a) => convert(a),
        Command::Status(r) => remote::run(remote::Call::Status, &r),
        Command::Revisions(r) => remote::run(remote::Call::Revisions, &r),
        Command::Sync(a) => remote::run_waiting(remote::Call::Sync, &a.remote, a.wait),
        Command::Pin(a) => remote::run_waiting(remote::Call::Pin(&a.revision), &a.remote, a.wait),
        Command::Unpin(a) => remote::run_waiting(remote::Call::Unpin, &a.remote, a.wait),
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

/// The two sides of `legate diff`: `A B`, `A..B` (the tips), or `A...B` (the merge base of
/// A and B, and B: what a pull request from B into A changes).
fn diff_specs(a: &DiffArgs) -> anyhow::Result<(String, String)> {
    let range = |sep: &str| {
        a.base
            .split_once(sep)
            .filter(|_| !std::path::Path::new(&a.base).exists())
            .map(|(x, y)| {
                let or_head = |s: &str| if s.is_empty() { "HEAD" } else { s }.to_string();
                (or_head(x), or_head(y))
            })
    };
    if let Some((x, y)) = range("...") {
        if a.head.is_some() {
            anyhow::bail!("`{}` is already a range: give no second revision", a.base);
        }
        let repo = git2::Repository::discover(&a.repo)
            .map_err(|e| anyhow::anyhow!("`{}` needs a git repository: {}", a.base, e.message()))?;
        let id = |spec: &str| {
            repo.revparse_single(spec)
                .and_then(|o| o.peel_to_commit())
                .map(|c| c.id())
                .map_err(|e| anyhow::anyhow!("`{spec}` is not a revision: {}", e.message()))
        };
        let base = repo.merge_base(id(&x)?, id(&y)?).map_err(|e| {
            anyhow::anyhow!("`{x}` and `{y}` have no common ancestor: {}", e.message())
        })?;
        return Ok((base.to_string(), y));
    }
    if let Some((x, y)) = range("..") {
        if a.head.is_some() {
            anyhow::bail!("`{}` is already a range: give no second revision", a.base);
        }
        return Ok((x, y));
    }
    match &a.head {
        Some(h) => Ok((a.base.clone(), h.clone())),
        None => anyhow::bail!(
            "give two revisions or directories (`legate diff A B`), or a range (`A...B`)"
        ),
    }
}

fn diff(a: DiffArgs) -> anyhow::Result<i32> {
    let opts = a.config.options();
    let (b, h) = diff_specs(&a)?;
    let (bl, base) = diff_side(&b, &a, &opts)?;
    let (hl, head) = diff_side(&h, &a, &opts)?;
    let mut invalid = Vec::new();
    for (label, side) in [(&bl, &base), (&hl, &head)] {
        if !side.is_ok() {
            eprintln!("{label} does not validate:");
            let errors: Vec<String> = side
                .diagnostics
                .iter()
                .filter(|d| d.severity == config::Severity::Error)
                .map(|d| d.to_string())
                .collect();
            for d in &errors {
                eprintln!("  {d}");
            }
            invalid.push((label.as_str(), errors));
        }
    }
    let (Some(bg), Some(hg)) = (&base.graph, &head.graph) else {
        debug_assert!(!invalid.is_empty());
        // A pull-request comment still says why there is no diff.
        if a.format == DiffFormat::Markdown {
            out!("{}", crate::diff::render::markdown_invalid(&invalid));
        }
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

/// `legate convert`: every YAML file under the path, older getambassador.io documents
/// rewritten as v3alpha1; files with nothing to convert are left alone.
fn convert(a: ConvertArgs) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    let mut files = Vec::new();
    yaml_files(&a.path, &mut files)
        .with_context(|| format!("{}: cannot read", a.path.display()))?;
    let mut converted = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
        let out = config::convert::convert_text(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", f.display(), e.pos.line, e.pos.column))?;
        let Some((out, n)) = out else {
            continue;
        };
        converted += 1;
        if a.write {
            std::fs::write(&f, out).with_context(|| format!("{}: cannot write", f.display()))?;
            eprintln!(
                "{}: {n} resource(s) rewritten as {}",
                f.display(),
                config::convert::TARGET
            );
        } else {
            outln!("# ==> {} ({n} resource(s) converted) <==", f.display());
            out!("{out}");
        }
    }
    if converted == 0 {
        eprintln!("nothing to convert: no getambassador.io/v2 or v1 resources found");
    }
    Ok(0)
}

fn yaml_files(path: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if e.file_type()?.is_dir() {
            yaml_files(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
    }
    Ok(())
}

/// The generated CRD files: (file name, YAML text).
pub fn crd_files() -> Vec<(String, String)> {
    use config::schema::Kind;
    Kind::ALL
        .iter()
        // These exist only in Emissary's group: Legate installs no CRD for them. OIDCLogin is
        // not served in Kubernetes mode yet (its secrets are read from --secrets-dir, which
        // Kubernetes mode fills with TLS Secrets only).
        .filter(|k| !k.emissary_only() && **k != Kind::OidcLogin)
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
