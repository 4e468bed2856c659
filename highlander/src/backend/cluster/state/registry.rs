//! The registry: who holds each id, claims settled by the arbiter (grant,
//! deny, reservation), tenures started and ended (also handed off to a
//! chosen member), and the heal rule that picks one survivor where two
//! tenures of an id meet.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::{Effect, Effects, IdView, Peer, Pending, RemoteHold, Reply, State, Step};
use crate::backend::cluster::tokens;
use crate::backend::cluster::wire::{Hold, Msg};
use crate::backend::kit::tenures::Tenure;
use crate::backend::{Holder, Lease, LeaseEnd};

/// The heal rule: whether the tenure that began at `a.0` on node `a.1`
/// keeps an id against the one of `b`. The earliest tenure wins, ties go to
/// the lower node name; both holders compute the same answer from the same
/// two pairs, so exactly one of them stops.
pub(super) fn keeps(a: (u64, &str), b: (u64, &str)) -> bool {
    a < b
}

impl State {
    /// The node that settles claims: the lowest-named member this node is
    /// connected to, itself included. A member still joining holds the
    /// requests it gets until it has joined (and so sees every holder).
    fn arbiter(&self) -> Arc<str> {
        let mut best = self.name.clone();
        for (name, peer) in &self.members {
            if peer.reachable() && **name < *best {
                best = name.clone();
            }
        }
        best
    }

    /// The holder this node names for `id` (the earliest tenure it knows,
    /// ties to the lower name): `(since, node, token)`.
    pub(super) fn visible(&self, id: &str) -> Option<(u64, Arc<str>, u64)> {
        let own = self
            .own
            .get(id)
            .map(|o| (o.extra, self.name.clone(), o.token));
        let remote = self
            .ids
            .get(id)
            .into_iter()
            .flat_map(|v| v.holders.iter())
            .map(|h| (h.since, h.node.clone(), h.token));
        own.into_iter()
            .chain(remote)
            .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
    }

    /// Whether this node's tenure of `id` with `token` may overlap another
    /// node's at `now`: another holder of `id` is in view (the heal rule
    /// kept this tenure, and the loser has not ceded yet, or ceded less than
    /// the stop budget ago: its instance may still be stopping), or the cluster
    /// may be split: a member is unreachable, or has been silent for
    /// `failure_timeout` (down by the failure detector's own rule, though
    /// its reader has not run yet: this node may have been paused). False
    /// once the tenure is over.
    pub(in crate::backend::cluster) fn contested(
        &self,
        id: &str,
        token: u64,
        now: Instant,
        failure_timeout: Duration,
    ) -> bool {
        if !self.own.holds(id, token) {
            return false;
        }
        let settling = self
            .settling
            .get(id)
            .is_some_and(|(t, until)| *t == token && *until > now);
        let other_holder = settling || self.ids.get(id).is_some_and(|v| !v.holders.is_empty());
        let split = self
            .members
            .values()
            .any(|p| !p.reachable() || now.saturating_duration_since(p.heard) >= failure_timeout);
        other_holder || split
    }

    /// Something about `id` changed: wake this node's waiter, and if the id
    /// is now free, tell the nodes this node denied it to as arbiter (only
    /// the chosen one while the id is handed off).
    pub(super) fn touch(&mut self, id: &Arc<str>, fx: &mut Effects) {
        fx.push(Effect::Wake(id.clone()));
        let free = self.own.get(id).is_none();
        let Some(view) = self.ids.get_mut(id) else {
            return;
        };
        if free && view.holders.is_empty() && view.reservation().is_none() && view.has_waiters() {
            let to = view.handoff().map(|h| h.to.clone());
            let waiters = view.take_waiters(to.as_ref());
            let to = waiters.iter().flat_map(|w| self.conn_to(w)).collect();
            fx.send(to, Msg::Free { id: id.clone() });
        }
    }

    /// Starts a tenure here at `now` (nanoseconds since the Unix epoch),
    /// its token above `floor` and every token seen, its instance given
    /// `budget` to stop, and tells every member.
    fn take(
        &mut self,
        id: &Arc<str>,
        floor: u64,
        budget: Duration,
        now: u64,
        fx: &mut Effects,
    ) -> Lease {
        let view = self.ids.entry(id.clone()).or_default();
        let token = tokens::next(view.max_token.max(floor), now / 1_000_000, self.slot);
        view.max_token = token;
        view.set_handoff(None);
        let since = now;
        let (lease, signal) = Lease::new(token);
        // Never replaces a tenure: a claim of an id held here is answered
        // with that tenure, and a grant for it is refused.
        self.own
            .insert(id.clone(), Tenure::with(token, budget, signal, since));
        let hold = Hold {
            id: id.clone(),
            token,
            since,
        };
        fx.send(self.every_conn(), Msg::Held(hold));
        self.touch(id, fx);
        lease
    }

    /// Ends this node's tenure of `id` (its lease with `end`, when given)
    /// and tells every member.
    pub(super) fn drop_own(&mut self, id: &Arc<str>, end: Option<LeaseEnd>, fx: &mut Effects) {
        self.settling.remove(id);
        if let Some(own) = self.own.remove(id) {
            if let Some(end) = end {
                fx.push(Effect::EndLease {
                    id: id.clone(),
                    signal: own.signal,
                    end,
                });
            }
            let released = Msg::Released {
                id: id.clone(),
                token: own.token,
            };
            fx.send(self.every_conn(), released);
            self.touch(id, fx);
        }
    }

    /// Ends this node's tenure of `id` because `winner`'s older tenure
    /// keeps it, and tells every member who holds it now.
    fn cede(&mut self, id: &Arc<str>, winner: &Arc<str>, token: u64, since: u64, fx: &mut Effects) {
        self.settling.remove(id);
        if let Some(own) = self.own.remove(id) {
            fx.push(Effect::EndLease {
                id: id.clone(),
                signal: own.signal,
                end: LeaseEnd::Conflict {
                    winner: Some(winner.to_string()),
                },
            });
            let ceded = Msg::Ceded {
                token: own.token,
                winner: winner.clone(),
                won: Hold {
                    id: id.clone(),
                    token,
                    since,
                },
            };
            fx.send(self.every_conn(), ceded);
            self.touch(id, fx);
        }
    }

    /// A guardian claims `id` at `now`, its instance given `budget` to
    /// stop: granted at once when this node holds it, is its own arbiter,
    /// or the id was handed off to it (and no request of it is out); busy
    /// when a holder, a reservation or a hand-off to another member is in
    /// view; otherwise asked of the arbiter.
    pub(in crate::backend::cluster) fn claim(
        &mut self,
        id: &Arc<str>,
        budget: Duration,
        now: u64,
    ) -> (Step, Effects) {
        let mut fx = Effects::default();
        if self.closed {
            return (Step::Closed, fx);
        }
        if let Some(own) = self.own.get(id) {
            let lease = Lease {
                token: own.token,
                signal: own.signal.clone(),
            };
            return (Step::Granted(lease), fx);
        }
        if let Some(holder) = self.holder(id) {
            return (Step::Busy(holder), fx);
        }
        let reserved = self.ids.get(id).and_then(|v| v.reservation().cloned());
        if let Some(r) = reserved.filter(|r| self.reachable(r)) {
            return (Step::Busy(Holder::new(r.to_string(), None)), fx);
        }
        let handed_here = match self.handed_to(id) {
            Some(to) if to != self.name => {
                return (Step::Busy(Holder::new(to.to_string(), None)), fx);
            }
            Some(_) => self.ready && !self.pending.contains_key(id),
            None => false,
        };
        let arbiter = self.arbiter();
        // Handed off to this node: its holder released it to this node
        // alone, and every member that heard of it keeps it for this node
        // (the arbiter too, or it still sees the holder). The arbiter would
        // grant it and deny everyone else, so asking it adds a round trip
        // and settles nothing.
        if arbiter == self.name || handed_here {
            let lease = self.take(id, 0, budget, now, &mut fx);
            return (Step::Granted(lease), fx);
        }
        fx.send(self.conn_to(&arbiter), Msg::ClaimReq { id: id.clone() });
        self.pending.insert(id.clone(), Pending { arbiter, budget });
        (Step::Asked, fx)
    }

    /// A guardian gives up its tenure of `id` with `token` (no effect when
    /// that tenure is over).
    pub(in crate::backend::cluster) fn release(&mut self, id: &str, token: u64) -> Effects {
        let mut fx = Effects::default();
        if let Some((id, _)) = self.own.get_key_value(id).filter(|(_, o)| o.token == token) {
            let id = id.clone();
            self.drop_own(&id, None, &mut fx);
        }
        fx
    }

    pub(super) fn on_released(
        &mut self,
        peer: &Arc<str>,
        id: &Arc<str>,
        token: u64,
        fx: &mut Effects,
    ) {
        let mut changed = false;
        if let Some(view) = self.ids.get_mut(id) {
            let before = view.holders.len();
            view.holders
                .retain(|h| !(h.node == *peer && h.token == token));
            changed = view.holders.len() != before;
            if view.reservation() == Some(peer) {
                view.set_reservation(None);
                changed = true;
            }
        }
        if let Some(p) = self.members.get_mut(peer) {
            p.holdings.remove(id);
        }
        if changed {
            self.touch(id, fx);
        }
    }

    /// A conflict's loser says `winner` keeps `id`. The loser is connected
    /// to the winner; this node may not be yet (a heal reaches the nodes
    /// of a side one connection at a time). Without this, the loser's
    /// release would show the id free here, and this node would start a
    /// second tenure that the winner ends with another conflict a moment
    /// later. The relayed hold counts until the winner's own `Sync` or
    /// `Held` replaces it, or for the failure timeout: a winner this node
    /// still cannot reach by then is on the other side of a split.
    ///
    /// The winner's own word comes first: a winner this node reaches has
    /// told it what it holds (its `Sync`, then each `Held` and `Released`,
    /// in order on one connection), and one that left holds nothing. A
    /// relay that arrives after either (the loser's connection is slower
    /// than the winner's, and the winner released the id and left
    /// meanwhile) is stale: counted, it would keep the id from every node
    /// here until the failure timeout.
    pub(super) fn on_relayed_hold(&mut self, winner: Arc<str>, won: Hold, fx: &mut Effects) {
        let Hold { id, token, since } = &won;
        let (id, token, since) = (id, *token, *since);
        if winner == self.name {
            // The loser's instance is stopping now, within its stop budget
            // (this tenure's: one id, one spec): this tenure overlaps it
            // until then.
            if let Some(own) = self.own.get(id).filter(|o| o.token == token) {
                let now = Instant::now();
                let until = now + own.budget;
                self.settling.retain(|_, (_, u)| *u > now);
                self.settling.insert(id.clone(), (token, until));
            }
            return;
        }
        let left = !self.members.contains_key(&winner)
            && self.left.iter().any(|(name, _)| *name == winner);
        if left || self.reachable(&winner) {
            if let Some(view) = self.ids.get_mut(id) {
                view.max_token = view.max_token.max(token);
            }
            debug!(node = %self.name, id = %id, holder = %winner, left, "a loser's relay of a holder this node hears from itself (or that left): ignored");
            return;
        }
        let view = self.ids.entry(id.clone()).or_default();
        view.max_token = view.max_token.max(token);
        if view.holders.iter().any(|h| h.node == winner) {
            return;
        }
        view.holders.push(RemoteHold {
            node: winner.clone(),
            token,
            since,
            relayed: true,
        });
        if let Some(p) = self.members.get_mut(&winner) {
            p.holdings.insert(id.clone());
        }
        debug!(node = %self.name, id = %id, holder = %winner, "holder relayed by a conflict's loser");
        self.touch(id, fx);
        fx.push(Effect::Timer(super::Timer::Relayed {
            id: id.clone(),
            winner,
            token,
        }));
    }

    /// The failure timeout after [`State::on_relayed_hold`]: the relayed
    /// hold lapses unless the winner's own word replaced it.
    pub(super) fn relayed_expired(
        &mut self,
        id: &Arc<str>,
        winner: &Arc<str>,
        token: u64,
        fx: &mut Effects,
    ) {
        let Some(view) = self.ids.get_mut(id) else {
            return;
        };
        let before = view.holders.len();
        view.holders
            .retain(|h| !(h.relayed && h.node == *winner && h.token == token));
        if view.holders.len() != before {
            if let Some(p) = self.members.get_mut(winner) {
                p.holdings.remove(id);
            }
            self.touch(id, fx);
        }
    }

    /// `peer`'s hold of `id` is gone (its `Sync` no longer lists it).
    pub(super) fn forget_hold(&mut self, peer: &Arc<str>, id: &Arc<str>, fx: &mut Effects) {
        if let Some(p) = self.members.get_mut(peer) {
            p.holdings.remove(id);
        }
        if let Some(view) = self.ids.get_mut(id) {
            view.holders.retain(|h| h.node != *peer);
        }
        self.touch(id, fx);
    }

    /// `peer` holds an id (from its `Held` or its `Sync`). Where this node
    /// holds the id too, the heal rule decides which tenure goes on.
    pub(super) fn on_held(&mut self, peer: &Arc<str>, hold: Hold, fx: &mut Effects) {
        let Some(p) = self.members.get_mut(peer) else {
            return;
        };
        p.holdings.insert(hold.id.clone());
        let view = self.ids.entry(hold.id.clone()).or_default();
        match view.holders.iter_mut().find(|h| h.node == *peer) {
            Some(h) => {
                h.token = hold.token;
                h.since = hold.since;
                h.relayed = false;
            }
            None => view.holders.push(RemoteHold {
                node: peer.clone(),
                token: hold.token,
                since: hold.since,
                relayed: false,
            }),
        }
        view.max_token = view.max_token.max(hold.token);
        if view.reservation() == Some(peer) {
            view.set_reservation(None);
        }
        // Held: a hand-off is over, whoever took the id.
        view.set_handoff(None);
        if let Some(own) = self.own.get(&hold.id) {
            // Two tenures of one id can see each other: a healed split, or
            // two arbiters during a membership change.
            if keeps((hold.since, peer), (own.extra, &self.name)) {
                info!(
                    node = %self.name, id = %hold.id, winner = %peer,
                    "conflict: {peer} has held this id longer; stopping the instance here"
                );
                self.cede(&hold.id, peer, hold.token, hold.since, fx);
            } else {
                debug!(node = %self.name, id = %hold.id, loser = %peer, "conflict: this node keeps the id");
            }
        }
        self.touch(&hold.id, fx);
    }

    /// As arbiter: `peer` asks for `id`. Denied when this node holds it or
    /// sees another holder, another member's reservation, or a hand-off to
    /// another member; otherwise reserved for `peer` and granted. Held back
    /// while this node joins.
    pub(super) fn on_claim_req(&mut self, peer: &Arc<str>, id: Arc<str>, fx: &mut Effects) {
        if !self.ready {
            self.deferred.push((peer.clone(), id));
            return;
        }
        let deny = if let Some(own) = self.own.get(&id) {
            Some(Some((self.name.clone(), own.token)))
        } else {
            let view = self.ids.entry(id.clone()).or_default();
            let holder = view
                .holders
                .iter()
                .filter(|h| h.node != *peer)
                .min_by(|a, b| (a.since, &a.node).cmp(&(b.since, &b.node)))
                .map(|h| (h.node.clone(), h.token));
            match holder {
                Some(h) => Some(Some(h)),
                None => match view.reservation().cloned() {
                    Some(r) if r != *peer && self.members.get(&r).is_some_and(Peer::reachable) => {
                        Some(Some((r, 0)))
                    }
                    _ => match view.handoff().map(|h| h.to.clone()) {
                        Some(to) if to != *peer => Some(Some((to, 0))),
                        _ => None,
                    },
                },
            }
        };
        let view: &mut IdView = self.ids.entry(id.clone()).or_default();
        let reply = match deny {
            Some(holder) => {
                view.add_waiter(peer);
                Msg::Deny { id, holder }
            }
            None => {
                view.set_reservation(Some(peer.clone()));
                Msg::Grant {
                    floor: view.max_token,
                    id,
                }
            }
        };
        fx.send(self.conn_to(peer), reply);
    }

    /// The arbiter `peer` granted `id`: the tenure starts at `now`, unless
    /// a holder announced itself while the request was in flight.
    pub(super) fn on_grant(
        &mut self,
        peer: &Arc<str>,
        id: Arc<str>,
        floor: u64,
        now: u64,
        fx: &mut Effects,
    ) {
        let Some(budget) = self
            .pending
            .get(&id)
            .filter(|p| p.arbiter == *peer)
            .map(|p| p.budget)
        else {
            if self.own.get(&id).is_none() {
                fx.send(self.conn_to(peer), Msg::Abandon { id });
            }
            return;
        };
        self.pending.remove(&id);
        if let Some(holder) = self.holder(&id) {
            fx.send(self.conn_to(peer), Msg::Abandon { id: id.clone() });
            fx.reply(id, Reply::Denied(Some(holder)));
            return;
        }
        let lease = self.take(&id, floor, budget, now, fx);
        // Last: when nobody waits for the lease any more (the guardian
        // stopped), the I/O layer releases it again.
        fx.reply(id, Reply::Granted(lease));
    }

    /// The arbiter `peer` denied `id`, naming the holder it sees (a token
    /// of 0 for a reservation).
    pub(super) fn on_deny(
        &mut self,
        peer: &Arc<str>,
        id: Arc<str>,
        holder: Option<(Arc<str>, u64)>,
        fx: &mut Effects,
    ) {
        if self.pending.get(&id).is_some_and(|p| p.arbiter == *peer) {
            self.pending.remove(&id);
            let holder = holder
                .map(|(node, token)| Holder::new(node.to_string(), (token != 0).then_some(token)));
            fx.reply(id, Reply::Denied(holder));
        }
    }

    /// As arbiter: `peer` did not take the grant of `id`.
    pub(super) fn on_abandon(&mut self, peer: &Arc<str>, id: &Arc<str>, fx: &mut Effects) {
        if let Some(view) = self.ids.get_mut(id)
            && view.reservation() == Some(peer)
        {
            view.set_reservation(None);
            self.touch(id, fx);
        }
    }
}
