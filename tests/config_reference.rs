//! The configuration reference, docs/configuration.md, against the parser and the shipped
//! examples, so that neither can drift from the other:
//!
//! - every key an example in `conf/` uses is documented under the heading of its section;
//! - every key the reference documents is accepted by `weighbridge --check`, in its section,
//!   with the default (or an example value) the reference gives.
//!
//! The reference is read as written for people: a section is a `## ` heading naming the TOML
//! table (`## Top level`, ``## `[listener.health]` ``), or tables that take the same keys
//! (``## `[pool.health]`, `[listener.health]` ``), and its keys are the first column of the
//! table under it whose header starts with `key`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use toml::{Table, Value};

const BIN: &str = env!("CARGO_BIN_EXE_weighbridge");

/// Documented keys whose default is not a value one could write ("required", "none", "one per
/// CPU", "the preset's"): the value written when each is tried. Keyed by (section, key).
const EXAMPLE_VALUES: &[(&str, &str, &str)] = &[
    ("", "threads", "2"),
    ("admin", "bind", r#""127.0.0.1:0""#),
    ("admin", "token", r#""s3cret-token""#),
    ("listener", "name", r#""reference""#),
    ("listener", "pool", r#""reference-pool""#),
    ("pool", "name", r#""reference-pool""#),
    ("pool.backend", "addr", r#""127.0.0.1:9001""#),
    (
        "pool.backend",
        "srv",
        r#""_http._tcp.vllm.inference.svc.cluster.local""#,
    ),
    (
        "listener.backend",
        "srv",
        r#""_http._tcp.vllm.inference.svc.cluster.local""#,
    ),
    (
        "resolver",
        "nameservers",
        r#"["127.0.0.1:5353", "10.96.0.10"]"#,
    ),
    ("listener", "accept_proxy", r#""v2""#),
    ("listener", "proxy_trusted", r#"["10.0.0.0/8", "::1"]"#),
    ("listener", "send_proxy", r#""v2""#),
    ("listener", "allow", r#"["10.0.0.0/8", "192.168.0.0/16"]"#),
    ("listener", "deny", r#"["10.1.2.0/24"]"#),
    ("listener", "max_connections_per_client", "64"),
    ("listener", "connection_rate_per_client", r#""20/s""#),
    (
        "listener.route",
        "sni",
        r#"["llama.example.com", "*.llama.example.com"]"#,
    ),
    ("listener.route", "pool", r#""reference-pool""#),
    ("pool.backend", "send_proxy", r#""none""#),
    ("listener.backend", "send_proxy", r#""none""#),
    ("pool.backend", "health_addr", r#""127.0.0.1:9201""#),
    ("pool.backend", "max_connections", "8"),
    ("listener.backend", "max_connections", "8"),
    ("pool.health", "host", r#""models.internal""#),
    ("pool.health", "expect_status", "[200]"),
    ("pool.health", "expect_body", r#""ok""#),
    ("pool.health", "slow_start", r#""60s""#),
    ("pool.health.load", "preset", r#""vllm""#),
    ("pool.health.load", "port", "8002"),
    (
        "pool.health.load",
        "metric",
        r#""vllm:num_requests_waiting""#,
    ),
    (
        "pool.health.load",
        "in_flight_metrics",
        r#"["vllm:num_requests_running", "vllm:num_requests_waiting"]"#,
    ),
    (
        "listener.health.load",
        "in_flight_metrics",
        r#"["vllm:num_requests_running", "vllm:num_requests_waiting"]"#,
    ),
    ("listener", "bind", r#""127.0.0.1:0""#),
    // Any unprivileged process may choose reno; cubic can need CAP_NET_ADMIN.
    ("listener", "backend_congestion_control", r#""reno""#),
    ("listener.health", "host", r#""models.internal""#),
    ("listener.health", "expect_status", "[200]"),
    ("listener.health", "expect_body", r#""ok""#),
    ("listener.health", "slow_start", r#""60s""#),
    ("listener.health.load", "preset", r#""vllm""#),
    ("listener.health.load", "port", "8002"),
    (
        "listener.health.load",
        "metric",
        r#""vllm:num_requests_waiting""#,
    ),
    ("listener.backend", "addr", r#""127.0.0.1:9001""#),
    ("listener.backend", "health_addr", r#""127.0.0.1:9201""#),
];

/// Sections the reference must have, so that a heading written another way cannot make the
/// checks below pass on nothing.
const SECTIONS: [&str; 15] = [
    "",
    "admin",
    "log",
    "listener",
    "listener.route",
    "listener.health",
    "listener.health.load",
    "listener.passive",
    "listener.backend",
    "pool",
    "pool.health",
    "pool.health.load",
    "pool.passive",
    "pool.backend",
    "resolver",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One documented key: its section (dotted, "" for the top level), its name, and the text of
/// its `default` cell.
#[derive(Debug)]
struct Documented {
    section: String,
    key: String,
    default: String,
}

/// The section a `## ` heading names: "" for "Top level", the table path for a heading such as
/// ``## `[[listener.backend]]` ``, `None` for any other heading.
fn heading_section(heading: &str) -> Option<String> {
    let heading = heading.trim();
    if heading.eq_ignore_ascii_case("top level") {
        return Some(String::new());
    }
    let inner = heading.strip_prefix('`')?.strip_suffix('`')?;
    let path = inner.trim_start_matches('[').trim_end_matches(']');
    (!path.is_empty() && inner.starts_with('[')).then(|| path.to_owned())
}

/// The sections a `## ` heading names: one, or several written as a comma-separated list of
/// tables that take the same keys (``## `[pool.health]`, `[listener.health]` ``).
fn heading_sections(heading: &str) -> Vec<String> {
    heading
        .split(',')
        .map(heading_section)
        .collect::<Option<Vec<String>>>()
        .unwrap_or_default()
}

/// The cells of a markdown table row, trimmed.
fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let inner = line
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .unwrap_or(line);
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

/// Every key documented in docs/configuration.md, in order.
fn documented() -> Vec<Documented> {
    let path = root().join("docs/configuration.md");
    let text = std::fs::read_to_string(&path).expect("read docs/configuration.md");
    let mut keys = Vec::new();
    let mut sections: Vec<String> = Vec::new();
    // The column holding the default, while inside a key table.
    let mut default_column: Option<usize> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            sections = heading_sections(heading);
            default_column = None;
            continue;
        }
        if !line.trim_start().starts_with('|') {
            default_column = None;
            continue;
        }
        let row = cells(line);
        if sections.is_empty() {
            continue;
        }
        match default_column {
            None if row.first().map(String::as_str) == Some("key") => {
                default_column = row.iter().position(|c| c == "default");
                assert!(
                    default_column.is_some(),
                    "a key table without a `default` column under sections {sections:?}: {line}"
                );
            }
            None => {}
            Some(_) if row.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch))) => {}
            Some(column) => {
                let key = row[0]
                    .strip_prefix('`')
                    .and_then(|k| k.strip_suffix('`'))
                    .unwrap_or_else(|| panic!("first column is not a `key`: {line}"));
                for section in &sections {
                    keys.push(Documented {
                        section: section.clone(),
                        key: key.to_owned(),
                        default: row.get(column).cloned().unwrap_or_default(),
                    });
                }
            }
        }
    }
    keys
}

/// Every (section, key) that `table` sets, walking tables and arrays of tables: a key whose
/// value is a table (or an array of tables) is a section, not a key.
fn keys_in(table: &Table, section: &str, out: &mut BTreeSet<(String, String)>) {
    for (key, value) in table {
        let nested = if section.is_empty() {
            key.clone()
        } else {
            format!("{section}.{key}")
        };
        match value {
            Value::Table(inner) => keys_in(inner, &nested, out),
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
                for item in items {
                    if let Value::Table(inner) = item {
                        keys_in(inner, &nested, out);
                    }
                }
            }
            _ => {
                out.insert((section.to_owned(), key.clone()));
            }
        }
    }
}

/// The examples shipped in conf/.
fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("conf"))
        .expect("read conf/")
        .map(|entry| entry.expect("a conf/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "conf/ holds the examples: {files:?}");
    files
}

fn show(section: &str) -> &str {
    if section.is_empty() {
        "top level"
    } else {
        section
    }
}

#[test]
fn every_key_in_the_examples_is_documented_in_its_section() {
    let documented: BTreeSet<(String, String)> = documented()
        .into_iter()
        .map(|d| (d.section, d.key))
        .collect();
    let mut missing = Vec::new();
    for file in example_files() {
        let text = std::fs::read_to_string(&file).expect("read example");
        let table: Table = toml::from_str(&text).expect("example is TOML");
        let mut used = BTreeSet::new();
        keys_in(&table, "", &mut used);
        assert!(!used.is_empty(), "{} sets no key", file.display());
        for (section, key) in used {
            if !documented.contains(&(section.clone(), key.clone())) {
                missing.push(format!("{}: {key} in {}", file.display(), show(&section)));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys used in conf/ but not documented in docs/configuration.md under their section:\n{}",
        missing.join("\n")
    );
}

/// The value to write for a documented key: the example value above if there is one, else its
/// default when that is a TOML value in backticks.
fn value_for(doc: &Documented) -> Value {
    if let Some((_, _, example)) = EXAMPLE_VALUES
        .iter()
        .find(|(s, k, _)| *s == doc.section && *k == doc.key)
    {
        return parse_value(example).unwrap_or_else(|| panic!("bad example value {example}"));
    }
    doc.default
        .split('`')
        .nth(1)
        .and_then(parse_value)
        .unwrap_or_else(|| {
            panic!(
                "{} `{}`: default {:?} is not a TOML value; add an example value to EXAMPLE_VALUES",
                show(&doc.section),
                doc.key,
                doc.default
            )
        })
}

fn parse_value(text: &str) -> Option<Value> {
    let mut table: Table = toml::from_str(&format!("v = {text}")).ok()?;
    table.remove("v")
}

/// The smallest valid configuration with a `[[pool]]`: pool `reference-pool` with one backend,
/// and one listener sending to it.
fn pooled_config() -> Table {
    let mut backend = Table::new();
    backend.insert("addr".into(), Value::String("127.0.0.1:9001".into()));
    let mut pool = Table::new();
    pool.insert("name".into(), Value::String("reference-pool".into()));
    pool.insert("backend".into(), Value::Array(vec![Value::Table(backend)]));
    let mut listener = Table::new();
    listener.insert("name".into(), Value::String("reference".into()));
    listener.insert("bind".into(), Value::String("127.0.0.1:0".into()));
    listener.insert("pool".into(), Value::String("reference-pool".into()));
    let mut config = Table::new();
    config.insert("pool".into(), Value::Array(vec![Value::Table(pool)]));
    config.insert(
        "listener".into(),
        Value::Array(vec![Value::Table(listener)]),
    );
    config
}

/// The base a documented key is tried in: the pooled one for a pool's keys and a listener's
/// `pool`, the inline one for everything else.
fn base_for(doc: &Documented) -> Table {
    if doc.section == "listener.route" {
        // A listener with routes has no pool of its own and no `pool`.
        let mut config = pooled_config();
        section_table(&mut config, "listener").remove("pool");
        config
    } else if doc.section == "pool" || doc.section.starts_with("pool.") || doc.key == "pool" {
        pooled_config()
    } else {
        base_config()
    }
}

/// The smallest valid configuration: one listener with one backend.
fn base_config() -> Table {
    let mut backend = Table::new();
    backend.insert("addr".into(), Value::String("127.0.0.1:9001".into()));
    let mut listener = Table::new();
    listener.insert("name".into(), Value::String("reference".into()));
    listener.insert("bind".into(), Value::String("127.0.0.1:0".into()));
    listener.insert("backend".into(), Value::Array(vec![Value::Table(backend)]));
    let mut config = Table::new();
    config.insert(
        "listener".into(),
        Value::Array(vec![Value::Table(listener)]),
    );
    config
}

/// The table of `config` that `section` names, created with its required keys if it is not
/// there yet. Arrays of tables (`listener`, `listener.backend`) resolve to their first entry.
fn section_table<'a>(config: &'a mut Table, section: &str) -> &'a mut Table {
    let mut table = config;
    if section.is_empty() {
        return table;
    }
    let mut path = String::new();
    for part in section.split('.') {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        let required = required_keys(&path);
        let entry = table.entry(part.to_owned()).or_insert_with(|| {
            // Routes are an array of tables, as backends are.
            if part == "route" {
                Value::Array(vec![Value::Table(required)])
            } else {
                Value::Table(required)
            }
        });
        table = match entry {
            Value::Table(inner) => inner,
            Value::Array(items) => match items.first_mut() {
                Some(Value::Table(inner)) => inner,
                _ => panic!("{path} is an empty array"),
            },
            other => panic!("{path} is not a table: {other:?}"),
        };
    }
    table
}

/// What a new table of `section` needs to be valid on its own.
fn required_keys(section: &str) -> Table {
    let mut table = Table::new();
    match section {
        "admin" => {
            table.insert("bind".into(), Value::String("127.0.0.1:0".into()));
        }
        "listener.health.load" | "pool.health.load" => {
            table.insert("preset".into(), Value::String("vllm".into()));
        }
        "listener.route" => {
            table.insert("pool".into(), Value::String("reference-pool".into()));
        }
        _ => {}
    }
    table
}

/// `config` as a file, and the output of `weighbridge --check` on it.
fn check(config: &Table) -> (String, Output) {
    let text = toml::to_string(config).expect("serialize config");
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("create temp config");
    file.write_all(text.as_bytes()).expect("write temp config");
    let output = run(&["--check", "--config", path_str(file.path())]);
    (text, output)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Runs the binary with `args`; kills it if it runs past 20 s (a `--check` takes milliseconds).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weighbridge");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll child").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill hung weighbridge");
            panic!("weighbridge {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child
        .wait_with_output()
        .expect("collect weighbridge output")
}

#[test]
fn every_documented_key_is_accepted_by_the_parser() {
    let documented = documented();
    let mut per_section: BTreeMap<&str, usize> = BTreeMap::new();
    for doc in &documented {
        *per_section.entry(doc.section.as_str()).or_default() += 1;
    }
    for section in SECTIONS {
        assert!(
            per_section.contains_key(section),
            "docs/configuration.md documents no key under {}; sections found: {:?}",
            show(section),
            per_section
        );
    }
    let mut refused = Vec::new();
    for doc in &documented {
        let mut config = base_for(doc);
        let value = value_for(doc);
        let table = section_table(&mut config, &doc.section);
        table.insert(doc.key.clone(), value);
        if doc.key == "srv" {
            // A backend has `addr` or `srv`, not both.
            table.remove("addr");
        }
        // Each needs the other.
        match doc.key.as_str() {
            "accept_proxy" => {
                let trusted = parse_value(r#"["127.0.0.1"]"#).expect("literal");
                table.insert("proxy_trusted".into(), trusted);
            }
            "proxy_trusted" => {
                table.insert("accept_proxy".into(), Value::String("any".into()));
            }
            // Only a pool that hashes takes them.
            "hash_key" | "hash_balance_factor" => {
                table.insert("strategy".into(), Value::String("consistent_hash".into()));
            }
            _ => {}
        }
        let (text, output) = check(&config);
        if !output.status.success() {
            refused.push(format!(
                "{} `{}`: {}\n{text}",
                show(&doc.section),
                doc.key,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    assert!(
        refused.is_empty(),
        "documented keys that `weighbridge --check` refuses:\n{}",
        refused.join("\n")
    );
}

/// The check above can fail: a key the parser does not know makes `--check` fail, in any
/// section.
#[test]
fn an_undocumented_key_is_refused() {
    for section in ["", "listener", "listener.health"] {
        let mut config = base_config();
        section_table(&mut config, section).insert("no_such_key".into(), Value::Integer(1));
        let (text, output) = check(&config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{text}\n{stderr}");
        assert!(
            stderr.contains("unknown field `no_such_key`"),
            "{text}\n{stderr}"
        );
    }
    // And the bases it is added to are valid on their own.
    for base in [base_config(), pooled_config()] {
        let (text, output) = check(&base);
        assert!(output.status.success(), "{text}\n{output:?}");
    }
}

#[test]
fn section_headings_are_read_as_table_paths() {
    assert_eq!(heading_section("Top level"), Some(String::new()));
    assert_eq!(heading_section("`[admin]`"), Some("admin".into()));
    assert_eq!(
        heading_section("`[[listener.backend]]`"),
        Some("listener.backend".into())
    );
    assert_eq!(heading_section("Strategies"), None);
    assert_eq!(
        heading_sections("`[pool.health]`, `[listener.health]`"),
        ["pool.health", "listener.health"]
    );
    assert!(heading_sections("`[pool]`, Strategies").is_empty());
    assert_eq!(heading_section("`threads`"), None);
}
