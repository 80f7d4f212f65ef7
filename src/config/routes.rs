//! A listener's routes: which pool a connection goes to by the server name its TLS ClientHello
//! asks for (`[[listener.route]]`), read without terminating TLS; and a pool's affinity keys
//! (`hash_key`, `hash_balance_factor`).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigErrorKind;
use super::validate::Invalid;

/// How long a listener that reads the ClientHello waits for it whole, by default: HAProxy's
/// `tcp-request inspect-delay` as its manual's SNI examples set it.
pub(crate) const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// `hash_balance_factor` when the file does not set it: the factor Mirrokni, Thorup and
/// Zadimoghaddam's paper works with; a client stays where it was until its backend carries a
/// quarter more than its share.
pub(crate) const DEFAULT_BALANCE_FACTOR: f64 = 1.25;

/// One `[[listener.route]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) sni: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) pool: Spanned<String>,
}

/// A server name a route matches: an exact name, or `*.` and a suffix, which matches a name of
/// one more label. Lower case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SniPattern {
    /// `llama.example.com`.
    Exact(Box<str>),
    /// `*.llama.example.com`, kept as its suffix `llama.example.com`.
    Wildcard(Box<str>),
}

impl SniPattern {
    /// The pattern `text` writes, or why it is none.
    pub(crate) fn parse(text: &str) -> Result<SniPattern, &'static str> {
        let lower = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, lower.as_str()),
        };
        if name.is_empty() {
            return Err("empty name");
        }
        if name.len() > 253 {
            return Err("longer than 253 characters");
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err("each label between dots has 1 to 63 characters");
            }
            if label == "*" || label.contains('*') {
                return Err("a wildcard is `*.` at the start only, for one label");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err("letters, digits, `-` and `_` only (IDNs in their xn-- form)");
            }
        }
        Ok(if wildcard {
            SniPattern::Wildcard(name.into())
        } else {
            SniPattern::Exact(name.into())
        })
    }
}

impl fmt::Display for SniPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniPattern::Exact(name) => f.write_str(name),
            SniPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// One route: the names it matches (none for the default route) and the pool it sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// Empty for the default route.
    pub sni: Vec<SniPattern>,
    /// One of the config's `[[pool]]`s.
    pub pool: String,
}

/// A listener's routes, in file order; a default route (no `sni`) is the last one, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Routes {
    /// Never empty.
    pub routes: Vec<Route>,
}

impl Routes {
    /// Whether some route matches by name: only then is the ClientHello read for routing.
    pub(crate) fn by_name(&self) -> bool {
        self.routes.iter().any(|r| !r.sni.is_empty())
    }

    /// The routes from `raw`, checking each `pool` with `known` (which answers with the list of
    /// pools for an error message when the name is unknown).
    pub(super) fn from_raw(
        listener: &str,
        raw: &[Spanned<RawRoute>],
        known: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Routes, Invalid> {
        let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
        for (position, spanned) in raw.iter().enumerate() {
            let route = spanned.get_ref();
            if let Some(default) = routes.iter().position(|r| r.sni.is_empty()) {
                return Err((
                    Some(spanned.span()),
                    ConfigErrorKind::RouteAfterDefault {
                        listener: listener.to_owned(),
                        default: default + 1,
                    },
                ));
            }
            let pool = route.pool.get_ref().trim().to_owned();
            if let Err(list) = known(&pool) {
                return Err((
                    Some(route.pool.span()),
                    ConfigErrorKind::UnknownRoutePool {
                        listener: listener.to_owned(),
                        pool,
                        known: list,
                    },
                ));
            }
            let mut sni = Vec::new();
            if let Some(names) = &route.sni {
                if names.get_ref().is_empty() {
                    return Err((Some(names.span()), ConfigErrorKind::EmptySni));
                }
                for name in names.get_ref() {
                    let pattern = SniPattern::parse(name.get_ref()).map_err(|why| {
                        (
                            Some(name.span()),
                            ConfigErrorKind::BadSni {
                                name: name.get_ref().clone(),
                                why,
                            },
                        )
                    })?;
                    let earlier = routes
                        .iter()
                        .position(|r| r.sni.contains(&pattern))
                        .or_else(|| sni.contains(&pattern).then_some(position));
                    if let Some(earlier) = earlier {
                        return Err((
                            Some(name.span()),
                            ConfigErrorKind::DuplicateSni {
                                name: pattern.to_string(),
                                route: earlier + 1,
                            },
                        ));
                    }
                    sni.push(pattern);
                }
            }
            routes.push(Route { sni, pool });
        }
        Ok(Routes { routes })
    }
}

/// What a pool's `consistent_hash` keys a connection by (`hash_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HashKey {
    /// The client's address (the PROXY header's, when one is accepted): HAProxy's `balance
    /// source`.
    #[default]
    ClientIp,
    /// The server name of the client's ClientHello; a client that sends none is keyed by its
    /// address.
    Sni,
}

impl HashKey {
    /// As written in the file.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HashKey::ClientIp => "client_ip",
            HashKey::Sni => "sni",
        }
    }
}

/// A `consistent_hash` pool's affinity settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Affinity {
    /// What a connection is keyed by.
    pub key: HashKey,
    /// No backend takes a new connection beyond this × its share of the pool's open
    /// connections; 0 for none.
    pub balance_factor: f64,
}

/// `hash_balance_factor` as written: 0, or at least 1.
pub(super) fn balance_factor(value: &Spanned<f64>) -> Result<f64, Invalid> {
    let factor = *value.get_ref();
    if factor == 0.0 || (factor.is_finite() && (1.0..=100.0).contains(&factor)) {
        Ok(factor)
    } else {
        Err((
            Some(value.span()),
            ConfigErrorKind::BadBalanceFactor(factor),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_lower_case_names_or_one_label_wildcards() {
        assert_eq!(
            SniPattern::parse("LLama.Example.com."),
            Ok(SniPattern::Exact("llama.example.com".into()))
        );
        assert_eq!(
            SniPattern::parse("*.llama.example.com"),
            Ok(SniPattern::Wildcard("llama.example.com".into()))
        );
        for bad in [
            "",
            "*.",
            "a..b",
            "*.*.example.com",
            "a*.example.com",
            "ex ample.com",
            "é.com",
        ] {
            assert!(SniPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SniPattern::parse(&"a".repeat(64)).is_err());
    }
}
