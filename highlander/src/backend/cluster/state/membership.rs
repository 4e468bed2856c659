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
    /// reservations lapse (hand-offs to it too), requests to it are asked
    /// again elsewhere, and its profile is dropped.
    pub(super) fn member_down(&mut self, peer: &Arc<str>, fx: &mut Effects) {
        self.drop_profile(peer);
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
            .filter(|(_, v)| {
                v.reservation() == Some(peer) || v.handoff().is_some_and(|h| h.to == *peer)
            })
            .map(|(id, v)| {
                v.set_reservation(None);
                v.set_handoff(None);
                id.clone()
            })
            .collect();
        for id in held.iter().chain(reserved.iter()) {
            self.touch(id, fx);
        }
        let asked: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|(_, p)| p.arbiter == *peer)
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
        p.heard = Instant::now();
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
            .filter(|(_, p)| p.arbiter == info.name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in resend {
            fx.send(to(), Msg::ClaimReq { id });
        }
        fx.push(Effect::Epoch);
        Ok((id, fx))
    }

    /// This node's whole state for a new connection to `peer`: every id it
    /// holds, every member it is synced with, and its profile's head.
    /// Holdings beyond `chunk` bytes go ahead in `SyncPart` frames, so a frame stays far below the
    /// frame limit however many ids this node holds.
    fn sync_frames(&self, peer: &Arc<str>, chunk: usize) -> Vec<Msg> {
        let mut frames = Vec::new();
        let mut size = 0;
        let mut part = Vec::new();
        for (id, o) in self.own.iter() {
            let hold = Hold {
                id: id.clone(),
                token: o.token,
                since: o.extra,
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
            profile: self.own_head(),
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

#[cfg(test)]
mod tests {
    use super::super::tests::{
        BUDGET, at, connect, ended, granted, has, hold, holder_of, info, name, ready, replies,
        sent, woken,
    };
    use super::super::{Effect, Reply, Step, Timer};
    use crate::backend::LeaseEnd;
    use crate::backend::cluster::wire::{Msg, RejectReason, SYNC_CHUNK};

    #[test]
    fn a_join_merges_both_registries() {
        let mut a = ready("a");
        let _ = granted(a.claim(&name("x"), BUDGET, at(1)).0);
        // What "a" sends a new member: its holdings in its `Sync`.
        let (conn, fx) = a.adopt(&info("b", 1), false, SYNC_CHUNK).unwrap();
        let sync = sent(&fx)
            .into_iter()
            .find_map(|(to, m)| matches!(m, Msg::Sync { .. }).then_some((to, m.clone())));
        let Some(("b", Msg::Sync { holdings, .. })) = sync else {
            panic!("a Sync to b: {:?}", fx.list());
        };
        assert_eq!(holdings.iter().map(|h| &*h.id).collect::<Vec<_>>(), ["x"]);
        // "b" holds "y": once its `Sync` arrives, "a" sees both.
        let _ = a.on_frame(
            &name("b"),
            conn,
            Msg::Sync {
                ready: true,
                members: vec![info("c", 1)],
                holdings: vec![hold("y", 2 << 10, at(0))],
                profile: None,
            },
            at(2),
        );
        let held: Vec<(String, String)> = a
            .holders()
            .into_iter()
            .map(|h| (h.id, h.holder.node))
            .collect();
        assert_eq!(held, [("x".into(), "a".into()), ("y".into(), "b".into())]);
        // The member "b" named is learned (and dialed).
        assert!(a.peer("c").is_some_and(|p| p.is_down()));
        // A later `Sync` without "y" means "b" no longer holds it.
        let fx = a.on_frame(
            &name("b"),
            conn,
            Msg::Sync {
                ready: true,
                members: vec![],
                holdings: vec![],
                profile: None,
            },
            at(3),
        );
        assert!(woken(&fx, "y"));
        assert_eq!(holder_of(&a, "y"), None);
    }

    #[test]
    fn large_holdings_go_ahead_in_parts_and_are_merged_on_arrival() {
        let mut a = ready("a");
        for i in 0..10 {
            let _ = granted(a.claim(&name(&format!("id-{i}")), BUDGET, at(1)).0);
        }
        // A chunk of about three holds.
        let chunk = 3 * hold("id-0", 0, 0).encoded_len();
        let (_, fx) = a.adopt(&info("b", 1), false, chunk).unwrap();
        let frames: Vec<Msg> = sent(&fx).into_iter().map(|(_, m)| m.clone()).collect();
        let parts = frames
            .iter()
            .filter(|m| matches!(m, Msg::SyncPart { .. }))
            .count();
        assert_eq!(parts, 3);
        assert!(matches!(frames.last(), Some(Msg::Sync { holdings, .. }) if holdings.len() == 1));
        // Delivered to another node in order, they add up to every hold.
        let mut b = ready("b");
        let (conn, _) = b.adopt(&info("a", 1), true, SYNC_CHUNK).unwrap();
        for frame in frames {
            let _ = b.on_frame(&name("a"), conn, frame, at(2));
        }
        assert_eq!(b.holders().len(), 10);
        assert!(b.peer("a").unwrap().synced());
    }

    #[test]
    fn one_connection_per_pair_and_the_newest_incarnation_wins() {
        let mut s = ready("b");
        // "a" dialed us: the lower name's dial, preferred.
        let (first, _) = s.adopt(&info("a", 1), false, SYNC_CHUNK).unwrap();
        // Our own dial to "a" (the higher name's) loses to it.
        assert_eq!(
            s.adopt(&info("a", 1), true, SYNC_CHUNK).err(),
            Some(RejectReason::Duplicate)
        );
        // A new dial from "a" replaces its old one, told it is superseded.
        let (second, fx) = s.adopt(&info("a", 1), false, SYNC_CHUNK).unwrap();
        assert_ne!(first, second);
        assert!(has(
            &fx,
            |e| matches!(e, Effect::Send { to, msg: Msg::Superseded } if to[0].1 == first)
        ));
        assert!(has(&fx, |e| matches!(e, Effect::Hangup(c) if *c == first)));
        // An older incarnation is refused while the newer one is connected; a
        // newer one replaces it.
        let _ = s.on_frame(
            &name("a"),
            second,
            Msg::Sync {
                ready: true,
                members: vec![],
                holdings: vec![hold("x", 1, 1)],
                profile: None,
            },
            at(1),
        );
        let (_, fx) = s.adopt(&info("a", 2), false, SYNC_CHUNK).unwrap();
        assert!(has(&fx, |e| matches!(e, Effect::Stop(c) if *c == second)));
        assert_eq!(
            holder_of(&s, "x"),
            None,
            "the old incarnation's holds are gone"
        );
        assert_eq!(
            s.adopt(&info("a", 1), false, SYNC_CHUNK).err(),
            Some(RejectReason::NameTaken)
        );
    }

    #[test]
    fn a_superseded_connection_keeps_the_member_until_the_failure_timeout() {
        let mut s = ready("b");
        let (a, _) = connect(&mut s, "a", vec![hold("x", 1, 1)]);
        let fx = s.on_frame(&name("a"), a, Msg::Superseded, at(1));
        assert!(has(&fx, |e| matches!(e, Effect::Hangup(c) if *c == a)));
        let timer = Timer::Switching {
            peer: name("a"),
            conn: a,
        };
        assert!(has(&fx, |e| matches!(e, Effect::Timer(t) if *t == timer)));
        assert!(s.peer("a").unwrap().reachable());
        assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
        // No replacement came: the member is down.
        let fx = s.expired(timer.clone());
        assert!(has(&fx, |e| matches!(e, Effect::Epoch)));
        assert_eq!(holder_of(&s, "x"), None);
        // Had the replacement come, the timer would change nothing.
        let mut s = ready("b");
        let (a, _) = connect(&mut s, "a", vec![]);
        let _ = s.on_frame(&name("a"), a, Msg::Superseded, at(1));
        let _ = s.adopt(&info("a", 1), false, SYNC_CHUNK).unwrap();
        let fx = s.expired(Timer::Switching {
            peer: name("a"),
            conn: a,
        });
        assert!(fx.list().is_empty());
    }

    #[test]
    fn leaving_releases_everything_and_says_goodbye() {
        let mut s = ready("b");
        let (a, _) = connect(&mut s, "a", vec![]);
        // "a" is the arbiter; grant "x" so this node holds it.
        let _ = s.claim(&name("x"), BUDGET, at(1));
        let _ = s.on_frame(
            &name("a"),
            a,
            Msg::Grant {
                id: name("x"),
                floor: 0,
            },
            at(2),
        );
        let _ = s.claim(&name("y"), BUDGET, at(3));
        let fx = s.close().expect("first close");
        assert_eq!(ended(&fx), [("x", &LeaseEnd::Lost)]);
        assert!(matches!(replies(&fx)[..], [("y", Reply::Retry)]));
        let frames = sent(&fx);
        assert!(matches!(frames[0], ("a", Msg::Released { .. })));
        assert_eq!(frames.last(), Some(&("a", &Msg::Leave)));
        assert!(matches!(fx.list().last(), Some(Effect::Hangup(c)) if *c == a));
        assert!(s.close().is_none(), "leaving twice does nothing");
        assert!(matches!(s.claim(&name("x"), BUDGET, at(4)).0, Step::Closed));
        // The member that left is never taken back in that incarnation.
        let mut other = ready("c");
        let (b, _) = connect(&mut other, "b", vec![]);
        let _ = other.on_frame(&name("b"), b, Msg::Leave, at(5));
        assert!(other.peer("b").is_none());
        assert_eq!(
            other.adopt(&info("b", 1), false, SYNC_CHUNK).err(),
            Some(RejectReason::Duplicate)
        );
    }
}
