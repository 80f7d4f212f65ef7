//! How the control plane and the other workers reach a worker: a channel of [`Command`]s and a
//! waker, behind a [`Remote`] any thread may hold.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, mpsc};

use mio::Waker;
use tracing::error;

use super::accept::Serving;
use super::queue::Grant;
use super::workers::Placed;
use crate::snapshot::Listener;
use crate::state::{OpenConn, Rejection};

/// What the control plane or another worker asks of a worker.
pub(crate) enum Command {
    /// Accept on `socket` for listener `name` until told [`Command::Unlisten`] with `id`.
    Listen {
        id: u64,
        name: String,
        socket: std::net::TcpListener,
        serving: Serving,
    },
    /// Stop accepting on listener socket `id` and send the socket back, still listening, so a
    /// reload can give it to a renamed listener without a moment in which the port is closed.
    ///
    /// With `serve_queue`, the connections already waiting in the socket's queue are accepted
    /// and served first: the socket is about to close (its listener removed or moved, or the
    /// balancer stopping), and closing it would reset each of them, clients whose handshake
    /// had completed. Without, they stay queued for whoever takes the socket over.
    Unlisten {
        id: u64,
        serve_queue: bool,
        reply: tokio::sync::oneshot::Sender<io::Result<std::net::TcpListener>>,
    },
    /// Serve a connection another worker accepted.
    Adopt(Box<Adopted>),
    /// Hand a slot to a client waiting in its pool's queue.
    Grant(Box<Grant>),
    /// Close a client waiting in its pool's queue (it is no longer in it).
    Dequeue {
        slot: u32,
        generation: u32,
        rejection: Rejection,
    },
    /// Close every connection now (shutdown's grace period is over), and every one adopted
    /// from now on.
    Cut,
    /// Close everything and end the thread.
    Exit,
}

/// A connection accepted on one worker and served on another.
pub(crate) struct Adopted {
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) listener: Arc<Listener>,
    pub(super) turn: u64,
    pub(super) counted: Counted,
}

/// What counts a connection while it lives: against its listener's `max_connections`, on its
/// worker's load, and as open for shutdown's drain.
#[derive(Debug)]
pub(crate) struct Counted {
    pub(super) _open: OpenConn,
    pub(super) _placed: Placed,
    pub(super) _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
}

/// How to reach a worker from any thread.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) waker: Arc<Waker>,
}

impl Remote {
    /// Queues `command` and wakes the worker; gives the command back if the worker has ended.
    pub(crate) fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        if let Err(e) = self.waker.wake() {
            // The command waits in the queue until something else wakes the worker.
            error!(error = %e, "cannot wake a worker");
        }
        Ok(())
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Listen { id, name, .. } => write!(f, "Listen({id}, {name})"),
            Command::Unlisten {
                id, serve_queue, ..
            } => write!(f, "Unlisten({id}, serve_queue: {serve_queue})"),
            Command::Adopt(adopted) => write!(f, "Adopt({})", adopted.peer),
            Command::Grant(grant) => write!(
                f,
                "Grant({}, {})",
                grant.waiter.slot, grant.waiter.generation
            ),
            Command::Dequeue {
                slot,
                generation,
                rejection,
            } => write!(f, "Dequeue({slot}, {generation}, {})", rejection.as_str()),
            Command::Cut => f.write_str("Cut"),
            Command::Exit => f.write_str("Exit"),
        }
    }
}
