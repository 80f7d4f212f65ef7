//! Time bounds: a limit on a whole test, and polling with a deadline instead of sleeping.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a polled condition is checked again.
pub const POLL: Duration = Duration::from_millis(5);

/// Runs `test`, failing if it has not finished within `limit`.
pub async fn bounded<F: Future>(limit: Duration, test: F) -> F::Output {
    match tokio::time::timeout(limit, test).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Checks `condition` every [`POLL`] until it holds or `within` has passed; returns whether it
/// held. For a caller that builds its own failure message; [`eventually`] fails for it.
pub async fn poll_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `condition` until it holds; fails naming `what` once `within` has passed.
pub async fn eventually(within: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(within, condition).await,
        "timed out after {within:?} waiting for {what}"
    );
}

/// Polls `probe` until it returns `expected`; fails with the last value seen once `within` has
/// passed.
pub async fn eventually_eq<T: PartialEq + Debug>(
    within: Duration,
    what: &str,
    expected: T,
    mut probe: impl FnMut() -> T,
) {
    let deadline = Instant::now() + within;
    loop {
        let seen = probe();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}: want {expected:?}, last saw {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`eventually`], for a condition that has to do I/O to find out.
pub async fn eventually_async<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
