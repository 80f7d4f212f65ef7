//! Why `weighbridge ctl` or `top` failed, as one line and a distinct exit code, so that a script
//! can tell "the balancer is down" from "my token is wrong" without reading the message.

use std::process::ExitCode;

/// A failure at the command line's edge: its message is printed on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Anything the other kinds do not cover: no config to take the address from, an answer
    /// that is not what the endpoint sends. Exit code 1, as the server's own errors.
    Other(String),
    /// The admin endpoint cannot be reached (refused, timed out, name not found).
    Unreachable(String),
    /// The endpoint answered 401: no token, or the wrong one.
    Unauthorized(String),
    /// No listener, pool or backend of that name; the message lists the known ones.
    Unknown(String),
    /// The balancer refused to reload; the message is its error.
    ReloadRefused(String),
    /// `drain --wait` ran out of time with connections still open.
    StillOpen(String),
}

impl Failure {
    /// The process's exit code (docs/operations.md, "Exit codes"). 2 stays clap's for usage
    /// errors.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Unreachable(_) => 3,
            Failure::Unauthorized(_) => 4,
            Failure::Unknown(_) => 5,
            Failure::ReloadRefused(_) => 6,
            Failure::StillOpen(_) => 7,
        }
    }

    /// The one line to print.
    pub(crate) fn message(&self) -> &str {
        match self {
            Failure::Other(m)
            | Failure::Unreachable(m)
            | Failure::Unauthorized(m)
            | Failure::Unknown(m)
            | Failure::ReloadRefused(m)
            | Failure::StillOpen(m) => m,
        }
    }

    /// Prints the message on stderr and gives the exit code.
    pub(crate) fn report(&self) -> ExitCode {
        // Messages may quote a server's text: keep them to the one line promised.
        let line = self.message().replace(['\n', '\r'], " ");
        eprintln!("weighbridge: error: {line}");
        ExitCode::from(self.exit_code())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Other(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_code_and_none_is_clap_s() {
        let all = [
            Failure::Other(String::new()),
            Failure::Unreachable(String::new()),
            Failure::Unauthorized(String::new()),
            Failure::Unknown(String::new()),
            Failure::ReloadRefused(String::new()),
            Failure::StillOpen(String::new()),
        ];
        let mut codes: Vec<u8> = all.iter().map(Failure::exit_code).collect();
        assert!(!codes.contains(&0) && !codes.contains(&2));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
