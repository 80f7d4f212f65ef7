//! Serving pools' queues: handing free slots to the oldest waiting clients, whichever worker
//! holds them, and closing waiting clients a reload or shutdown leaves without a pool.
//!
//! Whoever may have freed a slot serves the pool: a worker at the end of its turn, for the
//! pools in which it closed connections or failed connects while clients waited (see
//! `state::pool`), and the control task after it publishes a snapshot (a backend added,
//! enabled, healthy again, a reload raising `max_connections`, a server reporting less load).
//! Serving takes the slots itself, under the queue's lock, and sends each to the worker of the
//! client it goes to; the client connects with it there.

use std::sync::Arc;

use tracing::debug;

use super::conn::Granted;
use super::remote::Command;
use super::workers::Placement;
use crate::snapshot::{Snapshot, Take};
use crate::state::{PoolState, Rejection, Waiter};

/// A slot handed to a waiting client, on its way to the client's worker.
pub(crate) struct Grant {
    pub(super) waiter: Waiter,
    pub(super) granted: Granted,
}

/// Hands every slot free now in `state`'s pool to the oldest waiting clients, as the pool is in
/// `snapshot`. Grants for clients on worker `here` are returned, to be delivered by the caller;
/// the others are sent to their workers.
pub(crate) fn serve(
    snapshot: &Snapshot,
    state: &PoolState,
    placement: &Placement,
    here: Option<usize>,
) -> Vec<Grant> {
    let Some(pool) = snapshot.pool(state.name()) else {
        return Vec::new();
    };
    // A pool of the same name a reload replaced: its queue is another one.
    if !std::ptr::eq(Arc::as_ptr(pool.state()), state) {
        return Vec::new();
    }
    let served = state.serve(|waiter| {
        let turn = pool.next_turn();
        match pool.take_slot(turn, waiter.key, &[]) {
            Take::Slot(index, active) => Some((index, active, turn)),
            Take::Full | Take::NoBackend => None,
        }
    });
    let mut local = Vec::new();
    for (waiter, (index, active, turn)) in served {
        let grant = Grant {
            waiter,
            granted: Granted {
                pool: Arc::clone(pool),
                index,
                active,
                turn,
            },
        };
        if Some(waiter.worker) == here {
            local.push(grant);
        } else if waiter.worker < placement.count() {
            // A worker that has ended drops the grant with its channel, and the slot with it.
            if placement
                .remote(waiter.worker)
                .send(Command::Grant(Box::new(grant)))
                .is_err()
            {
                debug!(worker = waiter.worker, "worker gone; slot given back");
            }
        }
    }
    local
}

/// Serves every pool of `snapshot` that has clients waiting. For the control task, which
/// holds no client: every grant goes to a worker.
pub(crate) fn serve_all(snapshot: &Snapshot, placement: &Placement) {
    for pool in snapshot.pools() {
        if pool.state().waiting() > 0 {
            serve(snapshot, pool.state(), placement, None);
        }
    }
    // Grants that could not be delivered gave their slots back on this thread: serve those
    // pools again (a bounded number of times: only an ended worker refuses a grant).
    for _ in 0..4 {
        let freed = crate::state::take_freed();
        if freed.is_empty() {
            break;
        }
        for state in freed {
            serve(snapshot, &state, placement, None);
        }
    }
    drop(crate::state::take_freed());
}

/// Closes every client waiting in `state`'s queue, counted under `rejection`; with `close`,
/// the queue takes nobody any more (shutdown).
pub(crate) fn close_waiting(
    state: &PoolState,
    placement: &Placement,
    rejection: Rejection,
    close: bool,
) {
    for waiter in state.drain(close) {
        if waiter.worker < placement.count() {
            let command = Command::Dequeue {
                slot: waiter.slot,
                generation: waiter.generation,
                rejection,
            };
            // An ended worker has closed its clients already.
            drop(placement.remote(waiter.worker).send(command));
        }
    }
}
