//! What belongs to the command line only: where the configuration file is looked for. The
//! library never reads the environment; the binary decides which file it hands over.

pub(crate) mod config_path;
