//! The batch rules without etcd: splitting, planning and answering.

use super::*;
use crate::backend::LeaseSignal;
use crate::backend::etcd::pb::etcdserverpb::{RangeResponse, TxnResponse};
use crate::backend::etcd::pb::etcdserverpb::{RequestOp, compare, request_op};
use crate::backend::kit::tenures::Tenure;

const TTL: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_secs(1);

fn ids<T: AsRef<str>>(ops: &[T]) -> Vec<&str> {
    ops.iter().map(AsRef::as_ref).collect()
}

#[test]
fn a_batch_is_at_most_126_calls_in_queue_order() {
    let mut queue: VecDeque<String> = (0..300).map(|i| format!("id{i}")).collect();
    let sizes: Vec<usize> = std::iter::from_fn(|| {
        let batch = take_batch(&mut queue, MAX_OPS_PER_TXN, String::as_str, |_| false);
        (!batch.is_empty()).then_some(batch)
    })
    .enumerate()
    .map(|(n, batch)| {
        let first = n * MAX_OPS_PER_TXN;
        let want: Vec<String> = (first..first + batch.len())
            .map(|i| format!("id{i}"))
            .collect();
        assert_eq!(batch, want, "batch {n} keeps the order");
        batch.len()
    })
    .collect();
    assert_eq!(sizes, vec![126, 126, 48]);
}

#[test]
fn one_call_per_id_per_batch_the_second_waits_in_order() {
    let mut queue: VecDeque<&str> = ["a", "b", "a", "c", "a", "b"].into_iter().collect();
    assert_eq!(
        take_batch(&mut queue, 127, |s| s, |_| false),
        ["a", "b", "c"]
    );
    assert_eq!(ids(&Vec::from(queue.clone())), ["a", "a", "b"]);
    assert_eq!(take_batch(&mut queue, 127, |s| s, |_| false), ["a", "b"]);
    assert_eq!(take_batch(&mut queue, 127, |s| s, |_| false), ["a"]);
    assert!(queue.is_empty());
    // A full batch leaves the skipped calls ahead of the rest.
    let mut queue: VecDeque<&str> = ["a", "a", "b", "c", "d"].into_iter().collect();
    assert_eq!(take_batch(&mut queue, 2, |s| s, |_| false), ["a", "b"]);
    assert_eq!(ids(&Vec::from(queue)), ["a", "c", "d"]);
}

#[test]
fn releases_and_takes_go_before_claims_but_never_pass_their_id() {
    // (id, urgent): a release, a handoff or a take is urgent; a claim not.
    let mut queue: VecDeque<(&'static str, bool)> = [
        ("a", false),
        ("b", false),
        ("x", true),
        ("c", false),
        ("y", true),
        ("b", true),
        ("z", true),
    ]
    .into_iter()
    .collect();
    let take = |q: &mut VecDeque<(&'static str, bool)>| -> Vec<&'static str> {
        take_batch(q, 4, |op| op.0, |op| op.1)
            .into_iter()
            .map(|op| op.0)
            .collect()
    };
    // The urgent "b" waits behind the claim of its id.
    assert_eq!(take(&mut queue), ["x", "y", "z", "a"]);
    assert_eq!(take(&mut queue), ["b", "c"]);
    assert_eq!(queue, [("b", true)]);
    assert_eq!(take(&mut queue), ["b"]);
    assert!(queue.is_empty());
}

type Replies = (
    Vec<oneshot::Receiver<Result<Claim>>>,
    Vec<oneshot::Receiver<Result<()>>>,
);

/// Claims of `claims` (budget 1 s) and releases of `releases` (token 5).
fn calls(claims: &[&str], releases: &[&str]) -> (Vec<Op>, Replies) {
    let mut ops = Vec::new();
    let (mut claimed, mut released) = (Vec::new(), Vec::new());
    for id in claims {
        let (reply, rx) = oneshot::channel();
        ops.push(Op::Claim {
            id: Arc::from(*id),
            budget: Duration::from_secs(1),
            reply,
        });
        claimed.push(rx);
    }
    for id in releases {
        let (reply, rx) = oneshot::channel();
        ops.push(Op::Release {
            id: Arc::from(*id),
            token: 5,
            reply,
        });
        released.push(rx);
    }
    (ops, (claimed, released))
}

fn key(id: &str) -> Vec<u8> {
    format!("/ns/{id}").into_bytes()
}

fn reserved(id: &str) -> Vec<u8> {
    format!("/ns/~r/{id}").into_bytes()
}

fn layout() -> Layout {
    Layout::new("/ns/")
}

fn nested(op: &RequestOp) -> &TxnRequest {
    match &op.request {
        Some(request_op::Request::RequestTxn(txn)) => txn,
        other => panic!("not a nested transaction: {other:?}"),
    }
}

#[test]
fn a_plan_has_one_nested_transaction_per_call_in_order() {
    let now = Instant::now();
    let mut state = State::default();
    state.install(7, TTL, now);
    state.held.insert(
        Arc::from("r"),
        Tenure::new(5, Duration::ZERO, LeaseSignal::new()),
    );
    let (ops, _replies) = calls(&["a", "b"], &["r"]);
    let planned =
        plan(ops, &mut state, now, INTERVAL, "node-1", &layout()).unwrap_or_else(|_| panic!());
    let plan = planned;
    assert_eq!(plan.lease_id, 7);
    assert!(plan.no_lease.is_empty());
    let order: Vec<&str> = plan.pending.iter().map(Op::id).collect();
    assert_eq!(order, ["a", "b", "r"]);
    assert_eq!(plan.txn.success.len(), 3);
    assert!(plan.txn.compare.is_empty() && plan.txn.failure.is_empty());
    // A claim: if the key was never created, put it with the lease.
    let claim = nested(&plan.txn.success[0]);
    assert_eq!(claim, &claim_txn(&key("a"), &reserved("a"), "node-1", 7));
    let Some(request_op::Request::RequestPut(put)) = &claim.success[0].request else {
        panic!("a claim puts");
    };
    assert_eq!(
        (put.key.as_slice(), put.value.as_slice(), put.lease),
        (&b"/ns/a"[..], &b"node-1"[..], 7)
    );
    // ... and only while it is not reserved.
    assert_eq!(claim.compare.len(), 2);
    for (compared, want) in claim.compare.iter().zip([key("a"), reserved("a")]) {
        assert_eq!(compared.key, want);
        assert_eq!(
            compared.target_union,
            Some(compare::TargetUnion::CreateRevision(0))
        );
    }
    assert_eq!(claim.failure.len(), 2, "reads both when refused");
    // A release: delete only the key that tenure created.
    let release = nested(&plan.txn.success[2]);
    assert_eq!(release, &delete_if_created_at(&key("r"), 5));
    assert!(
        state.held.is_empty(),
        "a release forgets its tenure at once"
    );
}

#[test]
fn claims_wait_for_a_live_lease_releases_do_not() {
    let now = Instant::now();
    let mut state = State::default();
    let (ops, _replies) = calls(&["a"], &["r"]);
    let first = plan(ops, &mut state, now, INTERVAL, "n", &layout()).unwrap_or_else(|_| panic!());
    assert_eq!(
        ids(&first.no_lease.iter().map(Op::id).collect::<Vec<_>>()),
        ["a"]
    );
    assert_eq!(
        ids(&first.pending.iter().map(Op::id).collect::<Vec<_>>()),
        ["r"]
    );
    assert_eq!(first.lease_id, 0);
    // A lease whose deadline for this budget is within one keep-alive
    // interval is as good as none: 9.65 s − 1 s budget − 1 s interval.
    state.install(7, TTL, now);
    let late = now + Duration::from_millis(7_650);
    let (ops, _replies) = calls(&["a"], &[]);
    let plan_late =
        plan(ops, &mut state, late, INTERVAL, "n", &layout()).unwrap_or_else(|_| panic!());
    assert_eq!(plan_late.no_lease.len(), 1);
    let (ops, _replies) = calls(&["a"], &[]);
    let early = late - Duration::from_millis(1);
    let plan_early =
        plan(ops, &mut state, early, INTERVAL, "n", &layout()).unwrap_or_else(|_| panic!());
    assert_eq!(plan_early.pending.len(), 1);
}

#[test]
fn a_closed_session_plans_nothing() {
    let mut state = State {
        closed: true,
        ..State::default()
    };
    let (ops, _replies) = calls(&["a"], &["r"]);
    let Err(back) = plan(ops, &mut state, Instant::now(), INTERVAL, "n", &layout()) else {
        panic!("closed");
    };
    assert_eq!(back.len(), 2);
}

/// A nested transaction's answer.
fn txn_answer(succeeded: bool, kv: Option<KeyValue>) -> ResponseOp {
    let responses = kv
        .map(|kv| ResponseOp {
            response: Some(response_op::Response::ResponseRange(RangeResponse {
                kvs: vec![kv],
                ..RangeResponse::default()
            })),
        })
        .into_iter()
        .collect();
    ResponseOp {
        response: Some(response_op::Response::ResponseTxn(TxnResponse {
            succeeded,
            responses,
            ..TxnResponse::default()
        })),
    }
}

#[test]
fn each_answer_completes_its_own_call() {
    let (ops, _replies) = calls(&["won", "busy", "vanished"], &["r"]);
    let holder = KeyValue {
        key: key("busy"),
        value: b"node-2".to_vec(),
        create_revision: 40,
        lease: 99,
        ..KeyValue::default()
    };
    let answered = answers(
        ops,
        vec![
            txn_answer(true, None),
            txn_answer(false, Some(holder.clone())),
            txn_answer(false, None),
            txn_answer(true, None),
        ],
    );
    assert!(matches!(&answered[0], Answer::Put(asked) if &*asked.id == "won"));
    assert!(
        matches!(&answered[1], Answer::Exists { asked, kv: Some(kv), .. } if &*asked.id == "busy" && *kv == holder)
    );
    assert!(
        matches!(&answered[2], Answer::Exists { asked, kv: None, .. } if &*asked.id == "vanished")
    );
    assert!(matches!(&answered[3], Answer::Released(_)));
}

#[test]
fn every_call_is_answered_once_even_when_etcd_answers_short_or_wrong() {
    let (ops, (claimed, mut released)) = calls(&["a", "b", "c"], &["r"]);
    let wrong = ResponseOp {
        response: Some(response_op::Response::ResponseRange(
            RangeResponse::default(),
        )),
    };
    let answered = answers(ops, vec![txn_answer(true, None), wrong]);
    assert_eq!(answered.len(), 4, "one answer per call");
    assert!(matches!(&answered[0], Answer::Put(_)));
    for answer in answered.into_iter().skip(1) {
        let Answer::Garbled(op) = answer else {
            panic!("no answer of the right kind");
        };
        op.fail(Error::backend(crate::BackendErrorKind::Other, "garbled"));
    }
    for mut rx in claimed.into_iter().skip(1) {
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
    }
    assert!(matches!(released[0].try_recv(), Ok(Err(_))));
}

#[test]
fn a_failed_transaction_fails_every_call_it_carried_once() {
    let now = Instant::now();
    let mut state = State::default();
    state.install(7, TTL, now);
    let names: Vec<String> = (0..130).map(|i| format!("id{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (ops, (claimed, released)) = calls(&names, &["r"]);
    let mut queue: VecDeque<Op> = ops.into();
    let mut sent = 0;
    while !queue.is_empty() {
        let batch = take_batch(&mut queue, MAX_OPS_PER_TXN, Op::id, Op::urgent);
        let planned =
            plan(batch, &mut state, now, INTERVAL, "n", &layout()).unwrap_or_else(|_| panic!());
        sent += planned.txn.success.len();
        // etcd did not answer: each call the transaction carried fails.
        for op in planned.pending.into_iter().chain(planned.no_lease) {
            op.fail(Error::backend(crate::BackendErrorKind::Other, "no answer"));
        }
    }
    assert_eq!(sent, 131);
    for mut rx in claimed {
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
        assert!(rx.try_recv().is_err(), "once");
    }
    for mut rx in released {
        assert!(matches!(rx.try_recv(), Ok(Err(_))));
    }
}

#[test]
fn a_refused_claim_reads_the_reservation_second() {
    let (ops, _replies) = calls(&["reserved"], &[]);
    let reservation = KeyValue {
        key: reserved("reserved"),
        value: b"node-3".to_vec(),
        mod_revision: 77,
        ..KeyValue::default()
    };
    let range = |kvs: Vec<KeyValue>| ResponseOp {
        response: Some(response_op::Response::ResponseRange(RangeResponse {
            kvs,
            ..RangeResponse::default()
        })),
    };
    let refused = ResponseOp {
        response: Some(response_op::Response::ResponseTxn(TxnResponse {
            succeeded: false,
            responses: vec![range(Vec::new()), range(vec![reservation.clone()])],
            ..TxnResponse::default()
        })),
    };
    let answered = answers(ops, vec![refused]);
    assert!(matches!(
        &answered[0],
        Answer::Exists { kv: None, reserved: Some(r), .. } if *r == reservation
    ));
}
