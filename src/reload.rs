//! Reloading the configuration file: what changed, what went wrong, and the file watcher.
//!
//! A reload is all or nothing. The file is read and validated with the same code as `--check`;
//! every listener that needs a new socket is bound; only then is the new snapshot swapped in.
//! Any failure on the way leaves the running configuration fully in force. The work itself is
//! done by the balancer's control task (see `balancer`), the only writer of the snapshot; this
//! module holds the vocabulary (summary, error) and the triggers that ask for a reload.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::balancer::Handle;
use crate::config::{Config, ConfigError, CongestionControl, ListenerConfig};
use crate::listener::BindError;

/// Quiet time after the last file event before a reload starts. Editors and config-management
/// tools write a file in several steps (truncate, write, rename, chmod); reloading on the first
/// event would read a half-written file.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

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
    /// Listeners whose settings changed, as `name (key old->new, ...)`: any listener key, a
    /// health or passive table (by name), a backend's `health_addr`; weights are listed apart.
    pub listeners_changed: Vec<String>,
    /// Backends that are new, as `listener/address`.
    pub backends_added: Vec<String>,
    /// Backends that are gone, as `listener/address`.
    pub backends_removed: Vec<String>,
    /// Backends whose weight changed, as `listener/address old->new`.
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
        let old_by_name: HashMap<&str, &ListenerConfig> =
            old.listeners.iter().map(|l| (l.name.as_str(), l)).collect();
        for listener in &new.listeners {
            let Some(before) = old_by_name.get(listener.name.as_str()) else {
                summary.listeners_added.push(listener.name.clone());
                summary.backends_added.extend(
                    listener
                        .backends
                        .iter()
                        .map(|b| backend_key(listener, b.addr)),
                );
                continue;
            };
            let changed = changed_settings(before, listener);
            if !changed.is_empty() {
                summary.listeners_changed.push(format!(
                    "{} ({})",
                    listener.name,
                    changed.join(", ")
                ));
            }
            let old_weights: HashMap<SocketAddr, f64> = before
                .backends
                .iter()
                .map(|b| (b.addr, b.weight.get()))
                .collect();
            for backend in &listener.backends {
                let key = backend_key(listener, backend.addr);
                match old_weights.get(&backend.addr) {
                    None => summary.backends_added.push(key),
                    Some(&w) if w != backend.weight.get() => summary
                        .weights_changed
                        .push(format!("{key} {w}->{}", backend.weight)),
                    Some(_) => {}
                }
            }
            for backend in &before.backends {
                if !listener.backends.iter().any(|b| b.addr == backend.addr) {
                    summary
                        .backends_removed
                        .push(backend_key(listener, backend.addr));
                }
            }
        }
        for listener in &old.listeners {
            if !new.listeners.iter().any(|l| l.name == listener.name) {
                summary.listeners_removed.push(listener.name.clone());
                summary.backends_removed.extend(
                    listener
                        .backends
                        .iter()
                        .map(|b| backend_key(listener, b.addr)),
                );
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

/// How the summary names a backend: `listener/address`.
fn backend_key(listener: &ListenerConfig, addr: SocketAddr) -> String {
    format!("{}/{addr}", listener.name)
}

/// What differs between two versions of a listener, apart from its backends' weights: each
/// key as `key old->new`, a health or passive table by its name, and a backend whose
/// `health_addr` moved. An operator reading the reload line sees what it did (that a bind moved,
/// and where), not only which listener it touched.
fn changed_settings(a: &ListenerConfig, b: &ListenerConfig) -> Vec<String> {
    fn key<T: PartialEq + fmt::Display>(out: &mut Vec<String>, name: &str, old: T, new: T) {
        if old != new {
            out.push(format!("{name} {old}->{new}"));
        }
    }
    let duration = |d: Duration| humantime::format_duration(d).to_string();
    let cc = |c: Option<CongestionControl>| c.map_or("system".to_owned(), |c| c.to_string());
    let mut out = Vec::new();
    key(&mut out, "bind", a.bind, b.bind);
    key(&mut out, "strategy", a.strategy, b.strategy);
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
    if a.health != b.health {
        out.push("[listener.health]".to_owned());
    }
    if a.passive != b.passive {
        out.push("[listener.passive]".to_owned());
    }
    for new in &b.backends {
        // Where probes go, not what was written: `health_addr` equal to `addr` changes nothing.
        if let Some(old) = a.backends.iter().find(|o| o.addr == new.addr)
            && old.probe_addr() != new.probe_addr()
        {
            out.push(format!(
                "{} health_addr {}->{}",
                new.addr,
                old.probe_addr(),
                new.probe_addr()
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

/// Longest a reload waits for the writes to settle, counted from the first event: a directory
/// that never goes quiet for [`DEBOUNCE`] (a config generator rewriting every 100 ms) must not
/// hold an edit back forever.
const DEBOUNCE_CAP: Duration = Duration::from_secs(1);

/// Watches `path` and asks `handle` for a reload whenever its content changes.
///
/// The *directory* is watched, not the file: editors (vim, `sed -i`) and Kubernetes ConfigMaps
/// (a `..data` symlink swap) replace the file by rename, after which a watch on the old inode
/// would never fire again. When `path` is a symlink into another directory, that directory is
/// watched as well, and again after every change, so a link repointed to a new release
/// directory is followed. Only events that name the config (its name, its link target's name,
/// or a Kubernetes `..`-entry) count: a log file written beside it every few milliseconds must
/// not keep the debounce from ever settling. Events are debounced by [`DEBOUNCE`] (at most
/// [`DEBOUNCE_CAP`] in all), and a reload is only asked for when the file's bytes differ from
/// the last ones seen. Runs until `stop` is cancelled.
///
/// `loaded` is the text the running configuration was read from. An edit made after it was
/// read and before the watch began (while the listeners were binding) sends no event the
/// watcher can see: the file is compared with `loaded` once the watch is in place, and a
/// difference is reloaded at once.
pub fn watch(
    path: &Path,
    loaded: &str,
    handle: Handle,
    stop: CancellationToken,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let names = Arc::new(Mutex::new(Names::of(path)));
    let (events, mut rx) = mpsc::channel::<()>(16);
    let events_at_start = events.clone();
    let filter = Arc::clone(&names);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // A full channel already holds a wake-up; nothing is lost by dropping this one.
            Ok(event)
                if may_change_content(&event.kind)
                    && filter
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .concern(&event.paths) =>
            {
                let _ = events.try_send(());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "config watcher error"),
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let link_dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    // A config that is a symlink into another directory (`/etc/weighbridge.toml` ->
    // `/srv/config/lb.toml`) is edited there: watch where it points too. Best effort: the
    // directory of the link already covers a link that is swapped.
    let mut target_dir = None;
    follow_link(&mut watcher, path, &link_dir, &mut target_dir);
    let path = path.to_owned();
    let mut last_seen = Some(loaded.as_bytes().to_vec());
    // The watch is in place: from here on every change sends an event; one made before it is
    // caught by comparing now.
    if std::fs::read(&path).ok() != last_seen {
        let _ = events_at_start.try_send(());
    }
    Ok(tokio::spawn(async move {
        // Owned by the task: dropping it ends the watch.
        let mut watcher = watcher;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = rx.recv() => if event.is_none() { return },
            }
            // Debounce: wait until no event has arrived for DEBOUNCE, or DEBOUNCE_CAP in all.
            let settle_by = Instant::now() + DEBOUNCE_CAP;
            loop {
                let quiet_at = (Instant::now() + DEBOUNCE).min(settle_by);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(quiet_at) => break,
                    event = rx.recv() => if event.is_none() { return },
                }
            }
            // The link may point somewhere else now.
            follow_link(&mut watcher, &path, &link_dir, &mut target_dir);
            *names.lock().unwrap_or_else(PoisonError::into_inner) = Names::of(&path);
            let current = std::fs::read(&path).ok();
            if current == last_seen {
                debug!(path = %path.display(), "config directory changed, file did not");
                continue;
            }
            last_seen = current;
            // The control task logs the outcome. A reload that failed is not taken as seen:
            // when it failed for a reason outside the file (a port still taken), saving the
            // same file again is how an operator tries again.
            if handle.reload().await.is_err() {
                last_seen = None;
            }
        }
    }))
}

/// Watches the directory `path` links to, when that is not `link_dir`, instead of the one
/// `watched` names (if it differs).
fn follow_link(
    watcher: &mut impl Watcher,
    path: &Path,
    link_dir: &Path,
    watched: &mut Option<PathBuf>,
) {
    let target_dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|target| target.parent().map(Path::to_owned))
        .filter(|target_dir| target_dir != link_dir);
    if target_dir == *watched {
        return;
    }
    if let Some(old) = watched.take() {
        // Gone with its directory, or still there: either way no longer wanted.
        drop(watcher.unwatch(&old));
    }
    if let Some(new) = target_dir {
        match watcher.watch(&new, RecursiveMode::NonRecursive) {
            Ok(()) => *watched = Some(new),
            Err(e) => {
                warn!(error = %e, dir = %new.display(), "cannot watch the directory the config links to; edits there need SIGHUP");
            }
        }
    }
}

/// The file names whose events concern the config.
#[derive(Debug, Default)]
struct Names {
    /// The config's own name and, when it is a symlink, its target's.
    files: Vec<OsString>,
}

impl Names {
    fn of(path: &Path) -> Names {
        let target = std::fs::canonicalize(path).ok();
        let files = [Some(path), target.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(|p| p.file_name().map(OsStr::to_owned))
            .collect();
        Names { files }
    }

    /// Whether an event on `paths` may have changed what the config path reads: it names the
    /// config or its target, or a `..`-entry of a Kubernetes volume (`..data` and the
    /// timestamped directory it is swapped to). An event naming no path (a rescan) counts.
    fn concern(&self, paths: &[PathBuf]) -> bool {
        paths.is_empty()
            || paths.iter().any(|p| {
                p.file_name().is_some_and(|name| {
                    self.files.iter().any(|f| f == name)
                        || name.as_encoded_bytes().starts_with(b"..")
                })
            })
    }
}

/// Whether a file system event in the config's directory can have changed the file's bytes.
///
/// Opening and reading a file are events too (inotify's `IN_OPEN`), and the watcher reads the
/// file itself after every event: without this filter that read was the next event, and the
/// file was re-read every [`DEBOUNCE`] for as long as the balancer ran. Any reader (an operator's
/// `cat`, a backup agent) set it off the same way. A write ends in a close-after-write, which is
/// kept.
fn may_change_content(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Close(AccessMode::Read | AccessMode::Execute)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events in order from a real watcher on a directory of its own.
    fn watched_dir() -> (
        tempfile::TempDir,
        notify::RecommendedWatcher,
        std::sync::mpsc::Receiver<notify::Event>,
    ) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    drop(tx.send(event));
                }
            })
            .expect("watcher");
        watcher
            .watch(dir.path(), RecursiveMode::NonRecursive)
            .expect("watch");
        (dir, watcher, rx)
    }

    /// Receives events until one names `marker` (a directory: creating one is a single event);
    /// returns those before it.
    fn events_until(
        rx: &std::sync::mpsc::Receiver<notify::Event>,
        marker: &Path,
    ) -> Vec<notify::Event> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = rx
                .recv_timeout(left)
                .expect("the marker's event within 10 s");
            if event.paths.iter().any(|p| p.ends_with(marker)) {
                return before;
            }
            before.push(event);
        }
    }

    #[test]
    fn reading_the_file_is_not_a_change_and_writing_it_is() {
        let (dir, _watcher, rx) = watched_dir();
        let file = dir.path().join("weighbridge.toml");
        std::fs::write(&file, "threads = 1\n").expect("write");
        std::fs::create_dir(dir.path().join("marker-1")).expect("marker");
        let written = events_until(&rx, Path::new("marker-1"));
        assert!(
            written.iter().any(|e| may_change_content(&e.kind)),
            "a write is seen: {written:?}"
        );
        // What the watcher itself does after every event, and what any reader does.
        let _ = std::fs::read(&file).expect("read");
        std::fs::create_dir(dir.path().join("marker-2")).expect("marker");
        let read = events_until(&rx, Path::new("marker-2"));
        assert!(
            read.iter().all(|e| !may_change_content(&e.kind)),
            "a read is not a change: {read:?}"
        );
    }

    #[test]
    fn only_events_naming_the_config_its_target_or_a_configmap_entry_concern_it() {
        let names = Names {
            files: vec!["wb.toml".into(), "lb.toml".into()],
        };
        let at = |name: &str| vec![PathBuf::from("/etc/weighbridge").join(name)];
        for name in ["wb.toml", "lb.toml", "..data", "..2026_12_06_10_00_00.123"] {
            assert!(names.concern(&at(name)), "{name}");
        }
        for name in ["access.log", "wb.toml.swp", "wb.toml.new", "other.toml"] {
            assert!(!names.concern(&at(name)), "{name}");
        }
        // A rename names both ends; either may be the config.
        let rename = [at("wb.toml.new"), at("wb.toml")].concat();
        assert!(names.concern(&rename));
        assert!(names.concern(&[]), "a rescan names no path");
    }

    fn config(text: &str) -> Config {
        crate::config::parse(text, Path::new("t.toml")).expect("valid test config")
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
