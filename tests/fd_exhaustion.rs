//! Running out of file descriptors is survived: accept errors are logged and backed off, and the
//! balancer serves again as soon as descriptors are free.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_weighbridge");
/// Descriptor limit for the balancer: about two dozen for itself with [`THREADS`] workers (each
/// runtime holds a few, each worker its own listening socket), a few connections' worth besides.
const FD_LIMIT: u32 = 32;
/// Worker threads, fixed so that the descriptors the balancer needs do not depend on the cores.
const THREADS: usize = 2;
/// Client connections held open at once, far more than `FD_LIMIT` allows to be proxied.
const CLIENTS: usize = 40;

/// Kills the child when the test ends, whatever happens.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("kill weighbridge: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("reap weighbridge: {e}");
        }
    }
}

/// Polls `condition` every 10 ms until it holds or `within` has passed.
fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A backend that echoes every connection, one thread each.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo backend");
    let addr = listener.local_addr().expect("echo addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream;
                let Ok(mut writer) = reader.try_clone() else {
                    return;
                };
                let mut buf = [0_u8; 1024];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if writer.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn echo_once(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"ping")?;
    let mut reply = [0_u8; 4];
    stream.read_exact(&mut reply)?;
    assert_eq!(&reply, b"ping");
    Ok(())
}

#[test]
fn emfile_is_logged_backed_off_and_recovered_from() {
    let backend = echo_backend();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("wb.toml");
    std::fs::write(
        &config,
        format!(
            "threads = {THREADS}\n[[listener]]\nname = \"tight\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{backend}\"\n"
        ),
    )
    .expect("write config");
    // `ulimit -n` sets the hard limit too, so raising the soft limit at start cannot escape it.
    let script = format!("ulimit -n {FD_LIMIT} && exec \"$0\" --config \"$1\" --log-level info");
    let mut child = Command::new("sh")
        .args(["-c", &script, BIN, config.to_str().expect("utf-8 path")])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weighbridge under ulimit");
    let stderr = child.stderr.take().expect("piped stderr");
    let _running = Running(child);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    let seen = |needle: &str| -> Option<String> {
        let lines = lines.lock().expect("log lock");
        lines.iter().find(|l| l.contains(needle)).cloned()
    };

    eventually(Duration::from_secs(10), "the listening line", || {
        seen("listening").is_some()
    });
    let listening = seen("listening").expect("listening line");
    let port = listening
        .split("bind=127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("bind address in the listening line");
    let addr: SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .expect("listener address");
    echo_once(addr).expect("served before exhaustion");

    // Hold many connections open: the kernel queues them, the balancer runs out of descriptors.
    let held: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| TcpStream::connect(addr).expect("kernel accepts into the backlog"))
        .collect();
    eventually(Duration::from_secs(10), "an accept-error log line", || {
        seen("accept failed").is_some()
    });
    let first_error = Instant::now();
    // Rate-limited: later lines report how many failures went unlogged since the last one. A
    // line with a non-zero count proves failed accepts were counted rather than each logged.
    eventually(
        Duration::from_secs(10),
        "an accept-error line counting suppressed failures",
        || {
            lines.lock().expect("log lock").iter().any(|l| {
                l.contains("accept failed")
                    && l.split("suppressed=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
            })
        },
    );
    let elapsed = first_error.elapsed().as_secs();
    let logged = lines
        .lock()
        .expect("log lock")
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    // At most one line per worker per second (plus the first of each, and a second for the
    // reader thread's lag), not one per failed accept.
    let most = THREADS * (usize::try_from(elapsed).expect("seconds fit") + 2);
    assert!(
        logged <= most,
        "{logged} accept-error lines in {elapsed}s from {THREADS} workers"
    );

    drop(held);
    eventually(
        Duration::from_secs(15),
        "service after descriptors are free",
        || echo_once(addr).is_ok(),
    );
}
