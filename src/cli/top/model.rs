//! What `top` shows, as plain data: the last two readings, the rows and rates derived from them,
//! and the operator's choices (sort, filter, selection, a pending confirmation). Keys change it
//! through [`Model::on_key`]; nothing here touches the terminal or the network.

use std::time::Duration;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::cli::ctl::Action;
use crate::cli::failure::Failure;
use crate::cli::status::Reading;

/// A reading and when it was taken (time since `top` started).
#[derive(Debug, Clone)]
pub(crate) struct Scrape {
    pub(crate) reading: Reading,
    pub(crate) taken: Duration,
}

/// What the table is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SortKey {
    /// Pool, then address: the order of the file.
    Name,
    /// Worst state first.
    State,
    Open,
    ConnRate,
    Bytes,
    ConnectP99,
}

impl SortKey {
    const ALL: [SortKey; 6] = [
        SortKey::Name,
        SortKey::State,
        SortKey::Open,
        SortKey::ConnRate,
        SortKey::Bytes,
        SortKey::ConnectP99,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::State => "state",
            SortKey::Open => "open",
            SortKey::ConnRate => "conn/s",
            SortKey::Bytes => "bytes/s",
            SortKey::ConnectP99 => "p99",
        }
    }

    fn next(self) -> SortKey {
        let at = SortKey::ALL.iter().position(|k| *k == self).unwrap_or(0);
        SortKey::ALL[(at + 1) % SortKey::ALL.len()]
    }
}

/// An action waiting for the operator's yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) action: Action,
    pub(crate) pool: String,
    pub(crate) addr: String,
}

/// What a key asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    None,
    Quit,
    Act(Pending),
}

/// One backend's line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) pool: String,
    pub(crate) addr: String,
    /// `healthy`, `ramping`, `starting`, `drained`, `ejected` or `unhealthy`.
    pub(crate) state: &'static str,
    /// The state with its reason (`unhealthy: http 503`).
    pub(crate) state_text: String,
    /// The state differs from the previous reading's (or the backend is new).
    pub(crate) changed: bool,
    pub(crate) weight: f64,
    pub(crate) effective: f64,
    pub(crate) open: u64,
    pub(crate) slots: Option<u32>,
    pub(crate) load: u64,
    /// Clients waiting in its pool's queue.
    pub(crate) queue: u64,
    pub(crate) connections: u64,
    pub(crate) failures: u64,
    /// Per second over the last interval; `None` before two readings.
    pub(crate) conn_rate: Option<f64>,
    /// Bytes per second to the backend (client requests).
    pub(crate) in_rate: Option<f64>,
    /// Bytes per second from the backend (its answers).
    pub(crate) out_rate: Option<f64>,
    /// Connect time p99 over the last interval, in seconds; `None` without a connect in it.
    pub(crate) p99: Option<f64>,
}

/// Fleet-wide figures for the header.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Totals {
    pub(crate) open: u64,
    pub(crate) queued: u64,
    pub(crate) accept_rate: Option<f64>,
    pub(crate) reject_rate: Option<f64>,
    pub(crate) in_rate: Option<f64>,
    pub(crate) out_rate: Option<f64>,
}

/// Everything `top` draws.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    /// The endpoint's address, shown in the header.
    pub(crate) endpoint: String,
    pub(crate) interval: Duration,
    pub(crate) current: Option<Scrape>,
    pub(crate) previous: Option<Scrape>,
    /// Why the last reading failed; the last good data stays on screen meanwhile.
    pub(crate) error: Option<String>,
    /// The outcome of the last action, or news such as a restart.
    pub(crate) notice: Option<String>,
    pub(crate) sort: SortKey,
    pub(crate) descending: bool,
    /// A listener or pool name: only its pool's backends are shown.
    pub(crate) filter: Option<String>,
    /// Index into the rows as shown.
    pub(crate) selected: usize,
    pub(crate) confirm: Option<Pending>,
    /// False under NO_COLOR: states are told by text and markers alone.
    pub(crate) color: bool,
}

impl Model {
    pub(crate) fn new(endpoint: &str, interval: Duration, color: bool) -> Model {
        Model {
            endpoint: endpoint.to_owned(),
            interval,
            current: None,
            previous: None,
            error: None,
            notice: None,
            sort: SortKey::Name,
            descending: false,
            filter: None,
            selected: 0,
            confirm: None,
            color,
        }
    }

    /// Takes in a reading, or the failure to get one.
    pub(crate) fn on_reading(&mut self, reading: Result<Reading, Failure>, taken: Duration) {
        let reading = match reading {
            Ok(reading) => reading,
            Err(failure) => {
                self.error = Some(failure.message().to_owned());
                return;
            }
        };
        let scrape = Scrape { reading, taken };
        let restarted = self.current.as_ref().is_some_and(|c| {
            let (was, now) = (&c.reading.status, &scrape.reading.status);
            was.started_at != now.started_at
                || matches!((was.uptime_seconds, now.uptime_seconds), (Some(a), Some(b)) if b < a)
        });
        if restarted {
            // Counters began again: a delta across the restart would be meaningless.
            self.previous = None;
            self.notice = Some("the balancer restarted; rates start again".to_owned());
        } else {
            self.previous = self.current.take();
        }
        self.current = Some(scrape);
        self.error = None;
        let shown = self.rows().len();
        self.selected = self.selected.min(shown.saturating_sub(1));
    }

    /// The listener and pool names the filter steps through: listeners, then shared pools.
    pub(crate) fn filters(&self) -> Vec<String> {
        let Some(current) = &self.current else {
            return Vec::new();
        };
        let status = &current.reading.status;
        status
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .chain(
                status
                    .pools
                    .iter()
                    .filter(|p| !p.inline)
                    .map(|p| p.name.clone()),
            )
            .collect()
    }

    /// The pool the filter shows, if one is set.
    fn filtered_pool(&self) -> Option<String> {
        let filter = self.filter.as_ref()?;
        let status = &self.current.as_ref()?.reading.status;
        Some(
            status
                .listeners
                .iter()
                .find(|l| &l.name == filter)
                .map_or_else(|| filter.clone(), |l| l.pool.clone()),
        )
    }

    /// Seconds between the two readings, when there are two.
    fn elapsed(&self) -> Option<f64> {
        let (current, previous) = (self.current.as_ref()?, self.previous.as_ref()?);
        let seconds = current.taken.checked_sub(previous.taken)?.as_secs_f64();
        (seconds > 0.0).then_some(seconds)
    }

    /// The rows as shown: filtered and sorted.
    pub(crate) fn rows(&self) -> Vec<Row> {
        let Some(current) = &self.current else {
            return Vec::new();
        };
        let elapsed = self.elapsed();
        let previous = self.previous.as_ref();
        let rate = |now: u64, was: Option<u64>| -> Option<f64> {
            Some(now.checked_sub(was?)? as f64 / elapsed?)
        };
        let pool_filter = self.filtered_pool();
        let mut rows: Vec<Row> = current
            .reading
            .status
            .backends()
            .filter(|(pool, _)| pool_filter.as_ref().is_none_or(|f| *f == pool.name))
            .map(|(pool, b)| {
                let key = (pool.name.clone(), b.addr.clone());
                let before = previous.and_then(|p| {
                    p.reading
                        .status
                        .backends()
                        .find(|(pp, pb)| pp.name == pool.name && pb.addr == b.addr)
                        .map(|(_, pb)| pb)
                });
                let p99 = match (current.reading.connect.get(&key), previous) {
                    (Some(now), Some(p)) => p
                        .reading
                        .connect
                        .get(&key)
                        .and_then(|was| now.since(was))
                        .and_then(|delta| delta.quantile(0.99)),
                    _ => None,
                };
                Row {
                    pool: pool.name.clone(),
                    addr: b.addr.clone(),
                    state: b.state(),
                    state_text: b.state_with_reason(),
                    changed: previous.is_some() && before.is_none_or(|p| p.state() != b.state()),
                    weight: b.weight,
                    effective: b.effective_weight,
                    open: b.active_connections,
                    slots: b.max_connections,
                    load: b.load_estimate,
                    queue: pool.queue.length,
                    connections: b.connections_total,
                    failures: b.connect_failures,
                    conn_rate: rate(b.connections_total, before.map(|p| p.connections_total)),
                    in_rate: rate(b.bytes_to_backend, before.map(|p| p.bytes_to_backend)),
                    out_rate: rate(b.bytes_from_backend, before.map(|p| p.bytes_from_backend)),
                    p99,
                }
            })
            .collect();
        let severity = |state: &str| match state {
            "unhealthy" => 0,
            "ejected" => 1,
            "drained" => 2,
            "starting" => 3,
            "ramping" => 4,
            _ => 5,
        };
        let number = |x: Option<f64>| x.unwrap_or(-1.0);
        match self.sort {
            SortKey::Name => {}
            SortKey::State => rows.sort_by_key(|r| severity(r.state)),
            // The busiest first: what an operator sorts by a figure for.
            SortKey::Open => rows.sort_by_key(|r| std::cmp::Reverse(r.open)),
            SortKey::ConnRate => {
                rows.sort_by(|a, b| number(b.conn_rate).total_cmp(&number(a.conn_rate)));
            }
            SortKey::Bytes => rows.sort_by(|a, b| {
                let sum = |r: &Row| number(r.in_rate) + number(r.out_rate);
                sum(b).total_cmp(&sum(a))
            }),
            SortKey::ConnectP99 => rows.sort_by(|a, b| number(b.p99).total_cmp(&number(a.p99))),
        }
        if self.descending {
            rows.reverse();
        }
        rows
    }

    /// Fleet-wide figures over the listeners, rates over the last interval.
    pub(crate) fn totals(&self) -> Totals {
        let Some(current) = &self.current else {
            return Totals::default();
        };
        let status = &current.reading.status;
        let elapsed = self.elapsed();
        let previous = self.previous.as_ref().map(|p| &p.reading.status);
        let rate = |now: u64, was: Option<u64>| -> Option<f64> {
            Some(now.checked_sub(was?)? as f64 / elapsed?)
        };
        let sum_listeners =
            |s: &crate::cli::status::Status,
             f: &dyn Fn(&crate::cli::status::ListenerConnections) -> u64| {
                s.listeners.iter().map(|l| f(&l.connections)).sum::<u64>()
            };
        let sum_backends =
            |s: &crate::cli::status::Status,
             f: &dyn Fn(&crate::cli::status::BackendStatus) -> u64| {
                s.backends().map(|(_, b)| f(b)).sum::<u64>()
            };
        Totals {
            open: sum_listeners(status, &|c| c.open),
            queued: status.pools.iter().map(|p| p.queue.length).sum(),
            accept_rate: rate(
                sum_listeners(status, &|c| c.accepted),
                previous.map(|p| sum_listeners(p, &|c| c.accepted)),
            ),
            reject_rate: rate(
                sum_listeners(status, &|c| c.rejected()),
                previous.map(|p| sum_listeners(p, &|c| c.rejected())),
            ),
            in_rate: rate(
                sum_backends(status, &|b| b.bytes_to_backend),
                previous.map(|p| sum_backends(p, &|b| b.bytes_to_backend)),
            ),
            out_rate: rate(
                sum_backends(status, &|b| b.bytes_from_backend),
                previous.map(|p| sum_backends(p, &|b| b.bytes_from_backend)),
            ),
        }
    }

    /// Applies a key; returns what the loop should do.
    pub(crate) fn on_key(&mut self, key: KeyEvent) -> Command {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Command::Quit;
        }
        if let Some(pending) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y' | 'Y') | KeyCode::Enter => Command::Act(pending),
                _ => {
                    self.notice = Some("cancelled".to_owned());
                    Command::None
                }
            };
        }
        let shown = self.rows().len();
        match key.code {
            KeyCode::Char('q' | 'Q') => return Command::Quit,
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(shown.saturating_sub(1));
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Home | KeyCode::Char('g') => self.selected = 0,
            KeyCode::End | KeyCode::Char('G') => self.selected = shown.saturating_sub(1),
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('S') => self.descending = !self.descending,
            KeyCode::Char('f') => {
                let filters = self.filters();
                self.filter = match &self.filter {
                    None => filters.first().cloned(),
                    Some(now) => {
                        let at = filters.iter().position(|f| f == now);
                        at.and_then(|at| filters.get(at + 1)).cloned()
                    }
                };
                self.selected = 0;
            }
            KeyCode::Char('F') => {
                self.filter = None;
                self.selected = 0;
            }
            KeyCode::Char('d') => self.ask(Action::Drain),
            KeyCode::Char('e') => self.ask(Action::Enable),
            _ => {}
        }
        Command::None
    }

    /// Asks to confirm `action` on the selected backend.
    fn ask(&mut self, action: Action) {
        if let Some(row) = self.rows().get(self.selected) {
            self.confirm = Some(Pending {
                action,
                pool: row.pool.clone(),
                addr: row.addr.clone(),
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cli::status::{
        BackendStatus, HealthStatus, Histogram, ListenerConnections, ListenerStatus, PoolStatus,
        QueueStatus, Status,
    };

    fn backend(addr: &str, connections: u64, bytes: u64, open: u64) -> BackendStatus {
        BackendStatus {
            addr: addr.to_owned(),
            weight: 2.0,
            effective_weight: 2.0,
            admin_state: "ready".into(),
            health: HealthStatus {
                healthy: true,
                status: "healthy".into(),
                ..HealthStatus::default()
            },
            active_connections: open,
            max_connections: Some(16),
            connections_total: connections,
            bytes_to_backend: bytes,
            bytes_from_backend: bytes * 4,
            ..BackendStatus::default()
        }
    }

    /// A fleet of two listeners, one of them on a shared pool of three backends, at `t`
    /// seconds into a steady load: each backend of `llama` opens 10 connections a second and
    /// the second one is drained from t = 10 on.
    pub(crate) fn reading(t: u64) -> Reading {
        let mut drained = backend("10.0.0.6:8000", 5 * t, 1000 * t, 1);
        if t >= 10 {
            drained.admin_state = "drained".into();
            drained.effective_weight = 0.0;
        }
        let mut unhealthy = backend("10.0.0.7:8000", 0, 0, 0);
        unhealthy.health = HealthStatus {
            healthy: false,
            status: "unhealthy".into(),
            last_check: Some("http 503".into()),
            ..HealthStatus::default()
        };
        unhealthy.effective_weight = 0.0;
        let status = Status {
            version: "0.1.0".into(),
            started_at: Some("2026-12-01T00:00:00Z".into()),
            uptime_seconds: Some(3600.0 + t as f64),
            listeners: vec![
                ListenerStatus {
                    name: "chat".into(),
                    bind: Some("0.0.0.0:8000".into()),
                    pool: "llama".into(),
                    strategy: "capacity_proportional".into(),
                    connections: ListenerConnections {
                        open: 13,
                        accepted: 15 * t,
                        ..ListenerConnections::default()
                    },
                },
                ListenerStatus {
                    name: "embed".into(),
                    bind: Some("0.0.0.0:8001".into()),
                    pool: "embed".into(),
                    strategy: "weighted_round_robin".into(),
                    ..ListenerStatus::default()
                },
            ],
            pools: vec![
                PoolStatus {
                    name: "llama".into(),
                    listeners: vec!["chat".into()],
                    strategy: "capacity_proportional".into(),
                    queue: QueueStatus {
                        length: 2,
                        ..QueueStatus::default()
                    },
                    backends: vec![
                        backend("10.0.0.5:8000", 10 * t, 2000 * t, 12),
                        drained,
                        unhealthy,
                    ],
                    ..PoolStatus::default()
                },
                PoolStatus {
                    name: "embed".into(),
                    inline: true,
                    listeners: vec!["embed".into()],
                    strategy: "weighted_round_robin".into(),
                    backends: vec![backend("10.0.1.5:9000", 0, 0, 0)],
                    ..PoolStatus::default()
                },
            ],
            ..Status::default()
        };
        let mut connect = std::collections::HashMap::new();
        connect.insert(
            ("llama".to_owned(), "10.0.0.5:8000".to_owned()),
            Histogram(vec![
                (0.0005, 9 * t),
                (0.002, 10 * t),
                (f64::INFINITY, 10 * t),
            ]),
        );
        Reading {
            status,
            raw: String::new(),
            connect,
        }
    }

    /// A model after readings at t = 8 and t = 10 (one interval of 2 s).
    pub(crate) fn model(color: bool) -> Model {
        let mut model = Model::new("127.0.0.1:9900", Duration::from_secs(1), color);
        model.on_reading(Ok(reading(8)), Duration::from_secs(8));
        model.on_reading(Ok(reading(10)), Duration::from_secs(10));
        model
    }

    #[test]
    fn rates_come_from_the_deltas_of_two_readings() {
        let model = model(true);
        let rows = model.rows();
        assert_eq!(rows.len(), 4);
        let first = &rows[0];
        assert_eq!(first.conn_rate, Some(10.0));
        assert_eq!(first.in_rate, Some(2000.0));
        assert_eq!(first.out_rate, Some(8000.0));
        assert_eq!(
            first.p99,
            Some(0.002),
            "2 of 20 connects in the interval took > 0.5 ms"
        );
        assert!(!first.changed);
        assert!(rows[1].changed, "drained between the readings");
        let totals = model.totals();
        assert_eq!((totals.open, totals.queued), (13, 2));
        assert_eq!(totals.accept_rate, Some(15.0));
    }

    #[test]
    fn one_reading_has_no_rates_and_a_restart_starts_them_again() {
        let mut model = Model::new("lb", Duration::from_secs(1), true);
        model.on_reading(Ok(reading(8)), Duration::from_secs(1));
        assert_eq!(model.rows()[0].conn_rate, None);
        let mut restarted = reading(10);
        restarted.status.started_at = Some("2026-12-01T01:00:00Z".into());
        model.on_reading(Ok(reading(9)), Duration::from_secs(2));
        model.on_reading(Ok(restarted), Duration::from_secs(3));
        assert_eq!(model.rows()[0].conn_rate, None);
        assert!(
            model
                .notice
                .as_deref()
                .is_some_and(|n| n.contains("restarted"))
        );
        model.on_reading(
            Err(Failure::Unreachable("cannot reach it".into())),
            Duration::from_secs(4),
        );
        assert_eq!(model.error.as_deref(), Some("cannot reach it"));
        assert_eq!(model.rows().len(), 4, "the last data stays");
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn keys_sort_filter_select_and_confirm() {
        let mut model = model(true);
        model.on_key(key(KeyCode::Char('s')));
        assert_eq!(model.sort, SortKey::State);
        assert_eq!(
            model.rows()[0].addr,
            "10.0.0.7:8000",
            "the unhealthy one first"
        );
        model.on_key(key(KeyCode::Char('s')));
        assert_eq!(model.rows()[0].addr, "10.0.0.5:8000", "the busiest first");

        model.on_key(key(KeyCode::Char('f')));
        assert_eq!(model.filter.as_deref(), Some("chat"));
        assert_eq!(model.rows().len(), 3, "chat's pool, llama");
        model.on_key(key(KeyCode::Char('f')));
        assert_eq!(model.filter.as_deref(), Some("embed"));
        assert_eq!(model.rows().len(), 1);
        model.on_key(key(KeyCode::Char('f')));
        assert_eq!(model.filter.as_deref(), Some("llama"));
        model.on_key(key(KeyCode::Char('F')));
        assert_eq!(model.filter, None);

        model.sort = SortKey::Name;
        model.on_key(key(KeyCode::Down));
        assert_eq!(model.on_key(key(KeyCode::Char('e'))), Command::None);
        let pending = model.confirm.clone().expect("asks first");
        assert_eq!(pending.addr, "10.0.0.6:8000");
        assert_eq!(model.on_key(key(KeyCode::Char('y'))), Command::Act(pending));
        model.on_key(key(KeyCode::Char('d')));
        assert_eq!(model.on_key(key(KeyCode::Esc)), Command::None);
        assert_eq!(model.confirm, None);
        assert_eq!(model.on_key(key(KeyCode::Char('q'))), Command::Quit);
    }
}
