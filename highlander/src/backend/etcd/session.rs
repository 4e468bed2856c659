//! One node's etcd session: its lease and the one task that keeps it alive,
//! the watchdog that gives every tenure up before the server could expire
//! the lease, the one watch over the namespace, and the batcher that turns
//! the guardians' per-id calls into few transactions.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Etcd, host_port};
use crate::backend::{Backend, Claim, ClaimRequest, Holder, Lease, LeaseEnd, LeaseSignal, Session};
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

/// A one-line reason from an etcd client error.
fn reason(e: &etcd_client::Error) -> String {
    let text = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let message = s.message();
            if message.is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {message}", s.code())
            }
        }
        etcd_client::Error::TransportError(t) => {
            let mut text = t.to_string();
            let mut source = std::error::Error::source(t);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
        other => other.to_string(),
    };
    text.replace(['\n', '\r'], " ")
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("lease not found")
}

fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the etcd {what} {}: {e}",
            path.display()
        ))
    })
}

fn options(config: &Etcd) -> Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(config.connect_timeout.min(Duration::from_secs(2)));
    if let Some((user, password)) = &config.user {
        options = options
            .with_user(user.clone(), password.0.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &config.tls {
        let mut tls_options = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            tls_options =
                tls_options.ca_certificate(Certificate::from_pem(read_pem("CA certificate", ca)?));
        }
        if let Some((cert, key)) = &tls.identity {
            tls_options = tls_options.identity(Identity::from_pem(
                read_pem("client certificate", cert)?,
                read_pem("client key", key)?,
            ));
        }
        if let Some(domain) = &tls.domain {
            tls_options = tls_options.domain_name(domain.clone());
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

/// Whether a failed request says its member is out of reach: no answer in
/// time, or no connection at all. Such a member is avoided for a while.
fn out_of_reach<T>(
    outcome: &std::result::Result<
        std::result::Result<T, etcd_client::Error>,
        tokio::time::error::Elapsed,
    >,
) -> bool {
    match outcome {
        Err(_) => true,
        Ok(Err(e)) => refused(e),
        Ok(Ok(_)) => false,
    }
}

/// The member could not be connected to at all.
fn refused(e: &etcd_client::Error) -> bool {
    let why = reason(e);
    why.contains("tcp connect error") || why.contains("onnection refused")
}

/// Errors that retrying cannot fix.
fn terminal(why: &str) -> bool {
    [
        "authentication failed",
        "Unauthenticated",
        "PermissionDenied",
        "permission denied",
        "certificate",
    ]
    .iter()
    .any(|t| why.contains(t))
}

/// Runs `attempt` until it succeeds, fails for good, or `deadline` passes;
/// each attempt gets a third of the time at most, so one member that hangs
/// or refuses does not decide the outcome while others may answer.
async fn at_start<T, F, Fut>(
    deadline: Instant,
    limit: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let per_attempt = (limit / 3).max(Duration::from_millis(500));
    let mut retry = RETRY_MIN;
    let mut last: Option<String> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(match last {
                Some(why) => format!("{why} (still failing after {limit:?})"),
                None => format!("no answer within {limit:?}"),
            });
        }
        match timeout(left.min(per_attempt), attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => {
                let why = reason(&e);
                if terminal(&why) {
                    return Err(why);
                }
                last = Some(why);
            }
            Err(_) => {}
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
    let unreachable = |why: String| {
        let tls_like = [
            "certificate",
            "Cancelled",
            "tls",
            "TLS",
            "handshake",
            "transport error",
        ];
        if tls_like.iter().any(|t| why.contains(t)) && !why.contains("onnection refused") {
            return Error::Backend(format!(
                "cannot reach etcd at {shown} ({describe}): {why} (a TLS mismatch? use etcds:// \
                 for a TLS server, with ca= its CA and cert=/key= when it requires client \
                 certificates)"
            ));
        }
        Error::Backend(format!("cannot reach etcd at {shown} ({describe}): {why}"))
    };
    let ttl_secs = config.ttl_secs();
    let interval = config.keepalive_in_effect();
    let request_timeout = (Duration::from_secs(ttl_secs as u64) / 4)
        .clamp(Duration::from_millis(500), Duration::from_secs(3));
    // HTTP/2 pings on every connection: a member that hangs with its
    // connections open (paused, overloaded) gets its connections closed, so
    // streams on it (the watch, a keep-alive) break and reopen elsewhere
    // instead of going quiet.
    let options = options(&config)?.with_keep_alive(interval, request_timeout);
    let connected = at_start(deadline, limit, || {
        Client::connect(&endpoints, Some(options.clone()))
    })
    .await;
    let client = match connected {
        Ok(client) => client,
        Err(why) if why.contains("authentication failed") || why.contains("Unauthenticated") => {
            let user = config.user.as_ref().map(|(u, _)| u.as_str()).unwrap_or("");
            return Err(Error::Config(format!(
                "etcd at {shown} refused user `{user}` ({describe}): {why}"
            )));
        }
        Err(why) => return Err(unreachable(why)),
    };
    let prefix = format!("/{}/", config.namespace);
    let first = at_start(deadline, limit, || {
        let mut kv = client.kv_client();
        let prefix = prefix.clone();
        async move {
            let options = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(1);
            kv.get(prefix, Some(options)).await
        }
    })
    .await;
    let revision = match first {
        Ok(resp) => resp.header().map(|h| h.revision()).unwrap_or(0),
        Err(why) if why.contains("PermissionDenied") || why.contains("permission denied") => {
            return Err(Error::Config(format!(
                "etcd at {shown} does not let this user read and write `{prefix}` ({describe}): {why}"
            )));
        }
        Err(why) => return Err(unreachable(why)),
    };
    let members = Members::new(
        client,
        endpoints,
        options,
        Duration::from_secs(ttl_secs.max(1) as u64),
    );
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
    let mut sent = Instant::now();
    let granted = at_start(deadline, limit, || {
        let mut leases = inner.members.shared.lease_client();
        sent = Instant::now();
        async move { leases.grant(ttl_secs, None).await }
    })
    .await;
    match granted {
        Ok(resp) => inner.install_lease(resp.id(), resp.ttl(), sent),
        Err(why) => return Err(unreachable(why)),
    }
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

/// The members, each reached through a client of its own. The shared client
/// of `etcd-client` picks a member at random per request, so a member that
/// hangs with its connections open (paused, overloaded) would take a share of
/// every kind of request, each lost for a whole request timeout. Here each
/// use stays on a member that answers, moves to the next one after a
/// failure, and avoids a member that left a request unanswered.
struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// The shared client: used as is when there is a single endpoint.
    shared: Client,
    /// How long a member that did not answer is avoided.
    avoid_for: Duration,
    state: Mutex<MembersState>,
}

struct MembersState {
    clients: Vec<Option<Client>>,
    avoid_until: Vec<Option<Instant>>,
    /// The current member of each [`Use`].
    at: [usize; 3],
}

impl Members {
    fn new(
        shared: Client,
        endpoints: Vec<String>,
        options: ConnectOptions,
        ttl: Duration,
    ) -> Members {
        let n = endpoints.len().max(1);
        Members {
            endpoints,
            options,
            shared,
            avoid_for: ttl,
            state: Mutex::new(MembersState {
                clients: vec![None; n],
                avoid_until: vec![None; n],
                at: [0; 3],
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MembersState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn several(&self) -> bool {
        self.endpoints.len() > 1
    }

    /// The client of `use_`'s current member, connecting on first use;
    /// `None` when that member cannot be reached within `limit`.
    async fn client(&self, use_: Use, limit: Duration) -> Option<Client> {
        if !self.several() {
            return Some(self.shared.clone());
        }
        let (at, existing) = {
            let state = self.lock();
            let at = state.at[use_ as usize];
            (at, state.clients[at].clone())
        };
        if existing.is_some() {
            return existing;
        }
        let endpoint = [self.endpoints[at].clone()];
        let connect = Client::connect(endpoint, Some(self.options.clone()));
        let client = timeout(limit, connect).await.ok()?.ok()?;
        let mut state = self.lock();
        Some(state.clients[at].get_or_insert(client).clone())
    }

    /// `use_`'s current member failed a request: move that use to another
    /// member, one not avoided when there is one. `silent` (no answer, or
    /// no connection) also makes every use avoid that member for a while,
    /// and drops its connection so that a later use reconnects.
    fn failed(&self, use_: Use, silent: bool) {
        if !self.several() {
            return;
        }
        let mut state = self.lock();
        let n = state.clients.len();
        let at = state.at[use_ as usize];
        if silent {
            state.avoid_until[at] = Some(Instant::now() + self.avoid_for);
            state.clients[at] = None;
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
        Error::Backend(format!("the etcd session ({}) is closed", self.describe))
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
            let send = |c: Client| async move { c.lease_client().revoke(lease.id).await };
            match self.request(send).await {
                Ok(Ok(_)) => break,
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

    /// The one keep-alive task: grants the node's lease when it has none,
    /// keeps it alive every `interval` over one stream, and reopens the
    /// stream (on another endpoint when one is down) with backoff.
    async fn keeper(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        let mut retry = RETRY_MIN;
        'outer: while !self.stop.is_cancelled() {
            let Some(client) = self
                .members
                .client(Use::KeepAlive, self.request_timeout)
                .await
            else {
                debug!(node = %self.node, retry_in = ?retry, "cannot connect to this etcd member; trying the next");
                self.members.failed(Use::KeepAlive, true);
                if !self.pause(retry).await {
                    break;
                }
                retry = (retry * 2).min(self.interval.max(RETRY_MIN));
                continue;
            };
            let mut leases = client.lease_client();
            let current = self.lock().lease;
            let Some(lease) = current else {
                let sent = Instant::now();
                let grant = leases.grant(self.ttl_secs, None);
                match timeout(self.request_timeout, grant).await {
                    Ok(Ok(resp)) if resp.ttl() > 0 => {
                        self.install_lease(resp.id(), resp.ttl(), sent);
                        retry = RETRY_MIN;
                    }
                    outcome => {
                        self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                        let why = match outcome {
                            Ok(Err(e)) => reason(&e),
                            Ok(Ok(_)) => "granted with no TTL".into(),
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
            let sent = Instant::now();
            let opened = tokio::select! {
                _ = self.stop.cancelled() => break,
                opened = timeout(self.request_timeout, leases.keep_alive(lease.id)) => opened,
            };
            let (mut keeper, mut stream) = match opened {
                Ok(Ok(pair)) => {
                    self.renewed(lease.id, sent, None);
                    retry = RETRY_MIN;
                    pair
                }
                Ok(Err(e)) if lease_not_found(&e) => {
                    self.lease_gone(lease.id);
                    continue;
                }
                outcome => {
                    self.members.failed(Use::KeepAlive, out_of_reach(&outcome));
                    let why = match outcome {
                        Ok(Err(e)) => reason(&e),
                        _ => "timed out".into(),
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
                if keeper.keep_alive().await.is_err() {
                    self.members.failed(Use::KeepAlive, false);
                    continue 'outer;
                }
                let answer = tokio::select! {
                    _ = self.stop.cancelled() => break 'outer,
                    answer = timeout(self.request_timeout, stream.message()) => answer,
                };
                match answer {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        self.renewed(lease.id, sent, Some(resp.ttl()))
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

    /// One request through `Use::Request`'s member, within the request
    /// timeout. A member that does not answer, or cannot be reached, moves
    /// the next request elsewhere; a request the transport could not deliver
    /// (nothing reached etcd, so nothing can have been applied) is sent
    /// once more to the next member. `Err` is a timeout.
    async fn request<T, F, Fut>(
        &self,
        mut send: F,
    ) -> Result<std::result::Result<T, etcd_client::Error>, tokio::time::error::Elapsed>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut tries = if self.members.several() { 2 } else { 1 };
        loop {
            tries -= 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = async {
                match self.members.client(Use::Request, left).await {
                    Some(client) => Some(send(client).await),
                    None => None,
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
            if let Ok(Err(e)) = &outcome {
                let undelivered = matches!(e, etcd_client::Error::TransportError(_))
                    || reason(e).contains("Unavailable");
                if undelivered {
                    self.members.failed(Use::Request, refused(e));
                    if tries > 0 {
                        continue;
                    }
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
        while !self.stop.is_cancelled() {
            let Some(client) = self.members.client(Use::Watch, self.request_timeout).await else {
                self.members.failed(Use::Watch, true);
                if !self.pause(retry).await {
                    return;
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            };
            let mut watches = client.watch_client();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(next)
                .with_progress_notify();
            let opened = tokio::select! {
                _ = self.stop.cancelled() => return,
                opened = timeout(self.request_timeout, watches.watch(self.prefix.clone(), Some(options))) => opened,
            };
            let mut stream = match opened {
                Ok(Ok(stream)) => stream,
                outcome => {
                    self.members.failed(Use::Watch, out_of_reach(&outcome));
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
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                next = self.after_compaction(resp.compact_revision()).await;
                            }
                            debug!(node = %self.node, reason = resp.cancel_reason(), "etcd watch canceled; reopening");
                            break;
                        }
                        for event in resp.events() {
                            if let Some(kv) = event.kv() {
                                next = next.max(kv.mod_revision() + 1);
                                self.on_event(event.event_type(), kv);
                            }
                        }
                        if resp.events().is_empty()
                            && !resp.created()
                            && let Some(header) = resp.header()
                        {
                            next = next.max(header.revision() + 1);
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
            if !self.pause(retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
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

    fn on_event(&self, kind: EventType, kv: &etcd_client::KeyValue) {
        let Some(id) = kv.key().strip_prefix(self.prefix.as_bytes()) else {
            return;
        };
        let Ok(id) = std::str::from_utf8(id) else {
            return;
        };
        let mut state = self.lock();
        let lost = match kind {
            EventType::Delete => {
                let revision = kv.mod_revision();
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
                .is_some_and(|h| kv.create_revision() > h.token as i64),
        };
        if lost && let Some(held) = state.held.remove(id) {
            held.signal.end(LeaseEnd::Lost);
            drop(state);
            warn!(node = %self.node, id, token = held.token, "the key of a held id was deleted or replaced in etcd: tenure ended");
            self.bump();
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
            let key = self.key(op.id());
            match &op {
                Op::Claim { budget, .. } => {
                    let usable_now =
                        lease.filter(|l| Instant::now() + self.interval < l.deadline(*budget));
                    let Some(lease) = usable_now else {
                        op.fail(Error::Backend(format!(
                            "no live etcd lease for this node ({}): reconnecting, claiming nothing meanwhile",
                            self.describe
                        )));
                        continue;
                    };
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                            .and_then([TxnOp::put(
                                key.clone(),
                                self.node.clone(),
                                Some(PutOptions::new().with_lease(lease.id)),
                            )])
                            .or_else([TxnOp::get(key, None)]),
                    ));
                }
                Op::Release { id, token, .. } => {
                    {
                        let mut state = self.lock();
                        if state.held.get(id).is_some_and(|h| h.token == *token) {
                            state.held.remove(id);
                        }
                    }
                    ops.push(TxnOp::txn(
                        Txn::new()
                            .when([Compare::create_revision(
                                key.clone(),
                                CompareOp::Equal,
                                *token as i64,
                            )])
                            .and_then([TxnOp::delete(key, None)]),
                    ));
                }
            }
            pending.push(op);
        }
        if pending.is_empty() {
            return;
        }
        self.bump();
        let lease_id = lease.map(|l| l.id).unwrap_or_default();
        let send = |c: Client| {
            let txn = Txn::new().and_then(ops.clone());
            async move { c.kv_client().txn(txn).await }
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
                    op.fail(Error::Backend(format!(
                        "etcd ({}) cannot be asked now: {why}",
                        self.describe
                    )));
                }
                return;
            }
        };
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let answers = resp.op_responses();
        for (op, answer) in pending.into_iter().zip(answers) {
            let TxnOpResponse::Txn(answer) = answer else {
                op.fail(Error::Backend(
                    "etcd answered a transaction with something else".into(),
                ));
                continue;
            };
            match op {
                Op::Release { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                Op::Claim { id, budget, reply } => {
                    if answer.succeeded() {
                        let _ = reply.send(self.granted(&id, budget, lease_id, revision as u64));
                        continue;
                    }
                    let kv = answer.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
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
                    let token = kv.create_revision();
                    let holder = Holder {
                        node: String::from_utf8_lossy(kv.value()).into_owned(),
                        token: Some(token as u64),
                    };
                    let stale = {
                        let state = self.lock();
                        state.ours.contains(&kv.lease())
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
            return Err(Error::Backend(format!(
                "the etcd lease of this node ended while claiming `{id}`; retrying with a new one"
            )));
        };
        let budget_all = state.longest_budget().max(budget);
        if Instant::now() >= lease.deadline(budget_all) {
            return Err(Error::Backend(format!(
                "the etcd lease of this node could not be kept alive while claiming `{id}`; retrying"
            )));
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
        let key = self.key(id);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                token,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let send = |c: Client| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        };
        match self.request(send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Backend(format!(
                "etcd ({}) cannot be asked now: {}",
                self.describe,
                reason(&e)
            ))),
            Err(_) => Err(Error::Backend(format!(
                "etcd ({}) cannot be asked now: no answer within {:?}",
                self.describe, self.request_timeout
            ))),
        }
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

    fn check_budget(&self, request: &ClaimRequest) -> Result<()> {
        let ttl = Duration::from_secs(self.ttl_secs as u64);
        let needed = request.stop_budget + self.interval * 2;
        if usable(ttl) < needed {
            let want = (needed + MARGIN + ttl * CLOCK_RATE_PERCENT / 100).as_secs() + 2;
            return Err(Error::Config(format!(
                "the shutdown budget {:?} of `{}` does not fit in the etcd lease TTL of {}s: the \
                 instance must stop within TTL − 1 % − {:?} of the last keep-alive, with room for \
                 keep-alives; raise the TTL to {want}s or more (?ttl= or Etcd::ttl) or shorten its shutdown",
                request.stop_budget, request.id, self.ttl_secs, MARGIN
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
            inner.check_budget(&request)?;
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
        let key = self.inner.key(id);
        Box::pin(async move {
            let inner = &self.inner;
            let send = |c: Client| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            };
            match inner.request(send).await {
                Ok(Ok(resp)) => Ok(resp.kvs().first().map(|kv| Holder {
                    node: String::from_utf8_lossy(kv.value()).into_owned(),
                    token: Some(kv.create_revision() as u64),
                })),
                Ok(Err(e)) => Err(Error::Backend(format!(
                    "etcd ({}) cannot be asked now: {}",
                    inner.describe,
                    reason(&e)
                ))),
                Err(_) => Err(Error::Backend(format!(
                    "etcd ({}) cannot be asked now: no answer within {:?}",
                    inner.describe, inner.request_timeout
                ))),
            }
        })
    }

    /// Revokes every lease of this node: each key it still holds is deleted
    /// in one step, so a standby takes over on one watch event.
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
                let send = |c: Client| async move { c.lease_client().revoke(id).await };
                match inner.request(send).await {
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
