//! Cost of taking a slot: a pick in a pool whose backends have `max_connections`, as every new
//! connection to such a pool makes it, and the same pick without slots beside it.
//!
//! ```text
//! cargo bench --features bench-internals --bench slots
//! cargo bench --features bench-internals --bench slots -- --quick
//! ```
//!
//! `take_slot/<case>/<backends>` takes a slot and gives it back (the guard drops), on a pool
//! whose backends hold uneven open counts: `no_slots` has no `max_connections` anywhere (the
//! plain pick plus the open count), `free` has slots to spare everywhere, `mostly_full` has
//! every backend full but one in eight, so most picks the strategy makes meet a full backend
//! first, and `one_free` has one backend with a free slot among all full ones: the worst case,
//! which scans the pool once.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use weighbridge::Config;
use weighbridge::bench::{Slot, SlotPool};

/// Pool sizes measured.
const BACKEND_COUNTS: [usize; 3] = [4, 64, 1024];
/// Time spent measuring each benchmark.
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);
/// Time spent warming up before each benchmark.
const WARM_UP_TIME: Duration = Duration::from_secs(1);

/// How full a pool is when the pick is measured.
#[derive(Clone, Copy)]
enum Case {
    NoSlots,
    Free,
    MostlyFull,
    OneFree,
}

impl Case {
    const ALL: [Case; 4] = [Case::NoSlots, Case::Free, Case::MostlyFull, Case::OneFree];

    fn name(self) -> &'static str {
        match self {
            Case::NoSlots => "no_slots",
            Case::Free => "free",
            Case::MostlyFull => "mostly_full",
            Case::OneFree => "one_free",
        }
    }

    /// Backend i's slots, and how many connections it holds while the pick is measured.
    fn backend(self, i: usize, backends: usize) -> (Option<u32>, u32) {
        let open = (3 * i as u32 + 1) % 11;
        match self {
            Case::NoSlots => (None, open),
            Case::Free => (Some(64), open),
            Case::MostlyFull if i % 8 == 0 => (Some(open + 2), open),
            Case::MostlyFull => (Some(open + 1), open + 1),
            Case::OneFree if i == backends / 2 => (Some(open + 2), open),
            Case::OneFree => (Some(open + 1), open + 1),
        }
    }
}

/// A capacity-proportional pool of `backends` with uneven weights, filled as `case` says; the
/// slots holding it so are returned with it.
fn pool(case: Case, backends: usize) -> (SlotPool, Vec<Slot>) {
    let mut text = String::from(
        "[[pool]]\nname = \"p\"\nstrategy = \"capacity_proportional\"\n\
         [[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n",
    );
    for i in 0..backends {
        let (slots, _) = case.backend(i, backends);
        text.push_str(&format!(
            "[[pool.backend]]\naddr = \"127.0.0.1:{}\"\nweight = {}\n",
            1 + i,
            1.0 + (i % 7) as f64 * 0.5
        ));
        if let Some(slots) = slots {
            text.push_str(&format!("max_connections = {slots}\n"));
        }
    }
    let config = Config::parse(&text, Path::new("bench.toml")).expect("a valid bench config");
    let pool = SlotPool::new(&config, "p").expect("pool p");
    // Fill each backend to its count: take slots until every backend holds what it should.
    let want: Vec<u32> = (0..backends).map(|i| case.backend(i, backends).1).collect();
    let mut held: Vec<u32> = vec![0; backends];
    let mut kept = Vec::new();
    let mut extra = Vec::new();
    let total: u32 = want.iter().sum();
    let mut turn = 0;
    while held.iter().sum::<u32>() < total {
        let Some(slot) = pool.take_slot(turn) else {
            break;
        };
        turn += 1;
        let i = slot.index;
        if held[i] < want[i] {
            held[i] += 1;
            kept.push(slot);
        } else {
            extra.push(slot);
        }
        assert!(turn < 1_000_000, "cannot fill the pool");
    }
    drop(extra);
    assert_eq!(held, want, "pool filled as the case says");
    (pool, kept)
}

fn take_slot(c: &mut Criterion) {
    for case in Case::ALL {
        let mut group = c.benchmark_group(format!("take_slot/{}", case.name()));
        for backends in BACKEND_COUNTS {
            let (pool, _held) = pool(case, backends);
            group.bench_with_input(BenchmarkId::from_parameter(backends), &pool, |b, pool| {
                let mut turn = 0_u64;
                b.iter(|| {
                    turn += 1;
                    black_box(pool.take_slot(black_box(turn)))
                })
            });
        }
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME)
}

criterion_group! {
    name = benches;
    config = config();
    targets = take_slot
}
criterion_main!(benches);
