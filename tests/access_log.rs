//! The access log as a user sees it: run the binary, make connections end in every way, and
//! read its stderr. One line per closed client connection, with the same fields in `text` and
//! `json` format; in `json` format every line of the log is one JSON object.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::{
    Mock, Process, Refusing, assert_closed_without_data, bounded, command, config_file, eventually,
    greeter,
};

const LIMIT: Duration = Duration::from_secs(30);
const SOON: Duration = Duration::from_secs(10);
/// The `idle_timeout` of listener `echo`.
const IDLE_MS: f64 = 300.0;

/// The balancer as a child process, and the format of its log.
struct Balancer {
    process: Process,
    json: bool,
}

impl Balancer {
    fn start(config: &Path, json: bool) -> Balancer {
        Balancer {
            process: Process::start(config, &["--no-watch"]),
            json,
        }
    }

    /// The fields of every line so far, as text.
    fn events(&self) -> Vec<HashMap<String, String>> {
        self.process
            .lines()
            .iter()
            .map(|line| fields(line, self.json))
            .collect()
    }

    /// Where listener `name` is bound, from its `listening` line.
    async fn listener(&self, name: &str) -> SocketAddr {
        let mut found = None;
        eventually(SOON, &format!("listener {name} to be listening"), || {
            found = self.events().into_iter().find_map(|f| {
                (f.get("message").map(String::as_str) == Some("listening")
                    && f.get("listener").map(String::as_str) == Some(name))
                .then(|| f.get("bind").cloned())
                .flatten()
            });
            found.is_some()
        })
        .await;
        found
            .expect("found above")
            .parse()
            .expect("bind is an address")
    }

    /// Access log lines so far.
    fn access(&self) -> Vec<HashMap<String, String>> {
        self.events()
            .into_iter()
            .filter(|f| f.get("target").map(String::as_str) == Some("weighbridge::access"))
            .collect()
    }
}

/// The message, target and fields of one log line. Text lines look like
/// `TIME  INFO target: message key=value key=value`; JSON lines are objects whose fields sit
/// at the top level.
fn fields(line: &str, json: bool) -> HashMap<String, String> {
    if json {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let object = value.as_object().expect("each log line is a JSON object");
        return object
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
    }
    let mut fields = HashMap::new();
    let Some((head, rest)) = line.split_once(": ") else {
        return fields;
    };
    let mut head = head.split_whitespace().rev();
    if let (Some(target), Some(level)) = (head.next(), head.next()) {
        fields.insert("target".to_owned(), target.to_owned());
        fields.insert("level".to_owned(), level.to_owned());
    }
    let mut message = Vec::new();
    for word in rest.split(' ') {
        match word.split_once('=') {
            Some((key, value)) => {
                fields.insert(key.to_owned(), value.trim_matches('"').to_owned());
            }
            None => message.push(word),
        }
    }
    fields.insert("message".to_owned(), message.join(" "));
    fields
}

/// Makes connections end in every way the access log names, then checks the lines.
async fn every_ending_is_logged(json: bool) {
    let echo = Mock::echo().await;
    let greeter = greeter(b"hello").await;
    let refusing = Refusing::new();
    let format = if json { "json" } else { "text" };
    let text = format!(
        "shutdown_grace = \"200ms\"\n\
         [log]\nformat = \"{format}\"\naccess_log = true\n\
         [[listener]]\nname = \"echo\"\nbind = \"127.0.0.1:0\"\nidle_timeout = \"{IDLE_MS}ms\"\n\
         [[listener.backend]]\naddr = \"{echo}\"\n\
         [[listener]]\nname = \"greeter\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{greeter}\"\n\
         [[listener]]\nname = \"dead\"\nbind = \"127.0.0.1:0\"\n\
         [[listener.backend]]\naddr = \"{refusing}\"\n\
         [[listener]]\nname = \"one\"\nbind = \"127.0.0.1:0\"\nmax_connections = 1\n\
         [[listener.backend]]\naddr = \"{echo}\"\n\
         [[listener]]\nname = \"sick\"\nbind = \"127.0.0.1:0\"\n\
         [listener.health]\nkind = \"tcp\"\ninterval = \"100ms\"\nfall = 1\n\
         startup_grace = \"0s\"\nall_unhealthy = \"reject\"\n\
         [[listener.backend]]\naddr = \"{refusing}\"\n",
        echo = echo.addr,
        refusing = refusing.addr,
    );
    let file = config_file(&text);
    let mut lb = Balancer::start(file.path(), json);
    let mut clients: HashMap<&str, SocketAddr> = HashMap::new();

    // The client finishes first.
    let mut stream = TcpStream::connect(lb.listener("echo").await)
        .await
        .expect("connect to echo");
    clients.insert(
        "client_closed",
        stream.local_addr().expect("client address"),
    );
    stream.write_all(&[7; 100]).await.expect("send 100 bytes");
    stream.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    stream
        .read_to_end(&mut echoed)
        .await
        .expect("read the echo");
    assert_eq!(echoed.len(), 100);
    drop(stream);

    // The backend finishes first.
    let mut stream = TcpStream::connect(lb.listener("greeter").await)
        .await
        .expect("connect to greeter");
    clients.insert(
        "backend_closed",
        stream.local_addr().expect("client address"),
    );
    let mut greeting = Vec::new();
    stream
        .read_to_end(&mut greeting)
        .await
        .expect("read the greeting");
    assert_eq!(greeting, b"hello");
    drop(stream);

    // Nothing moves.
    let mut stream = TcpStream::connect(lb.listener("echo").await)
        .await
        .expect("connect to echo");
    clients.insert("idle_timeout", stream.local_addr().expect("client address"));
    assert_closed_without_data(&mut stream, SOON).await;

    // The only backend refuses.
    let mut stream = TcpStream::connect(lb.listener("dead").await)
        .await
        .expect("connect to dead");
    clients.insert(
        "connect_failed",
        stream.local_addr().expect("client address"),
    );
    assert_closed_without_data(&mut stream, SOON).await;

    // One connection open on a listener that takes one; the next is refused.
    let one = lb.listener("one").await;
    let mut held = TcpStream::connect(one).await.expect("connect to one");
    clients.insert("shutdown", held.local_addr().expect("client address"));
    held.write_all(b"x").await.expect("send a byte");
    let mut byte = [0_u8; 1];
    held.read_exact(&mut byte).await.expect("read its echo");
    let mut refused = TcpStream::connect(one).await.expect("connect to one again");
    clients.insert("rejected", refused.local_addr().expect("client address"));
    assert_closed_without_data(&mut refused, SOON).await;

    // The only backend fails its checks: under all_unhealthy = "reject" clients are closed.
    let sick = lb.listener("sick").await;
    eventually(SOON, "the listener to find no backend healthy", || {
        lb.process
            .lines()
            .iter()
            .any(|l| l.contains("no backend is healthy") && l.contains("sick"))
    })
    .await;
    let mut turned_away = TcpStream::connect(sick).await.expect("connect to sick");
    clients.insert(
        "rejected_all_unhealthy",
        turned_away.local_addr().expect("client address"),
    );
    assert_closed_without_data(&mut turned_away, SOON).await;

    // Shutdown cuts the held one once the 200 ms grace period is over.
    lb.process.terminate();
    let status = lb.process.exit_status(SOON).await;
    assert!(status.success(), "{status:?}");
    eventually(SOON, "seven access log lines", || lb.access().len() == 7).await;
    drop(held);

    let access = lb.access();
    for line in &access {
        assert_eq!(line["message"], "connection closed", "{line:?}");
        assert_eq!(line["level"], "INFO", "{line:?}");
    }
    // The line of the client `clients[case]`, which must say `end`.
    let line_of = |case: &str, end: &str| -> HashMap<String, String> {
        let client = clients[case].to_string();
        let mut matching = access.iter().filter(|f| f["client"] == client);
        let line = matching
            .next()
            .unwrap_or_else(|| panic!("no line for {case} ({client}) in {access:#?}"))
            .clone();
        assert!(matching.next().is_none(), "two lines for {case}");
        assert_eq!(line["end"], end, "{case}: {line:?}");
        line
    };
    let by_end = |end: &str| line_of(end, end);
    let number = |line: &HashMap<String, String>, key: &str| -> f64 {
        line.get(key)
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number in {line:?}"))
    };

    let line = by_end("client_closed");
    assert_eq!(line["listener"], "echo");
    assert_eq!(line["backend"], echo.addr.to_string());
    assert_eq!(
        (number(&line, "bytes_up"), number(&line, "bytes_down")),
        (100.0, 100.0)
    );
    assert_eq!(number(&line, "attempts"), 1.0);
    assert!(
        number(&line, "connect_ms") <= number(&line, "duration_ms"),
        "{line:?}"
    );

    let line = by_end("backend_closed");
    assert_eq!(line["listener"], "greeter");
    assert_eq!(line["backend"], greeter.to_string());
    assert_eq!(
        (number(&line, "bytes_up"), number(&line, "bytes_down")),
        (0.0, 5.0)
    );

    let line = by_end("idle_timeout");
    assert_eq!(line["listener"], "echo");
    assert!(number(&line, "duration_ms") >= IDLE_MS, "{line:?}");
    assert_eq!(
        (number(&line, "bytes_up"), number(&line, "bytes_down")),
        (0.0, 0.0)
    );

    let line = by_end("connect_failed");
    assert_eq!(line["listener"], "dead");
    assert_eq!(number(&line, "attempts"), 1.0);
    assert!(
        !line.contains_key("backend") && !line.contains_key("connect_ms"),
        "{line:?}"
    );

    let line = by_end("rejected");
    assert_eq!(line["listener"], "one");
    assert_eq!(line["reason"], "max_connections", "{line:?}");
    assert!(!line.contains_key("backend"), "{line:?}");

    let line = line_of("rejected_all_unhealthy", "rejected");
    assert_eq!(line["listener"], "sick");
    assert_eq!(line["reason"], "all_unhealthy", "{line:?}");
    assert!(!line.contains_key("backend"), "{line:?}");

    let line = by_end("shutdown");
    assert_eq!(line["listener"], "one");
    assert_eq!(line["backend"], echo.addr.to_string());
    assert_eq!(
        (number(&line, "bytes_up"), number(&line, "bytes_down")),
        (1.0, 1.0)
    );

    if json {
        // Every line, not only the access log, is one JSON object.
        for line in lb.process.lines() {
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            assert!(
                value.get("timestamp").is_some() && value.get("level").is_some(),
                "{line}"
            );
        }
    }
}

#[tokio::test]
async fn text_access_log_names_every_ending() {
    bounded(LIMIT, every_ending_is_logged(false)).await;
}

#[tokio::test]
async fn json_access_log_names_every_ending_and_every_line_parses() {
    bounded(LIMIT, every_ending_is_logged(true)).await;
}

/// Connections through the balancer while nobody reads its stderr (a stalled pipe to a log
/// collector): far more log than the pipe holds, and every connection is still served. The lines
/// are queued, not lost: once the pipe is read again, every one of them arrives.
#[tokio::test]
async fn a_stderr_nobody_reads_does_not_stall_connections() {
    const CONNECTIONS: usize = 1_500;
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let text = format!(
            "[log]\naccess_log = true\n\
             [[listener]]\nname = \"echo\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{}\"\n",
            echo.addr
        );
        let file = config_file(&text);
        let (_wb, stderr) = Process::spawn_with_stderr(&mut command(file.path(), &["--no-watch"]));
        let mut stderr = BufReader::new(stderr).lines();
        let bind: SocketAddr = loop {
            let line = stderr
                .next_line()
                .await
                .expect("read stderr")
                .expect("a listening line before stderr ends");
            let f = fields(&line, false);
            if f.get("message").map(String::as_str) == Some("listening") {
                break f["bind"].parse().expect("bind is an address");
            }
        };

        // About 250 bytes of access log each: several times the 64 KiB a pipe holds.
        for i in 0..CONNECTIONS {
            let mut stream = TcpStream::connect(bind).await.expect("connect to echo");
            stream.write_all(b"ping").await.expect("send");
            stream.shutdown().await.expect("half-close");
            let mut echoed = Vec::new();
            stream
                .read_to_end(&mut echoed)
                .await
                .expect("read the echo");
            assert_eq!(echoed, b"ping", "connection {i}");
        }

        let mut logged = 0;
        while logged < CONNECTIONS {
            let line = stderr
                .next_line()
                .await
                .expect("read stderr")
                .expect("stderr ends only when the process does");
            if fields(&line, false).get("target").map(String::as_str) == Some("weighbridge::access")
            {
                logged += 1;
            }
        }
    })
    .await;
}

/// A client served from the queue logs how long it waited; one that waited too long logs its
/// reason and its wait.
#[tokio::test]
async fn waiting_for_a_slot_is_in_the_access_log() {
    bounded(LIMIT, async {
        let echo = Mock::echo().await;
        let text = format!(
            "shutdown_grace = \"200ms\"\n[log]\nformat = \"json\"\naccess_log = true\n\
             [[pool]]\nname = \"gpu\"\nqueue_timeout = \"300ms\"\n\
             [[pool.backend]]\naddr = \"{}\"\nmax_connections = 1\n\
             [[listener]]\nname = \"chat\"\nbind = \"127.0.0.1:0\"\npool = \"gpu\"\n",
            echo.addr
        );
        let file = config_file(&text);
        // The data plane's debug lines say when a client starts to wait.
        let lb = Balancer {
            process: Process::start(
                file.path(),
                &[
                    "--no-watch",
                    "--log-level",
                    "info,weighbridge::dataplane=debug",
                ],
            ),
            json: true,
        };
        let addr = lb.listener("chat").await;
        let mut holder = TcpStream::connect(addr).await.expect("connect");
        holder.write_all(b"x").await.expect("send");
        let mut one = [0_u8; 1];
        holder
            .read_exact(&mut one)
            .await
            .expect("echo: the slot is taken");

        // Waits past queue_timeout.
        let mut late = TcpStream::connect(addr).await.expect("connect");
        let late_addr = late.local_addr().expect("client address");
        assert_closed_without_data(&mut late, SOON).await;

        // Waits, then gets the slot the holder frees.
        let mut next = TcpStream::connect(addr).await.expect("connect");
        let next_addr = next.local_addr().expect("client address");
        // Only once it waits: freed earlier, the slot would be the newcomer's at once.
        eventually(SOON, "the next client waiting", || {
            lb.events().iter().any(|f| {
                f.get("message").map(String::as_str) == Some("every slot taken; waiting")
                    && f.get("client") == Some(&next_addr.to_string())
            })
        })
        .await;
        drop(holder);
        next.write_all(b"y").await.expect("send");
        next.read_exact(&mut one).await.expect("echo once served");
        next.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        next.read_to_end(&mut rest).await.expect("end");
        drop(next);

        let line_of = |client: SocketAddr| {
            lb.access()
                .into_iter()
                .find(|f| f.get("client") == Some(&client.to_string()))
        };
        eventually(SOON, "both lines", || {
            line_of(late_addr).is_some() && line_of(next_addr).is_some()
        })
        .await;
        let late_line = line_of(late_addr).expect("line");
        assert_eq!(late_line["end"], "rejected");
        assert_eq!(late_line["reason"], "queue_timeout");
        let waited: f64 = late_line["queued_ms"].parse().expect("queued_ms");
        assert!(waited >= 300.0, "{late_line:?}");
        let next_line = line_of(next_addr).expect("line");
        assert_eq!(next_line["end"], "client_closed");
        assert!(next_line.contains_key("queued_ms"), "{next_line:?}");
        assert_eq!(next_line["backend"], echo.addr.to_string());
    })
    .await;
}
