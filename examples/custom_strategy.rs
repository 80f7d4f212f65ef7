//! A balancer running a strategy defined outside the crate: "least traffic", which sends each
//! new connection to the backend that has relayed the fewest bytes per unit of weight.
//!
//! ```text
//! cargo run --example custom_strategy
//! ```
//!
//! It starts two loopback backends that answer with their own name, a balancer in front of them
//! with this strategy in place of the file's, and sends one large upload and then a few small
//! ones: the large one lands on one backend, and every small one after it on the other.
//!
//! A strategy is two parts: a [`BuildStrategy`], called whenever the pool's weights change, and
//! the [`Strategy`] it builds, which picks on every worker thread at once and so only reads.
//! Live counters ([`LiveBackend`]) are atomics the data path updates; reading them costs a load.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;

use tokio_util::sync::CancellationToken;
use weighbridge::{Balancer, BuildStrategy, Candidate, Config, LiveBackend, Strategy};

/// Builds [`LeastTraffic`] over a pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastTrafficBuilder;

impl BuildStrategy for LeastTrafficBuilder {
    fn build(&self, backends: &[Candidate]) -> Box<dyn Strategy> {
        Box::new(LeastTraffic {
            backends: backends
                .iter()
                .map(|b| (b.weight(), b.live().clone()))
                .collect(),
        })
    }

    fn name(&self) -> &str {
        "least_traffic"
    }
}

/// Picks the backend with the fewest bytes relayed per unit of weight; ties go to the first.
#[derive(Debug)]
pub struct LeastTraffic {
    backends: Vec<(f64, LiveBackend)>,
}

impl Strategy for LeastTraffic {
    fn pick(&self, _turn: u64, tried: &[usize]) -> Option<usize> {
        let traffic = |live: &LiveBackend| {
            let c = live.counters();
            (c.bytes_to_backend + c.bytes_from_backend) as f64
        };
        self.backends
            .iter()
            .enumerate()
            // The two rules every strategy keeps: never weight 0, never one already tried.
            .filter(|(i, (weight, _))| *weight > 0.0 && !tried.contains(i))
            .min_by(|(_, (wa, a)), (_, (wb, b))| (traffic(a) / wa).total_cmp(&(traffic(b) / wb)))
            .map(|(i, _)| i)
    }
}

/// A backend on a free loopback port that reads a request to its end and answers `name`.
pub fn named_backend(name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut sink = Vec::new();
            if stream.read_to_end(&mut sink).is_ok() {
                // The client may be gone already; the next one is served all the same.
                drop(stream.write_all(name.as_bytes()));
            }
        }
    });
    Ok(addr)
}

/// Sends `bytes` through the balancer at `lb` and returns the name of the backend that answered.
pub fn send(lb: SocketAddr, bytes: usize) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(lb)?;
    stream.write_all(&vec![b'x'; bytes])?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The configuration of a balancer on a free loopback port in front of `a` and `b`.
pub fn config(a: SocketAddr, b: SocketAddr) -> Result<Config, weighbridge::ConfigError> {
    let text = format!(
        r#"
        [[listener]]
        name = "chat"
        bind = "127.0.0.1:0"
        [[listener.backend]]
        addr = "{a}"
        [[listener.backend]]
        addr = "{b}"
        "#
    );
    Config::parse(&text, Path::new("custom_strategy.toml"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = config(named_backend("a")?, named_backend("b")?)?;
    let balancer = Balancer::builder(config)
        .strategy("chat", LeastTrafficBuilder)
        .bind()?;
    let lb = balancer
        .local_addr("chat")
        .ok_or("listener `chat` is not bound")?;
    let stop = CancellationToken::new();
    let running = tokio::spawn(balancer.run(stop.clone()));
    let answers = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(usize, String)>> {
        [1 << 20, 10, 10, 10]
            .into_iter()
            .map(|bytes| Ok((bytes, send(lb, bytes)?)))
            .collect()
    })
    .await??;
    for (bytes, backend) in answers {
        println!("{bytes:>8} bytes -> backend {backend}");
    }
    stop.cancel();
    running.await?;
    Ok(())
}
