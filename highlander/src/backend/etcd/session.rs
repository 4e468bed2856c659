//! One node's etcd session: the [`Session`] the guardians call, and what
//! its tasks share (the members, the state, the queue of claims and
//! releases). The tasks themselves live in `keeper` (the lease), `watch`,
//! `batch` and `fleet` (the node's member key and profile).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tonic::Response;
use tonic::Status;
use tracing::{debug, warn};

use super::batch::Op;
use super::conn::{Conn, DialError};
use super::failure::{Call, Failure, classify, reason};
use super::fleet::Fleet;
use super::members::{Members, Outcome, Use, out_of_reach};
use super::pb::etcdserverpb::RangeRequest;
use super::pb::mvccpb::KeyValue;
use super::roster::Layout;
use super::state::{State, budget_fits};
use crate::backend::{Claim, ClaimRequest, HeldId, Holder, Member, Profile, Session};
use crate::service::BoxFuture;
use crate::{Error, Result};

pub(super) const RETRY_MIN: Duration = Duration::from_millis(50);
pub(super) const RETRY_MAX: Duration = Duration::from_secs(2);

/// What a session is told at start.
pub(super) struct Settings {
    pub(super) node: String,
    /// `/{namespace}/`: every key of this session starts with it.
    pub(super) prefix: String,
    pub(super) ttl_secs: i64,
    /// The keep-alive interval.
    pub(super) interval: Duration,
    /// The backend's description, for errors (no password).
    pub(super) describe: String,
}

/// What the session's tasks share.
pub(super) struct Inner {
    pub(super) members: Members,
    pub(super) node: String,
    pub(super) prefix: String,
    pub(super) ttl_secs: i64,
    pub(super) interval: Duration,
    pub(super) request_timeout: Duration,
    pub(super) describe: String,
    pub(super) state: Mutex<State>,
    /// Bumped whenever the lease or the held set changes.
    pub(super) changes: watch::Sender<u64>,
    pub(super) ops: mpsc::UnboundedSender<Op>,
    pub(super) stop: CancellationToken,
    /// Where each kind of key lives.
    pub(super) layout: Layout,
    /// The node's profile and what it knows of the other members.
    pub(super) fleet: Fleet,
}

/// The [`Session`] of one node on etcd.
pub(super) struct EtcdSession {
    inner: Arc<Inner>,
    /// The keep-alive task, which `close` waits for: a lease it was being
    /// granted as the session closed is revoked before `close` returns.
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for EtcdSession {
    /// Dropped without `close` (the runtime was aborted): like a crash, the
    /// tasks stop and the lease expires on the server after its TTL.
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl EtcdSession {
    /// A session on `members` holding the lease `(id, ttl, sent)` that was
    /// just granted, with its tasks started; the watch starts after
    /// `revision`.
    pub(super) fn start(
        settings: Settings,
        members: Members,
        (lease, ttl, sent): (i64, i64, Instant),
        revision: i64,
    ) -> Arc<EtcdSession> {
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            request_timeout: members.request_timeout(),
            members,
            node: settings.node,
            prefix: settings.prefix.clone(),
            ttl_secs: settings.ttl_secs,
            interval: settings.interval,
            describe: settings.describe,
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
            ops: ops_tx,
            stop: CancellationToken::new(),
            layout: Layout::new(settings.prefix.clone()),
            fleet: Fleet::default(),
        });
        inner.install_lease(lease, ttl, sent);
        let keeper = tokio::spawn(inner.clone().keeper());
        tokio::spawn(inner.clone().watchdog());
        tokio::spawn(inner.clone().watcher(revision + 1));
        tokio::spawn(inner.clone().batcher(ops_rx));
        tokio::spawn(inner.clone().publisher());
        Arc::new(EtcdSession {
            inner,
            keeper: Mutex::new(Some(keeper)),
        })
    }
}

/// A stream of the messages sent into `rx`: the request side of a
/// bidirectional gRPC stream, open as long as its sender lives.
pub(super) fn outbound<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// The end of the key range that holds every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The holder a lease key names: its value is the node, its create revision
/// the fencing token.
pub(super) fn holder_of(kv: &KeyValue) -> Holder {
    Holder::new(
        String::from_utf8_lossy(&kv.value).into_owned(),
        Some(kv.create_revision as u64),
    )
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    pub(super) fn closed_error(&self) -> Error {
        Error::backend(
            crate::BackendErrorKind::Other,
            format!("the etcd session ({}) is closed", self.describe),
        )
    }

    /// One request through the requests' member: see [`Members::request`].
    pub(super) async fn request<T, F, Fut>(&self, send: F) -> Outcome<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.members.request(send).await
    }

    /// Reads `key` (or the range up to `range_end` when it is not empty):
    /// the keys and values, or one error line naming etcd and why.
    async fn read(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<Vec<KeyValue>> {
        let send = |c: Conn| {
            let request = c.request(RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                ..RangeRequest::default()
            });
            async move { c.kv().range(request).await }
        };
        self.answer(self.request(send).await).map(|resp| resp.kvs)
    }

    /// What a [`request`](Self::request) came to, as this crate's result:
    /// one error line naming etcd and why when it failed or timed out.
    pub(super) fn answer<T>(&self, outcome: Outcome<T>) -> Result<T> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::backend(
                crate::BackendErrorKind::Unreachable,
                format!(
                    "etcd ({}) cannot be asked now: {}",
                    self.describe,
                    reason(&e)
                ),
            )),
            Err(_) => Err(Error::backend(
                crate::BackendErrorKind::Unreachable,
                format!(
                    "etcd ({}) cannot be asked now: no answer within {:?}",
                    self.describe, self.request_timeout
                ),
            )),
        }
    }

    /// The connection to `use_`'s member for its stream (the keep-alive,
    /// the watch); `None` after a failure, which moves `use_` to the next
    /// member.
    pub(super) async fn stream_client(&self, use_: Use) -> Option<Conn> {
        match self.members.client(use_, self.request_timeout).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                debug!(node = %self.node, why = %e.reason(), stream = ?use_, "cannot connect to this etcd member; trying the next");
                self.members
                    .failed(use_, !matches!(e, DialError::Failed(_)));
                None
            }
        }
    }

    /// `use_`'s stream could not be opened on `conn`: a refused token is
    /// renewed and the stream opened again on the same member (after the
    /// caller's backoff: never a tight loop); any other failure moves `use_`
    /// to the next member. Why, for the log.
    pub(super) async fn stream_failed<T>(
        &self,
        use_: Use,
        conn: &Conn,
        outcome: Outcome<T>,
    ) -> String {
        let renewed = match &outcome {
            Ok(Err(e)) => conn.renew_token(e).await,
            _ => false,
        };
        if !renewed {
            self.members.failed(use_, out_of_reach(&outcome));
        }
        match outcome {
            Ok(Err(e)) => reason(&e),
            Ok(Ok(_)) => "stream closed".into(),
            Err(_) => "timed out".into(),
        }
    }

    /// Sleeps `d` unless the session stops; false when it stopped.
    pub(super) async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = sleep(d) => true,
        }
    }

    fn check_budget(&self, id: &str, budget: Duration) -> Result<()> {
        let ttl = Duration::from_secs(self.ttl_secs as u64);
        budget_fits(ttl, self.interval, budget).map_err(|want| {
            Error::config(format!(
                "the shutdown budget {:?} of `{}` does not fit in the etcd lease TTL of {}s: the \
                 instance must stop within TTL − 1 % − {:?} of the last keep-alive, with room for \
                 keep-alives; raise the TTL to {want}s or more (?ttl= or Etcd::ttl) or shorten its shutdown",
                budget,
                id,
                self.ttl_secs,
                super::state::MARGIN
            ))
        })
    }
}

impl Session for EtcdSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.check_budget(&request.id, request.stop_budget)?;
            let reserved_at = {
                let mut state = inner.lock();
                if state.closed {
                    return Err(inner.closed_error());
                }
                state.expect(&request.id);
                state.take_reservation(&request.id)
            };
            let (reply, answer) = oneshot::channel();
            let (id, budget) = (request.id, request.stop_budget);
            // An id handed to this node is taken through its reservation in
            // one transaction, not refused first by the plain claim's.
            let op = match reserved_at {
                Some(reserved_at) => Op::Take {
                    id,
                    budget,
                    reserved_at,
                    reply,
                },
                None => Op::Claim { id, budget, reply },
            };
            inner.ops.send(op).map_err(|_| inner.closed_error())?;
            answer.await.map_err(|_| inner.closed_error())?
        })
    }

    fn check_stop_budget(&self, id: &str, budget: Duration) -> Result<()> {
        self.inner.check_budget(id, budget)
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        let id: Arc<str> = Arc::from(id);
        Box::pin(async move {
            let inner = &self.inner;
            let (reply, answer) = oneshot::channel();
            inner
                .ops
                .send(Op::Release { id, token, reply })
                .map_err(|_| inner.closed_error())?;
            answer.await.map_err(|_| inner.closed_error())?
        })
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let key = self.inner.key(id).into_bytes();
        Box::pin(async move {
            let kvs = self.inner.read(key, Vec::new()).await?;
            Ok(kvs.first().map(holder_of))
        })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        Box::pin(self.inner.members())
    }

    fn announce(&self, profile: Profile) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.inner.announce(profile))
    }

    fn members_changed(&self) -> BoxFuture<'static, ()> {
        self.inner.fleet.changed()
    }

    /// Reserves `id` for `node` for [`RESERVATION_TTL`](super::fleet::RESERVATION_TTL)
    /// as it releases it. The tenure is over for this node at once, and the
    /// release goes out whatever happens to the future (a task finishes it);
    /// when no reservation lease can be had, it is a plain release.
    fn release_to(&self, id: &str, token: u64, node: &str) -> BoxFuture<'_, Result<()>> {
        let id: Arc<str> = Arc::from(id);
        let target: Arc<str> = Arc::from(node);
        self.inner.lock().release(&id, token);
        let (reply, answer) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let op = match inner.reservation_lease().await {
                Some(lease) => Op::ReleaseTo {
                    id,
                    token,
                    target,
                    lease,
                    reply,
                },
                None => Op::Release { id, token, reply },
            };
            if let Err(mpsc::error::SendError(op)) = inner.ops.send(op) {
                op.fail(inner.closed_error());
            }
        });
        Box::pin(async move {
            let inner = &self.inner;
            answer.await.map_err(|_| inner.closed_error())?
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let prefix = self.inner.prefix.as_bytes().to_vec();
        let end = self.inner.layout.ids_end();
        Box::pin(async move {
            let kvs = self.inner.read(prefix.clone(), end).await?;
            let mut held: Vec<HeldId> = kvs
                .iter()
                .filter_map(|kv| {
                    let id = std::str::from_utf8(kv.key.strip_prefix(prefix.as_slice())?).ok()?;
                    // etcd keeps no wall-clock time for a key.
                    Some(HeldId::new(id, holder_of(kv), None))
                })
                .collect();
            held.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(held)
        })
    }

    fn lease_deadline(&self) -> Option<std::time::Instant> {
        self.inner.lock().deadline().map(|(_, at)| at.into_std())
    }

    /// Revokes every lease of this node: each key it still holds is deleted
    /// in one step, so a standby takes over on one watch event.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            let leases = inner.lock().close();
            inner.stop.cancel();
            for id in leases {
                match inner.revoke(id).await {
                    Ok(Ok(_)) => {
                        debug!(node = %inner.node, lease = format_args!("{id:x}"), "etcd lease revoked")
                    }
                    Ok(Err(e)) if classify(&e, Call::Request) == Failure::LeaseNotFound => {}
                    Ok(Err(e)) => {
                        warn!(node = %inner.node, why = %reason(&e), "cannot revoke the etcd lease; it expires after its TTL")
                    }
                    Err(_) => {
                        warn!(node = %inner.node, "cannot revoke the etcd lease in time; it expires after its TTL")
                    }
                }
            }
            // A grant in flight as the session closed ends in a revoke;
            // both are bounded by the request timeout.
            let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(keeper) = keeper {
                let _ = tokio::time::timeout(inner.request_timeout * 3, keeper).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/highlander/"), b"/highlander0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn a_key_names_its_holder_and_token() {
        let kv = KeyValue {
            key: b"/highlander/job".to_vec(),
            value: b"node-1".to_vec(),
            create_revision: 42,
            ..KeyValue::default()
        };
        assert_eq!(holder_of(&kv), Holder::new("node-1", Some(42)));
    }
}
