//! `backend_congestion_control`: the TCP congestion control of the balancer's sockets toward
//! the backends.
//!
//! Why a balancer would set it: a machine whose default is BBR paces every socket, and a
//! balancer is two paced hops where a direct connection is one. Pacing the backend hop costs
//! throughput (measured in docs/benchmarks.md, "Congestion control"), while the hop to GPU
//! servers in the same rack gains nothing from pacing. Clients keep the
//! system's choice; only the backend sockets change, and only when the key is written.
//!
//! The name is checked against this machine when the file is loaded, by setting it on a socket
//! that is never connected: an algorithm the kernel lacks, or will not let this process use,
//! fails `--check` and a reload with the key's line, instead of every connection later.

use std::fmt;

/// The longest name the kernel accepts (`TCP_CA_NAME_MAX` is 16 with its terminating NUL).
const MAX_LEN: usize = 15;

/// A congestion control algorithm's name, as `setsockopt(TCP_CONGESTION)` takes it.
///
/// Inline and `Copy`, so that it travels in every listener's per-connection settings without
/// an allocation or a reference count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct CongestionControl {
    name: [u8; MAX_LEN],
    len: u8,
}

/// Why a name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CongestionError {
    /// Not a name the kernel could have.
    #[error("invalid name `{0}`: expected 1 to 15 lowercase letters, digits, `_` or `-`")]
    BadName(String),
    /// The kernel has no such algorithm (and this process may not load its module).
    #[error(
        "`{name}` is not available on this machine (net.ipv4.tcp_available_congestion_control: {available}); if the kernel has it as a module, `modprobe tcp_{name}` loads it"
    )]
    NotAvailable {
        /// The name written.
        name: String,
        /// What the kernel offers, from `/proc`.
        available: String,
    },
    /// The kernel has it, but only privileged processes may choose it.
    #[error(
        "`{name}` is not allowed for this process (net.ipv4.tcp_allowed_congestion_control: {allowed}); add it there, or run with CAP_NET_ADMIN"
    )]
    NotAllowed {
        /// The name written.
        name: String,
        /// What unprivileged processes may choose, from `/proc`.
        allowed: String,
    },
    /// Setting it failed for another reason, or this system has no such socket option.
    #[error("`{name}` cannot be set: {reason}")]
    Unusable {
        /// The name written.
        name: String,
        /// The system's error.
        reason: String,
    },
}

impl CongestionControl {
    /// Checks `name`'s form and that this process can set it on a TCP socket.
    pub(crate) fn new(name: &str) -> Result<CongestionControl, CongestionError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(CongestionError::BadName(name.to_owned()));
        }
        let mut buf = [0u8; MAX_LEN];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        let cc = CongestionControl {
            name: buf,
            len: name.len() as u8,
        };
        probe(cc)?;
        Ok(cc)
    }

    /// The name.
    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `new`).
        std::str::from_utf8(&self.name[..usize::from(self.len)]).unwrap_or_default()
    }

    /// Sets it on `socket`.
    #[cfg(target_os = "linux")]
    pub(crate) fn apply(&self, socket: impl std::os::fd::AsFd) -> std::io::Result<()> {
        rustix::net::sockopt::set_tcp_congestion(socket, self.as_str()).map_err(Into::into)
    }

    /// Other systems: see [`probe`], which refuses the key there.
    #[cfg(not(target_os = "linux"))]
    pub fn apply(&self, _socket: impl std::os::fd::AsFd) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

impl fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CongestionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CongestionControl({:?})", self.as_str())
    }
}

/// Sets `cc` on a fresh, unconnected TCP socket, and says in the kernel's terms why it failed.
#[cfg(target_os = "linux")]
fn probe(cc: CongestionControl) -> Result<(), CongestionError> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socket_with};

    let unusable = |e: std::io::Error| CongestionError::Unusable {
        name: cc.as_str().to_owned(),
        reason: e.to_string(),
    };
    let socket = socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| unusable(e.into()))?;
    match cc.apply(&socket) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
            Err(CongestionError::NotAvailable {
                name: cc.as_str().to_owned(),
                available: sysctl("tcp_available_congestion_control"),
            })
        }
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
            Err(CongestionError::NotAllowed {
                name: cc.as_str().to_owned(),
                allowed: sysctl("tcp_allowed_congestion_control"),
            })
        }
        Err(e) => Err(unusable(e)),
    }
}

#[cfg(not(target_os = "linux"))]
fn probe(cc: CongestionControl) -> Result<(), CongestionError> {
    Err(CongestionError::Unusable {
        name: cc.as_str().to_owned(),
        reason: "choosing a congestion control per socket is supported on Linux only".into(),
    })
}

/// A `net.ipv4` sysctl's value for an error message, or "unknown".
#[cfg(target_os = "linux")]
fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reno_is_always_allowed() {
        // Reno is built in and unrestricted on every Linux kernel.
        let cc = CongestionControl::new("reno").expect("reno");
        assert_eq!(cc.as_str(), "reno");
        assert_eq!(cc.to_string(), "reno");
    }

    #[test]
    fn malformed_names_are_refused_before_the_kernel_is_asked() {
        for bad in ["", "Cubic", "cu bic", "sixteen_letters_", "bbr\n"] {
            assert_eq!(
                CongestionControl::new(bad),
                Err(CongestionError::BadName(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert!(
            CongestionControl::new("fifteen_letters")
                .is_err_and(|e| !matches!(e, CongestionError::BadName(_)))
        );
    }

    #[test]
    fn an_algorithm_the_kernel_lacks_names_what_it_has() {
        let err = CongestionControl::new("nosuchcc").expect_err("not a kernel algorithm");
        let CongestionError::NotAvailable { available, .. } = &err else {
            panic!("{err}");
        };
        assert!(available.contains("reno"), "{err}");
    }
}
