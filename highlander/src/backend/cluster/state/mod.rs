//! The pure core of a node: its membership table and its registry of
//! claims. Frames from peers, calls from guardians and timers change it, and
//! each change answers with the [`Effects`] the I/O layer (`node.rs`)
//! carries out in order: frames to queue, connections to close, leases to
//! end, claims to complete, waiters to wake. Nothing here touches a socket,
//! a task or a channel, so every rule has a plain test (`tests.rs`, and
//! `membership.rs` for its own).

mod handoff;
mod membership;
mod profiles;
mod registry;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;
use tracing::{debug, info};

use super::tokens;
use super::wire::{Hold, Msg};
use crate::backend::kit::tenures::Tenures;
use crate::backend::{HeldId, Holder, Lease, LeaseEnd, LeaseSignal, Member, Profile};

use handoff::HANDOFF;

/// A connection's number, unique within the node.
pub(super) type ConnId = u64;

/// One thing the I/O layer does for the core. A change's effects are
/// carried out in the order given, before the next change.
#[derive(Debug)]
pub(super) enum Effect {
    /// Queue `msg` on each connection (the peer's name, its connection).
    Send {
        to: Vec<(Arc<str>, ConnId)>,
        msg: Msg,
    },
    /// Drop the connection's queue: its writer sends what is queued, then
    /// closes its half.
    Hangup(ConnId),
    /// Stop the connection's reader and writer now.
    Stop(ConnId),
    /// End this node's lease of `id` with `end`.
    EndLease {
        /// Which tenure: read by tests and shown by `Debug`.
        #[cfg_attr(not(test), allow(dead_code))]
        id: Arc<str>,
        signal: LeaseSignal,
        end: LeaseEnd,
    },
    /// Complete this node's claim of `id` that waits on an arbiter.
    Reply { id: Arc<str>, reply: Reply },
    /// Something about `id` changed: wake this node's guardian waiting on it.
    Wake(Arc<str>),
    /// Membership changed: wake every waiting guardian (and a join in
    /// progress), and whoever waits on the member list.
    Epoch,
    /// A member's profile changed: wake whoever waits on the member list
    /// (not the guardians: where an id may be claimed has not changed).
    Members,
    /// Dial now: a member was learned or lost.
    Dial,
    /// Call [`State::expired`] with this after the failure timeout.
    Timer(Timer),
}

/// The effects of one change, in order.
#[derive(Debug, Default)]
#[must_use = "effects must be carried out"]
pub(super) struct Effects(Vec<Effect>);

impl Effects {
    fn push(&mut self, effect: Effect) {
        self.0.push(effect);
    }

    /// Queues `msg` on the connections `to`; nothing when `to` is empty.
    fn send(&mut self, to: Vec<(Arc<str>, ConnId)>, msg: Msg) {
        if !to.is_empty() {
            self.push(Effect::Send { to, msg });
        }
    }

    fn reply(&mut self, id: Arc<str>, reply: Reply) {
        self.push(Effect::Reply { id, reply });
    }

    /// The effects, in order.
    #[cfg(test)]
    pub(super) fn list(&self) -> &[Effect] {
        &self.0
    }
}

impl IntoIterator for Effects {
    type Item = Effect;
    type IntoIter = std::vec::IntoIter<Effect>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// How a claim that waited on the arbiter ends.
#[derive(Debug)]
pub(super) enum Reply {
    Granted(Lease),
    Denied(Option<Holder>),
    /// The arbiter went away, or a newer request replaced this one: ask
    /// again (the state has changed, so this is no loop).
    Retry,
}

/// What became of a claim at once.
#[derive(Debug)]
pub(super) enum Step {
    /// The node has left the cluster.
    Closed,
    Granted(Lease),
    Busy(Holder),
    /// A request went to the arbiter: a [`Reply`] for the id follows.
    Asked,
}

/// A call back after the failure timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Timer {
    /// `peer` closed `conn` because a better connection exists: unless the
    /// replacement came, the peer is down.
    Switching { peer: Arc<str>, conn: ConnId },
    /// The hold of `id` by `winner` with `token`, relayed by a conflict's
    /// loser, lapses unless the winner's own word replaced it.
    Relayed {
        id: Arc<str>,
        winner: Arc<str>,
        token: u64,
    },
    /// The reservation of `id` for `to`, made when the tenure with `token`
    /// was handed off, lapses (after [`HANDOFF`], not the failure timeout).
    Handoff {
        id: Arc<str>,
        to: Arc<str>,
        token: u64,
    },
}

impl Timer {
    /// How long after it was asked for the timer runs out.
    pub(super) fn delay(&self, failure_timeout: Duration) -> Duration {
        match self {
            Timer::Switching { .. } | Timer::Relayed { .. } => failure_timeout,
            Timer::Handoff { .. } => HANDOFF,
        }
    }
}

/// Everything a node knows about the others and about who holds what.
pub(super) struct State {
    name: Arc<str>,
    /// The low bits of this node's tokens.
    slot: u64,
    members: HashMap<Arc<str>, Peer>,
    /// This node's tenures, each with its start (nanoseconds since the Unix
    /// epoch on this node's clock): the heal rule compares them.
    own: Tenures<Arc<str>, u64>,
    ids: HashMap<Arc<str>, IdView>,
    /// Claims asked of an arbiter, by id.
    pending: HashMap<Arc<str>, Pending>,
    /// Incarnations that said goodbye: never taken back as members.
    left: HashSet<(Arc<str>, u64)>,
    /// Claim requests received while this node was still joining.
    deferred: Vec<(Arc<str>, Arc<str>)>,
    ready: bool,
    closed: bool,
    next_conn: ConnId,
    /// What this node announced last, sent to every member.
    profile: Option<Profile>,
    /// Per id, this node's tenure (its token) that won a conflict, and
    /// until when the loser's instance may still be stopping: the loser
    /// ceded, and stops within its stop budget.
    settling: HashMap<Arc<str>, (u64, Instant)>,
}

/// Another member as this node sees it.
pub(super) struct Peer {
    incarnation: u64,
    addr: Option<String>,
    link: Link,
    ready: bool,
    holdings: HashSet<Arc<str>>,
    down_since: Instant,
    /// When its current connection last brought a frame (or was adopted).
    heard: Instant,
    /// What it announced, as far as this node has it.
    profile: profiles::Announced,
}

enum Link {
    Down,
    Up(Conn),
    /// The peer closed our connection because a better one exists; the
    /// replacement is expected within the failure timeout.
    Switching {
        conn: ConnId,
    },
}

struct Conn {
    id: ConnId,
    lower_dialed: bool,
    synced: bool,
    /// Holdings from `SyncPart` frames, completed by the next `Sync`.
    partial: Vec<Hold>,
}

impl Peer {
    fn new(incarnation: u64, addr: Option<String>) -> Peer {
        Peer {
            incarnation,
            addr,
            link: Link::Down,
            ready: false,
            holdings: HashSet::new(),
            down_since: Instant::now(),
            heard: Instant::now(),
            profile: profiles::Announced::default(),
        }
    }

    /// Connected, and its first `Sync` arrived.
    pub(super) fn synced(&self) -> bool {
        matches!(&self.link, Link::Up(c) if c.synced)
    }

    /// Synced, or switching to a better connection.
    pub(super) fn reachable(&self) -> bool {
        self.synced() || matches!(self.link, Link::Switching { .. })
    }

    pub(super) fn is_down(&self) -> bool {
        matches!(self.link, Link::Down)
    }

    /// The address it is dialed at, when known.
    pub(super) fn addr(&self) -> Option<&str> {
        self.addr.as_deref()
    }

    /// Since when it is down (meaningful while it is).
    pub(super) fn down_since(&self) -> Instant {
        self.down_since
    }

    fn conn(&self) -> Option<ConnId> {
        match &self.link {
            Link::Up(c) => Some(c.id),
            _ => None,
        }
    }
}

/// A claim asked of an arbiter.
struct Pending {
    arbiter: Arc<str>,
    /// The stop budget the guardian gave with its claim.
    budget: Duration,
}

/// What this node knows of one id. Every id any member runs has one on
/// every member: 40 bytes, the rarer parts boxed (they were 120 bytes
/// inline).
#[derive(Default)]
struct IdView {
    holders: Vec<RemoteHold>,
    max_token: u64,
    /// A reservation, waiters or a handoff: made when one is recorded,
    /// dropped when the last goes.
    more: Option<Box<Arbitration>>,
}

/// The parts of an [`IdView`] an id has while it is contested or handed
/// over.
#[derive(Default)]
struct Arbitration {
    /// As arbiter: granted to this node, not yet announced by it.
    reservation: Option<Arc<str>>,
    /// As arbiter: nodes denied the id, told with `Free` when it frees
    /// (each once; a few members at most).
    waiters: Vec<Arc<str>>,
    /// Its last holder released it in favour of this member: only it may
    /// claim the id until it holds it, goes down, or [`HANDOFF`] passes.
    handoff: Option<Handoff>,
}

impl IdView {
    fn reservation(&self) -> Option<&Arc<str>> {
        self.more.as_ref()?.reservation.as_ref()
    }

    fn handoff(&self) -> Option<&Handoff> {
        self.more.as_ref()?.handoff.as_ref()
    }

    fn has_waiters(&self) -> bool {
        self.more.as_ref().is_some_and(|m| !m.waiters.is_empty())
    }

    fn more(&mut self) -> &mut Arbitration {
        self.more.get_or_insert_with(Box::default)
    }

    fn set_reservation(&mut self, to: Option<Arc<str>>) {
        match to {
            Some(to) => self.more().reservation = Some(to),
            None => {
                if let Some(more) = &mut self.more {
                    more.reservation = None;
                }
                self.tidy();
            }
        }
    }

    fn set_handoff(&mut self, handoff: Option<Handoff>) {
        match handoff {
            Some(handoff) => self.more().handoff = Some(handoff),
            None => {
                if let Some(more) = &mut self.more {
                    more.handoff = None;
                }
                self.tidy();
            }
        }
    }

    fn add_waiter(&mut self, peer: &Arc<str>) {
        let waiters = &mut self.more().waiters;
        if !waiters.contains(peer) {
            waiters.reserve_exact(1);
            waiters.push(peer.clone());
        }
    }

    /// Takes the waiters: only `only` (when it waits) if given, else all.
    fn take_waiters(&mut self, only: Option<&Arc<str>>) -> Vec<Arc<str>> {
        let Some(more) = &mut self.more else {
            return Vec::new();
        };
        let taken = match only {
            Some(peer) => match more.waiters.iter().position(|w| w == peer) {
                Some(i) => vec![more.waiters.swap_remove(i)],
                None => Vec::new(),
            },
            None => std::mem::take(&mut more.waiters),
        };
        self.tidy();
        taken
    }

    /// Drops the boxed part once it holds nothing.
    fn tidy(&mut self) {
        if self
            .more
            .as_ref()
            .is_some_and(|m| m.reservation.is_none() && m.waiters.is_empty() && m.handoff.is_none())
        {
            self.more = None;
        }
    }
}

/// A release in favour of `to`, of the tenure with `token`.
#[derive(Debug, Clone)]
struct Handoff {
    to: Arc<str>,
    token: u64,
}

struct RemoteHold {
    node: Arc<str>,
    token: u64,
    since: u64,
    /// Learned from a conflict's loser (`Ceded`), not from the holder: it
    /// counts until the holder's own word replaces it, or for at most the
    /// failure timeout.
    relayed: bool,
}

impl State {
    /// A node named `name` that knows nobody and holds nothing.
    pub(super) fn new(name: Arc<str>) -> State {
        State {
            slot: tokens::slot(&name),
            name,
            members: HashMap::new(),
            own: Tenures::new(),
            ids: HashMap::new(),
            pending: HashMap::new(),
            left: HashSet::new(),
            deferred: Vec::new(),
            ready: false,
            closed: false,
            next_conn: 1,
            profile: None,
            settling: HashMap::new(),
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Every other member this node knows.
    pub(super) fn peers(&self) -> impl Iterator<Item = (&Arc<str>, &Peer)> {
        self.members.iter()
    }

    pub(super) fn peer(&self, name: &str) -> Option<&Peer> {
        self.members.get(name)
    }

    /// Forgets the members for which `forget` says so.
    pub(super) fn forget(&mut self, mut forget: impl FnMut(&Peer) -> bool) {
        self.members.retain(|_, p| !forget(p));
    }

    fn reachable(&self, peer: &str) -> bool {
        self.members.get(peer).is_some_and(Peer::reachable)
    }

    /// The connection to `peer`, when one is up.
    fn conn_to(&self, peer: &Arc<str>) -> Vec<(Arc<str>, ConnId)> {
        self.members
            .get(peer)
            .and_then(Peer::conn)
            .map(|c| vec![(peer.clone(), c)])
            .unwrap_or_default()
    }

    /// Every connection that is up.
    fn every_conn(&self) -> Vec<(Arc<str>, ConnId)> {
        self.members
            .iter()
            .filter_map(|(n, p)| Some((n.clone(), p.conn()?)))
            .collect()
    }

    /// Whether `conn` is the connection up to `peer` now.
    fn current(&self, peer: &str, conn: ConnId) -> bool {
        self.members
            .get(peer)
            .is_some_and(|p| p.conn() == Some(conn))
    }

    /// A frame from `peer` on connection `conn`, at `now` (nanoseconds
    /// since the Unix epoch). Frames on a connection that is no longer the
    /// peer's are ignored.
    pub(super) fn on_frame(
        &mut self,
        peer: &Arc<str>,
        conn: ConnId,
        msg: Msg,
        now: u64,
    ) -> Effects {
        let mut fx = Effects::default();
        if !self.current(peer, conn) {
            return fx;
        }
        if let Some(p) = self.members.get_mut(peer) {
            p.heard = Instant::now();
        }
        match msg {
            Msg::Ping => {}
            Msg::SyncPart { holdings } => {
                if let Some(Link::Up(c)) = self.members.get_mut(peer).map(|p| &mut p.link) {
                    c.partial.extend(holdings);
                }
            }
            Msg::Sync {
                ready,
                members,
                mut holdings,
                profile,
            } => {
                if let Some(Link::Up(c)) = self.members.get_mut(peer).map(|p| &mut p.link)
                    && !c.partial.is_empty()
                {
                    let mut all = std::mem::take(&mut c.partial);
                    all.append(&mut holdings);
                    holdings = all;
                }
                self.on_sync(peer, ready, members, holdings, &mut fx);
                if let Some(head) = profile {
                    self.on_announce(peer, conn, head, &mut fx);
                }
            }
            Msg::Ready => {
                if let Some(p) = self.members.get_mut(peer) {
                    p.ready = true;
                }
                fx.push(Effect::Epoch);
            }
            Msg::MemberUp(m) => self.learn(m, &mut fx),
            Msg::Held(hold) => self.on_held(peer, hold, &mut fx),
            Msg::Released { id, token } => self.on_released(peer, &id, token, &mut fx),
            Msg::Ceded { token, winner, won } => {
                let id = won.id.clone();
                self.on_relayed_hold(winner, won, &mut fx);
                self.on_released(peer, &id, token, &mut fx);
            }
            Msg::ClaimReq { id } => self.on_claim_req(peer, id, &mut fx),
            Msg::Grant { id, floor } => self.on_grant(peer, id, floor, now, &mut fx),
            Msg::Deny { id, holder } => self.on_deny(peer, id, holder, &mut fx),
            Msg::Abandon { id } => self.on_abandon(peer, &id, &mut fx),
            Msg::Free { id } => fx.push(Effect::Wake(id)),
            Msg::Leave => {
                info!(node = %self.name, peer = %peer, "member left the cluster");
                self.member_down(peer, &mut fx);
                if let Some(p) = self.members.remove(peer) {
                    self.left.insert((peer.clone(), p.incarnation));
                }
            }
            Msg::Announce(head) => self.on_announce(peer, conn, head, &mut fx),
            Msg::CatalogWant { digest } => self.on_catalog_want(peer, conn, digest, &mut fx),
            Msg::CatalogPart {
                digest,
                part,
                last,
                ids,
            } => self.on_catalog_part(peer, digest, part, last, ids, &mut fx),
            Msg::Handoff { id, token, to } => self.on_handoff(peer, &id, token, to, &mut fx),
            Msg::Superseded => {
                if let Some(p) = self.members.get_mut(peer) {
                    p.link = Link::Switching { conn };
                    fx.push(Effect::Hangup(conn));
                    debug!(node = %self.name, peer = %peer, "connection superseded: expecting its replacement");
                }
                fx.push(Effect::Timer(Timer::Switching {
                    peer: peer.clone(),
                    conn,
                }));
            }
        }
        fx
    }

    /// Connection `conn` to `peer` closed (EOF, reset, silence, a frame
    /// that did not open): if it was the peer's, the peer is down.
    pub(super) fn conn_closed(&mut self, peer: &Arc<str>, conn: ConnId) -> Effects {
        let mut fx = Effects::default();
        if self.current(peer, conn) {
            self.member_down(peer, &mut fx);
        }
        fx
    }

    /// A [`Timer`] this state asked for has run out.
    pub(super) fn expired(&mut self, timer: Timer) -> Effects {
        let mut fx = Effects::default();
        match timer {
            Timer::Switching { peer, conn } => {
                if self
                    .members
                    .get(&peer)
                    .is_some_and(|p| matches!(p.link, Link::Switching { conn: c } if c == conn))
                {
                    self.member_down(&peer, &mut fx);
                }
            }
            Timer::Relayed { id, winner, token } => {
                self.relayed_expired(&id, &winner, token, &mut fx)
            }
            Timer::Handoff { id, to, token } => self.handoff_expired(&id, &to, token, &mut fx),
        }
        fx
    }

    /// Every member, this node (at `addr`) included, sorted by name, each
    /// with the profile it announced when this node has all of it.
    pub(super) fn members(&self, addr: Option<String>) -> Vec<Member> {
        let with = |m: Member, profile: Option<&Profile>| match profile {
            Some(p) => m.with_profile(p.clone()),
            None => m,
        };
        let mut members: Vec<Member> = self
            .members
            .iter()
            .map(|(name, p)| {
                let m = Member::new(name.to_string(), p.reachable(), p.addr.clone());
                with(m, p.profile.shown())
            })
            .collect();
        let me = Member::new(self.name.to_string(), !self.closed, addr);
        members.push(with(me, self.profile.as_ref()));
        members.sort_by(|a, b| a.node.cmp(&b.node));
        members
    }

    /// The holder of `id` among the members this node can see, by the heal
    /// rule: the earliest tenure, ties to the lower node name.
    pub(super) fn holder(&self, id: &str) -> Option<Holder> {
        self.visible(id)
            .map(|(_, node, token)| Holder::new(node.to_string(), Some(token)))
    }

    /// Every id with a visible holder, the one [`State::holder`] names, with
    /// the wall-clock start of its tenure.
    pub(super) fn holders(&self) -> Vec<HeldId> {
        let ids: HashSet<&Arc<str>> = self.own.keys().chain(self.ids.keys()).collect();
        let mut held: Vec<HeldId> = ids
            .into_iter()
            .filter_map(|id| {
                let (since, node, token) = self.visible(id)?;
                let since = UNIX_EPOCH.checked_add(Duration::from_nanos(since));
                Some(HeldId::new(
                    id.to_string(),
                    Holder::new(node.to_string(), Some(token)),
                    since,
                ))
            })
            .collect();
        held.sort_by(|a, b| a.id.cmp(&b.id));
        held
    }
}
