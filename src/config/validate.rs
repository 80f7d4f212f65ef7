//! From the serde mirror to the typed [`Config`]: every check TOML types cannot express
//! (addresses, durations, counts, weights, uniqueness), each failure with the span of the value
//! it is about so the error can name its line.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::clients::{ClientsConfig, RawClients};
use super::discovery::{Addr, NamedBackend, ResolverSettings, backend_addr, srv_name};
use super::error::Owner;
use super::raw::{RawAdmin, RawBackend, RawConfig, RawHealth, RawListener, RawLog, RawPassive};
use super::routes::{Affinity, DEFAULT_BALANCE_FACTOR, HashKey, Routes, balance_factor};
use super::{
    AdminConfig, BackendConfig, Config, ConfigErrorKind, CongestionControl,
    DEFAULT_CLIENT_HELLO_TIMEOUT, DEFAULT_CONNECT_ATTEMPTS, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUED, DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_SPLICE, Forward, HealthConfig, ListenerConfig, LogConfig,
    MAX_DURATION, MAX_THREADS, PassiveConfig, PoolConfig, StrategyKind, Token, Weight,
};

/// A validation failure and the span of the value it is about.
pub(super) type Invalid = (Option<Range<usize>>, ConfigErrorKind);

impl Config {
    pub(super) fn from_raw(raw: RawConfig) -> Result<Config, Invalid> {
        let shutdown_grace = duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        if raw.listener.is_empty() {
            return Err((None, ConfigErrorKind::NoListeners));
        }
        let log = raw.log.map(LogConfig::from_raw).unwrap_or_default();
        // Pools first, so that a listener's `pool` can be checked against them.
        let mut pools: Vec<PoolConfig> = Vec::with_capacity(raw.pool.len() + raw.listener.len());
        for spanned in raw.pool {
            let span = spanned.span();
            let raw_pool = spanned.into_inner();
            let name = checked_name(&raw_pool.name, "pool")?;
            if pools.iter().any(|p| p.name == name) {
                return Err((
                    Some(raw_pool.name.span()),
                    ConfigErrorKind::DuplicatePool(name),
                ));
            }
            let owner = Owner {
                kind: "pool",
                name: name.clone(),
            };
            let keys = PoolKeys {
                strategy: raw_pool.strategy,
                queue_timeout: raw_pool.queue_timeout,
                max_queued: raw_pool.max_queued,
                hash_key: raw_pool.hash_key,
                hash_balance_factor: raw_pool.hash_balance_factor,
                health: raw_pool.health,
                passive: raw_pool.passive,
                backend: raw_pool.backend,
            };
            pools.push(PoolConfig::from_raw(keys, owner, span)?);
        }
        let declared = pools.len();
        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listener.len());
        for spanned in raw.listener {
            let span = spanned.span();
            let raw_listener = spanned.into_inner();
            let (name_span, bind_span) = (raw_listener.name.span(), raw_listener.bind.span());
            let (listener, inline) =
                ListenerConfig::from_raw(raw_listener, span, &pools[..declared])?;
            if listeners.iter().any(|l| l.name == listener.name) {
                return Err((
                    Some(name_span),
                    ConfigErrorKind::DuplicateName(listener.name),
                ));
            }
            if let Some(other) = listeners
                .iter()
                .find(|l| binds_overlap(l.bind, listener.bind))
            {
                return Err((
                    Some(bind_span),
                    ConfigErrorKind::DuplicateBind {
                        listener: listener.name.clone(),
                        other: other.name.clone(),
                        addrs: Box::new((listener.bind, other.bind)),
                    },
                ));
            }
            if let Some(pool) = inline {
                if pools.iter().any(|p| p.name == pool.name) {
                    return Err((Some(name_span), ConfigErrorKind::DuplicatePool(pool.name)));
                }
                pools.push(pool);
            }
            listeners.push(listener);
        }
        let threads = match raw.threads {
            Some(t) if *t.get_ref() == 0 => {
                return Err((Some(t.span()), ConfigErrorKind::ZeroCount("threads")));
            }
            // Each worker holds an epoll instance, a waker and a socket per listener: far more
            // than the cores of any machine only runs the process out of descriptors at start,
            // with an error about a listener's bind.
            Some(t) if *t.get_ref() > MAX_THREADS as u64 => {
                return Err((
                    Some(t.span()),
                    ConfigErrorKind::TooLarge {
                        key: "threads",
                        max: MAX_THREADS as u64,
                    },
                ));
            }
            Some(t) => NonZeroUsize::new(usize::try_from(*t.get_ref()).unwrap_or(usize::MAX)),
            None => None,
        };
        let admin = match raw.admin {
            None => None,
            Some(admin) => Some(AdminConfig::from_raw(admin.into_inner(), &listeners)?),
        };
        let resolver = match &raw.resolver {
            Some(r) => ResolverSettings::from_raw(r.get_ref())?,
            None => ResolverSettings::default(),
        };
        Ok(Config {
            shutdown_grace,
            threads,
            admin,
            log,
            listeners,
            pools,
            resolver,
        })
    }
}

/// A name for a listener or a pool (`what`): trimmed, not empty, and nothing a text log line
/// prints raw can break it (HAProxy's rule for proxy names).
fn checked_name(value: &Spanned<String>, what: &'static str) -> Result<String, Invalid> {
    let name = value.get_ref().trim().to_owned();
    if name.is_empty() {
        return Err((Some(value.span()), ConfigErrorKind::EmptyName));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err((Some(value.span()), ConfigErrorKind::BadName(what, name)));
    }
    Ok(name)
}

/// The keys a pool is made of, from a `[[pool]]` table or from a listener in the inline form.
struct PoolKeys {
    strategy: Option<Spanned<StrategyKind>>,
    queue_timeout: Option<Spanned<String>>,
    max_queued: Option<Spanned<u64>>,
    hash_key: Option<Spanned<HashKey>>,
    hash_balance_factor: Option<Spanned<f64>>,
    health: Option<Spanned<RawHealth>>,
    passive: Option<Spanned<RawPassive>>,
    backend: Vec<Spanned<RawBackend>>,
}

impl PoolConfig {
    /// The pool `owner` describes, from its keys; `span` is its table's, for "no backend".
    fn from_raw(raw: PoolKeys, owner: Owner, span: Range<usize>) -> Result<PoolConfig, Invalid> {
        let queue_timeout = optional_duration(&raw.queue_timeout, "queue_timeout", true)?
            .unwrap_or(DEFAULT_QUEUE_TIMEOUT);
        let max_queued = raw.max_queued.as_ref().map_or(DEFAULT_MAX_QUEUED, |v| {
            usize::try_from(*v.get_ref()).unwrap_or(usize::MAX)
        });
        let health = match &raw.health {
            Some(h) => Some(HealthConfig::from_raw(h.get_ref())?),
            None => None,
        };
        let passive = match &raw.passive {
            Some(p) => Some(PassiveConfig::from_raw(p.get_ref())?),
            None => None,
        };
        if raw.backend.is_empty() {
            return Err((Some(span), ConfigErrorKind::NoBackends(owner)));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
        let mut names: Vec<NamedBackend> = Vec::new();
        for spanned in raw.backend {
            let entry_span = spanned.span();
            match Entry::from_raw(spanned.get_ref(), entry_span)? {
                Entry::Literal(backend, addr_span) => {
                    if backends.iter().any(|b| b.addr == backend.addr) {
                        return Err((
                            Some(addr_span),
                            ConfigErrorKind::DuplicateBackend {
                                owner,
                                addr: backend.addr,
                            },
                        ));
                    }
                    backends.push(backend);
                }
                Entry::Named(named, name_span) => {
                    if names.iter().any(|n| n.target == named.target) {
                        return Err((
                            Some(name_span),
                            ConfigErrorKind::DuplicateBackendName {
                                owner,
                                target: named.target,
                            },
                        ));
                    }
                    names.push(named);
                }
            }
        }
        let weights = backends
            .iter()
            .map(|b| b.weight)
            .chain(names.iter().map(|n| n.weight));
        if weights.into_iter().all(Weight::is_zero) {
            return Err((Some(span), ConfigErrorKind::AllWeightsZero(owner)));
        }
        let strategy: StrategyKind = raw.strategy.map(Spanned::into_inner).unwrap_or_default();
        let affinity = if strategy == StrategyKind::ConsistentHash {
            Some(Affinity {
                key: raw.hash_key.map(Spanned::into_inner).unwrap_or_default(),
                balance_factor: match &raw.hash_balance_factor {
                    Some(v) => balance_factor(v)?,
                    None => DEFAULT_BALANCE_FACTOR,
                },
            })
        } else {
            let stray = [
                ("hash_key", raw.hash_key.as_ref().map(Spanned::span)),
                (
                    "hash_balance_factor",
                    raw.hash_balance_factor.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((key, at)) = stray.into_iter().find_map(|(k, at)| at.map(|at| (k, at))) {
                return Err((Some(at), ConfigErrorKind::HashWithoutConsistentHash(key)));
            }
            None
        };
        Ok(PoolConfig {
            inline: owner.kind == "listener",
            name: owner.name,
            strategy,
            affinity,
            queue_timeout,
            max_queued,
            health,
            passive,
            backends,
            names,
        })
    }
}

/// One backend entry: an address, or a name that stands for the addresses it resolves to;
/// with the span of what says which.
enum Entry {
    Literal(BackendConfig, Range<usize>),
    Named(NamedBackend, Range<usize>),
}

impl Entry {
    /// The entry `raw` describes; `span` is its table's, for a missing address.
    fn from_raw(raw: &RawBackend, span: Range<usize>) -> Result<Entry, Invalid> {
        let weight = match &raw.weight {
            None => Weight::ONE,
            Some(w) => Weight::new(*w.get_ref())
                .ok_or((Some(w.span()), ConfigErrorKind::BadWeight(*w.get_ref())))?,
        };
        let max_connections = match &raw.max_connections {
            Some(v) if *v.get_ref() == 0 => {
                // Zero slots would queue every client until it times out: weight 0 (or a
                // drain) is how a backend is kept from new connections.
                return Err((Some(v.span()), ConfigErrorKind::ZeroSlots));
            }
            Some(v) => NonZeroU32::new(u32::try_from(*v.get_ref()).unwrap_or(u32::MAX)),
            None => None,
        };
        let send_proxy = raw.send_proxy.as_ref().map(|v| *v.get_ref());
        let (target, target_span) = match (&raw.addr, &raw.srv) {
            (Some(_), Some(srv)) => return Err((Some(srv.span()), ConfigErrorKind::AddrAndSrv)),
            (None, None) => return Err((Some(span), ConfigErrorKind::NoBackendAddress)),
            (None, Some(srv)) => (srv_name(srv)?, srv.span()),
            (Some(addr), None) => match backend_addr(addr)? {
                Addr::Name(target) => (target, addr.span()),
                Addr::Literal(addr_value) => {
                    let health_addr = match &raw.health_addr {
                        Some(value) => Some(backend_address(value, "health_addr")?),
                        None => None,
                    };
                    let backend = BackendConfig {
                        addr: addr_value,
                        weight,
                        health_addr,
                        max_connections,
                        from_name: None,
                        send_proxy,
                    };
                    return Ok(Entry::Literal(backend, addr.span()));
                }
            },
        };
        if let Some(health_addr) = &raw.health_addr {
            return Err((
                Some(health_addr.span()),
                ConfigErrorKind::HealthAddrWithName,
            ));
        }
        let named = NamedBackend {
            target,
            weight,
            max_connections,
            send_proxy,
        };
        Ok(Entry::Named(named, target_span))
    }
}

impl AdminConfig {
    fn from_raw(raw: RawAdmin, listeners: &[ListenerConfig]) -> Result<AdminConfig, Invalid> {
        let bind = address(&raw.bind, "bind")?;
        let token = match &raw.token {
            None => None,
            Some(t) => {
                Some(Token::new(t.get_ref()).ok_or((Some(t.span()), ConfigErrorKind::BadToken))?)
            }
        };
        if token.is_none() && !bind.ip().to_canonical().is_loopback() {
            return Err((
                Some(raw.bind.span()),
                ConfigErrorKind::AdminTokenRequired(bind),
            ));
        }
        if let Some(listener) = listeners.iter().find(|l| binds_overlap(l.bind, bind)) {
            return Err((
                Some(raw.bind.span()),
                ConfigErrorKind::AdminBindTaken {
                    listener: listener.name.clone(),
                    addr: bind,
                    other_addr: listener.bind,
                },
            ));
        }
        Ok(AdminConfig { bind, token })
    }
}

impl LogConfig {
    fn from_raw(raw: RawLog) -> LogConfig {
        LogConfig {
            format: raw.format.unwrap_or_default(),
            access_log: raw.access_log.unwrap_or(false),
        }
    }
}

impl ListenerConfig {
    /// The listener, and its own pool when it is written in the inline form; `pools` are the
    /// `[[pool]]` tables its `pool` may name.
    fn from_raw(
        raw: RawListener,
        span: Range<usize>,
        pools: &[PoolConfig],
    ) -> Result<(ListenerConfig, Option<PoolConfig>), Invalid> {
        let name = checked_name(&raw.name, "listener")?;
        let bind = address(&raw.bind, "bind")?;
        let connect_attempts =
            count(&raw.connect_attempts, "connect_attempts")?.unwrap_or(DEFAULT_CONNECT_ATTEMPTS);
        let max_connections = match &raw.max_connections {
            Some(v) if *v.get_ref() == 0 => {
                return Err((
                    Some(v.span()),
                    ConfigErrorKind::ZeroCount("max_connections"),
                ));
            }
            Some(v) => NonZeroUsize::new(usize::try_from(*v.get_ref()).unwrap_or(usize::MAX))
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            None => DEFAULT_MAX_CONNECTIONS,
        };
        let backend_congestion_control = match &raw.backend_congestion_control {
            Some(v) => Some(
                CongestionControl::new(v.get_ref())
                    .map_err(|e| (Some(v.span()), ConfigErrorKind::Congestion(e)))?,
            ),
            None => None,
        };
        let client_hello_timeout = duration(
            &raw.client_hello_timeout,
            "client_hello_timeout",
            DEFAULT_CLIENT_HELLO_TIMEOUT,
        )?;
        let keys = PoolKeys {
            strategy: raw.strategy,
            queue_timeout: raw.queue_timeout,
            max_queued: raw.max_queued,
            hash_key: raw.hash_key,
            hash_balance_factor: raw.hash_balance_factor,
            health: raw.health,
            passive: raw.passive,
            backend: raw.backend,
        };
        // The keys of a listener's own pool, where they are written: said to be out of place
        // beside `pool` or routes, on their line.
        let inline_keys = [
            ("strategy", keys.strategy.as_ref().map(Spanned::span)),
            (
                "queue_timeout",
                keys.queue_timeout.as_ref().map(Spanned::span),
            ),
            ("max_queued", keys.max_queued.as_ref().map(Spanned::span)),
            ("hash_key", keys.hash_key.as_ref().map(Spanned::span)),
            (
                "hash_balance_factor",
                keys.hash_balance_factor.as_ref().map(Spanned::span),
            ),
            ("health", keys.health.as_ref().map(Spanned::span)),
            ("passive", keys.passive.as_ref().map(Spanned::span)),
            ("backend", keys.backend.first().map(Spanned::span)),
        ];
        let first_inline = inline_keys
            .into_iter()
            .find_map(|(key, at)| at.map(|at| (key, at)));
        let known = |pool: &str| -> Result<(), String> {
            if pools.iter().any(|p| p.name == pool) {
                return Ok(());
            }
            let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            Err(if names.is_empty() {
                String::new()
            } else {
                format!(" (pools: {})", names.join(", "))
            })
        };
        let (forward, inline) = if !raw.route.is_empty() {
            let beside = raw
                .pool
                .as_ref()
                .map(|p| ("pool", p.span()))
                .or(first_inline);
            if let Some((key, at)) = beside {
                return Err((
                    Some(at),
                    ConfigErrorKind::RoutesAndPool {
                        listener: name,
                        key,
                    },
                ));
            }
            let routes = Routes::from_raw(&name, &raw.route, known)?;
            (Forward::Routes(routes), None)
        } else {
            match &raw.pool {
                Some(named) => {
                    let pool = named.get_ref().trim().to_owned();
                    if let Some((key, at)) = first_inline {
                        return Err((
                            Some(at),
                            ConfigErrorKind::PoolAndInline {
                                listener: name,
                                key,
                                pool,
                            },
                        ));
                    }
                    if let Err(known) = known(&pool) {
                        return Err((
                            Some(named.span()),
                            ConfigErrorKind::UnknownPool {
                                listener: name,
                                pool,
                                known,
                            },
                        ));
                    }
                    (Forward::Pool(pool), None)
                }
                None => {
                    let owner = Owner {
                        kind: "listener",
                        name: name.clone(),
                    };
                    let pool = PoolConfig::from_raw(keys, owner, span)?;
                    (Forward::Pool(name.clone()), Some(pool))
                }
            }
        };
        let clients = ClientsConfig::from_raw(RawClients {
            accept_proxy: &raw.accept_proxy,
            proxy_trusted: &raw.proxy_trusted,
            send_proxy: &raw.send_proxy,
            allow: &raw.allow,
            deny: &raw.deny,
            max_connections_per_client: &raw.max_connections_per_client,
            connection_rate_per_client: &raw.connection_rate_per_client,
        })?;
        let listener = ListenerConfig {
            name,
            bind,
            forward,
            client_hello_timeout,
            connect_timeout: duration(
                &raw.connect_timeout,
                "connect_timeout",
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            idle_timeout: duration(&raw.idle_timeout, "idle_timeout", DEFAULT_IDLE_TIMEOUT)?,
            connect_attempts,
            max_connections,
            splice: raw.splice.unwrap_or(DEFAULT_SPLICE),
            backend_congestion_control,
            clients,
        };
        Ok((listener, inline))
    }
}

fn address(value: &Spanned<String>, key: &'static str) -> Result<SocketAddr, Invalid> {
    value.get_ref().trim().parse().map_err(|_| {
        let kind = ConfigErrorKind::BadAddress {
            key,
            value: value.get_ref().clone(),
        };
        (Some(value.span()), kind)
    })
}

/// An address to connect to: as [`address`], and not port 0 (which a listener may bind, to
/// pick a free port, but which every connect would fail on).
fn backend_address(value: &Spanned<String>, key: &'static str) -> Result<SocketAddr, Invalid> {
    let addr = address(value, key)?;
    if addr.port() == 0 {
        let kind = ConfigErrorKind::BackendPortZero {
            key,
            value: value.get_ref().clone(),
        };
        return Err((Some(value.span()), kind));
    }
    Ok(addr)
}

/// True when two listening sockets on `a` and `b` cannot both be bound: the same port (not 0,
/// which picks a free one) and addresses that overlap. A wildcard covers its own family, and
/// `[::ffff:a.b.c.d]` is `a.b.c.d`. Caught here, such a pair fails `--check` instead of the
/// start. (`[::]` also covers IPv4 unless `net.ipv6.bindv6only` is set; that depends on the
/// host, so it is left to the bind to report.)
pub(super) fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers =
        |wild: IpAddr, other: IpAddr| wild.is_unspecified() && wild.is_ipv4() == other.is_ipv4();
    a == b || covers(a, b) || covers(b, a)
}

/// A count of at least 1; values beyond `u32::MAX` saturate.
pub(super) fn count(
    value: &Option<Spanned<u64>>,
    key: &'static str,
) -> Result<Option<NonZeroU32>, Invalid> {
    match value {
        Some(v) => NonZeroU32::new(u32::try_from(*v.get_ref()).unwrap_or(u32::MAX))
            .map(Some)
            .ok_or((Some(v.span()), ConfigErrorKind::ZeroCount(key))),
        None => Ok(None),
    }
}

/// A duration if one is written, else `default`; zero is refused.
pub(super) fn duration(
    value: &Option<Spanned<String>>,
    key: &'static str,
    default: Duration,
) -> Result<Duration, Invalid> {
    Ok(optional_duration(value, key, false)?.unwrap_or(default))
}

/// A duration if one is written; zero is refused unless `zero_ok`.
pub(super) fn optional_duration(
    value: &Option<Spanned<String>>,
    key: &'static str,
    zero_ok: bool,
) -> Result<Option<Duration>, Invalid> {
    let Some(value) = value else {
        return Ok(None);
    };
    let parsed = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        let kind = ConfigErrorKind::BadDuration {
            key,
            value: value.get_ref().clone(),
            reason: e.to_string(),
        };
        (Some(value.span()), kind)
    })?;
    if parsed.is_zero() && !zero_ok {
        return Err((Some(value.span()), ConfigErrorKind::ZeroDuration(key)));
    }
    if parsed > MAX_DURATION {
        return Err((Some(value.span()), ConfigErrorKind::LongDuration(key)));
    }
    Ok(Some(parsed))
}
