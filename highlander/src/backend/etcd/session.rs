//! One node's etcd session: its lease and the one task that keeps it alive,
//! the watchdog that gives every tenure up before the server could expire
//! the lease, the one watch over the namespace, and the batcher that turns
//! the guardians' per-id calls into few transactions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status};
use tracing::{debug, info, warn};

use super::conn::{
    Conn, DialError, Dialer, denied, handshake_failed, lease_not_found, reason, refused,
    undelivered,
};
use super::pb::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, compare,
    request_op, response_op, watch_request,
};
use super::pb::mvccpb::{KeyValue, event::EventType};
use super::{Etcd, host_port, key_prefix};
use crate::backend::{
    Backend, Claim, ClaimRequest, HeldId, Holder, Lease, LeaseEnd, LeaseSignal, Session,
};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// Bound on the rate error between this host's monotonic clock and the
/// etcd leader's: 1 % of the TTL.
const CLOCK_RATE_PERCENT: u32 = 1;
/// Absorbs scheduling delay between the deadline and the cancellation.
pub(super) const MARGIN: Duration = Duration::from_millis(250);
/// Claims and releases per transaction. etcd's default `--max-txn-ops` is
/// 128, and it counts a nested transaction's operations against what the
/// outer one leaves: 127 nested transactions of one operation each is the
/// most one transaction may carry.
const MAX_OPS_PER_TXN: usize = 127;
/// Claim transactions in flight at once.
const TXNS_IN_FLIGHT: usize = 4;
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The node's current etcd lease.
#[derive(Debug, Clone, Copy)]
struct NodeLease {
    id: i64,
    /// The TTL the server granted.
    ttl: Duration,
    /// When the last keep-alive that succeeded was sent (or the grant).
    last_ok: Instant,
}

impl NodeLease {
    /// How long after `last_ok` the node may still act as holder, before
    /// subtracting the stop budget: `TTL·(1 − ρ) − margin`.
    fn usable(&self) -> Duration {
        usable(self.ttl)
    }

    /// When a holder whose instance needs `budget` to stop must begin to.
    fn deadline(&self, budget: Duration) -> Instant {
        self.last_ok + self.usable().saturating_sub(budget)
    }
}

fn usable(ttl: Duration) -> Duration {
    ttl.saturating_sub(ttl * CLOCK_RATE_PERCENT / 100)
        .saturating_sub(MARGIN)
}

/// One tenure this node holds.
struct Held {
    token: u64,
    budget: Duration,
    signal: LeaseSignal,
}

#[derive(Default)]
struct State {
    lease: Option<NodeLease>,
    /// Every lease this session was granted whose keys may still exist.
    ours: HashSet<i64>,
    held: HashMap<Arc<str>, Held>,
    /// Per id this node has asked for: the revision of the last deletion of
    /// its key that the watch has seen. A waiter wakes when it passes the
    /// revision at which the id was seen busy.
    wakes: HashMap<Arc<str>, watch::Sender<i64>>,
    closed: bool,
}

impl State {
    /// The node gives up every tenure at the deadline of the one with the
    /// longest stop budget.
    fn deadline(&self) -> Option<(i64, Instant)> {
        let lease = self.lease?;
        let budget = self.held.values().map(|h| h.budget).max()?;
        Some((lease.id, lease.deadline(budget)))
    }

    fn longest_budget(&self) -> Duration {
        self.held
            .values()
            .map(|h| h.budget)
            .max()
            .unwrap_or_default()
    }

    fn end_all(&mut self) -> usize {
        let n = self.held.len();
        for (_, held) in self.held.drain() {
            held.signal.end(LeaseEnd::Lost);
        }
        n
    }
}

enum Op {
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
    fn id(&self) -> &Arc<str> {
        match self {
            Op::Claim { id, .. } | Op::Release { id, .. } => id,
        }
    }
}

struct Inner {
    members: Members,
    node: String,
    prefix: String,
    ttl_secs: i64,
    interval: Duration,
    request_timeout: Duration,
    describe: String,
    state: Mutex<State>,
    /// Bumped whenever the lease or the held set changes.
    changes: watch::Sender<u64>,
    ops: mpsc::UnboundedSender<Op>,
    stop: CancellationToken,
}

/// The [`Session`] of one node on etcd.
pub(super) struct EtcdSession {
    inner: Arc<Inner>,
}

impl Drop for EtcdSession {
    /// Dropped without `close` (the runtime was aborted): like a crash, the
    /// tasks stop and the lease expires on the server after its TTL.
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

/// A stream of the messages sent into `rx`: the request side of a
/// bidirectional gRPC stream, open as long as its sender lives.
fn outbound<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
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

fn one_op(request: request_op::Request) -> RequestOp {
    RequestOp {
        request: Some(request),
    }
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

/// Whether a failed request says its member is out of reach: no answer in
/// time, or no connection at all. Such a member is avoided for a while.
fn out_of_reach<T>(
    outcome: &std::result::Result<std::result::Result<T, Status>, tokio::time::error::Elapsed>,
) -> bool {
    match outcome {
        Err(_) => true,
        Ok(Err(e)) => refused(e),
        Ok(Ok(_)) => false,
    }
}

/// How a start-up step failed.
enum StartFailure {
    /// Still failing when the connect timeout passed: the last reason, and
    /// whether it was a failed TLS handshake.
    Unreachable { why: String, handshake: bool },
    /// The user or password was refused.
    Credentials(String),
    /// The user may not use the namespace.
    Denied(String),
}

/// Runs one start-up step (`send` on the current member) until it
/// succeeds, fails for good, or `deadline` passes; each attempt gets a third
/// of the time at most and a failure moves the step to the next member, so
/// one member that hangs or refuses does not decide the outcome while others
/// may answer.
async fn at_start<T, F, Fut>(
    members: &Members,
    deadline: Instant,
    limit: Duration,
    mut send: F,
) -> std::result::Result<T, StartFailure>
where
    F: FnMut(Conn) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
{
    enum Failed {
        Dial(DialError),
        Answer(Status),
    }
    let per_attempt = (limit / 3).max(Duration::from_millis(500));
    let mut retry = RETRY_MIN;
    let mut last: Option<(String, bool)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(match last {
                Some((why, handshake)) => StartFailure::Unreachable {
                    why: format!("{why} (still failing after {limit:?})"),
                    handshake,
                },
                None => StartFailure::Unreachable {
                    why: format!("no answer within {limit:?}"),
                    handshake: false,
                },
            });
        }
        let limit_now = left.min(per_attempt);
        let attempt = async {
            let conn = members
                .client(Use::Request, limit_now)
                .await
                .map_err(Failed::Dial)?;
            conn.call(&mut send).await.map_err(Failed::Answer)
        };
        match timeout(limit_now, attempt).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(Failed::Dial(DialError::Credentials(why)))) => {
                return Err(StartFailure::Credentials(why));
            }
            Ok(Err(Failed::Dial(e))) => {
                members.failed(Use::Request, !matches!(e, DialError::Failed(_)));
                last = Some((e.reason(), matches!(e, DialError::Handshake(_))));
            }
            Ok(Err(Failed::Answer(status))) if denied(&status) => {
                return Err(StartFailure::Denied(reason(&status)));
            }
            Ok(Err(Failed::Answer(status))) => {
                members.failed(Use::Request, refused(&status));
                last = Some((reason(&status), handshake_failed(&status)));
            }
            Err(_) => members.failed(Use::Request, true),
        }
        sleep(retry.min(deadline.saturating_duration_since(Instant::now()))).await;
        retry = (retry * 2).min(Duration::from_millis(500));
    }
}

/// Connects one node: authenticates, learns the current revision (the
/// watch starts there), is granted the node's lease, and starts the tasks.
/// Each step is retried until the connect timeout, so a dead member among
/// the endpoints does not fail the start.
pub(super) async fn connect(config: Etcd, node: String) -> Result<Arc<EtcdSession>> {
    let describe = config.describe();
    let endpoints: Vec<String> = config
        .endpoints
        .iter()
        .filter_map(|e| host_port(e))
        .map(str::to_string)
        .collect();
    let shown = endpoints.join(",");
    let limit = config.connect_timeout;
    let deadline = Instant::now() + limit;
    let ttl_secs = config.ttl_secs();
    let interval = config.keepalive_in_effect();
    let request_timeout = (Duration::from_secs(ttl_secs as u64) / 4)
        .clamp(Duration::from_millis(500), Duration::from_secs(3));
    // HTTP/2 pings on every connection (every keep-alive interval, answered
    // within the request timeout): a member that hangs with its connections
    // open (paused, overloaded) gets its connections closed, so streams on
    // it (the watch, a keep-alive) break and reopen elsewhere instead of
    // going quiet.
    let dialer = Dialer::new(&config, &endpoints, interval, request_timeout)?;
    let members = Members::new(
        dialer,
        endpoints.len(),
        Duration::from_secs(ttl_secs.max(1) as u64),
    );
    let failed = |failure: StartFailure| match failure {
        StartFailure::Credentials(why) => {
            let user = config.user.as_ref().map(|(u, _)| u.as_str()).unwrap_or("");
            Error::config(format!(
                "etcd at {shown} refused user `{user}` ({describe}): {why}"
            ))
        }
        StartFailure::Denied(why) => Error::config(format!(
            "etcd at {shown} does not let this user read and write `{}` ({describe}): {why}",
            key_prefix(&config.namespace)
        )),
        StartFailure::Unreachable {
            why,
            handshake: true,
        } => Error::backend(
            crate::BackendErrorKind::Other,
            format!(
                "cannot reach etcd at {shown} ({describe}): {why} (a TLS mismatch? use etcds:// \
             for a TLS server, with ca= its CA and cert=/key= when it requires client \
             certificates)"
            ),
        ),
        StartFailure::Unreachable { why, .. } => Error::backend(
            crate::BackendErrorKind::Other,
            format!("cannot reach etcd at {shown} ({describe}): {why}"),
        ),
    };
    let prefix = key_prefix(&config.namespace);
    let first = at_start(&members, deadline, limit, |conn: Conn| {
        let request = conn.request(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            keys_only: true,
            limit: 1,
            ..RangeRequest::default()
        });
        async move { conn.kv().range(request).await }
    })
    .await;
    let revision = match first {
        Ok(resp) => resp.header.map(|h| h.revision).unwrap_or(0),
        Err(failure) => return Err(failed(failure)),
    };
    let mut sent = Instant::now();
    let granted = at_start(&members, deadline, limit, |conn: Conn| {
        sent = Instant::now();
        let request = conn.request(LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        });
        async move { conn.lease().lease_grant(request).await }
    })
    .await;
    let granted = match granted {
        Ok(resp) if resp.ttl > 0 => resp,
        Ok(resp) => {
            return Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "etcd at {shown} ({describe}) did not grant a lease: {}",
                    resp.error
                ),
            ));
        }
        Err(failure) => return Err(failed(failure)),
    };
    let (ops_tx, ops_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        members,
        node,
        prefix,
        ttl_secs,
        interval,
        request_timeout,
        describe: describe.clone(),
        state: Mutex::new(State::default()),
        changes: watch::Sender::new(0),
        ops: ops_tx,
        stop: CancellationToken::new(),
    });
    inner.install_lease(granted.id, granted.ttl, sent);
    tokio::spawn(inner.clone().keeper());
    tokio::spawn(inner.clone().watchdog());
    tokio::spawn(inner.clone().watcher(revision + 1));
    tokio::spawn(inner.clone().batcher(ops_rx));
    Ok(Arc::new(EtcdSession { inner }))
}

/// What a request to etcd is for: each use keeps its own member, and they
/// share what they learn about members that do not answer.
#[derive(Debug, Clone, Copy)]
enum Use {
    KeepAlive = 0,
    Watch = 1,
    Request = 2,
}

/// The members, each reached through a connection of its own. A client that
/// balances requests over all members at random would send a share of every
/// kind of request to a member that hangs with its connections open
/// (paused, overloaded), each lost for a whole request timeout. Here each
/// use stays on a member that answers, moves to the next one after a
/// failure, and avoids a member that left a request unanswered.
struct Members {
    dialer: Dialer,
    /// How long a member that did not answer is avoided.
    avoid_for: Duration,
    state: Mutex<MembersState>,
}

struct MembersState {
    conns: Vec<Option<Conn>>,
    avoid_until: Vec<Option<Instant>>,
    /// The current member of each [`Use`].
    at: [usize; 3],
}

impl Members {
    fn new(dialer: Dialer, n: usize, ttl: Duration) -> Members {
        let n = n.max(1);
        Members {
            dialer,
            avoid_for: ttl,
            state: Mutex::new(MembersState {
                conns: vec![None; n],
                avoid_until: vec![None; n],
                at: [0; 3],
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MembersState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn several(&self) -> bool {
        self.lock().conns.len() > 1
    }

    /// The connection to `use_`'s current member, connecting (and
    /// authenticating) on first use, within `limit`.
    async fn client(&self, use_: Use, limit: Duration) -> std::result::Result<Conn, DialError> {
        let (at, existing) = {
            let state = self.lock();
            let at = state.at[use_ as usize];
            (at, state.conns[at].clone())
        };
        if let Some(conn) = existing {
            return Ok(conn);
        }
        let conn = timeout(limit, self.dialer.dial(at))
            .await
            .map_err(|_| DialError::Unreachable(format!("no connection within {limit:?}")))??;
        let mut state = self.lock();
        Ok(state.conns[at].get_or_insert(conn).clone())
    }

    /// `use_`'s current member failed a request: move that use to another
    /// member, one not avoided when there is one. `silent` (no answer, or
    /// no connection) also makes every use avoid that member for a while,
    /// and drops its connection so that a later use reconnects.
    fn failed(&self, use_: Use, silent: bool) {
        let mut state = self.lock();
        let n = state.conns.len();
        if n < 2 {
            return;
        }
        let at = state.at[use_ as usize];
        if silent {
            state.avoid_until[at] = Some(Instant::now() + self.avoid_for);
            state.conns[at] = None;
        }
        let now = Instant::now();
        let next = (1..n)
            .map(|step| (at + step) % n)
            .find(|&i| state.avoid_until[i].is_none_or(|t| t <= now))
            .unwrap_or((at + 1) % n);
        state.at[use_ as usize] = next;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    fn closed_error(&self) -> Error {
        Error::backend(
            crate::BackendErrorKind::Other,
            format!("the etcd session ({}) is closed", self.describe),
        )
    }

    fn install_lease(&self, id: i64, ttl: i64, sent: Instant) {
        let ttl = Duration::from_secs(ttl.max(0) as u64);
        {
            let mut state = self.lock();
            state.lease = Some(NodeLease {
                id,
                ttl,
                last_ok: sent,
            });
            state.ours.insert(id);
        }
        info!(node = %self.node, lease = format_args!("{id:x}"), ttl = ?ttl, "etcd lease granted");
        self.bump();
    }

    /// A keep-alive sent at `sent` succeeded.
    fn renewed(&self, id: i64, sent: Instant, ttl: Option<i64>) {
        let mut state = self.lock();
        if let Some(lease) = state.lease.as_mut().filter(|l| l.id == id) {
            if sent > lease.last_ok {
                lease.last_ok = sent;
            }
            if let Some(ttl) = ttl {
                lease.ttl = lease.ttl.min(Duration::from_secs(ttl.max(0) as u64));
            }
            drop(state);
            self.bump();
        }
    }

    fn is_current(&self, id: i64) -> bool {
        self.lock().lease.is_some_and(|l| l.id == id)
    }

    /// The server says the lease is gone (expired or revoked): every tenure
    /// ends at once and a new lease is granted.
    fn lease_gone(&self, id: i64) {
        let ended = {
            let mut state = self.lock();
            state.ours.remove(&id);
            if state.lease.is_none_or(|l| l.id != id) {
                return;
            }
            state.lease = None;
            state.end_all()
        };
        warn!(node = %self.node, lease = format_args!("{id:x}"), ended, "etcd lease is gone (expired or revoked): every tenure ended");
        self.bump();
    }

    /// No keep-alive succeeded in time: give every tenure up before the
    /// server could expire the lease, and abandon the lease (revoked as
    /// soon as etcd can be reached, so other nodes need not wait for it).
    fn condemn(self: &Arc<Self>, id: i64) {
        let (ended, lease) = {
            let mut state = self.lock();
            let Some(lease) = state.lease.filter(|l| l.id == id) else {
                return;
            };
            state.lease = None;
            (state.end_all(), lease)
        };
        warn!(
            node = %self.node,
            lease = format_args!("{id:x}"),
            ended,
            since_last_keepalive = ?lease.last_ok.elapsed(),
            "no successful etcd keep-alive in time: every tenure given up before the lease could expire"
        );
        self.bump();
        let inner = self.clone();
        tokio::spawn(async move { inner.revoke_until_gone(lease).await });
    }

    /// Revokes an abandoned lease as soon as etcd answers (with backoff),
    /// so other nodes need not wait for it to expire.
    async fn revoke_until_gone(self: Arc<Self>, lease: NodeLease) {
        let mut retry = RETRY_MIN;
        loop {
            match self.revoke(lease.id).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if lease_not_found(&e) => break,
                _ => {}
            }
            if !self.pause(retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
        debug!(node = %self.node, lease = format_args!("{:x}", lease.id), "abandoned etcd lease revoked");
        self.lock().ours.remove(&lease.id);
    }

    /// Revokes lease `id` (its keys go with it).
    async fn revoke(
        &self,
        id: i64,
    ) -> std::result::Result<std::result::Result<(), Status>, tokio::time::error::Elapsed> {
        let send = |c: Conn| {
            let request = c.request(LeaseRevokeRequest { id });
            async move { c.lease().lease_revoke(request).await }
        };
        self.request(send).await.map(|answer| answer.map(|_| ()))
    }

    /// The one keep-alive task: grants the node's lease when it has none,
    /// keeps it alive every `interval` over one stream, and reopens the
    /// stream (on another member when one is down) with backoff.
    async fn keeper(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        let mut retry = RETRY_MIN;
        'outer: while !self.stop.is_cancelled() {
            let conn = match self
                .members
                .client(Use::KeepAlive, self.request_timeout)
                .await
            {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(node = %self.node, why = %e.reason(), retry_in = ?retry, "cannot connect to this etcd member; trying the next");
                    self.members
                        .failed(Use::KeepAlive, !matches!(e, DialError::Failed(_)));
                    if !self.pause(retry).await {
                        break;
                    }
                    retry = (retry * 2).min(self.interval.max(RETRY_MIN));
                    continue;
                }
            };
            let current = self.lock().lease;
            let Some(lease) = current else {
                let sent = Instant::now();
                let grant = conn.call(|c: Conn| {
                    let request = c.request(LeaseGrantRequest {
                        ttl: self.ttl_secs,
                        id: 0,
                    });
                    async move { c.lease().lease_grant(request).await }
                });
                match timeout(self.request_timeout, grant).await {
                    Ok(Ok(resp)) if resp.ttl > 0 => {
                        self.install_lease(resp.id, resp.ttl, sent);
                        retry = RETRY_MIN;
                    }
                    outcome => {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                        let why = match outcome {
                            Ok(Err(e)) => reason(&e),
                            Ok(Ok(resp)) => format!("granted with no TTL: {}", resp.error),
                            Err(_) => "timed out".into(),
                        };
                        debug!(node = %self.node, %why, retry_in = ?retry, "cannot get an etcd lease yet");
                        if !self.pause(retry).await {
                            break;
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                continue;
            };
            // Opening the stream sends one keep-alive and awaits its answer.
            let (keeper, requests) = mpsc::channel(2);
            let _ = keeper.try_send(LeaseKeepAliveRequest { id: lease.id });
            let sent = Instant::now();
            let open = async {
                let mut stream = conn
                    .lease()
                    .lease_keep_alive(conn.request(outbound(requests)))
                    .await?
                    .into_inner();
                let first = stream.message().await?;
                Ok::<_, Status>((stream, first))
            };
            let opened = tokio::select! {
                _ = self.stop.cancelled() => break,
                opened = timeout(self.request_timeout, open) => opened,
            };
            let mut stream = match opened {
                Ok(Ok((stream, Some(resp)))) if resp.ttl > 0 => {
                    self.renewed(lease.id, sent, Some(resp.ttl));
                    retry = RETRY_MIN;
                    stream
                }
                Ok(Ok((_, Some(_)))) => {
                    // A TTL of 0: etcd no longer has the lease.
                    self.lease_gone(lease.id);
                    continue;
                }
                Ok(Err(e)) if lease_not_found(&e) => {
                    self.lease_gone(lease.id);
                    continue;
                }
                outcome => {
                    // A refused token is renewed and the stream retried on
                    // the same member (after the backoff: never a tight loop).
                    let renewed = match &outcome {
                        Ok(Err(e)) => conn.renew_token(e).await,
                        _ => false,
                    };
                    if !renewed {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                    }
                    let why = match outcome {
                        Ok(Err(e)) => reason(&e),
                        Ok(Ok(_)) => "stream closed".into(),
                        Err(_) => "timed out".into(),
                    };
                    debug!(node = %self.node, %why, retry_in = ?retry, "etcd keep-alive failed");
                    if !self.pause(retry).await {
                        break;
                    }
                    retry = (retry * 2).min(self.interval.max(RETRY_MIN));
                    continue;
                }
            };
            let mut next = Instant::now() + self.interval;
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    _ = sleep_until(next) => {}
                    changed = changes.changed() => {
                        if changed.is_err() || !self.is_current(lease.id) {
                            continue 'outer;
                        }
                        continue;
                    }
                }
                next = Instant::now() + self.interval;
                let sent = Instant::now();
                if keeper
                    .try_send(LeaseKeepAliveRequest { id: lease.id })
                    .is_err()
                {
                    self.members.failed(Use::KeepAlive, false);
                    continue 'outer;
                }
                let answer = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    answer = timeout(self.request_timeout, stream.message()) => answer,
                };
                match answer {
                    Ok(Ok(Some(resp))) if resp.ttl > 0 => {
                        self.renewed(lease.id, sent, Some(resp.ttl))
                    }
                    Ok(Ok(Some(_))) => {
                        self.lease_gone(lease.id);
                        continue 'outer;
                    }
                    outcome => {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                        let why = match outcome {
                            Ok(Err(e)) => reason(&e),
                            Ok(Ok(None)) => "stream closed".into(),
                            _ => "timed out".into(),
                        };
                        debug!(node = %self.node, %why, "etcd keep-alive failed; reopening the stream on the next member");
                        continue 'outer;
                    }
                }
            }
        }
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
    fn answer<T>(
        &self,
        outcome: std::result::Result<std::result::Result<T, Status>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "etcd ({}) cannot be asked now: {}",
                    self.describe,
                    reason(&e)
                ),
            )),
            Err(_) => Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "etcd ({}) cannot be asked now: no answer within {:?}",
                    self.describe, self.request_timeout
                ),
            )),
        }
    }

    /// One request through `Use::Request`'s member, within the request
    /// timeout. A member that does not answer, or cannot be reached, moves
    /// the next request elsewhere; a request the transport could not deliver
    /// or the member could not serve (`Unavailable`: nothing was applied) is
    /// sent once more to the next member. `Err` is a timeout.
    async fn request<T, F, Fut>(
        &self,
        mut send: F,
    ) -> std::result::Result<std::result::Result<T, Status>, tokio::time::error::Elapsed>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut tries = if self.members.several() { 2 } else { 1 };
        loop {
            tries -= 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = async {
                match self.members.client(Use::Request, left).await {
                    Ok(conn) => Some(conn.call(&mut send).await),
                    // Connected, but authenticating failed: that answer.
                    Err(DialError::Failed(status)) => Some(Err(status)),
                    Err(DialError::Credentials(why)) => Some(Err(Status::unauthenticated(why))),
                    Err(DialError::Unreachable(_) | DialError::Handshake(_)) => None,
                }
            };
            let outcome = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) | Err(_) => {
                    self.members.failed(Use::Request, true);
                    // Unreachable member or no answer: a timeout to the caller
                    // (a zero timeout on a future that never completes is
                    // the `Elapsed` value, at once).
                    if tries > 0 && Instant::now() < deadline {
                        continue;
                    }
                    return timeout(Duration::ZERO, std::future::pending()).await;
                }
            };
            if let Ok(Err(e)) = &outcome
                && undelivered(e)
            {
                self.members.failed(Use::Request, refused(e));
                if tries > 0 {
                    continue;
                }
            }
            return outcome;
        }
    }

    /// Sleeps `d` unless the session stops; false when it stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = sleep(d) => true,
        }
    }

    /// Ends every tenure at the node's deadline unless a keep-alive moved it.
    async fn watchdog(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            let deadline = self.lock().deadline();
            let expired = async {
                match deadline {
                    Some((_, at)) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = expired => {
                    let now = self.lock().deadline();
                    if let Some((id, at)) = now
                        && Instant::now() >= at {
                            self.condemn(id);
                        }
                }
            }
        }
    }

    /// The one watch over the namespace: wakes waiters when a key is
    /// deleted, and ends a tenure whose key was deleted from outside.
    async fn watcher(self: Arc<Self>, mut next: i64) {
        let mut retry = RETRY_MIN;
        let mut resumed = false;
        let prefix = self.prefix.as_bytes().to_vec();
        let range_end = prefix_end(&prefix);
        while !self.stop.is_cancelled() {
            let conn = match self.members.client(Use::Watch, self.request_timeout).await {
                Ok(conn) => conn,
                Err(e) => {
                    self.members
                        .failed(Use::Watch, !matches!(e, DialError::Failed(_)));
                    debug!(node = %self.node, why = %e.reason(), retry_in = ?retry, "cannot connect to this etcd member for the watch");
                    if !self.pause(retry).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            let (watches, requests) = mpsc::channel(1);
            let create = WatchCreateRequest {
                key: prefix.clone(),
                range_end: range_end.clone(),
                start_revision: next,
                progress_notify: true,
                ..WatchCreateRequest::default()
            };
            let _ = watches.try_send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
            });
            let mut client = conn.watch();
            let open = client.watch(conn.request(outbound(requests)));
            let opened = tokio::select! {
                _ = self.stop.cancelled() => return,
                opened = timeout(self.request_timeout, open) => opened,
            };
            let mut stream = match opened {
                Ok(Ok(stream)) => {
                    if resumed {
                        // Events between the break and now may have been
                        // compacted away (the watch then resumes after
                        // them): read the held keys again.
                        tokio::spawn(self.clone().recheck_held());
                    }
                    resumed = true;
                    stream.into_inner()
                }
                outcome => {
                    let renewed = match &outcome {
                        Ok(Err(e)) => conn.renew_token(e).await,
                        _ => false,
                    };
                    if !renewed {
                        self.members.failed(Use::Watch, out_of_reach(&outcome));
                    }
                    let why = match outcome {
                        Ok(Err(e)) => reason(&e),
                        _ => "timed out".into(),
                    };
                    debug!(node = %self.node, %why, retry_in = ?retry, "cannot open the etcd watch");
                    if !self.pause(retry).await {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(resp)) => {
                        retry = RETRY_MIN;
                        if resp.canceled {
                            if resp.compact_revision > 0 {
                                next = self.after_compaction(resp.compact_revision).await;
                            } else if !conn.reauthenticate().await {
                                self.members.failed(Use::Watch, false);
                            }
                            debug!(node = %self.node, reason = resp.cancel_reason, "etcd watch canceled; reopening");
                            break;
                        }
                        for event in &resp.events {
                            if let Some(kv) = &event.kv {
                                next = next.max(kv.mod_revision + 1);
                                self.on_event(event.r#type(), kv);
                            }
                        }
                        if resp.events.is_empty()
                            && !resp.created
                            && let Some(header) = &resp.header
                        {
                            next = next.max(header.revision + 1);
                        }
                    }
                    Ok(None) => {
                        self.members.failed(Use::Watch, false);
                        break;
                    }
                    Err(e) => {
                        // A broken stream: the member may have lost its
                        // leader (watches need one), restarted, or stopped
                        // answering HTTP/2 pings. Another member, then.
                        self.members.failed(Use::Watch, refused(&e));
                        debug!(node = %self.node, why = %reason(&e), "etcd watch broke; reopening on the next member");
                        break;
                    }
                }
            }
            drop(watches);
            if !self.pause(retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Reads every held key (after the watch resumed: a deletion in a
    /// compacted gap was never seen) and ends each tenure whose key is gone
    /// or is no longer the one the tenure created. Retried until etcd
    /// answers or the session stops.
    async fn recheck_held(self: Arc<Self>) {
        let held: Vec<(Arc<str>, u64)> = {
            let state = self.lock();
            state
                .held
                .iter()
                .map(|(id, h)| (id.clone(), h.token))
                .collect()
        };
        for chunk in held.chunks(MAX_OPS_PER_TXN) {
            let txn = TxnRequest {
                compare: Vec::new(),
                success: chunk
                    .iter()
                    .map(|(id, _)| {
                        one_op(request_op::Request::RequestRange(RangeRequest {
                            key: self.key(id).into_bytes(),
                            keys_only: true,
                            ..RangeRequest::default()
                        }))
                    })
                    .collect(),
                failure: Vec::new(),
            };
            let mut retry = RETRY_MIN;
            let resp = loop {
                let send = |c: Conn| {
                    let request = c.request(txn.clone());
                    async move { c.kv().txn(request).await }
                };
                if let Ok(Ok(resp)) = self.request(send).await {
                    break resp;
                }
                if !self.pause(retry).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
            };
            let revision = resp.header.map(|h| h.revision).unwrap_or(0);
            for ((id, token), answer) in chunk.iter().zip(resp.responses) {
                let Some(response_op::Response::ResponseRange(range)) = answer.response else {
                    continue;
                };
                let ours = range
                    .kvs
                    .first()
                    .is_some_and(|kv| kv.create_revision == *token as i64);
                // A tenure granted after this read began is not judged by it.
                if !ours && *token as i64 <= revision {
                    self.end_tenure(id, *token);
                }
            }
        }
    }

    /// Ends the tenure of `id` with `token`, if it still runs: its key was
    /// deleted or replaced from outside.
    fn end_tenure(&self, id: &str, token: u64) {
        let mut state = self.lock();
        if state.held.get(id).is_none_or(|h| h.token != token) {
            return;
        }
        if let Some(held) = state.held.remove(id) {
            held.signal.end(LeaseEnd::Lost);
            drop(state);
            warn!(node = %self.node, id, token, "the key of a held id was deleted or replaced in etcd: tenure ended");
            self.bump();
        }
    }

    /// The watch fell behind a compaction: events were lost, so every waiter
    /// retries once, and the watch resumes from the compaction revision.
    async fn after_compaction(&self, compacted: i64) -> i64 {
        let state = self.lock();
        for wake in state.wakes.values() {
            wake.send_if_modified(|v| {
                let bump = *v < compacted;
                if bump {
                    *v = compacted;
                }
                bump
            });
        }
        compacted
    }

    fn on_event(&self, kind: EventType, kv: &KeyValue) {
        let Some(id) = kv.key.strip_prefix(self.prefix.as_bytes()) else {
            return;
        };
        let Ok(id) = std::str::from_utf8(id) else {
            return;
        };
        let state = self.lock();
        let lost = match kind {
            EventType::Delete => {
                let revision = kv.mod_revision;
                if let Some(wake) = state.wakes.get(id) {
                    wake.send_if_modified(|v| {
                        let newer = revision > *v;
                        if newer {
                            *v = revision;
                        }
                        newer
                    });
                }
                state
                    .held
                    .get(id)
                    .is_some_and(|h| (h.token as i64) < revision)
            }
            // A key created after ours means ours is gone (a lagging watch
            // may still deliver older keys' events: those do not count).
            EventType::Put => state
                .held
                .get(id)
                .is_some_and(|h| kv.create_revision > h.token as i64),
        };
        if lost {
            let token = state.held.get(id).map(|h| h.token);
            drop(state);
            if let Some(token) = token {
                self.end_tenure(id, token);
            }
        }
    }

    /// Gathers the guardians' calls into transactions of at most
    /// [`MAX_OPS_PER_TXN`] operations, [`TXNS_IN_FLIGHT`] in flight at once.
    async fn batcher(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Op>) {
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
            let mut batch = Vec::new();
            let mut ids = HashSet::new();
            let mut later = VecDeque::new();
            while let Some(op) = queue.pop_front() {
                if batch.len() == MAX_OPS_PER_TXN {
                    later.push_back(op);
                    later.append(&mut queue);
                    break;
                }
                // One operation per key per transaction (etcd refuses
                // duplicates); a second one waits for the next.
                if ids.insert(op.id().clone()) {
                    batch.push(op);
                } else {
                    later.push_back(op);
                }
            }
            queue = later;
            let inner = self.clone();
            tokio::spawn(async move {
                inner.run_batch(batch).await;
                drop(permit);
            });
        }
    }

    /// One transaction: a nested transaction per claim (`create_revision ==
    /// 0` → put with the lease, else get the holder) and per release
    /// (`create_revision == token` → delete).
    async fn run_batch(self: &Arc<Self>, batch: Vec<Op>) {
        let lease = {
            let state = self.lock();
            if state.closed {
                drop(state);
                for op in batch {
                    op.fail(self.closed_error());
                }
                return;
            }
            state.lease
        };
        let mut pending = Vec::with_capacity(batch.len());
        let mut ops = Vec::with_capacity(batch.len());
        for op in batch {
            let key = self.key(op.id()).into_bytes();
            match &op {
                Op::Claim { budget, .. } => {
                    let usable_now =
                        lease.filter(|l| Instant::now() + self.interval < l.deadline(*budget));
                    let Some(lease) = usable_now else {
                        op.fail(Error::backend(crate::BackendErrorKind::Other, format!(
                            "no live etcd lease for this node ({}): reconnecting, claiming nothing meanwhile",
                            self.describe
                        )));
                        continue;
                    };
                    let put = PutRequest {
                        key: key.clone(),
                        value: self.node.clone().into_bytes(),
                        lease: lease.id,
                        ..PutRequest::default()
                    };
                    let get = RangeRequest {
                        key: key.clone(),
                        ..RangeRequest::default()
                    };
                    ops.push(op_txn(TxnRequest {
                        compare: vec![created_at(&key, 0)],
                        success: vec![one_op(request_op::Request::RequestPut(put))],
                        failure: vec![one_op(request_op::Request::RequestRange(get))],
                    }));
                }
                Op::Release { id, token, .. } => {
                    {
                        let mut state = self.lock();
                        if state.held.get(id).is_some_and(|h| h.token == *token) {
                            state.held.remove(id);
                        }
                    }
                    ops.push(op_txn(delete_if_created_at(&key, *token as i64)));
                }
            }
            pending.push(op);
        }
        if pending.is_empty() {
            return;
        }
        self.bump();
        let lease_id = lease.map(|l| l.id).unwrap_or_default();
        let txn = TxnRequest {
            compare: Vec::new(),
            success: ops,
            failure: Vec::new(),
        };
        let send = |c: Conn| {
            let request = c.request(txn.clone());
            async move { c.kv().txn(request).await }
        };
        let sent = self.request(send).await;
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => {
                        if lease_not_found(&e) {
                            self.lease_gone(lease_id);
                        }
                        reason(&e)
                    }
                    _ => format!("no answer within {:?}", self.request_timeout),
                };
                for op in pending {
                    op.fail(Error::backend(
                        crate::BackendErrorKind::Other,
                        format!("etcd ({}) cannot be asked now: {why}", self.describe),
                    ));
                }
                return;
            }
        };
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        for (op, answer) in pending.into_iter().zip(resp.responses) {
            let Some(response_op::Response::ResponseTxn(answer)) = answer.response else {
                op.fail(Error::backend(
                    crate::BackendErrorKind::Other,
                    "etcd answered a transaction with something else",
                ));
                continue;
            };
            match op {
                Op::Release { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                Op::Claim { id, budget, reply } => {
                    if answer.succeeded {
                        let _ = reply.send(self.granted(&id, budget, lease_id, revision as u64));
                        continue;
                    }
                    let kv = answer.responses.into_iter().find_map(|r| match r.response {
                        Some(response_op::Response::ResponseRange(range)) => {
                            range.kvs.into_iter().next()
                        }
                        _ => None,
                    });
                    let Some(kv) = kv else {
                        // Deleted between compare and get cannot happen in
                        // one transaction; answer "try again" anyway.
                        let _ = reply.send(Ok(Claim::Busy {
                            holder: None,
                            wake: Box::pin(async {}),
                        }));
                        continue;
                    };
                    let token = kv.create_revision;
                    let holder = Holder {
                        node: String::from_utf8_lossy(&kv.value).into_owned(),
                        token: Some(token as u64),
                    };
                    let stale = {
                        let state = self.lock();
                        state.ours.contains(&kv.lease)
                            && state.held.get(&id).is_none_or(|h| h.token != token as u64)
                    };
                    if stale {
                        // A key of a tenure this node already gave up (its
                        // lease was condemned, or a claim timed out after it
                        // was applied): delete it, then claim afresh so the
                        // new tenure gets a new token.
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
                        continue;
                    }
                    let wake = self.wake_after(&id, revision);
                    let _ = reply.send(Ok(Claim::Busy {
                        holder: Some(holder),
                        wake,
                    }));
                }
            }
        }
    }

    fn granted(&self, id: &Arc<str>, budget: Duration, lease_id: i64, token: u64) -> Result<Claim> {
        let mut state = self.lock();
        let lease = state.lease.filter(|l| l.id == lease_id && !state.closed);
        let Some(lease) = lease else {
            return Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "the etcd lease of this node ended while claiming `{id}`; retrying with a new one"
                ),
            ));
        };
        let budget_all = state.longest_budget().max(budget);
        if Instant::now() >= lease.deadline(budget_all) {
            return Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "the etcd lease of this node could not be kept alive while claiming `{id}`; retrying"
                ),
            ));
        }
        let (granted, signal) = Lease::new(token);
        state.held.insert(
            id.clone(),
            Held {
                token,
                budget,
                signal,
            },
        );
        drop(state);
        self.bump();
        Ok(Claim::Granted(granted))
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

    fn check_budget(&self, id: &str, budget: Duration) -> Result<()> {
        let ttl = Duration::from_secs(self.ttl_secs as u64);
        let needed = budget.saturating_add(self.interval.saturating_mul(2));
        if usable(ttl) < needed {
            let want = needed
                .saturating_add(MARGIN + ttl * CLOCK_RATE_PERCENT / 100)
                .as_secs()
                .saturating_add(2);
            return Err(Error::config(format!(
                "the shutdown budget {:?} of `{}` does not fit in the etcd lease TTL of {}s: the \
                 instance must stop within TTL − 1 % − {:?} of the last keep-alive, with room for \
                 keep-alives; raise the TTL to {want}s or more (?ttl= or Etcd::ttl) or shorten its shutdown",
                budget, id, self.ttl_secs, MARGIN
            )));
        }
        Ok(())
    }
}

impl Op {
    fn fail(self, error: Error) {
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

impl Session for EtcdSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.check_budget(&request.id, request.stop_budget)?;
            {
                let mut state = inner.lock();
                if state.closed {
                    return Err(inner.closed_error());
                }
                state
                    .wakes
                    .entry(request.id.clone())
                    .or_insert_with(|| watch::Sender::new(0));
            }
            let (reply, answer) = oneshot::channel();
            let op = Op::Claim {
                id: request.id,
                budget: request.stop_budget,
                reply,
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

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let prefix = self.inner.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
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

    /// Revokes every lease of this node: each key it still holds is deleted
    /// in one step, so a standby takes over on one watch event.
    fn lease_deadline(&self) -> Option<std::time::Instant> {
        self.inner.lock().deadline().map(|(_, at)| at.into_std())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            let leases: Vec<i64> = {
                let mut state = inner.lock();
                state.closed = true;
                state.end_all();
                state.lease = None;
                state.wakes.clear();
                state.ours.drain().collect()
            };
            inner.stop.cancel();
            for id in leases {
                match inner.revoke(id).await {
                    Ok(Ok(_)) => {
                        debug!(node = %inner.node, lease = format_args!("{id:x}"), "etcd lease revoked")
                    }
                    Ok(Err(e)) if lease_not_found(&e) => {}
                    Ok(Err(e)) => {
                        warn!(node = %inner.node, why = %reason(&e), "cannot revoke the etcd lease; it expires after its TTL")
                    }
                    Err(_) => {
                        warn!(node = %inner.node, "cannot revoke the etcd lease in time; it expires after its TTL")
                    }
                }
            }
        })
    }
}

/// The holder a lease key names: its value is the node, its create revision
/// the fencing token.
fn holder_of(kv: &KeyValue) -> Holder {
    Holder::new(
        String::from_utf8_lossy(&kv.value).into_owned(),
        Some(kv.create_revision as u64),
    )
}
