//! What a reload changed, and why one was refused.
//!
//! A reload is all or nothing. The file is read and validated with the same code as `--check`;
//! every listener that needs a new socket is bound; only then is the new snapshot swapped in.
//! Any failure on the way leaves the running configuration fully in force. The work itself is
//! done by the control task (`control::reload`); this module holds the vocabulary.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::config::{Config, ConfigError, CongestionControl, Forward, ListenerConfig, PoolConfig};
use crate::control::listeners::describe_routes;
use crate::dataplane::accept::BindError;

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file is unusable; the message is the one `--check` prints.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A new or moved listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The balancer was started without a file to reload from.
    #[error("no configuration file to reload from")]
    NoConfigFile,
    /// The balancer has stopped.
    #[error("the balancer is shutting down")]
    ShuttingDown,
}

/// What a successful reload changed, for the one summary log line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadSummary {
    /// Listeners that are new.
    pub listeners_added: Vec<String>,
    /// Listeners that are gone (their open connections go on).
    pub listeners_removed: Vec<String>,
    /// Listeners whose settings changed, as `name (key old->new, ...)`: any listener key and,
    /// for a listener with its own (inline) pool, what changed in that pool: strategy, queue
    /// keys, a health or passive table (by name), a backend's `health_addr` or
    /// `max_connections`; weights are listed apart.
    pub listeners_changed: Vec<String>,
    /// `[[pool]]`s that are new.
    pub pools_added: Vec<String>,
    /// `[[pool]]`s that are gone.
    pub pools_removed: Vec<String>,
    /// `[[pool]]`s whose settings changed, as listeners' are listed.
    pub pools_changed: Vec<String>,
    /// Backends that are new, as `pool/address` (a listener's own pool has its name).
    pub backends_added: Vec<String>,
    /// Backends that are gone, as `pool/address`.
    pub backends_removed: Vec<String>,
    /// Backends whose weight changed, as `pool/address old->new`.
    pub weights_changed: Vec<String>,
    /// Top-level and `[log]` settings applied by this reload, as `key old->new`.
    pub settings_changed: Vec<String>,
    /// Settings changed in the file that only a restart applies (`[admin]`, `[log] format`);
    /// the values in force stay as they were.
    pub needs_restart: Vec<String>,
}

impl ReloadSummary {
    /// Compares two configurations.
    pub fn between(old: &Config, new: &Config) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        summary.compare_settings(old, new);
        let old_pools: HashMap<&str, &PoolConfig> =
            old.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        // What changed in each inline pool is told with its listener.
        let mut inline_changes: HashMap<&str, Vec<String>> = HashMap::new();
        for pool in &new.pools {
            let Some(before) = old_pools.get(pool.name.as_str()) else {
                if !pool.inline {
                    summary.pools_added.push(pool.name.clone());
                }
                summary
                    .backends_added
                    .extend(pool.backends.iter().map(|b| backend_key(pool, b.addr)));
                continue;
            };
            let changed = changed_pool_settings(before, pool);
            if pool.inline && before.inline {
                inline_changes.insert(&pool.name, changed);
            } else if !changed.is_empty() {
                summary
                    .pools_changed
                    .push(format!("{} ({})", pool.name, changed.join(", ")));
            }
            let old_weights: HashMap<SocketAddr, f64> = before
                .backends
                .iter()
                .map(|b| (b.addr, b.weight.get()))
                .collect();
            for backend in &pool.backends {
                let key = backend_key(pool, backend.addr);
                match old_weights.get(&backend.addr) {
                    None => summary.backends_added.push(key),
                    Some(&w) if w != backend.weight.get() => summary
                        .weights_changed
                        .push(format!("{key} {w}->{}", backend.weight)),
                    Some(_) => {}
                }
            }
            for backend in &before.backends {
                if !pool.backends.iter().any(|b| b.addr == backend.addr) {
                    summary
                        .backends_removed
                        .push(backend_key(pool, backend.addr));
                }
            }
        }
        for pool in &old.pools {
            if new.pool(&pool.name).is_none() {
                if !pool.inline {
                    summary.pools_removed.push(pool.name.clone());
                }
                summary
                    .backends_removed
                    .extend(pool.backends.iter().map(|b| backend_key(pool, b.addr)));
            }
        }
        let old_by_name: HashMap<&str, &ListenerConfig> =
            old.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        for listener in &new.listeners {
            let Some(before) = old_by_name.get(listener.name.as_str()) else {
                summary.listeners_added.push(listener.name.clone());
                continue;
            };
            let mut changed = changed_settings(before, listener);
            if let Forward::Pool(pool) = &listener.forward
                && let Some(pool) = inline_changes.remove(pool.as_str())
            {
                changed.extend(pool);
            }
            if !changed.is_empty() {
                summary.listeners_changed.push(format!(
                    "{} ({})",
                    listener.name,
                    changed.join(", ")
                ));
            }
        }
        for listener in &old.listeners {
            if !new.listeners.iter().any(|l| l.name == listener.name) {
                summary.listeners_removed.push(listener.name.clone());
            }
        }
        summary
    }

    /// Compares what lies outside the listeners.
    fn compare_settings(&mut self, old: &Config, new: &Config) {
        if old.shutdown_grace != new.shutdown_grace {
            self.settings_changed.push(format!(
                "shutdown_grace {}->{}",
                humantime::format_duration(old.shutdown_grace),
                humantime::format_duration(new.shutdown_grace)
            ));
        }
        if old.log.access_log != new.log.access_log {
            self.settings_changed.push(format!(
                "[log] access_log {}->{}",
                old.log.access_log, new.log.access_log
            ));
        }
        if old.threads != new.threads {
            let show = |t: Option<NonZeroUsize>| t.map_or("cores".to_owned(), |t| t.to_string());
            self.needs_restart.push(format!(
                "threads {}->{}",
                show(old.threads),
                show(new.threads)
            ));
        }
        if old.log.format != new.log.format {
            self.needs_restart.push(format!(
                "[log] format {}->{}",
                old.log.format.as_str(),
                new.log.format.as_str()
            ));
        }
        let bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
        if bind(old) != bind(new) {
            let show = |b: Option<SocketAddr>| b.map_or("none".to_owned(), |b| b.to_string());
            self.needs_restart.push(format!(
                "[admin] bind {}->{}",
                show(bind(old)),
                show(bind(new))
            ));
        }
        let token = |c: &Config| c.admin.as_ref().and_then(|a| a.token.clone());
        if token(old) != token(new) {
            // Never the values: they are secrets.
            self.needs_restart.push("[admin] token".to_owned());
        }
    }

    /// True when the new configuration is the same as the old one.
    pub fn is_empty(&self) -> bool {
        *self == ReloadSummary::default()
    }
}

/// How the summary names a backend: `pool/address`.
fn backend_key(pool: &PoolConfig, addr: SocketAddr) -> String {
    format!("{}/{addr}", pool.name)
}

fn key<T: PartialEq + fmt::Display>(out: &mut Vec<String>, name: &str, old: T, new: T) {
    if old != new {
        out.push(format!("{name} {old}->{new}"));
    }
}

/// Where a listener's connections go, for a reload line.
fn forward(f: &Forward) -> String {
    match f {
        Forward::Pool(pool) => format!("pool {pool}"),
        Forward::Routes(routes) => describe_routes(routes),
    }
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// What differs between two versions of a listener: each key as `key old->new`. An operator
/// reading the reload line sees what it did (that a bind moved, and where), not only which
/// listener it touched.
fn changed_settings(a: &ListenerConfig, b: &ListenerConfig) -> Vec<String> {
    let cc = |c: Option<CongestionControl>| c.map_or("system".to_owned(), |c| c.to_string());
    let mut out = Vec::new();
    key(&mut out, "bind", a.bind, b.bind);
    match (&a.forward, &b.forward) {
        (Forward::Pool(old), Forward::Pool(new)) => key(&mut out, "pool", old, new),
        (old, new) => key(&mut out, "routes", forward(old), forward(new)),
    }
    key(
        &mut out,
        "client_hello_timeout",
        duration(a.client_hello_timeout),
        duration(b.client_hello_timeout),
    );
    let timeouts = [
        ("connect_timeout", a.connect_timeout, b.connect_timeout),
        ("idle_timeout", a.idle_timeout, b.idle_timeout),
    ];
    for (name, old, new) in timeouts {
        key(&mut out, name, duration(old), duration(new));
    }
    key(
        &mut out,
        "connect_attempts",
        a.connect_attempts,
        b.connect_attempts,
    );
    key(
        &mut out,
        "max_connections",
        a.max_connections,
        b.max_connections,
    );
    key(&mut out, "splice", a.splice, b.splice);
    key(
        &mut out,
        "backend_congestion_control",
        cc(a.backend_congestion_control),
        cc(b.backend_congestion_control),
    );
    out
}

/// What differs between two versions of a pool, apart from its backends' weights: each key as
/// `key old->new`, a health or passive table by its name, and a backend whose `health_addr` or
/// `max_connections` changed.
fn changed_pool_settings(a: &PoolConfig, b: &PoolConfig) -> Vec<String> {
    let table = if b.inline { "listener" } else { "pool" };
    let slots = |s: Option<NonZeroU32>| s.map_or("none".to_owned(), |s| s.to_string());
    let mut out = Vec::new();
    // Position kept from before pools: a listener's strategy change reads as it always did.
    key(&mut out, "strategy", a.strategy, b.strategy);
    key(
        &mut out,
        "queue_timeout",
        duration(a.queue_timeout),
        duration(b.queue_timeout),
    );
    key(&mut out, "max_queued", a.max_queued, b.max_queued);
    if a.health != b.health {
        out.push(format!("[{table}.health]"));
    }
    if a.passive != b.passive {
        out.push(format!("[{table}.passive]"));
    }
    for new in &b.backends {
        let Some(old) = a.backends.iter().find(|o| o.addr == new.addr) else {
            continue;
        };
        // Where probes go, not what was written: `health_addr` equal to `addr` changes nothing.
        if old.probe_addr() != new.probe_addr() {
            out.push(format!(
                "{} health_addr {}->{}",
                new.addr,
                old.probe_addr(),
                new.probe_addr()
            ));
        }
        if old.max_connections != new.max_connections {
            out.push(format!(
                "{} max_connections {}->{}",
                new.addr,
                slots(old.max_connections),
                slots(new.max_connections)
            ));
        }
    }
    out
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let parts = [
            ("listeners added", &self.listeners_added),
            ("listeners removed", &self.listeners_removed),
            ("listeners changed", &self.listeners_changed),
            ("pools added", &self.pools_added),
            ("pools removed", &self.pools_removed),
            ("pools changed", &self.pools_changed),
            ("backends added", &self.backends_added),
            ("backends removed", &self.backends_removed),
            ("weights changed", &self.weights_changed),
            ("settings changed", &self.settings_changed),
            ("needs a restart", &self.needs_restart),
        ];
        let mut first = true;
        for (label, items) in parts.into_iter().filter(|(_, items)| !items.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{label}: {}", items.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(text, std::path::Path::new("t.toml")).expect("valid test config")
    }

    #[test]
    fn summary_lists_every_kind_of_change() {
        let old = config(
            r#"
            [[listener]]
            name = "a"
            bind = "127.0.0.1:1"
            [[listener.backend]]
            addr = "127.0.0.1:10"
            [[listener.backend]]
            addr = "127.0.0.1:11"
            [[listener]]
            name = "gone"
            bind = "127.0.0.1:2"
            [[listener.backend]]
            addr = "127.0.0.1:20"
            "#,
        );
        let new = config(
            r#"
            [[listener]]
            name = "a"
            bind = "127.0.0.1:1"
            strategy = "weighted_random"
            [[listener.backend]]
            addr = "127.0.0.1:10"
            weight = 3
            [[listener.backend]]
            addr = "127.0.0.1:12"
            [[listener]]
            name = "new"
            bind = "127.0.0.1:3"
            [[listener.backend]]
            addr = "127.0.0.1:30"
            "#,
        );
        let summary = ReloadSummary::between(&old, &new);
        assert_eq!(summary.listeners_added, ["new"]);
        assert_eq!(summary.listeners_removed, ["gone"]);
        assert_eq!(
            summary.listeners_changed,
            ["a (strategy weighted_round_robin->weighted_random)"]
        );
        assert_eq!(
            summary.backends_added,
            ["a/127.0.0.1:12", "new/127.0.0.1:30"]
        );
        assert_eq!(
            summary.backends_removed,
            ["a/127.0.0.1:11", "gone/127.0.0.1:20"]
        );
        assert_eq!(summary.weights_changed, ["a/127.0.0.1:10 1->3"]);
        assert!(
            summary
                .to_string()
                .starts_with("listeners added: new; listeners removed: gone")
        );
        assert_eq!(ReloadSummary::between(&new, &new).to_string(), "no changes");
    }

    #[test]
    fn a_changed_listener_says_what_changed() {
        let old = config(
            r#"
            [[listener]]
            name = "a"
            bind = "127.0.0.1:1"
            [[listener.backend]]
            addr = "127.0.0.1:10"
            "#,
        );
        let new = config(
            r#"
            [[listener]]
            name = "a"
            bind = "127.0.0.1:2"
            connect_timeout = "500ms"
            idle_timeout = "1h"
            connect_attempts = 2
            max_connections = 9
            splice = false
            backend_congestion_control = "reno"
            [listener.health]
            kind = "tcp"
            [listener.passive]
            [[listener.backend]]
            addr = "127.0.0.1:10"
            health_addr = "127.0.0.1:11"
            "#,
        );
        let summary = ReloadSummary::between(&old, &new);
        assert_eq!(
            summary.to_string(),
            "listeners changed: a (bind 127.0.0.1:1->127.0.0.1:2, connect_timeout 2s->500ms, \
             idle_timeout 10m->1h, connect_attempts 3->2, max_connections 10000->9, \
             splice true->false, backend_congestion_control system->reno, [listener.health], \
             [listener.passive], 127.0.0.1:10 health_addr 127.0.0.1:10->127.0.0.1:11)"
        );
    }

    #[test]
    fn summary_tells_live_settings_from_restart_only_ones() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
                        [[listener.backend]]\naddr = \"127.0.0.1:10\"\n";
        let old = config(&format!(
            "[admin]\nbind = \"127.0.0.1:9900\"\ntoken = \"old-secret\"\n{listener}"
        ));
        let new = config(&format!(
            "shutdown_grace = \"5s\"\nthreads = 3\n[admin]\nbind = \"127.0.0.1:9901\"\ntoken = \"new-secret\"\n\
             [log]\nformat = \"json\"\naccess_log = true\n{listener}"
        ));
        let summary = ReloadSummary::between(&old, &new);
        assert_eq!(
            summary.settings_changed,
            ["shutdown_grace 30s->5s", "[log] access_log false->true"]
        );
        assert_eq!(
            summary.needs_restart,
            [
                "threads cores->3",
                "[log] format text->json",
                "[admin] bind 127.0.0.1:9900->127.0.0.1:9901",
                "[admin] token"
            ]
        );
        let line = summary.to_string();
        assert!(!line.contains("secret"), "{line}");
        assert!(
            line.contains("needs a restart: threads cores->3, [log] format"),
            "{line}"
        );
    }
}
