//! The Dockerfile cannot be built here (no image registry), so it is checked as text: every
//! path it copies from the build context exists, and the configuration it installs passes
//! `weighbridge --check`.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{bounded, run};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(30);

fn dockerfile() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("Dockerfile")).expect("read the Dockerfile");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// (sources, destination) of each COPY from the build context (not `--from` a stage).
fn copies(lines: &[String]) -> Vec<(Vec<String>, String)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .map(|args| {
            let mut words: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
            let destination = words.pop().expect("a COPY has a destination");
            (words, destination)
        })
        .collect()
}

#[tokio::test]
async fn every_copied_path_exists_and_the_installed_config_passes_check() {
    bounded(LIMIT, async {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lines = dockerfile();
        let copies = copies(&lines);
        assert!(!copies.is_empty(), "the Dockerfile copies something");
        let ignored =
            std::fs::read_to_string(root.join(".dockerignore")).expect("read .dockerignore");
        let ignored: Vec<&str> = ignored
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
            .collect();
        let mut config = None;
        for (sources, destination) in &copies {
            for source in sources {
                assert!(root.join(source).exists(), "COPY {source}: no such path");
                assert!(
                    !ignored.iter().any(|i| source.trim_end_matches('/') == *i),
                    "COPY {source}: left out of the build context by .dockerignore"
                );
            }
            if destination == "/etc/weighbridge/weighbridge.toml" {
                config = sources.first().cloned();
            }
        }
        let config = config.expect("a config copied to /etc/weighbridge/weighbridge.toml");
        let path = root.join(&config);
        let path = path.to_str().expect("a UTF-8 path");
        let output = run(&["--config", path, "--check"]).await;
        assert!(
            output.status.success(),
            "{config} fails --check: {output:?}"
        );

        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        assert!(
            lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
            "multi-stage"
        );
        assert!(
            has("RUN cargo build --release --locked"),
            "a locked release build"
        );
        assert!(
            has("FROM debian:") && lines.iter().any(|l| l.contains("-slim")),
            "a slim Debian runtime"
        );
        assert!(has("STOPSIGNAL SIGTERM"));
        assert!(has("EXPOSE "));
        let user = lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .expect("a USER");
        assert!(user != "root" && user != "0", "runs as a non-root user");
    })
    .await;
}
