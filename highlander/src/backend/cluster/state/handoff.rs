//! Hand-offs: a holder releases an id in favour of a chosen member
//! ([`Session::release_to`](crate::backend::Session::release_to)). Every
//! member that can reach the chosen one reserves the id for it: claims by
//! anyone else are busy (and, as arbiter, denied naming it) until it holds
//! the id, goes down, or [`HANDOFF`] has passed. The chosen member claims
//! as soon as it hears of the release and takes the id without asking the
//! arbiter: nobody else may claim it, so there is nothing to settle, and
//! the id is unowned for one frame's trip, not three. An arbiter that had
//! denied the id to the chosen member tells it (and only it) the id is
//! free.

use std::sync::Arc;
use std::time::Duration;

use super::{Effect, Effects, Handoff, State, Timer};
use crate::backend::cluster::wire::Msg;

/// How long a release in favour of a member ([`State::release_to`])
/// keeps every other member's claims of the id out: long enough for the
/// chosen member to hear of the release and claim (a round trip or two),
/// short enough that an id is not left unrun for long when it does not.
pub(in crate::backend::cluster) const HANDOFF: Duration = Duration::from_secs(2);

impl State {
    /// A guardian gives up its tenure of `id` with `token` in favour of
    /// `to`: every member is told, and for [`HANDOFF`] (or until `to`
    /// holds the id or goes down) claims of `id` by anyone else are busy.
    /// A plain release when `to` is this node or not a reachable member.
    pub(in crate::backend::cluster) fn release_to(
        &mut self,
        id: &str,
        token: u64,
        to: &str,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some((id, _)) = self.own.get_key_value(id).filter(|(_, o)| o.token == token) else {
            return fx;
        };
        let id = id.clone();
        let to = self
            .members
            .get_key_value(to)
            .filter(|(_, p)| p.reachable())
            .map(|(name, _)| name.clone());
        let Some(to) = to else {
            self.drop_own(&id, None, &mut fx);
            return fx;
        };
        self.own.remove(&id);
        self.settling.remove(&id);
        let handoff = Msg::Handoff {
            id: id.clone(),
            token,
            to: to.clone(),
        };
        fx.send(self.every_conn(), handoff);
        self.reserve_for(&id, to, token, &mut fx);
        self.touch(&id, &mut fx);
        fx
    }

    /// Reserves `id` for `to`, handed off with `token`, until the timer.
    fn reserve_for(&mut self, id: &Arc<str>, to: Arc<str>, token: u64, fx: &mut Effects) {
        let view = self.ids.entry(id.clone()).or_default();
        view.max_token = view.max_token.max(token);
        view.set_handoff(Some(Handoff {
            to: to.clone(),
            token,
        }));
        fx.push(Effect::Timer(Timer::Handoff {
            id: id.clone(),
            to,
            token,
        }));
    }

    /// The member `id` is handed off to now, if it is.
    pub(super) fn handed_to(&self, id: &str) -> Option<Arc<str>> {
        self.ids.get(id)?.handoff().map(|h| h.to.clone())
    }

    /// `peer` released its tenure of `id` with `token` in favour of `to`:
    /// a release, and a reservation for `to` when this node is `to` or can
    /// reach it (across a split the reservation is advisory: a side that
    /// cannot reach `to` may take the id as after any release).
    pub(super) fn on_handoff(
        &mut self,
        peer: &Arc<str>,
        id: &Arc<str>,
        token: u64,
        to: Arc<str>,
        fx: &mut Effects,
    ) {
        if to == self.name || self.reachable(&to) {
            self.reserve_for(id, to, token, fx);
        }
        // Wakes this node's waiter (the chosen member claims at once) and,
        // as arbiter, tells the chosen member the id is free.
        self.on_released(peer, id, token, fx);
        self.touch(id, fx);
    }

    /// [`HANDOFF`] has passed since `id` was handed off to `to` with
    /// `token`: unless something replaced that reservation, anyone may
    /// claim the id again.
    pub(super) fn handoff_expired(
        &mut self,
        id: &Arc<str>,
        to: &Arc<str>,
        token: u64,
        fx: &mut Effects,
    ) {
        let Some(view) = self.ids.get_mut(id) else {
            return;
        };
        if view
            .handoff()
            .is_some_and(|h| h.to == *to && h.token == token)
        {
            view.set_handoff(None);
            self.touch(id, fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        BUDGET, at, connect, granted, has, hold, holder_of, name, ready, sent, woken,
    };
    use super::super::{Effect, Effects, State, Step, Timer};
    use crate::backend::cluster::wire::Msg;

    fn busy_for(s: &mut State, id: &str) -> Option<String> {
        match s.claim(&name(id), BUDGET, at(50)).0 {
            Step::Busy(h) => Some(h.node),
            _ => None,
        }
    }

    fn timer(fx: &Effects) -> Timer {
        fx.list()
            .iter()
            .find_map(|e| match e {
                Effect::Timer(t @ Timer::Handoff { .. }) => Some(t.clone()),
                _ => None,
            })
            .expect("a hand-off timer")
    }

    fn handoff(id: &str, token: u64, to: &str) -> Msg {
        Msg::Handoff {
            id: name(id),
            token,
            to: name(to),
        }
    }

    #[test]
    fn the_holder_hands_off_and_keeps_out_of_the_way() {
        let mut s = ready("a");
        let _ = connect(&mut s, "b", vec![]);
        let _ = connect(&mut s, "c", vec![]);
        let lease = granted(s.claim(&name("x"), BUDGET, at(1)).0);
        let fx = s.release_to("x", lease.token, "b");
        let frames = sent(&fx);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert!(
            frames
                .iter()
                .all(|(_, m)| **m == handoff("x", lease.token, "b"))
        );
        assert!(woken(&fx, "x"));
        assert_eq!(holder_of(&s, "x"), None, "released");
        // Its own claim waits for "b" now.
        assert_eq!(busy_for(&mut s, "x").as_deref(), Some("b"));
        // After the reservation time, anyone may.
        let fx = s.expired(timer(&fx));
        assert!(woken(&fx, "x"));
        assert!(matches!(
            s.claim(&name("x"), BUDGET, at(60)).0,
            Step::Granted(_)
        ));
    }

    #[test]
    fn a_hand_off_to_nobody_reachable_is_a_plain_release() {
        for to in ["a", "z"] {
            let mut s = ready("a");
            let _ = connect(&mut s, "b", vec![]);
            let lease = granted(s.claim(&name("x"), BUDGET, at(1)).0);
            let fx = s.release_to("x", lease.token, to);
            assert_eq!(
                sent(&fx),
                [(
                    "b",
                    &Msg::Released {
                        id: name("x"),
                        token: lease.token
                    }
                )]
            );
            assert!(!has(&fx, |e| matches!(e, Effect::Timer(_))));
        }
        // A stale token changes nothing.
        let mut s = ready("a");
        let lease = granted(s.claim(&name("x"), BUDGET, at(1)).0);
        assert!(s.release_to("x", lease.token + 1, "b").list().is_empty());
        assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
    }

    #[test]
    fn the_arbiter_keeps_the_id_for_the_chosen_member_only() {
        // "a" arbitrates; "b" holds x and hands it to "c"; "d" waits too.
        let mut s = ready("a");
        let (b, _) = connect(&mut s, "b", vec![hold("x", 5 << 10, at(0))]);
        let (c, _) = connect(&mut s, "c", vec![]);
        let (d, _) = connect(&mut s, "d", vec![]);
        let ask = || Msg::ClaimReq { id: name("x") };
        // Both were denied while "b" held it.
        let _ = s.on_frame(&name("c"), c, ask(), at(1));
        let _ = s.on_frame(&name("d"), d, ask(), at(1));
        let fx = s.on_frame(&name("b"), b, handoff("x", 5 << 10, "c"), at(2));
        assert_eq!(
            sent(&fx),
            [("c", &Msg::Free { id: name("x") })],
            "only the chosen member is told"
        );
        assert!(woken(&fx, "x"));
        let timer = timer(&fx);
        // This node, "d" and "b" itself are kept out, naming "c".
        assert_eq!(busy_for(&mut s, "x").as_deref(), Some("c"));
        for (peer, conn) in [("d", d), ("b", b)] {
            let fx = s.on_frame(&name(peer), conn, ask(), at(3));
            assert_eq!(
                sent(&fx),
                [(
                    peer,
                    &Msg::Deny {
                        id: name("x"),
                        holder: Some((name("c"), 0))
                    }
                )]
            );
        }
        // "c" gets it, above the token handed off.
        let fx = s.on_frame(&name("c"), c, ask(), at(3));
        assert_eq!(
            sent(&fx),
            [(
                "c",
                &Msg::Grant {
                    id: name("x"),
                    floor: 5 << 10
                }
            )]
        );
        // "c" holds it: the hand-off is over, its timer changes nothing.
        let _ = s.on_frame(&name("c"), c, Msg::Held(hold("x", 6 << 10, at(4))), at(4));
        assert_eq!(holder_of(&s, "x").as_deref(), Some("c"));
        assert!(!woken(&s.expired(timer), "x"));
    }

    #[test]
    fn the_chosen_member_takes_the_id_without_asking_the_arbiter() {
        // "d" is handed x by "b"; "a" arbitrates (the lowest name).
        let mut d = ready("d");
        let _ = connect(&mut d, "a", vec![]);
        let (b, _) = connect(&mut d, "b", vec![hold("x", 5 << 10, at(0))]);
        assert!(matches!(
            d.claim(&name("x"), BUDGET, at(1)).0,
            Step::Busy(_)
        ));
        let fx = d.on_frame(&name("b"), b, handoff("x", 5 << 10, "d"), at(2));
        assert!(woken(&fx, "x"), "its waiter claims at once");
        let (step, fx) = d.claim(&name("x"), BUDGET, at(3));
        let lease = granted(step);
        assert!(lease.token > 5 << 10, "above the token handed off");
        // No request to the arbiter: every member hears it holds the id.
        let mut told: Vec<&str> = sent(&fx)
            .into_iter()
            .map(|(peer, msg)| {
                assert!(
                    matches!(msg, Msg::Held(h) if h.token == lease.token),
                    "{msg:?}"
                );
                peer
            })
            .collect();
        told.sort();
        assert_eq!(told, ["a", "b"]);
        assert_eq!(holder_of(&d, "x").as_deref(), Some("d"));
        assert_eq!(d.handed_to("x"), None, "the hand-off is over");
    }

    #[test]
    fn the_chosen_member_asks_the_arbiter_while_joining_or_already_asking() {
        // Still joining: it may not see every holder yet.
        let mut d = State::new(name("d"));
        let (a, _) = connect(&mut d, "a", vec![]);
        let (b, _) = connect(&mut d, "b", vec![hold("x", 5 << 10, at(0))]);
        let _ = d.on_frame(&name("b"), b, handoff("x", 5 << 10, "d"), at(2));
        let (step, fx) = d.claim(&name("x"), BUDGET, at(3));
        assert!(matches!(step, Step::Asked));
        assert_eq!(sent(&fx), [("a", &Msg::ClaimReq { id: name("x") })]);
        // Joined, but a request of the id is out: its answer settles it.
        let _ = d.become_ready();
        let (step, fx) = d.claim(&name("x"), BUDGET, at(4));
        assert!(matches!(step, Step::Asked));
        assert_eq!(sent(&fx), [("a", &Msg::ClaimReq { id: name("x") })]);
        let fx = d.on_frame(
            &name("a"),
            a,
            Msg::Grant {
                id: name("x"),
                floor: 5 << 10,
            },
            at(5),
        );
        assert!(has(&fx, |e| matches!(
            e,
            Effect::Reply {
                reply: super::super::Reply::Granted(_),
                ..
            }
        )));
        assert_eq!(holder_of(&d, "x").as_deref(), Some("d"));
    }

    #[test]
    fn the_reservation_lapses_and_the_others_are_freed() {
        let mut s = ready("a");
        let (b, _) = connect(&mut s, "b", vec![hold("x", 5 << 10, at(0))]);
        let _ = connect(&mut s, "c", vec![]);
        let (d, _) = connect(&mut s, "d", vec![]);
        let _ = s.on_frame(&name("d"), d, Msg::ClaimReq { id: name("x") }, at(1));
        let fx = s.on_frame(&name("b"), b, handoff("x", 5 << 10, "c"), at(2));
        assert!(sent(&fx).is_empty(), "\"c\" did not ask: nothing to tell");
        // "c" never claims: after the reservation time "d" is freed.
        let fx = s.expired(timer(&fx));
        assert_eq!(sent(&fx), [("d", &Msg::Free { id: name("x") })]);
    }

    #[test]
    fn the_reservation_goes_with_its_member() {
        let mut s = ready("a");
        let (b, _) = connect(&mut s, "b", vec![hold("x", 5 << 10, at(0))]);
        let (c, _) = connect(&mut s, "c", vec![]);
        let _ = s.on_frame(&name("b"), b, handoff("x", 5 << 10, "c"), at(2));
        assert_eq!(busy_for(&mut s, "x").as_deref(), Some("c"));
        let fx = s.conn_closed(&name("c"), c);
        assert!(woken(&fx, "x"));
        assert!(matches!(
            s.claim(&name("x"), BUDGET, at(3)).0,
            Step::Granted(_)
        ));
    }

    #[test]
    fn across_a_split_the_reservation_is_advisory() {
        // "c" cannot reach "d", the chosen member: it does not wait for it.
        let mut s = ready("c");
        let (b, _) = connect(&mut s, "b", vec![hold("x", 5 << 10, at(0))]);
        let fx = s.on_frame(&name("b"), b, handoff("x", 5 << 10, "d"), at(2));
        assert!(!has(&fx, |e| matches!(e, Effect::Timer(_))));
        assert_eq!(holder_of(&s, "x"), None);
        assert!(matches!(s.claim(&name("x"), BUDGET, at(3)).0, Step::Asked));
        // The chosen member itself may claim at once.
        let mut d = ready("d");
        let (b, _) = connect(&mut d, "b", vec![hold("x", 5 << 10, at(0))]);
        let fx = d.on_frame(&name("b"), b, handoff("x", 5 << 10, "d"), at(2));
        assert!(woken(&fx, "x"), "it claims as soon as it hears");
        assert!(matches!(
            d.claim(&name("x"), BUDGET, at(3)).0,
            Step::Granted(_)
        ));
    }
}
