//! `weighbridge ctl`: status, drain (and wait), enable and reload through the admin endpoint,
//! for an operator at a shell or a script that needs exit codes it can branch on.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::time::Instant;

use super::admin_client::{AdminArgs, Answer, Client};
use super::failure::Failure;
use super::format;
use super::status::{self, ListenerStatus, PoolStatus, Reading, Status};

/// How often `drain --wait` reads the backend's open connections.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// `weighbridge ctl`.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Listeners, pools and backends with their live state.
    Status {
        /// Print `/status` as the endpoint sent it.
        #[arg(long)]
        json: bool,
    },
    /// Stop new connections to a backend; open ones go on.
    Drain {
        /// The listener or pool the backend belongs to.
        #[arg(value_name = "LISTENER_OR_POOL")]
        scope: String,
        /// The backend's IP:PORT.
        backend: String,
        /// Then wait until its open connections reach 0, showing them count down.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 7), leaving the backend drained.
        #[arg(long, requires = "wait", default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Put a drained backend back into rotation.
    Enable {
        /// The listener or pool the backend belongs to.
        #[arg(value_name = "LISTENER_OR_POOL")]
        scope: String,
        /// The backend's IP:PORT.
        backend: String,
    },
    /// Re-read the configuration file, as SIGHUP does, and say what changed.
    Reload,
}

/// Runs `ctl`; `parent_config` is a `--config` given before the subcommand.
pub(crate) fn run(args: CtlArgs, parent_config: Option<&Path>) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the async runtime: {e}")))
        .and_then(|runtime| runtime.block_on(ctl(args, parent_config)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

async fn ctl(args: CtlArgs, parent_config: Option<&Path>) -> Result<(), Failure> {
    let client = Client::from_args(&args.admin, parent_config)?;
    match args.command {
        CtlCommand::Status { json } => {
            let reading = status::read(&client, !json).await?;
            if json {
                print!("{}", reading.raw);
                if !reading.raw.ends_with('\n') {
                    println!();
                }
            } else {
                print!("{}", render_status(&reading));
            }
            Ok(())
        }
        CtlCommand::Drain {
            scope,
            backend,
            wait,
            timeout,
        } => {
            let found = set_state(&client, &scope, &backend, Action::Drain).await?;
            if wait {
                wait_drained(&client, &found, timeout).await
            } else {
                Ok(())
            }
        }
        CtlCommand::Enable { scope, backend } => {
            set_state(&client, &scope, &backend, Action::Enable)
                .await
                .map(drop)
        }
        CtlCommand::Reload => reload(&client).await,
    }
}

/// Drain or enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Drain,
    Enable,
}

impl Action {
    fn route(self) -> &'static str {
        match self {
            Action::Drain => "drain",
            Action::Enable => "enable",
        }
    }

    pub(crate) fn done(self) -> &'static str {
        match self {
            Action::Drain => "drained",
            Action::Enable => "enabled",
        }
    }
}

/// A backend found in `/status` through a listener or a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// `listeners` or `pools`: the admin route's first part.
    kind: &'static str,
    /// The name given.
    name: String,
    /// Its pool, where the backend's counts are.
    pool: String,
    /// The backend's address as `/status` writes it.
    addr: String,
}

impl Found {
    /// A backend of pool `pool`, named through the pool.
    pub(crate) fn in_pool(pool: &str, addr: &str) -> Found {
        Found {
            kind: "pools",
            name: pool.to_owned(),
            pool: pool.to_owned(),
            addr: addr.to_owned(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        let kind = self.kind.trim_end_matches('s');
        format!("{} in {kind} `{}`", self.addr, self.name)
    }
}

/// Finds `backend` through listener or pool `name`, or says what exists instead.
pub(crate) fn find(status: &Status, name: &str, backend: &str) -> Result<Found, Failure> {
    // A listener that routes has several pools: its backends are named by pool.
    let through = |l: &&ListenerStatus| l.name == name && !l.pool.is_empty();
    let (kind, pool) = if let Some(listener) = status.listeners.iter().find(through) {
        ("listeners", listener.pool.as_str())
    } else if let Some(pool) = status.pools.iter().find(|p| p.name == name) {
        ("pools", pool.name.as_str())
    } else if let Some(routed) = status.listeners.iter().find(|l| l.name == name) {
        return Err(Failure::Unknown(format!(
            "listener `{name}` routes to pools by server name: name the pool instead ({})",
            routed.destination().trim_start_matches("sni:")
        )));
    } else {
        let listeners: Vec<&str> = status.listeners.iter().map(|l| l.name.as_str()).collect();
        let pools: Vec<&str> = status
            .pools
            .iter()
            .filter(|p| !p.inline)
            .map(|p| p.name.as_str())
            .collect();
        let mut known = format!("listeners: {}", list(&listeners));
        if !pools.is_empty() {
            known.push_str(&format!("; pools: {}", list(&pools)));
        }
        return Err(Failure::Unknown(format!(
            "no listener or pool named `{name}` ({known})"
        )));
    };
    let pool_status: Option<&PoolStatus> = status.pools.iter().find(|p| p.name == pool);
    let backends: Vec<&str> = pool_status
        .map(|p| p.backends.iter().map(|b| b.addr.as_str()).collect())
        .unwrap_or_default();
    let wanted = backend.trim().parse::<SocketAddr>().ok();
    let addr = backends.iter().find(|addr| match wanted {
        Some(wanted) => addr.parse::<SocketAddr>().ok() == Some(wanted),
        None => **addr == backend.trim(),
    });
    let Some(addr) = addr else {
        let kind = kind.trim_end_matches('s');
        return Err(Failure::Unknown(format!(
            "{kind} `{name}` has no backend {backend} (its backends: {})",
            list(&backends)
        )));
    };
    Ok(Found {
        kind,
        name: name.to_owned(),
        pool: pool.to_owned(),
        addr: (*addr).to_owned(),
    })
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// `[` and `]` of an IPv6 address are not allowed in a path as they are.
fn path_segment(text: &str) -> String {
    text.replace('[', "%5B").replace(']', "%5D")
}

/// Drains or enables the backend and reports its state afterwards.
pub(crate) async fn set_state(
    client: &Client,
    name: &str,
    backend: &str,
    action: Action,
) -> Result<Found, Failure> {
    let status = status::read(client, false).await?.status;
    let found = find(&status, name, backend)?;
    let open = act(client, &found, action).await?;
    println!(
        "{} {}: {open} open connection(s)",
        action.done(),
        found.describe()
    );
    Ok(found)
}

/// Drains or enables a backend found before; returns its open connections afterwards.
pub(crate) async fn act(client: &Client, found: &Found, action: Action) -> Result<u64, Failure> {
    let path = format!(
        "/{}/{}/backends/{}/{}",
        found.kind,
        found.name,
        path_segment(&found.addr),
        action.route()
    );
    let answer = client.post(&path).await?;
    let body = action_answer(&answer, action)?;
    Ok(body
        .get("active_connections")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0))
}

/// The JSON of a drain or enable answer, or the failure it reports.
fn action_answer(answer: &Answer, action: Action) -> Result<serde_json::Value, Failure> {
    match answer.status {
        200 => serde_json::from_str(&answer.body).map_err(|e| {
            Failure::Other(format!(
                "{}: the endpoint's answer is not JSON ({e})",
                action.route()
            ))
        }),
        404 => Err(Failure::Unknown(answer.error_text())),
        status => Err(Failure::Other(format!(
            "{} refused ({status}): {}",
            action.route(),
            answer.error_text()
        ))),
    }
}

/// Waits until the drained backend has no open connection, showing the count as it falls.
async fn wait_drained(client: &Client, found: &Found, timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    let terminal = std::io::stderr().is_terminal();
    let mut shown = None;
    loop {
        let status = status::read(client, false).await?.status;
        let open = status
            .pools
            .iter()
            .find(|p| p.name == found.pool)
            .and_then(|p| p.backends.iter().find(|b| b.addr == found.addr))
            .map(|b| b.active_connections)
            .ok_or_else(|| {
                Failure::Unknown(format!(
                    "{} is no longer configured (a reload removed it)",
                    found.describe()
                ))
            })?;
        if shown != Some(open) {
            let line = format!("waiting for {}: {open} open connection(s)", found.addr);
            // On a terminal the count is rewritten in place; a log gets a line per change.
            if terminal {
                eprint!("\r\x1b[K{line}");
                if open == 0 {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            // Progress only: a closed stderr must not stop the wait.
            drop(std::io::stderr().flush());
            shown = Some(open);
        }
        if open == 0 {
            println!("{}: no open connection left", found.describe());
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            if terminal {
                eprintln!();
            }
            return Err(Failure::StillOpen(format!(
                "timed out after {}: {} still has {open} open connection(s); it stays drained",
                humantime::format_duration(timeout),
                found.describe()
            )));
        }
        tokio::time::sleep_until((now + WAIT_POLL).min(deadline)).await;
    }
}

/// `POST /reload`, printing what changed or failing with the balancer's error.
async fn reload(client: &Client) -> Result<(), Failure> {
    let answer = client.post("/reload").await?;
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    if answer.status == 200 && body["ok"] == true {
        let changes = body["changes"].as_str().unwrap_or("");
        println!("reloaded: {changes}");
        if let Some(pending) = body["needs_restart"].as_array().filter(|p| !p.is_empty()) {
            let pending: Vec<String> = pending
                .iter()
                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                .collect();
            println!("needs a restart to apply: {}", pending.join(", "));
        }
        return Ok(());
    }
    let error = answer.error_text();
    Err(Failure::ReloadRefused(format!(
        "reload refused; the running configuration stays in force: {error}"
    )))
}

/// Text columns, each as wide as its widest cell; numbers right-aligned.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], right: &[bool]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths[i];
            if i > 0 {
                text.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                text.push_str(&format!("{cell:>width$}"));
            } else {
                text.push_str(&format!("{cell:<width$}"));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// `ctl status` as text: a summary line, the listeners, then each pool's backends.
pub(crate) fn render_status(reading: &Reading) -> String {
    let status = &reading.status;
    let mut out = String::new();
    let uptime = status.uptime_seconds;
    out.push_str(&format!("weighbridge {}", status.version));
    if let Some(up) = uptime {
        out.push_str(&format!(", up {}", format::uptime(up)));
    }
    if let Some(file) = &status.config_file {
        out.push_str(&format!(", config {file}"));
    }
    out.push_str(&format!(
        ", reloads: {} ok, {} failed",
        status.reloads.succeeded, status.reloads.failed
    ));
    if let Some(last) = &status.reloads.last {
        let outcome = if last.ok { "applied" } else { "refused" };
        out.push_str(&format!(" (last {outcome} at {})", last.at));
    }
    out.push_str("\n\n");

    // Rates here are averages since start: one reading has no interval. `top` shows them live.
    let per_second = |n: u64| match uptime {
        Some(up) if up > 0.0 => format::count(n as f64 / up),
        _ => "-".to_owned(),
    };
    let rows: Vec<Vec<String>> = status
        .listeners
        .iter()
        .map(|l| {
            let queued = status
                .pools
                .iter()
                .find(|p| p.name == l.pool)
                .map_or(0, |p| p.queue.length);
            vec![
                l.name.clone(),
                l.bind.clone().unwrap_or_else(|| "-".to_owned()),
                l.destination(),
                if l.strategy.is_empty() && !l.routes.is_empty() {
                    "routes".to_owned()
                } else {
                    l.strategy.clone()
                },
                l.connections.open.to_string(),
                queued.to_string(),
                l.connections.accepted.to_string(),
                l.connections.rejected().to_string(),
                per_second(l.connections.accepted),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "LISTENER",
            "ADDRESS",
            "POOL",
            "STRATEGY",
            "OPEN",
            "QUEUED",
            "ACCEPTED",
            "REJECTED",
            "CONN/S AVG",
        ],
        &rows,
        &[false, false, false, false, true, true, true, true, true],
    );

    for pool in &status.pools {
        out.push('\n');
        let used_by = if pool.inline {
            String::new()
        } else {
            format!(
                ", listeners: {}",
                list(
                    &pool
                        .listeners
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                )
            )
        };
        out.push_str(&format!(
            "pool {} ({}{used_by}); queue: {} waiting, {} served, {} timed out\n",
            pool.name, pool.strategy, pool.queue.length, pool.queue.served, pool.queue.timed_out
        ));
        let rows: Vec<Vec<String>> = pool
            .backends
            .iter()
            .map(|b| {
                let slots = b
                    .max_connections
                    .map_or_else(|| "-".to_owned(), |m| m.to_string());
                let p99 = reading
                    .connect
                    .get(&(pool.name.clone(), b.addr.clone()))
                    .and_then(|h| h.quantile(0.99));
                vec![
                    b.addr.clone(),
                    b.state_with_reason(),
                    format::weight(b.weight),
                    format::weight(b.effective_weight),
                    format!("{}/{slots}", b.active_connections),
                    b.load_estimate.to_string(),
                    b.connections_total.to_string(),
                    b.connect_failures.to_string(),
                    format::latency(p99),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "BACKEND",
                "HEALTH",
                "WEIGHT",
                "EFFECTIVE",
                "OPEN/SLOTS",
                "LOAD",
                "CONNECTIONS",
                "FAILURES",
                "CONNECT P99",
            ],
            &rows,
            &[false, false, true, true, true, true, true, true, true],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::status::BackendStatus;

    fn fleet() -> Status {
        let backend = |addr: &str| BackendStatus {
            addr: addr.to_owned(),
            admin_state: "ready".into(),
            ..BackendStatus::default()
        };
        Status {
            listeners: vec![ListenerStatus {
                name: "chat".into(),
                pool: "llama".into(),
                ..ListenerStatus::default()
            }],
            pools: vec![PoolStatus {
                name: "llama".into(),
                listeners: vec!["chat".into()],
                backends: vec![backend("127.0.0.1:9001"), backend("[::1]:9002")],
                ..PoolStatus::default()
            }],
            ..Status::default()
        }
    }

    #[test]
    fn a_backend_is_found_through_its_listener_or_its_pool() {
        let status = fleet();
        let through_listener = find(&status, "chat", "127.0.0.1:9001").expect("known");
        assert_eq!(
            (through_listener.kind, through_listener.pool.as_str()),
            ("listeners", "llama")
        );
        let through_pool = find(&status, "llama", "[0:0:0:0:0:0:0:1]:9002").expect("same address");
        assert_eq!(
            (through_pool.kind, through_pool.addr.as_str()),
            ("pools", "[::1]:9002")
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let status = fleet();
        let Err(Failure::Unknown(message)) = find(&status, "nope", "127.0.0.1:9001") else {
            panic!("unknown scope");
        };
        assert_eq!(
            message,
            "no listener or pool named `nope` (listeners: chat; pools: llama)"
        );
        let Err(Failure::Unknown(message)) = find(&status, "chat", "127.0.0.1:1") else {
            panic!("unknown backend");
        };
        assert_eq!(
            message,
            "listener `chat` has no backend 127.0.0.1:1 (its backends: 127.0.0.1:9001, [::1]:9002)"
        );
    }

    #[test]
    fn ipv6_brackets_are_percent_encoded_in_paths() {
        assert_eq!(path_segment("[::1]:9002"), "%5B::1%5D:9002");
        assert_eq!(path_segment("127.0.0.1:9001"), "127.0.0.1:9001");
    }
}
