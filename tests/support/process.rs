//! The `weighbridge` binary as a child process: started with its stderr collected line by line,
//! signalled, and killed when the test ends however it ends.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;

use super::poll::poll_until;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_weighbridge");
/// How long the binary may take to log what a test waits for (starting, a reload).
pub const LOG_WITHIN: Duration = Duration::from_secs(10);
/// How long a run of the binary that ends by itself may take.
const RUN_WITHIN: Duration = Duration::from_secs(20);
/// Lines of stderr a failure message quotes.
const TAIL: usize = 30;

/// Writes `text` to a temporary config file, removed when the value is dropped.
pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("create temp config");
    file.write_all(text.as_bytes()).expect("write temp config");
    file
}

/// The command [`Process::start`] runs: the binary on `config` at log level `info` (unless
/// `args` give one), with `args` after those; for a test that sets up more before
/// [`Process::spawn`].
pub fn command(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--config").arg(config);
    if !args.contains(&"--log-level") {
        command.args(["--log-level", "info"]);
    }
    command.args(args);
    command
}

/// Runs the binary with `args` to its end and returns its output; kills it and fails if it runs
/// past 20 s.
pub async fn run(args: &[&str]) -> Output {
    run_command(Command::new(BIN).args(args)).await
}

/// Like [`run`], for a command the caller has set up.
pub async fn run_command(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(RUN_WITHIN, output)
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not exit within {RUN_WITHIN:?}"))
        .expect("run weighbridge")
}

/// The running binary; killed when dropped. Its stderr is collected line by line (and printed
/// if the test fails), unless the test took it with [`Process::spawn_with_stderr`].
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `log` until the process closes it.
    reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Starts the binary on `config` at log level `info`, with `args` after those.
    pub fn start(config: &Path, args: &[&str]) -> Process {
        Process::spawn(&mut command(config, args))
    }

    /// Starts `command` (the binary, or a shell that execs it) and collects its stderr.
    pub fn spawn(command: &mut Command) -> Process {
        Process::spawn_with_stdin(command, Stdio::null())
    }

    /// Like [`Process::spawn`], with `stdin` as the process's standard input (a socket to pass
    /// it, say).
    pub fn spawn_with_stdin(command: &mut Command, stdin: Stdio) -> Process {
        let (mut process, stderr) = Process::spawn_inner(command, stdin);
        let sink = Arc::clone(&process.log);
        process.reader = Some(tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        }));
        process
    }

    /// Starts `command` and hands its stderr to the caller, who reads it (or not) as it likes;
    /// the process's own log stays empty.
    pub fn spawn_with_stderr(command: &mut Command) -> (Process, ChildStderr) {
        Process::spawn_inner(command, Stdio::null())
    }

    fn spawn_inner(command: &mut Command, stdin: Stdio) -> (Process, ChildStderr) {
        let mut child = command
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn weighbridge");
        let stderr = child.stderr.take().expect("stderr is piped");
        let process = Process {
            child,
            log: Arc::default(),
            reader: None,
        };
        (process, stderr)
    }

    /// Lines of stderr so far.
    pub fn lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The first line of stderr containing `needle`.
    pub fn logged(&self, needle: &str) -> Option<String> {
        self.lines().into_iter().find(|line| line.contains(needle))
    }

    /// How many lines of stderr contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The last lines of stderr, for failure messages.
    pub fn tail(&self) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(TAIL)..].join("\n")
    }

    /// Waits until `n` lines of stderr contain `needle`; fails after [`LOG_WITHIN`] with the
    /// exit status and the tail of stderr.
    pub async fn wait_for(&mut self, needle: &str, n: usize) {
        let found = poll_until(LOG_WITHIN, || self.count(needle) >= n).await;
        let status = self.child.try_wait().expect("poll weighbridge");
        assert!(
            found,
            "no {n} line(s) with {needle:?} within {LOG_WITHIN:?} (exit status {status:?}); \
             stderr:\n{}",
            self.tail()
        );
    }

    /// The address listener `name` was last reported bound to, once it has been.
    pub async fn listening(&mut self, name: &str) -> SocketAddr {
        let marker = format!(" listening listener={name} ");
        self.wait_for(&marker, 1).await;
        let line = self
            .lines()
            .into_iter()
            .rev()
            .find(|line| line.contains(&marker))
            .expect("waited for this line");
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("bind="))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no bind=IP:PORT in {line:?}"))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Pid {
        let id = self.child.id().expect("weighbridge is still running");
        Pid::from_raw(i32::try_from(id).expect("a pid fits in i32")).expect("a pid is not 0")
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill_process(self.pid(), signal).unwrap_or_else(|e| panic!("send {signal:?}: {e}"));
    }

    /// Sends `signal` to the process group the process leads (see `Command::process_group`).
    pub fn signal_group(&self, signal: Signal) {
        kill_process_group(self.pid(), signal)
            .unwrap_or_else(|e| panic!("send {signal:?} to the group: {e}"));
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// Sends SIGHUP.
    pub fn hangup(&self) {
        self.signal(Signal::HUP);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("poll the weighbridge process")
            .is_none()
    }

    /// Waits for the process to exit, failing after `within`, then for the rest of its stderr.
    pub async fn exit_status(&mut self, within: Duration) -> ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("weighbridge still running after {within:?}"))
            .expect("wait for weighbridge");
        if let Some(reader) = self.reader.take() {
            tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("stderr reaches end of file once the process has exited")
                .expect("the stderr reader does not panic");
        }
        status
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid().as_raw_pid()))
            .expect("read /proc/PID/fd")
            .count()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.start_kill() {
                eprintln!("kill weighbridge: {e}");
            }
        }
        if std::thread::panicking() {
            eprintln!("weighbridge stderr:\n{}", self.lines().join("\n"));
        }
    }
}
