//! Shared helpers for the end-to-end tests: backends on loopback, clients, the balancer started
//! in-process or as the binary, the admin endpoint, an authoritative DNS server for backends
//! given by name, and deadline-bounded polling instead of sleeps.
//!
//! Every socket is on 127.0.0.1 with a port the kernel picks, so test files can run in parallel.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

mod backend;
mod client;
mod dns;
mod hello;
mod poll;
mod process;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weighbridge::{
    BackendCounters, Balancer, Config, Handle, ListenerCounters, StartError, Stopped,
};

#[allow(unused_imports)]
pub use {backend::*, client::*, dns::*, hello::*, poll::*, process::*};

/// The listener name every in-process config uses.
pub const LISTENER: &str = "lb";

/// Text of a config with one listener named [`LISTENER`] on an ephemeral loopback port.
///
/// `settings` holds extra `key = value` lines for the listener (timeouts, limits).
pub fn config(strategy: &str, settings: &str, backends: &[(SocketAddr, f64)]) -> String {
    let mut text = format!(
        "shutdown_grace = \"5s\"\n[[listener]]\nname = \"{LISTENER}\"\nbind = \"127.0.0.1:0\"\n\
         strategy = \"{strategy}\"\n{settings}\n"
    );
    for (addr, weight) in backends {
        text.push_str(&format!(
            "[[listener.backend]]\naddr = \"{addr}\"\nweight = {weight:?}\n"
        ));
    }
    text
}

/// [`config`] with an `[admin]` table on an ephemeral loopback port (and `token`, if given).
pub fn config_with_admin(
    strategy: &str,
    settings: &str,
    backends: &[(SocketAddr, f64)],
    token: Option<&str>,
) -> String {
    let mut text = config(strategy, settings, backends);
    text.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    if let Some(token) = token {
        text.push_str(&format!("token = \"{token}\"\n"));
    }
    text
}

/// A balancer serving in a task of the test's runtime.
#[derive(Debug)]
pub struct Running {
    /// The listener the test talks to: [`LISTENER`] unless started with [`Running::try_start`].
    pub name: String,
    /// Where that listener accepted when the balancer started.
    pub addr: SocketAddr,
    /// Live counters, reloads, admin state.
    pub handle: Handle,
    /// Cancelling it starts shutdown.
    pub shutdown: CancellationToken,
    /// The task running [`Balancer::run`].
    pub task: JoinHandle<Stopped>,
}

/// Parses `toml`, binds and starts serving it. Must be called inside a tokio runtime.
pub fn start_balancer(toml: &str) -> Running {
    let config = Config::parse(toml, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("test config must be valid: {e}\n{toml}"));
    Running::try_start(&config, None, LISTENER).expect("bind the balancer on loopback")
}

/// Like [`start_balancer`], from a file that [`Handle::reload`] (and `POST /reload`) re-read.
pub fn start_balancer_from_file(path: &Path) -> Running {
    let config = Config::load(path).unwrap_or_else(|e| panic!("test config must be valid: {e}"));
    Running::try_start(&config, Some(path), LISTENER).expect("bind the balancer on loopback")
}

impl Running {
    /// Binds `config` and starts serving it in the test's runtime, re-reading `path` on a
    /// reload if given; `listener` names the listener the test talks to.
    pub fn try_start(
        config: &Config,
        path: Option<&Path>,
        listener: &str,
    ) -> Result<Running, StartError> {
        // Capacity tests hold a few hundred sockets in this one process.
        if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
            eprintln!("cannot raise the open file limit: {e}");
        }
        let mut builder = Balancer::builder(config.clone());
        if let Some(path) = path {
            builder = builder.config_path(path);
        }
        let balancer = builder.bind()?;
        let addr = balancer
            .local_addr(listener)
            .unwrap_or_else(|| panic!("the config has listener `{listener}`"));
        let handle = balancer.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(balancer.run(shutdown.clone()));
        Ok(Running {
            name: listener.to_owned(),
            addr,
            handle,
            shutdown,
            task,
        })
    }

    /// Where listener `name` accepts now.
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.handle
            .local_addr(name)
            .unwrap_or_else(|| panic!("listener `{name}` is configured and bound"))
    }

    /// Counters of `backend` in the test's listener.
    pub fn backend(&self, backend: SocketAddr) -> BackendCounters {
        self.handle
            .backend_counters(&self.name, backend)
            .unwrap_or_else(|| panic!("backend {backend} is configured"))
    }

    /// Counters of the test's listener.
    pub fn listener(&self) -> ListenerCounters {
        self.handle
            .listener_counters(&self.name)
            .unwrap_or_else(|| panic!("listener `{}` is configured", self.name))
    }

    /// Connections the balancer counts as active on `backends`, in order.
    pub fn active(&self, backends: &[SocketAddr]) -> Vec<u64> {
        backends.iter().map(|&b| self.backend(b).active).collect()
    }

    /// Where the admin endpoint listens; the config must have an `[admin]` table.
    pub fn admin(&self) -> SocketAddr {
        self.handle
            .admin_addr()
            .expect("the config has an [admin] table")
    }

    /// Starts shutdown and waits (at most 10 s) for the balancer to stop.
    pub async fn stop(self) -> Stopped {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the balancer stops within 10 s of shutdown")
            .expect("the balancer task does not panic")
    }
}

/// Runs each named test body (an `async fn(splice: bool)`) once per data path: zero-copy
/// splice and the portable copy, as `name::splice` and `name::copy`.
///
/// Each body starts its balancer with [`data_path_config`] and ends with
/// [`Running::assert_data_path`], so the `splice` case fails if no byte took the splice path
/// and the `copy` case if one did.
#[allow(unused_macros)]
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn splice() {
                super::$name(true).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn copy() {
                super::$name(false).await;
            }
        }
    )*};
}

/// Bytes a test of both data paths moves through the balancer, at the least, in each direction
/// it checks: many times the relay's read buffer, so that on the splice path reads fill it and
/// the direction switches to splice(2).
pub const SPLICE_AT_LEAST: u64 = 1 << 20;

/// The label of the bytes a backend's counters count from clients to it.
pub const TO_BACKEND: &str = "to_backend";
/// The label of the bytes a backend's counters count from it to clients.
pub const FROM_BACKEND: &str = "from_backend";
/// Both directions of a backend's byte counters.
pub const BOTH_WAYS: [&str; 2] = [TO_BACKEND, FROM_BACKEND];

/// A config for a test run on both data paths: listener [`LISTENER`] with weighted round robin
/// over `backends`, the extra listener `settings`, `splice = true` or `false`, and an admin
/// endpoint for [`Running::assert_data_path`].
pub fn data_path_config(splice: bool, settings: &str, backends: &[(SocketAddr, f64)]) -> String {
    let settings = format!("{settings}\nsplice = {splice}");
    config_with_admin("weighted_round_robin", &settings, backends, None)
}

/// The value of the sample `name` with exactly `labels` in a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = Scrape::parse(exposition.lines().map(|line| Ok(line.to_owned())))
        .expect("the exposition parses");
    let sample = scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && sample.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(k).is_some_and(|l| l == *v))
        })
        .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{exposition}"));
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{name}{labels:?} is not a single number: {other:?}"),
    }
}

impl Running {
    /// Asserts which data path moved the bytes between the test's listener and `backend`, as
    /// `weighbridge_backend_spliced_bytes` on `/metrics` reports it: with `splice`, some of
    /// them in each of `directions` went through splice(2); on the copy path none did either
    /// way. Either way the spliced bytes are a part of `weighbridge_backend_bytes`.
    pub async fn assert_data_path(&self, backend: SocketAddr, splice: bool, directions: &[&str]) {
        let answer = http(self.admin(), "GET", "/metrics", None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let backend = backend.to_string();
        for direction in BOTH_WAYS {
            let labels = [
                ("listener", self.name.as_str()),
                ("backend", backend.as_str()),
                ("direction", direction),
            ];
            let spliced = metric(
                &answer.body,
                "weighbridge_backend_spliced_bytes_total",
                &labels,
            );
            let bytes = metric(&answer.body, "weighbridge_backend_bytes_total", &labels);
            assert!(
                spliced <= bytes,
                "{backend} {direction}: {spliced} bytes spliced of {bytes}"
            );
            if !splice {
                assert_eq!(
                    spliced, 0.0,
                    "{backend} {direction}: spliced on the copy path"
                );
            } else if directions.contains(&direction) {
                assert!(
                    spliced > 0.0,
                    "{backend} {direction}: none of {bytes} bytes took the splice path"
                );
            }
        }
    }
}

/// An HTTP answer from the admin endpoint.
#[derive(Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request to `addr` (with `Connection: close`) and reads the whole answer.
/// `token` adds `Authorization: Bearer <token>`. Fails the test after 10 s.
pub async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> HttpResponse {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the admin endpoint");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read the answer");
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"));
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
        "this helper reads only length-delimited bodies"
    );
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}
