//! Single-flight gates: when several threads want the same thing made (a span fetched, a
//! piece decompressed), the first makes it and the others wait, then find it made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Single-flight gates: the first thread to want `K` holds its gate while it does the work;
/// others wait at the gate and then find the result where the first one left it.
pub(super) struct Gates<K>(Mutex<HashMap<K, Arc<Mutex<()>>>>);

impl<K: std::hash::Hash + Eq> Gates<K> {
    pub(super) fn new() -> Self {
        Gates(Mutex::new(HashMap::new()))
    }

    pub(super) fn gate(&self, key: K) -> Arc<Mutex<()>> {
        self.0.lock().unwrap().entry(key).or_default().clone()
    }

    /// The work for `key` is done (or failed): the next comer starts afresh.
    pub(super) fn done(&self, key: &K) {
        self.0.lock().unwrap().remove(key);
    }

    /// Is someone at work on `key`?
    pub(super) fn busy(&self, key: &K) -> bool {
        self.0.lock().unwrap().contains_key(key)
    }
}

/// Removes its key from the gates when dropped.
pub(super) struct Done<'a, K: std::hash::Hash + Eq>(pub(super) &'a Gates<K>, pub(super) K);

impl<K: std::hash::Hash + Eq> Drop for Done<'_, K> {
    fn drop(&mut self) {
        self.0.done(&self.1);
    }
}
