//! systemd's socket activation: the listening sockets a `.socket` unit passes in (`LISTEN_FDS`,
//! for this process by `LISTEN_PID`), handed to the balancer to match to listeners by address.

use tracing::{info, warn};
use weighbridge::{InheritedSocket, Served};

/// The TCP listening sockets systemd passed; none when not socket-activated. A passed
/// descriptor that is not a TCP socket is logged and left alone.
pub(crate) fn systemd_sockets() -> Vec<InheritedSocket> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut sockets = Vec::with_capacity(fds.len());
    for index in 0..fds.len() {
        match fds.take_tcp_listener(index) {
            Ok(Some(socket)) => {
                let addr = socket.local_addr().ok();
                info!(fd = 3 + index, addr = ?addr, "socket passed by systemd");
                sockets.push(InheritedSocket {
                    served: Served::Unknown,
                    socket,
                });
            }
            Ok(None) => {}
            Err(e) => {
                warn!(fd = 3 + index, error = %e, "a descriptor passed by systemd is not a TCP listening socket; ignored")
            }
        }
    }
    sockets
}
