//! The model's rows, rates and keys, over a fleet of known readings.

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
                routes: Vec::new(),
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
