//! The node as a member on etcd: its member key and catalog (written by one
//! publisher task, again under every new lease), the members and their
//! profiles as this node reads them, `members_changed` (fed by the watch),
//! and the short lease that `release_to`'s reservations are put with. What
//! the keys hold and where they live is `roster`'s.
//!
//! Announcing writes the catalog once per distinct catalog (one request per
//! chunk of at most 1 MiB), then the member key that names its digest, then
//! deletes the previous catalog; every key is under the node's lease, so a
//! node that leaves or dies takes its member key and catalog with it.
//! Reading the members is one range read of the member keys, plus one read
//! per catalog not seen before, at the same revision (the catalog a member
//! key names is in place at every revision at which it names it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::debug;

use super::conn::Conn;
use super::failure::reason;
use super::pb::etcdserverpb::{
    LeaseGrantRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};
use super::roster::{CHUNK_BYTES, Card, KeyKind, assemble, chunks, decode_card, encode_card};
use super::session::{Inner, RETRY_MAX, RETRY_MIN, prefix_end};
use super::txn::{delete_range, put};
use crate::backend::{Catalog, Member, Profile};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// How long a reservation made by `release_to` keeps other nodes' claims
/// out: the TTL of the lease it is put with (etcd may expire it up to
/// 500 ms later; a server whose minimum lease TTL is longer grants that).
pub(super) const RESERVATION_TTL: Duration = Duration::from_secs(2);

/// A reservation lease is used for this long after it was granted, so a
/// burst of handoffs costs one grant: each reservation keeps the others out
/// for 1.5 to 2 s.
const RESERVATION_REUSE: Duration = Duration::from_millis(500);

/// What to do with the reservation lease asked for `age` ago (`None`: none
/// yet) when a reservation is about to be put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseUse {
    /// Put it with this lease.
    Reuse,
    /// Put it with this lease, and ask for the next one meanwhile.
    ReuseAndRenew,
    /// Ask for a lease first: none, or used for long enough.
    Grant,
}

fn lease_use(age: Option<Duration>) -> LeaseUse {
    match age {
        Some(age) if age < RESERVATION_REUSE / 2 => LeaseUse::Reuse,
        Some(age) if age < RESERVATION_REUSE => LeaseUse::ReuseAndRenew,
        _ => LeaseUse::Grant,
    }
}

/// How many times `members` reads again when a catalog cannot be read at
/// the member keys' revision (compacted away meanwhile).
const MEMBER_READS: usize = 3;

/// What the session knows and does about membership.
pub(super) struct Fleet {
    /// The latest profile announced (`None`: none yet), and its number.
    desired: Mutex<(u64, Option<Profile>)>,
    /// Wakes the publisher when a profile is announced.
    nudge: Notify,
    /// Set when this node's member key was deleted while its lease may
    /// live (from outside: `etcdctl del`): everything is written again.
    rewrite: AtomicBool,
    /// The publisher's latest attempt: the number of the profile it tried
    /// and why it failed, if it did.
    outcome: watch::Sender<(u64, Option<String>)>,
    /// Bumped whenever the watch sees a member key change.
    changes: watch::Sender<u64>,
    /// The catalogs read so far, by digest (those of current members).
    catalogs: Mutex<HashMap<u64, Catalog>>,
    /// The lease reservations are put with, and when it was asked for.
    reservation: tokio::sync::Mutex<Option<(i64, Instant)>>,
    /// Set while the next reservation lease is being asked for.
    renewing: AtomicBool,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet {
            desired: Mutex::new((0, None)),
            nudge: Notify::new(),
            rewrite: AtomicBool::new(false),
            outcome: watch::Sender::new((0, None)),
            changes: watch::Sender::new(0),
            catalogs: Mutex::new(HashMap::new()),
            reservation: tokio::sync::Mutex::new(None),
            renewing: AtomicBool::new(false),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fleet {
    /// This node's member key was deleted: the publisher writes it (and its
    /// catalog) again, under the node's lease if it still has one.
    pub(super) fn rewrite(&self) {
        self.rewrite.store(true, Ordering::SeqCst);
        self.nudge.notify_one();
    }

    /// A member key changed (or may have, unseen).
    pub(super) fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Completes at the next [`bump`](Self::bump) after this call; never
    /// once the session is gone.
    pub(super) fn changed(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.changes.subscribe();
        Box::pin(async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// What the publisher last wrote, under which lease.
#[derive(Debug, Clone, Copy)]
struct Published {
    lease: i64,
    version: u64,
    /// The digest and chunk count of the catalog written under `lease`.
    catalog: Option<(u64, usize)>,
}

impl Inner {
    /// Makes `profile` this node's and waits until the publisher wrote it
    /// (or failed to: the error says why, and it keeps trying).
    pub(super) async fn announce(&self, profile: Profile) -> Result<()> {
        let mut outcome = self.fleet.outcome.subscribe();
        let version = {
            let mut desired = lock(&self.fleet.desired);
            desired.0 += 1;
            desired.1 = Some(profile);
            desired.0
        };
        self.fleet.nudge.notify_one();
        loop {
            {
                let (tried, failed) = &*outcome.borrow_and_update();
                if *tried >= version {
                    return match failed {
                        None => Ok(()),
                        Some(why) => Err(Error::backend(
                            crate::BackendErrorKind::Unreachable,
                            format!(
                                "cannot announce this node's profile to etcd ({}) now: {why}; it \
                                 is announced as soon as etcd answers",
                                self.describe
                            ),
                        )),
                    };
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(self.closed_error()),
                changed = outcome.changed() => if changed.is_err() {
                    return Err(self.closed_error());
                },
            }
        }
    }

    /// The one task that writes this node's member key and catalog: at
    /// start (a member that announced nothing yet), after each `announce`,
    /// and again under each new lease (the old keys went with the old one).
    pub(super) async fn publisher(self: Arc<Self>) {
        let mut changes = self.changes.subscribe();
        let mut done: Option<Published> = None;
        let mut retry = RETRY_MIN;
        loop {
            if self.fleet.rewrite.swap(false, Ordering::SeqCst) {
                done = None;
            }
            let lease = self.lock().lease.map(|l| l.id);
            let (version, profile) = lock(&self.fleet.desired).clone();
            let current = done.is_some_and(|d| Some(d.lease) == lease && d.version == version);
            match lease {
                Some(lease) if !current => {
                    match self
                        .publish(lease, version, profile.as_ref(), &mut done)
                        .await
                    {
                        Ok(()) => {
                            retry = RETRY_MIN;
                            self.fleet.outcome.send_replace((version, None));
                        }
                        Err(why) => {
                            debug!(node = %self.node, %why, retry_in = ?retry, "cannot write this node's member key to etcd yet");
                            self.fleet.outcome.send_replace((version, Some(why)));
                            if !self.pause(retry).await {
                                return;
                            }
                            retry = (retry * 2).min(RETRY_MAX);
                        }
                    }
                    continue;
                }
                None if self.fleet.outcome.borrow().0 < version => {
                    self.fleet.outcome.send_replace((
                        version,
                        Some("this node has no live etcd lease (reconnecting)".into()),
                    ));
                }
                _ => {}
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.fleet.nudge.notified() => {}
                changed = changes.changed() => if changed.is_err() {
                    return;
                },
            }
        }
    }

    /// Writes the member key of `profile` (number `version`) under `lease`:
    /// its catalog first unless already written under that lease, then the
    /// member key, then the previous catalog is deleted. Why it failed.
    async fn publish(
        &self,
        lease: i64,
        version: u64,
        profile: Option<&Profile>,
        done: &mut Option<Published>,
    ) -> std::result::Result<(), String> {
        let old = done.filter(|d| d.lease == lease).and_then(|d| d.catalog);
        let (card, catalog) = match profile {
            None => (None, None),
            Some(profile) => {
                let digest = profile.catalog.digest();
                let count = match old.filter(|&(d, _)| d == digest) {
                    Some((_, count)) => count,
                    None => {
                        let parts = chunks(&profile.catalog, CHUNK_BYTES);
                        for (n, part) in parts.iter().enumerate() {
                            let key = self.layout.chunk(&self.node, digest, n);
                            self.write(vec![put(&key, part, lease)]).await?;
                        }
                        parts.len()
                    }
                };
                (Some(Card::of(profile, count)), Some((digest, count)))
            }
        };
        let member = self.layout.member(&self.node);
        self.write(vec![put(&member, &encode_card(card.as_ref()), lease)])
            .await?;
        if let Some((digest, _)) = old.filter(|&(d, _)| Some(d) != catalog.map(|c| c.0)) {
            // Under the lease, it would go with it anyway.
            let start = self.layout.catalog(&self.node, digest);
            if let Err(why) = self
                .write(vec![delete_range(&start, &prefix_end(&start))])
                .await
            {
                debug!(node = %self.node, %why, "cannot delete this node's previous catalog from etcd; it goes with the lease");
            }
        }
        *done = Some(Published {
            lease,
            version,
            catalog,
        });
        Ok(())
    }

    /// One transaction of `ops`, unconditional; why it failed.
    async fn write(&self, ops: Vec<RequestOp>) -> std::result::Result<(), String> {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: ops,
            failure: Vec::new(),
        };
        let send = |c: Conn| {
            let request = c.request(txn.clone());
            async move { c.kv().txn(request).await }
        };
        match self.request(send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(reason(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.request_timeout)),
        }
    }

    /// One range read (at `revision` when it is not 0).
    async fn range(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        revision: i64,
    ) -> Result<RangeResponse> {
        let send = |c: Conn| {
            let request = c.request(RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                revision,
                ..RangeRequest::default()
            });
            async move { c.kv().range(request).await }
        };
        self.answer(self.request(send).await)
    }

    /// Every live member (those whose member key exists: their lease is
    /// alive), with the profile each announced.
    pub(super) async fn members(&self) -> Result<Vec<Member>> {
        let mut tries = 1;
        loop {
            match self.read_members().await {
                Err(e) if tries < MEMBER_READS => {
                    debug!(node = %self.node, why = %e, "reading the members again");
                    tries += 1;
                }
                read => return read,
            }
        }
    }

    async fn read_members(&self) -> Result<Vec<Member>> {
        let start = self.layout.members();
        let end = prefix_end(&start);
        let resp = self.range(start, end, 0).await?;
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        let mut members = Vec::with_capacity(resp.kvs.len());
        let mut used = HashSet::new();
        for kv in resp.kvs {
            let Some(KeyKind::Member(node)) = self.layout.kind(&kv.key) else {
                continue;
            };
            let card = decode_card(&kv.value).unwrap_or_else(|why| {
                debug!(node = %self.node, member = %node, %why, "a member key this version cannot read: no profile");
                None
            });
            let member = Member::new(node.clone(), true, None);
            let Some(card) = card else {
                members.push(member);
                continue;
            };
            used.insert(card.digest);
            let cached = lock(&self.fleet.catalogs).get(&card.digest).cloned();
            let catalog = match cached {
                Some(catalog) => catalog,
                None => {
                    let catalog = self.read_catalog(&node, &card, revision).await?;
                    lock(&self.fleet.catalogs).insert(card.digest, catalog.clone());
                    catalog
                }
            };
            members.push(member.with_profile(card.profile(catalog)));
        }
        lock(&self.fleet.catalogs).retain(|digest, _| used.contains(digest));
        Ok(members)
    }

    /// The catalog of `node` that `card` names, read at `revision`.
    async fn read_catalog(&self, node: &str, card: &Card, revision: i64) -> Result<Catalog> {
        let kvs = if card.chunks == 0 {
            Vec::new()
        } else {
            let start = self.layout.catalog(node, card.digest);
            let end = prefix_end(&start);
            self.range(start, end, revision).await?.kvs
        };
        let parts: Vec<&[u8]> = kvs.iter().map(|kv| kv.value.as_slice()).collect();
        assemble(card, &parts).map_err(|why| {
            Error::backend(
                crate::BackendErrorKind::Other,
                format!(
                    "cannot read the profile of member `{node}` from etcd ({}): {why}",
                    self.describe
                ),
            )
        })
    }

    /// The lease a reservation is put with: the last one asked for if that
    /// was less than [`RESERVATION_REUSE`] ago, else a new one of
    /// [`RESERVATION_TTL`]. `None` when etcd grants none now. Past half its
    /// use, the next one is asked for meanwhile, so that a stream of
    /// handoffs seldom waits for a grant.
    pub(super) async fn reservation_lease(self: &Arc<Self>) -> Option<i64> {
        let mut reservation = self.fleet.reservation.lock().await;
        let current = *reservation;
        match lease_use(current.map(|(_, at)| at.elapsed())) {
            LeaseUse::Reuse => return current.map(|(id, _)| id),
            LeaseUse::ReuseAndRenew => {
                if !self.fleet.renewing.swap(true, Ordering::SeqCst) {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        if let Some(granted) = inner.grant_reservation_lease().await {
                            let mut reservation = inner.fleet.reservation.lock().await;
                            if reservation.is_none_or(|(_, at)| at < granted.1) {
                                *reservation = Some(granted);
                            }
                        }
                        inner.fleet.renewing.store(false, Ordering::SeqCst);
                    });
                }
                return current.map(|(id, _)| id);
            }
            LeaseUse::Grant => {}
        }
        let granted = self.grant_reservation_lease().await?;
        *reservation = Some(granted);
        Some(granted.0)
    }

    /// A new lease of [`RESERVATION_TTL`] and when it was asked for.
    async fn grant_reservation_lease(&self) -> Option<(i64, Instant)> {
        let at = Instant::now();
        let send = |c: Conn| {
            let request = c.request(LeaseGrantRequest {
                ttl: RESERVATION_TTL.as_secs() as i64,
                id: 0,
            });
            async move { c.lease().lease_grant(request).await }
        };
        match self.request(send).await {
            Ok(Ok(resp)) if resp.ttl > 0 => Some((resp.id, at)),
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => reason(&e),
                    Ok(Ok(resp)) => format!("granted with no TTL: {}", resp.error),
                    Err(_) => "no answer".into(),
                };
                debug!(node = %self.node, %why, "no lease for a reservation: a plain release");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_lease_is_renewed_before_it_is_used_up() {
        assert_eq!(lease_use(None), LeaseUse::Grant);
        assert_eq!(lease_use(Some(Duration::ZERO)), LeaseUse::Reuse);
        let half = RESERVATION_REUSE / 2;
        assert_eq!(
            lease_use(Some(half - Duration::from_millis(1))),
            LeaseUse::Reuse
        );
        // Past half its use: used, and the next one asked for meanwhile.
        assert_eq!(lease_use(Some(half)), LeaseUse::ReuseAndRenew);
        assert_eq!(
            lease_use(Some(RESERVATION_REUSE - Duration::from_millis(1))),
            LeaseUse::ReuseAndRenew
        );
        // Used up: every reservation keeps the others out long enough.
        assert_eq!(lease_use(Some(RESERVATION_REUSE)), LeaseUse::Grant);
    }
}
