//! The tenures this node holds: what every backend keeps per held id to
//! answer `release`, to end the right lease when the engine says the hold
//! is gone, and to end them all when the session ends.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map;
use std::hash::Hash;
use std::time::Duration;

use crate::backend::{LeaseEnd, LeaseSignal};

/// One tenure of one id on this node: its fencing token, the stop budget
/// of its instance, the backend's clone of its lease signal, and whatever
/// else the backend keeps per tenure (`extra`: the cluster's claim time, the
/// memory backend's start instant).
#[derive(Debug, Clone)]
pub(crate) struct Tenure<X = ()> {
    /// The fencing token of the tenure.
    pub(crate) token: u64,
    /// How long the instance may take to stop (`ClaimRequest::stop_budget`).
    pub(crate) budget: Duration,
    /// The backend's end of the lease signal.
    pub(crate) signal: LeaseSignal,
    /// Per-backend data.
    pub(crate) extra: X,
}

impl Tenure<()> {
    /// A tenure with no extra data.
    pub(crate) fn new(token: u64, budget: Duration, signal: LeaseSignal) -> Self {
        Tenure::with(token, budget, signal, ())
    }
}

impl<X> Tenure<X> {
    /// A tenure that also keeps `extra`.
    pub(crate) fn with(token: u64, budget: Duration, signal: LeaseSignal, extra: X) -> Self {
        Tenure {
            token,
            budget,
            signal,
            extra,
        }
    }
}

/// This node's tenures, by id (or by whatever key the backend uses: a lock
/// key for Postgres). At most one tenure per key.
///
/// Every way a tenure leaves the map says whether its lease signal is
/// ended: [`end`](Self::end) and [`end_all`](Self::end_all) end it,
/// [`remove_if`](Self::remove_if) and [`remove`](Self::remove) hand it back
/// for the caller to decide (a release the guardian asked for needs no
/// signal), and [`insert`](Self::insert) ends a tenure it replaces with
/// [`LeaseEnd::Lost`], so no replaced signal is left dangling.
#[derive(Debug)]
pub(crate) struct Tenures<K, X = ()> {
    map: HashMap<K, Tenure<X>>,
}

impl<K, X> Default for Tenures<K, X> {
    fn default() -> Self {
        Tenures {
            map: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash, X> Tenures<K, X> {
    /// No tenures.
    pub(crate) fn new() -> Self {
        Tenures::default()
    }

    /// Records a new tenure of `key`. A tenure of `key` still recorded
    /// (the engine granted the id again without this node noticing the
    /// end) is ended with [`LeaseEnd::Lost`] and returned.
    pub(crate) fn insert(&mut self, key: K, tenure: Tenure<X>) -> Option<Tenure<X>> {
        let old = self.map.insert(key, tenure);
        if let Some(old) = &old {
            old.signal.end(LeaseEnd::Lost);
        }
        old
    }

    /// The tenure of `key`, if this node holds it.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&Tenure<X>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    /// The stored key and tenure of `key` (the key is often an `Arc<str>`
    /// worth cloning rather than allocating again).
    pub(crate) fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &Tenure<X>)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get_key_value(key)
    }

    /// Whether this node holds `key` with fencing token `token`.
    pub(crate) fn holds<Q>(&self, key: &Q, token: u64) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).is_some_and(|t| t.token == token)
    }

    /// Removes the tenure of `key` if it has `token` (an older tenure's
    /// release must not end a newer one), without ending its signal.
    pub(crate) fn remove_if<Q>(&mut self, key: &Q, token: u64) -> Option<Tenure<X>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.holds(key, token) {
            self.map.remove(key)
        } else {
            None
        }
    }

    /// Removes the tenure of `key` whatever its token, without ending its
    /// signal.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<Tenure<X>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(key)
    }

    /// Ends the tenure of `key` with `token`: removes it and ends its
    /// signal with `end`. False when this node holds no such tenure.
    pub(crate) fn end<Q>(&mut self, key: &Q, token: u64, end: LeaseEnd) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.remove_if(key, token) {
            Some(tenure) => {
                tenure.signal.end(end);
                true
            }
            None => false,
        }
    }

    /// Ends every tenure with `end` (the session is gone, or can no longer
    /// vouch for any hold) and returns how many there were.
    pub(crate) fn end_all(&mut self, end: LeaseEnd) -> usize {
        let n = self.map.len();
        for (_, tenure) in self.map.drain() {
            tenure.signal.end(end.clone());
        }
        n
    }

    /// The longest stop budget among the tenures: a backend with one
    /// deadline for all of them gives up every one early enough for this
    /// instance to stop. `None` when there are none.
    pub(crate) fn max_budget(&self) -> Option<Duration> {
        self.map.values().map(|t| t.budget).max()
    }

    /// How many tenures this node holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether this node holds none.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every tenure with its key, in no particular order.
    pub(crate) fn iter(&self) -> hash_map::Iter<'_, K, Tenure<X>> {
        self.map.iter()
    }

    /// Every key held, in no particular order.
    pub(crate) fn keys(&self) -> hash_map::Keys<'_, K, Tenure<X>> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tenure(token: u64, budget_ms: u64) -> (Tenure, LeaseSignal) {
        let signal = LeaseSignal::new();
        (
            Tenure::new(token, Duration::from_millis(budget_ms), signal.clone()),
            signal,
        )
    }

    #[test]
    fn only_the_matching_token_is_released_or_ended() {
        let mut held: Tenures<Arc<str>> = Tenures::new();
        let (t, signal) = tenure(7, 100);
        assert!(held.insert("a".into(), t).is_none());
        assert!(held.holds("a", 7));
        assert!(!held.holds("a", 6));
        assert!(!held.holds("b", 7));
        assert!(held.remove_if("a", 6).is_none());
        assert!(!held.end("a", 6, LeaseEnd::Lost));
        assert_eq!(held.len(), 1);
        assert_eq!(signal.ended_with(), None);

        let removed = held.remove_if("a", 7).expect("token 7 matches");
        assert_eq!(removed.token, 7);
        assert_eq!(
            signal.ended_with(),
            None,
            "remove_if leaves the signal alone"
        );
        assert!(held.is_empty());

        let (t, signal) = tenure(8, 100);
        held.insert("a".into(), t);
        let winner = LeaseEnd::Conflict {
            winner: Some("b".into()),
        };
        assert!(held.end("a", 8, winner.clone()));
        assert_eq!(signal.ended_with(), Some(winner));
        assert!(!held.end("a", 8, LeaseEnd::Lost), "already gone");
    }

    #[test]
    fn a_replaced_tenure_is_ended() {
        let mut held: Tenures<i64> = Tenures::new();
        let (old, old_signal) = tenure(1, 0);
        let (new, new_signal) = tenure(2, 0);
        held.insert(5, old);
        let replaced = held.insert(5, new).expect("the old one comes back");
        assert_eq!(replaced.token, 1);
        assert_eq!(old_signal.ended_with(), Some(LeaseEnd::Lost));
        assert_eq!(new_signal.ended_with(), None);
        assert!(held.holds(&5, 2));
    }

    #[test]
    fn end_all_ends_every_signal_and_counts() {
        let mut held: Tenures<Arc<str>, u64> = Tenures::new();
        assert_eq!(held.max_budget(), None);
        let signals: Vec<LeaseSignal> = (0..3)
            .map(|i| {
                let signal = LeaseSignal::new();
                let budget = Duration::from_millis([300, 900, 100][i as usize]);
                held.insert(
                    format!("id-{i}").into(),
                    Tenure::with(i, budget, signal.clone(), i * 10),
                );
                signal
            })
            .collect();
        assert_eq!(held.max_budget(), Some(Duration::from_millis(900)));
        assert_eq!(held.get("id-2").map(|t| t.extra), Some(20));
        assert_eq!(held.get_key_value("id-1").map(|(k, _)| &**k), Some("id-1"));
        let mut keys: Vec<&str> = held.keys().map(|k| &**k).collect();
        keys.sort();
        assert_eq!(keys, ["id-0", "id-1", "id-2"]);
        assert_eq!(held.iter().count(), 3);
        assert_eq!(held.end_all(LeaseEnd::Lost), 3);
        assert!(held.is_empty());
        assert_eq!(held.max_budget(), None);
        for signal in signals {
            assert_eq!(signal.ended_with(), Some(LeaseEnd::Lost));
        }
        assert_eq!(held.end_all(LeaseEnd::Lost), 0);
    }
}
