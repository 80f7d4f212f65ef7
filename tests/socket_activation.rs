//! Socket activation: a listener whose `bind` is the address of a listening socket passed in
//! (`LISTEN_FDS`, `LISTEN_PID`, from fd 3 on, as a systemd `.socket` unit passes them) accepts
//! on that socket instead of binding; a listener that finds none binds as usual.

mod support;

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;

use support::{BIN, Mock, Process, bounded, config_file, echo};

/// Limit for every test here.
const LIMIT: Duration = Duration::from_secs(30);

/// Starts the binary with `socket` as fd 3 and `LISTEN_PID` its own pid, which the test cannot
/// know before the spawn: a shell moves the socket from its stdin to fd 3, exports `$$` and
/// execs the binary, which keeps the shell's pid.
fn spawn_activated(config: &std::path::Path, socket: std::net::TcpListener) -> Process {
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(r#"exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(BIN)
        .arg("--config")
        .arg(config)
        .args(["--log-level", "info", "--no-watch"]);
    Process::spawn_with_stdin(&mut command, Stdio::from(OwnedFd::from(socket)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_accepts_on_the_socket_passed_for_its_address() {
    bounded(LIMIT, async {
        let backend = Mock::echo().await;
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the socket to pass");
        let addr = socket.local_addr().expect("its address");
        let config = config_file(&format!(
            "shutdown_grace = \"5s\"\n\
             [[listener]]\nname = \"activated\"\nbind = \"{addr}\"\n\
             [[listener.backend]]\naddr = \"{}\"\n\
             [[listener]]\nname = \"bound\"\nbind = \"127.0.0.1:0\"\n\
             [[listener.backend]]\naddr = \"{}\"\n",
            backend.addr, backend.addr
        ));
        let mut wb = spawn_activated(config.path(), socket);
        assert_eq!(wb.listening("activated").await, addr);
        wb.wait_for("socket passed by systemd", 1).await;
        wb.wait_for("listener on inherited sockets listener=activated", 1)
            .await;
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the passed socket");
        echo(&mut stream, b"through the passed socket")
            .await
            .expect("relayed");

        let other = wb.listening("bound").await;
        assert_ne!(other, addr);
        let mut stream = TcpStream::connect(other)
            .await
            .expect("connect to the bound one");
        echo(&mut stream, b"through a bound socket")
            .await
            .expect("relayed");
        assert_eq!(
            wb.count("listener on inherited sockets"),
            1,
            "{}",
            wb.tail()
        );

        wb.terminate();
        assert!(wb.exit_status(Duration::from_secs(20)).await.success());
    })
    .await;
}
