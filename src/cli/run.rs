//! `legate run`: start the gateway.
//!
//! Builds the runtime, starts the proxy and the reconciler on one source (`--dir`, `--repo` or
//! `--kubernetes`), binds the HTTP, HTTPS and admin listeners (admin API, webhooks; webhooks
//! also under `--hooks-prefix` on the proxy listeners when a secret is set), sends revision
//! notifications, polls the secrets directory for rotated certificates, and on SIGTERM/SIGINT
//! stops accepting and drains up to `--drain-timeout`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::proxy::{Limits, Listeners, Proxy, Settings};

/// A duration flag: `500ms`, `30s`, `5m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 30s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Flags of `legate run`. Every flag can also be set by the environment variable shown.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Follow a directory (watched; for local development).
    #[arg(long, env = "LEGATE_DIR", conflicts_with_all = ["repo", "kubernetes"])]
    pub dir: Option<std::path::PathBuf>,
    /// Follow a git repository: file://, git://, http(s):// or ssh:// URL.
    #[arg(long, env = "LEGATE_REPO", conflicts_with = "kubernetes")]
    pub repo: Option<String>,
    /// Branch, tag or commit to follow.
    #[arg(long = "ref", env = "LEGATE_REF", default_value = "HEAD")]
    pub git_ref: String,
    /// Subdirectory of the repository that holds the config.
    #[arg(long, env = "LEGATE_PATH")]
    pub path: Option<String>,
    /// How often the source is checked (and everything resynced).
    #[arg(long, env = "LEGATE_POLL", default_value = "30s", value_parser = parse_duration)]
    pub poll: Duration,
    /// Longest a git fetch may take.
    #[arg(long, env = "LEGATE_FETCH_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub fetch_timeout: Duration,
    /// Where the git cache and the last applied revision live (required with --repo).
    #[arg(long, env = "LEGATE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// File with `username:password` or a token for http(s) git (also LEGATE_GIT_TOKEN or
    /// LEGATE_GIT_USERNAME + LEGATE_GIT_PASSWORD); never logged.
    #[arg(long, env = "LEGATE_GIT_CREDENTIALS_FILE")]
    pub git_credentials_file: Option<PathBuf>,
    /// Private key for ssh:// repositories.
    #[arg(long, env = "LEGATE_SSH_KEY")]
    pub ssh_key: Option<PathBuf>,
    /// known_hosts file for ssh:// repositories (unknown or changed host keys are refused).
    #[arg(long, env = "LEGATE_KNOWN_HOSTS")]
    pub known_hosts: Option<PathBuf>,
    /// Accept any ssh host key. Unsafe: only for throwaway setups.
    #[arg(long)]
    pub insecure_skip_host_key_check: bool,
    /// Apply a new head that is not a descendant of the applied one (a force push).
    #[arg(long, env = "LEGATE_ALLOW_FORCE_PUSH")]
    pub allow_force_push: bool,
    /// Require head commits signed (SSH signatures) by a key in this allowed_signers file.
    #[arg(long, env = "LEGATE_VERIFY_SIGNATURES", value_name = "ALLOWED_SIGNERS")]
    pub verify_signatures: Option<PathBuf>,
    /// How long a new revision is watched after its swap (0 disables). Only the routes it
    /// changed against the last verified revision are judged: new or changed Mappings, and
    /// unchanged ones that may receive traffic a removed or changed one took. A changed route
    /// fails when more than --verify-max-error-ratio of at least --verify-min-requests of its
    /// requests failed at the gateway (connect errors, resets, timeouts; never client errors
    /// or a policy's answer); a failed --health-path probe or active health check fails it
    /// too. Fewer requests is "verified-unobserved", still a rollback target. A failing
    /// revision is rolled back to the last verified one, or kept serving as degraded when
    /// there is none (the first revision) or it is pinned; in Kubernetes mode the failing
    /// Mappings are set aside instead (Accepted=False, VerificationFailed). A newer revision
    /// interrupts the window at once; evidence carries over by route. States of the serving
    /// revision: verifying, verified, verified-unobserved, degraded, pinned, from-cache
    /// (/readyz answers 200 in all of them, 503 before the first and while draining).
    #[arg(long, env = "LEGATE_VERIFY_WINDOW", default_value = "10s", value_parser = parse_duration, verbatim_doc_comment)]
    pub verify_window: Duration,
    /// A changed route fails its window above this share of failed requests (0 to 1).
    #[arg(long, env = "LEGATE_VERIFY_MAX_ERROR_RATIO", default_value_t = 0.2, value_parser = parse_ratio)]
    pub verify_max_error_ratio: f64,
    /// Requests a changed route needs in the window before its error ratio can fail it.
    #[arg(long, env = "LEGATE_VERIFY_MIN_REQUESTS", default_value_t = 10)]
    pub verify_min_requests: u64,
    /// Also count 5xx answers sent by the upstream itself as failures in the window.
    #[arg(long, env = "LEGATE_VERIFY_COUNT_UPSTREAM_5XX")]
    pub verify_count_upstream_5xx: bool,
    /// First delay before a rolled-back or degraded revision is tried again (once its failed
    /// upstreams accept a TCP connection); doubles after each failure up to --verify-retry-max.
    /// A new revision cancels the retry.
    #[arg(long, env = "LEGATE_VERIFY_RETRY", default_value = "1m", value_parser = parse_duration)]
    pub verify_retry: Duration,
    /// Longest delay between retries of a failed revision.
    #[arg(long, env = "LEGATE_VERIFY_RETRY_MAX", default_value = "15m", value_parser = parse_duration)]
    pub verify_retry_max: Duration,
    /// During the window, GET this path on the plain-HTTP upstreams of the changed routes
    /// (3 failures in a row fail the revision).
    #[arg(long, env = "LEGATE_HEALTH_PATH")]
    pub health_path: Option<String>,
    /// Revisions kept in history.
    #[arg(long, env = "LEGATE_HISTORY", default_value_t = 50)]
    pub history: usize,
    /// Webhook secret file (or LEGATE_WEBHOOK_SECRET); webhooks are served only with a secret.
    #[arg(long, env = "LEGATE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Path prefix under which the proxy listeners also accept webhooks.
    #[arg(long, env = "LEGATE_HOOKS_PREFIX", default_value = "/.legate/hooks/")]
    pub hooks_prefix: String,
    /// File holding the bearer token required for mutating admin calls (or LEGATE_ADMIN_TOKEN).
    /// Required when the admin listener is not on loopback.
    #[arg(long, env = "LEGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// POST a JSON (Slack-compatible) message here when a revision is swapped in (verifying),
    /// applied, kept serving degraded, rejected or rolled back.
    #[arg(long, env = "LEGATE_NOTIFY_URL")]
    pub notify_url: Option<String>,
    /// Watch Mappings, Hosts and their TLS Secrets in Kubernetes instead of a repository.
    #[arg(long, env = "LEGATE_KUBERNETES")]
    pub kubernetes: bool,
    /// With --kubernetes: watch every namespace (else the one of --namespace).
    #[arg(long, env = "LEGATE_ALL_NAMESPACES")]
    pub all_namespaces: bool,
    /// With --kubernetes: only objects with these labels (`key=value,...`).
    #[arg(long, env = "LEGATE_SELECTOR")]
    pub selector: Option<String>,
    /// With --kubernetes: kubeconfig file (default: in-cluster, then $KUBECONFIG, ~/.kube/config).
    #[arg(long, env = "LEGATE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// How the config tree is read (namespace, ambassador_id, strict, include/exclude, limits).
    #[command(flatten)]
    pub config: super::ConfigArgs,

    /// Plain HTTP listener (HTTP/1.1 and h2c by prior knowledge); `off` disables it. Used
    /// while the revision has no `Listener`; a revision's Listener ports (and TCPMapping
    /// ports) open on this address (else on --https-listen's).
    #[arg(long, env = "LEGATE_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: String,
    /// HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN); `off` disables it. Used while the
    /// revision has no `Listener`. Both flags' listeners open before the first revision is
    /// judged: a revision whose Listener port cannot be bound is rejected (`listener-bind`).
    #[arg(long, env = "LEGATE_HTTPS_LISTEN", default_value = "0.0.0.0:8443")]
    pub https_listen: String,
    /// Admin listener (`/healthz`, `/readyz`, `/api/...`, `/hooks/...`); `off` disables it.
    #[arg(long, env = "LEGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8877")]
    pub admin_listen: String,
    /// Directory of mounted Secrets: `<name>/tls.crt` and `<name>/tls.key` per Host `tlsSecret`
    /// (and TLSContext `secret`); `<name>/ca.crt` per `ca_secret`, `<name>/crl.pem` per
    /// `crl_secret`. Hosts with an `acmeProvider` get their certificate written here by ACME.
    /// An OIDCLogin's `secret` is `<name>/client-secret` and `<name>/session-keys` (base64
    /// 32-byte keys, one per line, the first seals sessions).
    #[arg(long, env = "LEGATE_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Secret served to TLS clients whose SNI matches no Host (default: handshake failure).
    #[arg(long, env = "LEGATE_DEFAULT_CERT", value_name = "SECRET")]
    pub default_cert: Option<String>,
    /// How often the secrets directory is checked for rotated certificates (and ACME Hosts for
    /// certificates to order or renew), in seconds.
    #[arg(long, env = "LEGATE_SECRETS_POLL_SECS", default_value_t = 5)]
    pub secrets_poll_secs: u64,
    /// PEM CA bundle trusted for `https://` upstreams, in addition to the webpki roots; also
    /// for the gateway's own calls (JWKS URLs, OpenID providers, `--notify-url`, verification
    /// probes), and the only root trusted for an ACME directory when given (its first
    /// certificate).
    #[arg(long, env = "LEGATE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Seconds resolved upstream addresses are used before the name is looked up again.
    #[arg(long, env = "LEGATE_DNS_TTL_SECS", default_value_t = 30)]
    pub dns_ttl_secs: u64,
    /// Port used in the Location of insecure redirects to HTTPS (443 is left out of the URL).
    #[arg(long, env = "LEGATE_HTTPS_REDIRECT_PORT", default_value_t = 443)]
    pub https_redirect_port: u16,
    /// Proxies in front of Legate trusted to append to X-Forwarded-For (0: replace the client's).
    /// From 1 up, their X-Forwarded-Proto is kept and decides whether a request is secure for
    /// its Host's insecure action (at 0 the connection's own scheme decides).
    /// The only trusted-hop setting: a Module's `xff_num_trusted_hops` is ignored (as in
    /// Emissary); a Module's `use_remote_address: false` forwards the client's header as sent.
    #[arg(long, env = "LEGATE_XFF_TRUSTED_HOPS", default_value_t = 0)]
    pub xff_trusted_hops: usize,
    /// Add `x-legate-route` (namespace/name of the Mapping) and `x-legate-revision` to responses.
    #[arg(long, env = "LEGATE_DEBUG_HEADERS")]
    pub debug_headers: bool,
    /// Also serve the built-in demo echo upstream on this address (for the quickstart).
    #[arg(long, env = "LEGATE_DEMO_ECHO", value_name = "ADDR")]
    pub demo_echo: Option<SocketAddr>,

    /// Largest request head: sum of header name and value bytes (431 above). With a Module's
    /// `max_request_headers_kb` the smaller of the two applies.
    #[arg(long, env = "LEGATE_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Most header fields in one request (431 above).
    #[arg(long, env = "LEGATE_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Longest request target in bytes (414 above).
    #[arg(long, env = "LEGATE_MAX_URI_BYTES", default_value_t = 8 * 1024)]
    pub max_uri_bytes: usize,
    /// Largest request body in bytes (413 above); unlimited when unset. With a Module's
    /// `buffer.max_request_bytes` the smaller of the two applies.
    #[arg(long, env = "LEGATE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Time from accept to a complete first request head (TLS handshake included, HTTP/1.1 and
    /// HTTP/2 alike), in milliseconds; later heads on a keep-alive connection get the same.
    #[arg(long, env = "LEGATE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// A downstream connection idle this long is closed, in milliseconds.
    #[arg(long, env = "LEGATE_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "LEGATE_MAX_H2_STREAMS", default_value_t = 100)]
    pub max_h2_streams: u32,
    /// Open downstream connections; new ones beyond it are closed at accept. Lowered at start
    /// to what the open-file limit allows (two descriptors per connection, some kept back for
    /// the admin listener); the soft limit is raised to the hard one first.
    #[arg(long, env = "LEGATE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish, in seconds.
    #[arg(long, env = "LEGATE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Runtime worker threads (default: one per CPU; 1 runs a single-threaded runtime).
    #[arg(long, env = "LEGATE_WORKER_THREADS", conflicts_with = "workers")]
    pub worker_threads: Option<usize>,
    /// Proxy workers, each a thread with a single-threaded runtime accepting on every listener
    /// (a revision's Listener ports too): a connection stays on the worker that accepted it, with
    /// no work stealing or cross-thread wake-ups per request. One per core is the usual choice;
    /// the control plane (reconciler, admin, health checks) shares the first worker's thread.
    /// Instead of `--worker-threads`.
    #[arg(long, env = "LEGATE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// Access log (one JSON line per request): `stdout` (or `-`), a file appended to, or `off`.
    #[arg(long, env = "LEGATE_ACCESS_LOG", default_value = "stdout")]
    pub access_log: String,
    /// Request metrics (`GET /metrics` on the admin listener): `on` or `off` (404, and requests
    /// skip their counters).
    #[arg(long, env = "LEGATE_METRICS", default_value = "on", value_parser = ["on", "off"])]
    pub metrics: String,
    /// Export spans (a server span per request, a client span per upstream attempt) as
    /// OTLP/HTTP protobuf to this collector, e.g. `http://jaeger:4318` (`/v1/traces` is added
    /// to a URL without a path). Wins over a TracingService in the config.
    #[arg(long, env = "LEGATE_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<http::Uri>,
    /// `service.name` of the exported spans with `--otlp-endpoint`.
    #[arg(long, env = "LEGATE_OTLP_SERVICE_NAME", default_value = "legate")]
    pub otlp_service_name: String,
    /// Share of new traces (requests without a `traceparent`) sampled, 0 to 1; a client's
    /// `traceparent` decides for its own trace (parent-based). Default: the TracingService's
    /// `sampling.overall`, else 1 while spans are exported, else 0. Sampled traces are exported
    /// and marked sampled upstream.
    #[arg(long, alias = "trace-sample-ratio", env = "LEGATE_OTLP_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub otlp_sample_ratio: Option<f64>,
}

fn parse_otlp_endpoint(s: &str) -> Result<http::Uri, String> {
    crate::config::tracingservice::traces_url(s)
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a ratio between 0 and 1")),
    }
}

impl RunArgs {
    /// The proxy settings these flags describe.
    pub fn settings(&self) -> Settings {
        Settings {
            xff_trusted_hops: self.xff_trusted_hops,
            debug_headers: self.debug_headers,
            https_redirect_port: self.https_redirect_port,
            limits: Limits {
                max_header_bytes: self.max_header_bytes,
                max_headers: self.max_headers,
                max_uri_bytes: self.max_uri_bytes,
                max_body_bytes: self.max_body_bytes,
                header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(self.idle_timeout_ms),
                max_h2_streams: self.max_h2_streams,
                max_connections: self.max_connections,
            },
            secrets_dir: self.secrets_dir.clone(),
            default_cert: self.default_cert.clone(),
            upstream_ca: self.upstream_ca.clone(),
            dns_ttl: Duration::from_secs(self.dns_ttl_secs),
            trace_sample_ratio: self.otlp_sample_ratio,
            metrics: self.metrics == "on",
            ..Settings::default()
        }
    }
}

fn listen_addr(flag: &str, v: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v.eq_ignore_ascii_case("off") || v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("--{flag} `{v}` is not an address like 0.0.0.0:8080 (or `off`)"))
}

/// Start the gateway and block until it stops. Returns the process exit code.
pub fn run(args: RunArgs, cfg: crate::config::Options) -> anyhow::Result<i32> {
    // main installs the provider; doing it here too keeps library callers working.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One worker: a current-thread runtime, with no cross-thread wake-ups or work stealing
    // (what a gateway pinned to one core wants). More: the work-stealing scheduler.
    let mut rt = match args.worker_threads {
        _ if args.workers.is_some() => tokio::runtime::Builder::new_current_thread(),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    let rt = rt.build().context("cannot start the async runtime")?;
    rt.block_on(run_async(args, cfg))
}

async fn run_async(args: RunArgs, cfg: crate::config::Options) -> anyhow::Result<i32> {
    let addrs = Addrs::from_args(&args)?;
    let hook_secret = hook_secret(&args)?;
    let proxy = build_proxy(&args, &addrs)?;
    // Everyone who follows revision outcomes subscribes before the reconciler starts, so the
    // first revision is seen too.
    let (events, _) = tokio::sync::broadcast::channel(64);
    let notify_events = events.subscribe();
    crate::reconcile::count_outcomes(proxy.metrics(), events.subscribe());
    start_demo_echo(&args).await?;
    // The flags' listeners open before the first revision is judged, so its Listener ports are
    // bound like any later revision's: a port that cannot be bound rejects it (`listener-bind`)
    // while the flags' sockets serve and /readyz stays 503.
    let running = start_listeners(&proxy, &addrs, usize::from(args.workers.unwrap_or(1))).await?;
    // Bound now too, served once the reconciler exists: a client that finds the proxy port
    // open can connect to the admin port (its request waits in the backlog).
    let admin = bind_admin(addrs.admin).await?;
    let source = start_source(&args, &cfg, &proxy, events).await?;
    start_notifications(&args, notify_events, &source.name)?;
    let admin_state = admin_state(&proxy, &source.handle, hook_secret, addrs.token.clone());
    mount_hooks(&args, &proxy, &admin_state);
    start_admin(admin, admin_state);
    start_cert_refresh(&args, &proxy);

    wait_for_signal().await;
    tracing::info!("shutting down: draining connections");
    source.handle.set_draining();
    let drained = running
        .shutdown(Duration::from_secs(args.drain_timeout_secs))
        .await;
    tracing::info!(drained, "stopped");
    drop(source);
    Ok(0)
}

/// The listener addresses and the admin token, checked together: a non-loopback admin
/// listener needs a token.
struct Addrs {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    token: Option<String>,
}

impl Addrs {
    fn from_args(args: &RunArgs) -> anyhow::Result<Addrs> {
        let addrs = Addrs {
            http: listen_addr("http-listen", &args.http_listen)?,
            https: listen_addr("https-listen", &args.https_listen)?,
            admin: listen_addr("admin-listen", &args.admin_listen)?,
            token: admin_token(args)?,
        };
        if let Some(a) = addrs.admin {
            if !a.ip().is_loopback() && addrs.token.is_none() {
                bail!("the admin listener {a} is not on loopback: give --admin-token-file (or LEGATE_ADMIN_TOKEN) so mutating calls need a token");
            }
        }
        Ok(addrs)
    }
}

/// The webhook secret from `--webhook-secret-file` or `LEGATE_WEBHOOK_SECRET`.
fn hook_secret(args: &RunArgs) -> anyhow::Result<Option<Arc<crate::admin::hooks::HookSecret>>> {
    use crate::admin::hooks::HookSecret;
    let secret = match &args.webhook_secret_file {
        Some(f) => Some(HookSecret::from_file(f).map_err(anyhow::Error::msg)?),
        None => HookSecret::from_env("LEGATE_WEBHOOK_SECRET").map_err(anyhow::Error::msg)?,
    };
    Ok(secret.map(Arc::new))
}

/// The proxy, not yet listening: settings from the flags, the connection cap fitted to the
/// open-file limit, the access log opened, and the outbound client's trust roots set.
fn build_proxy(args: &RunArgs, addrs: &Addrs) -> anyhow::Result<Arc<Proxy>> {
    let mut settings = args.settings();
    // A revision's Listener ports open on the address of the listen flags.
    settings.listener_ip = Some(
        addrs
            .http
            .or(addrs.https)
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| {
                a.ip()
            }),
    );
    // With the common soft limit of 1024 the default 10,000 connections would end in EMFILE:
    // raise the limit, then size the connection cap to it (admin descriptors kept back).
    let soft = crate::proxy::fds::raise_nofile_limit();
    let budget = crate::proxy::fds::connection_budget(settings.limits.max_connections, soft);
    if budget < settings.limits.max_connections {
        tracing::warn!(
            requested = settings.limits.max_connections,
            allowed = budget,
            open_files_limit = soft.unwrap_or(0),
            "--max-connections lowered to what the open-file limit allows (raise `ulimit -n`)"
        );
        settings.limits.max_connections = budget;
    }
    // In Kubernetes mode the TLS Secrets are written to a private directory the proxy reads.
    if args.kubernetes && settings.secrets_dir.is_none() {
        settings.secrets_dir =
            Some(std::env::temp_dir().join(format!("legate-kube-secrets-{}", std::process::id())));
    }
    if let Some(sink) = crate::proxy::accesslog::Sink::parse(&args.access_log) {
        let log = crate::proxy::accesslog::AccessLog::start(sink)
            .with_context(|| format!("cannot open --access-log {}", args.access_log))?;
        settings.access_log = Some(log);
    }
    // Always started: a TracingService in a later revision can switch export on.
    settings.otlp = Some(crate::otlp::Exporter::start(crate::otlp::ExportSettings {
        target: args.otlp_endpoint.clone().map(|url| crate::otlp::Target {
            url,
            service_name: args.otlp_service_name.clone(),
        }),
    }));
    // JWKS fetches, notifications and the verification probe trust `--upstream-ca` too.
    crate::outbound::init(settings.upstream_ca.as_deref())?;
    Ok(Proxy::new(settings)?)
}

/// The reconciler's settings from the flags.
fn reconcile_settings(
    args: &RunArgs,
    cfg: &crate::config::Options,
    proxy: &Proxy,
    events: tokio::sync::broadcast::Sender<crate::reconcile::Entry>,
) -> crate::reconcile::Settings {
    crate::reconcile::Settings {
        events: Some(events),
        metrics: Some(proxy.metrics().clone()),
        config: cfg.clone(),
        secrets_dir: proxy.settings().secrets_dir.clone(),
        cache_dir: args.cache_dir.clone(),
        poll: args.poll,
        fetch_timeout: args.fetch_timeout,
        history: args.history,
        allow_force_push: args.allow_force_push,
        verify: crate::reconcile::VerifySettings {
            window: args.verify_window,
            probe_path: args.health_path.clone(),
            max_error_ratio: args.verify_max_error_ratio,
            min_requests: args.verify_min_requests,
            count_upstream_5xx: args.verify_count_upstream_5xx,
            retry_initial: args.verify_retry,
            retry_max: args.verify_retry_max,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The followed source and its reconciler; dropping it stops the source's watches and tasks.
struct StartedSource {
    handle: crate::reconcile::Handle,
    /// How notifications name the source (never with credentials).
    name: String,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

/// Start the reconciler on the source the flags name (`--dir`, `--repo` or `--kubernetes`);
/// in Kubernetes mode also the status writer.
async fn start_source(
    args: &RunArgs,
    cfg: &crate::config::Options,
    proxy: &Arc<Proxy>,
    events: tokio::sync::broadcast::Sender<crate::reconcile::Entry>,
) -> anyhow::Result<StartedSource> {
    use crate::reconcile;
    // Subscribed before the reconciler starts, for the Kubernetes status writer.
    let served_events = events.subscribe();
    let rsettings = reconcile_settings(args, cfg, proxy, events);
    let (spec, client) = if args.kubernetes {
        let (spec, client) = kube_spec(args, cfg, &rsettings).await?;
        (spec, Some(client))
    } else {
        (source_spec(args, cfg)?, None)
    };
    let name = spec.name();
    let sink: Arc<dyn reconcile::GraphSink> = proxy.clone();
    let errors: Arc<dyn reconcile::UpstreamHealth> = proxy.clone();
    let running = reconcile::launch(spec, sink, rsettings, Some(errors))
        .await
        .map_err(anyhow::Error::msg)?;
    let handle = running.handle.clone();
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    if let (Some(client), Some(kube)) = (client, running.kube()) {
        let status = start_cluster_status(client.clone(), kube.snapshots(), served_events, cfg);
        start_kube_acme(args, proxy, client, status.is_leader());
        keep.push(Box::new(status));
    }
    keep.push(Box::new(running));
    Ok(StartedSource {
        handle,
        name,
        _keep: keep,
    })
}

/// Kubernetes mode: ACME Hosts get their certificates (and account keys) in Secrets written
/// through the API, ordered and renewed by the Lease holder only; every replica serves them
/// through the Secret watch. Checked at the secrets poll interval.
fn start_kube_acme(
    args: &RunArgs,
    proxy: &Arc<Proxy>,
    client: ::kube::Client,
    leader: tokio::sync::watch::Receiver<bool>,
) {
    let acme = crate::tls::acme::Acme::kubernetes(
        client,
        leader,
        args.upstream_ca.clone(),
        proxy.metrics().clone(),
    );
    proxy.set_acme(acme.clone());
    let every = Duration::from_secs(args.secrets_poll_secs.max(1));
    tokio::spawn(proxy.clone().run_acme(acme, every));
}

/// `--dir` or `--repo` and the git flags.
fn source_spec(
    args: &RunArgs,
    cfg: &crate::config::Options,
) -> anyhow::Result<crate::reconcile::SourceSpec> {
    use crate::reconcile::SourceSpec;
    use crate::source::git::{GitAuth, GitOptions};
    match (&args.dir, &args.repo) {
        (Some(d), None) => Ok(SourceSpec::Dir(d.clone())),
        (None, Some(url)) => {
            let cache_dir = args
                .cache_dir
                .clone()
                .context("--repo needs --cache-dir (where the repository is cached)")?;
            Ok(SourceSpec::Git(Box::new(GitOptions {
                url: url.clone(),
                reference: args.git_ref.clone(),
                subdir: args.path.clone(),
                cache_dir,
                tree: cfg.tree.clone(),
                auth: GitAuth {
                    userpass: GitAuth::userpass_from(args.git_credentials_file.as_deref())
                        .map_err(anyhow::Error::msg)?,
                    ssh_key: args.ssh_key.clone(),
                    known_hosts: args.known_hosts.clone(),
                    insecure_skip_host_key_check: args.insecure_skip_host_key_check,
                },
                allowed_signers: args.verify_signatures.clone(),
            })))
        }
        _ => bail!("give one source: --dir PATH, --repo URL or --kubernetes"),
    }
}

/// `--kubernetes` and its flags; the client is also the status writer's.
async fn kube_spec(
    args: &RunArgs,
    cfg: &crate::config::Options,
    rsettings: &crate::reconcile::Settings,
) -> anyhow::Result<(crate::reconcile::SourceSpec, ::kube::Client)> {
    let client = crate::source::kube::client(args.kubeconfig.as_deref()).await?;
    let dir = rsettings
        .secrets_dir
        .clone()
        .context("kubernetes mode needs a secrets directory")?;
    let mut options = crate::source::kube::KubeOptions::new(&dir);
    options.namespace = (!args.all_namespaces).then(|| cfg.namespace.clone());
    options.selector = args.selector.clone();
    options.config = crate::config::Options {
        skip_invalid: true,
        ..cfg.clone()
    };
    let spec = crate::reconcile::SourceSpec::Kubernetes(Box::new(crate::reconcile::KubeSpec {
        client: client.clone(),
        options,
    }));
    Ok((spec, client))
}

/// The served revision goes to the objects' status, written by the Lease holder only.
fn start_cluster_status(
    client: ::kube::Client,
    snapshots: tokio::sync::watch::Receiver<Option<Arc<crate::source::kube::Snapshot>>>,
    mut events: tokio::sync::broadcast::Receiver<crate::reconcile::Entry>,
    cfg: &crate::config::Options,
) -> crate::cluster::StatusHandle {
    use crate::reconcile::{Judgement, Outcome};
    let (served_tx, served_rx) = tokio::sync::watch::channel(None::<crate::cluster::Served>);
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            let state = match e.outcome {
                Outcome::Verifying => "verifying",
                Outcome::Degraded => "degraded",
                Outcome::Applied => match e.verdict.as_ref().map(|v| v.judgement) {
                    Some(Judgement::VerifiedUnobserved) => "verified-unobserved",
                    _ => "verified",
                },
                _ => continue,
            };
            served_tx.send_replace(Some(crate::cluster::Served {
                revision: e.revision,
                state: state.into(),
            }));
        }
    });
    let lease_ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| cfg.namespace.clone());
    crate::cluster::start_status(
        client,
        snapshots,
        served_rx,
        crate::cluster::LeaseConfig::new(lease_ns, crate::cluster::default_identity()),
    )
}

/// `--notify-url`: a message per revision outcome.
fn start_notifications(
    args: &RunArgs,
    events: tokio::sync::broadcast::Receiver<crate::reconcile::Entry>,
    source_name: &str,
) -> anyhow::Result<()> {
    if let Some(url) = &args.notify_url {
        let n = crate::notifications::Notifier::new(url).map_err(anyhow::Error::msg)?;
        n.spawn(events, source_name.to_string());
    }
    Ok(())
}

/// What the admin API and the webhooks see: the reconciler, the live graph, the metrics and
/// the dashboard's recent traffic.
fn admin_state(
    proxy: &Arc<Proxy>,
    handle: &crate::reconcile::Handle,
    hook_secret: Option<Arc<crate::admin::hooks::HookSecret>>,
    token: Option<String>,
) -> crate::admin::AdminState {
    // The dashboard's recent traffic: a snapshot of the per-route counters every 5 s, kept for
    // the longest window it offers (15 min).
    let recent = proxy.settings().metrics.then(|| {
        let r = crate::metrics::Recent::new(proxy.metrics().clone(), 15 * 12 + 1);
        r.spawn(Duration::from_secs(5));
        r
    });
    let p = proxy.clone();
    crate::admin::AdminState {
        reconciler: handle.clone(),
        hook_secret,
        graph: Some(Arc::new(move || p.graph())),
        token: token.map(Arc::new),
        metrics: Some(proxy.metrics().clone()).filter(|_| proxy.settings().metrics),
        recent,
    }
}

/// With a webhook secret, the proxy listeners also take webhooks under `--hooks-prefix`.
fn mount_hooks(args: &RunArgs, proxy: &Proxy, admin_state: &crate::admin::AdminState) {
    if admin_state.hook_secret.is_none() {
        return;
    }
    let prefix = if args.hooks_prefix.ends_with('/') {
        args.hooks_prefix.clone()
    } else {
        format!("{}/", args.hooks_prefix)
    };
    proxy.set_local(
        prefix.clone(),
        Arc::new(Hooks {
            prefix,
            state: admin_state.clone(),
        }),
    );
}

/// `--demo-echo`: the built-in echo upstream of the quickstart.
async fn start_demo_echo(args: &RunArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.demo_echo {
        let l = bind(addr, "demo-echo").await?;
        tracing::info!(%addr, "demo echo upstream listening");
        tokio::spawn(crate::proxy::echo::serve(l));
    }
    Ok(())
}

/// Bind the HTTP and HTTPS listeners and start serving on them with `workers` workers.
async fn start_listeners(
    proxy: &Arc<Proxy>,
    addrs: &Addrs,
    workers: usize,
) -> anyhow::Result<crate::proxy::Running> {
    let http = match addrs.http {
        Some(a) => Some(bind(a, "http-listen").await?),
        None => None,
    };
    let https = match addrs.https {
        Some(a) => {
            let cfg = crate::tls::server_config(proxy.cert_source())?;
            Some((bind(a, "https-listen").await?, Arc::new(cfg)))
        }
        None => None,
    };
    let running = proxy.start_workers(Listeners { http, https }, workers)?;
    if let Some(a) = running.http_addr {
        tracing::info!(addr = %a, "HTTP listener ready");
    }
    if let Some(a) = running.https_addr {
        tracing::info!(addr = %a, "HTTPS listener ready");
    }
    Ok(running)
}

/// Bind the admin listener's socket (`--admin-listen`).
async fn bind_admin(addr: Option<SocketAddr>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(a) => Ok(Some(bind(a, "admin-listen").await?)),
        None => Ok(None),
    }
}

/// Serve the admin listener (`/healthz`, `/readyz`, `/api/...`, `/hooks/...`).
fn start_admin(listener: Option<tokio::net::TcpListener>, state: crate::admin::AdminState) {
    if let Some(l) = listener {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "admin listener ready");
        }
        tokio::spawn(crate::admin::serve(l, state));
    }
}

/// With a secrets directory: poll it for rotated certificates and, outside Kubernetes mode,
/// order and renew the certificates of ACME Hosts.
fn start_cert_refresh(args: &RunArgs, proxy: &Arc<Proxy>) {
    let Some(dir) = proxy.settings().secrets_dir.clone() else {
        return;
    };
    let every = Duration::from_secs(args.secrets_poll_secs.max(1));
    if !args.kubernetes {
        // ACME Hosts: checked at the secrets poll interval; tokens answered on the listeners.
        // Not in Kubernetes mode: the secrets directory there mirrors Kubernetes Secrets, and
        // ACME writes the Secrets themselves (`start_kube_acme`).
        let acme =
            crate::tls::acme::Acme::new(dir, args.upstream_ca.clone(), proxy.metrics().clone());
        proxy.set_acme(acme.clone());
        tokio::spawn(proxy.clone().run_acme(acme, every));
    }
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let p = proxy.clone();
            let _ = tokio::task::spawn_blocking(move || p.refresh_certs()).await;
        }
    });
}

/// The admin token from `--admin-token-file` or `LEGATE_ADMIN_TOKEN`.
fn admin_token(args: &RunArgs) -> anyhow::Result<Option<String>> {
    let t = match &args.admin_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --admin-token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LEGATE_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    match t {
        Some(t) if t.is_empty() => bail!("the admin token is empty"),
        other => Ok(other),
    }
}

/// Webhooks on the proxy listeners, under the hooks prefix.
struct Hooks {
    prefix: String,
    state: crate::admin::AdminState,
}

impl crate::proxy::LocalService for Hooks {
    fn call(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<bytes::Bytes>> + Send>>
    {
        let state = self.state.clone();
        let kind = req.uri().path()[self.prefix.len()..].to_string();
        Box::pin(async move {
            use http_body_util::BodyExt;
            let resp = crate::admin::hooks::handle(&kind, req, &state).await;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            http::Response::from_parts(parts, bytes)
        })
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    crate::proxy::bind(addr).with_context(|| format!("cannot listen on {addr} (--{flag})"))
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
