//! The `weighbridge` command: flags, logging, signals and exit codes over the library.
//!
//! Exit codes: 0 after a clean run or a successful `--check`; 1 for any error the user can fix
//! (config, bind, logging filter); 2 for command-line usage errors (clap's convention).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use weighbridge::config::{self, DEFAULT_CONFIG_PATH};
use weighbridge::{Balancer, listener};

/// A Layer-4 TCP load balancer for AI inference servers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration, print a one-line summary and exit.
    #[arg(long)]
    check: bool,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// "weighbridge=debug". Overrides RUST_LOG; the default is info.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("weighbridge: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = config::load(&cli.config).map_err(|e| e.to_string())?;
    if cli.check {
        let backends: usize = config.listeners.iter().map(|l| l.backends.len()).sum();
        println!(
            "{}: ok: {} listener(s), {} backend(s)",
            cli.config.display(),
            config.listeners.len(),
            backends
        );
        return Ok(());
    }
    init_logging(cli.log_level.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        match listener::raise_open_file_limit() {
            Ok(limit) => info!(limit, "open file limit"),
            Err(e) => warn!(error = %e, "cannot raise the open file limit"),
        }
        let balancer = Balancer::bind(&config).map_err(|e| e.to_string())?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let stopped = balancer.run(shutdown).await;
        info!(cut_connections = stopped.cut_connections, "exiting");
        Ok(())
    })
}

/// Sets up `tracing` to stderr: `--log-level`, else RUST_LOG, else info.
fn init_logging(level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("--log-level: invalid filter `{level}`: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => term.recv().await,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
                std::future::pending().await
            }
        }
    };
    tokio::select! {
        _ = terminate => info!(signal = "SIGTERM", "shutting down"),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => info!(signal = "SIGINT", "shutting down"),
            Err(e) => error!(error = %e, "cannot listen for SIGINT; shutting down"),
        },
    }
    shutdown.cancel();
}
