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
pub(crate) mod tests;
