//! A mock inference server, to try weighbridge's health checks by hand; the demo and the tests
//! use the same code (they include this file as a module).
//!
//! ```text
//! cargo run --example mock_inference -- --listen 127.0.0.1:9001 --listen 127.0.0.1:9002 --loading 3s
//! ```
//!
//! Each `--listen` address is one server. What each one answers:
//!
//! | path       | answer |
//! |------------|--------|
//! | `/health`  | 503 `{"error":{"code":503,"message":"Loading model"}}` for `--loading`, then 200 `{"status":"ok"}` (llama.cpp's wording); never answers with `--hang-health` |
//! | `/metrics` | Prometheus text with the gauge `vllm:num_requests_waiting`: the requests it is busy answering now (each takes `--latency`), or `--waiting N` |
//! | any other  | 200 `served by <its address>`, after `--latency`, so `curl` through the balancer shows who served |
//!
//! `--die-after 20s` makes the process exit after 20 s, to watch a balancer notice a dead
//! server; start it again to watch it come back (and ramp, with `slow_start`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a hung `/health` request is held before the server gives up on it itself.
const HANG_FOR: Duration = Duration::from_secs(60);

/// How a mock server behaves; every field can also be changed while it runs through
/// [`MockState`].
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// `/health` answers 503 "Loading model" for this long after the start.
    pub loading: Duration,
    /// `/health` never answers.
    pub hang_health: bool,
    /// Time each request to another path takes before its answer.
    pub latency: Duration,
    /// A fixed value for `vllm:num_requests_waiting` instead of the requests in flight.
    pub waiting: Option<u64>,
}

/// What a mock server does and has seen; shared with its connection tasks.
#[derive(Debug)]
pub struct MockState {
    ready_at: Mutex<Instant>,
    hang_health: AtomicBool,
    /// Status `/health` answers with instead of the loading/ready one; 0 = none.
    health_status: AtomicU16,
    /// Body `/health` answers with instead of the default one.
    health_body: Mutex<Option<String>>,
    /// Status `/metrics` answers with; 0 = 200 with the gauge.
    metrics_status: AtomicU16,
    /// Fixed `vllm:num_requests_waiting`; negative = the requests in flight.
    waiting: AtomicI64,
    latency: Mutex<Duration>,
    in_flight: AtomicU64,
    health_probes: AtomicU64,
    scrapes: AtomicU64,
    served: AtomicU64,
}

impl MockState {
    fn new(options: &MockOptions) -> MockState {
        MockState {
            ready_at: Mutex::new(Instant::now() + options.loading),
            hang_health: AtomicBool::new(options.hang_health),
            health_status: AtomicU16::new(0),
            health_body: Mutex::new(None),
            metrics_status: AtomicU16::new(0),
            waiting: AtomicI64::new(options.waiting.map_or(-1, |w| w as i64)),
            latency: Mutex::new(options.latency),
            in_flight: AtomicU64::new(0),
            health_probes: AtomicU64::new(0),
            scrapes: AtomicU64::new(0),
            served: AtomicU64::new(0),
        }
    }

    /// Makes `/health` answer 503 "Loading model" for `loading` from now.
    pub fn set_loading(&self, loading: Duration) {
        *self.ready_at.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now() + loading;
    }

    /// Makes `/health` hang (or answer again).
    pub fn set_hang_health(&self, hang: bool) {
        self.hang_health.store(hang, Ordering::SeqCst);
    }

    /// Makes `/health` answer with `status` (None: the loading/ready status).
    pub fn set_health_status(&self, status: Option<u16>) {
        self.health_status
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// Makes `/health` answer with `body` (None: the default body).
    pub fn set_health_body(&self, body: Option<&str>) {
        *self
            .health_body
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = body.map(str::to_owned);
    }

    /// Makes `/metrics` answer with `status` and no gauge (None: 200 with the gauge).
    pub fn set_metrics_status(&self, status: Option<u16>) {
        self.metrics_status
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// Fixes `vllm:num_requests_waiting` (None: the requests in flight).
    pub fn set_waiting(&self, waiting: Option<u64>) {
        self.waiting
            .store(waiting.map_or(-1, |w| w as i64), Ordering::SeqCst);
    }

    /// Requests to `/health` received.
    pub fn health_probes(&self) -> u64 {
        self.health_probes.load(Ordering::SeqCst)
    }

    /// Requests to `/metrics` received.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::SeqCst)
    }

    /// Requests to other paths answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    fn waiting(&self) -> u64 {
        u64::try_from(self.waiting.load(Ordering::SeqCst))
            .unwrap_or_else(|_| self.in_flight.load(Ordering::SeqCst))
    }

    fn latency(&self) -> Duration {
        *self.latency.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One running mock server.
#[derive(Debug)]
pub struct Mock {
    addr: SocketAddr,
    state: Arc<MockState>,
    stop: CancellationToken,
    accept: Option<JoinHandle<()>>,
    connections: TaskTracker,
}

impl Mock {
    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start(addr: SocketAddr, options: MockOptions) -> io::Result<Mock> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState::new(&options));
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&state),
            stop.clone(),
            connections.clone(),
        ));
        Ok(Mock {
            addr,
            state,
            stop,
            accept: Some(accept),
            connections,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its behaviour and counters.
    pub fn state(&self) -> &Arc<MockState> {
        &self.state
    }

    /// Dies: closes the listening socket (connects are refused from now on) and every open
    /// connection, and returns once they are all closed.
    pub async fn kill(&mut self) {
        self.stop.cancel();
        if let Some(accept) = self.accept.take() {
            if let Err(e) = accept.await {
                eprintln!("mock {}: accept loop ended abnormally: {e}", self.addr);
            }
        }
        self.connections.close();
        self.connections.wait().await;
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<MockState>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let me = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("mock: no local address: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("mock {me}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let stop = stop.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&state), me));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // Dropping the connection closes its socket.
                () = stop.cancelled() => {}
                served = connection => {
                    if let Err(e) = served {
                        if !e.is_incomplete_message() {
                            eprintln!("mock {me}: connection failed: {e}");
                        }
                    }
                }
            }
        });
    }
}

type Answer = Result<Response<Full<Bytes>>, Infallible>;

async fn answer(request: Request<Incoming>, state: Arc<MockState>, me: SocketAddr) -> Answer {
    match request.uri().path() {
        "/health" => health(&state).await,
        "/metrics" => Ok(metrics(&state)),
        _ => {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(state.latency()).await;
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            state.served.fetch_add(1, Ordering::SeqCst);
            Ok(reply(StatusCode::OK, format!("served by {me}\n")))
        }
    }
}

async fn health(state: &MockState) -> Answer {
    state.health_probes.fetch_add(1, Ordering::SeqCst);
    if state.hang_health.load(Ordering::SeqCst) {
        tokio::time::sleep(HANG_FOR).await;
    }
    let loading = Instant::now()
        < *state
            .ready_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
    let status = match state.health_status.load(Ordering::SeqCst) {
        0 if loading => StatusCode::SERVICE_UNAVAILABLE,
        0 => StatusCode::OK,
        code => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let custom = state
        .health_body
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let body = custom.unwrap_or_else(|| {
        if status.is_success() {
            "{\"status\":\"ok\"}".to_owned()
        } else {
            format!(
                "{{\"error\":{{\"code\":{},\"message\":\"Loading model\",\"type\":\"unavailable_error\"}}}}",
                status.as_u16()
            )
        }
    });
    Ok(reply(status, body))
}

fn metrics(state: &MockState) -> Response<Full<Bytes>> {
    state.scrapes.fetch_add(1, Ordering::SeqCst);
    match state.metrics_status.load(Ordering::SeqCst) {
        0 => {}
        code => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return reply(status, "metrics unavailable\n".to_owned());
        }
    }
    let body = format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"mock\"}} {}.0\n",
        state.waiting()
    );
    reply(StatusCode::OK, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// A mock inference server (HTTP/1.1): /health, /metrics, and "served by" on any other path.
#[derive(Debug, Parser)]
struct Cli {
    /// Address to serve on; repeat for several servers in one process.
    #[arg(long, value_name = "IP:PORT", required = true)]
    listen: Vec<SocketAddr>,
    /// /health answers 503 "Loading model" for this long after the start, e.g. "3s".
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    loading: Duration,
    /// Exit after this long, e.g. "20s".
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    die_after: Option<Duration>,
    /// /health never answers (a wedged server).
    #[arg(long)]
    hang_health: bool,
    /// Time each request to another path takes, e.g. "200ms".
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Report this many waiting requests instead of the requests in flight.
    #[arg(long, value_name = "N")]
    waiting: Option<u64>,
}

#[allow(dead_code)] // The demo and the tests include this file for `Mock`, not for `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let options = MockOptions {
        loading: cli.loading,
        hang_health: cli.hang_health,
        latency: cli.latency,
        waiting: cli.waiting,
    };
    let mut mocks = Vec::with_capacity(cli.listen.len());
    for addr in &cli.listen {
        let mock = Mock::start(*addr, options.clone())
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!(
            "mock inference server on {} (loading for {})",
            mock.addr(),
            humantime::format_duration(cli.loading)
        );
        mocks.push(mock);
    }
    match cli.die_after {
        Some(after) => {
            tokio::select! {
                () = tokio::time::sleep(after) => println!("dying after {}, as asked", humantime::format_duration(after)),
                signal = tokio::signal::ctrl_c() => signal?,
            }
        }
        None => tokio::signal::ctrl_c().await?,
    }
    for mut mock in mocks {
        mock.kill().await;
    }
    Ok(())
}
