//! Every way a file can be rejected: the message names the problem and the line.

use super::parse_str;

/// Parses `text`, which must fail, and returns (line, message).
fn error(text: &str) -> (Option<usize>, String) {
    let e = parse_str(text).expect_err("config should be rejected");
    (e.location.map(|l| l.line), e.to_string())
}

/// Checks each (text, line, part of the message) case: refused, one line, naming the file and
/// the line.
fn assert_refused(cases: Vec<(String, Option<usize>, &str)>) {
    for (text, line, needle) in cases {
        let (got_line, message) = error(&text);
        assert!(
            message.contains(needle),
            "{message:?} lacks {needle:?} for:\n{text}"
        );
        assert_eq!(got_line, line, "wrong line in {message:?} for:\n{text}");
        assert!(message.starts_with("test.toml"), "{message:?}");
        assert!(!message.contains('\n'), "not one line: {message:?}");
    }
}

#[test]
fn errors_name_the_line_and_the_problem() {
    let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
    let backend = "[[listener.backend]]\naddr = \"127.0.0.1:2\"\n";
    let health = "[listener.health]\n";
    let load = "[listener.health.load]\n";
    let cases: Vec<(String, Option<usize>, &str)> = vec![
        ("[[listener]\n".into(), Some(1), "expected `]`"),
        (
            format!("{listener}strategyy = \"x\"\n{backend}"),
            Some(4),
            "unknown field `strategyy`",
        ),
        (
            format!("{listener}{backend}colour = 1\n"),
            Some(6),
            "unknown field `colour`",
        ),
        (
            format!("{listener}strategy = \"fastest\"\n{backend}"),
            Some(4),
            "`fastest`, expected one of `weighted_round_robin`, `weighted_random`, `capacity_proportional`",
        ),
        (
            format!("{listener}{backend}weight = -1\n"),
            Some(6),
            "invalid value -1",
        ),
        (
            format!("{listener}backend_congestion_control = \"nosuchcc\"\n{backend}"),
            Some(4),
            "`backend_congestion_control`: `nosuchcc` is not available on this machine (net.ipv4.tcp_available_congestion_control: ",
        ),
        (
            format!("{listener}backend_congestion_control = \"BBR\"\n{backend}"),
            Some(4),
            "`backend_congestion_control`: invalid name `BBR`",
        ),
        (
            format!("{listener}{backend}weight = nan\n"),
            Some(6),
            "invalid value NaN",
        ),
        (
            format!("{listener}{backend}weight = inf\n"),
            Some(6),
            "invalid value inf",
        ),
        (
            format!("{listener}{backend}weight = \"x\"\n"),
            Some(6),
            "`weight`: invalid type",
        ),
        (
            format!("{listener}{backend}weight = 0\n"),
            Some(1),
            "every backend has weight 0",
        ),
        (String::new(), None, "no listener defined"),
        (
            "shutdown_grace = \"1s\"\n".into(),
            None,
            "no listener defined",
        ),
        (listener.into(), Some(1), "listener `a` has no backend"),
        (
            format!("{listener}{backend}{listener}{backend}"),
            Some(7),
            "duplicate listener name `a`",
        ),
        (
            format!(
                "{listener}{backend}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1\"\n{backend}"
            ),
            Some(8),
            "already used by listener `a`",
        ),
        (
            format!(
                "{listener}{backend}[[listener]]\nname = \"b\"\nbind = \"0.0.0.0:1\"\n{backend}"
            ),
            Some(8),
            "bind address 0.0.0.0:1 is already used by listener `a`, bound to 127.0.0.1:1",
        ),
        (
            format!("[admin]\nbind = \"[::ffff:127.0.0.1]:1\"\n{listener}{backend}"),
            Some(2),
            "is already used by listener `a`, bound to 127.0.0.1:1",
        ),
        (
            format!("{listener}{backend}{backend}"),
            Some(7),
            "backend 127.0.0.1:2 is listed twice",
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"localhost:80\"\n".into(),
            Some(3),
            "`bind`: invalid address `localhost:80`",
        ),
        (
            format!("{listener}[[listener.backend]]\naddr = \"10.0.0.1\"\n"),
            Some(5),
            "`addr`: invalid address `10.0.0.1`",
        ),
        (
            format!("{listener}connect_timeout = \"2 parsecs\"\n{backend}"),
            Some(4),
            "`connect_timeout`: invalid duration",
        ),
        (
            format!("{listener}connect_timeout = 2\n{backend}"),
            Some(4),
            "`connect_timeout`: invalid type: integer `2`, expected a string (a duration is a string with a unit, e.g. \"2s\"",
        ),
        (
            format!("{listener}{backend}weight = 1\nweight = 2\n"),
            Some(7),
            "duplicate key `weight`",
        ),
        (
            "[listener]\nname = \"a\"\n".into(),
            Some(1),
            "`listener`: invalid type: map, expected a sequence: write each entry of `listener` as [[listener]]",
        ),
        (
            format!("{listener}{backend}[listener]\nname = \"b\"\n"),
            Some(6),
            "duplicate key `listener`: write each entry of `listener` as [[listener]]",
        ),
        (
            format!("threads = 1025\n{listener}{backend}"),
            Some(1),
            "`threads` must be at most 1024",
        ),
        (
            format!("{listener}idle_timeout = \"0s\"\n{backend}"),
            Some(4),
            "`idle_timeout` must be longer than 0",
        ),
        (
            format!("{listener}connect_attempts = 0\n{backend}"),
            Some(4),
            "`connect_attempts` must be at least 1",
        ),
        (
            format!("{listener}max_connections = -5\n{backend}"),
            Some(4),
            "`max_connections`: invalid value",
        ),
        (
            format!("{listener}name = \"b\"\n{backend}"),
            Some(4),
            "duplicate key",
        ),
        (
            "[[listener]]\nname = \" \"\nbind = \"127.0.0.1:1\"\n".into(),
            Some(2),
            "`name` must not be empty",
        ),
        (
            "[[listener]]\nname = \"chat\\nINFO forged\"\nbind = \"127.0.0.1:1\"\n".into(),
            Some(2),
            "`name`: invalid listener name \"chat\\nINFO forged\": use letters",
        ),
        (
            "[[listener]]\nname = \"chat api\"\nbind = \"127.0.0.1:1\"\n".into(),
            Some(2),
            "invalid listener name \"chat api\"",
        ),
        (
            "[[listener]]\nbind = \"127.0.0.1:1\"\n".into(),
            Some(1),
            "missing field `name`",
        ),
        (
            format!("[admin]\nbind = \"0.0.0.0:9900\"\n{listener}{backend}"),
            Some(2),
            "[admin] `bind` = 0.0.0.0:9900 is not a loopback address, so [admin] `token` is required",
        ),
        (
            format!("[admin]\nbind = \"10.1.2.3:9900\"\ntoken = \"\"\n{listener}{backend}"),
            Some(3),
            "[admin] `token` must be non-empty visible ASCII",
        ),
        (
            format!("[admin]\nbind = \"127.0.0.1:9900\"\ntoken = \"a b\"\n{listener}{backend}"),
            Some(3),
            "[admin] `token` must be non-empty visible ASCII",
        ),
        (
            format!("[admin]\nbind = \"localhost\"\n{listener}{backend}"),
            Some(2),
            "`bind`: invalid address `localhost`",
        ),
        (
            format!("[admin]\nbind = \"127.0.0.1:1\"\n{listener}{backend}"),
            Some(2),
            "[admin] `bind` 127.0.0.1:1 is already used by listener `a`",
        ),
        (
            format!("[admin]\ntoken = \"t\"\n{listener}{backend}"),
            Some(1),
            "missing field `bind`",
        ),
        (
            format!("[admin]\nbind = \"127.0.0.1:9\"\nport = 1\n{listener}{backend}"),
            Some(3),
            "unknown field `port`",
        ),
        (
            format!("[log]\nformat = \"xml\"\n{listener}{backend}"),
            Some(2),
            "unknown variant `xml`, expected `text` or `json`",
        ),
        (
            format!("[log]\naccess_log = \"yes\"\n{listener}{backend}"),
            Some(2),
            "`access_log`: invalid type",
        ),
        (
            format!("[log]\nlevel = \"info\"\n{listener}{backend}"),
            Some(2),
            "unknown field `level`",
        ),
        (
            format!("{listener}[[listener.backend]]\naddr = \"10.0.0.1:0\"\n"),
            Some(5),
            "`addr`: port 0 in `10.0.0.1:0`",
        ),
        (
            format!("{listener}{backend}health_addr = \"[::1]:0\"\n"),
            Some(6),
            "`health_addr`: port 0 in `[::1]:0`",
        ),
        (
            format!("{listener}{backend}health_addr = \"h:1\"\n"),
            Some(6),
            "`health_addr`: invalid address `h:1`",
        ),
        (
            format!("{listener}{health}kind = \"tcp\"\npath = \"/x\"\n{backend}"),
            Some(6),
            "`path` applies only to kind = \"http\"",
        ),
        (
            format!("{listener}{health}kind = \"grpc\"\n{backend}"),
            Some(5),
            "unknown variant `grpc`, expected `tcp` or `http`",
        ),
        (
            format!("{listener}{health}colour = 1\n{backend}"),
            Some(5),
            "unknown field `colour`",
        ),
        (
            format!("{listener}{health}interval = \"0s\"\n{backend}"),
            Some(5),
            "`interval` must be longer than 0",
        ),
        (
            format!("{listener}{health}timeout = \"fast\"\n{backend}"),
            Some(5),
            "`timeout`: invalid duration `fast`",
        ),
        (
            format!("{listener}{health}rise = 0\n{backend}"),
            Some(5),
            "`rise` must be at least 1",
        ),
        (
            format!("{listener}{health}fall = 0\n{backend}"),
            Some(5),
            "`fall` must be at least 1",
        ),
        (
            format!("{listener}{health}slow_start = \"0s\"\n{backend}"),
            Some(5),
            "`slow_start` must be longer than 0",
        ),
        (
            format!("{listener}{health}expect_status = [200,\n 700]\n{backend}"),
            Some(6),
            "`expect_status`: invalid status 700",
        ),
        (
            format!("{listener}{health}expect_status = []\n{backend}"),
            Some(5),
            "`expect_status` must not be empty",
        ),
        (
            format!("{listener}{health}path = \"health\"\n{backend}"),
            Some(5),
            "`path`: invalid path `health`",
        ),
        (
            format!("{listener}{health}host = \"a b\"\n{backend}"),
            Some(5),
            "`host`: invalid value `a b`",
        ),
        (
            format!("{listener}{health}host = \"a\\nb\"\n{backend}"),
            Some(5),
            "`host`: invalid value `a\\nb`",
        ),
        (
            format!("{listener}{health}expect_body = \"\"\n{backend}"),
            Some(5),
            "`expect_body` must not be empty",
        ),
        (
            format!("{listener}{health}all_unhealthy = \"panic\"\n{backend}"),
            Some(5),
            "unknown variant `panic`, expected `route_anyway` or `reject`",
        ),
        (
            format!("{listener}{load}interval = \"1s\"\n{backend}"),
            Some(4),
            "needs `preset`",
        ),
        (
            format!("{listener}{load}preset = \"ollama\"\n{backend}"),
            Some(5),
            "unknown variant `ollama`",
        ),
        (
            format!("{listener}{load}preset = \"vllm\"\nsaturation = 0\n{backend}"),
            Some(6),
            "`saturation`: invalid value 0",
        ),
        (
            format!("{listener}{load}preset = \"vllm\"\nmin_weight_percent = 150\n{backend}"),
            Some(6),
            "`min_weight_percent`: invalid value 150",
        ),
        (
            format!("{listener}{load}preset = \"vllm\"\nmin_weight_percent = 0\n{backend}"),
            Some(6),
            "`min_weight_percent`: invalid value 0: must be more than 0",
        ),
        (
            format!("{listener}{load}preset = \"triton\"\nport = 70000\n{backend}"),
            Some(6),
            "`port`: invalid port 70000",
        ),
        (
            format!("{listener}{load}metric = \"queue depth\"\n{backend}"),
            Some(5),
            "`metric`: invalid metric name `queue depth`",
        ),
        (
            format!("{listener}{load}preset = \"vllm\"\npath = \"metrics\"\n{backend}"),
            Some(6),
            "`path`: invalid path `metrics`",
        ),
        (
            format!("{listener}[listener.passive]\nmax_connect_failures = 0\n{backend}"),
            Some(5),
            "`max_connect_failures` must be at least 1",
        ),
        (
            format!("{listener}[listener.passive]\neject_for = \"soon\"\n{backend}"),
            Some(5),
            "`eject_for`: invalid duration `soon`",
        ),
        (
            format!("{listener}[listener.passive]\neject_for = \"300000000000y\"\n{backend}"),
            Some(5),
            "`eject_for` must be at most 365 days",
        ),
        (
            format!("{listener}idle_timeout = \"366d\"\n{backend}"),
            Some(4),
            "`idle_timeout` must be at most 365 days",
        ),
        (
            format!("{listener}[listener.passive]\neject_after = 3\n{backend}"),
            Some(5),
            "unknown field `eject_after`, expected `max_connect_failures` or `eject_for`",
        ),
    ];
    assert_refused(cases);
}

#[test]
fn pool_errors_name_the_key_and_the_line() {
    let pool = "[[pool]]\nname = \"gpu\"\n[[pool.backend]]\naddr = \"127.0.0.1:2\"\n";
    let uses = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"gpu\"\n";
    let inline = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
    let backend = "[[listener.backend]]\naddr = \"127.0.0.1:2\"\n";
    let cases: Vec<(String, Option<usize>, &str)> = vec![
        (
            format!("{pool}{uses}strategy = \"weighted_random\"\n"),
            Some(9),
            "listener `a`: `strategy` belongs to its pool `gpu`",
        ),
        (
            format!("{pool}{uses}{backend}"),
            Some(9),
            "listener `a`: `backend` belongs to its pool `gpu`",
        ),
        (
            format!("{pool}{uses}queue_timeout = \"1s\"\n"),
            Some(9),
            "`queue_timeout` belongs to its pool `gpu`",
        ),
        (
            format!("{pool}{}", uses.replace("\"gpu\"", "\"gpus\"")),
            Some(8),
            "listener `a`: `pool`: no [[pool]] is named `gpus` (pools: gpu)",
        ),
        (
            format!("{pool}{pool}{uses}"),
            Some(6),
            "duplicate pool name `gpu`",
        ),
        (
            format!("{}{inline}{backend}", pool.replace("gpu", "a")),
            Some(6),
            "duplicate pool name `a`",
        ),
        (
            format!("[[pool]]\nname = \"gpu\"\n{uses}"),
            Some(1),
            "pool `gpu` has no backend: add at least one [[pool.backend]] table",
        ),
        (
            format!("{pool}max_connections = 0\n{uses}"),
            Some(5),
            "`max_connections` must be at least 1",
        ),
        (
            format!("{inline}max_queued = -1\n{backend}"),
            Some(4),
            "max_queued",
        ),
        (
            format!("{inline}queue_timeout = \"soon\"\n{backend}"),
            Some(4),
            "`queue_timeout`: invalid duration `soon`",
        ),
        (
            format!(
                "{pool}[pool.health.load]\nmetric = \"q\"\nin_flight_metrics = [\"ok\", \"no good\"]\n{uses}"
            ),
            Some(7),
            "no good",
        ),
    ];
    assert_refused(cases);
}

#[test]
fn a_listener_without_backends_is_told_about_pool_too() {
    let (_, message) = error("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n");
    assert!(message.contains("or `pool = \"...\"`"), "{message}");
}

#[test]
fn backend_names_and_the_resolver_table_are_checked() {
    let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
    let entry = "[[listener.backend]]\n";
    let cases: Vec<(String, Option<usize>, &str)> = vec![
        (
            format!("{listener}{entry}addr = \"10.0.0:8000\"\n"),
            Some(5),
            "expected IP:port such as 127.0.0.1:8000 or [::1]:8000, or a DNS name and port",
        ),
        (
            format!("{listener}{entry}addr = \"gpu_01 .local:8000\"\n"),
            Some(5),
            "`addr`: invalid address `gpu_01 .local:8000`",
        ),
        (
            format!("{listener}{entry}addr = \"vllm.local:0\"\n"),
            Some(5),
            "port 0 in `vllm.local:0`",
        ),
        (
            format!("{listener}{entry}addr = \"vllm.local\"\n"),
            Some(5),
            "invalid address `vllm.local`",
        ),
        (
            format!(
                "{listener}{entry}addr = \"vllm.local:8000\"\nsrv = \"_http._tcp.vllm.local\"\n"
            ),
            Some(6),
            "a backend has `addr` or `srv`, not both",
        ),
        (
            format!("{listener}{entry}weight = 2\n"),
            Some(4),
            "a backend needs `addr` (IP:port or NAME:port) or `srv`",
        ),
        (
            format!("{listener}{entry}srv = \"not a name\"\n"),
            Some(5),
            "`srv`: invalid name `not a name`",
        ),
        (
            format!("{listener}{entry}addr = \"vllm.local:8000\"\nhealth_addr = \"127.0.0.1:9\"\n"),
            Some(6),
            "`health_addr` cannot be set on a backend given by name",
        ),
        (
            format!(
                "{listener}{entry}addr = \"vllm.local:8000\"\n{entry}addr = \"VLLM.local.:8000\"\n"
            ),
            Some(7),
            "listener `a`: backend name `vllm.local:8000` is listed twice",
        ),
        (
            format!(
                "[resolver]\nnameservers = [\"dns.local\"]\n{listener}{entry}addr = \"vllm.local:8000\"\n"
            ),
            Some(2),
            "`nameservers`: invalid nameserver `dns.local`",
        ),
        (
            format!("[resolver]\nnameservers = []\n{listener}{entry}addr = \"vllm.local:8000\"\n"),
            Some(2),
            "`nameservers`: empty",
        ),
        (
            format!("[resolver]\nrefresh = \"0s\"\n{listener}{entry}addr = \"vllm.local:8000\"\n"),
            Some(2),
            "`refresh`",
        ),
        (
            format!(
                "[resolver]\ntimeout = \"fast\"\n{listener}{entry}addr = \"vllm.local:8000\"\n"
            ),
            Some(2),
            "`timeout`: invalid duration `fast`",
        ),
    ];
    assert_refused(cases);
}

#[test]
fn client_keys_are_checked() {
    let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
    let backend = "[[listener.backend]]\naddr = \"127.0.0.1:2\"\n";
    let cases: Vec<(String, Option<usize>, &str)> = vec![
        (
            format!("{listener}accept_proxy = \"v2\"\n{backend}"),
            Some(4),
            "`accept_proxy` needs `proxy_trusted`",
        ),
        (
            format!("{listener}proxy_trusted = [\"10.0.0.0/8\"]\n{backend}"),
            Some(4),
            "`proxy_trusted` does nothing without `accept_proxy`",
        ),
        (
            format!("{listener}accept_proxy = \"v3\"\nproxy_trusted = []\n{backend}"),
            Some(4),
            "unknown variant `v3`",
        ),
        (
            format!("{listener}allow = [\"10.0.0.0/33\"]\n{backend}"),
            Some(4),
            "`allow`: `10.0.0.0/33`: the prefix length must be a number from 0 to 32",
        ),
        (
            format!("{listener}deny = [\"example.com\"]\n{backend}"),
            Some(4),
            "`deny`: `example.com` is not an IP address or network",
        ),
        (
            format!("{listener}send_proxy = \"yes\"\n{backend}"),
            Some(4),
            "unknown variant `yes`",
        ),
        (
            format!("{listener}{backend}send_proxy = \"v3\"\n"),
            Some(6),
            "unknown variant `v3`",
        ),
        (
            format!("{listener}connection_rate_per_client = \"fast\"\n{backend}"),
            Some(4),
            "`connection_rate_per_client`: invalid rate `fast`",
        ),
        (
            format!("{listener}connection_rate_per_client = \"0/s\"\n{backend}"),
            Some(4),
            "invalid rate `0/s`",
        ),
        (
            format!("{listener}max_connections_per_client = 0\n{backend}"),
            Some(4),
            "max_connections_per_client",
        ),
    ];
    assert_refused(cases);
}
