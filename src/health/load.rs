//! Weights that follow the load servers report: scrape a Prometheus gauge (a queue length), smooth
//! it, and turn it into a load factor between `min_weight_percent` and 1.
//!
//! *Health* and *load* stay apart: a busy server is never ejected for being busy (that would
//! pile its load onto the others); it gets a smaller share of new connections instead. So a
//! scrape that fails never marks a server unhealthy; it only stops the weight from following
//! load: the last factor is held for [`HOLD_SCRAPES`] scrapes, then the factor returns to 1.
//!
//! The formula, on the smoothed value v: `factor = max(min_weight_percent / 100, 1 − v /
//! saturation)`.
//!
//! Smoothing: an exponentially weighted moving average, `v ← v + α (x − v)` with α =
//! [`SMOOTHING`] per scrape (the first scrape is taken as it is), because instantaneous queue
//! lengths are too coarse when few requests are in flight (HAProxy#1393). Each scrape may then
//! move the factor by at most [`MAX_FACTOR_STEP`], so one odd scrape cannot swing a server's
//! weight from full to its floor. The published factor is rounded to 1 % ([`FACTOR_RESOLUTION`]), and
//! the snapshot is rebuilt only when that rounded value changes, so a steady server costs no
//! rebuilds.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use prom_text_format_parser::{Type, ValueType};

use super::probe::{self, ProbeError};
use crate::config::LoadConfig;

/// Weight α of each new scrape in the moving average; 0.5 halves the distance to a new level at
/// every scrape, so a real change shows within 2–3 intervals while a one-scrape blip counts half.
pub(crate) const SMOOTHING: f64 = 0.5;
/// Largest change of the load factor from one scrape to the next (a quarter of full weight).
pub(crate) const MAX_FACTOR_STEP: f64 = 0.25;
/// Failed scrapes in a row during which the last factor is held; at this many it returns to 1.
pub(crate) const HOLD_SCRAPES: u32 = 3;
/// Resolution of the published load factor: steps per unit, so 1 % of the weight.
pub(crate) const FACTOR_RESOLUTION: f64 = 100.0;
/// Largest metrics page read. vLLM's is a few hundred KiB with all its histograms.
const SCRAPE_LIMIT: usize = 8 * 1024 * 1024;

#[cfg(test)]
/// The load factor for a (smoothed) metric value.
pub(crate) fn factor_for(value: f64, config: &LoadConfig) -> f64 {
    (1.0 - value / config.saturation).clamp(config.min_factor, 1.0)
}

/// Smoothing and hold/reset state of one backend's load.
#[derive(Debug, Clone)]
pub(crate) struct LoadTracker {
    saturation: f64,
    min_factor: f64,
    smoothed: Option<f64>,
    factor: f64,
    failures: u32,
}

impl LoadTracker {
    /// A tracker with no scrape yet: factor 1.
    pub(crate) fn new(config: &LoadConfig) -> LoadTracker {
        LoadTracker {
            saturation: config.saturation,
            min_factor: config.min_factor,
            smoothed: None,
            factor: 1.0,
            failures: 0,
        }
    }

    /// A tracker that goes on from `smoothed` and `factor`, what a checker restarted by a
    /// reload left (the supervisor forgets them when load stops being configured). A busy
    /// backend then stays at its low factor instead of climbing back from 1 a step per scrape,
    /// and a first failed scrape holds that factor like any other.
    pub(crate) fn resume(config: &LoadConfig, smoothed: Option<f64>, factor: f64) -> LoadTracker {
        LoadTracker {
            smoothed,
            factor: factor.clamp(config.min_factor, 1.0),
            ..LoadTracker::new(config)
        }
    }

    /// Takes in one scraped value (negative values count as 0).
    pub(crate) fn observe(&mut self, value: f64) {
        let value = value.max(0.0);
        let smoothed = match self.smoothed {
            None => value,
            Some(previous) => previous + SMOOTHING * (value - previous),
        };
        self.smoothed = Some(smoothed);
        let target = (1.0 - smoothed / self.saturation).clamp(self.min_factor, 1.0);
        let step = (target - self.factor).clamp(-MAX_FACTOR_STEP, MAX_FACTOR_STEP);
        self.factor = (self.factor + step).clamp(self.min_factor, 1.0);
        self.failures = 0;
    }

    /// Takes in a failed scrape; true when this one ended the hold (the factor went back to 1).
    pub(crate) fn fail(&mut self) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.failures == HOLD_SCRAPES {
            self.smoothed = None;
            self.factor = 1.0;
            return true;
        }
        false
    }

    /// The smoothed value, if the latest scrapes gave one.
    pub(crate) fn smoothed(&self) -> Option<f64> {
        self.smoothed
    }

    /// Failed scrapes in a row.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The factor to publish, rounded to 1 % ([`FACTOR_RESOLUTION`]).
    pub(crate) fn factor(&self) -> f64 {
        ((self.factor * FACTOR_RESOLUTION).round() / FACTOR_RESOLUTION).clamp(self.min_factor, 1.0)
    }
}

/// Why a scrape gave no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScrapeError {
    /// The request failed or answered with a non-2xx status.
    Http(ProbeError),
    /// The page is not UTF-8 Prometheus text.
    Parse(String),
    /// The page has no sample of the metric (or only NaN ones).
    Missing,
    /// A sample (or the sum of the samples) is infinite: no load a factor can follow.
    Infinite,
    /// The metric is not a gauge.
    NotAGauge(String),
}

impl fmt::Display for ScrapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScrapeError::Http(e) => e.fmt(f),
            ScrapeError::Parse(e) => write!(f, "not Prometheus text: {e}"),
            ScrapeError::Missing => f.write_str("metric missing"),
            ScrapeError::Infinite => f.write_str("metric is infinite"),
            ScrapeError::NotAGauge(kind) => write!(f, "metric is a {kind}, not a gauge"),
        }
    }
}

/// What one scrape read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scraped {
    /// The sum of `metric`: what the load factor follows.
    pub(crate) value: f64,
    /// The sum of `in_flight_metrics`, if they are configured and every one is on the page.
    pub(crate) in_flight: Option<u64>,
}

/// Scrapes `config.metric` (and `config.in_flight_metrics`) from `addr`, bounded by `timeout`.
pub(crate) async fn scrape(
    addr: SocketAddr,
    preamble: Option<&[u8]>,
    config: &LoadConfig,
    timeout: Duration,
) -> Result<Scraped, ScrapeError> {
    let page = probe::get(addr, preamble, None, &config.path, SCRAPE_LIMIT);
    let fetched = tokio::time::timeout(timeout, page)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)));
    let answer = fetched.map_err(ScrapeError::Http)?;
    if !answer.status.is_success() {
        return Err(ScrapeError::Http(ProbeError::Status(
            answer.status.as_u16(),
        )));
    }
    // A cut page could end inside the wanted family and give a wrong sum.
    if answer.truncated {
        return Err(ScrapeError::Http(ProbeError::BodyTooLarge(SCRAPE_LIMIT)));
    }
    let text = std::str::from_utf8(&answer.body).map_err(|e| ScrapeError::Parse(e.to_string()))?;
    let value = metric_value(text, &config.metric)?;
    Ok(Scraped {
        value,
        in_flight: in_flight(text, &config.in_flight_metrics),
    })
}

/// The sum of `metrics` on page `text`, as a count: `None` if there are none, or one is
/// missing or unreadable (a partial sum would understate the load).
pub(crate) fn in_flight(text: &str, metrics: &[String]) -> Option<u64> {
    if metrics.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for metric in metrics {
        sum += metric_value(text, metric).ok()?;
    }
    // Gauges of requests are whole and small; anything else is clamped, not trusted further.
    (sum >= 0.0).then(|| sum.round().min(u32::MAX as f64) as u64)
}

/// The sum over label sets of gauge `metric` in Prometheus text `text`.
///
/// Lenient about the rest of the page, as Prometheus is about what it does not need: a family
/// the parser refuses elsewhere (Python's `prometheus_client` writes `# HELP` and `# TYPE` with
/// no sample for a labelled metric nobody has set yet) does not hide the one asked for, and
/// CRLF line ends read as LF. The page's first problem is reported only when the metric is not
/// found.
pub(crate) fn metric_value(text: &str, metric: &str) -> Result<f64, ScrapeError> {
    let text = if text.contains('\r') {
        Cow::Owned(text.replace("\r\n", "\n"))
    } else {
        Cow::Borrowed(text)
    };
    let (metrics, error) = prom_text_format_parser::parse_scrape(&text);
    let Some(family) = metrics.iter().find(|m| m.name == metric) else {
        return Err(match error {
            Some(error) => {
                let message = format!("{error:?}");
                ScrapeError::Parse(message.lines().next().unwrap_or("").to_owned())
            }
            None => ScrapeError::Missing,
        });
    };
    if !matches!(family.kind, Type::Gauge | Type::Untyped) {
        return Err(ScrapeError::NotAGauge(family.kind.to_string()));
    }
    let values: Vec<f64> = family
        .samples
        .iter()
        .filter(|s| s.value.value_type == ValueType::Sample)
        .filter_map(|s| s.value.value.parse::<f64>().ok())
        .filter(|v| !v.is_nan())
        .collect();
    if values.is_empty() {
        return Err(ScrapeError::Missing);
    }
    // `+Inf` is valid Prometheus text, and a sum can overflow. Smoothing an infinity gives NaN
    // at the next scrape (∞ − ∞), and a NaN weight would stop the whole pool from routing.
    let sum: f64 = values.iter().sum();
    if !sum.is_finite() {
        return Err(ScrapeError::Infinite);
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(saturation: f64, min_percent: f64) -> LoadConfig {
        LoadConfig {
            path: "/metrics".into(),
            port: None,
            metric: "vllm:num_requests_waiting".into(),
            in_flight_metrics: Vec::new(),
            saturation,
            min_factor: min_percent / 100.0,
            interval: Duration::from_secs(1),
        }
    }

    const VLLM: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.25
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="simple",version="1"} 4
"#;

    #[test]
    fn in_flight_is_the_sum_of_every_metric_or_nothing() {
        let page = "vllm:num_requests_running{engine=\"0\"} 3.0\n\
                    vllm:num_requests_running{engine=\"1\"} 1.0\n\
                    vllm:num_requests_waiting{engine=\"0\"} 2.0\n";
        let both = [
            "vllm:num_requests_running".to_owned(),
            "vllm:num_requests_waiting".to_owned(),
        ];
        assert_eq!(in_flight(page, &both), Some(6));
        let missing = ["vllm:num_requests_running".to_owned(), "absent".to_owned()];
        assert_eq!(
            in_flight(page, &missing),
            None,
            "a partial sum understates the load"
        );
        assert_eq!(in_flight(page, &[]), None);
    }

    #[test]
    fn gauges_with_colons_are_summed_over_label_sets() {
        assert_eq!(metric_value(VLLM, "vllm:num_requests_waiting"), Ok(6.0));
        assert_eq!(metric_value(VLLM, "vllm:num_requests_running"), Ok(2.0));
        assert_eq!(
            metric_value(VLLM, "nv_inference_pending_request_count"),
            Ok(4.0)
        );
        assert_eq!(
            metric_value(VLLM, "tgi_queue_size"),
            Err(ScrapeError::Missing)
        );
        assert!(matches!(
            metric_value(VLLM, "vllm:time_to_first_token_seconds"),
            Err(ScrapeError::NotAGauge(_))
        ));
        assert!(matches!(
            metric_value("<html>busy</html>", "x"),
            Err(ScrapeError::Parse(_))
        ));
        assert_eq!(metric_value("x NaN\n", "x"), Err(ScrapeError::Missing));
    }

    /// What Python's `prometheus_client` serves for a labelled metric nobody has set yet (vLLM
    /// and SGLang are Python): a family with no sample, before and after the one wanted.
    #[test]
    fn a_family_without_samples_elsewhere_does_not_hide_the_metric() {
        let page = "# HELP a_total Requests.\n# TYPE a_total counter\n\
                    # HELP q Queue.\n# TYPE q gauge\nq{engine=\"0\"} 30\n\
                    # HELP b Unset.\n# TYPE b gauge\n\
                    # HELP c Unset.\n# TYPE c histogram\n";
        assert_eq!(metric_value(page, "q"), Ok(30.0));
        // Asked for, it is missing, and the page's problem is what the error names.
        assert!(matches!(
            metric_value(page, "b"),
            Err(ScrapeError::Parse(_))
        ));
        let crlf = page.replace('\n', "\r\n");
        assert_eq!(metric_value(&crlf, "q"), Ok(30.0));
    }

    #[test]
    fn infinite_loads_are_refused_rather_than_smoothed_into_nan() {
        for text in ["x +Inf\n", "x -Inf\n", "x 1e308\nx{a=\"b\"} 1e308\n"] {
            assert_eq!(
                metric_value(text, "x"),
                Err(ScrapeError::Infinite),
                "{text}"
            );
        }
        assert_eq!(metric_value("x 1e300\n", "x"), Ok(1e300));
    }

    #[test]
    fn factor_follows_the_formula_with_a_floor() {
        let c = config(32.0, 10.0);
        assert_eq!(factor_for(0.0, &c), 1.0);
        assert_eq!(factor_for(8.0, &c), 0.75);
        assert_eq!(factor_for(16.0, &c), 0.5);
        assert_eq!(factor_for(32.0, &c), 0.1);
        assert_eq!(factor_for(1000.0, &c), 0.1);
    }

    #[test]
    fn steps_are_bounded_and_smoothing_converges() {
        let c = config(32.0, 10.0);
        let mut t = LoadTracker::new(&c);
        assert_eq!(t.factor(), 1.0);
        // A first scrape at saturation: the factor may only move a quarter per scrape.
        t.observe(32.0);
        assert_eq!(t.factor(), 0.75);
        t.observe(32.0);
        assert_eq!(t.factor(), 0.5);
        t.observe(32.0);
        t.observe(32.0);
        assert_eq!(t.factor(), 0.1);
        // The queue empties: the average halves its distance each scrape.
        t.observe(0.0);
        assert_eq!(t.smoothed(), Some(16.0));
        assert_eq!(t.factor(), 0.35);
        for _ in 0..20 {
            t.observe(0.0);
        }
        assert_eq!(t.factor(), 1.0);
        // A one-scrape blip moves the factor by at most one step.
        t.observe(64.0);
        assert_eq!(t.factor(), 0.75);
    }

    #[test]
    fn failed_scrapes_hold_the_factor_then_reset_it() {
        let c = config(10.0, 10.0);
        let mut t = LoadTracker::new(&c);
        t.observe(5.0);
        t.observe(5.0);
        assert_eq!(t.factor(), 0.5);
        assert!(!t.fail());
        assert!(!t.fail());
        assert_eq!(t.factor(), 0.5, "held for the first failures");
        assert!(t.fail(), "the third failure ends the hold");
        assert_eq!(t.factor(), 1.0);
        assert_eq!(t.smoothed(), None);
        assert!(!t.fail(), "the reset is reported once");
        // The next success starts afresh from its own value.
        t.observe(5.0);
        assert_eq!(t.smoothed(), Some(5.0));
    }
}
