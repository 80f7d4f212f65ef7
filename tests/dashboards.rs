//! The Grafana dashboard (deploy/grafana/weighbridge.json) and the Prometheus alert rules
//! (deploy/prometheus/alerts.yml) against a real scrape, so that neither can drift from what
//! the balancer exports: a balancer with every feature on (a `[[pool]]` with slots, a queue,
//! HTTP health probes and load scraping, passive checks, SNI routes to a `consistent_hash`
//! pool, an inline listener, PROXY protocol and per-client limits) carries some traffic, and
//! every metric and label name the dashboard's queries, legends and template variables and the
//! rules' expressions and annotations use must be in its `/metrics`. `promtool check rules`
//! must accept the rules (promtool comes with Debian's `prometheus` package, which
//! `scripts/install-test-peers.sh` installs).
//!
//! The PromQL is read simply: identifiers that are not functions, aggregations or keywords are
//! metric names, with the label names of their `{...}` matchers; `by`, `without`, `on`,
//! `ignoring`, `group_left` and `group_right` lists name labels; strings, ranges and Grafana
//! variables (`$pool`, `${...}`) are skipped. A label outside a selector must be on one of the
//! expression's metrics. `job` and `instance`, which Prometheus attaches to every series it
//! scrapes, are allowed everywhere.

#[allow(dead_code)] // Only `Mock` and its options are used here, not the example's `main`.
#[path = "../examples/mock_inference.rs"]
mod mock_inference;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use support::{
    Mock, POLL, Refusing, Running, bounded, echo, eventually, eventually_eq, http, within,
};
use weighbridge::Config;

/// Bound on each test.
const LIMIT: Duration = Duration::from_secs(60);
/// How long something the balancer does on its own (a probe, a scrape) may take to show.
const SOON: Duration = Duration::from_secs(10);

/// Labels Prometheus attaches to every series it scrapes: the target's, not the exposition's.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

const DASHBOARD: &str = "deploy/grafana/weighbridge.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// ------------------------------------------------------------------------------ exposition

/// Label names by sample name, as a scrape shows them: `_total`, `_bucket`, `_sum` and `_count`
/// are part of the names, as in PromQL, and `le` is a label of the `_bucket` samples.
type Exposed = BTreeMap<String, BTreeSet<String>>;

/// Reads the sample lines of a Prometheus text exposition.
fn exposed(text: &str) -> Exposed {
    let mut out = Exposed::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let (name, rest) = line.split_at(end);
        let labels = out.entry(name.to_owned()).or_default();
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let chars: Vec<char> = rest.chars().collect();
        let mut i = 0;
        loop {
            while chars.get(i).is_some_and(|&c| c == ',' || c == ' ') {
                i += 1;
            }
            match chars.get(i) {
                Some('}') => break,
                None => panic!("unclosed labels in {line:?}"),
                Some(_) => {}
            }
            let start = i;
            while chars.get(i).is_some_and(|&c| c != '=') {
                i += 1;
            }
            let label: String = chars[start..i].iter().collect();
            labels.insert(label.trim().to_owned());
            assert_eq!(chars.get(i + 1), Some(&'"'), "quoted value in {line:?}");
            i = skip_string(&chars, i + 1).unwrap_or_else(|e| panic!("{e} in {line:?}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------- PromQL

/// The names a PromQL expression uses.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    /// Metric names, each with the label names its own matchers use.
    selectors: Vec<(String, Vec<String>)>,
    /// Label names used elsewhere: grouping and matching lists, and selectors without a name.
    labels: Vec<String>,
}

/// Words that take a list of label names in parentheses.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Operators and aggregations written as words: never metric names. (Functions are followed
/// by `(` and so are recognised as such; aggregations can be followed by `by` or `without`.)
const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The index just past the string literal opening at `open`.
fn skip_string(chars: &[char], open: usize) -> Result<usize, String> {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unclosed string at {open}"))
}

/// The index just past the first `close` after `open`.
fn skip_past(chars: &[char], open: usize, close: char) -> Result<usize, String> {
    chars[open + 1..]
        .iter()
        .position(|&c| c == close)
        .map(|p| open + 1 + p + 1)
        .ok_or_else(|| format!("no `{close}` after {open}"))
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

/// The label names of the matchers in the `{...}` opening at `open`, and the index past it.
fn matchers(chars: &[char], open: usize) -> Result<(Vec<String>, usize), String> {
    let mut labels = Vec::new();
    let mut i = open + 1;
    loop {
        while chars.get(i).is_some_and(|&c| c.is_whitespace() || c == ',') {
            i += 1;
        }
        match chars.get(i) {
            None => return Err(format!("unclosed `{{` at {open}")),
            Some('}') => return Ok((labels, i + 1)),
            Some(&c) if ident_start(c) => {}
            Some(c) => return Err(format!("`{c}` where a label name should be, at {i}")),
        }
        let start = i;
        while chars.get(i).is_some_and(|&c| ident_char(c)) {
            i += 1;
        }
        labels.push(chars[start..i].iter().collect());
        i = skip_spaces(chars, i);
        while chars.get(i).is_some_and(|c| "=!~".contains(*c)) {
            i += 1;
        }
        i = skip_spaces(chars, i);
        match chars.get(i) {
            Some('"' | '\'' | '`') => i = skip_string(chars, i)?,
            _ => return Err(format!("no quoted value for the matcher at {start}")),
        }
    }
}

/// The metric and label names `expr` uses.
fn promql(expr: &str) -> Result<Refs, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(&chars, i)?,
            // A range or a subquery's: a duration, or a Grafana variable for one.
            '[' => i = skip_past(&chars, i, ']')?,
            '#' => {
                i = chars[i..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(chars.len(), |p| i + p)
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_past(&chars, i, '}')?;
                } else {
                    while chars.get(i).is_some_and(|&c| ident_char(c)) {
                        i += 1;
                    }
                }
            }
            '{' => {
                let (labels, next) = matchers(&chars, i)?;
                refs.labels.extend(labels);
                i = next;
            }
            // A number or a duration (`1e3`, `0.99`, `5m` after `offset`).
            c if c.is_ascii_digit() || c == '.' => {
                while chars
                    .get(i)
                    .is_some_and(|&c| c.is_ascii_alphanumeric() || c == '.')
                {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let start = i;
                while chars.get(i).is_some_and(|&c| ident_char(c)) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = skip_spaces(&chars, i);
                let paren = chars.get(next) == Some(&'(');
                if GROUPING.contains(&word.as_str()) {
                    if paren {
                        let close = skip_past(&chars, next, ')')?;
                        let list: String = chars[next + 1..close - 1].iter().collect();
                        for label in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                            if !valid_label(label) {
                                return Err(format!(
                                    "`{label}` in `{word} (...)` is no label name"
                                ));
                            }
                            refs.labels.push(label.to_owned());
                        }
                        i = close;
                    }
                } else if !paren && !KEYWORDS.contains(&word.as_str()) {
                    let mut labels = Vec::new();
                    if chars.get(next) == Some(&'{') {
                        (labels, i) = matchers(&chars, next)?;
                    }
                    refs.selectors.push((word, labels));
                }
            }
            _ => i += 1,
        }
    }
    Ok(refs)
}

/// The labels a Grafana legend or a rule's annotation template prints: `{{label}}` in a
/// legend, `$labels.label` in a Go template.
fn template_labels(text: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for piece in text.split("{{").skip(1) {
        let inner = piece.split("}}").next().unwrap_or_default().trim();
        if valid_label(inner) {
            labels.push(inner.to_owned());
        }
    }
    for piece in text.split("$labels.").skip(1) {
        let label: String = piece.chars().take_while(|&c| ident_char(c)).collect();
        labels.push(label);
    }
    labels
}

/// What is wrong with the names of `expr` (found at `place`) against a scrape; `printed` are
/// the labels its legend or annotations print. Empty when every name exists.
fn problems(place: &str, expr: &str, printed: &[String], scrape: &Exposed) -> Vec<String> {
    let refs = match promql(expr) {
        Ok(refs) => refs,
        Err(e) => return vec![format!("{place}: cannot read `{expr}`: {e}")],
    };
    let mut found = Vec::new();
    if refs.selectors.is_empty() {
        found.push(format!("{place}: `{expr}` names no metric"));
    }
    let ours = |label: &str| TARGET_LABELS.contains(&label) || label == "__name__";
    for (metric, labels) in &refs.selectors {
        let Some(has) = scrape.get(metric) else {
            found.push(format!("{place}: metric `{metric}` is not in the scrape"));
            continue;
        };
        for label in labels.iter().filter(|l| !ours(l) && !has.contains(*l)) {
            found.push(format!("{place}: `{metric}` has no label `{label}`"));
        }
    }
    if !found.is_empty() {
        // A missing metric is the one problem: its labels are unknown.
        return found;
    }
    for label in refs.labels.iter().chain(printed).filter(|l| !ours(l)) {
        let on_one = refs
            .selectors
            .iter()
            .any(|(m, _)| scrape.get(m).is_some_and(|has| has.contains(label)));
        if !on_one {
            let metrics: Vec<&str> = refs.selectors.iter().map(|(m, _)| m.as_str()).collect();
            found.push(format!(
                "{place}: label `{label}` is on none of {metrics:?} in `{expr}`"
            ));
        }
    }
    found
}

/// Problems of a Grafana variable's query: `label_values(SELECTOR, LABEL)`, else PromQL.
fn variable_problems(place: &str, query: &str, scrape: &Exposed) -> Vec<String> {
    let Some(args) = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    else {
        return problems(place, query, &[], scrape);
    };
    match args.rsplit_once(',') {
        Some((selector, label)) => problems(place, selector, &[label.trim().to_owned()], scrape),
        None => vec![format!(
            "{place}: `{query}` names no metric (label_values(LABEL) lists every series')"
        )],
    }
}

// ------------------------------------------------------------------- the dashboard, the rules

/// Every query of the dashboard, as (where, expression, labels its legend prints).
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String, Vec<String>)> {
    fn walk(value: &Json, place: &str, out: &mut Vec<(String, String, Vec<String>)>) {
        match value {
            Json::Object(object) => {
                let place = object
                    .get("title")
                    .and_then(Json::as_str)
                    .map_or_else(|| place.to_owned(), |t| format!("panel {t:?}"));
                if let Some(expr) = object.get("expr").and_then(Json::as_str) {
                    let legend = object
                        .get("legendFormat")
                        .and_then(Json::as_str)
                        .unwrap_or_default();
                    out.push((place.clone(), expr.to_owned(), template_labels(legend)));
                }
                for (key, v) in object {
                    if key != "templating" {
                        walk(v, &place, out);
                    }
                }
            }
            Json::Array(items) => items.iter().for_each(|v| walk(v, place, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "dashboard", &mut out);
    out
}

/// The dashboard's query variables, as (name, query): `query` is a string, or (Grafana 10 and
/// later) an object whose `query` is; `definition` says the same for display.
fn dashboard_variables(dashboard: &Json) -> Vec<(String, String)> {
    let list = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let mut out = Vec::new();
    for variable in list.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().expect("a variable has a name");
        let query = &variable["query"];
        let query = query
            .as_str()
            .or_else(|| query["query"].as_str())
            .unwrap_or_else(|| panic!("variable {name} has a query"));
        out.push((name.to_owned(), query.to_owned()));
        if let Some(definition) = variable["definition"].as_str() {
            out.push((name.to_owned(), definition.to_owned()));
        }
    }
    out
}

/// The alerting rules, as parsed YAML.
fn rules(alerts: &Yaml) -> Vec<&Yaml> {
    alerts["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("each group has rules"))
        .collect()
}

/// Every problem of the dashboard and the rules against a scrape.
fn all_problems(dashboard: &str, alerts: &str, scrape: &Exposed) -> Vec<String> {
    let dashboard: Json = serde_json::from_str(dashboard).expect("the dashboard is JSON");
    let alerts: Yaml = serde_yaml_ng::from_str(alerts).expect("the rules are YAML");
    let mut found = Vec::new();
    for (place, expr, legend) in dashboard_queries(&dashboard) {
        found.extend(problems(&place, &expr, &legend, scrape));
    }
    for (name, query) in dashboard_variables(&dashboard) {
        found.extend(variable_problems(
            &format!("variable {name}"),
            &query,
            scrape,
        ));
    }
    for rule in rules(&alerts) {
        let name = rule["alert"].as_str().expect("an alerting rule");
        let expr = rule["expr"].as_str().expect("a rule has an expr");
        let mut printed = Vec::new();
        for table in ["labels", "annotations"] {
            for (_, text) in rule[table].as_mapping().into_iter().flatten() {
                printed.extend(template_labels(text.as_str().unwrap_or_default()));
            }
        }
        found.extend(problems(&format!("alert {name}"), expr, &printed, scrape));
    }
    found
}

// ------------------------------------------------------------------------------ the balancer

/// A balancer with every feature on, over a mock inference server (pool `gpu`: one slot,
/// a queue, HTTP probes, vLLM load scraping, passive checks), an echo backend for pool `sticky`
/// (consistent hashing), and an inline listener's own pool of an echo backend with slots and a
/// refusing port. Listener `chat` takes PROXY headers and limits clients; `tls` routes by server name.
fn full_config(inference: SocketAddr, echo: SocketAddr, refusing: SocketAddr) -> String {
    format!(
        r#"shutdown_grace = "2s"
threads = 2

[admin]
bind = "127.0.0.1:0"

[[pool]]
name = "gpu"
strategy = "capacity_proportional"
queue_timeout = "10s"
max_queued = 100

[pool.health]
kind = "http"
path = "/health"
interval = "50ms"
timeout = "1s"
rise = 1
fall = 1
startup_grace = "0s"

[pool.health.load]
preset = "vllm"
interval = "50ms"

[pool.passive]
max_connect_failures = 3
eject_for = "10s"

[[pool.backend]]
addr = "{inference}"
weight = 2
max_connections = 1

[[pool]]
name = "sticky"
strategy = "consistent_hash"
hash_key = "client_ip"

[[pool.backend]]
addr = "{echo}"

[[listener]]
name = "chat"
bind = "127.0.0.1:0"
pool = "gpu"
accept_proxy = "any"
proxy_trusted = ["127.0.0.1/32"]
max_connections_per_client = 100
connection_rate_per_client = "1000/s"

[[listener]]
name = "tls"
bind = "127.0.0.1:0"

[[listener.route]]
sni = ["llama.example.com"]
pool = "gpu"

[[listener.route]]
pool = "sticky"

[[listener]]
name = "edge"
bind = "127.0.0.1:0"
strategy = "weighted_round_robin"
connect_attempts = 2

[listener.health]
kind = "tcp"
interval = "50ms"
startup_grace = "0s"

[listener.passive]
max_connect_failures = 1
eject_for = "10s"

[[listener.backend]]
addr = "{echo}"
max_connections = 100

[[listener.backend]]
addr = "{refusing}"
"#
    )
}

/// A client of listener `chat`: its PROXY header says it is 127.0.0.9.
async fn proxied(lb: &Running) -> TcpStream {
    let mut stream = within(TcpStream::connect(lb.addr_of("chat")))
        .await
        .expect("connect to listener chat");
    within(stream.write_all(b"PROXY TCP4 127.0.0.9 127.0.0.1 4242 80\r\n"))
        .await
        .expect("send the PROXY header");
    stream
}

/// Asks the mock inference server for a generation and reads the answer to its end.
async fn generate(mut stream: TcpStream) {
    within(stream.write_all(b"GET /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        .await
        .expect("send a request");
    let mut answer = String::new();
    within(stream.read_to_string(&mut answer))
        .await
        .expect("read the answer");
    assert!(answer.contains("served by"), "{answer}");
}

/// Starts the balancer of [`full_config`], sends traffic through every listener (a client of
/// `gpu` waits in the queue for the one slot), and returns its scrape once the load scrape has
/// reported.
async fn scrape_after_traffic() -> String {
    let inference = mock_inference::Mock::start(
        "127.0.0.1:0".parse().expect("literal"),
        mock_inference::MockOptions::default(),
    )
    .await
    .expect("mock inference server");
    let echo_backend = Mock::echo().await;
    let refusing = Refusing::new();
    let text = full_config(inference.addr(), echo_backend.addr, refusing.addr);
    let config = Config::parse(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{text}"));
    let lb = Running::try_start(&config, None, "chat").expect("bind the balancer on loopback");

    eventually(SOON, "the inference server in rotation", || {
        lb.handle
            .backend_health("chat", inference.addr())
            .is_some_and(|h| h.in_rotation())
    })
    .await;
    // One client holds the pool's only slot; the next waits for it, and gets it when the first
    // is done.
    let holder = proxied(&lb).await;
    eventually_eq(SOON, "the slot taken", Some(1), || {
        lb.handle
            .pool_backend_counters("gpu", inference.addr())
            .map(|c| c.active)
    })
    .await;
    let waiting = proxied(&lb).await;
    eventually_eq(SOON, "a client in the queue", Some(1), || {
        lb.handle.queue_counters("gpu").map(|q| q.length)
    })
    .await;
    generate(holder).await;
    eventually_eq(SOON, "the waiting client served", Some(1), || {
        lb.handle.queue_counters("gpu").map(|q| q.served)
    })
    .await;
    generate(waiting).await;

    // A client that speaks no TLS takes listener tls's default route, to pool sticky.
    let mut plain = within(TcpStream::connect(lb.addr_of("tls")))
        .await
        .expect("connect to listener tls");
    echo(&mut plain, b"no ClientHello here")
        .await
        .expect("echo through the default route");
    drop(plain);
    for _ in 0..4 {
        let mut client = within(TcpStream::connect(lb.addr_of("edge")))
            .await
            .expect("connect to listener edge");
        echo(&mut client, b"edge").await.expect("echo through edge");
    }

    // The load scrape's report shows once the server has been scraped after its first probe.
    let deadline = Instant::now() + SOON;
    let body = loop {
        let answer = http(lb.admin(), "GET", "/metrics", None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        if answer
            .body
            .contains("weighbridge_backend_reported_in_flight{")
        {
            break answer.body;
        }
        assert!(
            Instant::now() < deadline,
            "no reported load in /metrics after {SOON:?}:\n{}",
            answer.body
        );
        tokio::time::sleep(POLL).await;
    };
    lb.stop().await;
    body
}

// ------------------------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_name_only_series_of_a_real_scrape() {
    bounded(LIMIT, async {
        let scrape = exposed(&scrape_after_traffic().await);
        for (metric, label) in [
            ("weighbridge_pool_queue_wait_seconds_bucket", "le"),
            ("weighbridge_backend_max_connections", "pool"),
            ("weighbridge_backend_effective_weight", "listener"),
            ("process_open_fds", ""),
            ("process_max_fds", ""),
        ] {
            let labels = scrape
                .get(metric)
                .unwrap_or_else(|| panic!("{metric} in the scrape: {scrape:#?}"));
            assert!(
                label.is_empty() || labels.contains(label),
                "{metric}{labels:?}"
            );
        }
        let (dashboard, alerts) = (read(DASHBOARD), read(ALERTS));
        let found = all_problems(&dashboard, &alerts, &scrape);
        assert!(
            found.is_empty(),
            "names not in the scrape:\n{}",
            found.join("\n")
        );

        // The same check fails on a name that is not there, in either file.
        let wrong = dashboard.replace(
            "weighbridge_backend_effective_weight{",
            "weighbridge_backend_effective_weights{",
        );
        assert_ne!(wrong, dashboard);
        let found = all_problems(&wrong, &alerts, &scrape);
        assert!(
            found
                .iter()
                .any(|p| p.contains("`weighbridge_backend_effective_weights`")),
            "{found:?}"
        );
        let wrong = alerts.replace("by (job, instance, pool)", "by (job, instance, pools)");
        assert_ne!(wrong, alerts);
        let found = all_problems(&dashboard, &wrong, &scrape);
        assert!(
            found.iter().any(|p| p.contains("label `pools`")),
            "{found:?}"
        );
    })
    .await;
}

/// A scrape of a few series, for the checks of the checker itself.
const SMALL_SCRAPE: &str = r#"# HELP weighbridge_connections_accepted Client connections accepted.
# TYPE weighbridge_connections_accepted counter
weighbridge_connections_accepted_total{listener="chat"} 3
# TYPE weighbridge_pool_queue_length gauge
weighbridge_pool_queue_length{pool="gpu"} 0
# TYPE weighbridge_pool_queue_wait_seconds histogram
weighbridge_pool_queue_wait_seconds_sum{pool="gpu"} 0.5
weighbridge_pool_queue_wait_seconds_count{pool="gpu"} 2
weighbridge_pool_queue_wait_seconds_bucket{le="0.5",pool="gpu"} 2
weighbridge_pool_queue_wait_seconds_bucket{le="+Inf",pool="gpu"} 2
# TYPE weighbridge_backend_info gauge
weighbridge_backend_info{pool="gpu",backend="[::1]:9001",name="a \"quoted\", {odd} name"} 1
# TYPE process_open_fds gauge
process_open_fds 12
"#;

#[test]
fn the_check_catches_a_wrong_metric_or_label_name() {
    let scrape = exposed(SMALL_SCRAPE);
    assert_eq!(
        scrape["weighbridge_backend_info"],
        BTreeSet::from(["pool", "backend", "name"].map(String::from))
    );
    assert!(scrape["process_open_fds"].is_empty());
    let legend = |text: &str| template_labels(text);
    // Each of these uses only names of the scrape.
    for (expr, printed) in [
        (
            r#"sum by (listener) (rate(weighbridge_connections_accepted_total{listener=~"$listener"}[$__rate_interval]))"#,
            legend("{{listener}}"),
        ),
        (
            r#"histogram_quantile(0.99, sum by (pool, le) (rate(weighbridge_pool_queue_wait_seconds_bucket{pool=~"${pool}"}[5m])))"#,
            legend("{{pool}} p99"),
        ),
        (
            r#"weighbridge_pool_queue_length{pool="gpu", job="lb"} > 0 or vector(0)"#,
            Vec::new(),
        ),
        (
            r#"process_open_fds and on (job, instance) weighbridge_pool_queue_length offset 5m"#,
            legend("{{ $labels.instance }} {{ $value | humanize }}"),
        ),
        (
            r#"label_replace(weighbridge_pool_queue_length, "nonexistent_label", "$1", "pool", "(.*)")"#,
            Vec::new(),
        ),
    ] {
        let found = problems("test", expr, &printed, &scrape);
        assert!(found.is_empty(), "{expr}: {found:?}");
    }
    // Each of these has one wrong name, which the check names.
    for (expr, printed, wrong) in [
        (
            "rate(weighbridge_connections_acepted_total[5m])",
            Vec::new(),
            "`weighbridge_connections_acepted_total`",
        ),
        (
            "sum by (listenr) (rate(weighbridge_connections_accepted_total[5m]))",
            Vec::new(),
            "`listenr`",
        ),
        (
            r#"weighbridge_pool_queue_length{pol="gpu"}"#,
            Vec::new(),
            "`pol`",
        ),
        (
            // The histogram's samples are _bucket, _sum and _count, not its family name.
            "histogram_quantile(0.9, rate(weighbridge_pool_queue_wait_seconds[5m]))",
            Vec::new(),
            "`weighbridge_pool_queue_wait_seconds`",
        ),
        (
            "weighbridge_pool_queue_wait_seconds_count / ignoring (reason) weighbridge_pool_queue_wait_seconds_sum",
            Vec::new(),
            "`reason`",
        ),
        (
            // `listener` exists, but not on this metric.
            r#"weighbridge_pool_queue_length{listener="chat"}"#,
            Vec::new(),
            "has no label `listener`",
        ),
        (
            "weighbridge_pool_queue_length",
            legend("{{listener}}"),
            "label `listener`",
        ),
        (
            "weighbridge_pool_queue_length > 0",
            template_labels("queue of {{ $labels.pools }}"),
            "label `pools`",
        ),
        ("vector(1)", Vec::new(), "names no metric"),
        (
            r#"weighbridge_pool_queue_length{pool="gpu}"#,
            Vec::new(),
            "cannot read",
        ),
    ] {
        let found = problems("test", expr, &printed, &scrape);
        assert!(
            found.len() == 1 && found[0].contains(wrong),
            "{expr}: want one problem naming {wrong}, got {found:?}"
        );
    }
    // Template variables.
    for (query, wrong) in [
        ("label_values(weighbridge_pool_queue_length, pool)", None),
        (
            "label_values(weighbridge_pool_queue_length, listener)",
            Some("`listener`"),
        ),
        (
            "label_values(weighbridge_pool_queu_length, pool)",
            Some("`weighbridge_pool_queu_length`"),
        ),
    ] {
        let found = variable_problems("variable", query, &scrape);
        match wrong {
            None => assert!(found.is_empty(), "{query}: {found:?}"),
            Some(wrong) => assert!(
                found.len() == 1 && found[0].contains(wrong),
                "{query}: want one problem naming {wrong}, got {found:?}"
            ),
        }
    }
}

#[test]
fn the_promql_reader_finds_metrics_and_labels_and_skips_the_rest() {
    let refs = promql(
        r#"histogram_quantile(0.99, sum by (pool, le) (rate(a_bucket{pool=~"$pool", x!~"y}"}[$__rate_interval] offset 1h)))
           / on (pool) group_left(name) max without (backend) (b) * 1e3 > bool inf or c{}"#,
    )
    .expect("valid PromQL");
    assert_eq!(
        refs,
        Refs {
            selectors: vec![
                ("a_bucket".into(), vec!["pool".into(), "x".into()]),
                ("b".into(), Vec::new()),
                ("c".into(), Vec::new()),
            ],
            labels: ["pool", "le", "pool", "name", "backend"]
                .map(String::from)
                .to_vec(),
        }
    );
    assert!(promql("a{b=").is_err());
    assert!(promql("a{b=\"c\"").is_err());
    assert!(promql("sum by (a-b) (c)").is_err());
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_listener_and_pool_variables() {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    assert_eq!(variable("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(variable("DS_PROMETHEUS")["query"], "prometheus");
    for name in ["listener", "pool"] {
        assert_eq!(variable(name)["type"], "query");
        let queries = dashboard_variables(&dashboard);
        let (_, query) = queries
            .iter()
            .find(|(n, _)| n == name)
            .expect("a query variable");
        assert!(
            query.starts_with("label_values(") && query.ends_with(&format!(", {name})")),
            "{name}: {query}"
        );
    }
    // Every panel queries the chosen data source, has a place on the grid and an id of its own.
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id twice"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            queries += 1;
        }
    }
    assert_eq!(queries, dashboard_queries(&dashboard).len());
    // The panels the dashboard is for.
    let used: String = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(_, expr, _)| expr)
        .collect();
    for metric in [
        "weighbridge_connections_accepted_total",
        "weighbridge_connections_active",
        "weighbridge_pool_queue_length",
        "weighbridge_pool_queue_wait_seconds_bucket",
        "weighbridge_connections_rejected_total",
        "weighbridge_backend_effective_weight",
        "weighbridge_backend_healthy",
        "weighbridge_backend_load_estimate",
        "weighbridge_backend_max_connections",
        "weighbridge_backend_connect_duration_seconds_bucket",
        "weighbridge_backend_bytes_total",
    ] {
        assert!(used.contains(metric), "no panel shows {metric}");
    }
}

#[test]
fn every_rule_has_a_duration_a_severity_a_summary_and_a_description() {
    let alerts: Yaml = serde_yaml_ng::from_str(&read(ALERTS)).expect("the rules are YAML");
    let rules = rules(&alerts);
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().expect("only alerting rules");
        assert!(names.insert(name), "{name} twice");
        let duration = rule["for"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: for"));
        assert!(
            humantime::parse_duration(duration).is_ok(),
            "{name}: for: {duration}"
        );
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|t| !t.trim().is_empty()),
                "{name}: annotation {key}"
            );
        }
    }
    let backend_down = rules
        .iter()
        .find(|r| r["alert"] == "WeighbridgeBackendDown")
        .expect("a rule for a backend down");
    assert_eq!(backend_down["for"], "5m");
    let text = read(ALERTS);
    for metric in [
        "weighbridge_backend_healthy",
        "weighbridge_pool_queue_timed_out_total",
        "weighbridge_reloads_total",
        "process_open_fds",
        "process_max_fds",
        "weighbridge_connect_failures_total",
        "weighbridge_connect_attempts_total",
    ] {
        assert!(text.contains(metric), "no rule uses {metric}");
    }
}

/// `promtool` on the PATH or where Debian's `prometheus` package puts it. When it is missing,
/// the repository's script installs it (it needs root), so `cargo test` works on a fresh
/// machine, and the test fails saying what to run if it still is.
fn promtool() -> PathBuf {
    let find = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/bin")])
            .map(|dir| dir.join("promtool"))
            .find(|file| file.is_file())
    };
    if let Some(found) = find() {
        return found;
    }
    let script = repo("scripts/install-test-peers.sh");
    let outcome = match std::process::Command::new("bash").arg(&script).output() {
        Ok(out) if out.status.success() => String::new(),
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        Err(e) => format!("cannot run {}: {e}", script.display()),
    };
    find().unwrap_or_else(|| {
        panic!(
            "promtool is not installed ({outcome}): run `bash scripts/install-test-peers.sh` \
             as root (it installs Debian's prometheus package)"
        )
    })
}

#[tokio::test]
async fn promtool_accepts_the_rules() {
    bounded(LIMIT, async {
        let output = tokio::process::Command::new(promtool())
            .arg("check")
            .arg("rules")
            .arg(repo(ALERTS))
            .output()
            .await
            .expect("run promtool");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "promtool check rules {ALERTS}: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let count = rules(&serde_yaml_ng::from_str(&read(ALERTS)).expect("YAML")).len();
        assert!(
            stdout.contains(&format!("SUCCESS: {count} rules found")),
            "{stdout}"
        );
    })
    .await;
}
