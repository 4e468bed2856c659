//! The guardians' claims and releases, batched into few transactions: which
//! queued calls go into the next transaction, the nested transaction each
//! becomes, and what etcd's answer means for each call. Those three are
//! plain functions tested here; the batcher task sends the transactions.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::conn::Conn;
use super::failure::{Call, Failure, classify, reason};
use super::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseOp, TxnRequest,
    compare, request_op, response_op,
};
use super::pb::mvccpb::KeyValue;
use super::session::{Inner, holder_of};
use super::state::{NotGranted, State};
use crate::backend::Claim;
use crate::service::BoxFuture;
use crate::{Error, Result};

/// Claims and releases per transaction. etcd's default `--max-txn-ops` is
/// 128, and it counts a nested transaction's operations against what the
/// outer one leaves: 127 nested transactions of one operation each is the
/// most one transaction may carry.
pub(super) const MAX_OPS_PER_TXN: usize = 127;
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
}

impl Op {
    fn id(&self) -> &str {
        match self {
            Op::Claim { id, .. } | Op::Release { id, .. } => id,
        }
    }

    /// Answers the call with `error`.
    pub(super) fn fail(self, error: Error) {
        match self {
            Op::Claim { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Op::Release { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// Takes the next transaction's calls from the front of `queue`: at most
/// `max`, at most one per id (etcd refuses a transaction that names a key
/// twice), in queue order. What is left stays queued, in order.
fn take_batch<T>(queue: &mut VecDeque<T>, max: usize, id: impl Fn(&T) -> &str) -> Vec<T> {
    let mut batch = Vec::new();
    let mut later = VecDeque::new();
    {
        let mut ids = HashSet::new();
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

pub(super) fn one_op(request: request_op::Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
}

/// `if create_revision(key) == revision`.
fn created_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        ..Compare::default()
    }
}

/// A nested transaction, as one operation of the outer one.
fn op_txn(txn: TxnRequest) -> RequestOp {
    one_op(request_op::Request::RequestTxn(txn))
}

/// `if create_revision(key) == token then delete(key)`.
fn delete_if_created_at(key: &[u8], token: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, token)],
        success: vec![one_op(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..DeleteRangeRequest::default()
            },
        ))],
        failure: Vec::new(),
    }
}

/// `if create_revision(key) == 0 then put(key, node, lease) else get(key)`.
fn claim_txn(key: &[u8], node: &str, lease: i64) -> TxnRequest {
    let put = PutRequest {
        key: key.to_vec(),
        value: node.as_bytes().to_vec(),
        lease,
        ..PutRequest::default()
    };
    let get = RangeRequest {
        key: key.to_vec(),
        ..RangeRequest::default()
    };
    TxnRequest {
        compare: vec![created_at(key, 0)],
        success: vec![one_op(request_op::Request::RequestPut(put))],
        failure: vec![one_op(request_op::Request::RequestRange(get))],
    }
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
    key: impl Fn(&str) -> Vec<u8>,
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
        let key = key(op.id());
        let txn = match &op {
            Op::Claim { budget, .. } => {
                match lease.filter(|l| now + interval < l.deadline(*budget)) {
                    Some(lease) => claim_txn(&key, node, lease.id),
                    None => {
                        plan.no_lease.push(op);
                        continue;
                    }
                }
            }
            Op::Release { id, token, .. } => {
                state.release(id, *token);
                delete_if_created_at(&key, *token as i64)
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
    Put {
        id: Arc<str>,
        budget: Duration,
        reply: oneshot::Sender<Result<Claim>>,
    },
    /// The key exists (`None`: it vanished in between, which one
    /// transaction rules out; answered "try again" all the same).
    Exists {
        id: Arc<str>,
        budget: Duration,
        reply: oneshot::Sender<Result<Claim>>,
        kv: Option<KeyValue>,
    },
    /// No nested transaction's answer in its place.
    Garbled(Op),
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
                Op::Release { reply, .. } => Answer::Released(reply),
                Op::Claim { id, budget, reply } if answer.succeeded => {
                    Answer::Put { id, budget, reply }
                }
                Op::Claim { id, budget, reply } => {
                    let kv = answer.responses.into_iter().find_map(|r| match r.response {
                        Some(response_op::Response::ResponseRange(range)) => {
                            range.kvs.into_iter().next()
                        }
                        _ => None,
                    });
                    Answer::Exists {
                        id,
                        budget,
                        reply,
                        kv,
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
            let batch = take_batch(&mut queue, MAX_OPS_PER_TXN, Op::id);
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
            |id| self.key(id).into_bytes(),
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
        let (id, budget, reply, kv) = match answer {
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
            Answer::Put { id, budget, reply } => {
                let _ = reply.send(self.granted(&id, budget, lease_id, revision as u64));
                return;
            }
            Answer::Exists {
                id,
                budget,
                reply,
                kv,
            } => (id, budget, reply, kv),
        };
        let Some(kv) = kv else {
            let _ = reply.send(Ok(Claim::Busy {
                holder: None,
                wake: Box::pin(async {}),
            }));
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
        let txn = delete_if_created_at(self.key(id).as_bytes(), token);
        let send = |c: Conn| {
            let request = c.request(txn.clone());
            async move { c.kv().txn(request).await }
        };
        self.answer(self.request(send).await).map(drop)
    }

    /// Completes once the watch has seen the key of `id` deleted at a
    /// revision after `seen_busy`: the waiter's entry exists before its
    /// claim was sent, so no deletion can slip between check and await.
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
