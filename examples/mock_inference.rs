//! A mock inference server, to try weighbridge's health checks by hand and to stand in for a GPU
//! server in benchmarks; the demo and the tests use the same code (they include this file as a
//! module).
//!
//! ```text
//! cargo run --example mock_inference -- --listen 127.0.0.1:9001 --listen 127.0.0.1:9002 --loading 3s
//! cargo run --example mock_inference -- --listen 127.0.0.1:9001 --slots 4 --service lognormal:400ms
//! ```
//!
//! Each `--listen` address is one server. What each one answers:
//!
//! | path       | answer |
//! |------------|--------|
//! | `/health`  | 503 `{"error":{"code":503,"message":"Loading model"}}` for `--loading`, then 200 `{"status":"ok"}` (llama.cpp's wording); never answers with `--hang-health` |
//! | `/metrics` | Prometheus text with the gauges `vllm:num_requests_running` (requests holding a slot, `--hidden` ones included) and `vllm:num_requests_waiting`: with `--slots`, the requests waiting for a slot; without, the requests it is busy answering now (as before slots existed); `--waiting N` fixes it at N |
//! | any other  | 200, streamed (HTTP/1.1 chunked) as a generation: once the request holds a slot, the first token, `served by <its address>`, comes after the prefill (`--prefill`, a fraction of the service time), then the other tokens, `token <i>`, evenly spread over the rest of the service time, the last one at its end. So `curl` through the balancer shows who served, and a client can time the first byte (TTFT) and the whole answer |
//!
//! A request's service time is, first found: the query parameter `service_ms` (e.g.
//! `/generate?service_ms=350&tokens=20`, so a benchmark can give every system the same
//! sequence), `--service` (`fixed:200ms`, `lognormal:400ms` with σ = 0.6, or
//! `lognormal:400ms:0.8`; 400 ms is the mean), `--latency` (a fixed time). The number of tokens
//! is the query parameter `tokens`, else `--tokens` (16).
//!
//! `--slots N` serves N requests at once, like the batch slots of a GPU server; the others wait
//! inside the server for a slot, first come first served. Without it every request is served at
//! once. `--hidden N` holds N of the slots as a client the balancer never sees would (they count
//! as running and serve no one); a slot freed while fewer are held goes to the hidden client
//! first.
//!
//! `--die-after 20s` makes the process exit after 20 s, to watch a balancer notice a dead
//! server; start it again to watch it come back (and ramp, with `slow_start`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a hung `/health` request is held before the server gives up on it itself.
const HANG_FOR: Duration = Duration::from_secs(60);
/// Tokens in an answer when neither the request nor the options say.
const DEFAULT_TOKENS: u32 = 16;
/// Share of the service time before the first token when the options do not say.
const DEFAULT_PREFILL: f64 = 0.1;
/// σ of `lognormal:MEAN` without a σ: a spread like that of real generation lengths.
const DEFAULT_SIGMA: f64 = 0.6;
/// Upper bound on a service time, given or drawn, so no request holds a slot for ever.
const MAX_SERVICE: Duration = Duration::from_secs(3600);
/// Upper bound on the tokens of one answer.
const MAX_TOKENS: u32 = 100_000;

/// How long a request takes to serve, once it holds a slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Service {
    /// Always this long.
    Fixed(Duration),
    /// Drawn from a log-normal distribution with this mean and this σ (of the underlying normal).
    LogNormal {
        /// Mean service time.
        mean: Duration,
        /// Spread: σ of ln(service time).
        sigma: f64,
    },
}

impl Service {
    /// One service time.
    pub fn sample(&self) -> Duration {
        match *self {
            Service::Fixed(d) => d.min(MAX_SERVICE),
            Service::LogNormal { mean, sigma } => {
                if mean.is_zero() {
                    return Duration::ZERO;
                }
                // E[exp(N(μ, σ²))] = exp(μ + σ²/2): μ is chosen so the mean is `mean`.
                let mu = mean.as_secs_f64().ln() - sigma * sigma / 2.0;
                let secs = (mu + sigma * standard_normal()).exp();
                Duration::try_from_secs_f64(secs)
                    .unwrap_or(MAX_SERVICE)
                    .min(MAX_SERVICE)
            }
        }
    }
}

/// One draw of N(0, 1), by Box-Muller from two uniform draws.
fn standard_normal() -> f64 {
    // rand's f64 is in [0, 1); 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rand::random::<f64>();
    let u2 = rand::random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl FromStr for Service {
    type Err = String;

    /// `fixed:DURATION`, `lognormal:MEAN` or `lognormal:MEAN:SIGMA`, e.g. `lognormal:400ms:0.8`.
    fn from_str(s: &str) -> Result<Service, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default();
        let duration = |text: Option<&str>| -> Result<Duration, String> {
            let text =
                text.ok_or_else(|| format!("{s:?}: a duration is missing after {kind:?}"))?;
            let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
            if d > MAX_SERVICE {
                return Err(format!(
                    "{text:?}: at most {}",
                    humantime::format_duration(MAX_SERVICE)
                ));
            }
            Ok(d)
        };
        let service = match kind {
            "fixed" => Service::Fixed(duration(parts.next())?),
            "lognormal" => {
                let mean = duration(parts.next())?;
                let sigma = match parts.next() {
                    None => DEFAULT_SIGMA,
                    Some(text) => text
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite() && (0.0..=5.0).contains(x))
                        .ok_or_else(|| format!("{text:?}: σ must be a number from 0 to 5"))?,
                };
                Service::LogNormal { mean, sigma }
            }
            _ => {
                return Err(format!(
                    "{s:?}: expected fixed:DURATION, lognormal:MEAN or lognormal:MEAN:SIGMA"
                ));
            }
        };
        match parts.next() {
            None => Ok(service),
            Some(_) => Err(format!("{s:?}: too many ':'-separated parts")),
        }
    }
}

/// How a mock server behaves; most fields can also be changed while it runs through
/// [`MockState`].
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// `/health` answers 503 "Loading model" for this long after the start.
    pub loading: Duration,
    /// `/health` never answers.
    pub hang_health: bool,
    /// Time each request to another path takes, when neither the request (`service_ms`) nor
    /// `service` says.
    pub latency: Duration,
    /// A fixed value for `vllm:num_requests_waiting` instead of the measured one.
    pub waiting: Option<u64>,
    /// Requests served at once; the others wait for a slot, in arrival order. None: no limit.
    pub slots: Option<u32>,
    /// Slots held by a client nobody sees (they count as running).
    pub hidden: u32,
    /// Service time of a request that gives none; None: `latency`.
    pub service: Option<Service>,
    /// Tokens of an answer whose request gives none; None: 16.
    pub tokens: Option<u32>,
    /// Share of the service time before the first token, 0 to 1; None: 0.1.
    pub prefill: Option<f64>,
}

/// What the hidden client holds.
#[derive(Debug, Default)]
struct Hidden {
    /// Slots it should hold.
    target: u32,
    /// Slots it holds.
    held: u32,
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
    /// Fixed `vllm:num_requests_waiting`; negative = the measured value.
    waiting: AtomicI64,
    latency: Mutex<Duration>,
    service: Option<Service>,
    tokens: u32,
    prefill: f64,
    /// The slots, when limited; a permit is a slot.
    slots: Option<Arc<Semaphore>>,
    hidden: Mutex<Hidden>,
    /// Requests received and not yet answered in full (queued ones included).
    in_flight: AtomicU64,
    /// Requests waiting for a slot.
    queued: AtomicU64,
    /// Requests holding a slot (the hidden client's slots not included).
    running: AtomicU64,
    /// Highest `running()` so far.
    max_running: AtomicU64,
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
            service: options.service,
            tokens: options
                .tokens
                .unwrap_or(DEFAULT_TOKENS)
                .clamp(1, MAX_TOKENS),
            prefill: options
                .prefill
                .filter(|p| p.is_finite())
                .unwrap_or(DEFAULT_PREFILL)
                .clamp(0.0, 1.0),
            slots: options.slots.map(|n| Arc::new(Semaphore::new(n as usize))),
            hidden: Mutex::new(Hidden::default()),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            max_running: AtomicU64::new(0),
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

    /// Fixes `vllm:num_requests_waiting` (None: the measured value).
    pub fn set_waiting(&self, waiting: Option<u64>) {
        self.waiting
            .store(waiting.map_or(-1, |w| w as i64), Ordering::SeqCst);
    }

    /// Makes the hidden client hold `n` slots. Fewer: the slots it gives up go to waiting
    /// requests at once. More: it takes free slots now, and then each slot a request frees
    /// until it holds `n`. Without slot limits the hidden client only counts as running.
    pub fn set_hidden(&self, n: u32) {
        let mut hidden = self.hidden.lock().unwrap_or_else(PoisonError::into_inner);
        hidden.target = n;
        match &self.slots {
            None => hidden.held = n,
            Some(slots) => {
                if hidden.held > n {
                    slots.add_permits((hidden.held - n) as usize);
                    hidden.held = n;
                }
                while hidden.held < n {
                    match Arc::clone(slots).try_acquire_owned() {
                        Ok(permit) => {
                            permit.forget();
                            hidden.held += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        drop(hidden);
        self.note_running();
    }

    /// Requests to `/health` received.
    pub fn health_probes(&self) -> u64 {
        self.health_probes.load(Ordering::SeqCst)
    }

    /// Requests to `/metrics` received.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::SeqCst)
    }

    /// Requests to other paths answered in full.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Slots held now: by requests being served and by the hidden client
    /// (`vllm:num_requests_running`).
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::SeqCst) + u64::from(self.hidden_held())
    }

    /// Requests waiting for a slot now (0 without slot limits).
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// The highest [`running`](Self::running) so far.
    pub fn max_running_seen(&self) -> u64 {
        self.max_running.load(Ordering::SeqCst)
    }

    /// Slots the hidden client holds now.
    pub fn hidden_held(&self) -> u32 {
        self.hidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
    }

    fn note_running(&self) {
        self.max_running.fetch_max(self.running(), Ordering::SeqCst);
    }

    /// `vllm:num_requests_waiting`: the fixed value; else, with slots, the requests waiting for
    /// one; without, every request being answered (what it always reported).
    fn waiting(&self) -> u64 {
        u64::try_from(self.waiting.load(Ordering::SeqCst)).unwrap_or_else(|_| {
            if self.slots.is_some() {
                self.queued()
            } else {
                self.in_flight.load(Ordering::SeqCst)
            }
        })
    }

    fn service_time(&self) -> Duration {
        match &self.service {
            Some(service) => service.sample(),
            None => *self.latency.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Gives a slot back, or to the hidden client when it holds fewer than it should.
    fn release(&self, permit: OwnedSemaphorePermit) {
        let mut hidden = self.hidden.lock().unwrap_or_else(PoisonError::into_inner);
        if hidden.held < hidden.target {
            permit.forget();
            hidden.held += 1;
        } else {
            drop(permit);
        }
    }
}

/// One request from its arrival until its answer ends (or its client goes): keeps the counters.
struct InFlight {
    state: Arc<MockState>,
    /// Holds a slot (also without slot limits, where it holds no permit).
    running: bool,
    permit: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    fn new(state: &Arc<MockState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            state: Arc::clone(state),
            running: false,
            permit: None,
        }
    }

    /// Waits for a slot, in arrival order.
    async fn take_slot(&mut self) {
        if let Some(slots) = &self.state.slots {
            let _queued = Queued::new(&self.state);
            // The semaphore is never closed, so this only fails if it were; serve anyway then.
            self.permit = Arc::clone(slots).acquire_owned().await.ok();
        }
        self.running = true;
        self.state.running.fetch_add(1, Ordering::SeqCst);
        self.state.note_running();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.running {
            self.state.running.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(permit) = self.permit.take() {
            self.state.release(permit);
        }
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request waiting for a slot, counted while it waits (its client may go meanwhile).
struct Queued(Arc<MockState>);

impl Queued {
    fn new(state: &Arc<MockState>) -> Queued {
        state.queued.fetch_add(1, Ordering::SeqCst);
        Queued(Arc::clone(state))
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The streamed answer of a request holding a slot: token `i` is due at
/// `first + rest * i / (tokens - 1)`, and the answer ends at `first + rest`, when the slot is
/// given back.
struct Tokens {
    me: SocketAddr,
    /// Tokens sent so far.
    sent: u32,
    tokens: u32,
    /// When the first token is due (the end of the prefill).
    first: Instant,
    /// Time from the first token to the end.
    rest: Duration,
    sleep: Pin<Box<Sleep>>,
    /// None once the answer has ended.
    request: Option<InFlight>,
}

impl Tokens {
    /// When the next token is due, or the end once all are sent.
    fn due(&self) -> Instant {
        match self.sent {
            0 => self.first,
            sent if sent >= self.tokens => self.first + self.rest,
            // Here 1 <= sent < tokens, so tokens >= 2.
            sent => {
                let share = f64::from(sent) / f64::from(self.tokens - 1);
                self.first + self.rest.mul_f64(share)
            }
        }
    }
}

impl Body for Tokens {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.request.is_none() {
            return Poll::Ready(None);
        }
        let due = this.due();
        if Instant::now() < due {
            this.sleep.as_mut().reset(due);
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        if this.sent < this.tokens {
            let chunk = match this.sent {
                0 => format!("served by {}\n", this.me),
                i => format!("token {i}\n"),
            };
            this.sent += 1;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))));
        }
        if let Some(request) = this.request.take() {
            request.state.served.fetch_add(1, Ordering::SeqCst);
            // Dropping it gives the slot back.
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.request.is_none()
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
        state.set_hidden(options.hidden);
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

type Answer = Result<Response<Either<Full<Bytes>, Tokens>>, Infallible>;

async fn answer(request: Request<Incoming>, state: Arc<MockState>, me: SocketAddr) -> Answer {
    let response = match request.uri().path() {
        "/health" => health(&state).await,
        "/metrics" => metrics(&state),
        _ => return Ok(generate(request.uri().query(), state, me).await),
    };
    Ok(response.map(Either::Left))
}

/// What a request asks for in its query string.
#[derive(Debug, Default, PartialEq)]
struct Asked {
    service: Option<Duration>,
    tokens: Option<u32>,
}

impl Asked {
    /// `service_ms` (milliseconds, fractions allowed) and `tokens`; other parameters are
    /// ignored.
    fn parse(query: Option<&str>) -> Result<Asked, String> {
        let mut asked = Asked::default();
        for pair in query.unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "service_ms" => {
                    let ms = value
                        .parse::<f64>()
                        .ok()
                        .filter(|ms| ms.is_finite() && *ms >= 0.0)
                        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
                        .filter(|d| *d <= MAX_SERVICE)
                        .ok_or_else(|| {
                            format!(
                                "service_ms={value:?}: milliseconds, 0 to {}",
                                MAX_SERVICE.as_millis()
                            )
                        })?;
                    asked.service = Some(ms);
                }
                "tokens" => {
                    let tokens = value
                        .parse::<u32>()
                        .ok()
                        .filter(|t| (1..=MAX_TOKENS).contains(t))
                        .ok_or_else(|| format!("tokens={value:?}: 1 to {MAX_TOKENS}"))?;
                    asked.tokens = Some(tokens);
                }
                _ => {}
            }
        }
        Ok(asked)
    }
}

/// A generation: waits for a slot, then streams its tokens.
async fn generate(
    query: Option<&str>,
    state: Arc<MockState>,
    me: SocketAddr,
) -> Response<Either<Full<Bytes>, Tokens>> {
    let asked = match Asked::parse(query) {
        Ok(asked) => asked,
        Err(message) => {
            return reply(StatusCode::BAD_REQUEST, format!("{message}\n")).map(Either::Left);
        }
    };
    let service = asked.service.unwrap_or_else(|| state.service_time());
    let tokens = asked.tokens.unwrap_or(state.tokens);
    let prefill = service.mul_f64(state.prefill);
    let mut request = InFlight::new(&state);
    request.take_slot().await;
    tokio::time::sleep(prefill).await;
    let first = Instant::now();
    let body = Tokens {
        me,
        sent: 0,
        tokens,
        first,
        rest: service.saturating_sub(prefill),
        sleep: Box::pin(tokio::time::sleep_until(first)),
        request: Some(request),
    };
    let mut response = Response::new(Either::Right(body));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

async fn health(state: &MockState) -> Response<Full<Bytes>> {
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
    reply(status, body)
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
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"mock\"}} {}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"mock\"}} {}.0\n",
        state.running(),
        state.waiting()
    );
    reply(StatusCode::OK, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// A mock inference server (HTTP/1.1): /health, /metrics, and a streamed "generation" on any
/// other path.
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
    /// Time each request to another path takes, e.g. "200ms", unless the request or --service
    /// says.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Report this many waiting requests instead of the measured number.
    #[arg(long, value_name = "N")]
    waiting: Option<u64>,
    /// Requests served at once; the others wait for a slot, first come first served
    /// (default: no limit).
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
    /// Slots held by a client the balancer never sees.
    #[arg(long, value_name = "N", default_value_t = 0)]
    hidden: u32,
    /// Service time of a request without `service_ms`: fixed:DURATION, lognormal:MEAN or
    /// lognormal:MEAN:SIGMA (σ defaults to 0.6), e.g. "lognormal:400ms".
    #[arg(long, value_name = "DIST")]
    service: Option<Service>,
    /// Tokens streamed per answer, unless the request says (`tokens=N`).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TOKENS, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_TOKENS)))]
    tokens: u32,
    /// Share of the service time before the first token, 0 to 1.
    #[arg(long, value_name = "FRACTION", default_value_t = DEFAULT_PREFILL, value_parser = parse_fraction)]
    prefill: f64,
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|x| (0.0..=1.0).contains(x))
        .ok_or_else(|| format!("{text:?}: a number from 0 to 1"))
}

#[allow(dead_code)] // The demo and the tests include this file for `Mock`, not for `main`.
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    if let (Some(slots), true) = (cli.slots, cli.hidden > 0) {
        if cli.hidden > slots {
            return Err(format!("--hidden {} is more than --slots {slots}", cli.hidden).into());
        }
    }
    let options = MockOptions {
        loading: cli.loading,
        hang_health: cli.hang_health,
        latency: cli.latency,
        waiting: cli.waiting,
        slots: cli.slots,
        hidden: cli.hidden,
        service: cli.service,
        tokens: Some(cli.tokens),
        prefill: Some(cli.prefill),
    };
    let mut mocks = Vec::with_capacity(cli.listen.len());
    for addr in &cli.listen {
        let mock = Mock::start(*addr, options.clone())
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let slots = cli
            .slots
            .map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        println!(
            "mock inference server on {} (loading for {}, slots {slots}, hidden {})",
            mock.addr(),
            humantime::format_duration(cli.loading),
            cli.hidden
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// GETs `path` on one connection; the answer's text, with when its first byte came and
    /// when it ended, counted from the request.
    async fn get(addr: SocketAddr, path: &str) -> (String, Duration, Duration) {
        let start = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        let mut first = None;
        let mut buf = [0; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("receive");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| start.elapsed());
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        (text, first.unwrap_or_default(), start.elapsed())
    }

    async fn start(options: MockOptions) -> Mock {
        Mock::start(SocketAddr::from(([127, 0, 0, 1], 0)), options)
            .await
            .expect("start a mock on loopback")
    }

    /// Polls `done` every millisecond for up to 2 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !done() {
            assert!(Instant::now() < deadline, "not within 2 s: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn service_times_parse() {
        assert_eq!(
            "fixed:200ms".parse::<Service>(),
            Ok(Service::Fixed(Duration::from_millis(200)))
        );
        assert_eq!(
            "lognormal:400ms".parse::<Service>(),
            Ok(Service::LogNormal {
                mean: Duration::from_millis(400),
                sigma: DEFAULT_SIGMA
            })
        );
        assert_eq!(
            "lognormal:1s:0.8".parse::<Service>(),
            Ok(Service::LogNormal {
                mean: Duration::from_secs(1),
                sigma: 0.8
            })
        );
        for bad in [
            "",
            "fixed",
            "fixed:",
            "fixed:soon",
            "lognormal:400ms:-1",
            "lognormal:400ms:NaN",
            "lognormal:400ms:0.5:1",
            "uniform:1s",
            "fixed:2h",
        ] {
            assert!(bad.parse::<Service>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn log_normal_draws_have_the_mean_asked_for() {
        let service = Service::LogNormal {
            mean: Duration::from_millis(400),
            sigma: 0.6,
        };
        let n = 40_000;
        let draws: Vec<f64> = (0..n).map(|_| service.sample().as_secs_f64()).collect();
        let mean = draws.iter().sum::<f64>() / f64::from(n);
        // σ of the mean: 0.4 s · sqrt(e^0.36 - 1) / sqrt(n) ≈ 1.3 ms; 10 ms is far outside.
        assert!((mean - 0.4).abs() < 0.01, "mean {mean}");
        let mut sorted = draws;
        sorted.sort_by(f64::total_cmp);
        // Median exp(μ) = 0.4 s · e^(-0.18) ≈ 0.334 s.
        let median = sorted[sorted.len() / 2];
        assert!((median - 0.334).abs() < 0.01, "median {median}");
    }

    #[test]
    fn queries_parse() {
        assert_eq!(Asked::parse(None), Ok(Asked::default()));
        assert_eq!(
            Asked::parse(Some("service_ms=350.5&tokens=20&model=x")),
            Ok(Asked {
                service: Some(Duration::from_micros(350_500)),
                tokens: Some(20)
            })
        );
        for bad in [
            "service_ms=",
            "service_ms=-1",
            "service_ms=inf",
            "service_ms=1e12",
            "tokens=0",
            "tokens=x",
            "tokens=100001",
        ] {
            assert!(Asked::parse(Some(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn tokens_stream_after_the_prefill_and_end_with_the_service_time() {
        let mock = start(MockOptions::default()).await;
        let (text, first, total) = get(mock.addr(), "/g?service_ms=400&tokens=5").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("chunked"), "{text}");
        assert!(
            text.contains(&format!("served by {}\n", mock.addr())),
            "{text}"
        );
        assert!(
            text.contains("token 4\n") && !text.contains("token 5"),
            "{text}"
        );
        // Prefill 10 %: 40 ms to the first token, 400 ms in all.
        assert!(first >= Duration::from_millis(40) && first < Duration::from_millis(300));
        assert!(total >= Duration::from_millis(400) && total < Duration::from_secs(2));
        assert_eq!(mock.state().served(), 1);
        // One token: it comes after the prefill too, and the answer still ends with the
        // service time.
        let (text, first, total) = get(mock.addr(), "/g?service_ms=400&tokens=1").await;
        assert!(
            text.contains("served by") && !text.contains("token 1"),
            "{text}"
        );
        assert!(first >= Duration::from_millis(40) && first < Duration::from_millis(300));
        assert!(total >= Duration::from_millis(400) && total < Duration::from_secs(2));
        let (text, ..) = get(mock.addr(), "/g?tokens=0").await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }

    #[tokio::test]
    async fn slots_serve_that_many_at_once_and_the_rest_wait_in_order() {
        let mock = start(MockOptions {
            slots: Some(2),
            ..MockOptions::default()
        })
        .await;
        let addr = mock.addr();
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(tokio::spawn(get(addr, "/g?service_ms=300&tokens=2")));
            let arrived = clients.len() as u64;
            until("the request arrives", || {
                mock.state().running() + mock.state().queued() == arrived
            })
            .await;
        }
        assert_eq!((mock.state().running(), mock.state().queued()), (2, 3));
        let (metrics, ..) = get(addr, "/metrics").await;
        assert!(
            metrics.contains("vllm:num_requests_running{engine=\"0\",model_name=\"mock\"} 2.0\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"mock\"} 3.0\n"),
            "{metrics}"
        );
        let mut firsts = Vec::new();
        for client in clients {
            let (text, first, _) = client.await.expect("client");
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            firsts.push(first);
        }
        // Served two by two, in arrival order: the 5th waited for two rounds of 300 ms.
        assert!(firsts[4] >= Duration::from_millis(600), "{firsts:?}");
        assert!(firsts[2] >= Duration::from_millis(300), "{firsts:?}");
        assert!(firsts[0] < Duration::from_millis(300), "{firsts:?}");
        assert_eq!(mock.state().max_running_seen(), 2);
        assert_eq!((mock.state().running(), mock.state().queued()), (0, 0));
        assert_eq!(mock.state().served(), 5);
    }

    #[tokio::test]
    async fn hidden_slots_count_as_running_and_serve_no_one() {
        let mock = start(MockOptions {
            slots: Some(3),
            hidden: 2,
            ..MockOptions::default()
        })
        .await;
        let state = Arc::clone(mock.state());
        assert_eq!((state.running(), state.hidden_held()), (2, 2));
        let addr = mock.addr();
        let first = tokio::spawn(get(addr, "/g?service_ms=300&tokens=1"));
        until("the first request runs", || state.running() == 3).await;
        let second = tokio::spawn(get(addr, "/g?service_ms=300&tokens=1"));
        until("the second request waits", || state.queued() == 1).await;
        // One more hidden slot: taken from the first request when it ends, before the second.
        state.set_hidden(3);
        assert_eq!(state.hidden_held(), 2);
        first.await.expect("first client");
        until("the hidden client takes the freed slot", || {
            state.hidden_held() == 3
        })
        .await;
        assert_eq!((state.running(), state.queued()), (3, 1));
        // Giving every slot back lets the second one in.
        state.set_hidden(0);
        let (text, ..) = second.await.expect("second client");
        assert!(text.contains("served by"), "{text}");
        assert_eq!(state.max_running_seen(), 3);
        assert_eq!(state.running(), 0);
    }

    #[tokio::test]
    async fn without_slots_waiting_is_every_request_in_flight() {
        let mock = start(MockOptions {
            latency: Duration::from_millis(300),
            hidden: 1,
            ..MockOptions::default()
        })
        .await;
        let addr = mock.addr();
        let clients: Vec<_> = (0..3).map(|_| tokio::spawn(get(addr, "/g"))).collect();
        until("three requests in flight", || mock.state().running() == 4).await;
        let (metrics, ..) = get(addr, "/metrics").await;
        assert!(
            metrics.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"mock\"} 3.0\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("vllm:num_requests_running{engine=\"0\",model_name=\"mock\"} 4.0\n"),
            "{metrics}"
        );
        mock.state().set_waiting(Some(7));
        let (metrics, ..) = get(addr, "/metrics").await;
        assert!(
            metrics.contains("vllm:num_requests_waiting{engine=\"0\",model_name=\"mock\"} 7.0\n"),
            "{metrics}"
        );
        for client in clients {
            client.await.expect("client");
        }
        assert_eq!(mock.state().served(), 3);
    }
}
