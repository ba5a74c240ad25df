//! A streaming shuffle: a buffer of `K` items, emitting a uniformly chosen one at a time.
//!
//! Items are read in file order into the buffer; each output is a random buffered item, whose
//! slot is then refilled from the stream. This mixes items within a window of about `K`, not
//! the whole data set, but needs only `K` items of memory. The order depends only on the seed,
//! the epoch and the input order, so a run can be replayed. Slots are reused, never freed,
//! so a buffer of [`Example`](crate::Example)s stops allocating once warm.

use crate::rng::{SplitMix64, derive_seed};

/// A shuffle buffer of `capacity` items. Capacity 0 or 1 passes items through in order.
#[derive(Debug, Clone)]
pub struct ShuffleBuffer<T> {
    /// `slots[..len]` are buffered items; later slots are spare allocations kept for reuse.
    slots: Vec<T>,
    len: usize,
    capacity: usize,
    rng: SplitMix64,
}

impl<T: Default> ShuffleBuffer<T> {
    /// An empty buffer of `capacity` items (0 is treated as 1), seeded for epoch 0 of seed 0.
    pub fn new(capacity: usize) -> ShuffleBuffer<T> {
        let mut b =
            ShuffleBuffer { slots: Vec::new(), len: 0, capacity: capacity.max(1), rng: SplitMix64::new(0) };
        b.start_epoch(0, 0);
        b
    }

    /// Empties the buffer and reseeds it, so the order of `epoch` depends only on `seed`,
    /// `epoch` and the input.
    pub fn start_epoch(&mut self, seed: u64, epoch: u64) {
        self.len = 0;
        self.rng = SplitMix64::new(derive_seed(&[seed, epoch]));
    }

    /// How many items the buffer holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many items are buffered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no item is buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffer holds `capacity` items.
    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// The slot the next item goes into, holding stale data to overwrite in place (that is
    /// how allocations are reused). Call [`commit`](Self::commit) once it holds an item.
    ///
    /// # Panics
    /// If the buffer is full.
    pub fn vacant(&mut self) -> &mut T {
        assert!(!self.is_full(), "shuffle buffer is full");
        if self.slots.len() == self.len {
            self.slots.push(T::default());
        }
        &mut self.slots[self.len]
    }

    /// Adds the item written into [`vacant`](Self::vacant) to the buffer.
    pub fn commit(&mut self) {
        assert!(!self.is_full(), "shuffle buffer is full");
        self.len += 1;
    }

    /// Removes a uniformly chosen buffered item and returns it (valid until the next
    /// [`vacant`](Self::vacant)), or `None` if the buffer is empty.
    pub fn take(&mut self) -> Option<&T> {
        if self.len == 0 {
            return None;
        }
        // With one slot there is nothing to choose; skipping the draw keeps
        // pass-through free of random number costs.
        let j = if self.capacity == 1 { 0 } else { self.rng.below(self.len as u64) as usize };
        self.len -= 1;
        self.slots.swap(j, self.len);
        Some(&self.slots[self.len])
    }

    /// Permutes `items` with the buffer's generator (Fisher-Yates), e.g. to shuffle the
    /// order of file pieces with the same seed and epoch as the items in them.
    pub(crate) fn permute<U>(&mut self, items: &mut [U]) {
        for i in (1..items.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(capacity: usize, seed: u64, epoch: u64, n: usize) -> Vec<usize> {
        let mut b = ShuffleBuffer::<usize>::new(capacity);
        b.start_epoch(seed, epoch);
        let mut out = Vec::new();
        let mut input = 0..n;
        loop {
            while !b.is_full() {
                match input.next() {
                    Some(x) => {
                        *b.vacant() = x;
                        b.commit();
                    }
                    None => break,
                }
            }
            match b.take() {
                Some(&x) => out.push(x),
                None => break,
            }
        }
        out
    }

    #[test]
    fn permutation_and_determinism() {
        let a = run(32, 7, 0, 1000);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, run(32, 7, 0, 1000));
        assert_ne!(a, run(32, 7, 1, 1000));
        assert_ne!(a, run(32, 8, 0, 1000));
    }

    #[test]
    fn capacity_one_or_zero_keeps_order() {
        assert_eq!(run(1, 7, 3, 50), (0..50).collect::<Vec<_>>());
        assert_eq!(run(0, 7, 3, 50), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn window_bounds_displacement() {
        // An item can only be emitted after it has been read, so it moves at most K-1 earlier.
        let a = run(8, 1, 0, 500);
        for (pos, &x) in a.iter().enumerate() {
            assert!(pos + 7 >= x, "item {x} emitted at {pos}");
        }
    }
}
