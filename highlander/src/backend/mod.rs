//! The coordination seam: what a backend must do so the runtime can run
//! exactly one instance per id.
//!
//! A [`Backend`] is configuration (a URL, a [`MemoryCluster`]); connecting it
//! for one node gives a [`Session`], the node's single connection to the
//! coordination engine. The runtime runs one guardian task per singleton id,
//! and every guardian talks to the same session, one id at a time:
//!
//! ```text
//! guardian(id):  try_claim(id) ──Granted(lease)──> run instance until lease.ended()
//!                     │                                   or node shutdown, then release(id)
//!                     └──Busy { wake }──> await wake, then try_claim again (never a busy loop)
//! ```
//!
//! The per-id calls are the seam, not the wire protocol: a backend that talks
//! to a server batches them (one round trip tries every pending claim, one
//! watch or `LISTEN` wakes every waiter), and keeps O(1) connections per node
//! however many ids it runs.
//!
//! # What a lease promises
//!
//! A [`Lease`] carries a fencing token that is strictly greater than every
//! token handed out before for that id, and a [`LeaseSignal`] that the backend
//! ends:
//! - CP backends (Postgres, etcd) end it with [`LeaseEnd::Lost`] early enough
//!   that the instance, given [`ClaimRequest::stop_budget`] to stop, has
//!   stopped before the server could grant the id to any other node;
//! - AP backends (memory with partitions, the embedded cluster) end it with
//!   [`LeaseEnd::Conflict`] when a healed split finds two holders and this one
//!   loses: the holder with the earliest claim wins, ties to the lower node name.
//!
//! # Start-up: one policy for every backend
//!
//! [`Builder::start`](crate::Builder::start) owns the loop; a backend's
//! [`Backend::connect`] is one attempt. The runtime:
//!
//! 1. calls `connect`; on success, the node is up;
//! 2. on an error retrying cannot fix ([`Error::is_retryable`](crate::Error::is_retryable) is false: a
//!    refused password or certificate, a missing database, TLS files that do
//!    not load, a bad URL, and any error the backend did not mark as
//!    transient), fails `start()` at once with that error;
//! 3. otherwise logs one warning line with the cause, waits (50 ms doubling
//!    to 2 s, jittered) and tries again, until the start timeout has passed
//!    since the first try: then `start()` fails with [`Error::Unreachable`](crate::Error::Unreachable),
//!    which names the backend and carries the last cause.
//!
//! The start timeout is [`Builder::start_timeout`](crate::Builder::start_timeout)
//! if set, else the backend URL's `start_timeout=` option
//! ([`Backend::start_timeout`]), else [`DEFAULT_START_TIMEOUT`] (30 s). An
//! attempt still running when it passes is dropped, so `connect` must be
//! cancel-safe; it should also bound itself (each backend has its own
//! per-attempt connect timeout), so one hung attempt does not use the whole
//! budget.
//!
//! The embedded cluster reads "reaching the backend" as: binding its
//! listener (which must succeed), and, for a node that is not itself one of
//! its seeds, hearing from a seed. A node that is one of its own seeds may
//! found the cluster alone, as the first seed node of an Akka cluster does.

use std::sync::Arc;
use std::time::Duration;

use crate::Result;
use crate::service::BoxFuture;

pub(crate) mod kit;
pub mod memory;
mod profile;

/// How long `start()` tries to reach the backend before it fails with
/// [`Error::Unreachable`](crate::Error::Unreachable): 30 s, long enough to ride out a database or
/// etcd restarting alongside the application (a container started in the
/// same deployment, a failover of a managed database: typically 5 to 20 s),
/// short enough that a wrong address fails the deployment while someone is
/// watching instead of leaving a node that silently never runs anything.
/// Change it with [`Builder::start_timeout`](crate::Builder::start_timeout)
/// or a backend URL's `start_timeout=` option.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

pub use memory::MemoryCluster;
pub use profile::{Catalog, Profile};

/// A coordination backend, before it is connected: what
/// [`Builder::backend`](crate::Builder::backend) takes.
pub trait Backend: Send + Sync + 'static {
    /// Makes one attempt to connect one node; the runtime owns the retrying
    /// (see [Start-up](self#start-up-one-policy-for-every-backend)).
    ///
    /// Fails with a message a user can act on. The error's kind tells the
    /// runtime whether to try again: [`Error::config`](crate::Error::config), or
    /// [`Error::backend`](crate::Error::backend) with [`BackendErrorKind::Auth`](crate::BackendErrorKind::Auth),
    /// `Tls`, `Refused` or `Protocol`, for what only a change of
    /// configuration fixes (fails `start()` at once);
    /// [`BackendErrorKind::Unreachable`](crate::BackendErrorKind::Unreachable)
    /// for an engine that cannot be reached now (retried until the start
    /// timeout). [`BackendErrorKind::Other`](crate::BackendErrorKind::Other)
    /// is not retried: mark what retrying can fix. The attempt bounds itself with the backend's own connect
    /// timeout, and must be cancel-safe: the runtime drops it when the start
    /// timeout passes or the process is told to stop.
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>>;

    /// A description for logs and status, with any credential hidden.
    fn describe(&self) -> String;

    /// The start timeout this backend's configuration asks for (a URL's
    /// `start_timeout=` option), if any. [`Builder::start_timeout`](crate::Builder::start_timeout)
    /// wins over it; without either, `start()` uses [`DEFAULT_START_TIMEOUT`].
    fn start_timeout(&self) -> Option<Duration> {
        None
    }
}

/// A backend chosen at run time, as [`from_url`] returns it, is a backend:
/// `Runtime::builder().backend(from_url(url)?)`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
/// let backend = highlander::backend::from_url("memory")?;
/// let handle = highlander::Runtime::builder().backend(backend).start().await?;
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
impl Backend for Box<dyn Backend> {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        (**self).connect(node)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn start_timeout(&self) -> Option<Duration> {
        (**self).start_timeout()
    }
}

mod lease;
mod session;
mod url;
mod view;

pub use lease::{Claim, ClaimRequest, Lease, LeaseEnd, LeaseSignal};
pub use session::Session;
pub use url::from_url;
pub use view::{HeldId, Holder, Member};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub mod etcd;

#[cfg(feature = "cluster")]
#[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
pub mod cluster;

/// Checks every backend can run on itself.
#[cfg(test)]
pub(crate) mod conformance;

#[cfg(test)]
mod tests;
