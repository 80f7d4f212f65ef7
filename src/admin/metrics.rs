//! `GET /metrics`: Prometheus metrics, read from the snapshot and the live atomics at scrape
//! time.
//!
//! Nothing is kept twice: the connection path counts into `ListenerStats` and `BackendState` as
//! it always does, and a [`Collector`] turns those into metric families when Prometheus asks.
//! Series exist for the listeners and backends of the running configuration. A backend a reload
//! removed keeps its connection series (active, totals, bytes, spliced bytes, connect time) while it still
//! carries connections, so the streams it serves can be watched to their end; it has no weight
//! or health series, being in no rotation, and disappears from the scrape after its last
//! connection.
//!
//! Every metric, its type, labels and meaning: docs/observability.md, "Metrics".

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::Handle;
use crate::health::Health;
use crate::snapshot::Pool;
use crate::state::histogram::HistogramSnapshot;
use crate::state::{AdminState, BackendCounters, BackendState, ListenerCounters};

/// A registry holding the one collector that reads `handle` at each scrape.
pub(super) fn registry(handle: Handle) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Metrics { handle }));
    registry
}

/// Reads the balancer's live state when a scrape encodes it.
#[derive(Debug)]
struct Metrics {
    handle: Handle,
}

/// One listener's values, read once per scrape so that every family agrees.
struct ListenerSample {
    name: Arc<str>,
    counters: ListenerCounters,
    duration: HistogramSnapshot,
}

/// One backend's values, read once per scrape.
struct BackendSample {
    listener: Arc<str>,
    addr: String,
    counters: BackendCounters,
    connect_time: HistogramSnapshot,
    /// `None` for a backend a reload removed that still carries connections.
    rotation: Option<Rotation>,
}

/// What only a backend of the running configuration has: a place in its listener's rotation.
struct Rotation {
    weight: f64,
    effective_weight: f64,
    health: Health,
    drained: bool,
}

impl ListenerSample {
    fn of(pool: &Pool) -> ListenerSample {
        ListenerSample {
            name: Arc::clone(pool.name()),
            counters: pool.stats().counters(),
            duration: pool.stats().duration().snapshot(),
        }
    }

    fn labels(&self) -> [(&'static str, &str); 1] {
        [("listener", &self.name)]
    }
}

impl BackendSample {
    fn of(listener: &Arc<str>, addr: SocketAddr, state: &BackendState) -> BackendSample {
        BackendSample {
            listener: Arc::clone(listener),
            addr: addr.to_string(),
            counters: state.counters(),
            connect_time: state.connect_time().snapshot(),
            rotation: None,
        }
    }

    /// Every backend of `pool`.
    fn configured(pool: &Pool) -> impl Iterator<Item = BackendSample> {
        pool.backends().iter().map(|b| BackendSample {
            rotation: Some(Rotation {
                weight: b.weight.get(),
                effective_weight: b.effective_weight,
                health: b.stats.health(),
                drained: b.stats.admin_state() == AdminState::Drained,
            }),
            ..BackendSample::of(pool.name(), b.addr, &b.stats)
        })
    }

    /// Its `listener` and `backend` labels.
    fn labels(&self) -> [(&'static str, &str); 2] {
        [("listener", &self.listener), ("backend", &self.addr)]
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = self.handle.snapshot();
        let listeners: Vec<ListenerSample> =
            snapshot.pools().map(|p| ListenerSample::of(p)).collect();
        let mut backends: Vec<BackendSample> = snapshot
            .pools()
            .flat_map(|p| BackendSample::configured(p))
            .collect();
        backends.extend(
            self.handle
                .removed_backends(&snapshot)
                .iter()
                .map(|r| BackendSample::of(&r.listener, r.addr, &r.state)),
        );
        drop(snapshot);
        let e = &mut encoder;

        counter(
            e,
            "weighbridge_connections_accepted",
            "Client connections accepted, including ones then rejected.",
            listeners.iter().map(|l| (l.labels(), l.counters.accepted)),
        )?;
        gauge(
            e,
            "weighbridge_connections_active",
            "Client connections open now.",
            listeners.iter().map(|l| (l.labels(), l.counters.open)),
        )?;
        counter(
            e,
            "weighbridge_connections_rejected",
            "Client connections closed without being relayed, by reason: max_connections were open, no backend could be reached, or none was healthy under all_unhealthy = \"reject\".",
            listeners.iter().flat_map(|l| {
                [
                    ("max_connections", l.counters.rejected_max_connections),
                    ("no_backend", l.counters.rejected_no_backend),
                    ("all_unhealthy", l.counters.rejected_all_unhealthy),
                ]
                .map(|(reason, n)| ([("listener", &*l.name), ("reason", reason)], n))
            }),
        )?;
        counter(
            e,
            "weighbridge_connect_attempts",
            "Connects to backends started, retries included.",
            listeners
                .iter()
                .map(|l| (l.labels(), l.counters.connect_attempts)),
        )?;
        counter(
            e,
            "weighbridge_connect_failures",
            "Connects to backends refused, failed or timed out, or with no local port left.",
            listeners
                .iter()
                .map(|l| (l.labels(), l.counters.connect_failures)),
        )?;
        gauge(
            e,
            "weighbridge_all_unhealthy",
            "1 while no backend of the listener is healthy (all_unhealthy applies), else 0.",
            listeners
                .iter()
                .map(|l| (l.labels(), u64::from(l.counters.all_unhealthy))),
        )?;
        counter(
            e,
            "weighbridge_all_unhealthy_episodes",
            "Times no backend of the listener was healthy any more (entries into weighbridge_all_unhealthy = 1).",
            listeners
                .iter()
                .map(|l| (l.labels(), l.counters.all_unhealthy_episodes)),
        )?;
        counter(
            e,
            "weighbridge_routed_all_unhealthy",
            "Client connections routed while no backend was healthy (all_unhealthy = \"route_anyway\").",
            listeners
                .iter()
                .map(|l| (l.labels(), l.counters.routed_all_unhealthy)),
        )?;
        histogram(
            e,
            "weighbridge_connection_duration_seconds",
            "How long client connections were open, from accept to close.",
            listeners.iter().map(|l| (l.labels(), &l.duration)),
        )?;

        let every = || backends.iter().map(|b| (b.labels(), b));
        let in_rotation = || {
            backends
                .iter()
                .filter_map(|b| Some((b.labels(), b.rotation.as_ref()?)))
        };
        gauge(
            e,
            "weighbridge_backend_connections_active",
            "Connections assigned to the backend and not yet closed (connects in progress included).",
            every().map(|(labels, b)| (labels, b.counters.active)),
        )?;
        counter(
            e,
            "weighbridge_backend_connections",
            "Connections established to the backend.",
            every().map(|(labels, b)| (labels, b.counters.connections)),
        )?;
        counter(
            e,
            "weighbridge_backend_connect_failures",
            "Connects to the backend refused, failed or timed out.",
            every().map(|(labels, b)| (labels, b.counters.connect_failures)),
        )?;
        counter(
            e,
            "weighbridge_backend_bytes",
            "Bytes relayed: to_backend is read from clients and sent to the backend, from_backend the answer.",
            every().flat_map(|([listener, backend], b)| {
                [
                    ("to_backend", b.counters.bytes_to_backend),
                    ("from_backend", b.counters.bytes_from_backend),
                ]
                .map(|(direction, n)| ([listener, backend, ("direction", direction)], n))
            }),
        )?;
        counter(
            e,
            "weighbridge_backend_spliced_bytes",
            "Of weighbridge_backend_bytes, those moved by splice(2), never entering user space.",
            every().flat_map(|([listener, backend], b)| {
                [
                    ("to_backend", b.counters.spliced_to_backend),
                    ("from_backend", b.counters.spliced_from_backend),
                ]
                .map(|(direction, n)| ([listener, backend, ("direction", direction)], n))
            }),
        )?;
        histogram(
            e,
            "weighbridge_backend_connect_duration_seconds",
            "How long successful connects to the backend took.",
            every().map(|(labels, b)| (labels, &b.connect_time)),
        )?;
        gauge(
            e,
            "weighbridge_backend_weight",
            "Weight (capacity under capacity_proportional) from the configuration file.",
            in_rotation().map(|(labels, r)| (labels, r.weight)),
        )?;
        gauge(
            e,
            "weighbridge_backend_effective_weight",
            "Weight the strategy uses now: 0 while drained, unhealthy or ejected.",
            in_rotation().map(|(labels, r)| (labels, r.effective_weight)),
        )?;
        gauge(
            e,
            "weighbridge_backend_healthy",
            "1 while the backend is in rotation: active checks find it healthy and passive ejection does not keep it out (as /status `healthy`; 1 without health checks).",
            in_rotation().map(|(labels, r)| (labels, flag(r.health.in_rotation()))),
        )?;
        gauge(
            e,
            "weighbridge_backend_ejected",
            "1 while passive health checks have ejected the backend.",
            in_rotation().map(|(labels, r)| (labels, flag(r.health.ejected))),
        )?;
        gauge(
            e,
            "weighbridge_backend_drained",
            "1 while an operator has drained the backend.",
            in_rotation().map(|(labels, r)| (labels, flag(r.drained))),
        )?;

        let reloads = self.handle.reload_counters();
        counter(
            e,
            "weighbridge_reloads",
            "Configuration reloads, by result.",
            [
                ([("result", "success")], reloads.succeeded),
                ([("result", "failure")], reloads.failed),
            ],
        )?;
        gauge(
            e,
            "weighbridge_build_info",
            "Always 1; the version label says which weighbridge runs.",
            [([("version", env!("CARGO_PKG_VERSION"))], 1_u64)],
        )?;
        Ok(())
    }
}

fn flag(on: bool) -> u64 {
    u64::from(on)
}

/// Encodes a counter family; the encoder appends `_total` to `name`.
fn counter<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// Encodes a gauge family.
fn gauge<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Encodes a histogram family.
fn histogram<'h, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'h HistogramSnapshot)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}
