//! An operator's drain: the backend gets no new connection under any strategy, its open
//! connections go on, and the state survives reloads until the backend is enabled again.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weighbridge::{AdminError, AdminState};

use support::{LISTENER, Mock, bounded, config, connect_identify, start_balancer};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn drained_backend_takes_nothing_new_keeps_its_connections_and_survives_reloads() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        for strategy in [
            "weighted_round_robin",
            "weighted_random",
            "capacity_proportional",
        ] {
            let text = config(strategy, "", &[(mocks[0].addr, 1.0), (mocks[1].addr, 1.0)]);
            let lb = start_balancer(&text);
            // One connection to backend 1 that must outlive the drain.
            let mut held = loop {
                let (stream, id) = connect_identify(lb.addr).await;
                if id == 1 {
                    break stream;
                }
            };
            lb.handle
                .set_admin_state(LISTENER, mocks[1].addr, AdminState::Drained)
                .await
                .expect("backend 1 is configured");
            for _ in 0..50 {
                assert_eq!(
                    connect_identify(lb.addr).await.1,
                    0,
                    "{strategy}: drained got one"
                );
            }
            held.write_all(b"still")
                .await
                .expect("write to drained backend");
            let mut echo = [0_u8; 5];
            held.read_exact(&mut echo)
                .await
                .expect("echo from drained backend");
            assert_eq!(&echo, b"still");
            assert_eq!(lb.backend(mocks[1].addr).active, 1);

            // A reload of the same file keeps the drain.
            let reloaded =
                weighbridge::Config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
            lb.handle.apply(reloaded).await.expect("reload");
            for _ in 0..20 {
                assert_eq!(
                    connect_identify(lb.addr).await.1,
                    0,
                    "{strategy}: drain lost"
                );
            }

            lb.handle
                .set_admin_state(LISTENER, mocks[1].addr, AdminState::Ready)
                .await
                .expect("backend 1 is configured");
            let mut seen = [0; 2];
            for _ in 0..40 {
                seen[connect_identify(lb.addr).await.1 as usize] += 1;
            }
            assert!(
                seen[1] > 0,
                "{strategy}: enabled backend gets connections again"
            );
            drop(held);
            lb.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_listener_or_backend_is_refused() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let lb = start_balancer(&config("weighted_round_robin", "", &[(mock.addr, 1.0)]));
        let nowhere = "127.0.0.1:9".parse().expect("literal");
        assert_eq!(
            lb.handle
                .set_admin_state("nope", mock.addr, AdminState::Drained)
                .await,
            Err(AdminError::UnknownListener("nope".into()))
        );
        assert_eq!(
            lb.handle
                .set_admin_state(LISTENER, nowhere, AdminState::Drained)
                .await,
            Err(AdminError::UnknownBackend(LISTENER.into(), nowhere))
        );
        assert_eq!(connect_identify(lb.addr).await.1, 0);
        lb.stop().await;
    })
    .await;
}
