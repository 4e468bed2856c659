//! One node's session: a single connection, driven by one task that batches
//! claims and releases, listens for releases, probes the holders it waits
//! on, and ends every tenure before the server could hand it to another
//! node.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::future::{Future, poll_fn};
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::keys::lock_key;
use super::{MAX_SERVER_TIMEOUT, Settings, Timing, sql};
use crate::backend::{
    Claim, ClaimRequest, HeldId, Holder, Lease, LeaseEnd, LeaseSignal, Member, Session,
};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Connecting, authenticating and preparing must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// The server aborts any of our statements that runs longer, so a stuck
/// statement cannot hold the heartbeats queued behind it past the deadline.
const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// The client socket's `TCP_USER_TIMEOUT`: as long as the longest
/// dead-peer detection a session can ask the server for, so that the
/// client's kernel never gives up on the connection before the server
/// could. The session closes the connection itself (see `drive`).
const CLIENT_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
/// While a claim is in flight, at most this many owners' releases and
/// deaths are remembered one by one; past it, every owner counts as moved
/// (waiters retry once for nothing, nothing is missed).
const MAX_EVENTS: usize = 4_096;
/// A notification longer than this is not ours: ignored.
const MAX_PAYLOAD: usize = 8_000;
/// Releases name their keys only when they are at most this many.
const MAX_PAYLOAD_KEYS: usize = 300;
/// Parsed releases queued between the connection task and the driver; past
/// this the task drops them and the driver wakes every waiter instead.
const RELEASE_QUEUE: usize = 1_024;
/// A claim that found its row free but did not get it is retried this
/// many times at once before it waits a probe interval.
const FREE_RETRIES: u8 = 3;

pub(crate) struct PgSession {
    inner: Arc<Inner>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    settings: Arc<Settings>,
    node: String,
    state: Mutex<State>,
    /// Wakes the driver: new claims or releases are pending.
    kick: Notify,
    /// Cancelled by `close` (and on drop): the driver stops.
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Set while connected: what `holder` and `members` use.
    live: Option<LiveInfo>,
    /// Why the session is not connected, for errors while disconnected.
    last_error: Option<String>,
    claims: Vec<PendingClaim>,
    releases: Vec<PendingRelease>,
    /// Tenures of this node, by lock key.
    held: HashMap<i64, Held>,
    /// Waiting claims, by the owner (presence number) that holds their id.
    waiters: HashMap<i32, Vec<(i64, oneshot::Sender<()>)>>,
    /// While a claim is in flight: the sequence number of the last release
    /// or death seen per owner since it was sent (at most [`MAX_EVENTS`]).
    events: HashMap<i32, u64>,
    /// More owners moved than `events` holds: treat every owner as moved.
    events_overflow: bool,
    /// A claim batch is in flight (only then are `events` kept).
    claim_in_flight: bool,
    seq: u64,
    /// While this node holds ids: when it must give them all up unless a
    /// round trip succeeds first (published by the driver on every turn).
    deadline: Option<Instant>,
    /// Keys whose row is known to exist (rows are never deleted).
    known: HashSet<i64>,
}

impl State {
    /// Whether `owner` released or died after a claim sent at `seq0`.
    fn owner_moved(&self, owner: i32, seq0: u64) -> bool {
        self.events_overflow || self.events.get(&owner).is_some_and(|&s| s > seq0)
    }
}

#[derive(Clone)]
struct LiveInfo {
    client: Arc<Client>,
    stmts: Arc<Statements>,
}

struct Held {
    token: u64,
    signal: LeaseSignal,
}

struct PendingClaim {
    id: Arc<str>,
    key: i64,
    budget: Duration,
    reply: oneshot::Sender<Result<Claim>>,
    retries: u8,
}

struct PendingRelease {
    keys: Vec<i64>,
    reply: Option<oneshot::Sender<Result<()>>>,
    failures: u8,
}

struct Statements {
    insert: Statement,
    claim: Statement,
    status: Statement,
    probe: Statement,
    release: Statement,
    holder: Statement,
    members: Statement,
}

/// One connection's lifetime ("epoch"): everything granted in it ends
/// with it.
struct Live {
    client: Arc<Client>,
    stmts: Arc<Statements>,
    /// This session's presence number: it holds `(namespace_key, me)`.
    me: i32,
    conn: ConnTask,
    releases: Releases,
    /// The server's dead-peer detection in force for this session.
    x: Duration,
    /// Send time of the latest successful round trip, and the detection in
    /// force when it was sent.
    last_ok: Instant,
    last_ok_x: Duration,
}

impl Live {
    fn note_ok(&mut self, sent: Instant, x: Duration) {
        if sent > self.last_ok {
            self.last_ok = sent;
            self.last_ok_x = x;
        }
    }

    fn deadline(&self, timing: &Timing, budget: Duration) -> Instant {
        self.last_ok + timing.vouch(self.last_ok_x, budget)
    }
}

/// A release heard on the namespace's channel: the owner, and the keys it
/// released when it named them.
type Release = (i32, Option<HashSet<i64>>);

/// The releases the connection task hears, parsed, in a bounded queue.
/// When the driver falls behind (a flood of notifications, which any role
/// may send), the task drops them and raises `lost`, and the driver wakes
/// every waiter instead: a few retries for nothing, no missed wake-up, and
/// no memory growing with the flood.
struct Releases {
    rx: mpsc::Receiver<Release>,
    lost: Arc<Lost>,
}

#[derive(Default)]
struct Lost {
    flag: AtomicBool,
    notify: Notify,
}

/// The task that drives the connection; aborted (closing the socket) when
/// dropped.
struct ConnTask(JoinHandle<String>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why connecting failed, and whether retrying can help.
struct ConnectError {
    message: String,
    fatal: bool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection now, or why there is none.
    fn live(&self) -> Result<LiveInfo> {
        let st = self.lock();
        st.live.clone().ok_or_else(|| self.not_connected(&st))
    }

    fn not_connected(&self, st: &State) -> Error {
        Error::backend(
            crate::BackendErrorKind::Other,
            match &st.last_error {
                Some(why) => format!("not connected to postgres ({why})"),
                None => format!("not connected to postgres at {}", self.settings.target),
            },
        )
    }
}

impl PgSession {
    /// Connects once: configuration errors (bad credentials, missing
    /// database, refused TLS) fail here; an unreachable server is retried
    /// in the background, one log line per attempt, while claims fail.
    pub(crate) async fn connect(settings: Arc<Settings>, node: String) -> Result<PgSession> {
        let inner = Arc::new(Inner {
            settings,
            node,
            state: Mutex::new(State::default()),
            kick: Notify::new(),
            stop: CancellationToken::new(),
        });
        let first = match open(&inner).await {
            Ok(live) => {
                // Connected from the first moment: claims and lookups made
                // right after start-up must not find the session "not
                // connected" while the driver task is being scheduled.
                inner.lock().live = Some(LiveInfo {
                    client: live.client.clone(),
                    stmts: live.stmts.clone(),
                });
                info!(node = %inner.node, backend = %inner.settings.describe, owner = live.me, "connected to postgres");
                Some(live)
            }
            Err(e) if e.fatal => {
                return Err(Error::backend(crate::BackendErrorKind::Other, e.message));
            }
            Err(e) => {
                warn!(node = %inner.node, "{}; retrying in {RECONNECT_MIN:?} (attempt 1)", e.message);
                inner.lock().last_error = Some(e.message);
                None
            }
        };
        let driver = tokio::spawn(drive(inner.clone(), first));
        Ok(PgSession {
            inner,
            driver: Mutex::new(Some(driver)),
        })
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Some(driver) = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take() {
            driver.abort();
        }
    }
}

impl Session for PgSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, &request.id);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.lock();
            if st.live.is_none() {
                let err = inner.not_connected(&st);
                return Box::pin(async move { Err(err) });
            }
            st.claims.push(PendingClaim {
                id: request.id,
                key,
                budget: request.stop_budget,
                reply: tx,
                retries: 0,
            });
        }
        inner.kick.notify_one();
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(Error::backend(
                    crate::BackendErrorKind::Other,
                    format!(
                        "postgres at {}: the connection was lost while claiming",
                        inner.settings.target
                    ),
                ))
            })
        })
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, id);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.lock();
            match st.held.get(&key) {
                Some(h) if h.token == token => {
                    st.held.remove(&key);
                }
                _ => return Box::pin(async { Ok(()) }),
            }
            if st.live.is_none() {
                // The session that held it is gone: the server frees it.
                return Box::pin(async { Ok(()) });
            }
            st.releases.push(PendingRelease {
                keys: vec![key],
                reply: Some(tx),
                failures: 0,
            });
        }
        inner.kick.notify_one();
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let inner = &self.inner;
        let key = lock_key(&inner.settings.namespace, id);
        let live = inner.live();
        Box::pin(async move {
            let live = live?;
            let ns = i64::from(inner.settings.namespace_key as u32);
            let rows = live
                .client
                .query(&live.stmts.holder, &[&key, &ns])
                .await
                .map_err(|e| query_error(&inner.settings, "holder lookup", &e))?;
            Ok(rows
                .first()
                .map(|row| holder_of(row.get(0), row.get(1), row.get(2))))
        })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        let inner = &self.inner;
        let live = inner.live();
        Box::pin(async move {
            let live = live?;
            let ns = i64::from(inner.settings.namespace_key as u32);
            let rows = live
                .client
                .query(&live.stmts.members, &[&ns])
                .await
                .map_err(|e| query_error(&inner.settings, "member lookup", &e))?;
            let mut members: Vec<Member> = rows
                .iter()
                .map(|row| Member {
                    node: row.get::<_, Option<String>>(0).unwrap_or_default(),
                    reachable: true,
                    address: row.get(1),
                })
                .collect();
            members.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(members)
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let inner = &self.inner;
        let live = inner.live();
        Box::pin(async move {
            let live = live?;
            let ns = i64::from(inner.settings.namespace_key as u32);
            let rows = live
                .client
                .query(sql::HOLDERS, &[&inner.settings.namespace, &ns])
                .await
                .map_err(|e| query_error(&inner.settings, "holder listing", &e))?;
            Ok(rows
                .iter()
                .map(|row| {
                    HeldId::new(
                        row.get::<_, String>(0),
                        holder_of(row.get(1), row.get(2), row.get(3)),
                        row.get::<_, Option<SystemTime>>(4),
                    )
                })
                .collect())
        })
    }

    fn lease_deadline(&self) -> Option<std::time::Instant> {
        let st = self.inner.lock();
        match (&st.live, st.deadline) {
            (Some(_), Some(at)) if !st.held.is_empty() => Some(at.into_std()),
            _ => None,
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            let rx = {
                let mut st = inner.lock();
                let keys: Vec<i64> = st.held.keys().copied().collect();
                if st.live.is_some() && !keys.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    st.releases.push(PendingRelease {
                        keys,
                        reply: Some(tx),
                        failures: 0,
                    });
                    Some(rx)
                } else {
                    None
                }
            };
            inner.kick.notify_one();
            if let Some(rx) = rx {
                let _ = timeout(Duration::from_secs(5), rx).await;
            }
            inner.stop.cancel();
            let driver = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(driver) = driver {
                let _ = timeout(Duration::from_secs(5), driver).await;
            }
            let mut st = inner.lock();
            for (_, held) in st.held.drain() {
                held.signal.end(LeaseEnd::Lost);
            }
        })
    }
}

/// The driver: connect, run an epoch until the connection is lost, end
/// every tenure, reconnect with backoff. Until it is stopped.
async fn drive(inner: Arc<Inner>, mut first: Option<Live>) {
    let mut backoff = RECONNECT_MIN;
    let mut attempt: u32 = u32::from(first.is_none());
    if first.is_none() {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
    loop {
        let mut live = match first.take() {
            Some(live) => live,
            None => {
                let opened = tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    opened = open(&inner) => opened,
                };
                match opened {
                    Ok(live) => {
                        info!(node = %inner.node, backend = %inner.settings.describe, owner = live.me, "connected to postgres");
                        live
                    }
                    Err(e) => {
                        attempt += 1;
                        warn!(node = %inner.node, "{}; retrying in {backoff:?} (attempt {attempt})", e.message);
                        inner.lock().last_error = Some(e.message);
                        tokio::select! {
                            _ = inner.stop.cancelled() => return,
                            _ = sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                        continue;
                    }
                }
            }
        };
        backoff = RECONNECT_MIN;
        attempt = 0;
        {
            let mut st = inner.lock();
            st.live = Some(LiveInfo {
                client: live.client.clone(),
                stmts: live.stmts.clone(),
            });
            st.last_error = None;
        }
        let Ended { why, drain } = run_epoch(&inner, &mut live).await;
        lose(&inner, &why);
        if inner.stop.is_cancelled() {
            // Graceful: let the connection say goodbye (Terminate) before
            // the socket closes.
            let Live {
                client,
                stmts,
                mut conn,
                ..
            } = live;
            drop((client, stmts));
            let _ = timeout(Duration::from_secs(1), &mut conn.0).await;
            return;
        }
        warn!(node = %inner.node, "lost the postgres session ({why}): every tenure of this node has ended; reconnecting");
        if !drain.is_zero() {
            // This node gave up while its session may still be alive on the
            // server. Keep the connection (and so its ids) until the
            // instances have had their stop budget: closing it now would let
            // another node start before they stopped.
            tokio::select! {
                _ = inner.stop.cancelled() => {}
                _ = &mut live.conn.0 => {}
                _ = sleep(drain) => {}
            }
        }
        drop(live);
    }
}

/// Ends the epoch: every tenure is lost, every waiting claim and waiter is
/// woken (to find the session disconnected).
fn lose(inner: &Inner, why: &str) {
    let mut st = inner.lock();
    st.live = None;
    st.last_error = Some(format!("postgres at {}: {why}", inner.settings.target));
    for (_, held) in st.held.drain() {
        held.signal.end(LeaseEnd::Lost);
    }
    let err = format!("postgres at {}: {why}", inner.settings.target);
    for claim in st.claims.drain(..) {
        let _ = claim.reply.send(Err(Error::backend(
            crate::BackendErrorKind::Other,
            err.clone(),
        )));
    }
    for release in st.releases.drain(..) {
        if let Some(reply) = release.reply {
            let _ = reply.send(Ok(()));
        }
    }
    st.waiters.clear();
    st.events.clear();
    st.events_overflow = false;
    st.claim_in_flight = false;
    st.seq += 1;
}

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

async fn maybe<T>(fut: &mut Pending<T>) -> T {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// What a sent claim batch returned: the send time, the granted rows and
/// the status rows; `None` when nothing was sent.
type ClaimResult = std::result::Result<
    Option<(Instant, Vec<tokio_postgres::Row>, Vec<tokio_postgres::Row>)>,
    tokio_postgres::Error,
>;

struct ClaimDone {
    /// The claims sent (none when the raise they all needed failed).
    batch: Vec<PendingClaim>,
    /// Claims not sent because the raise of the server's timeout their
    /// budget needed failed, and why.
    refused: Vec<PendingClaim>,
    raise_error: Option<(Duration, tokio_postgres::Error)>,
    seq0: u64,
    /// The server timeout in force when the claims were sent.
    x: Duration,
    /// Set only when the server took the raise.
    raised: Option<Duration>,
    result: ClaimResult,
}

struct ReleaseDone {
    batch: Vec<PendingRelease>,
    x: Duration,
    result: std::result::Result<Instant, tokio_postgres::Error>,
}

struct ProbeDone {
    x: Duration,
    sent: Instant,
    result: std::result::Result<Vec<i32>, tokio_postgres::Error>,
}

/// How an epoch ended: why, and how long to keep the connection open
/// before closing it (zero when the server already ended the session, or
/// on a graceful close).
struct Ended {
    why: String,
    drain: Duration,
}

/// Runs one connection until it is lost.
async fn run_epoch(inner: &Arc<Inner>, live: &mut Live) -> Ended {
    let timing = inner.settings.timing;
    let mut claim: Pending<ClaimDone> = None;
    let mut release: Pending<ReleaseDone> = None;
    let mut probe: Pending<ProbeDone> = None;
    let mut last_probe = Instant::now();
    // The largest stop budget of the tenures granted in this epoch.
    let mut budget = Duration::ZERO;
    loop {
        if claim.is_none() {
            claim = start_claims(inner, live);
        }
        if release.is_none() {
            release = start_releases(inner, live);
        }
        let deadline = live.deadline(&timing, budget);
        let waiting = {
            let mut st = inner.lock();
            st.deadline = (!st.held.is_empty()).then_some(deadline);
            !st.waiters.is_empty()
        };
        let probe_at = last_probe
            + if waiting {
                timing.poll
            } else {
                timing.heartbeat
            };
        let given_up = |why: String, budget: Duration| Ended {
            why,
            drain: budget + timing.margin,
        };
        tokio::select! {
            biased;
            _ = inner.stop.cancelled() => {
                return Ended { why: "the session was closed".to_string(), drain: Duration::ZERO };
            }
            _ = sleep_until(deadline) => {
                return given_up(format!(
                    "no answer for {:?} since the last successful round trip: this node can no longer vouch that it still holds its ids",
                    Instant::now().duration_since(live.last_ok)
                ), budget);
            }
            why = &mut live.conn.0 => {
                let why = why.unwrap_or_else(|e| format!("the connection task failed: {e}"));
                return Ended { why, drain: Duration::ZERO };
            }
            done = maybe(&mut claim) => {
                claim = None;
                if let Err(why) = finish_claims(inner, live, done, &mut budget) {
                    return given_up(why, budget);
                }
            }
            done = maybe(&mut release) => {
                release = None;
                if let Err(why) = finish_releases(inner, live, done) {
                    return given_up(why, budget);
                }
            }
            done = maybe(&mut probe) => {
                probe = None;
                finish_probe(inner, live, done);
            }
            Some((owner, keys)) = live.releases.rx.recv() => {
                // A forged release (any role may NOTIFY) only makes the
                // named owner's waiters retry once.
                if owner != live.me {
                    owner_changed(&mut inner.lock(), owner, keys.as_ref());
                }
            }
            _ = live.releases.lost.notify.notified() => {
                if live.releases.lost.flag.swap(false, Ordering::AcqRel) {
                    debug!(node = %inner.node, "notifications were dropped: every waiter retries");
                    wake_all(&mut inner.lock());
                }
            }
            _ = sleep_until(probe_at), if probe.is_none() => {
                last_probe = Instant::now();
                probe = Some(start_probe(inner, live));
            }
            _ = inner.kick.notified() => {}
        }
    }
}

/// A release's notification: `owner`, or `owner:key,key,…` (at most
/// [`MAX_PAYLOAD_KEYS`] keys) when it released a few ids. `None` for
/// anything else.
fn parse_release(payload: &str) -> Option<(i32, Option<HashSet<i64>>)> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let (owner, keys) = match payload.split_once(':') {
        Some((owner, keys)) => (owner, Some(keys)),
        None => (payload, None),
    };
    let owner: i32 = owner.parse().ok()?;
    let keys = match keys {
        None => None,
        Some(keys) => {
            let keys: Vec<&str> = keys.split(',').collect();
            if keys.len() > MAX_PAYLOAD_KEYS {
                return None;
            }
            Some(
                keys.into_iter()
                    .map(|k| k.parse::<i64>().ok())
                    .collect::<Option<HashSet<i64>>>()?,
            )
        }
    };
    Some((owner, keys))
}

/// Releases may have been missed: every waiter retries, and so does the
/// claim in flight for any id it finds held.
fn wake_all(st: &mut State) {
    let owners: Vec<i32> = st.waiters.keys().copied().collect();
    for owner in owners {
        owner_changed(st, owner, None);
    }
    if st.claim_in_flight {
        st.events_overflow = true;
    }
}

/// Something happened to `owner`: it released `keys` (or some ids, when
/// `None`), or its session ended (`None`). Wakes the claims waiting on
/// those ids.
fn owner_changed(st: &mut State, owner: i32, keys: Option<&HashSet<i64>>) {
    st.seq += 1;
    let seq = st.seq;
    // The claim in flight, if it saw this owner, retries at once (at worst
    // once for nothing, when it released other ids). Only that claim reads
    // these, so nothing is kept while none is in flight, and never more
    // than MAX_EVENTS owners.
    if st.claim_in_flight {
        if st.events.len() < MAX_EVENTS || st.events.contains_key(&owner) {
            st.events.insert(owner, seq);
        } else {
            st.events_overflow = true;
        }
    }
    let Some(waiters) = st.waiters.get_mut(&owner) else {
        return;
    };
    let woken: Vec<(i64, oneshot::Sender<()>)> = match keys {
        None => std::mem::take(waiters),
        Some(keys) => {
            let (woken, kept) = std::mem::take(waiters)
                .into_iter()
                .partition(|(key, _)| keys.contains(key));
            *waiters = kept;
            woken
        }
    };
    if waiters.is_empty() {
        st.waiters.remove(&owner);
    }
    for (_, waiter) in woken {
        let _ = waiter.send(());
    }
}

fn start_claims(inner: &Arc<Inner>, live: &Live) -> Pending<ClaimDone> {
    let settings = &inner.settings;
    let timing = settings.timing;
    let mut st = inner.lock();
    if st.claims.is_empty() {
        return None;
    }
    let n = st.claims.len().min(settings.batch);
    let mut batch: Vec<PendingClaim> = Vec::with_capacity(n);
    for c in st.claims.drain(..n) {
        if timing.server_timeout_for(c.budget).is_some() {
            batch.push(c);
            continue;
        }
        // No server takes a dead-peer timeout long enough to vouch for it.
        let _ = c.reply.send(Err(Error::backend(
            crate::BackendErrorKind::Other,
            format!(
                "postgres at {}: id `{}`: a stop budget of {:?} is too long for this backend: \
             the server's dead-peer timeout would have to exceed {:?}, the most Postgres takes",
                settings.target, c.id, c.budget, MAX_SERVER_TIMEOUT
            ),
        )));
    }
    if batch.is_empty() {
        return None;
    }
    let seq0 = st.seq;
    // Only this claim reads the owners' events, and only those after seq0.
    st.events.clear();
    st.events_overflow = false;
    st.claim_in_flight = true;
    let new: HashSet<i64> = batch
        .iter()
        .filter(|c| !st.known.contains(&c.key))
        .map(|c| c.key)
        .collect();
    drop(st);
    let needed = batch
        .iter()
        .filter_map(|c| timing.server_timeout_for(c.budget))
        .max()
        .unwrap_or_default();
    let raise = (needed > live.x).then_some(needed);
    let live_x = live.x;
    let client = live.client.clone();
    let stmts = live.stmts.clone();
    let me = live.me;
    let node = inner.node.clone();
    let namespace = settings.namespace.clone();
    let namespace_key = settings.namespace_key;
    Some(Box::pin(async move {
        let mut x = live_x;
        let mut raised = None;
        let mut raise_error = None;
        if let Some(target) = raise {
            let p = Timing::server_params(target);
            let values = [
                p.user_timeout_ms.to_string(),
                p.idle.to_string(),
                p.interval.to_string(),
                p.count.to_string(),
            ];
            match client
                .query(
                    sql::RAISE_TIMEOUTS,
                    &[&values[0], &values[1], &values[2], &values[3]],
                )
                .await
            {
                Ok(_) => {
                    raised = Some(target);
                    x = target;
                }
                Err(e) => raise_error = Some((target, e)),
            }
        }
        // Without the raise, only ids the session's timeout covers go out.
        let (batch, refused): (Vec<PendingClaim>, Vec<PendingClaim>) = batch
            .into_iter()
            .partition(|c| timing.server_timeout_for(c.budget).is_some_and(|t| t <= x));
        let result = async {
            if batch.is_empty() {
                return Ok(None);
            }
            let (new_keys, new_ids): (Vec<i64>, Vec<String>) = batch
                .iter()
                .filter(|c| new.contains(&c.key))
                .map(|c| (c.key, c.id.to_string()))
                .unzip();
            let keys: Vec<i64> = batch.iter().map(|c| c.key).collect();
            let ids: Vec<String> = batch.iter().map(|c| c.id.to_string()).collect();
            let sent = Instant::now();
            // Sent back to back on the one connection: insert the missing
            // rows, claim, then read who holds the rest (a fresh snapshot).
            let insert = async {
                if new_keys.is_empty() {
                    Ok(0)
                } else {
                    client
                        .execute(&stmts.insert, &[&new_keys, &new_ids, &namespace])
                        .await
                }
            };
            let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&keys, &ids, &me, &node, &namespace, &namespace_key];
            let status_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&keys];
            let claimed = client.query(&stmts.claim, &claim_params);
            let status = client.query(&stmts.status, &status_params);
            let (_, claimed, status) = tokio::try_join!(insert, claimed, status)?;
            Ok(Some((sent, claimed, status)))
        }
        .await;
        ClaimDone {
            batch,
            refused,
            raise_error,
            seq0,
            x,
            raised,
            result,
        }
    }))
}

fn finish_claims(
    inner: &Arc<Inner>,
    live: &mut Live,
    done: ClaimDone,
    budget: &mut Duration,
) -> std::result::Result<(), String> {
    let settings = &inner.settings;
    let ClaimDone {
        batch,
        refused,
        raise_error,
        seq0,
        x,
        raised,
        result,
    } = done;
    // Recorded only once the server has taken it: a failed raise leaves the
    // session's detection (and so every deadline) where it was.
    if let Some(raised) = raised {
        live.x = live.x.max(raised);
    }
    let result = finish_claims_sent(inner, live, batch, seq0, x, result, budget);
    if let Some((target, e)) = raise_error {
        let err = query_error(settings, "raising the dead-peer timeout", &e);
        debug!(node = %inner.node, error = %err, ids = refused.len(), "raise failed");
        for c in refused {
            let _ = c.reply.send(Err(Error::backend(crate::BackendErrorKind::Other, format!(
                "{err} (id `{}` needs the server to wait {target:?} for a silent node, for its stop budget of {:?})",
                c.id, c.budget
            ))));
        }
    }
    inner.lock().claim_in_flight = false;
    result
}

/// The claims that were sent: grants, waits, retries.
fn finish_claims_sent(
    inner: &Arc<Inner>,
    live: &mut Live,
    batch: Vec<PendingClaim>,
    seq0: u64,
    x: Duration,
    result: ClaimResult,
    budget: &mut Duration,
) -> std::result::Result<(), String> {
    let settings = &inner.settings;
    let (sent, claimed, status) = match result {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let err = query_error(settings, "claim", &e);
            debug!(node = %inner.node, error = %err, ids = batch.len(), "claim batch failed");
            for c in batch {
                let _ = c.reply.send(Err(Error::backend(
                    crate::BackendErrorKind::Other,
                    err.to_string(),
                )));
            }
            return Ok(());
        }
    };
    live.note_ok(sent, x);
    let granted: HashMap<i64, i64> = claimed.iter().map(|r| (r.get(0), r.get(1))).collect();
    if !granted.is_empty() {
        let batch_budget = batch
            .iter()
            .filter(|c| granted.contains_key(&c.key))
            .map(|c| c.budget)
            .max();
        let new_budget = (*budget).max(batch_budget.unwrap_or_default());
        if Instant::now() >= live.deadline(&settings.timing, new_budget) {
            return Err("the claim's answer came too late to vouch for it".to_string());
        }
        *budget = new_budget;
    }
    let status: HashMap<i64, &tokio_postgres::Row> = status.iter().map(|r| (r.get(0), r)).collect();
    let mut st = inner.lock();
    let mut requeued = false;
    for mut c in batch {
        st.known.insert(c.key);
        if let Some(&token) = granted.get(&c.key) {
            let (lease, signal) = Lease::new(token as u64);
            if let Some(old) = st.held.insert(
                c.key,
                Held {
                    token: token as u64,
                    signal,
                },
            ) {
                old.signal.end(LeaseEnd::Lost);
            }
            let _ = c.reply.send(Ok(Claim::Granted(lease)));
            continue;
        }
        let Some(row) = status.get(&c.key) else {
            // Someone deleted it (rows are never deleted by highlander):
            // insert it again on the next try.
            st.known.remove(&c.key);
            let _ = c.reply.send(Err(Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "postgres at {}: the row of id `{}` is missing from {}",
                    settings.target,
                    c.id,
                    sql::TABLE
                ),
            )));
            continue;
        };
        let namespace: String = row.get(1);
        let id: String = row.get(2);
        if namespace != settings.namespace || id != *c.id {
            let _ = c.reply.send(Err(Error::backend(crate::BackendErrorKind::Other, format!(
                "lock key collision: id `{}` in namespace `{}` has the same key ({}) as id `{id}` in namespace `{namespace}`; rename one of them",
                c.id, settings.namespace, c.key
            ))));
            continue;
        }
        let owner: Option<i32> = row.get(3);
        let node: Option<String> = row.get(4);
        let token: i64 = row.get(5);
        match owner {
            Some(owner) if owner != live.me => {
                let holder = Some(Holder {
                    node: node.unwrap_or_default(),
                    token: Some(token as u64),
                });
                let wake: BoxFuture<'static, ()> = if st.owner_moved(owner, seq0) {
                    // It released or died after our snapshot: try again.
                    Box::pin(async {})
                } else {
                    let (tx, rx) = oneshot::channel();
                    st.waiters.entry(owner).or_default().push((c.key, tx));
                    Box::pin(async move {
                        let _ = rx.await;
                    })
                };
                let _ = c.reply.send(Ok(Claim::Busy { holder, wake }));
            }
            _ if c.retries < FREE_RETRIES => {
                // Freed between the claim and the read: try again now.
                c.retries += 1;
                st.claims.push(c);
                requeued = true;
            }
            _ => {
                let poll = settings.timing.poll;
                let holder = node.map(|node| Holder {
                    node,
                    token: Some(token as u64),
                });
                let _ = c.reply.send(Ok(Claim::Busy {
                    holder,
                    wake: Box::pin(sleep(poll)),
                }));
            }
        }
    }
    drop(st);
    if requeued {
        inner.kick.notify_one();
    }
    Ok(())
}

fn start_releases(inner: &Arc<Inner>, live: &Live) -> Pending<ReleaseDone> {
    let batch: Vec<PendingRelease> = {
        let mut st = inner.lock();
        if st.releases.is_empty() {
            return None;
        }
        st.releases.drain(..).collect()
    };
    let mut keys: Vec<i64> = batch.iter().flat_map(|r| r.keys.iter().copied()).collect();
    keys.sort_unstable();
    keys.dedup();
    let client = live.client.clone();
    let stmts = live.stmts.clone();
    let me = live.me;
    let channel = inner.settings.channel.clone();
    let x = live.x;
    Some(Box::pin(async move {
        let sent = Instant::now();
        let result = client
            .query(&stmts.release, &[&keys, &me, &channel])
            .await
            .map(|_| sent);
        ReleaseDone { batch, x, result }
    }))
}

fn finish_releases(
    inner: &Arc<Inner>,
    live: &mut Live,
    done: ReleaseDone,
) -> std::result::Result<(), String> {
    match done.result {
        Ok(sent) => {
            live.note_ok(sent, done.x);
            for release in done.batch {
                if let Some(reply) = release.reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Ok(())
        }
        Err(e) => {
            let err = query_error(&inner.settings, "release", &e);
            // A row this live session keeps would be stuck: retry, and give
            // the whole session up (which frees everything) if it keeps failing.
            let mut st = inner.lock();
            for mut release in done.batch {
                release.failures += 1;
                if release.failures >= 3 {
                    return Err(format!("releasing ids failed three times ({err})"));
                }
                if let Some(reply) = release.reply.take() {
                    let _ = reply.send(Err(Error::backend(
                        crate::BackendErrorKind::Other,
                        err.to_string(),
                    )));
                }
                st.releases.push(release);
            }
            Ok(())
        }
    }
}

fn start_probe(inner: &Arc<Inner>, live: &Live) -> Pin<Box<dyn Future<Output = ProbeDone> + Send>> {
    let owners: Vec<i32> = inner.lock().waiters.keys().copied().collect();
    let client = live.client.clone();
    let stmts = live.stmts.clone();
    let namespace_key = inner.settings.namespace_key;
    let x = live.x;
    Box::pin(async move {
        let sent = Instant::now();
        let result = client
            .query(&stmts.probe, &[&owners, &namespace_key])
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect());
        ProbeDone { x, sent, result }
    })
}

fn finish_probe(inner: &Arc<Inner>, live: &mut Live, done: ProbeDone) {
    match done.result {
        Ok(dead) => {
            live.note_ok(done.sent, done.x);
            if !dead.is_empty() {
                let mut st = inner.lock();
                for owner in dead {
                    debug!(node = %inner.node, owner, "a holder's session ended: retrying its ids");
                    owner_changed(&mut st, owner, None);
                }
            }
        }
        Err(e) => {
            debug!(node = %inner.node, error = %query_error(&inner.settings, "probe", &e), "probe failed")
        }
    }
}

/// Opens a connection and prepares it: the table, the presence lock, the
/// dead-peer settings, `LISTEN`, the statements.
async fn open(inner: &Arc<Inner>) -> std::result::Result<Live, ConnectError> {
    match timeout(SETUP_TIMEOUT, open_inner(inner)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError {
            message: format!(
                "cannot connect to postgres at {}: no answer within {SETUP_TIMEOUT:?}",
                inner.settings.target
            ),
            fatal: false,
        }),
    }
}

async fn open_inner(inner: &Arc<Inner>) -> std::result::Result<Live, ConnectError> {
    let settings = &inner.settings;
    let timing = settings.timing;
    let x = timing.initial_server_timeout();
    let params = Timing::server_params(x);
    let mut config = settings.pg.clone();
    config.application_name(&inner.node);
    let options = format!(
        "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        params.options()
    );
    let options = match config.get_options() {
        Some(user) if !user.is_empty() => format!("{user} {options}"),
        _ => options,
    };
    config.options(options);
    // The client's kernel must never end the connection before the server
    // could: if it did while the link is down (a peer's unacknowledged data
    // times out), its answer to the server's next packet once the link is
    // back would be a reset, and the server would free the ids at once,
    // however long the instances still need to stop. Each session raises
    // the server's detection when a stop budget needs it, so the client's
    // is the longest a session can ask for; with it set, Linux keepalives
    // give up no sooner either. The session's own deadline notices a dead
    // link, and it closes the connection itself once its instances have
    // stopped (see `drive`).
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(2))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(CLIENT_USER_TIMEOUT);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    let connect_err = |e: tokio_postgres::Error| classify(settings, &e);
    let (client, conn, releases) = match &settings.tls {
        Some(tls) => {
            let (client, conn) = config
                .connect(MakeRustlsConnect::new((**tls).clone()))
                .await
                .map_err(connect_err)?;
            let (conn, rx) = spawn_connection(conn, settings.channel.clone());
            (client, ConnTask(conn), rx)
        }
        None => {
            let (client, conn) = config.connect(NoTls).await.map_err(connect_err)?;
            let (conn, rx) = spawn_connection(conn, settings.channel.clone());
            (client, ConnTask(conn), rx)
        }
    };
    let client = Arc::new(client);
    let setup = async {
        let row = client.query_one(sql::TABLE_EXISTS, &[]).await?;
        let (exists, version): (bool, i32) = (row.get(0), row.get(1));
        if !exists {
            client
                .batch_execute(&sql::create_table(ddl_lock_key()))
                .await?;
        }
        if version >= 140_000 {
            // Would end a quiet session (and free its ids) sooner than the
            // dead-peer detection the node vouches against.
            client.batch_execute(sql::NO_IDLE_TIMEOUT).await?;
        }
        let row = client.query_one(sql::SETTINGS, &[]).await?;
        let tcp: bool = row.get(4);
        let idle_timeout: Option<String> = row.get(6);
        if version >= 140_000 && idle_timeout.as_deref() != Some("0") {
            warn!(
                node = %inner.node,
                "postgres at {} did not take idle_session_timeout = 0 for this session (got {idle_timeout:?}): \
                 a quiet session may be ended, and its ids freed, before this node stops its instances",
                settings.target
            );
        }
        let read = |i: usize| {
            row.get::<_, Option<String>>(i)
                .and_then(|s| s.parse::<u64>().ok())
        };
        let actual = (read(0), read(1), read(2), read(3));
        let wanted = (
            Some(params.user_timeout_ms),
            Some(params.idle),
            Some(params.interval),
            Some(params.count),
        );
        if tcp && actual != wanted {
            warn!(
                node = %inner.node,
                "postgres at {} did not take the per-session dead-peer settings (wanted tcp_user_timeout={}ms, keepalives {}s+{}x{}s; got {actual:?}): \
                 a silently vanished node keeps its ids until the server's own TCP timeouts end its session",
                settings.target, params.user_timeout_ms, params.idle, params.count, params.interval
            );
        }
        debug!(
            node = %inner.node,
            server_detection = ?params.detection(),
            vouch = ?timing.vouch(x, crate::DEFAULT_SHUTDOWN),
            "dead-peer settings for this session"
        );
        let mut me;
        let mut tries = 0;
        loop {
            me = random_i32();
            let row = client
                .query_one(sql::PRESENCE, &[&settings.namespace_key, &me])
                .await?;
            let (locked, used): (bool, bool) = (row.get(0), row.get(1));
            if locked && !used {
                break;
            }
            if locked {
                client
                    .query_one(sql::UNLOCK, &[&settings.namespace_key, &me])
                    .await?;
            }
            tries += 1;
            if tries > 50 {
                return Ok(Err(
                    "could not draw a free presence number in 50 tries".to_string()
                ));
            }
        }
        client
            .batch_execute(&format!("LISTEN {}", settings.channel))
            .await?;
        let sent = Instant::now();
        let (insert, claim, status, probe, release, holder, members) = tokio::try_join!(
            client.prepare(sql::INSERT),
            client.prepare(sql::CLAIM),
            client.prepare(sql::STATUS),
            client.prepare(sql::PROBE),
            client.prepare(sql::RELEASE),
            client.prepare(sql::HOLDER),
            client.prepare(sql::MEMBERS),
        )?;
        let stmts = Statements {
            insert,
            claim,
            status,
            probe,
            release,
            holder,
            members,
        };
        Ok::<_, tokio_postgres::Error>(Ok((me, stmts, sent, version)))
    };
    let (me, stmts, sent, version) = match setup.await {
        Ok(Ok(r)) => r,
        Ok(Err(message)) => {
            return Err(ConnectError {
                message: format!("postgres at {}: {message}", settings.target),
                fatal: false,
            });
        }
        Err(e) => {
            return Err(classify(settings, &e));
        }
    };
    if version < 120_000 {
        return Err(ConnectError {
            message: format!(
                "postgres at {} is version {version}: highlander needs Postgres 12 or later (for tcp_user_timeout)",
                settings.target
            ),
            fatal: true,
        });
    }
    Ok(Live {
        client,
        stmts: Arc::new(stmts),
        me,
        conn,
        releases,
        x,
        last_ok: sent,
        last_ok_x: x,
    })
}

/// Drives the connection on its own task (so that loss is seen at once,
/// whatever the session is doing) and forwards the namespace's
/// releases heard on the namespace's channel (see [`Releases`]). Ends with
/// why the connection ended.
fn spawn_connection<S, T>(
    mut conn: Connection<S, T>,
    channel: String,
) -> (JoinHandle<String>, Releases)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RELEASE_QUEUE);
    let lost = Arc::new(Lost::default());
    let lost_tx = lost.clone();
    let task = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Any role may NOTIFY the channel: what is not exactly a
                    // release's payload is ignored here.
                    let release = (n.channel() == channel)
                        .then(|| parse_release(n.payload()))
                        .flatten();
                    if let Some(release) = release {
                        // Never wait here: this task drives the connection.
                        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(release) {
                            lost_tx.flag.store(true, Ordering::Release);
                            lost_tx.notify.notify_one();
                        }
                    }
                }
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    debug!(message = notice.message(), "postgres notice");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("the connection failed: {}", error_text(&e)),
                None => return "the server closed the connection".to_string(),
            }
        }
    });
    (task, Releases { rx, lost })
}

/// The advisory lock that serializes creating the table, across every
/// node of every namespace.
fn ddl_lock_key() -> i64 {
    lock_key("highlander", "ddl:highlander_leases")
}

fn random_i32() -> i32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(crate_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish() as i32
}

fn crate_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The text of a driver error, without the `db error:` prefix. Driver
/// errors never contain the password.
fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

fn query_error(settings: &Settings, what: &str, e: &tokio_postgres::Error) -> Error {
    Error::backend(
        crate::BackendErrorKind::Other,
        format!(
            "postgres at {}: {what} failed: {}",
            settings.target,
            error_text(e)
        ),
    )
}

/// Sorts a connection error into "fix the configuration" (fatal at start)
/// and "the server is not there now" (retried).
fn classify(settings: &Settings, e: &tokio_postgres::Error) -> ConnectError {
    let target = &settings.target;
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let (what, fatal) = match code {
            "28P01" | "28000" => ("authentication failed (password hidden)", true),
            "3D000" => ("the database does not exist", true),
            "42501" => (
                "permission denied: the role needs CREATE on the schema to create the highlander_leases table, or an administrator creates it",
                true,
            ),
            c if c.starts_with("08") || c == "57P03" || c == "53300" || c.starts_with("57P") => {
                ("the server cannot take the connection now", false)
            }
            _ => ("the server refused", true),
        };
        let text = error_text(e);
        // pg_hba.conf asks for a certificate this client did not present.
        let hint = if text.contains("client certificate") {
            " (give one with sslcert= and sslkey=, or Postgres::client_cert)"
        } else {
            ""
        };
        return ConnectError {
            message: format!("cannot connect to postgres at {target}: {what}: {text}{hint}"),
            fatal,
        };
    }
    let tls = e.to_string().contains("TLS");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{InvalidData, InvalidInput};
            // A refused certificate arrives as an io::Error too.
            if tls || matches!(io.kind(), InvalidData | InvalidInput) {
                return ConnectError {
                    message: format!("cannot connect to postgres at {target}: TLS failed: {io}"),
                    fatal: true,
                };
            }
            return ConnectError {
                message: format!("cannot reach postgres at {target}: {io}"),
                fatal: false,
            };
        }
        source = s.source();
    }
    let text = error_text(e);
    let fatal = !text.contains("timeout") && !text.contains("closed");
    ConnectError {
        message: format!("cannot connect to postgres at {target}: {text}"),
        fatal,
    }
}

/// The holder named by a lease row: the node name the row records, unless
/// the holding session's `application_name` (which the server cuts to 63
/// bytes) says otherwise.
fn holder_of(token: i64, app: Option<String>, node: Option<String>) -> Holder {
    let app = app.unwrap_or_default();
    let node = match node {
        Some(n) if n.starts_with(&app) => n,
        _ => app,
    };
    Holder::new(node, Some(token as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of releases by distinct owners (or of forged notifications
    /// naming them) leaves the per-owner bookkeeping bounded: nothing is
    /// kept while no claim is in flight, at most MAX_EVENTS owners while
    /// one is, and past that every owner counts as moved (nothing missed).
    #[test]
    fn owner_events_stay_bounded() {
        let mut st = State::default();
        for owner in 0..200_000 {
            owner_changed(&mut st, owner, None);
        }
        assert!(st.events.len() <= MAX_EVENTS, "{}", st.events.len());
        st.claim_in_flight = true;
        let seq0 = st.seq;
        owner_changed(&mut st, 7, None);
        assert!(st.owner_moved(7, seq0));
        assert!(!st.owner_moved(8, seq0));
        for owner in 0..200_000 {
            owner_changed(&mut st, owner, None);
        }
        assert!(st.events.len() <= MAX_EVENTS, "{}", st.events.len());
        assert!(st.owner_moved(199_999, seq0));
        assert!(st.owner_moved(-5, seq0), "past the bound every owner moved");
    }

    /// When releases were dropped, every waiter is woken, and the claim in
    /// flight retries whatever holder it finds.
    #[test]
    fn lost_releases_wake_every_waiter() {
        let mut st = State::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        st.waiters.entry(1).or_default().push((10, tx1));
        st.waiters.entry(2).or_default().push((20, tx2));
        st.claim_in_flight = true;
        let seq0 = st.seq;
        wake_all(&mut st);
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok());
        assert!(st.waiters.is_empty());
        assert!(st.owner_moved(12_345, seq0));
    }

    /// Only a release's exact payload counts; junk from any role is ignored.
    #[test]
    fn only_release_payloads_are_read() {
        assert_eq!(parse_release("42"), Some((42, None)));
        assert_eq!(
            parse_release("-7:1,-2"),
            Some((-7, Some(HashSet::from([1, -2]))))
        );
        for junk in [
            "",
            "x",
            " 42",
            "42:",
            "42:1,,2",
            "42:1,x",
            "99999999999",
            "1:2:3",
            &"1".repeat(9_000),
            &format!("1:{}", vec!["5"; 301].join(",")),
        ] {
            assert_eq!(parse_release(junk), None, "{junk:.40}");
        }
    }
}
