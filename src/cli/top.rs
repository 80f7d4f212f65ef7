//! `weighbridge top`: the fleet live in a terminal, read from the admin endpoint every interval.
//!
//! Three sources feed one loop: readings (a task reads `/status` and `/metrics` every
//! interval, each on a fresh connection, so a restarted balancer is picked up by the next
//! one), keys (a thread blocked on the terminal) and the outcomes of drains and enables. The
//! loop hands each to the [`model::Model`] and draws it again with [`render::render`].

pub(crate) mod model;
pub(crate) mod render;

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::admin_client::{AdminArgs, Client};
use super::ctl::{self, Found};
use super::failure::Failure;
use super::status;
use model::{Command, Model};

/// `weighbridge top`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// How often to read the endpoint; rates are over this interval.
    #[arg(long, default_value = "1s", value_parser = interval)]
    interval: Duration,
    /// Print one frame as text and exit, after two readings one interval apart: for a
    /// script, or a terminal top cannot take over.
    #[arg(long)]
    once: bool,
    /// With --once: the frame's size, COLUMNSxROWS.
    #[arg(long, default_value = "80x24", value_parser = size, requires = "once")]
    size: (u16, u16),
}

fn interval(value: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if interval < Duration::from_millis(100) {
        return Err("at least 100ms: each reading is two requests to the balancer".to_owned());
    }
    Ok(interval)
}

fn size(value: &str) -> Result<(u16, u16), String> {
    let parsed = value
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<u16>().ok()?, h.parse::<u16>().ok()?)));
    match parsed {
        Some((w, h)) if w >= 20 && h >= 5 => Ok((w, h)),
        _ => Err("COLUMNSxROWS such as 80x24, at least 20x5".to_owned()),
    }
}

/// Whether to draw colours: not when NO_COLOR is set to anything (no-color.org).
fn colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Runs `top`; `parent_config` is a `--config` given before the subcommand.
pub(crate) fn run(args: TopArgs, parent_config: Option<&Path>) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the async runtime: {e}")))
        .and_then(|runtime| {
            runtime.block_on(async {
                let client = Client::from_args(&args.admin, parent_config)?;
                if args.once {
                    once(&client, args.interval, args.size).await
                } else {
                    live(client, args.interval).await
                }
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// `--once`: two readings an interval apart, one frame on stdout.
async fn once(
    client: &Client,
    interval: Duration,
    (width, height): (u16, u16),
) -> Result<(), Failure> {
    let mut model = Model::new(client.target().authority(), interval, false);
    let start = Instant::now();
    for i in 0..2 {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let reading = status::read(client, true).await?;
        model.on_reading(Ok(reading), start.elapsed());
    }
    let mut terminal = Terminal::new(TestBackend::new(width, height))
        .map_err(|e| Failure::Other(format!("cannot draw: {e}")))?;
    terminal
        .draw(|frame| render::render(frame, &model))
        .map_err(|e| Failure::Other(format!("cannot draw: {e}")))?;
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..height {
        let line: String = (0..width).map(|x| buffer[(x, y)].symbol()).collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    print!("{}", text.trim_end_matches('\n'));
    println!();
    Ok(())
}

/// What reaches the loop.
enum Input {
    // Boxed: a reading is large, and keys are many.
    Reading(Box<Result<status::Reading, Failure>>, Duration),
    Key(event::KeyEvent),
    Resize,
    Done(String),
}

/// The interactive view, until `q`.
async fn live(client: Client, interval: Duration) -> Result<(), Failure> {
    if !std::io::stdout().is_terminal() {
        return Err(Failure::Other(
            "top needs a terminal; use --once for a text frame".to_owned(),
        ));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let reader = {
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let reading = status::read(&client, true).await;
                if tx
                    .send(Input::Reading(Box::new(reading), start.elapsed()))
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    {
        let tx = tx.clone();
        // crossterm's reads block; a thread of their own keeps them off the runtime. It ends
        // with the process.
        std::thread::Builder::new()
            .name("weighbridge-keys".to_owned())
            .spawn(move || {
                loop {
                    let input = match event::read() {
                        Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => Input::Key(key),
                        Ok(Event::Resize(..)) => Input::Resize,
                        Ok(_) => continue,
                        Err(_) => return,
                    };
                    if tx.send(input).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Failure::Other(format!("cannot read keys: {e}")))?;
    }
    let mut terminal = ratatui::try_init()
        .map_err(|e| Failure::Other(format!("cannot take over the terminal: {e}")))?;
    let mut model = Model::new(client.target().authority(), interval, colour());
    let outcome = async {
        loop {
            terminal
                .draw(|frame| render::render(frame, &model))
                .map_err(|e| Failure::Other(format!("cannot draw: {e}")))?;
            let Some(input) = rx.recv().await else {
                return Ok(());
            };
            match input {
                Input::Reading(reading, taken) => model.on_reading(*reading, taken),
                Input::Resize => {}
                Input::Done(notice) => model.notice = Some(notice),
                Input::Key(key) => match model.on_key(key) {
                    Command::None => {}
                    Command::Quit => return Ok(()),
                    Command::Act(pending) => {
                        let (client, tx) = (client.clone(), tx.clone());
                        model.notice =
                            Some(format!("{} {} ...", pending.action.done(), pending.addr));
                        tokio::spawn(async move {
                            let found = Found::in_pool(&pending.pool, &pending.addr);
                            let notice = match ctl::act(&client, &found, pending.action).await {
                                Ok(open) => format!(
                                    "{} {}: {open} open connection(s)",
                                    pending.action.done(),
                                    found.describe()
                                ),
                                Err(failure) => failure.message().to_owned(),
                            };
                            // The loop may have ended meanwhile; the outcome then has no reader.
                            drop(tx.send(Input::Done(notice)));
                        });
                    }
                },
            }
        }
    }
    .await;
    ratatui::restore();
    reader.abort();
    outcome
}
