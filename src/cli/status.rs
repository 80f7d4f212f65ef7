//! What `ctl` and `top` read from the admin endpoint: the parts of `/status` they show, and the
//! connect-time histograms of `/metrics`, which `/status` does not carry.
//!
//! Every field defaults, so an endpoint of another version that lacks one still reads.

use std::collections::HashMap;

use serde::Deserialize;

use super::admin_client::Client;
use super::failure::Failure;

/// `GET /status`, the parts shown.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct Status {
    pub(crate) version: String,
    pub(crate) config_file: Option<String>,
    pub(crate) started_at: Option<String>,
    pub(crate) uptime_seconds: Option<f64>,
    pub(crate) reloads: Reloads,
    pub(crate) listeners: Vec<ListenerStatus>,
    pub(crate) pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct Reloads {
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    pub(crate) last: Option<LastReload>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct LastReload {
    pub(crate) ok: bool,
    pub(crate) at: String,
    pub(crate) message: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct ListenerStatus {
    pub(crate) name: String,
    pub(crate) bind: Option<String>,
    /// Empty for a listener that routes by server name (see `routes`).
    pub(crate) pool: String,
    pub(crate) strategy: String,
    pub(crate) routes: Vec<RouteStatus>,
    pub(crate) connections: ListenerConnections,
}

impl ListenerStatus {
    /// The pool it sends to, or its routes' pools (`sni:` and the pools, in order).
    pub(crate) fn destination(&self) -> String {
        if !self.pool.is_empty() || self.routes.is_empty() {
            return self.pool.clone();
        }
        let mut pools: Vec<&str> = Vec::new();
        for route in &self.routes {
            if !pools.contains(&route.pool.as_str()) {
                pools.push(&route.pool);
            }
        }
        format!("sni:{}", pools.join(","))
    }
}

/// One route of a listener that routes by server name.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct RouteStatus {
    pub(crate) sni: Vec<String>,
    pub(crate) pool: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct ListenerConnections {
    pub(crate) open: u64,
    pub(crate) accepted: u64,
    pub(crate) connect_failures: u64,
    pub(crate) all_unhealthy: bool,
    pub(crate) rejected_max_connections: u64,
    pub(crate) rejected_no_backend: u64,
    pub(crate) rejected_all_unhealthy: u64,
    pub(crate) rejected_queue_timeout: u64,
    pub(crate) rejected_queue_full: u64,
    pub(crate) rejected_shutdown: u64,
    pub(crate) rejected_pool_removed: u64,
    pub(crate) rejected_bad_proxy_header: u64,
    pub(crate) rejected_denied: u64,
    pub(crate) rejected_client_limit: u64,
    pub(crate) rejected_client_rate: u64,
    pub(crate) rejected_bad_client_hello: u64,
    pub(crate) rejected_no_route: u64,
}

impl ListenerConnections {
    /// Clients closed without being relayed, every reason together.
    pub(crate) fn rejected(&self) -> u64 {
        [
            self.rejected_max_connections,
            self.rejected_no_backend,
            self.rejected_all_unhealthy,
            self.rejected_queue_timeout,
            self.rejected_queue_full,
            self.rejected_shutdown,
            self.rejected_pool_removed,
            self.rejected_bad_proxy_header,
            self.rejected_denied,
            self.rejected_client_limit,
            self.rejected_client_rate,
            self.rejected_bad_client_hello,
            self.rejected_no_route,
        ]
        .iter()
        .sum()
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct PoolStatus {
    pub(crate) name: String,
    pub(crate) inline: bool,
    pub(crate) listeners: Vec<String>,
    pub(crate) strategy: String,
    pub(crate) queue: QueueStatus,
    pub(crate) backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct QueueStatus {
    pub(crate) length: u64,
    pub(crate) served: u64,
    pub(crate) timed_out: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct BackendStatus {
    pub(crate) addr: String,
    pub(crate) name: Option<String>,
    pub(crate) weight: f64,
    pub(crate) effective_weight: f64,
    pub(crate) admin_state: String,
    pub(crate) health: HealthStatus,
    pub(crate) active_connections: u64,
    pub(crate) max_connections: Option<u32>,
    pub(crate) load_estimate: u64,
    pub(crate) connections_total: u64,
    pub(crate) connect_failures: u64,
    pub(crate) bytes_to_backend: u64,
    pub(crate) bytes_from_backend: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub(crate) struct HealthStatus {
    pub(crate) healthy: bool,
    pub(crate) status: String,
    pub(crate) ejected: bool,
    pub(crate) last_check: Option<String>,
    pub(crate) slow_start: Option<f64>,
}

impl BackendStatus {
    /// Drained by an operator.
    pub(crate) fn drained(&self) -> bool {
        self.admin_state == "drained"
    }

    /// One word for where it stands, the most pressing first: `drained`, `ejected`,
    /// `unhealthy`, `starting`, `ramping` or `healthy`.
    pub(crate) fn state(&self) -> &'static str {
        if self.drained() {
            "drained"
        } else if self.health.ejected {
            "ejected"
        } else if self.health.status == "unhealthy" {
            "unhealthy"
        } else if self.health.status == "starting" {
            "starting"
        } else if self.health.slow_start.is_some() {
            "ramping"
        } else {
            "healthy"
        }
    }

    /// The state with the reason behind it, when there is one: `unhealthy: http 503`,
    /// `ramping 35%`, `drained (unhealthy: timeout after 2s)`.
    pub(crate) fn state_with_reason(&self) -> String {
        let failing = self
            .health
            .last_check
            .as_deref()
            .filter(|c| *c != "passed" && self.health.status != "healthy");
        let health = match (self.health.status.as_str(), failing) {
            (status @ ("unhealthy" | "starting"), Some(why)) => format!("{status}: {why}"),
            (status @ ("unhealthy" | "starting"), None) => status.to_owned(),
            _ if self.health.ejected => "ejected".to_owned(),
            _ => match self.health.slow_start {
                Some(share) => format!("ramping {:.0}%", share * 100.0),
                None => "healthy".to_owned(),
            },
        };
        if self.drained() {
            if health == "healthy" {
                "drained".to_owned()
            } else {
                format!("drained ({health})")
            }
        } else {
            health
        }
    }
}

impl Status {
    /// Every backend with its pool, pool by pool.
    pub(crate) fn backends(&self) -> impl Iterator<Item = (&PoolStatus, &BackendStatus)> {
        self.pools
            .iter()
            .flat_map(|p| p.backends.iter().map(move |b| (p, b)))
    }
}

/// Cumulative connect-time buckets of one backend: (upper bound in seconds, count), ascending,
/// `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Histogram(pub(crate) Vec<(f64, u64)>);

/// The metric whose buckets [`connect_histograms`] reads.
const CONNECT_BUCKETS: &str = "weighbridge_backend_connect_duration_seconds_bucket{";

/// Connect-time histograms by (pool, backend address), from a `/metrics` page. A backend's
/// series name its pool by `listener` (a listener's own pool) or `pool`; both are the pool's
/// name.
pub(crate) fn connect_histograms(page: &str) -> HashMap<(String, String), Histogram> {
    let mut found: HashMap<(String, String), Histogram> = HashMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(CONNECT_BUCKETS) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let (mut pool, mut backend, mut le) = (None, None, None);
        // Names, addresses and bounds never hold a quote or a comma, so a plain split reads
        // the labels the endpoint writes.
        for label in labels.split(',') {
            let Some((key, value)) = label.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            match key {
                "listener" | "pool" => pool = Some(value),
                "backend" => backend = Some(value),
                "le" => le = Some(value),
                _ => {}
            }
        }
        let (Some(pool), Some(backend), Some(le)) = (pool, backend, le) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(bound) => bound,
                Err(_) => continue,
            }
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        found
            .entry((pool.to_owned(), backend.to_owned()))
            .or_default()
            .0
            .push((bound, count as u64));
    }
    for histogram in found.values_mut() {
        histogram.0.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    found
}

impl Histogram {
    /// The buckets counted since `earlier` (the same backend's histogram at a previous
    /// scrape); `None` when the buckets differ or a count went down (the balancer restarted).
    pub(crate) fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        if self.0.len() != earlier.0.len() {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.0.len());
        for (&(bound, now), &(was_bound, was)) in self.0.iter().zip(&earlier.0) {
            if bound != was_bound || now < was {
                return None;
            }
            buckets.push((bound, now - was));
        }
        Some(Histogram(buckets))
    }

    /// The upper bound of the bucket the `q` quantile falls in, in seconds, as Prometheus's
    /// `histogram_quantile` would bound it (without interpolating); `None` with no count, and
    /// the largest finite bound when it falls in `+Inf`.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.0.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let largest_finite = self.0.iter().rev().map(|b| b.0).find(|b| b.is_finite());
        let bound = self.0.iter().find(|(_, count)| *count >= rank)?.0;
        if bound.is_finite() {
            Some(bound)
        } else {
            largest_finite
        }
    }
}

/// One reading of the endpoint: `/status` and the connect histograms.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    pub(crate) status: Status,
    /// `/status` as it came, for `--json`.
    pub(crate) raw: String,
    pub(crate) connect: HashMap<(String, String), Histogram>,
}

/// Reads `/status` and, when `with_metrics`, the histograms of `/metrics`.
pub(crate) async fn read(client: &Client, with_metrics: bool) -> Result<Reading, Failure> {
    let raw = client.get_ok("/status").await?;
    let status: Status = serde_json::from_str(&raw).map_err(|e| {
        Failure::Other(format!(
            "GET /status at {}: not the status JSON ({e})",
            client.target().authority()
        ))
    })?;
    let connect = if with_metrics {
        connect_histograms(&client.get_ok("/metrics").await?)
    } else {
        HashMap::new()
    };
    Ok(Reading {
        status,
        raw,
        connect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# TYPE weighbridge_backend_connect_duration_seconds histogram
weighbridge_backend_connect_duration_seconds_sum{listener="chat",backend="127.0.0.1:9001"} 0.01
weighbridge_backend_connect_duration_seconds_count{listener="chat",backend="127.0.0.1:9001"} 100
weighbridge_backend_connect_duration_seconds_bucket{listener="chat",backend="127.0.0.1:9001",le="0.0005"} 90
weighbridge_backend_connect_duration_seconds_bucket{listener="chat",backend="127.0.0.1:9001",le="0.001"} 98
weighbridge_backend_connect_duration_seconds_bucket{listener="chat",backend="127.0.0.1:9001",le="0.005"} 100
weighbridge_backend_connect_duration_seconds_bucket{listener="chat",backend="127.0.0.1:9001",le="+Inf"} 100
weighbridge_backend_connect_duration_seconds_bucket{pool="llama",backend="[::1]:9002",le="0.0005"} 0
weighbridge_backend_connect_duration_seconds_bucket{pool="llama",backend="[::1]:9002",le="+Inf"} 0
"#;

    #[test]
    fn histograms_are_read_by_pool_and_backend() {
        let all = connect_histograms(PAGE);
        let chat = &all[&("chat".to_owned(), "127.0.0.1:9001".to_owned())];
        assert_eq!(chat.0.len(), 4);
        assert_eq!(chat.quantile(0.99), Some(0.005));
        assert_eq!(chat.quantile(0.5), Some(0.0005));
        let llama = &all[&("llama".to_owned(), "[::1]:9002".to_owned())];
        assert_eq!(llama.quantile(0.99), None, "no connect yet");
    }

    #[test]
    fn a_quantile_in_the_last_bucket_reads_as_the_largest_bound_and_deltas_need_growth() {
        let late = Histogram(vec![(0.001, 1), (0.01, 1), (f64::INFINITY, 10)]);
        assert_eq!(late.quantile(0.99), Some(0.01));
        let earlier = Histogram(vec![(0.001, 1), (0.01, 1), (f64::INFINITY, 4)]);
        let delta = late.since(&earlier).expect("counts grew");
        assert_eq!(delta.0, vec![(0.001, 0), (0.01, 0), (f64::INFINITY, 6)]);
        assert_eq!(earlier.since(&late), None, "a count went down: a restart");
    }

    #[test]
    fn states_name_the_most_pressing_first_with_the_reason() {
        let mut b = BackendStatus {
            admin_state: "ready".into(),
            health: HealthStatus {
                healthy: true,
                status: "healthy".into(),
                ..HealthStatus::default()
            },
            ..BackendStatus::default()
        };
        assert_eq!(b.state_with_reason(), "healthy");
        b.health.slow_start = Some(0.35);
        assert_eq!(
            (b.state(), b.state_with_reason().as_str()),
            ("ramping", "ramping 35%")
        );
        b.health.slow_start = None;
        b.health.status = "unhealthy".into();
        b.health.last_check = Some("http 503".into());
        assert_eq!(b.state_with_reason(), "unhealthy: http 503");
        b.admin_state = "drained".into();
        assert_eq!(
            (b.state(), b.state_with_reason().as_str()),
            ("drained", "drained (unhealthy: http 503)")
        );
    }
}
