//! Placement at run time: the node announces its [`Profile`], keeps a view
//! of the members that announced theirs, and from it computes, once per
//! change of members, where each of its ids stands ([`crate::placement`]).
//! Guardians read their standing from their slot (two atomics) to defer a
//! claim by `grace × rank`; the rebalancing pass hands each held id whose
//! best candidate is another member over to that member.
//!
//! On a backend without placement (no profile comes back from `members`)
//! the view stays empty, no rank is set, and nodes claim as ids come free.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Registry, lock};
use crate::backend::{Catalog, Profile};
use crate::guardian::{Ask, Shared, SingletonState, Slot, name_hash};
use crate::placement::{Candidate, standing};
use crate::service::BoxFuture;

/// How long a node whose rank for an id is `r > 0` lets the better-placed
/// nodes claim it first, per rank, unless set.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_millis(50);
/// How long the members must stay unchanged before a rebalancing pass: the
/// other nodes' views catch up meanwhile, so that every node hands over
/// by the same ranking.
const SETTLE: Duration = Duration::from_millis(300);
/// How long after a pass that handed ids over a node looks again: longer
/// than a reservation (2 s), so that an id whose handoff did not complete
/// (its target did not take it in time, and this node, its last holder,
/// claimed it back) is handed over again instead of staying misplaced
/// until the members next change.
const CHECK_AFTER: Duration = Duration::from_millis(2_500);
/// At most this many such checks per change of members.
const MAX_CHECKS: u32 = 3;
/// At most this many ranks of deferral (a node far down waits no longer).
pub(crate) const MAX_DEFER_RANKS: u32 = 16;
/// Announcements after a change of ids are batched over this long.
const ANNOUNCE_BATCH: Duration = Duration::from_millis(20);
/// A rebalancing pass hands ids over in small batches, one per tick, at
/// the handoff rate: a burst of handoffs queues each behind the others'
/// work (on every node they touch), and that wait is time the ids run
/// nowhere.
const REBALANCE_TICK: Duration = Duration::from_millis(10);
/// At most this many ticks' worth of handoffs go out at once.
const MAX_CREDIT_TICKS: u64 = 5;

/// What the members look like from here, as far as placement goes.
#[derive(Default)]
pub(crate) struct View {
    /// This node as a candidate; `None` while the backend shows no profile
    /// of this node (no placement).
    me: Option<Candidate>,
    /// The reachable members that announced a profile, this node excepted.
    others: Vec<(Candidate, Catalog)>,
}

impl View {
    fn same(&self, other: &View) -> bool {
        let key = |v: &View| {
            (
                v.me.as_ref().map(|c| (c.to_string(), c.weight())),
                v.others
                    .iter()
                    .map(|(c, cat)| (c.to_string(), c.weight(), cat.digest()))
                    .collect::<Vec<_>>(),
            )
        };
        key(self) == key(other)
    }

    /// Whether placement is on (this node's profile came back).
    pub(crate) fn active(&self) -> bool {
        self.me.is_some()
    }

    /// How many members rank ahead of this node for `slot`'s id, and the
    /// best other candidate; `None` without placement.
    fn standing(&self, slot: &Slot) -> Option<(usize, Option<&Candidate>)> {
        let me = self.me.as_ref()?;
        let id = &*slot.spec.id;
        let others = self
            .others
            .iter()
            .filter(|(_, cat)| cat.contains(id))
            .map(|(c, _)| c);
        Some(standing(id, slot.spec.affinity(), me, others))
    }

    /// Stores `slot`'s standing in it.
    pub(crate) fn place(&self, slot: &Slot) {
        match self.standing(slot) {
            Some((ahead, best)) => {
                let rival = best.map_or(0, |c| name_hash(c.name()));
                slot.rival.store(rival, Ordering::Relaxed);
                slot.rank.store(
                    u32::try_from(ahead).unwrap_or(u32::MAX - 1),
                    Ordering::Relaxed,
                );
            }
            None => slot.rank.store(u32::MAX, Ordering::Relaxed),
        }
    }

    /// The best member other than this node for `slot`'s id, if any runs it.
    pub(crate) fn best_other(&self, slot: &Slot) -> Option<Arc<str>> {
        let (_, best) = self.standing(slot)?;
        best.map(|c| Arc::from(c.name()))
    }

    /// A reachable member that announced a profile, by name, with its ids.
    pub(crate) fn member(&self, node: &str) -> Option<&Catalog> {
        self.others
            .iter()
            .find(|(c, _)| c.name() == node)
            .map(|(_, cat)| cat)
    }
}

/// The runtime-wide part of placement that guardians and the handle use.
pub(crate) struct Placement {
    /// Deferral per rank.
    pub(crate) grace: Duration,
    /// Whether a change of members hands ids over to where they belong.
    pub(crate) rebalance: bool,
    /// Bumped whenever ranks were recomputed: deferring guardians look
    /// again.
    pub(crate) epoch: watch::Sender<u64>,
    view: Mutex<Arc<View>>,
    /// Where an id being handed over goes ([`Session::release_to`](crate::backend::Session::release_to)).
    targets: Mutex<HashMap<Arc<str>, Arc<str>>>,
    /// Notified when this node's ids change (add, remove) or it starts or
    /// stops draining: the profile is announced again.
    pub(crate) dirty: Notify,
}

impl Placement {
    pub(crate) fn new(grace: Duration, rebalance: bool) -> Self {
        Placement {
            grace,
            rebalance,
            epoch: watch::Sender::new(0),
            view: Mutex::new(Arc::new(View::default())),
            targets: Mutex::new(HashMap::new()),
            dirty: Notify::new(),
        }
    }

    /// The current view.
    pub(crate) fn view(&self) -> Arc<View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn targets(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<str>>> {
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `slot`'s tenure `token` over to `node`: the instance stops
    /// with `Moved`, and the id is released to `node`.
    pub(crate) fn move_to(&self, slot: &Slot, token: u64, node: Option<Arc<str>>) {
        match node {
            Some(node) => self.targets().insert(slot.spec.id.clone(), node),
            None => self.targets().remove(&slot.spec.id),
        };
        slot.moving.store(token, Ordering::SeqCst);
        slot.ask(Ask::Moved);
    }

    /// Where the id being handed over goes, once (the guardian asks when
    /// it releases).
    pub(crate) fn take_target(&self, id: &str) -> Option<Arc<str>> {
        self.targets().remove(id)
    }
}

/// This node's profile now: its ids, but for those it stepped down from
/// (it does not compete for them until the step-down delay is over).
fn profile(registry: &Mutex<Registry>, shared: &Shared, weight: u32, labels: &[String]) -> Profile {
    let ids: Vec<Arc<str>> = lock(registry)
        .slots
        .values()
        .filter(|s| !matches!(*s.lock(), SingletonState::SteppedDown))
        .map(|s| s.spec.id.clone())
        .collect();
    profile_of(ids, shared, weight, labels)
}

fn profile_of(ids: Vec<Arc<str>>, shared: &Shared, weight: u32, labels: &[String]) -> Profile {
    let draining = *shared.draining.borrow();
    // A draining node ranks last everywhere: nobody defers to it.
    let weight = if draining { 0 } else { weight };
    Profile::new(weight, labels.to_vec(), Catalog::new(ids))
}

/// Before the first claim: announces this node's profile with `ids` and
/// reads the members once, so that the guardians start with their ranks.
pub(super) async fn start(shared: &Shared, ids: Vec<Arc<str>>, weight: u32, labels: &[String]) {
    let profile = profile_of(ids, shared, weight, labels);
    if let Err(e) = shared.session.announce(profile).await {
        warn!(node = %shared.node, error = %e, "cannot announce this node's profile yet: claiming without placement until it is");
        return;
    }
    if let Ok(members) = shared.session.members().await {
        *shared
            .placement
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(View::new(members, &shared.node));
    }
}

impl View {
    fn new(members: Vec<crate::backend::Member>, node: &str) -> View {
        let mut view = View::default();
        for m in members {
            let Some(p) = m.profile else { continue };
            let c = p.candidate(&m.node);
            if m.node == node {
                view.me = Some(c);
            } else if m.reachable {
                view.others.push((c, p.catalog));
            }
        }
        view
    }
}

/// The placement task: announce, watch the members, rank every id at each
/// change, and rebalance once the members have settled.
pub(super) async fn run(
    registry: Arc<Mutex<Registry>>,
    shared: Arc<Shared>,
    weight: u32,
    labels: Arc<[String]>,
    done: CancellationToken,
) {
    let placement = &shared.placement;
    let mut draining = shared.draining.subscribe();
    let mut announced = true; // by `start`
    let mut batch = true;
    let mut rebalance_at: Option<Instant> = None;
    let mut retry = Duration::from_millis(100);
    let mut pass: VecDeque<Arc<Slot>> = VecDeque::new();
    let mut moved = 0usize;
    let mut contested = 0usize;
    let mut checks = 0u32;
    // How many handoffs the pass may still make, in thousandths, as of
    // the last batch.
    let mut credit = 0u64;
    let mut last_batch = Instant::now();
    // Armed before the members were last read; `None`: read them (again).
    let mut changed: Option<BoxFuture<'static, ()>> = None;
    loop {
        if shared.shutdown.is_cancelled() || done.is_cancelled() {
            return;
        }
        // A rebalancing tick changes no member: nothing to read again.
        if changed.is_none() {
            let armed = shared.session.members_changed();
            if !announced {
                // Batch a burst of adds or removes into one announcement; a
                // drain or resume goes out at once (the others must see even
                // a short drain, to hand the ids back when it ends).
                if batch {
                    sleep(ANNOUNCE_BATCH).await;
                }
                let profile = profile(&registry, &shared, weight, &labels);
                if let Err(e) = shared.session.announce(profile).await {
                    debug!(error = %e, "announcing the profile failed; trying again");
                    sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
                announced = true;
                batch = true;
            }
            match shared.session.members().await {
                Ok(members) => {
                    retry = Duration::from_millis(100);
                    let view = View::new(members, &shared.node);
                    if !view.same(&placement.view()) {
                        let view = Arc::new(view);
                        *placement.view.lock().unwrap_or_else(|e| e.into_inner()) = view.clone();
                        let slots: Vec<Arc<Slot>> =
                            lock(&registry).slots.values().cloned().collect();
                        for slot in &slots {
                            view.place(slot);
                        }
                        placement.epoch.send_modify(|e| *e = e.wrapping_add(1));
                        debug!(
                            members = view.others.len() + 1,
                            active = view.active(),
                            "placement view changed"
                        );
                        pass.clear();
                        moved = 0;
                        contested = 0;
                        checks = 0;
                        if placement.rebalance && view.active() {
                            rebalance_at = Some(Instant::now() + SETTLE);
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "cannot read the members now");
                    sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            changed = Some(armed);
        }
        let settle = async {
            match rebalance_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let tick = async {
            match pass.is_empty() {
                true => std::future::pending().await,
                false => sleep(REBALANCE_TICK).await,
            }
        };
        let members = changed.as_mut().expect("armed above");
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = done.cancelled() => return,
            _ = members => changed = None,
            _ = placement.dirty.notified() => {
                announced = false;
                changed = None;
            }
            _ = draining.changed() => {
                announced = false;
                batch = false;
                changed = None;
            }
            _ = settle => {
                rebalance_at = None;
                if !*shared.draining.borrow() {
                    pass = lock(&registry).slots.values().cloned().collect();
                    // The first handoff goes at once.
                    credit = 1_000;
                    last_batch = Instant::now();
                    let n = handoffs(shared.handoff_rate, &mut credit, Duration::ZERO);
                    (moved, contested) = rebalance(&mut pass, &shared, n);
                }
            }
            _ = tick => {
                let elapsed = last_batch.elapsed();
                last_batch = Instant::now();
                let n = handoffs(shared.handoff_rate, &mut credit, elapsed);
                let (m, c) = rebalance(&mut pass, &shared, n);
                moved += m;
                contested += c;
            }
        }
        if pass.is_empty() && (moved > 0 || contested > 0) {
            if moved > 0 {
                info!(node = %shared.node, ids = moved, "rebalanced: handed ids over to where they belong");
                if checks < MAX_CHECKS {
                    checks += 1;
                    rebalance_at.get_or_insert(Instant::now() + CHECK_AFTER);
                }
            }
            if contested > 0 {
                // Kept until the backend settles the conflict or sees the
                // other side again: look again after a while.
                debug!(node = %shared.node, ids = contested, "not handing over ids whose tenure may overlap another's (a split, or a conflict not settled yet); trying again");
                rebalance_at.get_or_insert(Instant::now() + SETTLE);
            }
            moved = 0;
            contested = 0;
        }
    }
}

/// How many ids a rebalancing tick may hand over at `rate` ids per
/// second, `elapsed` after the one before: what the rate earned meanwhile
/// and what earlier ticks left, counted in thousandths of an id in
/// `credit` (which keeps the remainder). Time, not ticks, earns: a timer
/// that fires late does not slow the pass down. A stall earns at most
/// [`MAX_CREDIT_TICKS`] ticks' worth, so it is not followed by a burst.
fn handoffs(rate: u32, credit: &mut u64, elapsed: Duration) -> usize {
    let rate = u64::from(rate);
    let cap = (rate * REBALANCE_TICK.as_millis() as u64 * MAX_CREDIT_TICKS).max(1_000);
    let earned = (rate * elapsed.as_micros() as u64 / 1_000).min(cap);
    *credit = (*credit + earned).min(cap);
    let n = *credit / 1_000;
    *credit %= 1_000;
    n as usize
}

/// One batch of a rebalancing pass: each id of `pass` held here whose best
/// candidate is another reachable member that runs it is handed over to
/// that member, at most `batch` of them (one batch per tick, at
/// [`Builder::handoff_rate`](crate::Builder::handoff_rate)). A change of
/// members drops the rest of the pass (a new one follows once the members
/// settle). A tenure the backend calls
/// [contested](crate::backend::Session::contested) stays: its overlap, if
/// any, ends by the heal rule. Returns how many ids it moved, and how many
/// it kept because they were contested.
fn rebalance(pass: &mut VecDeque<Arc<Slot>>, shared: &Shared, batch: usize) -> (usize, usize) {
    let placement = &shared.placement;
    let view = placement.view();
    let mut moved = 0usize;
    let mut contested = 0usize;
    while moved < batch {
        if *shared.draining.borrow() || shared.shutdown.is_cancelled() {
            pass.clear();
            break;
        }
        let Some(slot) = pass.pop_front() else { break };
        if slot.rank.load(Ordering::Relaxed) == 0 || slot.cancel.is_cancelled() {
            continue;
        }
        let Some(token) = slot.held_token() else {
            continue;
        };
        if slot.moving.load(Ordering::SeqCst) == token {
            continue;
        }
        let Some(target) = view.best_other(&slot) else {
            continue;
        };
        if shared.session.contested(&slot.spec.id, token) {
            contested += 1;
            continue;
        }
        placement.move_to(&slot, token, Some(target));
        moved += 1;
    }
    (moved, contested)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Claim, ClaimRequest, MemoryCluster};
    use crate::spec::ChildSpec;

    use crate::guardian::tests::{Idle, shared_on as shared};

    /// `a` holds `x`, and `b` (far heavier) is where `x` belongs: a pass
    /// hands it over, unless the backend calls a's tenure contested.
    #[tokio::test]
    async fn a_pass_keeps_a_contested_tenure_and_moves_it_once_settled() {
        let cluster = MemoryCluster::new();
        let a = cluster.connect("a").await.unwrap();
        let b = cluster.connect("b").await.unwrap();
        a.announce(Profile::new(1, vec![], Catalog::new(["x"])))
            .await
            .unwrap();
        b.announce(Profile::new(1_000, vec![], Catalog::new(["x"])))
            .await
            .unwrap();
        let Claim::Granted(lease) = a
            .try_claim(ClaimRequest::new("x", Duration::from_secs(1)))
            .await
            .unwrap()
        else {
            panic!("a claims x");
        };
        let shared = shared(a.clone());
        let slot = Arc::new(Slot::new(
            ChildSpec::new("x", |_ctx| async { Ok(Idle) }),
            &shared,
        ));
        *slot.lock() = SingletonState::Running {
            token: lease.token,
            restarts: 0,
        };
        let view = View::new(a.members().await.unwrap(), "a");
        view.place(&slot);
        assert!(slot.rank.load(Ordering::Relaxed) > 0, "b ranks ahead of a");
        *shared.placement.view.lock().unwrap() = Arc::new(view);

        // Split: the view still shows b (the placer has not read the
        // members again), but the backend knows better.
        cluster.partition(&[&["a"], &["b"]]);
        let mut pass = VecDeque::from([slot.clone()]);
        assert_eq!(rebalance(&mut pass, &shared, 100), (0, 1));
        assert_ne!(slot.moving.load(Ordering::SeqCst), lease.token, "not moved");

        // Healed: one holder, everybody in reach. The next pass moves it.
        cluster.heal();
        let mut pass = VecDeque::from([slot.clone()]);
        assert_eq!(rebalance(&mut pass, &shared, 100), (1, 0));
        assert_eq!(slot.moving.load(Ordering::SeqCst), lease.token);
        assert_eq!(shared.placement.take_target("x").as_deref(), Some("b"));
    }

    /// The ids handed over at `rate` by a pass's first batch and then by
    /// a tick after each of `gaps` milliseconds.
    fn batches(rate: u32, gaps: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut credit = 1_000;
        let mut out = vec![handoffs(rate, &mut credit, Duration::ZERO)];
        for ms in gaps {
            out.push(handoffs(rate, &mut credit, Duration::from_millis(ms)));
        }
        out
    }

    #[test]
    fn handoffs_go_out_evenly_at_the_rate() {
        // The default: one at once, then ten per 10 ms tick.
        let per_tick = batches(1_000, [10; 100]);
        assert_eq!(per_tick[0], 1);
        assert!(per_tick[1..].iter().all(|&n| n == 10), "{per_tick:?}");
        // Late ticks hand over what the time earned: the rate holds.
        assert_eq!(batches(1_000, [11; 100]).iter().sum::<usize>(), 1 + 1_100);
        // A rate below one per tick: one id at once, then one every
        // fifth tick (20 per second), never a burst.
        let slow = batches(20, [10; 50]);
        assert_eq!(slow.iter().sum::<usize>(), 1 + 10);
        assert!(slow.iter().all(|&n| n <= 1));
        // A rate that does not divide: what a tick cannot use is kept.
        assert_eq!(batches(150, [10; 100]).iter().sum::<usize>(), 1 + 150);
        // After a stall, at most five ticks' worth at once.
        assert_eq!(batches(1_000, [1_000]), [1, 50]);
    }
}
