//! What belongs to the command line only: where the configuration file is looked for (the
//! library never reads the environment; the binary decides which file it hands over), and the
//! completion scripts and man page generated from the flags, what systemd is told and the
//! sockets it passes, and handing the listening sockets to a new binary.

pub(crate) mod activation;
pub(crate) mod completions;
pub(crate) mod config_path;
pub(crate) mod systemd;
pub(crate) mod upgrade;
