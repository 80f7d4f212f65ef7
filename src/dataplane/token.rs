//! The epoll token layout: which listener, or which connection and which of its two sockets,
//! an event is for.
//!
//! A connection token holds its slot in the worker's table, the slot's generation (so an event
//! for a closed connection whose slot was reused is recognised and dropped) and the socket's
//! [`Side`]. Listener tokens set [`LISTENER_BIT`]; the waker has a token of its own.

use mio::Token;

use crate::state::Waiter;

/// Token of the worker's waker, which `Remote::send` fires after queuing a command.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// Listener tokens have this bit set; connection tokens do not.
pub(crate) const LISTENER_BIT: usize = 1 << 62;

/// Which socket of a connection an event is for. The backend socket's token carries the parity
/// of the connect attempt it belongs to: after a failed attempt, events still queued for the
/// closed socket of the previous attempt are recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Backend { odd_attempt: bool },
}

impl Side {
    /// The two low bits of the socket's token.
    pub(crate) fn bits(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Backend { odd_attempt: false } => 1,
            Side::Backend { odd_attempt: true } => 2,
        }
    }

    /// The side a token's two low bits name.
    pub(crate) fn from_bits(token: usize) -> Side {
        match token & 3 {
            0 => Side::Client,
            1 => Side::Backend { odd_attempt: false },
            _ => Side::Backend { odd_attempt: true },
        }
    }

    pub(crate) fn backend(attempt: u32) -> Side {
        Side::Backend {
            odd_attempt: attempt % 2 == 1,
        }
    }
}

/// Where a connection lives (its worker, its slot and the slot's generation): what gives its
/// sockets their tokens, and what a pool's queue knows it by while it waits. Passed to each
/// call rather than kept in the connection, which would cost every connection its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tokens {
    pub(crate) worker: usize,
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl Tokens {
    /// The token of the connection's socket on `side`.
    pub(crate) fn token(self, side: Side) -> Token {
        conn_token(self.slot, self.generation, side)
    }

    /// The connection as a pool's queue holds it.
    pub(crate) fn waiter(self) -> Waiter {
        Waiter {
            worker: self.worker,
            slot: self.slot,
            generation: self.generation,
            key: None,
        }
    }
}

/// Bits a token keeps of a slot and of a generation: 30 each, clear of [`LISTENER_BIT`] and of
/// [`WAKER`].
pub(crate) const MASK: usize = 0x3fff_ffff;

/// A connection socket's token: slot, generation and which socket of the connection.
pub(crate) fn conn_token(slot: u32, generation: u32, side: Side) -> Token {
    Token(((generation as usize & MASK) << 32) | ((slot as usize) << 2) | side.bits())
}

/// What a connection socket's token holds: (slot, generation as far as the token keeps it).
pub(crate) fn conn_of(token: Token) -> (usize, u32) {
    ((token.0 >> 2) & MASK, ((token.0 >> 32) & MASK) as u32)
}
