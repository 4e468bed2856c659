//! Membership: which connection is a member's (one per pair, the newest
//! incarnation), what a new connection opens with (this node's whole
//! state), members learned from others, a member declared down, the node
//! becoming ready and leaving.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{debug, info};

use super::{Conn, ConnId, Effect, Effects, Link, Peer, Reply, State};
use crate::backend::LeaseEnd;
use crate::backend::cluster::wire::{Hold, MemberInfo, Msg, RejectReason, valid_addr, valid_name};

impl State {
    /// `m` is a member (from a peer's `Sync` or `MemberUp`): a new one is
    /// dialed; a newer incarnation of a member that is down replaces it.
    pub(super) fn learn(&mut self, m: MemberInfo, fx: &mut Effects) {
        if m.name == self.name
            || !valid_name(&m.name)
            || m.addr.as_deref().is_some_and(|a| !valid_addr(a))
            || self.left.contains(&(m.name.clone(), m.incarnation))
        {
            return;
        }
        match self.members.get_mut(&m.name) {
            Some(p) => {
                if m.incarnation > p.incarnation && p.is_down() {
                    p.incarnation = m.incarnation;
                    if m.addr.is_some() {
                        p.addr = m.addr;
                    }
                }
            }
            None => {
                debug!(node = %self.name, member = %m.name, "learned a member");
                self.members
                    .insert(m.name.clone(), Peer::new(m.incarnation, m.addr));
                fx.push(Effect::Dial);
                fx.push(Effect::Epoch);
            }
        }
    }

    /// `peer` can no longer be reached: its holds no longer count, its
    /// reservations lapse, requests to it are asked again elsewhere.
    pub(super) fn member_down(&mut self, peer: &Arc<str>, fx: &mut Effects) {
        let Some(p) = self.members.get_mut(peer) else {
            return;
        };
        if let Link::Up(c) = std::mem::replace(&mut p.link, Link::Down) {
            fx.push(Effect::Stop(c.id));
        }
        p.ready = false;
        p.down_since = Instant::now();
        let held: Vec<Arc<str>> = p.holdings.drain().collect();
        for id in &held {
            if let Some(view) = self.ids.get_mut(id) {
                view.holders.retain(|h| h.node != *peer);
            }
        }
        let reserved: Vec<Arc<str>> = self
            .ids
            .iter_mut()
            .filter(|(_, v)| v.reservation.as_ref() == Some(peer))
            .map(|(id, v)| {
                v.reservation = None;
                id.clone()
            })
            .collect();
        for id in held.iter().chain(reserved.iter()) {
            self.touch(id, fx);
        }
        let asked: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|(_, arbiter)| *arbiter == peer)
            .map(|(id, _)| id.clone())
            .collect();
        for id in asked {
            if self.pending.remove(&id).is_some() {
                fx.reply(id, Reply::Retry);
            }
        }
        info!(node = %self.name, peer = %peer, released = held.len(), "member down");
        fx.push(Effect::Dial);
        fx.push(Effect::Epoch);
    }

    /// `peer`'s whole state (its `SyncPart`s and `Sync`): holds it no longer
    /// lists are forgotten, the others taken as `Held`, its members learned.
    /// The first `Sync` on a connection makes the peer up, and every other
    /// member is told to connect to it.
    pub(super) fn on_sync(
        &mut self,
        peer: &Arc<str>,
        ready: bool,
        members: Vec<MemberInfo>,
        holdings: Vec<Hold>,
        fx: &mut Effects,
    ) {
        let Some(p) = self.members.get_mut(peer) else {
            return;
        };
        let mut first = false;
        if let Link::Up(c) = &mut p.link {
            first = !c.synced;
            c.synced = true;
        }
        p.ready = ready;
        let incoming: HashSet<Arc<str>> = holdings.iter().map(|h| h.id.clone()).collect();
        let gone: Vec<Arc<str>> = p
            .holdings
            .iter()
            .filter(|id| !incoming.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.forget_hold(peer, &id, fx);
        }
        for hold in holdings {
            self.on_held(peer, hold, fx);
        }
        for m in members {
            self.learn(m, fx);
        }
        if first {
            let info = self.members.get(peer).map(|p| MemberInfo {
                name: peer.clone(),
                incarnation: p.incarnation,
                addr: p.addr.clone(),
            });
            if let Some(info) = info {
                let others = self
                    .every_conn()
                    .into_iter()
                    .filter(|(name, _)| name != peer)
                    .collect();
                fx.send(others, Msg::MemberUp(info));
            }
            info!(node = %self.name, peer = %peer, "member up");
        }
        fx.push(Effect::Epoch);
    }

    /// Decides whether a freshly authenticated connection becomes the one
    /// to `info.name`, and numbers it. Between two nodes the connection
    /// dialed by the lower name is preferred, so two simultaneous dials end
    /// with one on both sides; any other new connection replaces the old
    /// one (its dialer saw the old one die). The effects open the new
    /// connection with this node's whole state, holdings beyond one
    /// `chunk` of bytes in `SyncPart` frames ahead of the `Sync`.
    pub(in crate::backend::cluster) fn adopt(
        &mut self,
        info: &MemberInfo,
        dialed_by_me: bool,
        chunk: usize,
    ) -> Result<(ConnId, Effects), RejectReason> {
        let mut fx = Effects::default();
        if self.closed || self.left.contains(&(info.name.clone(), info.incarnation)) {
            return Err(RejectReason::Duplicate);
        }
        let lower_dialed = if dialed_by_me {
            self.name < info.name
        } else {
            info.name < self.name
        };
        let mut was_synced = false;
        match self.members.get(&info.name) {
            None => {}
            Some(p) if info.incarnation != p.incarnation => {
                if info.incarnation < p.incarnation && !p.is_down() {
                    return Err(RejectReason::NameTaken);
                }
                if !p.is_down() {
                    info!(node = %self.name, peer = %info.name, "member restarted: a new incarnation replaces the old one");
                }
                self.member_down(&info.name, &mut fx);
            }
            Some(p) => match &p.link {
                Link::Down => {}
                Link::Switching { .. } => was_synced = true,
                Link::Up(old) => {
                    if old.lower_dialed && !lower_dialed {
                        return Err(RejectReason::Duplicate);
                    }
                    was_synced = old.synced;
                }
            },
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let p = self
            .members
            .entry(info.name.clone())
            .or_insert_with(|| Peer::new(info.incarnation, None));
        p.incarnation = info.incarnation;
        if info.addr.is_some() {
            p.addr = info.addr.clone();
        }
        let conn = Conn {
            id,
            lower_dialed,
            synced: was_synced,
            partial: Vec::new(),
        };
        if let Link::Up(old) = std::mem::replace(&mut p.link, Link::Up(conn)) {
            // The old writer sends this, then closes its half.
            fx.send(vec![(info.name.clone(), old.id)], Msg::Superseded);
            fx.push(Effect::Hangup(old.id));
        }
        // Our whole state first, then whatever follows.
        let to = || vec![(info.name.clone(), id)];
        for msg in self.sync_frames(&info.name, chunk) {
            fx.send(to(), msg);
        }
        let resend: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|(_, arbiter)| **arbiter == info.name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in resend {
            fx.send(to(), Msg::ClaimReq { id });
        }
        fx.push(Effect::Epoch);
        Ok((id, fx))
    }

    /// This node's whole state for a new connection to `peer`: every id it
    /// holds and every member it is synced with. Holdings beyond `chunk`
    /// bytes go ahead in `SyncPart` frames, so a frame stays far below the
    /// frame limit however many ids this node holds.
    fn sync_frames(&self, peer: &Arc<str>, chunk: usize) -> Vec<Msg> {
        let mut frames = Vec::new();
        let mut size = 0;
        let mut part = Vec::new();
        for (id, o) in &self.own {
            let hold = Hold {
                id: id.clone(),
                token: o.token,
                since: o.since,
            };
            size += hold.encoded_len();
            part.push(hold);
            if size >= chunk {
                frames.push(Msg::SyncPart {
                    holdings: std::mem::take(&mut part),
                });
                size = 0;
            }
        }
        frames.push(Msg::Sync {
            ready: self.ready,
            members: self
                .members
                .iter()
                .filter(|(n, p)| *n != peer && p.synced())
                .map(|(n, p)| MemberInfo {
                    name: n.clone(),
                    incarnation: p.incarnation,
                    addr: p.addr.clone(),
                })
                .collect(),
            holdings: part,
        });
        frames
    }

    /// The node has joined (or its join window passed): it tells every
    /// member and settles the claims it held back meanwhile.
    pub(in crate::backend::cluster) fn become_ready(&mut self) -> Effects {
        let mut fx = Effects::default();
        self.ready = true;
        fx.send(self.every_conn(), Msg::Ready);
        for (peer, id) in std::mem::take(&mut self.deferred) {
            if self.members.get(&peer).is_some_and(Peer::synced) {
                self.on_claim_req(&peer, id, &mut fx);
            }
        }
        fx.push(Effect::Epoch);
        fx
    }

    /// Graceful leave: every tenure ends (`Lost`) and is released, claims
    /// waiting on an arbiter are answered, every member gets `Leave` and
    /// its connection is closed once flushed. `None` when already left.
    pub(in crate::backend::cluster) fn close(&mut self) -> Option<Effects> {
        if self.closed {
            return None;
        }
        let mut fx = Effects::default();
        self.closed = true;
        let own: Vec<Arc<str>> = self.own.keys().cloned().collect();
        for id in own {
            self.drop_own(&id, Some(LeaseEnd::Lost), &mut fx);
        }
        for (id, _) in self.pending.drain() {
            fx.reply(id, Reply::Retry);
        }
        let conns = self.every_conn();
        for p in self.members.values_mut() {
            p.link = Link::Down;
        }
        fx.send(conns.clone(), Msg::Leave);
        for (_, conn) in conns {
            // Dropping the queue lets the writer flush and close.
            fx.push(Effect::Hangup(conn));
        }
        Some(fx)
    }
}
