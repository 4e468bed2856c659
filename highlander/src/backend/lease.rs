//! Claims and leases: what a guardian asks for ([`ClaimRequest`]), what it
//! gets ([`Claim`], [`Lease`]), and how the backend ends a tenure
//! ([`LeaseSignal`], [`LeaseEnd`]).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
}

/// How a backend tells a holder its tenure is over. Cloneable: the backend
/// keeps one clone, the lease another. The first [`LeaseSignal::end`] wins.
#[derive(Clone)]
pub struct LeaseSignal {
    inner: Arc<SignalInner>,
}

struct SignalInner {
    cancel: CancellationToken,
    end: OnceLock<LeaseEnd>,
}

impl LeaseSignal {
    /// A signal that has not ended.
    pub fn new() -> Self {
        LeaseSignal {
            inner: Arc::new(SignalInner {
                cancel: CancellationToken::new(),
                end: OnceLock::new(),
            }),
        }
    }

    /// Ends the tenure with `end`. Returns false when it had already ended.
    pub fn end(&self, end: LeaseEnd) -> bool {
        let first = self.inner.end.set(end).is_ok();
        self.inner.cancel.cancel();
        first
    }

    /// How the tenure ended, if it has.
    pub fn ended_with(&self) -> Option<LeaseEnd> {
        self.inner.end.get().cloned()
    }

    /// Completes when the tenure ends.
    pub async fn ended(&self) -> LeaseEnd {
        self.inner.cancel.cancelled().await;
        self.inner.end.get().cloned().unwrap_or(LeaseEnd::Lost)
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
