//! Who waits for whom: busy claims wait under the presence number of the
//! holder they found, and a release or death of that holder wakes them.
//! While a claim batch is in flight, owners' moves are counted so that a
//! release between the claim's snapshot and its answer is never missed.

use std::collections::{HashMap, HashSet};

use tokio::sync::oneshot;

/// While a claim is in flight, at most this many owners' releases and
/// deaths are remembered one by one; past it, every owner counts as moved
/// (waiters retry once for nothing, nothing is missed).
pub(super) const MAX_EVENTS: usize = 4_096;

/// The waiting claims of one session, and the owners' moves seen by the
/// claim in flight.
#[derive(Default)]
pub(super) struct Waiters {
    /// Waiting claims, by the owner (presence number) that holds their id.
    by_owner: HashMap<i32, Vec<(i64, oneshot::Sender<()>)>>,
    /// While a claim is in flight: the sequence number of the last release
    /// or death seen per owner since it was sent (at most [`MAX_EVENTS`]).
    events: HashMap<i32, u64>,
    /// More owners moved than `events` holds: treat every owner as moved.
    events_overflow: bool,
    /// A claim batch is in flight (only then are `events` kept).
    claim_in_flight: bool,
    seq: u64,
}

impl Waiters {
    /// No claim waits.
    pub(super) fn is_empty(&self) -> bool {
        self.by_owner.is_empty()
    }

    /// The owners some claim waits on (what the probe asks about).
    pub(super) fn owners(&self) -> Vec<i32> {
        self.by_owner.keys().copied().collect()
    }

    /// A claim batch is sent now: from here on owners' moves are counted.
    /// Returns the sequence number to compare them against.
    pub(super) fn claim_sent(&mut self) -> u64 {
        // Only this claim reads the owners' events, and only those after
        // the number returned.
        self.events.clear();
        self.events_overflow = false;
        self.claim_in_flight = true;
        self.seq
    }

    /// The claim batch's answer has been handled.
    pub(super) fn claim_done(&mut self) {
        self.claim_in_flight = false;
    }

    /// Whether `owner` released or died after a claim sent at `seq0`.
    pub(super) fn owner_moved(&self, owner: i32, seq0: u64) -> bool {
        self.events_overflow || self.events.get(&owner).is_some_and(|&s| s > seq0)
    }

    /// A claim for `key` waits until `owner` moves: the receiver completes
    /// then (or fails when the session's connection is lost).
    pub(super) fn wait(&mut self, owner: i32, key: i64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.by_owner.entry(owner).or_default().push((key, tx));
        rx
    }

    /// Something happened to `owner`: it released `keys` (or some ids, when
    /// `None`), or its session ended (`None`). Wakes the claims waiting on
    /// those ids.
    pub(super) fn owner_changed(&mut self, owner: i32, keys: Option<&HashSet<i64>>) {
        self.seq += 1;
        let seq = self.seq;
        // The claim in flight, if it saw this owner, retries at once (at
        // worst once for nothing, when it released other ids). Only that
        // claim reads these, so nothing is kept while none is in flight,
        // and never more than MAX_EVENTS owners.
        if self.claim_in_flight {
            if self.events.len() < MAX_EVENTS || self.events.contains_key(&owner) {
                self.events.insert(owner, seq);
            } else {
                self.events_overflow = true;
            }
        }
        let Some(waiters) = self.by_owner.get_mut(&owner) else {
            return;
        };
        let woken: Vec<(i64, oneshot::Sender<()>)> = match keys {
            None => std::mem::take(waiters),
            Some(keys) => {
                let (woken, kept) = std::mem::take(waiters)
                    .into_iter()
                    .partition(|(key, _)| keys.contains(key));
                *waiters = kept;
                woken
            }
        };
        if waiters.is_empty() {
            self.by_owner.remove(&owner);
        }
        for (_, waiter) in woken {
            let _ = waiter.send(());
        }
    }

    /// Releases may have been missed: every waiter retries, and so does the
    /// claim in flight for any id it finds held.
    pub(super) fn wake_all(&mut self) {
        for owner in self.owners() {
            self.owner_changed(owner, None);
        }
        if self.claim_in_flight {
            self.events_overflow = true;
        }
    }

    /// The connection is gone: the waiters are dropped (their claims find
    /// the session disconnected), and no claim is in flight any more.
    pub(super) fn connection_lost(&mut self) {
        self.by_owner.clear();
        self.events.clear();
        self.events_overflow = false;
        self.claim_in_flight = false;
        self.seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of releases by distinct owners (or of forged notifications
    /// naming them) leaves the per-owner bookkeeping bounded: nothing is
    /// kept while no claim is in flight, at most MAX_EVENTS owners while
    /// one is, and past that every owner counts as moved (nothing missed).
    #[test]
    fn owner_events_stay_bounded() {
        let mut w = Waiters::default();
        for owner in 0..200_000 {
            w.owner_changed(owner, None);
        }
        assert!(w.events.len() <= MAX_EVENTS, "{}", w.events.len());
        let seq0 = w.claim_sent();
        w.owner_changed(7, None);
        assert!(w.owner_moved(7, seq0));
        assert!(!w.owner_moved(8, seq0));
        for owner in 0..200_000 {
            w.owner_changed(owner, None);
        }
        assert!(w.events.len() <= MAX_EVENTS, "{}", w.events.len());
        assert!(w.owner_moved(199_999, seq0));
        assert!(w.owner_moved(-5, seq0), "past the bound every owner moved");
    }

    /// When releases were dropped, every waiter is woken, and the claim in
    /// flight retries whatever holder it finds.
    #[test]
    fn lost_releases_wake_every_waiter() {
        let mut w = Waiters::default();
        let mut rx1 = w.wait(1, 10);
        let mut rx2 = w.wait(2, 20);
        let seq0 = w.claim_sent();
        w.wake_all();
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok());
        assert!(w.is_empty());
        assert!(w.owner_moved(12_345, seq0));
    }

    /// A release naming its keys wakes only the claims for those keys; one
    /// without keys (or a death) wakes every claim waiting on that owner.
    #[test]
    fn releases_wake_the_named_keys_only() {
        let mut w = Waiters::default();
        let mut a = w.wait(1, 10);
        let mut b = w.wait(1, 11);
        let mut c = w.wait(2, 10);
        w.owner_changed(1, Some(&HashSet::from([11, 99])));
        assert!(a.try_recv().is_err(), "key 10 was not released");
        assert!(b.try_recv().is_ok());
        assert!(c.try_recv().is_err(), "another owner");
        let mut owners = w.owners();
        owners.sort_unstable();
        assert_eq!(owners, vec![1, 2], "owner 1 still has a waiter");
        w.owner_changed(1, None);
        assert!(a.try_recv().is_ok());
        assert_eq!(w.owners(), vec![2]);
    }

    /// Moves are counted only while a claim is in flight, and only those
    /// after it was sent count for it.
    #[test]
    fn only_moves_after_the_claim_count() {
        let mut w = Waiters::default();
        w.owner_changed(5, None);
        let seq0 = w.claim_sent();
        assert!(!w.owner_moved(5, seq0), "moved before the claim was sent");
        w.owner_changed(5, None);
        assert!(w.owner_moved(5, seq0));
        w.claim_done();
        let seq1 = w.claim_sent();
        assert!(!w.owner_moved(5, seq1));
        w.claim_done();
        w.owner_changed(6, None);
        assert!(
            w.events.is_empty(),
            "nothing kept while no claim is in flight"
        );
    }

    /// A lost connection drops every waiter (their receivers fail) and
    /// forgets the claim in flight.
    #[test]
    fn a_lost_connection_drops_the_waiters() {
        let mut w = Waiters::default();
        let mut rx = w.wait(1, 10);
        w.claim_sent();
        w.owner_changed(1, Some(&HashSet::from([99])));
        w.connection_lost();
        assert!(w.is_empty());
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(!w.claim_in_flight && w.events.is_empty() && !w.events_overflow);
    }
}
