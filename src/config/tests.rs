//! Parsing whole files: what valid ones turn into, and the small pieces the errors rely on. The
//! table of rejected files and their messages is in [`errors`].

mod errors;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use super::health::{
    DEFAULT_EJECT_FOR, DEFAULT_FALL, DEFAULT_HEALTH_PATH, DEFAULT_INTERVAL, DEFAULT_LOAD_INTERVAL,
    DEFAULT_MAX_CONNECT_FAILURES, DEFAULT_METRICS_PATH, DEFAULT_MIN_WEIGHT_PERCENT, DEFAULT_RISE,
    DEFAULT_SATURATION, DEFAULT_STARTUP_GRACE, DEFAULT_TIMEOUT,
};
use super::validate::binds_overlap;
use super::*;

const MINIMAL: &str = r#"
[[listener]]
name = "chat"
bind = "127.0.0.1:8000"
[[listener.backend]]
addr = "127.0.0.1:9001"
"#;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(text, Path::new("test.toml"))
}

#[test]
fn minimal_config_gets_every_default() {
    let config = parse_str(MINIMAL).expect("valid");
    assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    let l = &config.listeners[0];
    let p = &config.pools[0];
    assert_eq!(p.strategy, StrategyKind::WeightedRoundRobin);
    assert_eq!(l.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(l.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(l.connect_attempts, DEFAULT_CONNECT_ATTEMPTS);
    assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(l.splice, DEFAULT_SPLICE);
    assert_eq!(l.backend_congestion_control, None);
    assert_eq!(config.threads, None);
    assert_eq!(p.backends[0].weight, Weight::ONE);
    assert_eq!(config.admin, None);
    assert_eq!(config.log, LogConfig::default());
    assert_eq!(config.log.format, LogFormat::Text);
    assert!(!config.log.access_log);
}

#[test]
fn admin_and_log_tables_are_read() {
    let text = format!(
        "[admin]\nbind = \"0.0.0.0:9900\"\ntoken = \"s3cret-Token\"\n\
         [log]\nformat = \"json\"\naccess_log = true\n{MINIMAL}"
    );
    let config = parse_str(&text).expect("valid");
    let admin = config.admin.expect("[admin] given");
    assert_eq!(admin.bind, "0.0.0.0:9900".parse().expect("literal"));
    let token = admin.token.expect("token given");
    assert!(token.matches(b"s3cret-Token"));
    assert!(!token.matches(b"s3cret-Tokem"));
    assert!(!token.matches(b"s3cret"));
    assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    assert_eq!(config.log.format, LogFormat::Json);
    assert!(config.log.access_log);
    // On loopback the token is optional.
    let text = format!("[admin]\nbind = \"[::1]:0\"\n{MINIMAL}");
    assert_eq!(
        parse_str(&text).expect("valid").admin,
        Some(AdminConfig {
            bind: "[::1]:0".parse().expect("literal"),
            token: None
        })
    );
}

#[test]
fn every_key_is_read() {
    let text = r#"
shutdown_grace = "5s"
threads = 3
[[listener]]
name = "embed"
bind = "[::1]:0"
strategy = "capacity_proportional"
connect_timeout = "250ms"
idle_timeout = "1h"
connect_attempts = 5
max_connections = 7
splice = false
backend_congestion_control = "reno"
[[listener.backend]]
addr = "[::1]:9001"
weight = 2
[[listener.backend]]
addr = "127.0.0.1:9002"
weight = 0.5
"#;
    let config = parse_str(text).expect("valid");
    assert_eq!(config.shutdown_grace, Duration::from_secs(5));
    assert_eq!(config.threads.map(NonZeroUsize::get), Some(3));
    let l = &config.listeners[0];
    let p = &config.pools[0];
    assert!(
        !l.splice,
        "the default is true: false proves the key is read"
    );
    assert_eq!(l.bind, "[::1]:0".parse::<SocketAddr>().expect("literal"));
    assert_eq!(p.strategy, StrategyKind::CapacityProportional);
    assert_eq!(l.connect_timeout, Duration::from_millis(250));
    assert_eq!(l.idle_timeout, Duration::from_secs(3600));
    assert_eq!((l.connect_attempts.get(), l.max_connections.get()), (5, 7));
    assert_eq!(
        l.backend_congestion_control
            .as_ref()
            .map(CongestionControl::as_str),
        Some("reno")
    );
    let weights: Vec<f64> = p.backends.iter().map(|b| b.weight.get()).collect();
    assert_eq!(weights, [2.0, 0.5]);
    assert_eq!((p.health.as_ref(), p.passive), (None, None));
    assert_eq!(p.backends[0].health_addr, None);
}

#[test]
fn every_health_key_is_read() {
    let text = r#"
[[listener]]
name = "chat"
bind = "127.0.0.1:0"
[listener.health]
kind = "http"
path = "/v2/health/ready"
host = "models.internal"
expect_status = [200, 204]
expect_body = "ok"
interval = "500ms"
timeout = "250ms"
rise = 4
fall = 5
startup_grace = "0s"
slow_start = "1m"
all_unhealthy = "reject"
[listener.health.load]
preset = "triton"
path = "/custom"
port = 9002
metric = "my_queue"
in_flight_metrics = ["my_running", " my_waiting "]
saturation = 8.5
min_weight_percent = 25
interval = "3s"
[listener.passive]
max_connect_failures = 2
eject_for = "1s"
[[listener.backend]]
addr = "127.0.0.1:9001"
health_addr = "127.0.0.1:9101"
"#;
    let config = parse_str(text).expect("valid");
    assert_eq!(config.listeners[0].forward, Forward::Pool("chat".into()));
    let p = &config.pools[0];
    let h = p.health.as_ref().expect("health configured");
    assert_eq!(
        h.probe,
        Probe::Http(HttpProbe {
            path: "/v2/health/ready".into(),
            host: Some("models.internal".into()),
            expect_status: ExpectStatus::AnyOf(vec![200, 204]),
            expect_body: Some("ok".into()),
        })
    );
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_millis(500), Duration::from_millis(250))
    );
    assert_eq!((h.rise.get(), h.fall.get()), (4, 5));
    assert_eq!(h.startup_grace, Duration::ZERO);
    assert_eq!(h.slow_start, Some(Duration::from_secs(60)));
    assert_eq!(h.all_unhealthy, AllUnhealthy::Reject);
    let load = h.load.as_ref().expect("load configured");
    assert_eq!(
        *load,
        LoadConfig {
            path: "/custom".into(),
            port: Some(9002),
            metric: "my_queue".into(),
            in_flight_metrics: vec!["my_running".into(), "my_waiting".into()],
            saturation: 8.5,
            min_factor: 0.25,
            interval: Duration::from_secs(3),
        }
    );
    let passive = p.passive.expect("passive configured");
    assert_eq!(passive.max_connect_failures.get(), 2);
    assert_eq!(passive.eject_for, Duration::from_secs(1));
    let backend = p.backends[0];
    assert_eq!(
        backend.probe_addr(),
        "127.0.0.1:9101".parse::<SocketAddr>().expect("literal")
    );
}

#[test]
fn empty_health_tables_get_every_default() {
    let text = format!(
        "{MINIMAL}[listener.health]\n[listener.health.load]\npreset = \"vllm\"\n[listener.passive]\n"
    );
    let config = parse_str(&text).expect("valid");
    assert_eq!(config.listeners[0].forward, Forward::Pool("chat".into()));
    let p = &config.pools[0];
    let h = p.health.as_ref().expect("health configured");
    let Probe::Http(http) = &h.probe else {
        panic!("http is the default probe: {:?}", h.probe)
    };
    assert_eq!(http.path, DEFAULT_HEALTH_PATH);
    assert_eq!(
        (http.host.as_ref(), http.expect_body.as_ref()),
        (None, None)
    );
    assert_eq!(http.expect_status, ExpectStatus::Success);
    assert_eq!((h.interval, h.timeout), (DEFAULT_INTERVAL, DEFAULT_TIMEOUT));
    assert_eq!((h.rise, h.fall), (DEFAULT_RISE, DEFAULT_FALL));
    assert_eq!(h.startup_grace, DEFAULT_STARTUP_GRACE);
    assert_eq!(h.slow_start, None);
    assert_eq!(h.all_unhealthy, AllUnhealthy::RouteAnyway);
    let load = h.load.as_ref().expect("load configured");
    assert_eq!(load.metric, "vllm:num_requests_waiting");
    assert_eq!(
        (load.path.as_str(), load.port),
        (DEFAULT_METRICS_PATH, None)
    );
    assert_eq!(load.saturation, DEFAULT_SATURATION);
    assert_eq!(load.min_factor, DEFAULT_MIN_WEIGHT_PERCENT / 100.0);
    assert_eq!(load.interval, DEFAULT_LOAD_INTERVAL);
    let passive = p.passive.expect("passive configured");
    assert_eq!(passive.max_connect_failures, DEFAULT_MAX_CONNECT_FAILURES);
    assert_eq!(passive.eject_for, DEFAULT_EJECT_FOR);
    // Triton's metrics live on their own port unless told otherwise.
    let triton = format!("{MINIMAL}[listener.health.load]\npreset = \"triton\"\n");
    let config = parse_str(&triton).expect("valid");
    let load = config.pools[0]
        .health
        .as_ref()
        .and_then(|h| h.load.as_ref());
    assert_eq!(load.map(|l| l.port), Some(Some(8002)));
    // A TCP probe carries no HTTP settings.
    let tcp = format!("{MINIMAL}[listener.health]\nkind = \"tcp\"\n");
    let config = parse_str(&tcp).expect("valid");
    assert_eq!(
        config.pools[0].health.as_ref().map(|h| &h.probe),
        Some(&Probe::Tcp)
    );
}

#[test]
fn overlapping_binds_are_the_ones_the_kernel_refuses() {
    let overlap = |a: &str, b: &str| {
        let (a, b) = (a.parse().expect("literal"), b.parse().expect("literal"));
        assert_eq!(binds_overlap(a, b), binds_overlap(b, a), "symmetric");
        binds_overlap(a, b)
    };
    assert!(overlap("127.0.0.1:80", "127.0.0.1:80"));
    assert!(overlap("0.0.0.0:80", "10.0.0.1:80"));
    assert!(overlap("[::]:80", "[::1]:80"));
    assert!(overlap("[::ffff:10.0.0.1]:80", "10.0.0.1:80"));
    assert!(overlap("[::ffff:10.0.0.1]:80", "0.0.0.0:80"));
    assert!(!overlap("127.0.0.1:80", "127.0.0.2:80"));
    assert!(!overlap("0.0.0.0:80", "0.0.0.0:81"));
    assert!(
        !overlap("127.0.0.1:0", "127.0.0.1:0"),
        "port 0 picks a free port each"
    );
    assert!(!overlap("0.0.0.0:80", "[::1]:80"), "other family");
}

#[test]
fn missing_file_names_the_path() {
    let e = load(Path::new("/nonexistent/weighbridge.toml")).expect_err("no such file");
    assert!(matches!(*e.kind, ConfigErrorKind::Read(_)));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/weighbridge.toml: cannot read")
    );
}

#[test]
fn weight_rejects_what_strategies_cannot_use() {
    for bad in [-0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert!(Weight::new(bad).is_none(), "{bad}");
    }
    assert_eq!(Weight::new(-0.0), Some(Weight::ZERO));
    assert!(Weight::new(0.0).is_some_and(Weight::is_zero));
}

#[test]
fn locations_count_lines_and_characters() {
    assert_eq!(Location::of("ab\ncd", 4), Location { line: 2, column: 2 });
    assert_eq!(Location::of("µ=1", 2), Location { line: 1, column: 2 });
}

#[test]
fn shipped_example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("conf/ exists") {
        let path = entry.expect("readable conf/ entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked > 0, "no example in {}", dir.display());
}

#[test]
fn names_are_sources_of_backends_that_expand_after_the_addresses_written() {
    let text = r#"
[resolver]
nameservers = ["127.0.0.1:5353", "::1"]
refresh = "200ms"
[[listener]]
name = "chat"
bind = "127.0.0.1:8000"
[[listener.backend]]
addr = "Vllm.Inference.svc.cluster.local.:8000"
weight = 2
max_connections = 8
[[listener.backend]]
addr = "127.0.0.1:9001"
[[listener.backend]]
srv = "_http._tcp.embed.local"
"#;
    let mut config = parse_str(text).expect("valid");
    assert_eq!(
        config.resolver.nameservers,
        Some(vec![
            "127.0.0.1:5353".parse().expect("literal"),
            "[::1]:53".parse().expect("literal"),
        ])
    );
    assert_eq!(config.resolver.timeout, discovery::DEFAULT_RESOLVE_TIMEOUT);
    assert_eq!(config.resolver.refresh, MIN_REFRESH, "raised to 1 s");
    let host = Target::Host {
        host: "vllm.inference.svc.cluster.local".into(),
        port: 8000,
    };
    let srv = Target::Srv {
        name: "_http._tcp.embed.local".into(),
    };
    assert_eq!(config.names(), vec![&host, &srv]);
    assert_eq!(
        config.backend_count(),
        1,
        "only the address written, until resolved"
    );
    let addr = |s: &str| -> SocketAddr { s.parse().expect("literal") };
    let answers = HashMap::from([
        (
            host.clone(),
            vec![addr("10.0.0.2:8000"), addr("10.0.0.1:8000")],
        ),
        (
            srv.clone(),
            vec![addr("127.0.0.1:9001"), addr("10.0.0.9:7000")],
        ),
    ]);
    config.expand(&answers);
    let backends: Vec<(SocketAddr, f64, Option<u32>, Option<usize>)> = config.pools[0]
        .backends
        .iter()
        .map(|b| {
            (
                b.addr,
                b.weight.get(),
                b.max_connections.map(NonZeroU32::get),
                b.from_name,
            )
        })
        .collect();
    assert_eq!(
        backends,
        vec![
            (addr("127.0.0.1:9001"), 1.0, None, None),
            (addr("10.0.0.2:8000"), 2.0, Some(8), Some(0)),
            (addr("10.0.0.1:8000"), 2.0, Some(8), Some(0)),
            // 127.0.0.1:9001 is written as an address already: not added twice.
            (addr("10.0.0.9:7000"), 1.0, None, Some(1)),
        ]
    );
    // Expanding again replaces what the names gave; the addresses written stay.
    config.expand(&HashMap::from([(host, vec![addr("10.0.0.3:8000")])]));
    let addrs: Vec<SocketAddr> = config.pools[0].backends.iter().map(|b| b.addr).collect();
    assert_eq!(addrs, vec![addr("127.0.0.1:9001"), addr("10.0.0.3:8000")]);
}
