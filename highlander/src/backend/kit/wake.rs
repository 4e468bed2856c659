//! Per-id wake-ups for nodes that wait for an id to become free.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// A counter per key behind a [`watch`] channel: [`bump`](Self::bump)
/// wakes every waiter of a key, [`waiter`](Self::waiter) waits for the next
/// bump.
///
/// To wait without missing a wake-up, create the waiter **before** asking
/// the engine whether the key is free (or while holding the lock that a
/// bump also takes): a bump between the question and the answer then
/// completes it, and the caller simply asks again.
///
/// # Cancel safety
///
/// Every method is synchronous, and a waiter future holds nothing but a
/// receiver: dropping it at any point loses nothing and leaks nothing
/// (once nobody waits, [`forget`](Self::forget) removes the key's entry).
pub(crate) struct Wakes<K> {
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    keys: HashMap<K, watch::Sender<u64>>,
}

impl<K> Default for Wakes<K> {
    fn default() -> Self {
        Wakes {
            inner: Mutex::new(Inner {
                keys: HashMap::new(),
            }),
        }
    }
}

impl<K: Eq + Hash + Clone> Wakes<K> {
    /// No waiters yet.
    pub(crate) fn new() -> Self {
        Wakes::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter of `key` (none may be waiting: then nothing
    /// happens).
    pub(crate) fn bump<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(tx) = self.lock().keys.get(key) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every waiter of every key.
    pub(crate) fn bump_all(&self) {
        for tx in self.lock().keys.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A future that completes at the first bump of `key` after this call,
    /// or at once when the wakes are dropped (the session is gone): a waiter
    /// then asks again and learns why.
    pub(crate) fn waiter(&self, key: &K) -> impl Future<Output = ()> + Send + 'static {
        let rx = {
            let mut inner = self.lock();
            match inner.keys.get(key) {
                Some(tx) => tx.subscribe(),
                None => {
                    let tx = watch::Sender::new(0);
                    let rx = tx.subscribe();
                    inner.keys.insert(key.clone(), tx);
                    rx
                }
            }
        };
        let mut rx = rx;
        async move {
            // `subscribe` marked the current value seen: this waits for the
            // next bump, or for the sender to go (the wakes dropped).
            let _ = rx.changed().await;
        }
    }

    /// Drops the entry of `key` when nobody waits on it any more (so ids
    /// asked for once do not pile up). Returns whether it was dropped.
    pub(crate) fn forget<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut inner = self.lock();
        match inner.keys.get(key) {
            Some(tx) if tx.receiver_count() == 0 => {
                inner.keys.remove(key);
                true
            }
            _ => false,
        }
    }

    /// How many keys have an entry.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Wakes;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    /// Whether `fut` is already complete, or completes once every other task ran.
    async fn done(fut: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_at_the_next_bump_of_its_key_only() {
        let wakes: Wakes<Arc<str>> = Wakes::new();
        wakes.bump("a"); // before any waiter: nothing to wake, nothing kept
        let a = wakes.waiter(&"a".into());
        let b = wakes.waiter(&"b".into());
        wakes.bump("b");
        assert!(done(b).await);
        let mut a = Box::pin(a);
        assert!(!done(a.as_mut()).await, "a bump of b does not wake a");
        wakes.bump("a");
        assert!(done(a).await);
        // a waiter created after a bump waits for the next one
        let late = wakes.waiter(&"a".into());
        let mut late = Box::pin(late);
        assert!(!done(late.as_mut()).await);
        wakes.bump_all();
        assert!(done(late).await);
    }

    #[tokio::test(start_paused = true)]
    async fn forget_only_drops_keys_nobody_waits_on() {
        let wakes: Wakes<String> = Wakes::new();
        let w = wakes.waiter(&"a".into());
        assert!(!wakes.forget("a"));
        assert_eq!(wakes.len(), 1);
        drop(w);
        assert!(wakes.forget("a"));
        assert_eq!(wakes.len(), 0);
        assert!(!wakes.forget("never"));
    }

    #[tokio::test]
    async fn a_bump_from_another_task_wakes_a_waiter() {
        let wakes: Arc<Wakes<u32>> = Arc::new(Wakes::new());
        let waiter = wakes.waiter(&1);
        let bumper = {
            let wakes = wakes.clone();
            tokio::spawn(async move { wakes.bump(&1) })
        };
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("woken");
        bumper.await.expect("bumper");
    }
}
