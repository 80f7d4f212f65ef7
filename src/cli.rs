//! What belongs to the command line only: where the configuration file is looked for, and the
//! `ctl` and `top` subcommands, clients of a running balancer's admin endpoint. The library never
//! reads the environment; the binary decides which file it hands over.

pub(crate) mod admin_client;
pub(crate) mod config_path;
pub(crate) mod ctl;
pub(crate) mod failure;
pub(crate) mod format;
pub(crate) mod status;
pub(crate) mod top;

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

/// The subcommands; without one, `weighbridge` runs the balancer.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Status, drain, enable and reload of a running balancer, through its admin endpoint.
    Ctl(ctl::CtlArgs),
    /// A live view of a running balancer's backends.
    Top(top::TopArgs),
}

/// Runs a subcommand; `config` is a `--config` given before it.
pub(crate) fn run(command: Command, config: Option<&Path>) -> ExitCode {
    match command {
        Command::Ctl(args) => ctl::run(args, config),
        Command::Top(args) => top::run(args, config),
    }
}
