//! Binary upgrade without a refused connection, as nginx's SIGUSR2 and HAProxy's `-x` do it.
//!
//! On SIGUSR2 the running process (the old one) starts its own executable again, as it sits on
//! disk now (the new binary), with the same arguments and `--upgrade-from PATH`. Over the Unix
//! socket at PATH (`SOCK_SEQPACKET`, one message per socket) it sends a copy of every listening
//! socket with `SCM_RIGHTS`, each labelled with what it serves. The new process serves on those
//! sockets (matched to its listeners by name and `bind`, or by address) instead of binding, and
//! once every listener accepts it answers `ready`: the old process then shuts down as on SIGTERM,
//! draining its open connections for `shutdown_grace`. Its copies close; the sockets, and the
//! connections waiting in their queues, stay with the new process, so no client is refused.
//! If the new process fails before `ready`, the old one logs why and keeps serving.

use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use tracing::{info, warn};
use weighbridge::{Handle, InheritedSocket, Served};

/// The flag the new process is started with.
pub(crate) const FLAG: &str = "--upgrade-from";
/// How long the new process may take to connect, and then to accept on every listener.
const HANDOVER_WITHIN: Duration = Duration::from_secs(60);
/// The longest label of a socket (a listener's name and address).
const LABEL_MAX: usize = 4096;
/// The message that ends the list of sockets.
const END: &[u8] = b"end";
/// The new process's answer once every listener accepts.
const READY: &[u8] = b"ready";

/// Starts the new binary, hands it the listening sockets and waits until it accepts on them.
/// Returns its process id; on any failure the caller keeps serving.
pub(crate) async fn hand_over(handle: &Handle) -> Result<u32, String> {
    let sockets = handle
        .listening_sockets()
        .await
        .map_err(|e| format!("cannot copy the listening sockets: {e}"))?;
    tokio::task::spawn_blocking(move || hand_over_blocking(sockets))
        .await
        .map_err(|e| format!("the handover thread failed: {e}"))?
}

fn hand_over_blocking(sockets: Vec<InheritedSocket>) -> Result<u32, String> {
    let path = socket_path();
    // A socket file left by a process that died mid-upgrade would fail the bind.
    drop(std::fs::remove_file(&path));
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| format!("cannot create the upgrade socket: {e}"))?;
    let addr = SocketAddrUnix::new(&path)
        .map_err(|e| format!("upgrade socket {}: {e}", path.display()))?;
    rustix::net::bind(&listener, &addr)
        .and_then(|()| rustix::net::listen(&listener, 1))
        .and_then(|()| {
            sockopt::set_socket_timeout(&listener, sockopt::Timeout::Recv, Some(HANDOVER_WITHIN))
        })
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let result = spawn(&path).and_then(|mut child| {
        let pid = child.id();
        info!(new_pid = pid, socket = %path.display(), "binary upgrade: new process started");
        let outcome = send_sockets(&listener, &sockets);
        if outcome.is_err() {
            // Reaps it if it has already died; a live one is left to finish its own failure.
            drop(child.try_wait());
        }
        outcome.map(|()| pid)
    });
    drop(std::fs::remove_file(&path));
    result
}

/// Accepts the new process's connection, sends every socket and waits for `ready`.
fn send_sockets(listener: &OwnedFd, sockets: &[InheritedSocket]) -> Result<(), String> {
    let conn = rustix::net::accept_with(listener, SocketFlags::CLOEXEC)
        .map_err(|e| format!("the new process did not connect: {e}"))?;
    sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(HANDOVER_WITHIN))
        .map_err(|e| format!("upgrade socket: {e}"))?;
    for socket in sockets {
        let label = label(&socket.served);
        let fds = [socket.socket.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err("no room for a descriptor in the message".to_owned());
        }
        rustix::net::sendmsg(
            &conn,
            &[IoSlice::new(label.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(|e| format!("cannot send a socket to the new process: {e}"))?;
    }
    rustix::net::send(&conn, END, SendFlags::empty())
        .map_err(|e| format!("cannot send to the new process: {e}"))?;
    let mut answer = [0; 16];
    match rustix::net::recv(&conn, &mut answer, RecvFlags::empty()) {
        Ok((n, _)) if &answer[..n] == READY => Ok(()),
        Ok((0, _)) => Err("the new process exited before accepting (its log says why)".to_owned()),
        Ok(_) => Err("the new process answered something else than `ready`".to_owned()),
        Err(e) => Err(format!("no answer from the new process: {e}")),
    }
}

/// Where the upgrade socket goes: systemd's `RuntimeDirectory=` if there is one, else the
/// temporary directory.
fn socket_path() -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| std::env::split_paths(&dirs).next())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("weighbridge-upgrade-{}.sock", std::process::id()))
}

/// Starts the executable as it is on disk now with this process's arguments and `--upgrade-from`.
fn spawn(path: &Path) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the executable: {e}"))?;
    // /proc/self/exe names a replaced binary "PATH (deleted)"; the new one is at PATH.
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    };
    let mut args: Vec<OsString> = Vec::new();
    let mut old = std::env::args_os().skip(1);
    while let Some(arg) = old.next() {
        // A process that was itself upgraded passes its own `--upgrade-from` on no further.
        if arg == FLAG {
            old.next();
        } else if !arg.to_string_lossy().starts_with(&format!("{FLAG}=")) {
            args.push(arg);
        }
    }
    std::process::Command::new(&exe)
        .args(args)
        .arg(FLAG)
        .arg(path)
        // systemd's sockets reach it through this process; its watchdog is the main process's,
        // which the new one becomes.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

fn label(served: &Served) -> String {
    match served {
        Served::Listener { name, bind } => format!("listener {bind} {name}"),
        Served::Admin { bind } => format!("admin {bind}"),
        _ => "unknown".to_owned(),
    }
}

fn parse_label(label: &str) -> Result<Served, String> {
    let bad = || format!("unexpected socket label `{label}`");
    let mut parts = label.splitn(3, ' ');
    let kind = parts.next().ok_or_else(bad)?;
    let addr = |s: Option<&str>| s.and_then(|s| s.parse::<SocketAddr>().ok()).ok_or_else(bad);
    Ok(match kind {
        "listener" => {
            let bind = addr(parts.next())?;
            let name = parts.next().ok_or_else(bad)?.to_owned();
            Served::Listener { name, bind }
        }
        "admin" => Served::Admin {
            bind: addr(parts.next())?,
        },
        "unknown" => Served::Unknown,
        _ => return Err(bad()),
    })
}

/// The new process's end: the connection to the old process, answered once every listener
/// accepts.
#[derive(Debug)]
pub(crate) struct Predecessor(Mutex<Option<OwnedFd>>);

impl Predecessor {
    /// Tells the old process to stop accepting and drain; once.
    pub(crate) fn ready(&self) {
        let conn = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(conn) = conn {
            match rustix::net::send(&conn, READY, SendFlags::empty()) {
                Ok(_) => info!("binary upgrade: accepting; the old process drains and exits"),
                Err(e) => {
                    warn!(error = %e, "cannot tell the old process; it keeps serving beside this one")
                }
            }
        }
    }
}

/// Connects to the old process at `path` and receives its listening sockets.
pub(crate) fn take_over(path: &Path) -> Result<(Vec<InheritedSocket>, Predecessor), String> {
    let fail = |e: rustix::io::Errno| format!("{FLAG} {}: {e}", path.display());
    let conn = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(fail)?;
    let addr = SocketAddrUnix::new(path).map_err(fail)?;
    rustix::net::connect(&conn, &addr).map_err(fail)?;
    sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(HANDOVER_WITHIN))
        .map_err(fail)?;
    let mut sockets = Vec::new();
    loop {
        let mut label = [0; LABEL_MAX];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            &conn,
            &mut [IoSliceMut::new(&mut label)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(fail)?;
        let text = &label[..received.bytes];
        if text == END {
            break;
        }
        if received.bytes == 0 {
            return Err(format!(
                "{FLAG} {}: the old process hung up",
                path.display()
            ));
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        let served = parse_label(&String::from_utf8_lossy(text))?;
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| format!("{FLAG}: a label without a socket"))?;
        sockets.push(InheritedSocket {
            served,
            socket: std::net::TcpListener::from(fd),
        });
    }
    info!(
        sockets = sockets.len(),
        "binary upgrade: listening sockets received"
    );
    Ok((sockets, Predecessor(Mutex::new(Some(conn)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_back_as_written() {
        for served in [
            Served::Listener {
                name: "chat with spaces".to_owned(),
                bind: "[::1]:8000".parse().expect("an address"),
            },
            Served::Admin {
                bind: "127.0.0.1:0".parse().expect("an address"),
            },
            Served::Unknown,
        ] {
            assert_eq!(parse_label(&label(&served)), Ok(served));
        }
        assert!(parse_label("listener nonsense").is_err());
    }
}
