//! Per-id wake-ups for nodes that wait for an id to become free.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A counter per key behind a [`Notify`]: [`bump`](Self::bump) wakes every
/// waiter of a key, [`waiter`](Self::waiter) waits for the next bump.
///
/// To wait without missing a wake-up, create the waiter **before** asking
/// the engine whether the key is free (or while holding the lock that a
/// bump also takes): a bump between the question and the answer then
/// completes it, and the caller simply asks again.
///
/// A key costs one small shared record (a counter and a `Notify`, some 80
/// bytes with its allocation), not a channel: a node may wait on 100,000
/// ids at once.
///
/// # Cancel safety
///
/// Every method is synchronous, and a waiter future holds nothing but its
/// key's record: dropping it at any point loses nothing and leaks nothing
/// (once nobody waits, [`forget`](Self::forget) removes the key's entry).
pub(crate) struct Wakes<K> {
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    keys: HashMap<K, Arc<Key>>,
}

/// One key's record, shared by the map and the key's waiters.
struct Key {
    /// Bumps so far; [`CLOSED`] once the wakes are dropped.
    count: AtomicU64,
    notify: Notify,
}

/// The count of a key whose wakes are gone: every waiter completes.
const CLOSED: u64 = u64::MAX;

impl Key {
    fn new() -> Arc<Key> {
        Arc::new(Key {
            count: AtomicU64::new(0),
            notify: Notify::new(),
        })
    }

    /// Counts a bump (never reaching [`CLOSED`]) and wakes the waiters.
    fn bump(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n != CLOSED).then(|| if n + 1 == CLOSED { 0 } else { n + 1 })
            });
        self.notify.notify_waiters();
    }

    fn close(&self) {
        self.count.store(CLOSED, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
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

impl<K> Drop for Wakes<K> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for key in inner.keys.values() {
            key.close();
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
        if let Some(key) = self.lock().keys.get(key) {
            key.bump();
        }
    }

    /// Wakes every waiter of every key.
    pub(crate) fn bump_all(&self) {
        for key in self.lock().keys.values() {
            key.bump();
        }
    }

    /// A future that completes at the first bump of `key` after this call,
    /// or at once when the wakes are dropped (the session is gone): a waiter
    /// then asks again and learns why.
    pub(crate) fn waiter(&self, key: &K) -> impl Future<Output = ()> + Send + 'static {
        let (record, seen) = {
            let mut inner = self.lock();
            let record = match inner.keys.get(key) {
                Some(record) => record.clone(),
                None => {
                    let record = Key::new();
                    inner.keys.insert(key.clone(), record.clone());
                    record
                }
            };
            // Read under the lock that every bump takes, and now, not at the
            // first poll: every bump after this call completes the waiter.
            let seen = record.count.load(Ordering::SeqCst);
            (record, seen)
        };
        async move {
            loop {
                let notified = record.notify.notified();
                let mut notified = std::pin::pin!(notified);
                // Registered before the count is read again: a bump after
                // the read wakes this registration.
                notified.as_mut().enable();
                let now = record.count.load(Ordering::SeqCst);
                if now != seen || now == CLOSED {
                    return;
                }
                notified.await;
            }
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
            Some(record) if Arc::strong_count(record) == 1 => {
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
    use crate::test_util::soon;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    /// Whether `fut` is already complete, or completes once every other task ran.
    async fn done(fut: impl Future<Output = ()>) -> bool {
        soon(fut).await.is_some()
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

    #[tokio::test(start_paused = true)]
    async fn dropping_the_wakes_completes_every_waiter() {
        let wakes: Wakes<u32> = Wakes::new();
        let a = wakes.waiter(&1);
        let b = wakes.waiter(&2);
        let mut a = Box::pin(a);
        assert!(!done(a.as_mut()).await);
        drop(wakes);
        assert!(done(a).await);
        assert!(done(b).await, "a waiter never polled completes too");
    }

    /// What a key and a waiter cost: a node may wait on 100,000 ids (a
    /// watch channel per key was some 350 bytes).
    #[test]
    fn a_key_and_a_waiter_stay_small() {
        let wakes: Wakes<u32> = Wakes::new();
        let waiter = wakes.waiter(&1);
        let waiter = std::mem::size_of_val(&waiter);
        let key = std::mem::size_of::<super::Key>();
        println!("wake key record {key} B (plus the Arc's counts), waiter future {waiter} B");
        assert!(key <= 40, "the key record grew to {key} B");
        assert!(waiter <= 104, "the waiter future grew to {waiter} B");
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
