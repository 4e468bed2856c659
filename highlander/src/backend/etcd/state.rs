//! The session's state as plain data: the node's lease and the deadline it
//! sets, the tenures held and the leases whose keys may remain. Each change
//! is a method that returns what it did (tenures ended, a lease to revoke);
//! the callers do the I/O and the logging, so these rules are tested
//! without etcd, a socket or a runtime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::kit::tenures::{Tenure, Tenures};
use crate::backend::kit::vouch::Vouch;
use crate::backend::{Lease, LeaseEnd};

/// Absorbs scheduling delay between the deadline and the cancellation.
pub(super) const MARGIN: Duration = Duration::from_millis(250);
/// The CP bound: the rate error between this host's monotonic clock and
/// the etcd leader's is at most 1 % (10,000 ppm), and [`MARGIN`].
pub(super) const VOUCH: Vouch = Vouch::new(10_000, MARGIN);

/// The node's current etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NodeLease {
    pub(super) id: i64,
    /// The TTL the server granted.
    pub(super) ttl: Duration,
    /// When the last keep-alive that succeeded was sent (or the grant).
    pub(super) last_ok: Instant,
}

impl NodeLease {
    /// When a holder whose instance needs `budget` to stop must begin to:
    /// `last_ok + TTL·(1 − ρ) − margin − budget`.
    pub(super) fn deadline(&self, budget: Duration) -> Instant {
        VOUCH.deadline(self.last_ok, self.ttl, budget)
    }
}

/// Whether an instance that needs `budget` to stop fits in a lease of
/// `ttl` kept alive every `interval` (with room for two keep-alives).
/// `Err` is the TTL in whole seconds that would fit it.
pub(super) fn budget_fits(
    ttl: Duration,
    interval: Duration,
    budget: Duration,
) -> std::result::Result<(), u64> {
    let usable = VOUCH.usable(ttl);
    let needed = budget.saturating_add(interval.saturating_mul(2));
    if usable >= needed {
        return Ok(());
    }
    // What the drift and the margin take, on top, and 2 s for the
    // keep-alive interval that grows with the TTL.
    Err(needed
        .saturating_add(ttl - usable)
        .as_secs()
        .saturating_add(2))
}

/// Why a claim that etcd granted is not handed to the guardian.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotGranted {
    /// The lease the key was put with is no longer the node's (or the
    /// session closed).
    LeaseEnded,
    /// The lease's deadline has passed: the tenure could not be honoured.
    TooLate,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) lease: Option<NodeLease>,
    /// Every lease this session was granted whose keys may still exist.
    pub(super) ours: HashSet<i64>,
    pub(super) held: Tenures<Arc<str>>,
    /// Per id this node has asked for: the revision of the last deletion of
    /// its key that the watch has seen. A waiter wakes when it passes the
    /// revision at which the id was seen busy.
    pub(super) wakes: HashMap<Arc<str>, watch::Sender<i64>>,
    /// Ids another node released in favour of this one, as the watch saw
    /// them: the mod revision of each reservation naming this node. A
    /// claim of such an id takes it through that reservation at once.
    pub(super) reserved: HashMap<Arc<str>, i64>,
    /// Ids reserved for another node, as the watch saw them: the mod
    /// revision of each reservation. The deletion of the id's key at that
    /// revision (the handoff itself) wakes nobody here: the id is not free
    /// for this node; its waiter wakes when the reservation goes.
    pub(super) reserved_elsewhere: HashMap<Arc<str>, i64>,
    pub(super) closed: bool,
}

impl State {
    /// The node gives up every tenure at the deadline of the one with the
    /// longest stop budget: the lease and that deadline, while ids are held.
    pub(super) fn deadline(&self) -> Option<(i64, Instant)> {
        let lease = self.lease?;
        let budget = self.held.max_budget()?;
        Some((lease.id, lease.deadline(budget)))
    }

    /// The lease whose deadline has passed at `now`, if any: the watchdog
    /// condemns it.
    pub(super) fn expired(&self, now: Instant) -> Option<i64> {
        self.deadline()
            .filter(|&(_, at)| now >= at)
            .map(|(id, _)| id)
    }

    /// Ends every tenure ([`LeaseEnd::Lost`]); how many there were.
    pub(super) fn end_all(&mut self) -> usize {
        self.held.end_all(LeaseEnd::Lost)
    }

    /// Lease `id` with `ttl` was granted by a request sent at `sent`.
    /// False, and nothing installed, once the session is closed: the
    /// caller revokes the lease it was just granted.
    pub(super) fn install(&mut self, id: i64, ttl: Duration, sent: Instant) -> bool {
        if self.closed {
            return false;
        }
        self.lease = Some(NodeLease {
            id,
            ttl,
            last_ok: sent,
        });
        self.ours.insert(id);
        true
    }

    /// A keep-alive of lease `id` sent at `sent` succeeded (etcd answering
    /// with the TTL left, `ttl`). The lease only moves forward, its TTL only
    /// shrinks. False when `id` is not the current lease.
    pub(super) fn renewed(&mut self, id: i64, sent: Instant, ttl: Option<Duration>) -> bool {
        let Some(lease) = self.lease.as_mut().filter(|l| l.id == id) else {
            return false;
        };
        if sent > lease.last_ok {
            lease.last_ok = sent;
        }
        if let Some(ttl) = ttl {
            lease.ttl = lease.ttl.min(ttl);
        }
        true
    }

    pub(super) fn is_current(&self, id: i64) -> bool {
        self.lease.is_some_and(|l| l.id == id)
    }

    /// etcd says lease `id` is gone (expired or revoked): its keys are gone
    /// too. When it was the current lease, every tenure ends: how many.
    pub(super) fn lease_gone(&mut self, id: i64) -> Option<usize> {
        self.ours.remove(&id);
        if !self.is_current(id) {
            return None;
        }
        self.lease = None;
        Some(self.end_all())
    }

    /// No keep-alive succeeded in time: the current lease `id` is abandoned
    /// and every tenure ends. The tenures ended and the lease, which the
    /// caller revokes as soon as etcd answers.
    pub(super) fn condemn(&mut self, id: i64) -> Option<(usize, NodeLease)> {
        let lease = self.lease.filter(|l| l.id == id)?;
        self.lease = None;
        Some((self.end_all(), lease))
    }

    /// etcd put the key of `id` with lease `lease_id` at revision `token`:
    /// the tenure begins, unless that lease is no longer the node's or the
    /// deadline (with this claim's `budget` counted) has passed at `now`.
    pub(super) fn grant(
        &mut self,
        id: &Arc<str>,
        budget: Duration,
        lease_id: i64,
        token: u64,
        now: Instant,
    ) -> std::result::Result<Lease, NotGranted> {
        let lease = self
            .lease
            .filter(|l| l.id == lease_id && !self.closed)
            .ok_or(NotGranted::LeaseEnded)?;
        let longest = self.held.max_budget().unwrap_or_default().max(budget);
        if now >= lease.deadline(longest) {
            return Err(NotGranted::TooLate);
        }
        let (granted, signal) = Lease::new(token);
        self.held
            .insert(id.clone(), Tenure::new(token, budget, signal));
        Ok(granted)
    }

    /// The guardian releases the tenure `token` of `id` (a release of an
    /// older tenure leaves the current one alone).
    pub(super) fn release(&mut self, id: &str, token: u64) {
        self.held.remove_if(id, token);
    }

    /// Ends the tenure `token` of `id` if it still runs; true when it did.
    pub(super) fn end_tenure(&mut self, id: &str, token: u64) -> bool {
        self.held.end(id, token, LeaseEnd::Lost)
    }

    /// A key of `id` created at `token` with lease `lease` is left over from
    /// a tenure this node already gave up (its lease was condemned, or a
    /// claim timed out after etcd applied it): it must be deleted before the
    /// id is claimed afresh with a new token.
    pub(super) fn is_stale(&self, id: &str, token: u64, lease: i64) -> bool {
        self.ours.contains(&lease) && !self.held.holds(id, token)
    }

    /// A claim of `id` is about to be sent: its waiter's wake-up exists
    /// before, so no deletion between the check and the await is missed.
    pub(super) fn expect(&mut self, id: &Arc<str>) {
        self.wakes
            .entry(id.clone())
            .or_insert_with(|| watch::Sender::new(0));
    }

    /// The watch saw the reservation of `id` put at `revision`, naming this
    /// node (`for_me`) or another.
    pub(super) fn reservation_put(&mut self, id: &str, for_me: bool, revision: i64) {
        if for_me {
            let id = self
                .wakes
                .get_key_value(id)
                .map_or_else(|| Arc::from(id), |(id, _)| id.clone());
            self.reserved_elsewhere.remove(&id);
            self.reserved.insert(id, revision);
        } else {
            self.reserved.remove(id);
            self.reserved_elsewhere.insert(Arc::from(id), revision);
        }
    }

    /// Whether the deletion of the key of `id` at `revision` handed it to
    /// another node (its reservation was put at that revision).
    pub(super) fn handed_elsewhere(&self, id: &str, revision: i64) -> bool {
        self.reserved_elsewhere.get(id) == Some(&revision)
    }

    /// The watch saw the reservation of `id` deleted at `revision` (taken,
    /// or lapsed): it is gone, and the id's waiter wakes.
    pub(super) fn reservation_deleted(&mut self, id: &str, revision: i64) {
        if self.reserved.get(id).is_some_and(|&at| at < revision) {
            self.reserved.remove(id);
        }
        if self
            .reserved_elsewhere
            .get(id)
            .is_some_and(|&at| at < revision)
        {
            self.reserved_elsewhere.remove(id);
        }
        self.wake(id, revision);
    }

    /// The reservation of `id` naming this node, if the watch saw one: the
    /// claim about to be sent takes the id through it, once (if it is gone
    /// by then, the claim fails and the next one asks afresh).
    pub(super) fn take_reservation(&mut self, id: &str) -> Option<i64> {
        self.reserved.remove(id)
    }

    /// Closes: every tenure ends, nothing waits any more; the leases to
    /// revoke.
    pub(super) fn close(&mut self) -> Vec<i64> {
        self.closed = true;
        self.end_all();
        self.lease = None;
        self.wakes.clear();
        self.reserved.clear();
        self.reserved_elsewhere.clear();
        self.ours.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LeaseSignal;

    const TTL: Duration = Duration::from_secs(10);

    fn held(state: &mut State, id: &str, token: u64, budget: Duration) -> LeaseSignal {
        let signal = LeaseSignal::new();
        state
            .held
            .insert(Arc::from(id), Tenure::new(token, budget, signal.clone()));
        signal
    }

    fn with_lease(id: i64, at: Instant) -> State {
        let mut state = State::default();
        state.install(id, TTL, at);
        state
    }

    #[test]
    fn the_deadline_is_ttl_less_drift_margin_and_the_longest_budget() {
        let t0 = Instant::now();
        // 10 s − 1 % − 250 ms = 9.65 s.
        assert_eq!(VOUCH.usable(TTL), Duration::from_millis(9_650));
        let mut state = with_lease(7, t0);
        assert_eq!(state.deadline(), None, "no deadline while nothing is held");
        held(&mut state, "a", 1, Duration::from_secs(1));
        held(&mut state, "b", 2, Duration::from_secs(5));
        assert_eq!(
            state.deadline(),
            Some((7, t0 + Duration::from_millis(4_650)))
        );
        assert_eq!(state.expired(t0 + Duration::from_millis(4_649)), None);
        assert_eq!(state.expired(t0 + Duration::from_millis(4_650)), Some(7));
        // A budget longer than the usable TTL: the deadline is the send.
        let lease = state.lease.unwrap();
        assert_eq!(lease.deadline(Duration::from_secs(60)), t0);
    }

    #[test]
    fn a_keepalive_moves_the_deadline_forward_only() {
        let t0 = Instant::now();
        let mut state = with_lease(7, t0);
        held(&mut state, "a", 1, Duration::from_secs(1));
        let before = state.deadline().unwrap().1;
        assert!(state.renewed(7, t0 + Duration::from_secs(2), None));
        assert_eq!(state.deadline().unwrap().1, before + Duration::from_secs(2));
        // An answer to an older keep-alive arriving late moves nothing.
        assert!(state.renewed(7, t0 + Duration::from_secs(1), None));
        assert_eq!(state.deadline().unwrap().1, before + Duration::from_secs(2));
        // The TTL etcd answers with only shrinks it.
        assert!(state.renewed(7, t0, Some(Duration::from_secs(30))));
        assert_eq!(state.lease.unwrap().ttl, TTL);
        assert!(state.renewed(7, t0, Some(Duration::from_secs(5))));
        assert_eq!(state.lease.unwrap().ttl, Duration::from_secs(5));
        // Another lease's keep-alive is not this one's.
        assert!(!state.renewed(8, t0 + Duration::from_secs(9), None));
    }

    #[test]
    fn a_lost_or_condemned_lease_ends_every_tenure_once() {
        let t0 = Instant::now();
        let mut state = with_lease(7, t0);
        let a = held(&mut state, "a", 1, Duration::from_secs(1));
        let b = held(&mut state, "b", 2, Duration::from_secs(1));
        assert_eq!(state.lease_gone(6), None, "not the current lease");
        assert!(a.ended_with().is_none());
        assert_eq!(state.lease_gone(7), Some(2));
        assert_eq!(a.ended_with(), Some(LeaseEnd::Lost));
        assert_eq!(b.ended_with(), Some(LeaseEnd::Lost));
        assert!(state.lease.is_none() && state.held.is_empty());
        assert!(!state.ours.contains(&7), "its keys are gone with it");

        let mut state = with_lease(9, t0);
        let c = held(&mut state, "c", 3, Duration::from_secs(1));
        assert_eq!(state.condemn(8), None);
        let (ended, lease) = state.condemn(9).unwrap();
        assert_eq!((ended, lease.id), (1, 9));
        assert_eq!(c.ended_with(), Some(LeaseEnd::Lost));
        assert!(
            state.ours.contains(&9),
            "revoked later: its keys may remain"
        );
        assert_eq!(state.condemn(9), None, "once");
    }

    #[test]
    fn a_grant_needs_the_same_live_lease_before_its_deadline() {
        let t0 = Instant::now();
        let id: Arc<str> = Arc::from("a");
        let budget = Duration::from_secs(2);
        let mut state = with_lease(7, t0);
        assert_eq!(
            state.grant(&id, budget, 6, 100, t0).unwrap_err(),
            NotGranted::LeaseEnded
        );
        // Deadline with this budget: 9.65 s − 2 s after t0.
        let late = t0 + Duration::from_millis(7_650);
        assert_eq!(
            state.grant(&id, budget, 7, 100, late).unwrap_err(),
            NotGranted::TooLate
        );
        // A longer budget already held counts too.
        held(&mut state, "b", 50, Duration::from_secs(5));
        let later = t0 + Duration::from_millis(4_650);
        assert_eq!(
            state.grant(&id, budget, 7, 100, later).unwrap_err(),
            NotGranted::TooLate
        );
        let lease = state.grant(&id, budget, 7, 100, t0).unwrap();
        assert_eq!(lease.token, 100);
        assert!(state.held.holds("a", 100));
        state.closed = true;
        assert_eq!(
            state.grant(&id, budget, 7, 101, t0).unwrap_err(),
            NotGranted::LeaseEnded
        );
    }

    #[test]
    fn release_and_end_touch_only_the_named_tenure() {
        let mut state = with_lease(7, Instant::now());
        let a = held(&mut state, "a", 10, Duration::ZERO);
        state.release("a", 9);
        assert!(state.held.holds("a", 10), "an older tenure's release");
        assert!(!state.end_tenure("a", 9));
        assert!(a.ended_with().is_none());
        assert!(state.end_tenure("a", 10));
        assert_eq!(a.ended_with(), Some(LeaseEnd::Lost));
        assert!(!state.end_tenure("a", 10), "once");
        held(&mut state, "b", 11, Duration::ZERO);
        state.release("b", 11);
        assert!(state.held.is_empty());
    }

    #[test]
    fn a_key_of_ours_not_held_is_stale() {
        let mut state = with_lease(7, Instant::now());
        state.ours.insert(5);
        held(&mut state, "a", 10, Duration::ZERO);
        assert!(!state.is_stale("a", 10, 7), "the tenure we hold");
        assert!(state.is_stale("a", 8, 5), "an older tenure of ours");
        assert!(state.is_stale("b", 12, 7), "a claim that timed out");
        assert!(!state.is_stale("b", 12, 99), "another node's key");
    }

    #[test]
    fn closing_ends_everything_and_names_the_leases_to_revoke() {
        let mut state = with_lease(7, Instant::now());
        state.ours.insert(5);
        let a = held(&mut state, "a", 10, Duration::ZERO);
        state.expect(&Arc::from("w"));
        let mut leases = state.close();
        leases.sort_unstable();
        assert_eq!(leases, vec![5, 7]);
        assert_eq!(a.ended_with(), Some(LeaseEnd::Lost));
        assert!(state.closed && state.lease.is_none() && state.wakes.is_empty());
        // A lease granted after the close is not taken as the node's: its
        // keeper revokes it (it would otherwise outlive the session).
        assert!(!state.install(9, TTL, Instant::now()));
        assert!(state.lease.is_none() && state.ours.is_empty());
    }

    #[test]
    fn the_stop_budget_must_fit_the_ttl() {
        let interval = Duration::from_secs(1);
        assert_eq!(budget_fits(TTL, interval, Duration::from_secs(5)), Ok(()));
        // 9.65 s usable, 2 s of keep-alives: 7.65 s at most.
        assert_eq!(
            budget_fits(TTL, interval, Duration::from_millis(7_650)),
            Ok(())
        );
        // 8 s + 2 s + 250 ms + 100 ms = 10.35 s: 10 whole seconds, plus 2.
        assert_eq!(budget_fits(TTL, interval, Duration::from_secs(8)), Err(12));
        assert!(budget_fits(TTL, interval, Duration::MAX).is_err());
    }
}
