//! `/metrics` after known traffic: every counter and gauge equals what the clients did, and the
//! exposition is valid Prometheus text.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use support::{
    LISTENER, Mock, Refusing, bounded, config_with_admin, eventually, eventually_async, exchange,
    http, start_balancer,
};

const LIMIT: Duration = Duration::from_secs(60);
const SOON: Duration = Duration::from_secs(10);
/// Client connections sent through the listener.
const CONNECTIONS: usize = 100;
/// Bytes each client sends; the echo backends send them back.
const BYTES: u64 = 10_000;
/// Client connections sent to a listener whose only backend refuses.
const REFUSED: usize = 5;

/// Samples by metric name and sorted `label=value` pairs; a histogram by its `_count`.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// Checks every line of a Prometheus text exposition (format 0.0.4) strictly, then parses it.
fn parse(text: &str) -> Samples {
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut helped = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name), "bad metric name in {line:?}");
            assert!(!help.is_empty(), "empty help in {line:?}");
            helped.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name type");
            assert!(valid_name(name), "bad metric name in {line:?}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type in {line:?}"
            );
            assert!(
                helped.last().is_some_and(|h| h == name),
                "TYPE without HELP: {line:?}"
            );
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line:?} twice"
            );
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            assert!(value >= 0.0, "negative value in {line:?}");
            let name = series.split('{').next().expect("a name");
            assert!(valid_name(name), "bad metric name in {line:?}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(
                typed.contains_key(family),
                "sample before its TYPE: {line:?}"
            );
            if typed[family] == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line:?}");
            }
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    let inner = labels
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .unwrap_or_else(|| panic!("labels in {line:?}"));
                    for pair in inner.split("\",") {
                        let (key, value) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("label in {line:?}"));
                        assert!(
                            valid_name(key) && !key.contains(':'),
                            "label name in {line:?}"
                        );
                        assert!(
                            !value.trim_end_matches('"').contains('"'),
                            "label value in {line:?}"
                        );
                    }
                }
            }
        }
    }
    assert!(text.ends_with('\n'), "exposition ends with a newline");

    let scrape =
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("prometheus-parse reads it");
    let mut samples = Samples::new();
    for sample in scrape.samples {
        let mut labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let value = match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            Value::Histogram(buckets) => {
                // Cumulative buckets never decrease and end at +Inf.
                assert!(
                    buckets.windows(2).all(|w| w[0].count <= w[1].count),
                    "{buckets:?}"
                );
                assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
                buckets.last().map_or(0.0, |b| b.count)
            }
            Value::Summary(_) => panic!("no summaries are exported"),
        };
        assert!(
            samples
                .insert((sample.metric.clone(), labels), value)
                .is_none(),
            "duplicate series of {}",
            sample.metric
        );
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The value of `name` with exactly `labels`.
fn get(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    key.sort();
    *samples
        .get(&(name.to_owned(), key))
        .unwrap_or_else(|| panic!("no {name}{labels:?}"))
}

#[tokio::test]
async fn metrics_after_known_traffic_equal_what_the_clients_did() {
    bounded(LIMIT, async {
        let (echo_a, echo_b) = (Mock::echo().await, Mock::echo().await);
        let refusing = Refusing::new();
        let (a, b) = (echo_a.addr.to_string(), echo_b.addr.to_string());
        let mut text = config_with_admin(
            "weighted_round_robin",
            "",
            &[(echo_a.addr, 3.0), (echo_b.addr, 1.0)],
            None,
        );
        text.push_str(&format!(
            "[[listener]]\nname = \"dead\"\nbind = \"127.0.0.1:0\"\nconnect_attempts = 2\n\
             [[listener.backend]]\naddr = \"{}\"\n",
            refusing.addr
        ));
        let lb = start_balancer(&text);
        let dead: SocketAddr = lb
            .handle
            .local_addr("dead")
            .expect("listener dead is bound");

        // 100 echo exchanges, 10 at a time; round robin over weights 3:1 splits them 75/25.
        let mut clients = JoinSet::new();
        for seed in 0..CONNECTIONS as u64 {
            let addr = lb.addr;
            clients.spawn(async move {
                let stream = TcpStream::connect(addr)
                    .await
                    .expect("connect to the balancer");
                exchange(stream, seed, BYTES).await.expect("echo exchange")
            });
            if clients.len() == 10 {
                let t = clients
                    .join_next()
                    .await
                    .expect("a client")
                    .expect("no panic");
                assert_eq!((t.sent, t.received_len), (t.received, BYTES));
            }
        }
        while let Some(joined) = clients.join_next().await {
            let t = joined.expect("no panic");
            assert_eq!((t.sent, t.received_len), (t.received, BYTES));
        }
        for _ in 0..REFUSED {
            let mut stream = TcpStream::connect(dead)
                .await
                .expect("connect to listener dead");
            let mut buf = [0_u8; 1];
            // Closed by the balancer once its one backend refused.
            assert_eq!(stream.read(&mut buf).await.unwrap_or(0), 0);
        }
        // Three connections held open while scraping.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                TcpStream::connect(lb.addr)
                    .await
                    .expect("connect to the balancer"),
            );
        }
        // A backend may accept before the balancer has counted the connect as done: wait for both.
        eventually(SOON, "3 open connections counted", || {
            let established =
                lb.backend(echo_a.addr).connections + lb.backend(echo_b.addr).connections;
            lb.listener().open == 3
                && echo_a.open() + echo_b.open() == 3
                && established == CONNECTIONS as u64 + 3
        })
        .await;

        let answer = http(lb.admin(), "GET", "/metrics", None).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let m = parse(&answer.body);
        let lb_ = [("listener", LISTENER)];
        let ba = [("listener", LISTENER), ("backend", a.as_str())];
        let bb = [("listener", LISTENER), ("backend", b.as_str())];
        let n = CONNECTIONS as f64;
        let bytes = BYTES as f64;

        assert_eq!(
            get(&m, "weighbridge_connections_accepted_total", &lb_),
            n + 3.0
        );
        assert_eq!(get(&m, "weighbridge_connections_active", &lb_), 3.0);
        assert_eq!(get(&m, "weighbridge_connect_attempts_total", &lb_), n + 3.0);
        assert_eq!(get(&m, "weighbridge_connect_failures_total", &lb_), 0.0);
        assert_eq!(get(&m, "weighbridge_all_unhealthy", &lb_), 0.0);
        assert_eq!(get(&m, "weighbridge_routed_all_unhealthy_total", &lb_), 0.0);
        for reason in ["max_connections", "no_backend", "all_unhealthy"] {
            let labels = [("listener", LISTENER), ("reason", reason)];
            assert_eq!(
                get(&m, "weighbridge_connections_rejected_total", &labels),
                0.0
            );
        }
        // Only closed connections have a duration.
        assert_eq!(get(&m, "weighbridge_connection_duration_seconds", &lb_), n);
        assert_eq!(
            get(&m, "weighbridge_connection_duration_seconds_count", &lb_),
            n
        );

        let active_a = echo_a.open() as f64;
        let active_b = echo_b.open() as f64;
        for (labels, share, active, weight) in
            [(ba, 0.75, active_a, 3.0), (bb, 0.25, active_b, 1.0)]
        {
            let done = n * share;
            let established = done + active;
            assert_eq!(
                get(&m, "weighbridge_backend_connections_total", &labels),
                established
            );
            assert_eq!(
                get(&m, "weighbridge_backend_connections_active", &labels),
                active
            );
            assert_eq!(
                get(&m, "weighbridge_backend_connect_failures_total", &labels),
                0.0
            );
            assert_eq!(
                get(&m, "weighbridge_backend_connect_duration_seconds", &labels),
                established
            );
            for direction in ["to_backend", "from_backend"] {
                let mut with = labels.to_vec();
                with.push(("direction", direction));
                assert_eq!(
                    get(&m, "weighbridge_backend_bytes_total", &with),
                    done * bytes
                );
            }
            assert_eq!(get(&m, "weighbridge_backend_weight", &labels), weight);
            assert_eq!(
                get(&m, "weighbridge_backend_effective_weight", &labels),
                weight
            );
            assert_eq!(get(&m, "weighbridge_backend_healthy", &labels), 1.0);
            assert_eq!(get(&m, "weighbridge_backend_ejected", &labels), 0.0);
            assert_eq!(get(&m, "weighbridge_backend_drained", &labels), 0.0);
        }
        assert_eq!(active_a + active_b, 3.0);

        let dead_ = [("listener", "dead")];
        let refused = REFUSED as f64;
        let dead_backend = refusing.addr.to_string();
        let db = [("listener", "dead"), ("backend", dead_backend.as_str())];
        assert_eq!(
            get(&m, "weighbridge_connections_accepted_total", &dead_),
            refused
        );
        // One backend: a retry has nowhere else to go, so one attempt per client.
        assert_eq!(
            get(&m, "weighbridge_connect_attempts_total", &dead_),
            refused
        );
        assert_eq!(
            get(&m, "weighbridge_connect_failures_total", &dead_),
            refused
        );
        let no_backend = [("listener", "dead"), ("reason", "no_backend")];
        assert_eq!(
            get(&m, "weighbridge_connections_rejected_total", &no_backend),
            refused
        );
        assert_eq!(
            get(&m, "weighbridge_backend_connect_failures_total", &db),
            refused
        );
        assert_eq!(get(&m, "weighbridge_backend_connections_total", &db), 0.0);

        for result in ["success", "failure"] {
            assert_eq!(
                get(&m, "weighbridge_reloads_total", &[("result", result)]),
                0.0
            );
        }
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(get(&m, "weighbridge_build_info", &version), 1.0);

        // After the held connections close, the gauges are back at 0 and a reload is counted.
        drop(held);
        eventually(SOON, "held connections to close", || {
            lb.listener().open == 0
        })
        .await;
        let config =
            weighbridge::Config::parse(&text, std::path::Path::new("t.toml")).expect("valid");
        lb.handle
            .apply(config)
            .await
            .expect("reload of the same config");
        let m = parse(&http(lb.admin(), "GET", "/metrics", None).await.body);
        assert_eq!(get(&m, "weighbridge_connections_active", &lb_), 0.0);
        assert_eq!(get(&m, "weighbridge_backend_connections_active", &ba), 0.0);
        assert_eq!(get(&m, "weighbridge_backend_connections_active", &bb), 0.0);
        assert_eq!(
            get(&m, "weighbridge_connection_duration_seconds_count", &lb_),
            n + 3.0
        );
        assert_eq!(
            get(&m, "weighbridge_reloads_total", &[("result", "success")]),
            1.0
        );
        lb.stop().await;
    })
    .await;
}

#[tokio::test]
async fn clients_turned_away_because_no_backend_is_healthy_show_in_metrics_and_status() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let refusing = Refusing::new();
        let mut text = config_with_admin("weighted_round_robin", "", &[(echo.addr, 1.0)], None);
        text.push_str(&format!(
            "[[listener]]\nname = \"sick\"\nbind = \"127.0.0.1:0\"\n\
             [listener.health]\nkind = \"tcp\"\ninterval = \"100ms\"\nfall = 1\n\
             startup_grace = \"0s\"\nall_unhealthy = \"reject\"\n\
             [[listener.backend]]\naddr = \"{}\"\n",
            refusing.addr
        ));
        let lb = start_balancer(&text);
        let sick: SocketAddr = lb
            .handle
            .local_addr("sick")
            .expect("listener sick is bound");
        let status = || async {
            let answer = http(lb.admin(), "GET", "/status", None).await;
            assert_eq!(answer.status, 200, "{answer:?}");
            answer.json()["listeners"]
                .as_array()
                .expect("listeners is an array")
                .iter()
                .find(|l| l["name"] == "sick")
                .expect("listener sick in /status")["connections"]
                .clone()
        };
        eventually_async(SOON, "/status to say no backend is healthy", || async {
            status().await["all_unhealthy"] == true
        })
        .await;

        const TURNED_AWAY: usize = 3;
        for _ in 0..TURNED_AWAY {
            let mut stream = TcpStream::connect(sick)
                .await
                .expect("connect to listener sick");
            let mut buf = [0_u8; 1];
            // Closed at once, nothing relayed (a reset is a close too).
            assert_eq!(stream.read(&mut buf).await.unwrap_or(0), 0);
        }
        eventually(SOON, "the clients counted as closed", || {
            lb.handle
                .listener_counters("sick")
                .is_some_and(|c| c.open == 0 && c.rejected_all_unhealthy == TURNED_AWAY as u64)
        })
        .await;

        let counts = status().await;
        assert_eq!(counts["rejected_all_unhealthy"], TURNED_AWAY, "{counts}");
        assert_eq!(counts["routed_all_unhealthy"], 0, "{counts}");
        assert_eq!(counts["all_unhealthy_episodes"], 1, "{counts}");
        assert_eq!(counts["accepted"], TURNED_AWAY, "{counts}");

        let m = parse(&http(lb.admin(), "GET", "/metrics", None).await.body);
        let labels = [("listener", "sick")];
        assert_eq!(get(&m, "weighbridge_all_unhealthy", &labels), 1.0);
        assert_eq!(
            get(&m, "weighbridge_all_unhealthy_episodes_total", &labels),
            1.0
        );
        assert_eq!(
            get(
                &m,
                "weighbridge_connections_rejected_total",
                &[("listener", "sick"), ("reason", "all_unhealthy")]
            ),
            TURNED_AWAY as f64
        );
        // Turned away at once, but each was open for a moment: counted in the durations.
        assert_eq!(
            get(&m, "weighbridge_connection_duration_seconds", &labels),
            TURNED_AWAY as f64
        );
        lb.stop().await;
    })
    .await;
}
