//! Claim and release batches, without I/O: which pending claims go into
//! the next claim statement (and which server timeout they need), what each
//! claim's answer is once the statements' rows are back, and which keys a
//! release batch frees.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::sleep;

use super::config::Settings;
use super::errors::StatementError;
use super::sql;
use super::state::{PendingClaim, PendingRelease, State};
use super::timing::{MAX_SERVER_TIMEOUT, Timing};
use crate::backend::kit::tenures::Tenure;
use crate::backend::{Claim, Holder, Lease, LeaseEnd};
use crate::service::BoxFuture;
use crate::{BackendErrorKind, Error};

/// A claim that found its row free but did not get it is retried this
/// many times at once before it waits a probe interval.
const FREE_RETRIES: u8 = 3;

/// How long an id released to a node (`release_to`) is reserved for it:
/// other nodes' claims are refused meanwhile, on the server's clock.
pub(super) const RESERVATION: Duration = Duration::from_secs(2);

/// The claims of the next batch: the oldest `max` pending ones, less those
/// whose stop budget no server's dead-peer timeout can cover, which come
/// back apart (to be refused, see [`too_long`]).
pub(super) fn take(
    pending: &mut Vec<PendingClaim>,
    max: usize,
    timing: &Timing,
) -> (Vec<PendingClaim>, Vec<PendingClaim>) {
    let n = pending.len().min(max);
    pending
        .drain(..n)
        .partition(|c| timing.server_timeout_for(c.budget).is_some())
}

/// Why a claim taken apart by [`take`] is refused (for good: only a
/// shorter budget helps).
pub(super) fn too_long(settings: &Settings, c: &PendingClaim) -> Error {
    Error::backend(
        BackendErrorKind::Refused,
        format!(
            "postgres at {}: id `{}`: a stop budget of {:?} is too long for this backend: \
         the server's dead-peer timeout would have to exceed {:?}, the most Postgres takes",
            settings.target, c.id, c.budget, MAX_SERVER_TIMEOUT
        ),
    )
}

/// The server timeout the session must raise its detection to before
/// sending `batch`, when the largest budget in it needs more than `x`.
pub(super) fn raise_for(batch: &[PendingClaim], timing: &Timing, x: Duration) -> Option<Duration> {
    let needed = batch
        .iter()
        .filter_map(|c| timing.server_timeout_for(c.budget))
        .max()
        .unwrap_or_default();
    (needed > x).then_some(needed)
}

/// The claims the session's detection `x` covers (sent), and the others
/// (refused: the raise they needed failed).
pub(super) fn covered(
    batch: Vec<PendingClaim>,
    timing: &Timing,
    x: Duration,
) -> (Vec<PendingClaim>, Vec<PendingClaim>) {
    batch
        .into_iter()
        .partition(|c| timing.server_timeout_for(c.budget).is_some_and(|t| t <= x))
}

/// The keys of `batch` whose row this session has not seen yet.
pub(super) fn unknown(batch: &[PendingClaim], known: &HashSet<i64>) -> HashSet<i64> {
    batch
        .iter()
        .filter(|c| !known.contains(&c.key))
        .map(|c| c.key)
        .collect()
}

/// The array parameters of one claim round trip: every key and id, and
/// those whose row is inserted first.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Arrays {
    pub(super) keys: Vec<i64>,
    pub(super) ids: Vec<String>,
    pub(super) new_keys: Vec<i64>,
    pub(super) new_ids: Vec<String>,
}

impl Arrays {
    pub(super) fn of(batch: &[PendingClaim], new: &HashSet<i64>) -> Arrays {
        let (new_keys, new_ids) = batch
            .iter()
            .filter(|c| new.contains(&c.key))
            .map(|c| (c.key, c.id.to_string()))
            .unzip();
        Arrays {
            keys: batch.iter().map(|c| c.key).collect(),
            ids: batch.iter().map(|c| c.id.to_string()).collect(),
            new_keys,
            new_ids,
        }
    }
}

/// The largest stop budget among the claims granted (`None`: none was).
pub(super) fn granted_budget(
    batch: &[PendingClaim],
    granted: &HashMap<i64, i64>,
) -> Option<Duration> {
    batch
        .iter()
        .filter(|c| granted.contains_key(&c.key))
        .map(|c| c.budget)
        .max()
}

/// A row of the status read ([`sql::STATUS`]): who holds a requested id now.
#[derive(Debug, Clone)]
pub(super) struct StatusRow {
    pub(super) namespace: String,
    pub(super) id: String,
    pub(super) owner: Option<i32>,
    pub(super) node: Option<String>,
    pub(super) token: i64,
    /// The node a handoff reserved the id for, while it is reserved.
    pub(super) reserved_for: Option<String>,
    /// How many more seconds the reservation runs (`None`: none runs).
    pub(super) reserved: Option<f64>,
}

/// What one claim of a batch comes to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Granted, with this token.
    Granted(u64),
    /// The row is gone (highlander never deletes one): insert it again on
    /// the next try.
    Missing,
    /// Another (namespace, id) has the same lock key.
    Collision { namespace: String, id: String },
    /// Another session holds it: wait until that owner moves.
    HeldBy { owner: i32, holder: Holder },
    /// Free between the claim and the read: try again now.
    Retry,
    /// Still free but not granted after the retries: wait a poll interval.
    Poll(Option<Holder>),
    /// Released to another node, which alone may claim it for `remaining`.
    Reserved { remaining: Duration },
}

/// The outcome of claim `c`, from the rows granted (key to new token) and
/// its status row. `me` is this session's presence number, `node` its node
/// name.
pub(super) fn outcome(
    c: &PendingClaim,
    granted: &HashMap<i64, i64>,
    status: Option<&StatusRow>,
    me: i32,
    node: &str,
    namespace: &str,
) -> Outcome {
    if let Some(&token) = granted.get(&c.key) {
        return Outcome::Granted(token as u64);
    }
    let Some(row) = status else {
        return Outcome::Missing;
    };
    if row.namespace != namespace || row.id != *c.id {
        return Outcome::Collision {
            namespace: row.namespace.clone(),
            id: row.id.clone(),
        };
    }
    let token = Some(row.token as u64);
    match row.owner {
        Some(owner) if owner != me => Outcome::HeldBy {
            owner,
            holder: Holder {
                node: row.node.clone().unwrap_or_default(),
                token,
            },
        },
        _ if row.reserved.is_some_and(|s| s > 0.0)
            && row.reserved_for.as_deref().is_some_and(|n| n != node) =>
        {
            let secs = row.reserved.unwrap_or_default();
            Outcome::Reserved {
                remaining: Duration::from_secs_f64(secs.min(RESERVATION.as_secs_f64() * 2.0)),
            }
        }
        _ if c.retries < FREE_RETRIES => Outcome::Retry,
        _ => Outcome::Poll(row.node.clone().map(|node| Holder { node, token })),
    }
}

/// Completes every claim of a sent batch from its rows: grants become
/// tenures, busy ids wait on their holder (or retry at once when it moved
/// since `seq0`), free ones go back in the queue. A grant whose caller is
/// gone (its `try_claim` future was dropped) is released at once, as
/// `release` would: nobody runs it. Returns whether claims or releases were
/// queued (the driver then sends again at once).
pub(super) fn complete(
    st: &mut State,
    settings: &Settings,
    batch: Vec<PendingClaim>,
    granted: &HashMap<i64, i64>,
    status: &HashMap<i64, StatusRow>,
    (me, node): (i32, &str),
    seq0: u64,
) -> bool {
    let mut queued = false;
    for mut c in batch {
        st.known.insert(c.key);
        let status = status.get(&c.key);
        let reply = match outcome(&c, granted, status, me, node, &settings.namespace) {
            Outcome::Granted(token) => {
                let (lease, signal) = Lease::new(token);
                // An older tenure of the same key still recorded is ended.
                st.held.insert(c.key, Tenure::new(token, c.budget, signal));
                if c.reply.send(Ok(Claim::Granted(lease))).is_err() {
                    if let Some(tenure) = st.held.remove_if(&c.key, token) {
                        tenure.signal.end(LeaseEnd::Lost);
                    }
                    st.releases.push(PendingRelease {
                        keys: vec![c.key],
                        to: None,
                        reply: None,
                        failures: 0,
                    });
                    queued = true;
                }
                continue;
            }
            Outcome::Missing => {
                st.known.remove(&c.key);
                Err(Error::backend(
                    BackendErrorKind::Other,
                    format!(
                        "postgres at {}: the row of id `{}` is missing from {}",
                        settings.target,
                        c.id,
                        sql::TABLE
                    ),
                ))
            }
            Outcome::Collision { namespace, id } => Err(Error::backend(
                BackendErrorKind::Refused,
                format!(
                    "lock key collision: id `{}` in namespace `{}` has the same key ({}) as id `{id}` in namespace `{namespace}`; rename one of them",
                    c.id, settings.namespace, c.key
                ),
            )),
            Outcome::HeldBy { owner, holder } => {
                let wake: BoxFuture<'static, ()> = if st.waiters.owner_moved(owner, seq0) {
                    // It released or died after our snapshot: try again.
                    Box::pin(async {})
                } else {
                    let rx = st.waiters.wait(owner, c.key);
                    Box::pin(async move {
                        let _ = rx.await;
                    })
                };
                Ok(Claim::Busy {
                    holder: Some(holder),
                    wake,
                })
            }
            Outcome::Retry => {
                c.retries += 1;
                st.claims.push(c);
                queued = true;
                continue;
            }
            Outcome::Poll(holder) => Ok(Claim::Busy {
                holder,
                wake: Box::pin(sleep(settings.timing.poll)),
            }),
            // Retried once the reservation has run out (the reserved node
            // has taken it by then, or anyone may).
            Outcome::Reserved { remaining } => Ok(Claim::Busy {
                holder: None,
                wake: Box::pin(sleep(remaining + settings.timing.poll)),
            }),
        };
        let _ = c.reply.send(reply);
    }
    queued
}

/// The keys a release batch frees, in key order (the order every statement
/// locks rows in), each once, with the node each is released to (`None`:
/// a plain release). A key released both ways goes to the node.
pub(super) fn release_keys(batch: &[PendingRelease]) -> (Vec<i64>, Vec<Option<String>>) {
    let mut keys: Vec<(i64, Option<String>)> = batch
        .iter()
        .flat_map(|r| {
            r.keys
                .iter()
                .map(|&k| (k, r.to.as_deref().map(str::to_string)))
        })
        .collect();
    // `None` sorts first: keep the last of each key.
    keys.sort_unstable();
    keys.reverse();
    keys.dedup_by_key(|(k, _)| *k);
    keys.reverse();
    keys.into_iter().unzip()
}

/// A release batch failed with `err`: each release is told and queued
/// again, unless one has now failed three times; then the session must be
/// given up (which frees everything), and the reason is returned.
pub(super) fn release_failed(
    batch: Vec<PendingRelease>,
    queue: &mut Vec<PendingRelease>,
    err: &StatementError,
) -> Result<(), String> {
    // A row this live session keeps would be stuck: retry, and give the
    // whole session up if it keeps failing.
    for mut release in batch {
        release.failures += 1;
        if release.failures >= 3 {
            return Err(format!("releasing ids failed three times ({err})"));
        }
        if let Some(reply) = release.reply.take() {
            let _ = reply.send(Err(err.error()));
        }
        queue.push(release);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
