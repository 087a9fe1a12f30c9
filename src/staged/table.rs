//! A small concurrent map from a few keys to shared figures, read without a lock.

use std::sync::{Mutex, OnceLock, RwLock};

/// Keys (a pipeline's stages, or where they route to) and their figures, in the order each key
/// was first seen. The table is read once per stage run, so the first `N` keys sit in slots that
/// are read without a lock (a slot is set once, under `insert`); any further keys are in `more`,
/// behind a lock.
pub(super) struct Table<K, V, const N: usize> {
    slots: [OnceLock<(K, V)>; N],
    more: RwLock<Vec<(K, V)>>,
    insert: Mutex<()>,
}

impl<K: Copy + Eq, V, const N: usize> Table<K, V, N> {
    pub(super) fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| OnceLock::new()),
            more: RwLock::new(Vec::new()),
            insert: Mutex::new(()),
        }
    }

    /// The value of `key` if it has a slot; otherwise `Err` with the first free slot, or
    /// `Err(None)` if every slot is taken (look in `more`).
    fn in_slots(&self, key: K) -> Result<&V, Option<usize>> {
        for (index, slot) in self.slots.iter().enumerate() {
            match slot.get() {
                Some((k, v)) if *k == key => return Ok(v),
                Some(_) => {}
                None => return Err(Some(index)),
            }
        }
        Err(None)
    }

    /// Calls `f` with `key`'s value, adding `make()` for it first if the key is new.
    pub(super) fn with<R>(&self, key: K, make: impl FnOnce() -> V, f: impl FnOnce(&V) -> R) -> R {
        match self.in_slots(key) {
            Ok(v) => return f(v),
            Err(Some(_)) => {}
            Err(None) => {
                let more = self.more.read().unwrap_or_else(|e| e.into_inner());
                if let Some((_, v)) = more.iter().find(|(k, _)| *k == key) {
                    return f(v);
                }
            }
        }
        // A new key (or a race with another thread adding it). Slots are only set under this
        // lock, in order, so the first free slot follows every key added before.
        let _insert = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        match self.in_slots(key) {
            Ok(v) => f(v),
            Err(Some(free)) => f(&self.slots[free].get_or_init(|| (key, make())).1),
            Err(None) => {
                let mut more = self.more.write().unwrap_or_else(|e| e.into_inner());
                let at = match more.iter().position(|(k, _)| *k == key) {
                    Some(at) => at,
                    None => {
                        more.push((key, make()));
                        more.len() - 1
                    }
                };
                f(&more[at].1)
            }
        }
    }

    /// Calls `f` with each key and its value, in the order they were added.
    pub(super) fn for_each(&self, mut f: impl FnMut(K, &V)) {
        for (key, value) in self.slots.iter().map_while(OnceLock::get) {
            f(*key, value);
        }
        let more = self.more.read().unwrap_or_else(|e| e.into_inner());
        for (key, value) in more.iter() {
            f(*key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn keys_beyond_the_slots_are_kept_in_order() {
        let table = Table::<u32, AtomicU64, 2>::new();
        for key in [5, 1, 5, 9, 1, 7, 9] {
            table.with(key, AtomicU64::default, |n| {
                n.fetch_add(1, Ordering::Relaxed)
            });
        }
        let mut seen = Vec::new();
        table.for_each(|k, n| seen.push((k, n.load(Ordering::Relaxed))));
        assert_eq!(seen, [(5, 2), (1, 2), (9, 2), (7, 1)]);
    }

    #[test]
    fn many_threads_adding_the_same_keys_count_every_hit_once() {
        let table = Table::<u32, AtomicU64, 3>::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..1000 {
                        table.with(i % 6, AtomicU64::default, |n| {
                            n.fetch_add(1, Ordering::Relaxed)
                        });
                    }
                });
            }
        });
        let mut total = 0;
        let mut keys = Vec::new();
        table.for_each(|k, n| {
            keys.push(k);
            total += n.load(Ordering::Relaxed);
        });
        keys.sort_unstable();
        assert_eq!(keys, [0, 1, 2, 3, 4, 5]);
        assert_eq!(total, 4000);
    }
}
