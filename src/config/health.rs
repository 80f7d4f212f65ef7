//! The typed `[listener.health]`, `[listener.health.load]` and `[listener.passive]` tables, and
//! their validation.
//!
//! Every default is a constant below with its unit and the reason for its value. The types make
//! the nonsensical combinations unrepresentable: an HTTP path on a TCP probe, a load block
//! without a metric, a saturation of zero.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigErrorKind;
use super::raw::{RawHealth, RawLoad, RawPassive};
use super::validate::{Invalid, count, duration, optional_duration};

/// Time between two probes of one backend. 2 s is HAProxy's `inter`: a dead backend is noticed
/// within seconds while a fleet of hundreds costs a few probes per second.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Upper bound on one probe, connect included. 2 s: SGLang's `/health` takes about 1 s when it
/// runs its one-token generation, and a saturated vLLM is known to miss 1 s probes
/// (llm-d-benchmark PR #1734), so 1 s would call busy servers broken.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive passes that bring an unhealthy backend back (HAProxy's and SGLang router's 2).
pub(crate) const DEFAULT_RISE: NonZeroU32 = NonZeroU32::new(2).expect("2 is not zero");
/// Consecutive failures that take a healthy backend out (HAProxy's and SGLang router's 3): one
/// lost probe is not an outage, and ejecting on a single miss makes busy backends flap.
pub(crate) const DEFAULT_FALL: NonZeroU32 = NonZeroU32::new(3).expect("3 is not zero");
/// How long a backend that has never passed may keep failing while it is reported as
/// *starting* rather than unhealthy. 5 minutes is SGLang router's worker start-up timeout; model
/// loads, torch.compile and CUDA-graph capture routinely take minutes.
pub(crate) const DEFAULT_STARTUP_GRACE: Duration = Duration::from_secs(300);
/// HTTP probe path when none is given: vLLM, TGI, SGLang and llama.cpp all serve `/health`.
pub(crate) const DEFAULT_HEALTH_PATH: &str = "/health";
/// Load scrape path when neither `path` nor a preset gives one: the Prometheus convention.
pub(crate) const DEFAULT_METRICS_PATH: &str = "/metrics";
/// Value of the load metric at which the weight has fallen to its floor. 32 queued requests is
/// several batches of backlog for a typical vLLM/SGLang deployment.
pub(crate) const DEFAULT_SATURATION: f64 = 32.0;
/// Floor of the load factor, in percent: a busy server keeps a trickle of new connections, so its
/// reported load can fall and its weight recover (Envoy's slow-start floor is 10 % too).
pub(crate) const DEFAULT_MIN_WEIGHT_PERCENT: f64 = 10.0;
/// Time between two load scrapes of one backend. 1 s follows load changes within a few seconds
/// while a scrape (a few hundred KiB of text for vLLM) stays cheap.
/// Triton's requests in flight: `nv_inference_pending_request_count` (received, not yet
/// executing) is the only per-model gauge of requests; executing ones have none.
const TRITON_IN_FLIGHT: [&str; 1] = ["nv_inference_pending_request_count"];
pub(crate) const DEFAULT_LOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failed connects from live traffic that eject a backend (Envoy's
/// `consecutive_5xx`, which counts connect failures for TCP, is 5).
pub(crate) const DEFAULT_MAX_CONNECT_FAILURES: NonZeroU32 =
    NonZeroU32::new(5).expect("5 is not zero");
/// First ejection's length; it doubles on each repeat up to [`MAX_EJECTION`]. 10 s is nginx's
/// `fail_timeout`: long enough to stop hammering a dead server, short enough to find it back.
pub(crate) const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(10);
/// Cap on the doubling ejection time (Envoy's `max_ejection_time`).
pub(crate) const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How a backend's health is probed; the `kind` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProbeKind {
    /// A TCP connect that succeeds is a pass.
    Tcp,
    /// An HTTP GET answered with an expected status (and body) is a pass. The default: a TCP
    /// connect passes llama.cpp while it loads, SGLang while it warms up and a vLLM whose engine
    /// has died.
    #[default]
    Http,
}

/// What a listener does when none of its backends is healthy; the `all_unhealthy` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AllUnhealthy {
    /// Ignore health and spread connections over every backend by configured weight (and
    /// operator drain): when every check fails, the checks are the likelier culprit, and a
    /// refused client is a certain failure. The default (Envoy's panic mode, Sōzu's fail-open).
    #[default]
    RouteAnyway,
    /// Close new client connections at once.
    Reject,
}

impl AllUnhealthy {
    /// The name used in the config file.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AllUnhealthy::RouteAnyway => "route_anyway",
            AllUnhealthy::Reject => "reject",
        }
    }
}

/// An inference engine whose queue gauge and metrics endpoint are known; the `preset` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LoadPreset {
    /// vLLM's OpenAI server: `vllm:num_requests_waiting` on `/metrics`, same port.
    Vllm,
    /// SGLang (with `--enable-metrics`): `sglang:num_queue_reqs` on `/metrics`, same port.
    Sglang,
    /// Text Generation Inference: `tgi_queue_size` on `/metrics`, same port.
    Tgi,
    /// Triton: `nv_inference_pending_request_count` on `/metrics`, port 8002.
    Triton,
    /// llama.cpp's `llama-server` (with `--metrics`): `llamacpp:requests_deferred` on `/metrics`.
    Llamacpp,
}

impl LoadPreset {
    /// The engine's queue gauge.
    pub(crate) fn in_flight_metrics(self) -> &'static [&'static str] {
        match self {
            LoadPreset::Vllm => &["vllm:num_requests_running", "vllm:num_requests_waiting"],
            LoadPreset::Sglang => &["sglang:num_running_reqs", "sglang:num_queue_reqs"],
            LoadPreset::Tgi => &["tgi_batch_current_size", "tgi_queue_size"],
            LoadPreset::Triton => &TRITON_IN_FLIGHT,
            LoadPreset::Llamacpp => &["llamacpp:requests_processing", "llamacpp:requests_deferred"],
        }
    }

    /// The gauge the load factor follows.
    pub(crate) fn metric(self) -> &'static str {
        match self {
            LoadPreset::Vllm => "vllm:num_requests_waiting",
            LoadPreset::Sglang => "sglang:num_queue_reqs",
            LoadPreset::Tgi => "tgi_queue_size",
            LoadPreset::Triton => "nv_inference_pending_request_count",
            LoadPreset::Llamacpp => "llamacpp:requests_deferred",
        }
    }

    /// Where the engine serves its metrics.
    pub(crate) fn path(self) -> &'static str {
        DEFAULT_METRICS_PATH
    }

    /// The port the engine serves metrics on when it is not the serving port: Triton serves
    /// HTTP on 8000, gRPC on 8001 and metrics on 8002 (`--metrics-port`).
    pub(crate) fn port(self) -> Option<u16> {
        match self {
            LoadPreset::Triton => Some(8002),
            _ => None,
        }
    }
}

/// A listener's active health checks: `[listener.health]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthConfig {
    /// What one probe does.
    pub probe: Probe,
    /// Time between two probes of one backend (jittered by up to ±10 %).
    pub interval: Duration,
    /// Upper bound on one probe.
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy backend healthy.
    pub rise: NonZeroU32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: NonZeroU32,
    /// How long a backend that has never passed is *starting* rather than unhealthy.
    pub startup_grace: Duration,
    /// Length of the weight ramp after a backend turns healthy or is added; `None` is off.
    pub slow_start: Option<Duration>,
    /// What to do when no backend is healthy.
    pub all_unhealthy: AllUnhealthy,
    /// Weight that follows reported load, if configured.
    pub load: Option<LoadConfig>,
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Connect, then close.
    Tcp,
    /// GET a path and judge the answer.
    Http(HttpProbe),
}

/// An HTTP/1.1 probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpProbe {
    /// Absolute path (and query) to GET, starting with `/`.
    pub path: String,
    /// `Host` header; the probed address when `None`.
    pub host: Option<String>,
    /// Statuses that pass.
    pub expect_status: ExpectStatus,
    /// A substring the body must contain to pass.
    pub expect_body: Option<String>,
}

/// Statuses that make an HTTP probe pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExpectStatus {
    /// Any 2xx (the default).
    Success,
    /// Exactly these (each 100..=599; at least one).
    AnyOf(Vec<u16>),
}

impl ExpectStatus {
    /// True when `status` passes.
    pub(crate) fn matches(&self, status: u16) -> bool {
        match self {
            ExpectStatus::Success => (200..300).contains(&status),
            ExpectStatus::AnyOf(list) => list.contains(&status),
        }
    }
}

/// Weight that follows the load a server reports: `[listener.health.load]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoadConfig {
    /// Path of the Prometheus text endpoint.
    pub path: String,
    /// Port to scrape instead of the probed address's port (Triton's 8002).
    pub port: Option<u16>,
    /// Name of the gauge; its samples are summed over label sets.
    pub metric: String,
    /// Gauges whose sum is the server's requests in flight (running + waiting), which the
    /// load estimate takes in; empty: not read.
    pub in_flight_metrics: Vec<String>,
    /// Metric value at which the weight reaches its floor (finite, > 0).
    pub saturation: f64,
    /// Floor of the load factor, as a fraction in 0..=1.
    pub min_factor: f64,
    /// Time between two scrapes.
    pub interval: Duration,
}

/// Passive ejection from live traffic: `[listener.passive]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PassiveConfig {
    /// Consecutive failed connects that eject the backend.
    pub max_connect_failures: NonZeroU32,
    /// First ejection's length; doubles on each repeat up to [`MAX_EJECTION`].
    pub eject_for: Duration,
}

impl HealthConfig {
    pub(super) fn from_raw(raw: &RawHealth) -> Result<HealthConfig, Invalid> {
        let kind = raw
            .kind
            .as_ref()
            .map_or(ProbeKind::default(), |k| *k.get_ref());
        let probe = match kind {
            ProbeKind::Tcp => {
                let http_only = [
                    ("path", raw.path.as_ref().map(Spanned::span)),
                    ("host", raw.host.as_ref().map(Spanned::span)),
                    (
                        "expect_status",
                        raw.expect_status.as_ref().map(Spanned::span),
                    ),
                    ("expect_body", raw.expect_body.as_ref().map(Spanned::span)),
                ];
                if let Some((key, Some(span))) = http_only.into_iter().find(|(_, s)| s.is_some()) {
                    return Err((Some(span), ConfigErrorKind::HttpOnly(key)));
                }
                Probe::Tcp
            }
            ProbeKind::Http => Probe::Http(HttpProbe {
                path: path(raw.path.as_ref(), "path", DEFAULT_HEALTH_PATH)?,
                host: match &raw.host {
                    None => None,
                    Some(host) => Some(header_value(host, "host")?),
                },
                expect_status: expect_status(raw.expect_status.as_ref())?,
                expect_body: match &raw.expect_body {
                    None => None,
                    Some(body) if body.get_ref().is_empty() => {
                        return Err((Some(body.span()), ConfigErrorKind::Empty("expect_body")));
                    }
                    Some(body) => Some(body.get_ref().clone()),
                },
            }),
        };
        Ok(HealthConfig {
            probe,
            interval: duration(&raw.interval, "interval", DEFAULT_INTERVAL)?,
            timeout: duration(&raw.timeout, "timeout", DEFAULT_TIMEOUT)?,
            rise: count(&raw.rise, "rise")?.unwrap_or(DEFAULT_RISE),
            fall: count(&raw.fall, "fall")?.unwrap_or(DEFAULT_FALL),
            startup_grace: optional_duration(&raw.startup_grace, "startup_grace", true)?
                .unwrap_or(DEFAULT_STARTUP_GRACE),
            slow_start: optional_duration(&raw.slow_start, "slow_start", false)?,
            all_unhealthy: raw
                .all_unhealthy
                .as_ref()
                .map_or(AllUnhealthy::default(), |a| *a.get_ref()),
            load: match &raw.load {
                None => None,
                Some(load) => Some(LoadConfig::from_raw(load.get_ref(), load.span())?),
            },
        })
    }
}

impl LoadConfig {
    fn from_raw(raw: &RawLoad, span: std::ops::Range<usize>) -> Result<LoadConfig, Invalid> {
        let preset = raw.preset.as_ref().map(|p| *p.get_ref());
        let metric = match (&raw.metric, preset) {
            (Some(metric), _) => metric_name(metric)?,
            (None, Some(preset)) => preset.metric().to_owned(),
            (None, None) => return Err((Some(span), ConfigErrorKind::NoLoadMetric)),
        };
        let in_flight_metrics = match (&raw.in_flight_metrics, preset) {
            (Some(names), _) => names
                .get_ref()
                .iter()
                .map(metric_name)
                .collect::<Result<Vec<String>, Invalid>>()?,
            (None, Some(preset)) => preset
                .in_flight_metrics()
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
            (None, None) => Vec::new(),
        };
        let default_path = preset.map_or(DEFAULT_METRICS_PATH, LoadPreset::path);
        let port = match &raw.port {
            None => preset.and_then(LoadPreset::port),
            Some(port) => match u16::try_from(*port.get_ref()) {
                Ok(p) if p != 0 => Some(p),
                _ => return Err((Some(port.span()), ConfigErrorKind::BadPort(*port.get_ref()))),
            },
        };
        let saturation = match &raw.saturation {
            None => DEFAULT_SATURATION,
            Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 => *s.get_ref(),
            Some(s) => return Err((Some(s.span()), ConfigErrorKind::BadSaturation(*s.get_ref()))),
        };
        let min_percent = match &raw.min_weight_percent {
            None => DEFAULT_MIN_WEIGHT_PERCENT,
            // Not 0: a fleet busy enough would take every weight to 0 and refuse every client,
            // and a backend at weight 0 gets no traffic that could show it has recovered.
            Some(p) if *p.get_ref() > 0.0 && *p.get_ref() <= 100.0 => *p.get_ref(),
            Some(p) => return Err((Some(p.span()), ConfigErrorKind::BadPercent(*p.get_ref()))),
        };
        Ok(LoadConfig {
            path: path(raw.path.as_ref(), "path", default_path)?,
            port,
            metric,
            in_flight_metrics,
            saturation,
            min_factor: min_percent / 100.0,
            interval: duration(&raw.interval, "interval", DEFAULT_LOAD_INTERVAL)?,
        })
    }
}

/// A Prometheus metric name as written (trimmed), or the error naming it.
fn metric_name(metric: &Spanned<String>) -> Result<String, Invalid> {
    let name = metric.get_ref().trim();
    let valid = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !valid {
        let kind = ConfigErrorKind::BadMetric(metric.get_ref().clone());
        return Err((Some(metric.span()), kind));
    }
    Ok(name.to_owned())
}

impl PassiveConfig {
    pub(super) fn from_raw(raw: &RawPassive) -> Result<PassiveConfig, Invalid> {
        Ok(PassiveConfig {
            max_connect_failures: count(&raw.max_connect_failures, "max_connect_failures")?
                .unwrap_or(DEFAULT_MAX_CONNECT_FAILURES),
            eject_for: duration(&raw.eject_for, "eject_for", DEFAULT_EJECT_FOR)?,
        })
    }
}

/// An HTTP path: starts with `/` and is a valid request target, so building the request later
/// cannot fail.
fn path(
    value: Option<&Spanned<String>>,
    key: &'static str,
    default: &str,
) -> Result<String, Invalid> {
    let Some(value) = value else {
        return Ok(default.to_owned());
    };
    let text = value.get_ref().trim();
    if !text.starts_with('/') || text.parse::<hyper::Uri>().is_err() {
        let kind = ConfigErrorKind::BadPath {
            key,
            value: value.get_ref().clone(),
        };
        return Err((Some(value.span()), kind));
    }
    Ok(text.to_owned())
}

/// A header value: visible ASCII only, so it cannot smuggle a line break into the request.
fn header_value(value: &Spanned<String>, key: &'static str) -> Result<String, Invalid> {
    let text = value.get_ref().trim();
    if text.is_empty() {
        return Err((Some(value.span()), ConfigErrorKind::Empty(key)));
    }
    if !text.chars().all(|c| c.is_ascii_graphic()) {
        let kind = ConfigErrorKind::BadHeader {
            key,
            value: value.get_ref().clone(),
        };
        return Err((Some(value.span()), kind));
    }
    Ok(text.to_owned())
}

fn expect_status(value: Option<&Spanned<Vec<Spanned<i64>>>>) -> Result<ExpectStatus, Invalid> {
    let Some(list) = value else {
        return Ok(ExpectStatus::Success);
    };
    if list.get_ref().is_empty() {
        return Err((Some(list.span()), ConfigErrorKind::Empty("expect_status")));
    }
    let mut statuses = Vec::with_capacity(list.get_ref().len());
    for status in list.get_ref() {
        match u16::try_from(*status.get_ref()) {
            Ok(s) if (100..=599).contains(&s) => statuses.push(s),
            _ => {
                let kind = ConfigErrorKind::BadStatus(*status.get_ref());
                return Err((Some(status.span()), kind));
            }
        }
    }
    Ok(ExpectStatus::AnyOf(statuses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_name_each_engines_queue_gauge() {
        let expected = [
            (LoadPreset::Vllm, "vllm:num_requests_waiting", None),
            (LoadPreset::Sglang, "sglang:num_queue_reqs", None),
            (LoadPreset::Tgi, "tgi_queue_size", None),
            (
                LoadPreset::Triton,
                "nv_inference_pending_request_count",
                Some(8002),
            ),
            (LoadPreset::Llamacpp, "llamacpp:requests_deferred", None),
        ];
        for (preset, metric, port) in expected {
            assert_eq!(preset.metric(), metric);
            assert_eq!(preset.port(), port);
            assert_eq!(preset.path(), "/metrics");
        }
    }

    #[test]
    fn expected_statuses_default_to_any_2xx() {
        assert!(ExpectStatus::Success.matches(200));
        assert!(ExpectStatus::Success.matches(204));
        assert!(!ExpectStatus::Success.matches(301));
        assert!(!ExpectStatus::Success.matches(503));
        let listed = ExpectStatus::AnyOf(vec![200, 429]);
        assert!(listed.matches(429));
        assert!(!listed.matches(204));
    }
}
