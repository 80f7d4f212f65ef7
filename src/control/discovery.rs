//! Backends by DNS name: one task per name resolves it again and again; the control task
//! applies what they find.
//!
//! Queries run in their own tasks and answer over a channel, so a slow or silent DNS server
//! never holds up the control task, let alone a worker. A failed resolution keeps the last good
//! addresses: a DNS server's bad minute never empties a pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, ResolveErrorKind, TokioResolver};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::config::{Config, MIN_REFRESH, ResolverSettings, Target};
use crate::state::Names;

/// Addresses listed in one log line about a name at most: a name of a thousand addresses is
/// summed up, not printed whole.
const LOGGED_ADDRESSES: usize = 8;

/// Why a resolution failed: the `reason` label of `weighbridge_resolve_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No answer within `timeout`.
    Timeout,
    /// The name does not exist.
    NxDomain,
    /// The server failed to answer (SERVFAIL).
    ServFail,
    /// The server refused the query (REFUSED).
    Refused,
    /// The name exists but has no address (or no SRV record, or none of its targets resolves).
    Empty,
    /// No nameserver to ask: the system's configuration cannot be read and `[resolver]
    /// nameservers` is not set.
    NoNameserver,
    /// Anything else (a network error, a malformed answer).
    Error,
}

impl Failure {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::NxDomain => "nxdomain",
            Failure::ServFail => "servfail",
            Failure::Refused => "refused",
            Failure::Empty => "empty",
            Failure::NoNameserver => "no_nameserver",
            Failure::Error => "error",
        }
    }

    fn of(error: &ResolveError) -> Failure {
        let ResolveErrorKind::Proto(proto) = error.kind() else {
            return Failure::Error;
        };
        match proto.kind() {
            ProtoErrorKind::Timeout => Failure::Timeout,
            ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
                ResponseCode::NXDomain => Failure::NxDomain,
                ResponseCode::NoError => Failure::Empty,
                ResponseCode::ServFail => Failure::ServFail,
                ResponseCode::Refused => Failure::Refused,
                _ => Failure::Error,
            },
            ProtoErrorKind::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Error,
        }
    }
}

/// A good answer: the addresses (sorted, unique) and how long they may be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub addresses: Vec<SocketAddr>,
    pub ttl: Duration,
}

/// One resolution's outcome, from a name's task to the control task.
#[derive(Debug)]
pub(crate) struct Resolved {
    target: Target,
    outcome: Result<Answer, Failure>,
}

/// The resolver as the `[resolver]` table (or the system's configuration) describes it.
pub(crate) fn resolver(settings: &ResolverSettings) -> Result<TokioResolver, Failure> {
    let system = hickory_resolver::system_conf::read_system_conf();
    let (config, mut options) = match (&settings.nameservers, system) {
        (None, Ok(system)) => system,
        (None, Err(e)) => {
            warn!(error = %e, "cannot read the system's resolver configuration; set [resolver] nameservers");
            return Err(Failure::NoNameserver);
        }
        (Some(nameservers), system) => {
            // The system's search domains and options (ndots, as inside a pod) still apply.
            let (domain, search, options) = match system {
                Ok((config, options)) => {
                    (config.domain().cloned(), config.search().to_vec(), options)
                }
                Err(_) => (None, Vec::new(), Default::default()),
            };
            let mut group = NameServerConfigGroup::with_capacity(2 * nameservers.len());
            for &addr in nameservers {
                // UDP first; TCP for answers too big for a datagram (a name of many addresses).
                group.push(NameServerConfig::new(addr, Protocol::Udp));
                group.push(NameServerConfig::new(addr, Protocol::Tcp));
            }
            (ResolverConfig::from_parts(domain, search, group), options)
        }
    };
    options.timeout = settings.timeout;
    // One retry after a timeout (two sends in all): a lost datagram is not a failure, and a
    // silent server costs twice `timeout`, not hickory's default of three times.
    options.attempts = 1;
    // Every resolution asks the servers: a cached answer would hide a pod that left.
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    *builder.options_mut() = options;
    Ok(builder.build())
}

/// Resolves `target` once.
pub(crate) async fn resolve(resolver: &TokioResolver, target: &Target) -> Result<Answer, Failure> {
    let now = std::time::Instant::now();
    let (mut addresses, valid_until) = match target {
        Target::Host { host, port } => {
            let lookup = resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| Failure::of(&e))?;
            let addresses: Vec<SocketAddr> =
                lookup.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
            (addresses, lookup.valid_until())
        }
        Target::Srv { name } => {
            let srv = resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| Failure::of(&e))?;
            let mut valid_until = srv.as_lookup().valid_until();
            let mut addresses = Vec::new();
            let mut last_failure = Failure::Empty;
            // Priority and weight are not used: the entry's weight, health checks and the
            // pool's strategy balance between the targets (see docs/configuration.md).
            let mut targets: Vec<(String, u16)> = srv
                .iter()
                .map(|record| (record.target().to_ascii(), record.port()))
                .collect();
            targets.sort();
            targets.dedup();
            for (target, port) in targets {
                match resolver.lookup_ip(target.as_str()).await {
                    Ok(lookup) => {
                        valid_until = valid_until.min(lookup.valid_until());
                        addresses.extend(lookup.iter().map(|ip| SocketAddr::new(ip, port)));
                    }
                    Err(e) => last_failure = Failure::of(&e),
                }
            }
            if addresses.is_empty() {
                return Err(last_failure);
            }
            (addresses, valid_until)
        }
    };
    if addresses.is_empty() {
        return Err(Failure::Empty);
    }
    addresses.sort();
    addresses.dedup();
    Ok(Answer {
        addresses,
        ttl: valid_until.saturating_duration_since(now),
    })
}

/// Resolves every backend name of `config` once, in file order: what `--check --resolve`
/// prints. The error is the failure's reason (`timeout`, `nxdomain`, ...).
pub async fn resolve_names(
    config: &Config,
) -> Vec<(Target, Result<Vec<SocketAddr>, &'static str>)> {
    let targets = config.names();
    let resolver = match resolver(&config.resolver) {
        Ok(resolver) => resolver,
        Err(failure) => {
            return targets
                .into_iter()
                .map(|t| (t.clone(), Err(failure.as_str())))
                .collect();
        }
    };
    let mut results = Vec::with_capacity(targets.len());
    for target in targets {
        let outcome = resolve(&resolver, target).await;
        results.push((
            target.clone(),
            outcome.map(|a| a.addresses).map_err(Failure::as_str),
        ));
    }
    results
}

/// Resolves `target` for as long as the task lives: again after the answer's TTL, bounded by
/// [`MIN_REFRESH`] and `refresh`; after a failure, again after 1 s, doubling up to `refresh`.
async fn follow(
    resolver: Arc<TokioResolver>,
    target: Target,
    refresh: Duration,
    sender: mpsc::Sender<Resolved>,
) {
    let mut retry = MIN_REFRESH;
    loop {
        let outcome = resolve(&resolver, &target).await;
        let wait = match &outcome {
            Ok(answer) => {
                retry = MIN_REFRESH;
                answer.ttl.clamp(MIN_REFRESH, refresh.max(MIN_REFRESH))
            }
            Err(_) => {
                let wait = retry.min(refresh);
                retry = (retry * 2).min(refresh);
                wait
            }
        };
        let resolved = Resolved {
            target: target.clone(),
            outcome,
        };
        if sender.send(resolved).await.is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// The names being followed and the addresses in force for each.
#[derive(Debug)]
pub(crate) struct Discovery {
    settings: Option<ResolverSettings>,
    resolver: Option<Arc<TokioResolver>>,
    tasks: HashMap<Target, AbortOnDropHandle<()>>,
    sender: mpsc::Sender<Resolved>,
    receiver: mpsc::Receiver<Resolved>,
    answers: HashMap<Target, Vec<SocketAddr>>,
}

impl Default for Discovery {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(64);
        Discovery {
            settings: None,
            resolver: None,
            tasks: HashMap::new(),
            sender,
            receiver,
            answers: HashMap::new(),
        }
    }
}

impl Discovery {
    /// The addresses in force, by name.
    pub(crate) fn answers(&self) -> &HashMap<Target, Vec<SocketAddr>> {
        &self.answers
    }

    /// Follows the names of `config`: starts a task for each new one, stops those of names no
    /// longer there (their addresses go), and restarts every task when `[resolver]` changed.
    /// No resolver is built while no name is configured.
    pub(crate) fn sync(&mut self, config: &Config, names: &Names) {
        let targets = config.names();
        self.tasks.retain(|t, _| targets.contains(&t));
        self.answers.retain(|t, _| targets.contains(&t));
        names.retain(|t| targets.contains(&t));
        if targets.is_empty() {
            self.resolver = None;
            self.settings = None;
            return;
        }
        if self.settings.as_ref() != Some(&config.resolver) {
            self.tasks.clear();
            self.settings = Some(config.resolver.clone());
            self.resolver = match resolver(&config.resolver) {
                Ok(resolver) => Some(Arc::new(resolver)),
                Err(failure) => {
                    for target in &targets {
                        names.update(target, |s| {
                            s.failing = Some(failure.as_str());
                            *s.failures.entry(failure.as_str()).or_default() += 1;
                        });
                    }
                    None
                }
            };
        }
        let Some(resolver) = &self.resolver else {
            return;
        };
        for target in targets {
            if !self.tasks.contains_key(target) {
                names.update(target, |_| ());
                let task = tokio::spawn(follow(
                    Arc::clone(resolver),
                    target.clone(),
                    config.resolver.refresh,
                    self.sender.clone(),
                ));
                self.tasks
                    .insert(target.clone(), AbortOnDropHandle::new(task));
            }
        }
    }

    /// The next resolution to apply; pending forever while no name is followed.
    pub(crate) async fn next(&mut self) -> Resolved {
        loop {
            match self.receiver.recv().await {
                // A task stopped since it sent this: its name is gone.
                Some(resolved) if !self.tasks.contains_key(&resolved.target) => continue,
                Some(resolved) => return resolved,
                // Never: `self` holds a sender.
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Waits until every followed name has had one resolution (good or failed), or until
    /// `deadline`; records each. True when some name's addresses changed.
    pub(crate) async fn first(&mut self, names: &Names, deadline: Instant) -> bool {
        let mut changed = false;
        let mut pending: Vec<Target> = self.tasks.keys().cloned().collect();
        while !pending.is_empty() {
            let Ok(resolved) = tokio::time::timeout_at(deadline, self.next()).await else {
                for target in &pending {
                    warn!(name = %target, "backend name not resolved yet; its backends join when it resolves");
                }
                break;
            };
            pending.retain(|t| *t != resolved.target);
            changed |= self.record(resolved, names);
        }
        changed
    }

    /// Records one resolution: a good answer replaces the name's addresses, a failure keeps
    /// them and is counted. True when the name's addresses changed.
    pub(crate) fn record(&mut self, resolved: Resolved, names: &Names) -> bool {
        let Resolved { target, outcome } = resolved;
        match outcome {
            Ok(answer) => {
                let before = self.answers.get(&target);
                let changed = before != Some(&answer.addresses);
                if changed {
                    let old: &[SocketAddr] = before.map_or(&[], Vec::as_slice);
                    log_change(&target, old, &answer.addresses);
                }
                names.update(&target, |status| {
                    if let Some(reason) = status.failing.take() {
                        info!(name = %target, after = reason, "backend name resolves again");
                    }
                    status.addresses.clone_from(&answer.addresses);
                    status.resolved_at = Some(SystemTime::now());
                });
                self.answers.insert(target, answer.addresses);
                changed
            }
            Err(failure) => {
                let kept = self.answers.get(&target).map_or(0, Vec::len);
                names.update(&target, |status| {
                    *status.failures.entry(failure.as_str()).or_default() += 1;
                    if status.failing != Some(failure.as_str()) {
                        if kept == 0 {
                            warn!(name = %target, reason = failure.as_str(), "cannot resolve backend name; it gives no backend until it resolves");
                        } else {
                            warn!(name = %target, reason = failure.as_str(), kept, "cannot resolve backend name; its last addresses stay");
                        }
                        status.failing = Some(failure.as_str());
                    }
                });
                false
            }
        }
    }
}

/// Logs what a new answer changes.
fn log_change(target: &Target, old: &[SocketAddr], new: &[SocketAddr]) {
    let added: Vec<&SocketAddr> = new.iter().filter(|a| !old.contains(a)).collect();
    let removed: Vec<&SocketAddr> = old.iter().filter(|a| !new.contains(a)).collect();
    let list = |addrs: &[&SocketAddr]| {
        let mut text = addrs
            .iter()
            .take(LOGGED_ADDRESSES)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if addrs.len() > LOGGED_ADDRESSES {
            text.push_str(&format!(", … ({} in all)", addrs.len()));
        }
        text
    };
    info!(
        name = %target,
        addresses = new.len(),
        added = %list(&added),
        removed = %list(&removed),
        "backend name resolved"
    );
}
