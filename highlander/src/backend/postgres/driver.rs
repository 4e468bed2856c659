//! The task that owns the connection start-up opened: it sends claim and
//! release batches, heartbeats and probes, hands releases heard on the
//! channel to the waiters and membership changes to `members_changed`,
//! ends every tenure before the server could hand it to another node, and
//! after a loss reconnects with backoff (and publishes the profile again).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_postgres::types::ToSql;
use tracing::{debug, info, warn};

use super::batch::{self, Arrays, StatusRow};
use super::connect::{Live, open};
use super::errors::StatementError;
use super::members;
use super::probe::{Heard, ProbeDone, finish_probe, start_probe};
use super::sql;
use super::state::{Inner, PendingClaim, PendingRelease};
use super::timing::Timing;

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The driver: run an epoch on the connection `first` until it is lost,
/// end every tenure, reconnect with backoff, and so on until it is
/// stopped. (Start-up connects `first`: the runtime's start-up policy
/// retries that, this task only what comes after.)
pub(super) async fn drive(inner: Arc<Inner>, first: Live) {
    let mut first = Some(first);
    let mut backoff = RECONNECT_MIN;
    let mut attempt: u32 = 0;
    loop {
        let reconnected = first.is_none();
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
                        warn!(node = %inner.node, "{e}; retrying in {backoff:?} (attempt {attempt})");
                        inner.lock().last_error = Some(e.to_string());
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
            st.live = Some(live.info());
            st.last_error = None;
        }
        let Ended { why, drain } = run_epoch(&inner, &mut live, reconnected).await;
        inner.lose(&why);
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

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

async fn maybe<T>(fut: &mut Pending<T>) -> T {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// How an epoch ended: why, and how long to keep the connection open
/// before closing it (zero when the server already ended the session, or
/// on a graceful close).
struct Ended {
    why: String,
    drain: Duration,
}

type Watched = (
    u64,
    Result<std::collections::HashSet<i32>, tokio_postgres::Error>,
);

/// Runs one connection until it is lost. On a connection after the first
/// (`reconnected`), the members may differ, and the profile is published
/// again under the new presence number.
async fn run_epoch(inner: &Arc<Inner>, live: &mut Live, reconnected: bool) -> Ended {
    let timing = inner.settings.timing;
    let mut claim: Pending<ClaimDone> = None;
    let mut release: Pending<ReleaseDone> = None;
    let mut probe: Pending<ProbeDone> = None;
    let mut last_probe = Instant::now();
    // The largest stop budget of the tenures granted in this epoch.
    let mut budget = Duration::ZERO;
    // Which members' presence the probe watches: looked up now and after
    // every membership notification (one lookup at a time).
    let mut watch: Pending<Watched> = None;
    let mut watch_again = true;
    // After a failed lookup, the next waits a heartbeat (the probe wakes
    // this loop at least that often).
    let mut watch_not_before = Instant::now();
    let mut republish: Pending<()> = None;
    if reconnected {
        republish = Some(Box::pin(members::republish(inner.clone(), live.info())));
        inner.members_changed();
    }
    loop {
        if claim.is_none() {
            claim = start_claims(inner, live);
        }
        if release.is_none() {
            release = start_releases(inner, live);
        }
        if watch.is_none() && watch_again && Instant::now() >= watch_not_before {
            watch_again = false;
            let seq = inner.lock().members.lookup_sent();
            watch = Some(Box::pin(members::watch_owners(
                inner.clone(),
                live.info(),
                seq,
            )));
        }
        let deadline = live.vouched.deadline(&timing, budget);
        let waiting = {
            let mut st = inner.lock();
            st.deadline = (!st.held.is_empty()).then_some(deadline);
            !st.waiters.is_empty()
        };
        let probe_at = timing.next_round_trip(last_probe, waiting);
        let given_up = |why: String, budget: Duration| Ended {
            why,
            drain: timing.drain(budget),
        };
        tokio::select! {
            biased;
            _ = inner.stop.cancelled() => {
                return Ended { why: "the session was closed".to_string(), drain: Duration::ZERO };
            }
            _ = sleep_until(deadline) => {
                return given_up(format!(
                    "no answer for {:?} since the last successful round trip: this node can no longer vouch that it still holds its ids",
                    Instant::now().duration_since(live.vouched.last_ok())
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
            Some(heard) = live.releases.rx.recv() => match heard {
                // A forged release (any role may NOTIFY) only makes the
                // named owner's waiters retry once.
                Heard::Release((owner, keys)) => {
                    if owner != live.me {
                        inner.lock().waiters.owner_changed(owner, keys.as_ref());
                    }
                }
                // A forged one only wakes `members_changed` for nothing.
                Heard::Members => {
                    inner.members_changed();
                    watch_again = true;
                }
            },
            _ = live.releases.lost.notify.notified() => {
                if live.releases.lost.take() {
                    debug!(node = %inner.node, "notifications were dropped: every waiter retries");
                    inner.lock().waiters.wake_all();
                    inner.members_changed();
                    watch_again = true;
                }
            }
            done = maybe(&mut watch) => {
                watch = None;
                if !members::owners_watched(inner, done) {
                    watch_again = true;
                    watch_not_before = Instant::now() + timing.heartbeat;
                }
            }
            () = maybe(&mut republish) => {
                republish = None;
            }
            _ = sleep_until(probe_at), if probe.is_none() => {
                last_probe = Instant::now();
                probe = Some(start_probe(inner, live));
            }
            _ = inner.kick.notified() => {}
        }
    }
}

/// What a sent claim batch returned: the send time, the granted rows and
/// the status rows; `None` when nothing was sent.
type ClaimResult = Result<
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
    result: Result<Instant, tokio_postgres::Error>,
}

/// Sends the next claim batch, if any claim waits: raises the server's
/// detection first when a budget needs it, then inserts the missing rows,
/// claims, and reads who holds the rest, back to back.
fn start_claims(inner: &Arc<Inner>, live: &Live) -> Pending<ClaimDone> {
    let settings = &inner.settings;
    let timing = settings.timing;
    let mut st = inner.lock();
    if st.claims.is_empty() {
        return None;
    }
    let (batch, too_long) = batch::take(&mut st.claims, settings.batch, &timing);
    for c in too_long {
        // No server takes a dead-peer timeout long enough to vouch for it.
        let err = batch::too_long(settings, &c);
        let _ = c.reply.send(Err(err));
    }
    if batch.is_empty() {
        return None;
    }
    let seq0 = st.waiters.claim_sent();
    let new = batch::unknown(&batch, &st.known);
    drop(st);
    let raise = batch::raise_for(&batch, &timing, live.x);
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
            let values = Timing::server_params(target).values();
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
        let (batch, refused) = batch::covered(batch, &timing, x);
        let result = async {
            if batch.is_empty() {
                return Ok(None);
            }
            let Arrays {
                keys,
                ids,
                new_keys,
                new_ids,
            } = Arrays::of(&batch, &new);
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
            let claim_params: [&(dyn ToSql + Sync); 6] =
                [&keys, &ids, &me, &node, &namespace, &namespace_key];
            let status_params: [&(dyn ToSql + Sync); 1] = [&keys];
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

/// A claim batch answered: its claims complete, and the claims refused
/// for want of a raise fail with why. An error gives the session up.
fn finish_claims(
    inner: &Arc<Inner>,
    live: &mut Live,
    done: ClaimDone,
    budget: &mut Duration,
) -> Result<(), String> {
    let settings = &inner.settings;
    // Recorded only once the server has taken it: a failed raise leaves the
    // session's detection (and so every deadline) where it was.
    if let Some(raised) = done.raised {
        live.x = live.x.max(raised);
    }
    let result = finish_claims_sent(
        inner,
        live,
        done.batch,
        done.seq0,
        done.x,
        done.result,
        budget,
    );
    if let Some((target, e)) = done.raise_error {
        let err = StatementError::new(settings, "raising the dead-peer timeout", e);
        debug!(node = %inner.node, error = %err, ids = done.refused.len(), "raise failed");
        for c in done.refused {
            let _ = c.reply.send(Err(err.error_noting(&format!(
                " (id `{}` needs the server to wait {target:?} for a silent node, for its stop budget of {:?})",
                c.id, c.budget
            ))));
        }
    }
    inner.lock().waiters.claim_done();
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
) -> Result<(), String> {
    let settings = &inner.settings;
    let (sent, claimed, status) = match result {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let err = StatementError::new(settings, "claim", e);
            debug!(node = %inner.node, error = %err, ids = batch.len(), "claim batch failed");
            for c in batch {
                let _ = c.reply.send(Err(err.error()));
            }
            return Ok(());
        }
    };
    live.vouched.note_ok(sent, x);
    let granted: HashMap<i64, i64> = claimed.iter().map(|r| (r.get(0), r.get(1))).collect();
    if !granted.is_empty() {
        let granted_budget = batch::granted_budget(&batch, &granted).unwrap_or_default();
        *budget = live
            .vouched
            .admit(&settings.timing, *budget, granted_budget, Instant::now())?;
    }
    let status: HashMap<i64, StatusRow> = status
        .iter()
        .map(|r| {
            let row = StatusRow {
                namespace: r.get(1),
                id: r.get(2),
                owner: r.get(3),
                node: r.get(4),
                token: r.get(5),
                reserved_for: r.get(6),
                reserved: r.get(7),
            };
            (r.get(0), row)
        })
        .collect();
    let queued = {
        let mut st = inner.lock();
        let me = (live.me, inner.node.as_str());
        batch::complete(&mut st, settings, batch, &granted, &status, me, seq0)
    };
    if queued {
        inner.kick.notify_one();
    }
    Ok(())
}

/// Sends every pending release in one statement.
fn start_releases(inner: &Arc<Inner>, live: &Live) -> Pending<ReleaseDone> {
    let batch: Vec<PendingRelease> = {
        let mut st = inner.lock();
        if st.releases.is_empty() {
            return None;
        }
        st.releases.drain(..).collect()
    };
    let (keys, targets) = batch::release_keys(&batch);
    let reserve = batch::RESERVATION.as_secs_f64();
    let client = live.client.clone();
    let stmts = live.stmts.clone();
    let me = live.me;
    let channel = inner.settings.channel.clone();
    let x = live.x;
    Some(Box::pin(async move {
        let sent = Instant::now();
        let result = client
            .query(&stmts.release, &[&keys, &me, &channel, &targets, &reserve])
            .await
            .map(|_| sent);
        ReleaseDone { batch, x, result }
    }))
}

/// A release batch answered. An error gives the session up.
fn finish_releases(inner: &Arc<Inner>, live: &mut Live, done: ReleaseDone) -> Result<(), String> {
    match done.result {
        Ok(sent) => {
            live.vouched.note_ok(sent, done.x);
            for release in done.batch {
                if let Some(reply) = release.reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Ok(())
        }
        Err(e) => {
            let err = StatementError::new(&inner.settings, "release", e);
            batch::release_failed(done.batch, &mut inner.lock().releases, &err)
        }
    }
}
