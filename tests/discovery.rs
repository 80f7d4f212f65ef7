//! Backends by DNS name, end to end: a real DNS server on loopback (tests/support/dns.rs) whose
//! records change while clients connect through the balancer. Addresses join and leave with no
//! client error and the streams of vanished addresses finish; failures keep the last good set;
//! TTLs and `refresh` set when names are asked again; SRV gives ports; AAAA works; a reload in
//! the middle keeps a name's addresses and their live state; `--check --resolve` prints what
//! each name gives.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::{
    DnsMode, DnsServer, LISTENER, Mock, Running, bounded, connect_identify, echo, eventually, http,
    metric, open_identify, run, within,
};
use weighbridge::{AdminState, Config, NameStatus};

/// Overall bound on each test.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a change may take to show: a resolution every second at most, plus a query.
const SOON: Duration = Duration::from_secs(10);
/// The pool every test's listener sends to.
const POOL: &str = "fleet";

/// A config whose `[resolver]` asks only `dns`, with `resolver` lines added (`refresh`, ...),
/// and pool [`POOL`] made of `entries` (`[[pool.backend]]` tables), behind listener
/// [`LISTENER`].
fn config(dns: &DnsServer, resolver: &str, entries: &str) -> String {
    format!(
        "shutdown_grace = \"2s\"\nthreads = 2\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [resolver]\nnameservers = [\"{}\"]\ntimeout = \"300ms\"\n{resolver}\n\
         [[pool]]\nname = \"{POOL}\"\n{entries}\n\
         [[listener]]\nname = \"{LISTENER}\"\nbind = \"127.0.0.1:0\"\npool = \"{POOL}\"\n",
        dns.addr
    )
}

fn start(text: &str) -> Running {
    let config = Config::parse(text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{text}"));
    Running::try_start(&config, None, LISTENER).expect("bind the balancer on loopback")
}

/// The backends of the pool in the running snapshot.
fn backends(lb: &Running) -> BTreeSet<SocketAddr> {
    lb.handle
        .effective_weights(LISTENER)
        .unwrap_or_default()
        .into_iter()
        .map(|(addr, _)| addr)
        .collect()
}

/// What the balancer knows of `name`.
fn status(lb: &Running, name: &str) -> NameStatus {
    lb.handle
        .names()
        .into_iter()
        .find(|(target, _)| target.to_string() == name)
        .map(|(_, status)| status)
        .unwrap_or_default()
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal address")
}

/// Identify backends, one per address of `ips`, all on one port (a name gives every address
/// the same port); greeting with the last byte of their address (or `id_base` + index).
async fn same_port(ips: &[&str], id_base: u8) -> (u16, Vec<Mock>) {
    'port: for _ in 0..20 {
        let Some(first) = Mock::identify_at(SocketAddr::new(ip(ips[0]), 0), id_base).await else {
            continue;
        };
        let port = first.addr.port();
        let mut mocks = vec![first];
        for (i, other) in ips.iter().enumerate().skip(1) {
            let id = id_base + u8::try_from(i).expect("few backends");
            match Mock::identify_at(SocketAddr::new(ip(other), port), id).await {
                Some(mock) => mocks.push(mock),
                None => continue 'port,
            }
        }
        return (port, mocks);
    }
    panic!("no port free on every one of {ips:?}");
}

/// Clients connecting through the balancer one after another until stopped: each reads its
/// backend's greeting, echoes a few bytes and closes. Counts failures and records who answered.
struct Traffic {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    served: Arc<std::sync::Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, errors, served) = (stop.clone(), errors.clone(), served.clone());
            async move {
                while !stop.load(Ordering::SeqCst) {
                    match open_identify(addr).await {
                        Ok((mut stream, id)) => {
                            if echo(&mut stream, b"ping").await.is_err() {
                                errors.fetch_add(1, Ordering::SeqCst);
                            }
                            served.lock().expect("served list").push(id);
                        }
                        Err(e) => {
                            eprintln!("client error: {e}");
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
        Traffic {
            stop,
            errors,
            served,
            task,
        }
    }

    /// Whether a client has been served by backend `id` since the last [`Traffic::forget`].
    fn saw(&self, id: u8) -> bool {
        self.served.lock().expect("served list").contains(&id)
    }

    fn forget(&self) {
        self.served.lock().expect("served list").clear();
    }

    /// Stops the clients and returns how many failed.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        within(async { self.task.await.map_err(std::io::Error::other) })
            .await
            .expect("the client loop ends");
        self.errors.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_follows_its_records_while_clients_connect_and_vanished_addresses_finish_their_streams()
 {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
        let (port, mocks) = same_port(&ips, 2).await;
        let addr = |i: usize| SocketAddr::new(ip(ips[i]), port);
        dns.set_a("fleet.test", &[ip(ips[0]), ip(ips[1])], 1);
        let lb = start(&config(
            &dns,
            "refresh = \"1s\"",
            &format!("[[pool.backend]]\naddr = \"fleet.test:{port}\""),
        ));
        // Resolved before the first client is accepted: the first client is served.
        connect_identify(lb.addr).await;
        assert_eq!(backends(&lb), BTreeSet::from([addr(0), addr(1)]));
        // A stream to the first address, which is about to vanish.
        let mut held = loop {
            let (stream, id) = connect_identify(lb.addr).await;
            if id == mocks[0].id() {
                break stream;
            }
        };
        let traffic = Traffic::start(lb.addr);

        // 2 → 4 addresses: the new ones get clients.
        dns.set_a("fleet.test", &ips.map(ip), 1);
        eventually(SOON, "four backends", || backends(&lb).len() == 4).await;
        eventually(SOON, "clients served by the new addresses", || {
            traffic.saw(mocks[2].id()) && traffic.saw(mocks[3].id())
        })
        .await;

        // 4 → 1: only the one left gets new clients; the held stream goes on.
        dns.set_a("fleet.test", &[ip(ips[1])], 1);
        eventually(SOON, "one backend", || {
            backends(&lb) == BTreeSet::from([addr(1)])
        })
        .await;
        let accepted: Vec<usize> = mocks.iter().map(Mock::accepted).collect();
        traffic.forget();
        eventually(SOON, "more clients served", || {
            traffic.served.lock().expect("served list").len() >= 20
        })
        .await;
        assert!(
            traffic
                .served
                .lock()
                .expect("served list")
                .iter()
                .all(|&id| id == mocks[1].id()),
            "only the remaining address serves new clients"
        );
        for i in [0, 2, 3] {
            assert_eq!(
                mocks[i].accepted(),
                accepted[i],
                "{} got a new connection",
                addr(i)
            );
        }
        echo(&mut held, b"still here")
            .await
            .expect("the stream to the vanished address goes on");
        let errors = traffic.stop().await;
        assert_eq!(errors, 0, "no client failed while the records changed");
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_keep_the_last_addresses_and_are_counted_by_reason() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let (port, mocks) = same_port(&["127.0.0.2", "127.0.0.3"], 2).await;
        dns.set_a("flaky.test", &[ip("127.0.0.2"), ip("127.0.0.3")], 1);
        let name = format!("flaky.test:{port}");
        let lb = start(&config(
            &dns,
            "refresh = \"1s\"",
            &format!("[[pool.backend]]\naddr = \"{name}\""),
        ));
        connect_identify(lb.addr).await;
        assert_eq!(backends(&lb).len(), 2);
        for (mode, reason) in [
            (DnsMode::NxDomain, "nxdomain"),
            (DnsMode::ServFail, "servfail"),
            (DnsMode::Empty, "empty"),
            (DnsMode::Silent, "timeout"),
        ] {
            dns.set_mode("flaky.test", mode);
            eventually(SOON, reason, || status(&lb, &name).failing == Some(reason)).await;
            let now = status(&lb, &name);
            assert_eq!(now.addresses.len(), 2, "{reason}: the last good set stays");
            assert!(now.failures[reason] >= 1, "{reason} counted: {now:?}");
            assert_eq!(backends(&lb).len(), 2, "{reason}: the pool keeps both");
            let (_, id) = connect_identify(lb.addr).await;
            assert!(mocks.iter().any(|m| m.id() == id), "served during {reason}");
        }
        let scrape = http(lb.admin(), "GET", "/metrics", None).await.body;
        for reason in ["nxdomain", "servfail", "empty", "timeout"] {
            assert!(
                metric(
                    &scrape,
                    "weighbridge_resolve_failures_total",
                    &[("name", &name), ("reason", reason)]
                ) >= 1.0,
                "{reason} in /metrics"
            );
        }
        assert_eq!(
            metric(&scrape, "weighbridge_resolve_addresses", &[("name", &name)]),
            2.0
        );
        dns.set_mode("flaky.test", DnsMode::Answer);
        eventually(SOON, "resolving again", || {
            status(&lb, &name).failing.is_none()
        })
        .await;
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_ttl_brings_the_next_resolution_forward_and_refresh_bounds_a_long_one() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let (port, _mocks) = same_port(&["127.0.0.2"], 2).await;
        // refresh 60 s: only the TTL can make these names be asked again within the test.
        dns.set_a("ttl1.test", &[ip("127.0.0.2")], 1);
        dns.set_a("ttl0.test", &[ip("127.0.0.2")], 0);
        let lb = start(&config(
            &dns,
            "refresh = \"60s\"",
            &format!(
                "[[pool.backend]]\naddr = \"ttl1.test:{port}\"\n\
                 [[pool.backend]]\naddr = \"ttl0.test:{port}\""
            ),
        ));
        // Each resolution asks for A and AAAA: three resolutions are six queries.
        eventually(SOON, "ttl1.test asked again after its TTL", || {
            dns.queries("ttl1.test") >= 6
        })
        .await;
        // A TTL of 0 is not a query loop: at most one resolution a second.
        let ttl0 = dns.queries("ttl0.test");
        assert!(
            ttl0 <= 2 * 12,
            "ttl0.test asked {ttl0} times in the time ttl1.test was asked 3 times"
        );
        lb.stop().await;

        // A TTL of an hour: `refresh` asks again anyway.
        dns.set_a("long.test", &[ip("127.0.0.2")], 3600);
        let lb = start(&config(
            &dns,
            "refresh = \"1s\"",
            &format!("[[pool.backend]]\naddr = \"long.test:{port}\""),
        ));
        eventually(SOON, "long.test asked again after refresh", || {
            dns.queries("long.test") >= 6
        })
        .await;
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_targets_and_ports_and_aaaa_records_give_ipv6_backends() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let a = Mock::identify(1).await;
        let b = Mock::identify(2).await;
        let (six_port, six) = same_port(&["::1"], 3).await;
        dns.set_srv(
            "_llm._tcp.srv.test",
            &[
                (0, 10, a.addr.port(), "a.srv.test"),
                (0, 90, b.addr.port(), "b.srv.test"),
            ],
            1,
        );
        dns.set_a("a.srv.test", &[ip("127.0.0.1")], 1);
        dns.set_a("b.srv.test", &[ip("127.0.0.1")], 1);
        dns.set_a("six.test", &[ip("::1")], 1);
        let lb = start(&config(
            &dns,
            "",
            &format!(
                "[[pool.backend]]\nsrv = \"_llm._tcp.srv.test\"\n\
                 [[pool.backend]]\naddr = \"six.test:{six_port}\""
            ),
        ));
        let six_addr = SocketAddr::new(ip("::1"), six_port);
        connect_identify(lb.addr).await;
        assert_eq!(backends(&lb), BTreeSet::from([a.addr, b.addr, six_addr]));
        let mut ids = BTreeSet::new();
        for _ in 0..6 {
            ids.insert(connect_identify(lb.addr).await.1);
        }
        assert_eq!(ids, BTreeSet::from([a.id(), b.id(), six[0].id()]));
        let srv = status(&lb, "srv:_llm._tcp.srv.test");
        let mut want = vec![a.addr, b.addr];
        want.sort();
        assert_eq!(srv.addresses, want);
        // The status page names where each backend came from.
        let page = http(lb.admin(), "GET", "/status", None).await.json();
        let listed = &page["pools"][0]["backends"];
        let names: BTreeSet<(String, String)> = listed
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().expect("addr").to_owned(),
                    b["name"].as_str().expect("name").to_owned(),
                )
            })
            .collect();
        assert!(names.contains(&(six_addr.to_string(), format!("six.test:{six_port}"))));
        assert!(names.contains(&(a.addr.to_string(), "srv:_llm._tcp.srv.test".to_owned())));
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_names_addresses_and_their_state_and_adds_a_new_name() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let (port, _mocks) = same_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"], 2).await;
        dns.set_a("kept.test", &[ip("127.0.0.2"), ip("127.0.0.3")], 1);
        dns.set_a("added.test", &[ip("127.0.0.4")], 1);
        let kept = format!("[[pool.backend]]\naddr = \"kept.test:{port}\"\n");
        let lb = start(&config(&dns, "", &kept));
        connect_identify(lb.addr).await;
        let drained = SocketAddr::new(ip("127.0.0.2"), port);
        lb.handle
            .set_pool_admin_state(POOL, drained, AdminState::Drained)
            .await
            .expect("drain a resolved backend");
        let new = config(
            &dns,
            "refresh = \"2s\"",
            &format!("{kept}[[pool.backend]]\naddr = \"added.test:{port}\"\n"),
        );
        lb.handle
            .apply(Config::parse(&new, Path::new("test.toml")).expect("valid"))
            .await
            .expect("reload");
        // At once: the kept name's addresses never left, and the drain stayed.
        let now = lb.handle.effective_weights(LISTENER).expect("listener");
        assert!(now.contains(&(drained, 0.0)), "{now:?}");
        assert!(
            now.iter()
                .any(|(a, w)| *a == SocketAddr::new(ip("127.0.0.3"), port) && *w > 0.0)
        );
        eventually(SOON, "the new name's backend", || {
            backends(&lb).contains(&SocketAddr::new(ip("127.0.0.4"), port))
        })
        .await;
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_answer_at_start_does_not_stop_the_balancer() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        let (port, mocks) = same_port(&["127.0.0.2"], 2).await;
        dns.set_a("late.test", &[ip("127.0.0.2")], 1);
        dns.set_mode("late.test", DnsMode::Silent);
        let lb = start(&config(
            &dns,
            "refresh = \"1s\"",
            &format!("[[pool.backend]]\naddr = \"late.test:{port}\""),
        ));
        assert!(backends(&lb).is_empty());
        let mut stream = within(tokio::net::TcpStream::connect(lb.addr))
            .await
            .expect("accepted");
        support::assert_closed_without_data(&mut stream, SOON).await;
        assert_eq!(lb.listener().rejected_no_backend, 1);
        dns.set_mode("late.test", DnsMode::Answer);
        eventually(SOON, "the name's backend once it answers", || {
            backends(&lb).len() == 1
        })
        .await;
        assert_eq!(connect_identify(lb.addr).await.1, mocks[0].id());
        lb.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_resolve_prints_what_each_name_gives_and_check_alone_asks_nothing() {
    bounded(LIMIT, async {
        let dns = DnsServer::start().await;
        dns.set_a("good.test", &[ip("127.0.0.3"), ip("127.0.0.2")], 30);
        dns.set_mode("bad.test", DnsMode::NxDomain);
        let text = config(
            &dns,
            "",
            "[[pool.backend]]\naddr = \"good.test:8000\"\n[[pool.backend]]\naddr = \"bad.test:8000\"",
        );
        let file = support::config_file(&text);
        let path = file.path().to_str().expect("utf-8 path");

        let output = run(&["--check", "--config", path]).await;
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("0 backend(s), 2 backend name(s)"), "{stdout}");
        assert_eq!(dns.queries("good.test"), 0, "--check alone resolves nothing");

        let output = run(&["--check", "--resolve", "--config", path]).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stdout.contains("good.test:8000: 127.0.0.2:8000 127.0.0.3:8000"),
            "{stdout}"
        );
        assert!(
            stdout.contains("bad.test:8000: does not resolve (nxdomain)"),
            "{stdout}"
        );
        assert_eq!(
            stderr.trim(),
            "weighbridge: error: backend name(s) that do not resolve: bad.test:8000"
        );
    })
    .await;
}
