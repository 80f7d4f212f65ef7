use super::*;
use crate::dataplane::token::conn_token;

#[test]
fn a_worker_ends_on_exit_and_its_remote_says_so_after() {
    let (event_loop, remote) = EventLoop::new(0).expect("an epoll instance");
    let (ended, has_ended) = mpsc::channel();
    std::thread::spawn(move || {
        event_loop.run();
        ended.send(()).expect("the test waits");
    });
    assert!(remote.send(Command::Exit).is_ok());
    has_ended
        .recv_timeout(Duration::from_secs(5))
        .expect("the loop returned");
    assert!(
        matches!(remote.send(Command::Cut), Err(Command::Cut)),
        "nobody receives any more, and the command comes back"
    );
}

#[test]
fn queue_lists_a_connection_once_and_the_next_turn_empties_the_list() {
    let mut worker = Worker::new(0);
    let mut queued = false;
    queue(&mut worker.again, &mut queued, 0, 3);
    queue(&mut worker.again, &mut queued, 0, 3);
    assert_eq!(worker.again, [(0, 3)]);
    assert_eq!(
        worker.timeout(),
        Some(Duration::ZERO),
        "the next turn comes at once"
    );
    // The connection is gone by then: its entry is dropped all the same.
    worker.resume_all();
    assert!(worker.again.is_empty());
}

#[test]
fn timers_of_closed_connections_are_pruned() {
    let mut worker = Worker::new(0);
    let later = worker.now + Duration::from_secs(600);
    for slot in 0..3 * PRUNE_FLOOR as u32 {
        worker.timers.push(Reverse((later, slot, 0)));
    }
    let peak = worker.timers.capacity();
    worker.prune_timers();
    assert!(worker.timers.is_empty(), "{} left", worker.timers.len());
    assert!(
        worker.timers.capacity() <= 2 * PRUNE_FLOOR,
        "capacity {} of {peak} at the peak",
        worker.timers.capacity()
    );
}

#[test]
fn tokens_of_connections_and_listeners_never_meet() {
    let highest = conn_token(u32::MAX >> 2, u32::MAX, Side::Backend { odd_attempt: true });
    assert_eq!(highest.0 & LISTENER_BIT, 0);
    assert_ne!(highest, WAKER);
    let token = conn_token(12_345, 7, Side::Client);
    assert_eq!(conn_of(token), (12_345, 7));
    assert_ne!(Token(LISTENER_BIT | 3), WAKER);
}
