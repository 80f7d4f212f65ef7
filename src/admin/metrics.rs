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
use crate::snapshot::{Listener, Pool};
use crate::state::histogram::HistogramSnapshot;
use crate::state::{AdminState, BackendCounters, BackendState, ListenerCounters, QueueCounters};

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

/// One pool's queue values, read once per scrape.
struct PoolSample {
    name: Arc<str>,
    queue: QueueCounters,
    wait: HistogramSnapshot,
}

/// One backend's values, read once per scrape.
struct BackendSample {
    /// `listener` for a listener's own pool (the series it always had), else `pool`.
    owner: &'static str,
    pool: Arc<str>,
    addr: String,
    counters: BackendCounters,
    connect_time: HistogramSnapshot,
    /// `None` for a backend a reload removed that still carries connections.
    rotation: Option<Rotation>,
    /// The backend name it was resolved from, if any.
    name: Option<Arc<str>>,
}

/// What only a backend of the running configuration has: a place in its listener's rotation.
struct Rotation {
    weight: f64,
    effective_weight: f64,
    health: Health,
    drained: bool,
    max_connections: Option<u32>,
    load_estimate: u64,
    reported_in_flight: Option<u64>,
}

impl ListenerSample {
    fn of(listener: &Listener) -> ListenerSample {
        ListenerSample {
            name: Arc::clone(listener.name()),
            counters: listener.stats().counters(),
            duration: listener.stats().duration().snapshot(),
        }
    }

    fn labels(&self) -> [(&'static str, &str); 1] {
        [("listener", &self.name)]
    }
}

impl PoolSample {
    fn of(pool: &Pool) -> PoolSample {
        PoolSample {
            name: Arc::clone(pool.name()),
            queue: pool.state().counters(),
            wait: pool.state().wait().snapshot(),
        }
    }

    fn labels(&self) -> [(&'static str, &str); 1] {
        [("pool", &self.name)]
    }
}

impl BackendSample {
    fn of(
        owner: &'static str,
        pool: &Arc<str>,
        addr: SocketAddr,
        state: &BackendState,
    ) -> BackendSample {
        BackendSample {
            owner,
            pool: Arc::clone(pool),
            addr: addr.to_string(),
            counters: state.counters(),
            connect_time: state.connect_time().snapshot(),
            rotation: None,
            name: None,
        }
    }

    /// Every backend of `pool`.
    fn configured(pool: &Pool) -> impl Iterator<Item = BackendSample> {
        let owner = owner_label(pool.inline());
        pool.backends().iter().map(move |b| BackendSample {
            rotation: Some(Rotation {
                weight: b.weight.get(),
                effective_weight: b.effective_weight,
                health: b.stats.health(),
                drained: b.stats.admin_state() == AdminState::Drained,
                max_connections: b.max_connections.map(|m| m.get()),
                load_estimate: b.stats.load_estimate(),
                reported_in_flight: b.stats.reported_in_flight(),
            }),
            name: b.name.clone(),
            ..BackendSample::of(owner, pool.name(), b.addr, &b.stats)
        })
    }

    /// Its `listener` (or `pool`) and `backend` labels.
    fn labels(&self) -> [(&'static str, &str); 2] {
        [(self.owner, &self.pool), ("backend", &self.addr)]
    }
}

/// The label naming a backend's pool: `listener` for a listener's own pool, as every backend
/// series had before pools were named apart (its value, the pool's name, is the listener's),
/// and `pool` for a `[[pool]]`.
fn owner_label(inline: bool) -> &'static str {
    if inline { "listener" } else { "pool" }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = self.handle.snapshot();
        let listeners: Vec<ListenerSample> = snapshot
            .listeners()
            .map(|l| ListenerSample::of(l))
            .collect();
        let pools: Vec<PoolSample> = snapshot.pools().map(|p| PoolSample::of(p)).collect();
        let mut backends: Vec<BackendSample> = snapshot
            .pools()
            .flat_map(|p| BackendSample::configured(p))
            .collect();
        backends.extend(self.handle.removed_backends(&snapshot).iter().map(|r| {
            // A removed pool's kind is unknown now: named as a listener's own pool if a
            // listener of its name is configured... or was. The name is what matters.
            let inline = snapshot.pool(&r.pool).is_none_or(|p| p.inline());
            BackendSample::of(owner_label(inline), &r.pool, r.addr, &r.state)
        }));
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
            "Client connections closed without being relayed, by reason: max_connections were open, no backend could be reached, none was healthy under all_unhealthy = \"reject\", no slot came free within queue_timeout, the pool's queue was full, the client was waiting when the balancer stopped or its pool lost its listeners, its PROXY header was missing, malformed, late or untrusted, its address was not allowed or denied, it was over its per-client connection or rate limit, its TLS ClientHello was malformed, too large or late, or no route matched its server name.",
            listeners.iter().flat_map(|l| {
                [
                    ("max_connections", l.counters.rejected_max_connections),
                    ("no_backend", l.counters.rejected_no_backend),
                    ("all_unhealthy", l.counters.rejected_all_unhealthy),
                    ("queue_timeout", l.counters.rejected_queue_timeout),
                    ("queue_full", l.counters.rejected_queue_full),
                    ("shutdown", l.counters.rejected_shutdown),
                    ("pool_removed", l.counters.rejected_pool_removed),
                    ("bad_proxy_header", l.counters.rejected_bad_proxy_header),
                    ("denied", l.counters.rejected_denied),
                    ("client_limit", l.counters.rejected_client_limit),
                    ("client_rate", l.counters.rejected_client_rate),
                    ("bad_client_hello", l.counters.rejected_bad_client_hello),
                    ("no_route", l.counters.rejected_no_route),
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
            every().flat_map(|([owner, backend], b)| {
                [
                    ("to_backend", b.counters.bytes_to_backend),
                    ("from_backend", b.counters.bytes_from_backend),
                ]
                .map(|(direction, n)| ([owner, backend, ("direction", direction)], n))
            }),
        )?;
        counter(
            e,
            "weighbridge_backend_spliced_bytes",
            "Of weighbridge_backend_bytes, those moved by splice(2), never entering user space.",
            every().flat_map(|([owner, backend], b)| {
                [
                    ("to_backend", b.counters.spliced_to_backend),
                    ("from_backend", b.counters.spliced_from_backend),
                ]
                .map(|(direction, n)| ([owner, backend, ("direction", direction)], n))
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

        gauge(
            e,
            "weighbridge_backend_max_connections",
            "Slots: connections the backend takes through this balancer at most (only backends with max_connections).",
            in_rotation().filter_map(|(labels, r)| Some((labels, u64::from(r.max_connections?)))),
        )?;
        gauge(
            e,
            "weighbridge_backend_load_estimate",
            "Connections open to the backend plus the load it last reported beyond them: what fills slots and what capacity_proportional ranks by.",
            in_rotation().map(|(labels, r)| (labels, r.load_estimate)),
        )?;
        gauge(
            e,
            "weighbridge_backend_reported_in_flight",
            "Requests in flight (running + waiting) the server reported at its last fresh scrape (only backends with one).",
            in_rotation().filter_map(|(labels, r)| Some((labels, r.reported_in_flight?))),
        )?;

        gauge(
            e,
            "weighbridge_pool_queue_length",
            "Clients waiting in the pool's queue for a free slot now.",
            pools.iter().map(|p| (p.labels(), p.queue.length)),
        )?;
        histogram(
            e,
            "weighbridge_pool_queue_wait_seconds",
            "How long the clients that got a slot from the queue waited for it.",
            pools.iter().map(|p| (p.labels(), &p.wait)),
        )?;
        let queue_counters: [QueueCounter; 6] = [
            (
                "weighbridge_pool_queued",
                "Clients that joined the pool's queue.",
                |q| q.queued,
            ),
            (
                "weighbridge_pool_queue_served",
                "Clients that got a slot from the queue.",
                |q| q.served,
            ),
            (
                "weighbridge_pool_queue_timed_out",
                "Clients closed after waiting queue_timeout without a slot.",
                |q| q.timed_out,
            ),
            (
                "weighbridge_pool_queue_full",
                "Clients closed at once because max_queued were waiting (or queue_timeout is 0).",
                |q| q.full,
            ),
            (
                "weighbridge_pool_queue_abandoned",
                "Clients that disconnected while waiting.",
                |q| q.abandoned,
            ),
            (
                "weighbridge_pool_queue_closed",
                "Waiting clients closed because the balancer stopped or the pool lost its listeners.",
                |q| q.closed,
            ),
        ];
        for (name, help, value) in queue_counters {
            counter(
                e,
                name,
                help,
                pools.iter().map(|p| (p.labels(), value(&p.queue))),
            )?;
        }

        let names: Vec<(String, crate::state::NameStatus)> = self
            .handle
            .names()
            .into_iter()
            .map(|(target, status)| (target.to_string(), status))
            .collect();
        gauge(
            e,
            "weighbridge_resolve_addresses",
            "Addresses a backend name resolves to now (the last good answer, kept through failures).",
            names
                .iter()
                .map(|(name, status)| ([("name", name.as_str())], status.addresses.len() as u64)),
        )?;
        counter(
            e,
            "weighbridge_resolve_failures",
            "Failed resolutions of a backend name, by reason (timeout, nxdomain, servfail, refused, empty, no_nameserver, error).",
            names.iter().flat_map(|(name, status)| {
                status.failures.iter().map(move |(reason, count)| {
                    ([("name", name.as_str()), ("reason", *reason)], *count)
                })
            }),
        )?;
        gauge(
            e,
            "weighbridge_backend_info",
            "Always 1, for each backend resolved from a name: the name label says which.",
            backends.iter().filter_map(|b| {
                let [owner, backend] = b.labels();
                Some(([owner, backend, ("name", b.name.as_deref()?)], 1_u64))
            }),
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
        // The two gauges every Prometheus client library exports under these names, so the
        // usual alerts and dashboards for running out of descriptors work unchanged. A value
        // the system cannot give is left out of the scrape rather than reported as 0.
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds().map(|n| (NO_LABELS, n)),
        )?;
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
            max_fds().map(|n| (NO_LABELS, n)),
        )?;
        Ok(())
    }
}

/// The label set of a series without labels.
const NO_LABELS: [(&str, &str); 0] = [];

/// Descriptors the process has open, counted in `/proc/self/fd` (Linux), not counting the one
/// the count reads the directory through. `None` where there is no such directory or it
/// cannot be read (it can when the descriptors have run out: the scrape then leaves the
/// gauge out, and `process_max_fds` stays).
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let listed = entries.filter(Result::is_ok).count() as u64;
    Some(listed.saturating_sub(1))
}

/// The soft limit on open descriptors, which is what `accept` runs into; `None` if the system
/// does not say. Unlimited reads as the largest `u64`.
fn max_fds() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _hard)| soft)
}

/// A queue counter family: name, help, and how to read it.
type QueueCounter = (&'static str, &'static str, fn(&QueueCounters) -> u64);

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
