//! The `legate` binary: parse the command line, set up logging, install the TLS provider,
//! and hand over to the library.

use clap::Parser;

/// mimalloc instead of glibc's malloc: per-thread free lists, no `malloc_consolidate` pauses
/// (measured in bench/proxy/README.md). Only the binary: library users pick their own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = legate::cli::Cli::parse();
    // libgit2's network timeouts are process-global and must be set before any thread starts
    // (the runtime, a fetch): a git server that accepts and never answers then fails a fetch
    // instead of holding its thread forever.
    if let Err(e) = legate::source::git::set_network_timeouts(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(30),
    ) {
        eprintln!("legate: cannot set git network timeouts: {}", e.message());
    }
    // One crypto provider for the whole process (ring); installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        legate::cli::LogFormat::Json => builder.json().init(),
        legate::cli::LogFormat::Text => builder.init(),
    }
    std::process::exit(legate::cli::main(cli));
}
