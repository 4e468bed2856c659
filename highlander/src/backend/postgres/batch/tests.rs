use std::time::Duration;

use tokio::sync::oneshot;

use super::*;
use crate::DEFAULT_SHUTDOWN;
use crate::backend::LeaseEnd;
use crate::backend::postgres::Postgres;

type Reply = oneshot::Receiver<crate::Result<Claim>>;

fn claim(id: &str, key: i64, budget: Duration) -> (PendingClaim, Reply) {
    let (reply, rx) = oneshot::channel();
    let c = PendingClaim {
        id: id.into(),
        key,
        budget,
        reply,
        retries: 0,
    };
    (c, rx)
}

fn settings() -> Settings {
    Postgres::new("postgres://app@db/app").settings().unwrap()
}

fn row(id: &str, owner: Option<i32>, node: Option<&str>, token: i64) -> StatusRow {
    StatusRow {
        namespace: "highlander".to_string(),
        id: id.to_string(),
        owner,
        node: node.map(str::to_string),
        token,
        reserved_for: None,
        reserved: None,
    }
}

/// Completes one claim that was not granted, on node `(1, "a")`, against
/// the status rows `status`: whether a release must go out at once.
fn complete_lost(
    st: &mut State,
    settings: &Settings,
    c: PendingClaim,
    status: &HashMap<i64, StatusRow>,
) -> bool {
    complete(st, settings, vec![c], &HashMap::new(), status, (1, "a"), 0)
}

fn keys(batch: &[PendingClaim]) -> Vec<i64> {
    batch.iter().map(|c| c.key).collect()
}

/// A batch takes the oldest claims up to its size; a budget no server can
/// cover is set apart (to be refused), the rest keep their order.
#[test]
fn batches_take_the_oldest_claims() {
    let t = Timing::default();
    let huge = Duration::from_secs(30 * 86_400);
    let mut pending: Vec<PendingClaim> = [
        (1, DEFAULT_SHUTDOWN),
        (2, huge),
        (3, Duration::ZERO),
        (4, DEFAULT_SHUTDOWN),
    ]
    .into_iter()
    .map(|(key, budget)| claim("x", key, budget).0)
    .collect();
    let (batch, refused) = take(&mut pending, 3, &t);
    assert_eq!(keys(&batch), vec![1, 3]);
    assert_eq!(keys(&refused), vec![2]);
    assert_eq!(keys(&pending), vec![4]);
    let err = too_long(&settings(), &refused[0]);
    assert_eq!(err.kind(), Some(BackendErrorKind::Refused));
    let err = err.to_string();
    assert!(err.contains("too long for this backend"), "{err}");
    assert!(err.contains("db:5432/app as app"), "{err}");
    let (batch, refused) = take(&mut pending, 3, &t);
    assert_eq!(
        (keys(&batch), refused.len(), pending.len()),
        (vec![4], 0, 0)
    );
}

/// The server's detection is raised only when a budget in the batch needs
/// more than the session has; without the raise only covered claims go.
#[test]
fn a_large_budget_raises_the_detection_first() {
    let t = Timing::default();
    let x = t.initial_server_timeout();
    let small = claim("a", 1, DEFAULT_SHUTDOWN).0;
    let large = claim("b", 2, Duration::from_secs(60)).0;
    assert_eq!(raise_for(std::slice::from_ref(&small), &t, x), None);
    let batch = vec![small, large];
    let needed = t.server_timeout_for(Duration::from_secs(60)).unwrap();
    assert!(needed > x);
    assert_eq!(raise_for(&batch, &t, x), Some(needed));
    assert_eq!(raise_for(&batch, &t, needed), None);
    let (sent, refused) = covered(batch, &t, x);
    assert_eq!((keys(&sent), keys(&refused)), (vec![1], vec![2]));
    let batch: Vec<PendingClaim> = sent.into_iter().chain(refused).collect();
    let (sent, refused) = covered(batch, &t, needed);
    assert_eq!((keys(&sent), refused.len()), (vec![1, 2], 0));
}

/// Rows are inserted only for the keys the session has not seen.
#[test]
fn only_unseen_rows_are_inserted() {
    let batch: Vec<PendingClaim> = [("a", 1), ("b", 2), ("c", 3)]
        .into_iter()
        .map(|(id, key)| claim(id, key, Duration::ZERO).0)
        .collect();
    let new = unknown(&batch, &HashSet::from([2]));
    assert_eq!(new, HashSet::from([1, 3]));
    assert_eq!(
        Arrays::of(&batch, &new),
        Arrays {
            keys: vec![1, 2, 3],
            ids: vec!["a".into(), "b".into(), "c".into()],
            new_keys: vec![1, 3],
            new_ids: vec!["a".into(), "c".into()],
        }
    );
}

#[test]
fn the_budget_counts_granted_claims_only() {
    let batch = vec![
        claim("a", 1, Duration::from_secs(9)).0,
        claim("b", 2, Duration::from_secs(3)).0,
    ];
    assert_eq!(granted_budget(&batch, &HashMap::new()), None);
    let granted = HashMap::from([(2, 7)]);
    assert_eq!(
        granted_budget(&batch, &granted),
        Some(Duration::from_secs(3))
    );
}

/// Each claim's outcome, decided from the rows alone.
#[test]
fn outcomes_follow_the_rows() {
    let ns = "highlander";
    let me = 17;
    let (c, _rx) = claim("solo", 1, Duration::ZERO);
    let none = HashMap::new();
    let granted = HashMap::from([(1, 8)]);
    // Granted wins over whatever the (older) status row says.
    let held = row("solo", Some(42), Some("b"), 7);
    assert_eq!(
        outcome(&c, &granted, Some(&held), me, "a", ns),
        Outcome::Granted(8)
    );
    assert_eq!(outcome(&c, &none, None, me, "a", ns), Outcome::Missing);
    assert_eq!(
        outcome(&c, &none, Some(&row("other", None, None, 0)), me, "a", ns),
        Outcome::Collision {
            namespace: ns.to_string(),
            id: "other".to_string()
        }
    );
    let mut elsewhere = row("solo", None, None, 0);
    elsewhere.namespace = "billing".to_string();
    assert!(matches!(
        outcome(&c, &none, Some(&elsewhere), me, "a", ns),
        Outcome::Collision { .. }
    ));
    assert_eq!(
        outcome(&c, &none, Some(&held), me, "a", ns),
        Outcome::HeldBy {
            owner: 42,
            holder: Holder::new("b", Some(7))
        }
    );
    // A holder without a node name still names its token.
    assert_eq!(
        outcome(
            &c,
            &none,
            Some(&row("solo", Some(42), None, 7)),
            me,
            "a",
            ns
        ),
        Outcome::HeldBy {
            owner: 42,
            holder: Holder::new("", Some(7))
        }
    );
    // Free, or ours (an earlier tenure of this session), but not granted:
    // retried at once a few times, then polled.
    for status in [
        row("solo", None, None, 3),
        row("solo", Some(me), Some("a"), 3),
    ] {
        let (mut c, _rx) = claim("solo", 1, Duration::ZERO);
        for _ in 0..FREE_RETRIES {
            assert_eq!(
                outcome(&c, &none, Some(&status), me, "a", ns),
                Outcome::Retry
            );
            c.retries += 1;
        }
        let holder = status
            .node
            .as_ref()
            .map(|n| Holder::new(n.clone(), Some(3)));
        assert_eq!(
            outcome(&c, &none, Some(&status), me, "a", ns),
            Outcome::Poll(holder)
        );
    }
}

/// Completing a batch turns grants into tenures (ending an older one of
/// the same key), busy ids into waits on their holder, free ones into
/// retries, and a missing row into an error that forgets the row.
#[tokio::test(start_paused = true)]
async fn completing_a_batch() {
    let settings = settings();
    let me = 17;
    let mut st = State::default();
    let (_, old) = Lease::new(1);
    st.held
        .insert(1, Tenure::new(1, Duration::ZERO, old.clone()));
    st.known.insert(4);
    let seq0 = st.waiters.claim_sent();
    let (c1, mut r1) = claim("granted", 1, Duration::from_secs(7));
    let (c2, mut r2) = claim("busy", 2, Duration::ZERO);
    let (c3, mut r3) = claim("free", 3, Duration::ZERO);
    let (c4, mut r4) = claim("missing", 4, Duration::ZERO);
    let (c5, mut r5) = claim("moved", 5, Duration::ZERO);
    st.waiters.owner_changed(43, None);
    let granted = HashMap::from([(1, 2)]);
    let status = HashMap::from([
        (2, row("busy", Some(42), Some("b"), 9)),
        (3, row("free", None, None, 4)),
        (5, row("moved", Some(43), Some("c"), 5)),
    ]);
    let requeued = complete(
        &mut st,
        &settings,
        vec![c1, c2, c3, c4, c5],
        &granted,
        &status,
        (me, "a"),
        seq0,
    );
    assert!(requeued);
    // Granted: a new tenure; the old one of the same key ended.
    match r1.try_recv() {
        Ok(Ok(Claim::Granted(lease))) => assert_eq!(lease.token, 2),
        other => panic!("{other:?}"),
    }
    let tenure = st.held.get(&1).expect("held");
    assert_eq!((tenure.token, tenure.budget), (2, Duration::from_secs(7)));
    assert_eq!(old.ended_with(), Some(LeaseEnd::Lost));
    // Busy: waits until owner 42 moves.
    let Ok(Ok(Claim::Busy { holder, wake })) = r2.try_recv() else {
        panic!("busy")
    };
    assert_eq!(holder, Some(Holder::new("b", Some(9))));
    assert_eq!(st.waiters.owners(), vec![42]);
    let wake = tokio::spawn(wake);
    tokio::task::yield_now().await;
    assert!(!wake.is_finished(), "nothing moved yet");
    st.waiters.owner_changed(42, Some(&HashSet::from([2])));
    wake.await.unwrap();
    // Free: queued again, once more tried.
    assert!(r3.try_recv().is_err());
    assert_eq!(keys(&st.claims), vec![3]);
    assert_eq!(st.claims[0].retries, 1);
    // Missing: an error, and the row is inserted again next time.
    let err = r4.try_recv().unwrap().unwrap_err().to_string();
    assert!(err.contains("the row of id `missing` is missing"), "{err}");
    assert!(!st.known.contains(&4));
    assert!(st.known.contains(&2) && st.known.contains(&3));
    // Held by an owner that moved after the claim was sent: retry at once.
    let Ok(Ok(Claim::Busy { holder, wake })) = r5.try_recv() else {
        panic!("busy")
    };
    assert_eq!(holder, Some(Holder::new("c", Some(5))));
    wake.await;
}

/// After its retries, a free id that is still not granted waits one poll
/// interval, not for a release that may never come.
#[tokio::test(start_paused = true)]
async fn a_claim_that_keeps_missing_a_free_row_polls() {
    let settings = settings();
    let mut st = State::default();
    let (mut c, mut rx) = claim("free", 3, Duration::ZERO);
    c.retries = FREE_RETRIES;
    let status = HashMap::from([(3, row("free", None, Some("gone"), 4))]);
    assert!(!complete_lost(&mut st, &settings, c, &status));
    let Ok(Ok(Claim::Busy { holder, wake })) = rx.try_recv() else {
        panic!("busy")
    };
    assert_eq!(holder, Some(Holder::new("gone", Some(4))));
    let start = tokio::time::Instant::now();
    wake.await;
    assert_eq!(start.elapsed(), settings.timing.poll);
}

/// A grant whose `try_claim` future is gone (the receiver of its answer
/// dropped) leaves no tenure: it is ended and released at once, as
/// `release` would.
#[test]
fn a_grant_nobody_takes_is_released() {
    let settings = settings();
    let mut st = State::default();
    let (_, old) = Lease::new(1);
    st.held
        .insert(6, Tenure::new(1, Duration::ZERO, old.clone()));
    let (gone, rx) = claim("gone", 6, Duration::ZERO);
    drop(rx);
    let (kept, mut kept_rx) = claim("kept", 7, Duration::ZERO);
    let granted = HashMap::from([(6, 2), (7, 5)]);
    let queued = complete(
        &mut st,
        &settings,
        vec![gone, kept],
        &granted,
        &HashMap::new(),
        (1, "a"),
        0,
    );
    assert!(queued, "the release goes out at once");
    assert!(st.held.get(&6).is_none(), "no tenure of the dropped claim");
    assert_eq!(
        old.ended_with(),
        Some(LeaseEnd::Lost),
        "nor of an older one"
    );
    assert_eq!(release_keys(&st.releases).0, vec![6]);
    assert!(st.releases[0].reply.is_none());
    assert!(matches!(kept_rx.try_recv(), Ok(Ok(Claim::Granted(_)))));
    assert_eq!(st.held.get(&7).map(|t| t.token), Some(5));
}

#[test]
fn collisions_name_both_ids() {
    let settings = settings();
    let mut st = State::default();
    let (c, mut rx) = claim("mine", 3, Duration::ZERO);
    let mut other = row("theirs", None, None, 0);
    other.namespace = "billing".to_string();
    let status = HashMap::from([(3, other)]);
    complete_lost(&mut st, &settings, c, &status);
    let err = rx.try_recv().unwrap().unwrap_err().to_string();
    assert!(err.contains("id `mine` in namespace `highlander`"), "{err}");
    assert!(
        err.contains("as id `theirs` in namespace `billing`"),
        "{err}"
    );
}

fn release(keys: Vec<i64>) -> (PendingRelease, oneshot::Receiver<crate::Result<()>>) {
    let (tx, rx) = oneshot::channel();
    let r = PendingRelease {
        keys,
        to: None,
        reply: Some(tx),
        failures: 0,
    };
    (r, rx)
}

#[test]
fn releases_go_in_key_order_once() {
    let batch = vec![release(vec![5, -3]).0, release(vec![2, 5]).0];
    assert_eq!(release_keys(&batch), (vec![-3, 2, 5], vec![None; 3]));
}

/// A key released to a node carries the node's name; released both ways
/// in one batch, it goes to the node.
#[test]
fn releases_to_a_node_name_it() {
    let mut to_b = release(vec![2]).0;
    to_b.to = Some("b".into());
    let batch = vec![release(vec![5, 2]).0, to_b];
    assert_eq!(
        release_keys(&batch),
        (vec![2, 5], vec![Some("b".to_string()), None])
    );
}

/// While a handoff's reservation runs, another node's claim of a free id
/// waits for it to run out; the node it names claims as usual, and a
/// lapsed one (no seconds left) is no reservation.
#[test]
fn a_reservation_keeps_other_nodes_out() {
    let (c, _rx) = claim("solo", 9, DEFAULT_SHUTDOWN);
    let none = HashMap::new();
    let mut status = row("solo", None, None, 3);
    status.reserved_for = Some("b".into());
    status.reserved = Some(1.5);
    assert_eq!(
        outcome(&c, &none, Some(&status), 1, "c", "highlander"),
        Outcome::Reserved {
            remaining: Duration::from_millis(1500)
        }
    );
    assert_eq!(
        outcome(&c, &none, Some(&status), 1, "b", "highlander"),
        Outcome::Retry
    );
    status.reserved = None;
    assert_eq!(
        outcome(&c, &none, Some(&status), 1, "c", "highlander"),
        Outcome::Retry
    );
    // Held beats reserved (a reservation is only ever set on a free row).
    let mut held = row("solo", Some(42), Some("b"), 4);
    held.reserved_for = Some("b".into());
    held.reserved = Some(1.0);
    assert!(matches!(
        outcome(&c, &none, Some(&held), 1, "c", "highlander"),
        Outcome::HeldBy { owner: 42, .. }
    ));
}

/// A failed release is told and retried; the third failure of one release
/// gives the session up.
#[test]
fn releases_are_retried_twice() {
    let (r, mut rx) = release(vec![1]);
    let mut queue = Vec::new();
    let boom = StatementError::from_parts(
        BackendErrorKind::Unreachable,
        "boom".to_string(),
        std::sync::Arc::new(std::io::Error::other("reset")),
    );
    release_failed(vec![r], &mut queue, &boom).unwrap();
    let e = rx.try_recv().unwrap().unwrap_err();
    assert_eq!(e.to_string(), "boom");
    assert_eq!(e.kind(), Some(BackendErrorKind::Unreachable));
    assert_eq!(queue.len(), 1);
    let batch = std::mem::take(&mut queue);
    release_failed(batch, &mut queue, &boom).unwrap();
    assert_eq!(queue[0].failures, 2);
    let batch = std::mem::take(&mut queue);
    let why = release_failed(batch, &mut queue, &boom).unwrap_err();
    assert_eq!(why, "releasing ids failed three times (boom)");
    assert!(queue.is_empty());
}
