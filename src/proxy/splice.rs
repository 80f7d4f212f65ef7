//! The zero-copy direction: `splice(2)` socket → pipe → socket (Linux).
//!
//! A pipe is the kernel buffer `splice` needs between two sockets. Pipes come from a small
//! per-thread pool and go back to it the moment they are empty, so only a connection with bytes
//! in flight holds one: ten thousand idle streams hold no pipe at all, and a busy thread reuses
//! the same few pipes instead of creating two descriptors per connection.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::relay::Activity;

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

/// Moves `src`'s bytes to `dst` until `src`'s end of stream.
pub(super) async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    count: impl Fn(u64),
) -> io::Result<()> {
    loop {
        src.readable().await?;
        let pipe = Pipe::take()?;
        // The pipe is empty, so "would block" can only mean the socket has nothing: clearing the
        // socket's readiness on it (what try_io does) is right.
        let filled = src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe.write, None, CHUNK, FLAGS).map_err(io::Error::from)
        });
        let n = match filled {
            Ok(0) => {
                pipe.give_back();
                return Ok(());
            }
            // No "short read means drained" shortcut here: a splice may also stop early when the
            // pipe runs out of slots, with bytes still queued on the socket.
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => {
                pipe.give_back();
                return Err(e);
            }
        };
        count(n as u64);
        activity.touch();
        let mut left = n;
        while left > 0 {
            let drained = dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst, None, left, FLAGS).map_err(io::Error::from)
            });
            match drained {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    left -= m;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                // The pipe still holds bytes: it is dropped (closed), not given back.
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
    }
}

/// Never block in the kernel (the sockets are non-blocking already; this covers the pipe), and
/// move pages rather than copy them where the kernel can.
const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

/// Both ends of one pipe.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one.
    fn take() -> io::Result<Pipe> {
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

    /// Returns an empty pipe to this thread's pool (or closes it if the pool is full).
    fn give_back(self) {
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
