//! One probe: a TCP connect, or an HTTP/1.1 GET judged by status and body; and the HTTP GET the
//! load scraper shares.
//!
//! HTTP is hyper's client over one fresh TCP connection per probe, with `Connection: close`: a
//! probe must see what a new client would see, and a pooled connection would hide a server that
//! no longer accepts. The connection is driven inside the probe's own future, never in a spawned
//! task, so cancelling a probe (a removed backend, a reload) closes its socket at once and leaves
//! nothing behind.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::header::{ACCEPT, CONNECTION, HOST, HeaderValue, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::{HttpProbe, Probe};

/// Largest health-check body read; a health endpoint answers in bytes, and `expect_body` only
/// needs to find a short substring.
pub(crate) const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// The `User-Agent` of every probe and scrape, so a server's access log tells them apart from
/// client traffic.
const USER_AGENT_VALUE: &str = concat!("weighbridge/", env!("CARGO_PKG_VERSION"), " health-check");

/// Why a probe failed. Small and `Copy`, so the last one can be kept in live state and read by
/// anyone; its `Display` is the reason in the transition log line ("http 503", "timeout after
/// 2s").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeError {
    /// The connect failed (refused, unreachable, reset...).
    Connect(io::ErrorKind),
    /// No complete answer within the probe timeout.
    Timeout(Duration),
    /// The server broke HTTP/1.1 (or closed the connection mid-answer).
    Protocol,
    /// An HTTP status the probe does not accept.
    Status(u16),
    /// The body lacks the expected substring.
    BodyMismatch,
    /// The body is longer than the caller reads (a metrics page; a health check reads the
    /// beginning of any body).
    BodyTooLarge(usize),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(io::ErrorKind::ConnectionRefused) => {
                f.write_str("connection refused")
            }
            ProbeError::Connect(kind) => write!(f, "connect failed: {kind}"),
            ProbeError::Timeout(after) => {
                write!(f, "timeout after {}", humantime::format_duration(*after))
            }
            ProbeError::Protocol => f.write_str("invalid or incomplete http answer"),
            ProbeError::Status(status) => write!(f, "http {status}"),
            ProbeError::BodyMismatch => f.write_str("body lacks the expected text"),
            ProbeError::BodyTooLarge(limit) => write!(f, "body larger than {limit} bytes"),
        }
    }
}

impl std::error::Error for ProbeError {}

/// Runs one probe of `probe` against `addr`, bounded by `timeout` as a whole.
pub(crate) async fn run(
    probe: &Probe,
    addr: SocketAddr,
    preamble: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let outcome = tokio::time::timeout(timeout, async {
        match probe {
            Probe::Tcp => connect(addr, preamble).await.map(drop),
            Probe::Http(http) => check_http(http, addr, preamble).await,
        }
    })
    .await;
    outcome.unwrap_or(Err(ProbeError::Timeout(timeout)))
}

async fn check_http(
    probe: &HttpProbe,
    addr: SocketAddr,
    preamble: Option<&[u8]>,
) -> Result<(), ProbeError> {
    // A body longer than the limit is not a failure: only its beginning is searched (HAProxy
    // and Envoy look at the first buffer too), so `/v1/models` of a server with many models,
    // or a metrics page, still works as a health path.
    let answer = get(
        addr,
        preamble,
        probe.host.as_deref(),
        &probe.path,
        HEALTH_BODY_LIMIT,
    )
    .await?;
    if !probe.expect_status.matches(answer.status.as_u16()) {
        return Err(ProbeError::Status(answer.status.as_u16()));
    }
    match &probe.expect_body {
        Some(expected) if !contains(&answer.body, expected.as_bytes()) => {
            Err(ProbeError::BodyMismatch)
        }
        _ => Ok(()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Connects to `addr` and writes `preamble` (a PROXY header) first, if any.
async fn connect(addr: SocketAddr, preamble: Option<&[u8]>) -> Result<TcpStream, ProbeError> {
    let failed = |e: std::io::Error| {
        debug!(%addr, error = %e, "probe connect failed");
        ProbeError::Connect(e.kind())
    };
    let mut stream = TcpStream::connect(addr).await.map_err(failed)?;
    if let Some(preamble) = preamble {
        tokio::io::AsyncWriteExt::write_all(&mut stream, preamble)
            .await
            .map_err(failed)?;
    }
    Ok(stream)
}

/// What a GET brought back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    /// The body's first `limit` bytes.
    pub(crate) body: Bytes,
    /// The body went on past `limit`; the rest was not read.
    pub(crate) truncated: bool,
}

/// GETs `path` from `addr` over a new connection (after `preamble`, if any) and returns the status and up to `limit` bytes
/// of body. Not bounded in time: callers wrap it in their timeout.
pub(crate) async fn get(
    addr: SocketAddr,
    preamble: Option<&[u8]>,
    host: Option<&str>,
    path: &str,
    limit: usize,
) -> Result<Answer, ProbeError> {
    let stream = connect(addr, preamble).await?;
    let protocol = |e: hyper::Error| {
        debug!(%addr, error = %e, "probe: http error");
        ProbeError::Protocol
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
    let host = match host {
        Some(host) => HeaderValue::from_str(host),
        None => HeaderValue::from_str(&addr.to_string()),
    }
    .map_err(|_| ProbeError::Protocol)?;
    let request = hyper::Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(ACCEPT, "text/plain, */*")
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| {
            debug!(%addr, path, error = %e, "probe: cannot build the request");
            ProbeError::Protocol
        })?;
    let exchange = async {
        let response = sender.send_request(request).await.map_err(protocol)?;
        let status = response.status();
        let mut body = response.into_body();
        let mut read = BytesMut::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(protocol)?.into_data() else {
                continue; // trailers
            };
            let room = limit - read.len();
            if data.len() > room {
                read.extend_from_slice(&data[..room]);
                truncated = true;
                break;
            }
            read.extend_from_slice(&data);
        }
        Ok(Answer {
            status,
            body: read.freeze(),
            truncated,
        })
    };
    tokio::pin!(connection, exchange);
    // The connection future moves the bytes; it is polled here, beside the exchange, so that
    // dropping this future (timeout, cancellation) drops the socket with it.
    tokio::select! {
        biased;
        result = &mut exchange => result,
        ended = &mut connection => match ended {
            // The server answered and closed: what it sent is already in the body.
            Ok(()) => exchange.await,
            Err(e) => Err(protocol(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_like_the_log_line() {
        assert_eq!(ProbeError::Status(503).to_string(), "http 503");
        assert_eq!(
            ProbeError::Timeout(Duration::from_secs(2)).to_string(),
            "timeout after 2s"
        );
        assert_eq!(
            ProbeError::Connect(io::ErrorKind::ConnectionRefused).to_string(),
            "connection refused"
        );
    }

    #[test]
    fn body_match_is_a_substring_search() {
        assert!(contains(b"{\"status\":\"ok\"}", b"ok"));
        assert!(!contains(b"Loading model", b"ok"));
        assert!(contains(b"", b""));
    }

    #[tokio::test]
    async fn refused_and_timed_out_probes_say_so() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("literal"))
            .expect("bind");
        let refusing = socket.local_addr().expect("address");
        assert_eq!(
            run(&Probe::Tcp, refusing, None, Duration::from_secs(5)).await,
            Err(ProbeError::Connect(io::ErrorKind::ConnectionRefused))
        );
        // A listener that never answers HTTP: the probe times out.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("address");
        let http = Probe::Http(HttpProbe {
            path: "/health".into(),
            host: None,
            expect_status: crate::config::ExpectStatus::Success,
            expect_body: None,
        });
        let timeout = Duration::from_millis(50);
        assert_eq!(
            run(&http, addr, None, timeout).await,
            Err(ProbeError::Timeout(timeout))
        );
        assert_eq!(run(&Probe::Tcp, addr, None, timeout).await, Ok(()));
    }

    /// Serves each connection one HTTP answer with `status` and a body of `len` bytes that
    /// starts with `ready`, then closes.
    async fn large_body_server(status: u16, len: usize) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0_u8; 1024];
                    drop(stream.read(&mut request).await);
                    let mut body = b"ready".to_vec();
                    body.resize(len, b'.');
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
                    );
                    drop(stream.write_all(head.as_bytes()).await);
                    drop(stream.write_all(&body).await);
                });
            }
        });
        addr
    }

    /// A health path whose answer is longer than the probe reads (`/v1/models` of a server with
    /// many models) passes on its status and its beginning; a 503 is reported as one.
    #[tokio::test]
    async fn a_long_body_is_judged_by_its_beginning() {
        let probe = |expect_body: Option<&str>| {
            Probe::Http(HttpProbe {
                path: "/v1/models".into(),
                host: None,
                expect_status: crate::config::ExpectStatus::Success,
                expect_body: expect_body.map(str::to_owned),
            })
        };
        let timeout = Duration::from_secs(5);
        let long = large_body_server(200, 4 * HEALTH_BODY_LIMIT).await;
        assert_eq!(run(&probe(None), long, None, timeout).await, Ok(()));
        assert_eq!(
            run(&probe(Some("ready")), long, None, timeout).await,
            Ok(())
        );
        assert_eq!(
            run(&probe(Some("absent")), long, None, timeout).await,
            Err(ProbeError::BodyMismatch)
        );
        let failing = large_body_server(503, 4 * HEALTH_BODY_LIMIT).await;
        assert_eq!(
            run(&probe(None), failing, None, timeout).await,
            Err(ProbeError::Status(503))
        );
        let answer = get(long, None, None, "/", 100).await.expect("an answer");
        assert!(answer.truncated);
        assert_eq!(answer.body.len(), 100);
        let short = large_body_server(200, 100).await;
        let answer = get(short, None, None, "/", 100).await.expect("an answer");
        assert!(!answer.truncated);
        assert_eq!(answer.body.len(), 100);
    }
}
