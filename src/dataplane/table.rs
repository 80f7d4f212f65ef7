//! A worker's connection table: places addressed by index and generation, which give their
//! memory back after a spike.
//!
//! Each open connection has a place; its index and generation go into its sockets' `epoll`
//! tokens and timer entries, so an event or timer meant for a connection that has since closed
//! finds a different generation and is dropped. A place is about 500 bytes. With a plain free
//! list, a spike of 20,000 connections would leave 10 MB per worker behind for the life of the
//! process (nginx preallocates `worker_connections` the same way; HAProxy frees). Here a new
//! connection takes the lowest free place, so new connections fill the low end, and the places
//! above the highest open one are dropped as soon as they are free; the vector's capacity
//! follows once it is four times what is left. A connection that stays open keeps the places
//! below it (they are reused first, never given back) until it closes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Places below which the table never shrinks its capacity: a quiet worker does not reallocate
/// for every few connections.
const FLOOR: usize = 256;

/// The capacity to shrink a collection of `len` items to, if its `capacity` is four times what
/// it needs (and the floor): halfway, so that growing again does not reallocate at once.
pub(crate) fn shrunk(capacity: usize, len: usize, floor: usize) -> Option<usize> {
    let need = len.max(floor);
    (capacity >= 4 * need).then_some(2 * need)
}

/// A place: what is in it, and the generation it was given when it was last taken.
struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Places for values of type `T` (a worker's connections).
pub(crate) struct Table<T> {
    entries: Vec<Entry<T>>,
    /// Vacant places, lowest first. May also hold indices at or past the end, left when
    /// [`Table::trim`] dropped the places above the highest occupied one; those are the
    /// highest in the heap, so they come out only once every vacant place below them has, and
    /// are then discarded.
    vacant: BinaryHeap<Reverse<u32>>,
    /// The generation the next place taken gets. One counter for the whole table, not one per
    /// place: a place dropped and created again cannot start over at a generation its earlier
    /// occupants had, and an (index, generation) pair comes back only after 2^32 connections.
    stamp: u32,
    occupied: usize,
}

impl<T> Table<T> {
    pub(super) fn new() -> Table<T> {
        Table {
            entries: Vec::new(),
            vacant: BinaryHeap::new(),
            stamp: 0,
            occupied: 0,
        }
    }

    /// Occupied places.
    pub(super) fn occupied(&self) -> usize {
        self.occupied
    }

    /// One past the highest index a place may have now.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Puts what `make` returns for (index, generation) in the lowest vacant place, created if
    /// there is none, and gives the index and the rest of what `make` returned. If `make`
    /// panics, the place stays vacant for the next value.
    pub(super) fn insert_with<R>(&mut self, make: impl FnOnce(usize, u32) -> (T, R)) -> (usize, R) {
        let index = self.lowest_vacant();
        let generation = self.stamp;
        self.stamp = self.stamp.wrapping_add(1);
        let made =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(index, generation)));
        let (value, rest) = match made {
            Ok(made) => made,
            Err(panic) => {
                self.vacant.push(Reverse(index as u32));
                std::panic::resume_unwind(panic);
            }
        };
        self.entries[index] = Entry {
            generation,
            value: Some(value),
        };
        self.occupied += 1;
        (index, rest)
    }

    /// The index of the lowest vacant place, pushed at the end if there is none.
    fn lowest_vacant(&mut self) -> usize {
        while let Some(Reverse(index)) = self.vacant.pop() {
            let index = index as usize;
            match self.entries.get(index) {
                Some(entry) if entry.value.is_none() => return index,
                // Cannot be: an index enters the heap when its place is vacated and leaves it
                // when the place is taken, and the table grows only with an empty heap.
                Some(_) => debug_assert!(false, "occupied place {index} in the vacant heap"),
                // Past the end: every other index still in the heap is too.
                None => self.vacant.clear(),
            }
        }
        self.entries.push(Entry {
            generation: self.stamp,
            value: None,
        });
        self.entries.len() - 1
    }

    /// The generation of place `index` and what is in it.
    pub(super) fn entry(&mut self, index: usize) -> Option<(u32, &mut T)> {
        let entry = self.entries.get_mut(index)?;
        Some((entry.generation, entry.value.as_mut()?))
    }

    /// What is in place `index` if it is still of `generation`.
    pub(super) fn get(&mut self, index: usize, generation: u32) -> Option<&mut T> {
        match self.entry(index) {
            Some((current, value)) if current == generation => Some(value),
            _ => None,
        }
    }

    /// What is in place `index` if it is still of `generation`, to look at.
    pub(super) fn peek(&self, index: usize, generation: u32) -> Option<&T> {
        let entry = self.entries.get(index)?;
        if entry.generation != generation {
            return None;
        }
        entry.value.as_ref()
    }

    /// Empties place `index`, gives what was in it, and drops the places above the highest
    /// occupied one.
    pub(super) fn remove(&mut self, index: usize) -> Option<T> {
        let value = self.entries.get_mut(index)?.value.take()?;
        self.occupied -= 1;
        if index + 1 == self.entries.len() {
            self.trim();
        } else {
            self.vacant.push(Reverse(index as u32));
        }
        Some(value)
    }

    /// Drops the vacant places at the end, and gives memory back once the vector holds four
    /// times what is left. Each place is dropped at most once per time it was created, so this
    /// costs O(1) per connection, amortised.
    fn trim(&mut self) {
        while self.entries.last().is_some_and(|last| last.value.is_none()) {
            self.entries.pop();
        }
        let len = self.entries.len();
        if let Some(capacity) = shrunk(self.entries.capacity(), len, FLOOR) {
            self.entries.shrink_to(capacity);
        }
        if let Some(capacity) = shrunk(self.vacant.capacity(), len, FLOOR) {
            self.vacant.retain(|Reverse(index)| (*index as usize) < len);
            self.vacant.shrink_to(capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `n` places and gives their (index, generation).
    fn fill(table: &mut Table<usize>, n: usize) -> Vec<(usize, u32)> {
        (0..n)
            .map(|i| table.insert_with(|_, generation| (i, generation)))
            .collect()
    }

    #[test]
    fn a_panic_while_making_the_value_leaves_the_place_vacant() {
        let panics = |table: &mut Table<usize>| {
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                table.insert_with(|_, _| -> (usize, ()) { panic!("a bug in the making") })
            }));
            assert!(made.is_err());
        };
        let mut table = Table::new();
        fill(&mut table, 2);
        // A place freed below an occupied one.
        assert_eq!(table.remove(0), Some(0));
        panics(&mut table);
        assert_eq!(table.occupied(), 1);
        assert_eq!(
            table.insert_with(|_, _| (7, ())).0,
            0,
            "taken by the next value"
        );
        // A place created at the end for the value.
        table.remove(0);
        table.remove(1);
        assert_eq!(table.len(), 0);
        panics(&mut table);
        assert_eq!(table.occupied(), 0);
        assert_eq!(
            table.insert_with(|_, _| (8, ())).0,
            0,
            "taken by the next value"
        );
    }

    #[test]
    fn the_lowest_vacant_place_is_taken_first() {
        let mut table = Table::new();
        let places = fill(&mut table, 5);
        assert_eq!(
            places.iter().map(|p| p.0).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        table.remove(3);
        table.remove(1);
        assert_eq!(
            fill(&mut table, 1),
            [(1, 5)],
            "1 before 3, a new generation"
        );
        assert_eq!(fill(&mut table, 1), [(3, 6)]);
    }

    #[test]
    fn a_table_gives_its_places_back_after_a_spike() {
        let mut table = Table::new();
        let places = fill(&mut table, 20_000);
        let peak = table.entries.capacity();
        // Everything closes but one early and one late connection.
        for &(index, _) in &places {
            if index != 10 && index != 15_000 {
                table.remove(index);
            }
        }
        assert_eq!(table.len(), 15_001, "the late connection holds its place");
        table.remove(15_000);
        assert_eq!(table.len(), 11, "only up to the highest open place is kept");
        assert!(
            table.entries.capacity() <= peak / 4,
            "capacity {} of {peak} at the peak",
            table.entries.capacity()
        );
        assert!(table.vacant.capacity() <= peak / 4);
        assert_eq!(table.occupied(), 1);
        // The next connections fill the holes below the open one, then grow the table again.
        assert_eq!(fill(&mut table, 11).last().map(|p| p.0), Some(11));
        assert_eq!(table.occupied(), 12);
    }

    #[test]
    fn a_place_created_again_matches_nothing_meant_for_its_earlier_occupants() {
        let mut table = Table::new();
        let places = fill(&mut table, 3);
        let (index, generation) = places[2];
        for i in [0, 1, 2] {
            table.remove(i);
        }
        assert_eq!(table.len(), 0, "all three were vacant after the last went");
        let mut seen = std::collections::HashSet::from([(index, generation)]);
        // Vacated again and again, the place never repeats an (index, generation).
        for _ in 0..5 {
            let again = fill(&mut table, 3)[2];
            assert!(seen.insert(again), "{again:?} came back");
            assert!(table.peek(index, generation).is_none());
            assert!(table.get(index, generation).is_none());
            for i in [2, 1, 0] {
                table.remove(i);
            }
        }
    }

    #[test]
    fn generations_go_on_changing_past_the_top_of_the_counter() {
        let mut table = Table::new();
        table.stamp = u32::MAX - 1;
        let generations: Vec<u32> = (0..4)
            .map(|_| {
                let (index, generation) = fill(&mut table, 1)[0];
                table.remove(index);
                generation
            })
            .collect();
        assert_eq!(generations, [u32::MAX - 1, u32::MAX, 0, 1]);
    }

    #[test]
    fn capacity_shrinks_at_four_times_what_is_needed_and_never_below_the_floor() {
        assert_eq!(shrunk(4096, 1000, 256), Some(2000));
        assert_eq!(shrunk(3999, 1000, 256), None);
        assert_eq!(shrunk(1024, 0, 256), Some(512));
        assert_eq!(shrunk(1000, 0, 256), None);
    }
}
