//! Cost of picking a backend, and of building a strategy, for every strategy.
//!
//! ```text
//! cargo bench --bench strategies               # full run
//! cargo bench --bench strategies -- --quick    # a rough number in seconds
//! cargo bench --bench strategies -- pick/weighted_random
//! ```
//!
//! `pick/<strategy>/<backends>` is one first-attempt pick (`tried` empty), the work done on every
//! new connection; `pick_2_threads/<strategy>/<backends>` is the same pick made by two threads at
//! once on one strategy, reported as wall time per pick per thread: it equals the one-thread
//! figure when picking scales across cores, and grows when the threads fight over a cache line;
//! `build/<strategy>/<backends>` is building the strategy, done whenever a
//! snapshot is built. Weights are uneven so round robin's cycle and random's cumulative table are
//! not the trivial ones, and capacity-proportional sees uneven open counts, so its minimum is not
//! always a tie. `consistent_hash` picks by key (each turn stands for a key) under its default
//! balance factor, with those open counts against its bound.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weighbridge::{BuildStrategy, Candidate, LiveBackend, OpenGuard, Strategy, StrategyKind};

/// Backend counts `pick` is measured over: a small pool, a large one, and a very large one.
const BACKEND_COUNTS: [usize; 3] = [4, 64, 1024];
/// Backend count at which building is measured (the most expensive case we support well).
const BUILD_BACKENDS: usize = 1024;
/// Weights cycle through this many distinct values: 1.0, 1.5, ... 4.0.
const WEIGHT_LEVELS: usize = 7;
/// Difference between consecutive weight values.
const WEIGHT_STEP: f64 = 0.5;
/// Open connections per backend cycle through 0..OPEN_LEVELS (co-prime with WEIGHT_LEVELS, so
/// load and capacity combine in many ways).
const OPEN_LEVELS: usize = 11;
/// Time spent measuring each benchmark (criterion's default is 5 s).
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);
/// Time spent warming up before each benchmark (criterion's default is 3 s).
const WARM_UP_TIME: Duration = Duration::from_secs(1);

/// Backend i's weight: uneven, never zero.
fn weights(backends: usize) -> Vec<f64> {
    (0..backends)
        .map(|i| 1.0 + (i % WEIGHT_LEVELS) as f64 * WEIGHT_STEP)
        .collect()
}

/// A pool of `backends` with uneven weights and fresh live counters.
fn pool(backends: usize) -> Vec<Candidate> {
    (0..backends)
        .zip(weights(backends))
        .zip(LiveBackend::pool(backends))
        .map(|((i, weight), live)| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 1 + i as u16));
            Candidate::new(addr, weight, live)
        })
        .collect()
}

/// Opens `(3i + 1) mod OPEN_LEVELS` connections on backend i; they stay counted while the
/// returned guards live.
fn hold_connections(pool: &[Candidate]) -> Vec<OpenGuard> {
    pool.iter()
        .enumerate()
        .flat_map(|(i, backend)| (0..(3 * i + 1) % OPEN_LEVELS).map(move |_| backend.live().open()))
        .collect()
}

/// `kind` built over `backends` uneven weights, with uneven open counts held by the guards.
fn loaded(kind: StrategyKind, backends: usize) -> (Box<dyn Strategy>, Vec<OpenGuard>) {
    let pool = pool(backends);
    let open = hold_connections(&pool);
    (kind.build(&pool), open)
}

fn pick(c: &mut Criterion) {
    for kind in StrategyKind::ALL {
        let mut group = c.benchmark_group(format!("pick/{kind}"));
        for backends in BACKEND_COUNTS {
            let (strategy, _open) = loaded(kind, backends);
            group.bench_with_input(
                BenchmarkId::from_parameter(backends),
                &strategy,
                |b, strategy| {
                    let mut turn = 0_u64;
                    b.iter(|| {
                        turn += 1;
                        strategy.pick(black_box(turn), black_box(&[]))
                    })
                },
            );
        }
        group.finish();
    }
}

/// Threads picking at once in `pick_2_threads`.
const PICKING_THREADS: usize = 2;

fn pick_concurrently(c: &mut Criterion) {
    for kind in StrategyKind::ALL {
        let mut group = c.benchmark_group(format!("pick_{PICKING_THREADS}_threads/{kind}"));
        for backends in BACKEND_COUNTS {
            let (strategy, _open) = loaded(kind, backends);
            group.bench_with_input(
                BenchmarkId::from_parameter(backends),
                &strategy,
                |b, strategy| {
                    b.iter_custom(|iters| {
                        let start = Barrier::new(PICKING_THREADS);
                        std::thread::scope(|scope| {
                            let pickers: Vec<_> = (0..PICKING_THREADS)
                                .map(|_| {
                                    scope.spawn(|| {
                                        start.wait();
                                        let began = Instant::now();
                                        for turn in 0..iters {
                                            black_box(strategy.pick(turn, black_box(&[])));
                                        }
                                        began.elapsed()
                                    })
                                })
                                .collect();
                            pickers
                                .into_iter()
                                .map(|p| p.join().expect("picker thread"))
                                .max()
                                .unwrap_or_default()
                        })
                    })
                },
            );
        }
        group.finish();
    }
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    let pool = pool(BUILD_BACKENDS);
    for kind in StrategyKind::ALL {
        group.bench_function(BenchmarkId::new(kind.as_str(), BUILD_BACKENDS), |b| {
            b.iter(|| kind.build(black_box(&pool)))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
}

criterion_group! {
    name = benches;
    config = config();
    targets = pick, pick_concurrently, build
}
criterion_main!(benches);
