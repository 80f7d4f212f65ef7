//! `weighbridge ctl` and `weighbridge top --once` as an operator runs them, against a balancer
//! serving on loopback: what they print, and the exit code and one line of each failure.

mod support;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::Command;

use support::{
    BIN, LISTENER, Mock, Process, Running, bounded, config_file, config_with_admin,
    connect_identify, eventually_async, http, run, run_command, start_balancer,
    start_balancer_from_file,
};

const LIMIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-token";

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts a failed run: `code`, one line on stderr containing every needle.
fn assert_fails(output: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("weighbridge: error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
}

/// `weighbridge ctl --admin ADDR [--token TOKEN] ARGS...`, without any configuration file or
/// token in the environment.
async fn ctl(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> Output {
    let admin = admin.to_string();
    let mut command = Command::new(BIN);
    command.args(["ctl", "--admin", &admin]);
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    run_command(
        command
            .args(args)
            .env_remove("WEIGHBRIDGE_TOKEN")
            .env_remove("WEIGHBRIDGE_CONFIG"),
    )
    .await
}

/// An address where nothing listens: bound by the kernel, then closed.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

/// A configuration file whose `[admin]` names the running balancer's endpoint (and token): what
/// an operator's `/etc/weighbridge/weighbridge.toml` is to `ctl` on the balancer's host.
fn file_naming(lb: &Running, token: Option<&str>) -> tempfile::NamedTempFile {
    let mut text =
        "[[listener]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\n[[listener.backend]]\naddr = \"127.0.0.1:9\"\n"
            .to_owned();
    text.push_str(&format!("[admin]\nbind = \"{}\"\n", lb.admin()));
    if let Some(token) = token {
        text.push_str(&format!("token = \"{token}\"\n"));
    }
    config_file(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_tables_and_the_json_unchanged() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mocks[0].addr, 2.0), (mocks[1].addr, 1.0)],
            None,
        ));
        let (_held, _) = connect_identify(lb.addr).await;
        let output = ctl(lb.admin(), None, &["status"]).await;
        assert!(output.status.success(), "{output:?}");
        let text = stdout(&output);
        for needle in [
            &format!("weighbridge {}, up ", env!("CARGO_PKG_VERSION")),
            "LISTENER",
            "CONN/S AVG",
            &lb.addr.to_string(),
            "weighted_round_robin",
            "BACKEND",
            "CONNECT P99",
            &mocks[0].addr.to_string(),
            &mocks[1].addr.to_string(),
            "healthy",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        let listener_row = text
            .lines()
            .find(|l| l.starts_with(LISTENER))
            .unwrap_or_else(|| panic!("no row for {LISTENER}:\n{text}"));
        let open: Vec<&str> = listener_row.split_whitespace().collect();
        assert_eq!(open[4], "1", "one connection open: {listener_row}");
        let backend_row = text
            .lines()
            .find(|l| l.starts_with(&mocks[0].addr.to_string()))
            .expect("a row for the first backend");
        assert!(backend_row.contains("1/-"), "{backend_row}");
        assert!(backend_row.ends_with("ms"), "a connect time: {backend_row}");

        let json = ctl(lb.admin(), None, &["status", "--json"]).await;
        assert!(json.status.success(), "{json:?}");
        let shown: serde_json::Value =
            serde_json::from_str(&stdout(&json)).expect("--json prints JSON");
        let direct = http(lb.admin(), "GET", "/status", None).await.json();
        assert_eq!(shown["listeners"], direct["listeners"]);
        assert_eq!(shown["started_at"], direct["started_at"]);
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_and_token_come_from_the_configuration_file() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0)],
            Some(TOKEN),
        ));
        let file = file_naming(&lb, Some(TOKEN));
        let path = file.path().to_str().expect("utf-8 temp path");
        // --config before the subcommand, after it, and $WEIGHBRIDGE_CONFIG.
        for (args, env) in [
            (vec!["--config", path, "ctl", "status"], None),
            (vec!["ctl", "--config", path, "status"], None),
            (vec!["ctl", "status", "--config", path], None),
            (vec!["ctl", "status"], Some(path)),
        ] {
            let mut command = Command::new(BIN);
            command.args(&args).env_remove("WEIGHBRIDGE_TOKEN");
            match env {
                Some(path) => command.env("WEIGHBRIDGE_CONFIG", path),
                None => command.env_remove("WEIGHBRIDGE_CONFIG"),
            };
            let output = run_command(&mut command).await;
            assert!(output.status.success(), "{args:?}: {output:?}");
            assert!(stdout(&output).contains(&mock.addr.to_string()));
        }

        // A wrong token names where it came from: the flag, the environment, or the file.
        let wrong = run_command(
            Command::new(BIN)
                .args(["ctl", "--config", path, "--token", "nope", "status"])
                .env_remove("WEIGHBRIDGE_TOKEN"),
        )
        .await;
        assert_fails(
            &wrong,
            4,
            &["--token", "invalid bearer token", &lb.admin().to_string()],
        );
        let wrong = run_command(
            Command::new(BIN)
                .args(["ctl", "--config", path, "status"])
                .env("WEIGHBRIDGE_TOKEN", "nope"),
        )
        .await;
        assert_fails(&wrong, 4, &["$WEIGHBRIDGE_TOKEN"]);
        let stale = file_naming(&lb, Some("an-old-token"));
        let stale_path = stale.path().to_str().expect("utf-8 temp path");
        let wrong = run_command(
            Command::new(BIN)
                .args(["ctl", "--config", stale_path, "status"])
                .env_remove("WEIGHBRIDGE_TOKEN"),
        )
        .await;
        assert_fails(&wrong, 4, &["[admin] token in", stale_path]);
        let missing = ctl(lb.admin(), None, &["status"]).await;
        assert_fails(&missing, 4, &["no token", "missing bearer token"]);
        let given = ctl(lb.admin(), Some(TOKEN), &["status"]).await;
        assert!(given.status.success(), "{given:?}");
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_endpoint_or_a_file_without_admin_is_one_line() {
    bounded(LIMIT, async {
        let nowhere = closed_port().await;
        let output = ctl(nowhere, None, &["status"]).await;
        assert_fails(&output, 3, &["cannot reach the admin endpoint", &nowhere.to_string(), "--admin"]);
        let top = run_command(
            Command::new(BIN).args(["top", "--once", "--admin", &nowhere.to_string()]),
        )
        .await;
        assert_fails(&top, 3, &[&nowhere.to_string()]);

        let file = config_file(
            "[[listener]]\nname = \"x\"\nbind = \"127.0.0.1:0\"\n[[listener.backend]]\naddr = \"127.0.0.1:9\"\n",
        );
        let path = file.path().to_str().expect("utf-8 temp path");
        let output = run(&["ctl", "--config", path, "reload"]).await;
        assert_fails(&output, 1, &["has no [admin] table", "--admin"]);
        let output = run(&["ctl", "--admin", "127.0.0.1", "status"]).await;
        assert_fails(&output, 1, &["no port"]);
        // The balancer's own flags mean nothing to a subcommand: a usage error, not ignored.
        let output = run(&["--check", "ctl", "--admin", "127.0.0.1:9", "status"]).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--check"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_enable_through_a_listener_or_a_pool_and_unknown_names_list_the_known() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mocks[0].addr, 1.0), (mocks[1].addr, 1.0)],
            None,
        ));
        let backend = mocks[1].addr.to_string();
        let admin_state = || async {
            let status = http(lb.admin(), "GET", "/status", None).await.json();
            status["pools"][0]["backends"][1]["admin_state"]
                .as_str()
                .expect("a state")
                .to_owned()
        };
        let output = ctl(lb.admin(), None, &["drain", LISTENER, &backend]).await;
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            stdout(&output).trim(),
            format!("drained {backend} in listener `{LISTENER}`: 0 open connection(s)")
        );
        assert_eq!(admin_state().await, "drained");
        for _ in 0..10 {
            assert_eq!(connect_identify(lb.addr).await.1, 0, "drained gets nothing");
        }
        // A listener's own pool has its name.
        let output = ctl(lb.admin(), None, &["enable", LISTENER, &backend]).await;
        assert!(output.status.success(), "{output:?}");
        assert!(stdout(&output).starts_with("enabled "), "{output:?}");
        assert_eq!(admin_state().await, "ready");

        let unknown = ctl(lb.admin(), None, &["drain", "nope", &backend]).await;
        assert_fails(
            &unknown,
            5,
            &["no listener or pool named `nope`", "listeners: lb"],
        );
        let unknown = ctl(lb.admin(), None, &["enable", LISTENER, "127.0.0.1:1"]).await;
        assert_fails(
            &unknown,
            5,
            &[
                "has no backend 127.0.0.1:1",
                &mocks[0].addr.to_string(),
                &backend,
            ],
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_counts_down_to_zero_or_times_out_saying_how_many_are_left() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let other = Mock::identify(1).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mock.addr, 1.0), (other.addr, 1.0)],
            None,
        ));
        let backend = mock.addr.to_string();
        let held = loop {
            let (stream, id) = connect_identify(lb.addr).await;
            if id == 0 {
                break stream;
            }
        };
        eventually_async(Duration::from_secs(10), "the backend counts its connection", || async {
            http(lb.admin(), "GET", "/status", None).await.json()["pools"][0]["backends"][0]
                ["active_connections"]
                == 1
        })
        .await;

        let timed_out = ctl(
            lb.admin(),
            None,
            &["drain", LISTENER, &backend, "--wait", "--timeout", "1s"],
        )
        .await;
        // The countdown goes to stderr before the error: the error is the last line.
        let stderr = String::from_utf8_lossy(&timed_out.stderr).into_owned();
        let (progress, last) = stderr
            .trim_end()
            .rsplit_once('\n')
            .expect("progress, then the error");
        assert_eq!(
            progress,
            format!("waiting for {backend}: 1 open connection(s)")
        );
        let only_error = Output {
            stderr: format!("{last}\n").into_bytes(),
            ..timed_out.clone()
        };
        assert_fails(
            &only_error,
            7,
            &[
                "timed out after 1s",
                &backend,
                "still has 1 open connection(s)",
                "stays drained",
            ],
        );
        assert!(
            stdout(&timed_out).starts_with("drained "),
            "drained first: {timed_out:?}"
        );

        let admin = lb.admin().to_string();
        let mut waiting = Process::spawn(
            Command::new(BIN)
                .args([
                    "ctl", "--admin", &admin, "drain", LISTENER, &backend, "--wait",
                ])
                .env_remove("WEIGHBRIDGE_CONFIG")
                .env_remove("WEIGHBRIDGE_TOKEN"),
        );
        waiting
            .wait_for(&format!("waiting for {backend}: 1 open connection(s)"), 1)
            .await;
        assert!(
            waiting.running(),
            "still waiting while the connection is open"
        );
        drop(held);
        let status = waiting.exit_status(Duration::from_secs(10)).await;
        assert!(status.success(), "{status:?}: {}", waiting.tail());
        assert!(
            waiting
                .logged(&format!("waiting for {backend}: 0 open connection(s)"))
                .is_some(),
            "{}",
            waiting.tail()
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_what_changed_or_the_error_of_a_refused_file() {
    bounded(LIMIT, async {
        let mock = Mock::identify(0).await;
        let text = |weight: &str| {
            config_with_admin("weighted_round_robin", "", &[(mock.addr, 1.0)], None)
                .replace("weight = 1.0", &format!("weight = {weight}"))
        };
        let file = config_file(&text("1.0"));
        let lb = start_balancer_from_file(file.path());
        std::fs::write(file.path(), text("2.5")).expect("rewrite the file");
        let output = ctl(lb.admin(), None, &["reload"]).await;
        assert!(output.status.success(), "{output:?}");
        let said = stdout(&output);
        assert!(said.starts_with("reloaded: "), "{said}");
        assert!(said.contains("1->2.5"), "{said}");

        std::fs::write(file.path(), text("\"heavy\"")).expect("rewrite the file");
        let refused = ctl(lb.admin(), None, &["reload"]).await;
        assert_fails(
            &refused,
            6,
            &[
                "reload refused",
                "running configuration stays in force",
                "weight",
            ],
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_a_frame_with_rates_from_two_readings() {
    bounded(LIMIT, async {
        let mocks = Mock::identify_many(2).await;
        let lb = start_balancer(&config_with_admin(
            "weighted_round_robin",
            "",
            &[(mocks[0].addr, 2.0), (mocks[1].addr, 1.0)],
            Some(TOKEN),
        ));
        let (_held, _) = connect_identify(lb.addr).await;
        let admin = lb.admin().to_string();
        let output = run_command(
            Command::new(BIN)
                .args(["top", "--once", "--interval", "200ms", "--admin", &admin])
                .env("WEIGHBRIDGE_TOKEN", TOKEN)
                .env_remove("WEIGHBRIDGE_CONFIG"),
        )
        .await;
        assert!(output.status.success(), "{output:?}");
        let frame = stdout(&output);
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines.len(), 24, "{frame}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{frame}");
        assert!(
            lines[0].starts_with("weighbridge 0.1.0  127.0.0.1:"),
            "{frame}"
        );
        assert!(
            lines[1].starts_with("conns 1 open, 0 queued  0 conn/s"),
            "{frame}"
        );
        assert!(
            lines[3].contains("BACKEND") && lines[3].contains("P99"),
            "{frame}"
        );
        for mock in &mocks {
            let row = lines
                .iter()
                .find(|l| l.contains(&mock.addr.to_string()))
                .unwrap_or_else(|| panic!("no row for {}:\n{frame}", mock.addr));
            assert!(row.contains("healthy"), "{row}");
        }
        assert!(lines[23].starts_with("q quit"), "{frame}");

        let wide = run_command(
            Command::new(BIN)
                .args(["top", "--once", "--interval", "100ms", "--size", "200x50"])
                .args(["--admin", &admin, "--token", TOKEN]),
        )
        .await;
        assert!(wide.status.success(), "{wide:?}");
        let frame = stdout(&wide);
        assert_eq!(frame.lines().count(), 50, "{frame}");
        assert!(frame.contains("EFF/CONF"), "{frame}");
        lb.stop().await;
    })
    .await;
}
