//! What belongs to the command line only: where the configuration file is looked for (the
//! library never reads the environment; the binary decides which file it hands over), the
//! completion scripts and man page generated from the flags, what systemd is told and the
//! sockets it passes, handing the listening sockets to a new binary, and the `ctl` and `top`
//! subcommands, clients of a running balancer's admin endpoint.

pub(crate) mod activation;
pub(crate) mod admin_client;
pub(crate) mod completions;
pub(crate) mod config_path;
pub(crate) mod ctl;
pub(crate) mod failure;
pub(crate) mod format;
pub(crate) mod status;
pub(crate) mod systemd;
pub(crate) mod top;
pub(crate) mod upgrade;
