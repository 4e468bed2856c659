//! The [`Session`] trait: one node's connection to the coordination engine,
//! and what each method promises when its future is dropped.

use std::time::Duration;

use super::{Claim, ClaimRequest, HeldId, Holder, Member, Profile};
use crate::service::BoxFuture;
use crate::{Error, Result};

/// One node's connection to the coordination engine.
pub trait Session: Send + Sync + 'static {
    /// Tries to claim an id for this node. Never blocks waiting for a holder:
    /// returns [`Claim::Busy`] with a future that completes when the id may
    /// have become free. An error means the engine cannot be asked now; the
    /// guardian retries with backoff and claims nothing meanwhile.
    ///
    /// # Cancel safety
    ///
    /// The guardian drops a `try_claim` future mid-flight when the node shuts
    /// down, and other callers may time one out. Dropping it must leave no
    /// tenure behind: **if the engine grants the claim after the future was
    /// dropped (or the grant cannot be handed to the caller any more), the
    /// backend releases that tenure itself**, as [`Session::release`] would,
    /// and ends its lease signal; no other node is kept waiting on a tenure
    /// nobody runs, and no signal is left dangling. Concretely:
    /// - a backend that decides synchronously (memory) decides in the first
    ///   poll, so a future dropped before it claimed nothing, and one polled
    ///   has already answered;
    /// - a backend that hands the claim to a driver task and awaits a reply
    ///   (Postgres, etcd) checks that the reply was delivered (a `oneshot`
    ///   send that fails means the future is gone) and otherwise releases
    ///   the granted tenure in the same turn of its driver;
    /// - a backend that awaits an arbiter (the embedded cluster) releases
    ///   and announces the release of a grant that arrives for a claim whose
    ///   future was dropped.
    ///
    /// A dropped future may still have cost a round trip, and a token: the
    /// next tenure's token is greater, as always.
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>>;

    /// Gives up this node's tenure of `id` (the one with `token`), so a
    /// waiting node can take over at once. Releasing a tenure that already
    /// ended is not an error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future never keeps the tenure: the guardian treats the
    /// tenure as over once it asked, so the backend must end it whatever
    /// happens to the future. Either the release is queued before the first
    /// `await` (the driver finishes it), or it is undone by the engine's own
    /// expiry (the lease, the session) like any tenure whose holder went
    /// silent. The tenure is over for this node as soon as `release` is
    /// called: no later `try_claim` answer may count it as held.
    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>>;

    /// Who holds `id` as far as this node can see, if the backend knows.
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>>;

    /// The members of the cluster as this node sees them, for backends that
    /// have members (the embedded cluster, memory); empty otherwise.
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Tells the other members this node's [`Profile`]: its weight, labels
    /// and the ids it runs, which they need to compute where each id belongs
    /// ([`crate::placement`]). The runtime calls it once before its first
    /// claim and again whenever its ids change; the backend keeps the latest
    /// profile for the life of the session (announcing it again after a
    /// reconnect) and shows it to every member in [`Member::profile`]; a
    /// member's profile disappears with the member.
    ///
    /// The default does nothing: [`members`](Self::members) then carries no
    /// profiles and every node claims as ids come free, with no placement.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the previous profile in place or the
    /// new one; the runtime announces again on its next change.
    fn announce(&self, profile: Profile) -> BoxFuture<'_, Result<()>> {
        let _ = profile;
        Box::pin(async { Ok(()) })
    }

    /// Completes when [`members`](Self::members) may answer differently than
    /// when this future was created: a member joined, left, became
    /// unreachable or announced a new profile. Spurious completions are
    /// allowed (the caller asks `members` again); a missed change is not.
    /// The default never completes (a backend without members).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future changes nothing.
    fn members_changed(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    /// Gives up this node's tenure of `id` as [`release`](Self::release)
    /// does, in favour of the member `node`: for a short while (a backend's
    /// own choice, at most a few seconds) other members' claims of `id` are
    /// refused so that `node` takes it over, then anyone may. What
    /// `RuntimeHandle::transfer` and
    /// rebalancing use. The default is a plain release (the placement order
    /// then decides who takes the id).
    ///
    /// # Cancel safety
    ///
    /// As [`release`](Self::release).
    fn release_to(&self, id: &str, token: u64, node: &str) -> BoxFuture<'_, Result<()>> {
        let _ = node;
        self.release(id, token)
    }

    /// Whether this node's tenure of `id` (the one with `token`) may overlap
    /// another node's tenure of `id`, as far as this session knows: another
    /// holder is in view whose conflict the heal rule has not settled yet,
    /// or the cluster may be split (a member this node cannot reach, or has
    /// not heard from within its failure timeout, may have taken the id on
    /// its side). False once the tenure is over.
    ///
    /// The runtime does not hand a contested tenure over
    /// ([`Builder::rebalance`](crate::Builder::rebalance)): an instance
    /// that overlapped another must be stopped by the heal rule with
    /// [`LeaseEnd::Conflict`](super::LeaseEnd::Conflict), which tells the
    /// service so, never with `Moved`, which says that nothing overlapped.
    /// The default is false: a CP backend never has a second holder.
    ///
    /// # Cancel safety
    ///
    /// Synchronous: nothing to cancel.
    fn contested(&self, id: &str, token: u64) -> bool {
        let _ = (id, token);
        false
    }

    /// Every id held now as far as this node can see (in its namespace, for
    /// the backends that have one), sorted by id: what status tools such as
    /// the `highlander` CLI show. A backend that cannot list its holders
    /// returns an error that says so (the default).
    ///
    /// # Cancel safety
    ///
    /// Read-only: dropping the future changes nothing.
    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        Box::pin(async {
            Err(Error::config(
                "this backend cannot list who holds which id".to_string(),
            ))
        })
    }

    /// Whether this session can honour a shutdown budget of `budget` for
    /// `id`: a backend whose leases expire (etcd) refuses a budget that does
    /// not fit in its TTL, in one line that names both and says what to
    /// change. The runtime asks for every service when it starts and does
    /// not start on an error. The default accepts any budget.
    ///
    /// # Cancel safety
    ///
    /// Synchronous: nothing to cancel.
    fn check_stop_budget(&self, id: &str, budget: Duration) -> Result<()> {
        let _ = (id, budget);
        Ok(())
    }

    /// Leaves gracefully: releases everything this node still holds and
    /// closes the connection. Called once, after every guardian has stopped.
    ///
    /// # Cancel safety
    ///
    /// The runtime awaits it to the end. Dropped anyway, it must leave this
    /// node holding nothing longer than a crash would: what the engine still
    /// holds for the node expires with its session or lease, and dropping
    /// the session (the runtime's last reference to it) is a crash.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// For backends with time-bound leases (Postgres, etcd): the moment
    /// this node must give up every lease it holds unless the engine
    /// confirms its hold again before then. Exported as the
    /// `highlander_lease_deadline_seconds` gauge and checked by readiness.
    /// `None` (the default) when the backend has no such deadline or does
    /// not report it.
    ///
    /// # Cancel safety
    ///
    /// Synchronous: nothing to cancel.
    fn lease_deadline(&self) -> Option<std::time::Instant> {
        None
    }
}
