//! What the resolver last found for each backend name, for `/status`, `/metrics` and the
//! [`Handle`](crate::Handle). Written by the control task when an answer arrives, read by the
//! admin endpoint: a mutex, never touched by the connection path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crate::config::Target;

/// One name's resolution state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameStatus {
    /// The addresses in force: the last good answer (kept through failures).
    pub addresses: Vec<SocketAddr>,
    /// When the last good answer arrived, if one has.
    pub resolved_at: Option<SystemTime>,
    /// Why the latest resolution failed, if it did (`"timeout"`, `"nxdomain"`, `"servfail"`,
    /// `"refused"`, `"empty"`, `"error"`); `None` once one succeeds.
    pub failing: Option<&'static str>,
    /// Failed resolutions by reason, since the name was first configured.
    pub failures: BTreeMap<&'static str, u64>,
}

/// Every configured name's [`NameStatus`].
#[derive(Debug, Default)]
pub(crate) struct Names {
    inner: Mutex<BTreeMap<Target, NameStatus>>,
}

impl Names {
    /// Runs `f` on `target`'s status, creating it if needed.
    pub(crate) fn update<R>(&self, target: &Target, f: impl FnOnce(&mut NameStatus) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(inner.entry(target.clone()).or_default())
    }

    /// Forgets the names `keep` says no.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&Target) -> bool) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.retain(|target, _| keep(target));
    }

    /// A copy of every name's status, in name order.
    pub(crate) fn all(&self) -> Vec<(Target, NameStatus)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.iter().map(|(t, s)| (t.clone(), s.clone())).collect()
    }
}
