//! The guardians' claims and releases, batched into few transactions: which
//! queued calls go into the next transaction, the nested transaction each
//! becomes, and what etcd's answer means for each call. Those three are
//! plain functions tested here; the batcher task sends the transactions.
//!
//! A release in favour of a node (`release_to`) deletes the id's key and
//! puts a reservation key naming that node, under a lease of its own that
//! lapses after [`RESERVATION_TTL`](super::fleet::RESERVATION_TTL); every
//! claim requires that no reservation exists, and the node named takes a
//! reserved id with a transaction that requires that very reservation.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use super::conn::Conn;
use super::failure::{Call, Failure, classify, reason};
use super::pb::etcdserverpb::{ResponseOp, TxnRequest, response_op};
use super::pb::mvccpb::KeyValue;
use super::roster::Layout;
use super::session::{Inner, holder_of};
use super::state::{NotGranted, State};
use super::txn::{claim_txn, delete_if_created_at, op_txn, release_to_txn, take_txn};
use crate::backend::{Claim, Holder};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// Claims and releases per transaction. etcd's default `--max-txn-ops` is
/// 128, and it counts a nested transaction's operations (the most of its
/// compares, success and failure operations) against what the outer one
/// leaves: a claim compares two keys (the id's and its reservation's), so
/// 126 nested transactions of two operations each is the most one
/// transaction may carry.
pub(super) const MAX_OPS_PER_TXN: usize = 126;
/// Claim transactions in flight at once.
const TXNS_IN_FLIGHT: usize = 4;

/// A guardian's call, waiting for its transaction.
pub(super) enum Op {
    Claim {
        id: Arc<str>,
        budget: Duration,
        reply: oneshot::Sender<Result<Claim>>,
    },
    Release {
        id: Arc<str>,
        token: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A release that reserves the id for `target` under the short lease
    /// `lease`.
    ReleaseTo {
        id: Arc<str>,
        token: u64,
        target: Arc<str>,
        lease: i64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A claim of an id reserved for this node by the reservation put at
    /// revision `reserved_at`.
    Take {
        id: Arc<str>,
        budget: Duration,
        reserved_at: i64,
        reply: oneshot::Sender<Result<Claim>>,
    },
}

impl Op {
    fn id(&self) -> &str {
        match self {
            Op::Claim { id, .. }
            | Op::Release { id, .. }
            | Op::ReleaseTo { id, .. }
            | Op::Take { id, .. } => id,
        }
    }

    /// Whether the call moves an id on (a release, a handoff, the take of
    /// a handoff) rather than asks for one held elsewhere: it goes in the
    /// next transaction before the plain claims, which are mostly waiters
    /// asking again and refused.
    fn urgent(&self) -> bool {
        !matches!(self, Op::Claim { .. })
    }

    /// Answers the call with `error`.
    pub(super) fn fail(self, error: Error) {
        match self {
            Op::Claim { reply, .. } | Op::Take { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Op::Release { reply, .. } | Op::ReleaseTo { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// Takes the next transaction's calls from `queue`: at most `max`, at most
/// one per id (etcd refuses a transaction that names a key twice), the
/// `urgent` ones first, each kind in queue order; an urgent call never
/// passes an earlier call of its id. What is left stays queued, in order.
fn take_batch<T>(
    queue: &mut VecDeque<T>,
    max: usize,
    id: impl Fn(&T) -> &str,
    urgent: impl Fn(&T) -> bool,
) -> Vec<T> {
    let mut batch = Vec::new();
    {
        let mut seen = HashSet::new();
        let mut rest = VecDeque::with_capacity(queue.len());
        while let Some(op) = queue.pop_front() {
            let first = seen.insert(id(&op).to_string());
            if first && batch.len() < max && urgent(&op) {
                batch.push(op);
            } else {
                rest.push_back(op);
            }
        }
        *queue = rest;
    }
    take_in_order(queue, max, id, batch)
}

/// Adds to `batch` the calls at the front of `queue` up to `max`, at most
/// one per id, in queue order.
fn take_in_order<T>(
    queue: &mut VecDeque<T>,
    max: usize,
    id: impl Fn(&T) -> &str,
    mut batch: Vec<T>,
) -> Vec<T> {
    let mut later = VecDeque::new();
    {
        let mut ids: HashSet<String> = batch.iter().map(|op| id(op).to_string()).collect();
        while let Some(op) = queue.pop_front() {
            if batch.len() == max {
                later.push_back(op);
                break;
            }
            if ids.insert(id(&op).to_string()) {
                batch.push(op);
            } else {
                later.push_back(op);
            }
        }
    }
    later.append(queue);
    *queue = later;
    batch
}

/// One transaction, ready to send.
struct Plan {
    /// One nested transaction per call of `pending`, in the same order.
    txn: TxnRequest,
    pending: Vec<Op>,
    /// Claims not sent: the node has no lease that would outlive them.
    no_lease: Vec<Op>,
    /// The lease the claims are put with (0 when there is none).
    lease_id: i64,
}

/// Plans the transaction of `batch` at `now`. A claim goes in when the
/// node's lease leaves it more than a keep-alive `interval` before its
/// deadline; a release goes in and forgets its tenure at once (before etcd
/// answers). `Err(batch)` when the session is closed.
fn plan(
    batch: Vec<Op>,
    state: &mut State,
    now: Instant,
    interval: Duration,
    node: &str,
    layout: &Layout,
) -> std::result::Result<Plan, Vec<Op>> {
    if state.closed {
        return Err(batch);
    }
    let lease = state.lease;
    let mut plan = Plan {
        txn: TxnRequest::default(),
        pending: Vec::with_capacity(batch.len()),
        no_lease: Vec::new(),
        lease_id: lease.map(|l| l.id).unwrap_or_default(),
    };
    for op in batch {
        let key = layout.id(op.id());
        let reserved = layout.reservation(op.id());
        let txn = match &op {
            Op::Claim { budget, .. } | Op::Take { budget, .. } => {
                let Some(lease) = lease.filter(|l| now + interval < l.deadline(*budget)) else {
                    plan.no_lease.push(op);
                    continue;
                };
                match &op {
                    Op::Take { reserved_at, .. } => {
                        take_txn(&key, &reserved, node, lease.id, *reserved_at)
                    }
                    _ => claim_txn(&key, &reserved, node, lease.id),
                }
            }
            Op::Release { id, token, .. } => {
                state.release(id, *token);
                delete_if_created_at(&key, *token as i64)
            }
            Op::ReleaseTo {
                id,
                token,
                target,
                lease,
                ..
            } => {
                state.release(id, *token);
                release_to_txn(&key, *token as i64, &reserved, target, *lease)
            }
        };
        plan.txn.success.push(op_txn(txn));
        plan.pending.push(op);
    }
    Ok(plan)
}

/// What etcd's answer to one call of an applied transaction says.
enum Answer {
    /// The release ran (and deleted the key if it was that tenure's).
    Released(oneshot::Sender<Result<()>>),
    /// The key was put: the claim is granted, its token the transaction's
    /// revision.
    Put(Asked),
    /// The key exists, or the id is reserved (`kv` and `reserved` both
    /// `None`: both vanished in between, which one transaction rules out;
    /// answered "try again" all the same).
    Exists {
        asked: Asked,
        kv: Option<KeyValue>,
        reserved: Option<KeyValue>,
    },
    /// No nested transaction's answer in its place.
    Garbled(Op),
}

/// A claim waiting for its answer: the id, its budget, where to answer.
struct Asked {
    id: Arc<str>,
    budget: Duration,
    reply: oneshot::Sender<Result<Claim>>,
}

/// Pairs each pending call with its answer, in order; a call without an
/// answer of the right kind is `Garbled`, so every call gets exactly one.
fn answers(pending: Vec<Op>, responses: Vec<ResponseOp>) -> Vec<Answer> {
    let mut responses = responses.into_iter();
    pending
        .into_iter()
        .map(|op| {
            let answer = responses.next().and_then(|r| match r.response {
                Some(response_op::Response::ResponseTxn(answer)) => Some(answer),
                _ => None,
            });
            let Some(answer) = answer else {
                return Answer::Garbled(op);
            };
            match op {
                Op::Release { reply, .. } | Op::ReleaseTo { reply, .. } => Answer::Released(reply),
                Op::Claim { id, budget, reply }
                | Op::Take {
                    id, budget, reply, ..
                } if answer.succeeded => Answer::Put(Asked { id, budget, reply }),
                Op::Claim { id, budget, reply }
                | Op::Take {
                    id, budget, reply, ..
                } => {
                    // The failure branch reads the id's key, then its
                    // reservation's.
                    let mut ranges = answer.responses.into_iter().map(|r| match r.response {
                        Some(response_op::Response::ResponseRange(range)) => {
                            range.kvs.into_iter().next()
                        }
                        _ => None,
                    });
                    let kv = ranges.next().flatten();
                    let reserved = ranges.next().flatten();
                    let asked = Asked { id, budget, reply };
                    Answer::Exists {
                        asked,
                        kv,
                        reserved,
                    }
                }
            }
        })
        .collect()
}

impl Inner {
    /// Gathers the guardians' calls into transactions of at most
    /// [`MAX_OPS_PER_TXN`] operations, [`TXNS_IN_FLIGHT`] in flight at once.
    pub(super) async fn batcher(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Op>) {
        let permits = Arc::new(Semaphore::new(TXNS_IN_FLIGHT));
        let mut queue: VecDeque<Op> = VecDeque::new();
        loop {
            if queue.is_empty() {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    op = rx.recv() => match op {
                        Some(op) => queue.push_back(op),
                        None => return,
                    },
                }
            }
            let permit = tokio::select! {
                _ = self.stop.cancelled() => return,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            while let Ok(op) = rx.try_recv() {
                queue.push_back(op);
            }
            let batch = take_batch(&mut queue, MAX_OPS_PER_TXN, Op::id, Op::urgent);
            let inner = self.clone();
            tokio::spawn(async move {
                inner.run_batch(batch).await;
                drop(permit);
            });
        }
    }

    /// Sends one transaction and answers each of its calls.
    async fn run_batch(self: &Arc<Self>, batch: Vec<Op>) {
        let planned = plan(
            batch,
            &mut self.lock(),
            Instant::now(),
            self.interval,
            &self.node,
            &self.layout,
        );
        let plan = match planned {
            Ok(plan) => plan,
            Err(batch) => {
                for op in batch {
                    op.fail(self.closed_error());
                }
                return;
            }
        };
        for op in plan.no_lease {
            op.fail(Error::backend(crate::BackendErrorKind::Other, format!(
                "no live etcd lease for this node ({}): reconnecting, claiming nothing meanwhile",
                self.describe
            )));
        }
        if plan.pending.is_empty() {
            return;
        }
        self.bump();
        let lease_id = plan.lease_id;
        let txn = plan.txn;
        let send = |c: Conn| {
            let request = c.request(txn.clone());
            async move { c.kv().txn(request).await }
        };
        let resp = match self.request(send).await {
            Ok(Ok(resp)) => resp,
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => {
                        if classify(&e, Call::Request) == Failure::LeaseNotFound {
                            self.lease_gone(lease_id);
                        }
                        reason(&e)
                    }
                    _ => format!("no answer within {:?}", self.request_timeout),
                };
                for op in plan.pending {
                    op.fail(Error::backend(
                        crate::BackendErrorKind::Other,
                        format!("etcd ({}) cannot be asked now: {why}", self.describe),
                    ));
                }
                return;
            }
        };
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        for answer in answers(plan.pending, resp.responses) {
            self.complete(answer, lease_id, revision);
        }
    }

    /// Answers one call of a transaction etcd applied at `revision`.
    fn complete(self: &Arc<Self>, answer: Answer, lease_id: i64, revision: i64) {
        let (asked, kv, reserved) = match answer {
            Answer::Garbled(op) => {
                op.fail(Error::backend(
                    crate::BackendErrorKind::Other,
                    "etcd answered a transaction with something else",
                ));
                return;
            }
            Answer::Released(reply) => {
                let _ = reply.send(Ok(()));
                return;
            }
            Answer::Put(Asked { id, budget, reply }) => {
                let granted = self.granted(&id, budget, lease_id, revision as u64);
                if let Err(Ok(Claim::Granted(lease))) = reply.send(granted) {
                    self.abandon(id, lease.token);
                }
                return;
            }
            Answer::Exists {
                asked,
                kv,
                reserved,
            } => (asked, kv, reserved),
        };
        let Asked { id, budget, reply } = asked;
        let Some(kv) = kv else {
            self.reserved(id, budget, reply, reserved, revision);
            return;
        };
        let token = kv.create_revision;
        if self.lock().is_stale(&id, token as u64, kv.lease) {
            // A key of a tenure this node already gave up: delete it, then
            // claim afresh so the new tenure gets a new token.
            let inner = self.clone();
            tokio::spawn(async move {
                match inner.delete_stale(&id, token).await {
                    Ok(()) => {
                        if let Err(mpsc::error::SendError(op)) =
                            inner.ops.send(Op::Claim { id, budget, reply })
                        {
                            op.fail(inner.closed_error());
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            });
            return;
        }
        let wake = self.wake_after(&id, revision);
        let _ = reply.send(Ok(Claim::Busy {
            holder: Some(holder_of(&kv)),
            wake,
        }));
    }

    /// A claim of `id` found its key free but the reservation `reserved`
    /// in place at `revision` (`None`: both vanished in between). The node
    /// it names takes the id at once; any other waits until it is taken,
    /// released or lapses.
    fn reserved(
        &self,
        id: Arc<str>,
        budget: Duration,
        reply: oneshot::Sender<Result<Claim>>,
        reserved: Option<KeyValue>,
        revision: i64,
    ) {
        let Some(reserved) = reserved else {
            let _ = reply.send(Ok(Claim::Busy {
                holder: None,
                wake: Box::pin(async {}),
            }));
            return;
        };
        if reserved.value == self.node.as_bytes() {
            let take = Op::Take {
                id,
                budget,
                reserved_at: reserved.mod_revision,
                reply,
            };
            if let Err(mpsc::error::SendError(op)) = self.ops.send(take) {
                op.fail(self.closed_error());
            }
            return;
        }
        let target = String::from_utf8_lossy(&reserved.value).into_owned();
        let wake = self.wake_after(&id, revision);
        let _ = reply.send(Ok(Claim::Busy {
            holder: Some(Holder::new(target, None)),
            wake,
        }));
    }

    /// A tenure was granted for a claim whose future is gone: nobody runs
    /// it, so it ends and its key is deleted at once, as a release would.
    fn abandon(&self, id: Arc<str>, token: u64) {
        debug!(node = %self.node, %id, token, "granted after the claim was dropped: released at once");
        self.lock().end_tenure(&id, token);
        let (reply, _) = oneshot::channel();
        let _ = self.ops.send(Op::Release { id, token, reply });
    }

    fn granted(&self, id: &Arc<str>, budget: Duration, lease_id: i64, token: u64) -> Result<Claim> {
        let granted = self
            .lock()
            .grant(id, budget, lease_id, token, Instant::now());
        match granted {
            Ok(lease) => {
                self.bump();
                Ok(Claim::Granted(lease))
            }
            Err(NotGranted::LeaseEnded) => Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "the etcd lease of this node ended while claiming `{id}`; retrying with a new one"
                ),
            )),
            Err(NotGranted::TooLate) => Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "the etcd lease of this node could not be kept alive while claiming `{id}`; retrying"
                ),
            )),
        }
    }

    async fn delete_stale(&self, id: &str, token: i64) -> Result<()> {
        let txn = delete_if_created_at(&self.layout.id(id), token);
        let send = |c: Conn| {
            let request = c.request(txn.clone());
            async move { c.kv().txn(request).await }
        };
        self.answer(self.request(send).await).map(drop)
    }

    /// Completes once the watch has seen the key of `id`, or its
    /// reservation, deleted at a revision after `seen_busy`: the waiter's
    /// entry exists before its claim was sent, so no deletion can slip
    /// between check and await.
    fn wake_after(&self, id: &str, seen_busy: i64) -> BoxFuture<'static, ()> {
        let rx = self.lock().wakes.get(id).map(|w| w.subscribe());
        Box::pin(async move {
            let Some(mut rx) = rx else { return };
            loop {
                if *rx.borrow_and_update() > seen_busy {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
