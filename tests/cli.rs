//! The command line as a user meets it: `--check`, and the one-line errors with exit code 1.

mod support;

use std::process::Output;

use tokio::process::Command;

use support::{BIN, config_file, run, run_command};

/// Asserts a failed run: exit code 1, a single line on stderr containing every needle.
fn assert_fails_with(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
}

const VALID: &str = r#"
[[listener]]
name = "chat"
bind = "127.0.0.1:0"
[[listener.backend]]
addr = "127.0.0.1:9001"
[[listener.backend]]
addr = "127.0.0.1:9002"
[[listener]]
name = "embed"
bind = "127.0.0.1:0"
[[listener.backend]]
addr = "127.0.0.1:9003"
"#;

#[tokio::test]
async fn check_prints_a_summary_and_exits_0() {
    let file = config_file(VALID);
    let path = file.path().to_str().expect("utf-8 temp path");
    let output = run(&["--config", path, "--check"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout.trim(),
        format!("{path}: ok: 2 listener(s), 3 backend(s)")
    );
}

/// Without `--config`, `$WEIGHBRIDGE_CONFIG` names the file.
#[tokio::test]
async fn the_environment_names_the_config_when_the_flag_does_not() {
    let file = config_file(VALID);
    let path = file.path().to_str().expect("utf-8 temp path");
    let output = run_command(
        Command::new(BIN)
            .env("WEIGHBRIDGE_CONFIG", path)
            .arg("--check"),
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with(&format!("{path}: ok")));
    // The flag wins over the variable.
    let output = run_command(
        Command::new(BIN)
            .env("WEIGHBRIDGE_CONFIG", "/nonexistent/weighbridge.toml")
            .args(["--config", path, "--check"]),
    )
    .await;
    assert!(output.status.success(), "{output:?}");
}

/// With neither, and nothing at the packaged path, the error says what was tried and how to fix
/// it, whatever the working directory holds.
#[tokio::test]
async fn with_no_config_anywhere_the_error_lists_what_was_tried() {
    if std::path::Path::new("/etc/weighbridge/weighbridge.toml").exists() {
        return; // an installed machine: the default exists, and is what runs
    }
    let output = run_command(
        Command::new(BIN)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("WEIGHBRIDGE_CONFIG")
            .arg("--check"),
    )
    .await;
    assert_fails_with(
        &output,
        &[
            "WEIGHBRIDGE_CONFIG",
            "/etc/weighbridge/weighbridge.toml",
            "--config FILE",
        ],
    );
}

/// Every example in conf/ is valid as shipped.
#[tokio::test]
async fn every_shipped_example_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("read conf/") {
        let path = entry.expect("a conf/ entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let output = run_command(Command::new(BIN).arg("--config").arg(&path).arg("--check")).await;
        assert!(output.status.success(), "{}: {output:?}", path.display());
        checked += 1;
    }
    assert!(checked >= 2, "conf/ holds the examples: {checked}");
}

#[tokio::test]
async fn config_errors_exit_1_with_file_line_and_key() {
    let cases = [
        ("[[listener]\n", vec![":1:", "expected `]`"]),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nstrategyy = \"x\"\n",
            vec![":4:", "unknown field `strategyy`"],
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nstrategy = \"fastest\"\n[[listener.backend]]\naddr = \"127.0.0.1:2\"\n",
            vec![
                ":4:",
                "`fastest`",
                "weighted_round_robin",
                "capacity_proportional",
            ],
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.backend]]\naddr = \"127.0.0.1:2\"\nweight = -2\n",
            vec![":6:", "weight", "-2"],
        ),
        ("", vec!["no listener defined"]),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n",
            vec![":1:", "listener `a` has no backend"],
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1\"\n",
            vec![":3:", "`bind`", "invalid address"],
        ),
    ];
    for (text, needles) in cases {
        let file = config_file(text);
        let path = file.path().to_str().expect("utf-8 temp path");
        for args in [vec!["--config", path, "--check"], vec!["-c", path]] {
            let output = run(&args).await;
            let mut all = needles.clone();
            all.push(path);
            assert_fails_with(&output, &all);
        }
    }
}

#[tokio::test]
async fn missing_file_exits_1_naming_it() {
    let output = run(&["--config", "/nonexistent/dir/wb.toml"]).await;
    assert_fails_with(&output, &["/nonexistent/dir/wb.toml", "cannot read"]);
}

#[tokio::test]
async fn bind_failure_exits_1_naming_listener_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let addr = taken.local_addr().expect("local addr").to_string();
    let file = config_file(&format!(
        "[[listener]]\nname = \"busy\"\nbind = \"{addr}\"\n[[listener.backend]]\naddr = \"127.0.0.1:9\"\n"
    ));
    let path = file.path().to_str().expect("utf-8 temp path");
    let output = run(&["--config", path, "--log-level", "error"]).await;
    assert_fails_with(&output, &["listener `busy`", &addr, "cannot bind"]);
}

/// A `--log-level` that is not a level or a filter is a command-line error (exit 2, as for an
/// unknown flag), `--check` included; before, a word such as `warning` was taken as a target
/// name and the balancer ran with every log line off.
#[tokio::test]
async fn bad_log_level_exits_2_naming_the_flag() {
    let file = config_file(VALID);
    let path = file.path().to_str().expect("utf-8 temp path");
    for level in ["loud=[[", "bogus", "verbose,weighbridge=debug"] {
        for check in [false, true] {
            let mut args = vec!["--config", path, "--log-level", level];
            if check {
                args.push("--check");
            }
            let output = run(&args).await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains("--log-level"), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let output = run(&["--config", path, "--log-level", "warning", "--check"]).await;
    assert_eq!(output.status.code(), Some(0), "`warning` means warn");
}

#[tokio::test]
async fn admin_on_a_public_address_without_token_exits_1_naming_key_and_line() {
    // A documentation address (RFC 5737): not loopback, and not bindable here, so a regression
    // fails on the bind instead of serving the admin endpoint on every interface.
    let file = config_file(&format!("[admin]\nbind = \"192.0.2.1:0\"\n{VALID}"));
    let path = file.path().to_str().expect("utf-8 temp path");
    for args in [vec!["--config", path, "--check"], vec!["--config", path]] {
        let output = run(&args).await;
        assert_fails_with(
            &output,
            &[
                &format!("{path}:2:"),
                "[admin] `bind`",
                "[admin] `token` is required",
            ],
        );
    }
}

#[tokio::test]
async fn admin_bind_failure_exits_1_naming_admin_bind_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let addr = taken.local_addr().expect("local addr").to_string();
    let file = config_file(&format!("[admin]\nbind = \"{addr}\"\n{VALID}"));
    let path = file.path().to_str().expect("utf-8 temp path");
    let output = run(&["--config", path, "--log-level", "error"]).await;
    assert_fails_with(&output, &["[admin] `bind`", &addr, "cannot bind"]);
    // Bound before the listeners: nothing was announced as listening.
    let output = run(&["--config", path, "--log-level", "info"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}
