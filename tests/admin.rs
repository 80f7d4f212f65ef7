//! The admin endpoint as an operator uses it: drain and enable over HTTP, reload, the bearer
//! token, and the JSON errors for requests it cannot serve.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    HttpResponse, LISTENER, Mock, Running, bounded, config_file, config_with_admin,
    connect_identify, eventually_async, http, metric, start_balancer, start_balancer_from_file,
};

const LIMIT: Duration = Duration::from_secs(30);
const SOON: Duration = Duration::from_secs(10);

/// Listener `lb` in a `/status` answer.
fn listener_status(status: &Value) -> &Value {
    status["listeners"]
        .as_array()
        .expect("listeners is an array")
        .iter()
        .find(|l| l["name"] == LISTENER)
        .expect("listener lb in status")
}

/// Backend `addr` of listener `lb` in a `/status` answer.
fn backend_status(status: &Value, addr: SocketAddr) -> Value {
    listener_status(status)["backends"]
        .as_array()
        .expect("backends is an array")
        .iter()
        .find(|b| b["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("backend {addr} in status"))
        .clone()
}

/// The value of the metric `name{listener="lb",backend="addr"}` in a `/metrics` answer.
fn backend_metric(metrics: &str, name: &str, addr: SocketAddr) -> f64 {
    let addr = addr.to_string();
    metric(metrics, name, &[("listener", LISTENER), ("backend", &addr)])
}

async fn status(lb: &Running) -> Value {
    let answer = http(lb.admin(), "GET", "/status", None).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()
}

async fn post(lb: &Running, path: &str) -> HttpResponse {
    http(lb.admin(), "POST", path, None).await
}

#[tokio::test]
async fn drain_over_http_moves_new_connections_away_and_lets_open_ones_finish() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let (a, b) = (mocks[0].addr, mocks[1].addr);
        let file = config_file(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(a, 1.0), (b, 1.0)],
            None,
        ));
        let lb = start_balancer_from_file(file.path());

        // Two open connections on each backend (round robin alternates).
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect_identify(lb.addr).await);
        }
        assert_eq!(held.iter().filter(|(_, id)| *id == 1).count(), 2);

        let drain = format!("/listeners/{LISTENER}/backends/{b}/drain");
        let answer = post(&lb, &drain).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let body = answer.json();
        assert_eq!(body["admin_state"], "drained");
        assert_eq!(body["active_connections"], 2);

        for _ in 0..20 {
            assert_eq!(
                connect_identify(lb.addr).await.1,
                0,
                "drained backend got one"
            );
        }
        // The open ones keep flowing.
        for (stream, id) in held.iter_mut().filter(|(_, id)| *id == 1) {
            stream
                .write_all(b"ping")
                .await
                .expect("write to drained backend");
            let mut echo = [0_u8; 4];
            stream
                .read_exact(&mut echo)
                .await
                .expect("echo from drained backend");
            assert_eq!(&echo, b"ping", "backend {id}");
        }
        let shown = backend_status(&status(&lb).await, b);
        assert_eq!(shown["admin_state"], "drained");
        assert_eq!(shown["effective_weight"], 0.0);
        assert_eq!(shown["weight"], 1.0);
        assert_eq!(shown["active_connections"], 2);
        let metrics = http(lb.admin(), "GET", "/metrics", None).await.body;
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_drained", b),
            1.0
        );
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_drained", a),
            0.0
        );
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_effective_weight", b),
            0.0
        );
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_connections_active", b),
            2.0
        );

        // A reload keeps the drain.
        let answer = post(&lb, "/reload").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["ok"], true);
        assert_eq!(
            backend_status(&status(&lb).await, b)["admin_state"],
            "drained"
        );
        for _ in 0..10 {
            assert_eq!(connect_identify(lb.addr).await.1, 0, "drain lost on reload");
        }

        // As the open connections close, the active count falls to 0.
        held.retain(|(_, id)| *id == 0);
        eventually_async(
            SOON,
            "drained backend's active count to reach 0",
            || async { backend_status(&status(&lb).await, b)["active_connections"] == 0 },
        )
        .await;
        let metrics = http(lb.admin(), "GET", "/metrics", None).await.body;
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_connections_active", b),
            0.0
        );

        let enable = format!("/listeners/{LISTENER}/backends/{b}/enable");
        let answer = post(&lb, &enable).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["admin_state"], "ready");
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(connect_identify(lb.addr).await.1);
        }
        assert!(
            ids.contains(&1),
            "enabled backend gets connections again: {ids:?}"
        );
        assert_eq!(
            backend_status(&status(&lb).await, b)["effective_weight"],
            1.0
        );
        drop(held);
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_configured_token_guards_everything_but_healthz() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let token = "correct-horse";
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0)],
            Some(token),
        ));
        let admin = lb.admin();
        let drain = format!("/listeners/{LISTENER}/backends/{}/drain", mock.addr);
        for (method, path) in [
            ("GET", "/status"),
            ("GET", "/metrics"),
            ("POST", "/reload"),
            ("POST", drain.as_str()),
            ("GET", "/no-such-path"),
        ] {
            for presented in [
                None,
                Some("wrong"),
                Some("correct-hors"),
                Some("correct-horse2"),
            ] {
                let answer = http(admin, method, path, presented).await;
                assert_eq!(
                    answer.status, 401,
                    "{method} {path} with {presented:?}: {answer:?}"
                );
                assert!(answer.json()["error"].is_string(), "{answer:?}");
                assert_eq!(
                    answer.header("www-authenticate"),
                    Some("Bearer realm=\"weighbridge\"")
                );
            }
        }
        // Nothing was drained by the refused requests.
        assert_eq!(connect_identify(lb.addr).await.1, 0);

        assert_eq!(http(admin, "GET", "/status", Some(token)).await.status, 200);
        assert_eq!(
            http(admin, "GET", "/metrics", Some(token)).await.status,
            200
        );
        let answer = http(admin, "GET", "/healthz", None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["status"], "ok");
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn requests_it_cannot_serve_get_json_errors_with_their_status() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0)],
            None,
        ));
        let backend = mock.addr;
        let cases: Vec<(&str, String, u16, &str)> = vec![
            ("GET", "/nope".into(), 404, "no such endpoint: /nope"),
            (
                "GET",
                "/listeners/lb/backends".into(),
                404,
                "no such endpoint",
            ),
            (
                "GET",
                "/reload".into(),
                405,
                "GET is not allowed on /reload",
            ),
            (
                "POST",
                "/metrics".into(),
                405,
                "POST is not allowed on /metrics",
            ),
            ("DELETE", "/status".into(), 405, "DELETE is not allowed"),
            (
                "GET",
                format!("/listeners/lb/backends/{backend}/drain"),
                405,
                "GET is not allowed",
            ),
            (
                "POST",
                "/listeners/lb/backends/not-an-address/drain".into(),
                400,
                "invalid backend address `not-an-address`",
            ),
            (
                "POST",
                "/listeners/lb/backends/127.0.0.1/enable".into(),
                400,
                "invalid backend address `127.0.0.1`",
            ),
            (
                "POST",
                format!("/listeners/nope/backends/{backend}/drain"),
                404,
                "no listener named `nope`",
            ),
            (
                "POST",
                "/listeners/lb/backends/127.0.0.1:9/drain".into(),
                404,
                "listener `lb` has no backend 127.0.0.1:9",
            ),
            (
                "POST",
                "/reload".into(),
                409,
                "no configuration file to reload from",
            ),
        ];
        for (method, path, status, needle) in cases {
            let answer = http(lb.admin(), method, &path, None).await;
            assert_eq!(answer.status, status, "{method} {path}: {answer:?}");
            assert_eq!(
                answer.header("content-type"),
                Some("application/json"),
                "{method} {path}"
            );
            let error = answer.json()["error"].as_str().map(str::to_owned);
            let error = error.unwrap_or_else(|| panic!("{method} {path}: no error in {answer:?}"));
            assert!(
                error.contains(needle),
                "{method} {path}: {error:?} lacks {needle:?}"
            );
        }
        // IPv6 backend addresses are written [::1]:port, percent-encoded or not.
        let answer = http(
            lb.admin(),
            "POST",
            "/listeners/lb/backends/%5B::1%5D:9/drain",
            None,
        )
        .await;
        assert_eq!(answer.status, 404, "{answer:?}");
        assert!(answer.body.contains("[::1]:9"), "{answer:?}");
        // The backend is still in service after all that.
        assert_eq!(connect_identify(lb.addr).await.1, 0);
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn reload_over_http_answers_with_the_summary_or_the_check_error() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let (a, b) = (mocks[0].addr, mocks[1].addr);
        let text =
            |wb: f64| config_with_admin("weighted_round_robin", "", &[(a, 1.0), (b, wb)], None);
        let file = config_file(&text(1.0));
        let lb = start_balancer_from_file(file.path());

        std::fs::write(file.path(), text(3.0)).expect("rewrite config");
        let answer = post(&lb, "/reload").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let body = answer.json();
        assert_eq!(body["ok"], true);
        let changes = body["changes"].as_str().expect("changes is text");
        assert!(
            changes.contains(&format!("weights changed: lb/{b} 1->3")),
            "{changes}"
        );
        assert_eq!(backend_status(&status(&lb).await, b)["weight"], 3.0);

        let broken = text(3.0).replace("weight = 3.0", "weight = -3");
        std::fs::write(file.path(), &broken).expect("rewrite config");
        let check = weighbridge::Config::load(file.path()).expect_err("the file is invalid");
        let answer = post(&lb, "/reload").await;
        assert_eq!(answer.status, 422, "{answer:?}");
        let body = answer.json();
        assert_eq!(body["ok"], false);
        assert_eq!(body["error"], check.to_string(), "same text as --check");

        let shown = status(&lb).await;
        assert_eq!(shown["config_file"], file.path().display().to_string());
        assert_eq!(shown["reloads"]["succeeded"], 1);
        assert_eq!(shown["reloads"]["failed"], 1);
        assert_eq!(shown["reloads"]["last"]["ok"], false);
        assert_eq!(shown["reloads"]["last"]["message"], check.to_string());
        assert!(
            shown["reloads"]["last"]["at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        // The running configuration stays in force.
        assert_eq!(backend_status(&shown, b)["weight"], 3.0);
        let metrics = http(lb.admin(), "GET", "/metrics", None).await.body;
        assert!(
            metrics.contains("weighbridge_reloads_total{result=\"success\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("weighbridge_reloads_total{result=\"failure\"} 1\n"),
            "{metrics}"
        );

        // [admin] and threads apply at restart: the reload says so and the endpoint stays where
        // it was. A second reload says so again: nothing took effect in between.
        let moved = text(3.0).replace(
            "[admin]\nbind = \"127.0.0.1:0\"",
            "[admin]\nbind = \"127.0.0.1:1\"\ntoken = \"new-token\"",
        );
        assert_ne!(moved, text(3.0));
        std::fs::write(file.path(), format!("threads = 7\n{moved}")).expect("rewrite config");
        for _ in 0..2 {
            let answer = post(&lb, "/reload").await;
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(
                answer.json()["needs_restart"],
                serde_json::json!([
                    "threads cores->7",
                    "[admin] bind 127.0.0.1:0->127.0.0.1:1",
                    "[admin] token"
                ])
            );
            assert!(!answer.body.contains("new-token"), "{answer:?}");
        }
        // Still no token needed, still on the same port.
        assert_eq!(http(lb.admin(), "GET", "/status", None).await.status, 200);
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn status_shows_the_backend_congestion_control_in_force() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(1).await;
        let a = mocks[0].addr;
        let text =
            |settings: &str| config_with_admin("weighted_round_robin", settings, &[(a, 1.0)], None);
        let file = config_file(&text(""));
        let lb = start_balancer_from_file(file.path());
        let shown = |status: Value| listener_status(&status)["backend_congestion_control"].clone();
        assert_eq!(shown(status(&lb).await), Value::Null, "the system's");

        // Reno: built into every Linux kernel and open to every process.
        std::fs::write(file.path(), text("backend_congestion_control = \"reno\""))
            .expect("rewrite");
        let answer = post(&lb, "/reload").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let changes = answer.json()["changes"].clone();
        assert_eq!(
            changes,
            format!("listeners changed: {LISTENER} (backend_congestion_control system->reno)")
        );
        assert_eq!(shown(status(&lb).await), "reno");
        lb.stop().await;
    })
    .await;
}

/// A backend a reload removes keeps its open connections, and the operator can watch them to
/// their end: `/status` lists it under `removed_backends`, and `/metrics` keeps its connection
/// series (it has no weight any more) until the last one has closed.
#[tokio::test]
async fn a_removed_backend_is_shown_until_its_last_connection_ends() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let (a, b) = (mocks[0].addr, mocks[1].addr);
        let text = |backends: &[(SocketAddr, f64)]| {
            config_with_admin("weighted_round_robin", "", backends, None)
        };
        let file = config_file(&text(&[(a, 1.0), (b, 1.0)]));
        let lb = start_balancer_from_file(file.path());
        // Round robin over two: one of two connections goes to each.
        let mut on_b = None;
        for _ in 0..2 {
            let (stream, id) = connect_identify(lb.addr).await;
            if id == 1 {
                on_b = Some(stream);
            }
        }
        let mut on_b = on_b.expect("one of two connections goes to b");
        let removed = |status: &Value| status["removed_backends"].clone();
        assert_eq!(removed(&status(&lb).await), serde_json::json!([]));

        std::fs::write(file.path(), text(&[(a, 1.0)])).expect("rewrite config");
        let answer = post(&lb, "/reload").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        // The connection goes on.
        on_b.write_all(b"ping")
            .await
            .expect("send after the reload");
        let mut echo = [0_u8; 4];
        on_b.read_exact(&mut echo)
            .await
            .expect("echo after the reload");
        assert_eq!(&echo, b"ping");

        let shown = removed(&status(&lb).await);
        assert_eq!(shown.as_array().map(Vec::len), Some(1), "{shown}");
        assert_eq!(shown[0]["listener"], LISTENER);
        assert_eq!(shown[0]["addr"], b.to_string());
        assert_eq!(shown[0]["active_connections"], 1);
        assert_eq!(shown[0]["connections_total"], 1);
        assert!(
            listener_status(&status(&lb).await)["backends"]
                .as_array()
                .expect("backends is an array")
                .iter()
                .all(|backend| backend["addr"] != b.to_string())
        );
        let metrics = http(lb.admin(), "GET", "/metrics", None).await.body;
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_connections_active", b),
            1.0
        );
        assert_eq!(
            backend_metric(&metrics, "weighbridge_backend_connections_total", b),
            1.0
        );
        let b_weight =
            format!("weighbridge_backend_weight{{listener=\"{LISTENER}\",backend=\"{b}\"}}");
        assert!(!metrics.contains(&b_weight), "{metrics}");

        drop(on_b);
        eventually_async(
            SOON,
            "the removed backend is gone once its connection is",
            || async { removed(&status(&lb).await) == serde_json::json!([]) },
        )
        .await;
        let metrics = http(lb.admin(), "GET", "/metrics", None).await.body;
        assert!(!metrics.contains(&format!("backend=\"{b}\"")), "{metrics}");
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn healthz_fails_once_shutdown_begins_while_reads_still_work() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0)],
            None,
        ));
        let admin = lb.admin();
        assert_eq!(http(admin, "GET", "/healthz", None).await.status, 200);
        // An open connection keeps the balancer in its grace period.
        let (held, _) = connect_identify(lb.addr).await;
        lb.shutdown.cancel();
        eventually_async(SOON, "/healthz to answer 503", || async {
            http(admin, "GET", "/healthz", None).await.status == 503
        })
        .await;
        let answer = http(admin, "GET", "/status", None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let drain = format!("/listeners/{LISTENER}/backends/{}/drain", mock.addr);
        let answer = http(admin, "POST", &drain, None).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(
            answer.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("shutting down"))
        );
        drop(held);
        let stopped = tokio::time::timeout(SOON, lb.task)
            .await
            .expect("the balancer stops once its connection closed")
            .expect("no panic");
        assert_eq!(stopped.cut_connections, 0);
        // The admin endpoint stopped with it.
        eventually_async(SOON, "the admin port to close", || async {
            TcpStream::connect(admin).await.is_err()
        })
        .await;
    })
    .await;
}

/// Silent clients on the admin port (no request, never closing) hold at most 64 connections, as
/// docs/observability.md says ("Limits and errors"): the next one is closed at once, and the
/// endpoint serves again as soon as one of them goes, so a scraper or an operator is not locked
/// out for good, and the data path's descriptors are not spent on them.
#[tokio::test]
async fn silent_admin_clients_are_capped_and_the_endpoint_recovers() {
    const MAX: usize = 64;
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0)],
            None,
        ));
        let admin = lb.admin();
        let mut silent = Vec::with_capacity(MAX);
        for _ in 0..MAX {
            silent.push(TcpStream::connect(admin).await.expect("connect to admin"));
        }
        let mut extra = TcpStream::connect(admin).await.expect("connect to admin");
        let mut byte = [0_u8; 1];
        let read = tokio::time::timeout(SOON, extra.read(&mut byte))
            .await
            .expect("the connection beyond the cap is closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The silent ones are still open: the endpoint did not close them to make room.
        for stream in &silent {
            let mut byte = [0_u8; 1];
            assert!(
                stream
                    .try_read(&mut byte)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
            );
        }
        // The data path is unaffected, and one silent client leaving lets a request in.
        let (_, id) = connect_identify(lb.addr).await;
        assert_eq!(id, 0);
        drop(silent.pop());
        // Until the endpoint has seen it go, a new client may still be turned away.
        eventually_async(SOON, "/healthz to answer again", || async {
            let Ok(mut stream) = TcpStream::connect(admin).await else {
                return false;
            };
            let request = "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
            let mut answer = Vec::new();
            stream.write_all(request.as_bytes()).await.is_ok()
                && stream.read_to_end(&mut answer).await.is_ok()
                && answer.starts_with(b"HTTP/1.1 200")
        })
        .await;
    })
    .await;
}
