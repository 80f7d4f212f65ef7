//! The zero-copy direction: `splice(2)` socket → pipe → socket (Linux).
//!
//! A pipe is the kernel buffer `splice` needs between two sockets. Pipes come from a small
//! per-thread pool and go back to it the moment they are empty, so only a connection with bytes
//! in flight holds one: ten thousand idle streams hold no pipe at all, and a busy thread reuses
//! the same few pipes instead of creating two descriptors per connection.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use mio::net::TcpStream;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};

/// Capacity asked for each pipe, and so the most bytes one `splice` call moves. Larger than
/// the kernel's 64 KiB default: bulk streams then need fewer system calls per byte. The kernel
/// allocates pipe pages only as they fill, so an empty pipe costs no more for it.
const PIPE_SIZE: usize = 512 * 1024;
const CHUNK: usize = PIPE_SIZE;
/// Empty pipes kept per thread for reuse; more are closed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// How many of this thread's next [`Pipe::take`]s fail, as in a process out of descriptors.
    pub(super) static REFUSE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Never block in the kernel (the sockets are non-blocking already; this covers the pipe), and
/// move pages rather than copy them where the kernel can.
const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

/// What one `splice` call did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Spliced {
    /// Moved this many bytes (0 from a socket: its end of stream).
    Moved(usize),
    /// The socket had nothing (or took nothing).
    WouldBlock,
}

fn spliced(result: rustix::io::Result<usize>) -> io::Result<Spliced> {
    match result {
        Ok(n) => Ok(Spliced::Moved(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(Spliced::WouldBlock),
        Err(e) => Err(e.into()),
    }
}

/// Both ends of one pipe.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one.
    pub(super) fn take() -> io::Result<Pipe> {
        #[cfg(test)]
        if REFUSE.with(|left| left.replace(left.get().saturating_sub(1))) > 0 {
            return Err(rustix::io::Errno::MFILE.into());
        }
        if let Some(pipe) = POOL.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // An unprivileged process may be limited (pipe-user-pages-soft); a pipe of the default
        // size still works, only with more system calls.
        if let Err(e) = fcntl_setpipe_size(&write, PIPE_SIZE) {
            tracing::debug!(error = %e, "cannot enlarge pipe; using the default size");
        }
        Ok(Pipe { read, write })
    }

    /// Moves what `src` has (up to the pipe's size) into this empty pipe.
    pub(super) fn fill_from(&self, src: &TcpStream) -> io::Result<Spliced> {
        spliced(splice(src, None, &self.write, None, CHUNK, FLAGS))
    }

    /// Moves up to `left` bytes from the pipe into `dst`.
    pub(super) fn drain_into(&self, dst: &TcpStream, left: usize) -> io::Result<Spliced> {
        match spliced(splice(&self.read, None, dst, None, left, FLAGS))? {
            Spliced::Moved(0) => Err(io::ErrorKind::WriteZero.into()),
            other => Ok(other),
        }
    }

    /// Returns an empty pipe to this thread's pool (or closes it if the pool is full).
    pub(super) fn give_back(self) {
        POOL.with_borrow_mut(|pool| {
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_pipes_and_keeps_at_most_its_maximum() {
        let pipes: Vec<Pipe> = (0..POOL_MAX + 6)
            .map(|_| Pipe::take().expect("create a pipe"))
            .collect();
        pipes.into_iter().for_each(Pipe::give_back);
        assert_eq!(POOL.with_borrow(Vec::len), POOL_MAX);
        let reused = Pipe::take().expect("a pooled pipe");
        assert_eq!(POOL.with_borrow(Vec::len), POOL_MAX - 1);
        reused.give_back();
    }
}
