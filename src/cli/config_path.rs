//! Which configuration file to read: `--config`, else `$WEIGHBRIDGE_CONFIG`, else
//! `/etc/weighbridge/weighbridge.toml` — the order of HAProxy's and nginx's packaged services,
//! where the flag wins and the packaged path is the last resort.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use weighbridge::DEFAULT_CONFIG_PATH;

/// The environment variable naming the configuration file when `--config` is not given.
pub(crate) const CONFIG_ENV: &str = "WEIGHBRIDGE_CONFIG";

/// The file to read, or why there is none: every place tried, and the flag that fixes it.
///
/// A path given by the flag or the variable is taken as it is, so a missing one is reported by
/// the read that follows, with its own path; only the default is checked for existence here, as
/// it is the one a user did not write.
pub(crate) fn locate(flag: Option<&Path>, env: Option<OsString>) -> Result<PathBuf, String> {
    if let Some(path) = flag {
        return Ok(path.to_path_buf());
    }
    let env = env.filter(|value| !value.is_empty());
    if let Some(path) = env {
        return Ok(PathBuf::from(path));
    }
    let default = Path::new(DEFAULT_CONFIG_PATH);
    if default.exists() {
        return Ok(default.to_path_buf());
    }
    Err(format!(
        "no configuration file: --config not given, ${CONFIG_ENV} not set, \
         {DEFAULT_CONFIG_PATH} not found; name one with --config FILE"
    ))
}

/// [`locate`] with the process's own environment.
pub(crate) fn locate_from_env(flag: Option<&Path>) -> Result<PathBuf, String> {
    locate(flag, std::env::var_os(CONFIG_ENV))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_the_variable() {
        let flag = Path::new("/tmp/a.toml");
        assert_eq!(
            locate(Some(flag), Some("/tmp/b.toml".into())),
            Ok(flag.to_path_buf())
        );
        assert_eq!(
            locate(None, Some("/tmp/b.toml".into())),
            Ok(PathBuf::from("/tmp/b.toml"))
        );
    }

    #[test]
    fn with_neither_the_error_names_every_place_and_the_flag() {
        if Path::new(DEFAULT_CONFIG_PATH).exists() {
            return; // an installed machine: the default is found, which the other test covers
        }
        for env in [None, Some(OsString::new())] {
            let error = locate(None, env).expect_err("nothing to read");
            for part in ["--config", CONFIG_ENV, DEFAULT_CONFIG_PATH, "--config FILE"] {
                assert!(error.contains(part), "{error}");
            }
        }
    }
}
