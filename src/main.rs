//! The `weighbridge` command: flags, logging, signals and exit codes over the library.
//!
//! Exit codes: 0 after a clean run or a successful `--check`; 1 for any error the user can fix
//! (config, bind, logging filter); 2 for command-line usage errors (clap's convention). `ctl`
//! and `top` add theirs (`cli::failure`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use tokio::signal::unix::{Signal, SignalKind, signal};
use weighbridge::{Balancer, Config, Handle, LogFormat};

mod cli;

/// Log lines queued for the writer thread before new ones are dropped (a few MB at most).
const LOG_QUEUE_LINES: usize = 16_384;

/// A Layer-4 TCP load balancer for AI inference servers.
#[derive(Debug, Parser)]
// `weighbridge --config FILE` runs the balancer as before; a subcommand is a different job and
// takes none of the balancer's flags but `--config` (see `main`).
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML). Default: $WEIGHBRIDGE_CONFIG, else
    /// /etc/weighbridge/weighbridge.toml.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print a one-line summary and exit. No network access.
    #[arg(long)]
    check: bool,
    /// With --check: also resolve every backend name and print what each resolves to (exit 1
    /// if one does not resolve).
    #[arg(long, requires = "check")]
    resolve: bool,
    /// Take the listening sockets over from the process that started this one for a binary
    /// upgrade (SIGUSR2), through its Unix socket at PATH.
    #[arg(long, value_name = "PATH", hide = true)]
    upgrade_from: Option<PathBuf>,
    /// Do not watch the configuration file for changes (SIGHUP still reloads it).
    #[arg(long)]
    no_watch: bool,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// "weighbridge=debug". Overrides RUST_LOG; the default is info.
    #[arg(long, value_name = "LEVEL", value_parser = log_filter)]
    log_level: Option<String>,
}

/// Jobs other than running the balancer.
#[derive(Debug, Subcommand)]
enum Command {
    /// Print the shell completion script for SHELL to stdout.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the weighbridge(1) man page (roff) to stdout.
    Manpage,
    /// Status, drain, enable and reload of a running balancer, through its admin endpoint.
    Ctl(cli::ctl::CtlArgs),
    /// A live view of a running balancer's backends.
    Top(cli::top::TopArgs),
}

/// Levels a bare word of `--log-level` may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `--log-level` value as the command line is read (a bad one exits 2, `--check`
/// included) and returns the filter to use. A bare word must be a level: `tracing` would take
/// any other word (`warning`, `verbose`) as a target name and log nothing at all. `warning`, as
/// HAProxy and syslog spell it, means `warn`.
fn log_filter(value: &str) -> Result<String, String> {
    let mut directives = Vec::new();
    for directive in value.split(',').map(str::trim) {
        let directive = match directive.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_owned(),
            word if LEVELS.contains(&word) => word.to_owned(),
            _ if directive.contains(['=', '[']) => directive.to_owned(),
            _ => {
                return Err(format!(
                    "unknown level `{directive}`: use one of {}, or a filter such as weighbridge=debug",
                    LEVELS.join(", ")
                ));
            }
        };
        directives.push(directive);
    }
    let filter = directives.join(",");
    EnvFilter::try_new(&filter).map_err(|e| format!("invalid filter `{value}`: {e}"))?;
    Ok(filter)
}

/// Resolves every backend name of `config` and prints one line per name: `--check --resolve`.
fn check_names(config: &Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let results = runtime.block_on(weighbridge::resolve_names(config));
    let mut failed = Vec::new();
    for (name, outcome) in results {
        match outcome {
            Ok(addresses) => {
                let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                println!("{name}: {}", list.join(" "));
            }
            Err(reason) => {
                println!("{name}: does not resolve ({reason})");
                failed.push(name.to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "backend name(s) that do not resolve: {}",
            failed.join(", ")
        ))
    }
}

/// The guard of the background log writer: dropping it writes out what is still queued. Kept
/// here, not on a stack frame, so that the immediate exit on a second signal can flush too.
static LOG_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Writes out queued log lines; later lines are dropped. Called once, on the way out.
fn flush_logs() {
    drop(
        LOG_GUARD
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(),
    );
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(command) = cli.command.take() {
        // These only mean something to the balancer; silently ignoring one would mislead.
        if cli.check || cli.no_watch || cli.log_level.is_some() || cli.upgrade_from.is_some() {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--check, --no-watch and --log-level apply to running the balancer, not to a subcommand",
                )
                .exit();
        }
        let config = cli.config.as_deref();
        return match command {
            Command::Completions { shell } => {
                exit_code(cli::completions::print_completions(shell, Cli::command()))
            }
            Command::Manpage => exit_code(cli::completions::print_manpage(Cli::command())),
            Command::Ctl(args) => cli::ctl::run(args, config),
            Command::Top(args) => cli::top::run(args, config),
        };
    }
    let result = run(cli);
    flush_logs();
    exit_code(result)
}

/// Exit code 0, or 1 after the error's one line on stderr.
fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("weighbridge: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let path = cli::config_path::locate_from_env(cli.config.as_deref())?;
    let (config, text) = Config::read(&path).map_err(|e| e.to_string())?;
    if cli.check {
        let names = config.names().len();
        let names = if names == 0 {
            String::new()
        } else {
            format!(", {names} backend name(s)")
        };
        println!(
            "{}: ok: {} listener(s), {} backend(s){names}",
            path.display(),
            config.listener_count(),
            config.backend_count()
        );
        if cli.resolve {
            return check_names(&config);
        }
        return Ok(());
    }
    init_logging(cli.log_level.as_deref(), config.log_format())?;
    // The control plane (signals, reloads, health checks, admin) runs here, on one thread;
    // connections run on the balancer's own worker threads, `threads` of them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        // Installed before anything is bound: a supervisor that signals as soon as it sees the
        // `listening` line must find the handlers in place, not the default (die at once).
        let signals =
            Signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        // Every proxied connection holds two descriptors; distributions default the soft limit
        // to 1024, which a busy balancer reaches at 500 connections.
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => info!(limit, "open file limit"),
            Err(e) => warn!(error = %e, "cannot raise the open file limit"),
        }
        let (taken, predecessor) = match &cli.upgrade_from {
            Some(from) => {
                let (sockets, predecessor) = cli::upgrade::take_over(from)?;
                (sockets, Some(predecessor))
            }
            None => (cli::activation::systemd_sockets(), None),
        };
        let handed_over = Arc::new(AtomicBool::new(false));
        let balancer = Balancer::builder(config)
            .config_path(&path)
            .on_lifecycle(cli::systemd::observer(
                Arc::clone(&handed_over),
                predecessor,
            ))
            .inherit(taken)
            .bind()
            .map_err(|e| e.to_string())?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cli::systemd::watchdog(balancer.handle()));
        tokio::spawn(signals.serve(balancer.handle(), shutdown.clone(), handed_over));
        if !cli.no_watch {
            weighbridge::watch(&path, &text, balancer.handle(), shutdown.clone())
                .map_err(|e| format!("cannot watch {}: {e}", path.display()))?;
            info!(path = %path.display(), "watching the configuration file for changes");
        }
        let stopped = balancer.run(shutdown).await;
        info!(cut_connections = stopped.cut_connections, "exiting");
        Ok(())
    })
}

/// Sets up `tracing` to stderr: `--log-level`, else RUST_LOG, else info; lines as `[log]
/// format` says. Set once: a reload cannot change the format of a running process.
///
/// Lines are handed to a background thread that writes them, so a stderr that does not drain
/// (a stalled pipe to journald or a container runtime) never blocks a worker's event loop and
/// the connections on it. If the queue fills up (`LOG_QUEUE_LINES`), lines are dropped rather than
/// waited for, as HAProxy drops log datagrams it cannot send.
fn init_logging(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("--log-level: invalid filter `{level}`: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("weighbridge-log")
        .finish(std::io::stderr());
    *LOG_GUARD.lock().unwrap_or_else(PoisonError::into_inner) = Some(guard);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level of each object, where log shippers look for them.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// A stop signal this soon after the first is taken as the same one delivered twice.
const SAME_SIGNAL: Duration = Duration::from_millis(500);

/// The signals weighbridge acts on.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    upgrade: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            upgrade: signal(SignalKind::user_defined2())?,
        })
    }

    /// SIGHUP reloads the configuration file. The first SIGTERM or SIGINT starts a graceful
    /// shutdown; a second one exits at once (code 1), for an operator who will not wait out
    /// `shutdown_grace`. A second one within [`SAME_SIGNAL`] of the first is the same request
    /// delivered twice, as `timeout` and some supervisors do when they signal the process and
    /// then its process group, and is only logged.
    ///
    /// SIGUSR2 upgrades the binary (`cli::upgrade`): once the new process accepts, this one
    /// shuts down as on SIGTERM, with `handed_over` set.
    async fn serve(
        self,
        handle: Handle,
        shutdown: CancellationToken,
        handed_over: Arc<AtomicBool>,
    ) {
        let Signals {
            mut terminate,
            mut interrupt,
            mut hangup,
            mut upgrade,
        } = self;
        let upgrading = Arc::new(AtomicBool::new(false));
        let mut first: Option<Instant> = None;
        loop {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
                _ = upgrade.recv() => {
                    if upgrading.swap(true, Ordering::SeqCst) {
                        warn!(signal = "SIGUSR2", "a binary upgrade is already under way");
                    } else {
                        info!(signal = "SIGUSR2", "upgrading the binary");
                        tokio::spawn(upgrade_binary(
                            handle.clone(),
                            shutdown.clone(),
                            Arc::clone(&handed_over),
                            Arc::clone(&upgrading),
                        ));
                    }
                    continue;
                }
                _ = hangup.recv() => {
                    info!(signal = "SIGHUP", "reloading the configuration");
                    // The balancer logs the outcome of every reload.
                    drop(handle.reload().await);
                    continue;
                }
            };
            if let Some(first) = first {
                if first.elapsed() < SAME_SIGNAL {
                    info!(
                        signal = name,
                        "signal repeated at once; taken as the same request (send it again to exit now)"
                    );
                    continue;
                }
                warn!(signal = name, "second signal during shutdown; exiting now");
                flush_logs();
                std::process::exit(1);
            }
            first = Some(Instant::now());
            info!(signal = name, "shutting down");
            shutdown.cancel();
        }
    }
}

/// Hands the listening sockets to a new binary; once it accepts, shuts this process down.
async fn upgrade_binary(
    handle: Handle,
    shutdown: CancellationToken,
    handed_over: Arc<AtomicBool>,
    upgrading: Arc<AtomicBool>,
) {
    match cli::upgrade::hand_over(&handle).await {
        Ok(new_pid) => {
            info!(
                new_pid,
                "binary upgrade: the new process accepts; this one drains and exits"
            );
            handed_over.store(true, Ordering::SeqCst);
            shutdown.cancel();
        }
        Err(e) => {
            error!(error = %e, "binary upgrade failed; this process keeps serving");
            upgrading.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_checked_words_or_filters() {
        assert_eq!(log_filter("warning"), Ok("warn".to_owned()));
        assert_eq!(log_filter("INFO"), Ok("info".to_owned()));
        assert_eq!(
            log_filter("warn, weighbridge=debug"),
            Ok("warn,weighbridge=debug".to_owned())
        );
        assert_eq!(
            log_filter("weighbridge::proxy=trace"),
            Ok("weighbridge::proxy=trace".to_owned())
        );
        for bad in ["bogus", "verbose,weighbridge=debug", "loud=[[", ""] {
            assert!(log_filter(bad).is_err(), "{bad:?} is refused");
        }
    }
}
