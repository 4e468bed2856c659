//! Claims and leases: what a guardian asks for ([`ClaimRequest`]), what it
//! gets ([`Claim`], [`Lease`]), and how the backend ends a tenure
//! ([`LeaseSignal`], [`LeaseEnd`]).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::Holder;
use crate::ShutdownReason;
use crate::service::BoxFuture;

/// A request to claim one id.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The singleton id.
    pub id: Arc<str>,
    /// How long the instance may take to stop (its `shutdown` budget). A CP
    /// backend ends the lease at least this long before the server could
    /// free the id.
    pub stop_budget: Duration,
}

impl ClaimRequest {
    /// A request for `id` by an instance that may take `stop_budget` to stop.
    pub fn new(id: impl Into<Arc<str>>, stop_budget: Duration) -> Self {
        ClaimRequest {
            id: id.into(),
            stop_budget,
        }
    }
}

/// The answer to [`Session::try_claim`](super::Session::try_claim).
#[non_exhaustive]
pub enum Claim {
    /// This node now holds the id.
    Granted(Lease),
    /// Someone else holds the id (or may: the backend could not rule it out).
    Busy {
        /// The holder, when the backend knows it.
        holder: Option<Holder>,
        /// Completes when the id may have become free; the guardian then
        /// tries again. It must not complete before something changed.
        wake: BoxFuture<'static, ()>,
    },
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Granted(lease) => f.debug_tuple("Granted").field(lease).finish(),
            Claim::Busy { holder, .. } => f
                .debug_struct("Busy")
                .field("holder", holder)
                .finish_non_exhaustive(),
        }
    }
}

/// One tenure of one id on this node.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The fencing token: strictly greater than every token handed out
    /// before for this id.
    pub token: u64,
    /// Ended by the backend when the tenure ends.
    pub signal: LeaseSignal,
}

impl Lease {
    /// A lease with `token`, and the signal the backend keeps to end it.
    pub fn new(token: u64) -> (Lease, LeaseSignal) {
        let signal = LeaseSignal::new();
        (
            Lease {
                token,
                signal: signal.clone(),
            },
            signal,
        )
    }

    /// Completes when the backend ends the tenure.
    pub fn ended(&self) -> impl Future<Output = LeaseEnd> + Send + '_ {
        self.signal.ended()
    }

    /// [`Lease::ended`] for the one task that holds the lease (the
    /// guardian): a reference instead of a registration in a wait list, so
    /// the running part of every held id stays small. A second task
    /// awaiting it at the same time would take the wake-up from the first:
    /// everyone else uses [`Lease::ended`].
    pub(crate) fn holder_ended(&self) -> impl Future<Output = LeaseEnd> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_holder_ended(cx))
    }

    /// [`Lease::holder_ended`] as a poll, for a future that keeps no state
    /// of its own for it.
    pub(crate) fn poll_holder_ended(&self, cx: &mut std::task::Context<'_>) -> Poll<LeaseEnd> {
        let inner = &self.signal.inner;
        if let Some(end) = inner.end.get() {
            return Poll::Ready(end.clone());
        }
        inner.holder.register(cx.waker());
        // Looked at again after registering: an end in between has
        // either been seen here or wakes the waker just registered.
        match inner.end.get() {
            Some(end) => Poll::Ready(end.clone()),
            None => Poll::Pending,
        }
    }
}

/// How a backend tells a holder its tenure is over. Cloneable: the backend
/// keeps one clone, the lease another. The first [`LeaseSignal::end`] wins.
#[derive(Clone)]
pub struct LeaseSignal {
    inner: Arc<SignalInner>,
}

/// What a lease's clones share: how it ended, once it has, and whom to
/// wake then. A `Notify`, not a cancellation token: every held id has one,
/// and a token is a tree node of its own (some 90 bytes more).
struct SignalInner {
    end: OnceLock<LeaseEnd>,
    ended: Notify,
    /// The holder's task, for [`Lease::holder_ended`].
    holder: AtomicWaker,
}

impl LeaseSignal {
    /// A signal that has not ended.
    pub fn new() -> Self {
        LeaseSignal {
            inner: Arc::new(SignalInner {
                end: OnceLock::new(),
                ended: Notify::new(),
                holder: AtomicWaker::new(),
            }),
        }
    }

    /// Ends the tenure with `end`. Returns false when it had already ended.
    pub fn end(&self, end: LeaseEnd) -> bool {
        let first = self.inner.end.set(end).is_ok();
        self.inner.ended.notify_waiters();
        self.inner.holder.wake();
        first
    }

    /// How the tenure ended, if it has.
    pub fn ended_with(&self) -> Option<LeaseEnd> {
        self.inner.end.get().cloned()
    }

    /// Completes when the tenure ends.
    pub async fn ended(&self) -> LeaseEnd {
        loop {
            let notified = self.inner.ended.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the end is looked at: an end after the
            // look wakes this registration.
            notified.as_mut().enable();
            if let Some(end) = self.inner.end.get() {
                return end.clone();
            }
            notified.await;
        }
    }
}

impl Default for LeaseSignal {
    fn default() -> Self {
        LeaseSignal::new()
    }
}

impl fmt::Debug for LeaseSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseSignal")
            .field("ended", &self.inner.end.get())
            .finish()
    }
}

/// Why a tenure ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEnd {
    /// The backend can no longer vouch for this node's hold on the id.
    Lost,
    /// A healed split found another holder, and it won.
    Conflict {
        /// The node that keeps the id, when known.
        winner: Option<String>,
    },
}

impl From<LeaseEnd> for ShutdownReason {
    fn from(end: LeaseEnd) -> Self {
        match end {
            LeaseEnd::Lost => ShutdownReason::LeaseLost,
            LeaseEnd::Conflict { .. } => ShutdownReason::Conflict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::soon;

    #[tokio::test(start_paused = true)]
    async fn every_waiter_learns_the_first_end() {
        let (lease, signal) = Lease::new(7);
        let mut holder = Box::pin(lease.holder_ended());
        let mut other = Box::pin(lease.ended());
        assert!(soon(holder.as_mut()).await.is_none());
        assert!(soon(other.as_mut()).await.is_none());
        let winner = LeaseEnd::Conflict {
            winner: Some("b".into()),
        };
        assert!(signal.end(winner.clone()));
        assert!(!signal.end(LeaseEnd::Lost), "the first end wins");
        assert_eq!(soon(holder).await, Some(winner.clone()));
        assert_eq!(soon(other).await, Some(winner.clone()));
        // Asked after the end: at once.
        assert_eq!(soon(lease.ended()).await, Some(winner.clone()));
        assert_eq!(soon(lease.holder_ended()).await, Some(winner));
    }

    /// Every held id has one signal: with the `Arc`'s counts, 104 B (it was
    /// 56 B and a cancellation token of 112).
    #[test]
    fn a_signal_stays_small() {
        let inner = std::mem::size_of::<SignalInner>();
        println!("lease signal {inner} B");
        assert!(inner <= 88, "the lease signal grew to {inner} B");
    }
}
