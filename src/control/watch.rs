//! The configuration file watcher: asks for a reload when the file's content changes.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Handle;

/// Quiet time after the last file event before a reload starts. Editors and config-management
/// tools write a file in several steps (truncate, write, rename, chmod); reloading on the first
/// event would read a half-written file.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(200);

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
/// not keep the debounce from ever settling. A reload waits for 200 ms without events (1 s at
/// most in all), and is only asked for when the file's bytes differ from the last ones seen. Runs until `stop` is cancelled.
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
                        .may_name_config(&event.paths) =>
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
    fn may_name_config(&self, paths: &[PathBuf]) -> bool {
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
            assert!(names.may_name_config(&at(name)), "{name}");
        }
        for name in ["access.log", "wb.toml.swp", "wb.toml.new", "other.toml"] {
            assert!(!names.may_name_config(&at(name)), "{name}");
        }
        // A rename names both ends; either may be the config.
        let rename = [at("wb.toml.new"), at("wb.toml")].concat();
        assert!(names.may_name_config(&rename));
        assert!(names.may_name_config(&[]), "a rescan names no path");
    }
}
