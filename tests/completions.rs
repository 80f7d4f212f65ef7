//! `weighbridge completions SHELL` and `weighbridge manpage`: generated from the flags the
//! binary has, printed to stdout, and kept apart from running the balancer.

mod support;

use std::time::Duration;

use support::{bounded, run};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(30);

/// The flags every generated document must name.
const FLAGS: [&str; 4] = ["config", "check", "no-watch", "log-level"];

#[tokio::test]
async fn completions_for_each_shell_name_every_flag() {
    bounded(LIMIT, async {
        for shell in ["bash", "zsh", "fish"] {
            let output = run(&["completions", shell]).await;
            assert!(output.status.success(), "{shell}: {output:?}");
            let script = String::from_utf8(output.stdout).expect("the script is UTF-8");
            assert!(!script.trim().is_empty(), "{shell}: an empty script");
            assert!(script.contains("weighbridge"), "{shell}: names the command");
            for flag in FLAGS {
                assert!(script.contains(flag), "{shell}: no `{flag}` in:\n{script}");
            }
            assert!(
                script.contains("completions"),
                "{shell}: names the subcommands"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_unknown_shell_is_a_usage_error() {
    bounded(LIMIT, async {
        let output = run(&["completions", "tcsh"]).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
    })
    .await;
}

#[tokio::test]
async fn the_man_page_is_roff_naming_every_flag() {
    bounded(LIMIT, async {
        let output = run(&["manpage"]).await;
        assert!(output.status.success(), "{output:?}");
        let page = String::from_utf8(output.stdout).expect("the page is UTF-8");
        assert!(page.contains(".TH weighbridge 1"), "a title line:\n{page}");
        assert!(page.contains(".SH SYNOPSIS"), "a synopsis:\n{page}");
        for flag in FLAGS {
            // roff escapes every `-` as `\-`.
            let escaped = format!("\\-\\-{}", flag.replace('-', "\\-"));
            assert!(page.contains(&escaped), "no `--{flag}` in:\n{page}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_subcommand_takes_none_of_the_balancers_flags() {
    bounded(LIMIT, async {
        let output = run(&["--check", "completions", "bash"]).await;
        assert_eq!(output.status.code(), Some(2), "{output:?}");
    })
    .await;
}
