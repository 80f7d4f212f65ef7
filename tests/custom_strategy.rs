//! A strategy defined outside the crate (the one of examples/custom_strategy.rs) runs in a real
//! balancer: it replaces the file's strategy, reads live counters on every pick, and keeps its
//! place across a reload.

#[allow(dead_code)]
#[path = "../examples/custom_strategy.rs"]
mod example;

use example::{LeastTrafficBuilder, config, named_backend, send};
use tokio_util::sync::CancellationToken;
use weighbridge::{Balancer, StartError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategy_defined_outside_the_crate_routes_by_live_counters() {
    let config = config(
        named_backend("a").expect("backend a"),
        named_backend("b").expect("backend b"),
    )
    .expect("valid config");
    let balancer = Balancer::builder(config.clone())
        .strategy("chat", LeastTrafficBuilder)
        .bind()
        .expect("bind");
    let handle = balancer.handle();
    let lb = balancer.local_addr("chat").expect("bound");
    let stop = CancellationToken::new();
    let running = tokio::spawn(balancer.run(stop.clone()));

    let answers = tokio::task::spawn_blocking(move || {
        // The file says weighted round robin, which would alternate a, b, a, b.
        [1 << 20, 10, 10, 10]
            .map(|bytes| send(lb, bytes).expect("a connection through the balancer"))
    })
    .await
    .expect("the client thread");
    assert_eq!(
        answers,
        ["a", "b", "b", "b"].map(String::from),
        "after 1 MiB to a, the small uploads all go to b"
    );

    // A reload rebuilds the pool with the builder the balancer was given, not the file's.
    handle.apply(config).await.expect("reload");
    let after = tokio::task::spawn_blocking(move || send(lb, 10).expect("a connection"))
        .await
        .expect("the client thread");
    assert_eq!(after, "b", "the custom strategy survives a reload");

    stop.cancel();
    running.await.expect("the balancer task");
}

#[tokio::test]
async fn a_strategy_for_a_listener_the_file_does_not_have_is_refused() {
    let config = config(
        "127.0.0.1:1".parse().expect("literal"),
        "127.0.0.1:2".parse().expect("literal"),
    )
    .expect("valid config");
    let err = Balancer::builder(config)
        .strategy("nope", LeastTrafficBuilder)
        .bind()
        .expect_err("unknown listener");
    assert!(
        matches!(err, StartError::UnknownListener(ref name) if name == "nope"),
        "{err}"
    );
}
