//! The registry's rules, one state at a time: frames and claims go in,
//! effects come out. No socket, no task, no runtime. The helpers here serve
//! the membership tests too.

use std::sync::Arc;
use std::time::Duration;

use super::registry::keeps;
use super::{ConnId, Effect, Effects, Reply, State, Step, Timer};
use crate::backend::LeaseEnd;
use crate::backend::cluster::wire::{Hold, MemberInfo, Msg, SYNC_CHUNK};

/// The stop budget every claim here gives.
pub(super) const BUDGET: Duration = Duration::from_secs(5);

/// A nanosecond clock reading: `ms` milliseconds after some fixed start.
pub(super) fn at(ms: u64) -> u64 {
    1_700_000_000_000_000_000 + ms * 1_000_000
}

pub(super) fn name(s: &str) -> Arc<str> {
    Arc::from(s)
}

pub(super) fn info(peer: &str, incarnation: u64) -> MemberInfo {
    MemberInfo {
        name: name(peer),
        incarnation,
        addr: Some(format!("{peer}:7400")),
    }
}

pub(super) fn hold(id: &str, token: u64, since: u64) -> Hold {
    Hold {
        id: name(id),
        token,
        since,
    }
}

/// A node that has joined (alone).
pub(super) fn ready(me: &str) -> State {
    let mut s = State::new(name(me));
    let _ = s.become_ready();
    s
}

/// Connects `peer` to `s` and delivers its first `Sync` with `holdings`.
pub(super) fn connect(s: &mut State, peer: &str, holdings: Vec<Hold>) -> (ConnId, Effects) {
    let (conn, _) = s.adopt(&info(peer, 1), true, SYNC_CHUNK).expect("adopted");
    let sync = Msg::Sync {
        ready: true,
        members: vec![],
        holdings,
        profile: None,
    };
    (conn, s.on_frame(&name(peer), conn, sync, at(0)))
}

/// Every frame queued, as (peer, frame).
pub(super) fn sent(fx: &Effects) -> Vec<(&str, &Msg)> {
    fx.list()
        .iter()
        .flat_map(|e| match e {
            Effect::Send { to, msg } => to.iter().map(|(p, _)| (&**p, msg)).collect(),
            _ => Vec::new(),
        })
        .collect()
}

pub(super) fn ended(fx: &Effects) -> Vec<(&str, &LeaseEnd)> {
    fx.list()
        .iter()
        .filter_map(|e| match e {
            Effect::EndLease { id, end, .. } => Some((&**id, end)),
            _ => None,
        })
        .collect()
}

pub(super) fn replies(fx: &Effects) -> Vec<(&str, &Reply)> {
    fx.list()
        .iter()
        .filter_map(|e| match e {
            Effect::Reply { id, reply } => Some((&**id, reply)),
            _ => None,
        })
        .collect()
}

pub(super) fn woken(fx: &Effects, id: &str) -> bool {
    fx.list()
        .iter()
        .any(|e| matches!(e, Effect::Wake(w) if &**w == id))
}

pub(super) fn has(fx: &Effects, pred: impl Fn(&Effect) -> bool) -> bool {
    fx.list().iter().any(pred)
}

pub(super) fn granted(step: Step) -> crate::backend::Lease {
    match step {
        Step::Granted(lease) => lease,
        other => panic!("expected a grant, got {other:?}"),
    }
}

pub(super) fn holder_of(s: &State, id: &str) -> Option<String> {
    s.holder(id).map(|h| h.node)
}

#[test]
fn the_heal_rule_keeps_the_earliest_tenure_and_breaks_ties_by_name() {
    // Earlier wins, whichever side asks.
    assert!(keeps((1, "b"), (2, "a")));
    assert!(!keeps((2, "a"), (1, "b")));
    // A tie goes to the lower name, from both sides.
    assert!(keeps((5, "a"), (5, "b")));
    assert!(!keeps((5, "b"), (5, "a")));
}

/// `me` holds `x` since `mine`; `peer` shows up holding it since `theirs`.
fn heal(me: &str, mine: u64, peer: &str, theirs: u64) -> (State, Effects, u64) {
    let mut s = ready(me);
    let lease = granted(s.claim(&name("x"), BUDGET, mine).0);
    let (_, fx) = connect(&mut s, peer, vec![hold("x", 99, theirs)]);
    (s, fx, lease.token)
}

#[test]
fn a_heal_ends_the_later_tenure_with_conflict_in_both_orders() {
    // The peer's tenure is older: this node cedes and says who won.
    let (s, fx, token) = heal("a", at(20), "b", at(10));
    assert_eq!(
        ended(&fx),
        [(
            "x",
            &LeaseEnd::Conflict {
                winner: Some("b".into())
            }
        )]
    );
    assert!(sent(&fx).iter().any(|(to, m)| *to == "b"
        && **m
            == Msg::Ceded {
                token,
                winner: name("b"),
                won: hold("x", 99, at(10)),
            }));
    assert_eq!(holder_of(&s, "x").as_deref(), Some("b"));

    // This node's tenure is older: it keeps the id, nothing ends.
    let (s, fx, _) = heal("a", at(10), "b", at(20));
    assert!(ended(&fx).is_empty());
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
    // ... and the other side, seeing the same two tenures, cedes.
    let (s, fx, _) = heal("b", at(20), "a", at(10));
    assert_eq!(ended(&fx).len(), 1);
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
}

/// The failure timeout the `contested` tests give.
const SILENCE: Duration = Duration::from_secs(1);

#[test]
fn a_tenure_the_heal_rule_kept_is_contested_until_the_loser_cedes() {
    // a's tenure is older: a keeps x, but b runs its own until it sees a's.
    let mut s = ready("a");
    let token = granted(s.claim(&name("x"), BUDGET, at(10)).0).token;
    let (b, fx) = connect(&mut s, "b", vec![hold("x", 99, at(20))]);
    assert!(ended(&fx).is_empty(), "a keeps x");
    let now = tokio::time::Instant::now();
    assert!(s.contested("x", token, now, SILENCE), "b still runs x");
    // b cedes: x has one holder again.
    let ceded = Msg::Ceded {
        token: 99,
        winner: name("a"),
        won: hold("x", token, at(10)),
    };
    let _ = s.on_frame(&name("b"), b, ceded, at(30));
    assert!(
        s.contested("x", token, now, SILENCE),
        "b's instance may still be stopping"
    );
    assert!(
        !s.contested("x", token + 1, now, SILENCE),
        "not this tenure"
    );
    // b's instance stops within its budget (x's, the same on every node);
    // b is not silent meanwhile (a failure timeout longer than the budget).
    let long = BUDGET * 2;
    let now = tokio::time::Instant::now();
    assert!(s.contested("x", token, now + BUDGET - Duration::from_millis(1), long));
    assert!(!s.contested("x", token, now + BUDGET, long));
    // The loser's tenure is over: nothing of it to keep.
    let (s, _, token) = heal("b", at(20), "a", at(10));
    assert!(!s.contested("x", token, now, SILENCE));
}

#[test]
fn a_tenure_is_contested_while_a_member_is_out_of_reach_or_silent() {
    let mut s = ready("a");
    let (b, _) = connect(&mut s, "b", vec![]);
    let token = granted(s.claim(&name("x"), BUDGET, at(1)).0).token;
    let now = tokio::time::Instant::now();
    assert!(
        !s.contested("x", token, now, SILENCE),
        "one holder, all in reach"
    );
    // Silent for the failure timeout (this node was paused, say, and b's
    // reader has not noticed yet): across a split, b may hold x.
    let later = now + SILENCE;
    assert!(s.contested("x", token, later, SILENCE));
    // A frame from b: heard again.
    let _ = s.on_frame(&name("b"), b, Msg::Ping, at(2));
    assert!(!s.contested("x", token, now, SILENCE));
    // b is declared down: it may hold x on its side of a split.
    let _ = s.conn_closed(&name("b"), b);
    assert!(s.contested("x", token, now, SILENCE));
    // Back, with its whole state: nothing in it contests x.
    let _ = connect(&mut s, "b", vec![]);
    assert!(!s.contested("x", token, tokio::time::Instant::now(), SILENCE));
}

#[test]
fn a_heal_between_equal_starts_goes_to_the_lower_name() {
    let (s, fx, _) = heal("a", at(10), "b", at(10));
    assert!(ended(&fx).is_empty(), "a keeps it");
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
    let (s, fx, _) = heal("b", at(10), "a", at(10));
    assert_eq!(
        ended(&fx),
        [(
            "x",
            &LeaseEnd::Conflict {
                winner: Some("a".into())
            }
        )]
    );
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
}

#[test]
fn a_claim_is_granted_when_this_node_is_its_own_arbiter() {
    // "a" is the lowest name in view: it decides alone and tells "b".
    let mut s = ready("a");
    let _ = connect(&mut s, "b", vec![]);
    let (step, fx) = s.claim(&name("x"), BUDGET, at(1));
    let lease = granted(step);
    assert!(sent(&fx).iter().any(|(to, m)| *to == "b"
        && matches!(m, Msg::Held(h) if &*h.id == "x" && h.token == lease.token && h.since == at(1))));
    // Claiming again while holding hands back the same tenure.
    let again = granted(s.claim(&name("x"), BUDGET, at(2)).0);
    assert_eq!(again.token, lease.token);
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
}

#[test]
fn a_claim_is_busy_while_another_member_holds_the_id() {
    let mut s = ready("a");
    let _ = connect(&mut s, "b", vec![hold("x", 7 << 10, at(0))]);
    let (step, fx) = s.claim(&name("x"), BUDGET, at(1));
    match step {
        Step::Busy(h) => {
            assert_eq!(h.node, "b");
            assert_eq!(h.token, Some(7 << 10));
        }
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(sent(&fx).is_empty(), "nothing asked, nothing taken");
}

#[test]
fn a_claim_waits_on_the_arbiter_and_completes_with_its_grant() {
    // "b" asks "a", the lowest name in view.
    let mut s = ready("b");
    let (conn, _) = connect(&mut s, "a", vec![]);
    let (step, fx) = s.claim(&name("x"), BUDGET, at(1));
    assert!(matches!(step, Step::Asked), "{step:?}");
    assert_eq!(sent(&fx), [("a", &Msg::ClaimReq { id: name("x") })]);
    // The grant carries the highest token the arbiter saw: the tenure's
    // token is above it.
    // Far above the clock's milliseconds, so only the floor explains it.
    let floor = 3_000_000_000_000 << 10;
    let fx = s.on_frame(
        &name("a"),
        conn,
        Msg::Grant {
            id: name("x"),
            floor,
        },
        at(2),
    );
    let token = match replies(&fx)[..] {
        [("x", Reply::Granted(lease))] => lease.token,
        ref other => panic!("expected a grant, got {other:?}"),
    };
    assert_eq!(token >> 10, (floor >> 10) + 1);
    assert!(
        sent(&fx)
            .iter()
            .any(|(to, m)| *to == "a" && matches!(m, Msg::Held(h) if h.token == token))
    );
    // The tenure keeps the budget the claim gave.
    assert_eq!(s.own.get("x").map(|t| t.budget), Some(BUDGET));
    // The grant's reply comes last: the I/O layer may release it again.
    assert!(matches!(fx.list().last(), Some(Effect::Reply { .. })));
    assert_eq!(holder_of(&s, "x").as_deref(), Some("b"));
}

#[test]
fn a_claim_denied_by_the_arbiter_names_the_holder() {
    let mut s = ready("b");
    let (conn, _) = connect(&mut s, "a", vec![]);
    let _ = s.claim(&name("x"), BUDGET, at(1));
    let deny = Msg::Deny {
        id: name("x"),
        holder: Some((name("c"), 0)),
    };
    let fx = s.on_frame(&name("a"), conn, deny, at(2));
    match replies(&fx)[..] {
        [("x", Reply::Denied(Some(h)))] => {
            assert_eq!(h.node, "c");
            assert_eq!(h.token, None, "a reservation has no token yet");
        }
        ref other => panic!("expected a denial, got {other:?}"),
    }
    // A late grant for a claim no longer pending is given back.
    let grant = Msg::Grant {
        id: name("x"),
        floor: 0,
    };
    let fx = s.on_frame(&name("a"), conn, grant, at(3));
    assert_eq!(sent(&fx), [("a", &Msg::Abandon { id: name("x") })]);
    assert!(replies(&fx).is_empty());
}

#[test]
fn the_arbiter_grants_one_claimant_at_a_time_and_frees_the_others() {
    let mut s = ready("a");
    let (b, _) = connect(&mut s, "b", vec![]);
    let (c, _) = connect(&mut s, "c", vec![]);
    let ask = || Msg::ClaimReq { id: name("x") };
    let fx = s.on_frame(&name("b"), b, ask(), at(1));
    assert_eq!(
        sent(&fx),
        [(
            "b",
            &Msg::Grant {
                id: name("x"),
                floor: 0
            }
        )]
    );
    // Reserved for "b": "c" is denied, naming "b".
    let fx = s.on_frame(&name("c"), c, ask(), at(1));
    assert_eq!(
        sent(&fx),
        [(
            "c",
            &Msg::Deny {
                id: name("x"),
                holder: Some((name("b"), 0))
            }
        )]
    );
    // This node itself sees the reservation too.
    assert!(matches!(s.claim(&name("x"), BUDGET, at(1)).0, Step::Busy(h) if h.node == "b"));
    // "b" takes it, then lets go: "c" is told the id is free.
    let fx = s.on_frame(&name("b"), b, Msg::Held(hold("x", 1 << 10, at(2))), at(2));
    assert!(!sent(&fx).iter().any(|(_, m)| matches!(m, Msg::Free { .. })));
    let fx = s.on_frame(
        &name("b"),
        b,
        Msg::Released {
            id: name("x"),
            token: 1 << 10,
        },
        at(3),
    );
    assert_eq!(sent(&fx), [("c", &Msg::Free { id: name("x") })]);
    assert!(woken(&fx, "x"));
    // The next grant carries the token seen, so tokens keep growing.
    let fx = s.on_frame(&name("c"), c, ask(), at(4));
    assert_eq!(
        sent(&fx),
        [(
            "c",
            &Msg::Grant {
                id: name("x"),
                floor: 1 << 10
            }
        )]
    );
}

#[test]
fn an_arbiter_still_joining_holds_requests_back() {
    let mut s = State::new(name("a"));
    let (b, _) = connect(&mut s, "b", vec![]);
    let fx = s.on_frame(&name("b"), b, Msg::ClaimReq { id: name("x") }, at(1));
    assert!(sent(&fx).is_empty(), "no answer on a partial view");
    let fx = s.become_ready();
    assert!(sent(&fx).contains(&("b", &Msg::Ready)));
    assert!(sent(&fx).contains(&(
        "b",
        &Msg::Grant {
            id: name("x"),
            floor: 0
        }
    )));
}

#[test]
fn a_member_declared_dead_ends_its_claims_and_wakes_waiters() {
    let mut s = ready("b");
    let (a, _) = connect(&mut s, "a", vec![hold("x", 3 << 10, at(0))]);
    // A guardian waits on "x"; another claim waits on "a" as arbiter.
    assert!(matches!(
        s.claim(&name("x"), BUDGET, at(1)).0,
        Step::Busy(_)
    ));
    assert!(matches!(s.claim(&name("y"), BUDGET, at(1)).0, Step::Asked));
    let fx = s.conn_closed(&name("a"), a);
    assert!(has(&fx, |e| matches!(e, Effect::Stop(c) if *c == a)));
    assert!(woken(&fx, "x"), "the waiter on x wakes");
    assert!(has(&fx, |e| matches!(e, Effect::Epoch)));
    assert!(has(&fx, |e| matches!(e, Effect::Dial)), "redial the member");
    assert!(matches!(replies(&fx)[..], [("y", Reply::Retry)]));
    assert_eq!(holder_of(&s, "x"), None);
    assert!(!s.peer("a").unwrap().reachable());
    // Alone now, this node is its own arbiter, and its token is above the
    // dead holder's.
    let lease = granted(s.claim(&name("x"), BUDGET, at(0)).0);
    assert!(lease.token > 3 << 10);
    // A frame on the closed connection changes nothing.
    let stale = s.on_frame(&name("a"), a, Msg::Held(hold("z", 1, 1)), at(2));
    assert!(stale.list().is_empty());
    assert_eq!(holder_of(&s, "z"), None);
}

#[test]
fn tokens_grow_across_tenures_on_one_node_and_across_nodes() {
    let mut s = ready("a");
    let x = name("x");
    let first = granted(s.claim(&x, BUDGET, at(5)).0).token;
    let _ = s.release("x", first);
    // The clock has not moved: the counter still grows.
    let second = granted(s.claim(&x, BUDGET, at(5)).0).token;
    assert!(second > first);
    let _ = s.release("x", second);
    // Another node held it with a larger token meanwhile: above that too.
    let (b, _) = connect(&mut s, "b", vec![]);
    let theirs = second + (100 << 10);
    let _ = s.on_frame(&name("b"), b, Msg::Held(hold("x", theirs, at(6))), at(6));
    let _ = s.on_frame(
        &name("b"),
        b,
        Msg::Released {
            id: x.clone(),
            token: theirs,
        },
        at(7),
    );
    let third = granted(s.claim(&x, BUDGET, at(5)).0).token;
    assert!(third > theirs);
    // A release with a stale token changes nothing.
    assert!(s.release("x", second).list().is_empty());
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
}

#[test]
fn a_hold_relayed_by_a_loser_counts_until_the_failure_timeout() {
    let mut s = ready("c");
    let (b, _) = connect(&mut s, "b", vec![hold("x", 5 << 10, at(10))]);
    // "b" lost to "a", which "c" cannot reach yet.
    let ceded = Msg::Ceded {
        token: 5 << 10,
        winner: name("a"),
        won: hold("x", 4 << 10, at(5)),
    };
    let fx = s.on_frame(&name("b"), b, ceded, at(11));
    let timer = fx.list().iter().find_map(|e| match e {
        Effect::Timer(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(
        timer,
        Some(Timer::Relayed {
            id: name("x"),
            winner: name("a"),
            token: 4 << 10
        })
    );
    assert_eq!(holder_of(&s, "x").as_deref(), Some("a"));
    assert!(matches!(s.claim(&name("x"), BUDGET, at(12)).0, Step::Busy(h) if h.node == "a"));
    let fx = s.expired(timer.unwrap());
    assert!(woken(&fx, "x"));
    assert_eq!(holder_of(&s, "x"), None);
}

/// A loser's relay that arrives after the winner itself released the id
/// (and, the second time, left the cluster) is stale: the id stays free.
/// Counted, it kept every node from claiming for the failure timeout
/// after a winner of a heal was stopped gracefully.
#[test]
fn a_relay_after_the_winner_released_or_left_is_ignored() {
    for leaves in [false, true] {
        let mut s = ready("a");
        let won = hold("x", 4 << 10, at(5));
        let (c, _) = connect(&mut s, "c", vec![won.clone()]);
        let (b, _) = connect(&mut s, "b", vec![]);
        let released = Msg::Released {
            id: name("x"),
            token: 4 << 10,
        };
        let _ = s.on_frame(&name("c"), c, released, at(10));
        if leaves {
            let _ = s.on_frame(&name("c"), c, Msg::Leave, at(11));
        }
        // b lost to c before c released; its word arrives late.
        let ceded = Msg::Ceded {
            token: 5 << 10,
            winner: name("c"),
            won,
        };
        let fx = s.on_frame(&name("b"), b, ceded, at(12));
        assert!(
            !fx.list()
                .iter()
                .any(|e| matches!(e, Effect::Timer(Timer::Relayed { .. }))),
            "leaves {leaves}"
        );
        assert_eq!(holder_of(&s, "x"), None, "leaves {leaves}");
        let claimed = granted(s.claim(&name("x"), BUDGET, at(13)).0).token;
        assert!(claimed > 5 << 10, "tokens still grow past the loser's");
    }
}

/// Every member keeps a view of every id any member runs: its rarer parts
/// are boxed, so the view stays small (it was 120 B, a map entry of 136).
#[test]
fn an_id_view_stays_small() {
    let view = std::mem::size_of::<super::IdView>();
    println!("id view {view} B");
    assert!(view <= 40, "the id view grew to {view} B");
}
